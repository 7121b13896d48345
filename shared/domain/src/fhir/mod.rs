//! FHIR R4 in and out.
//!
//! In: MedicationRequest, Patient, Practitioner and AllergyIntolerance, alone (an NDJSON line of a
//! bulk export, a POST body) or in a Bundle ([`parse_submission`]). Real exports differ from the
//! spec's happy path; the parsers accept what Synthea and the HL7 examples do (conditional NPI
//! requester references, contained Medications, orders without dispenseRequest or dosage, dates
//! without a time) and name the path of anything they cannot use.
//!
//! Out: OperationOutcome for every client error, MedicationDispense for a fill and a
//! MedicationRequest view of a stored record.
//!
//! A [`FhirError`] names a path and what is wrong there, never the value found: values may be PHI.

mod input;
mod json;
mod output;

pub use output::{
    medication_dispense, medication_request, operation_outcome, operation_outcome_issues,
    ALERT_KIND_SYSTEM, REASON_SYSTEM, WORKFLOW_STATUS_EXTENSION,
};

use crate::model::{Allergy, MedicationOrder, PatientRecord, PrescriberRecord};
use json::{as_obj, err, get, objs, opt_str};
use serde_json::Value;
use std::collections::HashMap;

/// Input that is not usable FHIR: where (a FHIRPath-like `path`) and what is wrong. Never carries
/// the value found there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct FhirError {
    /// e.g. `MedicationRequest.subject`, `Bundle.entry[2].resource.dispenseRequest.quantity.value`
    pub path: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// One resource as rxflow understands it.
#[derive(Debug, Clone, PartialEq)]
pub enum Resource {
    MedicationRequest(MedicationOrder),
    Patient(PatientRecord),
    Practitioner(PrescriberRecord),
    AllergyIntolerance {
        patient_ref: String,
        allergy: Allergy,
    },
    /// Any other resource type (Organization, Encounter, ...): not used, not an error.
    Other(String),
}

impl Resource {
    /// The FHIR resource type.
    pub fn type_name(&self) -> &str {
        match self {
            Resource::MedicationRequest(_) => "MedicationRequest",
            Resource::Patient(_) => "Patient",
            Resource::Practitioner(_) => "Practitioner",
            Resource::AllergyIntolerance { .. } => "AllergyIntolerance",
            Resource::Other(kind) => kind,
        }
    }
}

/// What a `POST /prescriptions` body or a Bundle holds. Allergies stay beside the patients (by
/// patient reference id) rather than inside them, as in a bulk export.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Submission {
    pub orders: Vec<MedicationOrder>,
    pub patients: Vec<PatientRecord>,
    pub prescribers: Vec<PrescriberRecord>,
    pub allergies: Vec<(String, Allergy)>,
}

/// Parses one resource by its `resourceType`.
pub fn parse_resource(v: &Value) -> Result<Resource, FhirError> {
    let o = as_obj(v, "resource")?;
    let rt = opt_str(o, "resourceType", "resource")?.ok_or_else(|| {
        err(
            "resource.resourceType",
            "is required: every FHIR resource names its resourceType",
        )
    })?;
    Ok(match rt {
        "MedicationRequest" => Resource::MedicationRequest(parse_medication_request(v)?),
        "Patient" => Resource::Patient(parse_patient(v)?),
        "Practitioner" => Resource::Practitioner(parse_practitioner(v)?),
        "AllergyIntolerance" => {
            let (patient_ref, allergy) = parse_allergy(v)?;
            Resource::AllergyIntolerance {
                patient_ref,
                allergy,
            }
        }
        other => Resource::Other(other.to_owned()),
    })
}

/// Parses one line of an NDJSON bulk-export file (or any FHIR JSON text). A syntax error names the
/// line's column, not its content.
pub fn parse_json(text: &str) -> Result<Resource, FhirError> {
    let v: Value = serde_json::from_str(text).map_err(|e| {
        err(
            format!("(line {}, column {})", e.line(), e.column()),
            "is not valid JSON: each line of an NDJSON file must hold one complete FHIR resource",
        )
    })?;
    parse_resource(&v)
}

pub fn parse_medication_request(v: &Value) -> Result<MedicationOrder, FhirError> {
    input::medication_request(v, "MedicationRequest", None)
}

/// Name (given + family), birthDate, gender, address, phone and every identifier (MRN, SSN,
/// driver's licence, passport, ...: system + value, the identifier type code as display).
pub fn parse_patient(v: &Value) -> Result<PatientRecord, FhirError> {
    input::patient(v, "Patient", None)
}

/// NPI (system us-npi or type NPI) and DEA (DEA system or type code DEA) identifiers and name.
pub fn parse_practitioner(v: &Value) -> Result<PrescriberRecord, FhirError> {
    input::practitioner(v, "Practitioner")
}

/// The patient reference id and the allergy (codes, substance text, criticality, clinicalStatus).
pub fn parse_allergy(v: &Value) -> Result<(String, Allergy), FhirError> {
    input::allergy(v, "AllergyIntolerance", None)
}

const BUNDLE_TYPES: [&str; 4] = ["collection", "transaction", "batch", "searchset"];

/// A single MedicationRequest, or a Bundle (collection, transaction, batch, searchset) of
/// MedicationRequests with the Patients, Practitioners, AllergyIntolerances and Medications they
/// reference. Inside a Bundle, references resolve by `fullUrl` (`urn:uuid:...`) or `Type/id`; a
/// requester that resolves to a Bundle Practitioner (also through a PractitionerRole, or a
/// conditional NPI reference matching one) becomes [`crate::PrescriberRef::Inline`], and an order's
/// `patient_ref` is the id of the Bundle Patient it references. Other resource types are skipped.
/// A Bundle without orders is not an error here: the caller decides.
pub fn parse_submission(v: &Value) -> Result<Submission, FhirError> {
    let o = as_obj(v, "resource")?;
    match opt_str(o, "resourceType", "resource")? {
        Some("MedicationRequest") => Ok(Submission {
            orders: vec![parse_medication_request(v)?],
            ..Submission::default()
        }),
        Some("Bundle") => parse_bundle(v),
        _ => Err(err(
            "resource.resourceType",
            "must be MedicationRequest or Bundle: send one order, or a Bundle of orders with their patients and prescribers",
        )),
    }
}

fn parse_bundle(v: &Value) -> Result<Submission, FhirError> {
    let o = as_obj(v, "Bundle")?;
    match opt_str(o, "type", "Bundle")? {
        Some(t) if BUNDLE_TYPES.contains(&t) => {}
        _ => {
            return Err(err(
                "Bundle.type",
                "must be collection, transaction, batch or searchset",
            ))
        }
    }
    let ix = Index::build(o)?;
    let mut out = Submission::default();
    for e in &ix.entries {
        let path = e.path.as_str();
        match e.resource_type {
            "MedicationRequest" => {
                out.orders
                    .push(input::medication_request(e.resource, path, Some(&ix))?)
            }
            "Patient" => out
                .patients
                .push(input::patient(e.resource, path, e.full_url_id)?),
            "Practitioner" => {
                if let Some(p) = ix.practitioners.iter().find(|(i, _)| *i == e.index) {
                    out.prescribers.push(p.1.clone());
                }
            }
            "AllergyIntolerance" => {
                out.allergies
                    .push(input::allergy(e.resource, path, Some(&ix))?)
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The id part of a reference: `Patient/abc` → `abc`, `Patient/abc/_history/2` → `abc`,
/// `https://x/fhir/Patient/abc` → `abc`, `urn:uuid:abc` → `abc`, `#abc` (contained) → `abc`.
/// `None` for a conditional reference (`Type?query`) or text that is not a reference.
pub fn reference_id(reference: &str) -> Option<&str> {
    let r = reference.trim();
    if r.contains('?') {
        return None;
    }
    let id = if let Some(x) = r.strip_prefix('#') {
        x
    } else if let Some(x) = r
        .strip_prefix("urn:uuid:")
        .or_else(|| r.strip_prefix("urn:oid:"))
    {
        x
    } else {
        let r = r.find("/_history/").map_or(r, |i| &r[..i]);
        let (head, id) = r.rsplit_once('/')?;
        if head.is_empty() {
            return None;
        }
        id
    };
    (!id.is_empty() && !id.contains(char::is_whitespace)).then_some(id)
}

/// The resource type of a literal `Type/id` reference (`None` for `urn:`, `#` and conditional ones).
pub(crate) fn reference_type(reference: &str) -> Option<&str> {
    let r = reference.trim();
    if r.starts_with('#') || r.starts_with("urn:") || r.contains('?') {
        return None;
    }
    let r = r.find("/_history/").map_or(r, |i| &r[..i]);
    let (head, _) = r.rsplit_once('/')?;
    head.rsplit('/').next().filter(|t| !t.is_empty())
}

/// A Bundle's entries, found by fullUrl or `Type/id`.
pub(crate) struct Index<'a> {
    entries: Vec<Entry<'a>>,
    by_key: HashMap<String, usize>,
    /// Practitioners, parsed once (entry position, record).
    practitioners: Vec<(usize, PrescriberRecord)>,
}

struct Entry<'a> {
    index: usize,
    path: String,
    resource: &'a Value,
    resource_type: &'a str,
    full_url_id: Option<&'a str>,
}

impl<'a> Index<'a> {
    fn build(bundle: &'a json::Obj) -> Result<Self, FhirError> {
        let mut ix = Index {
            entries: Vec::new(),
            by_key: HashMap::new(),
            practitioners: Vec::new(),
        };
        for (i, e) in objs(bundle, "entry", "Bundle")? {
            let ep = format!("Bundle.entry[{i}]");
            let Some(resource) = get(e, "resource") else {
                continue;
            };
            let path = format!("{ep}.resource");
            let ro = as_obj(resource, &path)?;
            let resource_type = opt_str(ro, "resourceType", &path)?.ok_or_else(|| {
                err(
                    format!("{path}.resourceType"),
                    "is required: every FHIR resource names its resourceType",
                )
            })?;
            let full_url = opt_str(e, "fullUrl", &ep)?;
            let pos = ix.entries.len();
            if let Some(u) = full_url {
                ix.by_key.insert(u.to_owned(), pos);
            }
            if let Some(id) = opt_str(ro, "id", &path)? {
                ix.by_key.insert(format!("{resource_type}/{id}"), pos);
            }
            if resource_type == "Practitioner" {
                ix.practitioners
                    .push((i, input::practitioner(resource, &path)?));
            }
            ix.entries.push(Entry {
                index: i,
                path,
                resource,
                resource_type,
                full_url_id: full_url.and_then(reference_id),
            });
        }
        Ok(ix)
    }

    fn entry(&self, reference: &str) -> Option<&Entry<'a>> {
        let r = reference.trim();
        let pos = self.by_key.get(r).or_else(|| {
            // An absolute URL or a versioned reference: match on its Type/id.
            let id = reference_id(r)?;
            let ty = reference_type(r)?;
            self.by_key.get(&format!("{ty}/{id}"))
        })?;
        self.entries.get(*pos)
    }

    /// The resource a reference points at, with its path for errors.
    pub(crate) fn resolve(&self, reference: &str) -> Option<(&'a Value, String)> {
        self.entry(reference).map(|e| (e.resource, e.path.clone()))
    }

    /// The id of the Bundle Patient a reference points at (its id, else its fullUrl's id).
    pub(crate) fn patient_id(&self, reference: &str) -> Option<String> {
        if let Some((ty, query)) = reference.split_once('?') {
            if ty != "Patient" {
                return None;
            }
            // Patient?identifier=<system>|<value>: a Bundle Patient carrying that identifier.
            let value = json::percent_decode(query)
                .split('&')
                .find_map(|p| p.strip_prefix("identifier=").map(str::to_owned))?;
            let value = value.rsplit('|').next()?.to_owned();
            return self
                .entries
                .iter()
                .filter(|e| e.resource_type == "Patient")
                .find(|e| {
                    input::patient(e.resource, &e.path, e.full_url_id)
                        .is_ok_and(|p| p.identifiers.iter().any(|c| c.code == value))
                })
                .and_then(|e| self.entry_id(e));
        }
        let e = self.entry(reference)?;
        (e.resource_type == "Patient")
            .then(|| self.entry_id(e))
            .flatten()
    }

    fn entry_id(&self, e: &Entry<'a>) -> Option<String> {
        e.resource
            .get("id")
            .and_then(Value::as_str)
            .filter(|s| !s.trim().is_empty())
            .or(e.full_url_id)
            .map(str::to_owned)
    }

    /// The Bundle Practitioner a reference points at, directly or through one PractitionerRole
    /// (whose `practitioner` names a Practitioner, never another role: roles that point at roles,
    /// in a cycle or a chain, resolve to nothing instead of being followed).
    pub(crate) fn practitioner(
        &self,
        reference: &str,
    ) -> Result<Option<PrescriberRecord>, FhirError> {
        let Some(e) = self.entry(reference) else {
            return Ok(None);
        };
        let e = match e.resource_type {
            "Practitioner" => e,
            "PractitionerRole" => {
                let ro = as_obj(e.resource, &e.path)?;
                let Some(p) = json::opt_obj(ro, "practitioner", &e.path)? else {
                    return Ok(None);
                };
                let pp = format!("{}.practitioner", e.path);
                match opt_str(p, "reference", &pp)?.and_then(|r| self.entry(r)) {
                    Some(t) if t.resource_type == "Practitioner" => t,
                    _ => return Ok(None),
                }
            }
            _ => return Ok(None),
        };
        Ok(self
            .practitioners
            .iter()
            .find(|(i, _)| *i == e.index)
            .map(|(_, p)| p.clone()))
    }

    /// The Bundle Practitioner with this NPI.
    pub(crate) fn practitioner_by_npi(
        &self,
        npi: &str,
    ) -> Result<Option<PrescriberRecord>, FhirError> {
        Ok(self
            .practitioners
            .iter()
            .find(|(_, p)| p.npi.as_deref() == Some(npi))
            .map(|(_, p)| p.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_id_takes_the_id_of_every_reference_form() {
        assert_eq!(reference_id("Patient/abc"), Some("abc"));
        assert_eq!(reference_id("Patient/abc/_history/3"), Some("abc"));
        assert_eq!(
            reference_id("https://ehr.example/fhir/Patient/abc"),
            Some("abc")
        );
        assert_eq!(reference_id("urn:uuid:abc"), Some("abc"));
        assert_eq!(reference_id("#med0302"), Some("med0302"));
        assert_eq!(
            reference_id("Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|1234567893"),
            None
        );
        assert_eq!(reference_id("abc"), None);
        assert_eq!(reference_id(""), None);
        assert_eq!(reference_id("Patient/"), None);
    }

    #[test]
    fn reference_type_names_literal_references_only() {
        assert_eq!(reference_type("Patient/abc"), Some("Patient"));
        assert_eq!(
            reference_type("https://x/fhir/Practitioner/1/_history/2"),
            Some("Practitioner")
        );
        assert_eq!(reference_type("urn:uuid:abc"), None);
        assert_eq!(reference_type("#abc"), None);
    }
}
