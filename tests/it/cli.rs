//! The command line as a user drives it: `init`, `secret`, `token`, `check`,
//! `explain`, `ca`, `demo`, and bad input that must never panic.

// Tests may unwrap (also allowed crate-wide in main.rs; repeated so this file stands alone).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::support::*;

const SECRET: &str = "sk-cli-first-7a1c93";
const SECRET_TWO: &str = "sk-cli-second-9b2e40";

/// `sidekey ARGS` in `dir` with no `-c` and no inherited sidekey settings.
fn bare(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .current_dir(dir)
        .env_remove("SIDEKEY_CONFIG")
        .env_remove("SIDEKEY_STATE_DIR")
        .env_remove("SIDEKEY_MASTER_KEY")
        .env_remove("RUST_BACKTRACE")
        .env("SIDEKEY_LOG", "info");
    cmd
}

/// Runs `cmd` (stdin closed) and returns its output, killing it and failing
/// the test if it is still running after `within` (e.g. a `run` that started
/// serving when it should have refused its config).
fn output_within(mut cmd: Command, within: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(within) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
            panic!("{cmd:?} still running after {within:?}");
        }
    }
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A failure as the spec wants it: non-zero exit, a cause on stderr, no panic.
fn assert_clean_failure(out: &Output, what: &str) {
    let err = stderr_of(out);
    assert!(
        !out.status.success(),
        "{what}: expected failure, got {:?}\nstdout: {}\nstderr: {err}",
        out.status,
        stdout_of(out)
    );
    assert!(!err.trim().is_empty(), "{what}: stderr is empty");
    assert!(!err.contains("panicked"), "{what}: panicked:\n{err}");
    assert!(
        !err.contains("RUST_BACKTRACE"),
        "{what}: backtrace hint reached the user:\n{err}"
    );
}

/// As [`assert_clean_failure`], and the cause is exactly one line.
fn assert_one_line_failure(out: &Output, what: &str) -> String {
    assert_clean_failure(out, what);
    let err = stderr_of(out);
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{what}: stderr is not one line:\n{err}"
    );
    err
}

/// The claims of an agent token (a JWT), without verifying it.
fn claims(token: &str) -> serde_json::Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).expect("a JWT has a payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// `explain` output as `key -> value` for its `key: value` lines.
fn explain_fields(stdout: &str) -> BTreeMap<String, String> {
    stdout
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            (!k.starts_with(' ')).then(|| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

/// One gateway request with `token`: (status, x-sidekey-error).
fn gateway_get(sidekey: &Sidekey, token: &str) -> (u16, Option<String>) {
    let res = client()
        .get(sidekey.url("/echo/v1/models"))
        .bearer_auth(token)
        .send()
        .unwrap();
    let code = res
        .headers()
        .get("x-sidekey-error")
        .map(|v| v.to_str().unwrap().to_string());
    (res.status().as_u16(), code)
}

fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

// ---------------------------------------------------------------- init

#[test]
fn init_creates_private_keys_and_a_valid_example_config_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = dir.path().join("sidekey.toml");

    let out = output_within(
        bare(dir.path(), &["init", "--state-dir", "state"]),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "init failed: {}", stderr_of(&out));

    assert!(state.is_dir());
    assert_eq!(mode_of(&state), 0o700, "state dir mode");
    for key in ["token-signing.key", "master.key", "ca.key"] {
        let path = state.join(key);
        assert!(
            std::fs::metadata(&path).unwrap().len() > 0,
            "{key} is empty"
        );
        assert_eq!(mode_of(&path), 0o600, "{key} mode");
    }
    let ca = std::fs::read_to_string(state.join("ca.crt")).unwrap();
    assert!(
        ca.starts_with("-----BEGIN CERTIFICATE-----"),
        "ca.crt: {ca}"
    );

    let example = std::fs::read_to_string(&config).expect("init writes an example sidekey.toml");
    assert!(
        example.lines().any(|l| l.trim_start().starts_with('#')),
        "the example config is commented:\n{example}"
    );
    for key in ["listen", "state_dir", "[routes.", "[[rules]]"] {
        assert!(example.contains(key), "example lacks {key}:\n{example}");
    }

    // The example is valid as written, found at the default ./sidekey.toml.
    let out = output_within(bare(dir.path(), &["check"]), Duration::from_secs(30));
    assert!(
        out.status.success(),
        "the example config fails `check`: {}",
        stderr_of(&out)
    );

    // Idempotent: a second init succeeds and changes no byte of any key or the config.
    let files = [
        state.join("token-signing.key"),
        state.join("master.key"),
        state.join("ca.key"),
        state.join("ca.crt"),
        config.clone(),
    ];
    let before: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    for args in [
        &["init", "--state-dir", "state"][..],
        // The state dir named by the example config itself.
        &["init"][..],
    ] {
        let out = output_within(bare(dir.path(), args), Duration::from_secs(30));
        assert!(
            out.status.success(),
            "second {args:?} failed: {}",
            stderr_of(&out)
        );
        for (file, old) in files.iter().zip(&before) {
            assert_eq!(
                &std::fs::read(file).unwrap(),
                old,
                "{args:?} changed {}",
                file.display()
            );
        }
    }
    assert_eq!(mode_of(&state), 0o700);

    // An empty dir made beforehand (`mkdir -p`, a fresh volume) is made
    // private before the keys go in.
    let premade = dir.path().join("premade");
    std::fs::create_dir(&premade).unwrap();
    std::fs::set_permissions(&premade, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = output_within(
        bare(dir.path(), &["init", "--state-dir", "premade"]),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(mode_of(&premade), 0o700, "a pre-made empty state dir");
}

#[test]
fn init_names_a_key_left_empty_by_a_crash_and_replaces_nothing() {
    let env = TestEnv::new("");
    for file in ["token-signing.key", "ca.key", "agent-ca.crt", "master.key"] {
        let path = env.state.join(file);
        let kept = std::fs::read(&path).unwrap();
        std::fs::write(&path, b"").unwrap();
        let out = env.run(&["init"], None);
        let err = assert_one_line_failure(&out, &format!("init with an empty {file}"));
        assert!(
            err.contains(&path.display().to_string()) && err.contains("damaged")
                || err.contains("invalid master key"),
            "{file}: {err}"
        );
        assert!(err.contains("restore it from a backup"), "{file}: {err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"", "init replaced {file}");
        std::fs::write(&path, kept).unwrap();
    }
    // Whole again: init is quiet and content.
    let out = env.run(&["init"], None);
    assert!(out.status.success(), "{}", stderr_of(&out));
}

#[test]
fn a_state_dir_or_key_open_to_others_is_warned_about_by_init_and_run() {
    let env = TestEnv::new("");
    assert!(
        !stderr_of(&env.run(&["init"], None)).contains("warning"),
        "a private state dir is not warned about"
    );
    let master = env.state.join("master.key");
    let set_mode = |path: &Path, mode| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    set_mode(&env.state, 0o755);
    set_mode(&master, 0o644);

    let out = env.run(&["init"], None);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let err = stderr_of(&out);
    for (path, mode) in [(&env.state, "755"), (&master, "644")] {
        assert!(
            err.lines()
                .any(|l| l.contains(&path.display().to_string()) && l.contains(mode)),
            "init does not warn about {}: {err}",
            path.display()
        );
    }
    // Still as they were: sidekey warns, it does not change them behind the
    // operator's back.
    assert_eq!(mode_of(&master), 0o644);

    // A restored or copied state dir reaches `run` without `init`.
    let sidekey = env.spawn();
    let log = sidekey.stderr();
    for path in [&env.state, &master] {
        assert!(
            log.lines()
                .any(|l| l.contains("WARN") && l.contains(&path.display().to_string())),
            "run does not warn about {}: {log}",
            path.display()
        );
    }
}

// ---------------------------------------------------------------- secret

#[test]
fn secret_set_list_update_and_remove_through_stdin_only() {
    let upstream = Upstream::http();
    let env = TestEnv::new(&echo_route(&upstream, "store"));
    let token = env.token("coder");

    // Set from stdin; the trailing newline `echo` adds is not part of the value.
    let out = env.run(&["secret", "set", "api"], Some(&format!("{SECRET}\n")));
    assert!(out.status.success(), "set failed: {}", stderr_of(&out));
    assert_no_leak(&stderr_of(&out), SECRET, "secret set stderr");
    assert_no_leak(&stdout_of(&out), SECRET, "secret set stdout");

    // A value given as an argument is refused, and not printed back.
    let out = env.run(&["secret", "set", "api", "sk-live-on-argv-93f2"], Some(""));
    assert_eq!(out.status.code(), Some(2));
    let err = assert_one_line_failure(&out, "secret set NAME VALUE");
    assert!(err.contains("standard input"), "{err}");
    assert_no_leak(&err, "sk-live-on-argv-93f2", "secret set NAME VALUE");

    // list: the name, never the value (plain and JSON).
    let out = env.run(&["secret", "list"], None);
    assert!(out.status.success(), "list failed: {}", stderr_of(&out));
    let listed = stdout_of(&out);
    assert!(
        listed
            .lines()
            .any(|l| l.split_whitespace().next() == Some("api")),
        "list does not name the secret:\n{listed}"
    );
    assert_no_leak(&listed, SECRET, "secret list stdout");
    assert_no_leak(&stderr_of(&out), SECRET, "secret list stderr");
    let json = env.ok(&["secret", "list", "--json"], None);
    let rows: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1, "{json}");
    assert_eq!(rows[0]["name"], "api");
    assert_no_leak(&json, SECRET, "secret list --json");

    // The store on disk holds no plaintext.
    let store = std::fs::read(env.state.join("secrets.enc")).expect("the store file exists");
    assert!(
        !contains_bytes(&store, SECRET.as_bytes()),
        "the store file contains the value in plaintext"
    );

    // The proxy injects exactly the value (newline stripped).
    {
        let sidekey = env.spawn();
        assert_eq!(gateway_get(&sidekey, &token).0, 200);
        assert_eq!(
            upstream.last().header("authorization"),
            Some(format!("Bearer {SECRET}").as_str())
        );
    }

    // Re-set replaces the value.
    env.set_secret("api", SECRET_TWO);
    let store = std::fs::read(env.state.join("secrets.enc")).unwrap();
    assert!(!contains_bytes(&store, SECRET_TWO.as_bytes()));
    assert_eq!(
        env.ok(&["secret", "list"], None)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count(),
        1,
        "re-set must not add a second entry"
    );
    {
        let sidekey = env.spawn();
        assert_eq!(gateway_get(&sidekey, &token).0, 200);
        assert_eq!(
            upstream.last().header("authorization"),
            Some(format!("Bearer {SECRET_TWO}").as_str())
        );
    }

    // Empty stdin (or only the newline) is refused and stores nothing.
    for empty in ["", "\n"] {
        let out = env.run(&["secret", "set", "other"], Some(empty));
        assert_one_line_failure(&out, &format!("secret set with stdin {empty:?}"));
    }
    let listed = env.ok(&["secret", "list"], None);
    assert!(
        !listed.contains("other"),
        "an empty value was stored:\n{listed}"
    );

    // rm removes; rm of a missing name fails with one line.
    env.ok(&["secret", "rm", "api"], None);
    let listed = env.ok(&["secret", "list"], None);
    assert!(!listed.contains("api"), "rm left the secret:\n{listed}");
    let out = env.run(&["secret", "rm", "api"], None);
    let err = assert_one_line_failure(&out, "secret rm of a missing name");
    assert!(err.contains("api"), "the error names the secret: {err}");
}

#[test]
fn a_wrong_master_key_fails_clearly_and_leaves_the_store_alone() {
    let env = TestEnv::new("");
    env.set_secret("api", SECRET);
    let store_path = env.state.join("secrets.enc");
    let before = std::fs::read(&store_path).unwrap();
    let wrong = "0f".repeat(32);
    assert_eq!(wrong.len(), 64);

    let mut cmd = env.cmd(&["secret", "list"]);
    cmd.env("SIDEKEY_MASTER_KEY", &wrong);
    let out = output_within(cmd, Duration::from_secs(30));
    let err = assert_one_line_failure(&out, "secret list with a wrong master key");
    assert!(
        err.contains("master key") || err.contains("decrypt"),
        "the error says what is wrong: {err}"
    );
    assert_no_leak(&stdout_of(&out), SECRET, "stdout");
    assert!(stdout_of(&out).trim().is_empty(), "nothing listed");

    // A write with the wrong key must not replace (and so destroy) the store.
    let mut cmd = env.cmd(&["secret", "set", "other"]);
    cmd.env("SIDEKEY_MASTER_KEY", &wrong)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"v").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_one_line_failure(&out, "secret set with a wrong master key");
    assert_eq!(
        std::fs::read(&store_path).unwrap(),
        before,
        "the store changed"
    );

    // A malformed key is its own clear error.
    let mut cmd = env.cmd(&["secret", "list"]);
    cmd.env("SIDEKEY_MASTER_KEY", "not-hex");
    let out = output_within(cmd, Duration::from_secs(30));
    let err = assert_one_line_failure(&out, "secret list with a malformed master key");
    assert!(err.contains("SIDEKEY_MASTER_KEY"), "{err}");
    // So is one that is not even text, rather than falling back to master.key.
    let mut cmd = env.cmd(&["secret", "list"]);
    cmd.env(
        "SIDEKEY_MASTER_KEY",
        <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"\xff\xfe"),
    );
    let out = output_within(cmd, Duration::from_secs(30));
    let err = assert_one_line_failure(&out, "secret list with a non-UTF-8 master key");
    assert!(err.contains("SIDEKEY_MASTER_KEY"), "{err}");

    // The right key (from master.key) still reads it.
    assert!(env.ok(&["secret", "list"], None).contains("api"));
}

// ---------------------------------------------------------------- token

#[test]
fn token_issue_prints_one_printable_line_with_the_asked_claims() {
    let env = TestEnv::new("");
    let out = env.run(
        &["token", "issue", "coder", "--ttl", "10m", "--session", "S"],
        None,
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    assert!(stdout.ends_with('\n'), "{stdout:?}");
    assert_eq!(stdout.lines().count(), 1, "{stdout:?}");
    let token = stdout.trim_end_matches('\n');
    assert!(!token.is_empty());
    assert!(
        token.bytes().all(|b| b.is_ascii_graphic()),
        "not printable ASCII: {token:?}"
    );
    let c = claims(token);
    assert_eq!(c["sub"], "coder");
    assert_eq!(c["sid"], "S");
    let ttl = c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap();
    assert!((599..=601).contains(&ttl), "ttl {ttl}s, want 600");

    // Without --session each token gets a fresh session and id.
    let a = claims(&env.token("coder"));
    let b = claims(&env.token("coder"));
    assert_ne!(a["sid"], b["sid"]);
    assert_ne!(a["jti"], b["jti"]);
}

#[test]
fn token_issue_refuses_bad_ttls_and_names_in_one_line() {
    let env = TestEnv::new("");
    let cases: &[&[&str]] = &[
        &["token", "issue", "coder", "--ttl", "soon"],
        &["token", "issue", "coder", "--ttl", "0s"],
        &["token", "issue", "coder", "--ttl=-5m"],
        &["token", "issue", "a b"],
        &["token", "issue", ""],
        &["token", "issue", "coder", "--session", "x y"],
    ];
    for args in cases {
        let out = env.run(args, None);
        assert_one_line_failure(&out, &format!("{args:?}"));
        assert!(
            stdout_of(&out).trim().is_empty(),
            "{args:?} printed a token anyway"
        );
    }
}

#[test]
fn token_revoke_needs_exactly_one_selector() {
    let env = TestEnv::new("");
    let cases: &[&[&str]] = &[
        &["token", "revoke"],
        &["token", "revoke", "--id", "t-1", "--session", "s"],
        &["token", "revoke", "--session", "s", "--agent", "coder"],
        &["token", "revoke", "--id", "t-1", "--agent", "coder"],
    ];
    for args in cases {
        let out = env.run(args, None);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: want a usage error: {}",
            stderr_of(&out)
        );
        let err = assert_one_line_failure(&out, &format!("{args:?}"));
        assert!(err.contains("usage: sidekey token revoke"), "{err}");
    }
    assert!(
        !env.state.join("revocations.json").exists(),
        "a refused revoke wrote the revocation list"
    );
    env.ok(&["token", "revoke", "--session", "s"], None);
    assert!(env.state.join("revocations.json").exists());
}

#[test]
fn revoking_a_session_or_an_agent_refuses_its_tokens_now_and_after_a_restart() {
    let upstream = Upstream::http();
    let env = TestEnv::new(&format!(
        "{}\n[[rules]]\nagents = [\"ci\"]\nroute = \"echo\"\naction = \"allow\"\n",
        echo_route(&upstream, "store")
    ));
    env.set_secret("api", SECRET);
    let doomed = env.token_with(&["coder", "--ttl", "10m", "--session", "doomed"]);
    let kept = env.token_with(&["coder", "--ttl", "10m", "--session", "kept"]);
    let ci = env.token_with(&["ci", "--session", "ci-run"]);
    let sidekey = env.spawn();
    for token in [&doomed, &kept, &ci] {
        assert_eq!(gateway_get(&sidekey, token), (200, None));
    }
    let revoked = (401, Some("token_revoked".to_string()));

    env.ok(&["token", "revoke", "--session", "doomed"], None);
    eventually(Duration::from_secs(3), || {
        (gateway_get(&sidekey, &doomed) == revoked).then_some(())
    });
    assert_eq!(gateway_get(&sidekey, &kept), (200, None), "another session");
    assert_eq!(gateway_get(&sidekey, &ci), (200, None), "another agent");

    env.ok(&["token", "revoke", "--agent", "ci"], None);
    eventually(Duration::from_secs(3), || {
        (gateway_get(&sidekey, &ci) == revoked).then_some(())
    });
    assert_eq!(gateway_get(&sidekey, &kept), (200, None));
    let seen_before_restart = upstream.count();

    // Revocations survive a restart.
    drop(sidekey);
    let sidekey = env.spawn();
    assert_eq!(gateway_get(&sidekey, &doomed), revoked, "after restart");
    assert_eq!(gateway_get(&sidekey, &ci), revoked, "after restart");
    assert_eq!(gateway_get(&sidekey, &kept), (200, None), "after restart");
    assert_eq!(
        upstream.count(),
        seen_before_restart + 1,
        "refused tokens must not reach the upstream"
    );
    // An agent revocation covers tokens issued so far, not later ones.
    let fresh = env.token("ci");
    assert_eq!(gateway_get(&sidekey, &fresh), (200, None));
}

// ---------------------------------------------------------------- check

const BROKEN: &str = r#"bogus = 1

[secrets.api]
source = "store"

[routes.good]
upstream = "http://127.0.0.1:9"
inject = { header = "authorization", format = "Bearer {secret}", secret = "nosuch" }

[routes.weird]
upstream = "http://127.0.0.1:9"
colour = "red"

[routes.typed]
upstream = 8080

[[rules]]
agents = ["coder"]
route = "missing"
action = "allow"

[[rules]]
agents = ["coder"]
route = "good"
host = "example.com"
action = "allow"

[[rules]]
agents = []
host = "example.com"
action = "allow"
"#;

#[test]
fn check_accepts_a_valid_config() {
    let upstream = Upstream::http();
    let env = TestEnv::new(&echo_route(&upstream, "store"));
    let out = env.run(&["check"], None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    assert!(!stderr_of(&out).contains("panicked"));
}

#[test]
fn check_reports_every_problem_with_its_location() {
    let env = TestEnv::new("");
    env.write_config(BROKEN);
    let out = env.run(&["check"], None);
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    let err = stderr_of(&out);
    assert_clean_failure(&out, "check");
    // Each location on a line of its own, with what is wrong there.
    let expect = [
        ("bogus", "unknown"),
        ("routes.weird", "colour"),
        // A wrong type is placed at its key, not only at its table.
        ("routes.typed.upstream:", "expected a string"),
        ("routes.good.inject", "nosuch"),
        ("rules[0]", "missing"),
        ("rules[1]", "both"),
        ("rules[2].agents", "empty"),
    ];
    for (at, what) in expect {
        assert!(
            err.lines().any(|l| l.contains(at) && l.contains(what)),
            "no line names {at} ({what}):\n{err}"
        );
    }
    // One problem does not hide another: seven problems, seven lines at least.
    let problem_lines = err
        .lines()
        .filter(|l| expect.iter().any(|(at, _)| l.contains(at)))
        .count();
    assert!(problem_lines >= 7, "{err}");
}

#[test]
fn check_refuses_what_run_refuses_and_warns_of_what_would_fail_every_request() {
    let env = TestEnv::new("");
    let not_a_ca = env.path("not-a-ca.pem");
    std::fs::write(&not_a_ca, "no certificate here\n").unwrap();
    for (config, at) in [
        (
            "listen = \"127.0.0.1:18555\"\nlisten_tls = \"127.0.0.1:18555\"\n".to_string(),
            "listen_tls",
        ),
        (
            format!("[tls]\nupstream_ca = [\"{}\"]\n", not_a_ca.display()),
            "tls",
        ),
    ] {
        std::fs::write(&env.config, format!("state_dir = \"state\"\n{config}")).unwrap();
        let out = env.run(&["check"], None);
        assert_eq!(out.status.code(), Some(1), "{config}: {}", stderr_of(&out));
        let err = stderr_of(&out);
        assert!(
            err.lines().any(|l| l.contains(&format!(": {at}: "))),
            "{err}"
        );
        // As `run` does.
        let out = env.run(&["run"], None);
        assert_clean_failure(&out, &config);
    }

    // An admin API open beyond the host is allowed, and said (only
    // checked here: a test listens on loopback alone).
    env.write_config(
        "[secrets.admin]\nsource = \"env:ADMIN_TOKEN\"\n\
         [admin_tcp]\nlisten = \"0.0.0.0:18556\"\ntoken = \"admin\"\n",
    );
    let out = env.run(&["check"], None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out)
            .lines()
            .any(|l| l.starts_with("warning: admin_tcp.listen: 0.0.0.0:18556")),
        "{}",
        stderr_of(&out)
    );

    // An audit file that cannot be written and a key set that cannot be
    // read are not config errors, but every request would fail: said at
    // once, by `check` and by `run`.
    env.write_config(
        "[audit]\nfile = \"no-such-dir/audit.jsonl\"\n\
         [identity.oidc]\nissuer = \"https://issuer.example\"\naudience = \"sidekey\"\n\
         jwks_file = \"no-such-jwks.json\"\nclaim = \"sub\"\n\
         [identity.oidc.map]\n\"workload-1\" = \"coder\"\n",
    );
    let out = env.run(&["check"], None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let err = stderr_of(&out);
    for at in ["warning: audit.file:", "warning: identity.oidc.jwks_file:"] {
        assert!(err.lines().any(|l| l.starts_with(at)), "{at}: {err}");
    }
    let sidekey = env.spawn();
    eventually(Duration::from_secs(5), || {
        let log = sidekey.stderr();
        (log.contains("audit.file:") && log.contains("identity.oidc.jwks_file:")).then_some(())
    });
}

#[test]
fn check_names_the_line_of_a_syntax_error() {
    let env = TestEnv::new("");
    // Lines 1 and 2 are the harness header; the broken table header is on line 4.
    env.write_config("\n[routes.x\nupstream = \"http://127.0.0.1:9\"\n");
    let out = env.run(&["check"], None);
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    assert_clean_failure(&out, "check with a syntax error");
    let err = stderr_of(&out);
    assert!(err.contains("line 4"), "the error names line 4:\n{err}");
}

#[test]
fn check_fails_on_a_missing_config_file() {
    let dir = tempfile::tempdir().unwrap();
    // Named with -c.
    let out = output_within(
        bare(dir.path(), &["-c", "missing.toml", "check"]),
        Duration::from_secs(30),
    );
    assert_clean_failure(&out, "check -c missing.toml");
    assert!(
        stderr_of(&out).contains("missing.toml"),
        "{}",
        stderr_of(&out)
    );
    // The default ./sidekey.toml.
    let out = output_within(bare(dir.path(), &["check"]), Duration::from_secs(30));
    assert_clean_failure(&out, "check without a config");
    assert!(
        stderr_of(&out).contains("sidekey.toml"),
        "{}",
        stderr_of(&out)
    );
}

/// A config or `file:` secret that is not a regular file (`/dev/zero`,
/// a FIFO nobody writes) is refused at once, rather than read until memory
/// runs out or waited on forever.
#[test]
fn a_config_or_secret_file_that_never_ends_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("config.fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    for config in ["/dev/zero", fifo.to_str().unwrap()] {
        let out = output_within(
            bare(dir.path(), &["-c", config, "check"]),
            Duration::from_secs(10),
        );
        let err = stderr_of(&out);
        assert_clean_failure(&out, config);
        assert!(err.contains("not a regular file"), "{config}: {err}");
    }

    let env = TestEnv::new(
        "[secrets.api]\nsource = \"file:/dev/zero\"\n[secrets.big]\nsource = \"file:big.txt\"\n",
    );
    std::fs::write(env.path("big.txt"), vec![b'k'; 2 << 20]).unwrap();
    let out = output_within(env.cmd(&["check"]), Duration::from_secs(10));
    let err = stderr_of(&out);
    assert!(
        err.contains("secrets.api") && err.contains("not a regular file"),
        "{err}"
    );
    assert!(
        err.contains("secrets.big") && err.contains("larger than 1048576 bytes"),
        "{err}"
    );
}

#[test]
fn run_with_a_broken_config_exits_2_before_binding() {
    let env = TestEnv::new("");
    env.write_config(BROKEN);
    let out = output_within(
        env.cmd(&["run", "--listen", "127.0.0.1:0"]),
        Duration::from_secs(20),
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
    let err = stderr_of(&out);
    assert_clean_failure(&out, "run with a broken config");
    assert!(!err.contains("listening on"), "it started serving:\n{err}");
    assert!(err.contains("rules[0]"), "the problems are shown:\n{err}");
}

// ---------------------------------------------------------------- explain

#[test]
fn explain_shows_the_decision_and_rule_without_sending() {
    let upstream = Upstream::http();
    let env = TestEnv::new(&format!(
        "{}\n[[rules]]\nname = \"no-admin\"\nagents = [\"*\"]\nroute = \"echo\"\npaths = [\"/admin/**\"]\naction = \"deny\"\n",
        echo_route(&upstream, "store")
    ));
    env.set_secret("api", SECRET);

    let explain = |agent: &str, method: &str, url: &str| {
        let out = env.run(&["explain", "--agent", agent, method, url], None);
        assert!(
            out.status.success(),
            "explain {agent} {method} {url}: {}",
            stderr_of(&out)
        );
        let text = stdout_of(&out);
        assert_no_leak(&text, SECRET, "explain output");
        (explain_fields(&text), text)
    };

    let (f, text) = explain(
        "coder",
        "POST",
        "http://127.0.0.1:8080/echo/v1/chat/completions",
    );
    assert_eq!(
        f.get("decision").map(String::as_str),
        Some("allow"),
        "{text}"
    );
    assert_eq!(
        f.get("rule").map(String::as_str),
        Some("rules[0]"),
        "{text}"
    );
    assert!(f["route"].starts_with("echo"), "{text}");
    assert_eq!(
        f.get("path").map(String::as_str),
        Some("/v1/chat/completions")
    );

    // Denied by default: no rule names this agent.
    let (f, text) = explain("intruder", "GET", "http://127.0.0.1:8080/echo/v1/models");
    assert_eq!(
        f.get("decision").map(String::as_str),
        Some("deny"),
        "{text}"
    );
    assert!(!f["rule"].contains("rules[0]"), "{text}");

    // Denied by a matching deny rule, which is named (deny wins over rules[0]).
    let (f, text) = explain("coder", "GET", "http://127.0.0.1:8080/echo/admin/users");
    assert_eq!(
        f.get("decision").map(String::as_str),
        Some("deny"),
        "{text}"
    );
    assert_eq!(
        f.get("rule").map(String::as_str),
        Some("no-admin"),
        "{text}"
    );

    assert_eq!(upstream.count(), 0, "explain must not send anything");
    assert!(env.audit().is_empty(), "explain must not audit a request");
}

#[test]
fn explain_does_not_route_a_foreign_host_by_its_first_path_segment() {
    let upstream = Upstream::http();
    let env = TestEnv::new(&format!(
        "{}\n[[rules]]\nagents = [\"coder\"]\nhost = \"pypi.org\"\naction = \"allow\"\n\
         [routes.ext]\nupstream = \"https://api.example.com\"\n\
         [[rules]]\nagents = [\"coder\"]\nroute = \"ext\"\npaths = [\"/v1/**\"]\naction = \"allow\"\n",
        echo_route(&upstream, "store")
    ));
    // `https://pypi.org/echo/x` is a request to pypi.org, path /echo/x; a
    // proxy client sends CONNECT pypi.org:443, which the host rule lets
    // through blind, never to the echo route.
    let out = env.ok(
        &[
            "explain",
            "--agent",
            "coder",
            "GET",
            "https://pypi.org/echo/x",
        ],
        None,
    );
    let f = explain_fields(&out);
    assert_eq!(f.get("mode").map(String::as_str), Some("connect"), "{out}");
    assert!(f["decision"].starts_with("allow"), "{out}");
    assert!(
        !f.get("route").is_some_and(|r| r.starts_with("echo")),
        "{out}"
    );
    assert!(!out.contains("secret \"api\""), "{out}");

    // A route's https origin is intercepted and decided request by
    // request; any other https origin is refused at CONNECT.
    let explain = |method: &str, url: &str| {
        explain_fields(&env.ok(&["explain", "--agent", "coder", method, url], None))
    };
    let f = explain("GET", "https://api.example.com/v1/x");
    assert_eq!(f["mode"], "intercept", "{f:?}");
    assert!(f["route"].starts_with("ext"), "{f:?}");
    assert_eq!(f["decision"], "allow", "{f:?}");
    let f = explain("GET", "https://api.example.com/admin");
    assert_eq!(
        (f["mode"].as_str(), f["decision"].as_str()),
        ("intercept", "deny"),
        "{f:?}"
    );
    let f = explain("GET", "https://elsewhere.example/");
    assert_eq!(f["mode"], "connect", "{f:?}");
    assert!(f["decision"].starts_with("deny"), "{f:?}");

    // Nor a local origin on another port: only sidekey's own port is the
    // gateway, and the proxy would send this to 127.0.0.1:1.
    let config = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(&env.config, config.replace("127.0.0.1:0", "127.0.0.1:8080")).unwrap();
    let out = env.ok(
        &[
            "explain",
            "--agent",
            "coder",
            "GET",
            "http://127.0.0.1:8080/echo/x",
        ],
        None,
    );
    let f = explain_fields(&out);
    assert_eq!(f.get("mode").map(String::as_str), Some("reverse"), "{out}");
    assert!(f["route"].starts_with("echo"), "{out}");
    let out = env.ok(
        &[
            "explain",
            "--agent",
            "coder",
            "GET",
            "http://127.0.0.1:1/echo/x",
        ],
        None,
    );
    let f = explain_fields(&out);
    assert_eq!(f.get("mode").map(String::as_str), Some("forward"), "{out}");
    assert_eq!(
        f.get("route").map(String::as_str),
        Some("none (destination 127.0.0.1:1)"),
        "{out}"
    );

    // A port the proxy refuses is refused here too, never shown as the
    // default port.
    for url in ["http://127.0.0.1:99999/echo/x", "https://pypi.org:0/"] {
        let out = env.run(&["explain", "--agent", "coder", "GET", url], None);
        let err = stderr_of(&out);
        assert!(!out.status.success(), "explain {url}: {}", stdout_of(&out));
        assert!(err.contains("invalid destination port"), "{url}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{url}: {err}");
    }
}

#[test]
fn explain_and_check_agree_with_the_proxy_on_shared_upstreams_and_private_addresses() {
    let upstream = Upstream::http();
    // `echo` and `mirror` share one upstream; `*` allows public hosts only.
    let env = TestEnv::new(&format!(
        "{}\n[routes.mirror]\nupstream = \"{}\"\nallow_private = true\n\
         [[rules]]\nagents = [\"coder\"]\nroute = \"mirror\"\naction = \"allow\"\n\
         [[rules]]\nagents = [\"coder\"]\nhost = \"*\"\naction = \"allow\"\n",
        echo_route(&upstream, "store"),
        upstream.base()
    ));
    env.set_secret("api", SECRET);
    let out = env.run(&["check"], None);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let err = stderr_of(&out);
    assert!(
        err.contains("warning: routes.mirror: same upstream as routes.echo"),
        "{err}"
    );

    let explain = |url: &str| {
        let out = env.ok(&["explain", "--agent", "coder", "GET", url], None);
        (explain_fields(&out), out)
    };
    let (f, out) = explain(&format!("{}/v1/x", upstream.base()));
    assert!(f["route"].starts_with("echo ->"), "{out}");
    assert!(out.contains("secret \"api\" into the header"), "{out}");
    // What the proxy does with the same request.
    let token = env.token("coder");
    let sidekey = env.spawn();
    let (status, text) = curl_via(
        &format!("http://coder:{token}@{}", sidekey.addr),
        &[&format!("{}/v1/x", upstream.base())],
    );
    assert_eq!(status, 200, "{text}");
    assert_eq!(env.audit().last().unwrap()["route"], "echo");

    // A private address under `*` is refused by the proxy, and so here.
    for url in ["http://10.0.0.1/", "http://169.254.169.254/latest/"] {
        let (f, out) = explain(url);
        assert!(
            f["decision"].starts_with("deny (destination refused"),
            "{out}"
        );
        assert!(!out.contains("inject:"), "{out}");
    }
    let (f, out) = explain("http://93.184.215.14/");
    assert_eq!(f["decision"], "allow", "{out}");
}

// ---------------------------------------------------------------- ca

#[test]
fn ca_cert_is_one_pem_and_the_bundle_ends_with_it() {
    let env = TestEnv::new("");
    let cert = env.ok(&["ca", "cert"], None);
    assert_eq!(cert.matches("-----BEGIN CERTIFICATE-----").count(), 1);
    assert_eq!(cert.matches("-----END CERTIFICATE-----").count(), 1);
    assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"), "{cert}");
    assert!(cert.trim_end().ends_with("-----END CERTIFICATE-----"));
    assert!(!cert.contains("PRIVATE KEY"));
    assert_eq!(cert, read(&env.state.join("ca.crt")));

    let bundle = env.ok(&["ca", "bundle"], None);
    let n = bundle.matches("-----BEGIN CERTIFICATE-----").count();
    assert!(n > 1, "the bundle has {n} certificate(s)");
    assert_eq!(n, bundle.matches("-----END CERTIFICATE-----").count());
    assert!(
        bundle.trim_end().ends_with(cert.trim_end()),
        "the bundle does not end with the CA"
    );
    assert!(!bundle.contains("PRIVATE KEY"));

    // A damaged CA certificate is reported, not handed out.
    std::fs::write(env.state.join("ca.crt"), &cert[..10]).unwrap();
    for command in ["cert", "bundle"] {
        let out = env.run(&["ca", command], None);
        let err = assert_one_line_failure(&out, command);
        assert!(
            err.contains("ca.crt") && err.contains("not one PEM certificate"),
            "{err}"
        );
        assert!(out.stdout.is_empty(), "ca {command} printed a damaged CA");
    }
}

// ---------------------------------------------------------------- demo

#[test]
fn demo_shows_the_tour_serves_the_printed_curl_and_stops_on_sigint() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = bare(dir.path(), &["demo"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    struct KillOnDrop(u32);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(self.0.to_string())
                .status();
        }
    }
    let guard = KillOnDrop(child.id());

    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let err_log = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            text.push_str(&line);
            text.push('\n');
        }
        text
    });

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut output = String::new();
    let curl_line = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                output.push_str(&line);
                output.push('\n');
                if line.contains("curl -s -H") {
                    break line;
                }
            }
            Err(_) => panic!("demo printed no curl command in 30 s:\n{output}"),
        }
    };
    assert!(output.contains("[REDACTED]"), "{output}");
    assert!(output.contains("2. what the upstream received"), "{output}");
    assert!(output.contains("1. what the agent sent"), "{output}");

    // `  curl -s -H 'Authorization: Bearer TOKEN' http://ADDR/echo/anything`
    let (_, rest) = curl_line.split_once("-H '").unwrap();
    let (header, rest) = rest.split_once('\'').unwrap();
    let url = rest.split_whitespace().next().unwrap();
    assert!(header.starts_with("Authorization: Bearer "), "{curl_line}");
    assert!(url.starts_with("http://127.0.0.1:"), "{curl_line}");
    let (status, text) = curl(&["-H", header, url]);
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("[REDACTED]"), "{text}");
    assert!(
        !text.contains("sk-demo-"),
        "the demo key came back to the agent:\n{text}"
    );

    let status = Command::new("kill")
        .arg("-INT")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        assert!(
            Instant::now() < deadline,
            "demo did not exit within 10 s of SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    std::mem::forget(guard);
    let err = err_log.join().unwrap();
    assert_eq!(code, Some(0), "demo exit code; stderr:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
}

// ---------------------------------------------------------------- bad input

#[test]
fn output_that_cannot_be_written_fails_cleanly() {
    let env = TestEnv::new(&format!(
        "{}\n[[rules]]\nagents = [\"coder\"]\nhost = \"pypi.org\"\naction = \"allow\"\n",
        echo_route(&Upstream::http(), "store")
    ));
    env.set_secret("api", SECRET);
    // A full disk behind stdout.
    for args in [
        &["token", "issue", "coder"][..],
        &["explain", "--agent", "coder", "GET", "https://pypi.org/"],
        &["secret", "list"],
        &["ca", "cert"],
    ] {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let out = env
            .cmd(args)
            .stdout(full)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert_clean_failure(&out, &format!("{args:?} > /dev/full"));
        let err = stderr_of(&out);
        assert!(err.contains("cannot write to stdout"), "{args:?}: {err}");
    }
    // A reader that went away (`| head`).
    let mut child = env
        .cmd(&["token", "issue", "coder"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = stderr_of(&out);
    assert!(!err.contains("panicked"), "{err}");
    if !out.status.success() {
        assert!(err.contains("cannot write to stdout"), "{err}");
    }
}

#[test]
fn bad_command_line_input_never_panics() {
    let env = TestEnv::new("");
    let dir = env.dir.path();
    let cases: Vec<(&str, Command)> = vec![
        (
            "explain with a relative URL",
            env.cmd(&["explain", "--agent", "a", "GET", "not-a-url"]),
        ),
        (
            "explain with a broken URL",
            env.cmd(&["explain", "--agent", "a", "GET", "http://[::1"]),
        ),
        (
            "explain with a bad method",
            env.cmd(&[
                "explain",
                "--agent",
                "a",
                "BAD METHOD",
                "http://127.0.0.1:8080/x",
            ]),
        ),
        (
            "run with a missing config",
            bare(dir, &["-c", "/nonexistent/x.toml", "run"]),
        ),
        (
            "explain with a missing config",
            bare(
                dir,
                &[
                    "-c",
                    "/nonexistent/x.toml",
                    "explain",
                    "--agent",
                    "a",
                    "GET",
                    "http://h/",
                ],
            ),
        ),
        (
            "secret set with a bad name",
            env.cmd(&["secret", "set", "bad name"]),
        ),
        (
            "cert issue into a directory",
            env.cmd(&["cert", "issue", "coder", "--out", "certs/"]),
        ),
        (
            "cert issue into an existing directory",
            env.cmd(&["cert", "issue", "coder", "--out", "."]),
        ),
        (
            "secret rm with a bad name",
            env.cmd(&["secret", "rm", "../x"]),
        ),
        (
            "token issue with an absurd ttl",
            env.cmd(&[
                "token",
                "issue",
                "coder",
                "--ttl",
                "99999999999999999999999y",
            ]),
        ),
        (
            "token issue with a ttl over a year",
            env.cmd(&["token", "issue", "coder", "--ttl", "1000d"]),
        ),
        (
            "token revoke with a bad session",
            env.cmd(&["token", "revoke", "--session", "x y"]),
        ),
        (
            "ca cert with no state dir",
            bare(dir, &["--state-dir", "/nonexistent/state", "ca", "cert"]),
        ),
        (
            "init where the state dir cannot be",
            bare(dir, &["--state-dir", "/dev/null/state", "init"]),
        ),
        ("an unknown command", env.cmd(&["frobnicate"])),
        (
            "an unknown flag",
            env.cmd(&["token", "issue", "a", "--bogus"]),
        ),
        ("a missing argument", env.cmd(&["token", "issue"])),
        (
            "a flag without its value",
            env.cmd(&["token", "issue", "a", "--ttl"]),
        ),
        (
            "a bad listen address",
            env.cmd(&["run", "--listen", "nowhere"]),
        ),
    ];
    for (what, cmd) in cases {
        let mut cmd = cmd;
        cmd.env_remove("RUST_BACKTRACE");
        let out = output_within(cmd, Duration::from_secs(20));
        assert_one_line_failure(&out, what);
    }

    // Values on stdin that are not a secret.
    for (what, stdin) in [
        ("not UTF-8", vec![0xff, 0xfe]),
        ("over 1 MiB", vec![b'a'; 1024 * 1024 + 10]),
    ] {
        let mut cmd = env.cmd(&["secret", "set", "big"]);
        cmd.env_remove("RUST_BACKTRACE")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut input = child.stdin.take().unwrap();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            let _ = input.write_all(&stdin);
        });
        let out = child.wait_with_output().unwrap();
        let _ = writer.join();
        assert_one_line_failure(&out, &format!("secret set with a value {what}"));
    }
    assert!(
        !env.ok(&["secret", "list"], None).contains("big"),
        "a refused value was stored"
    );
}
