//! `sidekey demo`: the whole product in thirty seconds, on loopback only.
//!
//! A temporary state dir, the embedded store holding a generated key, a
//! built-in echo upstream, one request as an agent, and the three views side
//! by side: what the agent sent, what the upstream received, what came back.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::{init::init_state, runtime};
use crate::config::Config;
use crate::secret::Secret;
use crate::secret::store::{Entry, MasterKey, Store, now_ms};
use crate::state::StateDir;
use crate::token::{Issuer, random_id};

const AGENT: &str = "demo-agent";
const COLUMN: usize = 46;

/// What the echo upstream last received.
type Seen = Arc<Mutex<Vec<String>>>;

pub(super) fn run(listen: SocketAddr) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("sidekey-demo-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let state = StateDir::new(dir.path().join("state"));
    init_state(&state)?;
    let key = MasterKey::load(&state)?;
    let value = random_id("sk-demo");
    Store::update(&state, &key, |store| {
        store.entries.insert(
            "demo".into(),
            Entry {
                value: Secret::new(value.clone()),
                updated_ms: now_ms(),
            },
        );
    })?;
    let token = Issuer::load(&state)?
        .issue(AGENT, None, std::time::Duration::from_secs(3600))
        .0;

    runtime()?.block_on(async move {
        let seen: Seen = Arc::default();
        let echo = start_echo(seen.clone()).await?;
        let config_path = dir.path().join("sidekey.toml");
        std::fs::write(&config_path, demo_config(listen, &state, echo))
            .context("cannot write the demo config")?;
        let config = Config::load(&config_path)?;
        let running = super::serve::start(config, state.clone(), None).await?;
        let base = format!("http://{}", running.addr);

        let body = r#"{"prompt":"hello"}"#;
        let (status, reply) = send(running.addr, &token, body).await?;
        let sent = [
            "POST /echo/anything".to_string(),
            format!("authorization: Bearer {}", shorten_to(&token, COLUMN - 24)),
            "content-type: application/json".to_string(),
            body.to_string(),
        ];
        let received: Vec<String> = seen
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|l| {
                if l.chars().count() > COLUMN - 2 {
                    shorten_to(&l, COLUMN - 4)
                } else {
                    l
                }
            })
            .collect();
        outln!();
        outln!("sidekey demo: the agent calls an API without ever holding its key");
        outln!();
        outln!(
            "{:COLUMN$}  2. what the upstream received (the key)",
            "1. what the agent sent (its token)"
        );
        outln!("{:COLUMN$}  {}", "-".repeat(34), "-".repeat(38));
        for i in 0..sent.len().max(received.len()) {
            let left = sent.get(i).map(String::as_str).unwrap_or("");
            let right = received.get(i).map(String::as_str).unwrap_or("");
            outln!("{left:COLUMN$}  {right}");
        }
        outln!();
        outln!("3. what came back to the agent (the echoed key scrubbed): {status}");
        outln!("{}", "-".repeat(58));
        outln!("{reply}");
        outln!();
        outln!("The upstream saw the real key; the agent never did, and cannot get it back.");
        outln!("sidekey keeps running at {base} until Ctrl-C. Try:");
        outln!();
        outln!("  curl -s -H 'Authorization: Bearer {token}' {base}/echo/anything");
        outln!("  curl -s {base}/echo/anything                       # no token: 401");
        outln!(
            "  curl -s -H 'Authorization: Bearer {token}' {base}/echo/admin   # not allowed: 403"
        );
        outln!();
        outln!("audit log: {}", state.root().join("audit.jsonl").display());
        use std::io::Write;
        let _ = std::io::stdout().flush();

        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("cannot watch SIGTERM")?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        running.stop().await;
        drop(dir);
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(())
}

fn shorten_to(text: &str, chars: usize) -> String {
    let keep: String = text.chars().take(chars).collect();
    format!("{keep}…")
}

fn demo_config(listen: SocketAddr, state: &StateDir, echo: SocketAddr) -> String {
    format!(
        r#"listen = "{listen}"
state_dir = "{state}"

[secrets.demo]
source = "store"

[routes.echo]
upstream = "http://{echo}"
allow_private = true
inject = {{ header = "authorization", format = "Bearer {{secret}}", secret = "demo" }}

[[rules]]
agents = ["{AGENT}"]
route = "echo"
paths = ["/anything", "/anything/**"]
action = "allow"
"#,
        state = state.root().display()
    )
}

/// The built-in upstream: answers every request with what it received, like httpbin's `/anything`.
async fn start_echo(seen: Seen) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot start the echo upstream")?;
    let addr = listener.local_addr().context("echo upstream address")?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| echo(req, seen.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn echo(req: Request<Incoming>, seen: Seen) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    let mut lines = vec![format!("{} {}", parts.method, parts.uri)];
    let mut headers = serde_json::Map::new();
    for (name, value) in &parts.headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        headers.insert(name.to_string(), value.into());
    }
    for name in ["authorization", "content-type"] {
        if let Some(value) = headers.get(name).and_then(|v| v.as_str()) {
            lines.push(format!("{name}: {value}"));
        }
    }
    lines.push(body.clone());
    if let Ok(mut s) = seen.lock() {
        *s = lines;
    }
    let reply = serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "headers": headers,
        "body": body,
    });
    let text = serde_json::to_string_pretty(&reply).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(text)));
    response.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// The agent's request, sent with a plain HTTP client.
async fn send(
    proxy: SocketAddr,
    token: &str,
    body: &'static str,
) -> anyhow::Result<(String, String)> {
    let stream = tokio::net::TcpStream::connect(proxy)
        .await
        .context("cannot reach the demo proxy")?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("demo request")?;
    tokio::spawn(conn);
    let req = Request::post("/echo/anything")
        .header("host", proxy.to_string())
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .context("demo request")?;
    let res = sender.send_request(req).await.context("demo request")?;
    let status = res.status().to_string();
    let bytes = res
        .into_body()
        .collect()
        .await
        .context("demo response")?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}
