//! Upgraded connections (WebSocket): the credential rides on the upgrade
//! request; afterwards bytes flow both ways, and the upstream's frames are
//! scrubbed with same-length masking so frame lengths stay valid (see
//! `scrub::websocket`).

use std::sync::Arc;

use http::HeaderMap;
use http::header::{self, HeaderValue};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::lasting::LastingIdentity;
use crate::scrub::Scrubber;
use crate::scrub::websocket::FrameScrubber;

/// The protocol an agent asks to upgrade to, if it does (`Connection:
/// upgrade` with an `Upgrade` header).
pub(super) fn requested(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    // Only WebSocket: another protocol (h2c, say) would leave per-request
    // checks behind and carry compressed headers past the scrubber.
    asks.then(|| headers.get(header::UPGRADE).cloned())
        .flatten()
        .filter(|p| {
            p.to_str()
                .is_ok_and(|p| p.trim().eq_ignore_ascii_case("websocket"))
        })
}

/// Puts the upgrade back after hop-by-hop headers were stripped. Compression
/// extensions are refused: compressed frames would hide a secret from the scrubber.
pub(super) fn restore(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::UPGRADE, protocol);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.remove("sec-websocket-extensions");
}

/// Joins the two upgraded connections until either side closes, they idle
/// out, or `identity` no longer verifies.
pub(super) fn splice(
    agent: OnUpgrade,
    upstream: OnUpgrade,
    scrubber: Arc<Scrubber>,
    slot: Option<Arc<crate::listen::ConnSlot>>,
    identity: LastingIdentity,
) {
    tokio::spawn(async move {
        let (agent, upstream) = match tokio::try_join!(agent, upstream) {
            Ok(both) => both,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let (mut agent_read, mut agent_write) = tokio::io::split(TokioIo::new(agent));
        let (mut up_read, mut up_write) = tokio::io::split(TokioIo::new(upstream));
        let outbound = async {
            let _ = tokio::io::copy(&mut agent_read, &mut up_write).await;
            let _ = up_write.shutdown().await;
            Ok(())
        };
        // Ends in `Err` when the upstream's frames cannot be scrubbed: both
        // sides are then dropped, not only the agent's.
        let inbound = async {
            let mut frames = FrameScrubber::default();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = match up_read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                match frames.push(&scrubber, &buf[..n]) {
                    Ok(out) => {
                        if agent_write.write_all(&out).await.is_err() {
                            return Ok(());
                        }
                    }
                    Err(e) => {
                        tracing::info!(error = %e, "WebSocket closed");
                        return Err(e);
                    }
                }
            }
            let _ = agent_write.write_all(&frames.finish(&scrubber)).await;
            let _ = agent_write.shutdown().await;
            Ok(())
        };
        let spliced = super::forward::until_idle(slot, true, async {
            let _ = tokio::try_join!(outbound, inbound);
        });
        identity.guard(spliced).await;
    });
}
