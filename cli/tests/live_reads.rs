//! The CLI's audit commands beside a process that holds the store's write lock, as a busy
//! `rxflow serve` does nearly all the time: they only read, so they must not wait for that lock
//! (they waited up to the 5 s busy timeout, then failed with "database is locked").

mod support;

use support::*;

#[test]
fn audit_commands_read_while_another_process_holds_the_write_lock() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let dir_s = dir.to_str().unwrap();
    let out = run(&["demo", "--orders", "40", "--json", "--data-dir", dir_s]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let writer = rusqlite::Connection::open(dir.join("rxflow.db")).unwrap();
    writer.execute_batch("BEGIN IMMEDIATE").unwrap();
    for args in [
        vec!["audit", "events", "--limit", "5", "--data-dir", dir_s],
        vec!["audit", "verify", "--data-dir", dir_s],
    ] {
        let out = run(&args);
        assert!(
            out.status.success(),
            "{args:?} failed beside a writer: {}",
            text(&out.stderr)
        );
    }
    writer.execute_batch("ROLLBACK").unwrap();
}
