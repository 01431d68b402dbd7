//! The measurement rounds of `compare`: a warm-up that each front end must
//! pass, then per round keep-alive and new-connection load with each HTTP
//! tool, then bulk transfers with 1 and 4 streams, every front end in turn,
//! so a busy machine slows them all alike. The turn order differs each round
//! and between batches ([`turn_order`]): whatever one front end's run leaves
//! behind (TIME_WAIT sockets, a warm or cold cache) is met by the next one,
//! and a fixed order would hand that to the same one in every batch. Also the
//! load commands, as the report prints them.

use std::path::Path;
use std::time::Duration;

use super::options::{log, CompareOptions, Programs};
use super::peers::Running;
use super::results::{FrontendStatus, Sample, BULK1, BULK4, KA, NEW};
use super::sampling::{cpu, cpu_us_per, machine_cpu};
use crate::load::{self, LoadSpec};
use crate::net::Target;
use crate::tools::{self, HttpRun};

/// Everything the rounds found: the samples, and what went wrong on the way.
#[derive(Default)]
pub(crate) struct Measured {
    pub(crate) samples: Vec<Sample>,
    pub(crate) problems: Vec<String>,
}

/// An HTTP load tool's figures: rate, p50 and p99 ms, responses, errors.
type LoadFigures = (f64, Option<f64>, Option<f64>, u64, u64);

/// What the rounds drive and with what.
pub(crate) struct Rounds<'a> {
    pub(crate) rt: &'a tokio::runtime::Runtime,
    pub(crate) opts: &'a CompareOptions,
    pub(crate) dir: &'a Path,
    pub(crate) programs: &'a Programs,
}

fn http_target(addr: std::net::SocketAddr) -> Target {
    Target::Http {
        addr,
        host: addr.to_string(),
        path: "/".into(),
    }
}

/// 100 requests through each front end; one that does not answer them all
/// is marked failed and left out of the rounds.
pub(crate) fn warm_up(
    rt: &tokio::runtime::Runtime,
    running: &mut Vec<Running>,
    statuses: &mut [FrontendStatus],
    quiet: bool,
) {
    running.retain(|r| {
        let mut spec = LoadSpec::new(http_target(r.http));
        spec.requests = Some(100);
        spec.concurrency = 4;
        spec.timeout = Duration::from_secs(5);
        let problem = match rt.block_on(load::run(spec)) {
            Ok(rep) if rep.ok() == 100 => return true,
            Ok(rep) => format!(
                "warm-up: {} of 100 OK, errors {:?}, status {:?}",
                rep.ok(),
                rep.errors,
                rep.status
            ),
            Err(e) => format!("warm-up: {e}"),
        };
        log(
            quiet,
            &format!("compare: {}: {problem}", r.frontend.label()),
        );
        if let Some(s) = statuses.iter_mut().find(|s| s.frontend == r.frontend) {
            s.status = "failed";
            s.detail = problem;
        }
        false
    });
}

impl Rounds<'_> {
    /// Every round: HTTP load (keep-alive, then new connections), then bulk.
    pub(crate) fn run(&self, running: &[Running], quiet: bool) -> Measured {
        let mut m = Measured::default();
        for round in 1..=self.opts.rounds {
            log(
                quiet,
                &format!("compare: round {round}/{}", self.opts.rounds),
            );
            let http_batches = self.http_round(round, running, &mut m);
            self.bulk_round(round, http_batches, running, &mut m);
        }
        m
    }

    /// The round's HTTP batches (one per keep-alive × tool), numbered from 0;
    /// [`Self::bulk_round`] numbers its batches on from where this stopped.
    fn http_round(&self, round: usize, running: &[Running], m: &mut Measured) -> usize {
        let mut batch = 0;
        for ka in [true, false] {
            for (tool, bin) in self.programs.http_tools() {
                for r in turn_order(running, round, batch) {
                    match self.measure_http(r, tool, bin, ka, round) {
                        Ok(s) => m.samples.push(s),
                        Err(e) => m.problems.push(format!(
                            "round {round}, {}, {tool}, {}: {e}",
                            r.frontend.label(),
                            if ka { "keep-alive" } else { "new connections" }
                        )),
                    }
                }
                batch += 1;
            }
        }
        batch
    }

    fn bulk_round(&self, round: usize, first_batch: usize, running: &[Running], m: &mut Measured) {
        let (opts, bulk_tool) = (self.opts, self.programs.bulk_tool());
        for (batch, (metric, streams)) in [(BULK1, 1usize), (BULK4, 4)].into_iter().enumerate() {
            for r in turn_order(running, round, first_batch + batch) {
                let res = match &self.programs.iperf3 {
                    Some(b) => tools::iperf3(b, r.bulk, streams, opts.bulk_duration, self.dir),
                    None => tools::bulk_builtin(r.bulk, streams, opts.bulk_duration),
                };
                match res {
                    Ok(g) => m
                        .samples
                        .push(Sample::figure(round, r.frontend, metric, bulk_tool, g)),
                    Err(e) => m.problems.push(format!(
                        "round {round}, {}, bulk {streams}: {e}",
                        r.frontend.label()
                    )),
                }
            }
        }
    }

    /// One HTTP load measurement with `tool` against `r`, with the proxy's
    /// and the whole machine's CPU time per response over it.
    fn measure_http(
        &self,
        r: &Running,
        tool: &str,
        bin: Option<&Path>,
        keepalive: bool,
        round: usize,
    ) -> std::result::Result<Sample, String> {
        let (before, machine_before) = (cpu(r), machine_cpu());
        let (value, p50, p99, count, errors) = self.load(r, tool, bin, keepalive)?;
        let cpu_us = cpu_us_per(before, cpu(r), count);
        let machine_cpu_us = cpu_us_per(machine_before, machine_cpu(), count);
        Ok(Sample {
            round,
            frontend: r.frontend,
            metric: if keepalive { KA } else { NEW },
            tool: tool.to_owned(),
            value,
            p50_ms: p50,
            p99_ms: p99,
            cpu_us,
            machine_cpu_us,
            errors,
        })
    }

    fn load(
        &self,
        r: &Running,
        tool: &str,
        bin: Option<&Path>,
        keepalive: bool,
    ) -> std::result::Result<LoadFigures, String> {
        let opts = self.opts;
        if tool == "lb-bench" {
            let mut spec = LoadSpec::new(http_target(r.http));
            spec.duration = Some(opts.duration);
            spec.concurrency = opts.concurrency;
            spec.keepalive = keepalive;
            spec.timeout = Duration::from_secs(10);
            let rep = self
                .rt
                .block_on(load::run(spec))
                .map_err(|e| e.to_string())?;
            let errors = rep.errors_total + (rep.responses - rep.ok());
            let (p50, p99) = (rep.latency.p50_ms, rep.latency.p99_ms);
            return Ok((
                rep.requests_per_sec,
                Some(p50),
                Some(p99),
                rep.responses,
                errors,
            ));
        }
        let bin = bin.ok_or("not installed")?;
        let url = format!("http://{}/", r.http);
        let run = HttpRun {
            url: &url,
            concurrency: opts.concurrency,
            duration: opts.duration,
            keepalive,
        };
        let s = match tool {
            "hey" => tools::hey(bin, &run, self.dir),
            "wrk" => tools::wrk(bin, &run, self.dir),
            _ => return Err(format!("unknown tool {tool}")),
        }
        .map_err(|e| e.to_string())?;
        // wrk reports no response count: the rate over the duration stands in.
        let count = if s.responses > 0 {
            s.responses
        } else {
            (s.requests_per_sec * opts.duration.as_secs_f64()) as u64
        };
        Ok((s.requests_per_sec, s.p50_ms, s.p99_ms, count, s.errors))
    }
}

/// The front ends in the order batch `batch` (from 0) of round `round`
/// (from 1) runs them: each exactly once.
///
/// Round r walks the list with a stride s_r coprime to n, from a start that
/// moves on each round (k-th turn: (r - 1 + k·s_r) mod n), s_r cycling over
/// the strides in 1..n that are coprime to n; odd batches run that walk
/// backwards, so at a batch boundary a front end follows itself rather than
/// handing the same pair on every time. Within a round, a front end i inside
/// the walk is followed by i + s_r in forward batches and by i − s_r in
/// backward ones (distinct for n ≥ 3); the two at the walk's ends are followed
/// by their one neighbour or by themselves. So within a round no front end
/// follows another in every batch, and across rounds the successors change
/// with the stride: n = 5, front end 0 (`direct`) is followed by 1 in round 1,
/// by 2 and 3 in rounds 2 and 3, and by 4 from round 4 (stride 4). Only
/// strides 1 and n − 1 are coprime to 4 and 6, so there the successors are
/// always the neighbours ±1: the front end opposite never runs right after.
pub(crate) fn turn_order<T>(items: &[T], round: usize, batch: usize) -> impl Iterator<Item = &T> {
    let n = items.len();
    let round = round.saturating_sub(1);
    let strides: Vec<usize> = (1..n).filter(|&s| gcd(s, n) == 1).collect();
    let stride = strides
        .get(round % strides.len().max(1))
        .copied()
        .unwrap_or(1);
    let start = round % n.max(1);
    let mut turns: Vec<usize> = (0..n).map(|k| (start + k * stride) % n).collect();
    if batch % 2 == 1 {
        turns.reverse();
    }
    turns.into_iter().map(move |i| &items[i])
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The load commands of a run, with FRONTEND (and BULK_PORT) for the address
/// of each front end in turn.
pub(crate) fn commands(opts: &CompareOptions, programs: &Programs) -> Vec<String> {
    let (d, c) = (opts.duration, opts.concurrency);
    let mut commands = Vec::new();
    for (tool, _) in programs.http_tools() {
        for ka in [true, false] {
            commands.push(match tool {
                "lb-bench" => format!(
                    "lb-bench load -z {} -c {c}{} http://FRONTEND/",
                    tools::go_duration(d),
                    if ka { "" } else { " --disable-keepalive" }
                ),
                "hey" => format!(
                    "hey -z {} -c {c} -t 10{} http://FRONTEND/",
                    tools::go_duration(d),
                    if ka { "" } else { " -disable-keepalive" }
                ),
                _ => format!(
                    "wrk -t N -c {c} -d {}s --timeout 10s --latency{} http://FRONTEND/",
                    d.as_secs_f64().round().max(1.0),
                    if ka { "" } else { " -H 'Connection: close'" }
                ),
            });
        }
    }
    let bulk_secs = opts.bulk_duration.as_secs_f64().round().max(1.0);
    commands.push(if programs.iperf3.is_some() {
        format!("iperf3 -c 127.0.0.1 -p BULK_PORT -P 1|4 -t {bulk_secs} -J")
    } else {
        format!(
            "built-in: 1|4 TCP streams writing to a sink for {:?}",
            opts.bulk_duration
        )
    });
    commands
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Batches per round in a run with all three HTTP tools: 2 × 3 HTTP, 2 bulk.
    const BATCHES: usize = 8;

    /// Every turn of rounds 1..=3 in run order, batch after batch.
    fn run_order(n: usize) -> Vec<Vec<usize>> {
        let fes: Vec<usize> = (0..n).collect();
        (1..=3)
            .map(|round| {
                (0..BATCHES)
                    .flat_map(|b| turn_order(&fes, round, b).copied().collect::<Vec<_>>())
                    .collect()
            })
            .collect()
    }

    /// Who runs right after front end 0 (`direct`) in one round's turns,
    /// batch boundaries included, leaving out 0 following itself.
    fn after_direct(turns: &[usize]) -> Vec<usize> {
        turns
            .windows(2)
            .filter(|w| w[0] == 0 && w[1] != 0)
            .map(|w| w[1])
            .collect()
    }

    #[test]
    fn every_front_end_runs_exactly_once_per_batch() {
        for n in 0..=7 {
            let fes: Vec<usize> = (0..n).collect();
            for round in 1..=8 {
                for batch in 0..BATCHES {
                    let mut order: Vec<usize> = turn_order(&fes, round, batch).copied().collect();
                    order.sort_unstable();
                    assert_eq!(order, fes, "n {n}, round {round}, batch {batch}");
                }
            }
        }
    }

    #[test]
    fn within_a_round_no_front_end_follows_another_in_every_batch() {
        for n in [3, 4, 5, 6] {
            for (round, turns) in run_order(n).iter().enumerate() {
                for i in 0..n {
                    // Who runs right after each of i's turns, itself included.
                    let after: Vec<usize> = turns
                        .windows(2)
                        .filter(|w| w[0] == i)
                        .map(|w| w[1])
                        .collect();
                    assert_eq!(
                        after.len(),
                        BATCHES - usize::from(turns[turns.len() - 1] == i)
                    );
                    let always = after.iter().all(|&j| j == after[0]) && after[0] != i;
                    assert!(
                        !always,
                        "n {n}, round {}: {i} always followed by {after:?}",
                        round + 1
                    );
                }
            }
        }
    }

    #[test]
    fn with_five_front_ends_directs_successor_changes_every_round() {
        let rounds = run_order(5);
        // The first batch of each round: a different front end after direct.
        let firsts: Vec<usize> = rounds.iter().map(|t| after_direct(&t[..5])[0]).collect();
        assert_eq!(
            firsts,
            [1, 2, 3],
            "successor of direct in batch 0 of rounds 1..=3"
        );
        // Over the three rounds, batch boundaries included, not one front end.
        let mut all: Vec<usize> = rounds
            .concat()
            .windows(2)
            .filter(|w| w[0] == 0 && w[1] != 0)
            .map(|w| w[1])
            .collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all, [1, 2, 3]);
        // Round 4 (stride 4) brings the last one.
        let fes = [0, 1, 2, 3, 4];
        assert_eq!(
            after_direct(&turn_order(&fes, 4, 0).copied().collect::<Vec<_>>()),
            [4]
        );
    }

    #[test]
    fn with_four_or_six_only_the_neighbours_follow_direct() {
        // Only strides 1 and n − 1 are coprime to 4 and 6: direct is followed
        // by front ends 1 and n − 1 in turn, never by the one opposite.
        for n in [4, 6] {
            let rounds = run_order(n);
            let mut all: Vec<usize> = rounds.iter().flat_map(|t| after_direct(t)).collect();
            all.sort_unstable();
            all.dedup();
            assert_eq!(all, [1, n - 1], "n {n}");
        }
    }

    #[test]
    fn a_batch_boundary_repeats_a_front_end_instead_of_handing_a_pair_on() {
        let fes = ["direct", "lb-proxy", "haproxy", "nginx", "lb-proxy-sockmap"];
        for round in 1..=3 {
            let last: Vec<&str> = turn_order(&fes, round, 0).copied().collect();
            let next: Vec<&str> = turn_order(&fes, round, 1).copied().collect();
            assert_eq!(last.last(), next.first(), "round {round}");
        }
        assert_eq!(turn_order::<u8>(&[], 3, 1).count(), 0);
    }
}
