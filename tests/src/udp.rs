//! UDP for the end-to-end tests of UDP and QUIC frontends.
//!
//! It owns:
//! - [`UdpClient`]: a UDP socket bound to a chosen loopback IP and connected
//!   to a frontend, so the kernel drops any reply that does not come from the
//!   frontend's own address (replies must leave from it).
//! - [`run_echo_load`]: many clients, each a flow, sending numbered datagrams
//!   with at most a window in flight, checking every echo byte for byte and
//!   counting what came back: the bounded-rate load of the UDP echo test.
//! - [`RoutingModel`]: lb-core's own [`Snapshot`] over the same backend names,
//!   mode and seed as a test's config, so a test knows which backend a flow
//!   must reach (udp-echo does not name itself) and can pick a client port
//!   that hashes where it wants.
//! - [`UdpPod`]: an in-process UDP endpoint that answers every datagram with
//!   the source address it saw, and records them: the pod of the node-hop test.
//! - [`frontend_config`]: one frontend, with the worker count a test needs.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lb_core::{
    BackendSet, BackendSpec, DistributionMode, FlowKey, NoHealthyBackends, Snapshot,
    SnapshotParams, DEFAULT_TABLE_SIZE, FLOW_HASH_SEED,
};

use crate::SeededStream;

/// The largest UDP payload over IPv4: 65,535 − 20 (IP header) − 8 (UDP header).
pub const MAX_IPV4_UDP_PAYLOAD: usize = 65_507;
/// How long one datagram's answer may take on loopback, on a busy machine.
pub const ANSWER_WAIT: Duration = Duration::from_secs(5);
/// A receive buffer for any datagram.
const RECV_BUFFER: usize = 65_536;

// ---------------------------------------------------------------------------
// Config.

/// A config with `workers` workers, the admin endpoint on 127.0.0.1:0 and one
/// frontend `name` on 127.0.0.1:0. `settings` goes into the frontend table
/// (plain keys first, then its sub-tables such as `[frontends.health]` or
/// `[frontends.quic]`); `backends` are `[[frontends.backends]]` tables.
pub fn frontend_config(workers: usize, name: &str, settings: &str, backends: &[String]) -> String {
    format!(
        "workers = {workers}\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[[frontends]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\n{settings}\n\n{}",
        backends.join("\n")
    )
}

/// A `[[frontends.backends]]` table with a QUIC-LB server ID (hex).
pub fn quic_backend_toml(name: &str, addr: SocketAddr, server_id: &str) -> String {
    format!(
        "{}server_id = \"{server_id}\"\n",
        crate::backend_toml(name, addr)
    )
}

// ---------------------------------------------------------------------------
// Clients.

/// A UDP socket bound to `(ip, 0)` and connected to a frontend.
pub struct UdpClient {
    socket: UdpSocket,
    /// The client's own address: the flow's source.
    pub local: SocketAddr,
    /// The frontend it sends to.
    pub peer: SocketAddr,
}

impl UdpClient {
    /// Binds `(ip, 0)` and connects to `to`.
    pub fn connect(ip: Ipv4Addr, to: SocketAddr) -> UdpClient {
        let socket = UdpSocket::bind((ip, 0)).unwrap_or_else(|e| panic!("bind {ip}:0: {e}"));
        Self::from_socket(socket, to)
    }

    /// Connects an already bound socket to `to`.
    pub fn from_socket(socket: UdpSocket, to: SocketAddr) -> UdpClient {
        socket
            .connect(to)
            .unwrap_or_else(|e| panic!("connect a UDP socket to {to}: {e}"));
        let local = socket.local_addr().expect("local_addr");
        UdpClient {
            socket,
            local,
            peer: to,
        }
    }

    pub fn send(&self, datagram: &[u8]) {
        let n = self
            .socket
            .send(datagram)
            .unwrap_or_else(|e| panic!("send {} bytes from {}: {e}", datagram.len(), self.local));
        assert_eq!(n, datagram.len(), "a datagram goes whole or not at all");
    }

    /// The next datagram from the frontend, waiting at most `timeout`.
    pub fn recv(&self, timeout: Duration) -> io::Result<Vec<u8>> {
        self.socket.set_read_timeout(Some(timeout))?;
        let mut buf = vec![0u8; RECV_BUFFER];
        let n = self.socket.recv(&mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Sends `datagram` and returns the answer; panics if none comes within [`ANSWER_WAIT`].
    pub fn echo(&self, datagram: &[u8]) -> Vec<u8> {
        self.send(datagram);
        self.recv(ANSWER_WAIT).unwrap_or_else(|e| {
            panic!(
                "no answer to a {}-byte datagram from {} via {} within {ANSWER_WAIT:?}: {e}",
                datagram.len(),
                self.local,
                self.peer
            )
        })
    }

    /// A datagram already waiting, without blocking.
    pub fn try_recv(&self) -> Option<Vec<u8>> {
        self.socket.set_nonblocking(true).expect("nonblocking");
        let mut buf = vec![0u8; RECV_BUFFER];
        let got = self.socket.recv(&mut buf).ok().map(|n| {
            buf.truncate(n);
            buf
        });
        self.socket.set_nonblocking(false).expect("blocking");
        got
    }
}

/// A UDP socket on `ip` whose flow to `dst` the model routes to a backend
/// that `want` accepts; at most `tries` ports are tried (each kernel-chosen).
pub fn bind_routed(
    model: &RoutingModel,
    ip: Ipv4Addr,
    dst: SocketAddr,
    tries: usize,
    want: impl Fn(Option<&str>) -> bool,
) -> UdpSocket {
    for _ in 0..tries {
        let socket = UdpSocket::bind((ip, 0)).unwrap_or_else(|e| panic!("bind {ip}:0: {e}"));
        let local = socket.local_addr().expect("local_addr");
        if want(model.backend(local, dst)) {
            return socket;
        }
    }
    panic!("none of {tries} ports on {ip} hashes to the wanted backend for {dst}");
}

// ---------------------------------------------------------------------------
// The echo load.

/// Bounds of one echo load.
#[derive(Clone, Copy, Debug)]
pub struct EchoLoad {
    /// Datagrams each client sends.
    pub per_client: usize,
    /// Most datagrams a client has in flight (sent, echo not yet back).
    pub window: usize,
    /// Bytes per datagram (at least [`HEADER`]).
    pub payload: usize,
    /// A client gives up when no echo arrives for this long (the rest count as lost).
    pub stall: Duration,
    /// A client stops after this long whatever is left.
    pub limit: Duration,
}

/// Each datagram starts with the client's index and the datagram's sequence
/// number (both u32, big-endian); the rest is a seeded stream of both.
pub const HEADER: usize = 8;

/// What one client of an echo load counted.
#[derive(Clone, Debug, Default)]
pub struct ClientTally {
    pub local: Option<SocketAddr>,
    pub sent: u64,
    /// Echoes that came back intact, each sequence number once.
    pub echoed: u64,
    pub bytes_sent: u64,
    /// What went wrong (a stall, a corrupt or duplicate echo), if anything.
    pub errors: Vec<String>,
}

/// Datagram `seq` of client `client`, `len` bytes, into `buf`.
pub fn numbered_datagram(client: u32, seq: u32, len: usize, buf: &mut Vec<u8>) {
    assert!(
        len >= HEADER,
        "a numbered datagram holds at least its header"
    );
    buf.clear();
    buf.extend_from_slice(&client.to_be_bytes());
    buf.extend_from_slice(&seq.to_be_bytes());
    buf.resize(len, 0);
    SeededStream::new((u64::from(client) << 32) | u64::from(seq)).fill(&mut buf[HEADER..]);
}

/// Runs `load` from every client at once, one thread each; returns each
/// client's tally, in order.
pub fn run_echo_load(clients: Vec<UdpClient>, load: EchoLoad) -> Vec<ClientTally> {
    let threads: Vec<JoinHandle<ClientTally>> = clients
        .into_iter()
        .enumerate()
        .map(|(i, client)| std::thread::spawn(move || echo_client(i as u32, &client, load)))
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().expect("an echo client panicked"))
        .collect()
}

/// One client's windowed loop: fill the window, then send one more per echo.
fn echo_client(index: u32, client: &UdpClient, load: EchoLoad) -> ClientTally {
    let mut tally = ClientTally {
        local: Some(client.local),
        ..ClientTally::default()
    };
    let started = Instant::now();
    let mut got = vec![false; load.per_client];
    let mut out = Vec::with_capacity(load.payload);
    let mut want = Vec::with_capacity(load.payload);
    let mut buf = vec![0u8; RECV_BUFFER];
    let mut next = 0usize;
    let send_next = |next: &mut usize, out: &mut Vec<u8>, tally: &mut ClientTally| {
        numbered_datagram(index, *next as u32, load.payload, out);
        client.send(out);
        tally.sent += 1;
        tally.bytes_sent += out.len() as u64;
        *next += 1;
    };
    while next < load.per_client.min(load.window) {
        send_next(&mut next, &mut out, &mut tally);
    }
    client
        .socket
        .set_read_timeout(Some(load.stall))
        .expect("read timeout");
    while (tally.echoed as usize) < load.per_client {
        if started.elapsed() > load.limit {
            tally
                .errors
                .push(format!("stopped at the {:?} limit", load.limit));
            break;
        }
        let n = match client.socket.recv(&mut buf) {
            Ok(n) => n,
            Err(e) => {
                tally.errors.push(format!(
                    "no echo for {:?} ({e}): {} of {} sent never came back",
                    load.stall,
                    tally.sent - tally.echoed,
                    tally.sent
                ));
                break;
            }
        };
        if let Err(why) = check_echo(index, &buf[..n], next, &mut got, load.payload, &mut want) {
            tally.errors.push(why);
            continue;
        }
        tally.echoed += 1;
        if next < load.per_client {
            send_next(&mut next, &mut out, &mut tally);
        }
    }
    tally
}

/// Checks one echo: ours, already sent, not seen before, byte for byte.
fn check_echo(
    index: u32,
    echo: &[u8],
    sent: usize,
    got: &mut [bool],
    len: usize,
    want: &mut Vec<u8>,
) -> Result<(), String> {
    if echo.len() < HEADER {
        return Err(format!("a {}-byte echo", echo.len()));
    }
    let client = u32::from_be_bytes(echo[..4].try_into().expect("4 bytes"));
    let seq = u32::from_be_bytes(echo[4..8].try_into().expect("4 bytes")) as usize;
    if client != index || seq >= sent {
        return Err(format!(
            "an echo of client {client} seq {seq} reached client {index} (sent {sent})"
        ));
    }
    if std::mem::replace(&mut got[seq], true) {
        return Err(format!("seq {seq} echoed twice"));
    }
    numbered_datagram(index, seq as u32, len, want);
    if echo != &want[..] {
        return Err(format!("seq {seq}: the echo differs from what was sent"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// lb-core's routing, as the balancer does it.

/// A frontend's routing snapshot rebuilt with lb-core from the config's
/// backend names (weight 1), mode, default seed and table size: the
/// backend a new flow must reach.
pub struct RoutingModel {
    snapshot: Snapshot,
}

impl RoutingModel {
    /// Every backend healthy.
    pub fn new(backends: &[&str], mode: DistributionMode) -> RoutingModel {
        Self::with_health(backends, mode, &vec![true; backends.len()])
    }

    /// `healthy[i]` for `backends[i]`.
    pub fn with_health(
        backends: &[&str],
        mode: DistributionMode,
        healthy: &[bool],
    ) -> RoutingModel {
        assert_eq!(backends.len(), healthy.len());
        // The table is built from names and weights only; addresses play no part.
        let placeholder: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let specs = backends
            .iter()
            .map(|n| BackendSpec::new(*n, placeholder, 1))
            .collect();
        let set = BackendSet::new(specs).expect("backend names");
        // The set sorts by name: carry each backend's health along.
        let health = set
            .iter()
            .map(|b| healthy[backends.iter().position(|n| *n == b.name).expect("name")])
            .collect();
        let params = SnapshotParams {
            mode,
            seed: FLOW_HASH_SEED,
            table_size: DEFAULT_TABLE_SIZE,
            no_healthy_backends: NoHealthyBackends::Refuse,
        };
        let snapshot = Snapshot::build(0, params, set, health).expect("snapshot");
        RoutingModel { snapshot }
    }

    /// The backend a new UDP flow from `src` to the frontend at `dst` goes to.
    pub fn backend(&self, src: SocketAddr, dst: SocketAddr) -> Option<&str> {
        let id = self.snapshot.lookup(&FlowKey::udp(src, dst))?;
        self.snapshot.backend(id).map(|b| b.name.as_str())
    }
}

// ---------------------------------------------------------------------------
// A pod that says who it saw.

/// A UDP endpoint that answers every datagram with the source address it saw
/// (`IP:PORT` as text) and records each. Stopped on drop.
pub struct UdpPod {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How often the pod's thread looks at its stop flag when idle.
const POD_STOP_CHECK: Duration = Duration::from_millis(50);

impl UdpPod {
    pub fn start(listen: SocketAddr) -> UdpPod {
        let socket =
            UdpSocket::bind(listen).unwrap_or_else(|e| panic!("bind the pod on {listen}: {e}"));
        socket
            .set_read_timeout(Some(POD_STOP_CHECK))
            .expect("timeout");
        let addr = socket.local_addr().expect("local_addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop) = (Arc::clone(&seen), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut buf = vec![0u8; RECV_BUFFER];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((_, peer)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    seen.lock().expect("pod log").push(peer);
                    let _ = socket.send_to(peer.to_string().as_bytes(), peer);
                }
            })
        };
        UdpPod {
            addr,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// Every source seen, in order of arrival.
    pub fn seen(&self) -> Vec<SocketAddr> {
        self.seen.lock().expect("pod log").clone()
    }
}

impl Drop for UdpPod {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The source a [`UdpPod`] reported in its answer.
pub fn pod_answer(answer: &[u8]) -> SocketAddr {
    std::str::from_utf8(answer)
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "the pod answers IP:PORT, got {:?}",
                String::from_utf8_lossy(answer)
            )
        })
}

/// `127.0.0.x` for the `i`-th of many clients: spread over several source
/// IPs as Azure's clients would be, cycling through `ips` of them.
pub fn client_ip(i: usize, ips: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + (i % ips) as u8)
}

/// Whether `ip` is `addr`'s IP.
pub fn is_ip(addr: SocketAddr, ip: Ipv4Addr) -> bool {
    addr.ip() == IpAddr::V4(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_datagrams_carry_client_and_seq_and_differ() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        numbered_datagram(3, 7, 64, &mut a);
        numbered_datagram(3, 8, 64, &mut b);
        assert_eq!(a.len(), 64);
        assert_eq!(&a[..8], &[0, 0, 0, 3, 0, 0, 0, 7]);
        assert_ne!(a[8..], b[8..]);
        let mut got = vec![false; 10];
        let mut want = Vec::new();
        assert_eq!(check_echo(3, &a, 8, &mut got, 64, &mut want), Ok(()));
        assert!(
            check_echo(3, &a, 8, &mut got, 64, &mut want).is_err(),
            "a duplicate"
        );
        assert!(
            check_echo(4, &b, 9, &mut got, 64, &mut want).is_err(),
            "another client's"
        );
        a[20] ^= 1;
        got[7] = false;
        assert!(
            check_echo(3, &a, 8, &mut got, 64, &mut want).is_err(),
            "a flipped bit"
        );
    }

    #[test]
    fn the_model_spreads_flows_and_skips_down_backends() {
        let dst: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let all = RoutingModel::new(&["c", "a", "b"], DistributionMode::FiveTuple);
        let one_down = RoutingModel::with_health(
            &["c", "a", "b"],
            DistributionMode::FiveTuple,
            &[true, false, true],
        );
        let mut seen = std::collections::BTreeSet::new();
        for port in 1000..1100 {
            let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
            seen.insert(all.backend(src, dst).unwrap().to_owned());
            assert_ne!(one_down.backend(src, dst), Some("a"));
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
    }
}
