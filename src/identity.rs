//! Who is calling: the agent token, found where the agent may put it, then
//! verified and checked against the revocation list.
//!
//! Identity comes before route lookup, so an unauthenticated caller learns
//! nothing about which routes exist.

pub mod oidc;

use base64::Engine;
use http::HeaderMap;
use http::header::{AUTHORIZATION, PROXY_AUTHORIZATION};
use percent_encoding::percent_decode_str;

use crate::config::Slot;
use crate::token::revocation::Revocations;
use crate::token::{TokenError, Verifier};

/// A workload JWT's claims as policy rules compare them: each claim's
/// values, one for a string or number, every element for a list
/// (`groups = ["staff", "contractors"]`).
pub type ClaimValues = std::collections::BTreeMap<String, Vec<String>>;

/// A verified agent identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    pub name: String,
    pub session: String,
    /// The token's id; `None` for identities that come without a token.
    pub token_id: Option<String>,
    /// A workload JWT's verified string claims, for rules with `claims`.
    pub claims: Option<std::sync::Arc<ClaimValues>>,
}

/// How a request proved who it is, kept so that it can be checked again on
/// every request (inside a tunnel, revocation and expiry end the next one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presented {
    Token {
        token: String,
        user: Option<String>,
    },
    /// The uid of the process at the other end of a unix socket (SO_PEERCRED).
    PeerUid(u32),
    /// A client certificate verified at the mTLS handshake.
    PeerCert(PeerCert),
}

/// What sidekey reads from an agent's client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    pub agent: String,
    /// Hex serial, the id `token revoke --id` takes.
    pub serial: String,
    pub not_before: u64,
    pub not_after: u64,
}

impl PeerCert {
    /// Reads the agent from the certificate's `spiffe://sidekey/agent/NAME`
    /// URI SAN. The chain and validity were checked at the handshake.
    pub fn from_der(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|_| "unparsable client certificate".to_string())?;
        let prefix = format!("{}/", crate::ca::spiffe_id("").trim_end_matches('/'));
        let agent = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .into_iter()
            .flat_map(|ext| ext.value.general_names.iter())
            .find_map(|name| match name {
                x509_parser::extensions::GeneralName::URI(uri) => uri.strip_prefix(&prefix),
                _ => None,
            })
            .filter(|name| {
                !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            })
            .ok_or_else(|| "the client certificate names no sidekey agent".to_string())?
            .to_string();
        let raw = cert.tbs_certificate.raw_serial();
        let significant = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
        let mut serial = String::with_capacity(2 * raw.len());
        crate::token::push_hex(&mut serial, &raw[significant..]);
        let validity = cert.validity();
        Ok(Self {
            agent,
            serial,
            not_before: validity.not_before.timestamp().max(0) as u64,
            not_after: validity.not_after.timestamp().max(0) as u64,
        })
    }
}

impl Presented {
    /// The agent token, to be removed wherever it appears; empty for none.
    pub fn token(&self) -> &str {
        match self {
            Self::Token { token, .. } => token,
            Self::PeerUid(_) | Self::PeerCert(_) => "",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("no agent credentials")]
    Missing,
    #[error("{0}")]
    Token(#[from] TokenError),
    #[error("more than one agent token in the request")]
    Ambiguous,
    #[error("the user name is not the agent the token was issued to")]
    AgentMismatch,
    #[error("the token's agent is not the one this connection's certificate or uid names")]
    ConnectionMismatch,
    #[error("the revocation list cannot be read, so no token can be trusted")]
    RevocationsUnavailable,
    #[error("uid {0} is not mapped to an agent")]
    UnknownUid(u32),
    #[error("the workload token names no mapped agent")]
    UnknownWorkload,
    #[error("the OIDC key set is unavailable, so no workload token can be trusted")]
    KeysUnavailable,
}

/// Finds the agent token: `Proxy-Authorization` if present (and then only
/// there), else the route's credential slot.
pub fn find_token(
    headers: &HeaderMap,
    query: Option<&str>,
    slot: Option<&Slot>,
) -> Result<(String, Option<String>), IdentityError> {
    let proxy_auth: Vec<_> = headers.get_all(PROXY_AUTHORIZATION).iter().collect();
    if !proxy_auth.is_empty() {
        if proxy_auth.len() > 1 {
            return Err(IdentityError::Ambiguous);
        }
        let value = proxy_auth[0].to_str().map_err(|_| IdentityError::Missing)?;
        let (user, token) = parse_authorization(value).ok_or(IdentityError::Missing)?;
        return Ok((token, user));
    }
    let mut found: Vec<(String, Option<String>)> = Vec::new();
    match slot {
        Some(Slot::Header {
            name,
            prefix,
            suffix,
        }) => {
            for value in headers.get_all(name) {
                let Ok(value) = value.to_str() else { continue };
                let value = value.trim();
                let inner = strip_prefix_ignore_case(value, prefix)
                    .and_then(|rest| rest.strip_suffix(suffix.as_str()));
                if let Some(token) = inner.filter(|t| !t.is_empty()) {
                    found.push((token.to_string(), None));
                }
            }
        }
        Some(Slot::Basic { username }) => {
            for value in headers.get_all(AUTHORIZATION) {
                let Ok(value) = value.to_str() else { continue };
                if let Some((user, token)) = parse_authorization(value) {
                    // In the credential's own slot the user name may be the
                    // route's (`x-access-token` for git), as the client was
                    // told to send it, or the agent's.
                    found.push((token, user.filter(|u| u != username)));
                }
            }
        }
        Some(Slot::AwsSigV4) => {
            for key in crate::inject::sigv4::credential_key(headers) {
                found.push((key, None));
            }
            // A presigned URL carries it in the query instead.
            if let Some(key) = query.and_then(crate::inject::sigv4::presigned_key) {
                found.push((key, None));
            }
        }
        Some(Slot::Query { param }) => {
            for (name, value) in query_pairs(query.unwrap_or_default()) {
                if name == *param && !value.is_empty() {
                    found.push((value, None));
                }
            }
        }
        None => {}
    }
    found.dedup_by(|a, b| a.0 == b.0);
    match found.len() {
        0 => Err(IdentityError::Missing),
        1 => {
            let (token, user) = found.remove(0);
            Ok((token, user))
        }
        _ => Err(IdentityError::Ambiguous),
    }
}

/// Verifies a token and checks revocation. A Basic user name, when given,
/// must be the token's agent.
pub fn verify(
    verifier: &Verifier,
    revocations: Result<&Revocations, ()>,
    token: &str,
    user: Option<&str>,
) -> Result<Agent, IdentityError> {
    let claims = verifier.verify(token)?;
    if user.is_some_and(|u| !u.is_empty() && u != claims.sub) {
        return Err(IdentityError::AgentMismatch);
    }
    check_revoked(&claims, revocations)?;
    Ok(Agent::from(claims))
}

impl From<crate::token::Claims> for Agent {
    fn from(claims: crate::token::Claims) -> Self {
        Self {
            name: claims.sub,
            session: claims.sid,
            token_id: Some(claims.jti),
            claims: None,
        }
    }
}

/// Refuses claims the revocation list covers, and everything when the list
/// cannot be read.
pub fn check_revoked(
    claims: &crate::token::Claims,
    revocations: Result<&Revocations, ()>,
) -> Result<(), IdentityError> {
    let revocations = revocations.map_err(|()| IdentityError::RevocationsUnavailable)?;
    if revocations.is_revoked(claims) {
        return Err(TokenError::Revoked.into());
    }
    Ok(())
}

/// The agent a unix peer uid is mapped to, unless that agent is revoked.
pub fn verify_uid(
    uid: u32,
    agents: &std::collections::BTreeMap<String, crate::config::AgentConfig>,
    revocations: Result<&Revocations, ()>,
) -> Result<Agent, IdentityError> {
    let agent = uid_agent(uid, agents).ok_or(IdentityError::UnknownUid(uid))?;
    let revocations = revocations.map_err(|()| IdentityError::RevocationsUnavailable)?;
    // A uid identity has no issue time, so an agent revocation covers it
    // until the revocation is removed from the list. Its session is the
    // one its audit records name, so revoking that works as it reads.
    if revocations.agent_revoked(&agent.name) || revocations.session_revoked(&agent.session) {
        return Err(TokenError::Revoked.into());
    }
    Ok(agent)
}

/// The agent a unix peer uid is mapped to, revoked or not.
pub fn uid_agent(
    uid: u32,
    agents: &std::collections::BTreeMap<String, crate::config::AgentConfig>,
) -> Option<Agent> {
    Some(Agent {
        name: uid_agent_name(uid, agents)?.to_string(),
        session: format!("uid-{uid}"),
        token_id: None,
        claims: None,
    })
}

pub fn uid_agent_name(
    uid: u32,
    agents: &std::collections::BTreeMap<String, crate::config::AgentConfig>,
) -> Option<&str> {
    agents
        .iter()
        .find(|(_, a)| a.unix_uids.contains(&uid))
        .map(|(name, _)| name.as_str())
}

/// The agent a verified client certificate names, unless it expired since
/// the handshake or was revoked (by serial, or with its agent).
pub fn verify_cert(
    cert: &PeerCert,
    revocations: Result<&Revocations, ()>,
) -> Result<Agent, IdentityError> {
    let now = crate::secret::store::now_ms() / 1000;
    if now > cert.not_after {
        return Err(TokenError::Expired.into());
    }
    let claims = cert_claims(cert);
    check_revoked(&claims, revocations)?;
    Ok(Agent::from(claims))
}

/// A client certificate as the claims of a token: its serial is the id,
/// its validity the token's.
pub fn cert_claims(cert: &PeerCert) -> crate::token::Claims {
    crate::token::Claims {
        iss: crate::ca::TRUST_DOMAIN.to_string(),
        sub: cert.agent.clone(),
        sid: format!("cert-{}", cert.serial),
        jti: cert.serial.clone(),
        iat: cert.not_before,
        exp: cert.not_after,
        iat_ms: cert.not_before.saturating_mul(1000),
    }
}

/// `Bearer TOKEN` or `Basic base64(user:TOKEN)`.
fn parse_authorization(value: &str) -> Option<(Option<String>, String)> {
    let value = value.trim();
    if let Some(token) = strip_prefix_ignore_case(value, "Bearer ") {
        let token = token.trim();
        return (!token.is_empty()).then(|| (None, token.to_string()));
    }
    let encoded = strip_prefix_ignore_case(value, "Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, token) = decoded.split_once(':')?;
    (!token.is_empty()).then(|| (Some(user.to_string()), token.to_string()))
}

pub(crate) fn strip_prefix_ignore_case<'a>(value: &'a str, prefix: &str) -> Option<&'a str> {
    let head = value.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &value[prefix.len()..])
}

/// Decoded `name=value` pairs of a query string.
pub fn query_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| {
            percent_decode_str(&s.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        };
        (decode(name), decode(value))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    fn bearer_slot() -> Slot {
        Slot::Header {
            name: AUTHORIZATION,
            prefix: "Bearer ".into(),
            suffix: String::new(),
        }
    }

    #[test]
    fn finds_tokens_in_each_place() {
        let basic = base64::engine::general_purpose::STANDARD.encode("coder:tok");
        let h = headers(&[("proxy-authorization", &format!("Basic {basic}"))]);
        assert_eq!(
            find_token(&h, None, Some(&bearer_slot())).unwrap(),
            ("tok".into(), Some("coder".into()))
        );
        let h = headers(&[("authorization", "bearer tok")]);
        assert_eq!(find_token(&h, None, Some(&bearer_slot())).unwrap().0, "tok");
        let slot = Slot::Query {
            param: "key".into(),
        };
        assert_eq!(
            find_token(&HeaderMap::new(), Some("a=1&key=tok"), Some(&slot))
                .unwrap()
                .0,
            "tok"
        );
        assert_eq!(
            find_token(&HeaderMap::new(), None, None),
            Err(IdentityError::Missing)
        );
    }

    #[test]
    fn two_different_tokens_are_ambiguous() {
        let h = headers(&[("authorization", "Bearer a"), ("Authorization", "Bearer b")]);
        assert_eq!(
            find_token(&h, None, Some(&bearer_slot())),
            Err(IdentityError::Ambiguous)
        );
        let h = headers(&[("authorization", "Bearer a"), ("Authorization", "Bearer a")]);
        assert_eq!(find_token(&h, None, Some(&bearer_slot())).unwrap().0, "a");
    }
}
