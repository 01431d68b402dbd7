//! One sample of the running lb-proxy: its resident memory (VmRSS) and open
//! fds from /proc/PID, the active-connection gauges, flows and reloads from
//! its `/metrics`, with the load's running counts beside them; the quiesced
//! sample once the load has stopped; the samples as CSV.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

use super::schedule::poll_until;
use crate::error::{Error, Result};
use crate::{lbproxy, net, procs};

/// lb-proxy's metric families a soak reads (lb-proxy/src/metrics.rs).
pub const FRONTEND_ACTIVE: &str = "lb_frontend_active_connections";
pub const BACKEND_ACTIVE: &str = "lb_backend_active_connections";
pub const FLOWS: &str = "lb_frontend_connections_total";
pub const RELOADS: &str = "lb_config_reloads_total";
pub const BACKEND_UP: &str = "lb_backend_up";
pub const BACKEND_WEIGHT: &str = "lb_backend_weight";

/// How long connections may take to close once the load has stopped.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(15);
/// Reads of the fd count when quiesced; the smallest is kept, since a health
/// probe or the scrape's own admin connection may be open at any one read.
const FD_READS: usize = 10;
const FD_READ_EVERY: Duration = Duration::from_millis(50);

/// What the proxy looked like at one moment.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Sample {
    /// Seconds since the soak started.
    pub t_s: f64,
    /// `warm-up`, `soak`, or `quiesced` (after a phase, the load stopped).
    pub phase: String,
    pub rss_kib: u64,
    pub fds: u64,
    /// Sum of `lb_frontend_active_connections` over the frontends.
    pub frontend_active: u64,
    /// Sum of `lb_backend_active_connections` over the backends.
    pub backend_active: u64,
    /// Sum of `lb_frontend_connections_total`: flows accepted so far.
    pub flows: u64,
    /// `lb_config_reloads_total{result="success"}`.
    pub reloads: u64,
    /// Successful requests of the load so far (keep-alive and new connections).
    pub requests: u64,
    /// Failed requests of the load so far, before telling flap failures apart.
    pub errors: u64,
}

/// Reads samples from one lb-proxy.
#[derive(Clone, Copy, Debug)]
pub(super) struct Probe {
    pub pid: u32,
    pub admin: SocketAddr,
}

impl Probe {
    /// The proxy's `/metrics` body.
    pub fn metrics(&self) -> Result<String> {
        lbproxy::metrics(self.admin)
    }

    /// The sum of the series of `name` with `labels` (0 when there is none).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        Ok(net::metric_sum(&self.metrics()?, name, labels).unwrap_or(0.0))
    }

    /// A sample now, labelled `phase`, with the load's counts so far.
    pub fn take(&self, t: Duration, phase: &str, load: (u64, u64)) -> Result<Sample> {
        let fds = procs::fd_count(self.pid).ok_or_else(|| self.gone("/fd"))?;
        self.take_with_fds(t, phase, load, fds)
    }

    /// The sample after the load stopped: once the active-connection gauges
    /// are 0 (or [`QUIESCE_TIMEOUT`] passed, which the verdict then reports),
    /// with the smallest of [`FD_READS`] fd counts.
    pub fn quiesced(&self, t: impl Fn() -> Duration, load: (u64, u64)) -> Result<Sample> {
        poll_until(QUIESCE_TIMEOUT, || {
            self.metrics()
                .map(|m| active(&m) == (0, 0))
                .unwrap_or(false)
        });
        let mut fds = u64::MAX;
        for _ in 0..FD_READS {
            fds = fds.min(procs::fd_count(self.pid).ok_or_else(|| self.gone("/fd"))?);
            std::thread::sleep(FD_READ_EVERY);
        }
        self.take_with_fds(t(), "quiesced", load, fds)
    }

    fn take_with_fds(
        &self,
        t: Duration,
        phase: &str,
        load: (u64, u64),
        fds: u64,
    ) -> Result<Sample> {
        // /proc first: the scrape opens an admin connection of its own.
        let rss_kib = procs::vm_rss_kib(self.pid).ok_or_else(|| self.gone("/status"))?;
        let m = self.metrics()?;
        let (frontend_active, backend_active) = active(&m);
        let count = |name: &str, labels: &[(&str, &str)]| {
            net::metric_sum(&m, name, labels).unwrap_or(0.0) as u64
        };
        Ok(Sample {
            t_s: t.as_secs_f64(),
            phase: phase.to_owned(),
            rss_kib,
            fds,
            frontend_active,
            backend_active,
            flows: count(FLOWS, &[]),
            reloads: count(RELOADS, &[("result", "success")]),
            requests: load.0,
            errors: load.1,
        })
    }

    fn gone(&self, what: &str) -> Error {
        Error::Protocol {
            what: format!("/proc/{}{what}", self.pid),
            detail: "unreadable: has lb-proxy exited?".into(),
        }
    }
}

/// (frontend, backend) active connections summed from a `/metrics` body.
fn active(metrics: &str) -> (u64, u64) {
    let sum = |name| net::metric_sum(metrics, name, &[]).unwrap_or(0.0) as u64;
    (sum(FRONTEND_ACTIVE), sum(BACKEND_ACTIVE))
}

/// The samples as CSV, one row each, with a header.
pub fn csv(samples: &[Sample]) -> String {
    let mut out = String::from(
        "t_s,phase,rss_kib,fds,frontend_active,backend_active,flows,reloads,requests,errors\n",
    );
    for s in samples {
        let _ = writeln!(
            out,
            "{:.1},{},{},{},{},{},{},{},{},{}",
            s.t_s,
            s.phase,
            s.rss_kib,
            s.fds,
            s.frontend_active,
            s.backend_active,
            s.flows,
            s.reloads,
            s.requests,
            s.errors
        );
    }
    out
}

/// One sample as a line of the live log (matching [`LINE_HEADER`]).
pub fn line(s: &Sample) -> String {
    format!(
        "{:>7.1} {:<9} {:>8.1} {:>5} {:>7}/{:<7} {:>9} {:>7} {:>10} {:>7}",
        s.t_s,
        s.phase,
        s.rss_kib as f64 / 1024.0,
        s.fds,
        s.frontend_active,
        s.backend_active,
        s.flows,
        s.reloads,
        s.requests,
        s.errors
    )
}

/// The header of [`line`]s.
pub const LINE_HEADER: &str =
    "    t_s phase      rss_mib   fds  active fe/be     flows reloads   requests  errors";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_connections_sum_over_frontends_and_backends() {
        let body = "# TYPE lb_frontend_active_connections gauge\n\
            lb_frontend_active_connections{frontend=\"web\"} 3\n\
            lb_frontend_active_connections{frontend=\"bulk\"} 1\n\
            lb_backend_active_connections{frontend=\"web\",backend=\"node-1\"} 2\n\
            lb_backend_active_connections{frontend=\"bulk\",backend=\"bulk\"} 1\n";
        assert_eq!(active(body), (4, 3));
        assert_eq!(active(""), (0, 0));
    }

    #[test]
    fn csv_has_a_row_per_sample() {
        let s = Sample {
            t_s: 10.0,
            phase: "soak".into(),
            rss_kib: 2048,
            fds: 20,
            ..Sample::default()
        };
        let text = csv(&[s.clone(), s]);
        assert_eq!(text.lines().count(), 3);
        assert_eq!(text.lines().nth(1), Some("10.0,soak,2048,20,0,0,0,0,0,0"));
    }
}
