//! The pinned flow hash.
//!
//! Several balancer instances behind ECMP only agree on where a flow goes if
//! they compute the same hash for it, on every platform, in every build and
//! after every restart. So the hash is a fixed, published algorithm over a
//! fixed byte encoding, pinned by golden vectors in the tests:
//!
//! ```text
//! encoding (37 bytes) = src_ip[16] ‖ dst_ip[16] ‖ src_port[2, BE] ‖ dst_port[2, BE] ‖ proto[1]
//! hash                = XXH64(encoding, seed)
//! ```
//!
//! IPv4 addresses are written as IPv4-mapped IPv6 (`::ffff:a.b.c.d`). Fields a
//! [`DistributionMode`] does not hash are written as zero. ahash and std's
//! SipHash are deliberately not used here: their output is not stable across
//! versions or platforms.

use std::net::IpAddr;

use xxhash_rust::xxh64::xxh64;

use crate::flow::{DistributionMode, FlowKey};

/// The default seed. Instances that must agree have to share it; change it only
/// to partition a fleet deliberately.
pub const FLOW_HASH_SEED: u64 = 0x4c42_2d46_4c4f_5731; // "LB-FLOW1"

/// Length of the canonical flow encoding.
pub const ENCODED_LEN: usize = 37;

fn ip_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Writes the canonical encoding of `key` as `mode` sees it.
pub fn encode(key: &FlowKey, mode: DistributionMode) -> [u8; ENCODED_LEN] {
    let fields = mode.hashed_fields();
    let mut out = [0u8; ENCODED_LEN];
    if fields.src_ip {
        out[0..16].copy_from_slice(&ip_bytes(key.src.ip()));
    }
    if fields.dst_ip {
        out[16..32].copy_from_slice(&ip_bytes(key.dst.ip()));
    }
    if fields.src_port {
        out[32..34].copy_from_slice(&key.src.port().to_be_bytes());
    }
    if fields.dst_port {
        out[34..36].copy_from_slice(&key.dst.port().to_be_bytes());
    }
    if fields.proto {
        out[36] = key.proto.number();
    }
    out
}

/// The pinned 64-bit hash of a flow under a mode and seed.
#[inline]
pub fn flow_hash(key: &FlowKey, mode: DistributionMode, seed: u64) -> u64 {
    xxh64(&encode(key, mode), seed)
}

/// A mode and seed bound together, as a frontend uses them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowHasher {
    pub mode: DistributionMode,
    pub seed: u64,
}

impl FlowHasher {
    pub const fn new(mode: DistributionMode, seed: u64) -> Self {
        FlowHasher { mode, seed }
    }

    #[inline]
    pub fn hash(&self, key: &FlowKey) -> u64 {
        flow_hash(key, self.mode, self.seed)
    }
}

impl Default for FlowHasher {
    fn default() -> Self {
        FlowHasher::new(DistributionMode::FiveTuple, FLOW_HASH_SEED)
    }
}

/// Stable 64-bit hash of a backend name, used for Maglev permutations.
pub fn name_hash(name: &str, seed: u64) -> u64 {
    xxh64(name.as_bytes(), seed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn unhashed_fields_do_not_change_the_hash() {
        let a = FlowKey::tcp(sa("10.0.0.1:1000"), sa("20.0.0.1:80"));
        let b = FlowKey::tcp(sa("10.0.0.1:2000"), sa("20.0.0.1:81"));
        let c = FlowKey::udp(sa("10.0.0.1:3000"), sa("20.0.0.1:80"));
        let s = FLOW_HASH_SEED;
        assert_ne!(
            flow_hash(&a, DistributionMode::FiveTuple, s),
            flow_hash(&b, DistributionMode::FiveTuple, s)
        );
        assert_eq!(
            flow_hash(&a, DistributionMode::SourceIpProtocol, s),
            flow_hash(&b, DistributionMode::SourceIpProtocol, s)
        );
        assert_ne!(
            flow_hash(&a, DistributionMode::SourceIpProtocol, s),
            flow_hash(&c, DistributionMode::SourceIpProtocol, s)
        );
        assert_eq!(
            flow_hash(&a, DistributionMode::SourceIp, s),
            flow_hash(&c, DistributionMode::SourceIp, s)
        );
    }

    #[test]
    fn ipv4_is_hashed_as_its_mapped_ipv6_form() {
        let v4 = FlowKey::tcp(sa("10.0.0.1:1000"), sa("20.0.0.1:80"));
        let mapped = FlowKey::tcp(sa("[::ffff:10.0.0.1]:1000"), sa("[::ffff:20.0.0.1]:80"));
        for mode in DistributionMode::ALL {
            assert_eq!(flow_hash(&v4, mode, 7), flow_hash(&mapped, mode, 7));
        }
    }
}
