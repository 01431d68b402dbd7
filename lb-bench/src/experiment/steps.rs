//! The lab the steps share (runtime, options, scratch directory, the
//! lb-proxy binary), the balancer of steps 1 and 2, and steps 1 to 3:
//! keep-alive, new connections, session affinity.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::options::SeedOptions;
use super::outcome::{nodes_summary, nodes_used, Reporter};
use crate::error::Result;
use crate::lbproxy::{self, LbProxy};
use crate::load::{self, FlowRecord, LoadReport, LoadSpec};
use crate::net::{self, Target};
use crate::procs;

/// What every step runs with.
pub(super) struct Lab<'a> {
    pub(super) rt: &'a tokio::runtime::Runtime,
    pub(super) opts: &'a SeedOptions,
    /// Scratch space for the balancers' configs and logs.
    pub(super) dir: &'a Path,
    /// The lb-proxy binary, or why there is none.
    pub(super) bin: &'a Result<PathBuf>,
}

impl Lab<'_> {
    /// The binary for a step that starts a balancer of its own (`needs`
    /// says which); without one, that step fails with the reason.
    pub(super) fn lb_proxy(&self, r: &mut Reporter, step: &str, needs: &str) -> Option<&Path> {
        match self.bin {
            Ok(bin) => Some(bin),
            Err(e) => {
                r.verdict(step, needs, format!("could not start it: {e}"), false);
                None
            }
        }
    }

    /// Runs `spec` to the end on the lab's runtime.
    pub(super) fn load(&self, spec: LoadSpec) -> Result<LoadReport> {
        self.rt.block_on(load::run(spec))
    }
}

/// The balancer of steps 1 and 2: the one given, or an `lb-proxy demo`
/// started here (and stopped when this is dropped).
pub(super) struct Balancer {
    proxy: SocketAddr,
    admin: Option<SocketAddr>,
    what: String,
    _own: Option<LbProxy>,
}

impl Balancer {
    pub(super) fn given_or_demo(opts: &SeedOptions, dir: &Path) -> Result<Balancer> {
        if let Some(proxy) = opts.proxy {
            return Ok(Balancer {
                proxy,
                admin: opts.admin,
                what: "a running balancer".to_owned(),
                _own: None,
            });
        }
        let bin = procs::lb_proxy_bin(opts.lb_proxy.as_deref())?;
        let p = LbProxy::demo(&bin, dir, "lb-proxy-demo", "Default")?;
        Ok(Balancer {
            proxy: p.frontend(None)?,
            admin: p.admin,
            what: format!(
                "lb-proxy demo started by lb-bench ({}, pid {})",
                bin.display(),
                p.pid()
            ),
            _own: Some(p),
        })
    }

    /// The experiment's heading: which balancer, and its admin endpoint.
    pub(super) fn banner(&self) -> String {
        format!(
            "lb-bench experiment seed: the article, replayed\n  balancer: http://{}/  ({})\n  admin:    {}\n\n",
            self.proxy,
            self.what,
            self.admin.map_or_else(
                || "none given (flow counts from the client side only)".into(),
                |a| format!("http://{a}/")
            )
        )
    }

    /// Runs `spec` against this balancer and shows its flows; with the
    /// report, how many flows the balancer counted meanwhile (when its admin
    /// endpoint is known).
    fn measure(
        &self,
        lab: &Lab,
        spec: LoadSpec,
        r: &mut Reporter,
    ) -> Result<(LoadReport, Option<f64>)> {
        let before = frontend_connections(self.admin);
        let rep = lab.load(spec)?;
        let after = frontend_connections(self.admin);
        let flows: Vec<&FlowRecord> = rep.flows.iter().collect();
        r.show_flows(&flows, "Seen by the backend");
        Ok((rep, before.zip(after).map(|(b, a)| a - b)))
    }
}

fn frontend_connections(admin: Option<SocketAddr>) -> Option<f64> {
    let m = lbproxy::metrics(admin?).ok()?;
    net::metric_sum(&m, "lb_frontend_connections_total", &[])
}

/// `requests` times `GET /` against `addr` from `concurrency` workers, with
/// a 10 s timeout, keeping the first `record_flows` flows.
pub(super) fn http_spec(
    addr: SocketAddr,
    requests: u64,
    concurrency: usize,
    keepalive: bool,
    record_flows: usize,
) -> LoadSpec {
    let mut spec = LoadSpec::new(Target::Http {
        addr,
        host: addr.to_string(),
        path: "/".into(),
    });
    spec.timeout = Duration::from_secs(10);
    spec.requests = Some(requests);
    spec.concurrency = concurrency;
    spec.keepalive = keepalive;
    spec.record_flows = record_flows;
    spec
}

/// The balancer's flow count for the report: the difference, or "none".
fn counted(lb_flows: Option<f64>) -> String {
    lb_flows.map_or_else(|| "none".into(), |d| format!("{d}"))
}

/// Step 1: keep-alive, as `hey -n 10 -c 1`: one connection, one flow, one node.
pub(super) fn keepalive(lab: &Lab, b: &Balancer, r: &mut Reporter) -> Result<()> {
    let n = lab.opts.keepalive_requests;
    r.say(&format!(
        "Step 1: keep-alive, as `hey -n {n} -c 1 http://{}/`: {n} requests on one connection\n",
        b.proxy
    ));
    let spec = http_spec(b.proxy, n, 1, true, lab.opts.show_flows);
    let (rep, lb_flows) = b.measure(lab, spec, r)?;
    let pass = rep.ok() == n
        && rep.connections == 1
        && nodes_used(&rep) == 1
        && lb_flows.is_none_or(|d| d == 1.0);
    r.verdict(
        "keep-alive is one flow on one node",
        &format!("1 flow, all {n} responses from one node"),
        format!(
            "{} flow(s) opened, {} counted by the balancer, {}/{n} responses OK, nodes: {}",
            rep.connections,
            counted(lb_flows),
            rep.ok(),
            nodes_summary(&rep)
        ),
        pass,
    );
    Ok(())
}

/// Step 2: no keep-alive, as `hey -disable-keepalive -n 300 -c 10`: a new
/// 5-tuple per request, so the flows spread as the balancer's table says.
pub(super) fn new_connections(lab: &Lab, b: &Balancer, r: &mut Reporter) -> Result<()> {
    let n = lab.opts.new_connections;
    r.say(&format!(
        "Step 2: no keep-alive, as `hey -disable-keepalive -n {n} -c 10 http://{}/`: a new 5-tuple per request\n",
        b.proxy
    ));
    let mut spec = http_spec(b.proxy, n, 10, false, lab.opts.show_flows);
    if let Some(a) = b.admin {
        match load::expected_from_admin(a, b.proxy, None) {
            Ok(e) => spec.expected = Some(e),
            Err(e) => r.say(&format!("  (expected shares: equal; /backends: {e})\n")),
        }
    }
    let (rep, lb_flows) = b.measure(lab, spec, r)?;
    let (all_used, p_value, max_mean) = match &rep.distribution {
        Some(d) => (
            d.backends
                .iter()
                .filter(|b| b.expected_share > 0.0)
                .all(|b| b.responses > 0),
            d.chi_square.map(|c| c.p_value),
            d.max_mean,
        ),
        None => (false, None, f64::NAN),
    };
    let pass = rep.ok() == n
        && rep.connections == n
        && all_used
        && nodes_used(&rep) > 1
        && p_value.is_none_or(|p| p >= 1e-4)
        && lb_flows.is_none_or(|d| d == n as f64);
    r.verdict(
        "without keep-alive, flows spread over the nodes",
        &format!("{n} flows, every node used, shares consistent with the table (chi-square p ≥ 0.0001)"),
        format!(
            "{} flows opened, {} counted by the balancer, {}/{n} OK, nodes: {}; max/mean {:.2}, p-value {}",
            rep.connections,
            counted(lb_flows),
            rep.ok(),
            nodes_summary(&rep),
            max_mean,
            p_value.map_or_else(|| "n/a".into(), |p| format!("{p:.4}"))
        ),
        pass,
    );
    Ok(())
}

const AFFINITY: &str = "session affinity pins each client address to one node";

/// Step 3: session affinity on a second demo with `--distribution SourceIP`:
/// each client address on one node, several nodes in all.
pub(super) fn session_affinity(lab: &Lab, r: &mut Reporter) -> Result<()> {
    let opts = lab.opts;
    let clients = opts.sources.len();
    let per_client = 5u64;
    r.say(&format!(
        "Step 3: session affinity (loadDistribution SourceIP = sessionAffinity: ClientIP): {} client addresses ({}), {per_client} new connections each\n",
        clients, opts.sources
    ));
    let Some(bin) = lab.lb_proxy(
        r,
        AFFINITY,
        "a second lb-proxy demo with --distribution SourceIP",
    ) else {
        return Ok(());
    };
    let sticky = LbProxy::demo(bin, lab.dir, "lb-proxy-sourceip", "SourceIP")?;
    let addr = sticky.frontend(None)?;
    let mut spec = http_spec(addr, clients * per_client, 4, false, opts.show_flows);
    spec.sources = Some(opts.sources);
    spec.per_source = true;
    let rep = lab.load(spec)?;
    let flows: Vec<&FlowRecord> = rep.flows.iter().collect();
    r.say(&format!(
        "  (a second balancer: lb-proxy demo --distribution SourceIP on http://{addr}/)\n"
    ));
    r.show_flows(&flows, "Seen by the backend");
    let per = rep.per_source.clone().unwrap_or_default();
    let pinned = per.values().filter(|m| m.len() == 1).count();
    let nodes: BTreeSet<&String> = per.values().flat_map(|m| m.keys()).collect();
    let explained = explain_agrees(&sticky, flows.first().copied());
    let pass = rep.ok() == clients * per_client
        && per.len() as u64 == clients
        && pinned as u64 == clients
        && nodes.len() > 1
        && explained != Some(false);
    r.verdict(
        AFFINITY,
        &format!("each of {clients} addresses on exactly one node, several nodes in all"),
        format!(
            "{pinned} of {} addresses on one node, nodes used: {}, {}/{} OK{}",
            per.len(),
            nodes
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            rep.ok(),
            clients * per_client,
            match explained {
                Some(true) => ", /explain agrees",
                Some(false) => ", /explain DISAGREES",
                None => "",
            }
        ),
        pass,
    );
    Ok(())
}

/// Whether `/explain` agrees with the node that served `flow`: in SourceIP
/// mode the source IP alone picks the node, so any port will do.
fn explain_agrees(sticky: &LbProxy, flow: Option<&FlowRecord>) -> Option<bool> {
    let f = flow?;
    let a = sticky.admin?;
    let e = lbproxy::explain(a, None, SocketAddr::new(f.src.ip(), 1)).ok()?;
    Some(e["backend"]["name"].as_str()? == f.node.as_deref()?)
}
