//! Batch and transaction Bundles: reading the client's `POST /` Bundle into entry
//! requests, resolving a transaction's references between entries for the record
//! checks, and writing the `batch-response` and the upstream transaction.
//!
//! Pure and synchronous: the stack's bundle layer (`stack::bundle`) turns each entry
//! into a sub-request that runs through the same stages as a request of its own, and
//! uses these functions to read the Bundle and to answer.
//!
//! Guarantees: an entry's URL is relative to the tenant's base (an absolute URL is
//! accepted only under the tenant's public base); nothing but the entry's method,
//! URL, resource and its `ifMatch`/`ifNoneMatch`/`ifNoneExist`/`ifModifiedSince` is
//! taken from it; a transaction's `urn:uuid:` references are resolved to the entry
//! they name, or refused, never guessed.

use std::collections::HashMap;

use base64::Engine;
use bytes::Bytes;
use http::{Method, StatusCode};
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

/// What kind of Bundle the client posted.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum BundleKind {
    Batch,
    Transaction,
}

impl BundleKind {
    pub fn name(self) -> &'static str {
        match self {
            BundleKind::Batch => "batch",
            BundleKind::Transaction => "transaction",
        }
    }
}

/// Why the Bundle as a whole cannot be processed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("the request body is not a JSON Bundle")]
    NotABundle,
    #[error("Bundle type `{found}` cannot be posted to the base; use `batch` or `transaction`")]
    Type { found: String },
    #[error("the Bundle has {found} entries; at most {max} are accepted")]
    TooManyEntries { found: usize, max: usize },
    #[error("the Bundle has no entries")]
    Empty,
}

impl BundleError {
    pub fn reason(&self) -> &'static str {
        match self {
            BundleError::NotABundle => "bundle_invalid",
            BundleError::Type { .. } => "bundle_type_unsupported",
            BundleError::TooManyEntries { .. } => "bundle_too_many_entries",
            BundleError::Empty => "bundle_empty",
        }
    }
}

/// Why one entry cannot be processed (before any stage looks at it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("the entry has no `request` with a `method` and a `url`")]
    MissingRequest,
    #[error("method `{method}` is not a FHIR interaction")]
    Method { method: String },
    #[error("the entry's url must be relative to the tenant's base (or under its public base)")]
    Url,
    #[error("a Bundle cannot contain another batch or transaction")]
    Nested,
    #[error("a `{method}` entry needs a `resource`")]
    MissingResource { method: &'static str },
    #[error(
        "a PATCH entry's resource must be a Binary of type `application/json-patch+json` or a FHIRPath Patch Parameters"
    )]
    Patch,
    #[error("reads and operations cannot be part of a transaction; send them in a batch")]
    ReadInTransaction,
    #[error("reference `{reference}` names no entry of the transaction")]
    UnresolvedReference { reference: String },
    #[error("`urn:uuid:` references are only resolved within a transaction")]
    ReferenceInBatch,
    #[error("conditional references are only resolved for permits that reach the whole type")]
    ConditionalReference,
    #[error("two entries of the transaction change `{target}`")]
    DuplicateTarget { target: String },
    #[error(
        "a transaction entry's fullUrl must be a `urn:uuid:`/`urn:oid:` or the entry's own URL under the tenant's base"
    )]
    FullUrl,
    #[error("a patch in a transaction cannot name another entry (`urn:`)")]
    PatchReference,
    #[error("fullUrl `{full_url}` names two entries")]
    DuplicateFullUrl { full_url: String },
}

impl EntryError {
    pub fn reason(&self) -> &'static str {
        match self {
            EntryError::MissingRequest => "bundle_entry_invalid",
            EntryError::Method { .. } => "bundle_entry_method",
            EntryError::Url => "bundle_entry_url",
            EntryError::Nested => "bundle_nested",
            EntryError::MissingResource { .. } => "bundle_entry_resource",
            EntryError::Patch => "bundle_entry_patch",
            EntryError::ReadInTransaction => "transaction_read_unsupported",
            EntryError::UnresolvedReference { .. } => "transaction_reference_unresolved",
            EntryError::ReferenceInBatch => "batch_reference_between_entries",
            EntryError::DuplicateFullUrl { .. } => "transaction_duplicate_full_url",
            EntryError::ConditionalReference => "conditional_reference",
            EntryError::DuplicateTarget { .. } => "transaction_duplicate_target",
            EntryError::FullUrl => "transaction_full_url",
            EntryError::PatchReference => "transaction_patch_reference",
        }
    }

    /// 400 for all: the entry itself is malformed or unsupported.
    pub fn status(&self) -> StatusCode {
        StatusCode::BAD_REQUEST
    }
}

/// One entry, as a request of its own.
#[derive(Clone, Debug)]
pub struct EntryRequest {
    pub method: Method,
    /// Relative to the tenant's base, without a leading `/`.
    pub path: String,
    /// The raw query string, if any.
    pub query: Option<String>,
    pub full_url: Option<String>,
    /// The entry's resource as sent (a transaction forwards it unchanged).
    pub resource: Option<Box<RawValue>>,
    pub if_match: Option<String>,
    pub if_none_match: Option<String>,
    pub if_none_exist: Option<String>,
    pub if_modified_since: Option<String>,
}

impl EntryRequest {
    /// `path?query`, as an entry's `request.url`.
    pub fn url(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        }
    }

    /// The body and its media type the entry's interaction sends: the resource, or for
    /// a JSON Patch the decoded patch document of its Binary.
    pub fn body(&self) -> Result<Option<(Bytes, &'static str)>, EntryError> {
        let Some(resource) = &self.resource else {
            return Ok(None);
        };
        if self.method != Method::PATCH {
            return Ok(Some((
                Bytes::copy_from_slice(resource.get().as_bytes()),
                FHIR_JSON,
            )));
        }
        #[derive(Deserialize)]
        struct Binary {
            #[serde(rename = "resourceType")]
            resource_type: String,
            #[serde(rename = "contentType")]
            content_type: Option<String>,
            data: Option<String>,
        }
        let b: Binary = serde_json::from_str(resource.get()).map_err(|_| EntryError::Patch)?;
        match b.resource_type.as_str() {
            "Parameters" => Ok(Some((
                Bytes::copy_from_slice(resource.get().as_bytes()),
                FHIR_JSON,
            ))),
            "Binary" if b.content_type.as_deref() == Some(JSON_PATCH) => {
                let data = b.data.ok_or(EntryError::Patch)?;
                let patch = base64::engine::general_purpose::STANDARD
                    .decode(data.as_bytes())
                    .map_err(|_| EntryError::Patch)?;
                Ok(Some((Bytes::from(patch), JSON_PATCH)))
            }
            _ => Err(EntryError::Patch),
        }
    }
}

/// The FHIR JSON media type (as `pipeline::FHIR_JSON`, a module of the same layer).
const FHIR_JSON: &str = "application/fhir+json";

/// The media type of a JSON Patch (RFC 6902) document.
pub const JSON_PATCH: &str = "application/json-patch+json";

/// A Bundle read from the request body: its kind, and each entry or why it cannot be
/// processed (a batch answers a bad entry on its own; a transaction refuses).
#[derive(Debug)]
pub struct IncomingBundle {
    pub kind: BundleKind,
    pub entries: Vec<Result<EntryRequest, EntryError>>,
}

#[derive(Deserialize)]
struct RawBundle<'a> {
    #[serde(rename = "resourceType")]
    resource_type: Option<&'a str>,
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(default, borrow)]
    entry: Vec<&'a RawValue>,
}

#[derive(Deserialize)]
struct RawEntry {
    #[serde(rename = "fullUrl")]
    full_url: Option<String>,
    resource: Option<Box<RawValue>>,
    request: Option<RawRequest>,
}

#[derive(Deserialize)]
struct RawRequest {
    method: Option<String>,
    url: Option<String>,
    #[serde(rename = "ifMatch")]
    if_match: Option<String>,
    #[serde(rename = "ifNoneMatch")]
    if_none_match: Option<String>,
    #[serde(rename = "ifNoneExist")]
    if_none_exist: Option<String>,
    #[serde(rename = "ifModifiedSince")]
    if_modified_since: Option<String>,
}

/// Reads the client's Bundle. `public_base` is the tenant's public base URL (entry
/// URLs under it are made relative); at most `max_entries` entries.
pub fn parse_bundle(
    body: &[u8],
    public_base: &str,
    max_entries: usize,
) -> Result<IncomingBundle, BundleError> {
    let raw: RawBundle<'_> = serde_json::from_slice(body).map_err(|_| BundleError::NotABundle)?;
    if raw.resource_type != Some("Bundle") {
        return Err(BundleError::NotABundle);
    }
    let kind = match raw.kind.as_deref() {
        Some("batch") => BundleKind::Batch,
        Some("transaction") => BundleKind::Transaction,
        other => {
            return Err(BundleError::Type {
                found: crate::fhir::parse::echo(other.unwrap_or("")),
            });
        }
    };
    if raw.entry.is_empty() {
        return Err(BundleError::Empty);
    }
    if raw.entry.len() > max_entries {
        return Err(BundleError::TooManyEntries {
            found: raw.entry.len(),
            max: max_entries,
        });
    }
    let entries = raw
        .entry
        .iter()
        .map(|e| parse_entry(e, kind, public_base))
        .collect();
    Ok(IncomingBundle { kind, entries })
}

fn parse_entry(
    raw: &RawValue,
    kind: BundleKind,
    public_base: &str,
) -> Result<EntryRequest, EntryError> {
    let e: RawEntry = serde_json::from_str(raw.get()).map_err(|_| EntryError::MissingRequest)?;
    let r = e.request.ok_or(EntryError::MissingRequest)?;
    let (Some(method), Some(url)) = (r.method, r.url) else {
        return Err(EntryError::MissingRequest);
    };
    let method = match method.as_str() {
        "GET" => Method::GET,
        "HEAD" => Method::HEAD,
        "POST" => Method::POST,
        "PUT" => Method::PUT,
        "PATCH" => Method::PATCH,
        "DELETE" => Method::DELETE,
        other => {
            return Err(EntryError::Method {
                method: crate::fhir::parse::echo(other),
            });
        }
    };
    let relative = relative_url(&url, public_base).ok_or(EntryError::Url)?;
    let operation = relative
        .split('?')
        .next()
        .is_some_and(|p| p.split('/').any(|s| s.starts_with('$')));
    if kind == BundleKind::Transaction
        && (method == Method::GET || method == Method::HEAD || operation)
    {
        return Err(EntryError::ReadInTransaction);
    }
    let (path, query) = match relative.split_once('?') {
        Some((p, q)) => (p.to_owned(), (!q.is_empty()).then(|| q.to_owned())),
        None => (relative.to_owned(), None),
    };
    if path.is_empty() {
        // The base itself: another batch or transaction (or a system search).
        return Err(EntryError::Nested);
    }
    let needs_resource = match method {
        Method::POST if !path.contains('/') && !path.starts_with('$') => Some("POST"),
        Method::PUT => Some("PUT"),
        Method::PATCH => Some("PATCH"),
        _ => None,
    };
    if let Some(m) = needs_resource
        && e.resource.is_none()
    {
        return Err(EntryError::MissingResource { method: m });
    }
    if let Some(res) = &e.resource
        && is_nested_bundle(res)
    {
        return Err(EntryError::Nested);
    }
    Ok(EntryRequest {
        method,
        path,
        query,
        full_url: e.full_url,
        resource: e.resource,
        if_match: r.if_match,
        if_none_match: r.if_none_match,
        if_none_exist: r.if_none_exist,
        if_modified_since: r.if_modified_since,
    })
}

/// Whether a resource is a batch or transaction Bundle.
fn is_nested_bundle(res: &RawValue) -> bool {
    #[derive(Deserialize)]
    struct Head {
        #[serde(rename = "resourceType")]
        resource_type: Option<String>,
        #[serde(rename = "type")]
        kind: Option<String>,
    }
    serde_json::from_str::<Head>(res.get()).is_ok_and(|h| {
        h.resource_type.as_deref() == Some("Bundle")
            && matches!(h.kind.as_deref(), Some("batch" | "transaction"))
    })
}

/// The entry URL relative to the base: as it is, without a leading `/`, or with the
/// tenant's public base removed. `None` for any other absolute URL, a fragment, or a
/// URN.
fn relative_url<'u>(url: &'u str, public_base: &str) -> Option<&'u str> {
    let base = public_base.trim_end_matches('/');
    let rest = match url.strip_prefix(base) {
        Some(rest) if rest.starts_with('/') => &rest[1..],
        Some(_) => return None,
        None if url.contains("://") || url.starts_with("urn:") => return None,
        None => url.strip_prefix('/').unwrap_or(url),
    };
    (!rest.contains('#') && !rest.starts_with('/')).then_some(rest)
}

/// What a transaction entry's `fullUrl` stands for once the transaction is applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    /// An existing resource: `Type/id` (an update or a delete by id).
    Known(String),
    /// A resource the transaction creates (or a conditional update may create): its id
    /// is only known to the upstream. The record checks see it as a new resource of
    /// its type that nobody's compartment or relation can include yet.
    Pending(String),
}

/// The identity of each `urn:uuid:`/`urn:oid:` fullUrl of a transaction; an error
/// names the (0-based) entry it is about.
pub fn identities(
    entries: &[EntryRequest],
) -> Result<HashMap<String, Identity>, (usize, EntryError)> {
    let mut out = HashMap::new();
    for (n, e) in entries.iter().enumerate() {
        let Some(full) = e.full_url.as_deref().filter(|f| f.starts_with("urn:")) else {
            continue;
        };
        let ty = e.path.split('/').next().unwrap_or("").to_owned();
        let identity = match (e.method.as_str(), e.path.split_once('/')) {
            ("PUT" | "PATCH" | "DELETE", Some((t, id))) if !id.contains('/') => {
                Identity::Known(format!("{t}/{id}"))
            }
            _ => Identity::Pending(ty),
        };
        if out.insert(full.to_owned(), identity).is_some() {
            return Err((
                n,
                EntryError::DuplicateFullUrl {
                    full_url: crate::fhir::parse::echo(full),
                },
            ));
        }
    }
    Ok(out)
}

/// What a transaction must not hold, entry by entry (the 0-based index of the first
/// offending one): a fullUrl that is neither a URN nor the entry's own URL under the
/// tenant's public base (the upstream would redirect references that match it, which
/// the record checks cannot follow); two entries that change one `Type/id` (each is
/// checked against the record as it is before the transaction, the upstream applies
/// them one after the other); a patch naming another entry by `urn:` (the upstream
/// would resolve it inside the patched record, after the check).
pub fn check_transaction(
    entries: &[EntryRequest],
    public_base: &str,
) -> Result<(), (usize, EntryError)> {
    let base = public_base.trim_end_matches('/');
    let mut targets = std::collections::HashSet::new();
    for (n, e) in entries.iter().enumerate() {
        let by_id = e.query.is_none() && e.path.split('/').count() == 2;
        if let Some(full) = &e.full_url
            && !full.starts_with("urn:uuid:")
            && !full.starts_with("urn:oid:")
            && !(by_id && *full == format!("{base}/{}", e.path))
        {
            return Err((n, EntryError::FullUrl));
        }
        if by_id && e.method != Method::POST && !targets.insert(e.path.clone()) {
            return Err((
                n,
                EntryError::DuplicateTarget {
                    target: crate::fhir::parse::echo(&e.path),
                },
            ));
        }
        if e.method == Method::PATCH {
            let body = e.body().map_err(|err| (n, err))?;
            if body.is_some_and(|(b, _)| contains_urn(&b)) {
                return Err((n, EntryError::PatchReference));
            }
        }
    }
    Ok(())
}

/// Whether `text` holds `urn:` in any letter case (a JSON escape of it too).
fn contains_urn(text: &[u8]) -> bool {
    let lower = text.to_ascii_lowercase();
    memchr::memmem::find(&lower, b"urn:").is_some()
        || memchr::memmem::find(&lower, b"\\u").is_some()
}

/// The resource as the record checks see it: every `reference` naming another entry
/// by its `urn:` fullUrl replaced by what that entry stands for; a [`Identity::Pending`]
/// one by `Type/<pending>`, an id no record or relation can have (the caller makes it
/// fresh per request). Any other `urn:` reference: refused.
pub fn resolve_references(
    resource: &RawValue,
    ids: &HashMap<String, Identity>,
    pending: &str,
) -> Result<Bytes, EntryError> {
    let mut value: Value =
        serde_json::from_str(resource.get()).map_err(|_| EntryError::MissingRequest)?;
    let mut changed = false;
    resolve_in(&mut value, ids, pending, &mut changed, 0)?;
    if !changed {
        return Ok(Bytes::copy_from_slice(resource.get().as_bytes()));
    }
    serde_json::to_vec(&value)
        .map(Bytes::from)
        .map_err(|_| EntryError::MissingRequest)
}

/// Whether a resource holds a `urn:` reference (a batch entry must not: its entries
/// are independent).
pub fn has_urn_reference(resource: &RawValue) -> bool {
    serde_json::from_str::<Value>(resource.get())
        .map(|v| {
            any_reference(&v, 0, &|s| {
                s.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("urn:"))
            })
        })
        .unwrap_or(true)
}

/// Whether a resource holds a conditional reference (`Patient?identifier=...`),
/// which the upstream resolves by a search of its own.
pub fn has_conditional_reference(resource: &RawValue) -> bool {
    serde_json::from_str::<Value>(resource.get())
        .map(|v| {
            any_reference(&v, 0, &|s| {
                !s.contains("://")
                    && !s.starts_with("urn:")
                    && !s.starts_with('#')
                    && s.contains('?')
            })
        })
        .unwrap_or(true)
}

fn any_reference(v: &Value, depth: usize, pred: &dyn Fn(&str) -> bool) -> bool {
    if depth > crate::fhir::json::MAX_DEPTH {
        return true;
    }
    match v {
        Value::Object(m) => m.iter().any(|(k, v)| {
            (k == "reference" && v.as_str().is_some_and(pred)) || any_reference(v, depth + 1, pred)
        }),
        Value::Array(a) => a.iter().any(|v| any_reference(v, depth + 1, pred)),
        _ => false,
    }
}

fn resolve_in(
    v: &mut Value,
    ids: &HashMap<String, Identity>,
    pending: &str,
    changed: &mut bool,
    depth: usize,
) -> Result<(), EntryError> {
    if depth > crate::fhir::json::MAX_DEPTH {
        return Err(EntryError::MissingRequest);
    }
    match v {
        Value::Object(m) => {
            for (k, v) in m.iter_mut() {
                if k == "reference"
                    && let Value::String(s) = v
                    && s.starts_with("urn:")
                {
                    let resolved = match ids.get(s.as_str()) {
                        Some(Identity::Known(r)) => r.clone(),
                        Some(Identity::Pending(t)) => format!("{t}/{pending}"),
                        None => {
                            return Err(EntryError::UnresolvedReference {
                                reference: crate::fhir::parse::echo(s),
                            });
                        }
                    };
                    *s = resolved;
                    *changed = true;
                } else {
                    resolve_in(v, ids, pending, changed, depth + 1)?;
                }
            }
        }
        Value::Array(a) => {
            for v in a {
                resolve_in(v, ids, pending, changed, depth + 1)?;
            }
        }
        _ => {}
    }
    Ok(())
}

#[derive(Deserialize)]
struct ResourceHead {
    #[serde(rename = "resourceType")]
    resource_type: Option<String>,
}

/// One entry of a `batch-response`.
#[derive(Debug, Default)]
pub struct EntryResponse {
    pub status: u16,
    pub location: Option<String>,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    /// The resource returned (already checked), for a 2xx.
    pub resource: Option<Box<RawValue>>,
    /// The OperationOutcome of a failed entry.
    pub outcome: Option<Box<RawValue>>,
}

impl EntryResponse {
    /// From a sub-request's answer: status, headers, and its body as the resource
    /// (2xx) or the outcome (otherwise). A body that is no JSON object is left out.
    pub fn from_answer(status: StatusCode, headers: &http::HeaderMap, body: &[u8]) -> Self {
        let header = |name: http::header::HeaderName| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let raw = std::str::from_utf8(body)
            .ok()
            .filter(|s| s.trim_start().starts_with('{'))
            .and_then(|s| RawValue::from_string(s.to_owned()).ok());
        let is_outcome = raw.as_ref().is_some_and(|r| {
            serde_json::from_str::<ResourceHead>(r.get())
                .is_ok_and(|h| h.resource_type.as_deref() == Some("OperationOutcome"))
        });
        let (resource, outcome) = if status.is_success() && !is_outcome {
            (raw, None)
        } else {
            (None, raw)
        };
        EntryResponse {
            status: status.as_u16(),
            location: header(http::header::LOCATION),
            etag: header(http::header::ETAG),
            last_modified: header(http::header::LAST_MODIFIED),
            resource,
            outcome,
        }
    }
}

/// The `batch-response` Bundle for the entries' answers, in entry order.
pub fn batch_response(entries: &[EntryResponse]) -> Vec<u8> {
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Out<'a> {
        resource_type: &'static str,
        #[serde(rename = "type")]
        kind: &'static str,
        entry: Vec<OutEntry<'a>>,
    }
    #[derive(serde::Serialize)]
    struct OutEntry<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        resource: Option<&'a RawValue>,
        response: OutResponse<'a>,
    }
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct OutResponse<'a> {
        status: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        location: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        etag: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        last_modified: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        outcome: Option<&'a RawValue>,
    }
    let out = Out {
        resource_type: "Bundle",
        kind: "batch-response",
        entry: entries
            .iter()
            .map(|e| OutEntry {
                resource: e.resource.as_deref(),
                response: OutResponse {
                    status: status_line(e.status),
                    location: e.location.as_deref(),
                    etag: e.etag.as_deref(),
                    last_modified: e.last_modified.as_deref(),
                    outcome: e.outcome.as_deref(),
                },
            })
            .collect(),
    };
    serde_json::to_vec(&out).unwrap_or_else(|_| {
        br#"{"resourceType":"Bundle","type":"batch-response","entry":[]}"#.to_vec()
    })
}

/// `201 Created`: the status code and its reason phrase, as `Bundle.entry.response.status`.
pub fn status_line(status: u16) -> String {
    let reason = StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    format!("{status} {reason}").trim_end().to_owned()
}

/// One entry of the transaction the proxy sends upstream, as the stages prepared it.
#[derive(Debug)]
pub struct PreparedEntry<'a> {
    pub full_url: Option<String>,
    pub resource: Option<&'a RawValue>,
    pub method: &'a str,
    /// Relative to the upstream base (the narrowed path and query).
    pub url: String,
    pub if_match: Option<String>,
    pub if_none_match: Option<String>,
    pub if_none_exist: Option<String>,
    pub if_modified_since: Option<String>,
}

/// The transaction Bundle for the upstream.
pub fn transaction_bundle(entries: &[PreparedEntry<'_>]) -> Vec<u8> {
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Out<'a> {
        resource_type: &'static str,
        #[serde(rename = "type")]
        kind: &'static str,
        entry: Vec<OutEntry<'a>>,
    }
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct OutEntry<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        full_url: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        resource: Option<&'a RawValue>,
        request: OutRequest<'a>,
    }
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct OutRequest<'a> {
        method: &'a str,
        url: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        if_match: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        if_none_match: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        if_none_exist: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        if_modified_since: Option<&'a str>,
    }
    let out = Out {
        resource_type: "Bundle",
        kind: "transaction",
        entry: entries
            .iter()
            .map(|e| OutEntry {
                full_url: e.full_url.as_deref(),
                resource: e.resource,
                request: OutRequest {
                    method: e.method,
                    url: &e.url,
                    if_match: e.if_match.as_deref(),
                    if_none_match: e.if_none_match.as_deref(),
                    if_none_exist: e.if_none_exist.as_deref(),
                    if_modified_since: e.if_modified_since.as_deref(),
                },
            })
            .collect(),
    };
    serde_json::to_vec(&out).unwrap_or_default()
}

/// The upstream's `transaction-response`, as the client may see it: each entry's
/// `response` (status, location, etag, lastModified, outcome) kept, every `resource`
/// removed (a transaction answers as `Prefer: return=minimal`: what was written is
/// read back with reads of its own, which the record checks cover). `None` if it is no
/// transaction-response with `expected` entries.
pub fn minimal_transaction_response(body: &[u8], expected: usize) -> Option<Vec<u8>> {
    #[derive(Deserialize, serde::Serialize)]
    struct Resp {
        #[serde(rename = "resourceType")]
        resource_type: String,
        #[serde(rename = "type")]
        kind: String,
        #[serde(default)]
        entry: Vec<RespEntry>,
    }
    #[derive(Deserialize, serde::Serialize)]
    struct RespEntry {
        #[serde(skip_serializing_if = "Option::is_none")]
        response: Option<Box<RawValue>>,
    }
    let r: Resp = serde_json::from_slice(body).ok()?;
    if r.resource_type != "Bundle" || r.kind != "transaction-response" || r.entry.len() != expected
    {
        return None;
    }
    serde_json::to_vec(&r).ok()
}

/// The `location` of each entry of a `transaction-response`, in entry order.
pub fn response_locations(body: &[u8]) -> Vec<Option<String>> {
    #[derive(Deserialize)]
    struct Resp {
        #[serde(default)]
        entry: Vec<RespEntry>,
    }
    #[derive(Deserialize)]
    struct RespEntry {
        response: Option<RespResponse>,
    }
    #[derive(Deserialize)]
    struct RespResponse {
        location: Option<String>,
    }
    serde_json::from_slice::<Resp>(body)
        .map(|r| {
            r.entry
                .into_iter()
                .map(|e| e.response.and_then(|r| r.location))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
