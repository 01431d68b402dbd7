//! The rise/fall health state machine, fed probe results by the caller.
//!
//! Defaults follow Azure Load Balancer as AKS configures it: a probe every 5 s
//! and 2 consecutive results to flip state. As in Azure, a probe that is
//! actively refused (a TCP RST, an HTTP status other than 200) marks a backend
//! down at once, and a backend that flaps is held down longer before it is let
//! back in: each time it goes down again within `flap_window` of coming up, the
//! number of successes it needs to rise doubles, up to `max_rise_multiplier`.

use std::time::Duration;

/// Thresholds of the state machine. The probe interval lives with the prober,
/// but its default is kept here so every part agrees on Azure's numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthConfig {
    /// Consecutive successes that bring a down backend up.
    pub rise: u32,
    /// Consecutive failures that take an up backend down.
    pub fall: u32,
    /// A refused probe takes the backend down at once, as Azure does.
    pub rejected_marks_down: bool,
    /// Going down again this soon after coming up counts as a flap.
    pub flap_window: Duration,
    /// Cap on how much flapping multiplies `rise`.
    pub max_rise_multiplier: u32,
}

impl HealthConfig {
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
    pub const DEFAULT_THRESHOLD: u32 = 2;
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            rise: Self::DEFAULT_THRESHOLD,
            fall: Self::DEFAULT_THRESHOLD,
            rejected_marks_down: true,
            flap_window: Duration::from_secs(60),
            max_rise_multiplier: 8,
        }
    }
}

/// What one probe (or one passive observation) found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeOutcome {
    Success,
    /// Timed out or failed without an answer.
    Failure,
    /// Actively refused: TCP RST, or an HTTP status other than 200.
    Rejected,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    WentDown,
    WentUp,
}

/// Health of one backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthState {
    up: bool,
    /// Consecutive results pointing away from the current state.
    streak: u32,
    rise_multiplier: u32,
    last_up_at: Option<Duration>,
    transitions: u64,
}

impl HealthState {
    /// A backend that serves until probes say otherwise; new backends start here
    /// so a fresh balancer serves at once, as HAProxy's servers do.
    pub fn new_up() -> Self {
        HealthState {
            up: true,
            streak: 0,
            rise_multiplier: 1,
            last_up_at: None,
            transitions: 0,
        }
    }

    /// A backend that must earn `rise` successes before it gets traffic.
    pub fn new_down() -> Self {
        HealthState {
            up: false,
            ..Self::new_up()
        }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Number of state changes so far.
    pub fn transitions(&self) -> u64 {
        self.transitions
    }

    /// Successes a down backend currently needs to come up, flap damping included.
    pub fn rise_required(&self, config: &HealthConfig) -> u32 {
        config.rise.max(1).saturating_mul(self.rise_multiplier)
    }

    /// Feeds one result; returns the state change it caused, if any.
    pub fn record(
        &mut self,
        config: &HealthConfig,
        outcome: ProbeOutcome,
        now: Duration,
    ) -> Option<Transition> {
        if self.up {
            match outcome {
                ProbeOutcome::Success => {
                    self.streak = 0;
                    None
                }
                ProbeOutcome::Rejected if config.rejected_marks_down => {
                    Some(self.go_down(config, now))
                }
                ProbeOutcome::Failure | ProbeOutcome::Rejected => {
                    self.streak += 1;
                    (self.streak >= config.fall.max(1)).then(|| self.go_down(config, now))
                }
            }
        } else {
            match outcome {
                ProbeOutcome::Success => {
                    self.streak += 1;
                    (self.streak >= self.rise_required(config)).then(|| self.go_up(now))
                }
                ProbeOutcome::Failure | ProbeOutcome::Rejected => {
                    self.streak = 0;
                    None
                }
            }
        }
    }

    /// Lets a down backend back in without probe evidence: the hold-down for
    /// backends that only passive failures took down, since nothing else would
    /// ever report them healthy again.
    pub fn readmit(&mut self, now: Duration) -> Option<Transition> {
        (!self.up).then(|| self.go_up(now))
    }

    fn go_down(&mut self, config: &HealthConfig, now: Duration) -> Transition {
        let flapped = self
            .last_up_at
            .is_some_and(|up_at| now.saturating_sub(up_at) < config.flap_window);
        self.rise_multiplier = if flapped {
            (self.rise_multiplier * 2).min(config.max_rise_multiplier.max(1))
        } else {
            1
        };
        self.up = false;
        self.streak = 0;
        self.transitions += 1;
        Transition::WentDown
    }

    fn go_up(&mut self, now: Duration) -> Transition {
        self.up = true;
        self.streak = 0;
        self.last_up_at = Some(now);
        self.transitions += 1;
        Transition::WentUp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: ProbeOutcome = ProbeOutcome::Success;
    const F: ProbeOutcome = ProbeOutcome::Failure;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn fall_then_rise_after_consecutive_results() {
        let cfg = HealthConfig::default();
        let mut h = HealthState::new_up();
        assert_eq!(h.record(&cfg, F, secs(0)), None);
        assert_eq!(
            h.record(&cfg, S, secs(5)),
            None,
            "a success resets the streak"
        );
        assert_eq!(h.record(&cfg, F, secs(10)), None);
        assert_eq!(h.record(&cfg, F, secs(15)), Some(Transition::WentDown));
        assert!(!h.is_up());
        assert_eq!(h.record(&cfg, S, secs(20)), None);
        assert_eq!(h.record(&cfg, S, secs(25)), Some(Transition::WentUp));
        assert_eq!(h.transitions(), 2);
    }

    #[test]
    fn a_refused_probe_marks_down_at_once() {
        let cfg = HealthConfig::default();
        let mut h = HealthState::new_up();
        assert_eq!(
            h.record(&cfg, ProbeOutcome::Rejected, secs(0)),
            Some(Transition::WentDown)
        );
        let lenient = HealthConfig {
            rejected_marks_down: false,
            ..cfg
        };
        let mut h = HealthState::new_up();
        assert_eq!(h.record(&lenient, ProbeOutcome::Rejected, secs(0)), None);
    }

    #[test]
    fn flapping_backends_need_more_successes_to_return() {
        let cfg = HealthConfig::default();
        let mut h = HealthState::new_down();
        let mut t = 0;
        let mut tick = || {
            t += 5;
            secs(t)
        };
        h.record(&cfg, S, tick());
        assert_eq!(h.record(&cfg, S, tick()), Some(Transition::WentUp));
        h.record(&cfg, F, tick());
        assert_eq!(h.record(&cfg, F, tick()), Some(Transition::WentDown));
        assert_eq!(h.rise_required(&cfg), 4, "went down 10 s after coming up");
        for _ in 0..3 {
            assert_eq!(h.record(&cfg, S, tick()), None);
        }
        assert_eq!(h.record(&cfg, S, tick()), Some(Transition::WentUp));
        // Stable for longer than the flap window: the penalty resets.
        for _ in 0..20 {
            h.record(&cfg, S, tick());
        }
        h.record(&cfg, F, tick());
        h.record(&cfg, F, tick());
        assert_eq!(h.rise_required(&cfg), 2);
    }
}
