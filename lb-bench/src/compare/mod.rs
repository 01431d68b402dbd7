//! `lb-bench compare`: the same backends behind several front ends, measured
//! in one run, interleaved over rounds in a different order each round (a
//! stride through the list that changes per round, reversed between batches;
//! `running::turn_order`), so a busy machine slows them all alike and no
//! front end always runs right after the same other one.
//!
//! Front ends: direct to one backend; lb-proxy (default `auto` copy, userspace, splice and sockmap);
//! HAProxy in `mode tcp` with `balance hash src_port` + `hash-type consistent`
//! (every client is 127.0.0.1, so that is the 5-tuple hash); nginx stream with
//! `hash $remote_addr$remote_port consistent`. One that is not installed is
//! reported as missing.
//!
//! Metrics, each from the tools that produced it: keep-alive req/s and
//! new connections/s with p50/p99 (lb-bench's own generator, hey and wrk when
//! installed), bulk Gbit/s with 1 and 4 streams (iperf3, else a built-in
//! sink), RSS per idle connection (RssAnon of the proxy before and after
//! opening N idle connections through it), and CPU time per request and per
//! connection twice: the proxy's own (utime + stime from /proc/PID/stat) and
//! the whole machine's (/proc/stat), which also counts kernel threads that
//! work for an engine such as sockmap without being charged to the proxy.
//!
//! The parts, each depending only on those listed before it:
//! [`results`] (what is measured and produced), [`options`] (what is asked,
//! the programs found), [`launch`] (starting a configured server),
//! [`backends`] (the shared backends, `lb-bench serve`), [`peers`] (each
//! front end's config and start), [`sampling`] (CPU and memory read from a
//! proxy), [`running`] (the rounds), [`rounds`] (each round's ratios and
//! their spread), [`render`] (table and Markdown) and [`chart`] (the SVG);
//! this file runs them in order.

pub mod backends;
pub mod chart;
pub mod launch;
pub mod options;
pub mod peers;
pub mod pool;
pub mod quic;
pub mod render;
pub mod results;
pub mod rounds;
pub mod running;
pub mod sampling;
pub mod udp;

use std::path::Path;
use std::time::Instant;

pub use options::CompareOptions;
pub use results::{fmt_num, CompareResult, Frontend, FrontendStatus, Row, Sample};

pub(crate) use backends::start_backends;

use crate::error::{IoContext, Result};
use crate::procs;
use crate::signals::WorkDir;
use options::{log, Programs};
use running::{Measured, Rounds};

/// Runs the comparison; `quiet` silences progress lines on stderr.
pub fn run(
    rt: &tokio::runtime::Runtime,
    opts: &CompareOptions,
    quiet: bool,
) -> Result<CompareResult> {
    let started = Instant::now();
    let (_, nofile) = procs::raise_nofile_limit();
    std::fs::create_dir_all(&opts.out_dir).ctx(|| format!("create {}", opts.out_dir.display()))?;
    let work = WorkDir::new("lb-bench-compare.")?;
    let dir = work.path();
    let programs = Programs::find(opts);

    log(
        quiet,
        &format!("compare: starting backends in {}", dir.display()),
    );
    let backends = backends::start_or_builtin(
        opts,
        dir,
        programs.nginx.as_deref(),
        programs.iperf3.as_deref(),
        nofile,
        quiet,
    )?;
    let (mut statuses, mut running) =
        peers::start_all(opts, &backends, dir, &programs, nofile, quiet);
    running::warm_up(rt, &mut running, &mut statuses, quiet);

    let rounds = Rounds {
        rt,
        opts,
        dir,
        programs: &programs,
    };
    let Measured {
        mut samples,
        mut problems,
    } = rounds.run(&running, quiet);
    let idle = sampling::idle_count(opts, nofile);
    sampling::idle_memory_all(opts, &running, idle, quiet, &mut samples, &mut problems);
    drop(running);

    let http_tools: Vec<&str> = programs.http_tools().iter().map(|t| t.0).collect();
    let rows = render::table_rows(
        &samples,
        &opts.frontends,
        &http_tools,
        programs.bulk_tool(),
        idle,
    );
    let mut result = CompareResult {
        frontends: statuses,
        tools: programs.load_tools(),
        backends: backends.description.clone(),
        accuracy: render::accuracy_line(&samples),
        samples,
        rows,
        idle_connections: idle,
        commands: running::commands(opts, &programs),
        markdown: String::new(),
        markdown_path: opts.out_dir.join("compare.md"),
        chart_path: None,
        elapsed_secs: 0.0,
    };
    drop(backends);
    draw_chart(&mut result, &opts.out_dir, &mut problems);
    result.elapsed_secs = started.elapsed().as_secs_f64();
    result.markdown = render::markdown(&result, opts, &problems);
    write_outputs(&result, &opts.out_dir)?;
    Ok(result)
}

/// compare.svg beside the Markdown. The measurements are worth more than the
/// chart: a plotting error or panic becomes a problem line, not a lost run.
fn draw_chart(result: &mut CompareResult, out_dir: &Path, problems: &mut Vec<String>) {
    let chart_path = out_dir.join("compare.svg");
    let drawn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        chart::write_compare_chart(result, &chart_path)
    }));
    match drawn {
        Ok(Ok(())) => result.chart_path = Some(chart_path),
        Ok(Err(e)) => problems.push(format!("chart: {e}")),
        Err(_) => problems.push("chart: plotting panicked".into()),
    }
}

/// compare.md and compare.json.
fn write_outputs(result: &CompareResult, out_dir: &Path) -> Result<()> {
    std::fs::write(&result.markdown_path, &result.markdown)
        .ctx(|| format!("write {}", result.markdown_path.display()))?;
    let json_path = out_dir.join("compare.json");
    let json = serde_json::to_string_pretty(result).unwrap_or_default();
    std::fs::write(&json_path, json).ctx(|| format!("write {}", json_path.display()))
}
