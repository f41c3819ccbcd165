//! `inject = { … }`: how a route's credential is placed, checked.

use std::collections::BTreeMap;

use http::HeaderName;
use serde::Deserialize;

use super::raw::Checker;
use super::{Injection, OAuth2, Slot, TokenGrant};
use crate::secret::source::SecretSource;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawInject {
    pub(super) header: Option<String>,
    pub(super) format: Option<String>,
    pub(super) query: Option<String>,
    pub(super) basic: Option<RawBasic>,
    pub(super) oauth2: Option<RawOAuth2>,
    pub(super) gcp_service_account: Option<RawGcp>,
    pub(super) aws_sigv4: Option<RawSigV4>,
    pub(super) secret: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBasic {
    username: String,
    secret: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSigV4 {
    pub(super) service: Option<String>,
    pub(super) region: String,
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGcp {
    key: String,
    scopes: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOAuth2 {
    token_url: String,
    client_id: String,
    client_secret: String,
    scope: Option<String>,
    audience: Option<String>,
    grant: Option<String>,
}

pub(super) fn check(
    c: &mut Checker,
    route_at: &str,
    raw: RawInject,
    secrets: &BTreeMap<String, SecretSource>,
) -> Option<Injection> {
    let at = format!("{route_at}.inject");
    let kinds = [
        raw.header.is_some(),
        raw.query.is_some(),
        raw.basic.is_some(),
        raw.oauth2.is_some(),
        raw.gcp_service_account.is_some(),
        raw.aws_sigv4.is_some(),
    ];
    if kinds.iter().filter(|k| **k).count() != 1 {
        c.fail(
            &at,
            "give exactly one injection kind: `header`, `query`, `basic`, `oauth2`, `gcp_service_account` or `aws_sigv4`",
        );
        return None;
    }
    if raw.format.is_some() && raw.header.is_none() {
        c.fail(format!("{at}.format"), "`format` goes with `header` only");
    }
    let secret_ref = |c: &mut Checker, key: &str, name: Option<String>| -> Option<String> {
        let Some(name) = name else {
            c.fail(format!("{at}.{key}"), "missing: name the secret to inject");
            return None;
        };
        if !secrets.contains_key(&name) {
            c.fail(
                format!("{at}.{key}"),
                format!("no secret named {}", super::raw::shown(&name)),
            );
            return None;
        }
        Some(name)
    };
    let bearer = || Slot::Header {
        name: http::header::AUTHORIZATION,
        prefix: "Bearer ".into(),
        suffix: String::new(),
    };
    if let Some(aws) = raw.aws_sigv4 {
        if raw.secret.is_some() {
            c.fail(
                format!("{at}.secret"),
                "with `aws_sigv4`, name the key secrets inside it",
            );
        }
        let plain =
            |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        let service = aws.service.unwrap_or_default();
        if !plain(&service) {
            c.fail(
                format!("{at}.aws_sigv4.service"),
                format!("invalid or missing service {service:?}"),
            );
        }
        if !plain(&aws.region) {
            c.fail(
                format!("{at}.aws_sigv4.region"),
                format!("invalid region {:?}", aws.region),
            );
        }
        let secret_key = secret_ref(
            c,
            "aws_sigv4.secret_access_key",
            Some(aws.secret_access_key),
        );
        let session = match aws.session_token {
            Some(name) => Some(secret_ref(c, "aws_sigv4.session_token", Some(name))?),
            None => None,
        };
        let access_key = secret_ref(c, "aws_sigv4.access_key_id", Some(aws.access_key_id))?;
        return Some(Injection {
            secret: access_key,
            slot: Slot::AwsSigV4,
            grant: None,
            sigv4: Some(std::sync::Arc::new(crate::inject::sigv4::SigV4 {
                service,
                region: aws.region,
                secret_access_key: secret_key?,
                session_token: session,
            })),
        });
    }
    if let Some(gcp) = raw.gcp_service_account {
        if raw.secret.is_some() {
            c.fail(
                format!("{at}.secret"),
                "with `gcp_service_account`, name the key's secret inside it: { key, scopes }",
            );
        }
        if gcp.scopes.is_empty() {
            c.fail(
                format!("{at}.gcp_service_account.scopes"),
                "name at least one scope",
            );
        }
        let secret = secret_ref(c, "gcp_service_account.key", Some(gcp.key))?;
        return Some(Injection {
            secret,
            slot: bearer(),
            grant: Some(std::sync::Arc::new(TokenGrant::GcpServiceAccount {
                scopes: gcp.scopes,
            })),
            sigv4: None,
        });
    }
    if let Some(oauth2) = raw.oauth2 {
        if raw.secret.is_some() {
            c.fail(
                format!("{at}.secret"),
                "with `oauth2`, name the client secret inside it: oauth2 = { client_secret }",
            );
        }
        let token_url = match oauth2.token_url.parse::<http::Uri>() {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("https" | "http")) && uri.host().is_some() =>
            {
                Some(uri)
            }
            _ => {
                c.fail(
                    format!("{at}.oauth2.token_url"),
                    format!("{:?} is not an http(s) URL", oauth2.token_url),
                );
                None
            }
        };
        let exchange = match oauth2.grant.as_deref() {
            None | Some("client_credentials") => false,
            Some("token_exchange") => true,
            Some(other) => {
                c.fail(
                    format!("{at}.oauth2.grant"),
                    format!(
                        "unknown grant {other:?} (expected client_credentials or token_exchange)"
                    ),
                );
                false
            }
        };
        let secret = secret_ref(c, "oauth2.client_secret", Some(oauth2.client_secret))?;
        return Some(Injection {
            secret,
            slot: bearer(),
            grant: Some(std::sync::Arc::new(TokenGrant::ClientCredentials(OAuth2 {
                token_url: token_url?,
                client_id: oauth2.client_id,
                scope: oauth2.scope,
                audience: oauth2.audience,
                exchange,
            }))),
            sigv4: None,
        });
    }
    if let Some(basic) = raw.basic {
        if raw.secret.is_some() {
            c.fail(
                format!("{at}.secret"),
                "with `basic`, name the secret inside it: basic = { username, secret }",
            );
        }
        if basic.username.contains(':') || basic.username.chars().any(char::is_control) {
            c.fail(
                format!("{at}.basic.username"),
                "must not contain `:` or control characters",
            );
        }
        let secret = secret_ref(c, "basic.secret", Some(basic.secret))?;
        return Some(Injection {
            secret,
            slot: Slot::Basic {
                username: basic.username,
            },
            grant: None,
            sigv4: None,
        });
    }
    let secret = secret_ref(c, "secret", raw.secret);
    if let Some(header) = raw.header {
        let name = match HeaderName::from_bytes(header.as_bytes()) {
            Ok(name) if !is_reserved_header(&name) => Some(name),
            Ok(_) => {
                c.fail(
                    format!("{at}.header"),
                    format!("{header:?} is managed by the proxy and cannot carry a credential"),
                );
                None
            }
            Err(_) => {
                c.fail(
                    format!("{at}.header"),
                    format!("invalid header name {header:?}"),
                );
                None
            }
        };
        let format = raw.format.unwrap_or_else(|| "{secret}".to_string());
        let parts: Vec<&str> = format.split("{secret}").collect();
        if parts.len() != 2 {
            c.fail(
                format!("{at}.format"),
                "must contain `{secret}` exactly once",
            );
            return None;
        }
        if format.chars().any(char::is_control) {
            c.fail(
                format!("{at}.format"),
                "must not contain control characters",
            );
            return None;
        }
        return Some(Injection {
            secret: secret?,
            slot: Slot::Header {
                name: name?,
                prefix: parts[0].to_string(),
                suffix: parts[1].to_string(),
            },
            grant: None,
            sigv4: None,
        });
    }
    let param = raw.query.unwrap_or_default();
    if param.is_empty() || param.contains(['&', '=', '#']) || param.chars().any(char::is_control) {
        c.fail(
            format!("{at}.query"),
            format!("invalid query parameter name {param:?}"),
        );
        return None;
    }
    Some(Injection {
        secret: secret?,
        slot: Slot::Query { param },
        grant: None,
        sigv4: None,
    })
}

/// Headers that frame or route the message; a credential there would be
/// dropped or would break the request.
fn is_reserved_header(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "host"
            | "content-length"
            | "transfer-encoding"
            | "connection"
            | "keep-alive"
            | "upgrade"
            | "te"
            | "trailer"
            | "proxy-authorization"
            | "proxy-connection"
    )
}
