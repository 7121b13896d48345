//! The parsers on real FHIR: the Synthea bulk export (synthea-10) and the HL7 R4 examples, read
//! from ../shared/data beside the repository (skipped with a message when it is absent).

use chrono::{TimeZone, Utc};
use rx_domain::fhir::{self, Resource};
use rx_domain::{PrescriberRef, NPI_SYSTEM};
use serde_json::Value;
use std::path::PathBuf;

fn data_dir(sub: &str) -> Option<PathBuf> {
    let d = PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR"),
    )
    .join("../../../shared/data")
    .join(sub);
    if d.is_dir() {
        Some(d)
    } else if std::env::var_os("RXFLOW_STRICT").is_some() {
        panic!("RXFLOW_STRICT is set but {} is absent", d.display());
    } else {
        eprintln!(
            "skipped: {} is absent (the team's shared data folder)",
            d.display()
        );
        None
    }
}

fn ndjson(sub: &str, file: &str) -> Option<Vec<Value>> {
    let text = std::fs::read_to_string(data_dir(sub)?.join(file)).unwrap();
    Some(
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect(),
    )
}

fn example(file: &str) -> Option<Value> {
    let text = std::fs::read_to_string(data_dir("fhir-r4-examples")?.join(file)).unwrap();
    Some(serde_json::from_str(&text).unwrap())
}

#[test]
fn every_synthea_order_parses_with_its_npi_requester_and_patient() {
    let Some(lines) = ndjson("synthea-10", "MedicationRequest.ndjson") else {
        return;
    };
    assert_eq!(lines.len(), 1745);
    let mut with_dosage = 0;
    let mut active = 0;
    for v in &lines {
        let o = fhir::parse_medication_request(v)
            .unwrap_or_else(|e| panic!("order {} failed: {e}", v["id"]));
        assert_eq!(o.source_id.as_deref(), v["id"].as_str());
        let npi = v["requester"]["reference"]
            .as_str()
            .unwrap()
            .rsplit('|')
            .next()
            .unwrap();
        assert_eq!(o.requester, PrescriberRef::Npi(npi.to_owned()));
        assert_eq!(
            Some(o.patient_ref.as_str()),
            v["subject"]["reference"]
                .as_str()
                .unwrap()
                .strip_prefix("Patient/")
        );
        assert!(o.medication.rxnorm.is_some());
        assert!(o.authored_on.is_some());
        assert_eq!((o.quantity, o.days_supply, o.refills), (None, None, None));
        with_dosage += usize::from(!o.dosage.is_empty());
        active += usize::from(o.status == "active");
    }
    assert_eq!(active, 23, "SOURCE.md: 23 active orders");
    assert_eq!(with_dosage, 410);
}

#[test]
fn synthea_order_converts_offset_time_and_daily_timing() {
    let Some(lines) = ndjson("synthea-10", "MedicationRequest.ndjson") else {
        return;
    };
    let v = lines
        .iter()
        .find(|v| v["id"] == "002eb5b8-2964-effd-3b09-f132017dae04")
        .unwrap();
    let o = fhir::parse_medication_request(v).unwrap();
    // 1989-05-27T23:58:16-04:00 is the next day in UTC.
    assert_eq!(
        o.authored_on,
        Some(Utc.with_ymd_and_hms(1989, 5, 28, 3, 58, 16).unwrap())
    );
    assert_eq!(o.medication.rxnorm.as_deref(), Some("314076"));
    assert_eq!(
        o.medication.display.as_deref(),
        Some("lisinopril 10 MG Oral Tablet")
    );
    assert_eq!(o.dosage.len(), 1);
    assert_eq!(o.dosage[0].per_day, Some(1.0));
    assert_eq!(o.dosage[0].dose_quantity, Some(1.0));
    assert!(!o.dosage[0].as_needed);
}

#[test]
fn synthea_hourly_timing_gives_doses_per_day() {
    let Some(lines) = ndjson("synthea-10", "MedicationRequest.ndjson") else {
        return;
    };
    let v = lines
        .iter()
        .find(|v| v["dosageInstruction"][0]["timing"]["repeat"]["periodUnit"] == "h")
        .unwrap();
    let r = &v["dosageInstruction"][0]["timing"]["repeat"];
    let expected = r["frequency"].as_f64().unwrap() * 24.0 / r["period"].as_f64().unwrap();
    let o = fhir::parse_medication_request(v).unwrap();
    assert!((o.dosage[0].per_day.unwrap() - expected).abs() < 1e-9);
}

#[test]
fn synthea_controlled_orders_are_present() {
    let Some(lines) = ndjson("synthea-10", "MedicationRequest.ndjson") else {
        return;
    };
    let codes: Vec<String> = lines
        .iter()
        .map(|v| {
            fhir::parse_medication_request(v)
                .unwrap()
                .medication
                .rxnorm
                .unwrap()
        })
        .collect();
    assert!(codes.iter().any(|c| c == "861467"), "meperidine");
    assert!(codes.iter().any(|c| c == "197591"), "diazepam");
}

#[test]
fn every_synthea_patient_parses_with_identifiers_and_contact() {
    let Some(lines) = ndjson("synthea-10", "Patient.ndjson") else {
        return;
    };
    assert_eq!(lines.len(), 13);
    for v in &lines {
        let p = match fhir::parse_resource(v).unwrap() {
            Resource::Patient(p) => p,
            other => panic!("not a patient: {other:?}"),
        };
        assert_eq!(p.source_id, v["id"].as_str().unwrap());
        let mrn = p
            .identifiers
            .iter()
            .find(|c| c.display.as_deref() == Some("MR"))
            .unwrap();
        assert_eq!(mrn.code, p.source_id, "Synthea's MRN equals the Patient id");
        assert!(p.ssn().is_some_and(|s| s.starts_with("999-")));
        let name = p.name.as_deref().unwrap();
        let official = v["name"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["use"] == "official")
            .unwrap();
        assert!(name.ends_with(official["family"].as_str().unwrap()));
        assert!(p.birth_date.is_some());
        assert!(p
            .address
            .as_deref()
            .unwrap()
            .contains(v["address"][0]["city"].as_str().unwrap()));
        assert!(p.phone.is_some());
    }
    let first = fhir::parse_patient(&lines[0]).unwrap();
    assert_eq!(first.name.as_deref(), Some("Sumiko254 Larue605 Medhurst46"));
    assert_eq!(
        first.address.as_deref(),
        Some("633 Abernathy Landing, Emporia, KS 66801")
    );
    assert_eq!(first.phone.as_deref(), Some("555-810-7203"));
    assert_eq!(first.gender.as_deref(), Some("female"));
    assert_eq!(
        first.birth_date,
        chrono::NaiveDate::from_ymd_opt(1927, 5, 21)
    );
    for ty in ["SS", "DL", "PPN"] {
        assert!(
            first
                .identifiers
                .iter()
                .any(|c| c.display.as_deref() == Some(ty)),
            "{ty}"
        );
    }
}

#[test]
fn every_synthea_practitioner_parses_with_npi_and_no_dea() {
    let Some(lines) = ndjson("synthea-10", "Practitioner.ndjson") else {
        return;
    };
    assert_eq!(lines.len(), 43);
    for v in &lines {
        let p = fhir::parse_practitioner(v).unwrap();
        let npi = v["identifier"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["system"] == NPI_SYSTEM)
            .unwrap()["value"]
            .as_str();
        assert_eq!(p.npi.as_deref(), npi);
        assert_eq!(p.dea, None);
        assert!(p.name.is_some());
    }
}

#[test]
fn every_synthea_allergy_parses_with_patient_and_substance() {
    let Some(lines) = ndjson("synthea-10", "AllergyIntolerance.ndjson") else {
        return;
    };
    assert_eq!(lines.len(), 11);
    for v in &lines {
        let (patient, a) = fhir::parse_allergy(v).unwrap();
        assert_eq!(
            Some(patient.as_str()),
            v["patient"]["reference"]
                .as_str()
                .unwrap()
                .strip_prefix("Patient/")
        );
        assert!(!a.substance.is_empty());
        assert!(!a.codes.is_empty());
    }
    let aspirin = lines
        .iter()
        .find(|v| v["code"]["text"] == "Aspirin")
        .unwrap();
    let (_, a) = fhir::parse_allergy(aspirin).unwrap();
    assert_eq!(a.codes[0].code, "1191");
    assert_eq!(a.criticality.as_deref(), Some("low"));
    assert_eq!(a.clinical_status.as_deref(), Some("active"));
}

#[test]
fn other_synthea_resources_are_reported_as_other() {
    for (file, ty) in [
        ("Organization.ndjson", "Organization"),
        ("PractitionerRole.ndjson", "PractitionerRole"),
    ] {
        let Some(lines) = ndjson("synthea-10", file) else {
            return;
        };
        for v in &lines {
            assert_eq!(
                fhir::parse_resource(v).unwrap(),
                Resource::Other(ty.to_owned())
            );
        }
    }
}

#[test]
fn hl7_medrx0302_resolves_its_contained_medication_and_dispense_request() {
    let Some(v) = example("MedicationRequest-medrx0302.json") else {
        return;
    };
    let o = fhir::parse_medication_request(&v).unwrap();
    assert_eq!(
        o.medication.display.as_deref(),
        Some("Azithromycin 250mg capsule (product)")
    );
    assert_eq!(
        o.medication.rxnorm, None,
        "the contained Medication has a SNOMED code only"
    );
    assert_eq!(o.patient_ref, "pat1");
    assert_eq!(o.requester, PrescriberRef::Reference("f007".into()));
    assert_eq!(
        o.authored_on,
        Some(Utc.with_ymd_and_hms(2015, 1, 15, 0, 0, 0).unwrap())
    );
    assert_eq!(o.quantity, Some(6.0));
    assert_eq!(o.quantity_unit.as_deref(), Some("TAB"));
    assert_eq!(o.days_supply, Some(5));
    assert_eq!(o.refills, Some(1));
    // A period ending on a date includes that whole day.
    assert_eq!(
        o.valid_until,
        Some(Utc.with_ymd_and_hms(2016, 1, 15, 23, 59, 59).unwrap())
    );
    assert_eq!(o.dosage.len(), 2);
    assert_eq!(
        (o.dosage[0].per_day, o.dosage[0].dose_quantity),
        (Some(1.0), Some(2.0))
    );
    assert_eq!(
        (o.dosage[1].per_day, o.dosage[1].dose_quantity),
        (Some(4.0), Some(1.0))
    );
    assert_eq!(o.note.as_deref(), Some("Patient told to take with food"));
}

#[test]
fn hl7_medrx0311_reads_a_timing_code_as_doses_per_day() {
    let Some(v) = example("MedicationRequest-medrx0311.json") else {
        return;
    };
    let o = fhir::parse_medication_request(&v).unwrap();
    assert_eq!(
        o.medication.display.as_deref(),
        Some("Chlorthalidone 50mg tablet (product)")
    );
    assert_eq!(o.dosage[0].per_day, Some(1.0), "QD");
    assert_eq!((o.quantity, o.days_supply), (Some(30.0), Some(30)));
    assert_eq!(fhir::parse_submission(&v).unwrap().orders, vec![o]);
}

#[test]
fn hl7_batch_response_bundle_is_refused_but_its_patient_parses() {
    let Some(v) = example("Bundle-bundle-response-medsallergies.json") else {
        return;
    };
    let e = fhir::parse_submission(&v).unwrap_err();
    assert_eq!(e.path, "Bundle.type");
    let p = fhir::parse_patient(&v["entry"][0]["resource"]).unwrap();
    assert_eq!(p.name.as_deref(), Some("Peter James Chalmers"));
    assert_eq!(p.phone.as_deref(), Some("(03) 5555 6473"));
    assert_eq!(
        p.address.as_deref(),
        Some("534 Erewhon St, PleasantVille, Vic 3999")
    );
    assert_eq!(p.identifiers[0].code, "12345");
    assert_eq!(p.identifiers[0].display.as_deref(), Some("MR"));
    // The nested searchset Bundles are Bundles, not errors.
    assert_eq!(
        fhir::parse_resource(&v["entry"][1]["resource"]).unwrap(),
        Resource::Other("Bundle".into())
    );
}

#[test]
fn hl7_medication_dispense_is_another_resource_type() {
    let Some(v) = example("MedicationDispense-meddisp0301.json") else {
        return;
    };
    assert_eq!(
        fhir::parse_resource(&v).unwrap(),
        Resource::Other("MedicationDispense".into())
    );
    assert_eq!(
        fhir::parse_submission(&v).unwrap_err().path,
        "resource.resourceType"
    );
}
