//! `fhirUser` claims that name a `PractitionerRole` (common in EHR-issued tokens).
//!
//! R4 has no PractitionerRole compartment: a role acts for the Practitioner it names.
//! The role is read from the tenant's upstream once and cached briefly; `user/` scopes
//! then reach that Practitioner's compartment. An inactive or missing role, or one
//! whose practitioner is not a local reference, reaches nothing; an unreachable
//! upstream fails the request (fail closed), and failures are never cached.

use std::sync::Arc;
use std::time::Duration;

use moka::future::Cache;
use serde_json::Value;

use crate::fhir::{OutboundRequest, ResourceId, ResourceType};
use crate::tenant::Tenant;
use crate::token::FhirUser;
use crate::upstream::{Upstream, UpstreamError};

/// How long a resolved role is trusted.
const ROLE_TTL: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct RoleResolver {
    upstream: Upstream,
    /// (configuration generation, tenant, role id) -> the role's practitioner.
    cache: Cache<(u64, String, String), Option<FhirUser>>,
}

impl RoleResolver {
    pub fn new(upstream: Upstream) -> Self {
        RoleResolver {
            upstream,
            cache: Cache::builder()
                .max_capacity(10_000)
                .time_to_live(ROLE_TTL)
                .build(),
        }
    }

    /// The Practitioner a PractitionerRole acts for, if any.
    pub async fn practitioner_of(
        &self,
        tenant: &Tenant,
        role: &ResourceId,
    ) -> Result<Option<FhirUser>, UpstreamError> {
        let key = (
            tenant.generation,
            tenant.id().to_owned(),
            role.as_str().to_owned(),
        );
        self.cache
            .try_get_with(key, fetch(&self.upstream, tenant, role))
            .await
            .map_err(|e: Arc<UpstreamError>| (*e).clone())
    }
}

async fn fetch(
    upstream: &Upstream,
    tenant: &Tenant,
    role: &ResourceId,
) -> Result<Option<FhirUser>, UpstreamError> {
    let out = OutboundRequest {
        method: http::Method::GET,
        path: format!("/PractitionerRole/{role}"),
        params: Vec::new(),
        body: None,
        conditional: false,
        narrowing: None,
        headers: Vec::new(),
    };
    let fetched = upstream
        .fetch(tenant, &out, &http::HeaderMap::new())
        .await?;
    if fetched.status == http::StatusCode::NOT_FOUND || fetched.status == http::StatusCode::GONE {
        return Ok(None);
    }
    if !fetched.status.is_success() {
        return Err(UpstreamError::Status(fetched.status));
    }
    let v: Value = serde_json::from_slice(&fetched.body)
        .map_err(|_| UpstreamError::BadResponse("practitioner role"))?;
    let bases = [
        tenant.config.upstream.base.as_str(),
        tenant.config.public_base.as_str(),
    ];
    Ok(practitioner_of_role(&v, role, &bases))
}

/// Pure: the practitioner a PractitionerRole resource names, if it is the role asked
/// for, active, and names a local Practitioner.
pub fn practitioner_of_role(role: &Value, id: &ResourceId, bases: &[&str]) -> Option<FhirUser> {
    if role.get("resourceType").and_then(Value::as_str) != Some("PractitionerRole")
        || role.get("id").and_then(Value::as_str) != Some(id.as_str())
        || role.get("active").and_then(Value::as_bool) == Some(false)
    {
        return None;
    }
    let reference = role.pointer("/practitioner/reference")?.as_str()?;
    let local = crate::fhir::parse_local_reference(reference, bases)?;
    (local.resource_type == ResourceType::PRACTITIONER).then_some(())?;
    Some(FhirUser {
        resource_type: ResourceType::PRACTITIONER,
        id: ResourceId::parse(local.id)?,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn id(s: &str) -> ResourceId {
        ResourceId::parse(s).unwrap()
    }

    const BASES: [&str; 2] = ["http://up/fhir", "https://proxy/t"];

    #[test]
    fn resolves_local_practitioners_only() {
        let role = |r: &str| json!({"resourceType": "PractitionerRole", "id": "r1", "practitioner": {"reference": r}});
        let pr = |r: &str| {
            practitioner_of_role(&role(r), &id("r1"), &BASES).map(|u| u.id.as_str().to_owned())
        };
        assert_eq!(pr("Practitioner/pr1").as_deref(), Some("pr1"));
        assert_eq!(pr("Practitioner/pr1/_history/3").as_deref(), Some("pr1"));
        assert_eq!(
            pr("http://up/fhir/Practitioner/pr1").as_deref(),
            Some("pr1")
        );
        assert_eq!(
            pr("https://proxy/t/Practitioner/pr1").as_deref(),
            Some("pr1")
        );
        for bad in [
            "https://elsewhere/fhir/Practitioner/pr1",
            "#pr1",
            "Patient/p1",
            "Practitioner/",
            "Practitioner/pr1/x",
            "Practitioner/a b",
        ] {
            assert_eq!(pr(bad), None, "{bad}");
        }
    }

    #[test]
    fn wrong_id_type_or_inactive_roles_resolve_to_nothing() {
        let ok = json!({"resourceType": "PractitionerRole", "id": "r1", "practitioner": {"reference": "Practitioner/pr1"}});
        assert!(practitioner_of_role(&ok, &id("r1"), &BASES).is_some());
        assert!(practitioner_of_role(&ok, &id("r2"), &BASES).is_none());
        let mut inactive = ok.clone();
        inactive["active"] = json!(false);
        assert!(practitioner_of_role(&inactive, &id("r1"), &BASES).is_none());
        let mut other = ok.clone();
        other["resourceType"] = json!("Practitioner");
        assert!(practitioner_of_role(&other, &id("r1"), &BASES).is_none());
        let no_practitioner = json!({"resourceType": "PractitionerRole", "id": "r1"});
        assert!(practitioner_of_role(&no_practitioner, &id("r1"), &BASES).is_none());
    }
}
