//! `handle()`: the request path, top to bottom.
//!
//! 1. identity: find and verify the agent token (before the route, so an
//!    unknown caller learns nothing about routes);
//! 2. route: the first path segment names it;
//! 3. path: normalised once, then matched and forwarded in that same form;
//! 4. policy: deny wins, default deny;
//! 5. secret: the current value, or fail closed;
//! 6. inject: strip the caller's copies of the slot, set the credential;
//! 7. send: to the route's upstream as configured, never to an agent-named host;
//! 8. scrub: every held secret replaced in headers and the streamed body;
//! 9. audit: one record, written before the response is released.

pub mod body;
pub mod error;
pub mod upstream;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::Body as _;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::audit::{AuditEvent, timestamp};
use crate::config::{OnFailure, Route};
use crate::egress::Reach;
use crate::identity::{self, Agent};
use crate::inject;
use crate::live::{Live, SecretView, Snapshot};
use crate::policy::{self, path::normalize};
use crate::scrub::Scrubber;
use crate::token::{Verifier, random_id};

use body::{Body, Counted, Scrubbed, full};
pub use error::{Mode, ProxyError};

/// Responses up to this size with a declared length are read whole, so they
/// keep an exact `Content-Length` after scrubbing and their audit record has
/// exact byte and redaction counts. Larger or unsized ones stream.
const WHOLE_BODY_LIMIT: u64 = 64 * 1024;

/// The request path shared by every connection.
#[derive(Debug)]
pub struct Proxy {
    live: Arc<Live>,
    verifier: Verifier,
}

/// What a request produced, for the audit record.
struct Outcome {
    forwarded: bool,
    bytes_in: Arc<AtomicU64>,
    bytes_out: u64,
    redactions: u64,
}

impl Proxy {
    pub fn new(live: Arc<Live>, verifier: Verifier) -> Self {
        Self { live, verifier }
    }

    /// Serves one agent request. Any step may end it; every outcome is audited.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let request_id = random_id("req");
        let mode = mode_of(&req);
        let Some((snapshot, secrets)) = self.live.current() else {
            let mut response =
                ProxyError::SecretUnavailable("config and secrets out of step".into())
                    .into_response(mode, &request_id);
            set_request_id(&mut response, &request_id);
            return response;
        };
        let mut event = AuditEvent {
            ts: timestamp(),
            request_id: request_id.clone(),
            mode: mode.as_str(),
            method: req.method().to_string(),
            path: req.uri().path().to_string(),
            decision: "deny",
            reason: "ok",
            ..AuditEvent::default()
        };
        let mut outcome = Outcome {
            forwarded: false,
            bytes_in: Arc::new(AtomicU64::new(0)),
            bytes_out: 0,
            redactions: 0,
        };
        let result = match mode {
            Mode::Reverse => {
                self.reverse(&snapshot, &secrets, req, &mut event, &mut outcome)
                    .await
            }
            _ => Err(ProxyError::BadRequest(
                "forward proxying (absolute-form and CONNECT) is not supported yet; \
                 use the reverse gateway: http://<sidekey>/<route>/<path>"
                    .into(),
            )),
        };
        let mut response = match result {
            Ok(response) => response,
            Err(e) => {
                event.reason = e.code();
                log_refusal(&e, &request_id);
                e.into_response(mode, &request_id)
            }
        };
        event.decision = if outcome.forwarded { "allow" } else { "deny" };
        event.status = response.status().as_u16();
        event.bytes_in = outcome.bytes_in.load(Ordering::Relaxed);
        event.bytes_out = outcome.bytes_out;
        event.redactions = outcome.redactions;
        event.duration_ms = started.elapsed().as_millis() as u64;
        if let Err(e) = snapshot.audit.record(&event) {
            tracing::error!(error = %e, request_id, "audit write failed");
            if snapshot.audit.on_failure() == OnFailure::Deny {
                response = ProxyError::AuditUnavailable.into_response(mode, &request_id);
            }
        }
        set_request_id(&mut response, &request_id);
        response
    }

    async fn reverse(
        &self,
        snapshot: &Snapshot,
        secrets: &SecretView,
        req: Request<Incoming>,
        event: &mut AuditEvent,
        outcome: &mut Outcome,
    ) -> Result<Response<Body>, ProxyError> {
        let (mut parts, body) = req.into_parts();
        let (route_name, rest) = split_route(parts.uri.path());
        let route = snapshot.config.routes.get(route_name).cloned();

        // 1. identity
        let (agent, token) = match route.as_ref() {
            Some(route) => {
                let slot = route.inject.as_ref().map(|i| &i.slot);
                self.identify(&parts.headers, parts.uri.query(), slot)?
            }
            None => self.identify_unrouted(snapshot, &parts.headers, parts.uri.query())?,
        };
        event.agent = Some(agent.name.clone());
        event.session = Some(agent.session.clone());
        event.token_id = Some(agent.token_id.clone());

        // 2. route
        let route = route.ok_or_else(|| ProxyError::RouteNotFound(route_name.to_string()))?;
        event.route = Some(route.name.clone());
        event.host = Some(route.upstream.host.clone());
        event.port = Some(route.upstream.port);

        // 3. path
        let path = normalize(rest)?;
        event.path = format!("{}{}", route.upstream.base_path, path.decoded());

        // 4. policy
        let overrides = method_overrides(&parts.headers)?;
        let decision = snapshot.policy.check(&policy::Request {
            agent: &agent.name,
            route: Some(&route.name),
            host: &route.upstream.host,
            port: route.upstream.port,
            method: &parts.method,
            overrides: &overrides,
            path: &path,
        });
        event.rule = decision.rule.clone();
        if !decision.allowed {
            return Err(ProxyError::Denied {
                rule: decision.rule,
            });
        }
        let max_body = snapshot.config.limits.max_body_bytes;
        if declared_length(&parts.headers).is_some_and(|len| len > max_body) {
            return Err(ProxyError::BodyTooLarge(max_body));
        }

        // 5. secret
        let credential = match &route.inject {
            Some(inject) => {
                event.secret = Some(inject.secret.clone());
                let secret = secrets.table.get(&inject.secret).map_err(|e| {
                    tracing::error!(error = %e, "secret unavailable");
                    ProxyError::SecretUnavailable(e.to_string())
                })?;
                Some((inject, secret.clone()))
            }
            None => None,
        };
        if snapshot.audit.on_failure() == OnFailure::Deny && !snapshot.audit.is_healthy() {
            // Do not spend a credential on a request that cannot be audited.
            return Err(ProxyError::AuditUnavailable);
        }

        // 6. inject
        let query = inject::query(
            parts.uri.query(),
            &token,
            credential
                .as_ref()
                .map(|(inject, secret)| (&inject.slot, secret.as_ref())),
        );
        inject::strip_hop_by_hop(&mut parts.headers);
        inject::strip_token(&mut parts.headers, &token);
        parts.headers.remove(header::HOST);
        if let Some((inject, secret)) = &credential {
            inject::headers(&mut parts.headers, &inject.slot, &inject.secret, secret)
                .map_err(|e| ProxyError::SecretUnavailable(e.to_string()))?;
        }
        if !secrets.scrubber.is_empty() {
            // A compressed echo would hide the secret from the scrubber.
            parts.headers.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
        }
        parts.uri = upstream_uri(&route, &path, query.as_deref())?;
        parts.version = http::Version::HTTP_11;
        let head_only = parts.method == Method::HEAD;
        let body = Counted::new(
            Limited::new(body, max_body as usize),
            outcome.bytes_in.clone(),
        )
        .boxed();

        // 7. send, to an address sidekey resolved and checked itself
        let host = route.upstream.host.clone();
        let reach = if route.allow_private {
            Reach::Any
        } else {
            Reach::Public
        };
        // A route's IP literal is the operator naming that very address (the
        // connector does not resolve literals); a name must resolve publicly
        // unless the route sets allow_private.
        outcome.forwarded = true;
        let sent = tokio::time::timeout(
            snapshot.config.limits.upstream_timeout,
            snapshot
                .clients
                .get(reach)
                .request(Request::from_parts(parts, body)),
        )
        .await;
        let response = match sent {
            Err(_) => return Err(ProxyError::UpstreamTimeout { host }),
            Ok(Err(e)) => return Err(upstream_error(host, max_body, &e)),
            Ok(Ok(response)) => response,
        };

        // 8. scrub
        let scrubber = secrets.scrubber.clone();
        self.respond(snapshot, response, scrubber, head_only, host, outcome)
            .await
    }

    /// The verified agent and the token it presented.
    fn identify(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        slot: Option<&crate::config::Slot>,
    ) -> Result<(Agent, String), ProxyError> {
        let (token, user) = identity::find_token(headers, query, slot)?;
        let revocations = self.live.revocations();
        let list = revocations.as_ref().as_ref().map_err(|_| ());
        let agent = identity::verify(&self.verifier, list, &token, user.as_deref())?;
        Ok((agent, token))
    }

    /// For a route that does not exist the token may sit in any route's slot;
    /// trying them all lets an authenticated agent learn it typed a wrong
    /// route (404) while a stranger still learns nothing (401).
    fn identify_unrouted(
        &self,
        snapshot: &Snapshot,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<(Agent, String), ProxyError> {
        let bearer = crate::config::Slot::Header {
            name: header::AUTHORIZATION,
            prefix: "Bearer ".into(),
            suffix: String::new(),
        };
        let slots = snapshot
            .config
            .routes
            .values()
            .filter_map(|r| r.inject.as_ref().map(|i| &i.slot));
        // Report what a known route would have: a token found but refused
        // outranks "no token", so the answer does not reveal whether the route exists.
        let mut refusal = ProxyError::Identity(identity::IdentityError::Missing);
        for slot in std::iter::once(&bearer).chain(slots) {
            match self.identify(headers, query, Some(slot)) {
                Ok(found) => return Ok(found),
                Err(ProxyError::Identity(identity::IdentityError::Missing)) => {}
                Err(e) => refusal = e,
            }
        }
        Err(refusal)
    }

    async fn respond(
        &self,
        snapshot: &Snapshot,
        response: Response<Incoming>,
        scrubber: Arc<Scrubber>,
        head_only: bool,
        host: String,
        outcome: &mut Outcome,
    ) -> Result<Response<Body>, ProxyError> {
        let (mut parts, body) = response.into_parts();
        // The agent's connection has its own version; hyper picks the framing.
        parts.version = http::Version::default();
        inject::strip_hop_by_hop(&mut parts.headers);
        let encoded = parts
            .headers
            .get_all(header::CONTENT_ENCODING)
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("unknown").split(','))
            .any(|e| !e.trim().eq_ignore_ascii_case("identity"));
        if encoded && !scrubber.is_empty() && !body.is_end_stream() {
            return Err(ProxyError::Unscrubbable { host });
        }
        outcome.redactions += scrub_headers(&mut parts.headers, &scrubber) as u64;
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
                tokio::time::timeout(snapshot.config.limits.upstream_timeout, body.collect())
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

fn set_request_id(response: &mut Response<Body>, request_id: &str) {
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert("x-sidekey-request-id", value);
    }
}

/// Replaces held secrets in header values; returns how many were replaced.
pub(crate) fn scrub_headers(headers: &mut HeaderMap, scrubber: &Scrubber) -> usize {
    if scrubber.is_empty() {
        return 0;
    }
    let mut count = 0;
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

fn method_overrides(headers: &HeaderMap) -> Result<Vec<Method>, ProxyError> {
    let mut methods = Vec::new();
    for name in METHOD_OVERRIDES {
        for value in headers.get_all(name) {
            let method = value
                .to_str()
                .ok()
                .and_then(|v| Method::from_bytes(v.trim().to_ascii_uppercase().as_bytes()).ok())
                .ok_or_else(|| ProxyError::BadRequest(format!("invalid {name} header")))?;
            methods.push(method);
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

/// `/openai/v1/chat` -> (`openai`, `/v1/chat`); `/openai` -> (`openai`, `/`).
fn split_route(path: &str) -> (&str, &str) {
    let rest = path.strip_prefix('/').unwrap_or(path);
    match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    }
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

fn upstream_uri(
    route: &Route,
    path: &policy::NormalPath,
    query: Option<&str>,
) -> Result<Uri, ProxyError> {
    let upstream = &route.upstream;
    let mut target = upstream.origin();
    target.push_str(&upstream.base_path);
    if path.segments().is_empty() && !upstream.base_path.is_empty() {
        // `/route` alone goes to the base path itself.
    } else {
        target.push_str(&path.encoded());
    }
    if let Some(query) = query {
        target.push('?');
        target.push_str(query);
    }
    target.parse().map_err(|_| {
        ProxyError::BadRequest("the request cannot be forwarded as a valid URL".into())
    })
}

fn upstream_error(
    host: String,
    max_body: u64,
    error: &hyper_util::client::legacy::Error,
) -> ProxyError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return ProxyError::BodyTooLarge(max_body);
        }
        // The guarded resolver refused every address of the name.
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::PermissionDenied
        {
            return ProxyError::Forbidden(io.to_string());
        }
        source = e.source();
    }
    let cause = if error.is_connect() {
        "connection failed".to_string()
    } else {
        "request failed".to_string()
    };
    let detail = std::error::Error::source(error)
        .map(|e| e.to_string())
        .unwrap_or_default();
    ProxyError::Upstream {
        host,
        cause: if detail.is_empty() {
            cause
        } else {
            format!("{cause}: {detail}")
        },
    }
}

fn log_refusal(error: &ProxyError, request_id: &str) {
    match error.fault() {
        error::Fault::Caller => tracing::info!(request_id, code = error.code(), "refused: {error}"),
        error::Fault::Upstream => tracing::warn!(request_id, code = error.code(), "{error}"),
        error::Fault::Sidekey => tracing::error!(request_id, code = error.code(), "{error}"),
    }
}
