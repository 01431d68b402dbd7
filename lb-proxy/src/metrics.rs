//! Prometheus metrics. Label handles are resolved when a backend or frontend is
//! set up (off the hot path), so the data plane only touches atomics.
//!
//! The per-backend families (fifteen of them, 100 backends make ~3500 lines) are
//! written straight from the handles in the exposition format of the
//! prometheus crate's `TextEncoder`: going through `Registry::gather()` builds a
//! proto per series with cloned label strings, sorts them and formats each value
//! through a fresh `String`, which made a 100-backend scrape cost about ten times
//! the CPU (the README's Metrics section quotes both, from
//! `cargo bench -p lb-proxy --bench scrape`).
//! The same metric vectors stay registered in a registry of their own, and a
//! test holds the direct writer byte-for-byte equal to the crate's encoder over it.
//! Everything else (frontends, reloads, process metrics) goes through the crate.
//!
//! Direction names follow the balancer's point of view: `received` bytes came
//! from the backend, `sent` bytes went to it.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use parking_lot::Mutex;
use prometheus::core::Metric as _;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

pub struct Metrics {
    /// Frontend, process and control-plane families, encoded by the prometheus crate.
    pub registry: Registry,
    /// The per-backend families. Never gathered on a scrape (see the module docs);
    /// it keeps the series alive and is the reference the direct writer is tested against.
    pub backend_registry: Registry,
    /// Live backend series in exposition order (label values compared in
    /// label-name order: backend, then frontend), with their label text prebuilt.
    backend_series: Mutex<BTreeMap<(String, String), BackendSeries>>,
    backend_connections: IntCounterVec,
    backend_active: IntGaugeVec,
    backend_received: IntCounterVec,
    backend_sent: IntCounterVec,
    backend_connect_errors: IntCounterVec,
    backend_connect_duration: HistogramVec,
    backend_up: IntGaugeVec,
    backend_transitions: IntCounterVec,
    backend_weight: IntGaugeVec,
    backend_table_slots: IntGaugeVec,
    backend_idle_timeouts: IntCounterVec,
    backend_sent_datagrams: IntCounterVec,
    backend_received_datagrams: IntCounterVec,
    backend_udp_flows: IntCounterVec,
    backend_active_udp_flows: IntGaugeVec,
    frontend_connections: IntCounterVec,
    frontend_active: IntGaugeVec,
    frontend_rejected: IntCounterVec,
    frontend_no_backend: IntCounterVec,
    frontend_spliced: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub flow_log_lines: IntCounter,
    pub flow_log_dropped: IntCounter,
    table_generation: IntGaugeVec,
    udp: UdpFamilies,
    zones: ZoneFamilies,
    pub readiness: ReadinessGauges,
}

/// The availability-zone families: zones are few, so a pair of zones per
/// series stays a small number of series.
struct ZoneFamilies {
    cross_zone_connections: IntCounterVec,
    cross_zone_delay: HistogramVec,
    zone_down: IntGaugeVec,
}

/// How long the delay line held data on a cross-zone hop: around half a
/// `cross_zone_rtt`, which defaults to 2 ms and is at most 10 s.
const ZONE_DELAY_BUCKETS: [f64; 12] = [
    0.000_1, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0, 5.0,
];

impl ZoneFamilies {
    fn new(r: &Registry) -> Self {
        let cross_zone_delay = HistogramVec::new(
            HistogramOpts::new(
                "lb_cross_zone_delay_seconds",
                "Time the delay line held a flow's data on a cross-zone node-to-pod hop, per hold (each direction is held half the frontend's cross_zone_rtt).",
            )
            .buckets(ZONE_DELAY_BUCKETS.to_vec()),
            &["frontend"],
        )
        .expect("valid metric definition");
        r.register(Box::new(cross_zone_delay.clone()))
            .expect("unique metric name");
        ZoneFamilies {
            cross_zone_connections: counter(
                r,
                "lb_cross_zone_connections_total",
                "Flows (TCP connections, UDP flows) whose node sent them to a pod in another zone, by the node's zone and the pod's.",
                &["frontend", "from_zone", "to_zone"],
            ),
            cross_zone_delay,
            zone_down: gauge(
                r,
                "lb_zone_down",
                "1 while the zone is down (by config or admin): its nodes take no new flows and flows through it were cut.",
                &["zone"],
            ),
        }
    }
}

/// `lb_ready` and `lb_config_fingerprint`, set by the admin endpoint from
/// the same state `/ready` and `/backends` answer from.
pub struct ReadinessGauges {
    ready: IntGauge,
    fingerprint: IntGaugeVec,
    /// The label value of the one live `lb_config_fingerprint` series.
    shown: Mutex<String>,
}

impl ReadinessGauges {
    fn new(r: &Registry) -> Self {
        let ready = IntGauge::new("lb_ready", "1 while GET /ready answers 200: every frontend has a healthy backend and the process is not stopping.").expect("valid metric definition");
        r.register(Box::new(ready.clone()))
            .expect("unique metric name");
        ReadinessGauges {
            ready,
            fingerprint: gauge(r, "lb_config_fingerprint", "Always 1; the label is the config fingerprint of all frontends, as /backends shows it.", &["fingerprint"]),
            shown: Mutex::new(String::new()),
        }
    }

    /// Sets both gauges; a new fingerprint replaces the old series. The
    /// fingerprint is computed under the lock, so of two racing updates the
    /// later computation is the one shown.
    pub fn set(&self, ready: bool, fingerprint: impl FnOnce() -> String) {
        self.ready.set(i64::from(ready));
        let mut shown = self.shown.lock();
        let fingerprint = fingerprint();
        if *shown != fingerprint {
            let _ = self.fingerprint.remove_label_values(&[shown.as_str()]);
            self.fingerprint.with_label_values(&[&fingerprint]).set(1);
            *shown = fingerprint;
        }
    }
}

/// The per-frontend UDP and QUIC families (label values pre-created per
/// frontend of that protocol, so dashboards show 0 rather than no data).
struct UdpFamilies {
    received_datagrams: IntCounterVec,
    flows_ended: IntCounterVec,
    flows_moved: IntCounterVec,
    dropped: IntCounterVec,
    quic_routed: IntCounterVec,
    quic_unroutable: IntCounterVec,
}

impl UdpFamilies {
    fn new(r: &Registry) -> Self {
        UdpFamilies {
            received_datagrams: counter(
                r,
                "lb_frontend_received_datagrams_total",
                "UDP datagrams received from clients by a UDP or QUIC frontend.",
                &["frontend"],
            ),
            flows_ended: counter(
                r,
                "lb_udp_flows_ended_total",
                "UDP flows ended, by reason (expired, evicted, no_healthy_backend, closed).",
                &["frontend", "reason"],
            ),
            flows_moved: counter(
                r,
                "lb_udp_flows_moved_total",
                "UDP flows moved to another backend (theirs went down, or a QUIC connection ID named another), counted once the upstream to it is open; a move that cannot open one ends the flow (counted in lb_udp_flows_ended_total{reason=\"closed\"}) and is not counted here.",
                &["frontend"],
            ),
            dropped: counter(
                r,
                "lb_udp_dropped_datagrams_total",
                "Datagrams dropped, by reason (no_backend, not_quic, upstream_error, send_error, source_range: a new flow's client outside source_ranges, delay_line: a cross-zone datagram over the delay line's bound, or whose flow ended while it was held).",
                &["frontend", "reason"],
            ),
            quic_routed: counter(
                r,
                "lb_quic_routed_total",
                "QUIC datagrams forwarded, by the step that chose the backend (cid, flow, hash).",
                &["frontend", "by"],
            ),
            quic_unroutable: counter(
                r,
                "lb_quic_unroutable_total",
                "QUIC datagrams whose connection ID could not route them, by reason; they fall back to the flow table and the hash.",
                &["frontend", "reason"],
            ),
        }
    }
}

/// Why a connect to a backend failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectErrorReason {
    Refused,
    Timeout,
    Other,
}

impl ConnectErrorReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            ConnectErrorReason::Refused => "refused",
            ConnectErrorReason::Timeout => "timeout",
            ConnectErrorReason::Other => "other",
        }
    }
}

/// One backend's resolved metric handles.
#[derive(Clone)]
pub struct BackendHandles {
    pub connections: IntCounter,
    pub active: IntGauge,
    pub received_bytes: IntCounter,
    pub sent_bytes: IntCounter,
    connect_refused: IntCounter,
    connect_timeout: IntCounter,
    connect_other: IntCounter,
    pub connect_duration: Histogram,
    pub up: IntGauge,
    pub health_transitions: IntCounter,
    pub weight: IntGauge,
    pub table_slots: IntGauge,
    pub idle_timeouts: IntCounter,
    /// Datagrams sent to the backend (UDP; bytes go to `sent_bytes`).
    pub sent_datagrams: IntCounter,
    /// Datagrams received from the backend.
    pub received_datagrams: IntCounter,
    /// UDP flows created on the backend (moves in are not creations).
    pub udp_flows: IntCounter,
    pub active_udp_flows: IntGauge,
}

impl BackendHandles {
    pub fn connect_error(&self, reason: ConnectErrorReason) -> &IntCounter {
        match reason {
            ConnectErrorReason::Refused => &self.connect_refused,
            ConnectErrorReason::Timeout => &self.connect_timeout,
            ConnectErrorReason::Other => &self.connect_other,
        }
    }
}

/// One frontend's resolved metric handles.
pub struct FrontendHandles {
    pub connections: IntCounter,
    pub active: IntGauge,
    pub rejected_max_connections: IntCounter,
    /// Shed because this machine ran out of fds, memory or local ports.
    pub rejected_local_resources: IntCounter,
    /// Reset at accept: the client is outside the frontend's `source_ranges`.
    pub rejected_source_range: IntCounter,
    pub no_backend: IntCounter,
    /// Bytes moved by splice(2), both directions, as they are passed on.
    pub spliced_bytes: IntCounter,
    pub table_generation: IntGauge,
    /// `lb_cross_zone_delay_seconds`: observed by the delay line per hold.
    pub cross_zone_delay: Histogram,
    /// UDP and QUIC frontends only (see [`Metrics::udp_frontend`]).
    pub udp: Option<UdpFrontendHandles>,
}

/// Why the UDP data plane dropped a datagram (`lb_udp_dropped_datagrams_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UdpDrop {
    /// No backend took it: none healthy, no endpoint, or a new flow while draining.
    NoBackend,
    /// A QUIC frontend got a datagram quinn-proto cannot parse.
    NotQuic,
    /// Opening or sending on the flow's upstream socket failed.
    UpstreamError,
    /// Sending a reply to the client from the frontend socket failed.
    SendError,
    /// A new flow's client is outside the frontend's `source_ranges`.
    SourceRange,
    /// A cross-zone datagram the delay line could not hold (its bound was
    /// reached) or deliver (its flow ended while it was held).
    DelayLine,
}

impl UdpDrop {
    pub const ALL: [UdpDrop; 6] = [
        UdpDrop::NoBackend,
        UdpDrop::NotQuic,
        UdpDrop::UpstreamError,
        UdpDrop::SendError,
        UdpDrop::SourceRange,
        UdpDrop::DelayLine,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            UdpDrop::NoBackend => "no_backend",
            UdpDrop::NotQuic => "not_quic",
            UdpDrop::UpstreamError => "upstream_error",
            UdpDrop::SendError => "send_error",
            UdpDrop::SourceRange => "source_range",
            UdpDrop::DelayLine => "delay_line",
        }
    }
}

/// The step of the QUIC routing order that chose a datagram's backend
/// (`lb_quic_routed_total{by}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoutedBy {
    /// A routable connection ID of a healthy backend.
    Cid,
    /// The 4-tuple flow table.
    Flow,
    /// The hash (a new flow).
    Hash,
}

impl RoutedBy {
    pub const ALL: [RoutedBy; 3] = [RoutedBy::Cid, RoutedBy::Flow, RoutedBy::Hash];

    pub const fn as_str(self) -> &'static str {
        match self {
            RoutedBy::Cid => "cid",
            RoutedBy::Flow => "flow",
            RoutedBy::Hash => "hash",
        }
    }
}

/// The label of a UDP flow's end (`lb_udp_flows_ended_total{reason}`), also
/// the outcome its flow log record carries.
pub const fn flow_end_label(end: lb_core::FlowEnd) -> &'static str {
    match end {
        lb_core::FlowEnd::Expired => "expired",
        lb_core::FlowEnd::Evicted => "evicted",
        lb_core::FlowEnd::NoHealthyBackend => "no_healthy_backend",
        lb_core::FlowEnd::Closed => "closed",
    }
}

const FLOW_ENDS: [lb_core::FlowEnd; 4] = [
    lb_core::FlowEnd::Expired,
    lb_core::FlowEnd::Evicted,
    lb_core::FlowEnd::NoHealthyBackend,
    lb_core::FlowEnd::Closed,
];

/// A UDP or QUIC frontend's resolved handles: every label value exists from
/// the start, and the data plane indexes them without a lookup.
#[derive(Clone)]
pub struct UdpFrontendHandles {
    pub received_datagrams: IntCounter,
    ended: [IntCounter; 4],
    pub moved: IntCounter,
    dropped: [IntCounter; UdpDrop::ALL.len()],
    /// QUIC frontends only.
    pub quic: Option<QuicHandles>,
}

impl UdpFrontendHandles {
    pub fn ended(&self, end: lb_core::FlowEnd) -> &IntCounter {
        &self.ended[FLOW_ENDS.iter().position(|e| *e == end).unwrap_or(3)]
    }

    pub fn dropped(&self, why: UdpDrop) -> &IntCounter {
        &self.dropped[why as usize]
    }
}

/// A QUIC frontend's routing counters.
#[derive(Clone)]
pub struct QuicHandles {
    routed: [IntCounter; 3],
    unroutable: [IntCounter; 7],
}

impl QuicHandles {
    pub fn routed(&self, by: RoutedBy) -> &IntCounter {
        &self.routed[by as usize]
    }

    pub fn unroutable(&self, why: lb_core::Unroutable) -> &IntCounter {
        let i = lb_core::Unroutable::ALL
            .iter()
            .position(|u| *u == why)
            .unwrap_or(lb_core::Unroutable::ALL.len() - 1);
        &self.unroutable[i]
    }
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let v = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    registry
        .register(Box::new(v.clone()))
        .expect("unique metric name");
    v
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let v = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    registry
        .register(Box::new(v.clone()))
        .expect("unique metric name");
    v
}

const FB: &[&str] = &["frontend", "backend"];

fn backend_counter(registry: &Registry, name: &str) -> IntCounterVec {
    counter(registry, name, backend_help(name), FB)
}

fn backend_gauge(registry: &Registry, name: &str) -> IntGaugeVec {
    gauge(registry, name, backend_help(name), FB)
}

const CONNECT_DURATION_BUCKETS: [f64; 15] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0,
];

fn connect_duration_histogram(registry: &Registry) -> HistogramVec {
    let name = "lb_backend_connect_duration_seconds";
    let histogram = HistogramVec::new(
        HistogramOpts::new(name, backend_help(name)).buckets(CONNECT_DURATION_BUCKETS.to_vec()),
        FB,
    )
    .expect("valid histogram");
    registry
        .register(Box::new(histogram.clone()))
        .expect("unique metric name");
    histogram
}

/// Lines the flow log wrote, and lines it dropped.
fn flow_log_counters(registry: &Registry) -> (IntCounter, IntCounter) {
    let lines = IntCounter::new(
        "lb_flow_log_lines_total",
        "Flow log lines written to the destination.",
    )
    .expect("valid metric");
    let dropped = IntCounter::new(
        "lb_flow_log_dropped_total",
        "Flow log lines dropped: the queue was full (the data plane never waits for the writer), the writer had stopped, or writing failed.",
    )
    .expect("valid metric");
    for counter in [&lines, &dropped] {
        registry
            .register(Box::new(counter.clone()))
            .expect("unique metric name");
    }
    (lines, dropped)
}

/// The sockmap engine's gauges and counter: they belong to the process-wide engine
/// ([`crate::tcp::sockmap`]), so each registry shows the same two values.
fn register_sockmap_gauges(registry: &Registry) {
    use crate::tcp::sockmap;
    for gauge in [sockmap::available_gauge(), sockmap::flows_gauge()] {
        registry
            .register(Box::new(gauge.clone()))
            .expect("unique metric name");
    }
    registry
        .register(Box::new(sockmap::forwarded_counter().clone()))
        .expect("unique metric name");
    registry
        .register(Box::new(crate::tcp::ring::available_gauge().clone()))
        .expect("unique metric name");
}

fn config_reloads_counter(registry: &Registry) -> IntCounterVec {
    let reloads = counter(
        registry,
        "lb_config_reloads_total",
        "Config reloads, by result (success, failure).",
        &["result"],
    );
    // Both series exist from the start, so increase() sees the first reload and dashboards show 0, not "no data".
    for result in ["success", "failure"] {
        reloads.with_label_values(&[result]);
    }
    reloads
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let backend_registry = Registry::new();
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            let _ = registry.register(Box::new(pc));
        }
        let r = &registry;
        let b = &backend_registry;
        let backend_connect_duration = connect_duration_histogram(b);
        let (flow_log_lines, flow_log_dropped) = flow_log_counters(r);
        let config_reloads = config_reloads_counter(r);
        register_sockmap_gauges(r);
        Metrics {
            flow_log_lines,
            flow_log_dropped,
            backend_connections: backend_counter(b, "lb_backend_connections_total"),
            backend_active: backend_gauge(b, "lb_backend_active_connections"),
            backend_received: backend_counter(b, "lb_backend_received_bytes_total"),
            backend_sent: backend_counter(b, "lb_backend_sent_bytes_total"),
            backend_connect_errors: counter(
                b,
                "lb_backend_connect_errors_total",
                backend_help("lb_backend_connect_errors_total"),
                &["frontend", "backend", "reason"],
            ),
            backend_connect_duration,
            backend_up: backend_gauge(b, "lb_backend_up"),
            backend_transitions: backend_counter(b, "lb_backend_health_transitions_total"),
            backend_weight: backend_gauge(b, "lb_backend_weight"),
            backend_table_slots: backend_gauge(b, "lb_backend_table_slots"),
            backend_idle_timeouts: backend_counter(b, "lb_backend_idle_timeouts_total"),
            frontend_connections: counter(r, "lb_frontend_connections_total", "Client connections accepted by the frontend.", &["frontend"]),
            frontend_active: gauge(r, "lb_frontend_active_connections", "Client connections currently open on the frontend.", &["frontend"]),
            frontend_rejected: counter(
                r,
                "lb_frontend_rejected_connections_total",
                "Client connections closed without being proxied, by reason.",
                &["frontend", "reason"],
            ),
            frontend_no_backend: counter(
                r,
                "lb_frontend_no_backend_total",
                "Client connections reset because no backend could be reached or none was eligible.",
                &["frontend"],
            ),
            frontend_spliced: counter(
                r,
                "lb_frontend_spliced_bytes_total",
                "Bytes the frontend's TCP flows passed on by splice(2), socket to pipe to socket without a copy through userspace (both directions: the bulk runs of copy `auto`, on either engine, and copy `splice`); a share of what the backend byte counters count.",
                &["frontend"],
            ),
            config_reloads,
            table_generation: gauge(r, "lb_table_generation", "Generation of the frontend's current routing snapshot.", &["frontend"]),
            backend_sent_datagrams: backend_counter(b, "lb_backend_sent_datagrams_total"),
            backend_received_datagrams: backend_counter(b, "lb_backend_received_datagrams_total"),
            backend_udp_flows: backend_counter(b, "lb_backend_udp_flows_total"),
            backend_active_udp_flows: backend_gauge(b, "lb_backend_active_udp_flows"),
            udp: UdpFamilies::new(r),
            zones: ZoneFamilies::new(r),
            readiness: ReadinessGauges::new(r),
            registry,
            backend_registry,
            backend_series: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn backend(&self, frontend: &str, backend: &str) -> BackendHandles {
        let l = &[frontend, backend];
        let err = |reason| {
            self.backend_connect_errors
                .with_label_values(&[frontend, backend, reason])
        };
        let handles = BackendHandles {
            connections: self.backend_connections.with_label_values(l),
            active: self.backend_active.with_label_values(l),
            received_bytes: self.backend_received.with_label_values(l),
            sent_bytes: self.backend_sent.with_label_values(l),
            connect_refused: err(ConnectErrorReason::Refused.as_str()),
            connect_timeout: err(ConnectErrorReason::Timeout.as_str()),
            connect_other: err(ConnectErrorReason::Other.as_str()),
            connect_duration: self.backend_connect_duration.with_label_values(l),
            up: self.backend_up.with_label_values(l),
            health_transitions: self.backend_transitions.with_label_values(l),
            weight: self.backend_weight.with_label_values(l),
            table_slots: self.backend_table_slots.with_label_values(l),
            idle_timeouts: self.backend_idle_timeouts.with_label_values(l),
            sent_datagrams: self.backend_sent_datagrams.with_label_values(l),
            received_datagrams: self.backend_received_datagrams.with_label_values(l),
            udp_flows: self.backend_udp_flows.with_label_values(l),
            active_udp_flows: self.backend_active_udp_flows.with_label_values(l),
        };
        let mut labels = String::new();
        push_label(&mut labels, "backend", backend);
        labels.push(',');
        push_label(&mut labels, "frontend", frontend);
        self.backend_series.lock().insert(
            (backend.to_owned(), frontend.to_owned()),
            BackendSeries {
                labels,
                handles: handles.clone(),
            },
        );
        handles
    }

    /// Drops a removed backend's series so dashboards don't show ghosts.
    pub fn forget_backend(&self, frontend: &str, backend: &str) {
        self.backend_series
            .lock()
            .remove(&(backend.to_owned(), frontend.to_owned()));
        let l = &[frontend, backend];
        let _ = self.backend_connections.remove_label_values(l);
        let _ = self.backend_active.remove_label_values(l);
        let _ = self.backend_received.remove_label_values(l);
        let _ = self.backend_sent.remove_label_values(l);
        for reason in ["refused", "timeout", "other"] {
            let _ = self
                .backend_connect_errors
                .remove_label_values(&[frontend, backend, reason]);
        }
        let _ = self.backend_connect_duration.remove_label_values(l);
        let _ = self.backend_up.remove_label_values(l);
        let _ = self.backend_transitions.remove_label_values(l);
        let _ = self.backend_weight.remove_label_values(l);
        let _ = self.backend_table_slots.remove_label_values(l);
        let _ = self.backend_idle_timeouts.remove_label_values(l);
        let _ = self.backend_sent_datagrams.remove_label_values(l);
        let _ = self.backend_received_datagrams.remove_label_values(l);
        let _ = self.backend_udp_flows.remove_label_values(l);
        let _ = self.backend_active_udp_flows.remove_label_values(l);
    }

    pub fn frontend(&self, frontend: &str) -> FrontendHandles {
        FrontendHandles {
            connections: self.frontend_connections.with_label_values(&[frontend]),
            active: self.frontend_active.with_label_values(&[frontend]),
            rejected_max_connections: self
                .frontend_rejected
                .with_label_values(&[frontend, "max_connections"]),
            rejected_local_resources: self
                .frontend_rejected
                .with_label_values(&[frontend, "local_resources"]),
            rejected_source_range: self
                .frontend_rejected
                .with_label_values(&[frontend, "source_range"]),
            no_backend: self.frontend_no_backend.with_label_values(&[frontend]),
            spliced_bytes: self.frontend_spliced.with_label_values(&[frontend]),
            table_generation: self.table_generation.with_label_values(&[frontend]),
            cross_zone_delay: self.zones.cross_zone_delay.with_label_values(&[frontend]),
            udp: None,
        }
    }

    /// `lb_cross_zone_connections_total` for flows from a node in `from` to
    /// a pod in `to`; resolved when routing is built, not per flow.
    pub fn cross_zone_connections(&self, frontend: &str, from: &str, to: &str) -> IntCounter {
        self.zones
            .cross_zone_connections
            .with_label_values(&[frontend, from, to])
    }

    /// `lb_zone_down{zone}`.
    pub fn zone_down(&self, zone: &str) -> IntGauge {
        self.zones.zone_down.with_label_values(&[zone])
    }

    /// A UDP or QUIC frontend's handles, every label value created at 0
    /// (the QUIC families only when `quic`).
    pub fn udp_frontend(&self, frontend: &str, quic: bool) -> UdpFrontendHandles {
        let u = &self.udp;
        let with = |vec: &IntCounterVec, value: &str| vec.with_label_values(&[frontend, value]);
        UdpFrontendHandles {
            received_datagrams: u.received_datagrams.with_label_values(&[frontend]),
            ended: FLOW_ENDS.map(|e| with(&u.flows_ended, flow_end_label(e))),
            moved: u.flows_moved.with_label_values(&[frontend]),
            dropped: UdpDrop::ALL.map(|d| with(&u.dropped, d.as_str())),
            quic: quic.then(|| QuicHandles {
                routed: RoutedBy::ALL.map(|b| with(&u.quic_routed, b.as_str())),
                unroutable: lb_core::Unroutable::ALL.map(|r| with(&u.quic_unroutable, r.as_str())),
            }),
        }
    }

    /// The `/metrics` body. Backend families come first, as in a gather, because
    /// every other family's name sorts after `lb_backend_`.
    pub fn encode(&self) -> String {
        let mut out = {
            let series = self.backend_series.lock();
            // ~3 KB per backend (18 histogram lines and 17 others) plus ~10 KB
            // for the rest, so the body is written without regrowing.
            let mut out = String::with_capacity(16 * 1024 + series.len() * 4 * 1024);
            write_backend_families(&series, &mut out);
            out
        };
        if prometheus::TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut out)
            .is_err()
        {
            return String::new();
        }
        out
    }

    #[cfg(test)]
    fn encode_backend_families(&self, out: &mut String) {
        write_backend_families(&self.backend_series.lock(), out);
    }
}

fn write_backend_families(series: &BTreeMap<(String, String), BackendSeries>, out: &mut String) {
    if series.is_empty() {
        // A gather prunes families without series; so do we.
        return;
    }
    for family in BACKEND_FAMILIES {
        family_header(out, family.name, family.help, family.kind);
        match family.value {
            BackendValue::Int(read) => {
                for s in series.values() {
                    sample(out, family.name, "", &s.labels, "", read(&s.handles));
                }
            }
            BackendValue::ConnectErrors => {
                for s in series.values() {
                    // Sorted by the reason label's value, as a gather sorts them.
                    for (reason, label) in [
                        (ConnectErrorReason::Other, r#",reason="other""#),
                        (ConnectErrorReason::Refused, r#",reason="refused""#),
                        (ConnectErrorReason::Timeout, r#",reason="timeout""#),
                    ] {
                        let value = s.handles.connect_error(reason).get() as i64;
                        sample(out, family.name, "", &s.labels, label, value);
                    }
                }
            }
            BackendValue::ConnectDuration => {
                for s in series.values() {
                    connect_duration_samples(out, family.name, &s.labels, &s.handles);
                }
            }
        }
    }
}

struct BackendSeries {
    /// `backend="…",frontend="…"`, escaped, in label-name order.
    labels: String,
    handles: BackendHandles,
}

enum BackendValue {
    Int(fn(&BackendHandles) -> i64),
    ConnectErrors,
    ConnectDuration,
}

struct BackendFamily {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    value: BackendValue,
}

/// The per-backend families, sorted by name (a test checks the names, help
/// texts and types against the registered vectors).
const BACKEND_FAMILIES: &[BackendFamily] = &[
    BackendFamily {
        name: "lb_backend_active_connections",
        help: "Proxied connections currently open to the backend.",
        kind: "gauge",
        value: BackendValue::Int(|h| h.active.get()),
    },
    BackendFamily {
        name: "lb_backend_active_udp_flows",
        help: "UDP flows currently pinned to the backend.",
        kind: "gauge",
        value: BackendValue::Int(|h| h.active_udp_flows.get()),
    },
    BackendFamily {
        name: "lb_backend_connect_duration_seconds",
        help: "Time to establish a TCP connection to the backend.",
        kind: "histogram",
        value: BackendValue::ConnectDuration,
    },
    BackendFamily {
        name: "lb_backend_connect_errors_total",
        help: "Failed connects to the backend, by reason (refused, timeout, other).",
        kind: "counter",
        value: BackendValue::ConnectErrors,
    },
    BackendFamily {
        name: "lb_backend_connections_total",
        help: "Connections established to the backend.",
        kind: "counter",
        value: BackendValue::Int(|h| h.connections.get() as i64),
    },
    BackendFamily {
        name: "lb_backend_health_transitions_total",
        help: "Health state changes of the backend.",
        kind: "counter",
        value: BackendValue::Int(|h| h.health_transitions.get() as i64),
    },
    BackendFamily {
        name: "lb_backend_idle_timeouts_total",
        help: "Connections closed by the idle timeout.",
        kind: "counter",
        value: BackendValue::Int(|h| h.idle_timeouts.get() as i64),
    },
    BackendFamily {
        name: "lb_backend_received_bytes_total",
        help: "Bytes received from the backend.",
        kind: "counter",
        value: BackendValue::Int(|h| h.received_bytes.get() as i64),
    },
    BackendFamily {
        name: "lb_backend_received_datagrams_total",
        help: "UDP datagrams received from the backend.",
        kind: "counter",
        value: BackendValue::Int(|h| h.received_datagrams.get() as i64),
    },
    BackendFamily {
        name: "lb_backend_sent_bytes_total",
        help: "Bytes sent to the backend.",
        kind: "counter",
        value: BackendValue::Int(|h| h.sent_bytes.get() as i64),
    },
    BackendFamily {
        name: "lb_backend_sent_datagrams_total",
        help: "UDP datagrams sent to the backend.",
        kind: "counter",
        value: BackendValue::Int(|h| h.sent_datagrams.get() as i64),
    },
    BackendFamily {
        name: "lb_backend_table_slots",
        help: "Maglev table slots the backend owns in the current snapshot.",
        kind: "gauge",
        value: BackendValue::Int(|h| h.table_slots.get()),
    },
    BackendFamily {
        name: "lb_backend_udp_flows_total",
        help: "UDP flows created on the backend (flows moved to it are counted in lb_udp_flows_moved_total).",
        kind: "counter",
        value: BackendValue::Int(|h| h.udp_flows.get() as i64),
    },
    BackendFamily {
        name: "lb_backend_up",
        help: "1 when the backend is healthy, 0 when it is down.",
        kind: "gauge",
        value: BackendValue::Int(|h| h.up.get()),
    },
    BackendFamily {
        name: "lb_backend_weight",
        help: "Configured weight of the backend (0 = draining).",
        kind: "gauge",
        value: BackendValue::Int(|h| h.weight.get()),
    },
];

/// Help text of a per-backend family, from the one table both paths use.
fn backend_help(name: &str) -> &'static str {
    BACKEND_FAMILIES
        .iter()
        .find(|f| f.name == name)
        .map(|f| f.help)
        .expect("every backend family is in BACKEND_FAMILIES")
}

/// `le` labels as the crate's encoder prints them (`f64` Display).
const CONNECT_DURATION_LE: [&str; 15] = [
    r#",le="0.0001""#,
    r#",le="0.00025""#,
    r#",le="0.0005""#,
    r#",le="0.001""#,
    r#",le="0.0025""#,
    r#",le="0.005""#,
    r#",le="0.01""#,
    r#",le="0.025""#,
    r#",le="0.05""#,
    r#",le="0.1""#,
    r#",le="0.25""#,
    r#",le="0.5""#,
    r#",le="1""#,
    r#",le="2.5""#,
    r#",le="5""#,
];

fn connect_duration_samples(out: &mut String, name: &str, labels: &str, h: &BackendHandles) {
    // One consistent read of buckets, sum and count (the crate swaps hot/cold
    // halves for this); one small proto per backend is all it allocates.
    let proto = h.connect_duration.metric();
    let hist = proto.get_histogram();
    let buckets = hist.get_bucket();
    for (bucket, le) in buckets.iter().zip(CONNECT_DURATION_LE) {
        sample(
            out,
            name,
            "_bucket",
            labels,
            le,
            bucket.cumulative_count() as i64,
        );
    }
    let count = hist.get_sample_count();
    sample(out, name, "_bucket", labels, r#",le="+Inf""#, count as i64);
    out.push_str(name);
    out.push_str("_sum{");
    out.push_str(labels);
    let _ = writeln!(out, "}} {}", hist.get_sample_sum());
    sample(out, name, "_count", labels, "", count as i64);
}

fn family_header(out: &mut String, name: &str, help: &str, kind: &str) {
    out.push_str("# HELP ");
    out.push_str(name);
    out.push(' ');
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push_str("\n# TYPE ");
    out.push_str(name);
    out.push(' ');
    out.push_str(kind);
    out.push('\n');
}

/// One sample line; `extra` is a pre-rendered `,label="value"` or empty. Values
/// are integers, printed as the crate prints them after its conversion to
/// `f64` (the same digits below 2^53, where the conversion is exact).
fn sample(out: &mut String, name: &str, suffix: &str, labels: &str, extra: &str, value: i64) {
    out.push_str(name);
    out.push_str(suffix);
    out.push('{');
    out.push_str(labels);
    out.push_str(extra);
    out.push_str("} ");
    const EXACT: i64 = 1 << 53;
    if (-EXACT..=EXACT).contains(&value) {
        push_integer(out, value);
    } else {
        let _ = write!(out, "{}", value as f64);
    }
    out.push('\n');
}

/// Decimal digits without going through `fmt` (a scrape writes ~3000 of them).
fn push_integer(out: &mut String, value: i64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = value.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if value < 0 {
        out.push('-');
    }
    // Only ASCII digits were written.
    out.push_str(std::str::from_utf8(&digits[at..]).unwrap_or("0"));
}

/// `name="value"` with the text format's label escaping.
fn push_label(out: &mut String, name: &str, value: &str) {
    out.push_str(name);
    out.push_str("=\"");
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out.push('"');
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crate_encoding(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&registry.gather(), &mut out)
            .expect("encodable");
        out
    }

    fn direct_encoding(metrics: &Metrics) -> String {
        let mut out = String::new();
        metrics.encode_backend_families(&mut out);
        out
    }

    /// Names that sort differently as (frontend, backend) and (backend, frontend),
    /// and label values the text format must escape.
    fn populated() -> (Metrics, Vec<BackendHandles>) {
        let metrics = Metrics::new();
        let names = [
            ("web", "node-b"),
            ("api", "node-c"),
            ("web", "node-a"),
            ("api", "node-a"),
            ("z\"q\\x\ny", "node-\"quoted\""),
        ];
        let handles: Vec<_> = names
            .iter()
            .enumerate()
            .map(|(i, (fe, be))| {
                let h = metrics.backend(fe, be);
                let i = i as u64;
                h.connections.inc_by(1000 + i);
                h.active.set(7 - 3 * i as i64);
                h.received_bytes.inc_by((1 << 60) + i);
                h.sent_bytes.inc_by(9_007_199_254_740_993 * i);
                h.connect_error(ConnectErrorReason::Refused).inc_by(i);
                h.connect_error(ConnectErrorReason::Timeout).inc_by(2 * i);
                for k in 0..(20 * i) {
                    h.connect_duration.observe(0.000_037 * k as f64);
                }
                h.connect_duration.observe(7.5);
                h.up.set((i % 2) as i64);
                h.health_transitions.inc_by(i);
                h.weight.set(i as i64);
                h.table_slots.set(65537 / (i as i64 + 1));
                h.idle_timeouts.inc_by(3 * i);
                h.sent_datagrams.inc_by(11 * i);
                h.received_datagrams.inc_by(13 * i);
                h.udp_flows.inc_by(5 * i);
                h.active_udp_flows.set(2 * i as i64);
                h
            })
            .collect();
        (metrics, handles)
    }

    #[test]
    fn direct_backend_families_equal_the_crate_encoder() {
        let (metrics, _handles) = populated();
        let direct = direct_encoding(&metrics);
        assert_eq!(direct, crate_encoding(&metrics.backend_registry));
        assert_eq!(
            direct.matches("# TYPE ").count(),
            BACKEND_FAMILIES.len(),
            "every backend family is written"
        );
    }

    #[test]
    fn forgotten_backends_leave_both_encodings_alike() {
        let (metrics, _handles) = populated();
        metrics.forget_backend("web", "node-a");
        let direct = direct_encoding(&metrics);
        assert!(!direct.contains(r#"backend="node-a",frontend="web""#));
        assert!(direct.contains(r#"backend="node-a",frontend="api""#));
        assert_eq!(direct, crate_encoding(&metrics.backend_registry));
        for (fe, be) in [
            ("web", "node-b"),
            ("api", "node-c"),
            ("api", "node-a"),
            ("z\"q\\x\ny", "node-\"quoted\""),
        ] {
            metrics.forget_backend(fe, be);
        }
        assert_eq!(direct_encoding(&metrics), "");
        assert_eq!(crate_encoding(&metrics.backend_registry), "");
    }

    #[test]
    fn scrape_body_holds_backend_and_process_families_in_name_order() {
        let (metrics, _handles) = populated();
        metrics.frontend("web").connections.inc();
        let body = metrics.encode();
        let names: Vec<&str> = body
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap_or(""))
            .collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(
            names, sorted,
            "families in name order, as one gather writes them"
        );
        assert!(names.contains(&"lb_backend_connect_duration_seconds"));
        assert!(names.contains(&"lb_frontend_connections_total"));
    }
}
