//! Fuzzes lb-core's UDP flow table with arbitrary sequences of what a worker
//! feeds it: client datagrams (plain or QUIC-routed), backend replies on flow
//! ids it was given (possibly stale), snapshots (health changes and reloads
//! that add or remove backends, announced or carried by the next datagram),
//! timer ticks and closes.
//!
//! Input layout: byte 0 is the capacity (0..=15, 0 meaning 1), byte 1 the idle
//! timeout in seconds (1..=16); then one op per group of bytes (see `Op::read`).
//! Time only moves forward, by a byte's worth of seconds per op.
//!
//! Properties checked after every op:
//! - nothing panics;
//! - `len() <= capacity`, and the stats balance: created - ended = active;
//! - a decision's flow is live on the backend it names, under its key;
//! - every flow that ended (an `Ended` event, an eviction, a refusal's
//!   `ended`) has a stale id afterwards, and a stale id is ignored;
//! - `poll_timeout` is the earliest deadline of the live flows, never past;
//!   every live flow is the latest one a decision gave for its key.

#![no_main]

use std::net::SocketAddr;
use std::time::Duration;

use lb_core::{
    BackendSet, BackendSpec, FlowDecision, FlowEvent, FlowId, FlowKey, NoHealthyBackends, Snapshot,
    SnapshotParams, UdpFlowConfig, UdpFlowTable,
};
use libfuzzer_sys::fuzz_target;

/// Backend names a snapshot picks from by bit mask (sorted, so ids shift as sets change).
const NAMES: [&str; 4] = ["a", "b", "c", "d"];
/// Distinct client ports, so flows collide with each other often.
const PORTS: u8 = 16;

fuzz_target!(|data: &[u8]| {
    let [capacity, idle, rest @ ..] = data else {
        return;
    };
    let config = UdpFlowConfig {
        capacity: usize::from(capacity & 0x0f),
        idle_timeout: Duration::from_secs(u64::from(idle & 0x0f) + 1),
    };
    let mut run = Run::new(config);
    let mut bytes = rest.iter().copied();
    while let Some(op) = Op::read(&mut bytes) {
        run.step(op);
        run.check();
    }
});

#[derive(Debug, Clone, Copy)]
enum Op {
    Datagram {
        port: u8,
        dt: u8,
    },
    Routed {
        port: u8,
        backend: u8,
        dt: u8,
    },
    Reply {
        port: u8,
        dt: u8,
    },
    Snapshot {
        set: u8,
        health: u8,
        announce: bool,
        route_all: bool,
        dt: u8,
    },
    Timeout {
        dt: u8,
    },
    Close {
        port: u8,
    },
}

impl Op {
    /// One op from the front of `bytes`: a tag byte, then its operands.
    fn read(bytes: &mut impl Iterator<Item = u8>) -> Option<Op> {
        let tag = bytes.next()?;
        let mut next = || bytes.next();
        Some(match tag % 6 {
            0 => Op::Datagram {
                port: next()? % PORTS,
                dt: next()?,
            },
            1 => Op::Routed {
                port: next()? % PORTS,
                backend: next()?,
                dt: next()?,
            },
            2 => Op::Reply {
                port: next()? % PORTS,
                dt: next()?,
            },
            3 => {
                let (masks, flags) = (next()?, next()?);
                Op::Snapshot {
                    set: masks & 0x0f,
                    health: masks >> 4,
                    announce: flags & 1 != 0,
                    route_all: flags & 2 != 0,
                    dt: flags >> 2,
                }
            }
            4 => Op::Timeout { dt: next()? },
            _ => Op::Close {
                port: next()? % PORTS,
            },
        })
    }
}

/// The table, the snapshot a worker would load now, and what it was told.
struct Run {
    table: UdpFlowTable,
    snapshot: Snapshot,
    now: Duration,
    /// Per port, the last flow id a decision gave for it.
    ids: [Option<FlowId>; PORTS as usize],
    /// Flows this run saw end: each must stay stale.
    ended: Vec<FlowId>,
}

impl Run {
    fn new(config: UdpFlowConfig) -> Self {
        let snapshot = build(1, 0b0111, 0b0111, false);
        let mut table = UdpFlowTable::new(config, [1, 2, 3, 4]);
        table.handle_snapshot(&snapshot, Duration::ZERO);
        Run {
            table,
            snapshot,
            now: Duration::ZERO,
            ids: [None; PORTS as usize],
            ended: Vec::new(),
        }
    }

    fn step(&mut self, op: Op) {
        match op {
            Op::Datagram { port, dt } => {
                let now = self.tick(dt);
                let d = self.table.handle_datagram(&key(port), &self.snapshot, now);
                self.decided(port, d);
            }
            Op::Routed { port, backend, dt } => {
                let now = self.tick(dt);
                let backend = u32::from(backend % 5); // 4 may be out of range: must not panic.
                let d = self
                    .table
                    .handle_routed(&key(port), backend, &self.snapshot, now);
                self.decided(port, d);
            }
            Op::Reply { port, dt } => {
                let now = self.tick(dt);
                match self.ids[usize::from(port)] {
                    Some(flow) => {
                        let live = self.table.handle_reply(flow, now);
                        assert_eq!(
                            live,
                            self.table.get(flow).is_some(),
                            "a reply keeps only a live flow"
                        );
                    }
                    // The time passes for the table too: the check below relies on it.
                    None => self.table.handle_timeout(now),
                }
            }
            Op::Snapshot {
                set,
                health,
                announce,
                route_all,
                dt,
            } => {
                let now = self.tick(dt);
                self.snapshot = build(self.snapshot.generation() + 1, set, health, route_all);
                if announce {
                    self.table.handle_snapshot(&self.snapshot, now);
                } else {
                    // The next datagram brings it; the time passes now.
                    self.table.handle_timeout(now);
                }
            }
            Op::Timeout { dt } => {
                let now = self.tick(dt);
                self.table.handle_timeout(now);
            }
            Op::Close { port } => {
                if let Some(flow) = self.ids[usize::from(port)] {
                    let was_live = self.table.get(flow).copied();
                    assert_eq!(self.table.close(flow), was_live);
                }
            }
        }
        self.drain_events();
    }

    fn tick(&mut self, dt: u8) -> Duration {
        self.now += Duration::from_secs(u64::from(dt % 32));
        self.now
    }

    /// Checks one decision against the table right after it.
    fn decided(&mut self, port: u8, d: FlowDecision) {
        let (flow, backend) = match d {
            FlowDecision::Existing { flow, backend } => (flow, backend),
            FlowDecision::New {
                flow,
                backend,
                evicted,
            } => {
                self.ended.extend(evicted);
                (flow, backend)
            }
            FlowDecision::Moved { flow, to, .. } => (flow, to),
            FlowDecision::Refused { ended } => {
                self.ended.extend(ended);
                assert_eq!(
                    self.table.lookup(&key(port)),
                    None,
                    "a refused key has no flow"
                );
                return;
            }
        };
        let entry = self.table.get(flow).expect("a decision's flow is live");
        assert_eq!((entry.key, entry.backend), (key(port), backend));
        assert_eq!(entry.last_seen, self.now);
        assert!(
            self.snapshot.backend(backend).is_some(),
            "the backend is in the snapshot"
        );
        assert_eq!(self.table.lookup(&key(port)), Some(flow));
        assert!(flow.slot() < self.table.config().capacity);
        self.ids[usize::from(port)] = Some(flow);
    }

    /// Drains the events of one call. A flow a snapshot moved may have been
    /// evicted later in the same call (by the datagram's new flow): then its
    /// end follows its move.
    fn drain_events(&mut self) {
        let events: Vec<FlowEvent> = std::iter::from_fn(|| self.table.poll_event()).collect();
        for (i, e) in events.iter().enumerate() {
            match *e {
                FlowEvent::Ended { flow, key, .. } => {
                    assert_ne!(self.table.lookup(&key), Some(flow));
                    self.ended.push(flow);
                }
                FlowEvent::Moved { flow, key, to, .. } => match self.table.get(flow) {
                    Some(entry) => assert_eq!((entry.key, entry.backend), (key, to)),
                    None => assert!(
                        events[i + 1..].iter().any(
                            |later| matches!(later, FlowEvent::Ended { flow: f, .. } if *f == flow)
                        ),
                        "a moved flow is live, or ended after its move"
                    ),
                },
            }
        }
    }

    fn check(&self) {
        let t = &self.table;
        assert!(t.len() <= t.config().capacity);
        let s = t.stats();
        let ended = s.expired + s.evicted + s.ended_no_backend + s.closed;
        assert_eq!(s.created - ended, s.active as u64);
        assert_eq!(s.active, t.len());
        for flow in &self.ended {
            assert_eq!(t.get(*flow), None, "an ended flow's id is stale");
        }
        // Every live flow is the latest one decided for its port.
        let live: Vec<_> = self
            .ids
            .iter()
            .flatten()
            .filter_map(|f| t.get(*f))
            .collect();
        assert_eq!(live.len(), t.len());
        let deadline = live
            .iter()
            .map(|e| e.last_seen + t.config().idle_timeout)
            .min();
        assert_eq!(t.poll_timeout(), deadline);
        // The table was told `now`: nothing idle for the timeout is left.
        assert!(deadline.is_none_or(|at| at > self.now));
    }
}

fn key(port: u8) -> FlowKey {
    FlowKey::udp(
        SocketAddr::from(([127, 0, 0, 2], 40_000 + u16::from(port))),
        SocketAddr::from(([127, 0, 0, 1], 53)),
    )
}

/// A snapshot over the backends `set` names, healthy as `health` says.
fn build(generation: u64, set: u8, health: u8, route_all: bool) -> Snapshot {
    let specs = (0..NAMES.len()).filter(|i| set & (1 << i) != 0).map(|i| {
        BackendSpec::new(
            NAMES[i],
            SocketAddr::from(([127, 0, 1, i as u8 + 1], 80)),
            1,
        )
    });
    let backends = BackendSet::new(specs.collect()).expect("distinct names");
    let healthy = backends
        .iter()
        .map(|b| {
            NAMES
                .iter()
                .position(|n| *n == b.name)
                .is_some_and(|i| health & (1 << i) != 0)
        })
        .collect();
    let params = SnapshotParams {
        table_size: 251,
        no_healthy_backends: if route_all {
            NoHealthyBackends::RouteAll
        } else {
            NoHealthyBackends::Refuse
        },
        ..SnapshotParams::default()
    };
    Snapshot::build(generation, params, backends, healthy).expect("valid snapshot")
}
