//! `lb-bench report`: one command that runs `compare` once per worker count
//! (`--tcp-workers`, default 1 and 2: one section each), the UDP and QUIC
//! comparisons (`compare --proto udp|quic`), the metrics-cost figures
//! ([`crate::costs::metrics`]) and the seed experiment, and writes
//! `BENCHMARKS.md` with the date, the machine, the exact commands, the tables
//! and the charts.
//!
//! The whole report takes the better part of an hour, most of it the TCP
//! compares; `report --sections tcp,udp,quic` runs only those sections and
//! puts them into the existing file in place of their previous versions
//! ([`splice`]), each with the command, date and load average it was
//! produced with.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::compare::quic::QuicCompareResult;
use crate::compare::udp::UdpCompareResult;
use crate::compare::{self, CompareOptions, CompareResult};
use crate::costs::metrics::{self, MetricsCost};
use crate::error::{IoContext, Result};
use crate::experiment::{self, SeedOptions, SeedOutcome};
use crate::procs;

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

/// When a section's measurements started, and the load average as they
/// ended: its own, not the report's (one report runs for most of an hour).
#[derive(Clone, Debug)]
pub struct Stamp {
    pub started: String,
    pub load_at_end: String,
}

/// Runs `measure`, stamped with its start time and the load average at its end.
fn stamped<T>(measure: impl FnOnce() -> T) -> (T, Stamp) {
    stamped_with(utc_now, load_average, measure)
}

/// [`stamped`] on the given clock and load reading.
fn stamped_with<T>(
    now: impl FnOnce() -> String,
    load: impl FnOnce() -> String,
    measure: impl FnOnce() -> T,
) -> (T, Stamp) {
    let started = now();
    let out = measure();
    let load_at_end = load();
    (
        out,
        Stamp {
            started,
            load_at_end,
        },
    )
}

/// One TCP compare of the report: the worker count it ran at, its result,
/// and its stamp.
pub struct TcpCompare {
    pub workers: usize,
    pub result: CompareResult,
    pub stamp: Stamp,
}

/// What `report` ran.
pub struct ReportOutput {
    pub path: PathBuf,
    /// One per `--tcp-workers` count, in that order.
    pub tcp: Vec<TcpCompare>,
    pub metrics: std::result::Result<MetricsCost, String>,
    pub seed: std::result::Result<SeedOutcome, String>,
    pub udp: std::result::Result<UdpCompareResult, String>,
    pub quic: std::result::Result<QuicCompareResult, String>,
}

/// A part of the report that `report --sections` can re-run alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    /// The TCP compares, one section per worker count.
    Tcp,
    Udp,
    Quic,
}

impl Section {
    pub fn parse(s: &str) -> Option<Section> {
        match s {
            "tcp" => Some(Section::Tcp),
            "udp" => Some(Section::Udp),
            "quic" => Some(Section::Quic),
            _ => None,
        }
    }

    /// The section's heading, which is also how [`splice`] finds it again.
    /// For TCP, the heading a report had before one section per worker
    /// count; each count's own heading is [`tcp_heading`].
    pub fn heading(self) -> &'static str {
        match self {
            Section::Tcp => "## Front ends side by side (`lb-bench compare`)",
            Section::Udp => "## UDP front ends side by side (`lb-bench compare --proto udp`)",
            Section::Quic => "## QUIC handshakes (`lb-bench compare --proto quic`)",
        }
    }
}

/// The heading of the TCP compare at `workers` worker(s).
pub fn tcp_heading(workers: usize) -> String {
    let plural = if workers == 1 { "" } else { "s" };
    format!("{}, {workers} worker{plural}", Section::Tcp.heading())
}

/// Where a section goes when the report has none yet: before the first of
/// these headings that it has, else at the end.
const INSERT_BEFORE: [&str; 3] = [
    "## Cost of metrics",
    "## The seed experiment",
    "## Criterion benches of lb-core",
];

/// What `report --sections` ran: each section's result (or why it failed).
pub struct SectionsOutput {
    pub path: PathBuf,
    pub tcp: Option<Vec<TcpCompare>>,
    pub udp: Option<std::result::Result<UdpCompareResult, String>>,
    pub quic: Option<std::result::Result<QuicCompareResult, String>>,
}

/// Runs everything and writes the report to `output`: the TCP compare at
/// each of `tcp_workers`, the rest at `opts.workers`. `command` is the
/// command line to print as "produced by".
pub fn run(
    rt: &tokio::runtime::Runtime,
    opts: &CompareOptions,
    tcp_workers: &[usize],
    output: &Path,
    command: &str,
    quiet: bool,
) -> Result<ReportOutput> {
    let started = Instant::now();
    let date = utc_now();
    let tcp = run_tcp(rt, opts, tcp_workers, quiet)?;
    let metrics = metrics::measure(rt, opts, quiet).map_err(|e| e.to_string());
    if !quiet {
        eprintln!("report: the seed experiment");
    }
    let (seed, seed_text) = run_seed(rt, opts);
    let (udp, udp_stamp) = stamped(|| run_udp(opts, quiet));
    let (quic, quic_stamp) = stamped(|| run_quic(rt, opts, quiet));

    let mut o = String::new();
    intro(&mut o, opts, command, &date);
    commands(&mut o, command, tcp_workers);
    for c in &tcp {
        o.push_str(&tcp_section(c, output, command));
    }
    o.push_str(&udp_section(&udp, command, &udp_stamp));
    o.push_str(&quic_section(&quic, command, &quic_stamp));
    let _ = writeln!(o, "## Cost of metrics\n");
    match &metrics {
        Ok(m) => o.push_str(&metrics::markdown(m)),
        Err(e) => {
            let _ = writeln!(o, "Not measured: {e}\n");
        }
    }
    seed_section(&mut o, &seed, &seed_text);
    criterion_note(&mut o);
    let _ = writeln!(
        o,
        "Report run time: {:.0} s.",
        started.elapsed().as_secs_f64()
    );
    std::fs::write(output, &o).ctx(|| format!("write {}", output.display()))?;
    Ok(ReportOutput {
        path: output.to_path_buf(),
        tcp,
        metrics,
        seed,
        udp,
        quic,
    })
}

/// Runs only `sections` and puts each into the report at `output` (created
/// when missing) in place of its previous version; the rest stays as it was.
pub fn run_sections(
    rt: &tokio::runtime::Runtime,
    opts: &CompareOptions,
    tcp_workers: &[usize],
    output: &Path,
    command: &str,
    sections: &[Section],
    quiet: bool,
) -> Result<SectionsOutput> {
    let mut doc = std::fs::read_to_string(output).unwrap_or_default();
    let mut out = SectionsOutput {
        path: output.to_path_buf(),
        tcp: None,
        udp: None,
        quic: None,
    };
    for &section in sections {
        let text = match section {
            Section::Tcp => {
                let tcp = run_tcp(rt, opts, tcp_workers, quiet)?;
                let texts: Vec<(usize, String)> = tcp
                    .iter()
                    .map(|c| (c.workers, tcp_section(c, output, command)))
                    .collect();
                doc = splice_tcp(&doc, &texts);
                out.tcp = Some(tcp);
                continue;
            }
            Section::Udp => {
                let (udp, stamp) = stamped(|| run_udp(opts, quiet));
                let text = udp_section(&udp, command, &stamp);
                out.udp = Some(udp);
                text
            }
            Section::Quic => {
                let (quic, stamp) = stamped(|| run_quic(rt, opts, quiet));
                let text = quic_section(&quic, command, &stamp);
                out.quic = Some(quic);
                text
            }
        };
        doc = splice(&doc, section.heading(), &text);
    }
    let doc = mark_partly_rerun(&doc);
    std::fs::write(output, &doc).ctx(|| format!("write {}", output.display()))?;
    Ok(out)
}

/// The TCP compare at each worker count, each into its own folder
/// (`<out>/workers-N`), so one run's chart and JSON do not overwrite another's.
fn run_tcp(
    rt: &tokio::runtime::Runtime,
    opts: &CompareOptions,
    tcp_workers: &[usize],
    quiet: bool,
) -> Result<Vec<TcpCompare>> {
    tcp_workers
        .iter()
        .map(|&workers| {
            if !quiet {
                eprintln!("report: the TCP comparison at {workers} worker(s)");
            }
            let mut o = opts.clone();
            o.workers = workers;
            o.out_dir = opts.out_dir.join(format!("workers-{workers}"));
            let (result, stamp) = stamped(|| compare::run(rt, &o, quiet));
            Ok(TcpCompare {
                workers,
                result: result?,
                stamp,
            })
        })
        .collect()
}

/// `doc` with the TCP section of each (worker count, text) replaced, or
/// inserted before the UDP one (the report's order); a single TCP section
/// from before one per worker count is dropped, since these take its place.
fn splice_tcp(doc: &str, sections: &[(usize, String)]) -> String {
    let mut doc = splice(doc, Section::Tcp.heading(), "");
    let before = [Section::Udp.heading(), Section::Quic.heading()];
    let before: Vec<&str> = before.into_iter().chain(INSERT_BEFORE).collect();
    for (workers, text) in sections {
        doc = splice_before(&doc, &tcp_heading(*workers), text, &before);
    }
    doc
}

/// A TCP section: heading, provenance, compare.md and its chart.
fn tcp_section(c: &TcpCompare, output: &Path, command: &str) -> String {
    let mut o = format!(
        "{}\n\n{}",
        tcp_heading(c.workers),
        provenance(command, &c.stamp)
    );
    let _ = writeln!(o, "{}", c.result.markdown);
    if let Some(chart) = chart_relative_to(&c.result, output) {
        let _ = writeln!(
            o,
            "![compare chart, {} worker(s)]({})\n",
            c.workers,
            chart.display()
        );
    }
    o
}

fn run_udp(opts: &CompareOptions, quiet: bool) -> std::result::Result<UdpCompareResult, String> {
    if !quiet {
        eprintln!("report: the UDP comparison");
    }
    compare::udp::run(opts, quiet).map_err(|e| e.to_string())
}

fn run_quic(
    rt: &tokio::runtime::Runtime,
    opts: &CompareOptions,
    quiet: bool,
) -> std::result::Result<QuicCompareResult, String> {
    if !quiet {
        eprintln!("report: the QUIC handshakes");
    }
    compare::quic::run(rt, opts, quiet).map_err(|e| e.to_string())
}

/// How the section was produced: command, when its measurements started,
/// the machine and its load average when they ended. The machine is named
/// here too, since a section re-run with `--sections` may run on another
/// machine than the one the file's header describes.
fn provenance(command: &str, stamp: &Stamp) -> String {
    let machine = procs::machine();
    format!(
        "_Produced by `{command}` on {} ({}, kernel {}); load average at the end (1, 5, 15 min): {} on {} CPUs._\n\n",
        stamp.started,
        machine.cpu,
        machine.kernel,
        stamp.load_at_end,
        machine.nproc
    )
}

/// /proc/loadavg's first three fields.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(", "))
        .unwrap_or_else(|_| "unknown".into())
}

/// The UDP section: heading, provenance, compare-udp.md (or why it did not run).
fn udp_section(
    udp: &std::result::Result<UdpCompareResult, String>,
    command: &str,
    stamp: &Stamp,
) -> String {
    let mut o = format!(
        "{}\n\n{}",
        Section::Udp.heading(),
        provenance(command, stamp)
    );
    match udp {
        Ok(r) => o.push_str(&r.markdown),
        Err(e) => o.push_str(&format!("Not measured: {e}\n")),
    }
    o.push('\n');
    o
}

/// The QUIC section, as [`udp_section`].
fn quic_section(
    quic: &std::result::Result<QuicCompareResult, String>,
    command: &str,
    stamp: &Stamp,
) -> String {
    let mut o = format!(
        "{}\n\n{}",
        Section::Quic.heading(),
        provenance(command, stamp)
    );
    match quic {
        Ok(r) => o.push_str(&r.markdown),
        Err(e) => o.push_str(&format!("Not measured: {e}\n")),
    }
    o.push('\n');
    o
}

/// `doc` with the section under `heading` (from that line to the next `## `
/// heading or the end) replaced by `text`; when there is none, `text` goes
/// before the first of [`INSERT_BEFORE`] found, else at the end.
pub fn splice(doc: &str, heading: &str, text: &str) -> String {
    splice_before(doc, heading, text, &INSERT_BEFORE)
}

/// [`splice`], with a new section going before the first of `before` found.
fn splice_before(doc: &str, heading: &str, text: &str, before: &[&str]) -> String {
    let line_start = |h: &str| {
        doc.match_indices(h).map(|(i, _)| i).find(|&i| {
            (i == 0 || doc.as_bytes()[i - 1] == b'\n') && doc[i + h.len()..].starts_with('\n')
        })
    };
    let (start, end) = match line_start(heading) {
        Some(start) => {
            let body = start + heading.len();
            let end = doc[body..]
                .find("\n## ")
                .map_or(doc.len(), |i| body + i + 1);
            (start, end)
        }
        None => {
            let at = before
                .iter()
                .find_map(|h| line_start(h))
                .unwrap_or(doc.len());
            (at, at)
        }
    };
    let mut out = String::with_capacity(doc.len() + text.len() + 1);
    out.push_str(&doc[..start]);
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(text);
    out.push_str(&doc[end..]);
    out
}

/// The seed experiment against a demo lb-proxy: its outcome and its text output.
fn run_seed(
    rt: &tokio::runtime::Runtime,
    opts: &CompareOptions,
) -> (std::result::Result<SeedOutcome, String>, String) {
    let mut text = Vec::new();
    let seed_opts = SeedOptions {
        lb_proxy: opts.lb_proxy.clone(),
        ..SeedOptions::default()
    };
    let seed = experiment::run_seed(rt, &seed_opts, &mut text).map_err(|e| e.to_string());
    (seed, String::from_utf8_lossy(&text).into_owned())
}

/// The chart's path relative to the report's folder (absolute when outside it).
fn chart_relative_to(compare: &CompareResult, output: &Path) -> Option<PathBuf> {
    let base = output.parent().unwrap_or(Path::new("."));
    compare.chart_path.as_ref().map(|c| {
        let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let (c_abs, b_abs) = (abs(c), abs(base));
        c_abs
            .strip_prefix(&b_abs)
            .map(Path::to_path_buf)
            .unwrap_or(c_abs)
    })
}

/// `--tcp-workers` when not given: one TCP section with 1 worker, one with 2.
pub const DEFAULT_TCP_WORKERS: [usize; 2] = [1, 2];

/// The warning for `report --workers N` when the TCP sections run at the
/// `--tcp-workers` counts instead (it was not given), so N would otherwise
/// be silently left out of them.
pub fn ignored_workers(
    workers: Option<usize>,
    tcp_workers_given: bool,
    runs_tcp: bool,
) -> Option<String> {
    let n = workers.filter(|_| runs_tcp && !tcp_workers_given)?;
    let counts: Vec<String> = DEFAULT_TCP_WORKERS
        .iter()
        .map(ToString::to_string)
        .collect();
    Some(format!(
        "report: --workers {n} applies to the UDP and QUIC parts only; the TCP sections run at --tcp-workers ({}, the default): pass --tcp-workers {n} for that count",
        counts.join(",")
    ))
}

/// What the intro of a whole run promises, and what it says instead once a
/// section has been re-run on its own (each section's first line names its
/// own command, date and machine).
const WHOLE_RUN: &str = "every figure below comes from that run.";
const PARTLY_RERUN: &str =
    "sections re-run since with `--sections` name their own command, date and machine in their first line.";

/// `doc` with the intro no longer claiming every figure for the whole run.
fn mark_partly_rerun(doc: &str) -> String {
    doc.replacen(WHOLE_RUN, PARTLY_RERUN, 1)
}

/// The title, how the report was produced, and the machine.
fn intro(o: &mut String, opts: &CompareOptions, command: &str, date: &str) {
    let machine = procs::machine();
    let lb_bin = procs::lb_proxy_bin(opts.lb_proxy.as_deref())
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| e.to_string());
    let _ = writeln!(o, "# Benchmarks\n");
    let _ = writeln!(
        o,
        "Produced by one command, `{command}`, on {date}{}. Re-run it on a quiet machine to refresh this file; \
         {WHOLE_RUN}\n",
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
}

/// How to reproduce the report. The load commands are in each TCP section,
/// so that this stays true when `--sections` re-runs one.
fn commands(o: &mut String, command: &str, tcp_workers: &[usize]) {
    let _ = writeln!(o, "\n## Commands\n\n```sh");
    let _ = writeln!(o, "cargo build --release -p lb-proxy -p lb-bench");
    let _ = writeln!(o, "{command}");
    let _ = writeln!(o, "```\n");
    let counts: Vec<String> = tcp_workers.iter().map(ToString::to_string).collect();
    let _ = writeln!(
        o,
        "The TCP comparison (`lb-bench compare`) ran once per worker count ({}; `--tcp-workers`), \
         each section listing the load commands it ran against each front end in turn. \
         `lb-bench report --sections tcp,udp,quic` re-runs only the sections named and puts them \
         in place of their previous versions; each section's first line says which command \
         produced it and when.\n",
        counts.join(", ")
    );
}

/// Each step's verdict, and the experiment's full output folded away.
fn seed_section(o: &mut String, seed: &std::result::Result<SeedOutcome, String>, text: &str) {
    let _ = writeln!(o, "## The seed experiment (`lb-bench experiment seed`)\n");
    match seed {
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
                "\n<details><summary>full output</summary>\n\n```\n{text}```\n\n</details>\n"
            );
        }
        Err(e) => {
            let _ = writeln!(o, "Could not run: {e}\n");
        }
    }
}

/// Where the criterion benches are, since the report does not run them.
fn criterion_note(o: &mut String) {
    let _ = writeln!(o, "## Criterion benches of lb-core\n");
    let _ = writeln!(
        o,
        "Not part of this command (they need no balancer and take minutes): \
         `cargo bench -p lb-bench --bench core -- --warm-up-time 1 --measurement-time 3` \
         (lookup, table build, snapshot swap under readers, the UDP flow table, a TCP \
         flow's decisions).\n"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const UDP: &str = "## UDP front ends side by side (`lb-bench compare --proto udp`)";

    #[test]
    fn workers_without_tcp_workers_warns_only_when_tcp_runs() {
        let w = ignored_workers(Some(4), false, true).expect("a warning");
        assert!(
            w.contains("--workers 4") && w.contains("--tcp-workers (1,2"),
            "{w}"
        );
        assert_eq!(
            ignored_workers(Some(4), true, true),
            None,
            "--tcp-workers given"
        );
        assert_eq!(ignored_workers(None, false, true), None, "no --workers");
        assert_eq!(
            ignored_workers(Some(4), false, false),
            None,
            "no TCP section"
        );
    }

    #[test]
    fn a_section_replaces_its_previous_version_and_nothing_else() {
        let doc =
            format!("# B\n\n## Front ends\n\ntcp\n\n{UDP}\n\nold udp\n\n## Cost of metrics\n\nm\n");
        let new = splice(&doc, UDP, &format!("{UDP}\n\nnew udp\n\n"));
        assert_eq!(
            new,
            format!("# B\n\n## Front ends\n\ntcp\n\n{UDP}\n\nnew udp\n\n## Cost of metrics\n\nm\n")
        );
        // Replacing again gives the same document: nothing accumulates.
        assert_eq!(splice(&new, UDP, &format!("{UDP}\n\nnew udp\n\n")), new);
    }

    #[test]
    fn a_new_section_goes_before_the_cost_of_metrics_or_at_the_end() {
        let doc = "# B\n\n## Front ends\n\ntcp\n\n## Cost of metrics\n\nm\n";
        let new = splice(doc, UDP, &format!("{UDP}\n\nu\n\n"));
        assert_eq!(
            new,
            format!("# B\n\n## Front ends\n\ntcp\n\n{UDP}\n\nu\n\n## Cost of metrics\n\nm\n")
        );
        let last = splice("# B\n\ntext", UDP, &format!("{UDP}\n\nu\n"));
        assert_eq!(last, format!("# B\n\ntext\n{UDP}\n\nu\n"));
        assert_eq!(splice("", UDP, "x\n"), "x\n");
    }

    #[test]
    fn the_last_section_runs_to_the_end() {
        let doc = format!("# B\n\n{UDP}\n\nold\nmore old\n");
        assert_eq!(
            splice(&doc, UDP, &format!("{UDP}\n\nnew\n")),
            format!("# B\n\n{UDP}\n\nnew\n")
        );
    }

    #[test]
    fn tcp_sections_replace_the_single_old_one_and_then_themselves() {
        let old = format!(
            "# B\n\n## Commands\n\nc\n\n{}\n\nold tcp\n\n{UDP}\n\nu\n",
            Section::Tcp.heading()
        );
        let (h1, h2) = (tcp_heading(1), tcp_heading(2));
        assert_eq!(
            h1,
            "## Front ends side by side (`lb-bench compare`), 1 worker"
        );
        assert_eq!(
            h2,
            "## Front ends side by side (`lb-bench compare`), 2 workers"
        );
        let texts = |tag: &str| {
            vec![
                (1, format!("{h1}\n\n{tag} one\n\n")),
                (2, format!("{h2}\n\n{tag} two\n\n")),
            ]
        };
        let new = splice_tcp(&old, &texts("new"));
        let want = format!(
            "# B\n\n## Commands\n\nc\n\n{h1}\n\nnew one\n\n{h2}\n\nnew two\n\n{UDP}\n\nu\n"
        );
        assert_eq!(new, want);
        // Again: each count's section in place, nothing accumulates.
        let again = splice_tcp(&new, &texts("newer"));
        assert_eq!(again, want.replace("new ", "newer "));
        // One count alone leaves the other as it was.
        let only_two = splice_tcp(&new, &[(2, format!("{h2}\n\nfresh two\n\n"))]);
        assert_eq!(only_two, want.replace("new two", "fresh two"));
    }

    #[test]
    fn a_new_tcp_section_goes_before_udp_and_quic() {
        let doc = "# B\n\n## Cost of metrics\n\nm\n";
        let h1 = tcp_heading(1);
        let new = splice_tcp(doc, &[(1, format!("{h1}\n\nt\n\n"))]);
        assert_eq!(
            new,
            format!("# B\n\n{h1}\n\nt\n\n## Cost of metrics\n\nm\n")
        );
        let quic = Section::Quic.heading();
        let doc = format!("# B\n\n{quic}\n\nq\n");
        let new = splice_tcp(&doc, &[(1, format!("{h1}\n\nt\n\n"))]);
        assert_eq!(new, format!("# B\n\n{h1}\n\nt\n\n{quic}\n\nq\n"));
    }

    #[test]
    fn a_section_run_alone_takes_back_the_intros_whole_run_claim() {
        let doc =
            format!("# B\n\nProduced by one command, `c`, on d. Re-run it; {WHOLE_RUN}\n\n## M\n");
        let marked = mark_partly_rerun(&doc);
        assert!(!marked.contains(WHOLE_RUN), "{marked}");
        assert_eq!(marked, doc.replace(WHOLE_RUN, PARTLY_RERUN));
        assert_eq!(
            mark_partly_rerun(&marked),
            marked,
            "a second partial run changes nothing more"
        );
    }

    #[test]
    fn the_sections_option_names_tcp_udp_and_quic() {
        assert_eq!(Section::parse("tcp"), Some(Section::Tcp));
        assert_eq!(Section::parse("udp"), Some(Section::Udp));
        assert_eq!(Section::parse("quic"), Some(Section::Quic));
        assert_eq!(Section::parse("seed"), None);
    }

    #[test]
    fn a_sections_first_line_names_the_machine_it_ran_on() {
        let machine = procs::machine();
        let stamp = Stamp {
            started: "2026-01-01 00:00 UTC".into(),
            load_at_end: "0.50, 0.40, 0.30".into(),
        };
        let line = provenance("lb-bench report --sections tcp", &stamp);
        assert!(
            line.contains("on 2026-01-01 00:00 UTC ("),
            "the section's own start, not the report's: {line}"
        );
        assert!(
            line.contains("load average at the end (1, 5, 15 min): 0.50, 0.40, 0.30 on"),
            "the section's own load, as captured when it ended: {line}"
        );
        assert!(line.contains(&machine.cpu), "{line}");
        assert!(
            line.contains(&format!("kernel {}", machine.kernel)),
            "{line}"
        );
        assert!(
            line.contains(&format!("on {} CPUs", machine.nproc)),
            "{line}"
        );
    }

    #[test]
    fn a_stamp_is_taken_around_its_own_measurement() {
        // One event log: the clock, the measurement and the load reading each
        // note when they ran.
        let log = std::cell::RefCell::new(Vec::new());
        let (out, stamp) = stamped_with(
            || {
                log.borrow_mut().push("clock");
                "start".to_string()
            },
            || {
                log.borrow_mut().push("load");
                "1.00, 2.00, 3.00".to_string()
            },
            || {
                log.borrow_mut().push("measure");
                42
            },
        );
        assert_eq!(out, 42);
        assert_eq!(*log.borrow(), ["clock", "measure", "load"]);
        assert_eq!(stamp.started, "start");
        assert_eq!(stamp.load_at_end, "1.00, 2.00, 3.00");
    }

    #[test]
    fn dates_are_civil() {
        let d = utc_now();
        assert_eq!(d.len(), "2026-01-01 00:00 UTC".len(), "{d}");
        assert!(d.starts_with("20"), "{d}");
    }
}
