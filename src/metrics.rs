//! Counters for `GET /metrics` (Prometheus text) and `GET /v1/status`.
//!
//! Labels are names sidekey chose (route, mode, decision, status), never
//! anything the agent sent, so an agent cannot grow the label space.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    // Static words and a number: one allocation per request, not four.
    pub mode: &'static str,
    pub decision: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// Every metric sidekey keeps.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Histogram,
    pub upstream_errors: Family<ReasonLabels, Counter>,
    pub secret_errors: Counter,
    pub audit_errors: Counter,
    pub open_connections: Gauge,
    pub active_tunnels: Gauge,
    pub leaf_cache_hits: Counter,
    pub leaf_cache_misses: Counter,
    allowed: AtomicU64,
    denied: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sidekey");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by route, mode, decision and status",
            requests.clone(),
        );
        let duration = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "request_duration_seconds",
            "Time from request to response head",
            duration.clone(),
        );
        let upstream_errors = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "upstream_errors",
            "Upstream failures by reason",
            upstream_errors.clone(),
        );
        let secret_errors = Counter::default();
        registry.register(
            "secret_errors",
            "Requests refused because their secret was unavailable",
            secret_errors.clone(),
        );
        let audit_errors = Counter::default();
        registry.register(
            "audit_write_errors",
            "Audit records that could not be written",
            audit_errors.clone(),
        );
        let open_connections = Gauge::default();
        registry.register(
            "open_connections",
            "Agent connections open now",
            open_connections.clone(),
        );
        let active_tunnels = Gauge::default();
        registry.register(
            "active_tunnels",
            "CONNECT tunnels open now",
            active_tunnels.clone(),
        );
        let leaf_cache_hits = Counter::default();
        registry.register(
            "leaf_cache_hits",
            "Interception handshakes served by a cached leaf certificate",
            leaf_cache_hits.clone(),
        );
        let leaf_cache_misses = Counter::default();
        registry.register(
            "leaf_cache_misses",
            "Leaf certificates minted",
            leaf_cache_misses.clone(),
        );
        Self {
            started: Instant::now(),
            registry,
            requests,
            duration,
            upstream_errors,
            secret_errors,
            audit_errors,
            open_connections,
            active_tunnels,
            leaf_cache_hits,
            leaf_cache_misses,
            allowed: AtomicU64::new(0),
            denied: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// Counts one finished decision.
    pub fn record(&self, labels: RequestLabels, elapsed: Duration) {
        if labels.decision == "allow" {
            self.allowed.fetch_add(1, Ordering::Relaxed);
        } else {
            self.denied.fetch_add(1, Ordering::Relaxed);
        }
        self.requests.get_or_create(&labels).inc();
        self.duration.observe(elapsed.as_secs_f64());
    }

    pub fn upstream_error(&self, reason: &str) {
        self.upstream_errors
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// The metrics as OpenMetrics text, or (`openmetrics == false`) as the
    /// classic Prometheus text format that scrapers read without asking.
    pub fn encode(&self, openmetrics: bool) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        if openmetrics {
            out
        } else {
            to_classic_text(&out)
        }
    }

    /// The summary `GET /v1/status` shows.
    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_secs": self.started.elapsed().as_secs(),
            "open_connections": self.open_connections.get(),
            "active_tunnels": self.active_tunnels.get(),
            "requests": {
                "allow": self.allowed.load(Ordering::Relaxed),
                "deny": self.denied.load(Ordering::Relaxed),
            },
        })
    }
}

/// OpenMetrics text as the classic format (0.0.4) has it: a counter family
/// is named after its `_total` samples, and there is no `# EOF`. Otherwise
/// a classic parser finds an empty counter and untyped `_total` samples.
fn to_classic_text(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 8 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let family = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let name = rest.split(' ').next()?;
            counters
                .contains(&name)
                .then(|| (prefix, name, &rest[name.len()..]))
        });
        match family {
            Some((prefix, name, rest)) => {
                out.push_str(prefix);
                out.push_str(name);
                out.push_str("_total");
                out.push_str(rest);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}
