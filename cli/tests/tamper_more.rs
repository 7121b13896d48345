//! `rxflow audit verify` against the tampering `tamper.rs` does not cover: searchable columns
//! edited apart from the hashed body, the end of the trail cut off together with its checkpoints,
//! and the public key removed. And `rxflow audit anchor`, the copy kept outside the data
//! directory that catches a trail cut back behind it.

mod support;

use std::path::{Path, PathBuf};

use support::*;

fn demo(dir: &Path, seed: &str, orders: &str) {
    let out = run(&[
        "demo",
        "--orders",
        orders,
        "--seed",
        seed,
        "--json",
        "--data-dir",
        dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

fn query<T: rusqlite::types::FromSql>(dir: &Path, sql: &str) -> T {
    let conn = rusqlite::Connection::open(dir.join("rxflow.db")).unwrap();
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// `rxflow audit verify --data-dir <dir> <extra…>`: (exit 0, stdout, stderr).
fn verify(dir: &Path, extra: &[&str]) -> (bool, String, String) {
    let mut args = vec!["audit", "verify", "--data-dir", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = run(&args);
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// `rxflow audit anchor`, written to a file outside the data directory.
fn take_anchor(dir: &Path, to: &Path) -> serde_json::Value {
    let out = run(&["audit", "anchor", "--data-dir", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::fs::write(to, &out.stdout).unwrap();
    serde_json::from_slice(&out.stdout).expect("the anchor is JSON")
}

/// Two demo runs, each sealed into its own checkpoint, more than the record rule's slack apart.
fn two_runs(dir: &Path) {
    demo(dir, "42", "40");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    demo(dir, "7", "20");
    let checkpoints: i64 = query(dir, "SELECT COUNT(*) FROM checkpoints");
    assert_eq!(checkpoints, 2);
}

#[test]
fn an_edited_searchable_column_is_named_with_its_event_but_not_its_value() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    demo(&base, "42", "40");
    let (ok, out, err) = verify(&base, &[]);
    assert!(ok, "untouched trail must verify: {out}{err}");

    let subject: String = query(&base, "SELECT subject FROM audit WHERE seq = 40");
    let first_with_subject: i64 = query(
        &base,
        &format!("SELECT MIN(seq) FROM audit WHERE subject = '{subject}'"),
    );
    let patient_seq: i64 = query(
        &base,
        "SELECT MIN(seq) FROM audit WHERE patient IS NOT NULL",
    );
    let cases = [
        (
            "subject",
            format!("UPDATE audit SET subject = 'innocent' WHERE subject = '{subject}'"),
            first_with_subject,
        ),
        (
            "patient",
            format!("UPDATE audit SET patient = NULL WHERE seq = {patient_seq}"),
            patient_seq,
        ),
        (
            "action",
            "UPDATE audit SET action = CASE action WHEN 'read' THEN 'create' ELSE 'read' END
             WHERE seq = 30"
                .to_string(),
            30,
        ),
        (
            "resource_id",
            "UPDATE audit SET resource_id = 'elsewhere' WHERE seq = 25".to_string(),
            25,
        ),
        (
            "at",
            "UPDATE audit SET at = '2001-01-01T00:00:00.000000000Z' WHERE seq = 20".to_string(),
            20,
        ),
        (
            "break_glass",
            "UPDATE audit SET break_glass = 1 - break_glass WHERE seq = 15".to_string(),
            15,
        ),
    ];
    for (column, sql, seq) in cases {
        let d = tmp.path().join(column);
        copy_dir(&base, &d);
        tamper(&d, &sql);
        let (ok, out, err) = verify(&d, &[]);
        assert!(!ok, "{column}: an edited column verified: {out}{err}");
        assert!(out.contains("BROKEN"), "{column}: {out}{err}");
        assert!(
            out.contains(&format!("audit event {seq} ")) && out.contains(column),
            "{column}: the sentence names event {seq} and the column: {out}"
        );
        for value in ["innocent", "elsewhere", "2001-01-01", subject.as_str()] {
            assert!(
                !out.contains(value),
                "{column}: the sentence quotes a value: {out}"
            );
        }
        let (_, json, _) = verify(&d, &["--json"]);
        let report: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            report["first_break"]["kind"], "event-index-mismatch",
            "{json}"
        );
        assert_eq!(report["first_break"]["seq"], seq, "{json}");
    }
}

#[test]
fn records_without_their_events_fail_verification() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    two_runs(&base);
    let (ok, out, err) = verify(&base, &[]);
    assert!(ok, "untouched trail must verify: {out}{err}");

    // Every event and every checkpoint deleted; the prescriptions and patients are still there.
    let d = tmp.path().join("emptied");
    copy_dir(&base, &d);
    tamper(&d, "DELETE FROM audit; DELETE FROM checkpoints;");
    let (ok, out, err) = verify(&d, &[]);
    assert!(
        !ok,
        "an emptied trail beside stored records verified: {out}{err}"
    );
    assert!(
        out.contains("BROKEN") && out.contains("trail is empty") && out.contains("prescription"),
        "{out}"
    );

    // The newest checkpoint deleted together with the events it covered.
    let d = tmp.path().join("cut");
    copy_dir(&base, &d);
    tamper(
        &d,
        "DELETE FROM audit WHERE seq > (SELECT last_seq FROM checkpoints WHERE number = 1);
         DELETE FROM checkpoints WHERE number = 2;",
    );
    let (ok, out, err) = verify(&d, &["--json"]);
    assert!(
        !ok,
        "a trail cut back with its checkpoint verified: {out}{err}"
    );
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        report["first_break"]["kind"], "records-without-events",
        "{out}"
    );
}

#[test]
fn an_anchor_kept_elsewhere_catches_a_trail_cut_back_behind_it() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    two_runs(&base);
    let anchor_file = tmp.path().join("anchor.json");
    let anchor = take_anchor(&base, &anchor_file);
    let last_seq: i64 = query(&base, "SELECT MAX(seq) FROM audit");
    assert_eq!(anchor["version"], 1);
    assert_eq!(anchor["checkpoint"], 2);
    assert_eq!(anchor["last_seq"], last_seq);
    assert_eq!(anchor["checkpoint_hash"].as_str().unwrap().len(), 64);
    assert_eq!(anchor["chain_head"].as_str().unwrap().len(), 64);
    assert!(anchor["key_id"]
        .as_str()
        .unwrap()
        .starts_with("local-ed25519:"));
    let anchor_arg = anchor_file.to_str().unwrap();

    let (ok, out, err) = verify(&base, &["--anchor", anchor_arg]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("anchored checkpoint 2 unchanged"), "{out}");

    // Later activity, sealed into later checkpoints, still holds the anchor.
    let later = tmp.path().join("later");
    copy_dir(&base, &later);
    demo(&later, "9", "5");
    let (ok, out, err) = verify(&later, &["--anchor", anchor_arg]);
    assert!(ok, "{out}{err}");

    let cuts = [
        (
            "newest checkpoint and its events",
            "DELETE FROM audit WHERE seq > (SELECT last_seq FROM checkpoints WHERE number = 1);
             DELETE FROM checkpoints WHERE number = 2;",
        ),
        ("every checkpoint", "DELETE FROM checkpoints;"),
        ("everything", "DELETE FROM audit; DELETE FROM checkpoints;"),
    ];
    for (name, sql) in cuts {
        let d = tmp.path().join(name.replace(' ', "-"));
        copy_dir(&base, &d);
        tamper(&d, sql);
        let (ok, out, err) = verify(&d, &["--anchor", anchor_arg, "--json"]);
        assert!(!ok, "{name}: verified against the anchor: {out}{err}");
        let report: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            report["first_break"]["kind"], "anchor-mismatch",
            "{name}: {out}"
        );
        assert_eq!(report["first_break"]["checkpoint"], 2, "{name}: {out}");
    }
}

#[test]
fn an_anchor_file_that_is_not_one_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("d");
    demo(&d, "42", "10");
    let bad = tmp.path().join("bad.json");
    std::fs::write(&bad, "{\"checkpoint\": 1}").unwrap();
    let (ok, _, err) = verify(&d, &["--anchor", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("anchor"), "{err}");
    let missing: PathBuf = tmp.path().join("missing.json");
    let (ok, _, err) = verify(&d, &["--anchor", missing.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("cannot read the anchor file"), "{err}");
}

#[test]
fn verify_without_any_public_key_fails_and_says_to_pass_one() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("d");
    demo(&d, "42", "10");
    let kept = tmp.path().join("kept-elsewhere.pub");
    std::fs::rename(d.join("keys/audit-signing.pub"), &kept).unwrap();
    let (ok, out, err) = verify(&d, &[]);
    assert!(!ok, "verified with no public key: {out}{err}");
    assert!(err.contains("--public-key"), "{err}");
    let (ok, out, err) = verify(&d, &["--public-key", kept.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("signatures verified"), "{out}");
}

#[test]
fn deleted_checkpoints_fail_a_plain_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("d");
    demo(&d, "42", "10");
    let (ok, out, err) = verify(&d, &[]);
    assert!(ok, "{out}{err}");
    // Every checkpoint goes; the chain of events that is left is whole.
    tamper(&d, "DELETE FROM checkpoints;");
    let (ok, out, err) = verify(&d, &[]);
    assert!(
        !ok,
        "verified a trail whose checkpoints were deleted: {out}"
    );
    assert!(out.contains("checkpoints were removed"), "{out}{err}");
}

#[test]
fn a_chain_column_rewritten_with_another_type_is_the_break_at_its_event() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    demo(&base, "42", "40");
    let cases = [
        (
            "body",
            "UPDATE audit SET body = CAST(body AS TEXT) WHERE seq = 33",
        ),
        ("prev", "UPDATE audit SET prev = zeroblob(8) WHERE seq = 33"),
        ("hash", "UPDATE audit SET hash = 7 WHERE seq = 33"),
    ];
    for (column, sql) in cases {
        let d = tmp.path().join(column);
        copy_dir(&base, &d);
        tamper(&d, sql);
        let (ok, out, err) = verify(&d, &[]);
        assert!(!ok, "{column}: a rewritten row verified: {out}{err}");
        assert!(
            out.contains("audit event 33 ") && out.contains(column),
            "{column}: the sentence names event 33 and its column: {out}{err}"
        );
        let (_, json, _) = verify(&d, &["--json"]);
        let report: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(report["first_break"]["seq"], 33, "{column}: {json}");
    }
    // An earlier edit is still the first break, before the unreadable row.
    let d = tmp.path().join("both");
    copy_dir(&base, &d);
    tamper(
        &d,
        "UPDATE audit SET body = CAST(body AS TEXT) WHERE seq = 33",
    );
    tamper(
        &d,
        "UPDATE audit SET resource_id = 'elsewhere' WHERE seq = 12",
    );
    let (_, json, _) = verify(&d, &["--json"]);
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(report["first_break"]["seq"], 12, "{json}");
}

/// A row inserted before the first event (seq 0 or below: no trigger stops an INSERT) lies
/// outside the chain the check walks from 1; it is a break all the same, and the first one.
/// (Attack F4: `audit verify` said intact while `audit events` listed the forged row.)
#[test]
fn a_row_inserted_before_the_first_event_is_a_break() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    demo(&base, "42", "40");
    for seq in [0, -5] {
        let d = tmp.path().join(format!("at{seq}"));
        copy_dir(&base, &d);
        tamper(
            &d,
            &format!(
                "INSERT INTO audit SELECT {seq}, 'forged-event', at, 'user:mallory', action, \
                 resource_id, patient, 0, body, prev, hash FROM audit WHERE seq = 1"
            ),
        );
        let (ok, out, err) = verify(&d, &[]);
        assert!(!ok, "seq {seq}: a forged row verified: {out}{err}");
        assert!(out.contains(&format!("numbered {seq}")), "{out}{err}");
    }
}
