//! Snapshot publication under concurrent readers.
//!
//! Every generation's snapshot is self-checking: generation `g` has exactly
//! `g % 5 + 1` backends named `b0`.., every backend's port is derived from `g`,
//! and its table must equal the table precomputed for that many backends. A
//! reader that ever saw a table from one generation with the backends of
//! another, a half-written snapshot, or generations going backwards, fails.
//!
//! Retired snapshots are counted as they are dropped, and the resident set
//! size is read from /proc before and after 100k swaps, so a leak fails too.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;

use lb_core::{BackendSet, BackendSpec, FlowKey, MaglevTable, Published, Snapshot, SnapshotParams};

const TABLE_SIZE: u32 = 251;
const READERS: usize = 2;

/// The tests in this file measure process-wide things (RSS), so they run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn params() -> SnapshotParams {
    SnapshotParams {
        table_size: TABLE_SIZE,
        ..SnapshotParams::default()
    }
}

fn backend_count(generation: u64) -> usize {
    (generation % 5) as usize + 1
}

fn port_of(generation: u64) -> u16 {
    (generation % 60_000) as u16 + 1
}

/// A snapshot that counts its own drop.
struct Tracked {
    snap: Snapshot,
    drops: Arc<AtomicUsize>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::SeqCst);
    }
}

fn tracked(generation: u64, drops: &Arc<AtomicUsize>) -> Tracked {
    let n = backend_count(generation);
    let set = BackendSet::new(
        (0..n)
            .map(|i| {
                BackendSpec::new(
                    format!("b{i}"),
                    SocketAddr::from((Ipv4Addr::new(10, 0, 0, i as u8), port_of(generation))),
                    1,
                )
            })
            .collect(),
    )
    .unwrap();
    Tracked {
        snap: Snapshot::build(generation, params(), set, vec![true; n]).unwrap(),
        drops: Arc::clone(drops),
    }
}

/// Tables for 1..=5 backends `b0`.., index `n - 1`.
fn expected_tables() -> Vec<MaglevTable> {
    (1..=5)
        .map(|n| {
            let names: Vec<String> = (0..n).map(|i| format!("b{i}")).collect();
            MaglevTable::build(TABLE_SIZE, names.iter().map(|s| (s.as_str(), 1))).unwrap()
        })
        .collect()
}

/// Asserts that a snapshot's generation, backends and table belong together.
fn check_consistent(snap: &Snapshot, expected: &[MaglevTable], key: &FlowKey) {
    let g = snap.generation();
    let n = snap.backends().len();
    assert_eq!(n, backend_count(g), "generation {g} has {n} backends");
    assert_eq!(snap.health().len(), n, "generation {g}: health length");
    for (i, b) in snap.backends().iter().enumerate() {
        assert_eq!(
            b.addr.port(),
            port_of(g),
            "generation {g}: backend {i} port"
        );
        assert_eq!(
            b.addr.ip(),
            Ipv4Addr::new(10, 0, 0, i as u8),
            "generation {g}"
        );
    }
    assert!(
        snap.table().slots() == expected[n - 1].slots(),
        "generation {g}: table does not belong to its {n} backends"
    );
    let id = snap
        .lookup(key)
        .expect("every generation has a healthy backend");
    assert!((id as usize) < n, "generation {g}: lookup returned {id}");
}

fn flow(i: u64) -> FlowKey {
    FlowKey::tcp(
        SocketAddr::from((Ipv4Addr::from(0x0a00_0000 | i as u32), (i * 7) as u16)),
        SocketAddr::from(([192, 0, 2, 1], 443)),
    )
}

#[derive(Debug, Default)]
struct ReaderStats {
    loads: u64,
    /// Loads that saw a generation older than the last one published:
    /// made while the writer was still running.
    loads_during_writes: u64,
    distinct_generations: u64,
}

/// Runs `READERS` checking readers while `write` publishes; returns their stats.
fn with_readers(
    cell: &Arc<Published<Tracked>>,
    last_generation: u64,
    write: impl FnOnce(),
) -> Vec<ReaderStats> {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(READERS + 1));
    let readers: Vec<_> = (0..READERS)
        .map(|r| {
            let (cell, stop, start) = (Arc::clone(cell), Arc::clone(&stop), Arc::clone(&start));
            thread::spawn(move || {
                let expected = expected_tables();
                let mut stats = ReaderStats::default();
                let mut last = 0u64;
                start.wait();
                while !stop.load(Ordering::Acquire) {
                    let current = cell.load();
                    let g = current.snap.generation();
                    assert!(g >= last, "reader {r}: generation went from {last} to {g}");
                    if g != last || stats.loads == 0 {
                        stats.distinct_generations += 1;
                    }
                    last = g;
                    check_consistent(&current.snap, &expected, &flow(stats.loads));
                    stats.loads += 1;
                    if g < last_generation {
                        stats.loads_during_writes += 1;
                    }
                    // Two cores, three threads: let the writer run. Not a wait
                    // for anything, so it cannot hide a reader that blocks.
                    if stats.loads % 16 == 0 {
                        thread::yield_now();
                    }
                }
                stats
            })
        })
        .collect();
    start.wait();
    write();
    stop.store(true, Ordering::Release);
    readers
        .into_iter()
        .map(|r| r.join().expect("reader panicked"))
        .collect()
}

/// Resident set size in bytes, from /proc/self/statm (pages × page size).
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let resident: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    resident * page_size()
}

fn page_size() -> u64 {
    // The kernel reports the page size to every process in its auxiliary vector,
    // visible in /proc/self/auxv as AT_PAGESZ (6); fall back to 4 KiB.
    std::fs::read("/proc/self/auxv")
        .ok()
        .and_then(|auxv| {
            auxv.chunks_exact(16).find_map(|e| {
                let key = u64::from_ne_bytes(e[..8].try_into().unwrap());
                (key == 6).then(|| u64::from_ne_bytes(e[8..].try_into().unwrap()))
            })
        })
        .unwrap_or(4096)
}

#[test]
fn readers_see_consistent_monotonic_snapshots_and_never_block() {
    let _serial = serial();
    const PUBLISHES: u64 = 20_000;
    let drops = Arc::new(AtomicUsize::new(0));
    let cell = Arc::new(Published::new(tracked(0, &drops)));
    let stats = with_readers(&cell, PUBLISHES, || {
        for g in 1..=PUBLISHES {
            let old = cell.publish(tracked(g, &drops));
            assert_eq!(
                old.snap.generation(),
                g - 1,
                "publish returns what it replaced"
            );
        }
    });
    for (r, s) in stats.iter().enumerate() {
        eprintln!("reader {r}: {s:?}");
        assert!(
            s.loads_during_writes >= 1_000,
            "reader {r} made only {} loads while {PUBLISHES} snapshots were published",
            s.loads_during_writes
        );
        assert!(s.distinct_generations >= 2, "reader {r} saw no publication");
    }
    // Readers are gone: every retired snapshot has been freed, the current one lives.
    assert_eq!(cell.load().snap.generation(), PUBLISHES);
    assert_eq!(drops.load(Ordering::SeqCst), PUBLISHES as usize);
    drop(cell);
    assert_eq!(drops.load(Ordering::SeqCst), PUBLISHES as usize + 1);
}

#[test]
fn a_held_snapshot_stays_valid_and_does_not_hold_up_publication() {
    let _serial = serial();
    let drops = Arc::new(AtomicUsize::new(0));
    let cell = Published::new(tracked(0, &drops));
    let expected = expected_tables();
    let held = cell.load();
    let owned = cell.load_full();
    for g in 1..=1_000 {
        cell.publish(tracked(g, &drops));
        check_consistent(&cell.load().snap, &expected, &flow(g));
    }
    // The reader's view never changed under it, and it is still whole.
    assert_eq!(held.snap.generation(), 0);
    check_consistent(&held.snap, &expected, &flow(1));
    // Generations 1..=999 are retired and gone; 0 is held, 1000 is current.
    assert_eq!(drops.load(Ordering::SeqCst), 999);
    drop(held);
    assert_eq!(drops.load(Ordering::SeqCst), 999, "still owned by `owned`");
    drop(owned);
    assert_eq!(drops.load(Ordering::SeqCst), 1_000);
}

#[test]
fn rss_stays_flat_over_100k_swaps() {
    let _serial = serial();
    const WARM_UP: u64 = 5_000;
    const SWAPS: u64 = 100_000;
    const LIMIT: u64 = 8 << 20;
    let drops = Arc::new(AtomicUsize::new(0));
    let cell = Arc::new(Published::new(tracked(0, &drops)));
    let (mut before, mut after) = (0, 0);
    let stats = with_readers(&cell, WARM_UP + SWAPS, || {
        for g in 1..=WARM_UP {
            cell.publish(tracked(g, &drops));
        }
        before = rss_bytes();
        for g in WARM_UP + 1..=WARM_UP + SWAPS {
            cell.publish(tracked(g, &drops));
        }
        after = rss_bytes();
    });
    let growth = after.saturating_sub(before);
    eprintln!(
        "RSS before {} KiB, after {SWAPS} swaps {} KiB, growth {} KiB; readers {stats:?}",
        before >> 10,
        after >> 10,
        growth >> 10
    );
    assert!(
        growth < LIMIT,
        "RSS grew by {growth} bytes over {SWAPS} swaps"
    );
    for s in &stats {
        assert!(s.loads_during_writes >= 1_000, "{s:?}");
    }
    let total = (WARM_UP + SWAPS) as usize;
    assert_eq!(
        drops.load(Ordering::SeqCst),
        total,
        "retired snapshots leaked"
    );
    drop(cell);
    assert_eq!(drops.load(Ordering::SeqCst), total + 1);
}
