//! State shared between the control plane and the workers. Everything a worker
//! reads per connection is behind a [`Published`] (one atomic load) or an atomic.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lb_core::{AffinityTable, BackendId, HopModel, Published, QuicRouter, Snapshot};
use parking_lot::Mutex;
use prometheus::IntCounter;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::config::FrontendConfig;
use crate::flowlog::FlowLog;
use crate::metrics::{BackendHandles, FrontendHandles};
use crate::target::ZoneHop;

/// A backend as the data plane sees it: where to connect, and what to count.
pub struct BackendRuntime {
    pub name: Arc<str>,
    pub addr: SocketAddr,
    pub metrics: BackendHandles,
}

/// What one health state belongs to; lb-core's control plane owns the type,
/// re-exported here so the data plane names it where it names the rest.
pub use lb_core::HealthKey;

/// The routing snapshot plus the runtime handle of every backend in it, by id.
/// With the hop model, the backends are the nodes (see lb-core's glossary).
pub struct Routing {
    pub snapshot: Snapshot,
    pub backends: Vec<Arc<BackendRuntime>>,
    pub hop: Option<HopRouting>,
    /// QUIC frontends: server ID → backend id, for this snapshot's backends.
    pub quic: Option<QuicRouter>,
}

/// The node hop: the model, and each node's kube-proxy ClientIP affinity table.
pub struct HopRouting {
    pub model: HopModel,
    /// By node id. A table is only locked to open a connection under ClientIP
    /// affinity, never per packet; it outlives snapshots so pins survive reloads.
    pub affinity: Vec<Arc<Mutex<AffinityTable>>>,
    /// By node id, then endpoint index: the health key passive failures report.
    pub endpoint_keys: Vec<Vec<HealthKey>>,
    /// By node id: the node's zone (its pods' zone too), shared so a flow
    /// takes it without a copy.
    pub zones: Vec<Option<Arc<str>>>,
    /// The frontend's `cross_zone_rtt`.
    pub cross_zone_rtt: Duration,
    /// `lb_cross_zone_connections_total` by (from zone, to zone), for the
    /// pairs of different zones this model has: resolved at build, so a flow
    /// counts with an atomic add.
    pub cross_zone_counters: Vec<CrossZoneCounter>,
}

/// `lb_cross_zone_connections_total` for one ordered pair of zones.
pub struct CrossZoneCounter {
    pub from: Arc<str>,
    pub to: Arc<str>,
    pub counter: IntCounter,
}

impl HopRouting {
    /// The zones of a hop from node `from` to a pod on node `to`: `None`
    /// unless both have a zone.
    pub fn zone_hop(&self, from: u32, to: u32) -> Option<ZoneHop> {
        let zone = |n: u32| self.zones.get(n as usize)?.clone();
        Some(ZoneHop::new(zone(from)?, zone(to)?, self.cross_zone_rtt))
    }

    /// Counts one flow across `hop`'s zones, when it crosses. Zones are few,
    /// so a scan of the pairs is a handful of string compares.
    pub fn count_cross_zone(&self, hop: &ZoneHop) {
        if !hop.crosses() {
            return;
        }
        let pair = self
            .cross_zone_counters
            .iter()
            .find(|c| c.from == hop.node_zone && c.to == hop.endpoint_zone);
        if let Some(c) = pair {
            c.counter.inc();
        }
    }
}

/// The zones that are down, as the workers see them, and the way the admin
/// endpoint asks the control plane to change them. One per process, shared
/// by every frontend.
///
/// Workers read the set with one atomic load (a [`Published`]); a change
/// bumps `generation` and wakes each worker's zone watcher (see
/// [`crate::shutdown`]), which cuts that worker's flows through a down zone.
pub struct ZoneSignal {
    down: Published<BTreeSet<Arc<str>>>,
    generation: AtomicU64,
    changed: Notify,
    commands: mpsc::Sender<ZoneCommand>,
}

/// An admin's request to take a zone down or bring it up, and where the
/// control plane answers.
pub struct ZoneCommand {
    pub zone: String,
    pub down: bool,
    pub reply: oneshot::Sender<ZoneReply>,
}

/// The control plane's answer to a [`ZoneCommand`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ZoneReply {
    /// Done: the zone is now `down` (or up), and whether it changed.
    Done { down: bool, changed: bool },
    /// The admin asked to bring up a zone the config holds down.
    HeldByConfig,
    /// No node of any frontend is in that zone.
    Unknown,
}

impl ZoneSignal {
    pub fn new(commands: mpsc::Sender<ZoneCommand>) -> Self {
        ZoneSignal {
            down: Published::new(BTreeSet::new()),
            generation: AtomicU64::new(0),
            changed: Notify::new(),
            commands,
        }
    }

    /// The zones down now.
    pub fn down(&self) -> Arc<BTreeSet<Arc<str>>> {
        self.down.load_full()
    }

    /// Whether either zone of a hop is down.
    pub fn cuts(&self, hop: &ZoneHop) -> bool {
        let down = self.down.load();
        down.contains(&hop.node_zone) || down.contains(&hop.endpoint_zone)
    }

    /// Bumped by every [`ZoneSignal::publish`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Resolves once the set changes after `seen` (a [`ZoneSignal::generation`]).
    pub async fn changed_since(&self, seen: u64) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.generation() != seen {
                return;
            }
            notified.await;
        }
    }

    /// The control plane's new set of down zones; wakes every zone watcher.
    pub fn publish(&self, down: &BTreeSet<String>) {
        self.down
            .publish(down.iter().map(|z| Arc::from(z.as_str())).collect());
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_waiters();
    }

    /// Asks the control plane to take `zone` down (or up) and waits for its answer.
    pub async fn request(&self, zone: String, down: bool) -> Option<ZoneReply> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(ZoneCommand { zone, down, reply })
            .await
            .ok()?;
        answer.await.ok()
    }
}

impl Routing {
    pub fn backend(&self, id: BackendId) -> Option<&Arc<BackendRuntime>> {
        self.backends.get(id as usize)
    }
}

/// Health evidence the data plane reports to the control plane.
#[derive(Debug)]
pub struct PassiveFailure {
    pub frontend: usize,
    pub target: HealthKey,
}

/// What a frontend shares with the control plane and the other frontends.
pub struct FrontendLinks {
    pub passive_failures: mpsc::Sender<PassiveFailure>,
    pub flow_log: Option<Arc<FlowLog>>,
    pub zones: Arc<ZoneSignal>,
}

/// One frontend (load-balancing rule), shared by every worker.
pub struct Frontend {
    pub index: usize,
    /// Shared, so a flow log record or a metric label takes it without a copy.
    pub name: Arc<str>,
    /// The address the listeners are bound to (with the real port if 0 was asked for).
    pub listen: SocketAddr,
    pub protocol: crate::config::FrontendProtocol,
    pub routing: Published<Routing>,
    pub settings: Published<FrontendConfig>,
    active: AtomicUsize,
    pub metrics: FrontendHandles,
    pub passive_failures: mpsc::Sender<PassiveFailure>,
    pub flow_log: Option<Arc<FlowLog>>,
    /// The process's down zones (the same one in every frontend).
    pub zones: Arc<ZoneSignal>,
}

impl Frontend {
    pub fn new(
        index: usize,
        listen: SocketAddr,
        config: FrontendConfig,
        routing: Routing,
        metrics: FrontendHandles,
        links: FrontendLinks,
    ) -> Self {
        Frontend {
            index,
            name: Arc::from(config.name.as_str()),
            flow_log: links.flow_log,
            zones: links.zones,
            listen,
            protocol: config.protocol,
            routing: Published::new(routing),
            settings: Published::new(config),
            active: AtomicUsize::new(0),
            metrics,
            passive_failures: links.passive_failures,
        }
    }

    /// Claims a connection slot, or returns `None` when the frontend is at its limit.
    pub fn try_admit(self: &Arc<Self>, limit: usize) -> Option<ActiveConnection> {
        let prev = self.active.fetch_add(1, Ordering::AcqRel);
        if prev >= limit {
            self.active.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        self.metrics.active.inc();
        Some(ActiveConnection {
            frontend: Arc::clone(self),
        })
    }

    /// Open flows: TCP connections and UDP flows. A drain waits for it to reach 0.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Counts a UDP flow as open until the guard drops. UDP flows have no
    /// admission limit (the flow table's capacity bounds them, by eviction)
    /// and do not count as connections in the TCP metrics.
    pub fn open_udp_flow(self: &Arc<Self>) -> ActiveUdpFlow {
        self.active.fetch_add(1, Ordering::AcqRel);
        ActiveUdpFlow {
            frontend: Arc::clone(self),
        }
    }
}

/// Keeps a UDP flow counted in [`Frontend::active`] while alive.
pub struct ActiveUdpFlow {
    frontend: Arc<Frontend>,
}

impl Drop for ActiveUdpFlow {
    fn drop(&mut self) {
        self.frontend.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Releases the frontend's connection slot when dropped.
pub struct ActiveConnection {
    frontend: Arc<Frontend>,
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.frontend.active.fetch_sub(1, Ordering::AcqRel);
        self.frontend.metrics.active.dec();
    }
}

/// Counts a backend's open connection while alive.
pub struct BackendLease {
    pub backend: Arc<BackendRuntime>,
}

impl BackendLease {
    pub fn new(backend: Arc<BackendRuntime>) -> Self {
        backend.metrics.connections.inc();
        backend.metrics.active.inc();
        BackendLease { backend }
    }
}

impl Drop for BackendLease {
    fn drop(&mut self) {
        self.backend.metrics.active.dec();
    }
}
