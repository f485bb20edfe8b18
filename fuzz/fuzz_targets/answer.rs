//! The answer check of stage 5 (`forward::filter::check_answer`) on upstream answers,
//! for requests of every kind of permit (`smart_fhir_proxy::fuzzing`).
//!
//! Input: one byte choosing the request, one choosing the upstream status and content
//! type, then the answer's body.
//!
//! Properties: a released answer is valid JSON (or empty, for a 304); a filtered
//! Bundle has the kept entries of the upstream's Bundle, in order, never more, and its
//! counts add up; no upstream base is handed out where the answer named it whole; and
//! the check decides as the whole-`Value` check it replaced: where that one released
//! an answer, this one released the same JSON with the same counts, or (being stricter
//! about malformed Bundles) refused it as a bad upstream answer.
#![no_main]

use std::sync::LazyLock;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use smart_fhir_proxy::fuzzing::{AnswerFixtures, UPSTREAM_BASE};

static FIXTURES: LazyLock<AnswerFixtures> =
    LazyLock::new(|| AnswerFixtures::new().expect("the fixtures build"));

const STATUSES: [u16; 8] = [200, 200, 200, 201, 304, 400, 404, 500];
const CONTENT_TYPES: [Option<&str>; 4] = [
    Some("application/fhir+json"),
    Some("application/json; charset=utf-8"),
    Some("application/fhir+xml"),
    None,
];

/// Valid JSON in which no object has a member twice (nor starts with `serde_json`'s
/// raw-value token).
struct Strict;

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Strict;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON without repeated members")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_str<E>(self, _: &str) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_unit<E>(self) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
        while seq.next_element::<Strict>()?.is_some() {}
        Ok(Strict)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
        let mut keys = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            // An object that `serde_json` reads as another value (`fhir::json`).
            if keys.is_empty() && key == "$serde_json::private::RawValue" {
                return Err(serde::de::Error::custom("the raw-value token"));
            }
            if !keys.insert(key) {
                return Err(serde::de::Error::custom("a member twice"));
            }
            map.next_value::<Strict>()?;
        }
        Ok(Strict)
    }
}

/// What the check may refuse although the whole-value check released it: text that is
/// not strict JSON, or a Bundle entry that is not well-formed (see `fhir::answer`).
fn malformed(body: &[u8]) -> bool {
    if serde_json::from_slice::<Strict>(body).is_err() {
        return true;
    }
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return true;
    };
    let entry_ok = |e: &Value| {
        let Some(e) = e.as_object() else {
            return false;
        };
        match e.get("search") {
            None | Some(Value::Null) => true,
            Some(Value::Object(s)) => {
                matches!(
                    s.get("mode"),
                    None | Some(Value::Null) | Some(Value::String(_))
                )
            }
            Some(_) => false,
        }
    };
    match v.get("entry") {
        None => false,
        Some(Value::Array(items)) => !items.iter().all(entry_ok),
        Some(_) => true,
    }
}

/// Adds the occurrences of the upstream base in the strings of `v` to `n`.
fn count_base(v: &Value, n: &mut usize) {
    match v {
        Value::String(s) => *n += s.matches(UPSTREAM_BASE).count(),
        Value::Array(items) => items.iter().for_each(|i| count_base(i, n)),
        Value::Object(o) => o.iter().for_each(|(k, v)| {
            *n += k.matches(UPSTREAM_BASE).count();
            count_base(v, n);
        }),
        _ => {}
    }
}

/// The entries of a Bundle's JSON, if it is one.
fn entries(v: &Value) -> Option<&Vec<Value>> {
    (v.get("resourceType")? == "Bundle").then_some(())?;
    v.get("entry")?.as_array()
}

fuzz_target!(|data: &[u8]| {
    let [which, how, body @ ..] = data else {
        return;
    };
    let which = usize::from(*which) % FIXTURES.len();
    let status = StatusCode::from_u16(STATUSES[usize::from(how & 7)]).expect("a status");
    let mut headers = HeaderMap::new();
    if let Some(ct) = CONTENT_TYPES[usize::from(how >> 3) % CONTENT_TYPES.len()] {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    }
    let context = || {
        format!(
            "fixture {} on {:?}",
            FIXTURES.describe(which),
            String::from_utf8_lossy(body)
        )
    };

    let checked = FIXTURES.check(which, status, &headers, Bytes::copy_from_slice(body));
    let reference = FIXTURES.check_whole_value(which, status, &headers, body);

    let Ok(checked) = checked else {
        if let (Err(ours), Ok(theirs)) = (&checked, &reference) {
            // Stricter than the reference only about malformed answers, which it let
            // through (text it never looked at, a member twice, a Bundle entry that
            // is not an object).
            assert!(
                matches!(ours.reason(), "upstream_bad_response" | "upstream_status")
                    && malformed(body),
                "refused ({ours:?}) what the whole-value check released ({}): {}",
                theirs.reason,
                context()
            );
        }
        return;
    };
    if status == StatusCode::NOT_MODIFIED {
        assert!(checked.body.is_empty());
        assert!(FIXTURES.unrestricted(which));
        return;
    }
    let out: Value = serde_json::from_slice(&checked.body)
        .unwrap_or_else(|e| panic!("released an answer that is not JSON ({e}): {}", context()));
    // The upstream base, followed by what ends a whole base (`/`, `"`, `?`, `#`, or an
    // escape of one of them or of a backslash), is always rewritten.
    let base = UPSTREAM_BASE.as_bytes();
    for (at, _) in checked
        .body
        .windows(base.len())
        .enumerate()
        .filter(|(_, w)| *w == base)
    {
        let rest = &checked.body[at + base.len()..];
        let escaped = |e: &[&[u8]]| {
            e.iter()
                .any(|e| rest.len() > e.len() && rest[1..=e.len()].eq_ignore_ascii_case(e))
        };
        let whole = match rest.first() {
            Some(b'/' | b'"' | b'?' | b'#') => true,
            Some(b'\\') => escaped(&[
                b"/", b"\"", b"\\", b"u002f", b"u0022", b"u003f", b"u0023", b"u005c",
            ]),
            _ => false,
        };
        assert!(
            !whole,
            "handed out the upstream base at byte {at}: {}",
            context()
        );
    }
    let input: Option<Value> = serde_json::from_slice(body).ok();
    if let Some(before) = input.as_ref().and_then(entries) {
        let after = out
            .get("entry")
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice);
        assert!(after.len() <= before.len(), "{}", context());
        assert_eq!(after.len() + checked.dropped, before.len(), "{}", context());
        assert!(checked.kept <= after.len(), "{}", context());
    }
    // The reference rewrote the answer's text before reading it, so it missed an
    // upstream base written with escapes (`http:\/\/...`), which the check, reading
    // links decoded, rewrites: their links may differ.
    let escaped_base = input.as_ref().is_some_and(|v| {
        let mut decoded = 0;
        count_base(v, &mut decoded);
        decoded
            > body
                .windows(UPSTREAM_BASE.len())
                .filter(|w| *w == UPSTREAM_BASE.as_bytes())
                .count()
    });
    match reference {
        Ok(_) if escaped_base => {}
        Ok(theirs) => {
            let theirs_json: Value = serde_json::from_slice(&theirs.body)
                .unwrap_or_else(|e| panic!("the reference released non-JSON ({e}): {}", context()));
            assert_eq!(out, theirs_json, "{}", context());
            assert_eq!(
                (checked.dropped, checked.kept, checked.reason),
                (theirs.dropped, theirs.kept, theirs.reason),
                "{}",
                context()
            );
        }
        Err(theirs) => panic!(
            "released ({}) what the whole-value check refused ({theirs:?}): {}",
            checked.reason,
            context()
        ),
    }
});
