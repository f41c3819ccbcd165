//! Passing signals down the chain of processes between the user and the
//! command, so `kill` on sidekey reaches the command.

use rustix::process::{Pid, Signal, kill_process};
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};
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

/// Forwards the signals that ask a program to stop or reconfigure to
/// `child`, from a background thread, instead of acting on them here.
///
/// Signals the kernel raised are not forwarded: a terminal's ^C already
/// reaches the whole foreground process group, the command included, and a
/// second copy would interrupt it twice.
pub fn forward_to(child: u32) -> std::io::Result<Forwarding> {
    let mut signals = SignalsInfo::<WithOrigin>::new(FORWARDED)?;
    let handle = signals.handle();
    let pid = i32::try_from(child)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| std::io::Error::other("invalid child pid"))?;
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
