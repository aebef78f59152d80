//! Cost of the verdict lookup store on the reply path (memory only): recording a 500-byte
//! verdict into a full store (so every insert also evicts the oldest) and a local lookup hit.
//!
//! `cargo bench --bench lookup`

use chatguard::lookup::{LookupConfig, VerdictLookup};
use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use tokio_tungstenite::tungstenite::Utf8Bytes;

fn bench(c: &mut Criterion) {
    let cfg = LookupConfig::default();
    let lookup = VerdictLookup::start(&cfg, None)
        .expect("lookup store starts")
        .expect("lookup enabled by default");
    let verdict = Utf8Bytes::from(format!(
        "{{\"type\":\"verdict\",\"pad\":\"{}\"}}",
        "x".repeat(480)
    ));
    let ids: Vec<String> = (0..2 * cfg.max_entries).map(|i| format!("m-{i}")).collect();
    // Fill the store to its bound first: steady state evicts on every insert.
    for id in &ids[..cfg.max_entries] {
        lookup.record("acme", id, &verdict);
    }
    let mut next = cfg.max_entries;
    let mut group = c.benchmark_group("lookup");
    group.bench_function("record_500B_full_store", |b| {
        b.iter(|| {
            let id = &ids[next % ids.len()];
            next += 1;
            lookup.record("acme", black_box(id), &verdict);
        })
    });
    let present: Vec<&String> = ids.iter().rev().take(1000).collect();
    let mut k = 0;
    group.bench_function("lookup_local_hit", |b| {
        b.iter(|| {
            k += 1;
            black_box(lookup.lookup_local("acme", present[k % present.len()]))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
