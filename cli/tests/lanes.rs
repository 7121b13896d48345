//! Orders in flight side by side (`--in-flight`) come out exactly as one at a time: each
//! patient's orders are reviewed and filled in the order given, so every alert that depends on
//! an earlier order (duplicate therapy, early refill, interactions, MME) is the same, and the
//! report lists the orders in input order.

mod support;

use std::path::Path;

use serde_json::Value;
use support::*;

/// The per-order part of a `--json` report, without the prescription ids each run makes anew.
fn outcomes(r: &Value) -> Vec<Value> {
    r["orders"]
        .as_array()
        .expect("orders in the report")
        .iter()
        .map(|o| {
            let mut o = o.clone();
            o.as_object_mut().unwrap().remove("rx_id");
            o
        })
        .collect()
}

fn json_run(args: &[&str], data: &Path, in_flight: u16) -> Value {
    let n = in_flight.to_string();
    let mut all = args.to_vec();
    all.extend([
        "--json",
        "--in-flight",
        &n,
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    let out = run(&all);
    assert!(
        out.status.success(),
        "rxflow {all:?} failed:\n{}",
        text(&out.stderr)
    );
    report(&out)
}

fn same_either_way(args: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let one = json_run(args, &tmp.path().join("one"), 1);
    let wide = json_run(args, &tmp.path().join("wide"), 64);
    let (a, b) = (outcomes(&one), outcomes(&wide));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x, y, "one at a time vs 64 in flight");
    }
    assert_eq!(one["by_status"], wide["by_status"]);
    assert_eq!(one["alerts_by_kind"], wide["alerts_by_kind"]);
    assert_eq!(one["audit_events"], wide["audit_events"]);
    assert_eq!(wide["audit_verified"], true);
}

#[test]
fn the_demo_cohort_in_flight_gives_what_one_at_a_time_gives() {
    same_either_way(&["demo", "--orders", "720", "--seed", "7"]);
}

#[test]
fn a_replay_of_ten_patients_histories_in_flight_gives_what_one_at_a_time_gives() {
    // 1,745 orders of ten patients: nearly every order waits for an earlier one of its patient.
    let Some(input) = shared_data("synthea-10") else {
        return;
    };
    same_either_way(&[
        "run",
        "--input",
        input.to_str().unwrap(),
        "--replay",
        "--verify-as",
        "test-pharmacist",
    ]);
}
