//! A seeded, deterministic simulation of the node hop (in the spirit of sozu's
//! and FoundationDB's simulation tests): a splitmix64 generator builds random
//! node/endpoint layouts and drives 100k flows through a [`HopModel`] in every
//! combination of traffic policy, session affinity and SNAT scope, checking on
//! every flow what kube-proxy guarantees:
//!
//! - `Local` never leaves the entry node, and the pod always sees the client;
//! - `Cluster` picks uniformly among all ready endpoints, anywhere;
//! - ClientIP affinity keeps a client on one endpoint until the timeout passes
//!   with no new connection, and only while that endpoint stays a candidate;
//! - `SnatScope::Always` shows the node IP on every `Cluster` flow,
//!   `CrossNode` only on flows that cross to another node;
//! - the same seed gives the same run;
//! - with zones, each node's `Cluster` candidates are exactly the ones
//!   kube-proxy's topology rules give (a reference written step by step as
//!   kube-proxy computes them), and nothing in a down zone is chosen.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use lb_core::{
    AffinityTable, DistributionMode, EndpointRef, EndpointSpec, ExternalTrafficPolicy, HopModel,
    NodeSpec, ServiceSpec, SessionAffinity, SnatScope, SourceSeen, TrafficDistribution,
};

const FLOWS: usize = 100_000;
/// The layout (readiness) changes this often, keeping the affinity tables.
const EPOCH: usize = 10_000;
const CLIENTS: u32 = 300;
const AFFINITY_TIMEOUT: Duration = Duration::from_secs(30);
/// The affinity tables' hasher seeds: fixed, so a seed replays the same run.
const HASHER_SEEDS: lb_core::AffinitySeeds = [1, 2, 3, 4];

mod common;
use common::Rng;

/// A random cluster: 1..=7 nodes (names chosen so name order differs from
/// config order), each with 0..=3 pods, some of them not ready. At least one
/// pod exists somewhere.
fn random_layout(rng: &mut Rng) -> Vec<NodeSpec> {
    let nodes = 1 + rng.below(7) as u8;
    let mut out: Vec<NodeSpec> = (0..nodes)
        .map(|n| {
            let pods = rng.below(4) as u8;
            NodeSpec {
                // "node-10" sorts before "node-2": the model's node ids are by name.
                name: format!("node-{}", 1 + (n as u32 * 7) % 13),
                address: IpAddr::V4(Ipv4Addr::new(127, 0, 1, n + 1)),
                endpoints: (0..pods)
                    .map(|p| EndpointSpec {
                        addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 244, n, p + 2)), 8000),
                        ready: rng.chance(75),
                    })
                    .collect(),
                zone: None,
            }
        })
        .collect();
    if out.iter().all(|n| n.endpoints.is_empty()) {
        let n = rng.below(out.len() as u64) as usize;
        out[n].endpoints.push(EndpointSpec {
            addr: "10.244.99.2:8000".parse().unwrap(),
            ready: true,
        });
    }
    out
}

/// The same layout with each pod's readiness re-drawn (pods come and go).
fn flip_readiness(rng: &mut Rng, nodes: &[NodeSpec]) -> Vec<NodeSpec> {
    let mut nodes = nodes.to_vec();
    for e in nodes.iter_mut().flat_map(|n| n.endpoints.iter_mut()) {
        if rng.chance(30) {
            e.ready = !e.ready;
        }
    }
    nodes
}

fn client_ip(c: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + c))
}

/// What one flow did, for comparing runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Outcome {
    node: u32,
    endpoint: Option<EndpointRef>,
    seen: Option<SourceSeen>,
}

/// Counters a run reports, besides its per-flow outcomes.
#[derive(Debug, Default, PartialEq, Eq)]
struct Stats {
    routed: usize,
    refused: usize,
    pinned: usize,
    expired: usize,
}

struct Run {
    outcomes: Vec<Outcome>,
    stats: Stats,
}

/// Drives `FLOWS` flows through the hop under `service`, asserting every
/// per-flow guarantee as it goes, and the uniformity of picks per epoch.
fn simulate(seed: u64, service: ServiceSpec) -> Run {
    let mut rng = Rng(seed);
    let what = format!("seed {seed:#x}, {service:?}");
    let mut layout = random_layout(&mut rng);
    let mut model = HopModel::new(layout.clone(), service).expect("a valid layout");
    let nodes = model.nodes().len() as u32;
    // Each node's kube-proxy has its own affinity table, as in the proxy.
    let mut tables: Vec<AffinityTable> = (0..nodes)
        .map(|_| AffinityTable::new(4096, HASHER_SEEDS))
        .collect();
    // Shadow of the tables: (node, client) -> (endpoint address, last connection).
    let mut shadow: HashMap<(u32, u32), (SocketAddr, Duration)> = HashMap::new();
    let mut now = Duration::ZERO;
    let mut outcomes = Vec::with_capacity(FLOWS);
    let mut stats = Stats::default();
    // Per epoch: picks per (entry node, endpoint), and flows per entry node.
    let mut picks: HashMap<(u32, EndpointRef), u64> = HashMap::new();
    let mut entries: HashMap<u32, u64> = HashMap::new();

    check_node_invariants(&model, &what);
    assert_eq!(
        model.effective_mode(DistributionMode::FiveTuple),
        match service.session_affinity {
            SessionAffinity::ClientIp => DistributionMode::SourceIp,
            SessionAffinity::None => DistributionMode::FiveTuple,
        },
        "{what}"
    );

    for flow in 0..FLOWS {
        if flow > 0 && flow % EPOCH == 0 {
            check_uniform(&model, &picks, &entries, &what);
            picks.clear();
            entries.clear();
            layout = flip_readiness(&mut rng, &layout);
            model = HopModel::new(layout.clone(), service).expect("a valid layout");
            check_node_invariants(&model, &what);
        }

        // Time moves on by 0..2 s per flow: a client's pin outlives a few of
        // its flows (300 clients, about 300 s between two flows of one client
        // on average, 30 s timeout) but not all of them.
        now += Duration::from_millis(rng.below(2_000));
        let client = rng.below(u64::from(CLIENTS)) as u32;
        let ip = client_ip(client);
        // The ALB: only eligible nodes get flows. Under ClientIP affinity it
        // hashes the source IP only, so a client always enters at one node.
        let eligible: Vec<u32> = (0..nodes).filter(|&n| model.node_eligible(n)).collect();
        if eligible.is_empty() {
            assert!(
                (0..nodes).all(|n| model
                    .choose::<std::hash::RandomState>(n, ip, rng.next(), None, now)
                    .is_none()),
                "{what}: no node is eligible, yet kube-proxy found an endpoint"
            );
            stats.refused += 1;
            outcomes.push(Outcome {
                node: u32::MAX,
                endpoint: None,
                seen: None,
            });
            continue;
        }
        let node = match service.session_affinity {
            SessionAffinity::ClientIp => {
                eligible[(client as u64 * 0x9e37_79b9 % eligible.len() as u64) as usize]
            }
            SessionAffinity::None => eligible[rng.below(eligible.len() as u64) as usize],
        };
        let random = rng.next();
        let candidates = model.endpoints_from(node).to_vec();
        let fresh_draw = candidates[((random as u128 * candidates.len() as u128) >> 64) as usize];

        let chosen = match service.session_affinity {
            SessionAffinity::None => {
                let e = model
                    .choose::<std::hash::RandomState>(node, ip, random, None, now)
                    .unwrap_or_else(|| panic!("{what}: eligible node {node} found no endpoint"));
                assert_eq!(e, fresh_draw, "{what}: without affinity a pick is the draw");
                e
            }
            SessionAffinity::ClientIp => {
                let table = &mut tables[node as usize];
                let before = table.lookup(ip, now);
                let e = model
                    .choose(node, ip, random, Some(table), now)
                    .unwrap_or_else(|| panic!("{what}: eligible node {node} found no endpoint"));
                let addr = model.endpoint(e).expect("chosen endpoint exists").addr;
                // The shadow says what the table must remember.
                let live_pin = shadow
                    .get(&(node, client))
                    .filter(|(_, last)| now < *last + AFFINITY_TIMEOUT)
                    .map(|(a, _)| *a);
                assert_eq!(before, live_pin, "{what}: flow {flow}: the table's pin");
                let pin_is_candidate = live_pin.and_then(|a| {
                    candidates
                        .iter()
                        .copied()
                        .find(|c| model.endpoint(*c).is_some_and(|s| s.addr == a))
                });
                match pin_is_candidate {
                    Some(pinned) => {
                        assert_eq!(
                            e, pinned,
                            "{what}: flow {flow}: client {ip} left its pinned endpoint before the timeout"
                        );
                        stats.pinned += 1;
                    }
                    None => {
                        assert_eq!(
                            e, fresh_draw,
                            "{what}: flow {flow}: with no live pin the pick is the draw"
                        );
                        if shadow.contains_key(&(node, client)) {
                            stats.expired += 1;
                        }
                    }
                }
                // Every connection refreshes the pin.
                assert_eq!(table.lookup(ip, now), Some(addr));
                assert_eq!(
                    table.lookup(ip, now + AFFINITY_TIMEOUT - Duration::from_nanos(1)),
                    Some(addr)
                );
                assert_eq!(table.lookup(ip, now + AFFINITY_TIMEOUT), None);
                shadow.insert((node, client), (addr, now));
                e
            }
        };

        let spec = model.endpoint(chosen).expect("chosen endpoint exists");
        assert!(spec.ready, "{what}: picked a pod that is not ready");
        assert!(candidates.contains(&chosen), "{what}: pick is a candidate");
        let seen = model.source_seen(node, chosen);
        match service.external_traffic_policy {
            ExternalTrafficPolicy::Local => {
                assert_eq!(
                    chosen.node, node,
                    "{what}: Local delivered to a pod on another node"
                );
                assert_eq!(
                    seen,
                    SourceSeen::Client,
                    "{what}: Local must keep the client"
                );
            }
            ExternalTrafficPolicy::Cluster => {
                let node_ip = SourceSeen::Node(model.nodes()[node as usize].address);
                let expected = match service.snat {
                    SnatScope::Always => node_ip,
                    SnatScope::CrossNode if chosen.node == node => SourceSeen::Client,
                    SnatScope::CrossNode => node_ip,
                };
                assert_eq!(seen, expected, "{what}: entry {node}, pod {chosen:?}");
            }
        }
        stats.routed += 1;
        *picks.entry((node, chosen)).or_default() += 1;
        *entries.entry(node).or_default() += 1;
        outcomes.push(Outcome {
            node,
            endpoint: Some(chosen),
            seen: Some(seen),
        });
    }
    check_uniform(&model, &picks, &entries, &what);
    Run { outcomes, stats }
}

/// What holds of every node in every layout.
fn check_node_invariants(model: &HopModel, what: &str) {
    let service = *model.service();
    let any_ready = model
        .nodes()
        .iter()
        .any(|n| n.endpoints.iter().any(|e| e.ready));
    for (i, spec) in model.nodes().iter().enumerate() {
        let n = i as u32;
        assert_eq!(model.node_index(&spec.name), Some(n));
        let local_ready = spec.endpoints.iter().filter(|e| e.ready).count();
        assert_eq!(model.local_endpoints(n).len(), local_ready, "{what}");
        let eligible = match service.external_traffic_policy {
            ExternalTrafficPolicy::Local => local_ready > 0,
            ExternalTrafficPolicy::Cluster => any_ready,
        };
        assert_eq!(model.node_eligible(n), eligible, "{what}: {}", spec.name);
        let probe = model.node_health_check(n);
        assert_eq!(
            (probe.status, probe.local_endpoints),
            (if eligible { 200 } else { 503 }, local_ready),
            "{what}: Azure's probe of {}",
            spec.name
        );
        for c in model.endpoints_from(n) {
            if service.external_traffic_policy == ExternalTrafficPolicy::Local {
                assert_eq!(c.node, n, "{what}: a Local candidate on another node");
            }
            assert!(model.endpoint(*c).is_some_and(|e| e.ready), "{what}");
        }
    }
}

/// Picks are uniform among each entry node's candidates: every candidate's
/// count is within 5 sigma of its binomial expectation (without affinity; with
/// it, pins make counts lumpy by design).
fn check_uniform(
    model: &HopModel,
    picks: &HashMap<(u32, EndpointRef), u64>,
    entries: &HashMap<u32, u64>,
    what: &str,
) {
    if model.service().session_affinity == SessionAffinity::ClientIp {
        return;
    }
    match model.service().external_traffic_policy {
        ExternalTrafficPolicy::Local => {
            for (&node, &flows) in entries {
                let cands = model.endpoints_from(node);
                for c in cands {
                    let got = picks.get(&(node, *c)).copied().unwrap_or(0);
                    assert_within_5_sigma(got, flows, cands.len(), &format!("{what}: node {node}"));
                }
            }
        }
        ExternalTrafficPolicy::Cluster => {
            // Every node picks among the same set, so pool the picks.
            let flows: u64 = entries.values().sum();
            let cands = model.endpoints_from(0);
            for c in cands {
                let got: u64 = picks
                    .iter()
                    .filter(|((_, e), _)| e == c)
                    .map(|(_, n)| n)
                    .sum();
                assert_within_5_sigma(got, flows, cands.len(), what);
            }
            let outside: u64 = picks
                .iter()
                .filter(|((_, e), _)| !cands.contains(e))
                .map(|(_, n)| n)
                .sum();
            assert_eq!(outside, 0, "{what}: picks outside the ready set");
        }
    }
}

fn assert_within_5_sigma(got: u64, flows: u64, choices: usize, what: &str) {
    let p = 1.0 / choices as f64;
    let expected = flows as f64 * p;
    let sigma = (flows as f64 * p * (1.0 - p)).sqrt();
    assert!(
        (got as f64 - expected).abs() <= 5.0 * sigma + 1.0,
        "{what}: {got} picks of {flows} (expected {expected:.0} ± {:.0})",
        5.0 * sigma
    );
}

fn service(
    policy: ExternalTrafficPolicy,
    affinity: SessionAffinity,
    snat: SnatScope,
) -> ServiceSpec {
    ServiceSpec {
        external_traffic_policy: policy,
        session_affinity: affinity,
        affinity_timeout: AFFINITY_TIMEOUT,
        snat,
        traffic_distribution: lb_core::TrafficDistribution::Any,
    }
}

fn all_services() -> Vec<ServiceSpec> {
    let mut out = Vec::new();
    for policy in [ExternalTrafficPolicy::Cluster, ExternalTrafficPolicy::Local] {
        for affinity in [SessionAffinity::None, SessionAffinity::ClientIp] {
            for snat in [SnatScope::CrossNode, SnatScope::Always] {
                out.push(service(policy, affinity, snat));
            }
        }
    }
    out
}

const SEEDS: [u64; 3] = [1, 0x5eed_cafe, 0xdead_beef_0bad_f00d];

#[test]
fn every_policy_and_affinity_holds_over_100k_flows() {
    for seed in SEEDS {
        for svc in all_services() {
            let run = simulate(seed, svc);
            assert_eq!(run.outcomes.len(), FLOWS);
            assert_eq!(run.stats.routed + run.stats.refused, FLOWS);
            if svc.session_affinity == SessionAffinity::ClientIp {
                // The timeout is short enough to expire pins and long enough to use them.
                assert!(
                    run.stats.pinned > FLOWS / 100,
                    "seed {seed:#x} {svc:?}: {:?}",
                    run.stats
                );
                assert!(
                    run.stats.expired > FLOWS / 100,
                    "seed {seed:#x} {svc:?}: {:?}",
                    run.stats
                );
            }
        }
    }
}

#[test]
fn the_same_seed_gives_the_same_run() {
    for svc in all_services() {
        let a = simulate(SEEDS[1], svc);
        let b = simulate(SEEDS[1], svc);
        assert_eq!(a.stats, b.stats, "{svc:?}");
        assert!(
            a.outcomes == b.outcomes,
            "{svc:?}: runs with one seed differ"
        );
        let c = simulate(SEEDS[1] ^ 1, svc);
        assert!(
            a.outcomes != c.outcomes,
            "{svc:?}: another seed gave the identical run"
        );
    }
}

/// The seed article's lab, run through the simulator's checks with the
/// layout pinned: three nodes, one pod on node 2.
#[test]
fn the_article_lab_one_pod_on_node_2() {
    let pod: SocketAddr = "127.0.2.2:8000".parse().unwrap();
    let lab = |svc: ServiceSpec| {
        HopModel::new(
            (1..=3u8)
                .map(|i| NodeSpec {
                    name: format!("node-{i}"),
                    address: IpAddr::V4(Ipv4Addr::new(127, 0, 1, i)),
                    endpoints: if i == 2 {
                        vec![EndpointSpec {
                            addr: pod,
                            ready: true,
                        }]
                    } else {
                        vec![]
                    },
                    zone: None,
                })
                .collect(),
            svc,
        )
        .unwrap()
    };
    let mut rng = Rng(7);
    let client: IpAddr = "127.0.0.1".parse().unwrap();
    for svc in all_services() {
        let m = lab(svc);
        for node in 0..3u32 {
            let r = rng.next();
            let e = m.choose::<std::hash::RandomState>(node, client, r, None, Duration::ZERO);
            match (svc.external_traffic_policy, node) {
                (ExternalTrafficPolicy::Local, 0 | 2) => {
                    assert_eq!(e, None, "{svc:?}");
                    assert!(!m.node_eligible(node));
                    let probe = m.node_health_check(node);
                    assert_eq!((probe.status, probe.local_endpoints), (503, 0));
                }
                _ => {
                    let e = e.unwrap();
                    assert_eq!(m.endpoint(e).unwrap().addr, pod);
                    let seen = m.source_seen(node, e);
                    let expected = match (svc.external_traffic_policy, svc.snat, node) {
                        (ExternalTrafficPolicy::Local, _, _) => SourceSeen::Client,
                        (_, SnatScope::CrossNode, 1) => SourceSeen::Client,
                        _ => SourceSeen::Node(IpAddr::V4(Ipv4Addr::new(127, 0, 1, node as u8 + 1))),
                    };
                    assert_eq!(seen, expected, "{svc:?} node {node}");
                }
            }
        }
    }
}

/// With no ready pod anywhere, no node is eligible under either policy and
/// kube-proxy finds nothing to pick.
#[test]
fn no_ready_pod_means_no_eligible_node() {
    let mut rng = Rng(99);
    for _ in 0..50 {
        let mut layout = random_layout(&mut rng);
        for e in layout.iter_mut().flat_map(|n| n.endpoints.iter_mut()) {
            e.ready = false;
        }
        for svc in all_services() {
            let m = HopModel::new(layout.clone(), svc).unwrap();
            let mut table = AffinityTable::new(8, HASHER_SEEDS);
            for n in 0..m.nodes().len() as u32 {
                assert!(!m.node_eligible(n), "{svc:?}");
                assert!(m.endpoints_from(n).is_empty());
                assert_eq!(
                    m.choose(
                        n,
                        client_ip(1),
                        rng.next(),
                        Some(&mut table),
                        Duration::ZERO
                    ),
                    None
                );
            }
            assert!(table.is_empty(), "nothing to pin to, nothing recorded");
        }
    }
}

/// A full affinity table evicts, but never grows past its capacity, and any
/// pin it still holds is honoured.
#[test]
fn a_small_affinity_table_stays_bounded_and_honours_what_it_holds() {
    let mut rng = Rng(0xabc);
    let layout = loop {
        let l = random_layout(&mut rng);
        let ready = l
            .iter()
            .flat_map(|n| n.endpoints.iter())
            .filter(|e| e.ready)
            .count();
        if ready >= 3 {
            break l;
        }
    };
    let m = HopModel::new(
        layout,
        service(
            ExternalTrafficPolicy::Cluster,
            SessionAffinity::ClientIp,
            SnatScope::CrossNode,
        ),
    )
    .unwrap();
    let mut table = AffinityTable::new(16, HASHER_SEEDS);
    let mut now = Duration::ZERO;
    for _ in 0..FLOWS / 10 {
        now += Duration::from_millis(rng.below(100));
        let ip = client_ip(rng.below(64) as u32);
        let held = table.lookup(ip, now);
        let e = m.choose(0, ip, rng.next(), Some(&mut table), now).unwrap();
        let addr = m.endpoint(e).unwrap().addr;
        if let Some(pinned) = held {
            assert_eq!(addr, pinned, "a held pin was not honoured");
        }
        assert!(table.len() <= 16, "table grew to {}", table.len());
        assert_eq!(table.lookup(ip, now), Some(addr));
    }
}

/// kube-proxy's topology rules, written the way kube-proxy computes them:
/// per endpoint hints as the EndpointSlice controller sets them
/// (`preferCloseHeuristic.update`), then `topologyModeFromHints` and
/// `availableForTopology` (pkg/proxy/topology.go) over the ready endpoints,
/// each step a separate pass. The model precomputes the same answer in
/// another shape; this reference is what it is held to.
fn kube_proxy_cluster_endpoints(
    nodes: &[NodeSpec],
    zones_down: &BTreeSet<String>,
    td: TrafficDistribution,
    node: usize,
) -> Vec<SocketAddr> {
    struct Ep<'a> {
        addr: SocketAddr,
        node_hint: Option<&'a str>,
        zone_hint: Option<&'a str>,
    }
    let down = |n: &NodeSpec| n.zone.as_ref().is_some_and(|z| zones_down.contains(z));
    let ready: Vec<Ep> = nodes
        .iter()
        .filter(|n| !down(n))
        .flat_map(|n| n.endpoints.iter().filter(|e| e.ready).map(move |e| (n, e)))
        .map(|(n, e)| Ep {
            addr: e.addr,
            node_hint: (td == TrafficDistribution::PreferSameNode).then_some(n.name.as_str()),
            zone_hint: (td != TrafficDistribution::Any)
                .then_some(n.zone.as_deref())
                .flatten(),
        })
        .collect();
    let (name, zone) = (nodes[node].name.as_str(), nodes[node].zone.as_deref());
    let all_node_hints = ready.iter().all(|e| e.node_hint.is_some());
    let all_zone_hints = ready.iter().all(|e| e.zone_hint.is_some());
    let for_node = ready.iter().any(|e| e.node_hint == Some(name));
    let for_zone = zone.is_some() && ready.iter().any(|e| e.zone_hint == zone);
    let keep: Box<dyn Fn(&Ep) -> bool> = if !ready.is_empty() && all_node_hints && for_node {
        Box::new(|e: &Ep| e.node_hint == Some(name))
    } else if !ready.is_empty() && all_zone_hints && for_zone {
        Box::new(|e: &Ep| e.zone_hint == zone)
    } else {
        Box::new(|_: &Ep| true)
    };
    let mut out: Vec<SocketAddr> = ready.iter().filter(|e| keep(e)).map(|e| e.addr).collect();
    out.sort();
    out
}

/// Random zones (up to three, some nodes without one), random readiness,
/// random zones down, every traffic distribution: each node's `Cluster`
/// candidates are exactly kube-proxy's, `Local` ignores the distribution,
/// and nothing in a down zone is eligible or chosen.
#[test]
fn topology_matches_kube_proxy_over_random_zoned_layouts() {
    let mut rng = Rng(0x2026_0e14);
    for round in 0..2_000 {
        let mut nodes = random_layout(&mut rng);
        for n in nodes.iter_mut() {
            n.zone = (!rng.chance(15)).then(|| (1 + rng.below(3)).to_string());
        }
        let zones_down: BTreeSet<String> = (1..=3)
            .filter(|_| rng.chance(15))
            .map(|z| z.to_string())
            .collect();
        for td in [
            TrafficDistribution::Any,
            TrafficDistribution::PreferSameZone,
            TrafficDistribution::PreferSameNode,
        ] {
            for policy in [ExternalTrafficPolicy::Cluster, ExternalTrafficPolicy::Local] {
                let svc = ServiceSpec {
                    external_traffic_policy: policy,
                    traffic_distribution: td,
                    ..ServiceSpec::default()
                };
                let m = HopModel::with_zones_down(nodes.clone(), svc, &zones_down).unwrap();
                let what = format!("round {round} {td:?} {policy:?} down {zones_down:?}");
                for (i, node) in m.nodes().iter().enumerate() {
                    let i = i as u32;
                    let mut got: Vec<SocketAddr> = m
                        .endpoints_from(i)
                        .iter()
                        .map(|&e| m.endpoint(e).unwrap().addr)
                        .collect();
                    got.sort();
                    let want = match policy {
                        ExternalTrafficPolicy::Cluster => {
                            kube_proxy_cluster_endpoints(m.nodes(), &zones_down, td, i as usize)
                        }
                        ExternalTrafficPolicy::Local => {
                            let mut own = kube_proxy_cluster_endpoints(
                                std::slice::from_ref(node),
                                &zones_down,
                                TrafficDistribution::Any,
                                0,
                            );
                            own.sort();
                            own
                        }
                    };
                    assert_eq!(got, want, "{what}: node {}", node.name);
                    let in_down_zone = node.zone.as_ref().is_some_and(|z| zones_down.contains(z));
                    if in_down_zone {
                        assert!(
                            !m.node_eligible(i),
                            "{what}: {} is in a down zone",
                            node.name
                        );
                    }
                }
            }
        }
    }
}
