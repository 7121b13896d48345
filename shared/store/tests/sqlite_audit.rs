//! The audit trail of the SQLite store: hash chain, append-only triggers, search, paging,
//! checkpoints and concurrent use.

mod sqlite_support;

use std::sync::Arc;

use chrono::Duration;
use rx_guard::audit::{Action, AuditQuery, AuditSink};
use rx_guard::GuardError;
use rx_store::sqlite::SqliteStore;
use rx_store::{Changes, CheckpointRow, RecordStore, RowFault, StoreError, Table};
use sqlite_support::*;

#[tokio::test]
async fn appended_and_committed_events_form_one_valid_chain() {
    let (_dir, store) = open_temp();
    let first = vec![
        event("a", Action::Read, "rx-1"),
        event("b", Action::Read, "rx-2"),
    ];
    store.append(&first).await.unwrap();
    let second = vec![event("c", Action::Create, "rx-3")];
    store
        .commit(insert(
            row(Table::Prescriptions, "t1", "rx-3"),
            second.clone(),
        ))
        .await
        .unwrap();

    let stored = store.audit_range(1, 100).await.unwrap();
    assert_eq!(stored.len(), 3);
    assert_chain_valid(&stored);
    let sent = [first, second].concat();
    for (stored, sent) in stored.iter().zip(&sent) {
        assert_eq!(
            stored.body,
            sent.canonical_bytes(),
            "the body is the canonical bytes"
        );
    }
    assert_eq!(decode(&stored), sent);
    assert_eq!(store.audit_len().await.unwrap(), 3);
}

#[tokio::test]
async fn a_failed_change_set_leaves_no_gap_in_the_chain() {
    let (_dir, store) = open_temp();
    store.commit(create_rx("rx-1", "a")).await.unwrap();
    let dup = store.commit(create_rx("rx-1", "a")).await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))));
    store
        .append(&[event("b", Action::Read, "rx-1")])
        .await
        .unwrap();
    let stored = store.audit_range(1, 10).await.unwrap();
    assert_eq!(stored.len(), 2);
    assert_chain_valid(&stored);
}

#[tokio::test]
async fn appending_an_event_id_twice_fails_closed() {
    let (_dir, store) = open_temp();
    let e = event("a", Action::Read, "rx-1");
    store.append(std::slice::from_ref(&e)).await.unwrap();
    let err = store
        .append(&[event("b", Action::Read, "rx-2"), e])
        .await
        .unwrap_err();
    assert!(matches!(err, GuardError::AuditUnavailable(_)), "{err:?}");
    // The whole append was refused, including the first, fresh event.
    assert_eq!(store.audit_len().await.unwrap(), 1);
}

#[tokio::test]
async fn audit_transitions_and_checkpoints_refuse_update_and_delete() {
    let (dir, store) = open_temp();
    store
        .append(&[event("a", Action::Read, "rx-1")])
        .await
        .unwrap();
    store
        .commit(Changes {
            transitions: vec![rx_store::TransitionRow {
                rx_id: "rx-1".into(),
                tenant: "t1".into(),
                version: 1,
                from: None,
                to: "received".into(),
                at: t0(),
                actor: "system:intake".into(),
                function: "intake".into(),
            }],
            ..Changes::default()
        })
        .await
        .unwrap();
    store
        .put_checkpoint(&CheckpointRow {
            number: 1,
            first_seq: 1,
            last_seq: 1,
            body: b"{}".to_vec(),
        })
        .await
        .unwrap();

    let conn = rusqlite::Connection::open(dir.path().join("rx.db")).unwrap();
    for sql in [
        "UPDATE audit SET subject = 'mallory'",
        "DELETE FROM audit",
        "UPDATE transitions SET to_status = 'dispensed'",
        "DELETE FROM transitions",
        "UPDATE checkpoints SET body = x'00'",
        "DELETE FROM checkpoints",
    ] {
        let err = conn.execute(sql, []).unwrap_err();
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    drop(conn);
    assert_chain_valid(&store.audit_range(1, 10).await.unwrap());
    assert_eq!(store.transitions("t1", "rx-1").await.unwrap().len(), 1);
    assert_eq!(store.checkpoints().await.unwrap().len(), 1);
}

#[tokio::test]
async fn an_edited_row_no_longer_recomputes() {
    // Guards the checker itself: with the triggers dropped, an edit is visible to verification.
    let (dir, store) = open_temp();
    store
        .append(&[
            event("a", Action::Read, "rx-1"),
            event("b", Action::Read, "rx-2"),
        ])
        .await
        .unwrap();
    let conn = rusqlite::Connection::open(dir.path().join("rx.db")).unwrap();
    conn.execute_batch(
        "DROP TRIGGER audit_no_update;
         UPDATE audit SET body = CAST(REPLACE(CAST(body AS TEXT), '\"a\"', '\"z\"') AS BLOB) WHERE seq = 1;",
    )
    .unwrap();
    drop(conn);
    let stored = store.audit_range(1, 10).await.unwrap();
    let result = std::panic::catch_unwind(|| assert_chain_valid(&stored));
    assert!(result.is_err(), "an edited event must break the chain");
}

async fn search_fixture() -> (tempfile::TempDir, SqliteStore) {
    let (dir, store) = open_temp();
    let mut events = Vec::new();
    for (i, (subject, action)) in [
        ("alice", Action::Read),
        ("bob", Action::Disclose),
        ("alice", Action::Update),
        ("carol", Action::Read),
        ("alice", Action::Read),
        ("bob", Action::BreakGlass),
    ]
    .into_iter()
    .enumerate()
    {
        let mut e = event_at(subject, action, i as i64 * 10);
        e.patient = Some(if i % 2 == 0 { "p-even" } else { "p-odd" }.into());
        e.break_glass = subject == "bob";
        e.resource.id = format!("rx-{i}");
        events.push(e);
    }
    store.append(&events).await.unwrap();
    (dir, store)
}

async fn subjects(store: &SqliteStore, q: AuditQuery) -> Vec<(u64, String)> {
    let found = store.audit_search(&q).await.unwrap();
    let seqs: Vec<u64> = found.iter().map(|e| e.seq).collect();
    decode(&found)
        .into_iter()
        .zip(seqs)
        .map(|(e, s)| (s, e.actor.subject))
        .collect()
}

#[tokio::test]
async fn audit_search_filters_by_patient_subject_action_and_resource() {
    let (_dir, store) = search_fixture().await;
    let by_patient = subjects(
        &store,
        AuditQuery {
            patient: Some("p-odd".into()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        by_patient.iter().map(|x| x.0).collect::<Vec<_>>(),
        [2, 4, 6]
    );

    let by_subject = subjects(
        &store,
        AuditQuery {
            subject: Some("alice".into()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        by_subject.iter().map(|x| x.0).collect::<Vec<_>>(),
        [1, 3, 5]
    );

    let by_action = subjects(
        &store,
        AuditQuery {
            action: Some(Action::Read),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_action.iter().map(|x| x.0).collect::<Vec<_>>(), [1, 4, 5]);

    let combined = subjects(
        &store,
        AuditQuery {
            subject: Some("alice".into()),
            action: Some(Action::Read),
            patient: Some("p-even".into()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(combined.iter().map(|x| x.0).collect::<Vec<_>>(), [1, 5]);

    let by_resource = subjects(
        &store,
        AuditQuery {
            resource_id: Some("rx-3".into()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_resource, [(4, "carol".to_string())]);

    let nobody = subjects(
        &store,
        AuditQuery {
            subject: Some("mallory".into()),
            ..Default::default()
        },
    )
    .await;
    assert!(nobody.is_empty());
}

#[tokio::test]
async fn audit_search_time_range_is_inclusive() {
    let (_dir, store) = search_fixture().await;
    let q = AuditQuery {
        from: Some(t0() + Duration::minutes(10)),
        to: Some(t0() + Duration::minutes(30)),
        ..Default::default()
    };
    let seqs: Vec<u64> = subjects(&store, q).await.into_iter().map(|x| x.0).collect();
    assert_eq!(seqs, [2, 3, 4]);
    let open_end = AuditQuery {
        from: Some(t0() + Duration::minutes(41)),
        ..Default::default()
    };
    let seqs: Vec<u64> = subjects(&store, open_end)
        .await
        .into_iter()
        .map(|x| x.0)
        .collect();
    assert_eq!(seqs, [6]);
}

#[tokio::test]
async fn audit_search_break_glass_only_and_limit() {
    let (_dir, store) = search_fixture().await;
    let bg = subjects(
        &store,
        AuditQuery {
            break_glass_only: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(bg, [(2, "bob".to_string()), (6, "bob".to_string())]);
    let limited = subjects(
        &store,
        AuditQuery {
            limit: 2,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(limited.iter().map(|x| x.0).collect::<Vec<_>>(), [1, 2]);
    let all = subjects(&store, AuditQuery::default()).await;
    assert_eq!(all.len(), 6, "limit 0 means no limit");
}

#[tokio::test]
async fn audit_range_pages_from_a_sequence_number() {
    let (_dir, store) = open_temp();
    let events: Vec<_> = (0..25)
        .map(|i| event("a", Action::Read, &format!("rx-{i}")))
        .collect();
    store.append(&events).await.unwrap();
    let mut all = Vec::new();
    let mut from = 1;
    loop {
        let page = store.audit_range(from, 10).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 10);
        from = page.last().unwrap().seq + 1;
        all.extend(page);
    }
    assert_eq!(all.len(), 25);
    assert_chain_valid(&all);
    assert_eq!(
        store
            .audit_range(20, 100)
            .await
            .unwrap()
            .first()
            .map(|e| e.seq),
        Some(20)
    );
    assert!(store.audit_range(26, 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn the_checked_read_returns_what_audit_range_does_and_no_fault_for_intact_rows() {
    let (_dir, store) = open_temp();
    let mut events: Vec<_> = (0..25)
        .map(|i| event(&format!("user-{i}"), Action::Read, &format!("rx-{i}")))
        .collect();
    events[3].patient = Some("ab".repeat(32));
    events[4].break_glass = true;
    events[5].actor.subject = "cli:o\"neil".into(); // escaped in the body
    events[6].at = t0() + Duration::nanoseconds(1_500);
    store.append(&events).await.unwrap();
    let page = store.audit_range_checked(3, 10).await.unwrap();
    assert_eq!(page.events, store.audit_range(3, 10).await.unwrap());
    assert_eq!(page.fault, None);
    let all = store.audit_range_checked(1, usize::MAX).await.unwrap();
    assert_eq!((all.events.len(), all.fault), (25, None));
    assert!(store
        .audit_range_checked(26, 10)
        .await
        .unwrap()
        .events
        .is_empty());
}

#[tokio::test]
async fn the_checked_read_names_the_first_event_whose_column_was_edited() {
    let (dir, store) = open_temp();
    let mut events: Vec<_> = (0..10)
        .map(|i| event("ph-x", Action::Read, &format!("rx-{i}")))
        .collect();
    events[2].patient = Some("cd".repeat(32));
    store.append(&events).await.unwrap();
    let conn = rusqlite::Connection::open(dir.path().join("rx.db")).unwrap();
    conn.execute_batch("DROP TRIGGER audit_no_update;").unwrap();
    // Each edit is earlier in the trail than the ones before it, so it is the first fault.
    let cases = [
        (
            "UPDATE audit SET break_glass = 1 WHERE seq = 8",
            8,
            "break_glass",
        ),
        (
            "UPDATE audit SET subject = 'innocent' WHERE seq IN (7, 9)",
            7,
            "subject",
        ),
        (
            "UPDATE audit SET at = '1999-01-01T00:00:00.000000000Z' WHERE seq = 6",
            6,
            "at",
        ),
        (
            "UPDATE audit SET resource_id = 'rx-99' WHERE seq = 5",
            5,
            "resource_id",
        ),
        (
            "UPDATE audit SET action = 'create' WHERE seq = 4",
            4,
            "action",
        ),
        (
            "UPDATE audit SET patient = NULL WHERE seq = 3",
            3,
            "patient",
        ),
        (
            "UPDATE audit SET event_id = 'x' WHERE seq = 2",
            2,
            "event_id",
        ),
    ];
    for (sql, seq, column) in cases {
        conn.execute_batch(sql).unwrap();
        let page = store.audit_range_checked(1, 100).await.unwrap();
        assert_eq!(
            page.events.len(),
            10,
            "{sql}: every event is still returned"
        );
        assert_eq!(
            page.fault,
            Some(RowFault::Mismatch { seq, column }),
            "{sql}"
        );
    }
    // A page that starts after the edited rows has no fault.
    assert_eq!(
        store.audit_range_checked(10, 100).await.unwrap().fault,
        None
    );
}

#[tokio::test]
async fn last_updated_is_the_latest_change_of_a_table_across_tenants() {
    let (_dir, store) = open_temp();
    assert_eq!(
        store.last_updated(Table::Prescriptions).await.unwrap(),
        None
    );
    for (tenant, id, minutes) in [("t1", "rx-1", 5), ("t2", "rx-2", 9), ("t1", "rx-3", 2)] {
        let mut r = row(Table::Prescriptions, tenant, id);
        r.updated_at = t0() + Duration::minutes(minutes);
        store.commit(insert(r, vec![])).await.unwrap();
    }
    assert_eq!(
        store.last_updated(Table::Prescriptions).await.unwrap(),
        Some(t0() + Duration::minutes(9))
    );
    assert_eq!(store.last_updated(Table::Patients).await.unwrap(), None);
}

#[tokio::test]
async fn checkpoints_are_stored_in_order_and_must_be_consecutive() {
    let (_dir, store) = open_temp();
    assert!(store.checkpoints().await.unwrap().is_empty());
    let cp = |number: u64, first_seq: u64, last_seq: u64| CheckpointRow {
        number,
        first_seq,
        last_seq,
        body: format!("{{\"n\":{number}}}").into_bytes(),
    };
    store.put_checkpoint(&cp(1, 1, 10)).await.unwrap();
    store.put_checkpoint(&cp(2, 11, 25)).await.unwrap();
    let err = store.put_checkpoint(&cp(2, 11, 30)).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    let err = store.put_checkpoint(&cp(4, 26, 30)).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(
        store.checkpoints().await.unwrap(),
        vec![cp(1, 1, 10), cp(2, 11, 25)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_tasks_keep_the_chain_intact() {
    let (_dir, store) = open_temp();
    let store = Arc::new(store);
    let tasks = 8;
    let per_task = 40;
    let mut handles = Vec::new();
    for t in 0..tasks {
        let store = Arc::clone(&store);
        handles.push(tokio::spawn(async move {
            for i in 0..per_task {
                let id = format!("rx-{t}-{i}");
                let events = vec![
                    event("a", Action::Create, &id),
                    event("a", Action::Read, &id),
                ];
                if i % 3 == 0 {
                    store.append(&events).await.unwrap();
                } else {
                    store
                        .commit(insert(row(Table::Prescriptions, "t1", &id), events))
                        .await
                        .unwrap();
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let expected = (tasks * per_task * 2) as u64;
    assert_eq!(store.audit_len().await.unwrap(), expected);
    let stored = store.audit_range(1, usize::MAX).await.unwrap();
    assert_eq!(stored.len() as u64, expected);
    assert_chain_valid(&stored);
    // Each change set's two events are adjacent: no interleaving inside a change set.
    let decoded = decode(&stored);
    for pair in decoded.chunks(2) {
        assert_eq!(pair[0].resource.id, pair[1].resource.id);
    }
}
