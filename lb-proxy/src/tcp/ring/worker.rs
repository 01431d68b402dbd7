//! The ring engine's loop, one per worker thread: multishot accepts on the
//! worker's listeners, every flow's operations submitted to one io_uring,
//! every completion handed to its flow's `TcpFlow`, whose next operations
//! are submitted in turn; the flows' timers read before each wait; phase
//! changes (drain, cut) read from an eventfd the worker's runtime writes.
//!
//! Memory an operation uses stays put while it is in flight: each flow's
//! slot is boxed (the connect's address and the PROXY header live there),
//! and a slot (with the buffers its flow holds) is reused only once every
//! operation it posted has completed, so a stale completion never meets a
//! newer flow's memory. Each slot's generation, in every operation's
//! `user_data`, tells the flow's own completions from those of earlier ones.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use lb_core::tcp_flow::{Closing, Op, Side};
use tokio::sync::{oneshot, watch};
use tracing::{debug, warn};

use super::buffers::{self, BufferPool, Held, BUF_LEN};
use super::flow::{Live, OpMemory, Refused};
use super::timers::Deadlines;
use crate::clock::coarse_now;
use crate::shutdown::Phase;
use crate::state::Frontend;
use crate::target::is_resource_exhaustion;

/// Submission queue entries; the completion queue has four times as many.
const ENTRIES: u32 = 4096;
/// How long a listener rests after accept fails for want of fds or memory,
/// first and at most (doubling in between), as the tokio engine backs off.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(5), Duration::from_secs(1));

/// How often the loop looks at the phase where its eventfd failed.
const PHASE_POLL: Duration = Duration::from_millis(50);

/// `IORING_RECVSEND_POLL_FIRST` (io_uring.h; the crate keeps its copy
/// private): a read waits for bytes before it takes a buffer.
const RECVSEND_POLL_FIRST: u16 = 1;

/// What an operation's completion is for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum Kind {
    Accept = 0,
    Wake,
    Connect,
    Header,
    Recv,
    Send,
    /// A cancel or a close: only its slot's count of operations in flight cares.
    Cleanup,
    /// A listener's cancel and close.
    ListenerCleanup,
}

impl Kind {
    fn from_bits(b: u64) -> Option<Kind> {
        const ALL: [Kind; 8] = [
            Kind::Accept,
            Kind::Wake,
            Kind::Connect,
            Kind::Header,
            Kind::Recv,
            Kind::Send,
            Kind::Cleanup,
            Kind::ListenerCleanup,
        ];
        ALL.get(b as usize).copied()
    }
}

/// An operation's `user_data`: slot (32 bits) | generation (16) | kind (8) |
/// argument (8: a side, or a connect attempt).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tag {
    slot: u32,
    gen: u16,
    kind: Kind,
    arg: u8,
}

impl Tag {
    fn encode(self) -> u64 {
        u64::from(self.slot)
            | (u64::from(self.gen) << 32)
            | ((self.kind as u64) << 48)
            | (u64::from(self.arg) << 56)
    }

    fn decode(u: u64) -> Option<Tag> {
        Some(Tag {
            slot: u as u32,
            gen: (u >> 32) as u16,
            kind: Kind::from_bits((u >> 48) & 0xff)?,
            arg: (u >> 56) as u8,
        })
    }
}

fn side_arg(side: Side) -> u8 {
    match side {
        Side::Client => 0,
        Side::Backend => 1,
    }
}

fn arg_side(arg: u8) -> Side {
    if arg == 0 {
        Side::Client
    } else {
        Side::Backend
    }
}

fn idx(side: Side) -> usize {
    usize::from(side_arg(side))
}

/// One flow's place: its flow while it lives, the buffers it holds, and the
/// operations it has in flight (the slot is free only when none are).
struct Slot {
    gen: u16,
    live: Option<Live>,
    /// Per direction (client → backend, backend → client), where its last
    /// read is held until passed on.
    held: [Held; 2],
    /// Per direction, a read that found the pool empty waits in `starved`.
    starved: [bool; 2],
    in_flight: u32,
    /// The deadline filed for this flow, if any.
    filed: Option<Duration>,
    /// Ended by a cut (drain ran out): logged as one whatever it ended with.
    cut: bool,
    /// In the free list.
    free: bool,
    mem: OpMemory,
}

/// A listener of this worker and where its accepting stands.
struct Listener {
    fd: RawFd,
    /// Keeps the socket open until the listener's close is submitted.
    owned: Option<OwnedFd>,
    frontend: Arc<Frontend>,
    state: Accepting,
    backoff: Duration,
    /// A listener other workers share: one accept at a time, posted again
    /// once its connection is started (a multishot accept takes a whole
    /// burst on the worker that woke first, while the others idle:
    /// docs/research/new-connections.md, "Change G").
    one_per_turn: bool,
    /// Where a single accept writes the client's address (boxed: the
    /// kernel writes it when the accept completes).
    peer: Box<PeerAddr>,
}

/// A client address as accept(2) writes it.
struct PeerAddr {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl PeerAddr {
    fn new() -> Box<PeerAddr> {
        Box::new(PeerAddr {
            // SAFETY: all-zero is a valid sockaddr_storage.
            storage: unsafe { std::mem::zeroed() },
            len: std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t,
        })
    }

    /// The address the last accept wrote.
    fn get(&self) -> Option<SocketAddr> {
        use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
        let len = self.len as usize;
        let storage: *const libc::sockaddr_storage = &self.storage;
        match libc::c_int::from(self.storage.ss_family) {
            libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
                // SAFETY: accept wrote a sockaddr_in here (family and length checked).
                let a = unsafe { &*storage.cast::<libc::sockaddr_in>() };
                let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                Some(SocketAddrV4::new(ip, u16::from_be(a.sin_port)).into())
            }
            libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
                // SAFETY: accept wrote a sockaddr_in6 here (family and length checked).
                let a = unsafe { &*storage.cast::<libc::sockaddr_in6>() };
                let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
                let port = u16::from_be(a.sin6_port);
                Some(SocketAddrV6::new(ip, port, a.sin6_flowinfo, a.sin6_scope_id).into())
            }
            _ => None,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Accepting {
    /// A multishot accept is posted.
    Posted,
    /// Resting after a shortage, until then.
    RestingUntil(Duration),
    /// Its accept is being cancelled (draining).
    Stopping,
    Stopped,
}

/// The submission side, borrowed apart from the slots.
struct Io<'a> {
    ring: &'a mut IoUring,
    pool: &'a mut BufferPool,
    /// Completions taken off a full queue to make room: handled after the
    /// batch in hand.
    spill: &'a mut Vec<(u64, i32, u32)>,
}

impl Io<'_> {
    fn push(&mut self, entry: squeue::Entry) {
        self.push_all(&[entry]);
    }

    /// Queues `entries` together: a linked chain split between two
    /// submissions would end at the first one's edge.
    fn push_all(&mut self, entries: &[squeue::Entry]) {
        loop {
            let mut sq = self.ring.submission();
            if sq.capacity() - sq.len() >= entries.len() {
                // SAFETY: every operation's memory (buffers, addresses, the
                // header) outlives it: it is in a boxed slot reused only once
                // nothing is in flight there, or in the pool, which outlives
                // the ring.
                let pushed = unsafe { sq.push_multiple(entries) };
                debug_assert!(pushed.is_ok(), "room was checked");
                return;
            }
            drop(sq);
            self.make_room();
        }
    }

    /// Hands the full submission queue to the kernel; where the completion
    /// queue is full too (EBUSY), takes its completions aside first.
    fn make_room(&mut self) {
        match self.ring.submit() {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                self.spill.extend(
                    self.ring
                        .completion()
                        .map(|c| (c.user_data(), c.result(), c.flags())),
                );
            }
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => {
                warn!(error = %e, "io_uring submit failed");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// The loop's state.
pub(super) struct Engine {
    ring: IoUring,
    pool: BufferPool,
    /// Boxed so that a slot stays put while the vector grows: operations in
    /// flight point into it (the connect's address, the PROXY header).
    #[allow(clippy::vec_box)]
    slots: Vec<Box<Slot>>,
    free: Vec<u32>,
    deadlines: Deadlines,
    /// Reads that found the pool empty, to post again as buffers come back.
    starved: VecDeque<(u32, u16, Side)>,
    listeners: Vec<Listener>,
    phase: watch::Receiver<Phase>,
    /// The phase acted on last (none yet at start).
    seen: Option<Phase>,
    wake: Arc<OwnedFd>,
    wake_buf: Box<u64>,
    accept_stopped: Option<oneshot::Sender<()>>,
    completions: Vec<(u64, i32, u32)>,
    spill: Vec<(u64, i32, u32)>,
    /// The eventfd failed: the phase is looked at every [`PHASE_POLL`].
    polling_phase: bool,
}

/// What the loop serves: a listener, its frontend, and whether other
/// workers share the listener.
pub type Served = (std::net::TcpListener, Arc<Frontend>, bool);

impl Engine {
    /// Sets up the ring and its buffer pool; `Err` where io_uring is refused.
    pub fn build_ring() -> io::Result<(IoUring, BufferPool)> {
        if std::env::var_os(super::DISABLE_ENV).is_some() {
            return Err(io::Error::other(format!(
                "disabled by {}",
                super::DISABLE_ENV
            )));
        }
        let ring = IoUring::builder()
            .setup_cqsize(ENTRIES * 4)
            .setup_single_issuer()
            .setup_coop_taskrun()
            .build(ENTRIES)?;
        let pool = BufferPool::new(&ring)?;
        Ok((ring, pool))
    }

    pub fn new(
        (ring, pool): (IoUring, BufferPool),
        served: Vec<Served>,
        phase: watch::Receiver<Phase>,
        wake: Arc<OwnedFd>,
        accept_stopped: oneshot::Sender<()>,
    ) -> Engine {
        let listeners = served
            .into_iter()
            .map(|(l, frontend, shared)| {
                let owned = OwnedFd::from(l);
                Listener {
                    fd: owned.as_raw_fd(),
                    owned: Some(owned),
                    frontend,
                    state: Accepting::Stopped,
                    backoff: ACCEPT_BACKOFF.0,
                    one_per_turn: shared,
                    peer: PeerAddr::new(),
                }
            })
            .collect();
        Engine {
            ring,
            pool,
            slots: Vec::new(),
            free: Vec::new(),
            deadlines: Deadlines::default(),
            starved: VecDeque::new(),
            listeners,
            phase,
            seen: None,
            wake,
            wake_buf: Box::new(0),
            accept_stopped: Some(accept_stopped),
            completions: Vec::with_capacity((ENTRIES * 4) as usize),
            spill: Vec::new(),
            polling_phase: false,
        }
    }

    /// Serves until the process exits.
    pub fn run(mut self) -> ! {
        for l in 0..self.listeners.len() {
            self.post_accept(l);
        }
        self.post_wake();
        self.follow_phase();
        loop {
            let now = coarse_now();
            self.fire_due_timers(now);
            self.resume_listeners(now);
            self.resume_starved();
            if self.polling_phase {
                self.follow_phase();
            }
            self.wait(now);
            self.completions.clear();
            self.completions.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            let now = coarse_now();
            loop {
                for i in 0..self.completions.len() {
                    let (user_data, res, flags) = self.completions[i];
                    self.complete(user_data, res, flags, now);
                }
                if self.spill.is_empty() {
                    break;
                }
                self.completions.clear();
                std::mem::swap(&mut self.completions, &mut self.spill);
            }
        }
    }

    /// Submits what is queued and waits for a completion, or for the next
    /// deadline (a flow's timer, or a listener's rest).
    fn wait(&mut self, now: Duration) {
        let next = [
            self.deadlines.next(),
            self.listeners
                .iter()
                .filter_map(|l| match l.state {
                    Accepting::RestingUntil(at) => Some(at),
                    _ => None,
                })
                .min(),
        ]
        .into_iter()
        .flatten()
        .min();
        let next = match (next, self.polling_phase) {
            (next, true) => Some(next.map_or(now + PHASE_POLL, |at| at.min(now + PHASE_POLL))),
            (next, false) => next,
        };
        let result = match next {
            Some(at) => {
                // The coarse clock moves a tick at a time: a wait that ends
                // before the tick that passes `at` would only find it not due.
                let left = at.saturating_sub(now) + crate::clock::resolution();
                let ts = types::Timespec::from(left);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
            None => self.ring.submit_and_wait(1),
        };
        match result {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                // The completion queue is full: reaping it is the way on.
            }
            Err(e) => {
                warn!(error = %e, "io_uring wait failed");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    fn io(&mut self) -> Io<'_> {
        Io {
            ring: &mut self.ring,
            pool: &mut self.pool,
            spill: &mut self.spill,
        }
    }

    // ---- listeners and phases

    fn post_accept(&mut self, l: usize) {
        let fd = self.listeners[l].fd;
        let tag = Tag {
            slot: l as u32,
            gen: 0,
            kind: Kind::Accept,
            arg: 0,
        };
        let listener = &mut self.listeners[l];
        let entry = if listener.one_per_turn {
            let peer = &mut *listener.peer;
            peer.len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            opcode::Accept::new(
                types::Fd(fd),
                (&mut peer.storage as *mut libc::sockaddr_storage).cast(),
                &mut peer.len,
            )
            .flags(libc::SOCK_CLOEXEC)
            .build()
        } else {
            opcode::AcceptMulti::new(types::Fd(fd))
                .flags(libc::SOCK_CLOEXEC)
                .build()
        };
        listener.state = Accepting::Posted;
        self.io().push(entry.user_data(tag.encode()));
    }

    fn post_wake(&mut self) {
        let tag = Tag {
            slot: 0,
            gen: 0,
            kind: Kind::Wake,
            arg: 0,
        };
        let buf: *mut u64 = &mut *self.wake_buf;
        let entry = opcode::Read::new(types::Fd(self.wake.as_raw_fd()), buf.cast(), 8)
            .build()
            .user_data(tag.encode());
        self.io().push(entry);
    }

    /// The eventfd was written (or its read failed): read it again, and act
    /// on the phase. A read that keeps failing is not posted again; the loop
    /// then looks at the phase every [`PHASE_POLL`] instead.
    fn on_wake(&mut self, res: i32) {
        if res >= 0 || res == -libc::EINTR {
            self.post_wake();
        } else if !self.polling_phase {
            let e = io::Error::from_raw_os_error(-res);
            warn!(error = %e, "the ring's phase eventfd failed; polling the phase instead");
            self.polling_phase = true;
        }
        self.follow_phase();
    }

    /// Acts on the phase the runtime last published: stop accepting when
    /// draining, cut every flow at the cut.
    fn follow_phase(&mut self) {
        let phase = *self.phase.borrow_and_update();
        if self.seen == Some(phase) {
            return;
        }
        self.seen = Some(phase);
        if phase != Phase::Running {
            self.stop_accepting();
        }
        if phase == Phase::Cut {
            self.cut_all();
        }
    }

    /// Cancels every listener's accept and closes it, so the kernel stops
    /// queueing connections for this worker.
    fn stop_accepting(&mut self) {
        for l in 0..self.listeners.len() {
            // Taken once: a listener already stopping or stopped has none.
            let Some(owned) = self.listeners[l].owned.take() else {
                continue;
            };
            let state = self.listeners[l].state;
            // The ring's close below closes it.
            let fd = owned.into_raw_fd();
            let tag = Tag {
                slot: l as u32,
                gen: 0,
                kind: Kind::ListenerCleanup,
                arg: 0,
            }
            .encode();
            let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
                .build()
                .user_data(tag)
                .flags(squeue::Flags::IO_HARDLINK);
            let close = opcode::Close::new(types::Fd(fd)).build().user_data(tag);
            self.io().push_all(&[cancel, close]);
            self.listeners[l].state = if state == Accepting::Posted {
                Accepting::Stopping
            } else {
                Accepting::Stopped
            };
        }
        self.report_if_accepting_stopped();
    }

    fn report_if_accepting_stopped(&mut self) {
        if self.listeners.iter().all(|l| l.state == Accepting::Stopped) {
            if let Some(tx) = self.accept_stopped.take() {
                let _ = tx.send(());
            }
        }
    }

    /// Posts again the accepts of listeners whose rest is over.
    fn resume_listeners(&mut self, now: Duration) {
        for l in 0..self.listeners.len() {
            if matches!(self.listeners[l].state, Accepting::RestingUntil(at) if at <= now) {
                self.post_accept(l);
            }
        }
    }

    fn on_accept(&mut self, l: usize, res: i32, flags: u32, now: Duration) {
        let more = cqueue::more(flags);
        // Read before the accept is posted again, which hands the same
        // storage back to the kernel.
        let peer = match res {
            0.. if self.listeners[l].one_per_turn => self.listeners[l].peer.get(),
            0.. => peer_of(res),
            _ => None,
        };
        let listener = &mut self.listeners[l];
        if !more {
            match listener.state {
                Accepting::Stopping => {
                    listener.state = Accepting::Stopped;
                    self.report_if_accepting_stopped();
                }
                Accepting::Posted if res >= 0 || !is_shortage(res) => self.post_accept(l),
                Accepting::Posted => {
                    let e = io::Error::from_raw_os_error(-res);
                    warn!(frontend = %listener.frontend.name, error = %e, backoff = ?listener.backoff, "accept failed, backing off");
                    listener.state = Accepting::RestingUntil(now + listener.backoff);
                    listener.backoff = (listener.backoff * 2).min(ACCEPT_BACKOFF.1);
                }
                Accepting::RestingUntil(_) | Accepting::Stopped => {}
            }
        }
        if res < 0 {
            return;
        }
        self.listeners[l].backoff = ACCEPT_BACKOFF.0;
        self.start_flow(l, res, peer, now);
    }

    // ---- flows

    /// A client accepted on listener `l`: admitted into a slot and started,
    /// or reset.
    fn start_flow(&mut self, l: usize, client: RawFd, peer: Option<SocketAddr>, now: Duration) {
        let Some(peer) = peer else {
            // Gone before it could be asked its address.
            close_now(client);
            return;
        };
        if self.seen == Some(Phase::Cut) {
            // Accepted in the batch that brought the cut: nothing to serve it with.
            reset_now(client);
            return;
        }
        let s = self.free_slot();
        let frontend = &self.listeners[l].frontend;
        let local = if frontend.listen.ip().is_unspecified() {
            local_of(client).unwrap_or(frontend.listen)
        } else {
            frontend.listen
        };
        let slot = &mut self.slots[s as usize];
        let live = match Live::admit(frontend, client, (peer, local), now, &mut slot.mem) {
            Ok(live) => live,
            Err(why) => {
                if matches!(why, Refused::SourceRange) {
                    debug!(frontend = %frontend.name, client = %peer, "client outside source_ranges, reset");
                }
                reset_now(client);
                return self.release_if_idle(s);
            }
        };
        slot.live = Some(live);
        slot.cut = false;
        self.run_ops(s, now);
    }

    fn free_slot(&mut self) -> u32 {
        if let Some(s) = self.free.pop() {
            self.slots[s as usize].free = false;
            return s;
        }
        self.slots.push(Box::new(Slot {
            gen: 0,
            live: None,
            held: [Held::default(), Held::default()],
            starved: [false, false],
            in_flight: 0,
            filed: None,
            cut: false,
            free: false,
            mem: OpMemory::new(),
        }));
        (self.slots.len() - 1) as u32
    }

    /// Carries out what slot `s`'s flow asks for until it asks for nothing
    /// more; files its next deadline, or, once it has ended, its record.
    fn run_ops(&mut self, s: u32, now: Duration) {
        let Engine {
            ring,
            pool,
            slots,
            deadlines,
            spill,
            ..
        } = self;
        let mut io = Io { ring, pool, spill };
        let slot = &mut slots[s as usize];
        loop {
            let Some(live) = slot.live.as_mut() else {
                return;
            };
            let Some(op) = live.flow.poll_op() else {
                break;
            };
            if let Op::Close { how } = op {
                close_flow(&mut io, s, slot, how);
                break;
            }
            carry_out(&mut io, s, slot, op, now);
        }
        match slot.live.as_ref() {
            Some(live) if live.flow.is_ended() => {}
            Some(live) => {
                if let Some(at) = live.flow.poll_timeout() {
                    if slot.filed.is_none_or(|filed| at < filed) {
                        slot.filed = Some(at);
                        deadlines.file(at, s, slot.gen);
                    }
                }
                return;
            }
            None => {}
        }
        self.end_flow(s);
    }

    /// The flow in slot `s` has closed: counted, logged, and the slot freed
    /// once nothing is in flight there.
    fn end_flow(&mut self, s: u32) {
        let slot = &mut self.slots[s as usize];
        if let Some(live) = slot.live.take() {
            let ended = live.flow.poll_end();
            if let Some(ended) = ended {
                live.finish(ended, slot.cut);
            }
        }
        self.release_if_idle(s);
    }

    /// Frees slot `s` if its flow has ended and nothing is in flight there:
    /// its buffers go back to the pool and the slot to the free list.
    fn release_if_idle(&mut self, s: u32) {
        let slot = &mut self.slots[s as usize];
        if slot.live.is_some() || slot.in_flight > 0 {
            return;
        }
        for held in &mut slot.held {
            held.clear(&mut self.pool);
        }
        slot.starved = [false, false];
        slot.gen = slot.gen.wrapping_add(1);
        slot.filed = None;
        slot.cut = false;
        slot.mem.addr = None;
        if !slot.free {
            slot.free = true;
            self.free.push(s);
        }
    }

    fn fire_due_timers(&mut self, now: Duration) {
        if self.deadlines.next().is_some_and(|at| at <= now) {
            // Operations queued since the last wait go to the kernel first:
            // a connect's address is read when the ring takes it, and a
            // timeout may reuse its place for the next attempt.
            let _ = self.ring.submit();
        }
        while let Some((s, gen)) = self.deadlines.pop_due(now) {
            let Some(slot) = self.slots.get_mut(s as usize) else {
                continue;
            };
            if slot.gen != gen {
                continue;
            }
            slot.filed = None;
            if let Some(live) = slot.live.as_mut() {
                live.flow.handle_timeout(now);
                self.run_ops(s, now);
            }
        }
    }

    /// Posts again the reads that found the pool empty, one per free buffer.
    fn resume_starved(&mut self) {
        let mut budget = self.pool.free();
        while budget > 0 {
            let Some((s, gen, side)) = self.starved.pop_front() else {
                return;
            };
            let slot = &mut self.slots[s as usize];
            // The flag, not only the generation, says the entry is current:
            // a slot's generation wraps.
            let waiting = std::mem::take(&mut slot.starved[idx(side)]);
            if !waiting || slot.gen != gen || slot.live.as_ref().is_none_or(|l| l.flow.is_ended()) {
                continue;
            }
            budget -= 1;
            let Engine {
                ring,
                pool,
                slots,
                spill,
                ..
            } = self;
            let mut io = Io { ring, pool, spill };
            post_recv(&mut io, s, &mut slots[s as usize], side);
        }
    }

    /// Cuts every open flow (the drain ran out, or SIGINT): a FIN both ways,
    /// logged with the outcome `shutdown`.
    fn cut_all(&mut self) {
        let mut cut = 0;
        for s in 0..self.slots.len() as u32 {
            let slot = &mut self.slots[s as usize];
            let Some(live) = slot.live.as_mut() else {
                continue;
            };
            slot.cut = true;
            live.flow.handle_cut();
            cut += 1;
            self.run_ops(s, coarse_now());
        }
        debug!(cut, "cut the flows open on this ring worker");
    }

    // ---- completions

    fn complete(&mut self, user_data: u64, res: i32, flags: u32, now: Duration) {
        let Some(tag) = Tag::decode(user_data) else {
            return;
        };
        match tag.kind {
            Kind::Accept => return self.on_accept(tag.slot as usize, res, flags, now),
            Kind::Wake => return self.on_wake(res),
            Kind::ListenerCleanup => return,
            _ => {}
        }
        let s = tag.slot;
        let Some(slot) = self.slots.get_mut(s as usize) else {
            return;
        };
        slot.in_flight = slot.in_flight.saturating_sub(1);
        let bid = cqueue::buffer_select(flags);
        if bid.is_some() {
            self.pool.taken();
        }
        let current = slot.gen == tag.gen && slot.live.is_some();
        if !current {
            if let Some(bid) = bid {
                self.pool.give_back(bid);
            }
            return self.release_if_idle(s);
        }
        let live = slot.live.as_mut().expect("checked above");
        match tag.kind {
            Kind::Connect => {
                let attempt = usize::from(tag.arg);
                if let Some(result) = live.connect_completed(attempt, res) {
                    live.flow.handle_connected(attempt, result, now);
                }
            }
            Kind::Header => live.flow.handle_header_sent(as_len(res), now),
            Kind::Recv => {
                let side = arg_side(tag.arg);
                if res == -libc::ENOBUFS {
                    slot.starved[idx(side)] = true;
                    self.starved.push_back((s, tag.gen, side));
                    return;
                }
                match bid {
                    Some(bid) if res > 0 => {
                        let held = &mut slot.held[idx(side)];
                        held.take(bid);
                        if self.pool.under_pressure() {
                            held.move_out(&mut self.pool, res as usize);
                        }
                    }
                    Some(bid) => self.pool.give_back(bid),
                    None => {}
                }
                received(live, side, res, now);
            }
            Kind::Send => live.flow.handle_sent(arg_side(tag.arg), as_len(res), now),
            Kind::Cleanup | Kind::Accept | Kind::Wake | Kind::ListenerCleanup => {}
        }
        self.run_ops(s, now);
    }
}

/// A read of `res` bytes (0: the FIN; negative: an error) from `side`,
/// told to the flow. After a short read, a one-byte peek says whether the
/// FIN is next, so the flow can send the last bytes corked with it.
fn received(live: &mut Live, side: Side, res: i32, now: Duration) {
    if res <= 0 {
        live.flow
            .handle_received(side, if res == 0 { Ok(0) } else { Err(()) }, now);
        return;
    }
    let n = res as usize;
    live.count_read(side == Side::Client, n);
    // Without half-close the FIN is not corked with the bytes (see
    // `TcpFlow::handle_received_before_fin`): no peek to make.
    let may_cork = live.settings.half_close && n < BUF_LEN;
    if may_cork && fin_is_next(live.fds[idx(side)]) {
        live.flow.handle_received_before_fin(side, n, now);
    } else {
        live.flow.handle_received(side, Ok(n), now);
    }
}

/// Whether the next thing `fd` will read is its peer's FIN.
fn fin_is_next(fd: RawFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: a one-byte peek into a local, on a socket the flow holds.
    let n = unsafe {
        libc::recv(
            fd,
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0
}

fn as_len(res: i32) -> Result<usize, ()> {
    if res < 0 {
        Err(())
    } else {
        Ok(res as usize)
    }
}

/// Out of fds or memory: worth a rest before accepting again.
fn is_shortage(res: i32) -> bool {
    is_resource_exhaustion(&io::Error::from_raw_os_error(-res))
}

/// Posts one operation of slot `s`'s flow (anything but its close).
fn carry_out(io: &mut Io<'_>, s: u32, slot: &mut Slot, op: Op, now: Duration) {
    let live = slot.live.as_mut().expect("a live flow asked");
    let tag = |kind, arg| Tag {
        slot: s,
        gen: slot.gen,
        kind,
        arg,
    };
    match op {
        Op::Connect { attempt } => match live.open_attempt(attempt, &mut slot.mem) {
            Ok(()) => {
                let fd = live.fds[1];
                let addr = slot.mem.addr.as_ref().expect("just opened");
                let entry = opcode::Connect::new(types::Fd(fd), addr.as_ptr().cast(), addr.len())
                    .build()
                    .user_data(tag(Kind::Connect, attempt as u8).encode());
                slot.in_flight += 1;
                io.push(entry);
            }
            Err(result) => live.flow.handle_connected(attempt, result, now),
        },
        Op::Abandon { attempt } => {
            if let Some(fd) = live.abandon(attempt) {
                cancel_and_close(io, fd, tag(Kind::Cleanup, 0), slot);
            }
        }
        Op::SendHeader { from } => {
            let bytes = slot.mem.header_from(from);
            let entry =
                opcode::Send::new(types::Fd(live.fds[1]), bytes.as_ptr(), bytes.len() as u32)
                    .flags(libc::MSG_NOSIGNAL)
                    .build()
                    .user_data(tag(Kind::Header, 0).encode());
            slot.in_flight += 1;
            io.push(entry);
        }
        Op::Recv { from } => post_recv(io, s, slot, from),
        Op::Send {
            from,
            start,
            end,
            more,
        } => {
            let held = &mut slot.held[idx(from)];
            if held.in_pool() && io.pool.under_pressure() {
                // A peer that does not read would hold the buffer for as
                // long as it waits: out of the pool with it.
                held.move_out(io.pool, end);
            }
            let Some(read) = held.bytes(io.pool) else {
                // Nothing read into: the flow asked for bytes it never had.
                live.flow.handle_sent(from, Err(()), now);
                return;
            };
            // SAFETY: start..end lies within the read the flow holds.
            let bytes = unsafe { read.add(start) };
            let more = if more { libc::MSG_MORE } else { 0 };
            let to = live.fds[idx(from.other())];
            let entry = opcode::Send::new(types::Fd(to), bytes, (end - start) as u32)
                .flags(libc::MSG_NOSIGNAL | more)
                .build()
                .user_data(tag(Kind::Send, side_arg(from)).encode());
            slot.in_flight += 1;
            io.push(entry);
        }
        Op::Shutdown { side } => {
            // A plain syscall: the ring hands IORING_OP_SHUTDOWN to a worker
            // thread, a wakeup per connection (docs/research/new-connections.md).
            // SAFETY: shutdown(2) on a socket the flow holds.
            let rc = unsafe { libc::shutdown(live.fds[idx(side)], libc::SHUT_WR) };
            let ok = rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::ENOTCONN);
            live.flow
                .handle_shut(side, if ok { Ok(()) } else { Err(()) });
        }
        Op::Close { .. } => unreachable!("closed by close_flow"),
    }
}

/// Posts a read on `side`, into a buffer the kernel picks when bytes
/// arrive; the buffer this direction held (its bytes all passed on) goes
/// back to the pool first.
fn post_recv(io: &mut Io<'_>, s: u32, slot: &mut Slot, side: Side) {
    slot.held[idx(side)].release(io.pool);
    let fd = slot.live.as_ref().map_or(-1, |l| l.fds[idx(side)]);
    let tag = Tag {
        slot: s,
        gen: slot.gen,
        kind: Kind::Recv,
        arg: side_arg(side),
    };
    // With the pool empty, a read that tried at once would fail at once
    // (ENOBUFS) even on a quiet socket: it waits for bytes first instead.
    let poll_first = if io.pool.free() == 0 {
        RECVSEND_POLL_FIRST
    } else {
        0
    };
    let entry = opcode::Recv::new(types::Fd(fd), std::ptr::null_mut(), BUF_LEN as u32)
        .buf_group(buffers::GROUP)
        .ioprio(poll_first)
        .build()
        .flags(squeue::Flags::BUFFER_SELECT)
        .user_data(tag.encode());
    slot.in_flight += 1;
    io.push(entry);
}

/// The flow's last operation: both sockets closed as `how` says, after
/// what is in flight on them is cancelled.
fn close_flow(io: &mut Io<'_>, s: u32, slot: &mut Slot, how: Closing) {
    let fds = slot.live.as_ref().map_or([-1, -1], |l| l.fds);
    let tag = Tag {
        slot: s,
        gen: slot.gen,
        kind: Kind::Cleanup,
        arg: 0,
    };
    for fd in fds.into_iter().filter(|&fd| fd >= 0) {
        match how {
            Closing::Reset => set_linger_zero(fd),
            // SAFETY: shutdown(2) on a socket the flow holds.
            Closing::Graceful => unsafe {
                libc::shutdown(fd, libc::SHUT_WR);
            },
            Closing::Close => {}
        }
        cancel_and_close(io, fd, tag, slot);
    }
}

/// Cancels every operation on `fd`, then closes it (hard-linked, so the
/// close waits for the cancel whatever it finds).
fn cancel_and_close(io: &mut Io<'_>, fd: RawFd, tag: Tag, slot: &mut Slot) {
    let tag = tag.encode();
    let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
        .build()
        .user_data(tag)
        .flags(squeue::Flags::IO_HARDLINK);
    let close = opcode::Close::new(types::Fd(fd)).build().user_data(tag);
    slot.in_flight += 2;
    io.push_all(&[cancel, close]);
}

/// SO_LINGER 0: the close sends an RST.
fn set_linger_zero(fd: RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we hold, with a valid linger value.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Closes `fd` with a reset (a refused client: nothing was posted on it).
fn reset_now(fd: RawFd) {
    set_linger_zero(fd);
    close_now(fd);
}

/// Closes `fd` now (nothing is in flight on it).
pub(super) fn close_now(fd: RawFd) {
    // SAFETY: the caller owns `fd` and nothing else uses it after this.
    unsafe {
        libc::close(fd);
    }
}

fn peer_of(fd: RawFd) -> Option<SocketAddr> {
    // SAFETY: the socket stays open for the borrow.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    socket2::SockRef::from(&borrowed)
        .peer_addr()
        .ok()?
        .as_socket()
}

fn local_of(fd: RawFd) -> Option<SocketAddr> {
    // SAFETY: the socket stays open for the borrow.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    socket2::SockRef::from(&borrowed)
        .local_addr()
        .ok()?
        .as_socket()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_survives_its_round_trip() {
        for kind in [Kind::Accept, Kind::Recv, Kind::ListenerCleanup] {
            let tag = Tag {
                slot: 0xdead_beef,
                gen: 0xffff,
                kind,
                arg: 7,
            };
            assert_eq!(Tag::decode(tag.encode()), Some(tag));
        }
        assert_eq!(Tag::decode(0xff << 48), None, "an unknown kind");
    }
}
