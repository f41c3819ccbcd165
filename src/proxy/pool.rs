//! The upstream connection pool: HTTP/1.1 connections kept alive per
//! destination, one HTTP/2 connection shared per destination, all opened by
//! the guarded connector (sidekey's own DNS check, then TLS).
//!
//! Ours rather than hyper-util's legacy client because that one, on every
//! request, hashes the destination three times with SipHash and spawns a task
//! to put the connection back; here a connection goes back when its response
//! body ends, with one cheaper hash each way and no task (see
//! docs/PERFORMANCE.md).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Request, Response, Uri, header};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::runtime::Handle;
use tower_service::Service;

use super::body::{Body, BoxError};
use crate::egress::GuardedResolver;

pub type Connector = HttpsConnector<HttpConnector<GuardedResolver>>;

/// A kept-alive connection nobody used for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a shared HTTP/2 connection is pinged, and how long an answer may take.
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// Kept-alive connections per destination beyond this are closed once their
/// response ends: a burst must not leave a thousand sockets open.
const MAX_IDLE_PER_DESTINATION: usize = 256;

/// Where a connection goes. Compared byte for byte, unlike `Authority`,
/// whose hash feeds SipHash one lowercased byte at a time (two thirds of a
/// checkout's cost: 1,525 -> 565 instructions); a name spelt in two cases
/// merely gets two pools.
#[derive(Clone)]
struct Destination {
    scheme: Scheme,
    authority: Authority,
}

impl PartialEq for Destination {
    fn eq(&self, other: &Self) -> bool {
        self.scheme == other.scheme && self.authority.as_str() == other.authority.as_str()
    }
}

impl Eq for Destination {}

impl std::hash::Hash for Destination {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.scheme.as_str().hash(state);
        self.authority.as_str().hash(state);
    }
}

/// A pooled client for one reach (see `upstream::Clients`). Cloning shares the pool.
#[derive(Clone)]
pub struct Upstream {
    pool: Arc<Pool>,
}

struct Pool {
    /// Offers `h2` and `http/1.1` by ALPN.
    connector: Connector,
    /// Offers `http/1.1` only, for requests that upgrade the connection
    /// (WebSocket), which HTTP/2 does not carry.
    http1_connector: Connector,
    idle: Mutex<HashMap<Destination, Vec<Idle>>>,
    shared: Mutex<HashMap<Destination, Shared>>,
    janitor: std::sync::Once,
}

/// An HTTP/1.1 connection and the `Host` header its requests carry, made
/// once per connection rather than per request.
struct Http1 {
    sender: http1::SendRequest<Body>,
    host: HeaderValue,
}

struct Idle {
    conn: Http1,
    since: Instant,
}

/// An HTTP/2 connection every request to its destination goes over.
struct Shared {
    sender: http2::SendRequest<Body>,
    last_used: Instant,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").finish_non_exhaustive()
    }
}

/// Why a request got no response. `Display` carries no request content.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connection failed: {0}")]
    Connect(#[source] BoxError),
    #[error("connection failed: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("request failed: {0}")]
    Request(#[source] hyper::Error),
    #[error("the upstream URL is not absolute")]
    NotAbsolute,
}

pub type Sending<'a> =
    Pin<Box<dyn Future<Output = Result<Response<UpstreamBody>, SendError>> + Send + 'a>>;

/// What a fresh connection turned out to speak.
enum Fresh {
    Http1(Http1),
    Http2(http2::SendRequest<Body>),
}

impl Upstream {
    pub fn new(connector: Connector, http1_connector: Connector) -> Self {
        Self {
            pool: Arc::new(Pool {
                connector,
                http1_connector,
                idle: Mutex::default(),
                shared: Mutex::default(),
                janitor: std::sync::Once::new(),
            }),
        }
    }

    /// Sends `request` (absolute URL) on a pooled connection, or a new one.
    pub fn send(&self, request: Request<Body>) -> Sending<'_> {
        // Boxed, as hyper-util's client did: inline, these ~1.8 KB would
        // make every request's future larger by as much.
        Box::pin(self.send_on(request, false))
    }

    /// Sends a request that asks to upgrade the connection: HTTP/1.1 only.
    pub fn send_upgrade(&self, request: Request<Body>) -> Sending<'_> {
        Box::pin(self.send_on(request, true))
    }

    async fn send_on(
        &self,
        mut request: Request<Body>,
        upgrade: bool,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let uri = request.uri().clone();
        let destination = match (uri.scheme(), uri.authority()) {
            (Some(scheme), Some(authority)) => Destination {
                scheme: scheme.clone(),
                authority: authority.clone(),
            },
            _ => return Err(SendError::NotAbsolute),
        };
        // A pooled connection may have closed since it was put back; a
        // request it gave back unsent goes to the next one, then to a new one.
        if !upgrade && let Some(mut sender) = self.pool.shared_for(&destination) {
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(UpstreamBody::wrap(response, None)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => {
                        self.pool.forget_closed_shared(&destination);
                        request = unsent;
                    }
                    None => return Err(SendError::Request(e.into_error())),
                },
            }
        }
        while let Some(conn) = self.pool.checkout(&destination) {
            match self.send_http1(conn, request, &uri, &destination).await {
                Ok(response) => return Ok(response),
                Err(Unsent::Retry(unsent, _)) => request = *unsent,
                Err(Unsent::Failed(e)) => return Err(e),
            }
        }
        // Boxed: a new connection (DNS, TCP, TLS) is the cold path, and its
        // large future would otherwise be copied into every request's.
        Box::pin(self.send_on_new(request, &uri, &destination, upgrade)).await
    }

    async fn send_on_new(
        &self,
        request: Request<Body>,
        uri: &Uri,
        destination: &Destination,
        upgrade: bool,
    ) -> Result<Response<UpstreamBody>, SendError> {
        match self.connect(destination, upgrade).await? {
            Fresh::Http2(mut sender) => {
                if let Ok(runtime) = Handle::try_current() {
                    self.pool.share(destination, &sender, &runtime);
                }
                sender
                    .send_request(request)
                    .await
                    .map(|response| UpstreamBody::wrap(response, None))
                    .map_err(SendError::Request)
            }
            Fresh::Http1(conn) => match self.send_http1(conn, request, uri, destination).await {
                Ok(response) => Ok(response),
                // A new connection that closed before the request went out
                // has no excuse left: the upstream refused it.
                Err(Unsent::Retry(_, error)) => Err(SendError::Request(error)),
                Err(Unsent::Failed(e)) => Err(e),
            },
        }
    }

    /// HTTP/1.1 wants origin-form and a `Host` header (the proxy removed the
    /// agent's; this one names the upstream sidekey connected to).
    async fn send_http1(
        &self,
        mut conn: Http1,
        mut request: Request<Body>,
        uri: &Uri,
        destination: &Destination,
    ) -> Result<Response<UpstreamBody>, Unsent> {
        request
            .headers_mut()
            .insert(header::HOST, conn.host.clone());
        // hyper's HTTP/1 encoder accepts no other version.
        *request.version_mut() = http::Version::HTTP_11;
        *request.uri_mut() = if request.method() == http::Method::CONNECT {
            authority_form(&destination.authority)
        } else {
            origin_form(uri)
        };
        match conn.sender.try_send_request(request).await {
            Ok(response) => {
                let keep =
                    (response.status() != http::StatusCode::SWITCHING_PROTOCOLS).then(|| {
                        KeepAlive {
                            pool: Arc::downgrade(&self.pool),
                            destination: destination.clone(),
                            conn,
                        }
                    });
                Ok(UpstreamBody::wrap(response, keep))
            }
            Err(mut e) => match e.take_message() {
                Some(mut unsent) => {
                    unsent.headers_mut().remove(header::HOST);
                    *unsent.uri_mut() = uri.clone();
                    Err(Unsent::Retry(Box::new(unsent), e.into_error()))
                }
                None => Err(Unsent::Failed(SendError::Request(e.into_error()))),
            },
        }
    }

    async fn connect(&self, destination: &Destination, upgrade: bool) -> Result<Fresh, SendError> {
        let mut connector = if upgrade {
            self.pool.http1_connector.clone()
        } else {
            self.pool.connector.clone()
        };
        let target = Uri::builder()
            .scheme(destination.scheme.clone())
            .authority(destination.authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|_| SendError::NotAbsolute)?;
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(SendError::Connect)?;
        let io = connector.call(target).await.map_err(SendError::Connect)?;
        if io.connected().is_negotiated_h2() {
            // Pings find a connection that died without a word (a NAT or
            // firewall dropping it), which would otherwise stall every
            // request to the destination until its timeout.
            let (mut sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(H2_PING_INTERVAL)
                .keep_alive_timeout(H2_PING_TIMEOUT)
                .handshake(io)
                .await
                .map_err(SendError::Handshake)?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
                }
            });
            sender.ready().await.map_err(SendError::Handshake)?;
            Ok(Fresh::Http2(sender))
        } else {
            let (mut sender, connection) = http1::Builder::new()
                .handshake(io)
                .await
                .map_err(SendError::Handshake)?;
            tokio::spawn(async move {
                if let Err(e) = connection.with_upgrades().await {
                    tracing::debug!(error = %e, "upstream connection ended");
                }
            });
            sender.ready().await.map_err(SendError::Handshake)?;
            Ok(Fresh::Http1(Http1 {
                sender,
                host: host_header(destination),
            }))
        }
    }
}

enum Unsent {
    /// The connection closed before the request was written: safe to resend.
    Retry(Box<Request<Body>>, hyper::Error),
    Failed(SendError),
}

impl Pool {
    /// The most recently used live connection (the others may then expire).
    fn checkout(&self, destination: &Destination) -> Option<Http1> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(destination)?;
        while let Some(Idle { conn, since }) = list.pop() {
            if conn.sender.is_ready() && since.elapsed() < IDLE_TIMEOUT {
                return Some(conn);
            }
        }
        None
    }

    fn put(self: &Arc<Self>, destination: Destination, conn: Http1, runtime: &Handle) {
        self.start_sweeping(runtime);
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(destination).or_default();
        if list.len() < MAX_IDLE_PER_DESTINATION {
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    fn start_sweeping(self: &Arc<Self>, runtime: &Handle) {
        self.janitor.call_once(|| {
            runtime.spawn(sweep(Arc::downgrade(self)));
        });
    }

    fn shared_for(&self, destination: &Destination) -> Option<http2::SendRequest<Body>> {
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let entry = shared
            .get_mut(destination)
            .filter(|s| s.sender.is_ready())?;
        entry.last_used = Instant::now();
        Some(entry.sender.clone())
    }

    /// Keeps `sender` for the destination's next requests, unless another
    /// connection opened at the same time got there first.
    fn share(
        self: &Arc<Self>,
        destination: &Destination,
        sender: &http2::SendRequest<Body>,
        runtime: &Handle,
    ) {
        self.start_sweeping(runtime);
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        match shared.get(destination) {
            Some(current) if current.sender.is_ready() => {}
            _ => {
                shared.insert(
                    destination.clone(),
                    Shared {
                        sender: sender.clone(),
                        last_used: Instant::now(),
                    },
                );
            }
        }
    }

    fn forget_closed_shared(&self, destination: &Destination) {
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        if shared
            .get(destination)
            .is_some_and(|s| !s.sender.is_ready())
        {
            shared.remove(destination);
        }
    }
}

/// Closes connections unused for `IDLE_TIMEOUT` even when no request comes
/// for their destination again (an HTTP/2 connection closes once the
/// streams still on it end); ends with the pool.
async fn sweep(pool: Weak<Pool>) {
    loop {
        tokio::time::sleep(IDLE_TIMEOUT / 4).await;
        let Some(pool) = pool.upgrade() else { return };
        {
            let mut idle = pool.idle.lock().unwrap_or_else(|e| e.into_inner());
            idle.retain(|_, list| {
                list.retain(|i| i.conn.sender.is_ready() && i.since.elapsed() < IDLE_TIMEOUT);
                !list.is_empty()
            });
        }
        let mut shared = pool.shared.lock().unwrap_or_else(|e| e.into_inner());
        shared.retain(|_, s| s.sender.is_ready() && s.last_used.elapsed() < IDLE_TIMEOUT);
    }
}

/// CONNECT names only the host and port (RFC 9110 9.3.6), as hyper-util sent it.
fn authority_form(authority: &Authority) -> Uri {
    Uri::from(authority.clone())
}

fn origin_form(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        Some(path) if path.as_str() != "/" => Uri::from(path.clone()),
        _ => Uri::from_static("/"),
    }
}

/// `Host` as RFC 9110 7.2 wants it: the port only when not the scheme's default.
fn host_header(destination: &Destination) -> HeaderValue {
    let authority = &destination.authority;
    let default_port = if destination.scheme == Scheme::HTTPS {
        443
    } else {
        80
    };
    let host = authority.host();
    let value = match authority.port_u16() {
        Some(port) if port != default_port => HeaderValue::from_str(&format!("{host}:{port}")),
        _ => HeaderValue::from_str(host),
    };
    // An `Authority` holds only bytes that are valid in a header value.
    value.unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// An HTTP/1.1 connection on its way back to the pool once its response ends.
struct KeepAlive {
    pool: Weak<Pool>,
    destination: Destination,
    conn: Http1,
}

impl KeepAlive {
    fn release(self) {
        // Without a runtime (shutting down) the connection just closes.
        let (Some(pool), Ok(runtime)) = (self.pool.upgrade(), Handle::try_current()) else {
            return;
        };
        let KeepAlive {
            destination,
            mut conn,
            ..
        } = self;
        if conn.sender.is_ready() {
            pool.put(destination, conn, &runtime);
        } else if !conn.sender.is_closed() {
            // The connection is still finishing (the request body, say);
            // the wait must not keep a replaced config's pool alive.
            let pool = Arc::downgrade(&pool);
            runtime.clone().spawn(async move {
                if conn.sender.ready().await.is_ok()
                    && let Some(pool) = pool.upgrade()
                {
                    pool.put(destination, conn, &runtime);
                }
            });
        }
    }
}

/// An upstream response body. A body read to its end puts its HTTP/1.1
/// connection back in the pool; one dropped before its end closes it.
pub struct UpstreamBody {
    body: Incoming,
    keep: Option<KeepAlive>,
}

impl UpstreamBody {
    fn wrap(response: Response<Incoming>, keep: Option<KeepAlive>) -> Response<Self> {
        response.map(|body| Self { body, keep })
    }

    fn release(&mut self) {
        if let Some(keep) = self.keep.take() {
            keep.release();
        }
    }

    fn release_if_ended(&mut self) {
        if self.body.is_end_stream() {
            self.release();
        }
    }
}

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        match &frame {
            Some(Ok(_)) => self.release_if_ended(),
            None => self.release(),
            // A failed body leaves its connection in no state to reuse.
            Some(Err(_)) => self.keep = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        self.release_if_ended();
    }
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn destination(url: &str) -> Destination {
        let uri: Uri = url.parse().unwrap();
        Destination {
            scheme: uri.scheme().unwrap().clone(),
            authority: uri.authority().unwrap().clone(),
        }
    }

    #[test]
    fn host_names_the_port_only_when_it_is_not_the_schemes_default() {
        for (url, host) in [
            ("http://api.example:80/x", "api.example"),
            ("http://api.example/x", "api.example"),
            ("https://api.example:443/x", "api.example"),
            ("https://api.example:80/x", "api.example:80"),
            ("http://api.example:443/x", "api.example:443"),
            ("http://127.0.0.1:8080/x", "127.0.0.1:8080"),
            ("https://[::1]:8443/x", "[::1]:8443"),
            ("https://[::1]/x", "[::1]"),
            // User info is never sent on.
            ("http://user:pw@api.example:8080/x", "api.example:8080"),
        ] {
            assert_eq!(host_header(&destination(url)), host, "{url}");
        }
    }

    #[test]
    fn origin_form_keeps_path_and_query_and_connect_only_the_authority() {
        for (url, origin) in [
            ("http://a.example", "/"),
            ("http://a.example/", "/"),
            ("http://a.example/v1/x?q=1&r", "/v1/x?q=1&r"),
            ("https://u@a.example:8443/p?", "/p?"),
        ] {
            assert_eq!(origin_form(&url.parse().unwrap()), origin, "{url}");
        }
        let connect = authority_form(&destination("https://a.example:8443/p").authority);
        assert_eq!(connect, "a.example:8443");
    }

    #[test]
    fn destinations_differ_by_scheme_and_by_port() {
        let a = destination("http://a.example:8080/");
        assert!(a == destination("http://a.example:8080/other"));
        assert!(a != destination("https://a.example:8080/"));
        assert!(a != destination("http://a.example:8081/"));
        assert!(a != destination("http://b.example:8080/"));
    }
}
