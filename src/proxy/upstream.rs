//! The outbound clients: TLS with the system roots plus `tls.upstream_ca`,
//! hostnames always verified, over the connection pool in `pool`.

use std::sync::Arc;

use hyper_util::client::legacy::connect::HttpConnector;
use rustls::RootCertStore;

use crate::config::Config;
use crate::egress::{GuardedResolver, Reach};

use super::body::Body;
use super::pool::{Connector, Upstream};

/// One pool per reach, so a connection opened for a destination allowed to
/// be private is never reused for one that is not.
#[derive(Debug, Clone)]
pub struct Clients {
    public: Upstream,
    any: Upstream,
}

impl Clients {
    pub fn build(config: &Config) -> Result<Self, ClientError> {
        Ok(Self {
            public: build(config, Reach::Public, &[])?,
            any: build(config, Reach::Any, &[])?,
        })
    }

    pub fn get(&self, reach: Reach) -> &Upstream {
        match reach {
            Reach::Public => &self.public,
            Reach::Any => &self.any,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read CA file {path}: {cause}")]
    CaFile { path: String, cause: String },
    #[error("TLS setup failed: {0}")]
    Tls(String),
}

/// The roots upstream certificates are checked against.
pub fn root_store(
    config: &Config,
    extra_ca: &[std::path::PathBuf],
) -> Result<RootCertStore, ClientError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // A system root rustls cannot parse is skipped, as browsers do.
        let _ = roots.add(cert);
    }
    for path in config.upstream_ca.iter().chain(extra_ca) {
        let shown = || path.display().to_string();
        let pem = std::fs::read(path).map_err(|e| ClientError::CaFile {
            path: shown(),
            cause: crate::config::describe_io(&e),
        })?;
        let mut count = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|_| ClientError::CaFile {
                path: shown(),
                cause: "not PEM".into(),
            })?;
            roots.add(cert).map_err(|e| ClientError::CaFile {
                path: shown(),
                cause: e.to_string(),
            })?;
            count += 1;
        }
        if count == 0 {
            return Err(ClientError::CaFile {
                path: shown(),
                cause: "no certificate in file".into(),
            });
        }
    }
    Ok(roots)
}

/// A client for the operator's own services (Vault): any address, and the
/// system roots, `tls.upstream_ca` and `extra_ca`.
pub fn service_client(
    config: &Config,
    extra_ca: &[std::path::PathBuf],
) -> Result<Upstream, ClientError> {
    build(config, Reach::Any, extra_ca)
}

fn build(
    config: &Config,
    reach: Reach,
    extra_ca: &[std::path::PathBuf],
) -> Result<Upstream, ClientError> {
    let provider = Arc::new(crate::tls::provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(root_store(config, extra_ca)?)
        .with_no_client_auth();
    let mut http = HttpConnector::new_with_resolver(GuardedResolver { reach });
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(config.limits.connect_timeout));
    let connector = |h2: bool| -> Connector {
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_or_http();
        if h2 {
            builder.enable_all_versions().wrap_connector(http.clone())
        } else {
            builder.enable_http1().wrap_connector(http.clone())
        }
    };
    Ok(Upstream::new(connector(true), connector(false)))
}

/// One call to a service the operator configured (a token endpoint, a key
/// set, Vault): a deadline, a bounded body, and only a success counts.
pub async fn call_service(
    client: &Upstream,
    req: http::Request<Body>,
    timeout: std::time::Duration,
    max_body: usize,
) -> Result<bytes::Bytes, String> {
    use http_body_util::BodyExt;
    let response = tokio::time::timeout(timeout, client.send(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body = http_body_util::Limited::new(response.into_body(), max_body)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if !status.is_success() {
        return Err(format!("answered {status}"));
    }
    Ok(body)
}
