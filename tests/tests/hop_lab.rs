//! The seed article's lab end to end: the balancer as the Azure Load Balancer
//! in front of three AKS nodes (127.0.1.1 .. 127.0.1.3), with the app's only
//! pod on node 2. The pod is lb-bench's HTTP backend, in process, recording the
//! source address of every connection it accepts (a `ConnLog`) and answering
//! each request with that address (`X-Seen-Source`), so the tests assert what
//! the pod itself saw:
//!
//! 1. `hey` with keep-alive is one flow: one pod connection, one source.
//! 2. `hey -disable-keepalive` spreads flows over the nodes; flows through
//!    node 2 reach the pod from the client's address, the others from the
//!    forwarding node's IP (SNAT); the JSON flow log agrees.
//! 3. After a reload to `session_affinity = "ClientIP"` the ALB hashes the
//!    source IP only: each client address sticks to one node.
//! 4. `externalTrafficPolicy: Local`: only node 2 takes traffic, the pod sees
//!    every client's own address, and the healthCheckNodePort says why.
//! 5. A pod that turns unready stops new flows but not established ones.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_bench::serve::{ConnLog, InProcess, LoggedConn as PodConn};
use lb_tests::{
    connect, header, http_get_close, http_keepalive_get, run_hey, wait_until, BoundClient, Proxy,
};

const FRONTEND: &str = "testapp";
const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];
const NODE_IPS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(127, 0, 1, 1),
    Ipv4Addr::new(127, 0, 1, 2),
    Ipv4Addr::new(127, 0, 1, 3),
];
const CLIENT_IP: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// The pod: lb-bench's HTTP/1.1 keep-alive backend, recording who connected.

/// The app's pod, bound to `127.0.2.2:0`. Every response carries the source
/// the pod saw for that connection in `X-Seen-Source`. Stopped on drop.
struct Pod {
    addr: SocketAddr,
    log: Arc<ConnLog>,
    _server: InProcess,
}

impl Pod {
    fn start() -> Pod {
        let log = Arc::new(ConnLog::default());
        let spec = "http:pod=127.0.2.2:0".parse().expect("the pod's spec");
        let server = InProcess::start_logged(&[spec], Arc::clone(&log)).expect("start the pod");
        let addr = server.addr("pod").expect("the pod's address");
        Pod {
            addr,
            log,
            _server: server,
        }
    }

    fn conns(&self) -> Vec<PodConn> {
        self.log.conns()
    }

    /// Waits until the pod has accepted `n` connections and answered `requests`
    /// requests in all, then returns its records.
    fn wait_for(&self, n: usize, requests: usize) -> Vec<PodConn> {
        wait_until(
            &format!("the pod to see {n} connections and {requests} requests"),
            WAIT,
            || {
                let all = self.conns();
                let answered: usize = all.iter().map(|c| c.requests).sum();
                (all.len() >= n && answered >= requests).then_some(all)
            },
        )
    }

    /// How many connections the pod saw from each source IP.
    fn sources(&self) -> BTreeMap<IpAddr, usize> {
        let mut out = BTreeMap::new();
        for c in self.conns() {
            *out.entry(c.peer.ip()).or_default() += 1;
        }
        out
    }
}

/// The source IP the pod saw, from its `X-Seen-Source: IP:PORT` header.
fn seen_source(head: &str) -> IpAddr {
    let seen: SocketAddr = header(head, "X-Seen-Source")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("the pod answers with X-Seen-Source: IP:PORT: {head}"));
    seen.ip()
}

// ---------------------------------------------------------------------------
// The balancer, started with the command-line flags these tests need.

struct Lab {
    proxy: Proxy,
    frontend: SocketAddr,
    flow_log: Option<PathBuf>,
}

impl Lab {
    /// `lb-proxy run --config` on `config`, with `--flow-log FILE
    /// --flow-log-format json` when `flow_log` is set; waits for the ready
    /// file and for the admin endpoint to answer.
    fn start(config: &str, flow_log: bool) -> Lab {
        let mut log_path = None;
        let proxy = Proxy::run_with_flags(config, |dir| {
            if !flow_log {
                return Vec::new();
            }
            let path = dir.join("flows.jsonl");
            let flags = vec![
                "--flow-log".to_owned(),
                path.display().to_string(),
                "--flow-log-format".to_owned(),
                "json".to_owned(),
            ];
            log_path = Some(path);
            flags
        });
        Lab {
            frontend: proxy.frontend(FRONTEND),
            proxy,
            flow_log: log_path,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/", self.frontend)
    }

    fn dir(&self) -> &Path {
        self.proxy.dir()
    }

    fn admin_get(&self, path: &str) -> (u16, String) {
        self.proxy.admin_get(path)
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.proxy.metric(name, labels).unwrap_or(0.0)
    }

    fn frontend_metric(&self, name: &str) -> f64 {
        self.metric(name, &[("frontend", FRONTEND)])
    }

    /// `metric{frontend, backend=node}` for each node.
    fn per_node(&self, name: &str) -> [f64; 3] {
        let m = self.proxy.metrics();
        NODES.map(|n| {
            m.get(name, &[("frontend", FRONTEND), ("backend", n)])
                .unwrap_or(0.0)
        })
    }

    /// How many new connections each node took since `before` (a
    /// `per_node("lb_backend_connections_total")`).
    fn connections_since(&self, before: [f64; 3]) -> Vec<usize> {
        self.per_node("lb_backend_connections_total")
            .iter()
            .zip(&before)
            .map(|(a, b)| (a - b) as usize)
            .collect()
    }

    fn explain(&self, src: SocketAddr) -> serde_json::Value {
        self.proxy.explain(FRONTEND, src)
    }

    /// Rewrites the config, sends SIGHUP and waits for the reload to count as a success.
    fn reload(&self, config: &str) {
        let before = self.metric("lb_config_reloads_total", &[("result", "success")]);
        self.proxy.write_config(config);
        self.proxy.signal(libc::SIGHUP);
        let deadline = Instant::now() + WAIT;
        loop {
            let m = self.proxy.metrics();
            let ok = m
                .get("lb_config_reloads_total", &[("result", "success")])
                .unwrap_or(0.0);
            if ok > before {
                return;
            }
            let failed = m
                .get("lb_config_reloads_total", &[("result", "failure")])
                .unwrap_or(0.0);
            assert!(
                failed == 0.0 && Instant::now() < deadline,
                "the reload did not succeed (failures: {failed}); lb-proxy's log:\n{}",
                self.proxy.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Polls the flow log until it holds `n` lines, and returns them parsed.
    fn flow_log_lines(&self, n: usize) -> Vec<serde_json::Value> {
        let path = self.flow_log.as_ref().expect("started with a flow log");
        // The writer thread flushes every 200 ms when idle.
        let text = wait_until(&format!("{n} lines in the flow log"), WAIT, || {
            let t = fs::read_to_string(path).unwrap_or_default();
            // Count complete lines only: a buffer flushed when full may end mid-line.
            (t.matches('\n').count() >= n).then_some(t)
        });
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        complete
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("flow log line {l:?}: {e}")))
            .collect()
    }
}

/// The lab's config: three nodes, the pod on node 2 (ready or not), no active
/// probes (so nothing but the test's own flows reaches the pod) and the
/// `[frontends.service]` settings given.
fn lab_config(pod: SocketAddr, service: &str, pod_ready: bool) -> String {
    lab_config_in_order(pod, service, pod_ready, [0, 1, 2])
}

/// [`lab_config`] with the `[[frontends.nodes]]` tables listed in `order`
/// (indices into [`NODES`]): node ids must not depend on the config's order.
fn lab_config_in_order(
    pod: SocketAddr,
    service: &str,
    pod_ready: bool,
    order: [usize; 3],
) -> String {
    let nodes: Vec<String> = order
        .iter()
        .map(|&i| {
            let endpoints = if i == 1 {
                format!("[{{ address = \"{pod}\", ready = {pod_ready} }}]")
            } else {
                "[]".to_owned()
            };
            format!(
                "[[frontends.nodes]]\nname = \"{}\"\naddress = \"{}\"\nendpoints = {endpoints}\n",
                NODES[i], NODE_IPS[i]
            )
        })
        .collect();
    format!(
        r#"workers = 2

[admin]
listen = "127.0.0.1:0"

[[frontends]]
name = "{FRONTEND}"
listen = "127.0.0.1:0"
distribution = "Default"
client_address = "snat"

[frontends.service]
{service}

[frontends.health]
kind = "none"

{}"#,
        nodes.join("\n")
    )
}

const CLUSTER: &str = "external_traffic_policy = \"Cluster\"\nsession_affinity = \"None\"";
const CLUSTER_CLIENT_IP: &str =
    "external_traffic_policy = \"Cluster\"\nsession_affinity = \"ClientIP\"";
const LOCAL: &str = "external_traffic_policy = \"Local\"\nsession_affinity = \"None\"";
const CLUSTER_SNAT_ALWAYS: &str =
    "external_traffic_policy = \"Cluster\"\nsession_affinity = \"None\"\nsnat = \"always\"";

/// The node a flow went through, from the source the pod saw: the client's
/// own address through node 2 (local delivery), the node IP otherwise.
fn node_from_seen(seen: IpAddr, client: IpAddr) -> usize {
    if seen == client {
        return 1;
    }
    NODE_IPS
        .iter()
        .position(|ip| IpAddr::V4(*ip) == seen)
        .filter(|&i| i != 1)
        .unwrap_or_else(|| {
            panic!("the pod saw {seen}, neither the client {client} nor node-1/node-3")
        })
}

/// One `GET /` from `client` on a new connection; returns the source the pod saw.
fn get_from(client: Ipv4Addr, frontend: SocketAddr) -> (SocketAddr, IpAddr) {
    let bound = BoundClient::new(client).expect("bind the client address");
    let local = bound.local;
    let mut s = bound.connect(frontend).expect("connect to the frontend");
    let (status, head, _) =
        http_keepalive_get(&mut s, "/").unwrap_or_else(|e| panic!("GET / from {local}: {e}"));
    assert_eq!(status, 200, "{head}");
    (local, seen_source(&head))
}

// ---------------------------------------------------------------------------
// hey.

/// Runs hey, bounded in time; asserts all `n` responses were 200.
fn hey(dir: &Path, args: &[&str], url: &str, n: usize) -> String {
    let out = run_hey(dir, args, url, Duration::from_secs(40));
    assert!(
        !out.contains("Error distribution"),
        "hey reported errors:\n{out}"
    );
    let want = format!("[200]\t{n} responses");
    assert!(
        out.lines().any(|l| l.trim() == want),
        "expected `{want}` in hey's output:\n{out}"
    );
    out
}

// ---------------------------------------------------------------------------
// The steps.

/// Step 1: ten requests on one kept-alive connection are one flow: the
/// balancer accepts one connection, opens one to the pod through one node, and
/// the pod gets all ten requests on it from one source.
#[test]
fn hey_keepalive_is_one_flow_through_one_node() {
    let pod = Pod::start();
    let lab = Lab::start(&lab_config(pod.addr, CLUSTER, true), false);
    hey(lab.dir(), &["-n", "10", "-c", "1"], &lab.url(), 10);

    let conns = pod.wait_for(1, 10);
    let used: Vec<&PodConn> = conns.iter().filter(|c| c.requests > 0).collect();
    assert_eq!(
        used.len(),
        1,
        "all requests should arrive over one connection: {conns:?}"
    );
    assert_eq!(used[0].requests, 10, "{conns:?}");
    assert_eq!(
        lab.frontend_metric("lb_frontend_connections_total"),
        1.0,
        "hey -c 1 with keep-alive is one flow"
    );
    let per_node = lab.per_node("lb_backend_connections_total");
    assert_eq!(per_node.iter().sum::<f64>(), 1.0, "{per_node:?}");
    let node = per_node.iter().position(|&n| n == 1.0).unwrap();
    assert_eq!(
        node_from_seen(used[0].peer.ip(), CLIENT_IP),
        node,
        "the pod's source {} does not match the node the balancer used ({})",
        used[0].peer,
        NODES[node]
    );
    // Every pod connection (hey might dial a spare) came through the balancer.
    assert_eq!(
        conns.len() as f64,
        per_node.iter().sum::<f64>(),
        "{conns:?}"
    );
}

/// Step 2: without keep-alive every request is a new flow, so flows spread
/// over the three nodes; the pod sees the client for flows through node 2 and
/// the forwarding node's IP for the others, and the flow log says the same.
#[test]
fn hey_without_keepalive_spreads_flows_and_the_pod_sees_who_forwarded() {
    const N: usize = 600;
    let pod = Pod::start();
    let lab = Lab::start(&lab_config(pod.addr, CLUSTER, true), true);
    let before = lab.per_node("lb_backend_connections_total");
    hey(
        lab.dir(),
        &["-disable-keepalive", "-n", &N.to_string(), "-c", "1"],
        &lab.url(),
        N,
    );
    let delta = lab.connections_since(before);
    assert_eq!(
        delta.iter().sum::<usize>(),
        N,
        "one flow per request: {delta:?}"
    );
    assert_eq!(
        lab.frontend_metric("lb_frontend_connections_total"),
        N as f64
    );
    eprintln!("flows per node (node-1, node-2, node-3): {delta:?}");
    for (name, d) in NODES.iter().zip(&delta) {
        let share = *d as f64 / N as f64;
        assert!(
            (0.25..=0.42).contains(&share),
            "{name} got {:.1}% of the flows (want 25%..42%): {delta:?}",
            share * 100.0
        );
    }

    // What the pod saw.
    let conns = pod.wait_for(N, N);
    assert_eq!(conns.len(), N, "one pod connection per flow");
    assert!(conns.iter().all(|c| c.requests == 1), "one request each");
    let sources = pod.sources();
    eprintln!("sources the pod saw: {sources:?}");
    let seen = |ip: IpAddr| sources.get(&ip).copied().unwrap_or(0);
    assert_eq!(
        (
            seen(IpAddr::V4(NODE_IPS[0])),
            seen(CLIENT_IP),
            seen(IpAddr::V4(NODE_IPS[2]))
        ),
        (delta[0], delta[1], delta[2]),
        "pod sources (127.0.1.1, 127.0.0.1, 127.0.1.3) vs flows per node; all sources: {sources:?}"
    );
    assert_eq!(
        sources.len(),
        3,
        "no other source reached the pod: {sources:?}"
    );

    // What the flow log says.
    let lines = lab.flow_log_lines(N);
    assert_eq!(lines.len(), N, "one flow log line per flow");
    let mut via_counts = [0usize; 3];
    for l in &lines {
        let via = l["via"].as_str().expect("via");
        let node = NODES
            .iter()
            .position(|n| *n == via)
            .unwrap_or_else(|| panic!("via {via} is not a node: {l}"));
        via_counts[node] += 1;
        let expected_seen = if node == 1 {
            CLIENT_IP.to_string()
        } else {
            NODE_IPS[node].to_string()
        };
        assert_eq!(l["seen_source"], expected_seen.as_str(), "{l}");
        assert_eq!(l["endpoint"], pod.addr.to_string().as_str(), "{l}");
        assert_eq!(l["frontend"], FRONTEND, "{l}");
        assert_eq!(l["proto"], "tcp", "{l}");
        assert_eq!(l["frontend_addr"], lab.frontend.to_string().as_str(), "{l}");
        let client: SocketAddr = l["client"].as_str().expect("client").parse().unwrap();
        assert_eq!(client.ip(), CLIENT_IP, "{l}");
        assert_eq!(l["outcome"], "closed", "{l}");
        assert!(l["bytes_to_backend"].as_u64().unwrap() > 0, "{l}");
        assert!(l["bytes_from_backend"].as_u64().unwrap() > 0, "{l}");
    }
    assert_eq!(
        via_counts.to_vec(),
        delta,
        "flow log `via` per node vs lb_backend_connections_total"
    );
}

/// Step 3: a reload to ClientIP affinity switches the ALB to SourceIP: every
/// connection from one client address goes through one node, and 30 client
/// addresses spread over all three nodes. `/explain` agrees with the path.
#[test]
fn client_ip_affinity_after_reload_pins_each_client_address_to_one_node() {
    const CLIENTS: u8 = 30;
    const PER_CLIENT: usize = 4;
    let pod = Pod::start();
    let lab = Lab::start(&lab_config(pod.addr, CLUSTER, true), false);
    let probe: SocketAddr = "127.0.3.1:40000".parse().unwrap();
    assert_eq!(lab.explain(probe)["distribution"], "Default");

    lab.reload(&lab_config(pod.addr, CLUSTER_CLIENT_IP, true));
    let explained = lab.explain(probe);
    assert_eq!(explained["distribution"], "SourceIP", "{explained}");
    assert_eq!(
        explained["hop"]["session_affinity"], "ClientIP",
        "{explained}"
    );

    let before = lab.per_node("lb_backend_connections_total");
    let mut node_of: BTreeMap<Ipv4Addr, BTreeSet<usize>> = BTreeMap::new();
    let mut flows = [0usize; 3];
    for round in 0..PER_CLIENT {
        for k in 1..=CLIENTS {
            let client = Ipv4Addr::new(127, 0, 3, k);
            let (local, seen) = get_from(client, lab.frontend);
            let node = node_from_seen(seen, IpAddr::V4(client));
            flows[node] += 1;
            node_of.entry(client).or_default().insert(node);
            if round == 0 {
                // The same source IP with any port hashes to the same node.
                for src in [local, SocketAddr::new(IpAddr::V4(client), 1)] {
                    let e = lab.explain(src);
                    assert_eq!(e["distribution"], "SourceIP", "{e}");
                    assert_eq!(e["backend"]["name"], NODES[node], "{src}: {e}");
                    assert_eq!(e["hop"]["node"], NODES[node], "{src}: {e}");
                }
            }
        }
    }
    eprintln!("ClientIP affinity: flows per node {flows:?}");
    let moved: Vec<_> = node_of.iter().filter(|(_, n)| n.len() > 1).collect();
    assert!(
        moved.is_empty(),
        "clients whose flows used more than one node: {moved:?}"
    );
    assert!(
        flows.iter().all(|&f| f > 0),
        "30 client addresses should use all three nodes: {flows:?}"
    );
    let delta = lab.connections_since(before);
    assert_eq!(
        delta,
        flows.to_vec(),
        "lb_backend_connections_total per node"
    );
    // The pod agrees: client addresses only via node-2, node IPs otherwise.
    let sources = pod.sources();
    let via_node2: usize = sources
        .iter()
        .filter(|(ip, _)| matches!(ip, IpAddr::V4(v4) if v4.octets()[..3] == [127, 0, 3]))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(via_node2, flows[1], "{sources:?}");
}

/// Step 4: `externalTrafficPolicy: Local`: only the pod's node is in the
/// pool, the pod sees each client's own address, and the healthCheckNodePort
/// answers 503 on the nodes without a pod.
#[test]
fn local_policy_uses_only_the_pods_node_and_keeps_client_addresses() {
    let pod = Pod::start();
    let lab = Lab::start(
        &lab_config_in_order(pod.addr, LOCAL, true, [2, 1, 0]),
        false,
    );
    assert_eq!(lab.per_node("lb_backend_up"), [0.0, 1.0, 0.0]);

    for (node, status, local) in [("node-1", 503, 0), ("node-2", 200, 1), ("node-3", 503, 0)] {
        let (got, body) = lab.admin_get(&format!("/healthz?node={node}"));
        assert_eq!(got, status, "/healthz?node={node}: {body}");
        assert!(
            body.contains(&format!("\"localEndpoints\":{local}")),
            "/healthz?node={node}: {body}"
        );
    }
    let (got, body) = lab.admin_get("/healthz?node=node-9");
    assert_eq!(got, 404, "{body}");

    let mut expected = BTreeMap::new();
    for k in 1..=10u8 {
        let client = Ipv4Addr::new(127, 0, 3, 100 + k);
        for _ in 0..3 {
            let (local, seen) = get_from(client, lab.frontend);
            assert_eq!(
                seen,
                IpAddr::V4(client),
                "the pod must see the client itself"
            );
            *expected.entry(IpAddr::V4(client)).or_insert(0usize) += 1;
            if k == 1 {
                let e = lab.explain(local);
                assert_eq!(e["hop"]["node"], "node-2", "{e}");
                assert_eq!(e["hop"]["external_traffic_policy"], "Local", "{e}");
                assert_eq!(
                    e["hop"]["endpoint_candidates"][0]["source_seen"],
                    client.to_string().as_str(),
                    "{e}"
                );
            }
        }
    }
    // hey's flows, from 127.0.0.1, too.
    hey(
        lab.dir(),
        &["-disable-keepalive", "-n", "30", "-c", "1"],
        &lab.url(),
        30,
    );
    expected.insert(CLIENT_IP, 30);
    pod.wait_for(60, 60);
    assert_eq!(pod.sources(), expected, "sources the pod saw");
    assert_eq!(
        lab.per_node("lb_backend_connections_total"),
        [0.0, 60.0, 0.0]
    );
    assert_eq!(lab.per_node("lb_backend_up"), [0.0, 1.0, 0.0]);
}

/// A pod that turns unready (config `ready = false`, reloaded) takes the
/// service down for new flows, which are refused and counted, while a
/// connection established before keeps working; ready again restores it.
#[test]
fn an_unready_pod_refuses_new_flows_but_keeps_established_ones() {
    let pod = Pod::start();
    let lab = Lab::start(&lab_config(pod.addr, CLUSTER, true), false);
    let mut old = connect(lab.frontend).expect("connect");
    let (status, head, _) = http_keepalive_get(&mut old, "/").expect("GET on the old connection");
    assert_eq!(status, 200);
    let old_seen = seen_source(&head);

    lab.reload(&lab_config(pod.addr, CLUSTER, false));
    assert_eq!(lab.per_node("lb_backend_up"), [0.0, 0.0, 0.0]);
    let (code, body) = lab.admin_get("/healthz?node=node-2");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"localEndpoints\":0"), "{body}");

    let refused_before = lab.frontend_metric("lb_frontend_no_backend_total");
    let pod_conns = pod.conns().len();
    for i in 0..5 {
        let r = http_get_close(lab.frontend, "/");
        assert!(
            r.is_err(),
            "new flow #{i} was served with no ready endpoint: {r:?}"
        );
    }
    let refused = lab.wait_metric_frontend("lb_frontend_no_backend_total", |v| {
        v >= refused_before + 5.0
    });
    assert_eq!(refused, refused_before + 5.0);
    assert_eq!(pod.conns().len(), pod_conns, "no new flow reached the pod");

    // The established connection carries on, to the same pod, from the same source.
    for i in 0..3 {
        let (status, head, _) = http_keepalive_get(&mut old, "/")
            .unwrap_or_else(|e| panic!("request #{i} on the established connection: {e}"));
        assert_eq!(status, 200);
        assert_eq!(seen_source(&head), old_seen);
    }

    lab.reload(&lab_config(pod.addr, CLUSTER, true));
    assert_eq!(lab.per_node("lb_backend_up"), [1.0, 1.0, 1.0]);
    for i in 0..5 {
        let (status, head, _) =
            http_get_close(lab.frontend, "/").unwrap_or_else(|e| panic!("flow #{i}: {e}"));
        assert_eq!(status, 200, "{head}");
    }
    let (status, _, _) = http_keepalive_get(&mut old, "/").expect("the old connection at the end");
    assert_eq!(status, 200);
    assert_eq!(
        lab.frontend_metric("lb_frontend_no_backend_total"),
        refused,
        "nothing refused once ready again"
    );
}

/// `snat = "always"` (kube-proxy's masquerade rule): every Cluster flow
/// reaches the pod from the forwarding node's IP, node 2's own included.
#[test]
fn snat_always_shows_the_node_ip_even_for_local_deliveries() {
    let pod = Pod::start();
    let lab = Lab::start(
        &lab_config_in_order(pod.addr, CLUSTER_SNAT_ALWAYS, true, [1, 2, 0]),
        false,
    );
    let mut flows = [0usize; 3];
    for k in 0..60u8 {
        let client = Ipv4Addr::new(127, 0, 3, 150 + k % 20);
        let (local, seen) = get_from(client, lab.frontend);
        let node = NODE_IPS
            .iter()
            .position(|ip| IpAddr::V4(*ip) == seen)
            .unwrap_or_else(|| panic!("the pod saw {seen}, not a node IP, for {local}"));
        flows[node] += 1;
    }
    eprintln!("snat = always: flows per node {flows:?}");
    assert!(flows.iter().all(|&f| f > 0), "{flows:?}");
    let per_node = lab.per_node("lb_backend_connections_total");
    assert_eq!(
        per_node.map(|v| v as usize),
        flows,
        "metrics vs what the pod saw"
    );
    let e = lab.explain("127.0.3.150:1".parse().unwrap());
    assert_eq!(e["hop"]["snat"], "always", "{e}");
    let node = e["hop"]["node"].as_str().expect("hop.node");
    let i = NODES.iter().position(|n| *n == node).expect("a node");
    assert_eq!(
        e["hop"]["endpoint_candidates"][0]["source_seen"],
        NODE_IPS[i].to_string().as_str(),
        "{e}"
    );
}

/// The lab config shipped in config/ is valid and describes the article's lab.
#[test]
fn the_shipped_aks_lab_config_checks() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/aks-lab.toml");
    let (status, stdout, stderr) = lb_tests::run_check(&path);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("3 node(s), 1 endpoint(s), externalTrafficPolicy Cluster"),
        "{stdout}"
    );
}

impl Lab {
    fn wait_metric_frontend(&self, name: &str, ok: impl Fn(f64) -> bool) -> f64 {
        wait_until(&format!("{name} to reach the expected value"), WAIT, || {
            let v = self.frontend_metric(name);
            ok(v).then_some(v)
        })
    }
}

/// `client_address = "preserve"` under Cluster: the balancer binds every
/// connection to the client's own address, so the pod sees the client even on
/// a cross-node hop, and `/explain` must name that same source for the flow.
#[test]
fn preserve_under_cluster_explain_names_the_source_the_pod_saw() {
    let pod = Pod::start();
    let config = lab_config(pod.addr, CLUSTER, true)
        .replace("client_address = \"snat\"", "client_address = \"preserve\"");
    let lab = Lab::start(&config, false);
    let mut cross_node = 0;
    for k in 0..30u8 {
        let client = Ipv4Addr::new(127, 0, 3, 200 + k % 20);
        let bound = BoundClient::new(client).expect("bind the client address");
        let local = bound.local;
        // Asked before the flow exists: /explain answers for a source address and port.
        let e = lab.explain(local);
        let mut s = bound
            .connect(lab.frontend)
            .expect("connect to the frontend");
        let (status, head, _) = http_keepalive_get(&mut s, "/").expect("GET /");
        assert_eq!(status, 200, "{head}");
        let seen = seen_source(&head);
        assert_eq!(
            seen,
            IpAddr::V4(client),
            "preserve: the pod sees the client"
        );
        assert_eq!(
            e["hop"]["endpoint_candidates"][0]["source_seen"],
            seen.to_string().as_str(),
            "/explain vs the pod for {local}: {e}"
        );
        if e["hop"]["node"] != "node-2" {
            cross_node += 1;
        }
    }
    assert!(
        cross_node > 0,
        "no flow crossed nodes: the test proves nothing"
    );
}

/// kube-proxy serves the healthCheckNodePort only for `Local` services; under
/// `Cluster` every node forwards to the cluster's ready pods, so Azure's probe
/// passes on every node, a node without pods included, and the body says why.
#[test]
fn cluster_policy_health_check_passes_on_nodes_without_pods() {
    let pod = Pod::start();
    let lab = Lab::start(&lab_config(pod.addr, CLUSTER, true), false);
    for (node, local) in [("node-1", 0), ("node-2", 1), ("node-3", 0)] {
        let (got, body) = lab.admin_get(&format!("/healthz?node={node}"));
        assert_eq!(got, 200, "/healthz?node={node} under Cluster: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
        assert_eq!(v["localEndpoints"], local, "{body}");
        assert_eq!(v["externalTrafficPolicy"], "Cluster", "{body}");
        assert!(
            v["reason"].as_str().is_some_and(|r| r.contains("Cluster")),
            "the body says why: {body}"
        );
    }
    // Local still answers 503 on a node without a ready local endpoint.
    lab.reload(&lab_config(pod.addr, LOCAL, true));
    let (got, body) = lab.admin_get("/healthz?node=node-1");
    assert_eq!(got, 503, "/healthz?node=node-1 under Local: {body}");
    assert!(body.contains("\"localEndpoints\":0"), "{body}");
    let (got, body) = lab.admin_get("/healthz?node=node-2");
    assert_eq!(got, 200, "/healthz?node=node-2 under Local: {body}");
}
