use std::io::{Read, Write};
use std::time::Duration;

use crate::support::*;

fn env_with(limits: &str, upstream: &Upstream) -> (TestEnv, String) {
    let env = TestEnv::new(&format!(
        "[limits]\n{limits}\n{}",
        echo_route(upstream, "store")
    ));
    env.set_secret("api", "sk-limits-secret");
    let token = env.token("coder");
    (env, token)
}

/// Reads until the peer closes; returns what came.
fn read_to_close(stream: &mut std::net::TcpStream) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends `CONNECT authority` with the agent's token; returns the
/// connection and the first bytes of the answer's status line.
fn open_tunnel(sidekey: &Sidekey, authority: &str, token: &str) -> (std::net::TcpStream, String) {
    let mut conn = std::net::TcpStream::connect(sidekey.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(
        format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nProxy-Authorization: Bearer {token}\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let mut head = [0u8; 12];
    conn.read_exact(&mut head).unwrap();
    (conn, String::from_utf8_lossy(&head).into_owned())
}

#[test]
fn connections_over_the_cap_get_a_clear_refusal() {
    let upstream = Upstream::http();
    let (env, token) = env_with("max_connections = 2", &upstream);
    let sidekey = env.spawn();
    let mut held: Vec<RawConn> = (0..2)
        .map(|_| {
            let mut conn = RawConn::connect(sidekey.addr);
            conn.send(&format!(
                "GET /echo/x HTTP/1.1\r\nHost: s\r\nAuthorization: Bearer {token}\r\n\r\n"
            ));
            assert_eq!(conn.read_response().0, 200);
            conn
        })
        .collect();
    let mut third = std::net::TcpStream::connect(sidekey.addr).unwrap();
    let reply = read_to_close(&mut third);
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply:?}");
    assert!(reply.contains("too_many_connections"), "{reply}");

    // A slot frees when a connection closes.
    held.pop();
    eventually(Duration::from_secs(5), || {
        let res = client()
            .get(sidekey.url("/echo/x"))
            .bearer_auth(&token)
            .send()
            .ok()?;
        (res.status() == 200).then_some(())
    });
}

#[test]
fn idle_connections_are_closed_and_slow_headers_time_out() {
    let upstream = Upstream::http();
    let (env, token) = env_with(
        "idle_timeout = \"300ms\"\nheader_timeout = \"500ms\"",
        &upstream,
    );
    let sidekey = env.spawn();

    // Idle keep-alive: served, then closed once nothing moves.
    let mut conn = std::net::TcpStream::connect(sidekey.addr).unwrap();
    conn.write_all(
        format!("GET /echo/x HTTP/1.1\r\nHost: s\r\nAuthorization: Bearer {token}\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let reply = read_to_close(&mut conn);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");

    // Slowloris: a head that never ends is cut, while others are served.
    let mut slow = std::net::TcpStream::connect(sidekey.addr).unwrap();
    slow.write_all(b"GET /echo/x HTTP/1.1\r\nHost: s\r\n")
        .unwrap();
    let res = client()
        .get(sidekey.url("/echo/x"))
        .bearer_auth(&token)
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    let reply = read_to_close(&mut slow);
    assert!(!reply.contains("200 OK"), "{reply}");
}

#[test]
fn oversized_headers_and_bodies_are_refused() {
    let upstream = Upstream::http();
    let (env, token) = env_with("max_header_bytes = 4096\nmax_body_bytes = 100", &upstream);
    let sidekey = env.spawn();
    let big = "a".repeat(16 * 1024);
    let res = client()
        .get(sidekey.url("/echo/x"))
        .bearer_auth(&token)
        .header("x-big", big)
        .send()
        .unwrap();
    assert_eq!(res.status(), 431);
    assert_eq!(res.headers()["x-sidekey-error"], "request_too_large");
    assert!(res.headers().contains_key("x-sidekey-request-id"));
    // Chunked (no Content-Length) bodies are cut at the limit too.
    let body = reqwest::blocking::Body::new(std::io::Cursor::new(vec![b'x'; 1000]));
    let res = client()
        .post(sidekey.url("/echo/x"))
        .bearer_auth(&token)
        .body(body)
        .send()
        .unwrap();
    assert_eq!(res.status(), 413);
    assert!(upstream.seen().iter().all(|s| s.body.len() <= 100));
}

#[test]
fn tunnels_count_against_the_cap_and_close_when_idle() {
    let upstream = Upstream::http();
    let port = upstream.addr.port();
    let env = TestEnv::new(&format!(
        "[limits]\nmax_connections = 2\nidle_timeout = \"500ms\"\n[[rules]]\nagents = [\"coder\"]\nhost = \"127.0.0.1\"\nport = {port}\naction = \"allow\"\n"
    ));
    let token = env.token("coder");
    let sidekey = env.spawn();
    let authority = format!("127.0.0.1:{port}");
    let open_tunnel = || open_tunnel(&sidekey, &authority, &token);
    let (mut first, head) = open_tunnel();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (_second, head) = open_tunnel();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Both tunnels hold their places: a third connection is turned away.
    let mut third = std::net::TcpStream::connect(sidekey.addr).unwrap();
    assert!(read_to_close(&mut third).contains("too_many_connections"));
    // Silent tunnels are closed after the idle timeout, freeing the places.
    let rest = read_to_close(&mut first);
    assert!(!rest.contains("HTTP/1.1 200"), "{rest}");
    eventually(Duration::from_secs(5), || {
        let (_conn, head) = open_tunnel();
        head.starts_with("HTTP/1.1 200").then_some(())
    });
}

#[test]
fn an_intercepted_tunnel_whose_handshake_stalls_is_closed_when_idle() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::https(dir.path());
    let env = TestEnv::new(&format!(
        "[tls]\nupstream_ca = [\"{}\"]\n[limits]\nmax_connections = 1\nidle_timeout = \"500ms\"\n{}",
        upstream.ca.as_ref().unwrap().display(),
        echo_route(&upstream, "store")
    ));
    env.set_secret("api", "sk-limits-secret");
    let token = env.token("coder");
    let sidekey = env.spawn();
    let authority = format!("localhost:{}", upstream.addr.port());
    let open_tunnel = || open_tunnel(&sidekey, &authority, &token);
    // Intercepted (the route's origin), then not one byte of the TLS
    // handshake: the tunnel holds the only place until it is closed.
    let (mut stalled, head) = open_tunnel();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut turned_away = std::net::TcpStream::connect(sidekey.addr).unwrap();
    assert!(read_to_close(&mut turned_away).contains("too_many_connections"));
    let waited = std::time::Instant::now();
    let mut rest = Vec::new();
    let closed = stalled.read_to_end(&mut rest);
    assert!(
        closed.is_ok(),
        "a stalled handshake kept its tunnel open for {:?}: {closed:?}",
        waited.elapsed()
    );
    eventually(Duration::from_secs(5), || {
        let (_conn, head) = open_tunnel();
        head.starts_with("HTTP/1.1 200").then_some(())
    });
}
