//! The harness: a temp dir with a config, the real `sidekey` binary, and
//! real loopback upstreams.

#![allow(dead_code)]

pub mod upstream;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

pub use upstream::Upstream;

/// The binary under test: this build's, or `$SIDEKEY_TEST_BIN` (the load
/// tests against a release build, say).
pub fn bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| match std::env::var_os("SIDEKEY_TEST_BIN") {
        Some(path) => std::path::absolute(path)
            .expect("SIDEKEY_TEST_BIN is a path")
            .display()
            .to_string(),
        None => env!("CARGO_BIN_EXE_sidekey").to_string(),
    })
}

/// A temp dir holding `sidekey.toml` and a state dir.
pub struct TestEnv {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub state: PathBuf,
}

impl TestEnv {
    /// Writes `body` after a header that points `state_dir` into the temp dir,
    /// then runs `sidekey init`.
    pub fn new(body: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("sidekey.toml");
        let state = dir.path().join("state");
        let env = Self { dir, config, state };
        env.write_config(body);
        env.ok(&["init"], None);
        env
    }

    pub fn write_config(&self, body: &str) {
        let text = format!("state_dir = \"state\"\nlisten = \"127.0.0.1:0\"\n{body}");
        std::fs::write(&self.config, text).unwrap();
    }

    /// `sidekey -c CONFIG ARGS`, with no inherited sidekey settings.
    pub fn cmd(&self, args: &[&str]) -> Command {
        self.cmd_wrapped(&[], args)
    }

    /// `WRAPPER… sidekey -c CONFIG ARGS` (`setpriv …`, say).
    pub fn cmd_wrapped(&self, wrapper: &[&str], args: &[&str]) -> Command {
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut cmd = Command::new(program);
                cmd.args(rest).arg(bin());
                cmd
            }
            None => Command::new(bin()),
        };
        cmd.arg("-c").arg(&self.config).args(args);
        cmd.env_remove("SIDEKEY_CONFIG")
            .env_remove("SIDEKEY_STATE_DIR")
            .env_remove("SIDEKEY_MASTER_KEY")
            .env("SIDEKEY_LOG", "info")
            .current_dir(self.dir.path());
        cmd
    }

    /// Runs a command with optional stdin and returns its output.
    pub fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = self.cmd(args);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).unwrap();
        }
        drop(input);
        child.wait_with_output().unwrap()
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.run(args, stdin);
        assert!(
            out.status.success(),
            "sidekey {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn set_secret(&self, name: &str, value: &str) {
        self.ok(&["secret", "set", name], Some(value));
    }

    pub fn token(&self, agent: &str) -> String {
        self.ok(&["token", "issue", agent], None).trim().to_string()
    }

    pub fn token_with(&self, args: &[&str]) -> String {
        let mut all = vec!["token", "issue"];
        all.extend_from_slice(args);
        self.ok(&all, None).trim().to_string()
    }

    /// `sidekey run --listen 127.0.0.1:0`, ready once it logged its address.
    pub fn spawn(&self) -> Sidekey {
        self.spawn_with(&[])
    }

    pub fn spawn_with(&self, envs: &[(&str, &str)]) -> Sidekey {
        self.spawn_listening("127.0.0.1:0", envs)
    }

    /// `sidekey run --listen LISTEN`, e.g. the address of a previous run.
    pub fn spawn_listening(&self, listen: &str, envs: &[(&str, &str)]) -> Sidekey {
        self.spawn_wrapped(&[], listen, envs)
    }

    /// [`Self::spawn_listening`] under a wrapper command.
    pub fn spawn_wrapped(&self, wrapper: &[&str], listen: &str, envs: &[(&str, &str)]) -> Sidekey {
        let mut cmd = self.cmd_wrapped(wrapper, &["run", "--listen", listen]);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Some(addr) = line.split("listening on ").nth(1) {
                        let _ = tx.send(addr.trim().to_string());
                    }
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let out = Arc::new(Mutex::new(String::new()));
        {
            let out = out.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let mut out = out.lock().unwrap();
                    out.push_str(&line);
                    out.push('\n');
                }
            });
        }
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => addr.parse().unwrap(),
            Err(_) => {
                let _ = child.kill();
                panic!("sidekey did not start:\n{}", log.lock().unwrap());
            }
        };
        Sidekey {
            child,
            addr,
            log,
            stdout: out,
        }
    }

    /// Every audit record written so far.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.state.join("audit.jsonl")).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }

    pub fn audit_text(&self) -> String {
        std::fs::read_to_string(self.state.join("audit.jsonl")).unwrap_or_default()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `sidekey cert issue AGENT --ttl TTL`: the serial it prints and the
    /// paths of the certificate and key it wrote.
    pub fn issue_cert(&self, agent: &str, ttl: &str) -> (String, PathBuf, PathBuf) {
        let prefix = self.path(agent);
        let serial = self
            .ok(
                &[
                    "cert",
                    "issue",
                    agent,
                    "--ttl",
                    ttl,
                    "--out",
                    &prefix.display().to_string(),
                ],
                None,
            )
            .trim()
            .to_string();
        let with = |ext: &str| PathBuf::from(format!("{}.{ext}", prefix.display()));
        (serial, with("crt"), with("key"))
    }
}

/// A running `sidekey run`; killed on drop.
pub struct Sidekey {
    pub child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
    stdout: Arc<Mutex<String>>,
}

impl Sidekey {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn stderr(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The mTLS listener's address, from the banner (`listen_tls` may ask
    /// for port 0).
    pub fn tls_addr(&self) -> SocketAddr {
        let banner = "agents with client certificates on https://";
        eventually(Duration::from_secs(5), || {
            let log = self.stderr();
            let rest = &log[log.find(banner)? + banner.len()..];
            rest.split_whitespace().next()?.parse().ok()
        })
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit and returns its code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("sidekey did not exit within {within:?}");
    }
}

impl Drop for Sidekey {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Retries `check` until it returns `Some` or the deadline passes, for
/// effects with nothing to wait on (a file watcher picking up a change).
pub fn eventually<T>(within: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "condition not met within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A blocking reqwest client that talks to sidekey directly (no proxy).
pub fn client() -> reqwest::blocking::Client {
    client_with_timeout(Duration::from_secs(30))
}

/// [`client`] that gives up after `timeout`: shorter to show that an answer
/// did not wait on something stuck, longer to outlast a deadline.
pub fn client_with_timeout(timeout: Duration) -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .build()
        .unwrap()
}

/// Runs curl with `args` straight to the server; returns (status code, headers+body text).
pub fn curl(args: &[&str]) -> (u16, String) {
    let mut all = vec!["--noproxy", "*"];
    all.extend_from_slice(args);
    curl_raw(&all)
}

/// Runs curl through `proxy` (an `http://user:token@host:port` URL).
pub fn curl_via(proxy: &str, args: &[&str]) -> (u16, String) {
    let mut all = vec!["--proxy", proxy];
    all.extend_from_slice(args);
    curl_raw(&all)
}

/// The status of the last response curl printed (after any CONNECT reply).
fn curl_raw(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "-i", "--max-time", "30"])
        .args(args)
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .output()
        .expect("curl is installed");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    let status = text
        .match_indices("HTTP/")
        .filter(|(i, _)| *i == 0 || text[..*i].ends_with('\n'))
        .filter_map(|(i, _)| text[i..].split_whitespace().nth(1)?.parse().ok())
        .last()
        .unwrap_or(0);
    (status, text)
}

/// Runs a Python snippet with `requests` imported; returns its stdout.
pub fn python(script: &str, args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(format!("import sys, json, requests\n{script}"))
        .args(args)
        .env("NO_PROXY", "*")
        .output()
        .expect("python3 is installed");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Sends raw bytes on one connection and reads one response head + body
/// by Content-Length; for keep-alive tests that must reuse a connection.
pub struct RawConn {
    stream: std::net::TcpStream,
    reader: BufReader<std::net::TcpStream>,
}

impl RawConn {
    pub fn connect(addr: SocketAddr) -> Self {
        let stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Self { stream, reader }
    }

    pub fn send(&mut self, raw: &str) {
        self.stream.write_all(raw.as_bytes()).unwrap();
    }

    /// Reads one response with a Content-Length body: (status, head, body).
    pub fn read_response(&mut self) -> (u16, String, String) {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).unwrap();
            assert!(n > 0, "connection closed before a response");
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        let mut body = vec![0; len];
        std::io::Read::read_exact(&mut self.reader, &mut body).unwrap();
        (status, head, String::from_utf8_lossy(&body).into_owned())
    }
}

/// The config fragment for one echo route with a store secret.
pub fn echo_route(upstream: &Upstream, secret_source: &str) -> String {
    echo_route_to(&upstream.base(), secret_source)
}

/// [`echo_route`] to any origin, such as a hand-written test server.
pub fn echo_route_to(origin: &str, secret_source: &str) -> String {
    format!(
        r#"
[secrets.api]
source = "{secret_source}"

[routes.echo]
upstream = "{}"
allow_private = true
inject = {{ header = "authorization", format = "Bearer {{secret}}", secret = "api" }}

[[rules]]
agents = ["coder"]
route = "echo"
action = "allow"
"#,
        origin
    )
}

/// [`echo_route`] to an HTTPS upstream, trusting the upstream's test CA.
pub fn tls_echo_env(upstream: &Upstream, secret_source: &str) -> TestEnv {
    TestEnv::new(&format!(
        "[tls]\nupstream_ca = [\"{}\"]\n{}",
        upstream.ca.as_ref().expect("an HTTPS upstream").display(),
        echo_route(upstream, secret_source)
    ))
}

pub fn assert_no_leak(haystack: &str, secret: &str, what: &str) {
    assert!(
        !haystack.contains(secret),
        "{what} contains the secret:\n{haystack}"
    );
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A git smart-HTTP server over HTTPS on loopback (`git_server.py` running
/// `git http-backend`), demanding Basic auth with `user`/`password`. Serves
/// bare repos `acme/app.git` and `acme/other.git` under `root`, each with one
/// commit on `main`; appends "METHOD PATH STATUS" per request to
/// `root/requests.log`. Killed on drop.
pub struct GitServer {
    pub port: u16,
    /// The CA that signed the server's `localhost` certificate (PEM file).
    pub ca_path: PathBuf,
    /// `GIT_PROJECT_ROOT`.
    pub root: PathBuf,
    child: Child,
    dir: tempfile::TempDir,
}

impl GitServer {
    pub fn start(user: &str, password: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("acme")).unwrap();

        let upstream::TestPki {
            ca_pem,
            leaf,
            leaf_key,
        } = upstream::TestPki::new("test git server CA", &["localhost", "127.0.0.1"]);
        let ca_path = dir.path().join("git-ca.pem");
        let cert_path = dir.path().join("git-cert.pem");
        let key_path = dir.path().join("git-key.pem");
        std::fs::write(&ca_path, ca_pem).unwrap();
        std::fs::write(&cert_path, leaf.pem()).unwrap();
        std::fs::write(&key_path, leaf_key.serialize_pem()).unwrap();

        // One commit on `main`, cloned bare into each repo.
        let seed = dir.path().join("seed");
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        let git = |args: &[&str]| git_ok(&home, args);
        let seed_str = seed.display().to_string();
        git(&["init", "-q", "-b", "main", &seed_str]);
        std::fs::write(seed.join("README.md"), "initial\n").unwrap();
        git(&["-C", &seed_str, "add", "README.md"]);
        git(&["-C", &seed_str, "commit", "-q", "-m", "initial commit"]);
        for repo in ["app", "other"] {
            let bare = root.join("acme").join(format!("{repo}.git"));
            git(&[
                "clone",
                "-q",
                "--bare",
                &seed_str,
                &bare.display().to_string(),
            ]);
        }

        let port_file = dir.path().join("port");
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/it/support/git_server.py"
        );
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let mut child = Command::new("python3")
            .arg(script)
            .arg("--port-file")
            .arg(&port_file)
            .arg("--root")
            .arg(&root)
            .arg("--cert")
            .arg(&cert_path)
            .arg("--key")
            .arg(&key_path)
            .args(["--user", user, "--password", password])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("python3 is installed");
        let deadline = Instant::now() + Duration::from_secs(20);
        let port = loop {
            if let Some(port) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|p| p.trim().parse().ok())
            {
                break port;
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "git server exited with {status}:\n{}",
                    read(&dir.path().join("server.log"))
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("git server did not start within 20s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Self {
            port,
            ca_path,
            root,
            child,
            dir,
        }
    }

    /// The route's `upstream`.
    pub fn base(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    /// A bare repo on disk, e.g. `acme/app.git`.
    pub fn repo(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Every "METHOD PATH STATUS" line the server logged.
    pub fn requests(&self) -> Vec<String> {
        read(&self.root.join("requests.log"))
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// What the server and `git http-backend` wrote to stderr.
    pub fn log(&self) -> String {
        read(&self.dir.path().join("server.log"))
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `git ARGS` with a clean environment: only `PATH`, `HOME=home`, no system
/// config, no prompts, a fixed identity, at most 120 s. Returns the output.
pub fn git_cmd(home: &Path, args: &[&str]) -> Output {
    // `timeout`: a hung transfer fails the test instead of stalling it.
    Command::new("timeout")
        .args(["--kill-after=5", "120", "git"])
        .args(["-c", "user.name=Test", "-c", "user.email=test@example.com"])
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .expect("git is installed")
}

/// `git ARGS` that must succeed; returns stdout.
pub fn git_ok(home: &Path, args: &[&str]) -> String {
    let out = git_cmd(home, args);
    assert!(
        out.status.success(),
        "git {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
