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
//! A reload rebuilds only the tenants whose configuration changed (or that are new):
//! an unchanged tenant keeps its `Arc<Tenant>`, generation and checker, and with them
//! its warm caches (verified tokens, CapabilityStatement, upstream token, OpenFGA
//! decisions and lists) and its circuit breaker. A rebuilt tenant gets a new
//! generation, so nothing cached under its old settings is used again.

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
use crate::config::{self, ConfigError, TenantConfig, TenantSource};
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

/// A tenant in a snapshot, with the configuration it was built from.
#[derive(Clone, Debug)]
struct Slot {
    resolved: Resolved,
    /// `None`: not loaded from a file (or not found in it again); never equal to a
    /// reloaded one, so always rebuilt.
    source: Option<TenantSource>,
}

type Snapshot = HashMap<String, Slot>;

/// What a reload did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    /// Tenants configured now.
    pub tenants: usize,
    /// Unchanged tenants that kept their state.
    pub kept: usize,
    /// Changed or new tenants, built afresh.
    pub rebuilt: usize,
    /// Tenants no longer configured.
    pub removed: usize,
}

/// The current set of tenants; cheap to read per request, replaced whole on reload.
pub struct TenantRegistry {
    current: ArcSwap<Snapshot>,
    compartments: Arc<CompartmentIndex>,
    source: Option<PathBuf>,
    /// Control-plane client for the tenants' OpenFGA calls.
    http: reqwest::Client,
    /// One reload at a time, so two cannot both decide what to keep from one snapshot.
    reloading: std::sync::Mutex<()>,
}

impl TenantRegistry {
    pub fn new(
        tenants: Vec<TenantConfig>,
        compartments: Arc<CompartmentIndex>,
    ) -> Result<Self, ConfigError> {
        Self::with_sources(
            tenants.into_iter().map(|t| (t, None)).collect(),
            compartments,
        )
    }

    fn with_sources(
        tenants: Vec<(TenantConfig, Option<TenantSource>)>,
        compartments: Arc<CompartmentIndex>,
    ) -> Result<Self, ConfigError> {
        let http = crate::fetch::control_client()
            .build()
            .map_err(|e| ConfigError::File(format!("cannot build http client: {e}")))?;
        let (map, _) = build(tenants, &Snapshot::new(), &compartments, &http)?;
        Ok(TenantRegistry {
            current: ArcSwap::from_pointee(map),
            compartments,
            source: None,
            http,
            reloading: std::sync::Mutex::new(()),
        })
    }

    /// Loads `path` (with environment overrides) and remembers it for reloads.
    pub fn from_file(
        path: &Path,
        compartments: Arc<CompartmentIndex>,
    ) -> Result<Self, ConfigError> {
        let tenants = config::load_with_sources(path)?;
        let mut reg = TenantRegistry::with_sources(tenants, compartments)?;
        reg.source = Some(path.to_owned());
        Ok(reg)
    }

    pub fn get(&self, id: &str) -> Option<Resolved> {
        self.current
            .load()
            .get(id)
            .map(|slot| slot.resolved.clone())
    }

    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.current.load().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Re-reads the source file. A file that fails validation is refused and the
    /// running configuration stays. Unchanged tenants keep their state (module docs).
    pub fn reload(&self) -> Result<ReloadSummary, ConfigError> {
        let Some(path) = &self.source else {
            let n = self.current.load().len();
            return Ok(ReloadSummary {
                tenants: n,
                kept: n,
                ..ReloadSummary::default()
            });
        };
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.current.load_full();
        let result = config::load_with_sources(path)
            .and_then(|tenants| build(tenants, &old, &self.compartments, &self.http));
        crate::metrics::global().config_reload(result.is_ok());
        let (map, mut summary) = result?;
        summary.removed = old.keys().filter(|id| !map.contains_key(*id)).count();
        self.current.store(Arc::new(map));
        Ok(summary)
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
                    Ok(r) => {
                        tracing::info!(
                            config.path = %path.display(),
                            tenants = r.tenants,
                            tenants.kept = r.kept,
                            tenants.rebuilt = r.rebuilt,
                            tenants.removed = r.removed,
                            "configuration reloaded"
                        )
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

/// The snapshot for `tenants`: a tenant whose source equals its slot's in `old` is
/// taken over as it is; every other one is built with a generation of its own.
fn build(
    tenants: Vec<(TenantConfig, Option<TenantSource>)>,
    old: &Snapshot,
    compartments: &Arc<CompartmentIndex>,
    http: &reqwest::Client,
) -> Result<(Snapshot, ReloadSummary), ConfigError> {
    static GENERATION: AtomicU64 = AtomicU64::new(0);
    let mut summary = ReloadSummary {
        tenants: tenants.len(),
        ..ReloadSummary::default()
    };
    let mut map = Snapshot::with_capacity(tenants.len());
    for (config, source) in tenants {
        let id = config.id.clone();
        // The id becomes a metrics label value (only configured ids ever do).
        crate::metrics::global().register_tenant(&id);
        if let Some(slot) = old.get(&id)
            && source.is_some()
            && slot.source == source
        {
            summary.kept += 1;
            map.insert(id, slot.clone());
            continue;
        }
        let checker = Checker::for_tenant(&config, compartments, http).map_err(|message| {
            ConfigError::Invalid {
                tenant: id.clone(),
                key: "authorization",
                message,
            }
        })?;
        let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
        let resolved = Resolved {
            tenant: Arc::new(Tenant { config, generation }),
            checker: Arc::new(checker),
        };
        summary.rebuilt += 1;
        map.insert(id, Slot { resolved, source });
    }
    Ok((map, summary))
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
            audit.set_public_base(&tenant.config.public_base);
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
        if let Some(audit) = req.extensions().get::<AuditSlot>() {
            audit.set_query(rest, req.uri().query(), form_body);
        }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use serde_json::{Value, json};

    fn tenant(id: &str) -> Value {
        json!({
            "public_base_url": format!("http://127.0.0.1:8080/{id}"),
            "upstream": { "base_url": "http://127.0.0.1:8081/fhir" },
            "token": {
                "issuers": ["http://127.0.0.1:9000"],
                "jwks_uri": "http://127.0.0.1:9000/jwks",
                "audience": format!("http://127.0.0.1:8080/{id}"),
            },
            "smart": {
                "authorization_endpoint": "http://127.0.0.1:9000/auth",
                "token_endpoint": "http://127.0.0.1:9000/token",
            },
            "authorization": { "mode": "compartment" }
        })
    }

    fn fga_tenant(id: &str, cache_ttl_seconds: u64) -> Value {
        let mut t = tenant(id);
        t["authorization"] = json!({
            "mode": "openfga",
            "openfga": {
                "api_url": "http://127.0.0.1:8082",
                "store_id": "01HZZZZZZZZZZZZZZZZZZZZZZZ",
                "authorization_model_id": "01HZZZZZZZZZZZZZZZZZZZZZZZ",
                "cache_ttl_seconds": cache_ttl_seconds,
            }
        });
        t
    }

    fn write(path: &Path, tenants: Vec<(&str, Value)>) {
        let map: serde_json::Map<String, Value> = tenants
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        let text = serde_json::to_vec_pretty(&json!({ "tenants": map })).unwrap();
        std::fs::write(path, text).unwrap();
    }

    fn same(a: &Resolved, b: &Resolved) -> bool {
        Arc::ptr_eq(&a.tenant, &b.tenant) && Arc::ptr_eq(&a.checker, &b.checker)
    }

    #[test]
    fn a_reload_rebuilds_only_changed_and_new_tenants() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tenants.json");
        write(
            &path,
            vec![
                ("a", tenant("a")),
                ("b", fga_tenant("b", 10)),
                ("c", tenant("c")),
            ],
        );
        let compartments = CompartmentIndex::official_shared().unwrap();
        let reg = TenantRegistry::from_file(&path, compartments).unwrap();
        let (a, b, c) = (
            reg.get("a").unwrap(),
            reg.get("b").unwrap(),
            reg.get("c").unwrap(),
        );
        assert_ne!(a.tenant.generation, b.tenant.generation);

        // `a` as before but with its members in another order; `b` edited; `c` gone;
        // `d` new.
        let mut a_reordered = serde_json::Map::new();
        for key in [
            "authorization",
            "smart",
            "token",
            "upstream",
            "public_base_url",
        ] {
            a_reordered.insert(key.to_owned(), tenant("a")[key].clone());
        }
        write(
            &path,
            vec![
                ("d", tenant("d")),
                ("b", fga_tenant("b", 20)),
                ("a", Value::Object(a_reordered)),
            ],
        );
        let summary = reg.reload().unwrap();
        assert_eq!(
            summary,
            ReloadSummary {
                tenants: 3,
                kept: 1,
                rebuilt: 2,
                removed: 1,
            }
        );
        let a2 = reg.get("a").unwrap();
        let b2 = reg.get("b").unwrap();
        assert!(same(&a, &a2), "an unchanged tenant keeps its state");
        assert_eq!(a.tenant.generation, a2.tenant.generation);
        assert!(!Arc::ptr_eq(&b.tenant, &b2.tenant));
        assert!(!Arc::ptr_eq(&b.checker, &b2.checker));
        assert_ne!(b.tenant.generation, b2.tenant.generation);
        assert!(reg.get("c").is_none());
        let d = reg.get("d").unwrap();
        assert!(
            ![&a2, &b2, &c]
                .iter()
                .any(|r| r.tenant.generation == d.tenant.generation)
        );

        // Nothing changed: everything is kept.
        assert_eq!(
            reg.reload().unwrap(),
            ReloadSummary {
                tenants: 3,
                kept: 3,
                ..ReloadSummary::default()
            }
        );
        assert!(same(&b2, &reg.get("b").unwrap()));

        // A file that does not validate changes nothing.
        let mut broken = tenant("a");
        broken["token"]["algorithms"] = json!(["none"]);
        write(&path, vec![("a", broken), ("b", fga_tenant("b", 30))]);
        assert!(reg.reload().is_err());
        assert!(same(&a2, &reg.get("a").unwrap()));
        assert!(same(&b2, &reg.get("b").unwrap()));
        assert!(reg.get("d").is_some());
    }

    #[test]
    fn tenants_not_loaded_from_a_file_are_never_taken_for_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tenants.json");
        write(&path, vec![("a", tenant("a"))]);
        let compartments = CompartmentIndex::official_shared().unwrap();
        let configs = config::load(&path).unwrap();
        let reg = TenantRegistry::new(configs, Arc::clone(&compartments)).unwrap();
        let snapshot = reg.current.load_full();
        let tenants = config::load_with_sources(&path).unwrap();
        assert!(tenants[0].1.is_some());
        let (map, summary) = build(tenants, &snapshot, &compartments, &reg.http).unwrap();
        assert_eq!(summary.kept, 0);
        assert_eq!(summary.rebuilt, 1);
        assert!(!Arc::ptr_eq(
            &map["a"].resolved.tenant,
            &reg.get("a").unwrap().tenant
        ));
    }
}
