//! What happened during a soak, each event timed from its start, and the
//! tally of it: which failures a flapped backend explains and which it does
//! not.
//!
//! Killing a backend fails the connections it holds: requests in flight on
//! them, and idle connections it served. Those are expected. A connection the
//! balancer opens after the kill is refused and retried on another backend,
//! and once the balancer has marked the backend down it is not chosen at all,
//! so a request that fails outside a flap's window (from the kill until the
//! balancer was seen to mark it down, plus [`FLAP_GRACE`]) is unexpected, as
//! is any failed bulk transfer, reload or health transition.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

/// How long after the balancer was seen to mark a killed backend down its
/// failures still count as the flap's: the load reports a 1 s chunk at a
/// time, and a poll of `/metrics` is late by up to its interval.
pub const FLAP_GRACE: Duration = Duration::from_millis(500);

/// Which load a chunk belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadKind {
    KeepAlive,
    NewConnections,
}

impl LoadKind {
    pub fn label(self) -> &'static str {
        match self {
            LoadKind::KeepAlive => "keep-alive",
            LoadKind::NewConnections => "new connections",
        }
    }
}

/// One bounded run of a load generator, from `from` to `to`.
#[derive(Clone, Debug)]
pub struct Chunk {
    pub kind: LoadKind,
    pub from: Duration,
    pub to: Duration,
    /// Requests answered with a 2xx.
    pub ok: u64,
    /// Failed requests by reason (errors and non-2xx statuses).
    pub failed: BTreeMap<String, u64>,
}

impl Chunk {
    pub fn failures(&self) -> u64 {
        self.failed.values().sum()
    }
}

/// An idle connection's last request, after it was held open.
#[derive(Clone, Debug)]
pub struct IdleCheck {
    pub opened: Duration,
    pub at: Duration,
    /// The backend that answered its first request (`None`: it never got one).
    pub node: Option<String>,
    pub error: Option<String>,
}

/// One bulk transfer through the echo frontend.
#[derive(Clone, Debug)]
pub struct Transfer {
    pub at: Duration,
    /// Bytes that came back intact.
    pub bytes: u64,
    pub error: Option<String>,
}

/// One kill and restart of the flapped backend.
#[derive(Clone, Debug)]
pub struct Flap {
    pub killed: Duration,
    /// When `lb_backend_up` was seen at 0 (`None`: not within the bound).
    pub down_seen: Option<Duration>,
    pub restarted: Duration,
    /// When `lb_backend_up` was seen at 1 after the restart.
    pub up_seen: Option<Duration>,
}

impl Flap {
    /// When its connections may fail: from the kill until it was marked down.
    pub fn window(&self) -> (Duration, Duration) {
        let down = self.down_seen.unwrap_or(self.killed);
        (self.killed, down + FLAP_GRACE)
    }

    fn covers(&self, from: Duration, to: Duration) -> bool {
        let (start, end) = self.window();
        from <= end && to >= start
    }
}

/// Everything recorded, in the order it was recorded.
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    pub chunks: Vec<Chunk>,
    pub idle: Vec<IdleCheck>,
    /// Idle cycles completed (connections opened, held, checked, closed).
    pub idle_cycles: u64,
    pub transfers: Vec<Transfer>,
    pub flaps: Vec<Flap>,
    /// Successful reloads.
    pub reloads: u64,
    /// What went wrong outside the load: a refused reload, a backend not
    /// marked down or up in time, a sample that could not be read.
    pub problems: Vec<(Duration, String)>,
}

/// The timeline counted.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Tally {
    /// Requests answered with a 2xx (keep-alive and new connections).
    pub requests: u64,
    /// Failures a flap explains (requests and idle connections).
    pub during_flaps: u64,
    /// Everything else that failed, by `what: reason`.
    pub unexpected: BTreeMap<String, u64>,
    pub bulk_transfers: u64,
    pub bulk_bytes: u64,
    pub idle_checked: u64,
    pub idle_cycles: u64,
    pub reloads: u64,
    pub flaps: u64,
    /// The longest a kill took to show as `lb_backend_up` 0, in ms.
    pub slowest_down_ms: u64,
    /// The longest a restart took to show as `lb_backend_up` 1, in ms
    /// (flap damping makes a node that flaps wait longer).
    pub slowest_up_ms: u64,
}

impl Tally {
    pub fn unexpected_total(&self) -> u64 {
        self.unexpected.values().sum()
    }

    fn unexpected(&mut self, what: &str, reason: &str, n: u64) {
        *self
            .unexpected
            .entry(format!("{what}: {reason}"))
            .or_default() += n;
    }
}

impl Timeline {
    /// Counts everything, telling the failures that the kills of backend
    /// `flapped` explain from the others.
    pub fn tally(&self, flapped: &str) -> Tally {
        let mut t = Tally {
            idle_cycles: self.idle_cycles,
            reloads: self.reloads,
            flaps: self.flaps.len() as u64,
            ..Tally::default()
        };
        for f in &self.flaps {
            let ms = |from: Duration, to: Option<Duration>| {
                to.map_or(0, |to| to.saturating_sub(from).as_millis() as u64)
            };
            t.slowest_down_ms = t.slowest_down_ms.max(ms(f.killed, f.down_seen));
            t.slowest_up_ms = t.slowest_up_ms.max(ms(f.restarted, f.up_seen));
        }
        self.tally_chunks(&mut t);
        self.tally_idle(&mut t, flapped);
        for x in &self.transfers {
            match &x.error {
                None => {
                    t.bulk_transfers += 1;
                    t.bulk_bytes += x.bytes;
                }
                Some(e) => t.unexpected("bulk", e, 1),
            }
        }
        for (_, p) in &self.problems {
            t.unexpected("soak", p, 1);
        }
        t
    }

    fn in_flap(&self, from: Duration, to: Duration) -> bool {
        self.flaps.iter().any(|f| f.covers(from, to))
    }

    fn tally_chunks(&self, t: &mut Tally) {
        for c in &self.chunks {
            t.requests += c.ok;
            if self.in_flap(c.from, c.to) {
                t.during_flaps += c.failures();
                continue;
            }
            for (reason, n) in &c.failed {
                t.unexpected(c.kind.label(), reason, *n);
            }
        }
    }

    /// An idle connection may be lost when the backend that served it was
    /// killed while it was open; one that could not open, only in a window.
    fn tally_idle(&self, t: &mut Tally, flapped: &str) {
        for i in &self.idle {
            t.idle_checked += 1;
            let Some(e) = &i.error else { continue };
            let lost_with_its_backend = i.node.as_deref() == Some(flapped)
                && self
                    .flaps
                    .iter()
                    .any(|f| f.killed >= i.opened && f.killed <= i.at);
            if lost_with_its_backend || self.in_flap(i.at, i.at) {
                t.during_flaps += 1;
            } else {
                t.unexpected("idle", e, 1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: f64) -> Duration {
        Duration::from_secs_f64(secs)
    }

    fn chunk(from: f64, failed: u64) -> Chunk {
        Chunk {
            kind: LoadKind::KeepAlive,
            from: s(from),
            to: s(from + 1.0),
            ok: 100,
            failed: [("connection reset".to_owned(), failed)]
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .collect(),
        }
    }

    fn flap_at(killed: f64) -> Flap {
        Flap {
            killed: s(killed),
            down_seen: Some(s(killed + 0.2)),
            restarted: s(killed + 10.0),
            up_seen: Some(s(killed + 12.0)),
        }
    }

    #[test]
    fn request_failures_count_as_the_flaps_only_inside_its_window() {
        let t = Timeline {
            // Overlaps the kill; starts inside the grace; starts after it.
            chunks: vec![chunk(19.5, 3), chunk(20.6, 2), chunk(21.0, 1)],
            flaps: vec![flap_at(20.0)],
            ..Timeline::default()
        };
        let tally = t.tally("node-3");
        assert_eq!(tally.requests, 300);
        assert_eq!(tally.during_flaps, 5);
        assert_eq!(
            tally.unexpected,
            [("keep-alive: connection reset".to_owned(), 1)].into()
        );
    }

    #[test]
    fn idle_connections_may_die_with_their_backend_only() {
        let check = |node: &str, opened: f64, at: f64| IdleCheck {
            opened: s(opened),
            at: s(at),
            node: Some(node.into()),
            error: Some("connection closed before the response".into()),
        };
        let t = Timeline {
            idle: vec![
                check("node-3", 10.0, 30.0), // node-3 killed at 20 while it was open
                check("node-1", 10.0, 30.0), // node-1 was never killed
                check("node-3", 25.0, 45.0), // opened after the kill, checked before the next
                IdleCheck {
                    error: None,
                    ..check("node-2", 10.0, 30.0)
                },
            ],
            flaps: vec![flap_at(20.0)],
            ..Timeline::default()
        };
        let tally = t.tally("node-3");
        assert_eq!((tally.idle_checked, tally.during_flaps), (4, 1));
        assert_eq!(tally.unexpected_total(), 2);
    }

    #[test]
    fn bulk_failures_and_problems_are_never_expected() {
        let t = Timeline {
            transfers: vec![
                Transfer {
                    at: s(20.1),
                    bytes: 8 << 20,
                    error: None,
                },
                Transfer {
                    at: s(20.1),
                    bytes: 0,
                    error: Some("echo differs at byte 5".into()),
                },
            ],
            problems: vec![(s(40.0), "reload not counted".into())],
            flaps: vec![flap_at(20.0)],
            ..Timeline::default()
        };
        let tally = t.tally("node-3");
        assert_eq!((tally.bulk_transfers, tally.bulk_bytes), (1, 8 << 20));
        assert_eq!(tally.unexpected_total(), 2);
        assert_eq!(tally.flaps, 1);
        assert_eq!((tally.slowest_down_ms, tally.slowest_up_ms), (200, 2000));
    }
}
