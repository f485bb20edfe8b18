//! Matching a parsed request against a token's scopes.
//!
//! [`check_scopes`] decides whether the token's clinical scopes permit the
//! interaction at all and records, per context, which resource types are covered and
//! which search constraints must be enforced. It does not decide *which* resources
//! of those types are visible (patient compartment, user access): that is the
//! `authz` stage, which reads the [`ScopeGrant`].
//!
//! Fail-closed rules worth knowing:
//! - a `patient/` scope grants nothing when the token has no patient claim;
//! - scope constraints (`?category=...`) are honoured only where they can be enforced:
//!   on `search-type` and a compartment search of one type (added as search parameters,
//!   and every match re-checked) and on read, vread and instance history (evaluated on
//!   the returned record by `fhir::constraint`). Everywhere else (type and system
//!   history, `$match`, `$everything`, multi-type searches, writes) a constrained scope
//!   grants nothing.

use std::fmt;

use crate::fhir::{FhirRequest, Interaction, OperationLevel, ResourceType};
use crate::smart::{ContextSet, Permissions, ScopeContext, ScopeResource, ScopeSet, SmartScope};

/// What the verified token says beyond its scopes that matters for matching.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct TokenContext {
    /// The token carries a `patient` launch-context claim.
    pub has_patient: bool,
}

impl TokenContext {
    /// `patient/` scopes mean nothing without a patient to scope them to.
    fn allows(self, scope: &SmartScope) -> bool {
        scope.context != ScopeContext::Patient || self.has_patient
    }
}

/// The search parameters a later stage must add to a search so that it returns only
/// what the permitting scopes allow.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum SearchConstraint {
    /// Some permitting scope is unconstrained: nothing to add.
    None,
    /// A disjunction of conjunctions: a result is allowed if it matches every
    /// `name=value` pair of at least one inner list (one per permitting scope).
    AnyOf(Vec<Vec<(String, String)>>),
}

impl SearchConstraint {
    pub fn is_none(&self) -> bool {
        matches!(self, SearchConstraint::None)
    }

    fn of(scope: &SmartScope) -> SearchConstraint {
        if scope.is_constrained() {
            SearchConstraint::AnyOf(vec![scope.constraints.clone()])
        } else {
            SearchConstraint::None
        }
    }

    fn absorb(&mut self, scope: &SmartScope) {
        match self {
            SearchConstraint::None => {}
            SearchConstraint::AnyOf(_) if !scope.is_constrained() => *self = SearchConstraint::None,
            SearchConstraint::AnyOf(all) => {
                if !all.contains(&scope.constraints) {
                    all.push(scope.constraints.clone());
                }
            }
        }
    }

    fn merge(&mut self, other: &SearchConstraint) {
        match (&mut *self, other) {
            (SearchConstraint::None, _) => {}
            (_, SearchConstraint::None) => *self = SearchConstraint::None,
            (SearchConstraint::AnyOf(all), SearchConstraint::AnyOf(more)) => {
                for conj in more {
                    if !all.contains(conj) {
                        all.push(conj.clone());
                    }
                }
            }
        }
    }
}

/// The resource types whose results the permitting scopes of one context cover.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum TypeCoverage {
    /// Every type (a `*` scope permitted a multi-type request).
    All,
    /// The single type the request targets.
    One(ResourceType),
    /// For multi-type requests (`search-system` with `_type`, compartment `*`): the
    /// covered types, sorted and unique.
    Only(Vec<ResourceType>),
}

impl TypeCoverage {
    pub fn contains(&self, rt: ResourceType) -> bool {
        match self {
            TypeCoverage::All => true,
            TypeCoverage::One(t) => *t == rt,
            TypeCoverage::Only(ts) => ts.binary_search(&rt).is_ok(),
        }
    }

    fn of(scope: &SmartScope) -> TypeCoverage {
        match scope.resource {
            ScopeResource::Any => TypeCoverage::All,
            ScopeResource::Type(t) => TypeCoverage::Only(vec![t]),
        }
    }

    fn absorb(&mut self, scope: &SmartScope) {
        match (&mut *self, scope.resource) {
            (TypeCoverage::All, _) | (TypeCoverage::One(_), _) => {}
            (_, ScopeResource::Any) => *self = TypeCoverage::All,
            (TypeCoverage::Only(ts), ScopeResource::Type(t)) => {
                if let Err(at) = ts.binary_search(&t) {
                    ts.insert(at, t);
                }
            }
        }
    }
}

/// What one context's permitting scopes allow for the request.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct GrantArm {
    pub constraint: SearchConstraint,
    pub types: TypeCoverage,
}

/// Proof that the token's scopes permit a request, with what later stages must
/// still enforce. Indices refer to [`ScopeSet::resource_scopes`] of the set that
/// was checked.
#[must_use]
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ScopeGrant {
    required: Permissions,
    scopes: IndexSet,
    patient: Option<GrantArm>,
    user: Option<GrantArm>,
    system: Option<GrantArm>,
}

impl ScopeGrant {
    fn new(required: Permissions) -> ScopeGrant {
        ScopeGrant {
            required,
            scopes: IndexSet::default(),
            patient: None,
            user: None,
            system: None,
        }
    }

    /// Records a permitting scope. `single` is the target type of a single-type
    /// request; for multi-type requests coverage comes from the scope itself.
    fn record(&mut self, index: usize, scope: &SmartScope, single: Option<ResourceType>) {
        self.scopes.insert(index);
        let arm = match scope.context {
            ScopeContext::Patient => &mut self.patient,
            ScopeContext::User => &mut self.user,
            ScopeContext::System => &mut self.system,
        };
        match arm {
            None => {
                let types = match single {
                    Some(rt) => TypeCoverage::One(rt),
                    None => TypeCoverage::of(scope),
                };
                *arm = Some(GrantArm {
                    constraint: SearchConstraint::of(scope),
                    types,
                });
            }
            Some(arm) => {
                arm.constraint.absorb(scope);
                arm.types.absorb(scope);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.scopes.is_empty()
    }

    /// The permission the interaction needed (`r`, `s`, `c`, `u` or `d`).
    pub fn required(&self) -> Permissions {
        self.required
    }

    /// The contexts with at least one permitting scope. Never empty.
    pub fn contexts(&self) -> ContextSet {
        ScopeContext::ALL
            .into_iter()
            .filter(|c| self.arm(*c).is_some())
            .collect()
    }

    /// What the scopes of `context` allow, or `None` if none of them permit the request.
    pub fn arm(&self, context: ScopeContext) -> Option<&GrantArm> {
        match context {
            ScopeContext::Patient => self.patient.as_ref(),
            ScopeContext::User => self.user.as_ref(),
            ScopeContext::System => self.system.as_ref(),
        }
    }

    /// The constraint to enforce for results released under `context`.
    pub fn constraint_for(&self, context: ScopeContext) -> Option<&SearchConstraint> {
        self.arm(context).map(|a| &a.constraint)
    }

    /// All contexts' constraints merged: `None` if any context is unconstrained,
    /// else the union of every context's conjunctions. This loses which context a
    /// conjunction came from; prefer [`ScopeGrant::constraint_for`] when
    /// [`ScopeGrant::contexts`] has more than one member.
    pub fn search_constraint(&self) -> SearchConstraint {
        let mut arms = ScopeContext::ALL.into_iter().filter_map(|c| self.arm(c));
        let Some(first) = arms.next() else {
            return SearchConstraint::None;
        };
        let mut merged = first.constraint.clone();
        for arm in arms {
            merged.merge(&arm.constraint);
        }
        merged
    }

    /// True if results of type `rt` are covered, under `context` or (with `None`)
    /// under any context.
    pub fn covers_type(&self, context: Option<ScopeContext>, rt: ResourceType) -> bool {
        match context {
            Some(c) => self.arm(c).is_some_and(|a| a.types.contains(rt)),
            None => ScopeContext::ALL
                .into_iter()
                .any(|c| self.arm(c).is_some_and(|a| a.types.contains(rt))),
        }
    }

    /// Indices into [`ScopeSet::resource_scopes`] of the permitting scopes, ascending.
    pub fn scope_indices(&self) -> impl Iterator<Item = usize> + '_ {
        self.scopes.iter()
    }

    /// The permitting scopes, resolved against the set that was checked (for audit).
    pub fn scopes<'a>(&'a self, set: &'a ScopeSet) -> impl Iterator<Item = &'a SmartScope> + 'a {
        self.scopes
            .iter()
            .filter_map(|i| set.resource_scopes().get(i))
    }
}

/// A fixed bitset of scope indices; `ScopeSet` holds at most `MAX_RESOURCE_SCOPES`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
struct IndexSet([u64; 4]);

const _: () = assert!(crate::smart::MAX_RESOURCE_SCOPES <= 4 * 64);

impl IndexSet {
    fn insert(&mut self, i: usize) {
        if let Some(word) = self.0.get_mut(i / 64) {
            *word |= 1 << (i % 64);
        }
    }

    fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(w, bits)| {
            (0..64)
                .filter(move |b| bits & (1 << b) != 0)
                .map(move |b| w * 64 + b)
        })
    }
}

/// `Some(rt)` prints the type, `None` prints `*` (all types).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct TypeName(pub Option<ResourceType>);

impl fmt::Display for TypeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(rt) => f.write_str(rt.as_str()),
            None => f.write_str("*"),
        }
    }
}

/// Why the scopes do not permit a request. Mapped to 403 `insufficient_scope` (or,
/// for the request-shape variants, whatever the error layer decides) elsewhere.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum ScopeError {
    /// No usable scope grants the needed permission on the type.
    #[error("scope set does not permit `{interaction}` on `{resource_type}`")]
    Insufficient {
        interaction: &'static str,
        resource_type: TypeName,
        required: Permissions,
    },
    /// Only constrained scopes would permit it, and their constraints cannot be
    /// enforced for this interaction.
    #[error("scope constraints cannot be enforced for `{interaction}` on `{resource_type}`")]
    ConstraintUnenforceable {
        interaction: &'static str,
        resource_type: TypeName,
    },
    /// An operation other than type-level `$match` and `Patient/[id]/$everything`.
    #[error("operation `${operation}` is not permitted by scopes")]
    OperationNotPermitted {
        operation: String,
        level: OperationLevel,
    },
    #[error("batch and transaction requests are not permitted by scopes")]
    BatchNotPermitted,
    /// A `_type` parameter that is not a comma list of R4 types, or has a modifier.
    #[error("search parameter `{text}` does not name resource types")]
    InvalidTypeParameter { text: String },
    /// `metadata` and `.well-known/smart-configuration` are public and must not be
    /// scope-checked; reaching here is a pipeline bug.
    #[error("interaction `{interaction}` is not subject to scope checks")]
    NotApplicable { interaction: &'static str },
    /// The parsed request lacks a resource type its interaction requires.
    #[error("request for `{interaction}` has no resource type")]
    MalformedRequest { interaction: &'static str },
}

impl ScopeError {
    /// A stable id for logs, metrics and the audit record.
    pub fn reason(&self) -> &'static str {
        match self {
            ScopeError::Insufficient { .. } => "scope_insufficient",
            ScopeError::ConstraintUnenforceable { .. } => "scope_constraint_unenforceable",
            ScopeError::OperationNotPermitted { .. } | ScopeError::BatchNotPermitted => {
                "scope_operation_not_permitted"
            }
            ScopeError::InvalidTypeParameter { .. } => "scope_invalid_type_parameter",
            ScopeError::NotApplicable { .. } => "scope_not_applicable",
            ScopeError::MalformedRequest { .. } => "scope_malformed_request",
        }
    }
}

/// Decides whether `granted` permits `req`; see the module docs for the rules.
///
/// Required permission per interaction: read, vread, history-instance and
/// `Patient/[id]/$everything` need `r`; search-type, search-compartment,
/// history-type and type-level `$match` need `s`; create `c`; update and patch `u`;
/// delete `d`. search-system and history-system need `s` on every type: a `*`
/// scope, or every type listed in `_type`. A compartment search over `*` needs `s`
/// on at least one type; [`ScopeGrant::covers_type`] says which.
pub fn check_scopes(
    granted: &ScopeSet,
    req: &FhirRequest,
    token: TokenContext,
) -> Result<ScopeGrant, ScopeError> {
    let m = Matcher {
        set: granted,
        token,
        interaction: req.interaction.name(),
    };
    let target = || {
        req.resource_type.ok_or(ScopeError::MalformedRequest {
            interaction: m.interaction,
        })
    };
    match &req.interaction {
        Interaction::Read | Interaction::Vread | Interaction::HistoryInstance => {
            m.single(target()?, Permissions::READ, Constraints::Honour)
        }
        Interaction::SearchType => m.single(target()?, Permissions::SEARCH, Constraints::Honour),
        Interaction::SearchCompartment => match req.resource_type {
            Some(rt) => m.single(rt, Permissions::SEARCH, Constraints::Honour),
            None => m.any_type(),
        },
        Interaction::HistoryType => m.single(target()?, Permissions::SEARCH, Constraints::Refuse),
        Interaction::Create => m.single(target()?, Permissions::CREATE, Constraints::Refuse),
        Interaction::Update | Interaction::Patch => {
            m.single(target()?, Permissions::UPDATE, Constraints::Refuse)
        }
        Interaction::Delete => m.single(target()?, Permissions::DELETE, Constraints::Refuse),
        Interaction::SearchSystem | Interaction::HistorySystem => m.system(&req.params),
        Interaction::Operation(name, level) => match (name.as_str(), level) {
            ("match", OperationLevel::Type) => {
                m.single(target()?, Permissions::SEARCH, Constraints::Refuse)
            }
            ("everything", OperationLevel::Instance)
                if req.resource_type == Some(ResourceType::PATIENT) =>
            {
                m.single(
                    ResourceType::PATIENT,
                    Permissions::READ,
                    Constraints::Refuse,
                )
            }
            _ => Err(ScopeError::OperationNotPermitted {
                operation: name.as_str().to_owned(),
                level: *level,
            }),
        },
        Interaction::BatchOrTransaction => Err(ScopeError::BatchNotPermitted),
        Interaction::Capabilities | Interaction::SmartConfiguration | Interaction::UdapMetadata => {
            Err(ScopeError::NotApplicable {
                interaction: m.interaction,
            })
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Constraints {
    /// The interaction targets one type and its results can be checked: constraints
    /// become search parameters (one-type searches) and are evaluated on every returned
    /// record (all of them, reads included).
    Honour,
    /// Constraints cannot be enforced: a constrained scope grants nothing here.
    Refuse,
}

struct Matcher<'a> {
    set: &'a ScopeSet,
    token: TokenContext,
    interaction: &'static str,
}

impl Matcher<'_> {
    fn usable(&self) -> impl Iterator<Item = (usize, &SmartScope)> + '_ {
        let token = self.token;
        self.set
            .resource_scopes()
            .iter()
            .enumerate()
            .filter(move |(_, s)| token.allows(s))
    }

    fn single(
        &self,
        rt: ResourceType,
        perm: Permissions,
        constraints: Constraints,
    ) -> Result<ScopeGrant, ScopeError> {
        let mut grant = ScopeGrant::new(perm);
        let mut refused = false;
        for (i, scope) in self.usable().filter(|(_, s)| s.grants(rt, perm)) {
            if scope.is_constrained() && constraints == Constraints::Refuse {
                refused = true;
            } else {
                grant.record(i, scope, Some(rt));
            }
        }
        self.finish(grant, refused, Some(rt))
    }

    /// Compartment search over `*`: any unconstrained `s` scope contributes its type.
    fn any_type(&self) -> Result<ScopeGrant, ScopeError> {
        let mut grant = ScopeGrant::new(Permissions::SEARCH);
        let mut refused = false;
        for (i, scope) in self
            .usable()
            .filter(|(_, s)| s.permissions.contains(Permissions::SEARCH))
        {
            if scope.is_constrained() {
                refused = true;
            } else {
                grant.record(i, scope, None);
            }
        }
        self.finish(grant, refused, None)
    }

    /// System search or history: a `*` scope, or each `_type` entry covered.
    fn system(&self, params: &[(String, String)]) -> Result<ScopeGrant, ScopeError> {
        let mut grant = ScopeGrant::new(Permissions::SEARCH);
        let mut listed = false;
        for (name, value) in params {
            if name.starts_with("_type:") {
                return Err(ScopeError::InvalidTypeParameter {
                    text: format!("{name}={value}"),
                });
            }
            if name != "_type" {
                continue;
            }
            listed = true;
            for item in value.split(',') {
                let rt =
                    ResourceType::parse(item).ok_or_else(|| ScopeError::InvalidTypeParameter {
                        text: format!("{name}={value}"),
                    })?;
                self.cover_listed(&mut grant, rt)?;
            }
        }
        if listed {
            return Ok(grant);
        }
        // INVARIANT: without `_type` the server searches every type, so only `*` covers it.
        let mut refused = false;
        for (i, scope) in self.usable().filter(|(_, s)| {
            s.resource == ScopeResource::Any && s.permissions.contains(Permissions::SEARCH)
        }) {
            if scope.is_constrained() {
                refused = true;
            } else {
                grant.record(i, scope, None);
            }
        }
        self.finish(grant, refused, None)
    }

    fn cover_listed(&self, grant: &mut ScopeGrant, rt: ResourceType) -> Result<(), ScopeError> {
        let mut found = false;
        let mut refused = false;
        for (i, scope) in self
            .usable()
            .filter(|(_, s)| s.grants(rt, Permissions::SEARCH))
        {
            if scope.is_constrained() {
                refused = true;
            } else {
                found = true;
                grant.record(i, scope, None);
            }
        }
        match (found, refused) {
            (true, _) => Ok(()),
            (false, true) => Err(self.unenforceable(Some(rt))),
            (false, false) => Err(self.insufficient(Some(rt), Permissions::SEARCH)),
        }
    }

    fn finish(
        &self,
        grant: ScopeGrant,
        refused: bool,
        rt: Option<ResourceType>,
    ) -> Result<ScopeGrant, ScopeError> {
        if !grant.is_empty() {
            Ok(grant)
        } else if refused {
            Err(self.unenforceable(rt))
        } else {
            Err(self.insufficient(rt, grant.required))
        }
    }

    fn insufficient(&self, rt: Option<ResourceType>, required: Permissions) -> ScopeError {
        ScopeError::Insufficient {
            interaction: self.interaction,
            resource_type: TypeName(rt),
            required,
        }
    }

    fn unenforceable(&self, rt: Option<ResourceType>) -> ScopeError {
        ScopeError::ConstraintUnenforceable {
            interaction: self.interaction,
            resource_type: TypeName(rt),
        }
    }
}

impl ScopeSet {
    /// The scopes on `rt` (or `*`) whose permissions include all of `perm`, optionally
    /// only those of one context. Raw: it includes constrained scopes and ignores the
    /// token's patient claim; use [`check_scopes`] for decisions.
    pub fn covers(
        &self,
        context: Option<ScopeContext>,
        rt: ResourceType,
        perm: Permissions,
    ) -> impl Iterator<Item = &SmartScope> + '_ {
        self.resource_scopes()
            .iter()
            .filter(move |s| context.is_none_or(|c| s.context == c) && s.grants(rt, perm))
    }

    /// The scopes under which resources of type `rt` may be released as a side result
    /// (an `_include`d resource, an `$everything` entry): usable scopes on `rt` or `*`
    /// with `r` or `s`. Constrained scopes are included: a caller releasing a resource
    /// under one of them must evaluate its constraints on that resource
    /// (`fhir::constraint`) and let it count only if all of them match.
    pub fn read_scopes(
        &self,
        rt: ResourceType,
        token: TokenContext,
    ) -> impl Iterator<Item = &SmartScope> + '_ {
        self.resource_scopes().iter().filter(move |s| {
            token.allows(s)
                && s.resource.matches(rt)
                && s.permissions
                    .intersects(Permissions::READ | Permissions::SEARCH)
        })
    }

    /// The contexts of [`ScopeSet::read_scopes`]. A context may be here only through
    /// constrained scopes, whose constraints the caller still has to evaluate.
    pub fn read_contexts(&self, rt: ResourceType, token: TokenContext) -> ContextSet {
        self.read_scopes(rt, token).map(|s| s.context).collect()
    }

    /// True if [`ScopeSet::read_contexts`] is not empty (constraints not evaluated).
    pub fn permits_type_read(&self, rt: ResourceType, token: TokenContext) -> bool {
        !self.read_contexts(rt, token).is_empty()
    }
}
