//! Shared FHIR model used by every stage: resource types, the parsed request, the
//! outbound request, compartment membership and search-parameter constraints from the
//! official R4 definitions, and OperationOutcome rendering.

pub mod answer;
pub mod bundle;
pub mod capability;
pub mod compartment;
pub mod constraint;
pub mod json;
pub mod outbound;
pub mod outcome;
pub mod parse;
pub mod patch;
pub mod record;
pub mod reference;
pub mod request;
pub mod resource_type;

pub use compartment::CompartmentIndex;
pub use outbound::{Narrowing, OutboundRequest};
pub use outcome::OperationOutcome;
pub use parse::{RequestError, parse_request};
pub use reference::{LocalRef, parse_local_reference};
pub use request::{
    CompartmentRef, FhirRequest, Interaction, OperationLevel, OperationName, ResourceId,
};
pub use resource_type::ResourceType;
