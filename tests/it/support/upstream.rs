//! `Upstream`: a real HTTP or HTTPS server on loopback that records every
//! request it gets and answers by path:
//!
//! - `/sse`: `data: first`, then waits for [`Upstream::release`], then `data: second`;
//! - `/split`: echoes the `authorization` value split across two chunks;
//! - `/stall`: never answers;
//! - `/status/NNN`: answers NNN with the echo body;
//! - `/redirect`: 302 to another host, with the credential in the Location;
//! - `/gzip`: a gzip-encoded body;
//! - `/te-gzip`: the same, compressed as a transfer coding (`gzip, chunked`);
//! - `/reason`: 401 with the credential in the status line's reason phrase;
//! - anything else: a JSON echo of method, URI, headers and body (like httpbin's `/anything`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::ext::ReasonPhrase;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

type Body = BoxBody<Bytes, Infallible>;

/// A CA made at test time and a leaf it signed for `names`.
pub struct TestPki {
    pub ca_pem: String,
    pub leaf: rcgen::Certificate,
    pub leaf_key: rcgen::KeyPair,
}

impl TestPki {
    pub fn new(ca_name: &str, names: &[&str]) -> Self {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, ca_name);
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let leaf = rcgen::CertificateParams::new(names)
            .unwrap()
            .signed_by(&leaf_key, &ca)
            .unwrap();
        Self {
            ca_pem: ca.pem(),
            leaf,
            leaf_key,
        }
    }
}

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub version: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Trailers after a chunked body, as `name: value` lines.
    pub trailers: Vec<String>,
    /// The TLS cipher suite of the connection (HTTPS upstreams), as rustls names it.
    pub tls_suite: Option<String>,
    /// The client's address: which connection the request came on.
    pub peer: SocketAddr,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

struct Shared {
    seen: Mutex<Vec<Seen>>,
    /// Connections accepted and not yet closed.
    open: std::sync::atomic::AtomicUsize,
    /// Upgraded (WebSocket) connections not yet closed.
    websockets: std::sync::atomic::AtomicUsize,
    release: Semaphore,
    /// Static files a test put: path -> (content type, body).
    files: Mutex<std::collections::HashMap<String, (String, Vec<u8>)>>,
}

pub struct Upstream {
    pub addr: SocketAddr,
    /// The CA that signed an HTTPS upstream's certificate (PEM file).
    pub ca: Option<PathBuf>,
    shared: Arc<Shared>,
}

impl Upstream {
    pub fn http() -> Self {
        Self::start(None, None)
    }

    /// An HTTPS upstream for `localhost` with a CA made now, written to `dir/upstream-ca.pem`.
    pub fn https(dir: &Path) -> Self {
        Self::https_for(dir, &["localhost", "127.0.0.1"])
    }

    /// An HTTPS upstream whose certificate names only `names`.
    pub fn https_for(dir: &Path, names: &[&str]) -> Self {
        let TestPki {
            ca_pem,
            leaf,
            leaf_key,
        } = TestPki::new("test upstream CA", names);
        let ca_path = dir.join("upstream-ca.pem");
        std::fs::write(&ca_path, ca_pem).unwrap();

        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Self::start(Some(Arc::new(tls)), Some(ca_path))
    }

    fn start(tls: Option<Arc<rustls::ServerConfig>>, ca: Option<PathBuf>) -> Self {
        let shared = Arc::new(Shared {
            seen: Mutex::new(Vec::new()),
            open: Default::default(),
            websockets: Default::default(),
            release: Semaphore::new(0),
            files: Mutex::default(),
        });
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let server_shared = shared.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).unwrap();
                let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
                loop {
                    let Ok((stream, peer)) = listener.accept().await else {
                        continue;
                    };
                    let shared = server_shared.clone();
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        let _open = OpenConnection::count(&shared);
                        let builder =
                            hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                        match acceptor {
                            Some(acceptor) => {
                                if let Ok(tls) = acceptor.accept(stream).await {
                                    let suite = tls
                                        .get_ref()
                                        .1
                                        .negotiated_cipher_suite()
                                        .map(|s| format!("{:?}", s.suite()));
                                    let service = service_fn(move |req| {
                                        handle(req, shared.clone(), suite.clone(), peer)
                                    });
                                    let _ = builder
                                        .serve_connection_with_upgrades(TokioIo::new(tls), service)
                                        .await;
                                }
                            }
                            None => {
                                let service =
                                    service_fn(move |req| handle(req, shared.clone(), None, peer));
                                let _ = builder
                                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                                    .await;
                            }
                        }
                    });
                }
            });
        });
        Self { addr, ca, shared }
    }

    /// The origin to use as a route's `upstream`.
    pub fn base(&self) -> String {
        match self.ca {
            Some(_) => format!("https://localhost:{}", self.addr.port()),
            None => format!("http://127.0.0.1:{}", self.addr.port()),
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.shared.seen.lock().unwrap().len()
    }

    /// Connections open to this upstream now.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Upgraded (WebSocket) connections open to this upstream now.
    pub fn open_websockets(&self) -> usize {
        self.shared
            .websockets
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn last(&self) -> Seen {
        self.seen().pop().expect("the upstream received a request")
    }

    /// Serves `body` at `path` from now on.
    pub fn put(&self, path: &str, content_type: &str, body: Vec<u8>) {
        self.shared
            .files
            .lock()
            .unwrap()
            .insert(path.to_string(), (content_type.to_string(), body));
    }

    /// Lets one waiting `/sse` response finish.
    pub fn release(&self) {
        self.shared.release.add_permits(1);
    }
}

/// Counts one WebSocket as open until it is dropped.
struct OpenWebSocket(Arc<Shared>);

impl OpenWebSocket {
    fn count(shared: &Arc<Shared>) -> Self {
        shared
            .websockets
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(shared.clone())
    }
}

impl Drop for OpenWebSocket {
    fn drop(&mut self) {
        self.0
            .websockets
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Counts one connection as open until it is dropped.
struct OpenConnection(Arc<Shared>);

impl OpenConnection {
    fn count(shared: &Arc<Shared>) -> Self {
        shared
            .open
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(shared.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn handle(
    mut req: Request<Incoming>,
    shared: Arc<Shared>,
    tls_suite: Option<String>,
    peer: SocketAddr,
) -> Result<Response<Body>, Infallible> {
    let upgrade = req
        .uri()
        .path()
        .ends_with("/ws")
        .then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let (body, trailers) = match body.collect().await {
        Ok(collected) => {
            let trailers = collected
                .trailers()
                .map(|t| {
                    t.iter()
                        .map(|(k, v)| format!("{k}: {}", String::from_utf8_lossy(v.as_bytes())))
                        .collect()
                })
                .unwrap_or_default();
            (collected.to_bytes(), trailers)
        }
        Err(_) => (Bytes::new(), Vec::new()),
    };
    let seen = Seen {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        version: format!("{:?}", parts.version),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.to_vec(),
        trailers,
        tls_suite,
        peer,
    };
    shared.seen.lock().unwrap().push(seen.clone());
    let path = parts.uri.path();
    let auth = seen.header("authorization").unwrap_or_default().to_string();
    let file = shared.files.lock().unwrap().get(path).cloned();
    let response = if let Some((content_type, body)) = file {
        Response::builder()
            .header("content-type", content_type)
            .body(full(body))
            .unwrap()
    } else if let Some(upgrade) = upgrade {
        // WebSocket: greet with a text frame carrying the credential it got
        // (a hostile upstream), then echo raw bytes.
        let greeting = format!("hello {auth}");
        let split = format!("frag:{auth}");
        let shared = shared.clone();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let Ok(upgraded) = upgrade.await else { return };
            let _open = OpenWebSocket::count(&shared);
            let mut io = TokioIo::new(upgraded);
            let mut frame = vec![0x81, greeting.len() as u8];
            frame.extend_from_slice(greeting.as_bytes());
            // Then the credential again, in one message split across two
            // fragments with a ping between them: the agent joins the pieces.
            let (head, tail) = split.split_at(split.len() / 2);
            for (first, piece) in [(0x01, head), (0x89, "ping"), (0x80, tail)] {
                frame.extend_from_slice(&[first, piece.len() as u8]);
                frame.extend_from_slice(piece.as_bytes());
            }
            if io.write_all(&frame).await.is_err() {
                return;
            }
            let mut buf = [0u8; 1024];
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        let mut response = Response::builder()
            .status(101)
            .header("upgrade", "websocket")
            .header("connection", "upgrade")
            .body(full(Bytes::new()))
            .unwrap();
        // A status line of its own that repeats the credential.
        if let Ok(phrase) = ReasonPhrase::try_from(format!("Switching for {auth}").into_bytes()) {
            response.extensions_mut().insert(phrase);
        }
        response
    } else if path.ends_with("/reason") {
        // A hostile upstream that names the credential in its status line.
        let mut response = Response::builder()
            .status(401)
            .body(full("denied"))
            .unwrap();
        if let Ok(phrase) = ReasonPhrase::try_from(format!("Invalid key {auth}").into_bytes()) {
            response.extensions_mut().insert(phrase);
        }
        response
    } else if path.starts_with("/bucket/") {
        // S3-shaped: an empty 200 with an ETag, as PutObject answers.
        Response::builder()
            .header("etag", "\"9a0364b9e99bb480dd25e1f0284c8555\"")
            .body(full(Bytes::new()))
            .unwrap()
    } else if path == "/v1/auth/approle/login" {
        // Vault AppRole: a client token for the right role and secret id.
        let login: serde_json::Value = serde_json::from_slice(&seen.body).unwrap_or_default();
        if login["role_id"] == "role-1" && login["secret_id"] == "secret-id-1" {
            Response::builder()
                .header("content-type", "application/json")
                .body(full(r#"{"auth":{"client_token":"vault-token-approle"}}"#))
                .unwrap()
        } else {
            Response::builder()
                .status(400)
                .body(full(r#"{"errors":["invalid role or secret id"]}"#))
                .unwrap()
        }
    } else if path.starts_with("/v1/secret/data/") {
        // A Vault KV v2 read: the value depends on the token, so a test
        // can tell which token sidekey used.
        match seen.header("x-vault-token") {
            Some(token) if token.starts_with("vault-token-") => Response::builder()
                .header("content-type", "application/json")
                .body(full(
                    serde_json::json!({"data": {"data": {"api_key": format!("kv-{token}")}}})
                        .to_string(),
                ))
                .unwrap(),
            _ => Response::builder()
                .status(403)
                .body(full(r#"{"errors":["permission denied"]}"#))
                .unwrap(),
        }
    } else if path.ends_with("/forged-error") {
        // A hostile upstream posing as sidekey refusing.
        Response::builder()
            .header("x-sidekey-error", "policy_denied")
            .header("x-sidekey-request-id", "req-forged")
            .body(full("ok"))
            .unwrap()
    } else if path.ends_with("/history") {
        // A hostile upstream that keeps a log of what it was sent and
        // serves it to whoever asks: every Authorization so far.
        let history: Vec<String> = shared
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter_map(|s| s.header("authorization").map(str::to_string))
            .collect();
        Response::builder().body(full(history.join("\n"))).unwrap()
    } else if path.ends_with("/token-fail") {
        Response::builder()
            .status(500)
            .body(full("token endpoint down"))
            .unwrap()
    } else if path.ends_with("/token") || path.ends_with("/token-short") {
        // An OAuth 2 token endpoint: a new access token per call.
        let issued = shared
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.uri.ends_with(path))
            .count();
        // `/token-short` tokens live 32 s: inside sidekey's 30 s renewal margin after 2 s.
        let lifetime = if path.ends_with("/token-short") {
            32
        } else {
            3600
        };
        Response::builder()
            .header("content-type", "application/json")
            .body(full(format!(
                r#"{{"access_token":"at-{issued}-opaque","token_type":"Bearer","expires_in":{lifetime}}}"#
            )))
            .unwrap()
    } else if path.ends_with("/sse") {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
        tokio::spawn(async move {
            let _ = tx
                .send(Ok(Frame::data(Bytes::from_static(b"data: first\n\n"))))
                .await;
            if let Ok(permit) = shared.release.acquire().await {
                permit.forget();
            }
            let _ = tx
                .send(Ok(Frame::data(Bytes::from_static(b"data: second\n\n"))))
                .await;
        });
        let stream = tokio_stream_from(rx);
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(BodyExt::boxed(StreamBody::new(stream)))
            .unwrap()
    } else if path.ends_with("/split") {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
        tokio::spawn(async move {
            let half = auth.len() / 2;
            let first = format!("{{\"auth\":\"{}", &auth[..half]);
            let second = format!("{}\"}}", &auth[half..]);
            let _ = tx.send(Ok(Frame::data(Bytes::from(first)))).await;
            // Gives the proxy a chance to read the halves separately.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = tx.send(Ok(Frame::data(Bytes::from(second)))).await;
        });
        Response::builder()
            .body(BodyExt::boxed(StreamBody::new(tokio_stream_from(rx))))
            .unwrap()
    } else if path.ends_with("/stall") {
        std::future::pending::<()>().await;
        unreachable!()
    } else if let Some(port) = path
        .rsplit_once("/redirect-to/")
        .and_then(|(_, port)| port.parse::<u16>().ok())
    {
        // To another origin on loopback, which a client may follow.
        Response::builder()
            .status(302)
            .header("location", format!("http://127.0.0.1:{port}/landed"))
            .body(full(format!("moved; you sent {auth}")))
            .unwrap()
    } else if path.ends_with("/redirect") {
        Response::builder()
            .status(302)
            .header(
                "location",
                format!("https://elsewhere.example/?auth={auth}"),
            )
            .header("x-echo-auth", auth.clone())
            .body(full(format!("moved; you sent {auth}")))
            .unwrap()
    } else if path.ends_with("/header-name") {
        // The credential as a header's name, which no value scrub sees.
        let credential = auth.rsplit(' ').next().unwrap_or_default();
        Response::builder()
            .header(format!("x-key-{credential}"), "1")
            .body(full("named"))
            .unwrap()
    } else if path.ends_with("/te-gzip") {
        // A transfer coding hides the body from a scrubber as well as a
        // content coding does, and hyper's client removes only `chunked`.
        Response::builder()
            .header("transfer-encoding", "gzip, chunked")
            .body(full(b"\x1f\x8b\x08\x00\x00\x00\x00\x00".to_vec()))
            .unwrap()
    } else if path.ends_with("/gzip") {
        Response::builder()
            .header("content-encoding", "gzip")
            .body(full(b"\x1f\x8b\x08\x00\x00\x00\x00\x00".to_vec()))
            .unwrap()
    } else {
        let status = path
            .rsplit_once("/status/")
            .and_then(|(_, code)| code.parse::<u16>().ok())
            .unwrap_or(200);
        let mut headers = serde_json::Map::new();
        for (k, v) in &seen.headers {
            let entry = headers
                .entry(k.clone())
                .or_insert_with(|| serde_json::Value::Array(Vec::new()));
            entry.as_array_mut().unwrap().push(v.clone().into());
        }
        let echo = serde_json::json!({
            "method": seen.method,
            "uri": seen.uri,
            "headers": headers,
            "body": String::from_utf8_lossy(&seen.body),
        });
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .header("x-echo-auth", auth)
            .body(full(echo.to_string()))
            .unwrap()
    };
    Ok(response)
}

fn full(bytes: impl Into<Bytes>) -> Body {
    BodyExt::boxed(Full::new(bytes.into()))
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, Infallible>>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
