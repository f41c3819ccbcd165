//! AWS Signature Version 4: the agent's SDK signs with its agent token as
//! the access key id (and any secret); sidekey takes the token as the
//! identity, drops the agent's signature, and signs again with the real keys.

use std::time::SystemTime;

use aws_sigv4::http_request::{
    PayloadChecksumKind, SignableBody, SignableRequest, SigningSettings, sign,
};
use aws_sigv4::sign::v4;
use http::HeaderMap;
use http::header::{AUTHORIZATION, HOST, HeaderValue};

use crate::secret::Secret;

/// What SigV4 signs with, besides the keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigV4 {
    pub service: String,
    pub region: String,
    /// Secret names.
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

/// The body hash an agent declared (S3 sends it; most services do not).
pub const CONTENT_SHA256: &str = "x-amz-content-sha256";

/// The access key id of an `AWS4-HMAC-SHA256 Credential=KEY/...` header:
/// for sidekey, the agent's token.
pub fn credential_key(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.trim().strip_prefix("AWS4-HMAC-SHA256"))
        .filter_map(|rest| rest.split("Credential=").nth(1))
        .filter_map(|cred| cred.split('/').next())
        .map(|key| key.trim().to_string())
        .filter(|key| !key.is_empty())
        .collect()
}

/// Removes the agent's signature and what it covered.
pub fn strip(headers: &mut HeaderMap) -> Option<HeaderValue> {
    headers.remove(AUTHORIZATION);
    headers.remove("x-amz-date");
    headers.remove("x-amz-security-token");
    headers.remove(CONTENT_SHA256)
}

/// The query parameters of a presigned URL (SigV4 in the query string):
/// the agent's signature and what it covered.
const PRESIGNED: [&str; 7] = [
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
    "X-Amz-Security-Token",
];

/// The access key id of a presigned URL's `X-Amz-Credential`: for
/// sidekey, the agent's token.
pub fn presigned_key(query: &str) -> Option<String> {
    crate::identity::query_pairs(query)
        .find(|(name, _)| name.eq_ignore_ascii_case("X-Amz-Credential"))
        .and_then(|(_, value)| value.split('/').next().map(str::to_string))
        .filter(|key| !key.is_empty())
}

/// `uri` without a presigned URL's parameters: the request is signed
/// again in headers, and AWS refuses a request signed both ways.
pub fn strip_presigned(uri: &http::Uri) -> Result<http::Uri, String> {
    let Some(query) = uri.query() else {
        return Ok(uri.clone());
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let name = pair.split('=').next().unwrap_or_default();
            !PRESIGNED.iter().any(|p| p.eq_ignore_ascii_case(name))
        })
        .collect();
    if kept.len() == query.split('&').count() {
        return Ok(uri.clone());
    }
    let mut path_and_query = uri.path().to_string();
    if !kept.is_empty() {
        path_and_query.push('?');
        path_and_query.push_str(&kept.join("&"));
    }
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(
        path_and_query
            .parse()
            .map_err(|_| "invalid path after removing the presigned parameters")?,
    );
    http::Uri::from_parts(parts).map_err(|e| e.to_string())
}

/// Signs `req` with the real keys. `declared` is the agent's body hash
/// (hex, or `UNSIGNED-PAYLOAD`), used as is; without one, `body` is hashed.
pub fn sign_request<B>(
    req: &mut http::Request<B>,
    config: &SigV4,
    access_key_id: &Secret,
    secret_access_key: &Secret,
    session_token: Option<&Secret>,
    declared: Option<&str>,
    body: &[u8],
) -> Result<(), String> {
    let authority = req
        .uri()
        .authority()
        .ok_or("the upstream URL has no host")?
        .to_string();
    // The Host header is signed, so it must be the one that is sent.
    req.headers_mut().insert(
        HOST,
        HeaderValue::from_str(&authority).map_err(|_| "invalid upstream host")?,
    );
    let identity = aws_credential_types::Credentials::new(
        access_key_id.expose(),
        secret_access_key.expose(),
        session_token.map(|t| t.expose().to_string()),
        None,
        "sidekey",
    )
    .into();
    let mut settings = SigningSettings::default();
    if declared.is_some() || config.service == "s3" {
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    }
    if config.service == "s3" {
        // S3 signs the path as sent, without normalising or double-encoding it.
        settings.uri_path_normalization_mode =
            aws_sigv4::http_request::UriPathNormalizationMode::Disabled;
        settings.percent_encoding_mode = aws_sigv4::http_request::PercentEncodingMode::Single;
    }
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(&config.region)
        .name(&config.service)
        .time(SystemTime::now())
        .settings(settings)
        .build()
        .map_err(|e| format!("SigV4 parameters: {e}"))?
        .into();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    let signable_body = match declared {
        Some("UNSIGNED-PAYLOAD") => SignableBody::UnsignedPayload,
        Some(hash) => SignableBody::Precomputed(hash.to_string()),
        None => SignableBody::Bytes(body),
    };
    let uri = req.uri().to_string();
    let signable = SignableRequest::new(
        req.method().as_str(),
        &uri,
        headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        signable_body,
    )
    .map_err(|e| format!("SigV4: {e}"))?;
    let (instructions, _) = sign(signable, &params)
        .map_err(|e| format!("SigV4 signing failed: {e}"))?
        .into_parts();
    instructions.apply_to_request_http1x(req);
    Ok(())
}
