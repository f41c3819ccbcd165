//! Real `git` clone and push over HTTPS through sidekey (`http.proxy`) to a
//! real smart-HTTP server (`git http-backend`) that demands Basic auth only
//! sidekey holds; a deny rule keeps pushes away from one repo.

use std::path::Path;
use std::process::Output;

use crate::support::*;

const SECRET: &str = "ghp-git-secret-4b1d9e";

/// `git -c http.proxy=PROXY -c http.sslCAInfo=CA ARGS`, in the clean
/// environment of [`git_cmd`].
fn git_via(home: &Path, proxy: &str, ca: &str, args: &[&str]) -> Output {
    let proxy = format!("http.proxy={proxy}");
    let ca = format!("http.sslCAInfo={ca}");
    let mut all = vec!["-c", &proxy, "-c", &ca];
    all.extend_from_slice(args);
    git_cmd(home, &all)
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The commit subjects of `main` in a bare repo on disk, newest first.
fn log_of(home: &Path, bare: &Path) -> Vec<String> {
    git_ok(
        home,
        &[
            "--git-dir",
            &bare.display().to_string(),
            "log",
            "--format=%s",
            "main",
        ],
    )
    .lines()
    .map(str::to_string)
    .collect()
}

/// `len` pseudo-random bytes (xorshift), which zlib cannot shrink.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Fails if any file under `dir` contains `needle` (as bytes).
fn assert_tree_free_of(dir: &Path, needle: &str) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            assert_tree_free_of(&path, needle);
        } else if let Ok(bytes) = std::fs::read(&path) {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{} contains the secret",
                path.display()
            );
        }
    }
}

#[test]
fn clone_and_push_through_the_proxy_with_a_push_deny_rule() {
    let server = GitServer::start("x-access-token", SECRET);
    let env = TestEnv::new(&format!(
        r#"
[tls]
upstream_ca = ["{ca}"]

[secrets.github]
source = "store"

[routes.git]
upstream = "{base}"
allow_private = true
inject = {{ basic = {{ username = "x-access-token", secret = "github" }} }}

[[rules]]
agents = ["coder"]
route = "git"
paths = ["/acme/app.git/**", "/acme/other.git/**"]
action = "allow"

[[rules]]
agents = ["*"]
route = "git"
paths = ["/acme/other.git/git-receive-pack"]
action = "deny"
"#,
        ca = server.ca_path.display(),
        base = server.base()
    ));
    env.set_secret("github", SECRET);
    let token = env.token("coder");
    let sidekey = env.spawn_with(&[("SIDEKEY_LOG", "debug")]);
    let proxy = format!("http://coder:{token}@{}", sidekey.addr);
    let ca_path = env.path("sidekey-ca.pem");
    std::fs::write(&ca_path, env.ok(&["ca", "cert"], None)).unwrap();
    let ca = ca_path.display().to_string();

    let work = tempfile::tempdir().unwrap();
    let home = work.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let app_dir = work.path().join("app");
    let other_dir = work.path().join("other");
    let app = app_dir.display().to_string();
    let other = other_dir.display().to_string();
    let mut outputs = Vec::new();

    // (a) clone app.git: the server's auth is satisfied by sidekey alone.
    let url = format!("{}/acme/app.git", server.base());
    let out = git_via(&home, &proxy, &ca, &["clone", &url, &app]);
    assert!(
        out.status.success(),
        "clone app: {}\nserver:\n{}",
        text(&out),
        server.log()
    );
    outputs.push(text(&out));
    assert_eq!(
        git_ok(&home, &["-C", &app, "log", "--format=%s"]).trim(),
        "initial commit"
    );
    assert_eq!(read(&app_dir.join("README.md")), "initial\n");

    // (b) commit and push to app.git: the bare repo on disk has the commit.
    std::fs::write(app_dir.join("change.txt"), "pushed through sidekey\n").unwrap();
    git_ok(&home, &["-C", &app, "add", "change.txt"]);
    git_ok(
        &home,
        &["-C", &app, "commit", "-q", "-m", "change via proxy"],
    );
    let out = git_via(&home, &proxy, &ca, &["-C", &app, "push", "origin", "main"]);
    assert!(
        out.status.success(),
        "push app: {}\nserver:\n{}\nsidekey:\n{}",
        text(&out),
        server.log(),
        sidekey.stderr()
    );
    outputs.push(text(&out));
    assert_eq!(
        log_of(&home, &server.repo("acme/app.git")),
        vec!["change via proxy", "initial commit"]
    );

    // A pack larger than http.postBuffer: git streams it with chunked
    // encoding, and sidekey streams it on. Over HTTP/1.1 inside the tunnel:
    // libcurl 7.88 (Debian 12) sometimes stalls at the end of a large h2
    // upload, with sidekey having read all it sent (curl issue 11342).
    std::fs::write(app_dir.join("blob.bin"), noise(3 << 20)).unwrap();
    git_ok(&home, &["-C", &app, "add", "blob.bin"]);
    git_ok(&home, &["-C", &app, "commit", "-q", "-m", "large pack"]);
    let out = git_via(
        &home,
        &proxy,
        &ca,
        &[
            "-c",
            "http.version=HTTP/1.1",
            "-C",
            &app,
            "push",
            "origin",
            "main",
        ],
    );
    assert!(
        out.status.success(),
        "large push app: {}\nserver:\n{}\nsidekey:\n{}",
        text(&out),
        server.log(),
        sidekey.stderr()
    );
    outputs.push(text(&out));
    assert_eq!(
        log_of(&home, &server.repo("acme/app.git")),
        vec!["large pack", "change via proxy", "initial commit"]
    );
    assert_eq!(
        git_ok(
            &home,
            &[
                "--git-dir",
                &server.repo("acme/app.git").display().to_string(),
                "cat-file",
                "-s",
                "main:blob.bin",
            ],
        )
        .trim(),
        (3 << 20).to_string()
    );

    // (c) clone other.git is allowed.
    let url = format!("{}/acme/other.git", server.base());
    let out = git_via(&home, &proxy, &ca, &["clone", &url, &other]);
    assert!(out.status.success(), "clone other: {}", text(&out));
    outputs.push(text(&out));

    // (d) push to other.git is denied at git-receive-pack; nothing changes.
    std::fs::write(other_dir.join("change.txt"), "must not land\n").unwrap();
    git_ok(&home, &["-C", &other, "add", "change.txt"]);
    git_ok(
        &home,
        &["-C", &other, "commit", "-q", "-m", "denied change"],
    );
    let out = git_via(
        &home,
        &proxy,
        &ca,
        &["-C", &other, "push", "origin", "main"],
    );
    assert!(
        !out.status.success(),
        "push other succeeded: {}",
        text(&out)
    );
    // sidekey answers 403 before reading the pack and (over h2) then resets
    // the stream with NO_ERROR, as RFC 9113 §8.1 allows; libcurl 7.88 then
    // sometimes reports "curl 92" instead of the 403 it received.
    let said = text(&out);
    assert!(
        said.contains("HTTP 403") || said.contains("curl 92"),
        "{said}"
    );
    outputs.push(text(&out));
    assert_eq!(
        log_of(&home, &server.repo("acme/other.git")),
        vec!["initial commit"]
    );
    let requests = server.requests();
    assert!(
        requests
            .iter()
            .any(|r| r == "POST /acme/app.git/git-receive-pack 200"),
        "{requests:#?}"
    );
    assert!(
        !requests
            .iter()
            .any(|r| r.starts_with("POST /acme/other.git/git-receive-pack")),
        "the denied push reached the server: {requests:#?}"
    );
    assert!(
        requests.iter().all(|r| !r.ends_with(" 401")),
        "the server saw a request without sidekey's credential: {requests:#?}"
    );
    let audit = env.audit();
    assert!(
        audit.iter().any(|r| r["decision"] == "deny"
            && r["reason"] == "policy_denied"
            && r["path"] == "/acme/other.git/git-receive-pack"
            && r["agent"] == "coder"),
        "no deny record for the push: {audit:#?}"
    );
    assert!(
        audit.iter().any(|r| r["decision"] == "allow"
            && r["path"] == "/acme/app.git/git-receive-pack"
            && r["secret"] == "github"),
        "no allow record for the app push: {audit:#?}"
    );

    // (f) without the proxy credential, clone fails and nothing reaches the server.
    let before = server.requests().len();
    let anon = format!("http://{}", sidekey.addr);
    let url = format!("{}/acme/app.git", server.base());
    let anon_dir = work.path().join("anon").display().to_string();
    let out = git_via(&home, &anon, &ca, &["clone", &url, &anon_dir]);
    assert!(
        !out.status.success(),
        "clone without identity: {}",
        text(&out)
    );
    assert!(text(&out).contains("407"), "{}", text(&out));
    outputs.push(text(&out));
    assert_eq!(server.requests().len(), before);

    // (e) the secret is nowhere the agent can see, nor in sidekey's logs.
    assert_tree_free_of(work.path(), SECRET);
    for output in &outputs {
        assert_no_leak(output, SECRET, "git output");
    }
    assert_no_leak(&sidekey.stderr(), SECRET, "sidekey stderr");
    assert_no_leak(&sidekey.stdout(), SECRET, "sidekey stdout");
    assert_no_leak(&env.audit_text(), SECRET, "audit");
}
