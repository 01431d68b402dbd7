//! A minimal HTTP/1.1 client connection for the load generator: writes a
//! prepared `GET`, reads exactly one response (by `Content-Length`, chunked, or
//! to EOF), and hands back the status, the backend header and whether the
//! server will close. No allocation per response beyond the read buffer.
//!
//! Why it is written by hand while everything else that speaks HTTP uses
//! hyper or the shared helpers: here speed is the point. A generator that is
//! slower than the proxy measures itself. `lb-bench compare`'s generator
//! check (direct to one backend in the same run: the "generator check" line
//! under each "Front ends side by side" table in `BENCHMARKS.md`) compares
//! lb-bench with hey on keep-alive and new connections; on 2 CPUs it has
//! shown lb-bench several times hey's keep-alive rate and about twice its
//! new-connection rate. Keep this client while a re-run of that check still
//! says so.

use std::ops::Range;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;

/// Why one request failed.
#[derive(Debug)]
pub enum RequestError {
    Io(std::io::Error),
    /// The server closed the connection before a full response arrived.
    Eof {
        mid_response: bool,
    },
    /// The response was not HTTP/1.x we understand.
    Malformed(&'static str),
}

impl From<std::io::Error> for RequestError {
    fn from(e: std::io::Error) -> Self {
        RequestError::Io(e)
    }
}

/// One response, parsed. The ranges index [`HttpConn::slice`] and stay valid
/// until the next request on the same connection.
#[derive(Clone, Debug, Default)]
pub struct Response {
    pub status: u16,
    pub node: Option<Range<usize>>,
    pub seen: Option<Range<usize>>,
    /// Head plus body bytes.
    pub bytes: usize,
    /// The server will close (or did): the connection must not be reused.
    pub close: bool,
}

/// The request bytes for `GET path` with `Host: host`.
pub fn get_request(host: &str, path: &str, keepalive: bool) -> Vec<u8> {
    let connection = if keepalive {
        ""
    } else {
        "Connection: close\r\n"
    };
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lb-bench\r\n{connection}\r\n")
        .into_bytes()
}

/// A response head: the response so far, and how its body is delimited.
#[derive(Default)]
struct Head {
    resp: Response,
    content_length: Option<usize>,
    chunked: bool,
}

/// The header names to pick out, lower-case.
struct Wanted<'a> {
    node: &'a str,
    seen: &'a str,
}

/// A client connection with its read buffer.
pub struct HttpConn {
    pub stream: TcpStream,
    buf: Vec<u8>,
    /// Bytes of `buf` consumed by earlier responses.
    consumed: usize,
}

impl HttpConn {
    pub fn new(stream: TcpStream) -> HttpConn {
        HttpConn {
            stream,
            buf: Vec::with_capacity(4096),
            consumed: 0,
        }
    }

    pub fn slice(&self, r: &Range<usize>) -> &[u8] {
        &self.buf[r.clone()]
    }

    /// Reads more into the buffer; returns how many bytes arrived (0 at EOF).
    async fn fill(&mut self) -> std::io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < 2048 {
            self.buf.reserve(8192);
        }
        self.stream.read_buf(&mut self.buf).await
    }

    /// Reads until the buffer holds `end` bytes; EOF first is mid-response.
    async fn fill_to(&mut self, end: usize) -> Result<(), RequestError> {
        while self.buf.len() < end {
            if self.fill().await? == 0 {
                return Err(RequestError::Eof { mid_response: true });
            }
        }
        Ok(())
    }

    /// Sends `request` and reads one response. `node_header` and
    /// `seen_header` are lower-case header names to pick out.
    pub async fn request(
        &mut self,
        request: &[u8],
        node_header: &str,
        seen_header: &str,
    ) -> Result<Response, RequestError> {
        if self.consumed > 0 {
            self.buf.drain(..self.consumed);
            self.consumed = 0;
        }
        self.stream.write_all(request).await?;
        let head_end = self.read_head().await?;
        let wanted = Wanted {
            node: node_header,
            seen: seen_header,
        };
        let mut head = parse_head(&self.buf[..head_end], &wanted)?;
        let body_end = self.read_body(head_end, &mut head).await?;
        head.resp.bytes = body_end;
        self.consumed = body_end;
        Ok(head.resp)
    }

    /// Reads up to the empty line; returns where the head ends.
    async fn read_head(&mut self) -> Result<usize, RequestError> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                return Ok(i + 4);
            }
            if self.buf.len() > MAX_HEAD {
                return Err(RequestError::Malformed("response head too large"));
            }
            if self.fill().await? == 0 {
                return Err(RequestError::Eof {
                    mid_response: !self.buf.is_empty(),
                });
            }
        }
    }

    /// Reads the body as the head delimits it; returns where the message ends.
    async fn read_body(&mut self, head_end: usize, head: &mut Head) -> Result<usize, RequestError> {
        let status = head.resp.status;
        if head.chunked {
            self.read_chunked(head_end).await
        } else if let Some(len) = head.content_length {
            self.fill_to(head_end + len).await?;
            Ok(head_end + len)
        } else if status == 204 || status == 304 || (100..200).contains(&status) {
            Ok(head_end)
        } else {
            // No length: the body runs to EOF.
            while self.fill().await? > 0 {}
            head.resp.close = true;
            Ok(self.buf.len())
        }
    }

    /// Reads up to the next CRLF at or after `at`; returns where it starts.
    async fn line_end(&mut self, at: usize) -> Result<usize, RequestError> {
        loop {
            if let Some(i) = find(&self.buf[at..], b"\r\n") {
                return Ok(at + i);
            }
            if self.fill().await? == 0 {
                return Err(RequestError::Eof { mid_response: true });
            }
        }
    }

    /// Reads a chunked body starting at `at`; returns the end of the message.
    async fn read_chunked(&mut self, mut at: usize) -> Result<usize, RequestError> {
        loop {
            let line_end = self.line_end(at).await?;
            let size = chunk_size(&self.buf[at..line_end])?;
            at = line_end + 2;
            if size == 0 {
                return self.skip_trailers(at).await;
            }
            let end = at + size + 2;
            self.fill_to(end).await?;
            at = end;
        }
    }

    /// After the last chunk: trailers, then an empty line; returns the end of the message.
    async fn skip_trailers(&mut self, mut at: usize) -> Result<usize, RequestError> {
        loop {
            let end = self.line_end(at).await?;
            let empty = end == at;
            at = end + 2;
            if empty {
                return Ok(at);
            }
        }
    }
}

/// A chunk-size line (extensions after `;` ignored).
fn chunk_size(line: &[u8]) -> Result<usize, RequestError> {
    let text = std::str::from_utf8(line).map_err(|_| RequestError::Malformed("bad chunk size"))?;
    let text = text.split(';').next().unwrap_or("").trim();
    usize::from_str_radix(text, 16).map_err(|_| RequestError::Malformed("bad chunk size"))
}

/// The status line and the headers that matter; header value ranges index `head`.
fn parse_head(head: &[u8], wanted: &Wanted) -> Result<Head, RequestError> {
    let mut lines = head.split(|&b| b == b'\n');
    let status_line = lines.next().unwrap_or_default();
    if !status_line.starts_with(b"HTTP/1.") || status_line.len() < 12 {
        return Err(RequestError::Malformed("bad status line"));
    }
    let mut h = Head::default();
    h.resp.status = std::str::from_utf8(&status_line[9..12])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(RequestError::Malformed("bad status code"))?;
    // HTTP/1.0 closes unless the server says keep-alive.
    h.resp.close = status_line.starts_with(b"HTTP/1.0");
    let mut offset = status_line.len() + 1;
    for line in lines {
        let start = offset;
        offset += line.len() + 1;
        let line = trim_cr(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let raw_value = &line[colon + 1..];
        let value = trim(raw_value);
        let value_start = start + colon + 1 + leading_ws(raw_value);
        header(
            &mut h,
            &line[..colon],
            value,
            value_start..value_start + value.len(),
            wanted,
        )?;
    }
    Ok(h)
}

/// One header line: the framing headers, and the two named ones to pick out.
fn header(
    h: &mut Head,
    name: &[u8],
    value: &[u8],
    value_range: Range<usize>,
    wanted: &Wanted,
) -> Result<(), RequestError> {
    if name.eq_ignore_ascii_case(b"content-length") {
        h.content_length = std::str::from_utf8(value).ok().and_then(|s| s.parse().ok());
        if h.content_length.is_none() {
            return Err(RequestError::Malformed("bad content-length"));
        }
    } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
        h.chunked = value.eq_ignore_ascii_case(b"chunked");
    } else if name.eq_ignore_ascii_case(b"connection") {
        if value.eq_ignore_ascii_case(b"close") {
            h.resp.close = true;
        } else if value.eq_ignore_ascii_case(b"keep-alive") {
            h.resp.close = false;
        }
    } else if name.eq_ignore_ascii_case(wanted.node.as_bytes()) {
        h.resp.node = Some(value_range);
    } else if name.eq_ignore_ascii_case(wanted.seen.as_bytes()) {
        h.resp.seen = Some(value_range);
    }
    Ok(())
}

pub(crate) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn leading_ws(v: &[u8]) -> usize {
    v.iter().take_while(|b| b.is_ascii_whitespace()).count()
}

fn trim(v: &[u8]) -> &[u8] {
    let start = leading_ws(v);
    let end = v.len()
        - v.iter()
            .rev()
            .take_while(|b| b.is_ascii_whitespace())
            .count();
    if start >= end {
        &[]
    } else {
        &v[start..end]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn exchange(
        responses: &'static [u8],
        requests: usize,
    ) -> Vec<Result<(u16, String, bool), String>> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (mut r, mut w) = s.into_split();
            // Keep reading requests, so unread data never turns the close into a reset.
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while matches!(r.read(&mut buf).await, Ok(n) if n > 0) {}
            });
            // Dribble the responses out in small pieces.
            for piece in responses.chunks(7) {
                w.write_all(piece).await.unwrap();
                w.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut conn = HttpConn::new(TcpStream::connect(addr).await.unwrap());
        let req = get_request("x", "/", true);
        let mut out = Vec::new();
        for _ in 0..requests {
            match conn.request(&req, "x-node", "x-seen-source").await {
                Ok(r) => {
                    let node = r
                        .node
                        .as_ref()
                        .map(|n| String::from_utf8_lossy(conn.slice(n)).into_owned())
                        .unwrap_or_default();
                    out.push(Ok((r.status, node, r.close)));
                }
                Err(e) => out.push(Err(format!("{e:?}"))),
            }
        }
        out
    }

    #[tokio::test]
    async fn reads_content_length_chunked_and_eof_bodies() {
        let got = exchange(
            b"HTTP/1.1 200 OK\r\nX-Node: node-1\r\nContent-Length: 7\r\n\r\nnode-1\n\
              HTTP/1.1 503 Busy\r\nx-node:  node-2 \r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nT: v\r\n\r\n\
              HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nrest of it",
            4,
        )
        .await;
        assert_eq!(got[0].as_ref().unwrap(), &(200, "node-1".to_owned(), false));
        assert_eq!(got[1].as_ref().unwrap(), &(503, "node-2".to_owned(), false));
        assert_eq!(got[2].as_ref().unwrap(), &(200, String::new(), true));
        assert!(got[3].as_ref().unwrap_err().contains("Eof"), "{:?}", got[3]);
    }

    #[tokio::test]
    async fn a_truncated_body_is_an_error() {
        let got = exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", 1).await;
        assert!(
            got[0].as_ref().unwrap_err().contains("mid_response: true"),
            "{got:?}"
        );
        let got = exchange(b"SSH-2.0-OpenSSH\r\n\r\n", 1).await;
        assert!(
            got[0].as_ref().unwrap_err().contains("Malformed"),
            "{got:?}"
        );
    }
}
