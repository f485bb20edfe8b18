//! The HTTP side of the OpenFGA test server: OpenFGA's HTTP API (v1) over in-memory
//! stores, with OpenFGA's request and response shapes, error shapes and limits, plus
//! fault injection for proxy tests. Test support, not a product feature.
//!
//! | method and path | OpenFGA API |
//! | --- | --- |
//! | `POST /stores`, `GET /stores`, `GET`/`DELETE /stores/{store_id}` | CreateStore, ListStores, GetStore, DeleteStore |
//! | `POST`/`GET /stores/{store_id}/authorization-models` | WriteAuthorizationModel, ReadAuthorizationModels |
//! | `GET /stores/{store_id}/authorization-models/{id}` | ReadAuthorizationModel |
//! | `POST /stores/{store_id}/write`, `POST /stores/{store_id}/read` | Write, Read |
//! | `POST /stores/{store_id}/check` | Check |
//! | `POST /stores/{store_id}/batch-check` | BatchCheck (1.8+ shape, at most 50 checks) |
//! | `POST /stores/{store_id}/list-objects` | ListObjects (at most 1000 results, 3 s deadline, both silent) |
//! | `POST /stores/{store_id}/streamed-list-objects` | StreamedListObjects (NDJSON, no result limit, same deadline) |
//! | `GET /healthz` | health (`{"status":"SERVING"}`) |
//! | `GET`/`POST /_control` | not OpenFGA: fault injection (below) |
//!
//! Errors are OpenFGA's `{"code": "...", "message": "..."}` with its status codes: 400
//! for validation errors (`validation_error`, `invalid_tuple`, `type_not_found`,
//! `relation_not_found`, `authorization_model_not_found`,
//! `latest_authorization_model_not_found`, `write_failed_due_to_invalid_input`, ...),
//! 404 for `store_id_not_found` and `undefined_endpoint`, 500 for `internal_error`.
//! Like OpenFGA, Check, ListObjects and Write resolve the model first, so an unknown
//! store answers `latest_authorization_model_not_found` there.
//!
//! Known differences from OpenFGA: no conditions, ListUsers, Expand, assertions,
//! ReadChanges or pagination (everything fits one page); WriteAuthorizationModel on an
//! unknown store is 404 `store_id_not_found` (OpenFGA does not check); an error on
//! StreamedListObjects before the first result is answered like the unary endpoint,
//! one after it as a final `{"error": {"code", "message"}}` line.
//!
//! Fault injection (`POST /_control` with any of these fields, answered with the new
//! state; `GET /_control` reads it), applied to every `/stores...` request:
//! `mode`: `ok`, `error` (500 `internal_error`) or `stall` (requests are held without an
//! answer until the mode changes); `latency_ms`: delay before answering; `fail_rate`
//! (0..1): share of requests answered with 500 `internal_error`; `object_delay_ms`:
//! time ListObjects spends per candidate object (a slow datastore), so the deadline can
//! be reached on demand.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};

use super::engine::{Evaluator, Invalid, Model, TupleKey, Tuples};

/// Response body: a whole JSON document, or the NDJSON stream of StreamedListObjects.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

const ULID_PATTERN: &str = "^[ABCDEFGHJKMNPQRSTVWXYZ0-9]{26}$";
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// OpenFGA's limit on contextual tuples per request (protobuf validation).
const MAX_CONTEXTUAL_TUPLES: usize = 100;
/// OpenFGA's default `maxTypesPerAuthorizationModel`.
const MAX_TYPES_PER_MODEL: usize = 100;

// ---------------------------------------------------------------------------------------
// options and fault injection

/// Server limits (OpenFGA's defaults) and the initial fault-injection state.
#[derive(Debug, Clone)]
pub struct Options {
    /// `listObjectsMaxResults`: ListObjects stops silently after this many results.
    pub list_objects_max_results: usize,
    /// `listObjectsDeadline`: ListObjects and StreamedListObjects stop silently then.
    pub list_objects_deadline: Duration,
    /// `maxChecksPerBatchCheck`.
    pub max_checks_per_batch_check: usize,
    /// `maxTuplesPerWrite` (writes plus deletes).
    pub max_tuples_per_write: usize,
    pub control: Control,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            list_objects_max_results: 1000,
            list_objects_deadline: Duration::from_secs(3),
            max_checks_per_batch_check: 50,
            max_tuples_per_write: 100,
            control: Control::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Answer normally.
    #[default]
    Ok,
    /// Answer every API request with 500 `internal_error`.
    Error,
    /// Hold every API request without an answer until the mode changes.
    Stall,
}

/// Fault injection, changeable at run time through `/_control`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Control {
    pub mode: Mode,
    pub latency_ms: u64,
    pub fail_rate: f64,
    pub object_delay_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlPatch {
    mode: Option<Mode>,
    latency_ms: Option<u64>,
    fail_rate: Option<f64>,
    object_delay_ms: Option<u64>,
}

// ---------------------------------------------------------------------------------------
// state

struct Store {
    name: String,
    created_at: String,
    updated_at: String,
    /// Oldest first; the last one is the latest.
    models: Vec<Arc<Model>>,
    tuples: Arc<Tuples>,
}

impl Store {
    fn to_json(&self, id: &str) -> Value {
        json!({"id": id, "name": self.name, "created_at": self.created_at, "updated_at": self.updated_at})
    }
}

struct Shared {
    options: Options,
    stores: RwLock<BTreeMap<String, Store>>,
    control: watch::Sender<Control>,
    rng: Mutex<u64>,
}

impl Shared {
    fn random(&self) -> u64 {
        let mut s = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        // xorshift64*
        *s ^= *s >> 12;
        *s ^= *s << 25;
        *s ^= *s >> 27;
        s.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A ULID, the id format OpenFGA uses for stores and models.
    fn new_id(&self) -> String {
        const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let random = (u128::from(self.random()) << 16) ^ u128::from(self.random());
        let value = (ms << 80) | (random & ((1u128 << 80) - 1));
        (0..26)
            .map(|i| ALPHABET[((value >> (5 * (25 - i))) & 31) as usize] as char)
            .collect()
    }

    fn read_stores(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Store>> {
        self.stores.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_stores(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Store>> {
        self.stores.write().unwrap_or_else(|p| p.into_inner())
    }
}

fn is_ulid(s: &str) -> bool {
    s.len() == 26
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b.is_ascii_uppercase() && !b"ILOU".contains(&b)))
}

/// RFC 3339 UTC timestamp with nanoseconds, as OpenFGA returns them.
fn now_rfc3339() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // civil from days (Howard Hinnant's algorithm)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

// ---------------------------------------------------------------------------------------
// errors

/// An OpenFGA error: HTTP status and `{"code", "message"}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code,
            message: message.into(),
        }
    }

    fn validation(message: impl Into<String>) -> Self {
        Self::bad_request("validation_error", message)
    }

    fn pattern(request: &str, field: &str, pattern: &str) -> Self {
        Self::validation(format!(
            "invalid {request}.{field}: value does not match regex pattern {pattern:?}"
        ))
    }

    fn store_not_found() -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            code: "store_id_not_found",
            message: "Store ID not found".into(),
        }
    }

    fn internal() -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal_error",
            message: "Internal Server Error".into(),
        }
    }

    fn too_complex() -> Self {
        Self::bad_request(
            "authorization_model_resolution_too_complex",
            "Authorization Model resolution required too many rewrite rules to be resolved. Check your authorization model for infinite recursion or too much nesting",
        )
    }

    fn invalid_tuple(t: &TupleKey, why: &Invalid) -> Self {
        Self::bad_request(
            "invalid_tuple",
            format!("Invalid tuple '{t}'. Reason: {why}"),
        )
    }

    fn body(&self) -> Value {
        json!({"code": self.code, "message": self.message})
    }

    fn response(&self) -> Response<Body> {
        json_response(self.status, &self.body())
    }

    /// As OpenFGA's gateway answers a StreamedListObjects that fails before streaming:
    /// the same HTTP status, the body a gRPC status (`{"error": {"code": 3, ..}}`).
    fn stream_response(&self) -> Response<Body> {
        let grpc = match self.status {
            StatusCode::BAD_REQUEST => 3,
            StatusCode::NOT_FOUND => 5,
            StatusCode::UNAUTHORIZED => 16,
            _ => 13,
        };
        let body = json!({"error": {"code": grpc, "message": self.message, "details": []}});
        json_response(self.status, &body)
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let mut res = Response::new(full(body.to_string()));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    res
}

fn with_model_header(mut res: Response<Body>, model_id: &str) -> Response<Body> {
    if let Ok(v) = header::HeaderValue::from_str(model_id) {
        res.headers_mut()
            .insert("openfga-authorization-model-id", v);
    }
    res
}

// ---------------------------------------------------------------------------------------
// the server

/// A running test server on a loopback port. Stops accepting when dropped.
pub struct TestServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl TestServer {
    /// Starts on a free port of 127.0.0.1.
    pub async fn start(options: Options) -> std::io::Result<TestServer> {
        Self::bind(SocketAddr::from(([127, 0, 0, 1], 0)), options).await
    }

    pub async fn bind(addr: SocketAddr, options: Options) -> std::io::Result<TestServer> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let mut seed = [0u8; 8];
        if getrandom::getrandom(&mut seed).is_err() {
            seed = (SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos() as u64)
                .to_le_bytes();
        }
        let (control, _) = watch::channel(options.control.clone());
        let shared = Arc::new(Shared {
            options,
            stores: RwLock::new(BTreeMap::new()),
            control,
            rng: Mutex::new(u64::from_le_bytes(seed) | 1),
        });
        let (shutdown, mut stop) = oneshot::channel::<()>();
        let accept_shared = shared.clone();
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = &mut stop => break,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                };
                // Like OpenFGA (Go's default): no Nagle delay on streamed answers.
                let _ = stream.set_nodelay(true);
                let shared = accept_shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(shared, req).await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(TestServer {
            addr,
            shared,
            shutdown: Some(shutdown),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:{port}`, the OpenFGA API URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn control(&self) -> Control {
        self.shared.control.borrow().clone()
    }

    pub fn set_control(&self, control: Control) {
        self.shared.control.send_replace(control);
    }

    pub fn set_mode(&self, mode: Mode) {
        self.shared.control.send_modify(|c| c.mode = mode);
    }

    /// Creates a store with a model and tuples without going through HTTP (for the demo
    /// and tests that only need a ready store). Returns `(store_id, model_id)`.
    pub fn preload(
        &self,
        name: &str,
        model: &Value,
        tuples: &[TupleKey],
    ) -> Result<(String, String), String> {
        let store_id = self.shared.new_id();
        let model = Model::parse(self.shared.new_id(), model)?;
        let mut stored = Tuples::default();
        for t in tuples {
            model
                .validate_tuple(t)
                .map_err(|e| format!("invalid tuple `{t}`: {e}"))?;
            stored.insert(t);
        }
        let model_id = model.id.clone();
        let now = now_rfc3339();
        self.shared.write_stores().insert(
            store_id.clone(),
            Store {
                name: name.to_owned(),
                created_at: now.clone(),
                updated_at: now,
                models: vec![Arc::new(model)],
                tuples: Arc::new(stored),
            },
        );
        Ok((store_id, model_id))
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["healthz"] if method == Method::GET => {
            return json_response(StatusCode::OK, &json!({"status": "SERVING"}));
        }
        ["_control"] => return control(&shared, &method, req).await,
        ["stores", ..] => {}
        _ => return not_found(),
    }
    if let Err(e) = inject_faults(&shared).await {
        return e.response();
    }
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(e) => return e.response(),
    };
    let res = match (&method, &segments[1..]) {
        (&Method::POST, []) => create_store(&shared, &body),
        (&Method::GET, []) => list_stores(&shared),
        (&Method::GET, [store]) => get_store(&shared, store),
        (&Method::DELETE, [store]) => delete_store(&shared, store),
        (&Method::POST, [store, "authorization-models"]) => write_model(&shared, store, &body),
        (&Method::GET, [store, "authorization-models"]) => read_models(&shared, store),
        (&Method::GET, [store, "authorization-models", id]) => read_model(&shared, store, id),
        (&Method::POST, [store, "write"]) => write(&shared, store, &body),
        (&Method::POST, [store, "read"]) => read(&shared, store, &body),
        (&Method::POST, [store, "check"]) => check(&shared, store, &body),
        (&Method::POST, [store, "batch-check"]) => batch_check(&shared, store, &body),
        (&Method::POST, [store, "list-objects"]) => list_objects(&shared, store, &body).await,
        (&Method::POST, [store, "streamed-list-objects"]) => Ok(streamed_list_objects(
            &shared, store, &body,
        )
        .unwrap_or_else(|e| e.stream_response())),
        (_, [] | [_] | [_, "authorization-models"] | [_, "authorization-models", _])
        | (
            _,
            [
                _,
                "write"
                | "read"
                | "check"
                | "batch-check"
                | "list-objects"
                | "streamed-list-objects",
            ],
        ) => Err(ApiError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            code: "undefined_endpoint",
            message: "Method Not Allowed".into(),
        }),
        _ => return not_found(),
    };
    res.unwrap_or_else(|e| e.response())
}

fn not_found() -> Response<Body> {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: "undefined_endpoint",
        message: "Not Found".into(),
    }
    .response()
}

async fn inject_faults(shared: &Shared) -> Result<(), ApiError> {
    let mut rx = shared.control.subscribe();
    loop {
        if rx.borrow_and_update().mode != Mode::Stall {
            break;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
    let control = rx.borrow().clone();
    if control.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(control.latency_ms)).await;
    }
    if control.mode == Mode::Error {
        return Err(ApiError::internal());
    }
    if control.fail_rate > 0.0 {
        let draw = (shared.random() >> 11) as f64 / (1u64 << 53) as f64;
        if draw < control.fail_rate {
            return Err(ApiError::internal());
        }
    }
    Ok(())
}

async fn control(shared: &Shared, method: &Method, req: Request<Incoming>) -> Response<Body> {
    if *method == Method::POST {
        let body = match read_body(req).await {
            Ok(b) => b,
            Err(e) => return e.response(),
        };
        let patch: ControlPatch = match serde_json::from_slice(&body) {
            Ok(p) => p,
            Err(e) => return ApiError::validation(e.to_string()).response(),
        };
        if patch.fail_rate.is_some_and(|r| !(0.0..=1.0).contains(&r)) {
            return ApiError::validation("fail_rate must be between 0 and 1").response();
        }
        shared.control.send_modify(|c| {
            if let Some(m) = patch.mode {
                c.mode = m;
            }
            if let Some(l) = patch.latency_ms {
                c.latency_ms = l;
            }
            if let Some(r) = patch.fail_rate {
                c.fail_rate = r;
            }
            if let Some(d) = patch.object_delay_ms {
                c.object_delay_ms = d;
            }
        });
    } else if *method != Method::GET {
        return not_found();
    }
    let control = shared.control.borrow().clone();
    json_response(StatusCode::OK, &json!(control))
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| ApiError::validation(format!("cannot read the request body: {e}")))
}

fn parse<T: for<'de> Deserialize<'de> + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| ApiError::validation(e.to_string()))
}

// ---------------------------------------------------------------------------------------
// request shapes (protobuf JSON: snake_case, lowerCamelCase accepted too)

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TupleKeyIn {
    user: String,
    relation: String,
    object: String,
    condition: Option<Value>,
}

impl TupleKeyIn {
    fn key(&self) -> TupleKey {
        TupleKey::new(&self.user, &self.relation, &self.object)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TupleKeysIn {
    #[serde(alias = "tupleKeys")]
    tuple_keys: Vec<TupleKeyIn>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct CreateStoreRequest {
    name: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct CheckRequest {
    #[serde(alias = "tupleKey")]
    tuple_key: Option<TupleKeyIn>,
    #[serde(alias = "authorizationModelId")]
    authorization_model_id: String,
    #[serde(alias = "contextualTuples")]
    contextual_tuples: Option<TupleKeysIn>,
    context: Option<Value>,
    consistency: Option<String>,
    trace: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct BatchCheckItem {
    #[serde(alias = "tupleKey")]
    tuple_key: Option<TupleKeyIn>,
    #[serde(alias = "contextualTuples")]
    contextual_tuples: Option<TupleKeysIn>,
    context: Option<Value>,
    #[serde(alias = "correlationId")]
    correlation_id: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct BatchCheckRequest {
    checks: Vec<BatchCheckItem>,
    #[serde(alias = "authorizationModelId")]
    authorization_model_id: String,
    consistency: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ListObjectsRequest {
    #[serde(alias = "authorizationModelId")]
    authorization_model_id: String,
    #[serde(rename = "type")]
    type_name: String,
    relation: String,
    user: String,
    #[serde(alias = "contextualTuples")]
    contextual_tuples: Option<TupleKeysIn>,
    context: Option<Value>,
    consistency: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct WriteSection {
    #[serde(alias = "tupleKeys")]
    tuple_keys: Vec<TupleKeyIn>,
    #[serde(alias = "onDuplicate")]
    on_duplicate: Option<String>,
    #[serde(alias = "onMissing")]
    on_missing: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct WriteRequest {
    writes: Option<WriteSection>,
    deletes: Option<WriteSection>,
    #[serde(alias = "authorizationModelId")]
    authorization_model_id: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ReadRequest {
    #[serde(alias = "tupleKey")]
    tuple_key: Option<TupleKeyIn>,
}

// ---------------------------------------------------------------------------------------
// stores and models

type Answer = Result<Response<Body>, ApiError>;

fn check_store_id(request: &str, store: &str) -> Result<(), ApiError> {
    if is_ulid(store) {
        Ok(())
    } else {
        Err(ApiError::pattern(request, "StoreId", ULID_PATTERN))
    }
}

fn create_store(shared: &Shared, body: &[u8]) -> Answer {
    let req: CreateStoreRequest = parse(body)?;
    let len = req.name.chars().count();
    if !(3..=64).contains(&len) {
        return Err(ApiError::pattern(
            "CreateStoreRequest",
            "Name",
            r"^[\w\d\s./_-]{3,64}$",
        ));
    }
    let id = shared.new_id();
    let now = now_rfc3339();
    let store = Store {
        name: req.name,
        created_at: now.clone(),
        updated_at: now,
        models: Vec::new(),
        tuples: Arc::new(Tuples::default()),
    };
    let body = store.to_json(&id);
    shared.write_stores().insert(id, store);
    Ok(json_response(StatusCode::CREATED, &body))
}

fn list_stores(shared: &Shared) -> Answer {
    let stores: Vec<Value> = shared
        .read_stores()
        .iter()
        .map(|(id, s)| s.to_json(id))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"stores": stores, "continuation_token": ""}),
    ))
}

fn get_store(shared: &Shared, store: &str) -> Answer {
    check_store_id("GetStoreRequest", store)?;
    let stores = shared.read_stores();
    let s = stores.get(store).ok_or_else(ApiError::store_not_found)?;
    Ok(json_response(StatusCode::OK, &s.to_json(store)))
}

fn delete_store(shared: &Shared, store: &str) -> Answer {
    check_store_id("DeleteStoreRequest", store)?;
    shared
        .write_stores()
        .remove(store)
        .ok_or_else(ApiError::store_not_found)?;
    let mut res = Response::new(full(Bytes::new()));
    *res.status_mut() = StatusCode::NO_CONTENT;
    Ok(res)
}

fn write_model(shared: &Shared, store: &str, body: &[u8]) -> Answer {
    check_store_id("WriteAuthorizationModelRequest", store)?;
    let value: Value = parse::<Option<Value>>(body)?.unwrap_or_else(|| json!({}));
    let count = value
        .get("type_definitions")
        .or_else(|| value.get("typeDefinitions"))
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    if count > MAX_TYPES_PER_MODEL {
        return Err(ApiError::bad_request(
            "exceeded_entity_limit",
            format!(
                "The number of type definitions in an authorization model exceeds the allowed limit of {MAX_TYPES_PER_MODEL}"
            ),
        ));
    }
    let model = Model::parse(shared.new_id(), &value)
        .map_err(|e| ApiError::bad_request("invalid_authorization_model", e))?;
    let id = model.id.clone();
    let mut stores = shared.write_stores();
    let s = stores
        .get_mut(store)
        .ok_or_else(ApiError::store_not_found)?;
    s.models.push(Arc::new(model));
    s.updated_at = now_rfc3339();
    Ok(json_response(
        StatusCode::CREATED,
        &json!({"authorization_model_id": id}),
    ))
}

fn read_models(shared: &Shared, store: &str) -> Answer {
    check_store_id("ReadAuthorizationModelsRequest", store)?;
    let stores = shared.read_stores();
    let models: Vec<Value> = stores
        .get(store)
        .map(|s| s.models.iter().rev().map(|m| m.to_json()).collect())
        .unwrap_or_default();
    Ok(json_response(
        StatusCode::OK,
        &json!({"authorization_models": models, "continuation_token": ""}),
    ))
}

fn read_model(shared: &Shared, store: &str, id: &str) -> Answer {
    check_store_id("ReadAuthorizationModelRequest", store)?;
    if !is_ulid(id) {
        return Err(ApiError::pattern(
            "ReadAuthorizationModelRequest",
            "Id",
            ULID_PATTERN,
        ));
    }
    let stores = shared.read_stores();
    let model = stores
        .get(store)
        .and_then(|s| s.models.iter().find(|m| m.id == id))
        .ok_or_else(|| model_not_found(id))?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"authorization_model": model.to_json()}),
    ))
}

fn model_not_found(id: &str) -> ApiError {
    ApiError::bad_request(
        "authorization_model_not_found",
        format!("Authorization Model '{id}' not found"),
    )
}

/// OpenFGA's `resolveTypesystem`: the requested model, or the latest one.
fn resolve(
    shared: &Shared,
    request: &str,
    store: &str,
    model_id: &str,
) -> Result<(Arc<Model>, Arc<Tuples>), ApiError> {
    check_store_id(request, store)?;
    if !model_id.is_empty() && !is_ulid(model_id) {
        return Err(ApiError::pattern(
            request,
            "AuthorizationModelId",
            ULID_PATTERN,
        ));
    }
    let stores = shared.read_stores();
    let s = stores.get(store);
    let model = if model_id.is_empty() {
        s.and_then(|s| s.models.last()).ok_or_else(|| {
            ApiError::bad_request(
                "latest_authorization_model_not_found",
                format!("No authorization models found for store '{store}'"),
            )
        })?
    } else {
        s.and_then(|s| s.models.iter().find(|m| m.id == model_id))
            .ok_or_else(|| model_not_found(model_id))?
    };
    let tuples = s.map(|s| s.tuples.clone()).unwrap_or_default();
    Ok((model.clone(), tuples))
}

// ---------------------------------------------------------------------------------------
// tuples

/// The protobuf field rules of a tuple key (`CheckRequestTupleKey`, `TupleKey`).
fn check_key_fields(message: &str, t: &TupleKeyIn) -> Result<(), ApiError> {
    let no_space = |s: &str| !s.chars().any(char::is_whitespace);
    if !(no_space(&t.user) && (2..=512).contains(&t.user.len())) {
        return Err(ApiError::pattern(message, "User", r"^[^\s]{2,512}$"));
    }
    if !(no_space(&t.relation)
        && (1..=50).contains(&t.relation.len())
        && !t.relation.contains([':', '#', '@']))
    {
        return Err(ApiError::pattern(message, "Relation", r"^[^:#@\s]{1,50}$"));
    }
    if !(no_space(&t.object) && (2..=256).contains(&t.object.len())) {
        return Err(ApiError::pattern(message, "Object", r"^[^\s]{2,256}$"));
    }
    Ok(())
}

/// Contextual tuples, validated like writes.
fn contextual(model: &Model, ct: Option<&TupleKeysIn>) -> Result<Option<Tuples>, ApiError> {
    let Some(ct) = ct.filter(|c| !c.tuple_keys.is_empty()) else {
        return Ok(None);
    };
    if ct.tuple_keys.len() > MAX_CONTEXTUAL_TUPLES {
        return Err(ApiError::validation(format!(
            "invalid ContextualTupleKeys.TupleKeys: value must contain no more than {MAX_CONTEXTUAL_TUPLES} item(s)"
        )));
    }
    let mut out = Tuples::default();
    for t in &ct.tuple_keys {
        check_key_fields("TupleKey", t)?;
        let k = t.key();
        if t.condition.as_ref().is_some_and(|c| !c.is_null()) {
            return Err(ApiError::invalid_tuple(
                &k,
                &Invalid::Other("conditions are not supported by the OpenFGA test server".into()),
            ));
        }
        model
            .validate_tuple(&k)
            .map_err(|e| ApiError::invalid_tuple(&k, &e))?;
        if !out.insert(&k) {
            return Err(ApiError::bad_request(
                "duplicate_contextual_tuple",
                format!(
                    "duplicate contextual tuple in request: user: '{}', relation: '{}', object: '{}'",
                    k.user, k.relation, k.object
                ),
            ));
        }
    }
    Ok(Some(out))
}

fn write(shared: &Shared, store: &str, body: &[u8]) -> Answer {
    let req: WriteRequest = parse(body)?;
    let (model, _) = resolve(shared, "WriteRequest", store, &req.authorization_model_id)?;
    let empty = WriteSection::default();
    let writes = req.writes.as_ref().unwrap_or(&empty);
    let deletes = req.deletes.as_ref().unwrap_or(&empty);
    if writes.tuple_keys.is_empty() && deletes.tuple_keys.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_write_input",
            "Invalid input. Make sure you provide at least one write, or at least one delete",
        ));
    }
    // OpenFGA's WriteCommand: writes are validated against the model, deletes only for
    // a well-formed user; then duplicates and the size limit
    for t in &writes.tuple_keys {
        check_key_fields("TupleKey", t)?;
        let k = t.key();
        let invalid =
            |why: Invalid| ApiError::validation(format!("Invalid tuple '{k}'. Reason: {why}"));
        if t.condition.as_ref().is_some_and(|c| !c.is_null()) {
            return Err(invalid(Invalid::Other(
                "conditions are not supported by the OpenFGA test server".into(),
            )));
        }
        model.validate_tuple(&k).map_err(invalid)?;
        let (uo, ur) = super::engine::split_user(&k.user);
        if ur == Some(k.relation.as_str()) && uo == k.object {
            return Err(invalid(Invalid::Other(
                "cannot write a tuple that is implicit".into(),
            )));
        }
    }
    for t in &deletes.tuple_keys {
        check_key_fields("TupleKeyWithoutCondition", t)?;
    }
    let mut seen = BTreeSet::new();
    for t in deletes.tuple_keys.iter().chain(&writes.tuple_keys) {
        let k = t.key();
        if !seen.insert(k.clone()) {
            return Err(ApiError::bad_request(
                "cannot_allow_duplicate_tuples_in_one_request",
                format!(
                    "duplicate tuple in write: user: '{}', relation: '{}', object: '{}'",
                    k.user, k.relation, k.object
                ),
            ));
        }
    }
    if seen.len() > shared.options.max_tuples_per_write {
        return Err(ApiError::bad_request(
            "exceeded_entity_limit",
            format!(
                "The number of write operations exceeds the allowed limit of {}",
                shared.options.max_tuples_per_write
            ),
        ));
    }
    for (option, value) in [
        ("on_duplicate", &writes.on_duplicate),
        ("on_missing", &deletes.on_missing),
    ] {
        if let Some(v) = value
            .as_deref()
            .filter(|v| !["", "error", "ignore"].contains(v))
        {
            return Err(ApiError::validation(format!(
                "invalid {option} option: {v}"
            )));
        }
    }
    let ignore_duplicates = writes.on_duplicate.as_deref() == Some("ignore");
    let ignore_missing = deletes.on_missing.as_deref() == Some("ignore");
    let mut stores = shared.write_stores();
    let s = stores
        .get_mut(store)
        .ok_or_else(ApiError::store_not_found)?;
    let mut tuples = (*s.tuples).clone();
    let failed = |what: &str, k: &TupleKey| {
        ApiError::bad_request(
            "write_failed_due_to_invalid_input",
            format!(
                "cannot {what}: user: '{}', relation: '{}', object: '{}': tuple to be written already existed or the tuple to be deleted did not exist",
                k.user, k.relation, k.object
            ),
        )
    };
    for t in &deletes.tuple_keys {
        let k = t.key();
        if !tuples.remove(&k) && !ignore_missing {
            return Err(failed("delete a tuple which does not exist", &k));
        }
    }
    for t in &writes.tuple_keys {
        let k = t.key();
        if !tuples.insert(&k) && !ignore_duplicates {
            return Err(failed("write a tuple which already exists", &k));
        }
    }
    s.tuples = Arc::new(tuples);
    s.updated_at = now_rfc3339();
    Ok(with_model_header(
        json_response(StatusCode::OK, &json!({})),
        &model.id,
    ))
}

fn read(shared: &Shared, store: &str, body: &[u8]) -> Answer {
    let req: ReadRequest = parse(body)?;
    check_store_id("ReadRequest", store)?;
    let stores = shared.read_stores();
    let Some(s) = stores.get(store) else {
        return Ok(json_response(
            StatusCode::OK,
            &json!({"tuples": [], "continuation_token": ""}),
        ));
    };
    let filter = req.tuple_key.unwrap_or_default();
    let tuples: Vec<Value> = s
        .tuples
        .keys()
        .into_iter()
        .filter(|k| {
            (filter.object.is_empty()
                || k.object == filter.object
                || (filter.object.ends_with(':') && k.object.starts_with(&filter.object)))
                && (filter.relation.is_empty() || k.relation == filter.relation)
                && (filter.user.is_empty() || k.user == filter.user)
        })
        .map(|k| {
            json!({
                "key": {"user": k.user, "relation": k.relation, "object": k.object},
                "timestamp": s.updated_at,
            })
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"tuples": tuples, "continuation_token": ""}),
    ))
}

// ---------------------------------------------------------------------------------------
// check

fn check(shared: &Shared, store: &str, body: &[u8]) -> Answer {
    let req: CheckRequest = parse(body)?;
    let tk = req
        .tuple_key
        .as_ref()
        .ok_or_else(|| ApiError::validation("invalid CheckRequest.TupleKey: value is required"))?;
    check_key_fields("CheckRequestTupleKey", tk)?;
    let (model, tuples) = resolve(shared, "CheckRequest", store, &req.authorization_model_id)?;
    model
        .validate_user_object_relation(&tk.user, &tk.relation, &tk.object)
        .map_err(|e| ApiError::validation(e.to_string()))?;
    let ctx = contextual(&model, req.contextual_tuples.as_ref())?;
    let allowed = Evaluator::new(&model, &tuples, ctx.as_ref())
        .check(&tk.user, &tk.relation, &tk.object)
        .map_err(|_| ApiError::too_complex())?;
    Ok(with_model_header(
        json_response(
            StatusCode::OK,
            &json!({"allowed": allowed, "resolution": ""}),
        ),
        &model.id,
    ))
}

fn batch_check(shared: &Shared, store: &str, body: &[u8]) -> Answer {
    let req: BatchCheckRequest = parse(body)?;
    for item in &req.checks {
        let tk = item.tuple_key.as_ref().ok_or_else(|| {
            ApiError::validation("invalid BatchCheckItem.TupleKey: value is required")
        })?;
        check_key_fields("CheckRequestTupleKey", tk)?;
        let id = &item.correlation_id;
        if !((1..=36).contains(&id.chars().count())
            && id
                .chars()
                .all(|c| c.is_alphanumeric() || c == '_' || c == '-'))
        {
            return Err(ApiError::pattern(
                "BatchCheckItem",
                "CorrelationId",
                r"^[\w\d-]{1,36}$",
            ));
        }
    }
    let (model, tuples) = resolve(
        shared,
        "BatchCheckRequest",
        store,
        &req.authorization_model_id,
    )?;
    let max = shared.options.max_checks_per_batch_check;
    if req.checks.len() > max {
        return Err(ApiError::validation(format!(
            "batchCheck received {} checks, the maximum allowed is {max} ",
            req.checks.len()
        )));
    }
    if req.checks.is_empty() {
        return Err(ApiError::validation(
            "batch check requires at least one check to evaluate, no checks were received",
        ));
    }
    let mut seen = BTreeSet::new();
    for item in &req.checks {
        if !seen.insert(item.correlation_id.as_str()) {
            return Err(ApiError::validation(format!(
                "received duplicate correlation id: {}",
                item.correlation_id
            )));
        }
    }
    let mut result = serde_json::Map::new();
    for item in &req.checks {
        let outcome = batch_item(&model, &tuples, item);
        result.insert(item.correlation_id.clone(), outcome);
    }
    Ok(with_model_header(
        json_response(StatusCode::OK, &json!({"result": result})),
        &model.id,
    ))
}

fn batch_item(model: &Model, tuples: &Tuples, item: &BatchCheckItem) -> Value {
    let error =
        |code: &str, message: String| json!({"error": {"input_error": code, "message": message}});
    let Some(tk) = &item.tuple_key else {
        return error("validation_error", "tuple_key is required".into());
    };
    if let Err(e) = model.validate_user_object_relation(&tk.user, &tk.relation, &tk.object) {
        return error("validation_error", e.to_string());
    }
    let ctx = match contextual(model, item.contextual_tuples.as_ref()) {
        Ok(c) => c,
        Err(e) => return error(e.code, e.message),
    };
    match Evaluator::new(model, tuples, ctx.as_ref()).check(&tk.user, &tk.relation, &tk.object) {
        Ok(allowed) => json!({"allowed": allowed}),
        Err(_) => error(
            "authorization_model_resolution_too_complex",
            ApiError::too_complex().message,
        ),
    }
}

// ---------------------------------------------------------------------------------------
// list objects

/// One ListObjects evaluation: walks the candidates, waiting `object_delay` per
/// candidate, and stops silently at the deadline (OpenFGA's `listObjectsDeadline`).
struct ListRun {
    model: Arc<Model>,
    tuples: Arc<Tuples>,
    contextual: Option<Tuples>,
    relation: String,
    user: String,
    candidates: std::vec::IntoIter<String>,
    deadline: Instant,
    object_delay: Duration,
}

impl ListRun {
    fn start(shared: &Shared, store: &str, req: &ListObjectsRequest) -> Result<ListRun, ApiError> {
        let check_name = |s: &str, max: usize| {
            (1..=max).contains(&s.len())
                && !s.contains([':', '#', '@'])
                && !s.contains(char::is_whitespace)
        };
        if !check_name(&req.type_name, 254) {
            return Err(ApiError::pattern(
                "ListObjectsRequest",
                "Type",
                r"^[^:#@\s]{1,254}$",
            ));
        }
        if !check_name(&req.relation, 50) {
            return Err(ApiError::pattern(
                "ListObjectsRequest",
                "Relation",
                r"^[^:#@\s]{1,50}$",
            ));
        }
        if !(2..=512).contains(&req.user.len()) || req.user.contains(char::is_whitespace) {
            return Err(ApiError::pattern(
                "ListObjectsRequest",
                "User",
                r"^[^\s]{2,512}$",
            ));
        }
        let (model, tuples) = resolve(
            shared,
            "ListObjectsRequest",
            store,
            &req.authorization_model_id,
        )?;
        let ctx = contextual(&model, req.contextual_tuples.as_ref())?;
        if !model.types.contains_key(&req.type_name) {
            return Err(ApiError::bad_request(
                "type_not_found",
                format!("type '{}' not found", req.type_name),
            ));
        }
        if model.relation(&req.type_name, &req.relation).is_none() {
            return Err(ApiError::bad_request(
                "relation_not_found",
                format!("relation '{}#{}' not found", req.type_name, req.relation),
            ));
        }
        model
            .validate_user(&req.user)
            .map_err(|e| ApiError::validation(format!("invalid 'user' value: {e}")))?;
        let candidates =
            Evaluator::new(&model, &tuples, ctx.as_ref()).candidates(&req.type_name, &req.user);
        let control = shared.control.borrow().clone();
        Ok(ListRun {
            model,
            tuples,
            contextual: ctx,
            relation: req.relation.clone(),
            user: req.user.clone(),
            candidates: candidates.into_iter(),
            deadline: Instant::now() + shared.options.list_objects_deadline,
            object_delay: Duration::from_millis(control.object_delay_ms),
        })
    }

    /// The next object the user has the relation with; `None` when done or out of time.
    async fn next(&mut self) -> Option<Result<String, ApiError>> {
        loop {
            let now = Instant::now();
            if now >= self.deadline {
                return None;
            }
            let candidate = self.candidates.next()?;
            if !self.object_delay.is_zero() {
                tokio::time::sleep(self.object_delay.min(self.deadline - now)).await;
                if Instant::now() >= self.deadline {
                    return None;
                }
            }
            let eval = Evaluator::new(&self.model, &self.tuples, self.contextual.as_ref());
            match eval.check(&self.user, &self.relation, &candidate) {
                Ok(true) => return Some(Ok(candidate)),
                Ok(false) => {}
                Err(_) => return Some(Err(ApiError::too_complex())),
            }
        }
    }
}

async fn list_objects(shared: &Shared, store: &str, body: &[u8]) -> Answer {
    let req: ListObjectsRequest = parse(body)?;
    let mut run = ListRun::start(shared, store, &req)?;
    let max = shared.options.list_objects_max_results;
    let mut objects = Vec::new();
    while max == 0 || objects.len() < max {
        match run.next().await {
            Some(Ok(o)) => objects.push(o),
            Some(Err(e)) => return Err(e),
            None => break,
        }
    }
    Ok(with_model_header(
        json_response(StatusCode::OK, &json!({"objects": objects})),
        &run.model.id,
    ))
}

/// A response body fed by a channel (the NDJSON stream).
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

fn streamed_list_objects(shared: &Shared, store: &str, body: &[u8]) -> Answer {
    let req: ListObjectsRequest = parse(body)?;
    let mut run = ListRun::start(shared, store, &req)?;
    let model_id = run.model.id.clone();
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        while let Some(next) = run.next().await {
            let line = match &next {
                Ok(object) => json!({"result": {"object": object}}),
                Err(e) => json!({"error": e.body()}),
            };
            if tx.send(Bytes::from(format!("{line}\n"))).await.is_err() || next.is_err() {
                break;
            }
        }
    });
    let mut res = Response::new(ChannelBody { rx }.boxed_unsync());
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Ok(with_model_header(res, &model_id))
}
