use std::process::Command;

use crate::gateway::{base64_encode, decode_claims};
use crate::support::*;

#[test]
fn oauth2_client_credentials_are_fetched_once_injected_and_scrubbed() {
    let upstream = Upstream::http();
    let env = TestEnv::new(&format!(
        r#"
[secrets.idp]
source = "store"
[routes.api]
upstream = "{base}"
inject = {{ oauth2 = {{ token_url = "{base}/token", client_id = "sidekey-client", client_secret = "idp", scope = "read write" }} }}
[routes.down]
upstream = "{base}"
inject = {{ oauth2 = {{ token_url = "{base}/token-fail", client_id = "c", client_secret = "idp" }} }}
[[rules]]
agents = ["coder"]
route = "api"
action = "allow"
[[rules]]
agents = ["coder"]
route = "down"
action = "allow"
"#,
        base = upstream.base()
    ));
    env.set_secret("idp", "client-secret-value");
    let token = env.token("coder");
    let sidekey = env.spawn();
    let url = sidekey.url("/api/v1/data");
    let bodies: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..50)
            .map(|_| {
                scope.spawn(|| {
                    let res = client().get(&url).bearer_auth(&token).send().unwrap();
                    assert_eq!(res.status(), 200);
                    res.text().unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let seen = upstream.seen();
    let token_calls: Vec<_> = seen.iter().filter(|s| s.uri.ends_with("/token")).collect();
    assert_eq!(
        token_calls.len(),
        1,
        "one fetch for many concurrent requests"
    );
    let call = token_calls[0];
    assert_eq!(call.method, "POST");
    assert_eq!(
        call.header("authorization"),
        Some(
            format!(
                "Basic {}",
                base64_encode("sidekey-client:client-secret-value")
            )
            .as_str()
        )
    );
    let form = String::from_utf8_lossy(&call.body);
    assert!(
        form.contains("grant_type=client_credentials") && form.contains("scope=read+write"),
        "{form}"
    );
    let api: Vec<_> = seen.iter().filter(|s| s.uri == "/v1/data").collect();
    assert_eq!(api.len(), 50);
    assert!(
        api.iter()
            .all(|s| s.header("authorization") == Some("Bearer at-1-opaque"))
    );
    for body in &bodies {
        assert_no_leak(body, "at-1-opaque", "response");
        assert!(body.contains("Bearer [REDACTED]"), "{body}");
    }

    // The upstream refuses the token (revoked early at the identity
    // provider): the next request carries a new one, not the same until
    // it expires an hour from now.
    let get = |path: &str| {
        client()
            .get(sidekey.url(path))
            .bearer_auth(&token)
            .send()
            .unwrap()
    };
    assert_eq!(get("/api/status/401").status(), 401);
    assert_eq!(get("/api/v1/data").status(), 200);
    assert_eq!(
        upstream.last().header("authorization"),
        Some("Bearer at-2-opaque")
    );

    let res = client()
        .get(sidekey.url("/down/x"))
        .bearer_auth(&token)
        .send()
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["x-sidekey-error"], "secret_unavailable");
    assert!(
        !res.text().unwrap().contains("token-fail"),
        "the cause stays in sidekey's log"
    );
    // ...and in the audit record, as issue 5 asks.
    let record = env.audit().pop().unwrap();
    assert_eq!(record["reason"], "secret_unavailable", "{record}");
    let detail = record["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("token-fail") && detail.contains("500"),
        "{record}"
    );
    let tail = env.ok(&["audit", "tail"], None);
    assert!(tail.contains("500 Internal Server Error"), "{tail}");
    assert_no_leak(&sidekey.stderr(), "at-1-opaque", "stderr");
    assert_no_leak(&sidekey.stderr(), "client-secret-value", "stderr");
    assert_no_leak(&env.audit_text(), "at-1-opaque", "audit");
}

#[test]
fn an_access_token_is_renewed_before_it_expires() {
    let upstream = Upstream::http();
    let env = TestEnv::new(&format!(
        r#"
[secrets.idp]
source = "store"
[routes.api]
upstream = "{base}"
inject = {{ oauth2 = {{ token_url = "{base}/token-short", client_id = "c", client_secret = "idp" }} }}
[[rules]]
agents = ["coder"]
route = "api"
action = "allow"
"#,
        base = upstream.base()
    ));
    env.set_secret("idp", "s");
    let token = env.token("coder");
    let sidekey = env.spawn();
    let get = || {
        let res = client()
            .get(sidekey.url("/api/x"))
            .bearer_auth(&token)
            .send()
            .unwrap();
        assert_eq!(res.status(), 200);
        upstream.last().header("authorization").unwrap().to_string()
    };
    assert_eq!(get(), "Bearer at-1-opaque");
    // The 32 s token enters the 30 s renewal margin after 2 s: a new one is
    // fetched while the old one is still valid.
    eventually(std::time::Duration::from_secs(6), || {
        (get() == "Bearer at-2-opaque").then_some(())
    });
    // The renewed-away token is still valid at the endpoint for some 30 s:
    // an upstream that logged it cannot hand it back.
    let history = client()
        .get(sidekey.url("/api/history"))
        .bearer_auth(&token)
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(history.contains("[REDACTED]"), "{history}");
    assert!(!history.contains("at-1-opaque"), "{history}");
}

#[test]
fn a_gcp_service_account_key_becomes_short_lived_access_tokens() {
    let upstream = Upstream::http();
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("sa.pem");
    let ok = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&pem)
        .output()
        .unwrap()
        .status
        .success();
    assert!(ok, "openssl genpkey");
    let token_uri = format!("{}/token", upstream.base());
    let key = serde_json::json!({
        "type": "service_account",
        "client_email": "agent@project.iam.gserviceaccount.com",
        "private_key_id": "k-1",
        "private_key": std::fs::read_to_string(&pem).unwrap(),
        "token_uri": token_uri,
    });
    let env = TestEnv::new(&format!(
        r#"
[secrets.sa]
source = "store"
[routes.gcs]
upstream = "{}"
inject = {{ gcp_service_account = {{ key = "sa", scopes = ["https://www.googleapis.com/auth/devstorage.read_only"] }} }}
[[rules]]
agents = ["coder"]
route = "gcs"
action = "allow"
"#,
        upstream.base()
    ));
    env.set_secret("sa", &key.to_string());
    let token = env.token("coder");
    let sidekey = env.spawn();
    for _ in 0..2 {
        let res = client()
            .get(sidekey.url("/gcs/storage/v1/b"))
            .bearer_auth(&token)
            .send()
            .unwrap();
        assert_eq!(res.status(), 200);
        let body = res.text().unwrap();
        assert_no_leak(&body, "at-1-opaque", "response");
        assert_no_leak(&body, "BEGIN PRIVATE KEY", "response");
    }
    let seen = upstream.seen();
    let grants: Vec<_> = seen.iter().filter(|s| s.uri.ends_with("/token")).collect();
    assert_eq!(grants.len(), 1, "the access token is cached");
    let form = String::from_utf8_lossy(&grants[0].body).into_owned();
    assert!(
        form.starts_with(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion="
        ),
        "{form}"
    );
    let assertion = form.split("assertion=").nth(1).unwrap();
    // Verified with the public half of the key.
    let public = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&pem)
        .output()
        .unwrap()
        .stdout;
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&[token_uri.as_str()]);
    let verified = jsonwebtoken::decode::<serde_json::Value>(
        assertion,
        &jsonwebtoken::DecodingKey::from_rsa_pem(&public).unwrap(),
        &validation,
    )
    .expect("the assertion is signed with the service-account key");
    assert_eq!(verified.header.kid.as_deref(), Some("k-1"));
    let claims = decode_claims(assertion);
    assert_eq!(claims["iss"], "agent@project.iam.gserviceaccount.com");
    assert_eq!(claims["aud"], token_uri.as_str());
    assert_eq!(
        claims["scope"],
        "https://www.googleapis.com/auth/devstorage.read_only"
    );
    let api = seen.iter().filter(|s| s.uri == "/storage/v1/b").count();
    assert_eq!(api, 2);
    assert_eq!(
        upstream.last().header("authorization"),
        Some("Bearer at-1-opaque")
    );
    assert_no_leak(&sidekey.stderr(), "BEGIN PRIVATE KEY", "stderr");
}

#[test]
fn vault_kv_secrets_are_read_with_the_vault_token_and_fail_closed() {
    let upstream = Upstream::http();
    let config = |token_secret: &str| {
        format!(
            r#"
[vault]
addr = "{base}"
token = "{token_secret}"
ttl = "60s"
[secrets.vt]
source = "store"
[secrets.bad]
source = "store"
[secrets.api]
source = "vault:secret/agents/openai#api_key"
[routes.echo]
upstream = "{base}"
inject = {{ header = "authorization", format = "Bearer {{secret}}", secret = "api" }}
[[rules]]
agents = ["coder"]
route = "echo"
action = "allow"
"#,
            base = upstream.base()
        )
    };
    let env = TestEnv::new(&config("vt"));
    env.set_secret("vt", "vault-token-1");
    env.set_secret("bad", "not-a-vault-token");
    let token = env.token("coder");
    let sidekey = env.spawn();
    let res = client()
        .get(sidekey.url("/echo/x"))
        .bearer_auth(&token)
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_no_leak(&res.text().unwrap(), "kv-vault-token-1", "response");
    let read = upstream
        .seen()
        .into_iter()
        .find(|s| s.uri.starts_with("/v1/"))
        .unwrap();
    assert_eq!(read.uri, "/v1/secret/data/agents/openai");
    assert_eq!(
        upstream.last().header("authorization"),
        Some("Bearer kv-vault-token-1")
    );

    // Vault refuses the token: the secret is unavailable, requests fail closed.
    env.write_config(&config("bad"));
    env.ok(&["reload"], None);
    let res = client()
        .get(sidekey.url("/echo/x"))
        .bearer_auth(&token)
        .send()
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_no_leak(&sidekey.stderr(), "vault-token-1", "stderr");
}

/// Signs like an AWS SDK would, with `access_key` (for an agent: its token).
fn sigv4_headers(
    method: &str,
    url: &str,
    service: &str,
    access_key: &str,
    secret_key: &str,
    body: &[u8],
    declared: Option<&str>,
    time: std::time::SystemTime,
    extra: &[(String, String)],
) -> Vec<(String, String)> {
    use aws_sigv4::http_request::{
        PayloadChecksumKind, SignableBody, SignableRequest, SigningSettings, sign,
    };
    let identity =
        aws_credential_types::Credentials::new(access_key, secret_key, None, None, "test").into();
    let mut settings = SigningSettings::default();
    if service == "s3" {
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        settings.uri_path_normalization_mode =
            aws_sigv4::http_request::UriPathNormalizationMode::Disabled;
        settings.percent_encoding_mode = aws_sigv4::http_request::PercentEncodingMode::Single;
    }
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region("us-east-1")
        .name(service)
        .time(time)
        .settings(settings)
        .build()
        .unwrap()
        .into();
    let host = url.split('/').nth(2).unwrap().to_string();
    let mut headers = vec![("host".to_string(), host)];
    headers.extend(extra.iter().cloned());
    let signable_body = match declared {
        Some("UNSIGNED-PAYLOAD") => SignableBody::UnsignedPayload,
        Some(hash) => SignableBody::Precomputed(hash.to_string()),
        None => SignableBody::Bytes(body),
    };
    let signable = SignableRequest::new(
        method,
        url,
        headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        signable_body,
    )
    .unwrap();
    let (instructions, _) = sign(signable, &params).unwrap().into_parts();
    let mut req = http::Request::builder()
        .method(method)
        .uri(url)
        .body(())
        .unwrap();
    instructions.apply_to_request_http1x(&mut req);
    req.headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
        .collect()
}

/// `20261123T054500Z` -> the time it names.
fn amz_time(text: &str) -> std::time::SystemTime {
    let rfc = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &text[0..4],
        &text[4..6],
        &text[6..8],
        &text[9..11],
        &text[11..13],
        &text[13..15]
    );
    humantime::parse_rfc3339(&rfc).unwrap()
}

#[test]
fn aws_sigv4_requests_are_re_signed_with_the_real_keys() {
    let upstream = Upstream::http();
    let env = TestEnv::new(&format!(
        r#"
[secrets.aws_id]
source = "store"
[secrets.aws_secret]
source = "store"
[routes.s3]
upstream = "{base}"
inject = {{ aws_sigv4 = {{ service = "s3", region = "us-east-1", access_key_id = "aws_id", secret_access_key = "aws_secret" }} }}
[routes.bedrock]
upstream = "{base}"
inject = {{ aws_sigv4 = {{ service = "bedrock", region = "us-east-1", access_key_id = "aws_id", secret_access_key = "aws_secret" }} }}
[[rules]]
agents = ["coder"]
route = "s3"
action = "allow"
[[rules]]
agents = ["coder"]
route = "bedrock"
action = "allow"
"#,
        base = upstream.base()
    ));
    env.set_secret("aws_id", "AKIAREALKEY0001");
    env.set_secret("aws_secret", "real/secret+key");
    let token = env.token("coder");
    let sidekey = env.spawn();
    let now = std::time::SystemTime::now();

    for (route, service, body, declared) in [
        (
            "s3",
            "s3",
            b"object bytes".to_vec(),
            Some("UNSIGNED-PAYLOAD"),
        ),
        ("bedrock", "bedrock", br#"{"prompt":"hi"}"#.to_vec(), None),
    ] {
        let url = sidekey.url(&format!("/{route}/model/x/invoke"));
        let mut req = client().post(&url).body(body.clone());
        for (k, v) in sigv4_headers(
            "POST",
            &url,
            service,
            &token,
            "agent-placeholder",
            &body,
            declared,
            now,
            &[],
        ) {
            if k != "host" {
                req = req.header(k, v);
            }
        }
        if let Some(declared) = declared {
            req = req.header("x-amz-content-sha256", declared);
        }
        let res = req.send().unwrap();
        assert_eq!(res.status(), 200, "{route}");
        let text = res.text().unwrap();
        assert_no_leak(&text, "real/secret+key", "response");
        assert_no_leak(&text, "AKIAREALKEY0001", "response");

        verify_resigned(&upstream, service, &body, declared, &token);
    }
    assert_no_leak(&sidekey.stderr(), "real/secret+key", "stderr");
}

#[test]
fn token_exchange_uses_the_agents_token_as_the_subject() {
    let upstream = Upstream::http();
    let env = TestEnv::new(&format!(
        r#"
[secrets.idp]
source = "store"
[routes.api]
upstream = "{base}"
inject = {{ oauth2 = {{ token_url = "{base}/token", client_id = "sidekey", client_secret = "idp", grant = "token_exchange", audience = "api" }} }}
[[rules]]
agents = ["coder", "reviewer"]
route = "api"
action = "allow"
"#,
        base = upstream.base()
    ));
    env.set_secret("idp", "client-secret-value");
    let coder = env.token("coder");
    let reviewer = env.token("reviewer");
    let sidekey = env.spawn();
    for token in [&coder, &coder, &reviewer] {
        let res = client()
            .get(sidekey.url("/api/x"))
            .bearer_auth(token)
            .send()
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    let seen = upstream.seen();
    let exchanges: Vec<String> = seen
        .iter()
        .filter(|s| s.uri.ends_with("/token"))
        .map(|s| String::from_utf8_lossy(&s.body).into_owned())
        .collect();
    assert_eq!(
        exchanges.len(),
        2,
        "one exchange per agent token, then cached"
    );
    assert!(
        exchanges[0]
            .contains("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange")
    );
    assert!(
        exchanges[0].contains(&format!("subject_token={coder}")),
        "{}",
        exchanges[0]
    );
    assert!(exchanges[1].contains(&format!("subject_token={reviewer}")));
    assert!(exchanges[0].contains("audience=api"));
    // Each agent's requests carry its own exchanged token.
    let api: Vec<_> = seen.iter().filter(|s| s.uri == "/x").collect();
    assert_eq!(
        api[0].header("authorization"),
        api[1].header("authorization")
    );
    assert_ne!(
        api[0].header("authorization"),
        api[2].header("authorization")
    );
    // An upstream that serves its request log to reviewer does not give
    // reviewer coder's exchanged token, nor coder reviewer's.
    let coders = api[0].header("authorization").unwrap().to_string();
    let reviewers = api[2].header("authorization").unwrap().to_string();
    for (token, other) in [(&reviewer, &coders), (&coder, &reviewers)] {
        let history = client()
            .get(sidekey.url("/api/history"))
            .bearer_auth(token)
            .send()
            .unwrap()
            .text()
            .unwrap();
        let other = other.trim_start_matches("Bearer ");
        assert!(!history.contains(other), "{other} in {history}");
        assert!(history.contains("[REDACTED]"), "{history}");
    }
}

#[test]
fn vault_approle_logs_in_before_reading() {
    let upstream = Upstream::http();
    let env = TestEnv::new(&format!(
        r#"
[vault]
addr = "{base}"
approle = {{ role_id = "role-1", secret_id = "vault_secret_id" }}
[secrets.vault_secret_id]
source = "store"
[secrets.api]
source = "vault:secret/data/agents/openai#api_key"
[routes.echo]
upstream = "{base}"
inject = {{ header = "authorization", format = "Bearer {{secret}}", secret = "api" }}
[[rules]]
agents = ["coder"]
route = "echo"
action = "allow"
"#,
        base = upstream.base()
    ));
    env.set_secret("vault_secret_id", "secret-id-1");
    let token = env.token("coder");
    let sidekey = env.spawn();
    let res = client()
        .get(sidekey.url("/echo/x"))
        .bearer_auth(&token)
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        upstream.last().header("authorization"),
        Some("Bearer kv-vault-token-approle")
    );
    assert!(
        upstream
            .seen()
            .iter()
            .any(|s| s.uri == "/v1/auth/approle/login" && s.method == "POST")
    );
    assert_no_leak(&sidekey.stderr(), "secret-id-1", "stderr");
}

#[test]
fn vault_over_https_trusts_its_own_ca() {
    let dir = tempfile::tempdir().unwrap();
    let vault = Upstream::https(dir.path());
    let api = Upstream::http();
    let config = |ca: &str| {
        format!(
            r#"
[vault]
addr = "{vault}"
token = "vt"
{ca}
[secrets.vt]
source = "store"
[secrets.api]
source = "vault:secret/agents/openai#api_key"
[routes.echo]
upstream = "{api}"
inject = {{ header = "authorization", format = "Bearer {{secret}}", secret = "api" }}
[[rules]]
agents = ["coder"]
route = "echo"
action = "allow"
"#,
            vault = vault.base(),
            api = api.base()
        )
    };
    let env = TestEnv::new(&config(""));
    env.set_secret("vt", "vault-token-tls");
    let token = env.token("coder");
    let sidekey = env.spawn();
    let get = || {
        client()
            .get(sidekey.url("/echo/x"))
            .bearer_auth(&token)
            .send()
            .unwrap()
            .status()
    };
    assert_eq!(get(), 503, "an unknown CA is not trusted");
    env.write_config(&config(&format!(
        "ca = \"{}\"",
        vault.ca.as_ref().unwrap().display()
    )));
    env.ok(&["reload"], None);
    assert_eq!(get(), 200);
    assert_eq!(
        api.last().header("authorization"),
        Some("Bearer kv-vault-token-tls")
    );
}

/// Checks that the upstream's last request carries a SigV4 signature made
/// with the real keys (recomputed here), and nothing of the agent's.
fn verify_resigned(
    upstream: &Upstream,
    service: &str,
    body: &[u8],
    declared: Option<&str>,
    token: &str,
) {
    // What arrived is signed with the real keys: recompute and compare.
    let seen = upstream.last();
    assert_eq!(seen.body, body);
    let auth = seen.header("authorization").unwrap().to_string();
    assert!(
        auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIAREALKEY0001/"),
        "{auth}"
    );
    assert!(!auth.contains(token));
    let upstream_url = format!("{}{}", upstream.base(), seen.uri);
    // Sign again what the signature says it covered.
    let signed: Vec<&str> = auth
        .split("SignedHeaders=")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .split(';')
        .collect();
    let mut covered: Vec<(String, String)> = seen
        .headers
        .iter()
        .filter(|(k, _)| signed.contains(&k.as_str()))
        .filter(|(k, _)| !matches!(k.as_str(), "host" | "x-amz-date" | "x-amz-content-sha256"))
        .cloned()
        .collect();
    // The test server's HTTP layer answers `Expect` itself and hides it.
    if signed.contains(&"expect") && seen.header("expect").is_none() {
        covered.push(("expect".to_string(), "100-continue".to_string()));
    }
    let expected = sigv4_headers(
        &seen.method,
        &upstream_url,
        service,
        "AKIAREALKEY0001",
        "real/secret+key",
        body,
        declared,
        amz_time(seen.header("x-amz-date").unwrap()),
        &covered,
    );
    let expected_auth = expected
        .iter()
        .find(|(k, _)| k == "authorization")
        .unwrap()
        .1
        .clone();
    assert_eq!(
        auth, expected_auth,
        "{service}: the signature is the real keys'"
    );
}

#[test]
fn boto3_s3_requests_are_re_signed() {
    let upstream = Upstream::http();
    let env = TestEnv::new(&format!(
        r#"
[secrets.aws_id]
source = "store"
[secrets.aws_secret]
source = "store"
[routes.s3]
upstream = "{}"
inject = {{ aws_sigv4 = {{ service = "s3", region = "us-east-1", access_key_id = "aws_id", secret_access_key = "aws_secret" }} }}
[[rules]]
agents = ["coder"]
route = "s3"
action = "allow"
"#,
        upstream.base()
    ));
    env.set_secret("aws_id", "AKIAREALKEY0001");
    env.set_secret("aws_secret", "real/secret+key");
    let token = env.token("coder");
    let sidekey = env.spawn();
    // boto3 as an agent would use it: the token in place of the access key id.
    let out = python(
        "import boto3\n\
         from botocore.config import Config\n\
         s3 = boto3.client('s3', endpoint_url=sys.argv[1], aws_access_key_id=sys.argv[2],\n\
         \x20   aws_secret_access_key='placeholder', region_name='us-east-1',\n\
         \x20   config=Config(s3={'addressing_style': 'path'}, retries={'max_attempts': 1}))\n\
         r = s3.put_object(Bucket='bucket', Key='key.txt', Body=b'hello from boto3')\n\
         print(r['ResponseMetadata']['HTTPStatusCode'])",
        &[&sidekey.url("/s3"), &token],
    );
    assert_eq!(out.trim(), "200");
    let seen = upstream.last();
    assert_eq!(seen.uri, "/bucket/key.txt");
    assert_eq!(seen.body, b"hello from boto3");
    let declared = seen.header("x-amz-content-sha256").map(str::to_string);
    verify_resigned(&upstream, "s3", &seen.body, declared.as_deref(), &token);

    // A presigned URL, through the gateway and through the forward proxy:
    // the token in X-Amz-Credential is the identity, and what arrives is
    // signed once, in headers, with the real keys (AWS refuses a request
    // signed both ways).
    let presigned = |endpoint: &str| {
        python(
            "import boto3\n\
             from botocore.config import Config\n\
             s3 = boto3.client('s3', endpoint_url=sys.argv[1], aws_access_key_id=sys.argv[2],\n\
             \x20   aws_secret_access_key='placeholder', region_name='us-east-1',\n\
             \x20   config=Config(signature_version='s3v4', s3={'addressing_style': 'path'}))\n\
             print(s3.generate_presigned_url('get_object', Params={'Bucket': 'bucket', 'Key': 'key.txt'}, ExpiresIn=300))",
            &[endpoint, &token],
        )
        .trim()
        .to_string()
    };
    let via_gateway = presigned(&sidekey.url("/s3"));
    assert!(via_gateway.contains("X-Amz-Signature="), "{via_gateway}");
    let via_proxy = presigned(&upstream.base());
    for (name, status) in [
        ("gateway", curl(&[&via_gateway]).0),
        (
            "forward proxy",
            curl_via(
                &format!("http://coder:{token}@{}", sidekey.addr),
                &[&via_proxy],
            )
            .0,
        ),
    ] {
        assert_eq!(status, 200, "{name}");
        let seen = upstream.last();
        assert_eq!(
            seen.uri, "/bucket/key.txt",
            "{name}: presigned parameters left"
        );
        let declared = seen.header("x-amz-content-sha256").map(str::to_string);
        verify_resigned(&upstream, "s3", b"", declared.as_deref(), &token);
    }
}
