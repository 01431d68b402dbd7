//! The `lb-proxy` binary: a local stand-in for the Azure Load Balancer.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use lb_core::DistributionMode;
use lb_proxy::config;
use lb_proxy::demo::{self, DemoOptions};
use lb_proxy::k8s;
use lb_proxy::k8s::frontends::RunSettings;
use lb_proxy::k8s::source::{ConfigSource, ServiceSource};
use lb_proxy::server::{self, RunOptions};
use tracing_subscriber::EnvFilter;

/// glibc, with each worker keeping the blocks a connection frees for the next one (see `lb_proxy::alloc`).
#[global_allocator]
static ALLOCATOR: lb_proxy::alloc::Allocator = lb_proxy::alloc::Allocator;

#[derive(Parser)]
#[command(
    name = "lb-proxy",
    version,
    about = "A userspace L4 load balancer: a local Azure Load Balancer for AKS development"
)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `lb_proxy=debug`. RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start three demo HTTP backends ("nodes") and a balancer in front of them
    /// (with --quic: three QUIC nodes and a QUIC-LB frontend).
    Demo(DemoArgs),
    /// Run from a TOML config file, or from quick flags.
    Run(RunArgs),
    /// Print what AKS would create for Service manifests: the load-balancing
    /// rules as `az network lb rule list -o yaml` prints them, or with --probes
    /// the health probes as `az network lb probe list -o yaml` does, or with
    /// --all both as two YAML documents (rules first). Notes (annotations not
    /// emulated, placeholders) go to stderr; exit 1 with the file and field
    /// path on a manifest lb-proxy cannot translate.
    Rules(RulesArgs),
    /// Validate a config file and exit: 0 when it is good, 1 with the error when not.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Args)]
struct RulesArgs {
    /// Service manifest (YAML or JSON, `kind: List` included); repeat for more.
    #[arg(
        long = "service",
        value_name = "FILE",
        required_unless_present = "annotations"
    )]
    services: Vec<PathBuf>,
    /// Only the Service with this name, or `namespace/name`.
    #[arg(long)]
    name: Option<String>,
    /// Print the health probes instead of the rules.
    #[arg(long, conflicts_with = "all")]
    probes: bool,
    /// Print the rules, then `---`, then the probes.
    #[arg(long)]
    all: bool,
    /// Print the table of the Service annotations lb-proxy knows (Markdown:
    /// key, translated / not emulated / refused, what it does) and exit.
    #[arg(long, conflicts_with_all = ["services", "probes", "all"])]
    annotations: bool,
}

#[derive(Args)]
struct FlowLogArgs {
    /// Write one line per closed flow to this file (`-` for stdout). Overrides `[flow_log]`.
    #[arg(long, value_name = "PATH")]
    flow_log: Option<PathBuf>,
    /// Flow log format.
    #[arg(long, value_enum, default_value = "text")]
    flow_log_format: config::FlowLogFormat,
}

impl FlowLogArgs {
    fn config(&self) -> Option<config::FlowLogConfig> {
        self.flow_log.as_ref().map(|path| config::FlowLogConfig {
            path: path.clone(),
            format: self.flow_log_format,
        })
    }
}

#[derive(Args)]
struct UpgradeArgs {
    /// Zero-downtime upgrade: take the listeners over from the process serving
    /// this Unix socket (it drains and exits 0), or bind them if none does;
    /// then serve it for the next upgrade.
    #[arg(long, value_name = "PATH")]
    upgrade_socket: Option<PathBuf>,
}

#[derive(Args)]
struct DemoArgs {
    /// QUIC nodes whose connection IDs carry their server IDs, behind a `protocol = "quic"` frontend.
    #[arg(long)]
    quic: bool,
    /// Where the balancer listens [default: 127.0.0.1:8080, with --quic 127.0.0.1:4433].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Admin endpoint (metrics, backends, explain).
    #[arg(long, default_value = config::DEFAULT_ADMIN_LISTEN)]
    admin: SocketAddr,
    /// Number of demo nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
    nodes: u16,
    /// First port of the demo backends (0: any free ports) [default: 0, with --quic 4434].
    #[arg(long)]
    backend_base_port: Option<u16>,
    /// Worker threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Azure loadDistribution mode: Default, SourceIPProtocol or SourceIP.
    #[arg(long, default_value = "Default")]
    distribution: DistributionMode,
    /// Write the bound addresses as JSON here once ready.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    #[command(flatten)]
    flow_log: FlowLogArgs,
    #[command(flatten)]
    upgrade: UpgradeArgs,
}

#[derive(Args)]
struct RunArgs {
    /// TOML config file; SIGHUP re-reads it.
    #[arg(long, short, conflicts_with_all = ["listen", "backend", "service"])]
    config: Option<PathBuf>,
    /// Quick mode: address to listen on.
    #[arg(long, requires = "backend", conflicts_with = "service")]
    listen: Option<SocketAddr>,
    /// Quick mode: a backend as NAME=ADDR[,weight=W]; repeat for more.
    #[arg(long)]
    backend: Vec<String>,
    /// Quick mode: Default, SourceIPProtocol or SourceIP.
    #[arg(long, default_value = "Default")]
    distribution: DistributionMode,
    /// Quick and Service mode: admin endpoint address.
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Quick and Service mode: worker threads.
    #[arg(long)]
    workers: Option<usize>,
    #[command(flatten)]
    service: ServiceArgs,
    /// Write the bound addresses as JSON here once ready.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    #[command(flatten)]
    flow_log: FlowLogArgs,
    #[command(flatten)]
    upgrade: UpgradeArgs,
}

/// `run --service`: the frontends AKS would configure for Service manifests.
#[derive(Args)]
struct ServiceArgs {
    /// Service mode: a Service manifest (YAML or JSON, `kind: List` too); repeat
    /// for more. SIGHUP re-reads every --service and --cluster file.
    #[arg(long, value_name = "FILE", requires = "cluster")]
    service: Vec<PathBuf>,
    /// Service mode: the cluster, as `kubectl get nodes,endpointslices -o json`
    /// prints it (forward to nodeIP:nodePort) or a lab TOML (the hop model on
    /// 127.x); repeat to merge files. Required with --service.
    #[arg(long, value_name = "FILE")]
    cluster: Vec<PathBuf>,
    /// Service mode: run only this Service (`name` or `namespace/name`).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Service mode: the address every frontend listens on (the Service's external IP).
    #[arg(long, default_value = "127.0.0.1")]
    listen_ip: IpAddr,
    /// Service mode: listen on LOCAL for Service port PORT (e.g. 80=8080, or
    /// 80=0 for any free port); repeat for more. For ports < 1024 without root.
    #[arg(long = "port", value_name = "PORT=LOCAL", value_parser = parse_port_map)]
    port_map: Vec<(u16, u16)>,
    /// Service mode: listen on port + N for every Service port not given by --port.
    #[arg(long, default_value_t = 0)]
    port_offset: u16,
}

fn parse_port_map(s: &str) -> Result<(u16, u16), String> {
    let (port, local) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not PORT=LOCAL, e.g. 80=8080"))?;
    let parse = |v: &str| {
        v.trim()
            .parse::<u16>()
            .map_err(|_| format!("`{v}` in `{s}` is not a port number"))
    };
    Ok((parse(port)?, parse(local)?))
}

fn init_logging(filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(filter));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// One line per frontend for `check`: name, address and protocol, what it
/// balances over, and a QUIC frontend's QUIC-LB layout.
fn check_summary(fe: &config::FrontendConfig) -> String {
    let over = match &fe.hop {
        None => format!("{} backend(s)", fe.backends.len()),
        Some(hop) => format!(
            "{} node(s), {} endpoint(s), externalTrafficPolicy {:?}, sessionAffinity {:?}",
            hop.nodes.len(),
            hop.nodes.iter().map(|n| n.endpoints.len()).sum::<usize>(),
            hop.service.external_traffic_policy,
            hop.service.session_affinity,
        ),
    };
    let quic = fe.quic.as_ref().map_or_else(String::new, |q| {
        format!(
            ", QUIC-LB config {} with {}-byte server IDs and {}-byte nonces",
            q.lb.config_id(),
            q.lb.server_id_len(),
            q.lb.nonce_len()
        )
    });
    format!(
        "frontend `{}` on {} {}: {over}{quic}",
        fe.name,
        fe.protocol.as_str(),
        fe.listen
    )
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log);
    let result = match cli.command {
        Command::Check { config: path } => match config::load_file(&path) {
            Ok(cfg) => {
                for fe in &cfg.frontends {
                    println!("{}", check_summary(fe));
                }
                println!("{}: ok", path.display());
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        },
        Command::Rules(args) => return rules(args),
        Command::Run(args) => run(args),
        Command::Demo(args) => run_demo(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `lb-proxy rules`: the translation printed in `az`'s shape, notes on stderr.
fn rules(args: RulesArgs) -> ExitCode {
    if args.annotations {
        print!("{}", k8s::annotations::markdown_table());
        return ExitCode::SUCCESS;
    }
    let plans = match k8s::plans_from_files(&args.services, args.name.as_deref()) {
        Ok(plans) => plans,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    for plan in &plans {
        for note in &plan.notes {
            eprintln!("note: {}/{}: {note}", plan.namespace, plan.name);
        }
    }
    let mut out = String::new();
    if !args.probes {
        out.push_str(&k8s::render_az_rules(&plans));
    }
    if args.all {
        out.push_str("---\n");
    }
    if args.probes || args.all {
        out.push_str(&k8s::render_az_probes(&plans));
    }
    print!("{out}");
    ExitCode::SUCCESS
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let (cfg, source) = run_config(&args)?;
    server::run(
        cfg,
        RunOptions {
            config_source: source,
            ready_file: args.ready_file,
            ready_extra: Default::default(),
            flow_log: args.flow_log.config(),
            upgrade_socket: args.upgrade.upgrade_socket,
        },
    )
}

/// The config `run` starts with, read and validated completely before
/// anything binds, and what SIGHUP re-reads (none for quick flags).
fn run_config(args: &RunArgs) -> anyhow::Result<(config::Config, Option<ConfigSource>)> {
    let source = match (&args.config, args.listen) {
        (Some(path), _) => ConfigSource::Toml(path.clone()),
        (None, Some(listen)) => {
            let cfg = config::from_flags(
                listen,
                &args.backend,
                args.distribution,
                args.admin,
                args.workers,
            )?;
            return Ok((cfg, None));
        }
        (None, None) if !args.service.service.is_empty() => {
            ConfigSource::Services(service_source(args))
        }
        (None, None) if !args.service.cluster.is_empty() => {
            anyhow::bail!("--cluster describes where a Service runs: give --service FILE too")
        }
        (None, None) => anyhow::bail!(
            "give --config FILE, --service FILE --cluster FILE, or --listen ADDR with one or more --backend NAME=ADDR"
        ),
    };
    let cfg = source.load()?;
    Ok((cfg, Some(source)))
}

fn service_source(args: &RunArgs) -> ServiceSource {
    let s = &args.service;
    ServiceSource {
        services: s.service.clone(),
        clusters: s.cluster.clone(),
        select: s.name.clone(),
        settings: RunSettings {
            listen_ip: s.listen_ip,
            port_map: s.port_map.clone(),
            port_offset: s.port_offset,
            admin: args.admin,
            workers: args.workers,
        },
    }
}

/// The TCP demo's listen address when none is given.
const DEMO_LISTEN: &str = "127.0.0.1:8080";

fn run_demo(args: DemoArgs) -> anyhow::Result<()> {
    let (listen, base_port) = if args.quic {
        (
            demo::quic::DEFAULT_LISTEN,
            demo::quic::DEFAULT_BACKEND_BASE_PORT,
        )
    } else {
        (DEMO_LISTEN, 0)
    };
    let options = DemoOptions {
        listen: args
            .listen
            .unwrap_or_else(|| listen.parse().expect("a valid constant address")),
        admin: args.admin,
        nodes: args.nodes as usize,
        backend_base_port: args.backend_base_port.unwrap_or(base_port),
        workers: args.workers,
        distribution: args.distribution,
        quic: args.quic,
    };
    let (cfg, backends) = if options.quic {
        start_quic_demo(&options)?
    } else {
        start_http_demo(&options)?
    };
    let mut extra = serde_json::Map::new();
    extra.insert(
        "demo_backends".into(),
        backends
            .iter()
            .map(|(n, a)| (n.clone(), serde_json::Value::String(a.to_string())))
            .collect::<serde_json::Map<_, _>>()
            .into(),
    );
    server::run(
        cfg,
        RunOptions {
            config_source: None,
            ready_file: args.ready_file,
            ready_extra: extra,
            flow_log: args.flow_log.config(),
            upgrade_socket: args.upgrade.upgrade_socket,
        },
    )
}

type DemoStart = (config::Config, Vec<(String, SocketAddr)>);

/// HTTP nodes and a TCP frontend, ready for hey.
fn start_http_demo(options: &DemoOptions) -> anyhow::Result<DemoStart> {
    let backends = demo::start_backends(options.nodes, options.backend_base_port)?;
    let cfg = demo::config(options, &backends)?;
    println!(
        "lb-proxy demo: {} nodes behind a local Azure-style load balancer",
        backends.len()
    );
    for (name, addr) in &backends {
        println!("  {name:<8} http://{addr}/");
    }
    println!(
        "balancer:  http://{}/  (distribution {})",
        options.listen,
        options.distribution.azure_name()
    );
    print_admin(options);
    println!("try:       hey -n 2000 -c 50 http://{}/", options.listen);
    println!(
        "           hey -disable-keepalive -n 2000 -c 50 http://{}/",
        options.listen
    );
    Ok((cfg, backends))
}

/// QUIC greeters and a QUIC-LB frontend, ready for a migrating client.
fn start_quic_demo(options: &DemoOptions) -> anyhow::Result<DemoStart> {
    let nodes = demo::quic::start_nodes(options.nodes, options.backend_base_port)?;
    let cfg = demo::quic_config(options, &nodes)?;
    let lb = demo::quic::lb_config();
    println!(
        "lb-proxy demo --quic: {} QUIC nodes behind a QUIC-LB load balancer (config {}, {}-byte server IDs, {}-byte nonces)",
        nodes.len(),
        lb.config_id(),
        lb.server_id_len(),
        lb.nonce_len()
    );
    for n in &nodes {
        println!(
            "  {:<8} quic {}  server ID {}  (health: http://{}/)",
            n.name, n.addr, n.server_id, n.addr
        );
    }
    println!(
        "balancer:  quic {}  (protocol quic; CIDs without a healthy server ID go by distribution {})",
        options.listen,
        options.distribution.azure_name()
    );
    print_admin(options);
    println!(
        "try:       lb-bench quic-client {} --migrate      (the node greets you, you change port, the same node greets the new port)",
        options.listen
    );
    println!("           lb-bench experiment quic-migration       (plain UDP vs QUIC-LB, step by step, on its own ports)");
    println!(
        "           curl 'http://{}/explain?frontend=demo&src=127.0.0.1:40000'",
        options.admin
    );
    let backends = nodes.into_iter().map(|n| (n.name, n.addr)).collect();
    Ok((cfg, backends))
}

fn print_admin(options: &DemoOptions) {
    println!(
        "metrics:   http://{}/metrics   backends: http://{}/backends",
        options.admin, options.admin
    );
}
