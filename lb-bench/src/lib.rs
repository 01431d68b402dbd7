//! `lb-bench` owns load generation and benchmarking for the load balancer:
//!
//! - [`load`]: the `lb-bench load` generator (HTTP/1.1 and raw TCP on tokio,
//!   many source addresses, an HDR histogram, per-backend counts from `X-Node`
//!   with a chi-square test) and its hey-style and JSON reports; the closed-loop
//!   UDP echo generator (batched, per-flow windows, loss after a grace period)
//!   and the QUIC handshake load;
//! - [`experiment`]: `lb-bench experiment seed`, the seed article replayed
//!   against lb-proxy (keep-alive, new connections, session affinity, the hop
//!   model), step by step with PASS/FAIL; and `experiment quic-migration`, a
//!   QUIC client changing port behind a plain UDP and a QUIC-LB frontend;
//! - [`compare`]: `lb-bench compare`, direct vs lb-proxy vs HAProxy vs nginx
//!   stream in interleaved rounds, with hey, wrk, iperf3 and its own
//!   generator, written out as Markdown and an SVG chart ([`compare::chart`]);
//!   with `--proto udp`, direct vs lb-proxy (batched and not) vs nginx stream
//!   UDP; with `--proto quic`, handshakes/s direct vs through a QUIC-LB frontend;
//! - [`costs`]: what a feature of lb-proxy costs, as an A/B of two configs
//!   (`lb-bench metrics-cost`: scrape time and byte metrics on vs off;
//!   `lb-bench hop-cost`: plain backends vs the hop model with SNAT);
//! - [`report`]: `lb-bench report`, which writes `BENCHMARKS.md`;
//! - [`soak`]: `lb-bench soak`, lb-proxy under ten minutes of mixed load,
//!   reloads and a flapping backend, its memory, fds and active connections
//!   sampled, PASS when they come back flat;
//! - [`serve`]: the one backend of the tree (HTTP, echo and sink over TCP;
//!   UDP echo and QUIC with a TCP health listener on the same port), used by
//!   the benchmarks, the experiments and the end-to-end tests (as the
//!   `lb-bench serve` process, or in-process as the hop model's pod);
//! - [`quic`]: QUIC backends whose connection IDs carry a QUIC-LB server ID,
//!   and the client (request, `whoami`) that the migration experiment, the
//!   `quic-client` command and the end-to-end tests use;
//! - [`signals`]: SIGINT, SIGTERM or SIGHUP stops every process lb-bench
//!   started before it exits;
//! - [`client`]: the one blocking HTTP/1.1 GET helper (admin endpoints, tests);
//! - the criterion benches of lb-core's hot path (lookup, table build, snapshot
//!   swap under readers, the UDP flow table, a TCP flow's decisions) in
//!   `benches/core.rs`, and the fixtures they share ([`backend_set`], [`flow_keys`]).
//!
//! Library code returns [`Error`]; the binary wraps it in `anyhow`.

pub mod client;
pub mod compare;
pub mod costs;
pub mod error;
pub mod experiment;
pub mod http;
pub mod lbproxy;
pub mod load;
pub mod net;
pub mod procs;
pub mod quic;
pub mod report;
pub mod serve;
pub mod signals;
pub mod soak;
pub mod stats;
pub mod tools;

pub use error::{Error, Result};

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use lb_core::{BackendSet, BackendSpec, FlowKey};

/// `n` backends named `backend-0000`.. on distinct 127.x addresses, all with `weight`.
pub fn backend_set(n: usize, weight: u32) -> BackendSet {
    let specs = (0..n)
        .map(|i| {
            let ip = Ipv4Addr::new(127, 1, (i >> 8) as u8, i as u8);
            BackendSpec::new(
                format!("backend-{i:04}"),
                SocketAddr::V4(SocketAddrV4::new(ip, 8000)),
                weight,
            )
        })
        .collect();
    BackendSet::new(specs).expect("generated names are unique")
}

/// Deterministic pseudo-random TCP flow keys toward one frontend (splitmix64 over `seed`).
pub fn flow_keys(count: usize, seed: u64) -> Vec<FlowKey> {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let frontend = SocketAddr::from(([127, 0, 0, 1], 8080));
    (0..count)
        .map(|_| {
            let r = next();
            let ip = Ipv4Addr::from((r >> 32) as u32 | 0x0a00_0000);
            FlowKey::tcp(SocketAddr::V4(SocketAddrV4::new(ip, r as u16)), frontend)
        })
        .collect()
}
