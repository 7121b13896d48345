//! Bad input to `rxflow run`: a clear message naming the file and line, the rest of the run goes
//! on, the refused input is kept (sealed), and the exit code says input was refused.

mod support;

use std::path::Path;

use support::*;

const PATIENT: &str = r#"{"resourceType":"Patient","id":"pat-1","identifier":[{"system":"http://hl7.org/fhir/sid/us-ssn","value":"999-44-1234"}],"name":[{"family":"Quarantinova","given":["Hermione"]}],"telecom":[{"system":"phone","value":"555-777-0000"}],"address":[{"line":["12 Lantern Street"],"city":"Topeka"}]}"#;
const PRACTITIONER: &str = r#"{"resourceType":"Practitioner","id":"pr-1","identifier":[{"system":"http://hl7.org/fhir/sid/us-npi","value":"1234567893"}],"name":[{"family":"Welby","given":["Marcus"]}]}"#;

fn order(id: &str) -> String {
    format!(
        r#"{{"resourceType":"MedicationRequest","id":"{id}","status":"active","intent":"order","subject":{{"reference":"Patient/pat-1"}},"requester":{{"reference":"Practitioner/pr-1"}},"authoredOn":"2025-02-01T10:00:00Z","medicationCodeableConcept":{{"coding":[{{"system":"http://www.nlm.nih.gov/research/umls/rxnorm","code":"197361"}}]}},"dispenseRequest":{{"quantity":{{"value":30}},"expectedSupplyDuration":{{"value":30,"unit":"days"}},"numberOfRepeatsAllowed":0}}}}"#
    )
}

fn export(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let unborn = r#"{"resourceType":"Patient","id":"pat-2","birthDate":"9999-12-31"}"#;
    std::fs::write(dir.join("Patient.ndjson"), format!("{PATIENT}\n{unborn}\n")).unwrap();
    std::fs::write(dir.join("Practitioner.ndjson"), format!("{PRACTITIONER}\n")).unwrap();
    let lines = [
        order("mr-1"),
        // cut off mid-way, with the patient's name in it
        r#"{"resourceType":"MedicationRequest","id":"mr-2","note":[{"text":"for Hermione Quarantinova"#.to_string(),
        // no resourceType
        r#"{"id":"mr-3","status":"active"}"#.to_string(),
        order("mr-4"),
        // the same id as mr-1 with other content: not a redelivery
        order("mr-1").replace("197361", "314076"),
        // a Bundle on one line: its order would be lost if passed over
        format!(r#"{{"resourceType":"Bundle","type":"collection","entry":[{{"resource":{}}}]}}"#, order("mr-6")),
        // an order whose subject is missing
        r#"{"resourceType":"MedicationRequest","id":"mr-5","status":"active","intent":"order","authoredOn":"2025-02-01T11:00:00Z"}"#.to_string(),
    ];
    let mut bytes = (lines.join("\n") + "\n").into_bytes();
    // a line that is not UTF-8
    bytes.extend_from_slice(
        b"{\"resourceType\":\"MedicationRequest\",\"id\":\"mr-7\",\"note\":\"\xff\xfe\"}\n",
    );
    std::fs::write(dir.join("MedicationRequest.ndjson"), bytes).unwrap();
    std::fs::write(
        dir.join("Basic.ndjson"),
        "{\"resourceType\":\"Basic\",\"id\":\"b1\"}\n",
    )
    .unwrap();
}

/// `rxflow run --input <input> --data-dir <data>` with `extra` arguments.
fn run_export(
    input: &std::path::Path,
    data: &std::path::Path,
    extra: &[&str],
) -> std::process::Output {
    let mut args = vec![
        "run",
        "--input",
        input.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run(&args)
}

fn run_json(input: &std::path::Path, data: &std::path::Path) -> std::process::Output {
    run_export(input, data, &["--json"])
}

#[test]
fn malformed_lines_are_named_kept_and_the_run_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("export");
    export(&input);
    let data = tmp.path().join("data");
    let out = run_json(&input, &data);
    let err = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "input was refused: exit 2\n{err}"
    );
    assert!(err.contains("MedicationRequest.ndjson:2"), "{err}");
    assert!(err.contains("MedicationRequest.ndjson:3"), "{err}");
    for (at, why) in [
        ("MedicationRequest.ndjson:5", "other content"),
        ("MedicationRequest.ndjson:6", "Bundle"),
        ("MedicationRequest.ndjson:8", "UTF-8"),
        ("Patient.ndjson:2", "birth date"),
    ] {
        let said = err
            .lines()
            .find(|l| l.contains(at))
            .unwrap_or_else(|| panic!("{at} not named:\n{err}"));
        assert!(said.contains(why), "{said}");
    }
    assert!(
        !err.contains("Quarantinova"),
        "the message must not quote the input: {err}"
    );
    let r = report(&out);
    assert!(r["orders_total"].as_u64().unwrap() >= 2, "{r:#}");
    let good: Vec<_> = r["orders"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| (o["id"] == "mr-1" || o["id"] == "mr-4") && o["rx_id"].is_string())
        .collect();
    assert_eq!(
        good.len(),
        2,
        "the orders around the bad lines went through: {r:#}"
    );
    assert!(r["input_errors"].as_u64().unwrap() >= 7, "{r:#}");
    assert_eq!(r["skipped_resources"]["Basic"], 1);

    // Kept, sealed: one row per refused line in the inputs table, and no name in clear anywhere.
    let conn = rusqlite::Connection::open(data.join("rxflow.db")).unwrap();
    let kept: i64 = conn
        .query_row(
            "SELECT count(*) FROM inputs WHERE status = 'quarantined'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(kept as u64, r["input_errors"].as_u64().unwrap());
    drop(conn);
    let logs = keep_output(tmp.path(), "bad", &out);
    assert_no_phi(&input, &[&data, &logs]);

    // The same export again: every bad line is named again, and none is kept a second time.
    let again = run_json(&input, &data);
    assert_eq!(again.status.code(), Some(2), "{}", text(&again.stderr));
    assert!(text(&again.stderr).contains("MedicationRequest.ndjson:2"));
    let conn = rusqlite::Connection::open(data.join("rxflow.db")).unwrap();
    let kept_again: i64 = conn
        .query_row("SELECT count(*) FROM inputs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(kept_again, kept, "a rerun kept the same lines again");
}

#[test]
fn an_export_without_orders_says_so_and_exits_2() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("export");
    std::fs::create_dir_all(&input).unwrap();
    std::fs::write(
        input.join("Patient.ndjson"),
        r#"{"resourceType":"Patient","id":"p-only"}"#,
    )
    .unwrap();
    let data = tmp.path().join("data");
    let out = run_export(&input, &data, &[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("holds no MedicationRequest"), "{err}");
}

#[test]
fn a_missing_input_folder_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = run(&[
        "run",
        "--input",
        tmp.path().join("nowhere").to_str().unwrap(),
        "--data-dir",
        tmp.path().join("d").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("nowhere") && err.contains("--input"), "{err}");
    assert!(
        !tmp.path().join("d").exists(),
        "no data directory is made for a run that cannot start"
    );
}

#[test]
fn a_folder_without_ndjson_files_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = run(&[
        "run",
        "--input",
        tmp.path().to_str().unwrap(),
        "--data-dir",
        tmp.path().join("d").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no .ndjson files"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_data_dir_whose_key_or_store_is_gone_is_refused_not_started_anew() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    let d = data.to_str().unwrap();
    let out = run(&["demo", "--orders", "30", "--json", "--data-dir", d]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let index = data.join("keys/blind-index.key");
    let saved = std::fs::read(&index).unwrap();
    std::fs::remove_file(&index).unwrap();
    let out = run(&["demo", "--orders", "30", "--json", "--data-dir", d]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("blind-index.key is missing"),
        "{}",
        text(&out.stderr)
    );
    assert!(!index.exists(), "no new key was made");
    // another key in its place
    std::fs::write(&index, [7u8; 32]).unwrap();
    std::fs::set_permissions(&index, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let out = run(&["demo", "--orders", "30", "--json", "--data-dir", d]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("is not the one the store"),
        "{}",
        text(&out.stderr)
    );
    std::fs::write(&index, saved).unwrap();
    let out = run(&["demo", "--orders", "30", "--json", "--data-dir", d]);
    assert!(
        out.status.success(),
        "the original key opens it again: {}",
        text(&out.stderr)
    );

    let signing = data.join("keys/audit-signing.pk8");
    let saved = std::fs::read(&signing).unwrap();
    std::fs::remove_file(&signing).unwrap();
    let out = run(&["audit", "seal", "--data-dir", d]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("signing key"),
        "{}",
        text(&out.stderr)
    );
    assert!(!signing.exists());
    std::fs::write(&signing, saved).unwrap();
    std::fs::set_permissions(
        &signing,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();

    for f in ["rxflow.db", "rxflow.db-wal", "rxflow.db-shm"] {
        let _ = std::fs::remove_file(data.join(f));
    }
    let out = run(&["demo", "--orders", "30", "--json", "--data-dir", d]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no store"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        !data.join("rxflow.db").exists(),
        "no empty store was made beside the keys"
    );
}

/// `rxflow audit events` refuses a search that can match nothing or would match everything
/// unasked (a window that ends before it starts, a time outside years 0000–9999, an empty user or
/// patient), naming the flag.
#[test]
fn audit_events_refuses_an_empty_window_or_an_empty_value() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap();
    let cases: [(&[&str], &str); 6] = [
        (
            &[
                "--from",
                "2026-02-01T00:00:00Z",
                "--to",
                "2026-01-01T00:00:00Z",
            ],
            "--from is later than --to",
        ),
        (&["--user", ""], "--user is empty"),
        (&["--patient", " "], "--patient is empty"),
        // outside years 0000–9999: searched as text, such a time widened or emptied the search
        (&["--from", "+10000-01-01T00:00:00Z"], "9999-12-31"),
        (&["--to=-262143-01-01T00:00:00Z"], "9999-12-31"),
        (&["--to", "9999-12-31T23:00:00-05:00"], "9999-12-31"),
    ];
    for (args, says) in cases {
        let out = rxflow()
            .args(["audit", "events", "--data-dir", dir])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// `rxflow audit export | head -1`: the reader leaving early is not an error (exit 0, nothing on
/// stderr), as with every other command that prints.
#[test]
fn an_export_whose_reader_leaves_early_ends_quietly() {
    use std::io::Read;
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("d");
    let d = d.to_str().unwrap();
    let out = run(&["demo", "--orders", "60", "--json", "--data-dir", d]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut child = rxflow()
        .args(["audit", "export", "--data-dir", d])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 100];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    // stdout is closed here, far before the export (several hundred kB) is written.
    let done = child.wait_with_output().unwrap();
    assert!(done.status.success(), "{}", text(&done.stderr));
    assert!(
        !text(&done.stderr).contains("failed"),
        "{}",
        text(&done.stderr)
    );
}

/// A prescriber token naming a mistyped NPI would match no order: refused with the NPI rule,
/// and nothing is created.
#[test]
fn a_token_with_an_invalid_npi_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("d");
    for npi in ["123", "1234567890"] {
        let out = run(&[
            "token",
            "--role",
            "prescriber",
            "--sub",
            "dr-x",
            "--npi",
            npi,
            "--data-dir",
            d.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(1), "{npi}");
        assert!(
            text(&out.stderr).contains("--npi:"),
            "{}",
            text(&out.stderr)
        );
        assert!(out.stdout.is_empty());
    }
    assert!(!d.exists(), "no data directory for a refused token");
}

/// One writer per data directory: while another process holds it (a run, a server), demo, run
/// and audit seal refuse with a message instead of racing it (two runs at once both sealed the
/// trail at their end, and the second failed with "checkpoint 1 does not follow checkpoint 1").
#[test]
fn a_data_directory_in_use_by_another_writer_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    let d = data.to_str().unwrap();
    let out = run(&["demo", "--orders", "30", "--json", "--data-dir", d]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // The lock is on the directory itself: no file in it can be removed to get around it.
    let held = std::fs::File::open(&data).unwrap();
    held.try_lock().unwrap();
    for args in [
        vec!["demo", "--orders", "30", "--json", "--data-dir", d],
        vec!["audit", "seal", "--data-dir", d],
    ] {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            text(&out.stderr).contains("another rxflow process"),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    // Reading goes on beside the writer.
    let out = run(&["audit", "verify", "--data-dir", d]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    drop(held);
    let out = run(&["demo", "--orders", "30", "--json", "--data-dir", d]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// Starts a 4,000-order demo in `data`, waits for its first durable batch (so the key files
/// are in use), does `to_keys` to the keys folder, and returns the demo's output.
fn demo_with_keys_changed_midway(
    data: &std::path::Path,
    to_keys: impl FnOnce(&std::path::Path),
) -> std::process::Output {
    let child = rxflow()
        .args(["demo", "--orders", "4000", "--json", "--data-dir"])
        .arg(data)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let db = data.join("rxflow.db");
    let started = std::time::Instant::now();
    loop {
        let stored =
            rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .and_then(|c| {
                    c.query_row("SELECT COUNT(*) FROM prescriptions", [], |r| {
                        r.get::<_, i64>(0)
                    })
                })
                .unwrap_or(0);
        if stored > 0 {
            break;
        }
        assert!(started.elapsed().as_secs() < 120, "no batch committed");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    to_keys(&data.join("keys"));
    child.wait_with_output().unwrap()
}

/// A key file removed or replaced while a run goes on: the keys live on in memory, so the run
/// could finish and report success over records nothing can open afterwards. It ends with
/// exit 1 saying so.
#[test]
fn a_key_file_removed_or_replaced_during_a_run_fails_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = demo_with_keys_changed_midway(&tmp.path().join("removed"), |keys| {
        std::fs::remove_file(keys.join("kek.key")).unwrap()
    });
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("was removed while this process ran"),
        "{}",
        text(&out.stderr)
    );

    // Another data directory's key in its place (attack: the run reported success).
    let other = tmp.path().join("other");
    let made = run(&[
        "demo",
        "--orders",
        "5",
        "--json",
        "--data-dir",
        other.to_str().unwrap(),
    ]);
    assert!(made.status.success());
    for file in ["kek.key", "blind-index.key"] {
        let data = tmp.path().join(format!("replaced-{file}"));
        let out = demo_with_keys_changed_midway(&data, |keys| {
            std::fs::copy(other.join("keys").join(file), keys.join(file)).unwrap();
        });
        assert_eq!(out.status.code(), Some(1), "{file}: {}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains("was replaced while this process ran"),
            "{file}: {}",
            text(&out.stderr)
        );
    }
}

/// A line of another resource type in a bulk export file (a Patient in MedicationRequest.ndjson)
/// is named and kept aside like any bad line, never taken in as what it says it is: each file
/// holds the one type its name gives. (Attack: it was registered as a patient, or counted as
/// unused, and the run exited 0.)
#[test]
fn a_resource_in_the_file_of_another_type_is_named_and_kept_aside() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("export");
    export(&input);
    let orders = input.join("MedicationRequest.ndjson");
    let mut bytes = std::fs::read(&orders).unwrap();
    bytes.extend_from_slice(
        br#"{"resourceType":"Patient","id":"pat-9","name":[{"family":"Misfiledson"}]}"#,
    );
    bytes.push(b'\n');
    std::fs::write(&orders, bytes).unwrap();
    let out = run_json(&input, &tmp.path().join("data"));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("MedicationRequest.ndjson:9")
            && err.contains("is a Patient in a file of MedicationRequest resources"),
        "{err}"
    );
    assert!(!err.contains("Misfiledson"), "{err}");
}
