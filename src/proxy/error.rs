//! `ProxyError`: the one place that picks a status code and an audit reason.

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};

use crate::identity::IdentityError;
use crate::policy::PathError;
use crate::token::TokenError;

use super::body::{Body, full};

/// How sidekey was reached; it decides 401 or 407 for identity failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Reverse,
    Forward,
    Connect,
    Intercept,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reverse => "reverse",
            Self::Forward => "forward",
            Self::Connect => "connect",
            Self::Intercept => "intercept",
        }
    }
}

/// Who is at fault; drives the log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Caller,
    Upstream,
    Sidekey,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}")]
    Identity(#[from] IdentityError),
    #[error("no route named {0:?}")]
    RouteNotFound(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("bad path: {0}")]
    BadPath(#[from] PathError),
    #[error("denied by {}", rule.as_deref().unwrap_or("default deny"))]
    Denied { rule: Option<String> },
    #[error("misdirected: {0}")]
    Misdirected(String),
    #[error("destination refused: {0}")]
    Forbidden(String),
    #[error("request body larger than {0} bytes")]
    BodyTooLarge(u64),
    #[error("request headers larger than {0} bytes")]
    HeadersTooLarge(usize),
    #[error("{0}")]
    SecretUnavailable(String),
    #[error("cannot write the audit record")]
    AuditUnavailable,
    #[error("upstream {host}: {cause}")]
    Upstream { host: String, cause: String },
    #[error("upstream {host} did not answer in time")]
    UpstreamTimeout { host: String },
    #[error("upstream {host} sent an encoded (compressed) body, which cannot be scrubbed")]
    Unscrubbable { host: String },
}

impl ProxyError {
    /// The SPEC §6 error code, also the audit `reason`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Identity(IdentityError::Token(TokenError::Expired)) => "token_expired",
            Self::Identity(IdentityError::Token(TokenError::Revoked)) => "token_revoked",
            Self::Identity(_) => "unauthenticated",
            Self::RouteNotFound(_) => "route_not_found",
            Self::Misdirected(_) => "misdirected",
            Self::BadRequest(_) | Self::BadPath(_) => "bad_request",
            Self::Denied { .. } | Self::Forbidden(_) => "policy_denied",
            Self::BodyTooLarge(_) | Self::HeadersTooLarge(_) => "request_too_large",
            Self::SecretUnavailable(_) => "secret_unavailable",
            Self::AuditUnavailable => "audit_unavailable",
            Self::Upstream { .. } | Self::Unscrubbable { .. } => "upstream_unreachable",
            Self::UpstreamTimeout { .. } => "upstream_timeout",
        }
    }

    pub fn status(&self, mode: Mode) -> StatusCode {
        match self {
            Self::Identity(_) if mode == Mode::Reverse => StatusCode::UNAUTHORIZED,
            Self::Identity(_) => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            Self::RouteNotFound(_) => StatusCode::NOT_FOUND,
            Self::Misdirected(_) => StatusCode::MISDIRECTED_REQUEST,
            Self::BadRequest(_) | Self::BadPath(_) => StatusCode::BAD_REQUEST,
            Self::Denied { .. } | Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::SecretUnavailable(_) | Self::AuditUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Upstream { .. } | Self::Unscrubbable { .. } => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    pub fn fault(&self) -> Fault {
        match self {
            Self::Identity(IdentityError::RevocationsUnavailable)
            | Self::SecretUnavailable(_)
            | Self::AuditUnavailable => Fault::Sidekey,
            Self::Identity(_)
            | Self::RouteNotFound(_)
            | Self::Misdirected(_)
            | Self::BadRequest(_)
            | Self::BadPath(_)
            | Self::Denied { .. }
            | Self::Forbidden(_)
            | Self::BodyTooLarge(_)
            | Self::HeadersTooLarge(_) => Fault::Caller,
            Self::Upstream { .. } | Self::UpstreamTimeout { .. } | Self::Unscrubbable { .. } => {
                Fault::Upstream
            }
        }
    }

    /// The cause the agent is not told (which secret source failed and
    /// how), kept for the audit record: SPEC's fields say that a request
    /// failed closed, this says why. Never a secret: no error carries one.
    pub fn hidden_cause(&self) -> Option<String> {
        let full = self.to_string();
        (full != self.public_message()).then_some(full)
    }

    /// The message the agent sees. Sidekey-side causes (which secret source
    /// failed, why the audit sink broke) stay in sidekey's log.
    fn public_message(&self) -> String {
        match self {
            Self::SecretUnavailable(_) => "the credential for this route is unavailable".into(),
            Self::AuditUnavailable => "the audit log cannot be written; refusing to proceed".into(),
            Self::Identity(IdentityError::RevocationsUnavailable) => {
                "agent credentials cannot be checked right now".into()
            }
            other => other.to_string(),
        }
    }

    /// The JSON error response of SPEC §6.
    pub fn into_response(self, mode: Mode, request_id: &str) -> Response<Body> {
        let status = self.status(mode);
        let body = serde_json::json!({
            "error": {
                "code": self.code(),
                "message": self.public_message(),
                "request_id": request_id,
            }
        });
        let mut response = Response::new(full(body.to_string()));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert("x-sidekey-error", HeaderValue::from_static(self.code()));
        match status {
            StatusCode::PROXY_AUTHENTICATION_REQUIRED => {
                headers.insert(
                    http::header::PROXY_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"sidekey\""),
                );
            }
            StatusCode::UNAUTHORIZED => {
                headers.insert(
                    http::header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"sidekey\""),
                );
            }
            _ => {}
        }
        response
    }
}
