//! Batches: one long transaction in which each change set is a savepoint.

mod sqlite_support;

use rx_guard::audit::{Action, AuditSink};
use rx_store::sqlite::SqliteStore;
use rx_store::{RecordStore, StoreError, Table};
use sqlite_support::*;

#[tokio::test]
async fn a_failing_change_set_in_a_batch_leaves_the_others_and_a_valid_chain() {
    let (_dir, store) = open_temp();
    store.begin_batch().unwrap();
    for i in 0..3 {
        let id = format!("rx-{i}");
        store
            .commit(insert(
                row(Table::Prescriptions, "t1", &id),
                vec![
                    event("a", Action::Create, &id),
                    event("a", Action::Read, &id),
                ],
            ))
            .await
            .unwrap();
    }
    // Duplicate key: this change set, with its two events, must vanish.
    let mut dup = row(Table::Prescriptions, "t1", "rx-dup");
    dup.key = Some(b"key-rx-1".to_vec());
    let err = store
        .commit(insert(
            dup,
            vec![
                event("a", Action::Create, "rx-dup"),
                event("a", Action::Read, "rx-dup"),
            ],
        ))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    for i in 3..5 {
        let id = format!("rx-{i}");
        store
            .commit(insert(
                row(Table::Prescriptions, "t1", &id),
                vec![event("a", Action::Create, &id)],
            ))
            .await
            .unwrap();
    }
    store
        .append(&[event("a", Action::Read, "rx-4")])
        .await
        .unwrap();
    store.end_batch().unwrap();

    for i in 0..5 {
        assert!(store
            .get(Table::Prescriptions, "t1", &format!("rx-{i}"))
            .await
            .unwrap()
            .is_some());
    }
    assert_eq!(
        store
            .get(Table::Prescriptions, "t1", "rx-dup")
            .await
            .unwrap(),
        None
    );
    let stored = store.audit_range(1, 100).await.unwrap();
    assert_eq!(stored.len(), 3 * 2 + 2 + 1);
    assert_chain_valid(&stored);
    assert!(decode(&stored).iter().all(|e| e.resource.id != "rx-dup"));
}

#[tokio::test]
async fn a_batch_is_invisible_to_other_connections_until_it_ends_and_durable_after() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rx.db");
    let store = SqliteStore::open(&path).unwrap();
    let reader = SqliteStore::open(&path).unwrap();
    store.begin_batch().unwrap();
    for i in 0..10 {
        let id = format!("rx-{i}");
        store
            .commit(insert(
                row(Table::Prescriptions, "t1", &id),
                vec![event("a", Action::Create, &id)],
            ))
            .await
            .unwrap();
    }
    // The batch's own connection sees its writes; another one does not yet.
    assert_eq!(store.audit_len().await.unwrap(), 10);
    assert_eq!(reader.audit_len().await.unwrap(), 0);
    store.end_batch().unwrap();
    assert_eq!(reader.audit_len().await.unwrap(), 10);
    drop(store);
    drop(reader);

    let reopened = SqliteStore::open(&path).unwrap();
    assert_eq!(
        reopened
            .list(Table::Prescriptions, "t1", None, None, 100)
            .await
            .unwrap()
            .len(),
        10
    );
    assert_chain_valid(&reopened.audit_range(1, 100).await.unwrap());
}

#[tokio::test]
async fn a_batch_left_open_is_committed_when_the_store_closes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rx.db");
    {
        let store = SqliteStore::open(&path).unwrap();
        store.begin_batch().unwrap();
        store.commit(create_rx("rx-1", "a")).await.unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    assert!(store
        .get(Table::Prescriptions, "t1", "rx-1")
        .await
        .unwrap()
        .is_some());
    assert_eq!(store.audit_len().await.unwrap(), 1);
}

#[test]
fn nested_begin_and_end_without_begin_are_refused() {
    let (_dir, store) = open_temp();
    assert!(matches!(store.end_batch(), Err(StoreError::Unavailable(_))));
    store.begin_batch().unwrap();
    assert!(matches!(
        store.begin_batch(),
        Err(StoreError::Unavailable(_))
    ));
    store.end_batch().unwrap();
    store.begin_batch().unwrap();
    store.end_batch().unwrap();
}

#[tokio::test]
async fn commits_after_a_batch_ends_are_their_own_transactions() {
    let (_dir, store) = open_temp();
    store.begin_batch().unwrap();
    store
        .commit(insert(row(Table::Patients, "t1", "p-1"), vec![]))
        .await
        .unwrap();
    store.end_batch().unwrap();
    store
        .commit(insert(row(Table::Patients, "t1", "p-2"), vec![]))
        .await
        .unwrap();
    let dup = store
        .commit(insert(row(Table::Patients, "t1", "p-2"), vec![]))
        .await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))));
    assert_eq!(
        store
            .list(Table::Patients, "t1", None, None, 10)
            .await
            .unwrap()
            .len(),
        2
    );
}
