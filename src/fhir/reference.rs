//! Local references: the one place that decides whether a reference string points at
//! a record on this server, and which one.
//!
//! Accepted: relative (`Patient/p1`), versioned (`Patient/p1/_history/2`), and absolute
//! when the base is one of the given local bases (the upstream's, the tenant's public
//! base). Never: contained (`#p1`), `urn:` references, foreign absolute URLs, extra or
//! empty segments, invalid types or ids. Ids are whole, so `Patient/p1` is never
//! `Patient/p10`.

use super::{ResourceId, ResourceType};

/// A reference to a record on this server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalRef<'a> {
    pub resource_type: ResourceType,
    pub id: &'a str,
}

/// Parses `reference` as a local reference; see the module docs.
pub fn parse_local_reference<'a>(reference: &'a str, bases: &[&str]) -> Option<LocalRef<'a>> {
    let local = if reference.contains("://") {
        bases
            .iter()
            .find_map(|b| reference.strip_prefix(*b)?.strip_prefix('/'))?
    } else {
        reference
    };
    let mut parts = local.split('/');
    let (t, id) = (parts.next()?, parts.next()?);
    match (parts.next(), parts.next(), parts.next()) {
        (None, _, _) => {}
        (Some("_history"), Some(v), None) if ResourceId::is_valid(v) => {}
        _ => return None,
    }
    if !ResourceId::is_valid(id) {
        return None;
    }
    Some(LocalRef {
        resource_type: ResourceType::parse(t)?,
        id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASES: [&str; 2] = ["http://up/fhir", "https://proxy/t"];

    fn parse(r: &str) -> Option<(&'static str, String)> {
        parse_local_reference(r, &BASES).map(|l| (l.resource_type.as_str(), l.id.to_owned()))
    }

    #[test]
    fn accepted_forms() {
        let p1 = Some(("Patient", "p1".to_owned()));
        assert_eq!(parse("Patient/p1"), p1);
        assert_eq!(parse("Patient/p1/_history/2"), p1);
        assert_eq!(parse("http://up/fhir/Patient/p1"), p1);
        assert_eq!(parse("https://proxy/t/Patient/p1/_history/7"), p1);
    }

    #[test]
    fn refused_forms() {
        for r in [
            "#p1",
            "urn:uuid:0b6c5b0e-8d9e-4c0d-9b3f-000000000001",
            "https://elsewhere/fhir/Patient/p1",
            "http://up/fhirX/Patient/p1",
            "http://up/fhir/../Patient/p1",
            "Patient/p1/",
            "Patient//p1",
            "Patient/p1/_history",
            "Patient/p1/_history/",
            "Patient/p1/extra",
            "Patient/p1?x=1",
            "Patient/p1#frag",
            "patient/p1",
            "Patient",
            "",
            "Patient/a b",
        ] {
            assert_eq!(parse(r), None, "{r}");
        }
    }
}
