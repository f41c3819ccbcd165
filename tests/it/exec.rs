//! `sidekey exec`: real clients (curl, Python requests and httpx, git, pip)
//! inside the command reach upstreams through the proxy started for it;
//! the command, playing a hostile agent, tries to read the secret from its
//! environment, sidekey's `/proc` files and memory, and the state dir; with
//! `--isolate` it also tries to go around the proxy.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

const SECRET: &str = "sk-exec-secret-7f3a9c41d2";
const FILE_SECRET: &str = "file-secret-e81b07c6a5";

/// A gateway route to `upstream` with the secret from sidekey's own
/// environment, and a second secret in a file.
fn exec_env(upstream: &Upstream, extra: &str) -> TestEnv {
    let env = TestEnv::new(&format!(
        r#"
[secrets.api]
source = "env:SK_TEST_API_KEY"

[secrets.filed]
source = "file:filed-secret.txt"

[routes.echo]
upstream = "{}"
allow_private = true
inject = {{ header = "authorization", format = "Bearer {{secret}}", secret = "api" }}
placeholder_env = "ECHO_API_KEY"

[[rules]]
agents = ["coder"]
route = "echo"
action = "allow"
{extra}
"#,
        upstream.base()
    ));
    std::fs::write(env.dir.path().join("filed-secret.txt"), FILE_SECRET).unwrap();
    std::fs::create_dir_all(work_dir(&env)).unwrap();
    env
}

fn work_dir(env: &TestEnv) -> PathBuf {
    env.dir.path().join("work")
}

/// `sidekey exec --agent coder FLAGS -- sh -c SCRIPT` in the work dir, with
/// the secret in sidekey's environment (and a copy under another name).
fn exec_cmd(env: &TestEnv, flags: &[&str], script: &str) -> Command {
    exec_cmd_as(env, &[], flags, script)
}

/// [`exec_cmd`] under a wrapper (`setpriv` to run as another user).
fn exec_cmd_as(env: &TestEnv, wrapper: &[&str], flags: &[&str], script: &str) -> Command {
    let mut args = vec!["exec", "--agent", "coder"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--", "sh", "-c", script]);
    let mut cmd = env.cmd_wrapped(wrapper, &args);
    cmd.current_dir(work_dir(env))
        .env("SK_TEST_API_KEY", SECRET)
        .env("INNOCENT_LOOKING", format!("prefix-{SECRET}-suffix"))
        .env("NO_PROXY", "*")
        .env("HOME", work_dir(env))
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs to the end (at most 120 s) and returns the output.
fn exec(env: &TestEnv, flags: &[&str], script: &str) -> Output {
    let child = exec_cmd(env, flags, script).spawn().unwrap();
    wait_output(child, Duration::from_secs(120))
}

fn wait_output(mut child: Child, within: Duration) -> Output {
    let deadline = Instant::now() + within;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "sidekey exec did not finish:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_success(out: &Output) {
    assert!(out.status.success(), "exec failed:\n{}", describe(out));
}

/// Every file under `dir`, as bytes.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(files_under(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            found.push((path, bytes));
        }
    }
    found
}

fn assert_no_secret_under(dir: &Path) {
    for (path, bytes) in files_under(dir) {
        for secret in [SECRET, FILE_SECRET] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{} holds a secret:\n{}",
                path.display(),
                String::from_utf8_lossy(&bytes)
            );
        }
    }
}

fn auths_seen(upstream: &Upstream, path: &str) -> Vec<String> {
    upstream
        .seen()
        .iter()
        .filter(|s| s.uri.ends_with(path))
        .map(|s| s.header("authorization").unwrap_or_default().to_string())
        .collect()
}

#[test]
fn curl_requests_and_httpx_reach_the_upstream_with_the_token_in_place_of_the_secret() {
    let upstream = Upstream::http();
    let env = exec_env(&upstream, "");
    let port = upstream.addr.port();
    let script = format!(
        r#"set -e
env > env.txt
curl -sS -o curl.json http://127.0.0.1:{port}/by-curl
curl -sS -o gateway.json -H "authorization: Bearer $ECHO_API_KEY" "$SIDEKEY_ECHO_URL/by-gateway"
python3 -c 'import requests; r = requests.get("http://127.0.0.1:{port}/by-requests"); open("requests.json", "w").write(r.text); assert r.ok'
python3 -c 'import httpx; r = httpx.get("http://127.0.0.1:{port}/by-httpx"); open("httpx.json", "w").write(r.text); assert r.is_success'
"#
    );
    let out = exec(&env, &[], &script);
    assert_success(&out);

    // Each client's request arrived with the real credential…
    for path in ["/by-curl", "/by-gateway", "/by-requests", "/by-httpx"] {
        assert_eq!(
            auths_seen(&upstream, path),
            vec![format!("Bearer {SECRET}")],
            "{path}"
        );
    }
    // …and nothing the command kept holds it: the echoes were scrubbed, the
    // environment had only the token.
    assert_no_secret_under(&work_dir(&env));
    let env_txt = read(&work_dir(&env).join("env.txt"));
    for var in [
        "HTTP_PROXY=",
        "https_proxy=",
        "SSL_CERT_FILE=",
        "SIDEKEY_ECHO_URL=",
    ] {
        assert!(env_txt.contains(var), "{var} missing:\n{env_txt}");
    }
    for var in [
        "SK_TEST_API_KEY=",
        "INNOCENT_LOOKING=",
        "NO_PROXY=",
        "SIDEKEY_MASTER_KEY=",
    ] {
        assert!(!env_txt.contains(var), "{var} present:\n{env_txt}");
    }
    let placeholder = env_txt
        .lines()
        .find_map(|l| l.strip_prefix("ECHO_API_KEY="))
        .expect("the placeholder is set");
    assert!(
        placeholder.starts_with("eyJ"),
        "the placeholder is the agent token"
    );
    let echoed = read(&work_dir(&env).join("curl.json"));
    assert!(
        echoed.contains("[REDACTED]"),
        "the echo was scrubbed: {echoed}"
    );
    let audited = env
        .audit()
        .iter()
        .filter(|r| r["agent"] == "coder" && r["decision"] == "allow")
        .count();
    assert_eq!(audited, 4, "one audit record per request");
}

#[test]
fn git_clone_and_pip_download_work_through_the_proxy() {
    let git = GitServer::start("x-access-token", SECRET);
    let index_dir = tempfile::tempdir().unwrap();
    let index = Upstream::https(index_dir.path());
    let wheel = build_wheel(index_dir.path());
    let wheel_name = "sidekey_probe-1.0-py3-none-any.whl";
    index.put(
        "/simple/sidekey-probe/",
        "text/html",
        format!("<html><body><a href=\"/files/{wheel_name}\">{wheel_name}</a></body></html>")
            .into_bytes(),
    );
    index.put(
        &format!("/files/{wheel_name}"),
        "application/octet-stream",
        wheel,
    );
    let extra = format!(
        r#"
[tls]
upstream_ca = ["{git_ca}", "{index_ca}"]

[routes.git]
upstream = "{git}"
allow_private = true
inject = {{ basic = {{ username = "x-access-token", secret = "api" }} }}

[routes.index]
upstream = "https://localhost:{index_port}"
allow_private = true
inject = {{ basic = {{ username = "__token__", secret = "api" }} }}

[[rules]]
agents = ["coder"]
route = "git"
paths = ["/acme/app.git/**"]
action = "allow"

[[rules]]
agents = ["coder"]
route = "index"
methods = ["GET"]
action = "allow"
"#,
        git_ca = git.ca_path.display(),
        index_ca = index.ca.as_ref().unwrap().display(),
        git = git.base(),
        index_port = index.addr.port(),
    );
    let upstream = Upstream::http();
    let env = exec_env(&upstream, &extra);
    let script = format!(
        r#"set -e
git clone -q {git}/acme/app.git app
python3 -m pip download --quiet --no-deps --disable-pip-version-check --no-cache-dir \
    --index-url https://localhost:{index_port}/simple/ -d downloads sidekey-probe
"#,
        git = git.base(),
        index_port = index.addr.port(),
    );
    let out = exec(&env, &[], &script);
    assert_success(&out);
    assert_eq!(
        read(&work_dir(&env).join("app/README.md")),
        "initial\n",
        "the clone has the repo's file"
    );
    assert!(
        work_dir(&env).join("downloads").join(wheel_name).exists(),
        "pip downloaded the wheel:\n{}",
        describe(&out)
    );
    let basic = |user: &str| {
        use base64::Engine;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{SECRET}"))
        )
    };
    let index_auths = auths_seen(&index, &format!("/files/{wheel_name}"));
    assert_eq!(index_auths, vec![basic("__token__")]);
    assert!(git.log().contains("git-upload-pack"), "{}", git.log());
    // The clone's config and everything else the command wrote hold no secret.
    assert_no_secret_under(&work_dir(&env));
}

/// A minimal valid wheel for `sidekey-probe` 1.0.
fn build_wheel(dir: &Path) -> Vec<u8> {
    let path = dir.join("probe.whl");
    python(
        r#"
import sys, zipfile
with zipfile.ZipFile(sys.argv[1], "w") as z:
    z.writestr("sidekey_probe/__init__.py", "")
    z.writestr("sidekey_probe-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: sidekey-probe\nVersion: 1.0\n")
    z.writestr("sidekey_probe-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    z.writestr("sidekey_probe-1.0.dist-info/RECORD", "")
"#,
        &[&path.display().to_string()],
    );
    std::fs::read(&path).unwrap()
}

/// Reads every readable mapping of `/proc/PID/mem` and `/proc/PID/environ`
/// into files; records each refusal.
const PROBE: &str = r#"
import sys
pid, out = sys.argv[1], sys.argv[2]
with open(out + ".log", "a") as log:
    try:
        data = open(f"/proc/{pid}/environ", "rb").read()
        open(out + ".environ", "wb").write(data)
        log.write("environ read\n")
    except OSError as e:
        log.write(f"environ refused: {e}\n")
    try:
        maps = open(f"/proc/{pid}/maps").read().splitlines()
        mem = open(f"/proc/{pid}/mem", "rb")
        dump = open(out + ".mem", "wb")
        for line in maps:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            try:
                mem.seek(start)
                dump.write(mem.read(end - start))
            except (OSError, ValueError, OverflowError):
                pass
        log.write("mem read\n")
    except OSError as e:
        log.write(f"mem refused: {e}\n")
"#;

#[test]
fn the_command_cannot_read_the_secret_from_sidekey_or_its_state_dir() {
    let upstream = Upstream::http();
    let env = exec_env(&upstream, "");
    std::fs::write(work_dir(&env).join("probe.py"), PROBE).unwrap();
    let script = format!(
        r#"supervisor=$PPID
sidekey=$(awk '{{print $4}}' /proc/$supervisor/stat)
python3 probe.py $sidekey sidekey
python3 probe.py $supervisor supervisor
grep -r -a -l '{SECRET}' {state} > grep.txt
cp -r {state} state-copy 2>/dev/null
curl -sS -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{port}/works > status.txt
exit 0
"#,
        state = env.state.display(),
        port = upstream.addr.port()
    );
    let out = exec(&env, &[], &script);
    assert_success(&out);
    assert_eq!(read(&work_dir(&env).join("status.txt")), "200");
    assert_no_secret_under(&work_dir(&env));
    // Refused by the kernel, not merely empty: sidekey and its supervisor
    // are not dumpable and the command holds no capability.
    for who in ["sidekey", "supervisor"] {
        let log = read(&work_dir(&env).join(format!("{who}.log")));
        assert!(log.contains("environ refused"), "{who}: {log}");
        assert!(log.contains("mem refused"), "{who}: {log}");
    }
    assert_eq!(read(&work_dir(&env).join("grep.txt")), "");
}

#[test]
fn the_exit_status_passes_through_and_the_token_dies_with_the_command() {
    let upstream = Upstream::http();
    let env = exec_env(&upstream, "");
    let out = exec(&env, &[], "echo \"$ECHO_API_KEY\" > token.txt; exit 7");
    assert_eq!(out.status.code(), Some(7), "{}", describe(&out));
    let out = exec(&env, &[], "kill -USR1 $$");
    assert_eq!(
        out.status.code(),
        Some(128 + 10),
        "death by signal is 128+N"
    );

    let token = read(&work_dir(&env).join("token.txt")).trim().to_string();
    assert!(token.starts_with("eyJ"));
    // A proxy on the same state dir refuses the session's token.
    let sidekey = env.spawn();
    let (status, body) = curl(&[
        &sidekey.url("/echo/after"),
        "-H",
        &format!("authorization: Bearer {token}"),
    ]);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("token_revoked"), "{body}");
    assert!(auths_seen(&upstream, "/after").is_empty());

    let out = exec(&env, &[], "exit 0");
    assert_success(&out);
    let missing = env.run(
        &["exec", "--agent", "coder", "--", "no-such-command-x"],
        None,
    );
    assert_eq!(missing.status.code(), Some(127), "{}", describe(&missing));

    // A revocation list that cannot take the session's revocation at the
    // end: the command does not start.
    std::fs::write(env.state.join("revocations.json"), "{ damaged").unwrap();
    let out = exec(&env, &[], "touch ran.txt");
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot start"));
    assert!(!work_dir(&env).join("ran.txt").exists(), "the command ran");
}

/// Every command revokes its session: the list keeps it only until the
/// session's token would have expired, so a host that runs many commands
/// does not grow the list (read and rewritten whole on each revocation)
/// for ever. Revocations made by hand stay, and a session name that would
/// leave the list early cannot be given to a token by hand.
#[test]
fn the_revocation_list_drops_command_sessions_once_their_tokens_expire() {
    let upstream = Upstream::http();
    let env = exec_env(&upstream, "");
    let list = env.state.join("revocations.json");
    std::fs::write(
        &list,
        r#"{"ids": ["t-by-hand"], "sessions": ["s-by-hand", "exec-1000-6c6f6e6720676f6e65"]}"#,
    )
    .unwrap();
    let started_ms = now_ms();
    for _ in 0..3 {
        assert_success(&exec(&env, &["--ttl", "2h"], "exit 0"));
    }
    let after: serde_json::Value = serde_json::from_str(&read(&list)).unwrap();
    assert_eq!(after["ids"], serde_json::json!(["t-by-hand"]), "{after}");
    let sessions: Vec<&str> = after["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(sessions.contains(&"s-by-hand"), "{after}");
    let commands: Vec<&str> = sessions
        .into_iter()
        .filter(|s| s.starts_with("exec-"))
        .collect();
    assert_eq!(
        commands.len(),
        3,
        "the long-expired one dropped, one per command: {after}"
    );
    let two_hours_ms = 2 * 3600 * 1000;
    for session in commands {
        let expires: u64 = session.split('-').nth(1).unwrap().parse().unwrap();
        assert!(
            expires > started_ms + two_hours_ms && expires <= now_ms() + two_hours_ms + 2_000,
            "named for its token's expiry: {session}"
        );
    }

    let out = env.run(
        &[
            "token",
            "issue",
            "coder",
            "--session",
            "exec-99999999999999-x",
        ],
        None,
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("reserved for sidekey exec"),
        "{}",
        describe(&out)
    );
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn signals_reach_the_command_and_nothing_is_left_behind() {
    let upstream = Upstream::http();
    let env = exec_env(&upstream, "");
    for (flags, signal, name) in [
        (&[][..], "TERM", "SIGTERM"),
        (&[], "INT", "SIGINT"),
        // Through the sandbox's own process and its PID 1 too.
        (&["--isolate"], "TERM", "SIGTERM, isolated"),
    ] {
        let tag = format!("{signal}{}", flags.len());
        let marker = work_dir(&env).join(format!("{tag}.got"));
        let ready = work_dir(&env).join(format!("{tag}.ready"));
        let background = work_dir(&env).join(format!("{tag}.bg"));
        let script = format!(
            r#"trap 'echo caught > {marker}; exit 42' {signal}
sleep 300 &
echo $! > {background}
touch {ready}
while :; do sleep 0.05; done
"#,
            marker = marker.display(),
            background = background.display(),
            ready = ready.display(),
        );
        let child = exec_cmd(&env, flags, &script).spawn().unwrap();
        eventually(Duration::from_secs(20), || ready.exists().then_some(()));
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let out = wait_output(child, Duration::from_secs(20));
        assert_eq!(out.status.code(), Some(42), "{name}: {}", describe(&out));
        assert_eq!(read(&marker), "caught\n", "{name} reached the command");
        if !flags.is_empty() {
            // Its pid is the sandbox's own; the kernel ends everything in
            // there with its PID 1.
            continue;
        }
        let orphan = read(&background).trim().to_string();
        assert!(!orphan.is_empty());
        let alive = std::fs::read_to_string(format!("/proc/{orphan}/stat"))
            .is_ok_and(|stat| !stat.contains(") Z "));
        assert!(
            !alive,
            "the background `sleep` ({orphan}) outlived the command"
        );
    }
}

#[test]
fn isolate_leaves_only_the_proxy_reachable_and_hides_the_state_dir_and_secret_files() {
    let upstream = Upstream::http();
    let env = exec_env(&upstream, "");
    let port = upstream.addr.port();
    let script = format!(
        r#"curl -sS -m 5 --noproxy '*' http://127.0.0.1:{port}/direct > direct.txt 2>&1; echo "direct=$?" > results.txt
curl -sS -m 5 http://127.0.0.1:{port}/proxied > proxied.json; echo "proxied=$?" >> results.txt
umount {state} 2>/dev/null
ls -A {state} > state-listing.txt
unshare -Um sh -c 'umount {state}; ls -A {state}' > nested-listing.txt 2>/dev/null
cat {secret_file} > secret-file.txt
cat /proc/1/cmdline | tr '\0' ' ' > pid1.txt
for p in /proc/[0-9]*; do tr '\0' ' ' < $p/cmdline; echo; done > processes.txt
exit 0
"#,
        state = env.state.display(),
        secret_file = env.dir.path().join("filed-secret.txt").display(),
    );
    let out = exec(&env, &["--isolate"], &script);
    assert_success(&out);
    let results = read(&work_dir(&env).join("results.txt"));
    assert!(results.contains("proxied=0"), "{results}");
    assert!(
        !results.contains("direct=0"),
        "a direct connection got out: {results}"
    );
    assert_eq!(
        auths_seen(&upstream, "/proxied"),
        vec![format!("Bearer {SECRET}")]
    );
    assert!(auths_seen(&upstream, "/direct").is_empty());
    // Empty, and it stays so: the command can unmount nothing, not even
    // from a user namespace of its own.
    assert_eq!(
        read(&work_dir(&env).join("state-listing.txt")),
        "",
        "the state dir looks empty"
    );
    assert_eq!(read(&work_dir(&env).join("nested-listing.txt")), "");
    assert_eq!(
        read(&work_dir(&env).join("secret-file.txt")),
        "",
        "the secret file reads empty"
    );
    // A PID namespace of its own: PID 1 is the sandbox's supervisor and no
    // process outside (sidekey, the test) is visible.
    assert!(read(&work_dir(&env).join("pid1.txt")).contains("__supervise"));
    let processes = read(&work_dir(&env).join("processes.txt"));
    assert!(
        !processes.contains("--agent"),
        "sidekey is visible:\n{processes}"
    );
    assert_no_secret_under(&work_dir(&env));
    // The state dir itself is untouched outside.
    assert!(env.state.join("token-signing.key").exists());
}

#[test]
fn isolate_keeps_a_secret_file_hidden_when_it_is_replaced_by_rename() {
    let upstream = Upstream::http();
    // A directory of secrets, as Docker and Kubernetes mount them.
    let env = exec_env(
        &upstream,
        "[secrets.mounted]\nsource = \"file:run-secrets/token\"\n",
    );
    let dir = env.dir.path().join("run-secrets");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("token");
    std::fs::write(&file, FILE_SECRET).unwrap();
    let work = work_dir(&env);
    let script = format!(
        r#"cat {file} > before.txt 2>&1
touch ready
while [ ! -e rotated ]; do sleep 0.05; done
cat {file} > after.txt 2>&1
ls -A {dir} > listing.txt 2>&1
exit 0
"#,
        file = file.display(),
        dir = dir.display(),
    );
    let child = exec_cmd(&env, &["--isolate"], &script).spawn().unwrap();
    eventually(Duration::from_secs(20), || {
        work.join("ready").exists().then_some(())
    });
    // An atomic write: the new version renamed over the old.
    const ROTATED: &str = "rotated-secret-77c1d0";
    std::fs::write(dir.join(".token.new"), ROTATED).unwrap();
    std::fs::rename(dir.join(".token.new"), &file).unwrap();
    std::fs::write(work.join("rotated"), "").unwrap();
    let out = wait_output(child, Duration::from_secs(20));
    assert_success(&out);
    for name in ["before.txt", "after.txt", "listing.txt"] {
        let text = read(&work.join(name));
        assert!(
            !text.contains(FILE_SECRET) && !text.contains(ROTATED),
            "{name}: {text}"
        );
    }
    assert_eq!(
        read(&work.join("listing.txt")),
        "",
        "the directory looks empty"
    );
    assert_no_secret_under(&work);
    assert_eq!(read(&file), ROTATED, "outside, the file is as written");
}

#[test]
fn isolate_reports_a_kernel_refusal_and_never_runs_unisolated() {
    let upstream = Upstream::http();
    let env = exec_env(&upstream, "");
    // Nest user namespaces to the kernel's depth limit, so the sandbox's own
    // is one too many.
    let nests = |depth: usize| {
        let mut cmd = Command::new("unshare");
        for _ in 1..depth {
            cmd.arg("-Ur").arg("unshare");
        }
        cmd.arg("-Ur");
        cmd
    };
    let depth = (1..=40)
        .find(|&d| {
            !nests(d)
                .arg("true")
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .expect("user namespaces nest only so deep")
        - 1;
    let marker = work_dir(&env).join("ran");
    let exec = exec_cmd(&env, &["--isolate"], &format!("touch {}", marker.display()));
    let mut cmd = if depth == 0 {
        exec
    } else {
        let mut cmd = nests(depth);
        cmd.arg(exec.get_program()).args(exec.get_args());
        for (k, v) in exec.get_envs() {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        cmd.current_dir(work_dir(&env));
        cmd
    };
    let out = wait_output(
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        Duration::from_secs(60),
    );
    assert!(!out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .contains("--isolate: the kernel refused new user, mount, network and PID namespaces"),
        "{stderr}"
    );
    assert!(!marker.exists(), "the command ran without isolation");
}

#[test]
fn isolate_works_for_an_unprivileged_user() {
    // Run as root, the suite can show it for `nobody` too; run as a user,
    // every other isolate test already does.
    let uid = Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return;
    }
    let upstream = Upstream::http();
    let env = exec_env(&upstream, "");
    let status = Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(env.dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    let script = format!(
        r#"curl -sS -m 5 http://127.0.0.1:{port}/as-nobody > proxied.json; echo "proxied=$?" > results.txt
ls -A {state} > state-listing.txt
"#,
        port = upstream.addr.port(),
        state = env.state.display(),
    );
    let nobody = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ];
    let child = exec_cmd_as(&env, &nobody, &["--isolate"], &script)
        .spawn()
        .unwrap();
    let out = wait_output(child, Duration::from_secs(60));
    assert_success(&out);
    assert_eq!(read(&work_dir(&env).join("results.txt")), "proxied=0\n");
    assert_eq!(read(&work_dir(&env).join("state-listing.txt")), "");
    assert_eq!(
        auths_seen(&upstream, "/as-nobody"),
        vec![format!("Bearer {SECRET}")]
    );
}
