//! `/explain` tells the truth: for 1000 seeded-random flows in each Azure
//! distribution mode, the backend it names is the one the data plane picks.
//! Also the shape of `/backends`.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::thread;
use std::time::Duration;

use lb_tests::{
    connect, read_line, wait_until, Backend, Proxy, SeededStream, IO_TIMEOUT, READY_TIMEOUT,
};
use serde_json::{json, Value};

const FLOWS_PER_MODE: usize = 1000;

/// (frontend name, Azure distribution, hashed fields).
const MODES: [(&str, &str, [bool; 5]); 3] = [
    ("five", "Default", [true, true, true, true, true]),
    (
        "three",
        "SourceIPProtocol",
        [true, false, true, false, true],
    ),
    ("two", "SourceIP", [true, false, true, false, false]),
];

/// A small seeded generator (the harness's SplitMix64 stream), so failures replay.
struct Rng(SeededStream);

impl Rng {
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.0.next_u64() % (hi - lo + 1)
    }

    /// 127.A.B.C with A in 1..=254 (never 127.0.x.x) and C in 1..=254.
    fn client_ip(&mut self) -> Ipv4Addr {
        Ipv4Addr::new(
            127,
            self.range(1, 254) as u8,
            self.range(0, 255) as u8,
            self.range(1, 254) as u8,
        )
    }

    fn port(&mut self) -> u16 {
        self.range(1024, 65_000) as u16
    }
}

/// A socket bound to `ip` and a random port (another one on EADDRINUSE).
fn bind_random_port(ip: Ipv4Addr, rng: &mut Rng) -> (socket2::Socket, SocketAddr) {
    for _ in 0..50 {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .expect("socket");
        let addr = SocketAddr::new(IpAddr::V4(ip), rng.port());
        match socket.bind(&addr.into()) {
            Ok(()) => return (socket, addr),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
            Err(e) => panic!("bind {addr}: {e}"),
        }
    }
    panic!("no free port on {ip} after 50 tries");
}

fn connect_bound(socket: socket2::Socket, to: SocketAddr) -> TcpStream {
    socket
        .connect_timeout(&to.into(), IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect to {to}: {e}"));
    let s: TcpStream = socket.into();
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    s.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
    s
}

/// One balancer, three frontends (one per mode), each over the same backends.
fn config(backends: &[Backend], weights: &[u32]) -> String {
    let mut s = String::from("workers = 2\n\n[admin]\nlisten = \"127.0.0.1:0\"\n");
    for (name, distribution, _) in MODES {
        s += &format!(
            "\n[[frontends]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\n\
             distribution = \"{distribution}\"\n\n\
             [frontends.health]\nkind = \"tcp\"\ninterval = \"1s\"\n"
        );
        for (b, w) in backends.iter().zip(weights) {
            s += &format!("\n{}weight = {w}\n", b.toml());
        }
    }
    s
}

fn three_backends() -> Vec<Backend> {
    ["a", "b", "c"].iter().map(|n| Backend::echo(n)).collect()
}

/// Every backend of every frontend is healthy in `/backends`.
fn wait_all_healthy(proxy: &Proxy) {
    wait_until("every backend to be healthy", READY_TIMEOUT, || {
        let (status, body) = proxy.admin_get("/backends");
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).expect("/backends JSON");
        v["frontends"]
            .as_array()?
            .iter()
            .flat_map(|f| f["backends"].as_array().cloned().unwrap_or_default())
            .all(|b| b["healthy"] == true)
            .then_some(())
    });
}

fn check_hash(hash: &Value, what: &str) -> u64 {
    let h = hash
        .as_str()
        .unwrap_or_else(|| panic!("{what}: hash {hash}"));
    let hex = h
        .strip_prefix("0x")
        .unwrap_or_else(|| panic!("{what}: hash {h} lacks 0x"));
    assert_eq!(hex.len(), 16, "{what}: hash {h} is not 16 hex digits");
    assert!(
        hex.chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)),
        "{what}: hash {h} is not lower-case hex"
    );
    u64::from_str_radix(hex, 16).expect("hex")
}

/// Runs `FLOWS_PER_MODE` flows through frontend `name`; returns flows per backend.
fn check_mode(proxy: &Proxy, mode: (&str, &str, [bool; 5]), seed: u64) -> BTreeMap<String, usize> {
    let (name, distribution, f) = mode;
    let frontend = proxy.frontend(name);
    let hashed = json!({
        "src_ip": f[0], "src_port": f[1], "dst_ip": f[2], "dst_port": f[3], "proto": f[4],
    });
    let mut rng = Rng(SeededStream::new(seed));
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    let mut hashes = BTreeSet::new();
    for i in 0..FLOWS_PER_MODE {
        let ip = rng.client_ip();
        let (socket, src) = bind_random_port(ip, &mut rng);
        let what = format!("{name} ({distribution}) flow #{i} from {src}");

        let e = proxy.explain(name, src);
        assert_eq!(e["frontend"], name, "{what}: {e}");
        assert_eq!(e["distribution"], distribution, "{what}: {e}");
        assert_eq!(e["hashed_fields"], hashed, "{what}: {e}");
        assert_eq!(e["flow"]["src"], src.to_string(), "{what}: {e}");
        assert_eq!(e["flow"]["dst"], frontend.to_string(), "{what}: {e}");
        assert_eq!(e["flow"]["proto"], "tcp", "{what}: {e}");
        let hash = check_hash(&e["hash"], &what);
        hashes.insert(hash);
        let slot = e["slot"].as_u64().expect("slot");
        let size = e["table_size"].as_u64().expect("table_size");
        assert!(slot < size, "{what}: slot {slot} >= table_size {size}");
        let expected = e["backend"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no backend in {e}"))
            .to_owned();

        let mut c = connect_bound(socket, frontend);
        let got = read_line(&mut c).unwrap_or_else(|err| panic!("{what}: {err}"));
        drop(c);
        assert_eq!(
            got, expected,
            "{what}: the data plane chose {got}, /explain said {expected}: {e}"
        );
        *served.entry(got).or_default() += 1;

        // Ports: the hash ignores them exactly when the mode says so.
        if i < 20 {
            // Naming the frontend's address and the protocol changes nothing.
            let (status, body) = proxy.admin_get(&format!(
                "/explain?frontend={name}&src={src}&dst={frontend}&proto=tcp"
            ));
            assert_eq!(status, 200, "{what}: {body}");
            let full: Value = serde_json::from_str(&body).expect("explain JSON");
            assert_eq!(full["hash"], e["hash"], "{what}: explicit dst/proto");
            assert_eq!(full["backend"], e["backend"], "{what}: explicit dst/proto");
            let other = SocketAddr::new(src.ip(), src.port() ^ 0x5a5a);
            let o = proxy.explain(name, other);
            let other_hash = check_hash(&o["hash"], &what);
            if f[1] {
                assert_ne!(other_hash, hash, "{what}: port {other} hashes the same");
            } else {
                assert_eq!(
                    other_hash, hash,
                    "{what}: {distribution} must give one hash per client IP ({other})"
                );
                assert_eq!(o["backend"], e["backend"], "{what}: {other}");
                assert_eq!(o["slot"], e["slot"], "{what}: {other}");
            }
        }
    }
    assert!(
        hashes.len() > FLOWS_PER_MODE * 9 / 10,
        "{name}: only {} distinct hashes for {FLOWS_PER_MODE} random flows",
        hashes.len()
    );
    served
}

#[test]
fn explain_matches_the_data_plane_for_random_flows_in_every_mode() {
    let backends = three_backends();
    let proxy = Proxy::run(&config(&backends, &[1, 1, 1]));
    wait_all_healthy(&proxy);
    let started = std::time::Instant::now();

    let results: Vec<(String, BTreeMap<String, usize>)> = thread::scope(|s| {
        let handles: Vec<_> = MODES
            .iter()
            .enumerate()
            .map(|(k, &mode)| {
                let proxy = &proxy;
                s.spawn(move || {
                    (
                        mode.0.to_owned(),
                        check_mode(proxy, mode, 0xe1a1_0000 + k as u64),
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("mode thread"))
            .collect()
    });
    eprintln!(
        "{} flows checked in {:?}: {results:?}",
        FLOWS_PER_MODE * MODES.len(),
        started.elapsed()
    );
    for (name, served) in &results {
        assert_eq!(served.values().sum::<usize>(), FLOWS_PER_MODE);
        assert_eq!(
            served.len(),
            3,
            "{name}: random client IPs should reach every backend: {served:?}"
        );
        // Each mode's per-backend flow count matches the balancer's own counter.
        for (backend, n) in served {
            let labels = [("frontend", name.as_str()), ("backend", backend.as_str())];
            proxy.wait_metric(
                "lb_backend_connections_total",
                &labels,
                Duration::from_secs(5),
                |v| v == *n as f64,
            );
        }
    }
}

#[test]
fn explain_rejects_bad_queries() {
    let backends = three_backends();
    let proxy = Proxy::run(&config(&backends, &[1, 1, 1]));
    for path in [
        "/explain?frontend=nope&src=127.1.2.3:4000",
        "/explain?frontend=five",
        "/explain?frontend=five&src=not-an-address",
        "/explain?src=127.1.2.3:4000",
    ] {
        let (status, body) = proxy.admin_get(path);
        assert_eq!(status, 400, "{path}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(v["error"].is_string(), "{path}: {body}");
    }
}

#[test]
fn backends_endpoint_has_the_documented_shape() {
    let backends = three_backends();
    let weights = [1u32, 2, 1];
    let proxy = Proxy::run(&config(&backends, &weights));
    wait_all_healthy(&proxy);

    // One connection held open on frontend "two", to see it in active_connections.
    let mut held = connect(proxy.frontend("two")).expect("connect");
    let holder = read_line(&mut held).expect("name line");
    let v: Value = wait_until(
        "/backends to show the open connection",
        READY_TIMEOUT,
        || {
            let (status, body) = proxy.admin_get("/backends");
            assert_eq!(status, 200, "{body}");
            let v: Value = serde_json::from_str(&body).expect("/backends JSON");
            let two = v["frontends"]
                .as_array()?
                .iter()
                .find(|f| f["name"] == "two")?
                .clone();
            let open = two["backends"]
                .as_array()?
                .iter()
                .find(|b| b["name"] == holder.as_str())?["active_connections"]
                .as_u64()?;
            (open == 1).then_some(v)
        },
    );

    let frontends = v["frontends"].as_array().expect("frontends array");
    assert_eq!(frontends.len(), MODES.len(), "{v}");
    let weight_sum: u32 = weights.iter().sum();
    for (name, distribution, _) in MODES {
        let fe = frontends
            .iter()
            .find(|f| f["name"] == name)
            .unwrap_or_else(|| panic!("no frontend {name} in {v}"));
        assert_eq!(fe["distribution"], distribution, "{fe}");
        assert_eq!(fe["listen"], proxy.frontend(name).to_string(), "{fe}");
        assert!(fe["generation"].as_u64().is_some(), "generation: {fe}");
        let table_size = fe["table_size"].as_u64().expect("table_size");
        assert!(table_size > 0, "{fe}");
        let list = fe["backends"].as_array().expect("backends array");
        assert_eq!(list.len(), backends.len(), "{fe}");

        let mut slots = 0u64;
        let mut share = 0.0f64;
        for (b, &w) in backends.iter().zip(&weights) {
            let e = list
                .iter()
                .find(|e| e["name"] == b.name.as_str())
                .unwrap_or_else(|| panic!("{name}: no backend {} in {fe}", b.name));
            assert_eq!(e["address"], b.addr.to_string(), "{e}");
            assert_eq!(e["weight"], w, "{e}");
            assert_eq!(e["healthy"], true, "{e}");
            let active = e["active_connections"]
                .as_u64()
                .unwrap_or_else(|| panic!("active_connections: {e}"));
            let want_active = u64::from(name == "two" && b.name == holder);
            assert_eq!(active, want_active, "{name}/{}: {e}", b.name);
            let s = e["table_slots"]
                .as_u64()
                .unwrap_or_else(|| panic!("table_slots: {e}"));
            let expected = e["expected_share"]
                .as_f64()
                .unwrap_or_else(|| panic!("expected_share: {e}"));
            let want = f64::from(w) / f64::from(weight_sum);
            assert!(
                (expected - want).abs() < 1e-9,
                "{name}/{}: expected_share {expected}, weight share {want}",
                b.name
            );
            // Weighted Maglev gives each backend about its weight's share of slots.
            let table_share = s as f64 / table_size as f64;
            assert!(
                (table_share - want).abs() < 0.02,
                "{name}/{}: {s} of {table_size} slots for weight share {want}",
                b.name
            );
            slots += s;
            share += expected;
        }
        assert_eq!(slots, table_size, "{name}: table_slots sum to table_size");
        assert!((share - 1.0).abs() < 1e-9, "{name}: shares sum to {share}");
    }
    drop(held);
}
