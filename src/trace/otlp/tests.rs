#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use tracing_subscriber::layer::SubscriberExt;

fn config(endpoint: &str) -> OtlpConfig {
    OtlpConfig {
        endpoint: url::Url::parse(endpoint).unwrap(),
        service_name: "svc".into(),
    }
}

#[test]
fn spans_go_to_v1_traces_under_the_endpoint() {
    for (endpoint, url) in [
        ("http://collector:4318", "http://collector:4318/v1/traces"),
        ("http://collector:4318/", "http://collector:4318/v1/traces"),
        ("https://c.example/otlp", "https://c.example/otlp/v1/traces"),
        (
            "https://c.example/otlp/",
            "https://c.example/otlp/v1/traces",
        ),
    ] {
        assert_eq!(config(endpoint).traces_url().as_str(), url);
    }
}

/// Runs `f` under a subscriber with only the layer (behind its filter) and returns
/// the spans it recorded.
fn recorded(f: impl FnOnce()) -> Vec<FinishedSpan> {
    let (tx, rx) = std::sync::mpsc::sync_channel(64);
    let subscriber = tracing_subscriber::registry().with(tracing_subscriber::Layer::with_filter(
        OtlpLayer::to_channel(tx),
        OtlpLayer::filter(),
    ));
    tracing::subscriber::with_default(subscriber, f);
    rx.try_iter().collect()
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

#[test]
fn a_request_span_and_its_stage_spans_form_one_trace() {
    let spans = recorded(|| {
        let root = tracing::info_span!(
            "request",
            trace.id = TRACE,
            span.id = "00000000000000a1",
            trace.parent_id = Some(tracing::field::display("00f067aa0ba902b7")),
            trace.sampled = true,
            otel.kind = "server",
            tenant.id = "demo",
            http.response.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        root.in_scope(|| {
            // A span the layer does not record (no span.id) is passed over.
            let other = tracing::info_span!("untracked");
            other.in_scope(|| {
                let stage = tracing::info_span!(
                    "upstream",
                    span.id = %SpanId(0xb2),
                    otel.kind = "client"
                );
                stage.in_scope(|| {});
            });
        });
        root.record("http.response.status_code", 502u64);
        root.record("otel.status_code", "error");
    });
    assert_eq!(spans.len(), 2, "{spans:?}");
    let (stage, root) = (&spans[0], &spans[1]);
    assert_eq!(stage.name, "upstream");
    assert_eq!(stage.trace_id.to_string(), TRACE);
    assert_eq!(stage.span_id, SpanId(0xb2));
    assert_eq!(stage.parent_id, Some(SpanId(0xa1)));
    assert_eq!(stage.kind, Kind::Client);
    assert!(!stage.error);
    assert_eq!(root.name, "request");
    assert_eq!(root.span_id, SpanId(0xa1));
    assert_eq!(root.parent_id, SpanId::parse("00f067aa0ba902b7"));
    assert_eq!(root.kind, Kind::Server);
    assert!(root.error);
    assert!(root.start <= stage.start && stage.end <= root.end);
    assert_eq!(
        root.attributes,
        [
            ("tenant.id", AttrValue::Str("demo".into())),
            ("http.response.status_code", AttrValue::Int(502)),
        ]
    );
}

#[test]
fn unsampled_traces_and_spans_outside_a_request_are_not_recorded() {
    let spans = recorded(|| {
        let root = tracing::info_span!(
            "request",
            trace.id = TRACE,
            span.id = "00000000000000a1",
            trace.sampled = false,
        );
        root.in_scope(|| {
            tracing::info_span!("token", span.id = "00000000000000a2").in_scope(|| {});
        });
        // A stage span with no request span above it.
        tracing::info_span!("token", span.id = "00000000000000a3").in_scope(|| {});
        // A request span whose ids are not ids.
        tracing::info_span!("request", trace.id = "nope", span.id = "00000000000000a4")
            .in_scope(|| {});
    });
    assert!(spans.is_empty(), "{spans:?}");
}

#[test]
fn the_export_request_is_otlp_json() {
    let start = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
    let spans = [FinishedSpan {
        trace_id: TraceId::parse(TRACE).unwrap(),
        span_id: SpanId(0xb2),
        parent_id: Some(SpanId(0xa1)),
        name: "upstream",
        kind: Kind::Client,
        start,
        end: start + Duration::from_millis(2),
        attributes: vec![
            ("tenant.id", AttrValue::Str("demo".into())),
            ("http.response.status_code", AttrValue::Int(200)),
            ("cached", AttrValue::Bool(false)),
        ],
        error: false,
    }];
    let resource =
        json!({"attributes": [attribute("service.name", &AttrValue::Str("svc".into()))]});
    let body: Value = serde_json::from_slice(&encode(&resource, &spans)).unwrap();
    let rs = &body["resourceSpans"][0];
    assert_eq!(
        rs["resource"]["attributes"][0],
        json!({"key": "service.name", "value": {"stringValue": "svc"}})
    );
    assert_eq!(rs["scopeSpans"][0]["scope"]["name"], "smart-fhir-proxy");
    let span = &rs["scopeSpans"][0]["spans"][0];
    assert_eq!(span["traceId"], TRACE);
    assert_eq!(span["spanId"], "00000000000000b2");
    assert_eq!(span["parentSpanId"], "00000000000000a1");
    assert_eq!(span["name"], "upstream");
    assert_eq!(span["kind"], 3);
    assert_eq!(span["startTimeUnixNano"], "1700000000123456789");
    assert_eq!(span["endTimeUnixNano"], "1700000000125456789");
    assert_eq!(
        span["attributes"],
        json!([
            {"key": "tenant.id", "value": {"stringValue": "demo"}},
            {"key": "http.response.status_code", "value": {"intValue": "200"}},
            {"key": "cached", "value": {"boolValue": false}},
        ])
    );
    assert_eq!(span["status"], json!({}));
}
