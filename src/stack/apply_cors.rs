//! The outermost layer: CORS (`crate::cors`) around every answer of a tenant.
//!
//! It resolves the tenant from the path itself, since it runs before stage 0 and around
//! the answers stage 0 refuses. A preflight of a known tenant is answered here and goes
//! no further (stage 0 would refuse `OPTIONS`); its refusal is rendered like any other
//! error, without CORS headers. Every other answer, error or not, gets the tenant's CORS
//! headers on the way out. Requests to unknown tenants pass untouched.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::{Layer, Service, ServiceExt};

use crate::cors;
use crate::error::ProxyError;
use crate::pipeline::{BoxFuture, ProxyResponse};
use crate::registry::TenantRegistry;
use crate::tenant::split_tenant;

use super::render_error;

#[derive(Clone)]
pub struct ApplyCorsLayer {
    registry: Arc<TenantRegistry>,
}

impl ApplyCorsLayer {
    pub fn new(registry: Arc<TenantRegistry>) -> Self {
        ApplyCorsLayer { registry }
    }
}

impl<S> Layer<S> for ApplyCorsLayer {
    type Service = ApplyCors<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ApplyCors {
            registry: Arc::clone(&self.registry),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct ApplyCors<S> {
    registry: Arc<TenantRegistry>,
    inner: S,
}

impl<S> Service<Request<Bytes>> for ApplyCors<S>
where
    S: Service<Request<Bytes>, Response = ProxyResponse, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = ProxyResponse;
    type Error = Infallible;
    type Future = BoxFuture<Result<ProxyResponse, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let resolved = split_tenant(req.uri().path()).and_then(|(id, _)| self.registry.get(id));
        let inner = self.inner.clone();
        Box::pin(async move {
            let Some(resolved) = resolved else {
                return inner.oneshot(req).await;
            };
            let cfg = resolved.tenant.config.cors.as_ref();
            if cors::is_preflight(req.method(), req.headers()) {
                let origin = req
                    .headers()
                    .get(http::header::ORIGIN)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                return Ok(match cors::check_preflight(cfg, req.headers()) {
                    Ok(headers) => {
                        tracing::info!(
                            tenant.id = %resolved.tenant.id(),
                            cors.origin = %origin,
                            cors.decision = "allow",
                            "cors preflight"
                        );
                        let mut resp = Response::new(Full::new(Bytes::new()));
                        *resp.status_mut() = StatusCode::NO_CONTENT;
                        *resp.headers_mut() = headers;
                        resp
                    }
                    Err(e) => {
                        tracing::info!(
                            tenant.id = %resolved.tenant.id(),
                            cors.origin = %origin,
                            cors.decision = "deny",
                            cors.reason = e.reason(),
                            "cors preflight"
                        );
                        render_error(&ProxyError::Cors(e), None, None)
                    }
                });
            }
            let origin = cors::origin(req.headers()).cloned();
            let mut resp = inner.oneshot(req).await?;
            cors::decorate(cfg, origin.as_ref(), resp.headers_mut());
            Ok(resp)
        })
    }
}
