//! Stage 2: SMART App Launch scopes (v1 and v2).
//!
//! Sits after `token` (which yields the verified claims) and before `authz`. The
//! token's `scope`/`scp` claim is parsed once, when the token is verified, into a
//! `ScopeSet` (the grammar is in the model, `smart`); per request, [`check_scopes`] decides whether the
//! scopes permit the parsed [`crate::fhir::FhirRequest`] and returns a
//! [`ScopeGrant`] naming the permitting scopes, their contexts, the covered resource
//! types and the search constraints still to enforce.
//!
//! Guarantees: pure and synchronous, no I/O; parsing never fails as a whole and
//! anything malformed grants nothing; a `ScopeGrant` exists only if at least one
//! usable scope permits the interaction.

mod matcher;

pub use matcher::{
    GrantArm, ScopeError, ScopeGrant, SearchConstraint, TokenContext, TypeCoverage, TypeName,
    check_scopes,
};

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests;

mod stage;
pub use stage::{CheckScope, CheckScopeError};
