//! `copy = "sockmap"` end to end with the real binary: the kernel forwards
//! each flow (a BPF SOCKHASH and stream verdict), and everything the
//! userspace engines promise still holds: bytes exact both ways (by
//! SHA-256), bytes queued before the flow joined the map, half-close both
//! ways, the idle timeout with and without reset, exact byte metrics and
//! flow-log bytes, the drain on SIGTERM, and maps left empty
//! (`lb_sockmap_flows` back to 0). The fallback (the engine unavailable:
//! not root, or the `LB_PROXY_SOCKMAP_DISABLE` test hook) copies with `auto`
//! after one warning, with `lb_sockmap_available 0`.
//!
//! These need root and a kernel that allows sockmap (CI runs as root); the
//! engine's own availability is asserted, not assumed.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::thread;
use std::time::Duration;

use lb_tests::{
    accept_one, assert_exact_both_ways, assert_idle_timeouts_from_the_last_byte, backend_toml,
    connect, connect_refused, finish, hear_banner, idle_pair_config, one_frontend_config,
    read_line, serve_banner, wait_until, Backend, Proxy, BULK_LEN, NO_PROBES,
};

/// The engine's test hook, set in the fallback test's proxy's environment only.
const DISABLE_ENV: &str = "LB_PROXY_SOCKMAP_DISABLE";
const WAIT: Duration = Duration::from_secs(10);

/// Starts a balancer on `config`, with the engine available unless `disabled`.
fn start(
    config: &str,
    disabled: bool,
    flags: impl FnOnce(&std::path::Path) -> Vec<String>,
) -> Proxy {
    let env: &[(&str, &str)] = if disabled { &[(DISABLE_ENV, "1")] } else { &[] };
    Proxy::run_with_env(config, env, flags)
}

/// One frontend `web` with `copy = "sockmap"` (and `extra` settings) in front of `backend`.
fn sockmap_config(backend: SocketAddr, extra: &str) -> String {
    one_frontend_config(
        "web",
        &format!("copy = \"sockmap\"\n{extra}\n{NO_PROBES}"),
        &[backend_toml("t", backend)],
    )
}

/// The same, with `[admin] byte_metrics = true`.
fn counting_config(backend: SocketAddr) -> String {
    sockmap_config(backend, "").replacen("[admin]\n", "[admin]\nbyte_metrics = true\n", 1)
}

fn sockmap_proxy(backend: SocketAddr, extra: &str) -> Proxy {
    let proxy = start(&sockmap_config(backend, extra), false, |_| Vec::new());
    assert_eq!(
        proxy.metric("lb_sockmap_available", &[]),
        Some(1.0),
        "the engine should load here (root, kernel with sockmap): {}",
        proxy.stderr()
    );
    proxy
}

/// Waits until no flow is left in the engine's maps, and asserts the engine
/// (not the fallback) forwarded `flows` flows.
fn wait_maps_empty(proxy: &Proxy, flows: usize) {
    proxy.wait_metric("lb_sockmap_flows", &[], WAIT, |v| v == 0.0);
    assert_eq!(
        proxy.metric("lb_sockmap_forwarded_flows_total", &[]),
        Some(flows as f64),
        "flows the kernel forwarded"
    );
}

/// Waits until the byte metrics of `web`'s backend `t` read `sent` and `received`.
fn wait_bytes(proxy: &Proxy, sent: u64, received: u64) {
    proxy.wait_backend_bytes(
        &[("frontend", "web"), ("backend", "t")],
        sent,
        received,
        WAIT,
    );
}

/// 64 MiB each way at once, checked by SHA-256; the byte metrics count
/// exactly that, and the maps are empty afterwards.
#[test]
fn bulk_64_mib_each_way_arrives_byte_exact_and_is_counted() {
    const UP_SEED: u64 = 0x50c4_0001;
    const DOWN_SEED: u64 = 0x50c4_0002;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let proxy = start(
        &counting_config(listener.local_addr().unwrap()),
        false,
        |_| Vec::new(),
    );
    assert_eq!(proxy.metric("lb_sockmap_available", &[]), Some(1.0));
    assert_exact_both_ways(
        listener,
        proxy.frontend("web"),
        BULK_LEN,
        (UP_SEED, DOWN_SEED),
    );
    wait_bytes(&proxy, BULK_LEN as u64, BULK_LEN as u64);
    wait_maps_empty(&proxy, 1);
}

/// The byte metrics count a flow's bytes while it is still open (the
/// program keeps the counts; lb-proxy adds them as they grow), and its end
/// adds only the rest: the totals come out exact, not doubled.
#[test]
fn byte_metrics_count_an_open_flow_as_it_goes() {
    const LEN: usize = 1 << 20;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let proxy = start(
        &counting_config(listener.local_addr().unwrap()),
        false,
        |_| Vec::new(),
    );
    let mut c = connect(proxy.frontend("web")).expect("connect");
    let mut b = accept_one(&listener);
    let sink = thread::spawn(move || {
        let mut got = Vec::new();
        b.read_to_end(&mut got).map(|_| got.len())
    });
    c.write_all(&vec![0x5a; LEN]).expect("write");
    // The client has not closed: only the running flow's ticks can show these.
    wait_bytes(&proxy, LEN as u64, 0);
    assert_eq!(
        proxy.metric("lb_sockmap_flows", &[]),
        Some(1.0),
        "the flow should still be open and forwarded by the kernel"
    );
    c.write_all(b"tail").expect("write");
    c.shutdown(Shutdown::Write).expect("shutdown");
    let total = LEN as u64 + 4;
    assert_eq!(sink.join().expect("sink").expect("read") as u64, total);
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).expect("the backend's FIN");
    assert!(rest.is_empty(), "the backend sent nothing");
    wait_maps_empty(&proxy, 1);
    wait_bytes(&proxy, total, 0);
}

/// Many request/response rounds on one flow (the backend speaks first, as
/// the echo backend greets), then a clean close: the flow log's byte counts
/// and the byte metrics equal what was sent, and the maps are emptied.
#[test]
fn request_response_rounds_on_one_flow_are_counted_exactly() {
    const ROUNDS: usize = 500;
    let a = Backend::echo("a");
    let (mut proxy, log) = Proxy::run_with_flow_log(&counting_config(a.addr));
    let mut c = connect(proxy.frontend("web")).expect("connect");
    assert_eq!(read_line(&mut c).expect("greeting"), "a");
    let mut sent = 0u64;
    for i in 0..ROUNDS {
        let request = vec![(i % 251) as u8; 1 + i % 300];
        c.write_all(&request).expect("request");
        let mut answer = vec![0u8; request.len()];
        c.read_exact(&mut answer).expect("answer");
        assert_eq!(answer, request, "round {i}");
        sent += request.len() as u64;
    }
    assert!(finish(&mut c).expect("finish").is_empty());
    let greeting = 2; // "a\n"
    wait_bytes(&proxy, sent, sent + greeting);
    wait_maps_empty(&proxy, 1);

    proxy.signal(libc::SIGTERM);
    assert!(proxy.wait_exit(WAIT).success());
    let text = std::fs::read_to_string(&log).expect("flow log");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert_eq!(lines[0]["outcome"], "closed");
    assert_eq!(lines[0]["bytes_to_backend"].as_u64(), Some(sent));
    assert_eq!(
        lines[0]["bytes_from_backend"].as_u64(),
        Some(sent + greeting)
    );
}

/// The client writes its request the moment its connect returns, before the
/// balancer has even accepted, so the request waits in the client socket's
/// queue while the backend connect runs: it must still reach the backend,
/// once, with no further byte to wake the verdict. Several flows, each with
/// its own request, so most take this path whatever the scheduling.
#[test]
fn a_request_queued_before_the_flow_joins_the_map_is_forwarded_once() {
    const FLOWS: usize = 20;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let proxy = sockmap_proxy(listener.local_addr().unwrap(), "");
    let backend = thread::spawn(move || {
        for _ in 0..FLOWS {
            let mut s = accept_one(&listener);
            let mut line = String::new();
            let mut byte = [0u8; 1];
            while !line.ends_with('\n') {
                s.read_exact(&mut byte).expect("request byte");
                line.push(byte[0] as char);
            }
            s.write_all(format!("got {line}").as_bytes())
                .expect("reply");
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).expect("read to EOF");
            assert!(rest.is_empty(), "bytes after the request: {rest:?}");
        }
    });
    for i in 0..FLOWS {
        let mut c = connect(proxy.frontend("web")).expect("connect");
        c.write_all(format!("request {i}\n").as_bytes())
            .expect("request");
        assert_eq!(
            read_line(&mut c).expect("reply"),
            format!("got request {i}")
        );
        assert!(finish(&mut c).expect("finish").is_empty());
    }
    backend.join().expect("backend");
    wait_maps_empty(&proxy, FLOWS);
}

/// The client shuts its write side; the backend reads to EOF and only then
/// answers, 300 kB, which must arrive whole. Then the reverse: the backend
/// says its piece and shuts, and the client still uploads 250 kB.
#[test]
fn half_close_both_ways() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let proxy = sockmap_proxy(listener.local_addr().unwrap(), "");
    let request: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let reply: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
    let upload: Vec<u8> = (0..250_000u32).map(|i| (i % 239) as u8).collect();
    let greeting = b"the backend is done talking\n".to_vec();

    let (joined, wait_joined) = std::sync::mpsc::channel::<()>();
    let backend = {
        let reply = reply.clone();
        let greeting = greeting.clone();
        thread::spawn(move || {
            let mut s = accept_one(&listener);
            let mut got = Vec::new();
            s.read_to_end(&mut got).expect("backend reads to EOF");
            s.write_all(&reply).expect("reply after the client's FIN");
            s.shutdown(Shutdown::Write).expect("backend shutdown");
            let mut s = accept_one(&listener);
            // A backend gone half-closed before the flow joins is copied by auto, as a client is.
            wait_joined.recv().expect("the flow joined");
            s.write_all(&greeting).expect("greeting");
            s.shutdown(Shutdown::Write).expect("backend shuts first");
            let mut uploaded = Vec::new();
            s.read_to_end(&mut uploaded)
                .expect("reads after its own FIN");
            (got, uploaded)
        })
    };

    let mut c = connect(proxy.frontend("web")).expect("connect");
    c.write_all(&request).expect("client write");
    // A client gone half-closed before its flow joins the map is copied
    // by auto (the kernel takes only established sockets): wait for the join.
    proxy.wait_metric("lb_sockmap_forwarded_flows_total", &[], WAIT, |v| v == 1.0);
    let got = finish(&mut c).expect("client reads the reply to EOF");
    assert!(
        got == reply,
        "reply: {} bytes, expected {}",
        got.len(),
        reply.len()
    );

    let mut c = connect(proxy.frontend("web")).expect("connect");
    proxy.wait_metric("lb_sockmap_forwarded_flows_total", &[], WAIT, |v| v == 2.0);
    joined.send(()).expect("backend waits");
    let mut got = Vec::new();
    c.read_to_end(&mut got).expect("greeting to EOF");
    assert_eq!(got, greeting);
    c.write_all(&upload).expect("client writes after EOF");
    c.shutdown(Shutdown::Write).expect("client shutdown");
    let (seen_request, seen_upload) = backend.join().expect("backend thread");
    assert!(
        seen_request == request,
        "request: {} bytes",
        seen_request.len()
    );
    assert!(seen_upload == upload, "upload: {} bytes", seen_upload.len());
    wait_maps_empty(&proxy, 2);
}

/// An idle flow ends after `idle_timeout` from its last byte, not before:
/// with a reset both ways when `tcp_reset_on_idle`, else with FIN.
#[test]
fn idle_timeout_resets_or_closes_from_the_last_byte() {
    let a = Backend::echo("a");
    let config = idle_pair_config("copy = \"sockmap\"", &a.toml());
    let proxy = start(&config, false, |_| Vec::new());
    assert_idle_timeouts_from_the_last_byte(&proxy);
    wait_maps_empty(&proxy, 2);
}

/// SIGTERM: no new flow is taken, the open one keeps being forwarded until
/// its client finishes, and then the process exits.
#[test]
fn sigterm_drain_lets_an_open_flow_finish() {
    let a = Backend::echo("a");
    let config = format!("drain_timeout = \"10s\"\n{}", sockmap_config(a.addr, ""));
    let mut proxy = start(&config, false, |_| Vec::new());
    let fe = proxy.frontend("web");
    let mut c = connect(fe).expect("connect");
    assert_eq!(read_line(&mut c).expect("greeting"), "a");
    proxy.wait_metric("lb_sockmap_flows", &[], WAIT, |v| v == 1.0);

    proxy.signal(libc::SIGTERM);
    wait_until("the frontend to refuse new connections", WAIT, || {
        connect_refused(fe).then_some(())
    });
    c.write_all(b"while draining")
        .expect("write while draining");
    let mut buf = [0u8; 14];
    c.read_exact(&mut buf).expect("read while draining");
    assert_eq!(&buf, b"while draining");
    assert!(proxy.try_wait().is_none(), "exited with a flow open");
    assert!(finish(&mut c).expect("finish").is_empty());
    let status = proxy.wait_exit(WAIT);
    assert!(status.success(), "exit status {status}");
}

/// SIGINT cuts an open flow as it cuts a userspace one: the client gets end
/// of stream, and the flow is logged with the bytes it carried and the
/// outcome `shutdown`.
#[test]
fn sigint_cuts_an_open_flow_and_logs_its_bytes() {
    let a = Backend::echo("a");
    let (mut proxy, log) = Proxy::run_with_flow_log(&sockmap_config(a.addr, ""));
    let mut c = connect(proxy.frontend("web")).expect("connect");
    assert_eq!(read_line(&mut c).expect("greeting"), "a");
    c.write_all(b"12345").expect("write");
    let mut echo = [0u8; 5];
    c.read_exact(&mut echo).expect("echo");
    proxy.wait_metric("lb_sockmap_flows", &[], WAIT, |v| v == 1.0);

    proxy.signal(libc::SIGINT);
    assert_eq!(c.read(&mut echo).expect("end of stream after the cut"), 0);
    let status = proxy.wait_exit(WAIT);
    assert_eq!(status.code(), Some(130), "exit status {status}");
    let text = std::fs::read_to_string(&log).expect("flow log");
    let record: serde_json::Value = serde_json::from_str(text.trim()).expect("one JSON line");
    assert_eq!(record["outcome"], "shutdown", "{text}");
    assert_eq!(record["bytes_to_backend"].as_u64(), Some(5), "{text}");
    assert_eq!(record["bytes_from_backend"].as_u64(), Some(7), "{text}");
}

/// Where the engine cannot run (here forced by its test hook, as without
/// root), the frontend copies with `auto`: one warning naming the reason,
/// `lb_sockmap_available 0`, and the bytes still get through.
#[test]
fn unavailable_engine_falls_back_to_auto_with_one_warning() {
    let a = Backend::echo("a");
    let proxy = start(&sockmap_config(a.addr, ""), true, |_| Vec::new());
    assert_eq!(proxy.metric("lb_sockmap_available", &[]), Some(0.0));
    for i in 0..3 {
        let mut c = connect(proxy.frontend("web")).expect("connect");
        assert_eq!(read_line(&mut c).expect("greeting"), "a");
        let payload = format!("flow {i}");
        c.write_all(payload.as_bytes()).expect("write");
        assert_eq!(finish(&mut c).expect("finish"), payload.as_bytes());
    }
    assert_eq!(proxy.metric("lb_sockmap_flows", &[]), Some(0.0));
    assert_eq!(
        proxy.metric("lb_sockmap_forwarded_flows_total", &[]),
        Some(0.0)
    );
    let stderr = proxy.stderr();
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("sockmap copy engine unavailable"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(warnings[0].contains(DISABLE_ENV), "{}", warnings[0]);
    assert!(warnings[0].contains("WARN"), "{}", warnings[0]);
}

/// The backend speaks first: a banner the moment it accepts, on half the
/// flows followed by its FIN. Bytes that arrive between the backend's and
/// the client's insert find no peer; the program leaves them (and every
/// later byte of that direction) on the backend socket and userspace copies
/// that direction, so every banner still arrives whole and in order, a FIN
/// only after it, and a request/response still works on the open flows.
/// Several clients at once, so many flows take that path whatever the
/// scheduling; the maps are empty afterwards, and the kernel took at least
/// every open flow.
#[test]
fn a_backend_that_speaks_first_is_heard_whole_on_every_flow() {
    const CLIENTS: usize = 8;
    const FLOWS_EACH: usize = 25;
    const FLOWS: usize = CLIENTS * FLOWS_EACH;
    let banner_body: Vec<u8> = (0..3_000u32).map(|i| (i % 251) as u8).collect();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let proxy = sockmap_proxy(listener.local_addr().unwrap(), "");
    let body = banner_body.clone();
    let backend = thread::spawn(move || {
        let served: Vec<_> = (0..FLOWS)
            .map(|i| {
                let mut s = accept_one(&listener);
                let body = body.clone();
                thread::spawn(move || serve_banner(&mut s, i % 2 == 0, &body))
            })
            .collect();
        for flow in served {
            flow.join().expect("backend flow");
        }
    });
    let clients: Vec<_> = (0..CLIENTS)
        .map(|k| {
            let (frontend, body) = (proxy.frontend("web"), banner_body.clone());
            thread::spawn(move || {
                for i in 0..FLOWS_EACH {
                    hear_banner(frontend, &body, &format!("client {k} flow {i}"));
                }
            })
        })
        .collect();
    for client in clients {
        client.join().expect("client");
    }
    backend.join().expect("backend");
    // A backend that sent its FIN before it could join (CLOSE_WAIT cannot)
    // leaves its flow to auto; an open one is established until it answers.
    proxy.wait_metric("lb_sockmap_flows", &[], WAIT, |v| v == 0.0);
    let forwarded = proxy
        .metric("lb_sockmap_forwarded_flows_total", &[])
        .expect("forwarded flows");
    assert!(
        (FLOWS / 2) as f64 <= forwarded && forwarded <= FLOWS as f64,
        "flows the kernel forwarded: {forwarded}"
    );
}
