use std::process::Command;

use crate::support::*;

const SECRET: &str = "sk-live-peer-5e1";

fn my_uid() -> u32 {
    let out = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn curl_unix(socket: &std::path::Path, args: &[&str]) -> (u16, String) {
    let socket = socket.display().to_string();
    let mut all = vec!["--unix-socket", socket.as_str()];
    all.extend_from_slice(args);
    curl(&all)
}

fn env_for_uid(upstream: &Upstream, uid: u32) -> TestEnv {
    let env = TestEnv::new(&format!(
        "listen_unix = \"agents.sock\"\n[agents.coder]\nunix_uids = [{uid}]\n{}",
        echo_route(upstream, "store")
    ));
    env.set_secret("api", SECRET);
    env
}

#[test]
fn a_unix_peer_uid_mapped_to_an_agent_needs_no_token() {
    let upstream = Upstream::http();
    let env = env_for_uid(&upstream, my_uid());
    let _sidekey = env.spawn();
    let socket = env.state.join("agents.sock");

    let (status, text) = curl_unix(&socket, &["http://sidekey/echo/by-uid"]);
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        upstream.last().header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );
    assert_no_leak(&text, SECRET, "response");
    let record = env.audit().pop().unwrap();
    assert_eq!(record["agent"], "coder");
    assert_eq!(record["session"], format!("uid-{}", my_uid()));
    assert!(record["token_id"].is_null());

    // HTTP/2 with prior knowledge over the socket, with the same identity.
    let (status, text) = curl_unix(
        &socket,
        &["--http2-prior-knowledge", "http://sidekey/echo/by-uid-h2"],
    );
    assert_eq!(status, 200, "{text}");
    let seen = upstream.last();
    assert_eq!(seen.uri, "/by-uid-h2");
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );

    // A token, when sent, is the identity (and must be valid).
    let (status, _) = curl_unix(
        &socket,
        &[
            "-H",
            "Authorization: Bearer forged.token.x",
            "http://sidekey/echo/x",
        ],
    );
    assert_eq!(status, 401);
    // The same agent's token agrees with the uid; another agent's token
    // on this uid's connection is one identity too many.
    let bearer = |agent: &str| format!("Authorization: Bearer {}", env.token(agent));
    let (status, text) = curl_unix(&socket, &["-H", &bearer("coder"), "http://sidekey/echo/x"]);
    assert_eq!(status, 200, "{text}");
    let (status, text) = curl_unix(
        &socket,
        &["-H", &bearer("reviewer"), "http://sidekey/echo/x"],
    );
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("unauthenticated"), "{text}");

    // Revoking the session the audit records name stops that uid.
    let session = format!("uid-{}", my_uid());
    revoke_and_expect_refusal(&env, &["--session", &session], &socket);
}

fn revoke_and_expect_refusal(env: &TestEnv, which: &[&str], socket: &std::path::Path) {
    let mut args = vec!["token", "revoke"];
    args.extend_from_slice(which);
    env.ok(&args, None);
    let (status, text) = curl_unix(socket, &["http://sidekey/echo/x"]);
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("token_revoked"), "{text}");
}

#[test]
fn revoking_an_agent_stops_its_uid_identities() {
    let upstream = Upstream::http();
    let env = env_for_uid(&upstream, my_uid());
    let _sidekey = env.spawn();
    let socket = env.state.join("agents.sock");
    let (status, text) = curl_unix(&socket, &["http://sidekey/echo/x"]);
    assert_eq!(status, 200, "{text}");
    revoke_and_expect_refusal(&env, &["--agent", "coder"], &socket);
}

#[test]
fn an_unmapped_uid_is_refused() {
    let upstream = Upstream::http();
    let env = env_for_uid(&upstream, my_uid().wrapping_add(4242));
    let _sidekey = env.spawn();
    let (status, text) = curl_unix(&env.state.join("agents.sock"), &["http://sidekey/echo/x"]);
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("unauthenticated"));
    assert_eq!(upstream.count(), 0);
}
