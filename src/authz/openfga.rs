//! OpenFGA client for the fine-grained authorization mode (stage 3, `authz`).
//!
//! A small client over OpenFGA's HTTP API (v1): Check, BatchCheck (1.8+ shape) and
//! StreamedListObjects, for one tenant's [`FgaConnection`]. The tenant's
//! [`super::fga::OpenFgaChecker`] wraps it.
//!
//! Guarantees:
//! - every request names the connection's pinned `authorization_model_id`;
//! - answers are all or nothing: a batch either answers every object or fails, a list
//!   is either provably complete or fails ([`FgaError::Incomplete`], [`FgaError::TooMany`]);
//!   the capped unary ListObjects (1000 results, silent) is never used;
//! - a slow or dead OpenFGA costs at most the connection's timeout per call, and after
//!   repeated failures none at all: a circuit breaker fails calls at once
//!   ([`FgaError::Unavailable`]) until a trial call after the cool-down succeeds;
//! - only successful answers are cached (bounded, TTL from the connection), keyed by
//!   model, principal, relation and object;
//! - credentials never appear in `Debug` output, errors or logs.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use url::Url;

use crate::config::{BreakerSettings, FgaConnection, FgaCredentials, Secret};
use crate::metrics::{self, FgaCache, FgaEndpoint, TenantLabel};

/// OpenFGA's default `maxChecksPerBatchCheck`.
pub const MAX_CHECKS_PER_BATCH: usize = 50;
/// BatchCheck calls in flight at once for one `batch_check`.
pub const BATCH_CONCURRENCY: usize = 4;
/// Entries kept in the decision cache of one client.
pub const CACHE_CAPACITY: u64 = 100_000;
/// OpenFGA's default `listObjectsDeadline`.
pub const DEFAULT_LIST_OBJECTS_DEADLINE: Duration = Duration::from_secs(3);
/// Longest line accepted in a StreamedListObjects answer.
const MAX_STREAM_LINE_BYTES: usize = 64 * 1024;
/// Longest lifetime trusted from a token endpoint's `expires_in`.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// A client-credentials token is renewed this long before it expires.
const TOKEN_RENEW_MARGIN: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// errors

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FgaError {
    /// Network error, timeout, 5xx, or the circuit breaker is open.
    #[error("openfga is unavailable: {detail}")]
    Unavailable { detail: String },
    /// OpenFGA refused the request (4xx, or a per-check input error).
    #[error("openfga rejected the request: {status} `{code}`")]
    Rejected { status: u16, code: String },
    /// An answer whose completeness cannot be proven (a broken or cut stream, an
    /// `error` line, a batch answer without every check).
    #[error("openfga answer is incomplete: {detail}")]
    Incomplete { detail: String },
    /// More objects than the caller allows; never truncated.
    #[error("openfga listed more than {max} objects")]
    TooMany { max: usize },
}

impl FgaError {
    /// A stable id for audit records and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            FgaError::Unavailable { .. } => "fga_unavailable",
            FgaError::Rejected { .. } => "fga_rejected",
            FgaError::Incomplete { .. } => "fga_incomplete",
            FgaError::TooMany { .. } => "fga_too_many",
        }
    }

    fn unavailable(detail: impl Into<String>) -> Self {
        FgaError::Unavailable {
            detail: detail.into(),
        }
    }

    fn incomplete(detail: impl Into<String>) -> Self {
        FgaError::Incomplete {
            detail: detail.into(),
        }
    }

    /// Whether the failure says the server is unhealthy (counts for the breaker).
    fn is_server_failure(&self) -> bool {
        matches!(
            self,
            FgaError::Unavailable { .. } | FgaError::Incomplete { .. }
        )
    }
}

/// A failed bounded read of an answer.
fn read_error(e: crate::fetch::ReadError) -> FgaError {
    match e {
        crate::fetch::ReadError::Transport(e) => transport_error(&e),
        crate::fetch::ReadError::TooLarge => FgaError::unavailable("answer too large"),
        crate::fetch::ReadError::Json(_) => FgaError::unavailable("body error"),
    }
}

/// A reqwest error as text without the URL's query or any header (no credentials).
fn transport_error(e: &reqwest::Error) -> FgaError {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect error"
    } else if e.is_body() || e.is_decode() {
        "body error"
    } else {
        "request error"
    };
    FgaError::unavailable(kind)
}

// ---------------------------------------------------------------------------------------
// circuit breaker

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BreakerState {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One trial call is in flight since `started`.
    HalfOpen {
        started: Instant,
    },
}

/// Closed -> open after `failure_threshold` consecutive failures; open -> half-open
/// after `cool_down` (one trial call); the trial's success closes it, its failure opens
/// it again. Time is passed in so tests need no clock.
#[derive(Debug)]
pub(crate) struct Breaker {
    settings: BreakerSettings,
    state: Mutex<BreakerState>,
}

impl Breaker {
    pub(crate) fn new(settings: BreakerSettings) -> Self {
        Breaker {
            settings,
            state: Mutex::new(BreakerState::Closed { failures: 0 }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        // A poisoned lock only means a panic elsewhere; the state is still a valid value.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a call may go out now.
    pub(crate) fn try_acquire(&self, now: Instant) -> bool {
        let mut state = self.lock();
        match *state {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { until } if now >= until => {
                *state = BreakerState::HalfOpen { started: now };
                true
            }
            BreakerState::Open { .. } => false,
            // A trial that never reported (its future was dropped) must not keep the
            // breaker half-open forever: after another cool-down, allow a new trial.
            BreakerState::HalfOpen { started } if now >= started + self.settings.cool_down => {
                *state = BreakerState::HalfOpen { started: now };
                true
            }
            BreakerState::HalfOpen { .. } => false,
        }
    }

    pub(crate) fn record(&self, success: bool, now: Instant) {
        let mut state = self.lock();
        *state = match (*state, success) {
            (_, true) => BreakerState::Closed { failures: 0 },
            (BreakerState::Closed { failures }, false) => {
                let failures = failures.saturating_add(1);
                if failures >= self.settings.failure_threshold.max(1) {
                    tracing::warn!(fga.failures = failures, "openfga circuit breaker opened");
                    BreakerState::Open {
                        until: now + self.settings.cool_down,
                    }
                } else {
                    BreakerState::Closed { failures }
                }
            }
            (BreakerState::HalfOpen { .. } | BreakerState::Open { .. }, false) => {
                BreakerState::Open {
                    until: now + self.settings.cool_down,
                }
            }
        };
    }

    pub(crate) fn is_open(&self) -> bool {
        !matches!(*self.lock(), BreakerState::Closed { .. })
    }
}

// ---------------------------------------------------------------------------------------
// wire shapes

#[derive(Debug, Serialize, PartialEq)]
pub(crate) struct TupleKey<'a> {
    pub user: &'a str,
    pub relation: &'a str,
    pub object: &'a str,
}

#[derive(Debug, Serialize)]
pub(crate) struct CheckRequest<'a> {
    pub tuple_key: TupleKey<'a>,
    pub authorization_model_id: &'a str,
}

#[derive(Debug, Deserialize)]
struct CheckResponse {
    // proto3 JSON may leave out `false`
    #[serde(default)]
    allowed: bool,
}

#[derive(Debug, Serialize)]
pub(crate) struct BatchCheckItem<'a> {
    pub tuple_key: TupleKey<'a>,
    pub correlation_id: String,
}

#[derive(Debug, Serialize)]
pub(crate) struct BatchCheckRequest<'a> {
    pub checks: Vec<BatchCheckItem<'a>>,
    pub authorization_model_id: &'a str,
}

#[derive(Debug, Deserialize)]
pub(crate) struct BatchCheckResponse {
    #[serde(default)]
    pub result: HashMap<String, BatchCheckOutcome>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct BatchCheckOutcome {
    #[serde(default)]
    pub allowed: Option<bool>,
    #[serde(default)]
    pub error: Option<BatchCheckItemError>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct BatchCheckItemError {
    #[serde(default)]
    pub input_error: Option<serde_json::Value>,
    #[serde(default)]
    pub internal_error: Option<serde_json::Value>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ListObjectsRequest<'a> {
    pub authorization_model_id: &'a str,
    #[serde(rename = "type")]
    pub type_name: &'a str,
    pub relation: &'a str,
    pub user: &'a str,
}

/// OpenFGA's error body: `{"code": "type_not_found", "message": ..}` from the unary
/// endpoints, `{"error": {"code": 3, "message": ..}}` (a gRPC status) from the streamed
/// one, whose errors come through the gateway's stream error handler.
#[derive(Debug, Default, Deserialize)]
struct ApiErrorBody {
    #[serde(default)]
    code: Option<serde_json::Value>,
    #[serde(default)]
    error: Option<StreamError>,
}

#[derive(Debug, Default, Deserialize)]
struct StreamError {
    #[serde(default)]
    code: Option<i64>,
}

impl ApiErrorBody {
    /// The error code to name: OpenFGA's own, else the gRPC status name.
    fn code(self) -> String {
        match (self.code, self.error.and_then(|e| e.code)) {
            (Some(serde_json::Value::String(s)), _) => s,
            (Some(other), _) => other.to_string(),
            (None, Some(grpc)) => grpc_status_name(grpc).to_owned(),
            (None, None) => String::new(),
        }
    }
}

/// The canonical name of a gRPC status code, lower case as OpenFGA writes its own codes.
fn grpc_status_name(code: i64) -> &'static str {
    match code {
        1 => "cancelled",
        2 => "unknown",
        3 => "invalid_argument",
        4 => "deadline_exceeded",
        5 => "not_found",
        6 => "already_exists",
        7 => "permission_denied",
        8 => "resource_exhausted",
        9 => "failed_precondition",
        10 => "aborted",
        11 => "out_of_range",
        12 => "unimplemented",
        13 => "internal",
        14 => "unavailable",
        15 => "data_loss",
        16 => "unauthenticated",
        _ => "unknown",
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamLine {
    #[serde(default)]
    result: Option<StreamResult>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct StreamResult {
    object: String,
}

/// Splits a StreamedListObjects body into objects, whatever the chunking.
#[derive(Debug, Default)]
pub(crate) struct NdjsonObjects {
    pending: Vec<u8>,
}

impl NdjsonObjects {
    /// Feeds one chunk; returns the objects of the lines it completed.
    pub(crate) fn push(&mut self, chunk: &[u8]) -> Result<Vec<String>, FgaError> {
        self.pending.extend_from_slice(chunk);
        let mut objects = Vec::new();
        let mut start = 0;
        while let Some(pos) = memchr::memchr(b'\n', &self.pending[start..]) {
            let line = &self.pending[start..start + pos];
            if let Some(object) = parse_line(line)? {
                objects.push(object);
            }
            start += pos + 1;
        }
        self.pending.drain(..start);
        // One object per line: a line longer than any object id could be is not a
        // stream to buffer further.
        if self.pending.len() > MAX_STREAM_LINE_BYTES {
            return Err(FgaError::incomplete("overlong line in the object stream"));
        }
        Ok(objects)
    }

    /// The end of the body: a last line without a newline still counts if it is whole.
    pub(crate) fn finish(self) -> Result<Option<String>, FgaError> {
        parse_line(&self.pending)
    }
}

fn parse_line(line: &[u8]) -> Result<Option<String>, FgaError> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let parsed: StreamLine = serde_json::from_slice(line)
        .map_err(|_| FgaError::incomplete("malformed line in the object stream"))?;
    match parsed {
        StreamLine { error: Some(e), .. } => {
            tracing::warn!(fga.error = %e, "openfga object stream ended with an error");
            Err(FgaError::incomplete("error line in the object stream"))
        }
        StreamLine {
            result: Some(r), ..
        } => Ok(Some(r.object)),
        _ => Err(FgaError::incomplete(
            "line without a result in the object stream",
        )),
    }
}

// ---------------------------------------------------------------------------------------
// the client

type CacheKey = (Arc<str>, String, String, String);

#[derive(Debug, Clone)]
struct CachedToken {
    value: Secret,
    renew_at: Instant,
}

struct Inner {
    /// For the token endpoint (client credentials).
    http: reqwest::Client,
    /// For OpenFGA's API: `http`, or a client of its own with the connection's TLS
    /// settings (`tls`: a private CA, a client certificate).
    api: reqwest::Client,
    conn: FgaConnection,
    model: Arc<str>,
    cache: moka::future::Cache<CacheKey, bool>,
    breaker: Breaker,
    token: tokio::sync::Mutex<Option<CachedToken>>,
    /// The tenant the client's metrics are counted for.
    tenant: TenantLabel,
}

/// An OpenFGA client for one connection. Cheap to clone (shared cache and breaker).
/// A boxed future borrowing its arguments.
pub type FgaFuture<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, FgaError>> + Send + 'a>>;

/// What the OpenFGA checker needs of an OpenFGA server: Check, BatchCheck and a
/// complete ListObjects, each failing closed with an [`FgaError`]. [`OpenFgaClient`]
/// is the real one (OpenFGA's HTTP API, with its decision cache and breaker).
pub trait FgaApi: Send + Sync + 'static {
    fn check<'a>(
        &'a self,
        principal: &'a str,
        relation: &'a str,
        object: &'a str,
    ) -> FgaFuture<'a, bool>;
    fn batch_check<'a>(
        &'a self,
        principal: &'a str,
        relation: &'a str,
        objects: &'a [String],
    ) -> FgaFuture<'a, HashMap<String, bool>>;
    fn list_objects_complete<'a>(
        &'a self,
        principal: &'a str,
        relation: &'a str,
        object_type: &'a str,
        max: usize,
    ) -> FgaFuture<'a, Vec<String>>;
    /// Whether a circuit breaker refuses calls now (`None`: this server has none).
    fn breaker_open(&self) -> Option<bool> {
        None
    }
}

impl FgaApi for OpenFgaClient {
    fn check<'a>(
        &'a self,
        principal: &'a str,
        relation: &'a str,
        object: &'a str,
    ) -> FgaFuture<'a, bool> {
        Box::pin(OpenFgaClient::check(self, principal, relation, object))
    }

    fn batch_check<'a>(
        &'a self,
        principal: &'a str,
        relation: &'a str,
        objects: &'a [String],
    ) -> FgaFuture<'a, HashMap<String, bool>> {
        Box::pin(OpenFgaClient::batch_check(
            self, principal, relation, objects,
        ))
    }

    fn list_objects_complete<'a>(
        &'a self,
        principal: &'a str,
        relation: &'a str,
        object_type: &'a str,
        max: usize,
    ) -> FgaFuture<'a, Vec<String>> {
        Box::pin(OpenFgaClient::list_objects_complete(
            self,
            principal,
            relation,
            object_type,
            max,
        ))
    }

    fn breaker_open(&self) -> Option<bool> {
        Some(OpenFgaClient::breaker_open(self))
    }
}

#[derive(Clone)]
pub struct OpenFgaClient {
    inner: Arc<Inner>,
}

impl fmt::Debug for OpenFgaClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenFgaClient")
            .field("conn", &self.inner.conn)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy)]
enum Endpoint {
    Check,
    BatchCheck,
    StreamedListObjects,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Endpoint::Check => "check",
            Endpoint::BatchCheck => "batch-check",
            Endpoint::StreamedListObjects => "streamed-list-objects",
        }
    }

    fn metric(self) -> FgaEndpoint {
        match self {
            Endpoint::Check => FgaEndpoint::Check,
            Endpoint::BatchCheck => FgaEndpoint::BatchCheck,
            Endpoint::StreamedListObjects => FgaEndpoint::StreamedListObjects,
        }
    }
}

impl OpenFgaClient {
    /// `http` is the proxy's shared control-plane client; timeouts are set per call.
    /// Metrics are counted without a tenant (see [`OpenFgaClient::for_tenant`]).
    pub fn new(http: reqwest::Client, conn: FgaConnection) -> Result<Self, String> {
        Self::build(http, conn, TenantLabel::NONE)
    }

    /// The client of tenant `tenant`, whose metrics are counted for it.
    pub fn for_tenant(
        http: reqwest::Client,
        conn: FgaConnection,
        tenant: &str,
    ) -> Result<Self, String> {
        Self::build(http, conn, metrics::global().register_tenant(tenant))
    }

    fn build(
        http: reqwest::Client,
        conn: FgaConnection,
        tenant: TenantLabel,
    ) -> Result<Self, String> {
        if conn.api_url.cannot_be_a_base() {
            return Err(format!(
                "openfga api url `{}` is not a base url",
                conn.api_url
            ));
        }
        if conn.store_id.is_empty() || conn.authorization_model_id.is_empty() {
            return Err("openfga store id and authorization model id are required".into());
        }
        let cache = moka::future::Cache::builder()
            .max_capacity(CACHE_CAPACITY)
            .time_to_live(conn.cache_ttl)
            .build();
        let api = match &conn.tls {
            None => http.clone(),
            Some(tls) => crate::fetch::control_client()
                .tls_backend_preconfigured(tls.config().clone())
                .build()
                .map_err(|e| format!("cannot build the openfga tls client: {e}"))?,
        };
        Ok(OpenFgaClient {
            inner: Arc::new(Inner {
                http,
                api,
                model: Arc::from(conn.authorization_model_id.as_str()),
                breaker: Breaker::new(conn.breaker),
                conn,
                cache,
                token: tokio::sync::Mutex::new(None),
                tenant,
            }),
        })
    }

    pub fn connection(&self) -> &FgaConnection {
        &self.inner.conn
    }

    /// Whether the circuit breaker is currently not closed (open or half-open).
    pub fn breaker_open(&self) -> bool {
        self.inner.breaker.is_open()
    }

    fn key(&self, principal: &str, relation: &str, object: &str) -> CacheKey {
        (
            Arc::clone(&self.inner.model),
            principal.to_owned(),
            relation.to_owned(),
            object.to_owned(),
        )
    }

    /// Does `principal` (`user:alice`, `system:lab`) have `relation` on `object`?
    pub async fn check(
        &self,
        principal: &str,
        relation: &str,
        object: &str,
    ) -> Result<bool, FgaError> {
        let key = self.key(principal, relation, object);
        let cached = self.inner.cache.get(&key).await;
        let hit = u64::from(cached.is_some());
        metrics::global().fga_cache(self.inner.tenant, FgaCache::Check, hit, 1 - hit);
        if let Some(allowed) = cached {
            return Ok(allowed);
        }
        let body = CheckRequest {
            tuple_key: TupleKey {
                user: principal,
                relation,
                object,
            },
            authorization_model_id: &self.inner.conn.authorization_model_id,
        };
        let response: CheckResponse = self
            .guarded(Endpoint::Check, async {
                let res = self.send(Endpoint::Check, &body).await?;
                crate::fetch::read_json(res).await.map_err(read_error)
            })
            .await?;
        self.inner.cache.insert(key, response.allowed).await;
        Ok(response.allowed)
    }

    /// Checks `relation` of `principal` on every object: cached answers first, the
    /// rest in BatchCheck calls of at most [`MAX_CHECKS_PER_BATCH`], up to
    /// [`BATCH_CONCURRENCY`] at once. Every object gets an answer or the call fails.
    pub async fn batch_check(
        &self,
        principal: &str,
        relation: &str,
        objects: &[String],
    ) -> Result<HashMap<String, bool>, FgaError> {
        let mut answers = HashMap::with_capacity(objects.len());
        let mut misses = Vec::new();
        let mut seen = HashSet::new();
        for object in objects {
            if !seen.insert(object.as_str()) {
                continue;
            }
            match self
                .inner
                .cache
                .get(&self.key(principal, relation, object))
                .await
            {
                Some(allowed) => {
                    answers.insert(object.clone(), allowed);
                }
                None => misses.push(object.clone()),
            }
        }
        metrics::global().fga_cache(
            self.inner.tenant,
            FgaCache::Check,
            answers.len() as u64,
            misses.len() as u64,
        );
        if misses.is_empty() {
            return Ok(answers);
        }
        let limit = Arc::new(Semaphore::new(BATCH_CONCURRENCY));
        let mut tasks = tokio::task::JoinSet::new();
        for chunk in misses.chunks(MAX_CHECKS_PER_BATCH) {
            let client = self.clone();
            let chunk = chunk.to_vec();
            let principal = principal.to_owned();
            let relation = relation.to_owned();
            let limit = Arc::clone(&limit);
            // Bound to the request's trace scope: the calls carry its `traceparent`.
            tasks.spawn(crate::trace::bind_current(async move {
                let _permit = limit
                    .acquire_owned()
                    .await
                    .map_err(|_| FgaError::unavailable("batch check cancelled"))?;
                client.batch_call(&principal, &relation, &chunk).await
            }));
        }
        // INVARIANT: on the first error the JoinSet is dropped, which aborts the other
        // calls; no partial answer leaves this function. The whole batch, however many
        // calls it takes, is bounded by twice one call's timeout: longer than a single
        // call, so a call that times out is still counted by the breaker (`guarded`)
        // before the batch gives up.
        let collect = async {
            while let Some(joined) = tasks.join_next().await {
                let chunk_answers =
                    joined.map_err(|_| FgaError::unavailable("batch check task failed"))??;
                for (object, allowed) in chunk_answers {
                    self.inner
                        .cache
                        .insert(self.key(principal, relation, &object), allowed)
                        .await;
                    answers.insert(object, allowed);
                }
            }
            Ok::<_, FgaError>(())
        };
        tokio::time::timeout(self.inner.conn.timeout.saturating_mul(2), collect)
            .await
            .map_err(|_| FgaError::unavailable("timeout"))??;
        if answers.len() != seen.len() {
            return Err(FgaError::incomplete("batch check left objects unanswered"));
        }
        Ok(answers)
    }

    /// One BatchCheck call for at most [`MAX_CHECKS_PER_BATCH`] distinct objects.
    async fn batch_call(
        &self,
        principal: &str,
        relation: &str,
        objects: &[String],
    ) -> Result<Vec<(String, bool)>, FgaError> {
        let body = BatchCheckRequest {
            checks: objects
                .iter()
                .enumerate()
                .map(|(i, object)| BatchCheckItem {
                    tuple_key: TupleKey {
                        user: principal,
                        relation,
                        object,
                    },
                    correlation_id: i.to_string(),
                })
                .collect(),
            authorization_model_id: &self.inner.conn.authorization_model_id,
        };
        let response: BatchCheckResponse = self
            .guarded(Endpoint::BatchCheck, async {
                let res = self.send(Endpoint::BatchCheck, &body).await?;
                crate::fetch::read_json(res).await.map_err(read_error)
            })
            .await?;
        map_batch_response(objects, response)
    }

    /// Every object of `object_type` on which `principal` has `relation`, from
    /// StreamedListObjects, or an error: more than `max` objects is
    /// [`FgaError::TooMany`], a stream that broke, carried an error or may have been
    /// cut by the server's deadline is [`FgaError::Incomplete`].
    pub async fn list_objects_complete(
        &self,
        principal: &str,
        relation: &str,
        object_type: &str,
        max: usize,
    ) -> Result<Vec<String>, FgaError> {
        let body = ListObjectsRequest {
            authorization_model_id: &self.inner.conn.authorization_model_id,
            type_name: object_type,
            relation,
            user: principal,
        };
        let started = Instant::now();
        let timeout = self.inner.conn.timeout;
        self.guarded(Endpoint::StreamedListObjects, async {
            let read = async {
                let mut res = self.send(Endpoint::StreamedListObjects, &body).await?;
                let mut parser = NdjsonObjects::default();
                let mut objects = Vec::new();
                let mut seen = HashSet::new();
                let mut take = |batch: Vec<String>| -> Result<(), FgaError> {
                    for object in batch {
                        if seen.insert(object.clone()) {
                            if objects.len() >= max {
                                return Err(FgaError::TooMany { max });
                            }
                            objects.push(object);
                        }
                    }
                    Ok(())
                };
                loop {
                    match res.chunk().await {
                        Ok(Some(chunk)) => take(parser.push(&chunk)?)?,
                        Ok(None) => break,
                        Err(e) if e.is_timeout() => return Err(transport_error(&e)),
                        Err(_) => return Err(FgaError::incomplete("object stream broke")),
                    }
                }
                take(parser.finish()?.into_iter().collect())?;
                Ok(objects)
            };
            let objects = tokio::time::timeout(timeout, read)
                .await
                .map_err(|_| FgaError::unavailable("timeout"))??;
            if started.elapsed() >= self.inner.conn.list_objects_deadline {
                // The server stops at its deadline without saying so.
                return Err(FgaError::incomplete(
                    "object stream may have been cut by the server's deadline",
                ));
            }
            Ok(objects)
        })
        .await
    }

    /// Runs one call under the circuit breaker and reports its outcome (to the breaker
    /// and the metrics).
    async fn guarded<T>(
        &self,
        endpoint: Endpoint,
        call: impl Future<Output = Result<T, FgaError>>,
    ) -> Result<T, FgaError> {
        if !self.inner.breaker.try_acquire(Instant::now()) {
            metrics::global().fga_error(self.inner.tenant, endpoint.metric(), "breaker_open");
            return Err(FgaError::unavailable("circuit breaker open"));
        }
        let result = call.await;
        let failed = result.as_ref().is_err_and(FgaError::is_server_failure);
        self.inner.breaker.record(!failed, Instant::now());
        if let Err(e) = &result {
            metrics::global().fga_error(self.inner.tenant, endpoint.metric(), e.reason());
        }
        result
    }

    fn url(&self, endpoint: Endpoint) -> Result<Url, FgaError> {
        let mut url = self.inner.conn.api_url.clone();
        url.path_segments_mut()
            .map_err(|_| FgaError::unavailable("api url is not a base url"))?
            .pop_if_empty()
            .extend(["stores", self.inner.conn.store_id.as_str(), endpoint.path()]);
        Ok(url)
    }

    /// POSTs `body`; a non-2xx answer becomes an error.
    async fn send(
        &self,
        endpoint: Endpoint,
        body: &impl Serialize,
    ) -> Result<reqwest::Response, FgaError> {
        let mut request = self
            .inner
            .api
            .post(self.url(endpoint)?)
            .timeout(self.inner.conn.timeout)
            .json(body);
        if let Some(token) = self.bearer().await? {
            let mut value = http::HeaderValue::try_from(format!("Bearer {token}"))
                .map_err(|_| FgaError::unavailable("credential is not a valid header value"))?;
            value.set_sensitive(true);
            request = request.header(http::header::AUTHORIZATION, value);
        }
        // The request's trace: the calling stage's span as the parent.
        if let Some(scope) = crate::trace::current() {
            for (name, value) in scope.outbound_headers(false) {
                request = request.header(name, value);
            }
        }
        metrics::global().fga_request(self.inner.tenant, endpoint.metric());
        let res = request.send().await.map_err(|e| transport_error(&e))?;
        let status = res.status();
        if status.is_success() {
            return Ok(res);
        }
        let code = crate::fetch::read_json::<ApiErrorBody>(res)
            .await
            .map(ApiErrorBody::code)
            .unwrap_or_default();
        if status.is_client_error()
            && status != reqwest::StatusCode::TOO_MANY_REQUESTS
            && status != reqwest::StatusCode::REQUEST_TIMEOUT
        {
            tracing::warn!(fga.status = status.as_u16(), fga.code = %code, "openfga rejected a request");
            Err(FgaError::Rejected {
                status: status.as_u16(),
                code,
            })
        } else {
            Err(FgaError::unavailable(format!(
                "status {} `{code}`",
                status.as_u16()
            )))
        }
    }

    /// The bearer token to send, if any (client credentials fetched and cached).
    async fn bearer(&self) -> Result<Option<String>, FgaError> {
        match &self.inner.conn.credentials {
            FgaCredentials::None => Ok(None),
            FgaCredentials::ApiToken(t) => Ok(Some(t.expose().clone())),
            FgaCredentials::ClientCredentials {
                token_url,
                client_id,
                client_secret,
                audience,
            } => {
                let mut cached = self.inner.token.lock().await;
                if let Some(t) = cached.as_ref()
                    && Instant::now() < t.renew_at
                {
                    return Ok(Some(t.value.expose().clone()));
                }
                let mut form = vec![
                    ("grant_type", "client_credentials"),
                    ("client_id", client_id.as_str()),
                    ("client_secret", client_secret.expose().as_str()),
                ];
                if let Some(a) = audience {
                    form.push(("audience", a.as_str()));
                }
                let res = self
                    .inner
                    .http
                    .post(token_url.clone())
                    .timeout(self.inner.conn.timeout)
                    .form(&form)
                    .send()
                    .await
                    .map_err(|e| transport_error(&e))?;
                if !res.status().is_success() {
                    return Err(FgaError::unavailable(format!(
                        "token endpoint answered {}",
                        res.status().as_u16()
                    )));
                }
                let token: TokenResponse = crate::fetch::read_json(res)
                    .await
                    .map_err(|_| FgaError::unavailable("token endpoint answer is malformed"))?;
                // Clamped: a huge `expires_in` must not overflow the instant below.
                let lifetime =
                    Duration::from_secs(token.expires_in.unwrap_or(300)).min(MAX_TOKEN_LIFETIME);
                let renew_at = Instant::now() + lifetime.saturating_sub(TOKEN_RENEW_MARGIN);
                *cached = Some(CachedToken {
                    value: Secret::new(token.access_token.clone()),
                    renew_at,
                });
                Ok(Some(token.access_token))
            }
        }
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// Maps a BatchCheck answer back to the objects by correlation id (their index).
pub(crate) fn map_batch_response(
    objects: &[String],
    response: BatchCheckResponse,
) -> Result<Vec<(String, bool)>, FgaError> {
    let mut out = Vec::with_capacity(objects.len());
    for (i, object) in objects.iter().enumerate() {
        let Some(outcome) = response.result.get(&i.to_string()) else {
            return Err(FgaError::incomplete("batch check answer misses a check"));
        };
        match outcome {
            BatchCheckOutcome {
                error: Some(err), ..
            } => {
                if let Some(code) = &err.input_error {
                    let code = match code {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    return Err(FgaError::Rejected { status: 400, code });
                }
                return Err(FgaError::unavailable(match &err.internal_error {
                    Some(e) => format!("batch check item failed: {e}"),
                    None => "batch check item failed".to_owned(),
                }));
            }
            BatchCheckOutcome {
                allowed: Some(allowed),
                ..
            } => out.push((object.clone(), *allowed)),
            // OpenFGA leaves out `false` values in its JSON (proto3 defaults).
            BatchCheckOutcome { allowed: None, .. } => out.push((object.clone(), false)),
        }
    }
    if response.result.len() != objects.len() {
        return Err(FgaError::incomplete(
            "batch check answer has unexpected checks",
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
