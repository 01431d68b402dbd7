//! `lb-bench compare --proto quic`: QUIC handshakes/s direct to one backend
//! and through lb-proxy in QUIC mode, interleaved over rounds, with the
//! proxy's CPU per handshake. The backends are three `lb-bench serve quic:`
//! servers whose connection IDs carry their QUIC-LB server IDs; the load is
//! [`crate::load::quic`] (a new client socket and connection per handshake).
//! Every front end must first answer `whoami` on one connection.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use super::backends::{serve_builtin, Served};
use super::options::{log, CompareOptions, Programs};
use super::results::fmt_num;
use crate::error::{IoContext, Result};
use crate::lbproxy::LbProxy;
use crate::load::quic::{self as hs, HandshakeReport, HandshakeSpec, DEFAULT_QUIC_SOURCES};
use crate::serve::ServerSpec;
use crate::signals::WorkDir;
use crate::{procs, quic, stats};

/// QUIC-LB parameters of the run: config 0, 3-byte server IDs, 4-byte nonces.
const CONFIG_ID: u8 = 0;
const SERVER_ID_LEN: usize = 3;
const NONCE_LEN: usize = 4;

/// lb-proxy's flow idle timeout here: every handshake is a new client
/// 4-tuple, and each flow holds an upstream socket until it expires, so a
/// short expiry bounds the file descriptors a run leaves behind.
const FLOW_IDLE_TIMEOUT: &str = "5s";

/// The QUIC front ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum QuicFrontend {
    Direct,
    LbProxy,
}

impl QuicFrontend {
    pub const ALL: [QuicFrontend; 2] = [QuicFrontend::Direct, QuicFrontend::LbProxy];

    pub fn label(self) -> &'static str {
        match self {
            QuicFrontend::Direct => "direct",
            QuicFrontend::LbProxy => "lb-proxy (protocol = quic)",
        }
    }
}

/// One measurement.
#[derive(Clone, Debug, Serialize)]
pub struct QuicSample {
    pub round: usize,
    pub frontend: QuicFrontend,
    pub load: HandshakeReport,
    /// Proxy CPU µs per completed handshake; `None` for direct.
    pub cpu_us: Option<f64>,
}

/// A front end's state.
#[derive(Clone, Debug, Serialize)]
pub struct QuicStatus {
    pub frontend: QuicFrontend,
    pub status: &'static str,
    pub detail: String,
}

/// Everything `compare --proto quic` produced.
#[derive(Clone, Debug, Serialize)]
pub struct QuicCompareResult {
    pub frontends: Vec<QuicStatus>,
    pub backends: String,
    pub samples: Vec<QuicSample>,
    /// lb-proxy's routing steps over the run; `None` when it did not run.
    pub routed: Option<std::result::Result<Routed, String>>,
    pub problems: Vec<String>,
    pub markdown: String,
    pub markdown_path: std::path::PathBuf,
    pub elapsed_secs: f64,
}

/// A started front end.
struct Running {
    frontend: QuicFrontend,
    addr: SocketAddr,
    lb: Option<LbProxy>,
}

/// Runs the comparison on `rt`.
pub fn run(
    rt: &tokio::runtime::Runtime,
    opts: &CompareOptions,
    quiet: bool,
) -> Result<QuicCompareResult> {
    let started = Instant::now();
    std::fs::create_dir_all(&opts.out_dir).ctx(|| format!("create {}", opts.out_dir.display()))?;
    let work = WorkDir::new("lb-bench-compare-quic.")?;
    let dir = work.path();
    log(
        quiet,
        &format!("compare quic: starting backends in {}", dir.display()),
    );
    let (nodes, served) = start_backends(dir)?;
    let programs = Programs::find(opts);
    let (mut statuses, mut running) = start_all(opts, &nodes, dir, &programs);
    warm_up(rt, &mut running, &mut statuses, &nodes, quiet);
    let mut problems = Vec::new();
    let mut samples = Vec::new();
    for round in 1..=opts.rounds {
        log(
            quiet,
            &format!("compare quic: round {round}/{}", opts.rounds),
        );
        for r in &running {
            match measure(rt, opts, r, round) {
                Ok(s) => samples.push(s),
                Err(e) => problems.push(format!("round {round}, {}: {e}", r.frontend.label())),
            }
        }
    }
    let routed = running
        .iter()
        .find_map(|r| r.lb.as_ref()?.admin)
        .map(read_routed);
    drop(running);
    drop(served);
    let mut result = QuicCompareResult {
        frontends: statuses,
        backends: format!(
            "three quinn servers (`lb-bench serve quic:NAME=ADDR,sid=HEX`) in one process, QUIC-LB config {CONFIG_ID}, {SERVER_ID_LEN}-byte server IDs {}, {NONCE_LEN}-byte nonces",
            nodes.iter().map(|n| n.sid.as_str()).collect::<Vec<_>>().join(", ")
        ),
        samples,
        routed,
        problems,
        markdown: String::new(),
        markdown_path: opts.out_dir.join("compare-quic.md"),
        elapsed_secs: 0.0,
    };
    result.elapsed_secs = started.elapsed().as_secs_f64();
    result.markdown = markdown(&result, opts);
    std::fs::write(&result.markdown_path, &result.markdown)
        .ctx(|| format!("write {}", result.markdown_path.display()))?;
    let json_path = opts.out_dir.join("compare-quic.json");
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&result).unwrap_or_default(),
    )
    .ctx(|| format!("write {}", json_path.display()))?;
    Ok(result)
}

/// How lb-proxy routed the run's client datagrams, from its own counters:
/// `lb_quic_routed_total` by step, and `lb_quic_unroutable_total` (all reasons).
#[derive(Clone, Debug, Serialize)]
pub struct Routed {
    pub cid: u64,
    pub flow: u64,
    pub hash: u64,
    pub unroutable: u64,
}

impl std::fmt::Display for Routed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "lb-proxy routed the run's client datagrams by connection ID {}, by the flow table {}, by the hash {} (unroutable, counted by reason: {}; Initial packets carry a client-chosen CID, so each new connection's Initials count there)",
            self.cid, self.flow, self.hash, self.unroutable
        )
    }
}

fn read_routed(admin: SocketAddr) -> std::result::Result<Routed, String> {
    let body = crate::lbproxy::metrics(admin).map_err(|e| e.to_string())?;
    let sum = |name: &str, by: Option<&str>| {
        let mut labels = vec![("frontend", "quic")];
        labels.extend(by.map(|b| ("by", b)));
        crate::net::metric_sum(&body, name, &labels).unwrap_or(0.0) as u64
    };
    Ok(Routed {
        cid: sum("lb_quic_routed_total", Some("cid")),
        flow: sum("lb_quic_routed_total", Some("flow")),
        hash: sum("lb_quic_routed_total", Some("hash")),
        unroutable: sum("lb_quic_unroutable_total", None),
    })
}

/// A QUIC backend: its name, address and server ID in hex.
struct Node {
    name: String,
    addr: SocketAddr,
    sid: String,
}

fn start_backends(dir: &Path) -> Result<(Vec<Node>, Served)> {
    let sids: Vec<String> = (1..=3)
        .map(|i| format!("{:0w$x}", 0xa0 + i, w = SERVER_ID_LEN * 2))
        .collect();
    let specs = sids
        .iter()
        .enumerate()
        .map(|(i, sid)| {
            format!(
                "quic:node-{}=127.0.0.1:0,sid={sid},config={CONFIG_ID},nonce={NONCE_LEN}",
                i + 1
            )
            .parse()
        })
        .collect::<Result<Vec<ServerSpec>>>()?;
    let (servers, served) = serve_builtin(&specs, dir, "quic-backends")?;
    let nodes = servers
        .into_iter()
        .zip(sids)
        .map(|(s, sid)| Node {
            name: s.name,
            addr: s.addr,
            sid,
        })
        .collect();
    Ok((nodes, served))
}

fn start_all(
    opts: &CompareOptions,
    nodes: &[Node],
    dir: &Path,
    programs: &Programs,
) -> (Vec<QuicStatus>, Vec<Running>) {
    let mut statuses = vec![QuicStatus {
        frontend: QuicFrontend::Direct,
        status: "ok",
        detail: format!("{} ({})", nodes[0].addr, nodes[0].name),
    }];
    let mut running = vec![Running {
        frontend: QuicFrontend::Direct,
        addr: nodes[0].addr,
        lb: None,
    }];
    let lb = programs
        .lb_proxy
        .clone()
        .map_err(|e| ("missing", e))
        .and_then(|bin| {
            let lb = LbProxy::run_config(
                &bin,
                dir,
                "lb-proxy-quic",
                &lb_quic_config(nodes, opts.workers),
            )
            .map_err(|e| ("failed", e.to_string()))?;
            Ok((bin, lb))
        });
    let (status, detail) = match lb {
        Ok((bin, lb)) => match lb.frontend(Some("quic")) {
            Ok(addr) => {
                running.push(Running {
                    frontend: QuicFrontend::LbProxy,
                    addr,
                    lb: Some(lb),
                });
                let debug = if procs::is_debug_build(&bin) {
                    " — DEBUG BUILD, timings not representative"
                } else {
                    ""
                };
                ("ok", format!("{}{debug}, protocol = quic, idle_timeout = {FLOW_IDLE_TIMEOUT}, {} worker(s)", bin.display(), opts.workers))
            }
            Err(e) => ("failed", e.to_string()),
        },
        Err(e) => e,
    };
    statuses.push(QuicStatus {
        frontend: QuicFrontend::LbProxy,
        status,
        detail,
    });
    (statuses, running)
}

/// lb-proxy: one `quic` frontend whose backends carry their server IDs.
fn lb_quic_config(nodes: &[Node], workers: usize) -> String {
    let mut c = format!(
        "workers = {workers}\ndrain_timeout = \"1s\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[[frontends]]\nname = \"quic\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"quic\"\nidle_timeout = \"{FLOW_IDLE_TIMEOUT}\"\n\n[frontends.quic]\nconfig_id = {CONFIG_ID}\nserver_id_length = {SERVER_ID_LEN}\nnonce_length = {NONCE_LEN}\n\n[frontends.health]\nkind = \"tcp\"\ninterval = \"5s\"\n"
    );
    for n in nodes {
        let _ = write!(
            c,
            "\n[[frontends.backends]]\nname = \"{}\"\naddress = \"{}\"\nserver_id = \"{}\"\n",
            n.name, n.addr, n.sid
        );
    }
    c
}

/// One connection and `whoami` through each front end; one that does not
/// answer with a backend's name is marked failed and left out.
fn warm_up(
    rt: &tokio::runtime::Runtime,
    running: &mut Vec<Running>,
    statuses: &mut [QuicStatus],
    nodes: &[Node],
    quiet: bool,
) {
    running.retain(|r| {
        let asked = rt.block_on(async {
            let socket =
                std::net::UdpSocket::bind("127.0.0.1:0").ctx(|| "bind 127.0.0.1:0".into())?;
            let endpoint = quic::client_endpoint(socket)?;
            let conn = quic::connect(&endpoint, r.addr).await?;
            let answer = quic::whoami(&conn).await;
            conn.close(quinn::VarInt::from_u32(0), b"done");
            endpoint.wait_idle().await;
            answer
        });
        let problem = match asked {
            Ok((name, _)) if nodes.iter().any(|n| n.name == name) => return true,
            Ok((name, _)) => format!("warm-up: whoami answered `{name}`, not a backend's name"),
            Err(e) => format!("warm-up: {e}"),
        };
        log(
            quiet,
            &format!("compare quic: {}: {problem}", r.frontend.label()),
        );
        if let Some(s) = statuses.iter_mut().find(|s| s.frontend == r.frontend) {
            s.status = "failed";
            s.detail = problem;
        }
        false
    });
}

fn measure(
    rt: &tokio::runtime::Runtime,
    opts: &CompareOptions,
    r: &Running,
    round: usize,
) -> Result<QuicSample> {
    let pid = r.lb.as_ref().map(LbProxy::pid);
    let cpu = || pid.and_then(procs::cpu_secs);
    let before = cpu();
    let spec = HandshakeSpec::new(r.addr, opts.quic_clients, opts.duration);
    let load = rt.block_on(hs::run(&spec))?;
    let cpu_us = super::sampling::cpu_us_per(before, cpu(), load.handshakes);
    Ok(QuicSample {
        round,
        frontend: r.frontend,
        load,
        cpu_us,
    })
}

fn median(
    samples: &[QuicSample],
    fe: QuicFrontend,
    f: fn(&QuicSample) -> Option<f64>,
) -> Option<f64> {
    let v: Vec<f64> = samples
        .iter()
        .filter(|s| s.frontend == fe)
        .filter_map(f)
        .collect();
    stats::median(&v)
}

/// How a table row reads its figure from a sample.
type Figure = fn(&QuicSample) -> Option<f64>;

/// compare-quic.md: the table, then the setup.
fn markdown(res: &QuicCompareResult, opts: &CompareOptions) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "Medians of {} interleaved round(s); {} concurrent clients, each making new connections back to back (a new UDP socket on the next address of {DEFAULT_QUIC_SOURCES} per connection) for {:?} per measurement; a handshake counts when quinn's connect completes (TLS 1.3, ECDSA P-256 self-signed), then the connection is closed.\n",
        opts.rounds, opts.quic_clients, opts.duration
    );
    table(&mut o, res);
    setup(&mut o, res);
    let _ = writeln!(o, "\nQUIC compare run time: {:.1} s.", res.elapsed_secs);
    o
}

/// The medians table, direct and lb-proxy side by side.
fn table(o: &mut String, res: &QuicCompareResult) {
    let status = |fe: QuicFrontend| {
        res.frontends
            .iter()
            .find(|s| s.frontend == fe)
            .map_or("-", |s| s.status)
    };
    let _ = writeln!(
        o,
        "| metric | direct | lb-proxy | lb-proxy / direct |\n|---|---:|---:|---:|"
    );
    let rows: [(&str, Figure); 5] = [
        ("handshakes/s", |s| Some(s.load.handshakes_per_sec)),
        ("handshake p50 ms", |s| Some(s.load.p50_ms)),
        ("handshake p99 ms", |s| Some(s.load.p99_ms)),
        ("proxy CPU µs per handshake", |s| s.cpu_us),
        ("failed handshakes", |s| Some(s.load.errors as f64)),
    ];
    for (metric, f) in rows {
        let cell = |fe| {
            if status(fe) == "ok" {
                fmt_num(median(&res.samples, fe, f))
            } else {
                status(fe).to_owned()
            }
        };
        let ratio = match (
            median(&res.samples, QuicFrontend::LbProxy, f),
            median(&res.samples, QuicFrontend::Direct, f),
        ) {
            (Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
            _ => "-".into(),
        };
        let _ = writeln!(
            o,
            "| {metric} | {} | {} | {ratio} |",
            cell(QuicFrontend::Direct),
            cell(QuicFrontend::LbProxy)
        );
    }
}

/// lb-proxy's routing counts, the front ends, the backends and any problems.
fn setup(o: &mut String, res: &QuicCompareResult) {
    match &res.routed {
        Some(Ok(r)) => {
            let _ = writeln!(o, "\n{r}.");
        }
        Some(Err(e)) => {
            let _ = writeln!(o, "\nlb-proxy's /metrics: {e}.");
        }
        None => {}
    }
    let _ = writeln!(o, "\nFront ends:\n");
    for s in &res.frontends {
        let _ = writeln!(
            o,
            "- **{}**: {} — {}",
            s.frontend.label(),
            s.status,
            s.detail
        );
    }
    let _ = writeln!(o, "\nBackends: {}.", res.backends);
    let errors = res.samples.iter().filter_map(|s| {
        s.load.first_error.as_ref().map(|e| {
            format!(
                "round {}, {}: {} failed, first: {e}",
                s.round,
                s.frontend.label(),
                s.load.errors
            )
        })
    });
    let problems: Vec<String> = errors.chain(res.problems.iter().cloned()).collect();
    if !problems.is_empty() {
        let _ = writeln!(o, "\nProblems:\n");
        for p in problems {
            let _ = writeln!(o, "- {p}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Briefly, through lb-proxy (built next to the test binary, as CI does
    /// first): handshakes complete both ways and lb-proxy routes most
    /// datagrams by connection ID.
    #[test]
    fn a_quick_run_completes_handshakes_direct_and_through_lb_proxy() {
        let out = tempfile::tempdir().unwrap();
        let mut opts = CompareOptions::new(true);
        opts.out_dir = out.path().to_path_buf();
        opts.duration = std::time::Duration::from_millis(300);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let res = run(&rt, &opts, true).unwrap();
        for st in &res.frontends {
            assert_eq!(st.status, "ok", "{:?}: {}", st.frontend, st.detail);
        }
        for fe in QuicFrontend::ALL {
            let s = res.samples.iter().find(|s| s.frontend == fe).unwrap();
            assert!(s.load.handshakes > 0 && s.load.errors == 0, "{s:?}");
        }
        // Per connection: the first Initial by the hash, the next Initials
        // by the flow it recorded, everything after by the server's CIDs.
        let r = res.routed.unwrap().unwrap();
        assert!(r.hash > 0 && r.cid > r.hash, "{r}");
    }

    #[test]
    fn the_quic_frontend_names_every_server_id() {
        let nodes: Vec<Node> = (1..=2)
            .map(|i| Node {
                name: format!("node-{i}"),
                addr: format!("127.0.0.1:700{i}").parse().unwrap(),
                sid: format!("0000a{i}"),
            })
            .collect();
        let c = lb_quic_config(&nodes, 1);
        assert!(
            c.contains("protocol = \"quic\"") && c.contains("server_id_length = 3"),
            "{c}"
        );
        assert!(
            c.contains("server_id = \"0000a1\"") && c.contains("server_id = \"0000a2\""),
            "{c}"
        );
    }
}
