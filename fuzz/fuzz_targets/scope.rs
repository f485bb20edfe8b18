//! The SMART scope grammar (`smart::parse_scopes`) on a `scope` claim.
//!
//! Properties: parsing never fails as a whole; every scope it keeps re-parses to
//! itself, and its canonical form (`context/resource.letters?encoded constraints`)
//! re-parses to the same grant; every refused or uninterpreted scope is refused for the
//! same reason on its own; the set does not depend on how the scopes are separated; at
//! most `MAX_RESOURCE_SCOPES` scopes are kept, each once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smart_fhir_proxy::smart::{
    MAX_RESOURCE_SCOPES, Permissions, RejectReason, ScopeSet, ScopeVersion, SmartScope,
    parse_scopes,
};

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The scope written canonically: v2 letters, constraints percent-encoded.
fn canonical(scope: &SmartScope) -> String {
    let mut out = format!("{}/{}.{}", scope.context, scope.resource, scope.permissions);
    for (i, (name, value)) in scope.constraints.iter().enumerate() {
        out.push(if i == 0 { '?' } else { '&' });
        out.push_str(&encode(name));
        out.push('=');
        out.push_str(&encode(value));
    }
    out
}

fn check_set(text: &str, set: &ScopeSet) {
    let items: Vec<&str> = text.split_ascii_whitespace().collect();
    let kept = set.resource_scopes();
    assert!(kept.len() <= MAX_RESOURCE_SCOPES);
    assert!(kept.len() + set.other().len() + set.rejected().len() <= items.len());
    for (i, scope) in kept.iter().enumerate() {
        assert!(items.contains(&scope.text.as_str()));
        assert!(
            kept[..i].iter().all(|s| s.text != scope.text),
            "kept twice: {:?}",
            scope.text
        );
        assert_eq!(SmartScope::parse(&scope.text).as_ref(), Ok(scope));
        assert!(!scope.permissions.is_empty());
        assert_eq!(
            Permissions::parse_v2(&scope.permissions.to_string()),
            Some(scope.permissions)
        );
        if scope.version == ScopeVersion::V1 {
            assert!(scope.constraints.is_empty(), "{:?}", scope.text);
        }
        for (name, value) in &scope.constraints {
            assert!(!name.is_empty() && !value.is_empty(), "{:?}", scope.text);
            assert!(!value.chars().any(char::is_control), "{:?}", scope.text);
        }
        let written = canonical(scope);
        let again = SmartScope::parse(&written)
            .unwrap_or_else(|e| panic!("canonical {written:?} of {:?}: {e}", scope.text));
        assert_eq!(
            (
                again.context,
                again.resource,
                again.permissions,
                &again.constraints
            ),
            (
                scope.context,
                scope.resource,
                scope.permissions,
                &scope.constraints
            ),
            "canonical {written:?} of {:?}",
            scope.text
        );
    }
    for rejected in set.rejected() {
        assert!(items.contains(&rejected.text.as_str()));
        match rejected.reason {
            RejectReason::TooMany => {
                assert_eq!(kept.len(), MAX_RESOURCE_SCOPES);
                assert!(SmartScope::parse(&rejected.text).is_ok());
            }
            RejectReason::NotResourceScope => panic!("rejected as no clinical scope"),
            reason => assert_eq!(SmartScope::parse(&rejected.text), Err(reason)),
        }
    }
    for other in set.other() {
        assert!(items.contains(&other.as_str()));
        assert_eq!(
            SmartScope::parse(other),
            Err(RejectReason::NotResourceScope)
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let set = parse_scopes(text);
    check_set(text, &set);
    // Separators do not matter: one space, or a JSON array claim of the scopes.
    let items: Vec<&str> = text.split_ascii_whitespace().collect();
    assert_eq!(parse_scopes(&items.join(" ")), set);
    assert_eq!(ScopeSet::from_list(&items), set);
});
