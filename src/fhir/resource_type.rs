//! The closed set of FHIR R4 (4.0.1) resource type names.
//!
//! Resource types are matched case-sensitively, exactly as the specification spells
//! them: `observation` or `OBSERVATION` is not a resource type and is refused before
//! anything is forwarded. A [`ResourceType`] can only be made from this list, so
//! holding one proves the name is valid.

use std::fmt;

/// Every R4 resource type, sorted so that lookup is a binary search.
const NAMES: [&str; 146] = [
    "Account",
    "ActivityDefinition",
    "AdverseEvent",
    "AllergyIntolerance",
    "Appointment",
    "AppointmentResponse",
    "AuditEvent",
    "Basic",
    "Binary",
    "BiologicallyDerivedProduct",
    "BodyStructure",
    "Bundle",
    "CapabilityStatement",
    "CarePlan",
    "CareTeam",
    "CatalogEntry",
    "ChargeItem",
    "ChargeItemDefinition",
    "Claim",
    "ClaimResponse",
    "ClinicalImpression",
    "CodeSystem",
    "Communication",
    "CommunicationRequest",
    "CompartmentDefinition",
    "Composition",
    "ConceptMap",
    "Condition",
    "Consent",
    "Contract",
    "Coverage",
    "CoverageEligibilityRequest",
    "CoverageEligibilityResponse",
    "DetectedIssue",
    "Device",
    "DeviceDefinition",
    "DeviceMetric",
    "DeviceRequest",
    "DeviceUseStatement",
    "DiagnosticReport",
    "DocumentManifest",
    "DocumentReference",
    "EffectEvidenceSynthesis",
    "Encounter",
    "Endpoint",
    "EnrollmentRequest",
    "EnrollmentResponse",
    "EpisodeOfCare",
    "EventDefinition",
    "Evidence",
    "EvidenceVariable",
    "ExampleScenario",
    "ExplanationOfBenefit",
    "FamilyMemberHistory",
    "Flag",
    "Goal",
    "GraphDefinition",
    "Group",
    "GuidanceResponse",
    "HealthcareService",
    "ImagingStudy",
    "Immunization",
    "ImmunizationEvaluation",
    "ImmunizationRecommendation",
    "ImplementationGuide",
    "InsurancePlan",
    "Invoice",
    "Library",
    "Linkage",
    "List",
    "Location",
    "Measure",
    "MeasureReport",
    "Media",
    "Medication",
    "MedicationAdministration",
    "MedicationDispense",
    "MedicationKnowledge",
    "MedicationRequest",
    "MedicationStatement",
    "MedicinalProduct",
    "MedicinalProductAuthorization",
    "MedicinalProductContraindication",
    "MedicinalProductIndication",
    "MedicinalProductIngredient",
    "MedicinalProductInteraction",
    "MedicinalProductManufactured",
    "MedicinalProductPackaged",
    "MedicinalProductPharmaceutical",
    "MedicinalProductUndesirableEffect",
    "MessageDefinition",
    "MessageHeader",
    "MolecularSequence",
    "NamingSystem",
    "NutritionOrder",
    "Observation",
    "ObservationDefinition",
    "OperationDefinition",
    "OperationOutcome",
    "Organization",
    "OrganizationAffiliation",
    "Parameters",
    "Patient",
    "PaymentNotice",
    "PaymentReconciliation",
    "Person",
    "PlanDefinition",
    "Practitioner",
    "PractitionerRole",
    "Procedure",
    "Provenance",
    "Questionnaire",
    "QuestionnaireResponse",
    "RelatedPerson",
    "RequestGroup",
    "ResearchDefinition",
    "ResearchElementDefinition",
    "ResearchStudy",
    "ResearchSubject",
    "RiskAssessment",
    "RiskEvidenceSynthesis",
    "Schedule",
    "SearchParameter",
    "ServiceRequest",
    "Slot",
    "Specimen",
    "SpecimenDefinition",
    "StructureDefinition",
    "StructureMap",
    "Subscription",
    "Substance",
    "SubstanceNucleicAcid",
    "SubstancePolymer",
    "SubstanceProtein",
    "SubstanceReferenceInformation",
    "SubstanceSourceMaterial",
    "SubstanceSpecification",
    "SupplyDelivery",
    "SupplyRequest",
    "Task",
    "TerminologyCapabilities",
    "TestReport",
    "TestScript",
    "ValueSet",
    "VerificationResult",
    "VisionPrescription",
];

/// For each capital letter, the range of `NAMES` starting with it.
const BY_FIRST_LETTER: [(u8, u8); 26] = {
    let mut out = [(0u8, 0u8); 26];
    let mut i = 0;
    while i < NAMES.len() {
        let letter = (NAMES[i].as_bytes()[0] - b'A') as usize;
        if out[letter].1 == 0 {
            out[letter].0 = i as u8;
        }
        out[letter].1 = i as u8 + 1;
        i += 1;
    }
    out
};

/// A valid FHIR R4 resource type name. Cheap to copy and compare.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceType(&'static str);

impl ResourceType {
    /// Looks a name up in the R4 list; `None` for anything else (case-sensitive).
    pub fn parse(name: &str) -> Option<Self> {
        // Called for every record and reference of an answer: search only the names
        // with the same first letter (at most 14).
        let first = *name.as_bytes().first()?;
        let (from, to) = *BY_FIRST_LETTER.get(usize::from(first.wrapping_sub(b'A')))?;
        let names = NAMES.get(usize::from(from)..usize::from(to))?;
        names
            .binary_search(&name)
            .ok()
            .and_then(|i| names.get(i))
            .map(|n| ResourceType(n))
    }

    pub fn as_str(&self) -> &'static str {
        self.0
    }

    /// All R4 resource types, in name order.
    pub fn all() -> impl Iterator<Item = ResourceType> {
        NAMES.iter().map(|n| ResourceType(n))
    }

    pub const PATIENT: ResourceType = ResourceType("Patient");
    pub const PRACTITIONER: ResourceType = ResourceType("Practitioner");
    pub const PRACTITIONER_ROLE: ResourceType = ResourceType("PractitionerRole");
    pub const RELATED_PERSON: ResourceType = ResourceType("RelatedPerson");
    pub const BUNDLE: ResourceType = ResourceType("Bundle");
    pub const OPERATION_OUTCOME: ResourceType = ResourceType("OperationOutcome");
}

impl fmt::Display for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl fmt::Debug for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_is_sorted_and_unique() {
        assert!(NAMES.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn parse_finds_every_name_and_nothing_else() {
        for n in NAMES {
            assert_eq!(ResourceType::parse(n).map(|t| t.as_str()), Some(n));
            assert!(ResourceType::parse(&n.to_lowercase()).is_none());
            assert!(ResourceType::parse(&format!("{n}x")).is_none());
            assert!(ResourceType::parse(&n[..n.len() - 1]).is_none());
        }
        for odd in [
            "",
            "@",
            "[",
            "\u{0}",
            "é",
            "Zebra",
            "Yak",
            "Quux",
            "Xylophone",
        ] {
            assert!(ResourceType::parse(odd).is_none(), "{odd}");
        }
    }

    #[test]
    fn parse_is_exact() {
        assert_eq!(
            ResourceType::parse("Observation").map(|t| t.as_str()),
            Some("Observation")
        );
        assert!(ResourceType::parse("observation").is_none());
        assert!(ResourceType::parse("OBSERVATION").is_none());
        assert!(ResourceType::parse("Observation ").is_none());
        assert!(ResourceType::parse("").is_none());
        assert!(ResourceType::parse("Foo").is_none());
        assert_eq!(ResourceType::parse("Patient"), Some(ResourceType::PATIENT));
        assert_eq!(
            ResourceType::parse("PractitionerRole"),
            Some(ResourceType::PRACTITIONER_ROLE)
        );
    }

    #[test]
    fn constants_are_in_the_list() {
        for t in [
            ResourceType::PATIENT,
            ResourceType::PRACTITIONER,
            ResourceType::PRACTITIONER_ROLE,
            ResourceType::RELATED_PERSON,
            ResourceType::BUNDLE,
            ResourceType::OPERATION_OUTCOME,
        ] {
            assert_eq!(ResourceType::parse(t.as_str()), Some(t));
        }
    }
}
