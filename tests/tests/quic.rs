//! QUIC end to end, with quinn on both ends: three `lb-bench serve quic:`
//! backends whose connection IDs carry their QUIC-LB server IDs, a quinn
//! client (lb_bench::quic) in this process, `lb-proxy` between them.
//!
//! - In QUIC mode a client that rebinds mid-connection (`Endpoint::rebind`,
//!   as after a NAT rebinding) to a port that the 5-tuple hash sends
//!   elsewhere stays on its backend, which sees the balancer's new upstream
//!   address for it.
//! - Through a plain UDP frontend (5-tuple hash) the same migration, to a port
//!   that lb-core's own table sends to another backend, breaks the connection:
//!   the reason QUIC mode exists, shown rather than left to chance.
//! - A CID whose backend is down falls back, counted as `backend_down`.
//! - Garbage datagrams on a QUIC frontend are counted and dropped; the
//!   backends never see them.
//! - `/explain?...&cid=HEX` decodes the server ID and names the routing step.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use lb_bench::quic;
use lb_bench::serve::{InProcess, ServerSpec};
use lb_core::{Classifier, DatagramKind, DistributionMode, QuicLbConfig, ServerId, Unroutable};
use lb_tests::udp::{bind_routed, frontend_config, quic_backend_toml, RoutingModel, UdpClient};
use lb_tests::{backend_toml, Backend, Proxy, SeededStream, NO_PROBES};

const FRONTEND: &str = "quic";
/// (backend name, server ID): config 0, 3-byte server IDs, 4-byte nonces.
const NODES: [(&str, &str); 3] = [
    ("node-1", "010101"),
    ("node-2", "020202"),
    ("node-3", "030303"),
];
const NAMES: [&str; 3] = ["node-1", "node-2", "node-3"];
const QUIC_LB: &str = "[frontends.quic]\nconfig_id = 0\nserver_id_length = 3\nnonce_length = 4";
/// One QUIC step (handshake, request) on loopback, on a busy machine.
const STEP: Duration = Duration::from_secs(10);
/// How long a request after a migration to the wrong backend may hang
/// before the test counts it as failed (quinn's idle timeout is 30 s).
const BROKEN_WITHIN: Duration = Duration::from_secs(3);
const WAIT: Duration = Duration::from_secs(10);

fn quic_config(backends: &[String]) -> String {
    quic_config_with_health(NO_PROBES, backends)
}

/// A QUIC frontend with `health` (a `[frontends.health]` table).
fn quic_config_with_health(health: &str, backends: &[String]) -> String {
    let settings =
        format!("protocol = \"quic\"\ndistribution = \"Default\"\n{health}\n\n{QUIC_LB}");
    frontend_config(2, FRONTEND, &settings, backends)
}

/// A plain UDP frontend (Default: 5-tuple) in front of the same backends.
fn udp_config(backends: &[String]) -> String {
    let settings = format!("protocol = \"udp\"\ndistribution = \"Default\"\n{NO_PROBES}");
    frontend_config(2, FRONTEND, &settings, backends)
}

fn quic_backends() -> Vec<Backend> {
    NODES.iter().map(|(n, sid)| Backend::quic(n, sid)).collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Awaits one QUIC step, bounded by [`STEP`]; panics naming `what` on error.
async fn step<T, E: std::fmt::Display>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> T {
    match tokio::time::timeout(STEP, f).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("{what}: {e}"),
        Err(_) => panic!("{what}: no answer within {STEP:?}"),
    }
}

fn client_socket() -> UdpSocket {
    UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a client socket")
}

fn metric(proxy: &Proxy, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut all = vec![("frontend", FRONTEND)];
    all.extend_from_slice(labels);
    proxy.metric(name, &all).unwrap_or(0.0)
}

/// `lb_backend_udp_flows_total` for each of [`NAMES`].
fn flows_per_backend(proxy: &Proxy) -> Vec<f64> {
    NAMES
        .iter()
        .map(|b| metric(proxy, "lb_backend_udp_flows_total", &[("backend", b)]))
        .collect()
}

#[test]
fn in_quic_mode_a_client_that_rebinds_keeps_its_backend() {
    let backends = quic_backends();
    let tables: Vec<String> = backends
        .iter()
        .zip(NODES)
        .map(|(b, (name, sid))| quic_backend_toml(name, b.addr, sid))
        .collect();
    let proxy = Proxy::run(&quic_config(&tables));
    let frontend = proxy.frontend(FRONTEND);

    let rt = runtime();
    let (name, seen_before, seen_after, new_local) = rt.block_on(async {
        let ep = quic::client_endpoint(client_socket()).expect("client endpoint");
        let conn = step("connect through the balancer", quic::connect(&ep, frontend)).await;
        let (name, seen_before) = step("whoami", quic::whoami(&conn)).await;
        let body: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(step("echo", quic::request(&conn, &body)).await, body);

        // NAT rebinding: the same connection from a new port, one that the
        // 5-tuple hash sends to another backend, so only the CID keeps it.
        let model = RoutingModel::new(&NAMES, DistributionMode::FiveTuple);
        let moved = bind_routed(&model, Ipv4Addr::LOCALHOST, frontend, 200, |b| {
            b.is_some() && b != Some(name.as_str())
        });
        let new_local = moved.local_addr().expect("local_addr");
        ep.rebind(moved).expect("rebind");
        let (name_after, seen_after) = step("whoami after the rebind", quic::whoami(&conn)).await;
        assert_eq!(name_after, name, "the connection moved to another backend");
        assert_eq!(
            step("echo after the rebind", quic::request(&conn, b"still here")).await,
            b"still here"
        );
        conn.close(0u32.into(), b"done");
        (name, seen_before, seen_after, new_local)
    });
    eprintln!(
        "{name} saw the client as {seen_before}, then {seen_after} after it moved to {new_local}"
    );
    assert!(NAMES.contains(&name.as_str()), "whoami named {name}");
    // The backend followed the client to the balancer's new upstream for the
    // new 4-tuple (SNAT: the balancer's address, not the client's).
    assert_ne!(
        seen_after, seen_before,
        "the backend still sees the old path"
    );
    assert_ne!(
        seen_after, new_local,
        "under SNAT the backend sees the balancer"
    );

    // Both 4-tuples were flows on that one backend.
    let flows = flows_per_backend(&proxy);
    let mut want = vec![0.0; 3];
    want[NAMES.iter().position(|n| *n == name).expect("name")] = 2.0;
    assert_eq!(flows, want, "UDP flows per backend ({NAMES:?})");

    assert_routing_steps_counted(&proxy);
}

/// How a quinn connection's datagrams were routed: the Initial by the hash
/// (a client-chosen CID), everything after the handshake by the server ID
/// in the CID; no other fallback; every label exported from the start.
fn assert_routing_steps_counted(proxy: &Proxy) {
    assert!(metric(proxy, "lb_quic_routed_total", &[("by", "cid")]) > 0.0);
    assert!(metric(proxy, "lb_quic_routed_total", &[("by", "hash")]) >= 1.0);
    assert!(
        metric(
            proxy,
            "lb_quic_unroutable_total",
            &[("reason", "client_chosen")]
        ) >= 1.0
    );
    let m = proxy.metrics();
    for by in ["cid", "flow", "hash"] {
        assert!(
            m.get(
                "lb_quic_routed_total",
                &[("frontend", FRONTEND), ("by", by)]
            )
            .is_some(),
            "lb_quic_routed_total{{by=\"{by}\"}} is not exported"
        );
    }
    for reason in Unroutable::ALL {
        let labels = [("frontend", FRONTEND), ("reason", reason.as_str())];
        assert!(
            m.get("lb_quic_unroutable_total", &labels).is_some(),
            "lb_quic_unroutable_total{{reason=\"{}\"}} is not pre-created",
            reason.as_str()
        );
    }
    for reason in [
        "unroutable_config",
        "unknown_config",
        "short_cid",
        "unknown_server_id",
        "backend_down",
        "not_quic",
    ] {
        assert_eq!(
            metric(proxy, "lb_quic_unroutable_total", &[("reason", reason)]),
            0.0,
            "{reason}: a quinn client and quinn servers with matching IDs"
        );
    }
}

#[test]
fn through_a_plain_udp_frontend_the_same_rebind_lands_elsewhere_and_breaks() {
    let backends = quic_backends();
    let tables: Vec<String> = backends.iter().map(Backend::toml).collect();
    let proxy = Proxy::run(&udp_config(&tables));
    let frontend = proxy.frontend(FRONTEND);
    let model = RoutingModel::new(&NAMES, DistributionMode::FiveTuple);

    let rt = runtime();
    let (first, new_backend, outcome) = rt.block_on(async {
        let ep = quic::client_endpoint(client_socket()).expect("client endpoint");
        let local = ep.local_addr().expect("local_addr");
        let conn = step("connect through the balancer", quic::connect(&ep, frontend)).await;
        let (first, _) = step("whoami", quic::whoami(&conn)).await;
        assert_eq!(
            model.backend(local, frontend),
            Some(first.as_str()),
            "lb-core's table and the balancer disagree on {local}'s backend"
        );

        // A new port that the 5-tuple hash sends to another backend.
        let moved = bind_routed(&model, Ipv4Addr::LOCALHOST, frontend, 200, |b| {
            b.is_some() && b != Some(first.as_str())
        });
        let new_local = moved.local_addr().expect("local_addr");
        let new_backend = model
            .backend(new_local, frontend)
            .expect("a backend")
            .to_owned();
        ep.rebind(moved).expect("rebind");
        let outcome = tokio::time::timeout(BROKEN_WITHIN, quic::request(&conn, b"anyone?")).await;
        (
            first,
            new_backend,
            outcome.map(|r| r.map_err(|e| e.to_string())),
        )
    });
    eprintln!("the connection began on {first}; after the rebind the hash sent it to {new_backend}: {outcome:?}");
    // Timed out, or failed outright: either way the connection is gone.
    if let Ok(Ok(answer)) = outcome {
        panic!(
            "the request after the rebind was answered ({:?}): the connection survived a 5-tuple move to {new_backend}",
            String::from_utf8_lossy(&answer)
        );
    }
    // The new path was a new flow on the other backend.
    let mut want = vec![0.0; 3];
    want[NAMES.iter().position(|n| *n == first).expect("name")] = 1.0;
    want[NAMES.iter().position(|n| *n == new_backend).expect("name")] = 1.0;
    proxy.wait_metric(
        "lb_backend_udp_flows_total",
        &[("frontend", FRONTEND), ("backend", new_backend.as_str())],
        WAIT,
        |v| v == 1.0,
    );
    assert_eq!(
        flows_per_backend(&proxy),
        want,
        "UDP flows per backend ({NAMES:?})"
    );
}

#[test]
fn a_cid_of_a_backend_that_is_down_falls_back_counted_as_backend_down() {
    let mut backends = quic_backends();
    let tables: Vec<String> = backends
        .iter()
        .zip(NODES)
        .map(|(b, (name, sid))| quic_backend_toml(name, b.addr, sid))
        .collect();
    // TCP probes on each backend's port: quic backends answer them over HTTP.
    let health = "[frontends.health]\nkind = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"200ms\"\nrise = 2\nfall = 2";
    let proxy = Proxy::run(&quic_config_with_health(health, &tables));
    let frontend = proxy.frontend(FRONTEND);
    for name in NAMES {
        proxy.wait_metric(
            "lb_backend_up",
            &[("frontend", FRONTEND), ("backend", name)],
            WAIT,
            |v| v == 1.0,
        );
    }

    let rt = runtime();
    let ep =
        rt.block_on(async { quic::client_endpoint(client_socket()).expect("client endpoint") });
    let conn = rt.block_on(step(
        "connect through the balancer",
        quic::connect(&ep, frontend),
    ));
    let (name, _) = rt.block_on(step("whoami", quic::whoami(&conn)));
    let i = NAMES
        .iter()
        .position(|n| *n == name)
        .expect("a configured backend");
    backends[i].kill();
    proxy.wait_metric(
        "lb_backend_up",
        &[("frontend", FRONTEND), ("backend", name.as_str())],
        WAIT,
        |v| v == 0.0,
    );
    assert_eq!(
        metric(
            &proxy,
            "lb_quic_unroutable_total",
            &[("reason", "backend_down")]
        ),
        0.0
    );

    // The client's next packets carry the down backend's CID: they fall back
    // (to the flow table, whose flow moved off the down backend), counted.
    let outcome = rt.block_on(async {
        tokio::time::timeout(BROKEN_WITHIN, quic::request(&conn, b"anyone?")).await
    });
    assert!(
        !matches!(outcome, Ok(Ok(_))),
        "a request was answered by a backend that is down"
    );
    proxy.wait_metric(
        "lb_quic_unroutable_total",
        &[("frontend", FRONTEND), ("reason", "backend_down")],
        WAIT,
        |v| v >= 1.0,
    );
    proxy.wait_metric(
        "lb_udp_flows_moved_total",
        &[("frontend", FRONTEND)],
        WAIT,
        |v| v >= 1.0,
    );
    drop(conn);
    rt.block_on(async { drop(ep) });
}

/// `n` datagrams that lb-core's classifier calls not QUIC, from a seeded stream.
fn not_quic_datagrams(n: usize) -> Vec<Vec<u8>> {
    let mut rng = SeededStream::new(11);
    let mut classifier = Classifier::new();
    let mut out = Vec::new();
    for _ in 0..10_000 {
        if out.len() == n {
            break;
        }
        let mut d = vec![0u8; 1 + (rng.next_u64() % 40) as usize];
        rng.fill(&mut d);
        if classifier.classify(&d).kind == DatagramKind::NotQuic {
            out.push(d);
        }
    }
    assert_eq!(out.len(), n, "not-QUIC datagrams found in 10,000 tries");
    out
}

#[test]
fn garbage_on_a_quic_frontend_is_counted_and_dropped() {
    const GARBAGE: usize = 25;
    // udp-echo backends in process: their own counts show what reached them.
    let specs: Vec<ServerSpec> = NAMES
        .iter()
        .map(|n| format!("udp-echo:{n}=127.0.0.1:0").parse().expect("spec"))
        .collect();
    let echo = InProcess::start(&specs).expect("start the backends");
    let tables: Vec<String> = NODES
        .iter()
        .map(|(n, sid)| quic_backend_toml(n, echo.addr(n).expect("bound"), sid))
        .collect();
    let proxy = Proxy::run(&quic_config(&tables));
    let client = UdpClient::connect(Ipv4Addr::new(127, 0, 0, 2), proxy.frontend(FRONTEND));

    for d in not_quic_datagrams(GARBAGE) {
        client.send(&d);
    }
    let n = GARBAGE as f64;
    proxy.wait_metric(
        "lb_quic_unroutable_total",
        &[("frontend", FRONTEND), ("reason", "not_quic")],
        WAIT,
        |v| v == n,
    );
    proxy.wait_metric(
        "lb_udp_dropped_datagrams_total",
        &[("frontend", FRONTEND), ("reason", "not_quic")],
        WAIT,
        |v| v == n,
    );
    assert_eq!(
        metric(&proxy, "lb_frontend_received_datagrams_total", &[]),
        n
    );
    for name in NAMES {
        let counts = echo.counts(name).expect("counts");
        assert_eq!(
            counts.datagrams.load(std::sync::atomic::Ordering::Relaxed),
            0,
            "{name} received garbage"
        );
        assert_eq!(
            metric(
                &proxy,
                "lb_backend_sent_datagrams_total",
                &[("backend", name)]
            ),
            0.0
        );
    }
    assert_eq!(
        flows_per_backend(&proxy),
        vec![0.0; 3],
        "garbage made flows"
    );
    assert_eq!(client.try_recv(), None, "garbage was answered");
}

/// `bytes` as lowercase hex.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn explain_with_a_cid_decodes_the_server_id_and_names_the_step() {
    // No traffic flows: the backends' addresses only have to be distinct.
    let tables: Vec<String> = NODES
        .iter()
        .enumerate()
        .map(|(i, (n, sid))| {
            let addr: SocketAddr = format!("127.0.0.1:{}", 9101 + i).parse().expect("addr");
            quic_backend_toml(n, addr, sid)
        })
        .collect();
    let proxy = Proxy::run(&quic_config(&tables));
    let frontend = proxy.frontend(FRONTEND);
    let src: SocketAddr = "127.0.0.2:40000".parse().expect("addr");
    let lb = QuicLbConfig::new(0, 3, 4).expect("config");
    let explain =
        |cid: &str| proxy.explain_query(&format!("frontend={FRONTEND}&src={src}&cid={cid}"));

    // A CID of node-2's: routed by the CID.
    let cid = lb
        .encode(&ServerId::from_hex("020202").expect("sid"), &[1, 2, 3, 4])
        .expect("encode");
    let e = explain(&hex(&cid));
    assert_eq!(e["protocol"], "quic", "{e}");
    assert_eq!(e["frontend"], FRONTEND, "{e}");
    assert_eq!(e["flow"]["src"], src.to_string(), "{e}");
    assert_eq!(e["flow"]["proto"], "udp", "{e}");
    assert_eq!(e["cid"]["config_id"], 0, "{e}");
    assert_eq!(e["cid"]["server_id"], "020202", "{e}");
    assert_eq!(e["cid"]["backend"], "node-2", "{e}");
    assert_eq!(e["cid"]["route"], "cid", "{e}");
    assert_eq!(
        e["backend"]["name"], "node-2",
        "the CID's backend wins: {e}"
    );

    // A server ID no backend has: the fallback, with its reason; the flow's
    // backend is then the hash's, as lb-core's table says.
    let unknown = lb
        .encode(&ServerId::from_hex("0f0f0f").expect("sid"), &[1, 2, 3, 4])
        .expect("encode");
    let e = explain(&hex(&unknown));
    assert_eq!(e["cid"]["server_id"], "0f0f0f", "{e}");
    assert_eq!(e["cid"]["route"], "fallback", "{e}");
    assert_eq!(e["cid"]["reason"], "unknown_server_id", "{e}");
    assert!(e["cid"]["backend"].is_null(), "{e}");
    let model = RoutingModel::new(&NAMES, DistributionMode::FiveTuple);
    assert_eq!(
        e["backend"]["name"],
        model.backend(src, frontend).expect("a backend"),
        "{e}"
    );

    // Config rotation 0b111 and a CID too short for the layout fall back too.
    let e = explain("e7020202010203");
    assert_eq!(e["cid"]["route"], "fallback", "{e}");
    assert_eq!(e["cid"]["reason"], "unroutable_config", "{e}");
    let e = explain("0702");
    assert_eq!(e["cid"]["route"], "fallback", "{e}");
    assert_eq!(e["cid"]["reason"], "short_cid", "{e}");

    // Not hex: a clear error.
    let (status, body) = proxy.admin_get(&format!("/explain?frontend={FRONTEND}&src={src}&cid=zz"));
    assert_eq!(status, 400, "{body}");
}

/// A UDP frontend's `/explain` names the protocol and hashes the flow as UDP.
#[test]
fn explain_answers_for_a_udp_frontend() {
    let tables: Vec<String> = NAMES
        .iter()
        .enumerate()
        .map(|(i, n)| backend_toml(n, format!("127.0.0.1:{}", 9201 + i).parse().expect("addr")))
        .collect();
    let proxy = Proxy::run(&udp_config(&tables));
    let frontend = proxy.frontend(FRONTEND);
    let model = RoutingModel::new(&NAMES, DistributionMode::FiveTuple);
    for port in [40_000u16, 40_001, 40_002, 40_003, 40_004, 40_005] {
        let src = SocketAddr::from((Ipv4Addr::new(127, 0, 0, 2), port));
        let e = proxy.explain(FRONTEND, src);
        assert_eq!(e["protocol"], "udp", "{e}");
        assert_eq!(e["flow"]["proto"], "udp", "{e}");
        assert_eq!(e["flow"]["dst"], frontend.to_string(), "{e}");
        assert_eq!(
            e["backend"]["name"],
            model.backend(src, frontend).expect("a backend"),
            "{e}"
        );
    }
}
