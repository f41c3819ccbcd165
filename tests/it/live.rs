use std::process::Command;
use std::time::Duration;

use crate::gateway::decode_claims;
use crate::support::*;

const WITHIN: Duration = Duration::from_secs(3);

fn bearer(upstream: &Upstream) -> Option<String> {
    upstream.last().header("authorization").map(str::to_string)
}

#[test]
fn a_rotated_store_secret_is_used_without_restart() {
    let upstream = Upstream::http();
    let env = TestEnv::new(&echo_route(&upstream, "store"));
    env.set_secret("api", "sk-old-value-1");
    let token = env.token("coder");
    let sidekey = env.spawn();
    let get = || {
        client()
            .get(sidekey.url("/echo/x"))
            .bearer_auth(&token)
            .send()
            .unwrap()
    };
    assert_eq!(get().status(), 200);
    assert_eq!(bearer(&upstream).as_deref(), Some("Bearer sk-old-value-1"));

    env.set_secret("api", "sk-new-value-2");
    eventually(WITHIN, || {
        assert_eq!(get().status(), 200);
        (bearer(&upstream).as_deref() == Some("Bearer sk-new-value-2")).then_some(())
    });
    let body = get().text().unwrap();
    assert_no_leak(&body, "sk-new-value-2", "response");
}

/// An upstream may have stored a value sidekey injected (a key listing, a
/// request log). Rotating or removing that secret does not make its old
/// value safe to show: it may still be valid at the provider.
#[test]
fn a_rotated_or_removed_value_is_still_scrubbed() {
    let upstream = Upstream::http();
    let env = TestEnv::new(&format!(
        r#"{}
[secrets.other]
source = "store"

[routes.other]
upstream = "{}"
allow_private = true
inject = {{ header = "x-api-key", secret = "other" }}

[[rules]]
agents = ["coder"]
route = "other"
action = "allow"
"#,
        echo_route(&upstream, "store"),
        upstream.base()
    ));
    let (old, new) = ("sk-old-value-7f3a9c", "sk-new-value-2d8e41");
    env.set_secret("api", old);
    env.set_secret("other", "sk-other-value-5b1c");
    let token = env.token("coder");
    let sidekey = env.spawn();
    let get = |path: &str| {
        // The agent token goes where the route's credential goes.
        let res = client()
            .get(sidekey.url(path))
            .header("authorization", format!("Bearer {token}"))
            .header("x-api-key", &token)
            .send()
            .unwrap();
        assert_eq!(res.status(), 200, "{path}");
        res.text().unwrap()
    };
    get("/echo/x");
    upstream.put(
        "/keys",
        "application/json",
        format!(r#"{{"keys":["{old}","{new}"]}}"#).into_bytes(),
    );
    let redacted = r#"{"keys":["[REDACTED]","[REDACTED]"]}"#;

    env.set_secret("api", new);
    eventually(WITHIN, || {
        get("/echo/x");
        (bearer(&upstream).as_deref() == Some(&format!("Bearer {new}"))).then_some(())
    });
    assert_eq!(get("/echo/keys"), redacted);
    assert_eq!(get("/other/keys"), redacted);

    // Removed: both values are still scrubbed on every route.
    env.ok(&["secret", "rm", "api"], None);
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(get("/other/keys"), redacted);
}

#[test]
fn a_rotated_file_secret_is_used_without_restart() {
    let upstream = Upstream::http();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "file-secret-one\n").unwrap();
    let env = TestEnv::new(&echo_route(&upstream, &format!("file:{}", file.display())));
    let token = env.token("coder");
    let sidekey = env.spawn();
    let get = || {
        client()
            .get(sidekey.url("/echo/x"))
            .bearer_auth(&token)
            .send()
            .unwrap()
    };
    assert_eq!(get().status(), 200);
    assert_eq!(bearer(&upstream).as_deref(), Some("Bearer file-secret-one"));

    // Rewritten in place, as an editor or a secret agent might.
    std::fs::write(&file, "file-secret-two-longer\n").unwrap();
    eventually(WITHIN, || {
        get();
        (bearer(&upstream).as_deref() == Some("Bearer file-secret-two-longer")).then_some(())
    });
    // Removed: fail closed.
    std::fs::remove_file(&file).unwrap();
    eventually(WITHIN, || (get().status() == 503).then_some(()));
}

#[test]
fn revocation_stops_the_next_request_on_an_open_keep_alive_connection() {
    let upstream = Upstream::http();
    let env = TestEnv::new(&echo_route(&upstream, "store"));
    env.set_secret("api", "sk-revoke-test");
    let token = env.token_with(&["coder", "--session", "run-1"]);
    let other = env.token_with(&["coder", "--session", "run-2"]);
    let sidekey = env.spawn();
    let mut conn = RawConn::connect(sidekey.addr);
    let request =
        format!("GET /echo/x HTTP/1.1\r\nHost: sidekey\r\nAuthorization: Bearer {token}\r\n\r\n");
    conn.send(&request);
    assert_eq!(conn.read_response().0, 200);

    env.ok(&["token", "revoke", "--session", "run-1"], None);
    let head = eventually(WITHIN, || {
        conn.send(&request);
        let (status, head, _) = conn.read_response();
        (status == 401).then_some(head)
    });
    assert!(head.contains("x-sidekey-error: token_revoked"), "{head}");
    let res = client()
        .get(sidekey.url("/echo/x"))
        .bearer_auth(&other)
        .send()
        .unwrap();
    assert_eq!(res.status(), 200, "another session is unaffected");

    // Revoking the agent covers every token issued so far, and survives restart.
    env.ok(&["token", "revoke", "--agent", "coder"], None);
    drop(sidekey);
    let sidekey = env.spawn();
    let res = client()
        .get(sidekey.url("/echo/x"))
        .bearer_auth(&other)
        .send()
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(res.headers()["x-sidekey-error"], "token_revoked");
    let fresh = env.token("coder");
    let res = client()
        .get(sidekey.url("/echo/x"))
        .bearer_auth(&fresh)
        .send()
        .unwrap();
    assert_eq!(
        res.status(),
        200,
        "a token issued after the revocation works"
    );
    let id = decode_claims(&fresh)["jti"].as_str().unwrap().to_string();
    assert!(
        !env.audit_text().contains(&fresh),
        "whole token in the audit log"
    );
    assert!(env.audit_text().contains(&id), "token id in the audit log");
}

#[test]
fn reload_refuses_a_broken_config_and_applies_a_valid_one() {
    let upstream = Upstream::http();
    let route = echo_route(&upstream, "store");
    let env = TestEnv::new(&route);
    env.set_secret("api", "sk-reload");
    let token = env.token("coder");
    let sidekey = env.spawn();
    let get = || {
        client()
            .get(sidekey.url("/echo/x"))
            .bearer_auth(&token)
            .send()
            .unwrap()
    };
    assert_eq!(get().status(), 200);

    // Broken via SIGHUP: refused, the old config keeps serving.
    env.write_config(&format!("{route}\n[[rules]]\nagents = []\n"));
    sidekey.signal("HUP");
    eventually(WITHIN, || {
        sidekey.stderr().contains("reload refused").then_some(())
    });
    assert_eq!(get().status(), 200);

    // Broken via `sidekey reload`: exit 1 with the problem, old config serving.
    let out = env.run(&["reload"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("rules[1]"));
    assert_eq!(get().status(), 200);

    // A valid change applies at once.
    env.write_config(&format!(
        "{route}\n[[rules]]\nagents = [\"coder\"]\nroute = \"echo\"\naction = \"deny\"\n"
    ));
    env.ok(&["reload"], None);
    let res = get();
    assert_eq!(res.status(), 403);
    assert_eq!(res.headers()["x-sidekey-error"], "policy_denied");
}

#[test]
fn sigterm_finishes_in_flight_requests_then_exits_zero() {
    let upstream = Upstream::http();
    let env = TestEnv::new(&echo_route(&upstream, "store"));
    env.set_secret("api", "sk-graceful");
    let token = env.token("coder");
    let mut sidekey = env.spawn();
    let addr = sidekey.addr;
    let mut res = client()
        .get(sidekey.url("/echo/sse"))
        .bearer_auth(&token)
        .send()
        .unwrap();
    let mut first = [0u8; 13];
    std::io::Read::read_exact(&mut res, &mut first).unwrap();
    assert_eq!(&first, b"data: first\n\n");

    sidekey.signal("TERM");
    eventually(WITHIN, || {
        std::net::TcpStream::connect(addr).is_err().then_some(())
    });
    upstream.release();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut res, &mut rest).unwrap();
    assert_eq!(rest, "data: second\n\n");
    assert_eq!(sidekey.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn sigterm_finishes_requests_in_flight_inside_intercepted_tunnels() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::https(dir.path());
    let env = tls_echo_env(&upstream, "store");
    env.set_secret("api", "sk-graceful-tunnel");
    let token = env.token("coder");
    let mut sidekey = env.spawn();
    let addr = sidekey.addr;
    let ca = env.path("sidekey-ca.pem");
    std::fs::write(&ca, env.ok(&["ca", "cert"], None)).unwrap();
    // Each version through a tunnel of its own, both waiting on an SSE
    // stream the upstream has begun.
    let agents: Vec<_> = ["--http1.1", "--http2"]
        .into_iter()
        .map(|version| {
            Command::new("curl")
                .args(["-sS", "-N", version, "--cacert"])
                .arg(&ca)
                .args(["-x", &format!("http://coder:{token}@{addr}")])
                .arg(format!("{}/sse", upstream.base()))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    eventually(WITHIN, || {
        (upstream
            .seen()
            .iter()
            .filter(|s| s.uri.ends_with("/sse"))
            .count()
            == 2)
            .then_some(())
    });

    sidekey.signal("TERM");
    eventually(WITHIN, || {
        std::net::TcpStream::connect(addr).is_err().then_some(())
    });
    // Longer than a tunnel may sit quiet while sidekey stops, had sidekey
    // taken it for a blind one.
    std::thread::sleep(Duration::from_millis(1500));
    upstream.release();
    upstream.release();
    for agent in agents {
        let out = agent.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(text, "data: first\n\ndata: second\n\n");
    }
    assert_eq!(sidekey.wait_exit(Duration::from_secs(10)), Some(0));
    let audited = env
        .audit()
        .into_iter()
        .filter(|r| r["mode"] == "intercept" && r["path"] == "/sse" && r["status"] == 200)
        .count();
    assert_eq!(audited, 2, "{}", env.audit_text());
}

#[test]
fn a_credential_process_is_run_and_renewed_before_its_value_expires() {
    let upstream = Upstream::http();
    // The expiry is printed with an offset of +01:00 (POSIX TZ "UTC-1", no
    // tzdata needed) and a fraction, as a process in another zone would.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("cred.sh");
    let count = dir.path().join("count");
    std::fs::write(&count, "0").unwrap();
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nn=$(cat {count})\necho $((n+1)) > {count}\n\
             printf '{{\"value\":\"proc-tok-%s\",\"expires_at\":\"%s\"}}' \"$n\" \"$(TZ=UTC-1 date -d '+32 seconds' +%Y-%m-%dT%H:%M:%S.%3N%:z)\"\n",
            count = count.display()
        ),
    )
    .unwrap();
    let env = TestEnv::new(&format!(
        "{}\n[secrets.broken]\nsource = \"exec:sh -c \\\"exit 3\\\"\"\n[routes.broken]\nupstream = \"{}\"\ninject = {{ header = \"authorization\", format = \"Bearer {{secret}}\", secret = \"broken\" }}\n[[rules]]\nagents = [\"coder\"]\nroute = \"broken\"\naction = \"allow\"\n",
        echo_route(&upstream, &format!("exec:sh {}", script.display())),
        upstream.base()
    ));
    let token = env.token("coder");
    let sidekey = env.spawn();
    let get = |path: &str| {
        client()
            .get(sidekey.url(path))
            .bearer_auth(&token)
            .send()
            .unwrap()
    };
    let res = get("/echo/x");
    assert_eq!(res.status(), 200);
    assert_eq!(bearer(&upstream).as_deref(), Some("Bearer proc-tok-0"));
    assert!(res.text().unwrap().contains("[REDACTED]"));
    // Within the 30 s renewal margin, the process runs again.
    eventually(Duration::from_secs(10), || {
        get("/echo/x");
        (bearer(&upstream).as_deref() == Some("Bearer proc-tok-1")).then_some(())
    });
    let res = get("/broken/x");
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["x-sidekey-error"], "secret_unavailable");
    assert!(
        !sidekey.stderr().contains("proc-tok-"),
        "a value reached the log"
    );
}

#[test]
fn a_credential_process_that_fails_is_retried_and_one_that_hangs_delays_no_other_secret() {
    let upstream = Upstream::http();
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let (script, runs, ok) = (path("cred.sh"), path("runs"), path("ok"));
    // Fails until `ok` exists; then answers once with a value due for
    // renewal at once (31 s, inside the 30 s margin); every later run
    // hangs until its deadline.
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho run >> {runs}\n[ -e {ok} ] || exit 1\n\
             if [ -e {ok}.answered ]; then sleep 60; fi\ntouch {ok}.answered\n\
             printf '{{\"value\":\"proc-tok\",\"expires_at\":\"%s\"}}' \"$(date -u -d '+31 seconds' +%Y-%m-%dT%H:%M:%SZ)\"\n",
            runs = runs.display(),
            ok = ok.display(),
        ),
    )
    .unwrap();
    let env = TestEnv::new(&format!(
        r#"{}
[secrets.other]
source = "store"
[routes.other]
upstream = "{}"
inject = {{ header = "authorization", format = "Bearer {{secret}}", secret = "other" }}
[[rules]]
agents = ["coder"]
route = "other"
action = "allow"
"#,
        echo_route(&upstream, &format!("exec:sh {}", script.display())),
        upstream.base()
    ));
    env.set_secret("other", "other-1");
    let token = env.token("coder");
    let sidekey = env.spawn();
    let get = |path: &str| {
        client()
            .get(sidekey.url(path))
            .bearer_auth(&token)
            .send()
            .unwrap()
            .status()
    };
    let run_count = || {
        std::fs::read_to_string(&runs)
            .unwrap_or_default()
            .lines()
            .count()
    };
    // The process failed at start: fail closed, and tried again on its own
    // once it works, without a reload.
    assert_eq!(get("/echo/x"), 503);
    std::fs::write(&ok, "").unwrap();
    eventually(Duration::from_secs(15), || {
        (get("/echo/x") == 200).then_some(())
    });
    assert_eq!(bearer(&upstream).as_deref(), Some("Bearer proc-tok"));

    // Its renewal is due and hangs. A store change still takes effect at
    // once, and does not run the process again.
    eventually(Duration::from_secs(10), || {
        (run_count() >= 3 && path("ok.answered").exists()).then_some(())
    });
    let runs_before = run_count();
    env.set_secret("other", "other-2");
    eventually(Duration::from_secs(2), || {
        assert_eq!(get("/other/x"), 200);
        (bearer(&upstream).as_deref() == Some("Bearer other-2")).then_some(())
    });
    assert_eq!(run_count(), runs_before, "a store change ran the process");
    // Meanwhile the process's value, still valid, is served.
    assert_eq!(get("/echo/x"), 200);
    assert_eq!(bearer(&upstream).as_deref(), Some("Bearer proc-tok"));
}

#[test]
fn a_credential_process_that_keeps_failing_is_retried_less_and_less_often() {
    let upstream = Upstream::http();
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let script = dir.path().join("cred.sh");
    std::fs::write(
        &script,
        format!("#!/bin/sh\necho run >> {}\nexit 1\n", runs.display()),
    )
    .unwrap();
    let env = TestEnv::new(&echo_route(
        &upstream,
        &format!("exec:sh {}", script.display()),
    ));
    let sidekey = env.spawn();
    let started = std::time::Instant::now();
    let run_count = || {
        std::fs::read_to_string(&runs)
            .unwrap_or_default()
            .lines()
            .count()
    };
    // At start, then 5 s later, then 10 s after that: two runs in the
    // first 13 s, not one every 5 s.
    eventually(Duration::from_secs(10), || (run_count() >= 2).then_some(()));
    std::thread::sleep(Duration::from_secs(13).saturating_sub(started.elapsed()));
    assert_eq!(run_count(), 2, "{}", sidekey.stderr());
}

/// An `exec:` credential process that answers at once the first time and
/// holds every later run (a reload's) until the test releases it.
struct HeldCredentialProcess {
    _dir: tempfile::TempDir,
    script: std::path::PathBuf,
    /// Made by a held run once it has started; holds its pid.
    waiting: std::path::PathBuf,
    /// Made by the test to let a held run answer.
    release: std::path::PathBuf,
}

impl HeldCredentialProcess {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = |name| dir.path().join(name);
        let (script, loaded, waiting, release) = (
            path("cred.sh"),
            path("loaded"),
            path("waiting"),
            path("release"),
        );
        std::fs::write(
            &script,
            format!(
                // Held while the test's dir exists, so none outlives the test.
                "#!/bin/sh\nif [ -e {loaded} ]; then\n  echo $$ > {waiting}.new; mv {waiting}.new {waiting}\n  while [ ! -e {release} ] && [ -e {loaded} ]; do sleep 0.05; done\n  printf proc-tok-reloaded; exit 0\nfi\ntouch {loaded}\nprintf proc-tok-first\n",
                loaded = loaded.display(),
                waiting = waiting.display(),
                release = release.display(),
            ),
        )
        .unwrap();
        Self {
            _dir: dir,
            script,
            waiting,
            release,
        }
    }

    /// The secret source that runs it.
    fn source(&self) -> String {
        format!("exec:sh {}", self.script.display())
    }
}

/// A reload runs the credential processes again, and one may take seconds
/// (a token broker, `gh auth token` on a slow network). On the one-thread
/// runtime of a pinned sidecar a reload that waited on it in place would
/// stall every agent; here the process holds each reload until the test
/// releases it, and requests must be answered meanwhile.
#[test]
fn agents_are_served_while_a_reload_waits_on_a_credential_process() {
    let upstream = Upstream::http();
    let process = HeldCredentialProcess::new();
    let (waiting, release) = (&process.waiting, &process.release);
    let env = TestEnv::new(&echo_route(&upstream, &process.source()));
    let token = env.token("coder");
    let sidekey = env.spawn();
    // Well under the process's 10 s deadline, after which a stalled runtime
    // would answer again.
    let quick = client_with_timeout(Duration::from_secs(5));
    let get = || {
        quick
            .get(sidekey.url("/echo/x"))
            .bearer_auth(&token)
            .send()
            .expect("a request while the reload waits")
            .status()
    };
    assert_eq!(get(), 200);
    assert_eq!(bearer(&upstream).as_deref(), Some("Bearer proc-tok-first"));

    // SIGHUP, then `sidekey reload` (the admin socket): both wait on the process.
    let held = |trigger: &dyn Fn()| {
        let _ = std::fs::remove_file(waiting);
        let _ = std::fs::remove_file(release);
        assert_eq!(get(), 200);
        let before = bearer(&upstream);
        trigger();
        eventually(WITHIN, || waiting.exists().then_some(()));
        for _ in 0..3 {
            assert_eq!(get(), 200);
        }
        // The version in force until the reload completes.
        assert_eq!(bearer(&upstream), before);
        std::fs::write(release, "").unwrap();
    };
    held(&|| sidekey.signal("HUP"));
    eventually(WITHIN, || {
        get();
        (bearer(&upstream).as_deref() == Some("Bearer proc-tok-reloaded")).then_some(())
    });

    std::thread::scope(|scope| {
        let reload = scope.spawn(|| env.run(&["reload"], None));
        held(&|| {});
        let out = reload.join().unwrap();
        assert!(
            out.status.success(),
            "sidekey reload: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    assert_eq!(get(), 200);
}

/// A stop asked for while a reload waits on a credential process starts at
/// once: the listener closes, the process (here held for good) is ended
/// rather than left behind, and sidekey exits.
#[test]
fn a_stop_does_not_wait_for_a_reload_held_by_a_credential_process() {
    let upstream = Upstream::http();
    let process = HeldCredentialProcess::new();
    let env = TestEnv::new(&echo_route(&upstream, &process.source()));
    let mut sidekey = env.spawn();
    sidekey.signal("HUP");
    let pid = eventually(WITHIN, || {
        std::fs::read_to_string(&process.waiting)
            .ok()
            .map(|pid| pid.trim().to_string())
    });
    sidekey.signal("TERM");
    // The credential process's deadline is 10 s, after which the reload
    // would end and the stop begin anyway.
    eventually(WITHIN, || {
        std::net::TcpStream::connect(sidekey.addr)
            .is_err()
            .then_some(())
    });
    assert_eq!(sidekey.wait_exit(Duration::from_secs(20)), Some(0));
    // Gone, or a zombie waiting for whoever adopted it to reap it.
    eventually(WITHIN, || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next());
        matches!(state, None | Some("Z")).then_some(())
    });
}
