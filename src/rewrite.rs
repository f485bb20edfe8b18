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
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, header};

use crate::authz::fga::PatientNarrowing;
use crate::authz::write::{ReturnPref, WritePlan, is_write};
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
        headers: Vec::new(),
    })
}

// ---- writes (`authz::write`) ----

/// What a conditional write's criteria are called in refusals.
const CONDITIONAL: &str = "conditional write";

/// Narrows the criteria of a conditional write (`If-None-Exist`, `PUT [type]?...`,
/// `DELETE [type]?...`) exactly as a search of `rt` with them would be narrowed for
/// this permit, so they can only match records the token could find: returns the
/// parameters to send. The narrowing is on a parameter of the type (never a
/// compartment search, which a conditional write cannot be), and a narrowing the
/// upstream could only be asked as a patient-list search (OpenFGA principals) is
/// refused. Unrestricted permits keep the criteria as they are. Pure.
pub fn narrow_criteria(
    rt: ResourceType,
    criteria: &[(String, String)],
    grant: &ScopeGrant,
    permit: &Permit,
    index: &CompartmentIndex,
) -> Result<Vec<(String, String)>, AuthzError> {
    if criteria.is_empty() {
        return Err(AuthzError::NotNarrowable {
            interaction: CONDITIONAL,
        });
    }
    if permit.is_unrestricted() {
        return Ok(criteria.to_vec());
    }
    let search = FhirRequest {
        method: Method::GET,
        interaction: Interaction::SearchType,
        resource_type: Some(rt),
        id: None,
        version: None,
        compartment: None,
        params: criteria.to_vec(),
    };
    let out = rewrite_request_with(
        &search,
        grant,
        permit,
        index,
        &Bytes::new(),
        None,
        CompartmentSearch::ByParameter,
    )
    .map_err(|e| match e {
        AuthzError::NotNarrowable { .. } => AuthzError::NotNarrowable {
            interaction: CONDITIONAL,
        },
        other => other,
    })?;
    if out.path != format!("/{rt}") || out.narrowing.is_some() {
        return Err(AuthzError::NotNarrowable {
            interaction: CONDITIONAL,
        });
    }
    Ok(out.params)
}

/// The criteria of an `If-None-Exist` header: a query string, optionally after
/// `[type]?` (which must then be the created type).
fn if_none_exist_criteria(
    rt: ResourceType,
    value: &HeaderValue,
) -> Result<Vec<(String, String)>, AuthzError> {
    let bad = AuthzError::WriteBody {
        detail: "`If-None-Exist` is not a query on the created type",
    };
    let text = value.to_str().map_err(|_| bad.clone())?.trim();
    let query = match text.split_once('?') {
        Some((prefix, q)) => {
            let prefix = prefix.trim_start_matches('/');
            if !prefix.is_empty() && prefix != rt.as_str() {
                return Err(bad);
            }
            q
        }
        None => text,
    };
    Ok(form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect())
}

/// The client's criteria of a conditional write (none for the other writes).
fn write_criteria(
    req: &FhirRequest,
    rt: ResourceType,
    headers: &HeaderMap,
) -> Result<Vec<(String, String)>, AuthzError> {
    match (&req.interaction, &req.id) {
        (Interaction::Create, _) => match headers.get("if-none-exist") {
            Some(v) => if_none_exist_criteria(rt, v),
            None => Ok(Vec::new()),
        },
        (Interaction::Update | Interaction::Delete, None) => Ok(req.params.clone()),
        _ => Ok(Vec::new()),
    }
}

fn encode(params: &[(String, String)]) -> String {
    let mut ser = form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        ser.append_pair(k, v);
    }
    ser.finish()
}

/// Builds the outbound request of a single write from the write check's plan (pure):
/// the method and path from the parsed request, conditional criteria narrowed
/// ([`narrow_criteria`]), the client's body with its media type, `If-Match` as the plan
/// pins it, the client's `If-None-Match` and `If-Modified-Since`, and one `Prefer`:
/// `handling=strict` and the client's `return` preference, except that a token that
/// may not read the type asks for `return=minimal` (its answer would lose the body
/// anyway).
pub fn rewrite_write(
    req: &FhirRequest,
    grant: &ScopeGrant,
    permit: &Permit,
    index: &CompartmentIndex,
    plan: &WritePlan,
    headers: &HeaderMap,
) -> Result<OutboundRequest, AuthzError> {
    let rt = req.resource_type.ok_or(AuthzError::NotSupported {
        interaction: req.interaction.name(),
    })?;
    let mut out_headers: Vec<(HeaderName, HeaderValue)> = Vec::new();
    let criteria = || narrow_criteria(rt, &req.params, grant, permit, index);
    let (method, path, params) = match (&req.interaction, &req.id) {
        (Interaction::Create, _) => {
            if let Some(v) = headers.get("if-none-exist") {
                let narrowed =
                    narrow_criteria(rt, &if_none_exist_criteria(rt, v)?, grant, permit, index)?;
                let value = HeaderValue::from_str(&encode(&narrowed)).map_err(|_| {
                    AuthzError::WriteBody {
                        detail: "`If-None-Exist` is not a query on the created type",
                    }
                })?;
                out_headers.push((HeaderName::from_static("if-none-exist"), value));
            }
            (Method::POST, format!("/{rt}"), Vec::new())
        }
        (Interaction::Update, Some(id)) => (Method::PUT, format!("/{rt}/{id}"), Vec::new()),
        (Interaction::Update, None) => (Method::PUT, format!("/{rt}"), criteria()?),
        (Interaction::Patch, Some(id)) => (Method::PATCH, format!("/{rt}/{id}"), Vec::new()),
        // Upstreams may ignore `If-Match` on DELETE (HAPI does): for restricted tokens
        // the delete goes by criteria, `_id` and the narrowing, so the upstream itself
        // re-checks the compartment as it deletes. Where that cannot be narrowed (OpenFGA
        // principals) it goes by id, with `If-Match`.
        (Interaction::Delete, Some(id)) => match permit.is_unrestricted() {
            false => match narrow_criteria(
                rt,
                &[("_id".to_owned(), id.as_str().to_owned())],
                grant,
                permit,
                index,
            ) {
                Ok(params) => (Method::DELETE, format!("/{rt}"), params),
                Err(_) => (Method::DELETE, format!("/{rt}/{id}"), Vec::new()),
            },
            true => (Method::DELETE, format!("/{rt}/{id}"), Vec::new()),
        },
        (Interaction::Delete, None) => (Method::DELETE, format!("/{rt}"), criteria()?),
        _ => {
            return Err(AuthzError::NotSupported {
                interaction: req.interaction.name(),
            });
        }
    };
    if let Some(ct) = plan.content_type {
        out_headers.push((header::CONTENT_TYPE, HeaderValue::from_static(ct)));
    }
    if let Some(v) = &plan.if_match {
        out_headers.push((header::IF_MATCH, v.clone()));
    }
    for name in [header::IF_NONE_MATCH, header::IF_MODIFIED_SINCE] {
        if let Some(v) = headers.get(&name) {
            out_headers.push((name, v.clone()));
        }
    }
    let prefer = match plan.prefer {
        ReturnPref::Default | ReturnPref::Representation if plan.read_back.is_none() => {
            ReturnPref::Minimal
        }
        other => other,
    };
    // One header: HAPI reads the first `Prefer` only.
    let prefer = match prefer.token() {
        Some(t) => format!("{t}, handling=strict"),
        None => "handling=strict".to_owned(),
    };
    out_headers.push((
        HeaderName::from_static("prefer"),
        HeaderValue::from_str(&prefer).map_err(|_| AuthzError::NotSupported {
            interaction: req.interaction.name(),
        })?,
    ));
    Ok(OutboundRequest {
        method,
        path,
        params,
        body: plan.body.clone(),
        conditional: false,
        narrowing: None,
        headers: out_headers,
    })
}

// ---- end writes ----

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
        // ---- writes ----
        let fhir = ext::<FhirRequest>(req, "missing FhirRequest")?;
        if is_write(&fhir.interaction) {
            let permit = ext::<Permit>(req, "missing Permit")?;
            let out = rewrite_write(
                fhir,
                ext::<ScopeGrant>(req, "missing ScopeGrant")?,
                permit,
                ext::<Arc<Checker>>(req, "missing Checker")?.index(),
                ext::<WritePlan>(req, "missing WritePlan")?,
                req.headers(),
            )?;
            // Conditional criteria are held to the declared parameters like a search's:
            // a lenient upstream would ignore an unknown one and match more.
            if let (false, Some(rt)) = (permit.is_unrestricted(), fhir.resource_type) {
                let criteria = write_criteria(fhir, rt, req.headers())?;
                if !criteria.is_empty() {
                    let known = self.capabilities.of(&tenant_of(req)?.0).await?;
                    if let Some(name) = known.search.first_undeclared(rt, &criteria) {
                        return Err(AuthzError::UndeclaredParameter {
                            name: name.chars().take(64).collect(),
                            resource_type: rt,
                        }
                        .into());
                    }
                }
            }
            req.extensions_mut().insert(out);
            return Ok(Flow::Continue);
        }
        // ---- end writes ----
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
