//! Configuration: the TOML schema, its validation, and errors that name file, line and field.
//!
//! Parsing and validation happen completely before anything binds, and `check`,
//! startup and SIGHUP reload all go through [`load_file`], so they print the
//! same error for the same mistake.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lb_core::{
    BackendSpec, DistributionMode, ExternalTrafficPolicy, HealthConfig, NoHealthyBackends,
    NodeSpec, ServiceSpec, SessionAffinity, SnapshotParams, SnatScope, TrafficDistribution,
};
use serde::Deserialize;
use toml::Spanned;

use crate::tcp::copy::CopyMode;
use crate::tcp::TcpEngine;

mod names;
mod protocol;
mod validate;

/// A config mistake, located.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        } else {
            write!(f, "{}: ", self.file)?;
        }
        if !self.field.is_empty() {
            write!(f, "field `{}`: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

// ---------------------------------------------------------------------------
// The validated model that the rest of the proxy uses.

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub workers: usize,
    /// File descriptors the data plane leaves to the admin endpoint, probes and reloads.
    pub fd_reserve: u32,
    pub drain_timeout: Duration,
    /// On SIGTERM, how long `/ready` answers 503 while the listeners keep
    /// accepting, before the drain: time for a routing daemon polling
    /// `/ready` to withdraw the route, and for the withdrawal to reach the router.
    pub withdraw_delay: Duration,
    pub admin: AdminConfig,
    pub frontends: Vec<FrontendConfig>,
    pub flow_log: Option<FlowLogConfig>,
    /// Zones taken down by config (`zones_down`, reloadable): their nodes get
    /// no new flows, their pods are not ready, flows through them end.
    pub zones_down: BTreeSet<String>,
}

impl Config {
    /// Gives each frontend whose `accept` is left to `auto` the mode of the
    /// listeners already in place (`running(index, frontend)`, `None` where
    /// there are none), so that a reload, or a take-over by a build whose
    /// `auto` picks otherwise, keeps those listeners instead of refusing.
    pub fn keep_running_accept_modes(
        &mut self,
        running: impl Fn(usize, &FrontendConfig) -> Option<AcceptMode>,
    ) {
        for (i, fe) in self.frontends.iter_mut().enumerate() {
            if let Some(mode) = running(i, fe).filter(|_| fe.accept_auto) {
                fe.accept = mode;
            }
        }
    }
}

/// Where and how the per-flow log is written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowLogConfig {
    /// A file path, or `-` for standard output.
    pub path: PathBuf,
    pub format: FlowLogFormat,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum FlowLogFormat {
    #[default]
    Text,
    Json,
}

/// How a backend learns the client's address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientAddress {
    /// Plain backends see the balancer; with nodes, a cross-node hop shows the node IP.
    #[default]
    Snat,
    /// Bind the outgoing connection to the client's own IP (every 127.x address is local).
    Preserve,
    /// Send a PROXY protocol v1 line before the client's bytes.
    ProxyProtocolV1,
    /// Send a PROXY protocol v2 header before the client's bytes.
    ProxyProtocolV2,
}

impl ClientAddress {
    /// The mode as lb-core's [`lb_core::target_source`] takes it (the header's version aside).
    pub fn announcement(self) -> lb_core::ClientAnnouncement {
        match self {
            ClientAddress::Snat => lb_core::ClientAnnouncement::Snat,
            ClientAddress::Preserve => lb_core::ClientAnnouncement::Preserve,
            ClientAddress::ProxyProtocolV1 | ClientAddress::ProxyProtocolV2 => {
                lb_core::ClientAnnouncement::ProxyHeader
            }
        }
    }
}

/// The AKS node hop: nodes with their pods, and the Service's policies.
#[derive(Clone, Debug, PartialEq)]
pub struct HopConfig {
    pub nodes: Vec<NodeSpec>,
    pub service: ServiceSpec,
}

/// How a frontend's connections are spread over the worker threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcceptMode {
    /// One SO_REUSEPORT listener per worker: the kernel hashes each new
    /// connection to one worker, and no worker is woken for another's
    /// connections. Scales with cores.
    Reuseport,
    /// One listener shared by every worker, each taking one connection per
    /// runtime turn: whichever worker is free takes the next connection, so
    /// one that is busy or waiting for a CPU does not hold up connections
    /// hashed to it. Each connection wakes every idle worker, so this suits
    /// few workers (see [`SHARED_ACCEPT_MAX_WORKERS`]).
    Shared,
}

/// The most workers `accept = "auto"` (the default) lets share one listener;
/// more get one SO_REUSEPORT listener each. Measured on 2 CPUs shared with the
/// load generator and the backends (docs/research/new-connections.md,
/// "Change G", quoted in README.md's "Accepting"): at 2 workers `shared` took
/// more new connections/s than `reuseport`; at 4 it took fewer, every
/// connection waking the idle workers for nothing.
pub const SHARED_ACCEPT_MAX_WORKERS: usize = 2;

impl AcceptMode {
    /// What `auto` picks for a process with `workers` worker threads.
    pub fn auto(workers: usize) -> Self {
        // One worker has one listener either way; keep it the SO_REUSEPORT
        // one it always was.
        if (2..=SHARED_ACCEPT_MAX_WORKERS).contains(&workers) {
            AcceptMode::Shared
        } else {
            AcceptMode::Reuseport
        }
    }
}

/// A frontend's `accept` as written: a mode, or `auto` (also when absent).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum AcceptSetting {
    #[default]
    Auto,
    Reuseport,
    Shared,
}

impl AcceptSetting {
    /// The mode for a frontend of `protocol` in a process of `workers`. UDP
    /// sockets are one per worker whatever is asked (and `accept` is refused there).
    fn resolve(self, workers: usize, protocol: FrontendProtocol) -> AcceptMode {
        match self {
            _ if protocol.is_udp() => AcceptMode::Reuseport,
            AcceptSetting::Auto => AcceptMode::auto(workers),
            AcceptSetting::Reuseport => AcceptMode::Reuseport,
            AcceptSetting::Shared => AcceptMode::Shared,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct AdminConfig {
    /// `None` disables the admin endpoint.
    pub listen: Option<SocketAddr>,
}

/// What a frontend balances: TCP connections, UDP flows, or QUIC connections
/// (UDP flows routed first by the server ID in their connection IDs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FrontendProtocol {
    #[default]
    Tcp,
    Udp,
    Quic,
}

impl FrontendProtocol {
    pub const fn as_str(self) -> &'static str {
        match self {
            FrontendProtocol::Tcp => "tcp",
            FrontendProtocol::Udp => "udp",
            FrontendProtocol::Quic => "quic",
        }
    }

    /// UDP and QUIC frontends share the UDP data plane.
    pub const fn is_udp(self) -> bool {
        matches!(self, FrontendProtocol::Udp | FrontendProtocol::Quic)
    }
}

/// A QUIC frontend's QUIC-LB layout, and each backend's server ID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuicFrontendConfig {
    pub lb: lb_core::QuicLbConfig,
    /// By backend name, as configured.
    pub server_ids: Vec<(String, lb_core::ServerId)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct FrontendConfig {
    pub name: String,
    pub listen: SocketAddr,
    pub protocol: FrontendProtocol,
    /// UDP/QUIC: the flow table's bound for the frontend, split evenly over workers.
    pub max_flows: usize,
    /// UDP/QUIC: datagrams per receive/send syscall (1 = no batching).
    pub udp_batch: usize,
    /// QUIC only: the QUIC-LB config and server IDs.
    pub quic: Option<QuicFrontendConfig>,
    pub backlog: u32,
    pub accept: AcceptMode,
    /// `accept` was left to `auto`: a reload or a take-over keeps the mode of
    /// the listeners in place ([`Config::keep_running_accept_modes`]).
    pub accept_auto: bool,
    pub max_connections: usize,
    pub connect_timeout: Duration,
    pub connect_retries: usize,
    pub idle_timeout: Duration,
    pub tcp_reset_on_idle: bool,
    /// TCP half-close: a FIN one way leaves the other way open (default).
    /// `false`: the first FIN ends the flow ([`crate::tcp::copy::Ending`]).
    pub half_close: bool,
    pub copy: CopyMode,
    /// What serves its flows on each worker (a listener setting: a reload
    /// cannot move a listener between engines).
    pub engine: TcpEngine,
    /// `engine` was left out (the engine resolved for it): where the kernel
    /// refuses io_uring, that is said at info level, not as a warning.
    pub engine_auto: bool,
    /// From `[admin] byte_metrics`: count bytes in the data plane.
    pub byte_metrics: bool,
    pub params: SnapshotParams,
    pub health: ProbeConfig,
    pub client_address: ClientAddress,
    /// Plain backends (the simple case). Empty when `hop` is set.
    pub backends: Vec<BackendSpec>,
    /// Nodes and pods behind the ALB, when the hop model is used.
    pub hop: Option<HopConfig>,
    /// The round trip a node → pod hop across zones adds (half each way):
    /// the frontend's `cross_zone_rtt`, else the top-level one, else
    /// [`DEFAULT_CROSS_ZONE_RTT`].
    pub cross_zone_rtt: Duration,
    /// The clients allowed in (an NSG's allowed source prefixes, what a
    /// Service's `loadBalancerSourceRanges` becomes); `None`: every client.
    /// Never an empty list: validation refuses `source_ranges = []`.
    pub source_ranges: Option<lb_core::SourceRanges>,
    /// The Kubernetes Service port this frontend was translated from
    /// (`run --service`); `None` for a TOML or flags frontend.
    pub origin: Option<ServiceOrigin>,
}

/// Where a frontend translated from a Service manifest came from, for
/// `/backends` and `/explain` (see `k8s::frontends`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceOrigin {
    pub namespace: String,
    pub service: String,
    /// `spec.ports[].name`, if the port has one.
    pub port_name: Option<String>,
    /// `spec.ports[].port`: the Azure rule's frontend port.
    pub port: u16,
    /// `tcp` or `udp`.
    pub protocol: FrontendProtocol,
    /// The Azure rule's name (`a<uid32>-TCP-80`), as `lb-proxy rules` prints it.
    pub rule: String,
    /// `spec.trafficDistribution`, as written.
    pub traffic_distribution: Option<String>,
    /// Each node's `topology.kubernetes.io/zone` label (or the lab's `zone`), by node name.
    pub node_zones: Vec<(String, Option<String>)>,
}

impl FrontendConfig {
    /// Everything about this frontend that decides where a flow goes, as
    /// lb-core's fingerprint takes it (health and timeouts are not in it).
    pub fn routing_description(&self) -> lb_core::FrontendRouting<'_> {
        lb_core::FrontendRouting {
            name: &self.name,
            protocol: self.protocol.as_str(),
            listen_port: self.listen.port(),
            mode: self.params.mode,
            seed: self.params.seed,
            table_size: self.params.table_size,
            hash_version: lb_core::FLOW_HASH_VERSION,
            no_healthy_backends: self.params.no_healthy_backends,
            source_ranges: self.source_ranges.as_ref(),
            backends: &self.backends,
            hop: self.hop.as_ref().map(|h| lb_core::fingerprint::HopRouting {
                nodes: &h.nodes,
                service: &h.service,
            }),
            quic: self
                .quic
                .as_ref()
                .map(|q| lb_core::fingerprint::QuicRouting {
                    layout: q.lb,
                    server_ids: &q.server_ids,
                }),
        }
    }

    /// This frontend's config fingerprint.
    pub fn fingerprint(&self) -> lb_core::Fingerprint {
        self.routing_description().fingerprint()
    }

    /// Settings that need new sockets, which a reload cannot change in place.
    pub fn listener_identity(&self) -> (FrontendProtocol, SocketAddr, u32, AcceptMode, TcpEngine) {
        (
            self.protocol,
            self.listen,
            self.backlog,
            self.accept,
            self.engine,
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    /// No active probes: passive failures alone decide health.
    None,
    Tcp,
    Http {
        path: String,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct ProbeConfig {
    pub kind: ProbeKind,
    /// Probe this port on the target's IP instead of the target's own port
    /// (as an Azure probe has its own port; a UDP service needs a TCP or HTTP one).
    pub port: Option<u16>,
    pub interval: Duration,
    pub timeout: Duration,
    pub thresholds: HealthConfig,
}

// ---------------------------------------------------------------------------
// The raw TOML schema. Unknown fields are errors everywhere.

fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    workers: Option<Spanned<usize>>,
    fd_reserve: Option<Spanned<u32>>,
    #[serde(default, with = "humantime_serde::option")]
    drain_timeout: Option<Duration>,
    withdraw_delay: Option<Spanned<HumanDuration>>,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    frontends: Vec<Spanned<RawFrontend>>,
    flow_log: Option<RawFlowLog>,
    cross_zone_rtt: Option<Spanned<HumanDuration>>,
    #[serde(default)]
    zones_down: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlowLog {
    path: PathBuf,
    #[serde(default)]
    format: FlowLogFormat,
}

/// A duration written as humantime text (`"30s"`), so that it can be
/// [`Spanned`] and an out-of-range value is located at its own line.
#[derive(Clone, Copy, Deserialize)]
#[serde(transparent)]
struct HumanDuration(#[serde(with = "humantime_serde")] Duration);

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawService {
    #[serde(default)]
    external_traffic_policy: ExternalTrafficPolicy,
    #[serde(default)]
    session_affinity: SessionAffinity,
    timeout_seconds: Option<Spanned<u64>>,
    #[serde(default)]
    snat: SnatScope,
    #[serde(default)]
    traffic_distribution: TrafficDistribution,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: Spanned<String>,
    address: Spanned<std::net::IpAddr>,
    #[serde(default)]
    endpoints: Vec<Spanned<RawEndpoint>>,
    zone: Option<Spanned<String>>,
}

/// An endpoint: `"IP:PORT"`, or a table `{ address = "IP:PORT", ready = false }`.
enum RawEndpoint {
    Address(SocketAddr),
    Detailed(RawEndpointTable),
}

// By hand rather than `#[serde(untagged)]`: an untagged enum answers every
// mistake with "data did not match any variant", where this names what is wrong
// (the address, the field of the table).
impl<'de> Deserialize<'de> for RawEndpoint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawEndpoint;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an endpoint: \"IP:PORT\" or { address = \"IP:PORT\", ready = BOOL }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawEndpoint, E> {
                v.parse().map(RawEndpoint::Address).map_err(|_| {
                    E::custom(format!(
                        "endpoint `{v}` is not IP:PORT, e.g. \"127.0.2.2:8000\""
                    ))
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RawEndpoint, A::Error> {
                let table = serde::de::value::MapAccessDeserializer::new(map);
                RawEndpointTable::deserialize(table).map(RawEndpoint::Detailed)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpointTable {
    address: SocketAddr,
    #[serde(default = "yes")]
    ready: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<Spanned<SocketAddr>>,
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    allow_non_loopback: bool,
    /// Count bytes per read in the data plane (for `lb_backend_*_bytes_total`).
    #[serde(default = "yes")]
    byte_metrics: bool,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            listen: None,
            enabled: None,
            allow_non_loopback: false,
            byte_metrics: true,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFrontend {
    name: Spanned<String>,
    listen: Spanned<SocketAddr>,
    #[serde(default)]
    distribution: DistributionMode,
    protocol: Option<Spanned<FrontendProtocol>>,
    // TCP only (refused on udp/quic frontends, so each is located when present).
    backlog: Option<Spanned<u32>>,
    max_connections: Option<Spanned<usize>>,
    connect_timeout: Option<Spanned<HumanDuration>>,
    connect_retries: Option<Spanned<usize>>,
    tcp_reset_on_idle: Option<Spanned<bool>>,
    half_close: Option<Spanned<bool>>,
    copy: Option<Spanned<CopyMode>>,
    engine: Option<Spanned<TcpEngine>>,
    accept: Option<Spanned<AcceptSetting>>,
    // UDP and QUIC only (refused on tcp frontends).
    max_flows: Option<Spanned<usize>>,
    udp_batch: Option<Spanned<usize>>,
    quic: Option<Spanned<RawQuic>>,
    // Any protocol.
    idle_timeout: Option<Spanned<HumanDuration>>,
    no_healthy_backends: Option<Spanned<NoHealthyBackends>>,
    table_size: Option<Spanned<u32>>,
    hash_seed: Option<u64>,
    #[serde(default)]
    health: Option<Spanned<RawHealth>>,
    client_address: Option<Spanned<ClientAddress>>,
    #[serde(default)]
    backends: Vec<Spanned<RawBackend>>,
    service: Option<Spanned<RawService>>,
    #[serde(default)]
    nodes: Vec<Spanned<RawNode>>,
    source_ranges: Option<Spanned<Vec<Spanned<String>>>>,
    cross_zone_rtt: Option<Spanned<HumanDuration>>,
}

/// `[frontends.quic]`: the QUIC-LB plaintext layout the backends' CIDs use.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuic {
    config_id: Spanned<u8>,
    server_id_length: Spanned<usize>,
    nonce_length: Option<Spanned<usize>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    kind: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    port: Option<Spanned<u16>>,
    interval: Option<Spanned<HumanDuration>>,
    timeout: Option<Spanned<HumanDuration>>,
    rise: Option<Spanned<u32>>,
    fall: Option<Spanned<u32>>,
    rejected_marks_down: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    name: Spanned<String>,
    address: Spanned<SocketAddr>,
    weight: Option<Spanned<u32>>,
    /// QUIC frontends only: the server ID its connection IDs carry, in hex.
    server_id: Option<Spanned<String>>,
}

pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9180";
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(4 * 60);
/// Azure documents no inbound UDP idle timeout; NAT Gateway's UDP idle timer
/// is a fixed 4 minutes, so that is the default for UDP and QUIC flows.
pub const DEFAULT_UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(4 * 60);
/// A UDP/QUIC frontend's flow-table bound (split evenly over the workers).
/// Each flow holds a socket and, under SNAT, an ephemeral port of the
/// balancer's address: this stays inside Linux's default
/// `ip_local_port_range` (28,232 ports), with room left for TCP connects, so
/// the default never promises flows the kernel cannot open.
pub const DEFAULT_MAX_FLOWS: usize = 16_384;
/// Datagrams per recvmmsg/sendmmsg call on a UDP/QUIC frontend.
pub const DEFAULT_UDP_BATCH: usize = 32;
/// The largest `udp_batch`: the per-worker batch buffers are sized by it.
pub const MAX_UDP_BATCH: usize = 64;
/// `[frontends.quic] nonce_length` when not given: the draft's minimum.
pub const DEFAULT_QUIC_NONCE_LEN: usize = lb_core::quic_lb::MIN_NONCE_LEN;
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// `withdraw_delay` when not given: none, SIGTERM drains at once.
pub const DEFAULT_WITHDRAW_DELAY: Duration = Duration::ZERO;
/// The longest `withdraw_delay`: a BGP hold time (90 s by default) twice
/// over is plenty; a longer one is more likely a typo (`"30m"` for `"30s"`)
/// that would keep a stopping process around for half an hour.
pub const MAX_WITHDRAW_DELAY: Duration = Duration::from_secs(300);
pub const DEFAULT_BACKLOG: u32 = 1024;
pub const DEFAULT_MAX_CONNECTIONS: usize = 100_000;
pub const DEFAULT_CONNECT_RETRIES: usize = 2;
pub const MAX_WEIGHT: u32 = 65_535;
/// `cross_zone_rtt` when not given: Azure used to publish "under about 2 ms"
/// between availability zones of a region (it no longer gives a figure).
pub const DEFAULT_CROSS_ZONE_RTT: Duration = Duration::from_millis(2);
/// The largest `cross_zone_rtt`: a hop model's round trip, not a WAN's.
pub const MAX_CROSS_ZONE_RTT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------

/// Reads and validates a config file.
pub fn load_file(path: &Path) -> Result<Config, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })?;
    Ok(parse(&path.display().to_string(), &text)?)
}

/// Parses and validates config text; `origin` names it in errors.
pub fn parse(origin: &str, text: &str) -> Result<Config, ConfigError> {
    let locate = Locator { origin, text };
    let raw: RawConfig = toml::from_str(text).map_err(|e| locate.toml_error(&e))?;
    validate::validate(raw, &locate)
}

struct Locator<'a> {
    origin: &'a str,
    text: &'a str,
}

impl Locator<'_> {
    fn position(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        (line, column)
    }

    fn at(&self, span: Range<usize>, field: &str, message: impl Into<String>) -> ConfigError {
        let (line, column) = self.position(span.start);
        ConfigError {
            file: self.origin.to_owned(),
            line,
            column,
            field: field.to_owned(),
            message: message.into(),
        }
    }

    fn nowhere(&self, field: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.origin.to_owned(),
            line: 0,
            column: 0,
            field: field.to_owned(),
            message: message.into(),
        }
    }

    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let mut message = e.message().to_owned();
        let Some(span) = e.span() else {
            return self.nowhere("", message);
        };
        let (line_no, _) = self.position(span.start);
        let line = self.text.lines().nth(line_no - 1).unwrap_or("");
        if message.is_empty() {
            // toml has no message for a control character in a comment (found by fuzzing).
            message = self.unexpected_char(span.start);
        }
        if line.trim_start().starts_with('#') {
            return self.at(span, "", message); // a comment names no field
        }
        // toml points at the offending key or value; the key is whatever stands
        // before `=` on that line (or the table header), which is the field to name.
        let field = match line.split_once('=') {
            Some((key, _)) => key.trim().to_owned(),
            None if line.trim_start().starts_with('[') => line
                .trim()
                .trim_matches(|c| c == '[' || c == ']')
                .to_owned(),
            // A key without its `=`: the key is the first word, not the whole line.
            None => line
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned(),
        };
        let field = if field.is_empty() {
            // An unknown-field error spans the key itself.
            self.text[span.clone()].trim().to_owned()
        } else {
            field
        };
        self.at(span, &field, message)
    }

    /// Names the character at `offset`, for a toml error that came without a message.
    fn unexpected_char(&self, offset: usize) -> String {
        match self.text.get(offset..).and_then(|rest| rest.chars().next()) {
            Some(c) if c.is_control() => {
                format!("control character U+{:04X} is not allowed here", c as u32)
            }
            Some(c) => format!("unexpected character {c:?}"),
            None => "invalid TOML".to_owned(),
        }
    }
}

/// Builds config text from the quick command-line flags, so flags go through
/// exactly the validation a file does.
pub fn from_flags(
    listen: SocketAddr,
    backends: &[String],
    distribution: DistributionMode,
    admin: Option<SocketAddr>,
    workers: Option<usize>,
) -> Result<Config, ConfigError> {
    use std::fmt::Write;
    let origin = "<command line>";
    let mut text = String::new();
    if let Some(w) = workers {
        let _ = writeln!(text, "workers = {w}");
    }
    if let Some(a) = admin {
        let _ = writeln!(text, "[admin]\nlisten = \"{a}\"");
    }
    let _ = writeln!(
        text,
        "[[frontends]]\nname = \"default\"\nlisten = \"{listen}\"\ndistribution = \"{}\"",
        distribution.azure_name()
    );
    for (i, flag) in backends.iter().enumerate() {
        let (name, rest) = flag.split_once('=').ok_or_else(|| ConfigError {
            file: origin.into(),
            line: 0,
            column: 0,
            field: format!("--backend #{}", i + 1),
            message: format!("`{flag}` is not NAME=ADDR[,weight=W]"),
        })?;
        let mut parts = rest.split(',');
        let addr = parts.next().unwrap_or_default();
        let _ = writeln!(
            text,
            "[[frontends.backends]]\nname = {}\naddress = {}",
            toml_string(name),
            toml_string(addr)
        );
        for opt in parts {
            match opt.split_once('=') {
                Some(("weight", w)) if w.parse::<u32>().is_ok() => {
                    let _ = writeln!(text, "weight = {w}");
                }
                _ => {
                    return Err(ConfigError {
                        file: origin.into(),
                        line: 0,
                        column: 0,
                        field: format!("--backend #{}", i + 1),
                        message: format!("unknown option `{opt}`: expected weight=W"),
                    })
                }
            }
        }
    }
    parse(origin, &text)
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shared with `tests/tests/check.rs`; line 1 is a comment, so fields keep their line numbers.
    const GOOD: &str = include_str!("../tests/fixtures/good.toml");

    #[test]
    fn a_good_config_parses_with_defaults_filled_in() {
        let c = parse("good.toml", GOOD).unwrap();
        assert_eq!(c.workers, 2);
        let fe = &c.frontends[0];
        assert_eq!(fe.params.mode, DistributionMode::SourceIp);
        assert_eq!(fe.idle_timeout, Duration::from_secs(30));
        assert_eq!(fe.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(
            fe.health.kind,
            ProbeKind::Http {
                path: "/healthz".into()
            }
        );
        assert_eq!(fe.health.thresholds.rise, 2);
        assert_eq!(fe.backends[1].weight, 3);
        assert!(fe.byte_metrics, "byte counting is on unless switched off");
        let no_admin = GOOD.replace("[admin]\nlisten = \"127.0.0.1:9180\"", "");
        assert!(parse("n.toml", &no_admin).unwrap().frontends[0].byte_metrics);
    }

    #[test]
    fn unknown_fields_name_file_line_and_field() {
        let bad = GOOD.replace("idle_timeout = \"30s\"", "idle_timout = \"30s\"");
        let e = parse("bad.toml", &bad).unwrap_err();
        assert_eq!(e.file, "bad.toml");
        assert_eq!(e.line, 12, "{e}");
        assert_eq!(e.field, "idle_timout", "{e}");
        assert!(e.message.contains("unknown field"), "{e}");
    }

    #[test]
    fn bad_values_are_located() {
        let bad = GOOD.replace("127.0.0.1:9002", "127.0.0.1:notaport");
        let e = parse("bad.toml", &bad).unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (25, "address"), "{e}");

        let dup = GOOD.replace("node-2", "node-1");
        let e = parse("dup.toml", &dup).unwrap_err();
        assert_eq!(e.line, 24, "{e}");
        assert_eq!(e.field, "frontends[0].backends[1].name");

        let mode = GOOD.replace("SourceIP", "RoundRobin");
        let e = parse("mode.toml", &mode).unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (11, "distribution"), "{e}");

        let size = GOOD.replace("idle_timeout = \"30s\"", "table_size = 1000");
        let e = parse("size.toml", &size).unwrap_err();
        assert_eq!(
            (e.line, e.field.as_str()),
            (12, "frontends[0].table_size"),
            "{e}"
        );
    }

    /// Found by the `config` fuzz target: toml gives no message for a control
    /// character in a comment, and the comment line was named as the field.
    #[test]
    fn a_control_character_in_a_comment_is_named_not_an_empty_message() {
        let bad = GOOD.replace("# The well-formed", "# The well\0formed");
        let e = parse("nul.toml", &bad).unwrap_err();
        assert_eq!((e.line, e.column), (1, 11), "{e}");
        assert_eq!(e.field, "", "a comment is not a field: {e}");
        assert!(e.message.contains("U+0000"), "{e}");
        assert_eq!(
            e.to_string(),
            "nul.toml:1:11: control character U+0000 is not allowed here"
        );
    }

    #[test]
    fn source_ranges_parse_normalised_and_bad_entries_are_located() {
        assert_eq!(
            parse("g.toml", GOOD).unwrap().frontends[0].source_ranges,
            None
        );
        let with = GOOD.replace(
            "idle_timeout = \"30s\"",
            "idle_timeout = \"30s\"\nsource_ranges = [\"127.0.1.9/24\", \"::1\"]",
        );
        let fe = parse("s.toml", &with).unwrap().frontends.remove(0);
        let ranges = fe.source_ranges.expect("the list");
        assert_eq!(ranges.to_string(), "127.0.1.0/24, ::1/128");
        assert!(ranges.contains("127.0.1.200".parse().unwrap()));
        assert!(!ranges.contains("127.0.2.1".parse().unwrap()));

        let bad = with.replace("::1", "127.0.0.0/33");
        let e = parse("s.toml", &bad).unwrap_err();
        assert_eq!(
            (e.line, e.field.as_str()),
            (13, "frontends[0].source_ranges[1]"),
            "{e}"
        );
        assert!(e.message.contains("`127.0.0.0/33`"), "{e}");
        assert!(e.message.contains("0 to 32"), "{e}");

        let empty = GOOD.replace("idle_timeout = \"30s\"", "source_ranges = []");
        let e = parse("s.toml", &empty).unwrap_err();
        assert_eq!(
            (e.line, e.field.as_str()),
            (12, "frontends[0].source_ranges"),
            "{e}"
        );
    }

    #[test]
    fn fd_reserve_defaults_and_too_small_a_reserve_is_located() {
        assert_eq!(
            parse("r.toml", GOOD).unwrap().fd_reserve,
            crate::fds::DEFAULT_FD_RESERVE
        );
        let e = parse("r.toml", &format!("fd_reserve = 2\n{GOOD}")).unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (1, "fd_reserve"), "{e}");
        let ok = parse("r.toml", &format!("fd_reserve = 200\n{GOOD}")).unwrap();
        assert_eq!(ok.fd_reserve, 200);
    }

    #[test]
    fn withdraw_delay_defaults_to_none_and_is_located_when_too_long() {
        assert_eq!(
            parse("w.toml", GOOD).unwrap().withdraw_delay,
            Duration::ZERO
        );
        let set = parse("w.toml", &format!("withdraw_delay = \"20s\"\n{GOOD}")).unwrap();
        assert_eq!(set.withdraw_delay, Duration::from_secs(20));
        let long = GOOD.replace(
            "drain_timeout = \"10s\"",
            "drain_timeout = \"10s\"\nwithdraw_delay = \"301s\"",
        );
        let e = parse("w.toml", &long).unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (4, "withdraw_delay"), "{e}");
        assert!(e.message.contains("at most 5m"), "{e}");
    }

    #[test]
    fn admin_on_a_public_address_needs_an_explicit_opt_in() {
        let public = GOOD.replace("listen = \"127.0.0.1:9180\"", "listen = \"0.0.0.0:9180\"");
        let e = parse("p.toml", &public).unwrap_err();
        assert_eq!(e.field, "admin.listen");
        let allowed = public.replace("[admin]", "[admin]\nallow_non_loopback = true");
        assert!(parse("p.toml", &allowed).is_ok());
    }

    /// A udp frontend over the two backends of [`GOOD`]'s shape.
    const UDP: &str = "[[frontends]]\nname = \"dns\"\nlisten = \"127.0.0.1:8053\"\nprotocol = \"udp\"\n\n[[frontends.backends]]\nname = \"a\"\naddress = \"127.0.0.1:9101\"\n";

    /// A quic frontend with the draft's test-vector server ID on backend `b`.
    const QUIC: &str = "[[frontends]]\nname = \"quic\"\nlisten = \"127.0.0.1:4433\"\nprotocol = \"quic\"\n\n[frontends.quic]\nconfig_id = 0\nserver_id_length = 3\n\n[[frontends.backends]]\nname = \"a\"\naddress = \"127.0.0.1:4434\"\nserver_id = \"010101\"\n\n[[frontends.backends]]\nname = \"b\"\naddress = \"127.0.0.1:4435\"\nserver_id = \"c4605e\"\n";

    #[test]
    fn a_udp_frontend_parses_with_the_udp_defaults() {
        let c = parse("udp.toml", UDP).unwrap();
        let fe = &c.frontends[0];
        assert_eq!(fe.protocol, FrontendProtocol::Udp);
        assert_eq!(fe.protocol.as_str(), "udp");
        assert_eq!(fe.idle_timeout, DEFAULT_UDP_IDLE_TIMEOUT);
        assert_eq!(fe.max_flows, DEFAULT_MAX_FLOWS);
        assert_eq!(fe.udp_batch, DEFAULT_UDP_BATCH);
        assert_eq!(fe.quic, None);
        assert_eq!(fe.health.kind, ProbeKind::Tcp, "Azure probes UDP over TCP");
        assert_eq!(fe.health.port, None);

        let set = UDP.replace(
            "protocol = \"udp\"",
            "protocol = \"udp\"\nidle_timeout = \"1m\"\nmax_flows = 10\nudp_batch = 1\nclient_address = \"preserve\"\nhealth = { kind = \"tcp\", port = 9000 }",
        );
        let fe = parse("udp.toml", &set).unwrap().frontends.remove(0);
        assert_eq!(fe.idle_timeout, Duration::from_secs(60));
        assert_eq!((fe.max_flows, fe.udp_batch), (10, 1));
        assert_eq!(fe.client_address, ClientAddress::Preserve);
        assert_eq!(fe.health.port, Some(9000));
    }

    #[test]
    fn a_tcp_frontend_is_the_default_and_keeps_the_tcp_idle_timeout() {
        let fe = parse("good.toml", GOOD).unwrap().frontends.remove(0);
        assert_eq!(fe.protocol, FrontendProtocol::Tcp);
        assert_eq!(fe.protocol.as_str(), "tcp");
        let no_idle = GOOD.replace("idle_timeout = \"30s\"", "");
        let fe = parse("good.toml", &no_idle).unwrap().frontends.remove(0);
        assert_eq!(fe.idle_timeout, DEFAULT_IDLE_TIMEOUT);
    }

    #[test]
    fn accept_auto_shares_one_listener_between_two_workers_only() {
        let accept = |workers: usize, line: &str| {
            let text = GOOD
                .replace("workers = 2", &format!("workers = {workers}"))
                .replace("idle_timeout = \"30s\"", line);
            let fe = parse("good.toml", &text).unwrap().frontends.remove(0);
            (fe.accept, fe.accept_auto)
        };
        assert_eq!(accept(2, ""), (AcceptMode::Shared, true));
        assert_eq!(accept(2, "accept = \"auto\""), (AcceptMode::Shared, true));
        assert_eq!(accept(1, ""), (AcceptMode::Reuseport, true));
        assert_eq!(accept(3, ""), (AcceptMode::Reuseport, true));
        assert_eq!(
            accept(2, "accept = \"reuseport\""),
            (AcceptMode::Reuseport, false)
        );
        assert_eq!(
            accept(8, "accept = \"shared\""),
            (AcceptMode::Shared, false)
        );
    }

    #[test]
    fn engine_left_out_is_the_ring_unless_copy_or_zones_need_tokio() {
        let engine = |line: &str| {
            let text = GOOD.replace("idle_timeout = \"30s\"", line);
            parse("good.toml", &text)
                .unwrap()
                .frontends
                .remove(0)
                .engine
        };
        assert_eq!(engine(""), TcpEngine::IoUring);
        assert_eq!(engine("copy = \"auto\""), TcpEngine::IoUring);
        assert_eq!(engine("copy = \"splice\""), TcpEngine::Tokio);
        assert_eq!(engine("copy = \"sockmap\""), TcpEngine::Tokio);
        assert_eq!(engine("engine = \"tokio\""), TcpEngine::Tokio);
        let zoned = parse("zoned.toml", ZONED).unwrap().frontends.remove(0);
        assert_eq!(zoned.engine, TcpEngine::Tokio);
    }

    #[test]
    fn an_auto_accept_keeps_the_running_mode_and_an_explicit_one_does_not() {
        let mut c = parse("good.toml", GOOD).unwrap();
        c.keep_running_accept_modes(|_, _| Some(AcceptMode::Reuseport));
        assert_eq!(c.frontends[0].accept, AcceptMode::Reuseport);
        let explicit = GOOD.replace("idle_timeout = \"30s\"", "accept = \"shared\"");
        let mut c = parse("good.toml", &explicit).unwrap();
        c.keep_running_accept_modes(|_, _| Some(AcceptMode::Reuseport));
        assert_eq!(c.frontends[0].accept, AcceptMode::Shared);
    }

    #[test]
    fn half_close_is_on_unless_switched_off() {
        let fe = parse("good.toml", GOOD).unwrap().frontends.remove(0);
        assert!(fe.half_close);
        let off = GOOD.replace("idle_timeout = \"30s\"", "half_close = false");
        let fe = parse("good.toml", &off).unwrap().frontends.remove(0);
        assert!(!fe.half_close);
    }

    #[test]
    fn a_quic_frontend_parses_its_layout_and_server_ids() {
        let fe = parse("quic.toml", QUIC).unwrap().frontends.remove(0);
        assert_eq!(fe.protocol, FrontendProtocol::Quic);
        assert_eq!(fe.protocol.as_str(), "quic");
        assert!(fe.protocol.is_udp());
        assert_eq!(fe.idle_timeout, DEFAULT_UDP_IDLE_TIMEOUT);
        let q = fe.quic.expect("the quic table");
        assert_eq!(
            q.lb,
            lb_core::QuicLbConfig::new(0, 3, DEFAULT_QUIC_NONCE_LEN).unwrap()
        );
        assert_eq!(q.lb.cid_len(), 8, "1 + 3 + the default 4-byte nonce");
        let ids: Vec<(&str, Vec<u8>)> = q
            .server_ids
            .iter()
            .map(|(name, id)| (name.as_str(), id.as_bytes().to_vec()))
            .collect();
        assert_eq!(
            ids,
            [("a", vec![1, 1, 1]), ("b", vec![0xc4, 0x60, 0x5e])],
            "by backend name, in backend order"
        );
        let longer = QUIC.replace(
            "server_id_length = 3",
            "server_id_length = 3\nnonce_length = 12",
        );
        let q = parse("quic.toml", &longer).unwrap().frontends[0]
            .quic
            .clone()
            .unwrap();
        assert_eq!(q.lb.nonce_len(), 12);
    }

    #[test]
    fn a_udp_and_a_tcp_frontend_may_share_an_address_but_two_udp_ones_may_not() {
        let tcp_too = format!(
            "{UDP}\n[[frontends]]\nname = \"dns-tcp\"\nlisten = \"127.0.0.1:8053\"\n\n[[frontends.backends]]\nname = \"a\"\naddress = \"127.0.0.1:9101\"\n"
        );
        let c = parse("both.toml", &tcp_too).unwrap();
        assert_eq!(c.frontends[0].listen, c.frontends[1].listen);
        assert_ne!(
            c.frontends[0].listener_identity(),
            c.frontends[1].listener_identity(),
            "the protocol tells their sockets apart"
        );

        // As two TCP frontends on one address are refused (see bad_configs.rs).
        for second in ["udp", "quic"] {
            let text = format!(
                "{UDP}\n{}",
                QUIC.replace("127.0.0.1:4433", "127.0.0.1:8053")
            )
            .replace("protocol = \"quic\"", &format!("protocol = \"{second}\""));
            let text = if second == "udp" {
                text.replace(
                    "[frontends.quic]\nconfig_id = 0\nserver_id_length = 3\n",
                    "",
                )
                .replace("server_id = \"010101\"\n", "")
                .replace("server_id = \"c4605e\"\n", "")
            } else {
                text
            };
            let e = parse("two.toml", &text).unwrap_err();
            assert_eq!(e.field, "frontends[1].listen", "{second}: {e}");
            assert_eq!(e.line, 12, "{second}: {e}");
            assert!(
                e.message.contains("(UDP) is used by another frontend"),
                "{e}"
            );
        }
    }

    #[test]
    fn flags_build_the_same_model_as_a_file() {
        let c = from_flags(
            "127.0.0.1:8080".parse().unwrap(),
            &[
                "a=127.0.0.1:9001".into(),
                "b=127.0.0.1:9002,weight=5".into(),
            ],
            DistributionMode::SourceIpProtocol,
            None,
            Some(1),
        )
        .unwrap();
        assert_eq!(c.frontends[0].backends[1].weight, 5);
        assert_eq!(c.frontends[0].protocol, FrontendProtocol::Tcp);
        assert_eq!(
            c.frontends[0].params.mode,
            DistributionMode::SourceIpProtocol
        );
        let e = from_flags(
            "127.0.0.1:8080".parse().unwrap(),
            &["oops".into()],
            DistributionMode::FiveTuple,
            None,
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("NAME=ADDR"), "{e}");
    }

    /// Three nodes in zones 1, 2 and 3, one pod on node 1.
    const ZONED: &str = "[[frontends]]\nname = \"z\"\nlisten = \"127.0.0.1:0\"\n\n[frontends.service]\ntraffic_distribution = \"PreferClose\"\n\n[[frontends.nodes]]\nname = \"node-1\"\naddress = \"127.0.1.1\"\nzone = \"1\"\nendpoints = [\"127.0.2.1:8000\"]\n\n[[frontends.nodes]]\nname = \"node-2\"\naddress = \"127.0.1.2\"\nzone = \"2\"\n\n[[frontends.nodes]]\nname = \"node-3\"\naddress = \"127.0.1.3\"\nzone = \"3\"\n";

    #[test]
    fn zones_parse_with_their_defaults_and_overrides() {
        let c = parse("z.toml", ZONED).unwrap();
        let fe = &c.frontends[0];
        assert_eq!(fe.cross_zone_rtt, DEFAULT_CROSS_ZONE_RTT);
        assert_eq!(DEFAULT_CROSS_ZONE_RTT, Duration::from_millis(2));
        assert!(c.zones_down.is_empty());
        let hop = fe.hop.as_ref().unwrap();
        assert_eq!(
            hop.service.traffic_distribution,
            TrafficDistribution::PreferSameZone,
            "PreferClose is PreferSameZone's older name"
        );
        let zones: Vec<_> = hop.nodes.iter().map(|n| n.zone.as_deref()).collect();
        assert_eq!(zones, [Some("1"), Some("2"), Some("3")]);

        let global = format!("cross_zone_rtt = \"20ms\"\nzones_down = [\"2\"]\n{ZONED}");
        let c = parse("z.toml", &global).unwrap();
        assert_eq!(c.frontends[0].cross_zone_rtt, Duration::from_millis(20));
        assert_eq!(c.zones_down, BTreeSet::from(["2".to_owned()]));
        let own = global.replace(
            "listen = \"127.0.0.1:0\"",
            "listen = \"127.0.0.1:0\"\ncross_zone_rtt = \"0s\"",
        );
        assert_eq!(
            parse("z.toml", &own).unwrap().frontends[0].cross_zone_rtt,
            Duration::ZERO
        );
    }

    #[test]
    fn bad_zones_are_located() {
        let e = parse(
            "z.toml",
            &ZONED.replace("zone = \"2\"", "zone = \"zone 2\""),
        )
        .unwrap_err();
        assert_eq!(
            (e.line, e.field.as_str()),
            (17, "frontends[0].nodes[1].zone"),
            "{e}"
        );
        assert!(e.message.contains("label value"), "{e}");
        let twice = format!("zones_down = [\"2\", \"2\"]\n{ZONED}");
        let e = parse("z.toml", &twice).unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (1, "zones_down[1]"), "{e}");
        let slow = format!("cross_zone_rtt = \"1m\"\n{ZONED}");
        let e = parse("z.toml", &slow).unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (1, "cross_zone_rtt"), "{e}");
        let td = ZONED.replace("PreferClose", "Nearest");
        let e = parse("z.toml", &td).unwrap_err();
        assert_eq!(e.field, "traffic_distribution", "{e}");
    }
}
