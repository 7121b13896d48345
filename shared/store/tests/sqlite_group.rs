//! Change sets that share a commit: a bulk run's batch and a server's group commit. Whatever
//! fails inside, the chain stays whole; nothing is durable (seen by another connection) before
//! the commit; a commit that fails is counted, so whoever waited on it fails too.

mod sqlite_support;

use rx_guard::audit::{Action, AuditSink};
use rx_store::{RecordStore, StoreError, Table};
use sqlite_support::*;

/// Audit events another connection to the same file sees (what is durable).
fn durable_events(store: &rx_store::sqlite::SqliteStore) -> i64 {
    let conn = rusqlite::Connection::open(store.path()).unwrap();
    conn.query_row("SELECT COUNT(*) FROM audit", [], |r| r.get(0))
        .unwrap()
}

#[tokio::test]
async fn inside_a_batch_failures_leave_one_unbroken_chain() {
    let (_dir, store) = open_temp();
    store.begin_batch().unwrap();
    store
        .append(&[event("a", Action::Read, "rx-0")])
        .await
        .unwrap();
    let b = event("b", Action::Create, "rx-1");
    store
        .commit(insert(
            row(Table::Prescriptions, "t1", "rx-1"),
            vec![b.clone()],
        ))
        .await
        .unwrap();
    // A change set that fails on its row: its savepoint rolls back.
    let dup = store.commit(create_rx("rx-1", "c")).await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
    // One that fails after its first event went in (the second's id is taken).
    let late = store
        .commit(insert(
            row(Table::Prescriptions, "t1", "rx-9"),
            vec![event("d", Action::Create, "rx-9"), b],
        ))
        .await;
    assert!(late.is_err());
    // A single event that fails on its own (its id is taken).
    let e = event("e", Action::Read, "rx-2");
    store.append(std::slice::from_ref(&e)).await.unwrap();
    assert!(store.append(std::slice::from_ref(&e)).await.is_err());
    store
        .append(&[event("f", Action::Read, "rx-3")])
        .await
        .unwrap();
    assert_eq!(
        durable_events(&store),
        0,
        "nothing is durable inside the batch"
    );
    store.end_batch().unwrap();

    let stored = store.audit_range(1, 100).await.unwrap();
    let subjects: Vec<String> = decode(&stored)
        .into_iter()
        .map(|e| e.actor.subject)
        .collect();
    assert_eq!(subjects, ["a", "b", "e", "f"]);
    assert_chain_valid(&stored);
    assert_eq!(durable_events(&store), 4);
}

#[tokio::test]
async fn group_commit_makes_change_sets_durable_at_sync() {
    let (_dir, store) = open_temp();
    store.group_commit(true);
    store.commit(create_rx("rx-1", "a")).await.unwrap();
    store
        .append(&[event("b", Action::Read, "rx-1")])
        .await
        .unwrap();
    // This connection reads its own change sets; another one sees them only once synced.
    assert!(store
        .get(Table::Prescriptions, "t1", "rx-1")
        .await
        .unwrap()
        .is_some());
    assert_eq!(durable_events(&store), 0);
    store.durable().await.unwrap();
    assert_eq!(durable_events(&store), 2);
    assert_eq!(store.lost_commits(), 0);
    // Nothing open: syncing again is a no-op.
    store.durable().await.unwrap();

    store
        .append(&[event("c", Action::Read, "rx-1")])
        .await
        .unwrap();
    store.durable().await.unwrap();
    let stored = store.audit_range(1, 10).await.unwrap();
    assert_eq!(stored.len(), 3);
    assert_chain_valid(&stored);
}

#[tokio::test]
async fn a_group_commit_that_fails_is_counted_and_nothing_more_is_written() {
    let (dir, store) = open_temp();
    store.group_commit(true);
    store.commit(create_rx("rx-1", "a")).await.unwrap();
    // The file is moved away under the open store: the group cannot be committed to it.
    std::fs::rename(store.path(), dir.path().join("moved.db")).unwrap();
    let err = store.durable().await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert_eq!(store.lost_commits(), 1);
    let next = store.append(&[event("b", Action::Read, "rx-1")]).await;
    assert!(
        next.is_err(),
        "a store whose file is gone takes nothing more"
    );
    assert!(
        !store.path().exists(),
        "no new store file appears in its place"
    );
}

/// The audit search indexes in the file.
fn search_indexes(store: &rx_store::sqlite::SqliteStore) -> Vec<String> {
    let conn = rusqlite::Connection::open(store.path()).unwrap();
    let mut q = conn
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'audit' \
             AND name IN ('audit_patient', 'audit_subject', 'audit_action', 'audit_resource', \
             'audit_at') ORDER BY name",
        )
        .unwrap();
    q.query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test]
async fn a_bulk_run_sets_the_audit_search_indexes_aside_and_builds_them_again() {
    let (_dir, store) = open_temp();
    assert_eq!(search_indexes(&store).len(), 5);
    for (i, who) in ["alice", "bob", "alice"].iter().enumerate() {
        store
            .append(&[event(who, Action::Read, &format!("rx-{i}"))])
            .await
            .unwrap();
    }
    // Fewer events to come than the trail holds: left as they are.
    assert!(!store.suspend_audit_search(2).unwrap());
    assert_eq!(search_indexes(&store).len(), 5);

    assert!(store.suspend_audit_search(100).unwrap());
    assert!(search_indexes(&store).is_empty());
    store.begin_batch().unwrap();
    store
        .append(&[event("alice", Action::Create, "rx-9")])
        .await
        .unwrap();
    store.end_batch().unwrap();
    // Searches still answer in between (by scanning).
    let q = rx_guard::audit::AuditQuery {
        subject: Some("alice".into()),
        ..Default::default()
    };
    assert_eq!(store.audit_search(&q).await.unwrap().len(), 3);

    store.resume_audit_search().unwrap();
    assert_eq!(search_indexes(&store).len(), 5);
    assert_eq!(store.audit_search(&q).await.unwrap().len(), 3);
    assert_chain_valid(&store.audit_range(1, 10).await.unwrap());
}

#[tokio::test]
async fn indexes_a_stopped_bulk_run_left_out_are_built_at_the_next_open() {
    let (dir, store) = open_temp();
    assert!(store.suspend_audit_search(1_000).unwrap());
    store
        .append(&[event("alice", Action::Read, "rx-1")])
        .await
        .unwrap();
    drop(store); // the run stops before its end
    let reopened = rx_store::sqlite::SqliteStore::open(&dir.path().join("rx.db")).unwrap();
    assert_eq!(search_indexes(&reopened).len(), 5);
}
