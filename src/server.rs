//! The accept loop: hyper 1 over tokio, HTTP/1.1 and HTTP/2, request limits, graceful
//! shutdown. Each request body is read here, bounded, before the stack sees it; an
//! oversized body is refused with 413, one that does not arrive in time with 408 and a
//! broken one (bad chunked encoding) with 400, without reaching any stage. A connection
//! that has not sent a whole request head within the header timeout is closed.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tower::ServiceExt;

use crate::error::ProxyError;
use crate::pipeline::ProxyResponse;
use crate::stack::{App, render_error};
use crate::tenant::TenantError;

/// Server-wide limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 1024 * 1024,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_headers: 100,
        }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains open connections
/// (bounded by `drain`).
pub async fn serve(
    listener: TcpListener,
    app: App,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(limits.max_headers);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let first_request = Arc::new(Notify::new());
        let started = Arc::clone(&first_request);
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            started.notify_one();
            let app = app.clone();
            async move { Ok::<_, Infallible>(handle(app, req, limits, peer).await) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            // hyper's header timeout runs only once the protocol is known, i.e. after the
            // first bytes of an HTTP/1 request, and HTTP/2 has none: a connection that
            // sends nothing, part of the HTTP/2 preface, or only a preface would be held
            // forever. Until its first request head is complete it gets the header
            // timeout here; dropping it closes the socket. (After a first request an
            // idle HTTP/2 connection is still kept: hyper has no idle timeout for it.)
            let result = tokio::select! {
                result = conn.as_mut() => result,
                () = first_request.notified() => conn.await,
                () = tokio::time::sleep(limits.header_read_timeout) => {
                    tracing::debug!("no request head within the header timeout: connection closed");
                    return;
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with error");
            }
        });
    }
    tracing::info!("shutting down: draining connections");
    tokio::select! {
        () = graceful.shutdown() => {},
        () = tokio::time::sleep(drain) => tracing::warn!("drain timeout; closing remaining connections"),
    }
}

/// Every request, in its trace scope and request span, counted (`crate::observe`).
async fn handle(
    app: App,
    req: Request<Incoming>,
    limits: Limits,
    peer: SocketAddr,
) -> ProxyResponse {
    crate::observe::traced(req, |req| handle_request(app, req, limits, peer)).await
}

async fn handle_request(
    app: App,
    req: Request<Incoming>,
    limits: Limits,
    _peer: SocketAddr,
) -> ProxyResponse {
    let path = req.uri().path();
    if path == "/_health" {
        let mut r = Response::new(Full::new(Bytes::from_static(b"ok")));
        *r.status_mut() = StatusCode::OK;
        return r;
    }
    let (parts, body) = req.into_parts();
    // Only POST (`_search`, operations) carries a body the proxy uses; other methods'
    // bodies are never buffered (hyper discards them, closing the connection if needed).
    if parts.method != http::Method::POST {
        drop(body);
        let req = Request::from_parts(parts, Bytes::new());
        return match app.oneshot(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
    }
    let too_large = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > limits.max_body_bytes as u64);
    if too_large {
        return render_error(&ProxyError::Tenant(TenantError::BodyTooLarge), None, None);
    }
    let bytes = match read_body(body, &limits).await {
        Ok(bytes) => bytes,
        Err(e) => return render_error(&ProxyError::Tenant(e), None, None),
    };
    let req = Request::from_parts(parts, bytes);
    match app.oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

/// The whole request body, at most `max_body_bytes` of it, read within
/// `body_read_timeout`. Each failure has its own answer: too large (413), too slow
/// (408), or not a well-formed body (400: broken chunked encoding, a connection that
/// ended early).
async fn read_body<B>(body: B, limits: &Limits) -> Result<Bytes, TenantError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let collected = tokio::time::timeout(
        limits.body_read_timeout,
        Limited::new(body, limits.max_body_bytes).collect(),
    )
    .await;
    match collected {
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(TenantError::BodyTooLarge)
        }
        Ok(Err(_)) => Err(TenantError::BodyMalformed),
        Err(_) => Err(TenantError::BodyTimeout),
    }
}

#[cfg(test)]
mod tests;
