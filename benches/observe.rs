#![allow(clippy::expect_used)]
//! What tracing and metrics cost a request: the outer wrapper (`observe::traced`: trace
//! scope from the headers, the `request` span, the request counted, the request id on
//! the answer) around an empty answer, plus eight stage scopes with their (disabled,
//! `DEBUG`) spans and stage timings, as a request through the whole stack has them. The
//! JSON log formatter runs at `info` into a sink, as the proxy logs by default; no span
//! export. The baseline is the same answer without any of it.

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::Full;
use smart_fhir_proxy::metrics::{self, Outcome, Stage};
use smart_fhir_proxy::observe::traced;
use smart_fhir_proxy::pipeline::ProxyResponse;
use smart_fhir_proxy::trace::in_child_span;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;

fn request() -> Request<()> {
    Request::builder()
        .uri("/demo/Patient/p1")
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .header("x-request-id", "bench-request-1")
        .body(())
        .expect("request")
}

fn answer(outcome: Option<Outcome>) -> ProxyResponse {
    let mut resp = Response::new(Full::new(Bytes::from_static(b"{}")));
    if let Some(o) = outcome {
        resp.extensions_mut().insert(o);
    }
    resp
}

const STAGES: [Stage; 6] = [
    Stage::Token,
    Stage::Scope,
    Stage::Authz,
    Stage::Rewrite,
    Stage::Upstream,
    Stage::Check,
];

fn bench(c: &mut Criterion) {
    let subscriber = tracing_subscriber::registry().with(
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_writer(std::io::sink)
            .with_filter(tracing_subscriber::EnvFilter::new("info")),
    );
    tracing::subscriber::set_global_default(subscriber).expect("subscriber");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let m = metrics::global();
    let tenant = m.register_tenant("demo");
    let outcome = Outcome {
        tenant,
        interaction: "read",
        reason: "allowed",
    };

    c.bench_function("observe/baseline_answer", |b| {
        b.iter(|| {
            let req = request();
            rt.block_on(async move {
                black_box(&req);
                black_box(answer(Some(outcome)))
            })
        })
    });
    c.bench_function("observe/traced_request_with_8_stage_scopes", |b| {
        b.iter(|| {
            rt.block_on(traced(request(), |req| async move {
                black_box(&req);
                for _ in 0..2 {
                    in_child_span(|id| tracing::debug_span!("stage", span.id = %id), async {})
                        .await;
                }
                for stage in STAGES {
                    in_child_span(|id| tracing::debug_span!("stage", span.id = %id), async {})
                        .await;
                    m.stage(tenant, stage, Duration::from_micros(10));
                }
                answer(Some(outcome))
            }))
        })
    });
    c.bench_function("metrics/request_counted", |b| {
        b.iter(|| m.request(black_box(&outcome), 200, Duration::from_micros(150)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
