//! The TCP data plane: one task per connection, from accept to the last byte.
//!
//! - [`proxy`]: listeners (per worker or shared), accept loops, backend connects with fallbacks;
//! - [`copy`]: bidirectional copy with half-close (unless turned off) and the ALB idle timeout;
//! - [`sockmap`]: the same flow forwarded inside the kernel by a BPF
//!   SOCKHASH and stream verdict (`copy = "sockmap"`), watched from here;
//! - [`delay`]: the same copy for a cross-zone flow, each direction held for
//!   the hop's one-way delay (issue 14);
//! - [`pipe`]: splice(2) through a pipe, how both engines move a bulk transfer;
//! - [`syscall`]: the flow's recv, send and close as direct system calls;
//! - [`ring`]: the other engine (`engine = "io-uring"`): each worker's
//!   frontends served by one io_uring loop, every decision of a flow taken by
//!   `lb_core::tcp_flow`.
//!
//! The UDP data plane stands beside it in [`crate::udp`]; both take every
//! decision from lb-core and share the frontends, metrics and health of
//! [`crate::state`].

pub mod copy;
pub mod delay;
pub mod pipe;
pub mod proxy;
pub mod ring;
pub mod sockmap;
pub mod syscall;

/// What serves a TCP frontend's flows on each worker. Left out of a
/// frontend's config, the io_uring engine where the frontend can run on it,
/// tokio where its `copy` mode or zoned nodes need tokio (`config::validate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TcpEngine {
    /// The worker's tokio runtime: a task per flow, readiness-driven copy
    /// ([`proxy`], [`copy`]), with every copy mode and the cross-zone delay line.
    Tokio,
    /// One io_uring loop per worker ([`ring`]): multishot accept, connects,
    /// reads and writes as completions, no task per flow. Where io_uring is
    /// refused, the frontend runs on tokio (one warning, `lb_io_uring_available` 0).
    IoUring,
}
