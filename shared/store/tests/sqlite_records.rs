//! Records, conditional writes, transitions and reopening of the SQLite store.

mod sqlite_support;

use chrono::Duration;
use rx_guard::audit::Action;
use rx_store::sqlite::SqliteStore;
use rx_store::{Changes, RecordStore, StoreError, Table, TransitionRow, Write};
use sqlite_support::*;

#[tokio::test]
async fn inserted_row_reads_back_by_id_key_and_index() {
    let (_dir, store) = open_temp();
    let r = row(Table::Prescriptions, "t1", "rx-1");
    store.commit(insert(r.clone(), vec![])).await.unwrap();

    assert_eq!(
        store.get(Table::Prescriptions, "t1", "rx-1").await.unwrap(),
        Some(r.clone())
    );
    assert_eq!(
        store
            .get_by_key(Table::Prescriptions, "t1", b"key-rx-1")
            .await
            .unwrap(),
        Some(r.clone())
    );
    assert_eq!(
        store
            .find_by_index(Table::Prescriptions, "t1", b"patient-blind-index-1")
            .await
            .unwrap(),
        vec![r]
    );
    // Another table with the same id holds nothing.
    assert_eq!(
        store.get(Table::Patients, "t1", "rx-1").await.unwrap(),
        None
    );
}

#[tokio::test]
async fn reads_are_scoped_to_the_tenant() {
    let (_dir, store) = open_temp();
    store
        .commit(insert(row(Table::Patients, "t1", "p-1"), vec![]))
        .await
        .unwrap();
    assert_eq!(store.get(Table::Patients, "t2", "p-1").await.unwrap(), None);
    assert_eq!(
        store
            .get_by_key(Table::Patients, "t2", b"key-p-1")
            .await
            .unwrap(),
        None
    );
    assert!(store
        .find_by_index(Table::Patients, "t2", b"patient-blind-index-1")
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn same_key_in_another_tenant_is_allowed() {
    let (_dir, store) = open_temp();
    let a = row(Table::Prescriptions, "t1", "rx-1");
    let mut b = row(Table::Prescriptions, "t2", "rx-2");
    b.key = a.key.clone();
    store.commit(insert(a, vec![])).await.unwrap();
    store.commit(insert(b.clone(), vec![])).await.unwrap();
    assert_eq!(
        store
            .get_by_key(Table::Prescriptions, "t2", b"key-rx-1")
            .await
            .unwrap(),
        Some(b)
    );
}

#[tokio::test]
async fn insert_with_duplicate_key_or_id_is_a_conflict() {
    let (_dir, store) = open_temp();
    store
        .commit(insert(row(Table::Prescriptions, "t1", "rx-1"), vec![]))
        .await
        .unwrap();

    let mut same_key = row(Table::Prescriptions, "t1", "rx-2");
    same_key.key = Some(b"key-rx-1".to_vec());
    let err = store.commit(insert(same_key, vec![])).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");

    let mut same_id = row(Table::Prescriptions, "t1", "rx-1");
    same_id.key = Some(b"another".to_vec());
    let err = store.commit(insert(same_id, vec![])).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");

    assert_eq!(
        store.get(Table::Prescriptions, "t1", "rx-2").await.unwrap(),
        None
    );
}

#[tokio::test]
async fn rows_without_key_do_not_collide() {
    let (_dir, store) = open_temp();
    for id in ["in-1", "in-2"] {
        let mut r = row(Table::Inputs, "t1", id);
        r.key = None;
        r.index = None;
        store.commit(insert(r, vec![])).await.unwrap();
    }
    assert_eq!(
        store
            .list(Table::Inputs, "t1", None, None, 10)
            .await
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test]
async fn conflict_message_carries_no_sealed_bytes_or_key() {
    let (_dir, store) = open_temp();
    let mut r = row(Table::Prescriptions, "t1", "rx-1");
    r.sealed = b"SEALED-SECRET-BYTES".to_vec();
    r.key = Some(b"KEY-SECRET".to_vec());
    store.commit(insert(r.clone(), vec![])).await.unwrap();
    let text = store
        .commit(insert(r, vec![]))
        .await
        .unwrap_err()
        .to_string();
    assert!(!text.contains("SEALED-SECRET"), "{text}");
    assert!(!text.contains("KEY-SECRET"), "{text}");
    assert!(!text.contains(&hex::encode(b"KEY-SECRET")), "{text}");
    assert!(text.contains("rx-1"), "names the record by id: {text}");
}

#[tokio::test]
async fn update_at_the_read_version_stores_the_new_version() {
    let (_dir, store) = open_temp();
    let r = row(Table::Prescriptions, "t1", "rx-1");
    store.commit(insert(r.clone(), vec![])).await.unwrap();
    let mut next = r.clone();
    next.version = 2;
    next.status = "validated".into();
    next.updated_at = t0() + Duration::seconds(5);
    next.sealed = b"new body".to_vec();
    store
        .commit(Changes {
            writes: vec![Write::Update {
                row: next.clone(),
                expected_version: 1,
            }],
            ..Changes::default()
        })
        .await
        .unwrap();
    let got = store
        .get(Table::Prescriptions, "t1", "rx-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, next);
    assert_eq!(got.created_at, r.created_at, "created_at is kept");
}

#[tokio::test]
async fn stale_version_is_a_conflict_and_nothing_of_the_change_set_is_stored() {
    let (_dir, store) = open_temp();
    let r = row(Table::Prescriptions, "t1", "rx-1");
    store
        .commit(insert(r.clone(), vec![event("u", Action::Create, "rx-1")]))
        .await
        .unwrap();
    let mut v2 = r.clone();
    v2.version = 2;
    v2.status = "validated".into();
    store
        .commit(Changes {
            writes: vec![Write::Update {
                row: v2.clone(),
                expected_version: 1,
            }],
            ..Changes::default()
        })
        .await
        .unwrap();

    // A second writer that also read version 1, plus an insert, a transition and events.
    let mut stale = r.clone();
    stale.version = 2;
    stale.status = "rejected".into();
    let err = store
        .commit(Changes {
            writes: vec![
                Write::Insert(row(Table::Patients, "t1", "p-9")),
                Write::Update {
                    row: stale,
                    expected_version: 1,
                },
            ],
            transitions: vec![TransitionRow {
                rx_id: "rx-1".into(),
                tenant: "t1".into(),
                version: 2,
                from: Some("received".into()),
                to: "rejected".into(),
                at: t0(),
                actor: "system:validate".into(),
                function: "validate".into(),
            }],
            audit: vec![
                event("u", Action::Update, "rx-1"),
                event("u", Action::Read, "p-9"),
            ],
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");

    assert_eq!(
        store.get(Table::Prescriptions, "t1", "rx-1").await.unwrap(),
        Some(v2)
    );
    assert_eq!(store.get(Table::Patients, "t1", "p-9").await.unwrap(), None);
    assert!(store.transitions("t1", "rx-1").await.unwrap().is_empty());
    assert_eq!(store.audit_len().await.unwrap(), 1);
}

#[tokio::test]
async fn update_of_a_missing_record_or_wrong_next_version_is_a_conflict() {
    let (_dir, store) = open_temp();
    let mut ghost = row(Table::Prescriptions, "t1", "rx-404");
    ghost.version = 2;
    let err = store
        .commit(Changes {
            writes: vec![Write::Update {
                row: ghost,
                expected_version: 1,
            }],
            ..Changes::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");

    let r = row(Table::Prescriptions, "t1", "rx-1");
    store.commit(insert(r.clone(), vec![])).await.unwrap();
    let mut skip = r;
    skip.version = 3;
    let err = store
        .commit(Changes {
            writes: vec![Write::Update {
                row: skip,
                expected_version: 1,
            }],
            ..Changes::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(
        store
            .get(Table::Prescriptions, "t1", "rx-1")
            .await
            .unwrap()
            .unwrap()
            .version,
        1
    );
}

#[tokio::test]
async fn list_pages_in_id_order_and_filters_by_status() {
    let (_dir, store) = open_temp();
    for i in 0..7 {
        let mut r = row(Table::Prescriptions, "t1", &format!("rx-{i}"));
        r.status = if i % 2 == 0 { "received" } else { "validated" }.into();
        store.commit(insert(r, vec![])).await.unwrap();
    }
    store
        .commit(insert(row(Table::Prescriptions, "t2", "rx-other"), vec![]))
        .await
        .unwrap();

    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store
            .list(Table::Prescriptions, "t1", None, after.as_deref(), 3)
            .await
            .unwrap();
        assert!(page.len() <= 3);
        if page.is_empty() {
            break;
        }
        after = page.last().map(|r| r.id.clone());
        seen.extend(page.into_iter().map(|r| r.id));
    }
    let expected: Vec<String> = (0..7).map(|i| format!("rx-{i}")).collect();
    assert_eq!(seen, expected);

    let validated = store
        .list(Table::Prescriptions, "t1", Some("validated"), None, 10)
        .await
        .unwrap();
    let ids: Vec<_> = validated.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["rx-1", "rx-3", "rx-5"]);
    let after_1 = store
        .list(
            Table::Prescriptions,
            "t1",
            Some("validated"),
            Some("rx-1"),
            1,
        )
        .await
        .unwrap();
    assert_eq!(after_1.len(), 1);
    assert_eq!(after_1[0].id, "rx-3");
}

#[tokio::test]
async fn count_by_status_counts_every_tenant() {
    let (_dir, store) = open_temp();
    for (tenant, id, status) in [
        ("t1", "a", "received"),
        ("t1", "b", "received"),
        ("t2", "c", "received"),
        ("t2", "d", "dispensed"),
    ] {
        let mut r = row(Table::Prescriptions, tenant, id);
        r.status = status.into();
        store.commit(insert(r, vec![])).await.unwrap();
    }
    assert_eq!(
        store.count_by_status(Table::Prescriptions).await.unwrap(),
        vec![("dispensed".to_string(), 1), ("received".to_string(), 3)]
    );
    assert!(store
        .count_by_status(Table::Patients)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn tenants_lists_each_tenant_with_rows_once_in_order() {
    let (_dir, store) = open_temp();
    assert!(store
        .tenants(Table::Prescriptions)
        .await
        .unwrap()
        .is_empty());
    for (tenant, id) in [("t2", "a"), ("t1", "b"), ("t2", "c"), ("t3", "d")] {
        store
            .commit(insert(row(Table::Prescriptions, tenant, id), vec![]))
            .await
            .unwrap();
    }
    store
        .commit(insert(row(Table::Patients, "t9", "p"), vec![]))
        .await
        .unwrap();
    assert_eq!(
        store.tenants(Table::Prescriptions).await.unwrap(),
        vec!["t1".to_string(), "t2".into(), "t3".into()]
    );
    assert_eq!(
        store.tenants(Table::Patients).await.unwrap(),
        vec!["t9".to_string()]
    );
}

#[tokio::test]
async fn find_by_index_returns_oldest_first() {
    let (_dir, store) = open_temp();
    for (id, minutes) in [("rx-b", 30), ("rx-a", 10), ("rx-c", 20)] {
        let mut r = row(Table::Prescriptions, "t1", id);
        r.created_at = t0() + Duration::minutes(minutes);
        store.commit(insert(r, vec![])).await.unwrap();
    }
    let mut other = row(Table::Prescriptions, "t1", "rx-z");
    other.index = Some(b"someone else".to_vec());
    store.commit(insert(other, vec![])).await.unwrap();

    let found = store
        .find_by_index(Table::Prescriptions, "t1", b"patient-blind-index-1")
        .await
        .unwrap();
    let ids: Vec<_> = found.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["rx-a", "rx-c", "rx-b"]);
}

#[tokio::test]
async fn transitions_come_back_in_the_order_recorded() {
    let (_dir, store) = open_temp();
    let tr = |version: u64, from: Option<&str>, to: &str| TransitionRow {
        rx_id: "rx-1".into(),
        tenant: "t1".into(),
        version,
        from: from.map(String::from),
        to: to.into(),
        at: t0() + Duration::seconds(version as i64),
        actor: "system:pipeline".into(),
        function: "validate".into(),
    };
    let all = vec![
        tr(1, None, "received"),
        tr(2, Some("received"), "validated"),
    ];
    store
        .commit(Changes {
            transitions: all[..1].to_vec(),
            ..Changes::default()
        })
        .await
        .unwrap();
    store
        .commit(Changes {
            transitions: all[1..].to_vec(),
            ..Changes::default()
        })
        .await
        .unwrap();
    assert_eq!(store.transitions("t1", "rx-1").await.unwrap(), all);
    assert!(store.transitions("t2", "rx-1").await.unwrap().is_empty());
}

#[tokio::test]
async fn data_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested").join("rx.db");
    let r = row(Table::Prescribers, "t1", "pr-1");
    {
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.path(), path.as_path());
        store
            .commit(insert(r.clone(), vec![event("u", Action::Create, "pr-1")]))
            .await
            .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(
        store.get(Table::Prescribers, "t1", "pr-1").await.unwrap(),
        Some(r)
    );
    assert_eq!(store.audit_len().await.unwrap(), 1);
    assert_chain_valid(&store.audit_range(1, 10).await.unwrap());
}

#[tokio::test]
async fn store_file_is_private_to_its_owner() {
    let (dir, _store) = open_temp();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("rx.db"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "mode {mode:o}");
    }
}

#[test]
fn file_from_a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rx.db");
    drop(SqliteStore::open(&path).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    let err = SqliteStore::open(&path)
        .err()
        .expect("newer schema must be refused");
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    assert!(err.to_string().contains("upgrade rxflow"), "{err}");
}

#[test]
fn a_file_that_is_not_a_database_is_reported_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rx.db");
    std::fs::write(&path, vec![0x42u8; 8192]).unwrap();
    let err = SqliteStore::open(&path)
        .err()
        .expect("garbage must be refused");
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
}

/// An update that keeps the blind index and key leaves them findable; one that changes or clears
/// them moves the lookups (the store tries a cheaper update that leaves both indexes alone first).
#[tokio::test]
async fn update_keeps_or_moves_the_index_and_key_lookups() {
    let (_dir, store) = open_temp();
    let r = row(Table::Patients, "t1", "p-1");
    store.commit(insert(r.clone(), vec![])).await.unwrap();
    let update = |row: rx_store::Row, expected_version| Changes {
        writes: vec![Write::Update {
            row,
            expected_version,
        }],
        ..Changes::default()
    };

    let mut same = r.clone();
    same.version = 2;
    same.status = "updated".into();
    same.sealed = b"sealed-v2".to_vec();
    store.commit(update(same.clone(), 1)).await.unwrap();
    assert_eq!(
        store
            .get_by_key(Table::Patients, "t1", b"key-p-1")
            .await
            .unwrap(),
        Some(same.clone())
    );
    assert_eq!(
        store
            .find_by_index(Table::Patients, "t1", b"patient-blind-index-1")
            .await
            .unwrap(),
        vec![same.clone()]
    );

    let mut moved = same.clone();
    moved.version = 3;
    moved.index = Some(b"patient-blind-index-2".to_vec());
    moved.key = Some(b"key-p-1b".to_vec());
    store.commit(update(moved.clone(), 2)).await.unwrap();
    assert_eq!(
        store
            .get_by_key(Table::Patients, "t1", b"key-p-1")
            .await
            .unwrap(),
        None
    );
    assert!(store
        .find_by_index(Table::Patients, "t1", b"patient-blind-index-1")
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        store
            .get_by_key(Table::Patients, "t1", b"key-p-1b")
            .await
            .unwrap(),
        Some(moved.clone())
    );

    let mut cleared = moved.clone();
    cleared.version = 4;
    cleared.index = None;
    cleared.key = None;
    store.commit(update(cleared.clone(), 3)).await.unwrap();
    assert_eq!(
        store
            .get_by_key(Table::Patients, "t1", b"key-p-1b")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store.get(Table::Patients, "t1", "p-1").await.unwrap(),
        Some(cleared)
    );

    // A stale version is still a conflict, with the keys the same or changed.
    let mut stale = same;
    stale.version = 4;
    let err = store.commit(update(stale, 3)).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
}
