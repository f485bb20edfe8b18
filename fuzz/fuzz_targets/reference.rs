//! The local reference parser (`fhir::parse_local_reference`).
//!
//! Properties: a reference that parses names an R4 type and a valid id, and is
//! exactly `[base/]Type/id[/_history/version]` with `base` one of the local bases
//! (absolute) or none (relative); its relative form parses to the same record; a
//! reference with a foreign base, a fragment, a query or extra segments never parses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smart_fhir_proxy::fhir::{ResourceId, ResourceType, parse_local_reference};
use smart_fhir_proxy::fuzzing::{PUBLIC_BASE, UPSTREAM_BASE};

const BASES: [&str; 2] = [PUBLIC_BASE, UPSTREAM_BASE];

fuzz_target!(|data: &[u8]| {
    let Ok(reference) = std::str::from_utf8(data) else {
        return;
    };
    let Some(local) = parse_local_reference(reference, &BASES) else {
        return;
    };
    assert!(ResourceId::is_valid(local.id), "{reference:?}");
    assert_eq!(
        ResourceType::parse(local.resource_type.as_str()),
        Some(local.resource_type)
    );
    let relative = format!("{}/{}", local.resource_type, local.id);
    // What precedes `Type/id`: nothing, or a local base and a slash.
    let at = reference
        .find(&relative)
        .expect("the reference names Type/id");
    let (before, after) = (&reference[..at], &reference[at + relative.len()..]);
    assert!(
        before.is_empty() || BASES.iter().any(|b| before == format!("{b}/")),
        "{reference:?}"
    );
    // What follows: nothing, or one valid version.
    if !after.is_empty() {
        let version = after
            .strip_prefix("/_history/")
            .expect("only a version follows");
        assert!(ResourceId::is_valid(version), "{reference:?}");
    }
    assert!(!reference.contains(['#', '?', ' ']), "{reference:?}");
    assert_eq!(parse_local_reference(&relative, &BASES), Some(local));
    assert_eq!(parse_local_reference(&relative, &[]), Some(local));
});
