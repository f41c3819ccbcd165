//! `[routes.NAME]`: an upstream origin and its injection, checked.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::raw::{Checker, valid_name};
use super::{Route, Upstream};
use crate::secret::source::SecretSource;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    upstream: Option<String>,
    inject: Option<super::inject::RawInject>,
    placeholder_env: Option<String>,
    #[serde(default)]
    allow_private: bool,
    /// A provider preset that fills upstream and injection.
    preset: Option<String>,
    /// With a preset: the secret it injects.
    secret: Option<String>,
}

pub(super) fn check_route(
    c: &mut Checker,
    name: &str,
    raw: RawRoute,
    secrets: &BTreeMap<String, SecretSource>,
) -> Option<Route> {
    let at = format!("routes.{name}");
    // The route name is the first path segment of the reverse gateway.
    if !valid_name(name) || name == "." || name == ".." {
        c.fail(&at, "route names use letters, digits, `-`, `_` and `.`");
    }
    let mut raw = raw;
    match (&raw.preset, &raw.secret) {
        (Some(preset), _) if preset == "bedrock" => {
            // Bedrock is signed, not keyed: the route names its SigV4 keys
            // and region; the preset fills the service and the endpoint.
            match raw.inject.as_mut().and_then(|i| i.aws_sigv4.as_mut()) {
                Some(sigv4) => {
                    sigv4.service.get_or_insert_with(|| "bedrock".to_string());
                    let endpoint = format!("https://bedrock-runtime.{}.amazonaws.com", sigv4.region);
                    raw.upstream = raw.upstream.take().or(Some(endpoint));
                    raw.placeholder_env = raw
                        .placeholder_env
                        .take()
                        .or(Some("AWS_ACCESS_KEY_ID".to_string()));
                }
                None => c.fail(
                    format!("{at}.inject"),
                    "preset \"bedrock\" needs inject = { aws_sigv4 = { region, access_key_id, secret_access_key } }",
                ),
            }
        }
        (Some(preset), secret) => match super::preset::fill(preset) {
            Ok(filled) => {
                raw.upstream = raw.upstream.take().or(filled.upstream);
                raw.placeholder_env = raw.placeholder_env.take().or(filled.placeholder_env);
                if raw.inject.is_none() {
                    match (secret, filled.header) {
                        (Some(secret), Some((header, format))) => {
                            raw.inject = Some(super::inject::RawInject {
                                header: Some(header),
                                format: Some(format),
                                secret: Some(secret.clone()),
                                ..Default::default()
                            });
                        }
                        _ => c.fail(
                            format!("{at}.secret"),
                            "missing: name the secret the preset injects",
                        ),
                    }
                } else if secret.is_some() {
                    c.fail(
                        format!("{at}.secret"),
                        "give `secret` or `inject`, not both",
                    );
                }
            }
            Err(message) => c.fail(format!("{at}.preset"), message),
        },
        (None, Some(_)) => c.fail(
            format!("{at}.secret"),
            "`secret` goes with `preset`; otherwise name it in `inject`",
        ),
        (None, None) => {}
    }
    let upstream = match raw.upstream.as_deref() {
        None => {
            c.fail(
                format!("{at}.upstream"),
                "missing: the origin this route forwards to",
            );
            None
        }
        Some(text) => match parse_upstream(text) {
            Ok(u) => Some(u),
            Err(message) => {
                c.fail(format!("{at}.upstream"), message);
                None
            }
        },
    };
    let inject = raw
        .inject
        .and_then(|inject| super::inject::check(c, &at, inject, secrets));
    if let Some(var) = &raw.placeholder_env {
        let valid = !var.is_empty()
            && var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !var.as_bytes()[0].is_ascii_digit();
        if !valid {
            c.fail(
                format!("{at}.placeholder_env"),
                format!("invalid environment variable name {var:?}"),
            );
        }
    }
    Some(Route {
        name: name.to_string(),
        upstream: upstream?,
        inject,
        placeholder_env: raw.placeholder_env,
        allow_private: raw.allow_private,
    })
}

/// Parses `http(s)://host[:port][/base]`.
fn parse_upstream(text: &str) -> Result<Upstream, String> {
    let uri: http::Uri = text.parse().map_err(|_| format!("invalid URL {text:?}"))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(format!("{text:?} must start with http:// or https://")),
    };
    let authority = uri
        .authority()
        .ok_or_else(|| format!("{text:?} has no host"))?;
    if authority.as_str().contains('@') {
        return Err(format!("{text:?} must not contain user info; use `inject`"));
    }
    if uri.query().is_some() || text.contains('#') {
        return Err(format!("{text:?} must not have a query or fragment"));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    if host.is_empty() {
        return Err(format!("{text:?} has no host"));
    }
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let base_path = uri.path().trim_end_matches('/').to_string();
    if base_path.split('/').any(|s| s == ".." || s == ".") || base_path.contains('%') {
        return Err(format!("{text:?} has a path that is not plain"));
    }
    Ok(Upstream {
        https,
        host,
        port,
        base_path,
    })
}
