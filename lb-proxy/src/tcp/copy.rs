//! Bidirectional copy with half-close (unless a frontend turns it off) and
//! an idle timeout.
//!
//! An idle proxied connection owns no buffer: reads go into one scratch buffer
//! per worker thread and are written straight on. Only when the peer cannot take
//! everything at once is the remainder kept, in a buffer owned by that direction
//! until it drains. Memory per idle connection is therefore the two sockets and
//! this future, not a buffer of [`SCRATCH_LEN`] bytes per direction.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use std::os::fd::{AsFd, AsRawFd};

use prometheus::IntCounter;
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::pipe::{is_fd_shortage, splice, Pipe, BULK_END_BELOW, BULK_STARTS_AT, CHUNK};
use super::syscall;
use crate::clock;

/// The per-worker read buffer, and the read size that marks a bulk transfer.
pub const SCRATCH_LEN: usize = 64 * 1024;
/// Reads per direction before yielding, so one busy connection can't starve the worker.
pub(super) const READS_PER_POLL: usize = 16;

thread_local! {
    pub(super) static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH_LEN].into_boxed_slice());
}

/// How a proxied connection ended.
#[derive(Debug)]
pub enum CopyOutcome {
    /// Both sides finished (each sent FIN, and it was passed on); without
    /// half-close, one side did.
    Completed,
    /// No bytes moved for the idle timeout.
    IdleTimeout,
    /// One side failed (reset, broken pipe...).
    Failed(io::Error),
}

impl CopyOutcome {
    /// How the flow log and the debug log name the outcome.
    pub fn as_str(&self) -> &'static str {
        match self {
            CopyOutcome::Completed => "closed",
            CopyOutcome::IdleTimeout => "idle-timeout",
            CopyOutcome::Failed(_) => "reset",
        }
    }
}

/// Bytes moved, from the balancer's point of view.
#[derive(Debug, Default, Clone, Copy)]
pub struct Transferred {
    pub client_to_backend: u64,
    pub backend_to_client: u64,
    /// Of those, the bytes that went through splice(2), both directions together.
    pub spliced: u64,
}

/// How bytes are moved between the two sockets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CopyMode {
    /// Per direction: the userspace copy, switching to splice(2) while reads
    /// come in full buffers (a bulk transfer) and back when they shrink. Takes
    /// the cheaper engine for each: request/response costs what `userspace`
    /// does, bulk moves at splice speed.
    #[default]
    Auto,
    /// read(2) into a per-worker buffer, write(2) out.
    Userspace,
    /// splice(2) through a pipe per direction: no copy through userspace, but 2 more fds per direction.
    Splice,
    /// Both sockets in a BPF SOCKHASH: the kernel forwards the bytes, no
    /// syscall per read or write ([`super::sockmap`]). Where BPF is not
    /// permitted, or a flow cannot join the map, the flow copies as `auto`.
    Sockmap,
}

/// How a flow ends, besides both sides finishing or one failing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ending {
    /// No bytes either way for this long: the idle timeout.
    pub idle: Duration,
    /// A FIN one way leaves the other way open (TCP half-close: the default,
    /// as HAProxy). Off, the first FIN either way ends the flow once the bytes
    /// before it are passed on: both connections are closed, as nginx stream
    /// does by default (`proxy_half_close off`). Cheaper per connection (no
    /// wait for the other side's FIN, no `shutdown`), but a client that
    /// half-closes after its request loses the answer, and bytes still
    /// arriving the other way are refused with a reset.
    pub half_close: bool,
}

impl Ending {
    /// The default ending: half-close, idle after `idle`.
    pub fn half_closing(idle: Duration) -> Self {
        Ending {
            idle,
            half_close: true,
        }
    }
}

fn clear_read_readiness(stream: &TcpStream) {
    let _ = stream.try_io(Interest::READABLE, || {
        Err::<(), _>(io::ErrorKind::WouldBlock.into())
    });
}

/// Makes a just-accepted client's first read wait for the reactor's word.
///
/// tokio marks an accepted stream readable before any event (so a server that
/// reads first tries at once), but a proxy reads its client only once the
/// backend is connected, and when the client's first bytes are not in by then
/// that read is a `recv` that returns EAGAIN: half the connections under
/// `hey` (0.53 of a syscall per connection; docs/research/new-connections.md,
/// "Change H"). Nothing is lost by waiting: the edge-triggered registration
/// reports bytes that arrived before it at the driver's next poll, as it does
/// bytes that arrive later, and no later than the backend's connect.
///
/// Only on a current-thread runtime (the workers'), and only in the accept's
/// own poll, before the runtime can poll its driver: a clear after the
/// driver has reported the client's bytes takes that readiness with it, and
/// the flow then waits for bytes that are already in until its idle timeout.
/// [`super::proxy::accept_client`] is the one caller, for that reason.
pub(super) fn forget_assumed_readable(client: &TcpStream) {
    debug_assert_eq!(
        tokio::runtime::Handle::current().runtime_flavor(),
        tokio::runtime::RuntimeFlavor::CurrentThread,
        "another thread's driver could report the client's bytes before the clear"
    );
    clear_read_readiness(client);
}

pub(super) fn shutdown_write(to: &impl AsFd) -> io::Result<()> {
    match SockRef::from(to).shutdown(Shutdown::Write) {
        Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
        _ => Ok(()),
    }
}

/// How one direction's bytes get from socket to socket. `Err(WouldBlock)`
/// from either step means "wait for readiness"; [`Direction`] does the rest.
trait Engine {
    /// Bytes read but not yet written on.
    fn has_pending(&self) -> bool;
    /// One attempt to write pending bytes to `to`.
    fn flush(&mut self, to: &TcpStream) -> io::Result<usize>;
    /// One read from `from` (written on at once where possible): `Ok(None)` at EOF.
    fn fill(&mut self, from: &TcpStream, to: &TcpStream) -> io::Result<Option<usize>>;
    /// `from` had nothing to read.
    fn drained(&mut self) {}
    /// This direction is finished.
    fn closed(&mut self) {}
    /// The last write was held back for the FIN known to follow it: the next
    /// read is that end of stream, and should not wait for another poll.
    fn holds_back(&self) -> bool {
        false
    }
    /// Bytes this engine has written on through splice(2).
    fn spliced(&self) -> u64 {
        0
    }
    /// The flow ends at this direction's FIN (no half-close): its sockets are
    /// closed right after, and a close with unread input the other way is a
    /// reset that discards what the send queue still holds, so nothing may be
    /// held back for the FIN.
    fn ends_at_fin(&mut self) {}
}

/// One direction of a proxied connection: the copy loop, half-close and read
/// budget, over either engine.
struct Direction<'a, E> {
    engine: E,
    read_closed: bool,
    write_shut: bool,
    bytes: u64,
    counter: Option<&'a IntCounter>,
    /// The frontend's `lb_frontend_spliced_bytes_total`.
    spliced: Option<&'a IntCounter>,
}

impl<'a, E: Engine> Direction<'a, E> {
    fn new(engine: E, counter: Option<&'a IntCounter>, spliced: Option<&'a IntCounter>) -> Self {
        Direction {
            engine,
            read_closed: false,
            write_shut: false,
            bytes: 0,
            counter,
            spliced,
        }
    }

    /// Passes on what the engine holds, counting what went by splice.
    fn flush(&mut self, to: &TcpStream) -> io::Result<usize> {
        let before = self.engine.spliced();
        let flushed = self.engine.flush(to);
        let spliced = self.engine.spliced() - before;
        if let Some(c) = self.spliced.filter(|_| spliced > 0) {
            c.inc_by(spliced);
        }
        flushed
    }
}

impl<E: Engine> Pumped for Direction<'_, E> {
    fn done(&self) -> bool {
        self.write_shut
    }

    /// Moves what is readable from `from` to `to`. Sets `moved` when bytes moved.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        other_finished: bool,
        moved: &mut bool,
    ) -> Poll<io::Result<()>> {
        let mut reads = 0;
        loop {
            if self.engine.has_pending() {
                match to.poll_write_ready(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => {}
                }
                match self.flush(to) {
                    Ok(_) => *moved = true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
                continue;
            }
            if self.read_closed {
                if !self.write_shut {
                    // Pass the FIN on; the other direction stays open (half-close).
                    // When the other direction has already finished (or the flow
                    // ends at this FIN, without half-close), both sockets are about
                    // to be closed, which sends this FIN anyway: skip the syscall.
                    // With half-close nothing is unread either way then, so
                    // close() cannot RST.
                    if !other_finished {
                        if let Err(e) = shutdown_write(to) {
                            return Poll::Ready(Err(e));
                        }
                    }
                    self.write_shut = true;
                    self.engine.closed();
                }
                return Poll::Ready(Ok(()));
            }
            if reads == READS_PER_POLL && !self.engine.holds_back() {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            match from.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            reads += 1;
            match self.engine.fill(from, to) {
                Ok(Some(n)) => {
                    *moved = true;
                    self.bytes += n as u64;
                    if let Some(c) = self.counter {
                        c.inc_by(n as u64);
                    }
                }
                Ok(None) => self.read_closed = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.engine.drained(),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// read(2) into the worker's scratch buffer and write(2) straight on; only a
/// remainder the peer could not take is kept, until it drains.
#[derive(Default)]
struct Userspace {
    pending: Vec<u8>,
    pending_from: usize,
    /// The last write was queued with MSG_MORE, held back because the
    /// source had already sent its FIN: the FIN passed on next rides in the
    /// same segment.
    corked: bool,
    /// Never hold bytes back for a FIN (without half-close, see
    /// [`Engine::ends_at_fin`]).
    no_hold_back: bool,
}

impl Engine for Userspace {
    fn ends_at_fin(&mut self) {
        self.no_hold_back = true;
    }

    fn has_pending(&self) -> bool {
        self.pending_from < self.pending.len()
    }

    fn flush(&mut self, to: &TcpStream) -> io::Result<usize> {
        let n = syscall::send(to, &self.pending[self.pending_from..], false)?;
        self.pending_from += n;
        if self.pending_from == self.pending.len() {
            // Give the memory back: an idle connection should hold none.
            self.pending = Vec::new();
            self.pending_from = 0;
        }
        Ok(n)
    }

    fn fill(&mut self, from: &TcpStream, to: &TcpStream) -> io::Result<Option<usize>> {
        let was_corked = std::mem::take(&mut self.corked);
        let read = SCRATCH.with(|scratch| self.forward(&mut scratch.borrow_mut(), from, to));
        if was_corked && read.is_err() {
            // Defensive: once the FIN is in, a TCP read returns data or end of
            // stream, never EAGAIN or an error. Were one to come anyway, send
            // what the cork holds rather than leave it to the next ACK.
            // (Bytes read push it with their own write; the end of stream
            // leaves it to the FIN passed on.)
            let _ = SockRef::from(to).set_tcp_cork(false);
        }
        read
    }

    fn holds_back(&self) -> bool {
        self.corked
    }
}

impl Userspace {
    /// One read into `scratch`, written straight on; a remainder `to` cannot
    /// take is kept as pending.
    fn forward(
        &mut self,
        scratch: &mut [u8],
        from: &TcpStream,
        to: &TcpStream,
    ) -> io::Result<Option<usize>> {
        let n = match syscall::recv(from, scratch)? {
            0 => return Ok(None),
            n => n,
        };
        // A short read drained the socket. If its FIN is already in, the next
        // read is the end of stream: hold this write back (MSG_MORE) so the FIN
        // passed on after it leaves in the same segment. One segment and one
        // peer ACK fewer per connection, where the peer closes after answering.
        let drained = n < scratch.len();
        let fin_follows = !self.no_hold_back && drained && finished_sending(from);
        // With `fin_follows`, as MSG_MORE: queued and held until a plain write,
        // the FIN, an incoming ACK or (at worst) about one RTO sends it.
        let written = match syscall::send(to, &scratch[..n], fin_follows) {
            Ok(w) => w,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        self.corked = fin_follows && written == n;
        if written < n {
            self.pending.extend_from_slice(&scratch[written..n]);
        }
        if drained {
            // Skip the read that would only return EAGAIN, and wait for the
            // next readiness edge instead. Safe on the workers' single-threaded
            // runtimes, where no new edge can be consumed between the read
            // above and this clear; a FIN already seen stays visible because
            // tokio never clears read-closed.
            clear_read_readiness(from);
        }
        Ok(Some(n))
    }
}

/// Whether `from`'s peer has sent its FIN (and no error is pending): what
/// the reactor has already seen, read without a syscall.
fn finished_sending(from: &TcpStream) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let ready = std::pin::pin!(from.ready(Interest::READABLE | Interest::ERROR));
    match ready.poll(&mut cx) {
        Poll::Ready(Ok(r)) => r.is_read_closed() && !r.is_error(),
        _ => false,
    }
}

/// The counters a copy adds to, each optional.
#[derive(Clone, Copy, Default)]
pub struct Counters<'a> {
    /// Bytes sent to the backend (`byte_metrics`).
    pub sent: Option<&'a IntCounter>,
    /// Bytes received from the backend (`byte_metrics`).
    pub received: Option<&'a IntCounter>,
    /// Bytes spliced either way (the frontend's `lb_frontend_spliced_bytes_total`).
    pub spliced: Option<&'a IntCounter>,
}

/// Copies both ways until both sides have finished (without half-close: one
/// has), one fails, or nothing moves for the idle timeout.
pub async fn bidirectional(
    mode: CopyMode,
    client: &TcpStream,
    backend: &TcpStream,
    ending: Ending,
    counters: Counters<'_>,
) -> (CopyOutcome, Transferred) {
    match mode {
        CopyMode::Userspace => {
            let (up, down) = directions::<Userspace>(ending, counters);
            pump_both(client, backend, ending, up, down).await
        }
        CopyMode::Splice => {
            let (up, down) = directions::<Splice>(ending, counters);
            pump_both(client, backend, ending, up, down).await
        }
        // The sockmap engine is chosen in proxy::copy_flow; a flow it could not take copies as auto.
        CopyMode::Auto | CopyMode::Sockmap => {
            let (up, down) = directions::<Adaptive>(ending, counters);
            pump_both(client, backend, ending, up, down).await
        }
    }
}

/// The two directions of a flow over engine `E`, counting into `counters`.
fn directions<'a, E: Engine + Default>(
    ending: Ending,
    counters: Counters<'a>,
) -> (Direction<'a, E>, Direction<'a, E>) {
    let engine = || {
        let mut e = E::default();
        if !ending.half_close {
            e.ends_at_fin();
        }
        e
    };
    (
        Direction::new(engine(), counters.sent, counters.spliced),
        Direction::new(engine(), counters.received, counters.spliced),
    )
}

async fn pump_both<E: Engine>(
    client: &TcpStream,
    backend: &TcpStream,
    ending: Ending,
    mut up: Direction<'_, E>,
    mut down: Direction<'_, E>,
) -> (CopyOutcome, Transferred) {
    let outcome = pump(client, backend, ending, &mut up, &mut down, |_, _, _| {}).await;
    (
        outcome,
        Transferred {
            client_to_backend: up.bytes,
            backend_to_client: down.bytes,
            spliced: up.engine.spliced() + down.engine.spliced(),
        },
    )
}

/// One direction of a flow as [`pump`] drives it: the plain copy's
/// [`Direction`] and the delay line's `Line`.
pub(super) trait Pumped {
    /// Whether this direction has finished (its end of stream passed on).
    fn done(&self) -> bool;
    /// Moves what it can from `from` to `to`; sets `moved` when bytes moved.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        other_finished: bool,
        moved: &mut bool,
    ) -> Poll<io::Result<()>>;
}

/// Drives `up` (client → backend) and `down` until both are done (without
/// half-close: one is), either fails, or nothing moves for the idle timeout.
/// `between` runs after every poll that leaves the flow pending, with both
/// directions (the delay line arms its hold timer there).
pub(super) async fn pump<D: Pumped>(
    client: &TcpStream,
    backend: &TcpStream,
    ending: Ending,
    up: &mut D,
    down: &mut D,
    mut between: impl FnMut(&mut Context<'_>, &D, &D),
) -> CopyOutcome {
    let Ending { idle, half_close } = ending;
    // On the coarse clock: read after every poll that moved bytes, and only
    // compared against `idle` (seconds to minutes) when the timer fires.
    let mut last_activity = clock::coarse_now();
    // Boxed rather than pinned in the flow's state: inline it made every flow's
    // state larger, idle ones included (+0.08 KiB RSS per idle connection,
    // docs/research/new-connections.md), for one malloc saved per connection.
    let mut idle_timer: Pin<Box<Sleep>> = Box::pin(tokio::time::sleep(idle));
    poll_fn(|cx| {
        let mut moved = false;
        let a = if up.done() {
            Poll::Ready(Ok(()))
        } else {
            up.poll(cx, client, backend, down.done() || !half_close, &mut moved)
        };
        let b = if down.done() {
            Poll::Ready(Ok(()))
        } else {
            down.poll(cx, backend, client, up.done() || !half_close, &mut moved)
        };
        match (a, b) {
            (Poll::Ready(Err(e)), _) | (_, Poll::Ready(Err(e))) => {
                return Poll::Ready(CopyOutcome::Failed(e))
            }
            (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => {
                return Poll::Ready(CopyOutcome::Completed)
            }
            // Without half-close the first FIN passed on ends the flow; the
            // close sends the other side its FIN.
            (Poll::Ready(Ok(())), _) | (_, Poll::Ready(Ok(()))) if !half_close => {
                return Poll::Ready(CopyOutcome::Completed)
            }
            _ => {}
        }
        between(cx, up, down);
        if moved {
            // Re-arming the timer on every read would churn the timer wheel;
            // remember the time instead and re-arm lazily when it fires.
            last_activity = clock::coarse_now();
        }
        while idle_timer.as_mut().poll(cx).is_ready() {
            match idle_left(
                idle,
                last_activity,
                clock::coarse_now(),
                clock::resolution(),
            ) {
                None => return Poll::Ready(CopyOutcome::IdleTimeout),
                Some(left) => idle_timer.as_mut().reset(Instant::now() + left),
            }
        }
        Poll::Pending
    })
    .await
}

/// How much of `idle` is left at `now` since `last_activity` (both coarse
/// readings), or `None` once it has all passed. Two coarse readings can make
/// an interval look up to one tick (`tick`, the clock's resolution) longer
/// than it was, so a flow is declared idle only after `idle` plus that tick:
/// never early (late by up to about two ticks).
fn idle_left(
    idle: Duration,
    last_activity: Duration,
    now: Duration,
    tick: Duration,
) -> Option<Duration> {
    let quiet = now.saturating_sub(last_activity);
    let limit = idle + tick;
    (quiet < limit).then(|| limit - quiet)
}

/// splice(2): socket → pipe → socket, never through userspace.
#[derive(Default)]
struct Splice {
    /// Created when bytes arrive and released once drained, so idle
    /// connections hold no pipe.
    pipe: Option<Pipe>,
    in_pipe: usize,
    spliced: u64,
    /// Carries the bytes when no pipe can be had (fds exhausted, or only the
    /// control-plane reserve left): the connection slows down instead of failing.
    bounce: Userspace,
}

impl Splice {
    fn pipe(&mut self) -> io::Result<&Pipe> {
        if self.pipe.is_none() {
            self.pipe = Some(Pipe::new()?);
        }
        Ok(self.pipe.as_ref().expect("created above"))
    }
}

impl Engine for Splice {
    fn has_pending(&self) -> bool {
        self.in_pipe > 0 || self.bounce.has_pending()
    }

    fn holds_back(&self) -> bool {
        self.bounce.holds_back()
    }

    fn flush(&mut self, to: &TcpStream) -> io::Result<usize> {
        if self.bounce.has_pending() {
            return self.bounce.flush(to);
        }
        let r = self.pipe()?.read_end();
        let (fd, len) = (to.as_raw_fd(), self.in_pipe);
        let n = to.try_io(Interest::WRITABLE, || splice(r, fd, len, false))?;
        self.in_pipe -= n;
        self.spliced += n as u64;
        Ok(n)
    }

    fn fill(&mut self, from: &TcpStream, to: &TcpStream) -> io::Result<Option<usize>> {
        let w = match self.pipe() {
            Ok(pipe) => pipe.write_end(),
            Err(e) if is_fd_shortage(&e) => return self.bounce.fill(from, to),
            Err(e) => return Err(e),
        };
        let fd = from.as_raw_fd();
        match from.try_io(Interest::READABLE, || splice(fd, w, CHUNK, false))? {
            0 => Ok(None),
            n => {
                self.in_pipe += n;
                Ok(Some(n))
            }
        }
    }

    fn drained(&mut self) {
        // Nothing in flight: give the pipe's two fds back, so an idle connection
        // costs what it does with the userspace copy.
        self.pipe = None;
    }

    fn closed(&mut self) {
        self.pipe = None;
    }

    fn spliced(&self) -> u64 {
        self.spliced
    }
}

/// The userspace copy until a read fills the whole scratch buffer (the
/// socket had at least that much queued: a bulk transfer), then splice(2)
/// until a read comes back small. Engines are switched only between reads,
/// when neither holds pending bytes, so order is kept.
#[derive(Default)]
struct Adaptive {
    userspace: Userspace,
    splice: Splice,
    bulk: bool,
}

impl Engine for Adaptive {
    fn ends_at_fin(&mut self) {
        self.userspace.ends_at_fin();
    }

    fn has_pending(&self) -> bool {
        self.userspace.has_pending() || self.splice.has_pending()
    }

    fn holds_back(&self) -> bool {
        self.userspace.holds_back() || self.splice.holds_back()
    }

    fn flush(&mut self, to: &TcpStream) -> io::Result<usize> {
        if self.userspace.has_pending() {
            self.userspace.flush(to)
        } else {
            self.splice.flush(to)
        }
    }

    fn fill(&mut self, from: &TcpStream, to: &TcpStream) -> io::Result<Option<usize>> {
        debug_assert!(!self.has_pending());
        if self.bulk {
            let read = self.splice.fill(from, to)?;
            if read.is_some_and(|n| n < BULK_END_BELOW) {
                self.bulk = false;
            }
            Ok(read)
        } else {
            // A bulk run just ended: give its pipe back now, since the userspace
            // copy's short reads rarely reach the EAGAIN that would release it.
            self.splice.drained();
            let read = self.userspace.fill(from, to)?;
            if read == Some(BULK_STARTS_AT) {
                self.bulk = true;
            }
            Ok(read)
        }
    }

    fn drained(&mut self) {
        self.splice.drained();
    }

    fn closed(&mut self) {
        self.splice.closed();
    }

    fn spliced(&self) -> u64 {
        self.splice.spliced()
    }
}

/// Closes with RST instead of FIN: SO_LINGER with a zero timeout, then drop.
pub fn reset<S: AsFd>(stream: S) {
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Closes with FIN in both directions.
pub fn close_gracefully<S: AsFd>(stream: S) {
    let _ = SockRef::from(&stream).shutdown(Shutdown::Write);
    drop(stream);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::pattern;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The idle check on the coarse clock is never early: a flow quiet for
    /// less than the timeout plus one tick is not idle, whatever the readings.
    #[test]
    fn the_idle_check_on_the_coarse_clock_is_never_early() {
        let (idle, tick) = (Duration::from_secs(60), Duration::from_millis(4));
        let at = Duration::from_secs(1_000);
        assert_eq!(idle_left(idle, at, at, tick), Some(idle + tick));
        let almost = at + idle + tick - Duration::from_nanos(1);
        assert_eq!(
            idle_left(idle, at, almost, tick),
            Some(Duration::from_nanos(1))
        );
        assert_eq!(idle_left(idle, at, at + idle + tick, tick), None);
        // A reading behind the last activity (cannot happen; saturates) is no idleness.
        assert_eq!(idle_left(idle, at, at - tick, tick), Some(idle + tick));
    }

    /// Two connected loopback socket pairs: (client, proxy's client side) and
    /// (proxy's backend side, backend).
    async fn two_pairs() -> ((TcpStream, TcpStream), (TcpStream, TcpStream)) {
        use crate::test_util::loopback_pair as pair;
        let (client, proxy_client_side) = pair().await;
        let (proxy_backend_side, backend) = pair().await;
        ((client, proxy_client_side), (proxy_backend_side, backend))
    }

    /// The copy as a flow with half-close runs it, with a 10 s idle timeout
    /// no test reaches, no delay line and no byte counters.
    async fn copy_half_closing(
        mode: CopyMode,
        pc: &TcpStream,
        pb: &TcpStream,
    ) -> (CopyOutcome, Transferred) {
        bidirectional(
            mode,
            pc,
            pb,
            Ending::half_closing(Duration::from_secs(10)),
            Counters::default(),
        )
        .await
    }

    /// Runs `mode` between the pairs while `client` and `backend` play their parts.
    async fn run<C, B>(mode: CopyMode, client: C, backend: B) -> Transferred
    where
        C: FnOnce(TcpStream) -> tokio::task::JoinHandle<()>,
        B: FnOnce(TcpStream) -> tokio::task::JoinHandle<()>,
    {
        let ((c, pc), (pb, b)) = two_pairs().await;
        let (client_done, backend_done) = (client(c), backend(b));
        let (outcome, moved) = copy_half_closing(mode, &pc, &pb).await;
        assert!(matches!(outcome, CopyOutcome::Completed), "{outcome:?}");
        drop((pc, pb));
        client_done.await.unwrap();
        backend_done.await.unwrap();
        moved
    }

    /// Sends `out` then FIN while reading everything the peer sends, which must be `expected`.
    fn send_all_and_expect(
        mut socket: TcpStream,
        out: Vec<u8>,
        expected: Vec<u8>,
        who: &'static str,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let (mut r, mut w) = socket.split();
            let send = async {
                w.write_all(&out).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let (_, n) = tokio::join!(send, r.read_to_end(&mut got));
            n.unwrap();
            assert!(got == expected, "{who} got wrong bytes");
        })
    }

    #[tokio::test(flavor = "current_thread")]
    async fn auto_splices_a_bulk_transfer_and_keeps_it_byte_exact() {
        const LEN: usize = 16 << 20;
        let up = pattern(LEN, 7);
        let down = pattern(LEN, 99);
        let (up_sent, down_expected) = (up.clone(), down.clone());
        let moved = run(
            CopyMode::Auto,
            move |c| send_all_and_expect(c, up_sent, down_expected, "client"),
            move |b| send_all_and_expect(b, down, up, "backend"),
        )
        .await;
        assert_eq!(moved.client_to_backend, LEN as u64);
        assert_eq!(moved.backend_to_client, LEN as u64);
        assert!(
            moved.spliced > LEN as u64,
            "a bulk transfer should mostly go through splice: {moved:?}"
        );
    }

    /// The backend `b` sends `answer` and its FIN, and the balancer's side
    /// `pb` has seen both in its reactor before the copy runs, as under load.
    async fn answer_and_close(b: &mut TcpStream, pb: &TcpStream, answer: &[u8]) {
        b.write_all(answer).await.unwrap();
        b.shutdown().await.unwrap();
        while !pb.ready(Interest::READABLE).await.unwrap().is_read_closed() {
            tokio::task::yield_now().await;
        }
    }

    /// A backend that answers and closes at once (HTTP/1.0, `Connection:
    /// close`): when its FIN is in before the answer is read, the answer and
    /// the FIN passed on leave in one segment, not two, so the client also
    /// ACKs once. Segments the balancer sends the client: that one, then the
    /// ACK of the client's FIN.
    #[tokio::test(flavor = "current_thread")]
    async fn an_answer_and_the_fin_behind_it_leave_in_one_segment() {
        let ((mut c, pc), (pb, mut b)) = two_pairs().await;
        let answer = pattern(300, 5);
        answer_and_close(&mut b, &pb, &answer).await;
        let before = crate::test_util::segments_sent(&pc);
        let client = tokio::spawn(async move {
            let mut got = Vec::new();
            c.read_to_end(&mut got).await.unwrap();
            c.shutdown().await.unwrap();
            got
        });
        let (outcome, moved) = copy_half_closing(CopyMode::Auto, &pc, &pb).await;
        assert!(matches!(outcome, CopyOutcome::Completed), "{outcome:?}");
        assert_eq!(client.await.unwrap(), answer);
        assert_eq!(moved.backend_to_client, answer.len() as u64);
        let sent = crate::test_util::segments_sent(&pc) - before;
        assert_eq!(sent, 2, "answer+FIN, then the ACK of the client's FIN");
    }

    /// Without half-close the backend's FIN ends the flow: the copy ends as
    /// soon as the answer and the FIN are passed on, while the client has not
    /// closed its side (with half-close it waits for the client's FIN, as in
    /// the test above), and once the sockets are closed as the proxy closes
    /// them, the client has the answer and its end of stream. The answer is
    /// not held back for the FIN: it is on the wire before the close, which
    /// would discard it were it a reset (unread input from the client).
    #[tokio::test(flavor = "current_thread")]
    async fn without_half_close_the_first_fin_ends_the_flow() {
        let ((mut c, pc), (pb, mut b)) = two_pairs().await;
        let answer = pattern(300, 6);
        answer_and_close(&mut b, &pb, &answer).await;
        let before = crate::test_util::segments_sent(&pc);
        let ending = Ending {
            idle: Duration::from_secs(10),
            half_close: false,
        };
        let copy = bidirectional(CopyMode::Auto, &pc, &pb, ending, Counters::default());
        let (outcome, moved) = tokio::time::timeout(Duration::from_secs(5), copy)
            .await
            .expect("the backend's FIN ends the flow without the client's");
        assert!(matches!(outcome, CopyOutcome::Completed), "{outcome:?}");
        assert_eq!(moved.backend_to_client, answer.len() as u64);
        let sent = crate::test_util::segments_sent(&pc) - before;
        assert_eq!(sent, 1, "the answer leaves before the close");
        syscall::close(pc);
        syscall::close(pb);
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, answer);
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "the backend gets the end of stream");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn auto_keeps_small_request_response_traffic_in_userspace() {
        const ROUNDS: usize = 200;
        let moved = run(
            CopyMode::Auto,
            |mut c| {
                tokio::spawn(async move {
                    let mut answer = [0u8; 300];
                    for i in 0..ROUNDS {
                        c.write_all(&pattern(100, i as u8)).await.unwrap();
                        c.read_exact(&mut answer).await.unwrap();
                        assert_eq!(&answer[..], &pattern(300, i as u8)[..]);
                    }
                    c.shutdown().await.unwrap();
                    assert_eq!(c.read(&mut answer).await.unwrap(), 0);
                })
            },
            |mut b| {
                tokio::spawn(async move {
                    let mut request = [0u8; 100];
                    for i in 0..ROUNDS {
                        b.read_exact(&mut request).await.unwrap();
                        assert_eq!(&request[..], &pattern(100, i as u8)[..]);
                        b.write_all(&pattern(300, i as u8)).await.unwrap();
                    }
                    assert_eq!(b.read(&mut request).await.unwrap(), 0);
                    b.shutdown().await.unwrap();
                })
            },
        )
        .await;
        assert_eq!(moved.client_to_backend, (ROUNDS * 100) as u64);
        assert_eq!(moved.backend_to_client, (ROUNDS * 300) as u64);
        assert_eq!(
            moved.spliced, 0,
            "small messages should never take the pipe hop"
        );
    }
}
