//! Weighted Maglev lookup tables (Eisenbud et al., NSDI 2016, §3.4).
//!
//! Each backend derives a permutation of the `M` slots from its *name*:
//! `offset = h1(name) mod M`, `skip = h2(name) mod (M−1) + 1`. Backends take
//! turns claiming their next preferred empty slot until the table is full.
//! Weights give a backend more turns, using Katran's "Maglev v2" rule: each
//! round adds a backend's weight to its credit, and it claims a slot whenever
//! its credit reaches the largest weight. With equal weights this is exactly
//! the paper's round-robin, so every backend owns ⌊M/N⌋ or ⌈M/N⌉ slots.
//!
//! A flow's hash is reduced to a slot with Lemire's multiply-shift
//! (`(hash × M) >> 64`), which costs one multiplication instead of a division.
//! Slots hold 16-bit backend ids, so the default table is 128 KiB and a lookup
//! stays in L2; a table therefore addresses at most 65534 backends.

use crate::backend::BackendId;
use crate::hash::name_hash;

/// The table size Google, Katran and Envoy use.
pub const DEFAULT_TABLE_SIZE: u32 = 65_537;

/// Validated primes a table may have as its size. `M` must be prime so every
/// `skip` walks the whole table, and should stay above 100 × N for balance.
pub const SUPPORTED_TABLE_SIZES: &[u32] = &[
    251, 509, 1_021, 2_039, 4_093, 8_191, 16_381, 32_749, 65_537, 131_071, 262_139, 524_287,
    655_373, 1_048_573,
];

const OFFSET_SEED: u64 = 0x6d61_676c_6576_2d31; // "maglev-1"
const SKIP_SEED: u64 = 0x6d61_676c_6576_2d32; // "maglev-2"
/// Slots hold 16-bit ids, which keeps a table in L2 (see the module docs).
type Slot = u16;
const EMPTY: Slot = Slot::MAX;
/// Most backends a table can address (ids below the empty-slot marker).
pub const MAX_TABLE_BACKENDS: usize = EMPTY as usize - 1;

/// How many distinct backends [`MaglevTable::choices`] will offer at most.
pub const MAX_CHOICES: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    #[error("table size {0} is not one of the supported primes {SUPPORTED_TABLE_SIZES:?}")]
    UnsupportedSize(u32),
    #[error("{backends} backends cannot share a table of {size} slots")]
    TooManyBackends { backends: usize, size: u32 },
}

/// An immutable, fully built lookup table mapping slots to backend ids.
#[derive(Clone, PartialEq, Eq)]
pub struct MaglevTable {
    size: u32,
    /// Empty when no backend is eligible; otherwise exactly `size` entries.
    slots: Box<[Slot]>,
    /// Number of distinct backends owning at least one slot.
    distinct: u32,
}

impl std::fmt::Debug for MaglevTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MaglevTable")
            .field("size", &self.size)
            .field("distinct", &self.distinct)
            .finish_non_exhaustive()
    }
}

fn is_supported(size: u32) -> bool {
    SUPPORTED_TABLE_SIZES.binary_search(&size).is_ok()
}

impl MaglevTable {
    /// Builds a table over backends given as `(name, weight)` in id order:
    /// entry `i` is backend id `i`. Weight 0 (draining, unhealthy) gets no slots.
    /// The result depends only on the names and weights, never on the order
    /// of equal inputs or on anything outside the arguments.
    pub fn build<'a, I>(size: u32, backends: I) -> Result<Self, MaglevError>
    where
        I: IntoIterator<Item = (&'a str, u32)>,
    {
        if !is_supported(size) {
            return Err(MaglevError::UnsupportedSize(size));
        }
        let (mut turns, total) = turns_in_name_order(size, backends);
        if total >= EMPTY as usize || turns.len() > size as usize {
            return Err(MaglevError::TooManyBackends {
                backends: total,
                size,
            });
        }
        if turns.is_empty() {
            return Ok(MaglevTable {
                size,
                slots: Box::new([]),
                distinct: 0,
            });
        }
        let slots = fill(size, &mut turns);
        let distinct = distinct_owners(&slots);
        Ok(MaglevTable {
            size,
            slots,
            distinct,
        })
    }

    /// `M`, the number of slots.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// True when no backend owns a slot: every lookup misses.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Number of distinct backends owning at least one slot.
    pub fn distinct_backends(&self) -> usize {
        self.distinct as usize
    }

    /// The slot a flow hash falls in (Lemire's multiply-shift range reduction).
    #[inline]
    pub fn slot_of(&self, hash: u64) -> usize {
        ((hash as u128 * self.size as u128) >> 64) as usize
    }

    /// The owner of a slot, `None` when the table is empty.
    #[inline]
    pub fn owner(&self, slot: usize) -> Option<BackendId> {
        self.slots.get(slot).map(|&s| BackendId::from(s))
    }

    /// One hash, one index: the backend for a flow hash.
    #[inline]
    pub fn lookup(&self, hash: u64) -> Option<BackendId> {
        self.owner(self.slot_of(hash))
    }

    /// The primary backend for a hash, then distinct fallbacks in a fixed order:
    /// the owners of the following slots. Slot owners are spread pseudo-randomly,
    /// so a failed backend's flows scatter over the others instead of piling on one.
    pub fn choices(&self, hash: u64) -> Choices<'_> {
        Choices {
            table: self,
            start: self.slot_of(hash),
            scanned: 0,
            seen: [BackendId::MAX; MAX_CHOICES],
            yielded: 0,
        }
    }

    /// The owner of every slot, in order.
    pub fn slots(&self) -> Vec<BackendId> {
        self.slots.iter().map(|&s| BackendId::from(s)).collect()
    }

    /// How many slots each backend id owns, for ids `0..backends`.
    pub fn slot_counts(&self, backends: usize) -> Vec<u32> {
        let mut counts = vec![0u32; backends];
        for id in self.slots.iter().map(|&s| s as usize) {
            if let Some(c) = counts.get_mut(id) {
                *c += 1;
            }
        }
        counts
    }
}

/// One backend's place in the fill: its id, weight, where its permutation
/// stands, its skip, and the credit its weight has earned towards a turn.
struct Turn {
    id: BackendId,
    weight: u64,
    pos: u64,
    skip: u64,
    credit: u64,
}

/// The eligible (non-zero weight) backends' turns, in name order, and how many
/// backends were given in all.
fn turns_in_name_order<'a, I>(size: u32, backends: I) -> (Vec<Turn>, usize)
where
    I: IntoIterator<Item = (&'a str, u32)>,
{
    let m = size as u64;
    let mut named: Vec<(&str, BackendId, u64)> = Vec::new();
    let mut total = 0usize;
    for (id, (name, weight)) in backends.into_iter().enumerate() {
        total += 1;
        if weight > 0 {
            named.push((name, id as BackendId, u64::from(weight)));
        }
    }
    // Turns go in name order, so contested slots are settled the same way
    // whatever order the caller listed the backends in.
    named.sort_unstable_by(|a, b| a.0.cmp(b.0).then(a.1.cmp(&b.1)));
    let turns = named
        .iter()
        .map(|&(name, id, weight)| Turn {
            id,
            weight,
            pos: name_hash(name, OFFSET_SEED) % m,
            skip: name_hash(name, SKIP_SEED) % (m - 1) + 1,
            credit: 0,
        })
        .collect();
    (turns, total)
}

/// Backends take turns, by weight, claiming their next preferred empty slot
/// until every slot is owned. `turns` must not be empty.
fn fill(size: u32, turns: &mut [Turn]) -> Box<[Slot]> {
    let max_weight = turns.iter().map(|t| t.weight).max().unwrap_or(1);
    let mut slots = vec![EMPTY; size as usize].into_boxed_slice();
    // A separate occupancy bitmap keeps the probe loop in cache for large tables.
    let mut taken = vec![0u64; (size as usize).div_ceil(64)];
    let mut filled = 0u32;
    loop {
        for turn in turns.iter_mut() {
            turn.credit += turn.weight;
            if turn.credit < max_weight {
                continue;
            }
            turn.credit -= max_weight;
            let p = claim_next_empty(turn, size as u64, &mut taken);
            slots[p] = turn.id as Slot;
            filled += 1;
            if filled == size {
                return slots;
            }
        }
    }
}

/// Walks `turn`'s permutation to its next empty slot and marks it taken. The
/// permutation is a full cycle because M is prime, so an empty slot is found.
fn claim_next_empty(turn: &mut Turn, m: u64, taken: &mut [u64]) -> usize {
    loop {
        let p = turn.pos as usize;
        turn.pos += turn.skip;
        if turn.pos >= m {
            turn.pos -= m;
        }
        let (word, bit) = (p / 64, 1u64 << (p % 64));
        if taken[word] & bit == 0 {
            taken[word] |= bit;
            return p;
        }
    }
}

/// Number of distinct backends owning at least one slot.
fn distinct_owners(slots: &[Slot]) -> u32 {
    let mut owners: Vec<Slot> = slots.to_vec();
    owners.sort_unstable();
    owners.dedup();
    owners.len() as u32
}

/// Iterator over a flow's primary backend and its distinct fallbacks. Allocation-free.
#[derive(Clone, Debug)]
pub struct Choices<'a> {
    table: &'a MaglevTable,
    start: usize,
    scanned: usize,
    seen: [BackendId; MAX_CHOICES],
    yielded: usize,
}

impl Iterator for Choices<'_> {
    type Item = BackendId;

    fn next(&mut self) -> Option<BackendId> {
        let len = self.table.slots.len();
        let want = self.table.distinct_backends().min(MAX_CHOICES);
        while self.yielded < want && self.scanned < len {
            let mut slot = self.start + self.scanned;
            if slot >= len {
                slot -= len;
            }
            self.scanned += 1;
            let id = BackendId::from(self.table.slots[slot]);
            if !self.seen[..self.yielded].contains(&id) {
                self.seen[self.yielded] = id;
                self.yielded += 1;
                return Some(id);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::FLOW_HASH_VERSION;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("backend-{i}")).collect()
    }

    /// Pins the fill (and the backend-name hash it permutes by): instances
    /// agree only if they build the same table, and the config fingerprint
    /// tells them apart only by [`FLOW_HASH_VERSION`]. A change to either
    /// algorithm fails this until the version here is bumped with it.
    #[test]
    fn golden_table_is_pinned_by_the_hash_version() {
        let t = MaglevTable::build(251, [("a", 1), ("b", 2), ("c", 1)]).unwrap();
        let owners: String = t
            .slots()
            .iter()
            .take(40)
            .map(|id| char::from(b'a' + *id as u8))
            .collect();
        assert_eq!(
            (FLOW_HASH_VERSION, owners.as_str()),
            (1, "baabbbbbabaabcbcbaaabbbbbbaaccbcbcbaaabb")
        );
        assert_eq!(t.slot_counts(3), vec![63, 126, 62]);
    }

    #[test]
    fn sizes_outside_the_list_are_refused() {
        assert_eq!(
            MaglevTable::build(65_536, [("a", 1)]).unwrap_err(),
            MaglevError::UnsupportedSize(65_536)
        );
        assert!(SUPPORTED_TABLE_SIZES.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn equal_weights_balance_to_floor_or_ceil() {
        let n = names(7);
        let t = MaglevTable::build(4_093, n.iter().map(|s| (s.as_str(), 1))).unwrap();
        let counts = t.slot_counts(7);
        let (lo, hi) = (4_093 / 7, 4_093_u32.div_ceil(7));
        assert!(counts.iter().all(|&c| c == lo || c == hi), "{counts:?}");
    }

    #[test]
    fn draining_backends_own_nothing_and_empty_tables_miss() {
        let t = MaglevTable::build(251, [("a", 0), ("b", 3)]).unwrap();
        assert_eq!(t.slot_counts(2), vec![0, 251]);
        let empty = MaglevTable::build(251, [("a", 0)]).unwrap();
        assert!(empty.is_empty());
        assert_eq!(empty.lookup(12345), None);
        assert_eq!(empty.choices(1).count(), 0);
    }

    #[test]
    fn choices_are_distinct_and_start_with_the_primary() {
        let n = names(5);
        let t = MaglevTable::build(1_021, n.iter().map(|s| (s.as_str(), 1))).unwrap();
        for h in [0u64, 1, u64::MAX, 0xdead_beef_dead_beef] {
            let c: Vec<_> = t.choices(h).collect();
            assert_eq!(c[0], t.lookup(h).unwrap());
            let mut sorted = c.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted.len(), 5, "{c:?}");
        }
    }

    #[test]
    fn slot_reduction_covers_the_whole_range() {
        let t = MaglevTable::build(251, [("a", 1)]).unwrap();
        assert_eq!(t.slot_of(0), 0);
        assert_eq!(t.slot_of(u64::MAX), 250);
    }
}
