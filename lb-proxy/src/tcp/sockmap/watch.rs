//! The sockmap engine's watch over one forwarded flow: it waits on the
//! flow's edges ([`Edges`]: end of stream and errors, never a packet), the
//! idle deadline and, after an end of stream, the moment the half-close may
//! be passed on; and it copies a stranded direction in userspace.

use std::future::Future;
use std::io::{self, Read, Write};
use std::net::TcpStream as StdTcpStream;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::time::Instant;

use super::edges::{Edge, Side, Watched};
use super::sys::{can_send, kick, monotonic_ns, written};
use super::{
    ByteMetrics, Copied, Engine, Inserted, BYTE_TICK, BYTE_TICK_MAX, DRAIN_POLL, DRAIN_POLL_MAX,
    STRANDED_BUF,
};
use crate::tcp::copy::{shutdown_write, CopyOutcome};

/// One direction's end of stream as the engine sees it.
#[derive(Default)]
struct Half {
    /// The source sent FIN (or was shut down).
    eof: bool,
    /// The FIN was passed on: the destination's write half is shut.
    passed: bool,
}

/// A direction userspace copies (its source is stranded); done at its EOF.
type UserCopy<'a> = Pin<Box<dyn Future<Output = io::Result<()>> + Send + 'a>>;

/// The flow's sockets (out of tokio's reactor) and their place in the
/// worker's edge set.
pub(super) struct Sockets<'a> {
    pub(super) client: &'a StdTcpStream,
    pub(super) backend: &'a StdTcpStream,
    pub(super) edges: &'a Watched,
}

/// The watch's state: each half, and the userspace copy of a stranded direction.
struct Flow<'a> {
    engine: &'a Engine,
    flow: &'a Inserted,
    sockets: &'a Sockets<'a>,
    copied: &'a Copied,
    metrics: &'a ByteMetrics<'a>,
    up: Half,
    down: Half,
    up_copy: Option<UserCopy<'a>>,
    down_copy: Option<UserCopy<'a>>,
}

/// Waits on the flow's edges: EOF or error on either socket, the idle
/// deadline, and, after an EOF, the moment its half-close may be passed on.
/// A side the program stranded (see `insert_sockets`) is copied here.
pub(super) async fn watch(
    engine: &Engine,
    flow: &Inserted,
    sockets: &Sockets<'_>,
    idle: Duration,
    copied: &Copied,
    metrics: &ByteMetrics<'_>,
) -> CopyOutcome {
    let mut state = Flow {
        engine,
        flow,
        sockets,
        copied,
        metrics,
        up: Half::default(),
        down: Half::default(),
        up_copy: None,
        down_copy: None,
    };
    match state.run(idle).await {
        Ok(outcome) => outcome,
        Err(e) => CopyOutcome::Failed(e),
    }
}

impl<'a> Flow<'a> {
    async fn run(&mut self, idle: Duration) -> io::Result<CopyOutcome> {
        self.start()?;
        let edges = self.sockets.edges;
        let idle_timer = tokio::time::sleep(idle);
        tokio::pin!(idle_timer);
        let mut drain_poll = DRAIN_POLL;
        let mut byte_tick = BYTE_TICK;
        let byte_timer = tokio::time::sleep(byte_tick);
        tokio::pin!(byte_timer);
        let mut got = [Edge {
            side: Side::Client,
            closed: false,
            error: false,
        }; 2];
        loop {
            if self.up.passed && self.down.passed {
                return Ok(CopyOutcome::Completed);
            }
            let draining = (self.up.eof && !self.up.passed) || (self.down.eof && !self.down.passed);
            tokio::select! {
                n = edges.next(&mut got) => {
                    for &edge in &got[..n?] {
                        self.on_edge(edge)?;
                    }
                }
                done = run(&mut self.up_copy), if !self.up.passed => {
                    done?;
                    self.up = Half { eof: true, passed: true };
                }
                done = run(&mut self.down_copy), if !self.down.passed => {
                    done?;
                    self.down = Half { eof: true, passed: true };
                }
                _ = tokio::time::sleep(drain_poll), if draining => {
                    drain_poll = (drain_poll * 2).min(DRAIN_POLL_MAX);
                }
                _ = &mut byte_timer => {
                    byte_tick = if self.tick()? {
                        BYTE_TICK
                    } else {
                        (byte_tick * 2).min(BYTE_TICK_MAX)
                    };
                    byte_timer.as_mut().reset(Instant::now() + byte_tick);
                }
                _ = &mut idle_timer => {
                    let deadline = self.last_activity() + idle;
                    if deadline <= Instant::now() {
                        return Ok(CopyOutcome::IdleTimeout);
                    }
                    idle_timer.as_mut().reset(deadline);
                }
            }
            if self.pass_fins()? {
                // A FIN went on: the other half, if it waits, starts quick again.
                drain_poll = DRAIN_POLL;
            }
        }
    }

    /// Starts the userspace copy of a side stranded already (bytes the
    /// backend sent between the two inserts: after the kicks this is final,
    /// see `insert_sockets`). Both sides stay in the edge set either way:
    /// a copied side's errors still end the flow.
    fn start(&mut self) -> io::Result<()> {
        for side in [Side::Client, Side::Backend] {
            if self.engine.stranded(self.cookie(side)) {
                self.copy_in_userspace(side)?;
            }
        }
        Ok(())
    }

    /// An edge on one side: an error fails the flow; an end of stream ends
    /// that half (once every byte before it went through the verdict).
    fn on_edge(&mut self, edge: Edge) -> io::Result<()> {
        let socket = self.socket(edge.side);
        if edge.error {
            // Alone (no FIN, no bytes) when the kernel's forwarding into
            // this socket failed: it ends the flow even if userspace copies
            // this side (its copy would never wake for it).
            if let Some(e) = socket.take_error()? {
                return Err(e);
            }
        }
        // A copied side's end of stream is its copy's to see.
        if !edge.closed || self.half(edge.side).eof || self.copying(edge.side) {
            return Ok(());
        }
        // Make sure every skb before the FIN went through the verdict (and
        // was counted, or left stranded) before the half-close compares counts.
        kick(socket);
        if self.engine.stranded(self.cookie(edge.side)) {
            // Bytes right before the FIN found no peer: userspace copies
            // them, and the FIN after them.
            return self.copy_in_userspace(edge.side);
        }
        self.half_mut(edge.side).eof = true;
        Ok(())
    }

    /// Copies the direction whose source is `side` in userspace, to its EOF.
    fn copy_in_userspace(&mut self, side: Side) -> io::Result<()> {
        let (client, backend) = (self.sockets.client, self.sockets.backend);
        let copied = self.copied;
        match side {
            Side::Client => {
                self.up_copy = Some(copy_stranded(client, backend, &copied.up, &copied.last_ns)?)
            }
            Side::Backend => {
                self.down_copy = Some(copy_stranded(
                    backend,
                    client,
                    &copied.down,
                    &copied.last_ns,
                )?)
            }
        }
        Ok(())
    }

    /// Passes each half's FIN on when it may; whether one went on.
    fn pass_fins(&mut self) -> io::Result<bool> {
        let before = (self.up.passed, self.down.passed);
        let (engine, flow, s) = (self.engine, self.flow, self.sockets);
        pass_fin(
            engine,
            &mut self.up,
            flow.client,
            s.backend,
            flow.backend_written,
        )?;
        pass_fin(
            engine,
            &mut self.down,
            flow.backend,
            s.client,
            flow.client_written,
        )?;
        Ok((self.up.passed, self.down.passed) != before)
    }

    /// Adds the bytes moved since the last tick to the byte metrics; whether
    /// any did. The same reads show a side the program stranded mid-flow
    /// (which the analysis in `insert_sockets` rules out, but no edge would
    /// show before its end): its copy starts.
    fn tick(&mut self) -> io::Result<bool> {
        let (engine, flow, copied) = (self.engine, self.flow, self.copied);
        let (client, backend) = (engine.side(flow.client), engine.side(flow.backend));
        for (side, read) in [(Side::Client, &client), (Side::Backend, &backend)] {
            if read.stranded != 0 && !self.copying(side) && !self.half(side).eof {
                self.copy_in_userspace(side)?;
            }
        }
        let up = client.bytes + copied.up.load(Relaxed);
        let down = backend.bytes + copied.down.load(Relaxed);
        Ok(self.metrics.publish(up, down))
    }

    /// The flow's last byte moved in either direction (by the program or by
    /// userspace), or when it joined.
    fn last_activity(&self) -> Instant {
        let (engine, flow) = (self.engine, self.flow);
        let seen = engine
            .side(flow.client)
            .last_seen_ns
            .max(engine.side(flow.backend).last_seen_ns)
            .max(self.copied.last_ns.load(Relaxed));
        let (now, now_ns) = (Instant::now(), monotonic_ns());
        let ago = Duration::from_nanos(now_ns.saturating_sub(seen));
        now.checked_sub(ago)
            .map_or(flow.joined, |at| at.max(flow.joined))
    }

    /// Whether userspace copies the direction whose source is `side`.
    fn copying(&self, side: Side) -> bool {
        match side {
            Side::Client => self.up_copy.is_some(),
            Side::Backend => self.down_copy.is_some(),
        }
    }

    fn socket(&self, side: Side) -> &'a StdTcpStream {
        match side {
            Side::Client => self.sockets.client,
            Side::Backend => self.sockets.backend,
        }
    }

    fn cookie(&self, side: Side) -> u64 {
        match side {
            Side::Client => self.flow.client,
            Side::Backend => self.flow.backend,
        }
    }

    /// The half whose source is `side`.
    fn half(&self, side: Side) -> &Half {
        match side {
            Side::Client => &self.up,
            Side::Backend => &self.down,
        }
    }

    fn half_mut(&mut self, side: Side) -> &mut Half {
        match side {
            Side::Client => &mut self.up,
            Side::Backend => &mut self.down,
        }
    }
}

/// The direction's userspace copy, or never (none started).
async fn run(copy: &mut Option<UserCopy<'_>>) -> io::Result<()> {
    match copy {
        Some(copy) => copy.await,
        None => std::future::pending().await,
    }
}

/// Copies a stranded side's bytes to its peer: every byte of that direction
/// is in the source's ingress queue, in order (the program redirected none
/// of them: a side is stranded from its first skb that found no peer, and
/// it has a peer from the second insert on), and the sockmap recvmsg reads
/// that queue. At EOF, passes the FIN on after the bytes. It reads and
/// writes through duplicates registered with tokio for what it waits on
/// only (readable source, writable destination), so the direction the
/// kernel still forwards wakes nothing.
fn copy_stranded<'a>(
    from: &'a StdTcpStream,
    to: &'a StdTcpStream,
    moved: &'a AtomicU64,
    last_ns: &'a AtomicU64,
) -> io::Result<UserCopy<'a>> {
    let source = registered(from, Interest::READABLE)?;
    let destination = registered(to, Interest::WRITABLE)?;
    Ok(Box::pin(async move {
        let mut buf = vec![0u8; STRANDED_BUF];
        loop {
            let mut ready = source.readable().await?;
            let n = match ready.try_io(|s| s.get_ref().read(&mut buf)) {
                Ok(Ok(0)) => return shutdown_write(to),
                Ok(Ok(n)) => n,
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            };
            let mut at = 0;
            while at < n {
                let mut ready = destination.writable().await?;
                match ready.try_io(|s| s.get_ref().write(&buf[at..n])) {
                    Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(Ok(k)) => at += k,
                    Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                    Ok(Err(e)) => return Err(e),
                    Err(_would_block) => {}
                }
            }
            moved.fetch_add(n as u64, Relaxed);
            last_ns.store(monotonic_ns(), Relaxed);
            // A peer that keeps both sides ready must not hold the worker.
            tokio::task::coop::consume_budget().await;
        }
    }))
}

/// A duplicate of `stream` registered with tokio for `interest` only,
/// within the data plane's share of descriptors.
fn registered(stream: &StdTcpStream, interest: Interest) -> io::Result<AsyncFd<StdTcpStream>> {
    let dup = stream.try_clone()?;
    if !crate::fds::data_plane_may_hold(dup.as_raw_fd()) {
        return Err(crate::fds::reserve_reached());
    }
    // SAFETY: the duplicate moves into the `AsyncFd`, which keeps it open
    // (and the same file) until it is dropped.
    unsafe { AsyncFd::register_with_interest(dup, interest) }.map_err(|e| e.into_parts().1)
}

/// Passes `half`'s FIN on to `to` once every byte the program redirected
/// from `from` has entered `to`'s stream (`to_written` was its count at the insert).
fn pass_fin(
    engine: &Engine,
    half: &mut Half,
    from: u64,
    to: &StdTcpStream,
    to_written: u64,
) -> io::Result<()> {
    if !half.eof || half.passed {
        return Ok(());
    }
    let redirected = engine.side(from).bytes;
    let sent_on = written(to)?.wrapping_sub(to_written);
    // A destination that can no longer send (shut down by a cut, or closed)
    // will take no more: waiting would only wait for the idle timeout.
    if sent_on >= redirected || !can_send(to) {
        shutdown_write(to)?;
        half.passed = true;
    }
    Ok(())
}
