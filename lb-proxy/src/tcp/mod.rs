//! The TCP data plane: one task per connection, from accept to the last byte.
//!
//! - [`proxy`]: listeners (per worker or shared), accept loops, backend connects with fallbacks;
//! - [`copy`]: bidirectional copy with half-close (unless turned off) and the ALB idle timeout;
//! - [`sockmap`]: the same flow forwarded inside the kernel by a BPF
//!   SOCKHASH and stream verdict (`copy = "sockmap"`), watched from here;
//! - [`delay`]: the same copy for a cross-zone flow, each direction held for
//!   the hop's one-way delay (issue 14);
//! - [`syscall`]: the flow's recv, send and close as direct system calls.
//!
//! The UDP data plane stands beside it in [`crate::udp`]; both take every
//! decision from lb-core and share the frontends, metrics and health of
//! [`crate::state`].

pub mod copy;
pub mod delay;
pub mod proxy;
pub mod sockmap;
pub mod syscall;
