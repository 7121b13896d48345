//! commit() of one change set (1 insert + 2 audit events) inside a batch, as the pipeline does.
//!
//! `cargo bench -p rx-store --bench sqlite`

use std::sync::atomic::{AtomicU64, Ordering};

use chrono::Utc;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rx_guard::audit::{Action, Actor, AuditEvent, Purpose, ResourceRef};
use rx_store::sqlite::SqliteStore;
use rx_store::{Changes, RecordStore, Row, Table, Write};

fn change_set(n: u64) -> Changes {
    let id = format!("0190{n:028x}");
    let now = Utc::now();
    let row = Row {
        table: Table::Prescriptions,
        id: id.clone(),
        tenant: "pharmacy-1".into(),
        status: "received".into(),
        version: 1,
        created_at: now,
        updated_at: now,
        index: Some(vec![7u8; 32]),
        key: Some(n.to_be_bytes().repeat(4)),
        sealed: vec![0xA5; 1024],
    };
    let actor = Actor {
        subject: "system:intake".into(),
        role: "service".into(),
        tenant: "pharmacy-1".into(),
    };
    let resource = ResourceRef {
        kind: "MedicationRequest".into(),
        id,
    };
    let mut create = AuditEvent::new(
        actor.clone(),
        Action::Create,
        resource.clone(),
        "intake",
        Purpose::Treatment,
    );
    create.patient = Some("ab".repeat(32));
    let read = AuditEvent::new(actor, Action::Read, resource, "intake", Purpose::Treatment);
    Changes {
        writes: vec![Write::Insert(row)],
        transitions: vec![],
        audit: vec![create, read],
    }
}

fn commit_in_batch(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(&dir.path().join("bench.db")).expect("open store");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let counter = AtomicU64::new(0);
    let mut group = c.benchmark_group("sqlite");
    group.throughput(Throughput::Elements(1));
    group.bench_function("commit_1_insert_2_audit_in_batch", |b| {
        b.iter_custom(|iters| {
            // Change sets are built outside the timed part; batches of 1,000 like the pipeline.
            let sets: Vec<Changes> = (0..iters)
                .map(|_| change_set(counter.fetch_add(1, Ordering::Relaxed)))
                .collect();
            let start = std::time::Instant::now();
            store.begin_batch().expect("begin batch");
            for (i, set) in sets.into_iter().enumerate() {
                rt.block_on(store.commit(set)).expect("commit");
                if i % 1000 == 999 {
                    store.end_batch().expect("end batch");
                    store.begin_batch().expect("begin batch");
                }
            }
            store.end_batch().expect("end batch");
            start.elapsed()
        })
    });
    group.finish();
}

criterion_group!(benches, commit_in_batch);
criterion_main!(benches);
