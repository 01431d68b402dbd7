//! The flow's per-connection `recv`, `send`, one-byte peek and `close` as
//! direct system calls (rustix's raw Linux backend), not through glibc.
//!
//! Why: glibc wraps each of these as a POSIX cancellation point, and in a
//! multi-threaded process (every lb-proxy) each call then flips the thread's
//! async-cancel state around the syscall, two atomic read-modify-writes per
//! call that nothing here uses (Rust never cancels threads); single-threaded
//! nginx pays for none (what it cost and saved: docs/research/new-connections.md,
//! "Change E").
//!
//! Readiness stays tokio's: each call runs inside `try_io`, which clears the
//! socket's readiness on `WouldBlock` exactly as `try_read`/`try_write` do.

use std::io;
use std::net::TcpStream as StdTcpStream;
use std::os::fd::{BorrowedFd, IntoRawFd, OwnedFd};

use rustix::net::{RecvFlags, SendFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// One `recv(2)` from `from` into `buf`: the bytes read, 0 at end of stream.
pub(super) fn recv(from: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    from.try_io(Interest::READABLE, || {
        rustix::net::recv(from, &mut *buf, RecvFlags::empty())
            .map(|(read, _)| read)
            .map_err(io::Error::from)
    })
}

/// One `send(2)` of `buf` to `to`; with `more`, as MSG_MORE. MSG_NOSIGNAL as
/// std's own writes: a reset peer is an EPIPE, not a signal.
pub(super) fn send(to: &TcpStream, buf: &[u8], more: bool) -> io::Result<usize> {
    let flags = if more {
        SendFlags::NOSIGNAL | SendFlags::MORE
    } else {
        SendFlags::NOSIGNAL
    };
    to.try_io(Interest::WRITABLE, || {
        rustix::net::send(to, buf, flags).map_err(io::Error::from)
    })
}

/// One non-blocking `send(2)` of `buf` on `fd`, with `MSG_MORE` (the FIN
/// follows): the io_uring engine's corked last write, made at once so that
/// the shutdown behind it can follow in the same turn.
pub fn send_more_now(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    let flags = SendFlags::NOSIGNAL | SendFlags::MORE | SendFlags::DONTWAIT;
    rustix::net::send(fd, buf, flags).map_err(io::Error::from)
}

/// One byte looked at, not taken (`MSG_PEEK | MSG_DONTWAIT`), on `fd`: 0
/// when the peer's FIN is the next thing to read, `WouldBlock` when nothing
/// is queued. The io_uring engine asks it whether to cork the last bytes
/// with the FIN; the sockmap engine, to run its verdict over what is queued.
pub fn peek(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut byte = [0u8; 1];
    rustix::net::recv(fd, &mut byte, RecvFlags::PEEK | RecvFlags::DONTWAIT)
        .map(|(read, _)| read)
        .map_err(io::Error::from)
}

/// A flow's socket, taken apart for the close below.
pub trait Closable {
    /// The descriptor, out of the reactor (tokio deregisters it here, as its
    /// drop would); `None` where that failed, and the socket is closed already.
    fn into_owned_fd(self) -> Option<OwnedFd>;
}

impl Closable for TcpStream {
    fn into_owned_fd(self) -> Option<OwnedFd> {
        // On a failed deregistration tokio drops, and so closes, the socket.
        self.into_std().ok().map(OwnedFd::from)
    }
}

impl Closable for StdTcpStream {
    fn into_owned_fd(self) -> Option<OwnedFd> {
        Some(OwnedFd::from(self))
    }
}

/// Closes `socket` with one `close(2)`; what the kernel does is the same as
/// for a drop (a FIN, or the RST `SO_LINGER` 0 asks for).
pub fn close(socket: impl Closable) {
    if let Some(fd) = socket.into_owned_fd() {
        // SAFETY: the descriptor is ours alone (taken out of its owner above)
        // and is not used after this call.
        unsafe { rustix::io::close(fd.into_raw_fd()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connect = TcpStream::connect(listener.local_addr().unwrap());
        let (a, b) = tokio::join!(connect, listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// Bytes sent arrive, a read of nothing yet is WouldBlock (and waits for
    /// the next edge), and the close is an end of stream at the peer.
    #[tokio::test]
    async fn send_recv_and_close_behave_as_the_std_calls() {
        let (a, mut b) = pair().await;
        let mut buf = [0u8; 16];
        assert_eq!(
            recv(&b, &mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        a.writable().await.unwrap();
        assert_eq!(send(&a, b"hello", false).unwrap(), 5);
        b.readable().await.unwrap();
        assert_eq!(recv(&b, &mut buf).unwrap(), 5);
        assert_eq!(&buf[..5], b"hello");
        close(a);
        assert_eq!(b.read(&mut buf).await.unwrap(), 0);
    }

    /// A send to a peer that has reset is an error, not a SIGPIPE that would
    /// kill the process (MSG_NOSIGNAL).
    #[tokio::test]
    async fn a_send_to_a_reset_peer_is_an_error() {
        let (a, b) = pair().await;
        crate::tcp::copy::reset(b);
        let mut failed = None;
        for _ in 0..100 {
            a.writable().await.unwrap();
            match send(&a, &[0u8; 1024], false) {
                Ok(_) => tokio::task::yield_now().await,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let e = failed.expect("sends to a reset peer keep failing");
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            "{e}"
        );
    }

    /// The ring's corked write made at once never blocks its thread: a
    /// peer that stops reading fills the socket and the call says
    /// WouldBlock (the ring then submits the write to wait for room), and
    /// what it did send arrives whole after the shutdown that releases it.
    #[tokio::test]
    async fn a_send_made_at_once_never_blocks_and_its_bytes_arrive() {
        use std::os::fd::AsFd;
        let (a, mut b) = pair().await;
        let chunk = [7u8; 64 * 1024];
        let mut sent = 0;
        let full = loop {
            match send_more_now(a.as_fd(), &chunk) {
                Ok(n) => sent += n,
                Err(e) => break e,
            }
            assert!(sent < 256 << 20, "a socket nobody reads filled up");
        };
        assert_eq!(full.kind(), io::ErrorKind::WouldBlock);
        // SAFETY: shutdown(2) on a socket this test holds.
        assert_eq!(unsafe { libc::shutdown(a.as_raw_fd(), libc::SHUT_WR) }, 0);
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), sent);
        assert!(got.iter().all(|&x| x == 7));
    }

    /// The peek leaves what it looks at in place: nothing queued is
    /// WouldBlock, a queued byte is 1 (and still read after), the FIN is 0.
    #[tokio::test]
    async fn the_peek_tells_bytes_from_the_fin_and_takes_neither() {
        use std::os::fd::AsFd;
        let (a, mut b) = pair().await;
        assert_eq!(
            peek(b.as_fd()).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        a.writable().await.unwrap();
        assert_eq!(send(&a, b"x", false).unwrap(), 1);
        close(a);
        b.readable().await.unwrap();
        assert_eq!(peek(b.as_fd()).unwrap(), 1);
        assert_eq!(peek(b.as_fd()).unwrap(), 1, "a peek takes nothing");
        let mut buf = [0u8; 4];
        assert_eq!(b.read(&mut buf).await.unwrap(), 1);
        let after_the_byte = loop {
            b.readable().await.unwrap();
            match b.try_io(Interest::READABLE, || peek(b.as_fd())) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => break other.unwrap(),
            }
        };
        assert_eq!(after_the_byte, 0, "the FIN is next");
        assert_eq!(b.read(&mut buf).await.unwrap(), 0);
    }
}
