//! Sealing and opening a 1 KiB record with a cached data key (target ≤ 3 µs each), beside bare
//! AES-256-GCM on the same bytes for scale. `cargo bench -p rx-guard --bench envelope`.

use std::hint::black_box;
use std::sync::Arc;

use aws_lc_rs::aead::{Aad as GcmAad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rx_guard::envelope::{Aad, CacheLimits, Sealer};
use rx_guard::keys::LocalKeyProvider;

const HERE: Aad<'static> = Aad {
    tenant: "pharmacy-a",
    table: "prescriptions",
    record_id: "0193a1b2-7c4d-7e8f-9a0b-1c2d3e4f5a6b",
    field: "body",
};

fn envelope(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let provider = LocalKeyProvider::open_or_create(dir.path()).expect("key file");
    let sealer = Sealer::new(Arc::new(provider), CacheLimits::default());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let record = vec![0x5au8; 1024];
    let sealed = rt.block_on(sealer.seal(&HERE, &record)).expect("seal");
    // warm the opening cache
    rt.block_on(sealer.open(&HERE, &sealed)).expect("open");

    let mut g = c.benchmark_group("envelope-1KiB");
    g.throughput(Throughput::Bytes(1024));
    g.bench_function("seal (cached data key)", |b| {
        b.iter(|| rt.block_on(sealer.seal(black_box(&HERE), black_box(&record))))
    });
    g.bench_function("open (cached data key)", |b| {
        b.iter(|| rt.block_on(sealer.open(black_box(&HERE), black_box(&sealed))))
    });
    let uncached = Sealer::new(
        Arc::new(LocalKeyProvider::open_or_create(dir.path()).expect("key file")),
        CacheLimits::none(),
    );
    g.bench_function("seal (new data key each time)", |b| {
        b.iter(|| rt.block_on(uncached.seal(black_box(&HERE), black_box(&record))))
    });
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7u8; 32]).expect("key"));
    g.bench_function("bare AES-256-GCM seal", |b| {
        b.iter(|| {
            let mut buf = record.clone();
            key.seal_in_place_append_tag(
                Nonce::assume_unique_for_key([1u8; 12]),
                GcmAad::from(&b"aad"[..]),
                &mut buf,
            )
            .expect("seal");
            black_box(buf)
        })
    });
    g.finish();
}

criterion_group!(benches, envelope);
criterion_main!(benches);
