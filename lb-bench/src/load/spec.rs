//! What a load run is asked to do: [`LoadSpec`] with hey's defaults, its
//! validation, and the expected per-backend shares read from a balancer's
//! `/backends`.

use std::net::SocketAddr;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::net::{self, SourceRange, Target};

/// The request count when neither `-n` nor `-z` is given (hey's default).
pub const DEFAULT_REQUESTS: u64 = 200;

/// What to run.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub target: Target,
    /// Stop after this many requests (in total, over all workers).
    pub requests: Option<u64>,
    /// Stop after this long. With both, whichever comes first.
    pub duration: Option<Duration>,
    pub concurrency: usize,
    pub keepalive: bool,
    /// Requests per second per worker.
    pub qps: Option<f64>,
    pub sources: Option<SourceRange>,
    /// Per request, connect included.
    pub timeout: Duration,
    /// TCP: bytes sent (and echoed back) per request.
    pub tcp_size: usize,
    /// TCP: the server writes one line naming itself on connect.
    pub tcp_greeting: bool,
    /// Lower-case name of the header naming the backend.
    pub node_header: String,
    /// Lower-case name of the header with the source address the backend saw.
    pub seen_header: String,
    /// Expected share per backend; equal over the backends seen when `None`.
    pub expected: Option<Vec<(String, f64)>>,
    /// Keep which backends served each source address.
    pub per_source: bool,
    /// Keep the first this many flows (5-tuple, backend, source seen).
    pub record_flows: usize,
    /// Show a progress bar on stderr (when it is a terminal) for runs over ~2 s.
    pub progress: bool,
}

impl LoadSpec {
    /// A spec with hey's defaults: 200 requests, 50 workers, keep-alive, 20 s timeout.
    pub fn new(target: Target) -> LoadSpec {
        LoadSpec {
            target,
            requests: None,
            duration: None,
            concurrency: 50,
            keepalive: true,
            qps: None,
            sources: None,
            timeout: Duration::from_secs(20),
            tcp_size: 64,
            tcp_greeting: false,
            node_header: "x-node".into(),
            seen_header: "x-seen-source".into(),
            expected: None,
            per_source: false,
            record_flows: 0,
            progress: false,
        }
    }

    pub(super) fn validate(&self) -> Result<()> {
        if self.concurrency == 0 {
            return Err(Error::BadArgument("-c must be at least 1".into()));
        }
        if self.requests == Some(0) {
            return Err(Error::BadArgument("-n must be at least 1".into()));
        }
        if let Some(q) = self.qps {
            if !(q > 0.0 && q.is_finite()) {
                return Err(Error::BadArgument("-q must be above 0".into()));
            }
        }
        if matches!(self.target, Target::Tcp { .. }) && self.tcp_size == 0 {
            return Err(Error::BadArgument("--size must be at least 1".into()));
        }
        Ok(())
    }

    /// The request budget: `-n`, or hey's default when neither `-n` nor `-z` is given.
    pub(super) fn request_budget(&self) -> Option<u64> {
        match (self.requests, self.duration) {
            (None, None) => Some(DEFAULT_REQUESTS),
            (n, _) => n,
        }
    }
}

/// Expected shares from the balancer's `/backends`: the frontend listening on
/// `target` (or the only one, or the one named `frontend`).
pub fn expected_from_admin(
    admin: SocketAddr,
    target: SocketAddr,
    frontend: Option<&str>,
) -> Result<Vec<(String, f64)>> {
    let v = net::get_json(admin, "/backends")?;
    let fes = v["frontends"].as_array().cloned().unwrap_or_default();
    let pick = fes
        .iter()
        .find(|f| frontend.is_some_and(|n| f["name"] == n))
        .or_else(|| {
            fes.iter()
                .find(|f| frontend.is_none() && f["listen"] == target.to_string().as_str())
        })
        .or_else(|| (frontend.is_none() && fes.len() == 1).then(|| &fes[0]))
        .ok_or_else(|| Error::Protocol {
            what: format!("http://{admin}/backends"),
            detail: format!(
                "no frontend {} among {:?}",
                frontend.map_or_else(|| format!("listening on {target}"), |n| format!("`{n}`")),
                fes.iter()
                    .map(|f| format!("{} ({})", f["name"], f["listen"]))
                    .collect::<Vec<_>>()
            ),
        })?;
    Ok(pick["backends"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap_or("?").to_owned(),
                b["expected_share"].as_f64().unwrap_or(0.0),
            )
        })
        .collect())
}
