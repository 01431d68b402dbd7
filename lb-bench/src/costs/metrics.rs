//! The cost of lb-proxy's metrics: `/metrics` scrape time with 100 backends
//! while load runs, and keep-alive req/s and proxy CPU with the data plane's
//! byte metrics on vs off, in alternating rounds. `lb-bench metrics-cost`
//! prints it; `lb-bench report` puts it in BENCHMARKS.md.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::{alternate, http, median, Bench, Load};
use crate::compare::{render::code_block, CompareOptions};
use crate::error::{Error, Result};
use crate::lbproxy::{self, LbProxy};
use crate::load::{self, LoadSpec};
use crate::procs;
use crate::tools;

/// What the metrics-cost measurement found.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MetricsCost {
    pub backends: usize,
    pub series_lines: usize,
    pub scrapes: usize,
    pub scrape_median_ms: f64,
    pub scrape_p90_ms: f64,
    pub scrape_max_ms: f64,
    /// The load tool for the on/off comparison.
    pub tool: String,
    pub rounds: usize,
    /// Per round, in the order measured (the order alternates between rounds).
    pub on_rps: Vec<f64>,
    pub off_rps: Vec<f64>,
    /// Proxy CPU (user + system) per response, µs, per round.
    pub on_cpu_us: Vec<f64>,
    pub off_cpu_us: Vec<f64>,
    pub commands: Vec<String>,
}

impl MetricsCost {
    /// on/off of each round: the pair ran back to back, so machine drift between
    /// rounds cancels out of it.
    pub fn paired_ratios(&self) -> Vec<f64> {
        let mut r: Vec<f64> = self
            .on_rps
            .iter()
            .zip(&self.off_rps)
            .map(|(on, off)| on / off)
            .collect();
        r.sort_by(f64::total_cmp);
        r
    }
}

/// One frontend `web` over `backends` copies of `backend`.
pub(crate) fn byte_metrics_config(
    byte_metrics: bool,
    backend: SocketAddr,
    backends: usize,
) -> String {
    let mut c = format!(
        "workers = 1\ndrain_timeout = \"1s\"\n[admin]\nlisten = \"127.0.0.1:0\"\nbyte_metrics = {byte_metrics}\n[[frontends]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[frontends.health]\nkind = \"tcp\"\ninterval = \"1s\"\n"
    );
    for i in 1..=backends {
        let _ = write!(
            c,
            "[[frontends.backends]]\nname = \"node-{i:03}\"\naddress = \"{backend}\"\n"
        );
    }
    c
}

/// Scrape times, sorted, and the `lb_` series lines of the last scrape.
struct Scrapes {
    times_ms: Vec<f64>,
    series_lines: usize,
    load_time: Duration,
}

/// Measures both figures; `quiet` silences progress lines on stderr.
pub fn measure(
    rt: &tokio::runtime::Runtime,
    opts: &CompareOptions,
    quiet: bool,
) -> Result<MetricsCost> {
    let iperf3 = procs::find_program("iperf3", opts.iperf3.as_deref());
    let bench = Bench::start(opts, "lb-bench-metrics.", iperf3.as_deref())?;
    let backend = bench.backends.nodes[0].1;
    let start =
        |name: &str, on: bool, n: usize| bench.lb_proxy(name, &byte_metrics_config(on, backend, n));
    let hundred = start("hundred", true, 100)?;
    let on = start("on", true, 3)?;
    let off = start("off", false, 3)?;

    progress(
        quiet,
        "metrics cost: scraping /metrics with 100 backends under load",
    );
    let scrapes = scrape_under_load(rt, opts, &hundred)?;
    progress(
        quiet,
        "metrics cost: keep-alive req/s with byte metrics on vs off",
    );
    let load = Load::new(rt, opts, bench.dir());
    on_off_rounds(&load, opts, &on, &off, &scrapes)
}

fn progress(quiet: bool, msg: &str) {
    if !quiet {
        eprintln!("{msg}");
    }
}

/// GET /metrics of the 100-backend proxy, 100 ms apart, while lb-bench
/// drives keep-alive load through it.
fn scrape_under_load(
    rt: &tokio::runtime::Runtime,
    opts: &CompareOptions,
    hundred: &LbProxy,
) -> Result<Scrapes> {
    let admin = hundred.admin.ok_or_else(|| Error::Protocol {
        what: "lb-proxy".into(),
        detail: "no admin address in the ready file".into(),
    })?;
    let (load_time, scrapes) = if opts.quick {
        (Duration::from_millis(1500), 8)
    } else {
        (Duration::from_secs(6), 40)
    };
    let mut spec = LoadSpec::new(http(hundred.frontend(Some("web"))?));
    spec.duration = Some(load_time);
    spec.concurrency = 50.min(opts.concurrency.max(8));
    let load = rt.spawn(load::run(spec));
    std::thread::sleep(load_time / 6);
    let mut times_ms = Vec::new();
    for _ in 0..scrapes {
        let t = Instant::now();
        lbproxy::metrics(admin)?;
        times_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = rt.block_on(load);
    let body = lbproxy::metrics(admin)?;
    times_ms.sort_by(f64::total_cmp);
    Ok(Scrapes {
        times_ms,
        series_lines: body.lines().filter(|l| l.starts_with("lb_")).count(),
        load_time,
    })
}

/// Keep-alive load on the byte-metrics-on and -off proxies in alternating
/// rounds; with the scrapes, the whole [`MetricsCost`].
fn on_off_rounds(
    load: &Load,
    opts: &CompareOptions,
    on: &LbProxy,
    off: &LbProxy,
    scrapes: &Scrapes,
) -> Result<MetricsCost> {
    // A 3% bar on a 2-core machine whose runs vary by ±15% needs more rounds than
    // compare's differences do.
    let rounds = if opts.quick {
        1
    } else {
        opts.rounds.max(1) * 2 + 2
    };
    let (mut on_rps, mut off_rps) = (Vec::new(), Vec::new());
    let (mut on_cpu_us, mut off_cpu_us) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for which in alternate(round, true, false) {
            let (rps, cpu_us, _) = load.measure(if which { on } else { off }, "web", true)?;
            if which {
                on_rps.push(rps);
                on_cpu_us.push(cpu_us);
            } else {
                off_rps.push(rps);
                off_cpu_us.push(cpu_us);
            }
        }
    }
    let times = &scrapes.times_ms;
    let commands = vec![
        format!(
            "lb-bench load -z {} -c 50 http://FRONTEND_100_BACKENDS/  while GET /metrics {} times, 100 ms apart",
            tools::go_duration(scrapes.load_time),
            times.len()
        ),
        load.command(true, "FRONTEND_ON|OFF", rounds),
    ];
    Ok(MetricsCost {
        backends: 100,
        series_lines: scrapes.series_lines,
        scrapes: times.len(),
        scrape_median_ms: median(times),
        scrape_p90_ms: times[((times.len() as f64 * 0.9) as usize).saturating_sub(1)],
        scrape_max_ms: times.last().copied().unwrap_or(f64::NAN),
        tool: load.tool().into(),
        rounds,
        on_rps,
        off_rps,
        on_cpu_us,
        off_cpu_us,
        commands,
    })
}

/// The figures as a Markdown table, then the commands that produced them.
pub fn markdown(m: &MetricsCost) -> String {
    let mut o = String::new();
    let on = median(&m.on_rps);
    let off = median(&m.off_rps);
    let _ = writeln!(o, "| figure | value |\n|---|---:|");
    let _ = writeln!(
        o,
        "| `/metrics` scrape with {} backends under load: median | {:.2} ms |",
        m.backends, m.scrape_median_ms
    );
    let _ = writeln!(o, "| … p90 | {:.2} ms |", m.scrape_p90_ms);
    let _ = writeln!(o, "| … max | {:.2} ms |", m.scrape_max_ms);
    let _ = writeln!(
        o,
        "| … scrapes, `lb_` series lines | {}, {} |",
        m.scrapes, m.series_lines
    );
    let _ = writeln!(
        o,
        "| keep-alive req/s, byte metrics on ({}, median of {}) | {on:.0} |",
        m.tool, m.rounds
    );
    let _ = writeln!(o, "| keep-alive req/s, byte metrics off | {off:.0} |");
    let _ = writeln!(o, "| on / off (of the medians) | {:.3} |", on / off);
    let paired = m.paired_ratios();
    if let (Some(mid), Some(lo), Some(hi)) =
        (crate::stats::median(&paired), paired.first(), paired.last())
    {
        let _ = writeln!(
            o,
            "| on / off per round: median (min–max) | {mid:.3} ({lo:.3}–{hi:.3}) |"
        );
    }
    let (cpu_on, cpu_off) = (median(&m.on_cpu_us), median(&m.off_cpu_us));
    let _ = writeln!(
        o,
        "| proxy CPU µs per request, on / off (medians) | {cpu_on:.1} / {cpu_off:.1} |\n"
    );
    code_block(&mut o, &m.commands);
    o.push('\n');
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_list_every_backend() {
        let c = byte_metrics_config(false, "127.0.0.1:1".parse().unwrap(), 100);
        assert_eq!(c.matches("[[frontends.backends]]").count(), 100);
        assert!(c.contains("byte_metrics = false"));
    }
}
