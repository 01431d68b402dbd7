//! Fuzzes lb-core's PROXY protocol v1/v2 decoder with arbitrary bytes, as a
//! receiver would see them from the network.
//!
//! Properties checked on every input:
//! - `decode` never panics and never claims more bytes than it was given;
//! - a header it accepts is also accepted from exactly its own bytes, and every
//!   shorter prefix is `Incomplete`, never `Malformed` (a receiver reading a
//!   stream must be able to wait for more bytes);
//! - encode(decode(x)) decodes back to the same header, and is byte-identical
//!   to x where the spec allows only one spelling (v1 TCP4, v2 without TLVs);
//! - the encoder's output for any header decodes back to that header.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use lb_core::proxy_protocol::{V1_MAX_LEN, V2_MAX_LEN};
use lb_core::{Protocol, ProxyHeader, ProxyHeaderError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    check_decode(data);
    check_encode(data);
});

fn check_decode(data: &[u8]) {
    let result = ProxyHeader::decode(data);
    let Ok((header, n)) = result else { return };
    assert!(n <= data.len(), "consumed {n} of {} bytes", data.len());
    // The header ends where decode says: it needs nothing beyond its own bytes...
    assert_eq!(ProxyHeader::decode(&data[..n]), result);
    // ...and a cut short of it is only ever incomplete. Two cuts keep this cheap.
    for cut in [n - 1, n / 2] {
        assert_eq!(
            ProxyHeader::decode(&data[..cut]),
            Err(ProxyHeaderError::Incomplete),
            "cut at {cut} of {n}"
        );
    }
    if let Some(h) = header {
        round_trip(h, &data[..n]);
    }
}

/// Re-encodes an accepted header in the version it arrived in.
fn round_trip(h: ProxyHeader, wire: &[u8]) {
    if wire[0] == b'P' {
        let mut buf = [0u8; V1_MAX_LEN];
        let len = h.encode_v1(&mut buf).expect("v1 decodes only TCP");
        assert_eq!(ProxyHeader::decode(&buf[..len]), Ok((Some(h), len)));
        // IPv4 and decimal ports have one spelling; IPv6 text has several.
        if h.src.is_ipv4() {
            assert_eq!(&buf[..len], wire);
        }
    } else {
        let mut buf = [0u8; V2_MAX_LEN];
        let len = h.encode_v2(&mut buf);
        assert_eq!(ProxyHeader::decode(&buf[..len]), Ok((Some(h), len)));
        // Without TLVs or padding the wire bytes are the encoder's.
        if wire.len() == len {
            assert_eq!(&buf[..len], wire);
        }
    }
}

/// Builds a header from the input's bytes and checks the encoder's output
/// decodes back to it, in both versions.
fn check_encode(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let v6 = flags & 1 == 1;
    let proto = if flags & 2 == 0 {
        Protocol::Tcp
    } else {
        Protocol::Udp
    };
    let addr_len = if v6 { 16 } else { 4 };
    let Some(bytes) = rest.get(..2 * addr_len + 4) else {
        return;
    };
    let ip = |b: &[u8]| -> IpAddr {
        if v6 {
            Ipv6Addr::from(<[u8; 16]>::try_from(b).expect("16 bytes")).into()
        } else {
            Ipv4Addr::from(<[u8; 4]>::try_from(b).expect("4 bytes")).into()
        }
    };
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    let ports = &bytes[2 * addr_len..];
    let src = SocketAddr::new(ip(&bytes[..addr_len]), port(&ports[..2]));
    let dst = SocketAddr::new(ip(&bytes[addr_len..2 * addr_len]), port(&ports[2..]));
    let h = ProxyHeader::new(proto, src, dst);

    let mut v2 = [0u8; V2_MAX_LEN];
    let len = h.encode_v2(&mut v2);
    assert_eq!(ProxyHeader::decode(&v2[..len]), Ok((Some(h), len)));

    let mut v1 = [0u8; V1_MAX_LEN];
    match h.encode_v1(&mut v1) {
        Ok(len) => assert_eq!(ProxyHeader::decode(&v1[..len]), Ok((Some(h), len))),
        Err(e) => assert_eq!((proto, e), (Protocol::Udp, ProxyHeaderError::V1NeedsTcp)),
    }
}
