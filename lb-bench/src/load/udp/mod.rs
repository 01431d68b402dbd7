//! The UDP load generator (`lb-bench compare --proto udp` drives it): `flows`
//! client sockets, each on its own 127.0.x.y source address and port and
//! connected to the target, each keeping a window of `window` datagrams of
//! `size` bytes in flight against an echo server for a fixed duration.
//!
//! Closed loop: a flow sends its next datagram when an echo comes back, so
//! the load adapts to what the path carries and a lost datagram is a
//! measurement, not something the generator provoked by outrunning the
//! path. A flow whose echoes stop for [`worker::STALL`] writes its window
//! off and opens a new one, so one loss does not stall it for good.
//!
//! After the sending phase, a grace period collects late echoes; `lost` is
//! what was sent and never came back by then. The rate counts only echoes
//! that arrived during the sending phase, over its duration.
//!
//! The files: `mmsg` (batched `sendmmsg`/`recvmmsg` on connected sockets),
//! `flow` (one flow and the datagram format), `worker` (a thread's loop);
//! this file splits the flows over the threads and sums what they counted.

mod flow;
mod mmsg;
mod worker;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::net::SourceRange;
use flow::{Flow, HEADER_LEN};
use worker::{Tally, Worker};

pub use mmsg::MAX_BATCH;

/// Flows (client sockets) by default: the 50.
pub const DEFAULT_FLOWS: usize = 50;

/// Datagrams each flow keeps in flight by default.
pub const DEFAULT_WINDOW: usize = 4;

/// How long late echoes are awaited after the sending phase.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(1);

/// The client addresses of the flows, one per flow (wrapping past the end).
pub const DEFAULT_SOURCES: &str = "127.0.10.1-127.0.10.250";

/// The smallest datagram: the header every datagram carries.
pub const MIN_SIZE: usize = HEADER_LEN;

/// The largest UDP payload over IPv4.
pub const MAX_SIZE: usize = 65_507;

/// What to send, where, and for how long.
#[derive(Clone, Debug)]
pub struct UdpLoadSpec {
    pub target: SocketAddr,
    pub flows: usize,
    /// Bytes per datagram, at least the header's 24.
    pub size: usize,
    /// Datagrams in flight per flow, 1..=[`MAX_BATCH`].
    pub window: usize,
    pub duration: Duration,
    pub grace: Duration,
    /// Generator threads; the flows are split round-robin over them.
    pub threads: usize,
    pub sources: SourceRange,
}

impl UdpLoadSpec {
    /// The defaults: 50 flows, 64-byte datagrams, a window of 4, one thread, 5 s.
    pub fn new(target: SocketAddr) -> UdpLoadSpec {
        UdpLoadSpec {
            target,
            flows: DEFAULT_FLOWS,
            size: 64,
            window: DEFAULT_WINDOW,
            duration: Duration::from_secs(5),
            grace: DEFAULT_GRACE,
            threads: 1,
            sources: DEFAULT_SOURCES.parse().expect("a valid range"),
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(Error::BadArgument(why));
        if !(MIN_SIZE..=MAX_SIZE).contains(&self.size) {
            return bad(format!(
                "UDP datagram size {} is outside {MIN_SIZE}..={MAX_SIZE}",
                self.size
            ));
        }
        if !(1..=MAX_BATCH).contains(&self.window) {
            return bad(format!(
                "UDP window {} is outside 1..={MAX_BATCH}",
                self.window
            ));
        }
        if self.flows == 0 || self.threads == 0 || self.duration.is_zero() {
            return bad("UDP load needs at least one flow, one thread and a duration".into());
        }
        Ok(())
    }
}

/// What a UDP run measured.
#[derive(Clone, Debug, Serialize)]
pub struct UdpLoadReport {
    pub target: SocketAddr,
    pub flows: usize,
    pub size: usize,
    pub window: usize,
    pub threads: usize,
    pub duration_secs: f64,
    pub sent: u64,
    /// Intact echoes, including those of the grace period.
    pub echoed: u64,
    /// Sent and not echoed by the end of the grace period.
    pub lost: u64,
    /// Replies of the wrong length or content, or for another flow.
    pub corrupt: u64,
    /// Times a flow wrote its window off after [`worker::STALL`] without an echo.
    pub stalls: u64,
    pub send_errors: u64,
    /// Echoes received during the sending phase, per second of it.
    pub echoed_per_sec: f64,
    /// `lost / sent`.
    pub loss_ratio: f64,
    pub rtt_p50_us: f64,
    pub rtt_p99_us: f64,
    /// The fewest and most echoes of one flow (a flow starved shows here).
    pub flow_echoed_min: u64,
    pub flow_echoed_max: u64,
    /// The generator threads' CPU time over the run.
    pub generator_cpu_secs: f64,
}

impl UdpLoadReport {
    /// The generator's CPU µs per echoed datagram (its own cost per round trip).
    pub fn generator_cpu_us_per_echo(&self) -> Option<f64> {
        (self.echoed > 0).then(|| self.generator_cpu_secs * 1e6 / self.echoed as f64)
    }

    /// How busy the generator threads were: CPU time over wall time, per thread.
    pub fn generator_busy(&self) -> f64 {
        self.generator_cpu_secs / (self.duration_secs * self.threads as f64).max(1e-9)
    }
}

/// Runs the load; blocking (one OS thread per generator thread).
pub fn run(spec: &UdpLoadSpec) -> Result<UdpLoadReport> {
    spec.validate()?;
    let start = Instant::now();
    let mut shares: Vec<Vec<Flow>> = (0..spec.threads).map(|_| Vec::new()).collect();
    for i in 0..spec.flows {
        let source = spec.sources.nth(i as u64);
        shares[i % spec.threads].push(Flow::open(i as u32, source, spec.target, start)?);
    }
    let workers = shares
        .into_iter()
        .filter(|s| !s.is_empty())
        .map(|flows| Worker::new(flows, spec.size, spec.window, start))
        .collect::<Result<Vec<_>>>()?;
    let send_until = Instant::now() + spec.duration;
    let wait_until = send_until + spec.grace;
    let tallies = std::thread::scope(|s| {
        let handles: Vec<_> = workers
            .into_iter()
            .map(|w| s.spawn(move || w.run(send_until, wait_until)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a generator thread panicked"))
            .collect::<Result<Vec<Tally>>>()
    })?;
    Ok(summarize(spec, tallies))
}

/// Sums the threads' tallies into the report.
fn summarize(spec: &UdpLoadSpec, tallies: Vec<Tally>) -> UdpLoadReport {
    let mut rtt = worker_histogram();
    let mut cpu = 0.0;
    let mut flows = Vec::new();
    for t in tallies {
        let _ = rtt.add(&t.rtt_us);
        cpu += t.cpu_secs;
        flows.extend(t.flows);
    }
    let sum = |f: fn(&Flow) -> u64| flows.iter().map(f).sum::<u64>();
    let (sent, echoed) = (sum(|f| f.sent), sum(|f| f.echoed));
    let secs = spec.duration.as_secs_f64();
    UdpLoadReport {
        target: spec.target,
        flows: spec.flows,
        size: spec.size,
        window: spec.window,
        threads: spec.threads,
        duration_secs: secs,
        sent,
        echoed,
        lost: sent.saturating_sub(echoed),
        corrupt: sum(|f| f.corrupt),
        stalls: sum(|f| f.stalls),
        send_errors: sum(|f| f.send_errors),
        echoed_per_sec: sum(|f| f.echoed_in_time) as f64 / secs,
        loss_ratio: if sent > 0 {
            sent.saturating_sub(echoed) as f64 / sent as f64
        } else {
            0.0
        },
        rtt_p50_us: rtt.value_at_quantile(0.5) as f64,
        rtt_p99_us: rtt.value_at_quantile(0.99) as f64,
        flow_echoed_min: flows.iter().map(|f| f.echoed).min().unwrap_or(0),
        flow_echoed_max: flows.iter().map(|f| f.echoed).max().unwrap_or(0),
        generator_cpu_secs: cpu,
    }
}

fn worker_histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A blocking echo server on its own thread; stops after `stop` is set.
    fn echo_server(
        drop_every: Option<u64>,
    ) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicBool>) {
        use std::sync::atomic::{AtomicBool, Ordering};
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let addr = s.local_addr().unwrap();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let stop2 = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            let mut n_seen = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    n_seen += 1;
                    if drop_every.is_some_and(|k| n_seen.is_multiple_of(k)) {
                        continue;
                    }
                    let _ = s.send_to(&buf[..n], from);
                }
            }
        });
        (addr, stop)
    }

    fn spec(target: SocketAddr, size: usize) -> UdpLoadSpec {
        UdpLoadSpec {
            flows: 6,
            size,
            duration: Duration::from_millis(300),
            grace: Duration::from_millis(300),
            threads: 2,
            ..UdpLoadSpec::new(target)
        }
    }

    #[test]
    fn every_datagram_comes_back_from_a_clean_echo() {
        let (addr, stop) = echo_server(None);
        let r = run(&spec(addr, 1200)).unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(r.sent > 100, "{r:?}");
        assert_eq!((r.echoed, r.lost, r.corrupt), (r.sent, 0, 0), "{r:?}");
        assert!(r.flow_echoed_min > 0, "every flow got echoes: {r:?}");
        assert!(r.echoed_per_sec > 0.0 && r.rtt_p50_us >= 1.0, "{r:?}");
    }

    #[test]
    fn a_lossy_echo_shows_as_loss_and_the_flows_keep_going() {
        let (addr, stop) = echo_server(Some(10));
        let mut s = spec(addr, 64);
        s.duration = Duration::from_millis(800);
        let r = run(&s).unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // The echo drops one in ten; the flows recover from their losses
        // through the stall timeout and keep sending, so the ratio shows.
        assert!(r.stalls > 0, "{r:?}");
        assert!(r.loss_ratio > 0.05 && r.loss_ratio < 0.15, "{r:?}");
        assert_eq!(r.corrupt, 0, "{r:?}");
    }

    #[test]
    fn bad_specs_are_refused() {
        let t: SocketAddr = "127.0.0.1:9".parse().unwrap();
        for s in [
            UdpLoadSpec {
                size: 10,
                ..UdpLoadSpec::new(t)
            },
            UdpLoadSpec {
                window: 0,
                ..UdpLoadSpec::new(t)
            },
            UdpLoadSpec {
                window: MAX_BATCH + 1,
                ..UdpLoadSpec::new(t)
            },
            UdpLoadSpec {
                flows: 0,
                ..UdpLoadSpec::new(t)
            },
        ] {
            assert!(matches!(run(&s), Err(Error::BadArgument(_))), "{s:?}");
        }
    }
}
