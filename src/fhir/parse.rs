//! Classifies a raw HTTP request into a [`FhirRequest`].
//!
//! Stage 0 (`tenant`) calls [`parse_request`] once per request with the method, the
//! raw (still percent-encoded) path after the tenant segment, the raw query and, for a
//! form-encoded `POST .../_search`, the body. Nothing is forwarded before this succeeds,
//! and later stages never look at the raw path again.
//!
//! Guarantees, deny by default:
//! - The path is plain ASCII from `[A-Za-z0-9-._$*/]`. Any `%` is refused (FHIR path
//!   segments never need percent-encoding), so encoded dots, slashes and double
//!   encodings cannot reach the upstream. Backslashes, control characters, non-ASCII,
//!   spaces, empty segments (including a trailing slash), `.`/`..` segments and paths
//!   with more than [`MAX_PATH_SEGMENTS`] segments are refused.
//! - Only the R4 RESTful shapes listed on [`parse_request`] are accepted; resource types
//!   are matched case-sensitively against the R4 list, ids and version ids against
//!   `[A-Za-z0-9-.]{1,64}`, operation names against `$[A-Za-z][A-Za-z0-9_-]{0,63}`.
//! - Parameters are decoded strictly: malformed percent-encoding, invalid UTF-8,
//!   control characters and empty names are refused instead of being repaired (unlike
//!   the lossy `form_urlencoded::parse`), so what later stages check is exactly what
//!   the client sent.
//!
//! Every failure is a [`RequestError`] with a stable [`reason`](RequestError::reason)
//! and an HTTP [`status`](RequestError::status): 405 for a known path shape with the
//! wrong method, 400 for everything else (including unknown shapes: the proxy refuses to
//! classify them, which says nothing about whether the upstream has such a resource).

use http::{Method, StatusCode};

use super::request::{
    CompartmentRef, FhirRequest, Interaction, OperationLevel, OperationName, ResourceId,
};
use super::resource_type::ResourceType;

/// Longest accepted path after the tenant segment, in bytes. The longest legitimate
/// shape (`/[type]/[id]/_history/[vid]`) is under 200 bytes.
pub const MAX_PATH_LEN: usize = 512;
/// Most segments in an accepted path (`[type]/[id]/_history/[vid]`).
pub const MAX_PATH_SEGMENTS: usize = 4;
/// Longest accepted raw query string, in bytes.
pub const MAX_QUERY_LEN: usize = 16 * 1024;
/// Longest accepted form body of a `POST _search`, in bytes. Larger than the query
/// limit because moving long searches into the body is the point of `POST _search`.
pub const MAX_FORM_BODY_LEN: usize = 64 * 1024;
/// Most parameters accepted, query and form body together.
pub const MAX_PARAMS: usize = 200;
/// Most characters of user input echoed back in an error message.
const MAX_ECHO_CHARS: usize = 64;

/// The resource types that own a compartment in R4.
const COMPARTMENT_OWNERS: [&str; 5] = [
    "Device",
    "Encounter",
    "Patient",
    "Practitioner",
    "RelatedPerson",
];

// `Allow` header values for 405 answers, one per path shape.
const ALLOW_ROOT: &str = "GET, HEAD, POST";
const ALLOW_READ_ONLY: &str = "GET, HEAD";
const ALLOW_SEARCH_POST: &str = "POST";
const ALLOW_OPERATION: &str = "GET, HEAD, POST";
const ALLOW_TYPE: &str = "GET, HEAD, POST, PUT, DELETE";
const ALLOW_INSTANCE: &str = "GET, HEAD, PUT, PATCH, DELETE";

/// Where a parameter came from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ParamSource {
    Query,
    FormBody,
}

impl std::fmt::Display for ParamSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ParamSource::Query => "query",
            ParamSource::FormBody => "form body",
        })
    }
}

/// Why a request could not be classified. User input in messages is truncated to
/// 64 characters and escaped to printable ASCII.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum RequestError {
    #[error("path is longer than {max} bytes")]
    PathTooLong { max: usize },
    #[error("path has more than {max} segments")]
    PathTooManySegments { max: usize },
    /// `.` or `..`, literal or percent-encoded (`%2e`, `.%2E`, ...).
    #[error("path contains the dot segment `{segment}`")]
    PathDotSegment { segment: String },
    /// `%2f`, `%5c` (any case) or a literal backslash, which some servers treat as a
    /// separator.
    #[error("path contains an encoded slash or a backslash `{found}`")]
    PathEncodedSlash { found: String },
    /// Any other `%` in the path: FHIR path segments are plain ASCII.
    #[error("path contains percent-encoding `{found}`")]
    PathPercentEncoded { found: String },
    /// `//` anywhere, or a trailing slash after a segment.
    #[error("path contains an empty segment")]
    PathEmptySegment,
    /// A control character, non-ASCII, space or other byte outside `[A-Za-z0-9-._$*/]`.
    #[error("path contains the character `{found}` which is not allowed")]
    PathInvalidCharacter { found: String },
    #[error("unknown resource type `{name}`")]
    UnknownResourceType { name: String },
    #[error("invalid resource id `{id}`")]
    InvalidId { id: String },
    #[error("invalid version id `{id}`")]
    InvalidVersionId { id: String },
    #[error("invalid operation name `{name}`")]
    InvalidOperationName { name: String },
    #[error("unsupported path `{path}`")]
    UnsupportedPath { path: String },
    /// A known path shape with a method it does not support; `allow` is the value for
    /// the `Allow` response header.
    #[error("method `{method}` is not allowed on this path, allowed: {allow}")]
    MethodNotAllowed { method: String, allow: &'static str },
    /// `PUT [type]` or `DELETE [type]` without any search parameter.
    #[error("conditional `{method}` needs search parameters")]
    MissingConditionalCriteria { method: &'static str },
    #[error("{origin} is longer than {max} bytes")]
    ParamsTooLong { origin: ParamSource, max: usize },
    #[error("more than {max} parameters")]
    TooManyParams { max: usize },
    /// Malformed percent-encoding or bytes that do not decode to UTF-8.
    #[error("parameter `{piece}` in the {origin} is not valid percent-encoded utf-8")]
    ParamInvalidEncoding { origin: ParamSource, piece: String },
    #[error("parameter `{piece}` in the {origin} contains a control character")]
    ParamControlCharacter { origin: ParamSource, piece: String },
    #[error("parameter `{piece}` in the {origin} has an empty name")]
    ParamEmptyName { origin: ParamSource, piece: String },
}

impl RequestError {
    /// A stable id for logs, metrics and the OperationOutcome diagnostics.
    pub fn reason(&self) -> &'static str {
        match self {
            RequestError::PathTooLong { .. } => "path_too_long",
            RequestError::PathTooManySegments { .. } => "path_too_many_segments",
            RequestError::PathDotSegment { .. } => "path_dot_segment",
            RequestError::PathEncodedSlash { .. } => "path_encoded_slash",
            RequestError::PathPercentEncoded { .. } => "path_percent_encoded",
            RequestError::PathEmptySegment => "path_empty_segment",
            RequestError::PathInvalidCharacter { .. } => "path_invalid_character",
            RequestError::UnknownResourceType { .. } => "unknown_resource_type",
            RequestError::InvalidId { .. } => "invalid_id",
            RequestError::InvalidVersionId { .. } => "invalid_version_id",
            RequestError::InvalidOperationName { .. } => "invalid_operation_name",
            RequestError::UnsupportedPath { .. } => "unsupported_path",
            RequestError::MethodNotAllowed { .. } => "method_not_allowed",
            RequestError::MissingConditionalCriteria { .. } => "conditional_criteria_missing",
            RequestError::ParamsTooLong { .. } => "params_too_long",
            RequestError::TooManyParams { .. } => "params_too_many",
            RequestError::ParamInvalidEncoding { .. } => "param_invalid_encoding",
            RequestError::ParamControlCharacter { .. } => "param_control_character",
            RequestError::ParamEmptyName { .. } => "param_empty_name",
        }
    }

    /// 405 for [`RequestError::MethodNotAllowed`], 400 for everything else.
    pub fn status(&self) -> StatusCode {
        match self {
            RequestError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// The `Allow` header value to send with a 405, `None` for other errors.
    pub fn allow(&self) -> Option<&'static str> {
        match self {
            RequestError::MethodNotAllowed { allow, .. } => Some(allow),
            _ => None,
        }
    }
}

/// Classifies one request.
///
/// - `path`: the raw path after the tenant segment: `""`, `"/"`, `"/Patient/p1"`.
/// - `raw_query`: the raw query string without `?`.
/// - `form_body`: the body of a form-encoded `POST`; read only when the path is a
///   `_search` (`/_search`, `/[type]/_search`) and ignored otherwise.
///
/// Accepted shapes (`HEAD` is classified like `GET`; `FhirRequest::method` keeps the
/// original method):
///
/// | method        | path                              | interaction                 |
/// |---------------|-----------------------------------|-----------------------------|
/// | GET           | `/metadata`                       | Capabilities                |
/// | GET           | `/.well-known/smart-configuration`| SmartConfiguration          |
/// | GET           | `/.well-known/udap`               | UdapMetadata                |
/// | GET           | `/` or `""`                       | SearchSystem                |
/// | POST          | `/` or `""`                       | BatchOrTransaction          |
/// | POST          | `/_search`                        | SearchSystem                |
/// | GET           | `/_history`                       | HistorySystem               |
/// | GET, POST     | `/$op`                            | Operation(System)           |
/// | GET           | `/[type]`                         | SearchType                  |
/// | POST          | `/[type]`                         | Create                      |
/// | PUT           | `/[type]?criteria`                | Update (conditional, no id) |
/// | DELETE        | `/[type]?criteria`                | Delete (conditional, no id) |
/// | POST          | `/[type]/_search`                 | SearchType                  |
/// | GET           | `/[type]/_history`                | HistoryType                 |
/// | GET, POST     | `/[type]/$op`                     | Operation(Type)             |
/// | GET           | `/[type]/[id]`                    | Read                        |
/// | PUT           | `/[type]/[id]`                    | Update                      |
/// | PATCH         | `/[type]/[id]`                    | Patch                       |
/// | DELETE        | `/[type]/[id]`                    | Delete                      |
/// | GET           | `/[type]/[id]/_history`           | HistoryInstance             |
/// | GET, POST     | `/[type]/[id]/$op`                | Operation(Instance)         |
/// | GET           | `/[Owner]/[id]/[type]` or `/*`    | SearchCompartment           |
/// | GET           | `/[type]/[id]/_history/[vid]`     | Vread                       |
///
/// Compartment owners are Patient, Encounter, RelatedPerson, Practitioner and Device.
/// `POST [Owner]/[id]/[type]/_search` is not accepted.
pub fn parse_request(
    method: &Method,
    path: &str,
    raw_query: Option<&str>,
    form_body: Option<&[u8]>,
) -> Result<FhirRequest, RequestError> {
    let segments = split_path(path)?;
    let shape = classify(method, path, segments.as_slice())?;

    let mut params = Vec::new();
    if let Some(query) = raw_query {
        if query.len() > MAX_QUERY_LEN {
            return Err(RequestError::ParamsTooLong {
                origin: ParamSource::Query,
                max: MAX_QUERY_LEN,
            });
        }
        parse_params(query.as_bytes(), ParamSource::Query, &mut params)?;
    }
    if shape.reads_form_body
        && let Some(body) = form_body
    {
        if body.len() > MAX_FORM_BODY_LEN {
            return Err(RequestError::ParamsTooLong {
                origin: ParamSource::FormBody,
                max: MAX_FORM_BODY_LEN,
            });
        }
        parse_params(body, ParamSource::FormBody, &mut params)?;
    }
    if let Some(method) = shape.needs_criteria
        && params.is_empty()
    {
        return Err(RequestError::MissingConditionalCriteria { method });
    }

    Ok(FhirRequest {
        method: method.clone(),
        interaction: shape.interaction,
        resource_type: shape.resource_type,
        id: shape.id,
        version: shape.version,
        compartment: shape.compartment,
        params,
    })
}

/// Up to [`MAX_PATH_SEGMENTS`] borrowed segments, without allocating.
struct Segments<'a> {
    items: [&'a str; MAX_PATH_SEGMENTS],
    len: usize,
}

impl<'a> Segments<'a> {
    fn as_slice(&self) -> &[&'a str] {
        self.items.get(..self.len).unwrap_or(&[])
    }
}

/// Validates the raw path and splits it into segments.
fn split_path(path: &str) -> Result<Segments<'_>, RequestError> {
    if path.len() > MAX_PATH_LEN {
        return Err(RequestError::PathTooLong { max: MAX_PATH_LEN });
    }
    check_path_bytes(path)?;

    let mut segments = Segments {
        items: [""; MAX_PATH_SEGMENTS],
        len: 0,
    };
    if path.is_empty() || path == "/" {
        return Ok(segments);
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(unsupported(path));
    };
    // Check every segment before counting so a dot segment is reported as such even
    // in an over-long path.
    let mut count = 0usize;
    for segment in rest.split('/') {
        if segment.is_empty() {
            return Err(RequestError::PathEmptySegment);
        }
        if segment == "." || segment == ".." {
            return Err(RequestError::PathDotSegment {
                segment: segment.to_owned(),
            });
        }
        if let Some(slot) = segments.items.get_mut(count) {
            *slot = segment;
        }
        count += 1;
    }
    if count > MAX_PATH_SEGMENTS {
        return Err(RequestError::PathTooManySegments {
            max: MAX_PATH_SEGMENTS,
        });
    }
    segments.len = count;
    Ok(segments)
}

/// Refuses any byte outside `[A-Za-z0-9-._$*/]`, naming the most specific problem.
fn check_path_bytes(path: &str) -> Result<(), RequestError> {
    let bytes = path.as_bytes();
    let mut has_percent = false;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'$' | b'*' | b'/' => {}
            b'%' => {
                has_percent = true;
                let hex = bytes.get(i + 1..i + 3);
                if hex
                    .is_some_and(|h| h.eq_ignore_ascii_case(b"2f") || h.eq_ignore_ascii_case(b"5c"))
                {
                    return Err(RequestError::PathEncodedSlash {
                        found: echo(path.get(i..i + 3).unwrap_or("%")),
                    });
                }
            }
            b'\\' => {
                return Err(RequestError::PathEncodedSlash {
                    found: "\\".to_owned(),
                });
            }
            _ => {
                // INVARIANT: every earlier byte is ASCII, so `i` is a char boundary.
                let found = path
                    .get(i..)
                    .and_then(|s| s.chars().next())
                    .unwrap_or(char::REPLACEMENT_CHARACTER);
                return Err(RequestError::PathInvalidCharacter {
                    found: echo(found.encode_utf8(&mut [0; 4])),
                });
            }
        }
    }
    if has_percent {
        // Name encoded dot segments specifically; any other `%` is refused as well.
        if let Some(segment) = path.split('/').find(|s| is_encoded_dot_segment(s)) {
            return Err(RequestError::PathDotSegment {
                segment: echo(segment),
            });
        }
        let at = path.find('%').unwrap_or(0);
        return Err(RequestError::PathPercentEncoded {
            found: echo(path.get(at..at + 3).unwrap_or("%")),
        });
    }
    Ok(())
}

/// `.` or `..` where each dot may be written `%2e` or `%2E`.
fn is_encoded_dot_segment(segment: &str) -> bool {
    let mut rest = segment.as_bytes();
    let mut dots = 0;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix(b".") {
            rest = r;
        } else if rest
            .get(..3)
            .is_some_and(|p| p.eq_ignore_ascii_case(b"%2e"))
        {
            rest = rest.get(3..).unwrap_or_default();
        } else {
            return false;
        }
        dots += 1;
        if dots > 2 {
            return false;
        }
    }
    dots > 0
}

/// The method as far as classification cares; `HEAD` is `Get`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Verb {
    Get,
    Post,
    Put,
    Patch,
    Delete,
    Other,
}

impl Verb {
    fn of(method: &Method) -> Self {
        match *method {
            Method::GET | Method::HEAD => Verb::Get,
            Method::POST => Verb::Post,
            Method::PUT => Verb::Put,
            Method::PATCH => Verb::Patch,
            Method::DELETE => Verb::Delete,
            _ => Verb::Other,
        }
    }
}

/// What the path and method say, before parameters are read.
struct Shape {
    interaction: Interaction,
    resource_type: Option<ResourceType>,
    id: Option<ResourceId>,
    version: Option<ResourceId>,
    compartment: Option<CompartmentRef>,
    reads_form_body: bool,
    /// `Some(method)` for conditional update/delete, which need parameters.
    needs_criteria: Option<&'static str>,
}

impl Shape {
    fn new(interaction: Interaction) -> Self {
        Shape {
            interaction,
            resource_type: None,
            id: None,
            version: None,
            compartment: None,
            reads_form_body: false,
            needs_criteria: None,
        }
    }
    fn of_type(interaction: Interaction, resource_type: ResourceType) -> Self {
        Shape {
            resource_type: Some(resource_type),
            ..Shape::new(interaction)
        }
    }
    fn of_instance(interaction: Interaction, resource_type: ResourceType, id: ResourceId) -> Self {
        Shape {
            id: Some(id),
            ..Shape::of_type(interaction, resource_type)
        }
    }
}

fn classify(method: &Method, path: &str, segments: &[&str]) -> Result<Shape, RequestError> {
    let verb = Verb::of(method);
    let not_allowed = |allow: &'static str| RequestError::MethodNotAllowed {
        method: echo(method.as_str()),
        allow,
    };
    let get_only = |shape: Shape| match verb {
        Verb::Get => Ok(shape),
        _ => Err(not_allowed(ALLOW_READ_ONLY)),
    };

    match *segments {
        [] => match verb {
            Verb::Get => Ok(Shape::new(Interaction::SearchSystem)),
            Verb::Post => Ok(Shape::new(Interaction::BatchOrTransaction)),
            _ => Err(not_allowed(ALLOW_ROOT)),
        },
        ["metadata"] => get_only(Shape::new(Interaction::Capabilities)),
        [".well-known", "smart-configuration"] => {
            get_only(Shape::new(Interaction::SmartConfiguration))
        }
        [".well-known", "udap"] => get_only(Shape::new(Interaction::UdapMetadata)),
        ["_history"] => get_only(Shape::new(Interaction::HistorySystem)),
        ["_search"] => match verb {
            Verb::Post => Ok(Shape {
                reads_form_body: true,
                ..Shape::new(Interaction::SearchSystem)
            }),
            _ => Err(not_allowed(ALLOW_SEARCH_POST)),
        },
        [op] if op.starts_with('$') => {
            let name = operation(op)?;
            operation_verb(verb, not_allowed)?;
            Ok(Shape::new(Interaction::Operation(
                name,
                OperationLevel::System,
            )))
        }
        [ty] => {
            let ty = resource_type(ty, path)?;
            match verb {
                Verb::Get => Ok(Shape::of_type(Interaction::SearchType, ty)),
                Verb::Post => Ok(Shape::of_type(Interaction::Create, ty)),
                Verb::Put => Ok(Shape {
                    needs_criteria: Some("PUT"),
                    ..Shape::of_type(Interaction::Update, ty)
                }),
                Verb::Delete => Ok(Shape {
                    needs_criteria: Some("DELETE"),
                    ..Shape::of_type(Interaction::Delete, ty)
                }),
                _ => Err(not_allowed(ALLOW_TYPE)),
            }
        }
        [ty, "_history"] => {
            let ty = resource_type(ty, path)?;
            get_only(Shape::of_type(Interaction::HistoryType, ty))
        }
        [ty, "_search"] => {
            let ty = resource_type(ty, path)?;
            match verb {
                Verb::Post => Ok(Shape {
                    reads_form_body: true,
                    ..Shape::of_type(Interaction::SearchType, ty)
                }),
                _ => Err(not_allowed(ALLOW_SEARCH_POST)),
            }
        }
        [ty, op] if op.starts_with('$') => {
            let ty = resource_type(ty, path)?;
            let name = operation(op)?;
            operation_verb(verb, not_allowed)?;
            Ok(Shape::of_type(
                Interaction::Operation(name, OperationLevel::Type),
                ty,
            ))
        }
        [ty, id] => {
            let ty = resource_type(ty, path)?;
            let id = resource_id(id)?;
            let interaction = match verb {
                Verb::Get => Interaction::Read,
                Verb::Put => Interaction::Update,
                Verb::Patch => Interaction::Patch,
                Verb::Delete => Interaction::Delete,
                _ => return Err(not_allowed(ALLOW_INSTANCE)),
            };
            Ok(Shape::of_instance(interaction, ty, id))
        }
        [ty, id, "_history"] => {
            let ty = resource_type(ty, path)?;
            let id = resource_id(id)?;
            get_only(Shape::of_instance(Interaction::HistoryInstance, ty, id))
        }
        [ty, id, op] if op.starts_with('$') => {
            let ty = resource_type(ty, path)?;
            let id = resource_id(id)?;
            let name = operation(op)?;
            operation_verb(verb, not_allowed)?;
            Ok(Shape::of_instance(
                Interaction::Operation(name, OperationLevel::Instance),
                ty,
                id,
            ))
        }
        [owner, id, searched] => {
            let owner = resource_type(owner, path)?;
            let id = resource_id(id)?;
            if !COMPARTMENT_OWNERS.contains(&owner.as_str()) {
                return Err(unsupported(path));
            }
            let searched = match searched {
                "*" => None,
                ty => Some(resource_type(ty, path)?),
            };
            get_only(Shape {
                resource_type: searched,
                compartment: Some(CompartmentRef { owner, id }),
                ..Shape::new(Interaction::SearchCompartment)
            })
        }
        [ty, id, "_history", version] => {
            let ty = resource_type(ty, path)?;
            let id = resource_id(id)?;
            let Some(version) = ResourceId::parse(version) else {
                return Err(RequestError::InvalidVersionId { id: echo(version) });
            };
            get_only(Shape {
                version: Some(version),
                ..Shape::of_instance(Interaction::Vread, ty, id)
            })
        }
        _ => Err(unsupported(path)),
    }
}

/// Operations may be invoked with GET (or HEAD) or POST.
fn operation_verb(
    verb: Verb,
    not_allowed: impl Fn(&'static str) -> RequestError,
) -> Result<(), RequestError> {
    match verb {
        Verb::Get | Verb::Post => Ok(()),
        _ => Err(not_allowed(ALLOW_OPERATION)),
    }
}

/// A segment in a resource-type position. Names that cannot be a type at all
/// (`_search`, `$op`, `*`, `.well-known`) make the whole path unsupported instead.
fn resource_type(segment: &str, path: &str) -> Result<ResourceType, RequestError> {
    if let Some(ty) = ResourceType::parse(segment) {
        return Ok(ty);
    }
    if segment.starts_with(|c: char| c.is_ascii_alphabetic()) {
        Err(RequestError::UnknownResourceType {
            name: echo(segment),
        })
    } else {
        Err(unsupported(path))
    }
}

fn resource_id(segment: &str) -> Result<ResourceId, RequestError> {
    ResourceId::parse(segment).ok_or_else(|| RequestError::InvalidId { id: echo(segment) })
}

fn operation(segment: &str) -> Result<OperationName, RequestError> {
    OperationName::parse(segment).ok_or_else(|| RequestError::InvalidOperationName {
        name: echo(segment),
    })
}

fn unsupported(path: &str) -> RequestError {
    RequestError::UnsupportedPath { path: echo(path) }
}

/// Decodes `application/x-www-form-urlencoded` pairs from `raw` into `out`, strictly.
/// Empty pieces (`a=1&&b=2`, a trailing `&`) are skipped as browsers and
/// `form_urlencoded` do; a piece without `=` is a name with an empty value.
fn parse_params(
    raw: &[u8],
    origin: ParamSource,
    out: &mut Vec<(String, String)>,
) -> Result<(), RequestError> {
    for piece in raw.split(|&b| b == b'&') {
        if piece.is_empty() {
            continue;
        }
        if out.len() >= MAX_PARAMS {
            return Err(RequestError::TooManyParams { max: MAX_PARAMS });
        }
        let (name, value) = match piece.iter().position(|&b| b == b'=') {
            Some(at) => (
                piece.get(..at).unwrap_or_default(),
                piece.get(at + 1..).unwrap_or_default(),
            ),
            None => (piece, &[][..]),
        };
        let invalid = || RequestError::ParamInvalidEncoding {
            origin,
            piece: echo_bytes(piece),
        };
        let name = decode_component(name).ok_or_else(invalid)?;
        let value = decode_component(value).ok_or_else(invalid)?;
        if name.is_empty() {
            return Err(RequestError::ParamEmptyName {
                origin,
                piece: echo_bytes(piece),
            });
        }
        if name.chars().chain(value.chars()).any(char::is_control) {
            return Err(RequestError::ParamControlCharacter {
                origin,
                piece: echo_bytes(piece),
            });
        }
        out.push((name, value));
    }
    Ok(())
}

/// `+` is a space and `%XX` a byte; `None` for a `%` without two hex digits or a
/// result that is not UTF-8.
fn decode_component(raw: &[u8]) -> Option<String> {
    if !raw.iter().any(|&b| b == b'%' || b == b'+') {
        return std::str::from_utf8(raw).ok().map(str::to_owned);
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while let Some(&b) = raw.get(i) {
        match b {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => {
                let hi = raw.get(i + 1).and_then(|&h| hex_value(h))?;
                let lo = raw.get(i + 2).and_then(|&l| hex_value(l))?;
                out.push((hi << 4) | lo);
                i += 3;
            }
            _ => {
                out.push(b);
                i += 1;
            }
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

/// User input for an error message: at most [`MAX_ECHO_CHARS`] characters, anything
/// outside printable ASCII escaped, `...` when cut.
pub(crate) fn echo(input: &str) -> String {
    let mut out = String::with_capacity(input.len().min(MAX_ECHO_CHARS + 3));
    for (n, c) in input.chars().enumerate() {
        if n == MAX_ECHO_CHARS {
            out.push_str("...");
            break;
        }
        if c == ' ' || c.is_ascii_graphic() {
            out.push(c);
        } else {
            out.extend(c.escape_default());
        }
    }
    out
}

fn echo_bytes(input: &[u8]) -> String {
    let end = input.len().min(MAX_ECHO_CHARS * 4);
    echo(&String::from_utf8_lossy(
        input.get(..end).unwrap_or_default(),
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn get(path: &str) -> Result<FhirRequest, RequestError> {
        parse_request(&Method::GET, path, None, None)
    }

    fn req(method: Method, path: &str, query: Option<&str>) -> Result<FhirRequest, RequestError> {
        parse_request(&method, path, query, None)
    }

    fn reason(result: Result<FhirRequest, RequestError>) -> &'static str {
        result.unwrap_err().reason()
    }

    fn ty(name: &str) -> Option<ResourceType> {
        Some(ResourceType::parse(name).unwrap())
    }

    fn id(s: &str) -> Option<ResourceId> {
        Some(ResourceId::parse(s).unwrap())
    }

    fn op(name: &str, level: OperationLevel) -> Interaction {
        Interaction::Operation(OperationName::parse(name).unwrap(), level)
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    // ---- shapes ----

    #[test]
    fn capabilities_and_smart_configuration() {
        let r = get("/metadata").unwrap();
        assert_eq!(r.interaction, Interaction::Capabilities);
        assert_eq!(r.resource_type, None);
        let r = get("/.well-known/smart-configuration").unwrap();
        assert_eq!(r.interaction, Interaction::SmartConfiguration);
        assert_eq!(
            reason(req(Method::POST, "/metadata", None)),
            "method_not_allowed"
        );
        let r = req(Method::GET, "/.well-known/udap", Some("community=urn%3Ax")).unwrap();
        assert_eq!(r.interaction, Interaction::UdapMetadata);
        assert_eq!(r.params, vec![("community".to_owned(), "urn:x".to_owned())]);
        assert_eq!(
            reason(req(Method::POST, "/.well-known/udap", None)),
            "method_not_allowed"
        );
    }

    #[test]
    fn read_vread_and_history() {
        let r = get("/Patient/p1").unwrap();
        assert_eq!(r.interaction, Interaction::Read);
        assert_eq!(r.resource_type, ty("Patient"));
        assert_eq!(r.id, id("p1"));
        assert_eq!(r.version, None);
        assert_eq!(r.compartment, None);

        let r = get("/Observation/o-1.2/_history/3").unwrap();
        assert_eq!(r.interaction, Interaction::Vread);
        assert_eq!(r.resource_type, ty("Observation"));
        assert_eq!(r.id, id("o-1.2"));
        assert_eq!(r.version, id("3"));

        let r = get("/Observation/o1/_history").unwrap();
        assert_eq!(r.interaction, Interaction::HistoryInstance);
        assert_eq!(r.id, id("o1"));

        let r = get("/Observation/_history").unwrap();
        assert_eq!(r.interaction, Interaction::HistoryType);
        assert_eq!(r.resource_type, ty("Observation"));
        assert_eq!(r.id, None);

        let r = get("/_history").unwrap();
        assert_eq!(r.interaction, Interaction::HistorySystem);
        assert_eq!(r.resource_type, None);
    }

    #[test]
    fn searches() {
        let r = req(Method::GET, "/Observation", Some("code=x")).unwrap();
        assert_eq!(r.interaction, Interaction::SearchType);
        assert_eq!(r.resource_type, ty("Observation"));
        assert_eq!(r.params, pairs(&[("code", "x")]));

        let r = req(Method::POST, "/Observation/_search", None).unwrap();
        assert_eq!(r.interaction, Interaction::SearchType);
        assert_eq!(r.resource_type, ty("Observation"));

        for path in ["", "/"] {
            let r = get(path).unwrap();
            assert_eq!(r.interaction, Interaction::SearchSystem);
            let r = req(Method::GET, path, Some("_type=Patient")).unwrap();
            assert_eq!(r.interaction, Interaction::SearchSystem);
            assert_eq!(r.params, pairs(&[("_type", "Patient")]));
        }
        let r = req(Method::POST, "/_search", None).unwrap();
        assert_eq!(r.interaction, Interaction::SearchSystem);
        assert_eq!(r.resource_type, None);

        assert_eq!(reason(get("/_search")), "method_not_allowed");
        assert_eq!(reason(get("/Observation/_search")), "method_not_allowed");
    }

    #[test]
    fn compartment_searches() {
        let r = get("/Patient/p1/Observation").unwrap();
        assert_eq!(r.interaction, Interaction::SearchCompartment);
        assert_eq!(r.resource_type, ty("Observation"));
        assert_eq!(r.id, None);
        assert_eq!(
            r.compartment,
            Some(CompartmentRef {
                owner: ResourceType::PATIENT,
                id: ResourceId::parse("p1").unwrap()
            })
        );

        let r = get("/Encounter/e1/*").unwrap();
        assert_eq!(r.interaction, Interaction::SearchCompartment);
        assert_eq!(r.resource_type, None);
        assert_eq!(r.compartment.unwrap().owner, ty("Encounter").unwrap());

        for owner in [
            "Patient",
            "Encounter",
            "RelatedPerson",
            "Practitioner",
            "Device",
        ] {
            let r = get(&format!("/{owner}/x/Condition")).unwrap();
            assert_eq!(r.compartment.unwrap().owner.as_str(), owner);
        }
        assert_eq!(reason(get("/Observation/o1/Patient")), "unsupported_path");
        assert_eq!(reason(get("/Observation/o1/*")), "unsupported_path");
        assert_eq!(
            reason(get("/Patient/p1/observation")),
            "unknown_resource_type"
        );
        assert_eq!(reason(get("/Patient/p1/_search")), "unsupported_path");
        assert_eq!(
            reason(get("/Patient/p!/Observation")),
            "path_invalid_character"
        );
        assert_eq!(reason(get("/Patient/p_1/Observation")), "invalid_id");
        assert_eq!(
            reason(req(Method::POST, "/Patient/p1/Observation", None)),
            "method_not_allowed"
        );
        assert_eq!(
            reason(req(Method::POST, "/Patient/p1/Observation/_search", None)),
            "unsupported_path"
        );
    }

    #[test]
    fn operations_at_every_level() {
        for method in [Method::GET, Method::POST] {
            let r = req(method.clone(), "/$export", None).unwrap();
            assert_eq!(r.interaction, op("$export", OperationLevel::System));
            assert_eq!(r.resource_type, None);

            let r = req(method.clone(), "/Patient/$match", None).unwrap();
            assert_eq!(r.interaction, op("$match", OperationLevel::Type));
            assert_eq!(r.resource_type, ty("Patient"));
            assert_eq!(r.id, None);

            let r = req(method.clone(), "/Patient/p1/$everything", Some("_count=10")).unwrap();
            assert_eq!(r.interaction, op("$everything", OperationLevel::Instance));
            assert_eq!(r.resource_type, ty("Patient"));
            assert_eq!(r.id, id("p1"));
            assert_eq!(r.params, pairs(&[("_count", "10")]));
        }
        assert_eq!(
            reason(req(Method::DELETE, "/$export", None)),
            "method_not_allowed"
        );
        assert_eq!(
            reason(req(Method::PUT, "/Patient/p1/$everything", None)),
            "method_not_allowed"
        );
    }

    #[test]
    fn writes_and_batches() {
        let r = req(Method::POST, "/Patient", None).unwrap();
        assert_eq!(r.interaction, Interaction::Create);
        assert_eq!(r.resource_type, ty("Patient"));

        let r = req(Method::PUT, "/Patient/p1", None).unwrap();
        assert_eq!(r.interaction, Interaction::Update);
        assert_eq!(r.id, id("p1"));

        let r = req(Method::PUT, "/Patient", Some("identifier=x|1")).unwrap();
        assert_eq!(r.interaction, Interaction::Update);
        assert_eq!(r.id, None);
        assert_eq!(r.params, pairs(&[("identifier", "x|1")]));

        let r = req(Method::PATCH, "/Patient/p1", None).unwrap();
        assert_eq!(r.interaction, Interaction::Patch);

        let r = req(Method::DELETE, "/Patient/p1", None).unwrap();
        assert_eq!(r.interaction, Interaction::Delete);
        assert_eq!(r.id, id("p1"));

        let r = req(Method::DELETE, "/Patient", Some("name=x")).unwrap();
        assert_eq!(r.interaction, Interaction::Delete);
        assert_eq!(r.id, None);

        for path in ["", "/"] {
            let r = req(Method::POST, path, None).unwrap();
            assert_eq!(r.interaction, Interaction::BatchOrTransaction);
        }
    }

    #[test]
    fn conditional_writes_need_criteria() {
        for method in [Method::PUT, Method::DELETE] {
            for query in [None, Some(""), Some("&&")] {
                let err = req(method.clone(), "/Patient", query).unwrap_err();
                assert_eq!(err.reason(), "conditional_criteria_missing");
                assert_eq!(err.status(), StatusCode::BAD_REQUEST);
            }
        }
    }

    #[test]
    fn head_is_classified_like_get_and_keeps_its_method() {
        let r = req(Method::HEAD, "/Patient/p1", None).unwrap();
        assert_eq!(r.interaction, Interaction::Read);
        assert_eq!(r.method, Method::HEAD);
    }

    #[test]
    fn wrong_methods_get_405_with_allow() {
        let cases: &[(Method, &str, &str)] = &[
            (Method::PUT, "/", ALLOW_ROOT),
            (Method::DELETE, "/metadata", ALLOW_READ_ONLY),
            (
                Method::POST,
                "/.well-known/smart-configuration",
                ALLOW_READ_ONLY,
            ),
            (Method::POST, "/_history", ALLOW_READ_ONLY),
            (Method::PATCH, "/Patient", ALLOW_TYPE),
            (Method::POST, "/Patient/p1", ALLOW_INSTANCE),
            (Method::DELETE, "/Patient/p1/_history", ALLOW_READ_ONLY),
            (Method::PUT, "/Patient/p1/_history/2", ALLOW_READ_ONLY),
            (Method::POST, "/Patient/_history", ALLOW_READ_ONLY),
            (Method::OPTIONS, "/Patient/p1", ALLOW_INSTANCE),
            (Method::from_bytes(b"FOO").unwrap(), "/Patient", ALLOW_TYPE),
        ];
        for (method, path, allow) in cases {
            let err = req(method.clone(), path, None).unwrap_err();
            assert_eq!(err.reason(), "method_not_allowed", "{method} {path}");
            assert_eq!(err.status(), StatusCode::METHOD_NOT_ALLOWED);
            assert_eq!(err.allow(), Some(*allow), "{method} {path}");
        }
        assert_eq!(get("/Patient/x!").unwrap_err().allow(), None);
    }

    // ---- path rejections ----

    #[test]
    fn dot_segments_literal_and_encoded() {
        for path in [
            "/.",
            "/..",
            "/Patient/p1/../p2",
            "/Patient/./p1",
            "/Patient/..",
            "/%2e%2e",
            "/%2E%2E/Patient",
            "/Patient/.%2e",
            "/Patient/%2e.",
            "/Patient/%2e",
            "/a/b/c/d/e/..",
        ] {
            assert_eq!(reason(get(path)), "path_dot_segment", "{path}");
        }
        // Not dot segments, but still percent-encoded.
        assert_eq!(reason(get("/Patient/%2e%2e%2e")), "path_percent_encoded");
        assert_eq!(reason(get("/Patient/%252e%252e")), "path_percent_encoded");
    }

    #[test]
    fn encoded_slashes_and_backslashes() {
        for path in [
            "/Patient%2Fp1",
            "/Patient%2fp1",
            "/Patient/p1%5C..",
            "/Patient/p1%5c",
            "/Patient\\p1",
            "/..%2F",
        ] {
            assert_eq!(reason(get(path)), "path_encoded_slash", "{path}");
        }
    }

    #[test]
    fn any_percent_encoding_is_refused() {
        for path in [
            "/Patient/p%31",
            "/%50atient",
            "/Patient/p1%",
            "/Patient/p1%4",
            "/Patient/%zz",
        ] {
            let err = get(path).unwrap_err();
            assert_eq!(err.reason(), "path_percent_encoded", "{path}");
            assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn empty_segments_and_trailing_slashes() {
        for path in [
            "//",
            "//Patient",
            "/Patient//p1",
            "/Patient/",
            "/Patient/p1/",
            "/Patient/p1/_history/",
            "/metadata/",
        ] {
            assert_eq!(reason(get(path)), "path_empty_segment", "{path}");
        }
    }

    #[test]
    fn invalid_characters() {
        for path in [
            "/Patient/p1 ",
            "/Patient/p 1",
            "/Patient/p1\0",
            "/Patient/p1\n",
            "/Patient/p1\x7f",
            "/Patient/pé",
            "/Patient/p1;x=1",
            "/Patient/p1?x",
            "/Patient/p1#x",
            "/Patient:p1",
            "/Patient/p1@x",
        ] {
            assert_eq!(reason(get(path)), "path_invalid_character", "{path:?}");
        }
        let msg = get("/Patient/p1\u{1b}").unwrap_err().to_string();
        assert!(!msg.contains('\u{1b}'), "{msg}");
    }

    #[test]
    fn resource_types_are_exact() {
        assert_eq!(reason(get("/patient/p1")), "unknown_resource_type");
        assert_eq!(reason(get("/observation")), "unknown_resource_type");
        assert_eq!(reason(get("/OBSERVATION")), "unknown_resource_type");
        assert_eq!(reason(get("/Foo/_history")), "unknown_resource_type");
        assert_eq!(reason(get("/Foo/$op")), "unknown_resource_type");
        assert_eq!(reason(get("/Foo/1/_history/1")), "unknown_resource_type");
    }

    #[test]
    fn ids_and_versions() {
        let ok = "a".repeat(64);
        assert_eq!(get(&format!("/Patient/{ok}")).unwrap().id, id(&ok));
        let long = "a".repeat(65);
        assert_eq!(reason(get(&format!("/Patient/{long}"))), "invalid_id");
        assert_eq!(reason(get("/Patient/p_1")), "invalid_id");
        assert_eq!(reason(get("/Patient/*")), "invalid_id");
        assert_eq!(reason(get("/Patient/p$1")), "invalid_id");
        assert_eq!(
            reason(get(&format!("/Patient/{long}/_history"))),
            "invalid_id"
        );
        assert_eq!(
            reason(get(&format!("/Patient/p1/_history/{long}"))),
            "invalid_version_id"
        );
        assert_eq!(
            reason(get("/Patient/p1/_history/v_1")),
            "invalid_version_id"
        );
        assert_eq!(reason(get("/Patient/p1/_history/*")), "invalid_version_id");
    }

    #[test]
    fn operation_names() {
        for path in [
            "/$",
            "/Patient/$",
            "/Patient/p1/$",
            "/$1abc",
            "/Patient/$a.b",
            "/$a$b",
        ] {
            assert_eq!(reason(get(path)), "invalid_operation_name", "{path}");
        }
        let long = format!("/${}", "a".repeat(65));
        assert_eq!(reason(get(&long)), "invalid_operation_name");
    }

    #[test]
    fn unknown_shapes() {
        for path in [
            "Patient",
            "/metadata/x",
            "/_history/x",
            "/_search/x",
            "/$op/x",
            "/*",
            "/_foo",
            "/.well-known",
            "/.well-known/openid-configuration",
            "/Patient/p1/_history/1/x",
            "/Patient/p1/x/y",
            "/Patient/p1/Observation/o1",
        ] {
            let err = get(path).unwrap_err();
            assert!(
                matches!(
                    err.reason(),
                    "unsupported_path" | "path_too_many_segments" | "unknown_resource_type"
                ),
                "{path}: {err}"
            );
            assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        }
        assert_eq!(reason(get("Patient")), "unsupported_path");
        assert_eq!(reason(get("/*")), "unsupported_path");
        assert_eq!(
            reason(get("/Patient/p1/_history/1/x")),
            "path_too_many_segments"
        );
    }

    #[test]
    fn path_limits() {
        let long = format!("/Patient/{}", "a".repeat(MAX_PATH_LEN));
        assert_eq!(reason(get(&long)), "path_too_long");
        assert_eq!(reason(get("/a/b/c/d/e")), "path_too_many_segments");
    }

    #[test]
    fn messages_quote_and_truncate_input() {
        let err = get("/observation").unwrap_err();
        assert_eq!(err.to_string(), "unknown resource type `observation`");
        let long = format!("/Patient/{}", "b".repeat(300));
        let msg = get(&long).unwrap_err().to_string();
        assert!(msg.len() < 120, "{msg}");
        assert!(msg.ends_with("...`"), "{msg}");
        let q = format!("{}=%ff", "n".repeat(1000));
        let msg = req(Method::GET, "/Patient", Some(&q))
            .unwrap_err()
            .to_string();
        assert!(msg.len() < 160, "{msg}");
    }

    // ---- parameters ----

    #[test]
    fn repeated_params_keep_order() {
        let r = req(
            Method::GET,
            "/Observation",
            Some("code=a&date=ge2020&code=b&_summary"),
        )
        .unwrap();
        assert_eq!(
            r.params,
            pairs(&[
                ("code", "a"),
                ("date", "ge2020"),
                ("code", "b"),
                ("_summary", "")
            ])
        );
    }

    #[test]
    fn plus_and_percent_decode() {
        let r = req(
            Method::GET,
            "/Patient",
            Some("name=John+Smith&family=van%20Dyke&x%2By=a%2Bb%26c%3Dd&given=Jos%C3%A9"),
        )
        .unwrap();
        assert_eq!(
            r.params,
            pairs(&[
                ("name", "John Smith"),
                ("family", "van Dyke"),
                ("x+y", "a+b&c=d"),
                ("given", "José"),
            ])
        );
    }

    #[test]
    fn empty_pieces_are_skipped() {
        let r = req(Method::GET, "/Patient", Some("&a=1&&b=&")).unwrap();
        assert_eq!(r.params, pairs(&[("a", "1"), ("b", "")]));
        let r = req(Method::GET, "/Patient", Some("a==1")).unwrap();
        assert_eq!(r.params, pairs(&[("a", "=1")]));
    }

    #[test]
    fn invalid_param_encoding() {
        for q in [
            "a=%ff", "a=%C3", "%ff=1", "a=%", "a=%4", "a=%zz", "a=%%41", "a=%C3%28",
        ] {
            let err = req(Method::GET, "/Patient", Some(q)).unwrap_err();
            assert_eq!(err.reason(), "param_invalid_encoding", "{q}");
            assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn control_characters_in_params() {
        for q in [
            "a=%00", "a%00=1", "a=x%0Ay", "a=%0d", "a=%7f", "a=%C2%85", "a=%09",
        ] {
            assert_eq!(
                reason(req(Method::GET, "/Patient", Some(q))),
                "param_control_character",
                "{q}"
            );
        }
        let err =
            parse_request(&Method::POST, "/Patient/_search", None, Some(b"a=1\n")).unwrap_err();
        assert_eq!(err.reason(), "param_control_character");
    }

    #[test]
    fn empty_param_names() {
        for q in ["=1", "a=1&=2", "="] {
            assert_eq!(
                reason(req(Method::GET, "/Patient", Some(q))),
                "param_empty_name",
                "{q}"
            );
        }
    }

    #[test]
    fn param_limits() {
        let max: Vec<String> = (0..MAX_PARAMS).map(|i| format!("p{i}=1")).collect();
        let r = req(Method::GET, "/Patient", Some(&max.join("&"))).unwrap();
        assert_eq!(r.params.len(), MAX_PARAMS);
        let over = format!("{}&x=1", max.join("&"));
        assert_eq!(
            reason(req(Method::GET, "/Patient", Some(&over))),
            "params_too_many"
        );

        // The count covers query and body together.
        let body = "y=1";
        let err = parse_request(
            &Method::POST,
            "/Patient/_search",
            Some(&max.join("&")),
            Some(body.as_bytes()),
        )
        .unwrap_err();
        assert_eq!(err.reason(), "params_too_many");

        let long = format!("a={}", "x".repeat(MAX_QUERY_LEN));
        assert_eq!(
            reason(req(Method::GET, "/Patient", Some(&long))),
            "params_too_long"
        );
        let body = format!("a={}", "x".repeat(MAX_FORM_BODY_LEN));
        let err =
            parse_request(&Method::POST, "/_search", None, Some(body.as_bytes())).unwrap_err();
        assert_eq!(err.reason(), "params_too_long");
        assert!(err.to_string().starts_with("form body"), "{err}");
    }

    #[test]
    fn form_body_is_merged_after_query() {
        let r = parse_request(
            &Method::POST,
            "/Observation/_search",
            Some("patient=p1&code=a"),
            Some(b"code=b&date=ge2020+01&patient=p2"),
        )
        .unwrap();
        assert_eq!(r.interaction, Interaction::SearchType);
        assert_eq!(
            r.params,
            pairs(&[
                ("patient", "p1"),
                ("code", "a"),
                ("code", "b"),
                ("date", "ge2020 01"),
                ("patient", "p2"),
            ])
        );
        let r = parse_request(&Method::POST, "/_search", None, Some(b"_type=Patient")).unwrap();
        assert_eq!(r.interaction, Interaction::SearchSystem);
        assert_eq!(r.params, pairs(&[("_type", "Patient")]));

        let err = parse_request(&Method::POST, "/_search", None, Some(b"a=%ff")).unwrap_err();
        assert_eq!(err.reason(), "param_invalid_encoding");
        assert!(err.to_string().contains("form body"), "{err}");
        let err = parse_request(&Method::POST, "/_search", None, Some(b"a=\xff")).unwrap_err();
        assert_eq!(err.reason(), "param_invalid_encoding");
    }

    #[test]
    fn form_body_is_ignored_outside_search() {
        let r = parse_request(&Method::POST, "/Patient", Some("a=1"), Some(b"b=2")).unwrap();
        assert_eq!(r.interaction, Interaction::Create);
        assert_eq!(r.params, pairs(&[("a", "1")]));
        let r = parse_request(&Method::POST, "/Patient/$match", None, Some(b"%ff")).unwrap();
        assert!(r.params.is_empty());
    }

    #[test]
    fn path_errors_come_before_param_errors() {
        assert_eq!(
            reason(req(Method::GET, "/patient", Some("a=%ff"))),
            "unknown_resource_type"
        );
    }

    #[test]
    fn reasons_are_unique() {
        let errors = [
            RequestError::PathTooLong { max: 1 },
            RequestError::PathTooManySegments { max: 1 },
            RequestError::PathDotSegment {
                segment: String::new(),
            },
            RequestError::PathEncodedSlash {
                found: String::new(),
            },
            RequestError::PathPercentEncoded {
                found: String::new(),
            },
            RequestError::PathEmptySegment,
            RequestError::PathInvalidCharacter {
                found: String::new(),
            },
            RequestError::UnknownResourceType {
                name: String::new(),
            },
            RequestError::InvalidId { id: String::new() },
            RequestError::InvalidVersionId { id: String::new() },
            RequestError::InvalidOperationName {
                name: String::new(),
            },
            RequestError::UnsupportedPath {
                path: String::new(),
            },
            RequestError::MethodNotAllowed {
                method: String::new(),
                allow: "",
            },
            RequestError::MissingConditionalCriteria { method: "PUT" },
            RequestError::ParamsTooLong {
                origin: ParamSource::Query,
                max: 1,
            },
            RequestError::TooManyParams { max: 1 },
            RequestError::ParamInvalidEncoding {
                origin: ParamSource::Query,
                piece: String::new(),
            },
            RequestError::ParamControlCharacter {
                origin: ParamSource::Query,
                piece: String::new(),
            },
            RequestError::ParamEmptyName {
                origin: ParamSource::Query,
                piece: String::new(),
            },
        ];
        let mut reasons: Vec<_> = errors.iter().map(RequestError::reason).collect();
        reasons.sort_unstable();
        reasons.dedup();
        assert_eq!(reasons.len(), errors.len());
        for e in &errors {
            let msg = e.to_string();
            assert!(!msg.ends_with('.'), "{msg}");
            assert_eq!(
                msg.chars().next().map(|c| c.is_uppercase()),
                Some(false),
                "{msg}"
            );
        }
    }

    // ---- properties ----

    fn method_strategy() -> impl Strategy<Value = Method> {
        prop_oneof![
            Just(Method::GET),
            Just(Method::HEAD),
            Just(Method::POST),
            Just(Method::PUT),
            Just(Method::PATCH),
            Just(Method::DELETE),
            Just(Method::OPTIONS),
        ]
    }

    /// Paths built from FHIR-ish pieces and hostile ones, so the shape code is reached.
    fn path_strategy() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("Patient".to_owned()),
            Just("Observation".to_owned()),
            Just("_history".to_owned()),
            Just("_search".to_owned()),
            Just("$everything".to_owned()),
            Just("*".to_owned()),
            Just("metadata".to_owned()),
            Just(".well-known".to_owned()),
            Just("smart-configuration".to_owned()),
            Just("..".to_owned()),
            Just("%2e".to_owned()),
            Just("%2F".to_owned()),
            Just("".to_owned()),
            "[A-Za-z0-9.$_*%-]{0,8}",
            any::<String>(),
        ];
        prop::collection::vec(piece, 0..7).prop_map(|v| {
            if v.is_empty() {
                String::new()
            } else {
                format!("/{}", v.join("/"))
            }
        })
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_input(
            method in method_strategy(),
            path in any::<String>(),
            query in proptest::option::of(any::<String>()),
            body in proptest::option::of(any::<Vec<u8>>()),
        ) {
            let _ = parse_request(&method, &path, query.as_deref(), body.as_deref());
        }

        #[test]
        fn never_panics_on_fhir_like_paths(
            method in method_strategy(),
            path in path_strategy(),
            query in proptest::option::of("[a-z=&%+0-9A-F]{0,24}"),
            body in proptest::option::of("[a-z=&%+0-9A-F]{0,24}"),
        ) {
            let result = parse_request(&method, &path, query.as_deref(), body.as_deref().map(str::as_bytes));
            if let Err(e) = result {
                let msg = e.to_string();
                prop_assert!(msg.len() < 200 && msg.chars().all(|c| c == ' ' || c.is_ascii_graphic()), "{msg}");
            }
        }

        /// Whenever strict decoding succeeds it agrees with `form_urlencoded`.
        #[test]
        fn params_agree_with_form_urlencoded(query in "([a-zA-Z0-9=&+%._~-]|%[0-9a-fA-F]{2}|%[cC]3%[aA]9){0,40}") {
            if let Ok(r) = parse_request(&Method::GET, "/Patient", Some(&query), None) {
                let expected: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
                    .map(|(n, v)| (n.into_owned(), v.into_owned()))
                    .collect();
                prop_assert_eq!(r.params, expected);
            }
        }

        /// Accepted paths are plain: no `%`, no dot segments, no empty segments.
        #[test]
        fn accepted_paths_are_plain(method in method_strategy(), path in path_strategy()) {
            if path != "/" && parse_request(&method, &path, Some("a=1"), None).is_ok() {
                prop_assert!(!path.contains('%') && !path.contains('\\') && !path.contains("//"));
                prop_assert!(path.split('/').skip(1).all(|s| !s.is_empty() && s != "." && s != ".."));
            }
        }
    }
}
