//! Batched datagram I/O on connected UDP sockets: one `recvmmsg` or
//! `sendmmsg` moves up to [`MAX_BATCH`] datagrams, so the generator's
//! syscall cost per datagram stays far below a proxy's and it is not what
//! limits a run. The buffers live in one [`Batch`] per worker thread, built
//! once: nothing is allocated per datagram.

use std::io;
use std::os::fd::RawFd;

/// The most datagrams one syscall moves (and the largest window a flow may keep).
pub const MAX_BATCH: usize = 64;

/// Slack past the payload size in receive buffers, so a longer datagram
/// shows as a wrong length rather than a silent truncation.
const RECV_SLACK: usize = 64;

/// `MAX_BATCH` send buffers and `MAX_BATCH` receive buffers of one size,
/// with the iovec and mmsghdr arrays that point into them.
pub struct Batch {
    size: usize,
    send: Vec<u8>,
    recv: Vec<u8>,
    send_iov: Vec<libc::iovec>,
    recv_iov: Vec<libc::iovec>,
    send_hdr: Vec<libc::mmsghdr>,
    recv_hdr: Vec<libc::mmsghdr>,
}

// The raw pointers in the iovec arrays point into this struct's own vectors,
// which never move or grow after `new`; the batch is used by one thread.
unsafe impl Send for Batch {}

impl Batch {
    /// Buffers for datagrams of `size` bytes.
    pub fn new(size: usize) -> Batch {
        let recv_size = size + RECV_SLACK;
        let mut b = Batch {
            size,
            send: vec![0; size * MAX_BATCH],
            recv: vec![0; recv_size * MAX_BATCH],
            send_iov: Vec::with_capacity(MAX_BATCH),
            recv_iov: Vec::with_capacity(MAX_BATCH),
            send_hdr: Vec::with_capacity(MAX_BATCH),
            recv_hdr: Vec::with_capacity(MAX_BATCH),
        };
        for i in 0..MAX_BATCH {
            b.send_iov.push(libc::iovec {
                iov_base: b.send[i * size..].as_mut_ptr().cast(),
                iov_len: size,
            });
            b.recv_iov.push(libc::iovec {
                iov_base: b.recv[i * recv_size..].as_mut_ptr().cast(),
                iov_len: recv_size,
            });
        }
        for i in 0..MAX_BATCH {
            b.send_hdr.push(header(&mut b.send_iov[i]));
            b.recv_hdr.push(header(&mut b.recv_iov[i]));
        }
        b
    }

    /// The `i`-th send buffer, to fill before [`Batch::send`].
    pub fn send_buf(&mut self, i: usize) -> &mut [u8] {
        &mut self.send[i * self.size..(i + 1) * self.size]
    }

    /// Sends the first `n` send buffers on `fd`; returns how many left
    /// (0 when the socket buffer is full).
    pub fn send(&mut self, fd: RawFd, n: usize) -> io::Result<usize> {
        let n = n.min(MAX_BATCH);
        // SAFETY: the headers point at iovecs and buffers owned by `self`,
        // valid for `n <= MAX_BATCH` entries; `fd` is the caller's socket.
        let r = unsafe {
            libc::sendmmsg(
                fd,
                self.send_hdr.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        match r {
            r if r >= 0 => Ok(r as usize),
            _ => would_block_as_zero(io::Error::last_os_error()),
        }
    }

    /// Receives up to `max` datagrams from `fd` without waiting; returns how
    /// many (0 when none is queued).
    pub fn recv(&mut self, fd: RawFd, max: usize) -> io::Result<usize> {
        let max = max.clamp(1, MAX_BATCH);
        for h in &mut self.recv_hdr[..max] {
            h.msg_len = 0;
            h.msg_hdr.msg_flags = 0;
        }
        // SAFETY: as in `send`; a null timeout is allowed with MSG_DONTWAIT.
        let r = unsafe {
            libc::recvmmsg(
                fd,
                self.recv_hdr.as_mut_ptr(),
                max as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        match r {
            r if r >= 0 => Ok(r as usize),
            _ => would_block_as_zero(io::Error::last_os_error()),
        }
    }

    /// The `i`-th received datagram (after [`Batch::recv`]), and whether the
    /// kernel truncated it.
    pub fn received(&self, i: usize) -> (&[u8], bool) {
        let recv_size = self.size + RECV_SLACK;
        let h = &self.recv_hdr[i];
        let len = (h.msg_len as usize).min(recv_size);
        let start = i * recv_size;
        (
            &self.recv[start..start + len],
            h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
        )
    }
}

/// A message header for a connected socket: no address, one iovec.
fn header(iov: &mut libc::iovec) -> libc::mmsghdr {
    // SAFETY: mmsghdr is plain old data; all-zero is a valid empty header.
    let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
    h.msg_hdr.msg_iov = iov;
    h.msg_hdr.msg_iovlen = 1;
    h
}

fn would_block_as_zero(e: io::Error) -> io::Result<usize> {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_batch_goes_out_and_comes_back_whole() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        a.connect(b.local_addr().unwrap()).unwrap();
        b.connect(a.local_addr().unwrap()).unwrap();
        let mut batch = Batch::new(100);
        for i in 0..5 {
            batch.send_buf(i).fill(i as u8 + 1);
        }
        assert_eq!(batch.send(a.as_raw_fd(), 5).unwrap(), 5);
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while got.len() < 5 && std::time::Instant::now() < deadline {
            let n = batch.recv(b.as_raw_fd(), MAX_BATCH).unwrap();
            for i in 0..n {
                let (d, truncated) = batch.received(i);
                assert!(!truncated);
                got.push(d.to_vec());
            }
        }
        assert_eq!(got.len(), 5);
        for (i, d) in got.iter().enumerate() {
            assert_eq!(d, &vec![i as u8 + 1; 100]);
        }
        assert_eq!(
            batch.recv(b.as_raw_fd(), 4).unwrap(),
            0,
            "nothing more queued"
        );
    }
}
