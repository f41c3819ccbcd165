use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use crate::support::*;

const SECRET: &str = "sk-live-admin-31f";

fn admin_get(env: &TestEnv, path: &str) -> String {
    admin_curl(env, path, &[])
}

fn admin_curl(env: &TestEnv, path: &str, args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--unix-socket"])
        .arg(env.state.join("admin.sock"))
        .args(args)
        .arg(format!("http://sidekey{path}"))
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn status_and_metrics_count_the_traffic_sent() {
    let upstream = Upstream::http();
    let env = TestEnv::new(&format!(
        "{}\n[[rules]]\nagents = [\"*\"]\nroute = \"echo\"\npaths = [\"/admin/**\"]\naction = \"deny\"\n",
        echo_route(&upstream, "store")
    ));
    env.set_secret("api", SECRET);
    let token = env.token("coder");
    let sidekey = env.spawn();
    let mode = std::fs::metadata(env.state.join("admin.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let c = client();
    for _ in 0..3 {
        assert_eq!(
            c.get(sidekey.url("/echo/ok"))
                .bearer_auth(&token)
                .send()
                .unwrap()
                .status(),
            200
        );
    }
    for _ in 0..2 {
        assert_eq!(c.get(sidekey.url("/echo/ok")).send().unwrap().status(), 401);
    }
    assert_eq!(
        c.get(sidekey.url("/echo/admin/x"))
            .bearer_auth(&token)
            .send()
            .unwrap()
            .status(),
        403
    );

    let status: serde_json::Value = serde_json::from_str(&env.ok(&["status"], None)).unwrap();
    assert_eq!(status["requests"]["allow"], 3, "{status}");
    assert_eq!(status["requests"]["deny"], 3, "{status}");
    assert!(status["uptime_secs"].is_u64());
    assert!(status["open_connections"].is_i64() || status["open_connections"].is_u64());

    // The classic text format a scraper gets without asking: every sample
    // in a family of its own type.
    let text = admin_get(&env, "/metrics");
    let types = python(
        "from prometheus_client.parser import text_string_to_metric_families\n\
         print(json.dumps({f.name: f.type for f in text_string_to_metric_families(sys.argv[1])}))",
        &[&text],
    );
    let types: serde_json::Value = serde_json::from_str(&types).unwrap();
    assert_eq!(types["sidekey_requests"], "counter", "{types}");
    assert_eq!(
        types["sidekey_request_duration_seconds"], "histogram",
        "{types}"
    );
    assert!(
        !types.as_object().unwrap().values().any(|t| t == "unknown"),
        "{types}"
    );
    // OpenMetrics when asked for, as Prometheus does.
    let open = admin_curl(
        &env,
        "/metrics",
        &["-H", "Accept: application/openmetrics-text; version=1.0.0"],
    );
    assert!(open.ends_with("# EOF\n"), "{open}");
    python(
        "from prometheus_client.openmetrics.parser import text_string_to_metric_families\n\
         assert any(f.name == 'sidekey_requests' and f.type == 'counter' and f.samples\n\
         \x20          for f in text_string_to_metric_families(sys.argv[1]))",
        &[&open],
    );
    let parsed = python(
        "from prometheus_client.parser import text_string_to_metric_families\n\
         out = {}\n\
         for family in text_string_to_metric_families(sys.argv[1]):\n\
         \x20   for s in family.samples:\n\
         \x20       key = s.name + ''.join(sorted(f'|{k}={v}' for k, v in s.labels.items() if k != 'le'))\n\
         \x20       if 'le' in s.labels: continue\n\
         \x20       out[key] = s.value\n\
         print(json.dumps(out))",
        &[&text],
    );
    let samples: serde_json::Value = serde_json::from_str(&parsed).unwrap();
    let get = |key: &str| {
        samples[key]
            .as_f64()
            .unwrap_or_else(|| panic!("no {key} in {samples}"))
    };
    assert_eq!(
        get("sidekey_requests_total|decision=allow|mode=reverse|route=echo|status=200"),
        3.0
    );
    assert_eq!(
        // Refused before identity, but on the echo route: counted there.
        get("sidekey_requests_total|decision=deny|mode=reverse|route=echo|status=401"),
        2.0
    );
    assert_eq!(
        get("sidekey_requests_total|decision=deny|mode=reverse|route=echo|status=403"),
        1.0
    );
    assert_eq!(get("sidekey_request_duration_seconds_count"), 6.0);
    assert_eq!(get("sidekey_audit_write_errors_total"), 0.0);
    assert_no_leak(&text, SECRET, "metrics");

    // A reload counts however it was asked for.
    sidekey.signal("HUP");
    env.ok(&["reload"], None);
    eventually(std::time::Duration::from_secs(3), || {
        let status: serde_json::Value = serde_json::from_str(&env.ok(&["status"], None)).unwrap();
        (status["reloads"] == 2).then_some(())
    });

    // An endpoint asked with the wrong method says which one it takes.
    let head = admin_curl(&env, "/v1/reload", &["-i"]);
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    assert!(head.to_ascii_lowercase().contains("allow: post"), "{head}");
}

#[test]
fn revocation_through_the_admin_api_ends_an_open_tunnel_at_the_next_request() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::https(dir.path());
    let env = tls_echo_env(&upstream, "store");
    env.set_secret("api", SECRET);
    let token = env.token_with(&["coder", "--session", "tunnel-1"]);
    let sidekey = env.spawn();
    let ca = env.path("ca.pem");
    std::fs::write(&ca, env.ok(&["ca", "cert"], None)).unwrap();
    let proxy = format!("http://coder:{token}@{}", sidekey.addr);

    // One requests.Session keeps one CONNECT tunnel open across requests;
    // the revocation happens between two of them.
    let out = python(
        "import subprocess\n\
         s = requests.Session()\n\
         s.trust_env = False\n\
         s.proxies = {'https': sys.argv[2]}\n\
         s.verify = sys.argv[3]\n\
         first = s.get(sys.argv[1])\n\
         subprocess.run([sys.argv[4], '-c', sys.argv[5], 'token', 'revoke', '--session', 'tunnel-1'], check=True)\n\
         second = s.get(sys.argv[1])\n\
         print(first.status_code, second.status_code, second.headers.get('x-sidekey-error'))",
        &[
            &format!("{}/x", upstream.base()),
            &proxy,
            &ca.display().to_string(),
            bin(),
            &env.config.display().to_string(),
        ],
    );
    assert_eq!(out.trim(), "200 407 token_revoked");
    let audit = env.audit();
    let connects = audit.iter().filter(|r| r["mode"] == "connect").count();
    assert_eq!(connects, 1, "both requests went through one tunnel");
    assert_eq!(upstream.count(), 1);
}

#[test]
fn status_and_reload_say_so_when_no_proxy_runs() {
    let upstream = Upstream::http();
    let env = TestEnv::new(&echo_route(&upstream, "store"));
    env.set_secret("api", SECRET);
    env.ok(&["token", "revoke", "--session", "s-gone"], None);
    let out = env.run(&["status"], None);
    assert_eq!(out.status.code(), Some(3), "not running");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no sidekey is running"));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["running"], false);
    assert_eq!(status["stored_secrets"], 1);
    assert_eq!(status["revocations"]["sessions"][0], "s-gone");
    assert_no_leak(&status.to_string(), SECRET, "status");
    let out = env.run(&["reload"], None);
    assert_eq!(out.status.code(), Some(1), "nothing was reloaded");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no sidekey is running"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    env.write_config("[[rules]]\nagents = []\n");
    let out = env.run(&["reload"], None);
    assert_eq!(out.status.code(), Some(2), "an invalid config is reported");
}

#[test]
fn the_tcp_admin_address_requires_its_own_token() {
    let upstream = Upstream::http();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let env = TestEnv::new(&format!(
        "[admin_tcp]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"admin\"\n[secrets.admin]\nsource = \"store\"\n{}",
        echo_route(&upstream, "store")
    ));
    env.set_secret("api", SECRET);
    env.set_secret("admin", "admin-token-42");
    let _sidekey = env.spawn();
    let url = format!("http://127.0.0.1:{port}/metrics");
    let res = client().get(&url).send().unwrap();
    assert_eq!(res.status(), 401);
    let res = client().get(&url).bearer_auth("wrong").send().unwrap();
    assert_eq!(res.status(), 401);
    let res = client()
        .get(&url)
        .bearer_auth("admin-token-42")
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.text().unwrap().contains("sidekey_open_connections"));
    // The scheme in any case (RFC 9110 11.1).
    let res = client()
        .get(&url)
        .header("authorization", "bearer admin-token-42")
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
}

/// The admin API takes the names the command line takes. A whole token
/// pasted as an id, an empty name or one with control characters is
/// refused with 400, where it used to be listed as revoked while the token
/// went on working; neither the API nor the CLI prints the whole token
/// back. The token's real id revokes it.
#[test]
fn revoking_refuses_what_names_no_token_and_never_echoes_a_whole_token() {
    let upstream = Upstream::http();
    let env = TestEnv::new(&echo_route(&upstream, "store"));
    env.set_secret("api", SECRET);
    let token = env.token("coder");
    let sidekey = env.spawn();
    let get = || {
        client()
            .get(sidekey.url("/echo/ok"))
            .bearer_auth(&token)
            .send()
            .unwrap()
            .status()
    };
    let revoke = |body: serde_json::Value| {
        let out = Command::new("curl")
            .args(["-sS", "-w", "\n%{http_code}", "-X", "POST", "--unix-socket"])
            .arg(env.state.join("admin.sock"))
            .args(["-d", &body.to_string(), "http://sidekey/v1/revoke"])
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let (answer, status) = text.rsplit_once('\n').unwrap();
        (status.to_string(), answer.to_string())
    };
    assert_eq!(get(), 200);
    for body in [
        serde_json::json!({ "id": token }),
        serde_json::json!({ "id": "" }),
        serde_json::json!({ "agent": "a\nb\u{0}" }),
    ] {
        let (status, answer) = revoke(body.clone());
        assert_eq!(status, "400", "{body}: {answer}");
        assert!(!answer.contains(&token), "{answer}");
    }
    let cli = env.run(&["token", "revoke", "--id", &token], None);
    let stderr = String::from_utf8_lossy(&cli.stderr);
    assert!(!cli.status.success());
    assert!(
        stderr.contains("is a whole token") && !stderr.contains(&token),
        "{stderr}"
    );
    assert_eq!(get(), 200);

    let id = env.audit()[0]["token_id"].as_str().unwrap().to_string();
    let (status, answer) = revoke(serde_json::json!({ "id": id }));
    assert_eq!(status, "200", "{answer}");
    eventually(std::time::Duration::from_secs(5), || {
        (get() == 401).then_some(())
    });
}
