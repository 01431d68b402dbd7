//! `lb-bench experiment zones`: the seed article's point 2, the cross-zone
//! bounce, on a three-zone lab (`config/aks-zones.toml`): the ALB in front
//! of node-1, node-2 and node-3 in zones 1, 2 and 3, the app's pods in one
//! zone (zone 2), then in two (zones 1 and 2), under `externalTrafficPolicy:
//! Cluster`, `Local`, and `Cluster` with `trafficDistribution:
//! PreferSameZone`.
//!
//! Each case runs hey-like load with a new connection per request (each
//! request is a flow the ALB places) and prints the share of flows that
//! crossed zones, and request latency p50 and p99; a cross-zone flow pays
//! `cross_zone_rtt` twice (the handshake to the pod, then the request). A
//! flow's path is measured, not assumed: the node it entered from lb-proxy's
//! `/explain`, the pod that answered from its `X-Node` header, each with the
//! zone the lab gave it; lb-proxy's own count of cross-zone connections
//! (`lb_cross_zone_connections_total`) must agree. A PASS/FAIL line per case compares the share with
//! what kube-proxy's rules give (see [`Case::expected_share`]); the latency
//! percentiles of every case go into a small SVG.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use plotters::prelude::*;

use super::outcome::{Outcome, Reporter};
use super::steps::http_spec;
use crate::compare::chart::chart_err;
use crate::error::{Error, Result};
use crate::lbproxy::{self, LbProxy};
use crate::load::{self, FlowRecord, LoadReport};
use crate::net;
use crate::procs;
use crate::serve::{InProcess, Kind, ServerSpec};
use crate::signals::WorkDir;

const FRONTEND: &str = "app";
/// The lab's nodes: name, address, zone.
const NODES: [(&str, Ipv4Addr, &str); 3] = [
    ("node-1", Ipv4Addr::new(127, 0, 1, 1), "1"),
    ("node-2", Ipv4Addr::new(127, 0, 1, 2), "2"),
    ("node-3", Ipv4Addr::new(127, 0, 1, 3), "3"),
];
/// The pods: name, address (port 0 until bound), index of their node in [`NODES`].
const PODS: [(&str, Ipv4Addr, usize); 2] = [
    ("pod-z2", Ipv4Addr::new(127, 0, 2, 2), 1),
    ("pod-z1", Ipv4Addr::new(127, 0, 2, 1), 0),
];
/// How far a measured share may be from the expected one: with the default
/// 300 flows, a share of 2/3 has a standard deviation of 0.027; this is
/// about 3.7 of them.
const SHARE_TOLERANCE: f64 = 0.1;
/// Reads one percentile out of a [`load::Latency`].
type PercentileOf = fn(&load::Latency) -> f64;
/// The percentiles the chart draws, and where they are in a [`load::Latency`].
const PERCENTILES: [(f64, PercentileOf); 7] = [
    (10.0, |l| l.p10_ms),
    (25.0, |l| l.p25_ms),
    (50.0, |l| l.p50_ms),
    (75.0, |l| l.p75_ms),
    (90.0, |l| l.p90_ms),
    (95.0, |l| l.p95_ms),
    (99.0, |l| l.p99_ms),
];

/// What `lb-bench experiment zones` runs.
#[derive(Clone, Debug)]
pub struct ZonesOptions {
    /// The lb-proxy binary (default: next to this executable).
    pub lb_proxy: Option<PathBuf>,
    /// Flows (requests, each on a new connection) per case.
    pub flows: u64,
    pub concurrency: usize,
    /// The lab's `cross_zone_rtt`.
    pub cross_zone_rtt: Duration,
    /// Where the latency chart goes; `None`: no chart.
    pub svg: Option<PathBuf>,
}

impl Default for ZonesOptions {
    fn default() -> Self {
        ZonesOptions {
            lb_proxy: None,
            flows: 300,
            concurrency: 10,
            cross_zone_rtt: Duration::from_millis(2),
            svg: Some(PathBuf::from("docs/bench/zones.svg")),
        }
    }
}

/// How the Service sends external traffic on from the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Policy {
    Cluster,
    Local,
    PreferSameZone,
}

impl Policy {
    const ALL: [Policy; 3] = [Policy::Cluster, Policy::Local, Policy::PreferSameZone];

    fn name(self) -> &'static str {
        match self {
            Policy::Cluster => "Cluster",
            Policy::Local => "Local",
            Policy::PreferSameZone => "PreferSameZone",
        }
    }

    /// The `[frontends.service]` keys.
    fn service_toml(self) -> &'static str {
        match self {
            Policy::Cluster => "external_traffic_policy = \"Cluster\"",
            Policy::Local => "external_traffic_policy = \"Local\"",
            Policy::PreferSameZone => {
                "external_traffic_policy = \"Cluster\"\ntraffic_distribution = \"PreferSameZone\""
            }
        }
    }
}

/// One run: the pods in the first `pod_zones` zones of [`PODS`], under `policy`.
#[derive(Clone, Copy, Debug)]
struct Case {
    pod_zones: usize,
    policy: Policy,
}

impl Case {
    fn label(self) -> String {
        let zones: Vec<&str> = PODS[..self.pod_zones]
            .iter()
            .map(|p| NODES[p.2].2)
            .collect();
        format!(
            "pods in zone{} {}, {}",
            if zones.len() > 1 { "s" } else { "" },
            zones.join("+"),
            self.policy.name()
        )
    }

    /// The share of flows that cross zones by kube-proxy's rules, with the
    /// ALB spreading flows evenly over the nodes it sends to: under `Local`
    /// only nodes with a pod take traffic, and use it; under `Cluster` a node
    /// picks any pod; under `PreferSameZone` a node picks a pod in its zone
    /// and falls back to all of them when its zone has none.
    fn expected_share(self) -> f64 {
        let pods: Vec<&str> = PODS[..self.pod_zones]
            .iter()
            .map(|p| NODES[p.2].2)
            .collect();
        let nodes: Vec<&str> = NODES
            .iter()
            .map(|n| n.2)
            .filter(|z| self.policy != Policy::Local || pods.contains(z))
            .collect();
        let crossing = |zone: &str| -> f64 {
            let other = pods.iter().filter(|p| **p != zone).count() as f64;
            match self.policy {
                Policy::Local => 0.0,
                Policy::PreferSameZone if pods.contains(&zone) => 0.0,
                Policy::Cluster | Policy::PreferSameZone => other / pods.len() as f64,
            }
        };
        nodes.iter().map(|z| crossing(z)).sum::<f64>() / nodes.len() as f64
    }

    /// The lab's config for this case on free ports: `config/aks-zones.toml`
    /// with the pods placed and the policy set.
    fn config(self, pods: &[SocketAddr], rtt: Duration) -> String {
        let mut config = format!(
            "# Generated by lb-bench experiment zones: config/aks-zones.toml on free ports.\n\
             workers = 2\ncross_zone_rtt = \"{}us\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
             [[frontends]]\nname = \"{FRONTEND}\"\nlisten = \"127.0.0.1:0\"\nclient_address = \"snat\"\n\n\
             [frontends.service]\n{}\n\n[frontends.health]\nkind = \"none\"\n",
            rtt.as_micros(),
            self.policy.service_toml()
        );
        for (i, (name, ip, zone)) in NODES.iter().enumerate() {
            let endpoints: Vec<String> = PODS[..self.pod_zones]
                .iter()
                .zip(pods)
                .filter(|(p, _)| p.2 == i)
                .map(|(_, addr)| format!("\"{addr}\""))
                .collect();
            let _ = write!(
                config,
                "\n[[frontends.nodes]]\nname = \"{name}\"\naddress = \"{ip}\"\nzone = \"{zone}\"\nendpoints = [{}]\n",
                endpoints.join(", ")
            );
        }
        config
    }
}

/// What one case measured.
struct Measured {
    case: Case,
    report: LoadReport,
    /// Flows whose node and pod are both known, and of those, the ones that crossed.
    placed: usize,
    crossed: usize,
    /// Flows per entering node.
    per_node: BTreeMap<String, usize>,
    /// The balancer's own count: `lb_cross_zone_connections_total`, all pairs.
    counted: Option<f64>,
}

impl Measured {
    fn share(&self) -> f64 {
        if self.placed == 0 {
            0.0
        } else {
            self.crossed as f64 / self.placed as f64
        }
    }
}

/// Runs every case, printing as it goes, and writes the chart; `Err` only
/// when the experiment cannot start.
pub fn run_zones(
    rt: &tokio::runtime::Runtime,
    opts: &ZonesOptions,
    out: &mut dyn Write,
) -> Result<Outcome> {
    let dir = WorkDir::new("lb-bench-zones.")?;
    let bin = procs::lb_proxy_bin(opts.lb_proxy.as_deref())?;
    let pods = start_pods()?;
    let mut r = Reporter::new(out, "zones experiment");
    r.say(&banner(opts));
    let mut all = Vec::new();
    for pod_zones in [1, 2] {
        for policy in Policy::ALL {
            let case = Case { pod_zones, policy };
            let m = run_case(rt, opts, &bin, dir.path(), &pods, case)?;
            report_case(&mut r, &m);
            all.push(m);
        }
    }
    r.say(&summary_table(&all));
    if let Some(svg) = &opts.svg {
        write_chart(&all, opts.cross_zone_rtt, svg)?;
        r.say(&format!("latency chart: {}\n", svg.display()));
    }
    Ok(r.conclude())
}

fn banner(opts: &ZonesOptions) -> String {
    format!(
        "lb-bench experiment zones: the cross-zone bounce (config/aks-zones.toml)\n  \
         ALB → node-1 (zone 1), node-2 (zone 2), node-3 (zone 3); cross_zone_rtt {:?}\n  \
         {} flows per case, one request each, {} at a time\n\n",
        opts.cross_zone_rtt, opts.flows, opts.concurrency
    )
}

/// The pods, HTTP servers answering with their name (`X-Node`), for all cases.
fn start_pods() -> Result<(InProcess, Vec<SocketAddr>)> {
    let specs: Vec<ServerSpec> = PODS
        .iter()
        .map(|(name, ip, _)| ServerSpec {
            kind: Kind::Http,
            name: (*name).into(),
            addr: SocketAddr::new(IpAddr::V4(*ip), 0),
        })
        .collect();
    let servers = InProcess::start(&specs)?;
    let addrs = PODS
        .iter()
        .map(|(name, _, _)| servers.addr(name).expect("every pod is bound"))
        .collect();
    Ok((servers, addrs))
}

/// Starts the case's balancer, runs the load, and places every flow.
fn run_case(
    rt: &tokio::runtime::Runtime,
    opts: &ZonesOptions,
    bin: &Path,
    dir: &Path,
    pods: &(InProcess, Vec<SocketAddr>),
    case: Case,
) -> Result<Measured> {
    let config = case.config(&pods.1[..case.pod_zones], opts.cross_zone_rtt);
    let name = format!("lb-proxy-zones-{}-{}", case.pod_zones, case.policy.name());
    let alb = LbProxy::run_config(bin, dir, &name, &config)?;
    let addr = alb.frontend(Some(FRONTEND))?;
    let flows = opts.flows.max(1);
    let spec = http_spec(addr, flows, opts.concurrency.max(1), false, flows as usize);
    let report = rt.block_on(load::run(spec))?;
    let mut m = Measured {
        case,
        placed: 0,
        crossed: 0,
        per_node: BTreeMap::new(),
        counted: alb
            .admin
            .and_then(|a| lbproxy::metrics(a).ok())
            .and_then(|m| {
                net::metric_sum(
                    &m,
                    "lb_cross_zone_connections_total",
                    &[("frontend", FRONTEND)],
                )
            }),
        report,
    };
    for f in &m.report.flows {
        let Some((node, crossed)) = place(alb.admin, f) else {
            continue;
        };
        *m.per_node.entry(node).or_default() += 1;
        m.placed += 1;
        m.crossed += usize::from(crossed);
    }
    Ok(m)
}

/// The node a flow entered (per `/explain`) and whether the pod that
/// answered is in another zone; `None` when either is unknown.
fn place(admin: Option<SocketAddr>, f: &FlowRecord) -> Option<(String, bool)> {
    let explained = lbproxy::explain(admin?, Some(FRONTEND), f.src).ok()?;
    let node = explained["hop"]["node"].as_str()?.to_owned();
    let node_zone = NODES.iter().find(|n| n.0 == node)?.2;
    let pod = f.node.as_deref()?;
    let pod_zone = NODES[PODS.iter().find(|p| p.0 == pod)?.2].2;
    Some((node, node_zone != pod_zone))
}

fn report_case(r: &mut Reporter, m: &Measured) {
    let l = &m.report.latency;
    let nodes: Vec<String> = m.per_node.iter().map(|(n, c)| format!("{n} {c}")).collect();
    r.say(&format!(
        "{}: {}/{} OK; flows per node: {}; crossed zones {}/{} (lb-proxy counted {}); p50 {:.2} ms, p99 {:.2} ms\n",
        m.case.label(),
        m.report.ok(),
        m.report.responses.max(m.report.ok()),
        nodes.join(", "),
        m.crossed,
        m.placed,
        m.counted.map_or_else(|| "none".into(), |c| c.to_string()),
        l.p50_ms,
        l.p99_ms
    ));
    let expected = m.case.expected_share();
    let all_ok = m.report.ok() > 0 && m.report.errors_total == 0;
    let pass = all_ok
        && m.placed as u64 == m.report.ok()
        && m.counted.unwrap_or(0.0) == m.crossed as f64
        && (m.share() - expected).abs() <= SHARE_TOLERANCE;
    r.verdict(
        &format!("{}: share of flows that crossed zones", m.case.label()),
        &format!(
            "{expected:.2} ± {SHARE_TOLERANCE}, every request answered, lb-proxy's count agreeing"
        ),
        format!(
            "{:.2} ({} of {} flows placed, {} errors)",
            m.share(),
            m.placed,
            m.report.flows.len(),
            m.report.errors_total
        ),
        pass,
    );
}

/// The closing table: one line per case.
fn summary_table(all: &[Measured]) -> String {
    let mut o =
        String::from("case                                 crossed  expected   p50 ms   p99 ms\n");
    for m in all {
        let _ = writeln!(
            o,
            "{:<36} {:>7.2}  {:>8.2} {:>8.2} {:>8.2}",
            m.case.label(),
            m.share(),
            m.case.expected_share(),
            m.report.latency.p50_ms,
            m.report.latency.p99_ms
        );
    }
    o.push('\n');
    o
}

const COLORS: [RGBColor; 6] = [
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
];

/// The latency distribution of each case (its percentiles, one line per
/// case) as an SVG at `path`.
fn write_chart(all: &[Measured], rtt: Duration, path: &Path) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::io(format!("create {}", parent.display()), e))?;
    }
    let top = all
        .iter()
        .map(|m| m.report.latency.p99_ms)
        .fold(0.0f64, f64::max)
        .max(0.1)
        * 1.15;
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(chart_err)?;
    let title = format!(
        "lb-bench experiment zones: request latency, new connection per request (cross_zone_rtt {rtt:?})"
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..100f64, 0f64..top)
        .map_err(chart_err)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("ms")
        .draw()
        .map_err(chart_err)?;
    for (i, m) in all.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points = PERCENTILES.map(|(p, at)| (p, at(&m.report.latency)));
        let label = format!("{} (crossed {:.0}%)", m.case.label(), m.share() * 100.0);
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(chart_err)?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart
            .draw_series(points.map(|pt| Circle::new(pt, 3, color.filled())))
            .map_err(chart_err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(chart_err)?;
    root.present().map_err(chart_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(pod_zones: usize, policy: Policy) -> f64 {
        Case { pod_zones, policy }.expected_share()
    }

    /// The shares: with pods in one of three zones, two thirds cross
    /// under Cluster (and under PreferSameZone, whose two pod-less zones fall
    /// back to all endpoints), none under Local; with pods in two zones,
    /// PreferSameZone leaves only the third zone's flows crossing.
    #[test]
    fn expected_shares_follow_kube_proxys_rules() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(share(1, Policy::Cluster), 2.0 / 3.0));
        assert!(close(share(1, Policy::PreferSameZone), 2.0 / 3.0));
        assert!(close(share(1, Policy::Local), 0.0));
        assert!(close(share(2, Policy::Cluster), 2.0 / 3.0));
        assert!(close(share(2, Policy::PreferSameZone), 1.0 / 3.0));
        assert!(close(share(2, Policy::Local), 0.0));
    }

    #[test]
    fn the_config_places_each_pod_on_its_zones_node() {
        let pods: Vec<SocketAddr> = vec![
            "127.0.2.2:8000".parse().unwrap(),
            "127.0.2.1:8000".parse().unwrap(),
        ];
        let case = Case {
            pod_zones: 2,
            policy: Policy::PreferSameZone,
        };
        let config = case.config(&pods, Duration::from_millis(2));
        assert!(config.contains("cross_zone_rtt = \"2000us\""), "{config}");
        assert!(
            config.contains("traffic_distribution = \"PreferSameZone\""),
            "{config}"
        );
        assert!(config.contains("name = \"node-1\"\naddress = \"127.0.1.1\"\nzone = \"1\"\nendpoints = [\"127.0.2.1:8000\"]"), "{config}");
        assert!(config.contains("name = \"node-2\"\naddress = \"127.0.1.2\"\nzone = \"2\"\nendpoints = [\"127.0.2.2:8000\"]"), "{config}");
        assert!(
            config.contains(
                "name = \"node-3\"\naddress = \"127.0.1.3\"\nzone = \"3\"\nendpoints = []"
            ),
            "{config}"
        );
    }
}
