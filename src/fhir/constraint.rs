//! Evaluating SMART scope constraints (`?category=...`) on a returned resource.
//!
//! A finer-grained scope such as
//! `patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory`
//! is enforced on one-type searches by adding its parameters to the upstream query
//! (stage 4). Everything that query cannot narrow -- a read, a vread, an instance
//! history, `_include`d, `_revinclude`d and `$everything` entries -- is checked here, on
//! the resource itself, when stage 5 decides what to release
//! (`authz::ReleaseCtx::release`). Search matches are checked again as well (defence
//! in depth).
//!
//! A parameter name is resolved through the official R4 SearchParameters
//! (`compartments/search-parameters-all.json`) to its FHIRPath expression. Only what a
//! plain element walk can evaluate is understood: member paths, choice casts
//! (`value as CodeableConcept`, `.as(T)`, `.ofType(T)`), `where(resolve() is T)` (the
//! reference must point to a `T`) and `where(element='literal')`. Supported parameter
//! types and value forms:
//!
//! - `token`: `code`, `system|code`, `|code`, `system|`, against Coding,
//!   CodeableConcept (every `coding`), Identifier (`system`/`value`), ContactPoint
//!   (`value`, plain `code` form only) and `code`/`string`/`boolean` primitives (plain
//!   `code` form only);
//! - `reference`: `Type/id` or `id`, matched against relative, versioned and local
//!   absolute references (the bases given) like compartment membership, for any type;
//! - `string`: case-insensitive prefix match; on HumanName and Address the usual parts
//!   (`family`, `given`, `prefix`, `suffix`, `text`, `line`, `city`, `district`,
//!   `state`, `postalCode`, `country`);
//! - `uri`: exact match.
//!
//! Comma-separated values are alternatives (OR); FHIR's `\,` `\|` `\$` `\\` escapes are
//! honoured. Modifiers (`:exact`, `:not`, `:missing`, `:text`, ...), chains, other
//! parameter types (date, number, quantity, composite, special) and expressions beyond
//! the above evaluate to [`Evaluation::Unsupported`], and an unsupported constraint
//! grants nothing (fail closed). Where the proxy's matching differs from a server's,
//! it is narrower, never wider: string matching is accent-sensitive (FHIR servers
//! usually ignore accents), codes are compared exactly.

use std::collections::HashMap;

use serde_json::Value;

use crate::fhir::ResourceType;

const SEARCH_PARAMETERS_ALL: &str = include_str!("../../compartments/search-parameters-all.json");

/// The result of evaluating one constraint on one resource.
#[must_use]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Evaluation {
    /// The resource satisfies the constraint.
    Match,
    /// The resource does not satisfy it (including: the element is absent).
    NoMatch,
    /// The proxy cannot decide: unknown parameter, modifier, unsupported type or
    /// expression. Treated like `NoMatch` by every caller: the scope does not grant.
    Unsupported,
}

impl Evaluation {
    fn of(known: Option<bool>) -> Evaluation {
        match known {
            Some(true) => Evaluation::Match,
            Some(false) => Evaluation::NoMatch,
            None => Evaluation::Unsupported,
        }
    }

    /// Disjunction: one `Match` decides; otherwise any `Unsupported` leaves it open.
    /// Empty is `NoMatch`.
    fn any(items: impl IntoIterator<Item = Evaluation>) -> Evaluation {
        let mut out = Evaluation::NoMatch;
        for e in items {
            match e {
                Evaluation::Match => return Evaluation::Match,
                Evaluation::Unsupported => out = Evaluation::Unsupported,
                Evaluation::NoMatch => {}
            }
        }
        out
    }

    /// Conjunction: one `NoMatch` decides; otherwise any `Unsupported` leaves it open.
    /// Empty is `Match`.
    fn all(items: impl IntoIterator<Item = Evaluation>) -> Evaluation {
        let mut out = Evaluation::Match;
        for e in items {
            match e {
                Evaluation::NoMatch => return Evaluation::NoMatch,
                Evaluation::Unsupported => out = Evaluation::Unsupported,
                Evaluation::Match => {}
            }
        }
        out
    }
}

/// Whether `resource` (of type `rt`) satisfies the search constraint `name=value`.
/// `bases` are the absolute bases whose references count as local (the upstream's and
/// the tenant's public base), as for compartment membership.
pub fn satisfies(
    index: &SearchParamIndex,
    rt: ResourceType,
    resource: &Value,
    name: &str,
    value: &str,
    bases: &[&str],
) -> Evaluation {
    // `name:modifier` and chains (`subject.name`, `subject:Patient.name`) are not
    // evaluated; `_has` and friends have no expression and fall out below.
    if name.contains([':', '.']) {
        return Evaluation::Unsupported;
    }
    let Some(param) = index.get(rt, name) else {
        return Evaluation::Unsupported;
    };
    if param.parts.is_empty() {
        return Evaluation::Unsupported;
    }
    let items = split_unescaped(value, ',');
    if items.iter().any(|i| i.is_empty()) {
        return Evaluation::Unsupported;
    }
    Evaluation::any(
        items
            .into_iter()
            .map(|item| param.evaluate(resource, item, bases)),
    )
}

/// Whether `resource` satisfies every `name=value` pair of one scope (a conjunction;
/// an unconstrained scope, `[]`, is a `Match`).
pub fn satisfies_all(
    index: &SearchParamIndex,
    rt: ResourceType,
    resource: &Value,
    constraints: &[(String, String)],
    bases: &[&str],
) -> Evaluation {
    Evaluation::all(
        constraints
            .iter()
            .map(|(name, value)| satisfies(index, rt, resource, name, value, bases)),
    )
}

/// The R4 SearchParameters by (resource type, code), compiled for evaluation.
#[derive(Debug, Default)]
pub struct SearchParamIndex {
    /// Type -> code -> parameter: nested so a lookup by `&str` allocates nothing.
    by_type: HashMap<ResourceType, HashMap<String, Param>>,
    /// Parameters on `Resource`/`DomainResource` (`_id`, `_tag`, `_profile`, ...),
    /// which every type has.
    common: HashMap<String, Param>,
}

impl SearchParamIndex {
    /// The shipped `compartments/search-parameters-all.json`. Fails only if that file
    /// is broken, which a unit test rules out.
    pub fn official() -> Result<Self, String> {
        let v: Value = serde_json::from_str(SEARCH_PARAMETERS_ALL)
            .map_err(|e| format!("compartments/search-parameters-all.json: {e}"))?;
        Self::from_json(&v)
    }

    /// Builds the index from a JSON array of SearchParameters (`code`, `base`, `type`,
    /// `expression`; other keys are ignored).
    pub fn from_json(search_parameters: &Value) -> Result<Self, String> {
        let list = search_parameters
            .as_array()
            .ok_or("search parameters: not a JSON array")?;
        let mut index = SearchParamIndex::default();
        for sp in list {
            let code = sp
                .get("code")
                .and_then(Value::as_str)
                .ok_or("search parameter without `code`")?;
            let kind = Kind::parse(sp.get("type").and_then(Value::as_str).unwrap_or(""));
            let expression = sp.get("expression").and_then(Value::as_str).unwrap_or("");
            for base in sp
                .get("base")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                let param = Param::compile(kind, base, expression);
                if base == "Resource" || base == "DomainResource" {
                    index.common.insert(code.to_owned(), param);
                } else {
                    let rt = ResourceType::parse(base).ok_or_else(|| {
                        format!("search parameter `{code}`: unknown base `{base}`")
                    })?;
                    index
                        .by_type
                        .entry(rt)
                        .or_default()
                        .insert(code.to_owned(), param);
                }
            }
        }
        Ok(index)
    }

    /// True if `code` names a search parameter of `rt` (its own or a common one).
    pub fn knows(&self, rt: ResourceType, code: &str) -> bool {
        self.get(rt, code).is_some()
    }

    fn get(&self, rt: ResourceType, code: &str) -> Option<&Param> {
        self.by_type
            .get(&rt)
            .and_then(|params| params.get(code))
            .or_else(|| self.common.get(code))
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Token,
    Reference,
    String,
    Uri,
    /// date, number, quantity, composite, special: never evaluated.
    Other,
}

impl Kind {
    fn parse(s: &str) -> Kind {
        match s {
            "token" => Kind::Token,
            "reference" => Kind::Reference,
            "string" => Kind::String,
            "uri" => Kind::Uri,
            _ => Kind::Other,
        }
    }
}

/// One search parameter on one base type.
#[derive(Debug)]
struct Param {
    kind: Kind,
    /// The union members of the expression that belong to this base and were understood.
    parts: Vec<Part>,
    /// Some member of this base was not understood: a resource that matches none of
    /// `parts` may still match it, so the answer is `Unsupported`, not `NoMatch`.
    partial: bool,
}

/// One member of a FHIRPath union: a walk from the resource root.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Part {
    steps: Vec<Step>,
    /// `where(resolve() is T)` at the end: only references to a `T` count.
    target: Option<ResourceType>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// Descend into a JSON member (arrays flatten).
    Field(String),
    /// Keep only objects whose member `.0` is the string `.1`.
    WhereEq(String, String),
}

impl Param {
    fn compile(kind: Kind, base: &str, expression: &str) -> Param {
        let mut parts = Vec::new();
        let mut partial = false;
        if kind != Kind::Other {
            let own = format!("{base}.");
            for member in split_top(expression, |rest| rest.starts_with('|')) {
                let member = member.trim();
                match parse_member(member) {
                    Some((head, part)) if head == base => parts.push(part),
                    Some(_) => {}
                    None if member.trim_start_matches('(').starts_with(&own) => partial = true,
                    None => {}
                }
            }
        }
        Param {
            kind,
            parts,
            partial,
        }
    }

    /// Evaluates one (already comma-split, still escaped) value.
    fn evaluate(&self, resource: &Value, raw: &str, bases: &[&str]) -> Evaluation {
        let Some(query) = Query::parse(self.kind, raw) else {
            return Evaluation::Unsupported;
        };
        let mut elements = Vec::new();
        let mut out = Evaluation::any(self.parts.iter().map(|part| {
            elements.clear();
            collect(resource, &part.steps, &mut elements);
            Evaluation::any(
                elements
                    .iter()
                    .map(|el| Evaluation::of(query.matches(el, part, bases))),
            )
        }));
        if out == Evaluation::NoMatch && self.partial {
            out = Evaluation::Unsupported;
        }
        out
    }
}

/// One search value, parsed for the parameter's type.
#[derive(Debug, PartialEq, Eq)]
enum Query {
    Token(TokenValue),
    Reference(RefValue),
    /// Lowercased.
    String(String),
    Uri(String),
}

impl Query {
    fn parse(kind: Kind, raw: &str) -> Option<Query> {
        match kind {
            Kind::Token => TokenValue::parse(raw).map(Query::Token),
            Kind::Reference => RefValue::parse(raw).map(Query::Reference),
            Kind::String => unescape(raw)
                .filter(|q| !q.is_empty())
                .map(|q| Query::String(q.to_lowercase())),
            Kind::Uri => unescape(raw).filter(|q| !q.is_empty()).map(Query::Uri),
            Kind::Other => None,
        }
    }

    /// `Some(true|false)` if `el` decides the match, `None` if it cannot be evaluated.
    fn matches(&self, el: &Value, part: &Part, bases: &[&str]) -> Option<bool> {
        match self {
            Query::Token(q) => token_matches(el, q),
            Query::Reference(q) => reference_matches(el, q, part.target, bases),
            Query::String(q) => string_matches(el, q),
            Query::Uri(q) => match el {
                Value::String(s) => Some(s == q),
                _ => None,
            },
        }
    }
}

/// Every value reached by `steps` below `v`; arrays flatten at every level.
fn collect<'a>(v: &'a Value, steps: &[Step], out: &mut Vec<&'a Value>) {
    if let Value::Array(items) = v {
        items.iter().for_each(|i| collect(i, steps, out));
        return;
    }
    match steps.split_first() {
        None => out.push(v),
        Some((Step::Field(name), rest)) => {
            if let Some(child) = v.get(name.as_str()) {
                collect(child, rest, out);
            }
        }
        Some((Step::WhereEq(name, literal), rest)) => {
            if v.get(name.as_str()).and_then(Value::as_str) == Some(literal.as_str()) {
                collect(v, rest, out);
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// expressions
// ---------------------------------------------------------------------------------

/// Parses one union member into its head (`Observation`, `Resource`) and walk, or
/// `None` if it uses anything beyond the subset in the module docs.
fn parse_member(s: &str) -> Option<(&str, Part)> {
    let s = s.trim();
    if s.starts_with('(') {
        let close = closing_paren(s)?;
        let (head, mut part) = parse_member(s.get(1..close)?)?;
        let rest = s.get(close + 1..)?.trim();
        if !rest.is_empty() {
            for seg in split_top(rest.strip_prefix('.')?, |r| r.starts_with('.')) {
                apply_segment(&mut part, seg.trim())?;
            }
        }
        return Some((head, part));
    }
    // `as` binds looser than `.`: `A.b as T` is `(A.b) as T`.
    let members = split_top(s, |r| r.starts_with(" as "));
    if let [left, right] = members.as_slice() {
        let (head, mut part) = parse_member(left)?;
        cast(&mut part, right.trim_start().strip_prefix("as")?.trim())?;
        return Some((head, part));
    }
    if members.len() > 2 {
        return None;
    }
    let mut segs = split_top(s, |r| r.starts_with('.')).into_iter();
    let head = segs.next()?.trim();
    if !is_identifier(head) {
        return None;
    }
    let mut part = Part {
        steps: Vec::new(),
        target: None,
    };
    for seg in segs {
        apply_segment(&mut part, seg.trim())?;
    }
    (!part.steps.is_empty()).then_some((head, part))
}

fn apply_segment(part: &mut Part, seg: &str) -> Option<()> {
    if part.target.is_some() {
        // Nothing may follow `where(resolve() is T)`.
        return None;
    }
    if is_identifier(seg) {
        part.steps.push(Step::Field(seg.to_owned()));
        return Some(());
    }
    if let Some(t) = call_arg(seg, "as").or_else(|| call_arg(seg, "ofType")) {
        return cast(part, t);
    }
    let cond = call_arg(seg, "where")?;
    if let Some(t) = cond.strip_prefix("resolve() is ") {
        part.target = Some(ResourceType::parse(t.trim())?);
        return Some(());
    }
    let (name, literal) = cond.split_once('=')?;
    let name = name.trim();
    let literal = literal.trim().strip_prefix('\'')?.strip_suffix('\'')?;
    if !is_identifier(name) || literal.contains(['\'', '\\']) {
        return None;
    }
    part.steps
        .push(Step::WhereEq(name.to_owned(), literal.to_owned()));
    Some(())
}

/// `value` cast to `CodeableConcept` is the JSON member `valueCodeableConcept`.
fn cast(part: &mut Part, type_name: &str) -> Option<()> {
    if part.target.is_some() || !is_identifier(type_name) {
        return None;
    }
    let Some(Step::Field(name)) = part.steps.last_mut() else {
        return None;
    };
    let mut chars = type_name.chars();
    let first = chars.next()?;
    name.extend(first.to_uppercase());
    name.push_str(chars.as_str());
    Some(())
}

/// `name(arg)` -> `arg`.
fn call_arg<'a>(seg: &'a str, name: &str) -> Option<&'a str> {
    seg.strip_prefix(name)?
        .strip_prefix('(')?
        .strip_suffix(')')
        .map(str::trim)
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Splits `s` where `at(rest)` holds, outside parentheses and quotes. The separator's
/// first character is dropped; a multi-character separator keeps the rest (callers
/// strip it).
fn split_top(s: &str, at: impl Fn(&str) -> bool) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut quoted = false;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => depth = depth.saturating_sub(1),
            _ if !quoted && depth == 0 && s.get(i..).is_some_and(&at) => {
                out.push(s.get(start..i).unwrap_or_default());
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    out.push(s.get(start..).unwrap_or_default());
    out
}

/// The index of the `)` closing the `(` that `s` starts with.
fn closing_paren(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    let mut quoted = false;
    for (i, c) in s.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

// ---------------------------------------------------------------------------------
// values
// ---------------------------------------------------------------------------------

/// Splits on `sep` where it is not escaped with `\`; the pieces keep their escapes.
fn split_unescaped(s: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            out.push(s.get(start..i).unwrap_or_default());
            start = i + c.len_utf8();
        }
    }
    out.push(s.get(start..).unwrap_or_default());
    out
}

/// Removes FHIR search escapes (`\,` `\|` `\$` `\\`); any other escape is refused.
fn unescape(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next()? {
                e @ (',' | '|' | '$' | '\\') => out.push(e),
                _ => return None,
            }
        } else {
            out.push(c);
        }
    }
    Some(out)
}

/// A token search value.
#[derive(Debug, PartialEq, Eq)]
enum TokenValue {
    /// `code`: any system.
    Code(String),
    /// `system|code`
    SystemCode(String, String),
    /// `|code`: no system.
    NoSystem(String),
    /// `system|`: any code of the system.
    System(String),
}

impl TokenValue {
    fn parse(raw: &str) -> Option<TokenValue> {
        let pieces = split_unescaped(raw, '|');
        match pieces.as_slice() {
            [code] => {
                let code = unescape(code)?;
                (!code.is_empty()).then_some(TokenValue::Code(code))
            }
            [system, code] => match (unescape(system)?, unescape(code)?) {
                (s, c) if s.is_empty() && c.is_empty() => None,
                (s, c) if s.is_empty() => Some(TokenValue::NoSystem(c)),
                (s, c) if c.is_empty() => Some(TokenValue::System(s)),
                (s, c) => Some(TokenValue::SystemCode(s, c)),
            },
            _ => None,
        }
    }

    fn matches(&self, system: Option<&str>, code: Option<&str>) -> bool {
        match self {
            TokenValue::Code(c) => code == Some(c.as_str()),
            TokenValue::SystemCode(s, c) => system == Some(s.as_str()) && code == Some(c.as_str()),
            TokenValue::NoSystem(c) => system.is_none() && code == Some(c.as_str()),
            TokenValue::System(s) => system == Some(s.as_str()),
        }
    }
}

/// `ContactPoint.system` codes; an Identifier's system is an absolute URI instead.
const CONTACT_POINT_SYSTEMS: [&str; 7] = ["phone", "fax", "email", "pager", "url", "sms", "other"];

fn token_matches(el: &Value, q: &TokenValue) -> Option<bool> {
    match el {
        // code, string, id, uri primitives: their system is implicit, so only the
        // plain code form can be decided.
        Value::String(s) => match q {
            TokenValue::Code(c) => Some(s == c),
            _ => None,
        },
        Value::Bool(b) => match q {
            TokenValue::Code(c) => Some(c == if *b { "true" } else { "false" }),
            _ => None,
        },
        Value::Object(o) => {
            let str_of = |k: &str| o.get(k).and_then(Value::as_str);
            if let Some(codings) = o.get("coding") {
                // CodeableConcept: any of its codings.
                let mut any = false;
                let mut all_codings = Vec::new();
                collect(codings, &[], &mut all_codings);
                for coding in all_codings {
                    let sys = coding.get("system").and_then(Value::as_str);
                    let code = coding.get("code").and_then(Value::as_str);
                    any |= q.matches(sys, code);
                }
                Some(any)
            } else if o.contains_key("value") {
                let contact_point = o.contains_key("rank")
                    || str_of("system").is_some_and(|s| CONTACT_POINT_SYSTEMS.contains(&s));
                if contact_point {
                    match q {
                        TokenValue::Code(c) => Some(str_of("value") == Some(c.as_str())),
                        _ => None,
                    }
                } else {
                    // Identifier
                    Some(q.matches(str_of("system"), str_of("value")))
                }
            } else {
                // Coding; an object with none of system/code/value (a text-only
                // CodeableConcept) carries no token.
                Some(q.matches(str_of("system"), str_of("code")))
            }
        }
        _ => None,
    }
}

/// A reference search value: `Type/id` or `id`.
#[derive(Debug, PartialEq, Eq)]
enum RefValue {
    Typed(ResourceType, String),
    Id(String),
}

impl RefValue {
    fn parse(raw: &str) -> Option<RefValue> {
        let v = unescape(raw)?;
        // Absolute URLs, versioned and canonical values are not evaluated.
        if v.contains(['|', ':']) {
            return None;
        }
        let mut parts = v.split('/');
        let (first, second, third) = (parts.next()?, parts.next(), parts.next());
        match (second, third) {
            (None, _) if is_id(first) => Some(RefValue::Id(first.to_owned())),
            (Some(id), None) if is_id(id) => {
                Some(RefValue::Typed(ResourceType::parse(first)?, id.to_owned()))
            }
            _ => None,
        }
    }
}

fn is_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn reference_matches(
    el: &Value,
    q: &RefValue,
    target: Option<ResourceType>,
    bases: &[&str],
) -> Option<bool> {
    // canonical and uri elements (strings) are not references to records.
    let Value::Object(o) = el else {
        return None;
    };
    // Identifier-only (logical) references never match, like compartment membership.
    let Some(reference) = o.get("reference").and_then(Value::as_str) else {
        return Some(false);
    };
    let Some((rt, id)) = local_reference(reference, bases) else {
        return Some(false);
    };
    if target.is_some_and(|t| t != rt) {
        return Some(false);
    }
    Some(match q {
        RefValue::Typed(t, want) => *t == rt && id == want,
        RefValue::Id(want) => id == want,
    })
}

/// `Type/id` of a relative, versioned or local absolute reference (see
/// [`crate::fhir::parse_local_reference`]).
fn local_reference<'a>(reference: &'a str, bases: &[&str]) -> Option<(ResourceType, &'a str)> {
    crate::fhir::parse_local_reference(reference, bases).map(|l| (l.resource_type, l.id))
}

/// HumanName and Address parts a `string` search looks at.
const NAME_ADDRESS_PARTS: [&str; 11] = [
    "text",
    "family",
    "given",
    "prefix",
    "suffix",
    "line",
    "city",
    "district",
    "state",
    "postalCode",
    "country",
];

fn string_matches(el: &Value, lower_query: &str) -> Option<bool> {
    let starts = |s: &str| s.to_lowercase().starts_with(lower_query);
    match el {
        Value::String(s) => Some(starts(s)),
        Value::Object(o) => {
            let mut values = Vec::new();
            for key in NAME_ADDRESS_PARTS {
                if let Some(v) = o.get(key) {
                    collect(v, &[], &mut values);
                }
            }
            Some(values.iter().any(|v| v.as_str().is_some_and(starts)))
        }
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests;
