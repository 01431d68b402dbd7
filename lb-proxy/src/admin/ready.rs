//! Readiness (`GET /ready`, `lb_ready`), the process's stopping state and its
//! cause, and the config fingerprint's gauge.
//!
//! An instance is ready when every frontend can take a new flow and the
//! process is not stopping. A routing daemon announces the frontend address
//! only while `/ready` answers 200 (README, "Scaling out"); on SIGTERM the
//! server marks the process [`Lifecycle::Withdrawing`] first, so the route
//! is withdrawn while the listeners still accept, then drains.
//!
//! A frontend can take a new flow when its listeners are bound (they are
//! before the admin endpoint serves, and stay bound until the drain) and
//! its routing snapshot has a healthy backend of non-zero weight: a healthy
//! node, in the hop model. Routing over unhealthy backends
//! (`no_healthy_backends`) still serves flows but does not make a frontend
//! ready: the next instance over may have a healthy one.

use std::ops::Deref;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use hyper::StatusCode;
use lb_core::Fingerprint;

use super::Admin;
use crate::config::FrontendConfig;
use crate::state::Frontend;

/// Where the process is on its way out, as `/ready` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Lifecycle {
    Serving = 0,
    /// SIGTERM: `/ready` answers 503 while the listeners still accept, for `withdraw_delay`.
    Withdrawing = 1,
    /// Accepting has stopped; flows in flight finish or are cut.
    Draining = 2,
}

/// What stopped the process, for `/ready`'s body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum StopCause {
    Sigterm = 0,
    Sigint = 1,
    /// The listeners were handed over to the next process (an upgrade).
    HandOver = 2,
}

impl StopCause {
    fn from_bits(bits: u8) -> StopCause {
        match bits {
            0 => StopCause::Sigterm,
            1 => StopCause::Sigint,
            _ => StopCause::HandOver,
        }
    }
}

/// The process's [`Lifecycle`] and, once stopping, its [`StopCause`], shared
/// by the server (which moves it on) and the admin endpoint (which reports
/// it). Both live in one byte so a reader never sees one without the other.
#[derive(Debug, Default)]
pub struct LifecycleState(AtomicU8);

/// The cause's bits sit above the lifecycle's (which fit in two).
const CAUSE_SHIFT: u8 = 2;

impl LifecycleState {
    pub fn set(&self, to: Lifecycle, cause: StopCause) {
        let bits = to as u8 | (cause as u8) << CAUSE_SHIFT;
        self.0.store(bits, Ordering::Release);
    }

    pub fn get(&self) -> (Lifecycle, StopCause) {
        let bits = self.0.load(Ordering::Acquire);
        let lifecycle = match bits & ((1 << CAUSE_SHIFT) - 1) {
            0 => Lifecycle::Serving,
            1 => Lifecycle::Withdrawing,
            _ => Lifecycle::Draining,
        };
        (lifecycle, StopCause::from_bits(bits >> CAUSE_SHIFT))
    }
}

/// Why the process, or one frontend, is not ready.
fn not_ready(admin: &Admin, frontends: &[&Frontend]) -> Option<String> {
    match admin.lifecycle.get() {
        (Lifecycle::Serving, _) => {}
        (Lifecycle::Withdrawing, _) => return Some("withdrawing (SIGTERM)".into()),
        (Lifecycle::Draining, StopCause::Sigterm) => return Some("draining (SIGTERM)".into()),
        (Lifecycle::Draining, StopCause::Sigint) => return Some("stopping (SIGINT)".into()),
        (Lifecycle::Draining, StopCause::HandOver) => {
            return Some("draining (handed over to the next process)".into())
        }
    }
    frontends.iter().find_map(|fe| frontend_not_ready(fe))
}

/// Why `fe` cannot take a new flow now, if it cannot.
fn frontend_not_ready(fe: &Frontend) -> Option<String> {
    let routing = fe.routing.load();
    let snap = &routing.snapshot;
    let takes_flows = snap
        .backends()
        .iter()
        .enumerate()
        .any(|(i, b)| b.weight > 0 && snap.is_healthy(i as u32));
    if takes_flows {
        return None;
    }
    Some(if routing.hop.is_some() {
        format!("frontend {} has no node that can take traffic", fe.name)
    } else {
        format!("frontend {} has no healthy backend", fe.name)
    })
}

/// `GET /ready[?frontend=NAME]`: the status and body to answer with.
pub(super) fn ready(admin: &Admin, frontend: Option<&str>) -> (StatusCode, String) {
    let asked: Vec<&Frontend> = match frontend {
        None => admin.frontends.iter().map(|f| &**f).collect(),
        Some(name) => match admin.frontends.iter().find(|f| &*f.name == name) {
            Some(fe) => vec![&**fe],
            None => {
                return (
                    StatusCode::NOT_FOUND,
                    format!("no frontend named `{name}`\n"),
                )
            }
        },
    };
    match not_ready(admin, &asked) {
        None => (StatusCode::OK, "ready\n".into()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// The fingerprint of all frontends together, from `settings` (one load of
/// each frontend's published config, so the caller can show the same loads).
pub(super) fn fingerprint_of<S: Deref<Target = Arc<FrontendConfig>>>(
    settings: &[S],
) -> Fingerprint {
    let routing: Vec<_> = settings.iter().map(|s| s.routing_description()).collect();
    lb_core::fingerprint_all(&routing)
}

/// Brings `lb_ready` and `lb_config_fingerprint` up to date before a scrape.
/// The fingerprint is computed under the gauge's lock, so two scrapes racing
/// a reload cannot leave the older fingerprint shown.
pub(super) fn update_gauges(admin: &Admin) {
    let all: Vec<&Frontend> = admin.frontends.iter().map(|f| &**f).collect();
    let ready = not_ready(admin, &all).is_none();
    admin.metrics.readiness.set(ready, || {
        let settings: Vec<_> = admin.frontends.iter().map(|f| f.settings.load()).collect();
        fingerprint_of(&settings).to_string()
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lifecycle_reads_back_what_was_set() {
        let state = LifecycleState::default();
        assert_eq!(state.get(), (Lifecycle::Serving, StopCause::Sigterm));
        for to in [
            Lifecycle::Withdrawing,
            Lifecycle::Draining,
            Lifecycle::Serving,
        ] {
            for cause in [StopCause::Sigterm, StopCause::Sigint, StopCause::HandOver] {
                state.set(to, cause);
                assert_eq!(state.get(), (to, cause));
            }
        }
    }
}
