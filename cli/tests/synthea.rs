//! `rxflow run` on the real Synthea bulk export (../shared/data/synthea-10): as it stands and
//! replayed, every order reaches a final or waiting state with a reason, nothing of the patients
//! is left in clear, and the audit trail verifies.

mod support;

use serde_json::Value;
use support::*;

const ORDERS: u64 = 1_745;
const MEPERIDINE: &str = "861467";

/// Statuses an order may end a run in: final, or waiting on a person or a later fill.
const SETTLED: [&str; 7] = [
    "rejected",
    "needs-clarification",
    "awaiting-verification",
    "verified",
    "partially-dispensed",
    "dispensed",
    "cancelled",
];

fn orders(r: &Value) -> &Vec<Value> {
    r["orders"].as_array().expect("orders array")
}

fn assert_every_order_settled_with_a_reason(r: &Value) {
    assert_eq!(r["orders_total"], ORDERS, "{:#}", r["by_status"]);
    assert_eq!(orders(r).len() as u64, ORDERS);
    for o in orders(r) {
        let status = o["status"].as_str().unwrap();
        assert!(
            SETTLED.contains(&status),
            "order {} ended {status}",
            o["id"]
        );
        let reasons = o["reasons"].as_array().unwrap();
        let alerts = o["alerts"].as_array().unwrap();
        match status {
            "rejected" | "needs-clarification" => {
                assert!(
                    !reasons.is_empty(),
                    "order {} is {status} without a reason",
                    o["id"]
                );
                for r in reasons {
                    assert!(!r["message"].as_str().unwrap().is_empty());
                }
            }
            "verified" => assert!(
                !reasons.is_empty(),
                "order {} was verified but not dispensed, without a reason",
                o["id"]
            ),
            "awaiting-verification" => assert!(
                !alerts.is_empty(),
                "order {} waits for a pharmacist without an alert saying why",
                o["id"]
            ),
            _ => {}
        }
    }
    assert_eq!(r["audit_verified"], true);
}

/// The export's meperidine orders (RxNorm 861467) by id.
fn meperidine_ids(export: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(export.join("MedicationRequest.ndjson")).unwrap();
    text.lines()
        .filter(|l| l.contains(MEPERIDINE))
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[test]
fn synthea_export_as_it_stands() {
    let Some(export) = shared_data("synthea-10") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let out = run(&[
        "run",
        "--input",
        export.to_str().unwrap(),
        "--json",
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let r = report(&out);
    assert_every_order_settled_with_a_reason(&r);
    // 1,722 of the orders are `stopped`: medication history, not prescriptions to dispense.
    let stopped = orders(&r)
        .iter()
        .filter(|o| {
            o["reasons"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["code"] == "status-not-dispensable")
        })
        .count();
    assert_eq!(stopped, 1_722);
    assert_eq!(
        by_status(&r, "dispensed"),
        0,
        "nothing is dispensed without a pharmacist"
    );

    let logs = keep_output(tmp.path(), "as-is", &out);
    assert_no_phi(&export, &[&data, &logs]);
    let v = run(&["audit", "verify", "--data-dir", data.to_str().unwrap()]);
    assert!(v.status.success(), "{}", text(&v.stdout));
}

#[test]
fn synthea_replay_with_a_pharmacist() {
    let Some(export) = shared_data("synthea-10") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let out = run(&[
        "run",
        "--input",
        export.to_str().unwrap(),
        "--replay",
        "--verify-as",
        "pharmacist-1",
        "--json",
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let r = report(&out);
    assert_every_order_settled_with_a_reason(&r);
    assert!(by_status(&r, "dispensed") > 100, "{:#}", r["by_status"]);

    // The meperidine prescriber has no DEA number on file: not dispensed, and the reason says so.
    let ids = meperidine_ids(&export);
    assert!(!ids.is_empty());
    for id in &ids {
        let o = orders(&r).iter().find(|o| o["id"] == id.as_str()).unwrap();
        assert_eq!(o["status"], "rejected", "meperidine order {id}: {o:#}");
        assert!(
            o["reasons"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["code"] == "dea-required"),
            "{o:#}"
        );
    }

    let logs = keep_output(tmp.path(), "replay", &out);
    assert_no_phi(&export, &[&data, &logs]);
    let v = run(&["audit", "verify", "--data-dir", data.to_str().unwrap()]);
    assert!(v.status.success(), "{}", text(&v.stdout));
}

#[test]
fn a_second_run_of_the_same_export_stores_nothing_twice() {
    let Some(export) = shared_data("synthea-10") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let args = [
        "run",
        "--input",
        export.to_str().unwrap(),
        "--json",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    let first = report(&run(&args));
    let second = report(&run(&args));
    assert_eq!(first["by_status"], second["by_status"]);
    let conn = rusqlite::Connection::open(data.join("rxflow.db")).unwrap();
    let n: i64 = conn
        .query_row("SELECT count(*) FROM prescriptions", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n as u64, ORDERS);
}
