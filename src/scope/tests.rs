use http::Method;
use proptest::prelude::*;

use super::*;
use crate::fhir::{
    CompartmentRef, FhirRequest, Interaction, OperationLevel, OperationName, ResourceId,
    ResourceType,
};
use crate::smart::*;

// ---------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------

const WITH_PATIENT: TokenContext = TokenContext { has_patient: true };
const NO_PATIENT: TokenContext = TokenContext { has_patient: false };

fn rt(name: &str) -> ResourceType {
    ResourceType::parse(name).unwrap()
}

fn request(interaction: Interaction, resource_type: Option<&str>) -> FhirRequest {
    let method = match interaction {
        Interaction::Create | Interaction::BatchOrTransaction => Method::POST,
        Interaction::Update => Method::PUT,
        Interaction::Patch => Method::PATCH,
        Interaction::Delete => Method::DELETE,
        _ => Method::GET,
    };
    let instance = matches!(
        interaction,
        Interaction::Read
            | Interaction::Vread
            | Interaction::HistoryInstance
            | Interaction::Update
            | Interaction::Patch
            | Interaction::Delete
            | Interaction::Operation(_, OperationLevel::Instance)
    );
    FhirRequest {
        method,
        version: matches!(interaction, Interaction::Vread).then(|| ResourceId::parse("2").unwrap()),
        compartment: matches!(interaction, Interaction::SearchCompartment).then(|| {
            CompartmentRef {
                owner: ResourceType::PATIENT,
                id: ResourceId::parse("p1").unwrap(),
            }
        }),
        interaction,
        resource_type: resource_type.map(rt),
        id: instance.then(|| ResourceId::parse("x1").unwrap()),
        params: Vec::new(),
    }
}

fn with_params(mut req: FhirRequest, params: &[(&str, &str)]) -> FhirRequest {
    req.params = params
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect();
    req
}

fn op(name: &str, level: OperationLevel, resource_type: Option<&str>) -> FhirRequest {
    let name = OperationName::parse(&format!("${name}")).unwrap();
    request(Interaction::Operation(name, level), resource_type)
}

fn check(scopes: &str, req: &FhirRequest) -> Result<ScopeGrant, ScopeError> {
    check_scopes(&parse_scopes(scopes), req, WITH_PATIENT)
}

fn permits(scopes: &str, req: &FhirRequest) -> bool {
    check(scopes, req).is_ok()
}

fn one(text: &str) -> SmartScope {
    let set = parse_scopes(text);
    assert_eq!(set.resource_scopes().len(), 1, "{text:?} -> {set:?}");
    set.resource_scopes()[0].clone()
}

fn rejected(text: &str) -> RejectReason {
    let set = parse_scopes(text);
    assert!(
        set.resource_scopes().is_empty(),
        "{text:?} was accepted: {set:?}"
    );
    assert!(
        set.other().is_empty(),
        "{text:?} was treated as a non-clinical scope"
    );
    assert_eq!(set.rejected().len(), 1, "{text:?} -> {set:?}");
    assert_eq!(set.rejected()[0].text, text);
    set.rejected()[0].reason
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect()
}

const LETTERS: [char; 5] = ['c', 'r', 'u', 'd', 's'];

/// The v2 permission string for a bitmask over `cruds` (bit 0 = c).
fn letters(mask: u8) -> String {
    LETTERS
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, c)| *c)
        .collect()
}

fn read() -> FhirRequest {
    request(Interaction::Read, Some("Observation"))
}
fn search() -> FhirRequest {
    request(Interaction::SearchType, Some("Observation"))
}
fn search_system(params: &[(&str, &str)]) -> FhirRequest {
    with_params(request(Interaction::SearchSystem, None), params)
}
fn compartment(resource_type: Option<&str>) -> FhirRequest {
    request(Interaction::SearchCompartment, resource_type)
}

/// Every interaction that targets one type, with the permission it needs.
fn single_type_interactions() -> Vec<(FhirRequest, Permissions)> {
    vec![
        (
            request(Interaction::Read, Some("Observation")),
            Permissions::READ,
        ),
        (
            request(Interaction::Vread, Some("Observation")),
            Permissions::READ,
        ),
        (
            request(Interaction::HistoryInstance, Some("Observation")),
            Permissions::READ,
        ),
        (
            request(Interaction::SearchType, Some("Observation")),
            Permissions::SEARCH,
        ),
        (
            request(Interaction::SearchCompartment, Some("Observation")),
            Permissions::SEARCH,
        ),
        (
            request(Interaction::HistoryType, Some("Observation")),
            Permissions::SEARCH,
        ),
        (
            op("match", OperationLevel::Type, Some("Observation")),
            Permissions::SEARCH,
        ),
        (
            request(Interaction::Create, Some("Observation")),
            Permissions::CREATE,
        ),
        (
            request(Interaction::Update, Some("Observation")),
            Permissions::UPDATE,
        ),
        (
            request(Interaction::Patch, Some("Observation")),
            Permissions::UPDATE,
        ),
        (
            request(Interaction::Delete, Some("Observation")),
            Permissions::DELETE,
        ),
    ]
}

// ---------------------------------------------------------------------------------
// grammar: permissions
// ---------------------------------------------------------------------------------

#[test]
fn v1_permissions() {
    let s = one("patient/Observation.read");
    assert_eq!(s.version, ScopeVersion::V1);
    assert_eq!(s.permissions, Permissions::READ | Permissions::SEARCH);
    assert_eq!(s.context, ScopeContext::Patient);
    assert_eq!(s.resource, ScopeResource::Type(rt("Observation")));
    assert!(s.constraints.is_empty());
    assert_eq!(s.text, "patient/Observation.read");

    let s = one("user/Observation.write");
    assert_eq!(s.version, ScopeVersion::V1);
    assert_eq!(
        s.permissions,
        Permissions::CREATE | Permissions::UPDATE | Permissions::DELETE
    );
    assert_eq!(s.context, ScopeContext::User);

    let s = one("system/Observation.*");
    assert_eq!(s.version, ScopeVersion::V1);
    assert_eq!(s.permissions, Permissions::ALL);
    assert_eq!(s.context, ScopeContext::System);
}

#[test]
fn v2_permissions() {
    for (text, perms) in [
        ("rs", Permissions::READ | Permissions::SEARCH),
        (
            "cud",
            Permissions::CREATE | Permissions::UPDATE | Permissions::DELETE,
        ),
        ("cruds", Permissions::ALL),
        ("s", Permissions::SEARCH),
        ("r", Permissions::READ),
        ("c", Permissions::CREATE),
        ("u", Permissions::UPDATE),
        ("d", Permissions::DELETE),
        (
            "crs",
            Permissions::CREATE | Permissions::READ | Permissions::SEARCH,
        ),
    ] {
        let s = one(&format!("patient/Observation.{text}"));
        assert_eq!(s.version, ScopeVersion::V2, "{text}");
        assert_eq!(s.permissions, perms, "{text}");
        assert_eq!(s.permissions.to_string(), text);
    }
}

#[test]
fn all_31_in_order_subsets_are_accepted() {
    let mut seen = std::collections::HashSet::new();
    for mask in 1u8..32 {
        let text = letters(mask);
        let perms = Permissions::parse_v2(&text).unwrap();
        assert_eq!(perms.bits(), mask, "{text}");
        assert_eq!(perms.to_string(), text);
        for context in ["patient", "user", "system"] {
            for resource in ["Observation", "*"] {
                let s = one(&format!("{context}/{resource}.{text}"));
                assert_eq!(s.permissions, perms);
                assert_eq!(s.version, ScopeVersion::V2);
            }
        }
        assert!(seen.insert(text));
    }
    assert_eq!(seen.len(), 31);
}

#[test]
fn every_cruds_string_up_to_five_letters_is_accepted_iff_strictly_in_order() {
    // 5 + 25 + 125 + 625 + 3125 strings: all permutations, duplicates and orders.
    let mut words: Vec<Vec<usize>> = vec![vec![]];
    let mut accepted = 0;
    let mut total = 0;
    for _ in 0..5 {
        words = words
            .iter()
            .flat_map(|w| {
                (0..5).map(move |i| {
                    let mut w = w.clone();
                    w.push(i);
                    w
                })
            })
            .collect();
        for w in &words {
            let text: String = w.iter().map(|i| LETTERS[*i]).collect();
            let in_order = w.windows(2).all(|p| p[0] < p[1]);
            let parsed = Permissions::parse_v2(&text);
            assert_eq!(parsed.is_some(), in_order, "{text}");
            let set = parse_scopes(&format!("patient/Observation.{text}"));
            assert_eq!(set.resource_scopes().len(), usize::from(in_order), "{text}");
            if in_order {
                accepted += 1;
            } else {
                assert_eq!(set.rejected()[0].reason, RejectReason::InvalidPermissions);
            }
            total += 1;
        }
    }
    assert_eq!(total, 3905);
    assert_eq!(accepted, 31);
}

#[test]
fn invalid_permissions_are_rejected() {
    for text in [
        "sr",
        "rr",
        "x",
        "R",
        "RS",
        "CRUDS",
        "",
        "crudss",
        "rsx",
        "xrs",
        "Read",
        "READ",
        "Write",
        "all",
        "**",
        "r*",
        "read,write",
        "rs,",
        "ｒ",
        "srd",
        "dc",
        "cc",
    ] {
        let scope = format!("patient/Observation.{text}");
        assert_eq!(
            rejected(&scope),
            RejectReason::InvalidPermissions,
            "{scope}"
        );
        assert!(Permissions::parse_v2(text).is_none(), "{text}");
    }
}

#[test]
fn permissions_set_operations_and_display() {
    let rs = Permissions::READ | Permissions::SEARCH;
    assert!(rs.contains(Permissions::READ));
    assert!(rs.contains(Permissions::SEARCH));
    assert!(rs.contains(rs));
    assert!(!rs.contains(Permissions::CREATE));
    assert!(!rs.contains(Permissions::READ | Permissions::CREATE));
    assert!(rs.intersects(Permissions::READ | Permissions::CREATE));
    assert!(!rs.intersects(Permissions::CREATE | Permissions::DELETE));
    assert_eq!(rs.union(Permissions::CREATE).to_string(), "crs");
    assert_eq!(Permissions::ALL.to_string(), "cruds");
    assert_eq!(Permissions::NONE.to_string(), "");
    assert!(Permissions::NONE.is_empty());
    assert!(!rs.is_empty());
    assert_eq!(format!("{rs:?}"), "Permissions(rs)");
    assert_eq!(Permissions::parse_v1("read"), Some(rs));
    assert_eq!(Permissions::parse_v1("rs"), None);
    assert_eq!(Permissions::parse_v2("read"), None);
    assert_eq!(Permissions::default(), Permissions::NONE);
}

// ---------------------------------------------------------------------------------
// grammar: contexts, resources, other scopes
// ---------------------------------------------------------------------------------

#[test]
fn wildcard_resources() {
    let s = one("patient/*.read");
    assert_eq!(s.resource, ScopeResource::Any);
    assert_eq!(s.permissions, Permissions::READ | Permissions::SEARCH);
    let s = one("user/*.cruds");
    assert_eq!(
        (s.resource, s.permissions, s.version),
        (ScopeResource::Any, Permissions::ALL, ScopeVersion::V2)
    );
    let s = one("system/*.*");
    assert_eq!(
        (s.resource, s.permissions, s.version),
        (ScopeResource::Any, Permissions::ALL, ScopeVersion::V1)
    );
    assert_eq!(s.context, ScopeContext::System);
    assert_eq!(s.resource.to_string(), "*");
    assert!(ScopeResource::Any.matches(rt("Observation")));
}

#[test]
fn unknown_and_miscased_resource_types_are_rejected() {
    for text in [
        "patient/Foo.read",
        "patient/observation.read",
        "patient/OBSERVATION.rs",
        "user/Observations.rs",
        "system/.rs",
        "patient/**.rs",
        "patient/Observation,Condition.rs",
    ] {
        assert_eq!(rejected(text), RejectReason::UnknownResourceType, "{text}");
    }
    // ... and they grant nothing.
    for scopes in [
        "patient/observation.read",
        "patient/Foo.*",
        "patient/OBSERVATION.cruds",
    ] {
        assert!(!permits(scopes, &read()), "{scopes}");
        assert!(!permits(scopes, &search()), "{scopes}");
    }
}

#[test]
fn miscased_contexts_are_rejected() {
    for text in [
        "Patient/Observation.read",
        "USER/Observation.rs",
        "System/*.*",
    ] {
        assert_eq!(rejected(text), RejectReason::UnknownContext, "{text}");
    }
    assert!(!permits("Patient/Observation.read", &read()));
}

#[test]
fn missing_or_empty_permissions_are_rejected() {
    assert_eq!(
        rejected("patient/Observation"),
        RejectReason::MissingPermissions
    );
    assert_eq!(rejected("patient/"), RejectReason::MissingPermissions);
    assert_eq!(rejected("patient/*"), RejectReason::MissingPermissions);
    assert_eq!(
        rejected("patient/Observation?category=x"),
        RejectReason::MissingPermissions
    );
    assert_eq!(
        rejected("patient/Observation."),
        RejectReason::InvalidPermissions
    );
    assert_eq!(
        rejected("patient/Observation.rs.x"),
        RejectReason::InvalidPermissions
    );
    assert_eq!(
        rejected("patient/Observation.r/s"),
        RejectReason::InvalidPermissions
    );
}

#[test]
fn non_clinical_scopes_are_kept_as_other() {
    let text = "openid fhirUser profile launch launch/patient launch/encounter offline_access online_access \
                patient/Observation.rs smart/orchestrate_launch";
    let set = parse_scopes(text);
    assert_eq!(
        set.other(),
        [
            "openid",
            "fhirUser",
            "profile",
            "launch",
            "launch/patient",
            "launch/encounter",
            "offline_access",
            "online_access",
            "smart/orchestrate_launch"
        ]
    );
    assert_eq!(set.resource_scopes().len(), 1);
    assert!(set.rejected().is_empty());
    assert!(set.has_other("offline_access"));
    assert!(!set.has_other("patient/Observation.rs"));
    assert!(!set.is_empty());
}

#[test]
fn smart_scope_parse_and_display() {
    assert_eq!(
        SmartScope::parse("openid"),
        Err(RejectReason::NotResourceScope)
    );
    assert_eq!(
        SmartScope::parse("launch/patient"),
        Err(RejectReason::NotResourceScope)
    );
    assert_eq!(
        SmartScope::parse("patient/Foo.rs"),
        Err(RejectReason::UnknownResourceType)
    );
    let s = SmartScope::parse("patient/Observation.rs?code=1234-5").unwrap();
    assert_eq!(s.to_string(), "patient/Observation.rs?code=1234-5");
    assert!(s.is_constrained());
    assert!(s.grants(rt("Observation"), Permissions::READ));
    assert!(!s.grants(rt("Condition"), Permissions::READ));
    assert!(!s.grants(rt("Observation"), Permissions::CREATE));
}

// ---------------------------------------------------------------------------------
// grammar: constraints
// ---------------------------------------------------------------------------------

#[test]
fn constraint_is_parsed_with_pipe_in_value() {
    let s = one(
        "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory",
    );
    assert_eq!(s.version, ScopeVersion::V2);
    assert_eq!(
        s.constraints,
        pairs(&[(
            "category",
            "http://terminology.hl7.org/CodeSystem/observation-category|laboratory"
        )])
    );
}

#[test]
fn constraints_are_percent_decoded_and_ordered() {
    let s = one(
        "user/Observation.rs?category=http%3A%2F%2Fterminology.hl7.org%2FCodeSystem%2Fobservation-category%7Cvital-signs&code:not=8867-4&code=a+b&code=%E2%9C%93",
    );
    assert_eq!(
        s.constraints,
        pairs(&[
            (
                "category",
                "http://terminology.hl7.org/CodeSystem/observation-category|vital-signs"
            ),
            ("code:not", "8867-4"),
            ("code", "a+b"),
            ("code", "✓"),
        ])
    );
}

#[test]
fn constraint_names_may_be_encoded_and_use_modifiers_and_chains() {
    let s = one(
        "patient/Observation.s?%63ategory=x&subject.name=y&_tag=t&_security:not=R&_id=1&_lastUpdated=gt2020",
    );
    assert_eq!(
        s.constraints,
        pairs(&[
            ("category", "x"),
            ("subject.name", "y"),
            ("_tag", "t"),
            ("_security:not", "R"),
            ("_id", "1"),
            ("_lastUpdated", "gt2020"),
        ])
    );
}

#[test]
fn malformed_constraints_are_rejected() {
    for query in [
        "",
        "=x",
        "category",
        "category=",
        "category=x&",
        "&category=x",
        "category=x&&code=y",
        "category=%zz",
        "category=%4",
        "category=%",
        "category=%ff",
        "category=a%0Ab",
        "cat%20egory=x",
        "cat egory=x",
        "categ/ory=x",
        "%=x",
        "category=x&code",
    ] {
        let text = format!("patient/Observation.rs?{query}");
        if query.contains(' ') {
            assert!(parse_scopes(&text).resource_scopes().is_empty(), "{text}");
            continue;
        }
        assert_eq!(
            rejected(&text),
            RejectReason::MalformedConstraints,
            "{text}"
        );
    }
}

#[test]
fn result_shaping_parameters_are_not_allowed_as_constraints() {
    for name in [
        "_include",
        "_revinclude",
        "_count",
        "_elements",
        "_summary",
        "_sort",
        "_type",
        "_has",
        "_contained",
        "_total",
        "_format",
        "_include:iterate",
        "_query",
        "_filter",
        "_text",
    ] {
        let text = format!("patient/Observation.rs?{name}=x");
        assert_eq!(
            rejected(&text),
            RejectReason::ConstraintNotAllowed,
            "{text}"
        );
    }
}

#[test]
fn v1_scopes_cannot_carry_constraints() {
    for text in [
        "patient/Observation.read?category=x",
        "user/*.*?a=b",
        "system/Observation.write?x",
    ] {
        assert_eq!(rejected(text), RejectReason::ConstraintsInV1, "{text}");
    }
    assert!(!permits("patient/Observation.read?category=x", &search()));
}

#[test]
fn reject_reasons_read_as_lowercase_without_trailing_period() {
    for reason in [
        RejectReason::NotResourceScope,
        RejectReason::UnknownContext,
        RejectReason::MissingPermissions,
        RejectReason::UnknownResourceType,
        RejectReason::InvalidPermissions,
        RejectReason::ConstraintsInV1,
        RejectReason::MalformedConstraints,
        RejectReason::ConstraintNotAllowed,
        RejectReason::TooMany,
    ] {
        let msg = reason.to_string();
        assert!(msg.starts_with(|c: char| c.is_lowercase()), "{msg}");
        assert!(!msg.ends_with('.'), "{msg}");
    }
}

// ---------------------------------------------------------------------------------
// grammar: scope sets
// ---------------------------------------------------------------------------------

#[test]
fn parse_scopes_splits_on_ascii_whitespace() {
    let set = parse_scopes("  patient/Observation.rs\t\tuser/Condition.r\n openid\r\n  ");
    let texts: Vec<_> = set
        .resource_scopes()
        .iter()
        .map(|s| s.text.as_str())
        .collect();
    assert_eq!(texts, ["patient/Observation.rs", "user/Condition.r"]);
    assert_eq!(set.other(), ["openid"]);
    assert_eq!(parse_scopes(""), ScopeSet::default());
    assert_eq!(parse_scopes(" \t\n"), ScopeSet::default());
    assert!(parse_scopes("").is_empty());
}

#[test]
fn non_ascii_whitespace_does_not_split() {
    // U+00A0 is not a scope separator, so this is one (unknown-type) scope.
    let set = parse_scopes("patient/Observation.rs\u{a0}user/Condition.r");
    assert!(set.resource_scopes().is_empty());
    assert_eq!(set.rejected().len(), 1);
}

#[test]
fn json_array_form_matches_space_separated_form() {
    let claim = r#"["openid","fhirUser","launch/patient","patient/Observation.rs?category=laboratory","patient/Foo.read","user/*.cruds"]"#;
    let list: Vec<String> = serde_json::from_str(claim).unwrap();
    let from_list = ScopeSet::from_list(&list);
    let from_string = parse_scopes(&list.join(" "));
    assert_eq!(from_list, from_string);
    assert_eq!(from_list.resource_scopes().len(), 2);
    assert_eq!(from_list.other(), ["openid", "fhirUser", "launch/patient"]);
    assert_eq!(from_list.rejected().len(), 1);
    assert_eq!(
        from_list.rejected()[0].reason,
        RejectReason::UnknownResourceType
    );

    // Items with embedded whitespace are split as well; &str items work too.
    let set = ScopeSet::from_list(["patient/Observation.rs openid", " ", ""]);
    assert_eq!(set.resource_scopes().len(), 1);
    assert_eq!(set.other(), ["openid"]);
    assert_eq!(
        ScopeSet::from_list(Vec::<String>::new()),
        ScopeSet::default()
    );
}

#[test]
fn duplicate_scopes_are_kept_once() {
    let set =
        parse_scopes("patient/Observation.rs patient/Observation.rs patient/Observation.read");
    assert_eq!(set.resource_scopes().len(), 2);
}

#[test]
fn too_many_scopes_are_rejected_beyond_the_limit() {
    let types: Vec<ResourceType> = ResourceType::all().collect();
    let texts: Vec<String> = ["r", "s"]
        .iter()
        .flat_map(|p| types.iter().map(move |t| format!("user/{t}.{p}")))
        .collect();
    assert!(texts.len() > MAX_RESOURCE_SCOPES);
    let set = ScopeSet::from_list(&texts);
    assert_eq!(set.resource_scopes().len(), MAX_RESOURCE_SCOPES);
    assert_eq!(set.rejected().len(), texts.len() - MAX_RESOURCE_SCOPES);
    assert!(
        set.rejected()
            .iter()
            .all(|r| r.reason == RejectReason::TooMany)
    );
    // The last kept scope still works and its index fits the grant.
    let last = set.resource_scopes().last().unwrap().clone();
    let ScopeResource::Type(t) = last.resource else {
        panic!("typed")
    };
    let grant = check_scopes(
        &set,
        &request(Interaction::SearchType, Some(t.as_str())),
        NO_PATIENT,
    )
    .unwrap();
    assert_eq!(
        grant.scope_indices().collect::<Vec<_>>(),
        [MAX_RESOURCE_SCOPES - 1]
    );
    assert_eq!(grant.scopes(&set).next(), Some(&last));
}

#[test]
fn context_set_basics() {
    let set: ContextSet = [ScopeContext::System, ScopeContext::Patient]
        .into_iter()
        .collect();
    assert!(set.contains(ScopeContext::Patient));
    assert!(!set.contains(ScopeContext::User));
    assert_eq!(set.len(), 2);
    assert_eq!(
        set.iter().collect::<Vec<_>>(),
        [ScopeContext::Patient, ScopeContext::System]
    );
    assert!(ContextSet::EMPTY.is_empty());
    let mut s = ContextSet::default();
    s.insert(ScopeContext::User);
    assert_eq!(s, ContextSet::EMPTY.with(ScopeContext::User));
    assert_eq!(format!("{s:?}"), "{User}");
    assert_eq!(ScopeContext::Patient.to_string(), "patient");
}

// ---------------------------------------------------------------------------------
// matcher: single-type interactions
// ---------------------------------------------------------------------------------

#[test]
fn every_permission_set_against_every_single_type_interaction() {
    for mask in 1u8..32 {
        let text = letters(mask);
        let perms = Permissions::parse_v2(&text).unwrap();
        for context in ["patient", "user", "system"] {
            for resource in ["Observation", "*"] {
                let scopes = format!("{context}/{resource}.{text}");
                for (req, needed) in single_type_interactions() {
                    let result = check(&scopes, &req);
                    assert_eq!(
                        result.is_ok(),
                        perms.contains(needed),
                        "{scopes} {}",
                        req.interaction.name()
                    );
                    if let Ok(grant) = result {
                        assert_eq!(grant.required(), needed);
                        assert_eq!(grant.contexts().len(), 1);
                    }
                }
            }
        }
    }
}

#[test]
fn v1_read_permits_read_and_search_but_not_write() {
    for (req, needed) in single_type_interactions() {
        let ok = permits("patient/Observation.read", &req);
        assert_eq!(
            ok,
            needed == Permissions::READ || needed == Permissions::SEARCH,
            "{}",
            req.interaction.name()
        );
    }
}

#[test]
fn write_without_read_cannot_read_or_search() {
    for scopes in ["patient/Observation.write", "patient/Observation.cud"] {
        for (req, needed) in single_type_interactions() {
            let ok = permits(scopes, &req);
            let write = [
                Permissions::CREATE,
                Permissions::UPDATE,
                Permissions::DELETE,
            ]
            .contains(&needed);
            assert_eq!(ok, write, "{scopes} {}", req.interaction.name());
        }
    }
}

#[test]
fn read_is_not_search_and_search_is_not_read() {
    assert!(permits("patient/Observation.r", &read()));
    assert!(!permits("patient/Observation.r", &search()));
    assert!(!permits(
        "patient/Observation.r",
        &compartment(Some("Observation"))
    ));
    assert!(!permits(
        "patient/Observation.r",
        &request(Interaction::HistoryType, Some("Observation"))
    ));
    assert!(permits(
        "patient/Observation.r",
        &request(Interaction::Vread, Some("Observation"))
    ));
    assert!(permits(
        "patient/Observation.r",
        &request(Interaction::HistoryInstance, Some("Observation"))
    ));

    assert!(permits("patient/Observation.s", &search()));
    assert!(!permits("patient/Observation.s", &read()));
    assert!(!permits(
        "patient/Observation.s",
        &request(Interaction::Vread, Some("Observation"))
    ));
}

#[test]
fn wildcards_cover_every_type() {
    for t in ResourceType::all() {
        let name = t.as_str();
        assert!(permits(
            "patient/*.read",
            &request(Interaction::Read, Some(name))
        ));
        assert!(permits(
            "patient/*.read",
            &request(Interaction::SearchType, Some(name))
        ));
        assert!(!permits(
            "patient/*.read",
            &request(Interaction::Create, Some(name))
        ));
        assert!(permits(
            "user/*.cruds",
            &request(Interaction::Delete, Some(name))
        ));
        assert!(permits(
            "system/*.*",
            &request(Interaction::Update, Some(name))
        ));
    }
}

#[test]
fn a_typed_scope_does_not_cover_other_types() {
    let err = check(
        "patient/Observation.rs",
        &request(Interaction::Read, Some("Condition")),
    )
    .unwrap_err();
    assert_eq!(
        err,
        ScopeError::Insufficient {
            interaction: "read",
            resource_type: TypeName(Some(rt("Condition"))),
            required: Permissions::READ
        }
    );
    assert_eq!(
        err.to_string(),
        "scope set does not permit `read` on `Condition`"
    );
    assert_eq!(err.reason(), "scope_insufficient");
}

#[test]
fn insufficient_search_message() {
    let err = check("patient/Observation.r", &search()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "scope set does not permit `search-type` on `Observation`"
    );
}

#[test]
fn empty_scope_set_permits_nothing() {
    for (req, _) in single_type_interactions() {
        assert!(!permits("", &req));
        assert!(!permits(
            "openid fhirUser launch/patient offline_access",
            &req
        ));
    }
    assert!(!permits("", &search_system(&[])));
    assert!(!permits("", &compartment(None)));
}

#[test]
fn patient_scopes_need_a_patient_claim() {
    let set = parse_scopes("patient/Observation.rs patient/*.cruds");
    for (req, _) in single_type_interactions() {
        assert!(check_scopes(&set, &req, WITH_PATIENT).is_ok());
        assert!(check_scopes(&set, &req, NO_PATIENT).is_err());
    }
    assert!(check_scopes(&set, &compartment(None), NO_PATIENT).is_err());
    assert!(check_scopes(&set, &search_system(&[]), NO_PATIENT).is_err());

    // user/ and system/ scopes do not depend on the claim.
    let set = parse_scopes("patient/Observation.rs user/Observation.r");
    let grant = check_scopes(&set, &read(), NO_PATIENT).unwrap();
    assert_eq!(
        grant.contexts().iter().collect::<Vec<_>>(),
        [ScopeContext::User]
    );
    assert_eq!(grant.scope_indices().collect::<Vec<_>>(), [1]);
    assert!(check_scopes(&set, &search(), NO_PATIENT).is_err());
    assert!(check_scopes(&set, &search(), WITH_PATIENT).is_ok());
    assert!(check_scopes(&parse_scopes("system/Observation.s"), &search(), NO_PATIENT).is_ok());
}

#[test]
fn grant_records_permitting_scopes_and_contexts() {
    let set = parse_scopes(
        "openid patient/Condition.rs patient/Observation.rs user/*.read system/Observation.s launch",
    );
    let grant = check_scopes(&set, &read(), WITH_PATIENT).unwrap();
    assert_eq!(grant.scope_indices().collect::<Vec<_>>(), [1, 2]);
    let texts: Vec<_> = grant.scopes(&set).map(|s| s.text.as_str()).collect();
    assert_eq!(texts, ["patient/Observation.rs", "user/*.read"]);
    let contexts = grant.contexts();
    assert!(contexts.contains(ScopeContext::Patient));
    assert!(contexts.contains(ScopeContext::User));
    assert!(!contexts.contains(ScopeContext::System));
    assert!(grant.arm(ScopeContext::System).is_none());
    assert_eq!(
        grant.arm(ScopeContext::User).unwrap().types,
        TypeCoverage::One(rt("Observation"))
    );
    assert!(grant.covers_type(Some(ScopeContext::Patient), rt("Observation")));
    assert!(!grant.covers_type(Some(ScopeContext::System), rt("Observation")));
    assert!(grant.covers_type(None, rt("Observation")));
    assert!(!grant.covers_type(None, rt("Condition")));
    assert_eq!(grant.required(), Permissions::READ);
    assert!(grant.search_constraint().is_none());

    let grant = check_scopes(&set, &search(), WITH_PATIENT).unwrap();
    assert_eq!(grant.scope_indices().collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(grant.contexts().len(), 3);
}

#[test]
fn malformed_requests_fail_closed() {
    for interaction in [
        Interaction::Read,
        Interaction::SearchType,
        Interaction::Create,
        Interaction::HistoryType,
    ] {
        let err = check("system/*.*", &request(interaction, None)).unwrap_err();
        assert_eq!(err.reason(), "scope_malformed_request");
    }
    let err = check("system/*.*", &op("match", OperationLevel::Type, None)).unwrap_err();
    assert_eq!(err.reason(), "scope_malformed_request");
}

// ---------------------------------------------------------------------------------
// matcher: constraints
// ---------------------------------------------------------------------------------

const LAB: &str = "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory";
const VITALS: &str = "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|vital-signs";

fn lab() -> Vec<(String, String)> {
    pairs(&[(
        "category",
        "http://terminology.hl7.org/CodeSystem/observation-category|laboratory",
    )])
}
fn vitals() -> Vec<(String, String)> {
    pairs(&[(
        "category",
        "http://terminology.hl7.org/CodeSystem/observation-category|vital-signs",
    )])
}

#[test]
fn constrained_scope_yields_its_constraint_for_search() {
    let grant = check(LAB, &search()).unwrap();
    assert_eq!(
        grant.search_constraint(),
        SearchConstraint::AnyOf(vec![lab()])
    );
    assert_eq!(
        grant.constraint_for(ScopeContext::Patient),
        Some(&SearchConstraint::AnyOf(vec![lab()]))
    );
    assert_eq!(grant.constraint_for(ScopeContext::User), None);

    let grant = check(LAB, &compartment(Some("Observation"))).unwrap();
    assert_eq!(
        grant.search_constraint(),
        SearchConstraint::AnyOf(vec![lab()])
    );
}

#[test]
fn constrained_scopes_union() {
    let grant = check(&format!("{LAB} {VITALS}"), &search()).unwrap();
    assert_eq!(
        grant.search_constraint(),
        SearchConstraint::AnyOf(vec![lab(), vitals()])
    );

    let multi = "patient/Observation.s?category=lab&code=1234-5";
    let grant = check(&format!("{multi} {VITALS}"), &search()).unwrap();
    assert_eq!(
        grant.search_constraint(),
        SearchConstraint::AnyOf(vec![
            pairs(&[("category", "lab"), ("code", "1234-5")]),
            vitals()
        ])
    );
}

#[test]
fn identical_constraints_are_not_repeated() {
    let scopes = "patient/Observation.rs?category=lab patient/Observation.s?category=lab patient/*.s?category=lab";
    let grant = check(scopes, &search()).unwrap();
    assert_eq!(
        grant.search_constraint(),
        SearchConstraint::AnyOf(vec![pairs(&[("category", "lab")])])
    );
    assert_eq!(grant.scope_indices().count(), 3);
}

#[test]
fn an_unconstrained_scope_lifts_constraints() {
    for scopes in [
        format!("{LAB} patient/Observation.rs"),
        format!("patient/Observation.rs {LAB}"),
        format!("{LAB} patient/*.s"),
        format!("{LAB} patient/Observation.read"),
    ] {
        let grant = check(&scopes, &search()).unwrap();
        assert_eq!(
            grant.search_constraint(),
            SearchConstraint::None,
            "{scopes}"
        );
        assert_eq!(grant.scope_indices().count(), 2);
    }
    // A constrained scope that does not permit the interaction is irrelevant.
    let grant = check(&format!("{LAB} patient/Observation.s"), &search()).unwrap();
    assert!(grant.search_constraint().is_none());
}

#[test]
fn constraints_are_kept_per_context() {
    let scopes = "patient/Observation.rs user/Observation.rs?category=lab system/Observation.s?code=x system/Observation.s?code=y";
    let grant = check(scopes, &search()).unwrap();
    assert_eq!(
        grant.constraint_for(ScopeContext::Patient),
        Some(&SearchConstraint::None)
    );
    assert_eq!(
        grant.constraint_for(ScopeContext::User),
        Some(&SearchConstraint::AnyOf(vec![pairs(&[(
            "category", "lab"
        )])]))
    );
    assert_eq!(
        grant.constraint_for(ScopeContext::System),
        Some(&SearchConstraint::AnyOf(vec![
            pairs(&[("code", "x")]),
            pairs(&[("code", "y")])
        ]))
    );
    assert_eq!(grant.search_constraint(), SearchConstraint::None);

    let scopes = "user/Observation.rs?category=lab system/Observation.s?code=x";
    let grant = check(scopes, &search()).unwrap();
    assert_eq!(
        grant.search_constraint(),
        SearchConstraint::AnyOf(vec![pairs(&[("category", "lab")]), pairs(&[("code", "x")])])
    );
}

#[test]
fn constrained_scopes_grant_nothing_where_constraints_cannot_be_enforced() {
    // Searches of one type get the constraint added to the query; reads, vreads and
    // instance history have it evaluated on the returned record. Type history, `$match`
    // and writes cannot be checked record by record.
    for (req, needed) in single_type_interactions() {
        let honoured = matches!(
            req.interaction,
            Interaction::SearchType
                | Interaction::SearchCompartment
                | Interaction::Read
                | Interaction::Vread
                | Interaction::HistoryInstance
        );
        let scopes = "patient/Observation.cruds?category=lab";
        let result = check(scopes, &req);
        assert_eq!(result.is_ok(), honoured, "{}", req.interaction.name());
        if let Err(err) = result {
            assert_eq!(err.reason(), "scope_constraint_unenforceable");
            assert_eq!(
                err.to_string(),
                format!(
                    "scope constraints cannot be enforced for `{}` on `Observation`",
                    req.interaction.name()
                )
            );
        }
        // With an unconstrained scope alongside, only that one permits.
        let both = format!("{scopes} patient/Observation.{needed}");
        let grant = check(&both, &req).unwrap();
        assert!(grant.search_constraint().is_none());
        let expected: &[usize] = if honoured { &[0, 1] } else { &[1] };
        assert_eq!(
            grant.scope_indices().collect::<Vec<_>>(),
            expected,
            "{}",
            req.interaction.name()
        );
    }
}

#[test]
fn constrained_reads_carry_their_constraints_for_the_record_check() {
    for req in [
        read(),
        request(Interaction::Vread, Some("Observation")),
        request(Interaction::HistoryInstance, Some("Observation")),
    ] {
        let grant = check(&format!("{LAB} {VITALS}"), &req).unwrap();
        assert_eq!(
            grant.constraint_for(ScopeContext::Patient),
            Some(&SearchConstraint::AnyOf(vec![lab(), vitals()])),
            "{}",
            req.interaction.name()
        );
        assert!(grant.covers_type(Some(ScopeContext::Patient), rt("Observation")));
        // An unconstrained scope alongside lifts them.
        let grant = check(&format!("{LAB} patient/Observation.r"), &req).unwrap();
        assert_eq!(
            grant.constraint_for(ScopeContext::Patient),
            Some(&SearchConstraint::None)
        );
    }
    // `$everything` is a Patient read whose other entries cannot be narrowed by a
    // Patient constraint: still refused.
    let err = check(
        "patient/Patient.r?gender=female",
        &op("everything", OperationLevel::Instance, Some("Patient")),
    )
    .unwrap_err();
    assert_eq!(err.reason(), "scope_constraint_unenforceable");
}

#[test]
fn insufficient_wins_over_unenforceable_when_no_scope_has_the_permission() {
    let err = check("patient/Observation.s?category=lab", &read()).unwrap_err();
    assert_eq!(err.reason(), "scope_insufficient");
}

// ---------------------------------------------------------------------------------
// matcher: system-level search and history
// ---------------------------------------------------------------------------------

#[test]
fn system_search_without_type_needs_a_wildcard() {
    for interaction in [Interaction::SearchSystem, Interaction::HistorySystem] {
        let req = request(interaction, None);
        assert!(permits("patient/*.s", &req));
        assert!(permits("user/*.read", &req));
        assert!(permits("system/*.*", &req));
        assert!(!permits("patient/*.r", &req));
        assert!(!permits(
            "patient/Observation.rs patient/Condition.rs",
            &req
        ));
        let err = check("patient/Observation.rs", &req).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "scope set does not permit `{}` on `*`",
                req.interaction.name()
            )
        );
        let grant = check("patient/*.s patient/Observation.s", &req).unwrap();
        assert_eq!(
            grant.arm(ScopeContext::Patient).unwrap().types,
            TypeCoverage::All
        );
        assert_eq!(grant.scope_indices().collect::<Vec<_>>(), [0]);
    }
}

#[test]
fn system_search_with_type_needs_every_listed_type() {
    let scopes = "patient/Observation.rs user/Condition.s patient/Patient.r";
    let ok = check(
        scopes,
        &search_system(&[("_type", "Observation,Condition")]),
    )
    .unwrap();
    assert_eq!(ok.scope_indices().collect::<Vec<_>>(), [0, 1]);
    assert_eq!(
        ok.arm(ScopeContext::Patient).unwrap().types,
        TypeCoverage::Only(vec![rt("Observation")])
    );
    assert_eq!(
        ok.arm(ScopeContext::User).unwrap().types,
        TypeCoverage::Only(vec![rt("Condition")])
    );
    assert!(ok.covers_type(None, rt("Condition")));
    assert!(!ok.covers_type(Some(ScopeContext::Patient), rt("Condition")));

    // Repeated `_type` parameters are all checked.
    assert!(permits(
        scopes,
        &search_system(&[
            ("_type", "Observation"),
            ("_type", "Condition"),
            ("code", "x")
        ])
    ));
    let err = check(
        scopes,
        &search_system(&[("_type", "Observation"), ("_type", "Patient")]),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "scope set does not permit `search-system` on `Patient`"
    );
    let err = check(
        scopes,
        &search_system(&[("_type", "Observation,Encounter")]),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "scope set does not permit `search-system` on `Encounter`"
    );

    // A wildcard covers any list.
    let grant = check(
        "user/*.s",
        &search_system(&[("_type", "Observation,Encounter,Observation")]),
    )
    .unwrap();
    assert_eq!(
        grant.arm(ScopeContext::User).unwrap().types,
        TypeCoverage::All
    );

    // Sorted, unique coverage.
    let grant = check(
        "patient/Observation.s patient/Condition.s",
        &search_system(&[("_type", "Observation,Condition,Observation")]),
    )
    .unwrap();
    assert_eq!(
        grant.arm(ScopeContext::Patient).unwrap().types,
        TypeCoverage::Only(vec![rt("Condition"), rt("Observation")])
    );
}

#[test]
fn system_history_with_type() {
    let req = with_params(
        request(Interaction::HistorySystem, None),
        &[("_type", "Observation")],
    );
    assert!(permits("patient/Observation.s", &req));
    assert!(!permits("patient/Observation.r", &req));
}

#[test]
fn bad_type_parameters_fail_closed() {
    for value in [
        "",
        "Foo",
        "observation",
        "Observation,",
        ",Observation",
        "Observation,,Condition",
        "Observation, Condition",
        "*",
    ] {
        let err = check("system/*.*", &search_system(&[("_type", value)])).unwrap_err();
        assert_eq!(err.reason(), "scope_invalid_type_parameter", "{value:?}");
        assert_eq!(
            err,
            ScopeError::InvalidTypeParameter {
                text: format!("_type={value}")
            }
        );
    }
    let err = check(
        "system/*.*",
        &search_system(&[("_type:not", "Observation")]),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "search parameter `_type:not=Observation` does not name resource types"
    );
}

#[test]
fn constrained_scopes_do_not_cover_system_searches() {
    let err = check("patient/*.s?_tag=x", &search_system(&[])).unwrap_err();
    assert_eq!(err.reason(), "scope_constraint_unenforceable");
    let err = check(LAB, &search_system(&[("_type", "Observation")])).unwrap_err();
    assert_eq!(err.reason(), "scope_constraint_unenforceable");
    let grant = check(
        &format!("{LAB} patient/Observation.s"),
        &search_system(&[("_type", "Observation")]),
    )
    .unwrap();
    assert_eq!(grant.scope_indices().collect::<Vec<_>>(), [1]);
    assert!(grant.search_constraint().is_none());
}

// ---------------------------------------------------------------------------------
// matcher: compartment search
// ---------------------------------------------------------------------------------

#[test]
fn typed_compartment_search_needs_search_on_that_type() {
    assert!(permits(
        "patient/Observation.s",
        &compartment(Some("Observation"))
    ));
    assert!(!permits(
        "patient/Observation.r",
        &compartment(Some("Observation"))
    ));
    assert!(!permits(
        "patient/Condition.s",
        &compartment(Some("Observation"))
    ));
    // Searching the compartment does not need any permission on the owner type.
    assert!(!permits(
        "patient/Patient.rs",
        &compartment(Some("Observation"))
    ));
}

#[test]
fn wildcard_compartment_search_covers_the_searchable_types() {
    let set = parse_scopes(
        "patient/Observation.rs patient/Condition.r user/Encounter.s user/Observation.s?category=lab",
    );
    let grant = check_scopes(&set, &compartment(None), WITH_PATIENT).unwrap();
    assert_eq!(grant.scope_indices().collect::<Vec<_>>(), [0, 2]);
    assert!(grant.covers_type(None, rt("Observation")));
    assert!(grant.covers_type(None, rt("Encounter")));
    assert!(!grant.covers_type(None, rt("Condition")));
    assert!(grant.covers_type(Some(ScopeContext::Patient), rt("Observation")));
    assert!(!grant.covers_type(Some(ScopeContext::User), rt("Observation")));
    assert_eq!(
        grant.arm(ScopeContext::User).unwrap().types,
        TypeCoverage::Only(vec![rt("Encounter")])
    );
    assert!(grant.search_constraint().is_none());

    let grant = check("patient/*.s patient/Observation.s", &compartment(None)).unwrap();
    assert_eq!(
        grant.arm(ScopeContext::Patient).unwrap().types,
        TypeCoverage::All
    );
    let grant = check("patient/Observation.s patient/*.s", &compartment(None)).unwrap();
    assert_eq!(
        grant.arm(ScopeContext::Patient).unwrap().types,
        TypeCoverage::All
    );

    let err = check("patient/Observation.r patient/*.cud", &compartment(None)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "scope set does not permit `search-compartment` on `*`"
    );
    let err = check(LAB, &compartment(None)).unwrap_err();
    assert_eq!(err.reason(), "scope_constraint_unenforceable");
}

// ---------------------------------------------------------------------------------
// matcher: operations, batch, public endpoints
// ---------------------------------------------------------------------------------

#[test]
fn type_level_match_needs_search() {
    let req = op("match", OperationLevel::Type, Some("Patient"));
    assert!(permits("user/Patient.s", &req));
    assert!(permits("user/*.read", &req));
    assert!(!permits("user/Patient.r", &req));
    assert!(!permits("user/Observation.s", &req));
    let err = check(
        "system/*.*",
        &op("match", OperationLevel::Instance, Some("Patient")),
    )
    .unwrap_err();
    assert_eq!(err.reason(), "scope_operation_not_permitted");
    assert!(!permits(
        "system/*.*",
        &op("match", OperationLevel::System, None)
    ));
}

#[test]
fn patient_everything_needs_read_on_patient() {
    let req = op("everything", OperationLevel::Instance, Some("Patient"));
    let grant = check("patient/Patient.r", &req).unwrap();
    assert_eq!(grant.required(), Permissions::READ);
    assert!(permits("patient/*.read", &req));
    assert!(!permits("patient/Patient.s", &req));
    assert!(!permits("patient/Observation.rs", &req));
    assert!(check_scopes(&parse_scopes("patient/Patient.r"), &req, NO_PATIENT).is_err());
    // Only on a Patient instance.
    for req in [
        op("everything", OperationLevel::Instance, Some("Encounter")),
        op("everything", OperationLevel::Type, Some("Patient")),
        op("everything", OperationLevel::System, None),
    ] {
        let err = check("system/*.*", &req).unwrap_err();
        assert_eq!(err.reason(), "scope_operation_not_permitted");
    }
}

#[test]
fn other_operations_are_not_permitted() {
    for (name, level, t) in [
        ("validate", OperationLevel::Type, Some("Observation")),
        ("export", OperationLevel::System, None),
        ("export", OperationLevel::Type, Some("Patient")),
        ("lastn", OperationLevel::Type, Some("Observation")),
        ("Match", OperationLevel::Type, Some("Patient")),
        ("EVERYTHING", OperationLevel::Instance, Some("Patient")),
        ("meta", OperationLevel::Instance, Some("Observation")),
    ] {
        let err = check(
            "system/*.* user/*.cruds patient/*.cruds",
            &op(name, level, t),
        )
        .unwrap_err();
        assert_eq!(
            err,
            ScopeError::OperationNotPermitted {
                operation: name.to_owned(),
                level
            }
        );
        assert_eq!(
            err.to_string(),
            format!("operation `${name}` is not permitted by scopes")
        );
        assert_eq!(err.reason(), "scope_operation_not_permitted");
    }
}

#[test]
fn batch_and_public_endpoints_are_refused() {
    let err = check(
        "system/*.*",
        &request(Interaction::BatchOrTransaction, None),
    )
    .unwrap_err();
    assert_eq!(err, ScopeError::BatchNotPermitted);
    assert_eq!(err.reason(), "scope_operation_not_permitted");
    for interaction in [
        Interaction::Capabilities,
        Interaction::SmartConfiguration,
        Interaction::UdapMetadata,
    ] {
        let name = interaction.name();
        let err = check("system/*.*", &request(interaction, None)).unwrap_err();
        assert_eq!(err, ScopeError::NotApplicable { interaction: name });
        assert_eq!(err.reason(), "scope_not_applicable");
    }
}

#[test]
fn error_messages_are_lowercase_without_trailing_period() {
    let errors = [
        ScopeError::Insufficient {
            interaction: "read",
            resource_type: TypeName(None),
            required: Permissions::READ,
        },
        ScopeError::ConstraintUnenforceable {
            interaction: "read",
            resource_type: TypeName(Some(rt("Observation"))),
        },
        ScopeError::OperationNotPermitted {
            operation: "x".to_owned(),
            level: OperationLevel::System,
        },
        ScopeError::BatchNotPermitted,
        ScopeError::InvalidTypeParameter {
            text: "_type=x".to_owned(),
        },
        ScopeError::NotApplicable {
            interaction: "capabilities",
        },
        ScopeError::MalformedRequest {
            interaction: "read",
        },
    ];
    let mut reasons = std::collections::HashSet::new();
    for err in errors {
        let msg = err.to_string();
        assert!(msg.starts_with(|c: char| c.is_lowercase()), "{msg}");
        assert!(!msg.ends_with('.'), "{msg}");
        assert!(err.reason().starts_with("scope_"));
        reasons.insert(err.reason());
    }
    assert_eq!(reasons.len(), 6);
}

// ---------------------------------------------------------------------------------
// ScopeSet helpers for later stages
// ---------------------------------------------------------------------------------

#[test]
fn covers_lists_matching_scopes() {
    let set = parse_scopes(
        "patient/Observation.rs user/*.r system/Condition.s patient/Observation.s?code=x",
    );
    let obs = rt("Observation");
    let texts = |ctx, perm| -> Vec<&str> {
        set.covers(ctx, obs, perm)
            .map(|s| s.text.as_str())
            .collect()
    };
    assert_eq!(
        texts(None, Permissions::READ),
        ["patient/Observation.rs", "user/*.r"]
    );
    assert_eq!(
        texts(None, Permissions::SEARCH),
        ["patient/Observation.rs", "patient/Observation.s?code=x"]
    );
    assert_eq!(
        texts(Some(ScopeContext::User), Permissions::READ),
        ["user/*.r"]
    );
    assert!(texts(Some(ScopeContext::System), Permissions::SEARCH).is_empty());
    assert!(texts(None, Permissions::READ | Permissions::CREATE).is_empty());
    assert_eq!(
        set.covers(None, rt("Condition"), Permissions::SEARCH)
            .count(),
        1
    );
}

#[test]
fn permits_type_read_for_included_resources() {
    let set = parse_scopes(
        "patient/Observation.r user/Condition.s patient/Encounter.cud patient/Patient.rs?_id=1 system/Practitioner.read",
    );
    let t = WITH_PATIENT;
    assert!(set.permits_type_read(rt("Observation"), t));
    assert!(set.permits_type_read(rt("Condition"), t));
    assert!(!set.permits_type_read(rt("Encounter"), t), "write only");
    // Constrained scopes count: their constraints are evaluated on each record.
    assert!(set.permits_type_read(rt("Patient"), t), "constrained");
    assert!(set.permits_type_read(rt("Practitioner"), t));
    assert!(!set.permits_type_read(rt("Medication"), t));
    assert!(
        !set.permits_type_read(rt("Observation"), NO_PATIENT),
        "no patient claim"
    );
    assert!(set.permits_type_read(rt("Condition"), NO_PATIENT));
    assert_eq!(
        set.read_contexts(rt("Practitioner"), t),
        ContextSet::EMPTY.with(ScopeContext::System)
    );

    let wild = parse_scopes("patient/*.s user/*.r");
    assert_eq!(wild.read_contexts(rt("Medication"), WITH_PATIENT).len(), 2);
    assert_eq!(
        wild.read_contexts(rt("Medication"), NO_PATIENT)
            .iter()
            .collect::<Vec<_>>(),
        [ScopeContext::User]
    );
}

// ---------------------------------------------------------------------------------
// properties
// ---------------------------------------------------------------------------------

fn all_requests() -> Vec<FhirRequest> {
    let mut reqs: Vec<FhirRequest> = single_type_interactions()
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    reqs.push(compartment(None));
    reqs.push(search_system(&[]));
    reqs.push(search_system(&[("_type", "Observation,Condition")]));
    reqs.push(op("everything", OperationLevel::Instance, Some("Patient")));
    reqs
}

proptest! {
    #[test]
    fn parse_scopes_never_panics_on_arbitrary_strings(s in any::<String>()) {
        let set = parse_scopes(&s);
        let n = s.split_ascii_whitespace().count();
        prop_assert!(set.resource_scopes().len() + set.other().len() + set.rejected().len() <= n);
    }

    #[test]
    fn parse_and_check_never_panic_on_scope_like_strings(
        s in "((patient|user|system|Patient|launch)/(Observation|Patient|\\*|observation|Foo)?\\.?(read|write|\\*|[crudsx]{0,6})(\\?[a-z_%0-9A-F|=&:.]{0,12})? ?){0,6}",
        has_patient in any::<bool>(),
    ) {
        let set = parse_scopes(&s);
        for scope in set.resource_scopes() {
            // Every accepted scope re-parses to itself.
            prop_assert_eq!(&SmartScope::parse(&scope.text), &Ok(scope.clone()));
            prop_assert!(!scope.permissions.is_empty());
        }
        let token = TokenContext { has_patient };
        for req in all_requests() {
            if let Ok(grant) = check_scopes(&set, &req, token) {
                prop_assert!(!grant.contexts().is_empty());
                for scope in grant.scopes(&set) {
                    prop_assert!(scope.permissions.contains(grant.required()));
                    prop_assert!(has_patient || scope.context != ScopeContext::Patient);
                }
            }
        }
    }

    #[test]
    fn v2_permissions_accepted_iff_strictly_ordered(s in "[crudsCRUDSx]{0,7}") {
        let order = |c: char| LETTERS.iter().position(|l| *l == c);
        let ranks: Option<Vec<usize>> = s.chars().map(order).collect();
        let expected = ranks.is_some_and(|r| !r.is_empty() && r.windows(2).all(|w| w[0] < w[1]));
        prop_assert_eq!(Permissions::parse_v2(&s).is_some(), expected);
        if let Some(p) = Permissions::parse_v2(&s) {
            prop_assert_eq!(p.to_string(), s);
        }
    }
}
