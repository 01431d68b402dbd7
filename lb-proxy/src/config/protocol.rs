//! What depends on a frontend's protocol: fields that only TCP or only UDP
//! uses (refused, located, on the other), the UDP data plane's settings, and
//! a QUIC frontend's QUIC-LB layout and backends' server IDs.

use std::collections::HashMap;
use std::ops::Range;

use lb_core::{NoHealthyBackends, QuicLbConfig, QuicLbError, ServerId};
use toml::Spanned;

use super::validate::{checked, ensure};
use super::{
    ClientAddress, ConfigError, FrontendProtocol, Locator, QuicFrontendConfig, RawBackend,
    RawFrontend, RawQuic, DEFAULT_MAX_FLOWS, DEFAULT_QUIC_NONCE_LEN, DEFAULT_UDP_BATCH,
    MAX_UDP_BATCH,
};

/// The kernel protocol of a frontend's sockets (QUIC runs over UDP).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Transport {
    Tcp,
    Udp,
}

impl Transport {
    pub(super) fn of(protocol: FrontendProtocol) -> Self {
        if protocol.is_udp() {
            Transport::Udp
        } else {
            Transport::Tcp
        }
    }

    pub(super) fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "TCP",
            Transport::Udp => "UDP",
        }
    }
}

/// The UDP data plane's settings of one frontend (defaults on a TCP one).
pub(super) struct UdpSettings {
    pub(super) max_flows: usize,
    pub(super) udp_batch: usize,
}

/// Refuses, located, a field that only the other protocol uses: silently
/// ignoring it would let a config say what the balancer does not do.
pub(super) fn check_protocol_fields(
    fi: usize,
    fe: &RawFrontend,
    protocol: FrontendProtocol,
    at: &Locator<'_>,
) -> Result<(), ConfigError> {
    let field = |name: &str| format!("frontends[{fi}].{name}");
    if protocol.is_udp() {
        check_no_tcp_fields(fe, protocol, &field, at)?;
    } else {
        check_no_udp_fields(fe, &field, at)?;
    }
    check_quic_fields(fi, fe, protocol, at)
}

/// The first of `fields` that is present: its name and where it is.
fn first_present(
    fields: &[(&'static str, Option<Range<usize>>)],
) -> Option<(&'static str, Range<usize>)> {
    fields
        .iter()
        .find_map(|(name, span)| span.clone().map(|s| (*name, s)))
}

fn span_of<T>(v: &Option<Spanned<T>>) -> Option<Range<usize>> {
    v.as_ref().map(Spanned::span)
}

/// A udp/quic frontend has no listener, connect or byte stream to tune, and
/// no all-down fallback: Azure ends every UDP flow when all backends are down.
fn check_no_tcp_fields(
    fe: &RawFrontend,
    protocol: FrontendProtocol,
    field: &dyn Fn(&str) -> String,
    at: &Locator<'_>,
) -> Result<(), ConfigError> {
    let p = protocol.as_str();
    let tcp_only = [
        ("backlog", span_of(&fe.backlog)),
        ("accept", span_of(&fe.accept)),
        ("copy", span_of(&fe.copy)),
        ("engine", span_of(&fe.engine)),
        ("connect_timeout", span_of(&fe.connect_timeout)),
        ("connect_retries", span_of(&fe.connect_retries)),
        ("max_connections", span_of(&fe.max_connections)),
        ("tcp_reset_on_idle", span_of(&fe.tcp_reset_on_idle)),
        ("half_close", span_of(&fe.half_close)),
    ];
    if let Some((name, span)) = first_present(&tcp_only) {
        let hint = if name == "max_connections" {
            "; a udp/quic frontend bounds its flows with `max_flows`"
        } else {
            ""
        };
        return Err(at.at(
            span,
            &field(name),
            format!("`{name}` is for tcp frontends, and this frontend's protocol is {p}{hint}"),
        ));
    }
    if let Some(ca) = &fe.client_address {
        if matches!(
            ca.get_ref(),
            ClientAddress::ProxyProtocolV1 | ClientAddress::ProxyProtocolV2
        ) {
            return Err(at.at(
                ca.span(),
                &field("client_address"),
                format!("a PROXY protocol header precedes a TCP stream's bytes; a {p} frontend delivers with \"snat\" or \"preserve\""),
            ));
        }
    }
    if let Some(nhb) = &fe.no_healthy_backends {
        if *nhb.get_ref() == NoHealthyBackends::RouteAll {
            return Err(at.at(
                nhb.span(),
                &field("no_healthy_backends"),
                format!("\"route-all\" is for tcp frontends: when every backend is down Azure ends all UDP flows, so a {p} frontend can only \"refuse\""),
            ));
        }
    }
    Ok(())
}

/// A tcp frontend has no UDP flow table, datagram batches or QUIC-LB layout.
fn check_no_udp_fields(
    fe: &RawFrontend,
    field: &dyn Fn(&str) -> String,
    at: &Locator<'_>,
) -> Result<(), ConfigError> {
    let udp_only = [
        ("max_flows", span_of(&fe.max_flows)),
        ("udp_batch", span_of(&fe.udp_batch)),
    ];
    if let Some((name, span)) = first_present(&udp_only) {
        return Err(at.at(
            span,
            &field(name),
            format!("`{name}` is for udp and quic frontends; set protocol = \"udp\" or \"quic\" (this frontend is tcp)"),
        ));
    }
    Ok(())
}

/// `[frontends.quic]` and backends' `server_id` exactly when protocol is
/// quic, and no node hop on quic: a server ID names a backend the balancer
/// sends to, where the hop model balances over nodes that forward to pods.
fn check_quic_fields(
    fi: usize,
    fe: &RawFrontend,
    protocol: FrontendProtocol,
    at: &Locator<'_>,
) -> Result<(), ConfigError> {
    let field = |name: &str| format!("frontends[{fi}].{name}");
    let is_quic = protocol == FrontendProtocol::Quic;
    match (&fe.protocol, &fe.quic) {
        (Some(p), None) if is_quic => {
            return Err(at.at(
                p.span(),
                &field("quic"),
                "a quic frontend needs a [frontends.quic] table: config_id, server_id_length (and nonce_length, default 4)",
            ));
        }
        (_, Some(q)) if !is_quic => {
            return Err(at.at(
                q.span(),
                &field("quic"),
                format!(
                    "[frontends.quic] is for protocol = \"quic\"; this frontend's protocol is {}",
                    protocol.as_str()
                ),
            ));
        }
        _ => {}
    }
    if let (true, Some(node)) = (is_quic, fe.nodes.first()) {
        return Err(at.at(
            node.span(),
            &field("nodes"),
            "a quic frontend routes by the server ID of a backend, so it needs [[frontends.backends]], not [[frontends.nodes]] (the node hop works with protocol = \"udp\")",
        ));
    }
    if is_quic {
        return Ok(());
    }
    for (bi, be) in fe.backends.iter().enumerate() {
        if let Some(sid) = &be.get_ref().server_id {
            return Err(at.at(
                sid.span(),
                &field(&format!("backends[{bi}].server_id")),
                format!("a server ID is for backends of a quic frontend; this frontend's protocol is {}", protocol.as_str()),
            ));
        }
    }
    Ok(())
}

/// The flow-table bound and datagram batch of a udp/quic frontend.
pub(super) fn validate_udp_settings(
    fe: &RawFrontend,
    field: &dyn Fn(&str) -> String,
    at: &Locator<'_>,
) -> Result<UdpSettings, ConfigError> {
    let max_flows = checked(fe.max_flows.clone(), at, &field("max_flows"), |&m| {
        ensure(m >= 1, "must be at least 1")
    })?
    .unwrap_or(DEFAULT_MAX_FLOWS);
    let udp_batch = checked(fe.udp_batch.clone(), at, &field("udp_batch"), |&b| {
        ensure(
            (1..=MAX_UDP_BATCH).contains(&b),
            format!("must be between 1 (one syscall per datagram) and {MAX_UDP_BATCH}"),
        )
    })?
    .unwrap_or(DEFAULT_UDP_BATCH);
    Ok(UdpSettings {
        max_flows,
        udp_batch,
    })
}

/// A quic frontend's QUIC-LB layout, as lb-core validates it, and every
/// backend's server ID: present, hex, `server_id_length` bytes, unique.
/// `None` for other protocols (`check_quic_fields` refused a stray table).
pub(super) fn validate_quic(
    fi: usize,
    raw: Option<&Spanned<RawQuic>>,
    backends: &[Spanned<RawBackend>],
    at: &Locator<'_>,
) -> Result<Option<QuicFrontendConfig>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let q = raw.get_ref();
    let nonce_len = q
        .nonce_length
        .as_ref()
        .map_or(DEFAULT_QUIC_NONCE_LEN, |n| *n.get_ref());
    let lb = QuicLbConfig::new(
        *q.config_id.get_ref(),
        *q.server_id_length.get_ref(),
        nonce_len,
    )
    .map_err(|e| {
        let (name, span) = quic_error_field(&e, raw);
        at.at(span, &format!("frontends[{fi}].{name}"), e.to_string())
    })?;
    let server_ids = server_ids(fi, &lb, backends, at)?;
    Ok(Some(QuicFrontendConfig { lb, server_ids }))
}

/// The field (under the frontend) a layout error is about, and where it is.
fn quic_error_field(e: &QuicLbError, raw: &Spanned<RawQuic>) -> (&'static str, Range<usize>) {
    let q = raw.get_ref();
    let nonce = q.nonce_length.as_ref().map(Spanned::span);
    match e {
        QuicLbError::ConfigId(_) => ("quic.config_id", q.config_id.span()),
        QuicLbError::ServerIdLength(_) => ("quic.server_id_length", q.server_id_length.span()),
        // Too long: the nonce when it was given (the server ID length is
        // what the backends were built with), else the server ID length.
        QuicLbError::NonceLength(_) | QuicLbError::TooLong { .. } => match nonce {
            Some(span) => ("quic.nonce_length", span),
            None => ("quic.server_id_length", q.server_id_length.span()),
        },
        // Not errors of a layout; the table as a whole, should one appear.
        _ => ("quic", raw.span()),
    }
}

/// Each backend's server ID, by backend name, in backend order.
fn server_ids(
    fi: usize,
    lb: &QuicLbConfig,
    backends: &[Spanned<RawBackend>],
    at: &Locator<'_>,
) -> Result<Vec<(String, ServerId)>, ConfigError> {
    let mut owners: HashMap<ServerId, String> = HashMap::new();
    let mut out = Vec::with_capacity(backends.len());
    for (bi, be) in backends.iter().enumerate() {
        let be = be.get_ref();
        let field = format!("frontends[{fi}].backends[{bi}].server_id");
        let name = be.name.get_ref().trim().to_owned();
        let Some(raw) = &be.server_id else {
            return Err(at.at(
                be.name.span(),
                &field,
                format!(
                    "backend `{name}` of a quic frontend needs a server_id: {} bytes in hex, as its connection IDs carry",
                    lb.server_id_len()
                ),
            ));
        };
        let located = |message: String| at.at(raw.span(), &field, message);
        let sid = ServerId::from_hex(raw.get_ref().trim()).map_err(|e| located(e.to_string()))?;
        let got = sid.as_bytes().len();
        if got != lb.server_id_len() {
            let want = lb.server_id_len();
            return Err(located(format!(
                "{} (server_id_length)",
                QuicLbError::ServerIdMismatch { got, want }
            )));
        }
        if let Some(other) = owners.get(&sid) {
            return Err(located(format!(
                "server ID {sid} is also backend `{other}`'s: each backend needs its own, or the balancer cannot tell their connections apart"
            )));
        }
        owners.insert(sid, name.clone());
        out.push((name, sid));
    }
    Ok(out)
}
