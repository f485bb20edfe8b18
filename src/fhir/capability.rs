//! What an upstream says it can search: the search parameters its CapabilityStatement
//! lists, per resource type (`rest.resource[].searchParam`) and for every type
//! (`rest.searchParam`).
//!
//! A lenient upstream ignores a parameter it does not know and answers as if it had
//! not been sent: a search the client meant to be narrow comes back wide. The answer
//! check still drops what the token may not see, but the client is misled, and paging
//! and counts are computed over the wider set. So for restricted tokens the proxy
//! refuses any search parameter the upstream does not declare (`rewrite`).

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use super::ResourceType;

/// Result parameters (FHIR R4 3.1.1.5.x): they shape the answer, never which records
/// match, and a CapabilityStatement does not list them.
const RESULT_PARAMS: [&str; 12] = [
    "_count",
    "_offset",
    "_sort",
    "_total",
    "_summary",
    "_elements",
    "_include",
    "_revinclude",
    "_format",
    "_pretty",
    "_contained",
    "_containedType",
];

/// The search parameters an upstream declares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SearchSupport {
    /// Resource type -> the parameters listed for it.
    by_type: HashMap<String, HashSet<String>>,
    /// Parameters listed for every type (`rest.searchParam`).
    common: HashSet<String>,
    /// Resource type -> the operations listed for it (`rest.resource[].operation[].name`,
    /// without `$`).
    operations: HashMap<String, HashSet<String>>,
}

impl SearchSupport {
    /// Reads the `server` mode `rest` entries of a CapabilityStatement. Anything that is
    /// not shaped as R4 says is skipped, so a malformed statement declares less, never
    /// more.
    pub fn from_capability_statement(cs: &Value) -> SearchSupport {
        let mut out = SearchSupport::default();
        let rests = cs.get("rest").and_then(Value::as_array);
        for rest in rests.into_iter().flatten() {
            if rest.get("mode").and_then(Value::as_str) != Some("server") {
                continue;
            }
            out.common.extend(param_names(rest));
            let resources = rest.get("resource").and_then(Value::as_array);
            for resource in resources.into_iter().flatten() {
                let Some(t) = resource.get("type").and_then(Value::as_str) else {
                    continue;
                };
                out.by_type
                    .entry(t.to_owned())
                    .or_default()
                    .extend(param_names(resource));
                let ops = resource.get("operation").and_then(Value::as_array);
                out.operations.entry(t.to_owned()).or_default().extend(
                    ops.into_iter()
                        .flatten()
                        .filter_map(|o| o.get("name").and_then(Value::as_str))
                        .map(|n| n.trim_start_matches('$').to_owned()),
                );
            }
        }
        out
    }

    /// Whether the upstream declares search parameter `name` (without modifier) for `rt`.
    pub fn declares(&self, rt: ResourceType, name: &str) -> bool {
        self.common.contains(name)
            || self
                .by_type
                .get(rt.as_str())
                .is_some_and(|params| params.contains(name))
    }

    /// Whether the upstream lists operation `name` (without `$`) for `rt`
    /// (`rest.resource[].operation`; `Patient/$match` is decided on it).
    pub fn declares_operation(&self, rt: ResourceType, name: &str) -> bool {
        self.operations
            .get(rt.as_str())
            .is_some_and(|ops| ops.contains(name))
    }

    /// The first client parameter of a search of `rt` that is neither a result
    /// parameter nor declared by the upstream. The name is compared without its
    /// modifier (`code:text` is `code`) and without a chain (`subject.name` is
    /// `subject`; chains are refused elsewhere for restricted tokens).
    pub fn first_undeclared<'a>(
        &self,
        rt: ResourceType,
        params: &'a [(String, String)],
    ) -> Option<&'a str> {
        params.iter().map(|(name, _)| name.as_str()).find(|name| {
            let base = base_name(name);
            !RESULT_PARAMS.contains(&base) && !self.declares(rt, base)
        })
    }
}

/// A parameter's name without modifier or chain.
fn base_name(name: &str) -> &str {
    let end = name.find([':', '.']).unwrap_or(name.len());
    &name[..end]
}

fn param_names(holder: &Value) -> impl Iterator<Item = String> + '_ {
    holder
        .get("searchParam")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| p.get("name").and_then(Value::as_str))
        .map(str::to_owned)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn statement() -> Value {
        json!({
            "resourceType": "CapabilityStatement",
            "rest": [
                {"mode": "client", "searchParam": [{"name": "everything"}]},
                {"mode": "server",
                 "searchParam": [{"name": "_id", "type": "token"}],
                 "resource": [
                    {"type": "Observation", "searchParam": [
                        {"name": "code", "type": "token"},
                        {"name": "patient", "type": "reference"},
                        {"type": "string"}
                    ]},
                    {"type": "Patient", "searchParam": [{"name": "name"}]},
                    {"searchParam": [{"name": "orphan"}]}
                 ]}
            ]
        })
    }

    fn params(names: &[&str]) -> Vec<(String, String)> {
        names
            .iter()
            .map(|n| ((*n).to_owned(), "x".to_owned()))
            .collect()
    }

    #[test]
    fn operations_are_declared_per_type() {
        let cs = json!({"resourceType": "CapabilityStatement", "rest": [
            {"mode": "client", "resource": [{"type": "Observation", "operation": [{"name": "match"}]}]},
            {"mode": "server", "resource": [
                {"type": "Patient", "operation": [{"name": "match", "definition": "x"}, {"name": "$everything"}]},
                {"type": "Observation", "operation": [{"definition": "no name"}]}
            ]}
        ]});
        let s = SearchSupport::from_capability_statement(&cs);
        let obs = ResourceType::parse("Observation").unwrap();
        assert!(s.declares_operation(ResourceType::PATIENT, "match"));
        assert!(s.declares_operation(ResourceType::PATIENT, "everything"));
        assert!(
            !s.declares_operation(obs, "match"),
            "client mode declares nothing"
        );
        let none = SearchSupport::from_capability_statement(&statement());
        assert!(!none.declares_operation(ResourceType::PATIENT, "match"));
    }

    #[test]
    fn declared_parameters_are_per_type_plus_common() {
        let s = SearchSupport::from_capability_statement(&statement());
        let obs = ResourceType::parse("Observation").unwrap();
        assert!(s.declares(obs, "code"));
        assert!(s.declares(obs, "_id"));
        assert!(s.declares(ResourceType::PATIENT, "_id"));
        assert!(
            !s.declares(obs, "name"),
            "Patient's parameter is not Observation's"
        );
        assert!(
            !s.declares(obs, "everything"),
            "client mode entries declare nothing"
        );
        assert!(
            !s.declares(obs, "orphan"),
            "a resource entry without type declares nothing"
        );
    }

    #[test]
    fn modifiers_chains_and_result_parameters() {
        let s = SearchSupport::from_capability_statement(&statement());
        let obs = ResourceType::parse("Observation").unwrap();
        let ok = params(&[
            "code:text",
            "patient.name",
            "_count",
            "_sort",
            "_include",
            "_id",
        ]);
        assert_eq!(s.first_undeclared(obs, &ok), None);
        let bad = params(&["code", "categroy", "value-quantity"]);
        assert_eq!(s.first_undeclared(obs, &bad), Some("categroy"));
        assert_eq!(
            s.first_undeclared(obs, &params(&["categroy:missing"])),
            Some("categroy:missing")
        );
    }

    #[test]
    fn a_statement_without_rest_declares_nothing() {
        for cs in [
            json!({}),
            json!({"rest": "x"}),
            json!({"rest": [{"mode": "server"}]}),
        ] {
            let s = SearchSupport::from_capability_statement(&cs);
            assert_eq!(
                s.first_undeclared(ResourceType::PATIENT, &params(&["name"])),
                Some("name")
            );
            assert_eq!(
                s.first_undeclared(ResourceType::PATIENT, &params(&["_count"])),
                None
            );
        }
    }
}
