//! The UDP side of `lb-bench serve`: binding a UDP socket and its health
//! listener on one port number, the `udp-echo` loop, and starting a `quic`
//! server on the bound socket.

use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{Counts, Kind, ServerSpec};
use crate::quic;

/// How many UDP ports a port-0 spec tries before giving up on finding one
/// whose TCP twin is free too.
const BIND_TRIES: usize = 20;

/// The largest UDP payload: the echo's buffer holds any datagram whole.
const MAX_DATAGRAM: usize = 65_535;

/// Socket buffers for the echo (capped by net.core.rmem_max/wmem_max), so a
/// burst from many client flows waits in the kernel instead of being dropped.
const SOCKET_BUFFER: libc::c_int = 4 << 20;

/// Binds UDP on `addr`, then TCP on the same IP and port. With port 0 the
/// kernel picks the UDP port; when TCP finds it taken, another is tried.
pub(super) fn bind_pair(addr: SocketAddr) -> io::Result<(UdpSocket, TcpListener)> {
    let tries = if addr.port() == 0 { BIND_TRIES } else { 1 };
    let mut last = None;
    for _ in 0..tries {
        let udp = UdpSocket::bind(addr)?;
        match TcpListener::bind(udp.local_addr()?) {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AddrInUse)))
}

/// Starts the UDP side of `spec` on `socket` in `tasks`.
pub(super) fn spawn(
    tasks: &mut tokio::task::JoinSet<()>,
    spec: &ServerSpec,
    socket: UdpSocket,
    counts: Arc<Counts>,
) {
    match spec.kind {
        Kind::UdpEcho => {
            if let Ok(socket) = prepare(socket) {
                tasks.spawn(echo(socket, counts));
            }
        }
        Kind::Quic(id) => {
            // quinn sets the socket up itself (non-blocking, GRO, ECN).
            let Ok(endpoint) = quic::server_endpoint(socket, id) else {
                return;
            };
            let name: Arc<str> = Arc::from(spec.name.as_str());
            tasks.spawn(quic::serve(endpoint, name, Arc::clone(&counts.quic)));
        }
        Kind::Http | Kind::Echo | Kind::Sink => {}
    }
}

/// Non-blocking, with large buffers, registered with tokio.
fn prepare(socket: UdpSocket) -> io::Result<tokio::net::UdpSocket> {
    use std::os::fd::AsRawFd;
    socket.set_nonblocking(true)?;
    for option in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        let size = SOCKET_BUFFER;
        // SAFETY: setsockopt on a valid fd with a pointer to a live c_int of
        // the given size. A refusal only leaves the default size.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    tokio::net::UdpSocket::from_std(socket)
}

/// Echoes every datagram to its sender, one receive and one send each,
/// counting what arrived. Errors (an ICMP report, a full send buffer) cost
/// that datagram only.
async fn echo(socket: tokio::net::UdpSocket, counts: Arc<Counts>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        counts.datagrams.fetch_add(1, Ordering::Relaxed);
        counts.bytes.fetch_add(n as u64, Ordering::Relaxed);
        let _ = socket.send_to(&buf[..n], from).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_shares_one_port_number() {
        let (udp, tcp) = bind_pair("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = udp.local_addr().unwrap().port();
        assert_ne!(port, 0);
        assert_eq!(tcp.local_addr().unwrap().port(), port);
    }

    #[test]
    fn a_taken_fixed_port_is_an_error() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let e = bind_pair(taken.local_addr().unwrap()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
    }
}
