//! Fuzzes the QUIC datagram path the balancer runs on every datagram of a QUIC
//! frontend: lb-core's classifier (quinn-proto's header decoder with the
//! QUIC-LB self-encoded-length CID parser) and the server-ID router.
//!
//! Properties checked on every input:
//! - classifying never panics and yields a CID of at most 20 bytes, empty
//!   only when the datagram is not QUIC;
//! - a short-header datagram whose CID the router routes names a backend
//!   whose server ID is the one the CID carries, and that backend is healthy;
//! - Initial and 0-RTT datagrams never route by CID (their CID is the client's);
//! - the same bytes classify the same way twice (the scratch buffer the
//!   classifier reuses carries nothing from one datagram to the next).

#![no_main]

use std::sync::OnceLock;

use lb_core::quic_lb::MAX_CID_LEN;
use lb_core::{
    BackendSet, BackendSpec, CidRoute, Classifier, DatagramKind, QuicLbConfig, QuicRouter,
    ServerId, Snapshot, SnapshotParams,
};
use libfuzzer_sys::fuzz_target;

struct World {
    config: QuicLbConfig,
    router: QuicRouter,
    snapshot: Snapshot,
}

/// Built once: a snapshot's 65,537-slot Maglev table per input held the
/// target to 43 executions a second.
static WORLD: OnceLock<World> = OnceLock::new();

/// Three backends with 2-byte server IDs 0001..0003, the second one down.
fn world() -> World {
    let config = QuicLbConfig::new(0, 2, 4).expect("a valid layout");
    let backends = (1..=3u16)
        .map(|i| BackendSpec::new(format!("b{i}"), ([127, 0, 0, 1], 9000 + i).into(), 1))
        .collect();
    let set = BackendSet::new(backends).expect("distinct names");
    let snapshot = Snapshot::build(1, SnapshotParams::default(), set, vec![true, false, true])
        .expect("a table");
    let ids: Vec<_> = (0..3u32)
        .map(|b| (b, ServerId::new(&[0, b as u8 + 1]).expect("2 bytes")))
        .collect();
    World {
        config,
        router: QuicRouter::new(config, &ids),
        snapshot,
    }
}

fuzz_target!(|data: &[u8]| {
    let w = WORLD.get_or_init(world);
    let mut classifier = Classifier::new();
    let c = classifier.classify(data);
    assert!(c.dst_cid.len() <= MAX_CID_LEN);
    if c.kind != DatagramKind::NotQuic {
        assert!(!data.is_empty());
    }
    // Classify something else in between, then the same bytes again.
    let _ = classifier.classify(&data[data.len() / 2..]);
    assert_eq!(classifier.classify(data), c);

    match w.router.route(&c, &w.snapshot) {
        CidRoute::Backend { server_id, backend } => {
            assert!(!matches!(
                c.kind,
                DatagramKind::Initial | DatagramKind::ZeroRtt
            ));
            assert_eq!(w.config.decode(&c.dst_cid), Ok(server_id));
            assert_eq!(w.router.backend_of(&server_id), Some(backend));
            assert!(w.snapshot.is_healthy(backend));
        }
        CidRoute::Fallback(_) => {}
    }
});
