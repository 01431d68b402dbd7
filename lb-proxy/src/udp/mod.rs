//! The UDP data plane, beside the TCP one ([`crate::tcp`]): plain UDP
//! frontends with Azure's UDP semantics, and QUIC frontends routed first by
//! the server ID in their connection IDs (QUIC-LB).
//!
//! The map, from a client datagram to its reply:
//! - [`socket`]: each worker binds its own SO_REUSEPORT socket on the
//!   frontend address (the kernel keeps a client 4-tuple on one worker), and
//!   receives and sends in batches (`recvmmsg`/`sendmmsg`; `udp_batch = 1`
//!   is one `recvfrom`/`sendto` per datagram);
//! - [`quic`]: for QUIC frontends, the routing step before the table: a
//!   routable connection ID of a healthy backend wins, whatever the address;
//! - [`flows`]: lb-core's [`lb_core::UdpFlowTable`] decides (new flow, moved
//!   flow, refused, expired, evicted); this file's per-slot state carries the
//!   decision out and counts and logs every end;
//! - [`upstream`]: one connected socket per flow, bound like a TCP connect
//!   (SNAT to the node, the client's IP under `preserve`/`Local`), all in one
//!   epoll set per worker, so a reply maps to its flow without a lookup;
//! - [`delay`]: across availability zones, each direction's datagrams wait
//!   half the frontend's `cross_zone_rtt` in a bounded line, as TCP's bytes
//!   do in [`crate::tcp::delay`];
//! - [`worker`]: the per-worker loop tying them together, with the tick that
//!   applies new snapshots (a backend down moves its flows, all down ends
//!   them) and idle expiry, the zone check (a zone down ends the flows
//!   through it, logged `zone_down`), and the shutdown phases.
//!
//! Why one loop per worker and no task per flow: the worker's runtime is
//! single-threaded, so a loop that owns the table, the upstream sockets and
//! the buffers needs no `Rc`/`RefCell` or atomics to share them; one epoll
//! readiness event covers every flow with replies, which go out to their
//! clients in one `sendmmsg`. Per datagram there is no lock, no allocation
//! and no task wakeup: only the routing decision, the syscall share of a
//! batch, and a few uncontended atomic counter increments.
//!
//! Shutdown: while draining, a frontend's sockets stay open and receive, so
//! existing flows (and, on QUIC frontends, clients migrating with a routable
//! connection ID) are still served, while datagrams of new flows are
//! dropped. This deviates from the contract's "stop receiving at Draining",
//! deliberately: UDP has no accept queue to close, and a closed socket would
//! black-hole every existing flow for the rest of the drain. Flows end at
//! the cut.
//!
//! Known limit: under SNAT every flow's upstream socket holds an ephemeral
//! port, so `ip_local_port_range` caps a frontend's flows below a larger
//! `max_flows` (warned at startup, [`upstream::warn_if_ports_short`]).
//!
//! Known limit: a frontend bound to an unspecified address (`0.0.0.0`)
//! keys its flows by that address and replies from whichever local address
//! the kernel routes from (no `IP_PKTINFO` per datagram), which is right for
//! one-address hosts and loopback, not for multi-homed ones.
//!
//! Why not quinn-udp: its send path takes one destination per call (GSO
//! segments to one peer), whereas an LB's reply batch goes to many clients;
//! `sendmmsg` takes them all, and the upstream read lands straight in that
//! batch with no copy.

pub mod delay;
pub mod flows;
pub mod quic;
pub mod socket;
pub mod upstream;
pub mod worker;

#[cfg(test)]
mod tests;

pub use socket::{bind_frontend, MAX_DATAGRAM};
pub use worker::UdpWorker;
