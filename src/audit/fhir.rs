//! Audit records as FHIR `AuditEvent`s, written to an audit repository (a FHIR R4
//! server's base URL) in `batch` Bundles.
//!
//! Off the request path: [`reserve`] takes a place in a bounded queue without waiting
//! (the request path never blocks on the repository); one writer thread, with a
//! single-threaded runtime of its own, gathers up to `batch` records (waiting at most
//! `flush` for a batch to fill), maps them ([`super::event`]) and POSTs the Bundle.
//! Connection failures, timeouts, `408`, `429` and `5xx` are retried with a doubling
//! back-off, at most `retries` times; other answers, and a batch whose retries are
//! spent, count as failed and are logged. When the queue is full the operator's
//! [`Overflow`] applies: the record is dropped and counted (a warning line with the
//! count, at most once a second), or the request fails closed (503). A graceful
//! shutdown ([`super::drain`]) sends what is queued at once, bounded by its timeout.
//!
//! Delivery is at least once: a batch whose answer was lost (a timeout after the
//! repository stored it) is sent again, so a repository may hold an event twice.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, mpsc};

use super::{AuditFull, Finished, Overflow, event};
use crate::config::Secret;

/// How the writer authenticates to the repository.
#[derive(Debug)]
pub enum FhirAuth {
    None,
    /// `Authorization: Bearer <token>`.
    Bearer(Secret),
    /// `Authorization: Basic`.
    Basic {
        user: String,
        password: Secret,
    },
}

impl FhirAuth {
    /// The credential from the environment: `token_env` names a variable holding a
    /// bearer token, `basic_env` one holding `user:password`; at most one of them.
    pub fn from_env(token_env: Option<&str>, basic_env: Option<&str>) -> Result<FhirAuth, String> {
        Self::from_lookup(token_env, basic_env, |name| std::env::var(name).ok())
    }

    fn from_lookup(
        token_env: Option<&str>,
        basic_env: Option<&str>,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<FhirAuth, String> {
        let read = |name: &str| {
            lookup(name).ok_or_else(|| format!("environment variable `{name}` is not set"))
        };
        match (token_env, basic_env) {
            (None, None) => Ok(FhirAuth::None),
            (Some(_), Some(_)) => {
                Err("a bearer token and basic credentials cannot both be set".to_owned())
            }
            (Some(name), None) => {
                let token = read(name)?;
                let visible = !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic());
                if !visible {
                    return Err(format!(
                        "`{name}`: the token must be non-empty visible ASCII"
                    ));
                }
                Ok(FhirAuth::Bearer(Secret::new(token)))
            }
            (None, Some(name)) => {
                let value = read(name)?;
                let Some((user, password)) = value.split_once(':') else {
                    return Err(format!("`{name}`: expected `user:password`"));
                };
                if user.is_empty() || value.chars().any(char::is_control) {
                    return Err(format!(
                        "`{name}`: expected `user:password` without control characters"
                    ));
                }
                Ok(FhirAuth::Basic {
                    user: user.to_owned(),
                    password: Secret::new(password.to_owned()),
                })
            }
        }
    }
}

/// Where and how AuditEvents are written.
#[derive(Debug)]
pub struct FhirAuditConfig {
    /// The repository's FHIR base; Bundles are POSTed to it.
    pub endpoint: url::Url,
    pub auth: FhirAuth,
    /// Most records per Bundle.
    pub batch: usize,
    /// Most records waiting for the writer.
    pub queue: usize,
    pub overflow: Overflow,
    /// How long a batch may wait to fill before it is sent.
    pub flush: Duration,
    /// Bound on one POST, answer included.
    pub timeout: Duration,
    /// Retries of a batch after a transient failure.
    pub retries: u32,
    /// The name of this proxy instance (`source.observer`, the server agent).
    pub observer: String,
}

/// The repository's base URL must be `http(s)`, without credentials, query or fragment
/// (credentials come from the environment, never the command line).
pub fn check_endpoint(url: &url::Url) -> Result<(), String> {
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!("`{url}` is not an http(s) URL"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("credentials in the URL are not accepted; use the *-env options".to_owned());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("`{url}` must not have a query or fragment"));
    }
    Ok(())
}

/// What the writer has done so far (for metrics and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// AuditEvents the repository accepted.
    pub sent: u64,
    /// AuditEvents the repository refused, or whose retries were spent.
    pub failed: u64,
    /// Records not queued because the queue was full (overflow `drop`).
    pub dropped: u64,
    /// Records queued or being sent.
    pub pending: u64,
}

#[derive(Default)]
struct Stats {
    sent: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    pending: AtomicU64,
}

/// The process's AuditEvent queue and its writer thread.
pub struct FhirAuditSink {
    tx: mpsc::Sender<Arc<Finished>>,
    overflow: Overflow,
    stats: Arc<Stats>,
    draining: Arc<AtomicBool>,
    wake: Arc<Notify>,
}

static FHIR_SINK: OnceLock<FhirAuditSink> = OnceLock::new();

impl FhirAuditSink {
    /// Starts the writer thread and makes it the process's AuditEvent sink. Once per
    /// process; a second call fails.
    pub fn install(config: FhirAuditConfig) -> Result<(), String> {
        check_endpoint(&config.endpoint)?;
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the audit event writer: {e}"))?;
        let client = crate::fetch::control_client()
            .build()
            .map_err(|e| format!("cannot build the audit event client: {e}"))?;
        let sink = FhirAuditSink {
            tx,
            overflow: config.overflow,
            stats: Arc::default(),
            draining: Arc::default(),
            wake: Arc::default(),
        };
        let writer = Writer {
            client,
            stats: Arc::clone(&sink.stats),
            draining: Arc::clone(&sink.draining),
            wake: Arc::clone(&sink.wake),
            batch: config.batch.max(1),
            config,
        };
        FHIR_SINK
            .set(sink)
            .map_err(|_| "the audit event sink is installed already".to_owned())?;
        std::thread::Builder::new()
            .name("audit-fhir".to_owned())
            .spawn(move || runtime.block_on(writer.run(rx)))
            .map_err(|e| format!("cannot start the audit event writer: {e}"))?;
        Ok(())
    }
}

/// A place in the AuditEvent queue, taken before the record is handed to the line
/// sink; dropped unused, it is free again.
pub(super) struct Place {
    permit: mpsc::Permit<'static, Arc<Finished>>,
    pending: &'static AtomicU64,
}

impl Place {
    pub(super) fn send(self, f: Arc<Finished>) {
        // Counted before the writer can see it, so a drain never misses it.
        self.pending.fetch_add(1, Ordering::AcqRel);
        self.permit.send(f);
    }
}

/// A place for the next record: `None` without a sink or when the record is dropped
/// (counted); `Err` when the queue is full and the sink fails closed.
pub(super) fn reserve() -> Result<Option<Place>, AuditFull> {
    match FHIR_SINK.get() {
        Some(sink) => sink.reserve(),
        None => Ok(None),
    }
}

impl FhirAuditSink {
    fn reserve(&'static self) -> Result<Option<Place>, AuditFull> {
        match self.tx.try_reserve() {
            Ok(permit) => Ok(Some(Place {
                permit,
                pending: &self.stats.pending,
            })),
            // Full, or (only if the writer panicked) closed.
            Err(_) => match self.overflow {
                Overflow::Drop => {
                    self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    Ok(None)
                }
                Overflow::FailClosed => Err(AuditFull),
            },
        }
    }
}

/// Whether AuditEvents are written at all.
pub(super) fn enabled() -> bool {
    FHIR_SINK.get().is_some()
}

/// The writer's counters, when a sink is installed.
pub fn counters() -> Option<Counters> {
    FHIR_SINK.get().map(|s| Counters {
        sent: s.stats.sent.load(Ordering::Relaxed),
        failed: s.stats.failed.load(Ordering::Relaxed),
        dropped: s.stats.dropped.load(Ordering::Relaxed),
        pending: s.stats.pending.load(Ordering::Acquire),
    })
}

/// From now on batches go out without waiting to fill (shutdown).
pub(super) fn start_draining() {
    if let Some(s) = FHIR_SINK.get() {
        s.draining.store(true, Ordering::Release);
        s.wake.notify_one();
    }
}

/// Records queued or being sent.
pub(super) fn pending() -> u64 {
    FHIR_SINK
        .get()
        .map_or(0, |s| s.stats.pending.load(Ordering::Acquire))
}

/// Logs how many records were not written when the drain ended.
pub(super) fn report_unsent() {
    let unsent = pending();
    if unsent > 0 {
        tracing::warn!(
            audit.fhir.unsent = unsent,
            "audit events not written to the FHIR endpoint before shutdown"
        );
    }
}

/// First retry delay; doubled per retry up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(8);
/// Largest `batch-response` read.
const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;
/// How often dropped records are reported (one line per interval with drops).
const REPORT_INTERVAL: Duration = Duration::from_secs(1);

struct Writer {
    client: reqwest::Client,
    config: FhirAuditConfig,
    batch: usize,
    stats: Arc<Stats>,
    draining: Arc<AtomicBool>,
    wake: Arc<Notify>,
}

/// Why a POST did not go through.
enum Failure {
    /// Worth another try (connection, timeout, 408, 429, 5xx).
    Transient(String),
    Permanent(String),
}

impl Writer {
    async fn run(self, mut rx: mpsc::Receiver<Arc<Finished>>) {
        tokio::spawn(report_drops(Arc::clone(&self.stats)));
        let mut batch = Vec::with_capacity(self.batch);
        loop {
            if rx.recv_many(&mut batch, self.batch).await == 0 {
                // Every sender is gone.
                return;
            }
            let deadline = tokio::time::Instant::now() + self.config.flush;
            while batch.len() < self.batch && !self.draining.load(Ordering::Acquire) {
                let room = self.batch - batch.len();
                tokio::select! {
                    n = rx.recv_many(&mut batch, room) => if n == 0 { break },
                    () = tokio::time::sleep_until(deadline) => break,
                    () = self.wake.notified() => {}
                }
            }
            self.deliver(&batch).await;
            self.stats
                .pending
                .fetch_sub(batch.len() as u64, Ordering::AcqRel);
            batch.clear();
        }
    }

    async fn deliver(&self, batch: &[Arc<Finished>]) {
        let n = batch.len() as u64;
        let body = Bytes::from(event::batch_bundle(
            batch.iter().map(|f| &**f),
            &self.config.observer,
        ));
        let mut delay = FIRST_BACKOFF;
        let mut attempt = 0;
        loop {
            let failure = match self.post(body.clone()).await {
                Ok(refused) => {
                    self.stats.sent.fetch_add(n - refused, Ordering::Relaxed);
                    if refused > 0 {
                        self.failed(refused, "entries refused by the repository");
                    }
                    return;
                }
                Err(f) => f,
            };
            match failure {
                Failure::Transient(why) if attempt < self.config.retries => {
                    attempt += 1;
                    tracing::debug!(error = %why, attempt, "audit event batch failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
                Failure::Transient(why) | Failure::Permanent(why) => {
                    self.failed(n, &why);
                    return;
                }
            }
        }
    }

    fn failed(&self, n: u64, why: &str) {
        let total = self.stats.failed.fetch_add(n, Ordering::Relaxed) + n;
        tracing::warn!(
            audit.fhir.failed = n,
            audit.fhir.failed_total = total,
            error = %why,
            "audit events could not be written to the FHIR endpoint"
        );
    }

    /// POSTs one Bundle; `Ok` with the number of entries the repository refused.
    async fn post(&self, body: Bytes) -> Result<u64, Failure> {
        let mut req = self
            .client
            .post(self.config.endpoint.as_str())
            .header(http::header::CONTENT_TYPE, crate::pipeline::FHIR_JSON)
            .header(http::header::ACCEPT, crate::pipeline::FHIR_JSON)
            .header("prefer", "return=minimal")
            .timeout(self.config.timeout)
            .body(body);
        req = match &self.config.auth {
            FhirAuth::None => req,
            FhirAuth::Bearer(token) => req.bearer_auth(token.expose()),
            FhirAuth::Basic { user, password } => req.basic_auth(user, Some(password.expose())),
        };
        let resp = req.send().await.map_err(|e| {
            Failure::Transient(
                if e.is_timeout() {
                    "timeout"
                } else if e.is_connect() {
                    "cannot connect"
                } else {
                    "transport error"
                }
                .to_owned(),
            )
        })?;
        let status = resp.status();
        if status.is_server_error()
            || status == http::StatusCode::REQUEST_TIMEOUT
            || status == http::StatusCode::TOO_MANY_REQUESTS
        {
            return Err(Failure::Transient(format!("status {}", status.as_u16())));
        }
        if !status.is_success() {
            return Err(Failure::Permanent(format!("status {}", status.as_u16())));
        }
        // The batch was taken; an answer that cannot be read says nothing about its
        // entries, and sending it again would store it twice.
        let Ok(answer) = crate::fetch::read_capped(resp, MAX_RESPONSE_BYTES).await else {
            return Ok(0);
        };
        Ok(refused_entries(&answer))
    }
}

/// Entries of a `batch-response` whose status is not `2xx`.
fn refused_entries(answer: &[u8]) -> u64 {
    #[derive(serde::Deserialize)]
    struct Response {
        status: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        response: Option<Response>,
    }
    #[derive(serde::Deserialize)]
    struct BatchResponse {
        #[serde(default)]
        entry: Vec<Entry>,
    }
    serde_json::from_slice::<BatchResponse>(answer).map_or(0, |b| {
        b.entry
            .iter()
            .filter(|e| {
                let status = e.response.as_ref().and_then(|r| r.status.as_deref());
                !status.is_some_and(|s| s.trim_start().starts_with('2'))
            })
            .count() as u64
    })
}

/// Logs the records dropped since the last report, at most once per interval.
async fn report_drops(stats: Arc<Stats>) {
    let mut reported = 0;
    let mut tick = tokio::time::interval(REPORT_INTERVAL);
    loop {
        tick.tick().await;
        let now = stats.dropped.load(Ordering::Relaxed);
        if now > reported {
            tracing::warn!(
                audit.fhir.dropped = now - reported,
                audit.fhir.dropped_total = now,
                "audit events dropped: the FHIR audit queue was full"
            );
            reported = now;
        }
    }
}

#[cfg(test)]
mod tests;
