//! A worker's flows on one UDP frontend: lb-core's [`UdpFlowTable`] (which
//! decides) beside the per-flow I/O state it indexes by slot (which this
//! file owns): the upstream socket, the client's address, the backend's
//! metric handles, and what the flow carried, for its flow log record.
//!
//! Every way a flow ends goes through [`Flows::finish`], which is idempotent
//! per flow id: a flow the table reports twice (in a decision, then as an
//! event) is counted, logged and closed once. A flow has one flow log record,
//! written when it ends, naming the backend it ended on; a move replaces its
//! upstream and carries its byte counts over.
//!
//! Zones: a flow whose node → pod hop crosses zones sends and receives
//! through the worker's delay lines ([`crate::udp::delay`]), one per
//! direction, owned here beside the slots whose datagrams they hold. A flow
//! with datagrams still held takes the line even when its delay is zero (a
//! move to a same-zone pod), so none of its datagrams overtakes another.
//! When a zone goes down, [`Flows::end_through_down_zones`] ends every flow
//! whose node or pod is in it (counted `closed`, logged `zone_down`, as a
//! TCP flow cut by a zone is).

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::Histogram;

use lb_core::{
    BackendId, FlowDecision, FlowEnd, FlowEntry, FlowEvent, FlowId, FlowKey, Protocol, UdpFlowTable,
};
use tokio::io::unix::AsyncFd;
use tracing::debug;

use crate::config::FrontendConfig;
use crate::flowlog::FlowRecord;
use crate::metrics::{flow_end_label, UdpDrop, UdpFrontendHandles};
use crate::state::{ActiveUdpFlow, BackendRuntime, Frontend, Routing};
use crate::target::{is_local_exhaustion, resolve_target, warn_local_exhaustion};
use crate::udp::delay::Line;
use crate::udp::socket::{send_connected, Batch, RawAddr};
use crate::udp::upstream::{self, Poller};

/// How a flow ended, for its counters and flow log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The flow ended, for this reason.
    End(FlowEnd),
    /// The process is stopping: counted as `closed`, logged as the TCP cut is.
    Shutdown,
    /// The node's or the pod's zone went down: counted as `closed`, logged
    /// as a TCP flow cut by a zone is.
    ZoneDown,
}

impl Ending {
    fn outcome(self) -> &'static str {
        match self {
            Ending::End(end) => flow_end_label(end),
            Ending::Shutdown => crate::shutdown::CUT_OUTCOME,
            Ending::ZoneDown => crate::shutdown::ZONE_DOWN_OUTCOME,
        }
    }

    fn counted_as(self) -> FlowEnd {
        match self {
            Ending::End(end) => end,
            Ending::Shutdown | Ending::ZoneDown => FlowEnd::Closed,
        }
    }
}

/// One flow's I/O state, at its table slot.
pub struct FlowSlot {
    id: FlowId,
    upstream: std::net::UdpSocket,
    client: SocketAddr,
    /// The client in the kernel's form: every reply's destination.
    pub client_raw: RawAddr,
    pub backend: Arc<BackendRuntime>,
    target: SocketAddr,
    /// The source the target sees (for the flow log).
    seen: IpAddr,
    started: Instant,
    pub bytes_to_backend: u64,
    pub bytes_from_backend: u64,
    _active: ActiveUdpFlow,
    /// The hop's zones ([`crate::target::Target::zones`]), for the flow
    /// log, the delay and a zone going down.
    pub zones: Option<crate::target::ZoneHop>,
    /// Datagrams of this flow in the delay lines, client → pod and pod → client.
    held_up: u32,
    held_down: u32,
}

impl FlowSlot {
    pub fn id(&self) -> FlowId {
        self.id
    }

    /// What each direction is held for: zero unless the hop crosses zones.
    fn one_way(&self) -> Duration {
        self.zones
            .as_ref()
            .map_or(Duration::ZERO, |z| z.one_way_delay)
    }

    /// Whether the flow's hop crosses zones (within a zone it has no delay),
    /// or datagrams it sent that way are still held.
    fn delays(&self, held: u32) -> bool {
        held > 0 || !self.one_way().is_zero()
    }

    /// Whether the flow's node or pod is in a zone `is_down` says is down.
    fn through_down_zone(&self, is_down: &impl Fn(&str) -> bool) -> bool {
        self.zones
            .as_ref()
            .is_some_and(|z| is_down(&z.node_zone) || is_down(&z.endpoint_zone))
    }

    pub fn upstream_fd(&self) -> RawFd {
        self.upstream.as_raw_fd()
    }
}

/// A worker's flows on one frontend.
pub struct Flows {
    pub table: UdpFlowTable,
    /// By table slot; grown as the table fills (per new flow, never per datagram).
    slots: Vec<Option<FlowSlot>>,
    /// Every upstream socket, tagged with its slot; registered with the runtime.
    pub poller: AsyncFd<Poller>,
    frontend: Arc<Frontend>,
    pub metrics: UdpFrontendHandles,
    /// The frontend address clients send to: the `dst` of every flow key.
    pub local: SocketAddr,
    /// Cross-zone datagrams held, client → pod and pod → client.
    up: Line<FlowId>,
    down: Line<FlowId>,
}

impl Flows {
    /// Must run inside the worker's runtime (the poller registers with it).
    pub fn new(
        table: UdpFlowTable,
        frontend: Arc<Frontend>,
        metrics: UdpFrontendHandles,
    ) -> std::io::Result<Self> {
        let poller = Poller::new()?;
        // SAFETY: the poller owns its epoll descriptor and closes it only when
        // dropped, which the AsyncFd that owns the poller does last.
        let poller =
            unsafe { AsyncFd::register_with_interest(poller, tokio::io::Interest::READABLE)? };
        Ok(Flows {
            table,
            slots: Vec::new(),
            poller,
            local: frontend.listen,
            frontend,
            metrics,
            up: Line::default(),
            down: Line::default(),
        })
    }

    pub fn slot_mut(&mut self, slot: usize) -> Option<&mut FlowSlot> {
        self.slots.get_mut(slot).and_then(Option::as_mut)
    }

    fn flow_mut(&mut self, flow: FlowId) -> Option<&mut FlowSlot> {
        slot_of(&mut self.slots, flow)
    }

    /// The flow key of a datagram from `client`.
    pub fn key(&self, client: SocketAddr) -> FlowKey {
        FlowKey::udp(client, self.local)
    }

    /// Acts on the table's decision for one client datagram: opens, moves or
    /// ends upstreams as it says, then forwards the datagram (or counts why not).
    pub fn apply(
        &mut self,
        decision: FlowDecision,
        key: &FlowKey,
        payload: &[u8],
        routing: &Routing,
        settings: &FrontendConfig,
    ) {
        let flow = match decision {
            FlowDecision::Existing { flow, .. } => flow,
            FlowDecision::New {
                flow,
                backend,
                evicted,
            } => {
                if let Some(old) = evicted {
                    self.finish(old, Ending::End(FlowEnd::Evicted));
                }
                if !self.open(flow, key, backend, routing, settings, true) {
                    return;
                }
                flow
            }
            FlowDecision::Moved { flow, to, .. } => {
                if !self.move_to(flow, key, to, routing, settings) {
                    return;
                }
                flow
            }
            FlowDecision::Refused { ended } => {
                if let Some(old) = ended {
                    self.finish(old, Ending::End(FlowEnd::NoHealthyBackend));
                }
                self.metrics.dropped(UdpDrop::NoBackend).inc();
                return;
            }
        };
        self.forward(flow, payload, settings.byte_metrics);
    }

    /// Sends a client's datagram on its flow's upstream, or, across zones,
    /// into the delay line (dropped, and counted, when the line is full).
    fn forward(&mut self, flow: FlowId, payload: &[u8], byte_metrics: bool) {
        let Some(f) = slot_of(&mut self.slots, flow) else {
            self.metrics.dropped(UdpDrop::NoBackend).inc();
            return;
        };
        if f.delays(f.held_up) {
            if self
                .up
                .hold(flow, payload, tokio::time::Instant::now(), f.one_way())
            {
                f.held_up += 1;
            } else {
                self.metrics.dropped(UdpDrop::DelayLine).inc();
            }
            return;
        }
        send_upstream(f, payload, byte_metrics, &self.metrics);
    }

    /// The held datagrams whose time has come by `now`, each way: client
    /// datagrams go out on their flows' upstreams, replies into `replies`
    /// for the worker to send (until it is full: the worker sends it and
    /// calls again). Each hold is observed in `held`.
    pub fn release_due(
        &mut self,
        now: tokio::time::Instant,
        replies: &mut Batch,
        byte_metrics: bool,
        held: &Histogram,
    ) {
        while let Some(due) = self.up.due(now) {
            held.observe(due.held_for.as_secs_f64());
            match slot_of(&mut self.slots, due.flow) {
                Some(f) => {
                    f.held_up = f.held_up.saturating_sub(1);
                    send_upstream(f, due.payload, byte_metrics, &self.metrics);
                }
                None => self.metrics.dropped(UdpDrop::DelayLine).inc(),
            }
            self.up.pop();
        }
        while !replies.is_full() {
            let Some(due) = self.down.due(now) else { break };
            held.observe(due.held_for.as_secs_f64());
            match slot_of(&mut self.slots, due.flow) {
                Some(f) => {
                    f.held_down = f.held_down.saturating_sub(1);
                    replies.push(due.payload, &f.client_raw);
                }
                None => self.metrics.dropped(UdpDrop::DelayLine).inc(),
            }
            self.down.pop();
        }
    }

    /// When the next held datagram, either way, may leave.
    pub fn next_due(&self) -> Option<tokio::time::Instant> {
        match (self.up.next_due(), self.down.next_due()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Moves the replies of slot `slot` read into `replies` from `start` on
    /// into the delay line when the flow's hop crosses zones (counting any the
    /// line has no room for); false when they stay in the batch to go now.
    pub fn hold_replies(&mut self, slot: usize, replies: &mut Batch, start: usize) -> bool {
        let Some(f) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            return false;
        };
        if !f.delays(f.held_down) {
            return false;
        }
        let now = tokio::time::Instant::now();
        for i in start..replies.len() {
            if self.down.hold(f.id, replies.payload(i), now, f.one_way()) {
                f.held_down += 1;
            } else {
                self.metrics.dropped(UdpDrop::DelayLine).inc();
            }
        }
        replies.truncate(start);
        true
    }

    /// Gives back an idle delay line's memory (at the worker's tick).
    pub fn trim_delay_lines(&mut self) {
        self.up.trim();
        self.down.trim();
    }

    /// Ends every flow whose node or pod is in a zone `is_down` says is
    /// down; their next datagram makes a new flow, which the routing keeps
    /// out of those zones. Returns how many ended.
    pub fn end_through_down_zones(&mut self, is_down: impl Fn(&str) -> bool) -> usize {
        let through: Vec<FlowId> = self
            .slots
            .iter()
            .flatten()
            .filter(|f| f.through_down_zone(&is_down))
            .map(|f| f.id)
            .collect();
        for &flow in &through {
            self.table.close(flow);
            self.finish(flow, Ending::ZoneDown);
        }
        through.len()
    }

    /// Opens a flow's upstream at its slot: a new flow (`created`, counted
    /// in the backend's `lb_backend_udp_flows_total`), or one moved here (counted
    /// in `lb_udp_flows_moved_total` by the caller once this succeeded). On failure the flow is
    /// closed in the table again and the datagram counted as dropped.
    fn open(
        &mut self,
        flow: FlowId,
        key: &FlowKey,
        backend: BackendId,
        routing: &Routing,
        settings: &FrontendConfig,
        created: bool,
    ) -> bool {
        match self.connect(flow, key, backend, routing, settings) {
            Ok(slot) => {
                let m = &slot.backend.metrics;
                if created {
                    m.udp_flows.inc();
                }
                m.active_udp_flows.inc();
                let index = flow.slot();
                if self.slots.len() <= index {
                    self.slots.resize_with(index + 1, || None);
                }
                // The table's events are acted on before its decisions, so a
                // slot the table freed has been finished (counted, logged) by now.
                debug_assert!(
                    self.slots[index].is_none(),
                    "slot {index} still holds a flow"
                );
                self.slots[index] = Some(slot);
                true
            }
            Err(why) => {
                self.table.close(flow);
                self.metrics.dropped(why).inc();
                false
            }
        }
    }

    /// The new flow's upstream: its target (backend, or a node's pod), a
    /// socket bound and connected as the target rules say, in the epoll set.
    fn connect(
        &mut self,
        flow: FlowId,
        key: &FlowKey,
        id: BackendId,
        routing: &Routing,
        settings: &FrontendConfig,
    ) -> Result<FlowSlot, UdpDrop> {
        let backend = routing.backend(id).ok_or(UdpDrop::NoBackend)?;
        let target = resolve_target(routing, id, backend, key.src, settings.client_address)
            .ok_or(UdpDrop::NoBackend)?;
        let upstream = upstream::open(target.addr, target.bind).map_err(|e| {
            if is_local_exhaustion(&e) {
                warn_local_exhaustion(&e);
            }
            debug!(target = %target.addr, error = %e, "cannot open upstream socket");
            UdpDrop::UpstreamError
        })?;
        self.poller
            .get_ref()
            .add(upstream.as_raw_fd(), flow.slot())
            .map_err(|e| {
                debug!(error = %e, "cannot watch upstream socket");
                UdpDrop::UpstreamError
            })?;
        // getsockname only when a flow log wants the source, as the TCP plane does.
        if let (Some(hop), Some(zones)) = (&routing.hop, &target.zones) {
            hop.count_cross_zone(zones);
        }
        let seen = target
            .seen
            .unwrap_or_else(|| match &self.frontend.flow_log {
                Some(_) => upstream.local_addr().map_or(key.src.ip(), |a| a.ip()),
                None => key.src.ip(),
            });
        Ok(FlowSlot {
            id: flow,
            upstream,
            client: key.src,
            client_raw: RawAddr::new(key.src),
            backend: Arc::clone(backend),
            target: target.addr,
            seen,
            started: Instant::now(),
            bytes_to_backend: 0,
            bytes_from_backend: 0,
            _active: self.frontend.open_udp_flow(),
            zones: target.zones,
            held_up: 0,
            held_down: 0,
        })
    }

    /// Moves a flow to backend `to`: a new upstream at the same slot, which
    /// carries on the flow's start and byte counts (a flow has one flow log
    /// record, naming the backend it ended on). The move is counted once the
    /// new upstream is open; if it cannot open, the flow ends where it was
    /// (counted `closed` only).
    fn move_to(
        &mut self,
        flow: FlowId,
        key: &FlowKey,
        to: BackendId,
        routing: &Routing,
        settings: &FrontendConfig,
    ) -> bool {
        let old = self
            .slots
            .get_mut(flow.slot())
            .and_then(|s| s.take_if(|f| f.id == flow));
        if !self.open(flow, key, to, routing, settings, false) {
            if let Some(old) = old {
                self.slots[flow.slot()] = Some(old);
                self.finish(flow, Ending::End(FlowEnd::Closed));
            }
            return false;
        }
        self.metrics.moved.inc();
        if let (Some(old), Some(new)) = (old, self.flow_mut(flow)) {
            old.backend.metrics.active_udp_flows.dec();
            new.started = old.started;
            new.bytes_to_backend = old.bytes_to_backend;
            new.bytes_from_backend = old.bytes_from_backend;
            // Its held datagrams leave on the new upstream, before any later one.
            new.held_up = old.held_up;
            new.held_down = old.held_down;
        }
        true
    }

    /// Ends a flow's stretch on its backend: counts it, logs it, and closes
    /// its upstream (which also takes it out of the epoll set). A flow
    /// already finished, or whose slot holds a newer flow, is left alone.
    pub fn finish(&mut self, flow: FlowId, ending: Ending) {
        let Some(slot) = self.slots.get_mut(flow.slot()) else {
            return;
        };
        if slot.as_ref().is_none_or(|f| f.id != flow) {
            return;
        }
        let Some(f) = slot.take() else {
            return;
        };
        f.backend.metrics.active_udp_flows.dec();
        self.metrics.ended(ending.counted_as()).inc();
        if let Some(log) = &self.frontend.flow_log {
            log.log(FlowRecord {
                closed_at: std::time::SystemTime::now(),
                frontend: Arc::clone(&self.frontend.name),
                client: f.client,
                frontend_addr: self.local,
                proto: Protocol::Udp,
                via: Arc::clone(&f.backend.name),
                seen_source: f.seen,
                endpoint: f.target,
                bytes_to_backend: f.bytes_to_backend,
                bytes_from_backend: f.bytes_from_backend,
                duration: f.started.elapsed(),
                outcome: ending.outcome(),
                zones: f.zones.clone(),
            });
        }
        // Dropping `f` closes the upstream socket and releases the frontend's count.
    }

    /// Acts on every event the table has queued (expiries, snapshot moves
    /// and ends); called after every table call, as lb-core asks. A moved
    /// flow goes where the table has it now, which is where the event says
    /// unless a later call pinned it elsewhere (a QUIC connection ID): an
    /// upstream never points away from the table's backend.
    pub fn drain_events(&mut self, routing: &Routing, settings: &FrontendConfig) {
        while let Some(event) = self.table.poll_event() {
            match event {
                FlowEvent::Ended { flow, reason, .. } => self.finish(flow, Ending::End(reason)),
                FlowEvent::Moved { flow, .. } => self.follow_table(flow, routing, settings),
            }
        }
    }

    /// Moves `flow`'s upstream to the backend the table has it on, unless it
    /// is there already (or the flow has ended).
    fn follow_table(&mut self, flow: FlowId, routing: &Routing, settings: &FrontendConfig) {
        let Some(&FlowEntry { key, backend, .. }) = self.table.get(flow) else {
            return;
        };
        let Some(current) = self.flow_mut(flow) else {
            return;
        };
        let there = routing
            .backend(backend)
            .is_some_and(|b| b.name == current.backend.name);
        if !there {
            self.move_to(flow, &key, backend, routing, settings);
        }
    }

    /// Ends every flow (the process is stopping). The table's own ends come
    /// first, so a flow whose idle time ran out ends as expired, not as cut.
    pub fn close_all(&mut self, routing: &Routing, settings: &FrontendConfig, now: Duration) {
        self.table.handle_timeout(now);
        self.drain_events(routing, settings);
        let open: Vec<FlowId> = self.slots.iter().flatten().map(|f| f.id).collect();
        for flow in open {
            self.table.close(flow);
            self.finish(flow, Ending::Shutdown);
        }
        // The table may report the closes too; they find nothing left to do.
        while self.table.poll_event().is_some() {}
    }

    pub fn open_flows(&self) -> usize {
        self.slots.iter().flatten().count()
    }
}

/// The flow at `flow`'s slot, unless the slot is empty or holds another flow.
fn slot_of(slots: &mut [Option<FlowSlot>], flow: FlowId) -> Option<&mut FlowSlot> {
    slots
        .get_mut(flow.slot())
        .and_then(Option::as_mut)
        .filter(|f| f.id == flow)
}

/// Sends one client datagram on the flow's upstream, counting it.
fn send_upstream(
    f: &mut FlowSlot,
    payload: &[u8],
    byte_metrics: bool,
    metrics: &UdpFrontendHandles,
) {
    match send_connected(f.upstream_fd(), payload) {
        Ok(()) => {
            f.bytes_to_backend += payload.len() as u64;
            let m = &f.backend.metrics;
            m.sent_datagrams.inc();
            if byte_metrics {
                m.sent_bytes.inc_by(payload.len() as u64);
            }
        }
        Err(e) => {
            // A full send buffer, or the ICMP error of an earlier datagram
            // (the backend's port is closed): this datagram is lost.
            debug!(backend = %f.backend.name, error = %e, "upstream send failed");
            metrics.dropped(UdpDrop::UpstreamError).inc();
        }
    }
}
