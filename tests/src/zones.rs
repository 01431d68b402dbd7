//! Helpers shared by the zone tests (zones.rs, zones_udp.rs, zones_delay.rs):
//! one test at a time where timings matter ([`serial`]), the zone admin
//! actions ([`admin_post_with`]), the flow log's records ([`flow_records`]),
//! the cross-zone delay histogram ([`held`]) and the median of timed
//! round trips ([`p50`]).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::{wait_until, Proxy};

/// How long an admin request or the flow log may take.
const WAIT: Duration = Duration::from_secs(10);

/// Held by the tests of one binary that must not run while another does (a
/// failed one does not block the rest). Each test binary has its own lock.
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `POST path` on `proxy`'s admin endpoint with extra `headers` (each ending
/// in CRLF): (status, body).
pub fn admin_post_with(proxy: &Proxy, path: &str, headers: &str) -> (u16, String) {
    let mut s = TcpStream::connect(proxy.admin()).expect("connect to admin");
    s.set_read_timeout(Some(WAIT)).expect("read timeout");
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: admin\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .expect("send the request");
    let mut response = String::new();
    s.read_to_string(&mut response).expect("read the response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("an HTTP status line: {response}"));
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

/// The flow log's JSON records, once at least `n` are written.
pub fn flow_records(path: &Path, n: usize) -> Vec<serde_json::Value> {
    wait_until(&format!("{n} flow log records"), WAIT, || {
        let text = std::fs::read_to_string(path).ok()?;
        let records: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON flow record"))
            .collect();
        (records.len() >= n).then_some(records)
    })
}

/// `lb_cross_zone_delay_seconds` for one frontend: how many holds, and how
/// many took at most half the RTT (none should) and at most the RTT.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Holds {
    pub count: f64,
    pub within_half_rtt: f64,
    pub within_rtt: f64,
}

impl Holds {
    /// The holds since `before`.
    pub fn since(self, before: Holds) -> Holds {
        Holds {
            count: self.count - before.count,
            within_half_rtt: self.within_half_rtt - before.within_half_rtt,
            within_rtt: self.within_rtt - before.within_rtt,
        }
    }

    /// Asserts the delay line's own account of `round_trips` cross-zone
    /// round trips: each held at least once each way, none for less than
    /// half the RTT, at least 90% for at most the RTT (half the RTT of noise).
    pub fn assert_each_way_per_round_trip(self, round_trips: usize) {
        let holds = self;
        assert!(
            holds.count >= 2.0 * round_trips as f64,
            "{} holds for {round_trips} round trips",
            holds.count
        );
        assert_eq!(
            holds.within_half_rtt, 0.0,
            "a hold under half the RTT: {holds:?}"
        );
        assert!(
            holds.within_rtt >= 0.9 * holds.count,
            "fewer than 90% of holds within half the RTT of it: {holds:?}"
        );
    }
}

/// The holds `frontend` has observed so far, its buckets read at half of
/// `rtt` and at `rtt` (series not yet written read as 0).
pub fn held(proxy: &Proxy, frontend: &str, rtt: Duration) -> Holds {
    let m = proxy.metrics();
    let bucket = |le: Duration| {
        let le = le.as_secs_f64().to_string();
        let labels = [("frontend", frontend), ("le", le.as_str())];
        m.get("lb_cross_zone_delay_seconds_bucket", &labels)
            .unwrap_or(0.0)
    };
    Holds {
        count: m
            .get(
                "lb_cross_zone_delay_seconds_count",
                &[("frontend", frontend)],
            )
            .unwrap_or(0.0),
        within_half_rtt: bucket(rtt / 2),
        within_rtt: bucket(rtt),
    }
}

/// The median of `samples` (the upper one of an even count).
pub fn p50(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}
