//! A seeded, deterministic simulation of the control plane driving the data
//! plane's table: flows arrive while backends are added, removed, reweighted,
//! moved to a new address and flap, probes report, connects fail, and time
//! passes (firing readmissions). Each step feeds one such event to a
//! [`HealthController`], drains its decisions, and on a rebuild builds a real
//! [`Snapshot`] over the config and the controller's health, as lb-proxy does.
//! After every step it checks:
//!
//! 1. no new flow is routed to a backend absent from the config, down in the
//!    controller, or of weight 0 (every slot of the table, plus fresh flows);
//! 2. the table's balance: each serving backend's slots against its weight share;
//! 3. the disruption bound: across a rebuild where exactly one backend's
//!    serving weight changed, few slots of the others change owner;
//! 4. rebuilds are earned and never lost: a step makes exactly one rebuild if
//!    it changed the config or made a transition, and none otherwise;
//!
//! and, against a model kept here, that transitions, carry-over and readmission
//! deadlines are the ones the rules promise.
//!
//! 256 seeds by default; `LB_SIM_SEED=<n> cargo test -p lb-core --test simulation`
//! runs only seed n (a failure names its seed and step and prints that line).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use lb_core::{
    BackendSet, BackendSpec, Cause, ControlPolicy, FlowKey, HealthConfig, HealthController,
    HealthKey, ProbeOutcome, Snapshot, SnapshotParams, Transition,
};

const SEEDS: u64 = 256;
const STEPS: usize = 200;
/// Large enough for Maglev's M > 100·N rule at `MAX_BACKENDS`, small enough
/// that a rebuild costs little in a debug build.
const TABLE_SIZE: u32 = 509;
const MAX_BACKENDS: usize = 5;
const MAX_WEIGHT: u32 = 4;
/// The passive-only hold-down when probes are off.
const HOLD: Duration = Duration::from_secs(10);
/// Fresh flows routed after every step.
const FLOWS_PER_STEP: usize = 8;
/// The most the typical (median) one-backend change may move of the slots
/// the changed backend owns neither before nor after; see `check_disruption`.
const TYPICAL_DISRUPTION: f64 = 0.02;
/// The same for the 99th percentile of changes.
const P99_DISRUPTION: f64 = 0.05;

mod common;
use common::Rng;

/// A backend as the config has it, and whether it really serves (what its
/// probes find).
#[derive(Clone, Debug)]
struct Backend {
    addr: SocketAddr,
    weight: u32,
    alive: bool,
    /// Flips `alive` often: the flapping that damping is for.
    flappy: bool,
}

/// What the model expects of one health target.
#[derive(Clone, Debug)]
struct Expect {
    addr: SocketAddr,
    up: bool,
    /// When the hold-down readmits it, while one is pending.
    readmit_at: Option<Duration>,
}

/// Figures over a run, printed at the end.
#[derive(Default)]
struct Stats {
    steps: u64,
    rebuilds: u64,
    transitions: u64,
    readmissions: u64,
    /// Per one-backend change: the share of the other backends' slots that
    /// moved, and the seed and step it happened at.
    disruptions: Vec<(f64, u64, usize)>,
    /// Worst |slots − weight share| as a share of its tolerance.
    worst_balance: f64,
}

impl Stats {
    fn add(&mut self, other: &Stats) {
        self.steps += other.steps;
        self.rebuilds += other.rebuilds;
        self.transitions += other.transitions;
        self.readmissions += other.readmissions;
        self.disruptions.extend(&other.disruptions);
        self.worst_balance = self.worst_balance.max(other.worst_balance);
    }
}

/// One step's random event.
#[derive(Clone, Copy, Debug)]
enum Event {
    Add,
    Remove,
    Reweight,
    /// A new address under the same name: a new health target.
    Move,
    NewPolicy,
    /// With probes on, one probe of every backend (and one for a stale target).
    ProbeRound,
    /// A few connects to one backend fail.
    ConnectFailures,
    /// Only time passes.
    Idle,
}

impl Event {
    fn draw(rng: &mut Rng) -> Event {
        match rng.below(100) {
            0..=3 => Event::Add,
            4..=6 => Event::Remove,
            7..=10 => Event::Reweight,
            11..=12 => Event::Move,
            13 => Event::NewPolicy,
            14..=63 => Event::ProbeRound,
            64..=83 => Event::ConnectFailures,
            _ => Event::Idle,
        }
    }
}

struct Sim {
    seed: u64,
    /// The step being run (0: the first config).
    step: usize,
    rng: Rng,
    now: Duration,
    config: BTreeMap<String, Backend>,
    next_name: u32,
    policy: ControlPolicy,
    ctl: HealthController,
    /// The model: by backend name, what the controller should say.
    expect: BTreeMap<String, Expect>,
    /// The published snapshot: what new flows are routed by.
    snapshot: Option<Snapshot>,
    /// Backends a config removed, which the controller must have forgotten.
    removed: Vec<String>,
    stats: Stats,
}

fn key(name: &str) -> HealthKey {
    HealthKey::Backend(Arc::from(name))
}

fn params() -> SnapshotParams {
    SnapshotParams {
        table_size: TABLE_SIZE,
        ..SnapshotParams::default()
    }
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut sim = Sim {
            seed,
            step: 0,
            rng: Rng(seed),
            now: Duration::ZERO,
            config: BTreeMap::new(),
            next_name: 0,
            policy: ControlPolicy::default(),
            ctl: HealthController::new(),
            expect: BTreeMap::new(),
            snapshot: None,
            removed: Vec::new(),
            stats: Stats::default(),
        };
        sim.policy = sim.random_policy();
        for _ in 0..1 + sim.rng.below(MAX_BACKENDS as u64) {
            sim.add_backend();
        }
        sim
    }

    fn random_policy(&mut self) -> ControlPolicy {
        ControlPolicy {
            thresholds: HealthConfig {
                rise: 1 + self.rng.below(3) as u32,
                fall: 1 + self.rng.below(3) as u32,
                rejected_marks_down: self.rng.chance(50),
                flap_window: Duration::from_secs(30),
                max_rise_multiplier: 8,
            },
            hold_down: self.rng.chance(50).then_some(HOLD),
        }
    }

    /// The first config, then every step; the error names the step.
    fn run(&mut self) -> Result<(), String> {
        self.push_config();
        self.settle(0, true)
            .and_then(|()| self.check_routing(true))
            .map_err(|e| format!("at the first config: {e}"))?;
        for step in 1..=STEPS {
            self.step = step;
            let event = Event::draw(&mut self.rng);
            self.step(event)
                .map_err(|e| format!("at step {step} ({event:?}): {e}"))?;
        }
        Ok(())
    }

    /// Time passes (the caller's timer fires due readmissions), then the
    /// event; the controller's decisions are drained and checked, and new
    /// flows are routed by whatever snapshot is published after it.
    fn step(&mut self, event: Event) -> Result<(), String> {
        self.stats.steps += 1;
        let last_timeout = self.now;
        let passed = self.time_passing(event);
        self.now += passed;
        self.ctl.handle_timeout(self.now);
        let config_changed = self.apply(event);
        self.flap();
        let transitions = self.drain_events(last_timeout)?;
        if config_changed {
            self.push_config();
        }
        self.settle(transitions, config_changed)?;
        self.check_routing(transitions > 0 || config_changed)
    }

    /// Mostly less than a probe interval; idle steps span up to three hold-downs.
    fn time_passing(&mut self, event: Event) -> Duration {
        let most = match event {
            Event::Idle => 3 * HOLD.as_millis() as u64,
            _ => 4_000,
        };
        Duration::from_millis(self.rng.below(most + 1))
    }

    /// Applies the event; true when it changed the config.
    fn apply(&mut self, event: Event) -> bool {
        match event {
            Event::Add => self.add_backend(),
            Event::Remove => self.with_picked(|sim, name| {
                sim.config.remove(name);
            }),
            Event::Reweight => {
                let weight = self.rng.below(u64::from(MAX_WEIGHT) + 1) as u32;
                self.with_picked(|sim, name| sim.backend(name).weight = weight)
            }
            Event::Move => self.with_picked(|sim, name| {
                let addr = &mut sim.backend(name).addr;
                addr.set_port(addr.port() + 1);
            }),
            Event::NewPolicy => {
                self.policy = self.random_policy();
                true
            }
            Event::ProbeRound => {
                self.probe_round();
                false
            }
            Event::ConnectFailures => {
                self.connect_failures();
                false
            }
            Event::Idle => false,
        }
    }

    fn add_backend(&mut self) -> bool {
        if self.config.len() >= MAX_BACKENDS {
            return false;
        }
        let n = self.next_name;
        self.next_name += 1;
        let backend = Backend {
            addr: SocketAddr::from(([127, 0, 1, 1 + (n % 250) as u8], 8000)),
            weight: self.rng.below(u64::from(MAX_WEIGHT) + 1) as u32,
            alive: self.rng.chance(80),
            flappy: self.rng.chance(30),
        };
        self.config.insert(format!("node-{n}"), backend);
        true
    }

    /// Runs `edit` on a random configured backend; false when there is none.
    fn with_picked(&mut self, edit: impl FnOnce(&mut Sim, &str)) -> bool {
        let n = self.config.len() as u64;
        if n == 0 {
            return false;
        }
        let i = self.rng.below(n) as usize;
        let name = self.config.keys().nth(i).cloned().expect("in range");
        edit(self, &name);
        true
    }

    fn backend(&mut self, name: &str) -> &mut Backend {
        self.config.get_mut(name).expect("configured")
    }

    /// Probes report only while they are on (no hold-down). A report for a
    /// target no longer configured (a prober of an older config) is ignored.
    fn probe_round(&mut self) {
        if self.policy.hold_down.is_some() {
            return;
        }
        let results: Vec<(String, bool)> = self
            .config
            .iter()
            .map(|(n, b)| (n.clone(), b.alive))
            .collect();
        for (name, alive) in results {
            let outcome = match (alive, self.rng.below(3)) {
                (true, _) => ProbeOutcome::Success,
                (false, 0) => ProbeOutcome::Rejected,
                (false, _) => ProbeOutcome::Failure,
            };
            self.ctl.handle_probe_result(&key(&name), outcome, self.now);
        }
        if let Some(gone) = self.removed.last() {
            self.ctl
                .handle_probe_result(&key(gone), ProbeOutcome::Rejected, self.now);
        }
    }

    /// Connects to one backend fail 1–3 times, and one to a removed backend.
    fn connect_failures(&mut self) {
        let times = 1 + self.rng.below(3);
        let now = self.now;
        self.with_picked(|sim, name| {
            for _ in 0..times {
                sim.ctl.handle_connect_failure(&key(name), now);
            }
        });
        if let Some(gone) = self.removed.first() {
            self.ctl.handle_connect_failure(&key(gone), now);
        }
    }

    /// Flappy backends change their mind often, the rest rarely.
    fn flap(&mut self) {
        for b in self.config.values_mut() {
            let percent = if b.flappy { 25 } else { 2 };
            if self.rng.below(100) < percent {
                b.alive = !b.alive;
            }
        }
    }

    /// Feeds the config to the controller, and the carry-over rule to the
    /// model: the same name and address keep their state; others start up;
    /// with a hold-down every down target has a readmission (its old one, or
    /// one from now), without one none has.
    fn push_config(&mut self) {
        let targets: Vec<(HealthKey, SocketAddr)> =
            self.config.iter().map(|(n, b)| (key(n), b.addr)).collect();
        self.ctl.handle_config(targets, self.policy, self.now);

        let mut previous = std::mem::take(&mut self.expect);
        self.removed.extend(
            previous
                .keys()
                .filter(|n| !self.config.contains_key(*n))
                .cloned(),
        );
        for (name, b) in &self.config {
            let carried = previous.remove(name).filter(|e| e.addr == b.addr);
            let mut e = carried.unwrap_or(Expect {
                addr: b.addr,
                up: true,
                readmit_at: None,
            });
            e.readmit_at = match self.policy.hold_down {
                Some(hold) if !e.up => Some(e.readmit_at.unwrap_or(self.now + hold)),
                _ => None,
            };
            self.expect.insert(name.clone(), e);
        }
    }

    /// Checks each transition against the model and applies it: it flips
    /// the target's state; a readmission comes when its deadline passed
    /// since the last timeout (not before, not late); going down arms one
    /// with a hold-down. Returns how many there were.
    fn drain_events(&mut self, last_timeout: Duration) -> Result<u64, String> {
        let mut count = 0;
        while let Some(event) = self.ctl.poll_event() {
            count += 1;
            let HealthKey::Backend(name) = &event.target else {
                return Err(format!("an event for a target never configured: {event:?}"));
            };
            let Some(e) = self.expect.get_mut(&**name) else {
                return Err(format!("an event for an unknown target: {event:?}"));
            };
            let went_up = event.transition == Transition::WentUp;
            if e.up == went_up {
                return Err(format!("{event:?} but the model has up = {}", e.up));
            }
            if event.cause == Cause::Readmit {
                self.stats.readmissions += 1;
                match e.readmit_at {
                    Some(at) if at > last_timeout && at <= self.now => {}
                    other => {
                        return Err(format!(
                            "{name} readmitted at {:?} (last timeout {last_timeout:?}), \
                             model deadline {other:?}",
                            self.now
                        ))
                    }
                }
            }
            e.up = went_up;
            e.readmit_at = match (went_up, self.ctl.policy().hold_down) {
                (false, Some(hold)) => Some(self.now + hold),
                _ => None,
            };
        }
        self.stats.transitions += count;
        Ok(count)
    }

    /// Checks the controller agrees with the model, and that a rebuild came
    /// exactly when the step changed something (check 4); on one, builds
    /// the snapshot and checks balance and disruption (checks 2 and 3).
    fn settle(&mut self, transitions: u64, config_changed: bool) -> Result<(), String> {
        self.check_model()?;
        let rebuild = self.ctl.poll_snapshot();
        let earned = transitions > 0 || config_changed;
        if rebuild.is_some() != earned {
            return Err(format!(
                "rebuild {rebuild:?} after {transitions} transitions, config changed: {config_changed}"
            ));
        }
        if self.ctl.poll_snapshot().is_some() {
            return Err("a second rebuild for one step's changes".to_owned());
        }
        let Some(rebuild) = rebuild else {
            return Ok(());
        };
        self.stats.rebuilds += 1;
        let next = self.build(rebuild.generation);
        check_balance(&next, &mut self.stats)?;
        if let Some(previous) = &self.snapshot {
            if let Some(share) = check_disruption(previous, &next)? {
                self.stats.disruptions.push((share, self.seed, self.step));
            }
        }
        self.snapshot = Some(next);
        Ok(())
    }

    /// Every configured target's state, the forgotten targets, and the next
    /// deadline are what the model says.
    fn check_model(&self) -> Result<(), String> {
        for (name, e) in &self.expect {
            if self.ctl.is_up(&key(name)) != e.up || !self.ctl.contains(&key(name)) {
                return Err(format!(
                    "{name}: controller up = {}, model {e:?}",
                    self.ctl.is_up(&key(name))
                ));
            }
        }
        if let Some(gone) = self.removed.last() {
            if self.ctl.contains(&key(gone)) {
                return Err(format!(
                    "{gone} was removed but the controller still has it"
                ));
            }
        }
        let next = self.expect.values().filter_map(|e| e.readmit_at).min();
        if self.ctl.poll_timer() != next {
            return Err(format!(
                "poll_timer {:?}, model's next readmission {next:?}",
                self.ctl.poll_timer()
            ));
        }
        Ok(())
    }

    /// A snapshot over the config and the controller's health, as lb-proxy builds it.
    fn build(&self, generation: u64) -> Snapshot {
        let specs = self
            .config
            .iter()
            .map(|(n, b)| BackendSpec::new(n.clone(), b.addr, b.weight))
            .collect();
        let set = BackendSet::new(specs).expect("unique names");
        let healthy = set.iter().map(|b| self.ctl.is_up(&key(&b.name))).collect();
        Snapshot::build(generation, params(), set, healthy).expect("a valid table")
    }

    /// Check 1: the published snapshot sends new flows only to backends that
    /// are configured, up in the controller and of non-zero weight. After a
    /// step that changed anything, every slot is checked (a flow's primary is
    /// its slot's owner; a step that changed nothing leaves both the table and
    /// the answer as they were). Then fresh flows are routed through the
    /// snapshot itself; with no backend serving they are refused.
    fn check_routing(&mut self, every_slot: bool) -> Result<(), String> {
        let snapshot = self.snapshot.as_ref().ok_or("nothing published")?;
        let serving: Vec<bool> = snapshot
            .backends()
            .iter()
            .map(|b| {
                let configured = self.config.get(&b.name).is_some_and(|c| c.weight > 0);
                configured && self.ctl.is_up(&key(&b.name))
            })
            .collect();
        let counts = if every_slot {
            snapshot.table().slot_counts(serving.len())
        } else {
            vec![0; serving.len()]
        };
        if let Some(id) = (0..serving.len()).find(|&i| counts[i] > 0 && !serving[i]) {
            let name = &snapshot.backends().as_slice()[id].name;
            return Err(format!(
                "{name} owns {} slots but is absent, down or drained",
                counts[id]
            ));
        }
        let any_serving = serving.iter().any(|&s| s);
        for _ in 0..FLOWS_PER_STEP {
            let flow = random_flow(&mut self.rng);
            let routed = snapshot.route(&flow).backend;
            match routed {
                Some(id) if serving[id as usize] => {}
                None if !any_serving => {}
                _ => {
                    return Err(format!(
                        "{flow:?} routed to {routed:?}, serving {serving:?}"
                    ))
                }
            }
        }
        Ok(())
    }
}

/// A new flow from a random client to the frontend.
fn random_flow(rng: &mut Rng) -> FlowKey {
    let r = rng.next();
    let client = SocketAddr::from((
        [127, (r >> 8) as u8, (r >> 16) as u8, (r >> 24) as u8],
        r as u16,
    ));
    FlowKey::tcp(client, SocketAddr::from(([127, 0, 0, 1], 80)))
}

/// Check 2: each serving backend owns its weight's share of the table, to
/// within the fill rule's rounding. Backends take turns in rounds, and one of
/// weight w claims a slot each time its credit reaches the largest weight: after
/// c full rounds it has claimed ⌊c·w/w_max⌋, and the last round is partial.
/// So slots_i = c·w_i/w_max + e_i with e_i ∈ (−1, 1]; summing to M fixes
/// c/w_max = (M − Σe)/W, hence slots_i − M·w_i/W = e_i − (w_i/W)·Σe, and
/// |that| < 1 + N·w_i/W for N serving backends of total weight W.
fn check_balance(snapshot: &Snapshot, stats: &mut Stats) -> Result<(), String> {
    let m = f64::from(TABLE_SIZE);
    let specs = snapshot.backends().as_slice();
    let weight = |i: usize| {
        if snapshot.is_healthy(i as u32) {
            f64::from(specs[i].weight)
        } else {
            0.0
        }
    };
    let total: f64 = (0..specs.len()).map(weight).sum();
    let serving = (0..specs.len()).filter(|&i| weight(i) > 0.0).count() as f64;
    let counts = snapshot.table().slot_counts(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        if weight(i) == 0.0 {
            continue;
        }
        let share = m * weight(i) / total;
        let tolerance = 1.0 + serving * weight(i) / total;
        let off = (f64::from(counts[i]) - share).abs();
        stats.worst_balance = stats.worst_balance.max(off / tolerance);
        if off >= tolerance {
            return Err(format!(
                "{} owns {} slots, its weight's share is {share:.1} (tolerance {tolerance:.2})",
                spec.name, counts[i]
            ));
        }
    }
    Ok(())
}

/// Each backend's serving weight in a snapshot: its weight while healthy, by name.
fn serving_weights(snapshot: &Snapshot) -> BTreeMap<&str, u32> {
    snapshot
        .backends()
        .iter()
        .zip(snapshot.health())
        .map(|(b, &up)| (b.name.as_str(), if up { b.weight } else { 0 }))
        .collect()
}

/// Check 3: across a rebuild, a table whose inputs did not change is the
/// same table, slot for slot; where exactly one backend's serving weight
/// changed (added, removed, reweighted, went up or down), few of the slots
/// that backend owns neither before nor after change owner: those are the
/// flows the change had no reason to move (Maglev's minimal disruption).
/// Returns that share, for the run's percentiles.
///
/// The measure is over every slot rather than a sample of flows: a flow's
/// primary backend is its slot's owner, so this is the exact share of all
/// flows, with no sampling noise to widen a bound for.
///
/// Per change, the bound is the one tests/maglev_props.rs derives for the
/// survivors of a removal: `2·⌈M/N⌉ + M/10` slots for N serving backends,
/// because Maglev bounds no single change tightly: the others' claims ripple,
/// and two backends with the same skip can trade a long run of slots. Here
/// (M = 509, N ≤ 5, weights 1–4) single changes moved up to about 10% of the
/// others' slots, so "≤ 2% per change" is not a property Maglev has at this
/// size. The tight figures hold for the typical change, and the run checks
/// them over all of its changes (`check_disruption_percentiles`): a median
/// of at most 2% (lb-core's maglev_props measured medians of 0.02–0.23% of M
/// for N = 3–10 at M = 65537; a 509-slot table ripples more, and this run
/// measured a median of about 0.5%) and a 99th percentile of at most 5%
/// (measured about 3.5%).
fn check_disruption(before: &Snapshot, after: &Snapshot) -> Result<Option<f64>, String> {
    let (old, new) = (serving_weights(before), serving_weights(after));
    let names: Vec<&str> = old
        .keys()
        .chain(new.keys())
        .copied()
        .collect::<BTreeSet<&str>>()
        .into_iter()
        .collect();
    let weight = |w: &BTreeMap<&str, u32>, n: &str| w.get(n).copied().unwrap_or(0);
    let changed: Vec<usize> = (0..names.len())
        .filter(|&i| weight(&old, names[i]) != weight(&new, names[i]))
        .collect();
    if changed.len() > 1 {
        return Ok(None);
    }
    let (was, is) = (owners(before, &names), owners(after, &names));
    match changed.as_slice() {
        [] if was != is => Err("the table changed though no serving weight did".to_owned()),
        &[one] if !was.is_empty() && !is.is_empty() => {
            let x = Some(one as u16);
            let kept: Vec<usize> = (0..was.len())
                .filter(|&i| was[i] != x && is[i] != x)
                .collect();
            let moved = kept.iter().filter(|&&i| was[i] != is[i]).count();
            let serving = old.values().chain(new.values()).filter(|&&w| w > 0).count();
            let bound =
                2 * (TABLE_SIZE as usize).div_ceil(serving.max(1)) + TABLE_SIZE as usize / 10;
            if moved > bound {
                return Err(format!(
                    "changing only {} moved {moved} of the {} slots it owns neither before nor after (bound {bound})",
                    names[one],
                    kept.len(),
                ));
            }
            Ok(Some(moved as f64 / kept.len().max(1) as f64))
        }
        _ => Ok(None),
    }
}

/// The owner of every slot as an index into `names` (empty for an empty table).
fn owners(snapshot: &Snapshot, names: &[&str]) -> Vec<Option<u16>> {
    let index: Vec<u16> = snapshot
        .backends()
        .iter()
        .map(|b| names.binary_search(&b.name.as_str()).expect("a known name") as u16)
        .collect();
    snapshot
        .table()
        .slots()
        .into_iter()
        .map(|id| index.get(id as usize).copied())
        .collect()
}

/// The run's typical and 99th-percentile one-backend changes stay within
/// the tight figures; the error names the worst change's seed and step.
fn check_disruption_percentiles(disruptions: &mut [(f64, u64, usize)]) -> Result<(), String> {
    disruptions.sort_by(|a, b| a.0.total_cmp(&b.0));
    let at = |p: usize| disruptions[(disruptions.len() - 1) * p / 100].0;
    let (p50, p99) = (at(50), at(99));
    let (worst, seed, step) = disruptions[disruptions.len() - 1];
    eprintln!(
        "simulation: {} one-backend changes moved of the other backends' slots: \
         p50 {:.2}% p90 {:.2}% p99 {:.2}% max {:.2}% (seed {seed} step {step})",
        disruptions.len(),
        100.0 * p50,
        100.0 * at(90),
        100.0 * p99,
        100.0 * worst,
    );
    if p50 > TYPICAL_DISRUPTION || p99 > P99_DISRUPTION {
        return Err(format!(
            "one-backend changes moved too much: p50 {p50:.4} (bound {TYPICAL_DISRUPTION}), \
             p99 {p99:.4} (bound {P99_DISRUPTION}); the worst was seed {seed} step {step}, \
             replay it with LB_SIM_SEED={seed} cargo test -p lb-core --test simulation"
        ));
    }
    Ok(())
}

/// Runs one seed; the error says how to replay it.
fn run_seed(seed: u64, total: &mut Stats) -> Result<(), String> {
    let mut sim = Sim::new(seed);
    let result = sim.run();
    total.add(&sim.stats);
    result.map_err(|e| {
        format!(
            "seed {seed}: {e}\nreplay: LB_SIM_SEED={seed} cargo test -p lb-core --test simulation"
        )
    })
}

#[test]
fn control_plane_simulation() {
    let seeds: Vec<u64> = match std::env::var("LB_SIM_SEED") {
        Ok(s) => {
            let seed = s.trim().parse().expect("LB_SIM_SEED is a number");
            eprintln!("simulation: replaying seed {seed} only");
            vec![seed]
        }
        Err(_) => (0..SEEDS).collect(),
    };
    let mut stats = Stats::default();
    for &seed in &seeds {
        if let Err(e) = run_seed(seed, &mut stats) {
            panic!("{e}");
        }
    }
    eprintln!(
        "simulation: {} seeds, {} steps, {} rebuilds, {} transitions ({} readmissions); \
         worst balance {:.2} of its tolerance",
        seeds.len(),
        stats.steps,
        stats.rebuilds,
        stats.transitions,
        stats.readmissions,
        stats.worst_balance,
    );
    assert!(stats.rebuilds > 0 && stats.transitions > 0 && stats.readmissions > 0);
    // Percentiles need many changes; one replayed seed has a few dozen.
    if seeds.len() > 1 {
        if let Err(e) = check_disruption_percentiles(&mut stats.disruptions) {
            panic!("{e}");
        }
    }
}
