//! The store on a thread of its own ([`StoreThread`]): calls keep the order they were sent in,
//! the audit chain stays whole with many callers at once, and once the thread is gone every
//! call fails closed instead of hanging or reporting success.

mod sqlite_support;

use std::sync::Arc;

use futures::future::join_all;
use rx_guard::audit::{Action, AuditSink};
use rx_guard::GuardError;
use rx_store::sqlite::StoreThread;
use rx_store::{RecordStore, StoreError, Table};
use sqlite_support::*;

fn threaded() -> (tempfile::TempDir, StoreThread) {
    let (dir, store) = open_temp();
    let front = StoreThread::spawn(Arc::new(store)).unwrap();
    (dir, front)
}

#[tokio::test]
async fn a_read_sent_after_a_write_sees_it() {
    let (_dir, front) = threaded();
    for i in 0..50 {
        let id = format!("rx-{i}");
        // Both sent before either is awaited: the thread runs them in the order sent.
        let write = front.commit(create_rx(&id, "dr-a"));
        let read = front.get(Table::Prescriptions, "t1", &id);
        let (written, read) = futures::join!(write, read);
        written.unwrap();
        assert!(
            read.unwrap().is_some(),
            "{id} was not there for the read sent after it"
        );
    }
}

#[tokio::test]
async fn many_callers_at_once_leave_one_whole_chain() {
    let (_dir, front) = threaded();
    let calls = (0..200).map(|i| {
        let front = &front;
        async move {
            if i % 2 == 0 {
                front.commit(create_rx(&format!("rx-{i}"), "dr-a")).await
            } else {
                front
                    .append(&[event("dr-b", Action::Read, &format!("rx-{i}"))])
                    .await
                    .map_err(|e| StoreError::Unavailable(e.to_string()))
            }
        }
    });
    for r in join_all(calls).await {
        r.unwrap();
    }
    let events = front.audit_range(1, 1_000).await.unwrap();
    assert_eq!(events.len(), 200);
    assert_chain_valid(&events);
}

#[tokio::test]
async fn after_stop_every_call_fails_closed() {
    let (_dir, front) = threaded();
    front.commit(create_rx("rx-1", "dr-a")).await.unwrap();
    front.stop();
    assert!(matches!(
        front.get(Table::Prescriptions, "t1", "rx-1").await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        front.commit(create_rx("rx-2", "dr-a")).await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        front.append(&[event("dr-a", Action::Read, "rx-1")]).await,
        Err(GuardError::AuditUnavailable(_))
    ));
    // What was committed before the stop is in the store, and nothing after it.
    let store = front.store();
    assert!(store
        .get(Table::Prescriptions, "t1", "rx-1")
        .await
        .unwrap()
        .is_some());
    assert!(store
        .get(Table::Prescriptions, "t1", "rx-2")
        .await
        .unwrap()
        .is_none());
    assert_eq!(store.audit_len().await.unwrap(), 1);
}

#[tokio::test]
async fn a_job_that_panics_fails_its_call_and_every_later_one() {
    let (_dir, front) = threaded();
    let panicked = front
        .run(|_| -> u32 { panic!("a job went wrong (this panic is the test's own)") })
        .await;
    assert!(matches!(panicked, Err(StoreError::Unavailable(_))));
    assert!(matches!(
        front.commit(create_rx("rx-1", "dr-a")).await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(front
        .store()
        .get(Table::Prescriptions, "t1", "rx-1")
        .await
        .unwrap()
        .is_none());
}

/// Inside a batch opened through the front, reads are answered from the rows it keeps: each
/// answer must be what the store itself holds, after inserts, updates that move the source key,
/// a refused change set, and the batch's end.
#[tokio::test]
async fn inside_a_batch_reads_answer_what_the_store_holds() {
    let (_dir, front) = threaded();
    let store = front.store().clone();
    let same = |what: &str, kept: Option<rx_store::Row>, stored: Option<rx_store::Row>| {
        assert_eq!(kept, stored, "{what}: the front and the store disagree");
    };
    front.begin_batch().await.unwrap();
    front.commit(create_rx("rx-a", "dr-a")).await.unwrap();
    front.commit(create_rx("rx-b", "dr-a")).await.unwrap();
    let a1 = front
        .get(Table::Prescriptions, "t1", "rx-a")
        .await
        .unwrap()
        .unwrap();
    same(
        "a read by id",
        Some(a1.clone()),
        store.get(Table::Prescriptions, "t1", "rx-a").await.unwrap(),
    );

    // An update that moves the source key: the old key finds nothing, the new one finds it.
    let mut a2 = a1.clone();
    a2.version = 2;
    a2.status = "validated".into();
    a2.key = Some(b"key-moved".to_vec());
    a2.sealed = b"sealed-again".to_vec();
    let update = |row: rx_store::Row, expected_version| rx_store::Changes {
        writes: vec![rx_store::Write::Update {
            row,
            expected_version,
        }],
        ..Default::default()
    };
    front.commit(update(a2.clone(), 1)).await.unwrap();
    for (what, key) in [
        ("old key", &b"key-rx-a"[..]),
        ("new key", &b"key-moved"[..]),
    ] {
        same(
            what,
            front
                .get_by_key(Table::Prescriptions, "t1", key)
                .await
                .unwrap(),
            store
                .get_by_key(Table::Prescriptions, "t1", key)
                .await
                .unwrap(),
        );
    }
    same(
        "after the update",
        front.get(Table::Prescriptions, "t1", "rx-a").await.unwrap(),
        Some(a2.clone()),
    );
    // Another tenant and another table never see the row.
    assert_eq!(
        front.get(Table::Prescriptions, "t2", "rx-a").await.unwrap(),
        None
    );
    assert_eq!(
        front.get(Table::Patients, "t1", "rx-a").await.unwrap(),
        None
    );
    assert_eq!(
        front
            .get_by_key(Table::Prescriptions, "t2", b"key-moved")
            .await
            .unwrap(),
        None
    );

    // A stale update is refused and changes nothing that is read afterwards.
    let mut stale = a1.clone();
    stale.version = 2;
    stale.status = "rejected".into();
    assert!(matches!(
        front.commit(update(stale, 1)).await,
        Err(StoreError::Conflict(_))
    ));
    same(
        "after a refused change set",
        front.get(Table::Prescriptions, "t1", "rx-a").await.unwrap(),
        store.get(Table::Prescriptions, "t1", "rx-a").await.unwrap(),
    );
    front.end_batch().await.unwrap();
    same(
        "after the batch",
        front.get(Table::Prescriptions, "t1", "rx-a").await.unwrap(),
        Some(a2),
    );
    same(
        "the other row",
        front.get(Table::Prescriptions, "t1", "rx-b").await.unwrap(),
        store.get(Table::Prescriptions, "t1", "rx-b").await.unwrap(),
    );
}
