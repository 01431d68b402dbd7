//! The front ends `compare` measures and how each is set up: the config each
//! peer gets (lb-proxy's TOML, HAProxy's `mode tcp`, nginx's `stream`), how
//! it is started in front of the shared backends, and the line that
//! describes it in the report. One that cannot start is `missing` (not
//! installed) or `failed` (installed, would not run), never dropped.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::backends::Backends;
use super::launch::{nginx_command, start_listening, write_config};
use super::options::{describe, log, CompareOptions, Programs};
use super::results::{Frontend, FrontendStatus};
use crate::error::{Error, Result};
use crate::lbproxy::LbProxy;
use crate::net;
use crate::procs::{self, Managed};

/// A started front end: where to send load, and which process to watch.
pub(crate) struct Running {
    pub(crate) frontend: Frontend,
    pub(crate) http: SocketAddr,
    pub(crate) bulk: SocketAddr,
    /// The process to read CPU and memory from (none for direct).
    pub(crate) pid: Option<u32>,
    /// nginx: sum over the master and its workers.
    pub(crate) tree: bool,
    _lb: Option<LbProxy>,
    _proc: Option<Managed>,
}

impl Running {
    /// A peer process that `compare` configured, listening `at`.
    fn peer(frontend: Frontend, at: &Listen, m: Managed, tree: bool) -> Running {
        Running {
            frontend,
            http: at.http,
            bulk: at.bulk,
            pid: Some(m.pid()),
            tree,
            _lb: None,
            _proc: Some(m),
        }
    }
}

/// Why a front end is not running: `missing` or `failed`, and the detail.
type NotRunning = (&'static str, String);

fn failed(e: Error) -> NotRunning {
    ("failed", e.to_string())
}

/// The peer's program, or `missing` when it was not found.
fn installed<'a>(
    bin: &'a Option<PathBuf>,
    name: &str,
) -> std::result::Result<&'a PathBuf, NotRunning> {
    bin.as_ref().ok_or((
        "missing",
        format!("{name} is not installed (or --{name} names no file)"),
    ))
}

/// Where a peer started by `compare` (not lb-proxy) listens.
struct Listen {
    http: SocketAddr,
    bulk: SocketAddr,
}

impl Listen {
    fn free() -> Result<Listen> {
        let port = || net::free_port(Ipv4Addr::LOCALHOST).map(|p| (Ipv4Addr::LOCALHOST, p).into());
        Ok(Listen {
            http: port()?,
            bulk: port()?,
        })
    }
}

/// Starts every front end of `opts` in order; returns each one's status and
/// the ones that run.
pub(crate) fn start_all(
    opts: &CompareOptions,
    backends: &Backends,
    dir: &Path,
    programs: &Programs,
    nofile: u64,
    quiet: bool,
) -> (Vec<FrontendStatus>, Vec<Running>) {
    let mut statuses = Vec::new();
    let mut running = Vec::new();
    for &fe in &opts.frontends {
        let (status, detail) = match start_frontend(fe, opts, backends, dir, programs, nofile) {
            Ok(r) => {
                let detail = detail(fe, &r, opts, programs);
                running.push(r);
                ("ok", detail)
            }
            Err((status, detail)) => {
                log(
                    quiet,
                    &format!("compare: {}: {status}: {detail}", fe.label()),
                );
                (status, detail)
            }
        };
        statuses.push(FrontendStatus {
            frontend: fe,
            label: fe.label(),
            status,
            detail,
        });
    }
    (statuses, running)
}

fn start_frontend(
    fe: Frontend,
    opts: &CompareOptions,
    backends: &Backends,
    dir: &Path,
    programs: &Programs,
    nofile: u64,
) -> std::result::Result<Running, NotRunning> {
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
        Frontend::LbProxy
        | Frontend::LbProxyUserspace
        | Frontend::LbProxySplice
        | Frontend::LbProxySockmap
        | Frontend::LbProxyNoHalfClose
        | Frontend::LbProxyIoUring
        | Frontend::LbProxyIoUringNoHalfClose => {
            let bin = programs
                .lb_proxy
                .as_ref()
                .map_err(|e| ("missing", e.clone()))?;
            start_lb_proxy(fe, bin, opts, backends, dir).map_err(failed)
        }
        Frontend::Haproxy => {
            let bin = installed(&programs.haproxy, "haproxy")?;
            start_haproxy(bin, opts, backends, dir, nofile).map_err(failed)
        }
        Frontend::NginxStream | Frontend::NginxHalfClose => {
            let bin = installed(&programs.nginx, "nginx")?;
            let module = nginx_stream_module(bin).map_err(|e| ("missing", e))?;
            let nginx = Nginx { bin, module, fe };
            start_nginx_stream(nginx, opts, backends, dir, nofile).map_err(failed)
        }
    }
}

fn start_lb_proxy(
    fe: Frontend,
    bin: &Path,
    opts: &CompareOptions,
    backends: &Backends,
    dir: &Path,
) -> Result<Running> {
    let copy = fe.lb_copy().unwrap_or("auto");
    let config = lb_config(
        backends,
        opts.workers,
        LbSetup {
            copy,
            engine: fe.lb_engine(),
            half_close: fe.half_close(),
            accept: opts.accept.as_deref(),
        },
    );
    let name = format!(
        "lb-proxy-{}{}",
        fe.lb_engine().unwrap_or(copy),
        if fe.half_close() {
            ""
        } else {
            "-no-half-close"
        }
    );
    let lb = LbProxy::run_config(bin, dir, &name, &config)?;
    // Without its engine the frontend runs as the default one: that column
    // would repeat lb-proxy's figures under another name.
    if fe == Frontend::LbProxySockmap {
        engine_running(
            &lb,
            "lb_sockmap_available",
            "sockmap engine",
            "needs root and a kernel with sockmap",
        )?;
    }
    if fe.lb_engine() == Some("io-uring") {
        engine_running(
            &lb,
            "lb_io_uring_available",
            "io_uring engine",
            "io_uring refused here",
        )?;
    }
    Ok(Running {
        frontend: fe,
        http: lb.frontend(Some("http"))?,
        bulk: lb.frontend(Some("bulk"))?,
        pid: Some(lb.pid()),
        tree: false,
        _lb: Some(lb),
        _proc: None,
    })
}

/// Whether one of lb-proxy's engines runs (its gauge `metric` reads 1);
/// the error names the engine and says why it may not.
fn engine_running(lb: &LbProxy, metric: &str, engine: &str, hint: &str) -> Result<()> {
    let unavailable = |detail: String| Error::Protocol {
        what: format!("lb-proxy's {engine}"),
        detail,
    };
    let admin = lb
        .admin
        .ok_or_else(|| unavailable("no admin endpoint".into()))?;
    let text = crate::lbproxy::metrics(admin)?;
    if text.lines().any(|l| l == format!("{metric} 1")) {
        Ok(())
    } else {
        Err(unavailable(format!(
            "unavailable ({hint}); its log: {}",
            lb.process.log_tail()
        )))
    }
}

fn start_haproxy(
    bin: &Path,
    opts: &CompareOptions,
    backends: &Backends,
    dir: &Path,
    nofile: u64,
) -> Result<Running> {
    let at = Listen::free()?;
    let maxconn = (nofile.saturating_sub(200) / 2).max(256);
    let path = write_config(
        dir,
        "haproxy.cfg",
        &haproxy_config(&at, opts.workers, maxconn, backends),
    )?;
    let mut cmd = Command::new(bin);
    cmd.arg("-f").arg(&path).arg("-db");
    let m = start_listening(cmd, "haproxy", dir, &[at.http, at.bulk], false)?;
    Ok(Running::peer(Frontend::Haproxy, &at, m, false))
}

/// An nginx with the stream module, run as front end `fe`.
struct Nginx<'a> {
    bin: &'a Path,
    module: Option<PathBuf>,
    fe: Frontend,
}

fn start_nginx_stream(
    nginx: Nginx<'_>,
    opts: &CompareOptions,
    backends: &Backends,
    dir: &Path,
    nofile: u64,
) -> Result<Running> {
    let at = Listen::free()?;
    let name = if nginx.fe.half_close() {
        "nginx-stream-half-close"
    } else {
        "nginx-stream"
    };
    let stream = NginxStream {
        module: nginx.module.as_deref(),
        workers: opts.workers,
        half_close: nginx.fe.half_close(),
        name,
    };
    let conf = nginx_stream_config(&at, &stream, dir, nofile, backends);
    let path = write_config(dir, &format!("{name}.conf"), &conf)?;
    let cmd = nginx_command(nginx.bin, &path, dir, name);
    let m = start_listening(cmd, name, dir, &[at.http, at.bulk], true)?;
    Ok(Running::peer(nginx.fe, &at, m, true))
}

/// What an nginx stream config varies by.
struct NginxStream<'a> {
    module: Option<&'a Path>,
    workers: usize,
    /// `proxy_half_close on` (nginx's default is off).
    half_close: bool,
    /// Names its pid and error log files.
    name: &'a str,
}

/// lb-proxy: an `http` front end over the nodes and a `bulk` one over the sink.
/// How an lb-proxy front end is set up.
struct LbSetup<'a> {
    copy: &'a str,
    /// `engine`, where not tokio.
    engine: Option<&'a str>,
    half_close: bool,
    accept: Option<&'a str>,
}

fn lb_config(backends: &Backends, workers: usize, setup: LbSetup<'_>) -> String {
    // Both front ends get the engine, the copy and the half-close setting.
    let LbSetup {
        copy,
        engine,
        half_close,
        accept,
    } = setup;
    // The ring has no copy modes: it is named by its engine instead. The
    // others name tokio, which is not the default where io_uring is permitted.
    let engine_or_copy = match engine {
        Some(engine) => format!("engine = \"{engine}\"\n"),
        None => format!("engine = \"tokio\"\ncopy = \"{copy}\"\n"),
    };
    let half_close = if half_close {
        ""
    } else {
        "half_close = false\n"
    };
    let copy = format!("{engine_or_copy}{half_close}");
    let accept = accept
        .map(|a| format!("accept = \"{a}\"\n"))
        .unwrap_or_default();
    let mut c = format!(
        "workers = {workers}\ndrain_timeout = \"1s\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[[frontends]]\nname = \"http\"\nlisten = \"127.0.0.1:0\"\n{copy}{accept}\n[frontends.health]\nkind = \"tcp\"\ninterval = \"5s\"\n"
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

/// HAProxy in `mode tcp`, hashing the source port consistently.
fn haproxy_config(at: &Listen, workers: usize, maxconn: u64, backends: &Backends) -> String {
    let (p_http, p_bulk) = (at.http.port(), at.bulk.port());
    let mut cfg = format!(
        "global\n  nbthread {workers}\n  maxconn {maxconn}\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 300s\n  timeout server 300s\nfrontend http\n  bind 127.0.0.1:{p_http}\n  default_backend nodes\nbackend nodes\n  # Every client is on 127.0.0.1, so hashing the source port is the 5-tuple hash here.\n  balance hash src_port\n  hash-type consistent\n"
    );
    for (name, addr) in &backends.nodes {
        let _ = writeln!(cfg, "  server {name} {addr}");
    }
    let _ = write!(
        cfg,
        "frontend bulk\n  bind 127.0.0.1:{p_bulk}\n  default_backend bulk\nbackend bulk\n  server bulk {}\n",
        backends.bulk
    );
    cfg
}

/// nginx `stream`, hashing the client address and port consistently.
fn nginx_stream_config(
    at: &Listen,
    stream: &NginxStream<'_>,
    dir: &Path,
    nofile: u64,
    backends: &Backends,
) -> String {
    let (p_http, p_bulk) = (at.http.port(), at.bulk.port());
    let (workers, name) = (stream.workers, stream.name);
    let load = stream
        .module
        .map(|m| format!("load_module {};\n", m.display()))
        .unwrap_or_default();
    let half = if stream.half_close {
        " proxy_half_close on;"
    } else {
        ""
    };
    let mut upstream = String::new();
    for (_, addr) in &backends.nodes {
        let _ = writeln!(upstream, "    server {addr};");
    }
    format!(
        "{load}worker_processes {workers};\nworker_rlimit_nofile {nofile};\ndaemon off;\nmaster_process on;\npid {d}/{name}.pid;\nerror_log {d}/{name}.error.log warn;\nevents {{ worker_connections {wc}; }}\nstream {{\n  upstream nodes {{\n    hash $remote_addr$remote_port consistent;\n{upstream}  }}\n  upstream bulk {{ server {bulk}; }}\n  server {{ listen 127.0.0.1:{p_http}; proxy_pass nodes;{half} }}\n  server {{ listen 127.0.0.1:{p_bulk}; proxy_pass bulk;{half} }}\n}}\n",
        d = dir.display(),
        wc = nofile.saturating_sub(100).max(1024),
        bulk = backends.bulk,
    )
}

/// Whether this nginx has the stream module: built in (`None`), as a
/// loadable module (its path), or not at all (why).
pub(crate) fn nginx_stream_module(nginx: &Path) -> std::result::Result<Option<PathBuf>, String> {
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

/// The report's line for a front end that runs: what it is and how it is set up.
fn detail(fe: Frontend, r: &Running, opts: &CompareOptions, programs: &Programs) -> String {
    match fe {
        Frontend::Direct => format!("{} (node-1)", r.http),
        Frontend::LbProxy
        | Frontend::LbProxyUserspace
        | Frontend::LbProxySplice
        | Frontend::LbProxySockmap
        | Frontend::LbProxyNoHalfClose
        | Frontend::LbProxyIoUring
        | Frontend::LbProxyIoUringNoHalfClose => {
            let bin = programs.lb_proxy.clone().unwrap_or_default();
            format!(
                "{}{}, {}{}{}, {} worker(s)",
                bin.display(),
                if procs::is_debug_build(&bin) {
                    " — DEBUG BUILD, timings not representative"
                } else {
                    ""
                },
                fe.lb_engine().map_or_else(
                    || format!("engine = tokio, copy = {}", fe.lb_copy().unwrap_or("auto")),
                    |e| format!("engine = {e}")
                ),
                if fe.half_close() {
                    ""
                } else {
                    ", half_close = false"
                },
                opts.accept
                    .as_deref()
                    .map(|a| format!(", accept = {a}"))
                    .unwrap_or_default(),
                opts.workers
            )
        }
        Frontend::Haproxy => format!(
            "{}, mode tcp, balance hash src_port, hash-type consistent, nbthread {}",
            describe(&programs.haproxy, &["-v"], fe.label()),
            opts.workers
        ),
        Frontend::NginxStream | Frontend::NginxHalfClose => format!(
            "{}, hash $remote_addr$remote_port consistent{}, {} worker(s)",
            describe(&programs.nginx, &["-v"], fe.label()),
            if fe.half_close() {
                ", proxy_half_close on"
            } else {
                ""
            },
            opts.workers
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lb_proxy_configs_set_accept_only_when_asked() {
        let backends = Backends::for_test(
            vec![("node-1".into(), "127.0.0.1:1".parse().unwrap())],
            "127.0.0.1:2".parse().unwrap(),
        );
        let setup = |copy, engine, half_close, accept| LbSetup {
            copy,
            engine,
            half_close,
            accept,
        };
        let plain = lb_config(&backends, 1, setup("splice", None, true, None));
        assert!(!plain.contains("accept"), "{plain}");
        assert!(!plain.contains("half_close"), "{plain}");
        assert_eq!(plain.matches("engine = \"tokio\"").count(), 2, "{plain}");
        assert_eq!(plain.matches("copy = \"splice\"").count(), 2, "{plain}");
        let shared = lb_config(&backends, 2, setup("auto", None, true, Some("shared")));
        assert_eq!(shared.matches("accept = \"shared\"").count(), 1, "{shared}");
        let no_half_close = lb_config(&backends, 1, setup("auto", None, false, None));
        assert_eq!(no_half_close.matches("half_close = false").count(), 2);
        let ring = lb_config(&backends, 1, setup("auto", Some("io-uring"), true, None));
        assert_eq!(ring.matches("engine = \"io-uring\"").count(), 2, "{ring}");
        assert!(!ring.contains("copy"), "{ring}");
        // The front end that asks for the ring without half-close gets both.
        let fe = Frontend::parse("lb-proxy-io-uring-no-half-close").unwrap();
        let ring_nohc = lb_config(
            &backends,
            1,
            setup(fe.lb_copy().unwrap(), fe.lb_engine(), fe.half_close(), None),
        );
        assert_eq!(ring_nohc.matches("engine = \"io-uring\"").count(), 2);
        assert_eq!(ring_nohc.matches("half_close = false").count(), 2);
    }

    /// nginx's half-close is off unless the front end asks for it, and each
    /// variant has its own pid and log files.
    #[test]
    fn nginx_configs_turn_half_close_on_only_for_that_front_end() {
        let backends = Backends::for_test(
            vec![("node-1".into(), "127.0.0.1:1".parse().unwrap())],
            "127.0.0.1:2".parse().unwrap(),
        );
        let at = Listen::free().unwrap();
        let config = |half_close, name| {
            let stream = NginxStream {
                module: None,
                workers: 1,
                half_close,
                name,
            };
            nginx_stream_config(&at, &stream, Path::new("/tmp/x"), 4096, &backends)
        };
        let plain = config(false, "nginx-stream");
        assert!(!plain.contains("proxy_half_close"), "{plain}");
        assert!(plain.contains("/tmp/x/nginx-stream.pid"), "{plain}");
        let half = config(true, "nginx-stream-half-close");
        assert_eq!(half.matches("proxy_half_close on;").count(), 2, "{half}");
        assert!(
            half.contains("/tmp/x/nginx-stream-half-close.pid"),
            "{half}"
        );
    }
}
