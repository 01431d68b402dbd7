//! `lb-proxy` is the load balancer's I/O shell and binary. It owns every socket
//! and timer and asks `lb-core` for every decision:
//! - [`tcp`]: the TCP data plane (listeners, accept loops, connects with
//!   fallbacks, the copy with half-close and the ALB idle timeout);
//! - [`udp`]: the UDP data plane beside it (plain UDP and QUIC frontends: flow
//!   tables, per-flow upstream sockets, batched receive and send, QUIC-LB routing);
//! - [`target`]: where a flow's upstream goes (backend or pod endpoint) and
//!   the source it is bound to, shared by both planes;
//! - [`probe`] and [`control`]: health probes, passive health, snapshot rebuilds, reload;
//! - [`config`]: the TOML schema and its located errors; [`k8s`]: Service
//!   manifests in, translated as cloud-provider-azure configures the ALB;
//! - [`admin`] and [`metrics`]: the admin HTTP endpoint and Prometheus metrics;
//! - [`alloc`]: the global allocator, which keeps a worker's per-connection blocks for the next connection;
//! - [`clock`]: the coarse monotonic clock read per connection for second-scale deadlines;
//! - [`fds`]: the file-descriptor reserve that keeps the control plane alive when fds run out;
//! - [`flowlog`]: the opt-in per-flow log, written off the data plane;
//! - [`server`]: threads, signals and graceful drain; [`shutdown`]: the phases of
//!   a shutdown and the cut of flows still open at its end; [`demo`]: the built-in demo;
//! - [`upgrade`]: zero-downtime binary upgrade, the listeners handed to the
//!   next process over a Unix socket (`SCM_RIGHTS`).

pub mod admin;
pub mod alloc;
pub mod clock;
pub mod config;
pub mod control;
pub mod demo;
pub mod fds;
pub mod flowlog;
pub mod k8s;
pub mod metrics;
pub mod probe;
pub mod server;
pub mod shutdown;
pub mod state;
pub mod target;
pub mod tcp;
#[cfg(test)]
mod test_util;
pub mod udp;
pub mod upgrade;
