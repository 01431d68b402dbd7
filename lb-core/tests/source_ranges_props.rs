//! Property tests of `SourceRanges` against a naive model: a list of
//! prefixes checked one by one, bit by bit, all in one 128-bit space where
//! an IPv4 address is its IPv4-mapped IPv6 address. The sorted, merged,
//! binary-searched lookup must say what the model says for every client,
//! including the addresses just inside and just outside each prefix, and
//! IPv4 clients asked in their mapped form; `matching` must name a listed
//! prefix of the model's longest matching length; the text form must parse
//! back to the same list.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_core::{SourcePrefix, SourceRanges};
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

/// `::ffff:0:0/96`, where IPv4 lives in the model's space.
const MAPPED_BASE: u128 = 0xffff_0000_0000;

/// A prefix as written: an address (host bits possibly set) and a length.
#[derive(Clone, Debug)]
struct Written {
    ip: IpAddr,
    len: u8,
}

impl Written {
    fn text(&self) -> String {
        format!("{}/{}", self.ip, self.len)
    }

    /// The model's view: network bits in the 128-bit space, and its length there.
    fn model(&self) -> (u128, u32) {
        match self.ip {
            IpAddr::V4(v4) => (
                MAPPED_BASE | u128::from(u32::from(v4)),
                96 + u32::from(self.len),
            ),
            IpAddr::V6(v6) => (u128::from(v6), u32::from(self.len)),
        }
    }

    /// Whether the model's prefix lies in the IPv4 part of the space.
    fn is_v4_space(&self) -> bool {
        let (net, len) = self.model();
        len >= 96 && net >> 32 == MAPPED_BASE >> 32
    }

    /// Bit by bit: the first `len` bits of `a` and the network agree.
    fn covers(&self, q: u128) -> bool {
        let (net, len) = self.model();
        (0..len).all(|bit| (net >> (127 - bit)) & 1 == (q >> (127 - bit)) & 1)
    }
}

/// A client in the model's space, and whether it is an IPv4 client.
fn model_client(ip: IpAddr) -> (u128, bool) {
    match ip {
        IpAddr::V4(v4) => (MAPPED_BASE | u128::from(u32::from(v4)), true),
        IpAddr::V6(v6) => {
            let q = u128::from(v6);
            (q, q >> 32 == MAPPED_BASE >> 32)
        }
    }
}

/// The model's answer: the longest listed prefix of the client's family
/// that covers it, as a length in the model's space.
fn model_longest(list: &[Written], ip: IpAddr) -> Option<u32> {
    let (q, v4) = model_client(ip);
    list.iter()
        .filter(|p| p.is_v4_space() == v4 && p.covers(q))
        .map(|p| p.model().1)
        .max()
}

/// IPv4 addresses clustered in 10.0.0.0/22 (so prefixes overlap, nest and
/// touch), plus anywhere at all, including the ends of the space.
fn v4() -> impl Strategy<Value = Ipv4Addr> {
    prop_oneof![
        4 => (0u32..1024).prop_map(|low| Ipv4Addr::from(0x0a00_0000 | low)),
        1 => any::<u32>().prop_map(Ipv4Addr::from),
        1 => prop_oneof![Just(Ipv4Addr::UNSPECIFIED), Just(Ipv4Addr::BROADCAST)],
    ]
}

/// IPv6 addresses clustered in 2001:db8::/118, anywhere, or IPv4-mapped.
fn v6() -> impl Strategy<Value = Ipv6Addr> {
    prop_oneof![
        3 => (0u128..1024).prop_map(|low| Ipv6Addr::from((0x2001_0db8u128 << 96) | low)),
        1 => any::<u128>().prop_map(Ipv6Addr::from),
        2 => v4().prop_map(|a| a.to_ipv6_mapped()),
        1 => prop_oneof![Just(Ipv6Addr::UNSPECIFIED), Just(Ipv6Addr::from(u128::MAX))],
    ]
}

fn written() -> impl Strategy<Value = Written> {
    prop_oneof![
        (v4(), prop_oneof![3 => 20u8..=32, 1 => 0u8..=32]).prop_map(|(a, len)| Written {
            ip: IpAddr::V4(a),
            len
        }),
        (v6(), prop_oneof![2 => 100u8..=128, 1 => 0u8..=128]).prop_map(|(a, len)| Written {
            ip: IpAddr::V6(a),
            len
        }),
    ]
}

fn client() -> impl Strategy<Value = IpAddr> {
    prop_oneof![v4().prop_map(IpAddr::V4), v6().prop_map(IpAddr::V6)]
}

/// Every prefix's first and last address and their outside neighbours, in
/// the prefix's own family, and for IPv4 ones the mapped form too.
fn edges(list: &[Written]) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for p in list {
        match p.ip {
            IpAddr::V4(a) => {
                let host = u32::MAX.checked_shr(u32::from(p.len)).unwrap_or(0);
                let start = u32::from(a) & !host;
                let end = start | host;
                for x in [start.wrapping_sub(1), start, end, end.wrapping_add(1)] {
                    out.push(IpAddr::V4(Ipv4Addr::from(x)));
                    out.push(IpAddr::V6(Ipv4Addr::from(x).to_ipv6_mapped()));
                }
            }
            IpAddr::V6(a) => {
                let host = u128::MAX.checked_shr(u32::from(p.len)).unwrap_or(0);
                let start = u128::from(a) & !host;
                let end = start | host;
                for x in [start.wrapping_sub(1), start, end, end.wrapping_add(1)] {
                    out.push(IpAddr::V6(Ipv6Addr::from(x)));
                }
            }
        }
    }
    out
}

fn parse(list: &[Written]) -> SourceRanges {
    let texts: Vec<String> = list.iter().map(Written::text).collect();
    SourceRanges::parse(texts.iter().map(String::as_str)).expect("valid prefixes")
}

/// The model's length of the prefix `matching` named.
fn model_len(p: SourcePrefix) -> u32 {
    match p.addr() {
        IpAddr::V4(_) => 96 + u32::from(p.len()),
        IpAddr::V6(_) => u32::from(p.len()),
    }
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn contains_and_matching_agree_with_the_model(
        list in prop::collection::vec(written(), 0..12),
        random in prop::collection::vec(client(), 0..16),
    ) {
        let ranges = parse(&list);
        for ip in edges(&list).into_iter().chain(random) {
            let want = model_longest(&list, ip);
            prop_assert_eq!(ranges.contains(ip), want.is_some(), "{} in [{}]", ip, ranges);
            let named = ranges.matching(ip);
            prop_assert_eq!(named.map(model_len), want, "{} in [{}]", ip, ranges);
            if let Some(p) = named {
                prop_assert!(p.contains(ip));
                prop_assert!(ranges.prefixes().contains(&p));
            }
        }
    }

    #[test]
    fn the_text_form_parses_back_to_the_same_list(list in prop::collection::vec(written(), 1..12)) {
        let ranges = parse(&list);
        let text = ranges.to_string();
        let again = SourceRanges::parse(text.split(", ")).expect("its own text parses");
        prop_assert_eq!(&again, &ranges);
        for p in ranges.prefixes() {
            let host_bits_clear = SourcePrefix::parse(&p.to_string()).expect("parses");
            prop_assert_eq!(host_bits_clear, *p, "normalised already");
        }
    }

    #[test]
    fn parsing_never_panics_on_arbitrary_text(entry in "\\PC{0,48}") {
        let _ = SourceRanges::parse([entry.as_str()]);
    }
}
