//! `sidekey.toml` -> raw serde structs -> a validated, immutable [`Config`].
//!
//! Holding a `Config` means sidekey can serve it: every reference resolves,
//! every pattern compiles, every value is in range. Validation collects every
//! problem with its location instead of stopping at the first.

mod inject;
mod preset;
mod raw;
pub(crate) use raw::{MAX_DURATION, invalid_name, shown, valid_name};
mod route;
mod rule;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};

use crate::policy::{HostPattern, PathPattern};
use crate::secret::source::SecretSource;

/// Environment variable naming the config file when `-c` is not given.
pub const CONFIG_ENV: &str = "SIDEKEY_CONFIG";
/// Environment variable naming the state dir when neither `--state-dir` nor the config does.
pub const STATE_DIR_ENV: &str = "SIDEKEY_STATE_DIR";
pub const DEFAULT_CONFIG: &str = "sidekey.toml";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// A validated configuration.
#[derive(Debug)]
pub struct Config {
    /// The file it was read from; relative paths in it are relative to its directory.
    pub file: PathBuf,
    pub listen: SocketAddr,
    /// An mTLS listener for agents with client certificates.
    pub listen_tls: Option<SocketAddr>,
    /// A unix socket for agents identified by their uid; relative to the state dir.
    pub listen_unix: Option<PathBuf>,
    /// The admin socket path, when not the default `admin.sock` in the state dir.
    pub admin: Option<PathBuf>,
    /// An optional TCP admin address and the secret naming its bearer token.
    pub admin_tcp: Option<AdminTcp>,
    pub state_dir: Option<PathBuf>,
    pub audit: AuditConfig,
    pub upstream_ca: Vec<PathBuf>,
    pub limits: Limits,
    pub secrets: BTreeMap<String, SecretSource>,
    pub routes: BTreeMap<String, Arc<Route>>,
    pub rules: Vec<Rule>,
    pub agents: BTreeMap<String, AgentConfig>,
    /// `[identity.oidc]`: workload JWTs as identities.
    pub oidc: Option<crate::identity::oidc::OidcConfig>,
    /// `[vault]`: where `vault:` secrets are read.
    pub vault: Option<VaultConfig>,
}

/// How sidekey logs in to Vault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaultAuth {
    /// The secret holding a Vault token.
    Token(String),
    /// AppRole: a role id and the secret holding its secret id.
    AppRole { role_id: String, secret_id: String },
}

impl VaultAuth {
    /// The secret this login needs.
    pub fn secret(&self) -> &str {
        match self {
            Self::Token(name) => name,
            Self::AppRole { secret_id, .. } => secret_id,
        }
    }
}

/// `[vault]`: a Vault (or OpenBao) server for `vault:` secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultConfig {
    pub addr: http::Uri,
    pub auth: VaultAuth,
    /// A CA for the Vault server, besides the system roots and `tls.upstream_ca`.
    pub ca: Option<PathBuf>,
    /// How long a value read from Vault is used before it is read again.
    pub ttl: Duration,
}

/// `[admin_tcp]`: the admin API on TCP, for scrapers and remote operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminTcp {
    pub listen: SocketAddr,
    /// The secret whose value callers must present as a bearer token.
    pub token: String,
}

/// `[agents.NAME]`: ways to recognise an agent other than its token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentConfig {
    /// Processes with these uids on `listen_unix` are this agent.
    pub unix_uids: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    pub sink: AuditSink,
    pub on_failure: OnFailure,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditSink {
    Stdout,
    /// Relative paths are relative to the state dir.
    File(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    Deny,
    Continue,
}

/// Resource limits; every one has a default that suits a sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_body_bytes: u64,
    pub max_header_bytes: usize,
    pub header_timeout: Duration,
    /// A connection with no request in progress and no bytes moving for
    /// this long is closed.
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    pub upstream_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 * 1024 * 1024,
            max_header_bytes: 64 * 1024,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            connect_timeout: Duration::from_secs(10),
            upstream_timeout: Duration::from_secs(120),
            max_connections: 4096,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// A named upstream origin with an optional credential injection.
#[derive(Debug, PartialEq, Eq)]
pub struct Route {
    pub name: String,
    pub upstream: Upstream,
    pub inject: Option<Injection>,
    pub placeholder_env: Option<String>,
    pub allow_private: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub https: bool,
    /// Lower-case host name or IP literal (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    /// Path prefix without a trailing slash; empty for none.
    pub base_path: String,
}

impl Upstream {
    /// `scheme://host[:port]`, with the port only when not the default.
    pub fn origin(&self) -> String {
        let mut out = String::new();
        push_origin(&mut out, self.https, &self.host, self.port);
        out
    }
}

/// Appends `scheme://host[:port]`, the port only when not the scheme's
/// default and an IPv6 host in brackets.
pub fn push_origin(out: &mut String, https: bool, host: &str, port: u16) {
    out.push_str(if https { "https://" } else { "http://" });
    if host.contains(':') {
        out.push('[');
        out.push_str(host);
        out.push(']');
    } else {
        out.push_str(host);
    }
    if port != if https { 443 } else { 80 } {
        out.push(':');
        out.push_str(itoa::Buffer::new().format(port));
    }
}

/// How a route's credential is placed into requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injection {
    /// The secret's name (for a token grant, the secret the grant uses).
    pub secret: String,
    pub slot: Slot,
    /// The credential is an access token obtained with the secret.
    pub grant: Option<Arc<TokenGrant>>,
    /// The request is signed (AWS SigV4) with the secret as access key id.
    pub sigv4: Option<Arc<crate::inject::sigv4::SigV4>>,
}

/// How an access token is obtained from a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenGrant {
    /// `oauth2 = { … }`, the secret being the client secret.
    ClientCredentials(OAuth2),
    /// `gcp_service_account = { key, scopes }`, the secret being the JSON
    /// key; a JWT-bearer grant (RFC 7523) at the key's `token_uri`.
    GcpServiceAccount { scopes: Vec<String> },
}

/// `inject = { oauth2 = { … } }`: a client-credentials grant (RFC 6749 §4.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuth2 {
    pub token_url: http::Uri,
    pub client_id: String,
    pub scope: Option<String>,
    pub audience: Option<String>,
    /// RFC 8693 token exchange with the agent's token as the subject,
    /// instead of the client-credentials grant.
    pub exchange: bool,
}

/// Where the credential goes; the agent's token is looked for in the same place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    /// A header whose value is `prefix + secret + suffix` (from `format`).
    Header {
        name: HeaderName,
        prefix: String,
        suffix: String,
    },
    Query {
        param: String,
    },
    Basic {
        username: String,
    },
    /// The access key id of an AWS SigV4 `Authorization` header.
    AwsSigV4,
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Header {
                name,
                prefix,
                suffix,
            } => write!(f, "header `{name}: {prefix}{{secret}}{suffix}`"),
            Self::Query { param } => write!(f, "query parameter `{param}`"),
            Self::Basic { username } => write!(f, "basic auth as user `{username}`"),
            Self::AwsSigV4 => write!(f, "an AWS SigV4 signature"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Agents {
    Any,
    Named(Vec<String>),
}

impl Agents {
    pub fn contains(&self, agent: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Named(names) => names.iter().any(|n| n == agent),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Route(String),
    Host {
        pattern: HostPattern,
        port: Option<u16>,
    },
}

/// One `[[rules]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// `name` if given, else `rules[i]`; what audit records and `explain` show.
    pub label: String,
    pub agents: Agents,
    /// Only these sessions of the agents, when given.
    pub sessions: Option<Vec<String>>,
    /// Only identities whose workload JWT has these claim values, when given.
    pub claims: Option<BTreeMap<String, String>>,
    pub target: Target,
    pub methods: Option<Vec<Method>>,
    pub paths: Option<Vec<PathPattern>>,
    pub action: Action,
    pub allow_private: bool,
}

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where: a key path such as `routes.openai.inject`, or `line 3, column 7`.
    pub at: String,
    pub message: String,
}

impl Problem {
    /// A problem whose text is safe to print on one line: config keys and
    /// values are the user's, and a quoted TOML key may hold any character.
    pub fn new(at: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            at: escape_unprintable(at.into()),
            message: escape_unprintable(message.into()),
        }
    }
}

fn escape_unprintable(text: String) -> String {
    if !text.contains(is_unprintable) {
        return text;
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_unprintable(c) {
            escaped.extend(c.escape_default());
        } else {
            escaped.push(c);
        }
    }
    escaped
}

/// Control characters, and the bidirectional overrides and isolates that
/// make a terminal show a line in an order other than its bytes'.
fn is_unprintable(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Every problem found in one config file.
#[derive(Debug)]
pub struct ConfigError {
    pub file: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {}: {}", self.file, p.at, p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let unreadable = |why: String| ConfigError {
            file: path.display().to_string(),
            problems: vec![Problem::new("file", format!("cannot read: {why}"))],
        };
        let bytes = crate::state::read_limited(path, crate::state::MAX_OPERATOR_FILE)
            .map_err(|e| unreadable(describe_io(&e)))?;
        let text = String::from_utf8(bytes).map_err(|_| unreadable("not UTF-8 text".into()))?;
        Self::parse(&text, path)
    }

    /// Parses config text as if read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        raw::parse(text, path).map_err(|problems| ConfigError {
            file: path.display().to_string(),
            problems,
        })
    }

    /// The route whose upstream is this origin (and, when `path` is given,
    /// whose base path the request is under): what a forward-proxy request
    /// or CONNECT to the origin uses. The longest base path wins; among
    /// routes with the same upstream, the first by name.
    pub fn route_for_origin(
        &self,
        https: bool,
        host: &str,
        port: u16,
        path: Option<&str>,
    ) -> Option<&Arc<Route>> {
        self.routes
            .values()
            .filter(|r| {
                let u = &r.upstream;
                u.https == https
                    && u.host == host
                    && u.port == port
                    && path.is_none_or(|path| {
                        u.base_path.is_empty()
                            || path
                                .strip_prefix(u.base_path.as_str())
                                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
                    })
            })
            .max_by(|a, b| {
                let (a_len, b_len) = (a.upstream.base_path.len(), b.upstream.base_path.len());
                a_len.cmp(&b_len).then_with(|| b.name.cmp(&a.name))
            })
    }

    /// Pairs of routes with the same upstream (origin and base path): a
    /// forward-proxy request can reach only the first of each by name.
    pub fn routes_sharing_an_upstream(&self) -> Vec<(&str, &str)> {
        let mut first_of: BTreeMap<(String, &str), &str> = BTreeMap::new();
        let mut shared = Vec::new();
        for route in self.routes.values() {
            let upstream = (route.upstream.origin(), route.upstream.base_path.as_str());
            match first_of.get(&upstream) {
                Some(first) => shared.push((*first, route.name.as_str())),
                None => {
                    first_of.insert(upstream, &route.name);
                }
            }
        }
        shared
    }

    /// The directory relative paths in the file are taken from.
    pub fn base_dir(&self) -> &Path {
        base_dir(&self.file)
    }
}

pub(crate) fn base_dir(file: &Path) -> &Path {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// An I/O error as a short lower-case phrase without the OS error number.
pub fn describe_io(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_string(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
        _ => {
            let text = e.to_string();
            match text.find(" (os error") {
                Some(i) => text[..i].to_lowercase(),
                None => text.to_lowercase(),
            }
        }
    }
}

#[cfg(test)]
mod tests;
