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
//! thread-local; a flow's future holds plain numbers (the set's id, its slot,
//! descriptors) and stays `Send`. A registration made under another set (the
//! dispatcher ended, or another thread) finds its id gone and touches nothing.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Poll, Waker};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::runtime::{Handle, RuntimeFlavor};
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

/// This worker's set: its id, its epoll descriptor (closed with the set,
/// when its dispatcher ends) and the slots of the flows in it.
struct Set {
    id: u64,
    epoll: OwnedFd,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
}

/// Ids of sets, unique in the process.
static NEXT_SET: AtomicU64 = AtomicU64::new(1);

thread_local! {
    static SET: RefCell<Option<Set>> = const { RefCell::new(None) };
}

/// A flow's two sockets in this worker's set; out of it on drop.
pub(super) struct Watched {
    set: u64,
    slot: usize,
    epoll: RawFd,
    fds: [RawFd; 2],
}

impl Watched {
    /// Adds the flow's sockets to this worker's set (made, with its
    /// dispatcher, on the first flow). An edge already there (a FIN that
    /// came first) is reported at once: `EPOLL_CTL_ADD` checks the state.
    pub(super) fn register(client: RawFd, backend: RawFd) -> io::Result<Watched> {
        // The slots are this thread's: a runtime that moves tasks between
        // threads cannot use them (its flows are copied by `auto`).
        if Handle::current().runtime_flavor() != RuntimeFlavor::CurrentThread {
            return Err(io::Error::other(
                "the edge set needs a single-threaded worker",
            ));
        }
        let (set_id, slot, epoll) = with_set(|set| -> io::Result<_> {
            if set.is_none() {
                *set = Some(start_set()?);
            }
            let Some(set) = set.as_mut() else {
                unreachable!("made above")
            };
            let slot = match set.free.pop() {
                Some(i) => i,
                None => {
                    set.slots.push(None);
                    set.slots.len() - 1
                }
            };
            set.slots[slot] = Some(Slot::default());
            Ok((set.id, slot, set.epoll.as_raw_fd()))
        })
        .unwrap_or_else(|| Err(io::Error::other("thread is exiting")))?;
        // Made first, so a failed add below takes the slot (and any add that succeeded) out again.
        let mut watched = Watched {
            set: set_id,
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
    /// them to `out`; how many. `Err` when the set is gone (its dispatcher
    /// ended): no edge would ever come.
    pub(super) async fn next(&self, out: &mut [Edge; 2]) -> io::Result<usize> {
        poll_fn(|cx| {
            with_set(|set| {
                let Some(slot) = set
                    .as_mut()
                    .filter(|s| s.id == self.set)
                    .and_then(|s| s.slots.get_mut(self.slot))
                    .and_then(Option::as_mut)
                else {
                    return Poll::Ready(Err(io::Error::other("sockmap: the edge set is gone")));
                };
                let n = take_edges(&mut slot.pending, out);
                if n > 0 {
                    return Poll::Ready(Ok(n));
                }
                match &slot.waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => slot.waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            })
            .unwrap_or_else(|| Poll::Ready(Err(io::Error::other("thread is exiting"))))
        })
        .await
    }
}

impl Drop for Watched {
    /// Out of the set before the slot is freed: the sockets may outlive
    /// this (they close after), and an edge of theirs must not reach the
    /// slot's next flow. Under a set that is gone, nothing is touched (its
    /// descriptor may be another file's now).
    fn drop(&mut self) {
        let _ = with_set(|set| {
            let Some(set) = set.as_mut().filter(|s| s.id == self.set) else {
                return;
            };
            for fd in self.fds.into_iter().filter(|&fd| fd >= 0) {
                if epoll_ctl(self.epoll, libc::EPOLL_CTL_DEL, fd, 0).is_err() {
                    // Still in the set: keep the slot out of use rather than
                    // let a stale edge reach another flow.
                    return;
                }
            }
            if let Some(s) = set.slots.get_mut(self.slot) {
                if s.take().is_some() {
                    set.free.push(self.slot);
                }
            }
        });
    }
}

/// Runs `f` on this thread's set; `None` while the thread is exiting.
fn with_set<R>(f: impl FnOnce(&mut Option<Set>) -> R) -> Option<R> {
    SET.try_with(|set| f(&mut set.borrow_mut())).ok()
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
    // The set is data plane too: it must not take one of the control plane's
    // reserved descriptors (the flow is then copied by `auto`, and the next
    // flow tries again).
    if !crate::fds::data_plane_may_hold(fd) {
        return Err(crate::fds::reserve_reached());
    }
    // SAFETY: the descriptor stays open while the `AsyncFd` lives: the set
    // owns it, and the dispatcher (which holds the `AsyncFd`) drops the set
    // only after the `AsyncFd` (see `dispatch`).
    let epoll = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    let id = NEXT_SET.fetch_add(1, Relaxed);
    tokio::spawn(dispatch(id, epoll));
    Ok(Set {
        id,
        epoll: owned,
        slots: Vec::new(),
        free: Vec::new(),
    })
}

/// The worker's dispatcher: takes the set's edges and wakes their flows,
/// for the life of the worker. When it ends (an error, or its runtime
/// shutting down), the set goes with it: its flows' waits fail, and the
/// next flow on this thread starts a new set.
async fn dispatch(id: u64, epoll: AsyncFd<RawFd>) {
    // Locals drop in reverse: the registration (moved into a local after
    // the guard) goes first, then the set and its descriptor.
    let _set = EndsTheSet(id);
    let epoll = epoll;
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; BATCH];
    loop {
        match take(&epoll, &mut events).await {
            Ok(n) => deliver(&events[..n]),
            Err(e) => {
                warn!(error = %e, "sockmap: the edge set failed; its flows end, new flows start another");
                return;
            }
        }
        // Many edges at once (a mass cut) must not hold the worker.
        tokio::task::coop::consume_budget().await;
    }
}

/// Removes set `0` from this thread when dropped, if it is still the current one.
struct EndsTheSet(u64);

impl Drop for EndsTheSet {
    fn drop(&mut self) {
        let _ = with_set(|set| {
            if set.as_ref().is_some_and(|s| s.id == self.0) {
                *set = None;
            }
        });
    }
}

/// Waits for the set's next edges and takes up to [`BATCH`] of them.
async fn take(
    epoll: &AsyncFd<RawFd>,
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

/// Records each edge in its flow's slot, then wakes those flows (outside
/// the set's borrow: a waker may run code that uses it).
fn deliver(events: &[libc::epoll_event]) {
    let mut wake: [Option<Waker>; BATCH] = [const { None }; BATCH];
    let _ = with_set(|set| {
        let Some(set) = set.as_mut() else { return };
        for (event, waker) in events.iter().zip(wake.iter_mut()) {
            let (bits, data) = (event.events, event.u64);
            let (slot, side) = ((data >> 1) as usize, (data & 1) as usize);
            let Some(Some(slot)) = set.slots.get_mut(slot) else {
                continue;
            };
            let pending = &mut slot.pending[side];
            pending.0 |= bits & (libc::EPOLLRDHUP | libc::EPOLLHUP) as u32 != 0;
            pending.1 |= bits & libc::EPOLLERR as u32 != 0;
            *waker = slot.waker.take();
        }
    });
    for w in wake.into_iter().flatten() {
        w.wake();
    }
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
