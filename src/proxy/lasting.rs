//! Connections that outlive their request: a blind CONNECT tunnel and an
//! upgraded (WebSocket) connection carry bytes sidekey does not decide one
//! by one, so the identity that opened them is checked again while they
//! last. A revocation (SPEC: "also on open keep-alive and CONNECT
//! connections"), an expired token or certificate, or a uid or workload no
//! longer mapped to an agent closes them; otherwise a revoked agent would
//! keep a session that the real credential opened. The policy decision
//! that let the connection open is taken again too, so a reload that
//! withdraws it (a rule removed, a deny added) closes the connection.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;

use super::{Mode, ProxyError};
use crate::audit::{AuditEvent, timestamp};
use crate::identity::{Agent, IdentityError, Presented};
use crate::live::{Live, Snapshot};
use crate::metrics::Metrics;
use crate::policy::NormalPath;
use crate::token::Verifier;

/// How often an open connection's identity is checked again. With the
/// revocation list re-read every [`crate::live::POLL`], a revocation closes
/// the connection within a second.
const RECHECK: Duration = Duration::from_millis(500);

/// How long a connection is kept while its identity cannot be checked at all
/// (the revocation list unreadable, a workload key set not fetched yet after
/// a reload): new requests are refused meanwhile, but a passing outage does
/// not cut every open connection.
const UNSURE_GRACE: Duration = Duration::from_secs(30);

/// How long a connection being closed waits for its closing record, so a
/// stuck audit sink cannot keep a withdrawn connection open.
const CLOSE_AUDIT_WAIT: Duration = Duration::from_secs(2);

/// What the policy let open, to be decided again while it lasts.
pub(super) enum Granted {
    /// A CONNECT tunnelled blind: no route, no rule that needs to see
    /// methods or paths.
    Tunnel {
        host: String,
        port: u16,
        /// The address connected to is not public, so a rule had to let
        /// private addresses be reached.
        private: bool,
    },
    /// An upgraded request.
    Upgrade {
        route: Option<String>,
        host: String,
        port: u16,
        method: Method,
        overrides: Vec<Method>,
        path: NormalPath,
    },
}

impl Granted {
    /// Whether the current config would still let it open as it did.
    fn still(&self, snapshot: &Snapshot, agent: &Agent) -> Result<(), ProxyError> {
        let policy = &snapshot.policy;
        let (allowed, rule) = match self {
            Self::Tunnel {
                host,
                port,
                private,
            } => {
                // A route for this origin now: the tunnel would be intercepted.
                if super::forward::route_for_origin(snapshot, true, host, *port, None).is_some() {
                    return Err(ProxyError::Denied { rule: None });
                }
                let decision = policy.check_connect(
                    &agent.name,
                    &agent.session,
                    agent.claims.as_deref(),
                    None,
                    host,
                    *port,
                );
                let blind = decision.allowed && !decision.inspect;
                (blind && (decision.private_ok || !private), decision.rule)
            }
            Self::Upgrade {
                route,
                host,
                port,
                method,
                overrides,
                path,
            } => {
                let decision = policy.check(&crate::policy::Request {
                    agent: &agent.name,
                    session: &agent.session,
                    claims: agent.claims.as_deref(),
                    route: route.as_deref(),
                    host,
                    port: *port,
                    method,
                    overrides,
                    path,
                });
                (decision.allowed, decision.rule)
            }
        };
        if allowed {
            Ok(())
        } else {
            Err(ProxyError::Denied { rule })
        }
    }
}

/// The identity an open connection was authorized with, and what it was
/// allowed.
pub(super) struct LastingIdentity {
    pub(super) live: Arc<Live>,
    pub(super) verifier: Arc<Verifier>,
    pub(super) presented: Presented,
    pub(super) granted: Granted,
    pub(super) metrics: Arc<Metrics>,
    /// The record that opened the connection; a closing one repeats its
    /// request id, agent and destination.
    pub(super) opened: AuditEvent,
    pub(super) opened_at: Instant,
}

impl LastingIdentity {
    /// Runs `work` until it ends, the identity stops verifying or the
    /// policy withdraws what it granted; `None` when one of those ended it,
    /// which is audited as a refusal.
    pub(super) async fn guard<T>(self, work: impl Future<Output = T>) -> Option<T> {
        // Pinned here rather than moved into `select!`, so what `work` owns
        // (the connection) is dropped only once the closing is on record.
        let mut work = std::pin::pin!(work);
        let refusal = tokio::select! {
            done = &mut work => return Some(done),
            refusal = self.lost() => refusal,
        };
        tracing::info!(
            request_id = self.opened.request_id,
            reason = refusal.code(),
            "open connection closed: its identity no longer verifies or the policy withdrew it"
        );
        self.audit_close(&refusal).await;
        None
    }

    async fn lost(&self) -> ProxyError {
        let mut tick = tokio::time::interval(RECHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut unsure_since: Option<Instant> = None;
        loop {
            tick.tick().await;
            match self.check() {
                Ok(()) => unsure_since = None,
                Err(e) if cannot_tell(&e) => {
                    if unsure_since.get_or_insert_with(Instant::now).elapsed() >= UNSURE_GRACE {
                        return e;
                    }
                }
                Err(e) => return e,
            }
        }
    }

    fn check(&self) -> Result<(), ProxyError> {
        let snapshot = self.live.snapshot();
        let revocations = self.live.revocations();
        let list = revocations.as_ref().as_ref().map_err(|_| ());
        let agent = super::verify_presented(&self.verifier, list, &snapshot, &self.presented)?;
        self.granted.still(&snapshot, &agent)
    }

    /// The closing decision, under the opening record's request id, with
    /// the status a new request would get for the same reason. The
    /// connection is cut once it is written, or after `CLOSE_AUDIT_WAIT`
    /// whatever the sink does (the write goes on in its own task); a failed
    /// write is only counted, since the connection is cut either way.
    async fn audit_close(&self, refusal: &ProxyError) {
        let mode = if self.opened.mode == Mode::Reverse.as_str() {
            Mode::Reverse
        } else {
            Mode::Forward
        };
        let event = AuditEvent {
            ts: timestamp(),
            decision: "deny",
            reason: refusal.code(),
            // The rule that withdrew the permission; none for an identity.
            rule: match refusal {
                ProxyError::Denied { rule } => rule.clone(),
                _ => None,
            },
            status: refusal.status(mode).as_u16(),
            duration_ms: self.opened_at.elapsed().as_millis() as u64,
            bytes_in: 0,
            bytes_out: 0,
            redactions: 0,
            ..self.opened.clone()
        };
        let audit = self.live.snapshot().audit.clone();
        let metrics = self.metrics.clone();
        let written = tokio::spawn(async move {
            if let Err(e) = audit.record(&event).await {
                metrics.audit_errors.inc();
                tracing::error!(error = %e, request_id = event.request_id, "audit write failed");
            }
        });
        let _ = tokio::time::timeout(CLOSE_AUDIT_WAIT, written).await;
    }
}

/// Failures that say nothing about the identity itself.
fn cannot_tell(error: &ProxyError) -> bool {
    matches!(
        error,
        ProxyError::Identity(
            IdentityError::RevocationsUnavailable | IdentityError::KeysUnavailable
        )
    )
}
