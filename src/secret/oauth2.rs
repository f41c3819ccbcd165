//! Access tokens from an OAuth 2 token endpoint (client-credentials grant,
//! or a Google service-account key's JWT-bearer grant),
//! cached until shortly before they expire, fetched once for many
//! concurrent requests.
//!
//! A token is a credential like any other: injected only into its route's
//! requests, scrubbed from responses, never logged. An endpoint that fails
//! leaves the request failing closed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use zeroize::Zeroizing;

use crate::config::{OAuth2, TokenGrant};
use crate::proxy::pool::Upstream;
use crate::scrub::{Scrubber, variants};
use crate::secret::Secret;

/// A token is renewed this long before it expires.
const RENEW_BEFORE: Duration = Duration::from_secs(30);
/// When the endpoint does not say (`expires_in` absent).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
const TIMEOUT: Duration = Duration::from_secs(10);
/// Exchanged tokens are cached per agent token; the cache starts over past this.
const MAX_ENTRIES: usize = 10_000;
/// Tokens are fetched again at least daily, whatever the endpoint says.
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// application/x-www-form-urlencoded keeps `*-._`; a space becomes `+`.
const FORM: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'*')
    .remove(b'-')
    .remove(b'.')
    .remove(b'_');

fn form_encode(value: &str) -> String {
    utf8_percent_encode(value, FORM)
        .to_string()
        .replace("%20", "+")
}

/// One access token, with the forms the scrubber looks for.
#[derive(Debug)]
pub struct AccessToken {
    pub token: Arc<Secret>,
    expires: Instant,
    patterns: Vec<Zeroizing<Vec<u8>>>,
}

/// One cache slot; its async lock is what makes concurrent callers share a fetch.
type Slot = Arc<tokio::sync::Mutex<Option<Arc<AccessToken>>>>;

/// Tokens by endpoint, client and scope.
#[derive(Debug, Default)]
pub struct TokenCache {
    entries: Mutex<HashMap<String, Slot>>,
    issued: Mutex<Issued>,
    /// How many tokens `issued` holds, read without its lock: a config
    /// without OAuth2 pays nothing per response.
    issued_count: AtomicUsize,
}

/// Every token this process obtained that may still be valid: each is
/// scrubbed from every response, whoever it was obtained for, and after
/// it was renewed, until it expires. One agent's exchanged token must not
/// reach another agent through an upstream that echoes what it was sent.
#[derive(Debug, Default)]
struct Issued {
    tokens: Vec<Arc<AccessToken>>,
    /// The earliest time a token in `tokens` may be dropped.
    next_expiry: Option<Instant>,
    /// Bumped whenever `tokens` changes.
    generation: u64,
    /// The last scrubber built: for which base (by pointer) and generation.
    built: Option<(usize, u64, Arc<Scrubber>)>,
}

/// A token is still scrubbed this long after its expiry by our clock: the
/// endpoint's clock may be behind.
const SCRUB_AFTER_EXPIRY: Duration = Duration::from_secs(60);

impl Issued {
    fn add(&mut self, token: Arc<AccessToken>) {
        let until = token.expires + SCRUB_AFTER_EXPIRY;
        self.next_expiry = Some(self.next_expiry.map_or(until, |t| t.min(until)));
        self.tokens.push(token);
        self.generation += 1;
    }

    fn drop_expired(&mut self, now: Instant) {
        if self.next_expiry.is_none_or(|t| t > now) {
            return;
        }
        self.tokens.retain(|t| t.expires + SCRUB_AFTER_EXPIRY > now);
        self.next_expiry = self
            .tokens
            .iter()
            .map(|t| t.expires + SCRUB_AFTER_EXPIRY)
            .min();
        self.generation += 1;
    }
}

impl TokenCache {
    /// `base` (the held secrets' scrubber) plus every token this process
    /// obtained that may still be valid.
    pub fn scrubber(&self, base: &Arc<Scrubber>) -> Result<Arc<Scrubber>, String> {
        if self.issued_count.load(Ordering::Acquire) == 0 {
            return Ok(base.clone());
        }
        let mut issued = self.issued.lock().unwrap_or_else(|p| p.into_inner());
        issued.drop_expired(Instant::now());
        self.issued_count
            .store(issued.tokens.len(), Ordering::Release);
        let key = Arc::as_ptr(base) as usize;
        if let Some((built_for, generation, scrubber)) = issued.built.as_ref()
            && *built_for == key
            && *generation == issued.generation
        {
            return Ok(scrubber.clone());
        }
        let patterns = issued
            .tokens
            .iter()
            .flat_map(|t| t.patterns.iter().cloned());
        let scrubber = Arc::new(
            base.extended(patterns)
                .map_err(|e| format!("cannot build the scrubber: {e}"))?,
        );
        issued.built = Some((key, issued.generation, scrubber.clone()));
        Ok(scrubber)
    }

    /// The upstream refused `token` (401): the identity provider may have
    /// revoked it early, so the next request fetches a new one rather than
    /// inject it until it expires. Only if it is still the cached one: a
    /// token fetched since is kept. Still scrubbed until it expires.
    pub fn forget(
        &self,
        grant: &TokenGrant,
        secret_name: &str,
        subject: &str,
        token: &Arc<AccessToken>,
    ) {
        let key = cache_key(grant, secret_name, subject);
        let entry = self
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        // A fetch under way holds the slot; what it brings is new anyway.
        if let Some(entry) = entry
            && let Ok(mut slot) = entry.try_lock()
            && slot
                .as_ref()
                .is_some_and(|cached| Arc::ptr_eq(cached, token))
        {
            *slot = None;
        }
    }

    fn remember(&self, token: &Arc<AccessToken>) {
        let mut issued = self.issued.lock().unwrap_or_else(|p| p.into_inner());
        issued.add(token.clone());
        self.issued_count
            .store(issued.tokens.len(), Ordering::Release);
    }

    /// A valid token for `config`, fetched if the cached one is missing or
    /// about to expire. Concurrent callers wait for one fetch.
    pub async fn token(
        &self,
        grant: &TokenGrant,
        secret_name: &str,
        secret: &Secret,
        subject: &str,
        client: &Upstream,
    ) -> Result<Arc<AccessToken>, String> {
        let exchange = matches!(grant, TokenGrant::ClientCredentials(c) if c.exchange);
        if exchange && subject.is_empty() {
            return Err("token exchange needs the agent to present a token".to_string());
        }
        let key = cache_key(grant, secret_name, subject);
        let entry = {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
            entries.entry(key).or_default().clone()
        };
        let mut slot = entry.lock().await;
        if let Some(token) = slot.as_ref()
            && token.expires > Instant::now() + RENEW_BEFORE
        {
            return Ok(token.clone());
        }
        // A token that is still valid but inside the renewal margin is used
        // if fetching a new one fails; after expiry it never is.
        let current = slot
            .as_ref()
            .filter(|t| t.expires > Instant::now())
            .cloned();
        let fetched = match grant {
            TokenGrant::ClientCredentials(config) => {
                client_credentials(config, secret, subject, client).await
            }
            TokenGrant::GcpServiceAccount { scopes } => {
                gcp_service_account(scopes, secret, client).await
            }
        };
        let token = match (fetched, current) {
            (Ok(token), _) => Arc::new(token),
            (Err(e), Some(current)) => {
                tracing::warn!(error = %e, "token renewal failed; the current token is still valid");
                return Ok(current);
            }
            (Err(e), None) => return Err(e),
        };
        self.remember(&token);
        *slot = Some(token.clone());
        Ok(token)
    }
}

/// One entry per grant; an exchanged token belongs to its subject, so one
/// per agent token.
fn cache_key(grant: &TokenGrant, secret_name: &str, subject: &str) -> String {
    match grant {
        TokenGrant::ClientCredentials(c) if c.exchange => {
            format!("{secret_name}|{grant:?}|{subject}")
        }
        _ => format!("{secret_name}|{grant:?}"),
    }
}

/// RFC 6749 §4.4, or RFC 8693 token exchange with `subject` (the agent's
/// token) as the subject token; the client authenticated with HTTP Basic.
async fn client_credentials(
    config: &OAuth2,
    client_secret: &Secret,
    subject: &str,
    client: &Upstream,
) -> Result<AccessToken, String> {
    let pair = Zeroizing::new(format!(
        "{}:{}",
        form_encode(&config.client_id),
        Zeroizing::new(form_encode(client_secret.expose())).as_str()
    ));
    let basic = Zeroizing::new(format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair.as_bytes())
    ));
    let mut authorization = http::HeaderValue::from_str(&basic)
        .map_err(|_| "client credentials are not header-safe")?;
    authorization.set_sensitive(true);
    let mut form = if config.exchange {
        format!(
            "grant_type={}&subject_token={}&subject_token_type={}",
            form_encode("urn:ietf:params:oauth:grant-type:token-exchange"),
            form_encode(subject),
            form_encode("urn:ietf:params:oauth:token-type:jwt")
        )
    } else {
        String::from("grant_type=client_credentials")
    };
    for (name, value) in [("scope", &config.scope), ("audience", &config.audience)] {
        if let Some(value) = value {
            form.push_str(&format!("&{name}={}", form_encode(value)));
        }
    }
    post_for_token(&config.token_url, Some(authorization), form, client).await
}

/// A Google service-account key turned into an access token: a JWT signed
/// with the key, exchanged at the key's `token_uri` (RFC 7523).
async fn gcp_service_account(
    scopes: &[String],
    key_json: &Secret,
    client: &Upstream,
) -> Result<AccessToken, String> {
    #[derive(serde::Deserialize)]
    struct Key {
        client_email: String,
        private_key: String,
        private_key_id: Option<String>,
        token_uri: String,
    }
    let key: Key = serde_json::from_str(key_json.expose())
        .map_err(|_| "the secret is not a service-account JSON key".to_string())?;
    let private_key = Zeroizing::new(key.private_key);
    let token_uri: http::Uri = key
        .token_uri
        .parse()
        .ok()
        .filter(|u: &http::Uri| matches!(u.scheme_str(), Some("https" | "http")))
        .ok_or("the key's token_uri is not an http(s) URL")?;
    let signing = jsonwebtoken::EncodingKey::from_rsa_pem(private_key.as_bytes())
        .map_err(|_| "the key's private_key is not an RSA key".to_string())?;
    let now = crate::secret::store::now_ms() / 1000;
    let claims = serde_json::json!({
        "iss": key.client_email,
        "scope": scopes.join(" "),
        "aud": key.token_uri,
        "iat": now,
        "exp": now + 3600,
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = key.private_key_id;
    let assertion = Zeroizing::new(
        jsonwebtoken::encode(&header, &claims, &signing)
            .map_err(|_| "cannot sign the service-account assertion".to_string())?,
    );
    let form = format!(
        "grant_type={}&assertion={}",
        form_encode("urn:ietf:params:oauth:grant-type:jwt-bearer"),
        assertion.as_str()
    );
    post_for_token(&token_uri, None, form, client).await
}

async fn post_for_token(
    url: &http::Uri,
    authorization: Option<http::HeaderValue>,
    form: String,
    client: &Upstream,
) -> Result<AccessToken, String> {
    let mut req = http::Request::post(url.clone())
        .header(
            http::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .header(http::header::ACCEPT, "application/json");
    if let Some(authorization) = authorization {
        req = req.header(http::header::AUTHORIZATION, authorization);
    }
    let req = req
        .body(crate::proxy::body::full(Bytes::from(form)))
        .map_err(|e| e.to_string())?;
    let body = crate::proxy::upstream::call_service(client, req, TIMEOUT, 64 * 1024)
        .await
        .map_err(|e| format!("token endpoint {url}: {e}"))?;
    #[derive(serde::Deserialize)]
    struct Grant {
        access_token: String,
        expires_in: Option<u64>,
    }
    let grant: Grant = serde_json::from_slice(&body)
        .map_err(|_| format!("token endpoint {url} sent no access_token"))?;
    let token = Secret::new(grant.access_token);
    if token.expose().is_empty() {
        return Err(format!("token endpoint {url} sent an empty access_token"));
    }
    // Bounded both ways: a huge expires_in must not overflow, and one
    // shorter than the renewal margin still serves the request at hand.
    let lifetime = grant
        .expires_in
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_LIFETIME)
        .min(MAX_LIFETIME);
    let now = Instant::now();
    Ok(AccessToken {
        patterns: variants(&token, None),
        token: Arc::new(token),
        expires: now.checked_add(lifetime).unwrap_or(now),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(value: &str, expires: Instant) -> Arc<AccessToken> {
        let token = Secret::new(value.to_string());
        Arc::new(AccessToken {
            patterns: variants(&token, None),
            token: Arc::new(token),
            expires,
        })
    }

    #[test]
    fn every_token_obtained_is_scrubbed_until_it_has_expired() {
        let cache = TokenCache::default();
        let base = Arc::new(Scrubber::default());
        // Nothing obtained: the base itself, no scrubber built.
        assert!(Arc::ptr_eq(&cache.scrubber(&base).unwrap(), &base));

        let now = Instant::now();
        cache.remember(&token(
            "at-live-for-an-hour",
            now + Duration::from_secs(3600),
        ));
        cache.remember(&token("at-expired-long-ago", now - SCRUB_AFTER_EXPIRY * 2));
        cache.remember(&token("at-expired-just-now", now - Duration::from_secs(1)));
        let scrubber = cache.scrubber(&base).unwrap();
        let seen = b"at-live-for-an-hour at-expired-long-ago at-expired-just-now";
        let (out, count) = scrubber.scrub_all(seen).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "[REDACTED] at-expired-long-ago [REDACTED]"
        );
        assert_eq!(count, 2);
        // Built once per change, then shared.
        assert!(Arc::ptr_eq(&cache.scrubber(&base).unwrap(), &scrubber));
    }
}
