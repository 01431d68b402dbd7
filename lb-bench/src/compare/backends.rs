//! The backends every front end of `compare` shares: three HTTP nodes (nginx
//! when installed, else lb-bench's built-in servers) and one bulk sink
//! (`iperf3 -s`, else a built-in sink). Also `lb-bench serve`, the child
//! process the built-in servers run in.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::launch::{nginx_command, start_listening, write_config};
use super::options::{log, CompareOptions};
use crate::error::Result;
use crate::net;
use crate::procs::Managed;
use crate::serve::{parse_serve_ready, InProcess, Kind, ServerSpec};

/// The backends: three HTTP nodes and one bulk sink.
pub(crate) struct Backends {
    pub(crate) nodes: Vec<(String, SocketAddr)>,
    pub(crate) bulk: SocketAddr,
    pub(crate) description: String,
    _procs: Vec<Managed>,
    _in_process: Option<InProcess>,
}

#[cfg(test)]
impl Backends {
    /// Backends that are only addresses, for config tests.
    pub(crate) fn for_test(nodes: Vec<(String, SocketAddr)>, bulk: SocketAddr) -> Backends {
        Backends {
            nodes,
            bulk,
            description: String::new(),
            _procs: Vec::new(),
            _in_process: None,
        }
    }
}

/// The backends while they start: the nodes so far and what keeps them running.
#[derive(Default)]
struct Starting {
    nodes: Vec<(String, SocketAddr)>,
    description: String,
    procs: Vec<Managed>,
    in_process: Option<InProcess>,
}

/// Starts the backends; when nginx (or iperf3) will not start, says so and
/// carries on with the built-in ones.
pub(crate) fn start_or_builtin(
    opts: &CompareOptions,
    dir: &Path,
    nginx: Option<&Path>,
    iperf3: Option<&Path>,
    nofile: u64,
    quiet: bool,
) -> Result<Backends> {
    match start_backends(opts, dir, nginx, iperf3, nofile) {
        Ok(b) => Ok(b),
        Err(e) if !opts.builtin_backends => {
            log(quiet, &format!("compare: {e}; using the built-in backends"));
            let builtin = CompareOptions {
                builtin_backends: true,
                ..opts.clone()
            };
            start_backends(&builtin, dir, None, None, nofile)
        }
        Err(e) => Err(e),
    }
}

/// Starts the three nodes (nginx unless `builtin_backends` or missing) and
/// the bulk sink (iperf3 when given, else built in).
pub(crate) fn start_backends(
    opts: &CompareOptions,
    dir: &Path,
    nginx: Option<&Path>,
    iperf3: Option<&Path>,
    nofile: u64,
) -> Result<Backends> {
    let mut b = Starting::default();
    let builtin_nodes = match nginx.filter(|_| !opts.builtin_backends) {
        Some(nginx) => {
            b.start_nginx_nodes(nginx, dir, nofile)?;
            false
        }
        None => {
            b.description
                .push_str("three built-in HTTP servers (lb-bench serve, one thread)");
            true
        }
    };
    let bulk = match iperf3.filter(|_| !builtin_nodes) {
        Some(iperf3) => {
            let bulk = b.start_iperf3_server(iperf3, dir)?;
            b.description
                .push_str(&format!("; bulk: iperf3 -s ({})", iperf3.display()));
            bulk
        }
        // Built-in nodes run in one `lb-bench serve`; the sink joins them there.
        None => {
            let bulk = b.start_builtin(builtin_nodes, dir)?;
            b.description.push_str("; bulk: built-in TCP sink");
            bulk
        }
    };
    Ok(Backends {
        nodes: b.nodes,
        bulk,
        description: b.description,
        _procs: b.procs,
        _in_process: b.in_process,
    })
}

impl Starting {
    /// Three nginx HTTP servers, one worker, each naming itself in `X-Node`.
    fn start_nginx_nodes(&mut self, nginx: &Path, dir: &Path, nofile: u64) -> Result<()> {
        let ports: Vec<u16> = (0..3)
            .map(|_| net::free_port(Ipv4Addr::LOCALHOST))
            .collect::<Result<_>>()?;
        for (i, p) in ports.iter().enumerate() {
            self.nodes.push((
                format!("node-{}", i + 1),
                SocketAddr::from((Ipv4Addr::LOCALHOST, *p)),
            ));
        }
        let conf = nginx_backends_config(&ports, dir, nofile);
        let path = write_config(dir, "nginx-backends.conf", &conf)?;
        let cmd = nginx_command(nginx, &path, dir, "nginx-backends");
        let addrs: Vec<SocketAddr> = self.nodes.iter().map(|n| n.1).collect();
        let m = start_listening(cmd, "nginx-backends", dir, &addrs, true)?;
        self.procs.push(m);
        self.description.push_str(&format!(
            "three nginx HTTP servers ({}), one worker",
            nginx.display()
        ));
        Ok(())
    }

    /// The built-in servers: the three nodes when `with_nodes`, and the bulk
    /// sink, whose address it returns. In an `lb-bench serve` child when this
    /// executable is lb-bench, else in this process.
    fn start_builtin(&mut self, with_nodes: bool, dir: &Path) -> Result<SocketAddr> {
        let mut specs: Vec<ServerSpec> = Vec::new();
        if with_nodes {
            for i in 1..=3 {
                specs.push(format!("http:node-{i}=127.0.0.1:0").parse()?);
            }
        }
        specs.push("sink:bulk=127.0.0.1:0".parse()?);
        let servers = match start_serve_process(&specs, dir, "lb-bench-serve")? {
            Some((m, servers)) => {
                self.procs.push(m);
                servers
            }
            None => {
                let ip = InProcess::start(&specs)?;
                let servers = ip.servers.clone();
                self.in_process = Some(ip);
                servers
            }
        };
        for s in servers.iter().filter(|s| s.kind == Kind::Http) {
            self.nodes.push((s.name.clone(), s.addr));
        }
        Ok(servers
            .iter()
            .find(|s| s.kind == Kind::Sink)
            .map(|s| s.addr)
            .expect("the sink was asked for"))
    }

    /// `iperf3 -s` on a free port; returns its address.
    fn start_iperf3_server(&mut self, iperf3: &Path, dir: &Path) -> Result<SocketAddr> {
        let port = net::free_port(Ipv4Addr::LOCALHOST)?;
        let bulk = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut cmd = Command::new(iperf3);
        cmd.args(["-s", "-B", "127.0.0.1", "-p", &port.to_string()]);
        let m = start_listening(cmd, "iperf3-server", dir, &[bulk], false)?;
        self.procs.push(m);
        Ok(bulk)
    }
}

/// nginx as three HTTP servers on `ports` answering `node-N`, with keep-alive
/// limits far above any run's.
fn nginx_backends_config(ports: &[u16], dir: &Path, nofile: u64) -> String {
    let mut servers = String::new();
    for (i, p) in ports.iter().enumerate() {
        let _ = writeln!(
            servers,
            "  server {{ listen 127.0.0.1:{p} reuseport; location / {{ add_header X-Node node-{n}; return 200 \"node-{n}\\n\"; }} }}",
            n = i + 1
        );
    }
    format!(
        "worker_processes 1;\nworker_rlimit_nofile {nofile};\ndaemon off;\nmaster_process on;\npid {d}/nginx-backends.pid;\nerror_log {d}/nginx-backends.error.log warn;\nevents {{ worker_connections {wc}; }}\nhttp {{\n  access_log off;\n  keepalive_requests 1000000;\n  keepalive_timeout 300s;\n  client_header_timeout 300s;\n{servers}}}\n",
        d = dir.display(),
        wc = nofile.saturating_sub(100).max(1024),
    )
}

/// `lb-bench serve ...` as a child process named `name` (its log and ready
/// file are named after it), when this executable is lb-bench.
pub(crate) fn start_serve_process(
    specs: &[ServerSpec],
    dir: &Path,
    name: &str,
) -> Result<Option<(Managed, Vec<ServerSpec>)>> {
    let Ok(exe) = std::env::current_exe() else {
        return Ok(None);
    };
    if exe.file_name().and_then(|n| n.to_str()) != Some("lb-bench") {
        return Ok(None);
    }
    let ready = dir.join(format!("{name}.ready.json"));
    let mut cmd = Command::new(exe);
    cmd.arg("serve");
    for s in specs {
        cmd.arg(s.to_string());
    }
    cmd.arg("--ready-file").arg(&ready);
    let mut m = Managed::spawn(cmd, name, dir)?;
    let text = m.wait_file(&ready, Duration::from_secs(15))?;
    let servers = parse_serve_ready(&text, specs)?;
    Ok(Some((m, servers)))
}

/// Built-in servers that stay up while this value lives: an `lb-bench
/// serve` child when possible (so their CPU is not this process's), else a
/// thread of this process.
pub(crate) enum Served {
    /// Held for its drop, which kills the child.
    Process { _child: Managed },
    /// Held for its drop, which stops the thread.
    InProcess { _servers: InProcess },
}

/// Starts `specs` as [`Served`]; returns them with their bound addresses.
pub(crate) fn serve_builtin(
    specs: &[ServerSpec],
    dir: &Path,
    name: &str,
) -> Result<(Vec<ServerSpec>, Served)> {
    Ok(match start_serve_process(specs, dir, name)? {
        Some((m, servers)) => (servers, Served::Process { _child: m }),
        None => {
            let ip = InProcess::start(specs)?;
            (ip.servers.clone(), Served::InProcess { _servers: ip })
        }
    })
}
