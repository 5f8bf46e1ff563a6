//! The daemon's scheduling priority, raised only while replication falls
//! behind.
//!
//! At a fixed favoured niceness the daemon wakes for every few kernel
//! events and handles them one wake-up at a time: in the bench that
//! doubled its CPU per connection and cost the datapath a third of its new
//! connections per second. At the niceness it was started with, a node
//! whose CPUs are saturated starves it instead, and the peer's copies lag
//! seconds behind. So it runs as started, and is favoured while a turn of
//! its loop finds more work waiting than it takes in one turn (a full
//! batch of events or datagrams), while the peer acknowledges late (the
//! lag at least a tenth of its threshold), or while the peer sends full
//! datagrams (it has a backlog, paced by this node's acknowledgements): it
//! is behind; until it has not been behind for [`CALM`].

use std::time::{Duration, Instant};

/// How long the daemon stays favoured after it was last behind.
pub const CALM: Duration = Duration::from_secs(2);

/// The niceness decision, pure: fed one verdict per turn of the loop, it
/// says when to change the niceness.
#[derive(Debug)]
pub struct Priority {
    /// The niceness while behind (None: never changed).
    favoured: Option<i32>,
    /// The niceness the daemon was started with.
    normal: i32,
    /// When it was last behind, while favoured.
    last_behind: Option<Instant>,
    favoured_now: bool,
    /// Times it was favoured.
    pub raised: u64,
}

impl Priority {
    /// `favoured`: the niceness while behind; None, or one not below
    /// `normal`, leaves the niceness alone.
    pub fn new(favoured: Option<i32>, normal: i32) -> Self {
        Self {
            favoured: favoured.filter(|&f| f < normal),
            normal,
            last_behind: None,
            favoured_now: false,
            raised: 0,
        }
    }

    /// One turn's verdict; returns the niceness to set now, if it changes.
    pub fn turn(&mut self, behind: bool, now: Instant) -> Option<i32> {
        let favoured = self.favoured?;
        if behind {
            self.last_behind = Some(now);
            if !self.favoured_now {
                self.favoured_now = true;
                self.raised += 1;
                return Some(favoured);
            }
        } else if self.favoured_now && self.last_behind.is_none_or(|t| now >= t + CALM) {
            self.favoured_now = false;
            return Some(self.normal);
        }
        None
    }

    /// When to look again without a turn (the calm period ends).
    pub fn deadline(&self) -> Option<Instant> {
        self.favoured_now
            .then_some(self.last_behind)
            .flatten()
            .map(|t| t + CALM)
    }

    pub fn is_favoured(&self) -> bool {
        self.favoured_now
    }
}

/// The calling thread's niceness.
pub fn current() -> i32 {
    // SAFETY: getpriority reads the calling process's (thread's) niceness;
    // -1 is a valid answer, so errno is cleared and checked.
    unsafe {
        *libc::__errno_location() = 0;
        let n = libc::getpriority(libc::PRIO_PROCESS, 0);
        if n == -1 && *libc::__errno_location() != 0 {
            0
        } else {
            n
        }
    }
}

/// Sets the niceness of every thread of the process (on Linux niceness is
/// per thread, and the runtime's threads all work for the loop).
pub fn set(nice: i32) -> std::io::Result<()> {
    let mut result = Ok(());
    for entry in std::fs::read_dir("/proc/self/task")? {
        let Some(tid) = entry?
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<libc::id_t>().ok())
        else {
            continue;
        };
        // SAFETY: setpriority on one of this process's threads.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) } != 0 {
            let e = std::io::Error::last_os_error();
            // A thread that ended meanwhile is no failure.
            if e.raw_os_error() != Some(libc::ESRCH) {
                result = Err(e);
            }
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn favoured_while_behind_and_for_the_calm_period_after() {
        let t0 = Instant::now();
        let mut p = Priority::new(Some(-10), 0);
        assert_eq!(p.turn(false, t0), None);
        assert_eq!(p.turn(true, t0), Some(-10));
        assert_eq!(p.turn(true, t0 + Duration::from_millis(500)), None);
        assert_eq!(p.turn(false, t0 + Duration::from_millis(1000)), None);
        assert_eq!(p.deadline(), Some(t0 + Duration::from_millis(500) + CALM));
        assert_eq!(p.turn(false, t0 + Duration::from_millis(2500)), Some(0));
        assert!(!p.is_favoured());
        assert_eq!(p.turn(false, t0 + Duration::from_secs(10)), None);
        assert_eq!(p.turn(true, t0 + Duration::from_secs(11)), Some(-10));
        assert_eq!(p.raised, 2);
    }

    #[test]
    fn off_when_not_below_the_normal_niceness() {
        let t0 = Instant::now();
        for mut p in [
            Priority::new(None, 0),
            Priority::new(Some(0), 0),
            Priority::new(Some(-5), -10),
        ] {
            assert_eq!(p.turn(true, t0), None);
            assert_eq!(p.deadline(), None);
        }
    }
}
