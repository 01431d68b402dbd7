//! Criterion bench of `SourceRanges::contains`, the check every accepted TCP
//! connection and every UDP datagram of no flow goes through when a frontend
//! has `source_ranges`: one binary search over sorted disjoint ranges.
//!
//! Lists of 1, 16 and 1,000 prefixes (an NSG rule's sources, and far past
//! what a Service's `loadBalancerSourceRanges` usually holds), IPv4 and IPv6;
//! the clients round-robin over 4,096 pre-generated addresses, half inside
//! some listed prefix, half anywhere, so the reported time is per client.
//!
//! Run: `cargo bench -p lb-bench --bench source_ranges -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lb_core::SourceRanges;

const CLIENTS: usize = 4096;
const LIST_SIZES: [usize; 3] = [1, 16, 1000];

/// splitmix64: a fixed, seeded sequence, so every run benches the same lists.
struct Seq(u64);

impl Seq {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// `n` prefixes of one family (/16 to /32 for IPv4, /32 to /128 for IPv6),
/// and the clients: even ones the first address of a listed prefix, odd ones anywhere.
fn workload(n: usize, v6: bool, seq: &mut Seq) -> (SourceRanges, Vec<IpAddr>) {
    let prefixes: Vec<(IpAddr, u64)> = (0..n)
        .map(|_| {
            let r = seq.next();
            if v6 {
                let addr = (u128::from(r) << 64) | u128::from(seq.next());
                (IpAddr::V6(Ipv6Addr::from(addr)), 32 + r % 97)
            } else {
                (IpAddr::V4(Ipv4Addr::from(r as u32)), 16 + (r >> 32) % 17)
            }
        })
        .collect();
    let text: Vec<String> = prefixes.iter().map(|(a, l)| format!("{a}/{l}")).collect();
    let ranges = SourceRanges::parse(text.iter().map(String::as_str)).expect("valid prefixes");
    let clients = (0..CLIENTS)
        .map(|i| {
            let r = seq.next();
            match (i % 2, v6) {
                (0, _) => ranges.prefixes()[r as usize % ranges.prefixes().len()].addr(),
                (_, true) => IpAddr::V6(Ipv6Addr::from((u128::from(r) << 64) | u128::from(r))),
                (_, false) => IpAddr::V4(Ipv4Addr::from(r as u32)),
            }
        })
        .collect();
    (ranges, clients)
}

fn contains(c: &mut Criterion) {
    let mut group = c.benchmark_group("source_ranges_contains");
    group.throughput(Throughput::Elements(1));
    let mut seq = Seq(0x5eed);
    for (family, v6) in [("v4", false), ("v6", true)] {
        for n in LIST_SIZES {
            let (ranges, clients) = workload(n, v6, &mut seq);
            group.bench_with_input(BenchmarkId::new(family, n), &n, |b, _| {
                let mut i = 0;
                b.iter(|| {
                    // CLIENTS is a power of two.
                    i = (i + 1) & (CLIENTS - 1);
                    ranges.contains(black_box(clients[i]))
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, contains);
criterion_main!(benches);
