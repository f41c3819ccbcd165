//! The upstream connection pool: connections are reused across agents'
//! requests, and never in a state that could hand one agent's response, or
//! part of it, to another.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::support::*;

const SECRET: &str = "sk-live-pool-9e2d41";

fn echo_env(upstream: &Upstream) -> TestEnv {
    let env = match upstream.ca {
        Some(_) => tls_echo_env(upstream, "store"),
        None => TestEnv::new(&echo_route(upstream, "store")),
    };
    env.set_secret("api", SECRET);
    env
}

/// The body of what `curl` printed (it shows the head too).
fn body_of(shown: &str) -> &str {
    shown.split_once("\r\n\r\n").map_or(shown, |(_, body)| body)
}

#[test]
fn requests_from_separate_agent_connections_share_one_upstream_connection() {
    let dir = tempfile::tempdir().unwrap();
    // HTTP/1.1 over plain TCP, and HTTP/2 (agreed by ALPN) over TLS.
    for upstream in [Upstream::http(), Upstream::https(dir.path())] {
        let env = echo_env(&upstream);
        let auth = format!("Authorization: Bearer {}", env.token("coder"));
        let sidekey = env.spawn();
        for n in 0..3 {
            // Each curl is a new agent connection.
            let (status, body) = curl(&["-H", &auth, &sidekey.url(&format!("/echo/n/{n}?q=1"))]);
            assert_eq!(status, 200, "{body}");
        }
        let seen = upstream.seen();
        assert_eq!(seen.len(), 3);
        assert!(
            seen.iter().all(|s| s.peer == seen[0].peer),
            "{}: each request opened its own upstream connection: {:?}",
            upstream.base(),
            seen.iter().map(|s| s.peer).collect::<Vec<_>>()
        );
        for (n, s) in seen.iter().enumerate() {
            // HTTP/2 carries the scheme and authority as well.
            assert!(s.uri.ends_with(&format!("/n/{n}?q=1")), "{}", s.uri);
            assert_eq!(
                s.header("authorization"),
                Some(format!("Bearer {SECRET}").as_str())
            );
            match upstream.ca {
                None => {
                    assert_eq!(s.version, "HTTP/1.1");
                    assert_eq!(
                        s.header_all("host"),
                        vec![format!("127.0.0.1:{}", upstream.addr.port())]
                    );
                }
                Some(_) => assert_eq!(s.version, "HTTP/2.0"),
            }
        }
    }
}

#[test]
fn a_response_an_agent_abandoned_is_never_read_by_the_next_agent() {
    let upstream = Upstream::http();
    let env = echo_env(&upstream);
    let token = env.token("coder");
    let sidekey = env.spawn();

    // The first agent reads the first event of a stream, then goes away
    // while the upstream is still sending on that connection.
    let mut first = TcpStream::connect(sidekey.addr).unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        first,
        "GET /echo/sse HTTP/1.1\r\nHost: sidekey\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !String::from_utf8_lossy(&got).contains("data: first") {
        let n = first.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended early");
        got.extend_from_slice(&buf[..n]);
    }
    drop(first);
    upstream.release();

    // The next agent gets its own answer, over a connection of its own.
    let auth = format!("Authorization: Bearer {token}");
    for n in 0..3 {
        let (status, body) = curl(&["-H", &auth, &sidekey.url(&format!("/echo/after/{n}"))]);
        assert_eq!(status, 200, "{body}");
        assert!(!body.contains("data: second"), "{body}");
        let echoed: serde_json::Value = serde_json::from_str(body_of(&body)).expect("an echo");
        assert_eq!(echoed["uri"], format!("/after/{n}"), "{body}");
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), 4);
    assert_ne!(
        seen[1].peer, seen[0].peer,
        "a connection with a response still coming was reused"
    );
    assert_eq!(
        seen[2].peer, seen[1].peer,
        "a connection whose response was read to its end was not reused"
    );
}

/// An upstream that answers one request per connection with a keep-alive
/// response, then closes the connection a moment later without saying so,
/// as servers do when their keep-alive timeout is shorter than ours.
struct ClosingUpstream {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
}

impl ClosingUpstream {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                counted.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match stream.read(&mut byte) {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok");
                    std::thread::sleep(Duration::from_millis(100));
                });
            }
        });
        Self { addr, connections }
    }
}

#[test]
fn a_kept_alive_connection_the_upstream_closed_is_replaced_without_failing_a_request() {
    let upstream = ClosingUpstream::start();
    let env = TestEnv::new(&echo_route_to(
        &format!("http://{}", upstream.addr),
        "store",
    ));
    env.set_secret("api", SECRET);
    let auth = format!("Authorization: Bearer {}", env.token("coder"));
    let sidekey = env.spawn();
    for n in 0..3 {
        let (status, body) = curl(&["-H", &auth, &sidekey.url(&format!("/echo/{n}"))]);
        assert_eq!((status, body_of(&body)), (200, "ok"), "request {n}");
        // Long enough for the upstream to have closed the connection.
        std::thread::sleep(Duration::from_millis(400));
    }
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 3);
    let audit = env.audit();
    assert!(
        audit.iter().all(|r| r["status"] == 200),
        "{}",
        env.audit_text()
    );
}

/// Pooled upstream connections are closed after a minute unused, HTTP/1.1
/// and a shared HTTP/2 one alike, so a sidecar that once called many hosts
/// does not hold a socket to each for ever.
#[test]
fn idle_upstream_connections_are_closed_after_a_minute() {
    let dir = tempfile::tempdir().unwrap();
    let plain = Upstream::http();
    let tls = Upstream::https(dir.path());
    let routes = [("echo", plain.base()), ("echo-tls", tls.base())]
        .map(|(name, origin)| {
            format!(
                "[routes.{name}]\nupstream = \"{origin}\"\nallow_private = true\n\
                 inject = {{ header = \"authorization\", format = \"Bearer {{secret}}\", secret = \"api\" }}\n\
                 [[rules]]\nagents = [\"coder\"]\nroute = \"{name}\"\naction = \"allow\"\n"
            )
        })
        .concat();
    let env = TestEnv::new(&format!(
        "[tls]\nupstream_ca = [\"{}\"]\n[secrets.api]\nsource = \"store\"\n{routes}",
        tls.ca.as_ref().unwrap().display()
    ));
    env.set_secret("api", "sk-pool-idle-secret");
    let token = env.token("coder");
    let sidekey = env.spawn();
    for route in ["echo", "echo-tls"] {
        let res = client()
            .get(sidekey.url(&format!("/{route}/x")))
            .bearer_auth(&token)
            .send()
            .unwrap();
        assert_eq!(res.status(), 200, "{route}");
    }
    assert_eq!(tls.last().version, "HTTP/2.0");
    assert_eq!(plain.last().version, "HTTP/1.1");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        (plain.open_connections(), tls.open_connections()),
        (1, 1),
        "kept for the next request"
    );
    // The pool's limit is 60 s, checked every 15 s.
    eventually(Duration::from_secs(90), || {
        (plain.open_connections() == 0 && tls.open_connections() == 0).then_some(())
    });
}
