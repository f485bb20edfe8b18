//! Batches and transactions (`POST /` with a `batch` or `transaction` Bundle).
//!
//! Sits right after the token stage (and the client's rate-limit charge): the
//! Bundle itself needs no scope, each of its entries does. Every entry becomes a
//! sub-request (`fhir::bundle` reads them) that runs through the rest of the stack,
//! scope, authorization, narrowing and forwarding, exactly as the same interaction
//! sent on its own would, with the outer request's tenant, verified token and
//! request id, and an audit record of its own.
//!
//! - **batch**: the entries run one after the other; each answers on its own (a
//!   refused entry gets its status and OperationOutcome in `response.outcome`, the
//!   others go upstream and come back checked like any read or write). The upstream
//!   sees the entries as interactions of their own, never as a batch: the proxy
//!   checks what each one returns before the client sees it.
//! - **transaction**: all or nothing. Every entry runs through the stages in
//!   [`PrepareOnly`] mode (every decision, including the current version's record
//!   check, is made; nothing is written). If any is refused, nothing goes upstream
//!   and the answer is one OperationOutcome naming the entry and the reason.
//!   Otherwise the transaction goes upstream as one Bundle of the prepared entries
//!   (narrowed URLs and conditions, the versions the checks saw as `ifMatch`), and
//!   its `transaction-response` comes back without resources (`return=minimal`).
//!   `urn:uuid:` references between entries are resolved for the record checks
//!   (`fhir::bundle::resolve_references`); conditional references are refused for
//!   every permit that does not reach the whole type.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use tower::{Layer, Service, ServiceExt};

use super::render_error;
use crate::audit::AuditSlot;
use crate::error::ProxyError;
use crate::fhir::bundle::{
    self, BundleKind, EntryError, EntryRequest, EntryResponse, PreparedEntry,
};
use crate::fhir::{FhirRequest, Interaction, OutboundRequest, parse_request};
use crate::forward::Prepared;
use crate::pipeline::{BoxFuture, Decision, FHIR_JSON, Internal, PrepareOnly, ProxyResponse, ext};
use crate::tenant::{Tenant, TenantCtx, TenantError, tenant_of};
use crate::upstream::{BaseRewrite, Upstream, UpstreamError};

/// The most entries a Bundle may have unless configured (`--max-bundle-entries`).
pub const DEFAULT_MAX_ENTRIES: usize = 100;

#[derive(Clone)]
pub struct ServeBundleLayer {
    upstream: Upstream,
    max_entries: usize,
}

impl ServeBundleLayer {
    pub fn new(upstream: Upstream, max_entries: usize) -> Self {
        ServeBundleLayer {
            upstream,
            max_entries,
        }
    }
}

impl<S> Layer<S> for ServeBundleLayer {
    type Service = ServeBundle<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ServeBundle {
            inner,
            upstream: self.upstream.clone(),
            max_entries: self.max_entries,
        }
    }
}

#[derive(Clone)]
pub struct ServeBundle<S> {
    inner: S,
    upstream: Upstream,
    max_entries: usize,
}

impl<S> Service<Request<Bytes>> for ServeBundle<S>
where
    S: Service<Request<Bytes>, Response = ProxyResponse, Error = ProxyError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = ProxyResponse;
    type Error = ProxyError;
    type Future = BoxFuture<Result<ProxyResponse, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let is_bundle = req
            .extensions()
            .get::<FhirRequest>()
            .is_some_and(|f| f.interaction == Interaction::BatchOrTransaction);
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if !is_bundle {
            return Box::pin(async move { inner.call(req).await });
        }
        let upstream = self.upstream.clone();
        let max = self.max_entries;
        Box::pin(async move { serve(inner, &upstream, max, req).await })
    }
}

async fn serve<S>(
    inner: S,
    upstream: &Upstream,
    max_entries: usize,
    req: Request<Bytes>,
) -> Result<ProxyResponse, ProxyError>
where
    S: Service<Request<Bytes>, Response = ProxyResponse, Error = ProxyError> + Clone,
{
    let tenant = Arc::clone(&tenant_of(&req)?.0);
    if !is_json(req.headers()) {
        return Err(TenantError::UnsupportedMediaType.into());
    }
    let incoming = bundle::parse_bundle(req.body(), &tenant.config.public_base, max_entries)?;
    let audit = req.extensions().get::<AuditSlot>().cloned();
    if let Some(a) = &audit {
        a.note(format!("bundle.type={}", incoming.kind.name()));
        a.note(format!("bundle.entries={}", incoming.entries.len()));
    }
    match incoming.kind {
        BundleKind::Batch => batch(inner, &req, incoming.entries, audit.as_ref()).await,
        BundleKind::Transaction => {
            transaction(
                inner,
                upstream,
                &tenant,
                &req,
                incoming.entries,
                audit.as_ref(),
            )
            .await
        }
    }
}

/// `application/fhir+json` or `application/json` (parameters aside).
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| ct.split(';').next())
        .is_some_and(|m| {
            let m = m.trim();
            m.eq_ignore_ascii_case(FHIR_JSON) || m.eq_ignore_ascii_case("application/json")
        })
}

async fn batch<S>(
    inner: S,
    outer: &Request<Bytes>,
    entries: Vec<Result<EntryRequest, EntryError>>,
    audit: Option<&AuditSlot>,
) -> Result<ProxyResponse, ProxyError>
where
    S: Service<Request<Bytes>, Response = ProxyResponse, Error = ProxyError> + Clone,
{
    let mut answers = Vec::with_capacity(entries.len());
    let mut failed = 0usize;
    for (n, entry) in entries.iter().enumerate() {
        let slot = entry_slot(outer, n + 1);
        let answer = match entry {
            Ok(e) => run_entry(inner.clone(), outer, e, None, &slot, false).await,
            Err(e) => Err(ProxyError::BundleEntry(e.clone())),
        };
        let resp = match answer {
            Ok(resp) => {
                let status = resp.status();
                let reason = resp
                    .extensions()
                    .get::<Decision>()
                    .map_or("allowed", |d| d.0);
                match slot.emit(status.as_u16(), super::released_decision(status), reason) {
                    Ok(()) => resp,
                    // Not recorded, so not released.
                    Err(e) => render_error(&ProxyError::from(e), None, None),
                }
            }
            // Records the refusal in the entry's own slot.
            Err(e) => render_error(&e, Some(&slot), None),
        };
        if !resp.status().is_success() {
            failed += 1;
        }
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        answers.push(EntryResponse::from_answer(
            parts.status,
            &parts.headers,
            &body,
        ));
    }
    if let Some(a) = audit {
        a.note(format!("bundle.failed={failed}"));
    }
    Ok(bundle_answer(
        StatusCode::OK,
        Bytes::from(bundle::batch_response(&answers)),
        "batch",
    ))
}

async fn transaction<S>(
    inner: S,
    upstream: &Upstream,
    tenant: &Tenant,
    outer: &Request<Bytes>,
    entries: Vec<Result<EntryRequest, EntryError>>,
    audit: Option<&AuditSlot>,
) -> Result<ProxyResponse, ProxyError>
where
    S: Service<Request<Bytes>, Response = ProxyResponse, Error = ProxyError> + Clone,
{
    let refuse = |index: usize, error: ProxyError| {
        if let Some(a) = audit {
            a.note(format!("transaction.refused_entry={index}"));
        }
        ProxyError::TransactionEntry {
            index,
            error: Box::new(error),
        }
    };
    let mut ok = Vec::with_capacity(entries.len());
    for (n, e) in entries.into_iter().enumerate() {
        ok.push(e.map_err(|e| refuse(n + 1, e.into()))?);
    }
    bundle::check_transaction(&ok, &tenant.config.public_base)
        .map_err(|(n, e)| refuse(n + 1, e.into()))?;
    let ids = bundle::identities(&ok).map_err(|(n, e)| refuse(n + 1, e.into()))?;
    let pending = pending_id()?;
    let mut prepared = Vec::with_capacity(ok.len());
    let mut slots: Vec<AuditSlot> = Vec::with_capacity(ok.len());
    for (n, e) in ok.iter().enumerate() {
        let index = n + 1;
        // What the record checks see: references to other entries resolved.
        // The upstream reads the resource as sent, the stages the resolved copy: a
        // member given twice could make the two differ.
        if let Some(res) = &e.resource {
            crate::authz::write::parse_json(res.get().as_bytes())
                .map_err(|err| refuse(index, err.into()))?;
        }
        let check_body = match (&e.resource, e.method == Method::PATCH) {
            (Some(res), false) => Some((
                bundle::resolve_references(res, &ids, &pending)
                    .map_err(|err| refuse(index, err.into()))?,
                FHIR_JSON,
            )),
            _ => None,
        };
        let slot = entry_slot(outer, index);
        let resp = match run_entry(inner.clone(), outer, e, check_body, &slot, true).await {
            Ok(resp) => resp,
            Err(err) => {
                // The refused entry's record has its reason; those prepared before it
                // are recorded as not carried out.
                slot.emit_refusal(err.status().as_u16(), err.reason());
                for s in &slots {
                    s.emit_refusal(err.status().as_u16(), "transaction_refused");
                }
                return Err(refuse(index, err));
            }
        };
        let p = resp
            .extensions()
            .get::<Prepared>()
            .cloned()
            .ok_or(Internal("a prepared entry without its Prepared"))?;
        if !p.unrestricted
            && let Some(res) = &e.resource
            && bundle::has_conditional_reference(res)
        {
            return Err(refuse(index, EntryError::ConditionalReference.into()));
        }
        prepared.push(p);
        slots.push(slot);
    }
    let cfg = &tenant.config;
    let outgoing: Vec<PreparedEntry<'_>> = ok
        .iter()
        .zip(&prepared)
        .map(|(e, p)| prepared_entry(e, &p.out, &cfg.public_base, &cfg.upstream.base))
        .collect();
    let out = OutboundRequest {
        method: Method::POST,
        path: String::new(),
        params: Vec::new(),
        body: Some(Bytes::from(bundle::transaction_bundle(&outgoing))),
        conditional: false,
        narrowing: None,
        headers: vec![
            (header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON)),
            (
                HeaderName::from_static("prefer"),
                HeaderValue::from_static("return=minimal, handling=strict"),
            ),
        ],
    };
    let fetched = crate::trace::in_child_span(
        |id| tracing::debug_span!("upstream", span.id = %id, otel.kind = "client"),
        upstream.fetch(tenant, &out, &HeaderMap::new()),
    )
    .await?;
    let rewrite = BaseRewrite {
        from: &cfg.upstream.base,
        to: &cfg.public_base,
    };
    if !fetched.status.is_success() {
        for s in &slots {
            s.emit_refusal(fetched.status.as_u16(), "upstream_outcome");
        }
        // The upstream refused the transaction (a lost update, a conditional create
        // matching twice): its status passes; its OperationOutcome only where every
        // entry's permit reaches the whole type (the text may name other records).
        if !is_operation_outcome(&fetched.body) {
            return Err(UpstreamError::Status(fetched.status).into());
        }
        let body = if prepared.iter().all(|p| p.unrestricted) {
            rewrite.bytes(&fetched.body)?
        } else {
            crate::forward::upstream_write_refused(fetched.status)
        };
        return Ok(bundle_answer(fetched.status, body, "upstream_outcome"));
    }
    let minimal = bundle::minimal_transaction_response(&fetched.body, ok.len())
        .ok_or(UpstreamError::BadResponse("transaction-response"))?;
    let body = rewrite.bytes(&minimal)?;
    // Each entry's record: what it wrote (the upstream's Location, ids only).
    for ((slot, location), e) in slots.iter().zip(bundle::response_locations(&body)).zip(&ok) {
        if let Some(loc) = location.as_deref().and_then(written_id) {
            slot.note(format!("written={loc}"));
        }
        slot.note(format!("method={}", e.method));
        // The transaction already went out: a record that cannot be queued is lost,
        // the outer one (which the fail-closed sink refuses) decides.
        let _ = slot.emit(fetched.status.as_u16(), "allow", "transaction_entry");
    }
    Ok(bundle_answer(StatusCode::OK, body, "transaction"))
}

/// `Type/id` of a Location (`.../Type/id/_history/vid`), if it names one.
fn written_id(location: &str) -> Option<String> {
    let path = location.split('?').next()?;
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let at = segments.iter().position(|s| *s == "_history");
    let end = at.unwrap_or(segments.len());
    let (ty, id) = (segments.get(end.checked_sub(2)?)?, segments.get(end - 1)?);
    let ok =
        crate::fhir::ResourceType::parse(ty).is_some() && crate::fhir::ResourceId::is_valid(id);
    ok.then(|| format!("{ty}/{id}"))
}

fn is_operation_outcome(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Head<'a> {
        #[serde(rename = "resourceType", borrow)]
        resource_type: Option<&'a str>,
    }
    serde_json::from_slice::<Head<'_>>(body)
        .is_ok_and(|h| h.resource_type == Some("OperationOutcome"))
}

/// The upstream transaction's entry: the prepared request's method, URL (criteria
/// narrowed) and conditions (`If-Match` as the write check pinned it, `If-None-Exist`
/// narrowed), the entry's resource as the client sent it (the stages checked it with
/// its references to other entries resolved), a fullUrl under the public base moved
/// to the upstream base.
fn prepared_entry<'a>(
    e: &'a EntryRequest,
    out: &OutboundRequest,
    public_base: &str,
    upstream_base: &str,
) -> PreparedEntry<'a> {
    let full_url =
        e.full_url.as_ref().map(
            |f| match f.strip_prefix(public_base.trim_end_matches('/')) {
                Some(rest) if rest.starts_with('/') => {
                    format!("{}{rest}", upstream_base.trim_end_matches('/'))
                }
                _ => f.clone(),
            },
        );
    let url = out.path_and_query();
    let header = |name: &HeaderName| {
        out.header(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    PreparedEntry {
        full_url,
        resource: e.resource.as_deref(),
        method: method_name(&out.method),
        url: url.trim_start_matches('/').to_owned(),
        if_match: header(&header::IF_MATCH),
        if_none_match: header(&header::IF_NONE_MATCH),
        if_none_exist: header(&HeaderName::from_static("if-none-exist")),
        if_modified_since: header(&header::IF_MODIFIED_SINCE),
    }
}

/// The entry method's name (`Bundle.entry.request.method` is a code, not any token).
fn method_name(m: &Method) -> &'static str {
    match *m {
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        _ => "GET",
    }
}

/// A fresh id no record or relation can hold yet: what a resource the transaction
/// creates is called in the record checks of the entries that reference it.
fn pending_id() -> Result<String, Internal> {
    let mut b = [0u8; 12];
    getrandom::getrandom(&mut b).map_err(|_| Internal("no randomness for a pending id"))?;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!("pending-{hex}"))
}

/// An audit record of the entry's own, under the outer request's.
fn entry_slot(outer: &Request<Bytes>, index: usize) -> AuditSlot {
    let slot = outer
        .extensions()
        .get::<AuditSlot>()
        .map_or_else(AuditSlot::default, AuditSlot::fork);
    slot.note(format!("bundle.entry={index}"));
    slot
}

/// Runs one entry through the rest of the stack. `check_body` replaces the entry's
/// body for the stages (a transaction's resolved references); `prepare`: decide only.
async fn run_entry<S>(
    inner: S,
    outer: &Request<Bytes>,
    entry: &EntryRequest,
    check_body: Option<(Bytes, &'static str)>,
    slot: &AuditSlot,
    prepare: bool,
) -> Result<ProxyResponse, ProxyError>
where
    S: Service<Request<Bytes>, Response = ProxyResponse, Error = ProxyError> + Clone,
{
    let sub = sub_request(outer, entry, check_body, slot, prepare)?;
    inner.oneshot(sub).await
}

fn sub_request(
    outer: &Request<Bytes>,
    entry: &EntryRequest,
    check_body: Option<(Bytes, &'static str)>,
    slot: &AuditSlot,
    prepare: bool,
) -> Result<Request<Bytes>, ProxyError> {
    let tenant = tenant_of(outer)?;
    // A batch's entries are independent: one cannot name another.
    if !prepare
        && entry
            .resource
            .as_deref()
            .is_some_and(bundle::has_urn_reference)
    {
        return Err(EntryError::ReferenceInBatch.into());
    }
    let body = match check_body {
        Some(b) => Some(b),
        None => entry.body()?,
    };
    let path = format!("/{}", entry.path);
    let uri = match &entry.query {
        Some(q) => format!("/{}{path}?{q}", tenant.0.id()),
        None => format!("/{}{path}", tenant.0.id()),
    };
    let uri: http::Uri = uri.parse().map_err(|_| EntryError::Url)?;
    // The entry's interaction, parsed like a request of its own.
    let parsed = parse_request(&entry.method, &path, entry.query.as_deref(), None)?;
    if parsed.interaction == Interaction::BatchOrTransaction {
        return Err(EntryError::Nested.into());
    }
    // A transaction writes: a search or an operation has no place in it, whatever its
    // method.
    if prepare && !crate::authz::write::is_write(&parsed.interaction) {
        return Err(EntryError::ReadInTransaction.into());
    }
    slot.set_request(&parsed);
    slot.set_query(&path, entry.query.as_deref(), None);
    let mut builder = Request::builder().method(entry.method.clone()).uri(uri);
    let conditions = [
        (header::IF_MATCH, &entry.if_match),
        (header::IF_NONE_MATCH, &entry.if_none_match),
        (
            HeaderName::from_static("if-none-exist"),
            &entry.if_none_exist,
        ),
        (header::IF_MODIFIED_SINCE, &entry.if_modified_since),
    ];
    for (name, value) in conditions {
        if let Some(v) = value {
            let v = HeaderValue::from_str(v).map_err(|_| EntryError::MissingRequest)?;
            builder = builder.header(name, v);
        }
    }
    // What the client prefers for the whole Bundle holds for each entry.
    for v in outer.headers().get_all("prefer") {
        builder = builder.header("prefer", v);
    }
    let bytes = match body {
        Some((b, media)) => {
            builder = builder.header(header::CONTENT_TYPE, media);
            b
        }
        None => Bytes::new(),
    };
    let mut sub = builder
        .body(bytes)
        .map_err(|_| Internal("entry sub-request"))?;
    let ext = sub.extensions_mut();
    ext.insert(TenantCtx(Arc::clone(&tenant.0)));
    ext.insert(Arc::clone(ext_of::<Arc<crate::authz::Checker>>(outer)?));
    ext.insert(Arc::clone(ext_of::<Arc<crate::token::VerifiedToken>>(
        outer,
    )?));
    if let Some(addr) = outer.extensions().get::<crate::pipeline::ClientAddr>() {
        ext.insert(*addr);
    }
    ext.insert(slot.clone());
    ext.insert(parsed);
    if prepare {
        ext.insert(PrepareOnly);
    }
    Ok(sub)
}

fn ext_of<T: Send + Sync + 'static>(req: &Request<Bytes>) -> Result<&T, Internal> {
    ext::<T>(req, "missing extension of a bundle request")
}

fn bundle_answer(status: StatusCode, body: Bytes, reason: &'static str) -> ProxyResponse {
    let mut resp = crate::pipeline::fhir_json(status, body);
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp.extensions_mut().insert(Decision(reason));
    resp
}

#[cfg(test)]
mod tests {
    use super::written_id;

    #[test]
    fn written_ids_come_from_locations() {
        assert_eq!(
            written_id("http://p/t/Observation/12/_history/1").as_deref(),
            Some("Observation/12")
        );
        assert_eq!(written_id("Patient/p1").as_deref(), Some("Patient/p1"));
        assert_eq!(written_id("http://p/t/"), None);
        assert_eq!(written_id("Nope/1"), None);
    }
}
