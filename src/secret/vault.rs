//! `source = "vault:MOUNT/PATH#FIELD"`: a field of a Vault KV v2 secret,
//! read with the token `[vault] token` names, and read again after
//! `[vault] ttl` so a rotation in Vault reaches sidekey.

use std::time::Duration;

use crate::config::{Config, VaultAuth, VaultConfig};
use crate::secret::Secret;

const TIMEOUT: Duration = Duration::from_secs(10);

/// `secret/agents/openai#api_key` (or with `data/` already in the path) ->
/// (`secret/data/agents/openai`, `api_key`).
pub fn parse_source(spec: &str) -> Result<(String, String), String> {
    let (path, field) = spec
        .split_once('#')
        .ok_or_else(|| format!("vault:{spec} needs #FIELD"))?;
    let segments: Vec<&str> = path.split('/').collect();
    let plain = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    if segments.len() < 2 || !segments.iter().all(|s| plain(s)) || field.is_empty() {
        return Err(format!(
            "vault:{spec} is not MOUNT/PATH#FIELD (letters, digits, `-`, `_`, `.`)"
        ));
    }
    let api_path = if segments[1] == "data" {
        path.to_string()
    } else {
        format!("{}/data/{}", segments[0], segments[1..].join("/"))
    };
    Ok((api_path, field.to_string()))
}

/// Reads one field, logging in first with AppRole if configured (`credential`
/// is then the secret id, else the token). Runs its own small runtime on a
/// scoped thread, so it can be called from anywhere, the async runtime included.
pub fn read(
    config: &Config,
    vault: &VaultConfig,
    credential: &Secret,
    path: &str,
    field: &str,
) -> Result<Secret, String> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("cannot start a runtime for Vault: {e}"))?;
                runtime.block_on(async {
                    let extra: Vec<std::path::PathBuf> = vault.ca.iter().cloned().collect();
                    let client = &crate::proxy::upstream::service_client(config, &extra)
                        .map_err(|e| e.to_string())?;
                    let token = match &vault.auth {
                        VaultAuth::Token(_) => Secret::new(credential.expose().to_string()),
                        VaultAuth::AppRole { role_id, .. } => {
                            login(client, vault, role_id, credential).await?
                        }
                    };
                    fetch(client, vault, &token, path, field).await
                })
            })
            .join()
            .map_err(|_| "the Vault read failed".to_string())?
    })
}

type Client = crate::proxy::pool::Upstream;

/// AppRole login: a short-lived client token for this load.
async fn login(
    client: &Client,
    vault: &VaultConfig,
    role_id: &str,
    secret_id: &Secret,
) -> Result<Secret, String> {
    let base = vault.addr.to_string();
    let url = format!("{}/v1/auth/approle/login", base.trim_end_matches('/'));
    let body = zeroize::Zeroizing::new(
        serde_json::json!({"role_id": role_id, "secret_id": secret_id.expose()}).to_string(),
    );
    let req = http::Request::post(&url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(crate::proxy::body::full(bytes::Bytes::from(
            body.as_bytes().to_vec(),
        )))
        .map_err(|_| format!("invalid Vault URL {url}"))?;
    let json = send(client, req, &base, "AppRole login").await?;
    let token = json["auth"]["client_token"]
        .as_str()
        .ok_or("the AppRole login returned no client_token")?;
    Ok(Secret::new(token.to_string()))
}

async fn send(
    client: &Client,
    req: http::Request<crate::proxy::body::Body>,
    base: &str,
    what: &str,
) -> Result<serde_json::Value, String> {
    let body = crate::proxy::upstream::call_service(client, req, TIMEOUT, 1024 * 1024)
        .await
        .map_err(|e| format!("Vault at {base}, {what}: {e}"))?;
    serde_json::from_slice(&body).map_err(|_| format!("Vault sent no JSON for {what}"))
}

async fn fetch(
    client: &Client,
    vault: &VaultConfig,
    token: &Secret,
    path: &str,
    field: &str,
) -> Result<Secret, String> {
    let base = vault.addr.to_string();
    let url = format!("{}/v1/{path}", base.trim_end_matches('/'));
    let mut header = http::HeaderValue::from_str(token.expose())
        .map_err(|_| "the Vault token is not header-safe".to_string())?;
    header.set_sensitive(true);
    let req = http::Request::get(&url)
        .header("x-vault-token", header)
        .body(crate::proxy::body::empty())
        .map_err(|_| format!("invalid Vault URL {url}"))?;
    let json = send(client, req, &base, path).await?;
    let value = json["data"]["data"][field]
        .as_str()
        .ok_or_else(|| format!("{path} has no string field {field:?}"))?;
    Ok(Secret::new(value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        assert_eq!(
            parse_source("secret/agents/openai#api_key").unwrap(),
            ("secret/data/agents/openai".into(), "api_key".into())
        );
        assert_eq!(
            parse_source("secret/data/agents/openai#api_key").unwrap(),
            ("secret/data/agents/openai".into(), "api_key".into())
        );
        for bad in [
            "secret#x",
            "secret/a",
            "secret/../x#k",
            "secret/a#",
            "/a/b#k",
        ] {
            assert!(parse_source(bad).is_err(), "{bad}");
        }
    }
}
