#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, SystemTime};

use base64::Engine;
use serde_json::Value;

use super::*;
use crate::audit::{AuditRecord, request_text};

const BASE: &str = "https://proxy.example/demo";
const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.secret-token-payload.signature";

fn finished(record: AuditRecord, status: u16, decision: &'static str, reason: &str) -> Finished {
    Finished {
        record,
        at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_820_588),
        latency_ms: 12.5,
        status,
        decision,
        reason: reason.to_owned(),
    }
}

fn patient_read() -> AuditRecord {
    AuditRecord {
        tenant: Some("demo".into()),
        public_base: Some(BASE.into()),
        client_id: Some("patient-app".into()),
        subject: Some("user-123".into()),
        issuer: Some("https://issuer.example/".into()),
        interaction: Some("read"),
        resource_type: Some("Observation"),
        resource_id: Some("obs-1".into()),
        patient: Some("p1".into()),
        fhir_user: Some("Patient/p1".into()),
        query: Some(request_text("/Observation/obs-1", None, None)),
        ..AuditRecord::default()
    }
}

fn codes(v: &Value) -> Vec<(String, String)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["system"].as_str().unwrap().to_owned(),
                c["code"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn is_coding(v: &Value) -> bool {
    v.as_object().is_some_and(|o| {
        o.keys()
            .all(|k| ["system", "code", "display"].contains(&k.as_str()))
            && o["system"].as_str().is_some_and(|s| s.contains("://"))
            && o["code"].as_str().is_some_and(|c| !c.is_empty())
    })
}

fn is_reference(v: &Value) -> bool {
    v.as_object().is_some_and(|o| {
        !o.is_empty()
            && o.keys()
                .all(|k| ["reference", "identifier", "display"].contains(&k.as_str()))
            && o.get("identifier")
                .is_none_or(|i| i["value"].as_str().is_some_and(|v| !v.is_empty()))
    })
}

/// The R4 `AuditEvent` structure: only R4 elements, with their cardinalities and
/// types, and the required bindings (`action`, `outcome`).
fn assert_r4_shape(e: &Value) {
    let o = e.as_object().unwrap();
    let allowed = [
        "resourceType",
        "type",
        "subtype",
        "action",
        "period",
        "recorded",
        "outcome",
        "outcomeDesc",
        "agent",
        "source",
        "entity",
    ];
    for k in o.keys() {
        assert!(
            allowed.contains(&k.as_str()),
            "unexpected element `{k}`: {e}"
        );
    }
    assert_eq!(e["resourceType"], "AuditEvent");
    assert!(is_coding(&e["type"]), "type is one Coding: {e}");
    if let Some(sub) = e.get("subtype") {
        assert!(sub.as_array().unwrap().iter().all(is_coding), "{e}");
    }
    if let Some(a) = e.get("action") {
        assert!(
            ["C", "R", "U", "D", "E"].contains(&a.as_str().unwrap()),
            "{e}"
        );
    }
    let instant = |v: &Value| {
        let s = v.as_str().unwrap();
        assert_eq!(s.len(), 27, "{s}");
        assert!(s.ends_with('Z') && s.as_bytes()[10] == b'T', "{s}");
    };
    instant(&e["recorded"]);
    instant(&e["period"]["start"]);
    instant(&e["period"]["end"]);
    assert!(e["period"]["start"].as_str() <= e["period"]["end"].as_str());
    assert!(
        ["0", "4", "8", "12"].contains(&e["outcome"].as_str().unwrap()),
        "{e}"
    );
    assert!(e["outcomeDesc"].is_string());
    let agents = e["agent"].as_array().unwrap();
    assert!(!agents.is_empty());
    for a in agents {
        for k in a.as_object().unwrap().keys() {
            assert!(["type", "who", "requestor"].contains(&k.as_str()), "{a}");
        }
        assert!(a["requestor"].is_boolean(), "requestor is 1..1: {a}");
        assert!(
            a["type"]["coding"]
                .as_array()
                .unwrap()
                .iter()
                .all(is_coding),
            "{a}"
        );
        assert!(is_reference(&a["who"]), "{a}");
    }
    let source = e["source"].as_object().unwrap();
    for k in source.keys() {
        assert!(["site", "observer", "type"].contains(&k.as_str()), "{e}");
    }
    assert!(is_reference(&e["source"]["observer"]), "observer is 1..1");
    assert!(
        e["source"]["type"]
            .as_array()
            .unwrap()
            .iter()
            .all(is_coding)
    );
    for entity in e["entity"].as_array().unwrap() {
        for k in entity.as_object().unwrap().keys() {
            assert!(
                ["what", "type", "role", "description", "query", "detail"].contains(&k.as_str()),
                "{entity}"
            );
        }
        assert!(is_coding(&entity["type"]), "{entity}");
        if let Some(role) = entity.get("role") {
            assert!(is_coding(role), "{entity}");
        }
        if let Some(what) = entity.get("what") {
            assert!(is_reference(what), "{entity}");
        }
        if let Some(q) = entity.get("query") {
            base64::engine::general_purpose::STANDARD
                .decode(q.as_str().unwrap())
                .unwrap();
        }
        for d in entity
            .get("detail")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            assert!(d["type"].is_string() && d["valueString"].is_string(), "{d}");
            assert_eq!(d.as_object().unwrap().len(), 2, "{d}");
        }
    }
}

fn entities_with_role<'a>(e: &'a Value, code: &str) -> Vec<&'a Value> {
    e["entity"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["role"]["code"] == code)
        .collect()
}

fn query_of(e: &Value) -> String {
    let q = entities_with_role(e, "24");
    assert_eq!(q.len(), 1, "{e}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(q[0]["query"].as_str().unwrap())
        .unwrap();
    String::from_utf8(bytes).unwrap()
}

fn detail<'a>(e: &'a Value, name: &str) -> Option<&'a str> {
    e["entity"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|x| {
            x.get("detail")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
        })
        .find(|d| d["type"] == name)
        .and_then(|d| d["valueString"].as_str())
}

#[test]
fn an_allowed_read_is_a_rest_read_with_agents_source_and_patient() {
    let e = audit_event(
        &finished(patient_read(), 200, "allow", "record_allowed"),
        "proxy-1",
    );
    assert_r4_shape(&e);
    assert_eq!(
        (e["type"]["system"].as_str(), e["type"]["code"].as_str()),
        (Some(EVENT_TYPE), Some("rest"))
    );
    assert_eq!(codes(&e["subtype"]), vec![(RESTFUL.into(), "read".into())]);
    assert_eq!(e["action"], "R");
    assert_eq!(e["outcome"], "0");
    assert_eq!(e["outcomeDesc"], "record_allowed");
    assert_eq!(e["recorded"], "2025-12-04T03:56:28.000000Z");
    assert_eq!(e["period"]["start"], "2025-12-04T03:56:27.987500Z");
    let agents = e["agent"].as_array().unwrap();
    assert_eq!(agents.len(), 3, "{e}");
    // The app, not the requestor when a user is known.
    assert_eq!(agents[0]["type"]["coding"][0]["code"], "110153");
    assert_eq!(agents[0]["who"]["identifier"]["value"], "patient-app");
    assert_eq!(
        agents[0]["who"]["identifier"]["system"],
        "https://issuer.example/"
    );
    assert_eq!(agents[0]["requestor"], false);
    // The user: fhirUser as reference, sub as identifier.
    assert_eq!(agents[1]["type"]["coding"][0]["code"], "IRCP");
    assert_eq!(agents[1]["who"]["reference"], format!("{BASE}/Patient/p1"));
    assert_eq!(agents[1]["who"]["identifier"]["value"], "user-123");
    assert_eq!(agents[1]["requestor"], true);
    // The proxy.
    assert_eq!(agents[2]["type"]["coding"][0]["code"], "110152");
    assert_eq!(agents[2]["who"]["display"], "proxy-1");
    assert_eq!(agents[2]["requestor"], false);
    assert_eq!(e["source"]["site"], "demo");
    assert_eq!(e["source"]["observer"]["display"], "proxy-1");
    // The patient, and the record asked for.
    let patients = entities_with_role(&e, "1");
    assert_eq!(patients.len(), 1);
    assert_eq!(
        patients[0]["what"]["reference"],
        format!("{BASE}/Patient/p1")
    );
    assert_eq!(patients[0]["type"]["code"], "1");
    let records = entities_with_role(&e, "4");
    assert_eq!(records.len(), 1);
    assert_eq!(
        records[0]["what"]["reference"],
        format!("{BASE}/Observation/obs-1")
    );
    // A read without parameters has no query entity.
    assert!(entities_with_role(&e, "24").is_empty(), "{e}");
    assert_eq!(detail(&e, "authz.decision"), Some("allow"));
    assert_eq!(detail(&e, "http.status"), Some("200"));
}

#[test]
fn a_search_is_a_query_with_the_request_base64() {
    let record = AuditRecord {
        tenant: Some("demo".into()),
        client_id: Some("backend".into()),
        subject: Some("backend".into()),
        interaction: Some("search-type"),
        resource_type: Some("Observation"),
        query: Some(request_text(
            "/Observation",
            Some(&format!(
                "code=http%3A%2F%2Floinc.org%7C2339-0&access_token={TOKEN}&_count=5"
            )),
            None,
        )),
        ..AuditRecord::default()
    };
    let e = audit_event(&finished(record, 200, "allow", "narrowed"), "proxy-1");
    assert_r4_shape(&e);
    assert_eq!(e["type"]["code"], "rest");
    assert_eq!(
        codes(&e["subtype"]),
        vec![
            (RESTFUL.into(), "search".into()),
            (RESTFUL.into(), "search-type".into()),
            (DCM.into(), "110112".into()),
        ]
    );
    assert_eq!(e["action"], "E");
    assert_eq!(
        query_of(&e),
        "Observation?code=http%3A%2F%2Floinc.org%7C2339-0&_count=5"
    );
    // A backend token (sub = client_id) has no user: the app is the requestor.
    let agents = e["agent"].as_array().unwrap();
    assert_eq!(agents.len(), 2, "{e}");
    assert_eq!(agents[0]["requestor"], true);
    assert!(entities_with_role(&e, "1").is_empty(), "no patient: {e}");
    assert!(!e.to_string().contains(TOKEN));
}

/// (No public base: a record of a request whose tenant is not known has relative
/// references.)
#[test]
fn post_search_bodies_and_compartments_are_recorded() {
    let record = AuditRecord {
        tenant: Some("demo".into()),
        client_id: Some("clinician-app".into()),
        subject: Some("dr-who".into()),
        fhir_user: Some("Practitioner/pr1".into()),
        interaction: Some("search-compartment"),
        resource_type: Some("Observation"),
        compartment: Some("Patient/p2".into()),
        query: Some(request_text(
            "/Patient/p2/Observation/_search",
            Some("_count=10"),
            Some(format!("code=1234&Access_Token={TOKEN}").as_bytes()),
        )),
        ..AuditRecord::default()
    };
    let e = audit_event(&finished(record, 200, "allow", "compartment"), "proxy-1");
    assert_r4_shape(&e);
    assert_eq!(
        query_of(&e),
        "Patient/p2/Observation/_search?_count=10\n\ncode=1234"
    );
    let patients = entities_with_role(&e, "1");
    assert_eq!(patients.len(), 1);
    assert_eq!(patients[0]["what"]["reference"], "Patient/p2");
    assert_eq!(e["agent"][1]["who"]["reference"], "Practitioner/pr1");
    assert!(!e.to_string().contains(TOKEN));
}

#[test]
fn a_denied_read_names_every_patient_it_concerns() {
    // A p1 token asking for p2's record.
    let record = AuditRecord {
        interaction: Some("read"),
        resource_type: Some("Patient"),
        resource_id: Some("p2".into()),
        ..patient_read()
    };
    let e = audit_event(&finished(record, 404, "deny", "record_denied"), "proxy-1");
    assert_r4_shape(&e);
    assert_eq!(e["outcome"], "4");
    assert_eq!(e["outcomeDesc"], "record_denied");
    let patients: Vec<&str> = entities_with_role(&e, "1")
        .into_iter()
        .map(|p| p["what"]["reference"].as_str().unwrap())
        .collect();
    assert_eq!(
        patients,
        [format!("{BASE}/Patient/p1"), format!("{BASE}/Patient/p2")],
        "{e}"
    );
    // The Patient asked for is the patient entity, not a second record entity.
    assert!(entities_with_role(&e, "4").is_empty(), "{e}");
    assert_eq!(detail(&e, "authz.decision"), Some("deny"));
    assert_eq!(detail(&e, "http.status"), Some("404"));
}

#[test]
fn outcomes_follow_the_status() {
    for (status, decision, outcome) in [
        (200, "allow", "0"),
        (401, "deny", "4"),
        (403, "deny", "4"),
        (400, "error", "4"),
        (500, "error", "8"),
        (502, "deny", "8"),
        (503, "deny", "8"),
    ] {
        let e = audit_event(&finished(patient_read(), status, decision, "x"), "p");
        assert_r4_shape(&e);
        assert_eq!(e["outcome"], outcome, "{status}");
        assert_eq!(detail(&e, "authz.decision"), Some(decision));
    }
}

#[test]
fn a_refusal_before_the_request_was_read_is_still_a_valid_event() {
    // A body too large: only the tenant is known.
    let record = AuditRecord {
        tenant: Some("demo".into()),
        ..AuditRecord::default()
    };
    let e = audit_event(&finished(record, 413, "deny", "body_too_large"), "proxy-1");
    assert_r4_shape(&e);
    assert!(
        e.get("subtype").is_none() && e.get("action").is_none(),
        "{e}"
    );
    assert_eq!(e["outcome"], "4");
    assert_eq!(e["outcomeDesc"], "body_too_large");
    let agents = e["agent"].as_array().unwrap();
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0]["who"]["display"], "proxy-1");
    assert_eq!(e["source"]["site"], "demo");
    // Nothing known: not even the site.
    let e = audit_event(
        &finished(AuditRecord::default(), 404, "deny", "tenant_unknown"),
        "proxy-1",
    );
    assert_r4_shape(&e);
    assert!(e["source"].get("site").is_none());
}

#[test]
fn the_request_id_is_the_transaction_entity() {
    let mut record = patient_read();
    record.request_id = Some("4a8dca3c-2205".into());
    record.notes = vec!["entries.dropped=2".into()];
    record.operation = None;
    let e = audit_event(&finished(record, 200, "allow", "x"), "p");
    assert_r4_shape(&e);
    let tx: Vec<&Value> = e["entity"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["type"]["code"] == "XrequestId")
        .collect();
    assert_eq!(tx.len(), 1, "{e}");
    assert_eq!(tx[0]["type"]["system"], BALP_ENTITY);
    assert_eq!(tx[0]["what"]["identifier"]["value"], "4a8dca3c-2205");
    assert_eq!(detail(&e, "notes"), Some("entries.dropped=2"));
}

#[test]
fn vreads_operations_and_discovery_are_coded() {
    let vread = AuditRecord {
        interaction: Some("vread"),
        version: Some("3".into()),
        ..patient_read()
    };
    let e = audit_event(&finished(vread, 200, "allow", "x"), "p");
    assert_r4_shape(&e);
    assert_eq!(codes(&e["subtype"]), vec![(RESTFUL.into(), "vread".into())]);
    assert_eq!(
        entities_with_role(&e, "4")[0]["what"]["reference"],
        format!("{BASE}/Observation/obs-1/_history/3")
    );
    let everything = AuditRecord {
        interaction: Some("operation"),
        operation: Some("everything".into()),
        resource_type: Some("Patient"),
        resource_id: Some("p1".into()),
        query: Some(request_text(
            "/Patient/p1/$everything",
            Some("_since=2020"),
            None,
        )),
        ..patient_read()
    };
    let e = audit_event(&finished(everything, 200, "allow", "x"), "p");
    assert_r4_shape(&e);
    assert_eq!(
        codes(&e["subtype"]),
        vec![(RESTFUL.into(), "operation".into())]
    );
    assert_eq!(e["action"], "E");
    assert_eq!(detail(&e, "fhir.operation"), Some("everything"));
    // Parameters of a request that is no search are kept too.
    assert_eq!(query_of(&e), "Patient/p1/$everything?_since=2020");
    let discovery = AuditRecord {
        interaction: Some("smart-configuration"),
        client_id: None,
        subject: None,
        fhir_user: None,
        patient: None,
        resource_type: None,
        resource_id: None,
        ..patient_read()
    };
    let e = audit_event(&finished(discovery, 200, "allow", "public_discovery"), "p");
    assert_r4_shape(&e);
    assert!(e.get("subtype").is_none());
    assert_eq!(e["action"], "R");
}

#[test]
fn batches_are_batch_bundles_of_audit_events() {
    let a = finished(patient_read(), 200, "allow", "a");
    let b = finished(AuditRecord::default(), 404, "deny", "b");
    let bundle: Value = serde_json::from_slice(&batch_bundle([&a, &b], "p")).unwrap();
    assert_eq!(bundle["resourceType"], "Bundle");
    assert_eq!(bundle["type"], "batch");
    let entries = bundle["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    for (entry, reason) in entries.iter().zip(["a", "b"]) {
        assert_eq!(entry["request"]["method"], "POST");
        assert_eq!(entry["request"]["url"], "AuditEvent");
        assert_r4_shape(&entry["resource"]);
        assert_eq!(entry["resource"]["outcomeDesc"], reason);
    }
}

#[test]
fn a_write_is_coded_with_its_action_and_names_the_patients_it_concerns() {
    // A system token creating an Observation of p2 that also names p3 (no token patient).
    let record = AuditRecord {
        interaction: Some("create"),
        resource_type: Some("Observation"),
        resource_id: Some("obs-9".into()),
        version: Some("1".into()),
        patient: None,
        fhir_user: None,
        patients: vec!["p2".into(), "p3".into()],
        ..patient_read()
    };
    let e = audit_event(&finished(record, 201, "allow", "write_allowed"), "proxy-1");
    assert_r4_shape(&e);
    assert_eq!(e["action"], "C");
    assert_eq!(e["subtype"][0]["code"], "create");
    let patients: Vec<&str> = entities_with_role(&e, "1")
        .into_iter()
        .map(|p| p["what"]["reference"].as_str().unwrap())
        .collect();
    assert_eq!(
        patients,
        [format!("{BASE}/Patient/p2"), format!("{BASE}/Patient/p3")],
        "{e}"
    );
    let written: Vec<&str> = entities_with_role(&e, "4")
        .into_iter()
        .map(|p| p["what"]["reference"].as_str().unwrap())
        .collect();
    assert_eq!(written, [format!("{BASE}/Observation/obs-9/_history/1")]);
    for (interaction, action) in [("update", "U"), ("patch", "U"), ("delete", "D")] {
        let record = AuditRecord {
            interaction: Some(interaction),
            ..patient_read()
        };
        let e = audit_event(&finished(record, 200, "allow", "write_allowed"), "proxy-1");
        assert_eq!(e["action"], action, "{interaction}");
    }
}
