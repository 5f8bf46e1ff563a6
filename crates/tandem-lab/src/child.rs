//! Processes the lab started, and stopping them by PID.

use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, ExitStatus, Output};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::LabError;

/// How long a process gets between SIGTERM and SIGKILL.
pub(crate) const GRACE: Duration = Duration::from_secs(2);
/// How long to wait for a SIGKILLed process to be reaped before giving up
/// (a process stuck in uninterruptible sleep must not hang a test's drop).
const KILL_WAIT: Duration = Duration::from_secs(5);

/// The `Child` is shared between the [`LabChild`] handle and its
/// [`Lab`](crate::Lab), so whichever is dropped first stops *and reaps* the
/// process. Signals are sent only while the process is known to be
/// unreaped, so a PID can never be reused by an unrelated process under us.
/// `None` once [`LabChild::wait_with_output`] took the child over.
pub(crate) type SharedChild = Arc<Mutex<Option<Child>>>;

fn lock(child: &SharedChild) -> MutexGuard<'_, Option<Child>> {
    child.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A process a lab started inside one of its namespaces.
///
/// Dropping it sends SIGTERM, then SIGKILL after 2 s if it is still running,
/// and reaps it. Dropping the lab does the same to every process it started
/// that is still running.
#[derive(Debug)]
pub struct LabChild {
    pid: Pid,
    command: String,
    child: SharedChild,
}

impl LabChild {
    pub(crate) fn new(child: Child, command: String) -> (LabChild, SharedChild) {
        // Linux pids fit in i32 (pid_max <= 2^22).
        let pid = Pid::from_raw(child.id() as i32);
        let shared = Arc::new(Mutex::new(Some(child)));
        (
            LabChild {
                pid,
                command,
                child: shared.clone(),
            },
            shared,
        )
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The command line, for messages.
    pub fn command(&self) -> &str {
        &self.command
    }

    /// Sends `signal` to the process by PID. Fails with
    /// [`LabError::Exited`] once the process has been reaped.
    pub fn kill(&mut self, signal: Signal) -> Result<(), LabError> {
        let mut guard = lock(&self.child);
        match guard.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => kill(self.pid, signal).map_err(|source| LabError::Signal {
                pid: self.pid.as_raw(),
                signal,
                command: self.command.clone(),
                source,
            }),
            Some(Err(source)) => Err(self.io_error("checking", source)),
            Some(Ok(Some(_))) | None => Err(LabError::Exited {
                pid: self.pid.as_raw(),
                command: self.command.clone(),
            }),
        }
    }

    /// The exit status if the process has exited (reaping it), else `None`.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, LabError> {
        let mut guard = lock(&self.child);
        match guard.as_mut() {
            Some(child) => child
                .try_wait()
                .map_err(|source| self.io_error("checking", source)),
            None => Err(LabError::Exited {
                pid: self.pid.as_raw(),
                command: self.command.clone(),
            }),
        }
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still
    /// running then.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, LabError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the process as a supervisor would: SIGTERM, up to `grace` to
    /// exit, then SIGKILL. Returns how it ended.
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus, LabError> {
        stop_all(std::slice::from_ref(&self.child), grace);
        match self.try_wait()? {
            Some(status) => Ok(status),
            None => Err(LabError::Timeout {
                what: format!(
                    "exit of process {} (`{}`) after SIGKILL",
                    self.pid, self.command
                ),
                timeout: grace + KILL_WAIT,
                last: "still running".into(),
            }),
        }
    }

    /// The process's stdin, if it was spawned with `Stdio::piped()` (once).
    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        lock(&self.child).as_mut()?.stdin.take()
    }

    /// The process's stdout, if it was spawned with `Stdio::piped()` (once).
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        lock(&self.child).as_mut()?.stdout.take()
    }

    /// The process's stderr, if it was spawned with `Stdio::piped()` (once).
    pub fn take_stderr(&mut self) -> Option<ChildStderr> {
        lock(&self.child).as_mut()?.stderr.take()
    }

    /// Waits for the process to exit on its own and collects its piped
    /// output. Not bounded in time: stop it first if it may not exit.
    pub fn wait_with_output(self) -> Result<Output, LabError> {
        let taken = lock(&self.child).take();
        match taken {
            Some(child) => child
                .wait_with_output()
                .map_err(|source| self.io_error("waiting for", source)),
            None => Err(LabError::Exited {
                pid: self.pid.as_raw(),
                command: self.command.clone(),
            }),
        }
    }

    fn io_error(&self, doing: &str, source: std::io::Error) -> LabError {
        LabError::Io {
            what: format!("{doing} process {} (`{}`)", self.pid, self.command),
            source,
        }
    }
}

impl Drop for LabChild {
    fn drop(&mut self) {
        stop_all(std::slice::from_ref(&self.child), GRACE);
    }
}

/// SIGTERM to every running process, up to `grace` for all of them to exit,
/// SIGKILL to the rest; every one is reaped. Never panics: failures are
/// reported on stderr.
pub(crate) fn stop_all(children: &[SharedChild], grace: Duration) {
    let mut running: Vec<&SharedChild> = children
        .iter()
        .filter(|c| signal_if_running(c, Signal::SIGTERM))
        .collect();
    wait_until_reaped(&mut running, grace);
    running.retain(|c| signal_if_running(c, Signal::SIGKILL));
    wait_until_reaped(&mut running, KILL_WAIT);
    for c in running {
        if let Some(child) = lock(c).as_ref() {
            eprintln!(
                "tandem-lab: process {} still not reaped {KILL_WAIT:?} after SIGKILL",
                child.id()
            );
        }
    }
}

/// Signals the process if it is still unreaped; true if it was signalled.
fn signal_if_running(child: &SharedChild, signal: Signal) -> bool {
    let mut guard = lock(child);
    let Some(child) = guard.as_mut() else {
        return false;
    };
    match child.try_wait() {
        Ok(None) => {
            let pid = Pid::from_raw(child.id() as i32);
            if let Err(e) = kill(pid, signal) {
                eprintln!("tandem-lab: sending {signal} to process {pid}: {e}");
            }
            true
        }
        Ok(Some(_)) => false,
        Err(e) => {
            eprintln!("tandem-lab: checking process {}: {e}", child.id());
            false
        }
    }
}

fn wait_until_reaped(running: &mut Vec<&SharedChild>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        running.retain(|c| {
            lock(c)
                .as_mut()
                .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
        });
        if running.is_empty() || Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
