//! Builders and a chain checker shared by the sqlite_* tests.
#![allow(dead_code)]

use chrono::{DateTime, Duration, TimeZone, Utc};
use rx_guard::audit::{Action, Actor, AuditEvent, ChainedEvent, Purpose, ResourceRef};
use rx_store::sqlite::SqliteStore;
use rx_store::{Changes, Row, Table, Write};

pub fn open_temp() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("rx.db")).unwrap();
    (dir, store)
}

pub fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 3, 1, 12, 0, 0).unwrap()
}

pub fn row(table: Table, tenant: &str, id: &str) -> Row {
    Row {
        table,
        id: id.to_string(),
        tenant: tenant.to_string(),
        status: "received".to_string(),
        version: 1,
        created_at: t0(),
        updated_at: t0(),
        index: Some(b"patient-blind-index-1".to_vec()),
        key: Some(format!("key-{id}").into_bytes()),
        sealed: format!("sealed-{id}").into_bytes(),
    }
}

pub fn event(subject: &str, action: Action, resource_id: &str) -> AuditEvent {
    AuditEvent::new(
        Actor {
            subject: subject.to_string(),
            role: "pharmacist".to_string(),
            tenant: "pharmacy-1".to_string(),
        },
        action,
        ResourceRef {
            kind: "MedicationRequest".to_string(),
            id: resource_id.to_string(),
        },
        "test",
        Purpose::Treatment,
    )
}

pub fn event_at(subject: &str, action: Action, minutes: i64) -> AuditEvent {
    let mut e = event(subject, action, "rx-1");
    e.at = t0() + Duration::minutes(minutes);
    e
}

/// A new prescription `id` in tenant t1, created by `subject`: the change set most tests start
/// with.
pub fn create_rx(id: &str, subject: &str) -> Changes {
    insert(
        row(Table::Prescriptions, "t1", id),
        vec![event(subject, Action::Create, id)],
    )
}

pub fn insert(row: Row, audit: Vec<AuditEvent>) -> Changes {
    Changes {
        writes: vec![Write::Insert(row)],
        transitions: vec![],
        audit,
    }
}

/// The chain construction the store must use: SHA-256("rxflow-audit-v1" || prev || body).
pub fn link(prev: &[u8; 32], body: &[u8]) -> [u8; 32] {
    use aws_lc_rs::digest;
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(b"rxflow-audit-v1");
    ctx.update(prev);
    ctx.update(body);
    ctx.finish().as_ref().try_into().unwrap()
}

pub const GENESIS: [u8; 32] = [0u8; 32];

/// Checks seqs are 1..=n without gaps and every prev/hash link recomputes.
pub fn assert_chain_valid(events: &[ChainedEvent]) {
    let mut prev = GENESIS;
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1, "seq gap at position {i}");
        assert_eq!(
            e.prev_hash, prev,
            "prev hash of seq {} is not the hash before it",
            e.seq
        );
        assert_eq!(
            e.hash,
            link(&prev, &e.body),
            "hash of seq {} does not recompute",
            e.seq
        );
        prev = e.hash;
    }
}

/// The stored event bodies, decoded.
pub fn decode(events: &[ChainedEvent]) -> Vec<AuditEvent> {
    events
        .iter()
        .map(|e| serde_json::from_slice(&e.body).unwrap())
        .collect()
}
