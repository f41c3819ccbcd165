//! Strip what the caller sent, then set the credential.
//!
//! SECURITY: the slot is overwritten whatever the agent put there (any case,
//! any number of copies), and hop-by-hop and proxy headers never cross.
//! This module and `scrub` are the only places a secret value is read.

pub mod sigv4;

use base64::Engine;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use crate::config::Slot;
use crate::identity::query_pairs;
use crate::secret::Secret;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InjectError {
    #[error("secret {0:?} contains bytes that cannot go in a header")]
    NotHeaderSafe(String),
}

/// Everything but RFC 3986 unreserved characters is encoded in a query value.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1),
/// plus what sidekey consumed.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, including every header `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the few headers a request has, rather than a hashed
    // removal for each name on the list: most requests carry none of them.
    let mut doomed: Vec<HeaderName> = Vec::new();
    for (name, value) in headers.iter() {
        if name == header::CONNECTION {
            let listed = value
                .to_str()
                .unwrap_or_default()
                .split(',')
                .filter_map(|listed| HeaderName::from_bytes(listed.trim().as_bytes()).ok());
            doomed.extend(listed);
        }
        if name == header::UPGRADE || HOP_BY_HOP.contains(name) {
            doomed.push(name.clone());
        }
    }
    for name in &doomed {
        headers.remove(name);
    }
}

/// Sets the credential in its header slot, removing every copy the agent sent.
pub fn headers(
    headers: &mut HeaderMap,
    slot: &Slot,
    secret_name: &str,
    secret: &Secret,
) -> Result<(), InjectError> {
    let (name, value) = match slot {
        Slot::Header {
            name,
            prefix,
            suffix,
        } => {
            let value = joined(&[prefix, secret.expose(), suffix]);
            (name.clone(), header_value(&value, secret_name)?)
        }
        Slot::Basic { username } => {
            let pair = joined(&[username, ":", secret.expose()]);
            let value = zeroize::Zeroizing::new(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair.as_bytes())
            ));
            (header::AUTHORIZATION, header_value(&value, secret_name)?)
        }
        Slot::Query { .. } | Slot::AwsSigV4 => return Ok(()),
    };
    headers.remove(&name);
    // `x_api_key` reaches CGI, WSGI and PHP apps as the same variable as
    // `x-api-key`; a copy under that spelling must not survive either.
    let underscored: Vec<HeaderName> = headers
        .keys()
        .filter(|k| same_but_underscores(k.as_str(), name.as_str()))
        .cloned()
        .collect();
    for other in underscored {
        headers.remove(other);
    }
    headers.insert(name, value);
    Ok(())
}

/// Removes every header value that carries the agent's token, wherever the
/// agent put it: the token is worthless upstream and must not travel there.
pub fn strip_token(headers: &mut HeaderMap, token: &str) {
    if token.is_empty() {
        return;
    }
    let carrying = |v: &HeaderValue| {
        v.as_bytes()
            .windows(token.len())
            .any(|w| w == token.as_bytes())
    };
    let names: Vec<HeaderName> = headers
        .iter()
        .filter(|(_, v)| carrying(v))
        .map(|(n, _)| n.clone())
        .collect();
    for name in names {
        let kept: Vec<HeaderValue> = headers
            .get_all(&name)
            .iter()
            .filter(|v| !carrying(v))
            .cloned()
            .collect();
        headers.remove(&name);
        for value in kept {
            headers.append(name.clone(), value);
        }
    }
}

/// Headers with which an upstream, or the proxy in front of it, may be
/// told to act for another host, path or client than the request's own:
/// IIS URL Rewrite and older Symfony and Zend apps take `X-Original-URL` as
/// the path, ingresses and frameworks that trust the hop before them take
/// the host from `Forwarded` and its `X-` forms, and allowlists that trust
/// sidekey's address take the client from `X-Real-IP` and the like. The
/// policy decided the host and path sidekey sends to, and sidekey is the
/// client the upstream sees, so an agent's version never crosses.
const STEERING_HEADERS: [&str; 8] = [
    "x-original-url",
    "x-rewrite-url",
    "forwarded",
    "x-original-host",
    "x-host",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
];

/// Every `X-Forwarded-*` header (`-Host`, `-For`, `-Proto`, `-Port`,
/// `-Prefix`, `-Server`, ...) is one of the [`STEERING_HEADERS`].
const STEERING_PREFIX: &str = "x-forwarded-";

/// Removes the [`STEERING_HEADERS`] an agent sent, in any spelling a CGI
/// or PHP app reads as the same variable.
pub fn strip_steering_headers(headers: &mut HeaderMap) {
    let steering = |key: &str| {
        // Each of them starts with `x`, `f` or `t`: most headers are passed
        // over on their first byte, on every request.
        matches!(key.as_bytes().first(), Some(b'x' | b'f' | b't'))
            && (key.len() > STEERING_PREFIX.len()
                && key
                    .get(..STEERING_PREFIX.len())
                    .is_some_and(|head| spelled_as(head, STEERING_PREFIX))
                || STEERING_HEADERS.iter().any(|name| spelled_as(key, name)))
    };
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|k| steering(k.as_str()))
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

/// Whether header `key` is `name`, or `name` with some of its dashes written
/// as underscores, which CGI, WSGI and PHP apps read as the same variable.
pub fn spelled_as(key: &str, name: &str) -> bool {
    key == name || same_but_underscores(key, name)
}

/// Whether `key` is `name` with some of its dashes written as underscores
/// (compared in place: this runs for every header of every request).
fn same_but_underscores(key: &str, name: &str) -> bool {
    key.len() == name.len()
        && key.contains('_')
        && key
            .bytes()
            .zip(name.bytes())
            .all(|(k, n)| k == n || (k == b'_' && n == b'-'))
}

/// The parts in one string allocated once at its final size: a string that
/// grew would leave earlier copies of the secret in freed memory, where
/// `Zeroizing` cannot reach them (and `format!` is slower besides).
fn joined(parts: &[&str]) -> zeroize::Zeroizing<String> {
    let mut out = String::with_capacity(parts.iter().map(|p| p.len()).sum());
    for part in parts {
        out.push_str(part);
    }
    zeroize::Zeroizing::new(out)
}

fn header_value(value: &str, secret_name: &str) -> Result<HeaderValue, InjectError> {
    let mut value = HeaderValue::from_str(value)
        .map_err(|_| InjectError::NotHeaderSafe(secret_name.to_string()))?;
    // Keeps the value out of HPACK tables and out of `Debug` output of the map.
    value.set_sensitive(true);
    Ok(value)
}

/// Rebuilds a query string without any pair that carries the agent's token
/// and, when `credential` names a query slot, with that parameter set to the
/// secret and every agent-sent copy removed (compared without regard to
/// case, and also after `;`, since some upstreams read parameters that way).
pub fn query(
    original: Option<&str>,
    token: &str,
    credential: Option<(&Slot, &Secret)>,
) -> Option<String> {
    let slot = credential.and_then(|(slot, secret)| match slot {
        Slot::Query { param } => Some((param.as_str(), secret)),
        _ => None,
    });
    let mut kept: Vec<&str> = Vec::new();
    for raw in original
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let drop = raw.split(';').any(|part| {
            query_pairs(part).next().is_some_and(|(name, value)| {
                (!token.is_empty() && value.contains(token))
                    || slot.is_some_and(|(p, _)| name.eq_ignore_ascii_case(p))
            })
        });
        if !drop {
            kept.push(raw);
        }
    }
    let mut out = kept.join("&");
    if let Some((param, secret)) = slot {
        if !out.is_empty() {
            out.push('&');
        }
        out.extend(utf8_percent_encode(param, QUERY_VALUE));
        out.push('=');
        out.extend(utf8_percent_encode(secret.expose(), QUERY_VALUE));
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut h = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, X-Drop-Me"),
            ("connection", " x-also-dropped ,"),
            ("x-drop-me", "1"),
            ("x-also-dropped", "2"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic dG9rZW4="),
            ("te", "trailers"),
            ("trailer", "x-sig"),
            ("upgrade", "websocket"),
            ("x-kept", "3"),
            ("accept", "*/*"),
            ("accept", "text/html"),
        ] {
            h.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["accept", "x-kept"]);
        assert_eq!(h.get_all("accept").iter().count(), 2);
    }

    #[test]
    fn header_slot_overwrites_every_copy() {
        let mut h = HeaderMap::new();
        h.append("Authorization", HeaderValue::from_static("Bearer agent"));
        h.append("AUTHORIZATION", HeaderValue::from_static("Bearer other"));
        let slot = Slot::Header {
            name: header::AUTHORIZATION,
            prefix: "Bearer ".into(),
            suffix: String::new(),
        };
        headers(&mut h, &slot, "s", &Secret::new("sk-1".into())).unwrap();
        let all: Vec<_> = h.get_all(header::AUTHORIZATION).iter().collect();
        assert_eq!(all, vec!["Bearer sk-1"]);
    }

    #[test]
    fn underscore_spellings_match_only_the_same_name() {
        for (key, same) in [
            ("x_api_key", true),
            ("x_api-key", true),
            ("x-api_key", true),
            ("x-api-key", false), // the name itself, removed before
            ("x_api_keys", false),
            ("y_api_key", false),
            ("x__pi_key", false),
        ] {
            assert_eq!(same_but_underscores(key, "x-api-key"), same, "{key}");
        }
    }

    #[test]
    fn token_and_underscore_spellings_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("x_api_key", HeaderValue::from_static("agent-own"));
        h.append("x-other", HeaderValue::from_static("Bearer tok123"));
        h.append("x-other", HeaderValue::from_static("keep"));
        strip_token(&mut h, "tok123");
        let slot = Slot::Header {
            name: HeaderName::from_static("x-api-key"),
            prefix: String::new(),
            suffix: String::new(),
        };
        headers(&mut h, &slot, "s", &Secret::new("sk".into())).unwrap();
        assert!(!h.contains_key("x_api_key"));
        assert_eq!(
            h.get_all("x-other").iter().collect::<Vec<_>>(),
            vec!["keep"]
        );
        assert_eq!(h["x-api-key"], "sk");
    }

    #[test]
    fn query_slot_replaces_agent_copies() {
        let slot = Slot::Query {
            param: "key".into(),
        };
        let secret = Secret::new("a b&c".into());
        let with = Some((&slot, &secret));
        assert_eq!(
            query(Some("key=tok&x=1&KEY=2&k%65y=3&y=1;key=4"), "tok", with).as_deref(),
            Some("x=1&key=a%20b%26c")
        );
        assert_eq!(query(None, "tok", with).as_deref(), Some("key=a%20b%26c"));
        let basic = Slot::Basic {
            username: "u".into(),
        };
        assert_eq!(
            query(Some("a=1&t=xtokx"), "tok", Some((&basic, &secret))).as_deref(),
            Some("a=1")
        );
        assert_eq!(query(Some("t=tok"), "tok", None), None);
    }

    #[test]
    fn connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("close, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("proxy-authorization", HeaderValue::from_static("Bearer t"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn header_unsafe_secret_is_refused() {
        let slot = Slot::Header {
            name: header::AUTHORIZATION,
            prefix: String::new(),
            suffix: String::new(),
        };
        let mut h = HeaderMap::new();
        assert!(headers(&mut h, &slot, "s", &Secret::new("a\r\nb".into())).is_err());
    }
}
