//! `engine = "io-uring"` end to end with the real binary (two workers, so two
//! rings sharing one listener): everything the tokio engine promises still
//! holds on the ring: bytes exact both ways (64 MiB each way, by SHA-256,
//! most of it by splice in bulk runs) and counted exactly; request/response rounds counted in the byte metrics and
//! the flow log; half-close both ways, and an answer passed on in one
//! segment with the FIN behind it; the idle timeout with and without a
//! reset; the drain on SIGTERM and the cut on SIGINT (logged with its bytes);
//! backends that speak first; the PROXY header ahead of the client's bytes;
//! a refused backend's flows on the next choice; `max_connections`; a reload.
//! Where io_uring is refused (the `LB_PROXY_IO_URING_DISABLE` test hook, as a
//! kernel or seccomp profile that forbids it), the frontend runs on tokio
//! after one warning (an info line where `engine` was left out), with
//! `lb_io_uring_available 0`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use lb_tests::{
    accept_one, assert_answer_and_fin_in_one_segment, assert_exact_both_ways,
    assert_idle_timeouts_from_the_last_byte, backend_toml, connect, connect_refused, finish,
    hear_banner, idle_pair_config, one_frontend_config, read_line, serve_banner, wait_until,
    Backend, Proxy, RefusingPort, BULK_LEN, NO_PROBES,
};

const DISABLE_ENV: &str = "LB_PROXY_IO_URING_DISABLE";
const WAIT: Duration = Duration::from_secs(10);
const ENGINE: &str = "engine = \"io-uring\"";

/// One frontend `web` on the ring (with `extra` settings) in front of `backends`.
fn ring_config(backends: &[String], extra: &str) -> String {
    one_frontend_config("web", &format!("{ENGINE}\n{extra}\n{NO_PROBES}"), backends)
}

/// The same with `[admin] byte_metrics = true`.
fn counting(config: String) -> String {
    config.replacen("[admin]\n", "[admin]\nbyte_metrics = true\n", 1)
}

/// A balancer on `config`, its ring asserted running.
fn ring_proxy(config: &str) -> Proxy {
    let proxy = Proxy::run(config);
    assert_ring_runs(&proxy);
    proxy
}

fn assert_ring_runs(proxy: &Proxy) {
    assert_eq!(
        proxy.metric("lb_io_uring_available", &[]),
        Some(1.0),
        "io_uring should run here: {}",
        proxy.stderr()
    );
}

/// The answer with the backend's FIN behind it leaves in one segment: the
/// read's completion said more was queued, and the peek found the FIN.
#[test]
fn the_answer_and_a_fin_behind_it_leave_in_one_segment() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let backend = backend_toml("t", listener.local_addr().unwrap());
    let proxy = ring_proxy(&ring_config(&[backend], ""));
    assert_answer_and_fin_in_one_segment(proxy.frontend("web"), listener);
}

fn wait_bytes(proxy: &Proxy, sent: u64, received: u64) {
    proxy.wait_backend_bytes(
        &[("frontend", "web"), ("backend", "t")],
        sent,
        received,
        WAIT,
    );
}

/// The flow log's records, parsed.
fn flow_records(log: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(log).expect("flow log");
    text.lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

#[test]
fn bulk_64_mib_each_way_arrives_byte_exact_and_is_counted() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let backend = backend_toml("t", listener.local_addr().unwrap());
    let proxy = ring_proxy(&counting(ring_config(&[backend], "")));
    assert_exact_both_ways(
        listener,
        proxy.frontend("web"),
        BULK_LEN,
        (0x0e1a_0001, 0x0e1a_0002),
    );
    wait_bytes(&proxy, BULK_LEN as u64, BULK_LEN as u64);
    // Most of it went by splice, never through the ring's buffers: a full
    // read starts a bulk run (the tokio engine's `auto` rule).
    proxy.wait_metric(
        "lb_frontend_spliced_bytes_total",
        &[("frontend", "web")],
        WAIT,
        |v| v >= BULK_LEN as f64 && v <= 2.0 * BULK_LEN as f64,
    );
    proxy.wait_metric(
        "lb_frontend_active_connections",
        &[("frontend", "web")],
        WAIT,
        |v| v == 0.0,
    );
}

/// Many request/response rounds on one flow (the echo backend greets
/// first), then a clean close: the byte metrics and the flow log's record
/// count exactly what was sent each way.
#[test]
fn request_response_rounds_on_one_flow_are_counted_exactly() {
    const ROUNDS: usize = 500;
    let a = Backend::echo("t");
    let (mut proxy, log) =
        Proxy::run_with_flow_log(&counting(ring_config(&[backend_toml("t", a.addr)], "")));
    assert_ring_runs(&proxy);
    let mut c = connect(proxy.frontend("web")).expect("connect");
    assert_eq!(read_line(&mut c).expect("greeting"), "t");
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
    let greeting = 2; // "t\n"
    wait_bytes(&proxy, sent, sent + greeting);
    // Small requests and answers never start a bulk run.
    assert_eq!(
        proxy.metric("lb_frontend_spliced_bytes_total", &[("frontend", "web")]),
        Some(0.0)
    );

    proxy.signal(libc::SIGTERM);
    assert!(proxy.wait_exit(WAIT).success());
    let records = flow_records(&log);
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["outcome"], "closed");
    assert_eq!(records[0]["via"], "t");
    assert_eq!(records[0]["bytes_to_backend"].as_u64(), Some(sent));
    assert_eq!(
        records[0]["bytes_from_backend"].as_u64(),
        Some(sent + greeting)
    );
}

/// The client shuts its write side; the backend reads to EOF and only then
/// answers, 300 kB, which must arrive whole. Then the reverse: the backend
/// says its piece and shuts, and the client still uploads 250 kB.
#[test]
fn half_close_both_ways() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let backend = backend_toml("t", listener.local_addr().unwrap());
    let proxy = ring_proxy(&ring_config(&[backend], ""));
    let request: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let reply: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
    let upload: Vec<u8> = (0..250_000u32).map(|i| (i % 239) as u8).collect();
    let greeting = b"the backend is done talking\n".to_vec();
    let backend = {
        let (reply, greeting) = (reply.clone(), greeting.clone());
        thread::spawn(move || {
            let mut s = accept_one(&listener);
            let mut got = Vec::new();
            s.read_to_end(&mut got).expect("backend reads to EOF");
            s.write_all(&reply).expect("reply after the client's FIN");
            s.shutdown(Shutdown::Write).expect("backend shutdown");
            let mut s = accept_one(&listener);
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
    let got = finish(&mut c).expect("client reads the reply to EOF");
    assert!(
        got == reply,
        "reply: {} bytes of {}",
        got.len(),
        reply.len()
    );

    let mut c = connect(proxy.frontend("web")).expect("connect");
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
}

/// An idle flow ends after `idle_timeout` from its last byte, not before:
/// with a reset both ways when `tcp_reset_on_idle`, else with FIN.
#[test]
fn idle_timeout_resets_or_closes_from_the_last_byte() {
    let a = Backend::echo("a");
    let proxy = ring_proxy(&idle_pair_config(ENGINE, &a.toml()));
    assert_idle_timeouts_from_the_last_byte(&proxy);
}

/// SIGTERM: the rings stop accepting, the open flow keeps going until its
/// client finishes, and then the process exits.
#[test]
fn sigterm_drain_lets_an_open_flow_finish() {
    let a = Backend::echo("a");
    let config = format!("drain_timeout = \"10s\"\n{}", ring_config(&[a.toml()], ""));
    let mut proxy = ring_proxy(&config);
    let fe = proxy.frontend("web");
    let mut c = connect(fe).expect("connect");
    assert_eq!(read_line(&mut c).expect("greeting"), "a");

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

/// SIGINT cuts an open flow: the client gets end of stream, and the flow is
/// logged with the bytes it carried and the outcome `shutdown`.
#[test]
fn sigint_cuts_an_open_flow_and_logs_its_bytes() {
    let a = Backend::echo("a");
    let (mut proxy, log) = Proxy::run_with_flow_log(&ring_config(&[a.toml()], ""));
    assert_ring_runs(&proxy);
    let mut c = connect(proxy.frontend("web")).expect("connect");
    assert_eq!(read_line(&mut c).expect("greeting"), "a");
    c.write_all(b"12345").expect("write");
    let mut echo = [0u8; 5];
    c.read_exact(&mut echo).expect("echo");

    proxy.signal(libc::SIGINT);
    assert_eq!(c.read(&mut echo).expect("end of stream after the cut"), 0);
    let status = proxy.wait_exit(WAIT);
    assert_eq!(status.code(), Some(130), "exit status {status}");
    let records = flow_records(&log);
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["outcome"], "shutdown");
    assert_eq!(records[0]["bytes_to_backend"].as_u64(), Some(5));
    assert_eq!(records[0]["bytes_from_backend"].as_u64(), Some(7));
}

/// Where io_uring is refused (here by the test hook), the frontend runs on
/// tokio: one warning naming the reason, `lb_io_uring_available 0`, and the
/// bytes still get through.
#[test]
fn refused_io_uring_falls_back_to_tokio_with_one_warning() {
    let a = Backend::echo("a");
    let line = refused_and_served_on_tokio(&ring_config(&[a.toml()], ""));
    assert!(line.contains("WARN"), "{line}");
}

/// The same with `engine` left out (the ring is the default where it can
/// run): the refusal is said once, at info level, not as a warning, since
/// nothing asked for the ring (a container whose seccomp profile refuses
/// io_uring, as Docker's and containerd's defaults do, runs as configured).
#[test]
fn refused_io_uring_under_the_default_engine_is_said_without_a_warning() {
    let a = Backend::echo("a");
    let config = ring_config(&[a.toml()], "").replace(ENGINE, "");
    let line = refused_and_served_on_tokio(&config);
    assert!(line.contains("INFO") && !line.contains("WARN"), "{line}");
}

/// Runs `config` with io_uring refused: flows are served (on tokio), the
/// ring is reported unavailable, and one line says so for both workers; that line.
fn refused_and_served_on_tokio(config: &str) -> String {
    let proxy = Proxy::run_with_env(config, &[(DISABLE_ENV, "1")], |_| Vec::new());
    assert_eq!(proxy.metric("lb_io_uring_available", &[]), Some(0.0));
    for i in 0..3 {
        let mut c = connect(proxy.frontend("web")).expect("connect");
        assert_eq!(read_line(&mut c).expect("greeting"), "a");
        let payload = format!("flow {i}");
        c.write_all(payload.as_bytes()).expect("write");
        assert_eq!(finish(&mut c).expect("finish"), payload.as_bytes());
    }
    let stderr = proxy.stderr();
    let said: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("io_uring engine unavailable"))
        .collect();
    assert_eq!(said.len(), 1, "one line for both workers: {stderr}");
    assert!(said[0].contains(DISABLE_ENV), "{}", said[0]);
    said[0].to_owned()
}

/// The backend speaks first: a banner the moment it accepts, on half the
/// flows followed by its FIN, on the others a request answered. Several
/// clients at once, each banner whole and in order, a FIN only after it.
#[test]
fn a_backend_that_speaks_first_is_heard_whole_on_every_flow() {
    const CLIENTS: usize = 8;
    const FLOWS_EACH: usize = 25;
    let body: Vec<u8> = (0..3_000u32).map(|i| (i % 251) as u8).collect();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let backend_addr = listener.local_addr().unwrap();
    let proxy = ring_proxy(&ring_config(&[backend_toml("t", backend_addr)], ""));
    let served_body = body.clone();
    let backend = thread::spawn(move || {
        let served: Vec<_> = (0..CLIENTS * FLOWS_EACH)
            .map(|i| {
                let mut s = accept_one(&listener);
                let body = served_body.clone();
                thread::spawn(move || serve_banner(&mut s, i % 2 == 0, &body))
            })
            .collect();
        for flow in served {
            flow.join().expect("backend flow");
        }
    });
    let clients: Vec<_> = (0..CLIENTS)
        .map(|k| {
            let (frontend, body) = (proxy.frontend("web"), body.clone());
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
    assert_eq!(
        proxy.metric("lb_frontend_connections_total", &[("frontend", "web")]),
        Some((CLIENTS * FLOWS_EACH) as f64)
    );
}

/// With `proxy-protocol-v1` the backend reads the header naming the client
/// and the frontend first, then the client's bytes; with v2, the binary
/// signature first. Neither header is counted as the client's bytes. The
/// client's address comes from the accept itself on a listener the two
/// workers share (one accept at a time), from the socket on one listener
/// per worker (a multishot accept): both are checked.
#[test]
fn the_proxy_header_goes_ahead_of_the_clients_bytes() {
    let cases = [
        ("proxy-protocol-v1", true, ""),
        ("proxy-protocol-v1", true, "accept = \"reuseport\""),
        ("proxy-protocol-v2", false, ""),
    ];
    for (mode, expect_v1, accept) in cases {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let backend = backend_toml("t", listener.local_addr().unwrap());
        let config = counting(ring_config(
            &[backend],
            &format!("client_address = \"{mode}\"\n{accept}"),
        ));
        let proxy = ring_proxy(&config);
        let frontend = proxy.frontend("web");
        let mut c = connect(frontend).expect("connect");
        c.write_all(b"hello").expect("write");
        c.shutdown(Shutdown::Write).expect("client FIN");
        let mut s = accept_one(&listener);
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("backend reads to EOF");
        drop(s);
        let client = c.local_addr().unwrap();
        let (header, rest) = if expect_v1 {
            let end = got.windows(2).position(|w| w == b"\r\n").expect("v1 line") + 2;
            let line = String::from_utf8_lossy(&got[..end]).into_owned();
            assert_eq!(
                line,
                format!(
                    "PROXY TCP4 {} {} {} {}\r\n",
                    client.ip(),
                    frontend.ip(),
                    client.port(),
                    frontend.port()
                ),
                "{mode}"
            );
            got.split_at(end)
        } else {
            const SIG: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
            assert_eq!(&got[..12], SIG, "{mode}: signature");
            let len = 16 + usize::from(u16::from_be_bytes([got[14], got[15]]));
            let port = u16::from_be_bytes([got[24], got[25]]);
            assert_eq!(port, client.port(), "{mode}: the client's port");
            got.split_at(len)
        };
        assert_eq!(
            rest,
            b"hello",
            "{mode}: after a {}-byte header",
            header.len()
        );
        // The client shut its side already; the backend's close comes back as EOF.
        let mut back = Vec::new();
        c.read_to_end(&mut back)
            .expect("EOF from the backend's close");
        assert!(back.is_empty(), "{mode}: the backend sent nothing");
        wait_bytes(&proxy, 5, 0);
    }
}

/// The flow's first choice refuses: each flow goes to the next choice, the
/// refusals are counted against the refusing backend, and no client sees it.
#[test]
fn a_refused_connect_moves_the_flow_to_the_next_choice() {
    const FLOWS: usize = 20;
    let refusing = RefusingPort::new(Ipv4Addr::LOCALHOST);
    let good = Backend::echo("good");
    let config = ring_config(
        &[backend_toml("bad", refusing.addr), good.toml()],
        "connect_retries = 1",
    );
    let proxy = ring_proxy(&config);
    for i in 0..FLOWS {
        let mut c = connect(proxy.frontend("web")).expect("connect");
        assert_eq!(read_line(&mut c).expect("greeting"), "good", "flow {i}");
        c.write_all(b"x").expect("write");
        assert_eq!(finish(&mut c).expect("finish"), b"x");
    }
    let refused = proxy
        .metric(
            "lb_backend_connect_errors_total",
            &[
                ("frontend", "web"),
                ("backend", "bad"),
                ("reason", "refused"),
            ],
        )
        .unwrap_or(0.0);
    let good_flows = proxy
        .metric(
            "lb_backend_connections_total",
            &[("frontend", "web"), ("backend", "good")],
        )
        .expect("good's connections");
    assert_eq!(good_flows, FLOWS as f64);
    assert!(refused >= 1.0, "some flows chose `bad` first: {refused}");
    assert_eq!(
        proxy.metric("lb_frontend_no_backend_total", &[("frontend", "web")]),
        Some(0.0)
    );
}

/// At `max_connections`, the next client is reset and counted; once a flow
/// ends, a client is served again.
#[test]
fn max_connections_resets_the_client_past_the_limit() {
    let a = Backend::echo("a");
    let proxy = ring_proxy(&ring_config(&[a.toml()], "max_connections = 1"));
    let fe = proxy.frontend("web");
    let mut held = connect(fe).expect("connect");
    assert_eq!(read_line(&mut held).expect("greeting"), "a");
    // The kernel completes the handshake, then the reset comes (so fast,
    // at times, that setting socket options after connect sees it).
    let mut buf = [0u8; 8];
    let refused = connect(fe).and_then(|mut over| over.read(&mut buf));
    assert!(
        matches!(&refused, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "expected a reset, got {refused:?}"
    );
    proxy.wait_metric(
        "lb_frontend_rejected_connections_total",
        &[("frontend", "web"), ("reason", "max_connections")],
        WAIT,
        |v| v == 1.0,
    );
    assert!(finish(&mut held).expect("finish").is_empty());
    proxy.wait_metric(
        "lb_frontend_active_connections",
        &[("frontend", "web")],
        WAIT,
        |v| v == 0.0,
    );
    let mut again = connect(fe).expect("connect");
    assert_eq!(read_line(&mut again).expect("greeting"), "a");
}

/// A reload moves new flows to the new backends; one that would move the
/// frontend to the other engine is refused (the listeners stay where they
/// are) and the ring keeps serving.
#[test]
fn a_reload_changes_backends_but_not_the_engine() {
    let (a, b) = (Backend::echo("a"), Backend::echo("b"));
    let config = ring_config(&[a.toml()], "");
    let proxy = ring_proxy(&config);
    let greeting = |proxy: &Proxy| {
        let mut c = connect(proxy.frontend("web")).expect("connect");
        let line = read_line(&mut c).expect("greeting");
        assert!(finish(&mut c).expect("finish").is_empty());
        line
    };
    assert_eq!(greeting(&proxy), "a");
    proxy.write_config(&config.replace(&a.toml(), &b.toml()));
    proxy.sighup_until("success", 1.0, WAIT);
    assert_eq!(greeting(&proxy), "b");

    proxy.write_config(&ring_config(&[b.toml()], "").replace(ENGINE, "engine = \"tokio\""));
    proxy.sighup_until("failure", 1.0, WAIT);
    assert_eq!(greeting(&proxy), "b");
    assert_ring_runs(&proxy);
}

/// With two buffers per ring (the pool's test hook), six flows moving 4 MiB
/// each way at once keep running the pool dry: reads that find no buffer
/// wait for one and are posted again, and every byte still arrives, in order.
#[test]
fn flows_wait_for_buffers_when_the_pool_runs_dry_and_lose_nothing() {
    const FLOWS: usize = 6;
    const LEN: usize = 4 << 20;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let backend = backend_toml("t", listener.local_addr().unwrap());
    let proxy = Proxy::run_with_env(
        &counting(ring_config(&[backend], "")),
        &[("LB_PROXY_IO_URING_BUFFERS", "2")],
        |_| Vec::new(),
    );
    assert_ring_runs(&proxy);
    // The same seeds on every flow, so whichever backend connection a
    // client's flow reaches, each end knows what the other sent.
    let flows: Vec<_> = (0..FLOWS)
        .map(|_| {
            let (listener, frontend) =
                (listener.try_clone().expect("clone"), proxy.frontend("web"));
            thread::spawn(move || {
                assert_exact_both_ways(listener, frontend, LEN, (0x0e1a_0003, 0x0e1a_0004))
            })
        })
        .collect();
    for flow in flows {
        flow.join().expect("flow");
    }
    let total = (FLOWS * LEN) as u64;
    wait_bytes(&proxy, total, total);
}

/// Clients that stop reading cannot take the pool the other flows need: with
/// four buffers on the one worker, six flows whose clients (small receive
/// buffers) read nothing while their backends send 16 MiB each, more than
/// the sockets on the way hold; every other flow is served at once, and the
/// stalled clients, read one after another, each get all their bytes. (With
/// the stalled flows' sends holding pool buffers, the flow read first waits
/// for a buffer that flows read later hold: the reads stop.)
#[test]
fn clients_that_stop_reading_do_not_starve_the_other_flows() {
    const STALLED: usize = 6;
    const FLOOD: usize = 16 << 20;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let backend_addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            thread::spawn(move || {
                // "F": a flood, then FIN; anything else: one line echoed.
                let line = read_line(&mut s).unwrap_or_default();
                if line == "F" {
                    let _ = s.write_all(&vec![0xab; FLOOD]);
                } else {
                    let _ = s.write_all(format!("{line}\n").as_bytes());
                }
                let _ = s.shutdown(Shutdown::Write);
                let _ = s.read_to_end(&mut Vec::new());
            });
        }
    });
    let config = ring_config(&[backend_toml("t", backend_addr)], "").replacen(
        "workers = 2",
        "workers = 1",
        1,
    );
    let proxy = Proxy::run_with_env(&config, &[("LB_PROXY_IO_URING_BUFFERS", "4")], |_| {
        Vec::new()
    });
    assert_ring_runs(&proxy);
    let fe = proxy.frontend("web");
    let stalled: Vec<TcpStream> = (0..STALLED)
        .map(|_| {
            let mut c = connect_small_window(fe);
            c.write_all(b"F\n").expect("ask for a flood");
            c
        })
        .collect();
    // Let the floods fill every socket buffer on the way.
    proxy.wait_metric(
        "lb_backend_connections_total",
        &[("frontend", "web"), ("backend", "t")],
        WAIT,
        |v| v == STALLED as f64,
    );
    for i in 0..20 {
        let started = Instant::now();
        let mut c = connect(fe).expect("connect");
        c.write_all(format!("ping {i}\n").as_bytes())
            .expect("write");
        assert_eq!(read_line(&mut c).expect("echo"), format!("ping {i}"));
        assert!(finish(&mut c).expect("finish").is_empty());
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "flow {i} waited {:?}",
            started.elapsed()
        );
    }
    for (i, mut c) in stalled.into_iter().enumerate() {
        let mut got = Vec::new();
        c.read_to_end(&mut got).expect("the flood");
        assert_eq!(got.len(), FLOOD, "stalled flow {i}");
        assert!(got.iter().all(|&b| b == 0xab), "stalled flow {i}");
    }
}

/// A client whose receive buffer is small (set before the connect, so the
/// window it offers stays small).
fn connect_small_window(to: SocketAddr) -> TcpStream {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.set_recv_buffer_size(16 << 10).expect("SO_RCVBUF");
    socket.connect(&to.into()).expect("connect");
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(WAIT)).expect("read timeout");
    stream
}
