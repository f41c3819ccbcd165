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
            route: Some(route.clone()),
            path,
            reach,
            presented,
            overrides: authorized.overrides,
            form_denied: authorized.form_denied,
        };
        let mut response = self.deliver(flow, parts, body, plan).await?;
        if let Some(location) = response
            .headers()
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| gateway_location(v, &route.name, &route.upstream))
            .and_then(|v| http::HeaderValue::from_str(&v).ok())
        {
            response
                .headers_mut()
                .insert(http::header::LOCATION, location);
        }
        Ok(response)
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

/// A redirect within the route's own origin and base path, told in the
/// gateway's URL space (`/v1/next` or `https://api.example/v1/next` ->
/// `/api/v1/next`), as nginx's `proxy_redirect default` does: a client
/// that follows it comes back through sidekey, rather than going to the
/// upstream directly with its agent token, or to a gateway path that names
/// no route. Any other redirect is left as it is.
fn gateway_location(
    location: &str,
    route: &str,
    upstream: &crate::config::Upstream,
) -> Option<String> {
    let path = if location.starts_with('/') && !location.starts_with("//") {
        location.to_string()
    } else {
        let uri: http::Uri = location.parse().ok()?;
        let https = match uri.scheme_str()? {
            "https" => true,
            "http" => false,
            _ => return None,
        };
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
        let same = https == upstream.https
            && port == upstream.port
            && crate::policy::normalize_host(host) == upstream.host;
        if !same {
            return None;
        }
        uri.path_and_query().map_or("/", |p| p.as_str()).to_string()
    };
    let rest = path.strip_prefix(upstream.base_path.as_str())?;
    if !(rest.is_empty() || rest.starts_with('/') || rest.starts_with('?')) {
        return None;
    }
    Some(format!("/{route}{rest}"))
}

/// `/openai/v1/chat` -> (`openai`, `/v1/chat`); `/openai` -> (`openai`, `/`).
fn split_route(path: &str) -> (&str, &str) {
    let rest = path.strip_prefix('/').unwrap_or(path);
    match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_within_the_route_are_told_through_the_gateway() {
        let upstream = crate::config::Upstream {
            https: true,
            host: "api.example".into(),
            port: 443,
            base_path: "/v2".into(),
        };
        let told = |location: &str| gateway_location(location, "api", &upstream);
        for (location, expected) in [
            ("/v2/next", Some("/api/next")),
            ("/v2", Some("/api")),
            ("/v2?page=2", Some("/api?page=2")),
            ("https://api.example/v2/next?x=1", Some("/api/next?x=1")),
            ("https://API.example.:443/v2/next", Some("/api/next")),
            // Outside the base path, another origin, scheme or port, or
            // not a path at all: as they are.
            ("/v1/next", None),
            ("/v2x/next", None),
            ("https://elsewhere.example/v2/next", None),
            ("http://api.example/v2/next", None),
            ("https://api.example:8443/v2/next", None),
            ("//api.example/v2/next", None),
            ("next", None),
            ("https://api.example@evil.example/v2/next", None),
        ] {
            assert_eq!(told(location).as_deref(), expected, "{location}");
        }
    }
}
