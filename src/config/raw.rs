//! The file exactly as written, and its validation into [`Config`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::route::{RawRoute, check_route};
use super::rule::{RawRule, check_rule};
use super::{AuditConfig, AuditSink, Config, DEFAULT_LISTEN, Limits, OnFailure, Problem, base_dir};
use crate::secret::source::SecretSource;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    file: Option<String>,
    on_failure: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTls {
    #[serde(default)]
    upstream_ca: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_body_bytes: Option<u64>,
    max_header_bytes: Option<usize>,
    header_timeout: Option<String>,
    idle_timeout: Option<String>,
    connect_timeout: Option<String>,
    upstream_timeout: Option<String>,
    max_connections: Option<usize>,
    shutdown_grace: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    oidc: Option<RawOidc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOidc {
    issuer: String,
    audience: String,
    jwks_file: Option<String>,
    jwks_url: Option<String>,
    #[serde(default = "default_claim")]
    claim: String,
    #[serde(default)]
    map: BTreeMap<String, String>,
}

fn default_claim() -> String {
    "sub".to_string()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVault {
    addr: String,
    token: Option<String>,
    approle: Option<RawAppRole>,
    ca: Option<String>,
    ttl: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAppRole {
    role_id: String,
    secret_id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdminTcp {
    listen: String,
    token: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    #[serde(default)]
    unix_uids: Vec<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecret {
    source: String,
}

/// Collects problems while validating; every check reports and goes on.
pub(super) struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    pub(super) fn fail(&mut self, at: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem::new(at, message));
    }

    /// Deserialises one value, reporting a failure at the key inside it
    /// that failed (`routes.a.upstream`, not just `routes.a`).
    fn take<T: DeserializeOwned>(&mut self, at: &str, value: toml::Value) -> Option<T> {
        match serde_path_to_error::deserialize::<_, T>(value) {
            Ok(v) => Some(v),
            Err(e) => {
                let inner = e.path().to_string();
                let at = match inner.as_str() {
                    "." => at.to_string(),
                    _ if inner.starts_with('[') => format!("{at}{inner}"),
                    _ => format!("{at}.{inner}"),
                };
                let message = e.into_inner().message().trim().replace('\n', " ");
                self.fail(at, message);
                None
            }
        }
    }

    fn duration(&mut self, at: &str, text: Option<&str>, default: Duration) -> Duration {
        let Some(text) = text else { return default };
        match humantime::parse_duration(text) {
            Ok(d) if !d.is_zero() && d <= MAX_DURATION => d,
            Ok(d) if !d.is_zero() => {
                self.fail(at, format!("duration {text:?} is longer than 366 days"));
                default
            }
            _ => {
                self.fail(
                    at,
                    format!("invalid duration {text:?} (examples: 500ms, 10s, 2m)"),
                );
                default
            }
        }
    }
}

/// No timeout or TTL is longer: beyond it a deadline can overflow the
/// clock's range, and no operator means one. A leap year, so that "1y"
/// (365.25 days to humantime) is within it.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 60 * 60);

pub(super) fn parse(text: &str, file: &Path) -> Result<Config, Vec<Problem>> {
    let table: toml::Table = toml::from_str(text).map_err(|e| vec![syntax_problem(text, &e)])?;
    let mut c = Checker {
        problems: Vec::new(),
    };
    let base = base_dir(file).to_path_buf();

    let mut listen = None;
    let mut listen_unix = None;
    let mut listen_tls = None;
    let mut admin_tcp: Option<RawAdminTcp> = None;
    let mut vault: Option<RawVault> = None;
    let mut identity = RawIdentity::default();
    let mut agents: BTreeMap<String, RawAgent> = BTreeMap::new();
    let mut admin = None;
    let mut state_dir = None;
    let mut audit = RawAudit::default();
    let mut tls = RawTls::default();
    let mut limits = RawLimits::default();
    let mut secrets: BTreeMap<String, RawSecret> = BTreeMap::new();
    let mut routes: BTreeMap<String, RawRoute> = BTreeMap::new();
    let mut rules: Vec<RawRule> = Vec::new();

    for (key, value) in table {
        match key.as_str() {
            "listen" => listen = c.take::<String>("listen", value),
            "listen_unix" => listen_unix = c.take::<String>("listen_unix", value),
            "listen_tls" => listen_tls = c.take::<String>("listen_tls", value),
            "admin_tcp" => admin_tcp = c.take("admin_tcp", value),
            "vault" => vault = c.take("vault", value),
            "identity" => identity = c.take("identity", value).unwrap_or_default(),
            "agents" => {
                let Some(entries) = c.take::<toml::Table>("agents", value) else {
                    continue;
                };
                for (name, entry) in entries {
                    if let Some(agent) = c.take(&format!("agents.{name}"), entry) {
                        agents.insert(name, agent);
                    }
                }
            }
            "admin" => admin = c.take::<String>("admin", value),
            "state_dir" => state_dir = c.take::<String>("state_dir", value),
            "audit" => audit = c.take("audit", value).unwrap_or_default(),
            "tls" => tls = c.take("tls", value).unwrap_or_default(),
            "limits" => limits = c.take("limits", value).unwrap_or_default(),
            "secrets" | "routes" => {
                let Some(entries) = c.take::<toml::Table>(&key, value) else {
                    continue;
                };
                for (name, entry) in entries {
                    let at = format!("{key}.{name}");
                    if key == "secrets" {
                        if let Some(s) = c.take(&at, entry) {
                            secrets.insert(name, s);
                        }
                    } else if let Some(r) = c.take(&at, entry) {
                        routes.insert(name, r);
                    }
                }
            }
            "rules" => {
                let Some(entries) = c.take::<Vec<toml::Value>>("rules", value) else {
                    continue;
                };
                for (i, entry) in entries.into_iter().enumerate() {
                    if let Some(r) = c.take(&format!("rules[{i}]"), entry) {
                        rules.push(r);
                    } else {
                        // Keep indexes aligned with the file for later messages.
                        rules.push(RawRule::placeholder());
                    }
                }
            }
            _ => c.fail(&key, format!("unknown key `{key}`")),
        }
    }

    let listen_text = listen.as_deref().unwrap_or(DEFAULT_LISTEN);
    let listen = listen_text.parse::<SocketAddr>().unwrap_or_else(|_| {
        c.fail(
            "listen",
            format!(
                "invalid listen address {listen_text:?} (expected IP:PORT, e.g. 127.0.0.1:8080)"
            ),
        );
        SocketAddr::from(([127, 0, 0, 1], 8080))
    });
    let admin = admin.and_then(|a| match a.strip_prefix("unix:") {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => {
            c.fail(
                "admin",
                format!("invalid admin address {a:?} (expected unix:PATH)"),
            );
            None
        }
    });
    let state_dir = state_dir.map(|s| base.join(s));
    let listen_tls = listen_tls.and_then(|text| match text.parse::<SocketAddr>() {
        Ok(addr) => Some(addr),
        Err(_) => {
            c.fail(
                "listen_tls",
                format!("invalid address {text:?} (expected IP:PORT)"),
            );
            None
        }
    });

    let on_failure = match audit.on_failure.as_deref() {
        None | Some("deny") => OnFailure::Deny,
        Some("continue") => OnFailure::Continue,
        Some(other) => {
            c.fail(
                "audit.on_failure",
                format!("invalid value {other:?} (expected \"deny\" or \"continue\")"),
            );
            OnFailure::Deny
        }
    };
    let sink = match audit.file.as_deref() {
        Some("-") => AuditSink::Stdout,
        Some("") => {
            c.fail("audit.file", "empty path (use \"-\" for stdout)");
            AuditSink::Stdout
        }
        Some(path) => AuditSink::File(PathBuf::from(path)),
        None => AuditSink::File(PathBuf::from("audit.jsonl")),
    };

    let defaults = Limits::default();
    let limits = Limits {
        max_body_bytes: limits.max_body_bytes.unwrap_or(defaults.max_body_bytes),
        max_header_bytes: limits.max_header_bytes.unwrap_or(defaults.max_header_bytes),
        header_timeout: c.duration(
            "limits.header_timeout",
            limits.header_timeout.as_deref(),
            defaults.header_timeout,
        ),
        idle_timeout: c.duration(
            "limits.idle_timeout",
            limits.idle_timeout.as_deref(),
            defaults.idle_timeout,
        ),
        connect_timeout: c.duration(
            "limits.connect_timeout",
            limits.connect_timeout.as_deref(),
            defaults.connect_timeout,
        ),
        upstream_timeout: c.duration(
            "limits.upstream_timeout",
            limits.upstream_timeout.as_deref(),
            defaults.upstream_timeout,
        ),
        max_connections: limits.max_connections.unwrap_or(defaults.max_connections),
        shutdown_grace: c.duration(
            "limits.shutdown_grace",
            limits.shutdown_grace.as_deref(),
            defaults.shutdown_grace,
        ),
    };
    if limits.max_header_bytes < 1024 {
        c.fail("limits.max_header_bytes", "must be at least 1024");
    }
    if limits.max_connections == 0 {
        c.fail("limits.max_connections", "must be at least 1");
    }

    let mut upstream_ca = Vec::new();
    for (i, ca) in tls.upstream_ca.iter().enumerate() {
        let path = base.join(ca);
        if !path.is_file() {
            c.fail(
                format!("tls.upstream_ca[{i}]"),
                format!("{} is not a readable file", path.display()),
            );
        }
        upstream_ca.push(path);
    }

    let mut secret_sources = BTreeMap::new();
    for (name, raw) in secrets {
        let at = format!("secrets.{name}");
        if !valid_name(&name) {
            c.fail(&at, "names use letters, digits, `-`, `_` and `.`");
        }
        match SecretSource::parse(&raw.source, &base) {
            Ok(source) => {
                secret_sources.insert(name, source);
            }
            Err(message) => c.fail(format!("{at}.source"), message),
        }
    }

    let mut checked_routes = BTreeMap::new();
    for (name, raw) in routes {
        if let Some(route) = check_route(&mut c, &name, raw, &secret_sources) {
            checked_routes.insert(name, Arc::new(route));
        }
    }

    let mut checked_agents = BTreeMap::new();
    let mut uid_owner: BTreeMap<u32, String> = BTreeMap::new();
    for (name, raw) in agents {
        if !valid_name(&name) {
            c.fail(
                format!("agents.{name}"),
                "agent names use letters, digits, `-`, `_` and `.`",
            );
        }
        for uid in &raw.unix_uids {
            if let Some(other) = uid_owner.insert(*uid, name.clone()) {
                c.fail(
                    format!("agents.{name}.unix_uids"),
                    format!("uid {uid} already names agent {other:?}"),
                );
            }
        }
        checked_agents.insert(
            name,
            super::AgentConfig {
                unix_uids: raw.unix_uids,
            },
        );
    }
    let listen_unix = listen_unix.and_then(|path| {
        if path.is_empty() {
            c.fail("listen_unix", "empty path");
            None
        } else {
            Some(PathBuf::from(path))
        }
    });

    let oidc = identity.oidc.and_then(|raw| check_oidc(&mut c, raw, &base));
    let vault = vault.and_then(|raw| {
        let addr = match raw.addr.parse::<http::Uri>() {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("https" | "http")) && uri.host().is_some() =>
            {
                Some(uri)
            }
            _ => {
                c.fail(
                    "vault.addr",
                    format!("{:?} is not an http(s) URL", raw.addr),
                );
                None
            }
        };
        let auth = match (raw.token, raw.approle) {
            (Some(token), None) => Some(super::VaultAuth::Token(token)),
            (None, Some(approle)) => Some(super::VaultAuth::AppRole {
                role_id: approle.role_id,
                secret_id: approle.secret_id,
            }),
            _ => {
                c.fail("vault", "give `token` or `approle`, exactly one");
                None
            }
        };
        if let Some(auth) = &auth {
            let name = auth.secret();
            if !secret_sources.contains_key(name) {
                c.fail("vault", format!("no secret named {}", shown(name)));
            } else if matches!(secret_sources.get(name), Some(SecretSource::Vault { .. })) {
                c.fail("vault", "Vault's own credential cannot come from Vault");
            }
        }
        let ttl = c.duration("vault.ttl", raw.ttl.as_deref(), Duration::from_secs(60));
        let ca = raw.ca.map(|ca| base.join(ca));
        if let Some(ca) = &ca
            && !ca.is_file()
        {
            c.fail(
                "vault.ca",
                format!("{} is not a readable file", ca.display()),
            );
        }
        Some(super::VaultConfig {
            addr: addr?,
            auth: auth?,
            ca,
            ttl,
        })
    });
    if vault.is_none()
        && let Some((name, _)) = secret_sources
            .iter()
            .find(|(_, s)| matches!(s, SecretSource::Vault { .. }))
    {
        c.fail(
            format!("secrets.{name}.source"),
            "a vault: source needs a [vault] section",
        );
    }
    let admin_tcp = admin_tcp.and_then(|raw| {
        let listen = raw.listen.parse::<SocketAddr>().map_err(|_| {
            c.fail(
                "admin_tcp.listen",
                format!("invalid address {:?} (expected IP:PORT)", raw.listen),
            );
        });
        if !secret_sources.contains_key(&raw.token) {
            c.fail(
                "admin_tcp.token",
                format!("no secret named {}", shown(&raw.token)),
            );
            return None;
        }
        Some(super::AdminTcp {
            listen: listen.ok()?,
            token: raw.token,
        })
    });

    let mut checked_rules = Vec::new();
    for (i, raw) in rules.into_iter().enumerate() {
        if let Some(rule) = check_rule(&mut c, i, raw, &checked_routes) {
            checked_rules.push(rule);
        }
    }

    if listen_tls == Some(listen) && listen.port() != 0 {
        c.fail(
            "listen_tls",
            format!("{listen} is already the address of listen"),
        );
    }
    if !c.problems.is_empty() {
        return Err(c.problems);
    }
    Ok(Config {
        file: file.to_path_buf(),
        listen,
        listen_tls,
        listen_unix,
        admin: admin.map(|p| base.join(p)),
        admin_tcp,
        vault,
        state_dir,
        audit: AuditConfig { sink, on_failure },
        upstream_ca,
        limits,
        secrets: secret_sources,
        routes: checked_routes,
        rules: checked_rules,
        agents: checked_agents,
        oidc,
    })
}

fn syntax_problem(text: &str, e: &toml::de::Error) -> Problem {
    let at = match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}")
        }
        None => "file".to_string(),
    };
    Problem::new(at, e.message().trim().replace('\n', " "))
}

/// Names of agents, sessions, secrets, routes and rules: what a config,
/// the command line and the admin API all accept.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Why `name` was refused.
pub(crate) fn invalid_name(kind: &str, name: &str) -> String {
    format!(
        "invalid {kind} name {} (1 to 128 letters, digits, `-`, `_` and `.`)",
        shown(name)
    )
}

/// `text` quoted for an error, only its start when it is long: what gets
/// pasted where a name goes is often a whole agent token or a key.
pub(crate) fn shown(text: &str) -> String {
    const START: usize = 12;
    let length = text.chars().count();
    if length > 2 * START {
        let start: String = text.chars().take(START).collect();
        format!("{start:?}… ({length} characters)")
    } else {
        format!("{text:?}")
    }
}

fn check_oidc(
    c: &mut Checker,
    raw: RawOidc,
    base: &Path,
) -> Option<crate::identity::oidc::OidcConfig> {
    use crate::identity::oidc::{JwksSource, OidcConfig};
    let at = "identity.oidc";
    if raw.issuer.is_empty() {
        c.fail(format!("{at}.issuer"), "empty issuer");
    }
    if raw.audience.is_empty() {
        c.fail(format!("{at}.audience"), "empty audience");
    }
    if raw.map.is_empty() {
        c.fail(
            format!("{at}.map"),
            "map at least one claim value to an agent",
        );
    }
    for agent in raw.map.values() {
        if !valid_name(agent) {
            c.fail(format!("{at}.map"), format!("invalid agent name {agent:?}"));
        }
    }
    let jwks = match (raw.jwks_file, raw.jwks_url) {
        (Some(file), None) => Some(JwksSource::File(base.join(file))),
        (None, Some(url)) if url.starts_with("https://") => Some(JwksSource::Url(url)),
        // Keys fetched in clear could be swapped by anyone on the path, who
        // could then sign any workload identity: loopback only.
        (None, Some(url)) if url.starts_with("http://") => {
            let host = url
                .parse::<http::Uri>()
                .ok()
                .and_then(|u| u.host().map(str::to_ascii_lowercase));
            let loopback = host.as_deref().is_some_and(|h| {
                h == "localhost"
                    || h.trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            });
            if !loopback {
                c.fail(
                    format!("{at}.jwks_url"),
                    format!("{url:?}: keys are fetched over https (plain http only on loopback)"),
                );
            }
            Some(JwksSource::Url(url))
        }
        (None, Some(url)) => {
            c.fail(
                format!("{at}.jwks_url"),
                format!("{url:?} is not an http(s) URL"),
            );
            None
        }
        _ => {
            c.fail(at, "give exactly one of jwks_file and jwks_url");
            None
        }
    };
    Some(OidcConfig {
        issuer: raw.issuer,
        audience: raw.audience,
        jwks: jwks?,
        claim: raw.claim,
        map: raw.map,
    })
}
