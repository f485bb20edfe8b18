//! The SMART App Launch scope grammar, v1 and v2.
//!
//! Part of the model below the stages: the token stage parses the `scope` claim with it
//! into the token's [`ScopeSet`], and the scope stage (`scope`) matches requests
//! against that set.
//!
//! A clinical scope is `context/resource.permissions[?constraints]`:
//!
//! - context: `patient`, `user` or `system` (lowercase, exactly);
//! - resource: `*` or an R4 resource type, case-sensitive;
//! - permissions: v1 `read` (= `rs`), `write` (= `cud`) or `*` (= `cruds`), or v2 a
//!   non-empty subset of `cruds` written in that order, each letter at most once;
//! - constraints (v2 only): `&`-separated, percent-encoded `name=value` search
//!   parameters that narrow what the scope grants.
//!
//! Parsing a scope set never fails as a whole. A string that looks like a clinical
//! scope (it starts with a context prefix) but breaks any rule above grants nothing
//! and is kept in [`ScopeSet::rejected`] for audit; anything else (`openid`,
//! `fhirUser`, `launch/patient`, `offline_access`, ...) is kept verbatim in
//! [`ScopeSet::other`]. Only [`ScopeSet::resource_scopes`] ever grant access.

use std::fmt;

use crate::fhir::ResourceType;

/// At most this many resource scopes are kept per token; further ones are rejected
/// with [`RejectReason::TooMany`] (fail closed). Real tokens carry far fewer, and the
/// bound lets a `ScopeGrant` (module `scope`) record its scopes without allocating.
pub const MAX_RESOURCE_SCOPES: usize = 256;

/// On whose behalf a scope grants access: the `patient/`, `user/` or `system/` prefix.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum ScopeContext {
    Patient,
    User,
    System,
}

impl ScopeContext {
    pub const ALL: [ScopeContext; 3] = [
        ScopeContext::Patient,
        ScopeContext::User,
        ScopeContext::System,
    ];

    /// The prefix without its slash: `patient`, `user`, `system`.
    pub fn as_str(self) -> &'static str {
        match self {
            ScopeContext::Patient => "patient",
            ScopeContext::User => "user",
            ScopeContext::System => "system",
        }
    }

    fn from_prefix(prefix: &str) -> Option<Self> {
        match prefix {
            "patient" => Some(ScopeContext::Patient),
            "user" => Some(ScopeContext::User),
            "system" => Some(ScopeContext::System),
            _ => None,
        }
    }

    const fn bit(self) -> u8 {
        match self {
            ScopeContext::Patient => 1,
            ScopeContext::User => 2,
            ScopeContext::System => 4,
        }
    }
}

impl fmt::Display for ScopeContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of [`ScopeContext`]s, e.g. the contexts whose scopes permit a request.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ContextSet(u8);

impl ContextSet {
    pub const EMPTY: ContextSet = ContextSet(0);

    pub const fn contains(self, context: ScopeContext) -> bool {
        self.0 & context.bit() != 0
    }

    #[must_use]
    pub const fn with(self, context: ScopeContext) -> Self {
        ContextSet(self.0 | context.bit())
    }

    pub fn insert(&mut self, context: ScopeContext) {
        self.0 |= context.bit();
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub const fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    /// The contexts in `patient`, `user`, `system` order.
    pub fn iter(self) -> impl Iterator<Item = ScopeContext> {
        ScopeContext::ALL
            .into_iter()
            .filter(move |c| self.contains(*c))
    }
}

impl fmt::Debug for ContextSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl FromIterator<ScopeContext> for ContextSet {
    fn from_iter<I: IntoIterator<Item = ScopeContext>>(iter: I) -> Self {
        iter.into_iter().fold(ContextSet::EMPTY, ContextSet::with)
    }
}

/// A set of the SMART v2 permissions `c r u d s`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Permissions(u8);

impl Permissions {
    pub const NONE: Permissions = Permissions(0);
    pub const CREATE: Permissions = Permissions(1);
    pub const READ: Permissions = Permissions(1 << 1);
    pub const UPDATE: Permissions = Permissions(1 << 2);
    pub const DELETE: Permissions = Permissions(1 << 3);
    pub const SEARCH: Permissions = Permissions(1 << 4);
    pub const ALL: Permissions = Permissions(0b1_1111);

    /// The letters in their canonical (and only accepted) order.
    const LETTERS: [(u8, Permissions); 5] = [
        (b'c', Permissions::CREATE),
        (b'r', Permissions::READ),
        (b'u', Permissions::UPDATE),
        (b'd', Permissions::DELETE),
        (b's', Permissions::SEARCH),
    ];

    /// True if every permission in `other` is in `self`.
    pub const fn contains(self, other: Permissions) -> bool {
        self.0 & other.0 == other.0
    }

    /// True if `self` and `other` share at least one permission.
    pub const fn intersects(self, other: Permissions) -> bool {
        self.0 & other.0 != 0
    }

    #[must_use]
    pub const fn union(self, other: Permissions) -> Permissions {
        Permissions(self.0 | other.0)
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Parses v2 permissions: a non-empty subset of `cruds`, in that order, no
    /// repeats. `rs`, `cud`, `cruds`, `s` are accepted; `sr`, `rr`, `R`, `` are not.
    pub fn parse_v2(s: &str) -> Option<Permissions> {
        let mut next = 0; // index into LETTERS the next letter may start from
        let mut out = Permissions::NONE;
        for b in s.bytes() {
            let offset = Self::LETTERS
                .get(next..)?
                .iter()
                .position(|(letter, _)| *letter == b)?;
            let (_, perm) = Self::LETTERS.get(next + offset)?;
            out = out.union(*perm);
            next += offset + 1;
        }
        (!out.is_empty()).then_some(out)
    }

    /// Parses v1 permissions: `read` (= `rs`), `write` (= `cud`), `*` (= `cruds`).
    pub fn parse_v1(s: &str) -> Option<Permissions> {
        match s {
            "read" => Some(Permissions::READ.union(Permissions::SEARCH)),
            "write" => Some(
                Permissions::CREATE
                    .union(Permissions::UPDATE)
                    .union(Permissions::DELETE),
            ),
            "*" => Some(Permissions::ALL),
            _ => None,
        }
    }
}

impl std::ops::BitOr for Permissions {
    type Output = Permissions;
    fn bitor(self, rhs: Permissions) -> Permissions {
        self.union(rhs)
    }
}

impl fmt::Display for Permissions {
    /// The letters in `cruds` order, e.g. `rs`; the empty set prints nothing.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (letter, perm) in Self::LETTERS {
            if self.contains(perm) {
                fmt::Write::write_char(f, char::from(letter))?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Permissions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Permissions({self})")
    }
}

/// The resource part of a scope: `*` or one exact R4 resource type.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum ScopeResource {
    Any,
    Type(ResourceType),
}

impl ScopeResource {
    pub fn matches(self, rt: ResourceType) -> bool {
        match self {
            ScopeResource::Any => true,
            ScopeResource::Type(t) => t == rt,
        }
    }
}

impl fmt::Display for ScopeResource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScopeResource::Any => f.write_str("*"),
            ScopeResource::Type(t) => f.write_str(t.as_str()),
        }
    }
}

/// Which SMART App Launch version's permission syntax a scope used.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum ScopeVersion {
    /// `read`, `write`, `*`
    V1,
    /// `cruds` letters, optionally with `?` constraints
    V2,
}

/// One parsed clinical (resource) scope.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct SmartScope {
    pub context: ScopeContext,
    pub resource: ScopeResource,
    pub permissions: Permissions,
    /// Decoded `name=value` search parameters from the part after `?`, in order.
    /// Empty means unconstrained. Within one scope they are a conjunction.
    pub constraints: Vec<(String, String)>,
    pub version: ScopeVersion,
    /// The scope exactly as the token carried it, for audit.
    pub text: String,
}

impl SmartScope {
    /// Parses one clinical scope. A string without a context prefix (`openid`) is
    /// [`RejectReason::NotResourceScope`].
    pub fn parse(text: &str) -> Result<SmartScope, RejectReason> {
        match classify(text) {
            Classified::Resource(scope) => Ok(scope),
            Classified::Other => Err(RejectReason::NotResourceScope),
            Classified::Rejected(reason) => Err(reason),
        }
    }

    /// True if the scope carries `?` constraints.
    pub fn is_constrained(&self) -> bool {
        !self.constraints.is_empty()
    }

    /// True if the scope names `rt` (or `*`) with every permission in `perm`.
    /// Ignores context and constraints; see `check_scopes` for the full rules.
    pub fn grants(&self, rt: ResourceType, perm: Permissions) -> bool {
        self.resource.matches(rt) && self.permissions.contains(perm)
    }
}

impl fmt::Display for SmartScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Why a scope string that looked like a clinical scope grants nothing.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, thiserror::Error)]
pub enum RejectReason {
    #[error("not a clinical scope")]
    NotResourceScope,
    #[error("scope context must be `patient`, `user` or `system` in lowercase")]
    UnknownContext,
    #[error("scope has no `.permissions` part")]
    MissingPermissions,
    #[error("resource is neither `*` nor an R4 resource type (names are case-sensitive)")]
    UnknownResourceType,
    #[error("permissions are neither v1 (`read`, `write`, `*`) nor v2 (`cruds` letters in order)")]
    InvalidPermissions,
    #[error("v1 scopes cannot carry `?` constraints")]
    ConstraintsInV1,
    #[error("constraints are not well-formed percent-encoded `name=value` pairs")]
    MalformedConstraints,
    #[error("constraint parameter is not allowed in a scope")]
    ConstraintNotAllowed,
    #[error("more than 256 resource scopes in one token")]
    TooMany,
}

/// A scope string that grants nothing, with the reason, for audit and debugging.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct RejectedScope {
    pub text: String,
    pub reason: RejectReason,
}

/// The scopes of one token, classified once when the token is verified.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct ScopeSet {
    // INVARIANT: at most MAX_RESOURCE_SCOPES entries, and no two with the same text.
    scopes: Vec<SmartScope>,
    other: Vec<String>,
    rejected: Vec<RejectedScope>,
}

impl ScopeSet {
    /// Builds a set from a list of scopes, e.g. a JSON array `scp` claim. Each item
    /// is also split on ASCII whitespace, so `["openid profile"]` is two scopes.
    pub fn from_list<I, S>(items: I) -> ScopeSet
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut set = ScopeSet::default();
        for item in items {
            for text in item.as_ref().split_ascii_whitespace() {
                set.push(text);
            }
        }
        set
    }

    fn push(&mut self, text: &str) {
        match classify(text) {
            Classified::Resource(scope) => {
                if self.scopes.iter().any(|s| s.text == scope.text) {
                    // Duplicate: grants nothing more.
                } else if self.scopes.len() >= MAX_RESOURCE_SCOPES {
                    self.rejected.push(RejectedScope {
                        text: scope.text,
                        reason: RejectReason::TooMany,
                    });
                } else {
                    self.scopes.push(scope);
                }
            }
            Classified::Other => self.other.push(text.to_owned()),
            Classified::Rejected(reason) => self.rejected.push(RejectedScope {
                text: text.to_owned(),
                reason,
            }),
        }
    }

    /// The clinical scopes that grant access, in token order (duplicates removed).
    pub fn resource_scopes(&self) -> &[SmartScope] {
        &self.scopes
    }

    /// Scopes this module does not interpret (`openid`, `fhirUser`, `launch/patient`,
    /// `offline_access`, ...), verbatim and in token order.
    pub fn other(&self) -> &[String] {
        &self.other
    }

    /// True if `scope` is among [`ScopeSet::other`], e.g. `has_other("offline_access")`.
    pub fn has_other(&self, scope: &str) -> bool {
        self.other.iter().any(|s| s == scope)
    }

    /// Clinical-looking scopes that were refused and grant nothing.
    pub fn rejected(&self) -> &[RejectedScope] {
        &self.rejected
    }

    /// True if the set holds no clinical scope that could grant anything.
    pub fn is_empty(&self) -> bool {
        self.scopes.is_empty()
    }
}

/// Parses a space-separated `scope` claim or parameter. Never fails: entries that
/// are not valid clinical scopes grant nothing (see [`ScopeSet`]).
pub fn parse_scopes(space_separated: &str) -> ScopeSet {
    ScopeSet::from_list([space_separated])
}

enum Classified {
    Resource(SmartScope),
    Other,
    Rejected(RejectReason),
}

fn classify(text: &str) -> Classified {
    let Some((prefix, rest)) = text.split_once('/') else {
        return Classified::Other;
    };
    let Some(context) = ScopeContext::from_prefix(prefix) else {
        // `Patient/Observation.read` is a mistake worth reporting, not an unknown scope.
        let miscased = ScopeContext::ALL
            .iter()
            .any(|c| prefix.eq_ignore_ascii_case(c.as_str()));
        return if miscased {
            Classified::Rejected(RejectReason::UnknownContext)
        } else {
            Classified::Other
        };
    };
    match parse_body(rest) {
        Ok((resource, permissions, version, constraints)) => Classified::Resource(SmartScope {
            context,
            resource,
            permissions,
            constraints,
            version,
            text: text.to_owned(),
        }),
        Err(reason) => Classified::Rejected(reason),
    }
}

type Body = (
    ScopeResource,
    Permissions,
    ScopeVersion,
    Vec<(String, String)>,
);

/// Parses `resource.permissions[?constraints]`.
fn parse_body(rest: &str) -> Result<Body, RejectReason> {
    let (body, query) = match rest.split_once('?') {
        Some((body, query)) => (body, Some(query)),
        None => (rest, None),
    };
    let (resource, perms) = body
        .split_once('.')
        .ok_or(RejectReason::MissingPermissions)?;
    let resource = if resource == "*" {
        ScopeResource::Any
    } else {
        ScopeResource::Type(ResourceType::parse(resource).ok_or(RejectReason::UnknownResourceType)?)
    };
    let (permissions, version) = if let Some(p) = Permissions::parse_v1(perms) {
        (p, ScopeVersion::V1)
    } else if let Some(p) = Permissions::parse_v2(perms) {
        (p, ScopeVersion::V2)
    } else {
        return Err(RejectReason::InvalidPermissions);
    };
    let constraints = match query {
        None => Vec::new(),
        Some(_) if version == ScopeVersion::V1 => return Err(RejectReason::ConstraintsInV1),
        Some(query) => parse_constraints(query)?,
    };
    Ok((resource, permissions, version, constraints))
}

/// Search-result parameters start with `_` and change what is returned rather than
/// filter it (`_include`, `_count`, `_elements`, ...). Only these filtering ones may
/// appear in a scope; adding any other `_` parameter could widen a response.
const ALLOWED_UNDERSCORE_PARAMS: [&str; 6] = [
    "_id",
    "_lastUpdated",
    "_profile",
    "_security",
    "_source",
    "_tag",
];

fn parse_constraints(query: &str) -> Result<Vec<(String, String)>, RejectReason> {
    if query.is_empty() {
        return Err(RejectReason::MalformedConstraints);
    }
    query
        .split('&')
        .map(|pair| {
            let (name, value) = pair
                .split_once('=')
                .ok_or(RejectReason::MalformedConstraints)?;
            let name = percent_decode(name).ok_or(RejectReason::MalformedConstraints)?;
            let value = percent_decode(value).ok_or(RejectReason::MalformedConstraints)?;
            // An empty value is ignored by FHIR servers, so it would not constrain.
            if name.is_empty() || value.is_empty() || value.chars().any(char::is_control) {
                return Err(RejectReason::MalformedConstraints);
            }
            if !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
            {
                return Err(RejectReason::MalformedConstraints);
            }
            if name.starts_with('_') {
                // Compare the base name, without a `:modifier`.
                let base = name.split(':').next().unwrap_or_default();
                if !ALLOWED_UNDERSCORE_PARAMS.contains(&base) {
                    return Err(RejectReason::ConstraintNotAllowed);
                }
            }
            Ok((name, value))
        })
        .collect()
}

/// Strict percent-decoding: every `%` must start a two-digit hex escape and the
/// result must be UTF-8. `+` stays a literal plus (this is not form encoding).
fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_owned());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hi = hex_value(*bytes.get(i + 1)?)?;
            let lo = hex_value(*bytes.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}
