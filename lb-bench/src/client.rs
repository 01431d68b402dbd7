//! The one small blocking HTTP/1 client shared by lb-bench and the end-to-end
//! tests (`lb-tests`): a GET on a fresh connection (HTTP/1.0, or HTTP/1.1 with
//! `Connection: close`), a GET on an open keep-alive connection, reading one
//! response off a socket, and header lookup. Admin endpoints (`/metrics`,
//! `/healthz`, `/backends`, `/explain`), backends and frontends are all read
//! through it.
//!
//! Why hand-written rather than hyper (which lb-proxy uses): every caller is
//! synchronous std code (tests, setup and polling steps of the bench), so a
//! hyper client would need a tokio runtime per call or a runtime threaded
//! through every test; and the tests need what a pooling client hides: a
//! request on *this* socket (bound to a chosen source address, kept alive
//! across a reload), reading exactly one response and leaving the rest, and a
//! reset surfacing as an error. Speed is not the point here; the fast load
//! client is [`crate::load`]. Every socket gets [`IO_TIMEOUT`] so a broken
//! peer fails a caller instead of hanging it.
//!
//! A response is `(status, head, body)`: the head is the status line and
//! headers as text (look one up with [`header`]), the body is text.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::error::{Error, IoContext, Result};

/// Connect, read and write timeout on every socket this module opens.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A parsed response: (status, head, body).
///
/// Every request below goes out in one `write_all`: `write!` on a socket
/// would send each formatted piece as its own segment.
pub type Response = (u16, String, String);

/// `GET path` over HTTP/1.0 on a fresh connection, read to EOF.
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<Response> {
    let mut s = connect(addr)?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    read_to_eof(&mut s)
}

/// One HTTP/1.1 request on a fresh connection with `Connection: close`, read to EOF.
pub fn http_get_close(addr: SocketAddr, path: &str) -> io::Result<Response> {
    get_close_on(&mut connect(addr)?, path)
}

/// One HTTP/1.1 request with `Connection: close` on a connection the caller
/// opened (from a chosen source, or after a preamble such as a PROXY
/// header), read to EOF.
pub fn get_close_on(s: &mut TcpStream, path: &str) -> io::Result<Response> {
    get_close_after(s, b"", path)
}

/// [`get_close_on`] with `preamble` (a PROXY header, say) sent first, in the
/// same write as the request: a receiver sees the bytes arrive together, as a
/// real client's would.
pub fn get_close_after(s: &mut TcpStream, preamble: &[u8], path: &str) -> io::Result<Response> {
    let host = s.peer_addr()?;
    let mut request = preamble.to_vec();
    request.extend_from_slice(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    s.write_all(&request)?;
    read_to_eof(s)
}

/// One HTTP/1.1 request on an open keep-alive connection; reads exactly one
/// response (see [`read_response`]) and leaves the connection open.
pub fn http_keepalive_get(s: &mut TcpStream, path: &str) -> io::Result<Response> {
    let host = s.peer_addr()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())?;
    read_response(s)
}

/// Reads exactly one response (head, then a `Content-Length` body) from `s`
/// and nothing after it, so the next response on a keep-alive connection is
/// still there to read. The head is found by peeking, so this costs a few
/// reads a response, not one a byte (`lb-bench compare` reads thousands).
pub fn read_response(s: &mut TcpStream) -> io::Result<Response> {
    let mut raw = read_head(s)?;
    let head = String::from_utf8_lossy(&raw).into_owned();
    let len: usize = header(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| invalid(format!("no Content-Length in {head:?}")))?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    raw.extend_from_slice(&body);
    parse_response(&raw)
}

/// Splits a whole response into (status, head, body).
pub fn parse_response(raw: &[u8]) -> io::Result<Response> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| invalid(format!("no end of headers in {:?}", truncate(&text, 200))))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid(format!("bad status line in {:?}", truncate(head, 200))))?;
    Ok((status, head.to_owned(), body.to_owned()))
}

/// The value of header `name` (case-insensitive) in a response head.
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Connects with [`IO_TIMEOUT`] on connect, reads and writes, and no Nagle delay.
pub fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    with_timeouts(TcpStream::connect_timeout(&addr, IO_TIMEOUT)?)
}

/// Sets [`IO_TIMEOUT`] on reads and writes, and `TCP_NODELAY`.
pub fn with_timeouts(s: TcpStream) -> io::Result<TcpStream> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// [`http_get`] with lb-bench's errors: (status, body).
pub fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let what = || format!("GET http://{addr}{path}");
    match http_get(addr, path) {
        Ok((status, _, body)) => Ok((status, body)),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => Err(Error::Protocol {
            what: what(),
            detail: e.to_string(),
        }),
        Err(e) => Err(e).ctx(what),
    }
}

/// `GET path`, expecting 200 and a JSON body.
pub fn get_json(addr: SocketAddr, path: &str) -> Result<serde_json::Value> {
    let (status, body) = get(addr, path)?;
    let failed = |detail: String| Error::Protocol {
        what: format!("GET http://{addr}{path}"),
        detail,
    };
    if status != 200 {
        return Err(failed(format!("status {status}: {}", truncate(&body, 200))));
    }
    serde_json::from_str(&body)
        .map_err(|e| failed(format!("not JSON ({e}): {}", truncate(&body, 200))))
}

/// At most `max` characters of `s`, for error messages.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn read_to_eof(s: &mut TcpStream) -> io::Result<Response> {
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw)
}

/// The bytes up to and including the blank line that ends a response head,
/// consumed from `s`; what follows stays unread. Peeks at what has arrived and
/// consumes either up to the end of the head, or all of it when the end has
/// not arrived yet (then peeks again, which waits for more).
fn read_head(s: &mut TcpStream) -> io::Result<Vec<u8>> {
    const END: &[u8] = b"\r\n\r\n";
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.peek(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("EOF in response head {:?}", String::from_utf8_lossy(&raw)),
            ));
        }
        // The end may straddle what was consumed and what is peeked.
        let from = raw.len().saturating_sub(END.len() - 1);
        let mut seen = raw[from..].to_vec();
        seen.extend_from_slice(&buf[..n]);
        let take = match seen.windows(END.len()).position(|w| w == END) {
            Some(i) => from + i + END.len() - raw.len(),
            None => n,
        };
        s.read_exact(&mut buf[..take])?;
        raw.extend_from_slice(&buf[..take]);
        if raw.ends_with(END) {
            return Ok(raw);
        }
    }
}

fn invalid(detail: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `chunks` to one accepted connection, pausing between them.
    fn server(chunks: Vec<&'static [u8]>) -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            for c in chunks {
                s.write_all(c).unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        addr
    }

    #[test]
    fn one_response_is_read_and_the_next_left() {
        let addr = server(vec![
            b"HTTP/1.1 200 OK\r\nX-Node: a\r\nContent-Length: 2\r\n\r\na\nHTTP/1.1 503 No\r",
            b"\n",
            b"Content-Length: 0\r\n\r",
            b"\n",
        ]);
        let mut s = connect(addr).unwrap();
        let (status, head, body) = read_response(&mut s).unwrap();
        assert_eq!((status, body.as_str()), (200, "a\n"));
        assert_eq!(header(&head, "x-node"), Some("a"));
        let (status, head, body) = read_response(&mut s).unwrap();
        assert_eq!((status, body.as_str()), (503, ""), "{head}");
        assert_eq!(
            read_response(&mut s).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn bad_responses_are_invalid_data() {
        let e = parse_response(b"HTTP/1.1 200 OK\r\n").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let e = parse_response(b"garbage\r\n\r\n").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
