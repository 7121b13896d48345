//! A real SQLite trail with signed checkpoints, and the attacker who edits the file directly.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use chrono::{DateTime, Duration, TimeZone, Utc};
use rx_guard::audit::chain::{link, GENESIS};
use rx_guard::audit::{Action, Actor, AuditEvent, AuditSink, Purpose, ResourceRef};
use rx_guard::merkle::{CheckpointSigner, LocalSigner};
use rx_store::sqlite::SqliteStore;
use rx_store::RecordStore;

pub struct Trail {
    pub dir: tempfile::TempDir,
    pub store: SqliteStore,
    pub signer: LocalSigner,
}

impl Trail {
    pub fn db(&self) -> PathBuf {
        self.dir.path().join("rxflow.db")
    }

    pub fn key(&self) -> Vec<u8> {
        self.signer.public_key()
    }

    /// Reopen the store (after the attacker edited the file).
    pub fn reopen(&self) -> SqliteStore {
        SqliteStore::open(&self.db()).unwrap()
    }
}

pub fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 1, 9, 0, 0).unwrap()
}

/// A PHI-free event number `i`: who, what, which record, by blind index.
pub fn event(i: u64) -> AuditEvent {
    let mut e = AuditEvent::new(
        Actor {
            subject: format!("user-{}", i % 3),
            role: "pharmacist".into(),
            tenant: "t1".into(),
        },
        if i.is_multiple_of(5) {
            Action::Disclose
        } else {
            Action::Read
        },
        ResourceRef {
            kind: "MedicationRequest".into(),
            id: format!("rx-{i}"),
        },
        "records",
        Purpose::Treatment,
    );
    e.at = t0() + Duration::seconds(i as i64);
    e.patient = Some(format!("{:064x}", i % 4));
    e
}

/// `n` events, sealed after every `seal_every` (the rest left unsealed).
pub async fn trail(n: u64, seal_every: u64) -> Trail {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("rxflow.db")).unwrap();
    let signer = LocalSigner::open_or_create(&dir.path().join("keys/audit-signing.pk8")).unwrap();
    let mut i = 1;
    while i <= n {
        let end = (i + seal_every - 1).min(n);
        let events: Vec<_> = (i..=end).map(event).collect();
        store.append(&events).await.unwrap();
        if end - i + 1 == seal_every {
            rx_fn_seal::seal(&store, &signer).await.unwrap().unwrap();
        }
        i = end + 1;
    }
    Trail { dir, store, signer }
}

/// The attacker: opens the file with plain SQLite and drops the append-only triggers.
pub fn attacker(db: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.execute_batch(
        "DROP TRIGGER IF EXISTS audit_no_update; DROP TRIGGER IF EXISTS audit_no_delete;
         DROP TRIGGER IF EXISTS checkpoints_no_update; DROP TRIGGER IF EXISTS checkpoints_no_delete;",
    )
    .unwrap();
    conn
}

/// The careful attacker: recomputes every prev/hash so the chain alone verifies again.
pub fn rechain(conn: &rusqlite::Connection) {
    let rows: Vec<(i64, Vec<u8>)> = conn
        .prepare("SELECT seq, body FROM audit ORDER BY seq")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut prev = GENESIS;
    for (seq, body) in rows {
        let hash = link(&prev, &body);
        conn.execute(
            "UPDATE audit SET prev = ?1, hash = ?2 WHERE seq = ?3",
            rusqlite::params![&prev[..], &hash[..], seq],
        )
        .unwrap();
        prev = hash;
    }
}

/// Renumbers the events 1..n in their current seq order.
pub fn renumber(conn: &rusqlite::Connection) {
    let seqs: Vec<i64> = conn
        .prepare("SELECT seq FROM audit ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    conn.execute("UPDATE audit SET seq = -seq", []).unwrap();
    for (i, seq) in seqs.iter().enumerate() {
        conn.execute(
            "UPDATE audit SET seq = ?1 WHERE seq = ?2",
            rusqlite::params![i as i64 + 1, -seq],
        )
        .unwrap();
    }
}

pub fn body(conn: &rusqlite::Connection, seq: i64) -> Vec<u8> {
    conn.query_row("SELECT body FROM audit WHERE seq = ?1", [seq], |r| r.get(0))
        .unwrap()
}

pub fn set_body(conn: &rusqlite::Connection, seq: i64, body: &[u8]) {
    conn.execute(
        "UPDATE audit SET body = ?1 WHERE seq = ?2",
        rusqlite::params![body, seq],
    )
    .unwrap();
}

/// The careful attacker's other step: rewrites event `seq`'s searchable columns from its (edited)
/// body, as the writer would have stored them.
pub fn reindex(conn: &rusqlite::Connection, seq: i64) {
    let e: AuditEvent = serde_json::from_slice(&body(conn, seq)).unwrap();
    set_columns(conn, seq, &e);
}

/// Sets event `seq`'s searchable columns to `e`'s values.
pub fn set_columns(conn: &rusqlite::Connection, seq: i64, e: &AuditEvent) {
    conn.execute(
        "UPDATE audit SET event_id = ?1, at = ?2, subject = ?3, action = ?4, resource_id = ?5,
         patient = ?6, break_glass = ?7 WHERE seq = ?8",
        rusqlite::params![
            e.id,
            e.at.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
            e.actor.subject,
            e.action.as_str(),
            e.resource.id,
            e.patient,
            e.break_glass,
            seq
        ],
    )
    .unwrap();
}

pub async fn events_len(store: &SqliteStore) -> u64 {
    store.audit_len().await.unwrap()
}

/// Polls a future to completion on this thread, with no Tokio runtime around (the SQLite store's
/// futures are ready at once).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    use std::sync::Arc;
    use std::task::{Context, Poll, Wake};
    struct Noop;
    impl Wake for Noop {
        fn wake(self: Arc<Self>) {}
    }
    let waker = Arc::new(Noop).into();
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}
