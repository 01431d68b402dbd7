//! The pinned flow hash.
//!
//! Several balancer instances behind ECMP only agree on where a flow goes if
//! they compute the same hash for it, on every platform, in every build and
//! after every restart. So the hash is a fixed, published function over a
//! fixed encoding, pinned by golden vectors in the tests ("lb-flowhash v1"):
//!
//! ```text
//! encoding (37 bytes) = src_ip[16] ‖ dst_ip[16] ‖ src_port[2, BE] ‖ dst_port[2, BE] ‖ proto[1]
//! words               = the encoding read as big-endian u64s:
//!                       s_hi = enc[0..8], s_lo = enc[8..16], d_hi = enc[16..24], d_lo = enc[24..32],
//!                       pp   = enc[32..37] ‖ 0x000000
//! mum(a, b)           = lo64(a × b) XOR hi64(a × b)          (full 64 × 64 → 128-bit product)
//! h1 = mum(s_hi ^ seed ^ P0, s_lo ^ P1)
//! h2 = mum(d_hi ^ P2, d_lo ^ seed ^ P3)
//! h3 = mum(pp ^ P4, seed ^ P0)
//! hash = h1 ^ h2 ^ h3
//! P0..P4 = a0761d6478bd642f e7037ed1a0b428db 8ebc6af09c88c6e3 589965cc75374cc3 1d8e4e27c47d124f
//! ```
//!
//! IPv4 addresses are written as IPv4-mapped IPv6 (`::ffff:a.b.c.d`). Fields a
//! [`DistributionMode`] does not hash are written as zero. The multiply-fold
//! mixing is wyhash's; three independent multiplications keep a lookup (hash
//! plus table index) within about ten nanoseconds. ahash and std's
//! SipHash are deliberately not used: their output is not stable across
//! versions or platforms. Backend names are hashed with XXH64 ([`name_hash`]),
//! which is off the hot path.

use std::net::{IpAddr, SocketAddr};

use xxhash_rust::xxh64::xxh64;

use crate::flow::{DistributionMode, FlowKey};

/// The default seed. Instances that must agree have to share it; change it only
/// to partition a fleet deliberately.
pub const FLOW_HASH_SEED: u64 = 0x4c42_2d46_4c4f_5731; // "LB-FLOW1"

/// The version of everything that turns a config and a flow into a backend:
/// the flow hash defined here ("lb-flowhash v1"), the backend-name hash
/// ([`name_hash`]) and the Maglev fill ([`crate::maglev`]). Instances agree on
/// where a flow goes only if they share it, so the config fingerprint
/// ([`crate::fingerprint`]) includes it and `/backends` shows it as
/// `hash_version`. Bump it with any change to the encoding, the mixing, the
/// name hash or the fill; golden vectors here and in `maglev`'s tests fail
/// until it is.
pub const FLOW_HASH_VERSION: u32 = 1;

/// Length of the canonical flow encoding.
pub const ENCODED_LEN: usize = 37;

fn ip_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Writes the canonical encoding of `key` as `mode` sees it (what the hash is defined over).
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

const P0: u64 = 0xa076_1d64_78bd_642f;
const P1: u64 = 0xe703_7ed1_a0b4_28db;
const P2: u64 = 0x8ebc_6af0_9c88_c6e3;
const P3: u64 = 0x5899_65cc_7537_4cc3;
const P4: u64 = 0x1d8e_4e27_c47d_124f;

#[inline(always)]
fn mum(a: u64, b: u64) -> u64 {
    let r = u128::from(a) * u128::from(b);
    (r as u64) ^ ((r >> 64) as u64)
}

#[inline(always)]
fn addr_words(addr: &SocketAddr) -> (u64, u64) {
    match addr {
        // ::ffff:a.b.c.d: the high word is zero, the low word is 0xffff ‖ a.b.c.d.
        SocketAddr::V4(a) => (0, 0x0000_ffff_0000_0000 | u64::from(a.ip().to_bits())),
        SocketAddr::V6(a) => {
            let bits = a.ip().to_bits();
            ((bits >> 64) as u64, bits as u64)
        }
    }
}

/// Per mode, which of the five words survive, and which bits of `pp` (ports, protocol).
const fn masks(mode: DistributionMode) -> (u64, u64) {
    let f = mode.hashed_fields();
    let ip = if f.src_ip && f.dst_ip { u64::MAX } else { 0 };
    let mut pp = 0u64;
    if f.src_port {
        pp |= 0xffff << 48;
    }
    if f.dst_port {
        pp |= 0xffff << 32;
    }
    if f.proto {
        pp |= 0xff << 24;
    }
    (ip, pp)
}

const MODE_MASKS: [(u64, u64); 3] = [
    masks(DistributionMode::FiveTuple),
    masks(DistributionMode::SourceIpProtocol),
    masks(DistributionMode::SourceIp),
];

/// The pinned 64-bit hash of a flow under a mode and seed ("lb-flowhash v1").
#[inline]
pub fn flow_hash(key: &FlowKey, mode: DistributionMode, seed: u64) -> u64 {
    // Branch-free: build every word, then mask off what the mode does not hash.
    let (ip_mask, pp_mask) = MODE_MASKS[mode as usize];
    let (s_hi, s_lo) = addr_words(&key.src);
    let (d_hi, d_lo) = addr_words(&key.dst);
    let pp = (u64::from(key.src.port()) << 48)
        | (u64::from(key.dst.port()) << 32)
        | (u64::from(key.proto.number()) << 24);
    hash_words(
        [
            s_hi & ip_mask,
            s_lo & ip_mask,
            d_hi & ip_mask,
            d_lo & ip_mask,
            pp & pp_mask,
        ],
        seed,
    )
}

/// The mixing step over the five encoding words, exposed so tests can check
/// [`flow_hash`] against a hash of [`encode`]'s bytes.
#[inline(always)]
pub fn hash_words(words: [u64; 5], seed: u64) -> u64 {
    let [s_hi, s_lo, d_hi, d_lo, pp] = words;
    let h1 = mum(s_hi ^ seed ^ P0, s_lo ^ P1);
    let h2 = mum(d_hi ^ P2, d_lo ^ seed ^ P3);
    let h3 = mum(pp ^ P4, seed ^ P0);
    h1 ^ h2 ^ h3
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

    fn words_of(enc: &[u8; ENCODED_LEN]) -> [u64; 5] {
        let be = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap());
        let mut tail = [0u8; 8];
        tail[..5].copy_from_slice(&enc[32..37]);
        [
            be(&enc[0..8]),
            be(&enc[8..16]),
            be(&enc[16..24]),
            be(&enc[24..32]),
            u64::from_be_bytes(tail),
        ]
    }

    #[test]
    fn the_fast_path_hashes_exactly_the_documented_encoding() {
        let keys = [
            FlowKey::tcp(sa("10.0.0.1:1000"), sa("20.0.0.1:80")),
            FlowKey::udp(sa("[2001:db8::7]:53"), sa("[::1]:5353")),
            FlowKey::tcp(sa("10.0.0.1:65535"), sa("[2001:db8::1]:1")),
        ];
        for key in keys {
            for mode in DistributionMode::ALL {
                for seed in [0, FLOW_HASH_SEED, u64::MAX] {
                    assert_eq!(
                        flow_hash(&key, mode, seed),
                        hash_words(words_of(&encode(&key, mode)), seed)
                    );
                }
            }
        }
    }

    #[test]
    fn sequential_source_ports_spread_evenly_over_slots() {
        // hey without keep-alive: one client IP, consecutive ephemeral ports.
        let mut thirds = [0u32; 3];
        for port in 20_000..80_000u32 {
            let key = FlowKey::tcp(
                sa(&format!("127.0.0.1:{}", port % 65_536)),
                sa("127.0.0.1:8080"),
            );
            let h = flow_hash(&key, DistributionMode::FiveTuple, FLOW_HASH_SEED);
            thirds[((u128::from(h) * 3) >> 64) as usize] += 1;
        }
        for t in thirds {
            assert!((19_400..20_600).contains(&t), "{thirds:?}");
        }
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
