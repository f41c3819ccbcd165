//! Per-request hot path of the proxy, without any I/O:
//!
//! - `normalize`: canonicalising a typical API path;
//! - `policy_check`: deciding one request against a config of 20 rules;
//! - `inject_headers`: stripping hop-by-hop headers and setting the credential;
//! - `scrub/*`: response scrubbing (one secret, all its variants), streamed in
//!   one 64 B chunk and as 1 MiB in 16 KiB chunks (text, and binary as in a
//!   download or a git pack), plus `scrub_all` on 64 B;
//! - `request`: all of the above for one call with a 64 B response;
//! - `oidc_verify/*`: a workload JWT (ES256) checked for the first time, and
//!   again, as on every later request and open-tunnel recheck.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::path::Path;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method};
use sidekey::config::{Config, Slot};
use sidekey::identity::oidc::{JwksSource, OidcConfig, OidcVerifier};
use sidekey::policy::{NormalPath, Policy, Request, path::normalize};
use sidekey::scrub::{ScrubStream, Scrubber, variants};
use sidekey::secret::Secret;

const PATH: &str = "/v1/chat/completions";
const SSE_EVENT: &[u8] = b"data: {\"delta\":{\"content\":\"hello world, this is a token\"}}\n\n";
const SECRET: &str = "sk-proj-4f9c2a7e1b8d6035aa41c9e2f7b3d8106e5a92c4";

/// Two routes and 20 rules; the request below is allowed by the last one,
/// so every rule is looked at.
fn config() -> Config {
    let mut text = String::from(
        r#"
[secrets.openai]
source = "store"
[secrets.github]
source = "env:GITHUB_TOKEN"
[routes.openai]
upstream = "https://api.openai.com"
inject = { header = "authorization", format = "Bearer {secret}", secret = "openai" }
[routes.git]
upstream = "https://github.com"
inject = { basic = { username = "x-access-token", secret = "github" } }
"#,
    );
    for i in 0..19 {
        let (target, action) = match i % 4 {
            0 => (format!("host = \"pkg{i}.example.org\""), "allow"),
            1 => ("route = \"git\"".to_string(), "allow"),
            2 => ("route = \"openai\"".to_string(), "deny"),
            _ => (format!("host = \"*.svc{i}.example.net\""), "deny"),
        };
        text.push_str(&format!(
            "[[rules]]\nagents = [\"agent{i}\"]\n{target}\nmethods = [\"GET\", \"POST\"]\n\
             paths = [\"/v{i}/**\", \"/repos/*/issues\"]\naction = \"{action}\"\n"
        ));
    }
    text.push_str(
        "[[rules]]\nagents = [\"coder\"]\nroute = \"openai\"\nmethods = [\"POST\"]\n\
         paths = [\"/v1/chat/completions\", \"/v1/responses\"]\naction = \"allow\"\n",
    );
    Config::parse(&text, Path::new("bench.toml")).unwrap()
}

/// The headers an SDK typically sends, plus hop-by-hop ones and its own token.
fn agent_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in [
        ("host", "127.0.0.1:8080"),
        ("user-agent", "OpenAI/Python 1.51.0"),
        ("accept", "application/json"),
        ("content-type", "application/json"),
        ("content-length", "187"),
        ("authorization", "Bearer skt_agent_token_0123456789abcdef"),
        ("proxy-authorization", "Basic Y29kZXI6c2VjcmV0"),
        ("connection", "keep-alive, x-trace"),
        ("keep-alive", "timeout=5"),
        ("x-trace", "abc"),
        ("x-stainless-lang", "python"),
        ("openai-organization", "org-acme"),
    ] {
        h.append(name, HeaderValue::from_static(value));
    }
    h
}

/// `POST https://api.openai.com{path}` by agent `coder` through route `openai`.
fn request(path: &NormalPath) -> Request<'_> {
    Request {
        agent: "coder",
        session: "s-bench",
        claims: None,
        route: Some("openai"),
        host: "api.openai.com",
        port: 443,
        method: &Method::POST,
        overrides: &[],
        path,
    }
}

fn inject(h: &mut HeaderMap, slot: &Slot, secret: &Secret) {
    sidekey::inject::strip_hop_by_hop(h);
    sidekey::inject::headers(h, slot, "openai", secret).unwrap();
}

fn scrub_stream(scrubber: &Scrubber, chunks: &[Bytes]) -> usize {
    let mut stream = ScrubStream::default();
    let mut n = 0;
    for chunk in chunks {
        n += stream.push(scrubber, chunk.clone()).len();
    }
    n + stream.finish(scrubber).len()
}

fn hot_path(c: &mut Criterion) {
    let config = config();
    let policy = Policy::new(&config);
    let slot = &config.routes["openai"].inject.as_ref().unwrap().slot;
    let secret = Secret::new(SECRET.to_string());
    let scrubber = Scrubber::new(variants(&secret, None)).unwrap();
    let headers = agent_headers();
    let small =
        Bytes::from_static(br#"{"id":"chatcmpl-9xAb12","object":"chat.completion","choices":[]}"#);
    assert_eq!(small.len(), 64);
    // An SSE stream with the secret echoed once, mid-body.
    let mut big = SSE_EVENT.repeat((1 << 20) / SSE_EVENT.len() + 1);
    big.truncate(1 << 20);
    big[500_000..500_000 + SECRET.len()].copy_from_slice(SECRET.as_bytes());
    let big: Vec<Bytes> = big.chunks(16 << 10).map(Bytes::copy_from_slice).collect();
    // Uniform bytes (xorshift), where a secret's few first bytes are common.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let binary: Vec<u8> = (0..1 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let binary: Vec<Bytes> = binary
        .chunks(16 << 10)
        .map(Bytes::copy_from_slice)
        .collect();

    let path = normalize(PATH).unwrap();
    assert!(policy.check(&request(&path)).allowed);

    c.bench_function("normalize", |b| b.iter(|| normalize(black_box(PATH))));
    let req = request(&path);
    c.bench_function("policy_check", |b| b.iter(|| policy.check(black_box(&req))));
    c.bench_function("inject_headers", |b| {
        b.iter_batched_ref(
            || headers.clone(),
            |h| inject(h, slot, &secret),
            criterion::BatchSize::SmallInput,
        )
    });

    let mut g = c.benchmark_group("scrub");
    g.throughput(Throughput::Bytes(64));
    g.bench_function("stream_64B", |b| {
        b.iter(|| scrub_stream(&scrubber, std::slice::from_ref(black_box(&small))))
    });
    g.bench_function("scrub_all_64B", |b| {
        b.iter(|| scrubber.scrub_all(black_box(&small)))
    });
    g.throughput(Throughput::Bytes(1 << 20));
    g.bench_function("stream_1MiB_16KiB_chunks", |b| {
        b.iter(|| scrub_stream(&scrubber, black_box(&big)))
    });
    g.bench_function("stream_1MiB_binary_16KiB_chunks", |b| {
        b.iter(|| scrub_stream(&scrubber, black_box(&binary)))
    });
    g.finish();

    c.bench_function("request", |b| {
        b.iter_batched_ref(
            || headers.clone(),
            |h| {
                let path = normalize(black_box(PATH)).unwrap();
                assert!(policy.check(&request(&path)).allowed);
                inject(h, slot, &secret);
                scrub_stream(&scrubber, std::slice::from_ref(&small))
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

/// A verifier for one ES256 key, and a workload token it accepts.
fn oidc() -> (OidcVerifier, String) {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let point = pair.public_key_raw();
    let keys = serde_json::json!({"keys": [{
        "kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256",
        "x": b64.encode(&point[1..33]), "y": b64.encode(&point[33..65]),
    }]});
    let verifier = OidcVerifier::new(
        OidcConfig {
            issuer: "https://issuer.test".into(),
            audience: "sidekey".into(),
            jwks: JwksSource::Url("https://issuer.test/keys".into()),
            claim: "sub".into(),
            map: [("w".to_string(), "coder".to_string())].into(),
        },
        None,
    );
    verifier.set_keys(Ok(serde_json::from_value(keys).unwrap()));
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("k1".into());
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let claims =
        serde_json::json!({"iss": "https://issuer.test", "aud": "sidekey", "sub": "w", "exp": exp});
    let key = jsonwebtoken::EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
    (
        verifier,
        jsonwebtoken::encode(&header, &claims, &key).unwrap(),
    )
}

fn identity(c: &mut Criterion) {
    let mut g = c.benchmark_group("oidc_verify");
    g.bench_function("first", |b| {
        b.iter_batched(
            oidc,
            |(verifier, token)| verifier.verify_if_ours(black_box(&token)).unwrap().unwrap(),
            criterion::BatchSize::LargeInput,
        )
    });
    let (verifier, token) = oidc();
    g.bench_function("again", |b| {
        b.iter(|| verifier.verify_if_ours(black_box(&token)).unwrap().unwrap())
    });
    g.finish();
}

criterion_group!(benches, hot_path, identity);
criterion_main!(benches);
