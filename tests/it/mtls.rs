use crate::support::*;

const SECRET: &str = "sk-live-mtls-c0a";

struct Setup {
    upstream: Upstream,
    env: TestEnv,
    sidekey: Sidekey,
    tls: String,
    ca: String,
}

fn setup() -> Setup {
    let upstream = Upstream::http();
    let env = TestEnv::new(&format!(
        "listen_tls = \"127.0.0.1:0\"\n{}",
        echo_route(&upstream, "store")
    ));
    env.set_secret("api", SECRET);
    let sidekey = env.spawn();
    let tls = format!("https://localhost:{}", sidekey.tls_addr().port());
    let ca = env.path("sidekey-ca.pem");
    std::fs::write(&ca, env.ok(&["ca", "cert"], None)).unwrap();
    Setup {
        upstream,
        env,
        sidekey,
        tls,
        ca: ca.display().to_string(),
    }
}

fn issue(env: &TestEnv, agent: &str, ttl: &str) -> (String, String, String) {
    let (serial, crt, key) = env.issue_cert(agent, ttl);
    let (crt, key) = (crt.display().to_string(), key.display().to_string());
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    (serial, crt, key)
}

#[test]
fn client_certificates_identify_agents_and_bad_ones_fail_the_handshake() {
    let s = setup();
    let (serial, crt, key) = issue(&s.env, "coder", "1h");
    let url = format!("{}/echo/x", s.tls);

    // curl with the agent's certificate.
    let (status, text) = curl(&["--cert", &crt, "--key", &key, "--cacert", &s.ca, &url]);
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        s.upstream.last().header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );
    assert_no_leak(&text, SECRET, "response");
    let record = s.env.audit().pop().unwrap();
    assert_eq!(record["agent"], "coder");
    assert_eq!(record["token_id"], serial.as_str());
    // Both HTTP versions, as agreed by ALPN.
    for version in ["--http1.1", "--http2"] {
        let (status, text) = curl(&[
            version, "--cert", &crt, "--key", &key, "--cacert", &s.ca, &url,
        ]);
        assert_eq!(status, 200, "{version}: {text}");
        assert_eq!(
            s.upstream.last().header("authorization"),
            Some(format!("Bearer {SECRET}").as_str())
        );
    }

    // A Rust client with the same identity.
    let pem = [std::fs::read(&crt).unwrap(), std::fs::read(&key).unwrap()].concat();
    let client = reqwest::blocking::Client::builder()
        .no_proxy()
        .use_rustls_tls()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&s.ca).unwrap()).unwrap(),
        )
        .identity(reqwest::Identity::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    assert_eq!(client.get(&url).send().unwrap().status(), 200);

    // A token for the certificate's agent agrees with it; one for another
    // agent is one identity too many.
    for (agent, status) in [("coder", 200), ("reviewer", 401)] {
        let res = client
            .get(&url)
            .bearer_auth(s.env.token(agent))
            .send()
            .unwrap();
        assert_eq!(res.status(), status, "a token for {agent}");
    }

    // No certificate, or one from another CA: refused at the handshake.
    let before = s.upstream.count();
    let (status, _) = curl(&["--cacert", &s.ca, &url]);
    assert_eq!(status, 0);
    // A self-signed certificate claiming the same SPIFFE ID.
    let other_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        rcgen::string::Ia5String::try_from("spiffe://sidekey/agent/coder").unwrap(),
    )];
    let other = params.self_signed(&other_key).unwrap();
    let other_crt = s.env.path("other.crt");
    let other_key_path = s.env.path("other.key");
    std::fs::write(&other_crt, other.pem()).unwrap();
    std::fs::write(&other_key_path, other_key.serialize_pem()).unwrap();
    let (status, _) = curl(&[
        "--cert",
        &other_crt.display().to_string(),
        "--key",
        &other_key_path.display().to_string(),
        "--cacert",
        &s.ca,
        &url,
    ]);
    assert_eq!(status, 0);
    assert_eq!(s.upstream.count(), before);

    // A certificate that expires: accepted while valid, refused after.
    let (_, old_crt, old_key) = issue(&s.env, "coder", "1s");
    let expired = || {
        curl(&[
            "--cert", &old_crt, "--key", &old_key, "--cacert", &s.ca, &url,
        ])
        .0 == 0
    };
    eventually(std::time::Duration::from_secs(5), || {
        expired().then_some(())
    });
    let before = s.upstream.count();
    assert!(expired());
    assert_eq!(s.upstream.count(), before);
    drop(s.sidekey);
}

#[test]
fn a_certificate_revoked_mid_connection_is_refused_at_the_next_request() {
    let s = setup();
    let (serial, crt, key) = issue(&s.env, "coder", "1h");
    let out = python(
        "import subprocess\n\
         s = requests.Session()\n\
         s.trust_env = False\n\
         s.cert = (sys.argv[2], sys.argv[3])\n\
         s.verify = sys.argv[4]\n\
         first = s.get(sys.argv[1])\n\
         subprocess.run([sys.argv[5], '-c', sys.argv[6], 'token', 'revoke', '--id', sys.argv[7]], check=True)\n\
         second = s.get(sys.argv[1])\n\
         print(first.status_code, second.status_code, second.headers.get('x-sidekey-error'))",
        &[
            &format!("{}/echo/x", s.tls),
            &crt,
            &key,
            &s.ca,
            bin(),
            &s.env.config.display().to_string(),
            &serial,
        ],
    );
    assert_eq!(out.trim(), "200 401 token_revoked");
    assert_eq!(s.upstream.count(), 1);
}
