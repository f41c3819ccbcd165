//! Agent tokens: EdDSA-signed JWTs that only this proxy honours.
//!
//! A token names the agent, a session, an expiry and an id. Verification is
//! local (the state dir's public key) and a revocation list is consulted on
//! every request, so revoking takes effect on the next request.

pub mod revocation;

use std::collections::HashMap;
use std::fs;
use std::io;
use std::sync::Mutex;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::secret::store::now_ms;
use crate::state::{StateDir, write_new};

const ISSUER: &str = "sidekey";

/// What a token says about its holder.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub iss: String,
    /// The agent name.
    pub sub: String,
    /// The session; every token of one `exec` run or one `--session` shares it.
    pub sid: String,
    /// The token id, for `token revoke --id`.
    pub jti: String,
    pub iat: u64,
    pub exp: u64,
    /// Issue time in milliseconds, so an agent revocation can be ordered
    /// against tokens issued within the same second.
    pub iat_ms: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("malformed or forged agent token")]
    Invalid,
    #[error("agent token expired")]
    Expired,
    #[error("agent token revoked")]
    Revoked,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read token signing key {path}: {source} (run `sidekey init`)")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("token signing key {0} is damaged")]
    Corrupt(String),
    #[error("cannot write token signing key {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// Signs new tokens. Held only by the CLI that issues them and by `exec`.
pub struct Issuer {
    key: EncodingKey,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Issuer(***)")
    }
}

/// Checks tokens; holds only the public key.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    /// Tokens whose signature already checked out, so an agent's keep-alive
    /// traffic pays for one signature check, not one per request. Keyed by
    /// a keyed hash of the token's last bytes (its signature's), which is
    /// cheaper than hashing the whole token; an entry counts only when its
    /// whole text equals the token presented. Expiry is still checked on
    /// every use; revocation is the caller's, also on every use.
    verified: Mutex<HashMap<u64, (Box<str>, Claims)>>,
    cache_hasher: std::collections::hash_map::RandomState,
}

/// How many of a token's last bytes key the cache: a 64-byte Ed25519
/// signature is the last 86 characters of the token.
const CACHE_KEY_BYTES: usize = 32;

/// Bounds the cache; when full it starts over, which only costs re-checks.
const VERIFIED_CACHE: usize = 4096;

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifier")
    }
}

/// Creates the signing key if the state dir has none. Returns whether it did.
pub fn create_signing_key(state: &StateDir) -> Result<bool, KeyError> {
    let path = state.signing_key();
    if path.exists() {
        return Ok(false);
    }
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|_| KeyError::Corrupt(path.display().to_string()))?;
    write_new(&path, pem.as_bytes(), 0o600).map_err(|source| KeyError::Write {
        path: path.display().to_string(),
        source,
    })?;
    Ok(true)
}

fn load_signing_key(state: &StateDir) -> Result<SigningKey, KeyError> {
    let path = state.signing_key();
    let shown = || path.display().to_string();
    let pem = Zeroizing::new(fs::read_to_string(&path).map_err(|source| KeyError::Read {
        path: shown(),
        source,
    })?);
    SigningKey::from_pkcs8_pem(&pem).map_err(|_| KeyError::Corrupt(shown()))
}

impl Issuer {
    pub fn load(state: &StateDir) -> Result<Self, KeyError> {
        let key = load_signing_key(state)?;
        let der = key
            .to_pkcs8_der()
            .map_err(|_| KeyError::Corrupt(state.signing_key().display().to_string()))?;
        Ok(Self {
            key: EncodingKey::from_ed_der(der.as_bytes()),
        })
    }

    /// Signs a token for `agent`. Without `session` the token gets a session of its own.
    pub fn issue(&self, agent: &str, session: Option<&str>, ttl: Duration) -> (String, Claims) {
        let issued_ms = now_ms();
        let iat = issued_ms / 1000;
        let claims = Claims {
            iss: ISSUER.to_string(),
            sub: agent.to_string(),
            sid: session.map_or_else(|| random_id("s"), str::to_string),
            jti: random_id("t"),
            iat,
            exp: iat.saturating_add(ttl.as_secs().max(1)),
            iat_ms: issued_ms,
        };
        // Serialising a struct of strings and integers with a valid Ed25519 key cannot fail.
        let token = jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &self.key)
            .unwrap_or_default();
        (token, claims)
    }
}

impl Verifier {
    pub fn load(state: &StateDir) -> Result<Self, KeyError> {
        let key = load_signing_key(state)?;
        let public = key
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .map_err(|_| KeyError::Corrupt(state.signing_key().display().to_string()))?;
        let key = DecodingKey::from_ed_pem(public.as_bytes())
            .map_err(|_| KeyError::Corrupt(state.signing_key().display().to_string()))?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = 0;
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        validation.validate_aud = false;
        Ok(Self {
            key,
            validation,
            verified: Mutex::new(HashMap::new()),
            cache_hasher: std::collections::hash_map::RandomState::new(),
        })
    }

    /// Checks signature, issuer and expiry. Revocation is the caller's next step.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        if token.len() > 4096 {
            return Err(TokenError::Invalid);
        }
        let key = self.cache_key(token);
        if let Some(claims) = self.cached(key, token) {
            if claims.exp < now_ms() / 1000 {
                return Err(TokenError::Expired);
            }
            return Ok(claims);
        }
        // A JWT is three base64url parts; refusing anything else early keeps
        // odd bytes out of the decoder and out of error messages.
        if token.split('.').count() != 3
            || !token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(TokenError::Invalid);
        }
        let claims = match jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation) {
            Ok(data) => data.claims,
            Err(e) if matches!(e.kind(), ErrorKind::ExpiredSignature) => {
                return Err(TokenError::Expired);
            }
            Err(_) => return Err(TokenError::Invalid),
        };
        let mut cache = self.lock_cache();
        if cache.len() >= VERIFIED_CACHE {
            cache.clear();
        }
        cache.insert(key, (token.into(), claims.clone()));
        Ok(claims)
    }

    /// The claims of a token whose signature and issuer hold, expired or
    /// not: who a refused token names, for the audit record. Off the
    /// request path of tokens that are accepted.
    pub fn signed_claims(&self, token: &str) -> Option<Claims> {
        if let Some(claims) = self.cached(self.cache_key(token), token) {
            return Some(claims);
        }
        let mut validation = self.validation.clone();
        validation.validate_exp = false;
        jsonwebtoken::decode::<Claims>(token, &self.key, &validation)
            .ok()
            .map(|data| data.claims)
    }

    /// What an earlier check of this very token found.
    fn cached(&self, key: u64, token: &str) -> Option<Claims> {
        self.lock_cache()
            .get(&key)
            .filter(|(text, _)| **text == *token)
            .map(|(_, claims)| claims.clone())
    }

    fn cache_key(&self, token: &str) -> u64 {
        let tail = &token.as_bytes()[token.len().saturating_sub(CACHE_KEY_BYTES)..];
        std::hash::BuildHasher::hash_one(&self.cache_hasher, tail)
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (Box<str>, Claims)>> {
        // The map holds no invariant a panicking holder could break.
        self.verified.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A random identifier with a readable prefix (`t-…` tokens, `s-…` sessions).
pub fn random_id(prefix: &str) -> String {
    let mut bytes = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut bytes);
    let mut out = String::with_capacity(prefix.len() + 1 + 24);
    out.push_str(prefix);
    out.push('-');
    push_hex(&mut out, &bytes);
    out
}

/// Appends `bytes` as lower-case hex, without an allocation per byte.
pub fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
}

/// Parses `--ttl` values such as `90s`, `15m`, `1h`, `7d`.
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(text)
        .map_err(|e| format!("invalid duration {text:?}: {e} (examples: 30s, 15m, 1h, 7d)"))?;
    if ttl < Duration::from_secs(1) {
        return Err(format!("duration {text:?} is shorter than one second"));
    }
    if ttl > crate::config::MAX_DURATION {
        return Err(format!("duration {text:?} is longer than 366 days"));
    }
    Ok(ttl)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> (tempfile::TempDir, StateDir) {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        assert!(create_signing_key(&state).unwrap());
        assert!(!create_signing_key(&state).unwrap());
        (dir, state)
    }

    #[test]
    fn issued_token_verifies_and_forgery_fails() {
        let (_dir, state) = state();
        let issuer = Issuer::load(&state).unwrap();
        let verifier = Verifier::load(&state).unwrap();
        let (token, claims) = issuer.issue("coder", Some("s1"), Duration::from_secs(60));
        assert!(token.bytes().all(|b| b.is_ascii_graphic()));
        let back = verifier.verify(&token).unwrap();
        assert_eq!(back, claims);
        assert_eq!(back.sub, "coder");
        assert_eq!(back.sid, "s1");

        let mut forged = token.clone();
        forged.pop();
        forged.push(if token.ends_with('A') { 'B' } else { 'A' });
        assert_eq!(verifier.verify(&forged), Err(TokenError::Invalid));
        assert_eq!(verifier.verify("not a token"), Err(TokenError::Invalid));

        let (_other_dir, other) = state_pair();
        let stranger = Issuer::load(&other).unwrap();
        let (foreign, _) = stranger.issue("coder", None, Duration::from_secs(60));
        assert_eq!(verifier.verify(&foreign), Err(TokenError::Invalid));
    }

    #[test]
    fn a_cached_signature_does_not_vouch_for_another_payload() {
        let (_dir, state) = state();
        let issuer = Issuer::load(&state).unwrap();
        let verifier = Verifier::load(&state).unwrap();
        let (token, _) = issuer.issue("coder", Some("s1"), Duration::from_secs(60));
        assert!(verifier.verify(&token).is_ok(), "cached now");
        // Same signature, so the same cache key; the payload names another agent.
        let (header, rest) = token.split_once('.').unwrap();
        let signature = rest.split_once('.').unwrap().1;
        let payload = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            r#"{"iss":"sidekey","sub":"admin","sid":"s1","jti":"t-x","iat":1,"exp":99999999999,"iat_ms":1}"#,
        );
        let forged = format!("{header}.{payload}.{signature}");
        assert_eq!(verifier.cache_key(&forged), verifier.cache_key(&token));
        assert_eq!(verifier.verify(&forged), Err(TokenError::Invalid));
        assert_eq!(verifier.verify(&token).unwrap().sub, "coder");
    }

    fn state_pair() -> (tempfile::TempDir, StateDir) {
        state()
    }

    #[test]
    fn ttl_parsing() {
        assert_eq!(parse_ttl("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("soon").is_err());
        assert!(parse_ttl("400d").is_err());
        // The bound the message names, as in the config: "1y" is 365.25 days.
        assert!(parse_ttl("1y").is_ok() && parse_ttl("366d").is_ok());
        assert_eq!(
            parse_ttl("367d").unwrap_err(),
            "duration \"367d\" is longer than 366 days"
        );
    }
}
