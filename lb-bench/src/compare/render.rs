//! Turning `compare`'s samples into what a reader sees: the medians table
//! ([`Row`]s), the generator check, and the Markdown page (compare.md).

use std::fmt::Write as _;
use std::path::Path;

use super::options::CompareOptions;
use super::results::{
    fmt_num, metric_label, CompareResult, Frontend, FrontendStatus, Row, Sample, BULK1, BULK4,
    IDLE, KA, NEW,
};
use super::rounds;
use crate::stats;

fn median_of(
    samples: &[Sample],
    fe: Frontend,
    metric: &str,
    tool: &str,
    f: impl Fn(&Sample) -> Option<f64>,
) -> Option<f64> {
    let v: Vec<f64> = samples
        .iter()
        .filter(|s| s.frontend == fe && s.metric == metric && s.tool == tool)
        .filter_map(f)
        .collect();
    stats::median(&v)
}

/// The medians table: per HTTP tool the rate, p50, p99, proxy and machine CPU of
/// keep-alive and new connections; then bulk; then idle memory.
pub(crate) fn table_rows(
    samples: &[Sample],
    order: &[Frontend],
    http_tools: &[&str],
    bulk_tool: &str,
    idle: usize,
) -> Vec<Row> {
    let mut rows = Vec::new();
    let row = |metric: String, tool: &str, f: &dyn Fn(Frontend) -> Option<f64>| Row {
        metric,
        tool: tool.to_owned(),
        values: order.iter().map(|&fe| f(fe)).collect(),
    };
    for m in [KA, NEW] {
        let (what, per) = if m == KA {
            ("keep-alive", "request")
        } else {
            ("new connection", "connection")
        };
        for &tool in http_tools {
            rows.push(row(metric_label(m).into(), tool, &|fe| {
                median_of(samples, fe, m, tool, |s| Some(s.value))
            }));
            rows.push(row(format!("{what} p50 ms"), tool, &|fe| {
                median_of(samples, fe, m, tool, |s| s.p50_ms)
            }));
            rows.push(row(format!("{what} p99 ms"), tool, &|fe| {
                median_of(samples, fe, m, tool, |s| s.p99_ms)
            }));
            rows.push(row(format!("proxy CPU µs per {per}"), tool, &|fe| {
                median_of(samples, fe, m, tool, |s| s.cpu_us)
            }));
            rows.push(row(format!("machine CPU µs per {per}"), tool, &|fe| {
                median_of(samples, fe, m, tool, |s| s.machine_cpu_us)
            }));
        }
    }
    for m in [BULK1, BULK4] {
        rows.push(row(metric_label(m).into(), bulk_tool, &|fe| {
            median_of(samples, fe, m, bulk_tool, |s| Some(s.value))
        }));
    }
    rows.push(row(
        format!("{} ({idle} conns)", metric_label(IDLE)),
        "lb-bench",
        &|fe| median_of(samples, fe, IDLE, "lb-bench", |s| Some(s.value)),
    ));
    rows
}

/// Whether lb-bench's generator kept up: its rate direct to one backend
/// beside hey's and wrk's in the same run.
pub(crate) fn accuracy_line(samples: &[Sample]) -> String {
    let direct = |metric: &str, tool: &str| {
        median_of(samples, Frontend::Direct, metric, tool, |s| Some(s.value))
    };
    let Some(own) = direct(KA, "lb-bench") else {
        return "generator check: no direct-to-backend measurement (is `direct` among the front ends?)".into();
    };
    let mut line = format!("generator check, direct to one backend in the same run (medians): keep-alive lb-bench {own:.0} req/s");
    match direct(KA, "hey") {
        Some(h) => {
            let _ = write!(
                line,
                ", hey {h:.0} req/s: lb-bench/hey = {:.2} ({})",
                own / h,
                if own >= h {
                    "the generator is not the bottleneck"
                } else {
                    "lb-bench drove the backend SLOWER than hey"
                }
            );
        }
        None => line.push_str(", hey not installed"),
    }
    if let Some(w) = direct(KA, "wrk") {
        let _ = write!(line, "; wrk {w:.0} req/s");
    }
    if let (Some(a), Some(b)) = (direct(NEW, "lb-bench"), direct(NEW, "hey")) {
        let _ = write!(
            line,
            "; new connections lb-bench {a:.0}/s vs hey {b:.0}/s ({:.2})",
            a / b
        );
    }
    line
}

/// What each CPU row counts, in one sentence each.
const CPU_ROWS: &str = "CPU rows: **proxy CPU** is the proxy's own processes' utime + stime \
(/proc/PID/stat; nginx's master and workers) per response, so it misses work the kernel does \
for the proxy in threads charged to no process (sockmap's psock backlog in kworkers, softirq); \
**machine CPU** is the whole machine's busy time (/proc/stat: user + nice + system + irq + \
softirq + steal, every process and kernel thread: generator, backends, proxy, kworkers) per \
response, so it includes the generator and backends and is the fair figure for an engine \
that moves bytes inside the kernel.";

/// compare.md: the budgets, the table, then how it was measured and what went wrong.
pub(crate) fn markdown(res: &CompareResult, opts: &CompareOptions, problems: &[String]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "Medians of {} interleaved round(s), front ends in a different order each round (and reversed between batches); {} worker thread(s) per proxy; {} concurrent clients; {:?} per load measurement, {:?} per bulk measurement.\n",
        opts.rounds, opts.workers, opts.concurrency, opts.duration, opts.bulk_duration
    );
    table(&mut o, res, opts);
    rounds::table(
        &mut o,
        &res.samples,
        &round_ratios(&opts.frontends),
        opts.rounds,
    );
    let _ = writeln!(o, "\n{CPU_ROWS}");
    setup(&mut o, res, opts);
    problem_list(&mut o, res, problems);
    if let Some(c) = &res.chart_path {
        let cwd = std::env::current_dir().ok();
        let _ = writeln!(o, "\nChart: `{}`", under(c, cwd.as_deref()).display());
    }
    let _ = writeln!(o, "\nCompare run time: {:.1} s.", res.elapsed_secs);
    o
}

/// `path` relative to `dir` when it lies under it, else as given: the page
/// is read from the checkout (BENCHMARKS.md), where this machine's absolute
/// path means nothing.
fn under<'a>(path: &'a Path, dir: Option<&Path>) -> &'a Path {
    dir.and_then(|d| path.strip_prefix(d).ok())
        .filter(|rel| !rel.as_os_str().is_empty())
        .unwrap_or(path)
}

/// A ratio column: `numerator / denominator` of each row's medians.
struct Ratio {
    num: Frontend,
    den: Frontend,
    header: &'static str,
}

/// The one place that decides the ratio columns, in their order: each shows
/// when every front end in its `needs` is in the run. Each engine (tokio,
/// and io_uring, the default where the kernel permits it) against direct,
/// HAProxy and nginx; each against nginx with half-close (its like, both
/// engines half-close by default) when that ran; each without half-close
/// against nginx's default; sockmap against direct and HAProxy (the issue's
/// bars).
fn ratio_columns(frontends: &[Frontend]) -> Vec<Ratio> {
    use Frontend::*;
    type Column = (&'static [Frontend], Frontend, Frontend, &'static str);
    const COLUMNS: [Column; 12] = [
        (&[LbProxy], LbProxy, Direct, "tokio / direct"),
        (&[LbProxy], LbProxy, Haproxy, "tokio / haproxy"),
        (&[LbProxy], LbProxy, NginxStream, "tokio / nginx"),
        (
            &[LbProxyNoHalfClose],
            LbProxyNoHalfClose,
            NginxStream,
            "tokio no-half-close / nginx",
        ),
        (
            &[LbProxy, NginxHalfClose],
            LbProxy,
            NginxHalfClose,
            "tokio / nginx half-close",
        ),
        (
            &[LbProxyIoUring],
            LbProxyIoUring,
            Direct,
            "io_uring / direct",
        ),
        (
            &[LbProxyIoUring],
            LbProxyIoUring,
            Haproxy,
            "io_uring / haproxy",
        ),
        (
            &[LbProxyIoUring],
            LbProxyIoUring,
            NginxStream,
            "io_uring / nginx",
        ),
        (
            &[LbProxyIoUring, NginxHalfClose],
            LbProxyIoUring,
            NginxHalfClose,
            "io_uring / nginx half-close",
        ),
        (
            &[LbProxyIoUringNoHalfClose],
            LbProxyIoUringNoHalfClose,
            NginxStream,
            "io_uring no-half-close / nginx",
        ),
        (
            &[LbProxySockmap],
            LbProxySockmap,
            Direct,
            "sockmap / direct",
        ),
        (
            &[LbProxySockmap],
            LbProxySockmap,
            Haproxy,
            "sockmap / haproxy",
        ),
    ];
    COLUMNS
        .iter()
        .filter(|(needs, ..)| needs.iter().all(|f| frontends.contains(f)))
        .map(|&(_, num, den, header)| Ratio { num, den, header })
        .collect()
}

/// The [`ratio_columns`] as the round-by-round table takes them.
pub(crate) fn round_ratios(frontends: &[Frontend]) -> Vec<(Frontend, Frontend, &'static str)> {
    ratio_columns(frontends)
        .into_iter()
        .map(|r| (r.num, r.den, r.header))
        .collect()
}

/// The medians table, a column per front end (its status when it did not
/// run), then the [`ratio_columns`].
fn table(o: &mut String, res: &CompareResult, opts: &CompareOptions) {
    let order = in_order(res, opts);
    let ratios = ratio_columns(&opts.frontends);
    let _ = write!(o, "| metric | tool |");
    for s in &order {
        let _ = write!(o, " {} |", s.label);
    }
    for r in &ratios {
        let _ = write!(o, " {} |", r.header);
    }
    let _ = write!(o, "\n|---|---|");
    for _ in 0..order.len() + ratios.len() {
        let _ = write!(o, "---:|");
    }
    o.push('\n');
    for row in &res.rows {
        if row.values.iter().all(Option::is_none) && !row.metric.starts_with("RSS") {
            continue;
        }
        let _ = write!(o, "| {} | {} |", row.metric, row.tool);
        for (i, s) in order.iter().enumerate() {
            let cell = if s.status != "ok" {
                s.status.to_owned()
            } else {
                fmt_num(row.values.get(i).copied().flatten())
            };
            let _ = write!(o, " {cell} |");
        }
        for r in &ratios {
            let _ = write!(o, " {} |", ratio_cell(r, row, &order, opts));
        }
        o.push('\n');
    }
}

/// One ratio of one row: the quotient, `-` without both figures, or why a
/// front end of it has none (`haproxy missing`, `lb-sockmap failed`).
fn ratio_cell(r: &Ratio, row: &Row, order: &[&FrontendStatus], opts: &CompareOptions) -> String {
    let status = |fe: Frontend| order.iter().find(|s| s.frontend == fe).map(|s| s.status);
    for fe in [r.num, r.den] {
        match status(fe) {
            Some("ok") => {}
            other => return format!("{} {}", fe.short_label(), other.unwrap_or("not run")),
        }
    }
    let get = |fe: Frontend| {
        let i = opts.frontends.iter().position(|f| *f == fe)?;
        row.values.get(i).copied().flatten()
    };
    match (get(r.num), get(r.den)) {
        (Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    }
}

/// The front ends' statuses in the order asked for.
fn in_order<'a>(res: &'a CompareResult, opts: &CompareOptions) -> Vec<&'a FrontendStatus> {
    opts.frontends
        .iter()
        .filter_map(|fe| res.frontends.iter().find(|s| s.frontend == *fe))
        .collect()
}

/// The generator check, the front ends, backends and tools, and the commands.
fn setup(o: &mut String, res: &CompareResult, opts: &CompareOptions) {
    let _ = writeln!(o, "\n{}\n", res.accuracy);
    let _ = writeln!(o, "Front ends:\n");
    for s in in_order(res, opts) {
        let _ = writeln!(o, "- **{}**: {} — {}", s.label, s.status, s.detail);
    }
    let _ = writeln!(o, "\nBackends: {}.\n\nTools:\n", res.backends);
    for (t, d) in &res.tools {
        let _ = writeln!(o, "- {t}: {d}");
    }
    let _ = writeln!(
        o,
        "\nLoad commands (FRONTEND is each front end's address in turn):\n"
    );
    code_block(o, &res.commands);
}

/// A fenced block, one line per item.
pub fn code_block(o: &mut String, lines: &[String]) {
    let _ = writeln!(o, "```");
    for l in lines {
        let _ = writeln!(o, "{l}");
    }
    let _ = writeln!(o, "```");
}

/// Runs with errors, then the problems met on the way; nothing when there were none.
fn problem_list(o: &mut String, res: &CompareResult, problems: &[String]) {
    let errs: Vec<String> = res
        .samples
        .iter()
        .filter(|s| s.errors > 0)
        .map(|s| {
            format!(
                "round {}, {}, {} {}: {} errors",
                s.round,
                s.frontend.label(),
                s.tool,
                s.metric,
                s.errors
            )
        })
        .collect();
    if !errs.is_empty() || !problems.is_empty() {
        let _ = writeln!(o, "\nProblems:\n");
        for p in errs.iter().chain(problems) {
            let _ = writeln!(o, "- {p}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_path_is_written_relative_to_the_directory_it_lies_under() {
        let chart = Path::new("/work/main/docs/bench/workers-1/compare.svg");
        assert_eq!(
            under(chart, Some(Path::new("/work/main"))),
            Path::new("docs/bench/workers-1/compare.svg")
        );
        assert_eq!(under(chart, Some(Path::new("/tmp"))), chart, "not under it");
        assert_eq!(
            under(chart, Some(Path::new("/work/ma"))),
            chart,
            "a prefix of a name is not a parent"
        );
        assert_eq!(under(chart, None), chart);
        let rel = Path::new("bench-out/compare.svg");
        assert_eq!(under(rel, Some(Path::new("/work/main"))), rel);
    }

    fn sample(fe: Frontend, metric: &'static str, value: f64, cpu: Option<f64>) -> Sample {
        Sample {
            cpu_us: cpu,
            machine_cpu_us: Some(value / 100.0),
            ..Sample::figure(1, fe, metric, "lb-bench", value)
        }
    }

    #[test]
    fn machine_cpu_rows_sit_beside_the_proxy_rows_and_direct_has_one() {
        let samples = [
            sample(Frontend::Direct, KA, 1000.0, None),
            sample(Frontend::LbProxy, KA, 500.0, Some(7.0)),
            sample(Frontend::Direct, NEW, 300.0, None),
        ];
        let order = [Frontend::Direct, Frontend::LbProxy];
        let rows = table_rows(&samples, &order, &["lb-bench"], "built-in sink", 10);
        let find = |m: &str| {
            rows.iter()
                .find(|r| r.metric == m)
                .unwrap_or_else(|| panic!("{m}"))
        };
        assert_eq!(find("proxy CPU µs per request").values, [None, Some(7.0)]);
        assert_eq!(
            find("machine CPU µs per request").values,
            [Some(10.0), Some(5.0)]
        );
        assert_eq!(
            find("machine CPU µs per connection").values,
            [Some(3.0), None]
        );
        let proxy = rows
            .iter()
            .position(|r| r.metric == "proxy CPU µs per request");
        assert_eq!(
            rows.iter()
                .position(|r| r.metric == "machine CPU µs per request"),
            proxy.map(|p| p + 1)
        );
    }

    fn result(frontends: &[(Frontend, &'static str)], ka: Vec<Option<f64>>) -> CompareResult {
        let row = Row {
            metric: "keep-alive req/s".into(),
            tool: "lb-bench".into(),
            values: ka,
        };
        CompareResult::for_test(frontends, vec![row])
    }

    /// The table's header and keep-alive row, each split into cells.
    fn rendered(frontends: &[(Frontend, &'static str)], ka: Vec<Option<f64>>) -> [Vec<String>; 2] {
        let mut opts = CompareOptions::new(true);
        opts.frontends = frontends.iter().map(|f| f.0).collect();
        let mut o = String::new();
        table(&mut o, &result(frontends, ka), &opts);
        let cells = |prefix: &str| -> Vec<String> {
            let line = o
                .lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("{o}"));
            line.split('|')
                .map(|c| c.trim().to_owned())
                .filter(|c| !c.is_empty())
                .collect()
        };
        [cells("| metric |"), cells("| keep-alive req/s |")]
    }

    #[test]
    fn lb_proxy_is_divided_by_direct_haproxy_and_nginx() {
        use Frontend::*;
        let fes = [
            (Direct, "ok"),
            (LbProxy, "ok"),
            (Haproxy, "ok"),
            (NginxStream, "ok"),
        ];
        let [header, ka] = rendered(
            &fes,
            vec![Some(1000.0), Some(600.0), Some(500.0), Some(400.0)],
        );
        assert_eq!(
            header[6..],
            ["tokio / direct", "tokio / haproxy", "tokio / nginx"],
            "no sockmap column without the sockmap front end: {header:?}"
        );
        assert_eq!(ka[6..], ["0.60", "1.20", "1.50"], "{ka:?}");
        // A peer that did not run says so instead of a ratio.
        let fes = [(Direct, "ok"), (LbProxy, "ok"), (Haproxy, "missing")];
        let [_, ka] = rendered(&fes, vec![Some(1000.0), Some(600.0), None]);
        assert_eq!(
            ka[5..],
            ["0.60", "haproxy missing", "nginx not run"],
            "{ka:?}"
        );
    }

    #[test]
    fn io_uring_is_divided_by_each_peer_and_by_its_like_on_half_close() {
        use Frontend::*;
        let fes = [
            (LbProxy, "ok"),
            (LbProxyIoUring, "ok"),
            (Haproxy, "ok"),
            (NginxStream, "ok"),
            (NginxHalfClose, "ok"),
        ];
        let [header, ka] = rendered(
            &fes,
            vec![
                Some(600.0),
                Some(660.0),
                Some(600.0),
                Some(550.0),
                Some(440.0),
            ],
        );
        let io = header.iter().position(|h| h == "io_uring / haproxy");
        let io = io.unwrap_or_else(|| panic!("{header:?}"));
        assert_eq!(
            header[io..io + 3],
            [
                "io_uring / haproxy",
                "io_uring / nginx",
                "io_uring / nginx half-close"
            ],
            "{header:?}"
        );
        assert_eq!(ka[io..io + 3], ["1.10", "1.20", "1.50"], "{ka:?}");
        // Without half-close, the ring's like is nginx's default.
        let fes_nohc = [
            (LbProxyIoUringNoHalfClose, "ok"),
            (Haproxy, "ok"),
            (NginxStream, "ok"),
        ];
        let [header, ka] = rendered(&fes_nohc, vec![Some(660.0), Some(600.0), Some(550.0)]);
        assert_eq!(
            header.last().unwrap(),
            "io_uring no-half-close / nginx",
            "{header:?}"
        );
        assert_eq!(ka.last().unwrap(), "1.20", "{ka:?}");
        // Without nginx's half-close run there is no like to divide by.
        let [header, _] = rendered(
            &fes[..4],
            vec![Some(600.0), Some(660.0), Some(600.0), Some(550.0)],
        );
        assert!(
            !header.iter().any(|h| h == "io_uring / nginx half-close"),
            "{header:?}"
        );
    }

    #[test]
    fn sockmap_is_divided_by_direct_and_haproxy_when_it_is_in_the_run() {
        use Frontend::*;
        let fes = [
            (Direct, "ok"),
            (LbProxy, "ok"),
            (LbProxySockmap, "ok"),
            (Haproxy, "ok"),
        ];
        let [header, ka] = rendered(
            &fes,
            vec![Some(1000.0), Some(600.0), Some(900.0), Some(450.0)],
        );
        assert_eq!(
            header[9..],
            ["sockmap / direct", "sockmap / haproxy"],
            "{header:?}"
        );
        assert_eq!(
            ka[6..],
            ["0.60", "1.33", "nginx not run", "0.90", "2.00"],
            "{ka:?}"
        );
        let fes = [(Direct, "ok"), (LbProxySockmap, "failed"), (Haproxy, "ok")];
        let [header, ka] = rendered(&fes, vec![Some(1000.0), None, Some(450.0)]);
        // Without the tokio engine in the run, its ratio columns are left out.
        assert!(!header.iter().any(|h| h.starts_with("tokio")), "{header:?}");
        assert_eq!(
            ka[5..],
            ["lb-sockmap failed", "lb-sockmap failed"],
            "{ka:?}"
        );
    }
}
