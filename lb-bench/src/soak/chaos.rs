//! The soak's disturbances, each on its own thread until the phase ends: a
//! reload every `reload_every` (node-1's weight alternating between 2 and 1),
//! and a SIGKILL of the flapped node every `flap_every`, restarted on the
//! same address half a period later. Each waits for lb-proxy to show what it
//! did in `/metrics` and records it; what did not show in time is a problem.

use std::time::{Duration, Instant};

use super::mix::{Aim, Live};
use super::rig::{Rig, FLAPPED};
use super::schedule::sleep_until;
use super::timeline::Flap;

/// Reloads until the phase ends.
pub(super) fn reloader(rig: &Rig, every: Duration, aim: Aim, live: &Live) {
    let mut next = Instant::now();
    loop {
        next += every;
        if !sleep_until(next, aim.until) {
            return;
        }
        let mut done = 0;
        live.record(|t| done = t.reloads);
        let weight = if done % 2 == 0 { 2 } else { 1 };
        let at = aim.epoch.elapsed();
        match rig.reload(weight) {
            Ok(()) => live.record(|t| t.reloads += 1),
            Err(e) => live.record(|t| t.problems.push((at, format!("reload: {e}")))),
        }
    }
}

/// Kills and restarts the flapped node until the phase ends; it is running
/// (and, unless a problem was recorded, marked up) when this returns.
pub(super) fn flapper(rig: &Rig, every: Duration, aim: Aim, live: &Live) {
    let mut next = Instant::now();
    loop {
        next += every;
        if !sleep_until(next, aim.until) {
            return;
        }
        let killed_at = Instant::now();
        let down = rig.kill_flapped();
        // Down for half a period, or until the phase ends.
        sleep_until(killed_at + every / 2, aim.until);
        let restarted_at = Instant::now();
        let restarted = rig.restart_flapped();
        let since = |t: Instant| t.duration_since(aim.epoch);
        let killed = since(killed_at);
        let mut problems = Vec::new();
        if down.is_none() {
            problems.push(format!("{FLAPPED} was not marked down after its kill"));
        }
        let up = match restarted {
            Ok(Some(up)) => Some(since(up)),
            Ok(None) => {
                problems.push(format!("{FLAPPED} was not marked up after its restart"));
                None
            }
            Err(e) => {
                problems.push(format!("{FLAPPED} did not restart: {e}"));
                None
            }
        };
        live.record(|t| {
            t.flaps.push(Flap {
                killed,
                down_seen: down.map(since),
                restarted: since(restarted_at),
                up_seen: up,
            });
            t.problems.extend(problems.into_iter().map(|p| (killed, p)));
        });
    }
}
