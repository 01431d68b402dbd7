//! The io_uring engine (`engine = "io-uring"`): on each worker, one loop on
//! one ring serves the worker's listeners of every frontend that asks for it.
//! No task per flow and no readiness round trip: the accept is multishot,
//! connects, reads and writes are completions, and a flow's decisions are all
//! `lb_core::tcp_flow::TcpFlow`'s (half-close, the corked last write, the
//! connect timeout and fallbacks, the idle timeout and `tcp_reset_on_idle`,
//! the PROXY header). What it cut and what it did not, measured:
//! docs/research/new-connections.md, "io_uring".
//!
//! - [`worker`]: the loop: listeners, phases, flows from accept to record,
//!   completions;
//! - [`ops`]: a flow's operations carried out, and the slot that keeps their
//!   memory;
//! - [`flow`]: one flow's admission, connects, counters and flow-log record,
//!   as the tokio engine keeps them;
//! - [`buffers`]: the read buffers, a pool the kernel picks from;
//! - [`bulk`]: a bulk transfer's runs by splice(2) through a pipe, as the
//!   tokio engine's `auto` copy moves them;
//! - [`timers`]: the flows' deadlines.
//!
//! The loop runs on a thread of its own beside the worker's tokio runtime
//! (`lb-ring-N`), which keeps the worker's UDP frontends and tokio-engine TCP
//! frontends, forwards phase changes to the loop through an eventfd, and
//! waits for the loop to stop accepting as it waits for its own accept loops.
//! Where io_uring is refused (`io_uring_setup` or the buffer ring: seccomp,
//! `kernel.io_uring_disabled`, an old kernel), [`start`] hands the listeners
//! back and the worker serves them on tokio, after one warning and with
//! `lb_io_uring_available` at 0: never a failed start.

mod buffers;
mod bulk;
mod flow;
mod ops;
mod timers;
mod worker;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};

use prometheus::IntGauge;
use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

use crate::shutdown::Phase;
pub use worker::Served;

/// Set (to anything) to refuse io_uring, as a kernel that forbids it would:
/// a test hook for the fallback.
pub const DISABLE_ENV: &str = "LB_PROXY_IO_URING_DISABLE";

/// 1 when the io_uring engine runs (frontends with `engine = "io-uring"` are
/// served by it), 0 when the kernel refused it and they run on tokio.
pub fn available_gauge() -> &'static IntGauge {
    static G: LazyLock<IntGauge> = LazyLock::new(|| {
        IntGauge::new(
            "lb_io_uring_available",
            "1 when the io_uring engine serves frontends with engine = \"io-uring\", 0 when io_uring was refused and they run on tokio.",
        )
        .expect("valid metric")
    });
    &G
}

/// A worker's running loop, as its runtime sees it.
pub struct RingHandle {
    wake: Arc<OwnedFd>,
    accept_stopped: oneshot::Receiver<()>,
}

impl RingHandle {
    /// Tells the loop of every phase change (run on the worker's runtime,
    /// until the process ends).
    pub async fn forward_phases(wake: Arc<OwnedFd>, mut phase: watch::Receiver<Phase>) {
        while phase.changed().await.is_ok() {
            let one: u64 = 1;
            // SAFETY: an 8-byte write from a local to an eventfd we hold.
            unsafe {
                libc::write(wake.as_raw_fd(), (&one as *const u64).cast(), 8);
            }
        }
    }

    /// The eventfd [`Self::forward_phases`] writes, and the loop's word that
    /// it has stopped accepting (after a drain or hand-over began).
    pub fn into_parts(self) -> (Arc<OwnedFd>, oneshot::Receiver<()>) {
        (self.wake, self.accept_stopped)
    }
}

/// Why the engine could not start on a worker, with the listeners it was given.
pub struct Refused {
    pub why: io::Error,
    pub served: Vec<Served>,
}

/// Starts worker `w`'s loop on its own thread, serving `served`; returns once
/// it accepts, or hands the listeners back where io_uring is refused.
pub fn start(
    w: usize,
    served: Vec<Served>,
    phase: watch::Receiver<Phase>,
) -> Result<RingHandle, Refused> {
    let wake = match eventfd() {
        Ok(fd) => Arc::new(fd),
        Err(why) => return Err(refused(why, served)),
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stopped_tx, stopped_rx) = oneshot::channel();
    let loop_wake = Arc::clone(&wake);
    let spawned = std::thread::Builder::new()
        .name(format!("lb-ring-{w}"))
        .spawn(move || {
            crate::alloc::cache_blocks_on_this_thread();
            // Built on this thread: a single-issuer ring belongs to the
            // thread that made it.
            match worker::Engine::build_ring() {
                Ok(ring) => {
                    let _ = ready_tx.send(Ok(()));
                    worker::Engine::new(ring, served, phase, loop_wake, stopped_tx).run()
                }
                Err(why) => {
                    let _ = ready_tx.send(Err((why, served)));
                }
            }
        });
    if let Err(why) = spawned {
        return Err(Refused {
            why,
            served: Vec::new(),
        });
    }
    match ready_rx.recv() {
        Ok(Ok(())) => {
            available_gauge().set(1);
            Ok(RingHandle {
                wake,
                accept_stopped: stopped_rx,
            })
        }
        Ok(Err((why, served))) => Err(refused(why, served)),
        Err(_) => Err(refused(
            io::Error::other("the ring thread ended"),
            Vec::new(),
        )),
    }
}

/// Records the refusal (one line per process) and hands the listeners back.
/// A warning where a frontend asked for the ring; where every one was left
/// to the default, an info line, so that a container whose seccomp profile
/// refuses io_uring (Docker's and containerd's defaults do) does not warn at
/// every start about an engine nobody chose.
fn refused(why: io::Error, served: Vec<Served>) -> Refused {
    static SAID: AtomicBool = AtomicBool::new(false);
    available_gauge().set(0);
    if !SAID.swap(true, Ordering::Relaxed) {
        let asked = served
            .iter()
            .any(|(_, fe, _)| !fe.settings.load().engine_auto);
        if asked {
            warn!(reason = %why, "io_uring engine unavailable: frontends with engine = \"io-uring\" run on tokio");
        } else {
            info!(reason = %why, "io_uring engine unavailable: TCP frontends run on the tokio engine");
        }
    }
    Refused { why, served }
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd(2) with valid flags; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor, ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
