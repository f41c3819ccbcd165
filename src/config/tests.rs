use std::path::Path;

use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("/etc/sidekey/sidekey.toml"))
}

fn problems(text: &str) -> Vec<String> {
    match parse(text) {
        Ok(_) => Vec::new(),
        Err(e) => e
            .problems
            .iter()
            .map(|p| format!("{}: {}", p.at, p.message))
            .collect(),
    }
}

const GOOD: &str = r#"
listen = "127.0.0.1:9090"
state_dir = "state"

[audit]
file = "-"
on_failure = "continue"

[secrets.openai]
source = "store"
[secrets.github]
source = "env:GITHUB_TOKEN"

[routes.openai]
upstream = "https://api.openai.com/"
inject = { header = "authorization", format = "Bearer {secret}", secret = "openai" }
placeholder_env = "OPENAI_API_KEY"

[routes.git]
upstream = "https://github.com"
inject = { basic = { username = "x-access-token", secret = "github" } }

[routes.maps]
upstream = "http://maps.example.com:8081/api"
inject = { query = "key", secret = "openai" }

[[rules]]
agents = ["coder"]
route = "openai"
methods = ["post"]
paths = ["/v1/chat/completions"]
action = "allow"

[[rules]]
agents = ["*"]
host = "PyPI.org."
action = "allow"
"#;

#[test]
fn parses_the_spec_shapes() {
    let config = parse(GOOD).unwrap();
    assert_eq!(config.listen.to_string(), "127.0.0.1:9090");
    assert_eq!(config.state_dir, Some("/etc/sidekey/state".into()));
    assert_eq!(config.audit.sink, AuditSink::Stdout);
    assert_eq!(config.audit.on_failure, OnFailure::Continue);
    let openai = &config.routes["openai"];
    assert_eq!(openai.upstream.origin(), "https://api.openai.com");
    assert_eq!(openai.upstream.base_path, "");
    let maps = &config.routes["maps"];
    assert_eq!(maps.upstream.port, 8081);
    assert_eq!(maps.upstream.base_path, "/api");
    assert_eq!(
        config.routes["git"].inject.as_ref().unwrap().slot,
        Slot::Basic {
            username: "x-access-token".into()
        }
    );
    assert_eq!(config.rules[0].methods, Some(vec![Method::POST]));
    assert_eq!(
        config.rules[1].target,
        Target::Host {
            pattern: HostPattern::Exact("pypi.org".into()),
            port: None
        }
    );
}

#[test]
fn every_problem_is_reported_with_its_location() {
    let text = r#"
listen = "nowhere"
colour = "blue"

[secrets.a]
source = "hsm:x"

[routes.r]
upstream = "ftp://x"
inject = { header = "authorization", secret = "missing" }
bogus = 1

[routes.s]
upstream = "https://ok.example"
inject = { header = "authorization", format = "Bearer", secret = "a" }

[[rules]]
agents = []
route = "nope"
action = "maybe"

[[rules]]
agents = ["x"]
route = "s"
host = "example.com"
action = "allow"
"#;
    let found = problems(text);
    let expect = [
        "listen: invalid listen address",
        "colour: unknown key",
        "secrets.a.source: unknown secret source",
        "routes.r.bogus: unknown field `bogus`",
        "routes.s.inject.format: must contain `{secret}` exactly once",
        "rules[0].action: invalid action",
        "rules[0].agents: empty list",
        "rules[0].route: no route named \"nope\"",
        "rules[1]: give `route` or `host`, not both",
    ];
    for want in expect {
        assert!(
            found.iter().any(|f| f.starts_with(want)),
            "missing {want:?} in {found:#?}"
        );
    }
}

#[test]
fn a_key_set_is_fetched_in_clear_only_from_loopback() {
    let with = |url: &str| {
        problems(&format!(
            "[identity.oidc]\nissuer = \"https://i.example\"\naudience = \"a\"\njwks_url = \"{url}\"\n[identity.oidc.map]\nw = \"coder\"\n"
        ))
    };
    for ok in [
        "https://oidc.example/keys",
        "http://127.0.0.1:8080/keys",
        "http://localhost/keys",
        "http://[::1]:9/keys",
    ] {
        assert_eq!(with(ok), Vec::<String>::new(), "{ok}");
    }
    for clear in ["http://oidc.example/keys", "http://10.0.0.5/keys"] {
        let found = with(clear);
        assert!(
            found
                .iter()
                .any(|f| f.starts_with("identity.oidc.jwks_url:") && f.contains("https")),
            "{clear}: {found:?}"
        );
    }
}

#[test]
fn a_value_of_the_wrong_type_is_reported_at_its_own_key() {
    let text = r#"
[agents.x]
unix_uids = ["a"]

[routes.a]
upstream = 5

[routes.b]
upstream = "https://ok.example"
inject = { basic = { username = 3, secret = "s" } }

[secrets.s]
source = "env:S"

[[rules]]
agents = ["x"]
host = "a.example"
methods = "GET"
action = "allow"
"#;
    let found = problems(text);
    for want in [
        "agents.x.unix_uids[0]: invalid type: string \"a\", expected u32",
        "routes.a.upstream: invalid type: integer `5`, expected a string",
        "routes.b.inject.basic.username: invalid type: integer `3`",
        "rules[0].methods: invalid type: string \"GET\", expected a sequence",
    ] {
        assert!(
            found.iter().any(|f| f.starts_with(want)),
            "missing {want:?} in {found:#?}"
        );
    }
}

#[test]
fn references_and_shapes_are_checked() {
    let cases = [
        (
            r#"[routes.r]
upstream = "https://x"
inject = { header = "authorization", secret = "none" }"#,
            "routes.r.inject.secret: no secret named \"none\"",
        ),
        (
            r#"[secrets.s]
source = "store"
[routes.r]
upstream = "https://x"
inject = { header = "host", secret = "s" }"#,
            "routes.r.inject.header",
        ),
        (
            r#"[secrets.s]
source = "store"
[routes.r]
upstream = "https://x"
inject = { query = "key", header = "x", secret = "s" }"#,
            "routes.r.inject: give exactly one injection kind",
        ),
        (
            r#"[routes.r]
upstream = "https://user:pw@x"
"#,
            "routes.r.upstream",
        ),
        (
            r#"[[rules]]
agents = ["a"]
action = "allow""#,
            "rules[0]: give `route` or `host`",
        ),
        (
            r#"[[rules]]
agents = ["a"]
host = "*.example.com"
paths = ["v1"]
action = "allow""#,
            "rules[0].paths",
        ),
        ("listen = [", "line 1"),
    ];
    for (text, want) in cases {
        let found = problems(text);
        assert!(
            found.iter().any(|f| f.starts_with(want)),
            "missing {want:?} in {found:#?}"
        );
    }
}

#[test]
fn examples_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            if let Err(e) = Config::parse(&text, &path) {
                panic!("{e}");
            }
        }
    }
}

#[test]
fn presets_fill_routes_and_yield_to_what_is_written() {
    let config = parse(
        r#"
[secrets.key]
source = "store"
[routes.anthropic]
preset = "anthropic"
secret = "key"
[routes.local]
preset = "openai"
secret = "key"
upstream = "http://127.0.0.1:9000"
placeholder_env = "MY_KEY"
"#,
    )
    .unwrap();
    let anthropic = &config.routes["anthropic"];
    assert_eq!(anthropic.upstream.origin(), "https://api.anthropic.com");
    assert_eq!(
        anthropic.placeholder_env.as_deref(),
        Some("ANTHROPIC_API_KEY")
    );
    assert_eq!(
        anthropic.inject.as_ref().unwrap().slot,
        Slot::Header {
            name: HeaderName::from_static("x-api-key"),
            prefix: String::new(),
            suffix: String::new()
        }
    );
    let bedrock = parse(
        r#"
[secrets.key]
source = "store"
[routes.bedrock]
preset = "bedrock"
inject = { aws_sigv4 = { region = "eu-west-1", access_key_id = "key", secret_access_key = "key" } }
"#,
    )
    .unwrap();
    let route = &bedrock.routes["bedrock"];
    assert_eq!(
        route.upstream.origin(),
        "https://bedrock-runtime.eu-west-1.amazonaws.com"
    );
    let sigv4 = route.inject.as_ref().unwrap().sigv4.as_ref().unwrap();
    assert_eq!(
        (sigv4.service.as_str(), sigv4.region.as_str()),
        ("bedrock", "eu-west-1")
    );
    let local = &config.routes["local"];
    assert_eq!(local.upstream.origin(), "http://127.0.0.1:9000");
    assert_eq!(local.placeholder_env.as_deref(), Some("MY_KEY"));

    for (text, want) in [
        (
            "[routes.r]\npreset = \"nope\"\nsecret = \"key\"",
            "routes.r.preset: unknown preset",
        ),
        (
            "[routes.r]\npreset = \"openai\"",
            "routes.r.secret: missing",
        ),
        (
            "[routes.r]\npreset = \"azure-openai\"\nsecret = \"key\"",
            "routes.r.upstream: missing",
        ),
        (
            "[routes.r]\nupstream = \"https://x\"\nsecret = \"key\"",
            "routes.r.secret",
        ),
        (
            "[routes.r]\npreset = \"bedrock\"\nsecret = \"key\"",
            "routes.r.inject: preset \"bedrock\"",
        ),
    ] {
        let found = problems(&format!("[secrets.key]\nsource = \"store\"\n{text}"));
        assert!(
            found.iter().any(|f| f.starts_with(want)),
            "missing {want:?} in {found:#?}"
        );
    }
}

#[test]
fn a_quoted_key_with_control_characters_is_reported_escaped() {
    // Found by the config fuzz target: a TOML key may hold any character,
    // and a bare `\r` in the message would let a file rewrite the line a
    // terminal or log shows; a bidi override, reorder it.
    let found = problems(
        "[\"\\r\\u001b[2J\"]\n[routes.\"a\\rb\"]\nupstream = \"x\"\n[\"txt.\\u202egpj\"]\n",
    );
    assert!(
        found
            .iter()
            .any(|p| p.contains(r"unknown key `\r\u{1b}[2J`")),
        "{found:?}"
    );
    assert!(
        found.iter().any(|p| p.starts_with(r"routes.a\rb")),
        "{found:?}"
    );
    assert!(
        found
            .iter()
            .any(|p| p.contains(r"unknown key `txt.\u{202e}gpj`")),
        "{found:?}"
    );
    assert!(
        !found.iter().any(|p| p.contains(char::is_control)),
        "{found:?}"
    );
}

#[test]
fn durations_past_a_year_are_refused_not_left_to_overflow_a_deadline() {
    let text =
        format!("{GOOD}\n[limits]\nheader_timeout = \"300000000000y\"\nidle_timeout = \"1y\"\n");
    assert_eq!(
        problems(&text),
        ["limits.header_timeout: duration \"300000000000y\" is longer than 366 days"]
    );
}

#[test]
fn a_key_pasted_where_a_secret_name_goes_is_not_printed_whole() {
    let key = "sk-proj-LIVEKEY0123456789abcdefghijklmnop";
    let text = GOOD.replacen(
        "secret = \"openai\" }\nplaceholder_env",
        &format!("secret = \"{key}\" }}\nplaceholder_env"),
        1,
    );
    let found = problems(&text);
    assert_eq!(
        found,
        ["routes.openai.inject.secret: no secret named \"sk-proj-LIVE\"… (41 characters)"]
    );
    let text = GOOD.replacen(
        "source = \"env:GITHUB_TOKEN\"",
        &format!("source = \"{key}\""),
        1,
    );
    let found = problems(&text).join("\n");
    assert!(
        found.contains("unknown secret source") && !found.contains(key),
        "{found}"
    );
}
