//! Sealing against a real SQLite file: what a checkpoint covers, how checkpoints chain, and what
//! sealing refuses to vouch for.

use chrono::{Duration, TimeZone, Utc};
use rx_fn_seal::{seal, SealError, PAGE};
use rx_guard::audit::{Action, Actor, AuditEvent, AuditSink, Purpose, ResourceRef};
use rx_guard::merkle::{checkpoint_hash, Checkpoint, CheckpointSigner, LocalSigner, TreeBuilder};
use rx_store::sqlite::SqliteStore;
use rx_store::RecordStore;

fn event(i: u64) -> AuditEvent {
    let mut e = AuditEvent::new(
        Actor {
            subject: format!("user-{}", i % 7),
            role: "technician".into(),
            tenant: "t1".into(),
        },
        Action::Read,
        ResourceRef {
            kind: "MedicationRequest".into(),
            id: format!("rx-{i}"),
        },
        "records",
        Purpose::Treatment,
    );
    e.at = Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap() + Duration::seconds(i as i64);
    e
}

struct Setup {
    dir: tempfile::TempDir,
    store: SqliteStore,
    signer: LocalSigner,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("rxflow.db")).unwrap();
    let signer = LocalSigner::open_or_create(&dir.path().join("keys/audit-signing.pk8")).unwrap();
    Setup { dir, store, signer }
}

async fn append(store: &SqliteStore, range: std::ops::RangeInclusive<u64>) {
    let events: Vec<_> = range.map(event).collect();
    store.append(&events).await.unwrap();
}

#[tokio::test]
async fn nothing_to_seal_gives_none() {
    let s = setup();
    assert!(seal(&s.store, &s.signer).await.unwrap().is_none());
    assert!(s.store.checkpoints().await.unwrap().is_empty());
}

#[tokio::test]
async fn the_first_checkpoint_covers_every_event_and_is_signed() {
    let s = setup();
    append(&s.store, 1..=37).await;
    let cp = seal(&s.store, &s.signer).await.unwrap().unwrap();
    let events = s.store.audit_range(1, 100).await.unwrap();
    let mut tree = TreeBuilder::new();
    events.iter().for_each(|e| tree.push_event(&e.hash));
    assert_eq!(
        (cp.number, cp.first_seq, cp.last_seq, cp.tree_size),
        (1, 1, 37, 37)
    );
    assert_eq!(cp.root, tree.root());
    assert_eq!(cp.chain_head, events[36].hash);
    assert_eq!(cp.prev_checkpoint_hash, [0u8; 32]);
    assert_eq!(cp.key_id, s.signer.key_id());
    cp.verify_signature(&s.signer.public_key()).unwrap();

    let rows = s.store.checkpoints().await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].number, rows[0].first_seq, rows[0].last_seq),
        (1, 1, 37)
    );
    assert_eq!(Checkpoint::from_json(&rows[0].body).unwrap(), cp);
}

#[tokio::test]
async fn each_checkpoint_covers_only_new_events_and_chains_to_the_last() {
    let s = setup();
    append(&s.store, 1..=10).await;
    seal(&s.store, &s.signer).await.unwrap().unwrap();
    assert!(
        seal(&s.store, &s.signer).await.unwrap().is_none(),
        "no new events"
    );
    append(&s.store, 11..=15).await;
    let second = seal(&s.store, &s.signer).await.unwrap().unwrap();
    assert_eq!(
        (second.number, second.first_seq, second.last_seq),
        (2, 11, 15)
    );
    let rows = s.store.checkpoints().await.unwrap();
    assert_eq!(second.prev_checkpoint_hash, checkpoint_hash(&rows[0].body));

    let report = rx_fn_audit::verify_trail(&s.store, Some(&s.signer.public_key()))
        .await
        .unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!((report.events_sealed, report.checkpoints), (15, 2));
}

#[tokio::test]
async fn a_checkpoint_larger_than_a_page_is_sealed_in_one_pass() {
    let s = setup();
    let n = PAGE as u64 * 2 + 17;
    let mut i = 1;
    while i <= n {
        let end = (i + 999).min(n);
        append(&s.store, i..=end).await;
        i = end + 1;
    }
    let cp = seal(&s.store, &s.signer).await.unwrap().unwrap();
    assert_eq!(cp.tree_size, n);
    let report = rx_fn_audit::verify_trail(&s.store, Some(&s.signer.public_key()))
        .await
        .unwrap();
    assert!(report.ok && report.events_sealed == n, "{report:?}");
}

fn attacker(s: &Setup) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(s.dir.path().join("rxflow.db")).unwrap();
    conn.execute_batch("DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete;")
        .unwrap();
    conn
}

#[tokio::test]
async fn sealing_refuses_to_vouch_for_an_edited_event() {
    let s = setup();
    append(&s.store, 1..=10).await;
    seal(&s.store, &s.signer).await.unwrap().unwrap();
    append(&s.store, 11..=20).await;
    attacker(&s)
        .execute(
            "UPDATE audit SET body = CAST(REPLACE(CAST(body AS TEXT), 'rx-14', 'rx-41') AS BLOB) \
             WHERE seq = 14",
            [],
        )
        .unwrap();
    let store = SqliteStore::open(&s.dir.path().join("rxflow.db")).unwrap();
    match seal(&store, &s.signer).await {
        Err(e @ SealError::ChainBroken(_)) => {
            let msg = e.to_string();
            assert!(
                msg.contains("14") && msg.contains("rxflow audit verify"),
                "{msg}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(store.checkpoints().await.unwrap().len(), 1);
}

#[tokio::test]
async fn sealing_refuses_a_trail_cut_below_its_last_checkpoint() {
    let s = setup();
    append(&s.store, 1..=10).await;
    seal(&s.store, &s.signer).await.unwrap().unwrap();
    attacker(&s)
        .execute("DELETE FROM audit WHERE seq > 8", [])
        .unwrap();
    let store = SqliteStore::open(&s.dir.path().join("rxflow.db")).unwrap();
    assert!(matches!(
        seal(&store, &s.signer).await,
        Err(SealError::ChainBroken(_))
    ));
}

#[test]
fn sealing_also_runs_outside_a_tokio_runtime() {
    use std::future::Future;
    use std::sync::Arc;
    use std::task::{Context, Poll, Wake};
    struct Noop;
    impl Wake for Noop {
        fn wake(self: Arc<Self>) {}
    }
    let waker = Arc::new(Noop).into();
    let mut cx = Context::from_waker(&waker);
    let s = setup();
    let events: Vec<_> = (1..=20_000).map(event).collect();
    let mut append = std::pin::pin!(s.store.append(&events));
    assert!(matches!(append.as_mut().poll(&mut cx), Poll::Ready(Ok(()))));
    let mut sealing = std::pin::pin!(seal(&s.store, &s.signer));
    let Poll::Ready(Ok(Some(cp))) = sealing.as_mut().poll(&mut cx) else {
        panic!("sealing on a ready store completes at once with a checkpoint");
    };
    assert_eq!(cp.tree_size, 20_000);
}

#[tokio::test]
async fn the_embedded_signer_lives_in_the_data_directory_keys() {
    let dir = tempfile::tempdir().unwrap();
    let signer = rx_fn_seal::local_signer(dir.path()).unwrap();
    assert!(dir.path().join("keys/audit-signing.pk8").is_file());
    assert!(dir.path().join("keys/audit-signing.pub").is_file());
    let again = rx_fn_seal::local_signer(dir.path()).unwrap();
    assert_eq!(signer.public_key(), again.public_key());
}
