//! Every tamper an attacker with write access to the SQLite file can make is detected by
//! `verify_trail`: the naive one by the hash chain, the careful one (chain recomputed) by the
//! signed checkpoints.

mod support;

use rx_fn_audit::{verify_trail, BreakKind, TrailReport};
use rx_guard::audit::chain::link;
use rx_guard::merkle::{checkpoint_hash, Checkpoint, CheckpointSigner, LocalSigner, TreeBuilder};
use rx_store::RecordStore;
use support::*;

async fn verify(t: &Trail) -> TrailReport {
    verify_trail(&t.reopen(), Some(&t.key())).await.unwrap()
}

fn kind(r: &TrailReport) -> BreakKind {
    assert!(!r.ok, "expected a break, the trail verified: {r:?}");
    r.first_break.as_ref().unwrap().kind
}

#[tokio::test]
async fn an_intact_sealed_trail_verifies() {
    let t = trail(95, 20).await;
    let r = verify(&t).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(r.events, 95);
    assert_eq!(r.checkpoints, 4);
    assert_eq!(r.events_sealed, 80);
    assert!(r.signatures_checked);
    assert_eq!(r.first_break, None);
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["ok"], true);

    let unsigned = verify_trail(&t.store, None).await.unwrap();
    assert!(unsigned.ok && !unsigned.signatures_checked);
}

#[tokio::test]
async fn an_empty_trail_verifies() {
    let t = trail(0, 10).await;
    let r = verify(&t).await;
    assert!(r.ok);
    assert_eq!((r.events, r.checkpoints), (0, 0));
}

#[tokio::test]
async fn an_edited_event_body_is_detected_at_that_event() {
    let t = trail(60, 20).await;
    let db = attacker(&t.db());
    let edited = String::from_utf8(body(&db, 27))
        .unwrap()
        .replace("rx-27", "rx-99");
    set_body(&db, 27, edited.as_bytes());
    let r = verify(&t).await;
    assert_eq!(kind(&r), BreakKind::EventAltered);
    assert_eq!(r.first_break.as_ref().unwrap().seq, Some(27));
    assert_eq!(r.events, 26);
    assert!(r.first_break.unwrap().sentence.contains("27"));
}

#[tokio::test]
async fn an_edited_event_with_the_chain_recomputed_fails_its_checkpoint_root() {
    let t = trail(60, 20).await;
    let db = attacker(&t.db());
    let edited = String::from_utf8(body(&db, 27))
        .unwrap()
        .replace("\"read\"", "\"create\"");
    set_body(&db, 27, edited.as_bytes());
    reindex(&db, 27);
    rechain(&db);
    let r = verify(&t).await;
    assert_eq!(kind(&r), BreakKind::CheckpointRoot);
    assert_eq!(r.first_break.unwrap().checkpoint, Some(2));
    assert_eq!(r.events_sealed, 20, "checkpoint 1 still verified");
}

#[tokio::test]
async fn a_deleted_event_is_detected() {
    let t = trail(60, 20).await;
    let db = attacker(&t.db());
    db.execute("DELETE FROM audit WHERE seq = 33", []).unwrap();
    let r = verify(&t).await;
    assert_eq!(kind(&r), BreakKind::SequenceGap);
    assert_eq!(r.first_break.unwrap().seq, Some(34));
}

#[tokio::test]
async fn a_deleted_event_with_renumbering_and_rechaining_is_detected() {
    let t = trail(60, 20).await;
    let db = attacker(&t.db());
    db.execute("DELETE FROM audit WHERE seq = 33", []).unwrap();
    renumber(&db);
    rechain(&db);
    let r = verify(&t).await;
    // Checkpoint 2 (21..=40) now holds other events: its root no longer recomputes.
    assert_eq!(kind(&r), BreakKind::CheckpointRoot);
    assert_eq!(r.first_break.unwrap().checkpoint, Some(2));
}

/// Inside the last checkpoint the same deletion leaves that checkpoint short of its last event:
/// reported as removed events, and the sentence says they may have come from inside the trail.
#[tokio::test]
async fn a_deleted_event_renumbered_inside_the_last_checkpoint_is_reported_as_removed() {
    let t = trail(60, 20).await;
    let db = attacker(&t.db());
    db.execute("DELETE FROM audit WHERE seq = 45", []).unwrap();
    renumber(&db);
    rechain(&db);
    let r = verify(&t).await;
    assert_eq!(kind(&r), BreakKind::Truncated);
    let b = r.first_break.unwrap();
    assert_eq!(b.checkpoint, Some(3));
    assert!(b.sentence.contains("from inside it"), "{}", b.sentence);
}

/// Moves events > `after` up by one and puts a forged event at `after + 1`, linked to the event
/// before it.
fn insert_forged(db: &rusqlite::Connection, after: i64) {
    db.execute("UPDATE audit SET seq = -seq WHERE seq > ?1", [after])
        .unwrap();
    db.execute("UPDATE audit SET seq = -seq + 1 WHERE seq < 0", [])
        .unwrap();
    let prev: Vec<u8> = db
        .query_row("SELECT hash FROM audit WHERE seq = ?1", [after], |r| {
            r.get(0)
        })
        .unwrap();
    let mut forged = event(1000);
    forged.id = "019ae000-0000-7000-8000-000000000001".into();
    let body = forged.canonical_bytes();
    let hash = link(&prev.clone().try_into().unwrap(), &body);
    db.execute(
        "INSERT INTO audit (seq, event_id, at, subject, action, resource_id, patient, break_glass,
         body, prev, hash) VALUES (?1, '', '', '', '', '', NULL, 0, ?2, ?3, ?4)",
        rusqlite::params![after + 1, body, prev, &hash[..]],
    )
    .unwrap();
    set_columns(db, after + 1, &forged);
}

#[tokio::test]
async fn an_inserted_event_is_detected() {
    let t = trail(60, 20).await;
    let db = attacker(&t.db());
    insert_forged(&db, 10);
    let r = verify(&t).await;
    // The event after the forged one no longer follows it.
    assert_eq!(kind(&r), BreakKind::EventUnlinked);
    assert_eq!(r.first_break.unwrap().seq, Some(12));
}

#[tokio::test]
async fn an_inserted_event_with_the_chain_recomputed_is_detected() {
    let t = trail(60, 20).await;
    let db = attacker(&t.db());
    insert_forged(&db, 10);
    rechain(&db);
    let r = verify(&t).await;
    assert_eq!(kind(&r), BreakKind::CheckpointRoot);
    assert_eq!(r.first_break.unwrap().checkpoint, Some(1));
    assert_eq!(r.events_sealed, 0);
}

fn swap(db: &rusqlite::Connection, a: i64, b: i64) {
    db.execute_batch(&format!(
        "UPDATE audit SET seq = -1 WHERE seq = {a};
         UPDATE audit SET seq = {a} WHERE seq = {b};
         UPDATE audit SET seq = {b} WHERE seq = -1;"
    ))
    .unwrap();
}

#[tokio::test]
async fn two_reordered_events_are_detected() {
    let t = trail(60, 20).await;
    let db = attacker(&t.db());
    swap(&db, 44, 45);
    let r = verify(&t).await;
    assert_eq!(kind(&r), BreakKind::EventUnlinked);
    assert_eq!(r.first_break.unwrap().seq, Some(44));
}

#[tokio::test]
async fn two_reordered_events_with_the_chain_recomputed_are_detected() {
    let t = trail(60, 20).await;
    let db = attacker(&t.db());
    swap(&db, 44, 45);
    rechain(&db);
    let r = verify(&t).await;
    assert_eq!(kind(&r), BreakKind::CheckpointRoot);
    assert_eq!(r.first_break.unwrap().checkpoint, Some(3));
    assert_eq!(r.events_sealed, 40);
}

#[tokio::test]
async fn a_truncated_end_is_detected_by_the_last_checkpoint() {
    let t = trail(60, 20).await;
    let db = attacker(&t.db());
    db.execute("DELETE FROM audit WHERE seq > 55", []).unwrap();
    let r = verify(&t).await;
    assert_eq!(kind(&r), BreakKind::Truncated);
    let b = r.first_break.unwrap();
    assert_eq!(b.checkpoint, Some(3));
    assert!(b.sentence.contains("ends at event 55"), "{}", b.sentence);
    assert_eq!(r.events, 55);
    assert_eq!(r.events_sealed, 40);
}

#[tokio::test]
async fn a_trail_cut_back_to_an_earlier_checkpoint_is_detected() {
    let t = trail(60, 20).await;
    let db = attacker(&t.db());
    db.execute("DELETE FROM audit WHERE seq > 40", []).unwrap();
    let r = verify(&t).await;
    assert_eq!(kind(&r), BreakKind::Truncated);
    assert_eq!(r.first_break.unwrap().checkpoint, Some(3));
}

#[tokio::test]
async fn a_checkpoint_replaced_by_another_validly_signed_one_is_detected() {
    let t = trail(60, 20).await;
    // Another trail sealed with the same key: its checkpoint 2 is genuine, but not ours.
    let other = trail(45, 20).await;
    let signer = LocalSigner::open_or_create(&t.dir.path().join("keys/audit-signing.pk8")).unwrap();
    let forged_cp2 = {
        let mut cp =
            Checkpoint::from_json(&other.store.checkpoints().await.unwrap()[1].body).unwrap();
        cp.key_id = signer.key_id().into();
        cp.signature = signer.sign(&cp.signing_input()).await.unwrap();
        cp.to_json()
    };
    let db = attacker(&t.db());
    db.execute(
        "UPDATE checkpoints SET body = ?1 WHERE number = 2",
        rusqlite::params![forged_cp2],
    )
    .unwrap();
    let r = verify(&t).await;
    assert_eq!(kind(&r), BreakKind::CheckpointUnlinked);
    assert_eq!(r.first_break.unwrap().checkpoint, Some(2));
}

#[tokio::test]
async fn a_checkpoint_with_a_changed_root_fails_its_signature() {
    let t = trail(60, 20).await;
    let db = attacker(&t.db());
    let row = &t.store.checkpoints().await.unwrap()[0];
    let mut cp = Checkpoint::from_json(&row.body).unwrap();
    cp.root[0] ^= 0xff;
    db.execute(
        "UPDATE checkpoints SET body = ?1 WHERE number = 1",
        rusqlite::params![cp.to_json()],
    )
    .unwrap();
    let r = verify(&t).await;
    assert_eq!(kind(&r), BreakKind::CheckpointSignature);
    assert_eq!(r.first_break.unwrap().checkpoint, Some(1));
}

#[tokio::test]
async fn a_checkpoint_row_whose_range_was_edited_is_detected() {
    let t = trail(60, 20).await;
    let db = attacker(&t.db());
    db.execute("UPDATE checkpoints SET last_seq = 30 WHERE number = 1", [])
        .unwrap();
    let r = verify(&t).await;
    assert_eq!(kind(&r), BreakKind::CheckpointUnreadable);
}

/// The careful attacker with their own key: edits an event, recomputes the chain, the roots and
/// every checkpoint from there, all consistently linked, and signs them with a key of their own.
#[tokio::test]
async fn checkpoints_resigned_with_another_key_fail_against_the_trusted_key() {
    let t = trail(60, 20).await;
    let rogue_dir = tempfile::tempdir().unwrap();
    let rogue = LocalSigner::open_or_create(&rogue_dir.path().join("rogue.pk8")).unwrap();
    let db = attacker(&t.db());
    let edited = String::from_utf8(body(&db, 27))
        .unwrap()
        .replace("\"read\"", "\"create\"");
    set_body(&db, 27, edited.as_bytes());
    reindex(&db, 27);
    rechain(&db);
    // Rebuild every checkpoint over the rewritten trail.
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
        cp.chain_head = events.last().unwrap().hash;
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
    let r = verify(&t).await;
    assert_eq!(kind(&r), BreakKind::CheckpointSignature);
    assert_eq!(r.first_break.unwrap().checkpoint, Some(1));
    // With the rogue key (or no key) the forgery is self-consistent: only the trusted public
    // key, kept apart from the data, tells them apart.
    let with_rogue = verify_trail(&t.reopen(), Some(&rogue.public_key()))
        .await
        .unwrap();
    assert!(with_rogue.ok);
    let unchecked = verify_trail(&t.reopen(), None).await.unwrap();
    assert!(unchecked.ok && !unchecked.signatures_checked);
}

#[test]
fn verification_also_runs_outside_a_tokio_runtime() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let t = rt.block_on(trail(9000, 5000));
    drop(rt);
    let r = block_on(verify_trail(&t.store, Some(&t.key()))).unwrap();
    assert!(r.ok && r.events == 9000 && r.events_sealed == 5000, "{r:?}");
    let db = attacker(&t.db());
    let edited = String::from_utf8(body(&db, 4500))
        .unwrap()
        .replace("rx-4500", "rx-5400");
    set_body(&db, 4500, edited.as_bytes());
    reindex(&db, 4500);
    rechain(&db);
    let r = block_on(verify_trail(&t.reopen(), Some(&t.key()))).unwrap();
    assert_eq!(kind(&r), BreakKind::CheckpointRoot);
}

#[tokio::test]
async fn a_break_in_a_later_page_is_found_and_named() {
    // More events than a page, so the break is found while the next page is being read.
    let n = rx_fn_audit::PAGE as u64 * 3;
    let t = trail(n, n).await;
    let db = attacker(&t.db());
    let seq = rx_fn_audit::PAGE as i64 * 2 + 7;
    let edited = String::from_utf8(body(&db, seq))
        .unwrap()
        .replace(&format!("rx-{seq}\""), "rx-x\"");
    set_body(&db, seq, edited.as_bytes());
    let r = verify(&t).await;
    assert_eq!(kind(&r), BreakKind::EventAltered);
    assert_eq!(r.first_break.unwrap().seq, Some(seq as u64));
    assert_eq!(r.events, seq as u64 - 1);
}
