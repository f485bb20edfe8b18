//! The pipeline model: what every stage implements and hands on.
//!
//! A stage is an async function over the request ([`Stage`]) that either continues,
//! having written its result as a typed request extension, or answers ([`Flow`]). It
//! fails with an error of its own (`Stage::Error`); the stack turns that into a
//! `ProxyError` (module `error`), which only the outermost layer renders. Stages read
//! the extensions of earlier stages with [`ext`]; a missing one is [`Internal`], a
//! broken invariant, never a silent pass.
//!
//! Nothing here knows any stage: the order of the stages is written once, in
//! `stack`.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;

pub type ProxyBody = Full<Bytes>;
pub type ProxyResponse = Response<ProxyBody>;
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

pub const FHIR_JSON: &str = "application/fhir+json";

/// What a stage decided.
pub enum Flow {
    /// Go on to the next stage.
    Continue,
    /// Answer now (discovery).
    Respond(ProxyResponse),
}

/// One pipeline stage.
pub trait Stage: Send + Sync + 'static {
    /// What the stage fails with: an error enum of its own stage.
    type Error;

    fn run(
        &self,
        req: &mut Request<Bytes>,
    ) -> impl Future<Output = Result<Flow, Self::Error>> + Send;
}

/// A broken invariant inside the proxy (e.g. a stage's extension is missing). Never a
/// silent pass: the request fails with 500.
#[derive(Clone, Copy, Debug, thiserror::Error)]
#[error("internal error")]
pub struct Internal(pub &'static str);

/// Reads a stage's extension; a missing one is a broken invariant, never a pass.
pub fn ext<'a, T: Send + Sync + 'static>(
    req: &'a Request<Bytes>,
    what: &'static str,
) -> Result<&'a T, Internal> {
    req.extensions().get::<T>().ok_or(Internal(what))
}

/// Written on a transaction entry's sub-request (by the stack's bundle layer): every
/// stage runs and decides as for a request of its own, but nothing is sent upstream;
/// the forwarding stage answers with what it would have sent (`forward::Prepared`).
#[derive(Clone, Copy, Debug)]
pub struct PrepareOnly;

/// Reason id attached to successful responses for the audit record.
#[derive(Clone, Copy, Debug)]
pub struct Decision(pub &'static str);

/// A plain JSON response with the FHIR media type.
pub fn fhir_json(status: StatusCode, body: Bytes) -> ProxyResponse {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(FHIR_JSON),
    );
    resp
}

/// The address of the client a request came from: the peer's, or with trusted
/// proxies in front, the one they forwarded (written by the server, before any stage).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub std::net::IpAddr);
