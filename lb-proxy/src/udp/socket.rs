//! UDP sockets and batched I/O: the frontend's SO_REUSEPORT sockets, and
//! [`Batch`], a fixed set of datagram buffers filled by one `recvmmsg(2)` and
//! emptied by one `sendmmsg(2)`.
//!
//! With a batch of 1 no `mmsg` call is made at all: a datagram is one
//! `recvfrom(2)` or `sendto(2)` (`udp_batch = 1` really means no batching,
//! which is what the with/without comparison measures).
//!
//! Every buffer holds [`MAX_DATAGRAM`] bytes, so the largest datagram IP can
//! carry passes intact. The buffers are allocated zeroed once per batch, so
//! the kernel maps their pages on first use: a frontend that only ever sees
//! small datagrams touches only the first page of each.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

use socket2::{Domain, Protocol, Socket, Type};

/// The largest UDP datagram: its 16-bit length field, less nothing (IPv4
/// payloads stop at 65,507, IPv6 jumbograms aside at 65,527; a buffer this
/// size takes either).
pub const MAX_DATAGRAM: usize = 65_535;

/// Receive buffer asked for on frontend sockets, so a burst from many
/// clients waits in the kernel rather than being dropped while a worker is
/// busy; the kernel caps it at `net.core.rmem_max`.
const FRONTEND_RECV_BUFFER: usize = 4 << 20;

/// Binds one UDP socket per worker on `addr`, each with SO_REUSEPORT, so
/// the kernel hashes every client 4-tuple to one worker (and so to one flow
/// table) for as long as the set of sockets is unchanged. Port 0 is resolved
/// by the first bind so all of them share one real port.
pub fn bind_frontend(
    addr: SocketAddr,
    count: usize,
) -> io::Result<(SocketAddr, Vec<std::net::UdpSocket>)> {
    let first = bind_one(addr)?;
    let actual = first.local_addr()?;
    let mut all = Vec::with_capacity(count);
    for _ in 1..count {
        all.push(bind_one(actual)?);
    }
    all.push(first);
    Ok((actual, all))
}

fn bind_one(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // Best effort: without the privilege to exceed rmem_max this is capped, not refused.
    let _ = socket.set_recv_buffer_size(FRONTEND_RECV_BUFFER);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// A socket address in the kernel's form, built once per flow so a reply's
/// destination is a copy, not a conversion.
#[derive(Clone, Copy)]
pub struct RawAddr {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl RawAddr {
    pub fn new(addr: SocketAddr) -> Self {
        // SAFETY: sockaddr_storage is plain data; all-zero is a valid (empty) value.
        let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
        let len = match addr {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(*a.ip()).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
                unsafe { (&mut storage as *mut _ as *mut libc::sockaddr_in).write(sin) };
                size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
                unsafe { (&mut storage as *mut _ as *mut libc::sockaddr_in6).write(sin6) };
                size_of::<libc::sockaddr_in6>()
            }
        };
        RawAddr {
            storage,
            len: len as libc::socklen_t,
        }
    }
}

/// The address the kernel wrote, or `None` for a family other than IPv4/IPv6.
fn socket_addr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in (family AF_INET) into the storage.
            let sin = unsafe { &*(storage as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6 (family AF_INET6) into the storage.
            let sin6 = unsafe { &*(storage as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// A fixed set of datagram slots: buffers, lengths and addresses, with the
/// `mmsghdr` array that points at them, built once.
pub struct Batch {
    /// `capacity` buffers of [`MAX_DATAGRAM`] bytes, back to back.
    bufs: Box<[u8]>,
    addrs: Box<[libc::sockaddr_storage]>,
    iovecs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
    /// Slots in use, from 0.
    len: usize,
}

// SAFETY: the raw pointers in `iovecs` and `hdrs` point only into this
// struct's own boxed slices, whose heap memory does not move when the struct
// does, and no one else holds them.
unsafe impl Send for Batch {}

impl Batch {
    /// `capacity` slots (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let mut bufs = vec![0u8; capacity * MAX_DATAGRAM].into_boxed_slice();
        // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
        let mut addrs: Box<[libc::sockaddr_storage]> =
            (0..capacity).map(|_| unsafe { zeroed() }).collect();
        let mut iovecs: Box<[libc::iovec]> = bufs
            .chunks_exact_mut(MAX_DATAGRAM)
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: MAX_DATAGRAM,
            })
            .collect();
        let hdrs = iovecs
            .iter_mut()
            .zip(addrs.iter_mut())
            .map(|(iov, addr)| {
                // SAFETY: msghdr/mmsghdr are plain data; all-zero is valid (no control data).
                let mut h: libc::mmsghdr = unsafe { zeroed() };
                h.msg_hdr.msg_name = (addr as *mut libc::sockaddr_storage).cast();
                h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                h.msg_hdr.msg_iov = iov;
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        Batch {
            bufs,
            addrs,
            iovecs,
            hdrs,
            len: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.hdrs.len()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_full(&self) -> bool {
        self.len == self.capacity()
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Slot `i`'s datagram.
    pub fn payload(&self, i: usize) -> &[u8] {
        let start = i * MAX_DATAGRAM;
        &self.bufs[start..start + self.hdrs[i].msg_len as usize]
    }

    /// Slot `i`'s source (after a receive on an unconnected socket).
    pub fn source(&self, i: usize) -> Option<SocketAddr> {
        socket_addr(&self.addrs[i])
    }

    /// Forgets the slots from `len` on (datagrams taken elsewhere, such as
    /// into the delay line).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Copies `payload` into the next free slot, bound for `to` (a held
    /// datagram leaving the delay line); false when the batch is full.
    pub fn push(&mut self, payload: &[u8], to: &RawAddr) -> bool {
        if self.is_full() || payload.len() > MAX_DATAGRAM {
            return false;
        }
        let i = self.len;
        let start = i * MAX_DATAGRAM;
        self.bufs[start..start + payload.len()].copy_from_slice(payload);
        self.hdrs[i].msg_len = payload.len() as libc::c_uint;
        self.set_destination(i, to);
        self.len += 1;
        true
    }

    /// Sets the destination of slot `i` for the next [`Self::send_to_all`].
    pub fn set_destination(&mut self, i: usize, to: &RawAddr) {
        self.addrs[i] = to.storage;
        self.hdrs[i].msg_hdr.msg_namelen = to.len;
    }

    /// Receives into the free slots, at most `max` datagrams, with one
    /// `recvmmsg` (one `recvfrom` when the batch holds a single slot).
    /// Returns how many arrived; `WouldBlock` when none was waiting.
    pub fn recv(&mut self, fd: RawFd, max: usize) -> io::Result<usize> {
        let start = self.len;
        let want = max.min(self.capacity() - start);
        if want == 0 {
            return Ok(0);
        }
        for i in start..start + want {
            self.iovecs[i].iov_len = MAX_DATAGRAM;
            let h = &mut self.hdrs[i];
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        let got = if self.capacity() == 1 {
            self.recv_one(fd)?
        } else {
            // SAFETY: `want` headers from `start` are initialised and point at
            // buffers and addresses owned by `self`, which outlive the call.
            let n = unsafe {
                libc::recvmmsg(
                    fd,
                    self.hdrs.as_mut_ptr().add(start),
                    want as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            n as usize
        };
        self.len += got;
        Ok(got)
    }

    /// One `recvfrom` into slot 0 (a batch of one slot).
    fn recv_one(&mut self, fd: RawFd) -> io::Result<usize> {
        let h = &mut self.hdrs[0];
        // SAFETY: the buffer and address storage are owned by `self` and sized as passed.
        let n = unsafe {
            libc::recvfrom(
                fd,
                self.bufs.as_mut_ptr().cast(),
                MAX_DATAGRAM,
                libc::MSG_DONTWAIT,
                h.msg_hdr.msg_name.cast(),
                &mut h.msg_hdr.msg_namelen,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        h.msg_len = n as libc::c_uint;
        Ok(1)
    }

    /// Sends slots `from..len` on `fd`, each to its destination, with one
    /// `sendmmsg` (one `sendto` when the batch holds a single slot). Returns
    /// how many the kernel took; an error only when it took none (then the
    /// error belongs to slot `from`).
    pub fn send_to_all(&mut self, fd: RawFd, from: usize) -> io::Result<usize> {
        let count = self.len.saturating_sub(from);
        if count == 0 {
            return Ok(0);
        }
        for i in from..self.len {
            self.iovecs[i].iov_len = self.hdrs[i].msg_len as usize;
        }
        if self.capacity() == 1 {
            let h = &self.hdrs[0];
            // SAFETY: the buffer and destination are owned by `self` and sized as passed.
            let n = unsafe {
                libc::sendto(
                    fd,
                    self.bufs.as_ptr().cast(),
                    h.msg_len as usize,
                    libc::MSG_DONTWAIT,
                    h.msg_hdr.msg_name.cast(),
                    h.msg_hdr.msg_namelen,
                )
            };
            return if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(1)
            };
        }
        // SAFETY: `count` headers from `from` are initialised and point at
        // buffers and addresses owned by `self`.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                self.hdrs.as_mut_ptr().add(from),
                count as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

/// Sends one datagram on a connected socket.
pub fn send_connected(fd: RawFd, payload: &[u8]) -> io::Result<()> {
    // SAFETY: the buffer is valid for its length; `fd` is a socket we own.
    let n = unsafe {
        libc::send(
            fd,
            payload.as_ptr().cast(),
            payload.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};

    fn pair() -> (UdpSocket, UdpSocket) {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (a, b)
    }

    /// Receives until `want` datagrams are in, or a deadline passes.
    fn recv_until(batch: &mut Batch, fd: RawFd, want: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while batch.len() < want && Instant::now() < deadline {
            match batch.recv(fd, want - batch.len()) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("recv: {e}"),
            }
        }
        assert_eq!(batch.len(), want, "datagrams received");
    }

    /// Many datagrams from two senders arrive in one batch with their
    /// sources, and go back out in one call, each to its own destination.
    #[test]
    fn a_batch_receives_with_sources_and_sends_each_to_its_destination() {
        let (rx, tx1) = pair();
        let tx2 = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx2.set_nonblocking(true).unwrap();
        let to = rx.local_addr().unwrap();
        for i in 0..5u8 {
            tx1.send_to(&[i; 10], to).unwrap();
            tx2.send_to(&[100 + i; 3], to).unwrap();
        }
        let mut batch = Batch::new(16);
        recv_until(&mut batch, rx.as_raw_fd(), 10);
        let mut from_tx1 = 0;
        for i in 0..10 {
            let src = batch.source(i).unwrap();
            if src == tx1.local_addr().unwrap() {
                assert_eq!(batch.payload(i).len(), 10);
                from_tx1 += 1;
            } else {
                assert_eq!(src, tx2.local_addr().unwrap());
                assert_eq!(batch.payload(i).len(), 3);
            }
        }
        assert_eq!(from_tx1, 5);
        // Echo every datagram back to whoever sent it, in one sendmmsg.
        for i in 0..10 {
            let src = RawAddr::new(batch.source(i).unwrap());
            batch.set_destination(i, &src);
        }
        assert_eq!(batch.send_to_all(rx.as_raw_fd(), 0).unwrap(), 10);
        let mut back1 = Batch::new(8);
        recv_until(&mut back1, tx1.as_raw_fd(), 5);
        assert!((0..5).all(|i| back1.payload(i) == [i as u8; 10]));
        let mut back2 = Batch::new(8);
        recv_until(&mut back2, tx2.as_raw_fd(), 5);
        assert!((0..5).all(|i| back2.payload(i) == [100 + i as u8; 3]));
    }

    /// The largest IPv4 UDP payload passes intact, through a batch of one
    /// slot (plain recvfrom/sendto) and a batched one.
    #[test]
    fn a_64k_datagram_passes_intact_with_and_without_batching() {
        const BIG: usize = 65_507;
        let payload: Vec<u8> = (0..BIG).map(|i| (i * 7 % 251) as u8).collect();
        for slots in [1, 4] {
            let (rx, tx) = pair();
            tx.send_to(&payload, rx.local_addr().unwrap()).unwrap();
            let mut batch = Batch::new(slots);
            recv_until(&mut batch, rx.as_raw_fd(), 1);
            assert_eq!(batch.payload(0), &payload[..], "{slots} slot(s)");
            batch.set_destination(0, &RawAddr::new(tx.local_addr().unwrap()));
            assert_eq!(batch.send_to_all(rx.as_raw_fd(), 0).unwrap(), 1);
            let mut back = Batch::new(slots);
            recv_until(&mut back, tx.as_raw_fd(), 1);
            assert_eq!(back.payload(0), &payload[..]);
        }
    }

    /// A batch of one never takes more than one datagram per call, and an
    /// empty socket says WouldBlock.
    #[test]
    fn a_single_slot_batch_takes_one_datagram_per_call() {
        let (rx, tx) = pair();
        let mut batch = Batch::new(1);
        let e = batch.recv(rx.as_raw_fd(), 1).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        for _ in 0..3 {
            tx.send_to(b"x", rx.local_addr().unwrap()).unwrap();
        }
        recv_until(&mut batch, rx.as_raw_fd(), 1);
        assert_eq!(batch.recv(rx.as_raw_fd(), 8).unwrap(), 0, "full: no call");
        batch.clear();
        recv_until(&mut batch, rx.as_raw_fd(), 1);
    }

    #[test]
    fn raw_addresses_round_trip() {
        for a in ["127.0.0.9:53", "[::1]:4433"] {
            let addr: SocketAddr = a.parse().unwrap();
            assert_eq!(socket_addr(&RawAddr::new(addr).storage), Some(addr));
        }
    }

    #[test]
    fn frontend_sockets_share_one_resolved_port() {
        let (addr, socks) = bind_frontend("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        assert_ne!(addr.port(), 0);
        assert_eq!(socks.len(), 3);
        assert!(socks.iter().all(|s| s.local_addr().unwrap() == addr));
    }
}
