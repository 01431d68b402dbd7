//! Measures how much of a Maglev table moves when one of N equal-weight
//! backends is removed, over many random backend sets: the statistic behind the
//! bound that `tests/maglev_props.rs` asserts.
//!
//! ```sh
//! cargo run --release -p lb-core --example maglev_disruption -- [SETS] [N...]
//! ```
//!
//! For each N it prints the distribution (mean, p50, p99, p99.9, max) of the
//! slots owned by *surviving* backends that change owner, in slots and as a
//! share of M, and how many sets break the tight "M·(1/N + 1%)" figure. Runs
//! are deterministic: set `s` of size N is always the same names.

use lb_core::{BackendId, MaglevTable, DEFAULT_TABLE_SIZE};

const M: u32 = DEFAULT_TABLE_SIZE;

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// N distinct names for set number `set`, sorted as a `BackendSet` sorts them.
fn names(n: usize, set: u64) -> Vec<String> {
    let mut names: Vec<String> = (0..n as u64)
        .map(|i| format!("pod-{:x}-{i}", splitmix(set ^ splitmix(i))))
        .collect();
    names.sort();
    names
}

fn table(names: &[String]) -> Vec<BackendId> {
    MaglevTable::build(M, names.iter().map(|s| (s.as_str(), 1)))
        .expect("a supported size and fewer backends than slots")
        .slots()
}

/// Slots that change owner when backend `removed` leaves: (all, of survivors).
fn moved_slots(names: &[String], removed: usize) -> (usize, usize) {
    let before = table(names);
    let mut rest = names.to_vec();
    rest.remove(removed);
    let after = table(&rest);
    // Ids after the removed one shift down by one in the smaller set.
    let original = |id: BackendId| id as usize + usize::from(id as usize >= removed);
    let mut moved = (0, 0);
    for (&b, &a) in before.iter().zip(&after) {
        if b as usize == removed {
            moved.0 += 1;
        } else if original(a) != b as usize {
            moved.0 += 1;
            moved.1 += 1;
        }
    }
    moved
}

fn percentile(sorted: &[usize], p: f64) -> usize {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn measure(n: usize, sets: u64) {
    let mut survivors = Vec::with_capacity(sets as usize);
    let mut over_tight = 0;
    let tight = M as f64 * (1.0 / n as f64 + 0.01);
    for set in 0..sets {
        let names = names(n, set.wrapping_mul(0x1000_0000_01b3) ^ n as u64);
        let removed = (splitmix(set ^ 0xdead_beef) % n as u64) as usize;
        let (all, of_survivors) = moved_slots(&names, removed);
        over_tight += usize::from(all as f64 > tight);
        survivors.push(of_survivors);
    }
    survivors.sort_unstable();
    let mean = survivors.iter().sum::<usize>() as f64 / survivors.len() as f64;
    let share = |slots: usize| 100.0 * slots as f64 / M as f64;
    let max = *survivors.last().expect("at least one set");
    println!(
        "N={n:>5} sets={sets}: survivor slots moved mean {mean:.1} ({:.3}% of M), p50 {}, p99 {}, \
         p99.9 {}, max {max} ({:.3}% of M, {:.2}·M/N); over M·(1/N+1%): {over_tight} ({:.3}%)",
        100.0 * mean / M as f64,
        percentile(&survivors, 0.5),
        percentile(&survivors, 0.99),
        percentile(&survivors, 0.999),
        share(max),
        max as f64 * n as f64 / M as f64,
        100.0 * over_tight as f64 / sets as f64,
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let sets: u64 = args.next().map_or(2_000, |s| s.parse().expect("SETS"));
    let ns: Vec<usize> = args.map(|s| s.parse().expect("N")).collect();
    let ns = if ns.is_empty() {
        vec![2, 3, 5, 10, 20, 50, 100, 1000]
    } else {
        ns
    };
    for n in ns {
        measure(n, sets);
    }
}
