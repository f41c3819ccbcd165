//! Connections that outlive their request: a blind CONNECT tunnel and an
//! upgraded (WebSocket) connection carry bytes sidekey does not decide one
//! by one, so the identity that opened them is checked again while they
//! last. A revocation (SPEC: "also on open keep-alive and CONNECT
//! connections"), an expired token or certificate, or a uid or workload no
//! longer mapped to an agent closes them; otherwise a revoked agent would
//! keep a session that the real credential opened. Policy is not decided
//! again: a rule removed by a reload applies to the next connection.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ProxyError;
use crate::identity::{IdentityError, Presented};
use crate::live::Live;
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

/// The identity an open connection was authorized with.
pub(super) struct LastingIdentity {
    pub(super) live: Arc<Live>,
    pub(super) verifier: Arc<Verifier>,
    pub(super) presented: Presented,
}

impl LastingIdentity {
    /// Runs `work` until it ends or the identity stops verifying; `None`
    /// when the identity ended it.
    pub(super) async fn guard<T>(self, work: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            done = work => Some(done),
            () = self.lost() => {
                tracing::info!("open connection closed: its identity no longer verifies");
                None
            }
        }
    }

    async fn lost(&self) {
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
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    }

    fn check(&self) -> Result<(), ProxyError> {
        let snapshot = self.live.snapshot();
        let revocations = self.live.revocations();
        let list = revocations.as_ref().as_ref().map_err(|_| ());
        super::verify_presented(&self.verifier, list, &snapshot, &self.presented).map(|_| ())
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
