//! The resolved tenant: what stage 0 hands every later stage.
//!
//! Stage 0 (`registry::ResolveTenant`) selects the tenant from the first path segment
//! and writes [`TenantCtx`]; downstream stages read it with [`tenant_of`] and never
//! look at the raw URL again. A request keeps the `Arc<Tenant>` it resolved, so a
//! reload never changes a request half-way.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode};

use crate::config::TenantConfig;
use crate::pipeline::{Internal, ext};

/// One configured tenant. The per-tenant state of a stage (authz's `Checker`) is built
/// next to it by the registry and handed to requests as an extension of its own.
#[derive(Debug)]
pub struct Tenant {
    pub config: TenantConfig,
    /// Which configuration snapshot this tenant came from (unique per load), so caches
    /// keyed by it never outlive a reload.
    pub generation: u64,
}

impl Tenant {
    pub fn id(&self) -> &str {
        &self.config.id
    }
}

/// The tenant a request resolved to (written by stage 0 only).
#[derive(Clone, Debug)]
pub struct TenantCtx(pub Arc<Tenant>);

/// The tenant of a request (written by stage 0).
pub fn tenant_of(req: &Request<Bytes>) -> Result<&TenantCtx, Internal> {
    ext::<TenantCtx>(req, "missing TenantCtx")
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum TenantError {
    #[error("unknown tenant")]
    Unknown,
    #[error("request body is too large")]
    BodyTooLarge,
    #[error("request body was not received in time")]
    BodyTimeout,
    #[error("request body is malformed")]
    BodyMalformed,
    #[error("`_search` bodies must be `application/x-www-form-urlencoded`")]
    UnsupportedMediaType,
}

impl TenantError {
    pub fn status(&self) -> StatusCode {
        match self {
            TenantError::Unknown => StatusCode::NOT_FOUND,
            TenantError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            TenantError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            TenantError::BodyMalformed => StatusCode::BAD_REQUEST,
            TenantError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        }
    }
    pub fn reason(&self) -> &'static str {
        match self {
            TenantError::Unknown => "tenant_unknown",
            TenantError::BodyTooLarge => "body_too_large",
            TenantError::BodyTimeout => "body_timeout",
            TenantError::BodyMalformed => "body_malformed",
            TenantError::UnsupportedMediaType => "unsupported_media_type",
        }
    }
}

/// A request the server refused before the stack (its body too large, too slow or
/// malformed): it reaches the stack without its body, carrying the error, so that the
/// refusal is rendered and audited in the one place that does so. The outermost layer
/// answers it with the error and never lets it reach a stage.
#[derive(Debug, Clone)]
pub struct BodyRefused(pub TenantError);

/// Splits `/{tenant}/{rest}` into the tenant id and the raw rest (`""` or `/...`).
pub fn split_tenant(path: &str) -> Option<(&str, &str)> {
    let path = path.strip_prefix('/')?;
    let (id, rest) = match path.find('/') {
        Some(i) => (&path[..i], &path[i..]),
        None => (path, ""),
    };
    (!id.is_empty()).then_some((id, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split() {
        assert_eq!(
            split_tenant("/demo/Patient/1"),
            Some(("demo", "/Patient/1"))
        );
        assert_eq!(split_tenant("/demo"), Some(("demo", "")));
        assert_eq!(split_tenant("/demo/"), Some(("demo", "/")));
        assert_eq!(split_tenant("/"), None);
        assert_eq!(split_tenant("//Patient"), None);
        assert_eq!(split_tenant(""), None);
    }
}
