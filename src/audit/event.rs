//! The FHIR R4 `AuditEvent` of an audit record, coded in the style of the IHE Basic
//! Audit Log Patterns (BALP): a RESTful interaction is `type` `rest` with the
//! interaction as `subtype` (`read`, `vread`, `search-type`, ...); a search also
//! carries the generic `search` and DICOM's `110112` Query event, is `action` `E` and
//! has a query entity (the request as sent, base64). `outcome` follows the answer's
//! status (`0` success, `4` refused or a client error, `8` a server error), with the
//! stable reason id as `outcomeDesc`.
//!
//! Agents: the client application (DICOM Source Role ID, `client_id`), the user when
//! the token names one (information recipient and requestor: `sub` as identifier,
//! `fhirUser` as reference) and the proxy itself (Destination Role ID). The source is
//! the proxy (`observer`) with the tenant as `site`. Entities: every patient the
//! request concerns (the token's patient, the compartment or the record asked for) as
//! `Patient/<id>` with role Patient, the record asked for, the query, and the
//! transaction (the request id, the decision and the status as details).
//!
//! References are absolute, under the tenant's public base
//! (`https://proxy.example/demo/Patient/p1`): a repository shared by several tenants
//! must not mistake one tenant's `Patient/p1` for another's, and a repository that does
//! not hold the records indexes external references (HAPI, for one, does not index
//! relative references to records it does not have). A request refused before its
//! tenant was known has relative ones.
//!
//! Built from the finished record only, which holds no token; `access_token`
//! parameters were removed from the query when it was recorded.

use base64::Engine;
use serde_json::{Map, Value, json};

use super::{Finished, rfc3339};

const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
const EVENT_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-event-type";
const RESTFUL: &str = "http://hl7.org/fhir/restful-interaction";
const ENTITY_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-entity-type";
const OBJECT_ROLE: &str = "http://terminology.hl7.org/CodeSystem/object-role";
const PARTICIPATION: &str = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType";
const SOURCE_TYPE: &str = "http://terminology.hl7.org/CodeSystem/security-source-type";
const BALP_ENTITY: &str = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType";

fn coding(system: &str, code: &str, display: &str) -> Value {
    json!({"system": system, "code": code, "display": display})
}

/// How an interaction is coded: its `restful-interaction` code, whether it is a
/// search, and the action.
struct Coded {
    subtype: Option<&'static str>,
    search: bool,
    action: Option<&'static str>,
}

fn coded(interaction: Option<&'static str>) -> Coded {
    let (subtype, search, action) = match interaction {
        Some(i @ ("read" | "vread" | "history-instance" | "history-type" | "history-system")) => {
            (Some(i), false, Some("R"))
        }
        Some("capabilities") => (Some("capabilities"), false, Some("R")),
        // Discovery: a read, but of no FHIR interaction.
        Some("smart-configuration" | "udap-metadata") => (None, false, Some("R")),
        Some(s @ ("search-type" | "search-system" | "search-compartment")) => {
            (Some(s), true, Some("E"))
        }
        Some("operation") => (Some("operation"), false, Some("E")),
        Some("batch") => (Some("batch"), false, Some("E")),
        Some("create") => (Some("create"), false, Some("C")),
        Some(u @ ("update" | "patch")) => (Some(u), false, Some("U")),
        Some("delete") => (Some("delete"), false, Some("D")),
        // Refused before the request was classified (unknown tenant, a body too large).
        _ => (None, false, None),
    };
    Coded {
        subtype,
        search,
        action,
    }
}

/// `0` success, `4` minor failure (refused, or a client error passed through), `8`
/// serious failure (a server error).
fn outcome(status: u16) -> &'static str {
    match status {
        0..=399 => "0",
        400..=499 => "4",
        _ => "8",
    }
}

/// An identifier in the token issuer's namespace (when the issuer is a URI).
fn identifier(issuer: Option<&str>, value: &str) -> Value {
    match issuer.filter(|i| url::Url::parse(i).is_ok()) {
        Some(system) => json!({"system": system, "value": value}),
        None => json!({"value": value}),
    }
}

/// The `AuditEvent` of `f`, written by the proxy instance `observer`.
pub(super) fn audit_event(f: &Finished, observer: &str) -> Value {
    let r = &f.record;
    let c = coded(r.interaction);
    let mut subtype = Vec::new();
    if c.search {
        subtype.push(coding(RESTFUL, "search", "search"));
    }
    if let Some(code) = c.subtype {
        subtype.push(coding(RESTFUL, code, code));
    }
    if c.search {
        subtype.push(coding(DCM, "110112", "Query"));
    }

    let issuer = r.issuer.as_deref();
    let reference = |relative: &str| match &r.public_base {
        Some(base) => format!("{base}/{relative}"),
        None => relative.to_owned(),
    };
    let user = r.fhir_user.is_some() || (r.subject.is_some() && r.subject != r.client_id);
    let mut agents = Vec::new();
    if let Some(client) = &r.client_id {
        agents.push(json!({
            "type": {"coding": [coding(DCM, "110153", "Source Role ID")]},
            "who": {"identifier": identifier(issuer, client), "display": client},
            "requestor": !user,
        }));
    }
    if user {
        let mut who = Map::new();
        if let Some(fhir_user) = &r.fhir_user {
            who.insert("reference".into(), json!(reference(fhir_user)));
        }
        if let Some(sub) = &r.subject {
            who.insert("identifier".into(), identifier(issuer, sub));
        }
        agents.push(json!({
            "type": {"coding": [coding(PARTICIPATION, "IRCP", "information recipient")]},
            "who": who,
            "requestor": true,
        }));
    }
    agents.push(json!({
        "type": {"coding": [coding(DCM, "110152", "Destination Role ID")]},
        "who": {"display": observer},
        "requestor": false,
    }));

    let mut entities = Vec::new();
    let mut patients: Vec<&str> = Vec::new();
    let target_patient = (r.resource_type == Some("Patient"))
        .then_some(r.resource_id.as_deref())
        .flatten();
    let in_compartment = r
        .compartment
        .as_deref()
        .and_then(|c| c.strip_prefix("Patient/"));
    for id in [r.patient.as_deref(), in_compartment, target_patient]
        .into_iter()
        .flatten()
        .chain(r.patients.iter().map(String::as_str))
    {
        if !patients.contains(&id) {
            patients.push(id);
        }
    }
    for id in patients {
        entities.push(json!({
            "what": {"reference": reference(&format!("Patient/{id}"))},
            "type": coding(ENTITY_TYPE, "1", "Person"),
            "role": coding(OBJECT_ROLE, "1", "Patient"),
        }));
    }
    if let (Some(t), Some(id)) = (r.resource_type, &r.resource_id) {
        let what = match &r.version {
            Some(v) => format!("{t}/{id}/_history/{v}"),
            None => format!("{t}/{id}"),
        };
        // A Patient asked for is already there, as the patient.
        if t != "Patient" || r.version.is_some() {
            entities.push(json!({
                "what": {"reference": reference(&what)},
                "type": coding(ENTITY_TYPE, "2", "System Object"),
                "role": coding(OBJECT_ROLE, "4", "Domain Resource"),
            }));
        }
    }
    if let Some(q) = r
        .query
        .as_deref()
        .filter(|q| c.search || q.contains(['?', '\n']))
    {
        entities.push(json!({
            "type": coding(ENTITY_TYPE, "2", "System Object"),
            "role": coding(OBJECT_ROLE, "24", "Query"),
            "query": base64::engine::general_purpose::STANDARD.encode(q),
        }));
    }
    let mut detail = vec![
        json!({"type": "authz.decision", "valueString": f.decision}),
        json!({"type": "http.status", "valueString": f.status.to_string()}),
    ];
    if let Some(op) = &r.operation {
        detail.push(json!({"type": "fhir.operation", "valueString": op}));
    }
    if !r.notes.is_empty() {
        detail.push(json!({"type": "notes", "valueString": r.notes.join(" ")}));
    }
    let transaction = match &r.request_id {
        Some(id) => json!({
            "what": {"identifier": {"value": id}},
            "type": coding(BALP_ENTITY, "XrequestId", "transport specific unique identifier where http X-Request-Id is used"),
            "detail": detail,
        }),
        None => json!({
            "type": coding(ENTITY_TYPE, "4", "Other"),
            "description": "the proxy's decision on the request",
            "detail": detail,
        }),
    };
    entities.push(transaction);

    let end = f.at;
    let start = end
        .checked_sub(std::time::Duration::from_secs_f64(
            f.latency_ms.max(0.0) / 1000.0,
        ))
        .unwrap_or(end);
    let mut source = Map::new();
    if let Some(tenant) = &r.tenant {
        source.insert("site".into(), json!(tenant));
    }
    source.insert("observer".into(), json!({"display": observer}));
    source.insert(
        "type".into(),
        json!([coding(SOURCE_TYPE, "4", "Application Server")]),
    );

    let mut event = Map::new();
    event.insert("resourceType".into(), json!("AuditEvent"));
    event.insert(
        "type".into(),
        coding(EVENT_TYPE, "rest", "Restful Operation"),
    );
    if !subtype.is_empty() {
        event.insert("subtype".into(), Value::Array(subtype));
    }
    if let Some(action) = c.action {
        event.insert("action".into(), json!(action));
    }
    event.insert(
        "period".into(),
        json!({"start": rfc3339(start), "end": rfc3339(end)}),
    );
    event.insert("recorded".into(), json!(rfc3339(end)));
    event.insert("outcome".into(), json!(outcome(f.status)));
    event.insert("outcomeDesc".into(), json!(f.reason));
    event.insert("agent".into(), Value::Array(agents));
    event.insert("source".into(), Value::Object(source));
    event.insert("entity".into(), Value::Array(entities));
    Value::Object(event)
}

/// A `batch` Bundle creating one `AuditEvent` per record, as JSON.
pub(super) fn batch_bundle<'a>(
    records: impl IntoIterator<Item = &'a Finished>,
    observer: &str,
) -> Vec<u8> {
    let entry: Vec<Value> = records
        .into_iter()
        .map(|f| {
            json!({
                "resource": audit_event(f, observer),
                "request": {"method": "POST", "url": "AuditEvent"},
            })
        })
        .collect();
    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": entry});
    // Serializing a Value into a Vec cannot fail.
    serde_json::to_vec(&bundle).unwrap_or_default()
}

#[cfg(test)]
mod tests;
