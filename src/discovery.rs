//! Discovery, answered without a token: `/{tenant}/.well-known/smart-configuration`
//! (SMART App Launch 2.2) and `/{tenant}/metadata` (the upstream's
//! CapabilityStatement, with the SMART security extension added and the interactions
//! trimmed to what the proxy forwards).
//!
//! `/{tenant}/.well-known/udap` serves signed UDAP server metadata ([`udap`]).
//!
//! Sits right after tenant resolution; every other request passes through untouched.

pub mod udap;

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use serde_json::{Value, json};

use crate::config::TenantConfig;
use crate::fhir::capability::SearchSupport;
use crate::fhir::{FhirRequest, Interaction, OutboundRequest};
use crate::pipeline::{Decision, Flow, Internal, Stage, ext, fhir_json};
use crate::tenant::{Tenant, tenant_of};
use crate::upstream::{FhirServer, Upstream, UpstreamError, rewrite_base};

/// The interactions the proxy forwards; the CapabilityStatement advertises no others.
/// (Single writes go under the record checks of `authz::write`.)
const SUPPORTED_INTERACTIONS: [&str; 8] = [
    "read",
    "vread",
    "history-instance",
    "search-type",
    "create",
    "update",
    "patch",
    "delete",
];

/// How long a tenant's secured CapabilityStatement is served from memory. `/metadata`
/// needs no token, so without a cache anyone could make the proxy load the upstream.
const CAPABILITIES_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// What discovery fails with: the upstream's errors when its CapabilityStatement is
/// fetched.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Udap(#[from] udap::UdapError),
    #[error(transparent)]
    Internal(#[from] Internal),
}

/// What the proxy knows of a tenant's upstream from its CapabilityStatement: the
/// secured statement it serves on `/metadata`, and the search parameters the upstream
/// declares (which restricted tokens are held to, `rewrite`).
#[derive(Debug)]
pub struct UpstreamCapabilities {
    pub secured: Bytes,
    pub search: SearchSupport,
}

/// Fetches each tenant's CapabilityStatement and keeps it for [`CAPABILITIES_TTL`].
/// Shared by discovery and the rewrite stage; concurrent misses are merged into one
/// fetch, and a failed fetch is not kept.
pub struct Capabilities<U = Upstream> {
    upstream: U,
    /// (configuration generation, tenant) -> what the upstream declared.
    cache: moka::future::Cache<(u64, String), Arc<UpstreamCapabilities>>,
}

impl<U: FhirServer> Capabilities<U> {
    pub fn new(upstream: U) -> Self {
        Capabilities {
            upstream,
            cache: moka::future::Cache::builder()
                .max_capacity(1_000)
                .time_to_live(CAPABILITIES_TTL)
                .build(),
        }
    }

    /// The tenant's upstream capabilities, from the cache or fetched.
    pub async fn of(&self, tenant: &Tenant) -> Result<Arc<UpstreamCapabilities>, DiscoveryError> {
        let key = (tenant.generation, tenant.id().to_owned());
        self.cache
            .try_get_with(key, self.fetch(tenant))
            .await
            .map_err(|e: Arc<DiscoveryError>| match &*e {
                DiscoveryError::Upstream(u) => DiscoveryError::Upstream(u.clone()),
                DiscoveryError::Udap(u) => DiscoveryError::Udap(u.clone()),
                DiscoveryError::Internal(i) => DiscoveryError::Internal(*i),
            })
    }

    /// Fetches the upstream's CapabilityStatement and secures it (no caching).
    async fn fetch(&self, tenant: &Tenant) -> Result<Arc<UpstreamCapabilities>, DiscoveryError> {
        let out = OutboundRequest {
            method: Method::GET,
            path: "/metadata".into(),
            params: Vec::new(),
            body: None,
            conditional: false,
            narrowing: None,
            headers: Vec::new(),
        };
        let fetched = self
            .upstream
            .fetch(tenant, &out, &http::HeaderMap::new())
            .await?;
        if !fetched.status.is_success() {
            // A 4xx for `/metadata` is the upstream's fault, not the client's: never
            // handed on as the client's own status.
            return Err(if fetched.status.is_client_error() {
                UpstreamError::BadResponse("capability statement")
            } else {
                UpstreamError::Status(fetched.status)
            }
            .into());
        }
        let body = rewrite_base(
            &fetched.body,
            &tenant.config.upstream,
            &tenant.config.public_base,
        )?;
        let mut cs: Value = serde_json::from_slice(&body)
            .map_err(|_| UpstreamError::BadResponse("capability statement"))?;
        if cs.get("resourceType").and_then(Value::as_str) != Some("CapabilityStatement") {
            return Err(UpstreamError::BadResponse("capability statement").into());
        }
        let search = SearchSupport::from_capability_statement(&cs);
        secure_capability_statement(&mut cs, &tenant.config);
        let secured = serde_json::to_vec(&cs)
            .map(Bytes::from)
            .map_err(|_| Internal("capability statement"))?;
        Ok(Arc::new(UpstreamCapabilities { secured, search }))
    }
}

/// The discovery stage.
pub struct ServeDiscovery<U = Upstream> {
    capabilities: Arc<Capabilities<U>>,
    udap: udap::UdapSigner,
}

impl<U: FhirServer> ServeDiscovery<U> {
    pub fn new(capabilities: Arc<Capabilities<U>>) -> Self {
        ServeDiscovery {
            capabilities,
            udap: udap::UdapSigner::default(),
        }
    }
}

impl<U: FhirServer> Stage for ServeDiscovery<U> {
    type Error = DiscoveryError;

    async fn run(&self, req: &mut Request<Bytes>) -> Result<Flow, DiscoveryError> {
        let fhir = ext::<FhirRequest>(req, "missing FhirRequest")?;
        let tenant = &tenant_of(req)?.0;
        let head = fhir.method == Method::HEAD;
        let mut resp = match fhir.interaction {
            Interaction::SmartConfiguration => {
                let body = serde_json::to_vec(&smart_configuration(&tenant.config))
                    .map_err(|_| Internal("smart configuration"))?;
                let mut r = fhir_json(StatusCode::OK, Bytes::from(body));
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                r
            }
            Interaction::Capabilities => {
                let known = self.capabilities.of(tenant).await?;
                fhir_json(StatusCode::OK, known.secured.clone())
            }
            Interaction::UdapMetadata => match self.udap.answer(tenant, fhir).await? {
                udap::UdapAnswer::Metadata(body) => {
                    let mut r = fhir_json(StatusCode::OK, body);
                    r.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                    r
                }
                udap::UdapAnswer::UnknownCommunity => {
                    let mut r = fhir_json(StatusCode::NO_CONTENT, Bytes::new());
                    r.headers_mut().remove(http::header::CONTENT_TYPE);
                    r
                }
            },
            _ => return Ok(Flow::Continue),
        };
        resp.extensions_mut().insert(Decision("public_discovery"));
        if head {
            *resp.body_mut() = http_body_util::Full::new(Bytes::new());
        }
        Ok(Flow::Respond(resp))
    }
}

/// The SMART configuration document (SMART App Launch 2.2, section 2.0.x).
pub fn smart_configuration(cfg: &TenantConfig) -> Value {
    let s = &cfg.smart;
    let mut doc = json!({
        "issuer": cfg.token.issuers.first(),
        "jwks_uri": cfg.token.jwks_uri.as_str(),
        "authorization_endpoint": s.authorization_endpoint,
        "token_endpoint": s.token_endpoint,
        "grant_types_supported": s.grant_types_supported,
        "token_endpoint_auth_methods_supported": s.token_endpoint_auth_methods_supported,
        "token_endpoint_auth_signing_alg_values_supported": s.token_endpoint_auth_signing_alg_values_supported,
        "scopes_supported": s.scopes_supported,
        "response_types_supported": s.response_types_supported,
        "capabilities": s.capabilities,
        "code_challenge_methods_supported": ["S256"],
    });
    if let Value::Object(map) = &mut doc {
        for (k, v) in [
            ("registration_endpoint", &s.registration_endpoint),
            ("management_endpoint", &s.management_endpoint),
            ("revocation_endpoint", &s.revocation_endpoint),
            ("introspection_endpoint", &s.introspection_endpoint),
            ("user_access_brand_bundle", &s.user_access_brand_bundle),
        ] {
            if let Some(v) = v {
                map.insert(k.to_owned(), Value::String(v.clone()));
            }
        }
    }
    doc
}

/// Adds the SMART security service and `oauth-uris` extension to every server `rest`
/// entry, and trims advertised interactions to those the proxy forwards.
pub fn secure_capability_statement(cs: &mut Value, cfg: &TenantConfig) {
    let s = &cfg.smart;
    let mut uris = vec![
        json!({"url": "token", "valueUri": s.token_endpoint}),
        json!({"url": "authorize", "valueUri": s.authorization_endpoint}),
    ];
    for (name, v) in [
        ("register", &s.registration_endpoint),
        ("manage", &s.management_endpoint),
        ("introspect", &s.introspection_endpoint),
        ("revoke", &s.revocation_endpoint),
    ] {
        if let Some(v) = v {
            uris.push(json!({"url": name, "valueUri": v}));
        }
    }
    let security = json!({
        "extension": [{
            "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
            "extension": uris,
        }],
        "service": [{
            "coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                "code": "SMART-on-FHIR",
                "display": "SMART-on-FHIR",
            }],
            "text": "OAuth2 using SMART-on-FHIR profile (see http://docs.smarthealthit.org)",
        }],
        "description": "Access requires a SMART App Launch bearer token (permission-v1 and permission-v2 scopes).",
    });
    if let Some(Value::Array(rest)) = cs.get_mut("rest") {
        for r in rest.iter_mut() {
            if r.get("mode").and_then(Value::as_str) != Some("server") {
                continue;
            }
            if let Value::Object(map) = r {
                map.insert("security".into(), security.clone());
                map.remove("interaction");
                if let Some(Value::Array(resources)) = map.get_mut("resource") {
                    for res in resources.iter_mut() {
                        if let Some(Value::Array(ints)) = res.get_mut("interaction") {
                            ints.retain(|i| {
                                i.get("code")
                                    .and_then(Value::as_str)
                                    .is_some_and(|c| SUPPORTED_INTERACTIONS.contains(&c))
                            });
                        }
                    }
                }
            }
        }
    }
    if let Some(Value::Object(imp)) = cs.get_mut("implementation") {
        imp.insert("url".into(), Value::String(cfg.public_base.clone()));
    }
}
