//! Fixtures shared by lb-proxy's unit tests.

use std::os::fd::AsRawFd;

use tokio::net::{TcpListener, TcpStream};

/// A connected loopback TCP pair: (the side that connected, the side that accepted).
pub async fn loopback_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let outside = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (inside, _) = listener.accept().await.unwrap();
    (outside, inside)
}

/// A deterministic byte pattern of `len` bytes, different per `seed`, that
/// does not repeat within a socket buffer (so a misplaced chunk shows).
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

/// TCP segments `stream` has sent so far (`tcpi_segs_out`).
pub fn segments_sent(stream: &TcpStream) -> u32 {
    crate::tcp::sockmap::sys::tcp_info(stream.as_raw_fd())
        .expect("TCP_INFO on a connected socket")
        .tcpi_segs_out
}
