//! The UDP flow table: which backend each UDP flow (5-tuple session) is pinned
//! to, when it was last seen, and when it ends.
//!
//! UDP has no connection, so this table is the conntrack that a TCP
//! connection is for free: the Maglev table decides only a flow's first
//! datagram, and the table keeps the rest of the flow on that backend.
//! Azure's semantics, which differ from TCP's:
//! - a flow whose backend probes down moves to its next choice (the backend
//!   the new snapshot's table gives its key), instead of staying;
//! - when no backend is healthy, every flow ends and new ones are refused;
//! - a flow ends after `idle_timeout` without a datagram either way (4 min by
//!   default: Azure documents no inbound UDP timeout; NAT Gateway's is 4 min).
//!
//! A backend drained to weight 0 takes no new flows, but its flows stay on it
//! while it is healthy, as TCP connections do.
//!
//! The table is bounded: a new flow at capacity evicts the flow idle the
//! longest. Every expiry, eviction, move and end is counted and reported.
//!
//! # Counting
//!
//! Every flow that ends is reported once, as a [`FlowEvent::Ended`] from
//! [`UdpFlowTable::poll_event`], whatever ended it, including the ends a
//! decision also names ([`FlowDecision::New`]'s `evicted`,
//! [`FlowDecision::Refused`]'s `ended`) and [`UdpFlowTable::close`]. A move is
//! reported once: as a [`FlowEvent::Moved`] when a snapshot moved a flow that
//! no datagram was asking about, or as the [`FlowDecision::Moved`] of the
//! datagram whose call applied the snapshot or pinned its flow elsewhere
//! (never both). So a caller counts ends from events only, and moves from
//! events plus `Moved` decisions; [`FlowTableStats`] agrees.
//! Drain the events after every call: they may ask to close an upstream.
//!
//! # Storage
//!
//! Flows live in a slab indexed by slot ([`FlowId::slot`]), found by key
//! through an ahash map seeded by the caller, and threaded on an intrusive
//! list ordered by when each was last seen (a datagram or a reply). With one
//! idle timeout for all, the least recently seen flow is both the one to
//! evict and the first to expire, so touch, eviction and expiry are O(1) each,
//! as in [`AffinityTable`](crate::hop::AffinityTable). Freed slots are chained
//! through the same links. Nothing is allocated per datagram once the table
//! has held as many flows as it will (the map and slab are sized up front, to
//! [`PRESIZE_LIMIT`] flows), nor per snapshot beyond the id remap of a reload.
//!
//! Sans-I/O, as quinn-proto is: events go in (`handle_*`, with `now`),
//! decisions come out ([`FlowDecision`], `poll_*`). Nothing here reads a clock
//! or draws randomness: the map's hasher seeds arrive as an argument.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use crate::backend::BackendId;
use crate::flow::FlowKey;
use crate::snapshot::Snapshot;

/// Seeds for the table's in-process ahash map (never for routing: the
/// pinned flow hash does that).
pub type FlowTableSeeds = [u64; 4];

/// Most flows the map and slab reserve room for when the table is made; a
/// larger table grows to its capacity as flows arrive (doubling, so a handful
/// of allocations in all), rather than holding memory for flows it may never see.
pub const PRESIZE_LIMIT: usize = 65_536;

/// Events a table has room for before its first growth: a snapshot that moves
/// or ends more flows than this between two polls grows the queue once.
const EVENT_QUEUE_PRESIZE: usize = 64;

/// Marks the end of the recency list and of the free list. Slots are u32
/// indices below it, which bounds a table's capacity.
const NIL: u32 = u32::MAX;

/// A table's bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpFlowConfig {
    /// Most flows held at once; a new flow beyond it evicts the one idle
    /// longest. 0 is taken as 1 (a table that can hold nothing would refuse
    /// every datagram for a reason no metric names).
    pub capacity: usize,
    /// A flow with no datagram either way for this long ends.
    pub idle_timeout: Duration,
}

/// A flow's handle. `slot` is stable for the flow's life and indexes the
/// caller's own per-flow state (its upstream socket); `generation` makes a
/// stale handle to a reused slot harmless.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowId {
    slot: u32,
    generation: u32,
}

impl FlowId {
    /// The slot index, below the table's capacity: index your per-flow state by it.
    pub fn slot(self) -> usize {
        self.slot as usize
    }
}

/// What to do with one datagram from a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowDecision {
    /// A known flow whose backend still serves: forward on its upstream.
    Existing { flow: FlowId, backend: BackendId },
    /// A new flow: open an upstream to `backend`. When the table was full,
    /// `evicted` is the flow whose slot it took: close that upstream first
    /// (its end is also reported by [`UdpFlowTable::poll_event`]).
    New {
        flow: FlowId,
        backend: BackendId,
        evicted: Option<FlowId>,
    },
    /// A known flow whose backend went down (or, for QUIC, whose connection ID
    /// names another backend): replace its upstream with one to `to`. `from`
    /// is the backend the flow was on when its upstream was opened, by its id
    /// in the snapshot before the one that moved it (ids shift when a reload
    /// changes the backend set; `to` is in the current snapshot). Not also
    /// reported as an event.
    Moved {
        flow: FlowId,
        from: BackendId,
        to: BackendId,
    },
    /// No backend can take the datagram (none healthy): drop it. A flow that
    /// existed for its key has ended (also reported by `poll_event`).
    Refused { ended: Option<FlowId> },
}

/// Why a flow ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlowEnd {
    /// No datagram either way for the idle timeout.
    Expired,
    /// The table was full and a new flow took its slot.
    Evicted,
    /// No backend was healthy (Azure ends every UDP flow then), or none was
    /// left to move the flow to when its own went down.
    NoHealthyBackend,
    /// The caller closed it ([`UdpFlowTable::close`]), e.g. its upstream failed or the process is stopping.
    Closed,
}

impl FlowEnd {
    /// The metric label (`lb_udp_flows_ended_total{reason}`).
    pub const fn as_str(self) -> &'static str {
        match self {
            FlowEnd::Expired => "expired",
            FlowEnd::Evicted => "evicted",
            FlowEnd::NoHealthyBackend => "no_healthy_backend",
            FlowEnd::Closed => "closed",
        }
    }

    pub const ALL: [FlowEnd; 4] = [
        FlowEnd::Expired,
        FlowEnd::Evicted,
        FlowEnd::NoHealthyBackend,
        FlowEnd::Closed,
    ];
}

/// Something that happened to a flow outside a [`FlowDecision`], for the
/// caller to act on (close or replace an upstream) and count.
///
/// Backend ids are those the flow's upstream was opened under: a flow ended
/// or moved by a snapshot names its old backend by its id in the previous
/// snapshot (the backend may have left the set); `to` is in the new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowEvent {
    Ended {
        flow: FlowId,
        key: FlowKey,
        backend: BackendId,
        reason: FlowEnd,
    },
    /// A snapshot moved the flow off a backend that is down or gone.
    Moved {
        flow: FlowId,
        key: FlowKey,
        from: BackendId,
        to: BackendId,
    },
}

/// What the table has done since it was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowTableStats {
    pub active: usize,
    pub created: u64,
    pub expired: u64,
    pub evicted: u64,
    pub moved: u64,
    pub ended_no_backend: u64,
    pub closed: u64,
}

/// One flow as the table holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEntry {
    pub key: FlowKey,
    pub backend: BackendId,
    pub last_seen: Duration,
}

/// One slab entry: a live flow, or a free slot waiting for one.
#[derive(Clone, Debug)]
struct Slot {
    entry: FlowEntry,
    /// Bumped each time the slot's flow ends, so ids of ended flows go stale.
    generation: u32,
    live: bool,
    /// Towards the least recently seen flow.
    older: u32,
    /// Towards the most recently seen flow; while free, the next free slot.
    newer: u32,
}

/// What applying a snapshot did to the flow of the datagram being handled,
/// which the datagram's decision reports instead of an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Held {
    Kept,
    Moved { from: BackendId, to: BackendId },
    Ended(FlowId),
}

/// A snapshot's verdict on one flow.
enum Reroute {
    /// Its backend serves: keep it (under its id in the new snapshot).
    Stay(BackendId),
    Move(BackendId),
    End,
}

/// The flow table of one worker (no lock: each worker owns its own).
pub struct UdpFlowTable {
    /// As given, with the capacity clamped to 1..=[`NIL`].
    config: UdpFlowConfig,
    map: HashMap<FlowKey, u32, ahash::RandomState>,
    slots: Vec<Slot>,
    /// Head of the free-slot chain.
    free: u32,
    /// The least recently seen flow: next to expire, first to evict.
    oldest: u32,
    newest: u32,
    events: VecDeque<FlowEvent>,
    stats: FlowTableStats,
    /// The generation of the last snapshot applied.
    generation: Option<u64>,
    /// That snapshot's backend names by id, to remap ids when a reload changes the set.
    names: Vec<String>,
    /// The latest `now` seen: a `now` that steps back is taken as this, so
    /// the recency list stays in `last_seen` order and expiry stays O(1).
    clock: Duration,
}

impl UdpFlowTable {
    /// An empty table. The snapshot it routes against is given per call; the
    /// table remembers the generation it last saw (see [`Self::handle_snapshot`]).
    pub fn new(config: UdpFlowConfig, seeds: FlowTableSeeds) -> Self {
        let capacity = config.capacity.clamp(1, NIL as usize);
        let presize = capacity.min(PRESIZE_LIMIT);
        let [k0, k1, k2, k3] = seeds;
        let hasher = ahash::RandomState::with_seeds(k0, k1, k2, k3);
        UdpFlowTable {
            config: UdpFlowConfig { capacity, ..config },
            map: HashMap::with_capacity_and_hasher(presize, hasher),
            slots: Vec::with_capacity(presize),
            free: NIL,
            oldest: NIL,
            newest: NIL,
            events: VecDeque::with_capacity(EVENT_QUEUE_PRESIZE),
            stats: FlowTableStats::default(),
            generation: None,
            names: Vec::new(),
            clock: Duration::ZERO,
        }
    }

    /// The table's bounds, its capacity as used (at least 1).
    pub fn config(&self) -> UdpFlowConfig {
        self.config
    }

    /// A client's datagram: the flow it belongs to, or a new one hashed by
    /// `snapshot`. Touches the flow (it is no longer idle). Calls
    /// [`Self::handle_snapshot`] first when `snapshot` is newer than the last
    /// one seen, so a moved backend is never used; if that moves or ends this
    /// key's flow, the decision says so (`Moved`, or `Refused` with `ended`).
    /// Flows idle for the timeout as of `now` end first, this key's included,
    /// even if [`Self::handle_timeout`] has not been called yet.
    pub fn handle_datagram(
        &mut self,
        key: &FlowKey,
        snapshot: &Snapshot,
        now: Duration,
    ) -> FlowDecision {
        let (now, slot, held) = self.catch_up(key, snapshot, now);
        self.route_by_table(key, slot, held, snapshot, now)
    }

    /// A client's datagram already routed to `backend` by other means (a QUIC
    /// connection ID): pins the key's flow to it, creating it (`New`) or moving
    /// it (`Moved`; `Existing` when it was there already). A `backend` that is
    /// not healthy in `snapshot` cannot be pinned to: the datagram is then
    /// handled as [`Self::handle_datagram`] would (flow table, then hash).
    pub fn handle_routed(
        &mut self,
        key: &FlowKey,
        backend: BackendId,
        snapshot: &Snapshot,
        now: Duration,
    ) -> FlowDecision {
        let (now, slot, held) = self.catch_up(key, snapshot, now);
        if snapshot.is_routing_over_unhealthy() || !snapshot.is_healthy(backend) {
            return self.route_by_table(key, slot, held, snapshot, now);
        }
        let Some(slot) = slot else {
            let (flow, evicted) = self.insert(*key, backend, now);
            return FlowDecision::New {
                flow,
                backend,
                evicted,
            };
        };
        self.touch(slot, now);
        let flow = self.id(slot);
        let entry = &mut self.slots[slot as usize].entry;
        let from = match held {
            // The snapshot's move is counted already; this only changes its destination.
            Held::Moved { from, .. } => from,
            _ if entry.backend == backend => return FlowDecision::Existing { flow, backend },
            _ => {
                self.stats.moved += 1;
                entry.backend
            }
        };
        entry.backend = backend;
        FlowDecision::Moved {
            flow,
            from,
            to: backend,
        }
    }

    /// A backend's reply on `flow`: keeps it alive. A stale id is ignored
    /// (returns false), as is a flow that had been idle for the timeout as of
    /// `now` (it ends first, as in [`Self::handle_datagram`]).
    pub fn handle_reply(&mut self, flow: FlowId, now: Duration) -> bool {
        let now = self.advance(now);
        self.expire(now);
        match self.live_slot(flow) {
            Some(slot) => {
                self.touch(slot, now);
                true
            }
            None => false,
        }
    }

    /// A new snapshot (health change or reload): flows on a backend that is
    /// down or gone move to their key's backend in `snapshot`; when no backend
    /// is healthy (or `snapshot` routes over unhealthy ones), every flow ends.
    /// A healthy backend drained to weight 0 keeps its flows. Backend ids are
    /// remapped by name when the backend set changed. Results are queued for
    /// [`Self::poll_event`]. A snapshot no newer than the last one applied is
    /// ignored. Off the per-datagram path: walks every flow, once per generation.
    pub fn handle_snapshot(&mut self, snapshot: &Snapshot, now: Duration) {
        let now = self.advance(now);
        self.expire(now);
        self.apply_snapshot(snapshot, NIL);
    }

    /// Ends every flow idle for the timeout as of `now` (queued for `poll_event`).
    pub fn handle_timeout(&mut self, now: Duration) {
        let now = self.advance(now);
        self.expire(now);
    }

    /// Ends a flow at the caller's request (its upstream failed; shutdown).
    /// Its end is also queued for [`Self::poll_event`], so ends are counted in
    /// one place. A stale id is ignored (`None`).
    pub fn close(&mut self, flow: FlowId) -> Option<FlowEntry> {
        let slot = self.live_slot(flow)?;
        Some(self.remove(slot, FlowEnd::Closed))
    }

    /// When the next flow expires, if any: call [`Self::handle_timeout`] then.
    /// It is the least recently seen flow's `last_seen + idle_timeout`.
    pub fn poll_timeout(&self) -> Option<Duration> {
        (self.oldest != NIL).then(|| self.deadline(self.oldest))
    }

    /// The next flow event, oldest first.
    pub fn poll_event(&mut self) -> Option<FlowEvent> {
        self.events.pop_front()
    }

    pub fn get(&self, flow: FlowId) -> Option<&FlowEntry> {
        let slot = self.live_slot(flow)?;
        Some(&self.slots[slot as usize].entry)
    }

    pub fn lookup(&self, key: &FlowKey) -> Option<FlowId> {
        self.map.get(key).map(|&slot| self.id(slot))
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn stats(&self) -> FlowTableStats {
        FlowTableStats {
            active: self.len(),
            ..self.stats
        }
    }

    /// The generation of the last snapshot applied.
    pub fn generation(&self) -> Option<u64> {
        self.generation
    }

    /// What every datagram does first: takes `now` forward, ends idle flows,
    /// then applies `snapshot` if it is newer, holding back what that does to
    /// `key`'s flow for the datagram's decision. Returns the flow's slot if it
    /// is still live.
    fn catch_up(
        &mut self,
        key: &FlowKey,
        snapshot: &Snapshot,
        now: Duration,
    ) -> (Duration, Option<u32>, Held) {
        let now = self.advance(now);
        self.expire(now);
        let slot = self.map.get(key).copied();
        let held = self.apply_snapshot(snapshot, slot.unwrap_or(NIL));
        let slot = slot.filter(|&s| self.slots[s as usize].live);
        (now, slot, held)
    }

    /// The decision for a datagram by the flow table, then the hash.
    fn route_by_table(
        &mut self,
        key: &FlowKey,
        slot: Option<u32>,
        held: Held,
        snapshot: &Snapshot,
        now: Duration,
    ) -> FlowDecision {
        if let Some(slot) = slot {
            self.touch(slot, now);
            let flow = self.id(slot);
            return match held {
                Held::Moved { from, to } => FlowDecision::Moved { flow, from, to },
                _ => FlowDecision::Existing {
                    flow,
                    backend: self.slots[slot as usize].entry.backend,
                },
            };
        }
        let backend = match snapshot.is_routing_over_unhealthy() {
            true => None,
            false => snapshot.lookup(key),
        };
        let Some(backend) = backend else {
            let ended = match held {
                Held::Ended(flow) => Some(flow),
                _ => None,
            };
            return FlowDecision::Refused { ended };
        };
        let (flow, evicted) = self.insert(*key, backend, now);
        FlowDecision::New {
            flow,
            backend,
            evicted,
        }
    }

    /// Applies `snapshot` if it is newer than the last one: keeps, moves or
    /// ends every flow. What happens to the flow in slot `held` (NIL: none) is
    /// returned instead of queued when it is a move.
    fn apply_snapshot(&mut self, snapshot: &Snapshot, held: u32) -> Held {
        if self
            .generation
            .is_some_and(|seen| snapshot.generation() <= seen)
        {
            return Held::Kept;
        }
        self.generation = Some(snapshot.generation());
        let remap = self.remap_ids(snapshot);
        let mut outcome = Held::Kept;
        for slot in 0..self.slots.len() as u32 {
            if !self.slots[slot as usize].live {
                continue;
            }
            let entry = self.slots[slot as usize].entry;
            match reroute(&entry, snapshot, remap.as_deref()) {
                Reroute::Stay(id) => self.slots[slot as usize].entry.backend = id,
                Reroute::Move(to) => {
                    self.slots[slot as usize].entry.backend = to;
                    self.stats.moved += 1;
                    let from = entry.backend;
                    if slot == held {
                        outcome = Held::Moved { from, to };
                    } else {
                        let (flow, key) = (self.id(slot), entry.key);
                        let event = FlowEvent::Moved {
                            flow,
                            key,
                            from,
                            to,
                        };
                        self.events.push_back(event);
                    }
                }
                Reroute::End => {
                    if slot == held {
                        outcome = Held::Ended(self.id(slot));
                    }
                    self.remove(slot, FlowEnd::NoHealthyBackend);
                }
            }
        }
        outcome
    }

    /// Old id → new id when `snapshot`'s backend names differ from the last
    /// snapshot's (`None` when they are the same, the usual health change),
    /// and remembers the new names.
    fn remap_ids(&mut self, snapshot: &Snapshot) -> Option<Vec<Option<BackendId>>> {
        let backends = snapshot.backends();
        let same = backends.len() == self.names.len()
            && backends.iter().zip(&self.names).all(|(b, n)| b.name == *n);
        if same {
            return None;
        }
        let remap = self.names.iter().map(|n| backends.id_of(n)).collect();
        self.names = backends.iter().map(|b| b.name.clone()).collect();
        Some(remap)
    }

    /// A new flow in the newest position, evicting the least recently seen
    /// one when the table is full (its slot is the one the new flow takes).
    fn insert(
        &mut self,
        key: FlowKey,
        backend: BackendId,
        now: Duration,
    ) -> (FlowId, Option<FlowId>) {
        let evicted = (self.map.len() >= self.config.capacity).then(|| {
            let oldest = self.oldest;
            let id = self.id(oldest);
            self.remove(oldest, FlowEnd::Evicted);
            id
        });
        let entry = FlowEntry {
            key,
            backend,
            last_seen: now,
        };
        let slot = match self.free {
            NIL => {
                self.slots.push(Slot {
                    entry,
                    generation: 0,
                    live: true,
                    older: NIL,
                    newer: NIL,
                });
                (self.slots.len() - 1) as u32
            }
            slot => {
                let s = &mut self.slots[slot as usize];
                self.free = s.newer;
                s.entry = entry;
                s.live = true;
                slot
            }
        };
        self.link_newest(slot);
        self.map.insert(key, slot);
        self.stats.created += 1;
        (self.id(slot), evicted)
    }

    /// Ends the flow in `slot`: unlinks it, frees the slot, makes its id
    /// stale, counts and reports the end.
    fn remove(&mut self, slot: u32, reason: FlowEnd) -> FlowEntry {
        let flow = self.id(slot);
        self.unlink(slot);
        let s = &mut self.slots[slot as usize];
        let entry = s.entry;
        s.live = false;
        s.generation = s.generation.wrapping_add(1);
        s.newer = self.free;
        self.free = slot;
        self.map.remove(&entry.key);
        let counter = match reason {
            FlowEnd::Expired => &mut self.stats.expired,
            FlowEnd::Evicted => &mut self.stats.evicted,
            FlowEnd::NoHealthyBackend => &mut self.stats.ended_no_backend,
            FlowEnd::Closed => &mut self.stats.closed,
        };
        *counter += 1;
        self.events.push_back(FlowEvent::Ended {
            flow,
            key: entry.key,
            backend: entry.backend,
            reason,
        });
        entry
    }

    /// Ends flows from the old end while their idle time has run out. Each
    /// flow expires once, so this is O(1) amortised per datagram.
    fn expire(&mut self, now: Duration) {
        while self.oldest != NIL && self.deadline(self.oldest) <= now {
            self.remove(self.oldest, FlowEnd::Expired);
        }
    }

    fn deadline(&self, slot: u32) -> Duration {
        let last_seen = self.slots[slot as usize].entry.last_seen;
        last_seen.saturating_add(self.config.idle_timeout)
    }

    fn advance(&mut self, now: Duration) -> Duration {
        self.clock = self.clock.max(now);
        self.clock
    }

    fn touch(&mut self, slot: u32, now: Duration) {
        self.slots[slot as usize].entry.last_seen = now;
        if self.newest != slot {
            self.unlink(slot);
            self.link_newest(slot);
        }
    }

    fn id(&self, slot: u32) -> FlowId {
        FlowId {
            slot,
            generation: self.slots[slot as usize].generation,
        }
    }

    fn live_slot(&self, flow: FlowId) -> Option<u32> {
        let s = self.slots.get(flow.slot())?;
        (s.live && s.generation == flow.generation).then_some(flow.slot)
    }

    fn unlink(&mut self, slot: u32) {
        let Slot { older, newer, .. } = self.slots[slot as usize];
        match older {
            NIL => self.oldest = newer,
            o => self.slots[o as usize].newer = newer,
        }
        match newer {
            NIL => self.newest = older,
            n => self.slots[n as usize].older = older,
        }
    }

    fn link_newest(&mut self, slot: u32) {
        let s = &mut self.slots[slot as usize];
        s.older = self.newest;
        s.newer = NIL;
        match self.newest {
            NIL => self.oldest = slot,
            n => self.slots[n as usize].newer = slot,
        }
        self.newest = slot;
    }
}

/// Where a snapshot puts one flow: on its own backend while that is healthy,
/// else on its key's backend in the snapshot, else nowhere. `remap` maps the
/// flow's id in the previous snapshot to its id in this one.
fn reroute(entry: &FlowEntry, snapshot: &Snapshot, remap: Option<&[Option<BackendId>]>) -> Reroute {
    if snapshot.is_routing_over_unhealthy() {
        return Reroute::End;
    }
    let current = match remap {
        None => Some(entry.backend),
        Some(remap) => remap.get(entry.backend as usize).copied().flatten(),
    };
    match current {
        Some(id) if snapshot.is_healthy(id) => Reroute::Stay(id),
        _ => snapshot
            .lookup(&entry.key)
            .map_or(Reroute::End, Reroute::Move),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::backend::{BackendSet, BackendSpec};
    use crate::snapshot::{NoHealthyBackends, SnapshotParams};

    const IDLE: Duration = Duration::from_secs(60);
    const SEEDS: FlowTableSeeds = [1, 2, 3, 4];

    /// A snapshot over `(name, weight, healthy)` backends.
    fn snapshot_with(
        generation: u64,
        policy: NoHealthyBackends,
        backends: &[(&str, u32, bool)],
    ) -> Snapshot {
        let specs = backends.iter().enumerate().map(|(i, &(name, weight, _))| {
            BackendSpec::new(
                name,
                SocketAddr::from(([127, 0, 1, i as u8 + 1], 80)),
                weight,
            )
        });
        let set = BackendSet::new(specs.collect()).unwrap();
        // The set sorts by name: health must follow it.
        let healthy = set
            .iter()
            .map(|b| backends.iter().find(|x| x.0 == b.name).unwrap().2)
            .collect();
        let params = SnapshotParams {
            table_size: 251,
            no_healthy_backends: policy,
            ..SnapshotParams::default()
        };
        Snapshot::build(generation, params, set, healthy).unwrap()
    }

    /// A snapshot over weight-1 backends, `Refuse` when none is healthy.
    fn snapshot(generation: u64, backends: &[(&str, bool)]) -> Snapshot {
        let b: Vec<_> = backends.iter().map(|&(n, up)| (n, 1, up)).collect();
        snapshot_with(generation, NoHealthyBackends::Refuse, &b)
    }

    fn key(port: u16) -> FlowKey {
        FlowKey::udp(
            SocketAddr::from(([127, 0, 0, 2], port)),
            SocketAddr::from(([127, 0, 0, 1], 53)),
        )
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn table(capacity: usize) -> UdpFlowTable {
        UdpFlowTable::new(
            UdpFlowConfig {
                capacity,
                idle_timeout: IDLE,
            },
            SEEDS,
        )
    }

    fn events(t: &mut UdpFlowTable) -> Vec<FlowEvent> {
        std::iter::from_fn(|| t.poll_event()).collect()
    }

    fn new_flow(d: FlowDecision) -> (FlowId, BackendId) {
        match d {
            FlowDecision::New { flow, backend, .. } => (flow, backend),
            other => panic!("expected a new flow, got {other:?}"),
        }
    }

    fn name(s: &Snapshot, id: BackendId) -> &str {
        &s.backend(id).unwrap().name
    }

    const ABC: [(&str, bool); 3] = [("a", true), ("b", true), ("c", true)];

    #[test]
    fn a_flow_stays_on_its_first_backend() {
        let s = snapshot(1, &ABC);
        let mut t = table(16);
        let (flow, backend) = new_flow(t.handle_datagram(&key(1), &s, secs(0)));
        assert_eq!(Some(backend), s.lookup(&key(1)));
        assert_eq!(
            t.handle_datagram(&key(1), &s, secs(1)),
            FlowDecision::Existing { flow, backend }
        );
        assert_eq!(t.lookup(&key(1)), Some(flow));
        assert_eq!(t.get(flow).unwrap().last_seen, secs(1));
        assert_eq!(t.generation(), Some(1));
        let stats = t.stats();
        assert_eq!((stats.active, stats.created), (1, 1));
    }

    #[test]
    fn a_flow_expires_exactly_at_the_idle_timeout() {
        let s = snapshot(1, &ABC);
        let mut t = table(16);
        let (flow, backend) = new_flow(t.handle_datagram(&key(1), &s, secs(10)));
        // A reply is traffic too: it pushes the deadline out.
        assert!(t.handle_reply(flow, secs(30)));
        let deadline = secs(30) + IDLE;
        assert_eq!(t.poll_timeout(), Some(deadline));
        t.handle_timeout(deadline - Duration::from_nanos(1));
        assert_eq!(t.len(), 1);
        assert!(events(&mut t).is_empty());
        t.handle_timeout(deadline);
        assert!(t.is_empty());
        assert_eq!(t.poll_timeout(), None);
        assert_eq!(
            events(&mut t),
            [FlowEvent::Ended {
                flow,
                key: key(1),
                backend,
                reason: FlowEnd::Expired
            }]
        );
        assert_eq!(t.get(flow), None);
        assert_eq!(t.stats().expired, 1);
    }

    /// A late timer does not keep a flow alive: a datagram at its deadline
    /// ends it and starts a new one.
    #[test]
    fn a_datagram_at_the_deadline_starts_a_new_flow() {
        let s = snapshot(1, &ABC);
        let mut t = table(16);
        let (old, _) = new_flow(t.handle_datagram(&key(1), &s, secs(0)));
        let (new, _) = new_flow(t.handle_datagram(&key(1), &s, IDLE));
        assert_ne!(old, new);
        assert!(matches!(
            events(&mut t)[..],
            [FlowEvent::Ended {
                reason: FlowEnd::Expired,
                flow,
                ..
            }] if flow == old
        ));
        assert!(!t.handle_reply(old, IDLE));
        assert_eq!(t.stats().created, 2);
    }

    #[test]
    fn eviction_takes_the_least_recently_seen_flow_replies_included() {
        let s = snapshot(1, &ABC);
        let mut t = table(3);
        let ids: Vec<FlowId> = (1..=3)
            .map(|p| new_flow(t.handle_datagram(&key(p), &s, secs(p as u64))).0)
            .collect();
        // Flow 1 is the oldest by its datagram, but a reply makes it the newest.
        assert!(t.handle_reply(ids[0], secs(4)));
        let d = t.handle_datagram(&key(4), &s, secs(5));
        let FlowDecision::New { flow, evicted, .. } = d else {
            panic!("{d:?}")
        };
        assert_eq!(evicted, Some(ids[1]));
        assert_eq!(
            flow.slot(),
            ids[1].slot(),
            "the new flow takes the evicted slot"
        );
        assert!(matches!(
            events(&mut t)[..],
            [FlowEvent::Ended { flow, key: k, reason: FlowEnd::Evicted, .. }]
                if flow == ids[1] && k == key(2)
        ));
        assert_eq!(t.len(), 3);
        assert_eq!(t.lookup(&key(2)), None);
        assert_eq!(t.lookup(&key(1)), Some(ids[0]));
        assert_eq!(t.lookup(&key(3)), Some(ids[2]));
        assert_eq!(t.stats().evicted, 1);
    }

    #[test]
    fn a_stale_flow_id_is_ignored_after_its_slot_is_reused() {
        let s = snapshot(1, &ABC);
        let mut t = table(1);
        let (a, _) = new_flow(t.handle_datagram(&key(1), &s, secs(0)));
        let entry = t.close(a).unwrap();
        assert_eq!(entry.key, key(1));
        let (b, _) = new_flow(t.handle_datagram(&key(2), &s, secs(1)));
        assert_eq!(a.slot(), b.slot());
        assert_ne!(a, b);
        assert_eq!(t.get(a), None);
        assert!(!t.handle_reply(a, secs(50)));
        assert_eq!(
            t.poll_timeout(),
            Some(secs(1) + IDLE),
            "stale reply touched nothing"
        );
        assert_eq!(t.close(a), None);
        assert_eq!(t.get(b).unwrap().key, key(2));
        let ended: Vec<_> = events(&mut t)
            .into_iter()
            .filter_map(|e| match e {
                FlowEvent::Ended { flow, reason, .. } => Some((flow, reason)),
                FlowEvent::Moved { .. } => None,
            })
            .collect();
        assert_eq!(ended, [(a, FlowEnd::Closed)]);
        assert_eq!(t.stats().closed, 1);
    }

    #[test]
    fn capacity_zero_holds_one_flow() {
        let s = snapshot(1, &ABC);
        let mut t = table(0);
        assert_eq!(t.config().capacity, 1);
        let (a, _) = new_flow(t.handle_datagram(&key(1), &s, secs(0)));
        let d = t.handle_datagram(&key(2), &s, secs(0));
        assert!(matches!(d, FlowDecision::New { evicted: Some(e), .. } if e == a));
        assert_eq!(t.len(), 1);
    }

    /// Flows on ports 0..n, by backend name.
    fn fill(t: &mut UdpFlowTable, s: &Snapshot, n: u16) -> Vec<(FlowId, String)> {
        (0..n)
            .map(|p| {
                let (flow, b) = new_flow(t.handle_datagram(&key(p), s, secs(0)));
                (flow, name(s, b).to_owned())
            })
            .collect()
    }

    #[test]
    fn flows_on_a_backend_that_goes_down_move_and_the_rest_stay() {
        let s1 = snapshot(1, &ABC);
        let mut t = table(1000);
        let before = fill(&mut t, &s1, 300);
        let s2 = snapshot(2, &[("a", true), ("b", false), ("c", true)]);
        t.handle_snapshot(&s2, secs(1));
        let moved: Vec<_> = events(&mut t)
            .into_iter()
            .map(|e| match e {
                FlowEvent::Moved {
                    flow,
                    key,
                    from,
                    to,
                } => (flow, key, from, to),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        let on_b = before.iter().filter(|(_, n)| n == "b").count();
        assert!(on_b > 50, "the hash spreads flows: {on_b} on b");
        assert_eq!(moved.len(), on_b);
        for (flow, k, from, to) in &moved {
            assert_eq!(name(&s1, *from), "b");
            assert_eq!(Some(*to), s2.lookup(k));
            assert_eq!(t.get(*flow).unwrap().backend, *to);
        }
        // The others stay on their backend, whatever s2's table says for them now.
        for (flow, n) in before.iter().filter(|(_, n)| n != "b") {
            assert_eq!(name(&s2, t.get(*flow).unwrap().backend), n);
        }
        assert_eq!(t.stats().moved, on_b as u64);
        assert_eq!(t.len(), 300);
    }

    /// When the datagram's own call applies the snapshot, its flow's move is
    /// its decision; the other flows' moves are events.
    #[test]
    fn the_datagram_that_applies_a_snapshot_gets_its_move_as_the_decision() {
        let s1 = snapshot(1, &ABC);
        let mut t = table(1000);
        let before = fill(&mut t, &s1, 300);
        let (flow, _) = before.iter().find(|(_, n)| n == "b").unwrap().clone();
        let k = t.get(flow).unwrap().key;
        let s2 = snapshot(2, &[("a", true), ("b", false), ("c", true)]);
        let d = t.handle_datagram(&k, &s2, secs(1));
        let to = s2.lookup(&k).unwrap();
        assert_eq!(
            d,
            FlowDecision::Moved {
                flow,
                from: s1.backends().id_of("b").unwrap(),
                to
            }
        );
        let evs = events(&mut t);
        let on_b = before.iter().filter(|(_, n)| n == "b").count();
        assert_eq!(evs.len(), on_b - 1);
        assert!(evs
            .iter()
            .all(|e| matches!(e, FlowEvent::Moved { flow: f, .. } if *f != flow)));
        assert_eq!(t.stats().moved, on_b as u64, "each move counted once");
        assert_eq!(
            t.handle_datagram(&k, &s2, secs(2)),
            FlowDecision::Existing { flow, backend: to }
        );
    }

    #[test]
    fn when_every_backend_is_down_every_flow_ends_and_new_ones_are_refused() {
        let s1 = snapshot(1, &ABC);
        let mut t = table(1000);
        let before = fill(&mut t, &s1, 50);
        let down = snapshot(2, &[("a", false), ("b", false), ("c", false)]);
        t.handle_snapshot(&down, secs(1));
        assert!(t.is_empty());
        let evs = events(&mut t);
        assert_eq!(evs.len(), 50);
        assert!(evs.iter().all(|e| matches!(
            e,
            FlowEvent::Ended {
                reason: FlowEnd::NoHealthyBackend,
                ..
            }
        )));
        assert!(before.iter().all(|(f, _)| t.get(*f).is_none()));
        assert_eq!(
            t.handle_datagram(&key(1), &down, secs(2)),
            FlowDecision::Refused { ended: None }
        );
        assert!(t.is_empty());
        assert_eq!(t.stats().ended_no_backend, 50);
        assert_eq!(t.stats().created, 50);
    }

    /// The datagram whose call learns that all are down names its ended flow.
    #[test]
    fn a_refused_datagram_names_the_flow_its_call_ended() {
        let s1 = snapshot(1, &ABC);
        let mut t = table(16);
        let (flow, backend) = new_flow(t.handle_datagram(&key(1), &s1, secs(0)));
        let down = snapshot(2, &[("a", false), ("b", false), ("c", false)]);
        assert_eq!(
            t.handle_datagram(&key(1), &down, secs(1)),
            FlowDecision::Refused { ended: Some(flow) }
        );
        assert_eq!(
            events(&mut t),
            [FlowEvent::Ended {
                flow,
                key: key(1),
                backend,
                reason: FlowEnd::NoHealthyBackend
            }]
        );
    }

    /// `route-all` puts unhealthy backends back in the table for TCP; UDP
    /// flows still end, as Azure ends them, and new ones are refused.
    #[test]
    fn routing_over_unhealthy_backends_ends_udp_flows_too() {
        let mut t = table(16);
        fill(&mut t, &snapshot(1, &ABC), 10);
        let all = NoHealthyBackends::RouteAll;
        let s2 = snapshot_with(2, all, &[("a", 1, false), ("b", 1, false)]);
        assert!(s2.is_routing_over_unhealthy());
        assert!(matches!(
            t.handle_datagram(&key(1), &s2, secs(1)),
            FlowDecision::Refused { ended: Some(_) }
        ));
        assert!(t.is_empty());
        assert_eq!(
            t.handle_routed(&key(1), 0, &s2, secs(1)),
            FlowDecision::Refused { ended: None }
        );
    }

    #[test]
    fn a_drained_backend_keeps_its_flows_but_takes_no_new_ones() {
        let s1 = snapshot(1, &ABC);
        let mut t = table(1000);
        let before = fill(&mut t, &s1, 200);
        let s2 = snapshot_with(
            2,
            NoHealthyBackends::Refuse,
            &[("a", 1, true), ("b", 0, true), ("c", 1, true)],
        );
        t.handle_snapshot(&s2, secs(1));
        assert!(events(&mut t).is_empty());
        for (flow, n) in &before {
            assert_eq!(name(&s2, t.get(*flow).unwrap().backend), n);
        }
        let b = s2.backends().id_of("b").unwrap();
        for p in 1000..1200 {
            let (_, backend) = new_flow(t.handle_datagram(&key(p), &s2, secs(2)));
            assert_ne!(backend, b);
        }
    }

    /// A reload that adds a backend named first shifts every id by one: flows
    /// keep their backend by name. One that removes a backend moves its flows.
    #[test]
    fn a_reload_remaps_backend_ids_by_name() {
        let s1 = snapshot(1, &[("b", true), ("c", true), ("d", true)]);
        let mut t = table(1000);
        let before = fill(&mut t, &s1, 300);
        let s2 = snapshot(2, &[("a", true), ("b", true), ("c", true), ("d", true)]);
        assert_eq!(s2.backends().id_of("b"), Some(1));
        t.handle_snapshot(&s2, secs(1));
        assert!(events(&mut t).is_empty(), "no flow moves: none is down");
        for (flow, n) in &before {
            assert_eq!(name(&s2, t.get(*flow).unwrap().backend), n);
        }
        let s3 = snapshot(3, &[("a", true), ("b", true), ("d", true)]);
        t.handle_snapshot(&s3, secs(2));
        let evs = events(&mut t);
        assert_eq!(evs.len(), before.iter().filter(|(_, n)| n == "c").count());
        for e in evs {
            let FlowEvent::Moved { from, to, key, .. } = e else {
                panic!("{e:?}")
            };
            assert_eq!(
                name(&s2, from),
                "c",
                "from is the id under the previous snapshot"
            );
            assert_eq!(Some(to), s3.lookup(&key));
        }
        for (flow, _) in &before {
            let n = name(&s3, t.get(*flow).unwrap().backend);
            assert!(["a", "b", "d"].contains(&n));
        }
    }

    #[test]
    fn an_older_or_equal_snapshot_is_ignored() {
        let s2 = snapshot(2, &ABC);
        let mut t = table(16);
        let (flow, backend) = new_flow(t.handle_datagram(&key(1), &s2, secs(0)));
        let stale = snapshot(1, &[("a", false), ("b", false), ("c", false)]);
        t.handle_snapshot(&stale, secs(1));
        assert_eq!(t.generation(), Some(2));
        assert_eq!(t.get(flow).unwrap().backend, backend);
        assert!(events(&mut t).is_empty());
    }

    #[test]
    fn handle_routed_pins_creates_and_moves() {
        let s = snapshot(1, &ABC);
        let mut t = table(16);
        let k = key(7);
        // Pinned to a backend that is not the hash's choice.
        let hashed = s.lookup(&k).unwrap();
        let pin = (hashed + 1) % 3;
        let (flow, backend) = new_flow(t.handle_routed(&k, pin, &s, secs(0)));
        assert_eq!(backend, pin);
        assert_eq!(
            t.handle_routed(&k, pin, &s, secs(1)),
            FlowDecision::Existing { flow, backend: pin }
        );
        // Plain datagrams of the flow follow the pin, not the hash.
        assert_eq!(
            t.handle_datagram(&k, &s, secs(2)),
            FlowDecision::Existing { flow, backend: pin }
        );
        let other = (pin + 1) % 3;
        assert_eq!(
            t.handle_routed(&k, other, &s, secs(3)),
            FlowDecision::Moved {
                flow,
                from: pin,
                to: other
            }
        );
        assert_eq!(t.get(flow).unwrap().backend, other);
        assert_eq!(t.stats().moved, 1);
        assert!(
            events(&mut t).is_empty(),
            "a returned move is not also queued"
        );
    }

    /// A connection ID naming a backend that is down cannot pin: the flow
    /// table (then the hash) decides, as for any datagram.
    #[test]
    fn handle_routed_to_a_down_backend_falls_back_to_the_table() {
        let s1 = snapshot(1, &ABC);
        let mut t = table(16);
        let k = key(7);
        let (flow, backend) = new_flow(t.handle_datagram(&k, &s1, secs(0)));
        let down = (backend + 1) % 3;
        let mut health = ABC;
        health[down as usize].1 = false;
        let s2 = snapshot(2, &health);
        assert_eq!(
            t.handle_routed(&k, down, &s2, secs(1)),
            FlowDecision::Existing { flow, backend }
        );
        let (_, b) = new_flow(t.handle_routed(&key(8), down, &s2, secs(1)));
        assert_eq!(Some(b), s2.lookup(&key(8)));
    }

    mod model {
        //! The table against a plain Vec-based model of the same semantics.
        use proptest::prelude::*;

        use super::*;

        const NAMES: [&str; 4] = ["a", "b", "c", "d"];
        const PORTS: u16 = 12;

        #[derive(Clone, Debug)]
        pub enum Op {
            Datagram {
                port: u16,
                dt: u64,
            },
            Routed {
                port: u16,
                backend: u8,
                dt: u64,
            },
            Reply {
                port: u16,
                dt: u64,
            },
            Close {
                port: u16,
            },
            /// A new snapshot; `announce` hands it to the table at once,
            /// otherwise the next datagram brings it.
            Snapshot {
                set: u8,
                health: u8,
                drain: u8,
                route_all: bool,
                announce: bool,
                dt: u64,
            },
            Timeout {
                dt: u64,
            },
        }

        fn op() -> impl Strategy<Value = Op> {
            let port = 0..PORTS;
            let dt = 0..25u64;
            prop_oneof![
                4 => (port.clone(), dt.clone()).prop_map(|(port, dt)| Op::Datagram { port, dt }),
                2 => (port.clone(), 0..4u8, dt.clone())
                    .prop_map(|(port, backend, dt)| Op::Routed { port, backend, dt }),
                2 => (port.clone(), dt.clone()).prop_map(|(port, dt)| Op::Reply { port, dt }),
                1 => port.prop_map(|port| Op::Close { port }),
                1 => (1..16u8, 0..16u8, 0..16u8, any::<bool>(), any::<bool>(), dt.clone()).prop_map(
                    |(set, health, drain, route_all, announce, dt)| Op::Snapshot { set, health, drain, route_all, announce, dt }
                ),
                1 => dt.prop_map(|dt| Op::Timeout { dt }),
            ]
        }

        /// One model flow; `serial` tells its incarnations apart.
        #[derive(Clone, Debug)]
        struct MFlow {
            key: FlowKey,
            backend: String,
            last_seen: Duration,
            serial: u64,
        }

        /// Flows oldest-seen first, backends by name.
        struct Model {
            flows: Vec<MFlow>,
            capacity: usize,
            generation: u64,
            clock: Duration,
            serials: u64,
        }

        #[derive(Debug, PartialEq)]
        enum Kind {
            Existing,
            New,
            Moved,
            Refused,
        }

        impl Model {
            fn advance(&mut self, dt: u64) -> Duration {
                self.clock += Duration::from_secs(dt);
                let now = self.clock;
                self.flows.retain(|f| f.last_seen + IDLE > now);
                now
            }

            /// Applies `s` if newer and returns the serials of moved flows.
            fn apply_snapshot(&mut self, s: &Snapshot) -> Vec<u64> {
                let mut moved = Vec::new();
                if s.generation() <= self.generation {
                    return moved;
                }
                self.generation = s.generation();
                self.flows.retain_mut(|f| {
                    if s.is_routing_over_unhealthy() {
                        return false;
                    }
                    let id = s.backends().id_of(&f.backend);
                    if id.is_some_and(|id| s.is_healthy(id)) {
                        return true;
                    }
                    match s.lookup(&f.key) {
                        Some(to) => {
                            f.backend = name(s, to).to_owned();
                            moved.push(f.serial);
                            true
                        }
                        None => false,
                    }
                });
                moved
            }

            fn touch(&mut self, i: usize, now: Duration) -> u64 {
                let mut f = self.flows.remove(i);
                f.last_seen = now;
                let serial = f.serial;
                self.flows.push(f);
                serial
            }

            fn insert(&mut self, key: FlowKey, backend: &str, now: Duration) -> u64 {
                if self.flows.len() >= self.capacity {
                    self.flows.remove(0);
                }
                self.serials += 1;
                self.flows.push(MFlow {
                    key,
                    backend: backend.to_owned(),
                    last_seen: now,
                    serial: self.serials,
                });
                self.serials
            }

            fn datagram(
                &mut self,
                key: FlowKey,
                pin: Option<BackendId>,
                s: &Snapshot,
                dt: u64,
            ) -> (Kind, Option<u64>) {
                let now = self.advance(dt);
                let had = self.flows.iter().find(|f| f.key == key).map(|f| f.serial);
                let moved = self.apply_snapshot(s);
                let moved = had.is_some_and(|h| moved.contains(&h));
                let pin = pin.filter(|&b| !s.is_routing_over_unhealthy() && s.is_healthy(b));
                let existing = self.flows.iter().position(|f| f.key == key);
                match (existing, pin) {
                    (Some(i), Some(b)) => {
                        let changed = self.flows[i].backend != name(s, b);
                        self.flows[i].backend = name(s, b).to_owned();
                        let serial = self.touch(i, now);
                        (
                            if moved || changed {
                                Kind::Moved
                            } else {
                                Kind::Existing
                            },
                            Some(serial),
                        )
                    }
                    (Some(i), None) => {
                        let serial = self.touch(i, now);
                        (
                            if moved { Kind::Moved } else { Kind::Existing },
                            Some(serial),
                        )
                    }
                    (None, Some(b)) => (Kind::New, Some(self.insert(key, name(s, b), now))),
                    (None, None) if s.is_routing_over_unhealthy() => (Kind::Refused, None),
                    (None, None) => match s.lookup(&key) {
                        Some(b) => (Kind::New, Some(self.insert(key, name(s, b), now))),
                        None => (Kind::Refused, None),
                    },
                }
            }
        }

        fn build(generation: u64, set: u8, health: u8, drain: u8, route_all: bool) -> Snapshot {
            let backends: Vec<(&str, u32, bool)> = (0..4)
                .filter(|i| set & (1 << i) != 0)
                .map(|i| {
                    (
                        NAMES[i],
                        u32::from(drain & (1 << i) == 0),
                        health & (1 << i) != 0,
                    )
                })
                .collect();
            let policy = if route_all {
                NoHealthyBackends::RouteAll
            } else {
                NoHealthyBackends::Refuse
            };
            snapshot_with(generation, policy, &backends)
        }

        /// The table and the model side by side, with what a caller holds.
        struct Harness {
            t: UdpFlowTable,
            m: Model,
            /// The snapshot a worker would load now.
            s: Snapshot,
            /// The snapshot the table has applied, which its backend ids refer to.
            applied: Snapshot,
            /// Per port, the last flow id the caller was given and the model's serial for it.
            held: HashMap<u16, (FlowId, u64)>,
        }

        impl Harness {
            fn new(capacity: usize) -> Self {
                let s = build(1, 0b111, 0b111, 0, false);
                let mut t = table(capacity);
                let mut m = Model {
                    flows: Vec::new(),
                    capacity: capacity.max(1),
                    generation: 0,
                    clock: Duration::ZERO,
                    serials: 0,
                };
                t.handle_snapshot(&s, Duration::ZERO);
                m.apply_snapshot(&s);
                let applied = s.clone();
                let held = HashMap::new();
                Harness {
                    t,
                    m,
                    s,
                    applied,
                    held,
                }
            }

            fn step(&mut self, op: Op) -> Result<(), TestCaseError> {
                match op {
                    Op::Datagram { port, dt } => self.datagram(port, None, dt)?,
                    Op::Routed { port, backend, dt } => {
                        self.datagram(port, Some(u32::from(backend)), dt)?
                    }
                    Op::Reply { port, dt } => self.reply(port, dt)?,
                    Op::Close { port } => self.close(port)?,
                    Op::Snapshot {
                        set,
                        health,
                        drain,
                        route_all,
                        announce,
                        dt,
                    } => {
                        self.s = build(self.s.generation() + 1, set, health, drain, route_all);
                        if announce {
                            let now = self.m.advance(dt);
                            self.m.apply_snapshot(&self.s);
                            self.t.handle_snapshot(&self.s, now);
                            self.applied = self.s.clone();
                        }
                    }
                    Op::Timeout { dt } => {
                        let now = self.m.advance(dt);
                        self.t.handle_timeout(now);
                    }
                }
                prop_assert_eq!(self.t.generation(), Some(self.applied.generation()));
                check(&mut self.t, &self.m, &self.applied, &self.held)
            }

            /// A datagram, QUIC-routed to `pin` if given: same kind of
            /// decision, and a known flow keeps the id it was given.
            fn datagram(
                &mut self,
                port: u16,
                pin: Option<BackendId>,
                dt: u64,
            ) -> Result<(), TestCaseError> {
                let (want, serial) = self.m.datagram(key(port), pin, &self.s, dt);
                let now = self.m.clock;
                let d = match pin {
                    Some(b) => self.t.handle_routed(&key(port), b, &self.s, now),
                    None => self.t.handle_datagram(&key(port), &self.s, now),
                };
                self.applied = self.s.clone();
                let (kind, flow) = match d {
                    FlowDecision::Existing { flow, .. } => (Kind::Existing, Some(flow)),
                    FlowDecision::New { flow, .. } => (Kind::New, Some(flow)),
                    FlowDecision::Moved { flow, .. } => (Kind::Moved, Some(flow)),
                    FlowDecision::Refused { .. } => (Kind::Refused, None),
                };
                prop_assert_eq!(&kind, &want, "{:?}", d);
                if let (Some(flow), Some(serial)) = (flow, serial) {
                    if kind != Kind::New {
                        let had = self.held.get(&port);
                        prop_assert_eq!(had, Some(&(flow, serial)), "a known flow keeps its id");
                    }
                    self.held.insert(port, (flow, serial));
                }
                Ok(())
            }

            /// A reply on the id last given for `port`, stale or not.
            fn reply(&mut self, port: u16, dt: u64) -> Result<(), TestCaseError> {
                let now = self.m.advance(dt);
                let Some(&(flow, serial)) = self.held.get(&port) else {
                    // No id to reply on: the time still passes for both.
                    self.t.handle_timeout(now);
                    return Ok(());
                };
                let live = self.m.flows.iter().position(|f| f.serial == serial);
                if let Some(i) = live {
                    self.m.touch(i, now);
                }
                prop_assert_eq!(self.t.handle_reply(flow, now), live.is_some());
                Ok(())
            }

            fn close(&mut self, port: u16) -> Result<(), TestCaseError> {
                let Some(&(flow, serial)) = self.held.get(&port) else {
                    return Ok(());
                };
                let live = self.m.flows.iter().position(|f| f.serial == serial);
                if let Some(i) = live {
                    self.m.flows.remove(i);
                }
                prop_assert_eq!(self.t.close(flow).is_some(), live.is_some());
                Ok(())
            }
        }

        /// Checks that the table and the model agree, and drains the events.
        fn check(
            t: &mut UdpFlowTable,
            m: &Model,
            s: &Snapshot,
            held: &HashMap<u16, (FlowId, u64)>,
        ) -> Result<(), TestCaseError> {
            prop_assert!(t.len() <= t.config().capacity);
            prop_assert_eq!(t.len(), m.flows.len());
            for f in &m.flows {
                let flow = t.lookup(&f.key);
                let port = f.key.src.port();
                prop_assert_eq!(flow, held.get(&port).map(|h| h.0));
                let entry = t.get(flow.unwrap()).unwrap();
                prop_assert_eq!(name(s, entry.backend), f.backend.as_str());
            }
            let oldest = m.flows.iter().map(|f| f.last_seen).min();
            prop_assert_eq!(t.poll_timeout(), oldest.map(|o| o + IDLE));
            while let Some(e) = t.poll_event() {
                if let FlowEvent::Ended { flow, .. } = e {
                    prop_assert_eq!(t.get(flow), None, "an ended flow's id is stale");
                }
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]
            #[test]
            fn the_table_agrees_with_a_plain_model(capacity in 0..6usize, ops in proptest::collection::vec(op(), 1..80)) {
                let mut h = Harness::new(capacity);
                for op in ops {
                    h.step(op)?;
                }
            }
        }
    }
}
