//! Bidirectional copy with half-close and an idle timeout.
//!
//! An idle proxied connection owns no buffer: reads go into one scratch buffer
//! per worker thread and are written straight on. Only when the peer cannot take
//! everything at once is the remainder kept, in a buffer owned by that direction
//! until it drains. Memory per idle connection is therefore the two sockets and
//! this future, not 2 × 16 KiB of buffers.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus::IntCounter;
use socket2::SockRef;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

const SCRATCH_LEN: usize = 64 * 1024;
/// Reads per direction before yielding, so one busy connection can't starve the worker.
const READS_PER_POLL: usize = 16;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH_LEN].into_boxed_slice());
}

/// How a proxied connection ended.
#[derive(Debug)]
pub enum CopyOutcome {
    /// Both sides finished (each sent FIN, and it was passed on).
    Completed,
    /// No bytes moved for the idle timeout.
    IdleTimeout,
    /// One side failed (reset, broken pipe...).
    Failed(io::Error),
}

/// Bytes moved, from the balancer's point of view.
#[derive(Debug, Default, Clone, Copy)]
pub struct Transferred {
    pub client_to_backend: u64,
    pub backend_to_client: u64,
}

struct Direction<'a> {
    pending: Vec<u8>,
    pending_from: usize,
    read_closed: bool,
    write_shut: bool,
    bytes: u64,
    counter: &'a IntCounter,
}

impl<'a> Direction<'a> {
    fn new(counter: &'a IntCounter) -> Self {
        Direction {
            pending: Vec::new(),
            pending_from: 0,
            read_closed: false,
            write_shut: false,
            bytes: 0,
            counter,
        }
    }

    fn done(&self) -> bool {
        self.write_shut
    }

    /// Moves what is readable from `from` to `to`. Sets `moved` when bytes moved.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        moved: &mut bool,
    ) -> Poll<io::Result<()>> {
        let mut reads = 0;
        loop {
            if self.pending_from < self.pending.len() {
                match to.poll_write_ready(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => {}
                }
                match to.try_write(&self.pending[self.pending_from..]) {
                    Ok(n) => {
                        self.pending_from += n;
                        *moved = true;
                        if self.pending_from == self.pending.len() {
                            // Give the memory back: an idle connection should hold none.
                            self.pending = Vec::new();
                            self.pending_from = 0;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
                continue;
            }
            if self.read_closed {
                if !self.write_shut {
                    // Pass the FIN on; the other direction stays open (half-close).
                    match SockRef::from(to).shutdown(Shutdown::Write) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                    self.write_shut = true;
                }
                return Poll::Ready(Ok(()));
            }
            if reads == READS_PER_POLL {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            match from.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            reads += 1;
            let step = SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let n = match from.try_read(&mut scratch[..]) {
                    Ok(0) => return Ok(None),
                    Ok(n) => n,
                    Err(e) => return Err(e),
                };
                let written = match to.try_write(&scratch[..n]) {
                    Ok(w) => w,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                    Err(e) => return Err(e),
                };
                if written < n {
                    self.pending.extend_from_slice(&scratch[written..n]);
                }
                Ok(Some(n))
            });
            match step {
                Ok(Some(n)) => {
                    *moved = true;
                    self.bytes += n as u64;
                    self.counter.inc_by(n as u64);
                }
                Ok(None) => self.read_closed = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// Copies both ways until both sides have finished, one fails, or nothing moves for `idle`.
pub async fn proxy(
    client: &TcpStream,
    backend: &TcpStream,
    idle: Duration,
    sent_to_backend: &IntCounter,
    received_from_backend: &IntCounter,
) -> (CopyOutcome, Transferred) {
    let mut up = Direction::new(sent_to_backend);
    let mut down = Direction::new(received_from_backend);
    let mut last_activity = Instant::now();
    let mut idle_timer: Pin<Box<Sleep>> = Box::pin(tokio::time::sleep(idle));
    let outcome = poll_fn(|cx| {
        let mut moved = false;
        let a = if up.done() {
            Poll::Ready(Ok(()))
        } else {
            up.poll(cx, client, backend, &mut moved)
        };
        let b = if down.done() {
            Poll::Ready(Ok(()))
        } else {
            down.poll(cx, backend, client, &mut moved)
        };
        match (a, b) {
            (Poll::Ready(Err(e)), _) | (_, Poll::Ready(Err(e))) => {
                return Poll::Ready(CopyOutcome::Failed(e))
            }
            (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => {
                return Poll::Ready(CopyOutcome::Completed)
            }
            _ => {}
        }
        if moved {
            // Re-arming the timer on every read would churn the timer wheel;
            // remember the time instead and re-arm lazily when it fires.
            last_activity = Instant::now();
        }
        while idle_timer.as_mut().poll(cx).is_ready() {
            let deadline = last_activity + idle;
            if deadline <= Instant::now() {
                return Poll::Ready(CopyOutcome::IdleTimeout);
            }
            idle_timer.as_mut().reset(deadline);
        }
        Poll::Pending
    })
    .await;
    (
        outcome,
        Transferred {
            client_to_backend: up.bytes,
            backend_to_client: down.bytes,
        },
    )
}

/// Closes with RST instead of FIN: SO_LINGER with a zero timeout, then drop.
pub fn reset(stream: TcpStream) {
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Closes with FIN in both directions.
pub fn close_gracefully(stream: TcpStream) {
    let _ = SockRef::from(&stream).shutdown(Shutdown::Write);
    drop(stream);
}
