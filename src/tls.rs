//! The TLS crypto sidekey uses as a server to agents and as a client to
//! upstreams: *ring*, with the cipher suites ordered for this CPU.

use rustls::crypto::CryptoProvider;

/// *ring*'s suites, with AES-128-GCM first where the CPU has AES
/// instructions, as Chrome and Go order theirs. It is a suite every TLS 1.3
/// peer supports, cheaper per record than AES-256, and hashed with SHA-256,
/// which CPUs accelerate, where AES-256-GCM's SHA-384 makes every handshake
/// run SHA-512 in software. Without AES instructions *ring*'s own order
/// stands.
pub fn provider() -> CryptoProvider {
    use rustls::crypto::ring::cipher_suite::*;
    let mut provider = rustls::crypto::ring::default_provider();
    if aes_in_hardware() {
        let first = [
            TLS13_AES_128_GCM_SHA256,
            TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        ];
        provider
            .cipher_suites
            .retain(|suite| !first.contains(suite));
        provider.cipher_suites.splice(0..0, first);
    }
    provider
}

/// Whether AES-GCM runs in hardware here. As a server, sidekey then picks
/// by its own order rather than the agent's (most clients list AES-256
/// first): the X25519 or P-256 key exchange caps a connection at 128-bit
/// security anyway, so AES-256 adds cost, not strength.
pub fn aes_in_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}
