//! A full disk inside a batch. SQLite rolls the whole batch transaction back when a write
//! fails for lack of room; the store must then refuse every later change set until the batch
//! is ended (which reports the loss), so that nothing of the lost batch survives half-way.

mod sqlite_support;

use std::sync::Arc;

use rx_store::sqlite::StoreThread;
use rx_store::{RecordStore, StoreError, Table};
use sqlite_support::*;

/// Change sets with a body big enough to fill a few pages each.
fn big_rx(i: usize) -> rx_store::Changes {
    let mut changes = create_rx(&format!("rx-{i}"), "dr-a");
    if let Some(rx_store::Write::Insert(row)) = changes.writes.first_mut() {
        row.sealed = vec![i as u8; 6_000];
    }
    changes
}

#[tokio::test]
async fn a_batch_lost_to_a_full_disk_leaves_nothing_half_way() {
    let (_dir, store) = open_temp();
    store.commit(create_rx("before", "dr-a")).await.unwrap();
    store.limit_pages(store.page_count().unwrap() + 40).unwrap();

    store.begin_batch().unwrap();
    let mut committed = Vec::new();
    let mut failure = None;
    for i in 0..200 {
        match store.commit(big_rx(i)).await {
            Ok(()) => committed.push(i),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let failure = failure.expect("the store filled up");
    assert!(failure.to_string().contains("full"), "{failure}");
    assert!(!committed.is_empty());

    // Room again: still, nothing is written until the lost batch is ended.
    store.limit_pages(1 << 30).unwrap();
    let later = store.commit(create_rx("after-the-loss", "dr-a")).await;
    assert!(
        matches!(later, Err(StoreError::Unavailable(_))),
        "{later:?}"
    );
    let end = store
        .end_batch()
        .expect_err("ending the batch reports the loss");
    assert!(end.to_string().contains("batch was lost"), "{end}");
    assert_eq!(store.lost_commits(), 1);

    for i in &committed {
        let id = format!("rx-{i}");
        assert!(
            store
                .get(Table::Prescriptions, "t1", &id)
                .await
                .unwrap()
                .is_none(),
            "{id} of the lost batch is stored"
        );
    }
    for id in ["after-the-loss"] {
        assert!(store
            .get(Table::Prescriptions, "t1", id)
            .await
            .unwrap()
            .is_none());
    }
    assert!(store
        .get(Table::Prescriptions, "t1", "before")
        .await
        .unwrap()
        .is_some());
    // The audit chain holds only what is stored, and the store goes on after the loss.
    let events = store.audit_range(1, 1_000).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_chain_valid(&events);
    store.begin_batch().unwrap();
    store.commit(create_rx("next-batch", "dr-a")).await.unwrap();
    store.end_batch().unwrap();
    assert_eq!(store.audit_range(1, 1_000).await.unwrap().len(), 2);
}

/// Through the store's thread, the rows it kept from the lost batch are dropped with it.
#[tokio::test]
async fn the_store_thread_forgets_the_rows_of_a_lost_batch() {
    let (_dir, store) = open_temp();
    let store = Arc::new(store);
    store.limit_pages(store.page_count().unwrap() + 40).unwrap();
    let front = StoreThread::spawn(store.clone()).unwrap();
    front.begin_batch().await.unwrap();
    let mut committed = Vec::new();
    for i in 0..200 {
        match front.commit(big_rx(i)).await {
            Ok(()) => committed.push(i),
            Err(_) => break,
        }
    }
    assert!(!committed.is_empty() && committed.len() < 200);
    for i in &committed {
        let id = format!("rx-{i}");
        assert!(
            front
                .get(Table::Prescriptions, "t1", &id)
                .await
                .unwrap()
                .is_none(),
            "{id} of the lost batch is still answered"
        );
    }
    assert!(front.end_batch().await.is_err());
}
