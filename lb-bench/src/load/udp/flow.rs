//! One UDP flow of the generator: a connected client socket on its own
//! source address, the window it keeps in flight, and what it counted. Also
//! the datagram format: a header the echo returns unchanged (magic, flow,
//! sequence number, send time), then a fixed byte pattern, so a reply that
//! belongs to another flow, or came back altered, is counted, not trusted.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

use crate::error::{IoContext, Result};

/// `LBUD`: marks a datagram as the generator's.
const MAGIC: u32 = 0x4c42_5544;

/// Bytes of header at the start of every datagram: magic, flow, sequence, send time.
pub const HEADER_LEN: usize = 4 + 4 + 8 + 8;

/// Socket buffers of a client socket: far above a window of the largest
/// datagrams, so the generator's own sockets never drop.
const CLIENT_SOCKET_BUFFER: usize = 4 << 20;

/// The byte at offset `i` of every datagram past the header.
fn pattern(i: usize) -> u8 {
    (i as u8).wrapping_mul(31).wrapping_add(7)
}

/// Fills `buf` (one datagram) past the header with the pattern; done once per buffer.
pub fn fill_pattern(buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate().skip(HEADER_LEN) {
        *b = pattern(i);
    }
}

/// Writes the header of datagram `seq` of `flow`, sent `sent_ns` after the run's start.
pub fn write_header(buf: &mut [u8], flow: u32, seq: u64, sent_ns: u64) {
    buf[0..4].copy_from_slice(&MAGIC.to_be_bytes());
    buf[4..8].copy_from_slice(&flow.to_be_bytes());
    buf[8..16].copy_from_slice(&seq.to_be_bytes());
    buf[16..24].copy_from_slice(&sent_ns.to_be_bytes());
}

/// What a reply says about itself, once checked.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// Ours, intact: its sequence number and send time.
    Echo { seq: u64, sent_ns: u64 },
    /// Wrong length, magic, flow or pattern.
    Corrupt,
}

/// Checks a reply received on `flow`'s socket against `template` (a
/// datagram as sent, pattern filled: its length is the size expected).
pub fn check_reply(data: &[u8], truncated: bool, flow: u32, template: &[u8]) -> Reply {
    if truncated || data.len() != template.len() || data.len() < HEADER_LEN {
        return Reply::Corrupt;
    }
    let word = |r: std::ops::Range<usize>| -> u64 {
        data[r].iter().fold(0u64, |acc, b| acc << 8 | u64::from(*b))
    };
    if word(0..4) != u64::from(MAGIC) || word(4..8) != u64::from(flow) {
        return Reply::Corrupt;
    }
    // One memcmp: the pattern past the header is the same in every datagram.
    if data[HEADER_LEN..] != template[HEADER_LEN..] {
        return Reply::Corrupt;
    }
    Reply::Echo {
        seq: word(8..16),
        sent_ns: word(16..24),
    }
}

/// One flow: its socket and counts.
pub struct Flow {
    pub id: u32,
    pub socket: UdpSocket,
    /// Datagrams sent and not yet answered, as far as the window knows
    /// (reset when the flow stalls: see [`Flow::stalled`]).
    pub in_flight: usize,
    pub next_seq: u64,
    /// The first sequence number of the current window: echoes below it were
    /// written off at a stall, so they count as echoed but neither shrink
    /// the window nor open it further.
    pub window_base: u64,
    pub sent: u64,
    pub echoed: u64,
    /// Echoes that arrived before the sending phase ended (the rate's numerator).
    pub echoed_in_time: u64,
    pub corrupt: u64,
    pub stalls: u64,
    pub send_errors: u64,
    /// The last echo, or the last time the window was refilled after a stall.
    pub last_progress: Instant,
}

impl Flow {
    /// A non-blocking socket on `source` (any port), connected to `target`.
    pub fn open(id: u32, source: Ipv4Addr, target: SocketAddr, now: Instant) -> Result<Flow> {
        let socket = UdpSocket::bind((source, 0)).ctx(|| format!("bind {source}:0"))?;
        socket
            .connect(target)
            .ctx(|| format!("connect a UDP socket to {target}"))?;
        socket
            .set_nonblocking(true)
            .ctx(|| "set_nonblocking".into())?;
        set_buffers(socket.as_raw_fd());
        Ok(Flow {
            id,
            socket,
            in_flight: 0,
            next_seq: 0,
            window_base: 0,
            sent: 0,
            echoed: 0,
            echoed_in_time: 0,
            corrupt: 0,
            stalls: 0,
            send_errors: 0,
            last_progress: now,
        })
    }

    pub fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// Sent and never answered (so far).
    pub fn outstanding(&self) -> u64 {
        self.sent.saturating_sub(self.echoed)
    }

    /// Whether the flow has waited longer than `stall` with datagrams in
    /// flight: they are presumed lost, and the window is opened again so a
    /// loss cannot stop the flow. A late echo still counts as echoed.
    pub fn stalled(&self, now: Instant, stall: std::time::Duration) -> bool {
        self.in_flight > 0 && now.saturating_duration_since(self.last_progress) > stall
    }

    /// Writes off the window after a stall; the next fill opens a new one.
    pub fn write_off(&mut self, now: Instant) {
        self.in_flight = 0;
        self.window_base = self.next_seq;
        self.stalls += 1;
        self.last_progress = now;
    }

    /// Counts echo `seq`, received at `now`; `in_time` when the sending
    /// phase was still on. Returns whether it freed a place in the window.
    pub fn echoed(&mut self, seq: u64, now: Instant, in_time: bool) -> bool {
        self.echoed += 1;
        self.echoed_in_time += u64::from(in_time);
        self.last_progress = now;
        if seq >= self.window_base && self.in_flight > 0 {
            self.in_flight -= 1;
            true
        } else {
            false
        }
    }
}

/// Large socket buffers on both sides; a refusal leaves the default.
fn set_buffers(fd: RawFd) {
    let size = CLIENT_SOCKET_BUFFER as libc::c_int;
    for option in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: setsockopt on a valid fd with a pointer to a live c_int.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn datagram(flow: u32, seq: u64, size: usize) -> Vec<u8> {
        let mut d = vec![0; size];
        fill_pattern(&mut d);
        write_header(&mut d, flow, seq, 99);
        d
    }

    #[test]
    fn an_intact_echo_reads_back() {
        let d = datagram(7, 42, 64);
        assert_eq!(
            check_reply(&d, false, 7, &datagram(0, 0, 64)),
            Reply::Echo {
                seq: 42,
                sent_ns: 99
            }
        );
    }

    #[test]
    fn wrong_flow_length_bytes_or_truncation_are_corrupt() {
        let (d, t) = (datagram(7, 42, 64), datagram(0, 0, 64));
        assert_eq!(check_reply(&d, false, 8, &t), Reply::Corrupt);
        assert_eq!(check_reply(&d[..63], false, 7, &t), Reply::Corrupt);
        assert_eq!(check_reply(&d, true, 7, &t), Reply::Corrupt);
        let mut bad = d.clone();
        bad[50] ^= 1;
        assert_eq!(check_reply(&bad, false, 7, &t), Reply::Corrupt);
        assert_eq!(check_reply(&[1, 2, 3], false, 7, &t[..3]), Reply::Corrupt);
    }
}
