//! The load generator: `c` workers on tokio, each with one connection at a
//! time, bounded by a request count (`-n`) and/or a duration (`-z`).
//!
//! - HTTP/1.1 `GET` with keep-alive (one connection per worker, reopened if
//!   the server closes it) or without (`Connection: close`, a new connection,
//!   so a new 5-tuple, per request: what `hey -disable-keepalive` does).
//! - Raw TCP: send `size` bytes, read the echo back.
//! - `qps` is a rate limit **per worker**, as hey's `-q`: the total is at most
//!   `qps × c`.
//! - With a source range, each new connection binds the next address of the
//!   range, round-robin, so the balancer sees many client IPs.
//!
//! Every response's latency (from the start of the request, including the
//! connect when it opened a connection, to the last byte) goes into an HDR
//! histogram; the backend that served it comes from a response header
//! (`X-Node`), or for TCP from the echo server's greeting line.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use crate::error::{Error, Result};
use crate::http::{self, HttpConn, RequestError};
use crate::net::{self, SourcePicker, SourceRange, Target};
use crate::stats::{self, ChiSquare};

/// The request count when neither `-n` nor `-z` is given (hey's default).
pub const DEFAULT_REQUESTS: u64 = 200;

/// What to run.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub target: Target,
    /// Stop after this many requests (in total, over all workers).
    pub requests: Option<u64>,
    /// Stop after this long. With both, whichever comes first.
    pub duration: Option<Duration>,
    pub concurrency: usize,
    pub keepalive: bool,
    /// Requests per second per worker.
    pub qps: Option<f64>,
    pub sources: Option<SourceRange>,
    /// Per request, connect included.
    pub timeout: Duration,
    /// TCP: bytes sent (and echoed back) per request.
    pub tcp_size: usize,
    /// TCP: the server writes one line naming itself on connect.
    pub tcp_greeting: bool,
    /// Lower-case name of the header naming the backend.
    pub node_header: String,
    /// Lower-case name of the header with the source address the backend saw.
    pub seen_header: String,
    /// Expected share per backend; equal over the backends seen when `None`.
    pub expected: Option<Vec<(String, f64)>>,
    /// Keep which backends served each source address.
    pub per_source: bool,
    /// Keep the first this many flows (5-tuple, backend, source seen).
    pub record_flows: usize,
    /// Show a progress bar on stderr (when it is a terminal) for runs over ~2 s.
    pub progress: bool,
}

impl LoadSpec {
    /// A spec with hey's defaults: 200 requests, 50 workers, keep-alive, 20 s timeout.
    pub fn new(target: Target) -> LoadSpec {
        LoadSpec {
            target,
            requests: None,
            duration: None,
            concurrency: 50,
            keepalive: true,
            qps: None,
            sources: None,
            timeout: Duration::from_secs(20),
            tcp_size: 64,
            tcp_greeting: false,
            node_header: "x-node".into(),
            seen_header: "x-seen-source".into(),
            expected: None,
            per_source: false,
            record_flows: 0,
            progress: false,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.concurrency == 0 {
            return Err(Error::BadArgument("-c must be at least 1".into()));
        }
        if self.requests == Some(0) {
            return Err(Error::BadArgument("-n must be at least 1".into()));
        }
        if let Some(q) = self.qps {
            if !(q > 0.0 && q.is_finite()) {
                return Err(Error::BadArgument("-q must be above 0".into()));
            }
        }
        if matches!(self.target, Target::Tcp { .. }) && self.tcp_size == 0 {
            return Err(Error::BadArgument("--size must be at least 1".into()));
        }
        Ok(())
    }
}

/// One flow, as a packet capture would name it.
#[derive(Clone, Debug, Serialize)]
pub struct FlowRecord {
    /// When its first response arrived, from the start of the run.
    pub t_ms: f64,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub proto: &'static str,
    pub node: Option<String>,
    /// What the backend said it saw as the source (`X-Seen-Source`).
    pub seen: Option<String>,
    pub requests: u64,
}

/// Latencies, in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    pub fastest_ms: f64,
    pub slowest_ms: f64,
    pub mean_ms: f64,
    pub p10_ms: f64,
    pub p25_ms: f64,
    pub p50_ms: f64,
    pub p75_ms: f64,
    pub p90_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// hey's response time histogram: (upper mark in ms, count).
    pub histogram: Vec<(f64, u64)>,
}

/// One backend's share of the responses.
#[derive(Clone, Debug, Serialize)]
pub struct BackendRow {
    pub name: String,
    pub responses: u64,
    /// Connections whose first response came from this backend: with
    /// keep-alive, the flows are what the balancer spread.
    pub flows: u64,
    pub share: f64,
    pub expected_share: f64,
}

/// The per-backend distribution.
#[derive(Clone, Debug, Serialize)]
pub struct Distribution {
    /// Where the names came from (`X-Node`, or `greeting`).
    pub source: String,
    pub backends: Vec<BackendRow>,
    /// Responses that named no backend.
    pub unnamed: u64,
    /// Max over mean of the responses per expected backend.
    pub max_mean: f64,
    /// Responses against the expected shares.
    pub chi_square: Option<ChiSquare>,
    /// Flows (connections) against the expected shares.
    pub chi_square_flows: Option<ChiSquare>,
    /// Where the expected shares came from.
    pub expected_from: String,
}

/// What a load run measured.
#[derive(Clone, Debug, Serialize)]
pub struct LoadReport {
    pub tool: &'static str,
    pub target: String,
    pub protocol: &'static str,
    pub keepalive: bool,
    pub concurrency: usize,
    pub sources: Option<String>,
    pub total_secs: f64,
    /// Responses received (any status).
    pub responses: u64,
    pub requests_per_sec: f64,
    pub bytes: u64,
    pub connections: u64,
    pub latency: Latency,
    /// Mean, fastest and slowest connect time in ms.
    pub dial_ms: [f64; 3],
    pub status: BTreeMap<u16, u64>,
    pub errors: BTreeMap<String, u64>,
    pub errors_total: u64,
    pub distribution: Option<Distribution>,
    /// Source IP -> backend -> responses.
    pub per_source: Option<BTreeMap<IpAddr, BTreeMap<String, u64>>>,
    pub flows: Vec<FlowRecord>,
}

impl LoadReport {
    /// Responses with a 2xx status.
    pub fn ok(&self) -> u64 {
        if self.protocol == "tcp" {
            return self.responses;
        }
        self.status
            .iter()
            .filter(|(s, _)| (200..300).contains(*s))
            .map(|(_, n)| n)
            .sum()
    }
}

// ---------------------------------------------------------------------------
// The run.

struct Shared {
    spec: LoadSpec,
    issued: AtomicU64,
    completed: AtomicU64,
    flows_kept: AtomicUsize,
    start: Instant,
    deadline: Option<Instant>,
    sources: SourcePicker,
    request: Vec<u8>,
    tcp_payload: Vec<u8>,
}

impl Shared {
    /// Takes one request from the budget.
    fn take(&self) -> bool {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return false;
        }
        match self.spec.requests {
            Some(n) => self.issued.fetch_add(1, Ordering::Relaxed) < n,
            None => true,
        }
    }
}

#[derive(Default)]
struct WorkerStats {
    hist: Option<Histogram<u64>>,
    status: BTreeMap<u16, u64>,
    errors: BTreeMap<String, u64>,
    nodes: BTreeMap<Vec<u8>, u64>,
    node_flows: BTreeMap<Vec<u8>, u64>,
    unnamed: u64,
    per_source: BTreeMap<IpAddr, BTreeMap<Vec<u8>, u64>>,
    flows: Vec<FlowRecord>,
    bytes: u64,
    connections: u64,
    dial_us_sum: u64,
    dial_us_min: u64,
    dial_us_max: u64,
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 1 hour, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds")
}

impl WorkerStats {
    fn error(&mut self, kind: String) {
        *self.errors.entry(kind).or_default() += 1;
    }

    fn merge(&mut self, other: WorkerStats) {
        match (&mut self.hist, other.hist) {
            (Some(a), Some(b)) => a.add(b).expect("same bounds"),
            (a @ None, b) => *a = b,
            _ => {}
        }
        for (k, v) in other.status {
            *self.status.entry(k).or_default() += v;
        }
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        for (k, v) in other.nodes {
            *self.nodes.entry(k).or_default() += v;
        }
        for (k, v) in other.node_flows {
            *self.node_flows.entry(k).or_default() += v;
        }
        for (ip, m) in other.per_source {
            let e = self.per_source.entry(ip).or_default();
            for (k, v) in m {
                *e.entry(k).or_default() += v;
            }
        }
        self.unnamed += other.unnamed;
        self.flows.extend(other.flows);
        self.bytes += other.bytes;
        if other.connections > 0 {
            self.dial_us_min = if self.connections == 0 {
                other.dial_us_min
            } else {
                self.dial_us_min.min(other.dial_us_min)
            };
            self.dial_us_max = self.dial_us_max.max(other.dial_us_max);
        }
        self.connections += other.connections;
        self.dial_us_sum += other.dial_us_sum;
    }
}

/// An open connection and what is known about its flow.
struct Conn {
    io: ConnIo,
    local: SocketAddr,
    /// Index into the worker's `flows` when this flow is being recorded.
    flow: Option<usize>,
    first_done: bool,
    /// TCP: the backend's greeting.
    greeting: Option<Vec<u8>>,
}

enum ConnIo {
    Http(HttpConn),
    Tcp(tokio::io::BufReader<tokio::net::TcpStream>),
}

fn io_kind(e: &std::io::Error) -> String {
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

/// Runs the load described by `spec` on the current tokio runtime.
pub async fn run(spec: LoadSpec) -> Result<LoadReport> {
    spec.validate()?;
    let request = match &spec.target {
        Target::Http { host, path, .. } => http::get_request(host, path, spec.keepalive),
        Target::Tcp { .. } => Vec::new(),
    };
    let tcp_payload: Vec<u8> = (0..spec.tcp_size).map(|i| b'a' + (i % 26) as u8).collect();
    let requests = match (spec.requests, spec.duration) {
        (None, None) => Some(DEFAULT_REQUESTS),
        (n, _) => n,
    };
    let start = Instant::now();
    let shared = Arc::new(Shared {
        deadline: spec.duration.map(|d| start + d),
        sources: SourcePicker::new(spec.sources),
        spec: LoadSpec { requests, ..spec },
        issued: AtomicU64::new(0),
        completed: AtomicU64::new(0),
        flows_kept: AtomicUsize::new(0),
        start,
        request,
        tcp_payload,
    });
    let finished = Arc::new(AtomicBool::new(false));
    let progress = shared
        .spec
        .progress
        .then(|| tokio::spawn(progress_bar(Arc::clone(&shared), Arc::clone(&finished))));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..shared.spec.concurrency {
        workers.spawn(worker(Arc::clone(&shared)));
    }
    let mut total = WorkerStats::default();
    while let Some(res) = workers.join_next().await {
        match res {
            Ok(stats) => total.merge(stats),
            Err(e) => total.error(format!("worker panicked: {e}")),
        }
    }
    let elapsed = start.elapsed();
    finished.store(true, Ordering::Release);
    if let Some(p) = progress {
        let _ = p.await;
    }
    Ok(finish(&shared.spec, total, elapsed))
}

async fn progress_bar(shared: Arc<Shared>, finished: Arc<AtomicBool>) {
    if !std::io::stderr().is_terminal() {
        return;
    }
    let mut bar: Option<indicatif::ProgressBar> = None;
    let long_enough = shared
        .spec
        .duration
        .is_some_and(|d| d > Duration::from_secs(2));
    while !finished.load(Ordering::Acquire) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let elapsed = shared.start.elapsed();
        if bar.is_none() && (long_enough || elapsed > Duration::from_secs(2)) {
            let (len, template) = match (shared.spec.duration, shared.spec.requests) {
                (Some(d), _) => (d.as_millis() as u64, "{elapsed_precise} [{bar:40}] {msg}"),
                (None, Some(n)) => (n, "{elapsed_precise} [{bar:40}] {pos}/{len} {msg}"),
                (None, None) => (0, "{elapsed_precise} {msg}"),
            };
            let style = indicatif::ProgressStyle::with_template(template)
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> ");
            bar = Some(indicatif::ProgressBar::new(len).with_style(style));
        }
        if let Some(b) = &bar {
            let done = shared.completed.load(Ordering::Relaxed);
            let rate = done as f64 / elapsed.as_secs_f64().max(1e-9);
            b.set_message(format!("{done} responses, {rate:.0} req/s"));
            if shared.spec.duration.is_some() {
                b.set_position((elapsed.as_millis() as u64).min(b.length().unwrap_or(0)));
            } else {
                b.set_position(done);
            }
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
}

async fn worker(shared: Arc<Shared>) -> WorkerStats {
    let spec = &shared.spec;
    let mut stats = WorkerStats {
        hist: Some(new_histogram()),
        ..WorkerStats::default()
    };
    let mut conn: Option<Conn> = None;
    let pace = spec.qps.map(|q| Duration::from_secs_f64(1.0 / q));
    let mut next_at = tokio::time::Instant::now();
    loop {
        if let Some(p) = pace {
            if next_at > tokio::time::Instant::now() {
                if shared
                    .deadline
                    .is_some_and(|d| tokio::time::Instant::from_std(d) <= next_at)
                {
                    break;
                }
                tokio::time::sleep_until(next_at).await;
            }
            next_at += p;
        }
        if !shared.take() {
            break;
        }
        let begin = Instant::now();
        let request_deadline = begin + spec.timeout;
        let (limit, by_run_deadline) = match shared.deadline {
            Some(d) if d < request_deadline => (d, true),
            _ => (request_deadline, false),
        };
        let outcome = tokio::time::timeout_at(
            tokio::time::Instant::from_std(limit),
            one_request(&shared, &mut conn, &mut stats),
        )
        .await;
        match outcome {
            Err(_) if by_run_deadline => {
                // The run ended mid-request: neither a response nor an error.
                break;
            }
            Err(_) => {
                conn = None;
                stats.error("timeout (no response within the request timeout)".into());
            }
            Ok(Err(kind)) => {
                conn = None;
                stats.error(kind);
            }
            Ok(Ok(done)) => {
                let us = begin.elapsed().as_micros().max(1) as u64;
                if let Some(h) = &mut stats.hist {
                    h.saturating_record(us);
                }
                shared.completed.fetch_add(1, Ordering::Relaxed);
                if done.close {
                    if let Some(c) = conn.take() {
                        wait_for_close(c).await;
                    }
                }
            }
        }
    }
    stats
}

/// HTTP, after `Connection: close`: lets the server close first (so TIME_WAIT lands
/// on its side, not on the client's ports), waiting a little for its FIN.
async fn wait_for_close(conn: Conn) {
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

struct Done {
    close: bool,
}

/// One request on the worker's connection (opening one if needed).
async fn one_request(
    shared: &Shared,
    slot: &mut Option<Conn>,
    stats: &mut WorkerStats,
) -> std::result::Result<Done, String> {
    let spec = &shared.spec;
    if slot.is_none() {
        *slot = Some(open(shared, stats).await?);
    }
    let conn = slot.as_mut().expect("just opened");
    let (status, node, seen, bytes, close): (u16, Option<Vec<u8>>, Option<String>, usize, bool) =
        match &mut conn.io {
            ConnIo::Http(h) => {
                let r = h
                    .request(&shared.request, &spec.node_header, &spec.seen_header)
                    .await
                    .map_err(|e| match e {
                        RequestError::Io(e) => io_kind(&e),
                        RequestError::Eof {
                            mid_response: false,
                        } => "connection closed before the response".into(),
                        RequestError::Eof { mid_response: true } => {
                            "connection closed mid-response".into()
                        }
                        RequestError::Malformed(why) => format!("bad response: {why}"),
                    })?;
                let node = r.node.as_ref().map(|n| h.slice(n).to_vec());
                let seen = if conn.flow.is_some() {
                    r.seen
                        .as_ref()
                        .map(|s| String::from_utf8_lossy(h.slice(s)).into_owned())
                } else {
                    None
                };
                (r.status, node, seen, r.bytes, r.close || !spec.keepalive)
            }
            ConnIo::Tcp(t) => {
                t.get_mut()
                    .write_all(&shared.tcp_payload)
                    .await
                    .map_err(|e| io_kind(&e))?;
                let mut back = vec![0u8; shared.tcp_payload.len()];
                t.read_exact(&mut back).await.map_err(|e| {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        "connection closed before the echo".into()
                    } else {
                        io_kind(&e)
                    }
                })?;
                if back != shared.tcp_payload {
                    return Err(
                        "echo mismatch (if the server names itself first, use --greeting)".into(),
                    );
                }
                (0, conn.greeting.clone(), None, back.len(), !spec.keepalive)
            }
        };
    if matches!(conn.io, ConnIo::Http(_)) {
        *stats.status.entry(status).or_default() += 1;
    }
    stats.bytes += bytes as u64;
    match &node {
        Some(n) => {
            if let Some(c) = stats.nodes.get_mut(n.as_slice()) {
                *c += 1;
            } else {
                stats.nodes.insert(n.clone(), 1);
            }
        }
        None => stats.unnamed += 1,
    }
    if !conn.first_done {
        if let Some(n) = &node {
            *stats.node_flows.entry(n.clone()).or_default() += 1;
        }
    }
    if spec.per_source {
        let per = stats.per_source.entry(conn.local.ip()).or_default();
        *per.entry(node.clone().unwrap_or_else(|| b"-".to_vec()))
            .or_default() += 1;
    }
    if let Some(i) = conn.flow {
        let f = &mut stats.flows[i];
        f.requests += 1;
        if !conn.first_done {
            f.t_ms = shared.start.elapsed().as_secs_f64() * 1000.0;
            f.node = node.map(|n| String::from_utf8_lossy(&n).into_owned());
            f.seen = seen;
        }
    }
    conn.first_done = true;
    Ok(Done { close })
}

async fn open(shared: &Shared, stats: &mut WorkerStats) -> std::result::Result<Conn, String> {
    let spec = &shared.spec;
    let source = shared.sources.pick();
    let t0 = Instant::now();
    let stream = net::connect_from(source, spec.target.addr())
        .await
        .map_err(|e| match source {
            Some(ip) => format!("connect from {ip}: {}", io_kind(&e)),
            None => format!("connect: {}", io_kind(&e)),
        })?;
    let dial = t0.elapsed().as_micros() as u64;
    stats.dial_us_min = if stats.connections == 0 {
        dial
    } else {
        stats.dial_us_min.min(dial)
    };
    stats.dial_us_max = stats.dial_us_max.max(dial);
    stats.dial_us_sum += dial;
    stats.connections += 1;
    let local = stream
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
    let peer = stream.peer_addr().unwrap_or(spec.target.addr());
    let flow = (shared.flows_kept.load(Ordering::Relaxed) < spec.record_flows
        && shared.flows_kept.fetch_add(1, Ordering::Relaxed) < spec.record_flows)
        .then(|| {
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
        });
    let (io, greeting) = match spec.target {
        Target::Http { .. } => (ConnIo::Http(HttpConn::new(stream)), None),
        Target::Tcp { .. } => {
            let mut r = tokio::io::BufReader::new(stream);
            let greeting = if spec.tcp_greeting {
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
                Some(line)
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

// ---------------------------------------------------------------------------
// The report.

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn finish(spec: &LoadSpec, total: WorkerStats, elapsed: Duration) -> LoadReport {
    let hist = total.hist.unwrap_or_else(new_histogram);
    let responses = hist.len();
    let latency = if responses == 0 {
        Latency::default()
    } else {
        let fastest = hist.min();
        let slowest = hist.max();
        let q = |p: f64| ms(hist.value_at_quantile(p));
        let mut buckets: Vec<(f64, u64)> = (0..=10)
            .map(|i| {
                let mark = fastest as f64 + (slowest - fastest) as f64 * f64::from(i) / 10.0;
                (mark / 1000.0, 0)
            })
            .collect();
        for v in hist.iter_recorded() {
            let value = v.value_iterated_to() as f64 / 1000.0;
            let i = buckets
                .iter()
                .position(|(mark, _)| value <= *mark)
                .unwrap_or(buckets.len() - 1);
            buckets[i].1 += v.count_at_value();
        }
        Latency {
            fastest_ms: ms(fastest),
            slowest_ms: ms(slowest),
            mean_ms: hist.mean() / 1000.0,
            p10_ms: q(0.10),
            p25_ms: q(0.25),
            p50_ms: q(0.50),
            p75_ms: q(0.75),
            p90_ms: q(0.90),
            p95_ms: q(0.95),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
            histogram: buckets,
        }
    };
    let by_name = |m: &BTreeMap<Vec<u8>, u64>| -> BTreeMap<String, u64> {
        m.iter()
            .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), *v))
            .collect()
    };
    let names = by_name(&total.nodes);
    let flow_names = by_name(&total.node_flows);
    let distribution =
        (!names.is_empty()).then(|| distribution(spec, &names, &flow_names, total.unnamed));
    let per_source = spec.per_source.then(|| {
        total
            .per_source
            .iter()
            .map(|(ip, m)| {
                (
                    *ip,
                    m.iter()
                        .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), *v))
                        .collect(),
                )
            })
            .collect()
    });
    let mut flows = total.flows;
    flows.retain(|f| f.requests > 0);
    flows.sort_by(|a, b| a.t_ms.total_cmp(&b.t_ms));
    let dial_ms = if total.connections == 0 {
        [0.0; 3]
    } else {
        [
            ms(total.dial_us_sum) / total.connections as f64,
            ms(total.dial_us_min),
            ms(total.dial_us_max),
        ]
    };
    LoadReport {
        tool: "lb-bench",
        target: spec.target.to_string(),
        protocol: match spec.target {
            Target::Http { .. } => "http",
            Target::Tcp { .. } => "tcp",
        },
        keepalive: spec.keepalive,
        concurrency: spec.concurrency,
        sources: spec.sources.map(|s| s.to_string()),
        total_secs: elapsed.as_secs_f64(),
        responses,
        requests_per_sec: responses as f64 / elapsed.as_secs_f64().max(1e-9),
        bytes: total.bytes,
        connections: total.connections,
        latency,
        dial_ms,
        errors_total: total.errors.values().sum(),
        status: total.status,
        errors: total.errors,
        distribution,
        per_source,
        flows,
    }
}

fn distribution(
    spec: &LoadSpec,
    names: &BTreeMap<String, u64>,
    flow_names: &BTreeMap<String, u64>,
    unnamed: u64,
) -> Distribution {
    let (expected, expected_from): (Vec<(String, f64)>, String) = match &spec.expected {
        Some(e) => (e.clone(), "given".into()),
        None => (
            names.keys().map(|n| (n.clone(), 1.0)).collect(),
            "equal over the backends seen".into(),
        ),
    };
    let share_sum: f64 = expected.iter().map(|(_, s)| s.max(0.0)).sum();
    let mut rows: Vec<BackendRow> = expected
        .iter()
        .map(|(name, s)| BackendRow {
            name: name.clone(),
            responses: names.get(name).copied().unwrap_or(0),
            flows: flow_names.get(name).copied().unwrap_or(0),
            share: 0.0,
            expected_share: if share_sum > 0.0 {
                s.max(0.0) / share_sum
            } else {
                0.0
            },
        })
        .collect();
    for (name, &n) in names {
        if !rows.iter().any(|r| &r.name == name) {
            rows.push(BackendRow {
                name: name.clone(),
                responses: n,
                flows: flow_names.get(name).copied().unwrap_or(0),
                share: 0.0,
                expected_share: 0.0,
            });
        }
    }
    let named: u64 = rows.iter().map(|r| r.responses).sum();
    for r in &mut rows {
        r.share = if named > 0 {
            r.responses as f64 / named as f64
        } else {
            0.0
        };
    }
    let expected_rows: Vec<&BackendRow> = rows.iter().filter(|r| r.expected_share > 0.0).collect();
    let max_mean = if expected_rows.is_empty() {
        f64::NAN
    } else {
        let mean = expected_rows.iter().map(|r| r.responses).sum::<u64>() as f64
            / expected_rows.len() as f64;
        let max = expected_rows.iter().map(|r| r.responses).max().unwrap_or(0) as f64;
        if mean > 0.0 {
            max / mean
        } else {
            f64::NAN
        }
    };
    let observed: Vec<u64> = rows.iter().map(|r| r.responses).collect();
    let observed_flows: Vec<u64> = rows.iter().map(|r| r.flows).collect();
    let shares: Vec<f64> = rows.iter().map(|r| r.expected_share).collect();
    Distribution {
        source: match spec.target {
            Target::Http { .. } => format!("header {}", display_header(&spec.node_header)),
            Target::Tcp { .. } => "greeting line".into(),
        },
        backends: rows,
        unnamed,
        max_mean,
        chi_square: stats::chi_square(&observed, &shares),
        chi_square_flows: stats::chi_square(&observed_flows, &shares),
        expected_from,
    }
}

/// `x-node` -> `X-Node`.
fn display_header(name: &str) -> String {
    name.split('-')
        .map(|w| {
            let mut c = w.chars();
            match c.next() {
                Some(f) => f.to_ascii_uppercase().to_string() + c.as_str(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// Expected shares from the balancer's `/backends`: the frontend listening on
/// `target` (or the only one, or the one named `frontend`).
pub fn expected_from_admin(
    admin: SocketAddr,
    target: SocketAddr,
    frontend: Option<&str>,
) -> Result<Vec<(String, f64)>> {
    let v = net::get_json(admin, "/backends")?;
    let fes = v["frontends"].as_array().cloned().unwrap_or_default();
    let pick = fes
        .iter()
        .find(|f| frontend.is_some_and(|n| f["name"] == n))
        .or_else(|| {
            fes.iter()
                .find(|f| frontend.is_none() && f["listen"] == target.to_string().as_str())
        })
        .or_else(|| (frontend.is_none() && fes.len() == 1).then(|| &fes[0]))
        .ok_or_else(|| Error::Protocol {
            what: format!("http://{admin}/backends"),
            detail: format!(
                "no frontend {} among {:?}",
                frontend.map_or_else(|| format!("listening on {target}"), |n| format!("`{n}`")),
                fes.iter()
                    .map(|f| format!("{} ({})", f["name"], f["listen"]))
                    .collect::<Vec<_>>()
            ),
        })?;
    Ok(pick["backends"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap_or("?").to_owned(),
                b["expected_share"].as_f64().unwrap_or(0.0),
            )
        })
        .collect())
}

fn secs(ms: f64) -> f64 {
    ms / 1000.0
}

/// hey's text layout, plus p99.9, the per-backend table and, when asked, the
/// backends each source address was served by.
pub fn render_text(r: &LoadReport, per_source: bool) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let l = &r.latency;
    let _ = writeln!(o, "\nSummary:");
    let _ = writeln!(o, "  Total:\t{:.4} secs", r.total_secs);
    let _ = writeln!(o, "  Slowest:\t{:.4} secs", secs(l.slowest_ms));
    let _ = writeln!(o, "  Fastest:\t{:.4} secs", secs(l.fastest_ms));
    let _ = writeln!(o, "  Average:\t{:.4} secs", secs(l.mean_ms));
    let _ = writeln!(o, "  Requests/sec:\t{:.4}", r.requests_per_sec);
    let _ = writeln!(o, "  ");
    let _ = writeln!(o, "  Total data:\t{} bytes", r.bytes);
    if let Some(size) = r.bytes.checked_div(r.responses) {
        let _ = writeln!(o, "  Size/request:\t{size} bytes");
    }
    if r.responses > 0 {
        let _ = writeln!(o, "\nResponse time histogram:");
        let max = l.histogram.iter().map(|b| b.1).max().unwrap_or(1).max(1);
        for (mark, count) in &l.histogram {
            let bar = "■".repeat((count * 40 / max) as usize);
            let _ = writeln!(o, "  {:.3} [{count}]\t|{bar}", secs(*mark));
        }
        let _ = writeln!(o, "\n\nLatency distribution:");
        for (p, v) in [
            ("10%", l.p10_ms),
            ("25%", l.p25_ms),
            ("50%", l.p50_ms),
            ("75%", l.p75_ms),
            ("90%", l.p90_ms),
            ("95%", l.p95_ms),
            ("99%", l.p99_ms),
            ("99.9%", l.p999_ms),
        ] {
            let _ = writeln!(o, "  {p} in {:.4} secs", secs(v));
        }
        let _ = writeln!(o, "\nDetails (average, fastest, slowest):");
        let _ = writeln!(
            o,
            "  DNS+dialup:\t{:.4} secs, {:.4} secs, {:.4} secs",
            secs(r.dial_ms[0]),
            secs(r.dial_ms[1]),
            secs(r.dial_ms[2])
        );
        let _ = writeln!(o, "  Connections:\t{}", r.connections);
    }
    if r.protocol == "http" {
        let _ = writeln!(o, "\nStatus code distribution:");
        for (code, n) in &r.status {
            let _ = writeln!(o, "  [{code}]\t{n} responses");
        }
    } else {
        let _ = writeln!(o, "\nEchoes:\n  {} round trips", r.responses);
    }
    if !r.errors.is_empty() {
        let _ = writeln!(o, "\nError distribution:");
        for (kind, n) in &r.errors {
            let _ = writeln!(o, "  [{n}]\t{kind}");
        }
    }
    if let Some(d) = &r.distribution {
        let _ = writeln!(o, "\nBackend distribution ({}):", d.source);
        let width = d
            .backends
            .iter()
            .map(|b| b.name.len())
            .max()
            .unwrap_or(4)
            .max(7);
        let _ = writeln!(
            o,
            "  {:<width$}  {:>9}  {:>7}  {:>7}  {:>8}",
            "backend", "responses", "share", "flows", "expected"
        );
        for b in &d.backends {
            let _ = writeln!(
                o,
                "  {:<width$}  {:>9}  {:>6.1}%  {:>7}  {:>7.1}%",
                b.name,
                b.responses,
                b.share * 100.0,
                b.flows,
                b.expected_share * 100.0
            );
        }
        if d.unnamed > 0 {
            let _ = writeln!(o, "  ({} responses named no backend)", d.unnamed);
        }
        let fit = |c: &Option<ChiSquare>| match c {
            Some(c) => format!(
                "chi-square {:.2} (df {}), p-value {:.4}",
                c.statistic, c.df, c.p_value
            ),
            None => "chi-square n/a (fewer than two expected backends)".into(),
        };
        let _ = writeln!(
            o,
            "  responses: max/mean {:.3}, {}",
            d.max_mean,
            fit(&d.chi_square)
        );
        let _ = writeln!(
            o,
            "  flows:     {} (with keep-alive the balancer spreads flows, not requests)",
            fit(&d.chi_square_flows)
        );
        let _ = writeln!(o, "  expected shares: {}", d.expected_from);
    }
    if per_source {
        if let Some(ps) = &r.per_source {
            let _ = writeln!(o, "\nBackends by source address:");
            for (ip, m) in ps {
                let list: Vec<String> = m.iter().map(|(n, c)| format!("{n} ({c})")).collect();
                let _ = writeln!(o, "  {ip:<15}  {}", list.join(", "));
            }
            let single = ps.values().filter(|m| m.len() == 1).count();
            let _ = writeln!(
                o,
                "  {single} of {} source addresses were served by exactly one backend",
                ps.len()
            );
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_display_in_title_case() {
        assert_eq!(display_header("x-node"), "X-Node");
        assert_eq!(display_header("x-seen-source"), "X-Seen-Source");
    }

    #[test]
    fn distribution_counts_unexpected_and_missing_backends() {
        let mut spec = LoadSpec::new(Target::Tcp {
            addr: "127.0.0.1:1".parse().unwrap(),
        });
        spec.expected = Some(vec![
            ("a".into(), 0.5),
            ("b".into(), 0.5),
            ("c".into(), 0.0),
        ]);
        let names: BTreeMap<String, u64> = [("a".to_owned(), 30), ("d".to_owned(), 10)].into();
        let flows: BTreeMap<String, u64> = [("a".to_owned(), 3), ("b".to_owned(), 3)].into();
        let d = distribution(&spec, &names, &flows, 0);
        let by: BTreeMap<_, _> = d.backends.iter().map(|b| (b.name.as_str(), b)).collect();
        assert_eq!(by["b"].responses, 0);
        assert_eq!(by["d"].expected_share, 0.0);
        assert_eq!(by["a"].share, 0.75);
        assert_eq!(
            d.chi_square.unwrap().p_value,
            0.0,
            "an unexpected backend was used"
        );
        assert_eq!(d.max_mean, 2.0);
        assert_eq!((by["a"].flows, by["b"].flows, by["d"].flows), (3, 3, 0));
        assert!(
            d.chi_square_flows.unwrap().p_value > 0.99,
            "3 and 3 flows fit 50/50"
        );
    }
}
