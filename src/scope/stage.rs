//! The tower-facing side of stage 2: reads `FhirRequest` and `VerifiedToken`, writes
//! [`ScopeGrant`]. All decisions are in [`check_scopes`].

use bytes::Bytes;
use http::Request;

use super::{ScopeError, ScopeGrant, TokenContext, check_scopes};
use crate::fhir::FhirRequest;
use crate::pipeline::{Flow, Internal, Stage, ext};
use crate::token::VerifiedToken;

/// What stage 2 fails with.
#[derive(Debug, thiserror::Error)]
pub enum CheckScopeError {
    #[error(transparent)]
    Scope(#[from] ScopeError),
    #[error(transparent)]
    Internal(#[from] Internal),
}

pub struct CheckScope;

impl Stage for CheckScope {
    type Error = CheckScopeError;

    async fn run(&self, req: &mut Request<Bytes>) -> Result<Flow, CheckScopeError> {
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
