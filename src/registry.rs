//! The tenant registry and stage 0: tenant resolution and request parsing.
//!
//! Part of the composition: the registry builds, for each configured tenant, the
//! [`Tenant`] every stage reads and the per-tenant state of the stages that need one
//! (authz's [`Checker`]). Per request, stage 0 selects the tenant from the first path
//! segment of the current configuration snapshot, and parses the rest of the path, the
//! query and (for `POST _search`) the form body once into a [`FhirRequest`]. It writes
//! `TenantCtx`, the tenant's `Arc<Checker>` and the `FhirRequest` as request extensions.
//!
//! The snapshot is an `ArcSwap`: a reload replaces it atomically, and each request keeps
//! the tenant (and checker) it resolved, so a reload never changes a request half-way.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::Request;

use crate::audit::AuditSlot;
use crate::authz::Checker;
use crate::config::{self, ConfigError, TenantConfig};
use crate::error::ProxyError;
use crate::fhir::{CompartmentIndex, FhirRequest, parse_request};
use crate::pipeline::{Flow, Stage};
use crate::tenant::{Tenant, TenantCtx, TenantError, split_tenant};

/// A configured tenant and its checker, as one snapshot holds them.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub tenant: Arc<Tenant>,
    pub checker: Arc<Checker>,
}

/// The current set of tenants; cheap to read per request, replaced whole on reload.
pub struct TenantRegistry {
    current: ArcSwap<HashMap<String, Resolved>>,
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
        let http = crate::fetch::control_client()
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

    pub fn get(&self, id: &str) -> Option<Resolved> {
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
        let result = config::load(path).and_then(|t| build(t, &self.compartments, &self.http));
        crate::metrics::global().config_reload(result.is_ok());
        let map = result?;
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
) -> Result<HashMap<String, Resolved>, ConfigError> {
    static GENERATION: AtomicU64 = AtomicU64::new(0);
    let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
    tenants
        .into_iter()
        .map(|config| {
            // The id becomes a metrics label value (only configured ids ever do).
            crate::metrics::global().register_tenant(&config.id);
            let checker = Checker::for_tenant(&config, compartments, http).map_err(|message| {
                ConfigError::Invalid {
                    tenant: config.id.clone(),
                    key: "authorization",
                    message,
                }
            })?;
            let tenant = Tenant { config, generation };
            let resolved = Resolved {
                tenant: Arc::new(tenant),
                checker: Arc::new(checker),
            };
            Ok((resolved.tenant.config.id.clone(), resolved))
        })
        .collect()
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
        let Resolved { tenant, checker } =
            self.registry.get(tenant_id).ok_or(TenantError::Unknown)?;
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
        req.extensions_mut().insert(checker);
        req.extensions_mut().insert(parsed);
        Ok(Flow::Continue)
    }
}
