//! `handle()`: the request path, top to bottom.
//!
//! 1. identity: find and verify the agent token (before the route, so an
//!    unknown caller learns nothing about routes);
//! 2. destination: the gateway's first path segment names a route
//!    (`reverse.rs`); a forward request or CONNECT names a host, which is a
//!    route's when it is exactly that route's origin (`forward.rs`);
//! 3. path: normalised once, then matched and forwarded in that same form;
//! 4. policy: deny wins, default deny (`Flow::authorize`);
//! 5. secret: the current value, or fail closed (`Proxy::deliver` on);
//! 6. inject: strip the caller's copies of the slot, set the credential;
//! 7. send: to an address `egress` resolved and checked; a credential only
//!    ever to its route's configured origin, TLS verified;
//! 8. scrub: every held secret replaced in headers and the streamed body;
//! 9. audit: one record, written before the response is released.

pub mod body;
pub mod error;
mod forward;
mod lasting;
pub mod pool;
mod reverse;
mod upgrade;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::Body as _;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::audit::{AuditEvent, timestamp};
use crate::ca::LeafMinter;
use crate::config::{OnFailure, Route};
use crate::egress::Reach;
use crate::identity::{self, Agent, Presented};
use crate::inject;
use crate::live::{Live, SecretView, Snapshot};
use crate::metrics::{Metrics, RequestLabels};
use crate::policy;
use crate::scrub::Scrubber;
use crate::secret::oauth2::TokenCache;
use crate::token::{Verifier, random_id};

use body::{AgentBody, Body, Scrubbed, full};
pub use error::{Mode, ProxyError};
pub use forward::destination;
use lasting::{Granted, LastingIdentity};
use pool::UpstreamBody;

/// Responses up to this size with a declared length are read whole, so they
/// keep an exact `Content-Length` after scrubbing and their audit record has
/// exact byte and redaction counts. Larger or unsized ones stream.
const WHOLE_BODY_LIMIT: u64 = 64 * 1024;

/// The request path shared by every connection.
#[derive(Debug)]
pub struct Proxy {
    live: Arc<Live>,
    /// Shared with the open connections that check their identity again.
    verifier: Arc<Verifier>,
    minter: LeafMinter,
    metrics: Arc<Metrics>,
    tokens: TokenCache,
    /// The agent listener's address: an absolute-form request naming it is
    /// meant for the gateway (an SDK whose base URL is the gateway, behind
    /// `HTTP_PROXY` pointing at the same port).
    gateway: SocketAddr,
}

/// The uid of the process on the other end of a unix-socket connection,
/// attached to each of its requests by the listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerUid(pub u32);

/// What a request produced, for the audit record.
struct Outcome {
    forwarded: bool,
    bytes_in: Arc<AtomicU64>,
    bytes_out: u64,
    redactions: u64,
}

/// One request on its way through: the versions it uses and what its audit
/// record will say.
struct Flow<'a> {
    snapshot: &'a Snapshot,
    secrets: &'a SecretView,
    event: AuditEvent,
    outcome: Outcome,
}

impl Flow<'_> {
    /// Records who the request is from. The audit record names the token
    /// by its id and never holds it whole, even where the agent put it in
    /// the path (see [`Flow::set_path`]).
    fn set_agent(&mut self, agent: &Agent, presented: &Presented) {
        self.event.agent = Some(agent.name.clone());
        self.event.session = Some(agent.session.clone());
        self.event.token_id = agent.token_id.clone();
        self.event.path = without_token(std::mem::take(&mut self.event.path), presented);
    }

    /// Records where a forward request or CONNECT is going before its
    /// identity is checked, so that a refusal names the destination too.
    fn note_destination(&mut self, uri: &http::Uri, default_port: u16) {
        if let Ok((host, port)) = forward::destination(uri, default_port) {
            self.event.host = Some(host);
            self.event.port = Some(port);
        }
    }

    /// Records the decoded path the policy decides on.
    fn set_path(&mut self, path: String, presented: &Presented) {
        self.event.path = without_token(path, presented);
    }

    /// Step 4: the policy decision, recorded; a refusal is an error. Also
    /// the methods the request asks the upstream to act as, which were
    /// decided too. `path` is relative to the destination's `base_path`.
    fn authorize(
        &mut self,
        agent: &Agent,
        route: Option<&str>,
        host: &str,
        port: u16,
        parts: &http::request::Parts,
        base_path: &str,
        path: &policy::NormalPath,
    ) -> Result<Authorized, ProxyError> {
        let overrides = method_overrides(&parts.headers, parts.uri.query())?;
        let check = |method: &Method, overrides: &[Method], path: &policy::NormalPath| {
            self.snapshot.policy.check(&policy::Request {
                agent: &agent.name,
                session: &agent.session,
                claims: agent.claims.as_deref(),
                route,
                host,
                port,
                method,
                overrides,
                path,
            })
        };
        let mut decision = check(&parts.method, &overrides, path);
        // S3's CopyObject and UploadPartCopy (both PUT) read the object
        // `x-amz-copy-source` names with the same credential: reading it
        // must be allowed too, or a write to one bucket would read any other.
        if decision.allowed
            && parts.method.as_str().eq_ignore_ascii_case("PUT")
            && let Some(source) = copy_source(&parts.headers, host, base_path)?
        {
            let read = check(&Method::GET, &[], &source);
            if !read.allowed {
                decision = read;
            }
        }
        self.event.rule = decision.rule.clone();
        if !decision.allowed {
            return Err(ProxyError::Denied {
                rule: decision.rule,
            });
        }
        // Which methods a `_method` field in the body could not act as;
        // the body is read for it only when there are some.
        let form_denied = if is_form_post(parts) {
            let denied: Vec<_> = FORM_OVERRIDE_METHODS
                .iter()
                .filter_map(|name| {
                    let method = Method::from_bytes(name.as_bytes()).ok()?;
                    let with = check(&parts.method, std::slice::from_ref(&method), path);
                    (!with.allowed).then_some((*name, with.rule))
                })
                .collect();
            (!denied.is_empty()).then(|| denied.into_boxed_slice())
        } else {
            None
        };
        Ok(Authorized {
            decision,
            overrides,
            form_denied,
        })
    }
}

/// What [`Flow::authorize`] allowed.
struct Authorized {
    decision: policy::Decision,
    /// The methods the request's headers and query ask to act as.
    overrides: Vec<Method>,
    /// The methods a form field may not ask to act as, each with the rule
    /// that denies it (see [`FORM_OVERRIDE_METHODS`]); `None` for none.
    form_denied: FormDenied,
}

/// Boxed, as one pointer: it rides in every request's future, and is
/// almost always `None`.
type FormDenied = Option<Box<[(&'static str, Option<String>)]>>;

/// The path an `x-amz-copy-source` header names (`bucket/key` or
/// `/bucket/key`, percent-encoded, perhaps with `?versionId=`), relative to
/// `base_path`; one outside `base_path` is refused. On a virtual-hosted
/// bucket (`BUCKET.s3.REGION.amazonaws.com`), where rule paths are keys,
/// the source must be in the same bucket, and its key is the path.
fn copy_source(
    headers: &HeaderMap,
    host: &str,
    base_path: &str,
) -> Result<Option<policy::NormalPath>, ProxyError> {
    const COPY_SOURCE: HeaderName = HeaderName::from_static("x-amz-copy-source");
    let mut values = headers.get_all(COPY_SOURCE).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let invalid = || ProxyError::BadRequest("invalid x-amz-copy-source header".into());
    if values.next().is_some() {
        return Err(invalid());
    }
    let value = value.to_str().map_err(|_| invalid())?;
    // An access point ARN names no path the policy could check.
    if value.starts_with("arn:") {
        return Err(invalid());
    }
    let value = value.split('?').next().unwrap_or_default();
    let value = value.strip_prefix('/').unwrap_or(value);
    let value = match virtual_hosted_bucket(host) {
        Some(bucket) => match value.split_once('/') {
            Some((named, key)) if named == bucket => key,
            _ => {
                return Err(ProxyError::Forbidden(
                    "x-amz-copy-source names another bucket than the route's".into(),
                ));
            }
        },
        None => value,
    };
    let absolute = format!("/{value}");
    let relative = absolute
        .strip_prefix(base_path)
        .filter(|rest| base_path.is_empty() || rest.starts_with('/'))
        .ok_or_else(invalid)?;
    Ok(Some(policy::path::normalize(relative)?))
}

/// The bucket a virtual-hosted S3 endpoint names in its host
/// (`BUCKET.s3.amazonaws.com`, `BUCKET.s3.REGION.amazonaws.com`,
/// `BUCKET.s3-REGION…`, S3 Express's `BUCKET.s3express-…`).
fn virtual_hosted_bucket(host: &str) -> Option<&str> {
    let host = host.strip_suffix(".cn").unwrap_or(host);
    if !host.ends_with(".amazonaws.com") {
        return None;
    }
    [".s3.", ".s3-", ".s3express-"]
        .iter()
        .filter_map(|marker| host.find(marker))
        .min()
        .map(|end| &host[..end])
        .filter(|bucket| !bucket.is_empty())
}

/// Where an authorized request goes and what it carries.
struct Plan {
    /// The route whose credential is injected; `None` sends none.
    route: Option<Arc<Route>>,
    https: bool,
    host: String,
    port: u16,
    /// The route's path prefix; empty without a route.
    base_path: String,
    path: policy::NormalPath,
    reach: Reach,
    /// How the agent proved who it is; its token, if it has one, is
    /// removed from wherever it appears.
    presented: Presented,
    /// The methods the request asks to act as, allowed with it.
    overrides: Vec<Method>,
    /// What a form's `_method` field may not name; see [`Authorized`].
    form_denied: FormDenied,
}

impl Plan {
    fn uri(&self, query: Option<&str>) -> Result<Uri, ProxyError> {
        let mut target = String::with_capacity(128);
        crate::config::push_origin(&mut target, self.https, &self.host, self.port);
        target.push_str(&self.base_path);
        // `/route` alone goes to the base path itself.
        if !self.path.segments().is_empty() || self.base_path.is_empty() {
            self.path.push_encoded(&mut target);
        }
        if let Some(query) = query {
            target.push('?');
            target.push_str(query);
        }
        // Handed over whole: `str::parse` would copy it first.
        Uri::try_from(target).map_err(|_| {
            ProxyError::BadRequest("the request cannot be forwarded as a valid URL".into())
        })
    }
}

impl Proxy {
    pub fn new(
        live: Arc<Live>,
        verifier: Verifier,
        minter: LeafMinter,
        metrics: Arc<Metrics>,
        gateway: SocketAddr,
    ) -> Self {
        Self {
            live,
            verifier: Arc::new(verifier),
            minter,
            metrics,
            tokens: TokenCache::default(),
            gateway,
        }
    }

    /// Whether an absolute-form URI names this proxy's own listener.
    fn names_gateway(&self, uri: &Uri) -> bool {
        let Some(authority) = uri.authority() else {
            return false;
        };
        if uri.scheme_str() != Some("http") || authority.port_u16() != Some(self.gateway.port()) {
            return false;
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        match host.parse::<std::net::IpAddr>() {
            Ok(ip) => {
                ip == self.gateway.ip() || (self.gateway.ip().is_unspecified() && ip.is_loopback())
            }
            Err(_) => host.eq_ignore_ascii_case("localhost") && self.gateway.ip().is_loopback(),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Serves one agent request. Any step may end it; every outcome is audited.
    ///
    /// A plain function: as an `async fn` it would keep a slot for `req`
    /// beside the future it awaits (about 280 bytes of every request's
    /// future, enough to push it into the allocator's next size class).
    pub fn handle(
        self: &Arc<Self>,
        req: Request<Incoming>,
    ) -> impl std::future::Future<Output = Response<Body>> + Send + '_ {
        self.handle_in(req, None)
    }

    /// Serves a request on the listener, or inside an intercepted tunnel.
    async fn handle_in(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        tunnel: Option<&forward::Tunnel>,
    ) -> Response<Body> {
        let started = Instant::now();
        let request_id = random_id("req");
        let mode = match tunnel {
            Some(_) => Mode::Intercept,
            None => mode_of(&req),
        };
        let mode = if mode == Mode::Forward && self.names_gateway(req.uri()) {
            // Served as if it had come straight to the gateway.
            let origin_form = req.uri().path_and_query().map_or("/", |p| p.as_str());
            if let Ok(uri) = origin_form.parse() {
                *req.uri_mut() = uri;
            }
            Mode::Reverse
        } else {
            mode
        };
        let Some((snapshot, secrets)) = self.live.current() else {
            let mut response =
                ProxyError::SecretUnavailable("config and secrets out of step".into())
                    .into_response(mode, &request_id);
            set_request_id(&mut response, &request_id);
            return response;
        };
        let event = AuditEvent {
            ts: timestamp(),
            request_id: request_id.clone(),
            mode: mode.as_str(),
            method: req.method().to_string(),
            path: req.uri().path().to_string(),
            decision: "deny",
            reason: "ok",
            ..AuditEvent::default()
        };
        let mut flow = Flow {
            snapshot: &snapshot,
            secrets: &secrets,
            event,
            outcome: Outcome {
                forwarded: false,
                bytes_in: Arc::new(AtomicU64::new(0)),
                bytes_out: 0,
                redactions: 0,
            },
        };
        let header_bytes: usize = req
            .headers()
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum::<usize>()
            + req.uri().path_and_query().map_or(0, |p| p.as_str().len())
            + req.uri().authority().map_or(0, |a| a.as_str().len());
        let max_header_bytes = snapshot.config.limits.max_header_bytes;
        let framing = ambiguous_framing(&req);
        // Checked here, not only by the parser, so the refusal has the JSON
        // body, code and request id of every other one.
        let result = if header_bytes > max_header_bytes {
            Err(ProxyError::HeadersTooLarge(max_header_bytes))
        } else if let Some(why) = framing {
            Err(ProxyError::BadRequest(why.to_string()))
        } else {
            match (mode, tunnel) {
                (_, Some(tunnel)) => self.intercept(&mut flow, req, tunnel).await,
                (Mode::Connect, None) => self.connect(&mut flow, req).await,
                (Mode::Forward, None) => self.forward(&mut flow, req).await,
                _ => self.reverse(&mut flow, req).await,
            }
        };
        let mut response = match result {
            Ok(response) => response,
            Err(e) => {
                flow.event.reason = e.code();
                flow.event.detail = e.hidden_cause();
                log_refusal(&e, &request_id);
                e.into_response(mode, &request_id)
            }
        };
        let Flow {
            mut event, outcome, ..
        } = flow;
        event.decision = if outcome.forwarded { "allow" } else { "deny" };
        event.status = response.status().as_u16();
        event.bytes_in = outcome.bytes_in.load(Ordering::Relaxed);
        event.bytes_out = outcome.bytes_out;
        event.redactions = outcome.redactions;
        event.duration_ms = started.elapsed().as_millis() as u64;
        self.count(&event, started.elapsed());
        if let Err(e) = snapshot.audit.record(&event).await {
            self.metrics.audit_errors.inc();
            tracing::error!(error = %e, request_id, "audit write failed");
            if snapshot.audit.on_failure() == OnFailure::Deny {
                response = ProxyError::AuditUnavailable.into_response(mode, &request_id);
            }
        }
        if framing.is_some() {
            // Where this body ends is in doubt, so nothing may follow it.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        set_request_id(&mut response, &request_id);
        response
    }

    /// Audits a request that hyper's parser refused (bad framing or header
    /// bytes, a head too large): it never reached [`Self::handle`], and hyper
    /// has already answered 400, 414 or 431 and closed the connection.
    pub async fn audit_unparsed(&self, error: &hyper::Error) {
        // hyper answers a URI past its cap with 414 and any other head too
        // large with 431, and tells the two apart only in its message.
        let (status, reason) = if error.is_parse_too_large() {
            let uri = error.to_string().starts_with("URI too long");
            (if uri { 414 } else { 431 }, "request_too_large")
        } else if error.is_parse() {
            (400, "bad_request")
        } else {
            return;
        };
        let Some((snapshot, _)) = self.live.current() else {
            return;
        };
        let event = AuditEvent {
            ts: timestamp(),
            request_id: random_id("req"),
            // Nothing was parsed to tell the mode; the listener's default.
            mode: Mode::Reverse.as_str(),
            decision: "deny",
            reason,
            status,
            ..AuditEvent::default()
        };
        tracing::info!(request_id = event.request_id, %error, "malformed request refused");
        if let Err(e) = snapshot.audit.record(&event).await {
            self.metrics.audit_errors.inc();
            tracing::error!(error = %e, "audit write failed");
        }
    }

    /// Replaces the agent's SigV4 signature with one made with the real keys.
    /// A body without a declared hash is read (within the body limit) to be
    /// hashed; S3's declared hashes and UNSIGNED-PAYLOAD are kept streaming.
    async fn resign(
        &self,
        flow: &mut Flow<'_>,
        mut parts: http::request::Parts,
        body: Body,
        sigv4: &inject::sigv4::SigV4,
        access_key_id: &crate::secret::Secret,
    ) -> Result<Request<Body>, ProxyError> {
        let unavailable = |e: crate::secret::source::Unavailable| {
            tracing::error!(error = %e, "secret unavailable");
            ProxyError::SecretUnavailable(e.to_string())
        };
        let secret_key = flow
            .secrets
            .table
            .get(&sigv4.secret_access_key)
            .map_err(unavailable)?;
        let session = match &sigv4.session_token {
            Some(name) => Some(flow.secrets.table.get(name).map_err(unavailable)?.clone()),
            None => None,
        };
        parts.uri = inject::sigv4::strip_presigned(&parts.uri).map_err(ProxyError::BadRequest)?;
        let declared = inject::sigv4::strip(&mut parts.headers)
            .map(|v| v.to_str().map(str::to_string))
            .transpose()
            .map_err(|_| ProxyError::BadRequest("invalid x-amz-content-sha256".into()))?;
        if declared
            .as_deref()
            .is_some_and(|d| d.starts_with("STREAMING-AWS4-"))
        {
            return Err(ProxyError::BadRequest(
                "chunk-signed streaming uploads cannot be re-signed; send UNSIGNED-PAYLOAD".into(),
            ));
        }
        let (body, bytes) = match declared {
            Some(_) => (body, Bytes::new()),
            None => {
                let max_body = flow.snapshot.config.limits.max_body_bytes;
                let bytes = body
                    .collect()
                    .await
                    .map_err(|e| body_read_error(&*e, max_body))?
                    .to_bytes();
                (full(bytes.clone()), bytes)
            }
        };
        let mut request = Request::from_parts(parts, body);
        inject::sigv4::sign_request(
            &mut request,
            sigv4,
            access_key_id,
            secret_key,
            session.as_deref(),
            declared.as_deref(),
            &bytes,
        )
        .map_err(ProxyError::SecretUnavailable)?;
        Ok(request)
    }

    fn count(&self, event: &AuditEvent, elapsed: std::time::Duration) {
        match event.reason {
            "upstream_unreachable" | "upstream_timeout" => {
                self.metrics.upstream_error(event.reason)
            }
            "secret_unavailable" => {
                self.metrics.secret_errors.inc();
            }
            _ => {}
        }
        let labels = RequestLabels {
            route: event.route.clone().unwrap_or_else(|| "-".into()),
            mode: event.mode,
            decision: event.decision,
            status: event.status,
        };
        self.metrics.record(labels, elapsed);
    }

    /// Steps 5 to 8, shared by every mode once the request is authorized:
    /// secret, inject, send to the planned destination, scrub.
    async fn deliver(
        &self,
        flow: &mut Flow<'_>,
        mut parts: http::request::Parts,
        body: Incoming,
        plan: Plan,
    ) -> Result<Response<Body>, ProxyError> {
        let max_body = flow.snapshot.config.limits.max_body_bytes;
        if declared_length(&parts.headers).is_some_and(|len| len > max_body) {
            return Err(ProxyError::BodyTooLarge(max_body));
        }
        // Counted and limited as it is sent; a form is read whole first when
        // a `_method` field in it could be denied.
        let bytes_in = flow.outcome.bytes_in.clone();
        let body = match &plan.form_denied {
            None => AgentBody::new(Limited::new(body, max_body as usize), bytes_in).boxed(),
            Some(denied) => {
                // Boxed: inline, the read's state would grow every
                // request's future, and few requests are forms that need it.
                let reading = Box::pin(Limited::new(body, max_body as usize).collect());
                let form = reading
                    .await
                    .map_err(|e| body_read_error(&*e, max_body))?
                    .to_bytes();
                if let Some(rule) = denied_form_override(&form, denied) {
                    flow.event.rule = rule.clone();
                    return Err(ProxyError::Denied { rule });
                }
                AgentBody::new(http_body_util::Full::new(form), bytes_in).boxed()
            }
        };
        // 5. secret (or the access token obtained with it)
        // An access token obtained for this request, forgotten if refused.
        let mut obtained = None;
        let credential = match plan.route.as_ref().and_then(|r| r.inject.as_ref()) {
            Some(inject) => {
                flow.event.secret = Some(inject.secret.clone());
                let secret = flow.secrets.table.get(&inject.secret).map_err(|e| {
                    tracing::error!(error = %e, "secret unavailable");
                    ProxyError::SecretUnavailable(e.to_string())
                })?;
                let value = match &inject.grant {
                    None => secret.clone(),
                    Some(grant) => {
                        let client = flow.snapshot.clients.get(Reach::Any);
                        let unavailable = |e: String| {
                            tracing::error!(secret = %inject.secret, error = %e, "access token unavailable");
                            ProxyError::SecretUnavailable(e)
                        };
                        let token = self
                            .tokens
                            .token(
                                grant,
                                &inject.secret,
                                secret,
                                plan.presented.token(),
                                client,
                            )
                            .await
                            .map_err(unavailable)?;
                        let value = token.token.clone();
                        obtained = Some((grant, token));
                        value
                    }
                };
                Some((inject, value))
            }
            None => None,
        };
        // Every access token obtained so far, this request's included.
        let scrubber = self
            .tokens
            .scrubber(&flow.secrets.scrubber)
            .map_err(ProxyError::SecretUnavailable)?;
        if flow.snapshot.audit.on_failure() == OnFailure::Deny && !flow.snapshot.audit.is_healthy()
        {
            // Do not spend a credential on a request that cannot be audited.
            return Err(ProxyError::AuditUnavailable);
        }

        // 6. inject
        let query = inject::query(
            parts.uri.query(),
            plan.presented.token(),
            credential
                .as_ref()
                .map(|(inject, secret)| (&inject.slot, secret.as_ref())),
        );
        let upgrade = upgrade::requested(&parts.headers);
        let agent_upgrade = upgrade
            .as_ref()
            .and_then(|_| parts.extensions.remove::<hyper::upgrade::OnUpgrade>());
        // What the policy decides again while an upgraded connection lasts.
        let upgrade_method = parts.method.clone();
        let slot = parts
            .extensions
            .get::<Arc<crate::listen::ConnSlot>>()
            .cloned();
        inject::strip_hop_by_hop(&mut parts.headers);
        inject::strip_steering_headers(&mut parts.headers);
        inject::strip_token(&mut parts.headers, plan.presented.token());
        parts.headers.remove(header::HOST);
        if let Some(protocol) = upgrade.clone() {
            upgrade::restore(&mut parts.headers, protocol);
        }
        if let Some((inject, secret)) = &credential {
            inject::headers(&mut parts.headers, &inject.slot, &inject.secret, secret)
                .map_err(|e| ProxyError::SecretUnavailable(e.to_string()))?;
        }
        let credentialed = credential.is_some();
        if credentialed {
            // A compressed echo would hide the secret from the scrubber.
            parts.headers.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
        }
        parts.uri = plan.uri(query.as_deref())?;
        parts.version = http::Version::HTTP_11;
        let head_only = parts.method == Method::HEAD;
        let request = match credential
            .as_ref()
            .and_then(|(inject, value)| inject.sigv4.as_ref().map(|s| (s, value)))
        {
            Some((sigv4, access_key_id)) => {
                self.resign(flow, parts, body, sigv4, access_key_id).await?
            }
            None => Request::from_parts(parts, body),
        };

        // 7. send, to an address sidekey resolved and checked itself
        let host = plan.host.clone();
        flow.outcome.forwarded = true;
        let client = flow.snapshot.clients.get(plan.reach);
        let sending = match upgrade {
            Some(_) => client.send_upgrade(request),
            None => client.send(request),
        };
        let sent =
            tokio::time::timeout(flow.snapshot.config.limits.upstream_timeout, sending).await;
        let mut response = match sent {
            Err(_) => return Err(ProxyError::UpstreamTimeout { host }),
            Ok(Err(e)) => return Err(upstream_error(host, max_body, &e)),
            Ok(Ok(response)) => response,
        };
        if response.status() == StatusCode::UNAUTHORIZED
            && let (Some((grant, token)), Some(inject)) = (
                &obtained,
                plan.route.as_ref().and_then(|r| r.inject.as_ref()),
            )
        {
            self.tokens
                .forget(grant, &inject.secret, plan.presented.token(), token);
        }

        // 8. scrub
        if response.status() == StatusCode::SWITCHING_PROTOCOLS
            && let (Some(agent_side), Some(protocol)) = (agent_upgrade, upgrade)
        {
            let upstream_side = hyper::upgrade::on(&mut response);
            let (mut parts, _) = response.into_parts();
            forget_upstream_extras(&mut parts);
            inject::strip_hop_by_hop(&mut parts.headers);
            flow.outcome.redactions += scrub_headers(&mut parts.headers, &scrubber) as u64;
            let accepted = parts
                .headers
                .get(header::UPGRADE)
                .cloned()
                .unwrap_or(protocol);
            parts.headers.insert(header::UPGRADE, accepted);
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            let granted = Granted::Upgrade {
                route: plan.route.as_ref().map(|r| r.name.clone()),
                host: plan.host,
                port: plan.port,
                method: upgrade_method,
                overrides: plan.overrides,
                path: plan.path,
            };
            let identity = self.lasting(plan.presented, granted, &flow.event);
            upgrade::splice(agent_side, upstream_side, scrubber, slot, identity);
            return Ok(Response::from_parts(parts, body::empty()));
        }
        self.respond(flow, response, scrubber, head_only, credentialed, host)
            .await
    }

    /// The verified agent and how it proved itself: a token where the mode
    /// looks for one, else the unix peer's uid when the request came that way.
    fn identify(
        &self,
        flow: &mut Flow<'_>,
        parts: &http::request::Parts,
        query: Option<&str>,
        slot: Option<&crate::config::Slot>,
    ) -> Result<(Agent, Presented), ProxyError> {
        let presented = match identity::find_token(&parts.headers, query, slot) {
            Ok((token, user)) => Presented::Token { token, user },
            Err(identity::IdentityError::Missing) => {
                if let Some(cert) = parts.extensions.get::<identity::PeerCert>() {
                    Presented::PeerCert(cert.clone())
                } else if let Some(PeerUid(uid)) = parts.extensions.get::<PeerUid>() {
                    Presented::PeerUid(*uid)
                } else {
                    return Err(identity::IdentityError::Missing.into());
                }
            }
            Err(e) => return Err(e.into()),
        };
        let agent = self.verify(flow, &presented)?;
        // A token for one agent on a connection that names another (its
        // client certificate, its mapped uid) is one identity too many.
        if let Presented::Token { .. } = presented {
            let connection = match parts.extensions.get::<identity::PeerCert>() {
                Some(cert) => Some(cert.agent.as_str()),
                None => parts.extensions.get::<PeerUid>().and_then(|PeerUid(uid)| {
                    identity::uid_agent_name(*uid, &flow.snapshot.config.agents)
                }),
            };
            if connection.is_some_and(|name| name != agent.name) {
                return Err(identity::IdentityError::ConnectionMismatch.into());
            }
        }
        Ok((agent, presented))
    }

    /// Signature, expiry and revocation (or the uid mapping), checked on
    /// every request. A genuine credential refused for its expiry or
    /// revocation still names its agent in the audit record, so an operator
    /// sees who keeps trying.
    fn verify(&self, flow: &mut Flow<'_>, presented: &Presented) -> Result<Agent, ProxyError> {
        let revocations = self.live.revocations();
        let list = revocations.as_ref().as_ref().map_err(|_| ());
        let verified = verify_presented(&self.verifier, list, flow.snapshot, presented);
        if let Err(ProxyError::Identity(identity::IdentityError::Token(
            crate::token::TokenError::Expired | crate::token::TokenError::Revoked,
        ))) = &verified
            && let Some(agent) = self.named_by(flow.snapshot, presented)
        {
            flow.set_agent(&agent, presented);
        }
        verified
    }

    /// The agent a credential names once its signature (or mapping) holds,
    /// whatever its expiry or revocation; nothing for a forged one.
    fn named_by(&self, snapshot: &Snapshot, presented: &Presented) -> Option<Agent> {
        match presented {
            Presented::Token { token, .. } => {
                match snapshot.oidc.as_ref().and_then(|o| o.verify_if_ours(token)) {
                    Some(workload) => workload.ok().map(|(agent, _)| agent),
                    None => self.verifier.signed_claims(token).map(Agent::from),
                }
            }
            Presented::PeerUid(uid) => identity::uid_agent(*uid, &snapshot.config.agents),
            Presented::PeerCert(cert) => Some(Agent::from(identity::cert_claims(cert))),
        }
    }

    /// What an open tunnel or upgraded connection needs to check `presented`
    /// again while it lasts.
    fn lasting(
        &self,
        presented: Presented,
        granted: Granted,
        opened: &AuditEvent,
    ) -> LastingIdentity {
        LastingIdentity {
            live: self.live.clone(),
            verifier: self.verifier.clone(),
            presented,
            granted,
            metrics: self.metrics.clone(),
            opened: opened.clone(),
            opened_at: Instant::now(),
        }
    }

    async fn respond(
        &self,
        flow: &mut Flow<'_>,
        response: Response<UpstreamBody>,
        scrubber: Arc<Scrubber>,
        head_only: bool,
        credentialed: bool,
        host: String,
    ) -> Result<Response<Body>, ProxyError> {
        let outcome = &mut flow.outcome;
        let (mut parts, body) = response.into_parts();
        forget_upstream_extras(&mut parts);
        // The agent's connection has its own version; hyper picks the framing.
        parts.version = http::Version::default();
        // Read before the hop-by-hop headers go: hyper undoes only
        // `chunked`, so a body sent `Transfer-Encoding: gzip, chunked`
        // arrives as compressed as one with a `Content-Encoding`.
        let encoded = codings_other_than(&parts.headers, header::CONTENT_ENCODING, "identity")
            || codings_other_than(&parts.headers, header::TRANSFER_ENCODING, "chunked");
        inject::strip_hop_by_hop(&mut parts.headers);
        if encoded && credentialed && !body.is_end_stream() {
            return Err(ProxyError::Unscrubbable { host });
        }
        outcome.redactions += scrub_headers(&mut parts.headers, &scrubber) as u64;
        // A request that carried no credential of ours may get a compressed
        // body; it passes as it is (the scrubber cannot read it anyway).
        let scrubber = if encoded {
            Arc::new(Scrubber::default())
        } else {
            scrubber
        };
        let no_body = head_only
            || parts.status == StatusCode::NO_CONTENT
            || parts.status == StatusCode::NOT_MODIFIED
            || body.is_end_stream();
        if no_body {
            return Ok(Response::from_parts(parts, full(Bytes::new())));
        }
        let length = declared_length(&parts.headers);
        if length.is_some_and(|len| len <= WHOLE_BODY_LIMIT) {
            let collected =
                tokio::time::timeout(flow.snapshot.config.limits.upstream_timeout, body.collect())
                    .await
                    .map_err(|_| ProxyError::UpstreamTimeout { host: host.clone() })?
                    .map_err(|e| ProxyError::Upstream {
                        host: host.clone(),
                        cause: format!("reading the response body: {e}"),
                    })?;
            let mut bytes = collected.to_bytes();
            if let Some((scrubbed, count)) = scrubber.scrub_all(&bytes) {
                outcome.redactions += count as u64;
                bytes = Bytes::from(scrubbed);
            }
            outcome.bytes_out = bytes.len() as u64;
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
            return Ok(Response::from_parts(parts, full(bytes)));
        }
        outcome.bytes_out = length.unwrap_or(0);
        if scrubber.is_empty() {
            return Ok(Response::from_parts(
                parts,
                body.map_err(Into::into).boxed(),
            ));
        }
        // Scrubbing may change the length; the body goes out chunked.
        parts.headers.remove(header::CONTENT_LENGTH);
        Ok(Response::from_parts(
            parts,
            Scrubbed::new(body, scrubber).boxed(),
        ))
    }
}

/// Whether the `name` header lists any coding but `plain` (an unreadable
/// value counts as one).
fn codings_other_than(headers: &HeaderMap, name: HeaderName, plain: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("unknown").split(','))
        .map(str::trim)
        .any(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case(plain))
}

/// `path` with the agent's token, wherever it appears, as `[REDACTED]`.
fn without_token(path: String, presented: &Presented) -> String {
    let token = presented.token();
    // Most paths are shorter than a token: no search for them.
    if token.is_empty() || path.len() < token.len() {
        return path;
    }
    path.replace(token, "[REDACTED]")
}

/// [`Proxy::verify`] against a given config version and revocation list.
fn verify_presented(
    verifier: &Verifier,
    list: Result<&crate::token::revocation::Revocations, ()>,
    snapshot: &Snapshot,
    presented: &Presented,
) -> Result<Agent, ProxyError> {
    Ok(match presented {
        Presented::Token { token, user } => {
            match snapshot.oidc.as_ref().and_then(|o| o.verify_if_ours(token)) {
                Some(workload) => {
                    let (agent, claims) = workload?;
                    // As for agent tokens: a Basic user name must be the agent.
                    if user
                        .as_deref()
                        .is_some_and(|u| !u.is_empty() && u != agent.name)
                    {
                        return Err(identity::IdentityError::AgentMismatch.into());
                    }
                    identity::check_revoked(&claims, list)?;
                    agent
                }
                None => identity::verify(verifier, list, token, user.as_deref())?,
            }
        }
        Presented::PeerUid(uid) => identity::verify_uid(*uid, &snapshot.config.agents, list)?,
        Presented::PeerCert(cert) => identity::verify_cert(cert, list)?,
    })
}

/// Drops what hyper kept of the upstream's response beside its status,
/// headers and body. SECURITY: its extensions carry the upstream's own
/// HTTP/1 reason phrase, which hyper's server would write on the agent's
/// status line verbatim, outside every scrubbed header and body: an
/// upstream that names the credential there ("401 Invalid key sk-...")
/// would hand it to the agent. The agent gets the canonical phrase.
///
/// An upstream's `x-sidekey-error` goes too: only sidekey's own refusals
/// carry one, so that an agent (or its SDK's retry logic) can trust it.
fn forget_upstream_extras(parts: &mut http::response::Parts) {
    parts.extensions.clear();
    // Looked for among the few names first: `remove` hashes the name, which
    // costs more than this scan on every response.
    const ERROR: &str = "x-sidekey-error";
    if parts.headers.keys().any(|name| name.as_str() == ERROR) {
        parts.headers.remove(ERROR);
    }
}

fn set_request_id(response: &mut Response<Body>, request_id: &str) {
    if let Ok(value) = HeaderValue::from_str(request_id) {
        const REQUEST_ID: HeaderName = HeaderName::from_static("x-sidekey-request-id");
        response.headers_mut().insert(REQUEST_ID, value);
    }
}

/// Replaces held secrets in header values, and drops a header whose name
/// holds one (a name cannot hold `[REDACTED]`); returns how many went.
pub(crate) fn scrub_headers(headers: &mut HeaderMap, scrubber: &Scrubber) -> usize {
    if scrubber.is_empty() {
        return 0;
    }
    let named: Vec<HeaderName> = headers
        .keys()
        .filter(|name| scrubber.holds_in_any_case(name.as_str().as_bytes()))
        .cloned()
        .collect();
    let mut count = named.len();
    for name in named {
        headers.remove(name);
    }
    for value in headers.values_mut() {
        if let Some((scrubbed, n)) = scrubber.scrub_all(value.as_bytes()) {
            // Replacing bytes of a valid value with `[REDACTED]` keeps it
            // valid; should it not, the whole value goes rather than the secret stay.
            *value = HeaderValue::from_bytes(&scrubbed)
                .unwrap_or_else(|_| HeaderValue::from_static("[REDACTED]"));
            count += n;
        }
    }
    count
}

/// Headers with which frameworks (Rails, Google APIs, ASP.NET) let a POST act
/// as another method; the policy must see those methods too.
const METHOD_OVERRIDES: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// The query parameter with which Express's `method-override` (and form
/// conventions elsewhere) lets a POST act as another method.
const METHOD_OVERRIDE_PARAM: &str = "_method";

/// Every method the request could act as besides its own: the override
/// headers, in any spelling a CGI or PHP app reads as the same, and the
/// `_method` query parameter.
fn method_overrides(headers: &HeaderMap, query: Option<&str>) -> Result<Vec<Method>, ProxyError> {
    let parse = |value: &[u8], source: &dyn std::fmt::Display| {
        std::str::from_utf8(value)
            .ok()
            .and_then(|v| Method::from_bytes(v.trim().to_ascii_uppercase().as_bytes()).ok())
            .ok_or_else(|| ProxyError::BadRequest(format!("invalid {source}")))
    };
    let mut methods = Vec::new();
    // One pass over the request's few headers: a lookup by name would parse
    // and hash each name on every request, and almost no request carries any.
    for (name, value) in headers {
        let name = name.as_str();
        if METHOD_OVERRIDES.iter().any(|o| inject::spelled_as(name, o)) {
            methods.push(parse(value.as_bytes(), &format_args!("{name} header"))?);
        }
    }
    // Decoding every pair costs allocations; a query can name `_method`
    // only in plain text or through a percent-escape.
    let query = query.filter(|q| q.contains("method") || q.contains('%'));
    for (name, value) in identity::query_pairs(query.unwrap_or_default()) {
        if name == METHOD_OVERRIDE_PARAM {
            methods.push(parse(value.as_bytes(), &"_method parameter")?);
        }
    }
    Ok(methods)
}

fn mode_of<B>(req: &Request<B>) -> Mode {
    if req.method() == Method::CONNECT {
        Mode::Connect
    } else if req.version() == http::Version::HTTP_2 {
        // hyper fills scheme and authority from the HTTP/2 pseudo-headers, so
        // they do not mark a forward-proxy request there; agents speak h2 to
        // the gateway only.
        Mode::Reverse
    } else if req.uri().scheme().is_some() {
        Mode::Forward
    } else {
        Mode::Reverse
    }
}

/// An HTTP/1 request whose transfer coding is anything but one plain
/// `chunked`: hyper reads `identity, chunked` as chunked, another hop might
/// not, which is how requests are smuggled, so sidekey refuses it (RFC 9112
/// §6.1 allows it). hyper itself already refuses differing Content-Lengths,
/// and drops Content-Length when Transfer-Encoding is present.
fn ambiguous_framing<B>(req: &Request<B>) -> Option<&'static str> {
    if req.version() >= http::Version::HTTP_2 {
        return None;
    }
    let mut codings = req.headers().get_all(header::TRANSFER_ENCODING).iter();
    let coding = codings.next();
    let plain_chunked = coding.is_none_or(|c| c.as_bytes().eq_ignore_ascii_case(b"chunked"));
    if !plain_chunked || codings.next().is_some() {
        return Some("a Transfer-Encoding other than chunked");
    }
    // RFC 9112 (3.2) asks for a 400: a proxy before or after sidekey may
    // take the other copy as the target.
    let mut hosts = req.headers().get_all(header::HOST).iter();
    (hosts.next().is_some() && hosts.next().is_some()).then_some("more than one Host header")
}

/// Why the agent's body could not be read whole: the body limit, or the
/// agent's own fault.
fn body_read_error(e: &(dyn std::error::Error + 'static), max_body: u64) -> ProxyError {
    if e.is::<http_body_util::LengthLimitError>() {
        ProxyError::BodyTooLarge(max_body)
    } else {
        ProxyError::BadRequest(format!("reading the request body: {e}"))
    }
}

/// The methods Rails (`Rack::MethodOverride`), Laravel and Symfony let a
/// POST form's `_method` field turn it into. Each reads the field from an
/// urlencoded body (Rack also from one with no content type).
const FORM_OVERRIDE_METHODS: [&str; 11] = [
    "GET", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "LINK", "UNLINK", "CONNECT", "PURGE",
    "TRACE",
];

/// A POST whose body those frameworks read as a form.
fn is_form_post(parts: &http::request::Parts) -> bool {
    if !parts.method.as_str().eq_ignore_ascii_case("POST") {
        return false;
    }
    match parts.headers.get(header::CONTENT_TYPE) {
        None => true,
        Some(value) => value.to_str().is_ok_and(|v| {
            let media = v.split(';').next().unwrap_or_default().trim();
            media.eq_ignore_ascii_case("application/x-www-form-urlencoded")
        }),
    }
}

/// The rule that denies the method a form's `_method` field names, if one
/// does. Fields are split on `&` and `;`, as the laxest of the parsers
/// does; a value is compared as Rack compares it, upper-cased.
fn denied_form_override(
    form: &[u8],
    denied: &[(&'static str, Option<String>)],
) -> Option<Option<String>> {
    let form = String::from_utf8_lossy(form);
    form.split(';')
        .flat_map(identity::query_pairs)
        .filter(|(name, _)| name == METHOD_OVERRIDE_PARAM)
        .find_map(|(_, value)| {
            let value = value.trim().to_ascii_uppercase();
            denied
                .iter()
                .find(|(method, _)| *method == value.as_str())
                .map(|(_, rule)| rule.clone())
        })
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

fn upstream_error(host: String, max_body: u64, error: &pool::SendError) -> ProxyError {
    let chain = || {
        std::iter::successors(Some(error as &(dyn std::error::Error + 'static)), |e| {
            e.source()
        })
    };
    if chain().any(|e| e.is::<http_body_util::LengthLimitError>()) {
        return ProxyError::BodyTooLarge(max_body);
    }
    if chain().any(|e| e.is::<body::AgentBodyError>()) {
        return ProxyError::BadRequest("the request body is malformed or was cut short".into());
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        // The guarded resolver refused every address of the name.
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::PermissionDenied
        {
            return ProxyError::Forbidden(io.to_string());
        }
        source = e.source();
    }
    ProxyError::Upstream {
        host,
        cause: error.to_string(),
    }
}

fn log_refusal(error: &ProxyError, request_id: &str) {
    match error.fault() {
        error::Fault::Caller => tracing::info!(request_id, code = error.code(), "refused: {error}"),
        error::Fault::Upstream => tracing::warn!(request_id, code = error.code(), "{error}"),
        error::Fault::Sidekey => tracing::error!(request_id, code = error.code(), "{error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_on_a_virtual_hosted_bucket_stays_in_that_bucket() {
        let headers = |source: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("x-amz-copy-source", HeaderValue::from_str(source).unwrap());
            headers
        };
        let key = |source: &str, host: &str| {
            copy_source(&headers(source), host, "").map(|p| p.map(|p| p.decoded()))
        };
        for host in [
            "reports.s3.amazonaws.com",
            "reports.s3.eu-west-1.amazonaws.com",
            "reports.s3-eu-west-1.amazonaws.com",
            "reports.s3.cn-north-1.amazonaws.com.cn",
        ] {
            assert_eq!(
                key("reports/2026/q1.csv", host).unwrap().as_deref(),
                Some("/2026/q1.csv"),
                "{host}"
            );
            assert_eq!(
                key("/reports/a?versionId=3", host).unwrap().as_deref(),
                Some("/a")
            );
            assert!(matches!(
                key("payroll/2026/q1.csv", host),
                Err(ProxyError::Forbidden(_))
            ));
            assert!(key("reports", host).is_err());
        }
        // Path-style endpoints name the bucket in the path, as rules do.
        for host in ["s3.eu-west-1.amazonaws.com", "minio.internal", "127.0.0.1"] {
            assert_eq!(
                key("payroll/q1.csv", host).unwrap().as_deref(),
                Some("/payroll/q1.csv"),
                "{host}"
            );
        }
    }

    #[test]
    fn every_method_override_spelling_is_found_and_checked() {
        let mut headers = HeaderMap::new();
        headers.insert("accept", HeaderValue::from_static("*/*"));
        assert!(
            method_overrides(&headers, Some("a=1&method=x"))
                .unwrap()
                .is_empty()
        );
        headers.insert("x-http-method-override", HeaderValue::from_static("delete"));
        headers.insert("x-http-method", HeaderValue::from_static(" PUT "));
        headers.append("x-method-override", HeaderValue::from_static("PATCH"));
        headers.append("x-method-override", HeaderValue::from_static("get"));
        headers.append("x_http_method_override", HeaderValue::from_static("HEAD"));
        let mut found = method_overrides(&headers, Some("a=1&_method=options")).unwrap();
        found.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        assert_eq!(
            found,
            [
                Method::DELETE,
                Method::GET,
                Method::HEAD,
                Method::OPTIONS,
                Method::PATCH,
                Method::PUT
            ]
        );
        assert!(matches!(
            method_overrides(&headers, Some("_method=a%20b")),
            Err(ProxyError::BadRequest(m)) if m == "invalid _method parameter"
        ));
        headers.append("x-http-method", HeaderValue::from_static("GET /admin"));
        assert!(matches!(
            method_overrides(&headers, None),
            Err(ProxyError::BadRequest(m)) if m == "invalid x-http-method header"
        ));
    }
}
