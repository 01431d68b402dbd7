//! Configuration: the TOML schema, its validation, and errors that name file, line and field.
//!
//! Parsing and validation happen completely before anything binds, and `check`,
//! startup and SIGHUP reload all go through [`load_file`], so they print the
//! same error for the same mistake.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lb_core::{
    BackendSet, BackendSpec, DistributionMode, EndpointSpec, ExternalTrafficPolicy, HealthConfig,
    HopModel, NoHealthyBackends, NodeSpec, ServiceSpec, SessionAffinity, SnapshotParams, SnatScope,
    DEFAULT_TABLE_SIZE, FLOW_HASH_SEED, MAX_CHOICES, SUPPORTED_TABLE_SIZES,
};
use serde::Deserialize;
use toml::Spanned;

use crate::copy::CopyMode;

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
    pub admin: AdminConfig,
    pub frontends: Vec<FrontendConfig>,
    pub flow_log: Option<FlowLogConfig>,
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

/// The AKS node hop: nodes with their pods, and the Service's policies.
#[derive(Clone, Debug, PartialEq)]
pub struct HopConfig {
    pub nodes: Vec<NodeSpec>,
    pub service: ServiceSpec,
}

/// How a frontend's connections are spread over the worker threads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AcceptMode {
    /// One SO_REUSEPORT listener per worker: the kernel hashes each new
    /// connection to one worker, and no worker is woken for another's
    /// connections. Scales with cores.
    #[default]
    Reuseport,
    /// One listener shared by every worker: whichever worker is awake takes
    /// the connection, so one that is busy or descheduled does not hold up
    /// new connections hashed to it. Each connection wakes every idle worker,
    /// so this suits few workers on a busy machine: with 2 workers sharing 2 cores
    /// with hey, it took more new connections/s than `Reuseport` (the interleaved
    /// A/B is quoted once, beside `accept` in config/lb.toml).
    Shared,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AdminConfig {
    /// `None` disables the admin endpoint.
    pub listen: Option<SocketAddr>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct FrontendConfig {
    pub name: String,
    pub listen: SocketAddr,
    pub backlog: u32,
    pub accept: AcceptMode,
    pub max_connections: usize,
    pub connect_timeout: Duration,
    pub connect_retries: usize,
    pub idle_timeout: Duration,
    pub tcp_reset_on_idle: bool,
    pub copy: CopyMode,
    /// From `[admin] byte_metrics`: count bytes in the data plane.
    pub byte_metrics: bool,
    pub params: SnapshotParams,
    pub health: ProbeConfig,
    pub client_address: ClientAddress,
    /// Plain backends (the simple case). Empty when `hop` is set.
    pub backends: Vec<BackendSpec>,
    /// Nodes and pods behind the ALB, when the hop model is used.
    pub hop: Option<HopConfig>,
}

impl FrontendConfig {
    /// Settings that need new sockets, which a reload cannot change in place.
    pub fn listener_identity(&self) -> (SocketAddr, u32, AcceptMode) {
        (self.listen, self.backlog, self.accept)
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
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    frontends: Vec<Spanned<RawFrontend>>,
    flow_log: Option<RawFlowLog>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlowLog {
    path: PathBuf,
    #[serde(default)]
    format: FlowLogFormat,
}

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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: Spanned<String>,
    address: Spanned<std::net::IpAddr>,
    #[serde(default)]
    endpoints: Vec<Spanned<RawEndpoint>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawEndpoint {
    Address(SocketAddr),
    Detailed(RawEndpointTable),
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
    backlog: Option<Spanned<u32>>,
    max_connections: Option<Spanned<usize>>,
    #[serde(default, with = "humantime_serde::option")]
    connect_timeout: Option<Duration>,
    connect_retries: Option<Spanned<usize>>,
    #[serde(default, with = "humantime_serde::option")]
    idle_timeout: Option<Duration>,
    #[serde(default)]
    tcp_reset_on_idle: bool,
    #[serde(default)]
    copy: CopyMode,
    #[serde(default)]
    accept: AcceptMode,
    #[serde(default)]
    no_healthy_backends: NoHealthyBackends,
    table_size: Option<Spanned<u32>>,
    hash_seed: Option<u64>,
    #[serde(default)]
    health: Option<Spanned<RawHealth>>,
    #[serde(default)]
    client_address: ClientAddress,
    #[serde(default)]
    backends: Vec<Spanned<RawBackend>>,
    service: Option<Spanned<RawService>>,
    #[serde(default)]
    nodes: Vec<Spanned<RawNode>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    kind: Option<Spanned<String>>,
    path: Option<String>,
    #[serde(default, with = "humantime_serde::option")]
    interval: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    timeout: Option<Duration>,
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
}

pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9180";
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(4 * 60);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_BACKLOG: u32 = 1024;
pub const DEFAULT_MAX_CONNECTIONS: usize = 100_000;
pub const DEFAULT_CONNECT_RETRIES: usize = 2;
pub const MAX_WEIGHT: u32 = 65_535;

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
    validate(raw, &locate)
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
        let message = e.message().to_owned();
        let Some(span) = e.span() else {
            return self.nowhere("", message);
        };
        // toml points at the offending key or value; the key is whatever stands
        // before `=` on that line (or the table header), which is the field to name.
        let (line_no, _) = self.position(span.start);
        let line = self.text.lines().nth(line_no - 1).unwrap_or("");
        let field = match line.split_once('=') {
            Some((key, _)) => key.trim().to_owned(),
            None => line
                .trim()
                .trim_matches(|c| c == '[' || c == ']')
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
}

fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

/// The value of an optional field: `None` when it is absent, an error located
/// at the value when `rule` refuses it. Defaults are the caller's, so a
/// computed default is only computed when needed.
fn checked<T>(
    value: Option<Spanned<T>>,
    at: &Locator<'_>,
    field: &str,
    rule: impl FnOnce(&T) -> Result<(), String>,
) -> Result<Option<T>, ConfigError> {
    let Some(value) = value else {
        return Ok(None);
    };
    match rule(value.get_ref()) {
        Ok(()) => Ok(Some(value.into_inner())),
        Err(message) => Err(at.at(value.span(), field, message)),
    }
}

/// A rule's verdict: `message` unless `ok`.
fn ensure(ok: bool, message: impl Into<String>) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(message.into())
    }
}

fn validate(raw: RawConfig, at: &Locator<'_>) -> Result<Config, ConfigError> {
    let workers = checked(raw.workers, at, "workers", |&w| {
        ensure((1..=1024).contains(&w), "must be between 1 and 1024")
    })?
    .unwrap_or_else(default_workers);
    let fd_reserve = checked(raw.fd_reserve, at, "fd_reserve", |&r| {
        ensure(
            r >= 4,
            "must be at least 4 (an admin connection, a probe, the config file, a /proc read)",
        )
    })?
    .unwrap_or(crate::fds::DEFAULT_FD_RESERVE);
    let admin_listen = validate_admin(&raw.admin, at)?;
    if raw.frontends.is_empty() {
        return Err(at.nowhere(
            "frontends",
            "at least one [[frontends]] section is required",
        ));
    }
    let frontends = validate_frontends(raw.frontends, raw.admin.byte_metrics, at)?;
    let flow_log = raw.flow_log.map(|f| FlowLogConfig {
        path: f.path,
        format: f.format,
    });
    Ok(Config {
        flow_log,
        workers,
        fd_reserve,
        drain_timeout: raw.drain_timeout.unwrap_or(DEFAULT_DRAIN_TIMEOUT),
        admin: AdminConfig {
            listen: admin_listen,
        },
        frontends,
    })
}

/// The admin endpoint's address: `None` when disabled, the default when not
/// given, and only a loopback address unless exposing it is asked for.
fn validate_admin(admin: &RawAdmin, at: &Locator<'_>) -> Result<Option<SocketAddr>, ConfigError> {
    if admin.enabled == Some(false) {
        return Ok(None);
    }
    let Some(addr) = &admin.listen else {
        return Ok(Some(
            DEFAULT_ADMIN_LISTEN.parse().expect("constant address"),
        ));
    };
    if !is_loopback(addr.get_ref()) && !admin.allow_non_loopback {
        return Err(at.at(
            addr.span(),
            "admin.listen",
            format!(
                "{} is not a loopback address; set admin.allow_non_loopback = true to expose the admin endpoint",
                addr.get_ref()
            ),
        ));
    }
    Ok(Some(*addr.get_ref()))
}

/// Every frontend, in order: names and listen addresses must not repeat.
fn validate_frontends(
    raw: Vec<Spanned<RawFrontend>>,
    byte_metrics: bool,
    at: &Locator<'_>,
) -> Result<Vec<FrontendConfig>, ConfigError> {
    let mut seen = SeenFrontends::default();
    raw.into_iter()
        .enumerate()
        .map(|(fi, fe)| validate_frontend(fi, fe.into_inner(), byte_metrics, &mut seen, at))
        .collect()
}

/// What the frontends before this one have claimed.
#[derive(Default)]
struct SeenFrontends {
    names: HashSet<String>,
    listens: Vec<SocketAddr>,
}

/// The connection limits and timeouts of one frontend.
struct Limits {
    backlog: u32,
    max_connections: usize,
    connect_retries: usize,
    table_size: u32,
    connect_timeout: Duration,
    idle_timeout: Duration,
}

fn validate_frontend(
    fi: usize,
    fe: RawFrontend,
    byte_metrics: bool,
    seen: &mut SeenFrontends,
    at: &Locator<'_>,
) -> Result<FrontendConfig, ConfigError> {
    let field = |name: &str| format!("frontends[{fi}].{name}");
    let name = frontend_name(&fe.name, &field, &mut seen.names, at)?;
    let listen = frontend_listen(&fe.listen, &field, &mut seen.listens, at)?;
    let limits = validate_limits(&fe, &field, at)?;
    let health = validate_health(fe.health, at, &field)?;
    let backends = validate_backends(fi, &name, fe.backends, at)?;
    check_table_fits(&name, &backends, limits.table_size, &fe.name, &field, at)?;
    let hop = validate_hop(fe.service, fe.nodes, at, &field)?;
    if hop.is_some() && !backends.is_empty() {
        return Err(at.at(
            fe.name.span(),
            &field("nodes"),
            "a frontend has either [[frontends.backends]] or [[frontends.nodes]], not both",
        ));
    }
    check_client_address_is_bindable(&hop, fe.client_address, &fe.listen, &field, at)?;
    Ok(FrontendConfig {
        name,
        listen,
        backlog: limits.backlog,
        max_connections: limits.max_connections,
        connect_timeout: limits.connect_timeout,
        connect_retries: limits.connect_retries,
        idle_timeout: limits.idle_timeout,
        tcp_reset_on_idle: fe.tcp_reset_on_idle,
        copy: fe.copy,
        accept: fe.accept,
        byte_metrics,
        params: SnapshotParams {
            mode: fe.distribution,
            seed: fe.hash_seed.unwrap_or(FLOW_HASH_SEED),
            table_size: limits.table_size,
            no_healthy_backends: fe.no_healthy_backends,
        },
        health,
        client_address: fe.client_address,
        backends,
        hop,
    })
}

/// A frontend's name: a simple word, used by no frontend before it.
fn frontend_name(
    raw: &Spanned<String>,
    field: &dyn Fn(&str) -> String,
    names: &mut HashSet<String>,
    at: &Locator<'_>,
) -> Result<String, ConfigError> {
    let name = raw.get_ref().trim().to_owned();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(at.at(
            raw.span(),
            &field("name"),
            "must be non-empty and use only letters, digits, '-', '_' and '.'",
        ));
    }
    if !names.insert(name.clone()) {
        return Err(at.at(
            raw.span(),
            &field("name"),
            format!("frontend `{name}` is defined twice"),
        ));
    }
    Ok(name)
}

/// A frontend's listen address, used by no frontend before it (port 0 aside).
fn frontend_listen(
    raw: &Spanned<SocketAddr>,
    field: &dyn Fn(&str) -> String,
    listens: &mut Vec<SocketAddr>,
    at: &Locator<'_>,
) -> Result<SocketAddr, ConfigError> {
    let listen = *raw.get_ref();
    if listens.iter().any(|l| l == &listen && listen.port() != 0) {
        return Err(at.at(
            raw.span(),
            &field("listen"),
            format!("{listen} is used by another frontend"),
        ));
    }
    listens.push(listen);
    Ok(listen)
}

fn validate_limits(
    fe: &RawFrontend,
    field: &dyn Fn(&str) -> String,
    at: &Locator<'_>,
) -> Result<Limits, ConfigError> {
    let backlog = checked(fe.backlog.clone(), at, &field("backlog"), |&b| {
        ensure(b >= 1, "must be at least 1")
    })?
    .unwrap_or(DEFAULT_BACKLOG);
    let max_connections = checked(
        fe.max_connections.clone(),
        at,
        &field("max_connections"),
        |&m| ensure(m >= 1, "must be at least 1"),
    )?
    .unwrap_or(DEFAULT_MAX_CONNECTIONS);
    let connect_retries = checked(
        fe.connect_retries.clone(),
        at,
        &field("connect_retries"),
        |&r| {
            ensure(
                r < MAX_CHOICES,
                format!("at most {} retries are supported", MAX_CHOICES - 1),
            )
        },
    )?
    .unwrap_or(DEFAULT_CONNECT_RETRIES);
    let table_size = checked(fe.table_size.clone(), at, &field("table_size"), |t| {
        ensure(
            SUPPORTED_TABLE_SIZES.contains(t),
            format!("{t} is not one of the supported primes {SUPPORTED_TABLE_SIZES:?}"),
        )
    })?
    .unwrap_or(DEFAULT_TABLE_SIZE);
    let connect_timeout = fe.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let idle_timeout = fe.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT);
    for (value, name) in [
        (connect_timeout, "connect_timeout"),
        (idle_timeout, "idle_timeout"),
    ] {
        if value.is_zero() {
            return Err(at.at(fe.name.span(), &field(name), "must be greater than zero"));
        }
    }
    Ok(Limits {
        backlog,
        max_connections,
        connect_retries,
        table_size,
        connect_timeout,
        idle_timeout,
    })
}

/// The plain backends of frontend `fi`: simple unique names, connectable
/// addresses, weights within range.
fn validate_backends(
    fi: usize,
    frontend: &str,
    raw: Vec<Spanned<RawBackend>>,
    at: &Locator<'_>,
) -> Result<Vec<BackendSpec>, ConfigError> {
    let mut names = HashSet::new();
    let mut backends = Vec::with_capacity(raw.len());
    for (bi, raw_be) in raw.into_iter().enumerate() {
        let be = raw_be.into_inner();
        let field = |n: &str| format!("frontends[{fi}].backends[{bi}].{n}");
        let name = be.name.get_ref().trim().to_owned();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
        {
            return Err(at.at(
                be.name.span(),
                &field("name"),
                "must be non-empty and use only letters, digits, '-', '_', '.' and ':'",
            ));
        }
        if !names.insert(name.clone()) {
            return Err(at.at(
                be.name.span(),
                &field("name"),
                format!("backend `{name}` is defined twice in frontend `{frontend}`"),
            ));
        }
        let addr = connectable(&be.address, &field("address"), at)?;
        let weight = checked(be.weight, at, &field("weight"), |&w| {
            ensure(w <= MAX_WEIGHT, format!("must be at most {MAX_WEIGHT}"))
        })?
        .unwrap_or(1);
        backends.push(BackendSpec::new(name, addr, weight));
    }
    Ok(backends)
}

/// An address a connect can go to: not port 0, not the unspecified address.
fn connectable(
    raw: &Spanned<SocketAddr>,
    field: &str,
    at: &Locator<'_>,
) -> Result<SocketAddr, ConfigError> {
    let addr = *raw.get_ref();
    if addr.port() == 0 || addr.ip().is_unspecified() {
        return Err(at.at(
            raw.span(),
            field,
            format!("{addr} is not a connectable address"),
        ));
    }
    Ok(addr)
}

/// The backends must fit the table (and should have ~100 slots each), and
/// lb-core must accept them: caught now, at check time, rather than at startup.
fn check_table_fits(
    frontend: &str,
    backends: &[BackendSpec],
    table_size: u32,
    name_span: &Spanned<String>,
    field: &dyn Fn(&str) -> String,
    at: &Locator<'_>,
) -> Result<(), ConfigError> {
    if backends.len() > table_size as usize {
        return Err(at.at(
            name_span.span(),
            &field("backends"),
            format!(
                "{} backends do not fit a table of {table_size} slots",
                backends.len()
            ),
        ));
    }
    if backends.len() * 100 > table_size as usize {
        tracing::warn!(
            frontend = %frontend,
            backends = backends.len(),
            table_size,
            "table_size is below 100 x backends; shares will be uneven"
        );
    }
    BackendSet::new(backends.to_vec())
        .map_err(|e| at.at(name_span.span(), &field("backends"), e.to_string()))?;
    Ok(())
}

/// Delivering with the client's own address binds the outgoing socket to it,
/// which only works when every client address is local.
fn check_client_address_is_bindable(
    hop: &Option<HopConfig>,
    client_address: ClientAddress,
    raw_listen: &Spanned<SocketAddr>,
    field: &dyn Fn(&str) -> String,
    at: &Locator<'_>,
) -> Result<(), ConfigError> {
    let listen = raw_listen.get_ref();
    if let Some(h) = hop {
        let keeps_client = h.service.external_traffic_policy == ExternalTrafficPolicy::Local
            || h.service.snat == SnatScope::CrossNode
            || client_address == ClientAddress::Preserve;
        if keeps_client && !listen.ip().is_loopback() {
            return Err(at.at(
                raw_listen.span(),
                &field("listen"),
                format!(
                    "delivering with the client's own address binds to it, which only works for local clients: listen on 127.0.0.0/8 (not {}), or use external_traffic_policy = \"Cluster\" with snat = \"always\"",
                    listen.ip()
                ),
            ));
        }
    }
    if client_address == ClientAddress::Preserve && !listen.ip().is_loopback() {
        return Err(at.at(
            raw_listen.span(),
            &field("client_address"),
            format!(
                "`preserve` binds outgoing connections to the client's address, which only works when every client address is local: listen on 127.0.0.0/8 (not {})",
                listen.ip()
            ),
        ));
    }
    Ok(())
}

fn validate_hop(
    service: Option<Spanned<RawService>>,
    nodes: Vec<Spanned<RawNode>>,
    at: &Locator<'_>,
    field: &dyn Fn(&str) -> String,
) -> Result<Option<HopConfig>, ConfigError> {
    if nodes.is_empty() {
        if let Some(svc) = service {
            return Err(at.at(
                svc.span(),
                &field("service"),
                "a [frontends.service] needs [[frontends.nodes]]",
            ));
        }
        return Ok(None);
    }
    let svc = service.map(Spanned::into_inner).unwrap_or_default();
    let affinity_timeout = checked(
        svc.timeout_seconds,
        at,
        &field("service.timeout_seconds"),
        |&t| {
            ensure(
                (1..=86_400).contains(&t),
                "must be between 1 and 86400, as Kubernetes allows",
            )
        },
    )?
    .map_or(lb_core::DEFAULT_AFFINITY_TIMEOUT, Duration::from_secs);
    let first_span = nodes[0].span();
    let specs = nodes
        .into_iter()
        .enumerate()
        .map(|(ni, raw)| {
            let nfield = |n: &str| field(&format!("nodes[{ni}].{n}"));
            validate_node(raw.into_inner(), at, &nfield)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let service = ServiceSpec {
        external_traffic_policy: svc.external_traffic_policy,
        session_affinity: svc.session_affinity,
        affinity_timeout,
        snat: svc.snat,
    };
    // Catch what lb-core would refuse (duplicate names, addresses) at check time.
    HopModel::new(specs.clone(), service)
        .map_err(|e| at.at(first_span, &field("nodes"), e.to_string()))?;
    Ok(Some(HopConfig {
        nodes: specs,
        service,
    }))
}

/// One node: a name, a local address to SNAT from, connectable endpoints.
fn validate_node(
    node: RawNode,
    at: &Locator<'_>,
    nfield: &dyn Fn(&str) -> String,
) -> Result<NodeSpec, ConfigError> {
    let name = node.name.get_ref().trim().to_owned();
    if name.is_empty() {
        return Err(at.at(node.name.span(), &nfield("name"), "must not be empty"));
    }
    if !node.address.get_ref().is_loopback() {
        return Err(at.at(
            node.address.span(),
            &nfield("address"),
            format!(
                "{} is not a local address: node IPs stand in as 127.x.y.z addresses so the balancer can bind to them to SNAT",
                node.address.get_ref()
            ),
        ));
    }
    let mut endpoints = Vec::new();
    for (ei, raw_ep) in node.endpoints.into_iter().enumerate() {
        let span = raw_ep.span();
        let ep = match raw_ep.into_inner() {
            RawEndpoint::Address(addr) => EndpointSpec { addr, ready: true },
            RawEndpoint::Detailed(t) => EndpointSpec {
                addr: t.address,
                ready: t.ready,
            },
        };
        if ep.addr.port() == 0 || ep.addr.ip().is_unspecified() {
            return Err(at.at(
                span,
                &nfield(&format!("endpoints[{ei}]")),
                format!("{} is not a connectable address", ep.addr),
            ));
        }
        endpoints.push(ep);
    }
    Ok(NodeSpec {
        name,
        address: node.address.into_inner(),
        endpoints,
    })
}

fn validate_health(
    raw: Option<Spanned<RawHealth>>,
    at: &Locator<'_>,
    field: &dyn Fn(&str) -> String,
) -> Result<ProbeConfig, ConfigError> {
    let (span, h) = match raw {
        Some(s) => (s.span(), s.into_inner()),
        None => (0..0, RawHealth::default()),
    };
    let kind = probe_kind(&h, span.clone(), at, field)?;
    let interval = h.interval.unwrap_or(HealthConfig::DEFAULT_INTERVAL);
    if interval < Duration::from_millis(10) {
        return Err(at.at(span, &field("health.interval"), "must be at least 10ms"));
    }
    let timeout = h
        .timeout
        .unwrap_or_else(|| interval.min(Duration::from_secs(2)));
    if timeout.is_zero() {
        return Err(at.at(span, &field("health.timeout"), "must be greater than zero"));
    }
    let threshold = |v: Option<Spanned<u32>>, name: &str| -> Result<u32, ConfigError> {
        Ok(checked(v, at, &field(name), |&t| {
            ensure((1..=100).contains(&t), "must be between 1 and 100")
        })?
        .unwrap_or(HealthConfig::DEFAULT_THRESHOLD))
    };
    let thresholds = HealthConfig {
        rise: threshold(h.rise, "health.rise")?,
        fall: threshold(h.fall, "health.fall")?,
        rejected_marks_down: h.rejected_marks_down.unwrap_or(true),
        ..HealthConfig::default()
    };
    Ok(ProbeConfig {
        kind,
        interval,
        timeout,
        thresholds,
    })
}

/// `kind` (tcp by default, http with a clean path, or none).
fn probe_kind(
    h: &RawHealth,
    span: Range<usize>,
    at: &Locator<'_>,
    field: &dyn Fn(&str) -> String,
) -> Result<ProbeKind, ConfigError> {
    match h.kind.as_ref().map(|k| k.get_ref().as_str()) {
        None | Some("tcp") => Ok(ProbeKind::Tcp),
        Some("http") => {
            let path = h.path.clone().unwrap_or_else(|| "/".to_owned());
            if !path.starts_with('/')
                || path
                    .chars()
                    .any(|c| c.is_ascii_whitespace() || c.is_ascii_control())
            {
                return Err(at.at(
                    span,
                    &field("health.path"),
                    "must start with '/' and contain no spaces",
                ));
            }
            Ok(ProbeKind::Http { path })
        }
        Some("none") => Ok(ProbeKind::None),
        Some(other) => {
            let k = h.kind.as_ref().expect("matched Some");
            Err(at.at(
                k.span(),
                &field("health.kind"),
                format!("unknown probe kind `{other}`: expected tcp, http or none"),
            ))
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

    const GOOD: &str = r#"
workers = 2
drain_timeout = "10s"

[admin]
listen = "127.0.0.1:9180"

[[frontends]]
name = "web"
listen = "127.0.0.1:8080"
distribution = "SourceIP"
idle_timeout = "30s"

[frontends.health]
kind = "http"
path = "/healthz"
interval = "1s"

[[frontends.backends]]
name = "node-1"
address = "127.0.0.1:9001"

[[frontends.backends]]
name = "node-2"
address = "127.0.0.1:9002"
weight = 3
"#;

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
    fn admin_on_a_public_address_needs_an_explicit_opt_in() {
        let public = GOOD.replace("listen = \"127.0.0.1:9180\"", "listen = \"0.0.0.0:9180\"");
        let e = parse("p.toml", &public).unwrap_err();
        assert_eq!(e.field, "admin.listen");
        let allowed = public.replace("[admin]", "[admin]\nallow_non_loopback = true");
        assert!(parse("p.toml", &allowed).is_ok());
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
}
