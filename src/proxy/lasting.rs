//! Connections that outlive their request: a blind CONNECT tunnel and an
//! upgraded (WebSocket) connection carry bytes sidekey does not decide one
//! by one, so the identity that opened them is checked again while they
//! last. A revocation (SPEC: "also on open keep-alive and CONNECT
//! connections"), an expired token or certificate, or an agent gone from
//! the config closes them; otherwise a revoked agent would keep a session
//! that the real credential opened.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::identity::Presented;
use crate::live::Live;
use crate::token::Verifier;

/// How often an open connection's identity is checked again. With the
/// revocation list re-read every [`crate::live::POLL`], a revocation closes
/// the connection within a second.
const RECHECK: Duration = Duration::from_millis(500);

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
        loop {
            tick.tick().await;
            let snapshot = self.live.snapshot();
            let revocations = self.live.revocations();
            let list = revocations.as_ref().as_ref().map_err(|_| ());
            if super::verify_presented(&self.verifier, list, &snapshot, &self.presented).is_err() {
                return;
            }
        }
    }
}
