//! The file-descriptor reserve: the data plane never holds the last
//! `fd_reserve` descriptors below `RLIMIT_NOFILE`, so that when clients
//! exhaust the process's fds the admin endpoint, health probes and reloads
//! still have some to work with, and `/metrics` can show what is happening.
//!
//! Linux hands out the lowest free descriptor, so a data-plane descriptor
//! numbered `n` means `0..n` are all taken. Refusing to keep any data-plane
//! descriptor numbered at or above `limit - reserve` therefore leaves the top
//! `reserve` numbers to everything else, without counting open files.

use std::cell::Cell;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::clock;

/// Descriptors kept for the control plane unless the config says otherwise:
/// admin connections, a probe per backend in flight, a config file, `/proc` reads.
pub const DEFAULT_FD_RESERVE: u32 = 64;

static RESERVE: AtomicU32 = AtomicU32::new(DEFAULT_FD_RESERVE);

/// Sets the reserve (at start and on reload).
pub fn set_reserve(reserve: u32) {
    RESERVE.store(reserve, Ordering::Relaxed);
}

/// The soft `RLIMIT_NOFILE`, read from the kernel.
fn soft_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct, which `limit` is.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return u64::MAX;
    }
    limit.rlim_cur
}

/// How long a worker trusts its copy of the limit. Operators lower or raise
/// it on a running process with `prlimit`; re-reading it at most this often
/// keeps the getrlimit syscall off most connections.
const LIMIT_MAX_AGE: Duration = Duration::from_millis(100);

thread_local! {
    static CACHED_LIMIT: Cell<Option<(u64, Duration)>> = const { Cell::new(None) };
}

fn cached_soft_fd_limit(fresh: bool) -> u64 {
    CACHED_LIMIT.with(|cache| {
        // Two reads per connection: the coarse clock is ample for a 100 ms age.
        let now = clock::coarse_now();
        match cache.get() {
            Some((limit, at)) if !fresh && now.saturating_sub(at) < LIMIT_MAX_AGE => limit,
            _ => {
                let limit = soft_fd_limit();
                cache.set(Some((limit, now)));
                limit
            }
        }
    })
}

/// Whether the data plane may keep descriptor `fd` open without eating into the reserve.
pub fn data_plane_may_hold(fd: RawFd) -> bool {
    let reserve = u64::from(RESERVE.load(Ordering::Relaxed));
    let needed = (fd as u64).saturating_add(reserve);
    // Refuse only on a fresh reading: the limit may have been raised since.
    needed < cached_soft_fd_limit(false) || needed < cached_soft_fd_limit(true)
}

/// The error a data-plane descriptor over the reserve line is refused with.
pub fn reserve_reached() -> io::Error {
    io::Error::new(
        io::ErrorKind::OutOfMemory,
        "file descriptors: only the control-plane reserve is left (fd_reserve)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_near_the_limit_are_refused() {
        let limit = soft_fd_limit();
        assert!(limit > 0);
        set_reserve(8);
        assert!(data_plane_may_hold(3));
        if limit < u64::from(i32::MAX as u32) {
            let limit = limit as RawFd;
            assert!(data_plane_may_hold(limit - 9));
            assert!(!data_plane_may_hold(limit - 8));
            assert!(!data_plane_may_hold(limit - 1));
        }
        set_reserve(DEFAULT_FD_RESERVE);
    }
}
