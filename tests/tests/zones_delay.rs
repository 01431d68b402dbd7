//! The cross-zone delay line end to end (issue 14): lb-proxy as the ALB in
//! front of two nodes, node-1 in zone 1 with no pod and node-2 in zone 2 with
//! the app's only pod, and `cross_zone_rtt = 20ms` (large enough to see
//! through a debug build's noise). A flow that enters node-1 is forwarded to
//! the pod in zone 2: it crosses zones and is held 10 ms each way; a flow that
//! enters node-2 stays in its zone and takes the normal copy.
//!
//! Each test picks the node its flows enter by asking `/explain` about a
//! client socket bound before it connects, so every flow's path is known.
//! The pod is an in-test listener on 127.0.2.2 that runs one handler per
//! connection (echo, bulk, half-close).
//!
//! 1. Request latency: p50 rises by about the RTT across zones, not within one.
//! 2. The handshake to the pod pays the RTT too.
//! 3. A few MiB each way arrive byte-exact (SHA-256), and are counted.
//! 4. Half-close both ways through a cross-zone hop (and, with
//!    `half_close = false`, the pod's FIN ending the flow), and a pod's reset
//!    after its response arrives after the response.
//! 5. The idle timeout (with `tcp_reset_on_idle`) and the cut at shutdown
//!    end a cross-zone flow as they end any other.
//!
//! The timing tests (1, 2) and the bulk transfer (3) take [`serial`], so the
//! 4 MiB copy never competes with a timed request for CI's two cores. Their
//! lower bounds are exact (the line never releases early); their upper
//! bounds allow about half the RTT of noise.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use lb_tests::zones::{held, p50, serial};
use lb_tests::{
    one_frontend_config, receive_hashed, send_stream, BoundClient, Proxy, SeededStream, IO_TIMEOUT,
};
use sha2::Digest;

const FRONTEND: &str = "zones";
/// The round trip under test, and its half, held each way.
const RTT: Duration = Duration::from_millis(20);
/// What a request may take beyond what the test expects of it: half the
/// RTT. The delay line never releases bytes early, so the lower bounds are
/// exact; above them come the timer's wake-up (tens of microseconds), the
/// balancer's own copy on loopback (well under 1 ms) and scheduling on CI's
/// two busy cores. A p50 shrugs off a few slow samples; half the RTT still
/// tells a request that paid the RTT once from one that paid it twice or
/// not at all.
const SLACK: Duration = Duration::from_millis(10);
/// Flows of each kind, and timed round trips on each after the first.
const FLOWS: usize = 10;
const ROUNDS: usize = 10;
const MESSAGE: usize = 100;
/// Bounds how many client sockets a test binds to find a flow through a node.
const MAX_PICKS: usize = 200;

// ---------------------------------------------------------------------------
// The lab.

/// The pod in zone 2: every connection it accepts runs `handler` on its own
/// thread. It lives until the test process ends.
fn start_pod(handler: impl Fn(TcpStream) + Send + Sync + 'static) -> SocketAddr {
    let listener = TcpListener::bind("127.0.2.2:0").expect("bind the pod");
    let addr = listener.local_addr().expect("the pod's address");
    let handler = Arc::new(handler);
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(s) = conn else { return };
            s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
            s.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
            let handler = Arc::clone(&handler);
            thread::spawn(move || handler(s));
        }
    });
    addr
}

/// The balancer: node-1 (zone 1, no pod) and node-2 (zone 2, the pod).
fn start_lab(pod: SocketAddr) -> Proxy {
    start_lab_with(pod, "")
}

/// [`start_lab`] with more frontend `settings` (plain keys).
fn start_lab_with(pod: SocketAddr, settings: &str) -> Proxy {
    Proxy::run(&lab_config(pod, settings))
}

/// The lab's config, `settings` added to the frontend.
fn lab_config(pod: SocketAddr, settings: &str) -> String {
    let frontend = format!(
        "client_address = \"snat\"\ncross_zone_rtt = \"{rtt}ms\"\n{settings}\n\n\
         [frontends.service]\nexternal_traffic_policy = \"Cluster\"\n\n\
         [frontends.health]\nkind = \"none\"",
        rtt = RTT.as_millis()
    );
    let node = |n: u8, endpoints: &str| {
        format!(
            "[[frontends.nodes]]\nname = \"node-{n}\"\naddress = \"127.0.1.{n}\"\n\
             zone = \"{n}\"\nendpoints = [{endpoints}]\n"
        )
    };
    one_frontend_config(
        FRONTEND,
        &frontend,
        &[node(1, ""), node(2, &format!("\"{pod}\""))],
    )
}

/// Which node a flow enters. node-1's flows cross zones; node-2's do not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    CrossZone,
    SameZone,
}

impl Via {
    fn node(self) -> &'static str {
        match self {
            Via::CrossZone => "node-1",
            Via::SameZone => "node-2",
        }
    }
}

/// A client connection that `/explain` says enters `via`'s node.
fn connect_via(proxy: &Proxy, via: Via) -> TcpStream {
    let frontend = proxy.frontend(FRONTEND);
    for _ in 0..MAX_PICKS {
        let client = BoundClient::new(Ipv4Addr::LOCALHOST).expect("bind a client");
        let explained = proxy.explain(FRONTEND, client.local);
        if explained["hop"]["node"] == via.node() {
            return client.connect(frontend).expect("connect to the frontend");
        }
    }
    panic!("no flow through {} in {MAX_PICKS} client ports", via.node());
}

// ---------------------------------------------------------------------------
// Request latency and the handshake.

/// The pod's echo: each message of [`MESSAGE`] bytes straight back, until EOF.
fn echo(mut s: TcpStream) {
    let mut buf = [0u8; MESSAGE];
    while s.read_exact(&mut buf).is_ok() {
        if s.write_all(&buf).is_err() {
            return;
        }
    }
}

/// One request and its answer on `s`: how long it took.
fn round_trip(s: &mut TcpStream, i: usize) -> Duration {
    let message = [i as u8; MESSAGE];
    let started = Instant::now();
    s.write_all(&message).expect("send a request");
    let mut answer = [0u8; MESSAGE];
    s.read_exact(&mut answer).expect("read the answer");
    let took = started.elapsed();
    assert_eq!(answer, message, "the pod echoes the request");
    took
}

/// Per flow through `via`: the first round trip (which waits for the
/// balancer's connect to the pod), then [`ROUNDS`] more on the open flow.
struct Timings {
    first: Vec<Duration>,
    later: Vec<Duration>,
}

fn time_flows(proxy: &Proxy, via: Via) -> Timings {
    let mut t = Timings {
        first: Vec::new(),
        later: Vec::new(),
    };
    for _ in 0..FLOWS {
        let mut s = connect_via(proxy, via);
        t.first.push(round_trip(&mut s, 0));
        t.later.extend((1..=ROUNDS).map(|i| round_trip(&mut s, i)));
    }
    t
}

/// `FLOWS × ROUNDS` requests on open flows of each kind: across zones each
/// pays the RTT (never less: the line holds each way for half of it), so
/// the p50 rises by about the RTT; within a zone it does not rise at all.
#[test]
fn cross_zone_requests_pay_the_rtt_and_same_zone_requests_do_not() {
    let _serial = serial();
    let proxy = start_lab(start_pod(echo));
    let cross = time_flows(&proxy, Via::CrossZone);
    let holds = held(&proxy, FRONTEND, RTT);
    let same = time_flows(&proxy, Via::SameZone);
    assert_eq!(
        held(&proxy, FRONTEND, RTT),
        holds,
        "same-zone flows were held"
    );
    let (cross_p50, same_p50) = (p50(&cross.later), p50(&same.later));
    eprintln!("request p50: cross-zone {cross_p50:?}, same-zone {same_p50:?}");
    assert!(
        cross.later.iter().all(|&t| t >= RTT),
        "a cross-zone request came back in under the RTT: {:?}",
        cross.later
    );
    assert!(same_p50 < SLACK, "same-zone p50 {same_p50:?} rose");
    let rise = cross_p50.saturating_sub(same_p50);
    assert!(
        rise >= RTT - SLACK / 2 && rise <= RTT + SLACK,
        "p50 rose by {rise:?} across zones, not about {RTT:?}"
    );
    // The balancer's own account: every request and answer held once, none
    // for less than half the RTT, nearly all for at most the RTT (half the
    // RTT of noise; the histogram's buckets at 10 and 20 ms).
    let round_trips = FLOWS * (ROUNDS + 1);
    holds.assert_each_way_per_round_trip(round_trips);
}

/// The first request on a cross-zone flow waits for the connect to the pod,
/// which pays the handshake's round trip: two RTTs in all. Within a zone the
/// connect is a loopback one.
#[test]
fn the_handshake_to_a_pod_in_another_zone_pays_the_rtt() {
    let _serial = serial();
    let proxy = start_lab(start_pod(echo));
    let cross = time_flows(&proxy, Via::CrossZone);
    let same = time_flows(&proxy, Via::SameZone);
    eprintln!(
        "first request p50: cross-zone {:?}, same-zone {:?}",
        p50(&cross.first),
        p50(&same.first)
    );
    assert!(
        cross.first.iter().all(|&t| t >= 2 * RTT),
        "a first cross-zone request did not pay the handshake's RTT: {:?}",
        cross.first
    );
    assert!(
        p50(&cross.first) < 2 * RTT + SLACK,
        "first cross-zone requests: {:?}",
        cross.first
    );
    assert!(
        p50(&same.first) < SLACK,
        "first same-zone requests: {:?}",
        same.first
    );
}

// ---------------------------------------------------------------------------
// Bytes and half-close through the hop.

const BULK: usize = 4 << 20;
const UP_SEED: u64 = 0x2014_0001;
const DOWN_SEED: u64 = 0x2014_0002;

/// A few MiB each way through a cross-zone flow arrive byte-exact, and the
/// node's byte counters count them as the normal copy does.
#[test]
fn bulk_both_ways_through_a_cross_zone_hop_is_byte_exact() {
    let _serial = serial();
    let (report, received) = mpsc::channel();
    // The pod sends its stream and FIN while reading the client's to EOF,
    // then reports (length, SHA-256) of what it received.
    let pod = start_pod(move |mut s| {
        let mut w = s.try_clone().expect("clone");
        let sender = thread::spawn(move || {
            send_stream(&mut w, DOWN_SEED, BULK).expect("pod send");
            w.shutdown(Shutdown::Write).expect("pod shutdown");
        });
        let got = receive_hashed(&mut s).expect("pod receive");
        sender.join().expect("pod sender");
        let _ = report.send(got);
    });
    let proxy = start_lab(pod);
    let mut c = connect_via(&proxy, Via::CrossZone);
    let mut w = c.try_clone().expect("clone");
    let sender = thread::spawn(move || {
        let sha = send_stream(&mut w, UP_SEED, BULK).expect("client send");
        w.shutdown(Shutdown::Write).expect("client shutdown");
        sha
    });
    let (down_len, down_sha) = receive_hashed(&mut c).expect("client receive");
    let up_sent = sender.join().expect("client sender");
    let (up_len, up_sha) = received.recv_timeout(IO_TIMEOUT).expect("the pod's report");
    let mut expected = vec![0u8; BULK];
    SeededStream::new(DOWN_SEED).fill(&mut expected);
    let down_sent: [u8; 32] = sha2::Sha256::digest(&expected).into();
    assert_eq!(up_len, BULK as u64, "bytes the pod received");
    assert_eq!(up_sha, up_sent, "SHA-256 of client → pod stream");
    assert_eq!(down_len, BULK as u64, "bytes the client received");
    assert_eq!(down_sha, down_sent, "SHA-256 of pod → client stream");

    let labels = [("frontend", FRONTEND), ("backend", "node-1")];
    let wait = Duration::from_secs(5);
    for name in [
        "lb_backend_sent_bytes_total",
        "lb_backend_received_bytes_total",
    ] {
        proxy.wait_metric(name, &labels, wait, |v| v == BULK as f64);
    }
}

const REQUEST: &[u8] = b"the whole request, then FIN";
const REPLY: &[u8] = b"the reply, sent after the client's FIN arrived";

/// The client sends and half-closes; the pod reads to EOF (the FIN came
/// through the line) and only then answers, on the half still open.
#[test]
fn half_close_client_first_through_a_cross_zone_hop() {
    let (report, requested) = mpsc::channel();
    let pod = start_pod(move |mut s| {
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("pod reads to EOF");
        let _ = report.send(got);
        s.write_all(REPLY).expect("pod replies after FIN");
        s.shutdown(Shutdown::Write).expect("pod shutdown");
    });
    let proxy = start_lab(pod);
    let mut c = connect_via(&proxy, Via::CrossZone);
    c.write_all(REQUEST).expect("client write");
    c.shutdown(Shutdown::Write).expect("client shutdown(Write)");
    let mut got = Vec::new();
    c.read_to_end(&mut got)
        .expect("client reads the reply to EOF");
    assert_eq!(got, REPLY);
    let request = requested
        .recv_timeout(IO_TIMEOUT)
        .expect("the pod's report");
    assert_eq!(request, REQUEST);
}

const GREETING: &[u8] = b"hello from zone 2; I am done talking\n";

/// A pod that greets and half-closes, then reads to its end of stream and
/// reports what it read (or the error, a reset).
fn greeting_pod() -> (SocketAddr, mpsc::Receiver<std::io::Result<Vec<u8>>>) {
    let (report, read) = mpsc::channel();
    let pod = start_pod(move |mut s| {
        s.write_all(GREETING).expect("pod greeting");
        s.shutdown(Shutdown::Write).expect("pod shutdown(Write)");
        let mut got = Vec::new();
        let _ = report.send(s.read_to_end(&mut got).map(|_| got));
    });
    (pod, read)
}

/// A client through the cross-zone hop that has read the pod's greeting to EOF.
fn greeted_client(proxy: &Proxy) -> TcpStream {
    let mut c = connect_via(proxy, Via::CrossZone);
    let mut got = Vec::new();
    c.read_to_end(&mut got)
        .expect("client reads the greeting to EOF");
    assert_eq!(got, GREETING);
    c
}

/// The pod greets and half-closes; the client reads to EOF, then uploads on
/// the direction still open, and the pod gets every byte of it.
#[test]
fn half_close_pod_first_through_a_cross_zone_hop() {
    let upload: Vec<u8> = (0..250_000u32).map(|i| (i % 239) as u8).collect();
    let (pod, uploaded) = greeting_pod();
    let proxy = start_lab(pod);
    let mut c = greeted_client(&proxy);
    c.write_all(&upload).expect("client writes after EOF");
    c.shutdown(Shutdown::Write).expect("client shutdown");
    let seen = uploaded
        .recv_timeout(IO_TIMEOUT)
        .expect("the pod's report")
        .expect("pod reads after its own FIN");
    assert_eq!(seen.len(), upload.len(), "bytes the pod received");
    assert!(seen == upload, "upload bytes differ");
}

/// `half_close = false` holds through the delay line too: the pod's FIN ends
/// the flow, so the pod sees its end of stream while the client, which
/// never closes, still holds its side open. With half-close on, the pod
/// would wait for the client's FIN and the test would time out.
#[test]
fn without_half_close_the_pods_fin_ends_a_cross_zone_flow() {
    let (pod, pod_saw) = greeting_pod();
    let proxy = start_lab_with(pod, "half_close = false");
    let c = greeted_client(&proxy);
    let seen = pod_saw
        .recv_timeout(IO_TIMEOUT)
        .expect("the pod gets its end of stream without the client's FIN")
        .expect("a clean end of stream, not a reset");
    assert!(seen.is_empty(), "bytes the pod received: {}", seen.len());
    drop(c);
}

const RESPONSE_LEN: usize = 48 << 10;

/// The pod reads the request, writes its response and closes with SO_LINGER
/// 0 (a reset, as a server that closes with unread input does): the client
/// gets the whole response, then the reset, as without the hop. The reset
/// must not outrun the bytes still held in the line.
#[test]
fn a_pods_reset_after_its_response_arrives_after_the_response() {
    let response: Vec<u8> = (0..RESPONSE_LEN).map(|i| (i % 251) as u8).collect();
    let sent = response.clone();
    let pod = start_pod(move |mut s| {
        let mut request = [0u8; MESSAGE];
        s.read_exact(&mut request).expect("pod reads the request");
        s.write_all(&sent).expect("pod writes its response");
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    });
    let proxy = start_lab(pod);
    let mut c = connect_via(&proxy, Via::CrossZone);
    c.write_all(&[7u8; MESSAGE]).expect("client request");
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let ended = loop {
        match c.read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => break Some(e.kind()),
        }
    };
    assert_eq!(got.len(), RESPONSE_LEN, "response bytes before the end");
    assert!(got == response, "response bytes differ");
    assert_eq!(
        ended,
        Some(std::io::ErrorKind::ConnectionReset),
        "how the flow ended"
    );
}

// ---------------------------------------------------------------------------
// The shipped lab.

const ZONES_LAB: &str = include_str!("../../config/aks-zones.toml");

/// `config/aks-zones.toml` passes `lb-proxy check` as shipped, and with the
/// variants its comments suggest: the second pod, and PreferSameZone.
#[test]
fn the_shipped_zones_lab_and_its_suggested_variants_pass_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let prefer = ZONES_LAB
        .replace(
            "# traffic_distribution = \"PreferSameZone\"\n",
            "traffic_distribution = \"PreferSameZone\"\n",
        )
        .replace(
            "endpoints = []\n# endpoints = [\"127.0.2.1:8000\"]",
            "endpoints = [\"127.0.2.1:8000\"]",
        );
    assert_ne!(prefer, ZONES_LAB, "the suggested lines are in the lab");
    for (name, text, pods) in [("shipped", ZONES_LAB, 1), ("prefer-same-zone", &prefer, 2)] {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).expect("write the config");
        let (status, stdout, stderr) = lb_tests::run_check(&path);
        assert!(status.success(), "{name}: {stdout}{stderr}");
        let shape = format!("3 node(s), {pods} endpoint(s)");
        assert!(stdout.contains(&shape), "{name}: {stdout}");
    }
}

// ---------------------------------------------------------------------------
// How a held flow ends.

/// With `tcp_reset_on_idle`, a cross-zone flow that goes quiet is reset
/// after the idle timeout and counted, as the normal copy does.
#[test]
fn an_idle_cross_zone_flow_is_reset_and_counted() {
    const IDLE: Duration = Duration::from_millis(500);
    let proxy = start_lab_with(
        start_pod(echo),
        &format!(
            "idle_timeout = \"{}ms\"\ntcp_reset_on_idle = true",
            IDLE.as_millis()
        ),
    );
    let mut c = connect_via(&proxy, Via::CrossZone);
    // Taken before the last round trip: the proxy's last activity (handing
    // the reply to the client) comes after it, so the reset can be no sooner
    // than IDLE from here. Taken after the reply, the bound would not be exact
    // (the reply's read returns a little after the proxy wrote it).
    let quiet_from = Instant::now();
    round_trip(&mut c, 1);
    let mut buf = [0u8; 16];
    match c.read(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected a reset after the idle timeout, got {other:?}"),
    }
    let after = quiet_from.elapsed();
    assert!(after >= IDLE && after < IO_TIMEOUT, "reset after {after:?}");
    proxy.wait_metric(
        "lb_backend_idle_timeouts_total",
        &[("frontend", FRONTEND), ("backend", "node-1")],
        Duration::from_secs(5),
        |v| v == 1.0,
    );
}

/// SIGINT cuts the flows still open: a cross-zone flow's client gets its
/// FIN, the balancer exits (130, as for any SIGINT) without waiting on the
/// held flow, and the flow is logged as cut, with its bytes.
#[test]
fn a_cut_at_shutdown_ends_a_cross_zone_flow() {
    let log = std::cell::OnceCell::new();
    let mut proxy = Proxy::run_with_flags(&lab_config(start_pod(echo), ""), |dir| {
        let path = dir.join("flows.jsonl");
        let _ = log.set(path.clone());
        [
            "--flow-log",
            &path.display().to_string(),
            "--flow-log-format",
            "json",
        ]
        .map(String::from)
        .to_vec()
    });
    let mut c = connect_via(&proxy, Via::CrossZone);
    round_trip(&mut c, 1);
    proxy.signal(libc::SIGINT);
    let mut buf = [0u8; 16];
    assert_eq!(c.read(&mut buf).expect("the cut's FIN"), 0);
    let status = proxy.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(130), "lb-proxy exited with {status}");
    let text = std::fs::read_to_string(log.get().expect("the flow log path")).expect("flow log");
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(records.len(), 1, "{text}");
    let r = &records[0];
    assert_eq!(r["via"], "node-1", "{r}");
    assert_eq!(r["outcome"], "shutdown", "{r}");
    assert_eq!(r["bytes_to_backend"], MESSAGE as u64, "{r}");
    assert_eq!(r["bytes_from_backend"], MESSAGE as u64, "{r}");
}
