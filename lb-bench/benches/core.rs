//! Criterion benches of lb-core's hot and warm paths.
//!
//! - `lookup`: one flow key per iteration, round-robin over 4096 pre-generated
//!   keys, so the reported time is the time per flow key (target ≤ 10 ns).
//! - `build`: `MaglevTable::build` (targets: M = 65537, N = 1000 ≤ 5 ms;
//!   M = 655373, N = 1000 ≤ 60 ms).
//! - `swap`: `Published::publish` of prebuilt snapshots while one background
//!   thread keeps doing load + lookup.
//! - `udp_flow`: `UdpFlowTable::handle_datagram` on a table of 50,000 flows:
//!   a datagram of an existing flow (round-robin over all of them, so most
//!   miss the cache as a busy worker's would), and a new flow that evicts the
//!   least recently seen one (the table stays full), events drained.
//! - `tcp_flow`: one `TcpFlow`'s whole life as an engine would drive it, every
//!   operation drained: accept, connect, a request one way and an answer the
//!   other (the answer's FIN known to follow, so its write corked), both FINs
//!   with half-close, the close: the decision cost per connection.
//!
//! Run: `cargo bench -p lb-bench --bench core -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use lb_bench::{backend_set, flow_keys};
use lb_core::tcp_flow::{ConnectResult, Side, TcpFlow, TcpFlowConfig};
use lb_core::{
    flow_hash, DistributionMode, FlowDecision, FlowKey, MaglevTable, Published, Snapshot,
    SnapshotParams, UdpFlowConfig, UdpFlowTable, DEFAULT_TABLE_SIZE, FLOW_HASH_SEED,
};

const KEYS: usize = 4096;

fn snapshot(generation: u64, n: usize, table_size: u32) -> Snapshot {
    let set = backend_set(n, 1);
    let params = SnapshotParams {
        table_size,
        ..SnapshotParams::default()
    };
    Snapshot::build(generation, params, set, vec![true; n]).expect("valid snapshot")
}

/// Round-robin over the key array; `KEYS` is a power of two.
#[inline(always)]
fn next_key<'a>(keys: &'a [FlowKey], i: &mut usize) -> &'a FlowKey {
    *i = (*i + 1) & (KEYS - 1);
    &keys[*i]
}

fn lookup(c: &mut Criterion) {
    let keys = flow_keys(KEYS, 0x5eed);
    let mut group = c.benchmark_group("lookup");
    group.throughput(Throughput::Elements(1));

    group.bench_function("flow_hash", |b| {
        let mut i = 0;
        b.iter(|| {
            flow_hash(
                black_box(next_key(&keys, &mut i)),
                DistributionMode::FiveTuple,
                FLOW_HASH_SEED,
            )
        })
    });

    for n in [3usize, 100, 1000] {
        let snap = snapshot(1, n, DEFAULT_TABLE_SIZE);
        group.bench_with_input(
            BenchmarkId::new("snapshot_lookup/M65537", n),
            &snap,
            |b, snap| {
                let mut i = 0;
                b.iter(|| snap.lookup(black_box(next_key(&keys, &mut i))))
            },
        );
    }

    // Throughput: a batch of 4096 different flows per iteration, so criterion's
    // per-iteration overhead is amortised and independent lookups can overlap,
    // as they do when a worker routes a burst of new flows.
    group.throughput(Throughput::Elements(KEYS as u64));
    for n in [3usize, 1000] {
        let snap = snapshot(1, n, DEFAULT_TABLE_SIZE);
        group.bench_with_input(
            BenchmarkId::new("snapshot_lookup_batch/M65537", n),
            &snap,
            |b, snap| {
                b.iter(|| {
                    let mut acc = 0u32;
                    for key in black_box(&keys).iter() {
                        acc = acc.wrapping_add(snap.lookup(key).unwrap_or(0));
                    }
                    acc
                })
            },
        );
    }
    group.throughput(Throughput::Elements(1));

    // The table half of a lookup alone, over pre-computed hashes.
    let snap = snapshot(1, 1000, DEFAULT_TABLE_SIZE);
    let hashes: Vec<u64> = keys.iter().map(|k| snap.hash(k)).collect();
    group.bench_function("table_lookup_prehashed/M65537/1000", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) & (KEYS - 1);
            snap.table().lookup(black_box(hashes[i]))
        })
    });

    for n in [3usize, 1000] {
        let cell = Published::new(snapshot(1, n, DEFAULT_TABLE_SIZE));
        group.bench_with_input(
            BenchmarkId::new("cell_load_lookup/M65537", n),
            &cell,
            |b, cell| {
                let mut i = 0;
                b.iter(|| cell.load().lookup(black_box(next_key(&keys, &mut i))))
            },
        );
    }

    let snap = snapshot(1, 100, DEFAULT_TABLE_SIZE);
    group.bench_function("choices_all/M65537/100", |b| {
        let mut i = 0;
        b.iter(|| {
            snap.choices(black_box(next_key(&keys, &mut i)))
                .fold(0u32, |acc, id| acc ^ id)
        })
    });
    group.finish();
}

fn build(c: &mut Criterion) {
    let mut group = c.benchmark_group("build");
    group.sample_size(10);
    for (size, n) in [
        (65_537u32, 3usize),
        (65_537, 100),
        (65_537, 1000),
        (655_373, 1000),
    ] {
        let set = backend_set(n, 1);
        let backends: Vec<(&str, u32)> = set.iter().map(|b| (b.name.as_str(), b.weight)).collect();
        group.bench_with_input(
            BenchmarkId::new(format!("M{size}"), n),
            &backends,
            |b, backends| {
                b.iter(|| MaglevTable::build(black_box(size), backends.iter().copied()).unwrap())
            },
        );
    }
    group.finish();
}

fn swap(c: &mut Criterion) {
    // Small snapshots so a batch of clones stays cheap to hold; publish cost does
    // not depend on the table's size (it moves a Box and allocates one Arc).
    const SIZE: u32 = 4_093;
    const N: usize = 100;
    let cell = Arc::new(Published::new(snapshot(0, N, SIZE)));
    let prebuilt = [snapshot(1, N, SIZE), snapshot(2, N, SIZE)];
    let stop = Arc::new(AtomicBool::new(false));
    let reader_loads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (cell, stop, loads) = (cell.clone(), stop.clone(), reader_loads.clone());
        thread::spawn(move || {
            let keys = flow_keys(KEYS, 0xbeef);
            let mut i = 0;
            let mut count = 0u64;
            while !stop.load(Ordering::Relaxed) {
                black_box(cell.load().lookup(next_key(&keys, &mut i)));
                count += 1;
            }
            loads.store(count, Ordering::Relaxed);
        })
    };

    let mut group = c.benchmark_group("swap");
    let mut which = 0;
    // The replaced Arc is returned, so criterion drops it outside the timing.
    group.bench_function("publish/with_1_reader", |b| {
        b.iter_batched(
            || {
                which ^= 1;
                prebuilt[which].clone()
            },
            |snap| cell.publish(snap),
            BatchSize::NumIterations(1024),
        )
    });
    // The same, freeing the replaced snapshot inside the timing (the writer's real cost).
    group.bench_function("publish_and_drop_old/with_1_reader", |b| {
        b.iter_batched(
            || {
                which ^= 1;
                prebuilt[which].clone()
            },
            |snap| drop(cell.publish(snap)),
            BatchSize::NumIterations(1024),
        )
    });
    group.finish();

    stop.store(true, Ordering::Relaxed);
    reader.join().expect("reader panicked");
    eprintln!(
        "swap: background reader made {} load+lookup calls",
        reader_loads.load(Ordering::Relaxed)
    );
}

/// Flows in the `udp_flow` tables: a worker's share of a large frontend.
const UDP_FLOWS: usize = 50_000;

/// A full table of `UDP_FLOWS` flows over 100 backends, and the flows' keys.
fn udp_flow_table(snap: &Snapshot) -> (UdpFlowTable, Vec<FlowKey>) {
    let config = UdpFlowConfig {
        capacity: UDP_FLOWS,
        idle_timeout: Duration::from_secs(240),
    };
    let mut table = UdpFlowTable::new(config, [1, 2, 3, 4]);
    let keys: Vec<FlowKey> = flow_keys(UDP_FLOWS, 0x0d0d)
        .into_iter()
        .map(|k| FlowKey::udp(k.src, k.dst))
        .collect();
    for key in &keys {
        let decision = table.handle_datagram(key, snap, Duration::ZERO);
        assert!(matches!(decision, FlowDecision::New { .. }), "{decision:?}");
    }
    assert_eq!(table.len(), UDP_FLOWS, "the generated keys are distinct");
    (table, keys)
}

/// A UDP flow key no earlier call made: 10.x.y.z from the counter's high bits, port from its low.
fn fresh_udp_key(n: u64) -> FlowKey {
    let ip = std::net::Ipv4Addr::from(0x0a00_0000 | (n >> 16) as u32);
    FlowKey::udp(
        std::net::SocketAddr::from((ip, n as u16)),
        std::net::SocketAddr::from(([127, 0, 0, 1], 53)),
    )
}

fn udp_flow(c: &mut Criterion) {
    let snap = snapshot(1, 100, DEFAULT_TABLE_SIZE);
    let mut group = c.benchmark_group("udp_flow");
    group.throughput(Throughput::Elements(1));
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(2));

    let (mut table, keys) = udp_flow_table(&snap);
    group.bench_function("existing/50k", |b| {
        let mut i = 0;
        b.iter(|| {
            i = if i + 1 == keys.len() { 0 } else { i + 1 };
            table.handle_datagram(black_box(&keys[i]), &snap, Duration::from_secs(1))
        })
    });

    let (mut table, _) = udp_flow_table(&snap);
    group.bench_function("new_evicting/50k", |b| {
        // Time moves on by a microsecond per flow, so the oldest is the one evicted.
        let mut n = 0u64;
        b.iter(|| {
            n += 1;
            let now = Duration::from_secs(1) + Duration::from_micros(n);
            let d = table.handle_datagram(black_box(&fresh_udp_key(n)), &snap, now);
            while table.poll_event().is_some() {}
            d
        })
    });
    assert_eq!(
        table.len(),
        UDP_FLOWS,
        "eviction keeps the table at capacity"
    );
    group.finish();
}

/// One flow's life through the machine; returns the operations it asked for.
fn one_tcp_flow(config: TcpFlowConfig, now: Duration) -> usize {
    let mut ops = 0;
    let mut drain = |flow: &mut TcpFlow| {
        while let Some(op) = flow.poll_op() {
            black_box(op);
            ops += 1;
        }
    };
    let mut flow = TcpFlow::new(config, now);
    drain(&mut flow);
    flow.handle_connected(0, ConnectResult::Connected, now);
    drain(&mut flow);
    flow.handle_received(Side::Client, Ok(120), now);
    drain(&mut flow);
    flow.handle_sent(Side::Client, Ok(120), now);
    drain(&mut flow);
    flow.handle_received_before_fin(Side::Backend, 850, now);
    drain(&mut flow);
    flow.handle_sent(Side::Backend, Ok(850), now);
    drain(&mut flow);
    flow.handle_received(Side::Backend, Ok(0), now);
    drain(&mut flow);
    flow.handle_shut(Side::Client, Ok(()));
    drain(&mut flow);
    flow.handle_received(Side::Client, Ok(0), now);
    drain(&mut flow);
    assert!(flow.is_ended());
    ops
}

fn tcp_flow(c: &mut Criterion) {
    let config = TcpFlowConfig {
        half_close: true,
        idle_timeout: Duration::from_secs(240),
        clock_tick: Duration::from_millis(4),
        reset_on_idle: false,
        connect_timeout: Duration::from_secs(5),
        connect_attempts: 3,
        header_len: 0,
    };
    let mut g = c.benchmark_group("tcp_flow");
    g.throughput(Throughput::Elements(1));
    let mut now = Duration::from_secs(1);
    g.bench_function("connection_lifecycle", |b| {
        b.iter(|| {
            now += Duration::from_micros(40);
            black_box(one_tcp_flow(black_box(config), now))
        })
    });
    g.finish();
}

criterion_group!(benches, lookup, build, swap, udp_flow, tcp_flow);
criterion_main!(benches);
