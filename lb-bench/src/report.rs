//! `lb-bench report`: one command that runs `compare`, the metrics-cost
//! figures (a port of `scripts/metrics-bench.sh`: `/metrics` scrape time with
//! 100 backends under load, and keep-alive req/s with byte metrics on vs off,
//! interleaved) and the seed experiment, and writes `BENCHMARKS.md` with the
//! date, the machine, the exact commands, the tables and the chart.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::compare::{self, CompareOptions, CompareResult};
use crate::error::{Error, IoContext, Result};
use crate::experiment::{self, SeedOptions, SeedOutcome};
use crate::lbproxy::{self, LbProxy};
use crate::load::{self, LoadSpec};
use crate::net::Target;
use crate::procs;
use crate::stats;
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

fn byte_metrics_config(byte_metrics: bool, backend: SocketAddr, backends: usize) -> String {
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

/// The port of `scripts/metrics-bench.sh`.
pub fn metrics_cost(
    rt: &tokio::runtime::Runtime,
    opts: &CompareOptions,
    quiet: bool,
) -> Result<MetricsCost> {
    let work = tempfile::Builder::new()
        .prefix("lb-bench-metrics.")
        .tempdir()
        .map_err(|e| Error::io("create a work directory", e))?;
    let dir = work.path();
    let bin = procs::lb_proxy_bin(opts.lb_proxy.as_deref())?;
    let nginx = procs::find_program("nginx", opts.nginx.as_deref());
    let iperf3 = procs::find_program("iperf3", opts.iperf3.as_deref());
    let (_, hard) = procs::raise_nofile_limit();
    let backends = compare::start_backends(opts, dir, nginx.as_deref(), iperf3.as_deref(), hard)?;
    let backend = backends.nodes[0].1;
    let hundred = LbProxy::run_config(
        &bin,
        dir,
        "hundred",
        &byte_metrics_config(true, backend, 100),
    )?;
    let on = LbProxy::run_config(&bin, dir, "on", &byte_metrics_config(true, backend, 3))?;
    let off = LbProxy::run_config(&bin, dir, "off", &byte_metrics_config(false, backend, 3))?;
    let admin = hundred.admin.ok_or_else(|| Error::Protocol {
        what: "lb-proxy".into(),
        detail: "no admin address in the ready file".into(),
    })?;
    let (load_time, scrapes) = if opts.quick {
        (Duration::from_millis(1500), 8)
    } else {
        (Duration::from_secs(6), 40)
    };
    if !quiet {
        eprintln!("metrics cost: scraping /metrics with 100 backends under load");
    }
    let target = hundred.frontend(Some("web"))?;
    let mut spec = LoadSpec::new(http(target));
    spec.duration = Some(load_time);
    spec.concurrency = 50.min(opts.concurrency.max(8));
    let load = rt.spawn(load::run(spec));
    std::thread::sleep(load_time / 6);
    let mut times = Vec::new();
    for _ in 0..scrapes {
        let t = Instant::now();
        lbproxy::metrics(admin)?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = rt.block_on(load);
    let body = lbproxy::metrics(admin)?;
    let series_lines = body.lines().filter(|l| l.starts_with("lb_")).count();
    times.sort_by(f64::total_cmp);
    let p90 = times[((times.len() as f64 * 0.9) as usize).saturating_sub(1)];

    if !quiet {
        eprintln!("metrics cost: keep-alive req/s with byte metrics on vs off");
    }
    let hey = procs::find_program("hey", opts.hey.as_deref());
    let tool = if hey.is_some() { "hey" } else { "lb-bench" };
    // A 3% bar on a 2-core machine whose runs vary by ±15% needs more rounds than
    // compare's differences do; the order alternates so neither side always runs
    // second (warmer caches, a hotter machine).
    let rounds = if opts.quick {
        1
    } else {
        opts.rounds.max(1) * 2 + 2
    };
    let (mut on_rps, mut off_rps) = (Vec::new(), Vec::new());
    let (mut on_cpu_us, mut off_cpu_us) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [("on", &on), ("off", &off)]
        } else {
            [("off", &off), ("on", &on)]
        };
        for (which, proxy) in order {
            let addr = proxy.frontend(Some("web"))?;
            let cpu_before = procs::cpu_secs(proxy.process.pid());
            let (rps, responses) = match &hey {
                Some(h) => {
                    let sample = tools::hey(
                        h,
                        &format!("http://{addr}/"),
                        opts.concurrency,
                        opts.duration,
                        true,
                        dir,
                    )?;
                    (sample.requests_per_sec, sample.responses)
                }
                None => {
                    let mut spec = LoadSpec::new(http(addr));
                    spec.duration = Some(opts.duration);
                    spec.concurrency = opts.concurrency;
                    let result = rt.block_on(load::run(spec))?;
                    (result.requests_per_sec, result.responses)
                }
            };
            let cpu_us = match (cpu_before, procs::cpu_secs(proxy.process.pid())) {
                (Some(a), Some(b)) if responses > 0 => (b - a) * 1e6 / responses as f64,
                _ => f64::NAN,
            };
            if which == "on" {
                on_rps.push(rps);
                on_cpu_us.push(cpu_us);
            } else {
                off_rps.push(rps);
                off_cpu_us.push(cpu_us);
            }
        }
    }
    let commands = vec![
        format!(
            "lb-bench load -z {} -c 50 http://FRONTEND_100_BACKENDS/  while GET /metrics {scrapes} times, 100 ms apart",
            tools::go_duration(load_time)
        ),
        match tool {
            "hey" => format!(
                "hey -z {} -c {} -t 10 http://FRONTEND_ON|OFF/   ({rounds} rounds, order alternating)",
                tools::go_duration(opts.duration),
                opts.concurrency
            ),
            _ => format!(
                "lb-bench load -z {} -c {} http://FRONTEND_ON|OFF/   ({rounds} rounds, order alternating)",
                tools::go_duration(opts.duration),
                opts.concurrency
            ),
        },
    ];
    Ok(MetricsCost {
        backends: 100,
        series_lines,
        scrapes: times.len(),
        scrape_median_ms: stats::median(&times).unwrap_or(f64::NAN),
        scrape_p90_ms: p90,
        scrape_max_ms: times.last().copied().unwrap_or(f64::NAN),
        tool: tool.into(),
        rounds,
        on_rps,
        off_rps,
        on_cpu_us,
        off_cpu_us,
        commands,
    })
}

fn http(addr: SocketAddr) -> Target {
    Target::Http {
        addr,
        host: addr.to_string(),
        path: "/".into(),
    }
}

/// `YYYY-MM-DD HH:MM UTC` from the system clock.
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}

/// The workspace root: the nearest directory upward from the current one
/// whose Cargo.toml has a `[workspace]` table.
pub fn workspace_root() -> Option<PathBuf> {
    let mut dir = std::env::current_dir().ok()?;
    loop {
        let manifest = dir.join("Cargo.toml");
        if std::fs::read_to_string(&manifest).is_ok_and(|t| t.contains("[workspace]")) {
            return Some(dir);
        }
        if !dir.pop() {
            return None;
        }
    }
}

/// What `report` ran.
pub struct ReportOutput {
    pub path: PathBuf,
    pub compare: CompareResult,
    pub metrics: std::result::Result<MetricsCost, String>,
    pub seed: std::result::Result<SeedOutcome, String>,
}

/// Runs everything and writes the report to `output`. `command` is the
/// command line to print as "produced by".
pub fn run(
    rt: &tokio::runtime::Runtime,
    opts: &CompareOptions,
    output: &Path,
    command: &str,
    quiet: bool,
) -> Result<ReportOutput> {
    let started = Instant::now();
    let date = utc_now();
    let compare = compare::run(rt, opts, quiet)?;
    let metrics = metrics_cost(rt, opts, quiet).map_err(|e| e.to_string());
    if !quiet {
        eprintln!("report: the seed experiment");
    }
    let mut seed_text = Vec::new();
    let seed_opts = SeedOptions {
        lb_proxy: opts.lb_proxy.clone(),
        ..SeedOptions::default()
    };
    let seed = experiment::run_seed(rt, &seed_opts, &mut seed_text).map_err(|e| e.to_string());
    let seed_text = String::from_utf8_lossy(&seed_text).into_owned();
    let machine = procs::machine();
    let lb_bin = procs::lb_proxy_bin(opts.lb_proxy.as_deref())
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| e.to_string());
    let base = output.parent().unwrap_or(Path::new("."));
    let chart_rel = compare.chart_path.as_ref().map(|c| {
        let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let (c_abs, b_abs) = (abs(c), abs(base));
        c_abs
            .strip_prefix(&b_abs)
            .map(Path::to_path_buf)
            .unwrap_or(c_abs)
    });

    let mut o = String::new();
    let _ = writeln!(o, "# Benchmarks\n");
    let _ = writeln!(
        o,
        "Produced by one command, `{command}`, on {date}{}. Re-run it on a quiet machine to refresh this file; \
         every figure below comes from that run.\n",
        if opts.quick {
            " with **--quick** budgets (a smoke run: the numbers are not meaningful)"
        } else {
            ""
        }
    );
    let _ = writeln!(o, "## Machine\n");
    let _ = writeln!(
        o,
        "- CPU: {} ({} logical CPUs, `nproc`)",
        machine.cpu, machine.nproc
    );
    let _ = writeln!(o, "- Kernel: {}", machine.kernel);
    let _ = writeln!(o, "- Memory: {:.1} GiB", machine.mem_gib);
    let (soft, hard) = procs::raise_nofile_limit();
    let _ = writeln!(o, "- Open-file limit: {soft} (hard {hard})");
    let _ = writeln!(
        o,
        "- lb-proxy: `{lb_bin}`{}",
        if procs::is_debug_build(Path::new(&lb_bin)) {
            " — a DEBUG build: build with --release for real figures"
        } else {
            ""
        }
    );
    let _ = writeln!(o, "\n## Commands\n\n```sh");
    let _ = writeln!(o, "cargo build --release -p lb-proxy -p lb-bench");
    let _ = writeln!(o, "{command}");
    let _ = writeln!(o, "```\n");
    let _ = writeln!(
        o,
        "`lb-bench compare` ran these against each front end in turn:\n\n```"
    );
    for c in &compare.commands {
        let _ = writeln!(o, "{c}");
    }
    let _ = writeln!(o, "```\n");
    let _ = writeln!(o, "## Front ends side by side (`lb-bench compare`)\n");
    let _ = writeln!(o, "{}", compare.markdown);
    if let Some(c) = &chart_rel {
        let _ = writeln!(o, "![compare chart]({})\n", c.display());
    }
    let _ = writeln!(o, "## Cost of metrics\n");
    match &metrics {
        Ok(m) => {
            let on = stats::median(&m.on_rps).unwrap_or(f64::NAN);
            let off = stats::median(&m.off_rps).unwrap_or(f64::NAN);
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
                (stats::median(&paired), paired.first(), paired.last())
            {
                let _ = writeln!(
                    o,
                    "| on / off per round: median (min–max) | {mid:.3} ({lo:.3}–{hi:.3}) |"
                );
            }
            let cpu_on = stats::median(&m.on_cpu_us).unwrap_or(f64::NAN);
            let cpu_off = stats::median(&m.off_cpu_us).unwrap_or(f64::NAN);
            let _ = writeln!(
                o,
                "| proxy CPU µs per request, on / off (medians) | {cpu_on:.1} / {cpu_off:.1} |\n"
            );
            let _ = writeln!(o, "```");
            for c in &m.commands {
                let _ = writeln!(o, "{c}");
            }
            let _ = writeln!(o, "```\n");
        }
        Err(e) => {
            let _ = writeln!(o, "Not measured: {e}\n");
        }
    }
    let _ = writeln!(o, "## The seed experiment (`lb-bench experiment seed`)\n");
    match &seed {
        Ok(s) => {
            for step in &s.steps {
                let _ = writeln!(
                    o,
                    "- **{}** {}: expected {}; got {}",
                    if step.pass { "PASS" } else { "FAIL" },
                    step.name,
                    step.expected,
                    step.got
                );
            }
            let _ = writeln!(
                o,
                "\n<details><summary>full output</summary>\n\n```\n{}```\n\n</details>\n",
                seed_text
            );
        }
        Err(e) => {
            let _ = writeln!(o, "Could not run: {e}\n");
        }
    }
    let _ = writeln!(o, "## Criterion benches of lb-core\n");
    let _ = writeln!(
        o,
        "Not part of this command (they need no balancer and take minutes): \
         `cargo bench -p lb-bench --bench core -- --warm-up-time 1 --measurement-time 3` \
         (lookup, table build, snapshot swap under readers).\n"
    );
    let _ = writeln!(
        o,
        "Report run time: {:.0} s.",
        started.elapsed().as_secs_f64()
    );
    std::fs::write(output, &o).ctx(|| format!("write {}", output.display()))?;
    Ok(ReportOutput {
        path: output.to_path_buf(),
        compare,
        metrics,
        seed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil() {
        let d = utc_now();
        assert_eq!(d.len(), "2026-01-01 00:00 UTC".len(), "{d}");
        assert!(d.starts_with("20"), "{d}");
    }

    #[test]
    fn configs_list_every_backend() {
        let c = byte_metrics_config(false, "127.0.0.1:1".parse().unwrap(), 100);
        assert_eq!(c.matches("[[frontends.backends]]").count(), 100);
        assert!(c.contains("byte_metrics = false"));
    }
}
