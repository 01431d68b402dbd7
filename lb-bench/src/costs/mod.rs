//! What a feature of lb-proxy costs, measured as an A/B of two lb-proxy
//! configs over the same backends in alternating rounds:
//!
//! - [`metrics`]: `/metrics` scrape time with 100 backends under load, and
//!   keep-alive req/s with byte metrics on vs off (`lb-bench metrics-cost`,
//!   also a section of `lb-bench report`);
//! - [`hop`]: plain backends vs the AKS hop model with SNAT
//!   (`lb-bench hop-cost`).
//!
//! The backends are `compare`'s (nginx when installed, else built in); the
//! load is hey when installed, else lb-bench's own generator.

pub mod hop;
pub mod metrics;

use std::net::SocketAddr;
use std::path::Path;

use crate::compare::{self, backends::Backends, CompareOptions};
use crate::error::Result;
use crate::lbproxy::LbProxy;
use crate::load::{self, LoadSpec};
use crate::net::Target;
use crate::procs;
use crate::signals::WorkDir;
use crate::tools::{self, HttpRun};

/// What an A/B measurement runs on: a work directory (removed on drop),
/// the lb-proxy binary, and `compare`'s backends.
struct Bench {
    // Fields drop in this order: the backends stop before their directory goes.
    backends: Backends,
    bin: std::path::PathBuf,
    work: WorkDir,
}

impl Bench {
    /// `iperf3`: the bulk sink, when one is wanted (else the built-in one).
    fn start(opts: &CompareOptions, prefix: &str, iperf3: Option<&Path>) -> Result<Bench> {
        let work = WorkDir::new(prefix)?;
        let bin = procs::lb_proxy_bin(opts.lb_proxy.as_deref())?;
        let nginx = procs::find_program("nginx", opts.nginx.as_deref());
        let (_, hard) = procs::raise_nofile_limit();
        let backends = compare::start_backends(opts, work.path(), nginx.as_deref(), iperf3, hard)?;
        Ok(Bench {
            backends,
            bin,
            work,
        })
    }

    fn dir(&self) -> &Path {
        self.work.path()
    }

    /// lb-proxy with `config`, as `name`.
    fn lb_proxy(&self, name: &str, config: &str) -> Result<LbProxy> {
        LbProxy::run_config(&self.bin, self.dir(), name, config)
    }
}

fn http(addr: SocketAddr) -> Target {
    Target::Http {
        addr,
        host: addr.to_string(),
        path: "/".into(),
    }
}

/// A and B in round `round`'s order: alternating, so that neither side
/// always runs second (warmer caches, a hotter machine).
fn alternate<T: Copy>(round: usize, a: T, b: T) -> [T; 2] {
    if round.is_multiple_of(2) {
        [a, b]
    } else {
        [b, a]
    }
}

/// The load tool: hey when installed, else lb-bench's own generator.
struct Load<'a> {
    rt: &'a tokio::runtime::Runtime,
    opts: &'a CompareOptions,
    hey: Option<std::path::PathBuf>,
    dir: &'a Path,
}

impl<'a> Load<'a> {
    fn new(rt: &'a tokio::runtime::Runtime, opts: &'a CompareOptions, dir: &'a Path) -> Self {
        Load {
            rt,
            opts,
            hey: procs::find_program("hey", opts.hey.as_deref()),
            dir,
        }
    }

    fn tool(&self) -> &'static str {
        if self.hey.is_some() {
            "hey"
        } else {
            "lb-bench"
        }
    }

    /// Load on `proxy`'s frontend `frontend` for `opts.duration`: req/s,
    /// the proxy's CPU (user + system) µs per response, and the errors.
    fn measure(&self, proxy: &LbProxy, frontend: &str, keepalive: bool) -> Result<(f64, f64, u64)> {
        let addr = proxy.frontend(Some(frontend))?;
        let cpu_before = procs::cpu_secs(proxy.process.pid());
        let (rps, responses, errors) = self.rate(addr, keepalive)?;
        let cpu_us = match (cpu_before, procs::cpu_secs(proxy.process.pid())) {
            (Some(a), Some(b)) if responses > 0 => (b - a) * 1e6 / responses as f64,
            _ => f64::NAN,
        };
        Ok((rps, cpu_us, errors))
    }

    /// req/s, responses and errors (failed requests and non-2xx/3xx answers).
    fn rate(&self, addr: SocketAddr, keepalive: bool) -> Result<(f64, u64, u64)> {
        let opts = self.opts;
        match &self.hey {
            Some(h) => {
                let run = HttpRun {
                    url: &format!("http://{addr}/"),
                    concurrency: opts.concurrency,
                    duration: opts.duration,
                    keepalive,
                };
                let sample = tools::hey(h, &run, self.dir)?;
                Ok((sample.requests_per_sec, sample.responses, sample.errors))
            }
            None => {
                let mut spec = LoadSpec::new(http(addr));
                spec.duration = Some(opts.duration);
                spec.concurrency = opts.concurrency;
                spec.keepalive = keepalive;
                let result = self.rt.block_on(load::run(spec))?;
                let errors = result.errors_total + (result.responses - result.ok());
                Ok((result.requests_per_sec, result.responses, errors))
            }
        }
    }

    /// The command line of one [`Load::measure`], against `target`.
    fn command(&self, keepalive: bool, target: &str, rounds: usize) -> String {
        let (d, c) = (
            tools::go_duration(self.opts.duration),
            self.opts.concurrency,
        );
        let close = match (self.tool(), keepalive) {
            (_, true) => "",
            ("hey", false) => " -disable-keepalive",
            (_, false) => " --disable-keepalive",
        };
        let tool = match self.tool() {
            "hey" => format!("hey -z {d} -c {c} -t 10"),
            _ => format!("lb-bench load -z {d} -c {c}"),
        };
        format!("{tool}{close} http://{target}/   ({rounds} rounds, order alternating)")
    }
}

/// The median of `v`, NaN for none.
fn median(v: &[f64]) -> f64 {
    crate::stats::median(v).unwrap_or(f64::NAN)
}
