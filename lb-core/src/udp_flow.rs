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
//! The table is bounded: a new flow at capacity evicts the flow idle the
//! longest. Every expiry, eviction, move and end is counted and reported.
//!
//! Sans-I/O, as quinn-proto is: events go in (`handle_*`, with `now`),
//! decisions come out ([`FlowDecision`], `poll_*`). Nothing here reads a clock
//! or draws randomness: the map's hasher seeds arrive as an argument.

use std::time::Duration;

use crate::backend::BackendId;
use crate::flow::FlowKey;
use crate::snapshot::Snapshot;

/// Seeds for the table's in-process ahash map (never for routing: the
/// pinned flow hash does that).
pub type FlowTableSeeds = [u64; 4];

/// A table's bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpFlowConfig {
    /// Most flows held at once; a new flow beyond it evicts the one idle longest.
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
    /// names another backend): replace its upstream with one to `to`.
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
    /// No backend was healthy (Azure ends every UDP flow then).
    NoHealthyBackend,
    /// The caller closed it ([`UdpFlowTable::close`]), e.g. its upstream failed or the process is stopping.
    Closed,
}

/// Something that happened to a flow outside a [`FlowDecision`], for the
/// caller to act on (close or replace an upstream) and count.
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

/// The flow table of one worker (no lock: each worker owns its own).
pub struct UdpFlowTable {
    _todo: (),
}

impl UdpFlowTable {
    /// An empty table. The snapshot it routes against is given per call; the
    /// table remembers the generation it last saw (see [`Self::handle_snapshot`]).
    pub fn new(config: UdpFlowConfig, seeds: FlowTableSeeds) -> Self {
        let _ = (config, seeds);
        todo!()
    }

    pub fn config(&self) -> UdpFlowConfig {
        todo!()
    }

    /// A client's datagram: the flow it belongs to, or a new one hashed by
    /// `snapshot`. Touches the flow (it is no longer idle). Calls
    /// [`Self::handle_snapshot`] first when `snapshot` is newer than the last
    /// one seen, so a moved backend is never used.
    pub fn handle_datagram(
        &mut self,
        key: &FlowKey,
        snapshot: &Snapshot,
        now: Duration,
    ) -> FlowDecision {
        let _ = (key, snapshot, now);
        todo!()
    }

    /// A client's datagram already routed to `backend` by other means (a QUIC
    /// connection ID): pins the key's flow to it, creating it or moving it.
    pub fn handle_routed(
        &mut self,
        key: &FlowKey,
        backend: BackendId,
        snapshot: &Snapshot,
        now: Duration,
    ) -> FlowDecision {
        let _ = (key, backend, snapshot, now);
        todo!()
    }

    /// A backend's reply on `flow`: keeps it alive. A stale id is ignored.
    pub fn handle_reply(&mut self, flow: FlowId, now: Duration) {
        let _ = (flow, now);
        todo!()
    }

    /// A new snapshot (health change or reload): flows on a backend that is
    /// down or gone move to their key's backend in `snapshot`; when no backend
    /// is healthy, every flow ends. Backend ids are remapped by name when the
    /// backend set changed. Results are queued for [`Self::poll_event`].
    /// Off the per-datagram path: walks every flow, once per generation.
    pub fn handle_snapshot(&mut self, snapshot: &Snapshot, now: Duration) {
        let _ = (snapshot, now);
        todo!()
    }

    /// Ends every flow idle for the timeout as of `now` (queued for `poll_event`).
    pub fn handle_timeout(&mut self, now: Duration) {
        let _ = now;
        todo!()
    }

    /// Ends a flow at the caller's request (its upstream failed; shutdown).
    pub fn close(&mut self, flow: FlowId) -> Option<FlowEntry> {
        let _ = flow;
        todo!()
    }

    /// When the next flow expires, if any: call [`Self::handle_timeout`] then.
    pub fn poll_timeout(&self) -> Option<Duration> {
        todo!()
    }

    /// The next flow event, oldest first.
    pub fn poll_event(&mut self) -> Option<FlowEvent> {
        todo!()
    }

    pub fn get(&self, flow: FlowId) -> Option<&FlowEntry> {
        let _ = flow;
        todo!()
    }

    pub fn lookup(&self, key: &FlowKey) -> Option<FlowId> {
        let _ = key;
        todo!()
    }

    pub fn len(&self) -> usize {
        todo!()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn stats(&self) -> FlowTableStats {
        todo!()
    }

    /// The generation of the last snapshot applied.
    pub fn generation(&self) -> Option<u64> {
        todo!()
    }
}
