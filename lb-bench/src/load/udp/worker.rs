//! One generator thread: its share of the flows in one epoll set, each
//! flow's window refilled as its echoes come back (closed loop: a flow
//! sends only when an echo returns, so the generator measures loss rather
//! than causing it), then a grace period for late echoes.

use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::flow::{check_reply, fill_pattern, write_header, Flow, Reply};
use super::mmsg::{Batch, MAX_BATCH};
use crate::error::{Error, Result};

/// A flow with datagrams in flight and no echo for this long writes them
/// off and opens its window again (see [`Flow::stalled`]).
pub const STALL: Duration = Duration::from_millis(200);

/// How often the stall check runs while sending.
const STALL_CHECK: Duration = Duration::from_millis(20);

/// What one thread counted.
pub(super) struct Tally {
    pub(super) flows: Vec<Flow>,
    /// Round-trip times in µs.
    pub(super) rtt_us: Histogram<u64>,
    /// This thread's CPU time (utime + stime) over the run.
    pub(super) cpu_secs: f64,
}

/// A thread's flows, buffers and epoll set.
pub(super) struct Worker {
    flows: Vec<Flow>,
    batch: Batch,
    /// One datagram as sent, pattern filled: what every echo is checked against.
    template: Vec<u8>,
    window: usize,
    epoll: Epoll,
    /// Send times are nanoseconds from here.
    start: Instant,
    rtt_us: Histogram<u64>,
}

impl Worker {
    pub(super) fn new(
        flows: Vec<Flow>,
        size: usize,
        window: usize,
        start: Instant,
    ) -> Result<Worker> {
        let mut batch = Batch::new(size);
        for i in 0..MAX_BATCH {
            fill_pattern(batch.send_buf(i));
        }
        let mut template = vec![0; size];
        fill_pattern(&mut template);
        let epoll = Epoll::new().map_err(|e| Error::io("epoll_create1", e))?;
        for (i, f) in flows.iter().enumerate() {
            epoll
                .add(f.fd(), i as u64)
                .map_err(|e| Error::io("epoll_ctl", e))?;
        }
        Ok(Worker {
            flows,
            batch,
            template,
            window: window.clamp(1, MAX_BATCH),
            epoll,
            start,
            rtt_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds"),
        })
    }

    /// Sends until `send_until`, then waits for late echoes until
    /// `wait_until` (or until every datagram is answered).
    pub(super) fn run(mut self, send_until: Instant, wait_until: Instant) -> Result<Tally> {
        let cpu_before = thread_cpu_secs();
        for i in 0..self.flows.len() {
            self.fill(i);
        }
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; self.flows.len().max(1)];
        let mut next_stall_check = Instant::now() + STALL_CHECK;
        loop {
            let now = Instant::now();
            let sending = now < send_until;
            if !sending && (now >= wait_until || self.all_answered()) {
                break;
            }
            let wake = if sending {
                send_until.min(next_stall_check)
            } else {
                wait_until
            };
            let ready = self
                .epoll
                .wait(&mut events, wake.saturating_duration_since(now))
                .map_err(|e| Error::io("epoll_wait", e))?;
            let now = Instant::now();
            let sending = now < send_until;
            for ev in &events[..ready] {
                self.drain(ev.u64 as usize, now, sending);
            }
            if sending && now >= next_stall_check {
                self.reopen_stalled(now);
                next_stall_check = now + STALL_CHECK;
            }
        }
        Ok(Tally {
            flows: self.flows,
            rtt_us: self.rtt_us,
            cpu_secs: thread_cpu_secs() - cpu_before,
        })
    }

    fn all_answered(&self) -> bool {
        self.flows.iter().all(|f| f.outstanding() == 0)
    }

    /// Reads every queued echo of flow `i`; while `sending`, refills its window.
    fn drain(&mut self, i: usize, now: Instant, sending: bool) {
        let (template, start) = (&self.template, self.start);
        let now_ns = now.saturating_duration_since(start).as_nanos() as u64;
        loop {
            let f = &mut self.flows[i];
            // An error (an ICMP report: nothing listening yet) reads as
            // nothing received: the datagram is lost, counted at the end.
            let n = self.batch.recv(f.fd(), MAX_BATCH).unwrap_or_default();
            for k in 0..n {
                let (data, truncated) = self.batch.received(k);
                match check_reply(data, truncated, f.id, template) {
                    Reply::Echo { seq, sent_ns } => {
                        f.echoed(seq, now, sending);
                        let _ = self
                            .rtt_us
                            .record((now_ns.saturating_sub(sent_ns) / 1000).max(1));
                    }
                    Reply::Corrupt => f.corrupt += 1,
                }
            }
            if n < MAX_BATCH {
                break;
            }
        }
        if sending {
            self.fill(i);
        }
    }

    /// Sends as many datagrams as flow `i`'s window has room for.
    fn fill(&mut self, i: usize) {
        let f = &mut self.flows[i];
        let room = self.window.saturating_sub(f.in_flight);
        if room == 0 {
            return;
        }
        let sent_ns = self.start.elapsed().as_nanos() as u64;
        for k in 0..room {
            write_header(self.batch.send_buf(k), f.id, f.next_seq + k as u64, sent_ns);
        }
        match self.batch.send(f.fd(), room) {
            Ok(n) => {
                f.next_seq += n as u64;
                f.sent += n as u64;
                f.in_flight += n;
            }
            Err(_) => f.send_errors += 1,
        }
    }

    fn reopen_stalled(&mut self, now: Instant) {
        for i in 0..self.flows.len() {
            if self.flows[i].stalled(now, STALL) {
                self.flows[i].write_off(now);
                self.fill(i);
            }
        }
    }
}

/// The calling thread's CPU seconds (utime + stime).
fn thread_cpu_secs() -> f64 {
    // SAFETY: getrusage fills the struct it is given; all-zero is a valid start.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a live rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

/// An epoll set of sockets, each tagged with its flow's index.
struct Epoll(RawFd);

impl Epoll {
    fn new() -> io::Result<Epoll> {
        // SAFETY: no pointers; the fd is owned by the returned value.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Epoll(fd))
    }

    fn add(&self, fd: RawFd, tag: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: tag,
        };
        // SAFETY: both fds are open; `ev` is a live epoll_event.
        if unsafe { libc::epoll_ctl(self.0, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout` (rounded up to a millisecond); returns how many events are ready.
    fn wait(&self, events: &mut [libc::epoll_event], timeout: Duration) -> io::Result<usize> {
        let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        // SAFETY: `events` is a live buffer of the given length.
        let n = unsafe { libc::epoll_wait(self.0, events.as_mut_ptr(), events.len() as i32, ms) };
        match n {
            n if n >= 0 => Ok(n as usize),
            _ => match io::Error::last_os_error() {
                e if e.kind() == io::ErrorKind::Interrupted => Ok(0),
                e => Err(e),
            },
        }
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: the fd is ours and closed once.
        unsafe {
            libc::close(self.0);
        }
    }
}
