//! Test support shared by the verify, dispense and records tests (the other two include this
//! file with `#[path]`): a real embedded deployment in a temporary directory, principals, FHIR
//! submissions, and the pipeline up to a pharmacist's queue.
#![allow(dead_code)]

use std::sync::Arc;

use chrono::{Duration, Utc};
use rx_domain::{PrescriptionRecord, Status};
use rx_guard::access::{grant_break_glass, Principal, Role};
use rx_guard::audit::{Action, AuditEvent, AuditQuery};
use rx_platform::config::Config;
use rx_platform::flow::{load_patient, load_rx, person_cx, Rx};
use rx_platform::services::Embedded;
use rx_platform::{EventKind, Services, SystemClock};
use rx_store::repo::{AuditCtx, PatientFile};
use serde_json::{json, Value};

pub const TENANT: &str = "pharmacy-a";
pub const OTHER_TENANT: &str = "pharmacy-b";

pub const LISINOPRIL: &str = "314076";
pub const AMOXICILLIN: &str = "308192";
pub const OXYCODONE_5: &str = "1049621";
pub const DIAZEPAM_5: &str = "197591";

/// A prescriber the directory knows: JWT subject, NPI, DEA, family name.
#[derive(Debug, Clone, Copy)]
pub struct Doctor {
    pub subject: &'static str,
    pub npi: &'static str,
    pub dea: &'static str,
    pub family: &'static str,
}

pub const DR_PUMP: Doctor = Doctor {
    subject: "dr-pump",
    npi: "1234567893",
    dea: "AP5836727",
    family: "Pump",
};
pub const DR_SMITH: Doctor = Doctor {
    subject: "dr-smith",
    npi: "1987654328",
    dea: "AS1234563",
    family: "Smith",
};

pub const SSN: &str = "999-12-3456";
pub const STREET: &str = "12 Elm Street";
pub const ORDER_NOTE: &str = "Patient prefers blister packs";

/// A real embedded deployment (SQLite file, local key files) in a temporary directory.
pub struct Deployment {
    pub svc: Services,
    _dir: tempfile::TempDir,
}

pub fn open() -> Deployment {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = Config::from_lookup(|_| None).expect("default config");
    config.data_dir = dir.path().join("data");
    config.tenant = TENANT.to_string();
    let embedded = Embedded::open(&config, Arc::new(SystemClock)).expect("embedded deployment");
    Deployment {
        svc: embedded.services,
        _dir: dir,
    }
}

fn principal(subject: &str, role: Role, tenant: &str, mfa: bool, npi: Option<&str>) -> Principal {
    Principal {
        subject: subject.to_string(),
        role,
        tenant: tenant.to_string(),
        mfa,
        npi: npi.map(str::to_string),
        break_glass: None,
    }
}

pub fn prescriber(d: Doctor) -> Principal {
    principal(d.subject, Role::Prescriber, TENANT, true, Some(d.npi))
}

pub fn pharmacist(subject: &str, mfa: bool) -> Principal {
    principal(subject, Role::Pharmacist, TENANT, mfa, None)
}

pub fn pharmacist_of(tenant: &str) -> Principal {
    principal("rph-elsewhere", Role::Pharmacist, tenant, true, None)
}

pub fn technician() -> Principal {
    principal("tech-1", Role::Technician, TENANT, true, None)
}

pub fn auditor() -> Principal {
    principal("auditor-1", Role::Auditor, TENANT, true, None)
}

/// `p` holding an active break-glass grant of their own.
pub fn with_break_glass(p: Principal) -> Principal {
    let grant = grant_break_glass(
        &p,
        "patient unconscious in the emergency department",
        Utc::now(),
        None,
    )
    .expect("break-glass grant");
    p.with_break_glass(grant)
}

/// An order to submit.
#[derive(Debug, Clone)]
pub struct Order {
    pub source_id: String,
    pub patient: String,
    pub rxnorm: &'static str,
    pub display: &'static str,
    pub quantity: f64,
    pub days_supply: u32,
    pub refills: u32,
    pub doctor: Doctor,
    /// A recorded allergy of the patient (substance text).
    pub allergy: Option<&'static str>,
}

impl Order {
    pub fn new(rxnorm: &'static str, display: &'static str) -> Self {
        Order {
            source_id: format!("mr-{}", uuid::Uuid::now_v7()),
            patient: "pat-1".to_string(),
            rxnorm,
            display,
            quantity: 30.0,
            days_supply: 30,
            refills: 0,
            doctor: DR_PUMP,
            allergy: None,
        }
    }
    pub fn lisinopril() -> Self {
        Order::new(LISINOPRIL, "lisinopril 10 MG Oral Tablet")
    }
    pub fn amoxicillin() -> Self {
        Order::new(AMOXICILLIN, "Amoxicillin 500 MG Oral Tablet")
    }
    /// Schedule II, no refills, 20 tablets for 5 days.
    pub fn oxycodone() -> Self {
        Order {
            quantity: 20.0,
            days_supply: 5,
            ..Order::new(OXYCODONE_5, "oxycodone hydrochloride 5 MG Oral Tablet")
        }
    }
    pub fn refills(mut self, n: u32) -> Self {
        self.refills = n;
        self
    }
    pub fn quantity(mut self, q: f64, days: u32) -> Self {
        self.quantity = q;
        self.days_supply = days;
        self
    }
    pub fn by(mut self, d: Doctor) -> Self {
        self.doctor = d;
        self
    }
    pub fn patient(mut self, p: &str) -> Self {
        self.patient = p.to_string();
        self
    }
    pub fn allergic_to(mut self, substance: &'static str) -> Self {
        self.allergy = Some(substance);
        self
    }

    /// The FHIR Bundle a prescriber's system sends: Patient (with SSN and address), Practitioner
    /// (NPI, DEA), maybe an AllergyIntolerance, and the MedicationRequest.
    pub fn bundle(&self) -> Value {
        let authored = (Utc::now() - Duration::days(1)).to_rfc3339();
        let pat = format!("Patient/{}", self.patient);
        let dr_url = format!("urn:uuid:{}", uuid::Uuid::now_v7());
        let mut entries = vec![
            json!({"resource": {
                "resourceType": "Patient", "id": self.patient,
                "identifier": [
                    {"system": "http://hl7.org/fhir/sid/us-ssn", "value": SSN},
                    {"system": "urn:mrn", "value": format!("MRN-{}", self.patient)}
                ],
                "name": [{"given": ["Avery"], "family": "Quinn"}],
                "gender": "female",
                "birthDate": "1961-04-12",
                "telecom": [{"system": "phone", "value": "555-0100"}],
                "address": [{"use": "home", "line": [STREET], "city": "Topeka", "state": "KS"}]
            }}),
            json!({"fullUrl": dr_url, "resource": {
                "resourceType": "Practitioner",
                "identifier": [
                    {"system": "http://hl7.org/fhir/sid/us-npi", "value": self.doctor.npi},
                    {"system": "http://terminology.hl7.org/NamingSystem/DEANumber", "value": self.doctor.dea}
                ],
                "name": [{"family": self.doctor.family, "given": ["Pat"]}]
            }}),
        ];
        if let Some(substance) = self.allergy {
            entries.push(json!({"resource": {
                "resourceType": "AllergyIntolerance", "id": format!("al-{}", self.source_id),
                "code": {"text": substance},
                "patient": {"reference": pat}
            }}));
        }
        entries.push(json!({"resource": {
            "resourceType": "MedicationRequest", "id": self.source_id,
            "status": "active", "intent": "order",
            "medicationCodeableConcept": {"coding": [{
                "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                "code": self.rxnorm, "display": self.display}]},
            "subject": {"reference": pat},
            "authoredOn": authored,
            "requester": {"reference": dr_url},
            "note": [{"text": ORDER_NOTE}],
            "dosageInstruction": [{"text": "1 tablet daily",
                "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}},
                "doseAndRate": [{"doseQuantity": {"value": 1, "unit": "tablet"}}]}],
            "dispenseRequest": {
                "numberOfRepeatsAllowed": self.refills,
                "quantity": {"value": self.quantity, "unit": "tablet"},
                "expectedSupplyDuration": {"value": self.days_supply, "unit": "days", "code": "d"}
            }
        }}));
        json!({"resourceType": "Bundle", "type": "collection", "entry": entries})
    }
}

/// Submit `order` as its prescriber and run it through intake, validate and review; returns the
/// prescription id, now awaiting verification.
pub async fn queued(d: &Deployment, order: &Order) -> String {
    let p = prescriber(order.doctor);
    let cx = person_cx(&p, "intake", None, false);
    let out = rx_fn_intake::handle(&d.svc, &cx, TENANT, &order.bundle())
        .await
        .expect("intake");
    let rx_id = out.accepted[0].rx_id.clone();
    let mut events = out.events;
    while let Some(ev) = events.pop() {
        let next = match ev.kind {
            EventKind::Received => rx_fn_validate::handle(&d.svc, &ev).await.expect("validate"),
            EventKind::Validated => rx_fn_review::handle(&d.svc, &ev).await.expect("review"),
            _ => Vec::new(),
        };
        events.extend(next);
    }
    assert_eq!(
        status(d, &rx_id).await,
        Status::AwaitingVerification,
        "the order did not reach the queue: {:?}",
        stored(d, &rx_id).await.validation
    );
    rx_id
}

/// Approve `rx_id` as a pharmacist with MFA, overriding every alert it carries.
pub async fn verified(d: &Deployment, rx_id: &str) {
    let overrides: Vec<Value> = stored(d, rx_id)
        .await
        .alerts
        .iter()
        .map(|a| json!({"alert": a.kind, "reason": "discussed with the prescriber"}))
        .collect();
    let req = serde_json::from_value(json!({"decision": "approve", "overrides": overrides}))
        .expect("verify request");
    rx_fn_verify::handle(&d.svc, &pharmacist("rph-verifier", true), None, rx_id, &req)
        .await
        .expect("verify");
}

/// What a test reads behind the handlers' back (as a system step, so it is audited too).
fn test_cx() -> AuditCtx {
    AuditCtx::system("test", TENANT)
}

pub async fn load(d: &Deployment, rx_id: &str) -> Rx {
    load_rx(&d.svc, &test_cx(), TENANT, rx_id)
        .await
        .expect("stored prescription")
}

pub async fn stored(d: &Deployment, rx_id: &str) -> PrescriptionRecord {
    load(d, rx_id).await.record
}

pub async fn status(d: &Deployment, rx_id: &str) -> Status {
    load(d, rx_id).await.status
}

pub async fn patient_file(d: &Deployment, patient_ref: &str) -> PatientFile {
    load_patient(&d.svc, &test_cx(), TENANT, patient_ref)
        .await
        .expect("patient read")
        .expect("patient on file")
        .body
}

/// The audit events matching `subject`, `action` and `resource_id` (each when given).
pub async fn audit(
    d: &Deployment,
    subject: Option<&str>,
    action: Option<Action>,
    resource_id: Option<&str>,
) -> Vec<AuditEvent> {
    let q = AuditQuery {
        subject: subject.map(str::to_string),
        action,
        resource_id: resource_id.map(str::to_string),
        ..AuditQuery::default()
    };
    d.svc
        .vault
        .store
        .audit_search(&q)
        .await
        .expect("audit search")
        .iter()
        .map(|c| serde_json::from_slice(&c.body).expect("audit event decodes"))
        .collect()
}

/// The denials recorded against `subject`.
pub async fn denials(d: &Deployment, subject: &str) -> Vec<AuditEvent> {
    audit(d, Some(subject), Some(Action::Deny), None).await
}

/// Number of stored transitions of `rx_id`.
pub async fn transitions(d: &Deployment, rx_id: &str) -> usize {
    d.svc
        .vault
        .store
        .transitions(TENANT, rx_id)
        .await
        .expect("transitions")
        .len()
}
