//! A borrowed JSON reader: validates and walks JSON text in one pass without building
//! a tree, so an answer check can look at the few elements it needs and splice the
//! rest through as bytes.
//!
//! It accepts exactly RFC 8259 JSON (what `serde_json` accepts): no trailing commas,
//! no comments, no control characters or invalid escapes in strings, fewer than
//! [`MAX_DEPTH`] nested containers. Strings are handed out raw (the text between the
//! quotes, escapes intact) with a flag saying whether they need decoding, so the common
//! case of a plain ASCII key or id is compared without a copy.

use std::borrow::Cow;

/// `serde_json`'s default recursion limit: like it, the reader refuses the 128th nested
/// array or object, so both accept exactly the same texts.
pub const MAX_DEPTH: usize = 128;

/// The text is not JSON (or nests too deeply).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid JSON at byte {at}")]
pub struct JsonError {
    pub at: usize,
}

/// A JSON string as it appears in the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Str<'a> {
    /// The string as written, quotes and escapes included.
    quoted: &'a str,
    escaped: bool,
}

impl<'a> Str<'a> {
    /// The text between the quotes, escapes intact.
    pub fn raw(&self) -> &'a str {
        self.quoted
            .get(1..self.quoted.len().saturating_sub(1))
            .unwrap_or_default()
    }

    /// The string as written, with its quotes.
    pub fn quoted(&self) -> &'a str {
        self.quoted
    }

    /// The string's value. Borrowed unless it has escapes. `None` for escapes that do
    /// not decode to text (a lone surrogate).
    pub fn decode(&self) -> Option<Cow<'a, str>> {
        if !self.escaped {
            return Some(Cow::Borrowed(self.raw()));
        }
        serde_json::from_str::<String>(self.quoted)
            .ok()
            .map(Cow::Owned)
    }

    /// Whether the string's value is `s` (no copy unless it has escapes).
    pub fn is(&self, s: &str) -> bool {
        if self.escaped {
            self.decode().is_some_and(|d| d == s)
        } else {
            self.raw() == s
        }
    }
}

/// A cursor over JSON text. Every method that reads a value leaves the cursor just
/// after it; on error the cursor's position is unspecified and the reader should be
/// dropped.
pub struct Reader<'a> {
    src: &'a str,
    pos: usize,
    depth: usize,
}

impl<'a> Reader<'a> {
    pub fn new(src: &'a str) -> Self {
        Reader {
            src,
            pos: 0,
            depth: 0,
        }
    }

    fn bytes(&self) -> &'a [u8] {
        self.src.as_bytes()
    }

    fn err(&self) -> JsonError {
        JsonError { at: self.pos }
    }

    #[inline]
    fn skip_ws(&mut self) {
        let b = self.bytes();
        // Compact JSON has none: one comparison in the common case.
        while let Some(&c) = b.get(self.pos) {
            if c > b' ' || !matches!(c, b' ' | b'\n' | b'\r' | b'\t') {
                return;
            }
            self.pos += 1;
        }
    }

    /// The byte offset the reader is at.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// The next non-whitespace byte, not consumed.
    pub fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.bytes().get(self.pos).copied()
    }

    /// Succeeds if only whitespace is left.
    pub fn finish(&mut self) -> Result<(), JsonError> {
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(self.err()),
        }
    }

    fn eat(&mut self, c: u8) -> Result<(), JsonError> {
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.err())
        }
    }

    fn enter(&mut self) -> Result<(), JsonError> {
        self.depth += 1;
        if self.depth >= MAX_DEPTH {
            return Err(self.err());
        }
        Ok(())
    }

    /// Reads an object, calling `member` with each key and the reader positioned at
    /// its value; `member` must read (or [`Reader::skip`]) that value.
    pub fn object(
        &mut self,
        mut member: impl FnMut(&mut Self, Str<'a>) -> Result<(), JsonError>,
    ) -> Result<(), JsonError> {
        self.eat(b'{')?;
        self.enter()?;
        if self.peek() == Some(b'}') {
            self.pos += 1;
            self.depth -= 1;
            return Ok(());
        }
        let mut first = true;
        loop {
            if self.peek() != Some(b'"') {
                return Err(self.err());
            }
            let key = self.string()?;
            if std::mem::replace(&mut first, false) && is_raw_value_token(key) {
                return Err(self.err());
            }
            self.eat(b':')?;
            member(self, key)?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    self.depth -= 1;
                    return Ok(());
                }
                _ => return Err(self.err()),
            }
        }
    }

    /// Reads an array, calling `item` with the reader positioned at each element;
    /// `item` must read (or skip) it.
    pub fn array(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<(), JsonError>,
    ) -> Result<(), JsonError> {
        self.eat(b'[')?;
        self.enter()?;
        if self.peek() == Some(b']') {
            self.pos += 1;
            self.depth -= 1;
            return Ok(());
        }
        loop {
            item(self)?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    self.depth -= 1;
                    return Ok(());
                }
                _ => return Err(self.err()),
            }
        }
    }

    /// Reads a string.
    pub fn string(&mut self) -> Result<Str<'a>, JsonError> {
        self.eat(b'"')?;
        let start = self.pos - 1;
        let escaped = self.string_tail()?;
        // Both quotes are ASCII, so the slice is on char boundaries.
        let quoted = self.src.get(start..self.pos).ok_or(self.err())?;
        Ok(Str { quoted, escaped })
    }

    /// Consumes the rest of a string after its opening quote, through the closing one.
    /// Returns whether it had escapes.
    fn string_tail(&mut self) -> Result<bool, JsonError> {
        let b = self.bytes();
        let mut escaped = false;
        loop {
            self.pos = scan_plain(b, self.pos);
            match b.get(self.pos) {
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(escaped);
                }
                Some(b'\\') => {
                    escaped = true;
                    self.pos += 1;
                    match b.get(self.pos) {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                            self.pos += 1
                        }
                        Some(b'u') => {
                            self.pos += 1;
                            let unit = self.hex4()?;
                            // UTF-16 surrogates only in pairs, high then low (a lone
                            // one decodes to no text).
                            if (0xD800..0xDC00).contains(&unit) {
                                if b.get(self.pos..self.pos + 2) != Some(b"\\u") {
                                    return Err(self.err());
                                }
                                self.pos += 2;
                                if !(0xDC00..0xE000).contains(&self.hex4()?) {
                                    return Err(self.err());
                                }
                            } else if (0xDC00..0xE000).contains(&unit) {
                                return Err(self.err());
                            }
                        }
                        _ => return Err(self.err()),
                    }
                }
                // A control character, or the end of the text.
                _ => return Err(self.err()),
            }
        }
    }

    /// Four hex digits of a `\\u` escape.
    fn hex4(&mut self) -> Result<u16, JsonError> {
        let hex = self
            .src
            .get(self.pos..self.pos + 4)
            .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
            .ok_or(self.err())?;
        let unit = u16::from_str_radix(hex, 16).map_err(|_| self.err())?;
        self.pos += 4;
        Ok(unit)
    }

    /// Reads any value without looking at it, and returns its text.
    pub fn skip(&mut self) -> Result<&'a str, JsonError> {
        self.skip_ws();
        let start = self.pos;
        self.skip_value()?;
        self.src.get(start..self.pos).ok_or(self.err())
    }

    fn skip_value(&mut self) -> Result<(), JsonError> {
        // Containers iteratively: a bit per open container (1: object), so deep input
        // costs no stack.
        let mut open: u128 = 0;
        let mut level = 0usize;
        loop {
            // At a value.
            match self.peek() {
                Some(b'{') => {
                    self.pos += 1;
                    if self.depth + level + 1 >= MAX_DEPTH {
                        return Err(self.err());
                    }
                    if self.peek() == Some(b'}') {
                        self.pos += 1;
                    } else {
                        open = (open << 1) | 1;
                        level += 1;
                        self.key_colon(true)?;
                        continue;
                    }
                }
                Some(b'[') => {
                    self.pos += 1;
                    if self.depth + level + 1 >= MAX_DEPTH {
                        return Err(self.err());
                    }
                    if self.peek() == Some(b']') {
                        self.pos += 1;
                    } else {
                        open <<= 1;
                        level += 1;
                        continue;
                    }
                }
                Some(b'"') => {
                    self.pos += 1;
                    self.string_tail()?;
                }
                Some(b't') => self.literal(b"true")?,
                Some(b'f') => self.literal(b"false")?,
                Some(b'n') => self.literal(b"null")?,
                Some(b'-' | b'0'..=b'9') => self.number()?,
                _ => return Err(self.err()),
            }
            // After a value: close containers until one goes on.
            loop {
                if level == 0 {
                    return Ok(());
                }
                let in_object = open & 1 == 1;
                match self.peek() {
                    Some(b',') => {
                        self.pos += 1;
                        if in_object {
                            self.key_colon(false)?;
                        }
                        break;
                    }
                    Some(b'}') if in_object => {}
                    Some(b']') if !in_object => {}
                    _ => return Err(self.err()),
                }
                self.pos += 1;
                open >>= 1;
                level -= 1;
            }
        }
    }

    /// A member's key and colon, inside [`Reader::skip_value`]; `first`: the object's
    /// first member.
    fn key_colon(&mut self, first: bool) -> Result<(), JsonError> {
        if self.peek() != Some(b'"') {
            return Err(self.err());
        }
        let start = self.pos;
        self.pos += 1;
        let escaped = self.string_tail()?;
        if first {
            let quoted = self.src.get(start..self.pos).unwrap_or_default();
            if is_raw_value_token(Str { quoted, escaped }) {
                return Err(self.err());
            }
        }
        self.eat(b':')
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), JsonError> {
        if self.bytes().get(self.pos..self.pos + word.len()) == Some(word) {
            self.pos += word.len();
            Ok(())
        } else {
            Err(self.err())
        }
    }

    fn number(&mut self) -> Result<(), JsonError> {
        let b = self.bytes();
        let digits = |pos: &mut usize| {
            let start = *pos;
            while b.get(*pos).is_some_and(u8::is_ascii_digit) {
                *pos += 1;
            }
            *pos > start
        };
        let mut p = self.pos;
        if b.get(p) == Some(&b'-') {
            p += 1;
        }
        match b.get(p) {
            Some(b'0') => p += 1,
            Some(b'1'..=b'9') => {
                digits(&mut p);
            }
            _ => return Err(JsonError { at: p }),
        }
        if b.get(p) == Some(&b'.') {
            p += 1;
            if !digits(&mut p) {
                return Err(JsonError { at: p });
            }
        }
        let mut exponent = false;
        if let Some(b'e' | b'E') = b.get(p) {
            exponent = true;
            p += 1;
            if let Some(b'+' | b'-') = b.get(p) {
                p += 1;
            }
            if !digits(&mut p) {
                return Err(JsonError { at: p });
            }
        }
        // Like `serde_json`'s values: a number beyond the range of `f64` is an error.
        // Only an exponent or some 300 digits can get there. The range is `serde_json`'s
        // own: its (fast, not correctly rounded) parsing refuses some numbers just
        // below `f64::MAX` that `str::parse` rounds to it, e.g. `1.7976931348623158e308`.
        if exponent || p - self.pos > 300 {
            let text = self.src.get(self.pos..p).unwrap_or_default();
            if serde_json::from_str::<serde_json::Number>(text).is_err() {
                return Err(JsonError { at: self.pos });
            }
        }
        self.pos = p;
        Ok(())
    }
}

/// `serde_json` (with its `raw_value` feature, which the crate enables) reads an object
/// whose first key is this token not as an object: it parses the member's value, a
/// string, as JSON and takes that for the object (any other value is an error). So the
/// text would say one thing and a `Value` of it another: such an object is refused.
const RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";

fn is_raw_value_token(key: Str<'_>) -> bool {
    // Cheap for every other key: the token written plainly has this length, and with
    // escapes it is longer.
    key.raw().len() >= RAW_VALUE_TOKEN.len() && key.is(RAW_VALUE_TOKEN)
}

/// The position of the first byte at or after `pos` that ends a run of plain string
/// content: a quote, a backslash or a control character (or the end).
fn scan_plain(b: &[u8], mut pos: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // Eight bytes at a time: a lane is special if it is '"', '\\' or below 0x20.
    while let Some(chunk) = b.get(pos..pos + 8) {
        let mut lanes = [0u8; 8];
        lanes.copy_from_slice(chunk);
        let x = u64::from_le_bytes(lanes);
        let quote = x ^ (ONES * u64::from(b'"'));
        let backslash = x ^ (ONES * u64::from(b'\\'));
        let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
        // Bytes below 0x20 (lanes >= 0x80 are UTF-8 continuation/lead bytes, never
        // special, and excluded by `!x`).
        let control = x.wrapping_sub(ONES * 0x20) & !x & HIGHS;
        if zero(quote) | zero(backslash) | control != 0 {
            break;
        }
        pos += 8;
    }
    while let Some(&c) = b.get(pos) {
        if c == b'"' || c == b'\\' || c < 0x20 {
            break;
        }
        pos += 1;
    }
    pos
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use proptest::prelude::*;

    fn valid(s: &str) -> bool {
        let mut r = Reader::new(s);
        r.skip().is_ok() && r.finish().is_ok()
    }

    #[test]
    fn accepts_what_serde_json_accepts() {
        for s in [
            "{}",
            "[]",
            " {\"a\" : [1, -2.5e+3, 0, true, false, null, \"x\\u00e9\\n\"], \"b\":{}} ",
            "\"\"",
            "0",
            "-0.0E-0",
            "[[[[]]]]",
            "\"caf\u{e9} \u{1F600}\"",
            "\"\\ud83d\\ude00\"",
            "1e308",
            "123456789012345678901234567890",
        ] {
            assert!(valid(s), "{s}");
            assert!(serde_json::from_str::<serde_json::Value>(s).is_ok(), "{s}");
        }
    }

    #[test]
    fn rejects_what_serde_json_rejects() {
        for s in [
            "",
            "{",
            "[1,]",
            "{\"a\":1,}",
            "{\"a\" 1}",
            "{1:2}",
            "01",
            "1.",
            "-",
            "1e",
            "tru",
            "nul",
            "\"\\x\"",
            "\"\\u12\"",
            "\"a\u{1}b\"",
            "\"\\ud800\"",
            "\"\\ud800\\u0041\"",
            "\"\\udc00\"",
            "1e400",
            "-1e999",
            "[1] 2",
            "{\"a\":1}}",
            "[}",
            "{]",
            "'a'",
        ] {
            assert!(!valid(s), "{s:?}");
            assert!(
                serde_json::from_str::<serde_json::Value>(s).is_err(),
                "{s:?}"
            );
        }
    }

    #[test]
    fn numbers_near_the_range_of_f64_are_read_as_serde_json_reads_them() {
        // Found by fuzzing (fuzz/regressions/json/): `str::parse` rounds the first ones
        // down to `f64::MAX`, `serde_json` refuses them as out of range.
        for s in [
            "1.7976931348623158e308",
            "-1.7976931348623158e308",
            "17976931348623158e292",
            "[0,-0,123456789012345678901234567890,1.7976931348623158e308,4.9e-324,1e-400]",
            "1.7976931348623157e308",
            "1.8e308",
            "4.9e-324",
            "1e-400",
            "0e999999999999999999",
            &format!(
                "1797693134862315807937289714053034150799{}",
                "0".repeat(269)
            ),
            &format!(
                "1797693134862315807937289714053034150799{}",
                "0".repeat(270)
            ),
            &format!("0.{}1e-10", "0".repeat(400)),
        ] {
            let theirs = serde_json::from_str::<serde_json::Value>(s).is_ok();
            assert_eq!(valid(s), theirs, "{s}");
        }
    }

    #[test]
    fn an_object_serde_json_would_read_as_another_value_is_refused() {
        // Found by the json fuzz target (fuzz/regressions/json/): `serde_json` refuses
        // the first, and reads the second as the Patient in its string, not as what
        // the text says.
        for s in [
            r#"{"$serde_json::private::RawValue":[{"resource":null}]}"#,
            r#"{"$serde_json::private::RawValue":"{\"resourceType\":\"Patient\"}"}"#,
            r#"{"\u0024serde_json::private::RawValue":"1"}"#,
            r#"[{"a":{"$serde_json::private::RawValue":"1"}}]"#,
        ] {
            assert!(!valid(s), "{s}");
            let mut r = Reader::new(s);
            assert!(r.object(|r, _| r.skip().map(drop)).is_err(), "{s}");
        }
        let patient = serde_json::from_str::<serde_json::Value>(
            r#"{"$serde_json::private::RawValue":"{\"resourceType\":\"Patient\"}"}"#,
        )
        .unwrap();
        assert_eq!(patient["resourceType"], "Patient");
        // Anywhere but first it is an ordinary key, for serde_json too.
        for s in [
            r#"{"a":1,"$serde_json::private::RawValue":"1"}"#,
            r#"{"$serde_json::private::RawValuE":"1"}"#,
        ] {
            assert!(valid(s), "{s}");
            assert!(
                serde_json::from_str::<serde_json::Value>(s)
                    .unwrap()
                    .is_object()
            );
        }
    }

    #[test]
    fn depth_is_bounded_without_recursion() {
        // Exactly where serde_json stops, for arrays, objects and a mix, read or skipped.
        let arrays = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let objects = |n: usize| format!("{}1{}", "{\"a\":".repeat(n), "}".repeat(n));
        let mixed = |n: usize| format!("{{\"a\":{}{}}}", "[".repeat(n - 1), "]".repeat(n - 1));
        for depth in [MAX_DEPTH - 1, MAX_DEPTH] {
            for text in [arrays(depth), objects(depth), mixed(depth)] {
                let serde = serde_json::from_str::<serde_json::Value>(&text).is_ok();
                assert_eq!(valid(&text), serde, "depth {depth}: {text}");
                assert_eq!(serde, depth < MAX_DEPTH, "depth {depth}");
                let mut r = Reader::new(&text);
                let read = r.object(|r, _| r.skip().map(|_| ())).is_ok();
                if text.starts_with('{') {
                    assert_eq!(read, serde, "depth {depth} read as an object: {text}");
                }
            }
        }
        // Far past any stack: still an error, not a crash.
        assert!(!valid(&"[".repeat(1_000_000)));
        assert!(!valid(&"{\"a\":".repeat(100_000)));
    }

    #[test]
    fn objects_hand_out_raw_keys_and_value_text() {
        let src = r#"{"resourceType":"Patient","i\u0064":"p1","name":[{"family":"X"}]}"#;
        let mut r = Reader::new(src);
        let mut seen = Vec::new();
        r.object(|r, key| {
            let value = r.skip()?;
            seen.push((key.decode().unwrap().into_owned(), value.to_owned()));
            Ok(())
        })
        .unwrap();
        r.finish().unwrap();
        assert_eq!(
            seen,
            [
                ("resourceType".to_owned(), "\"Patient\"".to_owned()),
                ("id".to_owned(), "\"p1\"".to_owned()),
                ("name".to_owned(), "[{\"family\":\"X\"}]".to_owned()),
            ]
        );
        let s = Str {
            quoted: "\"i\\u0064\"",
            escaped: true,
        };
        assert!(s.is("id"));
        assert!(!s.is("i\\u0064"));
        // A lone surrogate does not decode.
        let lone = Str {
            quoted: "\"\\ud800\"",
            escaped: true,
        };
        assert_eq!(lone.decode(), None);
    }

    fn json_text() -> impl Strategy<Value = String> {
        let atoms = prop::sample::select(vec![
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            "\"a\"",
            "\"\\\"\"",
            "\"\\u00e9\"",
            "\"\\q\"",
            "1",
            "\"\\ud800\"",
            "\"\\udc00\"",
            "\"\\ud83d\\ude00\"",
            "1e400",
            "1e30",
            "-0.5e3",
            "01",
            "true",
            "nul",
            "null",
            " ",
            "\"é\"",
            "\"\u{7}\"",
            "\\",
        ]);
        prop::collection::vec(atoms, 0..40).prop_map(|parts| parts.concat())
    }

    fn value_text() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(serde_json::Value::from),
            ".*".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(5, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::from),
                prop::collection::vec((".*", inner), 0..8)
                    .prop_map(|kv| { serde_json::Value::Object(kv.into_iter().collect()) }),
            ]
        })
        .prop_map(|v| v.to_string())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// The reader and `serde_json` agree on what is JSON.
        #[test]
        fn agrees_with_serde_json_on_jsonish_text(s in json_text()) {
            let ours = valid(&s);
            let theirs = serde_json::from_str::<serde_json::Value>(&s).is_ok();
            prop_assert_eq!(ours, theirs, "{:?}", s);
        }

        /// Serialized values read back whole, and `skip` returns exactly their text.
        #[test]
        fn reads_serialized_values(s in value_text()) {
            let mut r = Reader::new(&s);
            prop_assert_eq!(r.skip().unwrap(), s.as_str());
            prop_assert!(r.finish().is_ok());
        }
    }
}
