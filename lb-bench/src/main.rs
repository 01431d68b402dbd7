//! The `lb-bench` binary: `load`, `experiment seed`, `experiment
//! quic-migration`, `experiment zones`, `compare`, `metrics-cost`, `hop-cost`, `report`,
//! `soak`, `quic-client` (and the hidden `serve`, the built-in backends it starts for
//! itself and the tests start).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use lb_bench::compare::{self, CompareOptions, Frontend};
use lb_bench::costs;
use lb_bench::experiment::{self, MigrationOptions, SeedOptions, ZonesOptions};
use lb_bench::load::{self, LoadSpec};
use lb_bench::net::{SourceRange, Target};
use lb_bench::report::Section;
use lb_bench::serve::ServerSpec;

#[derive(Parser)]
#[command(
    name = "lb-bench",
    version,
    about = "Load generator and benchmarks for lb-proxy: many source addresses, per-backend counts, balancers side by side"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// HTTP/1.1 or raw TCP load, reported in hey's layout (or JSON) with the per-backend distribution.
    Load(LoadArgs),
    /// Replay an experiment against lb-proxy.
    Experiment {
        #[command(subcommand)]
        which: ExperimentCmd,
    },
    /// Direct vs lb-proxy vs HAProxy vs nginx stream, interleaved over rounds; writes Markdown and SVG.
    /// `--proto udp`: datagrams/s, loss and CPU per datagram vs nginx stream udp; `--proto quic`: handshakes/s.
    Compare(CompareArgs),
    /// The round-by-round table over several compare runs' rounds (their compare.json files), taken
    /// together; each ratio stays paired within its own round. For runs of the same builds on one machine.
    Pool {
        #[arg(required = true, value_name = "COMPARE_JSON")]
        runs: Vec<PathBuf>,
    },
    /// /metrics scrape time with 100 backends under load, and keep-alive req/s with byte metrics on vs off.
    MetricsCost(CostArgs),
    /// Keep-alive and new-connection req/s through plain backends vs the hop model with SNAT.
    HopCost(CostArgs),
    /// Run compare (TCP, UDP, QUIC), the metrics-cost figures and the seed experiment; write BENCHMARKS.md.
    Report(ReportArgs),
    /// Minutes of mixed load with reloads and a flapping backend; PASS when lb-proxy's memory, fds and active connections come back flat.
    Soak(SoakArgs),
    /// One QUIC request (lb-echo) to ADDR, printed; with --migrate, rebind to a new port and ask again.
    QuicClient(QuicClientArgs),
    /// Built-in backends (used by compare and the tests): KIND:NAME=ADDR with KIND http, echo,
    /// sink or udp-echo, or quic:NAME=ADDR,sid=HEX[,config=N][,nonce=N]. The UDP kinds also
    /// answer HTTP on TCP at the same port (their health check).
    #[command(hide = true)]
    Serve {
        #[arg(required = true)]
        servers: Vec<String>,
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ExperimentCmd {
    /// The seed article: keep-alive, -disable-keepalive, session affinity, the hop model.
    Seed(SeedArgs),
    /// A QUIC client migrates mid-connection behind a plain UDP and a QUIC-LB frontend.
    QuicMigration(MigrationArgs),
    /// Availability zones: the share of flows that cross zones and their latency under
    /// Cluster, Local and PreferSameZone, on a three-zone lab (config/aks-zones.toml).
    Zones(ZonesArgs),
}

#[derive(Args)]
struct ZonesArgs {
    /// The lb-proxy binary (default: next to lb-bench).
    #[arg(long)]
    lb_proxy: Option<PathBuf>,
    /// Flows per case: requests, each on a new connection.
    #[arg(short = 'n', long, default_value_t = 300)]
    flows: u64,
    /// Concurrent workers.
    #[arg(short = 'c', long, default_value_t = 10)]
    concurrency: usize,
    /// The round trip a cross-zone hop adds (the lab's cross_zone_rtt).
    #[arg(long, default_value = "2ms", value_parser = humantime::parse_duration)]
    cross_zone_rtt: Duration,
    /// Where the latency chart (SVG) goes.
    #[arg(long, default_value = "docs/bench/zones.svg")]
    svg: PathBuf,
    /// Write no chart.
    #[arg(long)]
    no_svg: bool,
    /// Print the verdicts as JSON after the text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct MigrationArgs {
    /// The lb-proxy binary (default: next to lb-bench).
    #[arg(long)]
    lb_proxy: Option<PathBuf>,
    /// How long a connect or a request may take before its step fails (e.g. 3s).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Print the verdicts as JSON after the text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SoakArgs {
    /// How long the soak runs, after the warm-up.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// The same load before the start sample, so lazily made buffers exist.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// The lb-proxy binary (default: next to lb-bench; build it with --release).
    #[arg(long)]
    lb_proxy: Option<PathBuf>,
    /// Rewrite the config (node-1's weight alternating) and SIGHUP this often.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    reload_every: Duration,
    /// SIGKILL node-3 this often; it is restarted half a period later.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    flap_every: Duration,
    /// Read lb-proxy's RSS, fds and gauges this often.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    sample_every: Duration,
    /// Where soak-samples.csv and soak.json go.
    #[arg(long, default_value = "bench-out")]
    out: PathBuf,
    /// Put the result into this Markdown file's Soak section (e.g. BENCHMARKS.md).
    #[arg(long)]
    benchmarks: Option<PathBuf>,
}

#[derive(Args)]
struct QuicClientArgs {
    /// The server or balancer, IP:PORT.
    server: SocketAddr,
    /// What to send on the stream (`whoami` asks lb-bench's servers for their name and the client address they see).
    #[arg(long, default_value = "whoami")]
    request: String,
    /// After the first answer, rebind to a new local port and send again on the same connection.
    #[arg(long)]
    migrate: bool,
    /// Local address to bind (port 0: any).
    #[arg(long, default_value = "127.0.0.1:0")]
    bind: SocketAddr,
    /// How long the connect and each request may take.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(Args)]
struct LoadArgs {
    /// `http://IP:PORT/path`, or `IP:PORT` (HTTP to `/`, or raw TCP with --tcp).
    target: String,
    /// Requests in total (default 200 when -z is not given).
    #[arg(short = 'n')]
    requests: Option<u64>,
    /// Concurrent workers, one connection each.
    #[arg(short = 'c', default_value_t = 50)]
    concurrency: usize,
    /// Run for this long (e.g. 10s, 500ms); with -n too, whichever ends first.
    #[arg(short = 'z', value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Rate limit in requests per second PER WORKER, as hey's -q (total: q × c).
    #[arg(short = 'q')]
    qps: Option<f64>,
    /// Per-request timeout in seconds, connect included.
    #[arg(short = 't', default_value_t = 20.0)]
    timeout: f64,
    /// A new connection (new 5-tuple) per request, with `Connection: close`.
    #[arg(long, alias = "disable-keep-alive")]
    disable_keepalive: bool,
    /// Raw TCP: send --size bytes, read the echo back.
    #[arg(long)]
    tcp: bool,
    /// TCP: bytes per round trip.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// TCP: the echo server names itself in a first line (as `lb-bench serve`'s echo does).
    #[arg(long)]
    greeting: bool,
    /// Bind each new connection to the next source address of this inclusive range, round-robin.
    #[arg(long)]
    sources: Option<SourceRange>,
    /// Print the backends that served each source address.
    #[arg(long)]
    per_source: bool,
    /// Expected backend shares from the balancer's /backends (`expected_share`) at this admin address.
    #[arg(long, value_name = "ADDR")]
    expect_from_admin: Option<SocketAddr>,
    /// With --expect-from-admin: the frontend (default: the one listening on the target).
    #[arg(long)]
    frontend: Option<String>,
    /// The response header naming the backend.
    #[arg(long, default_value = "X-Node")]
    node_header: String,
    /// Keep the first N flows (5-tuple and backend) in the report.
    #[arg(long, default_value_t = 0)]
    record_flows: usize,
    /// Runtime threads (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
}

#[derive(Args)]
struct SeedArgs {
    /// A running balancer's frontend (default: start `lb-proxy demo`).
    #[arg(long, requires = "admin")]
    proxy: Option<SocketAddr>,
    /// Its admin endpoint.
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// The lb-proxy binary (default: next to lb-bench).
    #[arg(long)]
    lb_proxy: Option<PathBuf>,
    /// Client addresses for the session-affinity step.
    #[arg(long, default_value = "127.0.0.2-127.0.0.21")]
    sources: SourceRange,
    /// New connections in step 2.
    #[arg(long, default_value_t = 300)]
    new_connections: u64,
    /// Flows shown per step.
    #[arg(long, default_value_t = 5)]
    show: usize,
    /// Print the verdicts as JSON after the text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Clone)]
struct CompareArgs {
    /// Interleaved rounds (default 3; 1 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Tiny budgets, for CI: the whole run takes well under a minute.
    #[arg(long)]
    quick: bool,
    /// Where compare.md, compare.svg and compare.json go.
    #[arg(long, default_value = "bench-out")]
    out: PathBuf,
    /// Front ends, comma-separated: direct, lb-proxy (engine = "tokio"), lb-proxy-io-uring (engine = "io-uring", lb-proxy's default where permitted), lb-proxy-userspace, lb-proxy-splice, lb-proxy-sockmap, haproxy, nginx (the default set), lb-proxy-no-half-close (half_close = false), lb-proxy-io-uring-no-half-close (both), nginx-half-close (proxy_half_close on).
    #[arg(long, value_delimiter = ',')]
    frontends: Option<Vec<String>>,
    /// The lb-proxy binary (default: next to lb-bench; build it with --release).
    #[arg(long)]
    lb_proxy: Option<PathBuf>,
    /// HAProxy binary (default: haproxy on PATH). A path that does not exist counts as missing.
    #[arg(long)]
    haproxy: Option<PathBuf>,
    /// nginx binary, for the backends and the stream front end.
    #[arg(long)]
    nginx: Option<PathBuf>,
    /// hey binary (default: hey on PATH); used as a load generator beside lb-bench's own.
    #[arg(long)]
    hey: Option<PathBuf>,
    /// wrk binary (default: wrk on PATH); used as a load generator beside lb-bench's own.
    #[arg(long)]
    wrk: Option<PathBuf>,
    /// iperf3 binary for the bulk figures (default: iperf3 on PATH; else a built-in sink).
    #[arg(long)]
    iperf3: Option<PathBuf>,
    /// Built-in HTTP backends even when nginx is installed.
    #[arg(long)]
    builtin_backends: bool,
    /// Threads per proxy (default 1). `report` uses it for the UDP and QUIC
    /// parts only: the TCP ones take `--tcp-workers`.
    #[arg(long)]
    workers: Option<usize>,
    /// lb-proxy's accept mode for the HTTP front end: reuseport or shared (default: lb-proxy's).
    #[arg(long, value_parser = ["reuseport", "shared"])]
    accept: Option<String>,
    /// Concurrent clients (default 50; 8 with --quick).
    #[arg(short = 'c')]
    concurrency: Option<usize>,
    /// Per load measurement (default 5s; 250ms with --quick).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Per bulk measurement (default 5s; 1s with --quick).
    #[arg(long, value_parser = humantime::parse_duration)]
    bulk_duration: Option<Duration>,
    /// Idle connections for the memory figure (default 9000, capped by the fd limit; 200 with --quick).
    #[arg(long)]
    idle_connections: Option<usize>,
    /// Print the full result as JSON instead of the Markdown table.
    #[arg(long)]
    json: bool,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
    /// What to compare: tcp (HTTP, bulk, memory), udp (datagrams/s, loss and
    /// CPU per datagram: direct, lb-proxy with and without batching, nginx
    /// stream udp) or quic (handshakes/s, direct vs lb-proxy).
    #[arg(long, value_enum, default_value_t = Proto::Tcp)]
    proto: Proto,
    #[command(flatten)]
    udp: UdpArgs,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Proto {
    Tcp,
    Udp,
    Quic,
}

/// The UDP and QUIC comparisons' own knobs.
#[derive(Args, Clone, Default)]
struct UdpArgs {
    /// UDP payload sizes in bytes, comma-separated (default 64,1200).
    #[arg(long, value_delimiter = ',')]
    sizes: Option<Vec<usize>>,
    /// UDP flows, each a client socket on its own address (default 50; 8 with --quick).
    #[arg(long)]
    flows: Option<usize>,
    /// UDP datagrams in flight per flow (default 4).
    #[arg(long)]
    window: Option<usize>,
    /// UDP generator threads (default 1).
    #[arg(long)]
    udp_threads: Option<usize>,
    /// Concurrent QUIC clients, each making new connections back to back (default 4).
    #[arg(long)]
    quic_clients: Option<usize>,
}

/// The options of an A/B cost measurement: a subset of compare's.
#[derive(Args)]
struct CostArgs {
    /// Alternating rounds (default 3; 1 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Tiny budgets, for CI.
    #[arg(long)]
    quick: bool,
    /// The lb-proxy binary (default: next to lb-bench; build it with --release).
    #[arg(long)]
    lb_proxy: Option<PathBuf>,
    /// nginx binary for the backends (default: nginx on PATH; else built-in backends).
    #[arg(long)]
    nginx: Option<PathBuf>,
    /// hey binary (default: hey on PATH; else lb-bench's own generator).
    #[arg(long)]
    hey: Option<PathBuf>,
    /// Built-in HTTP backends even when nginx is installed.
    #[arg(long)]
    builtin_backends: bool,
    /// Threads per proxy.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Concurrent clients (default 50; 8 with --quick).
    #[arg(short = 'c')]
    concurrency: Option<usize>,
    /// Per measurement (default 5s; 250ms with --quick).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Print the result as JSON instead of Markdown.
    #[arg(long)]
    json: bool,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
}

impl CostArgs {
    fn options(&self) -> anyhow::Result<CompareOptions> {
        compare_options(&CompareArgs {
            rounds: self.rounds,
            quick: self.quick,
            out: PathBuf::from("bench-out"),
            frontends: None,
            lb_proxy: self.lb_proxy.clone(),
            haproxy: None,
            nginx: self.nginx.clone(),
            hey: self.hey.clone(),
            wrk: None,
            iperf3: None,
            builtin_backends: self.builtin_backends,
            workers: Some(self.workers),
            accept: None,
            concurrency: self.concurrency,
            duration: self.duration,
            bulk_duration: None,
            idle_connections: None,
            json: self.json,
            quiet: self.quiet,
            proto: Proto::Tcp,
            udp: UdpArgs::default(),
        })
    }
}

#[derive(Args)]
struct ReportArgs {
    #[command(flatten)]
    compare: CompareArgs,
    /// Where to write the report (default: BENCHMARKS.md at the workspace root).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Run only these sections (tcp, udp, quic) and put them into the existing
    /// report in place of their previous versions, leaving the rest as it is.
    #[arg(long, value_delimiter = ',', value_parser = ["tcp", "udp", "quic"])]
    sections: Option<Vec<String>>,
    /// Worker counts of the TCP comparison, comma-separated: one compare and
    /// one section each (default 1,2; `--workers` is for the UDP and QUIC parts).
    #[arg(long, value_delimiter = ',')]
    tcp_workers: Option<Vec<usize>>,
}

fn compare_options(a: &CompareArgs) -> anyhow::Result<CompareOptions> {
    let mut o = CompareOptions::new(a.quick);
    if let Some(r) = a.rounds {
        if r == 0 {
            bail!("--rounds must be at least 1");
        }
        o.rounds = r;
    }
    o.out_dir = a.out.clone();
    if let Some(list) = &a.frontends {
        o.frontends = list
            .iter()
            .map(|s| {
                Frontend::parse(s.trim()).with_context(|| {
                    format!("unknown front end `{s}`: direct, lb-proxy, lb-proxy-userspace, lb-proxy-splice, lb-proxy-sockmap, lb-proxy-no-half-close, lb-proxy-io-uring, lb-proxy-io-uring-no-half-close, haproxy, nginx, nginx-half-close")
                })
            })
            .collect::<anyhow::Result<_>>()?;
    }
    o.lb_proxy = a.lb_proxy.clone();
    o.haproxy = a.haproxy.clone();
    o.nginx = a.nginx.clone();
    o.hey = a.hey.clone();
    o.wrk = a.wrk.clone();
    o.iperf3 = a.iperf3.clone();
    o.builtin_backends = a.builtin_backends;
    o.workers = a.workers.unwrap_or(1).max(1);
    o.accept = a.accept.clone();
    if let Some(c) = a.concurrency {
        o.concurrency = c.max(1);
    }
    if let Some(d) = a.duration {
        o.duration = d;
    }
    if let Some(d) = a.bulk_duration {
        o.bulk_duration = d;
    }
    if let Some(n) = a.idle_connections {
        o.idle_connections = n.max(1);
    }
    udp_options(&a.udp, &mut o)?;
    Ok(o)
}

fn udp_options(a: &UdpArgs, o: &mut CompareOptions) -> anyhow::Result<()> {
    if let Some(sizes) = &a.sizes {
        o.udp.sizes = sizes.clone();
    }
    if let Some(f) = a.flows {
        o.udp.flows = f;
    }
    if let Some(w) = a.window {
        o.udp.window = w;
    }
    if let Some(t) = a.udp_threads {
        o.udp.threads = t;
    }
    if let Some(c) = a.quic_clients {
        o.quic_clients = c.max(1);
    }
    o.udp
        .validate()
        .map_err(|why| anyhow::anyhow!("UDP options: {why}"))
}

fn runtime(threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(t) = threads {
        b.worker_threads(t.max(1));
    }
    b.enable_all()
        .build()
        .context("cannot start the tokio runtime")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before any thread starts: the mask it sets is inherited by every thread.
    if let Err(e) = lb_bench::signals::stop_children_on_signals() {
        eprintln!("error: cannot take SIGINT/SIGTERM/SIGHUP: {e}");
        return ExitCode::FAILURE;
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Load(a) => load_cmd(a),
        Command::Experiment {
            which: ExperimentCmd::Seed(a),
        } => seed_cmd(a),
        Command::Experiment {
            which: ExperimentCmd::QuicMigration(a),
        } => migration_cmd(a),
        Command::Experiment {
            which: ExperimentCmd::Zones(a),
        } => zones_cmd(a),
        Command::QuicClient(a) => quic_client_cmd(a),
        Command::Compare(a) => compare_cmd(a),
        Command::MetricsCost(a) => {
            let rt = runtime(None)?;
            let cost = costs::metrics::measure(&rt, &a.options()?, a.quiet)?;
            print_cost(&cost, a.json, costs::metrics::markdown)
        }
        Command::HopCost(a) => {
            let rt = runtime(None)?;
            let cost = costs::hop::measure(&rt, &a.options()?, a.quiet)?;
            print_cost(&cost, a.json, costs::hop::markdown)
        }
        Command::Pool { runs } => {
            print!("{}", compare::pool::pool(&runs)?.markdown);
            Ok(ExitCode::SUCCESS)
        }
        Command::Report(a) => report_cmd(a),
        Command::Soak(a) => soak_cmd(a),
        Command::Serve {
            servers,
            ready_file,
        } => {
            let specs = servers
                .iter()
                .map(|s| s.parse::<ServerSpec>())
                .collect::<Result<Vec<_>, _>>()?;
            lb_bench::serve::serve_forever(&specs, ready_file.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn compare_cmd(a: CompareArgs) -> anyhow::Result<ExitCode> {
    let opts = compare_options(&a)?;
    let rt = runtime(None)?;
    match a.proto {
        Proto::Tcp => {}
        Proto::Udp => {
            let res = compare::udp::run(&opts, a.quiet)?;
            return print_compare(
                &res,
                a.json,
                &res.markdown,
                &res.markdown_path,
                "compare-udp.json",
                &opts,
            );
        }
        Proto::Quic => {
            let res = compare::quic::run(&rt, &opts, a.quiet)?;
            return print_compare(
                &res,
                a.json,
                &res.markdown,
                &res.markdown_path,
                "compare-quic.json",
                &opts,
            );
        }
    }
    let res = compare::run(&rt, &opts, a.quiet)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&res)?);
    } else {
        println!("{}", res.markdown);
        println!(
            "wrote {} and {}",
            res.markdown_path.display(),
            opts.out_dir.join("compare.json").display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A UDP or QUIC comparison as JSON, or its Markdown and where it was written.
fn print_compare<T: serde::Serialize>(
    res: &T,
    json: bool,
    markdown: &str,
    markdown_path: &std::path::Path,
    json_file: &str,
    opts: &CompareOptions,
) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(res)?);
    } else {
        println!("{markdown}");
        println!(
            "wrote {} and {}",
            markdown_path.display(),
            opts.out_dir.join(json_file).display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A cost measurement as JSON or as its Markdown.
fn print_cost<T: serde::Serialize>(
    cost: &T,
    json: bool,
    markdown: fn(&T) -> String,
) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(cost)?);
    } else {
        print!("{}", markdown(cost));
    }
    Ok(ExitCode::SUCCESS)
}

fn report_cmd(a: ReportArgs) -> anyhow::Result<ExitCode> {
    let mut opts = compare_options(&a.compare)?;
    let runs_tcp = a
        .sections
        .as_ref()
        .is_none_or(|s| s.iter().any(|n| n == "tcp"));
    if let Some(w) =
        lb_bench::report::ignored_workers(a.compare.workers, a.tcp_workers.is_some(), runs_tcp)
    {
        eprintln!("{w}");
    }
    let tcp_workers = a
        .tcp_workers
        .clone()
        .unwrap_or_else(|| lb_bench::report::DEFAULT_TCP_WORKERS.to_vec());
    if tcp_workers.is_empty() || tcp_workers.contains(&0) {
        bail!("--tcp-workers: each worker count must be at least 1");
    }
    let root = lb_bench::report::workspace_root()
        .or_else(|| std::env::current_dir().ok())
        .unwrap_or_default();
    let output = a
        .output
        .clone()
        .unwrap_or_else(|| root.join("BENCHMARKS.md"));
    if opts.out_dir.is_relative() {
        let base = output.parent().map(PathBuf::from).unwrap_or_default();
        opts.out_dir = base.join(&opts.out_dir);
    }
    let command = std::iter::once("lb-bench".to_owned())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let rt = runtime(None)?;
    if let Some(names) = &a.sections {
        let sections: Vec<Section> = names.iter().filter_map(|n| Section::parse(n)).collect();
        let out = lb_bench::report::run_sections(
            &rt,
            &opts,
            &tcp_workers,
            &output,
            &command,
            &sections,
            a.compare.quiet,
        )?;
        for c in out.tcp.iter().flatten() {
            println!("{}", c.result.markdown);
        }
        print_outcome(
            "UDP comparison",
            out.udp
                .as_ref()
                .map(|r| r.as_ref().map(|r| r.markdown.as_str())),
        );
        print_outcome(
            "QUIC handshakes",
            out.quic
                .as_ref()
                .map(|r| r.as_ref().map(|r| r.markdown.as_str())),
        );
        println!("wrote {}", out.path.display());
        return Ok(ExitCode::SUCCESS);
    }
    let out = lb_bench::report::run(&rt, &opts, &tcp_workers, &output, &command, a.compare.quiet)?;
    for c in &out.tcp {
        println!("{}", c.result.markdown);
    }
    print_outcome(
        "UDP comparison",
        Some(out.udp.as_ref().map(|r| r.markdown.as_str())),
    );
    print_outcome(
        "QUIC handshakes",
        Some(out.quic.as_ref().map(|r| r.markdown.as_str())),
    );
    if let Err(e) = &out.metrics {
        eprintln!("metrics cost: {e}");
    }
    match &out.seed {
        Ok(s) if s.passed() => println!("seed experiment: all steps passed"),
        Ok(_) => println!("seed experiment: some steps FAILED (see the report)"),
        Err(e) => println!("seed experiment: could not run: {e}"),
    }
    println!("wrote {}", out.path.display());
    Ok(ExitCode::SUCCESS)
}

/// A section's Markdown, or why it could not run; nothing when it was not asked for.
fn print_outcome(what: &str, outcome: Option<Result<&str, &String>>) {
    match outcome {
        Some(Ok(markdown)) => println!("{markdown}"),
        Some(Err(e)) => println!("{what}: could not run: {e}"),
        None => {}
    }
}

fn load_cmd(a: LoadArgs) -> anyhow::Result<ExitCode> {
    let target = Target::parse(&a.target, a.tcp)?;
    if !(a.timeout > 0.0 && a.timeout.is_finite()) {
        bail!("-t must be above 0");
    }
    let mut spec = LoadSpec::new(target.clone());
    spec.requests = a.requests;
    spec.duration = a.duration;
    spec.concurrency = a.concurrency;
    spec.keepalive = !a.disable_keepalive;
    spec.qps = a.qps;
    spec.timeout = Duration::from_secs_f64(a.timeout);
    spec.sources = a.sources;
    spec.tcp_size = a.size;
    spec.tcp_greeting = a.greeting;
    spec.node_header = a.node_header.to_ascii_lowercase();
    spec.per_source = a.per_source || a.sources.is_some();
    spec.record_flows = a.record_flows;
    spec.progress = !a.no_progress && !a.json;
    if let Some(admin) = a.expect_from_admin {
        spec.expected = Some(
            load::expected_from_admin(admin, target.addr(), a.frontend.as_deref())
                .context("--expect-from-admin")?,
        );
    }
    let rt = runtime(a.threads)?;
    let report = rt.block_on(load::run(spec))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", load::render_text(&report, a.per_source));
        if !report.flows.is_empty() {
            let flows: Vec<_> = report.flows.iter().collect();
            println!(
                "\nFlows:\n{}",
                experiment::flow_table(&flows, "Seen by the backend")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn seed_cmd(a: SeedArgs) -> anyhow::Result<ExitCode> {
    let opts = SeedOptions {
        proxy: a.proxy,
        admin: a.admin,
        lb_proxy: a.lb_proxy,
        sources: a.sources,
        new_connections: a.new_connections.max(1),
        show_flows: a.show,
        ..SeedOptions::default()
    };
    let rt = runtime(None)?;
    let mut stdout = std::io::stdout();
    let outcome = experiment::run_seed(&rt, &opts, &mut stdout)?;
    experiment_exit(&outcome, a.json)
}

fn migration_cmd(a: MigrationArgs) -> anyhow::Result<ExitCode> {
    let opts = MigrationOptions {
        lb_proxy: a.lb_proxy,
        timeout: a.timeout,
    };
    let rt = runtime(None)?;
    let mut stdout = std::io::stdout();
    let outcome = experiment::run_quic_migration(&rt, &opts, &mut stdout)?;
    experiment_exit(&outcome, a.json)
}

fn zones_cmd(a: ZonesArgs) -> anyhow::Result<ExitCode> {
    let opts = ZonesOptions {
        lb_proxy: a.lb_proxy,
        flows: a.flows.max(1),
        concurrency: a.concurrency.max(1),
        cross_zone_rtt: a.cross_zone_rtt,
        svg: (!a.no_svg).then_some(a.svg),
    };
    let rt = runtime(None)?;
    let mut stdout = std::io::stdout();
    let outcome = experiment::run_zones(&rt, &opts, &mut stdout)?;
    experiment_exit(&outcome, a.json)
}

/// An experiment's outcome as JSON (when asked) and as the exit code.
fn experiment_exit(outcome: &experiment::Outcome, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(outcome)?);
    }
    Ok(if outcome.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn soak_cmd(a: SoakArgs) -> anyhow::Result<ExitCode> {
    let opts = lb_bench::soak::SoakOptions {
        lb_proxy: a.lb_proxy,
        duration: a.duration,
        warmup: a.warmup,
        reload_every: a.reload_every,
        flap_every: a.flap_every,
        sample_every: a.sample_every,
        out: a.out,
        benchmarks: a.benchmarks,
        command: std::iter::once("lb-bench".to_owned())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" "),
    };
    let report = lb_bench::soak::run(&opts, &mut std::io::stdout())?;
    Ok(if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn quic_client_cmd(a: QuicClientArgs) -> anyhow::Result<ExitCode> {
    use lb_bench::quic;
    let rt = runtime(Some(1))?;
    rt.block_on(async {
        let socket =
            std::net::UdpSocket::bind(a.bind).with_context(|| format!("bind {}", a.bind))?;
        let endpoint = quic::client_endpoint(socket)?;
        let conn = within(a.timeout, "connect", quic::connect(&endpoint, a.server)).await?;
        let ask = || async {
            let local = endpoint.local_addr()?;
            let request = quic::request(&conn, a.request.as_bytes());
            let answer = within(a.timeout, "request", request).await?;
            println!(
                "{local} → {}: {}",
                a.server,
                String::from_utf8_lossy(&answer).trim_end()
            );
            anyhow::Ok(())
        };
        ask().await?;
        if a.migrate {
            let moved = std::net::UdpSocket::bind((a.bind.ip(), 0)).context("bind a new port")?;
            println!("rebinding to {}", moved.local_addr()?);
            endpoint.rebind(moved)?;
            ask().await?;
        }
        conn.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
        Ok(ExitCode::SUCCESS)
    })
}

/// `f`'s result, or an error naming `what` after `limit`.
async fn within<T>(
    limit: Duration,
    what: &str,
    f: impl std::future::Future<Output = lb_bench::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => Ok(r?),
        Err(_) => bail!("{what}: no answer within {limit:?}"),
    }
}
