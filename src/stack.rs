//! THE one place that orders the layers. Read top to bottom: request order.
//!
//! ```text
//! ApplyCors         CORS preflights answered; the tenant's CORS headers on every answer
//! RenderErrors      ProxyError -> OperationOutcome, audit record, WWW-Authenticate
//! LimitRate         rate limit by address for requests no verified token pays for
//! ResolveTenant     stage 0: TenantCtx, the tenant's Checker, FhirRequest
//! ServeDiscovery    /.well-known/smart-configuration, /metadata, /.well-known/udap (no token)
//! ValidateToken     stage 1: VerifiedToken
//! ChargeClient      rate limit by the token's client id
//! ServeBundle       batch/transaction: each entry through the stages below (bundle)
//! CheckScope        stage 2: ScopeGrant
//! Authorize         stage 3: Permit
//! CheckWrite        stage 3, writes: record checks of new and current content -> WritePlan
//! RewriteSearch     stage 4: OutboundRequest (narrowed)
//! Forward           stage 5: upstream call, response checks, URL rewriting
//! ```
//! Every stage but the last is a [`Stage`] (`crate::pipeline`): an async function over
//! the request that either continues (having written its extension) or answers, and
//! fails with its own stage's error. [`StageLayer`] is the single thin tower adapter
//! for all of them; it turns a stage's error into a [`ProxyError`], and runs the stage
//! in a `tracing` span named after it, in a trace scope of its own (`crate::trace`),
//! timing it for `sfp_stage_duration_seconds` ([`StageObs`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::Full;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

use crate::audit::AuditSlot;
use crate::authz::Authorize;
use crate::authz::write::CheckWrite;
use crate::discovery::{Capabilities, ServeDiscovery};
use crate::error::ProxyError;
use crate::fhir::OperationOutcome;
use crate::forward::Forward;
use crate::limits::{ChargeClient, LimitRateLayer, RateLimiter};
use crate::metrics::{self, Outcome, TenantLabel};
use crate::pipeline::{BoxFuture, Decision, FHIR_JSON, Flow, ProxyResponse, Stage};
use crate::registry::{ResolveTenant, TenantRegistry};
use crate::rewrite::RewriteSearch;
use crate::scope::CheckScope;
use crate::tenant::{BodyRefused, TenantCtx, split_tenant};
use crate::token::ValidateToken;
use crate::upstream::Upstream;

mod apply_cors;
pub use apply_cors::{ApplyCors, ApplyCorsLayer};
pub mod bundle;
pub use bundle::{ServeBundle, ServeBundleLayer};

/// How a stage shows in traces and metrics: the `tracing` span it runs in (named after
/// the stage, carrying its span id; see [`stage_obs!`]) and, for the stages the latency
/// histogram covers, its label there. Stage spans are at `DEBUG`: exported over OTLP
/// whenever it is configured, in the logs only when `RUST_LOG` asks for them, and
/// nearly free otherwise (the `request` span, at `INFO`, gives every log line of a
/// request its trace and request id).
#[derive(Clone, Copy)]
pub struct StageObs {
    pub span: fn(crate::trace::SpanId) -> tracing::Span,
    pub metric: Option<metrics::Stage>,
}

/// A [`StageObs`] whose span is named `$name` (a span name must be a literal, so each
/// stage gets its own call site).
macro_rules! stage_obs {
    ($name:literal, $metric:expr) => {
        StageObs {
            span: |id| tracing::debug_span!($name, span.id = %id),
            metric: $metric,
        }
    };
}

impl StageObs {
    /// For a step of the stack that is no pipeline stage (charging the rate limit):
    /// no span, no timing.
    pub const UNTRACED: StageObs = StageObs {
        span: |_| tracing::Span::none(),
        metric: None,
    };
}

/// The tower adapter around a [`Stage`].
pub struct StageLayer<St> {
    stage: Arc<St>,
    obs: StageObs,
}

impl<St> StageLayer<St> {
    pub fn new(stage: St, obs: StageObs) -> Self {
        StageLayer {
            stage: Arc::new(stage),
            obs,
        }
    }
}

impl<St, S> Layer<S> for StageLayer<St> {
    type Service = StageService<St, S>;
    fn layer(&self, inner: S) -> Self::Service {
        StageService {
            stage: Arc::clone(&self.stage),
            obs: self.obs,
            inner,
        }
    }
}

pub struct StageService<St, S> {
    stage: Arc<St>,
    obs: StageObs,
    inner: S,
}

impl<St, S: Clone> Clone for StageService<St, S> {
    fn clone(&self) -> Self {
        StageService {
            stage: Arc::clone(&self.stage),
            obs: self.obs,
            inner: self.inner.clone(),
        }
    }
}

/// The metrics label of the request's tenant, once stage 0 resolved it.
fn tenant_label(req: &Request<Bytes>) -> TenantLabel {
    req.extensions()
        .get::<TenantCtx>()
        .map_or(TenantLabel::NONE, |t| metrics::global().tenant(t.0.id()))
}

impl<St, S> Service<Request<Bytes>> for StageService<St, S>
where
    St: Stage,
    St::Error: Into<ProxyError>,
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

    fn call(&mut self, mut req: Request<Bytes>) -> Self::Future {
        let stage = Arc::clone(&self.stage);
        // The readied service goes into the future; a fresh clone stays for next time.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let obs = self.obs;
        Box::pin(async move {
            let started = Instant::now();
            // The stage alone: later stages run in spans of their own, beside it.
            let flow = crate::trace::in_child_span(obs.span, stage.run(&mut req)).await;
            if let Some(stage) = obs.metric {
                metrics::global().stage(tenant_label(&req), stage, started.elapsed());
            }
            match flow.map_err(Into::into)? {
                Flow::Continue => inner.call(req).await,
                Flow::Respond(resp) => Ok(resp),
            }
        })
    }
}

/// Outermost layer: the one place a `ProxyError` becomes an OperationOutcome, and the
/// one place the audit record is emitted. A request the server refused before the stack
/// ([`BodyRefused`]) is answered here with its error, never passed on.
#[derive(Clone)]
pub struct RenderErrorsLayer {
    registry: Arc<TenantRegistry>,
}

impl RenderErrorsLayer {
    /// `registry` names the tenants a refused request's record may be filed under.
    pub fn new(registry: Arc<TenantRegistry>) -> Self {
        RenderErrorsLayer { registry }
    }
}

impl<S> Layer<S> for RenderErrorsLayer {
    type Service = RenderErrors<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RenderErrors {
            inner,
            registry: Arc::clone(&self.registry),
        }
    }
}

#[derive(Clone)]
pub struct RenderErrors<S> {
    inner: S,
    registry: Arc<TenantRegistry>,
}

/// The audit decision of an answer the stack released: `error` for an upstream error
/// handed to the client as it was (an OperationOutcome with a 4xx/5xx status: nothing
/// was released, but the proxy did not refuse either), else `allow`.
fn released_decision(status: http::StatusCode) -> &'static str {
    if status.is_client_error() || status.is_server_error() {
        "error"
    } else {
        "allow"
    }
}

impl<S> Service<Request<Bytes>> for RenderErrors<S>
where
    S: Service<Request<Bytes>, Response = ProxyResponse, Error = ProxyError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = ProxyResponse;
    type Error = Infallible;
    type Future = BoxFuture<Result<ProxyResponse, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Bytes>) -> Self::Future {
        let audit = AuditSlot::default();
        // The request id as the outermost wrapper settled it (the client's when sane,
        // else a new one); the header itself only where the stack runs without it.
        match crate::trace::current() {
            Some(scope) => audit.set_request_id(scope.request_id()),
            None => {
                if let Some(id) = req
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                {
                    audit.set_request_id(id);
                }
            }
        }
        if let Some(BodyRefused(e)) = req.extensions_mut().remove::<BodyRefused>() {
            let known = split_tenant(req.uri().path())
                .and_then(|(id, _)| self.registry.get(id).map(|r| r.tenant));
            if let Some(tenant) = known {
                audit.set_tenant(tenant.id());
                audit.set_public_base(&tenant.config.public_base);
            }
            let resp = render_error(&ProxyError::Tenant(e), Some(&audit), None);
            return Box::pin(async move { Ok(resp) });
        }
        req.extensions_mut().insert(audit.clone());
        let inner = self.inner.clone();
        Box::pin(async move {
            match inner.oneshot(req).await {
                Ok(mut resp) => {
                    let reason = resp
                        .extensions()
                        .get::<Decision>()
                        .map(|d| d.0)
                        .unwrap_or("allowed");
                    // Read before the record is handed off.
                    let outcome = outcome_of(Some(&audit), reason);
                    let status = resp.status();
                    match audit.emit(status.as_u16(), released_decision(status), reason) {
                        Ok(()) => {
                            resp.extensions_mut().insert(outcome);
                            Ok(resp)
                        }
                        // Not recorded, so not released.
                        Err(e) => {
                            let e = ProxyError::from(e);
                            let mut resp = render_error(&e, None, None);
                            resp.extensions_mut().insert(Outcome {
                                reason: e.reason(),
                                ..outcome
                            });
                            Ok(resp)
                        }
                    }
                }
                Err(e) => Ok(render_error(&e, Some(&audit), None)),
            }
        })
    }
}

/// What the request is counted as: its tenant and interaction as the audit record has
/// them so far, and the reason id.
fn outcome_of(audit: Option<&AuditSlot>, reason: &'static str) -> Outcome {
    let (tenant, interaction) = audit.map_or((TenantLabel::NONE, "-"), |a| {
        a.labels(|tenant, interaction| {
            (
                tenant.map_or(TenantLabel::NONE, |t| metrics::global().tenant(t)),
                interaction.unwrap_or("-"),
            )
        })
    });
    Outcome {
        tenant,
        interaction,
        reason,
    }
}

/// Renders an error as an OperationOutcome response. Used by [`RenderErrors`] and by
/// the server for failures before the stack (e.g. an oversized body). The response
/// carries its [`Outcome`] for the request metrics.
pub fn render_error(
    e: &ProxyError,
    audit: Option<&AuditSlot>,
    realm: Option<&str>,
) -> ProxyResponse {
    let outcome = outcome_of(audit, e.reason());
    let status = e.status();
    // A shed request is logged at debug only: under overload a line each would add to it.
    if status.is_server_error() && !matches!(e, ProxyError::Limit(_)) {
        tracing::warn!(error = ?e, authz.reason = e.reason(), "request failed");
    } else {
        tracing::debug!(error = %e, authz.reason = e.reason(), "request refused");
    }
    if let Some(a) = audit {
        // A refusal goes out whether or not its record could be queued.
        a.emit_refusal(status.as_u16(), e.reason());
    }
    let body =
        OperationOutcome::error(e.issue_code(), e.client_reason(), e.client_message()).to_json();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(FHIR_JSON),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    if let Some(secs) = e.retry_after_secs() {
        h.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if let ProxyError::Request(r) = e
        && let Some(allow) = r.allow()
    {
        h.insert(http::header::ALLOW, HeaderValue::from_static(allow));
    }
    if let Some(v) = e
        .www_authenticate(realm)
        .and_then(|c| HeaderValue::from_str(&c).ok())
    {
        h.insert(http::header::WWW_AUTHENTICATE, v);
    }
    resp.extensions_mut().insert(outcome);
    resp
}

/// A ready-to-serve proxy service.
pub type App = tower::util::BoxCloneSyncService<Request<Bytes>, ProxyResponse, Infallible>;

/// Builds the stack. The order below is the request order.
pub fn build(registry: Arc<TenantRegistry>, shared: Shared) -> App {
    // One CapabilityStatement cache: discovery serves it, the rewrite stage holds
    // restricted searches to the parameters it declares.
    let capabilities = Arc::new(Capabilities::new(shared.upstream.clone()));
    use metrics::Stage as M;
    let svc = ServiceBuilder::new()
        .layer(ApplyCorsLayer::new(Arc::clone(&registry)))
        .layer(RenderErrorsLayer::new(Arc::clone(&registry)))
        .layer(LimitRateLayer::new(shared.rate_limit.clone()))
        .layer(StageLayer::new(
            ResolveTenant::new(registry),
            stage_obs!("tenant", None),
        ))
        .layer(StageLayer::new(
            ServeDiscovery::new(Arc::clone(&capabilities)),
            stage_obs!("discovery", None),
        ))
        .layer(StageLayer::new(
            ValidateToken::new(shared.tokens.clone()),
            stage_obs!("token", Some(M::Token)),
        ))
        .layer(StageLayer::new(
            ChargeClient::new(shared.rate_limit.clone()),
            StageObs::UNTRACED,
        ))
        .layer(ServeBundleLayer::new(
            shared.upstream.clone(),
            shared.max_bundle_entries,
        ))
        .layer(StageLayer::new(
            CheckScope,
            stage_obs!("scope", Some(M::Scope)),
        ))
        .layer(StageLayer::new(
            Authorize::new(shared.upstream.clone()),
            stage_obs!("authz", Some(M::Authz)),
        ))
        .layer(StageLayer::new(
            CheckWrite::new(shared.upstream.clone()),
            stage_obs!("write", None),
        ))
        .layer(StageLayer::new(
            RewriteSearch::new(shared.cursors.clone(), Arc::clone(&capabilities)),
            stage_obs!("rewrite", Some(M::Rewrite)),
        ))
        // Stage 5 has two spans of its own: `upstream` and `check`.
        .service(
            Forward::new(shared.upstream, shared.cursors, capabilities).map_err(ProxyError::from),
        );
    tower::util::BoxCloneSyncService::new(svc)
}

/// Process-wide resources shared by every tenant.
#[derive(Clone)]
pub struct Shared {
    pub tokens: crate::token::SharedVerifier,
    pub upstream: Upstream,
    /// Signs and verifies paging cursors. [`Shared::new`] makes a random key; a
    /// deployment of several instances must set one (`main` does, from the
    /// environment).
    pub cursors: crate::cursor::CursorKey,
    /// Per-client rate limit (`limits`); `None` (the default): off.
    pub rate_limit: Option<Arc<RateLimiter>>,
    /// The most entries a batch or transaction Bundle may have.
    pub max_bundle_entries: usize,
}

impl Shared {
    pub fn new() -> Result<Self, String> {
        let http = crate::fetch::control_client()
            .build()
            .map_err(|e| format!("cannot build http client: {e}"))?;
        Ok(Shared {
            tokens: Arc::new(crate::token::TokenVerifier::new(http.clone())),
            upstream: Upstream::new(http)?,
            cursors: crate::cursor::CursorKey::generate(crate::cursor::DEFAULT_TTL_SECONDS)?,
            rate_limit: None,
            max_bundle_entries: bundle::DEFAULT_MAX_ENTRIES,
        })
    }
}

#[cfg(test)]
mod tests;
