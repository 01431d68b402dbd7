//! The control plane: one task owns health state and config, turns probe
//! results, passive failures and reloads into new snapshots, and publishes them.
//! Owning all of it in one task means no locks anywhere on the write side.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use lb_core::{BackendSet, HealthState, ProbeOutcome, Snapshot, Transition};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{info, warn};

use crate::config::{self, Config, FrontendConfig, ProbeKind};
use crate::metrics::Metrics;
use crate::probe::probe;
use crate::state::{BackendRuntime, Frontend, PassiveFailure, Routing};

struct ProbeReport {
    epoch: u64,
    frontend: usize,
    backend: Arc<str>,
    outcome: ProbeOutcome,
}

/// Per-frontend state the control plane owns.
struct FrontendControl {
    health: HashMap<Arc<str>, HealthState>,
    runtimes: HashMap<Arc<str>, Arc<BackendRuntime>>,
    generation: u64,
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
    ) -> anyhow::Result<Self> {
        let (probe_tx, probe_rx) = mpsc::channel(4096);
        let (passive_tx, passive_rx) = mpsc::channel(4096);
        let mut frontends = Vec::new();
        let mut control = Vec::new();
        for (i, fe) in config.frontends.iter().enumerate() {
            let mut ctl = FrontendControl {
                health: HashMap::new(),
                runtimes: HashMap::new(),
                generation: 0,
            };
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
                        self.record(report.frontend, &report.backend, report.outcome);
                    }
                }
                Some(failure) = self.passive_rx.recv() => {
                    self.record(failure.frontend, &failure.backend, ProbeOutcome::Failure);
                }
                reload = reloads.recv() => {
                    if reload.is_none() {
                        break;
                    }
                    match self.reload() {
                        Ok(()) => {
                            self.metrics.config_reloads.with_label_values(&["success"]).inc();
                            info!("config reloaded");
                        }
                        Err(e) => {
                            self.metrics.config_reloads.with_label_values(&["failure"]).inc();
                            warn!("{e}; the previous config keeps serving");
                        }
                    }
                }
            }
        }
        self.probers.abort_all();
    }

    fn record(&mut self, frontend: usize, backend: &str, outcome: ProbeOutcome) {
        let Some(fe_cfg) = self.config.frontends.get(frontend) else {
            return;
        };
        let now = self.started.elapsed();
        let ctl = &mut self.control[frontend];
        let Some(state) = ctl.health.get_mut(backend) else {
            return;
        };
        let Some(transition) = state.record(&fe_cfg.health.thresholds, outcome, now) else {
            return;
        };
        if let Some(rt) = ctl.runtimes.get(backend) {
            rt.metrics.health_transitions.inc();
        }
        let fe_name = fe_cfg.name.clone();
        match transition {
            Transition::WentDown => {
                warn!(frontend = %fe_name, backend, ?outcome, "backend marked down")
            }
            Transition::WentUp => info!(frontend = %fe_name, backend, "backend marked up"),
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
            let mut ctl = FrontendControl {
                health: HashMap::new(),
                runtimes: HashMap::new(),
                generation: old.generation,
            };
            // Health and counters carry over for backends whose name and address are unchanged.
            for b in &fe.backends {
                let same = old_cfg
                    .backends
                    .iter()
                    .any(|o| o.name == b.name && o.addr == b.addr);
                if same {
                    if let Some((k, h)) = old.health.get_key_value(b.name.as_str()) {
                        ctl.health.insert(Arc::clone(k), h.clone());
                    }
                    if let Some(rt) = old.runtimes.get(b.name.as_str()) {
                        ctl.runtimes.insert(Arc::clone(&rt.name), Arc::clone(rt));
                    }
                }
            }
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
            for b in &fe.backends {
                let Some(name) = self.control[fi]
                    .runtimes
                    .get(b.name.as_str())
                    .map(|r| Arc::clone(&r.name))
                else {
                    continue;
                };
                let tx = self.probe_tx.clone();
                let (addr, probe_cfg, epoch) = (b.addr, fe.health.clone(), self.prober_epoch);
                self.probers.spawn(async move {
                    let mut ticker = tokio::time::interval(probe_cfg.interval);
                    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
                    loop {
                        ticker.tick().await;
                        let outcome = probe(addr, &probe_cfg.kind, probe_cfg.timeout).await;
                        let report = ProbeReport {
                            epoch,
                            frontend: fi,
                            backend: Arc::clone(&name),
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
                "frontend `{}` listen/backlog changed from {:?} to {:?}",
                o.name,
                o.listener_identity(),
                n.listener_identity()
            ));
        }
    }
    Ok(())
}

/// Builds a frontend's next routing snapshot from its config and health,
/// resolving (or reusing) every backend's metric handles off the hot path.
fn build_routing(
    metrics: &Metrics,
    fe: &FrontendConfig,
    ctl: &mut FrontendControl,
) -> anyhow::Result<Routing> {
    let set = BackendSet::new(fe.backends.clone())?;
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
        let state = ctl
            .health
            .entry(Arc::clone(&runtime.name))
            .or_insert_with(HealthState::new_up);
        healthy.push(state.is_up());
        backends.push(runtime);
    }
    ctl.generation += 1;
    let snapshot = Snapshot::build(ctl.generation, fe.params, set, healthy)?;
    let slots = snapshot.table().slot_counts(backends.len());
    for (id, rt) in backends.iter().enumerate() {
        rt.metrics.up.set(snapshot.is_healthy(id as u32) as i64);
        rt.metrics
            .weight
            .set(i64::from(snapshot.backends().as_slice()[id].weight));
        rt.metrics.table_slots.set(i64::from(slots[id]));
    }
    Ok(Routing { snapshot, backends })
}
