//! The run: `c` workers (and the progress bar) over one shared state, their
//! tallies merged and summarized. Each worker loops: wait for its pace, take
//! one request from the budget, run it under the request timeout or the
//! run's deadline (whichever is first), and record what came of it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::conn::{self, Conn};
use super::exchange::{self, Done};
use super::progress::progress_bar;
use super::report::LoadReport;
use super::spec::LoadSpec;
use super::state::Shared;
use super::summary;
use super::tally::WorkerStats;
use crate::error::Result;

/// Runs the load described by `spec` on the current tokio runtime.
pub async fn run(spec: LoadSpec) -> Result<LoadReport> {
    spec.validate()?;
    let shared = Arc::new(Shared::new(spec));
    let finished = Arc::new(AtomicBool::new(false));
    let progress = shared
        .spec
        .progress
        .then(|| tokio::spawn(progress_bar(Arc::clone(&shared), Arc::clone(&finished))));
    let mut workers = JoinSet::new();
    for _ in 0..shared.spec.concurrency {
        workers.spawn(worker(Arc::clone(&shared)));
    }
    let total = join_workers(workers).await;
    let elapsed = shared.start.elapsed();
    finished.store(true, Ordering::Release);
    if let Some(p) = progress {
        let _ = p.await;
    }
    Ok(summary::finish(&shared.spec, total, elapsed))
}

/// Merges the workers' tallies as they finish; a panic is one error.
async fn join_workers(mut workers: JoinSet<WorkerStats>) -> WorkerStats {
    let mut total = WorkerStats::default();
    while let Some(res) = workers.join_next().await {
        match res {
            Ok(stats) => total.merge(stats),
            Err(e) => total.error(format!("worker panicked: {e}")),
        }
    }
    total
}

/// `-q`: one request every `1/q` seconds per worker.
struct Pacer {
    every: Option<Duration>,
    next_at: tokio::time::Instant,
}

impl Pacer {
    fn new(qps: Option<f64>) -> Pacer {
        Pacer {
            every: qps.map(|q| Duration::from_secs_f64(1.0 / q)),
            next_at: tokio::time::Instant::now(),
        }
    }

    /// Waits for the next slot; `false` when the run's deadline comes first.
    async fn wait(&mut self, deadline: Option<Instant>) -> bool {
        let Some(every) = self.every else {
            return true;
        };
        if self.next_at > tokio::time::Instant::now() {
            if deadline.is_some_and(|d| tokio::time::Instant::from_std(d) <= self.next_at) {
                return false;
            }
            tokio::time::sleep_until(self.next_at).await;
        }
        self.next_at += every;
        true
    }
}

/// When a request started at `begin` gives up, and whether that is the run's deadline.
fn request_limit(shared: &Shared, begin: Instant) -> (Instant, bool) {
    let request_deadline = begin + shared.spec.timeout;
    match shared.deadline {
        Some(d) if d < request_deadline => (d, true),
        _ => (request_deadline, false),
    }
}

async fn worker(shared: Arc<Shared>) -> WorkerStats {
    let mut stats = WorkerStats::for_worker();
    let mut conn: Option<Conn> = None;
    let mut pacer = Pacer::new(shared.spec.qps);
    loop {
        if !pacer.wait(shared.deadline).await || !shared.take() {
            break;
        }
        let begin = Instant::now();
        let (limit, by_run_deadline) = request_limit(&shared, begin);
        let outcome = tokio::time::timeout_at(
            tokio::time::Instant::from_std(limit),
            exchange::one_request(&shared, &mut conn, &mut stats),
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
            Ok(Ok(done)) => answered(&shared, &mut stats, &mut conn, begin, done).await,
        }
    }
    stats
}

/// A response came: its latency, and the connection closed if it must be.
async fn answered(
    shared: &Shared,
    stats: &mut WorkerStats,
    conn: &mut Option<Conn>,
    begin: Instant,
    done: Done,
) {
    stats.latency(begin.elapsed().as_micros().max(1) as u64);
    shared.completed.fetch_add(1, Ordering::Relaxed);
    if done.close {
        if let Some(c) = conn.take() {
            conn::wait_for_close(c).await;
        }
    }
}
