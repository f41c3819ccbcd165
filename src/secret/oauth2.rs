//! Access tokens from an OAuth 2 token endpoint (client-credentials grant),
//! cached until shortly before they expire, fetched once for many
//! concurrent requests.
//!
//! A token is a credential like any other: injected only into its route's
//! requests, scrubbed from responses, never logged. An endpoint that fails
//! leaves the request failing closed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http_body_util::BodyExt;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use zeroize::Zeroizing;

use crate::config::OAuth2;
use crate::proxy::upstream::UpstreamClient;
use crate::scrub::{Scrubber, variants};
use crate::secret::Secret;

/// A token is renewed this long before it expires.
const RENEW_BEFORE: Duration = Duration::from_secs(30);
/// When the endpoint does not say (`expires_in` absent).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
const TIMEOUT: Duration = Duration::from_secs(10);

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

/// One access token and the scrubber that covers it.
#[derive(Debug)]
pub struct AccessToken {
    pub token: Arc<Secret>,
    expires: Instant,
    patterns: Vec<Zeroizing<Vec<u8>>>,
    /// The held secrets' scrubber extended with this token, for the
    /// scrubber it was built from (compared by pointer).
    scrubber: Mutex<Option<(usize, Arc<Scrubber>)>>,
}

impl AccessToken {
    /// `base` plus this token's forms.
    pub fn scrubber(&self, base: &Arc<Scrubber>) -> Result<Arc<Scrubber>, String> {
        let key = Arc::as_ptr(base) as usize;
        let mut slot = self.scrubber.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((built_for, scrubber)) = slot.as_ref()
            && *built_for == key
        {
            return Ok(scrubber.clone());
        }
        let scrubber = Arc::new(
            base.extended(self.patterns.iter().cloned())
                .map_err(|e| format!("cannot build the scrubber: {e}"))?,
        );
        *slot = Some((key, scrubber.clone()));
        Ok(scrubber)
    }
}

/// One cache slot; its async lock is what makes concurrent callers share a fetch.
type Slot = Arc<tokio::sync::Mutex<Option<Arc<AccessToken>>>>;

/// Tokens by endpoint, client and scope.
#[derive(Debug, Default)]
pub struct TokenCache {
    entries: Mutex<HashMap<String, Slot>>,
}

impl TokenCache {
    /// A valid token for `config`, fetched if the cached one is missing or
    /// about to expire. Concurrent callers wait for one fetch.
    pub async fn token(
        &self,
        config: &OAuth2,
        client_secret: &Secret,
        client: &UpstreamClient,
    ) -> Result<Arc<AccessToken>, String> {
        let key = format!(
            "{}|{}|{}|{}",
            config.token_url,
            config.client_id,
            config.scope.as_deref().unwrap_or(""),
            config.audience.as_deref().unwrap_or("")
        );
        let entry = {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            entries.entry(key).or_default().clone()
        };
        let mut slot = entry.lock().await;
        if let Some(token) = slot.as_ref()
            && token.expires > Instant::now() + RENEW_BEFORE
        {
            return Ok(token.clone());
        }
        let token = Arc::new(fetch(config, client_secret, client).await?);
        *slot = Some(token.clone());
        Ok(token)
    }
}

async fn fetch(
    config: &OAuth2,
    client_secret: &Secret,
    client: &UpstreamClient,
) -> Result<AccessToken, String> {
    let url = &config.token_url;
    // RFC 6749 §2.3.1: both parts form-encoded, then Basic.
    let pair = Zeroizing::new(format!(
        "{}:{}",
        form_encode(&config.client_id),
        Zeroizing::new(form_encode(client_secret.expose())).as_str()
    ));
    let basic = Zeroizing::new(format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair.as_bytes())
    ));
    let mut form = String::from("grant_type=client_credentials");
    for (name, value) in [("scope", &config.scope), ("audience", &config.audience)] {
        if let Some(value) = value {
            form.push_str(&format!("&{name}={}", form_encode(value)));
        }
    }
    let mut authorization = http::HeaderValue::from_str(&basic)
        .map_err(|_| "client credentials are not header-safe")?;
    authorization.set_sensitive(true);
    let req = http::Request::post(url.clone())
        .header(
            http::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .header(http::header::ACCEPT, "application/json")
        .header(http::header::AUTHORIZATION, authorization)
        .body(crate::proxy::body::full(Bytes::from(form)))
        .map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(TIMEOUT, client.request(req))
        .await
        .map_err(|_| format!("token endpoint {url} timed out"))?
        .map_err(|e| format!("token endpoint {url}: {e}"))?;
    let status = response.status();
    let body = http_body_util::Limited::new(response.into_body(), 64 * 1024)
        .collect()
        .await
        .map_err(|e| format!("token endpoint {url}: {e}"))?
        .to_bytes();
    if !status.is_success() {
        return Err(format!("token endpoint {url} answered {status}"));
    }
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
    let lifetime = grant
        .expires_in
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_LIFETIME);
    Ok(AccessToken {
        patterns: variants(&token, None),
        token: Arc::new(token),
        expires: Instant::now() + lifetime,
        scrubber: Mutex::new(None),
    })
}
