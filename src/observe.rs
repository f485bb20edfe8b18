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
    let outcome = resp.extensions().get::<Outcome>().copied();
    if let Some(outcome) = &outcome {
        metrics.request(outcome, status.as_u16(), started.elapsed());
    }
    // The outcome only matters to the exported span (the request's log lines are
    // written by now), and recording costs the log formatter a re-encoding of the
    // span's fields: recorded in one go, and only when spans are exported.
    if crate::trace::otlp::counts().is_some() {
        record_outcome(&span, outcome.as_ref(), status);
    }
    resp.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
    resp
}

/// Records the answer on the request span, in one `record_all`.
fn record_outcome(span: &tracing::Span, outcome: Option<&Outcome>, status: http::StatusCode) {
    use tracing::Value;
    let Some(meta) = span.metadata() else {
        return;
    };
    let fields = meta.fields();
    let (Some(tenant), Some(interaction), Some(reason), Some(code), Some(error)) = (
        fields.field("tenant.id"),
        fields.field("fhir.interaction"),
        fields.field("authz.reason"),
        fields.field("http.response.status_code"),
        fields.field("otel.status_code"),
    ) else {
        return;
    };
    let name = outcome.map(|o| metrics::global().tenant_name(o.tenant));
    let tenant_value = name.as_deref();
    let interaction_value = outcome.map(|o| o.interaction);
    let reason_value = outcome.map(|o| o.reason);
    let code_value = status.as_u16();
    let error_value = status.is_server_error().then_some("error");
    let values: [(&tracing::field::Field, Option<&dyn Value>); 5] = [
        (&tenant, tenant_value.as_ref().map(|v| v as &dyn Value)),
        (
            &interaction,
            interaction_value.as_ref().map(|v| v as &dyn Value),
        ),
        (&reason, reason_value.as_ref().map(|v| v as &dyn Value)),
        (&code, Some(&code_value as &dyn Value)),
        (&error, error_value.as_ref().map(|v| v as &dyn Value)),
    ];
    span.record_all(&fields.value_set(&values));
}
