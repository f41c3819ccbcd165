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
