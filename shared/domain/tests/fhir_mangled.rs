//! Property-style robustness: every field of real examples removed or replaced by null, a number,
//! an array, an object, a boolean or a string; the parsers must answer (Ok or an error with a path)
//! and never panic, and an error's Display must never repeat the injected value.

use rx_domain::fhir;
use serde_json::{json, Value};
use std::path::PathBuf;

const SENTINEL: &str = "SENTINEL-PHI-5551234";

fn replacements() -> Vec<Value> {
    vec![
        Value::Null,
        json!(0),
        json!(-1.5),
        json!(1e300),
        json!([]),
        json!([SENTINEL, 1]),
        json!({}),
        json!(true),
        json!(SENTINEL),
        json!(""),
        json!("#"),
        json!("Practitioner?identifier="),
        json!("%%7C|"),
    ]
}

/// Every JSON-pointer path of `v` (objects' fields and arrays' elements), depth-first.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                let p = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
                out.push(p.clone());
                pointers(c, p, out);
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                let p = format!("{at}/{i}");
                out.push(p.clone());
                pointers(c, p, out);
            }
        }
        _ => {}
    }
}

fn remove(v: &mut Value, pointer: &str) {
    let (parent, last) = pointer.rsplit_once('/').unwrap();
    let last = last.replace("~1", "/").replace("~0", "~");
    match v.pointer_mut(parent) {
        Some(Value::Object(m)) => {
            m.remove(&last);
        }
        Some(Value::Array(a)) => {
            if let Ok(i) = last.parse::<usize>() {
                if i < a.len() {
                    a.remove(i);
                }
            }
        }
        _ => {}
    }
}

/// Feeds every parser; returns how many variants were tried.
fn exercise(v: &Value) -> usize {
    let results = [
        fhir::parse_resource(v).err(),
        fhir::parse_submission(v).err(),
        fhir::parse_medication_request(v).err(),
        fhir::parse_patient(v).err(),
        fhir::parse_practitioner(v).err(),
        fhir::parse_allergy(v).err(),
    ];
    for e in results.into_iter().flatten() {
        assert!(!e.path.is_empty());
        let shown = e.to_string();
        assert!(
            !shown.contains(SENTINEL),
            "an error repeats the input value: {shown}"
        );
    }
    1
}

fn mangle_all(original: &Value) -> usize {
    let mut ptrs = Vec::new();
    pointers(original, String::new(), &mut ptrs);
    let mut tried = exercise(original);
    for p in &ptrs {
        let mut v = original.clone();
        remove(&mut v, p);
        tried += exercise(&v);
        for r in replacements() {
            let mut v = original.clone();
            if let Some(slot) = v.pointer_mut(p) {
                *slot = r;
            }
            tried += exercise(&v);
        }
    }
    tried
}

fn samples() -> Vec<Value> {
    let mut out = vec![
        json!({
            "resourceType": "Bundle", "type": "transaction",
            "entry": [
                {"fullUrl": "urn:uuid:p", "resource": {"resourceType": "Patient", "id": "p",
                    "identifier": [{"system": "urn:mrn", "value": "1", "type": {"coding": [{"code": "MR"}]}}],
                    "name": [{"given": ["A"], "family": "B", "use": "official"}],
                    "telecom": [{"system": "phone", "value": "555"}], "birthDate": "1970-01-01",
                    "address": [{"line": ["1 St"], "city": "C", "state": "S", "postalCode": "1", "use": "home"}]}},
                {"fullUrl": "urn:uuid:d", "resource": {"resourceType": "Practitioner", "id": "d",
                    "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"}]}},
                {"fullUrl": "urn:uuid:r", "resource": {"resourceType": "PractitionerRole", "id": "r",
                    "practitioner": {"reference": "urn:uuid:d"}}},
                {"fullUrl": "urn:uuid:m", "resource": {"resourceType": "Medication", "code": {"coding": [
                    {"system": "http://hl7.org/fhir/sid/ndc", "code": "0574-4072-05"}]}}},
                {"resource": {"resourceType": "AllergyIntolerance", "patient": {"reference": "urn:uuid:p"},
                    "clinicalStatus": {"coding": [{"code": "active"}]},
                    "code": {"coding": [{"system": "s", "code": "c"}]}}},
                {"resource": {"resourceType": "MedicationRequest", "status": "active", "intent": "order",
                    "medicationReference": {"reference": "urn:uuid:m"},
                    "subject": {"reference": "Patient?identifier=urn:mrn|1"},
                    "requester": {"reference": "PractitionerRole/r"},
                    "authoredOn": "2020-01",
                    "dosageInstruction": [{"timing": {"code": {"coding": [{"code": "BID"}]}},
                        "doseAndRate": [{"doseRange": {"low": {"value": 1}, "high": {"value": 2}}}],
                        "asNeededCodeableConcept": {"text": "pain"}}],
                    "dispenseRequest": {"validityPeriod": {"end": "2021-01-01T00:00:00+05:00"},
                        "expectedSupplyDuration": {"value": 1, "unit": "mo"}},
                    "note": [{"text": "n"}]}}
            ]
        }),
        json!({
            "resourceType": "MedicationRequest", "status": "active", "intent": "order",
            "contained": [{"resourceType": "Practitioner", "id": "dr",
                           "identifier": [{"type": {"coding": [{"code": "DEA"}]}, "value": "AP5836727"}]}],
            "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "1"}]},
            "subject": {"identifier": {"value": "x"}},
            "requester": {"reference": "#dr"}
        }),
    ];
    let data = PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR"),
    )
    .join("../../../shared/data");
    if !data.is_dir() {
        eprintln!(
            "the real examples are skipped: {} is absent",
            data.display()
        );
        return out;
    }
    for f in [
        "MedicationRequest-medrx0302.json",
        "MedicationRequest-medrx0311.json",
    ] {
        let text = std::fs::read_to_string(data.join("fhir-r4-examples").join(f)).unwrap();
        out.push(serde_json::from_str(&text).unwrap());
    }
    for f in [
        "MedicationRequest",
        "Patient",
        "Practitioner",
        "AllergyIntolerance",
    ] {
        let text =
            std::fs::read_to_string(data.join("synthea-10").join(format!("{f}.ndjson"))).unwrap();
        // The first line, and for orders also one with a dosage instruction.
        out.push(serde_json::from_str(text.lines().next().unwrap()).unwrap());
        if f == "MedicationRequest" {
            let with_dosage = text.lines().find(|l| l.contains("doseAndRate")).unwrap();
            out.push(serde_json::from_str(with_dosage).unwrap());
        }
    }
    out
}

#[test]
fn no_mangled_variant_of_a_real_resource_panics_or_leaks_its_value() {
    let mut tried = 0;
    for s in samples() {
        tried += mangle_all(&s);
    }
    eprintln!("{tried} variants parsed without a panic");
    assert!(tried > 2_000, "only {tried} variants");
}

#[test]
fn non_objects_and_wrong_top_level_types_are_errors_not_panics() {
    for v in [
        json!(null),
        json!(1),
        json!("MedicationRequest"),
        json!([]),
        json!({}),
        json!({"resourceType": 5}),
    ] {
        assert!(fhir::parse_resource(&v).is_err(), "{v}");
        assert!(fhir::parse_submission(&v).is_err(), "{v}");
        assert!(fhir::parse_medication_request(&v).is_err(), "{v}");
    }
}
