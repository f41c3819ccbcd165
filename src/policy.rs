//! May this agent make this call? A deterministic default-deny decision.
//!
//! A matching `deny` rule wins; else a matching `allow` rule allows; else the
//! request is denied. Paths are matched only after [`path::normalize`], so a
//! request can never reach a path its rules did not name.

pub mod path;

use http::Method;

use crate::config::{Action, Config, Rule, Target};
use crate::identity::ClaimValues;
pub use path::{NormalPath, PathError, PathPattern};

/// A host pattern: an exact name, `*.example.com` (one or more labels), or `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Any,
    Exact(String),
    /// The suffix including its leading dot: `.example.com`.
    Suffix(String),
}

/// As the config spells it: `*`, `*.example.com` or `example.com`.
impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::Exact(name) => f.write_str(name),
            Self::Suffix(suffix) => write!(f, "*{suffix}"),
        }
    }
}

impl HostPattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        let host = normalize_host(text);
        if text == "*" {
            return Ok(Self::Any);
        }
        let (wild, rest) = match host.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, host.as_str()),
        };
        let valid = !rest.is_empty()
            && rest.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            })
            || rest.parse::<std::net::IpAddr>().is_ok() && !wild;
        if !valid {
            return Err(format!(
                "invalid host pattern {text:?} (expected a name, *.example.com, or *)"
            ));
        }
        Ok(if wild {
            Self::Suffix(format!(".{rest}"))
        } else {
            Self::Exact(rest.to_string())
        })
    }

    /// `host` must already be normalised with [`normalize_host`].
    pub fn matches(&self, host: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(name) => name == host,
            Self::Suffix(suffix) => host.len() > suffix.len() && host.ends_with(suffix.as_str()),
        }
    }
}

/// Lower-cases a host and removes trailing dots and the brackets of an IPv6
/// literal. Idempotent, so the policy and egress agree on a host however
/// many times it passed through here.
pub fn normalize_host(mut host: &str) -> String {
    loop {
        let trimmed = host.trim_end_matches('.');
        let trimmed = trimmed
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(trimmed);
        if trimmed == host {
            return host.to_ascii_lowercase();
        }
        host = trimmed;
    }
}

/// The call being decided, in plain data.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub agent: &'a str,
    pub session: &'a str,
    /// A workload JWT's string claims, if the identity is one.
    pub claims: Option<&'a ClaimValues>,
    /// The route the request goes to, if it goes to one.
    pub route: Option<&'a str>,
    /// Normalised destination host and port.
    pub host: &'a str,
    pub port: u16,
    pub method: &'a Method,
    /// Methods the agent asked the upstream to use instead
    /// (`X-HTTP-Method-Override` and kin); each must be allowed too.
    pub overrides: &'a [Method],
    pub path: &'a NormalPath,
}

/// The outcome, with the rule that decided it (`None`: no rule matched).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decision {
    pub allowed: bool,
    pub rule: Option<String>,
    /// The allowing rule lets its destination resolve to private addresses:
    /// it sets `allow_private`, or it names the destination IP literally.
    pub private_ok: bool,
}

/// The rules of one config version.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: Vec<Rule>,
}

impl Policy {
    pub fn new(config: &Config) -> Self {
        Self {
            rules: config.rules.clone(),
        }
    }

    pub fn check(&self, req: &Request<'_>) -> Decision {
        let mut allow: Option<&Rule> = None;
        let mut private_ok = false;
        for rule in &self.rules {
            if !matches(rule, req) {
                continue;
            }
            match rule.action {
                Action::Deny => {
                    return Decision {
                        allowed: false,
                        rule: Some(rule.label.clone()),
                        private_ok: false,
                    };
                }
                Action::Allow => {
                    // A rule that lets the destination be private decides,
                    // so that a broader rule matching too (`host = "*"`,
                    // public only) never takes that leave away.
                    if !private_ok && grants_private(rule, req.host) {
                        private_ok = true;
                        allow = Some(rule);
                    }
                    allow.get_or_insert(rule);
                }
            }
        }
        Decision {
            allowed: allow.is_some(),
            rule: allow.map(|r| r.label.clone()),
            private_ok,
        }
    }
}

/// Whether an allow rule lets its destination resolve to a private
/// address: it sets `allow_private`, or it names `host` as an IP literal.
fn grants_private(rule: &Rule, host: &str) -> bool {
    rule.allow_private
        || matches!(&rule.target, Target::Host { pattern: HostPattern::Exact(h), .. }
            if h == host && h.parse::<std::net::IpAddr>().is_ok())
}

/// What a CONNECT may become, decided before any byte of the tunnel flows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnectDecision {
    pub allowed: bool,
    pub rule: Option<String>,
    /// Some rule constrains methods or paths, so the tunnel must be
    /// intercepted to enforce them even without a credential.
    pub inspect: bool,
    pub private_ok: bool,
}

impl Policy {
    /// Decides a CONNECT to `host:port` (on `route` if it is a route's
    /// origin) for `agent`. Methods and paths cannot be seen yet: a deny
    /// that names none refuses the tunnel; any rule that names some makes
    /// it inspected, and each request inside is decided again.
    pub fn check_connect(
        &self,
        agent: &str,
        session: &str,
        claims: Option<&ClaimValues>,
        route: Option<&str>,
        host: &str,
        port: u16,
    ) -> ConnectDecision {
        let mut out = ConnectDecision::default();
        for rule in &self.rules {
            let deny = rule.action == Action::Deny;
            let target = match &rule.target {
                Target::Route(name) => route == Some(name.as_str()),
                Target::Host { pattern, port: p } => {
                    (deny || route.is_none())
                        && pattern.matches(host)
                        && p.is_none_or(|p| p == port)
                }
            };
            if !target
                || !rule.agents.contains(agent)
                || !in_sessions(rule, session)
                || !has_claims(rule, claims)
            {
                continue;
            }
            let narrowed = rule.methods.is_some() || rule.paths.is_some();
            match (deny, narrowed) {
                (true, false) => {
                    return ConnectDecision {
                        rule: Some(rule.label.clone()),
                        ..ConnectDecision::default()
                    };
                }
                (true, true) => out.inspect = true,
                (false, _) => {
                    out.inspect |= narrowed;
                    let private = grants_private(rule, host);
                    if !out.allowed || private && !out.private_ok {
                        out.allowed = true;
                        out.rule = Some(rule.label.clone());
                        out.private_ok = private;
                    }
                }
            }
        }
        out
    }
}

fn in_sessions(rule: &Rule, session: &str) -> bool {
    rule.sessions
        .as_ref()
        .is_none_or(|sessions| sessions.iter().any(|s| s == session))
}

/// A rule with `claims` matches only an identity whose verified claims
/// carry every one of those values; a list claim carries each of its
/// elements, so a deny rule on `groups = "contractors"` catches
/// `["staff", "contractors"]`.
fn has_claims(rule: &Rule, claims: Option<&ClaimValues>) -> bool {
    rule.claims.as_ref().is_none_or(|wanted| {
        claims.is_some_and(|have| {
            wanted
                .iter()
                .all(|(k, v)| have.get(k).is_some_and(|values| values.contains(v)))
        })
    })
}

fn matches(rule: &Rule, req: &Request<'_>) -> bool {
    let deny = rule.action == Action::Deny;
    let target = match &rule.target {
        Target::Route(name) => req.route == Some(name.as_str()),
        // SECURITY: a host rule may deny a route's destination but never
        // allows it: only a rule naming the route grants its credential.
        Target::Host { pattern, port } => {
            (deny || req.route.is_none())
                && pattern.matches(req.host)
                && port.is_none_or(|p| p == req.port)
        }
    };
    if !target
        || !rule.agents.contains(req.agent)
        || !in_sessions(rule, req.session)
        || !has_claims(rule, req.claims)
    {
        return false;
    }
    // Methods are case-sensitive on the wire, but some servers (ASP.NET
    // Core among them) route `delete` as DELETE: a rule naming a method
    // covers every spelling of it.
    let listed = |methods: &[Method], m: &Method| {
        methods
            .iter()
            .any(|listed| listed.as_str().eq_ignore_ascii_case(m.as_str()))
    };
    let methods_match = match &rule.methods {
        None => true,
        // A deny matches if any method involved is denied; an allow only if
        // every one is allowed.
        Some(methods) if deny => std::iter::once(req.method)
            .chain(req.overrides)
            .any(|m| listed(methods, m)),
        Some(methods) => std::iter::once(req.method)
            .chain(req.overrides)
            .all(|m| listed(methods, m)),
    };
    methods_match
        && rule.paths.as_ref().is_none_or(|paths| {
            paths.iter().any(|p| {
                if deny {
                    p.matches_loosely(req.path)
                } else {
                    p.matches(req.path)
                }
            })
        })
}

#[cfg(test)]
mod tests;
