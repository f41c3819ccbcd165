use std::io::Read;

use crate::support::*;

const SECRET: &str = "sk-live-scrub-9a8b7c6d5e";

fn setup() -> (Upstream, TestEnv, String, Sidekey) {
    let upstream = Upstream::http();
    let env = TestEnv::new(&echo_route(&upstream, "store"));
    env.set_secret("api", SECRET);
    let token = env.token("coder");
    let sidekey = env.spawn();
    (upstream, env, token, sidekey)
}

#[test]
fn an_echoed_secret_comes_back_redacted_in_body_and_headers() {
    let (upstream, env, token, sidekey) = setup();
    let (status, text) = curl(&[
        "-H",
        &format!("Authorization: Bearer {token}"),
        &sidekey.url("/echo/anything?x=1"),
    ]);
    assert_eq!(status, 200);
    assert_eq!(
        upstream.last().header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );
    assert_no_leak(&text, SECRET, "response");
    assert!(text.contains("x-echo-auth: Bearer [REDACTED]"), "{text}");
    assert!(text.contains("\"Bearer [REDACTED]\""), "{text}");
    let record = env.audit().pop().unwrap();
    assert_eq!(record["redactions"], 2, "{record}");
    assert!(record["bytes_out"].as_u64().unwrap() > 0);
    assert_no_leak(&sidekey.stderr(), SECRET, "stderr");

    // A header named after the credential cannot hold `[REDACTED]`: it goes.
    let (status, text) = curl(&[
        "-H",
        &format!("Authorization: Bearer {token}"),
        &sidekey.url("/echo/header-name"),
    ]);
    assert_eq!(status, 200, "{text}");
    assert!(text.ends_with("named"), "{text}");
    assert_no_leak(&text, SECRET, "a header name");
    assert_eq!(env.audit().pop().unwrap()["redactions"], 1);
}

#[test]
fn a_status_line_naming_the_secret_gets_the_standard_reason_phrase() {
    let (upstream, _env, token, sidekey) = setup();
    let auth = format!("Authorization: Bearer {token}");
    // Directly, the upstream's status line repeats the credential...
    let (status, text) = curl(&[
        "-H",
        &format!("Authorization: Bearer {SECRET}"),
        &format!("{}/reason", upstream.base()),
    ]);
    assert_eq!(status, 401);
    assert!(
        text.starts_with(&format!("HTTP/1.1 401 Invalid key Bearer {SECRET}\r\n")),
        "{text}"
    );
    // ...through sidekey the agent gets the standard phrase.
    let (status, text) = curl(&["-H", &auth, &sidekey.url("/echo/reason")]);
    assert_eq!(status, 401, "{text}");
    assert!(text.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{text}");
    assert_no_leak(&text, SECRET, "status line");
}

#[test]
fn a_secret_split_across_two_chunks_is_still_redacted() {
    let (_upstream, _env, token, sidekey) = setup();
    for _ in 0..3 {
        let out = python(
            "r = requests.get(sys.argv[1], headers={'Authorization': 'Bearer ' + sys.argv[2]}, stream=True)\n\
             body = b''.join(r.iter_content(chunk_size=None))\n\
             print(r.status_code)\n\
             print(body.decode())",
            &[&sidekey.url("/echo/split"), &token],
        );
        assert!(out.starts_with("200\n"), "{out}");
        assert!(out.contains("{\"auth\":\"Bearer [REDACTED]\"}"), "{out}");
        assert_no_leak(&out, SECRET, "streamed response");
        // No piece of the secret longer than its halves survives either.
        assert_no_leak(&out, &SECRET[..SECRET.len() / 2 + 2], "streamed response");
    }
}

#[test]
fn error_pages_and_redirects_are_scrubbed_and_not_followed() {
    let (upstream, _env, token, sidekey) = setup();
    let auth = format!("Authorization: Bearer {token}");
    let (status, text) = curl(&["-H", &auth, &sidekey.url("/echo/status/500")]);
    assert_eq!(status, 500);
    assert_no_leak(&text, SECRET, "error page");
    assert!(text.contains("[REDACTED]"));

    let before = upstream.count();
    let (status, text) = curl(&["-H", &auth, &sidekey.url("/echo/redirect")]);
    assert_eq!(status, 302, "{text}");
    assert_no_leak(&text, SECRET, "redirect");
    assert_no_leak(&text, "sk-live-scrub", "redirect (URL-encoded prefix)");
    assert!(
        text.contains("location: https://elsewhere.example/"),
        "{text}"
    );
    assert_eq!(
        upstream.count(),
        before + 1,
        "sidekey must not follow redirects"
    );
}

#[test]
fn the_first_sse_event_arrives_before_the_upstream_finishes() {
    let (upstream, _env, token, sidekey) = setup();
    let mut res = client()
        .get(sidekey.url("/echo/sse"))
        .bearer_auth(&token)
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    // The upstream holds the second event until released, so reading the
    // first one proves it was not buffered behind the end of the stream.
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !got.ends_with(b"data: first\n\n") {
        let n = res.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "stream ended early: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    upstream.release();
    let mut rest = String::new();
    res.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "data: second\n\n");
}

#[test]
fn websocket_upgrade_carries_the_credential_and_masks_it_in_frames() {
    use std::io::{BufRead, BufReader, Write};
    let (upstream, _env, token, sidekey) = setup();
    let stream = std::net::TcpStream::connect(sidekey.addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    writer
        .write_all(
            format!(
                "GET /echo/ws HTTP/1.1\r\nHost: sidekey\r\nAuthorization: Bearer {token}\r\n\
                 Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                 Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
    let mut head = String::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        head.push_str(&line);
    }
    assert!(
        head.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
        "{head}"
    );
    assert_no_leak(&head, SECRET, "101 status line");
    let seen = upstream.last();
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );
    assert!(seen.header("sec-websocket-extensions").is_none());

    // The greeting frame echoes the credential: it arrives masked, same length.
    let greeting = format!("hello Bearer {}", "*".repeat(SECRET.len()));
    let mut frame = vec![0u8; 2 + greeting.len()];
    reader.read_exact(&mut frame).unwrap();
    assert_eq!(frame[0], 0x81);
    assert_eq!(usize::from(frame[1]), greeting.len());
    assert_eq!(String::from_utf8_lossy(&frame[2..]), greeting);

    // A message split across fragments, a ping between them: each frame
    // keeps its header and length, and the joined message is masked.
    let mut message = Vec::new();
    for first in [0x01, 0x89, 0x80] {
        let mut head = [0u8; 2];
        reader.read_exact(&mut head).unwrap();
        assert_eq!(head[0], first);
        let mut payload = vec![0u8; usize::from(head[1])];
        reader.read_exact(&mut payload).unwrap();
        if first == 0x89 {
            assert_eq!(payload, b"ping");
        } else {
            message.extend(payload);
        }
    }
    assert_eq!(
        String::from_utf8_lossy(&message),
        format!("frag:Bearer {}", "*".repeat(SECRET.len()))
    );

    // Frames flow both ways (the upstream echoes this one as it is).
    let text = b"\x81\x09ping-1234";
    writer.write_all(text).unwrap();
    let mut echo = [0u8; 11];
    reader.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, text);

    // A masked frame from the upstream (here the agent's own, echoed) cannot
    // be scrubbed: sidekey closes both sides, though the agent keeps its
    // socket open.
    assert_eq!(upstream.open_websockets(), 1);
    writer.write_all(b"\x81\x84\x01\x02\x03\x04abcd").unwrap();
    let mut rest = Vec::new();
    reader
        .read_to_end(&mut rest)
        .expect("sidekey closes the agent's side");
    assert!(rest.is_empty(), "{rest:?}");
    eventually(std::time::Duration::from_secs(3), || {
        (upstream.open_websockets() == 0).then_some(())
    });
    drop(writer);
}

#[test]
fn only_websocket_upgrades_are_forwarded() {
    let (upstream, _env, token, sidekey) = setup();
    let mut conn = RawConn::connect(sidekey.addr);
    conn.send(&format!(
        "GET /echo/x HTTP/1.1\r\nHost: s\r\nAuthorization: Bearer {token}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
    ));
    let (status, _, _) = conn.read_response();
    assert_eq!(status, 200);
    let seen = upstream.last();
    assert!(seen.header("upgrade").is_none(), "{:?}", seen.headers);
    assert!(seen.header("http2-settings").is_none());
}
