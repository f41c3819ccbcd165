//! Binding, the accept loop, limits on connections, and graceful shutdown.

mod activity;

pub use activity::ConnSlot;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::Either;
use hyper::server::conn::http1;
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
    Tcp(tokio::net::TcpStream),
    /// With the peer's uid, which identifies the agent when it sends no token.
    Unix(tokio::net::UnixStream, Option<u32>),
    /// The mTLS listener; the handshake happens in the connection's task.
    Tls(tokio::net::TcpStream, std::net::SocketAddr),
}

/// Who the transport says the peer is, attached to each of its requests.
#[derive(Debug, Clone)]
enum Peer {
    Anonymous,
    Uid(u32),
    Cert(crate::identity::PeerCert),
}

/// Where agents connect.
#[allow(missing_debug_implementations, reason = "TlsAcceptor has no Debug")]
pub struct Listeners {
    pub tcp: TcpListener,
    pub unix: Option<UnixListener>,
    pub tls: Option<(TcpListener, tokio_rustls::TlsAcceptor)>,
}

/// Serves agents on every listener until `shutdown` turns true, then waits
/// up to the grace period for in-flight requests.
pub async fn serve(
    listeners: Listeners,
    proxy: Arc<Proxy>,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let Listeners { tcp, unix, tls } = listeners;
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let builders = Arc::new(Builders {
        auto: http_builder(&limits),
        http1: http1_builder(&limits),
    });
    let acceptor = tls.as_ref().map(|(_, acceptor)| acceptor.clone());
    loop {
        let accepted = tokio::select! {
            accepted = tcp.accept() => accepted.map(|(s, _)| Accepted::Tcp(s)),
            accepted = accept_unix(unix.as_ref()) => accepted,
            accepted = accept_tls(tls.as_ref().map(|(l, _)| l)) => accepted,
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
                Accepted::Tcp(stream) | Accepted::Tls(stream, _) => refuse(&stream),
                Accepted::Unix(stream, _) => refuse(&stream),
            }
            continue;
        };
        let activity = Activity::new();
        let slot = ConnSlot::new(
            permit,
            graceful.watcher(),
            shutdown.clone(),
            proxy.metrics().open_connections.clone(),
            activity.clone(),
            limits.idle_timeout,
        );
        let conn = Conn {
            builders: builders.clone(),
            watcher: graceful.watcher(),
            shutdown: shutdown.clone(),
            slot: slot.clone(),
            proxy: proxy.clone(),
        };
        // Boxed per kind of connection, so a plain TCP connection's task is
        // the size of its own state, not of the TLS handshake's.
        let served: Pin<Box<dyn Future<Output = ()> + Send>> = match accepted {
            Accepted::Tcp(stream) => {
                let _ = stream.set_nodelay(true);
                Box::pin(conn.serve_tcp(stream, activity, limits.header_timeout))
            }
            Accepted::Unix(stream, uid) => {
                let peer = uid.map_or(Peer::Anonymous, Peer::Uid);
                Box::pin(conn.serve_unix(stream, peer, activity, limits.header_timeout))
            }
            Accepted::Tls(stream, addr) => {
                let _ = stream.set_nodelay(true);
                let Some(acceptor) = acceptor.clone() else {
                    continue;
                };
                let io = Watched::new(stream, activity);
                Box::pin(conn.serve_tls(io, addr, acceptor, limits.header_timeout))
            }
        };
        tokio::spawn(async move {
            tokio::select! {
                _ = served => {}
                _ = slot.idle() => {
                    tracing::debug!("idle connection closed");
                }
            }
        });
    }
    drop(tcp);
    drop(unix);
    drop(tls);
    tracing::info!("stopped accepting; finishing in-flight requests");
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections closed"),
        _ = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::warn!("grace period over; closing remaining connections");
        }
    }
}

/// The servers every connection shares.
struct Builders {
    /// Tells HTTP/1 from HTTP/2 by the first bytes.
    auto: auto::Builder<TokioExecutor>,
    /// For connections already known to speak HTTP/1.
    http1: http1::Builder,
}

/// The HTTP/2 connection preface; a plain connection that opens with
/// anything else speaks HTTP/1.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What serving one connection needs.
struct Conn {
    builders: Arc<Builders>,
    /// Counts the connection for graceful shutdown.
    watcher: hyper_util::server::graceful::Watcher,
    shutdown: watch::Receiver<bool>,
    slot: Arc<ConnSlot>,
    proxy: Arc<Proxy>,
}

impl Conn {
    /// The mTLS listener: the handshake (bounded by the header timeout),
    /// then the client certificate names the agent. The handshake's state
    /// is boxed and freed once it is done, and the session is bound inside
    /// a block, so an open connection keeps only the copy its server owns.
    async fn serve_tls(
        self,
        io: Watched<tokio::net::TcpStream>,
        addr: SocketAddr,
        acceptor: tokio_rustls::TlsAcceptor,
        handshake_timeout: Duration,
    ) {
        let serving = {
            let accepted =
                Box::pin(tokio::time::timeout(handshake_timeout, acceptor.accept(io))).await;
            let tls = match accepted {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::info!(%addr, error = %e, "agent certificate refused at the handshake");
                    return;
                }
                Err(_) => return,
            };
            let cert = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .map(|der| crate::identity::PeerCert::from_der(der));
            // HTTP/2 over TLS is only ever agreed by ALPN (RFC 9113, 3.2).
            let http1 = tls.get_ref().1.alpn_protocol() != Some(b"h2".as_slice());
            match cert {
                Some(Ok(cert)) => self.serve_as(tls, Peer::Cert(cert), http1),
                Some(Err(e)) => {
                    tracing::info!(%addr, error = %e, "client certificate refused");
                    return;
                }
                None => {
                    tracing::info!(%addr, "no client certificate");
                    return;
                }
            }
        };
        serving.await;
    }

    /// A plain TCP connection. Its first bytes are peeked, not read: when
    /// they already differ from the HTTP/2 preface (as every HTTP/1 request
    /// line does) hyper's HTTP/1 server gets the socket itself. Through the
    /// sniffing server, hyper would first read the sniffed bytes alone and
    /// then grow its read buffer to 16 KiB for the rest, which an idle
    /// keep-alive connection holds for as long as it stays open.
    async fn serve_tcp(
        self,
        stream: tokio::net::TcpStream,
        activity: Arc<Activity>,
        header_timeout: Duration,
    ) {
        let mut first = [0u8; H2_PREFACE.len()];
        let peeked = tokio::time::timeout(header_timeout, stream.peek(&mut first)).await;
        let Some(http1) = rules_out_h2(peeked, &first) else {
            return;
        };
        let io = Watched::new(stream, activity);
        self.serve_as(io, Peer::Anonymous, http1).await;
    }

    /// A unix-socket connection, its first bytes peeked as in `serve_tcp`.
    async fn serve_unix(
        self,
        stream: tokio::net::UnixStream,
        peer: Peer,
        activity: Arc<Activity>,
        header_timeout: Duration,
    ) {
        let mut first = [0u8; H2_PREFACE.len()];
        let peeked = tokio::time::timeout(header_timeout, peek_unix(&stream, &mut first)).await;
        let Some(http1) = rules_out_h2(peeked, &first) else {
            return;
        };
        self.serve_as(Watched::new(stream, activity), peer, http1)
            .await;
    }

    /// Serves HTTP/1 when `http1` says the connection speaks it, else
    /// whichever version its first bytes show.
    ///
    /// A plain function: the connection moves straight into its server,
    /// which is boxed. An `async fn` would keep its argument's slot beside
    /// the server that owns it, for as long as the connection stays open,
    /// and a TLS session is over a kilobyte.
    fn serve_as<IO>(self, io: IO, peer: Peer, http1: bool) -> impl Future<Output = ()> + Send
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Self {
            builders,
            watcher,
            mut shutdown,
            slot,
            proxy,
        } = self;
        let audit = proxy.clone();
        let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            let proxy = proxy.clone();
            let busy = slot.busy();
            // Whatever the request is upgraded into keeps the connection's slot.
            req.extensions_mut().insert(slot.clone());
            match &peer {
                Peer::Anonymous => {}
                Peer::Uid(uid) => {
                    req.extensions_mut().insert(PeerUid(*uid));
                }
                Peer::Cert(cert) => {
                    req.extensions_mut().insert(cert.clone());
                }
            }
            // Boxed: hyper keeps the slot for a request's future allocated
            // for the whole life of the connection, so an idle keep-alive
            // connection would hold a request's worth of state (~6 KB).
            Box::pin(async move {
                let response = proxy.handle(req).await;
                drop(busy);
                Ok::<_, std::convert::Infallible>(response)
            })
        });
        let io = TokioIo::new(io);
        let server = if http1 {
            let conn = builders.http1.serve_connection(io, service).with_upgrades();
            Either::Left((Box::pin(conn), watcher))
        } else {
            // The version-sniffing server borrows its builder, so this
            // block owns both (and keeps a second slot for `io`: only
            // connections that may speak HTTP/2 come here).
            Either::Right(Box::pin(async move {
                watcher
                    .watch(builders.auto.serve_connection_with_upgrades(io, service))
                    .await
            }))
        };
        async move {
            let ended: Result<(), Box<dyn std::error::Error + Send + Sync>> = match server {
                Either::Left((mut conn, watcher)) => {
                    // The watcher only counts this connection; the shutdown
                    // signal comes from `shutdown`, as hyper's HTTP/1
                    // connection is not one the watcher can drive.
                    let _counted = watcher;
                    let ended = tokio::select! {
                        ended = conn.as_mut() => ended,
                        Ok(()) = async { shutdown.wait_for(|stop| *stop).await.map(drop) } => {
                            conn.as_mut().graceful_shutdown();
                            conn.await
                        }
                    };
                    ended.map_err(Into::into)
                }
                Either::Right(conn) => conn.await,
            };
            if let Err(e) = ended {
                match e.downcast_ref::<hyper::Error>() {
                    Some(e) if e.is_parse() || e.is_parse_too_large() => {
                        audit.audit_unparsed(e).await
                    }
                    _ => tracing::debug!(error = %e, "connection ended with an error"),
                }
            }
        }
    }
}

/// Whether a connection's first bytes, peeked within the header timeout,
/// already differ from the HTTP/2 preface; `None` when it closed, failed,
/// or stayed silent for as long as a request head may take.
fn rules_out_h2(
    peeked: Result<std::io::Result<usize>, tokio::time::error::Elapsed>,
    first: &[u8],
) -> Option<bool> {
    match peeked {
        Ok(Ok(n)) if n > 0 => Some(!H2_PREFACE.starts_with(&first[..n])),
        _ => None,
    }
}

/// `TcpStream::peek` for a unix socket, which tokio does not offer.
async fn peek_unix(stream: &tokio::net::UnixStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        stream.readable().await?;
        let peeked = stream.try_io(tokio::io::Interest::READABLE, || {
            rustix::net::recv(stream, &mut *buf, rustix::net::RecvFlags::PEEK)
                .map(|(read, _)| read)
                .map_err(std::io::Error::from)
        });
        match peeked {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            result => return result,
        }
    }
}

async fn accept_tls(tls: Option<&TcpListener>) -> std::io::Result<Accepted> {
    let Some(tls) = tls else {
        return std::future::pending().await;
    };
    let (stream, addr) = tls.accept().await?;
    Ok(Accepted::Tls(stream, addr))
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

/// The HTTP/1 server for connections known to speak it; configured as
/// [`http_builder`]'s HTTP/1 half.
pub fn http1_builder(limits: &Limits) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(max_buf_size(limits))
        .keep_alive(true);
    builder
}

/// The HTTP server settings every agent-facing connection uses, the ones
/// inside intercepted tunnels included.
pub fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        // The parser's own cap is a backstop; `handle` applies the limit
        // with a proper error response.
        .max_buf_size(max_buf_size(limits))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(max_buf_size(limits) as u32);
    builder
}

/// Room for a request head: the limit is checked (with a JSON answer) by
/// the proxy, so the parser must let a head somewhat over it through.
fn max_buf_size(limits: &Limits) -> usize {
    (limits.max_header_bytes * 4).max(64 * 1024)
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

/// Raises the soft open-file limit to the hard one: each agent connection
/// and its upstream connection hold a descriptor, and the usual soft limit
/// (1024) is far below `limits.max_connections`. Returns the new limit.
pub fn raise_fd_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let raised = rustix::process::Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => limit.maximum,
        Err(_) => limit.current,
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
