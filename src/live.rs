//! What a running proxy currently serves: the config version, the secret
//! values and the revocation list, each swapped atomically when its source
//! changes, so a request always sees one consistent version of each.
//!
//! A watcher polls the files behind them (store, `file:` sources, the
//! revocation list) every [`POLL`]; a change is live within one period, well
//! inside SPEC's one second, on every open connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use zeroize::Zeroizing;

use crate::audit::AuditLog;
use crate::config::{Config, ConfigError, Problem, Slot};
use crate::identity::oidc::{JwksSource, OidcVerifier, parse_jwks, read_jwks};
use crate::policy::Policy;
use crate::proxy::upstream::Clients;
use crate::scrub::{Scrubber, variants};
use crate::secret::Secret;
use crate::secret::source::{SecretSource, SecretTable};
use crate::secret::store::MasterKey;
use crate::state::StateDir;
use crate::token::revocation::Revocations;

pub const POLL: Duration = Duration::from_millis(200);

/// One config version with what is derived from it.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<Config>,
    pub policy: Policy,
    pub clients: Clients,
    pub audit: Arc<AuditLog>,
    pub oidc: Option<Arc<OidcVerifier>>,
}

/// The secret values of one load, with their scrubber.
#[derive(Debug)]
pub struct SecretView {
    pub table: SecretTable,
    /// Scrubs the values in `table` and the `retired` ones.
    pub scrubber: Arc<Scrubber>,
    /// The config version whose sources were read; a request uses a view
    /// only with that same version, so a secret name reused by a reload can
    /// never lend the old source's value to the new route.
    config: Arc<Config>,
    retired: Vec<Retired>,
}

/// A value that was injected and is no longer in use: rotated, removed, or
/// its source failing. It may still be valid at the provider, and an
/// upstream may have stored it (a key listing, a request log), so it is
/// scrubbed for [`RETIRED_FOR`] after it left, or until it expires.
#[derive(Clone)]
struct Retired {
    /// The secret it was the value of.
    name: String,
    value: Arc<Secret>,
    patterns: Vec<Zeroizing<Vec<u8>>>,
    since: std::time::Instant,
    /// When its source said it expires (a credential process's value).
    expires: Option<std::time::SystemTime>,
}

impl Retired {
    fn ended(&self) -> bool {
        self.since.elapsed() >= RETIRED_FOR
            || self
                .expires
                .is_some_and(|at| at <= std::time::SystemTime::now())
    }
}

impl std::fmt::Debug for Retired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retired")
            .field("since", &self.since)
            .finish_non_exhaustive()
    }
}

/// How long a retired value is still scrubbed.
const RETIRED_FOR: Duration = Duration::from_secs(24 * 3600);
/// At most this many retired values of each secret, the latest, so that a
/// source that rotates often does not grow the scrubber without bound, nor
/// push out another secret's.
const MAX_RETIRED_PER_SECRET: usize = 4;

#[derive(Debug)]
pub struct Live {
    pub state: StateDir,
    config_path: PathBuf,
    listen_override: Option<SocketAddr>,
    master_key: Option<MasterKey>,
    snapshot: ArcSwap<Snapshot>,
    secrets: ArcSwap<SecretView>,
    /// `Err` when the list cannot be read: no token is trusted then.
    revocations: ArcSwap<Result<Revocations, String>>,
    /// The listen address of the config `run` started with: the one bound.
    started_listen: SocketAddr,
    /// Reloads that took effect, from SIGHUP, `reload` or the admin socket.
    reloads: AtomicU64,
    /// What the watched files looked like when last read. Taken before
    /// reading, so a change made during a read is seen on the next poll; the
    /// lock also keeps a reload and the watcher from interleaving.
    seen: Mutex<Stamps>,
    /// The revocation list's stamp, under its own lock.
    revocations_seen: Mutex<Option<FileStamp>>,
    /// Whether slow sources are being renewed on their own thread.
    renewing: AtomicBool,
}

#[derive(Debug, Default)]
struct Stamps {
    secrets: Vec<Option<FileStamp>>,
    /// When slow sources were last renewed, to pace re-runs of failed ones.
    slow_renewed: Option<std::time::Instant>,
    /// How long after that the next run may start: [`EXPIRY_RETRY`],
    /// doubled (up to [`EXPIRY_RETRY_MAX`]) while a source that has no
    /// value keeps failing, so a broken one is not run and logged every
    /// few seconds for ever.
    slow_retry: Duration,
    jwks: Option<FileStamp>,
}

impl Live {
    pub fn new(
        config: Config,
        state: StateDir,
        listen_override: Option<SocketAddr>,
    ) -> Result<Self, ConfigError> {
        let master_key = MasterKey::load(&state).ok();
        let config_path = config.file.clone();
        let started_listen = config.listen;
        let snapshot = build_snapshot(config, &state, listen_override, None)?;
        let revocations_seen = fingerprint(&state.revocations());
        let stamps = Stamps {
            secrets: secret_stamps(&snapshot.config, &state),
            // The first poll reads the key set once more; harmless.
            jwks: None,
            slow_renewed: Some(std::time::Instant::now()),
            slow_retry: EXPIRY_RETRY,
        };
        let secrets = load_secrets(&snapshot.config, &state, master_key.as_ref(), None, &|_| {
            false
        });
        let revocations = Revocations::read(&state.revocations()).map_err(|e| e.to_string());
        Ok(Self {
            state,
            config_path,
            listen_override,
            master_key,
            snapshot: ArcSwap::from_pointee(snapshot),
            secrets: ArcSwap::from_pointee(secrets),
            revocations: ArcSwap::from_pointee(revocations),
            seen: Mutex::new(stamps),
            revocations_seen: Mutex::new(revocations_seen),
            started_listen,
            reloads: AtomicU64::new(0),
            renewing: AtomicBool::new(false),
        })
    }

    /// Reloads that took effect since start.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// The current config version with the secrets read for it. `None` only
    /// if a reload keeps them apart for longer than a few yields.
    pub fn current(&self) -> Option<(Arc<Snapshot>, Arc<SecretView>)> {
        for _ in 0..100 {
            let snapshot = self.snapshot.load_full();
            let secrets = self.secrets.load_full();
            if Arc::ptr_eq(&snapshot.config, &secrets.config) {
                return Some((snapshot, secrets));
            }
            std::thread::yield_now();
        }
        None
    }

    fn lock_seen(&self) -> std::sync::MutexGuard<'_, Stamps> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    pub fn revocations(&self) -> arc_swap::Guard<Arc<Result<Revocations, String>>> {
        self.revocations.load()
    }

    /// [`Live::reload`] on a blocking thread. Loading secrets can wait
    /// seconds on a credential process or Vault, and on the one-thread
    /// runtime of a pinned sidecar that wait would stall every connection.
    pub async fn reload_off_runtime(self: &Arc<Self>) -> Result<(), ConfigError> {
        let live = self.clone();
        tokio::task::spawn_blocking(move || live.reload())
            .await
            .unwrap_or_else(|_| {
                Err(ConfigError {
                    file: self.config_path.display().to_string(),
                    problems: vec![Problem::new("reload", "stopped before it finished")],
                })
            })
    }

    /// Re-reads the config file. An invalid file is refused and the current
    /// version keeps serving.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let mut seen = self.lock_seen();
        let config = Config::load(&self.config_path)?;
        let current = self.snapshot.load();
        if config.listen != self.started_listen && self.listen_override.is_none() {
            tracing::warn!(
                listen = %config.listen,
                "a new listen address takes effect at restart"
            );
        }
        let snapshot = build_snapshot(config, &self.state, self.listen_override, Some(&current))?;
        seen.secrets = secret_stamps(&snapshot.config, &self.state);
        // Every source is read again, credential processes and Vault too:
        // a reload is how an operator asks for fresh values.
        let secrets = load_secrets(
            &snapshot.config,
            &self.state,
            self.master_key.as_ref(),
            Some(&self.secrets.load()),
            &|_| false,
        );
        self.snapshot.store(Arc::new(snapshot));
        self.secrets.store(Arc::new(secrets));
        self.reloads.fetch_add(1, Ordering::Relaxed);
        tracing::info!(config = %self.config_path.display(), "config reloaded");
        Ok(())
    }

    /// Polls the files behind secrets and revocations until the process
    /// ends, and refreshes a `jwks_url` key set every [`JWKS_REFRESH`].
    pub async fn watch(self: Arc<Self>) {
        let mut interval = tokio::time::interval(POLL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // When the key set was last fetched, for which config, and whether
        // that fetch failed.
        let mut jwks_fetched: Option<(std::time::Instant, Arc<Config>, bool)> = None;
        loop {
            interval.tick().await;
            // Loading may run credential processes; keep them off the runtime.
            let live = self.clone();
            let _ = tokio::task::spawn_blocking(move || live.poll()).await;
            let snapshot = self.snapshot.load_full();
            let Some(oidc) = &snapshot.oidc else { continue };
            let JwksSource::Url(url) = &oidc.config().jwks else {
                continue;
            };
            // Every JWKS_REFRESH; sooner after a failed fetch, and when a
            // token named a key the set lacks (at most every JWKS_RETRY).
            let due = jwks_fetched.as_ref().is_none_or(|(at, config, failed)| {
                !Arc::ptr_eq(config, &snapshot.config)
                    || at.elapsed() >= JWKS_REFRESH
                    || at.elapsed() >= JWKS_RETRY && (*failed || oidc.take_unknown_kid())
            });
            if due {
                let keys = fetch_jwks(&snapshot, url).await;
                let failed = keys.is_err();
                oidc.set_keys(keys);
                jwks_fetched = Some((std::time::Instant::now(), snapshot.config.clone(), failed));
            }
        }
    }

    /// One look at the watched files; re-reads what changed. Revocations
    /// come first and apart: a slow secret source never delays them.
    pub fn poll(self: &Arc<Self>) {
        let revocations_now = fingerprint(&self.state.revocations());
        let changed = {
            let mut seen = self
                .revocations_seen
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let changed = *seen != revocations_now;
            *seen = revocations_now;
            changed
        };
        if changed {
            self.refresh_revocations();
        }
        let mut seen = self.lock_seen();
        let snapshot = self.snapshot.load();
        if let Some(oidc) = &snapshot.oidc
            && let JwksSource::File(path) = &oidc.config().jwks
        {
            let now = fingerprint(path);
            if now != seen.jwks {
                seen.jwks = now;
                oidc.set_keys(read_jwks(path));
            }
        }
        let config = snapshot.config.clone();
        let now = secret_stamps(&config, &self.state);
        let previous = self.secrets.load_full();
        if !Arc::ptr_eq(&previous.config, &config) {
            // A reload is storing its own view.
            return;
        }
        if now != seen.secrets {
            // The store or a file changed: those are read again, and only
            // those; credential processes and Vault keep their values.
            seen.secrets = now;
            let view = load_secrets(
                &config,
                &self.state,
                self.master_key.as_ref(),
                Some(&previous),
                &|_| true,
            );
            self.secrets.store(Arc::new(view));
            tracing::info!("secrets reloaded");
        } else if previous.retired.iter().any(Retired::ended) {
            // Only the scrubber changes; the sources are not read again.
            let view = view_of(&config, previous.table.clone(), Some(&previous));
            self.secrets.store(Arc::new(view));
        }
        self.renew_due(&mut seen, &config);
    }

    /// Runs the slow sources that are due (failed, or expiring) on a thread
    /// of their own, so that a credential process that hangs until its
    /// timeout delays no file or store change; at most one such run at a
    /// time, and a failed one is retried (see [`Stamps::slow_retry`]).
    fn renew_due(self: &Arc<Self>, seen: &mut Stamps, config: &Arc<Config>) {
        let due = self.secrets.load().table.due(config, EXPIRY_MARGIN);
        let paced = seen
            .slow_renewed
            .is_none_or(|at| at.elapsed() >= seen.slow_retry);
        if due.is_empty() || !paced || self.renewing.swap(true, Ordering::AcqRel) {
            return;
        }
        seen.slow_renewed = Some(std::time::Instant::now());
        let live = self.clone();
        let config = config.clone();
        let spawned = std::thread::Builder::new()
            .name("sidekey-renew".into())
            .spawn(move || {
                let start = live.secrets.load_full();
                let fresh =
                    start
                        .table
                        .refreshed(&config, &live.state, live.master_key.as_ref(), &due);
                // Merged into what is current now: a file may have changed
                // while the process ran. The next try is paced from here,
                // so a process that hangs is not started again at once.
                let mut seen = live.lock_seen();
                seen.slow_renewed = Some(std::time::Instant::now());
                let current = live.secrets.load_full();
                if Arc::ptr_eq(&current.config, &config) {
                    let table = current.table.with_values_of(&fresh, &due);
                    let mut failing = false;
                    for (name, reason) in
                        table.failures().filter(|(n, _)| due.iter().any(|d| d == n))
                    {
                        failing = true;
                        tracing::warn!(secret = name, reason, "secret unavailable");
                    }
                    // A value still valid but about to expire is retried
                    // at the base pace, to be renewed before it ends.
                    let holding = due.iter().any(|n| start.table.get(n).is_ok());
                    seen.slow_retry = if failing && !holding {
                        (seen.slow_retry * 2).min(EXPIRY_RETRY_MAX)
                    } else {
                        EXPIRY_RETRY
                    };
                    if !failing {
                        tracing::info!(secrets = ?due, "secrets renewed");
                    }
                    let view = view_of(&config, table, Some(&current));
                    live.secrets.store(Arc::new(view));
                }
                live.renewing.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            self.renewing.store(false, Ordering::Release);
        }
    }

    /// Re-reads the revocation list now (after `POST /v1/revoke`, or when
    /// the file changed). Takes no lock a slow load could hold.
    pub fn refresh_revocations(&self) {
        let list = Revocations::read(&self.state.revocations());
        if let Err(e) = &list {
            tracing::error!(error = %e, "revocation list unreadable; refusing all agent tokens");
        }
        self.revocations
            .store(Arc::new(list.map_err(|e| e.to_string())));
    }
}
/// A credential process's value is renewed this long before it expires.
const EXPIRY_MARGIN: std::time::Duration = std::time::Duration::from_secs(30);
/// And a failed renewal is retried this often, not on every poll.
const EXPIRY_RETRY: std::time::Duration = std::time::Duration::from_secs(5);
/// The longest wait between runs of a source that keeps failing.
const EXPIRY_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(60);

/// How often a `jwks_url` key set is fetched again.
pub const JWKS_REFRESH: std::time::Duration = std::time::Duration::from_secs(300);
/// How soon after a failed fetch, or a token naming an unknown key.
const JWKS_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// Fetches a key set; the issuer is the operator's, so it may be private.
async fn fetch_jwks(snapshot: &Snapshot, url: &str) -> Result<jsonwebtoken::jwk::JwkSet, String> {
    let uri: http::Uri = url.parse().map_err(|_| format!("invalid URL {url}"))?;
    let req = http::Request::get(uri)
        .body(crate::proxy::body::empty())
        .map_err(|e| e.to_string())?;
    let client = snapshot.clients.get(crate::egress::Reach::Any);
    let body = crate::proxy::upstream::call_service(
        client,
        req,
        std::time::Duration::from_secs(10),
        1024 * 1024,
    )
    .await
    .map_err(|e| format!("{url}: {e}"))?;
    parse_jwks(&body)
}

/// The store and every `file:` source of `config`.
fn secret_stamps(config: &Config, state: &StateDir) -> Vec<Option<FileStamp>> {
    let mut stamps = vec![fingerprint(&state.store())];
    for source in config.secrets.values() {
        if let SecretSource::File(path) = source {
            stamps.push(fingerprint(path));
        }
    }
    stamps
}

/// Enough of a file's metadata to notice a rewrite or a rename over it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

fn fingerprint(path: &Path) -> Option<FileStamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        ino: meta.ino(),
        len: meta.len(),
        mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
    })
}

fn build_snapshot(
    mut config: Config,
    state: &StateDir,
    listen_override: Option<SocketAddr>,
    previous: Option<&Snapshot>,
) -> Result<Snapshot, ConfigError> {
    if let Some(listen) = listen_override {
        config.listen = listen;
    }
    let clients = Clients::build(&config).map_err(|e| ConfigError {
        file: config.file.display().to_string(),
        problems: vec![Problem::new("tls", e.to_string())],
    })?;
    let audit = AuditLog::new(&config.audit.sink, config.audit.on_failure, state.root());
    let audit = match previous {
        Some(previous) if previous.audit.same_as(&audit) => previous.audit.clone(),
        _ => Arc::new(audit),
    };
    let previous_oidc = previous.and_then(|p| p.oidc.as_deref());
    let oidc = config
        .oidc
        .clone()
        .map(|c| Arc::new(OidcVerifier::new(c, previous_oidc)));
    Ok(Snapshot {
        policy: Policy::new(&config),
        config: Arc::new(config),
        clients,
        audit,
        oidc,
    })
}

/// Reads `config`'s secrets (but the slow ones `keep` names, carried over
/// from `previous`) and builds their view.
fn load_secrets(
    config: &Arc<Config>,
    state: &StateDir,
    master_key: Option<&MasterKey>,
    previous: Option<&SecretView>,
    keep: &dyn Fn(&str) -> bool,
) -> SecretView {
    let table = SecretTable::load(config, state, master_key, previous.map(|p| &p.table), keep);
    for (name, reason) in table.failures() {
        tracing::warn!(secret = name, reason, "secret unavailable");
    }
    view_of(config, table, previous)
}

/// `table` with a scrubber that also covers the values `previous` held
/// that are no longer in use.
fn view_of(config: &Arc<Config>, table: SecretTable, previous: Option<&SecretView>) -> SecretView {
    let in_use = |value: &Secret| table.values().any(|(_, current)| **current == *value);
    let mut retired: Vec<Retired> = Vec::new();
    if let Some(previous) = previous {
        for (name, value) in previous.table.values() {
            if !in_use(value) && !retired.iter().any(|r| r.value == *value) {
                retired.push(Retired {
                    name: name.to_string(),
                    value: value.clone(),
                    patterns: scrub_patterns(&previous.config, name, value),
                    since: std::time::Instant::now(),
                    expires: previous.table.expires_at(name),
                });
            }
        }
        for old in &previous.retired {
            if !old.ended() && !in_use(&old.value) && !retired.iter().any(|r| r.value == old.value)
            {
                retired.push(old.clone());
            }
        }
    }
    // Newest first, so the cap drops each name's oldest.
    retired.sort_by_key(|r| std::cmp::Reverse(r.since));
    let mut kept: HashMap<String, usize> = HashMap::new();
    retired.retain(|r| {
        let count = kept.entry(r.name.clone()).or_default();
        *count += 1;
        *count <= MAX_RETIRED_PER_SECRET
    });
    let mut patterns = Vec::new();
    for (name, secret) in table.values() {
        patterns.extend(scrub_patterns(config, name, secret));
    }
    patterns.extend(retired.iter().flat_map(|r| r.patterns.iter().cloned()));
    match Scrubber::new(patterns) {
        Ok(scrubber) => SecretView {
            table,
            scrubber: Arc::new(scrubber),
            config: config.clone(),
            retired,
        },
        Err(e) => {
            // Fail closed: without a scrubber no credential may be used.
            tracing::error!(error = %e, "cannot build the response scrubber; all secrets unavailable");
            SecretView {
                table: SecretTable::default(),
                scrubber: Arc::new(Scrubber::default()),
                config: config.clone(),
                retired,
            }
        }
    }
}

/// The forms in which secret `name` may come back; Basic credentials come
/// back base64-encoded with the user names `config` pairs them with.
fn scrub_patterns(config: &Config, name: &str, secret: &Secret) -> Vec<Zeroizing<Vec<u8>>> {
    let mut patterns = variants(secret, None);
    for route in config.routes.values() {
        if let Some(inject) = &route.inject
            && inject.secret == name
            && let Slot::Basic { username } = &inject.slot
        {
            patterns.extend(variants(secret, Some(username)));
        }
    }
    patterns
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    fn config() -> Arc<Config> {
        let text = "[secrets.api]\nsource = \"store\"\n[secrets.other]\nsource = \"store\"\n";
        Arc::new(Config::parse(text, Path::new("/etc/sidekey/sidekey.toml")).unwrap())
    }

    fn redacts(view: &SecretView, value: &str) -> bool {
        view.scrubber.scrub_all(value.as_bytes()).is_some()
    }

    #[test]
    fn retired_values_are_scrubbed_until_they_end_and_at_most_four_per_secret() {
        let config = config();
        let mut view = view_of(
            &config,
            SecretTable::of(&[
                ("api", "sk-value-0-aaaaaaaa", None),
                ("other", "sk-other-bbbbbbbb", None),
            ]),
            None,
        );
        for n in 1..=5 {
            let value = format!("sk-value-{n}-aaaaaaaa");
            view = view_of(
                &config,
                SecretTable::of(&[("api", &value, None), ("other", "sk-other-bbbbbbbb", None)]),
                Some(&view),
            );
        }
        // Values 1-4 are retired, 0 was pushed out by the cap, and the other
        // secret is untouched by the first one's rotations.
        assert!(!redacts(&view, "sk-value-0-aaaaaaaa"));
        for n in 1..=5 {
            assert!(redacts(&view, &format!("sk-value-{n}-aaaaaaaa")), "{n}");
        }
        assert!(redacts(&view, "sk-other-bbbbbbbb"));

        // Removed, it is retired too.
        let removed = view_of(
            &config,
            SecretTable::of(&[("api", "sk-value-5-aaaaaaaa", None)]),
            Some(&view),
        );
        assert!(redacts(&removed, "sk-other-bbbbbbbb"));
        assert!(removed.retired.iter().any(|r| r.name == "other"));

        // Ended: past 24 hours, or past the expiry its source gave.
        let mut aged = removed;
        for retired in &mut aged.retired {
            if retired.value.expose() == "sk-value-4-aaaaaaaa" {
                retired.since -= RETIRED_FOR;
            }
            if retired.value.expose() == "sk-value-3-aaaaaaaa" {
                retired.expires = Some(SystemTime::now() - Duration::from_secs(1));
            }
        }
        let rebuilt = view_of(&config, aged.table.clone(), Some(&aged));
        assert!(!redacts(&rebuilt, "sk-value-4-aaaaaaaa"));
        assert!(!redacts(&rebuilt, "sk-value-3-aaaaaaaa"));
        assert!(redacts(&rebuilt, "sk-value-2-aaaaaaaa"));
        assert!(redacts(&rebuilt, "sk-other-bbbbbbbb"));
    }
}
