//! Routing snapshots and their lock-free publication.
//!
//! A [`Snapshot`] is immutable: backends, their health, the Maglev table built
//! over the healthy ones, and a generation number. Writers build a new one off
//! the hot path and publish it with one atomic pointer swap through
//! [`Published`]; readers never lock, never allocate and never see half a table.
//!
//! Publication uses `arc-swap` rather than crossbeam-epoch: a load is wait-free
//! and allocation-free (it borrows a per-thread debt slot instead of touching
//! the shared reference count), and a retired snapshot is freed as soon as its
//! last reader lets go, with no epoch to advance. That keeps memory flat under
//! constant republication without the readers having to pin anything.

use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};
use serde::{Deserialize, Serialize};

use crate::backend::{BackendId, BackendSet, BackendSpec};
use crate::flow::{DistributionMode, FlowKey};
use crate::hash::{flow_hash, FLOW_HASH_SEED};
use crate::maglev::{Choices, MaglevError, MaglevTable, DEFAULT_TABLE_SIZE};

/// What to do with new flows when no backend is healthy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NoHealthyBackends {
    /// Refuse new flows; established ones continue. Azure Standard's behaviour.
    #[default]
    Refuse,
    /// Route over every backend with a non-zero weight, healthy or not.
    RouteAll,
}

/// The parts of a frontend's configuration that shape its table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotParams {
    pub mode: DistributionMode,
    pub seed: u64,
    pub table_size: u32,
    pub no_healthy_backends: NoHealthyBackends,
}

impl Default for SnapshotParams {
    fn default() -> Self {
        SnapshotParams {
            mode: DistributionMode::FiveTuple,
            seed: FLOW_HASH_SEED,
            table_size: DEFAULT_TABLE_SIZE,
            no_healthy_backends: NoHealthyBackends::Refuse,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Table(#[from] MaglevError),
    #[error("health has {health} entries for {backends} backends")]
    HealthLength { health: usize, backends: usize },
}

/// Everything needed to route a new flow, frozen at one generation.
#[derive(Clone, Debug)]
pub struct Snapshot {
    generation: u64,
    params: SnapshotParams,
    backends: BackendSet,
    healthy: Vec<bool>,
    table: MaglevTable,
    routing_over_unhealthy: bool,
}

/// How a flow was routed, for the admin endpoint's explanations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub hash: u64,
    pub slot: usize,
    pub backend: Option<BackendId>,
}

impl Snapshot {
    /// Builds the table over the healthy backends with non-zero weight (or over
    /// all of them when none is healthy and the policy says so).
    pub fn build(
        generation: u64,
        params: SnapshotParams,
        backends: BackendSet,
        healthy: Vec<bool>,
    ) -> Result<Self, SnapshotError> {
        if healthy.len() != backends.len() {
            return Err(SnapshotError::HealthLength {
                health: healthy.len(),
                backends: backends.len(),
            });
        }
        let serving = |b: &BackendSpec, up: bool| if up { b.weight } else { 0 };
        let any_eligible = backends
            .iter()
            .zip(&healthy)
            .any(|(b, &up)| serving(b, up) > 0);
        let routing_over_unhealthy =
            !any_eligible && params.no_healthy_backends == NoHealthyBackends::RouteAll;
        let table = MaglevTable::build(
            params.table_size,
            backends.iter().zip(&healthy).map(|(b, &up)| {
                let weight = if routing_over_unhealthy {
                    b.weight
                } else {
                    serving(b, up)
                };
                (b.name.as_str(), weight)
            }),
        )?;
        Ok(Snapshot {
            generation,
            params,
            backends,
            healthy,
            table,
            routing_over_unhealthy,
        })
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn params(&self) -> &SnapshotParams {
        &self.params
    }

    pub fn mode(&self) -> DistributionMode {
        self.params.mode
    }

    pub fn backends(&self) -> &BackendSet {
        &self.backends
    }

    pub fn backend(&self, id: BackendId) -> Option<&BackendSpec> {
        self.backends.get(id)
    }

    pub fn is_healthy(&self, id: BackendId) -> bool {
        self.healthy.get(id as usize).copied().unwrap_or(false)
    }

    pub fn health(&self) -> &[bool] {
        &self.healthy
    }

    pub fn table(&self) -> &MaglevTable {
        &self.table
    }

    /// True when no backend was healthy and `RouteAll` put them all back in the table.
    pub fn is_routing_over_unhealthy(&self) -> bool {
        self.routing_over_unhealthy
    }

    /// The pinned hash of a flow under this snapshot's mode and seed.
    #[inline]
    pub fn hash(&self, key: &FlowKey) -> u64 {
        flow_hash(key, self.params.mode, self.params.seed)
    }

    /// The backend for a new flow: one hash plus one index. `None` means refuse it.
    #[inline]
    pub fn lookup(&self, key: &FlowKey) -> Option<BackendId> {
        self.table.lookup(self.hash(key))
    }

    /// The flow's backend choices in order: the primary, then distinct
    /// fallbacks, for retrying failed connects.
    #[inline]
    pub fn choices(&self, key: &FlowKey) -> Choices<'_> {
        self.table.choices(self.hash(key))
    }

    /// The full decision for one flow: its hash, its slot and the slot's owner.
    pub fn route(&self, key: &FlowKey) -> Route {
        let hash = self.hash(key);
        let slot = self.table.slot_of(hash);
        Route {
            hash,
            slot,
            backend: self.table.owner(slot),
        }
    }
}

/// An atomically replaceable `Arc<T>`: the one way a value the control plane
/// rebuilds reaches the data plane (a frontend's routing snapshot, and its
/// settings, each in its own cell). Generic, so it names what it does, not one
/// thing it holds.
pub struct Published<T> {
    current: ArcSwap<T>,
}

impl<T> Published<T> {
    pub fn new(initial: T) -> Self {
        Published {
            current: ArcSwap::from_pointee(initial),
        }
    }

    /// A short-lived, lock-free, allocation-free view of the current value.
    #[inline]
    pub fn load(&self) -> Guard<Arc<T>> {
        self.current.load()
    }

    /// An owned reference, for holders that outlive a lookup (one per connection, not per packet).
    pub fn load_full(&self) -> Arc<T> {
        self.current.load_full()
    }

    /// Publishes `next` and returns the value it replaced.
    pub fn publish(&self, next: T) -> Arc<T> {
        self.current.swap(Arc::new(next))
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Published<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Published").field(&*self.load()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn set(n: usize, weight: u32) -> BackendSet {
        BackendSet::new(
            (0..n)
                .map(|i| {
                    BackendSpec::new(
                        format!("node-{i}"),
                        SocketAddr::from(([127, 0, 1, i as u8 + 1], 80)),
                        weight,
                    )
                })
                .collect(),
        )
        .unwrap()
    }

    fn params(policy: NoHealthyBackends) -> SnapshotParams {
        SnapshotParams {
            table_size: 1_021,
            no_healthy_backends: policy,
            ..SnapshotParams::default()
        }
    }

    fn key(port: u16) -> FlowKey {
        FlowKey::tcp(
            SocketAddr::from(([127, 0, 0, 2], port)),
            SocketAddr::from(([127, 0, 0, 1], 8080)),
        )
    }

    #[test]
    fn unhealthy_backends_leave_the_table() {
        let s = Snapshot::build(
            1,
            params(NoHealthyBackends::Refuse),
            set(3, 1),
            vec![true, false, true],
        )
        .unwrap();
        assert_eq!(s.table().slot_counts(3)[1], 0);
        assert!((0..2000).all(|p| s.lookup(&key(p)) != Some(1)));
    }

    #[test]
    fn all_down_refuses_or_routes_over_all_by_policy() {
        let refuse = Snapshot::build(
            1,
            params(NoHealthyBackends::Refuse),
            set(3, 1),
            vec![false; 3],
        )
        .unwrap();
        assert_eq!(refuse.lookup(&key(1)), None);
        assert!(!refuse.is_routing_over_unhealthy());
        let all = Snapshot::build(
            1,
            params(NoHealthyBackends::RouteAll),
            set(3, 1),
            vec![false; 3],
        )
        .unwrap();
        assert!(all.lookup(&key(1)).is_some());
        assert!(all.is_routing_over_unhealthy());
    }

    #[test]
    fn route_agrees_with_lookup_and_choices() {
        let s = Snapshot::build(
            7,
            params(NoHealthyBackends::Refuse),
            set(4, 1),
            vec![true; 4],
        )
        .unwrap();
        for p in 0..500 {
            let k = key(p);
            let r = s.route(&k);
            assert_eq!(r.backend, s.lookup(&k));
            assert_eq!(r.backend, s.choices(&k).next());
            assert_eq!(r.slot, s.table().slot_of(r.hash));
        }
    }

    #[test]
    fn health_length_must_match() {
        let err = Snapshot::build(1, params(NoHealthyBackends::Refuse), set(2, 1), vec![true])
            .unwrap_err();
        assert_eq!(
            err,
            SnapshotError::HealthLength {
                health: 1,
                backends: 2
            }
        );
    }
}
