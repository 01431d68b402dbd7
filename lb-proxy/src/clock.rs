//! The coarse monotonic clock (`CLOCK_MONOTONIC_COARSE`: the time at the
//! kernel's last tick) for what is read on every connection but measured in
//! seconds: a flow's last activity against its idle timeout, the age of a
//! cached limit. A precise `Instant::now()` reads the TSC and scales it; this
//! reads one word the kernel already wrote (what that saves:
//! docs/research/new-connections.md, "Change E").
//!
//! Readings are `Duration`s on the monotonic clock's timeline; two of them
//! differ from the true interval by at most [`resolution`].

use std::sync::OnceLock;
use std::time::Duration;

// glibc's clock_gettime, not rustix's: rustix parses the vDSO itself, and
// that crashes under valgrind (no real vDSO there), where glibc falls back.
// Not a cancellation point, so none of tcp::syscall's reasons apply.

/// Now, on the coarse clock.
pub fn coarse_now() -> Duration {
    read(libc::clock_gettime)
}

/// How far a coarse reading may lag the precise clock: one kernel tick
/// (1–10 ms, by `CONFIG_HZ`).
pub fn resolution() -> Duration {
    static RESOLUTION: OnceLock<Duration> = OnceLock::new();
    *RESOLUTION.get_or_init(|| read(libc::clock_getres))
}

/// One reading of the coarse clock by `call` (clock_gettime or clock_getres).
fn read(
    call: unsafe extern "C" fn(libc::clockid_t, *mut libc::timespec) -> libc::c_int,
) -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec for the call to write; the clock exists
    // on every Linux since 2.6.32, so the call cannot fail and `t` stays zero
    // if it somehow did.
    unsafe { call(libc::CLOCK_MONOTONIC_COARSE, &mut t) };
    // The monotonic clock never reads negative.
    Duration::new(
        t.tv_sec.max(0) as u64,
        t.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// The coarse clock keeps time with the precise one, within its
    /// resolution. Each coarse reading is bracketed by precise ones, so the
    /// bounds hold however the thread is preempted between the reads.
    #[test]
    fn coarse_readings_keep_time_within_the_resolution() {
        let res = resolution();
        assert!(
            res > Duration::ZERO && res <= Duration::from_millis(10),
            "{res:?}"
        );
        let (t0, c0, ta) = (Instant::now(), coarse_now(), Instant::now());
        std::thread::sleep(Duration::from_millis(30));
        let (tb, c1, t1) = (Instant::now(), coarse_now(), Instant::now());
        let coarse = c1 - c0;
        // c0 lags at most `res` behind t0 and c1 is no later than t1; c0 is
        // no later than ta and c1 lags at most `res` behind tb.
        assert!(coarse <= (t1 - t0) + res, "{coarse:?} vs {:?}", t1 - t0);
        assert!(coarse + res >= tb - ta, "{coarse:?} vs {:?}", tb - ta);
    }
}
