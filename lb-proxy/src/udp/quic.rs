//! The QUIC routing step, before the flow table: the draft's required order.
//!
//! 1. A routable destination connection ID whose server ID belongs to a
//!    healthy backend → that backend, whatever the client's address (so a
//!    migrated client keeps its backend: the table pins its new 4-tuple there).
//! 2. Otherwise the 4-tuple flow table.
//! 3. Otherwise the hash (a new flow).
//!
//! Initial and 0-RTT packets carry a client-chosen CID and always fall back.
//! Every fallback is counted by its reason, every forwarded datagram by the
//! step that chose its backend. Parsing is lb-core's [`Classifier`]
//! (quinn-proto's public header decoder): nothing here reads a QUIC header by hand.
//!
//! "Not QUIC" means what quinn-proto cannot decode, and only that: such
//! datagrams are counted (`not_quic`) and dropped. No stricter check is
//! made, because peers may grease the fixed bit (RFC 9287), so bytes that
//! happen to parse as a short header cannot be told from QUIC: they take
//! the fallback like any short header whose CID does not route (counted by
//! that reason) and are forwarded.

use std::time::Duration;

use lb_core::{
    CidRoute, Classifier, DatagramKind, FlowDecision, FlowKey, Snapshot, UdpFlowTable, Unroutable,
};

use crate::metrics::{QuicHandles, RoutedBy, UdpDrop, UdpFrontendHandles};
use crate::state::Routing;

/// A worker's QUIC step for one frontend: the classifier's scratch buffer
/// and the frontend's counters.
pub struct QuicStep {
    classifier: Classifier,
    metrics: QuicHandles,
}

impl QuicStep {
    pub fn new(metrics: QuicHandles) -> Self {
        QuicStep {
            classifier: Classifier::new(),
            metrics,
        }
    }

    /// Step 1: where the datagram's connection ID routes, or `None` when it
    /// is not QUIC (counted and dropped).
    pub fn route(
        &mut self,
        payload: &[u8],
        routing: &Routing,
        udp: &UdpFrontendHandles,
    ) -> Option<CidRoute> {
        let datagram = self.classifier.classify(payload);
        if datagram.kind == DatagramKind::NotQuic {
            self.metrics.unroutable(Unroutable::NotQuic).inc();
            udp.dropped(UdpDrop::NotQuic).inc();
            return None;
        }
        Some(match &routing.quic {
            Some(router) => router.route(&datagram, &routing.snapshot),
            // Unreachable with a validated config: a QUIC frontend always has a router.
            None => CidRoute::Fallback(Unroutable::UnknownConfig),
        })
    }

    /// Steps 2 and 3: the table's decision for a datagram that [`Self::route`]
    /// routed: pinned to the CID's backend, or by the flow table, then the
    /// hash (the fallback counted by its reason). Counts the step that chose.
    pub fn decide(
        &self,
        route: CidRoute,
        key: &FlowKey,
        snapshot: &Snapshot,
        table: &mut UdpFlowTable,
        now: Duration,
    ) -> FlowDecision {
        let (decision, by) = match route {
            CidRoute::Backend { backend, .. } => (
                table.handle_routed(key, backend, snapshot, now),
                RoutedBy::Cid,
            ),
            CidRoute::Fallback(why) => {
                self.metrics.unroutable(why).inc();
                let decision = table.handle_datagram(key, snapshot, now);
                (decision, step_of(&decision))
            }
        };
        if !matches!(decision, FlowDecision::Refused { .. }) {
            self.metrics.routed(by).inc();
        }
        decision
    }
}

/// Which step chose the backend of a datagram that fell back: the flow
/// table when its flow went on where it was, the hash when the flow is new
/// or had to move.
fn step_of(decision: &FlowDecision) -> RoutedBy {
    match decision {
        FlowDecision::Existing { .. } => RoutedBy::Flow,
        _ => RoutedBy::Hash,
    }
}
