//! `lb-proxy run --service FILE --cluster FILE` end to end: the user's own
//! Service manifest in, the frontends AKS would configure out, on real sockets.
//!
//! - Lab mode (`tests/fixtures/k8s/cluster/lab.toml`, the seed article's three
//!   nodes and one pod; the article's manifests as k8s-translate keeps them in
//!   `tests/fixtures/k8s/`): without affinity a client's flows spread over the
//!   nodes (`loadDistribution: Default`); with `sessionAffinity: ClientIP` they
//!   all go through one node (`SourceIP`); a reload switches between the two,
//!   and a malformed manifest on reload keeps the old config.
//! - Real-cluster mode (`nodes-endpointslices.json`, in the shape `kubectl get
//!   nodes,endpointslices -o json` prints): lb-proxy forwards to each node's
//!   `InternalIP:nodePort`, here in-test servers on 127.0.1.1 .. .3 that record
//!   every request's path and time, so the probes are measured from the
//!   backend's side. Cluster: every node. Local: every node is in the pool
//!   and probed with HTTP `/healthz` on healthCheckNodePort, where a fake
//!   kube-proxy answers as the real one does (200 with a ready local endpoint,
//!   503 without), so only nodes with a ready endpoint take traffic.
//! - `loadBalancerSourceRanges`: clients from an allowed 127.x prefix get
//!   through; the others are reset, counted, and reach no backend.
//! - A malformed cluster file: exit 1 with the file and field path.

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lb_tests::{proxy_bin, wait_until, BoundClient, Proxy, TempDir};

const WAIT: Duration = Duration::from_secs(10);
/// Flows per behaviour check: enough that three nodes all show up under
/// Default (a miss has odds 3 × (2/3)^30 < 1e-4), few enough to take no time.
const FLOWS: usize = 30;
const NODE_IPS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(127, 0, 1, 1),
    Ipv4Addr::new(127, 0, 1, 2),
    Ipv4Addr::new(127, 0, 1, 3),
];
/// The kubectl fixture's node names, in address order.
const AKS_NODES: [&str; 3] = [
    "aks-nodepool1-12345678-vmss000000",
    "aks-nodepool1-12345678-vmss000001",
    "aks-nodepool1-12345678-vmss000002",
];
/// The path traffic asks for; probes ask for theirs (or send nothing: TCP).
const APP_PATH: &str = "/app";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/k8s/cluster")
        .join(name)
}

// ---------------------------------------------------------------------------
// An HTTP server standing in for a node's nodePort (or a pod): it answers
// every request with its name (or, as a pod, with the source it saw) and
// records what it was asked and when.

#[derive(Clone, Debug)]
struct Hit {
    /// The request path; `None` for a connection that sent nothing (a TCP probe).
    path: Option<String>,
    at: Instant,
}

struct Server {
    addr: SocketAddr,
    hits: Arc<Mutex<Vec<Hit>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// What a server answers with.
#[derive(Clone, Copy)]
enum Answer {
    /// Its own name (a node's nodePort: which node served).
    Name(&'static str),
    /// The source address it saw (a pod behind the hop: which node SNATed).
    Peer,
    /// kube-proxy's healthCheckNodePort: 200 when the node has a ready
    /// endpoint of the Service, 503 when it has none.
    Healthz { ready: bool },
}

impl Server {
    fn start(listener: TcpListener, answer: Answer) -> Server {
        let addr = listener.local_addr().expect("local addr");
        let hits = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (hits, stop) = (Arc::clone(&hits), Arc::clone(&stop));
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    if let Ok(conn) = conn {
                        let hits = Arc::clone(&hits);
                        std::thread::spawn(move || serve_one(conn, answer, &hits));
                    }
                }
            })
        };
        Server {
            addr,
            hits,
            stop,
            thread: Some(thread),
        }
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().expect("hits").clone()
    }

    /// When each request for `path` came (`None`: bare TCP connects).
    fn times(&self, path: Option<&str>) -> Vec<Instant> {
        self.hits()
            .into_iter()
            .filter(|h| h.path.as_deref() == path)
            .map(|h| h.at)
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads one request head (or nothing, from a TCP probe), records it, answers.
fn serve_one(mut conn: TcpStream, answer: Answer, hits: &Mutex<Vec<Hit>>) {
    let at = Instant::now();
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&head);
    let path = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .map(str::to_owned);
    let has_request = path.is_some();
    hits.lock().expect("hits").push(Hit { path, at });
    if has_request {
        let (status, body) = match answer {
            Answer::Name(name) => ("200 OK", format!("{name}\n")),
            Answer::Peer => (
                "200 OK",
                format!(
                    "{}\n",
                    conn.peer_addr()
                        .map(|a| a.ip().to_string())
                        .unwrap_or_default()
                ),
            ),
            Answer::Healthz { ready } => {
                let local = u32::from(ready);
                let status = if ready {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                };
                (status, format!("{{\"localEndpoints\": {local}}}\n"))
            }
        };
        let _ = write!(
            conn,
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
}

/// One listener per IP, all on the same port (a nodePort is the same on every
/// node): the first IP's port is the kernel's pick; retried if another IP has it.
fn same_port_on(ips: &[Ipv4Addr]) -> (u16, Vec<TcpListener>) {
    for _ in 0..20 {
        let first = TcpListener::bind((ips[0], 0)).expect("bind");
        let port = first.local_addr().expect("addr").port();
        let rest: Result<Vec<_>, _> = ips[1..]
            .iter()
            .map(|ip| TcpListener::bind((*ip, port)))
            .collect();
        if let Ok(mut rest) = rest {
            rest.insert(0, first);
            return (port, rest);
        }
    }
    panic!("no port free on all of {ips:?}");
}

/// A server per node on a shared port: `(port, servers by node)`.
fn node_servers() -> (u16, Vec<Server>) {
    let (port, listeners) = same_port_on(&NODE_IPS);
    let servers = listeners
        .into_iter()
        .zip(AKS_NODES)
        .map(|(l, name)| Server::start(l, Answer::Name(name)))
        .collect();
    (port, servers)
}

/// One HTTP GET over a new connection from `client` (the kernel's choice of
/// source when `None`); the body, or `None` when the connection was refused or reset.
fn get_from(client: Option<Ipv4Addr>, to: SocketAddr) -> Option<String> {
    let mut s = match client {
        Some(ip) => BoundClient::new(ip).ok()?.connect(to).ok()?,
        None => TcpStream::connect_timeout(&to, Duration::from_secs(5)).ok()?,
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {APP_PATH} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let text = String::from_utf8_lossy(&out);
    let (_, body) = text.split_once("\r\n\r\n")?;
    Some(body.trim().to_owned())
}

fn get(to: SocketAddr) -> String {
    get_from(None, to).unwrap_or_else(|| panic!("a GET through {to} failed"))
}

/// Who answered each of [`FLOWS`] new flows.
fn answers(to: SocketAddr) -> BTreeSet<String> {
    (0..FLOWS).map(|_| get(to)).collect()
}

// ---------------------------------------------------------------------------
// Manifests and the balancer.

/// A manifest of k8s-translate's fixtures: the seed article's Service
/// (`testapp.yaml`, with its Deployment) or it after `kubectl edit` to
/// `sessionAffinity: ClientIP` (`testapp-clientip.yaml`), exactly as applied.
fn seed_service(affinity: bool) -> String {
    let name = if affinity {
        "testapp-clientip.yaml"
    } else {
        "testapp.yaml"
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/k8s")
        .join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `web` Service of the kubectl fixture, with `annotations` (YAML lines,
/// indented 4) and `extra` spec lines (indented 2).
fn web_service(node_port: u16, policy: &str, annotations: &str, extra: &str) -> String {
    let annotations = if annotations.is_empty() {
        String::new()
    } else {
        format!("  annotations:\n{annotations}")
    };
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
  uid: 3f9a1c2e-7b4d-4e8f-a1b2-c3d4e5f60718
{annotations}spec:
  type: LoadBalancer
  externalTrafficPolicy: {policy}
{extra}  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: 8080
    nodePort: {node_port}
"
    )
}

const FRONTEND: &str = "-tcp-80";

/// `lb-proxy run --service svc.yaml --cluster CLUSTER --port 80=0` on any free port.
fn run_service(service: &str, cluster: &Path) -> Proxy {
    let dir = TempDir::new().expect("tempdir");
    let svc = dir.path().join("svc.yaml");
    fs::write(&svc, service).expect("write the manifest");
    Proxy::run_service(dir, &svc, cluster, &["80=0"])
}

fn rewrite_service(proxy: &Proxy, service: &str) {
    fs::write(proxy.dir().join("svc.yaml"), service).expect("rewrite the manifest");
}

/// `/backends`' entry for the frontend of Service `name`.
fn frontend_json(proxy: &Proxy, name: &str) -> serde_json::Value {
    let (code, body) = proxy.admin_get("/backends");
    assert_eq!(code, 200, "{body}");
    let all: serde_json::Value = serde_json::from_str(&body).expect("/backends JSON");
    all["frontends"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["name"] == format!("{name}{FRONTEND}")))
        .cloned()
        .unwrap_or_else(|| panic!("no frontend for {name} in {body}"))
}

// ---------------------------------------------------------------------------
// Lab mode: the seed article's Service.

/// The pod on node 2, answering with the node IP its flows came from.
fn start_pod() -> Server {
    let listener = TcpListener::bind((Ipv4Addr::new(127, 0, 2, 2), 0)).expect("bind the pod");
    Server::start(listener, Answer::Peer)
}

fn node_ips(answers: &BTreeSet<String>) -> BTreeSet<String> {
    for a in answers {
        assert!(
            NODE_IPS.iter().any(|ip| ip.to_string() == *a),
            "the pod saw {a}, not a node IP (snat = \"always\")"
        );
    }
    answers.clone()
}

/// The lab fixture with the pod's stand-in port (8000 there) moved to `port`.
fn lab_with_pod_port(dir: &TempDir, port: u16) -> PathBuf {
    let lab = fs::read_to_string(fixture("lab.toml")).expect("the lab fixture");
    assert!(
        lab.contains("port = 8000"),
        "the lab fixture gives its pod a port"
    );
    let path = dir.path().join("lab.toml");
    fs::write(&path, lab.replace("port = 8000", &format!("port = {port}"))).expect("write");
    path
}

#[test]
fn the_seed_articles_service_spreads_without_affinity_and_sticks_with_client_ip_then_reloads() {
    let pod = start_pod();
    let lab_dir = TempDir::new().expect("tempdir");
    let lab = lab_with_pod_port(&lab_dir, pod.addr.port());
    let proxy = run_service(&seed_service(false), &lab);
    let fe = proxy.frontend(&format!("testapp{FRONTEND}"));

    let json = frontend_json(&proxy, "testapp");
    assert_eq!(json["service"], "default/testapp");
    assert_eq!(json["port"], 80);
    assert_eq!(
        json["port_name"],
        serde_json::Value::Null,
        "the article's port has no name"
    );
    assert_eq!(json["distribution"], "Default");
    let zones: Vec<_> = json["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| (b["name"].clone(), b["zone"].clone()))
        .collect();
    assert_eq!(zones[1], ("node-2".into(), "eastus-2".into()), "{json}");

    let spread = node_ips(&answers(fe));
    assert!(
        spread.len() >= 2,
        "Default spreads one client's flows: {spread:?}"
    );

    // sessionAffinity: ClientIP → SourceIP: the same client, one node.
    rewrite_service(&proxy, &seed_service(true));
    proxy.sighup_until("success", 1.0, WAIT);
    assert_eq!(frontend_json(&proxy, "testapp")["distribution"], "SourceIP");
    let stuck = node_ips(&answers(fe));
    assert_eq!(
        stuck.len(),
        1,
        "SourceIP keeps one client on one node: {stuck:?}"
    );

    // A malformed manifest is refused and the running config kept.
    rewrite_service(
        &proxy,
        "apiVersion: v1\nkind: Service\nmetadata: [not, a, map]\n",
    );
    proxy.sighup_until("failure", 1.0, WAIT);
    wait_until("the reload error naming the manifest", WAIT, || {
        proxy.stderr().contains("svc.yaml").then_some(())
    });
    assert_eq!(frontend_json(&proxy, "testapp")["distribution"], "SourceIP");
    assert_eq!(
        node_ips(&answers(fe)),
        stuck,
        "still SourceIP after the refused reload"
    );
}

/// One datagram to `to` and its echo, or `None` when none came back in time.
fn udp_round_trip(to: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
    let client = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).ok()?;
    client.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    client.send_to(payload, to).ok()?;
    let mut buf = [0u8; 512];
    let (n, _) = client.recv_from(&mut buf).ok()?;
    Some(buf[..n].to_vec())
}

/// `tests/fixtures/k8s/local.yaml` (TCP 80 and UDP 53 under Local, one shared
/// probe) in lab mode: the UDP port carries datagrams, also after enough
/// probe intervals that a TCP probe of the UDP pod would have taken it out.
#[test]
fn lab_mode_local_service_with_a_udp_port_carries_datagrams_past_the_probes() {
    let tcp_pod = start_pod();
    let udp_pod = UdpSocket::bind((Ipv4Addr::new(127, 0, 2, 2), 0)).expect("bind the UDP pod");
    udp_pod
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let udp_port = udp_pod.local_addr().expect("addr").port();
    let stop = Arc::new(AtomicBool::new(false));
    let echo = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = udp_pod.recv_from(&mut buf) {
                    let _ = udp_pod.send_to(&buf[..n], from);
                }
            }
        })
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/k8s/local.yaml");
    let manifest = fs::read_to_string(&path).expect("local.yaml");
    let manifest = manifest
        .replace(
            "targetPort: 8080",
            &format!("targetPort: {}", tcp_pod.addr.port()),
        )
        .replace("targetPort: 53", &format!("targetPort: {udp_port}"));
    let dir = TempDir::new().expect("tempdir");
    let lab = dir.path().join("lab.toml");
    let lab_text = fs::read_to_string(fixture("lab.toml"))
        .expect("the lab fixture")
        .replace("service = \"testapp\"", "service = \"edge\"")
        .replace(", port = 8000", "");
    fs::write(&lab, lab_text).expect("write the lab");
    let svc = dir.path().join("svc.yaml");
    fs::write(&svc, manifest).expect("write the manifest");
    let proxy = Proxy::run_service(dir, &svc, &lab, &["80=0", "53=0"]);
    let udp = proxy.frontend("edge-udp-53");
    assert_eq!(
        udp_round_trip(udp, b"first").as_deref(),
        Some(&b"first"[..])
    );
    // The TCP rule's pod is probed over TCP (bare connects) every 6 s with a
    // count of 2: three of them is past the point where a UDP pod probed the
    // same way would have been failed twice.
    wait_until("three TCP probes of the TCP rule's pod", WAIT * 3, || {
        (tcp_pod.times(None).len() >= 3).then_some(())
    });
    for i in 0..5u8 {
        let payload = [b'd', i];
        assert_eq!(
            udp_round_trip(udp, &payload).as_deref(),
            Some(&payload[..]),
            "datagram #{i} after the probes"
        );
    }
    stop.store(true, Ordering::Relaxed);
    echo.join().expect("echo thread");
}

// ---------------------------------------------------------------------------
// Real-cluster mode on kubectl's JSON.

/// The gap between the first two probes each server saw for `path`, waiting for two.
fn probe_gaps(servers: &[&Server], path: Option<&str>, limit: Duration) -> Vec<Duration> {
    servers
        .iter()
        .map(|s| {
            wait_until(
                &format!("two probes of {path:?} at {}", s.addr),
                limit,
                || {
                    let t = s.times(path);
                    (t.len() >= 2).then(|| t[1] - t[0])
                },
            )
        })
        .collect()
}

#[test]
fn cluster_policy_forwards_to_every_nodes_node_port_with_the_idle_timeout_annotation() {
    let (node_port, servers) = node_servers();
    let annotations =
        "    service.beta.kubernetes.io/azure-load-balancer-tcp-idle-timeout: \"10\"\n";
    let proxy = run_service(
        &web_service(node_port, "Cluster", annotations, ""),
        &fixture("nodes-endpointslices.json"),
    );
    let fe = proxy.frontend(&format!("web{FRONTEND}"));
    let served = answers(fe);
    let all: BTreeSet<String> = AKS_NODES.iter().map(|n| n.to_string()).collect();
    assert_eq!(served, all, "Cluster: every node takes traffic");

    let json = frontend_json(&proxy, "web");
    assert_eq!(json["service"], "default/web");
    // idleTimeoutInMinutes 10 → 600 s. Waiting it out has no place in CI:
    // tests/tests/data_path.rs `idle_timeout_resets_or_closes_after_the_timeout`
    // proves a frontend's idle_timeout and tcp_reset_on_idle on the wire.
    assert_eq!(json["idle_timeout_s"], 600, "{json}");
    assert_eq!(
        json["tcp_reset_on_idle"], true,
        "enableTcpReset on a TCP rule"
    );
    for (b, (ip, zone)) in json["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .zip(NODE_IPS.iter().zip(["eastus-1", "eastus-2", "eastus-3"]))
    {
        assert_eq!(b["address"], format!("{ip}:{node_port}"), "{json}");
        assert_eq!(b["zone"], zone, "{json}");
    }
    let explained = proxy.explain("web-tcp-80", "127.0.0.1:40000".parse().expect("addr"));
    assert_eq!(explained["service"], "default/web", "{explained}");
    assert_eq!(
        (explained["port"].clone(), explained["port_name"].clone()),
        (80.into(), "http".into())
    );
    let backend = &explained["backend"];
    let i = AKS_NODES
        .iter()
        .position(|n| backend["name"] == *n)
        .expect("a node");
    assert_eq!(backend["zone"], format!("eastus-{}", i + 1), "{explained}");
    // The default Cluster probe is TCP on the nodePort: bare connects.
    let gaps = probe_gaps(&servers.iter().collect::<Vec<_>>(), None, WAIT + WAIT);
    assert!(
        gaps.iter().all(|g| *g >= Duration::from_millis(4500)),
        "5 s default interval: {gaps:?}"
    );
}

/// Every probe annotation changes what runs: protocol and path (per-port
/// over global) as the node sees them, interval as the node times it, the
/// probe count as rise/fall, and disable-tcp-reset on the frontend.
#[test]
fn cluster_probe_annotations_change_what_the_node_sees_and_the_default_is_4_minutes() {
    let (node_port, servers) = node_servers();
    let annotations =
        "    service.beta.kubernetes.io/azure-load-balancer-health-probe-protocol: http
    service.beta.kubernetes.io/azure-load-balancer-health-probe-request-path: /ready
    service.beta.kubernetes.io/port_80_health-probe_request-path: /live
    service.beta.kubernetes.io/azure-load-balancer-health-probe-interval: \"10\"
    service.beta.kubernetes.io/azure-load-balancer-health-probe-num-of-probe: \"3\"
    service.beta.kubernetes.io/azure-load-balancer-disable-tcp-reset: \"true\"
";
    let proxy = run_service(
        &web_service(node_port, "Cluster", annotations, ""),
        &fixture("nodes-endpointslices.json"),
    );
    let json = frontend_json(&proxy, "web");
    assert_eq!(json["idle_timeout_s"], 240, "no annotation: 4 minutes");
    assert_eq!(
        json["tcp_reset_on_idle"], false,
        "disable-tcp-reset: enableTcpReset false"
    );
    let health = &json["health"];
    assert_eq!(
        (health["rise"].clone(), health["fall"].clone()),
        (3.into(), 3.into()),
        "num-of-probe 3 is probeThreshold, both ways: {json}"
    );
    assert_eq!(
        (health["kind"].clone(), health["path"].clone()),
        ("http".into(), "/live".into()),
        "{json}"
    );
    let node = [&servers[0]];
    let gaps = probe_gaps(&node, Some("/live"), Duration::from_secs(25));
    assert!(
        gaps[0] >= Duration::from_millis(9500) && gaps[0] <= Duration::from_secs(13),
        "the interval annotation (10 s, default 5 s): {gaps:?}"
    );
    assert!(
        servers[0].times(Some("/ready")).is_empty(),
        "the per-port path wins over the global one"
    );
    assert!(
        servers[0].times(None).is_empty(),
        "no TCP probes once the protocol is http"
    );
}

/// `/backends`' health of each backend of `frontend`, by name.
fn backend_health(proxy: &Proxy, name: &str) -> Vec<(String, bool)> {
    frontend_json(proxy, name)["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| {
            (
                b["name"].as_str().expect("name").to_owned(),
                b["healthy"].as_bool().expect("healthy"),
            )
        })
        .collect()
}

#[test]
fn local_policy_sends_only_to_nodes_with_ready_endpoints_and_probes_healthz() {
    let (node_port, servers) = node_servers();
    let (health_port, health) = same_port_on(&NODE_IPS);
    // In the fixture, node 1's endpoint is not ready; node 2's has no
    // conditions (ready): each node's kube-proxy answers /healthz accordingly.
    let ready = [true, false, true];
    let health: Vec<Server> = health
        .into_iter()
        .zip(ready)
        .map(|(l, ready)| Server::start(l, Answer::Healthz { ready }))
        .collect();
    let proxy = run_service(
        &web_service(
            node_port,
            "Local",
            "",
            &format!("  healthCheckNodePort: {health_port}\n"),
        ),
        &fixture("nodes-endpointslices.json"),
    );
    let fe = proxy.frontend(&format!("web{FRONTEND}"));
    // Every node is in the pool; the probe, not the EndpointSlices, takes node 1 out.
    let want: Vec<(String, bool)> = AKS_NODES
        .iter()
        .zip(ready)
        .map(|(n, r)| (n.to_string(), r))
        .collect();
    wait_until("the /healthz probe to take node 1 out", WAIT + WAIT, || {
        (backend_health(&proxy, "web") == want).then_some(())
    });
    let expected: BTreeSet<String> = [AKS_NODES[0], AKS_NODES[2]].map(str::to_owned).into();
    assert_eq!(
        answers(fe),
        expected,
        "Local: only nodes with a ready endpoint"
    );
    assert!(
        servers[1].times(Some(APP_PATH)).is_empty(),
        "nothing to the node without one"
    );

    let probed: Vec<&Server> = health.iter().collect();
    let gaps = probe_gaps(&probed, Some("/healthz"), WAIT + WAIT);
    for g in &gaps {
        assert!(
            *g >= Duration::from_millis(4500) && *g <= Duration::from_secs(8),
            "healthz every 5 s: {gaps:?}"
        );
    }
    assert!(
        servers[0].times(None).is_empty(),
        "no probes on the nodePort under Local"
    );
}

// ---------------------------------------------------------------------------
// loadBalancerSourceRanges.

#[test]
fn source_ranges_let_allowed_prefixes_in_and_refuse_and_count_the_rest() {
    let (node_port, servers) = node_servers();
    let proxy = run_service(
        &web_service(
            node_port,
            "Cluster",
            "",
            "  loadBalancerSourceRanges:\n  - 127.0.3.0/24\n",
        ),
        &fixture("nodes-endpointslices.json"),
    );
    let fe = proxy.frontend(&format!("web{FRONTEND}"));
    for i in 0..5 {
        let body = get_from(Some(Ipv4Addr::new(127, 0, 3, 10 + i)), fe);
        assert!(
            body.is_some_and(|b| AKS_NODES.contains(&b.as_str())),
            "allowed client #{i}"
        );
    }
    let served_before: usize = servers.iter().map(|s| s.times(Some(APP_PATH)).len()).sum();
    assert_eq!(served_before, 5);
    for i in 0..5 {
        let body = get_from(Some(Ipv4Addr::new(127, 0, 4, 10 + i)), fe);
        assert_eq!(
            body,
            None,
            "client 127.0.4.{} is outside 127.0.3.0/24",
            10 + i
        );
    }
    proxy.wait_metric(
        "lb_frontend_rejected_connections_total",
        &[("frontend", "web-tcp-80"), ("reason", "source_range")],
        WAIT,
        |v| v >= 5.0,
    );
    let served_after: usize = servers.iter().map(|s| s.times(Some(APP_PATH)).len()).sum();
    assert_eq!(
        served_after, 5,
        "nothing from a refused client reached a node"
    );
}

// ---------------------------------------------------------------------------
// Malformed cluster files.

#[test]
fn a_malformed_cluster_file_is_refused_with_its_field_path() {
    let dir = TempDir::new().expect("tempdir");
    let svc = dir.path().join("svc.yaml");
    fs::write(&svc, web_service(30080, "Cluster", "", "")).expect("write");
    let good = fs::read_to_string(fixture("nodes-endpointslices.json")).expect("fixture");
    let cases = [
        (
            good.replacen(
                "\"address\": \"127.0.1.2\"",
                "\"address\": \"127.0.1.x\"",
                1,
            ),
            "items[1].status.addresses[0].address",
        ),
        (
            good.replacen("\"type\": \"InternalIP\"", "\"type\": \"ExternalIP\"", 1),
            "items[0].status.addresses",
        ),
        (
            good.replacen("\"kind\": \"Node\"", "\"kind\": \"Pod\"", 1),
            "items[0].kind",
        ),
        (good[..good.len() / 2].to_owned(), "not JSON"),
    ];
    for (text, expected) in cases {
        let cluster = dir.path().join("cluster.json");
        fs::write(&cluster, &text).expect("write");
        let out = Command::new(proxy_bin())
            .args(["run", "--service"])
            .arg(&svc)
            .arg("--cluster")
            .arg(&cluster)
            .args(["--port", "80=0", "--admin", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .output()
            .expect("run lb-proxy");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{expected}: {stderr}");
        assert!(stderr.contains("cluster.json"), "names the file: {stderr}");
        assert!(stderr.contains(expected), "names {expected}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn without_cluster_run_service_asks_for_one() {
    let out = Command::new(proxy_bin())
        .args(["run", "--service", "svc.yaml"])
        .stdin(Stdio::null())
        .output()
        .expect("run lb-proxy");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--cluster"), "{stderr}");
}
