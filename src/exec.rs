//! `sidekey exec`: run an agent's command with no secret, through a proxy
//! started for it (SPEC §8). The command line side is `cli::exec`; this
//! module owns the processes around the command.
//!
//! Without `--isolate`: sidekey → supervisor → command. With it: sidekey →
//! sandbox builder (outside the new PID namespace) → supervisor (PID 1
//! inside) → command.

pub mod env;
pub mod isolate;
pub mod signals;
pub mod supervisor;

/// The shell's view of a child's status: its code, or 128 + the signal.
pub fn exit_code_of(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(1),
        (None, Some(signal)) => u8::try_from(128 + (signal & 0x7f)).unwrap_or(1),
        (None, None) => 1,
    }
}
