//! Fault cases end to end (issue 12):
//! - a backend SIGKILLed in the middle of 200 concurrent transfers: only its
//!   flows end, promptly; every other transfer completes byte-exact; new flows
//!   avoid it at once through passive failure (the probe interval is an hour,
//!   so probes cannot be what notices);
//! - a black-holed backend (a listener whose accept queue is full, so the
//!   kernel drops SYNs to it): flows whose first choice it is fall back to
//!   their next choice within the connect timeout, and no client sees an error.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use lb_tests::{
    backend_toml, connect, one_frontend_config, read_line, wait_until, Backend, BoundClient, Gate,
    Proxy, SeededStream, READY_TIMEOUT,
};
use sha2::Digest;

/// Concurrent transfers in the kill test.
const FLOWS: usize = 200;
/// Bytes each way per transfer; half goes before the kill, half after.
const SIZE: usize = 1 << 20;
const HALF: usize = SIZE / 2;
const CHUNK: usize = 64 * 1024;
/// How soon after the kill the killed backend's flows must have ended. Generous:
/// it is a failure bound on a busy 2-core machine, not a measurement.
const END_BOUND: Duration = Duration::from_secs(5);
/// Failure bound for whole phases (establishing 200 flows, finishing them).
const PHASE_BOUND: Duration = Duration::from_secs(60);

/// What one transfer saw.
struct Transfer {
    backend: String,
    /// SHA-256 of what the client sent, if it sent everything.
    sent: Result<[u8; 32], io::Error>,
    /// Bytes echoed back and their SHA-256, or the error that ended the read.
    received: Result<(u64, [u8; 32]), (u64, io::Error)>,
    /// When the read side ended (EOF or error).
    ended: Instant,
}

/// Sends `len` bytes of the stream seeded with `seed` in `CHUNK`s, pausing at
/// `gate` after `HALF`; returns their SHA-256.
fn send_gated(s: &mut TcpStream, seed: u64, len: usize, gate: &Gate) -> io::Result<[u8; 32]> {
    let mut gen = SeededStream::new(seed);
    let mut sha = sha2::Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0;
    while sent < len {
        if sent == HALF {
            gate.wait();
        }
        let limit = if sent < HALF { HALF } else { len };
        let n = (limit - sent).min(CHUNK);
        gen.fill(&mut buf[..n]);
        sha.update(&buf[..n]);
        s.write_all(&buf[..n])?;
        sent += n;
    }
    s.shutdown(Shutdown::Write)?;
    Ok(sha.finalize().into())
}

/// One flow: connect, read the echo backend's greeting, then send and receive
/// concurrently. `established` counts flows past the greeting; `halfway`
/// counts flows that got the first `HALF` echoed back.
fn transfer(
    frontend: SocketAddr,
    seed: u64,
    gate: &Gate,
    established: &AtomicUsize,
    halfway: &AtomicUsize,
) -> Transfer {
    let mut s = connect(frontend).unwrap_or_else(|e| panic!("flow {seed}: connect: {e}"));
    let backend = read_line(&mut s).unwrap_or_else(|e| panic!("flow {seed}: greeting: {e}"));
    established.fetch_add(1, Ordering::SeqCst);
    let mut w = s.try_clone().expect("clone the client socket");
    thread::scope(|scope| {
        let writer = thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn_scoped(scope, || send_gated(&mut w, seed, SIZE, gate))
            .expect("spawn writer");
        let mut counted_half = false;
        let mut sha = sha2::Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0u64;
        // The read loop, inline so the halfway point is counted as it passes.
        let received = loop {
            let n = match s.read(&mut buf) {
                Ok(0) => break Ok((total, sha.finalize().into())),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err((total, e)),
            };
            sha.update(&buf[..n]);
            total += n as u64;
            if !counted_half && total >= HALF as u64 {
                counted_half = true;
                halfway.fetch_add(1, Ordering::SeqCst);
            }
        };
        let ended = Instant::now();
        if !counted_half {
            // Never got halfway (it should have): count it anyway so the
            // main thread is not left waiting; the asserts will catch it.
            halfway.fetch_add(1, Ordering::SeqCst);
        }
        // Unblock a writer stuck on a dead flow (the read side has ended).
        let _ = s.shutdown(Shutdown::Both);
        let sent = writer.join().expect("writer thread");
        Transfer {
            backend,
            sent,
            received,
            ended,
        }
    })
}

#[test]
fn a_backend_killed_mid_stream_ends_only_its_flows_and_new_flows_avoid_it() {
    let names = ["a", "b", "c"];
    let mut backends: Vec<Backend> = names.iter().map(|n| Backend::echo(n)).collect();
    // An hour between probes: only passive failures can notice the kill.
    let settings = "distribution = \"Default\"\n\
                    [frontends.health]\nkind = \"tcp\"\ninterval = \"1h\"\nfall = 2\nrise = 2";
    let tables: Vec<String> = backends.iter().map(|b| b.toml()).collect();
    let proxy = Proxy::run(&one_frontend_config("web", settings, &tables));
    let frontend = proxy.frontend("web");

    let gate = Gate::default();
    let established = AtomicUsize::new(0);
    let halfway = AtomicUsize::new(0);
    let started = Instant::now();
    let (transfers, killed, killed_at) = thread::scope(|scope| {
        let handles: Vec<_> = (0..FLOWS)
            .map(|i| {
                let (gate, established, halfway) = (&gate, &established, &halfway);
                thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn_scoped(scope, move || {
                        transfer(frontend, 0xfa17_0000 + i as u64, gate, established, halfway)
                    })
                    .expect("spawn flow")
            })
            .collect();
        // Every flow is connected and has had half its bytes echoed: mid-stream.
        wait_until("every flow to be halfway", PHASE_BOUND, || {
            (halfway.load(Ordering::SeqCst) == FLOWS).then_some(())
        });
        assert_eq!(established.load(Ordering::SeqCst), FLOWS);
        // Kill the backend with the most open flows (each has some).
        let (status, body) = proxy.admin_get("/backends");
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("/backends JSON");
        let open: BTreeMap<String, u64> = v["frontends"][0]["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .map(|b| {
                (
                    b["name"].as_str().expect("name").to_owned(),
                    b["active_connections"]
                        .as_u64()
                        .expect("active_connections"),
                )
            })
            .collect();
        assert_eq!(
            open.values().sum::<u64>(),
            FLOWS as u64,
            "every flow should be open: {open:?}"
        );
        let victim = open
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(name, _)| name.clone())
            .expect("a backend");
        let killed_at = Instant::now();
        backends
            .iter_mut()
            .find(|b| b.name == victim)
            .expect("victim backend")
            .kill();
        gate.open();
        let transfers: Vec<Transfer> = handles
            .into_iter()
            .map(|h| h.join().expect("flow thread"))
            .collect();
        (transfers, victim, killed_at)
    });
    let elapsed = started.elapsed();

    let mut per_backend: BTreeMap<&str, usize> = BTreeMap::new();
    let mut slowest_end = Duration::ZERO;
    for (i, t) in transfers.iter().enumerate() {
        *per_backend.entry(&t.backend).or_default() += 1;
        if t.backend == killed {
            // Ended (EOF or error), short of the full echo, and promptly.
            let got = match &t.received {
                Ok((n, _)) => *n,
                Err((n, _)) => *n,
            };
            assert!(
                got < SIZE as u64,
                "flow #{i} on killed {killed} got all {got} bytes back"
            );
            let took = t.ended.saturating_duration_since(killed_at);
            slowest_end = slowest_end.max(took);
            assert!(
                took <= END_BOUND,
                "flow #{i} on killed {killed} ended {took:?} after the kill (bound {END_BOUND:?})"
            );
        } else {
            let sent = t
                .sent
                .as_ref()
                .unwrap_or_else(|e| panic!("flow #{i} on {}: send failed: {e}", t.backend));
            let (n, hash) = t.received.as_ref().unwrap_or_else(|(n, e)| {
                panic!(
                    "flow #{i} on {}: receive failed after {n} bytes: {e}",
                    t.backend
                )
            });
            assert_eq!(*n, SIZE as u64, "flow #{i} on {}: length", t.backend);
            assert_eq!(hash, sent, "flow #{i} on {}: bytes differ", t.backend);
        }
    }
    eprintln!(
        "{FLOWS} flows of {SIZE} bytes each way in {elapsed:?}; per backend {per_backend:?}; \
         killed {killed}: its flows all ended within {slowest_end:?} of the kill"
    );
    assert_eq!(
        per_backend.len(),
        3,
        "flows should reach every backend: {per_backend:?}"
    );

    // New flows avoid the dead backend at once: the first ones whose choice it is
    // are refused there and fall back (a passive failure each); after `fall` of
    // those it is marked down. No client sees an error meanwhile.
    let labels = [("frontend", "web"), ("backend", killed.as_str())];
    assert_eq!(proxy.metric("lb_backend_up", &labels), Some(1.0));
    let mut new_flows = 0;
    wait_until(
        "passive failures to mark the killed backend down",
        READY_TIMEOUT,
        || {
            echo_roundtrip(frontend, &killed, new_flows);
            new_flows += 1;
            (proxy.metric("lb_backend_up", &labels) == Some(0.0)).then_some(())
        },
    );
    let errors = proxy
        .metric("lb_backend_connect_errors_total", &labels)
        .unwrap_or(0.0);
    assert!(
        errors >= 2.0,
        "the dead backend was marked down, yet {errors} connect errors were counted"
    );
    let refused = proxy
        .metric(
            "lb_backend_connect_errors_total",
            &[
                ("frontend", "web"),
                ("backend", &killed),
                ("reason", "refused"),
            ],
        )
        .unwrap_or(0.0);
    assert!(refused >= 2.0, "refused connects to {killed}: {refused}");
    // Once down, no connect to it is even tried.
    for i in 0..50 {
        echo_roundtrip(frontend, &killed, new_flows + i);
    }
    assert_eq!(
        proxy.metric("lb_backend_connect_errors_total", &labels),
        Some(errors),
        "connects were tried to a backend that is down"
    );
    assert_eq!(
        proxy.metric("lb_frontend_no_backend_total", &[("frontend", "web")]),
        Some(0.0),
        "a client was reset for want of a backend"
    );
    eprintln!("{new_flows} new flows until {killed} was marked down ({errors} connect errors)");
}

/// One short flow through `frontend`: served by a live backend (not `dead`),
/// bytes echoed exactly. Returns the backend's name.
fn echo_roundtrip(frontend: SocketAddr, dead: &str, i: usize) -> String {
    let mut s = connect(frontend).unwrap_or_else(|e| panic!("new flow #{i}: connect: {e}"));
    roundtrip_on(&mut s, dead, &format!("new flow #{i}"))
}

fn roundtrip_on(s: &mut TcpStream, dead: &str, what: &str) -> String {
    let name = read_line(s).unwrap_or_else(|e| panic!("{what}: greeting: {e}"));
    assert_ne!(name, dead, "{what} reached the dead backend");
    let payload = format!("{what} says hello\n");
    s.write_all(payload.as_bytes())
        .unwrap_or_else(|e| panic!("{what}: write: {e}"));
    let rest = lb_tests::finish(s).unwrap_or_else(|e| panic!("{what}: read: {e}"));
    assert_eq!(rest, payload.as_bytes(), "{what}: echo differs");
    name
}

/// A listener whose accept queue is full and never drained: the kernel drops
/// SYNs to it, so connects time out (nothing refuses them).
struct BlackHole {
    _listener: socket2::Socket,
    _fill: Vec<socket2::Socket>,
    addr: SocketAddr,
}

impl BlackHole {
    fn new() -> BlackHole {
        let listener = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .expect("socket");
        listener
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind");
        listener.listen(1).expect("listen");
        let addr = listener
            .local_addr()
            .expect("local addr")
            .as_socket()
            .expect("inet");
        // Fill the queue: connect until a connect times out (a dropped SYN).
        let mut fill = Vec::new();
        loop {
            assert!(fill.len() < 16, "the accept queue of {addr} never filled");
            let s = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )
            .expect("socket");
            match s.connect_timeout(&addr.into(), Duration::from_millis(300)) {
                Ok(()) => fill.push(s),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => break,
                Err(e) => panic!("filling {addr}'s accept queue: {e}"),
            }
        }
        assert!(!fill.is_empty(), "not one connect to {addr} completed");
        BlackHole {
            _listener: listener,
            _fill: fill,
            addr,
        }
    }

    /// Whether a connect to it times out right now (rather than completing or
    /// being refused).
    fn times_out(&self, timeout: Duration) -> bool {
        match TcpStream::connect_timeout(&self.addr, timeout) {
            Ok(_) => false,
            Err(e) => e.kind() == io::ErrorKind::TimedOut,
        }
    }
}

#[test]
fn flows_fall_back_from_a_black_holed_backend_within_the_connect_timeout() {
    fall_back_from_a_black_hole("");
}

/// The io_uring engine's connect timeout (the flow machine's deadline on
/// the ring loop's timers) and fallback, to the same bounds.
#[test]
fn flows_fall_back_from_a_black_holed_backend_on_the_io_uring_engine() {
    fall_back_from_a_black_hole("engine = \"io-uring\"\n");
}

/// Flows whose first choice is a black hole, on a frontend with `engine`
/// (a settings line, or nothing for the default): each waits out one
/// connect timeout at most, then its next choice serves it.
fn fall_back_from_a_black_hole(engine: &str) {
    const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
    /// Flows whose first choice is the black hole.
    const K: usize = 6;
    let hole = BlackHole::new();
    // Linux drops a SYN to a full accept queue (tcp_abort_on_overflow=0): the
    // connect times out rather than being refused. Check that holds here.
    let t = Instant::now();
    assert!(
        hole.times_out(Duration::from_millis(300)),
        "a connect to the full accept queue of {} did not time out",
        hole.addr
    );
    assert!(t.elapsed() >= Duration::from_millis(250));

    let a = Backend::echo("a");
    let b = Backend::echo("b");
    // No probes (and an hour's hold-down once passive failures mark it down).
    let settings = format!(
        "{engine}distribution = \"Default\"\nconnect_timeout = \"{}ms\"\nconnect_retries = 2\n\
         [frontends.health]\nkind = \"none\"\ninterval = \"1h\"\nfall = 2\nrise = 2",
        CONNECT_TIMEOUT.as_millis()
    );
    let proxy = Proxy::run(&one_frontend_config(
        "web",
        &settings,
        &[a.toml(), b.toml(), backend_toml("hole", hole.addr)],
    ));
    let frontend = proxy.frontend("web");

    // Source addresses whose first choice is the black hole, found before any
    // flow so they describe the table with it up.
    let mut rng = SeededStream::new(0xb1ac_401e);
    let mut picked = Vec::new();
    let mut asked = 0;
    while picked.len() < K {
        asked += 1;
        assert!(asked < 2000, "no source address maps to the black hole");
        let r = rng.next_u64();
        let ip = Ipv4Addr::new(
            127,
            1 + (r % 254) as u8,
            (r >> 8) as u8,
            1 + ((r >> 16) % 254) as u8,
        );
        let client = BoundClient::new(ip).expect("bind a client");
        let e = proxy.explain("web", client.local);
        if e["backend"]["name"] == "hole" {
            let next = e["fallbacks"][0]["name"]
                .as_str()
                .unwrap_or_else(|| panic!("no fallback in {e}"))
                .to_owned();
            picked.push((client, next));
        }
    }

    let labels = [("frontend", "web"), ("backend", "hole")];
    let mut served = BTreeSet::new();
    let mut timings = Vec::new();
    for (i, (client, next)) in picked.into_iter().enumerate() {
        let what = format!("flow #{i} from {}", client.local);
        let t = Instant::now();
        let mut s = client
            .connect(frontend)
            .unwrap_or_else(|e| panic!("{what}: connect: {e}"));
        let name = roundtrip_on(&mut s, "hole", &what);
        let took = t.elapsed();
        timings.push(took);
        // At most one connect timeout (then the fallback answers), plus slack.
        assert!(
            took <= CONNECT_TIMEOUT + Duration::from_secs(3),
            "{what} took {took:?}"
        );
        if i == 0 {
            // The first flow met the black hole: it waited out the connect
            // timeout, then got its next choice.
            assert!(
                took >= CONNECT_TIMEOUT * 9 / 10,
                "{what} took only {took:?}"
            );
            assert_eq!(name, next, "{what}: not its next choice");
        }
        served.insert(name);
    }
    let hole_timeouts = || {
        proxy
            .metric(
                "lb_backend_connect_errors_total",
                &[
                    ("frontend", "web"),
                    ("backend", "hole"),
                    ("reason", "timeout"),
                ],
            )
            .unwrap_or(0.0)
    };
    let timeouts = hole_timeouts();
    assert!(timeouts >= 1.0, "no connect timeout counted for the hole");
    // Two timeouts (fall = 2) mark it down; later flows go straight to a live one.
    proxy.wait_metric("lb_backend_up", &labels, READY_TIMEOUT, |v| v == 0.0);
    // Counted before marking down; a flow already connecting then may add one more each.
    let timeouts = hole_timeouts();
    assert!(
        (2.0..=K as f64).contains(&timeouts),
        "{timeouts} connect timeouts to the hole (fall = 2, {K} flows)"
    );
    assert_eq!(
        proxy.metric("lb_frontend_no_backend_total", &[("frontend", "web")]),
        Some(0.0),
        "a client was reset for want of a backend"
    );
    eprintln!("{K} flows meant for the black hole, served by {served:?}; took {timings:?}");
}
