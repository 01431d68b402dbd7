//! What `lb-bench compare` is asked to do ([`CompareOptions`]), and the
//! programs it found to do it with ([`Programs`]): the peers it runs and the
//! load tools it drives, each described for the report.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::results::Frontend;
use crate::load::udp::{DEFAULT_FLOWS, DEFAULT_WINDOW, MAX_BATCH, MAX_SIZE, MIN_SIZE};
use crate::procs;

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
    /// lb-proxy's `accept` mode for the HTTP front end (`reuseport` or
    /// `shared`); `None` leaves lb-proxy's default.
    pub accept: Option<String>,
    pub concurrency: usize,
    /// Per keep-alive and per new-connection measurement.
    pub duration: Duration,
    /// Per bulk measurement.
    pub bulk_duration: Duration,
    /// Idle connections for the memory measurement (capped by the fd limit).
    pub idle_connections: usize,
    /// What `compare --proto udp` sends (`report` runs it too).
    pub udp: UdpOptions,
    /// Concurrent clients of `compare --proto quic`, each making one new
    /// connection (one handshake) after another.
    pub quic_clients: usize,
}

/// The UDP comparison's load: datagram sizes, flows, window, generator threads.
#[derive(Clone, Debug)]
pub struct UdpOptions {
    /// Payload sizes, each measured at every front end in every round.
    pub sizes: Vec<usize>,
    pub flows: usize,
    /// Datagrams in flight per flow.
    pub window: usize,
    /// Generator threads.
    pub threads: usize,
}

impl UdpOptions {
    /// Why these options cannot run, if they cannot.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.sizes.is_empty() {
            return Err("no datagram size".into());
        }
        if let Some(s) = self
            .sizes
            .iter()
            .find(|s| !(MIN_SIZE..=MAX_SIZE).contains(*s))
        {
            return Err(format!("size {s} is outside {MIN_SIZE}..={MAX_SIZE}"));
        }
        if !(1..=MAX_BATCH).contains(&self.window) {
            return Err(format!("window {} is outside 1..={MAX_BATCH}", self.window));
        }
        if self.flows == 0 || self.threads == 0 {
            return Err("flows and generator threads must be at least 1".into());
        }
        Ok(())
    }
}

/// The two payload sizes: a small datagram (per-packet cost) and
/// one near the usual QUIC maximum (per-byte cost).
pub const UDP_SIZES: [usize; 2] = [64, 1200];

/// QUIC clients by default: a few concurrent handshakes, as the issue asks.
pub const QUIC_CLIENTS: usize = 4;

impl CompareOptions {
    /// Full budgets (`quick = false`) or tiny ones for CI.
    pub fn new(quick: bool) -> CompareOptions {
        CompareOptions {
            rounds: if quick { 1 } else { 3 },
            quick,
            out_dir: PathBuf::from("bench-out"),
            frontends: Frontend::DEFAULT.to_vec(),
            lb_proxy: None,
            haproxy: None,
            nginx: None,
            hey: None,
            wrk: None,
            iperf3: None,
            builtin_backends: false,
            workers: 1,
            accept: None,
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
            udp: UdpOptions {
                sizes: UDP_SIZES.to_vec(),
                flows: if quick { 8 } else { DEFAULT_FLOWS },
                window: DEFAULT_WINDOW,
                threads: 1,
            },
            quic_clients: QUIC_CLIENTS,
        }
    }
}

/// The programs a run uses: each found at the path given or on PATH.
pub(crate) struct Programs {
    /// Why not, when lb-proxy cannot be found.
    pub(crate) lb_proxy: std::result::Result<PathBuf, String>,
    pub(crate) haproxy: Option<PathBuf>,
    pub(crate) nginx: Option<PathBuf>,
    pub(crate) hey: Option<PathBuf>,
    pub(crate) wrk: Option<PathBuf>,
    pub(crate) iperf3: Option<PathBuf>,
}

impl Programs {
    pub(crate) fn find(opts: &CompareOptions) -> Programs {
        Programs {
            lb_proxy: procs::lb_proxy_bin(opts.lb_proxy.as_deref()).map_err(|e| e.to_string()),
            haproxy: procs::find_program("haproxy", opts.haproxy.as_deref()),
            nginx: procs::find_program("nginx", opts.nginx.as_deref()),
            hey: procs::find_program("hey", opts.hey.as_deref()),
            wrk: procs::find_program("wrk", opts.wrk.as_deref()),
            iperf3: procs::find_program("iperf3", opts.iperf3.as_deref()),
        }
    }

    /// The load tools, as the report lists them: name and what ran.
    pub(crate) fn load_tools(&self) -> Vec<(String, String)> {
        vec![
            (
                "lb-bench".to_owned(),
                format!(
                    "{} (this binary)",
                    std::env::current_exe()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                ),
            ),
            ("hey".to_owned(), describe(&self.hey, &[], "hey")),
            ("wrk".to_owned(), describe(&self.wrk, &["-v"], "wrk")),
            (
                "iperf3".to_owned(),
                describe(&self.iperf3, &["--version"], "iperf3"),
            ),
        ]
    }

    /// The HTTP load tools that will run: lb-bench's own, then hey and wrk when found.
    pub(crate) fn http_tools(&self) -> Vec<(&'static str, Option<&Path>)> {
        let mut t = vec![("lb-bench", None)];
        if let Some(h) = &self.hey {
            t.push(("hey", Some(h.as_path())));
        }
        if let Some(w) = &self.wrk {
            t.push(("wrk", Some(w.as_path())));
        }
        t
    }

    /// The bulk tool: iperf3 when found, else the built-in sink.
    pub(crate) fn bulk_tool(&self) -> &'static str {
        if self.iperf3.is_some() {
            "iperf3"
        } else {
            "built-in sink"
        }
    }
}

/// A program's path and version line, or why it is missing.
pub(crate) fn describe(bin: &Option<PathBuf>, version_args: &[&str], name: &str) -> String {
    match bin {
        Some(p) if version_args.is_empty() => p.display().to_string(),
        Some(p) => match procs::version_line(p, version_args) {
            Some(v) => format!("{} ({v})", p.display()),
            None => p.display().to_string(),
        },
        None => format!("missing ({name} not installed)"),
    }
}

/// A progress line on stderr, unless `quiet`.
pub(crate) fn log(quiet: bool, msg: &str) {
    if !quiet {
        eprintln!("{msg}");
    }
}
