//! A ring flow's operations, carried out: the `user_data` that names each
//! operation's flow, generation and kind ([`Tag`]); a flow's slot, which keeps
//! the memory its operations point into until the last of them completes
//! ([`Slot`]); the submission queue with its chains kept whole ([`Io`]); and
//! each `lb_core::tcp_flow::Op` turned into submissions or the few plain
//! syscalls the ring does worse (shutdown and the corked write before it,
//! linger, the FIN peek, close; a bulk run's reads and writes go to
//! [`super::bulk`]).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, RawFd};
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use lb_core::tcp_flow::{Closing, Op, Side};
use tracing::warn;

use super::buffers::{self, BufferPool, Held, BUF_LEN};
use super::bulk::{self, Pipes, Run};
use super::flow::{Live, OpMemory};

/// `IORING_RECVSEND_POLL_FIRST` (io_uring.h; the crate keeps its copy
/// private): a read waits for bytes before it takes a buffer.
const RECVSEND_POLL_FIRST: u16 = 1;

/// What an operation's completion is for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub(super) enum Kind {
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
    /// A bulk direction's wait for bytes to splice (`super::bulk`).
    Readable,
    /// A bulk direction's wait for room to splice into.
    Writable,
}

impl Kind {
    pub(super) fn from_bits(b: u64) -> Option<Kind> {
        const ALL: [Kind; 10] = [
            Kind::Accept,
            Kind::Wake,
            Kind::Connect,
            Kind::Header,
            Kind::Recv,
            Kind::Send,
            Kind::Cleanup,
            Kind::ListenerCleanup,
            Kind::Readable,
            Kind::Writable,
        ];
        ALL.get(b as usize).copied()
    }
}

/// An operation's `user_data`: slot (32 bits) | generation (16) | kind (8) |
/// argument (8: a side, or a connect attempt).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Tag {
    pub(super) slot: u32,
    pub(super) gen: u16,
    pub(super) kind: Kind,
    pub(super) arg: u8,
}

impl Tag {
    pub(super) fn encode(self) -> u64 {
        u64::from(self.slot)
            | (u64::from(self.gen) << 32)
            | ((self.kind as u64) << 48)
            | (u64::from(self.arg) << 56)
    }

    pub(super) fn decode(u: u64) -> Option<Tag> {
        Some(Tag {
            slot: u as u32,
            gen: (u >> 32) as u16,
            kind: Kind::from_bits((u >> 48) & 0xff)?,
            arg: (u >> 56) as u8,
        })
    }
}

pub(super) fn side_arg(side: Side) -> u8 {
    match side {
        Side::Client => 0,
        Side::Backend => 1,
    }
}

pub(super) fn arg_side(arg: u8) -> Side {
    if arg == 0 {
        Side::Client
    } else {
        Side::Backend
    }
}

pub(super) fn idx(side: Side) -> usize {
    usize::from(side_arg(side))
}

/// One flow's place: its flow while it lives, the buffers it holds, and the
/// operations it has in flight (the slot is free only when none are).
pub(super) struct Slot {
    pub(super) gen: u16,
    pub(super) live: Option<Live>,
    /// Per direction (client → backend, backend → client), where its last
    /// read is held until passed on.
    pub(super) held: [Held; 2],
    /// Per direction, a read that found the pool empty waits in `starved`.
    pub(super) starved: [bool; 2],
    /// Per direction, its bulk run through a pipe, if one is on.
    pub(super) runs: [Run; 2],
    /// The flow's sockets were made non-blocking for a bulk run's splices.
    pub(super) nonblocking: bool,
    pub(super) in_flight: u32,
    /// The deadline filed for this flow, if any.
    pub(super) filed: Option<Duration>,
    /// Ended by a cut (drain ran out): logged as one whatever it ended with.
    pub(super) cut: bool,
    /// In the free list.
    pub(super) free: bool,
    pub(super) mem: OpMemory,
}

impl Slot {
    /// Whether the deadline `at`, filed at generation `gen`, is still this
    /// slot's flow's: not ended, not moved earlier since.
    pub(super) fn files(&self, at: Duration, gen: u16) -> bool {
        self.gen == gen && self.live.is_some() && self.filed == Some(at)
    }
}

/// The submission side, borrowed apart from the slots.
pub(super) struct Io<'a> {
    pub(super) ring: &'a mut IoUring,
    pub(super) pool: &'a mut BufferPool,
    pub(super) pipes: &'a mut Pipes,
    /// Completions taken off a full queue to make room: handled after the
    /// batch in hand.
    pub(super) spill: &'a mut Vec<(u64, i32, u32)>,
}

impl Io<'_> {
    pub(super) fn push(&mut self, entry: squeue::Entry) {
        self.push_all(&[entry]);
    }

    /// Queues `entries` together: a linked chain split between two
    /// submissions would end at the first one's edge.
    pub(super) fn push_all(&mut self, entries: &[squeue::Entry]) {
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

/// A read of `res` bytes (0: the FIN; negative: an error) from `side`,
/// told to the flow. After a short read that left something queued (the
/// completion's `flags` say so), a one-byte peek says whether that is the
/// FIN, so the flow can send the last bytes corked with it.
pub(super) fn received(live: &mut Live, side: Side, res: i32, flags: u32, now: Duration) {
    if res <= 0 {
        live.flow
            .handle_received(side, if res == 0 { Ok(0) } else { Err(()) }, now);
        return;
    }
    let n = res as usize;
    // IORING_CQE_F_SOCK_NONEMPTY is TCP's "more to read", and a FIN not yet
    // read counts (tcp_inq_hint): without it the FIN is not next, and the
    // peek's syscall is saved (a request's read, as a rule).
    pass_read(
        live,
        side,
        n,
        n < BUF_LEN && cqueue::sock_nonempty(flags),
        now,
    );
}

/// `n` bytes read from `side`, counted and told to the flow. Where the FIN
/// `may_follow` them (a short read), a one-byte peek says whether it is
/// next, so that the flow sends them corked with it.
pub(super) fn pass_read(live: &mut Live, side: Side, n: usize, may_follow: bool, now: Duration) {
    live.count_read(side == Side::Client, n);
    // Without half-close the FIN is not corked with the bytes (see
    // `TcpFlow::handle_received_before_fin`): no peek to make.
    let may_cork = live.settings.half_close && may_follow;
    if may_cork && fin_is_next(live.fds[idx(side)]) {
        live.flow.handle_received_before_fin(side, n, now);
    } else {
        live.flow.handle_received(side, Ok(n), now);
    }
}

/// Whether the next thing `fd` will read is its peer's FIN.
pub(super) fn fin_is_next(fd: RawFd) -> bool {
    // SAFETY: the flow holds `fd` open for as long as this call.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    matches!(crate::tcp::syscall::peek(fd), Ok(0))
}

pub(super) fn as_len(res: i32) -> Result<usize, ()> {
    if res < 0 {
        Err(())
    } else {
        Ok(res as usize)
    }
}

/// Posts one operation of slot `s`'s flow (anything but its close).
pub(super) fn carry_out(io: &mut Io<'_>, s: u32, slot: &mut Slot, op: Op, now: Duration) {
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
        Op::Recv { from } if slot.runs[idx(from)].is_bulk() => bulk::recv(io, s, slot, from, now),
        Op::Recv { from } => post_recv(io, s, slot, from),
        Op::Send {
            from,
            start,
            end,
            more,
        } if slot.runs[idx(from)].holds() => {
            bulk::send(io, s, slot, from, (end - start, more), now)
        }
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
            let to = live.fds[idx(from.other())];
            if more {
                // SAFETY: as above; the flow holds them past this call,
                // and send(2) has copied what it took when it returns.
                let slice = unsafe { std::slice::from_raw_parts(bytes, end - start) };
                if let Some(sent) = send_corked_now(to, slice) {
                    return live.flow.handle_sent(from, sent, now);
                }
            }
            let more = if more { libc::MSG_MORE } else { 0 };
            let entry = opcode::Send::new(types::Fd(to), bytes, (end - start) as u32)
                .flags(libc::MSG_NOSIGNAL | more)
                .build()
                .user_data(tag(Kind::Send, side_arg(from)).encode());
            slot.in_flight += 1;
            io.push(entry);
        }
        Op::Shutdown { side } => {
            // Everything before this FIN has gone, and no read follows it:
            // the direction's buffer goes back to the pool now, not when
            // the other side's FIN ends the flow.
            slot.held[idx(side.other())].release(io.pool);
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

/// The corked last write, made at once rather than submitted: a submitted
/// one completes corked at the turn's end, and the shutdown that releases
/// it (bytes and FIN in one segment) would wait for a later turn to read
/// that completion. Made here, the flow asks for the shutdown in this same
/// turn. `None` where the socket has no room (the write is submitted
/// instead, to wait for it).
fn send_corked_now(fd: RawFd, bytes: &[u8]) -> Option<Result<usize, ()>> {
    // SAFETY: the flow holds `fd` open for as long as this call.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    match crate::tcp::syscall::send_more_now(fd, bytes) {
        Ok(n) => Some(Ok(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
        Err(_) => Some(Err(())),
    }
}

/// Posts a read on `side`, into a buffer the kernel picks when bytes
/// arrive; the buffer this direction held (its bytes all passed on) goes
/// back to the pool first.
pub(super) fn post_recv(io: &mut Io<'_>, s: u32, slot: &mut Slot, side: Side) {
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
/// what is in flight on them is cancelled (when anything is: a cancel by
/// descriptor walks the ring's whole poll table).
pub(super) fn close_flow(io: &mut Io<'_>, s: u32, slot: &mut Slot, how: Closing) {
    let fds = slot.live.as_ref().map_or([-1, -1], |l| l.fds);
    let tag = Tag {
        slot: s,
        gen: slot.gen,
        kind: Kind::Cleanup,
        arg: 0,
    };
    let quiet = slot.in_flight == 0;
    for fd in fds.into_iter().filter(|&fd| fd >= 0) {
        match how {
            Closing::Reset => set_linger_zero(fd),
            // SAFETY: shutdown(2) on a socket the flow holds.
            Closing::Graceful => unsafe {
                libc::shutdown(fd, libc::SHUT_WR);
            },
            Closing::Close => {}
        }
        if quiet {
            close(io, fd, tag, slot);
        } else {
            cancel_and_close(io, fd, tag, slot);
        }
    }
}

/// Closes `fd`, on which nothing is in flight.
fn close(io: &mut Io<'_>, fd: RawFd, tag: Tag, slot: &mut Slot) {
    let close = opcode::Close::new(types::Fd(fd))
        .build()
        .user_data(tag.encode());
    slot.in_flight += 1;
    io.push(close);
}

/// Cancels every operation on `fd`, then closes it (hard-linked, so the
/// close waits for the cancel whatever it finds).
pub(super) fn cancel_and_close(io: &mut Io<'_>, fd: RawFd, tag: Tag, slot: &mut Slot) {
    let tag = tag.encode();
    let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
        .build()
        .user_data(tag)
        .flags(squeue::Flags::IO_HARDLINK);
    let close = opcode::Close::new(types::Fd(fd)).build().user_data(tag);
    slot.in_flight += 2;
    io.push_all(&[cancel, close]);
}

/// SO_LINGER 0: the close sends an RST (as the tokio engine's `copy::reset`).
pub(super) fn set_linger_zero(fd: RawFd) {
    let _ = with_socket(fd, |s| s.set_linger(Some(Duration::ZERO)));
}

/// Closes `fd` with a reset (a refused client: nothing was posted on it).
pub(super) fn reset_now(fd: RawFd) {
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

/// The address of `fd`'s peer.
pub(super) fn peer_of(fd: RawFd) -> Option<SocketAddr> {
    with_socket(fd, |s| s.peer_addr()).ok()?.as_socket()
}

/// The local address `fd` is bound to.
pub(super) fn local_of(fd: RawFd) -> Option<SocketAddr> {
    with_socket(fd, |s| s.local_addr()).ok()?.as_socket()
}

/// `f` on socket2's view of `fd`, a socket the caller holds open.
fn with_socket<T>(fd: RawFd, f: impl FnOnce(socket2::SockRef<'_>) -> T) -> T {
    // SAFETY: the socket stays open for the borrow; SockRef does not close it.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    f(socket2::SockRef::from(&borrowed))
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
