//! Availability zones on the UDP plane end to end (issue 14): a UDP
//! frontend in front of nodes in zones 1, 2 (and 3), node-N on 127.0.1.N,
//! its pod (when it has one) an in-test echo on 127.0.2.N that answers
//! every datagram with `pod-N SEEN\n` and the datagram itself, SEEN being
//! the source it saw: a node's IP when the flow was SNATed across nodes,
//! the client's own when delivered on the node it entered. So each answer
//! says which pod a flow reached and which node it came through.
//!
//! 1. Zone down: `POST /zones/down?zone=2` ends every open UDP flow whose
//!    node or pod is in zone 2 (flow log outcome `zone_down`, counted
//!    `closed`), leaves the others on their pods, and the next datagram of
//!    an ended flow's client makes a new flow that avoids zone 2.
//! 2. Delay: with `cross_zone_rtt = 20ms`, a cross-zone echo's round trip
//!    p50 rises by about the RTT, a same-zone one's does not; the holds are
//!    counted in `lb_cross_zone_delay_seconds`.
//! 3. Through the delay line, a burst of datagrams of many sizes arrives
//!    intact and in order, both ways.
//!
//! Every test takes [`serial`], so the timed round trips never compete with
//! another test's flows for CI's two cores. Timing lower bounds are exact
//! (the line never releases early); upper bounds allow about half the RTT.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use lb_tests::udp::{client_ip, UdpClient, ANSWER_WAIT};
use lb_tests::zones::{admin_post_with, flow_records, held, p50, serial};
use lb_tests::Proxy;

const FRONTEND: &str = "zones";
/// The round trip of the delay tests, large enough to see through a debug
/// build's noise, and what a round trip may take beyond what is expected
/// of it (as in zones_delay.rs: the balancer's own work on loopback and
/// scheduling on CI's two busy cores; a p50 shrugs off a few slow ones).
const RTT: Duration = Duration::from_millis(20);
const SLACK: Duration = Duration::from_millis(10);
/// Bounds how many clients a test tries to find flows through a node.
const MAX_PICKS: usize = 200;

// ---------------------------------------------------------------------------
// The lab.

/// Pod `n`'s echo on `127.0.2.n:0`, on a thread that lives as long as the
/// test process.
fn start_pod(n: u8) -> SocketAddr {
    let socket = UdpSocket::bind((Ipv4Addr::new(127, 0, 2, n), 0)).expect("bind the pod");
    let addr = socket.local_addr().expect("the pod's address");
    thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        while let Ok((len, peer)) = socket.recv_from(&mut buf) {
            let mut answer = format!("pod-{n} {}\n", peer.ip()).into_bytes();
            answer.extend_from_slice(&buf[..len]);
            let _ = socket.send_to(&answer, peer);
        }
    });
    addr
}

/// A UDP frontend over node-N in zone N for each of `pods` (`None`: a node
/// without a pod), under `Cluster`.
fn config(rtt: &str, pods: &[Option<SocketAddr>]) -> String {
    let mut text = format!(
        "workers = 2\ncross_zone_rtt = \"{rtt}\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[frontends]]\nname = \"{FRONTEND}\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"udp\"\n\n\
         [frontends.health]\nkind = \"none\"\n\n[frontends.service]\n\
         external_traffic_policy = \"Cluster\"\n"
    );
    for (i, pod) in pods.iter().enumerate() {
        let n = i + 1;
        let endpoints = pod.map_or(String::new(), |addr| format!("\"{addr}\""));
        text += &format!(
            "\n[[frontends.nodes]]\nname = \"node-{n}\"\naddress = \"127.0.1.{n}\"\n\
             zone = \"{n}\"\nendpoints = [{endpoints}]\n"
        );
    }
    text
}

/// Where an answer says its flow went.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Route {
    pod: u8,
    node: u8,
}

/// Sends `payload` on `client` and checks the echo: the path the answer names.
fn echo(client: &UdpClient, payload: &[u8]) -> Route {
    let answer = client.echo(payload);
    path_of(&answer, payload)
}

/// The path in an answer to `payload`, whose echo must follow its header intact.
fn path_of(answer: &[u8], payload: &[u8]) -> Route {
    let header_end = answer.iter().position(|&b| b == b'\n').expect("a header");
    let header = std::str::from_utf8(&answer[..header_end]).expect("a text header");
    assert_eq!(
        &answer[header_end + 1..],
        payload,
        "the echo after {header}"
    );
    let (pod, seen) = header.split_once(' ').expect("`pod-N SEEN`");
    let pod: u8 = pod
        .strip_prefix("pod-")
        .and_then(|n| n.parse().ok())
        .expect("pod-N");
    let seen: IpAddr = seen.parse().expect("an IP");
    // SNATed across nodes: the pod saw the node; else the node was its own.
    let node = match seen {
        IpAddr::V4(ip) if ip.octets()[..3] == [127, 0, 1] => ip.octets()[3],
        _ => pod,
    };
    Route { pod, node }
}

fn udp_metric(proxy: &Proxy, name: &str, reason: &str) -> f64 {
    proxy
        .metric(name, &[("frontend", FRONTEND), ("reason", reason)])
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------
// 1. Zone down.

/// Pods in zones 1 and 2, none in zone 3: under `Cluster` a flow through
/// any node reaches either pod, so zone 2 is touched by flows through node-2
/// and by flows from nodes 1 and 3 to pod-2 (a healthy node, a pod in the
/// failed zone). Taking zone 2 down ends exactly those, each logged
/// `zone_down` with its zones; the others keep their pod on the same flow;
/// an ended flow's client gets a new flow, to pod-1 through a node not in
/// zone 2.
#[test]
fn a_zone_going_down_ends_the_udp_flows_through_it_and_only_those() {
    let _serial = serial();
    let pods = [Some(start_pod(1)), Some(start_pod(2)), None];
    let mut log_path = PathBuf::new();
    let proxy = Proxy::run_with_flags(&config("0s", &pods), |dir| {
        log_path = dir.join("flows.jsonl");
        let log = log_path.display().to_string();
        ["--flow-log", &log, "--flow-log-format", "json"]
            .map(str::to_owned)
            .to_vec()
    });
    let fe = proxy.frontend(FRONTEND);
    let flows: Vec<(UdpClient, Route)> = (0..40)
        .map(|i| {
            let client = UdpClient::connect(client_ip(i, 7), fe);
            let path = echo(&client, b"before");
            (client, path)
        })
        .collect();
    let touches_2 = |p: &Route| p.pod == 2 || p.node == 2;
    let through_2 = flows.iter().filter(|(_, p)| touches_2(p)).count();
    let healthy_node_to_pod_2 = flows
        .iter()
        .filter(|(_, p)| p.pod == 2 && p.node != 2)
        .count();
    assert!(
        healthy_node_to_pod_2 > 0 && through_2 < flows.len(),
        "{through_2} of {} flows touch zone 2, {healthy_node_to_pod_2} from another node",
        flows.len()
    );

    assert_eq!(admin_post_with(&proxy, "/zones/down?zone=2", "").0, 200);
    let records = flow_records(&log_path, through_2);
    assert_eq!(
        records.len(),
        through_2,
        "only the flows through zone 2 ended"
    );
    for r in &records {
        assert_eq!(r["outcome"], "zone_down", "{r}");
        assert!(r["node_zone"] == "2" || r["endpoint_zone"] == "2", "{r}");
        assert_eq!(r["proto"], "udp", "{r}");
    }
    let ended_before = flows
        .iter()
        .filter(|(c, p)| touches_2(p) && records.iter().any(|r| r["client"] == c.local.to_string()))
        .count();
    assert_eq!(ended_before, through_2, "each record is one of those flows");
    assert_eq!(
        udp_metric(&proxy, "lb_udp_flows_ended_total", "closed"),
        through_2 as f64,
        "counted closed"
    );

    for (client, before) in &flows {
        let after = echo(client, b"after");
        if touches_2(before) {
            assert_eq!(after.pod, 1, "a new flow reached zone 2: {after:?}");
            assert_ne!(after.node, 2, "a new flow entered node 2");
        } else {
            assert_eq!(&after, before, "a flow outside zone 2 moved");
        }
    }
    assert_eq!(
        std::fs::read_to_string(&log_path)
            .expect("the flow log")
            .lines()
            .count(),
        through_2,
        "no other flow ended"
    );
}

// ---------------------------------------------------------------------------
// 2 and 3. The delay line: node-1 (zone 1) has no pod, node-2 (zone 2) has
// the only one, so flows through node-1 cross zones and flows through
// node-2 do not.

/// A client whose flow enters node `node`, with its first round trip made
/// (which is how its node is known): at most [`MAX_PICKS`] clients are tried.
fn client_via(proxy: &Proxy, node: u8, first: usize) -> UdpClient {
    let fe = proxy.frontend(FRONTEND);
    for i in first..first + MAX_PICKS {
        let client = UdpClient::connect(client_ip(i, 9), fe);
        if echo(&client, b"which node?").node == node {
            return client;
        }
    }
    panic!("no flow through node-{node} in {MAX_PICKS} clients");
}

fn delay_lab() -> Proxy {
    let rtt = format!("{}ms", RTT.as_millis());
    Proxy::run(&config(&rtt, &[None, Some(start_pod(2))]))
}

/// Timed round trips on `flows` open flows through `node`.
fn time_round_trips(proxy: &Proxy, node: u8, flows: usize, rounds: usize) -> Vec<Duration> {
    let mut samples = Vec::new();
    for f in 0..flows {
        let client = client_via(proxy, node, f * MAX_PICKS);
        for i in 0..rounds {
            let payload = [i as u8; 64];
            let started = Instant::now();
            let path = echo(&client, &payload);
            samples.push(started.elapsed());
            assert_eq!(path.node, node, "the flow stayed on its node");
        }
    }
    samples
}

#[test]
fn cross_zone_udp_round_trips_pay_the_rtt_and_same_zone_ones_do_not() {
    const FLOWS: usize = 8;
    const ROUNDS: usize = 10;
    let _serial = serial();
    let proxy = delay_lab();
    let same = time_round_trips(&proxy, 2, FLOWS, ROUNDS);
    let before = held(&proxy, FRONTEND, RTT);
    let cross = time_round_trips(&proxy, 1, FLOWS, ROUNDS);
    let after = held(&proxy, FRONTEND, RTT);
    let (cross_p50, same_p50) = (p50(&cross), p50(&same));
    eprintln!("UDP round trip p50: cross-zone {cross_p50:?}, same-zone {same_p50:?}");
    assert!(
        cross.iter().all(|&t| t >= RTT),
        "a cross-zone round trip took under the RTT: {cross:?}"
    );
    assert!(same_p50 < SLACK, "same-zone p50 {same_p50:?} rose");
    let rise = cross_p50.saturating_sub(same_p50);
    assert!(
        rise >= RTT - SLACK / 2 && rise <= RTT + SLACK,
        "p50 rose by {rise:?} across zones, not about {RTT:?}"
    );
    // Every cross-zone datagram held once each way (finding the flows took
    // some more), none for less than half the RTT, nearly all for at most
    // the RTT (half the RTT of noise).
    let holds = after.since(before);
    let round_trips = FLOWS * ROUNDS;
    holds.assert_each_way_per_round_trip(round_trips);
}

#[test]
fn a_burst_crosses_zones_intact_and_in_order() {
    const BURST: usize = 64;
    let _serial = serial();
    let proxy = delay_lab();
    let client = client_via(&proxy, 1, 0);
    // Sizes from 1 byte to a kibibyte, and one of 16 KiB, each numbered.
    let payloads: Vec<Vec<u8>> = (0..BURST)
        .map(|i| {
            let len = if i == BURST / 2 { 16 << 10 } else { 1 + i * 16 };
            let mut p = vec![0u8; len.max(4)];
            p[..4].copy_from_slice(&(i as u32).to_be_bytes());
            for (k, b) in p.iter_mut().enumerate().skip(4) {
                *b = (k * 31 + i) as u8;
            }
            p
        })
        .collect();
    let holds_before = held(&proxy, FRONTEND, RTT).count;
    let started = Instant::now();
    for p in &payloads {
        client.send(p);
    }
    for (i, p) in payloads.iter().enumerate() {
        let answer = client
            .recv(ANSWER_WAIT)
            .unwrap_or_else(|e| panic!("answer {i} of {BURST}: {e}"));
        let path = path_of(&answer, p);
        assert_eq!(path, Route { pod: 2, node: 1 }, "answer {i}");
    }
    assert!(started.elapsed() >= RTT, "the burst came back early");
    assert!(client.try_recv().is_none(), "no answer twice");
    assert_eq!(
        udp_metric(&proxy, "lb_udp_dropped_datagrams_total", "delay_line"),
        0.0
    );
    let holds_after = held(&proxy, FRONTEND, RTT).count;
    assert_eq!(
        holds_after - holds_before,
        2.0 * BURST as f64,
        "each held once each way"
    );
}
