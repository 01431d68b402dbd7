//! The cross-zone delay line: the copy for a flow whose node and pod are in
//! different availability zones, holding each direction for the hop's
//! one-way delay (half of `cross_zone_rtt`) so the added latency is real in
//! the data path. Same-zone flows never come here: they take [`super::copy`].
//!
//! How it works: per direction, what is read at time `t` is queued with the
//! due time `t + one_way`, in order, and written on once due; end of stream
//! (half-close) is queued the same way and forwarded as `shutdown(Write)` at
//! its own due time (without half-close, by the close that then ends the flow). One timer per flow (the one its connect's handshake wait
//! used) waits for the earlier head of the two queues, so a held flow costs no CPU and never blocks the worker or another
//! flow. The timer is a timerfd ([`HoldTimer`]): tokio's own timers round up
//! to the next millisecond and its driver parks in whole milliseconds, which
//! added 1 to 2 ms to every hold (about 3 ms to a request at the 2 ms default
//! RTT, more than the RTT itself); a timerfd fires within microseconds of its
//! time, for one more descriptor per cross-zone flow (tokio's timer is the
//! fallback when none can be had). Each hold is observed in
//! `lb_cross_zone_delay_seconds`, so the emulation's accuracy is visible.
//!
//! Reads that arrive within [`MERGE_WITHIN`] of each other share one queue
//! entry (released at the later one's due time, so nothing leaves early),
//! which keeps the queue to about `one_way / MERGE_WITHIN` entries whatever
//! the sender's write sizes.
//!
//! A read error (a reset from the pod, say, after it wrote its response) is
//! queued the same way: what was read before it is delivered first, and the
//! flow fails once the error falls due, `one_way` after it was seen, as a
//! reset crossing the hop behind the data would. A write error is the
//! receiver's own and fails the flow at once, as in the normal copy.
//!
//! Memory and backpressure: a direction stops reading once [`IN_FLIGHT_BOUND`]
//! (256 KiB) is held, and every delay line of the process draws its held
//! bytes from one atomic budget, [`PROCESS_BUDGET`] (256 MiB). A line that
//! gets no budget stops reading; the sender's socket buffer then fills and
//! TCP's window closes on it, so neither a fast sender nor many clients that
//! stop reading can grow memory without limit (at `max_connections`
//! 100,000, the per-flow bound alone would allow 2 × 256 KiB × 100,000 =
//! 49 GiB; the budget keeps it to 256 MiB). It never deadlocks: a line with
//! nothing in flight may always take [`OVER_BUDGET_READ`] (4 KiB), and a
//! line with bytes in flight is woken by its own timer or receiver, so every
//! line moves on; the budget is thus exceeded by at most 4 KiB per stalled
//! direction. The budget counts held bytes, two atomic adds per read and one
//! per write; a line's buffer may be up to twice what it holds while it
//! grows. Once drained, a line keeps [`IDLE_CAPACITY`] (4 KiB) of its
//! buffer, so small requests and responses do not allocate each time, and
//! gives back the rest.
//!
//! How close the emulation is:
//! - latency: each direction pays `one_way` (plus the timer's wake-up, tens
//!   of microseconds), so a request/response pays one RTT; the handshake to
//!   the pod pays one more (see [`handshake_delay`]);
//! - throughput: at most `IN_FLIGHT_BOUND` bytes are in flight one way, so a
//!   bulk transfer is capped at `IN_FLIGHT_BOUND / one_way` per direction:
//!   the same cap as a TCP window of `2 × IN_FLIGHT_BOUND` over the RTT, which
//!   is how a longer RTT slows a real window-limited transfer. That is
//!   256 KiB / 1 ms = 250 MiB/s (about 2 Gbit/s) at the 2 ms default RTT and
//!   25 MiB/s at 20 ms (measured, debug build: 167 to 179 MiB/s and 23 MiB/s;
//!   reads merged within [`MERGE_WITHIN`] leave together, up to that late);
//!   all cross-zone flows together are capped at `PROCESS_BUDGET / one_way`
//!   (250 GiB/s at 2 ms, never the limit). Slow start,
//!   congestion control and per-packet ACK clocking across the hop are not
//!   emulated: the line's two sides are fast local TCP connections;
//! - not emulated: loss, jitter, reordering, bandwidth limits of the link.
//!
//! The idle timeout, byte counters and outcomes are those of [`super::copy`]:
//! bytes are counted when read, "moved" means read or written, and a flow
//! cut at shutdown ends once its queued end of stream (or a write into the
//! cut socket) falls due, at most `one_way` later.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus::{Histogram, IntCounter};
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::copy::{
    pump, shutdown_write, CopyOutcome, Ending, Pumped, Transferred, READS_PER_POLL, SCRATCH,
    SCRATCH_LEN,
};

/// Most bytes one direction holds in the line before it stops reading.
pub const IN_FLIGHT_BOUND: usize = 256 << 10;
/// Most bytes all delay lines of the process hold together.
pub const PROCESS_BUDGET: usize = 256 << 20;
/// What a line with nothing in flight may read when the budget is spent, so
/// no line waits forever on the others.
pub const OVER_BUDGET_READ: usize = 4 << 10;
/// The buffer a drained line keeps, so small messages need no allocation.
const IDLE_CAPACITY: usize = 4 << 10;
/// The budget every flow's delay line draws from.
static PROCESS_HELD: Budget = Budget::new(PROCESS_BUDGET);
/// Reads this close together share one queue entry: they are released
/// together, the earlier ones up to this much late.
const MERGE_WITHIN: Duration = Duration::from_millis(1);

/// How long the connect to a cross-zone pod waits before it starts: the
/// handshake's round trip (SYN out, SYN-ACK back), `2 × one_way`.
///
/// The wait comes *before* the connect rather than after it, so the
/// connect's outcome (accepted, refused) reaches the balancer a round trip
/// after it began, as it would across zones, and the pod does not see the
/// connection (and start a server-speaks-first greeting) a whole round trip
/// early. No socket is held while waiting. The PROXY header, written right
/// after the connect, is not delayed, but the data behind it is, so the pod
/// still receives everything in order.
pub fn handshake_delay(one_way: Duration) -> Duration {
    one_way * 2
}

/// Waits `for_how_long` on the flow's timer (see [`HoldTimer`]): the
/// handshake's wait, as precise as the holds of the data, on the timer the
/// copy then uses.
pub async fn pause(timer: &mut HoldTimer, for_how_long: Duration) {
    let due = Instant::now() + for_how_long;
    poll_fn(|cx| timer.poll_until(cx, due)).await
}

/// Copies both ways through the delay line until the flow ends as `ending`
/// says: [`super::copy::bidirectional`],
/// with each direction held for `one_way`. `held` observes how long each
/// queue entry was held, from its first read to its last byte written;
/// `hold` is the flow's timer (the one its connect paused on).
#[allow(clippy::too_many_arguments)]
pub async fn bidirectional(
    client: &TcpStream,
    backend: &TcpStream,
    one_way: Duration,
    ending: Ending,
    sent_to_backend: Option<&IntCounter>,
    received_from_backend: Option<&IntCounter>,
    held: Option<&Histogram>,
    hold: HoldTimer,
) -> (CopyOutcome, Transferred) {
    let counters = [sent_to_backend, received_from_backend];
    copy_held(
        client,
        backend,
        one_way,
        ending,
        counters,
        held,
        hold,
        &PROCESS_HELD,
    )
    .await
}

/// [`bidirectional`], drawing on `budget`.
#[allow(clippy::too_many_arguments)]
async fn copy_held(
    client: &TcpStream,
    backend: &TcpStream,
    one_way: Duration,
    ending: Ending,
    [sent_to_backend, received_from_backend]: [Option<&IntCounter>; 2],
    held: Option<&Histogram>,
    mut hold: HoldTimer,
    budget: &Budget,
) -> (CopyOutcome, Transferred) {
    let mut up = Line::new(one_way, sent_to_backend, held, budget);
    let mut down = Line::new(one_way, received_from_backend, held, budget);
    let outcome = pump(
        client,
        backend,
        ending,
        &mut up,
        &mut down,
        |cx, up, down| {
            let next_due = [up.waiting_until(), down.waiting_until()]
                .into_iter()
                .flatten()
                .min();
            if next_due.is_some_and(|due| hold.poll_until(cx, due).is_ready()) {
                // Something fell due meanwhile: deliver it on the next poll.
                cx.waker().wake_by_ref();
            }
        },
    )
    .await;
    let moved = Transferred {
        client_to_backend: up.read,
        backend_to_client: down.read,
        spliced: 0,
    };
    (outcome, moved)
}

/// Bytes read close together, and when they may be written on.
struct Entry {
    /// The due time of the first read in the entry: later reads join it only
    /// within [`MERGE_WITHIN`] of this.
    first_due: Instant,
    /// The due time of the last read in the entry: the entry leaves then.
    due: Instant,
    /// Bytes of the entry still to write (the front of [`Line::bytes`]).
    len: usize,
}

/// One direction of a cross-zone flow: what was read, waiting for its due time.
struct Line<'a> {
    one_way: Duration,
    /// The held bytes, in order; [`Line::entries`] says when each run is due.
    bytes: VecDeque<u8>,
    entries: VecDeque<Entry>,
    /// End of stream was read; it is forwarded at this time, after every byte.
    eof_due: Option<Instant>,
    /// A read failed; the flow fails at this time, after every byte before it.
    failure: Option<(Instant, io::Error)>,
    write_shut: bool,
    /// Bytes are due but the receiver cannot take them: its write readiness,
    /// not the timer, wakes the flow.
    blocked: bool,
    /// Bytes read from this direction's sender.
    read: u64,
    counter: Option<&'a IntCounter>,
    held: Option<&'a Histogram>,
    /// Where the held bytes are accounted: `bytes.len()` of it is this line's.
    budget: &'a Budget,
}

/// What [`Line::deliver`] left behind.
enum Delivered {
    /// Everything due is written; the rest is not due yet.
    UpToDate,
    /// Bytes are due but the receiver cannot take them: its write readiness will wake us.
    Blocked,
}

impl<'a> Line<'a> {
    fn new(
        one_way: Duration,
        counter: Option<&'a IntCounter>,
        held: Option<&'a Histogram>,
        budget: &'a Budget,
    ) -> Self {
        Line {
            one_way,
            bytes: VecDeque::new(),
            entries: VecDeque::new(),
            eof_due: None,
            failure: None,
            write_shut: false,
            blocked: false,
            read: 0,
            counter,
            held,
            budget,
        }
    }

    /// Whether the line has stopped reading: end of stream or an error came.
    fn stopped_reading(&self) -> bool {
        self.eof_due.is_some() || self.failure.is_some()
    }

    /// When this direction next has something to deliver (bytes, else end of
    /// stream or its failure), unless it is waiting for the receiver instead.
    fn waiting_until(&self) -> Option<Instant> {
        if self.blocked || self.write_shut {
            return None;
        }
        match self.entries.front() {
            Some(entry) => Some(entry.due),
            None => self.eof_due.or(self.failure.as_ref().map(|(due, _)| *due)),
        }
    }

    /// Writes every due byte the receiver takes; forwards a due end of stream,
    /// or fails with a due read error, once nothing is left before it.
    fn deliver(
        &mut self,
        cx: &mut Context<'_>,
        to: &TcpStream,
        other_finished: bool,
        moved: &mut bool,
    ) -> io::Result<Delivered> {
        let now = Instant::now();
        while let Some(entry) = self.entries.front_mut() {
            if entry.due > now {
                return Ok(Delivered::UpToDate);
            }
            match to.poll_write_ready(cx) {
                Poll::Pending => return Ok(Delivered::Blocked),
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Ready(Ok(())) => {}
            }
            let (head, _) = self.bytes.as_slices();
            let len = entry.len.min(head.len());
            match to.try_write(&head[..len]) {
                Ok(n) => {
                    *moved = true;
                    entry.len -= n;
                    if entry.len == 0 {
                        let first_read = entry.first_due - self.one_way;
                        if let Some(h) = self.held {
                            h.observe(first_read.elapsed().as_secs_f64());
                        }
                        self.entries.pop_front();
                    }
                    self.bytes.drain(..n);
                    self.budget.release(n);
                }
                // Readiness was cleared: the next poll_write_ready registers us.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        // Drained: keep a little for the next message, give the rest back.
        self.bytes.shrink_to(IDLE_CAPACITY);
        if self.failure.as_ref().is_some_and(|(due, _)| *due <= now) {
            if let Some((_, e)) = self.failure.take() {
                return Err(e);
            }
        }
        if self.eof_due.is_some_and(|due| due <= now) {
            // Pass the FIN on; the other direction stays open (half-close). As
            // in the normal copy, skip the syscall when the other direction is
            // finished, or the flow ends here (no half-close): both sockets are
            // about to be closed, which sends it.
            if !other_finished {
                shutdown_write(to)?;
            }
            self.write_shut = true;
        }
        Ok(Delivered::UpToDate)
    }

    /// Reads while there is room in the line and read budget left: `Ready(Ok)`
    /// when the budget ran out, `Pending` when nothing more can be read now.
    fn take_in(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        moved: &mut bool,
    ) -> Poll<io::Result<()>> {
        let mut reads = 0;
        while !self.stopped_reading() && self.bytes.len() < IN_FLIGHT_BOUND {
            if reads == READS_PER_POLL {
                return Poll::Ready(Ok(()));
            }
            match from.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => {
                    self.fail_after_one_way(e);
                    break;
                }
                Poll::Ready(Ok(())) => {}
            }
            let room = (IN_FLIGHT_BOUND - self.bytes.len()).min(SCRATCH_LEN);
            let granted = self.budget.reserve(room, self.bytes.is_empty());
            if granted == 0 {
                // Out of budget with bytes in flight: delivering them (timer
                // or receiver) wakes us, and then there is room again.
                return Poll::Pending;
            }
            reads += 1;
            let read = self.read_once(from, granted);
            // The budget holds what was read, no more.
            self.budget
                .release(granted - read.as_ref().map_or(0, |&n| n));
            match read {
                Ok(0) => self.eof_due = Some(Instant::now() + self.one_way),
                Ok(n) => {
                    *moved = true;
                    self.read += n as u64;
                    if let Some(c) = self.counter {
                        c.inc_by(n as u64);
                    }
                }
                // Readiness was cleared: the next poll_read_ready registers us.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => self.fail_after_one_way(e),
            }
        }
        // Full, at end of stream or failed: the timer or the receiver wakes us.
        Poll::Pending
    }

    /// Queues a read error behind the bytes read before it, as a reset
    /// crossing the hop would arrive: the flow fails once it falls due.
    fn fail_after_one_way(&mut self, e: io::Error) {
        self.failure = Some((Instant::now() + self.one_way, e));
    }

    /// One read of at most `room` bytes into the line, queued for
    /// `now + one_way`: the number of bytes, 0 at end of stream.
    fn read_once(&mut self, from: &TcpStream, room: usize) -> io::Result<usize> {
        let n = SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let n = from.try_read(&mut scratch[..room])?;
            self.bytes.extend(&scratch[..n]);
            Ok::<_, io::Error>(n)
        })?;
        if n > 0 {
            self.enqueue(n, Instant::now() + self.one_way);
        }
        Ok(n)
    }

    /// Queues `len` bytes due at `due`, joining the last entry when it opened
    /// less than [`MERGE_WITHIN`] earlier (the entry then leaves at `due`).
    fn enqueue(&mut self, len: usize, due: Instant) {
        match self.entries.back_mut() {
            Some(last) if due.duration_since(last.first_due) < MERGE_WITHIN => {
                last.len += len;
                last.due = due;
            }
            _ => self.entries.push_back(Entry {
                first_due: due,
                due,
                len,
            }),
        }
    }
}

impl Pumped for Line<'_> {
    fn done(&self) -> bool {
        self.write_shut
    }

    /// Delivers what is due and takes in what has arrived while there is
    /// room; the caller waits for [`Line::waiting_until`]. Sets `moved` when
    /// bytes moved.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        other_finished: bool,
        moved: &mut bool,
    ) -> Poll<io::Result<()>> {
        if self.write_shut {
            return Poll::Ready(Ok(()));
        }
        match self.deliver(cx, to, other_finished, moved) {
            Ok(delivered) => self.blocked = matches!(delivered, Delivered::Blocked),
            Err(e) => return Poll::Ready(Err(e)),
        }
        if self.write_shut {
            return Poll::Ready(Ok(()));
        }
        match self.take_in(cx, from, moved) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {
                // Out of read budget for this poll: let other tasks run.
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for Line<'_> {
    fn drop(&mut self) {
        // Bytes never delivered (the flow failed or was cut) free their budget.
        self.budget.release(self.bytes.len());
    }
}

/// Bytes held by delay lines, against a limit: one atomic, shared by every
/// line that draws on it (every flow's draws on [`PROCESS_HELD`]).
struct Budget {
    held: AtomicUsize,
    limit: usize,
}

impl Budget {
    const fn new(limit: usize) -> Self {
        Budget {
            held: AtomicUsize::new(0),
            limit,
        }
    }

    /// Takes up to `want` bytes of budget and says how many it got: what is
    /// left under the limit, or, for a line with nothing in flight
    /// (`line_empty`) when nothing is left, [`OVER_BUDGET_READ`], so that
    /// line still moves on. 0 means stop reading.
    fn reserve(&self, want: usize, line_empty: bool) -> usize {
        let mut granted = 0;
        let _ = self
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                granted = want.min(self.limit.saturating_sub(held));
                if granted == 0 && line_empty {
                    granted = want.min(OVER_BUDGET_READ);
                }
                (granted > 0).then_some(held + granted)
            });
        granted
    }

    /// Gives back `bytes` the line no longer holds.
    fn release(&self, bytes: usize) {
        if bytes > 0 {
            self.held.fetch_sub(bytes, Ordering::Relaxed);
        }
    }

    #[cfg(test)]
    fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// A flow's timer: a timerfd armed for the next due time, or, where no
/// descriptor can be had, a tokio sleep (millisecond resolution). The UDP
/// plane's delay line ([`crate::udp::delay`]) holds one per worker and frontend;
/// a TCP flow holds one, from its connect's pause to the end of its copy.
pub struct HoldTimer {
    fd: Option<AsyncFd<OwnedFd>>,
    /// The due time the timerfd is armed for.
    armed: Option<Instant>,
    fallback: Option<Pin<Box<Sleep>>>,
}

impl HoldTimer {
    /// A timer for one flow; no descriptor is taken when none may be had.
    // Not `Default`: it takes a descriptor, which a default should not hide.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        HoldTimer {
            fd: timerfd().ok(),
            armed: None,
            fallback: None,
        }
    }

    /// `Ready` once `due` has come; otherwise arms for it and registers the task.
    pub(crate) fn poll_until(&mut self, cx: &mut Context<'_>, due: Instant) -> Poll<()> {
        loop {
            let now = Instant::now();
            if due <= now {
                return Poll::Ready(());
            }
            let Some(fd) = &self.fd else {
                return self.poll_fallback(cx, due);
            };
            if self.armed != Some(due) {
                if arm(fd.get_ref(), due - now).is_err() {
                    self.fd = None;
                    continue;
                }
                self.armed = Some(due);
            }
            let mut ready = match fd.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(ready)) => ready,
                Poll::Ready(Err(_)) => {
                    self.fd = None;
                    continue;
                }
            };
            // Read the expiry count so the next arming starts clean; EAGAIN
            // (not expired yet) clears the readiness and registers us again.
            let raw = ready.get_ref().get_ref().as_raw_fd();
            match ready.try_io(|_| read_expiries(raw)) {
                Ok(Ok(())) => self.armed = None,
                Ok(Err(_)) => {
                    self.fd = None;
                }
                Err(_would_block) => {}
            }
        }
    }

    fn poll_fallback(&mut self, cx: &mut Context<'_>, due: Instant) -> Poll<()> {
        let sleep = self
            .fallback
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        if sleep.deadline() != due {
            sleep.as_mut().reset(due);
        }
        sleep.as_mut().poll(cx)
    }
}

/// A non-blocking CLOCK_MONOTONIC timerfd (the clock `Instant` reads),
/// registered with the worker's reactor; refused over the fd reserve.
fn timerfd() -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: timerfd_create takes no pointers; a non-negative result is a new descriptor.
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if !crate::fds::data_plane_may_hold(fd.as_raw_fd()) {
        return Err(crate::fds::reserve_reached());
    }
    // SAFETY: the AsyncFd owns the descriptor; nothing else closes or replaces it.
    unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)
}

/// Arms `fd` to expire once, `after` from now.
fn arm(fd: &OwnedFd, after: Duration) -> io::Result<()> {
    let spec = libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
        it_value: libc::timespec {
            tv_sec: after.as_secs() as libc::time_t,
            // Never all zero, which would disarm instead.
            tv_nsec: after.subsec_nanos().max(1) as libc::c_long,
        },
    };
    // SAFETY: a valid itimerspec for a timerfd we own; the old value is not asked for.
    let r = unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads a timerfd's expiry count: `WouldBlock` when it has not expired.
fn read_expiries(fd: i32) -> io::Result<()> {
    let mut count = [0u8; 8];
    // SAFETY: reading 8 bytes into an 8-byte buffer from a descriptor we own.
    let n = unsafe { libc::read(fd, count.as_mut_ptr().cast(), count.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{loopback_pair as pair, pattern};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const ONE_WAY: Duration = Duration::from_millis(30);
    const IDLE: Duration = Duration::from_secs(10);

    /// (client, backend), with the delay line running between them on its own task.
    async fn through_line(
        one_way: Duration,
        idle: Duration,
    ) -> (
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<(CopyOutcome, Transferred)>,
    ) {
        let (client, proxy_client_side) = pair().await;
        let (proxy_backend_side, backend) = pair().await;
        let line = tokio::spawn(async move {
            bidirectional(
                &proxy_client_side,
                &proxy_backend_side,
                one_way,
                Ending::half_closing(idle),
                None,
                None,
                None,
                HoldTimer::new(),
            )
            .await
        });
        (client, backend, line)
    }

    /// Reads until end of stream or an error: the bytes, and whether it ended in an error.
    async fn read_until_closed(s: &mut TcpStream) -> (Vec<u8>, bool) {
        let mut got = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return (got, false),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(_) => return (got, true),
            }
        }
    }

    /// Every round pays both one-way delays (never less); the quickest of
    /// several pays little more, so a busy machine's slow rounds do not fail it.
    #[tokio::test(flavor = "current_thread")]
    async fn a_round_trip_pays_both_one_way_delays_and_no_more() {
        const ROUNDS: usize = 5;
        let (mut client, mut backend, line) = through_line(ONE_WAY, IDLE).await;
        let echo = tokio::spawn(async move {
            let mut arrivals = Vec::new();
            for _ in 0..ROUNDS {
                let mut buf = [0u8; 5];
                backend.read_exact(&mut buf).await.unwrap();
                arrivals.push(Instant::now());
                backend.write_all(&buf).await.unwrap();
            }
            (backend, arrivals)
        });
        let mut rounds = Vec::new();
        for _ in 0..ROUNDS {
            let sent = Instant::now();
            client.write_all(b"hello").await.unwrap();
            let mut back = [0u8; 5];
            client.read_exact(&mut back).await.unwrap();
            rounds.push((sent, sent.elapsed()));
            assert_eq!(&back, b"hello");
        }
        let (backend, arrivals) = echo.await.unwrap();
        for ((sent, rtt), arrived) in rounds.iter().zip(&arrivals) {
            assert!(
                *arrived - *sent >= ONE_WAY,
                "one way took {:?}",
                *arrived - *sent
            );
            assert!(*rtt >= 2 * ONE_WAY, "round trip took {rtt:?}");
        }
        let quickest = rounds.iter().map(|(_, rtt)| *rtt).min().unwrap();
        // Generous: CI runs on 2 busy cores; the timer itself is off by microseconds.
        assert!(
            quickest < 2 * ONE_WAY + Duration::from_millis(40),
            "the quickest of {ROUNDS} round trips took {quickest:?}"
        );
        drop((client, backend));
        let (outcome, moved) = line.await.unwrap();
        assert!(matches!(outcome, CopyOutcome::Completed), "{outcome:?}");
        let bytes = 5 * ROUNDS as u64;
        assert_eq!(
            (moved.client_to_backend, moved.backend_to_client),
            (bytes, bytes)
        );
    }

    /// A pod that writes its response and resets (SO_LINGER 0): the reset
    /// follows the bytes across the hop instead of outrunning them.
    #[tokio::test(flavor = "current_thread")]
    async fn a_reset_after_a_response_arrives_after_the_response() {
        const LEN: usize = 48 << 10;
        let (mut client, proxy_client_side) = pair().await;
        let (proxy_backend_side, mut backend) = pair().await;
        backend.write_all(&pattern(LEN, 4)).await.unwrap();
        crate::tcp::copy::reset(backend);
        // The line starts with the bytes and the reset both waiting to be read.
        let line = tokio::spawn(async move {
            let (outcome, _) = bidirectional(
                &proxy_client_side,
                &proxy_backend_side,
                ONE_WAY,
                Ending::half_closing(IDLE),
                None,
                None,
                None,
                HoldTimer::new(),
            )
            .await;
            // As the proxy does after a failure: reset the other side.
            crate::tcp::copy::reset(proxy_client_side);
            outcome
        });
        let (got, reset) = read_until_closed(&mut client).await;
        assert_eq!(
            got.len(),
            LEN,
            "the client got {} of {LEN} bytes",
            got.len()
        );
        assert!(got == pattern(LEN, 4), "the client got wrong bytes");
        assert!(reset, "the pod's reset was not passed on");
        let outcome = line.await.unwrap();
        assert!(matches!(outcome, CopyOutcome::Failed(_)), "{outcome:?}");
    }

    /// Lines sharing a budget that is nearly spent still get everything
    /// through, byte-exact, at the pace the budget allows (it never
    /// deadlocks), and give all of it back.
    #[tokio::test(flavor = "current_thread")]
    async fn lines_share_the_budget_and_give_it_back() {
        const LIMIT: usize = 8 << 10;
        const LEN: usize = 256 << 10;
        const FLOWS: usize = 2;
        const ONE_WAY: Duration = Duration::from_millis(2);
        static BUDGET: Budget = Budget::new(LIMIT);
        let started = Instant::now();
        let mut flows = Vec::new();
        for seed in 0..FLOWS as u8 {
            let (mut client, proxy_client_side) = pair().await;
            let (proxy_backend_side, mut backend) = pair().await;
            let line = tokio::spawn(async move {
                let counters = [None, None];
                let hold = HoldTimer::new();
                let (c, b) = (&proxy_client_side, &proxy_backend_side);
                copy_held(
                    c,
                    b,
                    ONE_WAY,
                    Ending::half_closing(IDLE),
                    counters,
                    None,
                    hold,
                    &BUDGET,
                )
                .await
            });
            let send = tokio::spawn(async move {
                client.write_all(&pattern(LEN, seed)).await.unwrap();
                client.shutdown().await.unwrap();
                client
            });
            let receive = tokio::spawn(async move {
                let (got, reset) = read_until_closed(&mut backend).await;
                backend.shutdown().await.unwrap();
                (got, reset, backend)
            });
            flows.push((seed, send, receive, line));
        }
        for (seed, send, receive, line) in flows {
            let (got, reset, backend) = receive.await.unwrap();
            assert!(
                !reset && got == pattern(LEN, seed),
                "flow {seed} got wrong bytes"
            );
            let client = send.await.unwrap();
            let (outcome, _) = line.await.unwrap();
            assert!(matches!(outcome, CopyOutcome::Completed), "{outcome:?}");
            drop((client, backend));
        }
        let took = started.elapsed();
        assert_eq!(BUDGET.held(), 0, "budget not given back");
        // At most LIMIT, plus one over-budget read per line, is read per one-way delay.
        let per_one_way = LIMIT + FLOWS * OVER_BUDGET_READ;
        let floor = ONE_WAY * ((FLOWS * LEN / per_one_way) as u32 - 1);
        assert!(
            took >= floor,
            "{FLOWS} × {LEN} bytes went through in {took:?}, under {floor:?}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn bulk_both_ways_is_byte_exact_and_half_close_is_held_then_forwarded() {
        const LEN: usize = 3 << 20;
        let (client, backend, line) = through_line(ONE_WAY, IDLE).await;
        let side = |mut s: TcpStream, out: Vec<u8>| {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let send = async {
                    w.write_all(&out).await.unwrap();
                    w.shutdown().await.unwrap();
                    Instant::now()
                };
                let mut got = Vec::new();
                let receive = async {
                    r.read_to_end(&mut got).await.unwrap();
                    Instant::now()
                };
                let (fin_sent, eof_seen) = tokio::join!(send, receive);
                (got, fin_sent, eof_seen)
            })
        };
        let c = side(client, pattern(LEN, 1));
        let b = side(backend, pattern(LEN, 2));
        let (c_got, c_fin, c_eof) = c.await.unwrap();
        let (b_got, b_fin, b_eof) = b.await.unwrap();
        assert!(c_got == pattern(LEN, 2), "client got wrong bytes");
        assert!(b_got == pattern(LEN, 1), "backend got wrong bytes");
        assert!(b_eof >= c_fin + ONE_WAY, "the client's FIN arrived early");
        assert!(c_eof >= b_fin + ONE_WAY, "the backend's FIN arrived early");
        let (outcome, moved) = line.await.unwrap();
        assert!(matches!(outcome, CopyOutcome::Completed), "{outcome:?}");
        assert_eq!(moved.client_to_backend, LEN as u64);
        assert_eq!(moved.backend_to_client, LEN as u64);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_half_closed_flow_keeps_answering_the_other_way() {
        let (mut client, mut backend, line) = through_line(ONE_WAY, IDLE).await;
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut request = Vec::new();
        backend.read_to_end(&mut request).await.unwrap();
        assert_eq!(request, b"request");
        backend.write_all(b"response after FIN").await.unwrap();
        backend.shutdown().await.unwrap();
        let mut response = Vec::new();
        client.read_to_end(&mut response).await.unwrap();
        assert_eq!(response, b"response after FIN");
        let (outcome, _) = line.await.unwrap();
        assert!(matches!(outcome, CopyOutcome::Completed), "{outcome:?}");
    }

    /// The bound holds: with at most `IN_FLIGHT_BOUND` bytes per one-way
    /// delay, `k` bounds' worth take at least `k - 1` delays to get through.
    #[tokio::test(flavor = "current_thread")]
    async fn the_in_flight_bound_caps_throughput_at_bound_per_one_way_delay() {
        const BOUNDS: usize = 5;
        let (mut client, mut backend, line) = through_line(ONE_WAY, IDLE).await;
        let started = Instant::now();
        let sender = tokio::spawn(async move {
            client
                .write_all(&pattern(BOUNDS * IN_FLIGHT_BOUND, 3))
                .await
                .unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut got = Vec::new();
        backend.read_to_end(&mut got).await.unwrap();
        let took = started.elapsed();
        assert_eq!(got.len(), BOUNDS * IN_FLIGHT_BOUND);
        // Socket buffers hold some bytes outside the line, so allow one bound for them.
        let floor = ONE_WAY * (BOUNDS as u32 - 1);
        assert!(
            took >= floor,
            "{BOUNDS} bounds went through in {took:?}, under {floor:?}"
        );
        drop((sender.await.unwrap(), backend));
        line.await.unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_silent_flow_times_out_as_in_the_normal_copy() {
        let idle = Duration::from_millis(200);
        let (client, backend, line) = through_line(ONE_WAY, idle).await;
        let (outcome, moved) = line.await.unwrap();
        assert!(matches!(outcome, CopyOutcome::IdleTimeout), "{outcome:?}");
        assert_eq!((moved.client_to_backend, moved.backend_to_client), (0, 0));
        drop((client, backend));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_reset_from_the_backend_fails_the_flow() {
        let (client, backend, line) = through_line(ONE_WAY, IDLE).await;
        crate::tcp::copy::reset(backend);
        let (outcome, _) = line.await.unwrap();
        assert!(matches!(outcome, CopyOutcome::Failed(_)), "{outcome:?}");
        drop(client);
    }
}
