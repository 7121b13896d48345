//! A deterministic synthetic cohort in FHIR bulk-export shape: the demo's input.
//!
//! [`cohort`] builds the small directory part (Practitioners, Patients, AllergyIntolerances);
//! [`orders`] streams the MedicationRequests in the order they arrive, each built from the seed and its
//! position alone (O(1) memory per order), so 100,000 orders cost no more memory than 200.
//!
//! Everything is obviously synthetic: names carry digits (as Synthea's do), SSNs start with 999
//! (never issued), phones use the 555 area code, NPIs start with 999.
//!
//! # How every rule fires
//! The stream is cut into blocks of [`BLOCK`] orders. In each block, 30 fixed slots hold the planned
//! cases ([`Case`]): controlled substances from prescribers with and without a DEA number, with a
//! DEA number that fails its check digit and with one whose registrant type may not prescribe,
//! schedule II with refills, schedule III–IV with more than five refills, controlled orders
//! missing quantity or days supply, a bad NPI, an NDC that is not a valid NDC, stopped and
//! plan-intent orders, a postdated order, a non-controlled order past its one-year expiry and a
//! schedule III–IV order past its six-month fill window, opioid + benzodiazepine, an ONC
//! high-priority interaction, a clinical warfarin interaction, allergies (by ingredient and by
//! class), duplicate therapy, high MME (≥ 50 and ≥ 90), an early refill and an unknown product.
//! Pairs put the setup order early in the block and the trigger about 100 slots later, for the
//! same patient. Every other slot (~77%) is a clean order. So any run of at least 200 orders
//! holds every case.
//!
//! Each order's `meta.lastUpdated` is when it reaches the pharmacy ([`arrival`]); the stream
//! comes in that order. `authoredOn` is the same instant, except for the orders about dates:
//! written 400 or 200 days before they arrive, or dated three days after.
//!
//! Products come from [`DrugTable::embedded`] by class and ingredient, so codes stay consistent
//! with the table. Clean orders use a "regimen pool" of non-controlled oral products that share no
//! ingredient with any planned case, interact with nothing in the table and match no allergy on
//! file; each patient gets distinct pool products visit after visit, so clean orders raise no alert.
//!
//! Each order carries its planned case in `meta.tag` (system [`CASE_TAG_SYSTEM`]); read it back
//! with [`planned_case`].

use crate::drugs::{DrugTable, Product, Schedule};
use crate::ids::{npi_is_valid, parse_dea};
use crate::{AlertKind, Severity, DEA_SYSTEM, NPI_SYSTEM, RXNORM};
use chrono::{DateTime, Duration, NaiveDate, Utc};
use serde_json::{json, Value};

/// Orders per block; every planned case appears once per full block.
pub const BLOCK: usize = 128;
const FIRST_SLOT: usize = 3;
const SLOT_STRIDE: usize = 4;
/// Minutes between consecutive orders (each order falls at a seeded point inside its interval).
pub const MINUTES_PER_ORDER: i64 = 2;
/// Tag system of the planned case on each generated order.
pub const CASE_TAG_SYSTEM: &str = "https://rxflow.dev/fhir/CodeSystem/synthetic-case";
const SSN_SYSTEM: &str = "http://hl7.org/fhir/sid/us-ssn";
const MRN_SYSTEM: &str = "https://rxflow.dev/fhir/sid/synthetic-mrn";
const DL_SYSTEM: &str = "urn:oid:2.16.840.1.113883.4.3.20";
const V2_0203: &str = "http://terminology.hl7.org/CodeSystem/v2-0203";
const SNOMED: &str = "http://snomed.info/sct";
const UCUM: &str = "http://unitsofmeasure.org";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CohortConfig {
    pub seed: u64,
    pub orders: usize,
    /// When the first order arrives; order `i` arrives in `[start + 2i min, start + 2(i+1) min)`.
    pub start: DateTime<Utc>,
}

impl CohortConfig {
    /// About one patient per eight orders (at least 32, so every allergy group exists).
    pub fn patients(&self) -> usize {
        self.orders.div_ceil(8).max(32)
    }

    /// One prescriber per 50 orders, between 20 and 500.
    pub fn practitioners(&self) -> usize {
        (self.orders / 50).clamp(20, 500)
    }
}

/// The directory part of the cohort, as FHIR resources.
#[derive(Debug, Clone, PartialEq)]
pub struct Cohort {
    pub practitioners: Vec<Value>,
    pub patients: Vec<Value>,
    pub allergies: Vec<Value>,
}

/// A planned case: what the order is meant to exercise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Case {
    /// No rule should fire: validated, no alert, dispensable.
    Clean,
    ControlledWithDea,
    ControlledWithoutDea,
    /// A controlled substance by a prescriber whose DEA number fails its check digit.
    ControlledBadDea,
    /// A controlled substance by a prescriber whose DEA registration is a distributor's.
    DeaCannotPrescribe,
    ScheduleIiWithRefills,
    ScheduleIiiIvExcessRefills,
    ControlledMissingQuantity,
    ControlledMissingDaysSupply,
    BadNpi,
    /// An NDC beside the RxNorm code that is no valid 10- or 11-digit NDC.
    NdcInvalid,
    Stopped,
    PlanIntent,
    /// Dated three days after it arrives.
    WrittenInFuture,
    /// A non-controlled order arriving 400 days after it was written.
    ExpiredNonControlled,
    /// A schedule III–IV order arriving 200 days after it was written (21 CFR 1306.22).
    ControlledPastFillWindow,
    OpioidBenzodiazepine,
    OncInteraction,
    WarfarinInteraction,
    AllergyIngredient,
    AllergyClass,
    DuplicateTherapy,
    HighMme50,
    HighMme90,
    EarlyRefill,
    UnknownProduct,
}

/// A pair's first order (which makes the second one fire) or the order the case is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Setup,
    Trigger,
}

/// What the pipeline should make of a trigger order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// Validated with no alert of its own case.
    Dispensable,
    /// Rejected or sent back for clarification with this reason code.
    Reason(&'static str),
    /// Validated and reviewed with this alert.
    Alert(AlertKind, Severity),
}

impl Case {
    pub const ALL: [Case; 26] = [
        Case::Clean,
        Case::ControlledWithDea,
        Case::ControlledWithoutDea,
        Case::ControlledBadDea,
        Case::DeaCannotPrescribe,
        Case::ScheduleIiWithRefills,
        Case::ScheduleIiiIvExcessRefills,
        Case::ControlledMissingQuantity,
        Case::ControlledMissingDaysSupply,
        Case::BadNpi,
        Case::NdcInvalid,
        Case::Stopped,
        Case::PlanIntent,
        Case::WrittenInFuture,
        Case::ExpiredNonControlled,
        Case::ControlledPastFillWindow,
        Case::OpioidBenzodiazepine,
        Case::OncInteraction,
        Case::WarfarinInteraction,
        Case::AllergyIngredient,
        Case::AllergyClass,
        Case::DuplicateTherapy,
        Case::HighMme50,
        Case::HighMme90,
        Case::EarlyRefill,
        Case::UnknownProduct,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Case::Clean => "clean",
            Case::ControlledWithDea => "controlled-with-dea",
            Case::ControlledWithoutDea => "controlled-without-dea",
            Case::ControlledBadDea => "controlled-bad-dea",
            Case::DeaCannotPrescribe => "dea-cannot-prescribe",
            Case::ScheduleIiWithRefills => "schedule-ii-with-refills",
            Case::ScheduleIiiIvExcessRefills => "schedule-iii-iv-excess-refills",
            Case::ControlledMissingQuantity => "controlled-missing-quantity",
            Case::ControlledMissingDaysSupply => "controlled-missing-days-supply",
            Case::BadNpi => "bad-npi",
            Case::NdcInvalid => "ndc-invalid",
            Case::Stopped => "stopped",
            Case::PlanIntent => "plan-intent",
            Case::WrittenInFuture => "written-in-future",
            Case::ExpiredNonControlled => "expired-non-controlled",
            Case::ControlledPastFillWindow => "controlled-past-fill-window",
            Case::OpioidBenzodiazepine => "opioid-benzodiazepine",
            Case::OncInteraction => "onc-interaction",
            Case::WarfarinInteraction => "warfarin-interaction",
            Case::AllergyIngredient => "allergy-ingredient",
            Case::AllergyClass => "allergy-class",
            Case::DuplicateTherapy => "duplicate-therapy",
            Case::HighMme50 => "high-mme-50",
            Case::HighMme90 => "high-mme-90",
            Case::EarlyRefill => "early-refill",
            Case::UnknownProduct => "unknown-product",
        }
    }

    pub fn from_code(code: &str) -> Option<Case> {
        Case::ALL.into_iter().find(|c| c.as_str() == code)
    }

    /// The outcome the trigger order of this case should get from validation and DUR.
    pub fn expected(self) -> Expected {
        use Expected::{Alert, Dispensable, Reason};
        match self {
            Case::Clean | Case::ControlledWithDea => Dispensable,
            Case::ControlledWithoutDea => Reason("dea-required"),
            Case::ControlledBadDea => Reason("dea-invalid"),
            Case::DeaCannotPrescribe => Reason("dea-registrant-cannot-prescribe"),
            Case::ScheduleIiWithRefills => Reason("schedule-ii-refills"),
            Case::ScheduleIiiIvExcessRefills => Reason("refills-exceed-limit"),
            Case::ControlledMissingQuantity => Reason("quantity-required"),
            Case::ControlledMissingDaysSupply => Reason("days-supply-required"),
            Case::BadNpi => Reason("npi-invalid"),
            Case::NdcInvalid => Reason("ndc-invalid"),
            Case::Stopped => Reason("status-not-dispensable"),
            Case::PlanIntent => Reason("not-an-order"),
            Case::WrittenInFuture => Reason("written-date-in-future"),
            Case::ExpiredNonControlled | Case::ControlledPastFillWindow => Reason("expired"),
            Case::OpioidBenzodiazepine => Alert(AlertKind::OpioidBenzodiazepine, Severity::High),
            Case::OncInteraction => Alert(AlertKind::DrugInteraction, Severity::High),
            Case::WarfarinInteraction => Alert(AlertKind::DrugInteraction, Severity::Moderate),
            Case::AllergyIngredient | Case::AllergyClass => {
                Alert(AlertKind::Allergy, Severity::High)
            }
            Case::DuplicateTherapy => Alert(AlertKind::DuplicateTherapy, Severity::Moderate),
            Case::HighMme50 => Alert(AlertKind::HighMme, Severity::Moderate),
            Case::HighMme90 => Alert(AlertKind::HighMme, Severity::High),
            Case::EarlyRefill => Alert(AlertKind::EarlyRefill, Severity::Moderate),
            Case::UnknownProduct => Alert(AlertKind::UnknownProduct, Severity::Moderate),
        }
    }
}

/// When a generated order reaches the pharmacy (its `meta.lastUpdated`): the demo judges it then.
pub fn arrival(order: &Value) -> Option<DateTime<Utc>> {
    let at = order.pointer("/meta/lastUpdated")?.as_str()?;
    DateTime::parse_from_rfc3339(at)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The planned case of a generated order (from its `meta.tag`).
pub fn planned_case(order: &Value) -> Option<(Case, Role)> {
    let tags = order.pointer("/meta/tag")?.as_array()?;
    tags.iter()
        .filter(|t| t.get("system").and_then(Value::as_str) == Some(CASE_TAG_SYSTEM))
        .find_map(|t| {
            let code = t.get("code")?.as_str()?;
            match code.strip_suffix("-setup") {
                Some(c) => Case::from_code(c).map(|c| (c, Role::Setup)),
                None => Case::from_code(code).map(|c| (c, Role::Trigger)),
            }
        })
}

/// The 30 planned slots of a block, in slot order: pair setups first, then single cases, then
/// pair triggers (100 slots after their setups).
const SLOTS: [(Case, Role); 30] = [
    (Case::OpioidBenzodiazepine, Role::Setup),
    (Case::OncInteraction, Role::Setup),
    (Case::WarfarinInteraction, Role::Setup),
    (Case::DuplicateTherapy, Role::Setup),
    (Case::EarlyRefill, Role::Setup),
    (Case::ControlledWithDea, Role::Trigger),
    (Case::ControlledWithoutDea, Role::Trigger),
    (Case::ControlledBadDea, Role::Trigger),
    (Case::DeaCannotPrescribe, Role::Trigger),
    (Case::ScheduleIiWithRefills, Role::Trigger),
    (Case::ScheduleIiiIvExcessRefills, Role::Trigger),
    (Case::ControlledMissingQuantity, Role::Trigger),
    (Case::ControlledMissingDaysSupply, Role::Trigger),
    (Case::BadNpi, Role::Trigger),
    (Case::NdcInvalid, Role::Trigger),
    (Case::Stopped, Role::Trigger),
    (Case::PlanIntent, Role::Trigger),
    (Case::WrittenInFuture, Role::Trigger),
    (Case::ExpiredNonControlled, Role::Trigger),
    (Case::ControlledPastFillWindow, Role::Trigger),
    (Case::AllergyIngredient, Role::Trigger),
    (Case::AllergyClass, Role::Trigger),
    (Case::HighMme50, Role::Trigger),
    (Case::HighMme90, Role::Trigger),
    (Case::UnknownProduct, Role::Trigger),
    (Case::OpioidBenzodiazepine, Role::Trigger),
    (Case::OncInteraction, Role::Trigger),
    (Case::WarfarinInteraction, Role::Trigger),
    (Case::DuplicateTherapy, Role::Trigger),
    (Case::EarlyRefill, Role::Trigger),
];

/// The planned slot at position `i` of the stream, if any.
fn slot(i: usize) -> Option<(Case, Role)> {
    let pos = i % BLOCK;
    if pos < FIRST_SLOT || !(pos - FIRST_SLOT).is_multiple_of(SLOT_STRIDE) {
        return None;
    }
    SLOTS.get((pos - FIRST_SLOT) / SLOT_STRIDE).copied()
}

// ---------------------------------------------------------------------------------------------
// PRNG: SplitMix64 (Steele, Lea & Flood 2014), seeded per item so any item is built on its own.

struct Rng(u64);

impl Rng {
    fn for_item(seed: u64, stream: u64, index: u64) -> Rng {
        let mut r = Rng(seed
            ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03)
            ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        r.next();
        r
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform-enough in `0..n` (n ≥ 1; 0 gives 0).
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }

    fn uuid(&mut self) -> String {
        let (a, b) = (self.next(), self.next());
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            ((b >> 48) & 0x3fff) | 0x8000,
            b & 0xffff_ffff_ffff
        )
    }
}

const STREAM_PRACTITIONER: u64 = 1;
const STREAM_PATIENT: u64 = 2;
const STREAM_ALLERGY: u64 = 3;
const STREAM_ORDER: u64 = 4;

const GIVEN: [&str; 24] = [
    "Avery", "Jordan", "Riley", "Morgan", "Casey", "Quinn", "Rowan", "Emerson", "Harper", "Sage",
    "Parker", "Reese", "Dakota", "Finley", "Hayden", "Jules", "Kendall", "Logan", "Marlow", "Noel",
    "Oakley", "Peyton", "Remy", "Skyler",
];
const FAMILY: [&str; 20] = [
    "Ashgrove",
    "Birchwood",
    "Coldbrook",
    "Dunmore",
    "Elmsworth",
    "Fairhaven",
    "Glenrock",
    "Hollowell",
    "Ironvale",
    "Juniperton",
    "Kestrel",
    "Larkspur",
    "Millbank",
    "Northcott",
    "Oakhurst",
    "Pinecrest",
    "Quarrington",
    "Ravenhill",
    "Stonefield",
    "Thornbury",
];
const STREETS: [&str; 10] = [
    "Synthetic Way",
    "Example Avenue",
    "Placeholder Road",
    "Sample Street",
    "Fixture Lane",
    "Mockingbird Court",
    "Testing Trail",
    "Demo Drive",
    "Sandbox Boulevard",
    "Dummy Place",
];
const CITIES: [(&str, &str); 6] = [
    ("Fairview", "66901"),
    ("Riverton", "66902"),
    ("Lakeside", "66903"),
    ("Brookfield", "66904"),
    ("Cedar Falls", "66905"),
    ("Maple Grove", "66906"),
];

/// Patients in these groups (patient index mod 16) have an allergy on file.
const ASPIRIN_ALLERGY: usize = 3;
const PENICILLIN_ALLERGY: usize = 7;
const LATEX_ALLERGY: usize = 11;
const PEANUT_ALLERGY: usize = 13;

/// What kind of prescriber index `r` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    WithDea,
    WithoutDea,
    /// A DEA number on file whose check digit is off (only controlled orders look at it).
    BadDea,
    /// A valid DEA number of a distributor's registration (P), which may not prescribe.
    DistributorDea,
    BadNpi,
}

fn prescriber_kind(r: usize) -> Kind {
    match r % 10 {
        9 => Kind::BadNpi,
        7 | 8 => Kind::WithoutDea,
        6 => Kind::BadDea,
        5 if r % 20 == 5 => Kind::DistributorDea,
        _ => Kind::WithDea,
    }
}

/// A valid NPI (or, with `bad`, one whose check digit is off by one): 999 + six digits + check.
fn npi(seed: u64, r: usize, bad: bool) -> String {
    let body = format!(
        "999{:06}",
        ((r as u64).wrapping_mul(7919) + seed % 1_000_000) % 1_000_000
    );
    let check = (0..10u8)
        .find(|d| npi_is_valid(&format!("{body}{d}")))
        .unwrap_or(0);
    let check = if bad { (check + 1) % 10 } else { check };
    format!("{body}{check}")
}

/// A DEA number that passes the format and check-digit test: registrant letter (F practitioner,
/// M mid-level, or P distributor with `distributor`), the family-name initial, six digits and the
/// check digit (with `bad`, a check digit off by one).
fn dea(rng: &mut Rng, family: &str, bad: bool, distributor: bool) -> String {
    let letter = if rng.below(5) == 0 { 'M' } else { 'F' };
    let letter = if distributor { 'P' } else { letter };
    let initial = family.chars().next().unwrap_or('X').to_ascii_uppercase();
    let digits = format!("{:06}", rng.below(1_000_000));
    let check = (0..10u8)
        .find(|d| parse_dea(&format!("{letter}{initial}{digits}{d}")).is_ok())
        .unwrap_or(0);
    let check = if bad { (check + 1) % 10 } else { check };
    format!("{letter}{initial}{digits}{check}")
}

fn name(rng: &mut Rng) -> (String, String) {
    (
        format!("{}{}", rng.pick(&GIVEN), rng.below(900) + 100),
        format!("{}{}", rng.pick(&FAMILY), rng.below(90) + 10),
    )
}

/// The directory part: practitioners, patients and their allergies.
pub fn cohort(cfg: &CohortConfig) -> Cohort {
    let practitioners = (0..cfg.practitioners())
        .map(|r| practitioner(cfg.seed, r))
        .collect();
    let patients: Vec<Value> = (0..cfg.patients()).map(|p| patient(cfg.seed, p)).collect();
    let allergies = patients
        .iter()
        .enumerate()
        .filter_map(|(p, v)| allergy(cfg, p, v))
        .collect();
    Cohort {
        practitioners,
        patients,
        allergies,
    }
}

fn practitioner(seed: u64, r: usize) -> Value {
    let mut rng = Rng::for_item(seed, STREAM_PRACTITIONER, r as u64);
    let id = rng.uuid();
    let (given, family) = name(&mut rng);
    let kind = prescriber_kind(r);
    let mut identifiers =
        vec![json!({ "system": NPI_SYSTEM, "value": npi(seed, r, kind == Kind::BadNpi) })];
    if kind != Kind::WithoutDea {
        identifiers.push(json!({
            "type": { "coding": [{ "system": V2_0203, "code": "DEA", "display": "Drug Enforcement Administration registration number" }] },
            "system": DEA_SYSTEM,
            "value": dea(&mut rng, &family, kind == Kind::BadDea, kind == Kind::DistributorDea),
        }));
    }
    json!({
        "resourceType": "Practitioner",
        "id": id,
        "identifier": identifiers,
        "active": true,
        "name": [{ "family": family, "given": [given], "prefix": ["Dr."] }],
    })
}

fn patient(seed: u64, p: usize) -> Value {
    let mut rng = Rng::for_item(seed, STREAM_PATIENT, p as u64);
    let id = rng.uuid();
    let (given, family) = name(&mut rng);
    let gender = if rng.below(2) == 0 { "female" } else { "male" };
    let birth = NaiveDate::from_ymd_opt(1940, 1, 1)
        .and_then(|d| d.checked_add_signed(Duration::days(rng.below(65 * 365) as i64)))
        .map(|d| d.format("%Y-%m-%d").to_string());
    let (city, zip) = *rng.pick(&CITIES);
    json!({
        "resourceType": "Patient",
        "id": id,
        "identifier": [
            { "type": { "coding": [{ "system": V2_0203, "code": "MR", "display": "Medical Record Number" }] },
              "system": MRN_SYSTEM, "value": format!("SYN{:08}", rng.below(100_000_000)) },
            { "type": { "coding": [{ "system": V2_0203, "code": "SS", "display": "Social Security Number" }] },
              "system": SSN_SYSTEM,
              "value": format!("999-{:02}-{:04}", rng.below(90) + 10, rng.below(9000) + 1000) },
            { "type": { "coding": [{ "system": V2_0203, "code": "DL", "display": "Driver's license number" }] },
              "system": DL_SYSTEM, "value": format!("S99{:07}", rng.below(10_000_000)) },
        ],
        "name": [{ "use": "official", "family": family, "given": [given] }],
        "telecom": [{ "system": "phone",
                      "value": format!("555-{:03}-{:04}", rng.below(900) + 100, rng.below(10_000)),
                      "use": "home" }],
        "gender": gender,
        "birthDate": birth,
        "address": [{ "use": "home",
                      "line": [format!("{} {}", rng.below(9000) + 100, rng.pick(&STREETS))],
                      "city": city, "state": "KS", "postalCode": zip, "country": "US" }],
    })
}

fn allergy(cfg: &CohortConfig, p: usize, patient: &Value) -> Option<Value> {
    let (system, code, text, criticality, category) = match p % 16 {
        ASPIRIN_ALLERGY => (RXNORM, "1191", "Aspirin", "high", "medication"),
        PENICILLIN_ALLERGY => (RXNORM, "70618", "Penicillin", "high", "medication"),
        LATEX_ALLERGY => (
            SNOMED,
            "111088007",
            "Latex (substance)",
            "low",
            "environment",
        ),
        PEANUT_ALLERGY => (SNOMED, "762952008", "Peanut (substance)", "high", "food"),
        _ => return None,
    };
    let mut rng = Rng::for_item(cfg.seed, STREAM_ALLERGY, p as u64);
    let recorded = cfg.start - Duration::days(rng.below(3650) as i64 + 30);
    Some(json!({
        "resourceType": "AllergyIntolerance",
        "id": rng.uuid(),
        "clinicalStatus": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active" }] },
        "verificationStatus": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification", "code": "confirmed" }] },
        "type": "allergy",
        "category": [category],
        "criticality": criticality,
        "code": { "coding": [{ "system": system, "code": code, "display": text }], "text": text },
        "patient": { "reference": format!("Patient/{}", patient.get("id").and_then(Value::as_str).unwrap_or_default()) },
        "recordedDate": recorded.format("%Y-%m-%d").to_string(),
    }))
}

// ---------------------------------------------------------------------------------------------
// Orders

/// The MedicationRequests, streamed in the order they arrive ([`arrival`]). Each is built from the seed, its
/// position and the (small) product plan; nothing accumulates.
pub fn orders<'a>(cfg: &'a CohortConfig, cohort: &'a Cohort) -> impl Iterator<Item = Value> + 'a {
    let plan = Plan::new(cfg, cohort, DrugTable::embedded());
    (0..cfg.orders).map(move |i| plan.order(i))
}

/// How a product is taken: dose units per administration, administrations per day, days.
#[derive(Debug, Clone, Copy)]
struct Dosing {
    dose: f64,
    per_day: f64,
    days: u32,
    as_needed: bool,
}

/// The products each case uses, chosen once from the drug table.
struct Plan<'a> {
    cfg: &'a CohortConfig,
    cohort: &'a Cohort,
    /// Non-controlled oral products for clean orders (no shared ingredient, no interaction).
    pool: Vec<&'a Product>,
    early_refill: Option<&'a Product>,
    /// Controlled oral products whose ordinary dose stays under 50 MME/day.
    controlled: Vec<&'a Product>,
    schedule_ii: Vec<&'a Product>,
    schedule_iii_iv: Vec<&'a Product>,
    low_dose_opioids: Vec<&'a Product>,
    benzodiazepines: Vec<&'a Product>,
    onc_pairs: Vec<(&'a Product, &'a Product)>,
    clinical_pairs: Vec<(&'a Product, &'a Product)>,
    aspirin: Vec<&'a Product>,
    penicillins: Vec<&'a Product>,
    duplicate_pairs: Vec<(&'a Product, &'a Product)>,
    mme_50: Vec<(&'a Product, Dosing)>,
    mme_90: Vec<(&'a Product, Dosing)>,
    unknown: (String, String),
    /// Patients without a drug allergy (for the cases that should raise no allergy alert).
    plain_patients: Vec<usize>,
    aspirin_patients: Vec<usize>,
    penicillin_patients: Vec<usize>,
    prescribers_with_dea: Vec<usize>,
    prescribers_without_dea: Vec<usize>,
    prescribers_bad_dea: Vec<usize>,
    prescribers_distributor_dea: Vec<usize>,
    prescribers_bad_npi: Vec<usize>,
    prescribers_good_npi: Vec<usize>,
}

fn oral(p: &Product) -> bool {
    matches!(p.unit.as_str(), "tablet" | "capsule")
}

fn single(p: &Product) -> Option<&str> {
    match p.ingredients.as_slice() {
        [i] => Some(i.as_str()),
        _ => None,
    }
}

fn mme(p: &Product, d: &Dosing) -> f64 {
    match (p.strength_mg, p.mme_factor) {
        (Some(s), Some(f)) => s * d.dose * d.per_day * f,
        _ => 0.0,
    }
}

/// The first (dose, times a day) whose MME/day lies in `lo..hi`.
fn dosing_in(p: &Product, lo: f64, hi: f64, days: u32) -> Option<Dosing> {
    for dose in [1.0, 2.0] {
        for per_day in [1.0, 2.0, 3.0, 4.0, 6.0] {
            let d = Dosing {
                dose,
                per_day,
                days,
                as_needed: p.has_class("opioid"),
            };
            let m = mme(p, &d);
            if m >= lo && m < hi {
                return Some(d);
            }
        }
    }
    None
}

impl<'a> Plan<'a> {
    fn new(cfg: &'a CohortConfig, cohort: &'a Cohort, drugs: &'a DrugTable) -> Self {
        let all: Vec<&Product> = drugs.products().collect();
        let opioid_ok = |p: &&Product| !p.has_class("opioid") || p.mme_factor.is_some();
        let controlled_oral: Vec<&Product> = all
            .iter()
            .copied()
            .filter(|p| p.is_controlled() && oral(p) && !p.is_patch())
            .filter(opioid_ok)
            .collect();
        let controlled: Vec<&Product> = controlled_oral
            .iter()
            .copied()
            .filter(|p| dosing_in(p, 0.0, 50.0, 5).is_some())
            .collect();
        let schedule_ii: Vec<&Product> = controlled
            .iter()
            .copied()
            .filter(|p| p.schedule == Some(Schedule::II))
            .collect();
        let schedule_iii_iv: Vec<&Product> = controlled
            .iter()
            .copied()
            .filter(|p| matches!(p.schedule, Some(Schedule::III | Schedule::IV)))
            .collect();
        let low_dose_opioids: Vec<&Product> = controlled
            .iter()
            .copied()
            .filter(|p| p.has_class("opioid"))
            .collect();
        let benzodiazepines: Vec<&Product> = controlled_oral
            .iter()
            .copied()
            .filter(|p| p.has_class("benzodiazepine"))
            .collect();
        let opioids: Vec<&Product> = controlled_oral
            .iter()
            .copied()
            .filter(|p| p.has_class("opioid") && p.mme_factor.is_some())
            .collect();
        let mme_50 = opioids
            .iter()
            .filter_map(|p| Some((*p, dosing_in(p, 50.0, 90.0, 7)?)))
            .collect();
        let mme_90 = opioids
            .iter()
            .filter_map(|p| Some((*p, dosing_in(p, 90.0, 200.0, 7)?)))
            .collect();

        // Non-controlled oral single-ingredient products, one per ingredient.
        let plain: Vec<&Product> = all
            .iter()
            .copied()
            .filter(|p| !p.is_controlled() && oral(p) && single(p).is_some())
            .collect();
        let first_for =
            |ingredient: &str| plain.iter().copied().find(|p| p.has_ingredient(ingredient));
        let pairs_from = |source: &str| -> Vec<(&'a Product, &'a Product)> {
            let mut v: Vec<(&Product, &Product)> = drugs
                .interactions()
                .filter(|i| i.source.starts_with(source))
                .filter_map(|i| Some((first_for(&i.a)?, first_for(&i.b)?)))
                .filter(|(a, b)| a.rxnorm != b.rxnorm)
                .collect();
            // The table is a hash map: sort for a stable choice.
            v.sort_by(|x, y| (&x.0.rxnorm, &x.1.rxnorm).cmp(&(&y.0.rxnorm, &y.1.rxnorm)));
            v
        };
        let onc_pairs = pairs_from("onc");
        let clinical_pairs = pairs_from("clinical");
        let aspirin: Vec<&Product> = plain
            .iter()
            .copied()
            .filter(|p| p.has_ingredient("aspirin"))
            .collect();
        let penicillins: Vec<&Product> = plain
            .iter()
            .copied()
            .filter(|p| p.has_class("penicillin"))
            .collect();
        let mut duplicate_pairs = Vec::new();
        for (i, a) in plain.iter().enumerate() {
            if let Some(b) = plain[i + 1..].iter().find(|b| single(b) == single(a)) {
                if !duplicate_pairs
                    .iter()
                    .any(|(x, _): &(&Product, &Product)| single(x) == single(a))
                {
                    duplicate_pairs.push((*a, *b));
                }
            }
        }

        // The regimen pool: shares no ingredient with any case product and interacts with
        // nothing in the table; no allergy class (penicillin, salicylate) either.
        let mut used: Vec<&str> = Vec::new();
        let mut note = |p: &'a Product| used.extend(p.ingredients.iter().map(String::as_str));
        for p in controlled_oral.iter().chain(&aspirin).chain(&penicillins) {
            note(p);
        }
        for (a, b) in onc_pairs
            .iter()
            .chain(&clinical_pairs)
            .chain(&duplicate_pairs)
        {
            note(a);
            note(b);
        }
        let interacts = |p: &Product| {
            p.ingredients.iter().any(|i| {
                all.iter().any(|q| {
                    q.ingredients
                        .iter()
                        .any(|j| drugs.interaction(i, j).is_some())
                })
            })
        };
        let mut pool: Vec<&Product> = Vec::new();
        for p in plain.iter().copied() {
            let ing = single(p).unwrap_or_default();
            let allergy_class = ["penicillin", "salicylate", "nsaid"]
                .iter()
                .any(|c| p.has_class(c));
            if used.contains(&ing)
                || allergy_class
                || interacts(p)
                || pool.iter().any(|q| q.has_ingredient(ing))
            {
                continue;
            }
            pool.push(p);
        }
        let early_refill = if pool.len() > 1 { pool.pop() } else { None };

        let unknown = [
            ("197361", "amlodipine 5 MG Oral Tablet"),
            ("617312", "atorvastatin 10 MG Oral Tablet"),
        ]
        .into_iter()
        .find(|(c, _)| drugs.product(c).is_none())
        .map(|(c, d)| (c.to_owned(), d.to_owned()))
        .unwrap_or_else(|| {
            (
                "999999999".into(),
                "synthetic product not in the table".into(),
            )
        });

        let patients = cohort.patients.len().max(1);
        let group = |g: usize| -> Vec<usize> { (0..patients).filter(|p| p % 16 == g).collect() };
        let plain_patients = (0..patients)
            .filter(|p| !matches!(p % 16, ASPIRIN_ALLERGY | PENICILLIN_ALLERGY))
            .collect();
        let prescribers = cohort.practitioners.len();
        let kind = |k: Kind| -> Vec<usize> {
            (0..prescribers)
                .filter(|r| prescriber_kind(*r) == k)
                .collect()
        };

        Plan {
            cfg,
            cohort,
            pool,
            early_refill,
            controlled,
            schedule_ii,
            schedule_iii_iv,
            low_dose_opioids,
            benzodiazepines,
            onc_pairs,
            clinical_pairs,
            aspirin,
            penicillins,
            duplicate_pairs,
            mme_50,
            mme_90,
            unknown,
            plain_patients,
            aspirin_patients: group(ASPIRIN_ALLERGY),
            penicillin_patients: group(PENICILLIN_ALLERGY),
            prescribers_with_dea: kind(Kind::WithDea),
            prescribers_without_dea: kind(Kind::WithoutDea),
            prescribers_bad_dea: kind(Kind::BadDea),
            prescribers_distributor_dea: kind(Kind::DistributorDea),
            prescribers_bad_npi: kind(Kind::BadNpi),
            prescribers_good_npi: (0..prescribers)
                .filter(|r| prescriber_kind(*r) != Kind::BadNpi)
                .collect(),
        }
    }

    fn order(&self, i: usize) -> Value {
        let mut rng = Rng::for_item(self.cfg.seed, STREAM_ORDER, i as u64);
        let id = rng.uuid();
        let arrives = self.cfg.start
            + Duration::minutes(MINUTES_PER_ORDER * i as i64)
            + Duration::seconds(rng.below(MINUTES_PER_ORDER as u64 * 60) as i64);
        let block = i / BLOCK;
        let rx = slot(i)
            .and_then(|(case, role)| self.planned(case, role, block, &mut rng))
            .unwrap_or_else(|| self.clean(i, &mut rng));
        rx.to_fhir(self, &id, arrives)
    }

    /// The k-th element of `xs` for this block (rotating through the candidates).
    fn rotate<T: Copy>(&self, xs: &[T], block: usize, salt: usize) -> Option<T> {
        if xs.is_empty() {
            return None;
        }
        let k = (block + salt + (self.cfg.seed % 997) as usize) % xs.len();
        xs.get(k).copied()
    }

    /// The patient a planned case uses in a block (the same for a pair's two orders).
    fn case_patient(&self, case: Case, block: usize) -> usize {
        let pick = |xs: &[usize]| {
            let n = xs.len().max(1);
            xs.get((block * Case::ALL.len() + case as usize) % n)
                .copied()
                .unwrap_or(0)
        };
        match case {
            Case::AllergyIngredient => pick(&self.aspirin_patients),
            Case::AllergyClass => pick(&self.penicillin_patients),
            _ => pick(&self.plain_patients),
        }
    }

    fn prescriber(&self, from: &[usize], rng: &mut Rng) -> usize {
        if from.is_empty() {
            0
        } else {
            *rng.pick(from)
        }
    }

    fn clean(&self, i: usize, rng: &mut Rng) -> Rx<'a> {
        let patients = self.cohort.patients.len().max(1);
        let (p, visit) = (i % patients, i / patients);
        let product = if self.pool.is_empty() {
            None
        } else {
            self.pool.get((p + visit) % self.pool.len()).copied()
        };
        let per_day = if rng.below(3) == 0 { 2.0 } else { 1.0 };
        Rx {
            case: Case::Clean,
            role: Role::Trigger,
            product: product
                .map(Med::Table)
                .unwrap_or(Med::Unknown(self.unknown.clone())),
            patient: p,
            prescriber: self.prescriber(&self.prescribers_good_npi, rng),
            status: "active",
            intent: "order",
            dosing: Some(Dosing {
                dose: 1.0,
                per_day,
                days: 30,
                as_needed: false,
            }),
            quantity: true,
            days_supply: true,
            refills: rng.below(4) as u32,
            written_days_before: 0,
            ndc: None,
        }
    }

    fn planned(&self, case: Case, role: Role, block: usize, rng: &mut Rng) -> Option<Rx<'a>> {
        let patient = self.case_patient(case, block);
        let dea = self.prescriber(&self.prescribers_with_dea, rng);
        let good = self.prescriber(&self.prescribers_good_npi, rng);
        let short = |p: &Product| dosing_in(p, 0.0, 50.0, 5);
        let daily = Some(Dosing {
            dose: 1.0,
            per_day: 1.0,
            days: 30,
            as_needed: false,
        });
        let rx = |product: &'a Product, prescriber: usize, dosing: Option<Dosing>| Rx {
            case,
            role,
            product: Med::Table(product),
            patient,
            prescriber,
            status: "active",
            intent: "order",
            dosing,
            quantity: true,
            days_supply: true,
            refills: 0,
            written_days_before: 0,
            ndc: None,
        };
        let pool_product = self.rotate(&self.pool, block, case as usize)?;
        Some(match (case, role) {
            (Case::Clean, _) => return None,
            (Case::ControlledWithDea, _) => {
                let p = self.rotate(&self.controlled, block, 0)?;
                rx(p, dea, short(p))
            }
            (Case::ControlledWithoutDea, _) => {
                let p = self.rotate(&self.controlled, block, 1)?;
                let r = self.prescriber(&self.prescribers_without_dea, rng);
                rx(p, r, short(p))
            }
            (Case::ControlledBadDea, _) => {
                let p = self.rotate(&self.controlled, block, 4)?;
                let r = self.prescriber(&self.prescribers_bad_dea, rng);
                rx(p, r, short(p))
            }
            (Case::ScheduleIiWithRefills, _) => {
                let p = self.rotate(&self.schedule_ii, block, 0)?;
                Rx {
                    refills: 1 + rng.below(3) as u32,
                    ..rx(p, dea, short(p))
                }
            }
            (Case::ScheduleIiiIvExcessRefills, _) => {
                let p = self.rotate(&self.schedule_iii_iv, block, 0)?;
                Rx {
                    refills: 6 + rng.below(6) as u32,
                    ..rx(p, dea, short(p))
                }
            }
            (Case::ControlledMissingQuantity, _) => {
                let p = self.rotate(&self.controlled, block, 2)?;
                Rx {
                    quantity: false,
                    ..rx(p, dea, short(p))
                }
            }
            (Case::ControlledMissingDaysSupply, _) => {
                let p = self.rotate(&self.controlled, block, 3)?;
                Rx {
                    days_supply: false,
                    ..rx(p, dea, short(p))
                }
            }
            (Case::DeaCannotPrescribe, _) => {
                let p = self.rotate(&self.controlled, block, 5)?;
                let r = self.prescriber(&self.prescribers_distributor_dea, rng);
                rx(p, r, short(p))
            }
            (Case::NdcInvalid, _) => Rx {
                // Nine digits: neither a 10-digit (4-4-2, 5-3-2, 5-4-1) nor an 11-digit NDC.
                ndc: Some("12345-678-9"),
                ..rx(pool_product, good, daily)
            },
            (Case::WrittenInFuture, _) => Rx {
                written_days_before: -3,
                ..rx(pool_product, good, daily)
            },
            (Case::ExpiredNonControlled, _) => Rx {
                written_days_before: 400,
                ..rx(pool_product, good, daily)
            },
            (Case::ControlledPastFillWindow, _) => {
                let p = self.rotate(&self.schedule_iii_iv, block, 1)?;
                Rx {
                    written_days_before: 200,
                    ..rx(p, dea, short(p))
                }
            }
            (Case::BadNpi, _) => {
                let r = self.prescriber(&self.prescribers_bad_npi, rng);
                rx(pool_product, r, daily)
            }
            (Case::Stopped, _) => Rx {
                status: "stopped",
                ..rx(pool_product, good, daily)
            },
            (Case::PlanIntent, _) => Rx {
                intent: "plan",
                ..rx(pool_product, good, daily)
            },
            (Case::OpioidBenzodiazepine, Role::Setup) => {
                let p = self.rotate(&self.low_dose_opioids, block, 0)?;
                rx(p, dea, short(p))
            }
            (Case::OpioidBenzodiazepine, Role::Trigger) => {
                let p = self.rotate(&self.benzodiazepines, block, 0)?;
                rx(p, dea, short(p))
            }
            (Case::OncInteraction, _) => {
                let (a, b) = self.rotate(&self.onc_pairs, block, 0)?;
                rx(if role == Role::Setup { a } else { b }, good, daily)
            }
            (Case::WarfarinInteraction, _) => {
                let (a, b) = self.rotate(&self.clinical_pairs, block, 0)?;
                rx(if role == Role::Setup { a } else { b }, good, daily)
            }
            (Case::DuplicateTherapy, _) => {
                let (a, b) = self.rotate(&self.duplicate_pairs, block, 0)?;
                rx(if role == Role::Setup { a } else { b }, good, daily)
            }
            (Case::AllergyIngredient, _) => rx(self.rotate(&self.aspirin, block, 0)?, good, daily),
            (Case::AllergyClass, _) => rx(self.rotate(&self.penicillins, block, 0)?, good, daily),
            (Case::HighMme50, _) => {
                let (p, d) = self.rotate(&self.mme_50, block, 0)?;
                rx(p, dea, Some(d))
            }
            (Case::HighMme90, _) => {
                let (p, d) = self.rotate(&self.mme_90, block, 0)?;
                rx(p, dea, Some(d))
            }
            (Case::EarlyRefill, _) => rx(self.early_refill?, good, daily),
            (Case::UnknownProduct, _) => Rx {
                product: Med::Unknown(self.unknown.clone()),
                ..rx(pool_product, good, daily)
            },
        })
    }
}

enum Med<'a> {
    Table(&'a Product),
    /// (RxNorm code, display) of a product the table does not hold.
    Unknown((String, String)),
}

/// One order before it becomes FHIR.
struct Rx<'a> {
    case: Case,
    role: Role,
    product: Med<'a>,
    patient: usize,
    prescriber: usize,
    status: &'static str,
    intent: &'static str,
    dosing: Option<Dosing>,
    /// Whether to state the quantity / the days supply (controlled cases leave one out).
    quantity: bool,
    days_supply: bool,
    refills: u32,
    /// Days between when the order was written and when it arrives (negative: postdated).
    written_days_before: i64,
    /// An NDC coding beside the RxNorm one.
    ndc: Option<&'static str>,
}

impl Rx<'_> {
    fn to_fhir(&self, plan: &Plan<'_>, id: &str, arrives: DateTime<Utc>) -> Value {
        let authored = arrives - Duration::days(self.written_days_before);
        let (code, display, unit) = match &self.product {
            Med::Table(p) => (p.rxnorm.as_str(), p.name.as_str(), p.unit.as_str()),
            Med::Unknown((c, d)) => (c.as_str(), d.as_str(), "tablet"),
        };
        let patient_id = plan
            .cohort
            .patients
            .get(self.patient)
            .and_then(|p| p.get("id"))
            .and_then(Value::as_str)
            .unwrap_or("unknown");
        let npi = plan
            .cohort
            .practitioners
            .get(self.prescriber)
            .and_then(|p| p.pointer("/identifier/0/value"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let tag = match self.role {
            Role::Setup => format!("{}-setup", self.case.as_str()),
            Role::Trigger => self.case.as_str().to_owned(),
        };
        let mut v = json!({
            "resourceType": "MedicationRequest",
            "id": id,
            "meta": {
                "lastUpdated": arrives.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                "tag": [{ "system": CASE_TAG_SYSTEM, "code": tag }],
            },
            "status": self.status,
            "intent": self.intent,
            "category": [{ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/medicationrequest-category", "code": "community" }] }],
            "medicationCodeableConcept": {
                "coding": [{ "system": RXNORM, "code": code, "display": display }],
                "text": display,
            },
            "subject": { "reference": format!("Patient/{patient_id}") },
            "authoredOn": authored.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "requester": { "reference": format!("Practitioner?identifier={NPI_SYSTEM}|{npi}") },
        });
        if let Some(ndc) = self.ndc {
            if let Some(codings) = v["medicationCodeableConcept"]["coding"].as_array_mut() {
                codings.push(json!({ "system": crate::NDC, "code": ndc }));
            }
        }
        let Some(d) = self.dosing else { return v };
        v["dosageInstruction"] = json!([{
            "sequence": 1,
            "timing": { "repeat": { "frequency": d.per_day as u32, "period": 1, "periodUnit": "d" } },
            "asNeededBoolean": d.as_needed,
            "doseAndRate": [{ "doseQuantity": { "value": d.dose, "unit": unit } }],
        }]);
        let mut dr = json!({ "numberOfRepeatsAllowed": self.refills });
        if self.quantity {
            dr["quantity"] =
                json!({ "value": d.dose * d.per_day * f64::from(d.days), "unit": unit });
        }
        if self.days_supply {
            dr["expectedSupplyDuration"] =
                json!({ "value": d.days, "unit": "days", "system": UCUM, "code": "d" });
        }
        v["dispenseRequest"] = dr;
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_npis_pass_or_fail_the_check_digit_as_planned() {
        for r in 0..50 {
            assert!(npi_is_valid(&npi(7, r, false)));
            assert!(!npi_is_valid(&npi(7, r, true)));
        }
    }

    #[test]
    fn generated_dea_numbers_pass_the_check_digit() {
        let mut rng = Rng::for_item(1, 0, 0);
        for _ in 0..50 {
            assert!(parse_dea(&dea(&mut rng, "Kestrel", false, false)).is_ok());
            assert!(parse_dea(&dea(&mut rng, "Kestrel", true, false)).is_err());
            let distributor = parse_dea(&dea(&mut rng, "Kestrel", false, true)).unwrap();
            assert!(!distributor.registrant.may_prescribe());
        }
    }

    #[test]
    fn every_case_has_a_slot_in_each_block() {
        for case in Case::ALL.into_iter().filter(|c| *c != Case::Clean) {
            let n = (0..BLOCK)
                .filter(|i| slot(*i).is_some_and(|(c, r)| c == case && r == Role::Trigger))
                .count();
            assert_eq!(n, 1, "{case:?}");
        }
        assert_eq!(
            (0..BLOCK).filter(|i| slot(*i).is_some()).count(),
            SLOTS.len()
        );
        // Every setup comes before its trigger.
        for (c, _) in SLOTS.iter().filter(|(_, r)| *r == Role::Setup) {
            let pos = |role| (0..BLOCK).find(|i| slot(*i) == Some((*c, role)));
            assert!(pos(Role::Setup) < pos(Role::Trigger));
        }
    }
}
