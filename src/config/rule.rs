//! `[[rules]]`: who may call what, checked.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::Method;
use serde::Deserialize;

use super::raw::{Checker, valid_name};
use super::{Action, Agents, Route, Rule, Target};
use crate::policy::{HostPattern, PathPattern};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    name: Option<String>,
    agents: Vec<String>,
    sessions: Option<Vec<String>>,
    claims: Option<BTreeMap<String, String>>,
    route: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    methods: Option<Vec<String>>,
    paths: Option<Vec<String>>,
    action: String,
    #[serde(default)]
    allow_private: bool,
}

impl RawRule {
    pub(super) fn placeholder() -> Self {
        Self {
            name: None,
            agents: Vec::new(),
            sessions: None,
            claims: None,
            route: None,
            host: None,
            port: None,
            methods: None,
            paths: None,
            action: String::new(),
            allow_private: false,
        }
    }
}

pub(super) fn check_rule(
    c: &mut Checker,
    index: usize,
    raw: RawRule,
    routes: &BTreeMap<String, Arc<Route>>,
) -> Option<Rule> {
    let at = format!("rules[{index}]");
    if raw.action.is_empty() && raw.agents.is_empty() {
        return None; // already reported when deserialising
    }
    let action = match raw.action.as_str() {
        "allow" => Some(Action::Allow),
        "deny" => Some(Action::Deny),
        other => {
            c.fail(
                format!("{at}.action"),
                format!("invalid action {other:?} (expected \"allow\" or \"deny\")"),
            );
            None
        }
    };
    let agents = if raw.agents.is_empty() {
        c.fail(
            format!("{at}.agents"),
            "empty list: name agents, or [\"*\"] for all",
        );
        None
    } else if raw.agents.iter().any(|a| a == "*") {
        if raw.agents.len() > 1 {
            c.fail(format!("{at}.agents"), "\"*\" already names every agent");
        }
        Some(Agents::Any)
    } else {
        for agent in &raw.agents {
            if !valid_name(agent) {
                c.fail(
                    format!("{at}.agents"),
                    format!("invalid agent name {agent:?}"),
                );
            }
        }
        Some(Agents::Named(raw.agents))
    };
    let target = match (raw.route, raw.host) {
        (Some(_), Some(_)) => {
            c.fail(&at, "give `route` or `host`, not both");
            None
        }
        (None, None) => {
            c.fail(&at, "give `route` or `host`");
            None
        }
        (Some(route), None) => {
            if raw.port.is_some() {
                c.fail(
                    format!("{at}.port"),
                    "`port` goes with `host`; a route has its own",
                );
            }
            if routes.contains_key(&route) {
                Some(Target::Route(route))
            } else {
                c.fail(format!("{at}.route"), format!("no route named {route:?}"));
                None
            }
        }
        (None, Some(host)) => match HostPattern::parse(&host) {
            Ok(pattern) => Some(Target::Host {
                pattern,
                port: raw.port,
            }),
            Err(message) => {
                c.fail(format!("{at}.host"), message);
                None
            }
        },
    };
    let methods = raw.methods.map(|methods| {
        if methods.is_empty() {
            c.fail(
                format!("{at}.methods"),
                "empty list: leave it out to match every method",
            );
        }
        methods
            .iter()
            .filter_map(|m| {
                let upper = m.to_ascii_uppercase();
                match Method::from_bytes(upper.as_bytes()) {
                    Ok(method) if !upper.is_empty() => Some(method),
                    _ => {
                        c.fail(format!("{at}.methods"), format!("invalid method {m:?}"));
                        None
                    }
                }
            })
            .collect()
    });
    let paths = raw.paths.map(|paths| {
        if paths.is_empty() {
            c.fail(
                format!("{at}.paths"),
                "empty list: leave it out to match every path",
            );
        }
        paths
            .iter()
            .filter_map(|p| match PathPattern::parse(p) {
                Ok(pattern) => Some(pattern),
                Err(message) => {
                    c.fail(format!("{at}.paths"), message);
                    None
                }
            })
            .collect()
    });
    if let Some(sessions) = &raw.sessions {
        if sessions.is_empty() {
            c.fail(
                format!("{at}.sessions"),
                "empty list: leave it out to match every session",
            );
        }
        for session in sessions {
            if !valid_name(session) {
                c.fail(
                    format!("{at}.sessions"),
                    format!("invalid session name {session:?}"),
                );
            }
        }
    }
    let label = match raw.name {
        Some(name) if valid_name(&name) => name,
        Some(name) => {
            c.fail(format!("{at}.name"), format!("invalid rule name {name:?}"));
            at.clone()
        }
        None => at.clone(),
    };
    Some(Rule {
        label,
        agents: agents?,
        sessions: raw.sessions,
        claims: raw.claims,
        target: target?,
        methods,
        paths,
        action: action?,
        allow_private: raw.allow_private,
    })
}
