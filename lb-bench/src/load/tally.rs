//! One worker's tally: the latency histogram, status and error counts, the
//! backends named per response and per flow, the recorded flows and the dial
//! times; what one response adds to it, and how two tallies merge.

use std::collections::BTreeMap;
use std::net::IpAddr;

use hdrhistogram::Histogram;

use super::report::FlowRecord;

#[derive(Default)]
pub(super) struct WorkerStats {
    pub(super) hist: Option<Histogram<u64>>,
    pub(super) status: BTreeMap<u16, u64>,
    pub(super) errors: BTreeMap<String, u64>,
    pub(super) nodes: BTreeMap<Vec<u8>, u64>,
    pub(super) node_flows: BTreeMap<Vec<u8>, u64>,
    pub(super) unnamed: u64,
    pub(super) per_source: BTreeMap<IpAddr, BTreeMap<Vec<u8>, u64>>,
    pub(super) flows: Vec<FlowRecord>,
    pub(super) bytes: u64,
    pub(super) connections: u64,
    pub(super) dial_us_sum: u64,
    pub(super) dial_us_min: u64,
    pub(super) dial_us_max: u64,
}

/// What one response adds to the tally.
pub(super) struct Answer {
    /// The HTTP status; `None` for a TCP echo.
    pub(super) status: Option<u16>,
    /// The backend that served it, as it named itself.
    pub(super) node: Option<Vec<u8>>,
    /// The source address the backend saw (only read for recorded flows).
    pub(super) seen: Option<String>,
    pub(super) bytes: usize,
    /// The connection must not be reused.
    pub(super) close: bool,
}

/// Where a response came in: which connection, and whether it was its first.
pub(super) struct Arrival {
    pub(super) source: IpAddr,
    pub(super) first_on_conn: bool,
    /// Index into `flows` when this connection's flow is being recorded.
    pub(super) flow: Option<usize>,
}

pub(super) fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 1 hour, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds")
}

fn add_counts<K: Ord>(into: &mut BTreeMap<K, u64>, from: BTreeMap<K, u64>) {
    for (k, v) in from {
        *into.entry(k).or_default() += v;
    }
}

impl WorkerStats {
    /// An empty tally with its histogram, for one worker.
    pub(super) fn for_worker() -> WorkerStats {
        WorkerStats {
            hist: Some(new_histogram()),
            ..WorkerStats::default()
        }
    }

    pub(super) fn error(&mut self, kind: String) {
        *self.errors.entry(kind).or_default() += 1;
    }

    pub(super) fn latency(&mut self, us: u64) {
        if let Some(h) = &mut self.hist {
            h.saturating_record(us);
        }
    }

    /// One connection opened, after `us` microseconds of connect.
    pub(super) fn dialed(&mut self, us: u64) {
        self.dial_us_min = if self.connections == 0 {
            us
        } else {
            self.dial_us_min.min(us)
        };
        self.dial_us_max = self.dial_us_max.max(us);
        self.dial_us_sum += us;
        self.connections += 1;
    }

    /// Counts one response: status, bytes, the backend per response, per
    /// flow (on a connection's first response) and per source address.
    pub(super) fn count(&mut self, answer: &Answer, at: &Arrival, per_source: bool) {
        if let Some(status) = answer.status {
            *self.status.entry(status).or_default() += 1;
        }
        self.bytes += answer.bytes as u64;
        match &answer.node {
            // Look up by slice first: a new key is allocated once per backend, not per response.
            Some(n) => {
                if let Some(c) = self.nodes.get_mut(n.as_slice()) {
                    *c += 1;
                } else {
                    self.nodes.insert(n.clone(), 1);
                }
            }
            None => self.unnamed += 1,
        }
        if at.first_on_conn {
            if let Some(n) = &answer.node {
                *self.node_flows.entry(n.clone()).or_default() += 1;
            }
        }
        if per_source {
            let per = self.per_source.entry(at.source).or_default();
            *per.entry(answer.node.clone().unwrap_or_else(|| b"-".to_vec()))
                .or_default() += 1;
        }
    }

    /// Fills in the recorded flow of `at`, if any: its request count, and on
    /// its first response when it came, which backend, and what it saw.
    pub(super) fn note_flow(&mut self, answer: Answer, at: &Arrival, t_ms: f64) {
        let Some(i) = at.flow else {
            return;
        };
        let f = &mut self.flows[i];
        f.requests += 1;
        if at.first_on_conn {
            f.t_ms = t_ms;
            f.node = answer
                .node
                .map(|n| String::from_utf8_lossy(&n).into_owned());
            f.seen = answer.seen;
        }
    }

    pub(super) fn merge(&mut self, other: WorkerStats) {
        match (&mut self.hist, other.hist) {
            (Some(a), Some(b)) => a.add(b).expect("same bounds"),
            (a @ None, b) => *a = b,
            _ => {}
        }
        add_counts(&mut self.status, other.status);
        add_counts(&mut self.errors, other.errors);
        add_counts(&mut self.nodes, other.nodes);
        add_counts(&mut self.node_flows, other.node_flows);
        for (ip, m) in other.per_source {
            add_counts(self.per_source.entry(ip).or_default(), m);
        }
        self.unnamed += other.unnamed;
        self.flows.extend(other.flows);
        self.bytes += other.bytes;
        if other.connections > 0 {
            self.dial_us_min = if self.connections == 0 {
                other.dial_us_min
            } else {
                self.dial_us_min.min(other.dial_us_min)
            };
            self.dial_us_max = self.dial_us_max.max(other.dial_us_max);
        }
        self.connections += other.connections;
        self.dial_us_sum += other.dial_us_sum;
    }
}
