//! An upstream answer read in one pass, without a DOM.
//!
//! The record checks read only a few elements of a resource: its type and id and the
//! elements that link it into compartments. The reader ([`super::json::Reader`]) walks
//! the answer once, validating all of it, and notes where each resource's members are
//! ([`TextRecord`]); a check walks again only the members its paths name. Nothing is
//! parsed into a tree unless a scope constraint needs the whole resource. For a Bundle
//! it also hands out each entry's text, so kept entries are spliced back unchanged.
//!
//! Semantics follow `serde_json` on the same text: a member that occurs twice counts
//! with its last value (at its first position, for the Bundle's own members).

use std::borrow::Cow;

use super::json::{JsonError, Reader, Str};
use super::record::TextRecord;

/// Why an answer could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    #[error(transparent)]
    Json(#[from] JsonError),
    /// Valid JSON, but not a FHIR resource (the top level is not an object, or
    /// `resourceType` occurs twice).
    #[error("not a resource")]
    NotResource,
}

/// One member of the answer's top-level object.
#[derive(Debug, Clone)]
pub struct Member<'a> {
    pub key: Cow<'a, str>,
    /// The key as written, with its quotes.
    pub raw_key: &'a str,
    /// The value's text.
    pub value: &'a str,
}

/// One element of a Bundle's `entry` array.
#[derive(Debug)]
pub struct Entry<'a> {
    /// The entry's text.
    pub raw: &'a str,
    /// The `resource` (`None`: absent or `null`).
    pub resource: Option<TextRecord<'a>>,
    /// The text of the (last) `resource` member.
    pub resource_raw: Option<&'a str>,
    /// `search.mode`.
    pub mode: Option<Cow<'a, str>>,
}

/// What one pass over an answer found.
#[derive(Debug)]
pub struct Answer<'a> {
    /// `resourceType`, if it is a string.
    pub resource_type: Option<Cow<'a, str>>,
    /// The top-level members in order, each key once.
    pub members: Vec<Member<'a>>,
    /// The top-level resource.
    pub resource: TextRecord<'a>,
    /// The `entry` array's elements (empty without one).
    pub entries: Vec<Entry<'a>>,
    /// `entry` is not an array of well-formed entries (an entry that is no object,
    /// `resource` or `search.mode` twice, a `search` or `search.mode` of the wrong
    /// kind). Only a Bundle's entries matter; other resources' `entry` (List) is not
    /// an error.
    pub malformed_entries: bool,
}

impl Answer<'_> {
    pub fn member(&self, key: &str) -> Option<&Member<'_>> {
        self.members.iter().find(|m| m.key == key)
    }
}

/// Reads an answer: the top-level resource and (for any `entry` array) each entry's.
pub fn read<'a>(src: &'a str) -> Result<Answer<'a>, AnswerError> {
    let mut r = Reader::new(src);
    if r.peek() != Some(b'{') {
        // Validate anyway: "not JSON" and "not a resource" are different faults.
        r.skip()?;
        r.finish()?;
        return Err(AnswerError::NotResource);
    }
    let mut members: Vec<Member<'a>> = Vec::new();
    let mut positions: std::collections::HashMap<Cow<'a, str>, usize> =
        std::collections::HashMap::new();
    let mut all = Vec::new();
    let mut resource_type: Option<Option<Cow<'a, str>>> = None;
    let mut entries = Vec::new();
    let mut malformed_entries = false;
    let mut twice = false;
    r.object(|r, key| {
        let raw_key = key.quoted();
        let name = decode_key(key, r)?;
        let value = if name == "entry" && r.peek() == Some(b'[') {
            let start = value_start(r);
            entries.clear();
            malformed_entries = false;
            r.array(|r| {
                match entry(r, src)? {
                    Some(e) => entries.push(e),
                    None => malformed_entries = true,
                }
                Ok(())
            })?;
            src.get(start..r.position()).unwrap_or_default()
        } else {
            let value = r.skip()?;
            if name == "entry" {
                entries.clear();
                malformed_entries = true;
            }
            value
        };
        if name == "resourceType" {
            if resource_type.is_some() {
                twice = true;
            }
            resource_type = Some(string_value(value));
        }
        all.push((name.clone(), value));
        // By key, so an answer of many top-level members costs linear time (a broken
        // upstream must not make the check quadratic).
        match positions.entry(name.clone()) {
            std::collections::hash_map::Entry::Occupied(at) => {
                if let Some(m) = members.get_mut(*at.get()) {
                    m.value = value;
                }
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(members.len());
                members.push(Member {
                    key: name,
                    raw_key,
                    value,
                });
            }
        }
        Ok(())
    })?;
    r.finish()?;
    if twice {
        return Err(AnswerError::NotResource);
    }
    Ok(Answer {
        resource_type: resource_type.flatten(),
        members,
        resource: TextRecord::new(src, all),
        entries,
        malformed_entries,
    })
}

/// One Bundle entry; `None` if it is malformed (the reader is then past it).
fn entry<'a>(r: &mut Reader<'a>, src: &'a str) -> Result<Option<Entry<'a>>, JsonError> {
    if r.peek() != Some(b'{') {
        r.skip()?;
        return Ok(None);
    }
    let start = value_start(r);
    let (mut resource, mut resource_raw, mut mode) = (None, None, None);
    let (mut seen_resource, mut seen_search, mut ok) = (false, false, true);
    r.object(|r, key| {
        if key.is("resource") {
            ok &= !std::mem::replace(&mut seen_resource, true);
            let at = value_start(r);
            resource = match r.peek() {
                Some(b'{') => {
                    let members = members_of(r)?;
                    let text = src.get(at..r.position()).unwrap_or_default();
                    Some(TextRecord::new(text, members))
                }
                Some(b'n') => {
                    r.skip()?;
                    None
                }
                _ => {
                    r.skip()?;
                    Some(TextRecord::not_object())
                }
            };
            resource_raw = src.get(at..r.position());
        } else if key.is("search") {
            ok &= !std::mem::replace(&mut seen_search, true);
            match r.peek() {
                Some(b'{') => {
                    let mut seen_mode = false;
                    mode = None;
                    r.object(|r, key| {
                        if !key.is("mode") {
                            r.skip()?;
                            return Ok(());
                        }
                        ok &= !std::mem::replace(&mut seen_mode, true);
                        match r.peek() {
                            Some(b'"') => match r.string()?.decode() {
                                Some(m) => mode = Some(m),
                                None => ok = false,
                            },
                            Some(b'n') => {
                                r.skip()?;
                            }
                            _ => {
                                r.skip()?;
                                ok = false;
                            }
                        }
                        Ok(())
                    })?;
                }
                Some(b'n') => {
                    r.skip()?;
                    mode = None;
                }
                _ => {
                    r.skip()?;
                    ok = false;
                }
            }
        } else {
            r.skip()?;
        }
        Ok(())
    })?;
    let raw = src.get(start..r.position()).unwrap_or_default();
    Ok(ok.then_some(Entry {
        raw,
        resource,
        resource_raw,
        mode,
    }))
}

/// An object's members: (decoded key, value text), in order.
fn members_of<'a>(r: &mut Reader<'a>) -> Result<Vec<(Cow<'a, str>, &'a str)>, JsonError> {
    let mut out = Vec::with_capacity(16);
    r.object(|r, key| {
        let name = decode_key(key, r)?;
        out.push((name, r.skip()?));
        Ok(())
    })?;
    Ok(out)
}

fn decode_key<'a>(key: Str<'a>, r: &Reader<'_>) -> Result<Cow<'a, str>, JsonError> {
    // The reader only hands out well-formed strings; one that does not decode (a lone
    // surrogate) has been refused already, so this is a broken invariant, not input.
    key.decode().ok_or(JsonError { at: r.position() })
}

fn string_value(text: &str) -> Option<Cow<'_, str>> {
    let mut r = Reader::new(text);
    match r.peek() {
        Some(b'"') => r.string().ok()?.decode(),
        _ => None,
    }
}

/// Where the value the reader is at begins.
fn value_start(r: &mut Reader<'_>) -> usize {
    r.peek();
    r.position()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn repeated_members_keep_their_first_place_and_last_value() {
        let a = read(r#"{"resourceType":"Bundle","total":1,"type":"x","total":2}"#).unwrap();
        let keys: Vec<&str> = a.members.iter().map(|m| m.key.as_ref()).collect();
        assert_eq!(keys, ["resourceType", "total", "type"]);
        assert_eq!(a.member("total").unwrap().value, "2");
    }

    #[test]
    fn many_top_level_members_read_in_linear_time() {
        // 200,000 distinct members: quadratic deduplication would take minutes.
        let mut text = String::from("{\"resourceType\":\"Bundle\"");
        for i in 0..200_000 {
            text.push_str(&format!(",\"m{i}\":{i}"));
        }
        text.push('}');
        let a = read(&text).unwrap();
        assert_eq!(a.members.len(), 200_001);
    }
}
