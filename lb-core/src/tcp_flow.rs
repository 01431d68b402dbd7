//! One TCP flow's decisions for a completion-driven engine (io_uring): which
//! of the flow's choices to connect to and when to give up on one, when the
//! PROXY header goes out, which reads and writes to post on each side, how an
//! end of stream passes on (half-close, or the first FIN ends the flow), the
//! connect and idle timeouts, and how the flow's sockets close.
//!
//! The engine owns the sockets, one buffer per direction and the operations in
//! flight; this machine owns every decision about them, as quinn-proto's
//! `Connection` does: events go in (`handle_*`, each with `now`), operations
//! come out ([`TcpFlow::poll_op`]), with [`TcpFlow::poll_timeout`] for the one
//! timer a flow needs and [`TcpFlow::poll_end`] for how it ended and the bytes
//! moved each way. Nothing here reads a clock; nothing is allocated after
//! [`TcpFlow::new`].
//!
//! The rules are the ones lb-proxy's readiness-driven copy keeps
//! (`lb-proxy/src/tcp/copy.rs` and `proxy.rs`), with the differences named:
//! - bytes each way are passed on in order, each direction one read then one
//!   write at a time (the write repeated until the read is passed on whole),
//!   and counted as they are read, as the readiness-driven copy counts them;
//! - unlike that copy, the client is read while the connect is in flight (a
//!   completion engine has the read posted anyway); what is read waits for
//!   the connect, and for the PROXY header, which goes first and is not
//!   counted; a client that fails meanwhile ends the flow without a connect;
//! - a FIN is passed on (`shutdown(SHUT_WR)`) only after every byte before it;
//!   with half-close the other direction carries on, and the flow completes
//!   when both have passed their FIN (the last `shutdown` is left to the close,
//!   which sends the same FIN); without it the first FIN passed on ends the flow;
//! - a connect that fails, is refused or times out moves to the next choice,
//!   up to the frontend's attempts; one that fails for this machine's reasons
//!   (fds, memory, ports) sheds the client, since every choice would fail alike;
//! - a flow with no byte moved either way for the idle timeout ends, with a
//!   reset both ways where `tcp_reset_on_idle` asks, else a FIN both ways;
//!   never early on a clock whose readings err by up to
//!   [`TcpFlowConfig::clock_tick`] (the coarse clock's tick);
//! - a failure on either side resets both; a cut (drain, a zone going down)
//!   sends a FIN both ways. The engine reports the cut
//!   ([`TcpFlow::handle_cut`]) before it touches the sockets, so the cut is
//!   how the flow ends, not the errors it causes.
//!
//! - with half-close, the last bytes before a FIN leave in one segment with
//!   it, as the readiness-driven copy sends them: where the engine knows the
//!   FIN comes next ([`TcpFlow::handle_received_before_fin`]), their write is
//!   corked (not without half-close, where that FIN ends the flow with a
//!   close that may reset what is still corked).
//!
//! Deadlines saturate: a timeout of any length never overflows. Not modelled:
//! the cross-zone delay line (an engine driving this machine serves hops
//! within a zone).

use std::time::Duration;

/// One side of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    Client,
    Backend,
}

impl Side {
    /// The side across the flow.
    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Backend,
            Side::Backend => Side::Client,
        }
    }

    fn index(self) -> usize {
        match self {
            Side::Client => 0,
            Side::Backend => 1,
        }
    }
}

/// How a frontend's flows behave, from its validated config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpFlowConfig {
    /// Pass each FIN on and keep the other direction open (Azure's and
    /// HAProxy's behaviour); off, the first FIN ends the flow (nginx stream's).
    pub half_close: bool,
    /// No byte either way for this long ends the flow.
    pub idle_timeout: Duration,
    /// How far two readings of the caller's clock may make an interval look
    /// longer than it was (the coarse clock's tick; zero for a precise
    /// clock). The idle timeout waits this much longer, so it is never early.
    pub clock_tick: Duration,
    /// An idle flow ends with a reset both ways rather than a FIN.
    pub reset_on_idle: bool,
    /// How long one connect may take before the next choice is tried,
    /// counted from when its [`Op::Connect`] is asked for.
    pub connect_timeout: Duration,
    /// Choices tried at most: the primary and its fallbacks (at least 1).
    pub connect_attempts: usize,
    /// Length of the PROXY header to send the backend before any client byte
    /// (0: none).
    pub header_len: usize,
}

/// How a connect attempt went, as the engine tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectResult {
    Connected,
    /// The backend's doing (refused, unreachable, reset), or the choice had
    /// no target: try the next choice.
    BackendFailed,
    /// This machine's doing (fds, memory, local ports): every choice would
    /// fail alike, so the client is shed.
    LocalFailed,
}

/// What the engine should do next. Each operation except [`Op::Close`] and
/// [`Op::Abandon`] is answered by exactly one `handle_*` call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Connect to the flow's choice number `attempt` (0: its primary);
    /// answered by [`TcpFlow::handle_connected`].
    Connect { attempt: usize },
    /// Give up attempt `attempt` (its connect timed out): cancel it and close
    /// its socket. Its completion, if one still comes, is stale.
    Abandon { attempt: usize },
    /// Send the PROXY header from byte `from` to the backend; answered by
    /// [`TcpFlow::handle_header_sent`].
    SendHeader { from: usize },
    /// Read from `from` into that direction's buffer (from its start);
    /// answered by [`TcpFlow::handle_received`].
    Recv { from: Side },
    /// Write bytes `start..end` of the buffer read from `from` to the other
    /// side; answered by [`TcpFlow::handle_sent`]. With `more`, `from`'s FIN
    /// is known to come next: write with `MSG_MORE`, so the FIN passed on
    /// next leaves in the same segment as these bytes.
    Send {
        from: Side,
        start: usize,
        end: usize,
        more: bool,
    },
    /// `shutdown(SHUT_WR)` on `side`, passing on its peer's FIN; answered by
    /// [`TcpFlow::handle_shut`].
    Shutdown { side: Side },
    /// Cancel what is in flight on both sockets and close them as `how` says.
    /// The last operation of a flow.
    Close { how: Closing },
}

/// How the flow's sockets close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closing {
    /// close(2): a FIN after a clean end (the kernel's RST where input is
    /// still unread, as after the first FIN without half-close).
    Close,
    /// `shutdown(SHUT_WR)`, then close: a FIN both ways.
    Graceful,
    /// `SO_LINGER` 0, then close: an RST both ways.
    Reset,
}

/// Why a flow ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Both FINs passed on (without half-close: the first).
    Completed,
    /// Nothing moved for the idle timeout.
    IdleTimeout,
    /// A read, write or shutdown failed on this side.
    Failed(Side),
    /// Every attempt failed or timed out, or there were no attempts to make.
    Unreachable,
    /// This machine could not connect (fds, memory, ports).
    Shed,
    /// Cut from outside: drain, or the hop's zone going down (a FIN both ways).
    Cut,
}

impl Outcome {
    /// How the sockets close after this ending.
    fn closing(self, reset_on_idle: bool) -> Closing {
        match self {
            Outcome::Completed => Closing::Close,
            Outcome::Cut => Closing::Graceful,
            Outcome::IdleTimeout if reset_on_idle => Closing::Reset,
            Outcome::IdleTimeout => Closing::Graceful,
            Outcome::Failed(_) | Outcome::Unreachable | Outcome::Shed => Closing::Reset,
        }
    }
}

/// How a flow ended and what it moved, for its metrics and flow-log record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ended {
    pub outcome: Outcome,
    /// Bytes read from the client to pass on (the PROXY header not counted).
    pub to_backend: u64,
    /// Bytes read from the backend to pass on.
    pub from_backend: u64,
    /// The attempt that connected, if one did.
    pub connected_attempt: Option<usize>,
}

/// Where one direction is: one read, then writes until it is passed on whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    /// Nothing posted; a read may go out.
    Idle,
    /// A read is in flight.
    Receiving,
    /// `sent..filled` of the buffer waits to be written.
    Holding { sent: usize, filled: usize },
    /// A write of `sent..filled` is in flight.
    Sending { sent: usize, filled: usize },
    /// The source's FIN arrived after everything before it was passed on.
    Fin,
    /// The FIN's shutdown is in flight.
    ShuttingDown,
    /// The FIN is passed on (or left to the close).
    Done,
}

/// Where the connect is (kept as it was when the flow ends: whether the flow
/// has ended is `ended`'s to say).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Attempt `attempt` is in flight until `deadline`.
    Connecting {
        attempt: usize,
        deadline: Duration,
    },
    Connected {
        attempt: usize,
    },
}

/// Where the PROXY header is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Header {
    /// `sent` of its bytes have gone; a send may go out.
    Pending {
        sent: usize,
    },
    /// A send is in flight.
    Sending {
        sent: usize,
    },
    Done,
}

/// The most operations a flow asks for between two `poll_op` drains: a read
/// and a write each way, the header, a connect and an abandon, and the close.
const QUEUE: usize = 8;

/// One TCP flow's decisions; see the module documentation.
#[derive(Debug)]
pub struct TcpFlow {
    config: TcpFlowConfig,
    phase: Phase,
    header: Header,
    /// Indexed by the side each direction reads from ([`Side::index`]).
    dirs: [Dir; 2],
    /// Per direction: its FIN is known to follow the bytes it holds.
    fin_next: [bool; 2],
    moved: [u64; 2],
    last_activity: Duration,
    ops: [Option<Op>; QUEUE],
    head: usize,
    len: usize,
    ended: Option<Ended>,
}

impl TcpFlow {
    /// A flow accepted at `now`: its first operations are the connect to its
    /// primary choice and a read from the client.
    pub fn new(config: TcpFlowConfig, now: Duration) -> TcpFlow {
        let mut flow = TcpFlow {
            config,
            // The first attempt's, as `attempt(0, ..)` below sets it (or
            // leaves it, with no attempt to make, for the end it leads to).
            phase: Phase::Connecting {
                attempt: 0,
                deadline: now.saturating_add(config.connect_timeout),
            },
            header: if config.header_len == 0 {
                Header::Done
            } else {
                Header::Pending { sent: 0 }
            },
            dirs: [Dir::Idle; 2],
            fin_next: [false; 2],
            moved: [0; 2],
            last_activity: now,
            ops: [None; QUEUE],
            head: 0,
            len: 0,
            ended: None,
        };
        flow.attempt(0, now);
        flow.pump();
        flow
    }

    /// The next operation to carry out, in order. Drain them after every
    /// `handle_*` call.
    pub fn poll_op(&mut self) -> Option<Op> {
        if self.len == 0 {
            return None;
        }
        let op = self.ops[self.head].take();
        self.head = (self.head + 1) % QUEUE;
        self.len -= 1;
        op
    }

    /// When [`TcpFlow::handle_timeout`] should next be called: the connect's
    /// deadline, else the idle timeout's; `None` once the flow has ended.
    pub fn poll_timeout(&self) -> Option<Duration> {
        if self.is_ended() {
            return None;
        }
        match self.phase {
            Phase::Connecting { deadline, .. } => Some(deadline),
            Phase::Connected { .. } => Some(self.idle_deadline()),
        }
    }

    /// How the flow ended, once it has (its [`Op::Close`] is queued then).
    pub fn poll_end(&self) -> Option<Ended> {
        self.ended
    }

    /// Whether the flow has ended.
    pub fn is_ended(&self) -> bool {
        self.ended.is_some()
    }

    /// The answer to [`Op::Connect`] for `attempt`. A stale answer (for an
    /// abandoned attempt, or after the end) is ignored.
    pub fn handle_connected(&mut self, attempt: usize, result: ConnectResult, now: Duration) {
        let current = matches!(self.phase, Phase::Connecting { attempt: a, .. } if a == attempt);
        if self.is_ended() || !current {
            return;
        }
        match result {
            ConnectResult::Connected => {
                self.phase = Phase::Connected { attempt };
                self.last_activity = now;
            }
            ConnectResult::BackendFailed => self.attempt(attempt + 1, now),
            ConnectResult::LocalFailed => self.end(Outcome::Shed),
        }
        self.pump();
    }

    /// The answer to [`Op::SendHeader`]: `Ok(n)` bytes went.
    pub fn handle_header_sent(&mut self, result: Result<usize, ()>, now: Duration) {
        let Header::Sending { sent } = self.header else {
            return;
        };
        if self.is_ended() {
            return;
        }
        match result {
            Ok(n) if n > 0 && n <= self.config.header_len - sent => {
                let sent = sent + n;
                self.header = if sent >= self.config.header_len {
                    Header::Done
                } else {
                    Header::Pending { sent }
                };
                self.last_activity = now;
            }
            _ => self.end(Outcome::Failed(Side::Backend)),
        }
        self.pump();
    }

    /// The answer to [`Op::Recv`] from `from`: `Ok(0)` is its FIN.
    pub fn handle_received(&mut self, from: Side, result: Result<usize, ()>, now: Duration) {
        self.received(from, result, false, now);
    }

    /// The answer to [`Op::Recv`] from `from`: `n` bytes, and the engine
    /// knows `from`'s FIN comes next (a `MSG_PEEK` after the read returned
    /// 0): their write goes out corked, and once it has gone the FIN is
    /// passed on with no read to collect it, so both leave together. Not
    /// without half-close: that FIN ends the flow with a close, and a close of a
    /// socket with unread input sends an RST, which would drop bytes still
    /// corked (as the readiness-driven copy, which corks only with half-close).
    pub fn handle_received_before_fin(&mut self, from: Side, n: usize, now: Duration) {
        let cork = n > 0 && self.config.half_close;
        self.received(from, Ok(n), cork, now);
    }

    fn received(&mut self, from: Side, result: Result<usize, ()>, fin_next: bool, now: Duration) {
        if self.is_ended() || self.dirs[from.index()] != Dir::Receiving {
            return;
        }
        self.fin_next[from.index()] = fin_next;
        self.dirs[from.index()] = match result {
            Ok(0) => Dir::Fin,
            Ok(filled) => {
                // A read is at most a buffer, so this never saturates in
                // practice; an engine's bogus count must not panic the flow.
                let moved = &mut self.moved[from.index()];
                *moved = moved.saturating_add(filled as u64);
                self.last_activity = now;
                Dir::Holding { sent: 0, filled }
            }
            Err(()) => {
                self.end(Outcome::Failed(from));
                return;
            }
        };
        self.pump();
    }

    /// The answer to [`Op::Send`] of the bytes read from `from`: `Ok(n)` of
    /// them were written to the other side.
    pub fn handle_sent(&mut self, from: Side, result: Result<usize, ()>, now: Duration) {
        let Dir::Sending { sent, filled } = self.dirs[from.index()] else {
            return;
        };
        if self.is_ended() {
            return;
        }
        match result {
            Ok(n) if n > 0 && n <= filled - sent => {
                self.last_activity = now;
                let sent = sent + n;
                self.dirs[from.index()] = match sent == filled {
                    // The FIN the engine saw queued is all that is left to
                    // read (nothing can follow a FIN): it is passed on now,
                    // releasing the corked bytes, rather than after a read
                    // that could only return it.
                    true if self.fin_next[from.index()] => Dir::Fin,
                    true => Dir::Idle,
                    false => Dir::Holding { sent, filled },
                };
            }
            _ => {
                self.end(Outcome::Failed(from.other()));
                return;
            }
        }
        self.pump();
    }

    /// The answer to [`Op::Shutdown`] on `side`. `ENOTCONN` is an answer
    /// of `Ok` (the peer has gone already: nothing to pass the FIN to), as the
    /// readiness-driven copy takes it.
    pub fn handle_shut(&mut self, side: Side, result: Result<(), ()>) {
        let from = side.other();
        if self.is_ended() || self.dirs[from.index()] != Dir::ShuttingDown {
            return;
        }
        match result {
            Ok(()) => self.dirs[from.index()] = Dir::Done,
            Err(()) => {
                self.end(Outcome::Failed(side));
                return;
            }
        }
        self.pump();
    }

    /// The timer [`TcpFlow::poll_timeout`] asked for fired (or anything later).
    pub fn handle_timeout(&mut self, now: Duration) {
        if self.is_ended() {
            return;
        }
        match self.phase {
            Phase::Connecting { attempt, deadline } if now >= deadline => {
                self.push(Op::Abandon { attempt });
                self.attempt(attempt + 1, now);
            }
            Phase::Connected { .. } if now >= self.idle_deadline() => {
                self.end(Outcome::IdleTimeout);
            }
            _ => {}
        }
        self.pump();
    }

    /// The flow is cut from outside (drain ran out, or its zone went down).
    /// Report it before touching the sockets: the first ending is the one
    /// kept, and the errors a cut causes must not be taken for the ending.
    pub fn handle_cut(&mut self) {
        self.end(Outcome::Cut);
    }

    /// When the idle timeout runs out: never early, and never overflowing.
    fn idle_deadline(&self) -> Duration {
        self.last_activity
            .saturating_add(self.config.idle_timeout)
            .saturating_add(self.config.clock_tick)
    }

    /// Starts connect attempt `attempt`, or ends the flow when none is left.
    fn attempt(&mut self, attempt: usize, now: Duration) {
        if attempt >= self.config.connect_attempts {
            self.end(Outcome::Unreachable);
            return;
        }
        self.phase = Phase::Connecting {
            attempt,
            deadline: now.saturating_add(self.config.connect_timeout),
        };
        self.push(Op::Connect { attempt });
    }

    /// Queues what each direction and the header can do now.
    fn pump(&mut self) {
        if self.is_ended() {
            return;
        }
        let connected = matches!(self.phase, Phase::Connected { .. });
        if connected {
            if let Header::Pending { sent } = self.header {
                self.header = Header::Sending { sent };
                self.push(Op::SendHeader { from: sent });
            }
        }
        for from in [Side::Client, Side::Backend] {
            // The client may be read while connecting; what it sent waits for
            // the connect and the header. The backend exists once connected.
            let may_read = from == Side::Client || connected;
            let may_write = connected && (from == Side::Backend || self.header == Header::Done);
            self.step(from, may_read, may_write);
            if self.is_ended() {
                return;
            }
        }
        if self.dirs == [Dir::Done; 2] {
            self.end(Outcome::Completed);
        }
    }

    /// One direction's next operation, if it has one.
    fn step(&mut self, from: Side, may_read: bool, may_write: bool) {
        let i = from.index();
        match self.dirs[i] {
            Dir::Idle if may_read => {
                self.dirs[i] = Dir::Receiving;
                self.push(Op::Recv { from });
            }
            Dir::Holding { sent, filled } if may_write => {
                self.dirs[i] = Dir::Sending { sent, filled };
                self.push(Op::Send {
                    from,
                    start: sent,
                    end: filled,
                    more: self.fin_next[i],
                });
            }
            Dir::Fin if may_write => self.pass_fin(from),
            _ => {}
        }
    }

    /// Passes `from`'s FIN on, everything before it having gone.
    fn pass_fin(&mut self, from: Side) {
        if !self.config.half_close {
            self.end(Outcome::Completed);
            return;
        }
        let other = self.dirs[from.other().index()];
        if matches!(other, Dir::Done | Dir::ShuttingDown) {
            // Both sockets close once the other FIN is passed, which sends
            // this one too: skip the syscall.
            self.dirs[from.index()] = Dir::Done;
        } else {
            self.dirs[from.index()] = Dir::ShuttingDown;
            self.push(Op::Shutdown { side: from.other() });
        }
    }

    /// Ends the flow once: records how, and queues the close.
    fn end(&mut self, outcome: Outcome) {
        if self.is_ended() {
            return;
        }
        let connected_attempt = match self.phase {
            Phase::Connected { attempt } => Some(attempt),
            _ => None,
        };
        self.ended = Some(Ended {
            outcome,
            to_backend: self.moved[Side::Client.index()],
            from_backend: self.moved[Side::Backend.index()],
            connected_attempt,
        });
        self.push(Op::Close {
            how: outcome.closing(self.config.reset_on_idle),
        });
    }

    fn push(&mut self, op: Op) {
        // The queue is sized for the most a flow asks for between drains; a
        // caller that does not drain after every call loses the oldest
        // operation (a bug of the caller's, caught by tests in debug builds).
        debug_assert!(self.len < QUEUE, "operations not drained: {:?}", self.ops);
        if self.len == QUEUE {
            self.head = (self.head + 1) % QUEUE;
            self.len -= 1;
        }
        self.ops[(self.head + self.len) % QUEUE] = Some(op);
        self.len += 1;
    }
}

#[cfg(test)]
mod tests;
