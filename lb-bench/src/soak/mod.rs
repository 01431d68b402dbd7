//! `lb-bench soak`: lb-proxy under a long mixed load (keep-alive requests,
//! new connections, bulk transfers, idle connections), reloaded every
//! `reload_every` while one backend flaps, its resident memory, open fds and
//! active-connection gauges sampled every `sample_every`. A script for a
//! person, not CI: ten minutes by default.
//!
//! It runs the mix twice: a warm-up (so that lazily made buffers, pipes and
//! allocator arenas exist), then the soak. After each it stops the load and
//! takes a quiesced sample once no connection is active. The verdict compares
//! those two quiesced samples: fds back to the start, nothing active, RSS
//! growth under a bound, no failure that the flapping does not explain, and
//! every part of the load ran; the exit code is non-zero on FAIL.
//!
//! The parts, each depending only on those listed before it: `schedule`
//! (timed waits and polls), [`sample`] (what is read from lb-proxy),
//! [`timeline`] (what happened, and which failures the flaps explain),
//! [`verdict`] (the checks and the table), `rig` (backends and lb-proxy,
//! reload, kill and restart), `mix` (the load), `chaos` (reloads and flaps on
//! their threads), [`markdown`] (BENCHMARKS.md's Soak section); this file
//! runs the phases.

mod chaos;
pub mod markdown;
mod mix;
mod rig;
pub mod sample;
mod schedule;
pub mod timeline;
pub mod verdict;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Error, IoContext, Result};
use crate::procs;
use mix::{Aim, Live};
use rig::{Rig, FLAPPED};
use sample::Sample;
use timeline::Tally;
use verdict::{Bounds, Check, Expected, BOUNDS};

/// What `lb-bench soak` is asked to do.
#[derive(Clone, Debug)]
pub struct SoakOptions {
    /// The lb-proxy binary (default: next to this executable).
    pub lb_proxy: Option<PathBuf>,
    /// The soak proper, after the warm-up.
    pub duration: Duration,
    pub warmup: Duration,
    pub reload_every: Duration,
    pub flap_every: Duration,
    pub sample_every: Duration,
    /// Where `soak-samples.csv` and `soak.json` go.
    pub out: PathBuf,
    /// A Markdown file (BENCHMARKS.md) whose Soak section the result replaces.
    pub benchmarks: Option<PathBuf>,
    /// The command line, quoted in that section.
    pub command: String,
}

impl SoakOptions {
    fn validate(&self) -> Result<()> {
        for (what, d) in [
            ("--duration", self.duration),
            ("--warmup", self.warmup),
            ("--reload-every", self.reload_every),
            ("--flap-every", self.flap_every),
            ("--sample-every", self.sample_every),
        ] {
            if d.is_zero() {
                return Err(Error::BadArgument(format!("{what} must be above 0")));
            }
        }
        Ok(())
    }
}

/// What a soak found (also written as `soak.json`).
#[derive(Clone, Debug, Serialize)]
pub struct SoakReport {
    pub lb_proxy: String,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub reload_every_s: f64,
    pub flap_every_s: f64,
    pub sample_every_s: f64,
    /// The load, in words.
    pub mix: String,
    /// The reloads and the flaps, in words.
    pub disturbances: String,
    pub samples: Vec<Sample>,
    /// The quiesced sample after the warm-up.
    pub start: Sample,
    /// The quiesced sample after the soak.
    pub end: Sample,
    pub tally: Tally,
    pub bounds: Bounds,
    pub checks: Vec<Check>,
    pub passed: bool,
}

/// Runs the soak, printing samples as they come and the verdict at the end
/// to `out`; writes the CSV and JSON into `opts.out`.
pub fn run(opts: &SoakOptions, out: &mut dyn Write) -> Result<SoakReport> {
    opts.validate()?;
    let bin = procs::lb_proxy_bin(opts.lb_proxy.as_deref())?;
    procs::raise_nofile_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .ctx(|| "start the tokio runtime".into())?;
    let rig = Rig::start(&bin)?;
    introduce(opts, &bin, &rig, out)?;
    let mut soak = Soak {
        opts,
        rig: &rig,
        rt: &rt,
        live: Live::default(),
        epoch: Instant::now(),
        samples: Vec::new(),
    };
    let start = soak.phase("warm-up", opts.warmup, out)?;
    let end = soak.phase("soak", opts.duration, out)?;
    let tally = soak
        .live
        .timeline
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .tally(FLAPPED);
    let expected = Expected {
        reloads: opts.reload_every < opts.duration,
        flaps: opts.flap_every < opts.duration,
    };
    let checks = verdict::verdict(&start, &end, &tally, expected, &BOUNDS);
    let text = verdict::render(&start, &end, &checks);
    write!(out, "\n{text}").ctx(|| "write the verdict".into())?;
    let report = SoakReport {
        lb_proxy: bin.display().to_string(),
        duration_s: opts.duration.as_secs_f64(),
        warmup_s: opts.warmup.as_secs_f64(),
        reload_every_s: opts.reload_every.as_secs_f64(),
        flap_every_s: opts.flap_every.as_secs_f64(),
        sample_every_s: opts.sample_every.as_secs_f64(),
        mix: mix::describe(),
        disturbances: rig::describe(opts.reload_every, opts.flap_every),
        passed: verdict::passed(&checks),
        samples: soak.samples,
        start,
        end,
        tally,
        bounds: BOUNDS,
        checks,
    };
    save(&report, &opts.out, out)?;
    if let Some(path) = &opts.benchmarks {
        let text = markdown::section(&report, &opts.command, &crate::report::utc_now());
        markdown::write_into(path, &text)?;
        writeln!(out, "wrote the Soak section of {}", path.display())
            .ctx(|| "write the file name".into())?;
    }
    Ok(report)
}

/// What runs where, and the header of the sample lines.
fn introduce(opts: &SoakOptions, bin: &Path, rig: &Rig, out: &mut dyn Write) -> Result<()> {
    let debug = if procs::is_debug_build(bin) {
        " (a debug build)"
    } else {
        ""
    };
    writeln!(
        out,
        "soak: lb-proxy {}{debug}, pid {}; web {}, bulk {}; work dir {}\n\
         {} s warm-up, then {} s; a reload every {} s, {FLAPPED} killed every {} s; a sample every {} s\n\n{}",
        bin.display(),
        rig.probe.pid,
        rig.web,
        rig.bulk,
        rig.dir.path().display(),
        opts.warmup.as_secs_f64(),
        opts.duration.as_secs_f64(),
        opts.reload_every.as_secs_f64(),
        opts.flap_every.as_secs_f64(),
        opts.sample_every.as_secs_f64(),
        sample::LINE_HEADER
    )
    .ctx(|| "write the introduction".into())
}

/// One soak in progress.
struct Soak<'a> {
    opts: &'a SoakOptions,
    rig: &'a Rig,
    rt: &'a tokio::runtime::Runtime,
    live: Live,
    epoch: Instant,
    samples: Vec<Sample>,
}

impl Soak<'_> {
    /// Runs the mix, the reloads and the flaps for `length`, sampling as it
    /// goes; returns the quiesced sample taken once the load has stopped.
    fn phase(&mut self, name: &str, length: Duration, out: &mut dyn Write) -> Result<Sample> {
        let aim = Aim {
            web: self.rig.web,
            bulk: self.rig.bulk,
            epoch: self.epoch,
            until: Instant::now() + length,
        };
        let (rig, live, rt, opts) = (self.rig, &self.live, self.rt, self.opts);
        let mut taken = Vec::new();
        std::thread::scope(|s| {
            s.spawn(|| chaos::reloader(rig, opts.reload_every, aim, live));
            s.spawn(|| chaos::flapper(rig, opts.flap_every, aim, live));
            s.spawn(|| rt.block_on(mix::run(aim, live)));
            self.sample_until(name, aim, &mut taken, out);
        });
        self.samples.extend(taken);
        let quiesced = self
            .rig
            .probe
            .quiesced(|| self.epoch.elapsed(), self.live.counts())?;
        self.show(&quiesced, out);
        self.samples.push(quiesced.clone());
        Ok(quiesced)
    }

    /// A sample every `sample_every` until the phase ends.
    fn sample_until(&self, name: &str, aim: Aim, taken: &mut Vec<Sample>, out: &mut dyn Write) {
        let mut next = Instant::now();
        loop {
            next += self.opts.sample_every;
            if !schedule::sleep_until(next, aim.until) {
                return;
            }
            let at = self.epoch.elapsed();
            match self.rig.probe.take(at, name, self.live.counts()) {
                Ok(s) => {
                    self.show(&s, out);
                    taken.push(s);
                }
                Err(e) => self
                    .live
                    .record(|t| t.problems.push((at, format!("sample: {e}")))),
            }
        }
    }

    fn show(&self, s: &Sample, out: &mut dyn Write) {
        let _ = writeln!(out, "{}", sample::line(s));
        let _ = out.flush();
    }
}

/// Writes `soak-samples.csv` and `soak.json` into `dir`.
fn save(report: &SoakReport, dir: &Path, out: &mut dyn Write) -> Result<()> {
    std::fs::create_dir_all(dir).ctx(|| format!("create {}", dir.display()))?;
    let csv = dir.join("soak-samples.csv");
    std::fs::write(&csv, sample::csv(&report.samples))
        .ctx(|| format!("write {}", csv.display()))?;
    let json = dir.join("soak.json");
    let text = serde_json::to_string_pretty(report).map_err(|e| Error::Protocol {
        what: "the soak report".into(),
        detail: e.to_string(),
    })?;
    std::fs::write(&json, text).ctx(|| format!("write {}", json.display()))?;
    writeln!(out, "wrote {} and {}", csv.display(), json.display())
        .ctx(|| "write the file names".into())
}
