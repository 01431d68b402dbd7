//! The UDP comparison's setup: three `udp-echo` backends (`lb-bench serve`,
//! each with its TCP health listener on the same port number), and the
//! front ends in front of them: direct to node-1, lb-proxy with its default
//! `udp_batch` and with `udp_batch = 1`, and nginx's stream module in UDP
//! mode. One that cannot start is `missing` or `failed`, never dropped.

use std::fmt::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use super::UdpFrontend;
use crate::compare::backends::{serve_builtin, Served};
use crate::compare::launch::{nginx_command, write_config};
use crate::compare::options::{describe, log, CompareOptions, Programs};
use crate::compare::peers::nginx_stream_module;
use crate::error::{Error, IoContext, Result};
use crate::lbproxy::LbProxy;
use crate::procs::{self, Managed};
use crate::serve::ServerSpec;

/// The frontend socket's receive buffer given to nginx: the size lb-proxy
/// asks for on its own frontend sockets, so neither drops for want of one.
const FRONTEND_RCVBUF: &str = "4m";

/// nginx's UDP session timeout here: lb-proxy's default UDP idle timeout
/// (4 minutes), so both keep every flow's session for the whole run.
const NGINX_PROXY_TIMEOUT: &str = "4m";

/// How long a started front end may take to echo its first datagram.
const ECHO_TIMEOUT: Duration = Duration::from_secs(15);

/// The three UDP echo backends.
pub(crate) struct UdpBackends {
    pub(crate) nodes: Vec<(String, SocketAddr)>,
    pub(crate) description: String,
    _served: Option<Served>,
}

/// Starts `udp-echo:node-1..3` in one `lb-bench serve`.
pub(crate) fn start_backends(dir: &Path) -> Result<UdpBackends> {
    let specs = (1..=3)
        .map(|i| format!("udp-echo:node-{i}=127.0.0.1:0").parse())
        .collect::<Result<Vec<ServerSpec>>>()?;
    let (servers, served) = serve_builtin(&specs, dir, "udp-echo-backends")?;
    let description = match served {
        Served::Process { .. } => {
            "three UDP echo servers in one `lb-bench serve` process (udp-echo, one thread)"
        }
        Served::InProcess { .. } => "three UDP echo servers on a thread of this process",
    };
    Ok(UdpBackends {
        nodes: servers.into_iter().map(|s| (s.name, s.addr)).collect(),
        description: description.to_owned(),
        _served: Some(served),
    })
}

/// A started front end: where to send, and which process to watch.
pub(crate) struct UdpRunning {
    pub(crate) frontend: UdpFrontend,
    pub(crate) addr: SocketAddr,
    /// lb-proxy's admin endpoint, for its own counts.
    pub(crate) admin: Option<SocketAddr>,
    pid: Option<u32>,
    /// nginx: sum over the master and its workers.
    tree: bool,
    _lb: Option<LbProxy>,
    _proc: Option<Managed>,
}

impl UdpRunning {
    /// The proxy's CPU seconds so far (`None` for direct).
    pub(crate) fn cpu(&self) -> Option<f64> {
        let pid = self.pid?;
        if self.tree {
            procs::cpu_secs_tree(pid)
        } else {
            procs::cpu_secs(pid)
        }
    }
}

/// A front end's state, as the report lists it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct UdpStatus {
    pub frontend: UdpFrontend,
    pub label: &'static str,
    /// `ok`, `missing` or `failed`.
    pub status: &'static str,
    pub detail: String,
}

/// Starts every front end; returns each one's status and those that run.
pub(crate) fn start_all(
    opts: &CompareOptions,
    backends: &UdpBackends,
    dir: &Path,
    programs: &Programs,
    nofile: u64,
    quiet: bool,
) -> (Vec<UdpStatus>, Vec<UdpRunning>) {
    let mut statuses = Vec::new();
    let mut running = Vec::new();
    for fe in UdpFrontend::ALL {
        let (status, detail) = match start(fe, opts, backends, dir, programs, nofile) {
            Ok(r) => {
                let d = detail(fe, &r, opts, programs);
                running.push(r);
                ("ok", d)
            }
            Err((status, detail)) => {
                log(
                    quiet,
                    &format!("compare udp: {}: {status}: {detail}", fe.label()),
                );
                (status, detail)
            }
        };
        statuses.push(UdpStatus {
            frontend: fe,
            label: fe.label(),
            status,
            detail,
        });
    }
    (statuses, running)
}

type NotRunning = (&'static str, String);

fn start(
    fe: UdpFrontend,
    opts: &CompareOptions,
    backends: &UdpBackends,
    dir: &Path,
    programs: &Programs,
    nofile: u64,
) -> std::result::Result<UdpRunning, NotRunning> {
    let failed = |e: Error| ("failed", e.to_string());
    match fe {
        UdpFrontend::Direct => Ok(UdpRunning {
            frontend: fe,
            addr: backends.nodes[0].1,
            admin: None,
            pid: None,
            tree: false,
            _lb: None,
            _proc: None,
        }),
        UdpFrontend::LbProxy | UdpFrontend::LbProxyUnbatched => {
            let bin = programs
                .lb_proxy
                .as_ref()
                .map_err(|e| ("missing", e.clone()))?;
            start_lb_proxy(fe, bin, opts, backends, dir).map_err(failed)
        }
        UdpFrontend::Nginx => {
            let bin = programs.nginx.as_ref().ok_or((
                "missing",
                "nginx is not installed (Debian: apt-get install nginx libnginx-mod-stream)"
                    .to_owned(),
            ))?;
            let module = nginx_stream_module(bin).map_err(|e| ("missing", e))?;
            start_nginx(bin, module.as_deref(), opts, backends, dir, nofile).map_err(failed)
        }
    }
}

fn start_lb_proxy(
    fe: UdpFrontend,
    bin: &Path,
    opts: &CompareOptions,
    backends: &UdpBackends,
    dir: &Path,
) -> Result<UdpRunning> {
    let batch = (fe == UdpFrontend::LbProxyUnbatched).then_some(1);
    let name = if batch.is_some() {
        "lb-proxy-udp-batch1"
    } else {
        "lb-proxy-udp"
    };
    let lb = LbProxy::run_config(
        bin,
        dir,
        name,
        &lb_udp_config(backends, opts.workers, batch),
    )?;
    let addr = lb.frontend(Some("udp"))?;
    wait_echo(addr, None)?;
    Ok(UdpRunning {
        frontend: fe,
        addr,
        admin: lb.admin,
        pid: Some(lb.pid()),
        tree: false,
        _lb: Some(lb),
        _proc: None,
    })
}

fn start_nginx(
    bin: &Path,
    module: Option<&Path>,
    opts: &CompareOptions,
    backends: &UdpBackends,
    dir: &Path,
    nofile: u64,
) -> Result<UdpRunning> {
    let addr = free_udp_addr()?;
    let conf = nginx_udp_config(addr, module, opts.workers, dir, nofile, backends);
    let path = write_config(dir, "nginx-udp.conf", &conf)?;
    let mut m = Managed::spawn(
        nginx_command(bin, &path, dir, "nginx-udp"),
        "nginx-udp",
        dir,
    )?;
    m.stop_signal = Some(libc::SIGTERM);
    wait_echo(addr, Some(&mut m))?;
    Ok(UdpRunning {
        frontend: UdpFrontend::Nginx,
        addr,
        admin: None,
        pid: Some(m.pid()),
        tree: true,
        _lb: None,
        _proc: Some(m),
    })
}

/// lb-proxy: one `udp` frontend over the three echo nodes, TCP-probed on
/// their own ports (where `udp-echo` keeps its health listener).
fn lb_udp_config(backends: &UdpBackends, workers: usize, batch: Option<usize>) -> String {
    let batch = batch
        .map(|b| format!("udp_batch = {b}\n"))
        .unwrap_or_default();
    let mut c = format!(
        "workers = {workers}\ndrain_timeout = \"1s\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[[frontends]]\nname = \"udp\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"udp\"\n{batch}\n[frontends.health]\nkind = \"tcp\"\ninterval = \"5s\"\n"
    );
    for (name, addr) in &backends.nodes {
        let _ = write!(
            c,
            "\n[[frontends.backends]]\nname = \"{name}\"\naddress = \"{addr}\"\n"
        );
    }
    c
}

/// nginx stream in UDP mode, hashing the client address and port
/// consistently (the 5-tuple hash, as for TCP). No `proxy_responses` or
/// `proxy_requests`: a session then lives per client address and port until
/// `proxy_timeout`, the same flow model as lb-proxy's.
fn nginx_udp_config(
    at: SocketAddr,
    module: Option<&Path>,
    workers: usize,
    dir: &Path,
    nofile: u64,
    backends: &UdpBackends,
) -> String {
    let load = module
        .map(|m| format!("load_module {};\n", m.display()))
        .unwrap_or_default();
    let mut upstream = String::new();
    for (_, addr) in &backends.nodes {
        let _ = writeln!(upstream, "    server {addr};");
    }
    format!(
        "{load}worker_processes {workers};\nworker_rlimit_nofile {nofile};\ndaemon off;\nmaster_process on;\npid {d}/nginx-udp.pid;\nerror_log {d}/nginx-udp.error.log warn;\nevents {{ worker_connections {wc}; }}\nstream {{\n  upstream nodes {{\n    hash $remote_addr$remote_port consistent;\n{upstream}  }}\n  server {{\n    listen {at} udp reuseport rcvbuf={FRONTEND_RCVBUF};\n    proxy_pass nodes;\n    proxy_timeout {NGINX_PROXY_TIMEOUT};\n  }}\n}}\n",
        d = dir.display(),
        wc = nofile.saturating_sub(100).max(1024),
    )
}

/// A UDP address on 127.0.0.1 that was free a moment ago.
fn free_udp_addr() -> Result<SocketAddr> {
    let s = UdpSocket::bind("127.0.0.1:0").ctx(|| "bind a UDP socket on 127.0.0.1:0".into())?;
    s.local_addr().ctx(|| "local_addr".into())
}

/// Sends a datagram every 50 ms until one comes back through `addr`; fails
/// when `m` exits first or [`ECHO_TIMEOUT`] passes.
pub(crate) fn wait_echo(addr: SocketAddr, mut m: Option<&mut Managed>) -> Result<()> {
    let s = UdpSocket::bind("127.0.0.1:0").ctx(|| "bind a UDP probe socket".into())?;
    s.connect(addr)
        .ctx(|| format!("connect a UDP probe to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_millis(50)))
        .ctx(|| "set_read_timeout".into())?;
    let deadline = Instant::now() + ECHO_TIMEOUT;
    let mut buf = [0u8; 64];
    loop {
        let _ = s.send(b"lb-bench probe");
        if matches!(s.recv(&mut buf), Ok(n) if &buf[..n] == b"lb-bench probe") {
            return Ok(());
        }
        if let Some(status) = m.as_mut().and_then(|m| m.exited()) {
            let m = m.as_ref().expect("checked above");
            return Err(Error::ExitedEarly {
                what: m.name.clone(),
                status,
                log: m.log_tail(),
            });
        }
        if Instant::now() >= deadline {
            return Err(Error::NotReady {
                what: format!("a UDP echo through {addr}"),
                secs: ECHO_TIMEOUT.as_secs(),
                log: m.map(|m| m.log_tail()).unwrap_or_default(),
            });
        }
    }
}

/// The report's line for a front end that runs.
fn detail(fe: UdpFrontend, r: &UdpRunning, opts: &CompareOptions, programs: &Programs) -> String {
    match fe {
        UdpFrontend::Direct => format!("{} (node-1)", r.addr),
        UdpFrontend::LbProxy | UdpFrontend::LbProxyUnbatched => {
            let bin = programs.lb_proxy.clone().unwrap_or_default();
            format!(
                "{}{}, protocol = udp, {}, {} worker(s)",
                bin.display(),
                if procs::is_debug_build(&bin) {
                    " — DEBUG BUILD, timings not representative"
                } else {
                    ""
                },
                if fe == UdpFrontend::LbProxy {
                    "udp_batch left at its default"
                } else {
                    "udp_batch = 1 (one recvfrom/sendto per datagram)"
                },
                opts.workers
            )
        }
        UdpFrontend::Nginx => format!(
            "{}, listen udp reuseport rcvbuf={FRONTEND_RCVBUF}, hash $remote_addr$remote_port consistent, proxy_timeout {NGINX_PROXY_TIMEOUT}, no proxy_responses/proxy_requests (one session per client address and port), {} worker(s)",
            describe(&programs.nginx, &["-v"], "nginx"),
            opts.workers
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends() -> UdpBackends {
        UdpBackends {
            nodes: vec![
                ("node-1".into(), "127.0.0.1:7001".parse().unwrap()),
                ("node-2".into(), "127.0.0.1:7002".parse().unwrap()),
            ],
            description: String::new(),
            _served: None,
        }
    }

    #[test]
    fn lb_proxy_sets_udp_batch_only_for_the_unbatched_variant() {
        let b = backends();
        let default = lb_udp_config(&b, 1, None);
        assert!(default.contains("protocol = \"udp\""), "{default}");
        assert!(!default.contains("udp_batch"), "{default}");
        assert_eq!(default.matches("[[frontends.backends]]").count(), 2);
        let one = lb_udp_config(&b, 2, Some(1));
        assert!(
            one.contains("udp_batch = 1\n") && one.contains("workers = 2"),
            "{one}"
        );
    }

    #[test]
    fn nginx_listens_udp_and_hashes_the_client_port() {
        let b = backends();
        let conf = nginx_udp_config(
            "127.0.0.1:9999".parse().unwrap(),
            None,
            1,
            Path::new("/tmp"),
            1024,
            &b,
        );
        assert!(
            conf.contains("listen 127.0.0.1:9999 udp reuseport"),
            "{conf}"
        );
        assert!(
            conf.contains("hash $remote_addr$remote_port consistent;"),
            "{conf}"
        );
        assert!(conf.contains("server 127.0.0.1:7002;"), "{conf}");
        assert!(!conf.contains("proxy_responses"), "{conf}");
    }
}
