//! PROXY protocol v1 (text) and v2 (binary) headers, as HAProxy specifies them.
//!
//! Encoding writes into a caller-provided fixed-size buffer, so announcing a
//! client costs no allocation. Decoding exists for receivers and for the
//! round-trip tests; it never panics on any input, and tells a header that is
//! merely incomplete apart from one that is invalid.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::flow::Protocol;

/// The v2 signature: `\r\n\r\n\0\r\nQUIT\n`.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 line the spec allows, CRLF included.
pub const V1_MAX_LEN: usize = 107;
/// Longest v2 header this encoder writes (IPv6 addresses, no TLVs).
pub const V2_MAX_LEN: usize = 16 + 36;

/// Which version to speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// What a header announces: the original client and the address it connected to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyHeader {
    pub proto: Protocol,
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("incomplete header: need more bytes")]
    Incomplete,
    #[error("not a PROXY protocol header")]
    NoSignature,
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
    #[error("v1 headers carry only TCP")]
    V1NeedsTcp,
}

/// Both addresses in one family: v4 when both are v4, otherwise v6 (v4 mapped).
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    match (src, dst) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => {
            (src, dst)
        }
        _ => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
                IpAddr::V6(_) => a,
            };
            (v6(src), v6(dst))
        }
    }
}

struct SliceWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl std::fmt::Write for SliceWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        let dst = self.buf.get_mut(self.len..end).ok_or(std::fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

impl ProxyHeader {
    pub fn new(proto: Protocol, src: SocketAddr, dst: SocketAddr) -> Self {
        ProxyHeader { proto, src, dst }
    }

    /// Writes a v1 line (`PROXY TCP4 ...\r\n`) and returns its length.
    pub fn encode_v1(&self, out: &mut [u8; V1_MAX_LEN]) -> Result<usize, ProxyHeaderError> {
        use std::fmt::Write;
        if self.proto != Protocol::Tcp {
            return Err(ProxyHeaderError::V1NeedsTcp);
        }
        let (src, dst) = same_family(self.src, self.dst);
        let fam = if src.is_ipv4() { "TCP4" } else { "TCP6" };
        let mut w = SliceWriter { buf: out, len: 0 };
        write!(
            w,
            "PROXY {fam} {} {} {} {}\r\n",
            src.ip(),
            dst.ip(),
            src.port(),
            dst.port()
        )
        .map_err(|_| ProxyHeaderError::Malformed("v1 line too long"))?;
        Ok(w.len)
    }

    /// Writes a v2 header (PROXY command, no TLVs) and returns its length.
    pub fn encode_v2(&self, out: &mut [u8; V2_MAX_LEN]) -> usize {
        let (src, dst) = same_family(self.src, self.dst);
        out[..12].copy_from_slice(&V2_SIGNATURE);
        out[12] = 0x21; // version 2, command PROXY
        let transport = match self.proto {
            Protocol::Tcp => 0x1,
            Protocol::Udp => 0x2,
        };
        let body = match (src.ip(), dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                out[13] = 0x10 | transport;
                out[16..20].copy_from_slice(&s.octets());
                out[20..24].copy_from_slice(&d.octets());
                out[24..26].copy_from_slice(&src.port().to_be_bytes());
                out[26..28].copy_from_slice(&dst.port().to_be_bytes());
                12
            }
            (s, d) => {
                let v6 = |ip: IpAddr| match ip {
                    IpAddr::V6(v6) => v6,
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                };
                out[13] = 0x20 | transport;
                out[16..32].copy_from_slice(&v6(s).octets());
                out[32..48].copy_from_slice(&v6(d).octets());
                out[48..50].copy_from_slice(&src.port().to_be_bytes());
                out[50..52].copy_from_slice(&dst.port().to_be_bytes());
                36
            }
        };
        out[14..16].copy_from_slice(&(body as u16).to_be_bytes());
        16 + body
    }

    /// Parses a v1 or v2 header at the start of `input`; returns it (or `None`
    /// for v1 `UNKNOWN` / v2 `LOCAL`) and how many bytes it took.
    pub fn decode(input: &[u8]) -> Result<(Option<ProxyHeader>, usize), ProxyHeaderError> {
        if input.first() == Some(&b'P') {
            return decode_v1(input);
        }
        if input.first() == Some(&b'\r') {
            return decode_v2(input);
        }
        if input.is_empty() {
            return Err(ProxyHeaderError::Incomplete);
        }
        Err(ProxyHeaderError::NoSignature)
    }
}

fn decode_v1(input: &[u8]) -> Result<(Option<ProxyHeader>, usize), ProxyHeaderError> {
    const PREFIX: &[u8] = b"PROXY ";
    let head = &input[..input.len().min(PREFIX.len())];
    if head != &PREFIX[..head.len()] {
        return Err(ProxyHeaderError::NoSignature);
    }
    let window = &input[..input.len().min(V1_MAX_LEN)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if input.len() >= V1_MAX_LEN {
            Err(ProxyHeaderError::Malformed("v1 line longer than 107 bytes"))
        } else {
            Err(ProxyHeaderError::Incomplete)
        };
    };
    let line = std::str::from_utf8(&input[PREFIX.len().min(end)..end])
        .map_err(|_| ProxyHeaderError::Malformed("v1 line is not ASCII"))?;
    let consumed = end + 2;
    let mut parts = line.split(' ');
    let fam = parts.next().unwrap_or("");
    if fam == "UNKNOWN" {
        return Ok((None, consumed));
    }
    let fields: Vec<&str> = parts.collect();
    if fields.len() != 4 {
        return Err(ProxyHeaderError::Malformed("v1 needs 4 address fields"));
    }
    let ip = |s: &str| -> Result<IpAddr, ProxyHeaderError> {
        match fam {
            "TCP4" => s
                .parse::<Ipv4Addr>()
                .map(IpAddr::V4)
                .map_err(|_| ProxyHeaderError::Malformed("bad IPv4 address")),
            "TCP6" => s
                .parse::<Ipv6Addr>()
                .map(IpAddr::V6)
                .map_err(|_| ProxyHeaderError::Malformed("bad IPv6 address")),
            _ => Err(ProxyHeaderError::Malformed("unknown v1 family")),
        }
    };
    let port = |s: &str| -> Result<u16, ProxyHeaderError> {
        // The spec's grammar is plain decimal digits: no sign, no leading zero.
        if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ProxyHeaderError::Malformed("bad port"));
        }
        if s.len() > 1 && s.starts_with('0') {
            return Err(ProxyHeaderError::Malformed("port with leading zero"));
        }
        s.parse()
            .map_err(|_| ProxyHeaderError::Malformed("bad port"))
    };
    let src = SocketAddr::new(ip(fields[0])?, port(fields[2])?);
    let dst = SocketAddr::new(ip(fields[1])?, port(fields[3])?);
    Ok((Some(ProxyHeader::new(Protocol::Tcp, src, dst)), consumed))
}

fn decode_v2(input: &[u8]) -> Result<(Option<ProxyHeader>, usize), ProxyHeaderError> {
    let sig_len = input.len().min(12);
    if input[..sig_len] != V2_SIGNATURE[..sig_len] {
        return Err(ProxyHeaderError::NoSignature);
    }
    if input.len() < 16 {
        return Err(ProxyHeaderError::Incomplete);
    }
    if input[12] >> 4 != 2 {
        return Err(ProxyHeaderError::Malformed("unsupported v2 version"));
    }
    let len = u16::from_be_bytes([input[14], input[15]]) as usize;
    let total = 16 + len;
    if input.len() < total {
        return Err(ProxyHeaderError::Incomplete);
    }
    let body = &input[16..total];
    match input[12] & 0x0f {
        0x0 => return Ok((None, total)), // LOCAL: health checks and the like
        0x1 => {}
        _ => return Err(ProxyHeaderError::Malformed("unknown v2 command")),
    }
    let proto = match input[13] & 0x0f {
        0x1 => Protocol::Tcp,
        0x2 => Protocol::Udp,
        0x0 => return Ok((None, total)),
        _ => return Err(ProxyHeaderError::Malformed("unknown v2 transport")),
    };
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    let (src, dst) = match input[13] >> 4 {
        0x1 => {
            if body.len() < 12 {
                return Err(ProxyHeaderError::Malformed("v2 IPv4 block too short"));
            }
            let s: [u8; 4] = body[0..4].try_into().expect("4 bytes");
            let d: [u8; 4] = body[4..8].try_into().expect("4 bytes");
            (
                SocketAddr::new(IpAddr::from(s), port(&body[8..10])),
                SocketAddr::new(IpAddr::from(d), port(&body[10..12])),
            )
        }
        0x2 => {
            if body.len() < 36 {
                return Err(ProxyHeaderError::Malformed("v2 IPv6 block too short"));
            }
            let s: [u8; 16] = body[0..16].try_into().expect("16 bytes");
            let d: [u8; 16] = body[16..32].try_into().expect("16 bytes");
            (
                SocketAddr::new(IpAddr::from(s), port(&body[32..34])),
                SocketAddr::new(IpAddr::from(d), port(&body[34..36])),
            )
        }
        0x0 => return Ok((None, total)),
        _ => return Err(ProxyHeaderError::Malformed("unknown v2 address family")),
    };
    Ok((Some(ProxyHeader::new(proto, src, dst)), total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_matches_the_spec_example() {
        let h = ProxyHeader::new(
            Protocol::Tcp,
            sa("192.168.0.1:56324"),
            sa("192.168.0.11:443"),
        );
        let mut buf = [0u8; V1_MAX_LEN];
        let n = h.encode_v1(&mut buf).unwrap();
        assert_eq!(
            &buf[..n],
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
        );
        assert_eq!(ProxyHeader::decode(&buf[..n]).unwrap(), (Some(h), n));
        assert_eq!(
            ProxyHeader::decode(&buf[..n - 1]),
            Err(ProxyHeaderError::Incomplete)
        );
    }

    #[test]
    fn v2_ipv4_layout() {
        let h = ProxyHeader::new(Protocol::Tcp, sa("127.0.0.2:1000"), sa("127.0.0.1:80"));
        let mut buf = [0u8; V2_MAX_LEN];
        let n = h.encode_v2(&mut buf);
        assert_eq!(n, 28);
        assert_eq!(&buf[12..16], &[0x21, 0x11, 0, 12]);
        assert_eq!(&buf[16..20], &[127, 0, 0, 2]);
        assert_eq!(ProxyHeader::decode(&buf[..n]).unwrap(), (Some(h), n));
        for cut in 0..n {
            assert_eq!(
                ProxyHeader::decode(&buf[..cut]),
                Err(ProxyHeaderError::Incomplete),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn mixed_families_are_sent_as_ipv6() {
        let h = ProxyHeader::new(Protocol::Tcp, sa("10.0.0.1:5"), sa("[2001:db8::1]:80"));
        let mut buf = [0u8; V1_MAX_LEN];
        let n = h.encode_v1(&mut buf).unwrap();
        assert_eq!(
            &buf[..n],
            b"PROXY TCP6 ::ffff:10.0.0.1 2001:db8::1 5 80\r\n"
        );
    }

    #[test]
    fn garbage_is_rejected_not_panicked_on() {
        for input in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PROXY TCP4 1.2.3.4\r\n",
            b"PROXY TCP4 a b c d\r\n",
            b"\r\n\r\n\0\r\nQUIT\n\x31\x11\0\0",
        ] {
            assert!(ProxyHeader::decode(input).is_err(), "{input:?}");
        }
    }
}
