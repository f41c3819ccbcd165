//! The admin socket: `admin.sock` in the state dir, mode 0600, so only the
//! operator's uid can reload the proxy or read its status.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};

use crate::live::Live;

/// Counters reported by `GET /v1/status`.
#[derive(Debug)]
pub struct Status {
    started: Instant,
    pub reloads: AtomicU64,
}

impl Default for Status {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            reloads: AtomicU64::new(0),
        }
    }
}

/// Binds the admin socket, replacing a stale one left by a crashed process.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "{} is in use: another sidekey is running on this state dir",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, live: Arc<Live>, status: Arc<Status>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let live = live.clone();
        let status = status.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let live = live.clone();
                let status = status.clone();
                async move { Ok::<_, std::convert::Infallible>(route(req, &live, &status)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route(req: Request<Incoming>, live: &Live, status: &Status) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/v1/status") => json(
            StatusCode::OK,
            serde_json::json!({
                "version": env!("CARGO_PKG_VERSION"),
                "uptime_secs": status.started.elapsed().as_secs(),
                "config": live.snapshot().config.file.display().to_string(),
                "reloads": status.reloads.load(Ordering::Relaxed),
            }),
        ),
        (&Method::POST, "/v1/reload") => match live.reload() {
            Ok(()) => {
                status.reloads.fetch_add(1, Ordering::Relaxed);
                json(StatusCode::OK, serde_json::json!({"reloaded": true}))
            }
            Err(e) => {
                tracing::error!("reload refused, old config still in force:\n{e}");
                json(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    serde_json::json!({"reloaded": false, "error": e.to_string()}),
                )
            }
        },
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not found"}),
        ),
    }
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response
}

/// Sends one request to a running proxy's admin socket; `None` when no proxy listens.
pub async fn call(
    socket: &Path,
    method: Method,
    path: &str,
) -> Option<Result<(StatusCode, serde_json::Value), String>> {
    let stream = UnixStream::connect(socket).await.ok()?;
    Some(
        async {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            let req = Request::builder()
                .method(method)
                .uri(path)
                .header("host", "sidekey")
                .body(Full::new(Bytes::new()))
                .map_err(|e| e.to_string())?;
            let res = sender.send_request(req).await.map_err(|e| e.to_string())?;
            let status = res.status();
            let body = res.into_body().collect().await.map_err(|e| e.to_string())?;
            let value = serde_json::from_slice(&body.to_bytes()).unwrap_or_default();
            Ok((status, value))
        }
        .await,
    )
}
