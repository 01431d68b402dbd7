//! The data plane end to end: bulk bytes, half-close both ways (and a flow
//! without it), refused
//! backends and their fallbacks, a backend killed mid-transfer, idle timeouts.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use lb_tests::{
    accept_one, assert_answer_and_fin_in_one_segment, assert_exact_both_ways, assert_idle_ends,
    backend_toml, connect, finish, idle_pair_config, one_frontend_config, read_line, wait_until,
    web_proxy, Backend, BoundClient, Proxy, RefusingPort, SeededStream, BULK_LEN, IDLE_TIMEOUT,
    NO_PROBES,
};

/// A balancer with one frontend `web` in front of one in-test listener, with
/// the default copy engine (`auto`).
fn proxy_in_front_of(listener: &TcpListener) -> Proxy {
    proxy_copying_with(listener, "auto")
}

/// The same, with a chosen copy engine (`auto`, `userspace` or `splice`).
fn proxy_copying_with(listener: &TcpListener, copy: &str) -> Proxy {
    let addr = listener.local_addr().expect("local_addr");
    Proxy::run(&one_frontend_config(
        "web",
        &format!("copy = \"{copy}\"\n[frontends.health]\nkind = \"none\""),
        &[backend_toml("t", addr)],
    ))
}

/// With `auto` (the default) a 64 MiB stream is a bulk run, which switches to
/// splice partway (copy.rs's unit tests count the spliced bytes): the bytes
/// must come through exactly across the switch.
#[test]
fn bulk_64_mib_each_way_arrives_byte_exact() {
    bulk_64_mib_each_way("auto");
}

#[test]
fn bulk_64_mib_each_way_arrives_byte_exact_through_userspace() {
    bulk_64_mib_each_way("userspace");
}

#[test]
fn bulk_64_mib_each_way_arrives_byte_exact_through_splice() {
    bulk_64_mib_each_way("splice");
}

#[test]
fn half_close_both_ways_through_userspace_splice_and_sockmap() {
    // sockmap too (tests/tests/sockmap.rs has its own, stricter one).
    for copy in ["userspace", "splice", "sockmap"] {
        half_close_client_first(|l| proxy_copying_with(l, copy));
        half_close_backend_first(|l| proxy_copying_with(l, copy));
    }
}

fn bulk_64_mib_each_way(copy: &str) {
    const UP_SEED: u64 = 0x5eed_0001;
    const DOWN_SEED: u64 = 0x5eed_0002;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let proxy = proxy_copying_with(&listener, copy);
    assert_exact_both_ways(
        listener,
        proxy.frontend("web"),
        BULK_LEN,
        (UP_SEED, DOWN_SEED),
    );
    proxy.wait_backend_bytes(
        &[("frontend", "web"), ("backend", "t")],
        BULK_LEN as u64,
        BULK_LEN as u64,
        Duration::from_secs(5),
    );
    assert_spliced_share(&proxy, copy != "userspace");
}

/// What `lb_frontend_spliced_bytes_total` says of a finished bulk transfer:
/// with splice in play, most of the 2 × 64 MiB went by splice (a bulk run
/// starts after one full userspace read and may end and restart on a short
/// one); through userspace, none did.
fn assert_spliced_share(proxy: &Proxy, splicing: bool) {
    let labels = [("frontend", "web")];
    if splicing {
        proxy.wait_metric(
            "lb_frontend_spliced_bytes_total",
            &labels,
            Duration::from_secs(5),
            |v| v >= BULK_LEN as f64 && v <= 2.0 * BULK_LEN as f64,
        );
    } else {
        assert_eq!(
            proxy.metric("lb_frontend_spliced_bytes_total", &labels),
            Some(0.0)
        );
    }
}

#[test]
fn half_close_client_first_then_backend_replies() {
    half_close_client_first(proxy_in_front_of);
}

fn half_close_client_first(start: impl Fn(&TcpListener) -> Proxy) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let proxy = start(&listener);
    let request: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let reply: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();

    let backend = {
        let reply = reply.clone();
        thread::spawn(move || {
            let mut s = accept_one(&listener);
            // Read the whole request, to EOF: the client's FIN must have come through.
            let mut got = Vec::new();
            s.read_to_end(&mut got).expect("backend read to EOF");
            // Only now answer, on the half of the connection that is still open.
            s.write_all(&reply).expect("backend reply after client FIN");
            s.shutdown(Shutdown::Write).expect("backend shutdown");
            got
        })
    };

    let mut c = connect(proxy.frontend("web")).expect("connect");
    c.write_all(&request).expect("client write");
    c.shutdown(Shutdown::Write).expect("client shutdown(Write)");
    let mut got = Vec::new();
    c.read_to_end(&mut got)
        .expect("client reads the reply to EOF");
    assert_eq!(got.len(), reply.len(), "reply length");
    assert!(got == reply, "reply bytes differ");
    let seen = backend.join().expect("backend thread");
    assert_eq!(seen.len(), request.len(), "request length at the backend");
    assert!(seen == request, "request bytes differ");
}

/// A backend on `listener` that greets, sends its FIN, then reads to its
/// end of stream: what it read (or the error) arrives on the returned channel.
fn greeting_backend(listener: TcpListener, greeting: &[u8]) -> mpsc::Receiver<io::Result<Vec<u8>>> {
    let (read, got) = mpsc::channel();
    let greeting = greeting.to_vec();
    thread::spawn(move || {
        let mut s = accept_one(&listener);
        s.write_all(&greeting).expect("backend greeting");
        s.shutdown(Shutdown::Write)
            .expect("backend shutdown(Write)");
        let mut all = Vec::new();
        let _ = read.send(s.read_to_end(&mut all).map(|_| all));
    });
    got
}

/// A client of frontend `web` that has read `greeting` to its end of stream.
fn greeted_client(proxy: &Proxy, greeting: &[u8]) -> TcpStream {
    let mut c = connect(proxy.frontend("web")).expect("connect");
    let mut got = Vec::new();
    c.read_to_end(&mut got)
        .expect("client reads the greeting to EOF");
    assert_eq!(got, greeting);
    c
}

#[test]
fn half_close_backend_first_then_client_still_sends() {
    half_close_backend_first(proxy_in_front_of);
}

fn half_close_backend_first(start: impl Fn(&TcpListener) -> Proxy) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let proxy = start(&listener);
    let greeting = b"hello from the backend; I am done talking\n".to_vec();
    let upload: Vec<u8> = (0..250_000u32).map(|i| (i % 239) as u8).collect();

    let backend = greeting_backend(listener, &greeting);

    let mut c = greeted_client(&proxy, &greeting);
    // The backend has finished sending; our direction must still be open.
    c.write_all(&upload).expect("client writes after EOF");
    c.shutdown(Shutdown::Write).expect("client shutdown");
    let seen = backend
        .recv()
        .expect("backend thread")
        .expect("backend reads after its own FIN");
    assert_eq!(seen.len(), upload.len(), "bytes the backend received");
    assert!(seen == upload, "upload bytes differ");
    drop(c);
}

/// An answer with the backend's FIN right behind it reaches the client in
/// one segment with a FIN of the balancer's (the last write corked with it).
#[test]
fn the_answer_and_a_fin_behind_it_leave_in_one_segment() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let proxy = proxy_in_front_of(&listener);
    assert_answer_and_fin_in_one_segment(proxy.frontend("web"), listener);
}

/// `half_close = false` (nginx stream's default): the backend's FIN ends the
/// flow. The client gets the greeting and its end of stream, and the backend
/// gets its end of stream while the client still has its side open; with
/// half-close (the test above) the backend would wait for the client's FIN.
#[test]
fn without_half_close_the_backends_fin_ends_the_flow_both_ways() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local_addr");
    let proxy = Proxy::run(&one_frontend_config(
        "web",
        "half_close = false\n[frontends.health]\nkind = \"none\"",
        &[backend_toml("t", addr)],
    ));
    let greeting = b"hello from the backend; I am done talking\n".to_vec();
    let backend_end = greeting_backend(listener, &greeting);

    let c = greeted_client(&proxy, &greeting);
    // The client has not closed its side; the flow has ended anyway.
    let seen = backend_end
        .recv_timeout(Duration::from_secs(10))
        .expect("the backend gets its end of stream without the client's FIN")
        .expect("a clean end of stream, not a reset");
    assert!(
        seen.is_empty(),
        "bytes the backend received: {}",
        seen.len()
    );
    drop(c);
}

#[test]
fn flows_of_a_refusing_backend_land_on_their_first_fallback() {
    let a = Backend::echo("a");
    let b = Backend::echo("b");
    let dead = RefusingPort::new(Ipv4Addr::LOCALHOST);
    let proxy = Proxy::run(&one_frontend_config(
        "web",
        "distribution = \"Default\"\nconnect_retries = 2\n[frontends.health]\nkind = \"none\"\nfall = 100",
        &[a.toml(), b.toml(), backend_toml("dead", dead.addr)],
    ));
    let fe = proxy.frontend("web");

    // Pick client sockets (distinct source IPs, kernel-chosen ports) and ask the
    // balancer where each flow goes before connecting it.
    struct Planned {
        client: BoundClient,
        primary: String,
        expected: String,
    }
    let mut plans: Vec<Planned> = Vec::new();
    let (mut to_dead, mut to_live) = (0, 0);
    for i in 0..150u32 {
        if to_dead >= 6 && to_live >= 6 {
            break;
        }
        let ip = Ipv4Addr::new(127, 0, 3, 1 + (i % 250) as u8);
        let client = BoundClient::new(ip).expect("bind client");
        let explained = proxy.explain("web", client.local);
        let primary = explained["backend"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("no primary in {explained}"))
            .to_owned();
        let expected = if primary == "dead" {
            let fallback = explained["fallbacks"][0]["name"]
                .as_str()
                .unwrap_or_else(|| panic!("no fallback in {explained}"))
                .to_owned();
            assert_ne!(fallback, "dead", "{explained}");
            if to_dead >= 6 {
                continue;
            }
            to_dead += 1;
            fallback
        } else {
            if to_live >= 6 {
                continue;
            }
            to_live += 1;
            primary.clone()
        };
        plans.push(Planned {
            client,
            primary,
            expected,
        });
    }
    assert!(
        to_dead >= 6 && to_live >= 6,
        "found {to_dead} flows to the dead backend and {to_live} to live ones"
    );

    for (i, plan) in plans.into_iter().enumerate() {
        let src = plan.client.local;
        let mut c = plan.client.connect(fe).expect("connect to the balancer");
        let served_by = read_line(&mut c).unwrap_or_else(|e| {
            panic!(
                "flow {src} (primary {}): client saw an error: {e}",
                plan.primary
            )
        });
        assert_eq!(
            served_by, plan.expected,
            "flow {src} with primary {} served by the wrong backend",
            plan.primary
        );
        let msg = format!("ping {i}");
        c.write_all(msg.as_bytes()).expect("write");
        let echoed = finish(&mut c).expect("finish");
        assert_eq!(echoed, msg.as_bytes(), "echo through {served_by}");
    }

    let refused = proxy
        .metric(
            "lb_backend_connect_errors_total",
            &[
                ("frontend", "web"),
                ("backend", "dead"),
                ("reason", "refused"),
            ],
        )
        .expect("connect error series for `dead`");
    assert_eq!(refused, to_dead as f64, "refused connects to `dead`");
    assert_eq!(
        proxy.metric("lb_frontend_no_backend_total", &[("frontend", "web")]),
        Some(0.0)
    );
    assert_eq!(
        proxy.metric(
            "lb_backend_connections_total",
            &[("frontend", "web"), ("backend", "dead")]
        ),
        Some(0.0)
    );
}

/// How a streaming client's connection ended.
#[derive(Debug)]
enum StreamEnd {
    /// Stopped on request; everything echoed came back exactly.
    Finished { bytes: u64 },
    /// The connection ended (EOF or error) while streaming.
    Broken { at: Instant, how: String },
}

/// Streams seeded chunks through an echo backend, checking each echo, until
/// `stop` is set (then closes cleanly) or the connection breaks.
fn stream_echo(mut s: TcpStream, seed: u64, moved: &AtomicU64, stop: &AtomicBool) -> StreamEnd {
    let mut gen = SeededStream::new(seed);
    let mut chunk = vec![0u8; 16 * 1024];
    let mut echo = vec![0u8; chunk.len()];
    let mut bytes = 0u64;
    loop {
        if stop.load(Ordering::Acquire) {
            let rest = finish(&mut s).expect("finish a surviving stream");
            assert!(
                rest.is_empty(),
                "{} unexpected bytes at the end",
                rest.len()
            );
            return StreamEnd::Finished { bytes };
        }
        gen.fill(&mut chunk);
        if let Err(e) = s.write_all(&chunk) {
            return StreamEnd::Broken {
                at: Instant::now(),
                how: format!("write: {e}"),
            };
        }
        if let Err(e) = s.read_exact(&mut echo) {
            return StreamEnd::Broken {
                at: Instant::now(),
                how: format!("read: {e}"),
            };
        }
        assert!(echo == chunk, "echoed bytes differ after {bytes} bytes");
        bytes += chunk.len() as u64;
        moved.store(bytes, Ordering::Release);
    }
}

#[test]
fn killing_a_backend_mid_transfer_ends_only_its_flows() {
    let mut a = Backend::echo("a");
    let b = Backend::echo("b");
    let proxy = web_proxy(&format!("{NO_PROBES}\nfall = 100"), &[&a, &b]);
    let fe = proxy.frontend("web");

    // Three connections on each backend.
    let mut conns: Vec<(String, TcpStream)> = Vec::new();
    let mut per: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..60 {
        if per.get("a") == Some(&3) && per.get("b") == Some(&3) {
            break;
        }
        let mut c = connect(fe).expect("connect");
        let name = read_line(&mut c).expect("greeting");
        let n = per.entry(name.clone()).or_default();
        if *n < 3 {
            *n += 1;
            conns.push((name, c));
        }
    }
    assert_eq!(
        per.values().sum::<usize>(),
        6,
        "connections per backend: {per:?}"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let mut streams = Vec::new();
    for (i, (name, c)) in conns.into_iter().enumerate() {
        let moved = Arc::new(AtomicU64::new(0));
        let (m, st) = (Arc::clone(&moved), Arc::clone(&stop));
        let handle = thread::spawn(move || stream_echo(c, 1000 + i as u64, &m, &st));
        streams.push((name, moved, handle));
    }
    wait_until(
        "every stream to move 256 KiB",
        Duration::from_secs(20),
        || {
            streams
                .iter()
                .all(|(_, m, _)| m.load(Ordering::Acquire) >= 256 * 1024)
                .then_some(())
        },
    );

    let killed_at = Instant::now();
    a.kill();
    let moved_at_kill: Vec<u64> = streams
        .iter()
        .map(|(_, m, _)| m.load(Ordering::Acquire))
        .collect();

    // The survivors keep going after the kill...
    wait_until(
        "b's streams to move 256 KiB more after the kill",
        Duration::from_secs(20),
        || {
            streams
                .iter()
                .zip(&moved_at_kill)
                .filter(|((name, _, _), _)| name == "b")
                .all(|((_, m, _), at)| m.load(Ordering::Acquire) >= at + 256 * 1024)
                .then_some(())
        },
    );
    stop.store(true, Ordering::Release);

    for (name, moved, handle) in streams {
        let end = handle.join().expect("stream thread");
        match (name.as_str(), end) {
            ("a", StreamEnd::Broken { at, how }) => {
                let after = at.saturating_duration_since(killed_at);
                assert!(
                    after < Duration::from_secs(3),
                    "a's client noticed the kill only after {after:?} ({how})"
                );
            }
            ("b", StreamEnd::Finished { bytes }) => {
                assert_eq!(bytes, moved.load(Ordering::Acquire));
            }
            (name, end) => panic!("stream on {name} ended as {end:?}"),
        }
    }
}

#[test]
fn idle_timeout_resets_or_closes_after_the_timeout() {
    let a = Backend::echo("a");
    let proxy = Proxy::run(&idle_pair_config("", &a.toml()));

    let idle = |addr: SocketAddr| {
        thread::spawn(move || {
            let started = Instant::now();
            let mut c = connect(addr).expect("connect");
            assert_eq!(read_line(&mut c).expect("greeting"), "a");
            let mut buf = [0u8; 64];
            let result = c.read(&mut buf);
            (started.elapsed(), result)
        })
    };
    let rst = idle(proxy.frontend("rst"));
    let fin = idle(proxy.frontend("fin"));
    let (rst_after, rst_result) = rst.join().expect("rst thread");
    let (fin_after, fin_result) = fin.join().expect("fin thread");

    assert_idle_ends(rst_result, fin_result);
    for (what, after) in [("rst", rst_after), ("fin", fin_after)] {
        assert!(
            after >= IDLE_TIMEOUT && after < Duration::from_secs(5),
            "{what}: closed after {after:?}, expected {IDLE_TIMEOUT:?} ≤ t < 5 s"
        );
        let v = proxy.wait_metric(
            "lb_backend_idle_timeouts_total",
            &[("frontend", what), ("backend", "a")],
            Duration::from_secs(5),
            |v| v >= 1.0,
        );
        assert_eq!(v, 1.0, "{what}: idle timeouts");
    }
}
