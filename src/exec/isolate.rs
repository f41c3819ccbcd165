//! `sidekey exec --isolate`: the sandbox around the agent's command.
//!
//! sidekey itself runs many threads, and a process can enter a new user
//! namespace only while it has one, so the sandbox is made by a fresh
//! process (this module, `sidekey __isolate`):
//!
//! 1. it enters new user, mount, network and PID namespaces, mapping the
//!    caller's uid and gid to root inside;
//! 2. it brings up the namespace's loopback and listens on `127.0.0.1:PORT`
//!    there, then hands that listening socket to sidekey over a unix socket:
//!    sidekey accepts on it from outside, so the proxy is the one address
//!    the command can reach, and there is no route anywhere else;
//! 3. it lays an empty tmpfs over the state dir and `/dev/null` over each
//!    secret file, so they cannot be read from inside;
//! 4. it starts the supervisor ([`super::supervisor`]) as PID 1 of the new
//!    PID namespace, which mounts a `/proc` showing only the sandbox,
//!    drops every capability (so the mounts cannot be undone) and runs the
//!    command. When PID 1 exits the kernel kills everything left inside.
//!
//! Any step that fails ends `exec` with its cause; there is no fallback to
//! running without isolation.

use std::ffi::OsString;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use rustix::mount::{MountFlags, MountPropagationFlags};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use rustix::thread::UnshareFlags;

/// What `sidekey exec` asks of the sandbox.
#[derive(Debug)]
pub struct Sandbox {
    /// The unix socket on which sidekey waits for the listener.
    pub handoff: PathBuf,
    pub port: u16,
    /// Made unreadable inside: the state dir, secret files, `--hide` paths.
    pub hide: Vec<PathBuf>,
    pub command: Vec<OsString>,
}

const READY: &[u8] = b"ready";

/// Builds the sandbox and runs the command in it; returns the exit code.
pub fn run(sandbox: &Sandbox) -> u8 {
    let mut handoff = match UnixStream::connect(&sandbox.handoff) {
        Ok(stream) => stream,
        Err(e) => {
            eprintln!(
                "sidekey exec: cannot reach sidekey at {}: {e}",
                sandbox.handoff.display()
            );
            return 125;
        }
    };
    let listener = match enter(sandbox) {
        Ok(listener) => listener,
        Err(e) => {
            // sidekey prints the cause and exits; nothing ran.
            let _ = io::Write::write_all(&mut handoff, e.as_bytes());
            return 125;
        }
    };
    if let Err(e) = send_fd(&handoff, listener.as_fd()) {
        eprintln!("sidekey exec: cannot hand the listener to sidekey: {e}");
        return 125;
    }
    drop((listener, handoff));
    let caught = super::signals::catch();
    let supervisor = std::process::Command::new("/proc/self/exe")
        .arg("__supervise")
        .arg("--isolated")
        .arg("--")
        .args(&sandbox.command)
        .spawn();
    let mut supervisor = match supervisor {
        Ok(child) => child,
        Err(e) => {
            eprintln!("sidekey exec: cannot start the sandbox's first process: {e}");
            return 125;
        }
    };
    // This process entered a new PID namespace, so it cannot start a
    // thread: the signals are forwarded from here while it waits.
    let status = match caught {
        Ok(caught) => caught.forward_until_exit(&mut supervisor),
        Err(_) => supervisor.wait(),
    };
    match status {
        Ok(status) => super::exit_code_of(status),
        Err(e) => {
            eprintln!("sidekey exec: cannot wait for the sandbox: {e}");
            125
        }
    }
}

/// Steps 1 to 3; the error is the one line sidekey reports.
fn enter(sandbox: &Sandbox) -> Result<TcpListener, String> {
    let (uid, gid) = (rustix::process::getuid(), rustix::process::getgid());
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    unshare().map_err(|e| {
        format!(
            "--isolate: the kernel refused new user, mount, network and PID namespaces ({e}); \
             unprivileged user namespaces may be disabled (kernel.unprivileged_userns_clone, \
             user.max_user_namespaces, AppArmor's restrict_unprivileged_userns) or forbidden \
             in this container"
        )
    })?;
    // sidekey makes every process non-dumpable, and the kernel then gives
    // its /proc/self files to root: a user could not write its own maps.
    // This helper holds no secret (its environment is the command's).
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::Dumpable)
        .map_err(|e| format!("--isolate: cannot prepare the sandbox: {e}"))?;
    let write = |file: &str, text: String| {
        std::fs::write(file, text).map_err(|e| format!("--isolate: cannot write {file}: {e}"))
    };
    write("/proc/self/setgroups", "deny".into())?;
    write("/proc/self/uid_map", format!("0 {} 1\n", uid.as_raw()))?;
    write("/proc/self/gid_map", format!("0 {} 1\n", gid.as_raw()))?;
    bring_up_loopback()
        .map_err(|e| format!("--isolate: cannot bring up the sandbox's loopback: {e}"))?;
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, sandbox.port)))
        .map_err(|e| format!("--isolate: cannot listen inside the sandbox: {e}"))?;
    // Mounts made from here on stay inside the sandbox.
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )
    .map_err(|e| format!("--isolate: cannot make the sandbox's mounts private: {e}"))?;
    for path in &sandbox.hide {
        hide(path).map_err(|e| format!("--isolate: cannot hide {}: {e}", path.display()))?;
    }
    Ok(listener)
}

#[allow(unsafe_code, reason = "unshare(2); see the safety comment")]
fn unshare() -> io::Result<()> {
    let flags =
        UnshareFlags::NEWUSER | UnshareFlags::NEWNS | UnshareFlags::NEWNET | UnshareFlags::NEWPID;
    // SAFETY: rustix marks unshare unsafe because CLONE_FILES would let
    // threads see different descriptor tables; FILES is not among these
    // flags, and this process has a single thread (the kernel refuses
    // NEWUSER otherwise).
    unsafe { rustix::thread::unshare_unsafe(flags) }?;
    Ok(())
}

/// An empty tmpfs over a directory, `/dev/null` over a file; a path that
/// does not exist has nothing to hide.
fn hide(path: &Path) -> io::Result<()> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(rustix::mount::mount(
            "tmpfs",
            path,
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            Some(c"mode=0700,size=64k"),
        )?),
        Ok(_) => Ok(rustix::mount::mount_bind("/dev/null", path)?),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// `ip link set lo up`, as one rtnetlink request: a new network namespace
/// has only a loopback, and it starts down.
fn bring_up_loopback() -> io::Result<()> {
    use rustix::net::netlink::SocketAddrNetlink;
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    // From <linux/rtnetlink.h>, <linux/netlink.h> and <linux/if.h>.
    const RTM_NEWLINK: u16 = 16;
    const NLMSG_ERROR: u16 = 2;
    const NLM_F_REQUEST_ACK: u16 = 0x1 | 0x4;
    const IFF_UP: u32 = 0x1;
    // The loopback is interface 1 in every network namespace.
    const LOOPBACK_INDEX: i32 = 1;

    let socket = rustix::net::socket_with(
        AddressFamily::NETLINK,
        SocketType::RAW,
        SocketFlags::CLOEXEC,
        // Protocol 0 is NETLINK_ROUTE.
        None,
    )?;
    let mut request = Vec::with_capacity(32);
    // struct nlmsghdr: length, type, flags, sequence, port id.
    request.extend_from_slice(&32u32.to_ne_bytes());
    request.extend_from_slice(&RTM_NEWLINK.to_ne_bytes());
    request.extend_from_slice(&NLM_F_REQUEST_ACK.to_ne_bytes());
    request.extend_from_slice(&1u32.to_ne_bytes());
    request.extend_from_slice(&0u32.to_ne_bytes());
    // struct ifinfomsg: family, padding, type, index, flags, change mask.
    request.extend_from_slice(&[0, 0]);
    request.extend_from_slice(&0u16.to_ne_bytes());
    request.extend_from_slice(&LOOPBACK_INDEX.to_ne_bytes());
    request.extend_from_slice(&IFF_UP.to_ne_bytes());
    request.extend_from_slice(&IFF_UP.to_ne_bytes());
    rustix::net::sendto(
        &socket,
        &request,
        SendFlags::empty(),
        &SocketAddrNetlink::new(0, 0),
    )?;
    let mut reply = [0u8; 256];
    let (received, _) = rustix::net::recv(&socket, &mut reply[..], RecvFlags::empty())?;
    // The acknowledgement is an NLMSG_ERROR whose error number is 0.
    let field = |range: std::ops::Range<usize>| reply.get(range).filter(|_| received >= 20);
    let kind = field(4..6).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    let errno = field(16..20).map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    match (kind, errno) {
        (Some(NLMSG_ERROR), Some(0)) => Ok(()),
        (Some(NLMSG_ERROR), Some(e)) => Err(io::Error::from_raw_os_error(-e)),
        _ => Err(io::Error::other("unexpected netlink reply")),
    }
}

fn send_fd(stream: &UnixStream, fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    let fds = [fd];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    control.push(SendAncillaryMessage::ScmRights(&fds));
    rustix::net::sendmsg(
        stream,
        &[IoSlice::new(READY)],
        &mut control,
        SendFlags::empty(),
    )?;
    Ok(())
}

/// sidekey's side of the handoff: the listening socket made inside the
/// sandbox, or the sandbox's one-line reason for failing.
pub fn receive_listener(stream: &UnixStream) -> Result<TcpListener, String> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut data = [0u8; 1024];
    let received = rustix::net::recvmsg(
        stream,
        &mut [IoSliceMut::new(&mut data)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| format!("--isolate: no answer from the sandbox: {e}"))?;
    let mut fd: Option<OwnedFd> = None;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = message {
            for received_fd in fds {
                fd.get_or_insert(received_fd);
            }
        }
    }
    let text = &data[..received.bytes.min(data.len())];
    match fd {
        Some(fd) if text == READY => Ok(TcpListener::from(fd)),
        _ if text.is_empty() => Err("--isolate: the sandbox ended before it was ready".into()),
        _ => Err(String::from_utf8_lossy(text).into_owned()),
    }
}
