//! Checkpoints off the commit path (a server's store): once a checkpointer is made, commits no
//! longer copy the log into the database file; the checkpointer's rounds do, beside the writer,
//! and once the log passes its bound a round holds the writers just long enough for the log to
//! start again from its beginning. Nothing committed is lost on the way.

mod sqlite_support;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rx_store::sqlite::{Checkpointer, SqliteStore};
use rx_store::{RecordStore, Table};
use sqlite_support::*;

/// Frames the log file has room for (a restarted log is written again from its start, so its
/// size is the most it ever held).
fn wal_file_frames(db: &Path) -> u64 {
    let wal = db.with_extension("db-wal");
    let len = std::fs::metadata(wal).map(|m| m.len()).unwrap_or(0);
    len.saturating_sub(32) / (4096 + 24)
}

/// A store as `rxflow serve` runs it (group commit) with its checkpoints moved to a
/// checkpointer bounded at `bound` frames; the temp dir and the database file's path.
fn server_store(bound: u64) -> (tempfile::TempDir, PathBuf, Arc<SqliteStore>, Checkpointer) {
    let (dir, store) = open_temp();
    let db = dir.path().join("rx.db");
    let store = Arc::new(store);
    store.group_commit(true);
    let checkpointer = store.checkpoint_separately(bound).unwrap();
    (dir, db, store, checkpointer)
}

async fn commit_orders(store: &SqliteStore, from: usize, to: usize) {
    for i in from..to {
        store
            .commit(create_rx(&format!("rx-{i}"), "a"))
            .await
            .unwrap();
        store.sync().unwrap();
    }
}

#[tokio::test]
async fn commits_leave_the_log_to_the_checkpointer() {
    let (_dir, _db, store, checkpointer) = server_store(1_000_000);
    commit_orders(&store, 0, 400).await;
    // SQLite's own checkpoint would have run inside a COMMIT at 1,000 frames and restarted the
    // log; now the log holds every frame until a round copies it.
    let round = checkpointer.round().unwrap().unwrap();
    assert!(
        round.log_frames > 1_000,
        "the log was checkpointed inside a commit: {round:?}"
    );
    assert!(round.caught_up() && !round.held_writers, "{round:?}");
}

#[tokio::test]
async fn past_its_bound_the_log_starts_again_and_nothing_is_lost() {
    const BOUND: u64 = 300;
    let (_dir, db, store, checkpointer) = server_store(BOUND);
    let mut held = 0;
    let mut longest = 0;
    for chunk in 0..40 {
        commit_orders(&store, chunk * 10, chunk * 10 + 9).await;
        // As on a busy server, the next group is already open when the round runs: the log
        // cannot start again on its own (the open group began before the copy caught up).
        let last = format!("rx-{}", chunk * 10 + 9);
        store.commit(create_rx(&last, "a")).await.unwrap();
        let round = checkpointer.round().unwrap().unwrap();
        assert!(round.caught_up(), "{round:?}");
        held += usize::from(round.held_writers);
        longest = longest.max(round.log_frames);
    }
    assert!(held >= 2, "no round restarted the log ({held})");
    // The log never grows far past the bound: one round's worth of commits at most.
    assert!(longest < 3 * BOUND, "the log reached {longest} frames");
    assert!(
        wal_file_frames(&db) < 3 * BOUND,
        "the log file grew to {} frames",
        wal_file_frames(&db)
    );

    // Every order and its event are there, the chain whole, through a new connection too.
    let events = store.audit_range(1, 1_000).await.unwrap();
    assert_eq!(events.len(), 400);
    assert_chain_valid(&events);
    drop(checkpointer);
    drop(store);
    let again = SqliteStore::open(&db).unwrap();
    for i in [0, 199, 399] {
        let found = again
            .get(Table::Prescriptions, "t1", &format!("rx-{i}"))
            .await
            .unwrap();
        assert!(found.is_some(), "rx-{i} is missing after reopening");
    }
    assert_eq!(again.audit_len().await.unwrap(), 400);
}

#[tokio::test]
async fn a_round_after_the_store_is_closed_does_nothing() {
    let (_dir, store) = open_temp();
    let store = Arc::new(store);
    let checkpointer = store.checkpoint_separately(100).unwrap();
    drop(store);
    assert!(checkpointer.round().unwrap().is_none());
}

#[tokio::test]
async fn a_reader_mid_read_is_waited_out_never_copied_around_with_the_writers_held() {
    const BOUND: u64 = 100;
    let (_dir, db, store, checkpointer) = server_store(BOUND);
    commit_orders(&store, 0, 5).await;
    // A reader (a report, `rxflow audit verify`) in the middle of a read keeps its snapshot.
    let reader = rusqlite::Connection::open(&db).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let seen: i64 = reader
        .query_row("SELECT COUNT(*) FROM audit", [], |r| r.get(0))
        .unwrap();
    assert_eq!(seen, 5);
    commit_orders(&store, 5, 400).await;
    let round = checkpointer.round().unwrap().unwrap();
    // The log is far past its bound but most of it cannot be copied yet: the round leaves the
    // writers alone instead of failing or copying a backlog while they wait.
    assert!(!round.held_writers, "{round:?}");
    assert!(
        round.log_frames > 1_000 && round.behind > 1_000,
        "{round:?}"
    );

    reader.execute_batch("COMMIT").unwrap();
    drop(reader);
    // Next round: the backlog is copied beside the writers, then the last frames with them
    // held, and the log starts again; the file is cut back to twice the bound.
    let round = checkpointer.round().unwrap().unwrap();
    assert!(round.caught_up() && round.held_writers, "{round:?}");
    commit_orders(&store, 400, 403).await;
    let round = checkpointer.round().unwrap().unwrap();
    assert!(
        round.log_frames < BOUND,
        "the log did not start again: {round:?}"
    );
    assert!(
        wal_file_frames(&db) <= 2 * BOUND,
        "the log file kept {} frames",
        wal_file_frames(&db)
    );
    assert_eq!(store.audit_len().await.unwrap(), 403);
}
