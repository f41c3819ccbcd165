//! The persistent revocation list: token ids, sessions, and agents (every
//! token of that agent issued up to the revocation).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::state::{StateDir, write_atomic};
use crate::token::Claims;

#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    #[error("cannot read revocation list {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("revocation list {0} is damaged")]
    Corrupt(String),
    #[error("cannot write revocation list {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// One `token revoke` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoke {
    Id(String),
    Session(String),
    Agent(String),
}

/// How long an expiring revocation outlives its tokens' expiry, so that a
/// clock stepped back (tokens are checked against the same clock) does not
/// revive them.
const EXPIRY_MARGIN_MS: u64 = 60 * 60 * 1000;

#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Revocations {
    #[serde(default)]
    ids: BTreeSet<String>,
    #[serde(default)]
    sessions: BTreeSet<String>,
    /// Session -> when its last token expires (ms); dropped from the list
    /// once that is [`EXPIRY_MARGIN_MS`] past. Omitted when empty, so a list
    /// without one stays readable by earlier versions.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    sessions_until: BTreeMap<String, u64>,
    /// Agent name -> revocation time (ms); tokens issued at or before it are revoked.
    #[serde(default)]
    agents: BTreeMap<String, u64>,
}

impl Revocations {
    pub fn is_revoked(&self, claims: &Claims) -> bool {
        self.ids.contains(&claims.jti)
            || self.sessions.contains(&claims.sid)
            || self.sessions_until.contains_key(&claims.sid)
            || self
                .agents
                .get(&claims.sub)
                .is_some_and(|&at| claims.iat_ms <= at)
    }

    pub fn agent_revoked(&self, agent: &str) -> bool {
        self.agents.contains_key(agent)
    }

    /// Reads the list; a missing file is an empty list.
    pub fn read(path: &Path) -> Result<Self, RevocationError> {
        match fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|_| RevocationError::Corrupt(path.display().to_string())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(RevocationError::Read {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    /// Adds `revoke` to the state dir's list under the writer lock, atomically.
    pub fn add(state: &StateDir, revoke: Revoke, now_ms: u64) -> Result<(), RevocationError> {
        Self::update(state, now_ms, |list| match revoke {
            Revoke::Id(id) => {
                list.ids.insert(id);
            }
            Revoke::Session(sid) => {
                list.sessions.insert(sid);
            }
            Revoke::Agent(agent) => {
                list.agents.insert(agent, now_ms);
            }
        })
    }

    /// Revokes a session whose every token expires by `expires_ms`, only
    /// until then: `sidekey exec`'s own, so that a list which gains an entry
    /// per command does not grow for ever.
    pub fn add_expiring_session(
        state: &StateDir,
        session: String,
        expires_ms: u64,
        now_ms: u64,
    ) -> Result<(), RevocationError> {
        Self::update(state, now_ms, |list| {
            list.sessions_until.insert(session, expires_ms);
        })
    }

    /// Applies `change` to the list under the writer lock, drops the
    /// expiring sessions that are past their time, and writes it atomically.
    fn update(
        state: &StateDir,
        now_ms: u64,
        change: impl FnOnce(&mut Self),
    ) -> Result<(), RevocationError> {
        let path = state.revocations();
        let write_err = |source| RevocationError::Write {
            path: path.display().to_string(),
            source,
        };
        let _lock = state.lock().map_err(write_err)?;
        let mut list = Self::read(&path)?;
        change(&mut list);
        list.sessions_until
            .retain(|_, expires_ms| expires_ms.saturating_add(EXPIRY_MARGIN_MS) > now_ms);
        let mut json = serde_json::to_vec_pretty(&list)
            .map_err(|_| RevocationError::Corrupt(path.display().to_string()))?;
        json.push(b'\n');
        write_atomic(&path, &json, 0o600).map_err(write_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(agent: &str, sid: &str, jti: &str, iat_ms: u64) -> Claims {
        Claims {
            iss: "sidekey".into(),
            sub: agent.into(),
            sid: sid.into(),
            jti: jti.into(),
            iat: iat_ms / 1000,
            exp: u64::MAX,
            iat_ms,
        }
    }

    #[test]
    fn revokes_by_id_session_and_agent_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        Revocations::add(&state, Revoke::Id("t-1".into()), 0).unwrap();
        Revocations::add(&state, Revoke::Session("s-9".into()), 0).unwrap();
        Revocations::add(&state, Revoke::Agent("ci".into()), 5_000).unwrap();
        let list = Revocations::read(&state.revocations()).unwrap();
        assert!(list.is_revoked(&claims("coder", "s-1", "t-1", 1)));
        assert!(list.is_revoked(&claims("coder", "s-9", "t-2", 1)));
        assert!(list.is_revoked(&claims("ci", "s-1", "t-3", 5_000)));
        assert!(
            !list.is_revoked(&claims("ci", "s-1", "t-3", 5_001)),
            "issued after"
        );
        assert!(!list.is_revoked(&claims("coder", "s-1", "t-2", 1)));
    }

    #[test]
    fn expiring_sessions_are_revoked_until_their_tokens_expire_then_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let until = |session: &str, expires_ms, now_ms| {
            Revocations::add_expiring_session(&state, session.into(), expires_ms, now_ms).unwrap()
        };
        until("exec-1", 10_000, 1_000);
        Revocations::add(&state, Revoke::Session("kept".into()), 1_000).unwrap();
        // Still listed to the end of the margin after expiry.
        let later = 10_000 + EXPIRY_MARGIN_MS - 1;
        until("exec-2", later + 10_000, later);
        let list = Revocations::read(&state.revocations()).unwrap();
        assert!(list.is_revoked(&claims("coder", "exec-1", "t-1", 1)));
        assert!(list.is_revoked(&claims("coder", "exec-2", "t-2", 1)));

        until("exec-3", u64::MAX, later + 1);
        let list = Revocations::read(&state.revocations()).unwrap();
        assert!(
            !list.sessions_until.contains_key("exec-1"),
            "dropped once past expiry and margin"
        );
        assert!(list.is_revoked(&claims("coder", "exec-2", "t-2", 1)));
        assert!(list.is_revoked(&claims("coder", "exec-3", "t-3", 1)));
        assert!(
            list.is_revoked(&claims("coder", "kept", "t-4", 1)),
            "a plain session revocation is kept"
        );
    }

    #[test]
    fn a_list_without_expiring_sessions_keeps_its_earlier_form() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        Revocations::add(&state, Revoke::Session("s-1".into()), 0).unwrap();
        let text = std::fs::read_to_string(state.revocations()).unwrap();
        assert!(!text.contains("sessions_until"), "{text}");
    }
}
