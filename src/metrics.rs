//! Process-wide metrics: labelled counters and fixed-bucket histograms, and their
//! Prometheus text exposition (format 0.0.4), which the admin listener serves on
//! `/metrics`.
//!
//! Part of the shared model: every stage records into [`global`], none reads it. Cheap
//! on the request path: a labelled series is looked up in a copy-on-write map
//! (`ArcSwap`: reading takes no lock) and updated with relaxed atomics; a series is
//! created once, under a lock taken only then, so after warm-up an increment neither
//! locks nor allocates. Label values come from closed sets only: reason ids,
//! interaction names, HTTP statuses, stage names, and the tenant ids the configuration
//! registers ([`Metrics::register_tenant`]); any other tenant is counted as `-`. The
//! number of series is therefore bounded by the configuration, whatever clients send.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::Hash;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;

/// The label value of requests that name no configured tenant.
pub const NO_TENANT: &str = "-";

/// Upper bounds of the latency histogram buckets, in seconds (`le`); `+Inf` follows.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The same bounds in nanoseconds, for the hot path (no float arithmetic).
const BUCKET_NANOS: [u64; 14] = [
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// A tenant as a label: an index into the registered tenant ids (0 is [`NO_TENANT`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct TenantLabel(u32);

impl TenantLabel {
    /// Requests that name no configured tenant.
    pub const NONE: TenantLabel = TenantLabel(0);
}

/// The stages the stage latency histogram covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    Token,
    Scope,
    Authz,
    Rewrite,
    Upstream,
    /// The answer check (OpenFGA decisions for the answer's patients included).
    Check,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Token => "token",
            Stage::Scope => "scope",
            Stage::Authz => "authz",
            Stage::Rewrite => "rewrite",
            Stage::Upstream => "upstream",
            Stage::Check => "check",
        }
    }
}

/// The OpenFGA API calls the proxy makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FgaEndpoint {
    Check,
    BatchCheck,
    StreamedListObjects,
}

impl FgaEndpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            FgaEndpoint::Check => "check",
            FgaEndpoint::BatchCheck => "batch_check",
            FgaEndpoint::StreamedListObjects => "streamed_list_objects",
        }
    }
}

/// The OpenFGA answer caches: single decisions, and complete patient lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FgaCache {
    Check,
    List,
}

impl FgaCache {
    pub fn as_str(self) -> &'static str {
        match self {
            FgaCache::Check => "check",
            FgaCache::List => "list",
        }
    }
}

/// What a finished request is counted as; a response extension written where the
/// answer is made (the stack, or the server for errors before it) and read once by
/// the outermost layer, which counts the request.
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    pub tenant: TenantLabel,
    /// `Interaction::name`, or `-` when the request was not parsed.
    pub interaction: &'static str,
    /// The audit reason id (the true one, e.g. `record_denied`).
    pub reason: &'static str,
}

// ---------------------------------------------------------------------------------------
// series

#[derive(Default)]
struct Counter(AtomicU64);

impl Counter {
    fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Observations counted per bucket (not cumulative: each lands in exactly one slot,
/// the last one being `+Inf`), so `_count` and the `+Inf` bucket are the same sum.
struct Histogram {
    slots: [AtomicU64; BUCKET_NANOS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            slots: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let slot = BUCKET_NANOS.partition_point(|bound| *bound < nanos);
        if let Some(s) = self.slots.get(slot) {
            s.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

/// The series of one metric, by label set.
struct Family<K, M> {
    series: ArcSwap<HashMap<K, Arc<M>>>,
    grow: Mutex<()>,
}

impl<K: Copy + Eq + Hash + Ord, M: Default> Family<K, M> {
    fn new() -> Self {
        Family {
            series: ArcSwap::from_pointee(HashMap::new()),
            grow: Mutex::new(()),
        }
    }

    fn with(&self, key: K, f: impl FnOnce(&M)) {
        if let Some(m) = self.series.load().get(&key) {
            f(m);
            return;
        }
        // A new series: copy the map with it added. Rare (bounded label sets), and
        // readers are never blocked.
        let _grow = self.grow.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.series.load_full();
        let m = match current.get(&key) {
            Some(m) => Arc::clone(m),
            None => {
                let mut next = (*current).clone();
                let m = Arc::new(M::default());
                next.insert(key, Arc::clone(&m));
                self.series.store(Arc::new(next));
                m
            }
        };
        f(&m);
    }

    /// Every series, sorted by labels (a stable exposition).
    fn snapshot(&self) -> Vec<(K, Arc<M>)> {
        let mut all: Vec<(K, Arc<M>)> = self
            .series
            .load()
            .iter()
            .map(|(k, m)| (*k, Arc::clone(m)))
            .collect();
        all.sort_by_key(|a| a.0);
        all
    }
}

/// The tenant ids that may appear as label values.
struct Tenants {
    ids: ArcSwap<HashMap<String, TenantLabel>>,
    names: ArcSwap<Vec<Arc<str>>>,
    grow: Mutex<()>,
}

// ---------------------------------------------------------------------------------------
// the registry

/// The process's metrics. One per process ([`global`]); tests make their own.
pub struct Metrics {
    tenants: Tenants,
    requests: Family<(TenantLabel, &'static str, u16, &'static str), Counter>,
    request_duration: Family<TenantLabel, Histogram>,
    stage_duration: Family<(TenantLabel, Stage), Histogram>,
    in_flight: AtomicI64,
    jwks_fetches: Family<(TenantLabel, bool), Counter>,
    jwks_cache: Family<(TenantLabel, bool), Counter>,
    token_cache: Family<(TenantLabel, bool), Counter>,
    fga_requests: Family<(TenantLabel, FgaEndpoint), Counter>,
    fga_errors: Family<(TenantLabel, FgaEndpoint, &'static str), Counter>,
    fga_cache: Family<(TenantLabel, FgaCache, bool), Counter>,
    entries_dropped: Family<TenantLabel, Counter>,
    reloads: Family<bool, Counter>,
}

static GLOBAL: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn global() -> &'static Metrics {
    &GLOBAL
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Metrics {
            tenants: Tenants {
                ids: ArcSwap::from_pointee(HashMap::new()),
                names: ArcSwap::from_pointee(vec![Arc::from(NO_TENANT)]),
                grow: Mutex::new(()),
            },
            requests: Family::new(),
            request_duration: Family::new(),
            stage_duration: Family::new(),
            in_flight: AtomicI64::new(0),
            jwks_fetches: Family::new(),
            jwks_cache: Family::new(),
            token_cache: Family::new(),
            fga_requests: Family::new(),
            fga_errors: Family::new(),
            fga_cache: Family::new(),
            entries_dropped: Family::new(),
            reloads: Family::new(),
        }
    }

    /// Makes a configured tenant id a label value (at configuration load; ids stay
    /// registered, so counters of a tenant removed by a reload do not vanish).
    pub fn register_tenant(&self, id: &str) -> TenantLabel {
        if let Some(t) = self.tenants.ids.load().get(id) {
            return *t;
        }
        let _grow = self.tenants.grow.lock().unwrap_or_else(|p| p.into_inner());
        let ids = self.tenants.ids.load_full();
        if let Some(t) = ids.get(id) {
            return *t;
        }
        let mut names = (*self.tenants.names.load_full()).clone();
        let label = TenantLabel(u32::try_from(names.len()).unwrap_or(u32::MAX));
        names.push(Arc::from(id));
        let mut next = (*ids).clone();
        next.insert(id.to_owned(), label);
        // Names first: a label is never handed out before it can be rendered.
        self.tenants.names.store(Arc::new(names));
        self.tenants.ids.store(Arc::new(next));
        label
    }

    /// The label of a tenant id: [`TenantLabel::NONE`] unless the configuration
    /// registered it. Never registers (request input must not add series).
    pub fn tenant(&self, id: &str) -> TenantLabel {
        self.tenants
            .ids
            .load()
            .get(id)
            .copied()
            .unwrap_or(TenantLabel::NONE)
    }

    /// The tenant id a label stands for (`-` for [`TenantLabel::NONE`]).
    pub fn tenant_name(&self, label: TenantLabel) -> Arc<str> {
        self.tenants
            .names
            .load()
            .get(label.0 as usize)
            .cloned()
            .unwrap_or_else(|| Arc::from(NO_TENANT))
    }

    /// A finished request: `sfp_requests_total` and `sfp_request_duration_seconds`.
    pub fn request(&self, outcome: &Outcome, status: u16, elapsed: Duration) {
        self.requests.with(
            (outcome.tenant, outcome.interaction, status, outcome.reason),
            |c| c.add(1),
        );
        self.request_duration
            .with(outcome.tenant, |h| h.observe(elapsed));
    }

    /// A request in flight until the guard is dropped (`sfp_requests_in_flight`).
    pub fn in_flight(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(&self.in_flight)
    }

    pub fn stage(&self, tenant: TenantLabel, stage: Stage, elapsed: Duration) {
        self.stage_duration
            .with((tenant, stage), |h| h.observe(elapsed));
    }

    pub fn jwks_fetch(&self, tenant: TenantLabel, ok: bool) {
        self.jwks_fetches.with((tenant, ok), |c| c.add(1));
    }

    /// A lookup of the JWKS key-set cache.
    pub fn jwks_cache(&self, tenant: TenantLabel, hit: bool) {
        self.jwks_cache.with((tenant, hit), |c| c.add(1));
    }

    /// A lookup of the verified-token cache.
    pub fn token_cache(&self, tenant: TenantLabel, hit: bool) {
        self.token_cache.with((tenant, hit), |c| c.add(1));
    }

    /// An HTTP request sent to OpenFGA.
    pub fn fga_request(&self, tenant: TenantLabel, endpoint: FgaEndpoint) {
        self.fga_requests.with((tenant, endpoint), |c| c.add(1));
    }

    /// A failed OpenFGA call; `reason` is the error's reason id, or `breaker_open` for
    /// a call the circuit breaker refused without sending it.
    pub fn fga_error(&self, tenant: TenantLabel, endpoint: FgaEndpoint, reason: &'static str) {
        self.fga_errors
            .with((tenant, endpoint, reason), |c| c.add(1));
    }

    pub fn fga_cache(&self, tenant: TenantLabel, cache: FgaCache, hits: u64, misses: u64) {
        if hits > 0 {
            self.fga_cache.with((tenant, cache, true), |c| c.add(hits));
        }
        if misses > 0 {
            self.fga_cache
                .with((tenant, cache, false), |c| c.add(misses));
        }
    }

    /// Entries the answer check dropped from a Bundle.
    pub fn entries_dropped(&self, tenant: TenantLabel, n: u64) {
        if n > 0 {
            self.entries_dropped.with(tenant, |c| c.add(n));
        }
    }

    /// A configuration reload, applied or refused.
    pub fn config_reload(&self, ok: bool) {
        self.reloads.with(ok, |c| c.add(1));
    }

    /// The exposition: every recorded series, then `extra` (families whose values are
    /// read at scrape time, e.g. circuit breaker states).
    pub fn render(&self, extra: &[ScrapeFamily]) -> String {
        let requests = self.requests.snapshot();
        let request_duration = self.request_duration.snapshot();
        let stage_duration = self.stage_duration.snapshot();
        let fga_requests = self.fga_requests.snapshot();
        let fga_errors = self.fga_errors.snapshot();
        let fga_cache = self.fga_cache.snapshot();
        let entries_dropped = self.entries_dropped.snapshot();
        let bools = [
            self.jwks_fetches.snapshot(),
            self.jwks_cache.snapshot(),
            self.token_cache.snapshot(),
        ];
        // Loaded after the series: every tenant label in them was registered (names
        // first) before its series existed, so it has a name here.
        let names = self.tenants.names.load_full();
        let tenant =
            |t: TenantLabel| -> &str { names.get(t.0 as usize).map(|n| &**n).unwrap_or(NO_TENANT) };
        let mut out = String::with_capacity(8 * 1024);
        let mut w = Writer { out: &mut out };

        w.head(
            "sfp_build_info",
            "gauge",
            "Build information; the value is always 1.",
        );
        w.sample(
            "sfp_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1,
        );

        w.head(
            "sfp_requests_total",
            "counter",
            "Requests answered, by tenant, FHIR interaction, HTTP status and audit reason id.",
        );
        for ((t, interaction, status, reason), c) in &requests {
            let status = status.to_string();
            w.sample(
                "sfp_requests_total",
                &[
                    ("tenant", tenant(*t)),
                    ("interaction", interaction),
                    ("status", &status),
                    ("reason", reason),
                ],
                c.get(),
            );
        }

        w.head(
            "sfp_requests_in_flight",
            "gauge",
            "Requests being answered now.",
        );
        w.sample(
            "sfp_requests_in_flight",
            &[],
            self.in_flight.load(Ordering::Relaxed).max(0),
        );

        w.head(
            "sfp_request_duration_seconds",
            "histogram",
            "Time from the request head to the answer, by tenant.",
        );
        for (t, h) in &request_duration {
            w.histogram("sfp_request_duration_seconds", &[("tenant", tenant(*t))], h);
        }

        w.head(
            "sfp_stage_duration_seconds",
            "histogram",
            "Time spent in each stage of the request pipeline, by tenant and stage.",
        );
        for ((t, stage), h) in &stage_duration {
            w.histogram(
                "sfp_stage_duration_seconds",
                &[("tenant", tenant(*t)), ("stage", stage.as_str())],
                h,
            );
        }

        let [jwks_fetches, jwks_cache, token_cache] = &bools;
        let per_tenant_result = [
            (
                "sfp_jwks_fetches_total",
                "JWK Set fetches from the tenants' issuers, by result.",
                ("ok", "error"),
                jwks_fetches,
            ),
            (
                "sfp_jwks_cache_total",
                "Lookups of the JWK Set cache (hit: a fresh cached key set), by result.",
                ("hit", "miss"),
                jwks_cache,
            ),
            (
                "sfp_token_cache_total",
                "Lookups of the verified-token cache, by result.",
                ("hit", "miss"),
                token_cache,
            ),
        ];
        for (name, help, (yes, no), series) in per_tenant_result {
            w.head(name, "counter", help);
            for ((t, b), c) in series {
                let result = if *b { yes } else { no };
                w.sample(name, &[("tenant", tenant(*t)), ("result", result)], c.get());
            }
        }

        w.head(
            "sfp_openfga_requests_total",
            "counter",
            "HTTP requests sent to OpenFGA, by tenant and API call.",
        );
        for ((t, e), c) in &fga_requests {
            w.sample(
                "sfp_openfga_requests_total",
                &[("tenant", tenant(*t)), ("endpoint", e.as_str())],
                c.get(),
            );
        }
        w.head(
            "sfp_openfga_errors_total",
            "counter",
            "Failed OpenFGA calls, by tenant, API call and reason id (breaker_open: refused by the circuit breaker without a request).",
        );
        for ((t, e, reason), c) in &fga_errors {
            w.sample(
                "sfp_openfga_errors_total",
                &[
                    ("tenant", tenant(*t)),
                    ("endpoint", e.as_str()),
                    ("reason", reason),
                ],
                c.get(),
            );
        }
        w.head(
            "sfp_openfga_cache_total",
            "counter",
            "Lookups of the OpenFGA caches (check: decisions, list: complete patient lists), by result.",
        );
        for ((t, cache, hit), c) in &fga_cache {
            w.sample(
                "sfp_openfga_cache_total",
                &[
                    ("tenant", tenant(*t)),
                    ("cache", cache.as_str()),
                    ("result", if *hit { "hit" } else { "miss" }),
                ],
                c.get(),
            );
        }

        w.head(
            "sfp_entries_dropped_total",
            "counter",
            "Bundle entries the answer check withheld from clients, by tenant.",
        );
        for (t, c) in &entries_dropped {
            w.sample(
                "sfp_entries_dropped_total",
                &[("tenant", tenant(*t))],
                c.get(),
            );
        }

        w.head(
            "sfp_config_reloads_total",
            "counter",
            "Configuration reloads, by result (ok: applied, failed: refused, the running configuration kept).",
        );
        for (ok, c) in &self.reloads.snapshot() {
            let result = if *ok { "ok" } else { "failed" };
            w.sample("sfp_config_reloads_total", &[("result", result)], c.get());
        }

        for family in extra {
            w.head(family.name, family.kind, family.help);
            for (labels, value) in &family.samples {
                let labels: Vec<(&str, &str)> =
                    labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                w.sample(family.name, &labels, *value);
            }
        }
        out
    }
}

/// Decrements `sfp_requests_in_flight` when dropped (also when a request is abandoned).
pub struct InFlight<'a>(&'a AtomicI64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A family of integer samples read at scrape time (gauges or counters kept elsewhere).
pub struct ScrapeFamily {
    pub name: &'static str,
    /// `gauge` or `counter`.
    pub kind: &'static str,
    pub help: &'static str,
    pub samples: Vec<(Vec<(&'static str, String)>, i64)>,
}

// ---------------------------------------------------------------------------------------
// exposition

struct Writer<'a> {
    out: &'a mut String,
}

impl Writer<'_> {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', r"\\").replace('\n', r"\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn labels(&mut self, labels: &[(&str, &str)]) {
        if labels.is_empty() {
            return;
        }
        self.out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            self.out.push_str(k);
            self.out.push_str("=\"");
            escape_label(self.out, v);
            self.out.push('"');
        }
        self.out.push('}');
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        self.labels(labels);
        let _ = writeln!(self.out, " {value}");
    }

    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram) {
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0u64;
        for (i, slot) in h.slots.iter().enumerate() {
            cumulative += slot.load(Ordering::Relaxed);
            let le = match LATENCY_BUCKETS.get(i) {
                Some(b) => b.to_string(),
                None => "+Inf".to_owned(),
            };
            let mut with_le: Vec<(&str, &str)> = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&bucket, &with_le, cumulative);
        }
        let sum = h.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        self.sample(&format!("{name}_sum"), labels, sum);
        self.sample(&format!("{name}_count"), labels, cumulative);
    }
}

/// A label value as the text format wants it: `\`, `"` and line feeds escaped.
fn escape_label(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str(r"\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str(r"\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests;
