//! Golden vectors pinning the flow hash, the slot reduction and Maglev tables.
//!
//! Several balancer instances behind one ECMP route only agree on where a flow
//! goes if they compute the same hash, the same slot and the same table. These
//! vectors pin all three. CHANGING ANY OF THE VALUES BELOW BREAKS ECMP
//! AGREEMENT BETWEEN INSTANCES RUNNING DIFFERENT VERSIONS: a rolling upgrade
//! would send a flow's packets to different backends depending on which
//! instance the router picked. Only change them together with a deliberate,
//! documented fleet-wide migration (for example a new `FLOW_HASH_SEED`).
//!
//! The hash is also cross-checked against an independent XXH64 written here
//! straight from the xxHash specification, and the 37-byte encoding is rebuilt
//! here from the layout documented in `hash.rs`, so the vectors do not merely
//! restate whatever the crate computes.

use std::net::{IpAddr, SocketAddr};

use lb_core::hash::{encode, name_hash, ENCODED_LEN};
use lb_core::{
    flow_hash, BackendSet, BackendSpec, DistributionMode, FlowHasher, FlowKey, MaglevTable,
    Protocol, Snapshot, SnapshotParams, DEFAULT_TABLE_SIZE, FLOW_HASH_SEED,
};

// ---------------------------------------------------------------------------
// Independent XXH64 (https://github.com/Cyan4973/xxHash/blob/dev/doc/xxhash_spec.md)
// ---------------------------------------------------------------------------

const PRIME64_1: u64 = 11_400_714_785_074_694_791;
const PRIME64_2: u64 = 14_029_467_366_897_019_727;
const PRIME64_3: u64 = 1_609_587_929_392_839_161;
const PRIME64_4: u64 = 9_650_029_242_287_828_579;
const PRIME64_5: u64 = 2_870_177_450_012_600_261;

fn read_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap())
}

fn read_u32(b: &[u8]) -> u64 {
    u32::from_le_bytes(b[..4].try_into().unwrap()) as u64
}

fn xxh64_round(acc: u64, lane: u64) -> u64 {
    acc.wrapping_add(lane.wrapping_mul(PRIME64_2))
        .rotate_left(31)
        .wrapping_mul(PRIME64_1)
}

fn xxh64_merge(acc: u64, val: u64) -> u64 {
    (acc ^ xxh64_round(0, val))
        .wrapping_mul(PRIME64_1)
        .wrapping_add(PRIME64_4)
}

fn reference_xxh64(input: &[u8], seed: u64) -> u64 {
    let len = input.len();
    let mut rest = input;
    let mut acc = if len >= 32 {
        let mut v1 = seed.wrapping_add(PRIME64_1).wrapping_add(PRIME64_2);
        let mut v2 = seed.wrapping_add(PRIME64_2);
        let mut v3 = seed;
        let mut v4 = seed.wrapping_sub(PRIME64_1);
        while rest.len() >= 32 {
            v1 = xxh64_round(v1, read_u64(&rest[0..]));
            v2 = xxh64_round(v2, read_u64(&rest[8..]));
            v3 = xxh64_round(v3, read_u64(&rest[16..]));
            v4 = xxh64_round(v4, read_u64(&rest[24..]));
            rest = &rest[32..];
        }
        let mut acc = v1
            .rotate_left(1)
            .wrapping_add(v2.rotate_left(7))
            .wrapping_add(v3.rotate_left(12))
            .wrapping_add(v4.rotate_left(18));
        for v in [v1, v2, v3, v4] {
            acc = xxh64_merge(acc, v);
        }
        acc
    } else {
        seed.wrapping_add(PRIME64_5)
    };
    acc = acc.wrapping_add(len as u64);
    while rest.len() >= 8 {
        acc ^= xxh64_round(0, read_u64(rest));
        acc = acc
            .rotate_left(27)
            .wrapping_mul(PRIME64_1)
            .wrapping_add(PRIME64_4);
        rest = &rest[8..];
    }
    if rest.len() >= 4 {
        acc ^= read_u32(rest).wrapping_mul(PRIME64_1);
        acc = acc
            .rotate_left(23)
            .wrapping_mul(PRIME64_2)
            .wrapping_add(PRIME64_3);
        rest = &rest[4..];
    }
    for &byte in rest {
        acc ^= (byte as u64).wrapping_mul(PRIME64_5);
        acc = acc.rotate_left(11).wrapping_mul(PRIME64_1);
    }
    acc ^= acc >> 33;
    acc = acc.wrapping_mul(PRIME64_2);
    acc ^= acc >> 29;
    acc = acc.wrapping_mul(PRIME64_3);
    acc ^= acc >> 32;
    acc
}

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// The golden flows: IPv4 and IPv6, TCP and UDP, including extreme ports.
fn golden_keys() -> [FlowKey; 6] {
    [
        FlowKey::tcp(sa("10.1.2.3:51234"), sa("192.0.2.10:443")),
        FlowKey::udp(sa("10.1.2.3:51234"), sa("192.0.2.10:443")),
        FlowKey::tcp(sa("203.0.113.255:65535"), sa("198.51.100.1:1")),
        FlowKey::tcp(sa("[2001:db8::1]:40000"), sa("[2001:db8:ffff::53]:8443")),
        FlowKey::udp(sa("[2001:db8::1]:40000"), sa("[2001:db8:ffff::53]:53")),
        FlowKey::udp(sa("[fe80::1:2:3:4]:0"), sa("[::1]:65535")),
    ]
}

/// The encoding rebuilt from the layout documented in hash.rs, independently of `encode`.
fn documented_encoding(key: &FlowKey, mode: DistributionMode) -> [u8; 37] {
    fn ip16(ip: IpAddr) -> [u8; 16] {
        match ip {
            IpAddr::V4(v4) => {
                let o = v4.octets();
                let mut b = [0u8; 16];
                b[10] = 0xff;
                b[11] = 0xff;
                b[12..].copy_from_slice(&o);
                b
            }
            IpAddr::V6(v6) => v6.octets(),
        }
    }
    let (src_port, proto) = match mode {
        DistributionMode::FiveTuple => (true, true),
        DistributionMode::SourceIpProtocol => (false, true),
        DistributionMode::SourceIp => (false, false),
    };
    let mut b = [0u8; 37];
    b[0..16].copy_from_slice(&ip16(key.src.ip()));
    b[16..32].copy_from_slice(&ip16(key.dst.ip()));
    if src_port {
        b[32] = (key.src.port() >> 8) as u8;
        b[33] = key.src.port() as u8;
        b[34] = (key.dst.port() >> 8) as u8;
        b[35] = key.dst.port() as u8;
    }
    if proto {
        b[36] = match key.proto {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        };
    }
    b
}

fn three_backends(weights: [u32; 3]) -> BackendSet {
    BackendSet::new(
        (0..3)
            .map(|i| {
                BackendSpec::new(
                    format!("backend-{i:04}"),
                    SocketAddr::from(([10, 0, 0, i as u8 + 1], 8080)),
                    weights[i],
                )
            })
            .collect(),
    )
    .unwrap()
}

fn table_over(size: u32, set: &BackendSet) -> MaglevTable {
    MaglevTable::build(size, set.iter().map(|b| (b.name.as_str(), b.weight))).unwrap()
}

/// Fingerprint of a whole table: XXH64 (reference implementation) over its
/// slots as little-endian u32, seed 0.
fn table_fingerprint(t: &MaglevTable) -> u64 {
    let bytes: Vec<u8> = t.slots().iter().flat_map(|s| s.to_le_bytes()).collect();
    reference_xxh64(&bytes, 0)
}

const MODES: [DistributionMode; 3] = DistributionMode::ALL;

// ---------------------------------------------------------------------------
// Golden values. Changing them breaks ECMP agreement across versions (see top).
// ---------------------------------------------------------------------------

/// `flow_hash(golden_keys()[k], MODES[m], FLOW_HASH_SEED)` as `GOLDEN_HASHES[k][m]`.
const GOLDEN_HASHES: [[u64; 3]; 6] = [
    // FiveTuple,         SourceIpProtocol,    SourceIp
    [0x83736d668f9fb9a5, 0x8faba8222db5d6ba, 0xcb1145c46a5dbe5a],
    [0x1d616bb3de179833, 0x359db25f782d3509, 0xcb1145c46a5dbe5a],
    [0x23afde4cab7cd5bb, 0xc17c800e99c6e3f7, 0x85c66de8de2e8b17],
    [0x984047da9bab8279, 0xa3235805a78da98b, 0xe799b5e3e065c16b],
    [0x1c320138f7016c42, 0x19154278f2154a38, 0xe799b5e3e065c16b],
    [0x2c3b8eb04dda26c6, 0x67f5248bce08a326, 0x9979d310dc782875],
];

/// Same keys, seed 0, five-tuple only: pins that the seed is an input.
const GOLDEN_HASHES_SEED0: [u64; 6] = [
    0x8f0f11242a8248cf,
    0x0405035bbbbb84fc,
    0x6b7201d98600352f,
    0xee4daf07b48a9c75,
    0x6d4d7d7d44f380a5,
    0x46953610dfef0b62,
];

/// `slot_of(GOLDEN_HASHES[k][0])` for M = 65537 and M = 251.
const GOLDEN_SLOTS_65537: [usize; 6] = [33651, 7521, 9136, 38976, 7218, 11323];
const GOLDEN_SLOTS_251: [usize; 6] = [128, 28, 34, 149, 27, 43];

/// Owners in the M = 65537 table over backend-0000..0002, weight 1, at these slots.
const PINNED_SLOTS: [usize; 8] = [0, 1, 2, 3, 1000, 32768, 65535, 65536];
const GOLDEN_OWNERS_EQUAL: [u32; 8] = [2, 0, 2, 1, 1, 1, 1, 1];
/// Same slots, weights 1, 2, 3.
const GOLDEN_OWNERS_WEIGHTED: [u32; 8] = [2, 0, 2, 2, 2, 1, 1, 1];

/// Whole-table fingerprints (see `table_fingerprint`).
const GOLDEN_TABLE_EQUAL_65537: u64 = 0x085b9c162e608f62;
const GOLDEN_TABLE_WEIGHTED_65537: u64 = 0x4fc0c414bc027036;
const GOLDEN_TABLE_EQUAL_251: u64 = 0x3f9b85899bf9719d;

/// Slot counts of the M = 65537 tables.
const GOLDEN_COUNTS_EQUAL: [u32; 3] = [21846, 21846, 21845];
const GOLDEN_COUNTS_WEIGHTED: [u32; 3] = [10923, 21846, 32768];

/// Backend a default-params snapshot over backend-0000..0002 picks for each golden key.
const GOLDEN_LOOKUPS: [u32; 6] = [0, 0, 0, 0, 0, 2];

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn reference_xxh64_matches_published_known_answers() {
    // From the xxHash test suite / spec: XXH64 of the empty input and of "abc", seed 0.
    assert_eq!(reference_xxh64(b"", 0), 0xEF46_DB37_51D8_E999);
    assert_eq!(reference_xxh64(b"abc", 0), 0x44BC_2CF5_AD77_0999);
}

#[test]
fn crate_xxh64_matches_known_answers_and_reference_at_every_length() {
    // name_hash is the crate's raw XXH64 over a string's bytes.
    assert_eq!(name_hash("", 0), 0xEF46_DB37_51D8_E999);
    assert_eq!(name_hash("abc", 0), 0x44BC_2CF5_AD77_0999);
    // Every code path: < 4, 4..8, 8..32, >= 32 bytes, and several stripes.
    let text: String = (0..200u32)
        .map(|i| char::from(b'!' + (i * 7 % 94) as u8))
        .collect();
    for len in 0..=text.len() {
        for seed in [0, 1, FLOW_HASH_SEED, u64::MAX] {
            assert_eq!(
                name_hash(&text[..len], seed),
                reference_xxh64(&text.as_bytes()[..len], seed),
                "len {len} seed {seed:#x}"
            );
        }
    }
}

#[test]
fn encoding_follows_the_documented_layout() {
    assert_eq!(ENCODED_LEN, 37);
    for key in golden_keys() {
        for mode in MODES {
            assert_eq!(
                encode(&key, mode),
                documented_encoding(&key, mode),
                "{key:?} {mode:?}"
            );
        }
    }
}

/// lb-flowhash v1, restated from the specification in hash.rs over the documented bytes.
fn reference_flow_hash(enc: &[u8; 37], seed: u64) -> u64 {
    const P: [u64; 5] = [
        0xa0761d6478bd642f,
        0xe7037ed1a0b428db,
        0x8ebc6af09c88c6e3,
        0x589965cc75374cc3,
        0x1d8e4e27c47d124f,
    ];
    let word = |b: &[u8]| b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x));
    let (s_hi, s_lo, d_hi, d_lo) = (
        word(&enc[0..8]),
        word(&enc[8..16]),
        word(&enc[16..24]),
        word(&enc[24..32]),
    );
    let pp = word(&enc[32..37]) << 24;
    let mum = |a: u64, b: u64| {
        let r = (a as u128) * (b as u128);
        (r as u64) ^ ((r >> 64) as u64)
    };
    let h1 = mum(s_hi ^ seed ^ P[0], s_lo ^ P[1]);
    let h2 = mum(d_hi ^ P[2], d_lo ^ seed ^ P[3]);
    let h3 = mum(pp ^ P[4], seed ^ P[0]);
    h1 ^ h2 ^ h3
}

#[test]
fn flow_hash_follows_its_specification() {
    for key in golden_keys() {
        for mode in MODES {
            for seed in [0, FLOW_HASH_SEED, 42, u64::MAX] {
                assert_eq!(
                    flow_hash(&key, mode, seed),
                    reference_flow_hash(&documented_encoding(&key, mode), seed),
                    "{key:?} {mode:?} {seed:#x}"
                );
            }
        }
    }
}

#[test]
fn flow_hash_golden_vectors() {
    assert_eq!(FLOW_HASH_SEED, 0x4c42_2d46_4c4f_5731);
    for (k, key) in golden_keys().iter().enumerate() {
        for (m, &mode) in MODES.iter().enumerate() {
            assert_eq!(
                flow_hash(key, mode, FLOW_HASH_SEED),
                GOLDEN_HASHES[k][m],
                "key {k} {key:?} mode {mode:?}"
            );
            assert_eq!(
                FlowHasher::new(mode, FLOW_HASH_SEED).hash(key),
                GOLDEN_HASHES[k][m]
            );
        }
        assert_eq!(
            flow_hash(key, DistributionMode::FiveTuple, 0),
            GOLDEN_HASHES_SEED0[k],
            "key {k} seed 0"
        );
    }
    assert_eq!(
        FlowHasher::default().hash(&golden_keys()[0]),
        GOLDEN_HASHES[0][0]
    );
}

#[test]
fn ipv4_golden_vectors_equal_their_mapped_ipv6_form() {
    for (k, key) in golden_keys().iter().enumerate() {
        let (IpAddr::V4(s), IpAddr::V4(d)) = (key.src.ip(), key.dst.ip()) else {
            continue;
        };
        let mapped = FlowKey::new(
            SocketAddr::new(IpAddr::V6(s.to_ipv6_mapped()), key.src.port()),
            SocketAddr::new(IpAddr::V6(d.to_ipv6_mapped()), key.dst.port()),
            key.proto,
        );
        for (m, &mode) in MODES.iter().enumerate() {
            assert_eq!(
                flow_hash(&mapped, mode, FLOW_HASH_SEED),
                GOLDEN_HASHES[k][m]
            );
        }
    }
}

#[test]
fn slot_golden_vectors() {
    let big = table_over(65_537, &three_backends([1, 1, 1]));
    let small = table_over(251, &three_backends([1, 1, 1]));
    for k in 0..golden_keys().len() {
        let h = GOLDEN_HASHES[k][0];
        assert_eq!(big.slot_of(h), GOLDEN_SLOTS_65537[k], "key {k}");
        assert_eq!(small.slot_of(h), GOLDEN_SLOTS_251[k], "key {k}");
        // Lemire's reduction, restated.
        assert_eq!(
            GOLDEN_SLOTS_65537[k] as u128,
            (h as u128 * 65_537) >> 64,
            "key {k}"
        );
    }
    assert_eq!(big.slot_of(0), 0);
    assert_eq!(big.slot_of(u64::MAX), 65_536);
    assert_eq!(big.slot_of(1 << 63), 32_768);
}

#[test]
fn maglev_table_golden_vectors() {
    let equal = table_over(DEFAULT_TABLE_SIZE, &three_backends([1, 1, 1]));
    let weighted = table_over(DEFAULT_TABLE_SIZE, &three_backends([1, 2, 3]));
    let small = table_over(251, &three_backends([1, 1, 1]));
    for (i, &slot) in PINNED_SLOTS.iter().enumerate() {
        assert_eq!(
            equal.owner(slot),
            Some(GOLDEN_OWNERS_EQUAL[i]),
            "slot {slot}"
        );
        assert_eq!(
            weighted.owner(slot),
            Some(GOLDEN_OWNERS_WEIGHTED[i]),
            "slot {slot}"
        );
    }
    assert_eq!(equal.slot_counts(3), GOLDEN_COUNTS_EQUAL);
    assert_eq!(weighted.slot_counts(3), GOLDEN_COUNTS_WEIGHTED);
    assert_eq!(table_fingerprint(&equal), GOLDEN_TABLE_EQUAL_65537);
    assert_eq!(table_fingerprint(&weighted), GOLDEN_TABLE_WEIGHTED_65537);
    assert_eq!(table_fingerprint(&small), GOLDEN_TABLE_EQUAL_251);
}

#[test]
fn snapshot_lookup_golden_vectors() {
    let snap = Snapshot::build(
        1,
        SnapshotParams::default(),
        three_backends([1, 1, 1]),
        vec![true; 3],
    )
    .unwrap();
    for (k, key) in golden_keys().iter().enumerate() {
        assert_eq!(snap.lookup(key), Some(GOLDEN_LOOKUPS[k]), "key {k}");
        let route = snap.route(key);
        assert_eq!(route.hash, GOLDEN_HASHES[k][0]);
        assert_eq!(route.slot, GOLDEN_SLOTS_65537[k]);
    }
}

/// Prints the current values in the layout of the constants above, for
/// deliberate re-pinning only (see the warning at the top of this file):
/// `LB_PRINT_GOLDEN=1 cargo test -p lb-core --test golden -- --nocapture print_golden_vectors`.
/// Without the variable it does nothing, so it runs in CI without printing.
#[test]
fn print_golden_vectors() {
    if std::env::var_os("LB_PRINT_GOLDEN").is_none() {
        return;
    }
    let keys = golden_keys();
    println!("GOLDEN_HASHES:");
    for key in &keys {
        let row: Vec<String> = MODES
            .iter()
            .map(|&m| format!("0x{:016x}", flow_hash(key, m, FLOW_HASH_SEED)))
            .collect();
        println!("    [{}],", row.join(", "));
    }
    let seed0: Vec<String> = keys
        .iter()
        .map(|k| format!("0x{:016x}", flow_hash(k, DistributionMode::FiveTuple, 0)))
        .collect();
    println!("GOLDEN_HASHES_SEED0: [{}]", seed0.join(", "));
    let big = table_over(65_537, &three_backends([1, 1, 1]));
    let small = table_over(251, &three_backends([1, 1, 1]));
    let weighted = table_over(65_537, &three_backends([1, 2, 3]));
    let slots = |t: &MaglevTable| -> Vec<usize> {
        keys.iter()
            .map(|k| t.slot_of(flow_hash(k, DistributionMode::FiveTuple, FLOW_HASH_SEED)))
            .collect()
    };
    println!("GOLDEN_SLOTS_65537: {:?}", slots(&big));
    println!("GOLDEN_SLOTS_251: {:?}", slots(&small));
    let owners = |t: &MaglevTable| -> Vec<u32> {
        PINNED_SLOTS.iter().map(|&s| t.owner(s).unwrap()).collect()
    };
    println!("GOLDEN_OWNERS_EQUAL: {:?}", owners(&big));
    println!("GOLDEN_OWNERS_WEIGHTED: {:?}", owners(&weighted));
    println!(
        "GOLDEN_TABLE_EQUAL_65537: 0x{:016x}",
        table_fingerprint(&big)
    );
    println!(
        "GOLDEN_TABLE_WEIGHTED_65537: 0x{:016x}",
        table_fingerprint(&weighted)
    );
    println!(
        "GOLDEN_TABLE_EQUAL_251: 0x{:016x}",
        table_fingerprint(&small)
    );
    println!("GOLDEN_COUNTS_EQUAL: {:?}", big.slot_counts(3));
    println!("GOLDEN_COUNTS_WEIGHTED: {:?}", weighted.slot_counts(3));
    let snap = Snapshot::build(
        1,
        SnapshotParams::default(),
        three_backends([1, 1, 1]),
        vec![true; 3],
    )
    .unwrap();
    let lookups: Vec<u32> = keys.iter().map(|k| snap.lookup(k).unwrap()).collect();
    println!("GOLDEN_LOOKUPS: {lookups:?}");
}
