//! The fine-grained checker (stage 3, `openfga` tenants): `user/` and `system/` scope
//! contexts reach a record if OpenFGA says the principal `can_view` the patients the
//! record belongs to (its Patient compartment); `patient/` contexts keep the token
//! patient's compartment.
//!
//! The decisions themselves stay pure and synchronous ([`FgaDecisions::allows`], used
//! by [`super::ReleaseCtx::release`]); this module only gathers them, asynchronously and
//! before any record is released:
//! - for a search, [`OpenFgaChecker::listed`] lists every patient the principal may view
//!   (complete, or an error: never a silently capped list) and the search is narrowed to
//!   them (`rewrite`); the same list decides the returned entries;
//! - for anything else (reads, histories, `$everything`, compartment searches),
//!   [`OpenFgaChecker::decide`] collects the patients of every returned record and asks
//!   BatchCheck about all of them at once.
//!
//! Principals: `user/` scopes act as `user:<sub>`, `system/` scopes as
//! `system:<client_id>` (the subject when the token has no client id).

use std::collections::HashSet;
use std::sync::Arc;

use super::openfga::{FgaApi, FgaError, OpenFgaClient};
use super::{AuthzError, CompartmentIndex, Permit, Reach};
use crate::config::{MultiPatientPolicy, OpenFgaConfig};
use crate::fhir::ResourceType;
use crate::fhir::record::{Record, TextRecord};
use crate::smart::ScopeContext;
use crate::token::VerifiedToken;

/// The relation checked on `patient:<id>` objects.
pub const VIEW_RELATION: &str = "can_view";
/// The OpenFGA type of patients.
pub const PATIENT_TYPE: &str = "patient";

/// An OpenFGA principal: `user:<sub>` or `system:<client_id>`.
pub type Principal = Arc<str>;

/// The OpenFGA principal a scope context acts as, if the token names one.
pub fn principal_of(context: ScopeContext, token: &VerifiedToken) -> Option<Principal> {
    let (kind, id) = match context {
        ScopeContext::User => ("user", token.subject.as_deref()?),
        ScopeContext::System => (
            "system",
            token.client_id.as_deref().or(token.subject.as_deref())?,
        ),
        ScopeContext::Patient => return None,
    };
    // OpenFGA object ids: no whitespace, no `#` (userset separator), bounded.
    let ok = !id.is_empty()
        && id.len() <= 200
        && !id
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '#');
    ok.then(|| Arc::from(format!("{kind}:{id}")))
}

/// One tenant's OpenFGA checker, over an OpenFGA server ([`OpenFgaClient`] in
/// production, any [`FgaApi`] in tests).
pub struct OpenFgaChecker {
    pub client: Arc<dyn FgaApi>,
    pub policy: MultiPatientPolicy,
    pub max_listed: usize,
    pub chunk_size: usize,
    /// Complete patient lists by principal, for searches. Same TTL as the client's
    /// decision cache; keyed by the pinned model too, so a model change never reuses
    /// a list.
    lists: moka::future::Cache<(Arc<str>, Principal), Arc<PatientList>>,
    /// The pinned model id, shared by every list key.
    model: Arc<str>,
    /// The tenant the list cache's metrics are counted for.
    tenant: crate::metrics::TenantLabel,
}

/// Every patient one principal may view, complete.
#[derive(Debug)]
pub struct PatientList {
    pub ids: HashSet<String>,
    /// The same ids as a search narrowing needs them: made once per cached list, not
    /// per search.
    sorted: std::sync::OnceLock<PatientNarrowing>,
}

/// The allowed patients of an `openfga` search (from the OpenFGA lists and any
/// `patient/` compartment of the same token). Cached with the list it comes from, so
/// none of this is computed per search.
#[derive(Clone, Debug)]
pub struct PatientNarrowing {
    /// Sorted and distinct.
    pub ids: std::sync::Arc<[String]>,
    /// The same, as `Patient/{id}` references.
    pub refs: std::sync::Arc<[String]>,
    /// A digest of `ids` (SHA-256 based, not secret), so cursors can tell whether the
    /// list changed without hashing it per page.
    pub fingerprint: std::sync::Arc<str>,
}

impl PatientNarrowing {
    /// From sorted, distinct ids.
    pub fn new(ids: Vec<String>) -> Self {
        let refs = ids.iter().map(|id| format!("Patient/{id}")).collect();
        let mut message = Vec::with_capacity(ids.iter().map(|v| v.len() + 1).sum());
        for id in &ids {
            message.extend_from_slice(id.as_bytes());
            message.push(b',');
        }
        // HMAC-SHA256 under a fixed, public key: a collision-resistant digest from the
        // crypto the crate already has (a keyed cursor MAC is taken over it later).
        let key = jsonwebtoken::EncodingKey::from_secret(b"smart-fhir-proxy patient list");
        let fingerprint =
            jsonwebtoken::crypto::sign(&message, &key, jsonwebtoken::Algorithm::HS256)
                .unwrap_or_default();
        PatientNarrowing {
            ids: ids.into(),
            refs,
            fingerprint: fingerprint.into(),
        }
    }
}

impl PatientList {
    pub fn new(ids: HashSet<String>) -> Self {
        PatientList {
            ids,
            sorted: std::sync::OnceLock::new(),
        }
    }

    /// The ids sorted, as references, and their fingerprint.
    pub fn sorted(&self) -> &PatientNarrowing {
        self.sorted.get_or_init(|| {
            let mut ids: Vec<String> = self.ids.iter().cloned().collect();
            ids.sort_unstable();
            PatientNarrowing::new(ids)
        })
    }
}

impl std::fmt::Debug for OpenFgaChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenFgaChecker")
            .field("policy", &self.policy)
            .field("max_listed", &self.max_listed)
            .field("chunk_size", &self.chunk_size)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl OpenFgaChecker {
    /// The checker of tenant `tenant` (its metrics are counted for it).
    pub fn new(http: reqwest::Client, cfg: &OpenFgaConfig, tenant: &str) -> Result<Self, String> {
        let client = OpenFgaClient::for_tenant(http, cfg.connection.clone(), tenant)?;
        let mut checker = Self::with_api(Arc::new(client), cfg);
        checker.tenant = crate::metrics::global().register_tenant(tenant);
        Ok(checker)
    }

    /// The checker for `cfg` over `client`.
    pub fn with_api(client: Arc<dyn FgaApi>, cfg: &OpenFgaConfig) -> Self {
        OpenFgaChecker {
            tenant: crate::metrics::TenantLabel::NONE,
            client,
            policy: cfg.multi_patient_policy,
            max_listed: cfg.max_listed_patients,
            chunk_size: cfg.search_chunk_size,
            lists: moka::future::Cache::builder()
                .max_capacity(1_000)
                .time_to_live(cfg.connection.cache_ttl)
                .build(),
            model: Arc::from(cfg.connection.authorization_model_id.as_str()),
        }
    }

    /// Whether some FGA principal of `permit` may view patient `id` (one Check each;
    /// cached).
    pub async fn can_view(&self, permit: &Permit, id: &str) -> Result<bool, AuthzError> {
        let object = format!("{PATIENT_TYPE}:{id}");
        for principal in permit.fga_principals() {
            if self
                .client
                .check(principal, VIEW_RELATION, &object)
                .await
                .map_err(fga_error)?
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The complete patient list of every FGA principal of `permit` (StreamedListObjects,
    /// at most `max_listed` each, cached for the TTL).
    pub async fn listed(&self, permit: &Permit) -> Result<FgaListed, AuthzError> {
        let mut per_principal = Vec::new();
        for principal in permit.fga_principals() {
            let key = (Arc::clone(&self.model), Arc::clone(principal));
            let mut missed = false;
            let list = self
                .lists
                .try_get_with(key, async {
                    missed = true;
                    let objects = self
                        .client
                        .list_objects_complete(
                            principal,
                            VIEW_RELATION,
                            PATIENT_TYPE,
                            self.max_listed,
                        )
                        .await?;
                    let ids = objects
                        .into_iter()
                        .filter_map(|o| {
                            o.strip_prefix("patient:")
                                .filter(|id| crate::fhir::ResourceId::is_valid(id))
                                .map(str::to_owned)
                        })
                        .collect();
                    Ok::<_, FgaError>(Arc::new(PatientList::new(ids)))
                })
                .await
                .map_err(|e: Arc<FgaError>| fga_error((*e).clone()));
            let hit = u64::from(!missed);
            crate::metrics::global().fga_cache(
                self.tenant,
                crate::metrics::FgaCache::List,
                hit,
                1 - hit,
            );
            per_principal.push((Arc::clone(principal), list?));
        }
        Ok(FgaListed { per_principal })
    }

    /// Decisions for every patient the records in `answer` (the JSON of a resource or a
    /// Bundle of them) belong to: from `listed` where a principal's complete list is
    /// known (the answer is then not even parsed), else from BatchCheck (all patients of
    /// the answer at once, per principal). An answer that is not JSON has no patients;
    /// the answer check refuses it.
    /// The patients among `patients` (ids) on which `principal` has `relation`: one
    /// BatchCheck (none for no patients).
    pub async fn patients_with(
        &self,
        principal: &str,
        relation: &str,
        patients: &[String],
    ) -> Result<Arc<PatientList>, AuthzError> {
        if patients.is_empty() {
            return Ok(Arc::new(PatientList::new(HashSet::new())));
        }
        let objects: Vec<String> = patients
            .iter()
            .map(|id| format!("{PATIENT_TYPE}:{id}"))
            .collect();
        let answers = self
            .client
            .batch_check(principal, relation, &objects)
            .await
            .map_err(fga_error)?;
        let ids = answers
            .into_iter()
            .filter(|(_, allowed)| *allowed)
            .filter_map(|(o, _)| o.strip_prefix("patient:").map(str::to_owned))
            .collect();
        Ok(Arc::new(PatientList::new(ids)))
    }

    pub async fn decide(
        &self,
        permit: &Permit,
        listed: Option<&FgaListed>,
        answer: &[u8],
        index: &CompartmentIndex,
        bases: &[&str],
    ) -> Result<FgaDecisions, AuthzError> {
        let mut by_principal = Vec::new();
        let mut patients: Option<Vec<String>> = None;
        for principal in permit.fga_principals() {
            if let Some(list) = listed.and_then(|l| l.of(principal)) {
                by_principal.push((Arc::clone(principal), Arc::clone(list)));
                continue;
            }
            let patients = patients.get_or_insert_with(|| patients_in(answer, index, bases));
            let allowed = self
                .patients_with(principal, VIEW_RELATION, patients)
                .await?;
            by_principal.push((Arc::clone(principal), allowed));
        }
        Ok(FgaDecisions {
            policy: self.policy,
            by_principal,
        })
    }
}

/// Complete patient lists for a search (a request extension written by stage 4).
#[derive(Debug, Clone)]
pub struct FgaListed {
    pub per_principal: Vec<(Principal, Arc<PatientList>)>,
}

impl FgaListed {
    fn of(&self, principal: &str) -> Option<&Arc<PatientList>> {
        self.per_principal
            .iter()
            .find(|(p, _)| &**p == principal)
            .map(|(_, l)| l)
    }

    /// Every listed patient and `extra` ones, sorted and distinct (stable chunks across
    /// pages). One list and nothing extra (the usual case) is shared with the cache, not
    /// copied.
    pub fn union_sorted(&self, extra: &[String]) -> PatientNarrowing {
        if let ([(_, only)], []) = (self.per_principal.as_slice(), extra) {
            return only.sorted().clone();
        }
        let mut all: Vec<String> = self
            .per_principal
            .iter()
            .flat_map(|(_, l)| l.ids.iter().cloned())
            .chain(extra.iter().cloned())
            .collect();
        all.sort_unstable();
        all.dedup();
        PatientNarrowing::new(all)
    }
}

/// Which patients each FGA principal may view, for the records of one answer.
#[derive(Debug, Clone)]
pub struct FgaDecisions {
    pub policy: MultiPatientPolicy,
    pub by_principal: Vec<(Principal, Arc<PatientList>)>,
}

impl FgaDecisions {
    /// Whether `principal` may see a record that belongs to `patients`. A record that
    /// belongs to no patient is not patient data this checker can vouch for: denied.
    /// A patient without a decision counts as denied (fail closed).
    pub fn allows(&self, principal: &str, patients: &[String]) -> bool {
        let Some((_, list)) = self.by_principal.iter().find(|(p, _)| &**p == principal) else {
            return false;
        };
        if patients.is_empty() {
            return false;
        }
        match self.policy {
            MultiPatientPolicy::AnyOf => patients.iter().any(|p| list.ids.contains(p)),
            MultiPatientPolicy::AllOf => patients.iter().all(|p| list.ids.contains(p)),
        }
    }
}

/// The patients whose compartments the records of an answer are in (every Bundle
/// entry's, or the one resource's), sorted and distinct. The answer is read in one
/// pass, each resource's compartment links walked in its text; an answer that cannot be
/// read has no patients (and its check fails on its own).
pub fn patients_in(answer: &[u8], index: &CompartmentIndex, bases: &[&str]) -> Vec<String> {
    let Some(read) = std::str::from_utf8(answer)
        .ok()
        .and_then(|text| crate::fhir::answer::read(text).ok())
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut add = |resource: &TextRecord<'_>| {
        if let Some(rt) = resource
            .resource_type()
            .as_deref()
            .and_then(ResourceType::parse)
        {
            out.extend(index.owners(ResourceType::PATIENT, rt, resource, bases));
        }
    };
    if read.resource_type.as_deref() == Some("Bundle") {
        read.entries
            .iter()
            .filter_map(|e| e.resource.as_ref())
            .for_each(&mut add);
    } else {
        add(&read.resource);
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// An OpenFGA failure as the authorization error the client sees: fail closed.
pub fn fga_error(e: FgaError) -> AuthzError {
    tracing::warn!(authz.reason = e.reason(), error = %e, "openfga call failed");
    match e {
        FgaError::TooMany { max } => AuthzError::TooManyPatients { max },
        other => AuthzError::FgaUnavailable {
            reason: other.reason(),
        },
    }
}

impl Permit {
    /// The OpenFGA principals of this permit's contexts.
    pub fn fga_principals(&self) -> impl Iterator<Item = &Principal> {
        self.reaches.iter().filter_map(|(_, r)| match r {
            Reach::Fga(p) => Some(p),
            _ => None,
        })
    }

    pub fn has_fga(&self) -> bool {
        self.fga_principals().next().is_some()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn token(sub: Option<&str>, client_id: Option<&str>) -> VerifiedToken {
        VerifiedToken {
            issuer: "https://issuer.example".to_owned(),
            subject: sub.map(str::to_owned),
            client_id: client_id.map(str::to_owned),
            scopes: crate::smart::parse_scopes("user/*.rs"),
            patient: None,
            fhir_user: None,
            expires_at: u64::MAX,
        }
    }

    #[test]
    fn principals_come_from_subject_and_client_id() {
        let t = token(Some("alice"), Some("app"));
        assert_eq!(
            principal_of(ScopeContext::User, &t).as_deref(),
            Some("user:alice")
        );
        assert_eq!(
            principal_of(ScopeContext::System, &t).as_deref(),
            Some("system:app")
        );
        assert_eq!(principal_of(ScopeContext::Patient, &t), None);
        let only_sub = token(Some("svc"), None);
        assert_eq!(
            principal_of(ScopeContext::System, &only_sub).as_deref(),
            Some("system:svc")
        );
        // Ids that are not OpenFGA object ids grant nothing.
        for bad in ["", "a b", "group:x#member", "tab\there"] {
            assert_eq!(
                principal_of(ScopeContext::User, &token(Some(bad), None)),
                None,
                "{bad:?}"
            );
        }
        assert_eq!(
            principal_of(ScopeContext::User, &token(None, Some("app"))),
            None
        );
    }

    fn decisions(policy: MultiPatientPolicy, allowed: &[&str]) -> FgaDecisions {
        FgaDecisions {
            policy,
            by_principal: vec![(
                Arc::from("user:alice"),
                Arc::new(PatientList::new(
                    allowed.iter().map(|s| (*s).to_owned()).collect(),
                )),
            )],
        }
    }

    #[test]
    fn multi_patient_policy_any_of_and_all_of() {
        let ids = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let any = decisions(MultiPatientPolicy::AnyOf, &["p1"]);
        let all = decisions(MultiPatientPolicy::AllOf, &["p1"]);
        assert!(any.allows("user:alice", &ids(&["p1", "p2"])));
        assert!(!all.allows("user:alice", &ids(&["p1", "p2"])));
        assert!(all.allows("user:alice", &ids(&["p1", "p1"])));
        // No patient, no decision for the principal, or another principal: denied.
        assert!(!any.allows("user:alice", &[]));
        assert!(!any.allows("user:bob", &ids(&["p1"])));
        assert!(!any.allows("user:alice", &ids(&["p2"])));
    }

    #[test]
    fn the_patients_of_an_answer_are_every_entrys_compartment_owners() {
        let index = CompartmentIndex::official().unwrap();
        let bundle = json!({"resourceType": "Bundle", "entry": [
            {"resource": {"resourceType": "Observation", "id": "o1",
                "subject": {"reference": "Patient/p1"},
                "performer": [{"reference": "https://up/fhir/Patient/p2"}, {"reference": "Practitioner/x"}]}},
            {"resource": {"resourceType": "Patient", "id": "p3", "link": [{"other": {"reference": "Patient/p1"}}]}},
            {"resource": {"resourceType": "Observation", "id": "o2", "subject": {"reference": "https://elsewhere/Patient/p9"}}},
            {"resource": {"resourceType": "Practitioner", "id": "x"}}
        ]});
        assert_eq!(
            patients_in(bundle.to_string().as_bytes(), &index, &["https://up/fhir"]),
            vec!["p1", "p2", "p3"]
        );
        let single =
            json!({"resourceType": "Condition", "id": "c", "subject": {"reference": "Patient/p7"}});
        assert_eq!(
            patients_in(single.to_string().as_bytes(), &index, &[]),
            vec!["p7"]
        );
    }
}
