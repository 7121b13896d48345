//! Sealing 1,000,000 audit events into one checkpoint, and verifying the sealed trail, on a real
//! SQLite file. `cargo bench -p rx-fn-seal` (about a minute and a half; set
//! `RXFLOW_BENCH_EVENTS` to try another size). Prints its own summary at the end.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use rx_fn_audit::verify_trail;
use rx_fn_seal::seal;
use rx_guard::audit::{Action, Actor, AuditEvent, AuditSink, Purpose, ResourceRef};
use rx_guard::merkle::{CheckpointSigner, LocalSigner};
use rx_store::sqlite::SqliteStore;
use rx_store::RecordStore;

fn events() -> u64 {
    std::env::var("RXFLOW_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

/// A realistic PHI-free event (about 400 bytes of canonical JSON).
fn event(i: u64) -> AuditEvent {
    let mut e = AuditEvent::new(
        Actor {
            subject: format!("auth0|{:024x}", i % 97),
            role: "pharmacist".into(),
            tenant: "pharmacy-0001".into(),
        },
        if i.is_multiple_of(10) {
            Action::Update
        } else {
            Action::Read
        },
        ResourceRef {
            kind: "MedicationRequest".into(),
            id: uuid::Uuid::now_v7().to_string(),
        },
        "records",
        Purpose::Treatment,
    );
    e.at = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
        + chrono::Duration::milliseconds(i as i64);
    e.patient = Some(format!("{:064x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    e.source_ip = Some("10.0.12.34".into());
    e
}

fn bench(c: &mut Criterion) {
    let n = events();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("tokio runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("rxflow.db");
    let store = SqliteStore::open(&db).expect("store");
    let signer = LocalSigner::open_or_create(&dir.path().join("keys/audit-signing.pk8"))
        .expect("signing key");

    let started = Instant::now();
    store.begin_batch().expect("batch");
    let mut i = 1;
    while i <= n {
        let end = (i + 9_999).min(n);
        let chunk: Vec<_> = (i..=end).map(event).collect();
        rt.block_on(store.append(&chunk)).expect("append");
        i = end + 1;
    }
    store.end_batch().expect("batch");
    let body_bytes = event(1).canonical_bytes().len();
    println!(
        "setup: appended {n} events (~{body_bytes} bytes each) in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Sealing can only run once per new event, so each iteration first removes the checkpoint
    // the previous one stored (untimed, straight in the file, as only a benchmark may).
    let reset = rusqlite::Connection::open(&db).expect("second connection");
    reset
        .execute_batch("DROP TRIGGER checkpoints_no_delete;")
        .expect("drop trigger");
    let seal_times = RefCell::new(Vec::new());
    let verify_times = RefCell::new(Vec::new());
    let read_times = RefCell::new(Vec::new());

    let mut group = c.benchmark_group("audit");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1))
        .throughput(Throughput::Elements(n));
    group.bench_function(format!("seal {n} events"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                reset
                    .execute("DELETE FROM checkpoints", [])
                    .expect("reset checkpoints");
                let t = Instant::now();
                let cp = rt.block_on(seal(&store, &signer)).expect("seal");
                let took = t.elapsed();
                assert_eq!(cp.map(|c| c.tree_size), Some(n));
                seal_times.borrow_mut().push(took);
                total += took;
            }
            total
        })
    });
    let key = signer.public_key();
    group.bench_function(format!("verify {n} sealed events"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                let report = rt
                    .block_on(verify_trail(&store, Some(&key)))
                    .expect("verify");
                let took = t.elapsed();
                assert!(report.ok && report.events_sealed == n, "{report:?}");
                verify_times.borrow_mut().push(took);
                total += took;
            }
            total
        })
    });
    // The floor: paging through the trail without hashing anything.
    group.bench_function(format!("read {n} events (store floor)"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                let mut next = 1;
                let mut bytes = 0usize;
                loop {
                    let page = rt
                        .block_on(store.audit_range(next, rx_fn_audit::PAGE))
                        .expect("read");
                    let Some(last) = page.last() else { break };
                    next = last.seq + 1;
                    bytes += page.iter().map(|e| e.body.len()).sum::<usize>();
                }
                let took = t.elapsed();
                assert!(bytes > 0);
                read_times.borrow_mut().push(took);
                total += took;
            }
            total
        })
    });
    group.finish();

    let summary = |name: &str, times: &[Duration]| {
        if times.is_empty() {
            return;
        }
        let mean = times.iter().sum::<Duration>().as_secs_f64() / times.len() as f64;
        let best = times
            .iter()
            .min()
            .copied()
            .unwrap_or_default()
            .as_secs_f64();
        println!(
            "{name}: {n} events, mean {mean:.3} s ({:.0} events/s), best {best:.3} s ({:.0} events/s), {} runs",
            n as f64 / mean,
            n as f64 / best,
            times.len()
        );
    };
    summary("seal", &seal_times.borrow());
    summary("verify", &verify_times.borrow());
    summary("read only", &read_times.borrow());
}

criterion_group!(benches, bench);
criterion_main!(benches);
