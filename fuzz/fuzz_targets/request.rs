//! The FHIR request parser (`fhir::parse_request`): path, query string and form body.
//!
//! Input: `METHOD PATH[?QUERY]`, then optionally a newline and the form body.
//!
//! Properties: an accepted request is written back to exactly the path it came from
//! (the parser normalizes nothing); its ids are valid ids; its parameters have
//! non-empty names and no control characters, and, percent-encoded again into a query,
//! parse to the same parameters and the same request. A refused one is a 400 (405 with
//! an `Allow` header for a known path with the wrong method) whose message is short
//! printable ASCII.
#![no_main]

use http::{Method, StatusCode};
use libfuzzer_sys::fuzz_target;
use smart_fhir_proxy::fhir::parse::{MAX_PARAMS, MAX_QUERY_LEN};
use smart_fhir_proxy::fhir::{FhirRequest, Interaction, OperationLevel, ResourceId, parse_request};

/// The path of an accepted request, from its parts.
fn path_of(req: &FhirRequest) -> String {
    let ty = req.resource_type.map(|t| t.as_str()).unwrap_or("?");
    let id = req.id.as_ref().map(ResourceId::as_str).unwrap_or("?");
    let post = req.method == Method::POST;
    match &req.interaction {
        Interaction::SearchSystem if post => "/_search".to_owned(),
        Interaction::SearchSystem | Interaction::BatchOrTransaction => "/".to_owned(),
        Interaction::Capabilities => "/metadata".to_owned(),
        Interaction::SmartConfiguration => "/.well-known/smart-configuration".to_owned(),
        Interaction::UdapMetadata => "/.well-known/udap".to_owned(),
        Interaction::HistorySystem => "/_history".to_owned(),
        Interaction::Operation(name, OperationLevel::System) => format!("/${}", name.as_str()),
        Interaction::Operation(name, OperationLevel::Type) => format!("/{ty}/${}", name.as_str()),
        Interaction::Operation(name, OperationLevel::Instance) => {
            format!("/{ty}/{id}/${}", name.as_str())
        }
        Interaction::SearchType if post => format!("/{ty}/_search"),
        Interaction::SearchType | Interaction::Create => format!("/{ty}"),
        Interaction::Update | Interaction::Delete if req.id.is_none() => format!("/{ty}"),
        Interaction::Read | Interaction::Update | Interaction::Patch | Interaction::Delete => {
            format!("/{ty}/{id}")
        }
        Interaction::HistoryType => format!("/{ty}/_history"),
        Interaction::HistoryInstance => format!("/{ty}/{id}/_history"),
        Interaction::Vread => {
            let version = req.version.as_ref().map(ResourceId::as_str).unwrap_or("?");
            format!("/{ty}/{id}/_history/{version}")
        }
        Interaction::SearchCompartment => {
            let c = req
                .compartment
                .as_ref()
                .expect("a compartment search names its compartment");
            let searched = req.resource_type.map(|t| t.as_str()).unwrap_or("*");
            format!("/{}/{}/{searched}", c.owner, c.id)
        }
    }
}

/// `application/x-www-form-urlencoded`, spaces as `+`.
fn encode(s: &str, out: &mut String) {
    for b in s.bytes() {
        match b {
            b' ' => out.push('+'),
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(char::from(b))
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
}

fn check_accepted(path: &str, req: &FhirRequest) {
    let written = path_of(req);
    let path = if path.is_empty() { "/" } else { path };
    assert_eq!(written, path, "{req:?}");
    for id in [&req.id, &req.version].into_iter().flatten() {
        assert!(ResourceId::is_valid(id.as_str()));
    }
    if let Some(c) = &req.compartment {
        assert!(ResourceId::is_valid(c.id.as_str()));
    }
    assert!(req.params.len() <= MAX_PARAMS);
    let mut query = String::new();
    for (i, (name, value)) in req.params.iter().enumerate() {
        assert!(!name.is_empty());
        assert!(!name.chars().chain(value.chars()).any(char::is_control));
        if i > 0 {
            query.push('&');
        }
        encode(name, &mut query);
        query.push('=');
        encode(value, &mut query);
    }
    if query.len() > MAX_QUERY_LEN {
        return;
    }
    // The same request with every parameter in the query, re-encoded.
    let again = parse_request(&req.method, &written, Some(&query), None)
        .unwrap_or_else(|e| panic!("{written}?{query} refused: {e}"));
    assert_eq!(again.params, req.params);
    assert_eq!(again.interaction, req.interaction);
    assert_eq!(again.resource_type, req.resource_type);
    assert_eq!(again.id, req.id);
    assert_eq!(again.version, req.version);
    assert_eq!(again.compartment, req.compartment);
}

fuzz_target!(|data: &[u8]| {
    let (line, body) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], Some(&data[at + 1..])),
        None => (data, None),
    };
    let Ok(line) = std::str::from_utf8(line) else {
        return;
    };
    let (method, target) = line.split_once(' ').unwrap_or((line, ""));
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return;
    };
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    match parse_request(&method, path, query, body) {
        Ok(req) => {
            assert_eq!(req.method, method);
            check_accepted(path, &req);
        }
        Err(e) => {
            let status = e.status();
            assert!(status == StatusCode::BAD_REQUEST || status == StatusCode::METHOD_NOT_ALLOWED);
            assert_eq!(
                e.allow().is_some(),
                status == StatusCode::METHOD_NOT_ALLOWED
            );
            assert!(!e.reason().is_empty());
            let message = e.to_string();
            assert!(
                message.bytes().all(|b| b == b' ' || b.is_ascii_graphic()),
                "{message:?}"
            );
            assert!(message.len() <= 1024, "{} bytes", message.len());
        }
    }
});
