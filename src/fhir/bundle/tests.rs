#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use serde_json::json;

const BASE: &str = "http://proxy.example/t1";

fn parse(v: Value) -> Result<IncomingBundle, BundleError> {
    parse_bundle(&serde_json::to_vec(&v).unwrap(), BASE, 10)
}

fn entry(method: &str, url: &str) -> Value {
    json!({ "request": { "method": method, "url": url } })
}

fn raw(v: Value) -> Box<RawValue> {
    RawValue::from_string(v.to_string()).unwrap()
}

#[test]
fn reads_a_batch_and_its_entries() {
    let b = parse(json!({
        "resourceType": "Bundle", "type": "batch",
        "entry": [
            entry("GET", "Patient/p1"),
            entry("GET", "Observation?patient=p1&code=x"),
            entry("GET", "http://proxy.example/t1/Patient/p2"),
            entry("GET", "/Patient/p3"),
        ]
    }))
    .unwrap();
    assert_eq!(b.kind, BundleKind::Batch);
    let e: Vec<_> = b.entries.into_iter().map(Result::unwrap).collect();
    assert_eq!(e[0].path, "Patient/p1");
    assert_eq!(e[0].query, None);
    assert_eq!(e[1].path, "Observation");
    assert_eq!(e[1].query.as_deref(), Some("patient=p1&code=x"));
    assert_eq!(e[1].url(), "Observation?patient=p1&code=x");
    assert_eq!(e[2].path, "Patient/p2");
    assert_eq!(e[3].path, "Patient/p3");
}

#[test]
fn refuses_what_is_no_batch_or_transaction() {
    assert_eq!(parse(json!([1])).unwrap_err(), BundleError::NotABundle);
    assert_eq!(
        parse(json!({"resourceType": "Patient"})).unwrap_err(),
        BundleError::NotABundle
    );
    assert_eq!(
        parse(json!({"resourceType": "Bundle", "type": "searchset", "entry": [entry("GET", "Patient/1")]}))
            .unwrap_err()
            .reason(),
        "bundle_type_unsupported"
    );
    assert_eq!(
        parse(json!({"resourceType": "Bundle", "type": "batch"})).unwrap_err(),
        BundleError::Empty
    );
    let many: Vec<Value> = (0..11)
        .map(|i| entry("GET", &format!("Patient/{i}")))
        .collect();
    assert_eq!(
        parse(json!({"resourceType": "Bundle", "type": "batch", "entry": many})).unwrap_err(),
        BundleError::TooManyEntries { found: 11, max: 10 }
    );
    assert!(parse_bundle(b"{not json", BASE, 10).is_err());
}

#[test]
fn bad_entries_are_refused_one_by_one() {
    let b = parse(json!({
        "resourceType": "Bundle", "type": "batch",
        "entry": [
            {"resource": {"resourceType": "Patient"}},
            entry("TRACE", "Patient/1"),
            entry("GET", "http://elsewhere.example/fhir/Patient/1"),
            entry("GET", "http://proxy.example/t10/Patient/1"),
            entry("GET", "urn:uuid:0e0b4f9a-7d5c-4a53-9d5e-2b2d8d6c1e11"),
            entry("GET", "Patient/1#frag"),
            entry("POST", ""),
            entry("POST", "Observation"),
            {"resource": {"resourceType": "Bundle", "type": "batch"}, "request": {"method": "POST", "url": "Bundle"}},
            entry("GET", "Patient/ok"),
        ]
    }))
    .unwrap();
    let reasons: Vec<&str> = b
        .entries
        .iter()
        .map(|e| e.as_ref().map_or_else(|e| e.reason(), |_| "ok"))
        .collect();
    assert_eq!(
        reasons,
        [
            "bundle_entry_invalid",
            "bundle_entry_method",
            "bundle_entry_url",
            "bundle_entry_url",
            "bundle_entry_url",
            "bundle_entry_url",
            "bundle_nested",
            "bundle_entry_resource",
            "bundle_nested",
            "ok"
        ]
    );
}

#[test]
fn a_transaction_has_no_reads() {
    let b = parse(json!({
        "resourceType": "Bundle", "type": "transaction",
        "entry": [entry("GET", "Patient/1"), entry("DELETE", "Patient/1"),
                  {"resource": {"resourceType": "Parameters"}, "request": {"method": "POST", "url": "Patient/$match"}}]
    }))
    .unwrap();
    assert_eq!(
        b.entries[2].as_ref().unwrap_err(),
        &EntryError::ReadInTransaction
    );
    assert_eq!(
        b.entries[0].as_ref().unwrap_err(),
        &EntryError::ReadInTransaction
    );
    assert!(b.entries[1].is_ok());
}

#[test]
fn a_json_patch_entry_sends_the_decoded_patch() {
    let patch = r#"[{"op":"replace","path":"/status","value":"final"}]"#;
    let data = base64::engine::general_purpose::STANDARD.encode(patch);
    let b = parse(json!({
        "resourceType": "Bundle", "type": "batch",
        "entry": [
            {"resource": {"resourceType": "Binary", "contentType": JSON_PATCH, "data": data},
             "request": {"method": "PATCH", "url": "Observation/o1"}},
            {"resource": {"resourceType": "Binary", "contentType": "text/plain", "data": data},
             "request": {"method": "PATCH", "url": "Observation/o1"}},
            {"resource": {"resourceType": "Parameters", "parameter": []},
             "request": {"method": "PATCH", "url": "Observation/o1"}},
        ]
    }))
    .unwrap();
    let e: Vec<_> = b.entries.into_iter().map(Result::unwrap).collect();
    let (body, media) = e[0].body().unwrap().unwrap();
    assert_eq!(media, JSON_PATCH);
    assert_eq!(&body[..], patch.as_bytes());
    assert_eq!(e[1].body().unwrap_err(), EntryError::Patch);
    assert_eq!(e[2].body().unwrap().unwrap().1, FHIR_JSON);
}

fn transaction_entries(v: Value) -> Vec<EntryRequest> {
    parse(json!({"resourceType": "Bundle", "type": "transaction", "entry": v}))
        .unwrap()
        .entries
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

#[test]
fn references_between_entries_resolve_to_what_the_entry_stands_for() {
    let entries = transaction_entries(json!([
        {"fullUrl": "urn:uuid:aaaa", "resource": {"resourceType": "Patient", "id": "p1"},
         "request": {"method": "PUT", "url": "Patient/p1"}},
        {"fullUrl": "urn:uuid:bbbb", "resource": {"resourceType": "Encounter"},
         "request": {"method": "POST", "url": "Encounter"}},
        {"resource": {"resourceType": "Observation",
                      "subject": {"reference": "urn:uuid:aaaa"},
                      "encounter": {"reference": "urn:uuid:bbbb"},
                      "performer": [{"reference": "Practitioner/d1"}]},
         "request": {"method": "POST", "url": "Observation"}},
        {"resource": {"resourceType": "Observation", "subject": {"reference": "urn:uuid:cccc"}},
         "request": {"method": "POST", "url": "Observation"}},
    ]));
    let ids = identities(&entries).unwrap();
    assert_eq!(ids["urn:uuid:aaaa"], Identity::Known("Patient/p1".into()));
    assert_eq!(ids["urn:uuid:bbbb"], Identity::Pending("Encounter".into()));
    let resolved =
        resolve_references(entries[2].resource.as_ref().unwrap(), &ids, "pending-x").unwrap();
    let v: Value = serde_json::from_slice(&resolved).unwrap();
    assert_eq!(v["subject"]["reference"], "Patient/p1");
    assert_eq!(v["encounter"]["reference"], "Encounter/pending-x");
    assert_eq!(v["performer"][0]["reference"], "Practitioner/d1");
    assert_eq!(
        resolve_references(entries[3].resource.as_ref().unwrap(), &ids, "pending-x").unwrap_err(),
        EntryError::UnresolvedReference {
            reference: "urn:uuid:cccc".into()
        }
    );
}

#[test]
fn a_new_patient_is_pending_and_two_entries_cannot_share_a_full_url() {
    let entries = transaction_entries(json!([
        {"fullUrl": "urn:uuid:n1", "resource": {"resourceType": "Patient"},
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": "urn:uuid:n2", "resource": {"resourceType": "Patient"},
         "request": {"method": "PUT", "url": "Patient?identifier=x|1"}},
    ]));
    let ids = identities(&entries).unwrap();
    assert_eq!(ids["urn:uuid:n1"], Identity::Pending("Patient".into()));
    // A conditional update may create: its id is the upstream's to choose.
    assert_eq!(ids["urn:uuid:n2"], Identity::Pending("Patient".into()));
    let dup = transaction_entries(json!([
        {"fullUrl": "urn:uuid:n1", "resource": {"resourceType": "Patient"},
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": "urn:uuid:n1", "resource": {"resourceType": "Patient"},
         "request": {"method": "POST", "url": "Patient"}},
    ]));
    let (at, err) = identities(&dup).unwrap_err();
    assert_eq!((at, err.reason()), (1, "transaction_duplicate_full_url"));
}

#[test]
fn conditional_and_urn_references_are_found_anywhere() {
    let conditional = raw(json!({"resourceType": "Observation",
        "contained": [{"resourceType": "Provenance", "target": [{"reference": "Patient?identifier=s|v"}]}]}));
    assert!(has_conditional_reference(&conditional));
    let plain = raw(
        json!({"resourceType": "Observation", "subject": {"reference": "Patient/p1"},
        "focus": [{"reference": "http://other.example/fhir/Patient?x=1"}], "note": [{"text": "a?b"}]}),
    );
    assert!(!has_conditional_reference(&plain));
    assert!(!has_urn_reference(&plain));
    let urn = raw(json!({"resourceType": "Observation", "subject": {"reference": "urn:uuid:1"}}));
    assert!(has_urn_reference(&urn));
    // Escaped or in capitals, still a URN.
    let escaped = RawValue::from_string(
        r#"{"resourceType":"Observation","subject":{"reference":"\u0075rn:uuid:1"}}"#.to_owned(),
    )
    .unwrap();
    assert!(has_urn_reference(&escaped));
    let upper = raw(json!({"resourceType": "Observation", "subject": {"reference": "URN:uuid:1"}}));
    assert!(has_urn_reference(&upper));
    // A urn in text is no reference.
    let text = raw(json!({"resourceType": "Observation", "note": [{"text": "\"urn:uuid:1\""}]}));
    assert!(!has_urn_reference(&text));
}

#[test]
fn a_batch_response_keeps_each_answer_in_its_place() {
    let mut h = http::HeaderMap::new();
    h.insert(
        http::header::LOCATION,
        "http://proxy.example/t1/Observation/9/_history/1"
            .parse()
            .unwrap(),
    );
    h.insert(http::header::ETAG, "W/\"1\"".parse().unwrap());
    let created = EntryResponse::from_answer(
        StatusCode::CREATED,
        &h,
        br#"{"resourceType":"Observation","id":"9"}"#,
    );
    let refused = EntryResponse::from_answer(
        StatusCode::FORBIDDEN,
        &http::HeaderMap::new(),
        br#"{"resourceType":"OperationOutcome","issue":[]}"#,
    );
    let minimal = EntryResponse::from_answer(StatusCode::NO_CONTENT, &http::HeaderMap::new(), b"");
    let v: Value = serde_json::from_slice(&batch_response(&[created, refused, minimal])).unwrap();
    assert_eq!(v["type"], "batch-response");
    assert_eq!(v["entry"][0]["response"]["status"], "201 Created");
    assert_eq!(v["entry"][0]["response"]["etag"], "W/\"1\"");
    assert_eq!(v["entry"][0]["resource"]["id"], "9");
    assert_eq!(v["entry"][1]["response"]["status"], "403 Forbidden");
    assert_eq!(
        v["entry"][1]["response"]["outcome"]["resourceType"],
        "OperationOutcome"
    );
    assert!(v["entry"][1].get("resource").is_none());
    assert_eq!(v["entry"][2]["response"]["status"], "204 No Content");
    assert!(v["entry"][2].get("resource").is_none());
}

#[test]
fn the_transaction_response_loses_its_resources() {
    let body = json!({"resourceType": "Bundle", "type": "transaction-response", "entry": [
        {"resource": {"resourceType": "Observation", "id": "1", "subject": {"reference": "Patient/p2"}},
         "response": {"status": "201 Created", "location": "Observation/1/_history/1"}},
        {"response": {"status": "200 OK"}}
    ]});
    let bytes = serde_json::to_vec(&body).unwrap();
    let out = minimal_transaction_response(&bytes, 2).unwrap();
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert!(v["entry"][0].get("resource").is_none());
    assert_eq!(
        v["entry"][0]["response"]["location"],
        "Observation/1/_history/1"
    );
    assert!(!String::from_utf8(out).unwrap().contains("p2"));
    assert!(minimal_transaction_response(&bytes, 3).is_none());
    assert!(minimal_transaction_response(br#"{"resourceType":"OperationOutcome"}"#, 2).is_none());
    assert_eq!(
        response_locations(&bytes),
        vec![Some("Observation/1/_history/1".to_owned()), None]
    );
}

#[test]
fn the_upstream_transaction_carries_the_prepared_requests() {
    let res = raw(json!({"resourceType": "Observation"}));
    let out = transaction_bundle(&[PreparedEntry {
        full_url: Some("urn:uuid:1".into()),
        resource: Some(&res),
        method: "PUT",
        url: "Observation?code=x&patient=Patient%2Fp1".into(),
        if_match: Some("W/\"3\"".into()),
        if_none_match: None,
        if_none_exist: None,
        if_modified_since: None,
    }]);
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["type"], "transaction");
    assert_eq!(v["entry"][0]["fullUrl"], "urn:uuid:1");
    assert_eq!(
        v["entry"][0]["request"]["url"],
        "Observation?code=x&patient=Patient%2Fp1"
    );
    assert_eq!(v["entry"][0]["request"]["ifMatch"], "W/\"3\"");
    assert!(v["entry"][0]["request"].get("ifNoneExist").is_none());
}

#[test]
fn a_transaction_holds_no_foreign_full_url_no_target_twice_and_no_patch_naming_an_entry() {
    let ok = transaction_entries(json!([
        {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Observation"},
         "request": {"method": "POST", "url": "Observation"}},
        {"fullUrl": "http://proxy.example/t1/Observation/o1", "resource": {"resourceType": "Observation", "id": "o1"},
         "request": {"method": "PUT", "url": "Observation/o1"}},
        {"request": {"method": "DELETE", "url": "Observation/o2"}},
    ]));
    assert!(check_transaction(&ok, BASE).is_ok());
    let cases = [
        (
            json!([{"fullUrl": "http://elsewhere.example/Observation/o1", "resource": {"resourceType": "Observation", "id": "o1"},
                    "request": {"method": "PUT", "url": "Observation/o1"}}]),
            0,
            "transaction_full_url",
        ),
        (
            json!([{"fullUrl": "http://proxy.example/t1/Observation/o9", "resource": {"resourceType": "Observation", "id": "o1"},
                    "request": {"method": "PUT", "url": "Observation/o1"}}]),
            0,
            "transaction_full_url",
        ),
        (
            json!([{"fullUrl": "Patient/p1", "resource": {"resourceType": "Patient"},
                    "request": {"method": "POST", "url": "Patient"}}]),
            0,
            "transaction_full_url",
        ),
        (
            json!([
                {"resource": {"resourceType": "Observation", "id": "o1"}, "request": {"method": "PUT", "url": "Observation/o1"}},
                {"resource": {"resourceType": "Parameters"}, "request": {"method": "PATCH", "url": "Observation/o1"}}
            ]),
            1,
            "transaction_duplicate_target",
        ),
        (
            json!([{"resource": {"resourceType": "Binary", "contentType": JSON_PATCH,
                                 "data": base64::engine::general_purpose::STANDARD.encode(r#"[{"op":"add","path":"/performer/-","value":{"reference":"URN:uuid:1"}}]"#)},
                    "request": {"method": "PATCH", "url": "Observation/o1"}}]),
            0,
            "transaction_patch_reference",
        ),
        (
            json!([{"resource": {"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
                        {"name": "value", "valueReference": {"reference": "urn:uuid:1"}}]}]},
                    "request": {"method": "PATCH", "url": "Observation/o1"}}]),
            0,
            "transaction_patch_reference",
        ),
    ];
    for (entries, at, reason) in cases {
        let e = transaction_entries(entries.clone());
        let (n, err) = check_transaction(&e, BASE).unwrap_err();
        assert_eq!((n, err.reason()), (at, reason), "{entries}");
    }
}

#[test]
fn a_success_that_is_an_operation_outcome_goes_in_the_outcome() {
    let e = EntryResponse::from_answer(
        StatusCode::OK,
        &http::HeaderMap::new(),
        br#"{"resourceType":"OperationOutcome","issue":[]}"#,
    );
    assert!(e.resource.is_none());
    assert!(e.outcome.is_some());
    let body = json!({"resourceType": "Bundle", "type": "transaction-response", "entry": [{}]});
    let out = minimal_transaction_response(&serde_json::to_vec(&body).unwrap(), 1).unwrap();
    assert!(!String::from_utf8(out).unwrap().contains("null"));
}
