//! The admin socket: `admin.sock` in the state dir, mode 0600, so only the
//! operator's uid can reload the proxy or read its status.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};

use crate::live::Live;
use crate::metrics::Metrics;
use crate::secret::store::now_ms;
use crate::token::revocation::{Revocations, Revoke};

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

/// Shared by the admin listeners.
#[derive(Debug)]
pub struct Admin {
    live: Arc<Live>,
    metrics: Arc<Metrics>,
}

impl Admin {
    pub fn new(live: Arc<Live>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self { live, metrics })
    }
}

/// Serves the admin socket: its 0600 mode is the access control.
pub async fn serve(listener: UnixListener, admin: Arc<Admin>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(serve_conn(TokioIo::new(stream), admin.clone(), None));
    }
}

/// Serves the optional TCP admin address, where every request must carry
/// `Authorization: Bearer <the admin_tcp token secret>`.
pub async fn serve_tcp(listener: tokio::net::TcpListener, admin: Arc<Admin>, token: String) {
    let token = Arc::new(crate::secret::Secret::new(token));
    // Reachable by anyone who can reach the address: few connections, and
    // each must send its headers promptly (see serve_conn).
    let slots = Arc::new(tokio::sync::Semaphore::new(32));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let (admin, token) = (admin.clone(), token.clone());
        tokio::spawn(async move {
            serve_conn(TokioIo::new(stream), admin, Some(token)).await;
            drop(permit);
        });
    }
}

async fn serve_conn<IO>(
    io: TokioIo<IO>,
    admin: Arc<Admin>,
    token: Option<Arc<crate::secret::Secret>>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<Incoming>| {
        let admin = admin.clone();
        let token = token.clone();
        async move {
            if let Some(token) = token
                && !authorized(&req, &token)
            {
                let mut response = json(
                    StatusCode::UNAUTHORIZED,
                    serde_json::json!({"error": "unauthorized"}),
                );
                response.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Bearer realm=\"sidekey-admin\""),
                );
                return Ok::<_, std::convert::Infallible>(response);
            }
            Ok(route(req, &admin.live, &admin.metrics).await)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(10))
        .serve_connection(io, service)
        .await;
}

/// Constant-time comparison of the presented bearer token.
fn authorized(req: &Request<Incoming>, token: &crate::secret::Secret) -> bool {
    let presented = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // RFC 9110 11.1: the scheme is case-insensitive.
        .and_then(|v| crate::identity::strip_prefix_ignore_case(v, "Bearer "))
        .map(str::trim)
        .unwrap_or_default();
    crate::secret::Secret::new(presented.to_string()) == *token
}

/// 405 for a known endpoint asked with the wrong method.
fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut response = json(
        StatusCode::METHOD_NOT_ALLOWED,
        serde_json::json!({"error": format!("use {allow}")}),
    );
    response
        .headers_mut()
        .insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
    response
}

async fn route(
    req: Request<Incoming>,
    live: &Arc<Live>,
    metrics: &Metrics,
) -> Response<Full<Bytes>> {
    match (req.method().clone(), req.uri().path()) {
        (Method::GET, "/v1/status") => {
            let mut status = metrics.status();
            let snapshot = live.snapshot();
            status["config"] = snapshot.config.file.display().to_string().into();
            // False while records are failing or unanswered; with
            // `on_failure = "deny"` agents are refused until it is true again.
            status["audit"] = serde_json::json!({"healthy": snapshot.audit.is_healthy()});
            status["reloads"] = live.reloads().into();
            json(StatusCode::OK, status)
        }
        (Method::GET, "/metrics") => {
            // Prometheus asks for OpenMetrics; anything else gets the
            // classic text format.
            let openmetrics = req.headers().get_all(http::header::ACCEPT).iter().any(|v| {
                v.to_str()
                    .is_ok_and(|v| v.contains("application/openmetrics-text"))
            });
            let content_type = if openmetrics {
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
            } else {
                "text/plain; version=0.0.4; charset=utf-8"
            };
            let mut response = Response::new(Full::new(Bytes::from(metrics.encode(openmetrics))));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(content_type),
            );
            response
        }
        (Method::POST, "/v1/reload") => match live.reload_off_runtime().await {
            Ok(()) => json(StatusCode::OK, serde_json::json!({"reloaded": true})),
            Err(e) => {
                tracing::error!("reload refused, old config still in force:\n{e}");
                json(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    serde_json::json!({"reloaded": false, "error": e.to_string()}),
                )
            }
        },
        (Method::POST, "/v1/revoke") => {
            let body = match http_body_util::Limited::new(req.into_body(), 4096)
                .collect()
                .await
            {
                Ok(body) => body.to_bytes(),
                Err(_) => {
                    return json(
                        StatusCode::BAD_REQUEST,
                        serde_json::json!({"error": "body too large"}),
                    );
                }
            };
            match revoke_request(&body) {
                Ok(revoke) => match revoke_off_runtime(live, revoke).await {
                    Ok(()) => json(StatusCode::OK, serde_json::json!({"revoked": true})),
                    Err(e) => json(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        serde_json::json!({"revoked": false, "error": e}),
                    ),
                },
                Err(message) => json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error": message}),
                ),
            }
        }
        (_, "/v1/status" | "/metrics") => method_not_allowed("GET"),
        (_, "/v1/reload" | "/v1/revoke") => method_not_allowed("POST"),
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not found"}),
        ),
    }
}

/// Writes the revocation (a file lock and two syncs) on a blocking thread,
/// not on the runtime that serves the agents, then applies it at once
/// rather than at the next poll.
async fn revoke_off_runtime(live: &Arc<Live>, revoke: Revoke) -> Result<(), String> {
    let live = live.clone();
    tokio::task::spawn_blocking(move || {
        Revocations::add(&live.state, revoke, now_ms()).map_err(|e| e.to_string())?;
        live.refresh_revocations();
        Ok(())
    })
    .await
    .unwrap_or_else(|_| Err("the revocation stopped before it finished".to_string()))
}

/// `{"id": …}`, `{"session": …}` or `{"agent": …}`: exactly one.
fn revoke_request(body: &[u8]) -> Result<Revoke, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        id: Option<String>,
        session: Option<String>,
        agent: Option<String>,
    }
    let body: Body = serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?;
    let revoke = match (body.id, body.session, body.agent) {
        (Some(id), None, None) => Revoke::Id(id),
        (None, Some(session), None) => Revoke::Session(session),
        (None, None, Some(agent)) => Revoke::Agent(agent),
        _ => return Err("give exactly one of id, session, agent".to_string()),
    };
    // As on the command line: a name no token can carry (a whole token
    // pasted as its id, an empty one) would be listed and revoke nothing.
    revoke.check()?;
    Ok(revoke)
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
    body: Option<serde_json::Value>,
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
                .body(Full::new(Bytes::from(
                    body.map(|b| b.to_string()).unwrap_or_default(),
                )))
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
