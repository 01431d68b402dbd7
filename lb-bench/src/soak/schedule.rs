//! Time in a soak: waiting for the next scheduled event without outliving the
//! phase, and polling an observable condition (a metric, a gauge) until it
//! holds or a bound passes. Nothing here sleeps in place of a condition: the
//! waits are either the schedule itself or a poll of what is awaited.

use std::time::{Duration, Instant};

/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(20);

/// Sleeps until `at`, but never past `until` (the phase's end). `true` when
/// `at` came first, so the scheduled event is due; `false` when the phase ended.
pub(super) fn sleep_until(at: Instant, until: Instant) -> bool {
    let wake = at.min(until);
    if let Some(left) = wake.checked_duration_since(Instant::now()) {
        std::thread::sleep(left);
    }
    at <= until
}

/// Polls `holds` until it returns true (`Some(when)`) or `timeout` passes (`None`).
pub(super) fn poll_until(timeout: Duration, mut holds: impl FnMut() -> bool) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if holds() {
            return Some(Instant::now());
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phase_end_cuts_the_wait_short() {
        let now = Instant::now();
        assert!(!sleep_until(now + Duration::from_secs(60), now));
        assert!(sleep_until(now, now + Duration::from_secs(60)));
    }

    #[test]
    fn polling_gives_up_after_its_bound() {
        assert!(poll_until(Duration::from_millis(50), || false).is_none());
        let mut calls = 0;
        assert!(poll_until(Duration::from_secs(5), || {
            calls += 1;
            calls == 3
        })
        .is_some());
        assert_eq!(calls, 3);
    }
}
