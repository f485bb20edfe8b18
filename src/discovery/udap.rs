//! `/{tenant}/.well-known/udap` (HL7 FAST Security IG, UDAP server metadata): the
//! metadata document with `signed_metadata`, a JWT signed with the tenant's (or the
//! requested community's) certificate, its chain in the `x5c` header.
//!
//! Part of discovery (answered before the token stage, without a token). Guarantees:
//! a tenant without `udap` answers 404; `?community=` naming no configured community
//! answers 204 without a body; any other parameter, a repeated or an empty `community`
//! is a 400; `signed_metadata` has `iss` = `sub` = the tenant's base URL (checked at
//! load to be a URI SAN of the signing certificate), `exp` at most the configured
//! lifetime after `iat` and never after the certificate's `notAfter`, and a fresh `jti`
//! per signature. Signatures are cached per tenant configuration and community for half
//! their remaining lifetime (the metadata endpoint needs no token, so without a cache
//! anyone could make the proxy spend an RSA signature per request).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use serde_json::{Map, Value, json};

use crate::config::{TenantConfig, UdapConfig};
use crate::fhir::FhirRequest;
use crate::tenant::Tenant;

/// Longest `community` value accepted.
const MAX_COMMUNITY_LEN: usize = 2048;

#[derive(Debug, Clone, thiserror::Error)]
pub enum UdapError {
    #[error("udap is not enabled for this tenant")]
    NotEnabled,
    #[error("{0}")]
    BadQuery(String),
    #[error("the udap signing certificate has expired")]
    CertificateExpired,
    #[error("udap metadata cannot be signed")]
    Signing,
}

impl UdapError {
    pub fn status(&self) -> StatusCode {
        match self {
            UdapError::NotEnabled => StatusCode::NOT_FOUND,
            UdapError::BadQuery(_) => StatusCode::BAD_REQUEST,
            UdapError::CertificateExpired => StatusCode::SERVICE_UNAVAILABLE,
            UdapError::Signing => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
    pub fn reason(&self) -> &'static str {
        match self {
            UdapError::NotEnabled => "udap_not_enabled",
            UdapError::BadQuery(_) => "udap_query_invalid",
            UdapError::CertificateExpired => "udap_certificate_expired",
            UdapError::Signing => "udap_signing_failed",
        }
    }
}

/// The `community` a request asks for: `None` for the tenant's own metadata.
pub fn parse_community(req: &FhirRequest) -> Result<Option<&str>, UdapError> {
    let mut found: Option<&str> = None;
    for (name, value) in &req.params {
        if name != "community" {
            return Err(UdapError::BadQuery(format!(
                "parameter `{}` is not supported here (only `community`)",
                echo(name)
            )));
        }
        if found.is_some() {
            return Err(UdapError::BadQuery(
                "`community` is given more than once".into(),
            ));
        }
        if value.is_empty()
            || value.len() > MAX_COMMUNITY_LEN
            || value.contains(char::is_whitespace)
        {
            return Err(UdapError::BadQuery(
                "`community` must be a URI (non-empty, no spaces, at most 2048 bytes)".into(),
            ));
        }
        found = Some(value);
    }
    Ok(found)
}

fn echo(s: &str) -> String {
    s.chars().take(64).collect()
}

/// The metadata document without `signed_metadata`.
pub fn metadata_document(udap: &UdapConfig) -> Map<String, Value> {
    let m = &udap.metadata;
    let mut doc = json!({
        "udap_versions_supported": ["1"],
        "udap_profiles_supported": m.udap_profiles_supported,
        "udap_authorization_extensions_supported": m.udap_authorization_extensions_supported,
        "udap_certifications_supported": m.udap_certifications_supported,
        "grant_types_supported": m.grant_types_supported,
        "scopes_supported": m.scopes_supported,
        "token_endpoint": m.token_endpoint,
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": m.token_endpoint_auth_signing_alg_values_supported,
        "registration_endpoint": m.registration_endpoint,
        "registration_endpoint_jwt_signing_alg_values_supported": m.registration_endpoint_jwt_signing_alg_values_supported,
    });
    let Value::Object(map) = &mut doc else {
        return Map::new();
    };
    if let Some(a) = &m.authorization_endpoint {
        map.insert("authorization_endpoint".into(), json!(a));
    }
    if let Some(r) = &m.udap_authorization_extensions_required {
        map.insert("udap_authorization_extensions_required".into(), json!(r));
    }
    if let Some(r) = &m.udap_certifications_required {
        map.insert("udap_certifications_required".into(), json!(r));
    }
    std::mem::take(map)
}

/// The claims of `signed_metadata` at `now` (seconds), or `None` once the
/// certificate's `notAfter` has passed.
pub fn signed_claims(
    cfg: &TenantConfig,
    udap: &UdapConfig,
    not_after: i64,
    now: u64,
    jti: &str,
) -> Option<Value> {
    let now_i = i64::try_from(now).ok()?;
    if now_i >= not_after {
        return None;
    }
    let lifetime = i64::try_from(udap.lifetime.as_secs()).ok()?;
    let exp = (now_i + lifetime).min(not_after);
    let m = &udap.metadata;
    let mut claims = json!({
        "iss": cfg.public_base,
        "sub": cfg.public_base,
        "iat": now_i,
        "exp": exp,
        "jti": jti,
        "token_endpoint": m.token_endpoint,
        "registration_endpoint": m.registration_endpoint,
    });
    if let (Some(a), Value::Object(map)) = (&m.authorization_endpoint, &mut claims) {
        map.insert("authorization_endpoint".into(), json!(a));
    }
    Some(claims)
}

/// A signed answer and how long it may be served.
struct Signed {
    body: Bytes,
    ttl: Duration,
}

struct SignedExpiry;

impl moka::Expiry<(u64, String, Option<String>), Arc<Signed>> for SignedExpiry {
    fn expire_after_create(
        &self,
        _key: &(u64, String, Option<String>),
        value: &Arc<Signed>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// Signs and caches each tenant's metadata per community.
pub struct UdapSigner {
    /// (configuration generation, tenant, community) -> the JSON answer.
    cache: moka::future::Cache<(u64, String, Option<String>), Arc<Signed>>,
}

impl Default for UdapSigner {
    fn default() -> Self {
        UdapSigner {
            cache: moka::future::Cache::builder()
                .max_capacity(1_000)
                .expire_after(SignedExpiry)
                .build(),
        }
    }
}

/// What `/.well-known/udap` answers.
pub enum UdapAnswer {
    /// 200 with the JSON document.
    Metadata(Bytes),
    /// 204: the community is not one of the tenant's.
    UnknownCommunity,
}

impl UdapSigner {
    pub async fn answer(
        &self,
        tenant: &Tenant,
        req: &FhirRequest,
    ) -> Result<UdapAnswer, UdapError> {
        let udap = tenant.config.udap.as_ref().ok_or(UdapError::NotEnabled)?;
        let community = parse_community(req)?;
        let identity = match community {
            None => &udap.identity,
            Some(uri) => match udap.community(uri) {
                None => return Ok(UdapAnswer::UnknownCommunity),
                Some(c) => c.identity.as_ref().unwrap_or(&udap.identity),
            },
        };
        let key = (
            tenant.generation,
            tenant.id().to_owned(),
            community.map(str::to_owned),
        );
        let signed = self
            .cache
            .try_get_with(key, async {
                let now = now_secs();
                let jti = jti().ok_or(UdapError::Signing)?;
                let claims = signed_claims(&tenant.config, udap, identity.leaf().not_after, now, &jti)
                    .ok_or(UdapError::CertificateExpired)?;
                let exp = claims.get("exp").and_then(Value::as_u64).unwrap_or(now);
                let jwt = identity.sign_jws(&claims).map_err(|e| {
                    tracing::error!(tenant.id = %tenant.id(), error = %e, "udap metadata not signed");
                    UdapError::Signing
                })?;
                let mut doc = metadata_document(udap);
                doc.insert("signed_metadata".into(), Value::String(jwt));
                let body = serde_json::to_vec(&doc).map_err(|_| UdapError::Signing)?;
                // Re-signed when half the remaining lifetime has passed, so a client
                // never gets a JWT that is about to expire.
                let ttl = Duration::from_secs((exp.saturating_sub(now) / 2).max(1));
                Ok::<_, UdapError>(Arc::new(Signed {
                    body: Bytes::from(body),
                    ttl,
                }))
            })
            .await
            .map_err(|e: Arc<UdapError>| (*e).clone())?;
        Ok(UdapAnswer::Metadata(signed.body.clone()))
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A random JWT id (128 bits, hex).
fn jti() -> Option<String> {
    let mut buf = [0u8; 16];
    getrandom::getrandom(&mut buf).ok()?;
    Some(buf.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests;
