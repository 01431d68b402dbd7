//! Property tests of the weighted Maglev table: balance, weighted shares,
//! disruption on removal, exact restoration on re-add, determinism and the
//! choices iterator.
//!
//! Tables are compared by *owner name* per slot, never by raw id: ids are
//! positions in a backend set, and they shift when a backend leaves.

use std::cell::RefCell;
use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};

use lb_core::{
    BackendId, BackendSet, BackendSpec, FlowKey, MaglevTable, NoHealthyBackends, Snapshot,
    SnapshotParams, DEFAULT_TABLE_SIZE, MAX_CHOICES,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const M: u32 = DEFAULT_TABLE_SIZE; // 65537

/// Few enough cases for a debug run on two cores; no regression files are written.
fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `n` distinct pseudo-random names of varying length and shape, sorted as a
/// `BackendSet` would sort them.
fn random_names(n: usize, seed: u64) -> Vec<String> {
    let mut names: Vec<String> = (0..n as u64)
        .map(|i| {
            let r = splitmix(seed ^ splitmix(i));
            let tail = format!("{:x}", r >> (r % 48));
            match r % 3 {
                0 => format!("{tail}-{i}"),
                1 => format!("pod-{i}.{tail}.svc"),
                _ => format!(
                    "10.{}.{}.{}:{}",
                    (r >> 8) as u8,
                    (r >> 16) as u8,
                    i,
                    r as u16
                ),
            }
        })
        .collect();
    names.sort();
    let unique: HashSet<&String> = names.iter().collect();
    assert_eq!(unique.len(), n, "generated names must be unique");
    names
}

fn build(names: &[String], weights: &[u32]) -> MaglevTable {
    MaglevTable::build(
        M,
        names
            .iter()
            .map(String::as_str)
            .zip(weights.iter().copied()),
    )
    .unwrap()
}

fn build_equal(names: &[String]) -> MaglevTable {
    MaglevTable::build(M, names.iter().map(|s| (s.as_str(), 1))).unwrap()
}

/// The owner of every slot, by name.
fn owner_names<'a>(table: &MaglevTable, names: &'a [String]) -> Vec<&'a str> {
    table
        .slots()
        .iter()
        .map(|&id| names[id as usize].as_str())
        .collect()
}

fn spec(name: &str, weight: u32, i: usize) -> BackendSpec {
    BackendSpec::new(
        name,
        SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 8080)),
        weight,
    )
}

fn key(r: u64) -> FlowKey {
    FlowKey::tcp(
        SocketAddr::from((Ipv4Addr::from((r >> 32) as u32 | 0x0a00_0000), r as u16)),
        SocketAddr::from(([192, 0, 2, 1], 443)),
    )
}

proptest! {
    #![proptest_config(config(32))]

    /// Equal weights: every backend owns ⌊M/N⌋ or ⌈M/N⌉ slots, and all slots are owned.
    #[test]
    fn equal_weights_balance_to_floor_or_ceil(n in 1usize..=1000, seed in any::<u64>()) {
        let names = random_names(n, seed);
        let table = build_equal(&names);
        prop_assert_eq!(table.size(), M);
        prop_assert_eq!(table.slots().len(), M as usize);
        prop_assert_eq!(table.distinct_backends(), n);
        let counts = table.slot_counts(n);
        prop_assert_eq!(counts.iter().map(|&c| c as u64).sum::<u64>(), M as u64);
        let (lo, hi) = (M / n as u32, M.div_ceil(n as u32));
        for (i, &c) in counts.iter().enumerate() {
            prop_assert!(c == lo || c == hi, "{} owns {} slots, want {} or {}", names[i], c, lo, hi);
        }
    }

    /// Weights 1..=10: each backend's share is within 1% of M of M·wᵢ/Σw.
    #[test]
    fn weighted_shares_are_within_one_percent(
        weights in prop::collection::vec(1u32..=10, 1..=50),
        seed in any::<u64>(),
    ) {
        let names = random_names(weights.len(), seed);
        let table = build(&names, &weights);
        let counts = table.slot_counts(weights.len());
        let total: u32 = weights.iter().sum();
        let tolerance = M as f64 * 0.01;
        for (i, (&w, &c)) in weights.iter().zip(&counts).enumerate() {
            let want = M as f64 * w as f64 / total as f64;
            prop_assert!(
                (c as f64 - want).abs() <= tolerance,
                "backend {} weight {} owns {} slots, want {:.1} ± {:.1}", i, w, c, want, tolerance
            );
        }
    }

    /// Zero weight means no slots, and the others still share the whole table by weight.
    #[test]
    fn zero_weight_backends_own_nothing(
        weights in prop::collection::vec(0u32..=4, 1..=30),
        seed in any::<u64>(),
    ) {
        let names = random_names(weights.len(), seed);
        let table = build(&names, &weights);
        let counts = table.slot_counts(weights.len());
        if weights.iter().all(|&w| w == 0) {
            prop_assert!(table.is_empty());
        } else {
            prop_assert_eq!(counts.iter().sum::<u32>(), M);
        }
        for (&w, &c) in weights.iter().zip(&counts) {
            if w == 0 {
                prop_assert_eq!(c, 0);
            }
        }
    }

    /// The same backends listed in any order give the same BackendSet, ids and table.
    #[test]
    fn backend_set_order_does_not_change_the_table(
        (specs, shuffled) in prop::collection::vec(1u32..=5, 1..=60)
            .prop_flat_map(|weights| {
                let names = random_names(weights.len(), weights.len() as u64 * 7919);
                let specs: Vec<BackendSpec> = names
                    .iter()
                    .zip(&weights)
                    .enumerate()
                    .map(|(i, (n, &w))| spec(n, w, i))
                    .collect();
                (Just(specs.clone()), Just(specs).prop_shuffle())
            }),
    ) {
        let a = BackendSet::new(specs).unwrap();
        let b = BackendSet::new(shuffled).unwrap();
        prop_assert_eq!(&a, &b);
        let params = SnapshotParams { table_size: 4_093, ..SnapshotParams::default() };
        let sa = Snapshot::build(1, params, a.clone(), vec![true; a.len()]).unwrap();
        let sb = Snapshot::build(1, params, b.clone(), vec![true; b.len()]).unwrap();
        let name = |s: &Snapshot, id: BackendId| s.backend(id).unwrap().name.clone();
        for (x, y) in sa.table().slots().into_iter().zip(sb.table().slots()) {
            prop_assert_eq!(name(&sa, x), name(&sb, y));
        }
    }

    /// Choices are distinct, start with the primary, and never offer a
    /// backend that is unhealthy or has weight 0.
    #[test]
    fn choices_are_distinct_primary_first_and_eligible(
        backends in prop::collection::vec((0u32..=4, any::<bool>()), 1..=40),
        flows in prop::collection::vec(any::<u64>(), 64),
        size in prop::sample::select(vec![251u32, 1_021, 4_093]),
        route_all in any::<bool>(),
    ) {
        let names = random_names(backends.len(), backends.len() as u64);
        let set = BackendSet::new(
            names.iter().zip(&backends).enumerate().map(|(i, (n, &(w, _)))| spec(n, w, i)).collect(),
        )
        .unwrap();
        let healthy: Vec<bool> = backends.iter().map(|&(_, up)| up).collect();
        let policy = if route_all { NoHealthyBackends::RouteAll } else { NoHealthyBackends::Refuse };
        let params = SnapshotParams { table_size: size, no_healthy_backends: policy, ..SnapshotParams::default() };
        let snap = Snapshot::build(9, params, set, healthy).unwrap();
        let any_eligible = (0..backends.len() as BackendId)
            .any(|id| snap.is_healthy(id) && snap.backend(id).unwrap().weight > 0);
        prop_assert_eq!(snap.is_routing_over_unhealthy(), !any_eligible && route_all);
        for r in flows {
            let k = key(r);
            let c: Vec<BackendId> = snap.choices(&k).collect();
            prop_assert_eq!(c.first().copied(), snap.lookup(&k));
            prop_assert_eq!(c.len(), snap.table().distinct_backends().min(MAX_CHOICES));
            let distinct: HashSet<BackendId> = c.iter().copied().collect();
            prop_assert_eq!(distinct.len(), c.len(), "duplicates in {:?}", c);
            for &id in &c {
                let b = snap.backend(id).unwrap();
                prop_assert!(b.weight > 0, "candidate {} has weight 0", b.name);
                if !snap.is_routing_over_unhealthy() {
                    prop_assert!(snap.is_healthy(id), "candidate {} is unhealthy", b.name);
                }
            }
            if !any_eligible && !route_all {
                prop_assert!(c.is_empty());
            }
        }
    }
}

/// Slots of *surviving* backends that may change owner when one of N
/// equal-weight backends leaves: `2·⌈M/N⌉ + M/10`.
///
/// Maglev guarantees no bound here (the paper measures disruption, it does not
/// bound it), and only the trivial one (M) is provable. The removed backend's
/// ⌈M/N⌉ slots must move; the survivors' claims then ripple: a slot it used to
/// take first is free for whoever reaches it next, and every later claim of
/// that backend can differ. Measured with
/// `cargo run --release -p lb-core --example maglev_disruption -- SETS N`
/// (M = 65537, random sets, one random backend removed from each), survivor
/// slots moved, as a share of M:
///
/// | N    | sets    | mean   | p50    | p99    | p99.9  | max     | over 1/N + 1% |
/// |------|---------|--------|--------|--------|--------|---------|---------------|
/// | 3    | 100,000 | 0.029% | 0.017% | 0.238% | 1.015% | 28.659% | 0.102%        |
/// | 5    | 20,000  | 0.109% | 0.084% | 0.502% | 1.257% | 3.484%  | 0.200%        |
/// | 10   | 20,000  | 0.242% | 0.226% | 0.529% | 1.080% | 2.772%  | 0.140%        |
/// | 20   | 100,000 | 0.337% | 0.330% | 0.511% | 0.902% | 4.686%  | 0.084%        |
/// | 50   | 20,000  | 0.448% | 0.444% | 0.543% | 0.966% | 2.353%  | 0.100%        |
/// | 100  | 20,000  | 0.565% | 0.563% | 0.638% | 1.045% | 1.630%  | 0.110%        |
/// | 1000 | 20,000  | 0.576% | 0.577% | 0.642% | 0.664% | 0.699%  | 0             |
///
/// The heavy tail has one cause: two survivors with the same skip walk one
/// cycle of slots, shifted, contest the same slots all through the fill, and
/// can trade a long run of them. The 28.7% set (N = 3) and the 4.7% one
/// (N = 20) are such pairs, as are the largest at N = 50 (checked by hashing
/// the names with the table's skip seed); a pair shares a skip with
/// probability 1/(M−1). Hence the bound:
/// one such pair trading at most every slot both owned, `2·⌈M/N⌉`, plus the
/// ripple of everything else, which stayed under 4.6% of M in every set
/// measured, with twice that as slack: `M/10`. At large N there are more
/// same-skip pairs (about N²/2M) but each owns only ⌈M/N⌉ slots, so together
/// they trade about N slots, well inside `M/10`. Breaking the bound at small N
/// would take two same-skip pairs in one set (about (N²/2M)²/2 of sets, a few
/// in a million at N = 20) both trading most of their slots.
///
/// So the tight "M·(1/N + 1%)" figure holds for the typical set (the median is
/// under 0.6% of M at every N) but not for every set: about one in 500–1000
/// breaks it, which is why this property once ran from a pinned seed. The
/// tight figure is kept as a statistic, by the example above and by the
/// median check below.
fn survivor_slots_moved_at_most(n: usize) -> usize {
    2 * (M as usize).div_ceil(n) + M as usize / 10
}

/// The median case must stay within the tight figure: 1% of M of survivor slots.
const MEDIAN_SURVIVOR_SLOTS_MOVED_AT_MOST: usize = M as usize / 100;

/// Removing one of N backends moves its own slots plus at most
/// [`survivor_slots_moved_at_most`] of the survivors', the median run stays
/// within the tight 1% figure, and adding it back restores the original table
/// slot for slot. Random seeds; prints the figures it saw.
fn disruption(n: usize, cases: u32) {
    let mut runner = TestRunner::new(config(cases));
    // A cell because the runner takes an `Fn`; on a failure, shrinking runs count too.
    let surviving_moved = RefCell::new(Vec::with_capacity(cases as usize));
    let bound = survivor_slots_moved_at_most(n);
    let strategy = (any::<u64>(), 0..n);
    runner
        .run(&strategy, |(seed, removed)| {
            let names = random_names(n, seed);
            let before = build_equal(&names);
            let before_owners = owner_names(&before, &names);

            let mut rest = names.clone();
            let gone = rest.remove(removed);
            let after = build_equal(&rest);
            let after_owners = owner_names(&after, &rest);

            prop_assert!(after_owners.iter().all(|&o| o != gone));
            let surviving = (0..M as usize)
                .filter(|&s| before_owners[s] != gone && before_owners[s] != after_owners[s])
                .count();
            prop_assert!(
                surviving <= bound,
                "removing {} of {} moved {} slots of surviving backends, bound {}",
                gone,
                n,
                surviving,
                bound
            );
            prop_assert!(
                re_added(&rest, &gone, n) == before_owners,
                "re-adding {} did not restore the table",
                gone
            );
            surviving_moved.borrow_mut().push(surviving);
            Ok(())
        })
        .unwrap();
    let mut moved = surviving_moved.into_inner();
    moved.sort_unstable();
    let (median, max) = (moved[moved.len() / 2], moved[moved.len() - 1]);
    let share = |slots: usize| 100.0 * slots as f64 / M as f64;
    eprintln!(
        "disruption N={n} M={M} cases={}: surviving-backend slots moved: median {median} \
         ({:.4}% of M), max {max} ({:.4}% of M); bound {bound}",
        moved.len(),
        share(median),
        share(max),
    );
    assert!(
        median <= MEDIAN_SURVIVOR_SLOTS_MOVED_AT_MOST,
        "median run moved {median} survivor slots, over 1% of M"
    );
}

/// The owner of every slot, by name, once `gone` is added back to `rest`,
/// listed last: `BackendSet` restores the canonical order.
fn re_added(rest: &[String], gone: &str, n: usize) -> Vec<String> {
    let mut specs: Vec<BackendSpec> = rest
        .iter()
        .enumerate()
        .map(|(i, name)| spec(name, 1, i))
        .collect();
    specs.push(spec(gone, 1, n));
    let set = BackendSet::new(specs).unwrap();
    let table = MaglevTable::build(M, set.iter().map(|b| (b.name.as_str(), b.weight))).unwrap();
    let set_names: Vec<String> = set.iter().map(|b| b.name.clone()).collect();
    owner_names(&table, &set_names)
        .into_iter()
        .map(str::to_owned)
        .collect()
}

#[test]
fn removal_disruption_n10() {
    disruption(10, 24);
}

#[test]
fn removal_disruption_n100() {
    disruption(100, 24);
}

#[test]
fn removal_disruption_n1000() {
    disruption(1000, 16);
}

/// Determinism of the raw builder: the same `(name, weight)` pairs in a different
/// order must give the same owner per slot, as `MaglevTable::build` documents
/// ("never on the order of equal inputs"): turns go in name order, so contested
/// slots are settled the same way whatever order the caller listed them in.
#[test]
fn raw_build_is_independent_of_input_order() {
    let mut runner = TestRunner::new(config(16));
    let strategy = (1usize..=200, any::<u64>()).prop_flat_map(|(n, seed)| {
        let names = random_names(n, seed);
        let pairs: Vec<(String, u32)> = names
            .into_iter()
            .enumerate()
            .map(|(i, s)| (s, (i % 3) as u32 + 1))
            .collect();
        (Just(pairs.clone()), Just(pairs).prop_shuffle())
    });
    runner
        .run(&strategy, |(pairs, shuffled)| {
            let a = MaglevTable::build(M, pairs.iter().map(|(s, w)| (s.as_str(), *w))).unwrap();
            let b = MaglevTable::build(M, shuffled.iter().map(|(s, w)| (s.as_str(), *w))).unwrap();
            let na: Vec<String> = pairs.iter().map(|p| p.0.clone()).collect();
            let nb: Vec<String> = shuffled.iter().map(|p| p.0.clone()).collect();
            let (oa, ob) = (owner_names(&a, &na), owner_names(&b, &nb));
            let differing = oa.iter().zip(&ob).filter(|(x, y)| x != y).count();
            prop_assert_eq!(differing, 0, "{} slots differ", differing);
            Ok(())
        })
        .unwrap();
}

/// Canonical order (what `BackendSet` feeds it) makes the raw builder a pure
/// function of the set: permuted lists, once sorted by name, agree per slot.
#[test]
fn raw_build_over_name_sorted_permutations_is_identical() {
    let mut runner = TestRunner::new(config(16));
    let strategy = (1usize..=300, any::<u64>()).prop_flat_map(|(n, seed)| {
        let pairs: Vec<(String, u32)> = random_names(n, seed)
            .into_iter()
            .map(|s| {
                let w = (splitmix(s.len() as u64) % 4) as u32 + 1;
                (s, w)
            })
            .collect();
        Just(pairs).prop_shuffle()
    });
    runner
        .run(&strategy, |mut shuffled| {
            let specs: Vec<BackendSpec> = shuffled
                .iter()
                .enumerate()
                .map(|(i, (s, w))| spec(s, *w, i))
                .collect();
            let set = BackendSet::new(specs).unwrap();
            let via_set =
                MaglevTable::build(M, set.iter().map(|b| (b.name.as_str(), b.weight))).unwrap();
            shuffled.sort();
            let direct =
                MaglevTable::build(M, shuffled.iter().map(|(s, w)| (s.as_str(), *w))).unwrap();
            let set_names: Vec<String> = set.iter().map(|b| b.name.clone()).collect();
            let direct_names: Vec<String> = shuffled.iter().map(|p| p.0.clone()).collect();
            prop_assert!(
                owner_names(&via_set, &set_names) == owner_names(&direct, &direct_names),
                "tables differ"
            );
            prop_assert!(via_set == direct);
            Ok(())
        })
        .unwrap();
}
