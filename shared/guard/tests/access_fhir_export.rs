//! The FHIR R4 AuditEvent export: codes checked here, structure checked by a third-party FHIR
//! model (`fhir.resources`, R4B) through tests/fhir_auditevent_check.py.

use std::path::PathBuf;
use std::process::Command;

use chrono::{TimeZone, Utc};
use rx_guard::access::{Action as AccessAction, Principal, Role};
use rx_guard::audit::fhir::to_fhir;
use rx_guard::audit::{Action, AuditEvent, Outcome, Purpose, ResourceRef};

fn workspace_root() -> PathBuf {
    PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR"))
        .join("../..")
}

fn principal(role: Role) -> Principal {
    Principal {
        subject: format!("{role}-42"),
        role,
        tenant: "acme".into(),
        mfa: true,
        npi: None,
        break_glass: None,
    }
}

/// One event per audit action, outcome, purpose and break-glass variant, as the pipeline makes them.
fn sample_events() -> Vec<AuditEvent> {
    let at = Utc
        .with_ymd_and_hms(2025, 2, 3, 4, 5, 6)
        .single()
        .expect("time");
    let rx = || ResourceRef {
        kind: "MedicationRequest".into(),
        id: "0194c8a0-1111-7000-8000-00000000abcd".into(),
    };
    let mut out = Vec::new();
    let actions = [
        Action::Create,
        Action::Read,
        Action::Update,
        Action::Decrypt,
        Action::Disclose,
        Action::Deny,
        Action::BreakGlass,
        Action::Quarantine,
    ];
    for (i, action) in actions.into_iter().enumerate() {
        let role = Role::ALL[i % Role::ALL.len()];
        let mut e = AuditEvent::new(
            principal(role).actor(),
            action,
            rx(),
            "records",
            Purpose::Treatment,
        );
        e.at = at;
        e.patient = Some("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into());
        e.source_ip = Some("203.0.113.7".into());
        if action == Action::Deny {
            e.outcome = Outcome::Denied;
            e.detail = Some("mfa-required".into());
        }
        if action == Action::Quarantine {
            e.outcome = Outcome::Failed;
            e.resource = ResourceRef {
                kind: "Input".into(),
                id: "0194c8a0-2222-7000-8000-000000000001".into(),
            };
            e.actor.subject = "system:intake".into();
            e.patient = None;
            e.source_ip = None;
        }
        if action == Action::BreakGlass {
            e.purpose = Purpose::Emergency;
            e.break_glass = true;
        }
        out.push(e);
    }
    let mut flagged_read = AuditEvent::new(
        principal(Role::Technician).actor(),
        Action::Read,
        rx(),
        "records",
        Purpose::Treatment,
    );
    flagged_read.break_glass = true;
    out.push(flagged_read);
    let mut audit_read = AuditEvent::new(
        principal(Role::Auditor).actor(),
        AccessAction::ReadAuditEvents.audit_action(),
        ResourceRef {
            kind: "AuditEvent".into(),
            id: "0194c8a0-3333-7000-8000-000000000002".into(),
        },
        "audit",
        Purpose::SystemAdministration,
    );
    audit_read.detail = Some("search by patient".into());
    out.push(audit_read);
    // A refused sign-in: nobody's claims are trusted, the route template is the entity.
    let mut login = AuditEvent::new(
        rx_guard::audit::Actor {
            subject: "unauthenticated".into(),
            role: "none".into(),
            tenant: "pharmacy-a".into(),
        },
        Action::Login,
        ResourceRef {
            kind: "Endpoint".into(),
            id: "/patients/{id}/prescriptions".into(),
        },
        "http",
        Purpose::Operations,
    );
    login.outcome = Outcome::Denied;
    login.source_ip = Some("198.51.100.9".into());
    login.detail = Some("the token has expired; sign in again".into());
    out.push(login);
    out
}

#[test]
fn export_carries_who_what_when_where_outcome_and_purpose() {
    let events = sample_events();
    let read = &events[1];
    let f = to_fhir(read, 2);
    assert_eq!(f["resourceType"], "AuditEvent");
    assert_eq!(f["id"], read.id.as_str());
    assert_eq!(f["type"]["code"], "110110");
    assert_eq!(f["action"], "R");
    assert_eq!(f["recorded"], "2025-02-03T04:05:06.000Z");
    assert_eq!(f["outcome"], "0");
    assert_eq!(f["purposeOfEvent"][0]["coding"][0]["code"], "TREAT");
    let agent = &f["agent"][0];
    assert_eq!(agent["who"]["identifier"]["value"], "pharmacist-42");
    assert_eq!(agent["role"][0]["coding"][0]["code"], "pharmacist");
    assert_eq!(agent["requestor"], true);
    assert_eq!(agent["network"]["address"], "203.0.113.7");
    assert_eq!(f["source"]["observer"]["identifier"]["value"], "records");
    assert_eq!(
        f["entity"][0]["what"]["reference"],
        format!("MedicationRequest/{}", read.resource.id)
    );
    assert_eq!(
        f["entity"][1]["what"]["identifier"]["system"],
        "urn:rxflow:blind-index:patient"
    );
    assert_eq!(
        f["entity"][1]["what"]["identifier"]["value"],
        read.patient.as_deref().expect("patient")
    );
    assert_eq!(f["extension"][0]["valueString"], "2");
}

#[test]
fn export_maps_denials_failures_and_audit_reads() {
    let events = sample_events();
    let denied = to_fhir(&events[5], 6);
    assert_eq!(
        (denied["action"].as_str(), denied["outcome"].as_str()),
        (Some("E"), Some("4"))
    );
    assert_eq!(denied["outcomeDesc"], "mfa-required");
    let failed = to_fhir(&events[7], 8);
    assert_eq!(
        (failed["action"].as_str(), failed["outcome"].as_str()),
        (Some("C"), Some("8"))
    );
    assert_eq!(
        failed["agent"][0]["type"]["coding"][0]["code"],
        "dataprocessor"
    );
    assert_eq!(
        failed["entity"][0]["what"]["identifier"]["system"],
        "urn:rxflow:Input"
    );
    assert_eq!(
        failed["entity"].as_array().map(Vec::len),
        Some(1),
        "no patient entity without a patient"
    );
    let disclosed = to_fhir(&events[4], 5);
    assert_eq!(disclosed["type"]["code"], "110106");
    let audit_read = to_fhir(&events[9], 10);
    assert_eq!(audit_read["type"]["code"], "110101");
    assert_eq!(
        audit_read["purposeOfEvent"][0]["coding"][0]["code"],
        "HSYSADMIN"
    );
    let login = to_fhir(&events[10], 11);
    assert_eq!(login["type"]["code"], "110114");
    assert_eq!(login["subtype"][0]["code"], "110122");
    assert_eq!(
        (login["action"].as_str(), login["outcome"].as_str()),
        (Some("E"), Some("4"))
    );
    assert_eq!(login["agent"][0]["network"]["address"], "198.51.100.9");
}

#[test]
fn break_glass_events_are_marked_for_review() {
    let events = sample_events();
    for e in events.iter().filter(|e| e.break_glass) {
        let f = to_fhir(e, 1);
        let purposes: Vec<&str> = f["purposeOfEvent"]
            .as_array()
            .expect("purposes")
            .iter()
            .filter_map(|p| p["coding"][0]["code"].as_str())
            .collect();
        assert!(purposes.contains(&"ETREAT"), "{purposes:?}");
        assert_eq!(f["meta"]["security"][0]["code"], "BTG");
        assert_eq!(f["agent"][0]["policy"][0], "urn:rxflow:policy:break-glass");
    }
    assert_eq!(events.iter().filter(|e| e.break_glass).count(), 2);
}

/// The Python interpreter with `fhir.resources`, or None (with the reason printed) to skip.
fn fhir_python() -> Option<PathBuf> {
    let py = std::env::var_os("RXFLOW_PY")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv-tools/bin/python"));
    let probe = Command::new(&py)
        .args(["-c", "import fhir.resources.R4B.auditevent"])
        .output();
    let strict = std::env::var_os("RXFLOW_STRICT").is_some();
    match probe {
        Ok(o) if o.status.success() => Some(py),
        _ if strict => panic!(
            "RXFLOW_STRICT is set but {} cannot import fhir.resources.R4B; run .ci/run's install step",
            py.display()
        ),
        Ok(_) => {
            println!(
                "SKIPPED: {} has no fhir.resources (python3 -m venv ~/.cache/rxflow-venv && ~/.cache/rxflow-venv/bin/pip install fhir.resources cryptography, then set RXFLOW_PY=~/.cache/rxflow-venv/bin/python)",
                py.display()
            );
            None
        }
        Err(e) => {
            println!(
                "SKIPPED: no Python at {} ({e}); set RXFLOW_PY to a Python with fhir.resources (see the README)",
                py.display()
            );
            None
        }
    }
}

fn run_checker(py: &PathBuf, ndjson: &std::path::Path) -> std::process::Output {
    let script = PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR"),
    )
    .join("tests/fhir_auditevent_check.py");
    Command::new(py)
        .arg(script)
        .arg(ndjson)
        .output()
        .expect("run checker")
}

#[test]
fn exported_ndjson_validates_against_the_fhir_r4_auditevent_model() {
    let Some(py) = fhir_python() else { return };
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("AuditEvent.ndjson");
    let mut ndjson = String::new();
    for (i, e) in sample_events().iter().enumerate() {
        ndjson.push_str(&serde_json::to_string(&to_fhir(e, i as u64 + 1)).expect("json"));
        ndjson.push('\n');
    }
    std::fs::write(&path, &ndjson).expect("write");
    let out = run_checker(&py, &path);
    assert!(
        out.status.success(),
        "validator refused the export: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("11 AuditEvent resources valid"));

    // The checker is not a rubber stamp: a structurally broken event fails it.
    let mut broken = to_fhir(&sample_events()[0], 1);
    broken["agent"][0]["requestor"] = serde_json::json!("yes please");
    broken["recorded"] = serde_json::json!("last tuesday");
    std::fs::write(&path, format!("{broken}\n")).expect("write");
    assert!(!run_checker(&py, &path).status.success());
}
