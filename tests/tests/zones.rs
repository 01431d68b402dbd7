//! Availability zones end to end (issue 14): three nodes in zones 1, 2 and 3
//! (127.0.1.1 .. 127.0.1.3) in front of echo pods on 127.0.2.x, with
//! `cross_zone_rtt = "0s"` (the delay is zones-delay's to test; here only
//! which flows cross, and what a zone going down does).
//!
//! 1. Shares: with pods in zone 1 only, under `Cluster` every flow through
//!    nodes 2 and 3 crosses (about two thirds); under `PreferSameZone` with
//!    pods in zones 1 and 2, only flows through node 3 (no pod in its zone)
//!    cross; under `Local` none do. UDP flows are counted as TCP ones are.
//! 2. Zone down: `POST /zones/down?zone=2` ends the open flows through zone 2,
//!    leaves the others carrying bytes, and no new flow reaches zone 2;
//!    `zones_down` in a reloaded config does the same, and the flow log and
//!    `/explain` show the zones.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use lb_tests::udp::{client_ip, UdpClient, UdpPod};
use lb_tests::zones::{admin_post_with, flow_records};
use lb_tests::{read_line, wait_until, Backend, Proxy};

const FRONTEND: &str = "zones";
/// Flows per share measurement: enough that two thirds is told from a half
/// or from all, few enough for a debug build to open them in a second.
const FLOWS: usize = 150;
const WAIT: Duration = Duration::from_secs(10);

/// An echo pod on `127.0.2.N:0` named `pod-N`.
fn pod(n: u8) -> Backend {
    let addr = format!("127.0.2.{n}:0").parse().expect("pod address");
    Backend::start("echo", &format!("pod-{n}"), addr)
}

/// The three-zone lab: node-N in zone N; `pods[i]` run on node-(i+1).
fn config(service: &str, pods: [Option<SocketAddr>; 3]) -> String {
    let mut text = format!(
        "workers = 2\ncross_zone_rtt = \"0s\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[frontends]]\nname = \"{FRONTEND}\"\nlisten = \"127.0.0.1:0\"\n\n\
         [frontends.health]\nkind = \"none\"\n\n[frontends.service]\n{service}\n"
    );
    for (i, p) in pods.iter().enumerate() {
        let n = i + 1;
        let endpoints = p.map_or(String::new(), |addr| format!("\"{addr}\""));
        text += &format!(
            "\n[[frontends.nodes]]\nname = \"node-{n}\"\naddress = \"127.0.1.{n}\"\nzone = \"{n}\"\nendpoints = [{endpoints}]\n"
        );
    }
    text
}

/// Opens a flow and reads the pod's greeting: the pod's name.
fn open(frontend: SocketAddr) -> (TcpStream, String) {
    let mut s = TcpStream::connect(frontend).expect("connect to the frontend");
    s.set_read_timeout(Some(WAIT)).expect("read timeout");
    let name = read_line(&mut s).expect("the pod's greeting");
    (s, name)
}

/// Flows counted per node (`lb_backend_connections_total`, or
/// `lb_backend_udp_flows_total`), and all flows that crossed zones, once all
/// `FLOWS` are counted.
struct Tally {
    via: [f64; 3],
    crossed: f64,
}

fn run_flows(proxy: &Proxy) -> Tally {
    let fe = proxy.frontend(FRONTEND);
    for _ in 0..FLOWS {
        let (s, _) = open(fe);
        drop(s);
    }
    tally(proxy, "lb_backend_connections_total")
}

fn tally(proxy: &Proxy, per_node: &str) -> Tally {
    let via = |n: usize| {
        let node = format!("node-{n}");
        proxy
            .metric(per_node, &[("frontend", FRONTEND), ("backend", &node)])
            .unwrap_or(0.0)
    };
    let counted = wait_until("every flow counted", WAIT, || {
        let v = [via(1), via(2), via(3)];
        (v.iter().sum::<f64>() as usize == FLOWS).then_some(v)
    });
    let crossed = proxy
        .metric("lb_cross_zone_connections_total", &[("frontend", FRONTEND)])
        .unwrap_or(0.0);
    Tally {
        via: counted,
        crossed,
    }
}

fn cross_pair(proxy: &Proxy, from: &str, to: &str) -> f64 {
    proxy
        .metric(
            "lb_cross_zone_connections_total",
            &[("frontend", FRONTEND), ("from_zone", from), ("to_zone", to)],
        )
        .unwrap_or(0.0)
}

/// The share of flows through nodes 2 and 3 is binomial with p = 2/3 over
/// the flow hash; 4 standard deviations (sqrt(p(1-p)/n) = 0.038 at n = 150)
/// keeps a correct balancer from failing while a half or all would fail.
fn assert_about_two_thirds(share: f64) {
    let sd = (2.0 / 3.0 * (1.0 / 3.0) / FLOWS as f64).sqrt();
    assert!(
        (share - 2.0 / 3.0).abs() <= 4.0 * sd,
        "share {share:.3} is not 2/3 ± {:.3}",
        4.0 * sd
    );
}

#[test]
fn cluster_crosses_from_every_node_without_a_pod_in_its_zone() {
    let p1 = pod(1);
    let proxy = Proxy::run(&config(
        "external_traffic_policy = \"Cluster\"",
        [Some(p1.addr), None, None],
    ));
    let t = run_flows(&proxy);
    assert_eq!(
        t.crossed,
        t.via[1] + t.via[2],
        "every flow through nodes 2 and 3 crosses to zone 1, none through node 1: {:?}",
        t.via
    );
    assert_eq!(cross_pair(&proxy, "2", "1"), t.via[1]);
    assert_eq!(cross_pair(&proxy, "3", "1"), t.via[2]);
    assert_about_two_thirds(t.crossed / FLOWS as f64);
}

/// The UDP plane counts its flows across zones as the TCP one does.
#[test]
fn udp_flows_cross_zones_as_tcp_ones_do() {
    let pod = UdpPod::start("127.0.2.1:0".parse().expect("addr"));
    let text = config(
        "external_traffic_policy = \"Cluster\"",
        [Some(pod.addr), None, None],
    )
    .replace(
        "[frontends.health]",
        "protocol = \"udp\"\n\n[frontends.health]",
    );
    let proxy = Proxy::run(&text);
    let fe = proxy.frontend(FRONTEND);
    // Every client stays bound until the count is taken: a dropped one's
    // source port could be handed to a later client, whose datagrams would
    // then join the earlier flow (still in the table) and count no new one.
    let clients: Vec<UdpClient> = (0..FLOWS)
        .map(|i| {
            let client = UdpClient::connect(client_ip(i, 5), fe);
            client.echo(b"which zone?");
            client
        })
        .collect();
    let t = tally(&proxy, "lb_backend_udp_flows_total");
    assert_eq!(t.crossed, t.via[1] + t.via[2], "{:?}", t.via);
    assert_about_two_thirds(t.crossed / FLOWS as f64);
    drop(clients);
}

#[test]
fn prefer_same_zone_crosses_only_from_nodes_with_no_pod_in_their_zone() {
    let (p1, p2) = (pod(1), pod(2));
    let proxy = Proxy::run(&config(
        "traffic_distribution = \"PreferSameZone\"",
        [Some(p1.addr), Some(p2.addr), None],
    ));
    let t = run_flows(&proxy);
    assert!(
        t.via.iter().all(|&v| v > 0.0),
        "every node took flows: {:?}",
        t.via
    );
    assert_eq!(
        t.crossed, t.via[2],
        "only node 3 (no pod in zone 3) sends flows across: {:?}",
        t.via
    );
    assert_eq!(
        cross_pair(&proxy, "1", "2") + cross_pair(&proxy, "2", "1"),
        0.0
    );
}

#[test]
fn local_policy_never_crosses() {
    let p1 = pod(1);
    let proxy = Proxy::run(&config(
        "external_traffic_policy = \"Local\"",
        [Some(p1.addr), None, None],
    ));
    let t = run_flows(&proxy);
    assert_eq!(t.via, [FLOWS as f64, 0.0, 0.0], "only node 1 has a pod");
    assert_eq!(t.crossed, 0.0);
}

/// `POST path` on the admin endpoint: (status, body).
fn admin_post(proxy: &Proxy, path: &str) -> (u16, String) {
    admin_post_with(proxy, path, "")
}

/// Whether the pod at the other end of `s` closed it: the balancer cut the flow.
fn was_cut(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1];
    matches!(s.read(&mut buf), Ok(0))
}

#[test]
fn a_zone_going_down_ends_its_flows_and_new_flows_avoid_it() {
    let (p1, p2) = (pod(1), pod(2));
    let proxy = Proxy::run(&config(
        "traffic_distribution = \"PreferSameZone\"",
        [Some(p1.addr), Some(p2.addr), None],
    ));
    let fe = proxy.frontend(FRONTEND);
    // Under PreferSameZone a flow touches zone 2 exactly when its pod is pod-2
    // (node 2 keeps to pod-2; nodes 1 and 3 pick pod-1 or, from node 3, either).
    let mut open_flows: Vec<(TcpStream, String)> = (0..40).map(|_| open(fe)).collect();
    let through_2 = open_flows.iter().filter(|(_, p)| p == "pod-2").count();
    assert!(
        through_2 > 0 && through_2 < open_flows.len(),
        "{through_2} of 40 via zone 2"
    );
    let node_2_before = proxy
        .metric(
            "lb_backend_connections_total",
            &[("frontend", FRONTEND), ("backend", "node-2")],
        )
        .unwrap_or(0.0);

    assert_eq!(
        proxy.admin_get("/zones/down?zone=2").0,
        405,
        "zone actions are POST only"
    );
    let (status, body) = admin_post(&proxy, "/zones/down?zone=2");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"changed\":true"), "{body}");
    assert_eq!(proxy.metric("lb_zone_down", &[("zone", "2")]), Some(1.0));
    assert_eq!(admin_post(&proxy, "/zones/down?zone=9").0, 404);
    let (_, listed) = proxy.admin_get("/zones");
    let listed: serde_json::Value = serde_json::from_str(&listed).expect("/zones JSON");
    let down: Vec<(&str, bool)> = listed["zones"]
        .as_array()
        .expect("zones")
        .iter()
        .map(|z| (z["zone"].as_str().unwrap(), z["down"].as_bool().unwrap()))
        .collect();
    assert_eq!(down, [("1", false), ("2", true), ("3", false)]);

    // Flows through zone 2 end; every other flow still carries bytes both ways.
    for (s, pod) in open_flows.iter_mut() {
        if pod == "pod-2" {
            assert!(was_cut(s), "a flow to pod-2 ended");
            continue;
        }
        let payload = format!("still here {pod}\n");
        s.write_all(payload.as_bytes())
            .expect("write to a kept flow");
        let mut echoed = vec![0u8; payload.len()];
        s.read_exact(&mut echoed).expect("the echo of a kept flow");
        assert_eq!(echoed, payload.as_bytes());
    }

    // New flows: none reaches pod-2, none enters node 2.
    for _ in 0..40 {
        let (_, pod) = open(fe);
        assert_eq!(pod, "pod-1", "a new flow reached zone 2");
    }
    let node_2_after = proxy
        .metric(
            "lb_backend_connections_total",
            &[("frontend", FRONTEND), ("backend", "node-2")],
        )
        .unwrap_or(0.0);
    assert_eq!(node_2_after, node_2_before, "node 2 took no new flow");

    // Brought back up, zone 2 takes flows again.
    assert_eq!(admin_post(&proxy, "/zones/up?zone=2").0, 200);
    assert_eq!(proxy.metric("lb_zone_down", &[("zone", "2")]), Some(0.0));
    wait_until("a flow to reach pod-2 again", WAIT, || {
        (open(fe).1 == "pod-2").then_some(())
    });
}

/// A web page the developer opens can POST to loopback without a preflight
/// (CSRF): what a browser adds (`Origin`, `Sec-Fetch-Site`) gets 403 and
/// takes nothing down, while the same request from curl still works.
#[test]
fn a_web_page_cannot_take_a_zone_down() {
    let p2 = pod(2);
    let proxy = Proxy::run(&config(
        "traffic_distribution = \"PreferSameZone\"",
        [None, Some(p2.addr), None],
    ));
    let browsers = [
        "Origin: http://attacker.example\r\n",
        "Origin: null\r\n",
        "Origin: http://127.0.0.1:9180\r\n",
        "Sec-Fetch-Site: cross-site\r\n",
        "Sec-Fetch-Site: same-site\r\n",
        "Sec-Fetch-Site: same-origin\r\nOrigin: http://127.0.0.1\r\n",
    ];
    for headers in browsers {
        let (status, body) = admin_post_with(&proxy, "/zones/down?zone=2", headers);
        assert_eq!(status, 403, "{headers:?}: {body}");
        assert!(body.contains("refused"), "{headers:?}: {body}");
    }
    assert_eq!(proxy.metric("lb_zone_down", &[("zone", "2")]), Some(0.0));
    let fe = proxy.frontend(FRONTEND);
    assert_eq!(open(fe).1, "pod-2", "zone 2 still serves");
    // What the user typed themselves (`Sec-Fetch-Site: none`), or curl, works.
    let (status, body) = admin_post_with(&proxy, "/zones/down?zone=2", "Sec-Fetch-Site: none\r\n");
    assert_eq!(status, 200, "{body}");
    assert_eq!(proxy.metric("lb_zone_down", &[("zone", "2")]), Some(1.0));
    assert_eq!(admin_post(&proxy, "/zones/up?zone=2").0, 200);
}

/// `zones_down` by config reload does what the admin action does; the flow
/// log records both zones and the outcome `zone_down`; `/explain` shows the
/// node's zone and whether each candidate pod is across zones.
#[test]
fn zones_down_by_reload_is_logged_and_explained() {
    let (p1, p2) = (pod(1), pod(2));
    let text = config(
        "traffic_distribution = \"PreferSameZone\"",
        [Some(p1.addr), Some(p2.addr), None],
    )
    .replace(
        "cross_zone_rtt = \"0s\"",
        "cross_zone_rtt = \"0s\"\nzones_down = []",
    );
    let mut log_path = PathBuf::new();
    let proxy = Proxy::run_with_flags(&text, |dir| {
        log_path = dir.join("flows.jsonl");
        [
            "--flow-log",
            &log_path.display().to_string(),
            "--flow-log-format",
            "json",
        ]
        .map(str::to_owned)
        .to_vec()
    });
    let fe = proxy.frontend(FRONTEND);

    let explained = proxy.explain(FRONTEND, "127.0.0.7:40000".parse().unwrap());
    let hop = &explained["hop"];
    let node = hop["node"].as_str().expect("the node");
    let node_zone = hop["node_zone"].as_str().expect("the node's zone");
    assert_eq!(node.strip_prefix("node-"), Some(node_zone), "{hop}");
    for c in hop["endpoint_candidates"].as_array().expect("candidates") {
        let crosses = c["zone"].as_str() != Some(node_zone);
        assert_eq!(c["crosses_zones"].as_bool(), Some(crosses), "{c}");
        assert_eq!(
            c["added_rtt_ms"].as_f64(),
            Some(0.0),
            "cross_zone_rtt is 0s: {c}"
        );
    }

    let mut flows: Vec<(TcpStream, String)> = (0..30).map(|_| open(fe)).collect();
    let to_pod_2 = flows.iter().filter(|(_, p)| p == "pod-2").count();
    assert!(to_pod_2 > 0, "some flow reached zone 2");
    proxy.write_config(&text.replace("zones_down = []", "zones_down = [\"2\"]"));
    proxy.signal(libc::SIGHUP);
    proxy.wait_metric("lb_zone_down", &[("zone", "2")], WAIT, |v| v == 1.0);
    for (s, pod) in flows.iter_mut().filter(|(_, p)| p == "pod-2") {
        assert!(was_cut(s), "a flow to {pod} ended with the reload");
    }
    assert_eq!(
        admin_post(&proxy, "/zones/up?zone=2").0,
        409,
        "the config holds it down"
    );
    drop(flows);

    let records = flow_records(&log_path, 30);
    for r in &records {
        let (from, to) = (r["node_zone"].as_str(), r["endpoint_zone"].as_str());
        let via = r["via"].as_str().expect("via");
        assert_eq!(via.strip_prefix("node-"), from, "{r}");
        let to_zone_2 = r["endpoint"].as_str() == Some(&*p2.addr.to_string());
        assert_eq!(to == Some("2"), to_zone_2, "{r}");
        let cut = r["outcome"] == "zone_down";
        assert_eq!(cut, to_zone_2 || from == Some("2"), "{r}");
    }
    assert_eq!(
        records
            .iter()
            .filter(|r| r["outcome"] == "zone_down")
            .count(),
        to_pod_2
    );
}
