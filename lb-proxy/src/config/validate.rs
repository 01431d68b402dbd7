//! Validation: turns the raw TOML schema into the [`Config`] model, refusing
//! any mistake with an error that names file, line and field. Defaults are
//! filled in here too, so the model never holds an unvalidated value.

use std::collections::{BTreeSet, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::tcp::copy::CopyMode;
use crate::tcp::TcpEngine;
use lb_core::{
    BackendSet, BackendSpec, EndpointSpec, ExternalTrafficPolicy, HealthConfig, HopModel, NodeSpec,
    ServiceSpec, SnapshotParams, SnatScope, SourcePrefix, SourceRanges, DEFAULT_TABLE_SIZE,
    FLOW_HASH_SEED, MAX_CHOICES, SUPPORTED_TABLE_SIZES,
};
use toml::Spanned;

use super::protocol::{check_protocol_fields, validate_quic, validate_udp_settings, Transport};
use super::{
    default_workers, AcceptSetting, AdminConfig, ClientAddress, Config, ConfigError, FlowLogConfig,
    FrontendConfig, FrontendProtocol, HopConfig, HumanDuration, Locator, ProbeConfig, ProbeKind,
    RawAdmin, RawBackend, RawConfig, RawEndpoint, RawFrontend, RawHealth, RawNode, RawService,
    DEFAULT_ADMIN_LISTEN, DEFAULT_BACKLOG, DEFAULT_CONNECT_RETRIES, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_CROSS_ZONE_RTT, DEFAULT_DRAIN_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_UDP_IDLE_TIMEOUT, DEFAULT_WITHDRAW_DELAY, MAX_CROSS_ZONE_RTT, MAX_WEIGHT,
    MAX_WITHDRAW_DELAY,
};

fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

/// The value of an optional field: `None` when it is absent, an error located
/// at the value when `rule` refuses it. Defaults are the caller's, so a
/// computed default is only computed when needed.
pub(super) fn checked<T>(
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
pub(super) fn ensure(ok: bool, message: impl Into<String>) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(message.into())
    }
}

pub(super) fn validate(raw: RawConfig, at: &Locator<'_>) -> Result<Config, ConfigError> {
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
    let cross_zone_rtt =
        cross_zone_rtt(raw.cross_zone_rtt, "cross_zone_rtt", at)?.unwrap_or(DEFAULT_CROSS_ZONE_RTT);
    let frontends = validate_frontends(
        raw.frontends,
        FrontendDefaults {
            byte_metrics: raw.admin.byte_metrics,
            cross_zone_rtt,
            workers,
        },
        at,
    )?;
    let zones_down = zones_down(raw.zones_down, &frontends, at)?;
    let flow_log = raw.flow_log.map(|f| FlowLogConfig {
        path: f.path,
        format: f.format,
    });
    Ok(Config {
        flow_log,
        workers,
        fd_reserve,
        drain_timeout: raw.drain_timeout.unwrap_or(DEFAULT_DRAIN_TIMEOUT),
        withdraw_delay: withdraw_delay(raw.withdraw_delay, at)?,
        admin: AdminConfig {
            listen: admin_listen,
        },
        frontends,
        zones_down,
    })
}

/// `withdraw_delay`, checked: at most [`MAX_WITHDRAW_DELAY`].
fn withdraw_delay(
    raw: Option<Spanned<HumanDuration>>,
    at: &Locator<'_>,
) -> Result<Duration, ConfigError> {
    Ok(checked(raw, at, "withdraw_delay", |d| {
        ensure(
            d.0 <= MAX_WITHDRAW_DELAY,
            format!(
                "must be at most {}",
                humantime::format_duration(MAX_WITHDRAW_DELAY)
            ),
        )
    })?
    .map_or(DEFAULT_WITHDRAW_DELAY, |d| d.0))
}

/// A `cross_zone_rtt`, checked: at most [`MAX_CROSS_ZONE_RTT`]; zero turns
/// the delay off while keeping the zones visible.
fn cross_zone_rtt(
    raw: Option<Spanned<HumanDuration>>,
    field: &str,
    at: &Locator<'_>,
) -> Result<Option<Duration>, ConfigError> {
    Ok(checked(raw, at, field, |d| {
        ensure(
            d.0 <= MAX_CROSS_ZONE_RTT,
            format!(
                "must be at most {}",
                humantime::format_duration(MAX_CROSS_ZONE_RTT)
            ),
        )
    })?
    .map(|d| d.0))
}

/// `zones_down`: zone labels, each once, each a zone some node is in (as
/// `POST /zones/down` answers 404 for any other, a typo here would otherwise
/// take nothing down, silently).
fn zones_down(
    raw: Vec<Spanned<String>>,
    frontends: &[FrontendConfig],
    at: &Locator<'_>,
) -> Result<BTreeSet<String>, ConfigError> {
    let known: BTreeSet<&str> = frontends
        .iter()
        .filter_map(|fe| fe.hop.as_ref())
        .flat_map(|hop| hop.nodes.iter().filter_map(|n| n.zone.as_deref()))
        .collect();
    let mut zones = BTreeSet::new();
    for (i, zone) in raw.into_iter().enumerate() {
        let field = format!("zones_down[{i}]");
        zone_label(zone.get_ref()).map_err(|why| at.at(zone.span(), &field, why))?;
        if !known.contains(zone.get_ref().as_str()) {
            let known: Vec<_> = known.iter().map(|z| format!("`{z}`")).collect();
            let why = match known.is_empty() {
                true => format!(
                    "no node is in zone `{}`: no node has a zone",
                    zone.get_ref()
                ),
                false => format!(
                    "no node is in zone `{}` (the nodes' zones: {})",
                    zone.get_ref(),
                    known.join(", ")
                ),
            };
            return Err(at.at(zone.span(), &field, why));
        }
        if !zones.insert(zone.get_ref().clone()) {
            return Err(at.at(
                zone.span(),
                &field,
                format!("zone `{}` is listed twice", zone.get_ref()),
            ));
        }
    }
    Ok(zones)
}

/// A zone as Kubernetes allows a label value (`IsValidLabelValue` in
/// k8s.io/apimachinery/pkg/util/validation: at most 63 characters,
/// alphanumerics, '-', '_' and '.', starting and ending with an
/// alphanumeric), and not empty: an empty zone is no zone.
pub(super) fn zone_label(zone: &str) -> Result<(), String> {
    const RULE: &str = "a zone is a Kubernetes label value: 1 to 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit, e.g. \"1\" or \"eastus-1\"";
    let alphanumeric = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    let ok = (1..=63).contains(&zone.len())
        && zone
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && alphanumeric(zone.chars().next())
        && alphanumeric(zone.chars().last());
    ensure(ok, format!("`{zone}` is not a zone: {RULE}"))
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
    defaults: FrontendDefaults,
    at: &Locator<'_>,
) -> Result<Vec<FrontendConfig>, ConfigError> {
    let mut seen = SeenFrontends::default();
    raw.into_iter()
        .enumerate()
        .map(|(fi, fe)| validate_frontend(fi, fe.into_inner(), defaults, &mut seen, at))
        .collect()
}

/// What a frontend takes from the top level unless it says otherwise.
#[derive(Clone, Copy)]
struct FrontendDefaults {
    /// From `[admin] byte_metrics` (no per-frontend override).
    byte_metrics: bool,
    cross_zone_rtt: Duration,
    /// The process's worker threads: `accept = "auto"` depends on them.
    workers: usize,
}

/// What the frontends before this one have claimed.
#[derive(Default)]
struct SeenFrontends {
    names: HashSet<String>,
    /// Listen addresses, by transport: a UDP and a TCP socket may share one.
    listens: Vec<(Transport, SocketAddr)>,
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
    defaults: FrontendDefaults,
    seen: &mut SeenFrontends,
    at: &Locator<'_>,
) -> Result<FrontendConfig, ConfigError> {
    let field = |name: &str| format!("frontends[{fi}].{name}");
    let protocol = fe
        .protocol
        .as_ref()
        .map_or_else(Default::default, |p| *p.get_ref());
    let name = frontend_name(&fe.name, &field, &mut seen.names, at)?;
    let listen = frontend_listen(&fe.listen, protocol, &field, &mut seen.listens, at)?;
    check_protocol_fields(fi, &fe, protocol, at)?;
    let limits = validate_limits(&fe, protocol, &field, at)?;
    let udp = validate_udp_settings(&fe, &field, at)?;
    let quic = validate_quic(fi, fe.quic.as_ref(), &fe.backends, at)?;
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
    if hop.is_none() && backends.is_empty() {
        // Nothing could ever serve this frontend: every connection would be refused.
        return Err(at.at(
            fe.name.span(),
            &field("backends"),
            "a frontend needs at least one [[frontends.backends]] or [[frontends.nodes]]",
        ));
    }
    let client_address = fe
        .client_address
        .map(Spanned::into_inner)
        .unwrap_or_default();
    check_client_address_is_bindable(&hop, client_address, &fe.listen, &field, at)?;
    check_half_close_has_a_userspace_copy(&fe.half_close, &fe.copy, &field, at)?;
    let engine = check_engine(&fe.engine, &fe.copy, &hop, &field, at)?;
    let engine_auto = fe.engine.is_none();
    let source_ranges = validate_source_ranges(fe.source_ranges, &field, at)?;
    let cross_zone_rtt = cross_zone_rtt(fe.cross_zone_rtt, &field("cross_zone_rtt"), at)?
        .unwrap_or(defaults.cross_zone_rtt);
    let accept = fe.accept.map(Spanned::into_inner).unwrap_or_default();
    Ok(FrontendConfig {
        name,
        listen,
        protocol,
        max_flows: udp.max_flows,
        udp_batch: udp.udp_batch,
        quic,
        backlog: limits.backlog,
        max_connections: limits.max_connections,
        connect_timeout: limits.connect_timeout,
        connect_retries: limits.connect_retries,
        idle_timeout: limits.idle_timeout,
        tcp_reset_on_idle: fe.tcp_reset_on_idle.is_some_and(|r| r.into_inner()),
        half_close: fe.half_close.is_none_or(|h| h.into_inner()),
        copy: fe.copy.map(Spanned::into_inner).unwrap_or_default(),
        engine,
        engine_auto,
        accept: accept.resolve(defaults.workers, protocol),
        accept_auto: accept == AcceptSetting::Auto,
        byte_metrics: defaults.byte_metrics,
        params: SnapshotParams {
            mode: fe.distribution,
            seed: fe.hash_seed.unwrap_or(FLOW_HASH_SEED),
            table_size: limits.table_size,
            no_healthy_backends: fe
                .no_healthy_backends
                .map(Spanned::into_inner)
                .unwrap_or_default(),
        },
        health,
        client_address,
        backends,
        hop,
        source_ranges,
        origin: None,
        cross_zone_rtt,
    })
}

/// `source_ranges = ["IP/LEN", ...]`: each entry a prefix (host bits masked,
/// a bare IP one host; lb-core's `source_ranges` module says why), each bad
/// one located at its own position. An empty list is refused: it would turn
/// every client away, and a reader could take it for "no restriction".
fn validate_source_ranges(
    raw: Option<Spanned<Vec<Spanned<String>>>>,
    field: &dyn Fn(&str) -> String,
    at: &Locator<'_>,
) -> Result<Option<SourceRanges>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    if raw.get_ref().is_empty() {
        return Err(at.at(
            raw.span(),
            &field("source_ranges"),
            "an empty list would refuse every client; list at least one prefix, or leave the field out to allow every client",
        ));
    }
    let mut prefixes = Vec::with_capacity(raw.get_ref().len());
    for (i, entry) in raw.into_inner().into_iter().enumerate() {
        let prefix = SourcePrefix::parse(entry.get_ref()).map_err(|problem| {
            at.at(
                entry.span(),
                &field(&format!("source_ranges[{i}]")),
                format!("`{}` {problem}", entry.get_ref()),
            )
        })?;
        prefixes.push(prefix);
    }
    Ok(Some(SourceRanges::from_prefixes(prefixes)))
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

/// A frontend's listen address, used by no frontend of the same transport
/// before it (port 0 aside): a UDP and a TCP frontend may share an address,
/// as an Azure frontend IP carries a TCP rule and a UDP rule on one port.
fn frontend_listen(
    raw: &Spanned<SocketAddr>,
    protocol: FrontendProtocol,
    field: &dyn Fn(&str) -> String,
    listens: &mut Vec<(Transport, SocketAddr)>,
    at: &Locator<'_>,
) -> Result<SocketAddr, ConfigError> {
    let listen = *raw.get_ref();
    let transport = Transport::of(protocol);
    if listen.port() != 0 && listens.contains(&(transport, listen)) {
        return Err(at.at(
            raw.span(),
            &field("listen"),
            format!(
                "{listen} ({}) is used by another frontend",
                transport.as_str()
            ),
        ));
    }
    listens.push((transport, listen));
    Ok(listen)
}

fn validate_limits(
    fe: &RawFrontend,
    protocol: FrontendProtocol,
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
    let positive = |d: &HumanDuration| ensure(!d.0.is_zero(), "must be greater than zero");
    let connect_timeout = checked(
        fe.connect_timeout.clone(),
        at,
        &field("connect_timeout"),
        positive,
    )?
    .map_or(DEFAULT_CONNECT_TIMEOUT, |d| d.0);
    let idle_timeout = checked(
        fe.idle_timeout.clone(),
        at,
        &field("idle_timeout"),
        positive,
    )?
    .map_or(
        if protocol.is_udp() {
            DEFAULT_UDP_IDLE_TIMEOUT
        } else {
            DEFAULT_IDLE_TIMEOUT
        },
        |d| d.0,
    );
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

/// `half_close = false` ends a flow at its first FIN, which only a userspace
/// copy sees: with `copy = "sockmap"` the kernel passes each FIN on itself.
fn check_half_close_has_a_userspace_copy(
    half_close: &Option<Spanned<bool>>,
    copy: &Option<Spanned<CopyMode>>,
    field: &dyn Fn(&str) -> String,
    at: &Locator<'_>,
) -> Result<(), ConfigError> {
    let off = half_close.as_ref().filter(|h| !*h.get_ref());
    let sockmap = copy
        .as_ref()
        .is_some_and(|c| *c.get_ref() == CopyMode::Sockmap);
    match off {
        Some(h) if sockmap => Err(at.at(
            h.span(),
            &field("half_close"),
            "`half_close = false` needs a userspace copy engine (auto, userspace or splice); \
             with copy = \"sockmap\" the kernel passes each FIN on by itself",
        )),
        _ => Ok(()),
    }
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
            let max = lb_core::MAX_AFFINITY_TIMEOUT.as_secs();
            ensure(
                (1..=max).contains(&t),
                format!("must be between 1 and {max}, as Kubernetes allows"),
            )
        },
    )?
    .map_or(lb_core::DEFAULT_AFFINITY_TIMEOUT, Duration::from_secs);
    let first_span = nodes[0].span();
    let mut seen = SeenNodes::default();
    let specs = nodes
        .into_iter()
        .enumerate()
        .map(|(ni, raw)| {
            let nfield = |n: &str| field(&format!("nodes[{ni}].{n}"));
            validate_node(raw.into_inner(), &mut seen, at, &nfield)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let service = ServiceSpec {
        external_traffic_policy: svc.external_traffic_policy,
        session_affinity: svc.session_affinity,
        affinity_timeout,
        snat: svc.snat,
        traffic_distribution: svc.traffic_distribution,
    };
    // Catch what lb-core would refuse (duplicate names, addresses) at check time.
    HopModel::new(specs.clone(), service)
        .map_err(|e| at.at(first_span, &field("nodes"), e.to_string()))?;
    Ok(Some(HopConfig {
        nodes: specs,
        service,
    }))
}

/// What the nodes before this one have claimed. lb-core refuses the same
/// duplicates, but can only name the node list; this names the duplicate.
#[derive(Default)]
struct SeenNodes {
    names: HashSet<String>,
    addresses: HashSet<IpAddr>,
    endpoints: HashSet<SocketAddr>,
}

/// One node: a name, a local address to SNAT from, connectable endpoints,
/// none of them used by a node before it.
fn validate_node(
    node: RawNode,
    seen: &mut SeenNodes,
    at: &Locator<'_>,
    nfield: &dyn Fn(&str) -> String,
) -> Result<NodeSpec, ConfigError> {
    // Kubernetes' rule for node names (see config/names.rs): nothing else in
    // a name can be mistaken for a separator in a metric label, a URL or a key.
    let name = node.name.get_ref().clone();
    super::names::dns1123_subdomain(&name)
        .map_err(|why| at.at(node.name.span(), &nfield("name"), why))?;
    if !seen.names.insert(name.clone()) {
        return Err(at.at(
            node.name.span(),
            &nfield("name"),
            format!("node name `{name}` is used by another node"),
        ));
    }
    if !seen.addresses.insert(*node.address.get_ref()) {
        return Err(at.at(
            node.address.span(),
            &nfield("address"),
            format!(
                "node address {} is used by another node",
                node.address.get_ref()
            ),
        ));
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
        let why = if ep.addr.port() == 0 || ep.addr.ip().is_unspecified() {
            format!("{} is not a connectable address", ep.addr)
        } else if !seen.endpoints.insert(ep.addr) {
            format!("endpoint {} is listed more than once", ep.addr)
        } else {
            String::new()
        };
        if !why.is_empty() {
            return Err(at.at(span, &nfield(&format!("endpoints[{ei}]")), why));
        }
        endpoints.push(ep);
    }
    let zone = checked(node.zone, at, &nfield("zone"), |z| zone_label(z))?;
    Ok(NodeSpec {
        name,
        address: node.address.into_inner(),
        endpoints,
        zone,
    })
}

fn validate_health(
    raw: Option<Spanned<RawHealth>>,
    at: &Locator<'_>,
    field: &dyn Fn(&str) -> String,
) -> Result<ProbeConfig, ConfigError> {
    let h = raw.map(Spanned::into_inner).unwrap_or_default();
    let kind = probe_kind(&h, at, field)?;
    let interval = checked(h.interval, at, &field("health.interval"), |d| {
        ensure(d.0 >= Duration::from_millis(10), "must be at least 10ms")
    })?
    .map_or(HealthConfig::DEFAULT_INTERVAL, |d| d.0);
    let timeout = checked(h.timeout, at, &field("health.timeout"), |d| {
        ensure(!d.0.is_zero(), "must be greater than zero")
    })?
    .map_or_else(|| interval.min(Duration::from_secs(2)), |d| d.0);
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
    let port = checked(h.port, at, &field("health.port"), |&p| {
        ensure(p != 0, "must be a port number, 1 to 65535")
    })?;
    Ok(ProbeConfig {
        kind,
        port,
        interval,
        timeout,
        thresholds,
    })
}

/// `kind` (tcp by default, http with a clean path, or none).
fn probe_kind(
    h: &RawHealth,
    at: &Locator<'_>,
    field: &dyn Fn(&str) -> String,
) -> Result<ProbeKind, ConfigError> {
    match h.kind.as_ref().map(|k| k.get_ref().as_str()) {
        None | Some("tcp") => Ok(ProbeKind::Tcp),
        Some("http") => {
            let Some(path) = &h.path else {
                return Ok(ProbeKind::Http { path: "/".into() });
            };
            let p = path.get_ref();
            if !p.starts_with('/')
                || p.chars()
                    .any(|c| c.is_ascii_whitespace() || c.is_ascii_control())
            {
                return Err(at.at(
                    path.span(),
                    &field("health.path"),
                    "must start with '/' and contain no spaces",
                ));
            }
            Ok(ProbeKind::Http { path: p.clone() })
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

/// `engine`, checked: the io_uring engine has its own copy (so no `copy`
/// but `auto`) and no cross-zone delay line (so no node with a zone).
/// Left out, it is the io_uring engine where the frontend can run on it and
/// tokio where its `copy` or zones ask for tokio (the server still falls
/// back to tokio where the kernel refuses io_uring): the ring costs less CPU
/// and memory per flow and moves bulk as fast (docs/research/new-connections.md,
/// "Change M").
fn check_engine(
    engine: &Option<Spanned<TcpEngine>>,
    copy: &Option<Spanned<CopyMode>>,
    hop: &Option<HopConfig>,
    field: &dyn Fn(&str) -> String,
    at: &Locator<'_>,
) -> Result<TcpEngine, ConfigError> {
    let zoned = hop
        .as_ref()
        .is_some_and(|h| h.nodes.iter().any(|n| n.zone.is_some()));
    let Some(engine) = engine else {
        let copy_auto = copy.as_ref().is_none_or(|c| *c.get_ref() == CopyMode::Auto);
        return Ok(if copy_auto && !zoned {
            TcpEngine::IoUring
        } else {
            TcpEngine::Tokio
        });
    };
    if *engine.get_ref() == TcpEngine::Tokio {
        return Ok(TcpEngine::Tokio);
    }
    if let Some(copy) = copy.as_ref().filter(|c| *c.get_ref() != CopyMode::Auto) {
        return Err(at.at(
            copy.span(),
            &field("copy"),
            "`copy` chooses among the tokio engine's copies; engine = \"io-uring\" copies through its ring (leave `copy` out)",
        ));
    }
    if zoned {
        return Err(at.at(
            engine.span(),
            &field("engine"),
            "engine = \"io-uring\" has no cross-zone delay line or zone-down cut; nodes with a `zone` need engine = \"tokio\"",
        ));
    }
    Ok(TcpEngine::IoUring)
}
