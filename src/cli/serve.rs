//! `sidekey run`, `check`, `explain`, `status` and `reload`.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, bail};
use http::Method;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{Paths, SilentExit, init_logging, runtime, shut_down};
use crate::admin;
use crate::config::{Config, Target};
use crate::live::Live;
use crate::metrics::Metrics;
use crate::policy::{self, path::normalize};
use crate::proxy::Proxy;
use crate::secret::source::SecretTable;
use crate::secret::store::MasterKey;
use crate::state::StateDir;
use crate::token::Verifier;

/// A proxy serving in this process.
pub(crate) struct Running {
    pub(crate) addr: SocketAddr,
    pub(crate) live: Arc<Live>,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops accepting and waits for in-flight requests (up to the grace period).
    pub(crate) async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.server.await;
        for task in self.background {
            task.abort();
        }
    }
}

/// Starts the proxy: config already validated, state dir initialised.
pub(crate) async fn start(
    config: Config,
    state: StateDir,
    listen: Option<SocketAddr>,
) -> anyhow::Result<Running> {
    let verifier = Verifier::load(&state)?;
    let admin_path = config.admin.clone().unwrap_or_else(|| state.admin_socket());
    let live = Arc::new(Live::new(config, state, listen)?);
    let (addr, limits, unix_path, tls_addr) = {
        let snapshot = live.snapshot();
        let unix = snapshot
            .config
            .listen_unix
            .as_ref()
            .map(|p| live.state.root().join(p));
        (
            snapshot.config.listen,
            snapshot.config.limits.clone(),
            unix,
            snapshot.config.listen_tls,
        )
    };
    let listener = crate::listen::bind(addr).await?;
    let unix = match &unix_path {
        Some(path) => Some(
            crate::listen::bind_unix(path)
                .with_context(|| format!("cannot listen on {}", path.display()))?,
        ),
        None => None,
    };
    let addr = listener
        .local_addr()
        .context("cannot read the bound address")?;
    let admin = admin::bind(&admin_path)
        .with_context(|| format!("cannot open admin socket {}", admin_path.display()))?;
    let metrics = Arc::new(Metrics::default());
    let admin_api = admin::Admin::new(live.clone(), metrics.clone());
    let mut background = vec![
        tokio::spawn(live.clone().watch()),
        tokio::spawn(admin::serve(admin, admin_api.clone())),
    ];
    let admin_tcp = live.snapshot().config.admin_tcp.clone();
    if let Some(tcp) = admin_tcp {
        let token = live
            .current()
            .and_then(|(_, secrets)| {
                secrets
                    .table
                    .get(&tcp.token)
                    .ok()
                    .map(|s| s.expose().to_string())
            })
            .with_context(|| format!("admin_tcp.token: secret {:?} is unavailable", tcp.token))?;
        let listener = crate::listen::bind(tcp.listen).await?;
        let bound = listener
            .local_addr()
            .context("cannot read the bound address")?;
        tracing::info!("admin API (bearer token) on http://{bound}");
        background.push(tokio::spawn(admin::serve_tcp(listener, admin_api, token)));
    }
    let minter = crate::ca::LeafMinter::load(&live.state)?;
    let tls = match tls_addr {
        Some(tls_addr) => {
            let listener = crate::listen::bind(tls_addr).await?;
            let bound = listener
                .local_addr()
                .context("cannot read the bound address")?;
            let names = vec!["localhost".to_string(), bound.ip().to_string()];
            let config = minter.mtls_config(&live.state, &names)?;
            tracing::info!("agents with client certificates on https://{bound}");
            Some((listener, tokio_rustls::TlsAcceptor::from(Arc::new(config))))
        }
        None => None,
    };
    let proxy = Arc::new(Proxy::new(live.clone(), verifier, minter, metrics, addr));
    let (shutdown, shutdown_rx) = watch::channel(false);
    if let Some(path) = &unix_path {
        tracing::info!("agents by uid on unix socket {}", path.display());
    }
    let listeners = crate::listen::Listeners {
        tcp: listener,
        unix,
        tls,
    };
    let server = tokio::spawn(crate::listen::serve(listeners, proxy, limits, shutdown_rx));
    Ok(Running {
        addr,
        live,
        shutdown,
        server,
        background,
    })
}

/// Starts a proxy private to one `exec`: its one listener, no admin API,
/// no unix or mTLS listeners (those belong to `sidekey run`).
pub(crate) fn start_private(
    live: Arc<Live>,
    listener: tokio::net::TcpListener,
) -> anyhow::Result<Running> {
    let addr = listener
        .local_addr()
        .context("cannot read the bound address")?;
    let verifier = Verifier::load(&live.state)?;
    let minter = crate::ca::LeafMinter::load(&live.state)?;
    let limits = live.snapshot().config.limits.clone();
    let metrics = Arc::new(Metrics::default());
    let proxy = Arc::new(Proxy::new(live.clone(), verifier, minter, metrics, addr));
    let (shutdown, shutdown_rx) = watch::channel(false);
    let listeners = crate::listen::Listeners {
        tcp: listener,
        unix: None,
        tls: None,
    };
    let server = tokio::spawn(crate::listen::serve(listeners, proxy, limits, shutdown_rx));
    Ok(Running {
        addr,
        background: vec![tokio::spawn(live.clone().watch())],
        live,
        shutdown,
        server,
    })
}

pub(super) fn run(paths: &Paths, listen: Option<SocketAddr>) -> anyhow::Result<()> {
    let _logging = init_logging("info");
    let config = paths.config()?;
    let state = paths.state_dir_of(&config)?;
    if config.audit.sink == crate::config::AuditSink::Stdout && crate::audit::stdout_is_null() {
        tracing::warn!(
            "audit.file = \"-\" but stdout is /dev/null (or was closed): every audit record is discarded"
        );
    }
    for warning in unusable_now(&config, Some(&state))
        .into_iter()
        .chain(exposed(&config))
    {
        tracing::warn!("{warning}");
    }
    for (path, mode) in state.open_to_others() {
        tracing::warn!(
            "{} has mode {mode:o}: others on this host may read sidekey's keys; chmod go-rwx it",
            path.display()
        );
    }
    if let Some(limit) = crate::listen::raise_fd_limit()
        && limit < config.limits.max_connections as u64 * 2
    {
        tracing::warn!(
            limit,
            max_connections = config.limits.max_connections,
            "the open-file limit is below two per allowed connection; raise it (ulimit -n) or lower limits.max_connections"
        );
    }
    let admin_path = config.admin.clone().unwrap_or_else(|| state.admin_socket());
    let runtime = runtime()?;
    let served = runtime.block_on(async {
        // Watched before "listening" is announced: a supervisor may send
        // SIGHUP as soon as it reads that line, and unwatched, SIGHUP kills.
        let mut hangup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
        let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
        let running = start(config, state, listen).await?;
        tracing::info!(
            "sidekey {} listening on {}",
            env!("CARGO_PKG_VERSION"),
            running.addr
        );
        // A reload may wait on a credential process for seconds; a stop
        // asked for meanwhile starts at once rather than after it. SIGHUPs
        // that arrive during a reload are taken by one more once it ends.
        let mut reloading: Option<tokio::task::JoinHandle<_>> = None;
        loop {
            tokio::select! {
                _ = hangup.recv(), if reloading.is_none() => {
                    let live = running.live.clone();
                    reloading = Some(tokio::spawn(async move { live.reload_off_runtime().await }));
                }
                reloaded = futures_util::future::OptionFuture::from(reloading.as_mut()),
                    if reloading.is_some() => {
                    reloading = None;
                    // The task itself fails only when the runtime stops.
                    if let Some(Ok(Err(e))) = reloaded {
                        tracing::error!("reload refused, old config still in force:\n{e}");
                    }
                }
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
            }
        }
        tracing::info!("shutting down");
        running.stop().await;
        let _ = std::fs::remove_file(&admin_path);
        Ok::<_, anyhow::Error>(())
    });
    shut_down(runtime);
    served
}

/// What the config opens beyond this host in clear: the admin API takes a
/// bearer token and can revoke and reload, so off loopback it should sit
/// behind TLS or a private network. Not refused: that may be so.
fn exposed(config: &Config) -> Vec<String> {
    config
        .admin_tcp
        .as_ref()
        .filter(|tcp| !tcp.listen.ip().is_loopback())
        .map(|tcp| {
            format!(
                "admin_tcp.listen: {} is reachable beyond this host, and the admin API's token travels in clear",
                tcp.listen
            )
        })
        .into_iter()
        .collect()
}

/// What the config names outside itself that cannot be used now. Not a
/// config error (a directory or key file may appear before the first
/// request), but until it does, requests fail closed: `check` and `run`
/// say so at once.
fn unusable_now(config: &Config, state: Option<&StateDir>) -> Vec<String> {
    let mut found = Vec::new();
    // Before `init` the state dir is missing, and that is what `run` says.
    if let (crate::config::AuditSink::File(file), Some(state)) = (&config.audit.sink, state)
        && state.root().is_dir()
    {
        let path = state.root().join(file);
        let consequence = match config.audit.on_failure {
            crate::config::OnFailure::Deny => "every request will be refused",
            crate::config::OnFailure::Continue => "no request will be audited",
        };
        let problem = if path.exists() {
            std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .err()
                .map(|e| format!("cannot be written ({})", crate::config::describe_io(&e)))
        } else {
            path.parent()
                .filter(|dir| !dir.is_dir())
                .map(|dir| format!("is in {}, which is not a directory", dir.display()))
        };
        if let Some(problem) = problem {
            found.push(format!(
                "audit.file: {} {problem}; {consequence}",
                path.display()
            ));
        }
    }
    if let Some(oidc) = &config.oidc
        && let crate::identity::oidc::JwksSource::File(path) = &oidc.jwks
        && let Err(e) = crate::identity::oidc::read_jwks(path)
    {
        found.push(format!(
            "identity.oidc.jwks_file: {e}; every workload token will be refused"
        ));
    }
    found
}

pub(super) fn check(paths: &Paths) -> anyhow::Result<()> {
    // What `run` and `reload` refuse, `check` refuses: the config, and the
    // upstream trust it builds from the CA files it names.
    let loaded =
        Config::load(&paths.config).and_then(
            |config| match crate::proxy::upstream::Clients::build(&config) {
                Ok(_) => Ok(config),
                Err(e) => Err(crate::config::ConfigError {
                    file: config.file.display().to_string(),
                    problems: vec![crate::config::Problem::new("tls", e.to_string())],
                }),
            },
        );
    let config = match loaded {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            let n = e.problems.len();
            eprintln!("{n} problem{} found", if n == 1 { "" } else { "s" });
            return Err(SilentExit(1).into());
        }
    };
    // Secret values are not config errors (they may be set after the
    // config), but an operator wants to know before starting.
    for (first, other) in config.routes_sharing_an_upstream() {
        eprintln!(
            "warning: routes.{other}: same upstream as routes.{first}; forward-proxy requests \
             to it use routes.{first} (the gateway reaches both by name)"
        );
    }
    for (var, named, lost) in crate::exec::env::shared_url_vars(&config) {
        eprintln!(
            "warning: routes.{lost}: under exec, {var} names routes.{named}; rename one of them"
        );
    }
    let state = paths.state_dir_of(&config).ok();
    for warning in unusable_now(&config, state.as_ref())
        .into_iter()
        .chain(exposed(&config))
    {
        eprintln!("warning: {warning}");
    }
    if let Some(state) = state {
        let key = MasterKey::load(&state).ok();
        let table = SecretTable::load(&config, &state, key.as_ref(), None, &|_| false);
        let mut failures: Vec<_> = table.failures().collect();
        failures.sort();
        for (name, reason) in failures {
            eprintln!("warning: secrets.{name}: {reason}");
        }
    }
    eprintln!(
        "{}: ok ({} routes, {} rules, {} secrets)",
        paths.config.display(),
        config.routes.len(),
        config.rules.len(),
        config.secrets.len()
    );
    Ok(())
}

pub(super) fn explain(
    paths: &Paths,
    agent: &str,
    session: &str,
    method: &str,
    url: &str,
) -> anyhow::Result<()> {
    let config = paths.config()?;
    let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes())
        .with_context(|| format!("invalid method {method:?}"))?;
    let uri: http::Uri = url
        .parse()
        .with_context(|| format!("invalid URL {url:?}"))?;
    let (Some(scheme), Some(_)) = (uri.scheme_str(), uri.authority()) else {
        bail!("give an absolute URL, e.g. http://127.0.0.1:8080/openai/v1/chat/completions");
    };
    super::check_name("agent", agent)?;
    let https = scheme.eq_ignore_ascii_case("https");
    let (host, port) = crate::proxy::destination(&uri, if https { 443 } else { 80 })
        .map_err(|e| anyhow::anyhow!("{url:?}: {e}"))?;
    // Only a URL on sidekey's own address is a gateway URL; any other
    // origin, a local one on another port too, is a destination in its own
    // right, whatever its path looks like. A config listening on port 0
    // leaves the port to `run`, so any local port may be the gateway.
    let listen_port = config.listen.port();
    let gateway = (port == listen_port || listen_port == 0)
        && (host == "localhost"
            || host.parse::<std::net::IpAddr>().is_ok_and(|ip| {
                ip.is_loopback() || ip == config.listen.ip() || ip.is_unspecified()
            }));

    // An upstream URL names its route by origin, as the proxy finds it; a
    // gateway URL by its first segment.
    let by_origin = config.route_for_origin(https, &host, port, Some(uri.path()));
    let (mode, route, rest) = match by_origin {
        Some(route) => (
            "forward",
            Some(route.clone()),
            &uri.path()[route.upstream.base_path.len()..],
        ),
        None if gateway => {
            let trimmed = uri.path().trim_start_matches('/');
            let (name, rest) = match trimmed.find('/') {
                Some(i) => (&trimmed[..i], &trimmed[i..]),
                None => (trimmed, "/"),
            };
            match config.routes.get(name) {
                Some(route) => ("reverse", Some(route.clone()), rest),
                None => ("reverse", None, uri.path()),
            }
        }
        None => ("forward", None, uri.path()),
    };
    let rest = if rest.is_empty() { "/" } else { rest };
    let policy = policy::Policy::new(&config);
    // An https URL outside the gateway is a CONNECT first: decided on the
    // origin alone, then tunnelled blind or intercepted, as the proxy does.
    let connect = (https && mode == "forward").then(|| {
        let on_origin = config.route_for_origin(true, &host, port, None);
        policy.check_connect(
            agent,
            session,
            None,
            on_origin.map(|r| r.name.as_str()),
            &host,
            port,
        )
    });
    let blind_or_refused = connect
        .as_ref()
        .is_some_and(|c| !c.allowed || (route.is_none() && !c.inspect));
    let mode = match &connect {
        Some(_) if blind_or_refused => "connect",
        Some(_) => "intercept",
        None => mode,
    };
    outln!("agent:    {agent}");
    outln!("request:  {method} {url}");
    outln!("mode:     {mode}");
    if let Some(connect) = connect.filter(|_| blind_or_refused) {
        outln!("route:    none (destination {host}:{port})");
        let verdict = if connect.allowed {
            "allow (tunnelled blind: sidekey sees no method or path)"
        } else {
            "deny (refused at CONNECT)"
        };
        outln!("decision: {verdict}");
        print_rule(&config, connect.rule.as_ref())?;
        if connect.allowed {
            outln!("inject:   nothing (no credential on this destination)");
        }
        return Ok(());
    }
    let path = match normalize(rest) {
        Ok(path) => path,
        Err(e) => {
            outln!("decision: deny (bad_request: {e})");
            return Ok(());
        }
    };
    let (dest_host, dest_port) = match &route {
        Some(r) => (r.upstream.host.clone(), r.upstream.port),
        None => (host, port),
    };
    match &route {
        Some(r) => outln!(
            "route:    {} -> {}{}",
            r.name,
            r.upstream.origin(),
            r.upstream.base_path
        ),
        None => outln!("route:    none (destination {dest_host}:{dest_port})"),
    }
    outln!("path:     {}", path.decoded());
    let decision = policy.check(&policy::Request {
        agent,
        session,
        claims: None,
        route: route.as_ref().map(|r| r.name.as_str()),
        host: &dest_host,
        port: dest_port,
        method: &method,
        overrides: &[],
        path: &path,
    });
    // The proxy refuses a private address given literally unless the route
    // or rule lets it be private; a name is resolved, and checked, when sent.
    let private_ok = match &route {
        Some(r) => r.allow_private || dest_host.parse::<std::net::IpAddr>().is_ok(),
        None => decision.private_ok,
    };
    let reach = if private_ok {
        crate::egress::Reach::Any
    } else {
        crate::egress::Reach::Public
    };
    let refused = crate::egress::check_literal(&dest_host, reach, false).err();
    let verdict = match (&refused, decision.allowed) {
        (Some(why), true) => format!("deny (destination refused: {why})"),
        (_, allowed) => if allowed { "allow" } else { "deny" }.to_string(),
    };
    outln!("decision: {verdict}");
    print_rule(&config, decision.rule.as_ref())?;
    if decision.allowed && refused.is_none() {
        match route.as_ref().and_then(|r| r.inject.as_ref()) {
            Some(inject) => outln!("inject:   {}", describe_injection(inject)),
            None => outln!("inject:   nothing (no credential on this destination)"),
        }
    }
    Ok(())
}

/// What `explain` says a route puts into the request, naming secrets only.
fn describe_injection(inject: &crate::config::Injection) -> String {
    use crate::config::TokenGrant;
    let secret = &inject.secret;
    if let Some(sigv4) = &inject.sigv4 {
        return format!(
            "the request re-signed with AWS SigV4 ({} in {}), access key id from secret {secret:?}, \
             secret access key from secret {:?}",
            sigv4.service, sigv4.region, sigv4.secret_access_key
        );
    }
    match inject.grant.as_deref() {
        Some(TokenGrant::ClientCredentials(oauth2)) => format!(
            "an access token from {} (client {:?}, client secret from secret {secret:?}) into the {}",
            oauth2.token_url, oauth2.client_id, inject.slot
        ),
        Some(TokenGrant::GcpServiceAccount { .. }) => format!(
            "an access token for the service-account key in secret {secret:?} into the {}",
            inject.slot
        ),
        None => format!("secret {secret:?} into the {}", inject.slot),
    }
}

/// The `rule:` line of `explain`, and what the rule targets.
fn print_rule(config: &crate::config::Config, label: Option<&String>) -> anyhow::Result<()> {
    outln!(
        "rule:     {}",
        label.map_or("none (default deny)", String::as_str)
    );
    if let Some(rule) = config.rules.iter().find(|r| Some(&r.label) == label) {
        let target = match &rule.target {
            Target::Route(name) => format!("route {name}"),
            Target::Host {
                pattern,
                port: None,
            } => format!("host {pattern}"),
            Target::Host {
                pattern,
                port: Some(port),
            } => format!("host {pattern} port {port}"),
        };
        outln!("          ({target})");
    }
    Ok(())
}

/// The running proxy's admin socket. Read leniently, like the state dir, so
/// that `reload` can report what is wrong with a config being edited.
pub(super) fn admin_socket(paths: &Paths) -> anyhow::Result<std::path::PathBuf> {
    if let Some(admin) = paths.raw_key("admin")? {
        let Some(path) = admin.strip_prefix("unix:") else {
            bail!("{}: admin must be \"unix:PATH\"", paths.config.display());
        };
        return Ok(crate::config::base_dir(&paths.config).join(path));
    }
    Ok(paths.state_dir()?.admin_socket())
}

/// One request to the running proxy's admin socket; `None` when no proxy
/// answers there.
pub(super) fn ask(
    paths: &Paths,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<Option<(http::StatusCode, serde_json::Value)>> {
    let socket = admin_socket(paths)?;
    match runtime()?.block_on(admin::call(&socket, method, path, body)) {
        None => Ok(None),
        Some(Err(e)) => bail!("admin socket {}: {e}", socket.display()),
        Some(Ok(reply)) => Ok(Some(reply)),
    }
}

/// The running proxy's status; with none running, what the state dir says,
/// and exit 3 ("not running", as LSB init scripts and `systemctl status`
/// answer) so that a script can tell.
pub(super) fn status(paths: &Paths) -> anyhow::Result<()> {
    let reply = ask(paths, Method::GET, "/v1/status", None)?;
    let running = reply.is_some();
    let body = match reply {
        Some((_, mut body)) => {
            body["running"] = true.into();
            body
        }
        // No proxy: what the state dir says.
        None => {
            let state = paths.state_dir()?;
            let revocations = crate::token::revocation::Revocations::read(&state.revocations())?;
            let secrets = MasterKey::load(&state)
                .ok()
                .and_then(|key| crate::secret::store::Store::read(&state.store(), &key).ok())
                .map(|store| store.entries.len());
            serde_json::json!({
                "running": false,
                "state_dir": state.root().display().to_string(),
                "initialised": state.signing_key().exists(),
                "stored_secrets": secrets,
                "revocations": serde_json::to_value(&revocations).unwrap_or_default(),
            })
        }
    };
    outln!(
        "{}",
        serde_json::to_string_pretty(&body).unwrap_or_default()
    );
    if !running {
        eprintln!("sidekey: no sidekey is running");
        return Err(SilentExit(3).into());
    }
    Ok(())
}

pub(super) fn reload(paths: &Paths) -> anyhow::Result<()> {
    let Some((status, body)) = ask(paths, Method::POST, "/v1/reload", None)? else {
        // Nothing was reloaded, which a script must see; whether the next
        // start would load the config is still worth saying.
        let config = paths.config()?;
        eprintln!(
            "sidekey: no sidekey is running, nothing reloaded; {} is valid for the next start ({} routes, {} rules)",
            config.file.display(),
            config.routes.len(),
            config.rules.len()
        );
        return Err(SilentExit(1).into());
    };
    if status.is_success() {
        eprintln!("config reloaded");
        return Ok(());
    }
    eprintln!("{}", body["error"].as_str().unwrap_or("unknown error"));
    eprintln!("reload refused; the running proxy keeps its current config");
    Err(SilentExit(1).into())
}
