//! CPU cost of one `/metrics` body with 100 backends, idle: the figure the
//! README's Metrics section quotes. (The cost under load, where the scrape also
//! waits for a core, is a row of BENCHMARKS.md, measured by `lb-bench report`
//! or on its own by `lb-bench metrics-cost`.)
//!
//! Run: `cargo bench -p lb-proxy --bench scrape -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use lb_proxy::metrics::Metrics;

fn populated(backends: usize) -> (Metrics, Vec<lb_proxy::metrics::BackendHandles>) {
    let metrics = Metrics::new();
    let fe = metrics.frontend("web");
    fe.connections.inc_by(123_456);
    let handles: Vec<_> = (0..backends)
        .map(|i| {
            let h = metrics.backend("web", &format!("node-{i:03}"));
            h.connections.inc_by(1000 + i as u64);
            h.received_bytes.inc_by(10_000_000 + i as u64);
            h.sent_bytes.inc_by(1_000_000 + i as u64);
            for k in 0..50 {
                h.connect_duration.observe(0.000_05 * (k as f64));
            }
            h.up.set(1);
            h.weight.set(1);
            h.table_slots.set(655);
            h
        })
        .collect();
    (metrics, handles)
}

fn scrape(c: &mut Criterion) {
    let (metrics, _handles) = populated(100);
    let mut group = c.benchmark_group("scrape");
    group.bench_function("encode/100_backends", |b| {
        b.iter(|| black_box(metrics.encode()))
    });
    // What a scrape cost when every family went through the crate's gather and
    // encoder (the direct writer's output is tested equal to this).
    group.bench_function("crate_gather_and_encode/100_backends", |b| {
        b.iter(|| {
            let mut out = String::new();
            let mut families = metrics.backend_registry.gather();
            families.extend(metrics.registry.gather());
            families.sort_by(|a, b| a.name().cmp(b.name()));
            prometheus::TextEncoder::new()
                .encode_utf8(&families, &mut out)
                .expect("encodable");
            black_box(out)
        })
    });
    group.finish();
}

criterion_group!(benches, scrape);
criterion_main!(benches);
