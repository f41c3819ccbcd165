//! The MITM certificate authority kept in the state dir.
//!
//! Created by `init`; `ca cert` and `ca bundle` hand it to clients. Leaf
//! issuance for intercepted CONNECT tunnels builds on it.

use std::fs;
use std::io;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use zeroize::Zeroizing;

use crate::state::{StateDir, write_new};

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot create the CA: {0}")]
    Generate(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}: {cause} (run `sidekey init`)")]
    Read { path: String, cause: String },
}

/// Creates the CA key and certificate if the state dir has neither. Returns whether it did.
pub fn create(state: &StateDir) -> Result<bool, CaError> {
    let (cert_path, key_path) = (state.ca_cert(), state.ca_key());
    if cert_path.exists() && key_path.exists() {
        return Ok(false);
    }
    if cert_path.exists() != key_path.exists() {
        return Err(CaError::Generate(format!(
            "only one of {} and {} exists; restore the other or remove both",
            cert_path.display(),
            key_path.display()
        )));
    }
    let gen_err = |e: rcgen::Error| CaError::Generate(e.to_string());
    let key = KeyPair::generate().map_err(gen_err)?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "sidekey interception CA");
    name.push(DnType::OrganizationName, "sidekey");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    // A day of slack for clients whose clocks run behind.
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(10 * 365);
    let cert = params.self_signed(&key).map_err(gen_err)?;
    let key_pem = Zeroizing::new(key.serialize_pem());
    let write = |path: &std::path::Path, bytes: &[u8], mode| {
        write_new(path, bytes, mode).map_err(|source| CaError::Write {
            path: path.display().to_string(),
            source,
        })
    };
    write(&key_path, key_pem.as_bytes(), 0o600)?;
    write(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(true)
}

/// The CA certificate in PEM.
pub fn cert_pem(state: &StateDir) -> Result<String, CaError> {
    let path = state.ca_cert();
    fs::read_to_string(&path).map_err(|e| CaError::Read {
        path: path.display().to_string(),
        cause: crate::config::describe_io(&e),
    })
}

/// The system roots followed by the CA, for `SSL_CERT_FILE` and friends.
pub fn bundle_pem(state: &StateDir) -> Result<String, CaError> {
    use base64::Engine;
    let ca = cert_pem(state)?;
    let mut out = String::new();
    for cert in rustls_native_certs::load_native_certs().certs {
        let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap_or_default());
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out.push_str(&ca);
    Ok(out)
}

/// Mints leaf certificates for intercepted hosts, signed by the state dir's
/// CA, and keeps them so a repeat handshake costs no key generation.
pub struct LeafMinter {
    issuer: rcgen::Issuer<'static, KeyPair>,
    provider: std::sync::Arc<rustls::crypto::CryptoProvider>,
    cache: std::sync::Mutex<LeafCache>,
}

impl std::fmt::Debug for LeafMinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LeafMinter")
    }
}

/// Hosts beyond this many are minted again when next seen.
const LEAF_CACHE: usize = 1024;

#[derive(Default)]
struct LeafCache {
    configs: std::collections::HashMap<String, std::sync::Arc<rustls::ServerConfig>>,
    order: std::collections::VecDeque<String>,
}

impl LeafMinter {
    pub fn load(state: &StateDir) -> Result<Self, CaError> {
        let key_path = state.ca_key();
        let read = |path: &std::path::Path| {
            fs::read_to_string(path).map_err(|e| CaError::Read {
                path: path.display().to_string(),
                cause: crate::config::describe_io(&e),
            })
        };
        let key_pem = Zeroizing::new(read(&key_path)?);
        let cert_pem = read(&state.ca_cert())?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Generate(e.to_string()))?;
        let issuer = rcgen::Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|e| CaError::Generate(e.to_string()))?;
        Ok(Self {
            issuer,
            provider: std::sync::Arc::new(rustls::crypto::ring::default_provider()),
            cache: std::sync::Mutex::new(LeafCache::default()),
        })
    }

    /// The TLS server config presenting a certificate for `host`, and
    /// whether it came from the cache.
    pub fn server_config(
        &self,
        host: &str,
    ) -> Result<(std::sync::Arc<rustls::ServerConfig>, bool), CaError> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(config) = cache.configs.get(host) {
            return Ok((config.clone(), true));
        }
        let config = std::sync::Arc::new(self.mint(host)?);
        if cache.order.len() >= LEAF_CACHE
            && let Some(oldest) = cache.order.pop_front()
        {
            cache.configs.remove(&oldest);
        }
        cache.order.push_back(host.to_string());
        cache.configs.insert(host.to_string(), config.clone());
        Ok((config, false))
    }

    fn mint(&self, host: &str) -> Result<rustls::ServerConfig, CaError> {
        let gen_err = |e: rcgen::Error| CaError::Generate(e.to_string());
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut params = CertificateParams::new(vec![host.to_string()]).map_err(gen_err)?;
        params
            .distinguished_name
            .push(DnType::CommonName, host.to_string());
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(30);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).map_err(gen_err)?;
        let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| CaError::Generate(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key_der)
            .map_err(|e| CaError::Generate(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_are_minted_once_per_host() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        assert!(create(&state).unwrap());
        assert!(!create(&state).unwrap(), "never replaces an existing CA");
        let minter = LeafMinter::load(&state).unwrap();
        let (first, cached) = minter.server_config("api.example.com").unwrap();
        assert!(!cached);
        let (again, cached) = minter.server_config("api.example.com").unwrap();
        assert!(cached, "a repeat costs no key generation");
        assert!(std::sync::Arc::ptr_eq(&first, &again));
        let (other, _) = minter.server_config("127.0.0.1").unwrap();
        assert!(!std::sync::Arc::ptr_eq(&first, &other));
        assert_eq!(
            first.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }
}
