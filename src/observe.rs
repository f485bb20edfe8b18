//! The outermost wrapper of every request on the proxy listener: its trace scope and
//! request id, its `request` span, and the request metrics.
//!
//! Around everything else, the server's own refusals before the stack (an oversized
//! or slow body) included: the trace scope ([`crate::trace::Scope::start`]) is made
//! from the request's `traceparent` and `X-Request-Id`, the request runs inside it and
//! inside the `request` span, and the answer, whatever made it, carries the request
//! id back (`X-Request-Id`). The request is counted here, once: from the
//! [`Outcome`] the answer carries (written where the answer is made: the stack, or
//! `stack::render_error` for the server's refusals). Answers without one (the
//! liveness probe `/_health`) are not requests of any tenant and are not counted.

use std::future::Future;
use std::time::Instant;

use http::Request;
use tracing::Instrument;
use tracing::field::Empty;

use crate::metrics::{self, Outcome};
use crate::pipeline::ProxyResponse;
use crate::trace::{self, Scope, X_REQUEST_ID};

/// Serves `req` with `serve` inside a new trace scope and request span; counts the
/// request and answers with its request id.
pub async fn traced<B, F, Fut>(req: Request<B>, serve: F) -> ProxyResponse
where
    F: FnOnce(Request<B>) -> Fut,
    Fut: Future<Output = ProxyResponse>,
{
    let started = Instant::now();
    let metrics = metrics::global();
    let _in_flight = metrics.in_flight();
    let trace::Started {
        scope,
        remote_parent,
    } = Scope::start(req.headers());
    let span = tracing::info_span!(
        "request",
        trace.id = %scope.trace_id(),
        span.id = %scope.span_id(),
        trace.parent_id = remote_parent.map(tracing::field::display),
        trace.sampled = scope.sampled(),
        request.id = scope.request_id(),
        otel.kind = "server",
        http.request.method = %req.method(),
        tenant.id = Empty,
        fhir.interaction = Empty,
        authz.reason = Empty,
        http.response.status_code = Empty,
        otel.status_code = Empty,
    );
    let request_id = scope.request_id_header();
    let mut resp = trace::within(scope, serve(req))
        .instrument(span.clone())
        .await;
    let status = resp.status();
    if let Some(outcome) = resp.extensions().get::<Outcome>() {
        metrics.request(outcome, status.as_u16(), started.elapsed());
        span.record("tenant.id", &*metrics.tenant_name(outcome.tenant));
        span.record("fhir.interaction", outcome.interaction);
        span.record("authz.reason", outcome.reason);
    }
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "error");
    }
    resp.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
    resp
}
