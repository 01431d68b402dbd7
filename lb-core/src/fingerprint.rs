//! The config fingerprint: one 64-bit value per frontend (and one for all of
//! them) over everything that decides where a flow goes, so that several
//! instances behind ECMP, or one instance before and after a reload, can be
//! checked to route every flow alike by comparing sixteen hex digits.
//!
//! What is hashed, per frontend ([`FrontendRouting`]): its name, protocol,
//! listen port, distribution mode, hash seed, Maglev table size, the version
//! of the hashing and table algorithms ([`FLOW_HASH_VERSION`]: the flow hash,
//! the backend-name hash and the Maglev fill), what it does with no healthy
//! backend, its client allowlist (`source_ranges`, sorted), then each
//! backend's name, address and weight in name order; in the hop model each
//! node (in name order) with its address, zone and pod addresses, and the
//! Service's policies (traffic policy, session affinity, SNAT scope, traffic
//! distribution); on a QUIC frontend the QUIC-LB layout and each backend's
//! server ID. Config order is not hashed where routing ignores it: Maglev
//! fills in name order and the hop model sorts nodes, so a reordered config
//! is not a false mismatch. What is not: health, pod readiness, zones
//! taken down at run time, timeouts (the affinity timeout included), the
//! admin and flow-log settings. Those change what is up, not where a flow
//! hashes to, and two instances are expected to differ in them for a while.
//!
//! The encoding ("lb-fingerprint v1") is a tag, then typed fields: integers
//! big-endian, every string and list preceded by its length as a big-endian
//! u32 (so `("ab", "c")` and `("a", "bc")` differ), an address as a family
//! byte, its octets and its port. It is hashed with XXH64, the pinned hash
//! [`crate::hash`] uses for backend names, under [`FINGERPRINT_SEED`]. A
//! golden vector in the tests pins the whole: a change to the layout must
//! change that vector, and should change the tag.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use xxhash_rust::xxh64::xxh64;

use crate::backend::BackendSpec;
use crate::flow::DistributionMode;
use crate::hop::{
    ExternalTrafficPolicy, NodeSpec, ServiceSpec, SessionAffinity, SnatScope, TrafficDistribution,
};
use crate::quic_lb::{QuicLbConfig, ServerId};
use crate::snapshot::NoHealthyBackends;
use crate::source_ranges::{SourcePrefix, SourceRanges};

pub use crate::hash::FLOW_HASH_VERSION;

/// The first bytes of every encoding; names the layout's version.
const LAYOUT_TAG: &str = "lb-fingerprint v2";
/// The XXH64 seed of the fingerprint ("LB-FPRT1").
pub const FINGERPRINT_SEED: u64 = 0x4c42_2d46_5052_5431;

/// A fingerprint, shown as sixteen lowercase hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub u64);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A QUIC frontend's layout and its backends' server IDs.
#[derive(Clone, Copy, Debug)]
pub struct QuicRouting<'a> {
    pub layout: QuicLbConfig,
    /// By backend name, in backend order.
    pub server_ids: &'a [(String, ServerId)],
}

/// The hop model's nodes (with their pods) and the Service's policies.
#[derive(Clone, Copy, Debug)]
pub struct HopRouting<'a> {
    pub nodes: &'a [NodeSpec],
    pub service: &'a ServiceSpec,
}

/// Everything about one frontend that decides where its flows go.
#[derive(Clone, Copy, Debug)]
pub struct FrontendRouting<'a> {
    pub name: &'a str,
    /// `tcp`, `udp` or `quic`.
    pub protocol: &'a str,
    pub listen_port: u16,
    pub mode: DistributionMode,
    pub seed: u64,
    pub table_size: u32,
    /// [`FLOW_HASH_VERSION`] for this build.
    pub hash_version: u32,
    pub no_healthy_backends: NoHealthyBackends,
    /// The client allowlist; `None` allows every client.
    pub source_ranges: Option<&'a SourceRanges>,
    /// Plain backends; empty in the hop model.
    pub backends: &'a [BackendSpec],
    pub hop: Option<HopRouting<'a>>,
    pub quic: Option<QuicRouting<'a>>,
}

impl FrontendRouting<'_> {
    /// This frontend's fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        let mut enc = Encoder::tagged();
        self.encode(&mut enc);
        enc.finish()
    }

    fn encode(&self, enc: &mut Encoder) {
        enc.str(self.name);
        enc.str(self.protocol);
        enc.u16(self.listen_port);
        enc.str(self.mode.azure_name());
        enc.u64(self.seed);
        enc.u32(self.table_size);
        enc.u32(self.hash_version);
        enc.str(match self.no_healthy_backends {
            NoHealthyBackends::Refuse => "Refuse",
            NoHealthyBackends::RouteAll => "RouteAll",
        });
        encode_source_ranges(self.source_ranges, enc);
        let mut backends: Vec<&BackendSpec> = self.backends.iter().collect();
        backends.sort_by(|a, b| a.name.cmp(&b.name));
        enc.len(backends.len());
        for b in backends {
            enc.str(&b.name);
            enc.socket_addr(b.addr);
            enc.u32(b.weight);
        }
        enc.flag(self.hop.is_some());
        if let Some(hop) = &self.hop {
            encode_hop(hop, enc);
        }
        enc.flag(self.quic.is_some());
        if let Some(quic) = &self.quic {
            encode_quic(quic, enc);
        }
    }
}

/// The fingerprint of all frontends together, in config order.
pub fn fingerprint_all(frontends: &[FrontendRouting<'_>]) -> Fingerprint {
    let mut enc = Encoder::tagged();
    enc.len(frontends.len());
    for fe in frontends {
        fe.encode(&mut enc);
    }
    enc.finish()
}

/// The allowlist as a set: its prefixes sorted (family, address, length),
/// since their order decides nothing.
fn encode_source_ranges(ranges: Option<&SourceRanges>, enc: &mut Encoder) {
    enc.flag(ranges.is_some());
    let Some(ranges) = ranges else { return };
    let mut prefixes: Vec<&SourcePrefix> = ranges.prefixes().iter().collect();
    prefixes.sort_by_key(|p| (p.addr(), p.len()));
    enc.len(prefixes.len());
    for p in prefixes {
        enc.ip(p.addr());
        enc.u8(p.len());
    }
}

fn encode_hop(hop: &HopRouting<'_>, enc: &mut Encoder) {
    let s = hop.service;
    enc.str(match s.external_traffic_policy {
        ExternalTrafficPolicy::Cluster => "Cluster",
        ExternalTrafficPolicy::Local => "Local",
    });
    enc.str(match s.session_affinity {
        SessionAffinity::None => "None",
        SessionAffinity::ClientIp => "ClientIP",
    });
    enc.str(match s.snat {
        SnatScope::CrossNode => "cross-node",
        SnatScope::Always => "always",
    });
    enc.str(match s.traffic_distribution {
        TrafficDistribution::Any => "",
        TrafficDistribution::PreferSameZone => "PreferSameZone",
        TrafficDistribution::PreferSameNode => "PreferSameNode",
    });
    let mut nodes: Vec<&NodeSpec> = hop.nodes.iter().collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    enc.len(nodes.len());
    for node in nodes {
        enc.str(&node.name);
        enc.ip(node.address);
        enc.flag(node.zone.is_some());
        enc.str(node.zone.as_deref().unwrap_or(""));
        enc.len(node.endpoints.len());
        for ep in &node.endpoints {
            // Readiness is left out: it is health, not configuration.
            enc.socket_addr(ep.addr);
        }
    }
}

fn encode_quic(quic: &QuicRouting<'_>, enc: &mut Encoder) {
    enc.u8(quic.layout.config_id());
    enc.len(quic.layout.server_id_len());
    enc.len(quic.layout.nonce_len());
    enc.len(quic.server_ids.len());
    for (name, id) in quic.server_ids {
        enc.str(name);
        enc.bytes(id.as_bytes());
    }
}

/// The byte encoding the fingerprint is the hash of.
struct Encoder(Vec<u8>);

impl Encoder {
    fn tagged() -> Self {
        let mut enc = Encoder(Vec::with_capacity(256));
        enc.str(LAYOUT_TAG);
        enc
    }

    fn finish(self) -> Fingerprint {
        Fingerprint(xxh64(&self.0, FINGERPRINT_SEED))
    }

    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }

    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }

    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }

    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }

    fn flag(&mut self, v: bool) {
        self.u8(u8::from(v));
    }

    /// A count or length. Config lists and strings are far below 2^32; a
    /// longer one saturates rather than wrap (it cannot occur, and must not panic).
    fn len(&mut self, n: usize) {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX));
    }

    fn bytes(&mut self, b: &[u8]) {
        self.len(b.len());
        self.0.extend_from_slice(b);
    }

    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    fn ip(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(v4) => {
                self.u8(4);
                self.0.extend_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                self.u8(6);
                self.0.extend_from_slice(&v6.octets());
            }
        }
    }

    fn socket_addr(&mut self, addr: SocketAddr) {
        self.ip(addr.ip());
        self.u16(addr.port());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hop::EndpointSpec;
    use crate::FLOW_HASH_SEED;
    use proptest::prelude::*;

    fn backends() -> Vec<BackendSpec> {
        vec![
            BackendSpec::new("a", "127.0.0.1:9001".parse().unwrap(), 1),
            BackendSpec::new("b", "127.0.0.1:9002".parse().unwrap(), 3),
        ]
    }

    fn web(backends: &[BackendSpec]) -> FrontendRouting<'_> {
        FrontendRouting {
            name: "web",
            protocol: "tcp",
            listen_port: 8080,
            mode: DistributionMode::FiveTuple,
            seed: FLOW_HASH_SEED,
            table_size: 65_537,
            hash_version: FLOW_HASH_VERSION,
            no_healthy_backends: NoHealthyBackends::Refuse,
            source_ranges: None,
            backends,
            hop: None,
            quic: None,
        }
    }

    /// Pins the layout: if this changes, every deployed fleet's fingerprints
    /// change with it, so it must be deliberate (and bump [`LAYOUT_TAG`]).
    #[test]
    fn golden_vector() {
        let b = backends();
        assert_eq!(web(&b).fingerprint().to_string(), "42d04ffcb3a32428");
        assert_eq!(fingerprint_all(&[web(&b)]).to_string(), "197c4f1387fd5c98");
    }

    #[test]
    fn equal_input_gives_an_equal_fingerprint_and_backend_order_does_not_count() {
        let (b1, b2) = (backends(), backends());
        assert_eq!(web(&b1).fingerprint(), web(&b2).fingerprint());
        // Maglev fills in name order: a reordered config routes alike.
        let swapped: Vec<_> = b1.iter().rev().cloned().collect();
        assert_eq!(web(&b1).fingerprint(), web(&swapped).fingerprint());
        // Frontends are hashed in config order (each is its own listener).
        let (x, y) = (
            web(&b1),
            FrontendRouting {
                name: "api",
                ..web(&b1)
            },
        );
        assert_ne!(fingerprint_all(&[x, y]), fingerprint_all(&[y, x]));
    }

    #[test]
    fn no_healthy_backends_and_source_ranges_count_in_any_order() {
        let b = backends();
        let base = web(&b).fingerprint();
        let route_all = FrontendRouting {
            no_healthy_backends: NoHealthyBackends::RouteAll,
            ..web(&b)
        };
        assert_ne!(base, route_all.fingerprint());
        let ranges = |entries: &[&str]| SourceRanges::parse(entries.iter().copied()).unwrap();
        let (ab, ba, a) = (
            ranges(&["10.0.0.0/8", "192.168.1.0/24"]),
            ranges(&["192.168.1.0/24", "10.0.0.0/8"]),
            ranges(&["10.0.0.0/8"]),
        );
        let with = |r| {
            FrontendRouting {
                source_ranges: Some(r),
                ..web(&b)
            }
            .fingerprint()
        };
        assert_ne!(base, with(&a), "an allowlist counts");
        assert_ne!(with(&a), with(&ab), "its prefixes count");
        assert_eq!(with(&ab), with(&ba), "their order does not");
    }

    #[test]
    fn strings_are_length_prefixed() {
        // The name and the protocol are written side by side.
        let b = backends();
        let x = FrontendRouting {
            name: "ab",
            protocol: "c",
            ..web(&b)
        };
        let y = FrontendRouting {
            name: "a",
            protocol: "bc",
            ..web(&b)
        };
        assert_ne!(x.fingerprint(), y.fingerprint());
    }

    fn nodes() -> Vec<NodeSpec> {
        vec![NodeSpec {
            name: "node-1".into(),
            address: "127.0.1.1".parse().unwrap(),
            endpoints: vec![EndpointSpec {
                addr: "127.0.2.1:8000".parse().unwrap(),
                ready: true,
            }],
            zone: Some("1".into()),
        }]
    }

    #[test]
    fn hop_model_fields_count_and_pod_readiness_does_not() {
        let service = ServiceSpec::default();
        let n = nodes();
        let with = |nodes: &[NodeSpec], service: &ServiceSpec| {
            FrontendRouting {
                hop: Some(HopRouting { nodes, service }),
                ..web(&[])
            }
            .fingerprint()
        };
        let base = with(&n, &service);
        let mut not_ready = nodes();
        not_ready[0].endpoints[0].ready = false;
        assert_eq!(base, with(&not_ready, &service), "readiness is health");
        let timeout = ServiceSpec {
            affinity_timeout: std::time::Duration::from_secs(1),
            ..service
        };
        assert_eq!(base, with(&n, &timeout), "a timeout does not route");
        let mut two = nodes();
        two.push(NodeSpec {
            name: "node-2".into(),
            address: "127.0.1.2".parse().unwrap(),
            ..nodes().remove(0)
        });
        let reversed: Vec<_> = two.iter().rev().cloned().collect();
        assert_eq!(
            with(&two, &service),
            with(&reversed, &service),
            "nodes are sorted"
        );
        let mut zone = nodes();
        zone[0].zone = Some("2".into());
        let mut pod = nodes();
        pod[0].endpoints[0].addr.set_port(8001);
        let local = ServiceSpec {
            external_traffic_policy: ExternalTrafficPolicy::Local,
            ..service
        };
        let affinity = ServiceSpec {
            session_affinity: SessionAffinity::ClientIp,
            ..service
        };
        for other in [
            with(&zone, &service),
            with(&pod, &service),
            with(&n, &local),
            with(&n, &affinity),
            with(&[], &service),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn quic_layout_and_server_ids_count() {
        let b = backends();
        let ids = vec![("a".to_owned(), ServerId::new(&[1, 2, 3]).unwrap())];
        let other_ids = vec![("a".to_owned(), ServerId::new(&[1, 2, 4]).unwrap())];
        let layout = QuicLbConfig::new(0, 3, 4).unwrap();
        let with = |layout, server_ids| {
            FrontendRouting {
                protocol: "quic",
                quic: Some(QuicRouting { layout, server_ids }),
                ..web(&b)
            }
            .fingerprint()
        };
        let same_ids = ids.clone();
        let base = with(layout, &ids);
        assert_eq!(base, with(layout, &same_ids));
        assert_ne!(base, with(layout, &other_ids));
        assert_ne!(base, with(QuicLbConfig::new(1, 3, 4).unwrap(), &ids));
        assert_ne!(base, with(QuicLbConfig::new(0, 3, 5).unwrap(), &ids));
    }

    /// One change to any one field of a frontend.
    #[derive(Clone, Debug)]
    enum Change {
        Name(String),
        Protocol(&'static str),
        Port(u16),
        Mode(DistributionMode),
        Seed(u64),
        TableSize(u32),
        HashVersion(u32),
        BackendName(usize, String),
        BackendPort(usize, u16),
        BackendWeight(usize, u32),
        AddBackend,
        DropBackend(usize),
    }

    fn change() -> impl Strategy<Value = Change> {
        prop_oneof![
            "[a-z]{0,6}".prop_map(Change::Name),
            prop_oneof![Just("udp"), Just("quic"), Just("")].prop_map(Change::Protocol),
            any::<u16>().prop_map(Change::Port),
            prop_oneof![
                Just(DistributionMode::SourceIp),
                Just(DistributionMode::SourceIpProtocol)
            ]
            .prop_map(Change::Mode),
            any::<u64>().prop_map(Change::Seed),
            any::<u32>().prop_map(Change::TableSize),
            any::<u32>().prop_map(Change::HashVersion),
            (0..2usize, "[a-z]{0,3}").prop_map(|(i, n)| Change::BackendName(i, n)),
            (0..2usize, any::<u16>()).prop_map(|(i, p)| Change::BackendPort(i, p)),
            (0..2usize, any::<u32>()).prop_map(|(i, w)| Change::BackendWeight(i, w)),
            Just(Change::AddBackend),
            (0..2usize).prop_map(Change::DropBackend),
        ]
    }

    proptest! {
        #[test]
        fn any_one_field_changed_changes_the_fingerprint(change in change()) {
            let base_backends = backends();
            let mut b = backends();
            let mut fe_name = "web".to_owned();
            let mut fe = web(&base_backends);
            match change {
                Change::Name(n) => fe_name = n,
                Change::Protocol(p) => fe.protocol = p,
                Change::Port(p) => fe.listen_port = p,
                Change::Mode(m) => fe.mode = m,
                Change::Seed(s) => fe.seed = s,
                Change::TableSize(t) => fe.table_size = t,
                Change::HashVersion(v) => fe.hash_version = v,
                Change::BackendName(i, n) => b[i].name = n,
                Change::BackendPort(i, p) => b[i].addr.set_port(p),
                Change::BackendWeight(i, w) => b[i].weight = w,
                Change::AddBackend => b.push(BackendSpec::new("c", "127.0.0.1:9003".parse().unwrap(), 1)),
                Change::DropBackend(i) => drop(b.remove(i)),
            }
            let changed = FrontendRouting { name: &fe_name, backends: &b, ..fe };
            let base = web(&base_backends);
            let same = changed.name == base.name
                && changed.protocol == base.protocol
                && changed.listen_port == base.listen_port
                && changed.mode == base.mode
                && changed.seed == base.seed
                && changed.table_size == base.table_size
                && changed.hash_version == base.hash_version
                && changed.backends == base.backends;
            prop_assert_eq!(same, changed.fingerprint() == base.fingerprint());
            prop_assert_eq!(same, fingerprint_all(&[changed]) == fingerprint_all(&[base]));
        }
    }
}
