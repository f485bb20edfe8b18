//! Matching a request against a token's scopes (`scope::check_scopes`).
//!
//! Input: the `scope` claim, a newline, then a request as for the `request` target
//! (`METHOD PATH[?QUERY]`, optionally a newline and a form body).
//!
//! Properties, with and without a `patient` claim: a grant names only scopes of the
//! set that hold the required permission, in the contexts it reports (`patient/` ones
//! only with a patient), and of the requested type for single-type requests; a context
//! is unconstrained exactly when one of its permitting scopes is; the permitting scopes
//! alone grant the same; and a patient claim never takes a grant away.
#![no_main]

use http::Method;
use libfuzzer_sys::fuzz_target;
use smart_fhir_proxy::fhir::{FhirRequest, Interaction, parse_request};
use smart_fhir_proxy::scope::{ScopeGrant, TokenContext, check_scopes};
use smart_fhir_proxy::smart::{ScopeContext, ScopeResource, ScopeSet, parse_scopes};

fn request(data: &[u8]) -> Option<FhirRequest> {
    let (line, body) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], Some(&data[at + 1..])),
        None => (data, None),
    };
    let line = std::str::from_utf8(line).ok()?;
    let (method, target) = line.split_once(' ').unwrap_or((line, ""));
    let method = Method::from_bytes(method.as_bytes()).ok()?;
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    parse_request(&method, path, query, body).ok()
}

/// Whether the request targets one resource type (its scopes must name it or `*`).
fn single_type(req: &FhirRequest) -> bool {
    !matches!(
        req.interaction,
        Interaction::SearchSystem | Interaction::HistorySystem
    ) && req.resource_type.is_some()
}

fn check_grant(set: &ScopeSet, req: &FhirRequest, token: TokenContext, grant: &ScopeGrant) {
    let required = grant.required();
    assert_eq!(required.bits().count_ones(), 1, "{required:?}");
    let permitting: Vec<_> = grant.scopes(set).collect();
    assert!(!permitting.is_empty());
    assert_eq!(permitting.len(), grant.scope_indices().count());
    let contexts: Vec<ScopeContext> = ScopeContext::ALL
        .into_iter()
        .filter(|c| permitting.iter().any(|s| s.context == *c))
        .collect();
    assert_eq!(grant.contexts().iter().collect::<Vec<_>>(), contexts);
    for s in &permitting {
        assert!(
            s.permissions.contains(required),
            "{} for {required:?}",
            s.text
        );
        assert!(s.context != ScopeContext::Patient || token.has_patient);
        if single_type(req)
            && let (ScopeResource::Type(t), Some(rt)) = (s.resource, req.resource_type)
        {
            assert_eq!(t, rt, "{} for {:?}", s.text, req.interaction);
        }
    }
    for c in contexts {
        let unconstrained = permitting
            .iter()
            .any(|s| s.context == c && !s.is_constrained());
        let constraint = grant
            .constraint_for(c)
            .expect("a permitting context has an arm");
        assert_eq!(constraint.is_none(), unconstrained, "{c}");
    }
    // The permitting scopes alone grant the same.
    let alone = ScopeSet::from_list(permitting.iter().map(|s| s.text.as_str()));
    let again = check_scopes(&alone, req, token)
        .unwrap_or_else(|e| panic!("the permitting scopes alone: {e}"));
    assert_eq!(again.required(), required);
    for c in ScopeContext::ALL {
        assert_eq!(again.arm(c), grant.arm(c), "{c}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(at) = data.iter().position(|&b| b == b'\n') else {
        return;
    };
    let Ok(scopes) = std::str::from_utf8(&data[..at]) else {
        return;
    };
    let Some(req) = request(&data[at + 1..]) else {
        return;
    };
    let set = parse_scopes(scopes);
    let without = TokenContext { has_patient: false };
    let with = TokenContext { has_patient: true };
    let a = check_scopes(&set, &req, without);
    let b = check_scopes(&set, &req, with);
    if let Ok(grant) = &a {
        check_grant(&set, &req, without, grant);
        assert!(b.is_ok(), "a patient claim took the grant away: {b:?}");
    }
    if let Ok(grant) = &b {
        check_grant(&set, &req, with, grant);
    }
});
