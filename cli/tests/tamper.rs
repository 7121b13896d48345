//! `rxflow audit verify` on a trail an attacker with file access has changed: the triggers that
//! keep the audit table append-only are dropped and a row edited, deleted or swapped.

mod support;

use std::path::Path;

use support::*;

fn demo_trail(dir: &Path) {
    let out = run(&[
        "demo",
        "--orders",
        "60",
        "--json",
        "--data-dir",
        dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

fn verify(dir: &Path) -> (bool, String) {
    let out = run(&["audit", "verify", "--data-dir", dir.to_str().unwrap()]);
    (out.status.success(), text(&out.stdout) + &text(&out.stderr))
}

#[test]
fn every_kind_of_tampering_is_detected_at_the_event() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    demo_trail(&base);
    let (ok, msg) = verify(&base);
    assert!(ok, "untouched trail must verify: {msg}");

    let cases = [
        (
            "edited",
            "UPDATE audit SET body = CAST(replace(CAST(body AS TEXT), '\"function\":\"', '\"function\":\"x') AS BLOB) WHERE seq = 40;",
            "40",
        ),
        ("deleted", "DELETE FROM audit WHERE seq = 40;", "41"),
        (
            "swapped",
            "UPDATE audit SET seq = -1 WHERE seq = 40; UPDATE audit SET seq = 40 WHERE seq = 41; UPDATE audit SET seq = 41 WHERE seq = -1;",
            "40",
        ),
    ];
    for (name, sql, seq) in cases {
        let d = tmp.path().join(name);
        copy_dir(&base, &d);
        tamper(&d, sql);
        let (ok, msg) = verify(&d);
        assert!(!ok, "{name}: tampered trail verified: {msg}");
        assert!(msg.contains("BROKEN"), "{name}: {msg}");
        assert!(
            msg.contains(seq),
            "{name}: the message names event {seq}: {msg}"
        );
    }
}

#[test]
fn an_edit_with_its_own_hash_recomputed_breaks_the_next_link() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("d");
    demo_trail(&d);
    tamper(&d, "");
    let conn = rusqlite::Connection::open(d.join("rxflow.db")).unwrap();
    let (body, prev): (Vec<u8>, Vec<u8>) = conn
        .query_row("SELECT body, prev FROM audit WHERE seq = 40", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    let body = String::from_utf8(body)
        .unwrap()
        .replacen("\"function\":\"", "\"function\":\"x", 1)
        .into_bytes();
    let hash = rx_guard::audit::chain::link(&prev.try_into().unwrap(), &body);
    conn.execute(
        "UPDATE audit SET body = ?1, hash = ?2 WHERE seq = 40",
        rusqlite::params![body, &hash[..]],
    )
    .unwrap();
    drop(conn);
    let (ok, msg) = verify(&d);
    assert!(!ok, "{msg}");
    assert!(
        msg.contains("41"),
        "the break shows at the next event: {msg}"
    );
}

#[test]
fn verify_without_a_data_dir_says_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let out = run(&[
        "audit",
        "verify",
        "--data-dir",
        tmp.path().join("nope").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("rxflow demo"),
        "{}",
        text(&out.stderr)
    );
}
