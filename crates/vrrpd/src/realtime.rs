//! The advert path's protection from other work: vrrpd's router runs on a
//! thread of its own at real-time priority (SCHED_FIFO), with the process's
//! memory locked, so a loaded machine (CPU hogs, a flood of new flows)
//! neither delays its adverts nor makes a backup miss the master's.
//!
//! Measured in the namespace lab (deploy/bench-failover.sh --stress): at
//! normal priority on a shared runtime, four CPU hogs per core delayed the
//! master's adverts by up to 306 ms at a 100 ms interval, enough for false
//! takeovers. Both settings need privileges (CAP_SYS_NICE, CAP_IPC_LOCK);
//! without them vrrpd runs at normal priority and says so in one line.

use std::io;

/// What applying the settings gave, for the one log line.
#[derive(Debug)]
pub struct Outcome {
    pub priority: u8,
    pub scheduling: io::Result<()>,
    pub memory_lock: Option<io::Result<()>>,
}

impl Outcome {
    /// True when something asked for was refused.
    pub fn refused(&self) -> bool {
        self.scheduling.is_err() || matches!(self.memory_lock, Some(Err(_)))
    }

    /// The one line for the operator.
    pub fn describe(&self) -> String {
        let sched = match (&self.scheduling, self.priority) {
            (Ok(()), 0) => "advert thread at normal priority (rt_priority = 0)".to_owned(),
            (Ok(()), p) => format!("advert thread at real-time priority SCHED_FIFO {p}"),
            (Err(e), p) => format!(
                "real-time priority SCHED_FIFO {p} refused ({e}; vrrpd needs CAP_SYS_NICE and, \
                 under systemd, RestrictRealtime=no): adverts run at normal priority and may be \
                 delayed on a busy machine"
            ),
        };
        match &self.memory_lock {
            None => sched,
            Some(Ok(())) => format!("{sched}; memory locked"),
            Some(Err(e)) => format!(
                "{sched}; memory lock refused ({e}; vrrpd needs CAP_IPC_LOCK): pages may be \
                 swapped out"
            ),
        }
    }
}

/// Sets the calling thread's scheduling: SCHED_FIFO at `priority`, or
/// SCHED_OTHER when `priority` is 0. On the first call (`lock_memory`)
/// also locks the process's memory, present and future, as it is touched.
pub fn apply(priority: u8, lock_memory: bool) -> Outcome {
    let scheduling = set_thread_scheduling(priority);
    let memory_lock = (lock_memory && priority > 0).then(lock_all_memory);
    Outcome {
        priority,
        scheduling,
        memory_lock,
    }
}

fn set_thread_scheduling(priority: u8) -> io::Result<()> {
    let (policy, prio) = if priority == 0 {
        (libc::SCHED_OTHER, 0)
    } else {
        (libc::SCHED_FIFO, libc::c_int::from(priority))
    };
    let param = libc::sched_param {
        sched_priority: prio,
    };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param.
    let rc = unsafe { libc::sched_setscheduler(0, policy, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn lock_all_memory() -> io::Result<()> {
    // MCL_ONFAULT: lock pages as they are touched rather than faulting in
    // every thread's whole stack reservation at once.
    // SAFETY: mlockall takes flags only.
    let rc = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The calling thread's current SCHED_FIFO priority, 0 if it is not
/// real-time (for tests and Status).
pub fn current_priority() -> u8 {
    // SAFETY: pid 0 is the calling thread.
    let policy = unsafe { libc::sched_getscheduler(0) };
    if policy != libc::SCHED_FIFO {
        return 0;
    }
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: valid out-pointer.
    if unsafe { libc::sched_getparam(0, &mut param) } != 0 {
        return 0;
    }
    u8::try_from(param.sched_priority).unwrap_or(0)
}
