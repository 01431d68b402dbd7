//! The second hop of the AKS path: node → kube-proxy → pod.
//!
//! The Azure Load Balancer picks a *node* (the Maglev table is built over
//! nodes); kube-proxy on that node then picks a *pod endpoint*:
//! - `externalTrafficPolicy: Local` — only nodes with a ready local endpoint
//!   are eligible (Azure probes kube-proxy's healthCheckNodePort, which answers
//!   503 on the others); the node delivers locally and the pod sees the client.
//! - `externalTrafficPolicy: Cluster` — every node is eligible while the
//!   service has a ready endpoint anywhere; kube-proxy picks uniformly among all
//!   ready endpoints (iptables `statistic` rules: endpoint i of n matches with
//!   probability 1/(n−i), which is uniform overall), or through its ClientIP
//!   affinity table. A flow that crosses to another node is SNATed to the
//!   forwarding node's IP. Real kube-proxy masquerades all external traffic
//!   under Cluster ([`SnatScope::Always`]); the seed article's capture showed
//!   local deliveries keeping the client IP ([`SnatScope::CrossNode`], the default).
//!
//! - **Zones**: each node has a zone (`topology.kubernetes.io/zone`), its pods
//!   have the node's zone. Under `Cluster`, `trafficDistribution`
//!   (`PreferSameZone`, `PreferSameNode`) narrows the endpoints a node's
//!   kube-proxy picks from, by kube-proxy's own rules ([`HopModel::endpoints_from`]).
//!   A failed zone ([`ZonesDown`], [`HopModel::with_zones_down`]) takes its
//!   nodes out of the table and its pods out of every node's choice.
//!
//! Randomness and time arrive as arguments, so the model is deterministic.

use std::collections::{BTreeSet, HashMap};
use std::hash::BuildHasher;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::flow::DistributionMode;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExternalTrafficPolicy {
    #[default]
    Cluster,
    Local,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SessionAffinity {
    #[default]
    None,
    #[serde(rename = "ClientIP")]
    ClientIp,
}

/// When a Cluster-policy flow is SNATed to the node's IP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnatScope {
    /// Only flows that cross to another node (what the seed article observed).
    #[default]
    CrossNode,
    /// Every flow, as kube-proxy's masquerade rule does.
    Always,
}

/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10_800);
/// The longest `timeoutSeconds` Kubernetes validation accepts (the shortest is 1 s).
pub const MAX_AFFINITY_TIMEOUT: Duration = Duration::from_secs(86_400);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    pub addr: SocketAddr,
    pub ready: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    pub name: String,
    /// The node IP: flows SNATed by this node carry it as their source.
    pub address: IpAddr,
    pub endpoints: Vec<EndpointSpec>,
    /// The node's `topology.kubernetes.io/zone` label; its pods are in the
    /// same zone. `None`: the node has no zone (topology rules then ignore it).
    pub zone: Option<String>,
}

/// Kubernetes' `spec.trafficDistribution`: which endpoints kube-proxy on a
/// node prefers (see [`HopModel::endpoints_from`] for the exact rules).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TrafficDistribution {
    /// Unset: every ready endpoint the traffic policy allows.
    #[default]
    Any,
    /// Endpoints in the node's own zone. `PreferClose` is its older name.
    #[serde(alias = "PreferClose")]
    PreferSameZone,
    /// Endpoints on the node itself, then in its zone.
    PreferSameNode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub external_traffic_policy: ExternalTrafficPolicy,
    pub session_affinity: SessionAffinity,
    pub affinity_timeout: Duration,
    pub snat: SnatScope,
    pub traffic_distribution: TrafficDistribution,
}

impl Default for ServiceSpec {
    fn default() -> Self {
        ServiceSpec {
            external_traffic_policy: ExternalTrafficPolicy::Cluster,
            session_affinity: SessionAffinity::None,
            affinity_timeout: DEFAULT_AFFINITY_TIMEOUT,
            snat: SnatScope::CrossNode,
            traffic_distribution: TrafficDistribution::Any,
        }
    }
}

/// An endpoint by position: node index (in name order) and index on that node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointRef {
    pub node: u32,
    pub index: u32,
}

/// The address a pod sees as the source of a flow, by kube-proxy's rules alone
/// (before the frontend's `client_address`: see [`target_source`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceSeen {
    /// The client's own address (local delivery, or Local policy).
    Client,
    /// The forwarding node's IP (SNAT).
    Node(IpAddr),
}

/// How a frontend tells its target who the client is (lb-proxy's `client_address`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClientAnnouncement {
    /// Only through the connection's own source: the balancer's for a plain
    /// backend, the one kube-proxy's rules give ([`SourceSeen`]) with nodes.
    #[default]
    Snat,
    /// The connection is bound to the client's own address, which overrides
    /// the hop's SNAT: the target sees the client whatever the node did.
    Preserve,
    /// A PROXY header names the client; the connection itself keeps the
    /// source it would have had under [`ClientAnnouncement::Snat`].
    ProxyHeader,
}

/// Where a flow's connection to its target comes from, and which source the
/// target learns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetSource {
    /// The address the outgoing connection is bound to; `None` leaves it to
    /// the kernel (the balancer's own address).
    pub bind: Option<IpAddr>,
    /// The source the target sees for the flow: the client a PROXY header
    /// names, otherwise `bind`. `None` when that is the kernel's choice.
    pub seen: Option<IpAddr>,
}

/// The one answer to "which source does the target see?", shared by the data
/// plane (which binds its connection by it) and `/explain` (which reports
/// it), so the two cannot disagree. `hop` is [`HopModel::source_seen`] for the
/// flow's node and endpoint, `None` for a plain backend.
pub fn target_source(
    client: IpAddr,
    announce: ClientAnnouncement,
    hop: Option<SourceSeen>,
) -> TargetSource {
    let bind = match (announce, hop) {
        (ClientAnnouncement::Preserve, _) | (_, Some(SourceSeen::Client)) => Some(client),
        (_, Some(SourceSeen::Node(node_ip))) => Some(node_ip),
        (_, None) => None,
    };
    let seen = match announce {
        ClientAnnouncement::ProxyHeader => Some(client),
        ClientAnnouncement::Snat | ClientAnnouncement::Preserve => bind,
    };
    TargetSource { bind, seen }
}

/// What Azure's probe of a node finds (see [`HopModel::node_health_check`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeHealthCheck {
    /// 200 when the node takes new flows, 503 when not.
    pub status: u16,
    /// Ready endpoints on the node (kube-proxy's `localEndpoints`).
    pub local_endpoints: usize,
    /// Why, in a sentence.
    pub reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HopError {
    #[error("node name `{0}` is used more than once")]
    DuplicateNode(String),
    #[error("node address {0} is used by more than one node")]
    DuplicateNodeAddress(IpAddr),
    #[error("endpoint {0} is listed more than once")]
    DuplicateEndpoint(SocketAddr),
    #[error("at least one node is required")]
    NoNodes,
}

/// An immutable view of nodes, endpoints and service policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HopModel {
    nodes: Vec<NodeSpec>,
    service: ServiceSpec,
    /// Every ready endpoint in the cluster, in (node, index) order.
    ready: Vec<EndpointRef>,
    /// Per node, its ready endpoints.
    local_ready: Vec<Vec<EndpointRef>>,
    /// Per node, the endpoints its kube-proxy sends external traffic to
    /// under `Cluster`, by `trafficDistribution` (see [`Pool`]).
    cluster_pool: Vec<Pool>,
    /// Per zone id (see `node_zone`), the ready endpoints in that zone.
    zone_ready: Vec<Vec<EndpointRef>>,
    /// Per node, its zone's id in `zone_ready`; `None` without a zone.
    node_zone: Vec<Option<u32>>,
    /// Per node, whether its zone is down.
    node_down: Vec<bool>,
}

/// Which precomputed list a node's kube-proxy picks from under `Cluster`,
/// so a pick allocates nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pool {
    /// Every ready endpoint in the cluster.
    All,
    /// The node's own ready endpoints (`PreferSameNode`).
    Node,
    /// The ready endpoints of the node's zone (`PreferSameZone`, or
    /// `PreferSameNode` falling back to the zone).
    Zone(u32),
}

impl HopModel {
    pub fn new(nodes: Vec<NodeSpec>, service: ServiceSpec) -> Result<Self, HopError> {
        Self::with_zones_down(nodes, service, &BTreeSet::new())
    }

    /// The model with the zones in `zones_down` failed: their nodes are not
    /// eligible (they leave the Maglev table, like an unhealthy node) and
    /// their pods are not ready, so no node's kube-proxy picks them.
    pub fn with_zones_down(
        mut nodes: Vec<NodeSpec>,
        service: ServiceSpec,
        zones_down: &BTreeSet<String>,
    ) -> Result<Self, HopError> {
        if nodes.is_empty() {
            return Err(HopError::NoNodes);
        }
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        for pair in nodes.windows(2) {
            if pair[0].name == pair[1].name {
                return Err(HopError::DuplicateNode(pair[0].name.clone()));
            }
        }
        let mut addrs: Vec<IpAddr> = nodes.iter().map(|n| n.address).collect();
        addrs.sort();
        if let Some(dup) = addrs.windows(2).find(|w| w[0] == w[1]) {
            return Err(HopError::DuplicateNodeAddress(dup[0]));
        }
        let mut eps: Vec<SocketAddr> = nodes
            .iter()
            .flat_map(|n| n.endpoints.iter().map(|e| e.addr))
            .collect();
        eps.sort();
        if let Some(dup) = eps.windows(2).find(|w| w[0] == w[1]) {
            return Err(HopError::DuplicateEndpoint(dup[0]));
        }
        let node_down: Vec<bool> = nodes
            .iter()
            .map(|n| n.zone.as_ref().is_some_and(|z| zones_down.contains(z)))
            .collect();
        let local_ready: Vec<Vec<EndpointRef>> = nodes
            .iter()
            .enumerate()
            .map(|(n, node)| {
                node.endpoints
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| e.ready && !node_down[n])
                    .map(|(i, _)| EndpointRef {
                        node: n as u32,
                        index: i as u32,
                    })
                    .collect()
            })
            .collect();
        let ready: Vec<EndpointRef> = local_ready.iter().flatten().copied().collect();
        let (node_zone, zone_ready) = zones_of(&nodes, &local_ready);
        let cluster_pool = (0..nodes.len())
            .map(|n| {
                cluster_pool(
                    service.traffic_distribution,
                    &ready,
                    !local_ready[n].is_empty(),
                    node_zone[n],
                    &node_zone,
                    &zone_ready,
                )
            })
            .collect();
        Ok(HopModel {
            nodes,
            service,
            ready,
            local_ready,
            cluster_pool,
            zone_ready,
            node_zone,
            node_down,
        })
    }

    pub fn nodes(&self) -> &[NodeSpec] {
        &self.nodes
    }

    pub fn service(&self) -> &ServiceSpec {
        &self.service
    }

    pub fn node_index(&self, name: &str) -> Option<u32> {
        self.nodes
            .binary_search_by(|n| n.name.as_str().cmp(name))
            .ok()
            .map(|i| i as u32)
    }

    pub fn endpoint(&self, e: EndpointRef) -> Option<&EndpointSpec> {
        self.nodes
            .get(e.node as usize)?
            .endpoints
            .get(e.index as usize)
    }

    /// The ALB tier's mode: `ClientIP` affinity switches it to `SourceIP`, as cloud-provider-azure does.
    pub fn effective_mode(&self, configured: DistributionMode) -> DistributionMode {
        match self.service.session_affinity {
            SessionAffinity::ClientIp => DistributionMode::SourceIp,
            SessionAffinity::None => configured,
        }
    }

    /// Ready endpoints on one node.
    pub fn local_endpoints(&self, node: u32) -> &[EndpointRef] {
        self.local_ready
            .get(node as usize)
            .map_or(&[], Vec::as_slice)
    }

    /// Whether Azure's probe would find the node healthy.
    pub fn node_eligible(&self, node: u32) -> bool {
        if self.is_node_down(node) {
            return false;
        }
        match self.service.external_traffic_policy {
            ExternalTrafficPolicy::Local => !self.local_endpoints(node).is_empty(),
            ExternalTrafficPolicy::Cluster => {
                (node as usize) < self.nodes.len() && !self.ready.is_empty()
            }
        }
    }

    /// What Azure's probe finds on a node, with the same verdict as
    /// [`HopModel::node_eligible`]. Under `Local` it probes kube-proxy's
    /// healthCheckNodePort: 200 with ready local endpoints, 503 without.
    /// kube-proxy serves that port only for `Local` services; under `Cluster`
    /// the probe reaches the node port, which every node forwards to ready
    /// endpoints anywhere, so it passes on every node (pods or not) while the
    /// service has one, and fails on all of them when it has none.
    pub fn node_health_check(&self, node: u32) -> NodeHealthCheck {
        let local_endpoints = self.local_endpoints(node).len();
        let eligible = self.node_eligible(node);
        let reason = match (self.service.external_traffic_policy, eligible) {
            _ if self.is_node_down(node) => {
                "the node's zone is down: it takes no new flows and its pods are not ready"
            }
            (ExternalTrafficPolicy::Local, true) => {
                "externalTrafficPolicy Local: the node has a ready local endpoint"
            }
            (ExternalTrafficPolicy::Local, false) => {
                "externalTrafficPolicy Local: no ready endpoint on this node, so kube-proxy's healthCheckNodePort fails"
            }
            (ExternalTrafficPolicy::Cluster, true) => {
                "externalTrafficPolicy Cluster: kube-proxy serves no healthCheckNodePort; every node forwards to ready endpoints anywhere in the cluster, so the probe passes on every node"
            }
            (ExternalTrafficPolicy::Cluster, false) => {
                "externalTrafficPolicy Cluster: no ready endpoint anywhere in the cluster, so the probe fails on every node"
            }
        };
        NodeHealthCheck {
            status: if eligible { 200 } else { 503 },
            local_endpoints,
            reason,
        }
    }

    /// The endpoints kube-proxy on `node` chooses among for external
    /// traffic: its own ready ones under `Local`; under `Cluster`, the ones
    /// `trafficDistribution` prefers for this node (precomputed at build, see
    /// `cluster_pool`), or every ready one in the cluster.
    ///
    /// Under `Local` topology does not apply: kube-proxy's
    /// `CategorizeEndpoints` (kubernetes/kubernetes pkg/proxy/topology.go,
    /// read at commit 008b3652959ca58af8be3fb5b6ecfe9ae7638282) filters only
    /// `clusterEndpoints` by topology; `localEndpoints`, which external
    /// traffic uses under `externalTrafficPolicy: Local`, are all the ready
    /// local ones.
    pub fn endpoints_from(&self, node: u32) -> &[EndpointRef] {
        match self.service.external_traffic_policy {
            ExternalTrafficPolicy::Local => self.local_endpoints(node),
            ExternalTrafficPolicy::Cluster => match self.cluster_pool.get(node as usize) {
                Some(Pool::Node) => self.local_endpoints(node),
                Some(Pool::Zone(z)) => self.zone_ready.get(*z as usize).map_or(&[], Vec::as_slice),
                Some(Pool::All) | None => &self.ready,
            },
        }
    }

    /// The node's `topology.kubernetes.io/zone`.
    pub fn node_zone(&self, node: u32) -> Option<&str> {
        self.nodes.get(node as usize)?.zone.as_deref()
    }

    /// Whether the node's zone is down (see [`HopModel::with_zones_down`]).
    pub fn is_node_down(&self, node: u32) -> bool {
        self.node_down.get(node as usize).copied().unwrap_or(false)
    }

    /// Whether a hop from `node` to `endpoint` leaves the node's zone: both
    /// have a zone and they differ. Without zones nothing is known to cross.
    pub fn crosses_zones(&self, node: u32, endpoint: EndpointRef) -> bool {
        match (self.node_zone(node), self.node_zone(endpoint.node)) {
            (Some(from), Some(to)) => from != to,
            _ => false,
        }
    }

    /// kube-proxy's pick on `node`: the client's affinity entry while it is
    /// still one it may choose, otherwise a uniform draw from `random`.
    pub fn choose<S: BuildHasher>(
        &self,
        node: u32,
        client: IpAddr,
        random: u64,
        affinity: Option<&mut AffinityTable<S>>,
        now: Duration,
    ) -> Option<EndpointRef> {
        let endpoints = self.endpoints_from(node);
        if endpoints.is_empty() {
            return None;
        }
        let draw = || endpoints[((random as u128 * endpoints.len() as u128) >> 64) as usize];
        match (self.service.session_affinity, affinity) {
            (SessionAffinity::ClientIp, Some(table)) => {
                let pinned = table.lookup(client, now).and_then(|addr| {
                    endpoints
                        .iter()
                        .copied()
                        .find(|e| self.endpoint(*e).is_some_and(|s| s.addr == addr))
                });
                let chosen = pinned.unwrap_or_else(draw);
                if let Some(spec) = self.endpoint(chosen) {
                    table.record(client, spec.addr, now, self.service.affinity_timeout);
                }
                Some(chosen)
            }
            _ => Some(draw()),
        }
    }

    /// The source address the endpoint sees for a flow that entered at `node`.
    pub fn source_seen(&self, node: u32, endpoint: EndpointRef) -> SourceSeen {
        let node_ip = self.nodes.get(node as usize).map(|n| n.address);
        match (
            self.service.external_traffic_policy,
            self.service.snat,
            node_ip,
        ) {
            (ExternalTrafficPolicy::Local, _, _) | (_, _, None) => SourceSeen::Client,
            (ExternalTrafficPolicy::Cluster, SnatScope::Always, Some(ip)) => SourceSeen::Node(ip),
            (ExternalTrafficPolicy::Cluster, SnatScope::CrossNode, Some(ip)) => {
                if endpoint.node == node {
                    SourceSeen::Client
                } else {
                    SourceSeen::Node(ip)
                }
            }
        }
    }
}

/// Each node's zone id, and each zone's ready endpoints (ids in order of
/// first appearance among the name-sorted nodes).
fn zones_of(
    nodes: &[NodeSpec],
    local_ready: &[Vec<EndpointRef>],
) -> (Vec<Option<u32>>, Vec<Vec<EndpointRef>>) {
    let mut names: Vec<&str> = Vec::new();
    let mut zone_ready: Vec<Vec<EndpointRef>> = Vec::new();
    let node_zone = nodes
        .iter()
        .zip(local_ready)
        .map(|(node, ready)| {
            let zone = node.zone.as_deref()?;
            let id = match names.iter().position(|z| *z == zone) {
                Some(id) => id,
                None => {
                    names.push(zone);
                    zone_ready.push(Vec::new());
                    names.len() - 1
                }
            };
            zone_ready[id].extend_from_slice(ready);
            Some(id as u32)
        })
        .collect();
    (node_zone, zone_ready)
}

/// kube-proxy's choice of endpoints for one node's `Cluster` traffic.
///
/// The EndpointSlice controller turns `trafficDistribution` into hints
/// (`preferCloseHeuristic.update` in kubernetes/kubernetes
/// staging/src/k8s.io/endpointslice/trafficdist/trafficdist.go, read at
/// commit 19952a2b7bd575ccb22c510976f5676530dad49a): every *ready* endpoint
/// gets a zone hint naming its own zone when it has one, and, for
/// `PreferSameNode`, a node hint naming its node; unset `trafficDistribution`
/// clears all hints. kube-proxy's `topologyModeFromHints` (pkg/proxy/topology.go,
/// commit 008b3652959ca58af8be3fb5b6ecfe9ae7638282) then decides per node,
/// looking at ready endpoints only:
/// 1. same node, if every ready endpoint has a node hint and at least one
///    names this node (pods always have a node here, so: the node has a
///    ready pod); behind the `PreferSameTrafficDistribution` feature gate,
///    on by default since `PreferSameNode` went stable (Kubernetes 1.35);
/// 2. else same zone, if every ready endpoint has a zone hint and at least
///    one names this node's zone: all or nothing, so a single ready pod on
///    a node without a zone turns zone preference off for every node, and a
///    node without a zone never prefers one;
/// 3. else every ready endpoint (the fallback: no partial preference).
///
/// `availableForTopology` then keeps the hinted endpoints; there is no
/// fallback after the mode is chosen, and the mode is only chosen when it
/// has at least one ready endpoint, so the pool is never empty while the
/// cluster has a ready endpoint.
///
/// "Ready" is the model's: ready in config, up by the probes, zone not down.
/// kube-proxy's last resort, serving-but-terminating endpoints when none is
/// ready, is not modelled (there are no terminating pods here).
fn cluster_pool(
    distribution: TrafficDistribution,
    ready: &[EndpointRef],
    has_local_ready: bool,
    zone: Option<u32>,
    node_zone: &[Option<u32>],
    zone_ready: &[Vec<EndpointRef>],
) -> Pool {
    if distribution == TrafficDistribution::PreferSameNode && has_local_ready {
        return Pool::Node;
    }
    let all_ready_have_zones = ready.iter().all(|e| node_zone[e.node as usize].is_some());
    match (distribution, zone) {
        (TrafficDistribution::Any, _) | (_, None) => Pool::All,
        (_, Some(z)) if all_ready_have_zones && !zone_ready[z as usize].is_empty() => Pool::Zone(z),
        _ => Pool::All,
    }
}

/// Which zones are down: the config's `zones_down` (replaced by each
/// reload) and the admin's (kept across reloads until brought up). A zone is
/// down when either holds it; the model takes [`ZonesDown::down`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ZonesDown {
    config: BTreeSet<String>,
    admin: BTreeSet<String>,
    down: BTreeSet<String>,
}

impl ZonesDown {
    /// The config's zones; true when the set of down zones changed.
    pub fn set_config(&mut self, zones: BTreeSet<String>) -> bool {
        self.config = zones;
        self.recompute()
    }

    /// An admin takes `zone` down; true when it was up.
    pub fn take_down(&mut self, zone: &str) -> bool {
        self.admin.insert(zone.to_owned());
        self.recompute()
    }

    /// An admin brings `zone` up; true when it came up. A zone the config
    /// lists stays down: the config is changed by a reload, not by the admin.
    pub fn bring_up(&mut self, zone: &str) -> bool {
        self.admin.remove(zone);
        self.recompute()
    }

    pub fn is_down(&self, zone: &str) -> bool {
        self.down.contains(zone)
    }

    /// Whether the config holds `zone` down.
    pub fn held_by_config(&self, zone: &str) -> bool {
        self.config.contains(zone)
    }

    /// Every zone that is down, by either.
    pub fn down(&self) -> &BTreeSet<String> {
        &self.down
    }

    fn recompute(&mut self) -> bool {
        let down: BTreeSet<String> = self.config.union(&self.admin).cloned().collect();
        let changed = down != self.down;
        self.down = down;
        changed
    }
}

/// The seeds of an [`AffinityTable`]'s hasher. The caller draws them (lb-core
/// takes no randomness): with seeds a client cannot know, it cannot choose
/// source addresses that collide in the table on purpose.
pub type AffinitySeeds = [u64; 4];

/// Marks the end of the recency list.
const NIL: u32 = u32::MAX;

/// One client's pin, linked into the table's recency list.
#[derive(Clone, Debug)]
struct Pin {
    client: IpAddr,
    endpoint: SocketAddr,
    expires: Duration,
    /// Towards the least recently recorded pin.
    older: u32,
    /// Towards the most recently recorded pin.
    newer: u32,
}

/// kube-proxy's ClientIP affinity (iptables `recent`): client IP → endpoint,
/// refreshed by every new connection, forgotten `timeout` after the last one.
///
/// Bounded: when full, the least recently recorded pin is evicted, as
/// `xt_recent` evicts the head of its LRU list. Pins sit in a list ordered by
/// when they were last recorded, beside a map to their slots, so recording
/// and expiry are O(1): with one timeout, the oldest pin is also the first to
/// expire, and expired pins are reaped from the old end as new ones arrive.
/// (A scan of a full table per new client made each one cost 2 × 65,536
/// steps under the node's lock.) After the timeout changes (a reload), pins
/// recorded under the longer one are reaped when they reach the old end;
/// `lookup` never returns an expired pin either way.
#[derive(Clone, Debug)]
pub struct AffinityTable<S = ahash::RandomState> {
    slots: HashMap<IpAddr, u32, S>,
    pins: Vec<Pin>,
    /// Slots of `pins` that reaping or eviction emptied.
    free: Vec<u32>,
    oldest: u32,
    newest: u32,
    capacity: usize,
    /// The latest `now` recorded: workers read the clock before taking the
    /// table's lock, so `now` may step back a little; never going back keeps
    /// expiry times in list order.
    clock: Duration,
}

impl AffinityTable {
    /// A table of at most `capacity` pins, hashed with `seeds`.
    pub fn new(capacity: usize, seeds: AffinitySeeds) -> Self {
        let [k0, k1, k2, k3] = seeds;
        Self::with_hasher(capacity, ahash::RandomState::with_seeds(k0, k1, k2, k3))
    }
}

impl<S: BuildHasher> AffinityTable<S> {
    pub fn with_hasher(capacity: usize, hasher: S) -> Self {
        // Slots are u32 indices, NIL excluded.
        let capacity = capacity.clamp(1, NIL as usize);
        AffinityTable {
            slots: HashMap::with_capacity_and_hasher(capacity.min(1024), hasher),
            pins: Vec::new(),
            free: Vec::new(),
            oldest: NIL,
            newest: NIL,
            capacity,
            clock: Duration::ZERO,
        }
    }

    /// Pins held, expired ones not yet reaped included.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn lookup(&self, client: IpAddr, now: Duration) -> Option<SocketAddr> {
        let pin = &self.pins[*self.slots.get(&client)? as usize];
        (pin.expires > now).then_some(pin.endpoint)
    }

    /// Pins `client` to `endpoint` until `now + timeout`: the newest pin.
    pub fn record(
        &mut self,
        client: IpAddr,
        endpoint: SocketAddr,
        now: Duration,
        timeout: Duration,
    ) {
        let now = now.max(self.clock);
        self.clock = now;
        let expires = now.saturating_add(timeout);
        self.reap(now);
        if let Some(&slot) = self.slots.get(&client) {
            let pin = &mut self.pins[slot as usize];
            pin.endpoint = endpoint;
            pin.expires = expires;
            self.unlink(slot);
            self.link_newest(slot);
            return;
        }
        if self.slots.len() >= self.capacity {
            self.remove_oldest();
        }
        let pin = Pin {
            client,
            endpoint,
            expires,
            older: NIL,
            newer: NIL,
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.pins[slot as usize] = pin;
                slot
            }
            None => {
                self.pins.push(pin);
                (self.pins.len() - 1) as u32
            }
        };
        self.link_newest(slot);
        self.slots.insert(client, slot);
    }

    /// Forgets expired pins from the old end. Each pin is reaped at most once
    /// per time it was recorded, so this is O(1) amortised.
    fn reap(&mut self, now: Duration) {
        while self.oldest != NIL && self.pins[self.oldest as usize].expires <= now {
            self.remove_oldest();
        }
    }

    fn remove_oldest(&mut self) {
        let slot = self.oldest;
        if slot == NIL {
            return;
        }
        self.unlink(slot);
        self.slots.remove(&self.pins[slot as usize].client);
        self.free.push(slot);
    }

    fn unlink(&mut self, slot: u32) {
        let Pin { older, newer, .. } = self.pins[slot as usize];
        match older {
            NIL => self.oldest = newer,
            o => self.pins[o as usize].newer = newer,
        }
        match newer {
            NIL => self.newest = older,
            n => self.pins[n as usize].older = older,
        }
    }

    fn link_newest(&mut self, slot: u32) {
        let pin = &mut self.pins[slot as usize];
        pin.older = self.newest;
        pin.newer = NIL;
        match self.newest {
            NIL => self.oldest = slot,
            n => self.pins[n as usize].newer = slot,
        }
        self.newest = slot;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// The seed article's lab: three nodes, one pod on node 2.
    fn lab(policy: ExternalTrafficPolicy, affinity: SessionAffinity) -> HopModel {
        let node = |i: u8, eps: Vec<EndpointSpec>| NodeSpec {
            name: format!("node-{i}"),
            address: IpAddr::from([127, 0, 1, i]),
            endpoints: eps,
            zone: None,
        };
        let pod = EndpointSpec {
            addr: "127.0.2.2:8000".parse().unwrap(),
            ready: true,
        };
        HopModel::new(
            vec![node(1, vec![]), node(2, vec![pod]), node(3, vec![])],
            ServiceSpec {
                external_traffic_policy: policy,
                session_affinity: affinity,
                ..ServiceSpec::default()
            },
        )
        .unwrap()
    }

    #[test]
    fn local_policy_makes_only_nodes_with_pods_eligible() {
        let m = lab(ExternalTrafficPolicy::Local, SessionAffinity::None);
        assert_eq!(
            (0..3).map(|n| m.node_eligible(n)).collect::<Vec<_>>(),
            [false, true, false]
        );
        let probe = |n| {
            let h = m.node_health_check(n);
            (h.status, h.local_endpoints)
        };
        assert_eq!(probe(0), (503, 0));
        assert_eq!(probe(1), (200, 1));
        let e = m
            .choose::<std::hash::RandomState>(1, ip("127.0.0.9"), 7, None, Duration::ZERO)
            .unwrap();
        assert_eq!(m.source_seen(1, e), SourceSeen::Client);
        assert_eq!(
            m.choose::<std::hash::RandomState>(0, ip("127.0.0.9"), 7, None, Duration::ZERO),
            None
        );
    }

    #[test]
    fn cluster_policy_snats_only_when_crossing_nodes() {
        let m = lab(ExternalTrafficPolicy::Cluster, SessionAffinity::None);
        assert!((0..3).all(|n| m.node_eligible(n)));
        // kube-proxy serves no healthCheckNodePort under Cluster: every node passes.
        for (n, local) in [(0, 0), (1, 1), (2, 0)] {
            let h = m.node_health_check(n);
            assert_eq!((h.status, h.local_endpoints), (200, local), "{h:?}");
            assert!(h.reason.contains("Cluster"), "{h:?}");
        }
        let pod = EndpointRef { node: 1, index: 0 };
        assert_eq!(m.source_seen(1, pod), SourceSeen::Client);
        assert_eq!(m.source_seen(0, pod), SourceSeen::Node(ip("127.0.1.1")));
        assert_eq!(m.source_seen(2, pod), SourceSeen::Node(ip("127.0.1.3")));
    }

    /// `preserve` wins over the hop's SNAT; a PROXY header names the client
    /// while the connection keeps the hop's source; plain backends leave the
    /// source to the kernel unless the client's is preserved.
    #[test]
    fn target_source_applies_client_address_over_the_hop() {
        use ClientAnnouncement::{Preserve, ProxyHeader, Snat};
        let client = ip("127.0.0.9");
        let node_ip = ip("127.0.1.1");
        let node = Some(SourceSeen::Node(node_ip));
        let local = Some(SourceSeen::Client);
        let src = |bind: Option<IpAddr>, seen: Option<IpAddr>| TargetSource { bind, seen };
        let cases = [
            (Snat, node, src(Some(node_ip), Some(node_ip))),
            (Preserve, node, src(Some(client), Some(client))),
            (ProxyHeader, node, src(Some(node_ip), Some(client))),
            (Snat, local, src(Some(client), Some(client))),
            (ProxyHeader, local, src(Some(client), Some(client))),
            (Snat, None, src(None, None)),
            (Preserve, None, src(Some(client), Some(client))),
            (ProxyHeader, None, src(None, Some(client))),
        ];
        for (announce, hop, want) in cases {
            assert_eq!(
                target_source(client, announce, hop),
                want,
                "{announce:?} {hop:?}"
            );
        }
    }

    #[test]
    fn client_ip_affinity_switches_the_alb_to_source_ip_and_pins_endpoints() {
        let mut nodes = lab(ExternalTrafficPolicy::Cluster, SessionAffinity::ClientIp)
            .nodes()
            .to_vec();
        nodes[0].endpoints.push(EndpointSpec {
            addr: "127.0.2.1:8000".parse().unwrap(),
            ready: true,
        });
        let m = HopModel::new(
            nodes,
            ServiceSpec {
                session_affinity: SessionAffinity::ClientIp,
                ..ServiceSpec::default()
            },
        )
        .unwrap();
        assert_eq!(
            m.effective_mode(DistributionMode::FiveTuple),
            DistributionMode::SourceIp
        );
        let mut table = AffinityTable::new(16, [1, 2, 3, 4]);
        let client = ip("127.0.0.5");
        let first = m
            .choose(0, client, 0, Some(&mut table), Duration::ZERO)
            .unwrap();
        for r in [u64::MAX, 1 << 63, 12345] {
            assert_eq!(
                m.choose(0, client, r, Some(&mut table), Duration::from_secs(10)),
                Some(first)
            );
        }
        // After the timeout with no new connection, the pin is gone.
        let later = DEFAULT_AFFINITY_TIMEOUT + Duration::from_secs(11);
        assert_eq!(table.lookup(client, later), None);
    }

    /// Three nodes in zones 1, 2, 3 (node-1 in zone 1, ...), with the given
    /// ready pods per node, and `extra` a fourth node without a zone.
    fn zoned(pods: [u8; 3], extra: Option<u8>, td: TrafficDistribution) -> HopModel {
        let mut nodes: Vec<NodeSpec> = (1..=3u8)
            .map(|i| NodeSpec {
                name: format!("node-{i}"),
                address: IpAddr::from([127, 0, 1, i]),
                endpoints: (0..pods[i as usize - 1])
                    .map(|p| EndpointSpec {
                        addr: SocketAddr::from(([127, 0, 2, i], 8000 + u16::from(p))),
                        ready: true,
                    })
                    .collect(),
                zone: Some(i.to_string()),
            })
            .collect();
        if let Some(n) = extra {
            nodes.push(NodeSpec {
                name: "node-9".into(),
                address: IpAddr::from([127, 0, 1, 9]),
                endpoints: (0..n)
                    .map(|p| EndpointSpec {
                        addr: SocketAddr::from(([127, 0, 2, 9], 8000 + u16::from(p))),
                        ready: true,
                    })
                    .collect(),
                zone: None,
            });
        }
        let service = ServiceSpec {
            traffic_distribution: td,
            ..ServiceSpec::default()
        };
        HopModel::new(nodes, service).unwrap()
    }

    /// The nodes (by index) of the endpoints `node` picks from.
    fn pool(m: &HopModel, node: u32) -> Vec<u32> {
        m.endpoints_from(node).iter().map(|e| e.node).collect()
    }

    #[test]
    fn prefer_same_zone_keeps_flows_in_zone_and_falls_back_to_all_without_local_pods() {
        use TrafficDistribution::*;
        // Pods in zones 1 (two) and 2 (one); none in zone 3.
        let m = zoned([2, 1, 0], None, PreferSameZone);
        assert_eq!(pool(&m, 0), [0, 0], "zone 1 keeps to zone 1");
        assert_eq!(pool(&m, 1), [1], "zone 2 keeps to zone 2");
        assert_eq!(pool(&m, 2), [0, 0, 1], "zone 3 has none: every ready pod");
        let any = zoned([2, 1, 0], None, Any);
        assert!((0..3).all(|n| pool(&any, n) == [0, 0, 1]), "unset: all");
        let hop = |from, to_node| {
            m.crosses_zones(
                from,
                EndpointRef {
                    node: to_node,
                    index: 0,
                },
            )
        };
        assert!(!hop(0, 0) && hop(2, 0) && hop(0, 1));
    }

    /// kube-proxy's hints are all or nothing: one ready pod on a node with
    /// no zone has no zone hint, so no node prefers its zone.
    #[test]
    fn one_ready_pod_without_a_zone_turns_zone_preference_off_everywhere() {
        let m = zoned([1, 1, 1], Some(1), TrafficDistribution::PreferSameZone);
        for n in 0..4 {
            assert_eq!(pool(&m, n), [0, 1, 2, 3], "node {n}");
        }
        // A pod there that is not ready has no say (kube-proxy looks at ready ones only).
        let mut nodes = m.nodes().to_vec();
        nodes[3].endpoints[0].ready = false;
        let m = HopModel::new(nodes, *m.service()).unwrap();
        assert_eq!(pool(&m, 0), [0]);
        assert_eq!(pool(&m, 3), [0, 1, 2], "a node without a zone prefers none");
    }

    #[test]
    fn prefer_same_node_falls_back_to_the_zone_then_to_all() {
        let mut m = zoned([2, 0, 0], None, TrafficDistribution::PreferSameNode);
        assert_eq!(pool(&m, 0), [0, 0], "own node");
        assert_eq!(pool(&m, 1), [0, 0], "zone 2 has none: all");
        // A second node in zone 1 without pods falls back to its zone.
        let mut nodes = m.nodes().to_vec();
        nodes.push(NodeSpec {
            name: "node-1b".into(),
            address: IpAddr::from([127, 0, 1, 11]),
            endpoints: vec![],
            zone: Some("1".into()),
        });
        nodes[1].endpoints.push(EndpointSpec {
            addr: "127.0.2.12:8000".parse().unwrap(),
            ready: true,
        });
        m = HopModel::new(nodes, *m.service()).unwrap();
        let b = m.node_index("node-1b").unwrap();
        let zone1: Vec<u32> = pool(&m, b);
        assert!(
            zone1.iter().all(|&n| m.node_zone(n) == Some("1")),
            "{zone1:?}"
        );
        assert_eq!(zone1.len(), 2);
    }

    #[test]
    fn local_policy_ignores_traffic_distribution() {
        let mut m = zoned([1, 0, 0], None, TrafficDistribution::PreferSameZone);
        let nodes = m.nodes().to_vec();
        m = HopModel::new(
            nodes,
            ServiceSpec {
                external_traffic_policy: ExternalTrafficPolicy::Local,
                ..*m.service()
            },
        )
        .unwrap();
        assert_eq!(pool(&m, 0), [0]);
        assert!(pool(&m, 1).is_empty() && !m.node_eligible(1));
    }

    #[test]
    fn a_zone_down_takes_its_nodes_and_pods_out() {
        let base = zoned([1, 1, 1], None, TrafficDistribution::PreferSameZone);
        let down = BTreeSet::from(["2".to_owned()]);
        let m = HopModel::with_zones_down(base.nodes().to_vec(), *base.service(), &down).unwrap();
        assert_eq!(
            (0..3).map(|n| m.node_eligible(n)).collect::<Vec<_>>(),
            [true, false, true]
        );
        assert_eq!(m.node_health_check(1).status, 503);
        assert!(m.node_health_check(1).reason.contains("zone is down"));
        assert_eq!(pool(&m, 0), [0]);
        assert_eq!(pool(&m, 1), [0, 2], "zone 2 has no ready pod left: all");
        let any = zoned([0, 3, 0], None, TrafficDistribution::Any);
        let m = HopModel::with_zones_down(any.nodes().to_vec(), *any.service(), &down).unwrap();
        assert!((0..3).all(|n| !m.node_eligible(n)), "no ready pod anywhere");
    }

    #[test]
    fn zones_down_joins_config_and_admin() {
        let mut z = ZonesDown::default();
        assert!(z.set_config(BTreeSet::from(["1".to_owned()])));
        assert!(z.take_down("2"));
        assert!(!z.take_down("1"), "already down by config");
        assert!(!z.bring_up("1") && z.is_down("1") && z.held_by_config("1"));
        assert!(z.bring_up("2") && !z.is_down("2"));
        assert!(z.take_down("3"));
        assert!(!z.is_down("2") && z.is_down("1"));
        assert!(
            z.set_config(BTreeSet::new()),
            "zone 1 comes up with the reload"
        );
        assert_eq!(
            z.down().iter().collect::<Vec<_>>(),
            ["3"],
            "the admin's stays"
        );
    }

    #[test]
    fn traffic_distribution_reads_kubernetes_names() {
        use serde::de::value::{Error, StrDeserializer};
        let parse = |v: &str| TrafficDistribution::deserialize(StrDeserializer::<Error>::new(v));
        assert_eq!(
            parse("PreferClose").unwrap(),
            TrafficDistribution::PreferSameZone
        );
        assert_eq!(
            parse("PreferSameZone").unwrap(),
            TrafficDistribution::PreferSameZone
        );
        assert_eq!(
            parse("PreferSameNode").unwrap(),
            TrafficDistribution::PreferSameNode
        );
        assert!(parse("Nearest").is_err());
    }

    #[test]
    fn affinity_table_stays_bounded() {
        let mut t = AffinityTable::new(4, [1, 2, 3, 4]);
        for i in 0..100u8 {
            t.record(
                IpAddr::from([127, 0, 0, i]),
                "127.0.2.1:1".parse().unwrap(),
                Duration::from_secs(i as u64),
                Duration::from_secs(1000),
            );
        }
        assert_eq!(t.len(), 4);
        assert!(t
            .lookup(IpAddr::from([127, 0, 0, 99]), Duration::from_secs(100))
            .is_some());
    }
}
