//! The admin listener (`--admin-listen`): `/metrics`, `/healthz` and `/readyz`, on an
//! address of its own (never the proxy's), for operators and their orchestrators.
//!
//! - `/metrics`: the Prometheus text exposition of `crate::metrics`, plus what is read
//!   at scrape time: the number of tenants, each OpenFGA tenant's circuit breaker, the
//!   span exporter's counts.
//! - `/healthz`: `200 ok` while the process serves (liveness).
//! - `/readyz`: `200` when the configuration is loaded and, for every tenant, its JWKS
//!   and its upstream answer; `503` otherwise, and while shutting down. The JSON body
//!   says, per tenant, what was found. The probes are cheap and bounded: a `GET` of the
//!   JWK Set and of the upstream's `/metadata` (through the proxy's own upstream client,
//!   with the tenant's upstream credentials), each within [`PROBE_TIMEOUT`], results
//!   kept [`READY_CACHE`] per tenant, so a probe storm does not become an upstream load.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::fhir::OutboundRequest;
use crate::metrics::{self, ScrapeFamily};
use crate::registry::{Resolved, TenantRegistry};
use crate::upstream::Upstream;

/// Bound on each readiness probe.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a tenant's probe results are reused.
pub const READY_CACHE: Duration = Duration::from_secs(5);
/// Largest JWK Set a probe reads.
const MAX_PROBE_BYTES: usize = 256 * 1024;

/// What the admin endpoints read: the tenants, and the clients to probe them with.
pub struct Admin {
    registry: Arc<TenantRegistry>,
    upstream: Upstream,
    http: reqwest::Client,
    /// Probe results by tenant id and configuration generation.
    ready: moka::future::Cache<(String, u64), Arc<TenantReadiness>>,
    draining: AtomicBool,
}

/// One tenant's readiness: `ok`, or what went wrong, per dependency.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TenantReadiness {
    pub ready: bool,
    pub jwks: String,
    pub upstream: String,
}

impl Admin {
    pub fn new(registry: Arc<TenantRegistry>, upstream: Upstream) -> Result<Arc<Admin>, String> {
        let http = crate::fetch::control_client()
            .build()
            .map_err(|e| format!("cannot build http client: {e}"))?;
        Ok(Arc::new(Admin {
            registry,
            upstream,
            http,
            ready: moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(READY_CACHE)
                .build(),
            draining: AtomicBool::new(false),
        }))
    }

    /// From now on `/readyz` answers 503 (`draining`): the process is shutting down.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    fn tenants(&self) -> Vec<(String, Resolved)> {
        self.registry
            .ids()
            .into_iter()
            .filter_map(|id| self.registry.get(&id).map(|r| (id, r)))
            .collect()
    }

    /// The `/metrics` text.
    pub fn metrics(&self) -> String {
        let tenants = self.tenants();
        let mut breakers = Vec::new();
        for (id, resolved) in &tenants {
            if let Some(open) = resolved
                .checker
                .fga()
                .and_then(|fga| fga.client.breaker_open())
            {
                breakers.push((vec![("tenant", id.clone())], i64::from(open)));
            }
        }
        let mut extra = vec![
            ScrapeFamily {
                name: "sfp_tenants",
                kind: "gauge",
                help: "Tenants in the running configuration.",
                samples: vec![(vec![], tenants.len() as i64)],
            },
            ScrapeFamily {
                name: "sfp_openfga_breaker_open",
                kind: "gauge",
                help: "Whether the tenant's OpenFGA circuit breaker refuses calls (1: open or half-open, 0: closed).",
                samples: breakers,
            },
        ];
        extra.extend(audit_families(
            crate::audit::dropped_total(),
            crate::audit::fhir::counters(),
        ));
        if let Some(c) = crate::trace::otlp::counts() {
            let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            extra.push(ScrapeFamily {
                name: "sfp_otlp_spans_total",
                kind: "counter",
                help: "Spans handed to the OTLP exporter, by result (dropped: the export queue was full; failed: the export request failed).",
                samples: vec![
                    (vec![("result", "exported".to_owned())], n(c.exported)),
                    (vec![("result", "dropped".to_owned())], n(c.dropped)),
                    (vec![("result", "failed".to_owned())], n(c.failed)),
                ],
            });
        }
        metrics::global().render(&extra)
    }

    /// The `/readyz` status and body. The tenants are probed concurrently.
    pub async fn readiness(self: &Arc<Self>) -> (StatusCode, Value) {
        let mut probes = tokio::task::JoinSet::new();
        for (id, resolved) in self.tenants() {
            let admin = Arc::clone(self);
            probes.spawn(async move {
                let key = (id.clone(), resolved.tenant.generation);
                let result = admin.ready.get_with(key, admin.probe(&resolved)).await;
                (id, result)
            });
        }
        let mut results = Vec::new();
        while let Some(joined) = probes.join_next().await {
            match joined {
                Ok(r) => results.push(r),
                // A probe task that panicked: not ready, and said so.
                Err(_) => results.push((
                    "-".to_owned(),
                    Arc::new(TenantReadiness {
                        ready: false,
                        jwks: "probe failed".into(),
                        upstream: "probe failed".into(),
                    }),
                )),
            }
        }
        results.sort_by(|a, b| a.0.cmp(&b.0));
        let all_ready = !results.is_empty() && results.iter().all(|(_, r)| r.ready);
        let draining = self.draining.load(Ordering::Acquire);
        let status = if draining {
            "draining"
        } else if all_ready {
            "ready"
        } else {
            "not_ready"
        };
        let per_tenant: serde_json::Map<String, Value> = results
            .into_iter()
            .map(|(id, r)| (id, json!(&*r)))
            .collect();
        let body = json!({
            "status": status,
            "config": {"loaded": true, "tenants": per_tenant.len()},
            "tenants": per_tenant,
        });
        let code = if status == "ready" {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (code, body)
    }

    async fn probe(&self, resolved: &Resolved) -> Arc<TenantReadiness> {
        let (jwks, upstream) =
            tokio::join!(self.probe_jwks(resolved), self.probe_upstream(resolved));
        let ready = jwks == "ok" && upstream == "ok";
        if !ready {
            tracing::warn!(tenant.id = %resolved.tenant.id(), jwks = %jwks, upstream = %upstream, "tenant not ready");
        }
        Arc::new(TenantReadiness {
            ready,
            jwks,
            upstream,
        })
    }

    async fn probe_jwks(&self, resolved: &Resolved) -> String {
        let token = &resolved.tenant.config.token;
        let timeout = token.jwks_timeout.min(PROBE_TIMEOUT);
        let probe = async {
            let resp = self
                .http
                .get(token.jwks_uri.clone())
                .header(header::ACCEPT, "application/json")
                .send()
                .await
                .map_err(|e| {
                    if e.is_timeout() {
                        "timeout"
                    } else {
                        "unreachable"
                    }
                    .to_owned()
                })?;
            if !resp.status().is_success() {
                return Err(format!("status {}", resp.status().as_u16()));
            }
            let body = crate::fetch::read_capped(resp, MAX_PROBE_BYTES)
                .await
                .map_err(|_| "unreadable".to_owned())?;
            #[derive(serde::Deserialize)]
            struct Set {
                #[allow(dead_code)]
                keys: Vec<serde::de::IgnoredAny>,
            }
            serde_json::from_slice::<Set>(&body).map_err(|_| "not a JWK Set".to_owned())?;
            Ok(())
        };
        match tokio::time::timeout(timeout, probe).await {
            Ok(Ok(())) => "ok".to_owned(),
            Ok(Err(e)) => e,
            Err(_) => "timeout".to_owned(),
        }
    }

    async fn probe_upstream(&self, resolved: &Resolved) -> String {
        let out = OutboundRequest {
            method: Method::GET,
            path: "/metadata".into(),
            params: Vec::new(),
            body: None,
            conditional: false,
            narrowing: None,
            headers: Vec::new(),
        };
        let headers = HeaderMap::new();
        let fetch = self.upstream.fetch(&resolved.tenant, &out, &headers);
        match tokio::time::timeout(PROBE_TIMEOUT, fetch).await {
            // An answer from the FHIR server; one that wants other credentials still
            // shows it up (the proxy's own requests would say more).
            Ok(Ok(f))
                if f.status.is_success()
                    || f.status == StatusCode::UNAUTHORIZED
                    || f.status == StatusCode::FORBIDDEN =>
            {
                "ok".to_owned()
            }
            Ok(Ok(f)) => format!("status {}", f.status.as_u16()),
            Ok(Err(e)) => e.reason().to_owned(),
            Err(_) => "upstream_timeout".to_owned(),
        }
    }
}

/// The audit sinks' counts: records the JSON lines dropped, and (with an AuditEvent
/// repository) AuditEvents sent, failed, dropped and pending.
fn audit_families(
    lines_dropped: Option<u64>,
    events: Option<crate::audit::fhir::Counters>,
) -> Vec<ScrapeFamily> {
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let mut out = Vec::new();
    if let Some(dropped) = lines_dropped {
        out.push(ScrapeFamily {
            name: "sfp_audit_records_dropped_total",
            kind: "counter",
            help: "Audit records the JSON-lines sink dropped because its queue was full (overflow drop).",
            samples: vec![(vec![], n(dropped))],
        });
    }
    if let Some(c) = events {
        out.push(ScrapeFamily {
            name: "sfp_audit_events_total",
            kind: "counter",
            help: "AuditEvents by result (sent: accepted by the repository; failed: refused or out of retries; dropped: the queue was full, overflow drop).",
            samples: vec![
                (vec![("result", "sent".to_owned())], n(c.sent)),
                (vec![("result", "failed".to_owned())], n(c.failed)),
                (vec![("result", "dropped".to_owned())], n(c.dropped)),
            ],
        });
        out.push(ScrapeFamily {
            name: "sfp_audit_events_pending",
            kind: "gauge",
            help: "AuditEvents queued or being sent.",
            samples: vec![(vec![], n(c.pending))],
        });
    }
    out
}

/// Serves the admin endpoints on `listener` (until the process ends).
pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let admin = Arc::clone(&admin);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let admin = Arc::clone(&admin);
                async move { Ok::<_, Infallible>(answer(&admin, &req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection ended with error");
            }
        });
    }
}

async fn answer<B>(admin: &Arc<Admin>, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let mut resp = match req.uri().path() {
        "/metrics" => {
            let mut r = text(StatusCode::OK, admin.metrics());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            let (status, body) = admin.readiness().await;
            let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
            *r.status_mut() = status;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    };
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if req.method() == Method::HEAD {
        *resp.body_mut() = Full::new(Bytes::new());
    }
    resp
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_counts_are_exposed_when_their_sinks_run() {
        assert!(audit_families(None, None).is_empty());
        let events = crate::audit::fhir::Counters {
            sent: 7,
            failed: 1,
            dropped: 2,
            pending: 3,
        };
        let text = metrics::Metrics::new().render(&audit_families(Some(4), Some(events)));
        for line in [
            "# TYPE sfp_audit_records_dropped_total counter",
            "sfp_audit_records_dropped_total 4",
            "# TYPE sfp_audit_events_total counter",
            r#"sfp_audit_events_total{result="sent"} 7"#,
            r#"sfp_audit_events_total{result="failed"} 1"#,
            r#"sfp_audit_events_total{result="dropped"} 2"#,
            "# TYPE sfp_audit_events_pending gauge",
            "sfp_audit_events_pending 3",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }
}
