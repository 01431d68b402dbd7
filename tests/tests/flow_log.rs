//! The flow log loses nothing at shutdown: every flow that closed before the
//! process exits has its line in the file, after SIGTERM (drain), SIGINT
//! (immediate) and a drain timeout alike; flows still open when the drain
//! timeout ends (or at SIGINT) are cut by the balancer and logged with their
//! bytes and the outcome `shutdown`.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use lb_tests::{connect, finish, one_frontend_config, read_line, wait_until, Backend, Proxy};

/// Flows closed before the signal, in each test.
const CLOSED: usize = 200;
const WAIT: Duration = Duration::from_secs(20);

/// A balancer in front of one echo backend, writing a JSON flow log in its directory.
fn start(a: &Backend, drain_timeout: &str) -> (Proxy, PathBuf) {
    let config = format!(
        "drain_timeout = \"{drain_timeout}\"\n{}",
        one_frontend_config("web", "[frontends.health]\nkind = \"none\"", &[a.toml()])
    );
    Proxy::run_with_flow_log(&config)
}

/// What a flow carried: bytes client → backend and backend → client.
type Bytes = (u64, u64);

/// Flow log records by client address: (outcome, bytes).
type Records = BTreeMap<String, (String, Bytes)>;

/// Opens a flow, reads the echo backend's greeting (`a\n`) and has `len`
/// bytes echoed; returns the stream and the flow's client address.
fn open_flow(fe: SocketAddr, len: usize) -> (TcpStream, SocketAddr) {
    let mut s = connect(fe).expect("connect");
    assert_eq!(read_line(&mut s).expect("greeting"), "a");
    let payload = vec![b'x'; len];
    s.write_all(&payload).expect("write");
    let mut back = vec![0u8; len];
    s.read_exact(&mut back).expect("echo");
    assert_eq!(back, payload);
    let local = s.local_addr().expect("local addr");
    (s, local)
}

/// `CLOSED` flows opened and closed one after another; returns each client
/// address with the bytes its flow carried.
fn closed_flows(fe: SocketAddr) -> BTreeMap<String, Bytes> {
    (0..CLOSED)
        .map(|i| {
            let len = 1 + i % 97;
            let (mut s, local) = open_flow(fe, len);
            assert!(finish(&mut s).expect("finish").is_empty());
            (local.to_string(), (len as u64, len as u64 + 2))
        })
        .collect()
}

/// The flow log after exit, by client address: (outcome, bytes). Asserts
/// every line is complete JSON and no client appears twice.
fn records(path: &PathBuf) -> Records {
    let text = fs::read_to_string(path).unwrap_or_default();
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "the last line is cut"
    );
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("line {line:?}: {e}"));
        let client = v["client"].as_str().expect("client").to_owned();
        let rec = (
            v["outcome"].as_str().expect("outcome").to_owned(),
            (
                v["bytes_to_backend"].as_u64().expect("bytes_to_backend"),
                v["bytes_from_backend"]
                    .as_u64()
                    .expect("bytes_from_backend"),
            ),
        );
        assert!(
            out.insert(client.clone(), rec).is_none(),
            "{client} logged twice"
        );
    }
    out
}

/// The records as the flows were: every closed flow, outcome `closed`.
fn expect_closed(flows: &BTreeMap<String, Bytes>) -> Records {
    flows
        .iter()
        .map(|(c, b)| (c.clone(), ("closed".to_owned(), *b)))
        .collect()
}

/// Opens `n` flows that stay open, each having carried a little data, and
/// adds the records they should get when cut to `expected`.
fn open_flows(fe: SocketAddr, n: usize, expected: &mut Records) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let len = 1000 + i;
            let (s, local) = open_flow(fe, len);
            let bytes = (len as u64, len as u64 + 2);
            expected.insert(local.to_string(), ("shutdown".to_owned(), bytes));
            s
        })
        .collect()
}

/// Waits until the balancer holds exactly `n` connections: every flow
/// closed before has been handed to the flow log.
fn wait_active(proxy: &Proxy, n: usize) {
    wait_until(&format!("{n} active connections"), WAIT, || {
        let v = proxy.metric("lb_frontend_active_connections", &[("frontend", "web")])?;
        (v == n as f64).then_some(())
    });
}

#[test]
fn sigterm_after_a_batch_of_closed_flows_logs_every_one() {
    let a = Backend::echo("a");
    let (mut proxy, path) = start(&a, "10s");
    let flows = closed_flows(proxy.frontend("web"));
    proxy.signal(libc::SIGTERM);
    let status = proxy.wait_exit(WAIT);
    assert!(status.success(), "exit status {status}");
    let got = records(&path);
    assert_eq!(got.len(), CLOSED, "records after SIGTERM");
    assert_eq!(got, expect_closed(&flows));
}

/// SIGINT skips the drain: the open flows are cut at once, and logged too.
#[test]
fn sigint_after_a_batch_of_closed_flows_logs_every_one_and_cuts_the_open_ones() {
    const OPEN: usize = 3;
    let end = signal_with_open_flows("10s", OPEN, libc::SIGINT);
    assert_eq!(end.status.code(), Some(130), "exit status {}", end.status);
    let got = records(&end.log);
    assert_eq!(got.len(), CLOSED + OPEN, "records after SIGINT");
    assert_eq!(got, end.expected);
}

/// Flows still open when the drain timeout ends are cut, and logged with what
/// they carried and the outcome `shutdown`, next to every closed flow.
#[test]
fn drain_timeout_logs_closed_flows_and_the_open_ones_it_cuts() {
    const OPEN: usize = 5;
    let end = signal_with_open_flows("1s", OPEN, libc::SIGTERM);
    assert!(end.status.success(), "exit status {}", end.status);
    let stderr = end.proxy.stderr();
    assert!(stderr.contains("drain timeout"), "{stderr}");
    let got = records(&end.log);
    assert_eq!(got.len(), CLOSED + OPEN, "records after the drain timeout");
    assert_eq!(got, end.expected);
}

/// How a run with open flows ended: the exited balancer, its exit status,
/// its flow log, and the records the log should hold.
struct Ended {
    proxy: Proxy,
    status: ExitStatus,
    log: PathBuf,
    expected: Records,
}

/// A balancer with `drain_timeout` carries `CLOSED` flows closed one after
/// another, then `open` flows left open; once it holds exactly those, it
/// gets `signal`, and is waited for until it exits.
fn signal_with_open_flows(drain_timeout: &str, open: usize, signal: i32) -> Ended {
    let a = Backend::echo("a");
    let (mut proxy, log) = start(&a, drain_timeout);
    let fe = proxy.frontend("web");
    let mut expected = expect_closed(&closed_flows(fe));
    let streams = open_flows(fe, open, &mut expected);
    wait_active(&proxy, open);
    proxy.signal(signal);
    let status = proxy.wait_exit(WAIT);
    drop(streams);
    Ended {
        proxy,
        status,
        log,
        expected,
    }
}
