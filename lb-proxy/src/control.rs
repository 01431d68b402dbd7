//! The control plane: one task owns health state and config, turns probe
//! results, passive failures and reloads into new snapshots, and publishes them.
//! Owning all of it in one task means no locks anywhere on the write side.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use lb_core::{
    AffinityTable, BackendSet, BackendSpec, HealthState, HopModel, NodeSpec, ProbeOutcome,
    Snapshot, SnapshotParams, Transition,
};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{info, warn};

use crate::config::{self, Config, FrontendConfig, ProbeKind};
use crate::metrics::Metrics;
use crate::probe::probe;
use crate::state::{BackendRuntime, Frontend, HopRouting, PassiveFailure, Routing};

/// Most client IPs one node's kube-proxy affinity table remembers.
const AFFINITY_CAPACITY: usize = 65_536;

#[derive(Debug, Clone, Copy)]
enum HealthEvent {
    Probe(ProbeOutcome),
    /// The passive-only hold-down is over: let the backend back in.
    Readmit,
}

struct ProbeReport {
    epoch: u64,
    frontend: usize,
    target: Arc<str>,
    event: HealthEvent,
}

/// Per-frontend state the control plane owns.
struct FrontendControl {
    /// By health target: backend name, or `node/endpoint` with the hop model.
    health: HashMap<Arc<str>, HealthState>,
    /// By pool member: backend name, or node name with the hop model.
    runtimes: HashMap<Arc<str>, Arc<BackendRuntime>>,
    /// By node name; kept across rebuilds so ClientIP pins survive.
    affinity: HashMap<String, Arc<Mutex<AffinityTable>>>,
    generation: u64,
}

impl FrontendControl {
    fn new(generation: u64) -> Self {
        FrontendControl {
            health: HashMap::new(),
            runtimes: HashMap::new(),
            affinity: HashMap::new(),
            generation,
        }
    }
}

/// What health probes target: each backend, or each pod endpoint with the hop model.
fn health_targets(fe: &FrontendConfig) -> Vec<(String, SocketAddr)> {
    match &fe.hop {
        None => fe
            .backends
            .iter()
            .map(|b| (b.name.clone(), b.addr))
            .collect(),
        Some(hop) => hop
            .nodes
            .iter()
            .flat_map(|n| {
                n.endpoints
                    .iter()
                    .map(move |e| (endpoint_key(&n.name, e.addr), e.addr))
            })
            .collect(),
    }
}

fn endpoint_key(node: &str, addr: SocketAddr) -> String {
    format!("{node}/{addr}")
}

/// The ALB's pool: the backends, or the nodes with the hop model.
fn pool_members(fe: &FrontendConfig) -> Vec<BackendSpec> {
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
    config_path: Option<PathBuf>,
    frontends: Vec<Arc<Frontend>>,
    control: Vec<FrontendControl>,
    probers: JoinSet<()>,
    prober_epoch: u64,
    probe_tx: mpsc::Sender<ProbeReport>,
    probe_rx: mpsc::Receiver<ProbeReport>,
    passive_rx: mpsc::Receiver<PassiveFailure>,
    started: Instant,
}

/// A reload that was refused, with the reason `check` would print.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Load(#[from] config::LoadError),
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
        config_path: Option<PathBuf>,
        listen_addrs: &[SocketAddr],
        metrics: Arc<Metrics>,
        flow_log: Option<Arc<crate::flowlog::FlowLog>>,
    ) -> anyhow::Result<Self> {
        let (probe_tx, probe_rx) = mpsc::channel(4096);
        let (passive_tx, passive_rx) = mpsc::channel(4096);
        let mut frontends = Vec::new();
        let mut control = Vec::new();
        for (i, fe) in config.frontends.iter().enumerate() {
            let mut ctl = FrontendControl::new(0);
            let routing = build_routing(&metrics, fe, &mut ctl)?;
            let handles = metrics.frontend(&fe.name);
            handles.table_generation.set(ctl.generation as i64);
            frontends.push(Arc::new(Frontend::new(
                i,
                listen_addrs[i],
                fe.clone(),
                routing,
                handles,
                passive_tx.clone(),
                flow_log.clone(),
            )));
            control.push(ctl);
        }
        Ok(Controller {
            metrics,
            config,
            config_path,
            frontends,
            control,
            probers: JoinSet::new(),
            prober_epoch: 0,
            probe_tx,
            probe_rx,
            passive_rx,
            started: Instant::now(),
        })
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
            tokio::select! {
                Some(report) = self.probe_rx.recv() => {
                    if report.epoch == self.prober_epoch {
                        self.record(report.frontend, &report.target, report.event);
                    }
                }
                Some(failure) = self.passive_rx.recv() => {
                    self.record(failure.frontend, &failure.backend, HealthEvent::Probe(ProbeOutcome::Failure));
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

    fn record(&mut self, frontend: usize, target: &str, event: HealthEvent) {
        let Some(fe_cfg) = self.config.frontends.get(frontend) else {
            return;
        };
        let now = self.started.elapsed();
        let ctl = &mut self.control[frontend];
        let Some(key) = ctl.health.get_key_value(target).map(|(k, _)| Arc::clone(k)) else {
            return;
        };
        let Some(state) = ctl.health.get_mut(target) else {
            return;
        };
        let transition = match event {
            HealthEvent::Probe(outcome) => state.record(&fe_cfg.health.thresholds, outcome, now),
            HealthEvent::Readmit => state.readmit(now),
        };
        let Some(transition) = transition else {
            return;
        };
        // Metrics are per pool member: the backend, or the endpoint's node.
        let member = target.split_once('/').map_or(target, |(node, _)| node);
        if let Some(rt) = ctl.runtimes.get(member) {
            rt.metrics.health_transitions.inc();
        }
        let fe_name = fe_cfg.name.clone();
        match transition {
            Transition::WentDown => {
                warn!(frontend = %fe_name, target, ?event, "marked down");
                if fe_cfg.health.kind == ProbeKind::None {
                    // Only passive failures took it down, and nothing else would ever
                    // report it healthy: hold it down for interval x rise, then retry it.
                    let hold = fe_cfg.health.interval * fe_cfg.health.thresholds.rise.max(1);
                    let tx = self.probe_tx.clone();
                    let epoch = self.prober_epoch;
                    self.probers.spawn(async move {
                        tokio::time::sleep(hold).await;
                        let _ = tx
                            .send(ProbeReport {
                                epoch,
                                frontend,
                                target: key,
                                event: HealthEvent::Readmit,
                            })
                            .await;
                    });
                }
            }
            Transition::WentUp => info!(frontend = %fe_name, target, "marked up"),
        }
        if let Err(e) = self.republish(frontend) {
            warn!(frontend = %fe_name, "could not rebuild snapshot: {e}");
        }
    }

    fn republish(&mut self, frontend: usize) -> anyhow::Result<()> {
        let fe_cfg = &self.config.frontends[frontend];
        let routing = build_routing(&self.metrics, fe_cfg, &mut self.control[frontend])?;
        let fe = &self.frontends[frontend];
        fe.metrics
            .table_generation
            .set(self.control[frontend].generation as i64);
        fe.routing.publish(routing);
        Ok(())
    }

    fn reload(&mut self) -> Result<(), ReloadError> {
        let path = self.config_path.clone().ok_or(ReloadError::NoFile)?;
        let next = config::load_file(&path)?;
        listener_changes(&self.config, &next).map_err(ReloadError::ListenerChange)?;

        // Build everything first, publish only when all of it succeeded.
        let mut staged = Vec::with_capacity(next.frontends.len());
        for (i, fe) in next.frontends.iter().enumerate() {
            let old = &self.control[i];
            let old_cfg = &self.config.frontends[i];
            let mut ctl = FrontendControl::new(old.generation);
            // Health carries over for targets whose name and address are unchanged,
            // counters for pool members whose name and address are unchanged.
            let old_targets = health_targets(old_cfg);
            for target in health_targets(fe) {
                if old_targets.contains(&target) {
                    if let Some((k, h)) = old.health.get_key_value(target.0.as_str()) {
                        ctl.health.insert(Arc::clone(k), h.clone());
                    }
                }
            }
            let old_members = pool_members(old_cfg);
            for m in pool_members(fe) {
                if old_members
                    .iter()
                    .any(|o| o.name == m.name && o.addr == m.addr)
                {
                    if let Some(rt) = old.runtimes.get(m.name.as_str()) {
                        ctl.runtimes.insert(Arc::clone(&rt.name), Arc::clone(rt));
                    }
                }
            }
            ctl.affinity = old.affinity.clone();
            let routing = build_routing(&self.metrics, fe, &mut ctl)
                .map_err(|e| ReloadError::Build(e.to_string()))?;
            staged.push((ctl, routing));
        }
        for (i, (ctl, routing)) in staged.into_iter().enumerate() {
            let fe_name = &next.frontends[i].name;
            for (name, _) in self.control[i].runtimes.iter() {
                if !ctl.runtimes.contains_key(name) {
                    self.metrics.forget_backend(fe_name, name);
                }
            }
            let fe = &self.frontends[i];
            fe.settings.publish(next.frontends[i].clone());
            fe.metrics.table_generation.set(ctl.generation as i64);
            fe.routing.publish(routing);
            self.control[i] = ctl;
        }
        crate::fds::set_reserve(next.fd_reserve);
        self.config = next;
        self.start_probers();
        Ok(())
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
            for (position, (name, addr)) in targets.into_iter().enumerate() {
                // Spread the targets' probes evenly over the interval, as HAProxy
                // spreads its checks: in lock-step, 100 backends meant 100 connects
                // in one burst every interval, and a scrape arriving then waited
                // behind all of them. Backends start up, so a later first probe only
                // delays noticing a dead one, by less than one interval.
                let phase = fe.health.interval * position as u32 / count;
                let Some(key) = self.control[fi]
                    .health
                    .get_key_value(name.as_str())
                    .map(|(k, _)| Arc::clone(k))
                else {
                    continue;
                };
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
                            target: Arc::clone(&key),
                            event: HealthEvent::Probe(outcome),
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
                "frontend `{}` listen/backlog/accept changed from {:?} to {:?}",
                o.name,
                o.listener_identity(),
                n.listener_identity()
            ));
        }
    }
    Ok(())
}

/// Builds a frontend's next routing snapshot from its config and health,
/// resolving (or reusing) every pool member's metric handles off the hot path.
fn build_routing(
    metrics: &Metrics,
    fe: &FrontendConfig,
    ctl: &mut FrontendControl,
) -> anyhow::Result<Routing> {
    let mut healthy_target = |key: &str| -> bool {
        match ctl.health.get(key) {
            Some(state) => state.is_up(),
            None => {
                ctl.health.insert(Arc::from(key), HealthState::new_up());
                true
            }
        }
    };
    // With the hop model, pod readiness is config readiness AND probe health,
    // and the ALB's pool health is whether Azure's probe would find the node eligible.
    let (params, pool_health, hop_model) = match &fe.hop {
        None => {
            let health: HashMap<String, bool> = fe
                .backends
                .iter()
                .map(|b| (b.name.clone(), healthy_target(&b.name)))
                .collect();
            (fe.params, health, None)
        }
        Some(hop) => {
            let nodes: Vec<NodeSpec> = hop
                .nodes
                .iter()
                .map(|n| {
                    let mut n = n.clone();
                    for e in n.endpoints.iter_mut() {
                        e.ready = e.ready && healthy_target(&endpoint_key(&n.name, e.addr));
                    }
                    n
                })
                .collect();
            let model = HopModel::new(nodes, hop.service)?;
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
            (params, health, Some(model))
        }
    };

    let set = BackendSet::new(pool_members(fe))?;
    let mut healthy = Vec::with_capacity(set.len());
    let mut backends = Vec::with_capacity(set.len());
    for spec in set.iter() {
        let runtime = match ctl.runtimes.get(spec.name.as_str()) {
            Some(rt) => Arc::clone(rt),
            None => {
                let rt = Arc::new(BackendRuntime {
                    name: Arc::from(spec.name.as_str()),
                    addr: spec.addr,
                    metrics: metrics.backend(&fe.name, &spec.name),
                });
                ctl.runtimes.insert(Arc::clone(&rt.name), Arc::clone(&rt));
                rt
            }
        };
        healthy.push(pool_health.get(&spec.name).copied().unwrap_or(false));
        backends.push(runtime);
    }
    ctl.generation += 1;
    let snapshot = Snapshot::build(ctl.generation, params, set, healthy)?;
    let slots = snapshot.table().slot_counts(backends.len());
    for (id, rt) in backends.iter().enumerate() {
        rt.metrics.up.set(snapshot.is_healthy(id as u32) as i64);
        rt.metrics
            .weight
            .set(i64::from(snapshot.backends().as_slice()[id].weight));
        rt.metrics.table_slots.set(i64::from(slots[id]));
    }
    let hop = hop_model.map(|model| {
        let affinity =
            model
                .nodes()
                .iter()
                .map(|n| {
                    Arc::clone(ctl.affinity.entry(n.name.clone()).or_insert_with(|| {
                        Arc::new(Mutex::new(AffinityTable::new(AFFINITY_CAPACITY)))
                    }))
                })
                .collect();
        let endpoint_keys = model
            .nodes()
            .iter()
            .map(|n| {
                n.endpoints
                    .iter()
                    .map(|e| Arc::from(endpoint_key(&n.name, e.addr).as_str()))
                    .collect()
            })
            .collect();
        HopRouting {
            model,
            affinity,
            endpoint_keys,
        }
    });
    Ok(Routing {
        snapshot,
        backends,
        hop,
    })
}
