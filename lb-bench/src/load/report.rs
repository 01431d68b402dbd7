//! What a load run measured: [`LoadReport`] and its parts (latencies, the
//! per-backend distribution, the recorded flows). The JSON report
//! (`lb-bench load --json`) is these types' `Serialize`; the text report is
//! in `text`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

use crate::stats::ChiSquare;

/// One flow, as a packet capture would name it.
#[derive(Clone, Debug, Serialize)]
pub struct FlowRecord {
    /// When its first response arrived, from the start of the run.
    pub t_ms: f64,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub proto: &'static str,
    pub node: Option<String>,
    /// What the backend said it saw as the source (`X-Seen-Source`).
    pub seen: Option<String>,
    pub requests: u64,
}

/// Latencies, in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    pub fastest_ms: f64,
    pub slowest_ms: f64,
    pub mean_ms: f64,
    pub p10_ms: f64,
    pub p25_ms: f64,
    pub p50_ms: f64,
    pub p75_ms: f64,
    pub p90_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// hey's response time histogram: (upper mark in ms, count).
    pub histogram: Vec<(f64, u64)>,
}

/// One backend's share of the responses.
#[derive(Clone, Debug, Serialize)]
pub struct BackendRow {
    pub name: String,
    pub responses: u64,
    /// Connections whose first response came from this backend: with
    /// keep-alive, the flows are what the balancer spread.
    pub flows: u64,
    pub share: f64,
    pub expected_share: f64,
}

/// The per-backend distribution.
#[derive(Clone, Debug, Serialize)]
pub struct Distribution {
    /// Where the names came from (`X-Node`, or `greeting`).
    pub source: String,
    pub backends: Vec<BackendRow>,
    /// Responses that named no backend.
    pub unnamed: u64,
    /// Max over mean of the responses per expected backend.
    pub max_mean: f64,
    /// Responses against the expected shares.
    pub chi_square: Option<ChiSquare>,
    /// Flows (connections) against the expected shares.
    pub chi_square_flows: Option<ChiSquare>,
    /// Where the expected shares came from.
    pub expected_from: String,
}

/// What a load run measured.
#[derive(Clone, Debug, Serialize)]
pub struct LoadReport {
    pub tool: &'static str,
    pub target: String,
    pub protocol: &'static str,
    pub keepalive: bool,
    pub concurrency: usize,
    pub sources: Option<String>,
    pub total_secs: f64,
    /// Responses received (any status).
    pub responses: u64,
    pub requests_per_sec: f64,
    pub bytes: u64,
    pub connections: u64,
    pub latency: Latency,
    /// Mean, fastest and slowest connect time in ms.
    pub dial_ms: [f64; 3],
    pub status: BTreeMap<u16, u64>,
    pub errors: BTreeMap<String, u64>,
    pub errors_total: u64,
    pub distribution: Option<Distribution>,
    /// Source IP -> backend -> responses.
    pub per_source: Option<BTreeMap<IpAddr, BTreeMap<String, u64>>>,
    pub flows: Vec<FlowRecord>,
}

impl LoadReport {
    /// Responses with a 2xx status.
    pub fn ok(&self) -> u64 {
        if self.protocol == "tcp" {
            return self.responses;
        }
        self.status
            .iter()
            .filter(|(s, _)| (200..300).contains(*s))
            .map(|(_, n)| n)
            .sum()
    }
}
