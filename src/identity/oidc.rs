//! Workload JWTs (OIDC): a Kubernetes service-account token, a SPIFFE
//! JWT-SVID or a CI OIDC token becomes a sidekey identity, with no
//! sidekey-issued secret at all.
//!
//! SECURITY: only RS256, ES256 and EdDSA are accepted, each only with a key
//! of its own family (so `alg: none` and the HS256-with-the-public-key
//! confusion fail), symmetric (`oct`) keys are never used, and the key set
//! failing to load fails closed.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};

use super::{Agent, ClaimValues, IdentityError};
use crate::token::{Claims, TokenError};

/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECS: u64 = 30;

/// `[identity.oidc]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcConfig {
    pub issuer: String,
    pub audience: String,
    pub jwks: JwksSource,
    /// The claim whose value names the workload.
    pub claim: String,
    /// Claim value -> agent name.
    pub map: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    File(PathBuf),
    Url(String),
}

/// Verifies workload JWTs against the issuer's current key set.
pub struct OidcVerifier {
    config: OidcConfig,
    keys: ArcSwap<Result<JwkSet, String>>,
    /// When the key set was last loaded successfully.
    loaded: ArcSwap<Instant>,
    /// Tokens whose signature checked out against the current key set, so a
    /// workload's keep-alive traffic (and the recheck of its open tunnels)
    /// pays for one signature check, not one per request. Keyed by a keyed
    /// hash of the token's last bytes (its signature's); an entry counts
    /// only when its whole text equals the token presented. Expiry is still
    /// checked on every use, revocation by the caller; a changed key set
    /// empties it.
    verified: Mutex<HashMap<u64, Verified>>,
    cache_hasher: RandomState,
    /// A token named a key the set does not hold: the issuer may have
    /// published a new one, so a `jwks_url` set is fetched early.
    unknown_kid: AtomicBool,
}

struct Verified {
    token: Box<str>,
    /// The key set it was verified against: only that very set vouches for
    /// it, so a check that finished after a key was withdrawn counts for
    /// nothing.
    keys: Arc<Result<JwkSet, String>>,
    agent: Agent,
    claims: Claims,
}

/// Bounds the cache; when full it starts over, which only costs re-checks.
const VERIFIED_CACHE: usize = 4096;
/// How many of a token's last bytes key the cache.
const CACHE_KEY_BYTES: usize = 32;

impl std::fmt::Debug for OidcVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcVerifier")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A key set that could not be refreshed for this long is no longer
/// trusted: the issuer may have rotated a compromised key out.
const MAX_KEY_AGE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

impl OidcVerifier {
    /// A verifier for `config`. A key set fetched from a URL is carried over
    /// from the `previous` verifier when it names the same URL: a reload
    /// must not leave workloads unauthenticated until the next fetch, nor
    /// at all while the issuer is unreachable.
    pub fn new(config: OidcConfig, previous: Option<&OidcVerifier>) -> Self {
        let (keys, loaded) = match (&config.jwks, previous) {
            (JwksSource::File(path), _) => (Arc::new(read_jwks(path)), Arc::new(Instant::now())),
            (JwksSource::Url(_), Some(previous)) if previous.config.jwks == config.jwks => {
                (previous.keys.load_full(), previous.loaded.load_full())
            }
            (JwksSource::Url(_), _) => (
                Arc::new(Err("the key set has not been fetched yet".to_string())),
                Arc::new(Instant::now()),
            ),
        };
        Self {
            config,
            keys: ArcSwap::new(keys),
            loaded: ArcSwap::new(loaded),
            verified: Mutex::default(),
            cache_hasher: RandomState::new(),
            unknown_kid: AtomicBool::new(false),
        }
    }

    /// Whether a token named a key the set lacked since the last call.
    pub fn take_unknown_kid(&self) -> bool {
        self.unknown_kid.swap(false, Ordering::Relaxed)
    }

    pub fn config(&self) -> &OidcConfig {
        &self.config
    }

    /// Replaces the key set; a failed load keeps the last good one.
    pub fn set_keys(&self, keys: Result<JwkSet, String>) {
        match keys {
            Ok(keys) => {
                // The same set again keeps what it verified; a new one
                // vouches for nothing verified before (see `Verified::keys`).
                if self.keys.load().as_ref().as_ref().ok() != Some(&keys) {
                    self.keys.store(Arc::new(Ok(keys)));
                    self.lock_verified().clear();
                }
                self.loaded.store(Arc::new(Instant::now()));
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot load the OIDC key set");
                if self.keys.load().is_err() {
                    self.keys.store(Arc::new(Err(e)));
                }
            }
        }
    }

    /// Verifies `token` if it claims to come from this issuer (`None` if it
    /// does not: another verifier is to check it), and maps it to an agent;
    /// also returns claims in the shape the revocation list checks.
    pub fn verify_if_ours(&self, token: &str) -> Option<Result<(Agent, Claims), IdentityError>> {
        let keys = self.keys.load_full();
        if let Some((agent, claims)) = self.cached(token, &keys) {
            if claims.exp.saturating_add(LEEWAY_SECS) < unix_now() {
                return Some(Err(TokenError::Expired.into()));
            }
            return Some(Ok((agent, claims)));
        }
        #[derive(serde::Deserialize)]
        struct Iss {
            iss: Option<String>,
        }
        let ours = jsonwebtoken::dangerous::insecure_decode::<Iss>(token)
            .ok()
            .and_then(|data| data.claims.iss)
            .is_some_and(|iss| iss == self.config.issuer);
        ours.then(|| self.verify(token, keys))
    }

    fn verify(
        &self,
        token: &str,
        key_set: Arc<Result<JwkSet, String>>,
    ) -> Result<(Agent, Claims), IdentityError> {
        // A file is the operator's to keep current; a URL's keys go stale.
        if matches!(self.config.jwks, JwksSource::Url(_))
            && self.loaded.load().elapsed() > MAX_KEY_AGE
        {
            return Err(IdentityError::KeysUnavailable);
        }
        let keys = key_set
            .as_ref()
            .as_ref()
            .map_err(|_| IdentityError::KeysUnavailable)?;
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Invalid)?;
        if !matches!(
            header.alg,
            Algorithm::RS256 | Algorithm::ES256 | Algorithm::EdDSA
        ) {
            return Err(TokenError::Invalid.into());
        }
        let jwk = pick_key(keys, header.kid.as_deref(), header.alg).ok_or_else(|| {
            if let Some(kid) = header.kid.as_deref()
                && !keys.keys.iter().any(|k| k.common.key_id.as_deref() == Some(kid))
            {
                let kid: String = kid.chars().take(64).collect();
                tracing::info!(?kid, "workload token refused: its key is not in the key set");
                self.unknown_kid.store(true, Ordering::Relaxed);
            } else {
                tracing::info!(alg = ?header.alg, "workload token refused: no usable key for its algorithm");
            }
            TokenError::Invalid
        })?;
        let key = DecodingKey::from_jwk(jwk).map_err(|_| TokenError::Invalid)?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let claims = match jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation) {
            Ok(data) => data.claims,
            Err(e) if matches!(e.kind(), ErrorKind::ExpiredSignature) => {
                return Err(TokenError::Expired.into());
            }
            Err(e) => {
                // The agent is told only that the token is refused; the
                // operator wiring up an issuer needs to know why (a wrong
                // audience, a future nbf, a bad signature). The error
                // names a claim or a check, never the token.
                tracing::info!(cause = ?e.kind(), "workload token refused");
                return Err(TokenError::Invalid.into());
            }
        };
        let workload = claims
            .get(&self.config.claim)
            .and_then(|v| v.as_str())
            .ok_or(IdentityError::UnknownWorkload)?;
        let agent = self
            .config
            .map
            .get(workload)
            .ok_or(IdentityError::UnknownWorkload)?
            .clone();
        let jti = claims
            .get("jti")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let iat = claims.get("iat").and_then(|v| v.as_u64()).unwrap_or(0);
        let exp = claims.get("exp").and_then(|v| v.as_u64()).unwrap_or(0);
        let session = format!("oidc:{workload}");
        let values = claims.as_object().map(claim_values).unwrap_or_default();
        let revocable = Claims {
            iss: self.config.issuer.clone(),
            sub: agent.clone(),
            sid: session.clone(),
            jti: jti.clone().unwrap_or_default(),
            iat,
            exp,
            iat_ms: iat.saturating_mul(1000),
        };
        let agent = Agent {
            name: agent,
            session,
            token_id: jti,
            claims: Some(Arc::new(values)),
        };
        let mut verified = self.lock_verified();
        if verified.len() >= VERIFIED_CACHE {
            verified.clear();
        }
        verified.insert(
            self.cache_key(token),
            Verified {
                token: token.into(),
                keys: key_set.clone(),
                agent: agent.clone(),
                claims: revocable.clone(),
            },
        );
        Ok((agent, revocable))
    }

    /// What `token` verified as, if it did against the key set `keys`, as
    /// long as those keys are not stale.
    fn cached(&self, token: &str, keys: &Arc<Result<JwkSet, String>>) -> Option<(Agent, Claims)> {
        if matches!(self.config.jwks, JwksSource::Url(_))
            && self.loaded.load().elapsed() > MAX_KEY_AGE
        {
            return None;
        }
        self.lock_verified()
            .get(&self.cache_key(token))
            .filter(|v| *v.token == *token && Arc::ptr_eq(&v.keys, keys))
            .map(|v| (v.agent.clone(), v.claims.clone()))
    }

    fn cache_key(&self, token: &str) -> u64 {
        let tail = &token.as_bytes()[token.len().saturating_sub(CACHE_KEY_BYTES)..];
        self.cache_hasher.hash_one(tail)
    }

    fn lock_verified(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Verified>> {
        // The map holds no invariant a panicking holder could break.
        self.verified.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Each claim's values as rules compare them: a string or number as
/// itself, a list as its scalar elements; objects and nulls match nothing.
fn claim_values(object: &serde_json::Map<String, serde_json::Value>) -> ClaimValues {
    fn scalar(value: &serde_json::Value) -> Option<String> {
        match value {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            serde_json::Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }
    object
        .iter()
        .map(|(name, value)| {
            let values = match value {
                serde_json::Value::Array(items) => items.iter().filter_map(scalar).collect(),
                other => scalar(other).into_iter().collect(),
            };
            (name.clone(), values)
        })
        .filter(|(_, values): &(String, Vec<String>)| !values.is_empty())
        .collect()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The key for `kid` (or the only key, when the token names none), of the
/// family `alg` needs; never a symmetric key.
fn pick_key<'a>(keys: &'a JwkSet, kid: Option<&str>, alg: Algorithm) -> Option<&'a Jwk> {
    let usable = |jwk: &&Jwk| {
        // A key published for encryption is not one to trust signatures to.
        let for_signing = jwk
            .common
            .public_key_use
            .as_ref()
            .is_none_or(|u| *u == PublicKeyUse::Signature);
        let family = match &jwk.algorithm {
            // NIST SP 800-131A: RSA under 2048 bits is not to be trusted.
            AlgorithmParameters::RSA(rsa) => alg == Algorithm::RS256 && rsa_bits(&rsa.n) >= 2048,
            AlgorithmParameters::EllipticCurve(_) => alg == Algorithm::ES256,
            AlgorithmParameters::OctetKeyPair(_) => alg == Algorithm::EdDSA,
            AlgorithmParameters::OctetKey(_) => false,
        };
        let declared = jwk.common.key_algorithm.is_none_or(|a| match a {
            KeyAlgorithm::RS256 => alg == Algorithm::RS256,
            KeyAlgorithm::ES256 => alg == Algorithm::ES256,
            KeyAlgorithm::EdDSA => alg == Algorithm::EdDSA,
            _ => false,
        });
        for_signing && family && declared
    };
    match kid {
        Some(kid) => keys
            .keys
            .iter()
            .filter(|k| k.common.key_id.as_deref() == Some(kid))
            .find(usable),
        None => {
            let mut candidates = keys.keys.iter().filter(usable);
            let only = candidates.next()?;
            candidates.next().is_none().then_some(only)
        }
    }
}

pub fn read_jwks(path: &std::path::Path) -> Result<JwkSet, String> {
    let text = crate::state::read_limited(path, crate::state::MAX_OPERATOR_FILE).map_err(|e| {
        format!(
            "cannot read {}: {}",
            path.display(),
            crate::config::describe_io(&e)
        )
    })?;
    parse_jwks(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The size of an RSA modulus given base64url-encoded, as in a JWK.
fn rsa_bits(modulus: &str) -> usize {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(modulus.trim_end_matches('='))
        .unwrap_or_default();
    let significant = bytes.iter().skip_while(|&&b| b == 0).count();
    significant * 8
}

pub fn parse_jwks(bytes: &[u8]) -> Result<JwkSet, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("not a JWK set: {e}"))
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use jsonwebtoken::{EncodingKey, Header};

    use super::*;

    const ISSUER: &str = "https://issuer.test";

    /// A P-256 signing key and the key set that publishes it as `kid`.
    fn key(kid: &str) -> (EncodingKey, JwkSet) {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let point = pair.public_key_raw();
        let set = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256",
            "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65]),
        }]});
        (
            EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
            serde_json::from_value(set).unwrap(),
        )
    }

    fn verifier(keys: JwkSet) -> OidcVerifier {
        let verifier = OidcVerifier::new(
            OidcConfig {
                issuer: ISSUER.into(),
                audience: "sidekey".into(),
                jwks: JwksSource::Url("https://issuer.test/keys".into()),
                claim: "sub".into(),
                map: [("w".to_string(), "coder".to_string())].into(),
            },
            None,
        );
        verifier.set_keys(Ok(keys));
        verifier
    }

    fn verify(verifier: &OidcVerifier, token: &str) -> Result<(Agent, Claims), IdentityError> {
        verifier
            .verify_if_ours(token)
            .expect("a token of this issuer")
    }

    fn sign(key: &EncodingKey, kid: &str, sub: &str) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.into());
        let claims = serde_json::json!({
            "iss": ISSUER, "aud": "sidekey", "sub": sub, "exp": unix_now() + 300,
        });
        jsonwebtoken::encode(&header, &claims, key).unwrap()
    }

    #[test]
    fn keys_for_encryption_and_short_rsa_keys_vouch_for_nothing() {
        let (signing, keys) = key("k1");
        let mut for_encryption = serde_json::to_value(&keys).unwrap();
        for_encryption["keys"][0]["use"] = "enc".into();
        let refusing = verifier(serde_json::from_value(for_encryption).unwrap());
        assert!(verify(&refusing, &sign(&signing, "k1", "w")).is_err());
        let mut for_signing = serde_json::to_value(&keys).unwrap();
        for_signing["keys"][0]["use"] = "sig".into();
        let accepting = verifier(serde_json::from_value(for_signing).unwrap());
        assert!(verify(&accepting, &sign(&signing, "k1", "w")).is_ok());

        // Modulus sizes as a JWK gives them (leading zero bytes do not count).
        let modulus = |bytes: usize| B64.encode([&[0u8][..], &vec![0xc5; bytes]].concat());
        assert_eq!(rsa_bits(&modulus(128)), 1024);
        assert_eq!(rsa_bits(&modulus(256)), 2048);
        let rsa = |bits: usize| {
            serde_json::from_value::<JwkSet>(serde_json::json!({"keys": [{
                "kty": "RSA", "kid": "r", "n": modulus(bits / 8), "e": "AQAB",
            }]}))
            .unwrap()
        };
        assert!(pick_key(&rsa(1024), Some("r"), Algorithm::RS256).is_none());
        assert!(pick_key(&rsa(2048), Some("r"), Algorithm::RS256).is_some());
    }

    #[test]
    fn a_key_removed_from_the_set_vouches_for_no_cached_token() {
        let (signing, keys) = key("k1");
        let verifier = verifier(keys);
        let token = sign(&signing, "k1", "w");
        assert_eq!(verify(&verifier, &token).unwrap().0.name, "coder");
        assert!(
            verifier
                .cached(&token, &verifier.keys.load_full())
                .is_some()
        );

        // A check that was under way when the set changed caches its result
        // under the old set, which no longer counts.
        let (_, rotated) = key("k2");
        let before = verifier.keys.load_full();
        verifier.set_keys(Ok(rotated));
        verifier.verify(&token, before).unwrap();
        assert!(matches!(
            verify(&verifier, &token),
            Err(IdentityError::Token(TokenError::Invalid))
        ));
    }

    #[test]
    fn a_cached_token_still_expires_and_its_signature_vouches_for_no_other_payload() {
        let (signing, keys) = key("k1");
        let verifier = verifier(keys.clone());
        let token = sign(&signing, "k1", "w");
        verify(&verifier, &token).unwrap();
        // The same key set fetched again keeps what it verified.
        verifier.set_keys(Ok(keys));
        assert!(
            verifier
                .cached(&token, &verifier.keys.load_full())
                .is_some()
        );

        // Same signature, so the same cache key; the payload names another workload.
        let (head, rest) = token.split_once('.').unwrap();
        let signature = rest.split_once('.').unwrap().1;
        let other = B64.encode(
            serde_json::json!({"iss": ISSUER, "aud": "sidekey", "sub": "w2", "exp": unix_now() + 300})
                .to_string(),
        );
        let forged = format!("{head}.{other}.{signature}");
        assert_eq!(verifier.cache_key(&forged), verifier.cache_key(&token));
        assert!(verify(&verifier, &forged).is_err());

        // Past its expiry and the clock-skew allowance, a cached token is refused.
        for entry in verifier.lock_verified().values_mut() {
            entry.claims.exp = unix_now() - LEEWAY_SECS - 1;
        }
        assert!(matches!(
            verify(&verifier, &token),
            Err(IdentityError::Token(TokenError::Expired))
        ));
    }
}
