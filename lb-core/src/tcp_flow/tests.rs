//! The flow machine's rules one by one, then a seeded simulation that drives it
//! against two peers with random read sizes, short writes and FIN orders.

use super::*;
use proptest::prelude::*;

const MS: Duration = Duration::from_millis(1);

fn config() -> TcpFlowConfig {
    TcpFlowConfig {
        half_close: true,
        idle_timeout: Duration::from_secs(60),
        clock_tick: Duration::ZERO,
        reset_on_idle: false,
        connect_timeout: Duration::from_secs(2),
        connect_attempts: 3,
        header_len: 0,
    }
}

fn drain(flow: &mut TcpFlow) -> Vec<Op> {
    std::iter::from_fn(|| flow.poll_op()).collect()
}

/// A flow accepted at `now`, its first operations drained.
fn accepted(config: TcpFlowConfig, now: Duration) -> TcpFlow {
    let mut flow = TcpFlow::new(config, now);
    drain(&mut flow);
    flow
}

/// A flow whose primary connect succeeded at `now`, its queue drained.
fn connected(config: TcpFlowConfig, now: Duration) -> TcpFlow {
    let mut flow = accepted(config, now);
    flow.handle_connected(0, ConnectResult::Connected, now);
    drain(&mut flow);
    flow
}

/// The read `from` a side, as the flow asks for it.
fn recv(from: Side) -> Op {
    Op::Recv { from }
}

/// The write of `start..end` of what was read from `from`, not corked.
fn send(from: Side, start: usize, end: usize) -> Op {
    Op::Send {
        from,
        start,
        end,
        more: false,
    }
}

/// Asserts that the flow's last operation was its close, as `how`, and
/// that it ended with `outcome`.
fn assert_closed(flow: &mut TcpFlow, how: Closing, outcome: Outcome) {
    assert_eq!(drain(flow), [Op::Close { how }]);
    assert_eq!(flow.poll_end().map(|e| e.outcome), Some(outcome));
}

#[test]
fn a_flow_connects_then_copies_both_ways_and_half_closes() {
    let t = Duration::from_secs(10);
    let mut flow = TcpFlow::new(config(), t);
    assert_eq!(
        drain(&mut flow),
        [Op::Connect { attempt: 0 }, recv(Side::Client)]
    );
    flow.handle_connected(0, ConnectResult::Connected, t);
    assert_eq!(drain(&mut flow), [recv(Side::Backend)]);

    flow.handle_received(Side::Client, Ok(5), t);
    assert_eq!(drain(&mut flow), [send(Side::Client, 0, 5)]);
    flow.handle_sent(Side::Client, Ok(5), t);
    assert_eq!(drain(&mut flow), [recv(Side::Client)]);

    // A short write is finished before the next read.
    flow.handle_received(Side::Backend, Ok(7), t);
    assert_eq!(drain(&mut flow), [send(Side::Backend, 0, 7)]);
    flow.handle_sent(Side::Backend, Ok(3), t);
    assert_eq!(drain(&mut flow), [send(Side::Backend, 3, 7)]);
    flow.handle_sent(Side::Backend, Ok(4), t);
    assert_eq!(drain(&mut flow), [recv(Side::Backend)]);

    // The client's FIN is passed on; the backend can still answer.
    flow.handle_received(Side::Client, Ok(0), t);
    assert_eq!(
        drain(&mut flow),
        [Op::Shutdown {
            side: Side::Backend
        }]
    );
    flow.handle_shut(Side::Backend, Ok(()));
    assert_eq!(drain(&mut flow), []);
    assert!(!flow.is_ended());

    // The backend's FIN completes the flow; the close sends it on.
    flow.handle_received(Side::Backend, Ok(0), t);
    assert_eq!(
        drain(&mut flow),
        [Op::Close {
            how: Closing::Close
        }]
    );
    assert_eq!(
        flow.poll_end(),
        Some(Ended {
            outcome: Outcome::Completed,
            to_backend: 5,
            from_backend: 7,
            connected_attempt: Some(0),
        })
    );
    assert_eq!(flow.poll_timeout(), None);
}

#[test]
fn without_half_close_the_first_fin_ends_the_flow() {
    let t = Duration::ZERO;
    let mut flow = connected(
        TcpFlowConfig {
            half_close: false,
            ..config()
        },
        t,
    );
    flow.handle_received(Side::Backend, Ok(0), t);
    assert_closed(&mut flow, Closing::Close, Outcome::Completed);
}

#[test]
fn a_fin_is_read_only_after_the_bytes_before_it_went() {
    let t = Duration::ZERO;
    let mut flow = connected(config(), t);
    flow.handle_received(Side::Backend, Ok(4), t);
    drain(&mut flow);
    // The FIN is only read after the write, so nothing can overtake it.
    flow.handle_received(Side::Backend, Ok(0), t);
    assert_eq!(
        drain(&mut flow),
        [],
        "a read answered while none was posted is stale"
    );
    flow.handle_sent(Side::Backend, Ok(4), t);
    assert_eq!(drain(&mut flow), [recv(Side::Backend)]);
    flow.handle_received(Side::Backend, Ok(0), t);
    assert_eq!(drain(&mut flow), [Op::Shutdown { side: Side::Client }]);
}

#[test]
fn client_bytes_wait_for_the_connect_and_then_the_header() {
    let t = Duration::ZERO;
    let mut flow = accepted(
        TcpFlowConfig {
            header_len: 10,
            ..config()
        },
        t,
    );
    flow.handle_received(Side::Client, Ok(6), t);
    assert_eq!(
        drain(&mut flow),
        [],
        "nothing to write to before the connect"
    );
    flow.handle_connected(0, ConnectResult::Connected, t);
    assert_eq!(
        drain(&mut flow),
        [Op::SendHeader { from: 0 }, recv(Side::Backend)]
    );
    flow.handle_header_sent(Ok(4), t);
    assert_eq!(drain(&mut flow), [Op::SendHeader { from: 4 }]);
    flow.handle_header_sent(Ok(6), t);
    assert_eq!(drain(&mut flow), [send(Side::Client, 0, 6)]);
    flow.handle_sent(Side::Client, Ok(6), t);
    assert_eq!(flow.moved, [6, 0], "the header is not counted");
}

#[test]
fn a_client_fin_before_the_connect_is_passed_on_after_it() {
    let t = Duration::ZERO;
    let mut flow = accepted(config(), t);
    flow.handle_received(Side::Client, Ok(0), t);
    assert_eq!(drain(&mut flow), []);
    flow.handle_connected(0, ConnectResult::Connected, t);
    assert_eq!(
        drain(&mut flow),
        [
            Op::Shutdown {
                side: Side::Backend
            },
            recv(Side::Backend)
        ]
    );
}

#[test]
fn a_failed_connect_moves_to_the_next_choice_until_none_is_left() {
    let t = Duration::ZERO;
    let mut flow = accepted(
        TcpFlowConfig {
            connect_attempts: 2,
            ..config()
        },
        t,
    );
    flow.handle_connected(0, ConnectResult::BackendFailed, t);
    assert_eq!(drain(&mut flow), [Op::Connect { attempt: 1 }]);
    flow.handle_connected(1, ConnectResult::BackendFailed, t);
    assert_eq!(
        drain(&mut flow),
        [Op::Close {
            how: Closing::Reset
        }]
    );
    let ended = flow.poll_end().unwrap();
    assert_eq!(ended.outcome, Outcome::Unreachable);
    assert_eq!(ended.connected_attempt, None);
}

#[test]
fn a_local_failure_sheds_the_client_without_trying_further() {
    let t = Duration::ZERO;
    let mut flow = accepted(config(), t);
    flow.handle_connected(0, ConnectResult::LocalFailed, t);
    assert_closed(&mut flow, Closing::Reset, Outcome::Shed);
}

#[test]
fn a_connect_that_times_out_is_abandoned_and_the_next_choice_tried() {
    let t = Duration::from_secs(100);
    let mut flow = accepted(config(), t);
    let deadline = t + config().connect_timeout;
    assert_eq!(flow.poll_timeout(), Some(deadline));
    flow.handle_timeout(deadline - MS);
    assert_eq!(drain(&mut flow), [], "not yet");
    flow.handle_timeout(deadline);
    assert_eq!(
        drain(&mut flow),
        [Op::Abandon { attempt: 0 }, Op::Connect { attempt: 1 }]
    );
    assert_eq!(
        flow.poll_timeout(),
        Some(deadline + config().connect_timeout)
    );
    // The abandoned attempt's late answer changes nothing.
    flow.handle_connected(0, ConnectResult::Connected, deadline + MS);
    assert_eq!(drain(&mut flow), []);
    flow.handle_connected(1, ConnectResult::Connected, deadline + MS);
    assert_eq!(drain(&mut flow), [recv(Side::Backend)]);
    flow.handle_received(Side::Backend, Ok(0), deadline + MS);
    drain(&mut flow);
    flow.handle_shut(Side::Client, Ok(()));
    flow.handle_received(Side::Client, Ok(0), deadline + MS);
    assert_eq!(flow.poll_end().unwrap().connected_attempt, Some(1));
}

#[test]
fn an_idle_flow_ends_with_a_fin_or_a_reset_as_configured() {
    for (reset_on_idle, how) in [(false, Closing::Graceful), (true, Closing::Reset)] {
        let t = Duration::from_secs(5);
        let idle = config().idle_timeout;
        let mut flow = connected(
            TcpFlowConfig {
                reset_on_idle,
                ..config()
            },
            t,
        );
        assert_eq!(flow.poll_timeout(), Some(t + idle));
        // Bytes moved push the deadline on.
        let later = t + Duration::from_secs(30);
        flow.handle_received(Side::Client, Ok(1), later);
        drain(&mut flow);
        assert_eq!(flow.poll_timeout(), Some(later + idle));
        flow.handle_timeout(t + idle);
        assert_eq!(drain(&mut flow), [], "quiet for less than the timeout");
        flow.handle_timeout(later + idle);
        assert_eq!(drain(&mut flow), [Op::Close { how }]);
        assert_eq!(flow.poll_end().unwrap().outcome, Outcome::IdleTimeout);
    }
}

#[test]
fn a_failure_on_either_side_resets_both_and_names_the_side() {
    let t = Duration::ZERO;
    let mut flow = connected(config(), t);
    flow.handle_received(Side::Client, Ok(3), t);
    drain(&mut flow);
    // The write to the backend failed: the backend's side failed.
    flow.handle_sent(Side::Client, Err(()), t);
    assert_closed(&mut flow, Closing::Reset, Outcome::Failed(Side::Backend));

    let mut flow = connected(config(), t);
    flow.handle_received(Side::Backend, Err(()), t);
    assert_closed(&mut flow, Closing::Reset, Outcome::Failed(Side::Backend));
}

#[test]
fn a_cut_sends_a_fin_both_ways_and_nothing_is_asked_after_the_close() {
    let t = Duration::ZERO;
    let mut flow = connected(config(), t);
    flow.handle_cut();
    assert_closed(&mut flow, Closing::Graceful, Outcome::Cut);
    flow.handle_received(Side::Client, Ok(9), t);
    flow.handle_received(Side::Backend, Ok(0), t);
    flow.handle_timeout(t + Duration::from_secs(3600));
    flow.handle_connected(0, ConnectResult::Connected, t);
    flow.handle_cut();
    assert_eq!(drain(&mut flow), []);
    assert_eq!(flow.poll_end().unwrap().outcome, Outcome::Cut);
}

#[test]
fn the_last_bytes_before_a_known_fin_are_corked_to_leave_with_it() {
    let t = Duration::ZERO;
    let mut flow = connected(config(), t);
    flow.handle_received_before_fin(Side::Backend, 9, t);
    assert_eq!(
        drain(&mut flow),
        [Op::Send {
            from: Side::Backend,
            start: 0,
            end: 9,
            more: true
        }]
    );
    // A short write: the rest is corked too.
    flow.handle_sent(Side::Backend, Ok(4), t);
    assert_eq!(
        drain(&mut flow),
        [Op::Send {
            from: Side::Backend,
            start: 4,
            end: 9,
            more: true
        }]
    );
    // Sent: the FIN the peek saw is passed on at once (it is all that is
    // left to read), no read asked for to collect it.
    flow.handle_sent(Side::Backend, Ok(5), t);
    assert_eq!(drain(&mut flow), [Op::Shutdown { side: Side::Client }]);
    flow.handle_shut(Side::Client, Ok(()));
    assert_eq!(drain(&mut flow), []);
    // Bytes read without that knowledge are not corked.
    flow.handle_received(Side::Client, Ok(2), t);
    assert_eq!(drain(&mut flow), [send(Side::Client, 0, 2)]);
}

/// Without half-close the FIN ends the flow with a close, and closing a
/// socket with unread input sends an RST that would drop corked bytes: the
/// last bytes go out plainly, then the FIN closes.
#[test]
fn without_half_close_the_last_bytes_are_not_corked() {
    let t = Duration::ZERO;
    let config = TcpFlowConfig {
        half_close: false,
        ..config()
    };
    let mut flow = connected(config, t);
    flow.handle_received_before_fin(Side::Backend, 9, t);
    assert_eq!(drain(&mut flow), [send(Side::Backend, 0, 9)]);
    flow.handle_sent(Side::Backend, Ok(9), t);
    assert_eq!(drain(&mut flow), [recv(Side::Backend)]);
    flow.handle_received(Side::Backend, Ok(0), t);
    assert_closed(&mut flow, Closing::Close, Outcome::Completed);
}

#[test]
fn the_idle_timeout_waits_one_clock_tick_more_so_it_is_never_early() {
    let tick = Duration::from_millis(4);
    let t = Duration::from_secs(1);
    let mut flow = connected(
        TcpFlowConfig {
            clock_tick: tick,
            ..config()
        },
        t,
    );
    let idle = config().idle_timeout;
    assert_eq!(flow.poll_timeout(), Some(t + idle + tick));
    flow.handle_timeout(t + idle);
    assert_eq!(drain(&mut flow), []);
    flow.handle_timeout(t + idle + tick);
    assert_eq!(flow.poll_end().unwrap().outcome, Outcome::IdleTimeout);
}

#[test]
fn timeouts_of_any_length_never_overflow() {
    let forever = Duration::MAX;
    let config = TcpFlowConfig {
        idle_timeout: forever,
        connect_timeout: forever,
        clock_tick: forever,
        ..config()
    };
    let t = Duration::from_secs(7);
    let mut flow = accepted(config, t);
    assert_eq!(flow.poll_timeout(), Some(Duration::MAX));
    flow.handle_connected(0, ConnectResult::Connected, t);
    assert_eq!(flow.poll_timeout(), Some(Duration::MAX));
    flow.handle_timeout(Duration::MAX - Duration::from_secs(1));
    assert!(!flow.is_ended());
}

#[test]
fn with_no_attempt_to_make_the_flow_is_unreachable_at_once() {
    let mut flow = TcpFlow::new(
        TcpFlowConfig {
            connect_attempts: 0,
            ..config()
        },
        Duration::ZERO,
    );
    assert_closed(&mut flow, Closing::Reset, Outcome::Unreachable);
}

#[test]
fn the_last_attempt_timing_out_abandons_it_and_ends_the_flow() {
    let t = Duration::ZERO;
    let mut flow = accepted(
        TcpFlowConfig {
            connect_attempts: 1,
            ..config()
        },
        t,
    );
    flow.handle_timeout(config().connect_timeout);
    assert_eq!(
        drain(&mut flow),
        [
            Op::Abandon { attempt: 0 },
            Op::Close {
                how: Closing::Reset
            }
        ]
    );
    assert_eq!(flow.poll_end().unwrap().outcome, Outcome::Unreachable);
}

#[test]
fn a_local_failure_after_a_backend_failure_still_sheds() {
    let t = Duration::ZERO;
    let mut flow = accepted(config(), t);
    flow.handle_connected(0, ConnectResult::BackendFailed, t);
    drain(&mut flow);
    flow.handle_connected(1, ConnectResult::LocalFailed, t);
    assert_closed(&mut flow, Closing::Reset, Outcome::Shed);
}

#[test]
fn while_connecting_a_cut_or_a_failed_client_ends_the_flow() {
    let t = Duration::ZERO;
    let mut flow = accepted(config(), t);
    flow.handle_cut();
    assert_eq!(
        drain(&mut flow),
        [Op::Close {
            how: Closing::Graceful
        }]
    );
    assert_eq!(flow.poll_end().unwrap().connected_attempt, None);

    let mut flow = accepted(config(), t);
    flow.handle_received(Side::Client, Err(()), t);
    assert_closed(&mut flow, Closing::Reset, Outcome::Failed(Side::Client));
    flow.handle_connected(0, ConnectResult::Connected, t);
    assert_eq!(drain(&mut flow), [], "the connect's late answer is stale");
}

#[test]
fn a_header_that_cannot_be_sent_fails_the_backend_side() {
    for answer in [Err(()), Ok(0), Ok(11)] {
        let t = Duration::ZERO;
        let mut flow = connected(
            TcpFlowConfig {
                header_len: 10,
                ..config()
            },
            t,
        );
        flow.handle_header_sent(answer, t);
        assert_eq!(
            drain(&mut flow),
            [Op::Close {
                how: Closing::Reset
            }],
            "{answer:?}"
        );
        assert_eq!(
            flow.poll_end().unwrap().outcome,
            Outcome::Failed(Side::Backend)
        );
    }
}

#[test]
fn a_write_answer_larger_than_what_was_asked_fails_rather_than_wraps() {
    let t = Duration::ZERO;
    let mut flow = connected(config(), t);
    flow.handle_received(Side::Client, Ok(4), t);
    drain(&mut flow);
    flow.handle_sent(Side::Client, Ok(3), t);
    drain(&mut flow);
    flow.handle_sent(Side::Client, Ok(usize::MAX), t);
    assert_closed(&mut flow, Closing::Reset, Outcome::Failed(Side::Backend));
}

/// Found by the proptest below in CI (`attempt to add with overflow`): two
/// reads answered with `usize::MAX` bytes each.
#[test]
fn a_bogus_read_count_saturates_the_byte_counter_rather_than_panics() {
    let t = Duration::ZERO;
    let mut flow = connected(config(), t);
    for _ in 0..2 {
        flow.handle_received(Side::Client, Ok(usize::MAX), t);
        drain(&mut flow);
        flow.handle_sent(Side::Client, Ok(usize::MAX), t);
        drain(&mut flow);
    }
    flow.handle_cut();
    drain(&mut flow);
    assert_eq!(flow.poll_end().unwrap().to_backend, u64::MAX);
}

#[test]
fn a_failed_shutdown_resets_both() {
    let t = Duration::ZERO;
    let mut flow = connected(config(), t);
    flow.handle_received(Side::Client, Ok(0), t);
    assert_eq!(
        drain(&mut flow),
        [Op::Shutdown {
            side: Side::Backend
        }]
    );
    flow.handle_shut(Side::Backend, Err(()));
    assert_closed(&mut flow, Closing::Reset, Outcome::Failed(Side::Backend));
}

/// The engine's side of the simulation: the two peers' byte streams, the
/// direction buffers, and the operations in flight.
struct Sim {
    /// What each peer sends, by [`Side::index`], and how much it has sent.
    streams: [Vec<u8>; 2],
    offered: [usize; 2],
    /// Whether each peer sends its FIN once its stream is out.
    fins: [bool; 2],
    /// What each peer has received, and whether its FIN came.
    received: [Vec<u8>; 2],
    fin_seen: [bool; 2],
    buffers: [Vec<u8>; 2],
    header_len: usize,
    /// Connect attempts that fail before one succeeds.
    failing_attempts: usize,
    /// Per peer (by the side that sends): its last read was reported as
    /// followed by its FIN.
    fin_promised: [bool; 2],
    /// Per receiving side: a corked write went to it, so only its FIN (or
    /// the close) may follow.
    corked: [bool; 2],
    /// Per peer: its FIN has been read.
    fin_read: [bool; 2],
    connected: bool,
    in_flight: Vec<Op>,
    closed: Option<Closing>,
}

const BUFFER: usize = 16;
/// What the simulated PROXY header is made of.
const HEADER_BYTE: u8 = 0xA5;

impl Sim {
    /// Whether `op` can complete: a read from a peer that has sent all it
    /// will and no FIN never does.
    fn can_complete(&self, op: &Op) -> bool {
        match *op {
            Op::Recv { from } => {
                let i = from.index();
                self.offered[i] < self.streams[i].len() || self.fins[i]
            }
            _ => true,
        }
    }

    /// Completes one of the in-flight operations that can complete, `pick`
    /// choosing which, with a read or write size drawn from `size`; false
    /// when none can.
    fn complete(&mut self, flow: &mut TcpFlow, pick: usize, size: usize, now: Duration) -> bool {
        let ready: Vec<usize> = (0..self.in_flight.len())
            .filter(|&i| self.can_complete(&self.in_flight[i]))
            .collect();
        if ready.is_empty() {
            return false;
        }
        let op = self.in_flight.swap_remove(ready[pick % ready.len()]);
        match op {
            Op::Connect { attempt } if attempt < self.failing_attempts => {
                flow.handle_connected(attempt, ConnectResult::BackendFailed, now);
            }
            Op::Connect { attempt } => {
                self.connected = true;
                flow.handle_connected(attempt, ConnectResult::Connected, now);
            }
            Op::SendHeader { from } => {
                let n = 1 + size % (flow.config.header_len - from);
                self.received[Side::Backend.index()].extend(std::iter::repeat_n(HEADER_BYTE, n));
                flow.handle_header_sent(Ok(n), now);
            }
            Op::Recv { from } => {
                let i = from.index();
                let left = self.streams[i].len() - self.offered[i];
                let n = if left == 0 {
                    0
                } else {
                    1 + size % left.min(BUFFER)
                };
                let at = self.offered[i];
                self.buffers[i][..n].copy_from_slice(&self.streams[i][at..at + n]);
                self.offered[i] += n;
                self.fin_read[i] |= n == 0;
                // Sometimes the engine knows the FIN is next (it peeked).
                let fin_next = n > 0 && self.offered[i] == self.streams[i].len() && self.fins[i];
                if fin_next && (size >> 7) & 1 == 1 {
                    self.fin_promised[i] = true;
                    flow.handle_received_before_fin(from, n, now);
                } else {
                    flow.handle_received(from, Ok(n), now);
                }
            }
            Op::Send {
                from,
                start,
                end,
                more,
            } => {
                let n = 1 + size % (end - start);
                let to = from.other().index();
                assert!(!self.fin_seen[to], "bytes after the FIN");
                if more {
                    assert!(self.fin_promised[from.index()], "corked with no FIN known");
                    self.corked[to] = true;
                } else {
                    assert!(!self.corked[to], "bytes after a write corked for the FIN");
                }
                let bytes = self.buffers[from.index()][start..start + n].to_vec();
                self.received[to].extend_from_slice(&bytes);
                flow.handle_sent(from, Ok(n), now);
            }
            Op::Shutdown { side } => {
                assert_eq!(
                    self.received[side.index()],
                    self.expected(side),
                    "a FIN passed on before every byte before it"
                );
                self.fin_seen[side.index()] = true;
                self.corked[side.index()] = false;
                flow.handle_shut(side, Ok(()));
            }
            Op::Abandon { .. } | Op::Close { .. } => unreachable!("never in flight"),
        }
        true
    }

    /// Everything `side` should receive: the other peer's stream, after the
    /// PROXY header for the backend.
    fn expected(&self, side: Side) -> Vec<u8> {
        let mut bytes = match side {
            Side::Backend => vec![HEADER_BYTE; self.header_len],
            Side::Client => Vec::new(),
        };
        bytes.extend_from_slice(&self.streams[side.other().index()]);
        bytes
    }

    fn take_ops(&mut self, flow: &mut TcpFlow) {
        while let Some(op) = flow.poll_op() {
            assert!(self.closed.is_none(), "{op:?} after the close");
            let on_backend = matches!(
                op,
                Op::SendHeader { .. }
                    | Op::Recv {
                        from: Side::Backend
                    }
                    | Op::Send {
                        from: Side::Client,
                        ..
                    }
                    | Op::Shutdown {
                        side: Side::Backend
                    }
            );
            assert!(!on_backend || self.connected, "{op:?} before the connect");
            match op {
                Op::Close { how } => self.closed = Some(how),
                Op::Abandon { .. } => unreachable!("no connect times out here"),
                op => self.in_flight.push(op),
            }
        }
    }
}

/// A peer's bytes: often none at all, where the orderings around a FIN that
/// comes first are.
fn stream() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => Just(Vec::new()),
        3 => proptest::collection::vec(any::<u8>(), 1..200),
    ]
}

proptest! {
    /// Whatever the read sizes, short writes and the order completions come
    /// in: every byte reaches the other side in order and is counted, each FIN
    /// passes only after the bytes before it, and the flow ends exactly once,
    /// as its FINs say.
    #[test]
    fn bytes_and_fins_pass_in_order_whatever_the_completions(
        client in stream(),
        backend in stream(),
        fins in (any::<bool>(), any::<bool>()),
        half_close in any::<bool>(),
        header_len in 0usize..40,
        failing_attempts in prop_oneof![3 => Just(0usize), 1 => 1usize..4],
        draws in proptest::collection::vec((any::<usize>(), any::<usize>()), 2000),
    ) {
        let config = TcpFlowConfig { half_close, header_len, ..config() };
        let mut flow = TcpFlow::new(config, Duration::ZERO);
        let mut sim = Sim {
            streams: [client.clone(), backend.clone()],
            offered: [0; 2],
            fins: [fins.0, fins.1],
            received: [Vec::new(), Vec::new()],
            fin_seen: [false; 2],
            buffers: [vec![0; BUFFER], vec![0; BUFFER]],
            header_len,
            failing_attempts,
            fin_promised: [false; 2],
            corked: [false; 2],
            fin_read: [false; 2],
            connected: false,
            in_flight: Vec::new(),
            closed: None,
        };
        sim.take_ops(&mut flow);
        for (k, &(pick, size)) in draws.iter().enumerate() {
            if sim.closed.is_some() {
                break;
            }
            let progressed = sim.complete(&mut flow, pick, size, MS * k as u32);
            sim.take_ops(&mut flow);
            if !progressed {
                break;
            }
        }
        let (cfin, bfin) = fins;
        let ended = flow.poll_end();
        // Read counts are what each peer offered; the simulation's own record
        // of what it handed over, not the machine's.
        let offered = [sim.offered[0] as u64, sim.offered[1] as u64];
        if failing_attempts >= config.connect_attempts {
            prop_assert_eq!(sim.closed, Some(Closing::Reset));
            prop_assert_eq!(ended.map(|e| e.outcome), Some(Outcome::Unreachable));
            prop_assert!(sim.received[1].is_empty(), "bytes reached no backend");
            return Ok(());
        }
        prop_assert_eq!(ended.and_then(|e| e.connected_attempt).unwrap_or(failing_attempts), failing_attempts);
        if half_close {
            if cfin && bfin {
                prop_assert_eq!(sim.closed, Some(Closing::Close));
                prop_assert_eq!(ended.map(|e| e.outcome), Some(Outcome::Completed));
                // Each FIN went on (the last one by the close itself).
                prop_assert_eq!(&sim.received[1], &sim.expected(Side::Backend));
                prop_assert_eq!(&sim.received[0], &sim.expected(Side::Client));
            } else {
                prop_assert!(sim.closed.is_none(), "a flow with an open direction ended");
                // A side whose peer sent its FIN got everything, then the FIN.
                prop_assert_eq!(sim.fin_seen[1], cfin);
                prop_assert_eq!(sim.fin_seen[0], bfin);
                prop_assert_eq!(&sim.received[1], &sim.expected(Side::Backend));
                prop_assert_eq!(&sim.received[0], &sim.expected(Side::Client));
            }
        } else if cfin || bfin {
            prop_assert_eq!(sim.closed, Some(Closing::Close));
            prop_assert_eq!(ended.map(|e| e.outcome), Some(Outcome::Completed));
            // A FIN that was read ended the flow, and only after every byte
            // before it had gone (which of two read FINs went first is the
            // header's and the completions' order, not the simulation's to say).
            let delivered = |from: Side| {
                sim.fin_read[from.index()]
                    && sim.received[from.other().index()] == sim.expected(from.other())
            };
            prop_assert!(delivered(Side::Client) || delivered(Side::Backend));
        } else {
            prop_assert!(sim.closed.is_none());
        }
        if let Some(e) = ended {
            prop_assert_eq!([e.to_backend, e.from_backend], offered);
        } else {
            prop_assert_eq!(flow.moved, offered);
        }
    }
}

/// One event an engine (right or wrong) may feed a flow.
#[derive(Debug, Clone)]
enum Event {
    Connected(usize, u8),
    HeaderSent(Option<usize>),
    Received(bool, Option<usize>),
    ReceivedBeforeFin(bool, usize),
    Sent(bool, Option<usize>),
    Shut(bool, bool),
    Timeout(u64),
    Cut,
}

fn event() -> impl Strategy<Value = Event> {
    let size = prop_oneof![0usize..40, Just(usize::MAX), any::<usize>()];
    prop_oneof![
        // Mostly the first attempt connecting, so the copy's states are reached.
        2 => (prop_oneof![3 => Just(0usize), 1 => 0usize..4], prop_oneof![3 => Just(0u8), 1 => 0u8..3])
            .prop_map(|(a, r)| Event::Connected(a, r)),
        1 => proptest::option::of(size.clone()).prop_map(Event::HeaderSent),
        2 => (any::<bool>(), proptest::option::of(size.clone()))
            .prop_map(|(c, n)| Event::Received(c, n)),
        1 => (any::<bool>(), size.clone()).prop_map(|(c, n)| Event::ReceivedBeforeFin(c, n)),
        2 => (any::<bool>(), proptest::option::of(size)).prop_map(|(c, n)| Event::Sent(c, n)),
        1 => (any::<bool>(), any::<bool>()).prop_map(|(c, ok)| Event::Shut(c, ok)),
        1 => prop_oneof![0u64..10, Just(u64::MAX)].prop_map(Event::Timeout),
        1 => Just(Event::Cut),
    ]
}

proptest! {
    /// Whatever an engine feeds it, stale, out of order, oversized or after
    /// the end, with timeouts of any length: the machine never panics, asks
    /// for nothing after its close, closes at most once, and has a timer
    /// exactly while it has not ended.
    #[test]
    fn no_sequence_of_events_makes_it_panic_or_ask_after_its_close(
        half_close in any::<bool>(),
        header_len in 0usize..8,
        attempts in 0usize..3,
        long in any::<bool>(),
        events in proptest::collection::vec(event(), 0..60),
    ) {
        let timeout = if long { Duration::MAX } else { Duration::from_secs(3) };
        let config = TcpFlowConfig {
            half_close,
            idle_timeout: timeout,
            clock_tick: Duration::from_millis(4),
            reset_on_idle: long,
            connect_timeout: timeout,
            connect_attempts: attempts,
            header_len,
        };
        let side = |client: bool| if client { Side::Client } else { Side::Backend };
        let mut now = Duration::ZERO;
        let mut flow = TcpFlow::new(config, now);
        let mut closes = 0;
        let take = |flow: &mut TcpFlow, closes: &mut usize| -> Result<(), TestCaseError> {
            while let Some(op) = flow.poll_op() {
                prop_assert_eq!(*closes, 0, "{:?} after the close", op);
                if matches!(op, Op::Close { .. }) {
                    *closes += 1;
                }
            }
            prop_assert_eq!(flow.poll_timeout().is_none(), flow.is_ended());
            prop_assert_eq!(*closes == 1, flow.is_ended());
            Ok(())
        };
        take(&mut flow, &mut closes)?;
        for e in events {
            match e {
                Event::Connected(a, r) => {
                    let r = [ConnectResult::Connected, ConnectResult::BackendFailed, ConnectResult::LocalFailed][r as usize];
                    flow.handle_connected(a, r, now);
                }
                Event::HeaderSent(n) => flow.handle_header_sent(n.ok_or(()), now),
                Event::Received(c, n) => flow.handle_received(side(c), n.ok_or(()), now),
                Event::ReceivedBeforeFin(c, n) => flow.handle_received_before_fin(side(c), n, now),
                Event::Sent(c, n) => flow.handle_sent(side(c), n.ok_or(()), now),
                Event::Shut(c, ok) => flow.handle_shut(side(c), if ok { Ok(()) } else { Err(()) }),
                Event::Timeout(s) => {
                    now = now.saturating_add(Duration::from_secs(s));
                    flow.handle_timeout(now);
                }
                Event::Cut => flow.handle_cut(),
            }
            take(&mut flow, &mut closes)?;
        }
    }
}
