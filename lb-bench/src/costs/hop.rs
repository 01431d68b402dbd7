//! The cost of the AKS hop model: keep-alive req/s and new connections/s
//! through plain backends vs through three nodes with cross-node SNAT
//! (`external_traffic_policy = "Cluster"`: the balancer picks a node, the
//! node forwards to a pod, binding each cross-node connection to the node's
//! address), the same three pods behind both, in alternating rounds.

use std::fmt::Write as _;
use std::net::SocketAddr;

use super::{alternate, median, Bench, Load};
use crate::compare::{self, render::code_block, CompareOptions};
use crate::error::Result;
use crate::lbproxy::LbProxy;

/// What the hop-cost measurement found, per round in the order measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct HopCost {
    pub tool: String,
    pub rounds: usize,
    pub plain_ka_rps: Vec<f64>,
    pub hop_ka_rps: Vec<f64>,
    pub plain_new_rps: Vec<f64>,
    pub hop_new_rps: Vec<f64>,
    /// Proxy CPU µs per response, keep-alive.
    pub plain_ka_cpu_us: Vec<f64>,
    pub hop_ka_cpu_us: Vec<f64>,
    /// Failed requests and non-2xx/3xx answers over all rounds.
    pub errors: u64,
    pub commands: Vec<String>,
}

const HEAD: &str = "workers = {workers}\ndrain_timeout = \"1s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[[frontends]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n";

/// One frontend `web` straight over the pods.
fn plain_config(pods: &[(String, SocketAddr)], workers: usize) -> String {
    let mut c = HEAD.replace("{workers}", &workers.to_string());
    c.push_str("[frontends.health]\nkind = \"tcp\"\n");
    for (i, (_, addr)) in pods.iter().enumerate() {
        let _ = write!(
            c,
            "[[frontends.backends]]\nname = \"pod-{n}\"\naddress = \"{addr}\"\n",
            n = i + 1
        );
    }
    c
}

/// One frontend `web` over nodes 127.0.1.N, node N running pod N, SNAT across nodes.
fn hop_config(pods: &[(String, SocketAddr)], workers: usize) -> String {
    let mut c = HEAD.replace("{workers}", &workers.to_string());
    c.push_str("client_address = \"snat\"\n[frontends.service]\nexternal_traffic_policy = \"Cluster\"\nsnat = \"cross-node\"\n[frontends.health]\nkind = \"tcp\"\n");
    for (i, (_, addr)) in pods.iter().enumerate() {
        let _ = write!(
            c,
            "[[frontends.nodes]]\nname = \"node-{n}\"\naddress = \"127.0.1.{n}\"\nendpoints = [\"{addr}\"]\n",
            n = i + 1
        );
    }
    c
}

impl HopCost {
    /// Keep-alive through both, then new connections through both, the
    /// order alternating between rounds.
    fn round(&mut self, load: &Load, round: usize, plain: &LbProxy, hop: &LbProxy) -> Result<()> {
        for is_hop in alternate(round, false, true) {
            let proxy = if is_hop { hop } else { plain };
            let (rps, cpu_us, errors) = load.measure(proxy, "web", true)?;
            let (rates, cpu) = if is_hop {
                (&mut self.hop_ka_rps, &mut self.hop_ka_cpu_us)
            } else {
                (&mut self.plain_ka_rps, &mut self.plain_ka_cpu_us)
            };
            rates.push(rps);
            cpu.push(cpu_us);
            self.errors += errors;
        }
        for is_hop in alternate(round, false, true) {
            let proxy = if is_hop { hop } else { plain };
            let (rps, _, errors) = load.measure(proxy, "web", false)?;
            let rates = if is_hop {
                &mut self.hop_new_rps
            } else {
                &mut self.plain_new_rps
            };
            rates.push(rps);
            self.errors += errors;
        }
        Ok(())
    }
}

/// Measures plain vs hop; `quiet` silences progress lines on stderr.
pub fn measure(
    rt: &tokio::runtime::Runtime,
    opts: &CompareOptions,
    quiet: bool,
) -> Result<HopCost> {
    // No bulk figure here: the sink is the built-in one, never iperf3.
    let bench = Bench::start(opts, "lb-bench-hop.", None)?;
    let pods = &bench.backends.nodes;
    let plain = bench.lb_proxy("plain", &plain_config(pods, opts.workers))?;
    let hop = bench.lb_proxy("hop", &hop_config(pods, opts.workers))?;
    let load = Load::new(rt, opts, bench.dir());
    let mut cost = HopCost {
        tool: load.tool().into(),
        rounds: opts.rounds.max(1),
        ..HopCost::default()
    };
    for round in 0..cost.rounds {
        if !quiet {
            eprintln!("hop cost: round {}/{}", round + 1, cost.rounds);
        }
        cost.round(&load, round, &plain, &hop)?;
    }
    cost.commands = vec![
        load.command(true, "FRONTEND_PLAIN|HOP", cost.rounds),
        load.command(false, "FRONTEND_PLAIN|HOP", cost.rounds),
    ];
    Ok(cost)
}

/// The medians as a Markdown table, then the commands that produced them.
pub fn markdown(h: &HopCost) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "Medians of {} alternating round(s) with {}; the same three pods behind both.\n",
        h.rounds, h.tool
    );
    let _ = writeln!(
        o,
        "| figure | plain | hop + SNAT | hop / plain |\n|---|---:|---:|---:|"
    );
    for (name, plain, hop) in [
        ("keep-alive req/s", &h.plain_ka_rps, &h.hop_ka_rps),
        ("new connections/s", &h.plain_new_rps, &h.hop_new_rps),
        (
            "proxy CPU µs per request (keep-alive)",
            &h.plain_ka_cpu_us,
            &h.hop_ka_cpu_us,
        ),
    ] {
        let (p, q) = (median(plain), median(hop));
        let _ = writeln!(
            o,
            "| {name} | {} | {} | {:.3} |",
            compare::fmt_num(Some(p)),
            compare::fmt_num(Some(q)),
            q / p
        );
    }
    if h.errors > 0 {
        let _ = writeln!(o, "\nErrors (failed or non-2xx/3xx requests): {}", h.errors);
    }
    o.push('\n');
    code_block(&mut o, &h.commands);
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_configs_put_one_pod_on_each_node() {
        let pods: Vec<(String, SocketAddr)> = (1..=3)
            .map(|i| {
                (
                    format!("node-{i}"),
                    SocketAddr::from(([127, 0, 0, 1], 9000 + i)),
                )
            })
            .collect();
        let plain = plain_config(&pods, 1);
        assert_eq!(
            plain.matches("[[frontends.backends]]").count(),
            3,
            "{plain}"
        );
        let hop = hop_config(&pods, 2);
        assert!(hop.starts_with("workers = 2\n"), "{hop}");
        assert!(
            hop.contains("address = \"127.0.1.3\"\nendpoints = [\"127.0.0.1:9003\"]"),
            "{hop}"
        );
        assert!(hop.contains("snat = \"cross-node\""), "{hop}");
    }
}
