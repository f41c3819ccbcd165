use std::path::Path;

use http::Method;

use super::*;

fn policy(rules: &str) -> Policy {
    let text = format!(
        r#"
[secrets.s]
source = "store"
[routes.openai]
upstream = "https://api.openai.com"
inject = {{ header = "authorization", format = "Bearer {{secret}}", secret = "s" }}
[routes.git]
upstream = "https://github.com"
{rules}"#
    );
    let config = crate::config::Config::parse(&text, Path::new("t.toml")).unwrap();
    Policy::new(&config)
}

/// (agent, route, method, path) -> (allowed, rule)
fn decide(policy: &Policy, agent: &str, route: &str, method: Method, path: &str) -> Decision {
    let path = path::normalize(path).unwrap();
    let host = if route == "openai" {
        "api.openai.com"
    } else {
        "github.com"
    };
    policy.check(&Request {
        agent,
        session: "s-1",
        claims: None,
        route: Some(route),
        host,
        port: 443,
        method: &method,
        overrides: &[],
        path: &path,
    })
}

#[test]
fn decision_table() {
    let p = policy(
        r#"
[[rules]]
name = "coder-chat"
agents = ["coder"]
route = "openai"
methods = ["POST"]
paths = ["/v1/chat/completions", "/v1/models/**"]
action = "allow"

[[rules]]
name = "no-admin"
agents = ["*"]
route = "openai"
paths = ["/v1/models/secret"]
action = "deny"

[[rules]]
agents = ["coder", "ci"]
route = "git"
paths = ["/acme/app.git/**"]
action = "allow"

[[rules]]
name = "github-anywhere"
agents = ["*"]
host = "github.com"
action = "allow"
"#,
    );
    type Case = (
        &'static str,
        &'static str,
        Method,
        &'static str,
        bool,
        Option<&'static str>,
    );
    let cases: &[Case] = &[
        (
            "coder",
            "openai",
            Method::POST,
            "/v1/chat/completions",
            true,
            Some("coder-chat"),
        ),
        (
            "coder",
            "openai",
            Method::GET,
            "/v1/chat/completions",
            false,
            None,
        ),
        (
            "other",
            "openai",
            Method::POST,
            "/v1/chat/completions",
            false,
            None,
        ),
        (
            "coder",
            "openai",
            Method::POST,
            "/v1/models/gpt",
            true,
            Some("coder-chat"),
        ),
        // deny wins over an earlier allow
        (
            "coder",
            "openai",
            Method::POST,
            "/v1/models/secret",
            false,
            Some("no-admin"),
        ),
        (
            "coder",
            "openai",
            Method::POST,
            "/v1//models/./secret",
            false,
            Some("no-admin"),
        ),
        (
            "ci",
            "git",
            Method::GET,
            "/acme/app.git/info/refs",
            true,
            Some("rules[2]"),
        ),
        (
            "ci",
            "git",
            Method::GET,
            "/acme/other.git/info/refs",
            false,
            None,
        ),
        // a host allow rule never grants a route, even on its host
        ("ci", "git", Method::GET, "/x", false, None),
        (
            "coder",
            "openai",
            Method::POST,
            "/v1/models/secret/",
            false,
            Some("no-admin"),
        ),
        (
            "coder",
            "openai",
            Method::POST,
            "/v1/models/secret;x",
            false,
            Some("no-admin"),
        ),
        (
            "coder",
            "openai",
            Method::POST,
            "/v1/models/Secret",
            false,
            Some("no-admin"),
        ),
    ];
    for (agent, route, method, path, allowed, rule) in cases {
        let d = decide(&p, agent, route, method.clone(), path);
        assert_eq!(d.allowed, *allowed, "{agent} {method} {route}{path}");
        assert_eq!(d.rule.as_deref(), *rule, "{agent} {method} {route}{path}");
    }
}

#[test]
fn host_patterns() {
    let cases = [
        ("example.com", "example.com", true),
        ("example.com", "api.example.com", false),
        ("*.example.com", "api.example.com", true),
        ("*.example.com", "a.b.example.com", true),
        ("*.example.com", "example.com", false),
        ("*.example.com", "badexample.com", false),
        ("*", "anything.org", true),
        ("Example.COM.", "example.com", true),
    ];
    for (pattern, host, want) in cases {
        let got = HostPattern::parse(pattern)
            .unwrap()
            .matches(&normalize_host(host));
        assert_eq!(got, want, "{pattern} vs {host}");
    }
    for bad in ["", "*.", "a..b", "ex ample.com", "*.*.com", "a/b"] {
        assert!(HostPattern::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn method_overrides_must_be_allowed_too() {
    let p = policy(
        r#"
[[rules]]
agents = ["coder"]
route = "openai"
methods = ["POST"]
action = "allow"
"#,
    );
    let path = path::normalize("/v1/x").unwrap();
    let req = |overrides: &[Method]| {
        p.check(&Request {
            agent: "coder",
            session: "s-1",
            claims: None,
            route: Some("openai"),
            host: "api.openai.com",
            port: 443,
            method: &Method::POST,
            overrides,
            path: &path,
        })
        .allowed
    };
    assert!(req(&[]));
    assert!(req(&[Method::POST]));
    assert!(!req(&[Method::DELETE]));
}

#[test]
fn a_method_rule_covers_every_spelling_of_its_method() {
    let p = policy(
        r#"
[[rules]]
agents = ["coder"]
route = "openai"
action = "allow"
[[rules]]
agents = ["coder"]
route = "openai"
methods = ["DELETE"]
action = "deny"
"#,
    );
    let path = path::normalize("/v1/x").unwrap();
    let allowed = |method: &str| {
        p.check(&Request {
            agent: "coder",
            session: "s-1",
            claims: None,
            route: Some("openai"),
            host: "api.openai.com",
            port: 443,
            method: &Method::from_bytes(method.as_bytes()).unwrap(),
            overrides: &[],
            path: &path,
        })
        .allowed
    };
    assert!(allowed("GET"));
    for spelling in ["DELETE", "delete", "Delete"] {
        assert!(!allowed(spelling), "{spelling}");
    }
}

#[test]
fn sessions_narrow_a_rule() {
    let p = policy(
        r#"
[[rules]]
agents = ["coder"]
sessions = ["ci-run-7"]
route = "openai"
action = "allow"
"#,
    );
    let path = path::normalize("/v1/x").unwrap();
    let allowed = |session: &str| {
        p.check(&Request {
            agent: "coder",
            session,
            claims: None,
            route: Some("openai"),
            host: "api.openai.com",
            port: 443,
            method: &Method::POST,
            overrides: &[],
            path: &path,
        })
        .allowed
    };
    assert!(allowed("ci-run-7"));
    assert!(!allowed("ci-run-8"));
}
