use crate::support::*;

const SECRET: &str = "sk-live-forward-77c1e0";

/// A proxy URL carrying the agent's identity, as HTTPS_PROXY would.
fn proxy_url(sidekey: &Sidekey, agent: &str, token: &str) -> String {
    format!("http://{agent}:{token}@{}", sidekey.addr)
}

fn ca_file(env: &TestEnv) -> String {
    let path = env.path("sidekey-ca.pem");
    std::fs::write(&path, env.ok(&["ca", "cert"], None)).unwrap();
    path.display().to_string()
}

#[test]
fn absolute_form_http_injects_for_a_route_and_forwards_host_rules_without_credential() {
    let upstream = Upstream::http();
    let open = Upstream::http();
    let env = TestEnv::new(&format!(
        r#"
[secrets.api]
source = "store"
[routes.echo]
upstream = "{}"
inject = {{ header = "authorization", format = "Bearer {{secret}}", secret = "api" }}
[[rules]]
agents = ["coder"]
route = "echo"
methods = ["GET"]
action = "allow"
[[rules]]
agents = ["coder"]
host = "127.0.0.1"
port = {}
action = "allow"
"#,
        upstream.base(),
        open.addr.port()
    ));
    env.set_secret("api", SECRET);
    let token = env.token("coder");
    let sidekey = env.spawn();
    let proxy = proxy_url(&sidekey, "coder", &token);

    // curl -x, with the agent's own Authorization overwritten
    let (status, text) = curl_via(
        &proxy,
        &[
            "-H",
            "Authorization: Bearer placeholder",
            &format!("{}/v1/x?q=1", upstream.base()),
        ],
    );
    assert_eq!(status, 200, "{text}");
    let seen = upstream.last();
    assert_eq!(
        seen.header_all("authorization"),
        vec![format!("Bearer {SECRET}")]
    );
    assert_eq!(seen.uri, "/v1/x?q=1");
    assert!(seen.header("proxy-authorization").is_none());
    assert_no_leak(&text, SECRET, "response");

    // Python requests through HTTP_PROXY
    let out = python(
        "r = requests.get(sys.argv[1], proxies={'http': sys.argv[2]})\nprint(r.status_code)\nprint(r.text)",
        &[&format!("{}/py", upstream.base()), &proxy],
    );
    assert!(out.starts_with("200\n"), "{out}");
    assert_no_leak(&out, SECRET, "python response");
    assert_eq!(
        upstream.last().header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );

    // A host rule forwards without any credential; the agent's own header stays.
    let (status, _) = curl_via(
        &proxy,
        &[
            "-H",
            "Authorization: Bearer own",
            &format!("{}/open", open.base()),
        ],
    );
    assert_eq!(status, 200);
    assert_eq!(open.last().header("authorization"), Some("Bearer own"));
    // Without a credential of ours a compressed body passes untouched.
    let (status, text) = curl_via(&proxy, &[&format!("{}/gzip", open.base())]);
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("content-encoding: gzip"), "{text}");
    let (status, _) = curl_via(&proxy, &[&format!("{}/gzip", upstream.base())]);
    assert_eq!(
        status, 502,
        "a credentialed request refuses what it cannot scrub"
    );

    // Method not allowed on the route; no proxy credentials; a denied destination.
    let (status, text) = curl_via(
        &proxy,
        &["-X", "DELETE", &format!("{}/v1/x", upstream.base())],
    );
    assert_eq!(status, 403, "{text}");
    let (status, text) = curl_via(
        &format!("http://{}", sidekey.addr),
        &[&format!("{}/v1/x", upstream.base())],
    );
    assert_eq!(status, 407, "{text}");
    assert!(
        text.to_lowercase().contains("proxy-authenticate: basic"),
        "{text}"
    );
    assert!(text.contains("x-sidekey-error: unauthenticated"));
    let (status, _) = curl_via(&proxy, &["http://127.0.0.1:9/elsewhere"]);
    assert_eq!(status, 403);
    let modes: Vec<_> = env.audit().iter().map(|r| r["mode"].clone()).collect();
    assert!(modes.iter().all(|m| m == "forward"), "{modes:?}");
}

/// Route `api` to an HTTPS `upstream` that trusts its test CA, injecting a
/// bearer header, and a rule letting `coder` reach it; `rule` adds lines
/// to that rule.
fn https_route_env(upstream: &Upstream, rule: &str) -> TestEnv {
    TestEnv::new(&format!(
        r#"
[tls]
upstream_ca = ["{ca}"]
[secrets.api]
source = "store"
[routes.api]
upstream = "{base}"
allow_private = true
inject = {{ header = "authorization", format = "Bearer {{secret}}", secret = "api" }}
[[rules]]
agents = ["coder"]
route = "api"
action = "allow"
{rule}
"#,
        ca = upstream.ca.as_ref().unwrap().display(),
        base = upstream.base()
    ))
}

#[test]
fn connect_to_a_route_origin_is_intercepted_and_injected() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::https(dir.path());
    let env = https_route_env(&upstream, r#"paths = ["/v1/**"]"#);
    env.set_secret("api", SECRET);
    let token = env.token("coder");
    let sidekey = env.spawn();
    let proxy = proxy_url(&sidekey, "coder", &token);
    let ca = ca_file(&env);
    let url = format!("{}/v1/echo", upstream.base());

    for version in ["--http1.1", "--http2"] {
        let (status, text) = curl_via(
            &proxy,
            &[
                version,
                "--cacert",
                &ca,
                "-H",
                "Authorization: Bearer fake",
                &url,
            ],
        );
        assert_eq!(status, 200, "{version}: {text}");
        assert!(text.contains("Bearer [REDACTED]"), "{text}");
        assert_no_leak(&text, SECRET, "intercepted response");
        let seen = upstream.last();
        assert_eq!(
            seen.header_all("authorization"),
            vec![format!("Bearer {SECRET}")]
        );
    }
    assert_eq!(
        upstream.last().version,
        "HTTP/2.0",
        "sidekey speaks h2 upstream"
    );

    // Python requests with HTTPS_PROXY and the CA bundle.
    let bundle = env.path("bundle.pem");
    std::fs::write(&bundle, env.ok(&["ca", "bundle"], None)).unwrap();
    let out = python(
        "r = requests.get(sys.argv[1], proxies={'https': sys.argv[2]}, verify=sys.argv[3])\nprint(r.status_code)",
        &[&url, &proxy, &bundle.display().to_string()],
    );
    assert_eq!(out.trim(), "200");

    // Inside the tunnel: a path the rule does not allow, and a Host that is
    // not the CONNECT host.
    let (status, _) = curl_via(
        &proxy,
        &["--cacert", &ca, &format!("{}/admin", upstream.base())],
    );
    assert_eq!(status, 403);
    let before = upstream.count();
    let (status, text) = curl_via(&proxy, &["--cacert", &ca, "-H", "Host: evil.example", &url]);
    assert_eq!(status, 421, "{text}");
    assert!(text.contains("x-sidekey-error: misdirected"), "{text}");
    assert_eq!(upstream.count(), before);

    let audit = env.audit();
    assert!(
        audit
            .iter()
            .any(|r| r["mode"] == "connect" && r["decision"] == "allow" && r["status"] == 200)
    );
    assert!(
        audit
            .iter()
            .any(|r| r["mode"] == "intercept" && r["reason"] == "misdirected")
    );
    assert_no_leak(&env.audit_text(), SECRET, "audit");
    assert_no_leak(&sidekey.stderr(), SECRET, "stderr");
}

#[test]
fn connect_is_refused_without_identity_or_rule_and_host_rules_tunnel_blind() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::https(dir.path());
    let upstream_ca = upstream.ca.as_ref().unwrap().display().to_string();
    let port = upstream.addr.port();
    let env = TestEnv::new(&format!(
        r#"
[tls]
upstream_ca = ["{upstream_ca}"]
[[rules]]
agents = ["coder"]
host = "localhost"
port = {port}
allow_private = true
action = "allow"
[[rules]]
agents = ["reader"]
host = "localhost"
allow_private = true
methods = ["GET"]
action = "allow"
"#
    ));
    let coder = env.token("coder");
    let other = env.token("other");
    let reader = env.token("reader");
    let sidekey = env.spawn();
    let url = format!("https://localhost:{port}/blind");

    // Blind: the agent sees the upstream's own certificate, and no credential is added.
    let (status, text) = curl_via(
        &proxy_url(&sidekey, "coder", &coder),
        &["--cacert", &upstream_ca, &url],
    );
    assert_eq!(status, 200, "{text}");
    assert!(upstream.last().header("authorization").is_none());

    // No rule for this agent: 403 at CONNECT; no identity: 407.
    let (status, text) = curl_via(
        &proxy_url(&sidekey, "other", &other),
        &["--cacert", &upstream_ca, &url],
    );
    assert_eq!(status, 403, "{text}");
    let (status, _) = curl_via(
        &format!("http://{}", sidekey.addr),
        &["--cacert", &upstream_ca, &url],
    );
    assert_eq!(status, 407);

    // A host rule with methods is intercepted (sidekey's CA) so they can be enforced.
    let ca = ca_file(&env);
    let reader_proxy = proxy_url(&sidekey, "reader", &reader);
    let (status, text) = curl_via(&reader_proxy, &["--cacert", &ca, &url]);
    assert_eq!(status, 200, "{text}");
    let (status, text) = curl_via(&reader_proxy, &["--cacert", &ca, "-X", "POST", &url]);
    assert_eq!(status, 403, "{text}");

    let audit = env.audit();
    let connects: Vec<_> = audit.iter().filter(|r| r["mode"] == "connect").collect();
    assert!(
        connects
            .iter()
            .any(|r| r["status"] == 403 && r["agent"] == "other")
    );
    assert!(connects.iter().any(|r| r["status"] == 407));
}

#[test]
fn ssrf_addresses_are_refused_unless_named() {
    let upstream = Upstream::http();
    let port = upstream.addr.port();
    // `named` matches the public-only `*` rule first: the rules after it
    // that name the address still let it through.
    let env = TestEnv::new(
        r#"
[[rules]]
agents = ["coder", "named"]
host = "*"
action = "allow"
[[rules]]
agents = ["named"]
host = "127.0.0.1"
action = "allow"
[[rules]]
agents = ["named"]
host = "localhost"
allow_private = true
action = "allow"
"#,
    );
    let token = env.token("coder");
    let named = env.token("named");
    let sidekey = env.spawn();
    let proxy = proxy_url(&sidekey, "coder", &token);
    for target in [
        format!("http://2130706433:{port}/"),
        format!("http://0x7f000001:{port}/"),
        format!("http://127.1:{port}/"),
        format!("http://[::ffff:127.0.0.1]:{port}/"),
        format!("http://127.0.0.1:{port}/"),
        format!("http://localhost:{port}/"),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        "http://[::1]:9/".to_string(),
    ] {
        let (status, text) = curl_via(&proxy, &["--path-as-is", &target]);
        assert_eq!(status, 403, "{target}: {text}");
        // A name's refusal gives the class of its address, not the address:
        // the proxy is no oracle for what internal names resolve to.
        if target.contains("localhost") {
            assert!(
                text.contains("localhost resolves to a loopback address"),
                "{text}"
            );
        }
    }
    let (status, text) = curl_via(&proxy, &["-p", &format!("https://localhost:{port}/")]);
    assert!(text.contains("403"), "CONNECT to loopback: {status} {text}");
    assert_eq!(upstream.count(), 0, "nothing reached the loopback upstream");

    // A rule that names the address itself allows it, and is the one
    // audited.
    let (status, _) = curl_via(
        &proxy_url(&sidekey, "named", &named),
        &[&format!("http://127.0.0.1:{port}/ok")],
    );
    assert_eq!(status, 200);
    assert_eq!(upstream.count(), 1);
    let audited = env
        .audit()
        .into_iter()
        .find(|r| r["path"] == "/ok")
        .unwrap();
    assert_eq!(audited["rule"], "rules[1]", "{audited}");

    // A request by name leaves a kept-alive connection to the loopback
    // upstream. It belongs to the pool for destinations allowed to be
    // private, and never serves an agent whose rule does not allow them
    // (only the connector's own DNS check refuses that one: no literal).
    let (status, _) = curl_via(
        &proxy_url(&sidekey, "named", &named),
        &[&format!("http://localhost:{port}/by-name")],
    );
    assert_eq!(status, 200);
    assert_eq!(upstream.count(), 2);
    let (status, text) = curl_via(&proxy, &[&format!("http://localhost:{port}/again")]);
    assert_eq!(status, 403, "{text}");
    assert_eq!(
        upstream.count(),
        2,
        "the pooled loopback connection was reused"
    );
}

#[test]
fn an_upstream_certificate_for_another_name_gets_502() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::https_for(dir.path(), &["other.example"]);
    let env = TestEnv::new(&format!(
        r#"
[tls]
upstream_ca = ["{ca}"]
[secrets.api]
source = "store"
[routes.api]
upstream = "https://localhost:{port}"
allow_private = true
inject = {{ header = "authorization", format = "Bearer {{secret}}", secret = "api" }}
[[rules]]
agents = ["coder"]
route = "api"
action = "allow"
"#,
        ca = upstream.ca.as_ref().unwrap().display(),
        port = upstream.addr.port()
    ));
    env.set_secret("api", SECRET);
    let token = env.token("coder");
    let sidekey = env.spawn();
    let ca = ca_file(&env);
    let (status, text) = curl_via(
        &proxy_url(&sidekey, "coder", &token),
        &[
            "--cacert",
            &ca,
            &format!("https://localhost:{}/x", upstream.addr.port()),
        ],
    );
    assert_eq!(status, 502, "{text}");
    assert!(text.contains("upstream_unreachable"));
    assert_eq!(upstream.count(), 0);
}

/// Whether this CPU runs AES-GCM in hardware, as sidekey decides it.
fn cpu_has_aes() -> bool {
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has = |flag: &str| {
        flags
            .lines()
            .filter(|l| l.starts_with("flags") || l.starts_with("Features"))
            .any(|l| l.split_whitespace().any(|f| f == flag))
    };
    (has("aes") && has("pclmulqdq")) || (has("aes") && has("pmull"))
}

#[test]
fn an_agent_without_alpn_is_served_and_both_legs_prefer_aes_128_where_the_cpu_has_aes() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::https(dir.path());
    let env = https_route_env(&upstream, "");
    env.set_secret("api", SECRET);
    let token = env.token("coder");
    let sidekey = env.spawn();
    let ca = ca_file(&env);

    // OpenSSL's client lists TLS_AES_256_GCM_SHA384 first and, unless told,
    // offers no ALPN, so the agent speaks HTTP/1.1 without having said so.
    let out = python(
        r#"
import base64, socket, ssl
addr, port, token, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
host, proxy_port = addr.rsplit(':', 1)
raw = socket.create_connection((host, int(proxy_port)), timeout=20)
auth = base64.b64encode(f'coder:{token}'.encode()).decode()
raw.sendall(f'CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\nProxy-Authorization: Basic {auth}\r\n\r\n'.encode())
head = b''
while b'\r\n\r\n' not in head:
    head += raw.recv(1)
assert head.startswith(b'HTTP/1.1 200'), head
tls = ssl.create_default_context(cafile=ca).wrap_socket(raw, server_hostname='localhost')
tls.sendall(f'GET /v1/echo HTTP/1.1\r\nHost: localhost:{port}\r\nAuthorization: Bearer fake\r\nConnection: close\r\n\r\n'.encode())
reply = b''
while chunk := tls.recv(65536):
    reply += chunk
print(json.dumps({'alpn': tls.selected_alpn_protocol(), 'suite': tls.cipher()[0], 'reply': reply.decode(errors='replace')}))
"#,
        &[
            &sidekey.addr.to_string(),
            &upstream.addr.port().to_string(),
            &token,
            &ca,
        ],
    );
    let out: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let reply = out["reply"].as_str().unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_no_leak(reply, SECRET, "intercepted response");
    assert_eq!(out["alpn"], serde_json::Value::Null);
    let seen = upstream.last();
    assert_eq!(
        seen.header_all("authorization"),
        vec![format!("Bearer {SECRET}")]
    );

    let (agent_leg, upstream_leg) = if cpu_has_aes() {
        ("TLS_AES_128_GCM_SHA256", "TLS13_AES_128_GCM_SHA256")
    } else {
        ("TLS_AES_256_GCM_SHA384", "TLS13_AES_256_GCM_SHA384")
    };
    assert_eq!(
        out["suite"], agent_leg,
        "the suite sidekey chose with the agent"
    );
    assert_eq!(
        seen.tls_suite.as_deref(),
        Some(upstream_leg),
        "the suite of sidekey's upstream connection"
    );
}
