//! The measurement rounds of `compare`: a warm-up that each front end must
//! pass, then per round keep-alive and new-connection load with each HTTP
//! tool, then bulk transfers with 1 and 4 streams, every front end in turn,
//! so a busy machine slows them all alike. The turn order rotates each round
//! (A B C D, B C D A, ...; [`rotated`]): whichever front end follows
//! `direct`'s new-connection run inherits its TIME_WAIT backlog, and a fixed
//! order would hand that handicap to the same one every round. Also the load
//! commands, as the report prints them.

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
            self.http_round(round, running, &mut m);
            self.bulk_round(round, running, &mut m);
        }
        m
    }

    fn http_round(&self, round: usize, running: &[Running], m: &mut Measured) {
        for ka in [true, false] {
            for (tool, bin) in self.programs.http_tools() {
                for r in rotated(running, round) {
                    match self.measure_http(r, tool, bin, ka, round) {
                        Ok(s) => m.samples.push(s),
                        Err(e) => m.problems.push(format!(
                            "round {round}, {}, {tool}, {}: {e}",
                            r.frontend.label(),
                            if ka { "keep-alive" } else { "new connections" }
                        )),
                    }
                }
            }
        }
    }

    fn bulk_round(&self, round: usize, running: &[Running], m: &mut Measured) {
        let (opts, bulk_tool) = (self.opts, self.programs.bulk_tool());
        for (metric, streams) in [(BULK1, 1usize), (BULK4, 4)] {
            for r in rotated(running, round) {
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

/// The front ends in round `round`'s order (rounds count from 1): round r
/// starts at the one at (r - 1) mod n and wraps, the same for every tool and
/// for bulk, so over n rounds each front end follows every other once.
pub(crate) fn rotated<T>(items: &[T], round: usize) -> impl Iterator<Item = &T> {
    let start = round.saturating_sub(1) % items.len().max(1);
    items[start..].iter().chain(&items[..start])
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

    #[test]
    fn every_front_end_runs_once_per_round_and_each_round_starts_elsewhere() {
        let fes = ["direct", "lb-proxy", "haproxy", "nginx"];
        let mut firsts = Vec::new();
        for round in 1..=fes.len() {
            let order: Vec<&str> = rotated(&fes, round).copied().collect();
            let mut sorted = order.clone();
            sorted.sort_unstable();
            let mut all = fes.to_vec();
            all.sort_unstable();
            assert_eq!(sorted, all, "round {round}: {order:?}");
            firsts.push(order[0]);
        }
        assert_eq!(firsts, fes, "round r starts at front end (r-1) mod n");
        // Round n + 1 starts over; lb-proxy does not always follow direct.
        assert_eq!(rotated(&fes, 5).next(), Some(&"direct"));
        assert_eq!(
            rotated(&fes, 2).copied().collect::<Vec<_>>(),
            ["lb-proxy", "haproxy", "nginx", "direct"]
        );
        assert_eq!(rotated::<u8>(&[], 3).count(), 0);
    }
}
