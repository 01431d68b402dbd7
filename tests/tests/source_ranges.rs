//! A frontend's `source_ranges` end to end (what a Service's
//! `loadBalancerSourceRanges` becomes): real `lb-proxy`, real sockets, clients
//! bound to chosen 127.x sources before they connect.
//!
//! - TCP: a client inside the list gets through (bytes echoed); one outside
//!   it is reset with no byte, counted in
//!   `lb_frontend_rejected_connections_total{reason="source_range"}`, and the
//!   backend, which records the peer of every connection it accepts (under
//!   `client_address = "preserve"` that peer is the client's own IP), never
//!   sees it. `/explain` says `allowed` and the prefix.
//! - UDP: datagrams from outside the list get no reply, are counted in
//!   `lb_udp_dropped_datagrams_total{reason="source_range"}`, open no flow,
//!   and never reach the pod.
//! - Reload: a new list applies to new connections and new flows at once;
//!   connections and flows already open continue, as a stateful NSG keeps
//!   the flows it allowed.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use lb_tests::udp::{frontend_config, pod_answer, UdpClient, UdpPod};
use lb_tests::{backend_toml, read_line, BoundClient, Proxy, IO_TIMEOUT, NO_PROBES};

/// How long a counter may take to show what already happened, on a busy machine.
const WAIT: Duration = Duration::from_secs(10);
const ALLOWED: Ipv4Addr = Ipv4Addr::new(127, 0, 1, 7);
const ALLOWED_TOO: Ipv4Addr = Ipv4Addr::new(127, 0, 1, 8);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(127, 0, 2, 7);
const ALLOWED_LIST: &str = r#"source_ranges = ["127.0.1.0/24"]"#;
/// The list after the reload: 127.0.1.0/24 leaves, 127.0.2.0/24 comes in.
const MOVED_LIST: &str = r#"source_ranges = ["127.0.2.0/24"]"#;

// ---------------------------------------------------------------------------
// A TCP backend that records who connected.

/// An echo server that writes `rec\n` on each connection, then echoes, and
/// records the peer IP of every connection it accepts. Stopped on drop.
struct RecordingBackend {
    addr: SocketAddr,
    peers: Arc<Mutex<Vec<IpAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RecordingBackend {
    fn start() -> RecordingBackend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the backend");
        let addr = listener.local_addr().expect("local_addr");
        let peers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (peers, stop) = (Arc::clone(&peers), Arc::clone(&stop));
            std::thread::spawn(move || accept_and_echo(listener, &peers, &stop))
        };
        RecordingBackend {
            addr,
            peers,
            stop,
            thread: Some(thread),
        }
    }

    fn peers(&self) -> Vec<IpAddr> {
        self.peers.lock().expect("peer log").clone()
    }
}

/// Accepts until `stop` is set (drop sets it, then connects once to wake the
/// accept), serving each connection on its own thread, bounded by [`IO_TIMEOUT`].
fn accept_and_echo(listener: TcpListener, peers: &Mutex<Vec<IpAddr>>, stop: &AtomicBool) {
    for stream in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            return;
        }
        let Ok(mut stream) = stream else { continue };
        let Ok(peer) = stream.peer_addr() else {
            continue;
        };
        peers.lock().expect("peer log").push(peer.ip());
        std::thread::spawn(move || {
            let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
            let _ = stream.write_all(b"rec\n");
            if let Ok(mut reader) = stream.try_clone() {
                let _ = io::copy(&mut reader, &mut stream);
            }
        });
    }
}

impl Drop for RecordingBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------
// Helpers.

fn tcp_config(backend: &RecordingBackend, list: &str) -> String {
    frontend_config(
        2,
        "web",
        &format!("client_address = \"preserve\"\n{list}\n{NO_PROBES}"),
        &[backend_toml("rec", backend.addr)],
    )
}

fn udp_config(pod: &UdpPod, list: &str) -> String {
    frontend_config(
        2,
        "dns",
        &format!("protocol = \"udp\"\nclient_address = \"preserve\"\n{list}\n{NO_PROBES}"),
        &[backend_toml("pod", pod.addr)],
    )
}

/// Connects from `ip`, reads the greeting and echoes one line.
fn served(ip: Ipv4Addr, frontend: SocketAddr) -> TcpStream {
    let mut s = BoundClient::new(ip)
        .and_then(|c| c.connect(frontend))
        .unwrap_or_else(|e| panic!("connect from {ip}: {e}"));
    assert_eq!(read_line(&mut s).expect("greeting"), "rec");
    echoes(&mut s, "through");
    s
}

/// Writes a line and reads it back, byte for byte.
fn echoes(s: &mut TcpStream, line: &str) {
    s.write_all(format!("{line}\n").as_bytes()).expect("write");
    assert_eq!(read_line(s).expect("echo"), line);
}

/// Connects from `ip` and expects the balancer to close the connection
/// before any byte: a reset, or an end of stream.
fn refused(ip: Ipv4Addr, frontend: SocketAddr) {
    let Ok(mut s) = BoundClient::new(ip).and_then(|c| c.connect(frontend)) else {
        return; // the reset came before connect returned
    };
    let _ = s.write_all(b"let me in\n");
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!(
            "a client from {ip} got {:?} through",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) => assert!(
            e.kind() == io::ErrorKind::ConnectionReset,
            "from {ip}: expected a reset, got {e}"
        ),
    }
}

fn rejected(proxy: &Proxy) -> f64 {
    proxy
        .metric(
            "lb_frontend_rejected_connections_total",
            &[("frontend", "web"), ("reason", "source_range")],
        )
        .unwrap_or(0.0)
}

fn wait_rejected(proxy: &Proxy, want: f64) {
    proxy.wait_metric(
        "lb_frontend_rejected_connections_total",
        &[("frontend", "web"), ("reason", "source_range")],
        WAIT,
        |v| v == want,
    );
}

fn wait_udp_dropped(proxy: &Proxy, want: f64) {
    proxy.wait_metric(
        "lb_udp_dropped_datagrams_total",
        &[("frontend", "dns"), ("reason", "source_range")],
        WAIT,
        |v| v == want,
    );
}

/// Rewrites the config, sends SIGHUP and waits for the reload to succeed.
fn reload(proxy: &Proxy, config: &str) {
    proxy.write_config(config);
    proxy.signal(libc::SIGHUP);
    proxy.wait_metric(
        "lb_config_reloads_total",
        &[("result", "success")],
        WAIT,
        |v| v == 1.0,
    );
}

// ---------------------------------------------------------------------------
// Tests.

#[test]
fn tcp_clients_outside_the_ranges_are_reset_counted_and_never_reach_the_backend() {
    let backend = RecordingBackend::start();
    let proxy = Proxy::run(&tcp_config(&backend, ALLOWED_LIST));
    let fe = proxy.frontend("web");

    let mut inside = served(ALLOWED, fe);
    refused(OUTSIDE, fe);
    refused(OUTSIDE, fe);
    wait_rejected(&proxy, 2.0);
    // A later allowed client is still served, and the refused never were.
    let mut inside_too = served(ALLOWED_TOO, fe);
    assert_eq!(
        backend.peers(),
        [IpAddr::V4(ALLOWED), IpAddr::V4(ALLOWED_TOO)],
        "the backend accepted exactly the allowed clients, seen as themselves"
    );
    assert_eq!(
        proxy.metric("lb_backend_connections_total", &[("backend", "rec")]),
        Some(2.0)
    );
    assert_eq!(
        proxy.metric("lb_frontend_connections_total", &[("frontend", "web")]),
        Some(2.0),
        "a refused client is not a connection of the frontend"
    );
    echoes(&mut inside, "still open");
    echoes(&mut inside_too, "still open");

    let yes = proxy.explain("web", SocketAddr::new(IpAddr::V4(ALLOWED), 40000));
    assert_eq!(yes["allowed"], true, "{yes}");
    assert_eq!(yes["source_range"], "127.0.1.0/24", "{yes}");
    let no = proxy.explain("web", SocketAddr::new(IpAddr::V4(OUTSIDE), 40000));
    assert_eq!(no["allowed"], false, "{no}");
    assert_eq!(no["source_range"], serde_json::Value::Null, "{no}");
    assert_eq!(no["source_ranges"], serde_json::json!(["127.0.1.0/24"]));
}

#[test]
fn a_reload_applies_the_new_list_to_new_connections_and_keeps_open_ones() {
    let backend = RecordingBackend::start();
    let proxy = Proxy::run(&tcp_config(&backend, ALLOWED_LIST));
    let fe = proxy.frontend("web");

    let mut open = served(ALLOWED, fe);
    refused(OUTSIDE, fe);
    wait_rejected(&proxy, 1.0);

    reload(&proxy, &tcp_config(&backend, MOVED_LIST));
    let mut now_in = served(OUTSIDE, fe);
    echoes(&mut open, "kept across the reload");
    refused(ALLOWED_TOO, fe);
    wait_rejected(&proxy, 2.0);
    assert_eq!(
        backend.peers(),
        [IpAddr::V4(ALLOWED), IpAddr::V4(OUTSIDE)],
        "127.0.1.8 came after 127.0.1.0/24 left the list"
    );
    echoes(&mut now_in, "served");
    assert_eq!(rejected(&proxy), 2.0);
}

#[test]
fn udp_datagrams_from_outside_the_ranges_get_no_reply_open_no_flow_and_a_reload_moves_the_list() {
    let pod = UdpPod::start("127.0.0.1:0".parse().expect("addr"));
    let proxy = Proxy::run(&udp_config(&pod, ALLOWED_LIST));
    let fe = proxy.frontend("dns");

    let inside = UdpClient::connect(ALLOWED, fe);
    assert_eq!(pod_answer(&inside.echo(b"hello")).ip(), inside.local.ip());
    let outside = UdpClient::connect(OUTSIDE, fe);
    for _ in 0..3 {
        outside.send(b"let me in");
    }
    wait_udp_dropped(&proxy, 3.0);
    // The pod answers in order: the allowed flow's next echo comes after
    // anything the refused datagrams could have caused.
    assert_eq!(pod_answer(&inside.echo(b"again")).ip(), inside.local.ip());
    assert_eq!(outside.try_recv(), None, "no reply to a refused client");
    assert!(
        pod.seen().iter().all(|s| s.ip() == inside.local.ip()),
        "only the allowed client reached the pod: {:?}",
        pod.seen()
    );
    assert_eq!(
        proxy.metric("lb_backend_udp_flows_total", &[("backend", "pod")]),
        Some(1.0),
        "the refused datagrams opened no flow"
    );

    // The list moves: the open flow goes on, a new flow from the old prefix
    // is dropped, and the client that was outside now gets through.
    reload(&proxy, &udp_config(&pod, MOVED_LIST));
    assert_eq!(pod_answer(&inside.echo(b"kept")).ip(), inside.local.ip());
    UdpClient::connect(ALLOWED_TOO, fe).send(b"new flow, old prefix");
    wait_udp_dropped(&proxy, 4.0);
    assert_eq!(
        pod_answer(&outside.echo(b"now in")).ip(),
        outside.local.ip()
    );
    assert_eq!(
        proxy.metric("lb_backend_udp_flows_total", &[("backend", "pod")]),
        Some(2.0)
    );
}
