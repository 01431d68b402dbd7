//! The control plane's I/O shell: one task owns the config, the probers, the
//! one timer and each frontend's [`HealthController`] (lb-core, where every
//! health decision is made and unit-tested). It feeds probe results, passive
//! failures, reloads and timeouts in, logs and counts the transitions that
//! come out, and builds and publishes a frontend's routing whenever its
//! controller says a rebuild is due. Owning all of it in one task means no
//! locks anywhere on the write side.
//!
//! It also owns which zones are down (lb-core's [`ZonesDown`]: the config's
//! `zones_down`, and the admin's `/zones/down`): a change rebuilds every hop
//! frontend's routing with those zones' nodes and pods out, then tells the
//! workers, which cut the flows through them ([`ZoneSignal`]).

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use lb_core::{
    AffinitySeeds, AffinityTable, BackendId, BackendSet, BackendSpec, ControlEvent, ControlPolicy,
    HealthController, HopModel, NodeSpec, ProbeOutcome, QuicRouter, Rebuild, ServerId, Snapshot,
    SnapshotParams, Transition, ZonesDown,
};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{info, warn};

use crate::config::{Config, FrontendConfig, FrontendProtocol, ProbeKind, QuicFrontendConfig};
use crate::k8s::source::{ConfigSource, SourceError};
use crate::metrics::Metrics;
use crate::probe::probe;
use crate::state::{
    BackendRuntime, CrossZoneCounter, Frontend, FrontendLinks, HealthKey, HopRouting,
    PassiveFailure, Routing, ZoneCommand, ZoneReply, ZoneSignal,
};

/// Most client IPs one node's kube-proxy affinity table remembers.
const AFFINITY_CAPACITY: usize = 65_536;

struct ProbeReport {
    epoch: u64,
    frontend: usize,
    target: HealthKey,
    outcome: ProbeOutcome,
}

/// Per-frontend state the control plane owns.
struct FrontendControl {
    /// Health of each target (each backend, or each pod endpoint with the hop
    /// model), readmission timers, and whether a rebuild is due.
    health: HealthController,
    /// By backend name (a node's name with the hop model).
    runtimes: HashMap<Arc<str>, Arc<BackendRuntime>>,
    /// By node name; kept across rebuilds so ClientIP pins survive.
    affinity: HashMap<String, Arc<Mutex<AffinityTable>>>,
    /// The affinity tables' hasher seeds, drawn once at startup.
    affinity_seeds: AffinitySeeds,
}

impl FrontendControl {
    fn new(affinity_seeds: AffinitySeeds) -> Self {
        FrontendControl {
            health: HealthController::new(),
            runtimes: HashMap::new(),
            affinity: HashMap::new(),
            affinity_seeds,
        }
    }
}

/// Seeds no client can guess, so none can pick source addresses that collide
/// in an affinity table. std's `RandomState` is keyed from the OS's random
/// source once per process (then stepped per instance); hashing a counter
/// with it draws 256 bits without another dependency.
///
/// The UDP flow tables draw theirs the same way, for the same reason.
pub fn draw_seeds() -> [u64; 4] {
    use std::hash::BuildHasher;
    let keyed = std::hash::RandomState::new();
    [0u64, 1, 2, 3].map(|i| keyed.hash_one(i))
}

/// What health probes target: each backend, or each pod endpoint with the hop model.
fn health_targets(fe: &FrontendConfig) -> Vec<(HealthKey, SocketAddr)> {
    match &fe.hop {
        None => fe
            .backends
            .iter()
            .map(|b| (HealthKey::Backend(Arc::from(b.name.as_str())), b.addr))
            .collect(),
        Some(hop) => hop
            .nodes
            .iter()
            .flat_map(|n| {
                let node: Arc<str> = Arc::from(n.name.as_str());
                n.endpoints
                    .iter()
                    .map(move |e| (endpoint_key(&node, e.addr), e.addr))
            })
            .collect(),
    }
}

/// How the frontend's health is decided: its thresholds, and without probes,
/// passive failures alone, with a hold-down of interval × rise before a target
/// they took down is tried again.
fn control_policy(fe: &FrontendConfig) -> ControlPolicy {
    let health = &fe.health;
    ControlPolicy {
        thresholds: health.thresholds,
        hold_down: (health.kind == ProbeKind::None)
            .then(|| health.interval * health.thresholds.rise.max(1)),
    }
}

fn endpoint_key(node: &Arc<str>, addr: SocketAddr) -> HealthKey {
    HealthKey::Endpoint {
        node: Arc::clone(node),
        addr,
    }
}

/// What the frontend's Maglev table is built over: the configured backends,
/// or the nodes with the hop model (the ALB's backend pool).
fn table_backends(fe: &FrontendConfig) -> Vec<BackendSpec> {
    match &fe.hop {
        None => fe.backends.clone(),
        Some(hop) => hop
            .nodes
            .iter()
            .map(|n| BackendSpec::new(n.name.clone(), SocketAddr::new(n.address, 0), 1))
            .collect(),
    }
}

pub struct Controller {
    metrics: Arc<Metrics>,
    config: Config,
    config_source: Option<ConfigSource>,
    frontends: Vec<Arc<Frontend>>,
    control: Vec<FrontendControl>,
    probers: JoinSet<()>,
    prober_epoch: u64,
    probe_tx: mpsc::Sender<ProbeReport>,
    probe_rx: mpsc::Receiver<ProbeReport>,
    passive_rx: mpsc::Receiver<PassiveFailure>,
    /// The zero of the controllers' clock: `now` is the time since.
    started: Instant,
    /// Which zones are down, by config and by admin (lb-core's model).
    zones: ZonesDown,
    /// Where the workers see the down zones, and the admin asks to change them.
    zone_signal: Arc<ZoneSignal>,
    zone_rx: mpsc::Receiver<ZoneCommand>,
    /// Zones with an `lb_zone_down` series, so one a reload forgets reads 0.
    zone_gauges: BTreeSet<String>,
}

/// A reload that was refused, with the reason `check` would print.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Load(#[from] SourceError),
    #[error("reload refused: {0} (restart the balancer to change listeners)")]
    ListenerChange(String),
    #[error("no config file to reload (started from flags)")]
    NoFile,
    #[error("reload failed building a snapshot: {0}")]
    Build(String),
}

impl Controller {
    /// Builds every frontend's first snapshot, with all backends up, so the
    /// balancer serves from its first accepted connection.
    pub fn new(
        config: Config,
        config_source: Option<ConfigSource>,
        listen_addrs: &[SocketAddr],
        metrics: Arc<Metrics>,
        flow_log: Option<Arc<crate::flowlog::FlowLog>>,
    ) -> anyhow::Result<Self> {
        let (probe_tx, probe_rx) = mpsc::channel(4096);
        let (passive_tx, passive_rx) = mpsc::channel(4096);
        let (zone_tx, zone_rx) = mpsc::channel(16);
        let zone_signal = Arc::new(ZoneSignal::new(zone_tx));
        let mut zones = ZonesDown::default();
        zones.set_config(config.zones_down.clone());
        let mut frontends = Vec::new();
        let mut control = Vec::new();
        let affinity_seeds: AffinitySeeds = draw_seeds();
        for (i, fe) in config.frontends.iter().enumerate() {
            let mut ctl = FrontendControl::new(affinity_seeds);
            ctl.health
                .handle_config(health_targets(fe), control_policy(fe), Duration::ZERO);
            let rebuild = ctl
                .health
                .poll_snapshot()
                .context("a first config makes a rebuild due")?;
            let routing = build_routing(&metrics, fe, &mut ctl, rebuild, zones.down())?;
            let mut handles = metrics.frontend(&fe.name);
            handles.udp = fe
                .protocol
                .is_udp()
                .then(|| metrics.udp_frontend(&fe.name, fe.protocol == FrontendProtocol::Quic));
            handles.table_generation.set(rebuild.generation as i64);
            frontends.push(Arc::new(Frontend::new(
                i,
                listen_addrs[i],
                fe.clone(),
                routing,
                handles,
                FrontendLinks {
                    passive_failures: passive_tx.clone(),
                    flow_log: flow_log.clone(),
                    zones: Arc::clone(&zone_signal),
                },
            )));
            control.push(ctl);
        }
        let mut controller = Controller {
            metrics,
            config,
            config_source,
            frontends,
            control,
            probers: JoinSet::new(),
            prober_epoch: 0,
            probe_tx,
            probe_rx,
            passive_rx,
            started: Instant::now(),
            zones,
            zone_signal,
            zone_rx,
            zone_gauges: BTreeSet::new(),
        };
        controller.publish_zones();
        Ok(controller)
    }

    pub fn frontends(&self) -> &[Arc<Frontend>] {
        &self.frontends
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Runs until `reloads` closes. Each message on `reloads` triggers a reload.
    pub async fn run(mut self, mut reloads: mpsc::Receiver<()>) {
        self.start_probers();
        loop {
            let deadline = self.next_deadline();
            tokio::select! {
                Some(report) = self.probe_rx.recv() => {
                    if report.epoch == self.prober_epoch {
                        self.handle_probe(report.frontend, &report.target, report.outcome);
                    }
                }
                Some(failure) = self.passive_rx.recv() => {
                    self.handle_connect_failure(failure.frontend, &failure.target);
                }
                () = sleep_until(deadline) => self.handle_timeouts(),
                Some(command) = self.zone_rx.recv() => {
                    let reply = self.change_zone(&command.zone, command.down);
                    let _ = command.reply.send(reply);
                }
                reload = reloads.recv() => {
                    if reload.is_none() {
                        break;
                    }
                    match self.reload() {
                        // Log before counting, so whoever sees the count can find the line.
                        Ok(()) => {
                            info!("config reloaded");
                            self.metrics.config_reloads.with_label_values(&["success"]).inc();
                        }
                        Err(e) => {
                            warn!("{e}; the previous config keeps serving");
                            self.metrics.config_reloads.with_label_values(&["failure"]).inc();
                        }
                    }
                }
            }
        }
        self.probers.abort_all();
    }

    /// One probe result for `target`, as a prober would report it (tests
    /// drive health with it, without probers).
    #[cfg(test)]
    pub(crate) fn probe_result(&mut self, frontend: usize, target: &HealthKey, up: bool) {
        let outcome = if up {
            ProbeOutcome::Success
        } else {
            ProbeOutcome::Failure
        };
        self.handle_probe(frontend, target, outcome);
    }

    /// The controllers' clock: time since the controller was made.
    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    fn handle_probe(&mut self, frontend: usize, target: &HealthKey, outcome: ProbeOutcome) {
        let now = self.now();
        let Some(ctl) = self.control.get_mut(frontend) else {
            return;
        };
        ctl.health.handle_probe_result(target, outcome, now);
        self.apply_decisions(frontend);
    }

    fn handle_connect_failure(&mut self, frontend: usize, target: &HealthKey) {
        let now = self.now();
        let Some(ctl) = self.control.get_mut(frontend) else {
            return;
        };
        ctl.health.handle_connect_failure(target, now);
        self.apply_decisions(frontend);
    }

    /// The earliest readmission any frontend's controller is waiting for.
    fn next_deadline(&self) -> Option<Instant> {
        let earliest = self
            .control
            .iter()
            .filter_map(|c| c.health.poll_timer())
            .min();
        earliest.map(|at| self.started + at)
    }

    fn handle_timeouts(&mut self) {
        let now = self.now();
        for frontend in 0..self.control.len() {
            self.control[frontend].health.handle_timeout(now);
            self.apply_decisions(frontend);
        }
    }

    /// Logs and counts the frontend's transitions, then rebuilds and
    /// publishes its routing if its controller says one is due.
    fn apply_decisions(&mut self, frontend: usize) {
        let fe_name = self.config.frontends[frontend].name.clone();
        while let Some(event) = self.control[frontend].health.poll_event() {
            self.report_transition(&fe_name, frontend, event);
        }
        if let Err(e) = self.republish(frontend) {
            warn!(frontend = %fe_name, "could not rebuild snapshot: {e}");
        }
    }

    fn report_transition(&self, fe_name: &str, frontend: usize, event: ControlEvent) {
        let ControlEvent {
            target,
            transition,
            cause,
        } = event;
        // Metrics are per backend: the backend itself, or the endpoint's node.
        if let Some(rt) = self.control[frontend].runtimes.get(target.backend()) {
            rt.metrics.health_transitions.inc();
        }
        match transition {
            Transition::WentDown => warn!(frontend = %fe_name, %target, ?cause, "marked down"),
            Transition::WentUp => info!(frontend = %fe_name, %target, ?cause, "marked up"),
        }
    }

    fn republish(&mut self, frontend: usize) -> anyhow::Result<()> {
        let ctl = &mut self.control[frontend];
        let Some(rebuild) = ctl.health.poll_snapshot() else {
            return Ok(());
        };
        let fe_cfg = &self.config.frontends[frontend];
        let routing = build_routing(&self.metrics, fe_cfg, ctl, rebuild, self.zones.down())?;
        let fe = &self.frontends[frontend];
        fe.metrics.table_generation.set(rebuild.generation as i64);
        fe.routing.publish(routing);
        Ok(())
    }

    fn reload(&mut self) -> Result<(), ReloadError> {
        let source = self.config_source.as_ref().ok_or(ReloadError::NoFile)?;
        let mut next = source.load()?;
        next.keep_running_accept_modes(|_, fe| {
            let running = self.config.frontends.iter().find(|o| o.name == fe.name);
            running.map(|o| o.accept)
        });
        listener_changes(&self.config, &next).map_err(ReloadError::ListenerChange)?;

        // Build everything first, publish only when all of it succeeded: each
        // frontend's controller takes the new config on a copy.
        let now = self.now();
        let mut zones = self.zones.clone();
        zones.set_config(next.zones_down.clone());
        let mut staged = Vec::with_capacity(next.frontends.len());
        for (i, fe) in next.frontends.iter().enumerate() {
            let old = &self.control[i];
            let old_cfg = &self.config.frontends[i];
            let mut ctl = FrontendControl::new(old.affinity_seeds);
            // Health carries over for targets whose name and address are
            // unchanged (the controller's rule), counters for backends whose
            // name and address are unchanged.
            ctl.health = old.health.clone();
            ctl.health
                .handle_config(health_targets(fe), control_policy(fe), now);
            let old_backends = table_backends(old_cfg);
            for m in table_backends(fe) {
                if old_backends
                    .iter()
                    .any(|o| o.name == m.name && o.addr == m.addr)
                {
                    if let Some(rt) = old.runtimes.get(m.name.as_str()) {
                        ctl.runtimes.insert(Arc::clone(&rt.name), Arc::clone(rt));
                    }
                }
            }
            ctl.affinity = old.affinity.clone();
            let rebuild = ctl
                .health
                .poll_snapshot()
                .ok_or_else(|| ReloadError::Build("a config made no rebuild due".to_owned()))?;
            let routing = build_routing(&self.metrics, fe, &mut ctl, rebuild, zones.down())
                .map_err(|e| ReloadError::Build(e.to_string()))?;
            staged.push((ctl, routing));
        }
        // A frontend the reload switches to sockmap: load the engine here, not on a worker's first flow.
        crate::tcp::sockmap::load_if_wanted(&next.frontends);
        for (i, (ctl, routing)) in staged.into_iter().enumerate() {
            let fe_name = &next.frontends[i].name;
            for (name, _) in self.control[i].runtimes.iter() {
                if !ctl.runtimes.contains_key(name) {
                    self.metrics.forget_backend(fe_name, name);
                }
            }
            let fe = &self.frontends[i];
            fe.settings.publish(next.frontends[i].clone());
            let generation = routing.snapshot.generation();
            fe.metrics.table_generation.set(generation as i64);
            fe.routing.publish(routing);
            self.control[i] = ctl;
        }
        crate::fds::set_reserve(next.fd_reserve);
        self.config = next;
        self.zones = zones;
        self.publish_zones();
        self.start_probers();
        Ok(())
    }

    /// An admin's zone action: every frontend's routing is rebuilt with the
    /// new set (health carries over), then the workers cut the flows through
    /// a zone that went down.
    fn change_zone(&mut self, zone: &str, down: bool) -> ZoneReply {
        if !known_zones(&self.config).contains(zone) {
            return ZoneReply::Unknown;
        }
        if !down && self.zones.held_by_config(zone) {
            return ZoneReply::HeldByConfig;
        }
        let changed = if down {
            self.zones.take_down(zone)
        } else {
            self.zones.bring_up(zone)
        };
        if changed {
            let verb = if down { "down" } else { "up" };
            info!(zone, "zone {verb} by admin action");
            self.rebuild_for_zones();
            self.publish_zones();
        }
        ZoneReply::Done { down, changed }
    }

    /// Makes every hop frontend's rebuild due with its unchanged targets and
    /// policy (so health and pending readmissions carry over) and publishes it.
    fn rebuild_for_zones(&mut self) {
        let now = self.now();
        for frontend in 0..self.control.len() {
            let fe = &self.config.frontends[frontend];
            if fe.hop.is_none() {
                continue;
            }
            self.control[frontend].health.handle_config(
                health_targets(fe),
                control_policy(fe),
                now,
            );
            self.apply_decisions(frontend);
        }
    }

    /// Tells the workers (which cut flows through a down zone) and the
    /// `lb_zone_down` gauges which zones are down.
    fn publish_zones(&mut self) {
        let down = self.zones.down();
        self.zone_signal.publish(down);
        self.zone_gauges.extend(known_zones(&self.config));
        self.zone_gauges.extend(down.iter().cloned());
        for zone in &self.zone_gauges {
            self.metrics
                .zone_down(zone)
                .set(i64::from(down.contains(zone)));
        }
    }

    fn start_probers(&mut self) {
        self.probers.abort_all();
        self.prober_epoch += 1;
        for (fi, fe) in self.config.frontends.iter().enumerate() {
            if fe.health.kind == ProbeKind::None {
                continue;
            }
            let targets = health_targets(fe);
            let count = targets.len().max(1) as u32;
            let start = tokio::time::Instant::now();
            for (position, (key, target)) in targets.into_iter().enumerate() {
                let addr = crate::probe::probe_address(target, fe.health.port);
                // Spread the targets' probes evenly over the interval, as HAProxy
                // spreads its checks: in lock-step, 100 backends meant 100 connects
                // in one burst every interval, and a scrape arriving then waited
                // behind all of them. Backends start up, so a later first probe only
                // delays noticing a dead one, by less than one interval.
                let phase = fe.health.interval * position as u32 / count;
                if !self.control[fi].health.contains(&key) {
                    continue;
                }
                let tx = self.probe_tx.clone();
                let (probe_cfg, epoch) = (fe.health.clone(), self.prober_epoch);
                self.probers.spawn(async move {
                    let mut ticker = tokio::time::interval_at(start + phase, probe_cfg.interval);
                    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
                    loop {
                        ticker.tick().await;
                        let Some(outcome) = probe(addr, &probe_cfg.kind, probe_cfg.timeout).await
                        else {
                            continue;
                        };
                        let report = ProbeReport {
                            epoch,
                            frontend: fi,
                            target: key.clone(),
                            outcome,
                        };
                        if tx.send(report).await.is_err() {
                            break;
                        }
                    }
                });
            }
        }
    }
}

/// Every zone a node of any frontend is in.
fn known_zones(config: &Config) -> BTreeSet<String> {
    config
        .frontends
        .iter()
        .filter_map(|fe| fe.hop.as_ref())
        .flat_map(|hop| hop.nodes.iter().filter_map(|n| n.zone.clone()))
        .collect()
}

/// Sleeps until `deadline`, or for ever without one: the control loop's
/// timer branch, which never fires while no readmission is pending.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Refuses reloads that would need new listening sockets.
fn listener_changes(old: &Config, new: &Config) -> Result<(), String> {
    if old.workers != new.workers {
        return Err(format!(
            "`workers` changed from {} to {}",
            old.workers, new.workers
        ));
    }
    if old.admin != new.admin {
        return Err("`admin` changed".to_owned());
    }
    let names = |c: &Config| {
        c.frontends
            .iter()
            .map(|f| f.name.clone())
            .collect::<Vec<_>>()
    };
    if names(old) != names(new) {
        return Err(format!(
            "the set of frontends changed from {:?} to {:?}",
            names(old),
            names(new)
        ));
    }
    for (o, n) in old.frontends.iter().zip(&new.frontends) {
        if o.listener_identity() != n.listener_identity() {
            return Err(format!(
                "frontend `{}` protocol/listen/backlog/accept changed from {:?} to {:?}",
                o.name,
                o.listener_identity(),
                n.listener_identity()
            ));
        }
        udp_table_changes(o, n)?;
    }
    Ok(())
}

/// A UDP frontend's flow tables are sized and timed when its workers start
/// (each worker owns its table, with the flows in it), so their bounds
/// cannot change under a reload; backends, health and distribution can.
fn udp_table_changes(old: &FrontendConfig, new: &FrontendConfig) -> Result<(), String> {
    if !old.protocol.is_udp() {
        return Ok(());
    }
    let bounds = |f: &FrontendConfig| (f.max_flows, f.udp_batch, f.idle_timeout);
    if bounds(old) != bounds(new) {
        return Err(format!(
            "frontend `{}` max_flows/udp_batch/idle_timeout changed from {:?} to {:?}",
            old.name,
            bounds(old),
            bounds(new)
        ));
    }
    Ok(())
}

/// Builds the frontend's routing snapshot for a due `rebuild` from its config
/// and health, resolving (or reusing) every backend's metric handles off the
/// hot path.
fn build_routing(
    metrics: &Metrics,
    fe: &FrontendConfig,
    ctl: &mut FrontendControl,
    rebuild: Rebuild,
    zones_down: &BTreeSet<String>,
) -> anyhow::Result<Routing> {
    let (params, backend_health, hop_model) = backend_health(fe, &ctl.health, zones_down)?;
    let set = BackendSet::new(table_backends(fe))?;
    let healthy: Vec<bool> = set
        .iter()
        .map(|spec| backend_health.get(&spec.name).copied().unwrap_or(false))
        .collect();
    let backends: Vec<Arc<BackendRuntime>> = set
        .iter()
        .map(|spec| backend_runtime(metrics, &fe.name, spec, &mut ctl.runtimes))
        .collect();
    let snapshot = Snapshot::build(rebuild.generation, params, set, healthy)?;
    set_table_gauges(&snapshot, &backends);
    let hop = hop_model.map(|model| {
        let mut hop = hop_routing(
            model,
            fe.cross_zone_rtt,
            &mut ctl.affinity,
            ctl.affinity_seeds,
        );
        hop.cross_zone_counters = cross_zone_counters(metrics, &fe.name, &hop.zones);
        hop
    });
    let quic = fe
        .quic
        .as_ref()
        .map(|q| quic_router(q, snapshot.backends()));
    Ok(Routing {
        snapshot,
        backends,
        hop,
        quic,
    })
}

/// `lb_cross_zone_connections_total`'s handles for every ordered pair of
/// different zones among the nodes (zones are few).
fn cross_zone_counters(
    metrics: &Metrics,
    frontend: &str,
    zones: &[Option<Arc<str>>],
) -> Vec<CrossZoneCounter> {
    let distinct: BTreeSet<Arc<str>> = zones.iter().flatten().cloned().collect();
    let mut pairs = Vec::new();
    for from in &distinct {
        for to in distinct.iter().filter(|to| *to != from) {
            pairs.push(CrossZoneCounter {
                from: Arc::clone(from),
                to: Arc::clone(to),
                counter: metrics.cross_zone_connections(frontend, from, to),
            });
        }
    }
    pairs
}

/// The QUIC frontend's server ID → backend id map for this snapshot's
/// backends (ids are positions in the name-sorted set, so they are looked up
/// by name on every build).
fn quic_router(quic: &QuicFrontendConfig, set: &BackendSet) -> QuicRouter {
    let ids: Vec<(BackendId, ServerId)> = quic
        .server_ids
        .iter()
        .filter_map(|(name, sid)| Some((set.id_of(name)?, *sid)))
        .collect();
    QuicRouter::new(quic.lb, &ids)
}

/// Each backend's health by name, the table's parameters, and the hop model
/// when there is one. Every target is the controller's (it took this
/// config), and one never probed yet is up.
///
/// With the hop model, pod readiness is config readiness AND probe health,
/// and a node's health as a backend is whether Azure's probe would find the
/// node eligible; ClientIP affinity also switches the table's mode.
fn backend_health(
    fe: &FrontendConfig,
    health: &HealthController,
    zones_down: &BTreeSet<String>,
) -> anyhow::Result<(SnapshotParams, HashMap<String, bool>, Option<HopModel>)> {
    let healthy_target = |key: HealthKey| -> bool { health.is_up(&key) };
    let Some(hop) = &fe.hop else {
        let health = fe
            .backends
            .iter()
            .map(|b| {
                let up = healthy_target(HealthKey::Backend(Arc::from(b.name.as_str())));
                (b.name.clone(), up)
            })
            .collect();
        return Ok((fe.params, health, None));
    };
    let nodes: Vec<NodeSpec> = hop
        .nodes
        .iter()
        .map(|n| {
            let mut n = n.clone();
            let node: Arc<str> = Arc::from(n.name.as_str());
            for e in n.endpoints.iter_mut() {
                e.ready = e.ready && healthy_target(endpoint_key(&node, e.addr));
            }
            n
        })
        .collect();
    let model = HopModel::with_zones_down(nodes, hop.service, zones_down)?;
    let health = model
        .nodes()
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.clone(), model.node_eligible(i as u32)))
        .collect();
    let params = SnapshotParams {
        mode: model.effective_mode(fe.params.mode),
        ..fe.params
    };
    Ok((params, health, Some(model)))
}

/// The backend's runtime handle: the one kept from the last build (so its
/// counters carry on), or a new one with its metric handles resolved.
fn backend_runtime(
    metrics: &Metrics,
    frontend: &str,
    spec: &BackendSpec,
    runtimes: &mut HashMap<Arc<str>, Arc<BackendRuntime>>,
) -> Arc<BackendRuntime> {
    if let Some(rt) = runtimes.get(spec.name.as_str()) {
        return Arc::clone(rt);
    }
    let rt = Arc::new(BackendRuntime {
        name: Arc::from(spec.name.as_str()),
        addr: spec.addr,
        metrics: metrics.backend(frontend, &spec.name),
    });
    runtimes.insert(Arc::clone(&rt.name), Arc::clone(&rt));
    rt
}

/// `up`, `weight` and `table_slots` of every backend, as the snapshot has them.
fn set_table_gauges(snapshot: &Snapshot, backends: &[Arc<BackendRuntime>]) {
    let slots = snapshot.table().slot_counts(backends.len());
    for (id, rt) in backends.iter().enumerate() {
        rt.metrics.up.set(snapshot.is_healthy(id as u32) as i64);
        rt.metrics
            .weight
            .set(i64::from(snapshot.backends().as_slice()[id].weight));
        rt.metrics.table_slots.set(i64::from(slots[id]));
    }
}

/// The hop model with each node's affinity table (kept across rebuilds, so
/// ClientIP pins survive), each endpoint's health key and each node's zone.
fn hop_routing(
    model: HopModel,
    cross_zone_rtt: Duration,
    affinity: &mut HashMap<String, Arc<Mutex<AffinityTable>>>,
    seeds: AffinitySeeds,
) -> HopRouting {
    let affinity = model
        .nodes()
        .iter()
        .map(|n| {
            Arc::clone(affinity.entry(n.name.clone()).or_insert_with(|| {
                Arc::new(Mutex::new(AffinityTable::new(AFFINITY_CAPACITY, seeds)))
            }))
        })
        .collect();
    let endpoint_keys = model
        .nodes()
        .iter()
        .map(|n| {
            let node: Arc<str> = Arc::from(n.name.as_str());
            n.endpoints
                .iter()
                .map(|e| endpoint_key(&node, e.addr))
                .collect()
        })
        .collect();
    let zones = model
        .nodes()
        .iter()
        .map(|n| n.zone.as_deref().map(Arc::from))
        .collect();
    HopRouting {
        model,
        affinity,
        endpoint_keys,
        zones,
        cross_zone_rtt,
        cross_zone_counters: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAB: &str = r#"
[[frontends]]
name = "lab"
listen = "127.0.0.1:0"

[frontends.health]
kind = "tcp"
fall = 1
rise = 1

[[frontends.nodes]]
name = "node-a"
address = "127.0.1.1"
endpoints = ["127.0.2.1:8000"]

[[frontends.nodes]]
name = "node-b"
address = "127.0.1.2"
endpoints = ["127.0.2.2:8000"]
"#;

    #[test]
    fn endpoint_transitions_count_on_their_node_whatever_its_name() {
        let mut config = crate::config::parse("lab.toml", LAB).unwrap();
        // Past validation (which refuses it now), a name the old joined
        // `node/endpoint` key split in the wrong place.
        let hop = config.frontends[0].hop.as_mut().unwrap();
        hop.nodes[0].name = "a/b".to_owned();
        let metrics = Arc::new(Metrics::new());
        let listen = ["127.0.0.1:8080".parse().unwrap()];
        let mut ctl = Controller::new(config, None, &listen, Arc::clone(&metrics), None).unwrap();
        let transitions = |node: &str| metrics.backend("lab", node).health_transitions.get();

        let endpoint = |node: &str, addr: &str| HealthKey::Endpoint {
            node: Arc::from(node),
            addr: addr.parse().unwrap(),
        };
        ctl.probe_result(0, &endpoint("a/b", "127.0.2.1:8000"), false);
        ctl.probe_result(0, &endpoint("a/b", "127.0.2.1:8000"), true);
        ctl.probe_result(0, &endpoint("node-b", "127.0.2.2:8000"), false);
        assert_eq!((transitions("a/b"), transitions("node-b")), (2, 1));
    }

    /// Zone actions: an unknown zone and one the config holds down are
    /// refused; taking a zone down takes its node out of the table and its
    /// pod out of the other node's choice, and bringing it up restores both.
    #[test]
    fn zone_actions_rebuild_routing_without_the_zone() {
        let zoned = LAB
            .replace(
                "address = \"127.0.1.1\"",
                "address = \"127.0.1.1\"\nzone = \"1\"",
            )
            .replace(
                "address = \"127.0.1.2\"",
                "address = \"127.0.1.2\"\nzone = \"2\"",
            );
        let config =
            crate::config::parse("z.toml", &format!("zones_down = [\"2\"]\n{zoned}")).unwrap();
        let metrics = Arc::new(Metrics::new());
        let listen = ["127.0.0.1:8080".parse().unwrap()];
        let mut ctl = Controller::new(config, None, &listen, Arc::clone(&metrics), None).unwrap();
        let frontend = Arc::clone(&ctl.frontends()[0]);
        let state = || {
            let routing = frontend.routing.load();
            let hop = routing.hop.as_ref().unwrap();
            let healthy = routing.snapshot.health().to_vec();
            let from_a = hop.model.endpoints_from(0).len();
            (healthy, from_a)
        };
        let gauge = |zone: &str| metrics.zone_down(zone).get();
        assert_eq!(state(), (vec![true, false], 1), "zone 2 down by config");
        assert_eq!((gauge("1"), gauge("2")), (0, 1));
        assert_eq!(ctl.change_zone("9", true), ZoneReply::Unknown);
        assert_eq!(ctl.change_zone("2", false), ZoneReply::HeldByConfig);

        ctl.zones.set_config(BTreeSet::new());
        ctl.rebuild_for_zones();
        ctl.publish_zones();
        assert_eq!(state(), (vec![true, true], 2), "both zones up");
        let done = |changed| ZoneReply::Done {
            down: true,
            changed,
        };
        assert_eq!(ctl.change_zone("1", true), done(true));
        assert_eq!(ctl.change_zone("1", true), done(false));
        assert_eq!(state(), (vec![false, true], 1), "zone 1 down by the admin");
        assert_eq!((gauge("1"), gauge("2")), (1, 0));
        assert!(frontend.zones.down().iter().any(|z| &**z == "1"));
    }

    /// Polls `condition` until it holds or `limit` passes; whether it held.
    async fn wait_until(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + limit;
        while !condition() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    /// The readmission timer is the controller's now: the run loop must sleep
    /// until its deadline and fire it, not before the hold-down, and not never.
    #[tokio::test]
    async fn the_run_loop_readmits_a_passively_failed_backend_after_the_hold_down() {
        const PASSIVE: &str = "[[frontends]]\nname = \"p\"\nlisten = \"127.0.0.1:0\"\n\
            [frontends.health]\nkind = \"none\"\ninterval = \"1s\"\nfall = 1\nrise = 1\n\
            [[frontends.backends]]\nname = \"a\"\naddress = \"127.0.0.1:9101\"\n\
            [[frontends.backends]]\nname = \"b\"\naddress = \"127.0.0.1:9102\"\n";
        let hold = Duration::from_secs(1); // interval x rise
        let config = crate::config::parse("p.toml", PASSIVE).unwrap();
        let metrics = Arc::new(Metrics::new());
        let listen = ["127.0.0.1:8080".parse().unwrap()];
        let ctl = Controller::new(config, None, &listen, Arc::clone(&metrics), None).unwrap();
        let frontend = Arc::clone(&ctl.frontends()[0]);
        let (_reload_tx, reloads) = mpsc::channel(1);
        let run = tokio::spawn(ctl.run(reloads));
        let state = || {
            let routing = frontend.routing.load();
            let a = routing.snapshot.backends().id_of("a").unwrap();
            (
                routing.snapshot.generation(),
                routing.snapshot.is_healthy(a),
            )
        };
        assert_eq!(state(), (1, true));

        let failed_at = Instant::now();
        let target = HealthKey::Backend(Arc::from("a"));
        let failure = PassiveFailure {
            frontend: 0,
            target,
        };
        frontend.passive_failures.send(failure).await.unwrap();
        assert!(
            wait_until(hold, || state().0 > 1).await,
            "no rebuild after the failure"
        );
        assert_eq!(state(), (2, false), "one failure (fall = 1) takes it down");
        assert!(
            wait_until(5 * hold, || state().0 > 2).await,
            "never readmitted"
        );
        assert_eq!(state(), (3, true));
        let took = failed_at.elapsed();
        assert!(
            took >= hold,
            "readmitted after {took:?}, inside the hold-down"
        );
        assert_eq!(metrics.backend("p", "a").health_transitions.get(), 2);
        run.abort();
    }

    /// A reload may change a UDP frontend's backends, but not what its
    /// sockets or its workers' flow tables were made with.
    #[test]
    fn reloads_refuse_protocol_and_udp_table_changes_and_take_the_rest() {
        const UDP: &str =
            "[[frontends]]\nname = \"u\"\nlisten = \"127.0.0.1:8053\"\nprotocol = \"udp\"\n\
            [[frontends.backends]]\nname = \"a\"\naddress = \"127.0.0.1:9101\"\n";
        let old = crate::config::parse("u.toml", UDP).unwrap();
        let with = |edit: &dyn Fn(&mut FrontendConfig)| {
            let mut next = old.clone();
            edit(&mut next.frontends[0]);
            listener_changes(&old, &next)
        };
        assert!(with(&|f| f.backends[0].weight = 5).is_ok());
        let e = with(&|f| f.max_flows += 1).unwrap_err();
        assert!(e.contains("max_flows"), "{e}");
        assert!(with(&|f| f.udp_batch = 1).is_err());
        assert!(with(&|f| f.idle_timeout *= 2).is_err());
        let e = with(&|f| f.protocol = FrontendProtocol::Tcp).unwrap_err();
        assert!(e.contains("protocol"), "{e}");
    }
}
