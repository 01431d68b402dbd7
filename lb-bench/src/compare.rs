//! `lb-bench compare`: the same backends behind several front ends, measured
//! in one run, interleaved (A B C D, A B C D, ...) over rounds, so a busy
//! machine slows them all alike. A port of `scripts/tcp-compare.sh`.
//!
//! Front ends: direct to one backend; lb-proxy (default `auto` copy, userspace and splice);
//! HAProxy in `mode tcp` with `balance hash src_port` + `hash-type consistent`
//! (every client is 127.0.0.1, so that is the 5-tuple hash); nginx stream with
//! `hash $remote_addr$remote_port consistent`. One that is not installed is
//! reported as missing.
//!
//! Metrics, each from the tools that produced it: keep-alive req/s and
//! new connections/s with p50/p99 (lb-bench's own generator, hey and wrk when
//! installed), bulk Gbit/s with 1 and 4 streams (iperf3, else a built-in
//! sink), RSS per idle connection (RssAnon of the proxy before and after
//! opening N idle connections through it), and the proxy's CPU time per
//! request and per connection (utime + stime from /proc/PID/stat).

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result};
use crate::lbproxy::LbProxy;
use crate::load::{self, LoadSpec};
use crate::net::{self, SourceRange, Target};
use crate::procs::{self, Managed};
use crate::serve::{self, InProcess, Kind, ServerSpec};
use crate::stats;
use crate::tools;

/// The front ends, in the order they are measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum Frontend {
    Direct,
    LbProxy,
    LbProxyUserspace,
    LbProxySplice,
    Haproxy,
    NginxStream,
}

impl Frontend {
    pub const ALL: [Frontend; 6] = [
        Frontend::Direct,
        Frontend::LbProxy,
        Frontend::LbProxyUserspace,
        Frontend::LbProxySplice,
        Frontend::Haproxy,
        Frontend::NginxStream,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Frontend::Direct => "direct",
            Frontend::LbProxy => "lb-proxy",
            Frontend::LbProxyUserspace => "lb-proxy (userspace)",
            Frontend::LbProxySplice => "lb-proxy (splice)",
            Frontend::Haproxy => "haproxy",
            Frontend::NginxStream => "nginx stream",
        }
    }

    /// A label short enough for a chart axis.
    pub fn short_label(self) -> &'static str {
        match self {
            Frontend::Direct => "direct",
            Frontend::LbProxy => "lb-proxy",
            Frontend::LbProxyUserspace => "lb-user",
            Frontend::LbProxySplice => "lb-splice",
            Frontend::Haproxy => "haproxy",
            Frontend::NginxStream => "nginx",
        }
    }

    pub fn parse(s: &str) -> Option<Frontend> {
        Some(match s {
            "direct" => Frontend::Direct,
            "lb-proxy" => Frontend::LbProxy,
            "lb-proxy-userspace" | "userspace" => Frontend::LbProxyUserspace,
            "lb-proxy-splice" | "splice" => Frontend::LbProxySplice,
            "haproxy" => Frontend::Haproxy,
            "nginx" | "nginx-stream" => Frontend::NginxStream,
            _ => return None,
        })
    }

    /// The `copy` engine an lb-proxy front end is configured with (None: not lb-proxy).
    fn lb_copy(self) -> Option<&'static str> {
        match self {
            Frontend::LbProxy => Some("auto"),
            Frontend::LbProxyUserspace => Some("userspace"),
            Frontend::LbProxySplice => Some("splice"),
            _ => None,
        }
    }
}

/// What to compare and how long to measure.
#[derive(Clone, Debug)]
pub struct CompareOptions {
    pub rounds: usize,
    pub quick: bool,
    pub out_dir: PathBuf,
    pub frontends: Vec<Frontend>,
    pub lb_proxy: Option<PathBuf>,
    pub haproxy: Option<PathBuf>,
    pub nginx: Option<PathBuf>,
    pub hey: Option<PathBuf>,
    pub wrk: Option<PathBuf>,
    pub iperf3: Option<PathBuf>,
    /// Use the built-in backends even when nginx is installed.
    pub builtin_backends: bool,
    /// Threads of each proxy (lb-proxy workers, HAProxy nbthread, nginx workers).
    pub workers: usize,
    pub concurrency: usize,
    /// Per keep-alive and per new-connection measurement.
    pub duration: Duration,
    /// Per bulk measurement.
    pub bulk_duration: Duration,
    /// Idle connections for the memory measurement (capped by the fd limit).
    pub idle_connections: usize,
}

impl CompareOptions {
    /// Full budgets (`quick = false`) or tiny ones for CI.
    pub fn new(quick: bool) -> CompareOptions {
        CompareOptions {
            rounds: if quick { 1 } else { 3 },
            quick,
            out_dir: PathBuf::from("bench-out"),
            frontends: Frontend::ALL.to_vec(),
            lb_proxy: None,
            haproxy: None,
            nginx: None,
            hey: None,
            wrk: None,
            iperf3: None,
            builtin_backends: false,
            workers: 1,
            concurrency: if quick { 8 } else { 50 },
            duration: if quick {
                Duration::from_millis(250)
            } else {
                Duration::from_secs(5)
            },
            bulk_duration: if quick {
                Duration::from_secs(1)
            } else {
                Duration::from_secs(5)
            },
            idle_connections: if quick { 200 } else { 9000 },
        }
    }
}

/// One measurement.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Sample {
    pub round: usize,
    pub frontend: Frontend,
    pub metric: &'static str,
    pub tool: String,
    pub value: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Proxy CPU µs per request (keep-alive) or per connection (new).
    pub cpu_us: Option<f64>,
    pub errors: u64,
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
    pub markdown_path: PathBuf,
    pub chart_path: Option<PathBuf>,
    pub elapsed_secs: f64,
}

const KA: &str = "ka";
const NEW: &str = "new";
const BULK1: &str = "bulk1";
const BULK4: &str = "bulk4";
const IDLE: &str = "idle";

struct Running {
    frontend: Frontend,
    http: SocketAddr,
    bulk: SocketAddr,
    /// The process to read CPU and memory from (none for direct).
    pid: Option<u32>,
    /// nginx: sum over the master and its workers.
    tree: bool,
    _lb: Option<LbProxy>,
    _proc: Option<Managed>,
}

/// The backends: three HTTP nodes and one bulk sink.
pub(crate) struct Backends {
    pub(crate) nodes: Vec<(String, SocketAddr)>,
    pub(crate) bulk: SocketAddr,
    pub(crate) description: String,
    _procs: Vec<Managed>,
    _in_process: Option<InProcess>,
}

fn log(quiet: bool, msg: &str) {
    if !quiet {
        eprintln!("{msg}");
    }
}

fn nginx_stream_module(nginx: &Path) -> std::result::Result<Option<PathBuf>, String> {
    let out = Command::new(nginx)
        .arg("-V")
        .output()
        .map_err(|e| format!("{}: {e}", nginx.display()))?;
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    if text.contains("--with-stream ") || text.ends_with("--with-stream") {
        return Ok(None);
    }
    if text.contains("--with-stream=dynamic") {
        for dir in [
            "/usr/lib/nginx/modules",
            "/usr/share/nginx/modules",
            "/usr/lib64/nginx/modules",
        ] {
            let p = Path::new(dir).join("ngx_stream_module.so");
            if p.is_file() {
                return Ok(Some(p));
            }
        }
        return Err(
            "nginx's stream module is not installed (Debian: apt-get install libnginx-mod-stream)"
                .into(),
        );
    }
    Err("this nginx was built without the stream module".into())
}

pub(crate) fn start_backends(
    opts: &CompareOptions,
    dir: &Path,
    nginx: Option<&Path>,
    iperf3: Option<&Path>,
    nofile: u64,
) -> Result<Backends> {
    let mut procs_ = Vec::new();
    let mut in_process = None;
    let mut nodes = Vec::new();
    let mut description = String::new();
    let mut need_sink = iperf3.is_none();
    match nginx.filter(|_| !opts.builtin_backends) {
        Some(nginx) => {
            let ports: Vec<u16> = (0..3)
                .map(|_| net::free_port(Ipv4Addr::LOCALHOST))
                .collect::<Result<_>>()?;
            let mut servers = String::new();
            for (i, p) in ports.iter().enumerate() {
                let _ = writeln!(
                    servers,
                    "  server {{ listen 127.0.0.1:{p} reuseport; location / {{ add_header X-Node node-{n}; return 200 \"node-{n}\\n\"; }} }}",
                    n = i + 1
                );
                nodes.push((
                    format!("node-{}", i + 1),
                    SocketAddr::from((Ipv4Addr::LOCALHOST, *p)),
                ));
            }
            let conf = format!(
                "worker_processes 1;\nworker_rlimit_nofile {nofile};\ndaemon off;\nmaster_process on;\npid {d}/nginx-backends.pid;\nerror_log {d}/nginx-backends.error.log warn;\nevents {{ worker_connections {wc}; }}\nhttp {{\n  access_log off;\n  keepalive_requests 1000000;\n  keepalive_timeout 300s;\n  client_header_timeout 300s;\n{servers}}}\n",
                d = dir.display(),
                wc = nofile.saturating_sub(100).max(1024),
            );
            let path = dir.join("nginx-backends.conf");
            std::fs::write(&path, conf).ctx(|| format!("write {}", path.display()))?;
            let mut cmd = Command::new(nginx);
            cmd.arg("-c")
                .arg(&path)
                .arg("-p")
                .arg(dir)
                .arg("-e")
                .arg(dir.join("nginx-backends.error.log"));
            let mut m = Managed::spawn(cmd, "nginx-backends", dir)?;
            m.stop_signal = Some(libc::SIGTERM);
            m.wait_ports(
                &nodes.iter().map(|n| n.1).collect::<Vec<_>>(),
                Duration::from_secs(15),
            )?;
            procs_.push(m);
            description.push_str(&format!(
                "three nginx HTTP servers ({}), one worker",
                nginx.display()
            ));
        }
        None => {
            need_sink = true;
            description.push_str("three built-in HTTP servers (lb-bench serve, one thread)");
        }
    }
    let builtin_nodes = nodes.is_empty();
    if builtin_nodes || need_sink {
        let mut specs: Vec<ServerSpec> = Vec::new();
        if builtin_nodes {
            for i in 1..=3 {
                specs.push(format!("http:node-{i}=127.0.0.1:0").parse()?);
            }
        }
        if need_sink {
            specs.push("sink:bulk=127.0.0.1:0".parse()?);
        }
        let started = start_serve_process(&specs, dir)?;
        let servers = match started {
            Some((m, servers)) => {
                procs_.push(m);
                servers
            }
            None => {
                let ip = InProcess::start(&specs)?;
                let servers = ip.servers.clone();
                in_process = Some(ip);
                servers
            }
        };
        for s in &servers {
            if s.kind == Kind::Http {
                nodes.push((s.name.clone(), s.addr));
            }
        }
        if need_sink {
            let bulk = servers
                .iter()
                .find(|s| s.kind == Kind::Sink)
                .map(|s| s.addr)
                .expect("sink");
            description.push_str("; bulk: built-in TCP sink");
            return Ok(Backends {
                nodes,
                bulk,
                description,
                _procs: procs_,
                _in_process: in_process,
            });
        }
    }
    let iperf3 = iperf3.expect("need_sink is false only with iperf3");
    let port = net::free_port(Ipv4Addr::LOCALHOST)?;
    let bulk = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut cmd = Command::new(iperf3);
    cmd.args(["-s", "-B", "127.0.0.1", "-p", &port.to_string()]);
    let mut m = Managed::spawn(cmd, "iperf3-server", dir)?;
    m.wait_ports(&[bulk], Duration::from_secs(15))?;
    procs_.push(m);
    description.push_str(&format!("; bulk: iperf3 -s ({})", iperf3.display()));
    Ok(Backends {
        nodes,
        bulk,
        description,
        _procs: procs_,
        _in_process: in_process,
    })
}

/// `lb-bench serve ...` as a child process, when this executable is lb-bench.
fn start_serve_process(
    specs: &[ServerSpec],
    dir: &Path,
) -> Result<Option<(Managed, Vec<ServerSpec>)>> {
    let Ok(exe) = std::env::current_exe() else {
        return Ok(None);
    };
    if exe.file_name().and_then(|n| n.to_str()) != Some("lb-bench") {
        return Ok(None);
    }
    let ready = dir.join("serve.ready.json");
    let mut cmd = Command::new(exe);
    cmd.arg("serve");
    for s in specs {
        let kind = match s.kind {
            Kind::Http => "http",
            Kind::Echo => "echo",
            Kind::Sink => "sink",
        };
        cmd.arg(format!("{kind}:{}={}", s.name, s.addr));
    }
    cmd.arg("--ready-file").arg(&ready);
    let mut m = Managed::spawn(cmd, "lb-bench-serve", dir)?;
    let text = m.wait_file(&ready, Duration::from_secs(15))?;
    let servers = parse_serve_ready(&text, specs)?;
    Ok(Some((m, servers)))
}

/// The ready file of `lb-bench serve`: `{"NAME": "IP:PORT", ...}`.
pub fn parse_serve_ready(text: &str, specs: &[ServerSpec]) -> Result<Vec<ServerSpec>> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| Error::Protocol {
        what: "lb-bench serve's ready file".into(),
        detail: format!("{e}: {text}"),
    })?;
    specs
        .iter()
        .map(|s| {
            let addr = v[&s.name]
                .as_str()
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| Error::Protocol {
                    what: "lb-bench serve's ready file".into(),
                    detail: format!("no address for {}: {text}", s.name),
                })?;
            Ok(ServerSpec { addr, ..s.clone() })
        })
        .collect()
}

fn lb_config(backends: &Backends, workers: usize, copy: &str) -> String {
    let copy = format!("copy = \"{copy}\"\n");
    let mut c = format!(
        "workers = {workers}\ndrain_timeout = \"1s\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[[frontends]]\nname = \"http\"\nlisten = \"127.0.0.1:0\"\n{copy}\n[frontends.health]\nkind = \"tcp\"\ninterval = \"5s\"\n"
    );
    for (name, addr) in &backends.nodes {
        let _ = write!(
            c,
            "\n[[frontends.backends]]\nname = \"{name}\"\naddress = \"{addr}\"\n"
        );
    }
    let _ = write!(
        c,
        "\n[[frontends]]\nname = \"bulk\"\nlisten = \"127.0.0.1:0\"\n{copy}\n[frontends.health]\nkind = \"none\"\n\n[[frontends.backends]]\nname = \"bulk\"\naddress = \"{}\"\n",
        backends.bulk
    );
    c
}

fn start_frontend(
    fe: Frontend,
    opts: &CompareOptions,
    backends: &Backends,
    dir: &Path,
    bins: &Bins,
    nofile: u64,
) -> std::result::Result<Running, (&'static str, String)> {
    let failed = |e: Error| ("failed", e.to_string());
    match fe {
        Frontend::Direct => Ok(Running {
            frontend: fe,
            http: backends.nodes[0].1,
            bulk: backends.bulk,
            pid: None,
            tree: false,
            _lb: None,
            _proc: None,
        }),
        Frontend::LbProxy | Frontend::LbProxyUserspace | Frontend::LbProxySplice => {
            let bin = bins.lb_proxy.as_ref().map_err(|e| ("missing", e.clone()))?;
            let copy = fe.lb_copy().unwrap_or("auto");
            let name = format!("lb-proxy-{copy}");
            let lb = LbProxy::run_config(bin, dir, &name, &lb_config(backends, opts.workers, copy))
                .map_err(failed)?;
            Ok(Running {
                frontend: fe,
                http: lb.frontend(Some("http")).map_err(failed)?,
                bulk: lb.frontend(Some("bulk")).map_err(failed)?,
                pid: Some(lb.pid()),
                tree: false,
                _lb: Some(lb),
                _proc: None,
            })
        }
        Frontend::Haproxy => {
            let bin = bins.haproxy.as_ref().ok_or((
                "missing",
                "haproxy is not installed (or --haproxy names no file)".to_owned(),
            ))?;
            let (p_http, p_bulk) = (
                net::free_port(Ipv4Addr::LOCALHOST).map_err(failed)?,
                net::free_port(Ipv4Addr::LOCALHOST).map_err(failed)?,
            );
            let maxconn = (nofile.saturating_sub(200) / 2).max(256);
            let mut cfg = format!(
                "global\n  nbthread {w}\n  maxconn {maxconn}\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 300s\n  timeout server 300s\nfrontend http\n  bind 127.0.0.1:{p_http}\n  default_backend nodes\nbackend nodes\n  # Every client is on 127.0.0.1, so hashing the source port is the 5-tuple hash here.\n  balance hash src_port\n  hash-type consistent\n",
                w = opts.workers
            );
            for (name, addr) in &backends.nodes {
                let _ = writeln!(cfg, "  server {name} {addr}");
            }
            let _ = write!(
                cfg,
                "frontend bulk\n  bind 127.0.0.1:{p_bulk}\n  default_backend bulk\nbackend bulk\n  server bulk {}\n",
                backends.bulk
            );
            let path = dir.join("haproxy.cfg");
            std::fs::write(&path, cfg).map_err(|e| failed(Error::io("write haproxy.cfg", e)))?;
            let mut cmd = Command::new(bin);
            cmd.arg("-f").arg(&path).arg("-db");
            let http = SocketAddr::from((Ipv4Addr::LOCALHOST, p_http));
            let bulk = SocketAddr::from((Ipv4Addr::LOCALHOST, p_bulk));
            let mut m = Managed::spawn(cmd, "haproxy", dir).map_err(failed)?;
            m.wait_ports(&[http, bulk], Duration::from_secs(15))
                .map_err(failed)?;
            Ok(Running {
                frontend: fe,
                http,
                bulk,
                pid: Some(m.pid()),
                tree: false,
                _lb: None,
                _proc: Some(m),
            })
        }
        Frontend::NginxStream => {
            let bin = bins.nginx.as_ref().ok_or((
                "missing",
                "nginx is not installed (or --nginx names no file)".to_owned(),
            ))?;
            let module = nginx_stream_module(bin).map_err(|e| ("missing", e))?;
            let (p_http, p_bulk) = (
                net::free_port(Ipv4Addr::LOCALHOST).map_err(failed)?,
                net::free_port(Ipv4Addr::LOCALHOST).map_err(failed)?,
            );
            let load = module
                .map(|m| format!("load_module {};\n", m.display()))
                .unwrap_or_default();
            let mut upstream = String::new();
            for (_, addr) in &backends.nodes {
                let _ = writeln!(upstream, "    server {addr};");
            }
            let conf = format!(
                "{load}worker_processes {w};\nworker_rlimit_nofile {nofile};\ndaemon off;\nmaster_process on;\npid {d}/nginx-stream.pid;\nerror_log {d}/nginx-stream.error.log warn;\nevents {{ worker_connections {wc}; }}\nstream {{\n  upstream nodes {{\n    hash $remote_addr$remote_port consistent;\n{upstream}  }}\n  upstream bulk {{ server {bulk}; }}\n  server {{ listen 127.0.0.1:{p_http}; proxy_pass nodes; }}\n  server {{ listen 127.0.0.1:{p_bulk}; proxy_pass bulk; }}\n}}\n",
                w = opts.workers,
                d = dir.display(),
                wc = nofile.saturating_sub(100).max(1024),
                bulk = backends.bulk,
            );
            let path = dir.join("nginx-stream.conf");
            std::fs::write(&path, conf)
                .map_err(|e| failed(Error::io("write nginx-stream.conf", e)))?;
            let mut cmd = Command::new(bin);
            cmd.arg("-c")
                .arg(&path)
                .arg("-p")
                .arg(dir)
                .arg("-e")
                .arg(dir.join("nginx-stream.error.log"));
            let http = SocketAddr::from((Ipv4Addr::LOCALHOST, p_http));
            let bulk = SocketAddr::from((Ipv4Addr::LOCALHOST, p_bulk));
            let mut m = Managed::spawn(cmd, "nginx-stream", dir).map_err(failed)?;
            m.stop_signal = Some(libc::SIGTERM);
            m.wait_ports(&[http, bulk], Duration::from_secs(15))
                .map_err(failed)?;
            Ok(Running {
                frontend: fe,
                http,
                bulk,
                pid: Some(m.pid()),
                tree: true,
                _lb: None,
                _proc: Some(m),
            })
        }
    }
}

struct Bins {
    lb_proxy: std::result::Result<PathBuf, String>,
    haproxy: Option<PathBuf>,
    nginx: Option<PathBuf>,
    hey: Option<PathBuf>,
    wrk: Option<PathBuf>,
    iperf3: Option<PathBuf>,
}

fn cpu(r: &Running) -> Option<f64> {
    let pid = r.pid?;
    if r.tree {
        procs::cpu_secs_tree(pid)
    } else {
        procs::cpu_secs(pid)
    }
}

fn rss(r: &Running) -> Option<u64> {
    let pid = r.pid?;
    if r.tree {
        procs::rss_anon_kib_tree(pid)
    } else {
        procs::rss_anon_kib(pid)
    }
}

fn url(addr: SocketAddr) -> String {
    format!("http://{addr}/")
}

/// One HTTP load measurement with `tool` against `r`.
#[allow(clippy::too_many_arguments)]
fn measure_http(
    rt: &tokio::runtime::Runtime,
    opts: &CompareOptions,
    r: &Running,
    tool: &str,
    bin: Option<&Path>,
    keepalive: bool,
    round: usize,
    dir: &Path,
) -> std::result::Result<Sample, String> {
    let before = cpu(r);
    let (value, p50, p99, count, errors) = match tool {
        "lb-bench" => {
            let mut spec = LoadSpec::new(Target::Http {
                addr: r.http,
                host: r.http.to_string(),
                path: "/".into(),
            });
            spec.duration = Some(opts.duration);
            spec.concurrency = opts.concurrency;
            spec.keepalive = keepalive;
            spec.timeout = Duration::from_secs(10);
            let rep = rt.block_on(load::run(spec)).map_err(|e| e.to_string())?;
            let errors = rep.errors_total + (rep.responses - rep.ok());
            (
                rep.requests_per_sec,
                Some(rep.latency.p50_ms),
                Some(rep.latency.p99_ms),
                rep.responses,
                errors,
            )
        }
        "hey" | "wrk" => {
            let bin = bin.ok_or("not installed")?;
            let s = if tool == "hey" {
                tools::hey(
                    bin,
                    &url(r.http),
                    opts.concurrency,
                    opts.duration,
                    keepalive,
                    dir,
                )
            } else {
                tools::wrk(
                    bin,
                    &url(r.http),
                    opts.concurrency,
                    opts.duration,
                    keepalive,
                    dir,
                )
            }
            .map_err(|e| e.to_string())?;
            let count = if s.responses > 0 {
                s.responses
            } else {
                (s.requests_per_sec * opts.duration.as_secs_f64()) as u64
            };
            (s.requests_per_sec, s.p50_ms, s.p99_ms, count, s.errors)
        }
        _ => return Err(format!("unknown tool {tool}")),
    };
    let after = cpu(r);
    let cpu_us = before
        .zip(after)
        .filter(|_| count > 0)
        .map(|(b, a)| (a - b) * 1e6 / count as f64);
    Ok(Sample {
        round,
        frontend: r.frontend,
        metric: if keepalive { KA } else { NEW },
        tool: tool.to_owned(),
        value,
        p50_ms: p50,
        p99_ms: p99,
        cpu_us,
        errors,
    })
}

/// Opens `n` idle connections through `r` (one request each, so both legs are
/// established) and returns the proxy's RssAnon growth per connection in KiB.
fn idle_memory(r: &Running, n: usize, settle: Duration) -> std::result::Result<f64, String> {
    let timeout = Duration::from_secs(10);
    let sources: SourceRange = "127.0.6.1-127.0.6.250"
        .parse()
        .map_err(|e: Error| e.to_string())?;
    let request = format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", r.http);
    let exchange = |s: &mut std::net::TcpStream| -> std::io::Result<()> {
        s.write_all(request.as_bytes())?;
        read_response(s)
    };
    // One warm-up connection, so lazily allocated per-thread state is not counted.
    let mut warm = net::connect_std_from(None, r.http, timeout).map_err(|e| e.to_string())?;
    exchange(&mut warm).map_err(|e| format!("warm-up: {e}"))?;
    std::thread::sleep(Duration::from_millis(200));
    let before = rss(r).ok_or("no RssAnon")?;
    let mut socks = Vec::with_capacity(n);
    for i in 0..n {
        let s = net::connect_std_from(Some(sources.nth(i as u64)), r.http, timeout)
            .map_err(|e| format!("connection {i}: {e}"))?;
        socks.push(s);
    }
    for s in &mut socks {
        s.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    }
    for (i, s) in socks.iter_mut().enumerate() {
        read_response(s).map_err(|e| format!("response {i}: {e}"))?;
    }
    std::thread::sleep(settle);
    let after = rss(r).ok_or("no RssAnon")?;
    drop(socks);
    Ok((after as f64 - before as f64) / n as f64)
}

/// Reads one small HTTP response (head plus `Content-Length` body).
fn read_response(s: &mut std::net::TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(i) = crate::http::find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= i + 4 + len {
                return Ok(());
            }
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "EOF before the response",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn describe(bin: &Option<PathBuf>, version_args: &[&str], name: &str) -> String {
    match bin {
        Some(p) if version_args.is_empty() => p.display().to_string(),
        Some(p) => match procs::version_line(p, version_args) {
            Some(v) => format!("{} ({v})", p.display()),
            None => p.display().to_string(),
        },
        None => format!("missing ({name} not installed)"),
    }
}

/// Runs the comparison; `quiet` silences progress lines on stderr.
pub fn run(
    rt: &tokio::runtime::Runtime,
    opts: &CompareOptions,
    quiet: bool,
) -> Result<CompareResult> {
    let started = Instant::now();
    let (_, hard) = procs::raise_nofile_limit();
    let nofile = hard;
    std::fs::create_dir_all(&opts.out_dir).ctx(|| format!("create {}", opts.out_dir.display()))?;
    let work = tempfile::Builder::new()
        .prefix("lb-bench-compare.")
        .tempdir()
        .map_err(|e| Error::io("create a work directory", e))?;
    let dir = work.path();
    let bins = Bins {
        lb_proxy: procs::lb_proxy_bin(opts.lb_proxy.as_deref()).map_err(|e| e.to_string()),
        haproxy: procs::find_program("haproxy", opts.haproxy.as_deref()),
        nginx: procs::find_program("nginx", opts.nginx.as_deref()),
        hey: procs::find_program("hey", opts.hey.as_deref()),
        wrk: procs::find_program("wrk", opts.wrk.as_deref()),
        iperf3: procs::find_program("iperf3", opts.iperf3.as_deref()),
    };
    let tools_used = vec![
        (
            "lb-bench".to_owned(),
            format!(
                "{} (this binary)",
                std::env::current_exe()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
        ),
        ("hey".to_owned(), describe(&bins.hey, &[], "hey")),
        ("wrk".to_owned(), describe(&bins.wrk, &["-v"], "wrk")),
        (
            "iperf3".to_owned(),
            describe(&bins.iperf3, &["--version"], "iperf3"),
        ),
    ];
    log(
        quiet,
        &format!("compare: starting backends in {}", dir.display()),
    );
    let backends = match start_backends(
        opts,
        dir,
        bins.nginx.as_deref(),
        bins.iperf3.as_deref(),
        nofile,
    ) {
        Ok(b) => b,
        // nginx (or iperf3) would not start: carry on with the built-in backends.
        Err(e) if !opts.builtin_backends => {
            log(quiet, &format!("compare: {e}; using the built-in backends"));
            let builtin = CompareOptions {
                builtin_backends: true,
                ..opts.clone()
            };
            start_backends(&builtin, dir, None, None, nofile)?
        }
        Err(e) => return Err(e),
    };

    // The front ends.
    let mut statuses = Vec::new();
    let mut running: Vec<Running> = Vec::new();
    for &fe in &opts.frontends {
        let detail_ok = |bin: &Option<PathBuf>, args: &[&str]| describe(bin, args, fe.label());
        match start_frontend(fe, opts, &backends, dir, &bins, nofile) {
            Ok(r) => {
                let detail = match fe {
                    Frontend::Direct => format!("{} (node-1)", r.http),
                    Frontend::LbProxy | Frontend::LbProxyUserspace | Frontend::LbProxySplice => {
                        let bin = bins.lb_proxy.clone().unwrap_or_default();
                        format!(
                            "{}{}, copy = {}, {} worker(s)",
                            bin.display(),
                            if procs::is_debug_build(&bin) {
                                " — DEBUG BUILD, timings not representative"
                            } else {
                                ""
                            },
                            fe.lb_copy().unwrap_or("auto"),
                            opts.workers
                        )
                    }
                    Frontend::Haproxy => format!(
                        "{}, mode tcp, balance hash src_port, hash-type consistent, nbthread {}",
                        detail_ok(&bins.haproxy, &["-v"]),
                        opts.workers
                    ),
                    Frontend::NginxStream => format!(
                        "{}, hash $remote_addr$remote_port consistent, {} worker(s)",
                        detail_ok(&bins.nginx, &["-v"]),
                        opts.workers
                    ),
                };
                statuses.push(FrontendStatus {
                    frontend: fe,
                    label: fe.label(),
                    status: "ok",
                    detail,
                });
                running.push(r);
            }
            Err((status, detail)) => {
                log(
                    quiet,
                    &format!("compare: {}: {status}: {detail}", fe.label()),
                );
                statuses.push(FrontendStatus {
                    frontend: fe,
                    label: fe.label(),
                    status,
                    detail,
                });
            }
        }
    }
    // Warm-up: each front end must answer.
    running.retain(|r| {
        let mut spec = LoadSpec::new(Target::Http {
            addr: r.http,
            host: r.http.to_string(),
            path: "/".into(),
        });
        spec.requests = Some(100);
        spec.concurrency = 4;
        spec.timeout = Duration::from_secs(5);
        let res = rt.block_on(load::run(spec));
        let problem = match &res {
            Ok(rep) if rep.ok() == 100 => None,
            Ok(rep) => Some(format!(
                "warm-up: {} of 100 OK, errors {:?}, status {:?}",
                rep.ok(),
                rep.errors,
                rep.status
            )),
            Err(e) => Some(format!("warm-up: {e}")),
        };
        if let Some(p) = problem {
            log(quiet, &format!("compare: {}: {p}", r.frontend.label()));
            if let Some(s) = statuses.iter_mut().find(|s| s.frontend == r.frontend) {
                s.status = "failed";
                s.detail = p;
            }
            return false;
        }
        true
    });

    let http_tools: Vec<(&str, Option<PathBuf>)> = {
        let mut t = vec![("lb-bench", None)];
        if let Some(h) = &bins.hey {
            t.push(("hey", Some(h.clone())));
        }
        if let Some(w) = &bins.wrk {
            t.push(("wrk", Some(w.clone())));
        }
        t
    };
    let bulk_tool = if bins.iperf3.is_some() {
        "iperf3"
    } else {
        "built-in sink"
    };
    let mut commands = Vec::new();
    let d = opts.duration;
    let c = opts.concurrency;
    for (tool, _) in &http_tools {
        for ka in [true, false] {
            commands.push(match *tool {
                "lb-bench" => format!(
                    "lb-bench load -z {} -c {c}{} http://FRONTEND/",
                    tools::go_duration(d),
                    if ka { "" } else { " --disable-keepalive" }
                ),
                "hey" => format!(
                    "hey -z {} -c {c} -t 10{} http://FRONTEND/",
                    tools::go_duration(d),
                    if ka { "" } else { " -disable-keepalive" }
                ),
                _ => format!(
                    "wrk -t N -c {c} -d {}s --timeout 10s --latency{} http://FRONTEND/",
                    d.as_secs_f64().round().max(1.0),
                    if ka { "" } else { " -H 'Connection: close'" }
                ),
            });
        }
    }
    let bulk_secs = opts.bulk_duration.as_secs_f64().round().max(1.0);
    if bins.iperf3.is_some() {
        commands.push(format!(
            "iperf3 -c 127.0.0.1 -p BULK_PORT -P 1|4 -t {bulk_secs} -J"
        ));
    } else {
        commands.push(format!(
            "built-in: 1|4 TCP streams writing to a sink for {:?}",
            opts.bulk_duration
        ));
    }

    let mut samples: Vec<Sample> = Vec::new();
    let mut problems: Vec<String> = Vec::new();
    for round in 1..=opts.rounds {
        log(quiet, &format!("compare: round {round}/{}", opts.rounds));
        for ka in [true, false] {
            for (tool, bin) in &http_tools {
                for r in &running {
                    match measure_http(rt, opts, r, tool, bin.as_deref(), ka, round, dir) {
                        Ok(s) => samples.push(s),
                        Err(e) => problems.push(format!(
                            "round {round}, {}, {tool}, {}: {e}",
                            r.frontend.label(),
                            if ka { "keep-alive" } else { "new connections" }
                        )),
                    }
                }
            }
        }
        for (metric, streams) in [(BULK1, 1usize), (BULK4, 4)] {
            for r in &running {
                let res = match &bins.iperf3 {
                    Some(b) => tools::iperf3(b, r.bulk, streams, opts.bulk_duration, dir),
                    None => tools::bulk_builtin(r.bulk, streams, opts.bulk_duration),
                };
                match res {
                    Ok(g) => samples.push(Sample {
                        round,
                        frontend: r.frontend,
                        metric,
                        tool: bulk_tool.into(),
                        value: g,
                        p50_ms: None,
                        p99_ms: None,
                        cpu_us: None,
                        errors: 0,
                    }),
                    Err(e) => problems.push(format!(
                        "round {round}, {}, bulk {streams}: {e}",
                        r.frontend.label()
                    )),
                }
            }
        }
    }
    // Memory per idle connection, proxies only.
    let idle = opts
        .idle_connections
        .min((nofile.saturating_sub(300) / 2) as usize)
        .max(1);
    let settle = if opts.quick {
        Duration::from_millis(300)
    } else {
        Duration::from_secs(1)
    };
    for r in running.iter().filter(|r| r.pid.is_some()) {
        log(
            quiet,
            &format!(
                "compare: {} idle connections through {}",
                idle,
                r.frontend.label()
            ),
        );
        match idle_memory(r, idle, settle) {
            Ok(kib) => samples.push(Sample {
                round: 0,
                frontend: r.frontend,
                metric: IDLE,
                tool: "lb-bench".into(),
                value: kib,
                p50_ms: None,
                p99_ms: None,
                cpu_us: None,
                errors: 0,
            }),
            Err(e) => problems.push(format!("{}, idle connections: {e}", r.frontend.label())),
        }
    }
    drop(running);

    let order: Vec<Frontend> = opts.frontends.clone();
    let rows = table_rows(
        &samples,
        &order,
        &http_tools.iter().map(|t| t.0).collect::<Vec<_>>(),
        bulk_tool,
        idle,
    );
    let accuracy = accuracy_line(&samples);
    let mut result = CompareResult {
        frontends: statuses,
        tools: tools_used,
        backends: backends.description.clone(),
        samples,
        rows,
        accuracy,
        idle_connections: idle,
        commands,
        markdown: String::new(),
        markdown_path: opts.out_dir.join("compare.md"),
        chart_path: None,
        elapsed_secs: 0.0,
    };
    drop(backends);
    let chart_path = opts.out_dir.join("compare.svg");
    // The measurements are worth more than the chart: a plotting panic must not lose them.
    let drawn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        crate::chart::write_compare_chart(&result, &chart_path)
    }));
    match drawn {
        Ok(Ok(())) => result.chart_path = Some(chart_path),
        Ok(Err(e)) => problems.push(format!("chart: {e}")),
        Err(_) => problems.push("chart: plotting panicked".into()),
    }
    result.elapsed_secs = started.elapsed().as_secs_f64();
    result.markdown = markdown(&result, opts, &problems);
    std::fs::write(&result.markdown_path, &result.markdown)
        .ctx(|| format!("write {}", result.markdown_path.display()))?;
    let json_path = opts.out_dir.join("compare.json");
    let json = serde_json::to_string_pretty(&result).unwrap_or_default();
    std::fs::write(&json_path, json).ctx(|| format!("write {}", json_path.display()))?;
    Ok(result)
}

fn metric_label(metric: &str) -> &'static str {
    match metric {
        KA => "keep-alive req/s",
        NEW => "new connections/s",
        BULK1 => "bulk Gbit/s, 1 stream",
        BULK4 => "bulk Gbit/s, 4 streams",
        IDLE => "RSS KiB per idle connection",
        _ => "?",
    }
}

fn median_of(
    samples: &[Sample],
    fe: Frontend,
    metric: &str,
    tool: &str,
    f: impl Fn(&Sample) -> Option<f64>,
) -> Option<f64> {
    let v: Vec<f64> = samples
        .iter()
        .filter(|s| s.frontend == fe && s.metric == metric && s.tool == tool)
        .filter_map(f)
        .collect();
    stats::median(&v)
}

fn table_rows(
    samples: &[Sample],
    order: &[Frontend],
    http_tools: &[&str],
    bulk_tool: &str,
    idle: usize,
) -> Vec<Row> {
    let mut rows = Vec::new();
    let row = |metric: String, tool: &str, f: &dyn Fn(Frontend) -> Option<f64>| Row {
        metric,
        tool: tool.to_owned(),
        values: order.iter().map(|&fe| f(fe)).collect(),
    };
    for m in [KA, NEW] {
        let (what, per) = if m == KA {
            ("keep-alive", "request")
        } else {
            ("new connection", "connection")
        };
        for &tool in http_tools {
            rows.push(row(metric_label(m).into(), tool, &|fe| {
                median_of(samples, fe, m, tool, |s| Some(s.value))
            }));
            rows.push(row(format!("{what} p50 ms"), tool, &|fe| {
                median_of(samples, fe, m, tool, |s| s.p50_ms)
            }));
            rows.push(row(format!("{what} p99 ms"), tool, &|fe| {
                median_of(samples, fe, m, tool, |s| s.p99_ms)
            }));
            rows.push(row(format!("proxy CPU µs per {per}"), tool, &|fe| {
                median_of(samples, fe, m, tool, |s| s.cpu_us)
            }));
        }
    }
    for m in [BULK1, BULK4] {
        rows.push(row(metric_label(m).into(), bulk_tool, &|fe| {
            median_of(samples, fe, m, bulk_tool, |s| Some(s.value))
        }));
    }
    rows.push(row(
        format!("{} ({idle} conns)", metric_label(IDLE)),
        "lb-bench",
        &|fe| median_of(samples, fe, IDLE, "lb-bench", |s| Some(s.value)),
    ));
    rows
}

fn accuracy_line(samples: &[Sample]) -> String {
    let own = median_of(samples, Frontend::Direct, KA, "lb-bench", |s| Some(s.value));
    let hey = median_of(samples, Frontend::Direct, KA, "hey", |s| Some(s.value));
    let wrk = median_of(samples, Frontend::Direct, KA, "wrk", |s| Some(s.value));
    let own_new = median_of(samples, Frontend::Direct, NEW, "lb-bench", |s| {
        Some(s.value)
    });
    let hey_new = median_of(samples, Frontend::Direct, NEW, "hey", |s| Some(s.value));
    let Some(own) = own else {
        return "generator check: no direct-to-backend measurement (is `direct` among the front ends?)".into();
    };
    let mut line = format!("generator check, direct to one backend in the same run (medians): keep-alive lb-bench {own:.0} req/s");
    match hey {
        Some(h) => {
            let _ = write!(
                line,
                ", hey {h:.0} req/s: lb-bench/hey = {:.2} ({})",
                own / h,
                if own >= h {
                    "the generator is not the bottleneck"
                } else {
                    "lb-bench drove the backend SLOWER than hey"
                }
            );
        }
        None => line.push_str(", hey not installed"),
    }
    if let Some(w) = wrk {
        let _ = write!(line, "; wrk {w:.0} req/s");
    }
    if let (Some(a), Some(b)) = (own_new, hey_new) {
        let _ = write!(
            line,
            "; new connections lb-bench {a:.0}/s vs hey {b:.0}/s ({:.2})",
            a / b
        );
    }
    line
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

fn markdown(res: &CompareResult, opts: &CompareOptions, problems: &[String]) -> String {
    let mut o = String::new();
    let order: Vec<&FrontendStatus> = opts
        .frontends
        .iter()
        .filter_map(|fe| res.frontends.iter().find(|s| s.frontend == *fe))
        .collect();
    let idx = |fe: Frontend| opts.frontends.iter().position(|f| *f == fe);
    let ha_ok = order
        .iter()
        .any(|s| s.frontend == Frontend::Haproxy && s.status == "ok");
    let _ = writeln!(
        o,
        "Medians of {} interleaved round(s); {} worker thread(s) per proxy; {} concurrent clients; {:?} per load measurement, {:?} per bulk measurement.\n",
        opts.rounds, opts.workers, opts.concurrency, opts.duration, opts.bulk_duration
    );
    let _ = write!(o, "| metric | tool |");
    for s in &order {
        let _ = write!(o, " {} |", s.label);
    }
    let _ = writeln!(o, " lb-proxy / direct | lb-proxy / haproxy |");
    let _ = write!(o, "|---|---|");
    for _ in &order {
        let _ = write!(o, "---:|");
    }
    let _ = writeln!(o, "---:|---:|");
    for row in &res.rows {
        if row.values.iter().all(Option::is_none) && !row.metric.starts_with("RSS") {
            continue;
        }
        let _ = write!(o, "| {} | {} |", row.metric, row.tool);
        for (i, s) in order.iter().enumerate() {
            let cell = if s.status != "ok" {
                s.status.to_owned()
            } else {
                fmt_num(row.values.get(i).copied().flatten())
            };
            let _ = write!(o, " {cell} |");
        }
        let get = |fe: Frontend| idx(fe).and_then(|i| row.values.get(i).copied().flatten());
        let lb = get(Frontend::LbProxy);
        let ratio = |other: Option<f64>| match (lb, other) {
            (Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
            _ => "-".into(),
        };
        let vs_ha = if ha_ok {
            ratio(get(Frontend::Haproxy))
        } else {
            "haproxy missing".into()
        };
        let _ = writeln!(o, " {} | {} |", ratio(get(Frontend::Direct)), vs_ha);
    }
    let _ = writeln!(o, "\n{}\n", res.accuracy);
    let _ = writeln!(o, "Front ends:\n");
    for s in &order {
        let _ = writeln!(o, "- **{}**: {} — {}", s.label, s.status, s.detail);
    }
    let _ = writeln!(o, "\nBackends: {}.\n\nTools:\n", res.backends);
    for (t, d) in &res.tools {
        let _ = writeln!(o, "- {t}: {d}");
    }
    let _ = writeln!(
        o,
        "\nLoad commands (FRONTEND is each front end's address in turn):\n\n```"
    );
    for c in &res.commands {
        let _ = writeln!(o, "{c}");
    }
    let _ = writeln!(o, "```");
    let errs: Vec<String> = res
        .samples
        .iter()
        .filter(|s| s.errors > 0)
        .map(|s| {
            format!(
                "round {}, {}, {} {}: {} errors",
                s.round,
                s.frontend.label(),
                s.tool,
                s.metric,
                s.errors
            )
        })
        .collect();
    if !errs.is_empty() || !problems.is_empty() {
        let _ = writeln!(o, "\nProblems:\n");
        for p in errs.iter().chain(problems) {
            let _ = writeln!(o, "- {p}");
        }
    }
    if let Some(c) = &res.chart_path {
        let _ = writeln!(o, "\nChart: `{}`", c.display());
    }
    let _ = writeln!(o, "\nCompare run time: {:.1} s.", res.elapsed_secs);
    o
}

/// `lb-bench serve`: runs built-in servers until killed; writes their
/// addresses as JSON to `ready` once they listen.
pub fn serve_forever(specs: &[ServerSpec], ready: Option<&Path>) -> Result<()> {
    let bound = serve::bind(specs)?;
    if let Some(path) = ready {
        let map: serde_json::Map<String, serde_json::Value> = bound
            .iter()
            .map(|(s, _)| {
                (
                    s.name.clone(),
                    serde_json::Value::String(s.addr.to_string()),
                )
            })
            .collect();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::Value::Object(map).to_string())
            .ctx(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).ctx(|| format!("write {}", path.display()))?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ctx(|| "build the runtime".into())?;
    rt.block_on(serve::serve(bound, std::sync::Arc::default()));
    Ok(())
}
