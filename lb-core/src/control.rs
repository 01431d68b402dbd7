//! The control plane's health decisions, sans I/O: which health targets a
//! frontend has, how probe results and passive connect failures move their
//! health, when a target that passive failures alone took down is let back in,
//! and when the frontend's routing table must be rebuilt.
//!
//! Shaped like quinn-proto's `Connection`: events go in (`handle_config`,
//! `handle_probe_result`, `handle_connect_failure`, `handle_timeout`, each
//! with `now`, a [`Duration`] on the caller's clock), decisions come out
//! (`poll_event`, `poll_timer`, `poll_snapshot`). The caller owns the
//! sockets, the probers, the clock and the one timer it sleeps on; it builds
//! and publishes a snapshot whenever [`HealthController::poll_snapshot`] says
//! one is due, reading each target's health through
//! [`HealthController::is_up`].
//!
//! Rebuilds are coalesced and earned: any number of transitions and configs
//! since the last poll make exactly one rebuild, and a result that changes no
//! target's up/down state (a success while up, a failure short of `fall`)
//! makes none. That is the hysteresis the rise/fall thresholds buy.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::health::{HealthConfig, HealthState, ProbeOutcome, Transition};

/// What one health state belongs to: a plain backend, or a pod endpoint by
/// its node and address. Typed, so no name can be read as part of another
/// (a `node/endpoint` string split at the first '/' once counted a node
/// named `a/b`'s transitions under `a`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HealthKey {
    Backend(Arc<str>),
    Endpoint { node: Arc<str>, addr: SocketAddr },
}

impl HealthKey {
    /// The backend whose metrics count this target: itself, or the endpoint's node.
    pub fn backend(&self) -> &str {
        match self {
            HealthKey::Backend(name) => name,
            HealthKey::Endpoint { node, .. } => node,
        }
    }
}

impl fmt::Display for HealthKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HealthKey::Backend(name) => write!(f, "backend {name}"),
            HealthKey::Endpoint { node, addr } => write!(f, "endpoint {addr} on node {node}"),
        }
    }
}

/// How a frontend's health is decided.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ControlPolicy {
    /// Rise/fall thresholds and flap damping.
    pub thresholds: HealthConfig,
    /// `Some(hold)` when no probes run, so passive failures alone decide
    /// health: nothing would ever report a target they took down healthy
    /// again, so it is readmitted `hold` after it went down.
    pub hold_down: Option<Duration>,
}

/// What moved a target's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    Probe(ProbeOutcome),
    /// A connect to the target failed (passive evidence, counted as a failed probe).
    ConnectFailure,
    /// The passive-only hold-down ran out.
    Readmit,
}

/// One target's change of state, for the caller to log and count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlEvent {
    pub target: HealthKey,
    pub transition: Transition,
    pub cause: Cause,
}

/// A rebuild is due: build the frontend's snapshot over the targets' current
/// health ([`HealthController::is_up`]) and publish it as `generation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rebuild {
    /// 1 for the first rebuild, then one more for each.
    pub generation: u64,
}

/// One health target: its address (a change of address is a new target) and
/// its health, with the readmission deadline when one is pending.
#[derive(Clone, Debug)]
struct Target {
    addr: SocketAddr,
    health: HealthState,
    readmit_at: Option<Duration>,
}

/// One frontend's health targets and the decisions they lead to.
///
/// Invariant: a target has a readmission timer exactly when the policy has a
/// hold-down and the target is down.
#[derive(Clone, Debug, Default)]
pub struct HealthController {
    /// Ordered, not hashed: std's hasher seeds itself from the OS, and lb-core
    /// draws no randomness of its own.
    targets: BTreeMap<HealthKey, Target>,
    /// Pending readmissions, earliest first; mirrors each target's `readmit_at`.
    timers: BTreeSet<(Duration, HealthKey)>,
    policy: ControlPolicy,
    /// Transitions not yet polled; one per transition, so bounded by what
    /// the caller fed in since it last drained them.
    events: VecDeque<ControlEvent>,
    rebuild_due: bool,
    generation: u64,
}

impl HealthController {
    /// A controller with no targets; feed it a config before anything else.
    pub fn new() -> Self {
        Self::default()
    }

    /// The desired targets and policy. A target whose key and address are
    /// both unchanged keeps its health (and a pending readmission, while
    /// there is a hold-down); a new one, or one whose address changed, starts
    /// up; one no longer listed is forgotten with its timer. Always makes a
    /// rebuild due: the config changed.
    pub fn handle_config(
        &mut self,
        targets: impl IntoIterator<Item = (HealthKey, SocketAddr)>,
        policy: ControlPolicy,
        now: Duration,
    ) {
        let mut previous = std::mem::take(&mut self.targets);
        for (key, addr) in targets {
            let carried = previous.remove(&key).filter(|t| t.addr == addr);
            self.targets.entry(key).or_insert_with(|| {
                carried.unwrap_or(Target {
                    addr,
                    health: HealthState::new_up(),
                    readmit_at: None,
                })
            });
        }
        self.policy = policy;
        self.rearm_timers(now);
        self.rebuild_due = true;
    }

    /// One active probe's result; a target this config does not have is ignored
    /// (a late report from a prober of an older config).
    pub fn handle_probe_result(
        &mut self,
        target: &HealthKey,
        outcome: ProbeOutcome,
        now: Duration,
    ) {
        self.record(target, outcome, Cause::Probe(outcome), now);
    }

    /// A connect to `target` failed: passive evidence, recorded as a failed probe.
    pub fn handle_connect_failure(&mut self, target: &HealthKey, now: Duration) {
        self.record(target, ProbeOutcome::Failure, Cause::ConnectFailure, now);
    }

    /// Fires every readmission due at `now` (deadline ≤ now).
    pub fn handle_timeout(&mut self, now: Duration) {
        while let Some((at, key)) = self.timers.first().cloned() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            let Some(target) = self.targets.get_mut(&key) else {
                continue;
            };
            target.readmit_at = None;
            if let Some(transition) = target.health.readmit(now) {
                self.transitioned(key, transition, Cause::Readmit);
            }
        }
    }

    /// The earliest pending deadline, on the same clock as `now`: call
    /// [`handle_timeout`](Self::handle_timeout) once it has passed.
    pub fn poll_timer(&self) -> Option<Duration> {
        self.timers.first().map(|(at, _)| *at)
    }

    /// The next transition, oldest first.
    pub fn poll_event(&mut self) -> Option<ControlEvent> {
        self.events.pop_front()
    }

    /// `Some` when the routing table must be rebuilt: once for everything
    /// that changed since the last call, and never for nothing.
    pub fn poll_snapshot(&mut self) -> Option<Rebuild> {
        if !std::mem::take(&mut self.rebuild_due) {
            return None;
        }
        self.generation += 1;
        Some(Rebuild {
            generation: self.generation,
        })
    }

    /// Whether `target` may take new flows. A target this config does not
    /// have is not up: nothing may be routed to it.
    pub fn is_up(&self, target: &HealthKey) -> bool {
        self.targets.get(target).is_some_and(|t| t.health.is_up())
    }

    /// Whether `target` is one of this config's health targets.
    pub fn contains(&self, target: &HealthKey) -> bool {
        self.targets.contains_key(target)
    }

    /// The target's full health state (streaks, flap damping, transitions).
    pub fn health(&self, target: &HealthKey) -> Option<&HealthState> {
        self.targets.get(target).map(|t| &t.health)
    }

    pub fn policy(&self) -> &ControlPolicy {
        &self.policy
    }

    /// The generation of the last rebuild handed out (0 before the first).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Feeds one result to a known target and acts on the transition it causes.
    fn record(&mut self, key: &HealthKey, outcome: ProbeOutcome, cause: Cause, now: Duration) {
        let Some(target) = self.targets.get_mut(key) else {
            return;
        };
        let Some(transition) = target.health.record(&self.policy.thresholds, outcome, now) else {
            return;
        };
        self.set_timer(key, self.readmit_deadline(transition, now));
        self.transitioned(key.clone(), transition, cause);
    }

    /// When a target that just made `transition` should be readmitted: with a
    /// hold-down, `hold` after going down; never while up.
    fn readmit_deadline(&self, transition: Transition, now: Duration) -> Option<Duration> {
        match transition {
            Transition::WentDown => self.policy.hold_down.map(|hold| now.saturating_add(hold)),
            Transition::WentUp => None,
        }
    }

    /// Replaces the target's readmission deadline, keeping `timers` in step.
    fn set_timer(&mut self, key: &HealthKey, deadline: Option<Duration>) {
        let Some(target) = self.targets.get_mut(key) else {
            return;
        };
        if let Some(old) = std::mem::replace(&mut target.readmit_at, deadline) {
            self.timers.remove(&(old, key.clone()));
        }
        if let Some(at) = deadline {
            self.timers.insert((at, key.clone()));
        }
    }

    /// After a config: every down target gets a readmission while there is a
    /// hold-down (keeping the deadline it had; one that probes took down
    /// before probes were switched off gets `now + hold`, or nothing would
    /// ever let it back in), and none has one without a hold-down (probes
    /// decide then). Removed targets' timers go with them.
    fn rearm_timers(&mut self, now: Duration) {
        let hold_down = self.policy.hold_down;
        self.timers.clear();
        for (key, target) in self.targets.iter_mut() {
            target.readmit_at = match hold_down {
                Some(hold) if !target.health.is_up() => {
                    Some(target.readmit_at.unwrap_or(now.saturating_add(hold)))
                }
                _ => None,
            };
            if let Some(at) = target.readmit_at {
                self.timers.insert((at, key.clone()));
            }
        }
    }

    fn transitioned(&mut self, target: HealthKey, transition: Transition, cause: Cause) {
        self.events.push_back(ControlEvent {
            target,
            transition,
            cause,
        });
        self.rebuild_due = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: ProbeOutcome = ProbeOutcome::Success;
    const F: ProbeOutcome = ProbeOutcome::Failure;
    const HOLD: Duration = Duration::from_secs(10);

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn key(name: &str) -> HealthKey {
        HealthKey::Backend(Arc::from(name))
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn probed() -> ControlPolicy {
        ControlPolicy::default()
    }

    fn passive() -> ControlPolicy {
        ControlPolicy {
            hold_down: Some(HOLD),
            ..ControlPolicy::default()
        }
    }

    /// A controller over backends `a`, `b`, `c` (ports 1, 2, 3), its first
    /// rebuild already taken.
    fn controller(policy: ControlPolicy) -> HealthController {
        let mut c = HealthController::new();
        c.handle_config(targets(&[("a", 1), ("b", 2), ("c", 3)]), policy, secs(0));
        assert_eq!(c.poll_snapshot(), Some(Rebuild { generation: 1 }));
        c
    }

    fn targets(list: &[(&str, u16)]) -> Vec<(HealthKey, SocketAddr)> {
        list.iter().map(|&(n, p)| (key(n), addr(p))).collect()
    }

    fn events(c: &mut HealthController) -> Vec<(HealthKey, Transition, Cause)> {
        std::iter::from_fn(|| c.poll_event())
            .map(|e| (e.target, e.transition, e.cause))
            .collect()
    }

    #[test]
    fn probes_take_a_target_down_after_fall_and_up_after_rise() {
        let mut c = controller(probed());
        c.handle_probe_result(&key("a"), F, secs(1));
        assert!(c.is_up(&key("a")), "one failure is short of fall = 2");
        c.handle_probe_result(&key("a"), F, secs(2));
        assert!(!c.is_up(&key("a")));
        assert_eq!(
            events(&mut c),
            [(key("a"), Transition::WentDown, Cause::Probe(F))]
        );
        assert_eq!(c.poll_snapshot(), Some(Rebuild { generation: 2 }));
        c.handle_probe_result(&key("a"), S, secs(100));
        assert_eq!(c.poll_snapshot(), None);
        c.handle_probe_result(&key("a"), S, secs(105));
        assert!(c.is_up(&key("a")));
        assert_eq!(
            events(&mut c),
            [(key("a"), Transition::WentUp, Cause::Probe(S))]
        );
        assert_eq!(c.poll_snapshot(), Some(Rebuild { generation: 3 }));
        assert!(c.is_up(&key("b")) && c.is_up(&key("c")));
    }

    #[test]
    fn a_rejected_probe_takes_a_target_down_at_once() {
        let mut c = controller(probed());
        c.handle_probe_result(&key("b"), ProbeOutcome::Rejected, secs(1));
        assert!(!c.is_up(&key("b")));
        let cause = Cause::Probe(ProbeOutcome::Rejected);
        assert_eq!(events(&mut c), [(key("b"), Transition::WentDown, cause)]);
        assert!(c.poll_snapshot().is_some());
    }

    #[test]
    fn flapping_multiplies_the_successes_needed_to_rise() {
        let mut c = controller(probed());
        let a = key("a");
        c.handle_probe_result(&a, ProbeOutcome::Rejected, secs(1));
        c.handle_probe_result(&a, S, secs(2));
        c.handle_probe_result(&a, S, secs(3));
        assert!(c.is_up(&a));
        // Down again 1 s after coming up: a flap, so rise 2 becomes 4.
        c.handle_probe_result(&a, ProbeOutcome::Rejected, secs(4));
        assert_eq!(
            c.health(&a).unwrap().rise_required(&c.policy().thresholds),
            4
        );
        for t in 5..8 {
            c.handle_probe_result(&a, S, secs(t));
            assert!(!c.is_up(&a), "{} successes are short of 4", t - 4);
        }
        c.handle_probe_result(&a, S, secs(8));
        assert!(c.is_up(&a));
        assert_eq!(events(&mut c).len(), 4);
    }

    #[test]
    fn a_passive_failure_holds_down_until_exactly_the_deadline() {
        let mut c = controller(passive());
        let a = key("a");
        c.handle_connect_failure(&a, secs(5));
        assert!(c.is_up(&a));
        assert_eq!(c.poll_timer(), None, "no timer while the target is up");
        c.handle_connect_failure(&a, secs(6));
        assert!(!c.is_up(&a));
        assert_eq!(
            events(&mut c),
            [(a.clone(), Transition::WentDown, Cause::ConnectFailure)]
        );
        assert!(c.poll_snapshot().is_some());
        assert_eq!(c.poll_timer(), Some(secs(6) + HOLD));

        c.handle_timeout(secs(6) + HOLD - Duration::from_nanos(1));
        assert!(!c.is_up(&a), "readmitted before the hold-down ran out");
        assert_eq!(c.poll_snapshot(), None);
        c.handle_timeout(secs(6) + HOLD);
        assert!(c.is_up(&a));
        assert_eq!(events(&mut c), [(a, Transition::WentUp, Cause::Readmit)]);
        assert_eq!(c.poll_timer(), None);
        assert!(c.poll_snapshot().is_some());
    }

    #[test]
    fn passive_failures_with_probes_arm_no_readmission() {
        let mut c = controller(probed());
        let a = key("a");
        c.handle_connect_failure(&a, secs(1));
        c.handle_connect_failure(&a, secs(2));
        assert!(!c.is_up(&a));
        assert_eq!(c.poll_timer(), None, "probes decide when it returns");
        c.handle_timeout(secs(3600));
        assert!(!c.is_up(&a));
    }

    #[test]
    fn a_config_that_removes_the_target_cancels_its_readmission() {
        let mut c = controller(passive());
        let a = key("a");
        c.handle_connect_failure(&a, secs(1));
        c.handle_connect_failure(&a, secs(1));
        assert_eq!(c.poll_timer(), Some(secs(1) + HOLD));
        c.handle_config(targets(&[("b", 2), ("c", 3)]), passive(), secs(2));
        assert_eq!(c.poll_timer(), None);
        assert!(!c.contains(&a) && !c.is_up(&a));
        events(&mut c);
        c.handle_timeout(secs(3600));
        assert_eq!(events(&mut c), []);
        // Back in a later config, it is a new target: up.
        c.handle_config(targets(&[("a", 1)]), passive(), secs(3601));
        assert!(c.is_up(&a));
    }

    #[test]
    fn a_reload_keeps_a_pending_readmission_and_its_deadline() {
        let mut c = controller(passive());
        let a = key("a");
        c.handle_probe_result(&a, ProbeOutcome::Rejected, secs(1));
        c.handle_config(targets(&[("a", 1), ("b", 2)]), passive(), secs(5));
        assert_eq!(c.poll_timer(), Some(secs(1) + HOLD), "deadline kept");
        // Switching probes on hands the target to them: no readmission.
        c.handle_config(targets(&[("a", 1), ("b", 2)]), probed(), secs(6));
        assert_eq!(c.poll_timer(), None);
        assert!(!c.is_up(&a));
        // Switching them off again arms one from now, or it would stay down for good.
        c.handle_config(targets(&[("a", 1), ("b", 2)]), passive(), secs(7));
        assert_eq!(c.poll_timer(), Some(secs(7) + HOLD));
    }

    #[test]
    fn carry_over_keeps_health_for_the_same_key_and_address_only() {
        let mut c = controller(probed());
        for name in ["a", "b"] {
            c.handle_probe_result(&key(name), ProbeOutcome::Rejected, secs(1));
        }
        c.handle_config(targets(&[("a", 1), ("b", 20), ("d", 4)]), probed(), secs(2));
        assert!(!c.is_up(&key("a")), "same key and address: still down");
        assert!(c.is_up(&key("b")), "address changed: a new target, up");
        assert!(c.is_up(&key("d")), "new targets start up");
        assert!(!c.contains(&key("c")));
        assert_eq!(c.health(&key("a")).unwrap().transitions(), 1);
    }

    #[test]
    fn endpoint_keys_are_told_apart_by_node_and_address() {
        let mut c = HealthController::new();
        let ep = |node: &str, port| HealthKey::Endpoint {
            node: Arc::from(node),
            addr: addr(port),
        };
        let list = [(ep("n1", 80), addr(80)), (ep("n2", 80), addr(80))];
        c.handle_config(list, probed(), secs(0));
        c.handle_probe_result(&ep("n1", 80), ProbeOutcome::Rejected, secs(1));
        assert!(!c.is_up(&ep("n1", 80)));
        assert!(c.is_up(&ep("n2", 80)));
        assert_eq!(ep("n1", 80).backend(), "n1");
        assert_eq!(
            ep("a/b", 80).to_string(),
            "endpoint 127.0.0.1:80 on node a/b"
        );
    }

    #[test]
    fn an_unknown_target_is_ignored() {
        let mut c = controller(passive());
        let ghost = key("ghost");
        c.handle_probe_result(&ghost, ProbeOutcome::Rejected, secs(1));
        c.handle_connect_failure(&ghost, secs(1));
        c.handle_connect_failure(&ghost, secs(1));
        assert_eq!(events(&mut c), []);
        assert_eq!((c.poll_snapshot(), c.poll_timer()), (None, None));
        assert!(!c.contains(&ghost) && !c.is_up(&ghost));
    }

    #[test]
    fn many_changes_between_polls_make_one_rebuild() {
        let mut c = controller(probed());
        c.handle_probe_result(&key("a"), ProbeOutcome::Rejected, secs(1));
        c.handle_probe_result(&key("b"), ProbeOutcome::Rejected, secs(1));
        c.handle_config(targets(&[("a", 1), ("b", 2)]), probed(), secs(2));
        assert_eq!(events(&mut c).len(), 2);
        assert_eq!(c.poll_snapshot(), Some(Rebuild { generation: 2 }));
        assert_eq!(c.poll_snapshot(), None);
        assert_eq!(c.generation(), 2);
    }

    #[test]
    fn results_that_change_no_state_make_no_rebuild() {
        let mut c = controller(probed());
        c.handle_probe_result(&key("a"), S, secs(1));
        c.handle_probe_result(&key("b"), F, secs(1));
        c.handle_probe_result(&key("b"), S, secs(2));
        c.handle_probe_result(&key("b"), F, secs(3));
        c.handle_connect_failure(&key("c"), secs(4));
        assert_eq!(c.poll_snapshot(), None);
        assert_eq!(events(&mut c), []);
        assert_eq!(c.generation(), 1);
    }

    #[test]
    fn poll_timer_reports_the_earliest_of_several_readmissions() {
        let mut c = controller(passive());
        let reject = ProbeOutcome::Rejected;
        c.handle_probe_result(&key("b"), reject, secs(3));
        c.handle_probe_result(&key("a"), reject, secs(1));
        c.handle_probe_result(&key("c"), reject, secs(2));
        assert_eq!(c.poll_timer(), Some(secs(1) + HOLD));
        c.handle_timeout(secs(2) + HOLD);
        let up: Vec<bool> = ["a", "b", "c"].iter().map(|n| c.is_up(&key(n))).collect();
        assert_eq!(
            up,
            [true, false, true],
            "the two due fired, the third waits"
        );
        assert_eq!(c.poll_timer(), Some(secs(3) + HOLD));
        events(&mut c);
        // Up again by readmission, then down: a new deadline replaces none.
        c.handle_probe_result(&key("a"), reject, secs(20));
        assert_eq!(c.poll_timer(), Some(secs(3) + HOLD));
        c.handle_timeout(secs(3) + HOLD);
        assert_eq!(c.poll_timer(), Some(secs(20) + HOLD));
    }
}
