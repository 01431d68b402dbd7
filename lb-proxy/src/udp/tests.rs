//! The UDP plane end to end inside the crate: a real controller, a real
//! worker loop on its own thread, real loopback sockets for clients and
//! backends. Each test asserts on what went through (bytes, which backend,
//! which source the backend saw) and on the metrics.

use std::io::{self, Write};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lb_core::FlowKey;
use tokio::sync::watch;

use crate::config::{self, ClientAddress, FrontendProtocol};
use crate::control::Controller;
use crate::flowlog::{FlowLog, FlowLogCounters};
use crate::metrics::{Metrics, UdpDrop};
use crate::shutdown::Phase;
use crate::state::{Frontend, HealthKey};
use crate::udp::{bind_frontend, UdpWorker};

const WAIT: Duration = Duration::from_secs(5);

/// A UDP backend: answers `who` with `NAME SOURCE` (the address it saw),
/// echoes anything else (or, `tag_all`, answers every datagram as `who`).
struct Echo {
    name: String,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Echo {
    fn start(name: &str, tag_all: bool) -> Echo {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (me, halt) = (name.to_owned(), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !halt.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                if tag_all || &buf[..n] == b"who" {
                    let _ = socket.send_to(format!("{me} {from}").as_bytes(), from);
                } else {
                    let _ = socket.send_to(&buf[..n], from);
                }
            }
        });
        Echo {
            name: name.to_owned(),
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A flow log destination the test reads back.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// How a lab's frontend is set up.
struct Setup {
    backends: usize,
    batch: usize,
    max_flows: usize,
    idle_timeout: Duration,
    client_address: ClientAddress,
    flow_log: bool,
    /// A QUIC frontend (QUIC-LB config 0, 3-byte server IDs `00000N` for
    /// backend `bN-1`) whose backends answer every datagram with their name.
    quic: bool,
    /// The hop model instead of plain backends: node `node-a` (127.0.1.1)
    /// with no pod, `node-b` (127.0.1.2) with every echo backend as its
    /// pods, under this `externalTrafficPolicy`.
    hop: Option<&'static str>,
    /// No worker thread: the test drives the worker itself ([`Driven`]), so
    /// nothing (no tick) runs between the steps it takes.
    driven: bool,
    /// One more backend, `v6` at `[::1]:9`: under `preserve` (an IPv4
    /// client's IP to bind) no upstream to it can open.
    v6_backend: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            backends: 3,
            batch: 32,
            max_flows: 1000,
            idle_timeout: Duration::from_secs(60),
            client_address: ClientAddress::Snat,
            flow_log: false,
            quic: false,
            hop: None,
            driven: false,
            v6_backend: false,
        }
    }
}

/// One UDP frontend served by one worker thread, with echo backends.
struct Lab {
    frontend: Arc<Frontend>,
    controller: Controller,
    metrics: Arc<Metrics>,
    phase: watch::Sender<Phase>,
    worker: Option<std::thread::JoinHandle<()>>,
    /// The worker's socket while no worker serves it (`driven`).
    socket: Option<UdpSocket>,
    backends: Vec<Echo>,
    flow_log: Option<(Arc<FlowLog>, Sink)>,
}

/// The lab's config: one frontend on port 0 over `backends` (or the hop
/// model's nodes), health driven by the test (fall = rise = 1, no probers).
fn lab_config(setup: &Setup, backends: &[Echo]) -> config::Config {
    let mut text = "workers = 1\n[[frontends]]\nname = \"u\"\nlisten = \"127.0.0.1:0\"\n\
        [frontends.health]\nkind = \"tcp\"\nfall = 1\nrise = 1\n"
        .to_owned();
    match setup.hop {
        None => {
            for b in backends {
                text += &format!(
                    "[[frontends.backends]]\nname = \"{}\"\naddress = \"{}\"\n",
                    b.name, b.addr
                );
            }
        }
        Some(policy) => {
            let pods: Vec<String> = backends.iter().map(|b| format!("\"{}\"", b.addr)).collect();
            text += &format!(
                "[frontends.service]\nexternal_traffic_policy = \"{policy}\"\n\
                 [[frontends.nodes]]\nname = \"node-a\"\naddress = \"127.0.1.1\"\n\
                 [[frontends.nodes]]\nname = \"node-b\"\naddress = \"127.0.1.2\"\nendpoints = [{}]\n",
                pods.join(", ")
            );
        }
    }
    if setup.v6_backend {
        text += "[[frontends.backends]]\nname = \"v6\"\naddress = \"[::1]:9\"\n";
    }
    let mut config = config::parse("lab.toml", &text).unwrap();
    let fe = &mut config.frontends[0];
    fe.protocol = FrontendProtocol::Udp;
    fe.udp_batch = setup.batch;
    fe.max_flows = setup.max_flows;
    fe.idle_timeout = setup.idle_timeout;
    fe.client_address = setup.client_address;
    if setup.quic {
        fe.protocol = FrontendProtocol::Quic;
        fe.quic = Some(config::QuicFrontendConfig {
            lb: quic_lb(),
            server_ids: (0..backends.len())
                .map(|i| (format!("b{i}"), server_id(i)))
                .collect(),
        });
    }
    config
}

/// A flow log writing into a sink the test reads, counted in `metrics`.
fn sink_flow_log(metrics: &Metrics) -> (Arc<FlowLog>, Sink) {
    let sink = Sink::default();
    let counters = FlowLogCounters {
        written: metrics.flow_log_lines.clone(),
        dropped: metrics.flow_log_dropped.clone(),
    };
    let log = FlowLog::start_writing(
        Box::new(sink.clone()),
        config::FlowLogFormat::Text,
        counters,
    )
    .unwrap();
    (Arc::new(log), sink)
}

/// One worker thread serving `socket` for `frontend`, as a server's worker does.
fn start_worker(
    socket: UdpSocket,
    frontend: Arc<Frontend>,
    phase: watch::Receiver<Phase>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            UdpWorker::new(socket, frontend, 1, phase)
                .unwrap()
                .run()
                .await
        });
    })
}

impl Lab {
    fn start(setup: Setup) -> Lab {
        let backends: Vec<Echo> = (0..setup.backends)
            .map(|i| Echo::start(&format!("b{i}"), setup.quic))
            .collect();
        let config = lab_config(&setup, &backends);
        let (addr, mut sockets) = bind_frontend(config.frontends[0].listen, 1).unwrap();
        let metrics = Arc::new(Metrics::new());
        let flow_log = setup.flow_log.then(|| sink_flow_log(&metrics));
        let log = flow_log.as_ref().map(|(l, _)| Arc::clone(l));
        let controller = Controller::new(config, None, &[addr], Arc::clone(&metrics), log).unwrap();
        let frontend = Arc::clone(&controller.frontends()[0]);
        let (phase, phase_rx) = watch::channel(Phase::Running);
        let socket = sockets.pop().unwrap();
        let (worker, socket) = match setup.driven {
            true => (None, Some(socket)),
            false => (
                Some(start_worker(socket, Arc::clone(&frontend), phase_rx)),
                None,
            ),
        };
        Lab {
            frontend,
            controller,
            metrics,
            phase,
            worker,
            socket,
            backends,
            flow_log,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.frontend.listen
    }

    /// The backend the frontend's current snapshot hashes `client` to.
    fn hashed(&self, client: SocketAddr) -> String {
        let routing = self.frontend.routing.load();
        let id = routing
            .snapshot
            .lookup(&FlowKey::udp(client, self.addr()))
            .expect("a backend is up");
        routing.backends[id as usize].name.to_string()
    }

    fn mark(&mut self, backend: &str, up: bool) {
        let key = HealthKey::Backend(Arc::from(backend));
        self.controller.probe_result(0, &key, up);
    }

    fn backend_metric(&self, read: impl Fn(&crate::metrics::BackendHandles) -> i64) -> i64 {
        let routing = self.frontend.routing.load();
        routing.backends.iter().map(|b| read(&b.metrics)).sum()
    }

    fn udp(&self) -> &crate::metrics::UdpFrontendHandles {
        self.frontend.metrics.udp.as_ref().unwrap()
    }

    /// Moves to `phase` and, at `Cut`, waits for the worker to end its flows.
    fn shut(&mut self, phase: Phase) {
        self.phase.send(phase).unwrap();
        if phase == Phase::Cut {
            if let Some(w) = self.worker.take() {
                w.join().unwrap();
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.phase.send(Phase::Cut);
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl Lab {
    /// Closes the flow log and returns what it wrote.
    fn flow_log_text(&mut self) -> String {
        let (log, sink) = self.flow_log.take().expect("a lab with a flow log");
        assert!(log.close(WAIT));
        let text = sink.0.lock().unwrap().clone();
        String::from_utf8(text).unwrap()
    }
}

/// How long one driven turn may wait for something to happen.
const TURN: Duration = Duration::from_millis(100);

/// A driven lab's worker, on a runtime of the test's own: it acts only when
/// the test turns it, and no tick ever runs (so nothing expires or applies
/// a snapshot but the datagrams and replies under test).
struct Driven {
    worker: UdpWorker,
    rt: tokio::runtime::Runtime,
}

impl Driven {
    fn start(lab: &mut Lab) -> Driven {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let socket = lab.socket.take().expect("a driven lab");
        let phase = lab.phase.subscribe();
        let worker = {
            let _runtime = rt.enter();
            UdpWorker::new(socket, Arc::clone(&lab.frontend), 1, phase).unwrap()
        };
        Driven { worker, rt }
    }

    /// Turns the worker until `done` holds (checked between turns).
    fn until(&mut self, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            let worker = &mut self.worker;
            let turn = async { tokio::time::timeout(TURN, worker.turn(None)).await };
            let _ = self.rt.block_on(turn);
        }
    }

    /// Sends `payload` from `client`, turning the worker until the reply is back.
    fn ask(&mut self, client: &UdpSocket, to: SocketAddr, payload: &[u8]) -> Vec<u8> {
        client.send_to(payload, to).unwrap();
        let mut reply = None;
        self.until("a reply", || {
            reply = try_recv(client);
            reply.is_some()
        });
        reply.unwrap()
    }
}

/// A datagram waiting for `client`, if any.
fn try_recv(client: &UdpSocket) -> Option<Vec<u8>> {
    client.set_nonblocking(true).unwrap();
    let mut buf = vec![0u8; 65_536];
    let got = client.recv_from(&mut buf);
    client.set_nonblocking(false).unwrap();
    let (n, _) = got.ok()?;
    buf.truncate(n);
    Some(buf)
}

/// The backend name of a `who` reply.
fn name_of(reply: &[u8]) -> String {
    let reply = String::from_utf8_lossy(reply);
    reply.split_once(' ').expect("NAME SOURCE").0.to_owned()
}

fn client(ip: &str) -> UdpSocket {
    let s = UdpSocket::bind((ip, 0)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s
}

/// Sends `payload` and returns the reply.
fn ask(client: &UdpSocket, to: SocketAddr, payload: &[u8]) -> Vec<u8> {
    client.send_to(payload, to).unwrap();
    let mut buf = vec![0u8; 65_536];
    let (n, _) = client.recv_from(&mut buf).expect("a reply");
    buf.truncate(n);
    buf
}

/// `NAME SOURCE` from a `who` reply.
fn who(client: &UdpSocket, to: SocketAddr) -> (String, SocketAddr) {
    let reply = String::from_utf8(ask(client, to, b"who")).unwrap();
    let (name, seen) = reply.split_once(' ').unwrap();
    (name.to_owned(), seen.parse().unwrap())
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Each flow lands on the backend the hash names and stays there, the
/// backend sees one source per flow, and every datagram is counted once.
fn flows_stick_to_their_hashed_backend(batch: usize) {
    const CLIENTS: usize = 20;
    const ROUNDS: usize = 5;
    let lab = Lab::start(Setup {
        batch,
        ..Setup::default()
    });
    let clients: Vec<UdpSocket> = (0..CLIENTS).map(|_| client("127.0.0.1")).collect();
    for c in &clients {
        let expected = lab.hashed(c.local_addr().unwrap());
        let mut sources = std::collections::BTreeSet::new();
        for _ in 0..ROUNDS {
            let (name, seen) = who(c, lab.addr());
            assert_eq!(name, expected, "batch {batch}: the hashed backend");
            sources.insert(seen);
        }
        assert_eq!(sources.len(), 1, "one upstream source per flow");
    }
    let sent = (CLIENTS * ROUNDS) as i64;
    assert_eq!(lab.udp().received_datagrams.get() as i64, sent);
    assert_eq!(lab.backend_metric(|m| m.sent_datagrams.get() as i64), sent);
    assert_eq!(
        lab.backend_metric(|m| m.received_datagrams.get() as i64),
        sent
    );
    assert_eq!(lab.backend_metric(|m| m.sent_bytes.get() as i64), 3 * sent);
    assert_eq!(
        lab.backend_metric(|m| m.udp_flows.get() as i64),
        CLIENTS as i64
    );
    assert_eq!(
        lab.backend_metric(|m| m.active_udp_flows.get()),
        CLIENTS as i64
    );
    assert_eq!(lab.frontend.active(), CLIENTS);
}

#[test]
fn flows_stick_to_their_hashed_backend_batched() {
    flows_stick_to_their_hashed_backend(32);
}

#[test]
fn flows_stick_to_their_hashed_backend_one_datagram_per_syscall() {
    flows_stick_to_their_hashed_backend(1);
}

#[test]
fn a_64k_datagram_passes_intact_both_ways() {
    for batch in [1, 8] {
        let lab = Lab::start(Setup {
            batch,
            ..Setup::default()
        });
        let payload: Vec<u8> = (0..65_507).map(|i| (i % 253) as u8).collect();
        let c = client("127.0.0.1");
        assert_eq!(ask(&c, lab.addr(), &payload), payload, "batch {batch}");
        let received = lab.backend_metric(|m| m.received_bytes.get() as i64);
        assert_eq!(received, payload.len() as i64);
    }
}

/// Azure's UDP semantics: a backend down moves its flows (with no traffic
/// needed), and all down ends them.
#[test]
fn a_backend_down_moves_its_flows_and_all_down_ends_them() {
    let mut lab = Lab::start(Setup {
        flow_log: true,
        ..Setup::default()
    });
    let clients: Vec<UdpSocket> = (0..30).map(|_| client("127.0.0.1")).collect();
    let first: Vec<String> = clients.iter().map(|c| who(c, lab.addr()).0).collect();
    let victim = first[0].clone();
    let on_victim = first.iter().filter(|n| **n == victim).count() as u64;

    lab.mark(&victim, false);
    wait_until("the victim's flows moved", || {
        lab.udp().moved.get() == on_victim
    });
    assert_eq!(lab.backend_metric(|m| m.active_udp_flows.get()), 30);
    let created = lab.backend_metric(|m| m.udp_flows.get() as i64);
    assert_eq!(created, 30, "a move is not a creation");
    for (c, before) in clients.iter().zip(&first) {
        let (now, _) = who(c, lab.addr());
        assert_ne!(now, victim, "nothing goes to a backend that is down");
        if *before != victim {
            assert_eq!(now, *before, "flows on healthy backends stay");
        } else {
            assert_eq!(now, lab.hashed(c.local_addr().unwrap()));
        }
    }

    let names: Vec<String> = lab.backends.iter().map(|b| b.name.clone()).collect();
    for name in &names {
        lab.mark(name, false);
    }
    let ended = || lab.udp().ended(lb_core::FlowEnd::NoHealthyBackend).get();
    wait_until("every flow ended", || ended() == 30);
    assert_eq!(lab.backend_metric(|m| m.active_udp_flows.get()), 0);
    assert_eq!(lab.frontend.active(), 0);
    clients[0].send_to(b"who", lab.addr()).unwrap();
    wait_until("the datagram dropped", || {
        lab.udp().dropped(UdpDrop::NoBackend).get() == 1
    });

    // One record per flow, naming the backend it ended on, with the bytes of
    // both its stretches (a move carries them over).
    let (log, sink) = lab.flow_log.take().unwrap();
    assert!(log.close(WAIT));
    let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
    assert_eq!(text.lines().count(), 30, "{text}");
    for line in text.lines() {
        assert!(line.ends_with(" no_healthy_backend"), "{line}");
        assert!(line.contains(" sent=6 "), "two `who`s of 3 bytes: {line}");
        assert!(!line.contains(&format!("via {victim}:")), "{line}");
    }
}

#[test]
fn idle_flows_expire_and_a_full_table_evicts_the_oldest() {
    let lab = Lab::start(Setup {
        max_flows: 3,
        idle_timeout: Duration::from_millis(300),
        ..Setup::default()
    });
    let clients: Vec<UdpSocket> = (0..5).map(|_| client("127.0.0.1")).collect();
    for c in &clients {
        who(c, lab.addr());
    }
    assert_eq!(lab.udp().ended(lb_core::FlowEnd::Evicted).get(), 2);
    assert_eq!(lab.backend_metric(|m| m.active_udp_flows.get()), 3);
    let expired = || lab.udp().ended(lb_core::FlowEnd::Expired).get();
    wait_until("the idle flows expired", || expired() == 3);
    assert_eq!(lab.backend_metric(|m| m.active_udp_flows.get()), 0);
    assert_eq!(lab.frontend.active(), 0);
}

#[test]
fn preserve_binds_each_upstream_to_its_clients_ip() {
    let lab = Lab::start(Setup {
        client_address: ClientAddress::Preserve,
        ..Setup::default()
    });
    for ip in ["127.0.0.55", "127.3.2.1"] {
        let (_, seen) = who(&client(ip), lab.addr());
        assert_eq!(seen.ip().to_string(), ip);
    }
    let (_, seen) = who(&client("127.0.0.77"), lab.addr());
    assert_eq!(seen.ip().to_string(), "127.0.0.77");
}

/// Draining forwards existing flows and takes no new one; the cut ends
/// every flow, each with its flow log record and its `closed` count.
#[test]
fn shutdown_drains_then_ends_every_flow_with_a_record() {
    let mut lab = Lab::start(Setup {
        flow_log: true,
        ..Setup::default()
    });
    let clients: Vec<UdpSocket> = (0..4).map(|_| client("127.0.0.1")).collect();
    for c in &clients {
        assert_eq!(ask(c, lab.addr(), b"hello"), b"hello");
    }
    lab.shut(Phase::Draining);
    // The phase reaches the worker asynchronously: a new flow is refused once it has.
    wait_until("a new flow is refused", || {
        let late = client("127.0.0.1");
        late.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        late.send_to(b"hello", lab.addr()).unwrap();
        let mut buf = [0u8; 16];
        late.recv_from(&mut buf).is_err() && lab.udp().dropped(UdpDrop::NoBackend).get() > 0
    });
    let late_flows = lab.backend_metric(|m| m.udp_flows.get() as i64) - 4;
    assert_eq!(ask(&clients[0], lab.addr(), b"still"), b"still");
    lab.shut(Phase::Cut);

    let open = 4 + late_flows as u64;
    assert_eq!(lab.udp().ended(lb_core::FlowEnd::Closed).get(), open);
    assert_eq!(lab.backend_metric(|m| m.active_udp_flows.get()), 0);
    assert_eq!(lab.frontend.active(), 0);
    let (log, sink) = lab.flow_log.take().unwrap();
    assert!(log.close(WAIT));
    let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
    let records: Vec<&str> = text.lines().collect();
    assert_eq!(records.len() as u64, open, "{text}");
    assert!(records
        .iter()
        .all(|r| r.contains(" udp ") && r.ends_with("shutdown")));
    let first = clients[0].local_addr().unwrap().to_string();
    let line = records.iter().find(|r| r.contains(&first)).unwrap();
    assert!(line.contains("sent=10 received=10"), "{line}");
    assert_eq!(lab.metrics.flow_log_lines.get(), open);
}

fn quic_lb() -> lb_core::QuicLbConfig {
    lb_core::QuicLbConfig::new(0, 3, 4).unwrap()
}

fn server_id(backend: usize) -> lb_core::ServerId {
    lb_core::ServerId::new(&[0, 0, backend as u8 + 1]).unwrap()
}

/// A CID that routes to backend `bN`, with its own nonce.
fn cid_of(backend: usize, nonce: u32) -> Vec<u8> {
    quic_lb()
        .encode(&server_id(backend), &nonce.to_be_bytes())
        .unwrap()
        .to_vec()
}

/// A short-header packet (form bit 0, fixed bit 1) to `cid`.
fn short_packet(cid: &[u8]) -> Vec<u8> {
    let mut p = vec![0x40];
    p.extend_from_slice(cid);
    p.extend_from_slice(&[0x5a; 40]);
    p
}

/// A QUIC v1 Initial (client-chosen `dcid`), padded to 1200 bytes.
fn initial_packet(dcid: &[u8]) -> Vec<u8> {
    let mut p = vec![0xc0, 0, 0, 0, 1, dcid.len() as u8];
    p.extend_from_slice(dcid);
    p.extend_from_slice(&[0, 0]); // SCID length 0, token length 0
    let rest = 1200 - p.len() - 2;
    p.extend_from_slice(&(0x4000 | rest as u16).to_be_bytes());
    p.resize(1200, 0);
    p
}

fn quic_counts(lab: &Lab) -> &crate::metrics::QuicHandles {
    lab.udp().quic.as_ref().unwrap()
}

/// Step 1 of the QUIC order: a routable CID reaches its server ID's backend
/// from any client address, even one the hash sends elsewhere.
#[test]
fn a_routable_cid_reaches_its_backend_from_any_client_address() {
    use crate::metrics::RoutedBy;
    let lab = Lab::start(Setup {
        quic: true,
        ..Setup::default()
    });
    let mut sent = 0;
    for backend in 0..3 {
        for nonce in 0..4 {
            let c = client("127.0.0.1");
            let reply = ask(&c, lab.addr(), &short_packet(&cid_of(backend, nonce)));
            let name = String::from_utf8(reply).unwrap();
            assert!(name.starts_with(&format!("b{backend} ")), "{name}");
            sent += 1;
        }
    }
    let q = quic_counts(&lab);
    assert_eq!(q.routed(RoutedBy::Cid).get(), sent);
    assert_eq!(q.routed(RoutedBy::Hash).get(), 0);
    assert_eq!(
        lab.backend_metric(|m| m.udp_flows.get() as i64),
        sent as i64
    );
}

/// A migration: the client's Initial is hashed and its 4-tuple recorded;
/// from a new port, its short-header packets (the server's CID) still reach
/// the same backend, although the new 4-tuple hashes to another.
#[test]
fn a_migrated_client_keeps_its_backend_by_cid_where_the_hash_would_not() {
    use crate::metrics::RoutedBy;
    let lab = Lab::start(Setup {
        quic: true,
        ..Setup::default()
    });
    let first = client("127.0.0.1");
    let (name, first_source) = {
        let reply = String::from_utf8(ask(&first, lab.addr(), &initial_packet(&[7; 8]))).unwrap();
        let (n, s) = reply.split_once(' ').unwrap();
        (n.to_owned(), s.to_owned())
    };
    assert_eq!(name, lab.hashed(first.local_addr().unwrap()));
    let q = quic_counts(&lab);
    assert_eq!(q.routed(RoutedBy::Hash).get(), 1);
    assert_eq!(q.unroutable(lb_core::Unroutable::ClientChosen).get(), 1);
    let backend: usize = name[1..].parse().unwrap();
    // A new port whose 4-tuple the hash sends to another backend.
    let moved = std::iter::repeat_with(|| client("127.0.0.1"))
        .take(200)
        .find(|c| lab.hashed(c.local_addr().unwrap()) != name)
        .expect("a port that hashes elsewhere");
    for nonce in 0..3 {
        let reply = String::from_utf8(ask(
            &moved,
            lab.addr(),
            &short_packet(&cid_of(backend, nonce)),
        ))
        .unwrap();
        assert!(reply.starts_with(&format!("{name} ")), "{reply}");
        let source = reply.split_once(' ').unwrap().1;
        assert_ne!(source, first_source, "the new path is a flow of its own");
    }
    assert_eq!(q.routed(RoutedBy::Cid).get(), 3);
    // The old path still works by its flow.
    let again = String::from_utf8(ask(
        &first,
        lab.addr(),
        &short_packet(&[0xe7, 1, 2, 3, 4, 5, 6, 7]),
    ))
    .unwrap();
    assert!(again.starts_with(&format!("{name} ")), "{again}");
    assert_eq!(q.routed(RoutedBy::Flow).get(), 1);
}

/// Every reason a CID cannot route is counted, and the datagram still goes
/// by the flow table or the hash; garbage is counted and dropped.
#[test]
fn unroutable_cids_fall_back_by_reason_and_garbage_is_dropped() {
    use crate::metrics::RoutedBy;
    use lb_core::Unroutable;
    let mut lab = Lab::start(Setup {
        quic: true,
        ..Setup::default()
    });
    let cases: [(Vec<u8>, Unroutable); 4] = [
        (
            vec![0xe7, 1, 2, 3, 4, 5, 6, 7],
            Unroutable::UnroutableConfig,
        ),
        (vec![0x27, 0, 0, 1, 1, 2, 3, 4], Unroutable::UnknownConfig),
        (vec![0x03, 0, 0, 1], Unroutable::ShortCid),
        (cid_of(200, 1), Unroutable::UnknownServerId),
    ];
    for (cid, why) in &cases {
        let c = client("127.0.0.1");
        let reply = String::from_utf8(ask(&c, lab.addr(), &short_packet(cid))).unwrap();
        let hashed = lab.hashed(c.local_addr().unwrap());
        assert!(reply.starts_with(&format!("{hashed} ")), "{why:?}: {reply}");
        assert_eq!(quic_counts(&lab).unroutable(*why).get(), 1, "{why:?}");
    }
    lab.mark("b1", false);
    let c = client("127.0.0.1");
    let reply = String::from_utf8(ask(&c, lab.addr(), &short_packet(&cid_of(1, 9)))).unwrap();
    assert!(!reply.starts_with("b1 "), "{reply}");
    let q = quic_counts(&lab);
    assert_eq!(q.unroutable(Unroutable::BackendDown).get(), 1);
    assert_eq!(q.routed(RoutedBy::Hash).get(), 5);

    let garbage: [&[u8]; 3] = [b"", &[0x40, 0x1f, 1, 2], &[0xff]];
    for g in garbage {
        client("127.0.0.1").send_to(g, lab.addr()).unwrap();
    }
    wait_until("the garbage is counted", || {
        lab.udp().dropped(UdpDrop::NotQuic).get() == 3
    });
    assert_eq!(q.unroutable(Unroutable::NotQuic).get(), 3);
    assert_eq!(lab.udp().received_datagrams.get(), 5 + 3);
    assert_eq!(lab.backend_metric(|m| m.sent_datagrams.get() as i64), 5);
}

/// The node hop applies to UDP as to TCP: a flow the table sends to the
/// node without the pod crosses to the other node and the pod sees that
/// node's address; one that stays on its node, or any flow under `Local`,
/// shows the client's own address.
#[test]
fn udp_through_the_node_hop_is_snated_across_nodes_and_not_under_local() {
    let cluster = Lab::start(Setup {
        backends: 1,
        hop: Some("Cluster"),
        ..Setup::default()
    });
    let mut crossed = 0;
    for i in 1..=40 {
        let ip = format!("127.0.9.{i}");
        let c = client(&ip);
        let node = cluster.hashed(c.local_addr().unwrap());
        let (_, seen) = who(&c, cluster.addr());
        let expected = if node == "node-a" {
            "127.0.1.1"
        } else {
            ip.as_str()
        };
        assert_eq!(seen.ip().to_string(), expected, "{ip} via {node}");
        crossed += usize::from(node == "node-a");
    }
    assert!(
        crossed > 0 && crossed < 40,
        "both nodes took flows: {crossed}"
    );

    let local = Lab::start(Setup {
        backends: 1,
        hop: Some("Local"),
        ..Setup::default()
    });
    for i in 1..=10 {
        let ip = format!("127.0.9.{i}");
        let c = client(&ip);
        assert_eq!(
            local.hashed(c.local_addr().unwrap()),
            "node-b",
            "only node-b is eligible"
        );
        let (_, seen) = who(&c, local.addr());
        assert_eq!(seen.ip().to_string(), ip);
    }
}

/// Idle flows that a new client's datagram expires (no tick in between)
/// are counted, logged and released, although the new flow takes a slot
/// they freed at once.
#[test]
fn flows_expired_by_a_new_flows_datagram_are_counted_logged_and_released() {
    const IDLE: Duration = Duration::from_millis(200);
    let mut lab = Lab::start(Setup {
        idle_timeout: IDLE,
        flow_log: true,
        driven: true,
        ..Setup::default()
    });
    let mut d = Driven::start(&mut lab);
    let idle: Vec<UdpSocket> = (0..3).map(|_| client("127.0.0.1")).collect();
    for c in &idle {
        assert_eq!(d.ask(c, lab.addr(), b"hi"), b"hi");
    }
    // The idle timeout is what is under test: let it run out.
    std::thread::sleep(IDLE + Duration::from_millis(50));
    let late = client("127.0.0.1");
    assert_eq!(d.ask(&late, lab.addr(), b"new"), b"new");

    assert_eq!(lab.udp().ended(lb_core::FlowEnd::Expired).get(), 3);
    assert_eq!(lab.backend_metric(|m| m.active_udp_flows.get()), 1);
    assert_eq!(lab.frontend.active(), 1);
    let text = lab.flow_log_text();
    assert_eq!(text.lines().count(), 3, "{text}");
    for c in &idle {
        let me = c.local_addr().unwrap().to_string();
        let line = text.lines().find(|l| l.contains(&me)).expect("a record");
        assert!(line.ends_with(" expired"), "{line}");
    }
}

/// A snapshot applied by one datagram's table call moves the other flows
/// before anything else is forwarded: their datagrams later in the same
/// batch go to their new backend.
#[test]
fn flows_moved_by_an_earlier_datagram_of_the_batch_use_their_new_backend() {
    let mut lab = Lab::start(Setup {
        driven: true,
        ..Setup::default()
    });
    let mut d = Driven::start(&mut lab);
    let clients: Vec<UdpSocket> = (0..12).map(|_| client("127.0.0.1")).collect();
    let first: Vec<String> = clients
        .iter()
        .map(|c| name_of(&d.ask(c, lab.addr(), b"who")))
        .collect();
    let victim = first[0].clone();
    let on_victim: Vec<&UdpSocket> = clients
        .iter()
        .zip(&first)
        .filter(|(_, n)| **n == victim)
        .map(|(c, _)| c)
        .collect();
    lab.mark(&victim, false);
    // One batch: a new flow's datagram (its table call applies the
    // snapshot), then one from each flow on the victim.
    client("127.0.0.1").send_to(b"who", lab.addr()).unwrap();
    for c in &on_victim {
        c.send_to(b"who", lab.addr()).unwrap();
    }
    let mut replies: Vec<Option<Vec<u8>>> = vec![None; on_victim.len()];
    d.until("every moved flow has its reply", || {
        for (c, r) in on_victim.iter().zip(replies.iter_mut()) {
            if r.is_none() {
                *r = try_recv(c);
            }
        }
        replies.iter().all(Option::is_some)
    });
    for reply in replies.iter().flatten() {
        assert_ne!(name_of(reply), victim, "sent on the old upstream");
    }
    assert_eq!(lab.udp().moved.get(), on_victim.len() as u64);
}

/// What a reload publishes (byte counting, the client address) reaches the
/// UDP worker at its next tick.
#[test]
fn reloaded_settings_reach_the_udp_worker_at_its_tick() {
    let mut lab = Lab::start(Setup {
        driven: true,
        ..Setup::default()
    });
    let mut d = Driven::start(&mut lab);
    let c = client("127.0.0.1");
    assert_eq!(d.ask(&c, lab.addr(), b"12345"), b"12345");
    let sent_bytes = || lab.backend_metric(|m| m.sent_bytes.get() as i64);
    assert_eq!(sent_bytes(), 5);

    let mut next = (*lab.frontend.settings.load_full()).clone();
    next.byte_metrics = false;
    next.client_address = ClientAddress::Preserve;
    lab.frontend.settings.publish(next);
    d.worker.on_tick();
    assert_eq!(d.ask(&c, lab.addr(), b"12345"), b"12345");
    assert_eq!(sent_bytes(), 5, "byte counting is off");
    assert_eq!(lab.backend_metric(|m| m.sent_datagrams.get() as i64), 2);
    let fresh = client("127.0.0.66");
    let reply = d.ask(&fresh, lab.addr(), b"who");
    let seen = String::from_utf8(reply).unwrap();
    assert!(
        seen.contains(" 127.0.0.66:"),
        "a new flow preserves: {seen}"
    );
}

/// While draining, a QUIC client that migrates (a new 4-tuple, the
/// server's CID) still reaches its backend; datagrams of new flows without
/// a routable CID are dropped.
#[test]
fn while_draining_a_migrating_quic_client_keeps_its_backend_by_cid() {
    let mut lab = Lab::start(Setup {
        quic: true,
        ..Setup::default()
    });
    let first = client("127.0.0.1");
    let name = name_of(&ask(&first, lab.addr(), &initial_packet(&[7; 8])));
    let backend: usize = name[1..].parse().unwrap();
    lab.shut(Phase::Draining);
    let refused = || lab.udp().dropped(UdpDrop::NoBackend).get();
    wait_until("a new flow is refused", || {
        let late = client("127.0.0.1");
        late.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        late.send_to(&initial_packet(&[8; 8]), lab.addr()).unwrap();
        let mut buf = [0u8; 64];
        late.recv_from(&mut buf).is_err() && refused() > 0
    });
    let migrated = client("127.0.0.1");
    let reply = ask(&migrated, lab.addr(), &short_packet(&cid_of(backend, 5)));
    assert_eq!(name_of(&reply), name);
    let before = refused();
    client("127.0.0.1")
        .send_to(&initial_packet(&[9; 8]), lab.addr())
        .unwrap();
    wait_until("the new flow is dropped", || refused() == before + 1);
}

/// At the cut, flows whose idle time had already run out end as expired,
/// not as cut by the shutdown.
#[test]
fn flows_overdue_at_the_cut_end_as_expired() {
    const IDLE: Duration = Duration::from_millis(200);
    let mut lab = Lab::start(Setup {
        idle_timeout: IDLE,
        flow_log: true,
        driven: true,
        ..Setup::default()
    });
    let mut d = Driven::start(&mut lab);
    let clients: Vec<UdpSocket> = (0..3).map(|_| client("127.0.0.1")).collect();
    for c in &clients {
        assert_eq!(d.ask(c, lab.addr(), b"hi"), b"hi");
    }
    std::thread::sleep(IDLE + Duration::from_millis(50));
    d.worker.end_flows();
    assert_eq!(lab.udp().ended(lb_core::FlowEnd::Expired).get(), 3);
    assert_eq!(lab.udp().ended(lb_core::FlowEnd::Closed).get(), 0);
    assert_eq!(lab.backend_metric(|m| m.active_udp_flows.get()), 0);
    let text = lab.flow_log_text();
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(text.lines().all(|l| l.ends_with(" expired")), "{text}");
}

/// A move counts once its new upstream is open: one that cannot open ends
/// the flow (counted `closed`), and no move is counted.
#[test]
fn a_move_whose_upstream_cannot_open_ends_the_flow_uncounted_as_moved() {
    let mut lab = Lab::start(Setup {
        backends: 1,
        v6_backend: true,
        client_address: ClientAddress::Preserve,
        ..Setup::default()
    });
    let on_b0: Vec<UdpSocket> = std::iter::repeat_with(|| client("127.0.0.1"))
        .take(200)
        .filter(|c| lab.hashed(c.local_addr().unwrap()) == "b0")
        .take(4)
        .collect();
    assert_eq!(on_b0.len(), 4, "clients hashed to b0");
    for c in &on_b0 {
        assert_eq!(who(c, lab.addr()).0, "b0");
    }
    lab.mark("b0", false);
    let closed = || lab.udp().ended(lb_core::FlowEnd::Closed).get();
    wait_until("the flows ended", || closed() == 4);
    assert_eq!(lab.udp().moved.get(), 0);
    assert_eq!(lab.backend_metric(|m| m.active_udp_flows.get()), 0);
    assert_eq!(lab.frontend.active(), 0);
}

/// `source_ranges` on a QUIC frontend: a client migrating to an address
/// outside them is dropped though its connection ID routes (an NSG sees a
/// new flow from a source it does not allow), counted, and opens no flow;
/// the flow from the allowed address goes on.
#[test]
fn a_quic_client_migrating_outside_the_source_ranges_is_dropped_though_its_cid_routes() {
    let lab = Lab::start(Setup {
        quic: true,
        ..Setup::default()
    });
    let mut next = (*lab.frontend.settings.load_full()).clone();
    next.source_ranges = Some(lb_core::SourceRanges::parse(["127.0.0.1"]).unwrap());
    lab.frontend.settings.publish(next);
    let first = client("127.0.0.1");
    let name = name_of(&ask(&first, lab.addr(), &initial_packet(&[7; 8])));
    let backend: usize = name[1..].parse().unwrap();

    let outside = client("127.0.0.9");
    let migrated = short_packet(&cid_of(backend, 5));
    outside.send_to(&migrated, lab.addr()).unwrap();
    let dropped = || lab.udp().dropped(UdpDrop::SourceRange).get();
    wait_until("the migrated datagram is dropped", || dropped() == 1);
    let again = ask(&first, lab.addr(), &short_packet(&cid_of(backend, 6)));
    assert_eq!(name_of(&again), name);
    assert_eq!(try_recv(&outside), None, "no reply outside the ranges");
    assert_eq!(
        lab.backend_metric(|m| m.udp_flows.get() as i64),
        1,
        "only the allowed client's flow"
    );
}
