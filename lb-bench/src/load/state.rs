//! What every worker of one run shares: the spec, the request budget and the
//! run's deadline, the source-address picker, and the request bytes prepared
//! once for all.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use super::spec::LoadSpec;
use crate::http;
use crate::net::{SourcePicker, Target};

pub(super) struct Shared {
    /// The spec, with `requests` set to the run's budget.
    pub(super) spec: LoadSpec,
    pub(super) issued: AtomicU64,
    pub(super) completed: AtomicU64,
    pub(super) flows_kept: AtomicUsize,
    pub(super) start: Instant,
    pub(super) deadline: Option<Instant>,
    pub(super) sources: SourcePicker,
    /// HTTP: the `GET` every request sends.
    pub(super) request: Vec<u8>,
    /// TCP: the bytes every round trip sends (and expects back).
    pub(super) tcp_payload: Vec<u8>,
}

impl Shared {
    /// The shared state for a run of `spec` starting now.
    pub(super) fn new(spec: LoadSpec) -> Shared {
        let request = match &spec.target {
            Target::Http { host, path, .. } => http::get_request(host, path, spec.keepalive),
            Target::Tcp { .. } => Vec::new(),
        };
        let tcp_payload: Vec<u8> = (0..spec.tcp_size).map(|i| b'a' + (i % 26) as u8).collect();
        let requests = spec.request_budget();
        let start = Instant::now();
        Shared {
            deadline: spec.duration.map(|d| start + d),
            sources: SourcePicker::new(spec.sources),
            spec: LoadSpec { requests, ..spec },
            issued: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            flows_kept: AtomicUsize::new(0),
            start,
            request,
            tcp_payload,
        }
    }

    /// Takes one request from the budget.
    pub(super) fn take(&self) -> bool {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return false;
        }
        match self.spec.requests {
            Some(n) => self.issued.fetch_add(1, Ordering::Relaxed) < n,
            None => true,
        }
    }

    /// Takes one of the flow records the spec asks for, if any is left.
    pub(super) fn take_flow_record(&self) -> bool {
        let limit = self.spec.record_flows;
        // The load first keeps the counter from growing once the records are all taken.
        self.flows_kept.load(Ordering::Relaxed) < limit
            && self.flows_kept.fetch_add(1, Ordering::Relaxed) < limit
    }

    /// Milliseconds since the run started.
    pub(super) fn elapsed_ms(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1000.0
    }
}
