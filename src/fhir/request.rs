//! The parsed FHIR request: what the client asked for, classified once.
//!
//! Stage 0 (`tenant`) calls [`parse_request`] on the path after the tenant segment.
//! Every later stage reads the resulting [`FhirRequest`]; nothing downstream looks at
//! the raw path again, and the upstream URL is rebuilt from these parts, so what was
//! checked is exactly what is forwarded.
//!
//! The model already names writes, batches and operations so they can be enabled
//! later without reshaping it; today the proxy forwards only the read-only
//! interactions (see `Interaction::is_read_only`).

use super::ResourceType;
use http::Method;

/// A FHIR logical id or version id: `[A-Za-z0-9\-\.]{1,64}`, not `.` or `..`.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct ResourceId(String);

impl ResourceId {
    pub fn parse(s: &str) -> Option<Self> {
        Self::is_valid(s).then(|| ResourceId(s.to_owned()))
    }

    /// Whether `s` is a valid id, without allocating.
    pub fn is_valid(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= 64
            && s != "."
            && s != ".."
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ResourceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An operation name without its `$`: `match`, `everything`, `validate`.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct OperationName(String);

impl OperationName {
    /// Parses `$name` (with the dollar). Names are `[A-Za-z][A-Za-z0-9_-]{0,63}`.
    pub fn parse(segment: &str) -> Option<Self> {
        let name = segment.strip_prefix('$')?;
        let mut bytes = name.bytes();
        let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphabetic());
        let rest_ok = bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        (first_ok && rest_ok && name.len() <= 64).then(|| OperationName(name.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Where an operation is invoked.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum OperationLevel {
    System,
    Type,
    Instance,
}

/// The FHIR RESTful interaction a request performs.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Interaction {
    /// `GET [type]/[id]`
    Read,
    /// `GET [type]/[id]/_history/[vid]`
    Vread,
    /// `GET [type]/[id]/_history`
    HistoryInstance,
    /// `GET [type]/_history`
    HistoryType,
    /// `GET /_history`
    HistorySystem,
    /// `GET [type]?...` or `POST [type]/_search`
    SearchType,
    /// `GET /?...` or `POST /_search`
    SearchSystem,
    /// `GET [CompartmentType]/[id]/[type]` or `GET [CompartmentType]/[id]/*`
    SearchCompartment,
    /// `GET /metadata`
    Capabilities,
    /// `GET /.well-known/smart-configuration`
    SmartConfiguration,
    /// `GET /.well-known/udap` (UDAP server metadata)
    UdapMetadata,
    /// `[GET|POST] [/type[/id]]/$op`
    Operation(OperationName, OperationLevel),
    /// `POST [type]`
    Create,
    /// `PUT [type]/[id]` (or conditional `PUT [type]?...`)
    Update,
    /// `PATCH [type]/[id]`
    Patch,
    /// `DELETE [type]/[id]` (or conditional `DELETE [type]?...`)
    Delete,
    /// `POST /` with a batch or transaction Bundle
    BatchOrTransaction,
}

impl Interaction {
    /// A short stable name for logs and error messages, as the FHIR spec names the
    /// interaction (`read`, `search-type`, `history-instance`, `operation`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Interaction::Read => "read",
            Interaction::Vread => "vread",
            Interaction::HistoryInstance => "history-instance",
            Interaction::HistoryType => "history-type",
            Interaction::HistorySystem => "history-system",
            Interaction::SearchType => "search-type",
            Interaction::SearchSystem => "search-system",
            Interaction::SearchCompartment => "search-compartment",
            Interaction::Capabilities => "capabilities",
            Interaction::SmartConfiguration => "smart-configuration",
            Interaction::UdapMetadata => "udap-metadata",
            Interaction::Operation(..) => "operation",
            Interaction::Create => "create",
            Interaction::Update => "update",
            Interaction::Patch => "patch",
            Interaction::Delete => "delete",
            Interaction::BatchOrTransaction => "batch",
        }
    }
}

/// A compartment named in the path: `Patient/p1/Observation` has owner `Patient`, id `p1`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct CompartmentRef {
    pub owner: ResourceType,
    pub id: ResourceId,
}

/// One request, classified.
#[derive(Clone, Debug)]
pub struct FhirRequest {
    pub method: Method,
    pub interaction: Interaction,
    /// The resource type the interaction targets. For a compartment search this is the
    /// searched type (`None` for `*`); for system-level interactions it is `None`.
    pub resource_type: Option<ResourceType>,
    /// The instance id for read, vread, instance history and instance operations.
    pub id: Option<ResourceId>,
    /// The version id for vread.
    pub version: Option<ResourceId>,
    /// The compartment of a compartment search (`Patient/p1/...`).
    pub compartment: Option<CompartmentRef>,
    /// Decoded parameters in request order: the query string first, then, for
    /// `POST _search`, the form body. Repeated names are kept as separate pairs.
    pub params: Vec<(String, String)>,
}
