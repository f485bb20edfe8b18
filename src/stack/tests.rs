#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicUsize, Ordering};

use http::StatusCode;
use http_body_util::BodyExt;

use super::*;
use crate::fhir::CompartmentIndex;
use crate::pipeline::fhir_json;
use crate::tenant::TenantError;

type Inner = tower::util::BoxCloneSyncService<Request<Bytes>, ProxyResponse, ProxyError>;

/// `RenderErrors` in front of a service that answers 200 and counts its calls.
fn render_errors() -> (RenderErrors<Inner>, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let inner =
        tower::util::BoxCloneSyncService::new(tower::service_fn(move |_req: Request<Bytes>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, ProxyError>(fhir_json(StatusCode::OK, Bytes::from_static(b"{}"))) }
        }));
    let compartments = CompartmentIndex::official_shared().unwrap();
    let registry = Arc::new(TenantRegistry::new(Vec::new(), compartments).unwrap());
    (RenderErrorsLayer::new(registry).layer(inner), calls)
}

#[tokio::test]
async fn requests_refused_by_the_server_are_answered_with_their_error_and_go_no_further() {
    for (e, status, reason) in [
        (TenantError::BodyTooLarge, 413, "body_too_large"),
        (TenantError::BodyTimeout, 408, "body_timeout"),
        (TenantError::BodyMalformed, 400, "body_malformed"),
    ] {
        let (mut svc, calls) = render_errors();
        let mut req = Request::post("/t/Observation/_search")
            .body(Bytes::new())
            .unwrap();
        req.extensions_mut().insert(BodyRefused(e));
        let resp = svc.call(req).await.unwrap();
        assert_eq!(resp.status().as_u16(), status);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains(reason), "{text}");
        assert_eq!(
            calls.load(Ordering::SeqCst),
            0,
            "{reason}: reached the stages"
        );
    }
    // Unmarked requests do go on.
    let (mut svc, calls) = render_errors();
    let resp = svc
        .call(Request::get("/t/Patient/p1").body(Bytes::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[test]
fn upstream_errors_passed_through_are_not_audited_as_allowed() {
    assert_eq!(released_decision(StatusCode::OK), "allow");
    assert_eq!(released_decision(StatusCode::NOT_MODIFIED), "allow");
    assert_eq!(released_decision(StatusCode::BAD_REQUEST), "error");
    assert_eq!(released_decision(StatusCode::UNPROCESSABLE_ENTITY), "error");
    assert_eq!(
        released_decision(StatusCode::INTERNAL_SERVER_ERROR),
        "error"
    );
}
