//! The process that starts the agent's command for `sidekey exec` and stays
//! its parent: it drops every capability and way to gain privileges before
//! the command starts (so not even an agent run as root can read sidekey's
//! memory), forwards signals, reaps orphans, and kills whatever the command
//! left behind when it exits.

use std::ffi::OsString;
use std::io;

use rustix::io::Errno;
use rustix::process::{Pid, Signal, WaitOptions, getpid, kill_process, wait};
use rustix::thread::{CapabilitySet, CapabilitySets};

/// Exit codes of the shell convention for a command that could not start.
const NOT_EXECUTABLE: u8 = 126;
const NOT_FOUND: u8 = 127;

/// Runs `command` to its end and returns the exit code to pass on. In an
/// isolated sandbox this process is PID 1 of the command's PID namespace.
pub fn run(command: &[OsString], isolated: bool) -> u8 {
    match supervise(command, isolated) {
        Ok(code) => code,
        Err(Failure(code, message)) => {
            eprintln!("sidekey exec: {message}");
            code
        }
    }
}

struct Failure(u8, String);

fn supervise(command: &[OsString], isolated: bool) -> Result<u8, Failure> {
    let setup = |what: &str, e: io::Error| Failure(NOT_EXECUTABLE, format!("{what}: {e}"));
    let Some((program, args)) = command.split_first() else {
        return Err(Failure(NOT_EXECUTABLE, "no command given".into()));
    };
    // If sidekey dies, so does the command: in a sandbox the kernel then
    // kills every process in it; outside, the command is asked to stop.
    let on_parent_death = if isolated { Signal::KILL } else { Signal::TERM };
    rustix::process::set_parent_process_death_signal(Some(on_parent_death))
        .map_err(|e| setup("cannot watch the parent", e.into()))?;
    if isolated {
        // A /proc of the new PID namespace: the command sees only its own
        // processes, not sidekey's nor the shell's.
        rustix::mount::mount(
            "proc",
            "/proc",
            "proc",
            rustix::mount::MountFlags::NOSUID
                | rustix::mount::MountFlags::NODEV
                | rustix::mount::MountFlags::NOEXEC,
            None,
        )
        .map_err(|e| setup("cannot mount /proc in the sandbox", e.into()))?;
    } else {
        // Orphans of the command come here, to be reaped and, at the end, killed.
        rustix::process::set_child_subreaper(Some(getpid()))
            .map_err(|e| setup("cannot become the subreaper", e.into()))?;
    }
    drop_privileges().map_err(|e| setup("cannot drop privileges", e))?;

    let caught = super::signals::catch();
    let child = std::process::Command::new(program)
        .args(args)
        .spawn()
        .map_err(|e| {
            let name = program.to_string_lossy();
            match e.kind() {
                io::ErrorKind::NotFound => Failure(NOT_FOUND, format!("{name}: command not found")),
                _ => Failure(NOT_EXECUTABLE, format!("{name}: {e}")),
            }
        })?;
    let forwarding = caught.and_then(|caught| caught.forward_to(child.id()));
    let pid = i32::try_from(child.id()).ok().and_then(Pid::from_raw);
    let code = loop {
        match wait(WaitOptions::empty()) {
            Ok(Some((reaped, status))) if Some(reaped) == pid => {
                break super::exit_code_of(std::os::unix::process::ExitStatusExt::from_raw(
                    status.as_raw(),
                ));
            }
            // An orphan that was reparented here.
            Ok(_) | Err(Errno::INTR) => continue,
            Err(e) => return Err(setup("cannot wait for the command", e.into())),
        }
    };
    drop(forwarding);
    if !isolated {
        kill_leftovers();
    }
    Ok(code)
}

/// Leaves the command no capability and no way to regain one: the bounding
/// set emptied (root's exec would refill the permitted set from it), the
/// ambient set cleared, and no_new_privs against set-uid programs and file
/// capabilities. Without CAP_SYS_PTRACE and with sidekey non-dumpable, the
/// command cannot read sidekey's memory or environment, even as root.
fn drop_privileges() -> io::Result<()> {
    let current = rustix::thread::capabilities(None)?;
    if current.effective.contains(CapabilitySet::SETPCAP) {
        for bit in 0..64 {
            match rustix::thread::remove_capability_from_bounding_set(
                CapabilitySet::from_bits_retain(1 << bit),
            ) {
                Ok(()) => {}
                // Past the last capability this kernel knows.
                Err(Errno::INVAL) => break,
                Err(e) => return Err(e.into()),
            }
        }
    }
    match rustix::thread::clear_ambient_capability_set() {
        // Kernels before 4.3 have no ambient set.
        Ok(()) | Err(Errno::INVAL) => {}
        Err(e) => return Err(e.into()),
    }
    rustix::thread::set_capabilities(
        None,
        CapabilitySets {
            effective: CapabilitySet::empty(),
            permitted: CapabilitySet::empty(),
            inheritable: CapabilitySet::empty(),
        },
    )?;
    rustix::thread::set_no_new_privs(true)?;
    Ok(())
}

/// Kills every process the command left running. They were reparented to
/// this subreaper, and each one killed hands its own children here, so the
/// sweep repeats until no child is left.
fn kill_leftovers() {
    let me = getpid();
    for _ in 0..64 {
        let children = children_of(me);
        if children.is_empty() {
            break;
        }
        for pid in &children {
            let _ = kill_process(*pid, Signal::KILL);
        }
        for _ in &children {
            if let Err(Errno::CHILD) = wait(WaitOptions::empty()) {
                break;
            }
        }
    }
    while let Ok(Some(_)) = wait(WaitOptions::NOHANG) {}
}

/// Processes whose parent is `parent`, from `/proc/PID/stat`.
fn children_of(parent: Pid) -> Vec<Pid> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let name = entry.ok()?.file_name();
            let pid: i32 = name.to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // `pid (comm) state ppid …`: comm may hold spaces and parentheses.
            let after_comm = &stat[stat.rfind(')')? + 1..];
            let ppid: i32 = after_comm.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == parent.as_raw_nonzero().get())
                .then(|| Pid::from_raw(pid))
                .flatten()
        })
        .collect()
}
