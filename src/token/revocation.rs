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

/// How long a `sidekey exec` session stays on the list after its token has
/// expired, so that a clock stepped back (tokens are checked against the
/// same clock) does not revive it.
const EXPIRY_MARGIN_MS: u64 = 60 * 60 * 1000;

/// What names a `sidekey exec` session; reserved for it.
pub const EXEC_SESSION_PREFIX: &str = "exec-";

/// A name for a `sidekey exec` session whose token is valid until
/// `expires_ms`. The expiry is in the name, so the list can drop the
/// session once it is past without a field earlier versions would refuse.
pub fn exec_session(expires_ms: u64) -> String {
    crate::token::random_id(&format!("{EXEC_SESSION_PREFIX}{expires_ms}"))
}

/// When an `exec_session`'s token expires; `None` for any other name.
fn exec_session_expiry(session: &str) -> Option<u64> {
    let rest = session.strip_prefix(EXEC_SESSION_PREFIX)?;
    let (expires_ms, _random) = rest.split_once('-')?;
    expires_ms.parse().ok()
}

/// One `token revoke` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoke {
    Id(String),
    Session(String),
    Agent(String),
}

impl Revoke {
    /// What the command line and the admin API accept. Agents are config
    /// names. Ids and sessions come from tokens, and a workload JWT's
    /// (`oidc:system:serviceaccount:agents:coder`, a jti with `/+=`) go
    /// beyond config names: any printable ASCII without spaces. A whole
    /// JWT pasted as one would be listed and revoke nothing, so it is
    /// refused, without being echoed.
    pub fn check(&self) -> Result<(), String> {
        let (kind, value) = match self {
            Self::Agent(name) => {
                return if crate::config::valid_name(name) {
                    Ok(())
                } else {
                    Err(crate::config::invalid_name("agent", name))
                };
            }
            Self::Id(id) => ("token id", id),
            Self::Session(session) => ("session", session),
        };
        let printable = value.bytes().all(|b| b.is_ascii_graphic());
        let jwt = value.starts_with("eyJ") && value.split('.').count() == 3;
        if jwt {
            return Err(format!(
                "that {kind} is a whole token; give its id (`t-...`, printed by `token issue`) or its session"
            ));
        }
        if value.is_empty() || value.len() > 256 || !printable {
            return Err(format!(
                "invalid {kind} {} (1 to 256 printable ASCII characters, no spaces)",
                crate::config::shown(value)
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Revocations {
    #[serde(default)]
    ids: BTreeSet<String>,
    #[serde(default)]
    sessions: BTreeSet<String>,
    /// Agent name -> revocation time (ms); tokens issued at or before it are revoked.
    #[serde(default)]
    agents: BTreeMap<String, u64>,
}

impl Revocations {
    pub fn is_revoked(&self, claims: &Claims) -> bool {
        self.ids.contains(&claims.jti)
            || self.sessions.contains(&claims.sid)
            || self
                .agents
                .get(&claims.sub)
                .is_some_and(|&at| claims.iat_ms <= at)
    }

    pub fn agent_revoked(&self, agent: &str) -> bool {
        self.agents.contains_key(agent)
    }

    pub fn session_revoked(&self, session: &str) -> bool {
        self.sessions.contains(session)
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

    /// Adds `revoke` to the state dir's list under the writer lock,
    /// atomically, and drops the `sidekey exec` sessions whose tokens have
    /// expired: one is added per command, and the whole list is read and
    /// rewritten on every revocation.
    pub fn add(state: &StateDir, revoke: Revoke, now_ms: u64) -> Result<(), RevocationError> {
        let path = state.revocations();
        let write_err = |source| RevocationError::Write {
            path: path.display().to_string(),
            source,
        };
        let _lock = state.lock().map_err(write_err)?;
        let mut list = Self::read(&path)?;
        match revoke {
            Revoke::Id(id) => {
                list.ids.insert(id);
            }
            Revoke::Session(sid) => {
                list.sessions.insert(sid);
            }
            Revoke::Agent(agent) => {
                list.agents.insert(agent, now_ms);
            }
        }
        list.sessions.retain(|session| {
            exec_session_expiry(session)
                .is_none_or(|expires_ms| expires_ms.saturating_add(EXPIRY_MARGIN_MS) > now_ms)
        });
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
    fn exec_sessions_are_revoked_until_their_tokens_expire_then_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let session = |expires_ms| {
            let name = exec_session(expires_ms);
            assert_eq!(exec_session_expiry(&name), Some(expires_ms), "{name}");
            name
        };
        let revoke = |name: &str, now_ms| {
            Revocations::add(&state, Revoke::Session(name.into()), now_ms).unwrap();
            Revocations::read(&state.revocations()).unwrap()
        };
        let (first, second) = (session(10_000), session(u64::MAX));
        revoke(&first, 1_000);
        revoke("exec-by-hand", 1_000);
        // Listed to the end of the margin after expiry.
        let list = revoke(&second, 10_000 + EXPIRY_MARGIN_MS - 1);
        assert!(list.is_revoked(&claims("coder", &first, "t-1", 1)));
        let list = revoke("s-2", 10_000 + EXPIRY_MARGIN_MS);
        assert!(
            !list.sessions.contains(&first),
            "dropped once past expiry and margin"
        );
        assert!(list.is_revoked(&claims("coder", &second, "t-2", 1)));
        assert!(
            list.is_revoked(&claims("coder", "exec-by-hand", "t-3", 1)),
            "a name without an expiry is kept"
        );
        assert!(list.is_revoked(&claims("coder", "s-2", "t-4", 1)));
    }
}
