//! The parsers on hand-written variants of what senders emit: reference forms, units, Bundles, and
//! the errors for what cannot be used (with a path, never the value).

use chrono::{TimeZone, Utc};
use rx_domain::fhir::{self, FhirError};
use rx_domain::PrescriberRef;
use serde_json::{json, Value};

fn order() -> Value {
    json!({
        "resourceType": "MedicationRequest",
        "id": "rx1",
        "status": "active",
        "intent": "order",
        "medicationCodeableConcept": {
            "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "1049621",
                        "display": "oxycodone hydrochloride 5 MG Oral Tablet"}]
        },
        "subject": {"reference": "Patient/p1"},
        "authoredOn": "2025-03-01T10:00:00Z",
        "requester": {"reference": "Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|1234567893"},
        "dosageInstruction": [{"timing": {"repeat": {"frequency": 1, "period": 6, "periodUnit": "h"}},
                               "asNeededBoolean": true,
                               "doseAndRate": [{"doseQuantity": {"value": 1, "unit": "tablet"}}]}],
        "dispenseRequest": {"numberOfRepeatsAllowed": 0,
                            "quantity": {"value": 20, "unit": "tablet"},
                            "expectedSupplyDuration": {"value": 5, "unit": "days", "code": "d"}}
    })
}

fn parse_err(v: &Value) -> FhirError {
    fhir::parse_medication_request(v).unwrap_err()
}

#[test]
fn conditional_npi_requester_becomes_an_npi() {
    let o = fhir::parse_medication_request(&order()).unwrap();
    assert_eq!(o.requester, PrescriberRef::Npi("1234567893".into()));
}

#[test]
fn percent_encoded_conditional_requester_is_decoded() {
    let mut v = order();
    v["requester"]["reference"] =
        json!("Practitioner?identifier=http%3A%2F%2Fhl7.org%2Ffhir%2Fsid%2Fus-npi%7C1234567893");
    let o = fhir::parse_medication_request(&v).unwrap();
    assert_eq!(o.requester, PrescriberRef::Npi("1234567893".into()));
}

#[test]
fn conditional_requester_on_another_identifier_is_refused() {
    let mut v = order();
    v["requester"]["reference"] = json!("Practitioner?identifier=urn:oid:1.2.3|42");
    assert_eq!(parse_err(&v).path, "MedicationRequest.requester.reference");
}

#[test]
fn literal_requester_becomes_a_reference_and_missing_requester_is_missing() {
    let mut v = order();
    v["requester"] = json!({"reference": "Practitioner/dr-7"});
    assert_eq!(
        fhir::parse_medication_request(&v).unwrap().requester,
        PrescriberRef::Reference("dr-7".into())
    );
    v.as_object_mut().unwrap().remove("requester");
    assert_eq!(
        fhir::parse_medication_request(&v).unwrap().requester,
        PrescriberRef::Missing
    );
}

#[test]
fn npi_identifier_requester_becomes_an_npi() {
    let mut v = order();
    v["requester"] =
        json!({"identifier": {"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"}});
    assert_eq!(
        fhir::parse_medication_request(&v).unwrap().requester,
        PrescriberRef::Npi("1234567893".into())
    );
}

#[test]
fn contained_practitioner_requester_is_inline_with_npi_and_dea() {
    let mut v = order();
    v["contained"] = json!([{
        "resourceType": "Practitioner", "id": "dr",
        "identifier": [
            {"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"},
            {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "DEA"}]},
             "value": "ap5836727"}
        ],
        "name": [{"family": "Pump", "given": ["Patrick"]}]
    }]);
    v["requester"] = json!({"reference": "#dr"});
    let PrescriberRef::Inline(p) = fhir::parse_medication_request(&v).unwrap().requester else {
        panic!("not inline")
    };
    assert_eq!(p.npi.as_deref(), Some("1234567893"));
    assert_eq!(p.dea.as_deref(), Some("AP5836727"));
    assert_eq!(p.name.as_deref(), Some("Patrick Pump"));
}

#[test]
fn dangling_contained_reference_names_the_reference() {
    let mut v = order();
    v["requester"] = json!({"reference": "#nobody"});
    assert_eq!(parse_err(&v).path, "MedicationRequest.requester.reference");
    let mut v = order();
    v.as_object_mut()
        .unwrap()
        .remove("medicationCodeableConcept");
    v["medicationReference"] = json!({"reference": "#med0302"});
    assert_eq!(
        parse_err(&v).path,
        "MedicationRequest.medicationReference.reference"
    );
}

#[test]
fn order_fields_are_read_with_units_converted() {
    let o = fhir::parse_medication_request(&order()).unwrap();
    assert_eq!(
        o.refills,
        Some(0),
        "numberOfRepeatsAllowed 0 means no refills, not unknown"
    );
    assert_eq!(
        (o.quantity, o.quantity_unit.as_deref()),
        (Some(20.0), Some("tablet"))
    );
    assert_eq!(o.days_supply, Some(5));
    assert_eq!(o.dosage[0].per_day, Some(4.0));
    assert!(o.dosage[0].as_needed);
    assert_eq!(o.dosage[0].dose_unit.as_deref(), Some("tablet"));
    assert_eq!(
        o.authored_on,
        Some(Utc.with_ymd_and_hms(2025, 3, 1, 10, 0, 0).unwrap())
    );

    let mut v = order();
    v["dispenseRequest"]["expectedSupplyDuration"] = json!({"value": 4, "code": "wk"});
    assert_eq!(
        fhir::parse_medication_request(&v).unwrap().days_supply,
        Some(28)
    );
    v["dispenseRequest"]["expectedSupplyDuration"] = json!({"value": 3, "code": "mo"});
    assert_eq!(
        fhir::parse_medication_request(&v).unwrap().days_supply,
        Some(90)
    );
    v["dosageInstruction"][0]["timing"]["repeat"] =
        json!({"frequency": 1, "period": 1, "periodUnit": "wk"});
    let per_day = fhir::parse_medication_request(&v).unwrap().dosage[0]
        .per_day
        .unwrap();
    assert!((per_day - 1.0 / 7.0).abs() < 1e-12);
}

#[test]
fn order_without_dispense_request_or_dosage_parses_with_nothing_invented() {
    let mut v = order();
    let o = v.as_object_mut().unwrap();
    o.remove("dispenseRequest");
    o.remove("dosageInstruction");
    let o = fhir::parse_medication_request(&v).unwrap();
    assert_eq!(
        (o.quantity, o.days_supply, o.refills, o.valid_until),
        (None, None, None, None)
    );
    assert!(o.dosage.is_empty());
}

#[test]
fn authored_on_as_a_date_is_midnight_utc() {
    let mut v = order();
    v["authoredOn"] = json!("2024-02-29");
    assert_eq!(
        fhir::parse_medication_request(&v).unwrap().authored_on,
        Some(Utc.with_ymd_and_hms(2024, 2, 29, 0, 0, 0).unwrap())
    );
    v["authoredOn"] = json!("2023-02-29");
    assert_eq!(parse_err(&v).path, "MedicationRequest.authoredOn");
}

#[test]
fn hyphenated_ndc_coding_is_normalized_to_eleven_digits() {
    let mut v = order();
    v["medicationCodeableConcept"] = json!({"coding": [
        {"system": "http://hl7.org/fhir/sid/ndc", "code": "0574-4072-05"}], "text": "x"});
    let m = fhir::parse_medication_request(&v).unwrap().medication;
    assert_eq!((m.ndc.as_deref(), m.rxnorm), (Some("00574407205"), None));
    // A code that is no NDC is kept as sent: the order parses, and validation rejects it with
    // `ndc-invalid` (validate's tests) instead of losing it as unreadable input.
    v["medicationCodeableConcept"]["coding"][0]["code"] = json!(" 5165-089-52 ");
    let m = fhir::parse_medication_request(&v).unwrap().medication;
    assert_eq!(m.ndc.as_deref(), Some("5165-089-52"));
    assert!(rx_domain::ids::normalize_ndc("5165-089-52").is_err());
}

#[test]
fn missing_required_parts_name_their_path() {
    let cases: [(&str, &str); 4] = [
        ("subject", "MedicationRequest.subject"),
        (
            "medicationCodeableConcept",
            "MedicationRequest.medication[x]",
        ),
        ("status", "MedicationRequest.status"),
        ("intent", "MedicationRequest.intent"),
    ];
    for (field, path) in cases {
        let mut v = order();
        v.as_object_mut().unwrap().remove(field);
        assert_eq!(parse_err(&v).path, path, "without {field}");
    }
    assert_eq!(parse_err(&json!([1, 2])).path, "MedicationRequest");
    let mut v = order();
    v["resourceType"] = json!("Patient");
    assert_eq!(parse_err(&v).path, "MedicationRequest.resourceType");
    let mut v = order();
    v["subject"] = json!({"reference": "Group/g1"});
    assert_eq!(parse_err(&v).path, "MedicationRequest.subject.reference");
}

#[test]
fn wrong_types_and_bad_numbers_name_their_path() {
    let cases = [
        (
            "/dispenseRequest/quantity/value",
            json!("20"),
            "MedicationRequest.dispenseRequest.quantity.value",
        ),
        (
            "/dispenseRequest/quantity/value",
            json!(-1),
            "MedicationRequest.dispenseRequest.quantity.value",
        ),
        (
            "/dispenseRequest/numberOfRepeatsAllowed",
            json!(1.5),
            "MedicationRequest.dispenseRequest.numberOfRepeatsAllowed",
        ),
        (
            "/dispenseRequest/numberOfRepeatsAllowed",
            json!(-2),
            "MedicationRequest.dispenseRequest.numberOfRepeatsAllowed",
        ),
        (
            "/dosageInstruction/0/timing/repeat/period",
            json!(0),
            "MedicationRequest.dosageInstruction[0].timing.repeat.period",
        ),
        (
            "/dosageInstruction/0/timing/repeat/periodUnit",
            json!("fortnight"),
            "MedicationRequest.dosageInstruction[0].timing.repeat.periodUnit",
        ),
        (
            "/dosageInstruction/0",
            json!(7),
            "MedicationRequest.dosageInstruction[0]",
        ),
        ("/subject", json!("Patient/p1"), "MedicationRequest.subject"),
    ];
    for (pointer, value, path) in cases {
        let mut v = order();
        *v.pointer_mut(pointer).unwrap() = value.clone();
        assert_eq!(parse_err(&v).path, path, "{pointer} = {value}");
    }
}

#[test]
fn error_display_names_the_path_but_never_the_value() {
    let secret = "999-12-3456 Jane Doe";
    let mut v = order();
    v["subject"] = json!({"reference": secret});
    v["authoredOn"] = json!(secret);
    for e in [
        parse_err(&v),
        fhir::parse_patient(&json!({"resourceType": "Patient", "id": "p", "birthDate": secret}))
            .unwrap_err(),
    ] {
        let shown = e.to_string();
        assert!(shown.starts_with(&e.path), "{shown}");
        assert!(
            !shown.contains("999-12-3456") && !shown.contains("Jane"),
            "{shown}"
        );
    }
}

#[test]
fn ndjson_line_that_is_not_json_says_where_without_content() {
    let e = fhir::parse_json("{\"resourceType\": \"Patient\", \"name\": \"Jane Doe").unwrap_err();
    assert!(e.path.contains("line 1"));
    assert!(!e.to_string().contains("Jane"));
    assert!(matches!(
        fhir::parse_json(&order().to_string()).unwrap(),
        fhir::Resource::MedicationRequest(_)
    ));
}

fn bundle(kind: &str) -> Value {
    json!({
        "resourceType": "Bundle",
        "type": kind,
        "entry": [
            {"fullUrl": "urn:uuid:7f1c0000-0000-4000-8000-000000000001",
             "resource": {"resourceType": "Patient", "id": "pat-a",
                          "identifier": [{"system": "urn:mrn", "value": "MRN-1"}],
                          "name": [{"given": ["Test"], "family": "Patient"}]}},
            {"fullUrl": "urn:uuid:7f1c0000-0000-4000-8000-000000000002",
             "resource": {"resourceType": "Practitioner",
                          "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"},
                                         {"system": "http://terminology.hl7.org/NamingSystem/DEANumber", "value": "AP5836727"}]}},
            {"fullUrl": "https://ehr.example/fhir/PractitionerRole/role-1",
             "resource": {"resourceType": "PractitionerRole", "id": "role-1",
                          "practitioner": {"reference": "urn:uuid:7f1c0000-0000-4000-8000-000000000002"}}},
            {"fullUrl": "urn:uuid:7f1c0000-0000-4000-8000-000000000003",
             "resource": {"resourceType": "Medication", "code": {"coding": [
                 {"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "197591"}]}}},
            {"resource": {"resourceType": "AllergyIntolerance", "id": "al-1",
                          "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "7980", "display": "Penicillin G"}]},
                          "patient": {"reference": "urn:uuid:7f1c0000-0000-4000-8000-000000000001"}}},
            {"resource": {"resourceType": "MedicationRequest", "id": "o1", "status": "active", "intent": "order",
                          "medicationReference": {"reference": "urn:uuid:7f1c0000-0000-4000-8000-000000000003"},
                          "subject": {"reference": "urn:uuid:7f1c0000-0000-4000-8000-000000000001"},
                          "requester": {"reference": "urn:uuid:7f1c0000-0000-4000-8000-000000000002"}}},
            {"resource": {"resourceType": "MedicationRequest", "id": "o2", "status": "active", "intent": "order",
                          "medicationCodeableConcept": {"text": "something"},
                          "subject": {"reference": "Patient/pat-a"},
                          "requester": {"reference": "PractitionerRole/role-1"}}},
            {"resource": {"resourceType": "MedicationRequest", "id": "o3", "status": "active", "intent": "order",
                          "medicationCodeableConcept": {"text": "something"},
                          "subject": {"reference": "Patient?identifier=urn:mrn|MRN-1"},
                          "requester": {"reference": "Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|1234567893"}}},
            {"resource": {"resourceType": "MedicationRequest", "id": "o4", "status": "active", "intent": "order",
                          "medicationCodeableConcept": {"text": "something"},
                          "subject": {"reference": "Patient/elsewhere"},
                          "requester": {"reference": "Practitioner/elsewhere"}}},
            {"resource": {"resourceType": "Organization", "id": "org"}}
        ]
    })
}

#[test]
fn bundle_references_resolve_to_bundle_resources() {
    for kind in ["collection", "transaction", "batch"] {
        let s = fhir::parse_submission(&bundle(kind)).unwrap();
        assert_eq!(s.patients.len(), 1);
        assert_eq!(s.prescribers.len(), 1);
        assert_eq!(s.allergies.len(), 1);
        assert_eq!(s.allergies[0].0, "pat-a");
        assert_eq!(s.orders.len(), 4);
        for o in &s.orders[..3] {
            assert_eq!(o.patient_ref, "pat-a", "order {:?}", o.source_id);
            let PrescriberRef::Inline(p) = &o.requester else {
                panic!("order {:?}: requester {:?}", o.source_id, o.requester)
            };
            assert_eq!(p.dea.as_deref(), Some("AP5836727"));
        }
        assert_eq!(s.orders[0].medication.rxnorm.as_deref(), Some("197591"));
        assert_eq!(s.orders[3].patient_ref, "elsewhere");
        assert_eq!(
            s.orders[3].requester,
            PrescriberRef::Reference("elsewhere".into())
        );
    }
}

#[test]
fn bundle_errors_name_the_entry() {
    let mut b = bundle("transaction");
    b["entry"][6]["resource"]
        .as_object_mut()
        .unwrap()
        .remove("subject");
    assert_eq!(
        fhir::parse_submission(&b).unwrap_err().path,
        "Bundle.entry[6].resource.subject"
    );
    let mut b = bundle("transaction");
    b["type"] = json!("history");
    assert_eq!(fhir::parse_submission(&b).unwrap_err().path, "Bundle.type");
    assert_eq!(
        fhir::parse_submission(&json!({"resourceType": "Patient"}))
            .unwrap_err()
            .path,
        "resource.resourceType"
    );
}

#[test]
fn patient_identifiers_keep_system_value_and_type() {
    let p = fhir::parse_patient(&json!({
        "resourceType": "Patient", "id": "x",
        "identifier": [
            {"type": {"coding": [{"code": "SS"}]}, "value": "999-00-1111"},
            {"system": "urn:oid:2.16.840.1.113883.4.3.25", "type": {"coding": [{"code": "DL"}]}, "value": "S999"},
            {"system": "urn:no-value"}
        ],
        "name": [{"use": "maiden", "family": "Old"}, {"use": "official", "family": "New", "given": ["A", "B"]}],
        "telecom": [{"system": "email", "value": "a@example.org"}, {"system": "phone", "value": "555-0100"}],
        "address": [{"use": "work", "city": "W"}, {"use": "home", "line": ["1 Main St"], "city": "H", "state": "KS"}]
    }))
    .unwrap();
    assert_eq!(
        p.ssn(),
        Some("999-00-1111"),
        "an SS-typed identifier without system is the SSN"
    );
    assert_eq!(p.identifiers.len(), 2);
    assert_eq!(p.name.as_deref(), Some("A B New"));
    assert_eq!(p.phone.as_deref(), Some("555-0100"));
    assert_eq!(p.address.as_deref(), Some("1 Main St, H, KS"));
    assert_eq!(
        fhir::parse_patient(&json!({"resourceType": "Patient"}))
            .unwrap_err()
            .path,
        "Patient.id"
    );
}

#[test]
fn allergy_without_substance_or_patient_is_refused() {
    let a = json!({"resourceType": "AllergyIntolerance", "patient": {"reference": "Patient/p"},
                   "code": {"text": "penicillin"}});
    let (p, al) = fhir::parse_allergy(&a).unwrap();
    assert_eq!(
        (p.as_str(), al.substance.as_str(), al.clinical_status),
        ("p", "penicillin", None)
    );
    let mut no_code = a.clone();
    no_code.as_object_mut().unwrap().remove("code");
    assert_eq!(
        fhir::parse_allergy(&no_code).unwrap_err().path,
        "AllergyIntolerance.code"
    );
    let mut no_patient = a;
    no_patient.as_object_mut().unwrap().remove("patient");
    assert_eq!(
        fhir::parse_allergy(&no_patient).unwrap_err().path,
        "AllergyIntolerance.patient"
    );
}

/// PractitionerRoles that point at each other (a cycle, through `urn:uuid:` references) resolve
/// to no prescriber; they used to be followed until the stack overflowed, which aborted a server
/// on a 1.7 KB Bundle.
#[test]
fn practitioner_roles_pointing_at_roles_resolve_to_nothing() {
    let b = json!({"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:role-a", "resource": {"resourceType": "PractitionerRole",
            "practitioner": {"reference": "urn:uuid:role-b"}}},
        {"fullUrl": "urn:uuid:role-b", "resource": {"resourceType": "PractitionerRole",
            "practitioner": {"reference": "urn:uuid:role-a"}}},
        {"resource": {"resourceType": "MedicationRequest", "id": "o1", "status": "active",
            "intent": "order", "medicationCodeableConcept": {"text": "something"},
            "subject": {"reference": "Patient/p"},
            "requester": {"reference": "urn:uuid:role-a"}}}
    ]});
    let s = fhir::parse_submission(&b).unwrap();
    assert_eq!(s.orders.len(), 1);
    assert!(
        !matches!(s.orders[0].requester, PrescriberRef::Inline(_)),
        "{:?}",
        s.orders[0].requester
    );
}
