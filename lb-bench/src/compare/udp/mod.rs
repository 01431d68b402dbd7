//! `lb-bench compare --proto udp`: datagrams/s, loss, round-trip time and
//! the proxy's CPU per datagram through direct, lb-proxy (its default
//! `udp_batch`, and `udp_batch = 1`) and nginx's stream module in UDP mode,
//! in front of the same three UDP echo backends, interleaved in one run:
//! per round, per datagram size, every front end in turn.
//!
//! The load is [`crate::load::udp`]: closed-loop echo flows, each on its own
//! client address and port. The proxy's CPU time (utime + stime from /proc,
//! nginx's master and workers summed) is divided by the datagrams echoed:
//! each echoed datagram crossed the proxy once each way, so the figure is
//! per round trip, i.e. per datagram forwarded in each direction.
//!
//! The parts: [`peers`] (backends and front ends), [`render`] (the medians
//! table, the generator check, the bar and the Markdown); this file runs
//! the rounds.

pub mod peers;
pub mod render;

use std::time::{Duration, Instant};

use serde::Serialize;

use super::options::{log, CompareOptions, Programs};
use crate::error::{IoContext, Result};
use crate::load::udp::{self as gen, UdpLoadReport, UdpLoadSpec};
use crate::procs;
use crate::signals::WorkDir;
use peers::{UdpRunning, UdpStatus};

/// The UDP front ends, in the order they are measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum UdpFrontend {
    Direct,
    LbProxy,
    LbProxyUnbatched,
    Nginx,
}

impl UdpFrontend {
    pub const ALL: [UdpFrontend; 4] = [
        UdpFrontend::Direct,
        UdpFrontend::LbProxy,
        UdpFrontend::LbProxyUnbatched,
        UdpFrontend::Nginx,
    ];

    pub fn label(self) -> &'static str {
        match self {
            UdpFrontend::Direct => "direct",
            UdpFrontend::LbProxy => "lb-proxy",
            UdpFrontend::LbProxyUnbatched => "lb-proxy, udp_batch = 1",
            UdpFrontend::Nginx => "nginx stream udp",
        }
    }
}

/// One measurement: a front end at one datagram size in one round.
#[derive(Clone, Debug, Serialize)]
pub struct UdpSample {
    pub round: usize,
    pub frontend: UdpFrontend,
    pub size: usize,
    pub load: UdpLoadReport,
    /// Proxy CPU µs per echoed datagram (one forwarded each way); `None` for direct.
    pub cpu_us: Option<f64>,
}

/// Everything `compare --proto udp` produced.
#[derive(Clone, Debug, Serialize)]
pub struct UdpCompareResult {
    pub frontends: Vec<UdpStatus>,
    pub backends: String,
    pub samples: Vec<UdpSample>,
    pub rows: Vec<render::UdpRow>,
    pub generator_check: Vec<String>,
    pub bar: Vec<String>,
    /// lb-proxy's own datagram counts against the generator's, per variant.
    pub proxy_counts: Vec<ProxyCounts>,
    pub load: String,
    pub problems: Vec<String>,
    pub markdown: String,
    pub markdown_path: std::path::PathBuf,
    pub elapsed_secs: f64,
}

/// Bytes per datagram of the warm-up.
const WARM_UP_SIZE: usize = 64;

/// How long late echoes are awaited after each measurement.
fn grace(opts: &CompareOptions) -> Duration {
    if opts.quick {
        Duration::from_millis(200)
    } else {
        gen::DEFAULT_GRACE
    }
}

/// The load of one measurement against `r` at `size` bytes.
fn spec(opts: &CompareOptions, r: &UdpRunning, size: usize) -> UdpLoadSpec {
    UdpLoadSpec {
        flows: opts.udp.flows,
        size,
        window: opts.udp.window,
        duration: opts.duration,
        grace: grace(opts),
        threads: opts.udp.threads,
        ..UdpLoadSpec::new(r.addr)
    }
}

/// Runs the comparison; `quiet` silences progress lines on stderr.
pub fn run(opts: &CompareOptions, quiet: bool) -> Result<UdpCompareResult> {
    let started = Instant::now();
    let (_, nofile) = procs::raise_nofile_limit();
    std::fs::create_dir_all(&opts.out_dir).ctx(|| format!("create {}", opts.out_dir.display()))?;
    let work = WorkDir::new("lb-bench-compare-udp.")?;
    let dir = work.path();
    let programs = Programs::find(opts);
    log(
        quiet,
        &format!("compare udp: starting backends in {}", dir.display()),
    );
    let backends = peers::start_backends(dir)?;
    let (mut statuses, mut running) =
        peers::start_all(opts, &backends, dir, &programs, nofile, quiet);
    let mut problems = Vec::new();
    let mut totals = Totals::default();
    warm_up(opts, &mut running, &mut statuses, &mut totals, quiet);
    let samples = rounds(opts, &running, &mut totals, &mut problems, quiet);
    let proxy_counts = proxy_counts(&running, &totals);
    drop(running);
    let rows = render::rows(&samples, &opts.udp.sizes);
    let mut result = UdpCompareResult {
        generator_check: render::generator_check(&samples, &opts.udp.sizes),
        bar: render::bar(&samples, &opts.udp.sizes, &statuses),
        proxy_counts,
        frontends: statuses,
        backends: backends.description.clone(),
        samples,
        rows,
        load: render::load_line(opts, grace(opts)),
        problems,
        markdown: String::new(),
        markdown_path: opts.out_dir.join("compare-udp.md"),
        elapsed_secs: 0.0,
    };
    drop(backends);
    result.elapsed_secs = started.elapsed().as_secs_f64();
    result.markdown = render::markdown(&result, opts);
    write_outputs(&result, opts)?;
    Ok(result)
}

/// A short run through each front end: one that echoes nothing, or
/// corrupts a datagram, is marked failed and left out of the rounds.
fn warm_up(
    opts: &CompareOptions,
    running: &mut Vec<UdpRunning>,
    statuses: &mut [UdpStatus],
    totals: &mut Totals,
    quiet: bool,
) {
    running.retain(|r| {
        let mut s = spec(opts, r, WARM_UP_SIZE);
        s.duration = Duration::from_millis(200);
        let problem = match gen::run(&s) {
            Ok(rep) if rep.echoed > 0 && rep.corrupt == 0 => {
                totals.add(r.frontend, &rep);
                return true;
            }
            Ok(rep) => format!(
                "warm-up: {} of {} datagrams echoed, {} corrupt",
                rep.echoed, rep.sent, rep.corrupt
            ),
            Err(e) => format!("warm-up: {e}"),
        };
        log(
            quiet,
            &format!("compare udp: {}: {problem}", r.frontend.label()),
        );
        if let Some(st) = statuses.iter_mut().find(|st| st.frontend == r.frontend) {
            st.status = "failed";
            st.detail = problem;
        }
        false
    });
}

/// Every round: each size, each front end in turn.
fn rounds(
    opts: &CompareOptions,
    running: &[UdpRunning],
    totals: &mut Totals,
    problems: &mut Vec<String>,
    quiet: bool,
) -> Vec<UdpSample> {
    let mut samples = Vec::new();
    for round in 1..=opts.rounds {
        log(
            quiet,
            &format!("compare udp: round {round}/{}", opts.rounds),
        );
        for &size in &opts.udp.sizes {
            for r in running {
                let before = r.cpu();
                match gen::run(&spec(opts, r, size)) {
                    Ok(load) => {
                        totals.add(r.frontend, &load);
                        let cpu_us = super::sampling::cpu_us_per(before, r.cpu(), load.echoed);
                        samples.push(UdpSample {
                            round,
                            frontend: r.frontend,
                            size,
                            load,
                            cpu_us,
                        });
                    }
                    Err(e) => problems.push(format!(
                        "round {round}, {}, {size} B: {e}",
                        r.frontend.label()
                    )),
                }
            }
        }
    }
    samples
}

/// What the generator sent and got back through each front end, warm-up included.
#[derive(Default)]
struct Totals(Vec<(UdpFrontend, u64, u64)>);

impl Totals {
    fn add(&mut self, fe: UdpFrontend, load: &UdpLoadReport) {
        match self.0.iter_mut().find(|t| t.0 == fe) {
            Some(t) => {
                t.1 += load.sent;
                t.2 += load.echoed;
            }
            None => self.0.push((fe, load.sent, load.echoed)),
        }
    }

    fn get(&self, fe: UdpFrontend) -> (u64, u64) {
        self.0
            .iter()
            .find(|t| t.0 == fe)
            .map_or((0, 0), |t| (t.1, t.2))
    }
}

/// An lb-proxy's own datagram counts over the whole run, beside the
/// generator's: the basis of the CPU figure, checked by the proxy itself.
#[derive(Clone, Debug, Serialize)]
pub struct ProxyCounts {
    pub frontend: UdpFrontend,
    pub generator_sent: u64,
    pub generator_echoed: u64,
    /// `lb_frontend_received_datagrams_total`, `lb_backend_sent_datagrams_total`,
    /// `lb_backend_received_datagrams_total`, `lb_udp_dropped_datagrams_total`
    /// (all reasons); `Err` when /metrics could not be read.
    pub proxy: std::result::Result<[u64; 4], String>,
}

impl std::fmt::Display for ProxyCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (sent, echoed) = (self.generator_sent, self.generator_echoed);
        write!(f, "{}: the generator sent {sent} datagrams and got {echoed} back (plus the start-up probe's); ", self.frontend.label())?;
        match &self.proxy {
            Ok([from_clients, to_backends, from_backends, dropped]) => write!(
                f,
                "lb-proxy counted {from_clients} from clients, {to_backends} to the backends, {from_backends} from them, {dropped} dropped"
            ),
            Err(e) => write!(f, "no /metrics: {e}"),
        }
    }
}

/// Reads each lb-proxy's counts from its /metrics.
fn proxy_counts(running: &[UdpRunning], totals: &Totals) -> Vec<ProxyCounts> {
    running
        .iter()
        .filter_map(|r| Some((r, r.admin?)))
        .map(|(r, admin)| {
            let (generator_sent, generator_echoed) = totals.get(r.frontend);
            let proxy = crate::lbproxy::metrics(admin)
                .map(|body| {
                    [
                        "lb_frontend_received_datagrams_total",
                        "lb_backend_sent_datagrams_total",
                        "lb_backend_received_datagrams_total",
                        "lb_udp_dropped_datagrams_total",
                    ]
                    .map(|name| {
                        crate::net::metric_sum(&body, name, &[("frontend", "udp")]).unwrap_or(0.0)
                            as u64
                    })
                })
                .map_err(|e| e.to_string());
            ProxyCounts {
                frontend: r.frontend,
                generator_sent,
                generator_echoed,
                proxy,
            }
        })
        .collect()
}

/// compare-udp.md and compare-udp.json.
fn write_outputs(result: &UdpCompareResult, opts: &CompareOptions) -> Result<()> {
    std::fs::write(&result.markdown_path, &result.markdown)
        .ctx(|| format!("write {}", result.markdown_path.display()))?;
    let json_path = opts.out_dir.join("compare-udp.json");
    let json = serde_json::to_string_pretty(result).unwrap_or_default();
    std::fs::write(&json_path, json).ctx(|| format!("write {}", json_path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole comparison, briefly: needs lb-proxy built next to the test
    /// binary (`cargo build --workspace --bins`, as CI does first); nginx is
    /// measured when installed.
    #[test]
    fn a_quick_run_measures_every_front_end_and_the_proxy_agrees_with_the_generator() {
        let out = tempfile::tempdir().unwrap();
        let mut opts = CompareOptions::new(true);
        opts.out_dir = out.path().to_path_buf();
        opts.duration = Duration::from_millis(300);
        let res = run(&opts, true).unwrap();
        let nginx_installed = Programs::find(&opts).nginx.is_some()
            && std::path::Path::new("/usr/lib/nginx/modules/ngx_stream_module.so").exists();
        for st in &res.frontends {
            let must_run = st.frontend != UdpFrontend::Nginx || nginx_installed;
            if must_run {
                assert_eq!(st.status, "ok", "{}: {}", st.label, st.detail);
            }
            if st.status != "ok" {
                continue;
            }
            for &size in &opts.udp.sizes {
                let s = res
                    .samples
                    .iter()
                    .find(|s| s.frontend == st.frontend && s.size == size);
                let s = s.unwrap_or_else(|| panic!("no sample of {} at {size} B", st.label));
                assert!(s.load.echoed > 0, "{s:?}");
                assert_eq!(
                    (s.load.lost, s.load.corrupt),
                    (0, 0),
                    "loopback loses nothing: {s:?}"
                );
                assert_eq!(
                    s.cpu_us.is_some(),
                    st.frontend != UdpFrontend::Direct,
                    "{s:?}"
                );
            }
        }
        assert_eq!(res.proxy_counts.len(), 2, "{:?}", res.proxy_counts);
        for c in &res.proxy_counts {
            let [from_clients, to_backends, from_backends, dropped] = c.proxy.clone().unwrap();
            // Every generator datagram reached a backend and came back; only
            // the start-up probe's few datagrams are extra.
            assert!(
                to_backends >= c.generator_sent && to_backends - c.generator_sent < 1000,
                "{c}"
            );
            assert_eq!(
                (from_clients, from_backends, dropped),
                (to_backends, to_backends, 0),
                "{c}"
            );
        }
        assert!(
            res.markdown.contains("| datagrams/s, 1200 B |"),
            "{}",
            res.markdown
        );
        assert!(out.path().join("compare-udp.json").is_file());
    }
}
