//! One worker's loop for one UDP or QUIC frontend. It owns everything it
//! touches (socket, flow table, upstreams, buffers), so nothing is shared,
//! locked or reference-counted per datagram; it waits on five things:
//!
//! - client datagrams on the frontend socket: a batch is received, each
//!   datagram routed (QUIC step, then the flow table) and sent on its flow's
//!   upstream;
//! - replies: the epoll set of upstream sockets says which flows have some;
//!   they are read straight into the reply batch and sent to their clients
//!   from the frontend socket in one call;
//! - a tick every [`TICK`]: a new snapshot generation (health change or
//!   reload) is applied even with no traffic, so flows move off a backend
//!   that went down, and all end when none is up, within one tick; idle
//!   flows expire;
//! - the delay line's timer, while datagrams of cross-zone flows are held
//!   ([`crate::udp::delay`]): those due go on to their pods and clients;
//! - the shutdown phase: at `Draining` datagrams of new flows are dropped
//!   while existing flows go on (and, on QUIC frontends, datagrams whose
//!   connection ID routes: a client migrating mid-drain keeps its
//!   connection); at `Cut` every flow ends and is logged. The socket stays
//!   open while draining, deliberately (see [`crate::udp`]). After a
//!   hand-over to a new process ([`crate::upgrade`]) the worker stops reading
//!   it (the new process does), while its flows' replies still leave through
//!   it until the drain ends.
//!
//! Zones: before each batch and at each tick the worker compares two
//! numbers, the zone signal's generation ([`crate::state::ZoneSignal`]) and
//! the routing snapshot's; when either moved, it ends every flow whose node
//! or pod is in a down zone (logged `zone_down`), before the table applies
//! the new snapshot, so a flow through a failed node ends rather than
//! moves. No lock, and nothing per datagram.
//!
//! The frontend's settings are taken up again at every tick, so a reload's
//! `byte_metrics` and `client_address` reach this plane as they reach TCP's
//! (the flow table's bounds cannot change on reload).
//!
//! `source_ranges`: a datagram from a client outside them that belongs to no
//! flow is dropped and counted (`lb_udp_dropped_datagrams_total{reason="source_range"}`)
//! before anything else looks at it ([`source_allowed`]). The list is read
//! once per received batch (one lock-free load), so a reload's list applies
//! from the next batch, as it does from the next accept on TCP.

use std::future::poll_fn;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use lb_core::{CidRoute, FlowDecision, FlowKey, SourceRanges, UdpFlowConfig, UdpFlowTable};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tracing::debug;

use crate::config::{FrontendConfig, MAX_UDP_BATCH};
use crate::metrics::UdpDrop;
use crate::shutdown::Phase;
use crate::state::{Frontend, HopRouting, Routing};
use crate::target::process_clock;
use crate::tcp::delay::HoldTimer;
use crate::udp::flows::Flows;
use crate::udp::quic::QuicStep;
use crate::udp::socket::Batch;
use crate::udp::upstream::{Poller, Ready};

/// How often a worker looks for a new snapshot and for idle flows: a
/// backend going down moves its flows within this, with or without traffic.
pub const TICK: Duration = Duration::from_millis(50);

/// How long a worker pauses after an unexpected socket error, so a
/// persistent one cannot spin it.
const ERROR_PAUSE: Duration = Duration::from_millis(10);

/// A worker's share of a frontend's flow bound: `max_flows` split evenly,
/// at least one each.
pub fn table_capacity(max_flows: usize, workers: usize) -> usize {
    (max_flows / workers.max(1)).max(1)
}

pub struct UdpWorker {
    socket: UdpSocket,
    frontend: Arc<Frontend>,
    settings: Arc<FrontendConfig>,
    /// Client datagrams, received together.
    inbound: Batch,
    /// Replies on their way to clients, sent together.
    outbound: Batch,
    ready: Ready,
    flows: Flows,
    quic: Option<QuicStep>,
    phase: watch::Receiver<Phase>,
    draining: bool,
    /// Whether this worker receives on the frontend socket: not once
    /// another process has taken it over.
    reading: bool,
    /// The zone signal's generation this worker last acted on.
    zones_seen: u64,
    /// The delay line's timer, made when a cross-zone datagram is first held.
    hold_timer: Option<HoldTimer>,
}

impl UdpWorker {
    /// Registers the socket and the upstream epoll set with the current
    /// runtime; the flow table gets this worker's share of `max_flows` and
    /// hasher seeds of its own.
    pub fn new(
        socket: std::net::UdpSocket,
        frontend: Arc<Frontend>,
        workers: usize,
        mut phase: watch::Receiver<Phase>,
    ) -> io::Result<Self> {
        let settings = frontend.settings.load_full();
        let metrics = frontend.metrics.udp.clone().ok_or_else(|| {
            io::Error::other(format!("frontend `{}` has no UDP metrics", frontend.name))
        })?;
        let quic = metrics.quic.clone().map(QuicStep::new);
        let table = UdpFlowTable::new(
            UdpFlowConfig {
                capacity: table_capacity(settings.max_flows, workers),
                idle_timeout: settings.idle_timeout,
            },
            crate::control::draw_seeds(),
        );
        let batch = settings.udp_batch.clamp(1, MAX_UDP_BATCH);
        phase.borrow_and_update();
        Ok(UdpWorker {
            socket: UdpSocket::from_std(socket)?,
            inbound: Batch::new(batch),
            outbound: Batch::new(batch),
            ready: Ready::new(batch),
            flows: Flows::new(table, Arc::clone(&frontend), metrics)?,
            quic,
            frontend,
            settings,
            phase,
            draining: false,
            reading: true,
            zones_seen: 0,
            hold_timer: None,
        })
    }

    /// Serves until the shutdown phase reaches `Cut`, then ends every flow.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while self.turn(Some(&mut tick)).await {}
        self.end_flows();
    }

    /// One wait of the loop and what it brought; false once the phase is
    /// `Cut`. Without `tick` nothing else ticks the worker (tests drive it
    /// so: no tick can run between the steps they take).
    pub(crate) async fn turn(&mut self, tick: Option<&mut tokio::time::Interval>) -> bool {
        let due = self.flows.next_due();
        if due.is_some() && self.hold_timer.is_none() {
            self.hold_timer = Some(HoldTimer::new());
        }
        // Unbiased: under a sustained flood of client datagrams, replies,
        // held datagrams and the tick still get their turn.
        tokio::select! {
            changed = self.phase.changed() => {
                let phase = if changed.is_ok() { *self.phase.borrow_and_update() } else { Phase::Cut };
                match phase {
                    Phase::Running => {}
                    Phase::Draining => {
                        self.draining = true;
                        self.reading = !crate::upgrade::listeners_handed_over();
                    }
                    Phase::Cut => return false,
                }
            }
            got = receive(&self.socket, &mut self.inbound), if self.reading => match got {
                Ok(_) => self.on_client_datagrams(),
                Err(e) => {
                    debug!(frontend = %self.frontend.name, error = %e, "receive failed");
                    tokio::time::sleep(ERROR_PAUSE).await;
                }
            },
            got = ready_upstreams(&self.flows.poller, &mut self.ready) => match got {
                Ok(_) => self.on_replies().await,
                Err(e) => {
                    debug!(frontend = %self.frontend.name, error = %e, "epoll_wait failed");
                    tokio::time::sleep(ERROR_PAUSE).await;
                }
            },
            _ = held_until(self.hold_timer.as_mut(), due) => self.on_held_due().await,
            _ = next_tick(tick) => {
                // A hand-over that a signal's drain overtook marks itself
                // without a phase change: look again at each tick.
                if self.draining && self.reading && crate::upgrade::listeners_handed_over() {
                    self.reading = false;
                }
                self.on_tick()
            }
        }
        true
    }

    /// Ends every flow of this worker (the cut), each with its record.
    pub(crate) fn end_flows(&mut self) {
        let open = self.flows.open_flows();
        let routing = self.frontend.routing.load();
        self.flows
            .close_all(&routing, &self.settings, process_clock());
        debug!(frontend = %self.frontend.name, open, "ended the UDP flows of this worker");
    }

    /// Routes and forwards one received batch. The table's events are acted
    /// on right after each of its calls, before its decision: a slot the
    /// call freed (an expiry) is empty again before a new flow takes it, and
    /// a flow a snapshot moved has its new upstream before its own
    /// datagrams later in the batch are forwarded.
    fn on_client_datagrams(&mut self) {
        let routing = self.frontend.routing.load();
        // Per batch, not per tick: a reload's list applies from the next batch.
        let settings_now = self.frontend.settings.load();
        let ranges = settings_now.source_ranges.as_ref();
        let now = process_clock();
        self.flows
            .metrics
            .received_datagrams
            .inc_by(self.inbound.len() as u64);
        self.end_zone_down_flows(&routing);
        if self.draining {
            // Flows idle past their time end first: none of them is a flow to serve.
            self.flows.table.handle_timeout(now);
            self.flows.drain_events(&routing, &self.settings);
        }
        for i in 0..self.inbound.len() {
            let Some(client) = self.inbound.source(i) else {
                continue;
            };
            let key = self.flows.key(client);
            if !source_allowed(ranges, &self.flows.table, client.ip(), &key) {
                self.flows.metrics.dropped(UdpDrop::SourceRange).inc();
                continue;
            }
            let Some(decision) = self.decide(i, &key, &routing, now) else {
                continue;
            };
            self.flows.drain_events(&routing, &self.settings);
            let payload = self.inbound.payload(i);
            self.flows
                .apply(decision, &key, payload, &routing, &self.settings);
        }
        self.inbound.clear();
    }

    /// The table's decision for datagram `i` of the batch, or `None` when it
    /// is dropped (counted). While draining, only existing flows and, for
    /// QUIC, datagrams whose connection ID routes to a healthy backend (a
    /// client migrating to a new address) are served.
    fn decide(
        &mut self,
        i: usize,
        key: &FlowKey,
        routing: &Routing,
        now: Duration,
    ) -> Option<FlowDecision> {
        let payload = self.inbound.payload(i);
        let table = &mut self.flows.table;
        let metrics = &self.flows.metrics;
        let route = match &mut self.quic {
            Some(step) => Some(step.route(payload, routing, metrics)?),
            None => None,
        };
        let by_cid = matches!(route, Some(CidRoute::Backend { .. }));
        if self.draining && !by_cid && table.lookup(key).is_none() {
            // Draining takes no new flow: no backend is offered one.
            metrics.dropped(UdpDrop::NoBackend).inc();
            return None;
        }
        Some(match (&mut self.quic, route) {
            (Some(step), Some(route)) => step.decide(route, key, &routing.snapshot, table, now),
            _ => table.handle_datagram(key, &routing.snapshot, now),
        })
    }

    /// Reads the replies of every ready upstream into the reply batch, and
    /// sends them to their clients from the frontend socket.
    async fn on_replies(&mut self) {
        let routing = self.frontend.routing.load();
        let now = process_clock();
        for k in 0..self.ready.len() {
            if self.outbound.is_full() {
                self.flush().await;
            }
            let slot = self.ready.slot(k);
            self.read_replies(slot, now);
            // A reply's table call may expire idle flows: end them now, not
            // after a later call has reused their slots.
            self.flows.drain_events(&routing, &self.settings);
        }
        self.flush().await;
    }

    /// One read of one flow's upstream, as many datagrams as the reply batch has room for.
    fn read_replies(&mut self, slot: usize, now: Duration) {
        let byte_metrics = self.settings.byte_metrics;
        let Some(flow) = self.flows.slot_mut(slot) else {
            return;
        };
        let start = self.outbound.len();
        match self.outbound.recv(flow.upstream_fd(), usize::MAX) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                // The ICMP error of an earlier datagram (the target's port is
                // closed): reading it clears it; the flow stays, as Azure's would.
                debug!(backend = %flow.backend.name, error = %e, "upstream reported an error");
                return;
            }
        }
        let mut bytes = 0;
        for i in start..self.outbound.len() {
            bytes += self.outbound.payload(i).len() as u64;
            self.outbound.set_destination(i, &flow.client_raw);
        }
        let got = (self.outbound.len() - start) as u64;
        flow.bytes_from_backend += bytes;
        let m = &flow.backend.metrics;
        m.received_datagrams.inc_by(got);
        if byte_metrics {
            m.received_bytes.inc_by(bytes);
        }
        let id = flow.id();
        // Across zones the replies wait in the delay line, not in this batch.
        self.flows.hold_replies(slot, &mut self.outbound, start);
        self.flows.table.handle_reply(id, now);
    }

    /// Sends on every held datagram whose time has come: client datagrams to
    /// their pods, replies to their clients in batches.
    async fn on_held_due(&mut self) {
        let byte_metrics = self.settings.byte_metrics;
        loop {
            self.flows.release_due(
                tokio::time::Instant::now(),
                &mut self.outbound,
                byte_metrics,
                &self.frontend.metrics.cross_zone_delay,
            );
            let more = self.outbound.is_full();
            self.flush().await;
            if !more {
                return;
            }
        }
    }

    /// Ends the flows through a down zone when the zone signal or the
    /// routing snapshot changed since last time (two compares otherwise).
    /// The down zones are the signal's and the snapshot's own (its hop model
    /// marks a down zone's nodes), so a snapshot that took a zone out is
    /// acted on even before the signal that follows it is seen.
    fn end_zone_down_flows(&mut self, routing: &Routing) {
        let signal = &self.frontend.zones;
        let generation = signal.generation();
        let newer_snapshot = self.flows.table.generation() != Some(routing.snapshot.generation());
        if generation == self.zones_seen && !newer_snapshot {
            return;
        }
        self.zones_seen = generation;
        let Some(hop) = &routing.hop else {
            return;
        };
        let down = signal.down();
        let ended = self
            .flows
            .end_through_down_zones(|zone| down.contains(zone) || is_zone_down(hop, zone));
        if ended > 0 {
            debug!(frontend = %self.frontend.name, ended, "ended the UDP flows through a down zone");
        }
        self.flows.drain_events(routing, &self.settings);
    }

    /// Sends the reply batch, waiting for room in the socket if the kernel
    /// has none; a datagram the kernel refuses is counted and skipped.
    async fn flush(&mut self) {
        let fd = self.socket.as_raw_fd();
        let mut from = 0;
        while from < self.outbound.len() {
            let outbound = &mut self.outbound;
            let sent = self
                .socket
                .async_io(Interest::WRITABLE, || outbound.send_to_all(fd, from))
                .await;
            match sent {
                Ok(n) => from += n.max(1),
                Err(e) => {
                    debug!(frontend = %self.frontend.name, error = %e, "reply send failed");
                    self.flows.metrics.dropped(UdpDrop::SendError).inc();
                    from += 1;
                }
            }
        }
        self.outbound.clear();
    }

    /// Takes up the frontend's settings as a reload left them (byte
    /// counting from now on, the client address for new flows), applies a
    /// new snapshot (moves, ends) and expires idle flows.
    pub(crate) fn on_tick(&mut self) {
        self.settings = self.frontend.settings.load_full();
        let routing = self.frontend.routing.load();
        let now = process_clock();
        self.end_zone_down_flows(&routing);
        self.flows.trim_delay_lines();
        let table = &mut self.flows.table;
        if table.generation() != Some(routing.snapshot.generation()) {
            table.handle_snapshot(&routing.snapshot, now);
        }
        if table.poll_timeout().is_some_and(|at| at <= now) {
            table.handle_timeout(now);
        }
        self.flows.drain_events(&routing, &self.settings);
    }
}

/// Whether a datagram from `client` may go on: no `source_ranges`, a client
/// inside them, or a flow that already exists. The last is only ever a flow
/// a narrowing reload found open (a disallowed client never opens one): a
/// stateful NSG keeps the flows it allowed when its rules change, as TCP
/// connections already accepted are kept. Everything else is dropped before
/// the QUIC step and the table, so no flow is created.
fn source_allowed(
    ranges: Option<&SourceRanges>,
    table: &UdpFlowTable,
    client: IpAddr,
    key: &FlowKey,
) -> bool {
    ranges.is_none_or(|r| r.contains(client) || table.lookup(key).is_some())
}

/// The next tick, or never when there is no ticker.
async fn next_tick(tick: Option<&mut tokio::time::Interval>) {
    match tick {
        Some(tick) => drop(tick.tick().await),
        None => std::future::pending().await,
    }
}

/// Waits until `due`, the delay line's next due time, on its timer; never
/// without one.
async fn held_until(timer: Option<&mut HoldTimer>, due: Option<tokio::time::Instant>) {
    match (timer, due) {
        (Some(timer), Some(due)) => poll_fn(|cx| timer.poll_until(cx, due)).await,
        _ => std::future::pending().await,
    }
}

/// Whether the routing's hop model has `zone` down: a down zone's nodes are
/// marked down in it. Zones and nodes are few; called once per change.
fn is_zone_down(hop: &HopRouting, zone: &str) -> bool {
    hop.zones
        .iter()
        .enumerate()
        .any(|(n, z)| z.as_deref() == Some(zone) && hop.model.is_node_down(n as u32))
}

/// Waits for client datagrams and receives a batch of them.
async fn receive(socket: &UdpSocket, batch: &mut Batch) -> io::Result<usize> {
    let fd = socket.as_raw_fd();
    let max = batch.capacity();
    socket
        .async_io(Interest::READABLE, || batch.recv(fd, max))
        .await
}

/// Waits until some upstream socket has replies; fills `ready` with their slots.
async fn ready_upstreams(
    poller: &tokio::io::unix::AsyncFd<Poller>,
    ready: &mut Ready,
) -> io::Result<usize> {
    poller.async_io(Interest::READABLE, |p| p.wait(ready)).await
}
