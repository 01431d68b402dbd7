//! The ring engine's loop, one per worker thread: accepts on the worker's
//! listeners (multishot on its own, one at a time on a shared one), every
//! flow's operations submitted to one io_uring, every completion handed to
//! its flow's `TcpFlow`, whose next operations are submitted in turn; the
//! flows' timers read before each wait; phase changes (drain, cut) read from
//! an eventfd the worker's runtime writes.
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
use lb_core::tcp_flow::{Op, Side};
use tokio::sync::{oneshot, watch};
use tracing::{debug, warn};

use super::buffers::{BufferPool, Held};
use super::bulk::{self, Pipes, Run};
use super::flow::{Live, OpMemory, Refused};
use super::ops::{
    arg_side, as_len, carry_out, close_flow, close_now, idx, local_of, peer_of, post_recv,
    received, reset_now, Io, Kind, Slot, Tag,
};
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

/// The loop's state.
pub(super) struct Engine {
    ring: IoUring,
    pool: BufferPool,
    pipes: Pipes,
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
            pipes: Pipes::default(),
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
        self.drop_stale_deadlines();
        // The reads this submits, and those already posted, take from it.
        self.pool.top_up();
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
            pipes: &mut self.pipes,
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
            runs: [Run::default(), Run::default()],
            nonblocking: false,
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
            pipes,
            slots,
            deadlines,
            spill,
            ..
        } = self;
        let mut io = Io {
            ring,
            pool,
            pipes,
            spill,
        };
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
        for run in &mut slot.runs {
            run.clear(&mut self.pipes);
        }
        slot.nonblocking = false;
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
        self.drop_stale_deadlines();
        if self.deadlines.next().is_some_and(|at| at <= now) {
            // Operations queued since the last wait go to the kernel first:
            // a connect's address is read when the ring takes it, and a
            // timeout may reuse its place for the next attempt.
            let _ = self.ring.submit();
        }
        while let Some((at, s, gen)) = self.deadlines.pop_due(now) {
            let Some(slot) = self.slots.get_mut(s as usize) else {
                continue;
            };
            if !slot.files(at, gen) {
                continue;
            }
            slot.filed = None;
            if let Some(live) = slot.live.as_mut() {
                live.flow.handle_timeout(now);
                self.run_ops(s, now);
            }
        }
    }

    /// Drops the filed deadlines of flows that have ended or moved on from
    /// the top, so the wait's timeout is a flow's real deadline.
    fn drop_stale_deadlines(&mut self) {
        let slots = &self.slots;
        self.deadlines.drop_stale(|at, s, gen| {
            slots
                .get(s as usize)
                .is_some_and(|slot| slot.files(at, gen))
        });
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
                pipes,
                slots,
                spill,
                ..
            } = self;
            let mut io = Io {
                ring,
                pool,
                pipes,
                spill,
            };
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
        if matches!(tag.kind, Kind::Readable | Kind::Writable) {
            let mut io = Io {
                ring: &mut self.ring,
                pool: &mut self.pool,
                pipes: &mut self.pipes,
                spill: &mut self.spill,
            };
            bulk::on_ready(&mut io, s, slot, tag.kind, arg_side(tag.arg), now);
            return self.run_ops(s, now);
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
                        slot.runs[idx(side)].note_read(res as usize);
                        let held = &mut slot.held[idx(side)];
                        held.take(bid);
                        if self.pool.under_pressure() {
                            held.move_out(&mut self.pool, res as usize);
                        }
                    }
                    Some(bid) => self.pool.give_back(bid),
                    None => {}
                }
                received(live, side, res, flags, now);
            }
            Kind::Send => live.flow.handle_sent(arg_side(tag.arg), as_len(res), now),
            Kind::Cleanup
            | Kind::Accept
            | Kind::Wake
            | Kind::ListenerCleanup
            | Kind::Readable
            | Kind::Writable => {}
        }
        self.run_ops(s, now);
    }
}

/// Out of fds or memory: worth a rest before accepting again.
fn is_shortage(res: i32) -> bool {
    is_resource_exhaustion(&io::Error::from_raw_os_error(-res))
}
