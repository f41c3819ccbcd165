use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use crate::support::*;

const ISSUER: &str = "https://oidc.test.example";
const SECRET: &str = "sk-live-oidc-9d2";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Signing keys made at test time, and their public JWKs.
struct Keys {
    es256: EncodingKey,
    ed25519: EncodingKey,
    rs256: EncodingKey,
    rsa_public_pem: Vec<u8>,
    jwks: serde_json::Value,
}

fn keys(dir: &std::path::Path) -> Keys {
    let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let point = ec.public_key_raw();
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let rsa_path = dir.join("rsa.pem");
    let ok = Command::new("openssl")
        .args(["genrsa", "-out"])
        .arg(&rsa_path)
        .arg("2048")
        .output()
        .unwrap()
        .status
        .success();
    assert!(ok, "openssl genrsa");
    let modulus = Command::new("openssl")
        .args(["rsa", "-noout", "-modulus", "-in"])
        .arg(&rsa_path)
        .output()
        .unwrap();
    let hex = String::from_utf8(modulus.stdout).unwrap();
    let hex = hex.trim().trim_start_matches("Modulus=");
    let n: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let public = Command::new("openssl")
        .args(["rsa", "-pubout", "-in"])
        .arg(&rsa_path)
        .output()
        .unwrap()
        .stdout;
    let rsa_pem = std::fs::read(&rsa_path).unwrap();
    Keys {
        es256: EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).unwrap(),
        ed25519: EncodingKey::from_ed_pem(ed.serialize_pem().as_bytes()).unwrap(),
        rs256: EncodingKey::from_rsa_pem(&rsa_pem).unwrap(),
        rsa_public_pem: public,
        jwks: serde_json::json!({"keys": [
            {"kty": "EC", "crv": "P-256", "kid": "ec-1", "alg": "ES256", "use": "sig",
             "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65])},
            {"kty": "OKP", "crv": "Ed25519", "kid": "ed-1", "alg": "EdDSA", "use": "sig",
             "x": B64.encode(ed.public_key_raw())},
            {"kty": "RSA", "kid": "rsa-1", "alg": "RS256", "use": "sig",
             "n": B64.encode(&n), "e": "AQAB"},
        ]}),
    }
}

fn claims(sub: &str, aud: &str, exp: u64) -> serde_json::Value {
    serde_json::json!({"iss": ISSUER, "sub": sub, "aud": aud, "exp": exp, "iat": now(), "jti": "j-1"})
}

fn sign(alg: Algorithm, kid: &str, key: &EncodingKey, claims: &serde_json::Value) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_string());
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

#[test]
fn workload_jwts_become_identities_and_forgeries_fail() {
    let upstream = Upstream::http();
    let dir = tempfile::tempdir().unwrap();
    let keys = keys(dir.path());
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, keys.jwks.to_string()).unwrap();
    let env = TestEnv::new(&format!(
        r#"
[identity.oidc]
issuer = "{ISSUER}"
audience = "sidekey"
jwks_file = "{}"
claim = "sub"
[identity.oidc.map]
"system:serviceaccount:agents:coder" = "coder"
{}"#,
        jwks.display(),
        echo_route(&upstream, "store")
    ));
    env.set_secret("api", SECRET);
    let sidekey = env.spawn();
    let call = |token: &str| {
        let res = client()
            .get(sidekey.url("/echo/x"))
            .bearer_auth(token)
            .send()
            .unwrap();
        let code = res
            .headers()
            .get("x-sidekey-error")
            .map(|v| v.to_str().unwrap().to_string());
        (res.status().as_u16(), code)
    };
    let sa = "system:serviceaccount:agents:coder";
    let good = claims(sa, "sidekey", now() + 300);

    for (alg, kid, key) in [
        (Algorithm::ES256, "ec-1", &keys.es256),
        (Algorithm::EdDSA, "ed-1", &keys.ed25519),
        (Algorithm::RS256, "rsa-1", &keys.rs256),
    ] {
        assert_eq!(call(&sign(alg, kid, key, &good)), (200, None), "{alg:?}");
    }
    assert_eq!(
        upstream.last().header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );
    let record = env.audit().pop().unwrap();
    assert_eq!(record["agent"], "coder");
    assert_eq!(record["session"], format!("oidc:{sa}"));

    let unauthenticated = (401, Some("unauthenticated".to_string()));
    // Wrong audience, unmapped workload, unknown kid, not yet valid.
    assert_eq!(
        call(&sign(
            Algorithm::ES256,
            "ec-1",
            &keys.es256,
            &claims(sa, "other", now() + 300)
        )),
        unauthenticated
    );
    assert_eq!(
        call(&sign(
            Algorithm::ES256,
            "ec-1",
            &keys.es256,
            &claims("system:serviceaccount:x:y", "sidekey", now() + 300)
        )),
        unauthenticated
    );
    assert_eq!(
        call(&sign(Algorithm::ES256, "nope", &keys.es256, &good)),
        unauthenticated
    );
    let mut early = good.clone();
    early["nbf"] = (now() + 3600).into();
    assert_eq!(
        call(&sign(Algorithm::ES256, "ec-1", &keys.es256, &early)),
        unauthenticated
    );
    // Expired beyond the clock-skew allowance.
    assert_eq!(
        call(&sign(
            Algorithm::ES256,
            "ec-1",
            &keys.es256,
            &claims(sa, "sidekey", now() - 120)
        )),
        (401, Some("token_expired".to_string()))
    );
    // alg none.
    let none = format!(
        "{}.{}.",
        B64.encode(r#"{"alg":"none","typ":"JWT","kid":"rsa-1"}"#),
        B64.encode(good.to_string())
    );
    assert_eq!(call(&none), unauthenticated);
    // HS256 signed with the RSA public key as the HMAC secret (key confusion).
    let confused = sign(
        Algorithm::HS256,
        "rsa-1",
        &EncodingKey::from_secret(&keys.rsa_public_pem),
        &good,
    );
    assert_eq!(call(&confused), unauthenticated);
    // A forged signature.
    let mut forged = sign(Algorithm::ES256, "ec-1", &keys.es256, &good);
    forged.truncate(forged.len() - 4);
    forged.push_str("AAAA");
    assert_eq!(call(&forged), unauthenticated);

    // A workload's token ids and sessions are the identity provider's
    // spelling, not sidekey's names: each can be revoked as audited.
    let revoked = (401, Some("token_revoked".to_string()));
    let mut odd_id = good.clone();
    odd_id["jti"] = "a/b+c==".into();
    let odd_id = sign(Algorithm::ES256, "ec-1", &keys.es256, &odd_id);
    assert_eq!(call(&odd_id), (200, None));
    assert_eq!(env.audit().pop().unwrap()["token_id"], "a/b+c==");
    env.ok(&["token", "revoke", "--id", "a/b+c=="], None);
    assert_eq!(call(&odd_id), revoked);
    assert_eq!(
        call(&sign(Algorithm::ES256, "ec-1", &keys.es256, &good)),
        (200, None)
    );
    env.ok(
        &["token", "revoke", "--session", &format!("oidc:{sa}")],
        None,
    );
    assert_eq!(
        call(&sign(Algorithm::ES256, "ec-1", &keys.es256, &good)),
        revoked
    );
    let record = env.audit().pop().unwrap();
    assert_eq!(record["session"], format!("oidc:{sa}"), "{record}");
    assert_eq!(record["reason"], "token_revoked", "{record}");

    // Revoking the agent covers its workload tokens issued so far.
    env.ok(&["token", "revoke", "--agent", "coder"], None);
    assert_eq!(
        call(&sign(Algorithm::ES256, "ec-1", &keys.es256, &good)),
        (401, Some("token_revoked".to_string()))
    );
}

#[test]
fn an_unreadable_key_set_fails_closed() {
    let upstream = Upstream::http();
    let dir = tempfile::tempdir().unwrap();
    let keys = keys(dir.path());
    let jwks = dir.path().join("missing.json");
    let env = TestEnv::new(&format!(
        r#"
[identity.oidc]
issuer = "{ISSUER}"
audience = "sidekey"
jwks_file = "{}"
[identity.oidc.map]
"w" = "coder"
{}"#,
        jwks.display(),
        echo_route(&upstream, "store")
    ));
    env.set_secret("api", SECRET);
    let sidekey = env.spawn();
    let token = sign(
        Algorithm::ES256,
        "ec-1",
        &keys.es256,
        &claims("w", "sidekey", now() + 300),
    );
    let res = client()
        .get(sidekey.url("/echo/x"))
        .bearer_auth(&token)
        .send()
        .unwrap();
    assert_eq!(res.status(), 401);
    // The key set appears: picked up without restart.
    std::fs::write(&jwks, keys.jwks.to_string()).unwrap();
    eventually(std::time::Duration::from_secs(3), || {
        let res = client()
            .get(sidekey.url("/echo/x"))
            .bearer_auth(&token)
            .send()
            .unwrap();
        (res.status() == 200).then_some(())
    });
    assert_eq!(upstream.count(), 1);
}

#[test]
fn rules_can_match_workload_claims() {
    let upstream = Upstream::http();
    let dir = tempfile::tempdir().unwrap();
    let keys = keys(dir.path());
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, keys.jwks.to_string()).unwrap();
    let env = TestEnv::new(&format!(
        r#"
[identity.oidc]
issuer = "{ISSUER}"
audience = "sidekey"
jwks_file = "{}"
[identity.oidc.map]
"w" = "coder"
[secrets.api]
source = "store"
[routes.echo]
upstream = "{}"
inject = {{ header = "authorization", format = "Bearer {{secret}}", secret = "api" }}
[[rules]]
agents = ["coder"]
claims = {{ ns = "agents" }}
route = "echo"
action = "allow"
[[rules]]
name = "no-contractors"
agents = ["*"]
claims = {{ groups = "contractors" }}
route = "echo"
action = "deny"
"#,
        jwks.display(),
        upstream.base()
    ));
    env.set_secret("api", SECRET);
    let sidekey = env.spawn();
    let status_with = |ns: serde_json::Value, groups: Option<serde_json::Value>| {
        let mut claims = claims("w", "sidekey", now() + 300);
        claims["ns"] = ns;
        if let Some(groups) = groups {
            claims["groups"] = groups;
        }
        let token = sign(Algorithm::ES256, "ec-1", &keys.es256, &claims);
        client()
            .get(sidekey.url("/echo/x"))
            .bearer_auth(token)
            .send()
            .unwrap()
            .status()
    };
    let status = |ns: &str| status_with(ns.into(), None);
    assert_eq!(status("agents"), 200);
    assert_eq!(status("other"), 403);
    // Group claims are lists in most identity providers: the deny rule
    // matches an element, and an allow rule's value may sit in a list too.
    use serde_json::json;
    for groups in [
        json!("contractors"),
        json!(["contractors"]),
        json!(["staff", "contractors"]),
    ] {
        assert_eq!(
            status_with(json!("agents"), Some(groups.clone())),
            403,
            "{groups}"
        );
    }
    assert_eq!(status_with(json!("agents"), Some(json!(["staff"]))), 200);
    assert_eq!(status_with(json!(["other", "agents"]), None), 200);
    // A sidekey-issued token has no such claims.
    let token = env.token("coder");
    let res = client()
        .get(sidekey.url("/echo/x"))
        .bearer_auth(token)
        .send()
        .unwrap();
    assert_eq!(res.status(), 403);
}

#[test]
fn a_workload_jwt_must_match_its_proxy_user_name() {
    let upstream = Upstream::http();
    let dir = tempfile::tempdir().unwrap();
    let keys = keys(dir.path());
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, keys.jwks.to_string()).unwrap();
    let env = TestEnv::new(&format!(
        "[identity.oidc]\nissuer = \"{ISSUER}\"\naudience = \"sidekey\"\njwks_file = \"{}\"\n[identity.oidc.map]\n\"w\" = \"coder\"\n{}",
        jwks.display(),
        echo_route(&upstream, "store")
    ));
    env.set_secret("api", SECRET);
    let sidekey = env.spawn();
    let jwt = sign(
        Algorithm::ES256,
        "ec-1",
        &keys.es256,
        &claims("w", "sidekey", now() + 300),
    );
    let basic = |user: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{jwt}"))
        )
    };
    let status = |user: &str| {
        client()
            .get(sidekey.url("/echo/x"))
            .header("proxy-authorization", basic(user))
            .send()
            .unwrap()
            .status()
    };
    assert_eq!(status("coder"), 200);
    assert_eq!(status("mallory"), 401);
}

/// A `jwks_url` key set survives a reload: the new config version starts
/// with the keys already fetched, so workloads keep working even while the
/// issuer cannot be reached; a workload the reload maps anew works at once.
#[test]
fn a_key_set_that_failed_or_lacks_a_new_key_is_fetched_again_soon() {
    let upstream = Upstream::http();
    let issuer = Upstream::http();
    let dir = tempfile::tempdir().unwrap();
    let keys = keys(dir.path());
    // The issuer is down when sidekey starts.
    issuer.put(
        "/jwks.json",
        "text/html",
        b"<h1>502 Bad Gateway</h1>".to_vec(),
    );
    let env = TestEnv::new(&format!(
        r#"
[identity.oidc]
issuer = "{ISSUER}"
audience = "sidekey"
jwks_url = "{}/jwks.json"
[identity.oidc.map]
"w" = "coder"
{}"#,
        issuer.base(),
        echo_route(&upstream, "store")
    ));
    env.set_secret("api", SECRET);
    let sidekey = env.spawn();
    let call = |alg: Algorithm, kid: &str, key: &EncodingKey| {
        let token = sign(alg, kid, key, &claims("w", "sidekey", now() + 300));
        client()
            .get(sidekey.url("/echo/x"))
            .bearer_auth(token)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    eventually(std::time::Duration::from_secs(5), || {
        (issuer.count() >= 1).then_some(())
    });
    assert_eq!(call(Algorithm::ES256, "ec-1", &keys.es256), 401);
    // It comes back with one key: fetched again within seconds, not at the
    // next five-minute refresh.
    let mut only_ec = keys.jwks.clone();
    only_ec["keys"]
        .as_array_mut()
        .unwrap()
        .retain(|k| k["kid"] == "ec-1");
    issuer.put(
        "/jwks.json",
        "application/json",
        only_ec.to_string().into_bytes(),
    );
    eventually(std::time::Duration::from_secs(15), || {
        (call(Algorithm::ES256, "ec-1", &keys.es256) == 200).then_some(())
    });
    // The issuer publishes a new key: the first token that names it has
    // the set fetched again.
    issuer.put(
        "/jwks.json",
        "application/json",
        keys.jwks.to_string().into_bytes(),
    );
    assert_eq!(call(Algorithm::EdDSA, "ed-1", &keys.ed25519), 401);
    eventually(std::time::Duration::from_secs(15), || {
        (call(Algorithm::EdDSA, "ed-1", &keys.ed25519) == 200).then_some(())
    });
}

#[test]
fn a_reload_keeps_the_fetched_key_set_while_the_issuer_is_down() {
    let upstream = Upstream::http();
    let issuer = Upstream::http();
    let dir = tempfile::tempdir().unwrap();
    let keys = keys(dir.path());
    issuer.put(
        "/jwks.json",
        "application/json",
        keys.jwks.to_string().into_bytes(),
    );
    let config = |mapped: &str| {
        format!(
            r#"
[identity.oidc]
issuer = "{ISSUER}"
audience = "sidekey"
jwks_url = "{}/jwks.json"
[identity.oidc.map]
{mapped}
{}"#,
            issuer.base(),
            echo_route(&upstream, "store")
        )
    };
    let env = TestEnv::new(&config(r#""w" = "coder""#));
    env.set_secret("api", SECRET);
    let sidekey = env.spawn();
    let call = |workload: &str| {
        let token = sign(
            Algorithm::ES256,
            "ec-1",
            &keys.es256,
            &claims(workload, "sidekey", now() + 300),
        );
        client()
            .get(sidekey.url("/echo/x"))
            .bearer_auth(token)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    eventually(std::time::Duration::from_secs(5), || {
        (call("w") == 200).then_some(())
    });

    // The issuer breaks, then the config is reloaded with one more workload.
    issuer.put(
        "/jwks.json",
        "text/html",
        b"<h1>502 Bad Gateway</h1>".to_vec(),
    );
    let fetched = issuer.count();
    env.write_config(&config("\"w\" = \"coder\"\n\"w2\" = \"coder\""));
    env.ok(&["reload"], None);
    for _ in 0..10 {
        assert_eq!(call("w"), 200, "{}", sidekey.stderr());
        assert_eq!(call("w2"), 200, "{}", sidekey.stderr());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        issuer.count() > fetched,
        "the key set was fetched (and failed) again after the reload"
    );
}
