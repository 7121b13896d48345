//! The prescription model every step shares.
//!
//! Everything in [`PrescriptionRecord`], [`PatientRecord`] and [`PrescriberRecord`] is sealed at
//! rest by rx-guard; only [`crate::Status`], versions, timestamps and the tenant travel in clear.

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

/// A code from a terminology (RxNorm, NDC, SNOMED CT, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coding {
    pub system: String,
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
}

pub const RXNORM: &str = "http://www.nlm.nih.gov/research/umls/rxnorm";
pub const NDC: &str = "http://hl7.org/fhir/sid/ndc";
pub const NPI_SYSTEM: &str = "http://hl7.org/fhir/sid/us-npi";
pub const DEA_SYSTEM: &str = "http://terminology.hl7.org/NamingSystem/DEANumber";

/// The product ordered, as the order names it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MedicationCode {
    /// RxNorm concept (SCD/SBD/...) when the order carries one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rxnorm: Option<String>,
    /// NDC normalized to 11 digits (5-4-2) when the order carries one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ndc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
}

/// Who wrote the order, as the order refers to them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "by", content = "value", rename_all = "kebab-case")]
pub enum PrescriberRef {
    /// `Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|<npi>` or an NPI identifier.
    Npi(String),
    /// A literal reference (`Practitioner/<id>`, `urn:uuid:<id>`): the id part.
    Reference(String),
    /// A contained Practitioner or one resolved from a Bundle.
    Inline(Box<PrescriberRecord>),
    #[default]
    Missing,
}

impl PrescriberRef {
    pub fn is_missing(&self) -> bool {
        matches!(self, PrescriberRef::Missing)
    }
}

/// One structured dose of a dosage instruction.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Dosage {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Amount per administration in the product's unit (e.g. 1 tablet, 5 mL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dose_quantity: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dose_unit: Option<String>,
    /// Administrations per day, from timing.repeat (frequency / period in days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_day: Option<f64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub as_needed: bool,
}

/// A prescriber's order as received (parsed from a FHIR MedicationRequest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MedicationOrder {
    /// The FHIR resource id in the source system.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_id: Option<String>,
    /// FHIR MedicationRequest.status (active, on-hold, cancelled, completed, entered-in-error,
    /// stopped, draft, unknown). Empty only in a patient's medication profile, which keeps
    /// what review reads and no more (so are the intent and patient reference).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub status: String,
    /// FHIR MedicationRequest.intent (proposal, plan, order, original-order, ...).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub intent: String,
    /// The patient reference id (`Patient/<id>` → `<id>`, `urn:uuid:<id>` → `<id>`). PHI.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub patient_ref: String,
    #[serde(default, skip_serializing_if = "PrescriberRef::is_missing")]
    pub requester: PrescriberRef,
    pub medication: MedicationCode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authored_on: Option<DateTime<Utc>>,
    /// dispenseRequest.quantity.value
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantity: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantity_unit: Option<String>,
    /// dispenseRequest.expectedSupplyDuration in days
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub days_supply: Option<u32>,
    /// dispenseRequest.numberOfRepeatsAllowed (refills); `Some(0)` means no refills.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refills: Option<u32>,
    /// dispenseRequest.validityPeriod.end
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_until: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dosage: Vec<Dosage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A human name, address or contact as FHIR gives them (all PHI).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PatientRecord {
    /// The patient's id in the source system (in Synthea exports it equals the MRN). PHI.
    pub source_id: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identifiers: Vec<Coding>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub birth_date: Option<NaiveDate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gender: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allergies: Vec<Allergy>,
}

impl PatientRecord {
    /// The patient's SSN when the record carries one (`http://hl7.org/fhir/sid/us-ssn`).
    pub fn ssn(&self) -> Option<&str> {
        self.identifiers
            .iter()
            .find(|c| c.system == "http://hl7.org/fhir/sid/us-ssn")
            .map(|c| c.code.as_str())
    }
}

/// An allergy or intolerance on file for a patient.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Allergy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_id: Option<String>,
    /// Codes of the substance (RxNorm ingredient, SNOMED CT, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub codes: Vec<Coding>,
    /// The substance as text (code.text or the first display).
    pub substance: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub criticality: Option<String>,
    /// active / inactive / resolved; absent counts as active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clinical_status: Option<String>,
}

/// A prescriber as the directory knows them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrescriberRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub npi: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dea: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// How serious a finding is. `High` blocks automatic verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Severity {
    Low,
    Moderate,
    High,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Moderate => "moderate",
            Severity::High => "high",
        }
    }
}

/// The kinds of drug-utilization-review alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AlertKind {
    /// ONC high-priority drug–drug interaction pair.
    DrugInteraction,
    /// Opioid with a benzodiazepine.
    OpioidBenzodiazepine,
    /// Allergy to an ingredient of the product.
    Allergy,
    /// The same ingredient on two active orders.
    DuplicateTherapy,
    /// Opioid daily dose ≥ 50 or ≥ 90 MME/day.
    HighMme,
    /// A fill before the previous supply would run out.
    EarlyRefill,
    /// The product is not in the reference table: a pharmacist must review it.
    UnknownProduct,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::DrugInteraction => "drug-interaction",
            AlertKind::OpioidBenzodiazepine => "opioid-benzodiazepine",
            AlertKind::Allergy => "allergy",
            AlertKind::DuplicateTherapy => "duplicate-therapy",
            AlertKind::HighMme => "high-mme",
            AlertKind::EarlyRefill => "early-refill",
            AlertKind::UnknownProduct => "unknown-product",
        }
    }
}

/// What an alert rests on: another order, an allergy, a computed dose.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// "order", "allergy", "dose", "product"
    pub kind: String,
    /// The other order's prescription id, the allergy's source id, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// e.g. "oxycodone 10 MG (MME factor 1.5) × 4/day = 60 MME/day"
    pub detail: String,
}

/// A drug-utilization-review alert for the pharmacist.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub kind: AlertKind,
    pub severity: Severity,
    /// A sentence a pharmacist understands (names drugs: sealed with the record).
    pub message: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evidence: Vec<Evidence>,
}

impl Alert {
    pub fn is_blocking(&self) -> bool {
        self.severity == Severity::High
    }
}

/// Why validation or a pharmacist decided as they did. `code` is a stable, PHI-free rule code
/// (e.g. `dea-required`, `npi-invalid`); `message` is the sentence for a person.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reason {
    pub code: String,
    pub message: String,
}

impl Reason {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Reason {
            code: code.into(),
            message: message.into(),
        }
    }
}

/// The outcome of validation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", content = "reasons", rename_all = "kebab-case")]
pub enum Validation {
    Valid,
    Rejected(Vec<Reason>),
    NeedsClarification(Vec<Reason>),
}

/// A pharmacist's decision on an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verification {
    pub pharmacist: String,
    pub at: DateTime<Utc>,
    pub approved: bool,
    /// For each overridden alert: its kind and the pharmacist's reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<Override>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Override {
    pub alert: AlertKind,
    pub reason: String,
}

/// One fill of an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fill {
    /// The dispense id (returned as the MedicationDispense id).
    pub id: String,
    pub at: DateTime<Utc>,
    pub quantity: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub days_supply: Option<u32>,
    /// The pharmacist who filled it (empty in a patient's medication profile, which keeps only
    /// what early-refill review reads).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub by: String,
    /// 0 for the original fill, 1.. for refills.
    pub refill_number: u32,
    pub partial: bool,
    /// The client's key for the request that made this fill (`requestId` or the
    /// `Idempotency-Key` header): the same request again is answered with this fill.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// The sealed body of a prescription: the order, what every step found, and the fills.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrescriptionRecord {
    pub order: MedicationOrder,
    /// The prescriber as resolved at intake (None when the directory did not know them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prescriber: Option<PrescriberRecord>,
    /// Who submitted it (JWT subject or the CLI's operator).
    pub submitted_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<Validation>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<Alert>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<Verification>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fills: Vec<Fill>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancellation: Option<Reason>,
}

impl PrescriptionRecord {
    pub fn new(order: MedicationOrder, submitted_by: impl Into<String>) -> Self {
        PrescriptionRecord {
            order,
            prescriber: None,
            submitted_by: submitted_by.into(),
            validation: None,
            alerts: Vec::new(),
            verification: None,
            fills: Vec::new(),
            cancellation: None,
        }
    }

    /// The reasons behind the record's current outcome (validation, verification, cancellation).
    pub fn reasons(&self) -> Vec<&Reason> {
        let mut out = Vec::new();
        if let Some(Validation::Rejected(r) | Validation::NeedsClarification(r)) = &self.validation
        {
            out.extend(r.iter());
        }
        if let Some(v) = &self.verification {
            out.extend(v.reason.iter());
        }
        out.extend(self.cancellation.iter());
        out
    }
}
