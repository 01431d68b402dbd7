//! QUIC handshake load (`lb-bench compare --proto quic` drives it): a few
//! concurrent clients, each making one new QUIC connection after another
//! for a fixed duration, every one from a new UDP socket on the next
//! address of a source range (a new client 4-tuple, as a new client would
//! be). A handshake counts when quinn's connect completes; the connection
//! is then closed, and its endpoint kept until it is idle (bounded), so the
//! server sees the close rather than an idle timeout.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::error::{Error, IoContext, Result};
use crate::net::SourceRange;
use crate::quic;

/// The client addresses, one per handshake in turn.
pub const DEFAULT_QUIC_SOURCES: &str = "127.0.11.1-127.0.11.250";

/// A handshake that takes longer than this is an error.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a closed connection's endpoint is kept to send its close.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Who connects where, how many at once, for how long.
#[derive(Clone, Debug)]
pub struct HandshakeSpec {
    pub target: SocketAddr,
    pub clients: usize,
    pub duration: Duration,
    pub sources: SourceRange,
}

impl HandshakeSpec {
    pub fn new(target: SocketAddr, clients: usize, duration: Duration) -> HandshakeSpec {
        HandshakeSpec {
            target,
            clients: clients.max(1),
            duration,
            sources: DEFAULT_QUIC_SOURCES.parse().expect("a valid range"),
        }
    }
}

/// What a handshake run measured.
#[derive(Clone, Debug, Serialize)]
pub struct HandshakeReport {
    pub target: SocketAddr,
    pub clients: usize,
    /// From the start until the last client's last handshake ended.
    pub elapsed_secs: f64,
    pub handshakes: u64,
    pub errors: u64,
    pub handshakes_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub first_error: Option<String>,
}

/// One client's counts.
struct Tally {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    took_us: Histogram<u64>,
    ended: Instant,
}

/// Runs the clients on the current tokio runtime.
pub async fn run(spec: &HandshakeSpec) -> Result<HandshakeReport> {
    let start = Instant::now();
    let deadline = start + spec.duration;
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..spec.clients {
        tasks.spawn(client(spec.clone(), deadline, Arc::clone(&next)));
    }
    let mut hist = histogram();
    let (mut ok, mut errors, mut first_error, mut ended) = (0, 0, None, start);
    while let Some(t) = tasks.join_next().await {
        let t = t.map_err(|e| Error::io("a QUIC client task", std::io::Error::other(e)))?;
        let _ = hist.add(&t.took_us);
        ok += t.ok;
        errors += t.errors;
        first_error = first_error.or(t.first_error);
        ended = ended.max(t.ended);
    }
    let elapsed = ended.duration_since(start).as_secs_f64().max(1e-9);
    Ok(HandshakeReport {
        target: spec.target,
        clients: spec.clients,
        elapsed_secs: elapsed,
        handshakes: ok,
        errors,
        handshakes_per_sec: ok as f64 / elapsed,
        p50_ms: hist.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: hist.value_at_quantile(0.99) as f64 / 1000.0,
        first_error,
    })
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds")
}

/// One client: handshakes back to back until `deadline`.
async fn client(spec: HandshakeSpec, deadline: Instant, next: Arc<AtomicU64>) -> Tally {
    let mut t = Tally {
        ok: 0,
        errors: 0,
        first_error: None,
        took_us: histogram(),
        ended: Instant::now(),
    };
    let mut closing = tokio::task::JoinSet::new();
    while Instant::now() < deadline {
        let source = spec.sources.nth(next.fetch_add(1, Ordering::Relaxed));
        match handshake(spec.target, source).await {
            Ok((endpoint, took)) => {
                t.ok += 1;
                let _ = t.took_us.record((took.as_micros() as u64).max(1));
                closing.spawn(async move {
                    let _ = tokio::time::timeout(CLOSE_WAIT, endpoint.wait_idle()).await;
                });
            }
            Err(e) => {
                t.errors += 1;
                t.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    t.ended = Instant::now();
    while closing.join_next().await.is_some() {}
    t
}

/// A new endpoint on `source`, one handshake with `target`, then a close.
/// Returns the endpoint (to keep until the close is sent) and the handshake time.
async fn handshake(target: SocketAddr, source: Ipv4Addr) -> Result<(quinn::Endpoint, Duration)> {
    let socket = std::net::UdpSocket::bind((source, 0)).ctx(|| format!("bind {source}:0"))?;
    let endpoint = quic::client_endpoint(socket)?;
    let started = Instant::now();
    let conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, quic::connect(&endpoint, target))
        .await
        .map_err(|_| Error::NotReady {
            what: format!("a QUIC handshake with {target}"),
            secs: HANDSHAKE_TIMEOUT.as_secs(),
            log: String::new(),
        })??;
    let took = started.elapsed();
    conn.close(quinn::VarInt::from_u32(0), b"done");
    Ok((endpoint, took))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::InProcess;

    #[test]
    fn handshakes_complete_against_a_quic_backend() {
        let servers =
            InProcess::start(&["quic:q=127.0.0.1:0,sid=c4605e".parse().unwrap()]).unwrap();
        let addr = servers.addr("q").unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let r = rt
            .block_on(run(&HandshakeSpec::new(
                addr,
                2,
                Duration::from_millis(500),
            )))
            .unwrap();
        assert!(r.handshakes > 0 && r.errors == 0, "{r:?}");
        assert!(r.handshakes_per_sec > 0.0 && r.p50_ms > 0.0, "{r:?}");
        drop(servers);
    }
}
