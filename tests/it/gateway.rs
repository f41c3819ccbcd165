use std::time::Duration;

use crate::support::*;

const SECRET: &str = "sk-live-gateway-4f1c2b";

fn env_with_echo(upstream: &Upstream) -> TestEnv {
    let env = TestEnv::new(&echo_route(upstream, "store"));
    env.set_secret("api", SECRET);
    env
}

fn error_code(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).expect("JSON error body");
    assert!(
        v["error"]["request_id"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
    );
    assert!(v["error"]["message"].as_str().is_some());
    v["error"]["code"].as_str().unwrap().to_string()
}

#[test]
fn credential_arrives_upstream_while_the_agent_sends_only_its_token() {
    let upstream = Upstream::http();
    let env = env_with_echo(&upstream);
    let token = env.token("coder");
    let sidekey = env.spawn();

    // reqwest
    let res = client()
        .post(sidekey.url("/echo/v1/chat/completions?stream=false"))
        .bearer_auth(&token)
        .body("{\"q\":1}")
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    let request_id = res.headers()["x-sidekey-request-id"].clone();
    let seen = upstream.last();
    assert_eq!(
        seen.header_all("authorization"),
        vec![format!("Bearer {SECRET}")]
    );
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.uri, "/v1/chat/completions?stream=false");
    assert_eq!(seen.body, b"{\"q\":1}");
    assert!(
        !seen.headers.iter().any(|(_, v)| v.contains(&token)),
        "token reached upstream"
    );

    // curl
    let auth = format!("Authorization: Bearer {token}");
    let (status, _) = curl(&["-H", &auth, &sidekey.url("/echo/v1/models")]);
    assert_eq!(status, 200);
    assert_eq!(
        upstream.last().header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );

    // Python requests
    let out = python(
        "r = requests.get(sys.argv[1], headers={'Authorization': 'Bearer ' + sys.argv[2]})\nprint(r.status_code)",
        &[&sidekey.url("/echo/v1/models"), &token],
    );
    assert_eq!(out.trim(), "200");
    assert_eq!(upstream.count(), 3);
    assert_eq!(
        upstream.last().header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );

    let audit = env.audit();
    assert_eq!(audit.len(), 3);
    let first = &audit[0];
    for field in [
        "ts",
        "request_id",
        "agent",
        "session",
        "token_id",
        "mode",
        "method",
        "host",
        "port",
        "path",
        "route",
        "rule",
        "decision",
        "reason",
        "secret",
        "status",
        "bytes_in",
        "bytes_out",
        "duration_ms",
        "redactions",
    ] {
        assert!(first.get(field).is_some(), "audit record lacks {field}");
    }
    assert_eq!(first["agent"], "coder");
    assert_eq!(first["mode"], "reverse");
    assert_eq!(first["route"], "echo");
    assert_eq!(first["rule"], "rules[0]");
    assert_eq!(first["decision"], "allow");
    assert_eq!(first["reason"], "ok");
    assert_eq!(first["secret"], "api");
    assert_eq!(first["status"], 200);
    assert_eq!(first["path"], "/v1/chat/completions");
    assert_eq!(first["bytes_in"], 7);
    assert_no_leak(&env.audit_text(), SECRET, "audit log");
    assert_no_leak(&env.audit_text(), &token, "audit log");
    assert_no_leak(&env.audit_text(), "stream=false", "audit log (query)");
    assert_no_leak(&sidekey.stderr(), SECRET, "stderr");

    // sidekey's own headers say what sidekey did: an upstream cannot pose
    // as a refusal, nor name the request.
    let res = client()
        .get(sidekey.url("/echo/v1/forged-error"))
        .bearer_auth(&token)
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(!res.headers().contains_key("x-sidekey-error"));
    let id = res.headers()["x-sidekey-request-id"].to_str().unwrap();
    assert!(id != "req-forged" && id != request_id, "{id}");
}

#[test]
fn https_upstream_over_http2_with_a_test_ca() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::https(dir.path());
    let env = tls_echo_env(&upstream, "store");
    env.set_secret("api", SECRET);
    let token = env.token("coder");
    let sidekey = env.spawn();
    let res = client()
        .get(sidekey.url("/echo/v1/models"))
        .bearer_auth(&token)
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    let seen = upstream.last();
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );
    assert_eq!(seen.version, "HTTP/2.0", "ALPN should pick h2");
}

#[test]
fn an_upstream_certificate_that_fails_verification_gets_502_and_no_credential() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::https(dir.path());
    // No upstream_ca: the test CA is unknown to sidekey.
    let env = env_with_echo(&upstream);
    let token = env.token("coder");
    let sidekey = env.spawn();
    let res = client()
        .get(sidekey.url("/echo/x"))
        .bearer_auth(&token)
        .send()
        .unwrap();
    assert_eq!(res.status(), 502);
    assert_eq!(res.headers()["x-sidekey-error"], "upstream_unreachable");
    assert_eq!(
        upstream.count(),
        0,
        "the upstream must never see the request"
    );
}

#[test]
fn agent_supplied_credential_copies_are_all_overwritten() {
    let upstream = Upstream::http();
    let env = env_with_echo(&upstream);
    let token = env.token("coder");
    let sidekey = env.spawn();
    // Identity via Proxy-Authorization; the agent also stuffs its own Authorization copies.
    let mut conn = RawConn::connect(sidekey.addr);
    let basic = base64_encode(&format!("coder:{token}"));
    conn.send(&format!(
        "GET /echo/x HTTP/1.1\r\nHost: evil.example\r\nProxy-Authorization: Basic {basic}\r\n\
         authorization: Bearer agent-own-1\r\nAUTHORIZATION: Bearer agent-own-2\r\n\
         AuThOrIzAtIoN: Basic Zm9vOmJhcg==\r\nX-Forwarded-Host: evil.example\r\n\r\n"
    ));
    let (status, _, _) = conn.read_response();
    assert_eq!(status, 200);
    let seen = upstream.last();
    assert_eq!(
        seen.header_all("authorization"),
        vec![format!("Bearer {SECRET}")]
    );
    assert!(seen.header("proxy-authorization").is_none());
    assert_eq!(
        seen.header("host"),
        Some(format!("127.0.0.1:{}", upstream.addr.port()).as_str())
    );
}

#[test]
fn identity_failures_are_refused_before_the_upstream() {
    let upstream = Upstream::http();
    let env = env_with_echo(&upstream);
    let sidekey = env.spawn();
    let other = TestEnv::new("");
    let foreign = other.token("coder");
    let cases = [
        (None, "unauthenticated"),
        (Some("not-a-token".to_string()), "unauthenticated"),
        (Some(foreign), "unauthenticated"),
    ];
    for (token, code) in cases {
        let mut req = client().get(sidekey.url("/echo/x"));
        if let Some(t) = &token {
            req = req.bearer_auth(t);
        }
        let res = req.send().unwrap();
        assert_eq!(res.status(), 401);
        assert_eq!(res.headers()["x-sidekey-error"], code);
        assert!(res.headers().contains_key("www-authenticate"));
        assert_eq!(error_code(&res.text().unwrap()), code);
    }
    // An unknown route is only revealed to an authenticated agent.
    let res = client().get(sidekey.url("/nope/x")).send().unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(upstream.count(), 0);
}

#[test]
fn expired_and_revoked_tokens_have_their_own_codes() {
    let upstream = Upstream::http();
    let env = env_with_echo(&upstream);
    let short = env.token_with(&["coder", "--ttl", "1s"]);
    let revoked = env.token("coder");
    let sidekey = env.spawn();
    let claims = decode_claims(&revoked);
    env.ok(
        &["token", "revoke", "--id", claims["jti"].as_str().unwrap()],
        None,
    );
    eventually(Duration::from_secs(3), || {
        let res = client()
            .get(sidekey.url("/echo/x"))
            .bearer_auth(&revoked)
            .send()
            .unwrap();
        (res.status() == 401 && res.headers()["x-sidekey-error"] == "token_revoked").then_some(())
    });
    eventually(Duration::from_secs(4), || {
        let res = client()
            .get(sidekey.url("/echo/x"))
            .bearer_auth(&short)
            .send()
            .unwrap();
        (res.status() == 401 && res.headers()["x-sidekey-error"] == "token_expired").then_some(())
    });
    let before = upstream.count();
    for token in [&revoked, &short] {
        let res = client()
            .get(sidekey.url("/echo/x"))
            .bearer_auth(token)
            .send()
            .unwrap();
        assert_eq!(res.status(), 401);
    }
    assert_eq!(upstream.count(), before);
    let reasons: Vec<_> = env.audit().iter().map(|r| r["reason"].clone()).collect();
    assert!(reasons.contains(&"token_revoked".into()) && reasons.contains(&"token_expired".into()));
}

#[test]
fn policy_deny_wins_default_denies_and_traversal_is_refused() {
    let upstream = Upstream::http();
    let env = TestEnv::new(&format!(
        r#"
[secrets.api]
source = "store"
[routes.echo]
upstream = "{}"
allow_private = true
inject = {{ header = "x-api-key", secret = "api" }}

[[rules]]
agents = ["coder"]
route = "echo"
methods = ["GET", "POST"]
paths = ["/v1/**"]
action = "allow"

[[rules]]
name = "no-admin"
agents = ["*"]
route = "echo"
paths = ["/v1/admin/**"]
action = "deny"
"#,
        upstream.base()
    ));
    env.set_secret("api", SECRET);
    let token = env.token("coder");
    let sidekey = env.spawn();
    let key = format!("x-api-key: {token}");
    let cases: &[(&str, &str, u16, &str)] = &[
        ("GET", "/echo/v1/models", 200, ""),
        ("DELETE", "/echo/v1/models", 403, "policy_denied"),
        ("GET", "/echo/v2/models", 403, "policy_denied"),
        ("GET", "/echo/v1/admin/users", 403, "policy_denied"),
        ("GET", "/echo/v1//admin/users", 403, "policy_denied"),
        ("GET", "/echo/v1/./admin/users", 403, "policy_denied"),
        ("GET", "/echo/v1/%61dmin/users", 403, "policy_denied"),
        ("GET", "/echo/v1/../admin", 400, "bad_request"),
        ("GET", "/echo/v1/%2e%2e/admin", 400, "bad_request"),
        ("GET", "/echo/v1/..;/admin", 400, "bad_request"),
        ("GET", "/echo/v1%2fadmin", 400, "bad_request"),
        ("GET", "/echo/v1/%5c..%5cadmin", 400, "bad_request"),
        ("GET", "/echo/v1/%c0%ae%c0%ae/admin", 400, "bad_request"),
        ("GET", "/nope/v1/models", 404, "route_not_found"),
    ];
    for (method, path, want, code) in cases {
        let before = upstream.count();
        let (status, text) = curl(&["--path-as-is", "-X", method, "-H", &key, &sidekey.url(path)]);
        assert_eq!(status, *want, "{method} {path}: {text}");
        if *want != 200 {
            assert!(
                text.contains(&format!("x-sidekey-error: {code}")),
                "{method} {path}: {text}"
            );
            assert_eq!(
                upstream.count(),
                before,
                "{method} {path} reached the upstream"
            );
        }
    }
    let denied = env
        .audit()
        .into_iter()
        .find(|r| r["path"] == "/v1/admin/users")
        .unwrap();
    assert_eq!(denied["rule"], "no-admin");
    assert_eq!(denied["decision"], "deny");
    assert_eq!(denied["reason"], "policy_denied");
    assert_eq!(denied["status"], 403);
}

#[test]
fn query_and_basic_slots_carry_identity_and_credential() {
    let upstream = Upstream::http();
    let env = TestEnv::new(&format!(
        r#"
[secrets.maps]
source = "store"
[secrets.git]
source = "store"
[routes.maps]
upstream = "{base}"
allow_private = true
inject = {{ query = "key", secret = "maps" }}
[routes.git]
upstream = "{base}/prefix"
allow_private = true
inject = {{ basic = {{ username = "x-access-token", secret = "git" }} }}
[[rules]]
agents = ["coder"]
route = "maps"
action = "allow"
[[rules]]
agents = ["coder"]
route = "git"
action = "allow"
"#,
        base = upstream.base()
    ));
    env.set_secret("maps", "maps-secret-value");
    env.set_secret("git", "ghp_gitsecret");
    let token = env.token("coder");
    let sidekey = env.spawn();

    let res = client()
        .get(sidekey.url(&format!("/maps/geo?q=x&key={token}&KEY=other")))
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(upstream.last().uri, "/geo?q=x&key=maps-secret-value");
    let body = res.text().unwrap();
    assert!(body.contains("[REDACTED]"), "{body}");
    assert_no_leak(&body, "maps-secret-value", "response");

    let res = client()
        .get(sidekey.url("/git/acme/app.git/info/refs"))
        .basic_auth("coder", Some(&token))
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    let seen = upstream.last();
    assert_eq!(seen.uri, "/prefix/acme/app.git/info/refs");
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Basic {}", base64_encode("x-access-token:ghp_gitsecret")).as_str())
    );
    let body = res.text().unwrap();
    assert_no_leak(
        &body,
        &base64_encode("x-access-token:ghp_gitsecret"),
        "response",
    );

    // The user name git is told to send for the route is as good as the
    // agent's; any other name is refused, and never passed on.
    for (user, status) in [("x-access-token", 200), ("mallory", 401)] {
        let res = client()
            .get(sidekey.url("/git/acme/app.git/info/refs"))
            .basic_auth(user, Some(&token))
            .send()
            .unwrap();
        assert_eq!(res.status(), status, "{user}");
    }
    assert_eq!(upstream.count(), 3);
    assert_eq!(
        upstream.last().header("authorization"),
        Some(format!("Basic {}", base64_encode("x-access-token:ghp_gitsecret")).as_str())
    );
}

#[test]
fn fail_closed_errors_have_their_codes() {
    let upstream = Upstream::http();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let env = TestEnv::new(&format!(
        r#"
[limits]
max_body_bytes = 1024
upstream_timeout = "1s"

[secrets.api]
source = "store"
[secrets.missing]
source = "env:SIDEKEY_TEST_UNSET_VARIABLE"

[routes.echo]
upstream = "{base}"
allow_private = true
inject = {{ header = "authorization", format = "Bearer {{secret}}", secret = "api" }}
[routes.nosecret]
upstream = "{base}"
allow_private = true
inject = {{ header = "authorization", format = "Bearer {{secret}}", secret = "missing" }}
[routes.down]
upstream = "http://{closed}"
allow_private = true
inject = {{ header = "authorization", format = "Bearer {{secret}}", secret = "api" }}

[[rules]]
agents = ["coder"]
route = "echo"
action = "allow"
[[rules]]
agents = ["coder"]
route = "nosecret"
action = "allow"
[[rules]]
agents = ["coder"]
route = "down"
action = "allow"
"#,
        base = upstream.base()
    ));
    env.set_secret("api", SECRET);
    let token = env.token("coder");
    let sidekey = env.spawn();
    let c = client();
    let check = |res: reqwest::blocking::Response, status: u16, code: &str| {
        assert_eq!(res.status(), status, "{code}");
        assert_eq!(res.headers()["x-sidekey-error"], code);
        assert!(res.headers().contains_key("x-sidekey-request-id"));
        let body = res.text().unwrap();
        assert_eq!(error_code(&body), code);
        assert_no_leak(&body, SECRET, "error body");
    };
    check(
        c.get(sidekey.url("/nosecret/x"))
            .bearer_auth(&token)
            .send()
            .unwrap(),
        503,
        "secret_unavailable",
    );
    check(
        c.get(sidekey.url("/down/x"))
            .bearer_auth(&token)
            .send()
            .unwrap(),
        502,
        "upstream_unreachable",
    );
    check(
        c.get(sidekey.url("/echo/stall"))
            .bearer_auth(&token)
            .send()
            .unwrap(),
        504,
        "upstream_timeout",
    );
    check(
        c.post(sidekey.url("/echo/x"))
            .bearer_auth(&token)
            .body(vec![b'a'; 4096])
            .send()
            .unwrap(),
        413,
        "request_too_large",
    );
    check(
        c.get(sidekey.url("/echo/gzip"))
            .bearer_auth(&token)
            .send()
            .unwrap(),
        502,
        "upstream_unreachable",
    );
    // Compressed as a transfer coding, the body is as unreadable to the
    // scrubber: refused too, not passed on with its coding stripped.
    let raw = curl(&["--raw", &format!("{}/te-gzip", upstream.base())]).1;
    assert!(raw.contains("transfer-encoding: gzip, chunked"), "{raw}");
    check(
        c.get(sidekey.url("/echo/te-gzip"))
            .bearer_auth(&token)
            .send()
            .unwrap(),
        502,
        "upstream_unreachable",
    );
    let codes: Vec<String> = env
        .audit()
        .iter()
        .map(|r| r["reason"].as_str().unwrap().to_string())
        .collect();
    for code in [
        "secret_unavailable",
        "upstream_unreachable",
        "upstream_timeout",
        "request_too_large",
    ] {
        assert!(
            codes.iter().any(|c| c == code),
            "no audit record for {code}: {codes:?}"
        );
    }
}

#[test]
fn audit_sink_failure_denies_with_503() {
    let upstream = Upstream::http();
    let env = TestEnv::new(&format!(
        "[audit]\nfile = \"/dev/full\"\non_failure = \"deny\"\n{}",
        echo_route(&upstream, "store")
    ));
    env.set_secret("api", SECRET);
    let token = env.token("coder");
    let sidekey = env.spawn();
    for _ in 0..2 {
        let res = client()
            .get(sidekey.url("/echo/x"))
            .bearer_auth(&token)
            .send()
            .unwrap();
        assert_eq!(res.status(), 503);
        assert_eq!(res.headers()["x-sidekey-error"], "audit_unavailable");
        assert_no_leak(&res.text().unwrap(), SECRET, "error body");
    }
    // The first request may have reached the upstream before its record
    // failed; once the sink is known broken, no credential is spent.
    assert!(
        upstream.count() <= 1,
        "{} requests reached the upstream",
        upstream.count()
    );

    // With on_failure = "continue" the same sink lets requests through.
    let env = TestEnv::new(&format!(
        "[audit]\nfile = \"/dev/full\"\non_failure = \"continue\"\n{}",
        echo_route(&upstream, "store")
    ));
    env.set_secret("api", SECRET);
    let token = env.token("coder");
    let sidekey = env.spawn();
    let res = client()
        .get(sidekey.url("/echo/x"))
        .bearer_auth(&token)
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
}

pub fn base64_encode(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// The claims of a JWT, without verifying it (the test only needs the id).
pub fn decode_claims(token: &str) -> serde_json::Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[test]
fn agent_tricks_to_smuggle_or_steer_are_neutralised() {
    let upstream = Upstream::http();
    let env = TestEnv::new(&format!(
        r#"
[secrets.api]
source = "store"
[routes.keyed]
upstream = "{base}"
allow_private = true
inject = {{ header = "x-api-key", secret = "api" }}
[routes.other]
upstream = "{base}"
allow_private = true
inject = {{ header = "authorization", format = "Bearer {{secret}}", secret = "api" }}

[[rules]]
agents = ["coder"]
route = "keyed"
methods = ["POST", "GET"]
action = "allow"
[[rules]]
name = "open-egress"
agents = ["*"]
host = "*"
action = "allow"
[[rules]]
agents = ["*"]
route = "keyed"
paths = ["/admin/**"]
action = "deny"
"#,
        base = upstream.base()
    ));
    env.set_secret("api", SECRET);
    let token = env.token("coder");
    let sidekey = env.spawn();
    let proxy_auth = format!("Proxy-Authorization: Bearer {token}");

    // The token sent in a second place and an underscore spelling of the
    // slot never reach the upstream.
    let (status, _) = curl(&[
        "-H",
        &proxy_auth,
        "-H",
        &format!("Authorization: Bearer {token}"),
        "-H",
        "x_api_key: agent-own-key",
        &sidekey.url(&format!("/keyed/v1/x?a=1&t={token}")),
    ]);
    assert_eq!(status, 200);
    let seen = upstream.last();
    assert_eq!(seen.header_all("x-api-key"), vec![SECRET]);
    assert!(seen.header("x_api_key").is_none(), "{:?}", seen.headers);
    assert!(
        !seen.uri.contains(&token) && seen.uri == "/v1/x?a=1",
        "{}",
        seen.uri
    );
    assert!(
        !seen.headers.iter().any(|(_, v)| v.contains(&token)),
        "{:?}",
        seen.headers
    );

    // A method override must be allowed like the method itself.
    let (status, text) = curl(&[
        "-X",
        "POST",
        "-H",
        &proxy_auth,
        "-H",
        "X-HTTP-Method-Override: DELETE",
        &sidekey.url("/keyed/v1/x"),
    ]);
    assert_eq!(status, 403, "{text}");
    // So must one spelled as PHP and CGI apps read it, or sent as Express's
    // `_method` parameter.
    for (header, query) in [
        ("X_HTTP_METHOD_OVERRIDE: DELETE", ""),
        ("X-Ok: 1", "?_method=DELETE"),
    ] {
        let (status, text) = curl(&[
            "-X",
            "POST",
            "-H",
            &proxy_auth,
            "-H",
            header,
            &sidekey.url(&format!("/keyed/v1/x{query}")),
        ]);
        assert_eq!(status, 403, "{header} {query}: {text}");
    }
    // So must a `_method` field of a POST form, which Rails, Laravel and
    // Symfony obey; whatever the spelling, and with no content type, which
    // Rack reads as a form too.
    let post = |content_type: &str, body: &str| {
        curl(&[
            "-H",
            &proxy_auth,
            "-H",
            &format!("Content-Type: {content_type}"),
            "--data-binary",
            body,
            &sidekey.url("/keyed/v1/form"),
        ])
    };
    for (content_type, form) in [
        (
            "application/x-www-form-urlencoded",
            "title=x&_method=DELETE",
        ),
        (
            "application/x-www-form-urlencoded; charset=utf-8",
            "_method=delete",
        ),
        ("Application/X-WWW-Form-Urlencoded", "a=1;%5Fmethod=+PATCH+"),
        ("", "_method=PUT"),
    ] {
        let count = upstream.count();
        let (status, text) = post(content_type, form);
        assert_eq!(status, 403, "{content_type:?} {form}: {text}");
        assert!(text.contains("policy_denied"), "{text}");
        assert_eq!(upstream.count(), count, "{form} reached the upstream");
    }
    // A form that asks for an allowed method, or none, goes on whole; a
    // JSON body is no form.
    for (content_type, body) in [
        ("application/x-www-form-urlencoded", "title=x&_method=GET"),
        (
            "application/x-www-form-urlencoded",
            "title=_method%3DDELETE",
        ),
        ("application/json", r#"{"_method":"DELETE"}"#),
    ] {
        let (status, text) = post(content_type, body);
        assert_eq!(status, 200, "{body}: {text}");
        assert_eq!(upstream.last().body, body.as_bytes(), "{body}");
    }
    let denied: Vec<_> = env
        .audit()
        .into_iter()
        .filter(|r| r["path"] == "/v1/form" && r["reason"] == "policy_denied")
        .collect();
    assert_eq!(denied.len(), 4, "{denied:?}");

    // A header naming another path or host than the one decided never
    // crosses.
    let (status, text) = curl(&[
        "-H",
        &proxy_auth,
        "-H",
        "X-Original-URL: /admin/users",
        "-H",
        "x_rewrite_url: /admin/users",
        "-H",
        "X-Forwarded-Host: admin.internal",
        "-H",
        "Forwarded: host=admin.internal;proto=https",
        "-H",
        "x_forwarded_host: admin.internal",
        "-H",
        "X-Original-Host: admin.internal",
        "-H",
        "X-Host: admin.internal",
        "-H",
        "X-Forwarded-Server: admin.internal",
        "-H",
        "X-Forwarded-Prefix: /admin",
        "-H",
        "X-Forwarded-For: 10.0.0.1",
        "-H",
        "x_forwarded_proto: https",
        "-H",
        "X-Forwarded-Port: 8443",
        "-H",
        "X-Real-IP: 10.0.0.1",
        "-H",
        "X-Client-IP: 10.0.0.1",
        "-H",
        "True-Client-IP: 10.0.0.1",
        "-H",
        "X-Forwarded: kept",
        &sidekey.url("/keyed/v1/x"),
    ]);
    assert_eq!(status, 200, "{text}");
    let seen = upstream.last();
    let forged = ["/admin", "admin.internal", "10.0.0.1", "https", "8443"];
    assert!(
        !seen
            .headers
            .iter()
            .any(|(_, v)| forged.iter().any(|f| v.contains(f))),
        "{:?}",
        seen.headers
    );
    // Only the family is removed, not every header that starts like it.
    assert_eq!(seen.header("x-forwarded"), Some("kept"));

    // A deny cannot be dodged by respelling the path.
    for path in [
        "/keyed/admin/users;x",
        "/keyed/Admin/users",
        "/keyed/admin;a/users/",
    ] {
        let (status, text) = curl(&["--path-as-is", "-H", &proxy_auth, &sidekey.url(path)]);
        assert_eq!(status, 403, "{path}: {text}");
    }

    // A host rule for "any destination" never grants a credentialed route.
    let stranger = env.token("stranger");
    let (status, _) = curl(&[
        "-H",
        &format!("Authorization: Bearer {stranger}"),
        &sidekey.url("/other/v1/x"),
    ]);
    assert_eq!(status, 403);

    // HTTP/2 with prior knowledge reaches the gateway too.
    let (status, text) = curl(&[
        "--http2-prior-knowledge",
        "-H",
        &proxy_auth,
        &sidekey.url("/keyed/v1/h2"),
    ]);
    assert_eq!(status, 200, "{text}");
    assert_eq!(upstream.last().header("x-api-key"), Some(SECRET));

    // A forged token gets the same answer whether or not the route exists.
    let junk = "x-api-key: eyJhbGciOiJFZERTQSJ9.e30.AAAA";
    let (known, known_text) = curl(&["-H", junk, &sidekey.url("/keyed/v1/x")]);
    let (unknown, unknown_text) = curl(&["-H", junk, &sidekey.url("/nosuch/v1/x")]);
    assert_eq!((known, unknown), (401, 401));
    let message = |t: &str| {
        t.split("\"message\":")
            .nth(1)
            .map(|m| m.split(',').next().unwrap().to_string())
    };
    assert_eq!(message(&known_text), message(&unknown_text));

    // The agent's own token put in the path, even partly percent-encoded,
    // stays out of the audit log.
    let encoded = token.replacen('.', "%2E", 1);
    let (status, text) = curl(&[
        "-H",
        &proxy_auth,
        &sidekey.url(&format!("/keyed/v1/{encoded}/x")),
    ]);
    assert_eq!(status, 200, "{text}");
    let audited = env.audit();
    assert_eq!(
        audited.last().unwrap()["path"],
        "/v1/[REDACTED]/x",
        "{audited:?}"
    );
    assert_no_leak(&sidekey.stderr(), SECRET, "stderr");
    assert_no_leak(&env.audit_text(), &token, "audit");
}

#[test]
fn a_route_name_resolving_to_loopback_is_refused_without_allow_private() {
    let upstream = Upstream::http();
    let base = format!("http://localhost:{}", upstream.addr.port());
    let config = |allow: bool| {
        format!(
            r#"
[secrets.api]
source = "store"
[routes.echo]
upstream = "{base}"
allow_private = {allow}
inject = {{ header = "authorization", format = "Bearer {{secret}}", secret = "api" }}
[[rules]]
agents = ["coder"]
route = "echo"
action = "allow"
"#
        )
    };
    let env = TestEnv::new(&config(false));
    env.set_secret("api", SECRET);
    let token = env.token("coder");
    let sidekey = env.spawn();
    let res = client()
        .get(sidekey.url("/echo/x"))
        .bearer_auth(&token)
        .send()
        .unwrap();
    assert_eq!(res.status(), 403);
    assert_eq!(res.headers()["x-sidekey-error"], "policy_denied");
    assert!(res.text().unwrap().contains("loopback"));
    assert_eq!(upstream.count(), 0);

    env.write_config(&config(true));
    env.ok(&["reload"], None);
    let res = client()
        .get(sidekey.url("/echo/x"))
        .bearer_auth(&token)
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(upstream.count(), 1);
}

#[test]
fn a_rule_can_be_narrowed_to_sessions() {
    let upstream = Upstream::http();
    let env = TestEnv::new(&format!(
        r#"
[secrets.api]
source = "store"
[routes.echo]
upstream = "{}"
inject = {{ header = "authorization", format = "Bearer {{secret}}", secret = "api" }}
[[rules]]
agents = ["coder"]
sessions = ["ci-run-7"]
route = "echo"
action = "allow"
"#,
        upstream.base()
    ));
    env.set_secret("api", SECRET);
    let inside = env.token_with(&["coder", "--session", "ci-run-7"]);
    let outside = env.token_with(&["coder", "--session", "ci-run-8"]);
    let sidekey = env.spawn();
    let get = |token: &str| {
        client()
            .get(sidekey.url("/echo/x"))
            .bearer_auth(token)
            .send()
            .unwrap()
            .status()
    };
    assert_eq!(get(&inside), 200);
    assert_eq!(get(&outside), 403);
    let out = env.ok(
        &[
            "explain",
            "--agent",
            "coder",
            "--session",
            "ci-run-7",
            "GET",
            "http://127.0.0.1:8080/echo/x",
        ],
        None,
    );
    assert!(out.contains("decision: allow"), "{out}");
}

#[test]
fn a_preset_route_is_two_lines_and_takes_the_token_in_its_slot() {
    let upstream = Upstream::http();
    let env = TestEnv::new(&format!(
        r#"
[secrets.anthropic]
source = "store"
[routes.anthropic]
preset = "anthropic"
secret = "anthropic"
upstream = "{}"
[[rules]]
agents = ["coder"]
route = "anthropic"
action = "allow"
"#,
        upstream.base()
    ));
    env.set_secret("anthropic", SECRET);
    let token = env.token("coder");
    let sidekey = env.spawn();
    let res = client()
        .post(sidekey.url("/anthropic/v1/messages"))
        .header("x-api-key", &token)
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(upstream.last().header_all("x-api-key"), vec![SECRET]);
}

#[test]
fn an_s3_copy_must_be_allowed_to_read_its_source_too() {
    let upstream = Upstream::http();
    let env = TestEnv::new(&format!(
        r#"
[secrets.api]
source = "store"
[routes.s3]
upstream = "{base}"
allow_private = true
inject = {{ header = "authorization", format = "Bearer {{secret}}", secret = "api" }}

[[rules]]
agents = ["coder"]
route = "s3"
paths = ["/agent-bucket/**"]
action = "allow"
"#,
        base = upstream.base()
    ));
    env.set_secret("api", SECRET);
    let token = env.token("coder");
    let sidekey = env.spawn();
    let auth = format!("Authorization: Bearer {token}");
    let copy = |source: &str| {
        curl(&[
            "-X",
            "PUT",
            "-H",
            &auth,
            "-H",
            &format!("x-amz-copy-source: {source}"),
            &sidekey.url("/s3/agent-bucket/copied.txt"),
        ])
    };
    // Within the bucket the agent may read: the copy goes through.
    let (status, text) = copy("/agent-bucket/notes.txt?versionId=3");
    assert_eq!(status, 200, "{text}");
    let (status, text) = copy("agent-bucket/other%20notes.txt");
    assert_eq!(status, 200, "{text}");
    // Another bucket, however spelled: the write would read it.
    let before = upstream.count();
    for source in [
        "/prod-bucket/customers.csv",
        "prod-bucket/customers.csv",
        "/agent-bucket/../prod-bucket/customers.csv",
        "/agent-bucket/%2e%2e/prod-bucket/customers.csv",
        "arn:aws:s3:us-east-1:123456789012:accesspoint/prod/object/customers.csv",
    ] {
        let (status, text) = copy(source);
        assert!(status == 403 || status == 400, "{source}: {status} {text}");
    }
    assert_eq!(
        upstream.count(),
        before,
        "a copy of another bucket went out"
    );
}
