//! Stage 3: record-level authorization.
//!
//! Input: `TenantCtx` and the tenant's [`Checker`] (both written by stage 0),
//! `FhirRequest`, `VerifiedToken`, `ScopeGrant`. Output: a
//! [`Permit`] saying, per permitting scope context, which records the request may
//! reach (`patient/` -> the token patient's compartment; `user/` -> the `fhirUser`'s
//! compartment; `system/` -> every record of the granted types). Access is the union
//! over contexts. Requests that name a record's compartment in the path (compartment
//! search, `Patient/{id}/$everything`) are decided here; records that come back from
//! the upstream are checked against the same permit in the forwarding stage
//! ([`Permit::release`]).
//!
//! The checker is chosen per tenant as an enum (no dynamic dispatch on the hot path);
//! `Compartment` is the coarse-grained checker.

pub mod fga;
pub mod openfga;
pub mod roles;
pub mod write;

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode};

use crate::config::{AuthorizationConfig, TenantConfig};
use crate::fhir::constraint;
use crate::fhir::record::Record;
use crate::fhir::{CompartmentIndex, CompartmentRef, FhirRequest, Interaction, ResourceType};
use crate::pipeline::{Flow, Internal, Stage, ext};
use crate::scope::{ScopeGrant, TokenContext};
use crate::smart::ScopeContext;
use crate::tenant::tenant_of;
use crate::token::{FhirUser, VerifiedToken};

/// Compartment types a `fhirUser` can anchor `user/` access to.
const USER_COMPARTMENTS: [ResourceType; 3] = [
    ResourceType::PATIENT,
    ResourceType::PRACTITIONER,
    ResourceType::RELATED_PERSON,
];

/// The per-tenant record-level checker.
#[derive(Debug)]
pub enum Checker {
    Compartment(CompartmentChecker),
    /// `user/` and `system/` contexts decided by OpenFGA; `patient/` contexts as in
    /// `Compartment` (the same compartment rules, in `base`).
    OpenFga {
        base: CompartmentChecker,
        fga: fga::OpenFgaChecker,
    },
}

impl Checker {
    /// `http` is the control-plane client OpenFGA calls go through.
    pub fn for_tenant(
        cfg: &TenantConfig,
        index: &Arc<CompartmentIndex>,
        http: &reqwest::Client,
    ) -> Result<Checker, String> {
        let base = CompartmentChecker {
            index: Arc::clone(index),
            denied_status: cfg.authorization.denied_read_status(),
            public_types: cfg.authorization.public_types().into(),
        };
        Ok(match &cfg.authorization {
            AuthorizationConfig::Compartment { .. } => Checker::Compartment(base),
            AuthorizationConfig::OpenFga { openfga, .. } => Checker::OpenFga {
                base,
                fga: fga::OpenFgaChecker::new(http.clone(), openfga, &cfg.id)?,
            },
        })
    }

    fn base(&self) -> &CompartmentChecker {
        match self {
            Checker::Compartment(c) | Checker::OpenFga { base: c, .. } => c,
        }
    }

    /// The OpenFGA checker, for `openfga` tenants.
    pub fn fga(&self) -> Option<&fga::OpenFgaChecker> {
        match self {
            Checker::Compartment(_) => None,
            Checker::OpenFga { fga, .. } => Some(fga),
        }
    }

    /// A compartment checker over `index` that hides denied records with `denied_status`.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn for_test(index: Arc<CompartmentIndex>, denied_status: StatusCode) -> Checker {
        Checker::Compartment(CompartmentChecker {
            index,
            denied_status,
            public_types: Arc::from([]),
        })
    }

    #[cfg(test)]
    pub fn for_test_public(
        index: Arc<CompartmentIndex>,
        denied_status: StatusCode,
        public: &[&str],
    ) -> Checker {
        Checker::Compartment(CompartmentChecker {
            index,
            denied_status,
            public_types: public
                .iter()
                .filter_map(|t| ResourceType::parse(t))
                .collect(),
        })
    }

    pub fn index(&self) -> &CompartmentIndex {
        &self.base().index
    }

    fn denied_status(&self) -> StatusCode {
        self.base().denied_status
    }

    fn public_types(&self) -> Arc<[ResourceType]> {
        Arc::clone(&self.base().public_types)
    }
}

#[derive(Debug)]
pub struct CompartmentChecker {
    index: Arc<CompartmentIndex>,
    denied_status: StatusCode,
    /// Non-patient types `patient/` tokens may read without further check.
    public_types: Arc<[ResourceType]>,
}

/// How far one scope context reaches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reach {
    /// Every record of the granted types (`system/`).
    All,
    /// The records in one compartment.
    Compartment(CompartmentRef),
    /// Patient data of the patients OpenFGA lets this principal view (`openfga`
    /// tenants, `user/` and `system/` contexts); non-patient data wholesale.
    Fga(fga::Principal),
    /// Nothing (e.g. `user/` without a usable `fhirUser`).
    Nothing,
}

impl Reach {
    /// The reach of `context` for `token`, with the token's own `fhirUser`.
    pub fn of(context: ScopeContext, token: &VerifiedToken) -> Reach {
        Reach::with_user(context, token, token.fhir_user.as_ref())
    }

    /// As [`Reach::of`], with the `fhirUser` already resolved (a `PractitionerRole`
    /// becomes its Practitioner).
    pub fn with_user(
        context: ScopeContext,
        token: &VerifiedToken,
        user: Option<&FhirUser>,
    ) -> Reach {
        match context {
            ScopeContext::System => Reach::All,
            ScopeContext::Patient => match &token.patient {
                Some(id) => Reach::Compartment(CompartmentRef {
                    owner: ResourceType::PATIENT,
                    id: id.clone(),
                }),
                None => Reach::Nothing,
            },
            ScopeContext::User => match user {
                Some(u) if USER_COMPARTMENTS.contains(&u.resource_type) => {
                    Reach::Compartment(CompartmentRef {
                        owner: u.resource_type,
                        id: u.id.clone(),
                    })
                }
                _ => Reach::Nothing,
            },
        }
    }
}

impl Reach {
    /// The reach of `context` under a tenant's checker: in `openfga` tenants `user/`
    /// and `system/` act as OpenFGA principals.
    pub fn in_mode(
        context: ScopeContext,
        token: &VerifiedToken,
        user: Option<&FhirUser>,
        fga: bool,
    ) -> Reach {
        if fga && context != ScopeContext::Patient {
            return match fga::principal_of(context, token) {
                Some(p) => Reach::Fga(p),
                None => Reach::Nothing,
            };
        }
        Reach::with_user(context, token, user)
    }
}

/// Proof that a request may proceed, and what every returned record must satisfy.
#[must_use]
#[derive(Clone, Debug)]
pub struct Permit {
    /// One entry per context whose scopes permit the request.
    pub reaches: Vec<(ScopeContext, Reach)>,
    pub denied_status: StatusCode,
    pub token: TokenContext,
    /// Non-patient types `patient/` tokens may read wholesale (tenant setting).
    pub public_types: Arc<[ResourceType]>,
    /// The `fhirUser` that anchors `user/` scopes, resolved (a `PractitionerRole` in
    /// the token becomes the Practitioner it names).
    pub user: Option<FhirUser>,
    /// Whether the tenant decides `user/` and `system/` contexts with OpenFGA.
    pub fga: bool,
}

/// How far a compartment-bound context reaches into resources of one type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TypeReach {
    /// Patient data: only the records in the context's compartment.
    Compartment,
    /// Non-patient data the context may read wholesale (`user/`, or a public type).
    Whole,
    /// Non-patient data a `patient/` context may see only where its own released
    /// records reference it (`_include`d alongside them).
    IfReferenced,
}

/// The outcome of checking one returned record.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    Allowed(ScopeContext),
    /// Non-patient data a `patient/` context may see only if a record released in the
    /// same answer references it; never on its own.
    AllowedIfReferenced(ScopeContext),
    /// Its type is not covered by any usable scope.
    DeniedType,
    /// It lies outside every compartment the token reaches.
    DeniedRecord,
}

impl Permit {
    /// True if every record of the permitted types is reachable.
    pub fn is_unrestricted(&self) -> bool {
        self.reaches.iter().any(|(_, r)| *r == Reach::All)
    }

    /// How a compartment-bound `context` reaches resources of type `rt`.
    pub fn type_reach(
        &self,
        context: ScopeContext,
        rt: ResourceType,
        index: &CompartmentIndex,
    ) -> TypeReach {
        if !index.is_non_patient_data(rt) {
            TypeReach::Compartment
        } else if context != ScopeContext::Patient || self.public_types.contains(&rt) {
            TypeReach::Whole
        } else {
            TypeReach::IfReferenced
        }
    }

    /// True if a search of `rt` may go upstream unnarrowed: some permitting context
    /// reaches every record of that type (entries are still checked one by one).
    pub fn reaches_whole_type(&self, rt: ResourceType, index: &CompartmentIndex) -> bool {
        self.reaches.iter().any(|(context, reach)| match reach {
            Reach::All => true,
            Reach::Compartment(_) | Reach::Fga(_) => {
                self.type_reach(*context, rt, index) == TypeReach::Whole
            }
            Reach::Nothing => false,
        })
    }

    /// True if every record of type `rt` (`None`: any type) that a search permitted by
    /// `grant` matches, once the rewrite stage has narrowed it, is released: only then
    /// may a count the upstream makes over its matches be handed out (`Bundle.total`,
    /// `_summary=count`). Either some context reaches every record of the type, or the
    /// search is narrowed to the one compartment the permit reaches, on a parameter of
    /// that compartment's definition (the narrowing and the answer check then ask the
    /// same question). Either way the scopes of that context must put no constraint on
    /// the type, and OpenFGA narrowings never count (the multi-patient policy may drop
    /// a match of an allowed patient).
    pub fn releases_every_match(
        &self,
        grant: &ScopeGrant,
        rt: Option<ResourceType>,
        index: &CompartmentIndex,
    ) -> bool {
        let unconstrained = |context: ScopeContext| {
            matches!(
                grant.constraint_for(context),
                Some(crate::scope::SearchConstraint::None)
            )
        };
        let wholesale = self.reaches.iter().any(|(context, reach)| {
            let whole = match (reach, rt) {
                (Reach::All, _) => true,
                (Reach::Compartment(_) | Reach::Fga(_), Some(rt)) => {
                    self.type_reach(*context, rt, index) == TypeReach::Whole
                }
                _ => false,
            };
            whole && unconstrained(*context)
        });
        if wholesale {
            return true;
        }
        let Some(rt) = rt else { return false };
        if self.has_fga() {
            return false;
        }
        let mut compartments: Vec<&CompartmentRef> = self.compartments().collect();
        compartments.dedup();
        let [c] = compartments.as_slice() else {
            return false;
        };
        let narrowed = c.owner == rt || index.links_type(c.owner, rt);
        narrowed
            && self.reaches.iter().any(|(context, reach)| {
                matches!(reach, Reach::Compartment(rc) if rc == *c)
                    && self.type_reach(*context, rt, index) == TypeReach::Compartment
                    && unconstrained(*context)
            })
    }

    /// The compartment types whose records the permit reaches through a compartment:
    /// each compartment's owner, and Patient for OpenFGA principals (they reach the
    /// Patient compartments OpenFGA allows). May repeat.
    pub fn owner_types(&self) -> impl Iterator<Item = ResourceType> + '_ {
        self.reaches.iter().filter_map(|(_, r)| match r {
            Reach::Compartment(c) => Some(c.owner),
            Reach::Fga(_) => Some(ResourceType::PATIENT),
            Reach::All | Reach::Nothing => None,
        })
    }

    /// The compartments reachable (empty when unrestricted or nothing).
    pub fn compartments(&self) -> impl Iterator<Item = &CompartmentRef> {
        self.reaches.iter().filter_map(|(_, r)| match r {
            Reach::Compartment(c) => Some(c),
            _ => None,
        })
    }
}

/// Everything needed to decide on records that come back from the upstream.
pub struct ReleaseCtx<'a> {
    pub permit: &'a Permit,
    pub grant: &'a ScopeGrant,
    pub token: &'a VerifiedToken,
    pub index: &'a CompartmentIndex,
    /// Absolute bases whose references count as local (public and upstream).
    pub bases: [&'a str; 2],
    /// OpenFGA decisions about the patients of this answer's records (`openfga`
    /// tenants; `None` elsewhere, and then `Reach::Fga` releases nothing).
    pub fga: Option<&'a fga::FgaDecisions>,
}

impl ReleaseCtx<'_> {
    /// Decides whether a returned record may be released.
    ///
    /// `primary` records are what the request asked for (the read target, search
    /// matches); their types were checked by the scope stage, which the grant records.
    /// Other records (`_include`, `$everything`) need a usable `r`/`s` scope of their
    /// own type. Either way the record must satisfy the constraints of a scope of that
    /// context (`ReleaseCtx::constraints_hold`) and lie within the reach of a context
    /// that covers its type.
    pub fn release<R: Record + ?Sized>(
        &self,
        rt: ResourceType,
        resource: &R,
        primary: bool,
    ) -> Release {
        let side_contexts = self.token.scopes.read_contexts(rt, self.permit.token);
        let mut type_ok = false;
        let mut if_referenced = None;
        for context in ScopeContext::ALL {
            let covered = (primary && self.grant.covers_type(Some(context), rt))
                || side_contexts.contains(context);
            if !covered {
                continue;
            }
            type_ok = true;
            if !self.constraints_hold(context, rt, resource, primary) {
                continue;
            }
            let reach = Reach::in_mode(
                context,
                self.token,
                self.permit.user.as_ref(),
                self.permit.fga,
            );
            let inside = match reach {
                Reach::All => true,
                Reach::Fga(p) => match self.permit.type_reach(context, rt, self.index) {
                    TypeReach::Whole => true,
                    TypeReach::Compartment | TypeReach::IfReferenced => self.fga.is_some_and(|d| {
                        d.allows(
                            &p,
                            &self
                                .index
                                .owners(ResourceType::PATIENT, rt, resource, &self.bases),
                        )
                    }),
                },
                Reach::Compartment(c) => match self.permit.type_reach(context, rt, self.index) {
                    TypeReach::Compartment => self.index.contains(&c, rt, resource, &self.bases),
                    TypeReach::Whole => true,
                    TypeReach::IfReferenced => {
                        if_referenced.get_or_insert(context);
                        false
                    }
                },
                Reach::Nothing => false,
            };
            if inside {
                return Release::Allowed(context);
            }
        }
        if let Some(context) = if_referenced {
            return Release::AllowedIfReferenced(context);
        }
        if type_ok {
            Release::DeniedRecord
        } else {
            Release::DeniedType
        }
    }
}

impl ReleaseCtx<'_> {
    /// True if every record of type `rt` (`None`: any type) that a permitted search
    /// matches is released: some context that permitted the request reaches every
    /// record of the type and its scopes put no constraint on it. Only then may a
    /// count the upstream makes over all its matches be handed out (`Bundle.total`).
    pub fn releases_every_match(&self, rt: Option<ResourceType>) -> bool {
        self.permit.releases_every_match(self.grant, rt, self.index)
    }
}

impl ReleaseCtx<'_> {
    /// Whether `resource` satisfies the constraints of some scope of `context` that
    /// would release it: for a primary record a scope that permitted the request (its
    /// constraints were already added to a search's query; checked again here), or
    /// else a side-read scope of its type ([`crate::smart::ScopeSet::read_scopes`]).
    /// A scope counts if it is unconstrained or every one of its constraints is a
    /// `Match`; `NoMatch` and `Unsupported` grant nothing (fail closed).
    fn constraints_hold<R: Record + ?Sized>(
        &self,
        context: ScopeContext,
        rt: ResourceType,
        resource: &R,
        primary: bool,
    ) -> bool {
        let satisfied = |constraints: &[(String, String)]| {
            // An unconstrained scope needs nothing of the resource; a constrained one
            // its whole text, parsed (only here, and once per resource).
            if constraints.is_empty() {
                return true;
            }
            let Some(whole) = resource.value() else {
                return false;
            };
            let e = constraint::satisfies_all(
                self.index.search_params(),
                rt,
                &whole,
                constraints,
                &self.bases,
            );
            if e == constraint::Evaluation::Unsupported {
                tracing::debug!(
                    scope.context = %context,
                    fhir.resource_type = %rt,
                    "scope constraint cannot be evaluated; the scope grants nothing"
                );
            }
            e == constraint::Evaluation::Match
        };
        let by_grant = primary
            && self.grant.covers_type(Some(context), rt)
            && match self.grant.constraint_for(context) {
                None => false,
                Some(crate::scope::SearchConstraint::None) => true,
                Some(crate::scope::SearchConstraint::AnyOf(any)) => {
                    any.iter().any(|all| satisfied(all))
                }
            };
        by_grant
            || self
                .token
                .scopes
                .read_scopes(rt, self.permit.token)
                .filter(|s| s.context == context)
                .any(|s| satisfied(&s.constraints))
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthzError {
    /// The record exists or may exist, but the token may not see it. Rendered with the
    /// tenant's denied status (404 by default, so it looks like a missing record).
    #[error("resource not found")]
    Hidden { status: StatusCode },
    #[error("`{interaction}` is not supported by this proxy")]
    NotSupported { interaction: &'static str },
    #[error("`{resource_type}` resources are outside the compartments this token may access")]
    OutsideCompartment { resource_type: ResourceType },
    #[error("`{interaction}` cannot be narrowed to the records this token may access")]
    NotNarrowable { interaction: &'static str },
    #[error("scope constraints on `{resource_type}` cannot be combined into one search")]
    ConstraintNotNarrowable { resource_type: String },
    #[error("the token's `fhirUser` does not name a patient, practitioner or related person")]
    NoUserCompartment,
    /// A search parameter that could reveal records outside the token's reach by
    /// inference (chains, `_has`, `_filter`, ...), refused for compartment-bound tokens.
    #[error("search parameter `{name}` is not allowed for this token")]
    ParameterNotAllowed { name: String },
    /// A search parameter the upstream's CapabilityStatement does not declare for the
    /// type; a lenient upstream would silently ignore it (refused for restricted tokens).
    #[error("search parameter `{name}` is not supported for `{resource_type}` by this server")]
    UndeclaredParameter {
        name: String,
        resource_type: ResourceType,
    },
    /// OpenFGA could not decide (down, slow, erroring, or an answer whose completeness
    /// cannot be proven): fail closed.
    #[error("record-level authorization is unavailable; try again later")]
    FgaUnavailable { reason: &'static str },
    /// The principal may view more patients than a search can be narrowed to.
    #[error(
        "this token may access more than {max} patients; a search cannot be narrowed to them (search a patient's compartment instead)"
    )]
    TooManyPatients { max: usize },
    // ---- writes (`write`) ----
    /// A write body the proxy cannot check as the path says.
    #[error("invalid write body: {detail}")]
    WriteBody { detail: &'static str },
    /// A write body in a media type the proxy cannot check (XML, XML Patch).
    #[error("write bodies must be FHIR JSON (or a JSON Patch)")]
    WriteMediaType,
    /// The new content would lie outside every compartment the token may write.
    #[error(
        "this token may not write this `{resource_type}`: it would lie outside the records the token may write"
    )]
    WriteOutsideReach { resource_type: ResourceType },
    /// A reference the upstream would resolve by search (`Patient?identifier=...`).
    #[error("conditional references are not allowed for this token")]
    ConditionalReference,
    /// A JSON Patch that does not apply to the current version.
    #[error("the patch cannot be applied to the current version: {detail}")]
    PatchNotApplicable { detail: String },
    /// A FHIRPath Patch whose target element cannot be told from its path.
    #[error(
        "this fhirpath patch cannot be checked (each operation's path must name an element of the resource)"
    )]
    PatchNotCheckable,
    /// A FHIRPath Patch that changes an element deciding compartment membership.
    #[error("this token may not patch `{element}` with a fhirpath patch (use a json patch)")]
    PatchCompartmentElement { element: String },
    /// An `If-Match` naming a version the write check did not see.
    #[error("`If-Match` does not name the current version")]
    VersionUnchecked,
    // ---- end writes ----
}

impl AuthzError {
    pub fn status(&self) -> StatusCode {
        match self {
            AuthzError::Hidden { status } => *status,
            AuthzError::NotSupported { .. } => StatusCode::METHOD_NOT_ALLOWED,
            AuthzError::OutsideCompartment { .. } | AuthzError::NoUserCompartment => {
                StatusCode::FORBIDDEN
            }
            AuthzError::NotNarrowable { .. } | AuthzError::ConstraintNotNarrowable { .. } => {
                StatusCode::FORBIDDEN
            }
            AuthzError::ParameterNotAllowed { .. } | AuthzError::UndeclaredParameter { .. } => {
                StatusCode::BAD_REQUEST
            }
            AuthzError::FgaUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            AuthzError::TooManyPatients { .. } => StatusCode::FORBIDDEN,
            AuthzError::WriteBody { .. } => StatusCode::BAD_REQUEST,
            AuthzError::WriteMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            AuthzError::WriteOutsideReach { .. }
            | AuthzError::ConditionalReference
            | AuthzError::PatchCompartmentElement { .. } => StatusCode::FORBIDDEN,
            AuthzError::PatchNotApplicable { .. } | AuthzError::PatchNotCheckable => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            AuthzError::VersionUnchecked => StatusCode::PRECONDITION_FAILED,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            AuthzError::Hidden { .. } => "record_denied",
            AuthzError::NotSupported { .. } => "interaction_not_supported",
            AuthzError::OutsideCompartment { .. } => "outside_compartment",
            AuthzError::NotNarrowable { .. } => "search_not_narrowable",
            AuthzError::ConstraintNotNarrowable { .. } => "scope_constraint_not_narrowable",
            AuthzError::NoUserCompartment => "no_user_compartment",
            AuthzError::ParameterNotAllowed { .. } => "search_parameter_not_allowed",
            AuthzError::UndeclaredParameter { .. } => "search_parameter_unknown",
            AuthzError::FgaUnavailable { reason } => reason,
            AuthzError::TooManyPatients { .. } => "fga_too_many",
            AuthzError::WriteBody { .. } => "write_body_invalid",
            AuthzError::WriteMediaType => "write_media_type",
            AuthzError::WriteOutsideReach { .. } => "write_outside_reach",
            AuthzError::ConditionalReference => "write_conditional_reference",
            AuthzError::PatchNotApplicable { .. } => "patch_not_applicable",
            AuthzError::PatchNotCheckable => "patch_not_checkable",
            AuthzError::PatchCompartmentElement { .. } => "patch_compartment_element",
            AuthzError::VersionUnchecked => "write_version_unchecked",
        }
    }
}

/// The pure decision: may this request go upstream at all, and with which reach.
pub fn authorize(
    checker: &Checker,
    req: &FhirRequest,
    token: &VerifiedToken,
    grant: &ScopeGrant,
) -> Result<Permit, AuthzError> {
    authorize_as(checker, req, token, grant, token.fhir_user.clone())
}

/// As [`authorize`], with the `fhirUser` already resolved (see [`Permit::user`]).
pub fn authorize_as(
    checker: &Checker,
    req: &FhirRequest,
    token: &VerifiedToken,
    grant: &ScopeGrant,
    user: Option<FhirUser>,
) -> Result<Permit, AuthzError> {
    let scope_token = TokenContext {
        has_patient: token.patient.is_some(),
    };
    let fga = checker.fga().is_some();
    let reaches: Vec<(ScopeContext, Reach)> = grant
        .contexts()
        .iter()
        .map(|c| (c, Reach::in_mode(c, token, user.as_ref(), fga)))
        .collect();
    if reaches.iter().all(|(_, r)| *r == Reach::Nothing) {
        return Err(AuthzError::NoUserCompartment);
    }
    let permit = Permit {
        reaches,
        denied_status: checker.denied_status(),
        token: scope_token,
        public_types: checker.public_types(),
        user,
        fga,
    };
    // OpenFGA principals may reach any Patient compartment: the stage asks OpenFGA
    // about the one named in the path ([`fga_target`]) before anything goes upstream.
    let named_ok = |c: &CompartmentRef| {
        permit.is_unrestricted()
            || permit.compartments().any(|p| p == c)
            || (permit.has_fga() && c.owner == ResourceType::PATIENT)
    };
    match &req.interaction {
        // Single writes: the record checks of the new content and the current version
        // are the write stage's (`write::CheckWrite`), which runs next.
        Interaction::Create | Interaction::Update | Interaction::Patch | Interaction::Delete => {}
        Interaction::BatchOrTransaction => {
            return Err(AuthzError::NotSupported {
                interaction: req.interaction.name(),
            });
        }
        Interaction::SearchCompartment => {
            // The path names the compartment: it must be one the token reaches.
            let Some(c) = &req.compartment else {
                return Err(AuthzError::NotNarrowable {
                    interaction: req.interaction.name(),
                });
            };
            if !named_ok(c) {
                return Err(AuthzError::Hidden {
                    status: permit.denied_status,
                });
            }
        }
        // `Patient/$match` is allowed to every token its scopes permit: stage 5
        // (`forward::patient_match`) narrows the candidate searches of compartment-bound
        // tokens to their compartment, and releases only the candidates the permit
        // reaches (the answer check), with `count` and `total` computed after it.
        Interaction::Operation(op, _) if op.as_str() == "everything" => {
            if let (Some(rt), Some(id)) = (req.resource_type, &req.id) {
                let target = CompartmentRef {
                    owner: rt,
                    id: id.clone(),
                };
                if !named_ok(&target) {
                    return Err(AuthzError::Hidden {
                        status: permit.denied_status,
                    });
                }
            }
        }
        Interaction::SearchType | Interaction::HistoryType
            if !permit.is_unrestricted()
                && req.resource_type.is_some_and(|rt| {
                    !permit.reaches_whole_type(rt, checker.index())
                        && !permit
                            .owner_types()
                            .any(|owner| checker.index().links_type(owner, rt))
                }) =>
        {
            if let Some(rt) = req.resource_type {
                return Err(AuthzError::OutsideCompartment { resource_type: rt });
            }
        }
        Interaction::SearchSystem | Interaction::HistorySystem if !permit.is_unrestricted() => {
            return Err(AuthzError::NotNarrowable {
                interaction: req.interaction.name(),
            });
        }
        _ => {}
    }
    Ok(permit)
}

/// What stage 3 fails with: its own decisions, and the upstream's errors when a
/// `PractitionerRole` fhirUser is resolved.
#[derive(Debug, thiserror::Error)]
pub enum AuthorizeError {
    #[error(transparent)]
    Authz(#[from] AuthzError),
    #[error(transparent)]
    Upstream(#[from] crate::upstream::UpstreamError),
    #[error(transparent)]
    Internal(#[from] Internal),
}

/// The stage.
pub struct Authorize {
    roles: roles::RoleResolver,
}

impl Authorize {
    pub fn new(upstream: crate::upstream::Upstream) -> Self {
        Authorize {
            roles: roles::RoleResolver::new(upstream),
        }
    }
}

impl Stage for Authorize {
    type Error = AuthorizeError;

    async fn run(&self, req: &mut Request<Bytes>) -> Result<Flow, AuthorizeError> {
        let tenant = Arc::clone(&tenant_of(req)?.0);
        let checker = Arc::clone(ext::<Arc<Checker>>(req, "missing Checker")?);
        let token = ext::<Arc<VerifiedToken>>(req, "missing VerifiedToken")?;
        let grant = ext::<ScopeGrant>(req, "missing ScopeGrant")?;
        // Only `user/` scopes of compartment tenants look at the fhirUser (OpenFGA
        // tenants use `sub`); resolve a PractitionerRole only then.
        let user = match &token.fhir_user {
            Some(u)
                if u.resource_type == ResourceType::PRACTITIONER_ROLE
                    && grant.contexts().contains(ScopeContext::User)
                    && checker.fga().is_none() =>
            {
                self.roles.practitioner_of(&tenant, &u.id).await?
            }
            other => other.clone(),
        };
        let fhir = ext::<FhirRequest>(req, "missing FhirRequest")?;
        let permit = authorize_as(&checker, fhir, token, grant, user)?;
        if let (Some(fga), Some(target)) = (checker.fga(), fga_target(fhir, &permit))
            && !fga.can_view(&permit, target).await?
        {
            return Err(AuthzError::Hidden {
                status: permit.denied_status,
            }
            .into());
        }
        req.extensions_mut().insert(permit);
        Ok(Flow::Continue)
    }
}

/// The patient named in the path whose records an OpenFGA principal is about to
/// reach (`Patient/{id}/Observation`, `Patient/{id}/$everything`), when no other
/// context of the permit already reaches that compartment.
fn fga_target<'a>(req: &'a FhirRequest, permit: &Permit) -> Option<&'a str> {
    if !permit.has_fga() || permit.is_unrestricted() {
        return None;
    }
    let (owner, id) = match &req.interaction {
        Interaction::SearchCompartment => {
            let c = req.compartment.as_ref()?;
            (c.owner, &c.id)
        }
        Interaction::Operation(op, _) if op.as_str() == "everything" => {
            (req.resource_type?, req.id.as_ref()?)
        }
        _ => return None,
    };
    let reached = permit
        .compartments()
        .any(|c| c.owner == owner && c.id == *id);
    (owner == ResourceType::PATIENT && !reached).then_some(id.as_str())
}

#[cfg(test)]
mod tests;
