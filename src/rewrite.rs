//! Stage 4: the outbound request, narrowed.
//!
//! A pure function of the parsed request, the scope grant and the permit: it rebuilds
//! the upstream path from the parsed parts (never from the raw client URL) and, for
//! searches by compartment-bound tokens, narrows them so the upstream only looks at
//! allowed records: a type search becomes a search inside the compartment, and a
//! search inside a compartment is sent as the upstream can answer it
//! ([`CompartmentSearch`]): the compartment search `[Owner]/[id]/[type]` (the
//! FHIR-defined union of every linking parameter) or a type search on one linking
//! parameter (`[type]?...&subject=Patient/p1`); a search on the compartment's own
//! type gets `_id=[id]`. Client parameters are kept; repeated
//! parameters are ANDed by FHIR, so they can only narrow further. Scope constraints
//! (`?category=...`) are appended. Whatever comes back is still re-checked in stage 5.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request};

use crate::authz::fga::PatientNarrowing;
use crate::authz::{AuthzError, Checker, Permit, authorize_as};
use crate::config::CompartmentSearch;
use crate::cursor::{self, CursorError, CursorKey, Resumed};
use crate::discovery::{Capabilities, DiscoveryError};
use crate::fhir::capability::SearchSupport;
use crate::fhir::{
    CompartmentIndex, FhirRequest, Interaction, Narrowing, OutboundRequest, ResourceType,
};
use crate::pipeline::{Flow, Internal, Stage, ext};
use crate::scope::{ScopeError, ScopeGrant, SearchConstraint, TokenContext, check_scopes};
use crate::tenant::{Tenant, tenant_of};
use crate::token::{FhirUser, VerifiedToken};
use crate::upstream::{FhirServer, Upstream};

/// What stage 4 fails with: what the narrowing refuses (authz's error type: a search it
/// cannot narrow is a request the permit does not allow), and for `_cursor` requests
/// the cursor's errors and those of the scope and record decisions it runs again.
#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error(transparent)]
    Authz(#[from] AuthzError),
    #[error(transparent)]
    Scope(#[from] ScopeError),
    #[error(transparent)]
    Cursor(#[from] CursorError),
    /// The upstream's CapabilityStatement could not be had (restricted searches are
    /// held to the parameters it declares).
    #[error(transparent)]
    Capabilities(#[from] DiscoveryError),
    #[error(transparent)]
    Internal(#[from] Internal),
}

/// Stage 4 for a `_cursor` request: verifies the cursor against the tenant, the token
/// and the request shape ([`cursor::open`]), re-authorizes the original request
/// (scopes, records, narrowing) with the current token, and builds the outbound request
/// from the stored page ([`cursor::resume_page`]). `Ok(None)` when the request has no
/// cursor. Pure: the caller passes `now`.
#[allow(clippy::too_many_arguments)]
pub fn resume(
    key: &CursorKey,
    tenant: &Tenant,
    checker: &Checker,
    token: &VerifiedToken,
    user: Option<&FhirUser>,
    req: &FhirRequest,
    patients: Option<(&PatientNarrowing, usize)>,
    now: u64,
) -> Result<Option<(OutboundRequest, Resumed)>, RewriteError> {
    let Some((cursor, original)) = cursor::open(key, tenant.id(), token, req, now)? else {
        return Ok(None);
    };
    let grant = check_scopes(
        &token.scopes,
        &original,
        TokenContext {
            has_patient: token.patient.is_some(),
        },
    )?;
    // Re-authorized exactly as the request that issued the cursor was, with the
    // resolved fhirUser (a PractitionerRole acts as its Practitioner).
    let permit = authorize_as(checker, &original, token, &grant, user.cloned())?;
    let narrowed = rewrite_request_with(
        &original,
        &grant,
        &permit,
        checker.index(),
        &Bytes::new(),
        patients,
        tenant.config.upstream.compartment_search,
    )?;
    Ok(Some(cursor::resume_page(key, cursor, narrowed)?))
}

/// Builds the outbound request. Pure: no I/O.
pub fn rewrite_request(
    req: &FhirRequest,
    grant: &ScopeGrant,
    permit: &Permit,
    index: &CompartmentIndex,
    body: &Bytes,
) -> Result<OutboundRequest, AuthzError> {
    rewrite_request_with(
        req,
        grant,
        permit,
        index,
        body,
        None,
        CompartmentSearch::Native,
    )
}

/// As [`rewrite_request`]; `patients` is the allowed patient list of an `openfga`
/// search (required for type searches of patient data by OpenFGA principals), `how`
/// the way the tenant's upstream is asked for searches inside a compartment.
pub fn rewrite_request_with(
    req: &FhirRequest,
    grant: &ScopeGrant,
    permit: &Permit,
    index: &CompartmentIndex,
    body: &Bytes,
    patients: Option<(&PatientNarrowing, usize)>,
    how: CompartmentSearch,
) -> Result<OutboundRequest, AuthzError> {
    let mut narrowing = None;
    // ---- paging cursors (see `crate::cursor`) ----
    // A `_cursor` request is answered from its verified cursor by `RewriteSearch`
    // before this function; one that gets here was not, and is never forwarded.
    if req.params.iter().any(|(k, _)| k == cursor::PARAM) {
        return Err(AuthzError::NotNarrowable {
            interaction: req.interaction.name(),
        });
    }
    // ---- end paging cursors ----
    let t = req.resource_type.map(|t| t.as_str()).unwrap_or("");
    let id = req.id.as_ref().map(|i| i.as_str()).unwrap_or("");
    // `_format` would let the client ask for XML, which the proxy cannot check: the
    // upstream is always asked for JSON (Accept header) instead.
    let mut params: Vec<(String, String)> = req
        .params
        .iter()
        .filter(|(k, _)| k != "_format")
        .cloned()
        .collect();
    let mut method = Method::GET;
    let mut out_body = None;
    let path = match &req.interaction {
        Interaction::Read => format!("/{t}/{id}"),
        Interaction::Vread => {
            let v = req.version.as_ref().map(|v| v.as_str()).unwrap_or("");
            format!("/{t}/{id}/_history/{v}")
        }
        Interaction::HistoryInstance => format!("/{t}/{id}/_history"),
        Interaction::HistoryType | Interaction::HistorySystem => {
            if !permit.is_unrestricted() {
                return Err(AuthzError::NotNarrowable {
                    interaction: req.interaction.name(),
                });
            }
            match req.resource_type {
                Some(_) => format!("/{t}/_history"),
                None => "/_history".to_owned(),
            }
        }
        Interaction::SearchType => {
            let rt = req.resource_type.ok_or(AuthzError::NotNarrowable {
                interaction: req.interaction.name(),
            })?;
            add_constraint(&mut params, constraint(grant, t)?, t)?;
            // Inference-prone parameters are refused for every restricted token, even
            // where it reaches the whole type: `Practitioner?_has:Observation:...` would
            // reveal facts about patients it cannot see.
            if !permit.is_unrestricted() {
                refuse_inference_params(&params)?;
            }
            if permit.is_unrestricted() {
                format!("/{t}")
            } else if permit.reaches_whole_type(rt, index) {
                // Unnarrowed for a restricted token: reverse and iterated includes would
                // make the upstream walk from every record of the type to records the
                // token cannot see.
                refuse_wholesale_includes(&params)?;
                format!("/{t}")
            } else if permit.has_fga() {
                let (list, chunk_size) = patients.ok_or(AuthzError::NotNarrowable {
                    interaction: req.interaction.name(),
                })?;
                let param = patient_param(index, rt)
                    .ok_or(AuthzError::OutsideCompartment { resource_type: rt })?;
                let values = std::sync::Arc::clone(if param == "_id" {
                    &list.ids
                } else {
                    &list.refs
                });
                narrowing = Some(Narrowing {
                    param: param.to_owned(),
                    values,
                    chunk_size,
                    chunk: 0,
                    send: true,
                    fingerprint: std::sync::Arc::clone(&list.fingerprint),
                });
                format!("/{t}")
            } else {
                let mut compartments: Vec<_> = permit.compartments().collect();
                compartments.dedup();
                match compartments.as_slice() {
                    [c] if c.owner == rt => {
                        params.push(("_id".to_owned(), c.id.as_str().to_owned()));
                        format!("/{t}")
                    }
                    [c] if index.links_type(c.owner, rt) => {
                        compartment_search(how, index, c.owner, c.id.as_str(), rt, &mut params)?
                    }
                    // Stage 3 already refuses this; kept so the narrowing never forwards
                    // a search it could not narrow.
                    [_] => return Err(AuthzError::OutsideCompartment { resource_type: rt }),
                    _ => {
                        return Err(AuthzError::NotNarrowable {
                            interaction: req.interaction.name(),
                        });
                    }
                }
            }
        }
        Interaction::SearchSystem => {
            if !permit.is_unrestricted() {
                return Err(AuthzError::NotNarrowable {
                    interaction: req.interaction.name(),
                });
            }
            String::new()
        }
        Interaction::SearchCompartment => {
            let c = req.compartment.as_ref().ok_or(AuthzError::NotNarrowable {
                interaction: req.interaction.name(),
            })?;
            if req.resource_type.is_some() {
                add_constraint(&mut params, constraint(grant, t)?, t)?;
            }
            if !permit.is_unrestricted() {
                refuse_inference_params(&params)?;
            }
            match req.resource_type {
                Some(rt) => {
                    compartment_search(how, index, c.owner, c.id.as_str(), rt, &mut params)?
                }
                // Every type of the compartment: the upstream's to answer or refuse.
                None => format!("/{}/{}/*", c.owner, c.id),
            }
        }
        Interaction::Operation(op, level) => {
            use crate::fhir::OperationLevel;
            if !permit.is_unrestricted() {
                refuse_inference_params(&params)?;
            }
            if req.method == Method::POST {
                method = Method::POST;
                out_body = Some(body.clone());
            }
            match level {
                OperationLevel::System => format!("/${}", op.as_str()),
                OperationLevel::Type => format!("/{t}/${}", op.as_str()),
                OperationLevel::Instance => format!("/{t}/{id}/${}", op.as_str()),
            }
        }
        Interaction::Capabilities
        | Interaction::SmartConfiguration
        | Interaction::UdapMetadata
        | Interaction::Create
        | Interaction::Update
        | Interaction::Patch
        | Interaction::Delete
        | Interaction::BatchOrTransaction => {
            return Err(AuthzError::NotSupported {
                interaction: req.interaction.name(),
            });
        }
    };
    if !permit.is_unrestricted() {
        widen_elements(&mut params, permit, req.resource_type, index);
    }
    refuse_hidden_counts(req, grant, permit, index)?;
    Ok(OutboundRequest {
        method,
        path,
        params,
        body: out_body,
        conditional: permit.is_unrestricted(),
        narrowing,
    })
}

/// The upstream path of a search of `rt` inside the compartment `owner/id`: the FHIR
/// compartment search where the upstream implements it, else a type search on the
/// owner's own type (`_id`) or on the type's linking parameter ([`linking_param`]),
/// appended to `params`. A type the compartment does not link is refused.
fn compartment_search(
    how: CompartmentSearch,
    index: &CompartmentIndex,
    owner: ResourceType,
    id: &str,
    rt: ResourceType,
    params: &mut Vec<(String, String)>,
) -> Result<String, AuthzError> {
    match how {
        CompartmentSearch::Native => Ok(format!("/{owner}/{id}/{rt}")),
        CompartmentSearch::ByParameter if owner == rt => {
            params.push(("_id".to_owned(), id.to_owned()));
            Ok(format!("/{rt}"))
        }
        CompartmentSearch::ByParameter => {
            let param = linking_param(index, owner, rt)
                .ok_or(AuthzError::OutsideCompartment { resource_type: rt })?;
            params.push((param.to_owned(), format!("{owner}/{id}")));
            Ok(format!("/{rt}"))
        }
    }
}

/// The one parameter a search of `rt` inside an `owner` compartment is narrowed with
/// when the upstream has no compartment search: for the Patient compartment the
/// type's patient parameter ([`patient_param`]), else the first linking parameter of
/// the CompartmentDefinition.
pub fn linking_param(
    index: &CompartmentIndex,
    owner: ResourceType,
    rt: ResourceType,
) -> Option<&str> {
    if owner == ResourceType::PATIENT {
        return patient_param(index, rt).filter(|p| *p != "_id");
    }
    index.params(owner, rt).first().map(String::as_str)
}

/// The parameter a search of `rt` is narrowed to a patient list with: `_id` on
/// Patient, else `patient`, `subject` or the first Patient compartment parameter of
/// the type. Records that are in a patient's compartment only through another
/// parameter (an Observation whose `performer` is the patient) are not found by such
/// a search; they stay readable one by one.
pub fn patient_param(index: &CompartmentIndex, rt: crate::fhir::ResourceType) -> Option<&str> {
    if rt == crate::fhir::ResourceType::PATIENT {
        return Some("_id");
    }
    let params = index.params(crate::fhir::ResourceType::PATIENT, rt);
    ["patient", "subject"]
        .into_iter()
        .find(|p| params.iter().any(|q| q == p))
        .or_else(|| params.first().map(String::as_str))
}

/// `_elements` may strip the references that prove a record is in the token's
/// compartment, and the answer check would then drop every entry. For restricted
/// tokens the linking elements are added (FHIR lets a server return more elements than
/// asked for), so the check can see them.
fn widen_elements(
    params: &mut [(String, String)],
    permit: &Permit,
    rt: Option<crate::fhir::ResourceType>,
    index: &CompartmentIndex,
) {
    let Some(rt) = rt else { return };
    let mut roots: Vec<&str> = permit
        .owner_types()
        .flat_map(|owner| index.link_roots(owner, rt))
        .collect();
    roots.sort_unstable();
    roots.dedup();
    for (_, value) in params.iter_mut().filter(|(n, _)| n == "_elements") {
        let present: Vec<&str> = value.split(',').map(str::trim).collect();
        let missing: Vec<&str> = roots
            .iter()
            .copied()
            .filter(|r| !present.contains(r))
            .collect();
        if !missing.is_empty() {
            *value = format!("{value},{}", missing.join(","));
        }
    }
}

/// Refuses parameters that make the upstream look at records beyond those it returns,
/// so a narrowed search could reveal facts about records outside the token's reach by
/// inference: chained parameters (`subject:Patient.name=`), reverse chains (`_has`),
/// the free-form or container parameters `_filter`, `_query`, `_contained`,
/// `_containedType`, `_list` (resolves a List the token may not see), and chained
/// `_sort` keys. Used for compartment-bound tokens only.
fn refuse_inference_params(params: &[(String, String)]) -> Result<(), AuthzError> {
    for (name, value) in params {
        let base = name.split(':').next().unwrap_or(name);
        let refused = name.contains('.')
            || matches!(
                base,
                "_has" | "_filter" | "_query" | "_contained" | "_containedType" | "_list"
            )
            || (base == "_sort" && value.contains(['.', ':']));
        if refused {
            let mut shown: String = name.chars().take(64).collect();
            if shown.len() < name.len() {
                shown.push_str("...");
            }
            return Err(AuthzError::ParameterNotAllowed { name: shown });
        }
    }
    Ok(())
}

/// Refuses `_summary=count` where the count could include records the token may not
/// see: the upstream counts every match, and the answer check can only hand the count
/// out when every match of the type would be released (see `forward::filter`). A
/// count-only answer without its count would mislead, so it is refused instead.
fn refuse_hidden_counts(
    req: &FhirRequest,
    grant: &ScopeGrant,
    permit: &Permit,
    index: &CompartmentIndex,
) -> Result<(), AuthzError> {
    let counts = req
        .params
        .iter()
        .any(|(k, v)| k == "_summary" && v.trim() == "count");
    if counts && !permit.releases_every_match(grant, req.resource_type, index) {
        return Err(AuthzError::ParameterNotAllowed {
            name: "_summary=count".to_owned(),
        });
    }
    Ok(())
}

/// Refuses `_revinclude` and `:iterate` includes (see the caller).
fn refuse_wholesale_includes(params: &[(String, String)]) -> Result<(), AuthzError> {
    match params.iter().find(|(n, _)| {
        n.starts_with("_revinclude") || (n.starts_with("_include") && n.contains(":iterate"))
    }) {
        Some((name, _)) => Err(AuthzError::ParameterNotAllowed {
            name: name.chars().take(64).collect(),
        }),
        None => Ok(()),
    }
}

/// The one constraint that applies to every context's results. Contexts with
/// different constraints cannot share one upstream query: refused, never merged
/// (a merge would apply one context's constraint to another's results).
fn constraint(grant: &ScopeGrant, rt: &str) -> Result<SearchConstraint, AuthzError> {
    let mut per_context = grant
        .contexts()
        .iter()
        .filter_map(|c| grant.constraint_for(c));
    let Some(first) = per_context.next() else {
        return Ok(SearchConstraint::None);
    };
    if per_context.any(|c| c != first) {
        return Err(AuthzError::ConstraintNotNarrowable {
            resource_type: rt.to_owned(),
        });
    }
    Ok(first.clone())
}

/// Appends a scope constraint. One conjunction: all its pairs. Several conjunctions of
/// one pair on the same parameter: one comma list (FHIR's OR; each value is already
/// FHIR search syntax, so a value's own commas keep their OR meaning). Anything else cannot be
/// expressed as a single search and is refused.
fn add_constraint(
    params: &mut Vec<(String, String)>,
    constraint: SearchConstraint,
    rt: &str,
) -> Result<(), AuthzError> {
    match constraint {
        SearchConstraint::None => Ok(()),
        SearchConstraint::AnyOf(conjunctions) => match conjunctions.as_slice() {
            [] => Ok(()),
            [only] => {
                params.extend(only.iter().cloned());
                Ok(())
            }
            many => {
                let name = many
                    .first()
                    .and_then(|c| c.first())
                    .map(|(n, _)| n.clone())
                    .unwrap_or_default();
                let single_same = many
                    .iter()
                    .all(|c| c.len() == 1 && c.first().is_some_and(|(n, _)| *n == name));
                if !single_same {
                    return Err(AuthzError::ConstraintNotNarrowable {
                        resource_type: rt.to_owned(),
                    });
                }
                let values: Vec<String> = many
                    .iter()
                    .filter_map(|c| c.first())
                    .map(|(_, v)| v.clone())
                    .collect();
                params.push((name, values.join(",")));
                Ok(())
            }
        },
    }
}

/// Refuses, for restricted tokens, a search parameter the upstream does not declare
/// for the searched type ([`SearchSupport`]): a lenient upstream would ignore it and
/// answer a wider search than the client asked for. Client parameters only (the
/// narrowing's own are added later); unrestricted tokens are the upstream's to judge.
pub fn check_declared_params(
    req: &FhirRequest,
    permit: &Permit,
    support: &SearchSupport,
) -> Result<(), AuthzError> {
    if permit.is_unrestricted() || !searches_upstream(req) {
        return Ok(());
    }
    let Some(rt) = req.resource_type else {
        return Ok(());
    };
    match support.first_undeclared(rt, &req.params) {
        Some(name) => Err(AuthzError::UndeclaredParameter {
            name: name.chars().take(64).collect(),
            resource_type: rt,
        }),
        None => Ok(()),
    }
}

/// Whether the request is a search whose parameters the upstream interprets.
fn searches_upstream(req: &FhirRequest) -> bool {
    matches!(
        req.interaction,
        Interaction::SearchType | Interaction::SearchCompartment
    ) && !req.params.iter().any(|(k, _)| k == cursor::PARAM)
}

/// The stage.
pub struct RewriteSearch<U = Upstream> {
    cursors: CursorKey,
    capabilities: Arc<Capabilities<U>>,
}

impl<U: FhirServer> RewriteSearch<U> {
    pub fn new(cursors: CursorKey, capabilities: Arc<Capabilities<U>>) -> Self {
        RewriteSearch {
            cursors,
            capabilities,
        }
    }
}

impl<U: FhirServer> Stage for RewriteSearch<U> {
    type Error = RewriteError;

    async fn run(&self, req: &mut Request<Bytes>) -> Result<Flow, RewriteError> {
        let patients = self.fga_patients(req).await?;
        // ---- paging cursors (see `crate::cursor`) ----
        // A `_cursor` request: verified, re-authorized and built from its cursor; no
        // other client parameter is used.
        let resumed = resume(
            &self.cursors,
            &tenant_of(req)?.0,
            ext::<Arc<Checker>>(req, "missing Checker")?,
            ext::<Arc<VerifiedToken>>(req, "missing VerifiedToken")?,
            ext::<Permit>(req, "missing Permit")?.user.as_ref(),
            ext::<FhirRequest>(req, "missing FhirRequest")?,
            patients.as_ref().map(|(p, size)| (p, *size)),
            cursor::now(),
        )?;
        if let Some((out, resumed)) = resumed {
            req.extensions_mut().insert(out);
            req.extensions_mut().insert(resumed);
            return Ok(Flow::Continue);
        }
        // ---- end paging cursors ----
        let tenant = tenant_of(req)?;
        let fhir = ext::<FhirRequest>(req, "missing FhirRequest")?;
        let grant = ext::<ScopeGrant>(req, "missing ScopeGrant")?;
        let permit = ext::<Permit>(req, "missing Permit")?;
        let out = rewrite_request_with(
            fhir,
            grant,
            permit,
            ext::<Arc<Checker>>(req, "missing Checker")?.index(),
            req.body(),
            patients.as_ref().map(|(p, size)| (p, *size)),
            tenant.0.config.upstream.compartment_search,
        )?;
        // After the pure refusals, so a parameter refused for what it could reveal is
        // named for that, not for being undeclared.
        if !permit.is_unrestricted() && searches_upstream(fhir) {
            let known = self.capabilities.of(&tenant.0).await?;
            check_declared_params(fhir, permit, &known.search)?;
        }
        req.extensions_mut().insert(out);
        Ok(Flow::Continue)
    }
}

impl<U: FhirServer> RewriteSearch<U> {
    /// For a type search of patient data by OpenFGA principals: every patient they
    /// may view, complete (or the request fails), kept as a request extension for the
    /// answer check, and as the list the search is narrowed to.
    async fn fga_patients(
        &self,
        req: &mut Request<Bytes>,
    ) -> Result<Option<(PatientNarrowing, usize)>, RewriteError> {
        let checker = Arc::clone(ext::<Arc<Checker>>(req, "missing Checker")?);
        let Some(fga) = checker.fga() else {
            return Ok(None);
        };
        let fhir = ext::<FhirRequest>(req, "missing FhirRequest")?;
        let permit = ext::<Permit>(req, "missing Permit")?;
        let wants_list = fhir.interaction == Interaction::SearchType
            && permit.has_fga()
            && fhir
                .resource_type
                .is_some_and(|rt| !permit.reaches_whole_type(rt, checker.index()));
        if !wants_list {
            return Ok(None);
        }
        let listed = fga.listed(permit).await?;
        // A `patient/` context of the same token reaches its own patient too.
        let extra: Vec<String> = permit
            .compartments()
            .filter(|c| c.owner == crate::fhir::ResourceType::PATIENT)
            .map(|c| c.id.as_str().to_owned())
            .collect();
        let narrowing = listed.union_sorted(&extra);
        req.extensions_mut().insert(listed);
        Ok(Some((narrowing, fga.chunk_size)))
    }
}

#[cfg(test)]
mod tests;
