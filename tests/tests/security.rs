//! What a client or a caller of the admin endpoint cannot make the balancer do.
//!
//! - It forwards only to configured backends, whatever a client sends: a
//!   PROXY header of its own (v1, v2, malformed), an HTTP request naming
//!   another address. The balancer never reads a client's PROXY header (it
//!   has no option to accept one), so the header is payload: it reaches the
//!   backend the flow hash chose, byte for byte, and nothing else is
//!   connected to. With `client_address = "proxy-protocol-v1"`/`"-v2"` the
//!   backend sees one header before the client's bytes, the balancer's,
//!   naming the real client.
//! - The admin endpoint changes no state: every method but GET is refused on
//!   every path, and it listens on loopback unless told otherwise.
//!
//! The backends here are recorders: plain listeners that keep every byte a
//! connection brings, so the tests assert on what a backend saw.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lb_bench::client::parse_response;
use lb_tests::{
    backend_toml, connect, one_frontend_config, wait_until, Backend, BoundClient, Proxy, NO_PROBES,
};

const WAIT: Duration = Duration::from_secs(10);
/// The v2 signature, written out here rather than taken from lb-core, so the
/// test checks the encoder against the spec, not against itself.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// One connection a recorder accepted: every byte it sent.
#[derive(Clone, Debug)]
struct Seen {
    bytes: Vec<u8>,
}

/// A backend that records: for each connection it reads to EOF, keeps the
/// bytes, answers `NAME\n` and closes. One connection at a time, which is all
/// these tests open; stopped (and joined) on drop.
struct Recorder {
    name: &'static str,
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Recorder {
    fn start(name: &'static str) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a recorder");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local_addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop) = (Arc::clone(&seen), Arc::clone(&stop));
            std::thread::spawn(move || record(&listener, name, &seen, &stop))
        };
        Recorder {
            name,
            addr,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn toml(&self) -> String {
        backend_toml(self.name, self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("recorder lock").clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The recorder's loop: bounded by its stop flag and by a minute in all.
fn record(listener: &TcpListener, name: &str, seen: &Mutex<Vec<Seen>>, stop: &AtomicBool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let (mut s, _) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(_) => {
                // Nothing waiting (non-blocking): look again shortly.
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
        };
        let _ = s.set_nonblocking(false);
        let _ = s.set_read_timeout(Some(WAIT));
        let mut bytes = Vec::new();
        let _ = s.read_to_end(&mut bytes);
        seen.lock().expect("recorder lock").push(Seen { bytes });
        let _ = s.write_all(format!("{name}\n").as_bytes());
    }
}

/// Sends `bytes` from `client` to `frontend`, closes the write side and
/// returns the answer: the name of the recorder that got them.
fn send_from(client: BoundClient, frontend: SocketAddr, bytes: &[u8]) -> String {
    let mut s = client.connect(frontend).expect("connect to the frontend");
    s.write_all(bytes).expect("send");
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("the backend's answer");
    answer.trim_end().to_owned()
}

fn v4(addr: SocketAddr) -> Ipv4Addr {
    match addr.ip() {
        IpAddr::V4(ip) => ip,
        IpAddr::V6(ip) => panic!("{ip} is not IPv4"),
    }
}

/// A PROXY v1 line announcing `src` as the client of `dst`.
fn v1_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    format!(
        "PROXY TCP4 {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

/// A PROXY v2 header (PROXY command, TCP over IPv4) announcing `src` as the client of `dst`.
fn v2_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut h = V2_SIGNATURE.to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0x00, 12]);
    h.extend_from_slice(&v4(src).octets());
    h.extend_from_slice(&v4(dst).octets());
    h.extend_from_slice(&src.port().to_be_bytes());
    h.extend_from_slice(&dst.port().to_be_bytes());
    h
}

/// What a hostile client might send to steer its flow to `elsewhere`.
fn steering_payloads(elsewhere: SocketAddr, frontend: SocketAddr) -> Vec<(&'static str, Vec<u8>)> {
    let request = format!("GET / HTTP/1.1\r\nHost: {elsewhere}\r\nConnection: close\r\n\r\n");
    let with = |header: Vec<u8>| [header, request.clone().into_bytes()].concat();
    vec![
        ("PROXY v1", with(v1_header(elsewhere, elsewhere))),
        (
            "PROXY v1 naming the frontend",
            with(v1_header(elsewhere, frontend)),
        ),
        ("PROXY v2", with(v2_header(elsewhere, elsewhere))),
        ("PROXY v1 UNKNOWN", with(b"PROXY UNKNOWN\r\n".to_vec())),
        ("malformed PROXY", with(b"PROXY TCP4 nonsense\r\n".to_vec())),
        ("HTTP Host", request.clone().into_bytes()),
        (
            "HTTP absolute URI",
            format!("GET http://{elsewhere}/ HTTP/1.1\r\nHost: {elsewhere}\r\n\r\n").into_bytes(),
        ),
        (
            "HTTP CONNECT",
            format!("CONNECT {elsewhere} HTTP/1.1\r\nHost: {elsewhere}\r\n\r\n").into_bytes(),
        ),
    ]
}

/// A client's own PROXY header and an HTTP request naming another address are
/// payload: they reach the configured backend verbatim, and the address they
/// name is never connected to.
#[test]
fn whatever_a_client_sends_reaches_only_the_configured_backend_verbatim() {
    let a = Recorder::start("a");
    // Listening, but not configured: what the client's bytes name.
    let elsewhere = Recorder::start("elsewhere");
    let proxy = Proxy::run(&one_frontend_config("web", NO_PROBES, &[a.toml()]));
    let frontend = proxy.frontend("web");
    let payloads = steering_payloads(elsewhere.addr, frontend);
    for (i, (what, bytes)) in payloads.iter().enumerate() {
        let client = BoundClient::new(Ipv4Addr::new(127, 0, 3, 1 + i as u8)).expect("bind");
        assert_eq!(send_from(client, frontend, bytes), "a", "{what}");
    }
    let seen = a.seen();
    assert_eq!(seen.len(), payloads.len(), "one connection per client");
    for ((what, sent), got) in payloads.iter().zip(&seen) {
        assert_eq!(
            got.bytes,
            *sent,
            "{what}: the backend must see exactly the client's bytes, got {:?}",
            String::from_utf8_lossy(&got.bytes)
        );
    }
    assert!(
        elsewhere.seen().is_empty(),
        "an unconfigured address was connected to: {:?}",
        elsewhere.seen()
    );
    let connections = proxy.metric(
        "lb_backend_connections_total",
        &[("frontend", "web"), ("backend", "a")],
    );
    assert_eq!(connections, Some(payloads.len() as f64));
}

/// Which backend a flow reaches is the flow hash's choice (what `/explain`
/// predicts from the addresses alone), never what its bytes name.
#[test]
fn the_backend_is_chosen_by_the_flow_not_by_what_the_client_names() {
    let a = Recorder::start("a");
    let b = Recorder::start("b");
    let proxy = Proxy::run(&one_frontend_config(
        "web",
        &format!("distribution = \"SourceIP\"\n{NO_PROBES}"),
        &[a.toml(), b.toml()],
    ));
    let frontend = proxy.frontend("web");
    let mut served = [0usize; 2];
    for i in 0..16u8 {
        let client = BoundClient::new(Ipv4Addr::new(127, 0, 3, 100 + i)).expect("bind");
        let predicted = proxy.explain("web", client.local)["backend"]["name"]
            .as_str()
            .expect("/explain names a backend")
            .to_owned();
        // Everything the client sends names the backend it was not given.
        let other = if predicted == "a" { b.addr } else { a.addr };
        let (what, bytes) = steering_payloads(other, frontend).swap_remove(usize::from(i % 8));
        assert_eq!(send_from(client, frontend, &bytes), predicted, "{what}");
        served[usize::from(predicted == "b")] += 1;
    }
    // Both backends were predicted at least once, so both directions were tried.
    assert!(served.iter().all(|&n| n > 0), "served {served:?}");
}

/// With `client_address = "proxy-protocol-v1"` or `"-v2"`, the backend sees
/// exactly one header ahead of the client's bytes, the balancer's, naming the
/// real client; a header the client sent follows as payload.
#[test]
fn with_proxy_protocol_the_backend_sees_the_balancers_header_then_the_clients_bytes() {
    for (mode, header) in [
        (
            "proxy-protocol-v1",
            v1_header as fn(SocketAddr, SocketAddr) -> Vec<u8>,
        ),
        ("proxy-protocol-v2", v2_header),
    ] {
        let a = Recorder::start("a");
        let elsewhere = Recorder::start("elsewhere");
        let settings = format!("client_address = \"{mode}\"\n{NO_PROBES}");
        let proxy = Proxy::run(&one_frontend_config("web", &settings, &[a.toml()]));
        let frontend = proxy.frontend("web");
        let payloads = steering_payloads(elsewhere.addr, frontend);
        let mut clients = Vec::new();
        for (i, (what, bytes)) in payloads.iter().enumerate() {
            let client = BoundClient::new(Ipv4Addr::new(127, 0, 3, 50 + i as u8)).expect("bind");
            clients.push(client.local);
            assert_eq!(send_from(client, frontend, bytes), "a", "{mode}: {what}");
        }
        let seen = a.seen();
        assert_eq!(
            seen.len(),
            payloads.len(),
            "{mode}: one connection per client"
        );
        for ((client, (what, sent)), got) in clients.iter().zip(&payloads).zip(&seen) {
            let expected = [header(*client, frontend), sent.clone()].concat();
            assert_eq!(
                got.bytes,
                expected,
                "{mode}, {what}: want the balancer's header for {client}, then the client's bytes; got {:?}",
                String::from_utf8_lossy(&got.bytes)
            );
        }
        assert!(
            elsewhere.seen().is_empty(),
            "{mode}: {:?}",
            elsewhere.seen()
        );
    }
}

// ---------------------------------------------------------------------------
// The admin endpoint.

/// `METHOD path` with `body` on a fresh connection: the status code.
fn admin_request(admin: SocketAddr, method: &str, path: &str, body: &str) -> u16 {
    let mut s = connect(admin).expect("connect to the admin endpoint");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).expect("send the request");
    let mut raw = Vec::new();
    // The server may close as soon as it has answered; what arrived is enough.
    let _ = s.read_to_end(&mut raw);
    let (status, _, _) =
        parse_response(&raw).unwrap_or_else(|e| panic!("{method} {path}: no HTTP answer ({e})"));
    status
}

/// The state a caller could hope to change: `/backends` (weights, health,
/// table) and every `lb_` metric (reloads, generation, weights, up).
fn admin_state(proxy: &Proxy) -> (String, Vec<String>) {
    let (status, backends) = proxy.admin_get("/backends");
    assert_eq!(status, 200, "/backends: {backends}");
    let metrics = proxy
        .metrics()
        .0
        .lines()
        .filter(|l| l.starts_with("lb_"))
        .map(str::to_owned)
        .collect();
    (backends, metrics)
}

/// Nothing on the admin endpoint changes state: every method but GET gets 405
/// on every path (known or not), and afterwards `/backends` and every `lb_`
/// metric are as they were, and new flows still reach both backends. The one
/// exception, `POST /zones/down|up?zone=Z`, is tested in zones.rs, with its
/// refusal of requests a web page sent (CSRF: `Origin`, `Sec-Fetch-Site`).
#[test]
fn the_admin_endpoint_changes_nothing_whatever_the_method() {
    let a = Backend::echo("a");
    let b = Backend::echo("b");
    let proxy = lb_tests::web_proxy(NO_PROBES, &[&a, &b]);
    let admin = proxy.admin();
    let before = admin_state(&proxy);
    let paths = [
        "/metrics",
        "/healthz",
        "/healthz?node=node-1",
        "/backends",
        "/backends/a",
        "/explain?src=127.0.0.1:1",
        "/",
        "/reload",
        "/config",
        "/drain",
        "/shutdown",
        "/quitquitquit",
    ];
    let bodies = [
        "",
        "{\"weight\": 0}",
        "{\"backends\": []}",
        "[[frontends.backends]]\nname = \"x\"\naddress = \"127.0.0.9:9\"\n",
    ];
    let mut answers = Vec::new();
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        for path in paths {
            for body in bodies {
                let status = admin_request(admin, method, path, body);
                if status != 405 {
                    answers.push(format!("{method} {path} ({} bytes): {status}", body.len()));
                }
            }
        }
    }
    assert!(answers.is_empty(), "not refused:\n{}", answers.join("\n"));
    // GET on paths that would change state, were there any, finds nothing.
    for path in ["/reload", "/drain", "/shutdown", "/backends/a"] {
        assert_eq!(admin_request(admin, "GET", path, ""), 404, "GET {path}");
    }
    assert_eq!(admin_state(&proxy), before, "state changed");
    let names: Vec<String> = (1..=40u8)
        .map(|i| {
            let client = BoundClient::new(Ipv4Addr::new(127, 0, 3, 150 + i)).expect("bind");
            let mut s = client.connect(proxy.frontend("web")).expect("connect");
            lb_tests::read_line(&mut s).expect("greeting")
        })
        .collect();
    for name in ["a", "b"] {
        assert!(
            names.iter().any(|n| n == name),
            "{name} got no flow: {names:?}"
        );
    }
}

/// Without an `[admin]` section the admin endpoint listens on loopback
/// (127.0.0.1:9180, the address the shipped Prometheus config scrapes).
#[test]
fn the_admin_endpoint_listens_on_loopback_by_default() {
    let default: SocketAddr = "127.0.0.1:9180".parse().expect("address");
    // Nothing else in this suite binds the default port; wait out any lingering user of it.
    wait_until("127.0.0.1:9180 to be free", WAIT, || {
        TcpListener::bind(default).ok().map(drop)
    });
    let a = Backend::echo("a");
    let config = format!(
        "workers = 1\n\n[[frontends]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n{NO_PROBES}\n\n{}",
        a.toml()
    );
    let proxy = Proxy::run(&config);
    let admin = proxy.admin();
    assert!(admin.ip().is_loopback(), "admin on {admin}");
    assert_eq!(admin, default);
    assert_eq!(proxy.admin_get("/healthz").0, 200);
    // It answers on loopback only: not on the unspecified address's other faces.
    let listening = TcpStream::connect_timeout(&"127.0.0.2:9180".parse().expect("addr"), WAIT);
    assert!(
        listening.is_err(),
        "the admin endpoint answers on 127.0.0.2 too: bound to a wildcard address"
    );
}
