//! The reverse gateway: `http://sidekey/<route>/<path>` for SDKs with a base URL.

use http::Request;
use hyper::body::Incoming;

use super::{Flow, Plan, Proxy, ProxyError, Response};
use crate::egress::Reach;
use crate::identity::{self, Agent, Presented};
use crate::policy::path::normalize;

use super::body::Body;

impl Proxy {
    pub(super) async fn reverse(
        &self,
        flow: &mut Flow<'_>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, ProxyError> {
        let (parts, body) = req.into_parts();
        let (route_name, rest) = split_route(parts.uri.path());
        let route = flow.snapshot.config.routes.get(route_name).cloned();
        // Recorded before the identity, so that a refusal names the route
        // and its upstream too.
        if let Some(route) = &route {
            flow.event.route = Some(route.name.clone());
            flow.event.host = Some(route.upstream.host.clone());
            flow.event.port = Some(route.upstream.port);
        }

        // 1. identity, from the route's own slot
        let (agent, presented) = match route.as_ref() {
            Some(route) => {
                let slot = route.inject.as_ref().map(|i| &i.slot);
                self.identify(flow, &parts, parts.uri.query(), slot)?
            }
            None => self.identify_unrouted(flow, &parts)?,
        };
        flow.set_agent(&agent, &presented);

        // 2. route
        let route = route.ok_or_else(|| ProxyError::RouteNotFound(route_name.to_string()))?;

        // 3. path
        let path = normalize(rest)?;
        flow.set_path(
            format!("{}{}", route.upstream.base_path, path.decoded()),
            &presented,
        );

        // 4. policy
        let authorized = flow.authorize(
            &agent,
            Some(&route.name),
            &route.upstream.host,
            route.upstream.port,
            &parts,
            &route.upstream.base_path,
            &path,
        )?;
        let reach = if route.allow_private {
            Reach::Any
        } else {
            Reach::Public
        };
        let plan = Plan {
            https: route.upstream.https,
            host: route.upstream.host.clone(),
            port: route.upstream.port,
            base_path: route.upstream.base_path.clone(),
            route: Some(route),
            path,
            reach,
            presented,
            overrides: authorized.overrides,
            form_denied: authorized.form_denied,
        };
        self.deliver(flow, parts, body, plan).await
    }

    /// For a route that does not exist the token may sit in any route's slot;
    /// trying them all lets an authenticated agent learn it typed a wrong
    /// route (404) while a stranger still learns nothing (401).
    fn identify_unrouted(
        &self,
        flow: &mut Flow<'_>,
        parts: &http::request::Parts,
    ) -> Result<(Agent, Presented), ProxyError> {
        let snapshot = flow.snapshot;
        let bearer = crate::config::Slot::Header {
            name: http::header::AUTHORIZATION,
            prefix: "Bearer ".into(),
            suffix: String::new(),
        };
        let slots = snapshot
            .config
            .routes
            .values()
            .filter_map(|r| r.inject.as_ref().map(|i| &i.slot));
        // Report what a known route would have: a token found but refused
        // outranks "no token", so the answer does not reveal whether the route exists.
        let mut refusal = ProxyError::Identity(identity::IdentityError::Missing);
        for slot in std::iter::once(&bearer).chain(slots) {
            match self.identify(flow, parts, parts.uri.query(), Some(slot)) {
                Ok(found) => return Ok(found),
                Err(ProxyError::Identity(identity::IdentityError::Missing)) => {}
                Err(e) => refusal = e,
            }
        }
        Err(refusal)
    }
}

/// `/openai/v1/chat` -> (`openai`, `/v1/chat`); `/openai` -> (`openai`, `/`).
fn split_route(path: &str) -> (&str, &str) {
    let rest = path.strip_prefix('/').unwrap_or(path);
    match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    }
}
