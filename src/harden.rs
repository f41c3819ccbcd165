//! Process-wide protections, applied first thing in every mode: the secrets
//! sidekey holds must not be readable by another process of the same user
//! (an agent it started, say) or land in a core file.

use std::io;

use rustix::process::{DumpableBehavior, Resource, Rlimit};

/// Marks the process non-dumpable, which makes the kernel refuse
/// `/proc/PID/mem`, `/proc/PID/environ` and ptrace to anyone without
/// CAP_SYS_PTRACE, and sets the core-file limit to zero.
pub fn harden_process() -> io::Result<()> {
    rustix::process::set_dumpable_behavior(DumpableBehavior::NotDumpable)?;
    rustix::process::setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )?;
    Ok(())
}
