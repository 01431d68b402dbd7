//! A frontend's client allowlist: the source prefixes an NSG built from a
//! Service's `loadBalancerSourceRanges` (or the `azure-allowed-ip-ranges`
//! annotation) lets through (docs/research/cloud-provider-azure.md §3).
//!
//! [`SourceRanges`] is parsed once, when the config is loaded, and then only
//! read: the prefixes are normalised (host bits masked), turned into inclusive
//! address ranges per family, merged into sorted disjoint ranges, and a lookup
//! is one binary search over a boxed slice: O(log n), no allocation, no lock,
//! so the accept path and the UDP receive path may ask for every client.
//!
//! Parsing follows what the Kubernetes API server and cloud-provider-azure
//! accept for these fields, so a manifest the cluster takes is taken here:
//! - surrounding whitespace is trimmed (the API server allows space-padded
//!   values in this field, a leftover of the annotation it replaced);
//! - `10.0.0.1/8` is accepted and normalised to `10.0.0.0/8`: the API server
//!   validates the field with Go's `net.ParseCIDR` semantics, which mask host
//!   bits (KEP-4858 only adds a warning for such values in legacy fields), and
//!   cloud-provider-azure parses it with `netip.ParsePrefix`, which takes it too;
//! - a bare address is a single host (`/32`, `/128`); Kubernetes would refuse
//!   it, but in lb-proxy's own TOML it is the natural way to allow one client.
//!
//! Address families: an IPv4-mapped IPv6 client (`::ffff:a.b.c.d`, as a
//! dual-stack socket reports an IPv4 peer) is an IPv4 client and is matched
//! against the IPv4 prefixes; an IPv6 prefix written inside `::ffff:0:0/96`
//! (at least 96 bits long) is the IPv4 prefix it maps. Other IPv6 prefixes,
//! `::/0` included, match IPv6 clients only, as an NSG keeps the families apart.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One allowed prefix, normalised: host bits are zero, and an IPv4-mapped
/// IPv6 prefix is stored as the IPv4 prefix it maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourcePrefix {
    addr: IpAddr,
    len: u8,
}

impl SourcePrefix {
    /// The network address (host bits zero).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub fn len(&self) -> u8 {
        self.len
    }

    /// Whether the prefix has no bits fixed (`0.0.0.0/0`, `::/0`).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `ip` (canonicalised, see the module doc) lies inside the prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let (start, end) = v4_range(net, self.len);
                (start..=end).contains(&u32::from(ip))
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let (start, end) = v6_range(net, self.len);
                (start..=end).contains(&u128::from(ip))
            }
            _ => false,
        }
    }

    /// Parses one entry: `IP/LEN` or a bare `IP`, whitespace around it trimmed.
    pub fn parse(entry: &str) -> Result<SourcePrefix, SourceRangeProblem> {
        let entry = entry.trim();
        if entry.is_empty() {
            return Err(SourceRangeProblem::Empty);
        }
        let (ip_text, len_text) = match entry.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (entry, None),
        };
        let ip: IpAddr = ip_text
            .parse()
            .map_err(|_| SourceRangeProblem::NotAnAddress)?;
        let max = max_len(ip);
        let len = match len_text {
            None => max,
            Some(text) => parse_len(text, max)?,
        };
        Ok(SourcePrefix::normalised(ip, len))
    }

    /// Masks host bits and maps an IPv4-mapped IPv6 prefix to IPv4.
    fn normalised(ip: IpAddr, len: u8) -> SourcePrefix {
        match ip {
            IpAddr::V4(v4) => SourcePrefix {
                addr: IpAddr::V4(Ipv4Addr::from(v4_range(v4, len).0)),
                len,
            },
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) if len >= 96 => SourcePrefix::normalised(IpAddr::V4(v4), len - 96),
                _ => SourcePrefix {
                    addr: IpAddr::V6(Ipv6Addr::from(v6_range(v6, len).0)),
                    len,
                },
            },
        }
    }
}

impl fmt::Display for SourcePrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

fn max_len(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// The length after `/`: decimal digits only (no sign, no spaces), at most `max`.
fn parse_len(text: &str, max: u8) -> Result<u8, SourceRangeProblem> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SourceRangeProblem::LengthNotANumber);
    }
    match text.parse::<u8>() {
        Ok(len) if len <= max => Ok(len),
        // Too many digits for a u8 is out of range all the same.
        _ => Err(SourceRangeProblem::LengthOutOfRange { max }),
    }
}

/// The inclusive range of addresses a v4 prefix covers.
fn v4_range(net: Ipv4Addr, len: u8) -> (u32, u32) {
    let host_mask = u32::MAX.checked_shr(u32::from(len)).unwrap_or(0);
    let start = u32::from(net) & !host_mask;
    (start, start | host_mask)
}

/// The inclusive range of addresses a v6 prefix covers.
fn v6_range(net: Ipv6Addr, len: u8) -> (u128, u128) {
    let host_mask = u128::MAX.checked_shr(u32::from(len)).unwrap_or(0);
    let start = u128::from(net) & !host_mask;
    (start, start | host_mask)
}

/// Why one entry is not a prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SourceRangeProblem {
    #[error("is empty: expected IP/LEN, e.g. \"127.0.0.0/24\"")]
    Empty,
    #[error("is not an IPv4 or IPv6 address or IP/LEN prefix, e.g. \"127.0.0.0/24\"")]
    NotAnAddress,
    #[error("has a prefix length that is not a number")]
    LengthNotANumber,
    #[error("has a prefix length out of range: 0 to {max} for this address family")]
    LengthOutOfRange { max: u8 },
}

/// A bad entry of a source-range list: which one, as written, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("source range #{index} `{entry}` {problem}")]
pub struct SourceRangeError {
    /// Position in the list, from 0.
    pub index: usize,
    pub entry: String,
    pub problem: SourceRangeProblem,
}

/// An allowlist of client prefixes, ready for lookups (see the module doc).
///
/// An empty list allows no client; "every client allowed" is the absence of
/// a list (`Option<SourceRanges>::None` in a frontend's config).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceRanges {
    /// Normalised, duplicates removed, in the order first given: for
    /// `Display` and for naming the prefix that allowed a client.
    prefixes: Box<[SourcePrefix]>,
    /// Sorted, disjoint, non-adjacent inclusive ranges.
    v4: Box<[(u32, u32)]>,
    v6: Box<[(u128, u128)]>,
}

impl SourceRanges {
    /// Parses every entry; the first bad one is the error.
    pub fn parse<'a>(
        entries: impl IntoIterator<Item = &'a str>,
    ) -> Result<SourceRanges, SourceRangeError> {
        let mut prefixes = Vec::new();
        for (index, entry) in entries.into_iter().enumerate() {
            let prefix = SourcePrefix::parse(entry).map_err(|problem| SourceRangeError {
                index,
                entry: entry.to_owned(),
                problem,
            })?;
            prefixes.push(prefix);
        }
        Ok(SourceRanges::from_prefixes(prefixes))
    }

    /// Builds the lookup ranges from already normalised prefixes.
    pub fn from_prefixes(prefixes: impl IntoIterator<Item = SourcePrefix>) -> SourceRanges {
        let mut kept: Vec<SourcePrefix> = Vec::new();
        for p in prefixes {
            if !kept.contains(&p) {
                kept.push(p);
            }
        }
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for p in &kept {
            match p.addr {
                IpAddr::V4(net) => v4.push(v4_range(net, p.len)),
                IpAddr::V6(net) => v6.push(v6_range(net, p.len)),
            }
        }
        SourceRanges {
            prefixes: kept.into_boxed_slice(),
            v4: merge(v4).into_boxed_slice(),
            v6: merge(v6).into_boxed_slice(),
        }
    }

    /// Whether a client at `ip` is allowed: one binary search, no allocation.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(v4) => in_ranges(&self.v4, u32::from(v4)),
            IpAddr::V6(v6) => in_ranges(&self.v6, u128::from(v6)),
        }
    }

    /// The most specific listed prefix that contains `ip`, for `/explain`
    /// (a linear scan: this is for people, not for the data plane).
    pub fn matching(&self, ip: IpAddr) -> Option<SourcePrefix> {
        self.prefixes
            .iter()
            .filter(|p| p.contains(ip))
            .max_by_key(|p| p.len)
            .copied()
    }

    /// No prefix at all: every client is refused.
    pub fn is_empty(&self) -> bool {
        self.prefixes.is_empty()
    }

    /// The normalised prefixes, duplicates removed, in the order given.
    pub fn prefixes(&self) -> &[SourcePrefix] {
        &self.prefixes
    }
}

impl fmt::Display for SourceRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.prefixes.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// Sorts inclusive ranges and merges the overlapping and adjacent ones.
fn merge<T: Copy + Ord + Successor>(mut ranges: Vec<(T, T)>) -> Vec<(T, T)> {
    ranges.sort_unstable();
    let mut merged: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if last.1.successor().is_none_or(|next| start <= next) => {
                last.1 = last.1.max(end);
            }
            _ => merged.push((start, end)),
        }
    }
    merged
}

/// Whether `x` lies in one of the sorted disjoint inclusive `ranges`.
fn in_ranges<T: Copy + Ord>(ranges: &[(T, T)], x: T) -> bool {
    // The ranges that start at or before x form a prefix of the slice; only
    // the last of them can contain x.
    let after = ranges.partition_point(|&(start, _)| start <= x);
    after > 0 && ranges[after - 1].1 >= x
}

/// The next address, `None` past the last one (so merging never overflows).
trait Successor: Sized {
    fn successor(self) -> Option<Self>;
}

impl Successor for u32 {
    fn successor(self) -> Option<u32> {
        self.checked_add(1)
    }
}

impl Successor for u128 {
    fn successor(self) -> Option<u128> {
        self.checked_add(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(entries: &[&str]) -> SourceRanges {
        SourceRanges::parse(entries.iter().copied()).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn host_bits_are_masked_and_bare_addresses_are_single_hosts() {
        let r = ranges(&[" 10.0.0.1/8 ", "127.0.0.5", "2001:db8::1/32", "::1"]);
        assert_eq!(
            r.to_string(),
            "10.0.0.0/8, 127.0.0.5/32, 2001:db8::/32, ::1/128"
        );
        assert!(r.contains(ip("10.255.255.255")));
        assert!(!r.contains(ip("11.0.0.0")));
        assert!(r.contains(ip("127.0.0.5")));
        assert!(!r.contains(ip("127.0.0.6")));
        assert!(r.contains(ip("2001:db8:ffff::9")));
        assert!(r.contains(ip("::1")));
        assert!(!r.contains(ip("::2")));
    }

    #[test]
    fn ipv4_mapped_clients_match_ipv4_prefixes_and_mapped_prefixes_are_ipv4() {
        let r = ranges(&["127.0.1.0/24", "::ffff:192.168.0.0/112"]);
        assert_eq!(r.to_string(), "127.0.1.0/24, 192.168.0.0/16");
        assert!(r.contains(ip("::ffff:127.0.1.9")));
        assert!(!r.contains(ip("::ffff:127.0.2.9")));
        assert!(r.contains(ip("192.168.3.4")));
        // ::/0 is IPv6 only: an IPv4 client (mapped or not) is not in it.
        let v6_all = ranges(&["::/0"]);
        assert!(!v6_all.contains(ip("::ffff:1.2.3.4")));
        assert!(!v6_all.contains(ip("1.2.3.4")));
        assert!(v6_all.contains(ip("2001:db8::1")));
    }

    #[test]
    fn the_ends_of_the_address_space_merge_without_overflow() {
        let r = ranges(&[
            "255.255.255.255",
            "255.255.255.254/31",
            "0.0.0.0/1",
            "128.0.0.0/1",
        ]);
        assert_eq!(&*r.v4, &[(0, u32::MAX)], "adjacent halves merge into one");
        assert!(r.contains(ip("255.255.255.255")));
        let r = ranges(&["ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "::/0"]);
        assert_eq!(&*r.v6, &[(0, u128::MAX)]);
    }

    #[test]
    fn the_most_specific_prefix_is_named() {
        let r = ranges(&["127.0.0.0/8", "127.0.1.0/24", "127.0.1.0/24"]);
        assert_eq!(r.prefixes().len(), 2, "duplicates are dropped");
        assert_eq!(
            r.matching(ip("127.0.1.1")).unwrap().to_string(),
            "127.0.1.0/24"
        );
        assert_eq!(
            r.matching(ip("127.0.2.1")).unwrap().to_string(),
            "127.0.0.0/8"
        );
        assert_eq!(r.matching(ip("10.0.0.1")), None);
    }

    #[test]
    fn an_empty_list_allows_nobody() {
        let r = ranges(&[]);
        assert!(r.is_empty());
        assert!(!r.contains(ip("127.0.0.1")));
        assert_eq!(r.to_string(), "");
    }

    #[test]
    fn bad_entries_name_themselves_and_why() {
        let cases = [
            (
                "10.0.0.0/33",
                SourceRangeProblem::LengthOutOfRange { max: 32 },
            ),
            ("::/129", SourceRangeProblem::LengthOutOfRange { max: 128 }),
            (
                "10.0.0.0/999999",
                SourceRangeProblem::LengthOutOfRange { max: 32 },
            ),
            ("10.0.0.0/", SourceRangeProblem::LengthNotANumber),
            ("10.0.0.0/+8", SourceRangeProblem::LengthNotANumber),
            ("10.0.0.0/ 8", SourceRangeProblem::LengthNotANumber),
            ("10.0.0/8", SourceRangeProblem::NotAnAddress),
            ("example.com/8", SourceRangeProblem::NotAnAddress),
            ("10.0.0.0/8/8", SourceRangeProblem::LengthNotANumber),
            ("  ", SourceRangeProblem::Empty),
        ];
        for (entry, problem) in cases {
            let e = SourceRanges::parse(["127.0.0.0/8", entry]).unwrap_err();
            assert_eq!((e.index, e.entry.as_str(), e.problem), (1, entry, problem));
            assert!(
                e.to_string()
                    .starts_with(&format!("source range #1 `{entry}` ")),
                "{e}"
            );
        }
    }
}
