//! Binding, the accept loop, limits on connections, and graceful shutdown.

mod activity;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Semaphore, watch};

use crate::config::Limits;
use crate::proxy::{PeerUid, Proxy};
use activity::{Activity, Watched};

/// An accepted agent connection.
enum Accepted {
    Tcp(tokio::net::TcpStream, std::net::SocketAddr),
    /// With the peer's uid, which identifies the agent when it sends no token.
    Unix(tokio::net::UnixStream, Option<u32>),
}

/// Serves agents on `listener` (and `unix`, if configured) until `shutdown`
/// turns true, then waits up to the grace period for in-flight requests.
pub async fn serve(
    listener: TcpListener,
    unix: Option<UnixListener>,
    proxy: Arc<Proxy>,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes as u32);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted.map(|(s, peer)| Accepted::Tcp(s, peer)),
            accepted = accept_unix(unix.as_ref()) => accepted,
            _ = shutdown.changed() => break,
        };
        let accepted = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Out of descriptors and similar: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                max = limits.max_connections,
                "connection refused: too many open connections"
            );
            match accepted {
                Accepted::Tcp(stream, _) => refuse(&stream),
                Accepted::Unix(stream, _) => refuse(&stream),
            }
            continue;
        };
        let open = proxy.metrics().open_connections.clone();
        open.inc();
        let activity = Activity::new();
        let (peer, uid) = match &accepted {
            Accepted::Tcp(stream, peer) => {
                let _ = stream.set_nodelay(true);
                (peer.to_string(), None)
            }
            Accepted::Unix(_, uid) => (format!("unix uid {uid:?}"), *uid),
        };
        let service = {
            let activity = activity.clone();
            let proxy = proxy.clone();
            service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                let proxy = proxy.clone();
                let busy = activity.busy();
                if let Some(uid) = uid {
                    req.extensions_mut().insert(PeerUid(uid));
                }
                async move {
                    let response = proxy.handle(req).await;
                    drop(busy);
                    Ok::<_, std::convert::Infallible>(response)
                }
            })
        };
        let conn: std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), _>> + Send>> =
            match accepted {
                Accepted::Tcp(stream, _) => {
                    let io = TokioIo::new(Watched::new(stream, activity.clone()));
                    Box::pin(
                        graceful.watch(
                            builder
                                .serve_connection_with_upgrades(io, service)
                                .into_owned(),
                        ),
                    )
                }
                Accepted::Unix(stream, _) => {
                    let io = TokioIo::new(Watched::new(stream, activity.clone()));
                    Box::pin(
                        graceful.watch(
                            builder
                                .serve_connection_with_upgrades(io, service)
                                .into_owned(),
                        ),
                    )
                }
            };
        let idle_timeout = limits.idle_timeout;
        tokio::spawn(async move {
            tokio::select! {
                result = conn => {
                    if let Err(e) = result {
                        tracing::debug!(peer, error = %e, "connection ended with an error");
                    }
                }
                _ = activity.idle_for(idle_timeout) => {
                    tracing::debug!(peer, "idle connection closed");
                }
            }
            open.dec();
            drop(permit);
        });
    }
    drop(listener);
    drop(unix);
    tracing::info!("stopped accepting; finishing in-flight requests");
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections closed"),
        _ = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::warn!("grace period over; closing remaining connections");
        }
    }
}

async fn accept_unix(unix: Option<&UnixListener>) -> std::io::Result<Accepted> {
    let Some(unix) = unix else {
        return std::future::pending().await;
    };
    let (stream, _) = unix.accept().await?;
    let uid = stream.peer_cred().ok().map(|cred| cred.uid());
    Ok(Accepted::Unix(stream, uid))
}

/// Binds the agents' unix socket: world-connectable, since who may use it is
/// decided per request by the peer's uid (an unmapped uid is refused).
pub fn bind_unix(path: &std::path::Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by another process", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

/// Tells a client over the connection cap why it is turned away, without
/// waiting on it: one best-effort write, then close.
fn refuse<S: TryWrite>(stream: &S) {
    const BODY: &str = r#"{"error":{"code":"too_many_connections","message":"sidekey is at its connection limit (limits.max_connections); retry later","request_id":""}}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         x-sidekey-error: too_many_connections\r\nretry-after: 1\r\nconnection: close\r\n\
         content-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = stream.try_write(response.as_bytes());
}

/// The non-blocking write both socket kinds offer.
trait TryWrite {
    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize>;
}

impl TryWrite for tokio::net::TcpStream {
    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize> {
        tokio::net::TcpStream::try_write(self, buf)
    }
}

impl TryWrite for tokio::net::UnixStream {
    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize> {
        tokio::net::UnixStream::try_write(self, buf)
    }
}

/// Binds the agent listener, with a message that says what to do on failure.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "cannot listen on {addr}: {}",
                crate::config::describe_io(&e)
            ),
        )
    })
}
