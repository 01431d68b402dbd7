//! The data-plane hot path allocates nothing: hashing a flow, loading the
//! current snapshot, looking a flow up, walking its choices (primary, then fallbacks)
//! and a node's kube-proxy pick, zone-aware or not.
//!
//! A counting global allocator counts allocations made by the measuring thread
//! only (a thread-local flag), so tests running in parallel and the harness
//! itself do not disturb the figures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};

use lb_core::{
    flow_hash, BackendId, BackendSet, BackendSpec, DistributionMode, FlowKey, Published, Snapshot,
    SnapshotParams, FLOW_HASH_SEED, MAX_CHOICES,
};

struct CountingAlloc;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static MEASURING: Cell<bool> = const { Cell::new(false) };
}

fn note_allocation() {
    // `try_with`: the allocator can run while thread-locals are being torn down.
    if MEASURING.try_with(Cell::get).unwrap_or(false) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation();
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Allocations `f` makes on this thread. Only one test measures at a time per
/// thread, but the counter is global, so measurements are serialised.
fn allocations_in<R>(f: impl FnOnce() -> R) -> (usize, R) {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    MEASURING.with(|m| m.set(true));
    let out = f();
    MEASURING.with(|m| m.set(false));
    (ALLOCATIONS.load(Ordering::SeqCst) - before, out)
}

const ITERATIONS: usize = 100_000;

fn keys(count: usize) -> Vec<FlowKey> {
    let frontend = SocketAddr::from(([192, 0, 2, 1], 443));
    let v6_frontend: SocketAddr = "[2001:db8::443]:443".parse().unwrap();
    (0..count as u32)
        .map(|i| {
            let r = i.wrapping_mul(0x9e37_79b9);
            if i % 4 == 3 {
                let src = SocketAddr::new(
                    std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, (r >> 16) as u16, r as u16)
                        .into(),
                    (r >> 7) as u16,
                );
                FlowKey::udp(src, v6_frontend)
            } else {
                FlowKey::tcp(
                    SocketAddr::from((Ipv4Addr::from(r | 0x0a00_0000), (r >> 3) as u16)),
                    frontend,
                )
            }
        })
        .collect()
}

fn snapshot(generation: u64, n: usize) -> Snapshot {
    let set = BackendSet::new(
        (0..n)
            .map(|i| {
                BackendSpec::new(
                    format!("backend-{i:04}"),
                    SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 8080)),
                    1 + (i % 3) as u32,
                )
            })
            .collect(),
    )
    .unwrap();
    // One backend down, so choices have something to skip.
    let healthy = (0..n).map(|i| i != 1).collect();
    Snapshot::build(generation, SnapshotParams::default(), set, healthy).unwrap()
}

/// The counter itself works: an allocation inside the measured region is seen.
#[test]
fn the_counter_sees_allocations() {
    let (count, v) = allocations_in(|| black_box(vec![1u8; 32]));
    assert!(count >= 1, "counted {count}");
    drop(v);
    let (count, _) = allocations_in(|| black_box(Box::new(7u64)));
    assert_eq!(count, 1);
}

#[test]
fn flow_hash_does_not_allocate() {
    let keys = keys(4096);
    let mut acc = 0u64;
    for k in &keys {
        acc ^= flow_hash(k, DistributionMode::FiveTuple, FLOW_HASH_SEED);
    }
    let (count, acc) = allocations_in(|| {
        for i in 0..ITERATIONS {
            let k = black_box(&keys[i % keys.len()]);
            let mode = DistributionMode::ALL[i % 3];
            acc = acc.wrapping_add(flow_hash(k, mode, black_box(FLOW_HASH_SEED)));
        }
        acc
    });
    black_box(acc);
    assert_eq!(count, 0, "flow_hash allocated {count} times");
}

#[test]
fn load_and_lookup_do_not_allocate() {
    let cell = Published::new(snapshot(1, 100));
    let keys = keys(4096);
    // Warm up: arc-swap hands this thread its debt slots on first use.
    for k in &keys {
        black_box(cell.load().lookup(k));
    }
    let (count, hits) = allocations_in(|| {
        let mut hits = 0usize;
        for i in 0..ITERATIONS {
            let snap = cell.load();
            if snap.lookup(black_box(&keys[i % keys.len()])).is_some() {
                hits += 1;
            }
        }
        hits
    });
    assert_eq!(count, 0, "load + lookup allocated {count} times");
    assert_eq!(hits, ITERATIONS, "every lookup must hit");
}

#[test]
fn route_and_hash_via_snapshot_do_not_allocate() {
    let cell = Published::new(snapshot(1, 10));
    let keys = keys(1024);
    black_box(cell.load().route(&keys[0]));
    let (count, _) = allocations_in(|| {
        for i in 0..ITERATIONS {
            let snap = cell.load();
            let k = black_box(&keys[i % keys.len()]);
            let r = snap.route(k);
            black_box((r, snap.hash(k), snap.generation()));
        }
    });
    assert_eq!(count, 0, "route allocated {count} times");
}

#[test]
fn choices_do_not_allocate() {
    let cell = Published::new(snapshot(1, 100));
    let keys = keys(4096);
    for k in &keys {
        black_box(cell.load().choices(k).count());
    }
    let (count, total) = allocations_in(|| {
        let mut total = 0usize;
        for i in 0..ITERATIONS {
            let snap = cell.load();
            let mut out = [BackendId::MAX; MAX_CHOICES];
            let mut len = 0;
            for (slot, id) in out
                .iter_mut()
                .zip(snap.choices(black_box(&keys[i % keys.len()])))
            {
                *slot = id;
                len += 1;
            }
            black_box(&out[..len]);
            total += len;
        }
        total
    });
    assert_eq!(count, 0, "choices allocated {count} times");
    // 99 eligible backends, so every flow gets the full list.
    assert_eq!(total, ITERATIONS * MAX_CHOICES);
}

/// Loads stay allocation-free while snapshots are being replaced: publishing
/// allocates (the new `Arc`), but that happens outside the measured region.
#[test]
fn loads_between_publishes_do_not_allocate() {
    let cell = Published::new(snapshot(0, 3));
    let next: Vec<Snapshot> = (1..=64).map(|g| snapshot(g, 3)).collect();
    let keys = keys(256);
    black_box(cell.load().lookup(&keys[0]));
    let mut total = 0;
    for snap in next {
        drop(cell.publish(snap));
        let (count, _) = allocations_in(|| {
            for i in 0..ITERATIONS / 64 {
                black_box(cell.load().lookup(&keys[i % keys.len()]));
            }
        });
        total += count;
    }
    assert_eq!(total, 0, "loads allocated {total} times");
    assert_eq!(cell.load().generation(), 64);
}

/// kube-proxy's pick on a node, with `trafficDistribution` narrowing it to
/// the node's zone or the node itself: the pools are built with the model,
/// so a flow's pick allocates nothing.
#[test]
fn zone_aware_endpoint_picks_do_not_allocate() {
    use lb_core::{EndpointSpec, HopModel, NodeSpec, ServiceSpec, TrafficDistribution};
    use std::net::IpAddr;
    for td in [
        TrafficDistribution::Any,
        TrafficDistribution::PreferSameZone,
        TrafficDistribution::PreferSameNode,
    ] {
        let nodes = (0..6u8)
            .map(|i| NodeSpec {
                name: format!("node-{i}"),
                address: IpAddr::from([127, 0, 1, i + 1]),
                endpoints: (0..i % 3)
                    .map(|p| EndpointSpec {
                        addr: SocketAddr::from(([127, 0, 2, i + 1], 8000 + u16::from(p))),
                        ready: true,
                    })
                    .collect(),
                zone: Some((i % 3).to_string()),
            })
            .collect();
        let service = ServiceSpec {
            traffic_distribution: td,
            ..ServiceSpec::default()
        };
        let model = HopModel::new(nodes, service).unwrap();
        let client = IpAddr::from([127, 0, 0, 9]);
        let (allocs, picked) = allocations_in(|| {
            let mut picked = 0u64;
            for i in 0..ITERATIONS as u64 {
                let node = (i % 6) as u32;
                let e = model.choose::<std::hash::RandomState>(
                    node,
                    client,
                    i.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                    None,
                    std::time::Duration::ZERO,
                );
                picked += u64::from(black_box(e).is_some());
                picked += u64::from(model.crosses_zones(node, e.unwrap()));
            }
            picked
        });
        assert!(
            picked >= ITERATIONS as u64,
            "{td:?}: every node picks a pod"
        );
        assert_eq!(
            allocs, 0,
            "{td:?}: {allocs} allocations in {ITERATIONS} picks"
        );
    }
}

/// A frontend's `source_ranges` are asked on every accept and every UDP
/// datagram of no flow: the lookup allocates nothing, for either family,
/// inside or outside the list, mapped IPv4 clients included.
#[test]
fn source_ranges_contains_does_not_allocate() {
    let ranges = lb_core::SourceRanges::parse(
        (0..64u32)
            .map(|i| format!("10.{i}.0.0/16"))
            .chain(["2001:db8::/32".to_owned(), "::1".to_owned()])
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str),
    )
    .unwrap();
    let clients: Vec<std::net::IpAddr> = keys(1024).iter().map(|k| k.src.ip()).collect();
    let mapped = Ipv4Addr::new(10, 3, 0, 1).to_ipv6_mapped().into();
    let (count, allowed) = allocations_in(|| {
        let mut allowed = 0;
        for i in 0..ITERATIONS {
            allowed += usize::from(ranges.contains(black_box(clients[i % clients.len()])));
        }
        allowed + usize::from(ranges.contains(black_box(mapped)))
    });
    assert_eq!(count, 0, "contains allocated {count} times");
    assert!(allowed >= 1, "the mapped client is inside 10.3.0.0/16");
}
