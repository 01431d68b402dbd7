//! The edges of the flows the kernel forwards: one epoll set per worker
//! thread over the member sockets of all its forwarded flows, watched for
//! end of stream and errors only (`EPOLLRDHUP | EPOLLERR`, edge-triggered),
//! and one dispatcher task per worker that reads it and wakes the flow an
//! edge belongs to. Not `EPOLLIN`: the verdict consumes every skb and the
//! kernel still signals readable for each, and a wakeup per packet is what
//! made this engine cost CPU in userspace at all; `ep_poll_callback` drops
//! those wakeups by key. One set per worker, not per flow: a forwarded flow
//! holds its two sockets and no third descriptor.
//!
//! Workers are single-threaded runtimes, so the set and its slots live in a
//! thread-local; a flow's future holds only its slot number (and stays `Send`).

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::task::{Poll, Waker};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tracing::warn;

/// Which socket of the flow an edge is on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Side {
    Client,
    Backend,
}

/// What an edge says about its socket.
#[derive(Clone, Copy, Debug)]
pub(super) struct Edge {
    pub(super) side: Side,
    /// The peer sent FIN, or the socket hung up.
    pub(super) closed: bool,
    /// An error is pending on the socket (read it with `SO_ERROR`).
    pub(super) error: bool,
}

/// The events a member socket is watched for.
const EDGE_EVENTS: u32 = (libc::EPOLLRDHUP | libc::EPOLLERR | libc::EPOLLET) as u32;

/// Events the dispatcher takes from the set per `epoll_wait`.
const BATCH: usize = 64;

/// A flow's slot: the edges seen and not yet taken, and who to wake.
#[derive(Default)]
struct Slot {
    /// `Edge` bits per side: [client, backend] × (closed, error).
    pending: [(bool, bool); 2],
    waker: Option<Waker>,
}

/// This worker's set: its epoll descriptor (owned by the dispatcher's
/// `AsyncFd`) and the slots of the flows in it.
struct Set {
    epoll: RawFd,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
}

thread_local! {
    static SET: RefCell<Option<Set>> = const { RefCell::new(None) };
}

/// A flow's two sockets in this worker's set; out of it on drop.
pub(super) struct Watched {
    slot: usize,
    epoll: RawFd,
    fds: [RawFd; 2],
}

impl Watched {
    /// Adds the flow's sockets to this worker's set (made, with its
    /// dispatcher, on the first flow). An edge already there (a FIN that
    /// came first) is reported at once: `EPOLL_CTL_ADD` checks the state.
    pub(super) fn register(client: RawFd, backend: RawFd) -> io::Result<Watched> {
        let (slot, epoll) = SET.with(|set| -> io::Result<_> {
            let mut set = set.borrow_mut();
            if set.is_none() {
                *set = Some(start_set()?);
            }
            let set = set.as_mut().expect("made above");
            let slot = match set.free.pop() {
                Some(i) => i,
                None => {
                    set.slots.push(None);
                    set.slots.len() - 1
                }
            };
            set.slots[slot] = Some(Slot::default());
            Ok((slot, set.epoll))
        })?;
        // Made first, so a failed add below takes the slot (and any add that succeeded) out again.
        let mut watched = Watched {
            slot,
            epoll,
            fds: [-1, -1],
        };
        for (i, fd) in [client, backend].into_iter().enumerate() {
            epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, token(slot, i))?;
            watched.fds[i] = fd;
        }
        Ok(watched)
    }

    /// Waits for the flow's next edges (one per side at most) and writes
    /// them to `out`; how many.
    pub(super) async fn next(&self, out: &mut [Edge; 2]) -> usize {
        poll_fn(|cx| {
            SET.with(|set| {
                let mut set = set.borrow_mut();
                let Some(slot) = set
                    .as_mut()
                    .and_then(|s| s.slots.get_mut(self.slot))
                    .and_then(Option::as_mut)
                else {
                    return Poll::Pending;
                };
                let n = take_edges(&mut slot.pending, out);
                if n > 0 {
                    return Poll::Ready(n);
                }
                match &slot.waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => slot.waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            })
        })
        .await
    }
}

impl Drop for Watched {
    /// Out of the set before the slot is freed: the sockets may outlive
    /// this (they close after), and an edge of theirs must not reach the
    /// slot's next flow.
    fn drop(&mut self) {
        for fd in self.fds.into_iter().filter(|&fd| fd >= 0) {
            let _ = epoll_ctl(self.epoll, libc::EPOLL_CTL_DEL, fd, 0);
        }
        SET.with(|set| {
            if let Some(set) = set.borrow_mut().as_mut() {
                if let Some(s) = set.slots.get_mut(self.slot) {
                    *s = None;
                    set.free.push(self.slot);
                }
            }
        });
    }
}

/// Moves the pending edges into `out`; how many.
fn take_edges(pending: &mut [(bool, bool); 2], out: &mut [Edge; 2]) -> usize {
    let mut n = 0;
    for (i, side) in [Side::Client, Side::Backend].into_iter().enumerate() {
        let (closed, error) = std::mem::take(&mut pending[i]);
        if closed || error {
            out[n] = Edge {
                side,
                closed,
                error,
            };
            n += 1;
        }
    }
    n
}

/// The epoll event data of a flow's socket: its slot and which side.
fn token(slot: usize, side: usize) -> u64 {
    (slot as u64) << 1 | side as u64
}

/// Makes this worker's set and spawns its dispatcher on this runtime.
fn start_set() -> io::Result<Set> {
    // SAFETY: epoll_create1 returns a new descriptor or -1.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: the `OwnedFd` moves into the `AsyncFd`, which keeps it open
    // (and the same file) until it is dropped, with the dispatcher.
    let epoll = unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    tokio::spawn(dispatch(epoll));
    Ok(Set {
        epoll: fd,
        slots: Vec::new(),
        free: Vec::new(),
    })
}

/// The worker's dispatcher: takes the set's edges and wakes their flows,
/// for the life of the worker.
async fn dispatch(epoll: AsyncFd<OwnedFd>) {
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; BATCH];
    let failed = loop {
        match take(&epoll, &mut events).await {
            Ok(n) => deliver(&events[..n]),
            Err(e) => break e,
        }
    };
    stop(epoll, failed);
}

/// Waits for the set's next edges and takes up to [`BATCH`] of them.
async fn take(
    epoll: &AsyncFd<OwnedFd>,
    events: &mut [libc::epoll_event; BATCH],
) -> io::Result<usize> {
    loop {
        let mut ready = epoll.readable().await?;
        let taken = ready.try_io(|fd| {
            // SAFETY: `events` has room for BATCH entries; timeout 0 never blocks.
            let n =
                unsafe { libc::epoll_wait(fd.as_raw_fd(), events.as_mut_ptr(), BATCH as i32, 0) };
            match n {
                n if n < 0 => Err(io::Error::last_os_error()),
                0 => Err(io::ErrorKind::WouldBlock.into()),
                n => Ok(n as usize),
            }
        });
        match taken {
            Ok(Ok(n)) => return Ok(n),
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
            // Nothing more: the readiness is cleared; wait for the next.
            Err(_would_block) => {}
        }
    }
}

/// The dispatcher cannot go on (no such error is expected from an epoll
/// set): says so, and keeps the descriptor open, so the flows' removals
/// (`EPOLL_CTL_DEL` by number) never reach a reused descriptor.
fn stop(epoll: AsyncFd<OwnedFd>, e: io::Error) {
    warn!(error = %e, "sockmap: the edge set failed; its flows end at their idle timeout");
    std::mem::forget(epoll);
}

/// Records each edge in its flow's slot and wakes the flow.
fn deliver(events: &[libc::epoll_event]) {
    SET.with(|set| {
        let mut set = set.borrow_mut();
        let Some(set) = set.as_mut() else { return };
        for event in events {
            let (bits, data) = (event.events, event.u64);
            let (slot, side) = ((data >> 1) as usize, (data & 1) as usize);
            let Some(Some(slot)) = set.slots.get_mut(slot) else {
                continue;
            };
            let pending = &mut slot.pending[side];
            pending.0 |= bits & (libc::EPOLLRDHUP | libc::EPOLLHUP) as u32 != 0;
            pending.1 |= bits & libc::EPOLLERR as u32 != 0;
            if let Some(w) = slot.waker.take() {
                w.wake();
            }
        }
    });
}

fn epoll_ctl(epoll: RawFd, op: libc::c_int, fd: RawFd, data: u64) -> io::Result<()> {
    let mut event = libc::epoll_event {
        events: EDGE_EVENTS,
        u64: data,
    };
    // SAFETY: both descriptors are open; `event` is valid for the call.
    if unsafe { libc::epoll_ctl(epoll, op, fd, &mut event) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
