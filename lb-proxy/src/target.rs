//! Where a flow's upstream goes, shared by the TCP and UDP data planes: the
//! backend itself, or, with the hop model, the endpoint that node's
//! kube-proxy picks, and the source address the upstream is bound to (by
//! [`lb_core::target_source`], the rule `/explain` reports too).
//!
//! One function for both planes, so a UDP flow crosses the node hop exactly
//! as a TCP connection does (SNAT to the node, the client under `Local` or
//! `preserve`).

use std::cell::Cell;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use lb_core::{target_source, BackendId, SessionAffinity};
use tracing::warn;

use crate::config::ClientAddress;
use crate::state::{BackendRuntime, HealthKey, Routing};

/// The zones of a flow's node → pod hop, and what crossing them costs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZoneHop {
    /// The zone of the node the flow entered.
    pub node_zone: Arc<str>,
    /// The zone of the pod kube-proxy picked (its node's zone).
    pub endpoint_zone: Arc<str>,
    /// Held in each direction: half the frontend's `cross_zone_rtt` when the
    /// zones differ, zero when they are the same.
    pub one_way_delay: Duration,
}

impl ZoneHop {
    /// The hop between two zones with the frontend's round trip.
    pub fn new(node_zone: Arc<str>, endpoint_zone: Arc<str>, cross_zone_rtt: Duration) -> Self {
        let one_way_delay = if node_zone == endpoint_zone {
            Duration::ZERO
        } else {
            cross_zone_rtt / 2
        };
        ZoneHop {
            node_zone,
            endpoint_zone,
            one_way_delay,
        }
    }

    /// Whether the hop leaves the node's zone.
    pub fn crosses(&self) -> bool {
        self.node_zone != self.endpoint_zone
    }
}

/// Where one upstream goes, and how the backend will learn the client.
pub struct Target {
    pub addr: SocketAddr,
    /// Local address to bind the outgoing socket to (SNAT to a node, or the client's own IP).
    pub bind: Option<IpAddr>,
    /// The source the target sees, when known before connecting (see [`lb_core::target_source`]).
    pub seen: Option<IpAddr>,
    /// The health key a failure is reported under.
    pub health_key: HealthKey,
    /// The hop's zones; `None` without the hop model or when the node or the
    /// pod's node has no zone.
    pub zones: Option<ZoneHop>,
}

/// Time since the process started: the `now` lb-core's affinity and flow tables run on.
pub fn process_clock() -> Duration {
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed()
}

/// kube-proxy's random draw. Per worker thread, so it needs no lock; seeded
/// from the clock and the thread, since picks only need to be uniform.
fn next_random() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            t ^ (&t as *const u64 as u64).rotate_left(32)
        });
    }
    STATE.with(|s| {
        // splitmix64
        let z = s.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        s.set(z);
        let z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// Resolves backend `id` to a target: the backend itself, or, with the hop
/// model, the endpoint that node's kube-proxy picks. Called once per TCP
/// connection or UDP flow, never per packet (ClientIP affinity locks a table).
pub fn resolve_target(
    routing: &Routing,
    id: BackendId,
    backend: &BackendRuntime,
    peer: SocketAddr,
    client_address: ClientAddress,
) -> Option<Target> {
    let announce = client_address.announcement();
    let Some(hop) = &routing.hop else {
        let source = target_source(peer.ip(), announce, None);
        return Some(Target {
            addr: backend.addr,
            bind: source.bind,
            seen: source.seen,
            health_key: HealthKey::Backend(Arc::clone(&backend.name)),
            zones: None,
        });
    };
    let model = &hop.model;
    let now = process_clock();
    let endpoint = match model.service().session_affinity {
        SessionAffinity::ClientIp => {
            let mut table = hop.affinity.get(id as usize)?.lock();
            model.choose(id, peer.ip(), next_random(), Some(&mut *table), now)
        }
        SessionAffinity::None => {
            model.choose::<std::hash::RandomState>(id, peer.ip(), next_random(), None, now)
        }
    }?;
    let spec = model.endpoint(endpoint)?;
    let source = target_source(peer.ip(), announce, Some(model.source_seen(id, endpoint)));
    Some(Target {
        addr: spec.addr,
        bind: source.bind,
        seen: source.seen,
        health_key: hop
            .endpoint_keys
            .get(endpoint.node as usize)?
            .get(endpoint.index as usize)?
            .clone(),
        zones: hop.zone_hop(id, endpoint.node),
    })
}

/// Out of fds, memory or buffers: this machine's shortage, not a backend's.
pub fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}

/// [`is_resource_exhaustion`], or out of local ports.
pub fn is_local_exhaustion(e: &io::Error) -> bool {
    is_resource_exhaustion(e) || e.raw_os_error() == Some(libc::EADDRNOTAVAIL)
}

/// Logs local resource exhaustion at most once a second per worker.
pub fn warn_local_exhaustion(e: &io::Error) {
    thread_local! {
        static LAST: Cell<Option<std::time::Instant>> = const { Cell::new(None) };
    }
    LAST.with(|last| {
        let now = std::time::Instant::now();
        if last
            .get()
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            last.set(Some(now));
            warn!(error = %e, "local resources exhausted; shedding clients");
        }
    });
}
