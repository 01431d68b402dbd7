//! Prometheus metrics. Label handles are resolved when a backend or frontend is
//! set up (off the hot path), so the data plane only touches atomics.
//!
//! Direction names follow the balancer's point of view: `received` bytes came
//! from the backend, `sent` bytes went to it.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

pub struct Metrics {
    pub registry: Registry,
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
    frontend_connections: IntCounterVec,
    frontend_active: IntGaugeVec,
    frontend_rejected: IntCounterVec,
    frontend_no_backend: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub flow_log_lines: IntCounter,
    pub flow_log_dropped: IntCounter,
    table_generation: IntGaugeVec,
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
    pub no_backend: IntCounter,
    pub table_generation: IntGauge,
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

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            let _ = registry.register(Box::new(pc));
        }
        let r = &registry;
        let backend_connect_duration = HistogramVec::new(
            HistogramOpts::new(
                "lb_backend_connect_duration_seconds",
                "Time to establish a TCP connection to the backend.",
            )
            .buckets(vec![
                0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0, 2.5, 5.0,
            ]),
            FB,
        )
        .expect("valid histogram");
        registry
            .register(Box::new(backend_connect_duration.clone()))
            .expect("unique metric name");
        let flow_log_lines = IntCounter::new(
            "lb_flow_log_lines_total",
            "Flow log lines queued for writing.",
        )
        .expect("valid metric");
        let flow_log_dropped = IntCounter::new(
            "lb_flow_log_dropped_total",
            "Flow log lines dropped because the writer fell behind (the data plane never waits for it).",
        )
        .expect("valid metric");
        registry
            .register(Box::new(flow_log_lines.clone()))
            .expect("unique metric name");
        registry
            .register(Box::new(flow_log_dropped.clone()))
            .expect("unique metric name");
        let config_reloads = counter(
            r,
            "lb_config_reloads_total",
            "Config reloads, by result (success, failure).",
            &["result"],
        );
        // Both series exist from the start, so increase() sees the first reload and dashboards show 0, not "no data".
        for result in ["success", "failure"] {
            config_reloads.with_label_values(&[result]);
        }
        Metrics {
            flow_log_lines,
            flow_log_dropped,
            backend_connections: counter(r, "lb_backend_connections_total", "Connections established to the backend.", FB),
            backend_active: gauge(r, "lb_backend_active_connections", "Proxied connections currently open to the backend.", FB),
            backend_received: counter(r, "lb_backend_received_bytes_total", "Bytes received from the backend.", FB),
            backend_sent: counter(r, "lb_backend_sent_bytes_total", "Bytes sent to the backend.", FB),
            backend_connect_errors: counter(
                r,
                "lb_backend_connect_errors_total",
                "Failed connects to the backend, by reason (refused, timeout, other).",
                &["frontend", "backend", "reason"],
            ),
            backend_connect_duration,
            backend_up: gauge(r, "lb_backend_up", "1 when the backend is healthy, 0 when it is down.", FB),
            backend_transitions: counter(r, "lb_backend_health_transitions_total", "Health state changes of the backend.", FB),
            backend_weight: gauge(r, "lb_backend_weight", "Configured weight of the backend (0 = draining).", FB),
            backend_table_slots: gauge(r, "lb_backend_table_slots", "Maglev table slots the backend owns in the current snapshot.", FB),
            backend_idle_timeouts: counter(r, "lb_backend_idle_timeouts_total", "Connections closed by the idle timeout.", FB),
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
            config_reloads,
            table_generation: gauge(r, "lb_table_generation", "Generation of the frontend's current routing snapshot.", &["frontend"]),
            registry,
        }
    }

    pub fn backend(&self, frontend: &str, backend: &str) -> BackendHandles {
        let l = &[frontend, backend];
        let err = |reason| {
            self.backend_connect_errors
                .with_label_values(&[frontend, backend, reason])
        };
        BackendHandles {
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
        }
    }

    /// Drops a removed backend's series so dashboards don't show ghosts.
    pub fn forget_backend(&self, frontend: &str, backend: &str) {
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
            no_backend: self.frontend_no_backend.with_label_values(&[frontend]),
            table_generation: self.table_generation.with_label_values(&[frontend]),
        }
    }

    pub fn encode(&self) -> String {
        use prometheus::Encoder;
        let mut buf = Vec::with_capacity(16 * 1024);
        let encoder = prometheus::TextEncoder::new();
        if encoder.encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
