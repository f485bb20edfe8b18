//! The answer check on text against the reference it replaced
//! ([`super::super::value_path`]: every resource parsed whole, the body URL-rewritten
//! first): on generated answers both decide identically, byte for byte.

use super::*;

/// Requests (and their tokens) of every kind of permit: patient, user, system,
/// constrained, with includes, reads, history, operations.
fn fixtures() -> Vec<Fixture> {
    let lab = "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory";
    vec![
        Fixture::patient("patient/Observation.rs", "/Observation/o1"),
        Fixture::patient("patient/Patient.r", "/Patient/p1"),
        Fixture::patient(
            "patient/Observation.rs patient/Patient.r patient/Practitioner.r",
            "/Observation?code=a&_include=Observation:performer",
        ),
        Fixture::patient("patient/*.rs", "/Patient/p1/$everything"),
        Fixture::patient("patient/Observation.rs", "/Observation/o1/_history"),
        Fixture::patient(lab, "/Observation?code=a"),
        Fixture::patient(lab, "/Observation/o1"),
        Fixture::new(
            "user/Observation.rs user/Patient.rs",
            None,
            Some("Practitioner/pr1"),
            "/Observation?code=a",
        ),
        Fixture::new(
            "user/*.rs",
            None,
            Some("Patient/p1"),
            "/Encounter?status=finished",
        ),
        Fixture::system("system/*.rs", "/_history"),
        Fixture::system("system/Observation.rs", "/Observation/o1"),
    ]
}

static DIFF_FIXTURES: LazyLock<Vec<Fixture>> = LazyLock::new(fixtures);

/// A JSON string literal.
fn lit(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

fn reference() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "Patient/p1".to_owned(),
        "Patient/p2".to_owned(),
        "Patient/p1/_history/3".to_owned(),
        format!("{UPSTREAM}/Patient/p1"),
        format!("{PUBLIC}/Patient/p1"),
        format!("{UPSTREAM}2/Patient/p1"),
        "https://elsewhere.example/fhir/Patient/p1".to_owned(),
        "Practitioner/pr1".to_owned(),
        "Practitioner/pr2".to_owned(),
        "Organization/org1".to_owned(),
        "Medication/m1".to_owned(),
        "#contained".to_owned(),
        "Group/p1".to_owned(),
    ])
}

/// A Reference-ish element: an object with a reference, an array of them, or
/// something odd in its place.
fn reference_element() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => reference().prop_map(|r| format!("{{\"reference\":{}}}", lit(&r))),
        2 => prop::collection::vec(reference(), 0..3).prop_map(|rs| {
            let items: Vec<String> =
                rs.iter().map(|r| format!("{{\"reference\":{}}}", lit(r))).collect();
            format!("[{}]", items.join(","))
        }),
        1 => reference().prop_map(|r| lit(&r)),
        1 => Just("null".to_owned()),
        1 => reference().prop_map(|r| format!("{{\"reference\":{{\"reference\":{}}}}}", lit(&r))),
    ]
}

fn category() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["laboratory", "vital-signs", "imaging"]).prop_map(|code| {
        format!(
            "[{{\"coding\":[{{\"system\":\"http://terminology.hl7.org/CodeSystem/observation-category\",\"code\":\"{code}\"}}]}}]"
        )
    })
}

/// A resource's text: a likely one (a patient's Observation or Condition, with a
/// category), or one of members of any kind in any order.
fn resource() -> impl Strategy<Value = String> {
    prop_oneof![likely_resource(), any_resource()]
}

fn likely_resource() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec!["Observation", "Condition"]),
        prop::sample::select(vec!["Patient/p1", "Patient/p2", "Practitioner/pr1"]),
        prop::option::of(category()),
        prop::bool::ANY,
    )
        .prop_map(|(rt, subject, category, category_first)| {
            let category = category
                .map(|c| format!("\"category\":{c},"))
                .unwrap_or_default();
            let subject = format!("\"subject\":{{\"reference\":\"{subject}\"}}");
            if category_first {
                format!("{{{category}\"resourceType\":\"{rt}\",\"id\":\"o1\",{subject}}}")
            } else {
                format!("{{\"resourceType\":\"{rt}\",\"id\":\"o1\",{category}{subject}}}")
            }
        })
}

/// Members of any kind in any order (`resourceType` not always first), sometimes a
/// member twice, with elements the checks read and ones they skip.
fn any_resource() -> impl Strategy<Value = String> {
    let rt = prop::sample::select(vec![
        "Observation",
        "Condition",
        "Encounter",
        "Patient",
        "Practitioner",
        "Organization",
        "Medication",
        "Group",
        "OperationOutcome",
        "Nonsense",
    ]);
    let id = prop::sample::select(vec!["p1", "p2", "o1", "pr1", "m1", "org1"]);
    let linking = prop::sample::select(vec![
        "subject",
        "patient",
        "performer",
        "participant",
        "link",
        "generalPractitioner",
        "member",
        "encounter",
        "author",
        "asserter",
    ]);
    (
        rt,
        prop::option::weighted(0.9, id),
        prop::collection::vec((linking, reference_element()), 0..4),
        prop::option::of(category()),
        prop::bool::ANY,
        prop::collection::vec(any::<u32>(), 0..3),
        any::<u64>(),
    )
        .prop_map(|(rt, id, links, category, note, extras, order)| {
            let mut members = vec![format!("\"resourceType\":{}", lit(rt))];
            if let Some(id) = id {
                members.push(format!("\"id\":{}", lit(id)));
            }
            for (name, value) in links {
                members.push(format!("{}:{value}", lit(name)));
            }
            if let Some(c) = category {
                members.push(format!("\"category\":{c}"));
            }
            if note {
                members.push(format!(
                    "\"note\":[{{\"text\":\"see {UPSTREAM}/Patient/p2 \\u00e9\"}}],\"text\":{{\"div\":\"<div>x</div>\"}}"
                ));
            }
            for (i, x) in extras.iter().enumerate() {
                members.push(format!("\"extra{i}\":{{\"valueInteger\":{x},\"arr\":[1,2.5e3,true,null]}}"));
            }
            // A deterministic shuffle by `order`.
            let n = members.len();
            for i in (1..n).rev() {
                let j = (order.rotate_left(i as u32) % (i as u64 + 1)) as usize;
                members.swap(i, j);
            }
            format!("{{{}}}", members.join(","))
        })
}

fn entry() -> impl Strategy<Value = String> {
    (
        prop_oneof![8 => resource().prop_map(Some), 1 => Just(None), 1 => Just(Some("null".to_owned()))],
        prop::sample::select(vec![None, Some("match"), Some("include"), Some("outcome")]),
        prop::bool::ANY,
    )
        .prop_map(|(resource, mode, full_url)| {
            let mut members = Vec::new();
            if full_url {
                members.push(format!("\"fullUrl\":\"{UPSTREAM}/Observation/o1\""));
            }
            if let Some(r) = resource {
                members.push(format!("\"resource\":{r}"));
            }
            if let Some(m) = mode {
                members.push(format!("\"search\":{{\"mode\":{}}}", lit(m)));
            }
            format!("{{{}}}", members.join(","))
        })
}

fn answer() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => (
            prop::collection::vec(entry(), 0..8),
            prop::bool::ANY,
            prop::bool::ANY,
            prop::bool::ANY,
        )
            .prop_map(|(entries, total, links, link_first)| {
                let mut members = vec!["\"resourceType\":\"Bundle\"".to_owned(), "\"type\":\"searchset\"".to_owned()];
                let link = format!(
                    "\"link\":[{{\"relation\":\"self\",\"url\":\"{UPSTREAM}/Observation?code=a\"}},{{\"relation\":\"next\",\"url\":\"{UPSTREAM}?_getpages=x&_getpagesoffset=2\"}}]"
                );
                if links && link_first {
                    members.push(link.clone());
                }
                if total {
                    members.push(format!("\"total\":{}", entries.len()));
                }
                members.push(format!("\"entry\":[{}]", entries.join(",")));
                if links && !link_first {
                    members.push(link);
                }
                format!("{{{}}}", members.join(","))
            }),
        1 => resource(),
    ]
}

/// What a check concluded (body, dropped, kept, reason), or its error (status, reason).
type Outcome = Result<(Vec<u8>, usize, usize, &'static str), (u16, &'static str)>;

/// What a check concluded, comparable across the two implementations.
fn outcome(r: Result<Checked, ProxyError>) -> Outcome {
    r.map(|c| (c.body.to_vec(), c.dropped, c.kept, c.reason))
        .map_err(|e| (e.status().as_u16(), e.reason()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn text_check_decides_exactly_as_the_whole_value_check(
        body in answer(),
        which in 0usize..11,
        status in prop::sample::select(vec![200u16, 200, 200, 404, 400]),
    ) {
        let fx = &DIFF_FIXTURES[which];
        let out = crate::rewrite::rewrite_request(
            &fx.request, &fx.grant, &fx.permit, &INDEX, &Bytes::new(),
        )
        .ok();
        let ctx = CheckCtx {
            request: &fx.request,
            records: ReleaseCtx {
                permit: &fx.permit,
                grant: &fx.grant,
                token: &fx.token,
                index: &INDEX,
                bases: [PUBLIC, UPSTREAM],
                fga: None,
            },
            paging: out.as_ref().map(|o| fx.pager(o)),
            rewrite: REWRITE,
        };
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
        let status = StatusCode::from_u16(status).unwrap();
        let raw = Bytes::from(body.clone());
        let projected = outcome(check_answer(&ctx, status, &headers, raw.clone()).map_err(ProxyError::from));
        let whole = outcome(
            super::super::value_path::check_answer(&ctx, status, &headers, REWRITE.bytes(&raw).unwrap())
                .map_err(ProxyError::from),
        );
        prop_assert_eq!(
            projected.as_ref().map(|(b, d, k, r)| (String::from_utf8_lossy(b).into_owned(), *d, *k, *r)),
            whole.as_ref().map(|(b, d, k, r)| (String::from_utf8_lossy(b).into_owned(), *d, *k, *r)),
            "fixture {} on {}", which, body
        );
    }

    /// Each resource on its own: `ReleaseCtx::release` on its text and on the whole
    /// parsed resource agree.
    #[test]
    fn release_of_a_text_record_is_the_release_of_the_value(
        text in resource(),
        which in 0usize..11,
        primary in prop::bool::ANY,
    ) {
        let fx = &DIFF_FIXTURES[which];
        let records = ReleaseCtx {
            permit: &fx.permit,
            grant: &fx.grant,
            token: &fx.token,
            index: &INDEX,
            bases: [PUBLIC, UPSTREAM],
            fga: None,
        };
        let whole: serde_json::Value = serde_json::from_str(&text).unwrap();
        let read = crate::fhir::answer::read(&text).unwrap();
        let Some(rt) = whole.get("resourceType").and_then(|v| v.as_str()).and_then(ResourceType::parse) else {
            return Ok(());
        };
        prop_assert_eq!(
            records.release(rt, &read.resource, primary),
            records.release(rt, &whole, primary),
            "fixture {} on {}", which, text
        );
    }
}
