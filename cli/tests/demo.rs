//! `rxflow demo` end to end: the generated cohort through every step, each planned case getting
//! the outcome its rule gives, and an intact audit trail.

mod support;

use std::collections::HashMap;

use rx_domain::synth::{self, Expected, Role};
use serde_json::Value;
use support::*;

const ORDERS: usize = 720;
const SEED: u64 = 7;

fn demo(dir: &std::path::Path) -> Value {
    let out = run(&[
        "demo",
        "--orders",
        &ORDERS.to_string(),
        "--seed",
        &SEED.to_string(),
        "--json",
        "--data-dir",
        dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "demo failed:\n{}", text(&out.stderr));
    report(&out)
}

#[test]
fn demo_gives_every_planned_case_the_outcome_of_its_rule() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let r = demo(&data);
    assert_eq!(r["orders_total"], ORDERS as u64);
    assert_eq!(r["audit_verified"], true, "{r:#}");
    assert!(r["audit_events"].as_u64().unwrap() > ORDERS as u64 * 5);

    let by_id: HashMap<&str, &Value> = r["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (o["id"].as_str().unwrap(), o))
        .collect();
    assert_eq!(by_id.len(), ORDERS);

    let cfg = rxflow::commands::cohort_config(SEED, ORDERS);
    let cohort = synth::cohort(&cfg);
    let mut checked: HashMap<&'static str, usize> = HashMap::new();
    for order in synth::orders(&cfg, &cohort) {
        let Some((case, Role::Trigger)) = synth::planned_case(&order) else {
            continue;
        };
        let id = order["id"].as_str().unwrap();
        let got = by_id[id];
        let status = got["status"].as_str().unwrap();
        let reasons: Vec<&str> = got["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["code"].as_str().unwrap())
            .collect();
        let alerts: Vec<(String, String)> = got["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["kind"].as_str().unwrap().to_string(),
                    a["severity"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        match case.expected() {
            Expected::Dispensable => assert!(
                status == "dispensed" || status == "partially-dispensed",
                "{} order {id}: {status} {reasons:?} {alerts:?}",
                case.as_str()
            ),
            Expected::Reason(code) => {
                assert!(
                    status == "rejected" || status == "needs-clarification",
                    "{} order {id}: {status}",
                    case.as_str()
                );
                assert!(
                    reasons.contains(&code),
                    "{} order {id}: {reasons:?}",
                    case.as_str()
                );
            }
            Expected::Alert(kind, severity) => {
                // At least the planned severity: a patient's earlier order still active can add
                // to it (a second opioid takes 50 MME/day past 90).
                let rank = |s: &str| ["low", "moderate", "high"].iter().position(|x| *x == s);
                assert!(
                    alerts
                        .iter()
                        .any(|(k, s)| k == kind.as_str() && rank(s) >= rank(severity.as_str())),
                    "{} order {id}: {alerts:?}",
                    case.as_str()
                );
                if severity == rx_domain::Severity::High {
                    assert_eq!(
                        status,
                        "awaiting-verification",
                        "{} order {id}: a high alert holds the order for a pharmacist",
                        case.as_str()
                    );
                }
            }
        }
        *checked.entry(case.as_str()).or_default() += 1;
    }
    for case in synth::Case::ALL {
        assert!(
            checked.get(case.as_str()).copied().unwrap_or(0) > 0,
            "no order of case {} in {ORDERS} orders",
            case.as_str()
        );
    }
    for s in [
        "dispensed",
        "rejected",
        "needs-clarification",
        "awaiting-verification",
    ] {
        assert!(
            by_status(&r, s) > 0,
            "no order ended {s}: {:#}",
            r["by_status"]
        );
    }

    let v = run(&["audit", "verify", "--data-dir", data.to_str().unwrap()]);
    assert!(v.status.success(), "{}", text(&v.stdout));
    assert!(text(&v.stdout).contains("intact"));
}

/// A second demo into the same directory counts the events it wrote, not the directory's.
#[test]
fn a_second_demo_counts_its_own_audit_events() {
    let dir = tempfile::tempdir().unwrap();
    let first = demo(dir.path());
    let second = demo(dir.path());
    assert_eq!(first["audit_events_written"], first["audit_events"]);
    let (written, total) = (
        second["audit_events_written"].as_u64().unwrap(),
        second["audit_events"].as_u64().unwrap(),
    );
    assert_eq!(total - written, first["audit_events"].as_u64().unwrap());
    assert!(written > 0 && written < total, "{written} of {total}");
    // The second run only looked its orders up: no throughput to claim.
    assert_eq!(second["already_stored"], ORDERS as u64);
    assert_eq!(second["orders_per_second"], 0.0, "{second:#}");
    assert!(first["orders_per_second"].as_f64().unwrap() > 0.0);
}

#[test]
fn the_same_seed_gives_the_same_outcomes() {
    let tmp = tempfile::tempdir().unwrap();
    let a = demo(&tmp.path().join("a"));
    let b = demo(&tmp.path().join("b"));
    assert_eq!(a["by_status"], b["by_status"]);
    assert_eq!(a["alerts_by_kind"], b["alerts_by_kind"]);
    assert_eq!(a["reasons"], b["reasons"]);
}

#[test]
fn demo_human_report_names_every_section() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    let out = run(&[
        "demo",
        "--orders",
        "300",
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    for want in [
        "orders/s",
        "Final status",
        "Top reasons",
        "Drug-utilization review alerts",
        "Controlled-substance orders",
        "verified intact",
    ] {
        assert!(s.contains(want), "report lacks {want:?}:\n{s}");
    }
    // Every reason a planned case gives is listed (the list was cut at 12 of 13).
    for case in synth::Case::ALL {
        if let Expected::Reason(code) = case.expected() {
            assert!(s.contains(code), "report lacks reason {code}:\n{s}");
        }
    }
}
