//! The accept loop: hyper 1 over tokio, HTTP/1.1 and HTTP/2, request limits, graceful
//! shutdown. Each request body is read here, bounded, before the stack sees it; an
//! oversized body is refused with 413 without reaching any stage.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
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
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let app = app.clone();
            async move { Ok::<_, Infallible>(handle(app, req, limits, peer).await) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
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

async fn handle(
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
    let collected = tokio::time::timeout(
        limits.body_read_timeout,
        Limited::new(body, limits.max_body_bytes).collect(),
    )
    .await;
    let bytes = match collected {
        Ok(Ok(c)) => c.to_bytes(),
        Ok(Err(_)) | Err(_) => {
            return render_error(&ProxyError::Tenant(TenantError::BodyTooLarge), None, None);
        }
    };
    let req = Request::from_parts(parts, bytes);
    match app.oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}
