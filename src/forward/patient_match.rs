//! Stage 5 for `POST /{tenant}/Patient/$match`: the upstream's own `$match`
//! (`forward`) or the proxy's scoring (`score`), per the tenant's `match` setting.
//!
//! Sits in the forwarding stage, after the permit (stage 3) and the rewrite (stage 4):
//! `Forward` hands every `Patient/$match` here. Guarantees:
//! - the `Parameters` body is read and bounded before anything goes upstream
//!   ([`input::parse_parameters`]); bad input is a 400 OperationOutcome;
//! - `score`: input weaker than the tenant's IDI level is refused
//!   ([`input::check_weight`]); the candidate searches ([`score::candidate_searches`],
//!   one page each, never followed) go through the tenant's upstream client, for
//!   compartment-bound tokens narrowed to their compartment exactly as their own
//!   Patient searches would be (`rewrite::rewrite_request_with`);
//! - either way the answer, scored candidates or the upstream's, goes through the
//!   same answer check as every searchset (`forward::check`: compartment or OpenFGA),
//!   and only then are `onlyCertainMatches` and `count` applied and `total` removed
//!   ([`score::limit`]), so nothing in the answer depends on a candidate the token
//!   may not see. For restricted tokens a forwarded `$match` asks the upstream for
//!   `max_candidates` matches, not the client's `count`, for the same reason.

pub mod input;
pub mod score;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header};
use serde_json::Value;

use super::{ForwardError, check};
use crate::authz::{Checker, Permit};
use crate::config::MatchMode;
use crate::discovery::{Capabilities, DiscoveryError};
use crate::fhir::{FhirRequest, Interaction, OperationLevel, OutboundRequest, ResourceType};
use crate::metrics::Stage;
use crate::pipeline::{Decision, FHIR_JSON, ProxyResponse, ext, fhir_json};
use crate::scope::ScopeGrant;
use crate::tenant::{Tenant, tenant_of};
use crate::upstream::{Fetched, FhirServer, UpstreamError};

/// What `Patient/$match` is refused with, before or instead of an answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MatchError {
    /// Not a `Parameters` body, too large, or an unknown parameter.
    #[error("{0}")]
    Parameters(String),
    /// `resource` missing, repeated, not a Patient, or out of bounds.
    #[error("{0}")]
    Resource(String),
    #[error("`count` must be a positive `valueInteger`, given at most once")]
    Count,
    #[error("`onlyCertainMatches` must be a `valueBoolean`, given at most once")]
    OnlyCertain,
    #[error(
        "the input Patient weighs {weight} under the IDI weighting and `{level}` requires {required}; add {missing}"
    )]
    InputTooWeak {
        level: &'static str,
        weight: u32,
        required: u32,
        missing: String,
    },
    /// Nothing to search candidates by.
    #[error(
        "the input Patient has nothing to search candidates by: give an identifier with a value, a family name with a given name or birth date, a given name with a birth date, a phone or an email"
    )]
    Unsearchable,
    /// The upstream refused a candidate search built from the input (its values).
    #[error(
        "the upstream refused a candidate search built from the input (HTTP {0}): check the input's identifier, name, birth date and telecom values"
    )]
    CandidateRefused(u16),
    /// `forward` mode, and the upstream does not declare `Patient/$match`.
    #[error("`Patient/$match` is not supported by this server")]
    NotSupported,
}

impl MatchError {
    pub fn status(&self) -> StatusCode {
        match self {
            MatchError::NotSupported => StatusCode::NOT_IMPLEMENTED,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            MatchError::Parameters(_) => "match_parameters_invalid",
            MatchError::Resource(_) | MatchError::CandidateRefused(_) => "match_resource_invalid",
            MatchError::Count => "match_count_invalid",
            MatchError::OnlyCertain => "match_only_certain_invalid",
            MatchError::InputTooWeak { .. } | MatchError::Unsearchable => "match_input_too_weak",
            MatchError::NotSupported => "match_not_supported",
        }
    }
}

/// Whether the request is `Patient/$match` (type level).
pub fn is_patient_match(req: &FhirRequest) -> bool {
    matches!(&req.interaction, Interaction::Operation(op, OperationLevel::Type) if op.as_str() == "match")
        && req.resource_type == Some(ResourceType::PATIENT)
}

/// Who answers, for a tenant whose upstream does (`declared`) or does not declare
/// `Patient/$match`.
pub fn resolve_mode(mode: MatchMode, declared: bool) -> Result<MatchMode, MatchError> {
    match (mode, declared) {
        (MatchMode::Auto, true) | (MatchMode::Forward, true) => Ok(MatchMode::Forward),
        (MatchMode::Auto, false) | (MatchMode::Score, _) => Ok(MatchMode::Score),
        (MatchMode::Forward, false) => Err(MatchError::NotSupported),
    }
}

/// Answers `Patient/$match` (see the module docs).
pub async fn answer<U: FhirServer>(
    upstream: &U,
    capabilities: &Capabilities<U>,
    cursors: &crate::cursor::CursorKey,
    req: &Request<Bytes>,
) -> Result<ProxyResponse, ForwardError> {
    let tenant = &tenant_of(req)?.0;
    let fhir = ext::<FhirRequest>(req, "missing FhirRequest")?;
    let out = ext::<OutboundRequest>(req, "missing OutboundRequest")?;
    let permit = ext::<Permit>(req, "missing Permit")?;
    let cfg = &tenant.config.patient_match;
    if fhir.method != Method::POST {
        return Err(MatchError::Parameters(
            "`Patient/$match` takes a POSTed `Parameters` body".into(),
        )
        .into());
    }
    let input = input::parse_parameters(req.body())?;
    let mode = match cfg.mode {
        MatchMode::Score => MatchMode::Score,
        mode => {
            let caps = capabilities.of(tenant).await.map_err(|e| match e {
                DiscoveryError::Upstream(u) => ForwardError::Upstream(u),
                DiscoveryError::Internal(i) => ForwardError::Internal(i),
                // The CapabilityStatement cache never signs UDAP metadata.
                DiscoveryError::Udap(_) => ForwardError::Internal(crate::pipeline::Internal(
                    "udap error from capabilities",
                )),
            })?;
            resolve_mode(
                mode,
                caps.search
                    .declares_operation(ResourceType::PATIENT, "match"),
            )?
        }
    };
    let audit = req.extensions().get::<crate::audit::AuditSlot>();
    if let Some(a) = audit {
        a.note(format!("match.mode={}", mode_name(mode)));
    }
    let metrics = crate::metrics::global();
    let tenant_label = metrics.tenant(tenant.id());
    let started = std::time::Instant::now();
    let fetched = crate::trace::in_child_span(
        |id| tracing::debug_span!("upstream", span.id = %id, otel.kind = "client"),
        fetch(upstream, tenant, req, &input, mode, permit, out),
    )
    .await;
    metrics.stage(tenant_label, Stage::Upstream, started.elapsed());
    let (fetched, candidates, limits) = fetched?;
    if let (Some(a), Some(n)) = (audit, candidates) {
        a.note(format!("match.candidates={n}"));
    }
    let started = std::time::Instant::now();
    let checked = crate::trace::in_child_span(
        |id| tracing::debug_span!("check", span.id = %id),
        check(cursors, req, &fetched, out),
    )
    .await;
    metrics.stage(tenant_label, Stage::Check, started.elapsed());
    let checked = checked?;
    metrics.entries_dropped(tenant_label, checked.dropped as u64);
    let body = if limits && fetched.status.is_success() {
        let v: Value = serde_json::from_slice(&checked.body)
            .map_err(|_| UpstreamError::BadResponse("json"))?;
        match score::limit(v, input.count, input.only_certain) {
            Some(v) => {
                Bytes::from(serde_json::to_vec(&v).map_err(|_| UpstreamError::BadResponse("json"))?)
            }
            None => checked.body,
        }
    } else {
        checked.body
    };
    let mut resp = fhir_json(fetched.status, body);
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    resp.extensions_mut().insert(Decision(checked.reason));
    Ok(resp)
}

/// The answer to check: scored candidates (with how many were scored) or the
/// upstream's own `$match`; `true` when `count` and `onlyCertainMatches` are the
/// proxy's to apply.
async fn fetch<U: FhirServer>(
    upstream: &U,
    tenant: &Tenant,
    req: &Request<Bytes>,
    input: &input::MatchInput,
    mode: MatchMode,
    permit: &Permit,
    out: &OutboundRequest,
) -> Result<(Fetched, Option<usize>, bool), ForwardError> {
    let cfg = &tenant.config.patient_match;
    Ok(match mode {
        MatchMode::Score => {
            let (fetched, candidates) = scored(upstream, tenant, req, input).await?;
            (fetched, Some(candidates), true)
        }
        _ if permit.is_unrestricted() => (
            upstream.fetch(tenant, out, req.headers()).await?,
            None,
            false,
        ),
        _ => {
            // Restricted: the upstream is asked for up to `max_candidates` matches, never
            // the client's `count` or `onlyCertainMatches`: those are applied to what
            // the check releases, so a hidden match cannot take a visible one's place.
            let restricted = OutboundRequest {
                body: Some(forwarded_body(input, cfg.max_candidates)?),
                ..out.clone()
            };
            (
                upstream.fetch(tenant, &restricted, req.headers()).await?,
                None,
                true,
            )
        }
    })
}

fn mode_name(mode: MatchMode) -> &'static str {
    match mode {
        MatchMode::Auto => "auto",
        MatchMode::Forward => "forward",
        MatchMode::Score => "score",
    }
}

/// The `Parameters` a restricted token's `$match` is forwarded with: its Patient and
/// `count` = `max` (see [`answer`]).
fn forwarded_body(input: &input::MatchInput, max: usize) -> Result<Bytes, ForwardError> {
    let v = serde_json::json!({"resourceType": "Parameters", "parameter": [
        {"name": "resource", "resource": input.patient},
        {"name": "count", "valueInteger": max}
    ]});
    serde_json::to_vec(&v)
        .map(Bytes::from)
        .map_err(|_| crate::pipeline::Internal("match parameters").into())
}

/// `score` mode: weighs the input, runs the candidate searches, scores the candidates
/// and returns their `searchset` as if the upstream had sent it (for the answer
/// check), with the number of distinct candidates scored.
async fn scored<U: FhirServer>(
    upstream: &U,
    tenant: &Tenant,
    req: &Request<Bytes>,
    input: &input::MatchInput,
) -> Result<(Fetched, usize), ForwardError> {
    let cfg = &tenant.config.patient_match;
    input::check_weight(&input.patient, cfg.input_level)?;
    let searches = score::candidate_searches(&input.patient);
    if searches.is_empty() {
        return Err(MatchError::Unsearchable.into());
    }
    let permit = ext::<Permit>(req, "missing Permit")?;
    let grant = ext::<ScopeGrant>(req, "missing ScopeGrant")?;
    let checker = ext::<std::sync::Arc<Checker>>(req, "missing Checker")?;
    let mut candidates: Vec<(String, Value)> = Vec::new();
    for params in searches {
        if candidates.len() >= cfg.max_candidates {
            break;
        }
        let mut out = candidate_request(
            permit,
            grant,
            checker,
            tenant.config.upstream.compartment_search,
            params,
        )?;
        out.params
            .push(("_count".to_owned(), cfg.search_count.to_string()));
        let fetched = upstream.fetch(tenant, &out, req.headers()).await?;
        if fetched.status.is_client_error() {
            return Err(MatchError::CandidateRefused(fetched.status.as_u16()).into());
        }
        if !fetched.status.is_success() {
            return Err(UpstreamError::Status(fetched.status).into());
        }
        let bundle: Value = serde_json::from_slice(&fetched.body)
            .map_err(|_| UpstreamError::BadResponse("json"))?;
        if !score::collect_candidates(&bundle, &mut candidates, cfg.max_candidates) {
            return Err(UpstreamError::BadResponse("resourceType").into());
        }
    }
    let found = candidates.len();
    let ranked = score::rank(&input.patient, candidates);
    let body = serde_json::to_vec(&score::searchset(&tenant.config.upstream.base, &ranked))
        .map_err(|_| crate::pipeline::Internal("match searchset"))?;
    let mut headers = http::HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    Ok((
        Fetched {
            status: StatusCode::OK,
            headers,
            body: Bytes::from(body),
        },
        found,
    ))
}

/// One candidate search, as the token's own `Patient` search would go upstream:
/// narrowed to its compartment for compartment-bound permits (the rewrite stage's
/// function), as it is for unrestricted ones and OpenFGA principals (whose candidates
/// the answer check decides, with BatchCheck).
fn candidate_request(
    permit: &Permit,
    grant: &ScopeGrant,
    checker: &Checker,
    how: crate::config::CompartmentSearch,
    params: Vec<(String, String)>,
) -> Result<OutboundRequest, ForwardError> {
    if permit.is_unrestricted() || permit.has_fga() {
        return Ok(OutboundRequest {
            method: Method::GET,
            path: "/Patient".to_owned(),
            params,
            body: None,
            conditional: false,
            narrowing: None,
            headers: Vec::new(),
        });
    }
    let search = FhirRequest {
        method: Method::GET,
        interaction: Interaction::SearchType,
        resource_type: Some(ResourceType::PATIENT),
        id: None,
        version: None,
        compartment: None,
        params,
    };
    let mut out = crate::rewrite::rewrite_request_with(
        &search,
        grant,
        permit,
        checker.index(),
        &Bytes::new(),
        None,
        how,
    )?;
    out.conditional = false;
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::{Arc, LazyLock};

    use super::*;
    use crate::authz::authorize;
    use crate::config::CompartmentSearch;
    use crate::fhir::{CompartmentIndex, ResourceId, parse_request};
    use crate::scope::{TokenContext, check_scopes};
    use crate::smart::parse_scopes;
    use crate::token::{FhirUser, VerifiedToken};

    static INDEX: LazyLock<Arc<CompartmentIndex>> =
        LazyLock::new(|| Arc::new(CompartmentIndex::official().unwrap()));

    fn token(scopes: &str, patient: Option<&str>, fhir_user: Option<&str>) -> VerifiedToken {
        VerifiedToken {
            issuer: "https://issuer.example".to_owned(),
            subject: None,
            client_id: None,
            scopes: parse_scopes(scopes),
            patient: patient.map(|p| ResourceId::parse(p).unwrap()),
            fhir_user: fhir_user.map(|u| FhirUser::parse(u).unwrap()),
            expires_at: u64::MAX,
        }
    }

    /// The candidate search `family=Doe` as `t` sends it upstream, or the reason why not.
    fn candidate(t: &VerifiedToken) -> Result<OutboundRequest, &'static str> {
        let req = parse_request(&Method::POST, "/Patient/$match", None, None).unwrap();
        let grant = check_scopes(
            &t.scopes,
            &req,
            TokenContext {
                has_patient: t.patient.is_some(),
            },
        )
        .unwrap();
        let checker = Checker::for_test(Arc::clone(&INDEX), StatusCode::NOT_FOUND);
        let permit = authorize(&checker, &req, t, &grant).unwrap();
        let params = vec![("family".to_owned(), "Doe".to_owned())];
        candidate_request(
            &permit,
            &grant,
            &checker,
            CompartmentSearch::ByParameter,
            params,
        )
        .map_err(|e| match e {
            ForwardError::Authz(a) => a.reason(),
            _ => "other",
        })
    }

    fn query(out: &OutboundRequest) -> Vec<String> {
        out.params.iter().map(|(k, v)| format!("{k}={v}")).collect()
    }

    #[test]
    fn candidate_searches_are_narrowed_like_the_tokens_own_patient_searches() {
        let system = candidate(&token("system/Patient.rs", None, None)).unwrap();
        assert_eq!(
            (system.path.as_str(), query(&system)),
            ("/Patient", vec!["family=Doe".to_owned()])
        );
        let patient = candidate(&token("patient/Patient.rs", Some("p1"), None)).unwrap();
        assert_eq!(query(&patient), ["family=Doe", "_id=p1"]);
        assert!(!patient.conditional);
        let practitioner =
            candidate(&token("user/Patient.rs", None, Some("Practitioner/pr1"))).unwrap();
        assert_eq!(
            query(&practitioner),
            ["family=Doe", "general-practitioner=Practitioner/pr1"]
        );
        // Two compartments cannot be one search: refused, as the token's searches are.
        let both = token(
            "patient/Patient.rs user/Patient.rs",
            Some("p1"),
            Some("Practitioner/pr1"),
        );
        assert_eq!(candidate(&both).unwrap_err(), "search_not_narrowable");
    }

    #[test]
    fn auto_forwards_only_to_an_upstream_that_declares_match() {
        assert_eq!(
            resolve_mode(MatchMode::Auto, true).ok(),
            Some(MatchMode::Forward)
        );
        assert_eq!(
            resolve_mode(MatchMode::Auto, false).ok(),
            Some(MatchMode::Score)
        );
        assert_eq!(
            resolve_mode(MatchMode::Score, true).ok(),
            Some(MatchMode::Score)
        );
        assert_eq!(
            resolve_mode(MatchMode::Forward, true).ok(),
            Some(MatchMode::Forward)
        );
        let e = resolve_mode(MatchMode::Forward, false).unwrap_err();
        assert_eq!(
            (e.status(), e.reason()),
            (StatusCode::NOT_IMPLEMENTED, "match_not_supported")
        );
    }
}
