//! Stage 5: forwarding to the tenant's upstream FHIR server, and checking what comes
//! back.
//!
//! Guarantees: the client's credentials and hop-by-hop headers never reach the
//! upstream (requests are built from scratch: method, rebuilt path, allow-listed
//! headers, the tenant's own upstream credentials); every resource in a 2xx answer is
//! checked against the request's [`Permit`] before the client sees it (a read of a
//! record outside the permit becomes the tenant's "denied" status; Bundle entries that
//! fail are dropped); upstream base URLs in headers and bodies are rewritten to the
//! tenant's public base; the whole exchange is bounded in time and size.

pub mod filter;
pub mod patient_match;

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;

use crate::authz::write::WritePlan;
use crate::authz::{AuthzError, Checker, Permit, ReleaseCtx};
use crate::config::UpstreamConfig;
use crate::fhir::{FhirRequest, OutboundRequest};
use crate::metrics::Stage;
use crate::pipeline::{BoxFuture, Decision, FHIR_JSON, Internal, ProxyResponse, ext, fhir_json};
use crate::scope::ScopeGrant;
use crate::tenant::{Tenant, tenant_of};
use crate::token::VerifiedToken;
use crate::upstream::{BaseRewrite, Fetched, FhirServer, Upstream, UpstreamError};

/// What stage 5 fails with. Records the permit does not reach are authz's decision,
/// applied to the answer.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Authz(#[from] AuthzError),
    /// `Patient/$match` refused (its input, or a mode the upstream cannot serve).
    #[error(transparent)]
    Match(#[from] patient_match::MatchError),
    #[error(transparent)]
    Internal(#[from] Internal),
}

/// Response headers passed back to the client (URL-bearing ones rewritten).
const FORWARDED_RESPONSE_HEADERS: [header::HeaderName; 4] = [
    header::ETAG,
    header::LAST_MODIFIED,
    header::LOCATION,
    header::CONTENT_LOCATION,
];

fn rewrite_header(
    v: &HeaderValue,
    upstream: &UpstreamConfig,
    public_base: &str,
) -> Option<HeaderValue> {
    let s = v.to_str().ok()?;
    let rewritten = match s.strip_prefix(upstream.base.as_str()) {
        Some(rest) => format!("{public_base}{rest}"),
        // A relative Location is relative to the upstream base; keep it relative.
        None if !s.contains("://") => s.to_owned(),
        // An absolute URL to somewhere else must not leak.
        None => return None,
    };
    HeaderValue::from_str(&rewritten).ok()
}

/// The innermost service, in front of an upstream FHIR server (`U`, [`Upstream`] in
/// production).
#[derive(Clone)]
pub struct Forward<U = Upstream> {
    upstream: U,
    cursors: crate::cursor::CursorKey,
    /// The upstream's CapabilityStatement (whether it declares `Patient/$match`).
    capabilities: Arc<crate::discovery::Capabilities<U>>,
}

impl<U: FhirServer> Forward<U> {
    pub fn new(
        upstream: U,
        cursors: crate::cursor::CursorKey,
        capabilities: Arc<crate::discovery::Capabilities<U>>,
    ) -> Self {
        Forward {
            upstream,
            cursors,
            capabilities,
        }
    }
}

impl<U: FhirServer> tower::Service<Request<Bytes>> for Forward<U> {
    type Response = ProxyResponse;
    type Error = ForwardError;
    type Future = BoxFuture<Result<ProxyResponse, ForwardError>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), ForwardError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let upstream = self.upstream.clone();
        let cursors = self.cursors.clone();
        let capabilities = Arc::clone(&self.capabilities);
        Box::pin(async move {
            // `Patient/$match` is answered by its own step (forwarded or scored).
            if ext::<FhirRequest>(&req, "missing FhirRequest")
                .is_ok_and(patient_match::is_patient_match)
            {
                return patient_match::answer(&upstream, &capabilities, &cursors, &req).await;
            }
            forward(&upstream, &cursors, &req).await
        })
    }
}

async fn forward<U: FhirServer>(
    upstream: &U,
    cursors: &crate::cursor::CursorKey,
    req: &Request<Bytes>,
) -> Result<ProxyResponse, ForwardError> {
    let tenant = &tenant_of(req)?.0;
    let fhir = ext::<FhirRequest>(req, "missing FhirRequest")?;
    let out = ext::<OutboundRequest>(req, "missing OutboundRequest")?;
    let cfg = &tenant.config;
    // What the answer check reads: all there before anything goes upstream.
    ext::<Arc<Checker>>(req, "missing Checker")?;
    ext::<Arc<VerifiedToken>>(req, "missing VerifiedToken")?;
    ext::<ScopeGrant>(req, "missing ScopeGrant")?;
    ext::<Permit>(req, "missing Permit")?;

    if req
        .extensions()
        .get::<crate::pipeline::PrepareOnly>()
        .is_some()
    {
        return prepared(req, out);
    }
    if out.narrowing.as_ref().is_some_and(|n| n.values.is_empty()) {
        // Narrowed to no patient at all: nothing to ask the upstream.
        return Ok(empty_searchset());
    }
    let resumed = req.extensions().get::<crate::cursor::Resumed>();
    let first_page = resumed.map(|r| &r.narrowed).unwrap_or(out);
    let metrics = crate::metrics::global();
    let tenant_label = metrics.tenant(tenant.id());
    let started = std::time::Instant::now();
    let fetched = crate::trace::in_child_span(
        |id| tracing::debug_span!("upstream", span.id = %id, otel.kind = "client"),
        fetch_chunks(upstream, tenant, out, first_page, req.headers()),
    )
    .await;
    metrics.stage(tenant_label, Stage::Upstream, started.elapsed());
    let (fetched, out) = fetched?;
    let out = &out;
    let started = std::time::Instant::now();
    let plan = req.extensions().get::<WritePlan>();
    let checked =
        crate::trace::in_child_span(|id| tracing::debug_span!("check", span.id = %id), async {
            match plan {
                Some(plan) => check_write(req, &fetched, plan).await,
                None => check(cursors, req, &fetched, out).await,
            }
        })
        .await;
    metrics.stage(tenant_label, Stage::Check, started.elapsed());
    let checked = checked?;
    metrics.entries_dropped(tenant_label, checked.dropped as u64);
    let withheld = plan.is_some() && checked.body.is_empty();
    let mut resp = Response::new(Full::new(checked.body));
    *resp.status_mut() = fetched.status;
    let headers = resp.headers_mut();
    if !withheld {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    for name in FORWARDED_RESPONSE_HEADERS {
        if let Some(v) = fetched.headers.get(&name) {
            let v = if name == header::LOCATION || name == header::CONTENT_LOCATION {
                rewrite_header(v, &cfg.upstream, &cfg.public_base)
            } else {
                Some(v.clone())
            };
            if let Some(v) = v {
                headers.insert(name, v);
            }
        }
    }
    resp.extensions_mut().insert(Decision(checked.reason));
    if fhir.method == Method::HEAD {
        *resp.body_mut() = Full::new(Bytes::new());
    }
    Ok(resp)
}

/// What a transaction entry would send upstream, once every stage before this one
/// allowed it (see `pipeline::PrepareOnly`): the answer to a prepared sub-request
/// carries it as an extension, with an empty body.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub out: OutboundRequest,
    /// Whether the entry's permit reaches every record of its type (transactions
    /// refuse conditional references for everyone else: the upstream's resolution of
    /// them would tell whether a record outside the permit exists).
    pub unrestricted: bool,
}

fn prepared(req: &Request<Bytes>, out: &OutboundRequest) -> Result<ProxyResponse, ForwardError> {
    let fhir = ext::<FhirRequest>(req, "missing FhirRequest")?;
    let permit = ext::<Permit>(req, "missing Permit")?;
    if out.narrowing.is_some() {
        // A patient list goes in a search body; a transaction entry has only its URL.
        return Err(AuthzError::NotNarrowable {
            interaction: fhir.interaction.name(),
        }
        .into());
    }
    let mut resp = Response::new(Full::new(Bytes::new()));
    resp.extensions_mut().insert(Prepared {
        out: out.clone(),
        unrestricted: permit.is_unrestricted(),
    });
    resp.extensions_mut().insert(Decision("prepared"));
    Ok(resp)
}

/// The answer check: OpenFGA decisions for the answer's patients, then every record
/// against the permit, upstream URLs rewritten (the `check` span).
async fn check(
    cursors: &crate::cursor::CursorKey,
    req: &Request<Bytes>,
    fetched: &Fetched,
    out: &OutboundRequest,
) -> Result<filter::Checked, ForwardError> {
    let tenant = &tenant_of(req)?.0;
    let checker = ext::<Arc<Checker>>(req, "missing Checker")?;
    let fhir = ext::<FhirRequest>(req, "missing FhirRequest")?;
    let token = ext::<Arc<VerifiedToken>>(req, "missing VerifiedToken")?;
    let grant = ext::<ScopeGrant>(req, "missing ScopeGrant")?;
    let permit = ext::<Permit>(req, "missing Permit")?;
    let cfg = &tenant.config;
    // The answer as the upstream sent it: the check reads it once and rewrites upstream
    // URLs as it copies out what the client may see.
    let body = &fetched.body;
    let bases = [cfg.public_base.as_str(), cfg.upstream.base.as_str()];
    // OpenFGA decisions for every patient of the answer, gathered before the
    // (synchronous) check of each record.
    let decisions = match checker.fga() {
        Some(fga) if permit.has_fga() && fetched.status.is_success() => Some(
            fga.decide(
                permit,
                req.extensions().get::<crate::authz::fga::FgaListed>(),
                body,
                checker.index(),
                &bases,
            )
            .await?,
        ),
        _ => None,
    };
    let ctx = filter::CheckCtx {
        request: fhir,
        records: ReleaseCtx {
            permit,
            grant,
            token,
            index: checker.index(),
            bases,
            fga: decisions.as_ref(),
        },
        paging: Some(crate::cursor::Pager::new(
            cursors,
            tenant.id(),
            &cfg.public_base,
            token,
            fhir,
            out,
            req.extensions().get::<crate::cursor::Resumed>(),
            crate::cursor::now(),
        )),
        rewrite: BaseRewrite {
            from: &cfg.upstream.base,
            to: &cfg.public_base,
        },
    };
    let checked = filter::check_answer(&ctx, fetched.status, &fetched.headers, body.clone())?;
    if let (true, Some(audit)) = (
        checked.dropped > 0,
        req.extensions().get::<crate::audit::AuditSlot>(),
    ) {
        audit.note(format!("entries.dropped={}", checked.dropped));
    }
    Ok(checked)
}

/// The answer check of a single write (the `check` span): an upstream error passes as
/// for reads (its OperationOutcome, e.g. the 412 of a lost update); a success keeps its
/// status and headers, and its body only if it is an OperationOutcome or a record of
/// the written type that the token may read ([`WritePlan::read_back`]: scope `r` on
/// the type and the read record check, OpenFGA `can_view` included). Otherwise the body
/// is withheld, as if the client had asked for `Prefer: return=minimal`: write does not
/// imply read. The record written (from `Location`) goes on the audit record.
/// The answer to a write the upstream refused, for a permit that does not reach every
/// record of the type: the upstream's status with an OperationOutcome of the proxy's.
/// The upstream's own text can name records outside the permit (the reference that
/// blocks a delete, a referenced record that does not exist), so it is not passed on;
/// the status still is (a conflict, a failed precondition, an invalid body).
pub fn upstream_write_refused(status: StatusCode) -> Bytes {
    let code = match status {
        StatusCode::CONFLICT | StatusCode::PRECONDITION_FAILED => "conflict",
        StatusCode::NOT_FOUND | StatusCode::GONE => "not-found",
        StatusCode::UNPROCESSABLE_ENTITY => "processing",
        s if s.is_client_error() => "invalid",
        _ => "exception",
    };
    Bytes::from(
        crate::fhir::OperationOutcome::error(
            code,
            "upstream_write_refused",
            format!(
                "the upstream server refused the write ({})",
                status.as_u16()
            ),
        )
        .to_json(),
    )
}

async fn check_write(
    req: &Request<Bytes>,
    fetched: &Fetched,
    plan: &WritePlan,
) -> Result<filter::Checked, ForwardError> {
    let tenant = &tenant_of(req)?.0;
    let checker = ext::<Arc<Checker>>(req, "missing Checker")?;
    let fhir = ext::<FhirRequest>(req, "missing FhirRequest")?;
    let token = ext::<Arc<VerifiedToken>>(req, "missing VerifiedToken")?;
    let cfg = &tenant.config;
    let rewrite = BaseRewrite {
        from: &cfg.upstream.base,
        to: &cfg.public_base,
    };
    let bases = [cfg.public_base.as_str(), cfg.upstream.base.as_str()];
    let done = |body: Bytes, reason| filter::Checked {
        body,
        dropped: 0,
        kept: 0,
        reason,
    };
    if fetched.status.is_redirection() {
        return Err(UpstreamError::Redirect.into());
    }
    let text = std::str::from_utf8(&fetched.body).ok();
    // Owned: the answer itself is read again after the OpenFGA call (it is not `Send`).
    let read_type: Option<String> = text
        .and_then(|t| crate::fhir::answer::read(t).ok())
        .and_then(|a| a.resource_type.map(|t| t.into_owned()));
    let read_type = read_type.as_deref();
    let is_json = fetched
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| {
            let m = m.trim();
            m.eq_ignore_ascii_case(FHIR_JSON) || m.eq_ignore_ascii_case("application/json")
        });
    if !fetched.status.is_success() {
        if is_json && read_type == Some("OperationOutcome") {
            if !ext::<Permit>(req, "missing Permit")?.is_unrestricted() {
                return Ok(done(
                    upstream_write_refused(fetched.status),
                    "upstream_outcome",
                ));
            }
            return Ok(done(rewrite.bytes(&fetched.body)?, "upstream_outcome"));
        }
        return Err(UpstreamError::Status(fetched.status).into());
    }
    if let (Some(audit), Some(loc)) = (
        req.extensions().get::<crate::audit::AuditSlot>(),
        fetched.headers.get(header::LOCATION),
    ) && let (Some(rt), Ok(loc)) = (fhir.resource_type, loc.to_str())
        && let Some((id, version)) = written_id(loc, rt)
    {
        audit.set_written(id, version);
    }
    if fetched.body.is_empty() || !is_json {
        return Ok(done(Bytes::new(), "write_allowed"));
    }
    if read_type.is_none() {
        return Ok(done(Bytes::new(), "write_body_withheld"));
    }
    if read_type == Some("OperationOutcome") {
        return Ok(done(rewrite.bytes(&fetched.body)?, "write_allowed"));
    }
    let (Some(rt), Some(back)) = (fhir.resource_type, &plan.read_back) else {
        return Ok(done(Bytes::new(), "write_body_withheld"));
    };
    if read_type != Some(rt.as_str()) {
        return Ok(done(Bytes::new(), "write_body_withheld"));
    }
    let decisions = match checker.fga() {
        Some(fga) if back.permit.has_fga() => Some(
            fga.decide(&back.permit, None, &fetched.body, checker.index(), &bases)
                .await?,
        ),
        _ => None,
    };
    let ctx = ReleaseCtx {
        permit: &back.permit,
        grant: &back.grant,
        token,
        index: checker.index(),
        bases,
        fga: decisions.as_ref(),
    };
    let Some(answer) = text.and_then(|t| crate::fhir::answer::read(t).ok()) else {
        return Ok(done(Bytes::new(), "write_body_withheld"));
    };
    match ctx.release(rt, &answer.resource, true) {
        crate::authz::Release::Allowed(_) => {
            Ok(done(rewrite.bytes(&fetched.body)?, "write_allowed"))
        }
        _ => Ok(done(Bytes::new(), "write_body_withheld")),
    }
}

/// The id and version of the record a `Location` names (`.../Observation/7/_history/1`).
fn written_id(location: &str, rt: crate::fhir::ResourceType) -> Option<(&str, Option<&str>)> {
    let path = location.split(['?', '#']).next()?;
    let segments: Vec<&str> = path.split('/').collect();
    let at = segments.iter().rposition(|s| *s == rt.as_str())?;
    let id = *segments.get(at + 1)?;
    if !crate::fhir::ResourceId::is_valid(id) {
        return None;
    }
    let version = match (segments.get(at + 2), segments.get(at + 3)) {
        (Some(&"_history"), Some(v)) if crate::fhir::ResourceId::is_valid(v) => Some(*v),
        _ => None,
    };
    Some((id, version))
}

/// Most chunks of a patient-list narrowed search tried for one client request when
/// chunks come back empty; past it the page is empty with a link to the next chunk.
const MAX_CHUNKS_PER_REQUEST: usize = 16;

/// Fetches `out`; for a patient-list narrowed search whose chunk ended without a match
/// on this page, goes on with the first page (`first_page`: the narrowed search) of the
/// next chunks (bounded in number and by the tenant's upstream timeout overall), so
/// clients do not page through empty pages. Returns the answer and the request that
/// produced it.
async fn fetch_chunks<U: FhirServer>(
    upstream: &U,
    tenant: &Tenant,
    out: &OutboundRequest,
    first_page: &OutboundRequest,
    headers: &HeaderMap,
) -> Result<(Fetched, OutboundRequest), UpstreamError> {
    let mut out = out.clone();
    let mut tried = 0;
    // The chunks of one request share the tenant's upstream timeout: once it is spent,
    // the page goes out (empty, with a link to the next chunk).
    let started = std::time::Instant::now();
    loop {
        let fetched = upstream.fetch(tenant, &out, headers).await?;
        tried += 1;
        let Some(n) = out.narrowing.as_mut() else {
            return Ok((fetched, out));
        };
        if !n.has_next_chunk()
            || tried >= MAX_CHUNKS_PER_REQUEST
            || started.elapsed() >= tenant.config.upstream.timeout
            || !fetched.status.is_success()
            || !is_empty_last_page(&fetched.body)
        {
            return Ok((fetched, out));
        }
        let chunk = n.chunk + 1;
        out = OutboundRequest {
            path: first_page.path.clone(),
            params: first_page.params.clone(),
            ..out
        };
        if let Some(n) = out.narrowing.as_mut() {
            n.chunk = chunk;
            n.send = true;
        }
    }
}

/// Whether a searchset Bundle has no entry and no `next` link.
fn is_empty_last_page(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Link {
        relation: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Page {
        #[serde(rename = "resourceType")]
        resource_type: Option<String>,
        #[serde(default)]
        entry: Vec<serde::de::IgnoredAny>,
        #[serde(default)]
        link: Vec<Link>,
    }
    serde_json::from_slice::<Page>(body).is_ok_and(|p| {
        p.resource_type.as_deref() == Some("Bundle")
            && p.entry.is_empty()
            && !p.link.iter().any(|l| l.relation.as_deref() == Some("next"))
    })
}

/// The answer to a search narrowed to no patient.
fn empty_searchset() -> ProxyResponse {
    let mut resp = fhir_json(
        StatusCode::OK,
        Bytes::from_static(br#"{"resourceType":"Bundle","type":"searchset","total":0}"#),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp.extensions_mut()
        .insert(Decision("no_patients_allowed"));
    resp
}
