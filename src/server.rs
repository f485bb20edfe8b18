//! The accept loop: hyper 1 over tokio, HTTP/1.1 and HTTP/2, request limits, graceful
//! shutdown. Each request body is read here, bounded, before the stack sees it; an
//! oversized body is refused with 413, one that does not arrive in time with 408 and a
//! broken one (bad chunked encoding) with 400, without reaching any stage: the request
//! goes to the stack without its body, marked [`BodyRefused`], and the stack's
//! outermost layer answers it with the error and audits it. A connection that has not
//! sent a whole request head within the header timeout is closed; a head larger than
//! [`Limits::max_header_bytes`] or with more than [`Limits::max_headers`] lines is
//! refused by hyper with 431.
//!
//! Load shedding: at most [`Limits::max_concurrent_requests`] requests are handled at
//! once; one more is answered at once with 503 `overloaded` and `Retry-After: 1`
//! (audited like every refusal), never queued.
//!
//! Shutdown: once `shutdown` resolves the listener is closed (new connections are
//! refused), idle connections are closed, and requests in flight may finish within the
//! drain time; then the remaining connections are dropped.
//!
//! With a certificate ([`serve_tls`], module [`tls`]) the listener speaks HTTPS only;
//! the TLS handshake counts against the same header timeout.

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
use tokio::sync::{Notify, Semaphore};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::audit::AuditSlot;
use crate::error::ProxyError;
use crate::limits::{LimitError, client_addr};
use crate::pipeline::{ClientAddr, ProxyResponse};
use crate::stack::{App, render_error};
use crate::tenant::{BodyRefused, TenantError};

pub mod tls;

/// The smallest request-head limit hyper takes (its initial read buffer).
pub const MIN_HEADER_BYTES: usize = 8192;

/// hyper's own default for the HTTP/1 read buffer: about 400 KB of request head.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 8192 + 4096 * 100;

/// Server-wide limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    /// Most header lines in a request head (HTTP/1); 431 beyond.
    pub max_headers: usize,
    /// Largest request head in bytes: HTTP/1's read buffer (the request line and
    /// headers must fit), HTTP/2's header list; 431 beyond. At least
    /// [`MIN_HEADER_BYTES`].
    pub max_header_bytes: usize,
    /// Requests handled at once; one more is answered 503 at once.
    pub max_concurrent_requests: usize,
    /// Proxies in front whose `X-Forwarded-For` entries are believed (0: none, the
    /// peer's address is the client's).
    pub trust_forwarded_for: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 1024 * 1024,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_headers: 100,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_concurrent_requests: 1024,
            trust_forwarded_for: 0,
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
    serve_on(listener, None, app, limits, shutdown, drain).await;
}

/// [`serve`] over TLS: every connection is HTTPS, with the certificate `tls` serves
/// at the time of its handshake.
pub async fn serve_tls(
    listener: TcpListener,
    tls: &tls::ServerTls,
    app: App,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    serve_on(listener, Some(tls.acceptor()), app, limits, shutdown, drain).await;
}

async fn serve_on(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    app: App,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let max_header_bytes = limits.max_header_bytes.max(MIN_HEADER_BYTES);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(limits.max_headers)
        .max_buf_size(max_header_bytes);
    builder
        .http2()
        .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX));
    let in_flight = Arc::new(Semaphore::new(
        limits
            .max_concurrent_requests
            .clamp(1, Semaphore::MAX_PERMITS),
    ));
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
        let in_flight = Arc::clone(&in_flight);
        let first_request = Arc::new(Notify::new());
        let started = Arc::clone(&first_request);
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            started.notify_one();
            let app = app.clone();
            let in_flight = Arc::clone(&in_flight);
            async move { Ok::<_, Infallible>(handle(app, req, limits, peer, &in_flight).await) }
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let acceptor = acceptor.clone();
        let head_deadline = tokio::time::Instant::now() + limits.header_read_timeout;
        tokio::spawn(async move {
            let io = match acceptor {
                None => tls::Conn::Plain(stream),
                // A peer that stalls in the handshake is dropped like one that sends
                // no request head.
                Some(acceptor) => {
                    match tokio::time::timeout_at(head_deadline, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => tls::Conn::Tls(Box::new(s)),
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "tls handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(
                                "no tls handshake within the header timeout: connection closed"
                            );
                            return;
                        }
                    }
                }
            };
            let conn = builder.serve_connection(TokioIo::new(io), svc);
            let conn = watcher.watch(conn.into_owned());
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
                () = tokio::time::sleep_until(head_deadline) => {
                    tracing::debug!("no request head within the header timeout: connection closed");
                    return;
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with error");
            }
        });
    }
    // New connections are refused from here on, not left waiting in the backlog.
    drop(listener);
    tracing::info!(
        shutdown.grace_seconds = drain.as_secs_f64(),
        "shutting down: no longer accepting; draining requests in flight"
    );
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("drained: every connection closed"),
        () = tokio::time::sleep(drain) => tracing::warn!("drain timeout; closing remaining connections"),
    }
}

/// Every request, in its trace scope and request span, counted (`crate::observe`).
async fn handle(
    app: App,
    req: Request<Incoming>,
    limits: Limits,
    peer: SocketAddr,
    in_flight: &Arc<Semaphore>,
) -> ProxyResponse {
    crate::observe::traced(req, |req| handle_request(app, req, limits, peer, in_flight)).await
}

async fn handle_request(
    app: App,
    req: Request<Incoming>,
    limits: Limits,
    peer: SocketAddr,
    in_flight: &Arc<Semaphore>,
) -> ProxyResponse {
    let path = req.uri().path();
    if path == "/_health" {
        let mut r = Response::new(Full::new(Bytes::from_static(b"ok")));
        *r.status_mut() = StatusCode::OK;
        return r;
    }
    // Held until the answer is made (bodies are whole by then).
    let Ok(_permit) = Arc::clone(in_flight).try_acquire_owned() else {
        return render_error(
            &ProxyError::Limit(LimitError::Overloaded),
            Some(&AuditSlot::default()),
            None,
        );
    };
    let (mut parts, body) = req.into_parts();
    let client = client_addr(peer.ip(), &parts.headers, limits.trust_forwarded_for);
    parts.extensions.insert(ClientAddr(client));
    // Only POST (`_search`, operations, create), PUT (update) and PATCH carry a body the
    // proxy uses; other methods' bodies are never buffered (hyper discards them, closing
    // the connection if needed).
    if !matches!(
        parts.method,
        http::Method::POST | http::Method::PUT | http::Method::PATCH
    ) {
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
    let read = if too_large {
        drop(body);
        Err(TenantError::BodyTooLarge)
    } else {
        read_body(body, &limits).await
    };
    let req = match read {
        Ok(bytes) => Request::from_parts(parts, bytes),
        // Answered (and audited) by the stack's outermost layer, without the body.
        Err(e) => {
            let mut req = Request::from_parts(parts, Bytes::new());
            req.extensions_mut().insert(BodyRefused(e));
            req
        }
    };
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
