//! Stage 0: tenant resolution and request parsing.
//!
//! The first path segment selects a tenant from the current configuration snapshot;
//! the rest of the path, the query and (for `POST _search`) the form body are parsed
//! once into a [`FhirRequest`]. Downstream stages read `TenantCtx` and `FhirRequest`
//! from the request extensions and never look at the raw URL again.
//!
//! The snapshot is an `ArcSwap`: a reload replaces it atomically, and each request keeps
//! the `Arc<Tenant>` it resolved, so a reload never changes a request half-way.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, StatusCode};

use crate::audit::AuditSlot;
use crate::authz::Checker;
use crate::config::{self, ConfigError, TenantConfig};
use crate::error::ProxyError;
use crate::fhir::CompartmentIndex;
use crate::fhir::{FhirRequest, parse_request};
use crate::pipeline::{Flow, Internal, Stage, ext};

/// One configured tenant with its runtime parts.
#[derive(Debug)]
pub struct Tenant {
    pub config: TenantConfig,
    pub checker: Checker,
    /// Which configuration snapshot this tenant came from (unique per load), so caches
    /// keyed by it never outlive a reload.
    pub generation: u64,
}

impl Tenant {
    pub fn id(&self) -> &str {
        &self.config.id
    }
}

/// The tenant a request resolved to (written by this stage only).
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
    #[error("`_search` bodies must be `application/x-www-form-urlencoded`")]
    UnsupportedMediaType,
}

impl TenantError {
    pub fn status(&self) -> StatusCode {
        match self {
            TenantError::Unknown => StatusCode::NOT_FOUND,
            TenantError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            TenantError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        }
    }
    pub fn reason(&self) -> &'static str {
        match self {
            TenantError::Unknown => "tenant_unknown",
            TenantError::BodyTooLarge => "body_too_large",
            TenantError::UnsupportedMediaType => "unsupported_media_type",
        }
    }
}

/// The current set of tenants; cheap to read per request, replaced whole on reload.
pub struct TenantRegistry {
    current: ArcSwap<HashMap<String, Arc<Tenant>>>,
    compartments: Arc<CompartmentIndex>,
    source: Option<PathBuf>,
    /// Control-plane client for the tenants' OpenFGA calls.
    http: reqwest::Client,
}

impl TenantRegistry {
    pub fn new(
        tenants: Vec<TenantConfig>,
        compartments: Arc<CompartmentIndex>,
    ) -> Result<Self, ConfigError> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("smart-fhir-proxy/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ConfigError::File(format!("cannot build http client: {e}")))?;
        let map = build(tenants, &compartments, &http)?;
        Ok(TenantRegistry {
            current: ArcSwap::from_pointee(map),
            compartments,
            source: None,
            http,
        })
    }

    /// Loads `path` (with environment overrides) and remembers it for reloads.
    pub fn from_file(
        path: &Path,
        compartments: Arc<CompartmentIndex>,
    ) -> Result<Self, ConfigError> {
        let tenants = config::load(path)?;
        let mut reg = TenantRegistry::new(tenants, compartments)?;
        reg.source = Some(path.to_owned());
        Ok(reg)
    }

    pub fn get(&self, id: &str) -> Option<Arc<Tenant>> {
        self.current.load().get(id).cloned()
    }

    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.current.load().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Re-reads the source file. A file that fails validation is refused and the
    /// running configuration stays.
    pub fn reload(&self) -> Result<usize, ConfigError> {
        let Some(path) = &self.source else {
            return Ok(self.current.load().len());
        };
        let tenants = config::load(path)?;
        let map = build(tenants, &self.compartments, &self.http)?;
        let n = map.len();
        self.current.store(Arc::new(map));
        Ok(n)
    }

    /// Reloads on SIGHUP and when the file's modification time changes (polled).
    pub fn watch(self: &Arc<Self>, poll: Duration) {
        let Some(path) = self.source.clone() else {
            return;
        };
        let reg = Arc::clone(self);
        tokio::spawn(async move {
            let mut last = modified(&path);
            let mut tick = tokio::time::interval(poll);
            #[cfg(unix)]
            let mut hup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            loop {
                #[cfg(unix)]
                let by_signal = match hup.as_mut() {
                    Some(h) => tokio::select! {
                        _ = tick.tick() => false,
                        _ = h.recv() => true,
                    },
                    None => {
                        tick.tick().await;
                        false
                    }
                };
                #[cfg(not(unix))]
                let by_signal = {
                    tick.tick().await;
                    false
                };
                let now = modified(&path);
                if !by_signal && now == last {
                    continue;
                }
                last = now;
                match reg.reload() {
                    Ok(n) => {
                        tracing::info!(config.path = %path.display(), tenants = n, "configuration reloaded")
                    }
                    Err(e) => {
                        tracing::error!(config.path = %path.display(), error = %e, "configuration reload refused; keeping the running configuration")
                    }
                }
            }
        });
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn build(
    tenants: Vec<TenantConfig>,
    compartments: &Arc<CompartmentIndex>,
    http: &reqwest::Client,
) -> Result<HashMap<String, Arc<Tenant>>, ConfigError> {
    static GENERATION: AtomicU64 = AtomicU64::new(0);
    let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
    tenants
        .into_iter()
        .map(|config| {
            let checker = Checker::for_tenant(&config, compartments, http).map_err(|message| {
                ConfigError::Invalid {
                    tenant: config.id.clone(),
                    key: "authorization",
                    message,
                }
            })?;
            let tenant = Tenant {
                config,
                checker,
                generation,
            };
            Ok((tenant.config.id.clone(), Arc::new(tenant)))
        })
        .collect()
}

/// Splits `/{tenant}/{rest}` into the tenant id and the raw rest (`""` or `/...`).
pub fn split_tenant(path: &str) -> Option<(&str, &str)> {
    let path = path.strip_prefix('/')?;
    let (id, rest) = match path.find('/') {
        Some(i) => (&path[..i], &path[i..]),
        None => (path, ""),
    };
    (!id.is_empty()).then_some((id, rest))
}

/// The stage: resolves the tenant and parses the FHIR request.
#[derive(Clone)]
pub struct ResolveTenant {
    registry: Arc<TenantRegistry>,
}

impl ResolveTenant {
    pub fn new(registry: Arc<TenantRegistry>) -> Self {
        ResolveTenant { registry }
    }
}

impl Stage for ResolveTenant {
    type Error = ProxyError;

    async fn run(&self, req: &mut Request<Bytes>) -> Result<Flow, ProxyError> {
        let (tenant_id, rest) = split_tenant(req.uri().path()).ok_or(TenantError::Unknown)?;
        let tenant = self.registry.get(tenant_id).ok_or(TenantError::Unknown)?;
        if let Some(audit) = req.extensions().get::<AuditSlot>() {
            audit.set_tenant(tenant.id());
        }
        let form_body = if req.method() == http::Method::POST && rest.ends_with("/_search") {
            let ct = req
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let is_form = ct.split(';').next().is_some_and(|m| {
                m.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            });
            if !is_form && !req.body().is_empty() {
                return Err(TenantError::UnsupportedMediaType.into());
            }
            Some(req.body().as_ref())
        } else {
            None
        };
        let parsed: FhirRequest = parse_request(req.method(), rest, req.uri().query(), form_body)?;
        if let Some(audit) = req.extensions().get::<AuditSlot>() {
            audit.set_request(&parsed);
        }
        req.extensions_mut().insert(TenantCtx(tenant));
        req.extensions_mut().insert(parsed);
        Ok(Flow::Continue)
    }
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
