//! `lb-core` is the sans-I/O heart of the load balancer.
//!
//! It owns every decision the data plane makes and none of the I/O:
//! - [`flow`]: flow keys and the Azure Load Balancer distribution modes;
//! - [`hash`]: the pinned flow hash that every instance and every restart agree on;
//! - [`fingerprint`]: a hash of everything that decides routing, so instances
//!   (and one instance across a reload) can be checked to route alike;
//! - [`maglev`]: weighted Maglev lookup tables (Eisenbud et al., NSDI 2016, §3.4);
//! - [`backend`]: backend sets with stable names and weights;
//! - [`health`]: the rise/fall health state machine, with flap damping;
//! - [`control`]: the control plane's health decisions as an event-in,
//!   decision-out state machine: targets, passive hold-down, readmission,
//!   reload carry-over, and when a snapshot must be rebuilt;
//! - [`snapshot`]: the immutable routing snapshot and its lock-free publication;
//! - [`hop`]: the AKS node → kube-proxy → pod hop (traffic policy, affinity, SNAT);
//! - [`proxy_protocol`]: PROXY protocol v1/v2 encoding and decoding;
//! - [`source_ranges`]: a frontend's client allowlist (an NSG's allowed source
//!   prefixes), looked up without allocation or lock;
//! - [`tcp_flow`]: one TCP flow's decisions for a completion-driven engine
//!   (connect attempts, the PROXY header first, reads and writes each way,
//!   half-close, the connect and idle timeouts, how the sockets close);
//! - [`udp_flow`]: the UDP flow table (Azure's UDP semantics: moves, ends, idle expiry);
//! - [`quic_lb`]: QUIC-LB connection IDs that carry a server ID, and the
//!   datagram classifier, so a migrating QUIC client keeps its backend.
//!
//! Nothing here opens a socket, reads a clock or draws a random number: time
//! arrives as a `now` argument and seeds arrive as arguments, so every piece is
//! testable and reproducible without a network.
//!
//! # Glossary
//!
//! One word per concept, across lb-core, lb-proxy and their docs:
//! - **frontend**: an address the balancer listens on, with its rules (an Azure
//!   load-balancing rule). Each has its own [`Snapshot`] and Maglev table.
//! - **backend**: what a frontend's Maglev table holds and a flow is hashed
//!   onto: a configured backend, or, in the hop model, a **node** (as Azure's
//!   backend pool holds an AKS cluster's nodes). Never "member" or "pool member".
//! - **node**: an AKS node in the hop model ([`hop`]): a backend of the table,
//!   whose kube-proxy then picks an endpoint.
//! - **endpoint**: a pod's address behind a node ([`EndpointSpec`]).
//! - **target**: where one connect goes: a backend's address, or the endpoint
//!   a node's kube-proxy picked.
//! - **flow**: one TCP connection, or one UDP 5-tuple session ([`FlowKey`]).
//!
//! A flow's **choices** ([`Snapshot::choices`]) are its primary backend then
//! distinct fallbacks; a node's endpoints ([`HopModel::endpoints_from`]) are
//! what its kube-proxy chooses among. A value the control plane rebuilds and
//! the data plane reads is [`Published`].

pub mod backend;
pub mod control;
pub mod fingerprint;
pub mod flow;
pub mod hash;
pub mod health;
pub mod hop;
pub mod maglev;
pub mod proxy_protocol;
pub mod quic_lb;
pub mod snapshot;
pub mod source_ranges;
pub mod tcp_flow;
pub mod udp_flow;

pub use backend::{BackendError, BackendId, BackendSet, BackendSpec};
pub use control::{Cause, ControlEvent, ControlPolicy, HealthController, HealthKey, Rebuild};
pub use fingerprint::{fingerprint_all, Fingerprint, FrontendRouting};
pub use flow::{DistributionMode, FlowKey, HashedFields, ParseModeError, Protocol};
pub use hash::{flow_hash, FlowHasher, FLOW_HASH_SEED, FLOW_HASH_VERSION};
pub use health::{HealthConfig, HealthState, ProbeOutcome, Transition};
pub use hop::{
    target_source, AffinitySeeds, AffinityTable, ClientAnnouncement, EndpointRef, EndpointSpec,
    ExternalTrafficPolicy, HopError, HopModel, NodeHealthCheck, NodeSpec, ServiceSpec,
    SessionAffinity, SnatScope, SourceSeen, TargetSource, TrafficDistribution, ZonesDown,
    DEFAULT_AFFINITY_TIMEOUT, MAX_AFFINITY_TIMEOUT,
};
pub use maglev::{
    Choices, MaglevError, MaglevTable, DEFAULT_TABLE_SIZE, MAX_CHOICES, SUPPORTED_TABLE_SIZES,
};
pub use proxy_protocol::{ProxyHeader, ProxyHeaderError};
pub use quic_lb::{
    CidRoute, Classified, Classifier, ConnectionId, DatagramKind, QuicLbCidGenerator,
    QuicLbCidParser, QuicLbConfig, QuicLbError, QuicRouter, ServerId, Unroutable,
};
pub use snapshot::{NoHealthyBackends, Published, Route, Snapshot, SnapshotError, SnapshotParams};
pub use source_ranges::{SourcePrefix, SourceRangeError, SourceRangeProblem, SourceRanges};
pub use udp_flow::{
    FlowDecision, FlowEnd, FlowEntry, FlowEvent, FlowId, FlowTableSeeds, FlowTableStats,
    UdpFlowConfig, UdpFlowTable,
};
