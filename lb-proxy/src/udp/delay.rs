//! The UDP plane's cross-zone delay line: datagrams of a flow whose node and
//! pod are in different availability zones wait here for the hop's one-way
//! delay (half the frontend's `cross_zone_rtt`), client → pod and pod →
//! client, so the added latency is real in the data path as it is for TCP
//! ([`crate::tcp::delay`]). Same-zone flows never come here.
//!
//! One [`Line`] per direction per worker and frontend, first in first out:
//! a datagram is copied in with its due time, and leaves once its due time
//! has come and everything queued before it has left. Every flow of a
//! frontend has the same delay (a reload of `cross_zone_rtt` aside), so the
//! queue is in due-time order and first in first out is exact; it also keeps
//! each flow's datagrams in order. After a reload changes the delay, a
//! datagram may wait behind an earlier one with a longer delay, for at most
//! the difference. The worker waits for the head's due time on one timer
//! (the TCP line's timerfd, [`crate::tcp::delay::HoldTimer`]), so a held
//! datagram costs no CPU and never blocks the worker or another flow.
//!
//! Bounded: a line holds at most [`HELD_BYTES_BOUND`] bytes and
//! [`HELD_DATAGRAMS_BOUND`] datagrams; a datagram beyond either is dropped
//! and counted (`lb_udp_dropped_datagrams_total{reason="delay_line"}`), as
//! is one whose flow ended while it was held (the flow's upstream, or the
//! client's address, is gone with it). The bytes live in one buffer per
//! line, so a datagram costs a copy in and nothing allocated once the buffer
//! has grown; an empty line gives back all but [`RETAINED`] bytes at the
//! worker's tick.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// Most bytes one line (one direction of one worker's frontend) holds.
pub const HELD_BYTES_BOUND: usize = 4 << 20;
/// Most datagrams one line holds: bounds the queue's bookkeeping when
/// datagrams are tiny.
pub const HELD_DATAGRAMS_BOUND: usize = 16_384;
/// What an empty line keeps of its buffer, so a steady trickle of
/// cross-zone datagrams does not allocate at every one.
const RETAINED: usize = 64 << 10;

/// One held datagram: whose (a flow id in the worker), when it came in,
/// when it may leave.
struct Held<F> {
    flow: F,
    queued: Instant,
    due: Instant,
    len: usize,
}

/// One direction's held datagrams, in arrival order.
pub struct Line<F> {
    /// The datagrams' bytes back to back; the live ones start at `head`.
    bytes: Vec<u8>,
    head: usize,
    held: VecDeque<Held<F>>,
}

impl<F> Default for Line<F> {
    fn default() -> Self {
        Line {
            bytes: Vec::new(),
            head: 0,
            held: VecDeque::new(),
        }
    }
}

/// A datagram whose due time has come: its flow, its bytes, how long it was held.
pub struct Due<'a, F> {
    pub flow: F,
    pub payload: &'a [u8],
    pub held_for: Duration,
}

impl<F: Copy> Line<F> {
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Queues `payload` of `flow` to leave `one_way` after `now`; false (and
    /// nothing queued) when the line is at its bound.
    pub fn hold(&mut self, flow: F, payload: &[u8], now: Instant, one_way: Duration) -> bool {
        let bytes_held = self.bytes.len() - self.head;
        if self.held.len() >= HELD_DATAGRAMS_BOUND || bytes_held + payload.len() > HELD_BYTES_BOUND
        {
            return false;
        }
        self.compact();
        self.bytes.extend_from_slice(payload);
        self.held.push_back(Held {
            flow,
            queued: now,
            due: now + one_way,
            len: payload.len(),
        });
        true
    }

    /// When the head datagram may leave.
    pub fn next_due(&self) -> Option<Instant> {
        self.held.front().map(|h| h.due)
    }

    /// The head datagram, if its time has come by `now`; [`Line::pop`] it once sent.
    pub fn due(&self, now: Instant) -> Option<Due<'_, F>> {
        let h = self.held.front().filter(|h| h.due <= now)?;
        Some(Due {
            flow: h.flow,
            payload: &self.bytes[self.head..self.head + h.len],
            held_for: now.saturating_duration_since(h.queued),
        })
    }

    /// Takes the head datagram out.
    pub fn pop(&mut self) {
        if let Some(h) = self.held.pop_front() {
            self.head += h.len;
        }
        if self.held.is_empty() {
            self.bytes.clear();
            self.head = 0;
        }
    }

    /// Gives back all but [`RETAINED`] bytes of an empty line's buffer.
    pub fn trim(&mut self) {
        if self.is_empty() {
            self.bytes.shrink_to(RETAINED);
        }
    }

    /// Moves the live bytes to the front once at least half the buffer is
    /// spent: each byte is moved at most once per buffer's worth of bytes
    /// queued behind it, so holding stays amortised O(size).
    fn compact(&mut self) {
        if self.head > 0 && self.head * 2 >= self.bytes.len() {
            self.bytes.drain(..self.head);
            self.head = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE_WAY: Duration = Duration::from_millis(10);

    fn flow(n: usize) -> usize {
        n
    }

    /// Datagrams leave at their due time, in order, byte for byte, each
    /// with how long it was held; nothing leaves early.
    #[test]
    fn datagrams_leave_in_order_at_their_due_time_intact() {
        let mut line = Line::default();
        let t0 = Instant::now();
        let payloads: Vec<Vec<u8>> = (0..50u8).map(|i| vec![i; 1 + i as usize * 7]).collect();
        for (i, p) in payloads.iter().enumerate() {
            let at = t0 + Duration::from_micros(100 * i as u64);
            assert!(line.hold(flow(i % 3), p, at, ONE_WAY));
        }
        assert_eq!(line.next_due(), Some(t0 + ONE_WAY));
        assert!(line.due(t0 + ONE_WAY - Duration::from_nanos(1)).is_none());
        let mut out = Vec::new();
        let end = t0 + ONE_WAY + Duration::from_millis(5);
        while let Some(d) = line.due(end) {
            assert!(d.held_for >= ONE_WAY, "held {:?}", d.held_for);
            out.push((d.flow, d.payload.to_vec()));
            line.pop();
        }
        assert_eq!(out.len(), payloads.len());
        for (i, (f, p)) in out.iter().enumerate() {
            assert_eq!((*f, p), (flow(i % 3), &payloads[i]));
        }
        assert!(line.is_empty() && line.next_due().is_none());
    }

    /// Past either bound a datagram is refused; room comes back as the head leaves.
    #[test]
    fn the_line_refuses_beyond_its_bounds() {
        let mut line = Line::default();
        let now = Instant::now();
        let big = vec![7u8; 60_000];
        let fit = HELD_BYTES_BOUND / big.len();
        for _ in 0..fit {
            assert!(line.hold(flow(0), &big, now, ONE_WAY));
        }
        assert!(
            !line.hold(flow(0), &big, now, ONE_WAY),
            "over the byte bound"
        );
        line.pop();
        assert!(line.hold(flow(0), &big, now, ONE_WAY), "room again");

        let mut tiny = Line::default();
        for _ in 0..HELD_DATAGRAMS_BOUND {
            assert!(tiny.hold(flow(1), b"x", now, ONE_WAY));
        }
        assert!(
            !tiny.hold(flow(1), b"x", now, ONE_WAY),
            "over the datagram bound"
        );
    }

    /// A line that never empties (100 datagrams held at all times, for ten
    /// bounds' worth of bytes) reuses its buffer instead of growing it; an
    /// emptied line, trimmed, keeps only a little.
    #[test]
    fn a_busy_line_reuses_its_buffer_and_an_idle_one_gives_it_back() {
        let mut line = Line::default();
        let now = Instant::now();
        let d = vec![1u8; 1000];
        for i in 0..10 * HELD_BYTES_BOUND / d.len() {
            assert!(line.hold(flow(i), &d, now, Duration::ZERO));
            if line.held.len() > 100 {
                assert_eq!(line.due(now).map(|d| d.flow), Some(i - 100));
                line.pop();
            }
            assert!(
                line.bytes.len() <= 2 * 101 * d.len(),
                "{}",
                line.bytes.len()
            );
        }
        while line.due(now).is_some() {
            line.pop();
        }
        line.trim();
        assert!(line.bytes.capacity() <= RETAINED);
    }
}
