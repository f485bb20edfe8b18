//! A resource as the record checks see it: its type and id, the `reference` strings at
//! an element path, and (only for scope constraints) the whole resource as a `Value`.
//!
//! Two kinds: a `serde_json::Value` (configuration, tests, the reference check), and a
//! [`TextRecord`], a resource read from an upstream answer without a DOM: its members'
//! texts, borrowed from the answer, walked again only along the paths a check asks for.
//! Both follow `serde_json`'s reading of the same text: a member that occurs twice
//! counts with its last value, arrays flatten at every level.

use std::borrow::Cow;
use std::cell::OnceCell;

use serde_json::Value;

use super::json::Reader;

pub trait Record {
    /// `resourceType`, if it is a string.
    fn resource_type(&self) -> Option<Cow<'_, str>>;
    /// `id`, if it is a string.
    fn id(&self) -> Option<Cow<'_, str>>;
    /// Calls `f` with every `reference` string of the elements at `path` (member
    /// names from the resource root; arrays flatten at every level).
    fn references_at(&self, path: &[String], f: &mut dyn FnMut(&str));
    /// The whole resource (`None` only if its text does not parse as a `Value`, which
    /// the answer reader rules out: treated as "matches nothing").
    fn value(&self) -> Option<Cow<'_, Value>>;
}

impl Record for Value {
    fn resource_type(&self) -> Option<Cow<'_, str>> {
        self.get("resourceType")
            .and_then(Value::as_str)
            .map(Cow::Borrowed)
    }

    fn id(&self) -> Option<Cow<'_, str>> {
        self.get("id").and_then(Value::as_str).map(Cow::Borrowed)
    }

    fn references_at(&self, path: &[String], f: &mut dyn FnMut(&str)) {
        walk_value(self, path, f);
    }

    fn value(&self) -> Option<Cow<'_, Value>> {
        Some(Cow::Borrowed(self))
    }
}

fn walk_value(v: &Value, path: &[String], f: &mut dyn FnMut(&str)) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| walk_value(i, path, f)),
        Value::Object(o) => match path.split_first() {
            None => {
                if let Some(r) = o.get("reference").and_then(Value::as_str) {
                    f(r);
                }
            }
            Some((head, tail)) => {
                if let Some(child) = o.get(head.as_str()) {
                    walk_value(child, tail, f);
                }
            }
        },
        _ => {}
    }
}

/// A resource of an answer: the text of its object and of each member, borrowed.
#[derive(Debug)]
pub struct TextRecord<'a> {
    /// The resource's text (`None`: the `resource` was not an object).
    text: Option<&'a str>,
    /// (decoded key, value text), in order, repeats included.
    members: Vec<(Cow<'a, str>, &'a str)>,
    whole: OnceCell<Option<Value>>,
}

impl<'a> TextRecord<'a> {
    pub(crate) fn new(text: &'a str, members: Vec<(Cow<'a, str>, &'a str)>) -> Self {
        TextRecord {
            text: Some(text),
            members,
            whole: OnceCell::new(),
        }
    }

    /// A `resource` that is not an object: no type, no id, no references.
    pub(crate) fn not_object() -> Self {
        TextRecord {
            text: None,
            members: Vec::new(),
            whole: OnceCell::new(),
        }
    }

    /// The resource's text.
    pub fn text(&self) -> Option<&'a str> {
        self.text
    }

    /// The value text of the member `key` (its last occurrence).
    pub fn member(&self, key: &str) -> Option<&'a str> {
        self.members
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| *v)
    }

    fn string_member(&self, key: &str) -> Option<Cow<'a, str>> {
        let text = self.member(key)?;
        let mut r = Reader::new(text);
        match r.peek() {
            Some(b'"') => r.string().ok()?.decode(),
            _ => None,
        }
    }
}

impl Record for TextRecord<'_> {
    fn resource_type(&self) -> Option<Cow<'_, str>> {
        self.string_member("resourceType")
    }

    fn id(&self) -> Option<Cow<'_, str>> {
        self.string_member("id")
    }

    fn references_at(&self, path: &[String], f: &mut dyn FnMut(&str)) {
        // The root is an object: its member `path[0]`, then on down.
        if let Some((head, tail)) = path.split_first()
            && let Some(text) = self.member(head)
        {
            walk_text(text, tail, f);
        }
    }

    fn value(&self) -> Option<Cow<'_, Value>> {
        self.whole
            .get_or_init(|| self.text.and_then(|t| serde_json::from_str(t).ok()))
            .as_ref()
            .map(Cow::Borrowed)
    }
}

/// [`walk_value`] over JSON text.
fn walk_text(text: &str, path: &[String], f: &mut dyn FnMut(&str)) {
    let mut r = Reader::new(text);
    match r.peek() {
        Some(b'[') => {
            // The text was validated when the answer was read; a failure here can only
            // stop the walk early, never report a reference that is not there.
            let _ = r.array(|r| {
                walk_text(r.skip()?, path, f);
                Ok(())
            });
        }
        Some(b'{') => {
            let want = path.first().map_or("reference", String::as_str);
            let mut last = None;
            let walked = r.object(|r, key| {
                let value = r.skip()?;
                if key.is(want) {
                    last = Some(value);
                }
                Ok(())
            });
            let (Ok(()), Some(value)) = (walked, last) else {
                return;
            };
            match path.split_first() {
                Some((_, tail)) => walk_text(value, tail, f),
                None => {
                    let mut r = Reader::new(value);
                    if r.peek() == Some(b'"')
                        && let Some(s) = r.string().ok().and_then(|s| s.decode())
                    {
                        f(&s);
                    }
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use proptest::prelude::*;

    fn record(text: &str) -> TextRecord<'_> {
        let mut members = Vec::new();
        let mut r = Reader::new(text);
        r.object(|r, key| {
            let v = r.skip()?;
            members.push((key.decode().unwrap(), v));
            Ok(())
        })
        .unwrap();
        TextRecord::new(text, members)
    }

    fn refs(rec: &dyn Record, path: &[&str]) -> Vec<String> {
        let path: Vec<String> = path.iter().map(|s| (*s).to_owned()).collect();
        let mut out = Vec::new();
        rec.references_at(&path, &mut |r| out.push(r.to_owned()));
        out
    }

    #[test]
    fn text_and_value_records_agree_on_an_example() {
        let text = r#"{"resourceType":"Encounter","id":"e\u0031","subject":{"reference":"Patient/p1"},
            "participant":[{"individual":{"reference":"Practitioner/a"}},[{"individual":{"reference":"Practitioner/b"}}],
            {"individual":[{"reference":"Practitioner/c"},{"display":"x"}]},{"individual":{"reference":5}}],
            "subject":{"reference":"Patient/p2","reference":"Patient/p3"}}"#;
        let v: Value = serde_json::from_str(text).unwrap();
        let t = record(text);
        assert_eq!(t.id().as_deref(), Some("e1"));
        assert_eq!(t.resource_type().as_deref(), Some("Encounter"));
        for path in [
            &["subject"][..],
            &["participant", "individual"],
            &["participant"],
            &["nothing"],
        ] {
            assert_eq!(refs(&t, path), refs(&v, path), "{path:?}");
        }
        assert_eq!(refs(&t, &["subject"]), ["Patient/p3"]);
        assert_eq!(
            refs(&t, &["participant", "individual"]),
            ["Practitioner/a", "Practitioner/b", "Practitioner/c"]
        );
        assert_eq!(t.value().unwrap().as_ref(), &v);
        assert_eq!(TextRecord::not_object().id(), None);
        assert!(TextRecord::not_object().value().is_none());
    }

    fn element() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<i32>().prop_map(Value::from),
            prop::sample::select(vec!["Patient/p1", "Practitioner/x", "é\"\\"])
                .prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 40, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::vec(
                    (prop::sample::select(vec!["reference", "a", "b"]), inner),
                    0..4
                )
                .prop_map(|kv| Value::Object(
                    kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
                )),
            ]
        })
    }

    proptest! {
        /// Over any tree of objects and arrays, the text walk finds exactly the
        /// references the `Value` walk finds, in the same order.
        #[test]
        fn text_walk_is_the_value_walk(
            tree in element(),
            path in prop::collection::vec(prop::sample::select(vec!["a", "b"]), 0..3),
        ) {
            let resource = serde_json::json!({"resourceType": "X", "a": tree});
            let text = resource.to_string();
            let t = record(&text);
            let mut full = vec!["a"];
            full.extend(path);
            prop_assert_eq!(refs(&t, &full), refs(&resource, &full));
        }
    }
}
