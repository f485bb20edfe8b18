//! The tower-facing side of stage 2: reads `FhirRequest` and `VerifiedToken`, writes
//! [`ScopeGrant`]. All decisions are in [`check_scopes`].

use bytes::Bytes;
use http::Request;

use super::{ScopeGrant, TokenContext, check_scopes};
use crate::error::ProxyError;
use crate::fhir::FhirRequest;
use crate::pipeline::{Flow, Stage, ext};
use crate::token::VerifiedToken;

pub struct CheckScope;

impl Stage for CheckScope {
    type Error = ProxyError;

    async fn run(&self, req: &mut Request<Bytes>) -> Result<Flow, ProxyError> {
        let fhir = ext::<FhirRequest>(req, "missing FhirRequest")?;
        let token = ext::<std::sync::Arc<VerifiedToken>>(req, "missing VerifiedToken")?;
        let ctx = TokenContext {
            has_patient: token.patient.is_some(),
        };
        let grant: ScopeGrant = check_scopes(&token.scopes, fhir, ctx)?;
        req.extensions_mut().insert(grant);
        Ok(Flow::Continue)
    }
}
