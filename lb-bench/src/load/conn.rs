//! A worker's connection: opening it (from the next source address, timing
//! the dial, starting its flow record, reading a TCP greeting), closing it so
//! that TIME_WAIT lands on the server, and the short names the error table
//! gives I/O errors.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::report::FlowRecord;
use super::state::Shared;
use super::tally::WorkerStats;
use crate::http::HttpConn;
use crate::net::{self, Target};

/// An open connection and what is known about its flow.
pub(super) struct Conn {
    pub(super) io: ConnIo,
    pub(super) local: SocketAddr,
    /// Index into the worker's `flows` when this flow is being recorded.
    pub(super) flow: Option<usize>,
    pub(super) first_done: bool,
    /// TCP: the backend's greeting.
    pub(super) greeting: Option<Vec<u8>>,
}

pub(super) enum ConnIo {
    Http(HttpConn),
    Tcp(BufReader<TcpStream>),
}

/// The error table's name for an I/O error.
pub(super) fn io_kind(e: &std::io::Error) -> String {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused => "connection refused".into(),
        K::ConnectionReset => "connection reset by peer".into(),
        K::ConnectionAborted => "connection aborted".into(),
        K::BrokenPipe => "broken pipe".into(),
        K::TimedOut => "timed out".into(),
        K::AddrNotAvailable => "address not available".into(),
        K::AddrInUse => "address in use".into(),
        K::UnexpectedEof => "unexpected EOF".into(),
        _ => match e.raw_os_error() {
            Some(libc::EMFILE) | Some(libc::ENFILE) => "too many open files".into(),
            _ => e.to_string(),
        },
    }
}

/// Opens the worker's next connection; the error is the error table's name.
pub(super) async fn open(shared: &Shared, stats: &mut WorkerStats) -> Result<Conn, String> {
    let spec = &shared.spec;
    let stream = dial(shared, stats).await?;
    let local = stream
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
    let peer = stream.peer_addr().unwrap_or(spec.target.addr());
    let flow = start_flow_record(shared, stats, local, peer);
    let (io, greeting) = match spec.target {
        Target::Http { .. } => (ConnIo::Http(HttpConn::new(stream)), None),
        Target::Tcp { .. } => {
            let mut r = BufReader::new(stream);
            let greeting = if spec.tcp_greeting {
                Some(read_greeting(&mut r).await?)
            } else {
                None
            };
            (ConnIo::Tcp(r), greeting)
        }
    };
    Ok(Conn {
        io,
        local,
        flow,
        first_done: false,
        greeting,
    })
}

/// Connects from the next source address, counting the dial time.
async fn dial(shared: &Shared, stats: &mut WorkerStats) -> Result<TcpStream, String> {
    let source = shared.sources.pick();
    let t0 = Instant::now();
    let stream = net::connect_from(source, shared.spec.target.addr())
        .await
        .map_err(|e| match source {
            Some(ip) => format!("connect from {ip}: {}", io_kind(&e)),
            None => format!("connect: {}", io_kind(&e)),
        })?;
    stats.dialed(t0.elapsed().as_micros() as u64);
    Ok(stream)
}

/// Starts this connection's flow record while the spec wants more; its index.
fn start_flow_record(
    shared: &Shared,
    stats: &mut WorkerStats,
    local: SocketAddr,
    peer: SocketAddr,
) -> Option<usize> {
    shared.take_flow_record().then(|| {
        stats.flows.push(FlowRecord {
            t_ms: 0.0,
            src: local,
            dst: peer,
            proto: "TCP",
            node: None,
            seen: None,
            requests: 0,
        });
        stats.flows.len() - 1
    })
}

/// TCP: the line the echo server names itself with, trailing whitespace cut.
async fn read_greeting(r: &mut BufReader<TcpStream>) -> Result<Vec<u8>, String> {
    let mut line = Vec::new();
    let n = r
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| io_kind(&e))?;
    if n == 0 {
        return Err("connection closed before the greeting".into());
    }
    while line.last().is_some_and(|b| b.is_ascii_whitespace()) {
        line.pop();
    }
    Ok(line)
}

/// HTTP, after `Connection: close`: lets the server close first (so TIME_WAIT lands
/// on its side, not on the client's ports), waiting a little for its FIN.
pub(super) async fn wait_for_close(conn: Conn) {
    let mut byte = [0u8; 512];
    let read = async {
        match conn.io {
            ConnIo::Http(mut h) => {
                while matches!(h.stream.read(&mut byte).await, Ok(n) if n > 0) {}
            }
            ConnIo::Tcp(mut t) => {
                // The echo server closes only after our EOF: shut down our side first.
                if t.get_mut().shutdown().await.is_ok() {
                    while matches!(t.read(&mut byte).await, Ok(n) if n > 0) {}
                }
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(500), read).await;
}
