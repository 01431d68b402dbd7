//! The admin HTTP endpoint (hyper): `/metrics`, `/healthz`, `/ready` (see
//! [`ready`]), `/backends` (with the config fingerprint), `/explain`, and `/zones`: `GET /zones` lists the zones and which are down;
//! `POST /zones/down?zone=Z` and `POST /zones/up?zone=Z` take a zone down or
//! bring it up (the only requests that change state, hence POST; the
//! endpoint is loopback-only unless `allow_non_loopback` is set).
//!
//! Loopback-only does not keep a browser out: any web page the developer
//! opens can send a "simple" cross-origin POST to 127.0.0.1 without a
//! preflight (CSRF). So a state-changing request that carries an `Origin`
//! header, or a `Sec-Fetch-Site` other than `none`, which browsers add and
//! curl, scripts and `lb-bench` do not, is refused with 403 before it is
//! acted on. The admin serves no pages, so no legitimate caller sends them.
//!
//! `/explain` answers for TCP, UDP and QUIC frontends alike (a UDP or QUIC
//! flow is hashed as a TCP one is; `proto` defaults to the frontend's); on a
//! QUIC frontend `cid=HEX` adds what the connection ID says and whether it
//! routes the datagram. It explains the hash and the CID, not a worker's
//! flow table: a flow already pinned stays where the table put it.
//!
//! `/explain` also says whether the frontend's `source_ranges` let `src` in
//! (`allowed`, and `source_range`: the most specific listed prefix that
//! matched, `null` when there is no list or the client is outside it). A
//! client with `allowed: false` is refused before any hashing; the rest of
//! the answer says where its flow would go if it were let in.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use lb_core::quic_lb::MAX_CID_LEN;
use lb_core::{
    target_source, CidRoute, Classified, ClientAnnouncement, ConnectionId, DatagramKind, FlowKey,
    Protocol, SessionAffinity, MAX_CHOICES,
};
use serde_json::json;
use tokio::net::TcpListener;
use tracing::debug;

use crate::config::{ProbeConfig, ProbeKind, ServiceOrigin};
use crate::metrics::Metrics;
use crate::state::{Frontend, HopRouting, Routing, ZoneReply};
use crate::target::ZoneHop;

mod ready;

pub use ready::{Lifecycle, LifecycleState, StopCause};

pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub frontends: Vec<Arc<Frontend>>,
    /// Whether the process is stopping, for `/ready`.
    pub lifecycle: Arc<LifecycleState>,
}

pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of fds (the reserve is spent too): the listener stays readable,
                // so retrying at once would spin the control thread. Pause instead.
                debug!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let admin = Arc::clone(&admin);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let admin = Arc::clone(&admin);
                async move { Ok::<_, Infallible>(handle(&admin, req).await) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(error = %e, "admin connection error");
            }
        });
    }
}

fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

fn json_response(status: StatusCode, value: serde_json::Value) -> Response<Full<Bytes>> {
    respond(status, "application/json", value.to_string())
}

/// `/zones` actions wait for the control plane; everything else answers at once.
async fn handle(admin: &Admin, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let down = match req.uri().path() {
        "/zones/down" => true,
        "/zones/up" => false,
        _ => return route(admin, req),
    };
    if req.method() != Method::POST {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "zone actions are POST only\n",
        );
    }
    if let Some(why) = from_a_browser(req.headers()) {
        debug!(why, "refused a state-changing admin request from a browser");
        return json_response(
            StatusCode::FORBIDDEN,
            json!({ "error": format!("refused: {why}; state-changing admin requests come from curl or scripts, not web pages") }),
        );
    }
    let Some(zone) = query_param(req.uri().query().unwrap_or(""), "zone") else {
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({ "error": "name the zone: ?zone=Z" }),
        );
    };
    zone_action(admin, zone.to_owned(), down).await
}

/// Why a request looks like a browser's, which a web page may have sent on
/// its own (see the module doc): it names an `Origin`, or a fetch that is
/// not the user's own (`Sec-Fetch-Site` other than `none`).
fn from_a_browser(headers: &hyper::HeaderMap) -> Option<&'static str> {
    if headers.contains_key(hyper::header::ORIGIN) {
        return Some("the request carries an Origin header");
    }
    match headers.get("sec-fetch-site") {
        Some(site) if site.as_bytes() != b"none" => {
            Some("the request carries Sec-Fetch-Site other than `none`")
        }
        _ => None,
    }
}

/// Asks the control plane to take `zone` down or bring it up, and reports
/// the outcome: 200 with the zone's state, 404 for a zone no node is in,
/// 409 for a zone the config holds down.
async fn zone_action(admin: &Admin, zone: String, down: bool) -> Response<Full<Bytes>> {
    let Some(signal) = admin.frontends.first().map(|fe| Arc::clone(&fe.zones)) else {
        return json_response(StatusCode::NOT_FOUND, json!({ "error": "no frontends" }));
    };
    match signal.request(zone.clone(), down).await {
        Some(ZoneReply::Done { down, changed }) => json_response(
            StatusCode::OK,
            json!({ "zone": zone, "down": down, "changed": changed }),
        ),
        Some(ZoneReply::Unknown) => json_response(
            StatusCode::NOT_FOUND,
            json!({ "error": format!("no node is in zone `{zone}`") }),
        ),
        Some(ZoneReply::HeldByConfig) => json_response(
            StatusCode::CONFLICT,
            json!({ "error": format!("zone `{zone}` is down by the config's zones_down: change the config and reload") }),
        ),
        None => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "error": "the control plane is not running" }),
        ),
    }
}

/// `GET /zones`: every node zone of every frontend, and whether it is down.
fn zones(admin: &Admin) -> serde_json::Value {
    let down = admin
        .frontends
        .first()
        .map(|fe| fe.zones.down())
        .unwrap_or_default();
    let mut known: std::collections::BTreeSet<Arc<str>> = down.iter().cloned().collect();
    for fe in &admin.frontends {
        if let Some(hop) = &fe.routing.load().hop {
            known.extend(hop.zones.iter().flatten().cloned());
        }
    }
    let zones: Vec<_> = known
        .iter()
        .map(|z| json!({ "zone": &**z, "down": down.contains(z) }))
        .collect();
    json!({ "zones": zones })
}

fn route(admin: &Admin, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET is supported\n",
        );
    }
    match req.uri().path() {
        "/metrics" => {
            ready::update_gauges(admin);
            respond(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                admin.metrics.encode(),
            )
        }
        "/ready" => {
            let frontend = query_param(req.uri().query().unwrap_or(""), "frontend");
            let (status, body) = ready::ready(admin, frontend);
            respond(status, "text/plain", body)
        }
        "/healthz" => match query_param(req.uri().query().unwrap_or(""), "node") {
            None => respond(StatusCode::OK, "text/plain", "ok\n"),
            Some(node) => health_check_node_port(admin, req.uri().query().unwrap_or(""), node),
        },
        "/backends" => json_response(StatusCode::OK, backends(admin)),
        "/zones" => json_response(StatusCode::OK, zones(admin)),
        "/explain" => match explain(admin, req.uri().query().unwrap_or("")) {
            Ok(v) => json_response(StatusCode::OK, v),
            Err(msg) => json_response(StatusCode::BAD_REQUEST, json!({ "error": msg })),
        },
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /healthz, /ready, /backends, /explain, /zones\n",
        ),
    }
}

fn backends(admin: &Admin) -> serde_json::Value {
    // One load of each frontend's settings: the per-frontend and the
    // top-level fingerprint come from the same configs, even mid-reload.
    let all_settings: Vec<_> = admin.frontends.iter().map(|f| f.settings.load()).collect();
    let frontends: Vec<_> = admin
        .frontends
        .iter()
        .zip(&all_settings)
        .map(|(fe, settings)| {
            let origin = settings.origin.as_ref();
            let routing = fe.routing.load();
            let snap = &routing.snapshot;
            let table = snap.table();
            let slots = table.slot_counts(snap.backends().len());
            let total_weight: u64 = snap
                .backends()
                .iter()
                .enumerate()
                .filter(|(i, _)| slots[*i] > 0)
                .map(|(_, b)| u64::from(b.weight))
                .sum();
            let backends: Vec<_> = snap
                .backends()
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    let rt = &routing.backends[i];
                    let expected = if slots[i] > 0 && total_weight > 0 {
                        f64::from(b.weight) / total_weight as f64
                    } else {
                        0.0
                    };
                    json!({
                        "name": b.name,
                        "address": b.addr.to_string(),
                        "weight": b.weight,
                        "healthy": snap.is_healthy(i as u32),
                        "active_connections": rt.metrics.active.get(),
                        "connections_total": rt.metrics.connections.get(),
                        "active_udp_flows": rt.metrics.active_udp_flows.get(),
                        "udp_flows_total": rt.metrics.udp_flows.get(),
                        "table_slots": slots[i],
                        "table_share": if table.size() > 0 { f64::from(slots[i]) / f64::from(table.size()) } else { 0.0 },
                        "expected_share": expected,
                        "zone": node_zone(origin, &b.name),
                    })
                })
                .collect();
            let mut out = json!({
                "name": &*fe.name,
                "listen": fe.listen.to_string(),
                "protocol": fe.protocol.as_str(),
                "distribution": snap.mode().azure_name(),
                "generation": snap.generation(),
                "fingerprint": settings.fingerprint().to_string(),
                "hash_version": lb_core::FLOW_HASH_VERSION,
                "table_size": table.size(),
                "no_healthy_backends": snap.params().no_healthy_backends,
                "routing_over_unhealthy": snap.is_routing_over_unhealthy(),
                "active_connections": fe.active(),
                "idle_timeout_s": settings.idle_timeout.as_secs(),
                "tcp_reset_on_idle": settings.tcp_reset_on_idle,
                "half_close": settings.half_close,
                "health": health_json(&settings.health),
                "backends": backends,
            });
            add_origin(&mut out, origin);
            out
        })
        .collect();
    let fingerprint = ready::fingerprint_of(&all_settings);
    json!({ "fingerprint": fingerprint.to_string(), "frontends": frontends })
}

/// The frontend's probe as configured (what a translated Service's probe
/// annotations became): kind, path, port, interval and thresholds.
fn health_json(h: &ProbeConfig) -> serde_json::Value {
    let (kind, path) = match &h.kind {
        ProbeKind::None => ("none", None),
        ProbeKind::Tcp => ("tcp", None),
        ProbeKind::Http { path } => ("http", Some(path.as_str())),
    };
    json!({
        "kind": kind,
        "path": path,
        "port": h.port,
        "interval_s": h.interval.as_secs_f64(),
        "rise": h.thresholds.rise,
        "fall": h.thresholds.fall,
    })
}

/// The zone of node `name`, for a frontend translated from a Service.
fn node_zone<'a>(origin: Option<&'a ServiceOrigin>, name: &str) -> Option<&'a str> {
    origin?
        .node_zones
        .iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, z)| z.as_deref())
}

/// Names the Service and port a frontend came from (`run --service`), on a
/// `/backends` or `/explain` answer; nothing for a TOML frontend.
fn add_origin(out: &mut serde_json::Value, origin: Option<&ServiceOrigin>) {
    let (Some(o), Some(map)) = (origin, out.as_object_mut()) else {
        return;
    };
    map.insert(
        "service".into(),
        json!(format!("{}/{}", o.namespace, o.service)),
    );
    map.insert("port".into(), json!(o.port));
    map.insert("port_name".into(), json!(o.port_name));
    map.insert("rule".into(), json!(o.rule));
    map.insert("traffic_distribution".into(), json!(o.traffic_distribution));
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then_some(v)
    })
}

fn explain(admin: &Admin, query: &str) -> Result<serde_json::Value, String> {
    let (fe, key) = explain_query(admin, query)?;
    let (src, dst, proto) = (key.src, key.dst, key.proto);
    let routing = fe.routing.load();
    let snap = &routing.snapshot;
    let route = snap.route(&key);
    let fields = snap.mode().hashed_fields();
    let settings = fe.settings.load();
    let origin = settings.origin.as_ref();
    let name_of = |id: u32| {
        snap.backend(id).map(|b| {
            json!({ "name": b.name, "address": b.addr.to_string(), "zone": node_zone(origin, &b.name) })
        })
    };
    let (retries, announce, source) = (
        settings.connect_retries,
        settings.client_address.announcement(),
        explain_source(settings.source_ranges.as_ref(), src.ip()),
    );
    let choices: Vec<_> = snap
        .choices(&key)
        .take(1 + retries.min(MAX_CHOICES - 1))
        .collect();
    let hop = routing
        .hop
        .as_ref()
        .and_then(|hop| explain_hop(hop, route.backend?, src, announce));
    let cid = match query_param(query, "cid") {
        Some(hex) => Some(explain_cid(fe, &routing, hex)?),
        None => None,
    };
    // A datagram whose CID routes goes to the CID's backend, whatever the hash says.
    let backend = match &cid {
        Some(c) if c.backend.is_some() && c.routed => c.backend,
        _ => route.backend,
    };
    let mut out = json!({
        "frontend": &*fe.name,
        "protocol": fe.protocol.as_str(),
        "flow": { "src": src.to_string(), "dst": dst.to_string(), "proto": proto.as_str() },
        "allowed": source.allowed,
        "source_range": source.prefix,
        "source_ranges": source.ranges,
        "distribution": snap.mode().azure_name(),
        "hashed_fields": {
            "src_ip": fields.src_ip, "src_port": fields.src_port,
            "dst_ip": fields.dst_ip, "dst_port": fields.dst_port, "proto": fields.proto,
        },
        "hash": format!("{:#018x}", route.hash),
        "slot": route.slot,
        "table_size": snap.table().size(),
        "generation": snap.generation(),
        "backend": backend.and_then(name_of),
        "fallbacks": choices.iter().skip(1).filter_map(|&id| name_of(id)).collect::<Vec<_>>(),
        "hop": hop,
        "cid": cid.map(|c| c.json),
    });
    add_origin(&mut out, origin);
    Ok(out)
}

/// Whether a frontend's `source_ranges` let a client in, and by which prefix.
struct SourceExplanation {
    allowed: bool,
    /// The most specific listed prefix containing the client.
    prefix: Option<String>,
    /// The whole list; `None`: every client is allowed.
    ranges: Option<Vec<String>>,
}

/// The data plane's verdict ([`lb_core::SourceRanges::contains`]) with the
/// prefix that gave it, for `/explain`.
fn explain_source(ranges: Option<&lb_core::SourceRanges>, client: IpAddr) -> SourceExplanation {
    let Some(ranges) = ranges else {
        return SourceExplanation {
            allowed: true,
            prefix: None,
            ranges: None,
        };
    };
    SourceExplanation {
        allowed: ranges.contains(client),
        prefix: ranges.matching(client).map(|p| p.to_string()),
        ranges: Some(ranges.prefixes().iter().map(|p| p.to_string()).collect()),
    }
}

/// What a QUIC frontend makes of a destination connection ID.
struct CidExplanation {
    /// The backend the server ID names, healthy or not.
    backend: Option<u32>,
    /// Whether the CID routes the datagram (step 1 of the QUIC order).
    routed: bool,
    json: serde_json::Value,
}

/// `cid=HEX` of `/explain`: the config rotation, the server ID the CID
/// carries, its backend, and whether the CID routes a short-header packet
/// (the decision lb-core's router makes in the data plane) or why not.
fn explain_cid(fe: &Frontend, routing: &Routing, hex: &str) -> Result<CidExplanation, String> {
    let router = routing.quic.as_ref().ok_or_else(|| {
        format!(
            "`cid` applies to quic frontends; `{}` is {}",
            fe.name,
            fe.protocol.as_str()
        )
    })?;
    let bytes = parse_cid_hex(hex)?;
    let server_id = router.config().decode(&bytes);
    let backend = server_id
        .as_ref()
        .ok()
        .and_then(|sid| router.backend_of(sid));
    let short = Classified {
        kind: DatagramKind::Short,
        dst_cid: ConnectionId::new(&bytes),
    };
    let (routed, reason) = match router.route(&short, &routing.snapshot) {
        CidRoute::Backend { .. } => (true, None),
        CidRoute::Fallback(why) => (false, Some(why.as_str())),
    };
    let name = backend
        .and_then(|id| routing.snapshot.backend(id))
        .map(|b| b.name.clone());
    Ok(CidExplanation {
        backend,
        routed,
        json: json!({
            "config_id": bytes[0] >> 5,
            "server_id": server_id.ok().map(|sid| sid.to_string()),
            "backend": name,
            "route": if routed { "cid" } else { "fallback" },
            "reason": reason,
        }),
    })
}

/// A connection ID in hex: 1 to 20 bytes (QUIC v1's bound).
fn parse_cid_hex(hex: &str) -> Result<Vec<u8>, String> {
    let bad = || format!("bad `cid`: `{hex}` is not 1 to {MAX_CID_LEN} bytes of hex");
    if hex.is_empty() || hex.len() & 1 == 1 || hex.len() > 2 * MAX_CID_LEN {
        return Err(bad());
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(bad)
}

/// `/explain`'s arguments: the frontend (required when there are several),
/// and the flow (`src`, `dst` defaulting to the frontend's address, `proto`).
fn explain_query<'a>(
    admin: &'a Admin,
    query: &str,
) -> Result<(&'a Arc<Frontend>, FlowKey), String> {
    let fe = match query_param(query, "frontend") {
        Some(name) => admin
            .frontends
            .iter()
            .find(|f| *f.name == *name)
            .ok_or_else(|| format!("no frontend named `{name}`"))?,
        None if admin.frontends.len() == 1 => &admin.frontends[0],
        None => return Err("`frontend` is required when there are several".into()),
    };
    let src: SocketAddr = query_param(query, "src")
        .ok_or("`src=IP:PORT` is required")?
        .replace("%3A", ":")
        .parse()
        .map_err(|e| format!("bad `src`: {e}"))?;
    let dst: SocketAddr = match query_param(query, "dst") {
        Some(d) => d
            .replace("%3A", ":")
            .parse()
            .map_err(|e| format!("bad `dst`: {e}"))?,
        None => fe.listen,
    };
    let default_proto = if fe.protocol.is_udp() { "udp" } else { "tcp" };
    let proto: Protocol = query_param(query, "proto")
        .unwrap_or(default_proto)
        .parse()
        .map_err(|e| format!("bad `proto`: {e}"))?;
    Ok((fe, FlowKey::new(src, dst, proto)))
}

/// The second hop of an explanation: the node the table chose, the endpoints
/// its kube-proxy chooses among, and the source address each would see (by
/// the data plane's own rule, [`lb_core::target_source`]).
fn explain_hop(
    hop: &HopRouting,
    node: u32,
    src: SocketAddr,
    announce: ClientAnnouncement,
) -> Option<serde_json::Value> {
    let model = &hop.model;
    let spec = model.nodes().get(node as usize)?;
    let pinned = hop
        .affinity
        .get(node as usize)
        .and_then(|t| t.lock().lookup(src.ip(), crate::target::process_clock()));
    let endpoints: Vec<_> = model
        .endpoints_from(node)
        .iter()
        .filter_map(|&e| {
            let ep = model.endpoint(e)?;
            let source = target_source(src.ip(), announce, Some(model.source_seen(node, e)));
            let zones = hop.zone_hop(node, e.node);
            Some(json!({
                "address": ep.addr.to_string(),
                "node": model.nodes().get(e.node as usize).map(|n| n.name.clone()),
                "zone": model.node_zone(e.node),
                "crosses_zones": zones.as_ref().map(ZoneHop::crosses),
                "added_rtt_ms": zones.map(|z| (z.one_way_delay * 2).as_secs_f64() * 1e3),
                "source_seen": source.seen.map(|ip| ip.to_string()),
                "connection_source": source.bind.map(|ip| ip.to_string()),
            }))
        })
        .collect();
    Some(json!({
        "node": spec.name,
        "node_address": spec.address.to_string(),
        "node_zone": model.node_zone(node),
        "traffic_distribution": model.service().traffic_distribution,
        "cross_zone_rtt_ms": hop.cross_zone_rtt.as_secs_f64() * 1e3,
        "external_traffic_policy": model.service().external_traffic_policy,
        "session_affinity": model.service().session_affinity,
        "snat": model.service().snat,
        "endpoint_choice": match (model.service().session_affinity, pinned) {
            (SessionAffinity::ClientIp, Some(_)) => "pinned by ClientIP affinity",
            (SessionAffinity::ClientIp, None) => "uniform random, then pinned by ClientIP affinity",
            _ => "uniform random among the candidates (kube-proxy iptables statistic mode)",
        },
        "affinity_pinned_endpoint": pinned.map(|a| a.to_string()),
        "endpoint_candidates": endpoints,
    }))
}

/// What Azure's probe of a node finds ([`lb_core::HopModel::node_health_check`]):
/// under `Local` kube-proxy's healthCheckNodePort (200 with ready local
/// endpoints, 503 without); under `Cluster` 200 on every node while the
/// service has a ready endpoint anywhere. The body says which and why.
fn health_check_node_port(admin: &Admin, query: &str, node: &str) -> Response<Full<Bytes>> {
    let fe = match query_param(query, "frontend") {
        Some(name) => admin.frontends.iter().find(|f| *f.name == *name),
        None => admin
            .frontends
            .iter()
            .find(|f| f.routing.load().hop.is_some()),
    };
    let Some(fe) = fe else {
        return json_response(
            StatusCode::NOT_FOUND,
            json!({ "error": "no frontend with nodes" }),
        );
    };
    let routing = fe.routing.load();
    let Some(hop) = &routing.hop else {
        return json_response(
            StatusCode::NOT_FOUND,
            json!({ "error": format!("frontend `{}` has no nodes", fe.name) }),
        );
    };
    let Some(index) = hop.model.node_index(node) else {
        return json_response(
            StatusCode::NOT_FOUND,
            json!({ "error": format!("no node named `{node}`") }),
        );
    };
    let check = hop.model.node_health_check(index);
    let status = StatusCode::from_u16(check.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    json_response(
        status,
        json!({
            "service": { "namespace": "default", "name": &*fe.name },
            "localEndpoints": check.local_endpoints,
            "externalTrafficPolicy": hop.model.service().external_traffic_policy,
            "reason": check.reason,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Controller;
    use crate::state::HealthKey;

    const QUIC: &str = r#"
[[frontends]]
name = "q"
listen = "127.0.0.1:4433"
protocol = "quic"

[frontends.health]
fall = 1

[frontends.quic]
config_id = 0
server_id_length = 3

[[frontends.backends]]
name = "a"
address = "127.0.0.1:4434"
server_id = "000001"

[[frontends.backends]]
name = "b"
address = "127.0.0.1:4435"
server_id = "000002"

[[frontends]]
name = "t"
listen = "127.0.0.1:8080"

[[frontends.backends]]
name = "a"
address = "127.0.0.1:9001"
"#;

    fn lab() -> (Admin, Controller) {
        let config = crate::config::parse("q.toml", QUIC).unwrap();
        let metrics = Arc::new(Metrics::new());
        let listen = [config.frontends[0].listen, config.frontends[1].listen];
        let ctl = Controller::new(config, None, &listen, Arc::clone(&metrics), None).unwrap();
        let admin = Admin {
            metrics,
            frontends: ctl.frontends().to_vec(),
            lifecycle: Arc::default(),
        };
        (admin, ctl)
    }

    /// The draft's layout: first octet 0x07 (config 0, 7 more bytes), server ID, nonce.
    const CID_OF_B: &str = "070000024504cc4f";

    #[test]
    fn explain_decodes_a_cid_and_says_whether_it_routes() {
        let (admin, mut ctl) = lab();
        let q = format!("frontend=q&src=127.0.0.1:5000&cid={CID_OF_B}");
        let v = explain(&admin, &q).unwrap();
        assert_eq!(v["protocol"], "quic");
        assert_eq!(v["flow"]["proto"], "udp", "a QUIC frontend's flows are UDP");
        assert_eq!(v["cid"]["config_id"], 0);
        assert_eq!(v["cid"]["server_id"], "000002");
        assert_eq!(v["cid"]["backend"], "b");
        assert_eq!(v["cid"]["route"], "cid");
        assert_eq!(v["cid"]["reason"], serde_json::Value::Null);
        assert_eq!(
            v["backend"]["name"], "b",
            "the CID's backend, whatever the hash"
        );

        ctl.probe_result(0, &HealthKey::Backend(Arc::from("b")), false);
        let v = explain(&admin, &q).unwrap();
        assert_eq!(v["cid"]["backend"], "b");
        assert_eq!(v["cid"]["route"], "fallback");
        assert_eq!(v["cid"]["reason"], "backend_down");
        assert_eq!(
            v["backend"]["name"], "a",
            "the hash's backend, the only one up"
        );

        let v = explain(&admin, "frontend=q&src=127.0.0.1:5000&cid=e7000001aabbccdd").unwrap();
        assert_eq!(v["cid"]["config_id"], 7);
        assert_eq!(v["cid"]["server_id"], serde_json::Value::Null);
        assert_eq!(v["cid"]["reason"], "unroutable_config");
    }

    #[test]
    fn explain_says_whether_the_source_ranges_let_the_client_in() {
        let (admin, _ctl) = lab();
        let v = explain(&admin, "frontend=t&src=127.0.0.1:5000").unwrap();
        assert_eq!(v["allowed"], true, "no list: every client");
        assert_eq!(v["source_range"], serde_json::Value::Null);
        assert_eq!(v["source_ranges"], serde_json::Value::Null);

        let ranges = lb_core::SourceRanges::parse(["127.0.0.0/8", "127.0.1.0/24"]).unwrap();
        let inside = explain_source(Some(&ranges), "127.0.1.7".parse().unwrap());
        assert!(inside.allowed);
        assert_eq!(
            inside.prefix.as_deref(),
            Some("127.0.1.0/24"),
            "the most specific"
        );
        let outside = explain_source(Some(&ranges), "10.0.0.1".parse().unwrap());
        assert!(!outside.allowed);
        assert_eq!(outside.prefix, None);
        assert_eq!(
            outside.ranges,
            Some(vec!["127.0.0.0/8".to_owned(), "127.0.1.0/24".to_owned()])
        );
    }

    #[test]
    fn explain_refuses_a_bad_cid_and_a_cid_on_a_tcp_frontend() {
        let (admin, _ctl) = lab();
        for bad in ["zz", "070", "", &"00".repeat(21)] {
            let q = format!("frontend=q&src=127.0.0.1:5000&cid={bad}");
            let e = explain(&admin, &q).unwrap_err();
            assert!(e.contains("bad `cid`"), "{bad}: {e}");
        }
        let e = explain(
            &admin,
            &format!("frontend=t&src=127.0.0.1:5000&cid={CID_OF_B}"),
        )
        .unwrap_err();
        assert!(e.contains("quic frontends"), "{e}");
        let v = explain(&admin, "frontend=t&src=127.0.0.1:5000").unwrap();
        assert_eq!(
            (v["protocol"].as_str(), v["flow"]["proto"].as_str()),
            (Some("tcp"), Some("tcp"))
        );
    }
}
