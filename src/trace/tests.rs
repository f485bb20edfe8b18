#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

#[test]
fn valid_traceparents_are_read() {
    let tp = parse_traceparent(&format!("00-{TRACE}-{PARENT}-01")).unwrap();
    assert_eq!(tp.trace_id.to_string(), TRACE);
    assert_eq!(tp.parent_id.to_string(), PARENT);
    assert!(tp.sampled());
    let tp = parse_traceparent(&format!("00-{TRACE}-{PARENT}-00")).unwrap();
    assert!(!tp.sampled());
    // A later version: the first four fields are read, the rest ignored.
    let tp = parse_traceparent(&format!("01-{TRACE}-{PARENT}-03-what-comes-next")).unwrap();
    assert!(tp.sampled());
    assert!(parse_traceparent(&format!("cc-{TRACE}-{PARENT}-01")).is_some());
}

#[test]
fn malformed_traceparents_are_refused() {
    let zero_trace = "0".repeat(32);
    let zero_span = "0".repeat(16);
    let upper = TRACE.to_uppercase();
    let cases = [
        String::new(),
        "garbage".to_owned(),
        format!("00-{TRACE}-{PARENT}"),
        format!("00-{TRACE}-{PARENT}-01-"),
        format!("00-{TRACE}-{PARENT}-01x"),
        format!("ff-{TRACE}-{PARENT}-01"),
        format!("0g-{TRACE}-{PARENT}-01"),
        format!("00-{zero_trace}-{PARENT}-01"),
        format!("00-{TRACE}-{zero_span}-01"),
        format!("00-{upper}-{PARENT}-01"),
        format!("00-{TRACE}-{}-01", PARENT.to_uppercase()),
        format!("00-{TRACE}-{PARENT}-0G"),
        format!("00-{TRACE}-{PARENT}-1"),
        format!("00_{TRACE}_{PARENT}_01"),
        format!("01-{TRACE}-{PARENT}-01x"),
        format!(" 00-{TRACE}-{PARENT}-01"),
        format!("00-{}-{PARENT}-01", &TRACE[..31]),
        format!("00-{TRACE}-{}-01", "z".repeat(16)),
    ];
    for case in cases {
        assert_eq!(parse_traceparent(&case), None, "{case:?}");
    }
}

#[test]
fn a_request_continues_the_callers_trace() {
    let started = Scope::start(&headers(&[
        ("traceparent", &format!("00-{TRACE}-{PARENT}-01")),
        ("tracestate", "vendor=abc"),
        ("tracestate", "other=1"),
        ("x-request-id", "req-42"),
    ]));
    let s = &started.scope;
    assert_eq!(s.trace_id().to_string(), TRACE);
    assert_eq!(started.remote_parent.unwrap().to_string(), PARENT);
    assert_ne!(s.span_id().to_string(), PARENT);
    assert!(s.sampled());
    assert_eq!(s.request_id(), "req-42");
    let tp = s.traceparent();
    let tp = tp.to_str().unwrap();
    assert_eq!(tp, format!("00-{TRACE}-{}-01", s.span_id()));
    assert_eq!(parse_traceparent(tp).unwrap().parent_id, s.span_id());
    assert_eq!(s.tracestate().unwrap(), "vendor=abc,other=1");
    let out = s.outbound_headers(true);
    let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["traceparent", "tracestate", "x-request-id"]);
    assert_eq!(s.outbound_headers(false).len(), 2);
    // A child: same trace and request, a span of its own.
    let child = s.child();
    assert_eq!(child.trace_id(), s.trace_id());
    assert_ne!(child.span_id(), s.span_id());
    assert_eq!(child.request_id(), "req-42");
}

#[test]
fn an_unsampled_caller_is_not_recorded() {
    let s = Scope::start(&headers(&[(
        "traceparent",
        &format!("00-{TRACE}-{PARENT}-00"),
    )]))
    .scope;
    assert!(!s.sampled());
    assert!(s.traceparent().to_str().unwrap().ends_with("-00"));
}

#[test]
fn a_malformed_or_repeated_traceparent_starts_a_new_trace() {
    for h in [
        headers(&[("traceparent", "00-garbage"), ("tracestate", "a=b")]),
        headers(&[
            ("traceparent", &format!("00-{TRACE}-{PARENT}-01")),
            ("traceparent", &format!("00-{TRACE}-{PARENT}-01")),
        ]),
        headers(&[]),
    ] {
        let started = Scope::start(&h);
        let s = started.scope;
        assert_ne!(s.trace_id().to_string(), TRACE);
        assert_eq!(started.remote_parent, None);
        assert!(s.sampled());
        assert!(
            s.tracestate().is_none(),
            "no tracestate without a traceparent"
        );
        assert!(parse_traceparent(s.traceparent().to_str().unwrap()).is_some());
    }
    // Two new traces are two traces.
    let a = Scope::start(&headers(&[])).scope;
    let b = Scope::start(&headers(&[])).scope;
    assert_ne!(a.trace_id(), b.trace_id());
    assert_ne!(a.request_id(), b.request_id());
}

#[test]
fn oversized_or_unprintable_tracestate_is_dropped() {
    let tp = format!("00-{TRACE}-{PARENT}-01");
    let long = format!("a={}", "x".repeat(MAX_TRACESTATE_LEN));
    let s = Scope::start(&headers(&[("traceparent", &tp), ("tracestate", &long)])).scope;
    assert!(s.tracestate().is_none());
    let mut h = headers(&[("traceparent", &tp)]);
    h.append(&TRACESTATE, HeaderValue::from_bytes(b"a=\xff").unwrap());
    assert!(Scope::start(&h).scope.tracestate().is_none());
}

#[test]
fn request_ids_are_kept_only_when_sane() {
    for ok in [
        "a",
        "req-42",
        "0f8fad5b-d9cb-469f-a165-70867728950e",
        "01ARZ3NDEKTSV4RRFFQ69G5FAV",
        "Root=1-5759e988-bd862e3fe1be46a994272793",
        "abc+/=@:._",
        &"x".repeat(MAX_REQUEST_ID_LEN),
    ] {
        assert!(sane_request_id(ok), "{ok}");
    }
    for bad in [
        "",
        "has space",
        "quote\"",
        "semi;colon",
        "comma,list",
        "new\nline",
        "ünicode",
        "<script>",
        &"x".repeat(MAX_REQUEST_ID_LEN + 1),
    ] {
        assert!(!sane_request_id(bad), "{bad:?}");
    }
    let s = Scope::start(&headers(&[("x-request-id", "has space")])).scope;
    assert_ne!(s.request_id(), "has space");
    assert!(sane_request_id(s.request_id()));
    let s = Scope::start(&headers(&[("x-request-id", "a"), ("x-request-id", "b")])).scope;
    assert!(s.request_id() != "a" && s.request_id() != "b");
}

#[test]
fn new_request_ids_are_version_4_uuids() {
    let id = new_request_id();
    assert_eq!(id.len(), 36);
    let parts: Vec<&str> = id.split('-').collect();
    assert_eq!(
        parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
        [8, 4, 4, 4, 12]
    );
    assert!(parts[2].starts_with('4'), "{id}");
    assert!(matches!(&parts[3][..1], "8" | "9" | "a" | "b"), "{id}");
    assert!(sane_request_id(&id));
}

#[tokio::test]
async fn the_scope_follows_the_request_and_children_nest() {
    assert!(current().is_none());
    let root = Scope::start(&HeaderMap::new()).scope;
    let root_span = root.span_id();
    let (inner, spawned) = within(root.clone(), async {
        let inner = in_child_span(|id| tracing::info_span!("child", span.id = %id), async {
            current().unwrap()
        })
        .await;
        // A spawned task sees the scope only when bound to it.
        let bound = tokio::spawn(bind_current(async { current() }));
        let unbound = tokio::spawn(async { current() });
        (
            inner,
            (bound.await.unwrap(), unbound.await.unwrap().is_none()),
        )
    })
    .await;
    assert_eq!(inner.trace_id(), root.trace_id());
    assert_ne!(inner.span_id(), root_span);
    assert_eq!(spawned.0.unwrap().span_id(), root_span);
    assert!(spawned.1);
    assert!(current().is_none());
}
