//! `source = "exec:COMMAND ARGS"`: a credential process, like AWS's
//! `credential_process` or `gh auth token`.
//!
//! SECURITY: the process gets no stdin, a minimal environment (no agent
//! ever reaches it: it runs only when sidekey loads secrets), and a
//! deadline; a non-zero exit, a timeout or empty output fail closed.

use std::collections::BTreeSet;
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use zeroize::Zeroizing;

use crate::secret::Secret;

/// How long a credential process may run.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// Its output is a token, not a file.
const MAX_OUTPUT: u64 = 64 * 1024;

/// The process groups of the credential processes running now. The thread
/// that would kill one at its deadline does not outlive a stop, so a stop
/// ends them itself ([`end_all`]) rather than leave them behind.
static RUNNING: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

fn running() -> std::sync::MutexGuard<'static, BTreeSet<u32>> {
    RUNNING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A process group in [`RUNNING`] until dropped.
struct Registered(u32);

impl Registered {
    fn new(pgid: u32) -> Self {
        running().insert(pgid);
        Self(pgid)
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        running().remove(&self.0);
    }
}

/// Kills every credential process still running: sidekey is stopping, and
/// what a reload or renewal would get from them is no longer wanted.
pub fn end_all() {
    for pgid in std::mem::take(&mut *running()) {
        kill_group(pgid);
    }
}

/// Splits `COMMAND ARGS` on whitespace, honouring double quotes.
pub fn parse_command(text: &str) -> Result<Vec<String>, String> {
    let mut args = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut started = false;
    for c in text.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                started = true;
            }
            c if c.is_whitespace() && !quoted => {
                if started {
                    args.push(std::mem::take(&mut current));
                    started = false;
                }
            }
            c => {
                current.push(c);
                started = true;
            }
        }
    }
    if quoted {
        return Err("unbalanced quote in exec: command".into());
    }
    if started {
        args.push(current);
    }
    if args.is_empty() {
        return Err("exec: needs a command".into());
    }
    Ok(args)
}

/// Runs the process; returns the value and when it expires, if it said.
pub fn run(args: &[String]) -> Result<(Secret, Option<SystemTime>), String> {
    use std::os::unix::process::CommandExt;
    let program = &args[0];
    let mut child = Command::new(program)
        .args(&args[1..])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", std::env::var_os("HOME").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        // Its own process group, so a timeout ends whatever it started too.
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run {program}: {}", crate::config::describe_io(&e)))?;
    let _registered = Registered::new(child.id());
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let (sender, output) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Zeroizing::new(Vec::new());
        let _ = (&mut stdout).take(MAX_OUTPUT).read_to_end(&mut out);
        let _ = sender.send(out);
    });
    let deadline = Instant::now() + TIMEOUT;
    let give_up = |child: &mut std::process::Child| {
        kill_group(child.id());
        let _ = child.kill();
        let _ = child.wait();
        format!("{program} did not finish within {TIMEOUT:?}")
    };
    // The output is complete when every holder of the pipe has closed it,
    // which a background process it left behind may never do.
    let out = match output.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok(out) => out,
        Err(_) => return Err(give_up(&mut child)),
    };
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => return Err(give_up(&mut child)),
            Err(e) => return Err(format!("{program}: {e}")),
        }
    };
    if !status.success() {
        return Err(format!("{program} exited with {status}"));
    }
    parse_output(&out).map_err(|e| format!("{program}: {e}"))
}

/// Kills a process group without `unsafe`: through kill(1).
fn kill_group(pgid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A bare value, or `{"value": "...", "expires_at": "RFC 3339"}`.
fn parse_output(out: &[u8]) -> Result<(Secret, Option<SystemTime>), String> {
    let text = std::str::from_utf8(out).map_err(|_| "output is not UTF-8")?;
    let text = text.trim();
    if text.starts_with('{') {
        #[derive(serde::Deserialize)]
        struct Output {
            value: String,
            expires_at: Option<String>,
        }
        let parsed: Output =
            serde_json::from_str(text).map_err(|_| "output is JSON without a string \"value\"")?;
        let value = Zeroizing::new(parsed.value);
        let expires = match parsed.expires_at {
            Some(at) => Some(parse_expiry(&at)?),
            None => None,
        };
        if value.is_empty() {
            return Err("the value is empty".into());
        }
        return Ok((Secret::new(value.to_string()), expires));
    }
    if text.is_empty() {
        return Err("no output".into());
    }
    Ok((Secret::new(text.to_string()), None))
}

/// RFC 3339 with any offset (`Z`, `+01:00`, `-05:00`), as credential
/// processes print it; the offset is applied, never dropped.
fn parse_expiry(at: &str) -> Result<SystemTime, String> {
    use time::format_description::well_known::Rfc3339;
    time::OffsetDateTime::parse(at, &Rfc3339)
        .map(SystemTime::from)
        .map_err(|_| format!("expires_at {at:?} is not RFC 3339"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_offsets_are_applied() {
        let utc = parse_expiry("2026-12-08T04:37:08.5Z").unwrap();
        for same in [
            "2026-12-08T05:37:08.5+01:00",
            "2026-12-07T23:37:08.5-05:00",
            "2026-12-08t04:37:08.5z",
            "2026-12-08T04:37:08.500+00:00",
        ] {
            assert_eq!(parse_expiry(same).unwrap(), utc, "{same}");
        }
        for bad in ["2026-12-08", "2026-12-08T04:37:08", "tomorrow", ""] {
            assert!(parse_expiry(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_commands() {
        assert_eq!(
            parse_command("gh auth token").unwrap(),
            vec!["gh", "auth", "token"]
        );
        assert_eq!(
            parse_command(r#"sh -c "echo a b""#).unwrap(),
            vec!["sh", "-c", "echo a b"]
        );
        assert!(parse_command("  ").is_err());
        assert!(parse_command("a \"b").is_err());
    }

    #[test]
    fn runs_and_fails_closed() {
        let (secret, expiry) = run(&["sh".into(), "-c".into(), "echo tok-1".into()]).unwrap();
        assert_eq!(secret.expose(), "tok-1");
        assert!(expiry.is_none());
        let json = r#"echo '{"value":"tok-2","expires_at":"2099-01-01T00:00:00Z"}'"#;
        let (secret, expiry) = run(&["sh".into(), "-c".into(), json.into()]).unwrap();
        assert_eq!(secret.expose(), "tok-2");
        assert!(expiry.is_some());
        assert!(run(&["sh".into(), "-c".into(), "exit 3".into()]).is_err());
        assert!(run(&["sh".into(), "-c".into(), "true".into()]).is_err());
        assert!(run(&["/nonexistent/cred".into()]).is_err());
    }

    #[test]
    fn a_process_that_leaves_a_child_holding_stdout_times_out() {
        let started = Instant::now();
        let result = run(&["sh".into(), "-c".into(), "sleep 60 & echo tok".into()]);
        assert!(
            result.is_err(),
            "a background holder of stdout must not hang the load"
        );
        assert!(started.elapsed() < TIMEOUT + Duration::from_secs(5));
    }
}
