//! Bulk runs in the ring engine: once a read fills a whole pool buffer (the
//! socket had at least that much queued), that direction's next bytes go by
//! splice(2) through a pipe, socket → pipe → socket, never through
//! userspace, until a splice read comes back small: the rule of the tokio
//! engine's `auto` copy ([`crate::tcp::pipe`]). Request and response traffic
//! never starts a run, and costs what it did.
//!
//! The splices are plain syscalls from the loop's thread, not ring
//! operations: io_uring hands every `IORING_OP_SPLICE` to a worker thread
//! (`REQ_F_FORCE_ASYNC`), where it would block on its socket, a thread per
//! waiting flow. The ring only waits: a splice that finds nothing to read,
//! or no room to write, posts a one-shot poll, and is tried again when the
//! poll completes. A flow's sockets are blocking (the ring's connect needs
//! it, and its reads and writes wait by polling either way), and splice(2)
//! would block on a blocking socket whatever its flags say, so a flow's
//! first run makes both non-blocking (the ring's reads and writes on them
//! still wait for bytes and room: a unit test below pins that). A direction gives its pipe back whenever the pipe is
//! empty and the direction waits, so a flow that goes quiet holds none;
//! pipes are kept in a small stock per worker, so a run that waits often
//! does not create and size a pipe each time.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::{opcode, types};
use lb_core::tcp_flow::Side;

use super::ops::{idx, pass_read, post_recv, side_arg, Io, Kind, Slot, Tag};
use crate::tcp::copy::READS_PER_POLL;
use crate::tcp::pipe::{splice, Pipe, BULK_END_BELOW, BULK_STARTS_AT, CHUNK};

/// Empty pipes a worker keeps for its next runs, at most.
const STOCK: usize = 64;

/// A worker's empty pipes.
#[derive(Default)]
pub(super) struct Pipes {
    free: Vec<Pipe>,
}

impl Pipes {
    fn lend(&mut self) -> io::Result<Pipe> {
        match self.free.pop() {
            Some(pipe) => Ok(pipe),
            None => Pipe::new(),
        }
    }

    /// Takes back an empty pipe (one beyond the stock is closed).
    fn give_back(&mut self, pipe: Pipe) {
        if self.free.len() < STOCK {
            self.free.push(pipe);
        }
    }
}

/// One direction's bulk run.
#[derive(Default)]
pub(super) struct Run {
    /// The last read filled a buffer, or the last splice read was not
    /// small: the next read splices.
    bulk: bool,
    pipe: Option<Pipe>,
    /// Bytes in the pipe not yet passed on.
    in_pipe: usize,
    /// Splice reads since this direction last waited on the ring: bounded,
    /// so that one busy flow cannot keep the loop from the others.
    streak: usize,
    /// A send that found no room, tried again once its poll says there is:
    /// its length and whether more follows.
    waiting_send: Option<(usize, bool)>,
}

impl Run {
    /// Whether the next read of this direction splices.
    pub(super) fn is_bulk(&self) -> bool {
        self.bulk
    }

    /// Whether the bytes this direction passes on next are in its pipe.
    pub(super) fn holds(&self) -> bool {
        self.in_pipe > 0
    }

    /// A read into a pool buffer brought `n` bytes: a full one starts a run.
    pub(super) fn note_read(&mut self, n: usize) {
        if n >= BULK_STARTS_AT {
            self.bulk = true;
        }
    }

    /// The slot is freed: an empty pipe goes back to the stock, one still
    /// holding bytes (the flow ended mid-run) is closed.
    pub(super) fn clear(&mut self, pipes: &mut Pipes) {
        if let Some(pipe) = self.pipe.take() {
            if self.in_pipe == 0 {
                pipes.give_back(pipe);
            }
        }
        *self = Run::default();
    }
}

/// Carries out `Op::Recv` on `side` for a direction in a bulk run: a splice
/// into its pipe now, or a poll that waits for bytes. Where no pipe can be
/// had (fds short), the run ends and the read goes through the pool.
pub(super) fn recv(io: &mut Io<'_>, s: u32, slot: &mut Slot, side: Side, now: Duration) {
    // The read that started the run is passed on: its buffer goes back.
    slot.held[idx(side)].release(io.pool);
    let Some(fds) = slot.live.as_ref().map(|l| l.fds) else {
        return;
    };
    let fd = fds[idx(side)];
    if !slot.nonblocking {
        if fds.iter().all(|&fd| set_nonblocking(fd).is_ok()) {
            slot.nonblocking = true;
        } else {
            slot.runs[idx(side)].bulk = false;
            return post_recv(io, s, slot, side);
        }
    }
    let run = &mut slot.runs[idx(side)];
    if run.streak >= READS_PER_POLL {
        run.streak = 0;
        return wait(io, s, slot, side, Kind::Readable, fd);
    }
    let pipe = match run.pipe.take().map_or_else(|| io.pipes.lend(), Ok) {
        Ok(pipe) => pipe,
        Err(_) => {
            run.bulk = false;
            return post_recv(io, s, slot, side);
        }
    };
    let result = splice(fd, pipe.write_end(), CHUNK, false);
    let live = slot.live.as_mut().expect("checked above");
    match result {
        Ok(0) => {
            io.pipes.give_back(pipe);
            run.bulk = false;
            live.flow.handle_received(side, Ok(0), now);
        }
        Ok(n) => {
            run.pipe = Some(pipe);
            run.in_pipe = n;
            run.streak += 1;
            // A small read ends the run, and may be the last before a FIN:
            // where it is, its bytes leave corked with the FIN.
            let ends = n < BULK_END_BELOW;
            if ends {
                run.bulk = false;
            }
            pass_read(live, side, n, ends, now);
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            io.pipes.give_back(pipe);
            run.streak = 0;
            wait(io, s, slot, side, Kind::Readable, fd);
        }
        Err(_) => {
            io.pipes.give_back(pipe);
            live.flow.handle_received(side, Err(()), now);
        }
    }
}

/// Carries out `Op::Send` of the `len` bytes in `from`'s pipe to the other
/// side (`more`: more follow at once): a splice now, or a poll that waits
/// for room.
pub(super) fn send(
    io: &mut Io<'_>,
    s: u32,
    slot: &mut Slot,
    from: Side,
    (len, more): (usize, bool),
    now: Duration,
) {
    let Some(live) = slot.live.as_mut() else {
        return;
    };
    let to = live.fds[idx(from.other())];
    let run = &mut slot.runs[idx(from)];
    let Some(pipe) = run.pipe.as_ref() else {
        live.flow.handle_sent(from, Err(()), now);
        return;
    };
    match splice(pipe.read_end(), to, len.min(run.in_pipe), more) {
        Ok(n) if n > 0 => {
            run.in_pipe -= n;
            live.frontend.metrics.spliced_bytes.inc_by(n as u64);
            if run.in_pipe == 0 && !run.bulk {
                // The run is over: its pipe is not needed for the next read.
                if let Some(pipe) = run.pipe.take() {
                    io.pipes.give_back(pipe);
                }
            }
            live.flow.handle_sent(from, Ok(n), now);
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            run.waiting_send = Some((len, more));
            wait(io, s, slot, from, Kind::Writable, to);
        }
        Ok(_) | Err(_) => live.flow.handle_sent(from, Err(()), now),
    }
}

/// A bulk direction's poll completed (`kind`, the direction's `side` from
/// its tag): the splice it waited for is tried again.
pub(super) fn on_ready(
    io: &mut Io<'_>,
    s: u32,
    slot: &mut Slot,
    kind: Kind,
    side: Side,
    now: Duration,
) {
    match kind {
        Kind::Readable => recv(io, s, slot, side, now),
        Kind::Writable => {
            if let Some(waiting) = slot.runs[idx(side)].waiting_send.take() {
                send(io, s, slot, side, waiting, now);
            }
        }
        _ => {}
    }
}

/// Makes `fd` non-blocking, for splice(2) (flags other than `O_NONBLOCK`
/// that `F_SETFL` could change are never set on the flow's sockets).
fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a socket the flow holds open.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Posts a one-shot poll on `fd` for the direction from `side`: readable
/// for [`Kind::Readable`], writable for [`Kind::Writable`]. Errors and
/// hang-ups complete it too; the splice tried then reports them.
fn wait(io: &mut Io<'_>, s: u32, slot: &mut Slot, side: Side, kind: Kind, fd: RawFd) {
    let events = if kind == Kind::Readable {
        libc::POLLIN
    } else {
        libc::POLLOUT
    };
    let tag = Tag {
        slot: s,
        gen: slot.gen,
        kind,
        arg: side_arg(side),
    };
    let entry = opcode::PollAdd::new(types::Fd(fd), events as u32)
        .build()
        .user_data(tag.encode());
    slot.in_flight += 1;
    io.push(entry);
}

#[cfg(test)]
mod tests {
    use super::*;
    use io_uring::IoUring;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    /// What a bulk run relies on: once a flow's sockets are non-blocking, a
    /// read the ring posts still waits for bytes (the kernel polls for it)
    /// rather than failing at once with EAGAIN, which the flow would take as
    /// the peer failing.
    #[test]
    fn a_ring_read_on_a_non_blocking_socket_waits_for_bytes() {
        let Ok(mut ring) = IoUring::new(8) else {
            eprintln!("io_uring refused here: nothing to check");
            return;
        };
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut peer = TcpStream::connect(listener.local_addr().unwrap()).expect("connect");
        let (socket, _) = listener.accept().expect("accept");
        set_nonblocking(socket.as_raw_fd()).expect("O_NONBLOCK");
        let mut buf = [0u8; 16];
        let read = opcode::Recv::new(types::Fd(socket.as_raw_fd()), buf.as_mut_ptr(), 16)
            .build()
            .user_data(7);
        // SAFETY: `buf` outlives the read, which completes before the test returns.
        unsafe { ring.submission().push(&read).expect("room") };
        ring.submit().expect("submit");
        assert!(
            ring.completion().next().is_none(),
            "the read completed with nothing to read"
        );
        peer.write_all(b"bulk").expect("write");
        ring.submit_and_wait(1).expect("wait");
        let done = ring.completion().next().expect("a completion");
        assert_eq!((done.user_data(), done.result()), (7, 4));
        assert_eq!(&buf[..4], b"bulk");
    }
}
