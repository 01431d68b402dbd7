//! Property tests of the PROXY protocol codec: v1 and v2 headers round-trip
//! through `decode`, every strict prefix of a header is `Incomplete`, bytes
//! after a header are never consumed, and `decode` never panics on arbitrary
//! input or on mutations of valid headers (and never claims to have consumed
//! more than it was given).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use lb_core::proxy_protocol::{V1_MAX_LEN, V2_MAX_LEN, V2_SIGNATURE};
use lb_core::{Protocol, ProxyHeader, ProxyHeaderError};
use proptest::prelude::*;
use proptest::test_runner::Config;

/// Enough cases to find edge cases, few enough for a debug run on two cores;
/// no regression files are written.
fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

fn v4_addr() -> impl Strategy<Value = SocketAddr> {
    (any::<[u8; 4]>(), any::<u16>())
        .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
}

/// IPv6 addresses, biased towards the shapes whose text form is special
/// (`::`, `::1`, v4-mapped, long runs of zeros) as well as uniform ones.
fn v6_addr() -> impl Strategy<Value = SocketAddr> {
    let ip = prop_oneof![
        any::<[u8; 16]>().prop_map(Ipv6Addr::from),
        any::<[u8; 4]>().prop_map(|v4| Ipv4Addr::from(v4).to_ipv6_mapped()),
        any::<[u16; 8]>().prop_map(|mut s| {
            // Zero a run of segments so `::` compression kicks in somewhere.
            let start = (s[0] % 8) as usize;
            let len = (s[1] % 8) as usize;
            for seg in s.iter_mut().skip(start).take(len) {
                *seg = 0;
            }
            Ipv6Addr::from(s)
        }),
        Just(Ipv6Addr::UNSPECIFIED),
        Just(Ipv6Addr::LOCALHOST),
    ];
    (ip, any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(IpAddr::V6(ip), port))
}

fn any_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![v4_addr(), v6_addr()]
}

fn any_proto() -> impl Strategy<Value = Protocol> {
    prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)]
}

/// What a header announcing (src, dst) decodes to: the same addresses when
/// both are in one family, both as IPv6 (v4-mapped) otherwise.
fn as_sent(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    if src.is_ipv4() == dst.is_ipv4() {
        return (src, dst);
    }
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    (v6(src), v6(dst))
}

fn encode_v1(h: &ProxyHeader) -> Vec<u8> {
    let mut buf = [0u8; V1_MAX_LEN];
    let n = h.encode_v1(&mut buf).expect("a TCP header encodes as v1");
    buf[..n].to_vec()
}

fn encode_v2(h: &ProxyHeader) -> Vec<u8> {
    let mut buf = [0u8; V2_MAX_LEN];
    let n = h.encode_v2(&mut buf);
    buf[..n].to_vec()
}

/// Decodes `input` and checks the invariants that hold for every input: no
/// panic (the caller being a proptest, a panic fails the case) and a consumed
/// length within the input.
fn decode_checked(input: &[u8]) -> Result<(Option<ProxyHeader>, usize), ProxyHeaderError> {
    let out = ProxyHeader::decode(input);
    if let Ok((_, consumed)) = &out {
        assert!(
            *consumed <= input.len(),
            "decode consumed {consumed} of {} bytes: {input:?}",
            input.len()
        );
        assert!(*consumed > 0, "a decoded header is never empty: {input:?}");
        // Whatever was accepted is a header on its own: the bytes after it
        // did not matter, and each strict prefix of it is merely incomplete.
        assert_eq!(ProxyHeader::decode(&input[..*consumed]), out, "{input:?}");
        for cut in 0..*consumed {
            assert_eq!(
                ProxyHeader::decode(&input[..cut]),
                Err(ProxyHeaderError::Incomplete),
                "prefix of {cut} bytes of accepted input {input:?}"
            );
        }
    }
    out
}

/// The header is decoded exactly, each strict prefix is `Incomplete`, and
/// whatever follows the header is left alone.
fn check_round_trip(
    wire: &[u8],
    expected: ProxyHeader,
    trailer: &[u8],
) -> Result<(), TestCaseError> {
    prop_assert_eq!(
        ProxyHeader::decode(wire),
        Ok((Some(expected), wire.len())),
        "wire {:?}",
        String::from_utf8_lossy(wire)
    );
    for cut in 0..wire.len() {
        prop_assert_eq!(
            ProxyHeader::decode(&wire[..cut]),
            Err(ProxyHeaderError::Incomplete),
            "prefix of {} of {} bytes: {:?}",
            cut,
            wire.len(),
            String::from_utf8_lossy(&wire[..cut])
        );
    }
    let mut with_payload = wire.to_vec();
    with_payload.extend_from_slice(trailer);
    prop_assert_eq!(
        ProxyHeader::decode(&with_payload),
        Ok((Some(expected), wire.len())),
        "with {} bytes of payload after the header",
        trailer.len()
    );
    Ok(())
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn v1_round_trips_v4(src in v4_addr(), dst in v4_addr(), trailer in prop::collection::vec(any::<u8>(), 0..64)) {
        let h = ProxyHeader::new(Protocol::Tcp, src, dst);
        let wire = encode_v1(&h);
        prop_assert!(wire.starts_with(b"PROXY TCP4 "), "{:?}", String::from_utf8_lossy(&wire));
        prop_assert!(wire.ends_with(b"\r\n"));
        prop_assert!(wire.len() <= V1_MAX_LEN);
        check_round_trip(&wire, h, &trailer)?;
    }

    #[test]
    fn v1_round_trips_v6(src in v6_addr(), dst in v6_addr(), trailer in prop::collection::vec(any::<u8>(), 0..64)) {
        let h = ProxyHeader::new(Protocol::Tcp, src, dst);
        let wire = encode_v1(&h);
        prop_assert!(wire.starts_with(b"PROXY TCP6 "), "{:?}", String::from_utf8_lossy(&wire));
        prop_assert!(wire.len() <= V1_MAX_LEN);
        check_round_trip(&wire, h, &trailer)?;
    }

    #[test]
    fn v1_sends_mixed_families_as_v6(
        (src, dst) in prop_oneof![(v4_addr(), v6_addr()), (v6_addr(), v4_addr())],
        trailer in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let h = ProxyHeader::new(Protocol::Tcp, src, dst);
        let wire = encode_v1(&h);
        prop_assert!(wire.starts_with(b"PROXY TCP6 "), "{:?}", String::from_utf8_lossy(&wire));
        let (s, d) = as_sent(src, dst);
        check_round_trip(&wire, ProxyHeader::new(Protocol::Tcp, s, d), &trailer)?;
    }

    #[test]
    fn v1_refuses_udp(src in any_addr(), dst in any_addr()) {
        let mut buf = [0u8; V1_MAX_LEN];
        prop_assert_eq!(
            ProxyHeader::new(Protocol::Udp, src, dst).encode_v1(&mut buf),
            Err(ProxyHeaderError::V1NeedsTcp)
        );
    }

    #[test]
    fn v2_round_trips(
        proto in any_proto(),
        src in any_addr(),
        dst in any_addr(),
        trailer in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let h = ProxyHeader::new(proto, src, dst);
        let wire = encode_v2(&h);
        prop_assert_eq!(&wire[..12], &V2_SIGNATURE[..]);
        prop_assert_eq!(wire[12], 0x21, "version 2, PROXY command");
        let (s, d) = as_sent(src, dst);
        let family = if s.is_ipv4() { 0x10 } else { 0x20 };
        let transport = if proto == Protocol::Tcp { 0x01 } else { 0x02 };
        prop_assert_eq!(wire[13], family | transport);
        let body = u16::from_be_bytes([wire[14], wire[15]]) as usize;
        prop_assert_eq!(wire.len(), 16 + body);
        prop_assert_eq!(body, if s.is_ipv4() { 12 } else { 36 });
        check_round_trip(&wire, ProxyHeader::new(proto, s, d), &trailer)?;
    }

    /// Arbitrary bytes: never a panic, never more consumed than given.
    #[test]
    fn decode_survives_arbitrary_bytes(input in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = decode_checked(&input);
    }

    /// Arbitrary bytes behind each signature, so the fuzzing reaches past the
    /// first byte: the v1 text parser and the v2 length and family handling.
    #[test]
    fn decode_survives_arbitrary_bodies(
        v2 in any::<bool>(),
        head in prop::collection::vec(any::<u8>(), 0..8),
        body in prop::collection::vec(any::<u8>(), 0..300),
        text in "[A-Z0-9.:a-f \\r\\n+-]{0,120}",
    ) {
        let mut input = Vec::new();
        if v2 {
            input.extend_from_slice(&V2_SIGNATURE);
            input.extend_from_slice(&head);
            input.extend_from_slice(&body);
        } else {
            input.extend_from_slice(b"PROXY ");
            input.extend_from_slice(text.as_bytes());
            input.extend_from_slice(&body);
        }
        let _ = decode_checked(&input);
    }

    /// Valid headers with a few bytes changed, removed or inserted.
    #[test]
    fn decode_survives_mutated_headers(
        version2 in any::<bool>(),
        proto in any_proto(),
        src in any_addr(),
        dst in any_addr(),
        edits in prop::collection::vec((0u8..3, any::<usize>(), any::<u8>()), 1..6),
        trailer in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        let h = ProxyHeader::new(if version2 { proto } else { Protocol::Tcp }, src, dst);
        let mut wire = if version2 { encode_v2(&h) } else { encode_v1(&h) };
        for (kind, at, byte) in edits {
            match kind {
                0 if !wire.is_empty() => {
                    let i = at % wire.len();
                    wire[i] ^= byte | 1;
                }
                1 if !wire.is_empty() => {
                    wire.remove(at % wire.len());
                }
                _ => wire.insert(at % (wire.len() + 1), byte),
            }
        }
        wire.extend_from_slice(&trailer);
        let _ = decode_checked(&wire);
    }
}

/// The spec's v1 grammar, written independently of the decoder: a family,
/// two addresses of that family and two ports, single spaces between them;
/// a port is decimal, 0 to 65535, with no sign and no leading zero.
fn reference_v1(line: &str) -> Option<Option<(SocketAddr, SocketAddr)>> {
    let rest = line.strip_prefix("PROXY ")?;
    let mut parts = rest.split(' ');
    let fam = parts.next()?;
    if fam == "UNKNOWN" {
        return Some(None);
    }
    let fields: Vec<&str> = parts.collect();
    if fields.len() != 4 {
        return None;
    }
    let ip = |s: &str| -> Option<IpAddr> {
        match fam {
            "TCP4" => s.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
            "TCP6" => s.parse::<Ipv6Addr>().ok().map(IpAddr::V6),
            _ => None,
        }
    };
    let port = |s: &str| -> Option<u16> {
        let digits_only = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
        if !digits_only || (s.len() > 1 && s.starts_with('0')) {
            return None;
        }
        s.parse().ok()
    };
    Some(Some((
        SocketAddr::new(ip(fields[0])?, port(fields[2])?),
        SocketAddr::new(ip(fields[1])?, port(fields[3])?),
    )))
}

fn v1_addr_token() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => v4_addr().prop_map(|a| a.ip().to_string()),
        4 => v6_addr().prop_map(|a| a.ip().to_string()),
        1 => Just("1.2.3".to_owned()),
        1 => Just("01.2.3.4".to_owned()),
        1 => Just("256.1.1.1".to_owned()),
        1 => Just("::ffff:1.2.3.4".to_owned()),
    ]
}

fn v1_port_token() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => any::<u16>().prop_map(|p| p.to_string()),
        1 => Just("0".to_owned()),
        1 => Just("65535".to_owned()),
        1 => Just("65536".to_owned()),
        1 => Just("080".to_owned()),
        1 => Just("+80".to_owned()),
        1 => Just("+0".to_owned()),
        1 => Just("-1".to_owned()),
        1 => Just(String::new()),
        1 => Just("1_0".to_owned()),
    ]
}

fn v1_token() -> impl Strategy<Value = String> {
    prop_oneof![v1_addr_token(), v1_port_token()]
}

proptest! {
    #![proptest_config(config(2048))]

    /// v1 lines assembled from plausible and broken tokens: the decoder accepts
    /// exactly what the spec's grammar accepts, and decodes the same addresses.
    #[test]
    fn v1_decoding_follows_the_spec_grammar(
        fam in prop_oneof![Just("TCP4"), Just("TCP6"), Just("UNKNOWN"), Just("TCP5"), Just("tcp4")],
        tokens in prop::collection::vec(v1_token(), 3..6),
        addrs in (v1_addr_token(), v1_addr_token()),
        ports in (v1_port_token(), v1_port_token()),
        shape in 0u8..4,
    ) {
        // Mostly well-formed lines (two addresses, then two ports), sometimes
        // whatever the tokens make.
        let body = match shape {
            0 => tokens.join(" "),
            _ => format!("{} {} {} {}", addrs.0, addrs.1, ports.0, ports.1),
        };
        let line = format!("PROXY {fam} {body}");
        let mut wire = line.clone().into_bytes();
        wire.extend_from_slice(b"\r\nGET /");
        let got = decode_checked(&wire);
        if line.len() + 2 > V1_MAX_LEN {
            prop_assert!(got.is_err(), "{line:?} is longer than 107 bytes: {got:?}");
            return Ok(());
        }
        let want = reference_v1(&line);
        match (&got, want) {
            (Ok((None, n)), Some(None)) => prop_assert_eq!(*n, line.len() + 2),
            (Ok((Some(h), n)), Some(Some((src, dst)))) => {
                prop_assert_eq!(*n, line.len() + 2);
                prop_assert_eq!((h.proto, h.src, h.dst), (Protocol::Tcp, src, dst), "{:?}", line);
            }
            (Err(ProxyHeaderError::Malformed(_)), None) => {}
            _ => prop_assert!(false, "{:?}: decoder says {:?}, the spec says {:?}", line, got, want),
        }
    }
}

/// The spec's ports are plain decimal numbers: no sign, no leading zero, at
/// most 65535. (HAProxy and nginx parse digits only; a decoder that accepts
/// more disagrees with the receivers about what a valid header is.)
#[test]
fn v1_ports_are_plain_decimal_numbers() {
    for port in ["+80", "+0", "080", "00", "65536", "-1", "", " 80", "8_0"] {
        let line = format!("PROXY TCP4 127.0.4.7 127.0.0.1 {port} 8080\r\n");
        let got = ProxyHeader::decode(line.as_bytes());
        assert!(
            matches!(got, Err(ProxyHeaderError::Malformed(_))),
            "source port {port:?} in {line:?}: decoded as {got:?}, want Malformed"
        );
        let line = format!("PROXY TCP4 127.0.4.7 127.0.0.1 40000 {port}\r\n");
        let got = ProxyHeader::decode(line.as_bytes());
        assert!(
            matches!(got, Err(ProxyHeaderError::Malformed(_))),
            "destination port {port:?} in {line:?}: decoded as {got:?}, want Malformed"
        );
    }
    for (port, value) in [("0", 0u16), ("80", 80), ("65535", 65535)] {
        let line = format!("PROXY TCP4 127.0.4.7 127.0.0.1 {port} 8080\r\n");
        let (h, _) = ProxyHeader::decode(line.as_bytes()).unwrap();
        assert_eq!(h.unwrap().src.port(), value);
    }
}

/// A v2 header can announce up to 65535 bytes of addresses and TLVs; a
/// receiver must wait for all of them, and skip them, rather than misparse.
#[test]
fn v2_length_field_is_honoured_with_tlvs() {
    let h = ProxyHeader::new(
        Protocol::Tcp,
        "127.0.4.7:40000".parse().unwrap(),
        "127.0.0.1:8080".parse().unwrap(),
    );
    let mut wire = encode_v2(&h);
    // Append a 7-byte TLV (type 0x04 NOOP, length 4) and fix up the length.
    wire.extend_from_slice(&[0x04, 0x00, 0x04, 1, 2, 3, 4]);
    let len = (wire.len() - 16) as u16;
    wire[14..16].copy_from_slice(&len.to_be_bytes());
    assert_eq!(ProxyHeader::decode(&wire), Ok((Some(h), wire.len())));
    for cut in 0..wire.len() {
        assert_eq!(
            ProxyHeader::decode(&wire[..cut]),
            Err(ProxyHeaderError::Incomplete),
            "cut at {cut}"
        );
    }
    // The largest length the field can carry, with only the fixed part present.
    let mut huge = wire[..16].to_vec();
    huge[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
    assert_eq!(
        ProxyHeader::decode(&huge),
        Err(ProxyHeaderError::Incomplete)
    );
}

/// The v2 LOCAL command and v1 UNKNOWN carry no address: decoded as `None`,
/// with the whole header consumed.
#[test]
fn local_and_unknown_headers_decode_to_none() {
    let mut local = V2_SIGNATURE.to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    assert_eq!(ProxyHeader::decode(&local), Ok((None, 16)));
    let unknown = b"PROXY UNKNOWN\r\nGET / HTTP/1.1\r\n";
    assert_eq!(ProxyHeader::decode(unknown), Ok((None, 15)));
}

/// The longest v1 line (two full-length IPv6 addresses, five-digit ports) fits
/// the spec's 107 bytes.
#[test]
fn the_longest_v1_line_fits() {
    let ip = IpAddr::V6(Ipv6Addr::new(
        0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff,
    ));
    let h = ProxyHeader::new(
        Protocol::Tcp,
        SocketAddr::new(ip, 65535),
        SocketAddr::new(ip, 65535),
    );
    let wire = encode_v1(&h);
    assert_eq!(wire.len(), 104);
    assert_eq!(ProxyHeader::decode(&wire), Ok((Some(h), 104)));
}
