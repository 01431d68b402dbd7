//! Readiness (`GET /ready`, `lb_ready`) and the config fingerprint's gauge.
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

use std::sync::atomic::{AtomicU8, Ordering};

use hyper::StatusCode;

use super::Admin;
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

/// The process's [`Lifecycle`], shared by the server (which moves it on)
/// and the admin endpoint (which reports it).
#[derive(Debug, Default)]
pub struct LifecycleState(AtomicU8);

impl LifecycleState {
    pub fn set(&self, to: Lifecycle) {
        self.0.store(to as u8, Ordering::Release);
    }

    pub fn get(&self) -> Lifecycle {
        match self.0.load(Ordering::Acquire) {
            0 => Lifecycle::Serving,
            1 => Lifecycle::Withdrawing,
            _ => Lifecycle::Draining,
        }
    }
}

/// Why the process, or one frontend, is not ready.
fn not_ready(admin: &Admin, frontends: &[&Frontend]) -> Option<String> {
    match admin.lifecycle.get() {
        Lifecycle::Serving => {}
        Lifecycle::Withdrawing => return Some("withdrawing (SIGTERM)".into()),
        Lifecycle::Draining => return Some("draining (SIGTERM)".into()),
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

/// The fingerprint of all frontends together, from the settings a reload
/// last published.
pub(super) fn fingerprint(admin: &Admin) -> lb_core::Fingerprint {
    let settings: Vec<_> = admin.frontends.iter().map(|f| f.settings.load()).collect();
    let routing: Vec<_> = settings.iter().map(|s| s.routing_description()).collect();
    lb_core::fingerprint_all(&routing)
}

/// Brings `lb_ready` and `lb_config_fingerprint` up to date before a scrape.
pub(super) fn update_gauges(admin: &Admin) {
    let all: Vec<&Frontend> = admin.frontends.iter().map(|f| &**f).collect();
    let ready = not_ready(admin, &all).is_none();
    admin
        .metrics
        .readiness
        .set(ready, &fingerprint(admin).to_string());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lifecycle_reads_back_what_was_set() {
        let state = LifecycleState::default();
        assert_eq!(state.get(), Lifecycle::Serving);
        for to in [
            Lifecycle::Withdrawing,
            Lifecycle::Draining,
            Lifecycle::Serving,
        ] {
            state.set(to);
            assert_eq!(state.get(), to);
        }
    }
}
