//! The attack suite: a prompt-injected agent against a running sidekey and
//! loopback upstreams. Every case checks the status it gets, that no byte
//! it received holds the secret, and that an audit record of it exists.
//!
//! The agent `coder` may use route `echo` under `/v1/allowed/**` except
//! `/v1/allowed/admin/**`; the host `127.0.0.1:OTHER` is allowed only to the
//! agent `reviewer`, and redirects may land on it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::support::*;

const SECRET: &str = "sk-attack-secret-5d8e2b71c4";

struct Arena {
    env: TestEnv,
    sidekey: Sidekey,
    upstream: Upstream,
    /// The same routes' rules, over HTTPS with HTTP/2 (route `h2`).
    h2: Upstream,
    other: Upstream,
    token: String,
    _pki: tempfile::TempDir,
}

fn arena() -> Arena {
    let upstream = Upstream::http();
    let pki = tempfile::tempdir().unwrap();
    let h2 = Upstream::https(pki.path());
    let other = Upstream::http();
    let env = TestEnv::new(&format!(
        r#"
[tls]
upstream_ca = ["{h2_ca}"]

[secrets.api]
source = "store"

[routes.h2]
upstream = "{h2}"
allow_private = true
inject = {{ header = "authorization", format = "Bearer {{secret}}", secret = "api" }}

[[rules]]
agents = ["coder"]
route = "h2"
paths = ["/v1/allowed/**"]
action = "allow"

[routes.echo]
upstream = "{upstream}"
allow_private = true
inject = {{ header = "authorization", format = "Bearer {{secret}}", secret = "api" }}

[[rules]]
agents = ["coder"]
route = "echo"
paths = ["/v1/allowed/**"]
action = "allow"

[[rules]]
agents = ["coder"]
route = "echo"
paths = ["/v1/allowed/admin/**"]
action = "deny"

[[rules]]
agents = ["reviewer"]
host = "127.0.0.1"
port = {other_port}
action = "allow"
"#,
        upstream = upstream.base(),
        other_port = other.addr.port(),
        h2 = h2.base(),
        h2_ca = h2.ca.as_ref().unwrap().display(),
    ));
    env.set_secret("api", SECRET);
    let token = env.token("coder");
    let sidekey = env.spawn();
    Arena {
        env,
        sidekey,
        upstream,
        h2,
        other,
        token,
        _pki: pki,
    }
}

impl Arena {
    /// `raw` with `TOKEN` replaced by the agent's token.
    fn raw(&self, raw: &str) -> Vec<u8> {
        exchange(
            self.sidekey.addr,
            raw.replace("TOKEN", &self.token).as_bytes(),
        )
    }

    fn records(&self) -> usize {
        self.env.audit().len()
    }

    /// Waits for audit records after the first `before` and returns them.
    fn audited_since(&self, before: usize) -> Vec<serde_json::Value> {
        eventually(Duration::from_secs(5), || {
            let records = self.env.audit();
            (records.len() > before).then(|| records[before..].to_vec())
        })
    }

    /// The checks every case ends with: the status the agent got, no secret
    /// in anything it received, and an audit record with that status.
    fn assert_case(&self, name: &str, before: usize, received: &[u8], status: u16) {
        let text = String::from_utf8_lossy(received);
        assert_eq!(
            first_status(received),
            Some(status),
            "{name}: unexpected answer:\n{text}"
        );
        assert!(
            !text.contains(SECRET),
            "{name}: the agent received the secret:\n{text}"
        );
        let records = self.audited_since(before);
        assert!(
            records.iter().any(|r| r["status"] == status),
            "{name}: no audit record with status {status}: {records:?}"
        );
        let log = self.env.audit_text();
        assert!(
            !log.contains(SECRET),
            "{name}: the audit log holds the secret"
        );
    }

    fn upstream_saw(&self, fragment: &str) -> bool {
        self.upstream
            .seen()
            .iter()
            .any(|s| s.uri.contains(fragment))
    }
}

/// Sends `raw` on a new connection; returns every byte until the server
/// closes it (or 1.5 s of silence).
fn exchange(addr: SocketAddr, raw: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    stream.write_all(raw).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

fn first_status(received: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(received);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

fn responses_in(received: &[u8]) -> usize {
    String::from_utf8_lossy(received)
        .match_indices("HTTP/1.1 ")
        .filter(|(i, _)| *i == 0 || String::from_utf8_lossy(&received[..*i]).ends_with('\n'))
        .count()
}

const AUTH: &str = "Authorization: Bearer TOKEN\r\n";

#[test]
fn request_smuggling_and_desync_attempts_are_refused_or_read_one_way() {
    let a = arena();

    // CL + TE: read by Transfer-Encoding alone, and the connection closed
    // after the answer, so the request hidden after the chunked body is
    // never read.
    let before = a.records();
    let got = a.raw(&format!(
        "POST /echo/v1/allowed/cl-te HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Length: 4\r\n\
         Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
         GET /echo/v1/allowed/smuggled HTTP/1.1\r\nHost: x\r\n{AUTH}\r\n"
    ));
    a.assert_case("CL+TE", before, &got, 200);
    assert_eq!(responses_in(&got), 1, "only one request was read");
    assert!(!a.upstream_saw("smuggled"));

    // Framing the parser refuses: audited although no request was formed.
    let refused = [
        (
            "two Content-Lengths",
            format!(
                "POST /echo/v1/allowed/dup HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Length: 3\r\nContent-Length: 9\r\n\r\nabcGET /smuggled HTTP/1.1\r\n\r\n"
            ),
            400,
        ),
        (
            "obs-fold",
            format!(
                "GET /echo/v1/allowed/fold HTTP/1.1\r\nHost: x\r\n{AUTH}X-Folded: a\r\n b\r\n\r\n"
            ),
            400,
        ),
        (
            "Transfer-Encoding: chunked, identity",
            format!(
                "POST /echo/v1/allowed/te HTTP/1.1\r\nHost: x\r\n{AUTH}Transfer-Encoding: chunked, identity\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            ),
            400,
        ),
        (
            "an unknown transfer coding",
            format!(
                "POST /echo/v1/allowed/te HTTP/1.1\r\nHost: x\r\n{AUTH}Transfer-Encoding: gzip\r\n\r\n"
            ),
            400,
        ),
        (
            "a request line hidden behind a bare LF",
            format!(
                "GET /echo/v1/allowed/lf HTTP/1.1\r\nHost: x\r\n{AUTH}X-A: b\nGET /echo/v1/allowed/smuggled HTTP/1.1\r\n\r\n"
            ),
            400,
        ),
        // Transfer codings sidekey itself refuses, with its JSON error.
        (
            "Transfer-Encoding: identity, chunked",
            format!(
                "POST /echo/v1/allowed/te2 HTTP/1.1\r\nHost: x\r\n{AUTH}Transfer-Encoding: identity, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            ),
            400,
        ),
        (
            "two Host headers",
            format!(
                "GET /echo/v1/allowed/hosts HTTP/1.1\r\nHost: x\r\nHost: admin.internal\r\n{AUTH}\r\n"
            ),
            400,
        ),
        (
            "an invalid chunk size",
            format!(
                "POST /echo/v1/allowed/chunk HTTP/1.1\r\nHost: x\r\n{AUTH}Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"
            ),
            400,
        ),
        (
            "an overflowing chunk size",
            format!(
                "POST /echo/v1/allowed/chunk HTTP/1.1\r\nHost: x\r\n{AUTH}Transfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\nabc\r\n0\r\n\r\n"
            ),
            400,
        ),
    ];
    for (name, raw, status) in refused {
        let before = a.records();
        let got = a.raw(&raw);
        a.assert_case(name, before, &got, status);
        assert_eq!(responses_in(&got), 1, "{name}: one answer, then close");
    }
    assert!(!a.upstream_saw("smuggled"));
    assert!(!a.upstream_saw("/dup") && !a.upstream_saw("/fold") && !a.upstream_saw("/te"));
    assert!(!a.upstream_saw("/hosts"));

    // A bare LF line ending is read as one; the request goes upstream once,
    // re-framed by sidekey.
    let before = a.records();
    let got = a.raw(
        "GET /echo/v1/allowed/bare-lf HTTP/1.1\nHost: x\nAuthorization: Bearer TOKEN\nConnection: close\n\n",
    );
    a.assert_case("bare LF", before, &got, 200);
    assert_eq!(
        a.upstream
            .seen()
            .iter()
            .filter(|s| s.uri.contains("bare-lf"))
            .count(),
        1
    );
}

#[test]
fn header_injection_and_oversized_headers_are_refused() {
    let a = arena();
    let cases = [
        (
            "CR in a value",
            format!("GET /echo/v1/allowed/cr HTTP/1.1\r\nHost: x\r\n{AUTH}X-A: a\rb\r\n\r\n"),
            400,
        ),
        (
            "NUL in a value",
            format!("GET /echo/v1/allowed/nul HTTP/1.1\r\nHost: x\r\n{AUTH}X-A: a\0b\r\n\r\n"),
            400,
        ),
        (
            "a header without a colon",
            format!(
                "GET /echo/v1/allowed/colon HTTP/1.1\r\nHost: x\r\n{AUTH}Authorization Bearer x\r\n\r\n"
            ),
            400,
        ),
        (
            // Over the 64 KiB limit: refused by sidekey with its JSON error.
            "a 100 KB header",
            format!(
                "GET /echo/v1/allowed/big HTTP/1.1\r\nHost: x\r\n{AUTH}X-Big: {}\r\nConnection: close\r\n\r\n",
                "a".repeat(100_000)
            ),
            431,
        ),
        (
            // Past the parser's own cap.
            "a 400 KB header",
            format!(
                "GET /echo/v1/allowed/huge HTTP/1.1\r\nHost: x\r\n{AUTH}X-Big: {}\r\n\r\n",
                "a".repeat(400_000)
            ),
            431,
        ),
        (
            // Past the parser's cap on a URI, answered 414 and audited as
            // such, not as the 431 of a header.
            "a 70 KB URI",
            format!(
                "GET /echo/v1/allowed/longuri{} HTTP/1.1\r\nHost: x\r\n{AUTH}\r\n",
                "a".repeat(70_000)
            ),
            414,
        ),
        (
            "200 headers",
            format!(
                "GET /echo/v1/allowed/many HTTP/1.1\r\nHost: x\r\n{AUTH}{}\r\n",
                (0..200)
                    .map(|i| format!("X-{i}: a\r\n"))
                    .collect::<String>()
            ),
            431,
        ),
    ];
    for (name, raw, status) in cases {
        let before = a.records();
        let got = a.raw(&raw);
        a.assert_case(name, before, &got, status);
    }
    for path in [
        "/cr", "/nul", "/colon", "/big", "/huge", "/longuri", "/many",
    ] {
        assert!(!a.upstream_saw(path), "{path} reached the upstream");
    }
}

#[test]
fn the_credential_slot_cannot_be_smuggled() {
    let a = arena();

    // The token in Proxy-Authorization, the agent's own keys in the slot in
    // other letter cases: all overwritten by the one real credential.
    let before = a.records();
    let got = a.raw(
        "GET /echo/v1/allowed/cases HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Bearer TOKEN\r\n\
         AUTHORIZATION: Bearer agent-key-1\r\nauthorization: Bearer agent-key-2\r\nConnection: close\r\n\r\n",
    );
    a.assert_case("slot in other cases", before, &got, 200);
    let seen = a.upstream.last();
    assert_eq!(
        seen.header_all("authorization"),
        vec![format!("Bearer {SECRET}")]
    );
    assert!(seen.header("proxy-authorization").is_none());

    // The slot repeated with a second value: which one is the agent's token
    // is ambiguous, so nothing is sent.
    let before = a.records();
    let got = a.raw(
        "GET /echo/v1/allowed/repeated HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer TOKEN\r\n\
         Authorization: Bearer agent-key\r\nConnection: close\r\n\r\n",
    );
    a.assert_case("slot repeated", before, &got, 401);
    assert!(!a.upstream_saw("/repeated"));

    // The slot in a trailer, after injection has happened: dropped, over
    // HTTP/1.1 and over an HTTP/2 upstream (which would carry trailers).
    for (route, upstream) in [("echo", &a.upstream), ("h2", &a.h2)] {
        let before = a.records();
        let got = a.raw(&format!(
            "POST /{route}/v1/allowed/trailer HTTP/1.1\r\nHost: x\r\n{AUTH}Transfer-Encoding: chunked\r\n\
             Trailer: authorization\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\
             Authorization: Bearer agent-key\r\n\r\n"
        ));
        a.assert_case(&format!("slot in a trailer to {route}"), before, &got, 200);
        let seen = upstream.last();
        assert!(seen.uri.ends_with("/trailer"));
        assert_eq!(seen.body, b"abc");
        assert!(
            seen.trailers.is_empty(),
            "trailers reached {route}: {:?}",
            seen.trailers
        );
        assert_eq!(
            seen.header_all("authorization"),
            vec![format!("Bearer {SECRET}")]
        );
    }
}

/// HPACK "literal header field without indexing, new name" with plain
/// (not Huffman) strings.
fn hpack_literal(out: &mut Vec<u8>, name: &str, value: &str) {
    fn string(out: &mut Vec<u8>, s: &str) {
        let len = s.len();
        if len < 127 {
            out.push(len as u8);
        } else {
            out.push(127);
            let mut rest = len - 127;
            while rest >= 128 {
                out.push((rest % 128) as u8 | 0x80);
                rest /= 128;
            }
            out.push(rest as u8);
        }
        out.extend_from_slice(s.as_bytes());
    }
    out.push(0x00);
    string(out, name);
    string(out, value);
}

fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    frame.extend_from_slice(&[kind, flags]);
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// One h2c request (prior knowledge) with `headers` as given, pseudo-headers
/// included; returns the frames the server sent as (type, payload).
fn h2_exchange(addr: SocketAddr, headers: &[(&str, &str)]) -> Vec<(u8, Vec<u8>)> {
    const HEADERS: u8 = 1;
    const SETTINGS: u8 = 4;
    let mut block = Vec::new();
    for (name, value) in headers {
        hpack_literal(&mut block, name, value);
    }
    let mut raw = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    raw.extend(h2_frame(SETTINGS, 0, 0, &[]));
    raw.extend(h2_frame(HEADERS, 0x4 | 0x1, 1, &block));
    let received = exchange(addr, &raw);
    let mut frames = Vec::new();
    let mut rest = &received[..];
    while rest.len() >= 9 {
        let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
        if rest.len() < 9 + len {
            break;
        }
        frames.push((rest[3], rest[9..9 + len].to_vec()));
        rest = &rest[9 + len..];
    }
    frames
}

#[test]
fn http2_pseudo_header_collisions_do_not_steer_or_smuggle() {
    const DATA: u8 = 0;
    const RST_STREAM: u8 = 3;
    const GOAWAY: u8 = 7;
    let a = arena();
    let other = format!("127.0.0.1:{}", a.other.addr.port());

    // `:authority` and `host` naming other hosts: the gateway's route
    // decides where the credential goes, not either of them.
    let before = a.records();
    let frames = h2_exchange(
        a.sidekey.addr,
        &[
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/echo/v1/allowed/h2-authority"),
            (":authority", &other),
            ("host", "evil.example"),
            ("authorization", &format!("Bearer {}", a.token)),
        ],
    );
    let body: Vec<u8> = frames
        .iter()
        .filter(|(kind, _)| *kind == DATA)
        .flat_map(|(_, payload)| payload.clone())
        .collect();
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("[REDACTED]"),
        "the echo came back scrubbed: {body}"
    );
    assert!(!body.contains(SECRET));
    assert!(a.upstream_saw("/h2-authority"));
    assert!(
        a.other.seen().is_empty(),
        "the credential was steered to another host"
    );
    let records = a.audited_since(before);
    assert!(
        records
            .iter()
            .any(|r| r["status"] == 200 && r["path"] == "/v1/allowed/h2-authority")
    );

    // A second `:path` (a pseudo-header collision): a malformed request
    // that h2 resets before it is formed, so nothing goes upstream. (No
    // audit record: no request ever existed.)
    let frames = h2_exchange(
        a.sidekey.addr,
        &[
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/echo/v1/allowed/h2-first"),
            (":path", "/echo/v1/allowed/admin/h2-second"),
            (":authority", "x"),
            ("authorization", &format!("Bearer {}", a.token)),
        ],
    );
    assert!(
        frames
            .iter()
            .any(|(kind, _)| *kind == RST_STREAM || *kind == GOAWAY),
        "the malformed stream was reset: {frames:?}"
    );
    assert!(!a.upstream_saw("h2-first") && !a.upstream_saw("h2-second"));
}

#[test]
fn path_tricks_do_not_bypass_the_policy() {
    let a = arena();
    let cases = [
        ("/echo/v1/allowed/%2e%2e/secret", 400),
        ("/echo/v1/allowed/%2E%2E/%2e%2e/x", 400),
        ("/echo/v1/allowed/..;/admin/x", 400),
        ("/echo/v1/allowed/admin%2fx", 400),
        ("/echo/v1/allowed/admin%5cx", 400),
        ("/echo/v1/allowed/%c0%ae%c0%ae/x", 400),
        ("/echo/v1/allowed/%e0%80%ae/x", 400),
        ("/echo/v1/allowed/admin%00/x", 400),
        // Encoded twice, for an upstream that decodes again.
        ("/echo/v1/allowed/%252e%252e/admin/x", 400),
        ("/echo/v1/allowed/x%252fadmin", 400),
        ("/echo/v1/allowed/x%255cadmin", 400),
        // `..` once a Windows upstream drops trailing dots and spaces.
        ("/echo/v1/allowed/..%20/admin/x", 400),
        ("/echo/v1/allowed/.../admin/x", 400),
        ("/echo/v1/allowed//admin/x", 403),
        ("/echo//v1/allowed/admin/x", 403),
        ("/echo/v1/allowed/./admin/x", 403),
        ("/echo/v1/allowed/admin;jsessionid=1/x", 403),
        ("/echo/v1/allowed/ADMIN/x", 403),
        ("/echo/v1/allowed/%61dmin/x", 403),
        ("/echo/v1/allowed/admin./x", 403),
        ("/echo/v1/allowed/admin%20/x", 403),
        ("/echo/v1/allowed/admin", 403),
        ("/echo/v1/secret", 403),
        ("/echo/V1/allowed/x", 403),
    ];
    for (path, status) in cases {
        let before = a.records();
        let got = a.raw(&format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\n{AUTH}Connection: close\r\n\r\n"
        ));
        a.assert_case(path, before, &got, status);
    }
    assert!(
        a.upstream.seen().is_empty(),
        "a trick reached the upstream: {:?}",
        a.upstream
            .seen()
            .iter()
            .map(|s| s.uri.clone())
            .collect::<Vec<_>>()
    );
}

#[test]
fn forward_requests_go_where_sidekey_resolves_not_where_host_points() {
    let a = arena();
    let basic = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("coder:{}", a.token))
    };
    let up = a.upstream.addr;

    // Absolute-form to the route's origin with `Host` naming another host:
    // the credential goes to the URI's origin, which is the route's.
    let before = a.records();
    let got = exchange(
        a.sidekey.addr,
        format!(
            "GET http://{up}/v1/allowed/abs HTTP/1.1\r\nHost: evil.example\r\n\
             Proxy-Authorization: Basic {basic}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    );
    a.assert_case("absolute-form with a foreign Host", before, &got, 200);
    assert_eq!(
        a.upstream.last().header("host"),
        Some(up.to_string().as_str())
    );

    // Absolute-form to another host with `Host` naming the route's origin:
    // no route, no rule for coder, refused.
    let before = a.records();
    let other = a.other.addr;
    let got = exchange(
        a.sidekey.addr,
        format!(
            "GET http://{other}/v1/allowed/steer HTTP/1.1\r\nHost: {up}\r\n\
             Proxy-Authorization: Basic {basic}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    );
    a.assert_case("absolute-form with the route's Host", before, &got, 403);
    assert!(a.other.seen().is_empty());

    // CONNECT to a host only another agent may reach.
    let before = a.records();
    let got = exchange(
        a.sidekey.addr,
        format!(
            "CONNECT {other} HTTP/1.1\r\nHost: {other}\r\nProxy-Authorization: Basic {basic}\r\n\r\n"
        )
        .as_bytes(),
    );
    a.assert_case("CONNECT to another agent's host", before, &got, 403);
    let records = a.audited_since(before);
    assert!(
        records
            .iter()
            .any(|r| r["mode"] == "connect" && r["decision"] == "deny")
    );
    assert!(
        records.iter().all(|r| r["port"] == other.port()),
        "{records:?}"
    );

    // A port past 65535 is refused, not read as the scheme's default.
    // So is a CONNECT that is not host:port.
    for (name, head) in [
        (
            "absolute-form to port 99999",
            "GET http://127.0.0.1:99999/v1/allowed/port",
        ),
        ("CONNECT to port 99999", "CONNECT 127.0.0.1:99999"),
        // RFC 9110 9.3.6: host:port only. No port is not taken as 443, and
        // a URL is not read as a destination.
        ("CONNECT without a port", "CONNECT 127.0.0.1"),
        ("CONNECT to a URL", "CONNECT http://127.0.0.1:443/"),
    ] {
        let before = a.records();
        let got = exchange(
            a.sidekey.addr,
            format!(
                "{head} HTTP/1.1\r\nHost: 127.0.0.1:99999\r\n\
                 Proxy-Authorization: Basic {basic}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        );
        a.assert_case(name, before, &got, 400);
    }
    assert!(a.other.seen().is_empty());
}

#[test]
fn upstream_redirects_and_error_pages_do_not_carry_the_secret_out() {
    let a = arena();
    let proxy = format!("http://coder:{}@{}", a.token, a.sidekey.addr);

    // A redirect to another origin: sidekey does not follow it, and its
    // body and headers (which echo the credential) are scrubbed.
    let before = a.records();
    let (status, text) = curl(&[
        &a.sidekey.url(&format!(
            "/echo/v1/allowed/redirect-to/{}",
            a.other.addr.port()
        )),
        "-H",
        &format!("authorization: Bearer {}", a.token),
    ]);
    a.assert_case("redirect", before, text.as_bytes(), status);
    assert_eq!(status, 302);
    assert!(a.other.seen().is_empty(), "sidekey followed the redirect");
    assert!(
        text.contains(&format!(
            "location: http://127.0.0.1:{}/landed",
            a.other.addr.port()
        )),
        "another origin's redirect is left as it is: {text}"
    );
    // One within the route's own origin is told through the gateway, so a
    // client that follows it comes back through sidekey, not straight to
    // the upstream with its agent token.
    let (status, text) = curl(&[
        &a.sidekey.url(&format!(
            "/echo/v1/allowed/redirect-to/{}",
            a.upstream.addr.port()
        )),
        "-H",
        &format!("authorization: Bearer {}", a.token),
    ]);
    assert_eq!(status, 302);
    assert!(text.contains("location: /echo/landed\r\n"), "{text}");

    // The agent follows it itself, through the proxy: the other origin is
    // not the route's, so no credential goes with it (and coder may not
    // reach it at all).
    let before = a.records();
    let (status, text) = curl_via(
        &proxy,
        &[
            "-L",
            &format!(
                "http://{}/v1/allowed/redirect-to/{}",
                a.upstream.addr,
                a.other.addr.port()
            ),
        ],
    );
    assert_eq!(status, 403, "{text}");
    assert!(!text.contains(SECRET));
    assert!(a.other.seen().is_empty());
    let records = a.audited_since(before);
    assert!(
        records.iter().any(|r| r["status"] == 302) && records.iter().any(|r| r["status"] == 403)
    );

    // Error pages that echo the credential, in headers and body.
    for code in [400, 401, 500, 502] {
        let before = a.records();
        let got = a.raw(&format!(
            "GET /echo/v1/allowed/status/{code} HTTP/1.1\r\nHost: x\r\n{AUTH}Connection: close\r\n\r\n"
        ));
        a.assert_case(&format!("echoing {code} page"), before, &got, code);
        assert!(String::from_utf8_lossy(&got).contains("[REDACTED]"));
    }
}

#[test]
fn a_token_put_in_a_path_or_host_never_lands_whole_in_the_audit_log() {
    let a = arena();
    let another = a.env.token("reviewer");
    let headers = |token: &str| format!("Authorization: Bearer {token}");
    for (args, status) in [
        // Someone else's token in the path of an allowed-looking request.
        (
            vec![
                "-H".to_string(),
                headers(&a.token),
                a.sidekey.url(&format!("/echo/v1/allowed/{another}")),
            ],
            200,
        ),
        // In the route segment, with no credentials at all.
        (vec![a.sidekey.url(&format!("/nope{another}/x"))], 401),
        // Its own token in the path of a denied request.
        (
            vec![
                "-H".to_string(),
                headers(&a.token),
                a.sidekey.url(&format!("/echo/v1/denied/{}", a.token)),
            ],
            403,
        ),
    ] {
        let before = a.records();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (got, text) = curl(&args);
        assert_eq!(got, status, "{args:?}: {text}");
        eventually(Duration::from_secs(3), || {
            (a.records() > before).then_some(())
        });
    }
    // As a forward proxy's destination host.
    let (_, _) = curl_via(
        &format!("http://coder:{}@{}", a.token, a.sidekey.addr),
        &[&format!("http://{another}.example/")],
    );
    let log = a.env.audit_text();
    for token in [&a.token, &another] {
        assert!(
            !log.contains(token.as_str()),
            "a whole token in the audit log:\n{log}"
        );
        let (head, rest) = token.split_once('.').unwrap();
        let (payload, _) = rest.split_once('.').unwrap();
        assert!(!log.contains(&format!("{head}.{payload}")), "{log}");
    }
    assert!(
        log.contains("/echo/v1/allowed/[REDACTED]") || log.contains("/v1/allowed/[REDACTED]"),
        "{log}"
    );
}

#[test]
fn a_token_replayed_after_expiry_or_revocation_is_refused() {
    let a = arena();
    let short = a.env.token_with(&["coder", "--ttl", "1s"]);
    let revoked = a.env.token_with(&["coder", "--session", "doomed"]);
    a.env.ok(&["token", "revoke", "--session", "doomed"], None);
    // Past the 1 s lifetime (expiry is checked to the second, no skew for
    // sidekey's own tokens).
    std::thread::sleep(Duration::from_millis(2100));
    for (name, token, code) in [
        ("expired", &short, "token_expired"),
        ("revoked", &revoked, "token_revoked"),
    ] {
        let before = a.records();
        let got = exchange(
            a.sidekey.addr,
            format!(
                "GET /echo/v1/allowed/replay HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        );
        a.assert_case(name, before, &got, 401);
        assert!(String::from_utf8_lossy(&got).contains(code), "{name}");
        // The token is genuine, so the refusal names who kept trying.
        let claims = claims_of(token);
        let record = a.audited_since(before).pop().unwrap();
        for (field, claim) in [("agent", "sub"), ("session", "sid"), ("token_id", "jti")] {
            assert_eq!(record[field], claims[claim], "{name}: {field} in {record}");
        }
        assert_eq!(record["reason"], code, "{record}");
        assert_eq!(record["route"], "echo", "{record}");
        assert_eq!(record["host"], "127.0.0.1", "{record}");

        let before = a.records();
        let (status, text) = curl_via(
            &format!("http://coder:{token}@{}", a.sidekey.addr),
            &[&format!("http://{}/v1/allowed/replay", a.upstream.addr)],
        );
        a.assert_case(
            &format!("{name} via the forward proxy"),
            before,
            text.as_bytes(),
            status,
        );
        assert_eq!(status, 407);
        // And where it was going.
        let record = a.audited_since(before).pop().unwrap();
        assert_eq!(record["token_id"], claims["jti"], "{record}");
        assert_eq!(record["host"], "127.0.0.1", "{record}");
        assert_eq!(record["port"], a.upstream.addr.port(), "{record}");
    }
    assert!(!a.upstream_saw("/replay"));

    // A forged token names nobody.
    let at = revoked.rfind('.').unwrap() + 10;
    let flipped = if &revoked[at..=at] == "A" { "B" } else { "A" };
    let forged = format!("{}{flipped}{}", &revoked[..at], &revoked[at + 1..]);
    let before = a.records();
    let got = exchange(
        a.sidekey.addr,
        format!(
            "GET /echo/v1/allowed/replay HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {forged}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    );
    a.assert_case("forged", before, &got, 401);
    let record = a.audited_since(before).pop().unwrap();
    assert!(
        record["agent"].is_null() && record["token_id"].is_null(),
        "{record}"
    );
}

/// The claims of one of sidekey's agent tokens, read without checking it.
fn claims_of(token: &str) -> serde_json::Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&json).unwrap()
}

#[test]
fn another_process_of_the_same_user_cannot_read_sidekeys_memory_and_no_core_is_written() {
    // Both sidekey and the reader run without capabilities (as an agent
    // would), so only sidekey's own protection stands between them.
    const CAPLESS: [&str; 4] = [
        "setpriv",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
    ];
    let upstream = Upstream::http();
    let env = TestEnv::new(&echo_route(&upstream, "env:HYGIENE_SECRET"));
    let sidekey = env.spawn_wrapped(&CAPLESS, "127.0.0.1:0", &[("HYGIENE_SECRET", SECRET)]);
    let pid = sidekey.child.id();
    let read = |target: u32, file: &str| {
        std::process::Command::new(CAPLESS[0])
            .args(&CAPLESS[1..])
            .args(["cat", &format!("/proc/{target}/{file}")])
            .output()
            .unwrap()
    };
    for file in ["environ", "mem"] {
        let out = read(pid, file);
        assert!(!out.status.success(), "/proc/{pid}/{file} was readable");
        assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
        assert!(!String::from_utf8_lossy(&out.stdout).contains(SECRET));
    }
    // The same reader can read an ordinary process of the same standing:
    // the refusal above is sidekey's doing.
    let mut control = std::process::Command::new(CAPLESS[0])
        .args(&CAPLESS[1..])
        .args(["sleep", "30"])
        .env("CONTROL_MARKER", "visible")
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let out = read(control.id(), "environ");
    let _ = control.kill();
    let _ = control.wait();
    assert!(String::from_utf8_lossy(&out.stdout).contains("CONTROL_MARKER=visible"));

    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(core.split_whitespace().nth(4), Some("0"), "{core}");
    assert_eq!(core.split_whitespace().nth(5), Some("0"), "{core}");
}

/// A blind tunnel to the `other` upstream, with one request through it.
fn blind_tunnel(a: &Arena, token: &str) -> TcpStream {
    let other = a.other.addr;
    let mut conn = TcpStream::connect(a.sidekey.addr).unwrap();
    conn.write_all(
        format!(
            "CONNECT {other} HTTP/1.1\r\nHost: {other}\r\nProxy-Authorization: Bearer {token}\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let head = read_head(&mut conn);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    conn.write_all(format!("GET /through HTTP/1.1\r\nHost: {other}\r\n\r\n").as_bytes())
        .unwrap();
    let head = read_head(&mut conn);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    conn
}

/// A WebSocket through the reverse gateway at `path` (ending in `/ws`),
/// with the real credential on its upgrade.
fn websocket(a: &Arena, path: &str, token: &str) -> TcpStream {
    let mut ws = TcpStream::connect(a.sidekey.addr).unwrap();
    ws.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nHost: s\r\nAuthorization: Bearer {token}\r\n\
             Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let head = read_head(&mut ws);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    ws
}

/// The record that opened `session`'s one connection and the one deny
/// that closed it.
fn closing_record<'r>(
    records: &'r [serde_json::Value],
    session: &str,
) -> (&'r serde_json::Value, &'r serde_json::Value) {
    let opened = records
        .iter()
        .find(|r| r["session"] == session && r["decision"] == "allow")
        .unwrap_or_else(|| panic!("no opening record for {session}"));
    let closed = records
        .iter()
        .filter(|r| r["request_id"] == opened["request_id"] && r["decision"] == "deny")
        .collect::<Vec<_>>();
    assert_eq!(closed.len(), 1, "{session}: {closed:?}");
    (opened, closed[0])
}

/// Whether the peer closes `conn` within `within` (bytes that still arrive
/// are read and dropped).
fn closed_within(conn: &mut TcpStream, within: Duration) -> bool {
    conn.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = std::time::Instant::now() + within;
    let mut buf = [0u8; 4096];
    while std::time::Instant::now() < deadline {
        match conn.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

/// Reads one HTTP/1 response from `conn` (its body by its length); returns
/// the head.
fn read_head(conn: &mut TcpStream) -> String {
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            conn.read(&mut byte).unwrap(),
            1,
            "closed mid-head: {head:?}"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let length = head
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, value)| value.trim().parse::<usize>().unwrap());
    let mut body = vec![0u8; length];
    conn.read_exact(&mut body).unwrap();
    head
}

#[test]
fn a_revoked_or_expired_agent_loses_its_open_tunnels_and_websockets() {
    let a = arena();
    let other = a.other.addr;
    // A blind tunnel, opened by an agent that is then revoked.
    let connect = |token: &str| blind_tunnel(&a, token);
    let revoked_tunnel = a.env.token_with(&["reviewer", "--session", "tunnel-s"]);
    let mut tunnel = connect(&revoked_tunnel);
    let expiring_tunnel = a.env.token_with(&["reviewer", "--ttl", "2s"]);
    let mut short_tunnel = connect(&expiring_tunnel);
    let kept_tunnel = a.env.token_with(&["reviewer"]);
    let mut kept = connect(&kept_tunnel);

    // A WebSocket whose upgrade carried the real credential.
    let ws_token = a.env.token_with(&["coder", "--session", "ws-s"]);
    let mut ws = websocket(&a, "/echo/v1/allowed/ws", &ws_token);
    assert!(!closed_within(&mut ws, Duration::from_millis(600)));

    a.env
        .ok(&["token", "revoke", "--session", "tunnel-s"], None);
    a.env.ok(&["token", "revoke", "--session", "ws-s"], None);
    // SPEC: within 1 s of the revocation; the watcher's poll and the
    // connection's check leave a margin here for a loaded machine.
    assert!(
        closed_within(&mut tunnel, Duration::from_secs(3)),
        "revoked tunnel still open"
    );
    assert!(
        closed_within(&mut ws, Duration::from_secs(3)),
        "revoked WebSocket still open"
    );
    assert!(
        closed_within(&mut short_tunnel, Duration::from_secs(4)),
        "expired tunnel still open"
    );

    // A tunnel whose agent still holds goes on working, through a reload.
    a.env.ok(&["reload"], None);
    std::thread::sleep(Duration::from_millis(1200));
    kept.write_all(format!("GET /still HTTP/1.1\r\nHost: {other}\r\n\r\n").as_bytes())
        .unwrap();
    let head = read_head(&mut kept);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // Each closing is audited as a refusal under the request id that opened
    // the connection; the connection that still holds has no such record.
    let records = a.env.audit();
    let closing = |session: &str| closing_record(&records, session);
    let same = ["agent", "token_id", "mode", "host", "port", "route"];
    for (session, status) in [("tunnel-s", 407), ("ws-s", 401)] {
        let (opened, closed) = closing(session);
        assert_eq!(closed["reason"], "token_revoked", "{closed}");
        assert_eq!(closed["status"], status, "{closed}");
        assert_eq!(closed["rule"], serde_json::Value::Null, "{closed}");
        for field in same {
            assert_eq!(closed[field], opened[field], "{field} of {closed}");
        }
    }
    let expired = records
        .iter()
        .filter(|r| r["mode"] == "connect" && r["reason"] == "token_expired")
        .count();
    assert_eq!(expired, 1, "{records:?}");
    let denials = records
        .iter()
        .filter(|r| r["mode"] == "connect" && r["decision"] == "deny")
        .count();
    assert_eq!(
        denials, 2,
        "only the revoked and the expired tunnels closed"
    );
    assert_no_leak(&a.env.audit_text(), SECRET, "audit");
}

/// A reload that withdraws what the policy granted an open blind tunnel or
/// WebSocket closes it, and audits the closing; what is still allowed stays.
#[test]
fn a_reload_that_withdraws_a_permission_closes_what_it_let_open() {
    let a = arena();
    let reviewer = a.env.token_with(&["reviewer", "--session", "tunnel-s"]);
    let mut tunnel = blind_tunnel(&a, &reviewer);
    let coder = |session: &str| a.env.token_with(&["coder", "--session", session]);
    let mut chat = websocket(&a, "/echo/v1/allowed/chat/ws", &coder("chat-s"));
    let mut kept = websocket(&a, "/echo/v1/allowed/kept/ws", &coder("kept-s"));

    // The reviewer's host rule now needs to see paths (so a tunnel would be
    // intercepted), and a deny covers the chat WebSocket's path.
    let config = std::fs::read_to_string(&a.env.config).unwrap();
    let port = a.other.addr.port();
    let narrowed = config.replace(
        &format!("port = {port}\naction"),
        &format!("port = {port}\npaths = [\"/through\"]\naction"),
    ) + "\n[[rules]]\nname = \"no-chat\"\nagents = [\"coder\"]\nroute = \"echo\"\npaths = [\"/v1/allowed/chat/**\"]\naction = \"deny\"\n";
    assert_ne!(narrowed, config);
    std::fs::write(&a.env.config, narrowed).unwrap();
    a.env.ok(&["reload"], None);

    assert!(
        closed_within(&mut tunnel, Duration::from_secs(3)),
        "tunnel kept after its rule changed"
    );
    assert!(
        closed_within(&mut chat, Duration::from_secs(3)),
        "WebSocket kept after a deny covered it"
    );
    // Past the upstream's greeting frames, the kept one still echoes.
    assert!(!closed_within(&mut kept, Duration::from_millis(300)));
    kept.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    kept.write_all(b"\x81\x04ping").unwrap();
    let mut echo = [0u8; 6];
    kept.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"\x81\x04ping");

    let records = a.env.audit();
    let (_, closed) = closing_record(&records, "tunnel-s");
    assert_eq!(
        (&closed["reason"], &closed["status"]),
        (&"policy_denied".into(), &403.into()),
        "{closed}"
    );
    let (_, closed) = closing_record(&records, "chat-s");
    assert_eq!(closed["reason"], "policy_denied", "{closed}");
    assert_eq!(closed["rule"], "no-chat", "{closed}");
    assert!(
        !records
            .iter()
            .any(|r| r["session"] == "kept-s" && r["decision"] == "deny"),
        "{records:?}"
    );
}

/// A blind tunnel carries requests sidekey never sees; once a reload makes
/// its origin a route's, a new CONNECT there would be intercepted, so the
/// open one is closed too.
#[test]
fn a_route_added_for_a_blind_tunnels_origin_closes_the_tunnel() {
    let a = arena();
    let reviewer = a.env.token_with(&["reviewer", "--session", "tunnel-s"]);
    let mut tunnel = blind_tunnel(&a, &reviewer);
    assert!(!closed_within(&mut tunnel, Duration::from_millis(700)));

    let config = std::fs::read_to_string(&a.env.config).unwrap();
    let routed = format!(
        "{config}\n[routes.other]\nupstream = \"https://127.0.0.1:{}\"\nallow_private = true\n",
        a.other.addr.port()
    );
    std::fs::write(&a.env.config, routed).unwrap();
    a.env.ok(&["reload"], None);
    assert!(
        closed_within(&mut tunnel, Duration::from_secs(3)),
        "blind tunnel kept to what is now a route's origin"
    );
    let records = a.env.audit();
    let (_, closed) = closing_record(&records, "tunnel-s");
    assert_eq!(closed["reason"], "policy_denied", "{closed}");
}
