//! The validating JSON reader (`fhir::json`) and the one-pass answer reader
//! (`fhir::answer`) against `serde_json`.
//!
//! Properties: the reader accepts exactly what `serde_json` parses into a `Value`;
//! `skip` hands out exactly the value's text; the answer reader accepts every JSON
//! object with at most one `resourceType` and refuses everything else, and what it
//! finds (type, id, top-level members in `serde_json`'s order with their last values,
//! Bundle entries with their resources and search modes) is what the `Value` holds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use smart_fhir_proxy::fhir::answer::{self, AnswerError};
use smart_fhir_proxy::fhir::json::Reader;
use smart_fhir_proxy::fhir::record::Record;

fn reader_accepts(text: &str) -> Option<&str> {
    let mut r = Reader::new(text);
    let value = r.skip().ok()?;
    r.finish().ok()?;
    Some(value)
}

/// How often `key` occurs among the members of the top-level object `text`.
fn occurrences(text: &str, key: &str) -> usize {
    let mut r = Reader::new(text);
    let mut n = 0;
    let _ = r.object(|r, k| {
        if k.is(key) {
            n += 1;
        }
        r.skip().map(|_| ())
    });
    n
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).expect("the reader accepted it, so serde_json parses it")
}

/// An entry as the answer reader must see it, or `None` if it is malformed.
fn expected_entry(v: &Value) -> Option<(Option<&Value>, Option<&str>)> {
    let e = v.as_object()?;
    let resource = e.get("resource").filter(|r| !r.is_null());
    let mode = match e.get("search") {
        None | Some(Value::Null) => None,
        Some(Value::Object(s)) => match s.get("mode") {
            None | Some(Value::Null) => None,
            Some(Value::String(m)) => Some(m.as_str()),
            Some(_) => return None,
        },
        Some(_) => return None,
    };
    Some((resource, mode))
}

/// Element paths of `v` (member names from the root, through arrays), at most three
/// deep and a bounded number of them.
fn paths(v: &Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    if out.len() >= 64 || prefix.len() >= 3 {
        return;
    }
    match v {
        Value::Array(items) => items.iter().for_each(|i| paths(i, prefix, out)),
        Value::Object(o) => {
            for (k, child) in o {
                prefix.push(k.clone());
                if !out.contains(prefix) {
                    out.push(prefix.clone());
                }
                paths(child, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

/// A resource read from text is the resource `serde_json` reads: type, id, and the
/// references at every element path.
fn check_record(record: &impl Record, v: &Value) {
    assert_eq!(record.resource_type(), v.resource_type());
    assert_eq!(record.id(), v.id());
    let mut all = Vec::new();
    paths(v, &mut Vec::new(), &mut all);
    all.push(vec!["nowhere".to_owned()]);
    for path in &all {
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        record.references_at(path, &mut |r| ours.push(r.to_owned()));
        v.references_at(path, &mut |r| theirs.push(r.to_owned()));
        assert_eq!(ours, theirs, "references at {path:?}");
    }
    if v.is_object() {
        assert_eq!(record.value().as_deref(), Some(v));
    }
}

fn check_answer_reader(text: &str, value: Option<&Value>) {
    let read = answer::read(text);
    let Some(value) = value else {
        assert!(matches!(read, Err(AnswerError::Json(_))), "{read:?}");
        return;
    };
    let Some(object) = value.as_object() else {
        assert!(matches!(read, Err(AnswerError::NotResource)), "{read:?}");
        return;
    };
    if occurrences(text, "resourceType") > 1 {
        assert!(matches!(read, Err(AnswerError::NotResource)), "{read:?}");
        return;
    }
    let a = read.unwrap_or_else(|e| panic!("refused a JSON object: {e}"));
    assert_eq!(
        a.resource_type.as_deref(),
        object.get("resourceType").and_then(Value::as_str)
    );
    assert_eq!(
        a.resource.id().as_deref(),
        object.get("id").and_then(Value::as_str)
    );
    check_record(&a.resource, value);
    let keys: Vec<&str> = a.members.iter().map(|m| m.key.as_ref()).collect();
    let expected: Vec<&str> = object.keys().map(String::as_str).collect();
    assert_eq!(keys, expected);
    for m in &a.members {
        assert_eq!(
            &parse(m.value),
            &object[m.key.as_ref()],
            "member {:?}",
            m.key
        );
        assert_eq!(
            serde_json::from_str::<String>(m.raw_key).ok().as_deref(),
            Some(m.key.as_ref())
        );
    }
    match object.get("entry") {
        Some(Value::Array(items)) => {
            let expected: Option<Vec<_>> = items.iter().map(expected_entry).collect();
            // An entry with `resource`, `search` or `search.mode` twice is malformed
            // too, which `Value` cannot show: only check the way back.
            match expected {
                None => assert!(a.malformed_entries),
                Some(expected) if !a.malformed_entries => {
                    assert_eq!(a.entries.len(), expected.len());
                    for ((e, item), (resource, mode)) in a.entries.iter().zip(items).zip(expected) {
                        assert_eq!(&parse(e.raw), item);
                        assert_eq!(e.mode.as_deref(), mode);
                        match (resource, &e.resource) {
                            (None, None) => {}
                            (Some(r), Some(record)) => {
                                let raw = e.resource_raw.expect("the resource's text");
                                assert_eq!(&parse(raw), r);
                                check_record(record, r);
                            }
                            (r, record) => panic!("resource {r:?}, read {record:?}"),
                        }
                    }
                }
                Some(_) => {}
            }
        }
        Some(_) => assert!(a.malformed_entries && a.entries.is_empty()),
        None => assert!(!a.malformed_entries && a.entries.is_empty()),
    }
}

/// Whether some object of the JSON text starts with `serde_json`'s raw-value token,
/// which makes `serde_json` read it as another value, so the reader refuses it.
struct RawValueToken(bool);

impl<'de> serde::Deserialize<'de> for RawValueToken {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TokenVisitor)
    }
}

struct TokenVisitor;

impl<'de> serde::de::Visitor<'de> for TokenVisitor {
    type Value = RawValueToken;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, _: bool) -> Result<RawValueToken, E> {
        Ok(RawValueToken(false))
    }
    fn visit_i64<E>(self, _: i64) -> Result<RawValueToken, E> {
        Ok(RawValueToken(false))
    }
    fn visit_u64<E>(self, _: u64) -> Result<RawValueToken, E> {
        Ok(RawValueToken(false))
    }
    fn visit_f64<E>(self, _: f64) -> Result<RawValueToken, E> {
        Ok(RawValueToken(false))
    }
    fn visit_str<E>(self, _: &str) -> Result<RawValueToken, E> {
        Ok(RawValueToken(false))
    }
    fn visit_unit<E>(self) -> Result<RawValueToken, E> {
        Ok(RawValueToken(false))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> Result<RawValueToken, A::Error> {
        let mut found = false;
        while let Some(RawValueToken(f)) = seq.next_element()? {
            found |= f;
        }
        Ok(RawValueToken(found))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> Result<RawValueToken, A::Error> {
        let mut found = false;
        let mut first = true;
        while let Some(key) = map.next_key::<String>()? {
            found |=
                std::mem::replace(&mut first, false) && key == "$serde_json::private::RawValue";
            let RawValueToken(f) = map.next_value()?;
            found |= f;
        }
        Ok(RawValueToken(found))
    }
}

fuzz_target!(|data: &[u8]| {
    if serde_json::from_slice::<RawValueToken>(data).is_ok_and(|RawValueToken(found)| found) {
        let text = std::str::from_utf8(data).expect("serde_json read it, so it is UTF-8");
        assert!(
            reader_accepts(text).is_none(),
            "read an object serde_json reads otherwise"
        );
        assert!(matches!(answer::read(text), Err(AnswerError::Json(_))));
        return;
    }
    let theirs: Option<Value> = serde_json::from_slice(data).ok();
    let Ok(text) = std::str::from_utf8(data) else {
        assert!(theirs.is_none(), "serde_json accepted invalid UTF-8");
        return;
    };
    let ours = reader_accepts(text);
    assert_eq!(
        ours.is_some(),
        theirs.is_some(),
        "the reader and serde_json disagree"
    );
    if let Some(value) = ours {
        assert_eq!(
            value,
            text.trim_matches(|c| matches!(c, ' ' | '\n' | '\r' | '\t'))
        );
    }
    check_answer_reader(text, theirs.as_ref());
});
