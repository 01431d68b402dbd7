//! What `lb-bench compare` measures and produces: the front ends, one
//! [`Sample`] per measurement, the medians table ([`Row`]) and the whole
//! [`CompareResult`]. The renderer and the chart read these types; neither
//! depends on how they were measured.

/// The front ends, in the order they are measured.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Frontend {
    Direct,
    /// lb-proxy on the tokio engine (`engine = "tokio"`, `copy = "auto"`),
    /// as are the copy variants after it; the io_uring engine, the default
    /// where io_uring is permitted, has columns of its own.
    LbProxy,
    LbProxyUserspace,
    LbProxySplice,
    LbProxySockmap,
    /// lb-proxy (`copy = "auto"`) with `half_close = false`: the first FIN
    /// ends the flow, as nginx stream's default.
    LbProxyNoHalfClose,
    /// lb-proxy with `engine = "io-uring"`: each worker's flows on one ring.
    LbProxyIoUring,
    /// The io_uring engine with `half_close = false`: the like of nginx
    /// stream's default.
    LbProxyIoUringNoHalfClose,
    Haproxy,
    NginxStream,
    /// nginx stream with `proxy_half_close on`: half-close as lb-proxy's and
    /// HAProxy's defaults.
    NginxHalfClose,
}

impl Frontend {
    /// What `compare` measures unless `--frontends` says otherwise: lb-proxy
    /// on each TCP engine (the io_uring one is the default where the kernel
    /// permits it) and in each copy mode, against HAProxy and nginx stream.
    pub const DEFAULT: [Frontend; 8] = [
        Frontend::Direct,
        Frontend::LbProxy,
        Frontend::LbProxyIoUring,
        Frontend::LbProxyUserspace,
        Frontend::LbProxySplice,
        Frontend::LbProxySockmap,
        Frontend::Haproxy,
        Frontend::NginxStream,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Frontend::Direct => "direct",
            Frontend::LbProxy => "lb-proxy (tokio)",
            Frontend::LbProxyUserspace => "lb-proxy (userspace)",
            Frontend::LbProxySplice => "lb-proxy (splice)",
            Frontend::LbProxySockmap => "lb-proxy (sockmap)",
            Frontend::LbProxyNoHalfClose => "lb-proxy (tokio, no half-close)",
            Frontend::LbProxyIoUring => "lb-proxy (io_uring)",
            Frontend::LbProxyIoUringNoHalfClose => "lb-proxy (io_uring, no half-close)",
            Frontend::Haproxy => "haproxy",
            Frontend::NginxStream => "nginx stream",
            Frontend::NginxHalfClose => "nginx stream (half-close)",
        }
    }

    /// A label short enough for a chart axis.
    pub fn short_label(self) -> &'static str {
        match self {
            Frontend::Direct => "direct",
            Frontend::LbProxy => "lb-tokio",
            Frontend::LbProxyUserspace => "lb-user",
            Frontend::LbProxySplice => "lb-splice",
            Frontend::LbProxySockmap => "lb-sockmap",
            Frontend::LbProxyNoHalfClose => "lb-tokio-nohc",
            Frontend::LbProxyIoUring => "lb-uring",
            Frontend::LbProxyIoUringNoHalfClose => "lb-uring-nohc",
            Frontend::Haproxy => "haproxy",
            Frontend::NginxStream => "nginx",
            Frontend::NginxHalfClose => "nginx-hc",
        }
    }

    pub fn parse(s: &str) -> Option<Frontend> {
        Some(match s {
            "direct" => Frontend::Direct,
            "lb-proxy" => Frontend::LbProxy,
            "lb-proxy-userspace" | "userspace" => Frontend::LbProxyUserspace,
            "lb-proxy-splice" | "splice" => Frontend::LbProxySplice,
            "lb-proxy-sockmap" | "sockmap" => Frontend::LbProxySockmap,
            "lb-proxy-no-half-close" => Frontend::LbProxyNoHalfClose,
            "lb-proxy-io-uring" | "io-uring" => Frontend::LbProxyIoUring,
            "lb-proxy-io-uring-no-half-close" => Frontend::LbProxyIoUringNoHalfClose,
            "haproxy" => Frontend::Haproxy,
            "nginx" | "nginx-stream" => Frontend::NginxStream,
            "nginx-half-close" => Frontend::NginxHalfClose,
            _ => return None,
        })
    }

    /// The `copy` engine an lb-proxy front end is configured with (None: not lb-proxy).
    pub(crate) fn lb_copy(self) -> Option<&'static str> {
        match self {
            Frontend::LbProxy => Some("auto"),
            Frontend::LbProxyUserspace => Some("userspace"),
            Frontend::LbProxySplice => Some("splice"),
            Frontend::LbProxySockmap => Some("sockmap"),
            Frontend::LbProxyNoHalfClose
            | Frontend::LbProxyIoUring
            | Frontend::LbProxyIoUringNoHalfClose => Some("auto"),
            _ => None,
        }
    }

    /// The `engine` an lb-proxy front end is configured with, where it is not
    /// tokio (every other lb-proxy front end names tokio: `peers::lb_config`).
    pub(crate) fn lb_engine(self) -> Option<&'static str> {
        matches!(
            self,
            Frontend::LbProxyIoUring | Frontend::LbProxyIoUringNoHalfClose
        )
        .then_some("io-uring")
    }

    /// Whether this front end passes a FIN on and keeps the other way open
    /// (TCP half-close), where it can be configured either way.
    pub(crate) fn half_close(self) -> bool {
        !matches!(
            self,
            Frontend::LbProxyNoHalfClose
                | Frontend::LbProxyIoUringNoHalfClose
                | Frontend::NginxStream
        )
    }
}

/// The metrics a [`Sample`] can hold: keep-alive req/s, new connections/s,
/// bulk Gbit/s with 1 and 4 streams, RSS KiB per idle connection.
pub(crate) const KA: &str = "ka";
pub(crate) const NEW: &str = "new";
pub(crate) const BULK1: &str = "bulk1";
pub(crate) const BULK4: &str = "bulk4";
pub(crate) const IDLE: &str = "idle";
/// Every metric, so that one read back from compare.json can be matched.
const METRICS: [&str; 5] = [KA, NEW, BULK1, BULK4, IDLE];

/// A [`Sample`]'s metric: one of [`METRICS`]. Named, so that serde's derive
/// does not take the field for a `&str` borrowed from the input.
pub type Metric = &'static str;

/// A [`Sample`]'s metric read back (`lb-bench pool`): one of [`METRICS`].
fn known_metric<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Metric, D::Error> {
    let name = <String as serde::Deserialize>::deserialize(d)?;
    METRICS
        .into_iter()
        .find(|m| *m == name)
        .ok_or_else(|| serde::de::Error::custom(format!("unknown metric {name:?}")))
}

/// What a reader sees for a metric: the medians table's and the round-by-round table's label.
pub(crate) fn metric_label(metric: &str) -> &'static str {
    match metric {
        KA => "keep-alive req/s",
        NEW => "new connections/s",
        BULK1 => "bulk Gbit/s, 1 stream",
        BULK4 => "bulk Gbit/s, 4 streams",
        IDLE => "RSS KiB per idle connection",
        _ => "?",
    }
}

/// One measurement.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Sample {
    pub round: usize,
    pub frontend: Frontend,
    #[serde(deserialize_with = "known_metric")]
    pub metric: Metric,
    pub tool: String,
    pub value: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Proxy CPU µs per request (keep-alive) or per connection (new).
    pub cpu_us: Option<f64>,
    /// The whole machine's busy CPU µs per request or connection: every
    /// process (generator, backends, proxy) and kernel thread.
    pub machine_cpu_us: Option<f64>,
    pub errors: u64,
}

impl Sample {
    /// A measurement that is one figure: no latencies, no CPU, no errors.
    pub(crate) fn figure(
        round: usize,
        frontend: Frontend,
        metric: &'static str,
        tool: &str,
        value: f64,
    ) -> Sample {
        Sample {
            round,
            frontend,
            metric,
            tool: tool.to_owned(),
            value,
            p50_ms: None,
            p99_ms: None,
            cpu_us: None,
            machine_cpu_us: None,
            errors: 0,
        }
    }
}

/// A front end's state.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FrontendStatus {
    pub frontend: Frontend,
    pub label: &'static str,
    /// `ok`, `missing` or `failed`.
    pub status: &'static str,
    pub detail: String,
}

/// One row of the medians table: a value per front end (`None`: missing or failed).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    pub metric: String,
    pub tool: String,
    pub values: Vec<Option<f64>>,
}

/// Everything `compare` produced.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CompareResult {
    pub frontends: Vec<FrontendStatus>,
    pub tools: Vec<(String, String)>,
    pub backends: String,
    pub samples: Vec<Sample>,
    pub rows: Vec<Row>,
    pub accuracy: String,
    pub idle_connections: usize,
    pub commands: Vec<String>,
    pub markdown: String,
    pub markdown_path: std::path::PathBuf,
    pub chart_path: Option<std::path::PathBuf>,
    pub elapsed_secs: f64,
}

/// A number for a table cell: `-` for none, 3 significant-ish digits.
pub fn fmt_num(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(x) if !x.is_finite() => "-".into(),
        Some(x) if x.abs() >= 100.0 => format!("{x:.0}"),
        Some(x) if x.abs() >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
    }
}

#[cfg(test)]
impl CompareResult {
    /// A result with these front ends (and statuses) and rows, the rest empty: for tests of what renders it.
    pub(crate) fn for_test(frontends: &[(Frontend, &'static str)], rows: Vec<Row>) -> Self {
        CompareResult {
            frontends: frontends
                .iter()
                .map(|&(frontend, status)| FrontendStatus {
                    frontend,
                    label: frontend.label(),
                    status,
                    detail: String::new(),
                })
                .collect(),
            tools: Vec::new(),
            backends: String::new(),
            samples: Vec::new(),
            rows,
            accuracy: String::new(),
            idle_connections: 10,
            commands: Vec::new(),
            markdown: String::new(),
            markdown_path: Default::default(),
            chart_path: None,
            elapsed_secs: 0.0,
        }
    }
}
