//! The soak's load, all at once and all bounded by the phase's end:
//!
//! - keep-alive requests: lb-bench's own generator, [`KEEPALIVE_WORKERS`]
//!   connections paced at [`KEEPALIVE_QPS`] each;
//! - new connections: the same generator without keep-alive (a new 5-tuple
//!   per request), [`NEW_CONN_WORKERS`] at [`NEW_CONN_QPS`] each;
//! - bulk: [`BULK_BYTES`] up and echoed back through the `bulk` frontend,
//!   every byte checked, one transfer per [`BULK_EVERY`];
//! - idle connections: [`IDLE_CONNS`] opened (one request each), held idle
//!   for [`IDLE_HOLD`] (less than lb-proxy's idle timeout), asked again, and
//!   closed; then the next cycle.
//!
//! Both request loads run in [`CHUNK`]-long runs of the generator, so each
//! failure is timed to within a chunk: a failure in a chunk that overlaps a
//! flap is the flap's (see `timeline`). Everything is recorded in [`Live`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::rig::IDLE_TIMEOUT;
use super::timeline::{Chunk, IdleCheck, LoadKind, Timeline, Transfer};
use crate::http::{get_request, HttpConn, RequestError};
use crate::load::{self, LoadSpec};
use crate::net::Target;

const KEEPALIVE_WORKERS: usize = 4;
/// Requests per second per keep-alive connection.
const KEEPALIVE_QPS: f64 = 250.0;
const NEW_CONN_WORKERS: usize = 4;
/// New connections per second per worker: far below what TIME_WAIT would
/// exhaust on one loopback address pair over ten minutes.
const NEW_CONN_QPS: f64 = 50.0;
/// How long one run of the generator lasts.
const CHUNK: Duration = Duration::from_secs(1);
/// A request's limit, connect included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const BULK_BYTES: u64 = 8 << 20;
const BULK_EVERY: Duration = Duration::from_secs(1);
const BULK_TIMEOUT: Duration = Duration::from_secs(30);
/// Writes and checks of a bulk transfer, in blocks of this size.
const BULK_BLOCK: usize = 64 * 1024;
const IDLE_CONNS: usize = 200;
const IDLE_HOLD: Duration = Duration::from_secs(20);
const _: () = assert!(IDLE_HOLD.as_secs() < IDLE_TIMEOUT.as_secs());

/// What the load did so far: running counts for the samples, and the timeline.
#[derive(Debug, Default)]
pub(super) struct Live {
    requests: AtomicU64,
    errors: AtomicU64,
    pub timeline: Mutex<Timeline>,
}

impl Live {
    /// (requests answered with a 2xx, requests failed) so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }

    /// Records into the timeline (a panicked holder left only counts behind).
    pub fn record(&self, f: impl FnOnce(&mut Timeline)) {
        f(&mut self.timeline.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn chunk(&self, c: Chunk) {
        self.requests.fetch_add(c.ok, Ordering::Relaxed);
        self.errors.fetch_add(c.failures(), Ordering::Relaxed);
        self.record(|t| t.chunks.push(c));
    }
}

/// Where the load goes, and the clock its events are timed by.
#[derive(Clone, Copy, Debug)]
pub(super) struct Aim {
    pub web: SocketAddr,
    pub bulk: SocketAddr,
    pub epoch: Instant,
    pub until: Instant,
}

/// Runs every load until `aim.until`; idle connections are closed when it returns.
pub(super) async fn run(aim: Aim, live: &Live) {
    tokio::join!(
        requests(aim, LoadKind::KeepAlive, live),
        requests(aim, LoadKind::NewConnections, live),
        bulk(aim, live),
        idle(aim, live),
    );
}

/// The mix in words, from the figures above (for the report).
pub(super) fn describe() -> String {
    format!(
        "keep-alive requests ({KEEPALIVE_WORKERS} connections at {KEEPALIVE_QPS} req/s each), \
         new connections ({NEW_CONN_WORKERS} workers at {NEW_CONN_QPS}/s each), \
         {} MiB up and echoed back every {} s (every byte checked), \
         {IDLE_CONNS} idle connections held {} s per cycle (lb-proxy's idle timeout: {} s)",
        BULK_BYTES >> 20,
        BULK_EVERY.as_secs_f64(),
        IDLE_HOLD.as_secs(),
        IDLE_TIMEOUT.as_secs()
    )
}

fn left(until: Instant) -> Option<Duration> {
    until
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}

/// Keep-alive or new-connection requests, one [`CHUNK`] at a time.
async fn requests(aim: Aim, kind: LoadKind, live: &Live) {
    while let Some(left) = left(aim.until) {
        let mut spec = LoadSpec::new(Target::Http {
            addr: aim.web,
            host: aim.web.to_string(),
            path: "/".into(),
        });
        spec.duration = Some(left.min(CHUNK));
        spec.timeout = REQUEST_TIMEOUT;
        (spec.keepalive, spec.concurrency, spec.qps) = match kind {
            LoadKind::KeepAlive => (true, KEEPALIVE_WORKERS, Some(KEEPALIVE_QPS)),
            LoadKind::NewConnections => (false, NEW_CONN_WORKERS, Some(NEW_CONN_QPS)),
        };
        let from = aim.epoch.elapsed();
        let mut chunk = Chunk {
            kind,
            from,
            to: from,
            ok: 0,
            failed: Default::default(),
        };
        match load::run(spec).await {
            Ok(report) => {
                chunk.ok = report.ok();
                chunk.failed = report.errors.clone();
                for (status, n) in report
                    .status
                    .iter()
                    .filter(|(s, _)| !(200..300).contains(*s))
                {
                    *chunk.failed.entry(format!("status {status}")).or_default() += n;
                }
            }
            Err(e) => {
                chunk.failed.insert(e.to_string(), 1);
            }
        }
        chunk.to = aim.epoch.elapsed();
        live.chunk(chunk);
    }
}

/// One bulk transfer every [`BULK_EVERY`].
async fn bulk(aim: Aim, live: &Live) {
    let mut next = tokio::time::Instant::now();
    while left(aim.until).is_some() {
        let at = aim.epoch.elapsed();
        let outcome = tokio::time::timeout(BULK_TIMEOUT, transfer(aim.bulk)).await;
        let (bytes, error) = match outcome {
            Ok(Ok(())) => (BULK_BYTES, None),
            Ok(Err(e)) => (0, Some(e)),
            Err(_) => (
                0,
                Some(format!("no echo within {} s", BULK_TIMEOUT.as_secs())),
            ),
        };
        live.record(|t| t.transfers.push(Transfer { at, bytes, error }));
        next += BULK_EVERY;
        let wake = next.min(tokio::time::Instant::from_std(aim.until));
        tokio::time::sleep_until(wake).await;
    }
}

/// The byte at offset `n` of a transfer: a period (251) that no block size
/// divides, so a block that is lost, repeated or reordered shows.
fn pattern(n: u64) -> u8 {
    (n % 251) as u8
}

/// Sends [`BULK_BYTES`] through the echo server while reading them back,
/// checking each; then closes and expects the server's close.
async fn transfer(addr: SocketAddr) -> Result<(), String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {}", e.kind()))?;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::with_capacity(BULK_BLOCK, r);
    let send = async {
        let mut block = vec![0u8; BULK_BLOCK];
        let mut sent = 0u64;
        while sent < BULK_BYTES {
            let n = (BULK_BYTES - sent).min(BULK_BLOCK as u64) as usize;
            for (i, b) in block[..n].iter_mut().enumerate() {
                *b = pattern(sent + i as u64);
            }
            w.write_all(&block[..n])
                .await
                .map_err(|e| format!("write: {}", e.kind()))?;
            sent += n as u64;
        }
        w.shutdown()
            .await
            .map_err(|e| format!("shutdown: {}", e.kind()))
    };
    let receive = async {
        // The echo server names itself in a line first.
        let mut greeting = String::new();
        r.read_line(&mut greeting)
            .await
            .map_err(|e| format!("greeting: {}", e.kind()))?;
        if !greeting.ends_with('\n') {
            return Err("closed before its greeting".to_owned());
        }
        let mut block = vec![0u8; BULK_BLOCK];
        let mut got = 0u64;
        loop {
            let n = r
                .read(&mut block)
                .await
                .map_err(|e| format!("read: {}", e.kind()))?;
            if n == 0 {
                break;
            }
            if let Some(i) = (0..n).find(|&i| block[i] != pattern(got + i as u64)) {
                return Err(format!("echo differs at byte {}", got + i as u64));
            }
            got += n as u64;
        }
        if got == BULK_BYTES {
            Ok(())
        } else {
            Err(format!("echo ended after {got} of {BULK_BYTES} bytes"))
        }
    };
    tokio::try_join!(send, receive).map(|_| ())
}

/// Cycles of [`IDLE_CONNS`] idle connections until the phase ends.
async fn idle(aim: Aim, live: &Live) {
    let request = get_request(&aim.web.to_string(), "/", true);
    while left(aim.until).is_some() {
        let opened = aim.epoch.elapsed();
        let mut held = Vec::with_capacity(IDLE_CONNS);
        for _ in 0..IDLE_CONNS {
            match idle_request(aim.web, None, &request).await {
                Ok((conn, node)) => held.push((conn, node)),
                Err(error) => live.record(|t| {
                    t.idle.push(IdleCheck {
                        opened,
                        at: aim.epoch.elapsed(),
                        node: None,
                        error: Some(error),
                    })
                }),
            }
        }
        let wake = (Instant::now() + IDLE_HOLD).min(aim.until);
        tokio::time::sleep_until(tokio::time::Instant::from_std(wake)).await;
        let mut checks = Vec::with_capacity(held.len());
        for (conn, node) in held {
            let error = idle_request(aim.web, Some(conn), &request).await.err();
            let at = aim.epoch.elapsed();
            checks.push(IdleCheck {
                opened,
                at,
                node: Some(node),
                error,
            });
        }
        live.record(|t| {
            t.idle.extend(checks);
            t.idle_cycles += 1;
        });
    }
}

/// One keep-alive GET on `conn` (or a new connection to `web`): the
/// connection again and the backend that answered.
async fn idle_request(
    web: SocketAddr,
    conn: Option<HttpConn>,
    request: &[u8],
) -> Result<(HttpConn, String), String> {
    let exchange = async {
        let mut conn = match conn {
            Some(c) => c,
            None => HttpConn::new(
                TcpStream::connect(web)
                    .await
                    .map_err(|e| format!("connect: {}", e.kind()))?,
            ),
        };
        let r = conn
            .request(request, "x-node", "x-seen-source")
            .await
            .map_err(request_error)?;
        if r.status != 200 {
            return Err(format!("status {}", r.status));
        }
        let node = r
            .node
            .as_ref()
            .map(|n| String::from_utf8_lossy(conn.slice(n)).into_owned())
            .unwrap_or_default();
        Ok((conn, node))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err("no response within the request timeout".into()))
}

/// A failed request as the error table names it.
fn request_error(e: RequestError) -> String {
    match e {
        RequestError::Io(e) => format!("{}", e.kind()),
        RequestError::Eof { .. } => "connection closed before the response".into(),
        RequestError::Malformed(why) => format!("bad response: {why}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::InProcess;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_transfer_checks_every_byte_of_the_echo() {
        let servers = InProcess::start(&[
            "echo:e=127.0.0.1:0".parse().unwrap(),
            "sink:s=127.0.0.1:0".parse().unwrap(),
        ])
        .unwrap();
        let rt = rt();
        assert_eq!(rt.block_on(transfer(servers.addr("e").unwrap())), Ok(()));
        // A sink reads and answers nothing: the transfer must not pass.
        let sink = rt.block_on(transfer(servers.addr("s").unwrap()));
        assert!(sink.is_err(), "{sink:?}");
    }

    #[test]
    fn an_idle_request_names_its_backend_and_keeps_the_connection() {
        let servers = InProcess::start(&["http:node-9=127.0.0.1:0".parse().unwrap()]).unwrap();
        let web = servers.addr("node-9").unwrap();
        let request = get_request(&web.to_string(), "/", true);
        let rt = rt();
        let (conn, node) = rt.block_on(idle_request(web, None, &request)).unwrap();
        assert_eq!(node, "node-9");
        let (_, again) = rt
            .block_on(idle_request(web, Some(conn), &request))
            .unwrap();
        assert_eq!(again, "node-9");
        assert_eq!(servers.accepted.load(Ordering::Relaxed), 1);
    }
}
