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
//! Randomness and time arrive as arguments, so the model is deterministic.

use std::collections::HashMap;
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
}

impl HopModel {
    pub fn new(mut nodes: Vec<NodeSpec>, service: ServiceSpec) -> Result<Self, HopError> {
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
        let local_ready: Vec<Vec<EndpointRef>> = nodes
            .iter()
            .enumerate()
            .map(|(n, node)| {
                node.endpoints
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| e.ready)
                    .map(|(i, _)| EndpointRef {
                        node: n as u32,
                        index: i as u32,
                    })
                    .collect()
            })
            .collect();
        let ready = local_ready.iter().flatten().copied().collect();
        Ok(HopModel {
            nodes,
            service,
            ready,
            local_ready,
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

    /// The endpoints kube-proxy on `node` chooses among: its own ready ones
    /// under `Local`, every ready one in the cluster under `Cluster`.
    pub fn endpoints_from(&self, node: u32) -> &[EndpointRef] {
        match self.service.external_traffic_policy {
            ExternalTrafficPolicy::Local => self.local_endpoints(node),
            ExternalTrafficPolicy::Cluster => &self.ready,
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
