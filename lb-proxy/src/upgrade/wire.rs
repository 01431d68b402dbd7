//! The hand-over socket's wire: length-prefixed JSON messages, and file
//! descriptors passed with `SCM_RIGHTS`, over a blocking Unix stream socket.
//!
//! Why frames and not lines: descriptors ride on a byte of their own, and a
//! reader that buffered past the end of a message could consume that byte
//! with a plain `read`, which discards the descriptors attached to it. A
//! frame says its length, so the reader takes exactly its bytes and then
//! receives the descriptors with `recvmsg`.

use std::io::{self, Read, Write};
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde::{de::DeserializeOwned, Serialize};

/// The most a frame may hold: a description of thousands of sockets fits
/// many times over, and a peer cannot make us allocate more.
const MAX_FRAME: usize = 1 << 20;

/// The kernel's limit on descriptors in one `SCM_RIGHTS` message
/// (`SCM_MAX_FD` in include/net/scm.h); more go in several messages.
pub const SCM_MAX_FD: usize = 253;

/// One end of a hand-over connection.
pub struct Channel {
    stream: UnixStream,
}

impl Channel {
    /// Takes a connected stream and makes it blocking (a listener's accepted
    /// streams may come non-blocking).
    pub fn new(stream: UnixStream) -> io::Result<Channel> {
        stream.set_nonblocking(false)?;
        Ok(Channel { stream })
    }

    /// Sends one message: its JSON length (4 bytes, big-endian), then the JSON.
    pub fn send<T: Serialize>(&mut self, message: &T, timeout: Duration) -> io::Result<()> {
        let body = serde_json::to_vec(message).map_err(io::Error::other)?;
        if body.len() > MAX_FRAME {
            return Err(io::Error::other(format!(
                "message of {} bytes is over the {MAX_FRAME}-byte frame limit",
                body.len()
            )));
        }
        self.stream.set_write_timeout(Some(timeout))?;
        let len = u32::try_from(body.len()).map_err(io::Error::other)?;
        self.stream.write_all(&len.to_be_bytes())?;
        self.stream.write_all(&body)
    }

    /// Receives one message, waiting at most `timeout` for each read.
    pub fn recv<T: DeserializeOwned>(&mut self, timeout: Duration) -> io::Result<T> {
        self.stream.set_read_timeout(Some(timeout))?;
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len)?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("peer announced a {len}-byte message, over the {MAX_FRAME}-byte limit"),
            ));
        }
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body)?;
        serde_json::from_slice(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Sends `fds` (duplicated into the peer by the kernel), at most
    /// [`SCM_MAX_FD`] per message.
    pub fn send_fds(&mut self, fds: &[BorrowedFd<'_>], timeout: Duration) -> io::Result<()> {
        self.stream.set_write_timeout(Some(timeout))?;
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        for chunk in raw.chunks(SCM_MAX_FD) {
            send_chunk(self.stream.as_raw_fd(), chunk)?;
        }
        Ok(())
    }

    /// Receives exactly `count` descriptors sent by [`Channel::send_fds`].
    pub fn recv_fds(&mut self, count: usize, timeout: Duration) -> io::Result<Vec<OwnedFd>> {
        self.stream.set_read_timeout(Some(timeout))?;
        let mut fds = Vec::with_capacity(count);
        while fds.len() < count {
            let want = (count - fds.len()).min(SCM_MAX_FD);
            let got = recv_chunk(self.stream.as_raw_fd(), want)?;
            if got.len() != want {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "expected {want} descriptors in a message, got {}",
                        got.len()
                    ),
                ));
            }
            fds.extend(got);
        }
        Ok(fds)
    }
}

/// Control-message room for `n` descriptors, in u64s so the buffer is
/// aligned for `cmsghdr`.
fn control_buffer(n: usize) -> (Vec<u64>, usize) {
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((n * size_of::<RawFd>()) as u32) } as usize;
    (vec![0u64; space.div_ceil(size_of::<u64>())], space)
}

/// One `sendmsg`: one data byte carrying `fds` as `SCM_RIGHTS`.
fn send_chunk(socket: RawFd, fds: &[RawFd]) -> io::Result<()> {
    let byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_ptr() as *mut libc::c_void,
        iov_len: byte.len(),
    };
    let (mut control, space) = control_buffer(fds.len());
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer is aligned and holds CMSG_SPACE(len) bytes,
    // so its first header and the data after it are in bounds.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as _;
        std::ptr::copy_nonoverlapping(
            fds.as_ptr(),
            libc::CMSG_DATA(cmsg).cast::<RawFd>(),
            fds.len(),
        );
    }
    loop {
        // SAFETY: msg points at live buffers for the duration of the call.
        let sent = unsafe { libc::sendmsg(socket, &msg, libc::MSG_NOSIGNAL) };
        if sent >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// One `recvmsg` of a message sent by [`send_chunk`] with room for `max`
/// descriptors; they arrive close-on-exec.
fn recv_chunk(socket: RawFd, max: usize) -> io::Result<Vec<OwnedFd>> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: byte.len(),
    };
    let (mut control, space) = control_buffer(max);
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let got = loop {
        // SAFETY: msg points at live buffers for the duration of the call.
        let got = unsafe { libc::recvmsg(socket, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if got >= 0 {
            break got;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // Own whatever arrived before judging the message, so nothing leaks.
    let fds = take_rights(&msg);
    if got == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "descriptors were truncated (more sent than announced)",
        ));
    }
    Ok(fds)
}

/// The descriptors of every `SCM_RIGHTS` header in a received message.
fn take_rights(msg: &libc::msghdr) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of
    // well-formed headers; CMSG_FIRSTHDR/NXTHDR stay within them, and each
    // SCM_RIGHTS payload is an array of descriptors now owned by us.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
    fds
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    const T: Duration = Duration::from_secs(5);

    /// More descriptors than one message carries arrive, in order, as
    /// descriptors of the same sockets, between two framed messages.
    #[test]
    fn descriptors_and_frames_cross_in_order() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Channel::new(a).unwrap(), Channel::new(b).unwrap());
        let sockets: Vec<std::net::UdpSocket> = (0..3)
            .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let count = SCM_MAX_FD + 7;
        let fds: Vec<BorrowedFd<'_>> = (0..count).map(|i| sockets[i % 3].as_fd()).collect();
        let got = std::thread::scope(|scope| {
            scope.spawn(move || {
                a.send(&"before", T).unwrap();
                a.send_fds(&fds, T).unwrap();
                a.send(&"after", T).unwrap();
            });
            assert_eq!(b.recv::<String>(T).unwrap(), "before");
            let got = b.recv_fds(count, T).unwrap();
            assert_eq!(b.recv::<String>(T).unwrap(), "after");
            got
        });
        assert_eq!(got.len(), count);
        for (i, fd) in got.iter().enumerate() {
            let local = socket2::SockRef::from(fd).local_addr().unwrap().as_socket();
            assert_eq!(local, Some(sockets[i % 3].local_addr().unwrap()), "fd #{i}");
        }
    }

    /// A frame over the limit is refused before anything is allocated for it.
    #[test]
    fn oversized_frames_are_refused() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut b = Channel::new(b).unwrap();
        a.write_all(&u32::MAX.to_be_bytes()).unwrap();
        let e = b.recv::<String>(T).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    }
}
