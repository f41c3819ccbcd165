//! Passing signals down the chain of processes between the user and the
//! command, so `kill` on sidekey reaches the command.

use rustix::process::{Pid, Signal, kill_process};
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook::iterator::SignalsInfo;
use signal_hook::iterator::exfiltrator::WithOrigin;
use signal_hook::low_level::siginfo::Cause;

const FORWARDED: [i32; 6] = [SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2];

/// Stops forwarding when dropped.
#[derive(Debug)]
pub struct Forwarding(signal_hook::iterator::Handle);

impl Drop for Forwarding {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// The signals to forward, caught from now on and held until
/// [`Caught::forward_to`] names the child. Catching them only once the child
/// runs would let one that arrives in between end this process by default
/// and leave the child behind, unsignalled. (A caught signal's handler does
/// not survive the child's `exec`.)
pub struct Caught(SignalsInfo<WithOrigin>);

impl std::fmt::Debug for Caught {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Caught")
    }
}

pub fn catch() -> std::io::Result<Caught> {
    SignalsInfo::<WithOrigin>::new(FORWARDED).map(Caught)
}

impl Caught {
    /// Forwards the signals that ask a program to stop or reconfigure to
    /// `child`, from a background thread, instead of acting on them here;
    /// those caught before go first.
    ///
    /// Signals the kernel raised are not forwarded: a terminal's ^C already
    /// reaches the whole foreground process group, the command included, and a
    /// second copy would interrupt it twice.
    pub fn forward_to(self, child: u32) -> std::io::Result<Forwarding> {
        forward(self.0, child)
    }

    /// As [`Caught::forward_to`], on this thread, until `child` exits; its
    /// exit status. For a process that cannot start a thread: one that
    /// entered a new PID namespace, where the kernel refuses `CLONE_THREAD`.
    pub fn forward_until_exit(
        mut self,
        child: &mut std::process::Child,
    ) -> std::io::Result<std::process::ExitStatus> {
        let pid = child_pid(child.id())?;
        // Wakes the wait below when the child ends. An exit before this
        // line is seen by the first `try_wait`.
        self.0.add_signal(SIGCHLD)?;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            for origin in self.0.wait() {
                if origin.signal != SIGCHLD
                    && !matches!(origin.cause, Cause::Kernel)
                    && let Some(signal) = Signal::from_named_raw(origin.signal)
                {
                    let _ = kill_process(pid, signal);
                }
            }
        }
    }
}

fn child_pid(child: u32) -> std::io::Result<Pid> {
    i32::try_from(child)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| std::io::Error::other("invalid child pid"))
}

fn forward(mut signals: SignalsInfo<WithOrigin>, child: u32) -> std::io::Result<Forwarding> {
    let handle = signals.handle();
    let pid = child_pid(child)?;
    std::thread::Builder::new()
        .name("forward-signals".into())
        .spawn(move || {
            for origin in signals.forever() {
                if matches!(origin.cause, Cause::Kernel) {
                    continue;
                }
                if let Some(signal) = Signal::from_named_raw(origin.signal) {
                    let _ = kill_process(pid, signal);
                }
            }
        })?;
    Ok(Forwarding(handle))
}
