//! Zero-downtime binary upgrade end to end: a new `lb-proxy run
//! --upgrade-socket PATH` takes the listeners over from the process serving
//! PATH, which drains and exits 0, while clients keep being served; a new
//! process whose config does not match is refused and the old one serves on.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use lb_tests::udp::UdpClient;
use lb_tests::{
    assert_hey_all_ok, connect, http_get, http_keepalive_get, proxy_bin, run_hey, wait_until,
    Backend, Proxy, TempDir, NO_PROBES,
};

/// The frontend every test serves.
const FRONTEND: &str = "web";
/// How long an old process may take to exit after a hand-over: its drain
/// (the configs' `drain_timeout`) plus room on a busy machine.
const OLD_EXIT: Duration = Duration::from_secs(15);
/// How long a refused new process may take to exit.
const REFUSED_EXIT: Duration = Duration::from_secs(15);

/// A config with two workers, the admin endpoint on 127.0.0.1:0 and frontend
/// `web` on `listen` (port 0 the first time, then the port it got), in
/// front of `backends` with their weights.
fn config(
    listen: &str,
    drain_timeout: &str,
    settings: &str,
    backends: &[(&Backend, u32)],
) -> String {
    let tables: String = backends
        .iter()
        .map(|(b, w)| format!("{}weight = {w}\n\n", b.toml()))
        .collect();
    format!(
        "workers = 2\ndrain_timeout = \"{drain_timeout}\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[frontends]]\nname = \"{FRONTEND}\"\nlisten = \"{listen}\"\n{settings}\n{NO_PROBES}\n\n{tables}"
    )
}

/// The upgrade socket's path, in a directory of the test's own.
fn socket_path(dir: &TempDir) -> PathBuf {
    dir.path().join("upgrade.sock")
}

/// `lb-proxy run --config .. --upgrade-socket PATH`, once ready.
fn start(config: &str, socket: &Path) -> Proxy {
    let socket = socket.display().to_string();
    Proxy::run_with_flags(config, |_| vec!["--upgrade-socket".to_owned(), socket])
}

/// Starts the next process on `socket` and waits for `old` to exit 0.
fn upgrade(old: &mut Proxy, config: &str, socket: &Path) -> Proxy {
    let new = start(config, socket);
    let status = old.wait_exit(OLD_EXIT);
    assert!(
        status.success(),
        "the old process exited {status}:\n{}",
        old.stderr()
    );
    assert!(
        old.stderr()
            .contains(&format!("handing listeners over to pid {}", new.pid())),
        "old process log:\n{}",
        old.stderr()
    );
    assert!(
        new.stderr().contains(&format!("from pid {}", old.pid())),
        "new process log:\n{}",
        new.stderr()
    );
    new
}

/// Runs an `lb-proxy run` that is expected to exit on its own: (status, stderr).
fn run_to_exit(config: &str, socket: &Path, dir: &Path) -> (ExitStatus, String) {
    let path = dir.join("refused.toml");
    std::fs::write(&path, config).expect("write config");
    let err_path = dir.join("refused.stderr");
    let mut child = Command::new(proxy_bin())
        .args(["run", "--config"])
        .arg(&path)
        .arg("--upgrade-socket")
        .arg(socket)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("spawn lb-proxy");
    let status = wait_until("the refused lb-proxy to exit", REFUSED_EXIT, || {
        child.try_wait().expect("try_wait")
    });
    (
        status,
        std::fs::read_to_string(&err_path).unwrap_or_default(),
    )
}

/// One request on a new connection: the status and the node that answered.
fn get(fe: SocketAddr) -> (u16, String) {
    let (status, _, body) = http_get(fe, "/").expect("GET through the balancer");
    (status, body.trim().to_owned())
}

/// Waits for a reload of `proxy`'s config to be counted.
fn reload(proxy: &Proxy, config: &str, reloads: f64) {
    proxy.write_config(config);
    proxy.signal(libc::SIGHUP);
    proxy.wait_metric(
        "lb_config_reloads_total",
        &[("result", "success")],
        Duration::from_secs(10),
        |v| v >= reloads,
    );
}

#[test]
fn upgrade_under_load_loses_nothing() {
    let (a, b) = (Backend::http("a"), Backend::http("b"));
    let socket_dir = tempfile::tempdir().expect("tempdir");
    let socket = socket_path(&socket_dir);
    let weighted = |listen: &str, wa: u32, wb: u32| config(listen, "1s", "", &[(&a, wa), (&b, wb)]);
    let mut current = start(&weighted("127.0.0.1:0", 1, 1), &socket);
    let fe = current.frontend(FRONTEND);
    let pinned = |wa, wb| weighted(&fe.to_string(), wa, wb);

    let hey_dir = tempfile::tempdir().expect("tempdir");
    let hey_out = hey_dir.path().to_owned();
    let url = format!("http://{fe}/");
    let hey = std::thread::spawn(move || {
        run_hey(
            &hey_out,
            &["-z", "10s", "-c", "50"],
            &url,
            Duration::from_secs(60),
        )
    });
    let started = Instant::now();
    current.wait_metric(
        "lb_frontend_connections_total",
        &[("frontend", FRONTEND)],
        Duration::from_secs(10),
        |v| v >= 50.0,
    );

    // A reload keeps the listen address as configured (port 0 here), the
    // processes after it are given the port that port 0 got.
    reload(&current, &weighted("127.0.0.1:0", 1, 2), 1.0);
    current = upgrade(&mut current, &pinned(1, 2), &socket);
    reload(&current, &pinned(2, 1), 1.0);
    current = upgrade(&mut current, &pinned(2, 1), &socket);
    reload(&current, &pinned(1, 1), 1.0);
    assert!(
        !hey.is_finished(),
        "the upgrades and reloads took {:?}, longer than hey ran",
        started.elapsed()
    );
    eprintln!("2 upgrades and 3 reloads took {:?}", started.elapsed());

    let out = hey.join().expect("hey thread");
    let n = assert_hey_all_ok(&out);
    eprintln!("hey -z 10s -c 50 across 2 upgrades and 3 reloads: {n} responses, all 200");
    assert_eq!(get(fe).0, 200, "the last process serves");
    assert!(current.try_wait().is_none(), "the last process runs");
}

#[test]
fn refused_takeover_leaves_the_old_process_serving() {
    let a = Backend::http("a");
    let socket_dir = tempfile::tempdir().expect("tempdir");
    let socket = socket_path(&socket_dir);
    let mut old = start(&config("127.0.0.1:0", "2s", "", &[(&a, 1)]), &socket);
    let fe = old.frontend(FRONTEND);

    let elsewhere = format!("127.0.0.2:{}", fe.port());
    let wrong = config(&elsewhere, "2s", "", &[(&a, 1)]);
    let (status, stderr) = run_to_exit(&wrong, &socket, socket_dir.path());
    assert!(!status.success(), "a mismatched take-over exited {status}");
    assert!(
        stderr.contains(&format!(
            "frontend `{FRONTEND}`: the running process listens on {fe}, this config asks for {elsewhere}"
        )),
        "refused process log:\n{stderr}"
    );

    assert_eq!(get(fe), (200, "a".to_owned()), "the old process serves");
    assert!(old.try_wait().is_none(), "the old process runs");
    assert!(
        old.stderr().contains("refused them"),
        "old log:\n{}",
        old.stderr()
    );

    let mut new = upgrade(
        &mut old,
        &config(&fe.to_string(), "2s", "", &[(&a, 1)]),
        &socket,
    );
    assert_eq!(get(fe), (200, "a".to_owned()), "the new process serves");
    assert!(new.try_wait().is_none());
}

/// The kernel's inodes of the TCP sockets listening on `addr`
/// (/proc/net/tcp): the same set before and after an upgrade means the
/// listeners were handed over, not bound again.
fn listening_sockets(addr: SocketAddr) -> Vec<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let local = match addr {
        SocketAddr::V4(a) => format!("{:08X}:{:04X}", u32::from(*a.ip()).swap_bytes(), a.port()),
        SocketAddr::V6(_) => panic!("IPv4 only"),
    };
    const LISTEN: &str = "0A";
    let mut inodes: Vec<u64> = table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() > 9 && f[1] == local && f[3] == LISTEN)
        .map(|f| f[9].parse().expect("an inode"))
        .collect();
    inodes.sort_unstable();
    inodes
}

/// Asks the process on `socket` for its listeners as a new process would
/// (framed JSON), reading its offer but never answering it.
fn begin_take_over(socket: &Path) -> UnixStream {
    let mut s = UnixStream::connect(socket).expect("connect to the upgrade socket");
    let take = br#"{"message":"take","version":1,"pid":1}"#;
    s.write_all(&(take.len() as u32).to_be_bytes())
        .expect("send");
    s.write_all(take).expect("send");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut len = [0u8; 4];
    s.read_exact(&mut len).expect("the offer's length");
    let mut offer = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut offer).expect("the offer");
    let offer = String::from_utf8_lossy(&offer);
    assert!(offer.contains(r#""message":"listeners""#), "{offer}");
    s
}

#[test]
fn a_second_upgrade_is_refused_and_a_vanished_taker_changes_nothing() {
    let a = Backend::http("a");
    let socket_dir = tempfile::tempdir().expect("tempdir");
    let socket = socket_path(&socket_dir);
    let mut old = start(&config("127.0.0.1:0", "2s", "", &[(&a, 1)]), &socket);
    let fe = old.frontend(FRONTEND);
    let same = config(&fe.to_string(), "2s", "", &[(&a, 1)]);

    let taker = begin_take_over(&socket);
    let (status, stderr) = run_to_exit(&same, &socket, socket_dir.path());
    assert!(!status.success(), "a second upgrade exited {status}");
    assert!(
        stderr.contains("an upgrade is already in progress: pid 1 is taking the listeners over"),
        "second upgrade's log:\n{stderr}"
    );
    assert_eq!(get(fe).0, 200, "the old process serves meanwhile");

    // The first taker vanishes before saying "done": nothing changes.
    drop(taker);
    wait_until(
        "the old process to take requests again",
        Duration::from_secs(10),
        || {
            old.stderr()
                .contains("take-over by pid 1 failed")
                .then_some(())
        },
    );
    assert_eq!(get(fe).0, 200);
    let _new = upgrade(&mut old, &same, &socket);
    assert_eq!(get(fe).0, 200, "the new process serves");
}

/// A build whose `auto` shares one listener between two workers takes over
/// from a process with one listener per worker (what `auto` picked before it):
/// it keeps those listeners and serves on them, a reload keeps them too, and
/// it hands them on as per-worker listeners (a config asking for those by
/// name takes them over from it).
#[test]
fn an_auto_accept_takes_over_per_worker_listeners_and_keeps_them() {
    let a = Backend::http("a");
    let socket_dir = tempfile::tempdir().expect("tempdir");
    let socket = socket_path(&socket_dir);
    let per_worker = config("127.0.0.1:0", "2s", "accept = \"reuseport\"", &[(&a, 1)]);
    let mut old = start(&per_worker, &socket);
    let fe = old.frontend(FRONTEND);
    let listeners = listening_sockets(fe);
    assert_eq!(listeners.len(), 2, "one listener per worker");

    let auto = config(&fe.to_string(), "2s", "", &[(&a, 1)]);
    let new = upgrade(&mut old, &auto, &socket);
    assert_eq!(listening_sockets(fe), listeners, "the same sockets, kept");
    for _ in 0..8 {
        assert_eq!(get(fe), (200, "a".to_owned()), "served on them");
    }
    let mut new = new;
    reload(&new, &auto, 1.0);
    assert_eq!(listening_sockets(fe), listeners, "kept across a reload");
    assert_eq!(get(fe), (200, "a".to_owned()));

    let explicit = config(&fe.to_string(), "2s", "accept = \"reuseport\"", &[(&a, 1)]);
    let _next = upgrade(&mut new, &explicit, &socket);
    assert_eq!(listening_sockets(fe), listeners, "handed on as they are");
    assert_eq!(get(fe), (200, "a".to_owned()));
}

#[test]
fn connections_queued_across_the_hand_over_are_all_served() {
    queued_across_the_hand_over("", "");
}

/// The same from a process on the io_uring engine (its rings must have
/// cancelled their accepts before the hand-over is acknowledged) to one on
/// tokio, and from tokio to io_uring: a hand-over may change the engine.
#[test]
fn connections_queued_across_a_hand_over_between_engines_are_all_served() {
    const RING: &str = "\nengine = \"io-uring\"";
    queued_across_the_hand_over(RING, "");
    queued_across_the_hand_over("", RING);
}

/// Connections queued while nobody accepts, between a process with
/// `old_engine` and one with `new_engine` (a settings line, or nothing):
/// each is served once, by the new process.
fn queued_across_the_hand_over(old_engine: &str, new_engine: &str) {
    const QUEUED: usize = 50;
    let a = Backend::http("a");
    let socket_dir = tempfile::tempdir().expect("tempdir");
    let socket = socket_path(&socket_dir);
    let per_worker = format!("accept = \"reuseport\"{old_engine}");
    let mut old = start(
        &config("127.0.0.1:0", "30s", &per_worker, &[(&a, 1)]),
        &socket,
    );
    let fe = old.frontend(FRONTEND);
    let listeners = listening_sockets(fe);
    assert_eq!(listeners.len(), 2, "one listener per worker");

    // A kept-alive connection keeps the old process draining, alive, after the hand-over.
    let mut held = connect(fe).expect("connect");
    assert_eq!(http_keepalive_get(&mut held, "/").expect("GET").0, 200);
    let per_worker = format!("accept = \"reuseport\"{new_engine}");
    let new = start(
        &config(&fe.to_string(), "30s", &per_worker, &[(&a, 1)]),
        &socket,
    );
    assert_eq!(
        listening_sockets(fe),
        listeners,
        "the same kernel sockets, handed over"
    );
    // The old process has stopped accepting; stopping the new one leaves
    // nobody accepting: connections now wait in the listeners' queues.
    new.signal(libc::SIGSTOP);
    let mut queued: Vec<TcpStream> = (0..QUEUED)
        .map(|i| {
            let mut c = connect(fe).unwrap_or_else(|e| panic!("connect #{i}: {e}"));
            c.write_all(b"GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
                .expect("send a request");
            c
        })
        .collect();
    assert!(
        old.try_wait().is_none(),
        "the old process drains its kept-alive connection"
    );
    drop(held);
    let status = old.wait_exit(OLD_EXIT);
    assert!(status.success(), "the old process exited {status}");

    // Only the new process holds the listeners now; it was never told about these.
    new.signal(libc::SIGCONT);
    for (i, c) in queued.iter_mut().enumerate() {
        let mut response = String::new();
        c.read_to_string(&mut response)
            .unwrap_or_else(|e| panic!("queued connection #{i}: {e}"));
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "queued connection #{i}: {response:?}"
        );
    }
    assert_eq!(
        new.metric("lb_frontend_connections_total", &[("frontend", FRONTEND)]),
        Some(QUEUED as f64),
        "each queued connection was accepted once, by the new process"
    );
}

#[test]
fn udp_echo_keeps_working_across_an_upgrade() {
    let echo = Backend::udp_echo("u");
    let socket_dir = tempfile::tempdir().expect("tempdir");
    let socket = socket_path(&socket_dir);
    let udp = "protocol = \"udp\"";
    let mut old = start(&config("127.0.0.1:0", "1s", udp, &[(&echo, 1)]), &socket);
    let fe = old.frontend(FRONTEND);
    let before = UdpClient::connect(std::net::Ipv4Addr::LOCALHOST, fe);
    assert_eq!(before.echo(b"before"), b"before");

    let new = start(&config(&fe.to_string(), "1s", udp, &[(&echo, 1)]), &socket);
    // The old process drains (its flow is open) but reads no more: a new
    // client's datagrams all reach the new process, none is dropped as a
    // new flow of a draining process.
    let after = UdpClient::connect(std::net::Ipv4Addr::LOCALHOST, fe);
    for i in 0..20u32 {
        let d = format!("after-{i}");
        assert_eq!(after.echo(d.as_bytes()), d.as_bytes());
    }
    assert_eq!(
        before.echo(b"again"),
        b"again",
        "an old flow's client goes on, via the new process"
    );
    let status = old.wait_exit(OLD_EXIT);
    assert!(status.success(), "the old process exited {status}");
    assert_eq!(
        new.metric("lb_udp_dropped_datagrams_total", &[("frontend", FRONTEND)])
            .unwrap_or(0.0),
        0.0
    );
}
