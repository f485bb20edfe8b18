//! Compartment membership from the official R4 CompartmentDefinitions.
//!
//! At start-up the definitions and the SearchParameters they name (`compartments/`)
//! are compiled into a table: for each (compartment type, resource type) the element
//! paths whose references link a resource into the compartment, e.g. (Patient,
//! Observation) -> `subject`, `performer`. Membership is then a walk over those paths
//! in the returned JSON.
//!
//! Reference matching is strict: a relative (`Patient/p1`), versioned
//! (`Patient/p1/_history/2`) or absolute reference whose base is the upstream's or the
//! tenant's public base counts; contained (`#p1`), logical (identifier-only) and
//! foreign absolute references never do; ids are compared whole, so `Patient/p1`
//! never matches `Patient/p10`.

use std::collections::HashMap;

use serde_json::Value;

use super::record::Record;

use super::constraint::SearchParamIndex;
use crate::fhir::{CompartmentRef, ResourceType};

const DEFINITIONS: [&str; 5] = [
    include_str!("../../compartments/compartmentdefinition-patient.json"),
    include_str!("../../compartments/compartmentdefinition-encounter.json"),
    include_str!("../../compartments/compartmentdefinition-relatedperson.json"),
    include_str!("../../compartments/compartmentdefinition-practitioner.json"),
    include_str!("../../compartments/compartmentdefinition-device.json"),
];
const SEARCH_PARAMETERS: &str = include_str!("../../compartments/search-parameters.json");

/// Resource types that never carry patient data: who provides care and where, what is
/// prescribed in the abstract, and how data is defined and coded.
pub const NON_PATIENT_TYPES: [&str; 40] = [
    "ActivityDefinition",
    "CapabilityStatement",
    "ChargeItemDefinition",
    "CodeSystem",
    "CompartmentDefinition",
    "ConceptMap",
    "DeviceDefinition",
    "Endpoint",
    "EventDefinition",
    "Evidence",
    "EvidenceVariable",
    "GraphDefinition",
    "HealthcareService",
    "ImplementationGuide",
    "InsurancePlan",
    "Library",
    "Location",
    "Measure",
    "Medication",
    "MedicationKnowledge",
    "MessageDefinition",
    "NamingSystem",
    "ObservationDefinition",
    "OperationDefinition",
    "Organization",
    "OrganizationAffiliation",
    "PlanDefinition",
    "Practitioner",
    "PractitionerRole",
    "Questionnaire",
    "ResearchDefinition",
    "ResearchElementDefinition",
    "SearchParameter",
    "SpecimenDefinition",
    "StructureDefinition",
    "StructureMap",
    "Substance",
    "SubstanceSpecification",
    "TerminologyCapabilities",
    "ValueSet",
];

/// An element path below a resource: `["participant", "individual"]`.
type Path = Vec<String>;

/// (compartment type, resource type) -> linking element paths.
#[derive(Debug, Default)]
pub struct CompartmentIndex {
    links: HashMap<(ResourceType, ResourceType), Vec<Path>>,
    /// (compartment type, resource type) -> the search parameter names that link them,
    /// as the CompartmentDefinition lists them (used to narrow searches).
    params: HashMap<(ResourceType, ResourceType), Vec<String>>,
    /// Every R4 SearchParameter, for evaluating scope constraints on records. Empty
    /// (every constraint unsupported, i.e. granting nothing) unless built by `official`.
    search_params: SearchParamIndex,
}

impl CompartmentIndex {
    /// Builds the index from the shipped definitions. Fails only if the shipped files
    /// are broken, which a unit test rules out.
    pub fn official() -> Result<Self, String> {
        let sps: Value = serde_json::from_str(SEARCH_PARAMETERS)
            .map_err(|e| format!("compartments/search-parameters.json: {e}"))?;
        let defs = DEFINITIONS
            .iter()
            .map(|d| {
                serde_json::from_str::<Value>(d).map_err(|e| format!("compartment definition: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut index = Self::from_json(&defs, &sps)?;
        index.search_params = SearchParamIndex::official()?;
        Ok(index)
    }

    /// The search parameters scope constraints are evaluated with.
    pub fn search_params(&self) -> &SearchParamIndex {
        &self.search_params
    }

    /// The official index, built once per process.
    pub fn official_shared() -> Result<std::sync::Arc<CompartmentIndex>, String> {
        static OFFICIAL: std::sync::OnceLock<Result<std::sync::Arc<CompartmentIndex>, String>> =
            std::sync::OnceLock::new();
        OFFICIAL
            .get_or_init(|| CompartmentIndex::official().map(std::sync::Arc::new))
            .clone()
    }

    pub fn from_json(definitions: &[Value], search_parameters: &Value) -> Result<Self, String> {
        // (base type, code) -> expression
        let mut expressions: HashMap<(String, String), String> = HashMap::new();
        for sp in search_parameter_list(search_parameters) {
            let (Some(code), Some(expr)) = (
                sp.get("code").and_then(Value::as_str),
                sp.get("expression").and_then(Value::as_str),
            ) else {
                continue;
            };
            for base in sp
                .get("base")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(base) = base.as_str() {
                    expressions.insert((base.to_owned(), code.to_owned()), expr.to_owned());
                }
            }
        }
        let mut index = CompartmentIndex::default();
        for def in definitions {
            let owner = def
                .get("code")
                .and_then(Value::as_str)
                .and_then(ResourceType::parse)
                .ok_or("compartment definition without a valid `code`")?;
            for res in def
                .get("resource")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let Some(rt) = res
                    .get("code")
                    .and_then(Value::as_str)
                    .and_then(ResourceType::parse)
                else {
                    continue;
                };
                let params: Vec<String> = res
                    .get("param")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect();
                let mut paths = Vec::new();
                for p in &params {
                    match expressions.get(&(rt.as_str().to_owned(), p.clone())) {
                        Some(expr) => paths.extend(paths_for(rt, expr)),
                        // `{def}` and similar special params have no expression.
                        None => {
                            tracing::debug!(compartment = %owner, resource = %rt, param = %p, "no search parameter expression")
                        }
                    }
                }
                paths.sort();
                paths.dedup();
                if !params.is_empty() {
                    index.params.insert((owner, rt), params);
                    index.links.insert((owner, rt), paths);
                }
            }
        }
        Ok(index)
    }

    /// The search parameter names linking `rt` to compartments of type `owner`.
    pub fn params(&self, owner: ResourceType, rt: ResourceType) -> &[String] {
        self.params
            .get(&(owner, rt))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Whether resources of type `rt` can be in a compartment of type `owner` at all
    /// (the compartment's own type always can).
    pub fn links_type(&self, owner: ResourceType, rt: ResourceType) -> bool {
        owner == rt || self.links.get(&(owner, rt)).is_some_and(|p| !p.is_empty())
    }

    /// The top-level elements of `rt` whose references link it into compartments of
    /// type `owner` (`subject`, `performer`, ...), for widening `_elements`.
    pub fn link_roots(&self, owner: ResourceType, rt: ResourceType) -> Vec<&str> {
        let mut roots: Vec<&str> = self
            .links
            .get(&(owner, rt))
            .into_iter()
            .flatten()
            .filter_map(|path| path.first().map(String::as_str))
            .collect();
        roots.sort_unstable();
        roots.dedup();
        roots
    }

    /// Whether resources of type `rt` are non-patient data: administrative,
    /// definitional or terminology resources on an explicit allow-list (Practitioner,
    /// Organization, Location, Medication, ValueSet, ...) that no Patient compartment
    /// links. Everything else counts as patient data, even when the Patient
    /// CompartmentDefinition does not list it (Task, Binary, Bundle, Device, Group,
    /// ...): such types are reachable only through a compartment that links them, so a
    /// compartment-bound token cannot read them wholesale.
    pub fn is_non_patient_data(&self, rt: ResourceType) -> bool {
        NON_PATIENT_TYPES.contains(&rt.as_str()) && !self.links_type(ResourceType::PATIENT, rt)
    }

    /// Whether `resource` (of type `rt`) is in compartment `c`. `bases` are the absolute
    /// bases whose references count as local (the upstream's and the public one).
    pub fn contains<R: Record + ?Sized>(
        &self,
        c: &CompartmentRef,
        rt: ResourceType,
        resource: &R,
        bases: &[&str],
    ) -> bool {
        if rt == c.owner && resource.id().as_deref() == Some(c.id.as_str()) {
            return true;
        }
        let Some(paths) = self.links.get(&(c.owner, rt)) else {
            return false;
        };
        paths.iter().any(|path| {
            let mut found = false;
            resource.references_at(path, &mut |reference| {
                if !found && reference_is(reference, c, bases) {
                    found = true;
                }
            });
            found
        })
    }
}

impl CompartmentIndex {
    /// The ids of every compartment of type `owner` that `resource` (of type `rt`) is
    /// in: its own id when it is of that type, and every local `owner` reference at a
    /// linking path. Unsorted, may repeat.
    pub fn owners<R: Record + ?Sized>(
        &self,
        owner: ResourceType,
        rt: ResourceType,
        resource: &R,
        bases: &[&str],
    ) -> Vec<String> {
        let mut out = Vec::new();
        if rt == owner
            && let Some(id) = resource.id()
        {
            out.push(id.into_owned());
        }
        for path in self.links.get(&(owner, rt)).into_iter().flatten() {
            resource.references_at(path, &mut |reference| {
                if let Some(l) = crate::fhir::parse_local_reference(reference, bases)
                    && l.resource_type == owner
                {
                    out.push(l.id.to_owned());
                }
            });
        }
        out
    }
}

fn search_parameter_list(v: &Value) -> Vec<&Value> {
    match v {
        Value::Array(items) => items.iter().collect(),
        Value::Object(o) if o.get("resourceType").and_then(Value::as_str) == Some("Bundle") => o
            .get("entry")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|e| e.get("resource"))
            .collect(),
        _ => Vec::new(),
    }
}

/// Extracts this type's element paths from a FHIRPath union such as
/// `Observation.subject.where(resolve() is Patient) | Condition.subject`.
/// Only plain member paths are supported; `where(...)` filters are dropped (the
/// reference's type is checked at match time anyway), `as Reference` casts removed.
pub fn paths_for(rt: ResourceType, expression: &str) -> Vec<Path> {
    let prefix = format!("{}.", rt.as_str());
    expression
        .split('|')
        .filter_map(|part| {
            let mut p = part
                .trim()
                .trim_start_matches('(')
                .trim_end_matches(')')
                .trim();
            // `X.code as Reference` is the Reference branch of the choice element
            // `code[x]`, which JSON spells `codeReference`.
            let mut choice_suffix = None;
            if let Some(stripped) = p.strip_suffix(" as Reference") {
                p = stripped.trim_end_matches(')').trim();
                choice_suffix = Some("Reference");
            }
            let rest = p.strip_prefix(&prefix)?;
            let mut out = Vec::new();
            for seg in rest.split('.') {
                if seg.starts_with("where(")
                    || seg.starts_with("as(")
                    || seg.starts_with("resolve(")
                {
                    break;
                }
                if seg.is_empty() || !seg.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                    return None;
                }
                out.push(seg.to_owned());
            }
            if let (Some(suffix), Some(last)) = (choice_suffix, out.last_mut()) {
                last.push_str(suffix);
            }
            (!out.is_empty()).then_some(out)
        })
        .collect()
}

/// Strict local reference match; see the module docs.
pub fn reference_is(reference: &str, c: &CompartmentRef, bases: &[&str]) -> bool {
    crate::fhir::parse_local_reference(reference, bases)
        .is_some_and(|l| l.resource_type == c.owner && l.id == c.id.as_str())
}

#[cfg(test)]
mod tests;
