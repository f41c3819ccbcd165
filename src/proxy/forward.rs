//! The forward proxy: absolute-form `GET http://host/path` and `CONNECT
//! host:port`, for clients configured with `HTTP(S)_PROXY`.
//!
//! Identity comes only from `Proxy-Authorization`. A CONNECT is decided and
//! audited before any tunnel byte flows: to a route's origin it is
//! intercepted (TLS terminated with a minted leaf, each request inside
//! checked and injected); allowed by a host rule without methods or paths it
//! is tunnelled blind to an address sidekey resolved and checked itself.

use std::sync::Arc;

use futures_util::future::Either;
use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use super::body::{Body, empty};
use super::lasting::Granted;
use super::{Flow, Plan, Proxy, ProxyError, Response};
use crate::config::Route;
use crate::egress::{self, Reach};
use crate::identity::Presented;
use crate::listen::ConnSlot;
use crate::live::Snapshot;
use crate::policy::{normalize_host, path::normalize};

/// The agent's side of an intercepted tunnel, decrypted.
type AgentTls = tokio_rustls::server::TlsStream<TokioIo<hyper::upgrade::Upgraded>>;

/// What every request inside one intercepted tunnel shares.
#[derive(Debug)]
pub(super) struct Tunnel {
    /// The CONNECT's identity, verified again on every request so that
    /// revocation and expiry end a long-lived tunnel's next request.
    presented: Presented,
    host: String,
    port: u16,
}

impl Proxy {
    /// `GET http://host/path`: a route's `http://` origin gets its
    /// credential; a destination allowed by a host rule gets none.
    pub(super) async fn forward(
        &self,
        flow: &mut Flow<'_>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, ProxyError> {
        let (parts, body) = req.into_parts();
        flow.note_destination(&parts.uri, 80);
        let (agent, presented) = self.identify(flow, &parts, None, None)?;
        flow.set_agent(&agent, &presented);
        if parts.uri.scheme_str() != Some("http") {
            return Err(ProxyError::BadRequest(
                "only http:// URLs are forwarded; https goes through CONNECT".into(),
            ));
        }
        let (host, port) = destination(&parts.uri, 80)?;
        let route = route_for_origin(flow.snapshot, false, &host, port, Some(parts.uri.path()));
        self.plan_and_deliver(
            flow, parts, body, agent, presented, host, port, false, route,
        )
        .await
    }

    /// `CONNECT host:port`, decided now; the tunnel is served after the 200.
    pub(super) async fn connect(
        self: &Arc<Self>,
        flow: &mut Flow<'_>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, ProxyError> {
        // RFC 9110 9.3.6: `host:port` and nothing else. A missing port is
        // not guessed, and a URL is not read as a destination.
        let uri = req.uri();
        if uri.scheme().is_some() || uri.path_and_query().is_some() || uri.port().is_none() {
            return Err(ProxyError::BadRequest("CONNECT takes host:port".into()));
        }
        let (host, port) = destination(uri, 443)?;
        flow.event.host = Some(host.clone());
        flow.event.port = Some(port);
        flow.event.path = String::new();
        let (req_parts, req_body) = req.into_parts();
        let identified = self.identify(flow, &req_parts, None, None);
        let req = Request::from_parts(req_parts, req_body);
        let (agent, presented) = identified?;
        flow.set_agent(&agent, &presented);
        // The path is not known yet: any route on this origin makes the
        // tunnel intercepted, so its requests are decided one by one.
        let route = route_for_origin(flow.snapshot, true, &host, port, None);
        flow.event.route = route.as_ref().map(|r| r.name.clone());
        let decision = flow.snapshot.policy.check_connect(
            &agent.name,
            &agent.session,
            agent.claims.as_deref(),
            route.as_ref().map(|r| r.name.as_str()),
            &host,
            port,
        );
        flow.event.rule = decision.rule.clone();
        if !decision.allowed {
            return Err(ProxyError::Denied {
                rule: decision.rule,
            });
        }
        flow.outcome.forwarded = true;
        if route.is_none() && !decision.inspect {
            let reach = if decision.private_ok {
                Reach::Any
            } else {
                Reach::Public
            };
            let upstream = connect_checked(&host, port, reach).await?;
            let tunnels = self.metrics.active_tunnels.clone();
            let slot = req.extensions().get::<Arc<ConnSlot>>().cloned();
            let granted = Granted::Tunnel {
                host: host.clone(),
                port,
                private: upstream
                    .peer_addr()
                    .map_or(true, |peer| egress::forbidden_reason(peer.ip()).is_some()),
            };
            let identity = self.lasting(presented, granted, &flow.event);
            tokio::spawn(async move {
                match hyper::upgrade::on(req).await {
                    Ok(upgraded) => {
                        tunnels.inc();
                        let mut agent_side = TokioIo::new(upgraded);
                        let mut upstream = upstream;
                        let copy = until_idle(slot, true, async {
                            let _ =
                                tokio::io::copy_bidirectional(&mut agent_side, &mut upstream).await;
                        });
                        identity.guard(copy).await;
                        tunnels.dec();
                    }
                    Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
                }
            });
            return Ok(Response::new(empty()));
        }
        let tunnel = Arc::new(Tunnel {
            presented,
            host,
            port,
        });
        self.spawn_tunnel(req, tunnel);
        Ok(Response::new(empty()))
    }

    /// Serves the tunnel once hyper hands over the stream. A plain function,
    /// not `async`, so the tunnel's future (which serves requests through
    /// `handle_in` again) is not part of `handle_in`'s own type.
    ///
    /// An idle tunnel holds its task and the boxed HTTP connection (with
    /// the TLS session inside) and nothing else: the request is reduced to
    /// its pending upgrade before the task starts, and the handshake's
    /// state is boxed and freed once it is done.
    fn spawn_tunnel(self: &Arc<Self>, req: Request<Incoming>, tunnel: Arc<Tunnel>) {
        let proxy = self.clone();
        let slot = req.extensions().get::<Arc<ConnSlot>>().cloned();
        let upgrade = hyper::upgrade::on(req);
        tokio::spawn(async move {
            let upgraded = match upgrade.await {
                Ok(upgraded) => upgraded,
                Err(e) => {
                    tracing::debug!(error = %e, "CONNECT upgrade failed");
                    return;
                }
            };
            let tunnels = proxy.metrics.active_tunnels.clone();
            tunnels.inc();
            // The session is bound in this block only, so the task keeps no
            // copy of it beside the one the connection owns. An agent that
            // stalls its handshake is closed when idle, as one that stalls
            // between requests is.
            let serving = {
                let accepted =
                    until_idle(slot.clone(), false, proxy.accept_tunnel(upgraded, &tunnel))
                        .await
                        .flatten();
                accepted.map(|tls| proxy.serve_tunnel(tls, tunnel, slot.clone()))
            };
            if let Some(serving) = serving {
                until_idle(slot, false, serving).await;
            }
            tunnels.dec();
        });
    }

    /// Terminates the agent's TLS with a leaf for the CONNECT host.
    async fn accept_tunnel(
        &self,
        upgraded: hyper::upgrade::Upgraded,
        tunnel: &Tunnel,
    ) -> Option<AgentTls> {
        let config = match self.minter.server_config(&tunnel.host) {
            Ok((config, cached)) => {
                if cached {
                    self.metrics.leaf_cache_hits.inc();
                } else {
                    self.metrics.leaf_cache_misses.inc();
                }
                config
            }
            Err(e) => {
                tracing::error!(host = %tunnel.host, error = %e, "cannot mint a leaf certificate");
                return None;
            }
        };
        match tokio_rustls::TlsAcceptor::from(config)
            .accept(TokioIo::new(upgraded))
            .await
        {
            Ok(tls) => Some(tls),
            Err(e) => {
                tracing::info!(host = %tunnel.host, error = %e, "agent TLS handshake failed (does it trust the sidekey CA?)");
                None
            }
        }
    }

    /// Serves HTTP/1.1 or HTTP/2 inside an intercepted tunnel, each request
    /// through [`Proxy::intercept`]. A plain function: the session moves
    /// straight into the boxed connection, where an `async fn` would keep
    /// its argument's slot beside it for the tunnel's whole life.
    fn serve_tunnel(
        self: &Arc<Self>,
        tls: AgentTls,
        tunnel: Arc<Tunnel>,
        slot: Option<Arc<ConnSlot>>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let limits = self.live.snapshot().config.limits.clone();
        // HTTP/2 over TLS is only ever agreed by ALPN (RFC 9113, 3.2), so
        // an agent that did not pick `h2` speaks HTTP/1.1 and gets hyper's
        // HTTP/1 server directly: sniffing the version would leave a 16 KiB
        // read buffer behind (see `listen::Conn::serve_tcp`).
        let http1 = tls.get_ref().1.alpn_protocol() != Some(b"h2".as_slice());
        let proxy = self.clone();
        let stopping = slot.clone();
        let service = service_fn(move |mut req: Request<Incoming>| {
            let proxy = proxy.clone();
            let tunnel = tunnel.clone();
            let busy = slot.as_ref().map(|slot| {
                req.extensions_mut().insert(slot.clone());
                slot.busy()
            });
            // Boxed, so an idle tunnel does not hold a request's state.
            Box::pin(async move {
                let response = proxy.handle_in(req, Some(&tunnel)).await;
                drop(busy);
                Ok::<_, std::convert::Infallible>(response)
            })
        });
        let io = TokioIo::new(tls);
        if http1 {
            let conn = crate::listen::http1_builder(&limits)
                .serve_connection(io, service)
                .with_upgrades();
            // Boxed before the async block, which would otherwise keep the
            // moved-from connection beside the one it polls.
            Either::Left(until_served(Box::pin(conn), stopping, |conn| {
                conn.graceful_shutdown()
            }))
        } else {
            // The version-sniffing server borrows its builder, so an async
            // block owns both; it keeps a second slot for the session, paid
            // only by tunnels that agreed on `h2`.
            let builder = crate::listen::http_builder(&limits);
            Either::Right(Box::pin(async move {
                let conn = Box::pin(builder.serve_connection_with_upgrades(io, service));
                until_served(conn, stopping, |conn| conn.graceful_shutdown()).await;
            }))
        }
    }

    /// One request inside an intercepted tunnel.
    pub(super) async fn intercept(
        &self,
        flow: &mut Flow<'_>,
        req: Request<Incoming>,
        tunnel: &Tunnel,
    ) -> Result<Response<Body>, ProxyError> {
        let (parts, body) = req.into_parts();
        let agent = self.verify(flow, &tunnel.presented)?;
        let presented = tunnel.presented.clone();
        flow.set_agent(&agent, &presented);
        // SECURITY: the request must be for the host the tunnel was opened
        // (and decided) for; anything else would steer the credential.
        let named = parts
            .uri
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| {
                parts
                    .headers
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
            })
            .ok_or_else(|| ProxyError::BadRequest("no Host header".into()))?;
        let authority: http::uri::Authority = named
            .parse()
            .map_err(|_| ProxyError::BadRequest("invalid Host header".into()))?;
        let host = normalize_host(authority.host());
        let port = authority.port_u16().unwrap_or(443);
        if host != tunnel.host || port != tunnel.port {
            return Err(ProxyError::Misdirected(format!(
                "{named} is not {}:{}, the host this tunnel was opened for",
                tunnel.host, tunnel.port
            )));
        }
        let route = route_for_origin(flow.snapshot, true, &host, port, Some(parts.uri.path()));
        self.plan_and_deliver(flow, parts, body, agent, presented, host, port, true, route)
            .await
    }

    /// Steps 3 and 4 for a destination named by host and port, then delivery.
    async fn plan_and_deliver(
        &self,
        flow: &mut Flow<'_>,
        parts: http::request::Parts,
        body: Incoming,
        agent: crate::identity::Agent,
        presented: Presented,
        host: String,
        port: u16,
        https: bool,
        route: Option<Arc<Route>>,
    ) -> Result<Response<Body>, ProxyError> {
        flow.event.host = Some(host.clone());
        flow.event.port = Some(port);
        flow.event.route = route.as_ref().map(|r| r.name.clone());
        let base_path = route
            .as_ref()
            .map(|r| r.upstream.base_path.clone())
            .unwrap_or_default();
        let path = normalize(&parts.uri.path()[base_path.len()..])?;
        flow.set_path(format!("{base_path}{}", path.decoded()), &presented);
        let authorized = flow.authorize(
            &agent,
            route.as_ref().map(|r| r.name.as_str()),
            &host,
            port,
            &parts,
            &base_path,
            &path,
        )?;
        let private_ok = match &route {
            Some(route) => route.allow_private || host_is_literal(&host),
            None => authorized.decision.private_ok,
        };
        let reach = if private_ok {
            Reach::Any
        } else {
            Reach::Public
        };
        // The connector does not resolve IP literals, so they are checked here.
        egress::check_literal(&host, reach, false).map_err(ProxyError::Forbidden)?;
        let plan = Plan {
            route,
            https,
            host,
            port,
            base_path,
            path,
            reach,
            presented,
            overrides: authorized.overrides,
            form_denied: authorized.form_denied,
        };
        self.deliver(flow, parts, body, plan).await
    }
}

/// Runs `work` until it ends (its output) or the connection it came from
/// goes idle (`None`).
///
/// `work` is boxed here, in a plain function: an `async fn` would keep the
/// argument's slot in its own state beside the copy it polls, and a tunnel
/// holds this future for as long as it stays open.
///
/// `blind`: sidekey cannot see the requests in `work` (a blind tunnel, a
/// WebSocket), so once it is stopping, a moment's quiet ends it too.
pub(super) fn until_idle<'a, T: Send + 'a>(
    slot: Option<Arc<ConnSlot>>,
    blind: bool,
    work: impl std::future::Future<Output = T> + Send + 'a,
) -> impl std::future::Future<Output = Option<T>> + Send + 'a {
    let work = Box::pin(work);
    async move {
        match slot {
            Some(slot) => {
                let idle = async {
                    if blind {
                        slot.idle_or_quiet_while_stopping().await;
                    } else {
                        slot.idle().await;
                    }
                };
                tokio::select! {
                    done = work => Some(done),
                    () = idle => {
                        tracing::debug!("idle tunnel closed");
                        None
                    }
                }
            }
            None => Some(work.await),
        }
    }
}

/// Serves an intercepted tunnel's HTTP connection to its end; once sidekey
/// is stopping, `finish` asks it to complete the requests in flight (their
/// response bodies too) and close, as the listener's connections do.
async fn until_served<C, E>(
    mut conn: std::pin::Pin<Box<C>>,
    slot: Option<Arc<ConnSlot>>,
    finish: fn(std::pin::Pin<&mut C>),
) where
    C: std::future::Future<Output = Result<(), E>>,
{
    let Some(slot) = slot else {
        let _ = conn.await;
        return;
    };
    tokio::select! {
        _ = conn.as_mut() => {}
        () = slot.stopping() => {
            finish(conn.as_mut());
            let _ = conn.await;
        }
    }
}

fn host_is_literal(host: &str) -> bool {
    host.parse::<std::net::IpAddr>().is_ok()
}

/// The host and port a forward request or CONNECT names; `explain` reads
/// URLs with it too, so that it shows the destination the proxy would use.
pub fn destination(uri: &http::Uri, default_port: u16) -> Result<(String, u16), ProxyError> {
    let authority = uri
        .authority()
        .ok_or_else(|| ProxyError::BadRequest("no destination host".into()))?;
    if authority.as_str().contains('@') {
        return Err(ProxyError::BadRequest(
            "user info in the destination".into(),
        ));
    }
    // `port_u16` is `None` for a port that is not a u16 as for no port at
    // all, so the text is read here: `host:99999` must not become the
    // default port.
    let text = authority.as_str();
    let after_host = text.rfind(']').map_or(text, |end| &text[end..]);
    let port = match after_host.rsplit_once(':') {
        Some((_, "")) | None => default_port,
        Some((_, port)) => port
            .parse::<u16>()
            .ok()
            .filter(|&port| port != 0)
            .ok_or_else(|| ProxyError::BadRequest("invalid destination port".into()))?,
    };
    let host = normalize_host(authority.host());
    if host.is_empty() {
        return Err(ProxyError::BadRequest("no destination host".into()));
    }
    Ok((host, port))
}

/// [`crate::config::Config::route_for_origin`] in this config version.
pub(super) fn route_for_origin(
    snapshot: &Snapshot,
    https: bool,
    host: &str,
    port: u16,
    path: Option<&str>,
) -> Option<Arc<Route>> {
    snapshot
        .config
        .route_for_origin(https, host, port, path)
        .cloned()
}

/// Opens a blind tunnel's upstream connection to an address checked by
/// [`egress::resolve`] (no second lookup between check and connect).
async fn connect_checked(
    host: &str,
    port: u16,
    reach: Reach,
) -> Result<tokio::net::TcpStream, ProxyError> {
    let addrs = egress::resolve(host, port, reach).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            ProxyError::Forbidden(e.to_string())
        } else {
            ProxyError::Upstream {
                host: host.to_string(),
                cause: format!("cannot resolve: {e}"),
            }
        }
    })?;
    tokio::net::TcpStream::connect(&addrs[..])
        .await
        .map_err(|e| ProxyError::Upstream {
            host: host.to_string(),
            cause: format!("connection failed: {e}"),
        })
}
