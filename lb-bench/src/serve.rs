//! The one backend of the tree: what every `lb-bench compare` row is measured
//! against (in process, or as `lb-bench serve` when a peer needs a separate
//! process), the hop model's pod in `lb-bench experiment` and the end-to-end
//! tests, and the backend process those tests SIGKILL and restart (`lb-tests`'
//! `Backend` runs `lb-bench serve`). It stays hand-written and small rather
//! than hyper: every benchmark row includes its cost, so it must cost as
//! little as nginx's `return 200` and the same in every run. Kinds:
//!
//! - `http`: HTTP/1.1 keep-alive; every response is 200 with `X-Node: NAME`,
//!   `X-Seen-Source: IP:PORT` (the peer this server saw) and body `NAME\n`.
//!   `Connection: close` or HTTP/1.0 closes after the response (server first).
//! - `echo`: writes `NAME\n` on connect, then echoes; on the client's EOF it
//!   shuts down its write side, and keeps reading until the client closes too,
//!   so a late client write is not answered with a reset.
//! - `sink`: reads and discards until EOF, then closes.
//! - `udp-echo`: echoes every UDP datagram (up to 65,535 bytes) to its sender.
//! - `quic`: a quinn server of the `lb-echo` protocol whose connection IDs
//!   carry its QUIC-LB server ID ([`crate::quic`]).
//!
//! The two UDP kinds also answer HTTP on TCP at the same port number (200 to
//! any request, as `http`), their health signal: Azure probes a UDP service
//! over TCP or HTTP only. Their binding and the echo live in `serve/udp.rs`.
//!
//! All run on one single-threaded tokio runtime, like one nginx worker. A
//! [`ConnLog`], when given, records every accepted peer and how many requests
//! it sent: tests assert on what the backend itself saw. [`serve_forever`] is
//! the `lb-bench serve` process, which writes `{"NAME": "IP:PORT"}` to its
//! ready file once it listens ([`parse_serve_ready`] reads it back; for the
//! UDP kinds the address is the UDP one, and TCP has the same port).
//! [`Counts`] are what each UDP-side server did, for tests that assert on
//! the backend's own view.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::error::{Error, IoContext, Result};
use crate::http::find;
use crate::quic::{LbIdentity, QuicCounts};

mod udp;

/// What a built-in server does with a connection or a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Http,
    Echo,
    Sink,
    UdpEcho,
    Quic(LbIdentity),
}

impl Kind {
    /// Served on UDP, with an HTTP health listener on TCP at the same port.
    pub fn is_udp(self) -> bool {
        matches!(self, Kind::UdpEcho | Kind::Quic(_))
    }
}

/// `KIND:NAME=ADDR`, e.g. `http:node-1=127.0.0.1:0`, or
/// `quic:NAME=ADDR,sid=HEX[,config=N][,nonce=N]` (config 0 and a 4-byte
/// nonce unless given; the server ID's length is its hex's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerSpec {
    pub kind: Kind,
    pub name: String,
    pub addr: SocketAddr,
}

const SPEC_FORMAT: &str = "want KIND:NAME=ADDR with KIND http, echo, sink or udp-echo, or quic:NAME=ADDR,sid=HEX[,config=N][,nonce=N]";

impl std::str::FromStr for ServerSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<ServerSpec> {
        let bad = |why: &str| Error::BadArgument(format!("server `{s}`: {why}{SPEC_FORMAT}"));
        let (kind, rest) = s.split_once(':').ok_or_else(|| bad(""))?;
        let (name, rest) = rest.split_once('=').ok_or_else(|| bad(""))?;
        let (addr, options) = rest.split_once(',').unwrap_or((rest, ""));
        let kind = match kind {
            "http" => Kind::Http,
            "echo" => Kind::Echo,
            "sink" => Kind::Sink,
            "udp-echo" => Kind::UdpEcho,
            "quic" => Kind::Quic(quic_options(options).map_err(|why| bad(&format!("{why}; ")))?),
            _ => return Err(bad("")),
        };
        if !options.is_empty() && !matches!(kind, Kind::Quic(_)) {
            return Err(bad("options are for quic only; "));
        }
        Ok(ServerSpec {
            kind,
            name: name.to_owned(),
            addr: addr.parse().map_err(|_| bad("bad ADDR; "))?,
        })
    }
}

/// `sid=HEX[,config=N][,nonce=N]`, in any order.
fn quic_options(options: &str) -> std::result::Result<LbIdentity, String> {
    let (mut sid, mut config, mut nonce) = (None, 0u8, 4usize);
    for option in options.split(',').filter(|o| !o.is_empty()) {
        match option.split_once('=') {
            Some(("sid", hex)) => {
                sid = Some(lb_core::ServerId::from_hex(hex).map_err(|e| e.to_string())?)
            }
            Some(("config", n)) => config = n.parse().map_err(|_| format!("config `{n}`"))?,
            Some(("nonce", n)) => nonce = n.parse().map_err(|_| format!("nonce `{n}`"))?,
            _ => return Err(format!("unknown option `{option}`")),
        }
    }
    let sid = sid.ok_or("sid=HEX is required")?;
    LbIdentity::new(config, sid, nonce).map_err(|e| e.to_string())
}

/// The spec as it parses back (`lb-bench serve` takes it as an argument).
impl std::fmt::Display for ServerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            Kind::Http => "http",
            Kind::Echo => "echo",
            Kind::Sink => "sink",
            Kind::UdpEcho => "udp-echo",
            Kind::Quic(_) => "quic",
        };
        write!(f, "{kind}:{}={}", self.name, self.addr)?;
        if let Kind::Quic(id) = self.kind {
            write!(
                f,
                ",sid={},config={},nonce={}",
                id.server_id,
                id.config.config_id(),
                id.config.nonce_len()
            )?;
        }
        Ok(())
    }
}

/// What one UDP-side server did: datagrams and bytes received (udp-echo
/// echoes each), and for quic its connections and requests.
#[derive(Debug, Default)]
pub struct Counts {
    pub datagrams: AtomicU64,
    pub bytes: AtomicU64,
    pub quic: Arc<QuicCounts>,
}

/// One bound server: its spec with the bound address, its TCP listener
/// (the server itself, or the UDP kinds' health listener), its UDP socket.
#[derive(Debug)]
pub struct Bound {
    pub spec: ServerSpec,
    pub tcp: std::net::TcpListener,
    pub udp: Option<std::net::UdpSocket>,
    pub counts: Arc<Counts>,
}

/// Binds every spec (std sockets, so the caller learns the addresses at once).
pub fn bind(specs: &[ServerSpec]) -> Result<Vec<Bound>> {
    specs.iter().map(bind_one).collect()
}

fn bind_one(s: &ServerSpec) -> Result<Bound> {
    let what = || format!("bind {} on {}", s.name, s.addr);
    let (tcp, udp) = if s.kind.is_udp() {
        let (udp, tcp) = udp::bind_pair(s.addr).ctx(what)?;
        (tcp, Some(udp))
    } else {
        (std::net::TcpListener::bind(s.addr).ctx(what)?, None)
    };
    tcp.set_nonblocking(true).ctx(|| "set_nonblocking".into())?;
    let addr = match &udp {
        Some(u) => u.local_addr(),
        None => tcp.local_addr(),
    }
    .ctx(|| "local_addr".into())?;
    Ok(Bound {
        spec: ServerSpec { addr, ..s.clone() },
        tcp,
        udp,
        counts: Arc::default(),
    })
}

/// Serves the bound servers until the future is dropped. `accepted` counts
/// TCP connections.
pub async fn serve(bound: Vec<Bound>, accepted: Arc<AtomicU64>) {
    serve_logged(bound, accepted, None).await;
}

/// [`serve`], also recording every TCP connection in `log` when given.
pub async fn serve_logged(bound: Vec<Bound>, accepted: Arc<AtomicU64>, log: Option<Arc<ConnLog>>) {
    let mut tasks = tokio::task::JoinSet::new();
    for b in bound {
        if let Some(socket) = b.udp {
            udp::spawn(&mut tasks, &b.spec, socket, b.counts);
        }
        let Ok(l) = TcpListener::from_std(b.tcp) else {
            continue;
        };
        tasks.spawn(accept_loop(b.spec, l, Arc::clone(&accepted), log.clone()));
    }
    while tasks.join_next().await.is_some() {}
}

/// Accepts connections forever, one task each.
async fn accept_loop(
    spec: ServerSpec,
    l: TcpListener,
    accepted: Arc<AtomicU64>,
    log: Option<Arc<ConnLog>>,
) {
    let name: Arc<str> = Arc::from(spec.name.as_str());
    loop {
        let Ok((stream, peer)) = l.accept().await else {
            // EMFILE and the like: back off instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        accepted.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let name = Arc::clone(&name);
        let entry = log.as_ref().map(|log| log.opened(peer));
        tokio::spawn(async move {
            let _ = match spec.kind {
                // The UDP kinds' TCP side is their HTTP health listener.
                Kind::Http | Kind::UdpEcho | Kind::Quic(_) => {
                    http_conn(stream, peer, &name, entry).await
                }
                Kind::Echo => echo_conn(stream, &name).await,
                Kind::Sink => sink_conn(stream).await,
            };
        });
    }
}

/// One connection a server accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedConn {
    /// The source address the server saw.
    pub peer: SocketAddr,
    /// HTTP requests answered on it (0 for echo and sink).
    pub requests: usize,
}

/// Every connection the servers accepted, in order: an observer's record for
/// tests (the hop model's pod). Off unless asked for, so benchmarks never
/// take its lock.
#[derive(Debug, Default)]
pub struct ConnLog(Mutex<Vec<LoggedConn>>);

impl ConnLog {
    /// A copy of the record so far.
    pub fn conns(&self) -> Vec<LoggedConn> {
        self.lock().clone()
    }

    fn opened(self: &Arc<Self>, peer: SocketAddr) -> LogEntry {
        let mut all = self.lock();
        all.push(LoggedConn { peer, requests: 0 });
        LogEntry {
            log: Arc::clone(self),
            index: all.len() - 1,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<LoggedConn>> {
        // A panicking holder leaves the record readable: it is only counts.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A connection's place in a [`ConnLog`].
struct LogEntry {
    log: Arc<ConnLog>,
    index: usize,
}

impl LogEntry {
    fn answered(&self, requests: usize) {
        self.log.lock()[self.index].requests += requests;
    }
}

async fn http_conn(
    mut stream: TcpStream,
    peer: SocketAddr,
    name: &str,
    log: Option<LogEntry>,
) -> std::io::Result<()> {
    let body = format!("{name}\n");
    let keep = format!(
        "HTTP/1.1 200 OK\r\nX-Node: {name}\r\nX-Seen-Source: {peer}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let close = format!(
        "HTTP/1.1 200 OK\r\nX-Node: {name}\r\nX-Seen-Source: {peer}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut out: Vec<u8> = Vec::with_capacity(4096);
    loop {
        // Answer every complete request in the buffer (pipelining included).
        let mut closing = false;
        let mut answered = 0;
        while let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = &buf[..end + 4];
            let (length, close_it) = request_meta(head);
            if buf.len() < end + 4 + length {
                break;
            }
            buf.drain(..end + 4 + length);
            answered += 1;
            if close_it {
                out.extend_from_slice(close.as_bytes());
                closing = true;
                break;
            }
            out.extend_from_slice(keep.as_bytes());
        }
        if !out.is_empty() {
            // Counted before the write, so a client that has its response
            // finds the request in the log.
            if let Some(log) = &log {
                log.answered(answered);
            }
            stream.write_all(&out).await?;
            out.clear();
        }
        if closing {
            stream.shutdown().await?;
            // Drain what the client still sends until it closes too.
            let mut scratch = [0u8; 1024];
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while matches!(stream.read(&mut scratch).await, Ok(n) if n > 0) {}
            })
            .await;
            return Ok(());
        }
        if buf.len() > 64 * 1024 {
            return Ok(());
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}

/// (request body length, close after the response) from a request head.
fn request_meta(head: &[u8]) -> (usize, bool) {
    let mut length = 0;
    let mut close = head
        .split(|&b| b == b'\n')
        .next()
        .is_some_and(|l| l.ends_with(b"HTTP/1.0\r") || l.ends_with(b"HTTP/1.0"));
    for line in head.split(|&b| b == b'\n').skip(1) {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (k, v) = (&line[..colon], line[colon + 1..].trim_ascii());
        if k.eq_ignore_ascii_case(b"content-length") {
            length = std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
        } else if k.eq_ignore_ascii_case(b"connection") {
            if v.eq_ignore_ascii_case(b"close") {
                close = true;
            } else if v.eq_ignore_ascii_case(b"keep-alive") {
                close = false;
            }
        }
    }
    (length, close)
}

async fn echo_conn(mut stream: TcpStream, name: &str) -> std::io::Result<()> {
    stream.write_all(format!("{name}\n").as_bytes()).await?;
    {
        let (r, mut w) = stream.split();
        // 64 KiB reads: the end-to-end tests move 128 MiB through it.
        let mut r = tokio::io::BufReader::with_capacity(64 * 1024, r);
        tokio::io::copy_buf(&mut r, &mut w).await?;
    }
    stream.shutdown().await?;
    // Keep the socket until the client closes too, so a late client write
    // is not answered with a reset.
    let mut scratch = [0u8; 1024];
    while stream.read(&mut scratch).await? > 0 {}
    Ok(())
}

async fn sink_conn(mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    while stream.read(&mut buf).await? > 0 {}
    stream.shutdown().await
}

/// Built-in servers on their own thread and runtime, stopped on drop.
pub struct InProcess {
    pub servers: Vec<ServerSpec>,
    pub accepted: Arc<AtomicU64>,
    counts: Vec<Arc<Counts>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcess {
    pub fn start(specs: &[ServerSpec]) -> Result<InProcess> {
        Self::start_with(specs, None)
    }

    /// [`InProcess::start`], recording every connection in `log`.
    pub fn start_logged(specs: &[ServerSpec], log: Arc<ConnLog>) -> Result<InProcess> {
        Self::start_with(specs, Some(log))
    }

    fn start_with(specs: &[ServerSpec], log: Option<Arc<ConnLog>>) -> Result<InProcess> {
        let bound = bind(specs)?;
        let servers: Vec<ServerSpec> = bound.iter().map(|b| b.spec.clone()).collect();
        let counts = bound.iter().map(|b| Arc::clone(&b.counts)).collect();
        let accepted = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let counter = Arc::clone(&accepted);
        let thread = std::thread::Builder::new()
            .name("lb-bench-servers".into())
            .spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(async move {
                    tokio::select! {
                        _ = serve_logged(bound, counter, log) => {}
                        _ = stopped => {}
                    }
                });
            })
            .ctx(|| "spawn the server thread".into())?;
        Ok(InProcess {
            servers,
            accepted,
            counts,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.servers.iter().find(|s| s.name == name).map(|s| s.addr)
    }

    /// What server `name` did on UDP (zero for the TCP kinds).
    pub fn counts(&self, name: &str) -> Option<&Counts> {
        let i = self.servers.iter().position(|s| s.name == name)?;
        Some(&self.counts[i])
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The ready file of `lb-bench serve`: `{"NAME": "IP:PORT", ...}`.
pub fn parse_serve_ready(text: &str, specs: &[ServerSpec]) -> Result<Vec<ServerSpec>> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| Error::Protocol {
        what: "lb-bench serve's ready file".into(),
        detail: format!("{e}: {text}"),
    })?;
    specs
        .iter()
        .map(|s| {
            let addr = v[&s.name]
                .as_str()
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| Error::Protocol {
                    what: "lb-bench serve's ready file".into(),
                    detail: format!("no address for {}: {text}", s.name),
                })?;
            Ok(ServerSpec { addr, ..s.clone() })
        })
        .collect()
}

/// `lb-bench serve`: runs built-in servers until killed; writes their
/// addresses as JSON to `ready` once they listen.
pub fn serve_forever(specs: &[ServerSpec], ready: Option<&Path>) -> Result<()> {
    let bound = bind(specs)?;
    if let Some(path) = ready {
        let map: serde_json::Map<String, serde_json::Value> = bound
            .iter()
            .map(|b| {
                (
                    b.spec.name.clone(),
                    serde_json::Value::String(b.spec.addr.to_string()),
                )
            })
            .collect();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::Value::Object(map).to_string())
            .ctx(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).ctx(|| format!("write {}", path.display()))?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ctx(|| "build the runtime".into())?;
    rt.block_on(serve(bound, std::sync::Arc::default()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn specs_parse() {
        let s: ServerSpec = "http:node-1=127.0.0.1:0".parse().unwrap();
        assert_eq!((s.kind, s.name.as_str()), (Kind::Http, "node-1"));
        assert!("ftp:x=127.0.0.1:0".parse::<ServerSpec>().is_err());
        assert!("http:x".parse::<ServerSpec>().is_err());
        let u: ServerSpec = "udp-echo:u=127.0.0.1:9".parse().unwrap();
        assert_eq!(u.kind, Kind::UdpEcho);
        assert!("http:x=127.0.0.1:0,sid=01".parse::<ServerSpec>().is_err());
    }

    #[test]
    fn quic_specs_parse_and_print_back() {
        let q: ServerSpec = "quic:node-2=127.0.0.1:4435,nonce=6,sid=0a0b,config=2"
            .parse()
            .unwrap();
        let Kind::Quic(id) = q.kind else {
            panic!("{q:?}")
        };
        assert_eq!(id.server_id.to_string(), "0a0b");
        assert_eq!(
            (
                id.config.config_id(),
                id.config.server_id_len(),
                id.config.nonce_len()
            ),
            (2, 2, 6)
        );
        assert_eq!(
            q.to_string(),
            "quic:node-2=127.0.0.1:4435,sid=0a0b,config=2,nonce=6"
        );
        assert_eq!(q.to_string().parse::<ServerSpec>().unwrap(), q);
        let plain: ServerSpec = "quic:n=127.0.0.1:0,sid=c4605e".parse().unwrap();
        assert_eq!(
            plain.to_string(),
            "quic:n=127.0.0.1:0,sid=c4605e,config=0,nonce=4"
        );
        for bad in [
            "quic:n=127.0.0.1:0",
            "quic:n=127.0.0.1:0,sid=zz",
            "quic:n=127.0.0.1:0,sid=01,config=7",
            "quic:n=127.0.0.1:0,sid=01,nonce=3",
            "quic:n=127.0.0.1:0,sid=01,color=red",
        ] {
            assert!(bad.parse::<ServerSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn udp_echo_answers_whole_datagrams_and_health_over_http() {
        let servers = InProcess::start(&["udp-echo:u=127.0.0.1:0".parse().unwrap()]).unwrap();
        let addr = servers.addr("u").unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let big: Vec<u8> = (0..65_507u32).map(|i| (i % 253) as u8).collect();
        let mut buf = vec![0u8; 65_535];
        for d in [&b"ping"[..], &big[..], &[][..]] {
            client.send_to(d, addr).unwrap();
            let (n, from) = client.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..n], from), (d, addr));
        }
        let counts = servers.counts("u").unwrap();
        assert_eq!(counts.datagrams.load(Ordering::Relaxed), 3);
        assert_eq!(counts.bytes.load(Ordering::Relaxed), 4 + 65_507);

        let mut h = std::net::TcpStream::connect(addr).unwrap();
        h.write_all(b"GET /anything HTTP/1.0\r\n\r\n").unwrap();
        let mut text = String::new();
        h.read_to_string(&mut text).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        assert!(text.contains("X-Node: u"), "{text}");
    }

    #[test]
    fn a_quic_server_answers_whoami_and_counts() {
        let servers =
            InProcess::start(&["quic:q=127.0.0.1:0,sid=c4605e".parse().unwrap()]).unwrap();
        let addr = servers.addr("q").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (name, seen, me) = rt.block_on(async {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let me = socket.local_addr().unwrap();
            let ep = crate::quic::client_endpoint(socket).unwrap();
            let step = std::time::Duration::from_secs(10);
            let conn = tokio::time::timeout(step, crate::quic::connect(&ep, addr))
                .await
                .unwrap()
                .unwrap();
            let (name, seen) = tokio::time::timeout(step, crate::quic::whoami(&conn))
                .await
                .unwrap()
                .unwrap();
            (name, seen, me)
        });
        assert_eq!((name.as_str(), seen), ("q", me));
        let quic = &servers.counts("q").unwrap().quic;
        assert_eq!(quic.connections.load(Ordering::Relaxed), 1);
        let mut h = std::net::TcpStream::connect(addr).unwrap();
        h.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut text = String::new();
        h.read_to_string(&mut text).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    }

    #[test]
    fn the_ready_file_names_the_udp_address() {
        let spec: ServerSpec = "udp-echo:u=127.0.0.1:0".parse().unwrap();
        let bound = bind(std::slice::from_ref(&spec)).unwrap();
        let text = format!(r#"{{"u": "{}"}}"#, bound[0].spec.addr);
        let back = parse_serve_ready(&text, &[spec]).unwrap();
        assert_eq!(
            back[0].addr,
            bound[0].udp.as_ref().unwrap().local_addr().unwrap()
        );
        assert_eq!(
            back[0].addr.port(),
            bound[0].tcp.local_addr().unwrap().port()
        );
    }

    #[test]
    fn http_echo_and_sink_answer() {
        let servers = InProcess::start(&[
            "http:node-1=127.0.0.1:0".parse().unwrap(),
            "echo:e=127.0.0.1:0".parse().unwrap(),
            "sink:s=127.0.0.1:0".parse().unwrap(),
        ])
        .unwrap();
        let mut h = std::net::TcpStream::connect(servers.addr("node-1").unwrap()).unwrap();
        let me = h.local_addr().unwrap();
        h.write_all(
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        let mut text = String::new();
        h.read_to_string(&mut text).unwrap();
        assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
        assert!(text.contains(&format!("X-Seen-Source: {me}")), "{text}");
        assert!(
            text.ends_with("Connection: close\r\n\r\nnode-1\n"),
            "{text}"
        );

        let mut e = std::net::TcpStream::connect(servers.addr("e").unwrap()).unwrap();
        e.write_all(b"ping").unwrap();
        e.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = String::new();
        e.read_to_string(&mut back).unwrap();
        assert_eq!(back, "e\nping");

        let mut s = std::net::TcpStream::connect(servers.addr("s").unwrap()).unwrap();
        s.write_all(&[7u8; 100_000]).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        assert!(servers.accepted.load(Ordering::Relaxed) >= 3);
    }

    #[test]
    fn the_log_records_each_peer_and_its_requests() {
        let log = Arc::new(ConnLog::default());
        let servers =
            InProcess::start_logged(&["http:pod=127.0.0.1:0".parse().unwrap()], Arc::clone(&log))
                .unwrap();
        let mut h = std::net::TcpStream::connect(servers.addr("pod").unwrap()).unwrap();
        let me = h.local_addr().unwrap();
        h.write_all(b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.0\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        h.read_to_string(&mut text).unwrap();
        assert_eq!(
            log.conns(),
            [LoggedConn {
                peer: me,
                requests: 2
            }]
        );
    }
}
