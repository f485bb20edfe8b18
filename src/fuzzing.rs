//! Fixtures for the fuzz targets of `fuzz/` (cargo feature `fuzzing`; not part of the
//! proxy's API and never in a release build).
//!
//! The answer check (stage 5, `forward::filter::check_answer`) needs a request that
//! has passed the scope and authorization stages. [`AnswerFixtures`] makes such
//! requests the way the stack does, from a token's scopes and a request path, for
//! every kind of permit (patient, user and system tokens, constrained scopes,
//! includes, reads, history, operations), and runs the check on an answer: the real
//! one and the whole-`Value` reference it replaced, so a target can compare the two.
//!
//! Part of the composition layer: like `stack`, it runs the stages in order, here on
//! one request and without I/O.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};

use crate::authz::{Checker, Permit, ReleaseCtx, authorize};
use crate::cursor::{CursorKey, Pager};
use crate::error::ProxyError;
use crate::fhir::{CompartmentIndex, FhirRequest, OutboundRequest, ResourceId, parse_request};
use crate::forward::filter::{CheckCtx, Checked, check_answer, value_path};
use crate::rewrite::rewrite_request;
use crate::scope::{ScopeGrant, TokenContext, check_scopes};
use crate::smart::parse_scopes;
use crate::token::{FhirUser, VerifiedToken};
use crate::upstream::BaseRewrite;

/// The tenant's public base in every fixture.
pub const PUBLIC_BASE: &str = "https://proxy.example/t1";
/// The upstream base in every fixture; answers name it and the check rewrites it.
pub const UPSTREAM_BASE: &str = "http://127.0.0.1:8081/fhir";

const REWRITE: BaseRewrite<'static> = BaseRewrite {
    from: UPSTREAM_BASE,
    to: PUBLIC_BASE,
};

/// Paging cursors are signed at this fixed time, so a check is deterministic.
const NOW: u64 = 1_000;

/// The constrained scope of the fixtures: laboratory Observations only.
const LAB_SCOPE: &str = "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory";

/// (scopes, patient claim, fhirUser claim, request path with query) of each fixture.
const FIXTURES: [(&str, Option<&str>, Option<&str>, &str); 12] = [
    (
        "patient/Observation.rs",
        Some("p1"),
        None,
        "/Observation/o1",
    ),
    ("patient/Patient.r", Some("p1"), None, "/Patient/p1"),
    (
        "patient/Observation.rs patient/Patient.r patient/Practitioner.r",
        Some("p1"),
        None,
        "/Observation?code=a&_include=Observation:performer",
    ),
    (
        "patient/MedicationRequest.rs patient/Medication.rs",
        Some("p1"),
        None,
        "/MedicationRequest?_include=MedicationRequest:medication",
    ),
    ("patient/*.rs", Some("p1"), None, "/Patient/p1/$everything"),
    (
        "patient/Observation.rs",
        Some("p1"),
        None,
        "/Observation/o1/_history",
    ),
    (LAB_SCOPE, Some("p1"), None, "/Observation?code=a"),
    (LAB_SCOPE, Some("p1"), None, "/Observation/o1"),
    (
        "user/Observation.rs user/Patient.rs",
        None,
        Some("Practitioner/pr1"),
        "/Observation?code=a",
    ),
    (
        "user/*.rs",
        None,
        Some("Patient/p1"),
        "/Encounter?status=finished",
    ),
    ("system/*.rs", None, None, "/_history"),
    ("system/Observation.rs", None, None, "/Observation/o1"),
];

/// One request that passed the scope and authorization stages.
struct AnswerFixture {
    request: FhirRequest,
    token: VerifiedToken,
    grant: ScopeGrant,
    permit: Permit,
    /// The upstream request stage 4 made (`None` where it refuses, e.g. `_history`
    /// for a restricted token: then the answer has no paging context).
    outbound: Option<OutboundRequest>,
}

/// Requests of every kind of permit, ready for the answer check.
pub struct AnswerFixtures {
    index: Arc<CompartmentIndex>,
    key: CursorKey,
    fixtures: Vec<AnswerFixture>,
}

impl AnswerFixtures {
    /// Builds every fixture; an error names the one that could not be built.
    pub fn new() -> Result<AnswerFixtures, String> {
        let index = Arc::new(CompartmentIndex::official().map_err(|e| e.to_string())?);
        let key = CursorKey::from_secret(&[7; 32], 60)?;
        let checker = Checker::for_test(Arc::clone(&index), StatusCode::NOT_FOUND);
        let fixtures = FIXTURES
            .iter()
            .map(|&(scopes, patient, user, target)| {
                fixture(&checker, &index, scopes, patient, user, target)
                    .map_err(|e| format!("fixture `{scopes}` on `{target}`: {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(AnswerFixtures {
            index,
            key,
            fixtures,
        })
    }

    /// How many fixtures there are; `which` arguments are taken modulo this.
    pub fn len(&self) -> usize {
        self.fixtures.len()
    }

    /// Never true: there is always a fixture.
    pub fn is_empty(&self) -> bool {
        self.fixtures.is_empty()
    }

    /// The fixture's token scopes and request, for a failure message.
    pub fn describe(&self, which: usize) -> String {
        let (scopes, _, _, target) = FIXTURES[which % FIXTURES.len()];
        format!("`{scopes}` on `{target}`")
    }

    /// Whether the fixture's permit is unrestricted (every record of the covered types).
    pub fn unrestricted(&self, which: usize) -> bool {
        self.get(which).permit.is_unrestricted()
    }

    /// The answer check of stage 5 on an upstream answer.
    pub fn check(
        &self,
        which: usize,
        status: StatusCode,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Checked, ProxyError> {
        let fx = self.get(which);
        let ctx = self.ctx(fx);
        check_answer(&ctx, status, headers, body).map_err(ProxyError::from)
    }

    /// The whole-`Value` check the answer check replaced, on the same answer (which
    /// it reads with its upstream base already rewritten, as it did).
    pub fn check_whole_value(
        &self,
        which: usize,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Checked, ProxyError> {
        let fx = self.get(which);
        let ctx = self.ctx(fx);
        value_path::check_answer(&ctx, status, headers, REWRITE.bytes(body)?)
            .map_err(ProxyError::from)
    }

    fn get(&self, which: usize) -> &AnswerFixture {
        // INVARIANT: `new` made one fixture per entry of FIXTURES, never none.
        &self.fixtures[which % self.fixtures.len()]
    }

    fn ctx<'a>(&'a self, fx: &'a AnswerFixture) -> CheckCtx<'a> {
        CheckCtx {
            request: &fx.request,
            records: ReleaseCtx {
                permit: &fx.permit,
                grant: &fx.grant,
                token: &fx.token,
                index: &self.index,
                bases: [PUBLIC_BASE, UPSTREAM_BASE],
                fga: None,
            },
            paging: fx.outbound.as_ref().map(|out| {
                Pager::new(
                    &self.key,
                    "t1",
                    PUBLIC_BASE,
                    &fx.token,
                    &fx.request,
                    out,
                    None,
                    NOW,
                )
            }),
            rewrite: REWRITE,
        }
    }
}

fn fixture(
    checker: &Checker,
    index: &CompartmentIndex,
    scopes: &str,
    patient: Option<&str>,
    user: Option<&str>,
    target: &str,
) -> Result<AnswerFixture, String> {
    let token = VerifiedToken {
        issuer: "https://issuer.example".to_owned(),
        subject: None,
        client_id: None,
        scopes: parse_scopes(scopes),
        patient: patient
            .map(|p| ResourceId::parse(p).ok_or("invalid patient id"))
            .transpose()?,
        fhir_user: user
            .map(|u| FhirUser::parse(u).ok_or("invalid fhirUser"))
            .transpose()?,
        expires_at: u64::MAX,
    };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let request = parse_request(&Method::GET, path, query, None).map_err(|e| e.to_string())?;
    let context = TokenContext {
        has_patient: token.patient.is_some(),
    };
    let grant = check_scopes(&token.scopes, &request, context).map_err(|e| e.to_string())?;
    let permit = authorize(checker, &request, &token, &grant).map_err(|e| e.to_string())?;
    let outbound = rewrite_request(&request, &grant, &permit, index, &Bytes::new()).ok();
    Ok(AnswerFixture {
        request,
        token,
        grant,
        permit,
        outbound,
    })
}
