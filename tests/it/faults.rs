//! Faults: hostile or failing upstreams, secret sources and audit sinks
//! that go away, configs deleted under a reload, `kill -9` in the middle of
//! writing the store or the revocation list, and a restart under open
//! tunnels. sidekey fails closed, frees what it held, and loses nothing it
//! reported written.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::*;

const SECRET: &str = "sk-fault-secret-19c0e6a7f2";

/// An upstream that misbehaves by path: `/reset` sends half a body (with
/// the credential it got) and hangs up, `/garbage` answers with bytes that
/// are not HTTP, `/stall` never answers and counts the connections sidekey
/// closes on it.
struct HostileUpstream {
    addr: SocketAddr,
    stalls_closed: Arc<AtomicUsize>,
    paths: Arc<Mutex<Vec<String>>>,
}

impl HostileUpstream {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stalls_closed = Arc::new(AtomicUsize::new(0));
        let paths = Arc::new(Mutex::new(Vec::new()));
        {
            let (stalls_closed, paths) = (stalls_closed.clone(), paths.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let (stalls_closed, paths) = (stalls_closed.clone(), paths.clone());
                    std::thread::spawn(move || misbehave(stream, &stalls_closed, &paths));
                }
            });
        }
        Self {
            addr,
            stalls_closed,
            paths,
        }
    }
}

fn misbehave(mut stream: TcpStream, stalls_closed: &AtomicUsize, paths: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        head.push(line);
    }
    let Some(path) = head.first().and_then(|l| l.split_whitespace().nth(1)) else {
        return;
    };
    paths.lock().unwrap().push(path.to_string());
    let auth = head
        .iter()
        .find_map(|l| l.strip_prefix("authorization: "))
        .unwrap_or_default()
        .trim()
        .to_string();
    if path.ends_with("/reset") {
        let _ = stream.write_all(
            format!("HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\nhalf a body, and {auth}")
                .as_bytes(),
        );
        // Dropped: the connection closes 99,9xx bytes short.
    } else if path.ends_with("/garbage") {
        let _ = stream.write_all(format!("SSH-2.0-not-http {auth}\r\n\r\n").as_bytes());
    } else if path.ends_with("/stall") {
        let mut sink = [0u8; 64];
        let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
        while let Ok(n) = stream.read(&mut sink) {
            if n == 0 {
                break;
            }
        }
        stalls_closed.fetch_add(1, Ordering::SeqCst);
    }
}

fn hostile_env(hostile: &HostileUpstream, extra: &str) -> TestEnv {
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let env = TestEnv::new(&format!(
        r#"
[limits]
upstream_timeout = "1s"
max_connections = 4

[secrets.api]
source = "store"

[routes.bad]
upstream = "http://{hostile}"
allow_private = true
inject = {{ header = "authorization", format = "Bearer {{secret}}", secret = "api" }}

[routes.down]
upstream = "http://{closed}"
allow_private = true
inject = {{ header = "authorization", format = "Bearer {{secret}}", secret = "api" }}

[[rules]]
agents = ["coder"]
route = "bad"
action = "allow"

[[rules]]
agents = ["coder"]
route = "down"
action = "allow"
{extra}
"#,
        hostile = hostile.addr,
    ));
    env.set_secret("api", SECRET);
    env
}

fn code_of(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("x-sidekey-error: "))
        .map(|c| c.trim().to_string())
}

#[test]
fn failing_upstreams_get_clear_errors_and_free_their_connections() {
    let hostile = HostileUpstream::start();
    let env = hostile_env(&hostile, "");
    let token = env.token("coder");
    let sidekey = env.spawn();
    let auth = format!("authorization: Bearer {token}");

    for (path, status, code) in [
        ("/down/x", 502, "upstream_unreachable"),
        ("/bad/garbage", 502, "upstream_unreachable"),
    ] {
        let (got, text) = curl(&[&sidekey.url(path), "-H", &auth]);
        assert_eq!(got, status, "{path}: {text}");
        assert_eq!(code_of(&text).as_deref(), Some(code), "{path}");
        assert_no_leak(&text, SECRET, path);
    }

    // Half a body then a hang-up: the head was already on its way, so the
    // agent sees its transfer cut short (curl exit 18), promptly, and
    // the half it got is scrubbed.
    let started = Instant::now();
    let out = Command::new("curl")
        .args(["--noproxy", "*", "-sS", "-i", "--max-time", "20"])
        .arg(sidekey.url("/bad/reset"))
        .args(["-H", &auth])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(18), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the cut was not passed on"
    );
    assert!(text.contains("half a body"), "{text}");
    assert_no_leak(&text, SECRET, "a cut-short body");

    // A stalled upstream: 504 after upstream_timeout, and both connections
    // are let go. Twice the connection cap in a row, so a leaked slot
    // would show as 503 too_many_connections.
    for round in 0..8 {
        let (got, text) = curl(&[&sidekey.url("/bad/stall"), "-H", &auth]);
        assert_eq!(got, 504, "round {round}: {text}");
        assert_eq!(code_of(&text).as_deref(), Some("upstream_timeout"));
    }
    eventually(Duration::from_secs(10), || {
        (hostile.stalls_closed.load(Ordering::SeqCst) == 8).then_some(())
    });
    let audited: Vec<_> = env
        .audit()
        .into_iter()
        .filter(|r| r["route"] == "bad" || r["route"] == "down")
        .map(|r| r["status"].as_u64().unwrap_or_default())
        .collect();
    assert_eq!(
        audited.iter().filter(|&&s| s == 504).count(),
        8,
        "{audited:?}"
    );
    assert!(audited.contains(&502) && audited.contains(&200));
    assert!(hostile.paths.lock().unwrap().len() >= 10);
    assert_no_leak(&env.audit_text(), SECRET, "the audit log");
}

#[test]
fn a_secret_file_that_disappears_fails_closed_until_it_returns() {
    let upstream = Upstream::http();
    let env = TestEnv::new(&echo_route(&upstream, "file:api-key.txt"));
    let file = env.dir.path().join("api-key.txt");
    std::fs::write(&file, SECRET).unwrap();
    let token = env.token("coder");
    let sidekey = env.spawn();
    let get = || {
        curl(&[
            &sidekey.url("/echo/x"),
            "-H",
            &format!("authorization: Bearer {token}"),
        ])
    };
    assert_eq!(get().0, 200);

    std::fs::remove_file(&file).unwrap();
    let (status, text) = eventually(Duration::from_secs(5), || {
        let got = get();
        (got.0 == 503).then_some(got)
    });
    assert_eq!(
        code_of(&text).as_deref(),
        Some("secret_unavailable"),
        "{status}"
    );
    let seen = upstream.count();
    assert_eq!(get().0, 503);
    assert_eq!(
        upstream.count(),
        seen,
        "nothing reaches the upstream without the secret"
    );

    std::fs::write(&file, SECRET).unwrap();
    eventually(Duration::from_secs(5), || (get().0 == 200).then_some(()));
}

#[test]
fn an_unwritable_audit_log_refuses_requests_or_is_skipped_as_configured() {
    let upstream = Upstream::http();
    for (on_failure, expect) in [("deny", 503), ("continue", 200)] {
        let env = TestEnv::new(&format!(
            "[audit]\nfile = \"audit-is-a-directory\"\non_failure = \"{on_failure}\"\n{}",
            echo_route(&upstream, "store")
        ));
        std::fs::create_dir_all(env.state.join("audit-is-a-directory")).unwrap();
        env.set_secret("api", SECRET);
        let token = env.token("coder");
        let sidekey = env.spawn();
        for _ in 0..2 {
            let (status, text) = curl(&[
                &sidekey.url("/echo/x"),
                "-H",
                &format!("authorization: Bearer {token}"),
            ]);
            assert_eq!(status, expect, "on_failure = {on_failure}: {text}");
            assert_no_leak(&text, SECRET, "the response");
            if expect == 503 {
                assert_eq!(code_of(&text).as_deref(), Some("audit_unavailable"));
            }
        }
    }
}

/// logrotate renames the log (then compresses or deletes it), or copies
/// it and truncates it in place. Either way the records that follow land
/// whole in the file at the configured path, where `audit tail` reads
/// them, and `audit tail -f` follows them across.
#[test]
fn a_rotated_audit_log_goes_on_at_its_path_and_tail_follows_it() {
    let upstream = Upstream::http();
    let env = TestEnv::new(&echo_route(&upstream, "store"));
    env.set_secret("api", SECRET);
    let token = env.token("coder");
    let sidekey = env.spawn();
    let get = |path: &str| {
        let (status, text) = curl(&[
            &sidekey.url(path),
            "-H",
            &format!("authorization: Bearer {token}"),
        ]);
        assert_eq!(status, 200, "{text}");
    };
    let log = env.state.join("audit.jsonl");
    let text_of = |file: &std::path::Path| std::fs::read_to_string(file).unwrap_or_default();
    // Before the first request: no records, and no error.
    let empty = env.run(&["audit", "tail"], None);
    assert!(empty.status.success(), "{empty:?}");
    assert!(empty.stdout.is_empty());
    assert!(String::from_utf8_lossy(&empty.stderr).contains("no audit records yet"));
    /// Stopped however the test ends.
    struct Follower(std::process::Child);
    impl Drop for Follower {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut follower = Follower(
        env.cmd(&["audit", "tail", "-f", "-n", "5"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (shown, followed) = std::sync::mpsc::channel();
    let stdout = follower.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = shown.send(line);
        }
    });
    let expect_shown = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match followed.recv_timeout(left) {
                Ok(line) if line.contains(what) => return,
                Ok(line) => seen.push(line),
                Err(_) => panic!("audit tail -f never showed {what}: {seen:#?}"),
            }
        }
    };
    // Followed from before the log exists, as `tail -F` does.
    std::thread::sleep(Duration::from_millis(300));
    get("/echo/before-rotation");
    expect_shown("/before-rotation");

    // Renamed, and again with the file missing for a while.
    let rotated = env.state.join("audit.jsonl.1");
    std::fs::rename(&log, &rotated).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    get("/echo/after-rename");
    assert!(text_of(&log).contains("/after-rename"), "{}", text_of(&log));
    assert!(!text_of(&rotated).contains("/after-rename"));
    assert!(!text_of(&log).contains("/before-rotation"));
    expect_shown("/after-rename");

    // Removed outright.
    std::fs::remove_file(&log).unwrap();
    get("/echo/after-removal");
    assert!(
        text_of(&log).contains("/after-removal"),
        "{}",
        text_of(&log)
    );
    expect_shown("/after-removal");

    // Copied and truncated in place.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(0)
        .unwrap();
    get("/echo/after-truncation");
    let records = env.audit();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["path"], "/after-truncation");
    expect_shown("/after-truncation");

    let shown_once = env.ok(&["audit", "tail", "-n", "1"], None);
    assert!(shown_once.contains("/after-truncation"), "{shown_once}");
    drop(follower);

    // A damaged line (bytes that are not UTF-8) is shown as unreadable;
    // the records around it still are.
    let mut damaged = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    damaged.write_all(b"\xff\xfe\x1b[2J\n").unwrap();
    get("/echo/after-damage");
    let shown = env.ok(&["audit", "tail", "-n", "3"], None);
    assert!(
        shown.contains("/after-truncation")
            && shown.contains("(unreadable record)")
            && shown.contains("/after-damage")
            && !shown.contains('\x1b'),
        "{shown}"
    );
    // What is not a file is refused rather than read without end.
    std::fs::remove_file(&log).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &log).unwrap();
    let refused = env.run(&["audit", "tail"], None);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("not a regular file"), "{stderr}");
}

/// Records sent to a stdout that was closed (so `/dev/null`) are lost:
/// sidekey says so when it starts, rather than discard them silently.
#[test]
fn audit_records_to_a_closed_stdout_are_warned_about() {
    let upstream = Upstream::http();
    let env = TestEnv::new(&format!(
        "[audit]\nfile = \"-\"\n{}",
        echo_route(&upstream, "store")
    ));
    env.set_secret("api", SECRET);
    let sidekey = env.spawn_wrapped(&["sh", "-c", "exec \"$0\" \"$@\" >&-"], "127.0.0.1:0", &[]);
    let stderr = sidekey.stderr();
    assert!(
        stderr.contains("stdout is /dev/null (or was closed)"),
        "{stderr}"
    );
}

#[test]
fn a_config_deleted_or_garbled_under_reload_leaves_the_old_one_serving() {
    let upstream = Upstream::http();
    let env = TestEnv::new(&echo_route(&upstream, "store"));
    env.set_secret("api", SECRET);
    let token = env.token("coder");
    let sidekey = env.spawn();
    let get = || {
        curl(&[
            &sidekey.url("/echo/x"),
            "-H",
            &format!("authorization: Bearer {token}"),
        ])
        .0
    };
    let original = std::fs::read(&env.config).unwrap();

    std::fs::remove_file(&env.config).unwrap();
    sidekey.signal("HUP");
    eventually(Duration::from_secs(5), || {
        sidekey.stderr().contains("reload refused").then_some(())
    });
    assert_eq!(get(), 200);

    std::fs::write(&env.config, b"\xff\xfe\x00garbage [[[\n").unwrap();
    let out = env.run(&["reload"], None);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(get(), 200);

    // Truncated halfway, as an editor crash might leave it.
    std::fs::write(&env.config, &original[..original.len() / 2]).unwrap();
    sidekey.signal("HUP");
    assert_eq!(get(), 200);
    assert!(!sidekey.stderr().contains("panicked"));
}

/// Starts `sidekey ARGS` with `stdin`, kills it with SIGKILL after `delay`,
/// and says whether it had already finished successfully.
fn run_and_kill(env: &TestEnv, args: &[&str], stdin: &[u8], delay: Duration) -> bool {
    let mut child = env
        .cmd(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let _ = input.write_all(stdin);
    drop(input);
    let deadline = Instant::now() + delay;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return status.success();
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let _ = child.kill();
    child.wait().unwrap().success()
}

#[test]
fn kill_9_during_secret_set_and_token_revoke_leaves_old_or_new_never_torn() {
    let upstream = Upstream::http();
    let env = TestEnv::new(&echo_route(&upstream, "store"));
    env.set_secret("api", "initial-value-0");
    // Every value `secret set` was given, in order, and the index of the
    // last one it reported stored.
    let mut attempted = Vec::new();
    let mut last_reported = 0;
    let mut revoked = Vec::new();
    // Spread the kills from the start to past the end of a whole run.
    let timed = |args: &[&str], stdin: Option<&str>| {
        let started = Instant::now();
        env.ok(args, stdin);
        started.elapsed() * 3
    };
    let value_of = |round: u32| format!("rotated-value-{round}-{}", "x".repeat(16 * 1024));
    let set_run = timed(&["secret", "set", "api"], Some(&value_of(999)));
    attempted.push(value_of(999));
    let revoke_run = timed(&["token", "revoke", "--session", "timed"], None);
    const ROUNDS: u32 = 24;
    for round in 0..ROUNDS {
        let value = value_of(round);
        // The last round is left to finish, so at least one write is reported.
        let last = round == ROUNDS - 1;
        let delay = if last {
            Duration::from_secs(5)
        } else {
            set_run * round / ROUNDS
        };
        attempted.push(value.clone());
        if run_and_kill(&env, &["secret", "set", "api"], value.as_bytes(), delay) {
            last_reported = attempted.len() - 1;
        }
        let session = format!("killed-{round}");
        let delay = if last {
            Duration::from_secs(5)
        } else {
            revoke_run * round / ROUNDS
        };
        if run_and_kill(
            &env,
            &["token", "revoke", "--session", &session],
            b"",
            delay,
        ) {
            revoked.push(session);
        }
        // Whole after every kill: the store decrypts, the list parses.
        let listed = env.run(&["secret", "list", "--json"], None);
        assert!(
            listed.status.success(),
            "round {round}: the store is damaged: {}",
            String::from_utf8_lossy(&listed.stderr)
        );
        let status = env.run(&["status"], None).stdout;
        let status: serde_json::Value = serde_json::from_slice(&status).unwrap();
        assert_eq!(status["running"], false);
        for session in &revoked {
            assert!(
                status["revocations"]["sessions"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|v| v == session.as_str())),
                "round {round}: a reported revocation of {session} was lost"
            );
        }
    }
    assert!(
        last_reported > 0 && !revoked.is_empty(),
        "some writes completed: {} revokes in {revoke_run:?}, last set {last_reported} in {set_run:?}",
        revoked.len()
    );

    // The value the proxy uses is a whole one, and not older than the last
    // one `secret set` reported stored.
    let token = env.token("coder");
    let sidekey = env.spawn();
    let (status, _) = curl(&[
        &sidekey.url("/echo/x"),
        "-H",
        &format!("authorization: Bearer {token}"),
    ]);
    assert_eq!(status, 200);
    let used = upstream
        .last()
        .header("authorization")
        .unwrap_or_default()
        .to_string();
    let value = used.strip_prefix("Bearer ").unwrap_or_default();
    let index = attempted.iter().position(|a| a == value);
    assert!(
        index.is_some_and(|i| i >= last_reported),
        "the store holds a torn or lost value ({} bytes, index {index:?}, last reported {last_reported})",
        value.len()
    );
}

#[test]
fn a_restart_under_open_tunnels_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::https(dir.path());
    let env = tls_echo_env(&upstream, "store");
    env.set_secret("api", SECRET);
    let token = env.token("coder");
    let mut first = env.spawn();
    let addr = first.addr;
    let ca =
        reqwest::Certificate::from_pem(&std::fs::read(env.state.join("ca.crt")).unwrap()).unwrap();
    let client = reqwest::blocking::Client::builder()
        .proxy(reqwest::Proxy::all(format!("http://coder:{token}@{addr}")).unwrap())
        .add_root_certificate(ca)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let url = upstream.base().replace("127.0.0.1", "localhost") + "/tunnel";
    assert_eq!(client.get(&url).send().unwrap().status(), 200);
    // The tunnel stays open in the client's pool; sidekey restarts under it.
    first.signal("TERM");
    assert_eq!(first.wait_exit(Duration::from_secs(20)), Some(0));
    let _second = env.spawn_listening(&addr.to_string(), &[]);
    // The pooled tunnel is gone; the client's next request (at most one
    // retry) opens a new one, and the same token still works.
    let status = client
        .get(&url)
        .send()
        .or_else(|_| client.get(&url).send())
        .unwrap()
        .status();
    assert_eq!(status, 200);
    // Every audit line is whole, and both tunnels' requests are there.
    let records = env.audit();
    let tunnelled = records
        .iter()
        .filter(|r| r["mode"] == "intercept" && r["status"] == 200)
        .count();
    assert!(tunnelled >= 2, "{records:?}");
    assert_no_leak(&env.audit_text(), SECRET, "the audit log");
}

/// Eight clients in parallel, so records share batches; each sends up to
/// `requests` requests, stopping at the first that fails, and keeps the
/// request id of every answer sidekey released to it.
fn collect_request_ids(
    url: &str,
    token: &str,
    requests: usize,
    released: &Arc<Mutex<Vec<String>>>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..8)
        .map(|_| {
            let (url, token, released) = (url.to_string(), token.to_string(), released.clone());
            std::thread::spawn(move || {
                let client = client();
                for _ in 0..requests {
                    let Ok(res) = client.get(&url).bearer_auth(&token).send() else {
                        return;
                    };
                    assert_eq!(res.status(), 200);
                    let id = res.headers()["x-sidekey-request-id"].to_str().unwrap();
                    released.lock().unwrap().push(id.to_string());
                }
            })
        })
        .collect()
}

/// A named pipe that a thread holds open but reads only once told to,
/// standing for a log reader that stopped: what sidekey writes to it blocks
/// once the pipe is full. Telling the sender to go reads everything from
/// then on into the string.
struct HeldPipe {
    path: std::path::PathBuf,
    read_now: std::sync::mpsc::Sender<()>,
    read: Arc<Mutex<String>>,
    reader: std::thread::JoinHandle<()>,
}

impl HeldPipe {
    fn new(env: &TestEnv, name: &str) -> Self {
        let path = env.path(name);
        assert!(
            Command::new("mkfifo")
                .arg(&path)
                .status()
                .unwrap()
                .success()
        );
        let (read_now, go) = std::sync::mpsc::channel::<()>();
        let read = Arc::new(Mutex::new(String::new()));
        let reader = {
            let (path, read) = (path.clone(), read.clone());
            std::thread::spawn(move || {
                let pipe = std::fs::File::open(path).unwrap();
                if go.recv().is_err() {
                    return;
                }
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    let mut read = read.lock().unwrap();
                    read.push_str(&line);
                    read.push('\n');
                }
            })
        };
        Self {
            path,
            read_now,
            read,
            reader,
        }
    }

    /// `sh -c 'exec sidekey … >PIPE'` (or `2>PIPE` for `fd` 2).
    fn wrapper(&self, fd: u8) -> [String; 4] {
        let redirect = if fd == 2 { "2>" } else { ">" };
        [
            "sh".into(),
            "-c".into(),
            format!("exec \"$@\" {redirect}\"$0\""),
            self.path.to_str().unwrap().into(),
        ]
    }

    fn drain(&self) {
        self.read_now.send(()).unwrap();
    }

    fn text(&self) -> String {
        self.read.lock().unwrap().clone()
    }

    /// Everything read, once the writer has gone.
    fn finish(self) -> String {
        let _ = self.read_now.send(());
        self.reader.join().unwrap();
        self.read.lock().unwrap().clone()
    }
}

/// A config for `upstream` with audit records on stdout, and the
/// [`HeldPipe`] to put there.
fn held_audit_env(upstream: &Upstream) -> (TestEnv, HeldPipe) {
    let env = TestEnv::new(&format!(
        "[audit]\nfile = \"-\"\n{}",
        echo_route(upstream, "store")
    ));
    env.set_secret("api", SECRET);
    let records = HeldPipe::new(&env, "audit.fifo");
    (env, records)
}

/// sidekey in front of `upstream` with its audit records on stdout, a
/// [`HeldPipe`]; with an agent token for `coder`.
fn audit_to_held_pipe(upstream: &Upstream) -> (TestEnv, String, HeldPipe, Sidekey) {
    let (env, records) = held_audit_env(upstream);
    let token = env.token("coder");
    let sidekey = env.spawn_wrapped(
        &records.wrapper(1).each_ref().map(String::as_str),
        "127.0.0.1:0",
        &[],
    );
    (env, token, records, sidekey)
}

/// Records go to stdout, a pipe that nobody reads until the test says so:
/// a log shipper that stopped, say. Once the pipe is full the sink gives no
/// answer. A request must then be refused (deny) within the audit deadline
/// rather than hang, nothing more reach the upstream, and the admin socket
/// still answer; when the pipe drains, service resumes and the refused
/// request's record, queued meanwhile, is written too.
#[test]
fn a_stalled_audit_sink_refuses_requests_instead_of_hanging_them() {
    let upstream = Upstream::http();
    let (env, token, records, mut sidekey) = audit_to_held_pipe(&upstream);
    // Longer than the deadline: without one, this client gives up first.
    let patient = client_with_timeout(Duration::from_secs(40));
    let get = || {
        let res = patient
            .get(sidekey.url("/echo/x"))
            .bearer_auth(&token)
            .send()
            .expect("an answer while the audit sink is stalled");
        let id = res.headers()["x-sidekey-request-id"]
            .to_str()
            .unwrap()
            .to_string();
        let code = res
            .headers()
            .get("x-sidekey-error")
            .map(|v| v.to_str().unwrap().to_string());
        (res.status().as_u16(), code, id)
    };

    // A pipe holds a few hundred records; then a request waits on its own.
    let mut served = 0;
    let (status, code, refused_id) = loop {
        let answer = get();
        if answer.0 != 200 || served > 5_000 {
            break answer;
        }
        served += 1;
    };
    assert!(served > 0, "the first records fit in the pipe");
    assert_eq!((status, code.as_deref()), (503, Some("audit_unavailable")));

    // Still stalled: refused at once, before a credential is spent.
    let seen = upstream.count();
    let (status, code, _) = get();
    assert_eq!((status, code.as_deref()), (503, Some("audit_unavailable")));
    assert_eq!(
        upstream.count(),
        seen,
        "a request reached the upstream unaudited"
    );
    let audit_healthy = || {
        let status: serde_json::Value = serde_json::from_str(&env.ok(&["status"], None)).unwrap();
        status["audit"]["healthy"].as_bool()
    };
    assert_eq!(audit_healthy(), Some(false));

    records.drain();
    eventually(Duration::from_secs(20), || (get().0 == 200).then_some(()));
    assert_eq!(audit_healthy(), Some(true));
    eventually(Duration::from_secs(5), || {
        records.text().contains(&refused_id).then_some(())
    });
    sidekey.signal("TERM");
    assert_eq!(sidekey.wait_exit(Duration::from_secs(10)), Some(0));
    drop(records.finish());
}

/// A sink stuck for good (a dead network file system) must not keep
/// sidekey from stopping: what it holds was never reported as written.
#[test]
fn a_stop_is_not_held_up_by_a_stuck_audit_sink() {
    let upstream = Upstream::http();
    let (_env, token, records, mut sidekey) = audit_to_held_pipe(&upstream);
    let client = client();
    // Until a request waits out the deadline: the sink is stuck.
    eventually(Duration::from_secs(60), || {
        let res = client
            .get(sidekey.url("/echo/x"))
            .bearer_auth(&token)
            .send()
            .unwrap();
        (res.status() == 503).then_some(())
    });
    sidekey.signal("TERM");
    assert_eq!(sidekey.wait_exit(Duration::from_secs(30)), Some(0));
    drop(records.finish());
}

/// `sidekey exec` ends with its command even when the audit sink is stuck
/// (records on stdout, a pipe nobody reads): the command's last request is
/// refused once the sink stops answering, and exec must not then wait for
/// the stuck write for ever.
#[test]
fn exec_ends_with_its_command_when_the_audit_sink_is_stuck() {
    let upstream = Upstream::http();
    let (env, records) = held_audit_env(&upstream);
    // Through the forward proxy exec points HTTP_PROXY at, until a request
    // is refused: a pipe holds 64 KiB, about a hundred records.
    let script = format!(
        "for i in $(seq 1 2000); do \
           code=$(curl -s -o /dev/null -w '%{{http_code}}' -m 60 {}/x); \
           [ \"$code\" = 200 ] || break; \
         done; echo \"$code\" > last.txt",
        upstream.base()
    );
    let mut exec = env
        .cmd_wrapped(
            &records.wrapper(1).each_ref().map(String::as_str),
            &["exec", "--agent", "coder", "--", "sh", "-c", &script],
        )
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let last = env.path("last.txt");
    let ended = eventually(Duration::from_secs(90), || {
        std::fs::metadata(&last).ok().map(|_| Instant::now())
    });
    let exited = eventually(Duration::from_secs(60), || exec.try_wait().unwrap());
    let waited = ended.elapsed();
    assert_eq!(read(&last).trim(), "503", "refused once the sink is stuck");
    assert_eq!(exited.code(), Some(0), "the command's status");
    assert!(
        waited < Duration::from_secs(30),
        "exec outlived its command by {waited:?}"
    );
    drop(records.finish());
}

/// sidekey's own log goes to stderr, here a pipe that nobody reads, as
/// when a log shipper stops. Every refused request logs a line; once the
/// pipe is full those lines must be dropped, not block the proxy.
#[test]
fn a_stderr_nobody_reads_does_not_stall_the_proxy() {
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let upstream = Upstream::http();
    let env = TestEnv::new(&echo_route(&upstream, "store"));
    env.set_secret("api", SECRET);
    let token = env.token("coder");
    let log = HeldPipe::new(&env, "log.fifo");
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let sidekey = Killed(
        env.cmd_wrapped(
            &log.wrapper(2).each_ref().map(String::as_str),
            &["run", "--listen", &addr.to_string()],
        )
        .stdout(Stdio::null())
        .spawn()
        .unwrap(),
    );
    eventually(Duration::from_secs(20), || TcpStream::connect(addr).ok());
    let quick = client_with_timeout(Duration::from_secs(5));
    let url = format!("http://{addr}/echo/x");
    // A pipe holds 64 KiB, a few hundred of these lines.
    for _ in 0..3_000 {
        let res = quick
            .get(&url)
            .bearer_auth("not-a-token")
            .send()
            .expect("answered although its log is not read");
        assert_eq!(res.status(), 401);
    }
    let res = quick.get(&url).bearer_auth(&token).send().unwrap();
    assert_eq!(res.status(), 200);
    drop(sidekey);
    let log = log.finish();
    assert!(log.contains("listening on"), "{log}");
}

#[test]
fn killed_under_load_every_released_response_is_audited_on_a_whole_line() {
    let upstream = Upstream::http();
    let env = TestEnv::new(&echo_route(&upstream, "store"));
    env.set_secret("api", SECRET);
    let token = env.token("coder");
    let mut sidekey = env.spawn();
    let released = Arc::new(Mutex::new(Vec::new()));
    let clients = collect_request_ids(&sidekey.url("/echo/load"), &token, usize::MAX, &released);
    eventually(Duration::from_secs(30), || {
        (released.lock().unwrap().len() >= 400).then_some(())
    });
    sidekey.signal("KILL");
    sidekey.wait_exit(Duration::from_secs(10));
    for c in clients {
        c.join().unwrap();
    }
    // The kill may cut the batch being written; no released request is in it.
    let text = env.audit_text();
    let mut lines: Vec<&str> = text.lines().collect();
    if !text.ends_with('\n') {
        lines.pop();
    }
    let audited: std::collections::HashSet<String> = lines
        .iter()
        .map(|l| {
            let record: serde_json::Value = serde_json::from_str(l).expect("a whole JSON line");
            record["request_id"].as_str().unwrap().to_string()
        })
        .collect();
    let released = released.lock().unwrap();
    let missing: Vec<_> = released
        .iter()
        .filter(|id| !audited.contains(*id))
        .collect();
    assert!(missing.is_empty(), "released but not audited: {missing:?}");

    // Whatever the kill left at the end, the next record is a line of its own.
    let log = env.state.join("audit.jsonl");
    let mut file = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    file.write_all(b"{\"request_id\":\"cut-sh").unwrap();
    let sidekey = env.spawn();
    let res = client()
        .get(sidekey.url("/echo/after"))
        .bearer_auth(&token)
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    let id = res.headers()["x-sidekey-request-id"].to_str().unwrap();
    let text = env.audit_text();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["request_id"], id);
    assert!(text.contains("\n{\"request_id\":\"cut-sh\n"));
}

#[test]
fn no_response_is_released_before_its_record_is_written() {
    // Records go to stdout, a pipe the test leaves unread: once it is full,
    // writes block, and so must every response whose record is behind them.
    let upstream = Upstream::http();
    let (_env, token, records, sidekey) = audit_to_held_pipe(&upstream);
    let released = Arc::new(Mutex::new(Vec::new()));
    let clients = collect_request_ids(&sidekey.url("/echo/pipe"), &token, 100, &released);
    // The pipe holds some records; then answers stop coming.
    let mut last = (0, Instant::now());
    let stalled_at = eventually(Duration::from_secs(60), || {
        let count = released.lock().unwrap().len();
        if count != last.0 {
            last = (count, Instant::now());
        }
        (count > 0 && last.1.elapsed() > Duration::from_secs(1)).then_some(count)
    });
    assert!(
        stalled_at < 8 * 100,
        "the blocked sink never held a response back"
    );
    records.drain();
    for c in clients {
        c.join().unwrap();
    }
    drop(sidekey);
    let records = records.finish();
    for id in released.lock().unwrap().iter() {
        assert!(
            records.contains(id.as_str()),
            "{id} was released before its record was written"
        );
    }
    assert_eq!(released.lock().unwrap().len(), 8 * 100);
}
