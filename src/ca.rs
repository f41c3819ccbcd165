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
    #[error("{0} is damaged")]
    Damaged(String),
}

/// Creates the interception CA if the state dir has none. Returns whether it did.
pub fn create(state: &StateDir) -> Result<bool, CaError> {
    create_ca(
        &state.ca_cert(),
        &state.ca_key(),
        "sidekey interception CA",
        0,
    )
}

/// Creates the CA for agents' client certificates if the state dir has none.
pub fn create_agent_ca(state: &StateDir) -> Result<bool, CaError> {
    create_ca(
        &state.agent_ca_cert(),
        &state.agent_ca_key(),
        "sidekey agent CA",
        0,
    )
}

fn create_ca(
    cert_path: &std::path::Path,
    key_path: &std::path::Path,
    common_name: &str,
    path_len: u8,
) -> Result<bool, CaError> {
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
    name.push(DnType::CommonName, common_name);
    name.push(DnType::OrganizationName, "sidekey");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
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
    write(key_path, key_pem.as_bytes(), 0o600)?;
    write(cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(true)
}

/// The trust domain in agents' SPIFFE IDs.
pub const TRUST_DOMAIN: &str = "sidekey";

/// `spiffe://sidekey/agent/NAME`, the URI SAN that names an agent.
pub fn spiffe_id(agent: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/agent/{agent}")
}

/// A client certificate for `agent`, signed by the agent CA.
#[derive(Debug)]
pub struct AgentCert {
    pub cert_pem: String,
    pub key_pem: Zeroizing<String>,
    /// Hex serial: the id `token revoke --id` takes.
    pub serial: String,
}

pub fn issue_agent_cert(
    state: &StateDir,
    agent: &str,
    ttl: std::time::Duration,
) -> Result<AgentCert, CaError> {
    create_agent_ca(state)?;
    let issuer = load_issuer(&state.agent_ca_cert(), &state.agent_ca_key())?;
    let gen_err = |e: rcgen::Error| CaError::Generate(e.to_string());
    let key = KeyPair::generate().map_err(gen_err)?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, agent.to_string());
    let uri = rcgen::string::Ia5String::try_from(spiffe_id(agent)).map_err(gen_err)?;
    params.subject_alt_names = vec![rcgen::SanType::URI(uri)];
    let mut serial = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut serial);
    // Positive, as DER wants, and without a leading zero byte, so the hex
    // printed here is the hex read back from the certificate.
    serial[0] = (serial[0] & 0x7f) | 0x40;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    // Not backdated: an agent revocation is ordered against this time.
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now;
    params.not_after = now + time::Duration::seconds(ttl.as_secs().min(i64::MAX as u64) as i64);
    let cert = params.signed_by(&key, &issuer).map_err(gen_err)?;
    Ok(AgentCert {
        cert_pem: cert.pem(),
        key_pem: Zeroizing::new(key.serialize_pem()),
        serial: {
            let mut hex = String::with_capacity(32);
            crate::token::push_hex(&mut hex, &serial);
            hex
        },
    })
}

fn load_issuer(
    cert_path: &std::path::Path,
    key_path: &std::path::Path,
) -> Result<rcgen::Issuer<'static, KeyPair>, CaError> {
    let read = |path: &std::path::Path| {
        fs::read_to_string(path).map_err(|e| CaError::Read {
            path: path.display().to_string(),
            cause: crate::config::describe_io(&e),
        })
    };
    let key_pem = Zeroizing::new(read(key_path)?);
    let cert_pem = read(cert_path)?;
    let damaged = |path: &std::path::Path| CaError::Damaged(path.display().to_string());
    let key = KeyPair::from_pem(&key_pem).map_err(|_| damaged(key_path))?;
    rcgen::Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|_| damaged(cert_path))
}

/// Both CAs load: their keys and certificates are whole.
pub fn check(state: &StateDir) -> Result<(), CaError> {
    load_issuer(&state.ca_cert(), &state.ca_key())?;
    load_issuer(&state.agent_ca_cert(), &state.agent_ca_key())?;
    Ok(())
}

/// The CA certificate in PEM, checked to be one whole certificate: agents
/// are handed it to trust, and a damaged one would fail them later and
/// less clearly.
pub fn cert_pem(state: &StateDir) -> Result<String, CaError> {
    let path = state.ca_cert();
    let unreadable = |cause: String| CaError::Read {
        path: path.display().to_string(),
        cause,
    };
    let pem = fs::read_to_string(&path).map_err(|e| unreadable(crate::config::describe_io(&e)))?;
    let mut bytes = pem.as_bytes();
    let mut certs = rustls_pemfile::certs(&mut bytes);
    let whole = match (certs.next(), certs.next()) {
        (Some(Ok(cert)), None) => x509_parser::parse_x509_certificate(&cert).is_ok(),
        _ => false,
    };
    drop(certs);
    if !whole {
        return Err(unreadable("not one PEM certificate".into()));
    }
    Ok(pem)
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
        let issuer = load_issuer(&state.ca_cert(), &state.ca_key())?;
        Ok(Self {
            issuer,
            provider: std::sync::Arc::new(crate::tls::provider()),
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
        self.mint_for(&[host.to_string()], None)
    }

    /// The mTLS listener's config: a leaf for `names`, and client
    /// certificates required, chained to the agent CA and unexpired.
    pub fn mtls_config(
        &self,
        state: &StateDir,
        names: &[String],
    ) -> Result<rustls::ServerConfig, CaError> {
        create_agent_ca(state)?;
        let pem = fs::read(state.agent_ca_cert()).map_err(|e| CaError::Read {
            path: state.agent_ca_cert().display().to_string(),
            cause: crate::config::describe_io(&e),
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| CaError::Generate(e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| CaError::Generate(e.to_string()))?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| CaError::Generate(e.to_string()))?;
        self.mint_for(names, Some(verifier))
    }

    fn mint_for(
        &self,
        names: &[String],
        client_verifier: Option<std::sync::Arc<dyn rustls::server::danger::ClientCertVerifier>>,
    ) -> Result<rustls::ServerConfig, CaError> {
        let gen_err = |e: rcgen::Error| CaError::Generate(e.to_string());
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(gen_err)?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(30);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).map_err(gen_err)?;
        let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let builder = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| CaError::Generate(e.to_string()))?;
        let builder = match client_verifier {
            Some(verifier) => builder.with_client_cert_verifier(verifier),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(vec![cert.der().clone()], key_der)
            .map_err(|e| CaError::Generate(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config.ignore_client_order = crate::tls::aes_in_hardware();
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
