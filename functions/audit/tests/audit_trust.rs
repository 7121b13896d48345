//! What the hash chain and the checkpoints alone do not catch, caught by `verify_trail`: a
//! searchable column edited apart from the body, records whose events were cut off the end, and
//! (with an [`Anchor`] kept elsewhere) the newest checkpoints deleted with their events.

mod support;

use chrono::Duration;
use rx_fn_audit::{latest_anchor, verify_trail, verify_trail_anchored, Anchor, BreakKind};
use rx_fn_audit::{AuditError, TrailReport};
use rx_guard::audit::AuditSink;
use rx_guard::merkle::{checkpoint_hash, Checkpoint, CheckpointSigner, LocalSigner, TreeBuilder};
use rx_store::{Changes, RecordStore, Row, Table, Write};
use support::*;

fn kind(r: &TrailReport) -> BreakKind {
    assert!(!r.ok, "expected a break, the trail verified: {r:?}");
    r.first_break.as_ref().unwrap().kind
}

fn sentence(r: &TrailReport) -> &str {
    &r.first_break.as_ref().unwrap().sentence
}

#[tokio::test]
async fn each_edited_searchable_column_is_a_break_at_its_event_naming_the_column() {
    let cases = [
        (
            "UPDATE audit SET subject = 'innocent' WHERE subject = 'user-1'",
            1,
            "subject",
        ),
        (
            "UPDATE audit SET patient = NULL WHERE seq = 33",
            33,
            "patient",
        ),
        (
            "UPDATE audit SET patient = 'ff' WHERE seq = 34",
            34,
            "patient",
        ),
        (
            "UPDATE audit SET action = 'read' WHERE seq = 35",
            35,
            "action",
        ),
        (
            "UPDATE audit SET resource_id = 'rx-0' WHERE seq = 36",
            36,
            "resource_id",
        ),
        (
            "UPDATE audit SET at = '2020-01-01T00:00:00.000000000Z' WHERE seq = 37",
            37,
            "at",
        ),
        (
            "UPDATE audit SET break_glass = 1 WHERE seq = 38",
            38,
            "break_glass",
        ),
        (
            "UPDATE audit SET event_id = 'other' WHERE seq = 39",
            39,
            "event_id",
        ),
        // Beyond the last checkpoint too: the columns are checked whether sealed or not.
        (
            "UPDATE audit SET subject = 'innocent' WHERE seq = 58",
            58,
            "subject",
        ),
    ];
    for (sql, seq, column) in cases {
        let t = trail(60, 20).await;
        attacker(&t.db()).execute_batch(sql).unwrap();
        let r = verify_trail(&t.reopen(), Some(&t.key())).await.unwrap();
        assert_eq!(kind(&r), BreakKind::EventIndexMismatch, "{sql}");
        let b = r.first_break.as_ref().unwrap();
        assert_eq!(b.seq, Some(seq), "{sql}");
        assert!(
            b.sentence.contains(&format!("audit event {seq} ")) && b.sentence.contains(column),
            "{sql}: {}",
            b.sentence
        );
        for value in ["innocent", "user-1", "rx-0", "2020", "other"] {
            assert!(!b.sentence.contains(value), "{sql}: {}", b.sentence);
        }
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["first_break"]["kind"], "event-index-mismatch");
    }
}

#[tokio::test]
async fn the_search_a_column_edit_fools_is_what_verification_catches() {
    let t = trail(30, 10).await;
    attacker(&t.db())
        .execute("UPDATE audit SET subject = 'innocent' WHERE seq = 7", [])
        .unwrap();
    let store = t.reopen();
    let by_user = rx_fn_audit::search(
        &store,
        &rx_guard::audit::AuditQuery {
            subject: Some("user-1".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(
        by_user.iter().all(|e| e.seq != 7),
        "the search misses event 7"
    );
    let r = verify_trail(&store, Some(&t.key())).await.unwrap();
    assert_eq!(
        (kind(&r), r.first_break.unwrap().seq),
        (BreakKind::EventIndexMismatch, Some(7))
    );
}

#[tokio::test]
async fn a_rewritten_body_that_is_not_json_is_unreadable_at_its_event() {
    let t = trail(30, 10).await;
    let db = attacker(&t.db());
    set_body(&db, 25, b"not an event");
    rechain(&db);
    let r = verify_trail(&t.reopen(), Some(&t.key())).await.unwrap();
    assert_eq!(kind(&r), BreakKind::EventUnreadable);
    assert_eq!(r.first_break.as_ref().unwrap().seq, Some(25));
    assert!(!sentence(&r).contains("not an event"), "{}", sentence(&r));
}

/// A prescription row committed with its create event, the row stamped like the event.
async fn record(t: &Trail, i: u64) {
    let ev = event(i);
    let row = Row {
        table: Table::Prescriptions,
        id: format!("rx-{i}"),
        tenant: "t1".into(),
        status: "received".into(),
        version: 1,
        created_at: ev.at,
        // The repository stamps an update just after its event.
        updated_at: ev.at + Duration::microseconds(40),
        index: None,
        key: None,
        sealed: b"sealed".to_vec(),
    };
    t.store
        .commit(Changes {
            writes: vec![Write::Insert(row)],
            transitions: vec![],
            audit: vec![ev],
        })
        .await
        .unwrap();
}

/// Events 1..=20 sealed in checkpoint 1, then 21..=40 each with its record, sealed in
/// checkpoint 2.
async fn trail_with_records() -> Trail {
    let t = trail(20, 20).await;
    for i in 21..=40 {
        record(&t, i).await;
    }
    rx_fn_seal::seal(&t.store, &t.signer)
        .await
        .unwrap()
        .unwrap();
    t
}

#[tokio::test]
async fn records_whose_events_are_all_there_verify() {
    let t = trail_with_records().await;
    let r = verify_trail(&t.reopen(), Some(&t.key())).await.unwrap();
    assert!(r.ok, "{r:?}");
    assert_eq!((r.events, r.checkpoints), (40, 2));
}

#[tokio::test]
async fn records_with_the_whole_trail_deleted_fail() {
    let t = trail_with_records().await;
    attacker(&t.db())
        .execute_batch("DELETE FROM audit; DELETE FROM checkpoints;")
        .unwrap();
    let r = verify_trail(&t.reopen(), Some(&t.key())).await.unwrap();
    assert_eq!(kind(&r), BreakKind::RecordsWithoutEvents);
    assert!(
        sentence(&r).contains("20 prescription records") && sentence(&r).contains("empty"),
        "{}",
        sentence(&r)
    );
    assert_eq!(r.events, 0);
}

#[tokio::test]
async fn records_newer_than_the_last_event_fail_when_the_newest_checkpoint_is_cut_off() {
    let t = trail_with_records().await;
    attacker(&t.db())
        .execute_batch(
            "DELETE FROM audit WHERE seq > 20; DELETE FROM checkpoints WHERE number = 2;",
        )
        .unwrap();
    let r = verify_trail(&t.reopen(), Some(&t.key())).await.unwrap();
    assert_eq!(kind(&r), BreakKind::RecordsWithoutEvents);
    assert!(
        sentence(&r).contains("prescription records were changed after")
            && sentence(&r).contains("seq 20"),
        "{}",
        sentence(&r)
    );
    // Cut inside a checkpoint: the checkpoint says so first.
    let t = trail_with_records().await;
    attacker(&t.db())
        .execute("DELETE FROM audit WHERE seq > 30", [])
        .unwrap();
    let r = verify_trail(&t.reopen(), Some(&t.key())).await.unwrap();
    assert_eq!(kind(&r), BreakKind::Truncated);
}

#[tokio::test]
async fn an_anchor_names_the_latest_checkpoint_and_reads_back() {
    let empty = trail(0, 10).await;
    assert_eq!(latest_anchor(&empty.store).await.unwrap(), None);

    let t = trail(60, 20).await;
    let a = latest_anchor(&t.store).await.unwrap().unwrap();
    let rows = t.store.checkpoints().await.unwrap();
    let cp = Checkpoint::from_json(&rows[2].body).unwrap();
    assert_eq!((a.version, a.checkpoint, a.last_seq), (1, 3, 60));
    assert_eq!(a.checkpoint_hash, checkpoint_hash(&rows[2].body));
    assert_eq!(a.chain_head, cp.chain_head);
    assert_eq!(a.key_id, t.signer.key_id());

    let json = serde_json::to_string(&a).unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["checkpoint_hash"], hex::encode(a.checkpoint_hash));
    assert_eq!(Anchor::from_json(&json).unwrap(), a);
    for bad in [
        "{}".to_string(),
        "not json".to_string(),
        json.replace("\"version\":1", "\"version\":2"),
        json.replace(&hex::encode(a.chain_head), "zz"),
    ] {
        assert!(
            matches!(
                Anchor::from_json(&bad),
                Err(AuditError::AnchorUnreadable(_))
            ),
            "{bad}"
        );
    }

    let r = verify_trail_anchored(&t.reopen(), Some(&t.key()), &a)
        .await
        .unwrap();
    assert!(r.ok, "{r:?}");
    assert_eq!(r.anchored_checkpoint, Some(3));
}

#[tokio::test]
async fn a_trail_grown_after_the_anchor_still_holds_it() {
    let t = trail(40, 20).await;
    let a = latest_anchor(&t.store).await.unwrap().unwrap();
    t.store
        .append(&(41..=70).map(event).collect::<Vec<_>>())
        .await
        .unwrap();
    rx_fn_seal::seal(&t.store, &t.signer)
        .await
        .unwrap()
        .unwrap();
    let r = verify_trail_anchored(&t.reopen(), Some(&t.key()), &a)
        .await
        .unwrap();
    assert!(
        r.ok && r.checkpoints == 3 && r.anchored_checkpoint == Some(2),
        "{r:?}"
    );
}

#[tokio::test]
async fn cutting_the_trail_back_behind_the_anchor_is_detected() {
    let cuts = [
        "DELETE FROM audit WHERE seq > 40; DELETE FROM checkpoints WHERE number = 3;",
        "DELETE FROM checkpoints;",
        "DELETE FROM audit; DELETE FROM checkpoints;",
    ];
    for sql in cuts {
        let t = trail(60, 20).await;
        let a = latest_anchor(&t.store).await.unwrap().unwrap();
        attacker(&t.db()).execute_batch(sql).unwrap();
        // On its own the shorter trail verifies: that is what the anchor is for.
        let plain = verify_trail(&t.reopen(), Some(&t.key())).await.unwrap();
        assert!(plain.ok, "{sql}: {plain:?}");
        let r = verify_trail_anchored(&t.reopen(), Some(&t.key()), &a)
            .await
            .unwrap();
        assert_eq!(kind(&r), BreakKind::AnchorMismatch, "{sql}");
        assert_eq!(r.first_break.as_ref().unwrap().checkpoint, Some(3));
        assert!(sentence(&r).contains("checkpoint 3"), "{}", sentence(&r));
        assert_eq!(r.anchored_checkpoint, None);
    }
}

/// The careful attacker with their own key and the data directory's `.pub` replaced: every
/// checkpoint rebuilt and re-signed, self-consistent. The anchor's hash tells.
#[tokio::test]
async fn a_trail_re_signed_with_another_key_does_not_hold_the_anchor() {
    let t = trail(60, 20).await;
    let a = latest_anchor(&t.store).await.unwrap().unwrap();
    let rogue_dir = tempfile::tempdir().unwrap();
    let rogue = LocalSigner::open_or_create(&rogue_dir.path().join("rogue.pk8")).unwrap();
    let db = attacker(&t.db());
    let store = t.reopen();
    let mut prev = [0u8; 32];
    for row in store.checkpoints().await.unwrap() {
        let mut cp = Checkpoint::from_json(&row.body).unwrap();
        let events = store
            .audit_range(cp.first_seq, (cp.last_seq - cp.first_seq + 1) as usize)
            .await
            .unwrap();
        let mut tree = TreeBuilder::new();
        for e in &events {
            tree.push_event(&e.hash);
        }
        cp.root = tree.root();
        cp.prev_checkpoint_hash = prev;
        cp.key_id = rogue.key_id().into();
        cp.signature = rogue.sign(&cp.signing_input()).await.unwrap();
        let body = cp.to_json();
        prev = checkpoint_hash(&body);
        db.execute(
            "UPDATE checkpoints SET body = ?1 WHERE number = ?2",
            rusqlite::params![body, cp.number as i64],
        )
        .unwrap();
    }
    let with_rogue = verify_trail(&t.reopen(), Some(&rogue.public_key()))
        .await
        .unwrap();
    assert!(with_rogue.ok, "{with_rogue:?}");
    let r = verify_trail_anchored(&t.reopen(), Some(&rogue.public_key()), &a)
        .await
        .unwrap();
    assert_eq!(kind(&r), BreakKind::AnchorMismatch);
    assert!(sentence(&r).contains("re-signed"), "{}", sentence(&r));
}

#[tokio::test]
async fn an_edited_anchor_file_is_not_taken_for_the_checkpoint() {
    let t = trail(40, 20).await;
    let mut a = latest_anchor(&t.store).await.unwrap().unwrap();
    a.last_seq = 39;
    let r = verify_trail_anchored(&t.reopen(), Some(&t.key()), &a)
        .await
        .unwrap();
    assert_eq!(kind(&r), BreakKind::AnchorMismatch);
    assert!(
        sentence(&r).contains("anchor file was edited"),
        "{}",
        sentence(&r)
    );
}
