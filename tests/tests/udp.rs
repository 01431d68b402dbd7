//! UDP frontends end to end, with Azure's UDP semantics: real `lb-proxy`,
//! real `udp-echo` backends (lb-bench's, in process where the test reads the
//! backend's own counts, as processes where it kills them), real sockets.
//!
//! - 100k datagrams from 50 client ports at a bounded rate: none lost, each
//!   flow on the backend lb-core's table gives it, and the balancer's
//!   per-backend counts equal what the clients sent and the backends saw.
//! - Idle expiry: a flow idle past `idle_timeout` ends (`expired`, with its
//!   flow-log record) and its next datagram is a new flow.
//! - The flow cap: a new flow at `max_flows` evicts the flow idle the longest.
//! - A backend going down moves its flows to their next choice; all down ends
//!   every flow and drops new datagrams, counted.
//! - A 65,507-byte datagram (IPv4 UDP's largest) passes intact both ways.
//! - `client_address = "preserve"`: the backend sees the client's IP.
//! - The node hop: the pod sees the node's address on a cross-node hop, and
//!   the client's under `external_traffic_policy = "Local"`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use lb_bench::serve::{InProcess, ServerSpec};
use lb_core::DistributionMode;
use lb_tests::udp::{
    bind_routed, client_ip, frontend_config, pod_answer, run_echo_load, ClientTally, EchoLoad,
    RoutingModel, UdpClient, UdpPod, ANSWER_WAIT, MAX_IPV4_UDP_PAYLOAD,
};
use lb_tests::{backend_toml, wait_until, Backend, Proxy, SeededStream, NO_PROBES};

const FRONTEND: &str = "udp";
const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];
/// How long a counter may take to show what already happened, on a busy machine.
const WAIT: Duration = Duration::from_secs(10);

/// `protocol = "udp"` plus `settings`, then `tables` (sub-tables such as `[frontends.health]`).
fn udp_settings(settings: &str, tables: &str) -> String {
    format!("protocol = \"udp\"\ndistribution = \"Default\"\n{settings}\n{tables}")
}

/// `name{frontend="udp", backend}` for each of `backends`, absent series as 0.
fn per_backend(proxy: &Proxy, name: &str, backends: &[&str]) -> Vec<f64> {
    let m = proxy.metrics();
    backends
        .iter()
        .map(|b| {
            m.get(name, &[("frontend", FRONTEND), ("backend", b)])
                .unwrap_or(0.0)
        })
        .collect()
}

fn frontend_metric(proxy: &Proxy, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut all = vec![("frontend", FRONTEND)];
    all.extend_from_slice(labels);
    proxy.metric(name, &all).unwrap_or(0.0)
}

/// Waits until `name{frontend, labels}` equals `want`.
fn wait_frontend_metric(proxy: &Proxy, name: &str, labels: &[(&str, &str)], want: f64) {
    let mut all = vec![("frontend", FRONTEND)];
    all.extend_from_slice(labels);
    proxy.wait_metric(name, &all, WAIT, |v| v == want);
}

/// Waits until `name{frontend, backend}` equals `want`.
fn wait_backend_metric(proxy: &Proxy, name: &str, backend: &str, want: f64) {
    proxy.wait_metric(
        name,
        &[("frontend", FRONTEND), ("backend", backend)],
        WAIT,
        |v| v == want,
    );
}

// ---------------------------------------------------------------------------
// 100k datagrams.

const CLIENTS: usize = 50;
/// 50 × 2,000 = 100,000 datagrams.
const PER_CLIENT: usize = 2_000;
/// Client source IPs the 50 ports are spread over (127.0.0.2 ..= 127.0.0.11).
const CLIENT_IPS: usize = 10;
const LOAD: EchoLoad = EchoLoad {
    per_client: PER_CLIENT,
    // 50 × 4 = 200 in flight at most: the rate is bounded by the round trip,
    // and 200 small datagrams fit the default socket buffers on every hop.
    window: 4,
    payload: 64,
    stall: ANSWER_WAIT,
    limit: Duration::from_secs(120),
};

#[test]
fn a_hundred_thousand_datagrams_from_fifty_ports_all_come_back_each_flow_on_its_backend() {
    echo_load_through_the_balancer("", LOAD);
}

/// The unbatched path (one `recvfrom`/`sendto` per datagram), on 10k datagrams.
#[test]
fn with_udp_batch_1_ten_thousand_datagrams_all_come_back_each_flow_on_its_backend() {
    let load = EchoLoad {
        per_client: 200,
        ..LOAD
    };
    echo_load_through_the_balancer("udp_batch = 1", load);
}

/// What one backend should have seen: flows, datagrams and bytes.
#[derive(Clone, Copy, Debug, Default)]
struct Share {
    flows: f64,
    datagrams: f64,
    bytes: f64,
}

/// `load` from [`CLIENTS`] ports through a UDP frontend with `settings` to
/// three in-process udp-echo backends: none lost, each flow on lb-core's
/// backend for it, and the balancer's counts equal the clients' and the
/// backends' own.
fn echo_load_through_the_balancer(settings: &str, load: EchoLoad) {
    let (echo, tables) = in_process_echo_backends();
    let proxy = Proxy::run(&frontend_config(
        2,
        FRONTEND,
        &udp_settings(settings, NO_PROBES),
        &tables,
    ));
    let frontend = proxy.frontend(FRONTEND);
    let clients: Vec<UdpClient> = (0..CLIENTS)
        .map(|i| UdpClient::connect(client_ip(i, CLIENT_IPS), frontend))
        .collect();
    let model = RoutingModel::new(&NODES, DistributionMode::FiveTuple);
    let routed: Vec<&str> = clients
        .iter()
        .map(|c| model.backend(c.local, frontend).expect("a backend"))
        .collect();

    let started = Instant::now();
    let tallies = run_echo_load(clients, load);
    let took = started.elapsed();
    let total = (CLIENTS * load.per_client) as f64;
    eprintln!(
        "{total} datagrams echoed through lb-proxy ({settings:?}) in {took:?} ({:.0} round trips/s)",
        total / took.as_secs_f64()
    );

    assert_none_lost(&tallies, load.per_client);
    let want = shares(&tallies, &routed);
    eprintln!("what each backend should see, by lb-core's table: {want:?}");
    for (backend, share) in &want {
        assert_backend_saw(&proxy, &echo, backend, *share);
    }
    assert_eq!(
        frontend_metric(&proxy, "lb_frontend_received_datagrams_total", &[]),
        total
    );
    for nothing_else in [
        "lb_udp_flows_moved_total",
        "lb_udp_flows_ended_total",
        "lb_udp_dropped_datagrams_total",
    ] {
        assert_eq!(
            frontend_metric(&proxy, nothing_else, &[]),
            0.0,
            "{nothing_else}"
        );
    }
}

/// The three udp-echo backends in this process (their own counts are
/// readable), and their `[[frontends.backends]]` tables.
fn in_process_echo_backends() -> (InProcess, Vec<String>) {
    let specs: Vec<ServerSpec> = NODES
        .iter()
        .map(|n| format!("udp-echo:{n}=127.0.0.1:0").parse().expect("spec"))
        .collect();
    let echo = InProcess::start(&specs).expect("start the udp-echo backends");
    let tables = NODES
        .iter()
        .map(|n| backend_toml(n, echo.addr(n).expect("bound")))
        .collect();
    (echo, tables)
}

/// Every client got every echo back, intact.
fn assert_none_lost(tallies: &[ClientTally], per_client: usize) {
    for t in tallies {
        assert!(t.errors.is_empty(), "client {:?}: {:?}", t.local, t.errors);
        assert_eq!(t.echoed, per_client as u64, "client {:?}", t.local);
    }
}

/// Each backend's share, from the clients' own counts and each client's
/// backend (`routed[i]` for `tallies[i]`).
fn shares<'a>(tallies: &[ClientTally], routed: &[&'a str]) -> BTreeMap<&'a str, Share> {
    let mut want: BTreeMap<&str, Share> = NODES.iter().map(|n| (*n, Share::default())).collect();
    for (t, backend) in tallies.iter().zip(routed) {
        let w = want.get_mut(backend).expect("a node");
        w.flows += 1.0;
        w.datagrams += t.sent as f64;
        w.bytes += t.bytes_sent as f64;
    }
    want
}

/// The balancer's counts for `backend` (to it, and back from it: an echo)
/// and the backend's own equal `want`.
fn assert_backend_saw(proxy: &Proxy, echo: &InProcess, backend: &str, want: Share) {
    for (metric, value) in [
        ("lb_backend_sent_datagrams_total", want.datagrams),
        ("lb_backend_received_datagrams_total", want.datagrams),
        ("lb_backend_sent_bytes_total", want.bytes),
        ("lb_backend_received_bytes_total", want.bytes),
        // One flow per client port, created once: none moved or restarted.
        ("lb_backend_udp_flows_total", want.flows),
        ("lb_backend_active_udp_flows", want.flows),
    ] {
        wait_backend_metric(proxy, metric, backend, value);
    }
    let counts = echo.counts(backend).expect("counts");
    assert_eq!(
        counts.datagrams.load(Ordering::Relaxed) as f64,
        want.datagrams,
        "datagrams {backend} itself received"
    );
    assert_eq!(
        counts.bytes.load(Ordering::Relaxed) as f64,
        want.bytes,
        "bytes {backend} itself received"
    );
}

// ---------------------------------------------------------------------------
// Idle expiry and the flow cap.

/// The JSON flow log's file name, in the proxy's directory.
const FLOW_LOG: &str = "flows.jsonl";

/// The first record of the proxy's JSON flow log, once a whole line is there.
fn flow_log_record(proxy: &Proxy) -> serde_json::Value {
    let path = proxy.dir().join(FLOW_LOG);
    let line = wait_until("a line in the flow log", WAIT, || {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        text.split_once('\n').map(|(first, _)| first.to_owned())
    });
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("flow log line {line:?}: {e}"))
}

#[test]
fn an_idle_flow_expires_and_its_next_datagram_is_a_new_flow() {
    const IDLE: Duration = Duration::from_secs(1);
    let backend = Backend::udp_echo("node-1");
    let settings = udp_settings(
        &format!("idle_timeout = \"{}ms\"", IDLE.as_millis()),
        NO_PROBES,
    );
    let config = frontend_config(2, FRONTEND, &settings, &[backend.toml()]);
    let proxy = Proxy::run_with_flags(&config, |dir| {
        let log = dir.join(FLOW_LOG).display().to_string();
        ["--flow-log", &log, "--flow-log-format", "json"]
            .map(str::to_owned)
            .to_vec()
    });
    let client = UdpClient::connect(Ipv4Addr::new(127, 0, 0, 2), proxy.frontend(FRONTEND));

    let sent = Instant::now();
    assert_eq!(client.echo(b"first"), b"first");
    wait_backend_metric(&proxy, "lb_backend_udp_flows_total", "node-1", 1.0);
    wait_backend_metric(&proxy, "lb_backend_active_udp_flows", "node-1", 1.0);
    assert_eq!(
        frontend_metric(&proxy, "lb_udp_flows_ended_total", &[("reason", "expired")]),
        0.0
    );

    proxy.wait_metric(
        "lb_udp_flows_ended_total",
        &[("frontend", FRONTEND), ("reason", "expired")],
        IDLE + WAIT,
        |v| v == 1.0,
    );
    let expired_after = sent.elapsed();
    eprintln!("the flow expired {expired_after:?} after its datagram (idle_timeout {IDLE:?})");
    assert!(
        expired_after >= IDLE,
        "expired after {expired_after:?}, before the {IDLE:?} idle timeout"
    );
    wait_backend_metric(&proxy, "lb_backend_active_udp_flows", "node-1", 0.0);
    let record = flow_log_record(&proxy);
    assert_eq!(record["proto"], "udp", "{record}");
    assert_eq!(record["outcome"], "expired", "{record}");
    assert_eq!(record["client"], client.local.to_string(), "{record}");
    assert_eq!(record["via"], "node-1", "{record}");
    assert_eq!(record["bytes_to_backend"], 5, "{record}");
    assert_eq!(record["bytes_from_backend"], 5, "{record}");

    // The same client 5-tuple again: a new flow.
    assert_eq!(client.echo(b"second"), b"second");
    wait_backend_metric(&proxy, "lb_backend_udp_flows_total", "node-1", 2.0);
    wait_backend_metric(&proxy, "lb_backend_active_udp_flows", "node-1", 1.0);
    assert_eq!(
        frontend_metric(&proxy, "lb_udp_flows_ended_total", &[]),
        1.0
    );
}

#[test]
fn a_new_flow_at_the_cap_evicts_the_flow_idle_the_longest() {
    let backend = Backend::udp_echo("node-1");
    // One worker, so the whole cap is one table.
    let settings = udp_settings("max_flows = 2", NO_PROBES);
    let proxy = Proxy::run(&frontend_config(1, FRONTEND, &settings, &[backend.toml()]));
    let frontend = proxy.frontend(FRONTEND);
    let [a, b, c] =
        [2, 3, 4].map(|last| UdpClient::connect(Ipv4Addr::new(127, 0, 0, last), frontend));

    // Each step: one echo from `client`, then the flows created and evicted so far.
    let mut datagrams = 0.0;
    let mut step = |client: &UdpClient, flows: f64, evicted: f64| {
        assert_eq!(client.echo(b"ping"), b"ping", "from {}", client.local);
        datagrams += 1.0;
        // Counted once this datagram is, so the flow counts below are settled.
        wait_backend_metric(
            &proxy,
            "lb_backend_sent_datagrams_total",
            "node-1",
            datagrams,
        );
        wait_backend_metric(&proxy, "lb_backend_udp_flows_total", "node-1", flows);
        wait_frontend_metric(
            &proxy,
            "lb_udp_flows_ended_total",
            &[("reason", "evicted")],
            evicted,
        );
        wait_backend_metric(
            &proxy,
            "lb_backend_active_udp_flows",
            "node-1",
            flows.min(2.0),
        );
    };
    step(&a, 1.0, 0.0);
    step(&b, 2.0, 0.0);
    // c is a third flow: a, idle the longest, is evicted.
    step(&c, 3.0, 1.0);
    // a's next datagram is a new flow, which evicts b (now idle the longest)...
    step(&a, 4.0, 2.0);
    // ...not c, whose flow is still there.
    step(&c, 4.0, 2.0);
    assert_eq!(
        frontend_metric(&proxy, "lb_udp_flows_ended_total", &[]),
        2.0
    );
}

// ---------------------------------------------------------------------------
// Health.

const PROBE_INTERVAL: Duration = Duration::from_millis(200);

/// TCP probes on each backend's port (udp-echo's health listener), quick.
fn probed_settings() -> String {
    udp_settings(
        "",
        &format!(
            "[frontends.health]\nkind = \"tcp\"\ninterval = \"{}ms\"\ntimeout = \"200ms\"\nrise = 2\nfall = 2",
            PROBE_INTERVAL.as_millis()
        ),
    )
}

fn wait_down(proxy: &Proxy, backend: &str) {
    wait_backend_metric(proxy, "lb_backend_up", backend, 0.0);
}

#[test]
fn a_backend_going_down_moves_its_flows_and_all_down_ends_them() {
    let mut backends = NODES.map(Backend::udp_echo);
    let tables: Vec<String> = backends.iter().map(Backend::toml).collect();
    let proxy = Proxy::run(&frontend_config(2, FRONTEND, &probed_settings(), &tables));
    let frontend = proxy.frontend(FRONTEND);
    for n in NODES {
        wait_backend_metric(&proxy, "lb_backend_up", n, 1.0);
    }

    // Two flows on node-2 (the one to fail), two elsewhere, chosen with lb-core's table.
    let model = RoutingModel::new(&NODES, DistributionMode::FiveTuple);
    let ip = Ipv4Addr::new(127, 0, 0, 2);
    let on = |want: bool| move |b: Option<&str>| (b == Some("node-2")) == want;
    let clients: Vec<UdpClient> = [true, true, false, false]
        .into_iter()
        .map(|victim| {
            UdpClient::from_socket(bind_routed(&model, ip, frontend, 200, on(victim)), frontend)
        })
        .collect();
    for c in &clients {
        assert_eq!(c.echo(b"before"), b"before");
    }
    let flows_before = per_backend(&proxy, "lb_backend_udp_flows_total", &NODES);
    assert_eq!(flows_before.iter().sum::<f64>(), 4.0, "{flows_before:?}");
    assert_eq!(flows_before[1], 2.0, "node-2's flows: {flows_before:?}");

    backends[1].kill();
    wait_down(&proxy, "node-2");
    node_2_s_flows_moved(&proxy, &model, &clients);

    backends[0].kill();
    backends[2].kill();
    wait_down(&proxy, "node-1");
    wait_down(&proxy, "node-3");
    all_flows_ended_and_new_datagrams_dropped(&proxy, &clients);
}

/// With node-2 down, each of node-2's clients' next datagram reaches its
/// key's backend in a table without node-2 (its next choice), the other
/// clients' stay where they were (the new table may give a few of their keys
/// elsewhere, but a flow on a healthy backend stays), node-2's two flows
/// counted as moved, none ended.
fn node_2_s_flows_moved(proxy: &Proxy, model: &RoutingModel, clients: &[UdpClient]) {
    let without =
        RoutingModel::with_health(&NODES, DistributionMode::FiveTuple, &[true, false, true]);
    let mut want_sent = per_backend(proxy, "lb_backend_sent_datagrams_total", &NODES);
    for c in clients {
        let answer = c.echo(b"after");
        assert_eq!(answer, b"after", "{} after node-2 went down", c.local);
        let to = match model.backend(c.local, c.peer) {
            Some("node-2") => without.backend(c.local, c.peer).expect("a backend"),
            was => was.expect("a backend"),
        };
        want_sent[NODES.iter().position(|n| *n == to).expect("node")] += 1.0;
    }
    wait_frontend_metric(proxy, "lb_udp_flows_moved_total", &[], 2.0);
    for (i, n) in NODES.iter().enumerate() {
        wait_backend_metric(proxy, "lb_backend_sent_datagrams_total", n, want_sent[i]);
    }
    wait_backend_metric(proxy, "lb_backend_active_udp_flows", "node-2", 0.0);
    let active = per_backend(proxy, "lb_backend_active_udp_flows", &NODES);
    let total: f64 = active.iter().sum();
    assert_eq!(total, 4.0, "moved, not ended: {active:?}");
    assert_eq!(frontend_metric(proxy, "lb_udp_flows_ended_total", &[]), 0.0);
}

/// With every backend down, every flow has ended (`no_healthy_backend`) and
/// the clients' next datagrams are dropped and counted, forwarded nowhere.
fn all_flows_ended_and_new_datagrams_dropped(proxy: &Proxy, clients: &[UdpClient]) {
    let ended = [("reason", "no_healthy_backend")];
    wait_frontend_metric(proxy, "lb_udp_flows_ended_total", &ended, 4.0);
    let active = per_backend(proxy, "lb_backend_active_udp_flows", &NODES);
    assert_eq!(active.iter().sum::<f64>(), 0.0, "{active:?}");
    let sent_before = per_backend(proxy, "lb_backend_sent_datagrams_total", &NODES);
    for c in clients {
        c.send(b"nobody home");
    }
    let dropped = clients.len() as f64;
    wait_frontend_metric(
        proxy,
        "lb_udp_dropped_datagrams_total",
        &[("reason", "no_backend")],
        dropped,
    );
    assert_eq!(
        per_backend(proxy, "lb_backend_sent_datagrams_total", &NODES),
        sent_before,
        "nothing is forwarded when every backend is down"
    );
    for c in clients {
        let answer = c.try_recv();
        assert_eq!(
            answer, None,
            "an answer reached {} with every backend down",
            c.local
        );
    }
}

// ---------------------------------------------------------------------------
// The largest datagram.

#[test]
fn a_65507_byte_datagram_passes_intact_both_ways() {
    let backend = Backend::udp_echo("node-1");
    let proxy = Proxy::run(&frontend_config(
        2,
        FRONTEND,
        &udp_settings("", NO_PROBES),
        &[backend.toml()],
    ));
    let client = UdpClient::connect(Ipv4Addr::new(127, 0, 0, 2), proxy.frontend(FRONTEND));
    let mut big = vec![0u8; MAX_IPV4_UDP_PAYLOAD];
    SeededStream::new(65_507).fill(&mut big);
    let back = client.echo(&big);
    assert_eq!(back.len(), big.len(), "the echo's length");
    assert!(back == big, "the echo differs from the datagram sent");
    let size = MAX_IPV4_UDP_PAYLOAD as f64;
    wait_backend_metric(&proxy, "lb_backend_sent_bytes_total", "node-1", size);
    wait_backend_metric(&proxy, "lb_backend_received_bytes_total", "node-1", size);
    wait_backend_metric(&proxy, "lb_backend_sent_datagrams_total", "node-1", 1.0);
    wait_backend_metric(&proxy, "lb_backend_received_datagrams_total", "node-1", 1.0);
}

// ---------------------------------------------------------------------------
// Who the backend sees.

/// The source a backend (a [`UdpPod`]) sees for datagrams from five client
/// IPs through a UDP frontend with `client_address`.
fn sources_seen(client_address: &str) -> Vec<(SocketAddr, SocketAddr)> {
    let pod = UdpPod::start("127.0.0.1:0".parse().expect("addr"));
    let settings = udp_settings(&format!("client_address = \"{client_address}\""), NO_PROBES);
    let proxy = Proxy::run(&frontend_config(
        2,
        FRONTEND,
        &settings,
        &[backend_toml("node-1", pod.addr)],
    ));
    (0..5)
        .map(|i| {
            let client = UdpClient::connect(client_ip(i, 5), proxy.frontend(FRONTEND));
            (client.local, pod_answer(&client.echo(b"who do you see?")))
        })
        .collect()
}

#[test]
fn under_preserve_the_backend_sees_the_client_ip_and_under_snat_the_balancer() {
    for (client, seen) in sources_seen("preserve") {
        assert_eq!(
            seen.ip(),
            client.ip(),
            "preserve: {client} was seen as {seen}"
        );
    }
    for (client, seen) in sources_seen("snat") {
        assert_ne!(seen.ip(), client.ip(), "snat: {client} was seen as itself");
    }
}

// ---------------------------------------------------------------------------
// The node hop.

const NODE_IPS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(127, 0, 1, 1),
    Ipv4Addr::new(127, 0, 1, 2),
    Ipv4Addr::new(127, 0, 1, 3),
];
/// The only pod, on node-2 (`127.0.2.2`, port chosen by the kernel).
const POD_LISTEN: &str = "127.0.2.2:0";

/// The aks-lab layout for UDP: three nodes, the pod on node-2, no probes.
fn hop_config(pod: SocketAddr, service: &str) -> String {
    let nodes: Vec<String> = NODES
        .iter()
        .zip(NODE_IPS)
        .enumerate()
        .map(|(i, (name, ip))| {
            let endpoints = if i == 1 {
                format!("[{{ address = \"{pod}\" }}]")
            } else {
                "[]".to_owned()
            };
            format!("[[frontends.nodes]]\nname = \"{name}\"\naddress = \"{ip}\"\nendpoints = {endpoints}\n")
        })
        .collect();
    let settings = udp_settings(
        "client_address = \"snat\"",
        &format!("[frontends.service]\n{service}\n\n{NO_PROBES}"),
    );
    frontend_config(2, FRONTEND, &settings, &nodes)
}

/// Sends one datagram from each of `n` new client ports (over a few
/// source IPs) and returns (client, source the pod saw) for each. Every
/// client socket stays open until all have sent, so no two share a port:
/// a port freed and handed out again would be the same 5-tuple, one flow
/// to the balancer and two to the pod's count.
fn hop_flows(proxy: &Proxy, n: usize) -> Vec<(SocketAddr, SocketAddr)> {
    let frontend = proxy.frontend(FRONTEND);
    let clients: Vec<UdpClient> = (0..n)
        .map(|i| UdpClient::connect(client_ip(i, 5), frontend))
        .collect();
    clients
        .iter()
        .map(|client| (client.local, pod_answer(&client.echo(b"who do you see?"))))
        .collect()
}

#[test]
fn through_the_node_hop_the_pod_sees_the_node_on_a_cross_node_hop() {
    const FLOWS: usize = 30;
    let pod = UdpPod::start(POD_LISTEN.parse().expect("addr"));
    let proxy = Proxy::run(&hop_config(
        pod.addr,
        "external_traffic_policy = \"Cluster\"\nsession_affinity = \"None\"",
    ));
    let flows = hop_flows(&proxy, FLOWS);

    // Through node-2 the pod is local and sees the client; through node-1 or
    // node-3 the flow crosses to node-2, SNATed to the forwarding node's IP.
    let mut via = [0.0; 3];
    for (client, seen) in &flows {
        let node = if seen.ip() == client.ip() {
            1
        } else {
            NODE_IPS
                .iter()
                .position(|ip| IpAddr::V4(*ip) == seen.ip())
                .filter(|&i| i != 1)
                .unwrap_or_else(|| panic!("the pod saw {seen} for client {client}: neither the client nor node-1/node-3"))
        };
        via[node] += 1.0;
    }
    eprintln!("flows via node-1, node-2, node-3 (from what the pod saw): {via:?}");
    assert!(via[1] > 0.0, "no flow went through node-2 (local): {via:?}");
    assert!(via[0] + via[2] > 0.0, "no flow crossed nodes: {via:?}");
    // The balancer's per-node flow counts agree with what the pod saw.
    for (i, n) in NODES.iter().enumerate() {
        wait_backend_metric(&proxy, "lb_backend_udp_flows_total", n, via[i]);
    }
    assert_eq!(
        pod.seen().len(),
        FLOWS,
        "one datagram per flow reached the pod"
    );
}

#[test]
fn through_the_node_hop_under_local_the_pod_sees_the_client() {
    const FLOWS: usize = 10;
    let pod = UdpPod::start(POD_LISTEN.parse().expect("addr"));
    let proxy = Proxy::run(&hop_config(
        pod.addr,
        "external_traffic_policy = \"Local\"\nsession_affinity = \"None\"",
    ));
    for (client, seen) in hop_flows(&proxy, FLOWS) {
        assert_eq!(
            seen.ip(),
            client.ip(),
            "under Local the pod sees the client {client}, saw {seen}"
        );
    }
    // Only node-2 has the pod, so only node-2 takes flows.
    let flows = per_backend(&proxy, "lb_backend_udp_flows_total", &NODES);
    assert_eq!(flows, vec![0.0, FLOWS as f64, 0.0], "flows per node");
}
