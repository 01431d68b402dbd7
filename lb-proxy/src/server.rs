//! Process layout: validated config → bound sockets → worker threads, each with
//! its own single-threaded runtime and, per frontend, its own SO_REUSEPORT
//! listener or a share of one listener (`accept`), plus one control thread
//! (health, reload, admin, signals).
//!
//! Shutdown follows linkerd2-proxy: SIGTERM stops every accept loop through a
//! watch channel and in-flight connections get up to `drain_timeout` to finish;
//! SIGINT skips the drain. Before that, SIGTERM withdraws: `/ready` answers 503
//! at once while the listeners keep accepting for `withdraw_delay`, so that a
//! routing daemon polling `/ready` withdraws the route (and the router stops
//! sending new flows) before accepting stops; a second SIGTERM or a SIGINT
//! cuts the delay short. A hand-over does not withdraw: the next process
//! serves the same listeners. UDP frontends have no accept: while draining they
//! drop datagrams of new flows and forward those of existing flows, which
//! count as in flight until they go idle or are cut. Flows still open then are cut (see [`crate::shutdown`]),
//! so each is logged like any other, and the flow log is written out before the
//! process exits: every flow the balancer handled has its record.
//!
//! With `--upgrade-socket` the sockets are either bound or taken over from
//! the process serving there ([`crate::upgrade`]), and this process offers
//! its own to the next one; handing them over stops it like SIGTERM does
//! (drain, then exit 0).

use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::admin::{self, Admin, Lifecycle, LifecycleState, StopCause};
use crate::config::{AcceptMode, Config, FlowLogConfig, FrontendConfig};
use crate::control::Controller;
use crate::flowlog::{FlowLog, FlowLogCounters};
use crate::k8s::source::ConfigSource;
use crate::metrics::Metrics;
use crate::shutdown::{self, Phase};
use crate::state::Frontend;
use crate::tcp::proxy::{accept_loop, bind_listeners};
use crate::tcp::ring::{self, RingHandle};
use crate::tcp::TcpEngine;
use crate::udp::{self, UdpWorker};
use crate::upgrade::{self, HandOver, Inventory, SocketInfo, TakeOver, UpgradeHandle, Upgrader};

/// How long flows cut at shutdown get to end and be logged. Those in the copy
/// take milliseconds; one still connecting to its backend past this gets no
/// record (it never reached a backend).
const CUT_GRACE: Duration = Duration::from_secs(2);
/// How long a hand-over waits for the workers' accept loops to end.
const ACCEPT_STOP_WAIT: Duration = Duration::from_secs(1);
/// How long the flow log gets to write out what is queued at exit.
const FLOW_LOG_CLOSE: Duration = Duration::from_secs(5);

pub struct RunOptions {
    /// What SIGHUP re-reads; `None` when started from flags.
    pub config_source: Option<ConfigSource>,
    /// Written once every socket is bound: JSON with the real listen addresses.
    pub ready_file: Option<PathBuf>,
    /// Extra JSON fields for the ready file (the demo lists its backends there).
    pub ready_extra: serde_json::Map<String, serde_json::Value>,
    /// Overrides the config's `[flow_log]`.
    pub flow_log: Option<FlowLogConfig>,
    /// Take the listeners over from the process serving this Unix socket
    /// (if one does), and serve it for the next upgrade.
    pub upgrade_socket: Option<PathBuf>,
}

/// Binds everything (or takes it over), then serves until SIGTERM (drain),
/// SIGINT (immediate) or a hand-over to the next process (drain).
pub fn run(mut config: Config, options: RunOptions) -> anyhow::Result<()> {
    let workers = config.workers;
    // Bind (or take over) before anything else runs, so a port in use, or a
    // running process whose listeners do not match, is an error at startup.
    let (sockets, take_over) = open_sockets(&mut config, options.upgrade_socket.as_deref())?;
    let upgrader = match &options.upgrade_socket {
        Some(path) => Some(Upgrader::bind(path, sockets.inventory(&config)?)?),
        None => None,
    };
    let Sockets {
        listen_addrs,
        frontends: listeners,
        admin: admin_listener,
    } = sockets;
    let admin_addr = admin_listener
        .as_ref()
        .map(|l| l.local_addr())
        .transpose()?;

    crate::fds::set_reserve(config.fd_reserve);
    let metrics = Arc::new(Metrics::new());
    crate::tcp::sockmap::load_if_wanted(&config.frontends);
    let control_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("lb-control")
        .build()?;
    let (drain_timeout, withdraw_delay) = (config.drain_timeout, config.withdraw_delay);
    let flow_log = start_flow_log(
        options.flow_log.as_ref().or(config.flow_log.as_ref()),
        &metrics,
    )?;
    let controller = {
        let _guard = control_rt.enter();
        Controller::new(
            config,
            options.config_source.clone(),
            &listen_addrs,
            Arc::clone(&metrics),
            flow_log.clone(),
        )?
    };
    let frontends: Vec<Arc<Frontend>> = controller.frontends().to_vec();
    log_frontends(&frontends, &controller.config().frontends, workers);

    let (phase_tx, phase_rx) = watch::channel(Phase::Running);
    let accepting = Arc::new(AtomicUsize::new(workers));
    let _workers = start_workers(workers, listeners, &frontends, phase_rx, &accepting)?;

    // Install signal handlers before announcing readiness: a supervisor may
    // signal the moment the ready file appears.
    let signals = {
        let _guard = control_rt.enter();
        Signals::install()?
    };
    // Write the ready file before the old process is told to stop: an error
    // here must leave it serving. Only the rename follows the take-over.
    let ready_file = options
        .ready_file
        .as_deref()
        .map(|path| stage_ready_file(path, &frontends, admin_addr, &options.ready_extra))
        .transpose()?;
    take_the_place(take_over, upgrader.as_ref());
    if let Some(staged) = ready_file {
        staged.publish()?;
    }
    if let Some(a) = admin_addr {
        info!(admin = %a, "admin endpoint: /metrics /healthz /ready /backends /explain");
    }

    raise_control_thread_priority();
    let upgrade_handle = upgrader.as_ref().map(Upgrader::handle);
    let control = Control {
        controller,
        frontends,
        metrics,
        admin_listener,
        signals,
        upgrader,
        phase: phase_tx,
        accepting,
        drain_timeout,
        withdraw_delay,
        lifecycle: Arc::default(),
    };
    let stop = control_rt.block_on(control.serve())?;
    if let Some(log) = flow_log {
        if !log.close(FLOW_LOG_CLOSE) {
            warn!(timeout = ?FLOW_LOG_CLOSE, "the flow log could not be written out in time");
        }
    }
    if let Some(h) = upgrade_handle {
        h.remove_if_ours();
    }
    std::process::exit(stop.exit_code());
}

/// Once this process serves: the process it took over from may stop
/// accepting, and the upgrade socket's path becomes this process's.
fn take_the_place(take_over: Option<TakeOver>, upgrader: Option<&Upgrader>) {
    if let Some(take) = take_over {
        take.finish();
    }
    if let Some(up) = upgrader {
        if let Err(e) = up.publish() {
            warn!(
                error = format!("{e:#}"),
                "serving without an upgrade socket"
            );
        }
    }
}

/// What the control thread runs once the workers serve.
struct Control {
    controller: Controller,
    frontends: Vec<Arc<Frontend>>,
    metrics: Arc<Metrics>,
    admin_listener: Option<std::net::TcpListener>,
    signals: Signals,
    upgrader: Option<Upgrader>,
    phase: watch::Sender<Phase>,
    /// Workers whose accept loops still run.
    accepting: Arc<AtomicUsize>,
    drain_timeout: Duration,
    withdraw_delay: Duration,
    /// What `/ready` reports: serving, withdrawing or draining.
    lifecycle: Arc<LifecycleState>,
}

impl Control {
    /// Serves the admin endpoint, reloads and hand-over requests until a
    /// signal or a hand-over stops the process, then drains and cuts.
    async fn serve(mut self) -> anyhow::Result<Stop> {
        let admin_task = self
            .admin_listener
            .map(|listener| {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                let admin = Arc::new(Admin {
                    metrics: Arc::clone(&self.metrics),
                    frontends: self.frontends.clone(),
                    lifecycle: Arc::clone(&self.lifecycle),
                });
                anyhow::Ok(tokio::spawn(admin::serve(listener, admin)))
            })
            .transpose()?;
        let (reload_tx, reload_rx) = mpsc::channel(4);
        tokio::spawn(self.controller.run(reload_rx));
        // Without an upgrade socket the sender is dropped here, and the
        // hand-over branch below never fires.
        let (hand_over_tx, mut hand_over_rx) = mpsc::channel(1);
        let handle = self.upgrader.as_ref().map(Upgrader::handle);
        if let Some(up) = self.upgrader {
            tokio::spawn(up.serve(hand_over_tx));
        }
        let phase = &self.phase;
        let stop = tokio::select! {
            stop = self.signals.until_stopped(&reload_tx) => {
                // First of all, so a routing daemon polling `/ready` sees it at once.
                self.lifecycle.set(match stop {
                    Stop::Drain => Lifecycle::Withdrawing,
                    _ => Lifecycle::Draining,
                }, stop.cause());
                if let Some(h) = &handle {
                    h.close(format!("pid {} is shutting down", std::process::id()));
                }
                stop
            }
            Some(hand_over) = hand_over_rx.recv() => {
                stop_for_hand_over(hand_over, handle.as_ref(), admin_task, phase, &self.accepting).await;
                Stop::HandedOver
            }
        };
        // A take-over finishing after a signal won is answered by its session,
        // or here if it was queued already: the new process serves either way.
        while let Ok(late) = hand_over_rx.try_recv() {
            late.acknowledge();
        }
        drop(hand_over_rx);
        let stop = match stop {
            Stop::Drain => withdraw(&mut self.signals, self.withdraw_delay, &reload_tx).await,
            other => other,
        };
        self.lifecycle.set(Lifecycle::Draining, stop.cause());
        if stop != Stop::Now {
            drain(&self.frontends, phase, self.drain_timeout, stop).await;
        }
        cut_open_flows(&self.frontends, phase).await;
        Ok(stop)
    }
}

/// The next process serves now: no more hand-overs, its admin endpoint
/// answers alone, the workers stop accepting (and the UDP ones reading),
/// and only then may the new process go on.
async fn stop_for_hand_over(
    hand_over: HandOver,
    upgrade: Option<&UpgradeHandle>,
    admin_task: Option<tokio::task::JoinHandle<()>>,
    phase: &watch::Sender<Phase>,
    accepting: &AtomicUsize,
) {
    if let Some(h) = upgrade {
        h.close(format!(
            "pid {} has handed its listeners over to pid {}",
            std::process::id(),
            hand_over.pid
        ));
    }
    upgrade::mark_handed_over();
    if let Some(task) = admin_task {
        task.abort();
    }
    let _ = phase.send(Phase::Draining);
    until_accepting_stopped(accepting).await;
    hand_over.acknowledge();
}

/// Waits until every worker's accept loops have ended, so that "draining"
/// tells the new process the truth: from then on only it accepts. Bounded:
/// a worker wedged elsewhere must not hold the new process up for long, and
/// whatever the old process still accepts, it serves.
async fn until_accepting_stopped(accepting: &AtomicUsize) {
    let deadline = tokio::time::Instant::now() + ACCEPT_STOP_WAIT;
    while accepting.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// What one worker serves a frontend on.
enum WorkerSocket {
    Tcp(std::net::TcpListener),
    Udp(std::net::UdpSocket),
}

impl WorkerSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            WorkerSocket::Tcp(l) => l.as_fd(),
            WorkerSocket::Udp(s) => s.as_fd(),
        }
    }
}

/// Every socket the process serves on.
struct Sockets {
    /// Per frontend, the address really bound (port 0 resolved).
    listen_addrs: Vec<SocketAddr>,
    /// Per frontend, one socket per worker.
    frontends: Vec<Vec<WorkerSocket>>,
    admin: Option<std::net::TcpListener>,
}

impl Sockets {
    /// Copies of every socket, described, for the next process.
    fn inventory(&self, config: &Config) -> anyhow::Result<Inventory> {
        let mut inventory = Inventory::default();
        let per_frontend = config.frontends.iter().zip(&self.listen_addrs);
        for ((fe, bound), sockets) in per_frontend.zip(&self.frontends) {
            for (worker, socket) in sockets.iter().enumerate() {
                inventory.push(SocketInfo::for_frontend(fe, *bound, worker), socket.as_fd())?;
            }
        }
        if let (Some(listen), Some(admin)) = (config.admin.listen, &self.admin) {
            inventory.push(
                SocketInfo::for_admin(listen, admin.local_addr()?),
                admin.as_fd(),
            )?;
        }
        Ok(inventory)
    }
}

/// The sockets of the process serving `upgrade_socket`, if one does and they
/// match this config (with the take-over to finish once this process
/// serves); else freshly bound ones. A mismatch is an error, and the
/// running process is told so and keeps serving.
fn open_sockets(
    config: &mut Config,
    upgrade_socket: Option<&Path>,
) -> anyhow::Result<(Sockets, Option<TakeOver>)> {
    let Some(mut take) = upgrade_socket.map(TakeOver::connect).transpose()?.flatten() else {
        return Ok((bind_sockets(config)?, None));
    };
    match take.claim(config) {
        Ok(claimed) => {
            keep_claimed_accept_modes(config, &claimed);
            Ok((inherited_sockets(config, claimed)?, Some(take)))
        }
        Err(why) => {
            let old_pid = take.old_pid;
            take.abort(&why);
            anyhow::bail!("cannot take over the listeners of pid {old_pid}: {why}")
        }
    }
}

/// Frontends with `accept` left to `auto` run the listeners they took over
/// as the running process made them (one shared, or one per worker).
/// (`claimed.frontends` is in the config's order.)
fn keep_claimed_accept_modes(config: &mut Config, claimed: &upgrade::Claimed) {
    config.keep_running_accept_modes(|i, _| {
        let got = claimed.frontends.get(i)?;
        Some(match got.shared_accept {
            true => AcceptMode::Shared,
            false => AcceptMode::Reuseport,
        })
    });
}

/// The claimed descriptors as the workers' sockets. A TCP listener's
/// backlog is this config's (listen(2) again on a listening socket resizes it).
fn inherited_sockets(config: &Config, claimed: upgrade::Claimed) -> anyhow::Result<Sockets> {
    let mut listen_addrs = Vec::with_capacity(claimed.frontends.len());
    let mut frontends = Vec::with_capacity(claimed.frontends.len());
    for (fe, got) in config.frontends.iter().zip(claimed.frontends) {
        let sockets = got
            .sockets
            .into_iter()
            .map(|fd| inherited_socket(fe, fd))
            .collect::<std::io::Result<Vec<_>>>()
            .with_context(|| format!("cannot use the sockets of frontend `{}`", fe.name))?;
        listen_addrs.push(got.bound);
        frontends.push(sockets);
    }
    let admin = claimed.admin.map(std::net::TcpListener::from);
    Ok(Sockets {
        listen_addrs,
        frontends,
        admin,
    })
}

fn inherited_socket(fe: &FrontendConfig, fd: OwnedFd) -> std::io::Result<WorkerSocket> {
    if fe.protocol.is_udp() {
        let socket = std::net::UdpSocket::from(fd);
        socket.set_nonblocking(true)?;
        return Ok(WorkerSocket::Udp(socket));
    }
    let listener = std::net::TcpListener::from(fd);
    listener.set_nonblocking(true)?;
    socket2::SockRef::from(&listener).listen(fe.backlog.min(i32::MAX as u32) as i32)?;
    Ok(WorkerSocket::Tcp(listener))
}

/// Binds every frontend's sockets and the admin listener.
fn bind_sockets(config: &Config) -> anyhow::Result<Sockets> {
    let (listen_addrs, frontends) = bind_frontends(config)?;
    let admin = bind_admin(config.admin.listen)?;
    Ok(Sockets {
        listen_addrs,
        frontends,
        admin,
    })
}

/// One socket per worker for every frontend (TCP listeners, or UDP sockets
/// for UDP and QUIC frontends), and the addresses they really bound (port 0
/// resolved).
fn bind_frontends(config: &Config) -> anyhow::Result<(Vec<SocketAddr>, Vec<Vec<WorkerSocket>>)> {
    let mut listen_addrs = Vec::new();
    let mut sockets = Vec::new();
    let ports = udp::upstream::ephemeral_ports();
    for fe in &config.frontends {
        let bound = if fe.protocol.is_udp() {
            if let Some(ports) = ports {
                udp::upstream::warn_if_ports_short(fe, ports);
            }
            udp::bind_frontend(fe.listen, config.workers)
                .map(|(addr, s)| (addr, s.into_iter().map(WorkerSocket::Udp).collect()))
        } else {
            bind_listeners(fe.listen, fe.backlog, config.workers, fe.accept)
                .map(|(addr, s)| (addr, s.into_iter().map(WorkerSocket::Tcp).collect()))
        };
        let (addr, socks): (SocketAddr, Vec<WorkerSocket>) = bound.with_context(|| {
            format!(
                "cannot listen on {} ({}) for frontend `{}`",
                fe.listen,
                fe.protocol.as_str(),
                fe.name
            )
        })?;
        listen_addrs.push(addr);
        sockets.push(socks);
    }
    Ok((listen_addrs, sockets))
}

fn bind_admin(listen: Option<SocketAddr>) -> anyhow::Result<Option<std::net::TcpListener>> {
    let Some(addr) = listen else {
        return Ok(None);
    };
    let l = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot bind admin endpoint {addr}"))?;
    l.set_nonblocking(true)?;
    Ok(Some(l))
}

/// Opens the flow log, when one is configured (the command line's wins).
fn start_flow_log(
    config: Option<&FlowLogConfig>,
    metrics: &Metrics,
) -> anyhow::Result<Option<Arc<FlowLog>>> {
    let Some(cfg) = config else {
        return Ok(None);
    };
    let counters = FlowLogCounters {
        written: metrics.flow_log_lines.clone(),
        dropped: metrics.flow_log_dropped.clone(),
    };
    let log = FlowLog::start(cfg, counters)
        .with_context(|| format!("cannot open flow log {}", cfg.path.display()))?;
    Ok(Some(Arc::new(log)))
}

fn log_frontends(frontends: &[Arc<Frontend>], configs: &[FrontendConfig], workers: usize) {
    for (fe, cfg) in frontends.iter().zip(configs) {
        info!(
            frontend = %fe.name,
            listen = %fe.listen,
            protocol = cfg.protocol.as_str(),
            distribution = cfg.params.mode.azure_name(),
            backends = cfg.backends.len(),
            workers,
            accept = ?cfg.accept,
            "frontend listening"
        );
    }
}

/// Starts `workers` threads, each taking one socket of every frontend.
fn start_workers(
    workers: usize,
    mut listeners: Vec<Vec<WorkerSocket>>,
    frontends: &[Arc<Frontend>],
    phase: watch::Receiver<Phase>,
    accepting: &Arc<AtomicUsize>,
) -> anyhow::Result<Vec<std::thread::JoinHandle<()>>> {
    let mut threads = Vec::with_capacity(workers);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    for w in 0..workers {
        let mine: Vec<(WorkerSocket, Arc<Frontend>)> = listeners
            .iter_mut()
            .zip(frontends)
            .map(|(socks, fe)| {
                (
                    socks.pop().expect("one listener per worker"),
                    Arc::clone(fe),
                )
            })
            .collect();
        let phase = phase.clone();
        let ready = ready_tx.clone();
        let accepting = Arc::clone(accepting);
        let handle = std::thread::Builder::new()
            .name(format!("lb-worker-{w}"))
            .spawn(move || worker_main(w, mine, workers, phase, ready, accepting))
            .context("cannot start worker thread")?;
        threads.push(handle);
    }
    drop(ready_tx);
    // Readiness means every worker accepts: its runtime (and the fds it holds)
    // exists and its listeners are registered. A supervisor or test that
    // counts fds or connects the moment the ready file appears sees the
    // process as it will run.
    for _ in 0..workers {
        ready_rx
            .recv()
            .context("a worker thread ended before it was ready")?
            .map_err(anyhow::Error::msg)?;
    }
    Ok(threads)
}

/// How the process was asked to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// SIGTERM: drain, then exit 0.
    Drain,
    /// SIGINT: no drain, exit 130 (as a shell reports an interrupted command).
    Now,
    /// The listeners were handed over to the next process: drain, then exit 0.
    HandedOver,
}

impl Stop {
    /// What `/ready` names as the reason it answers 503.
    fn cause(self) -> StopCause {
        match self {
            Stop::Drain => StopCause::Sigterm,
            Stop::Now => StopCause::Sigint,
            Stop::HandedOver => StopCause::HandOver,
        }
    }

    fn exit_code(self) -> i32 {
        match self {
            Stop::Drain | Stop::HandedOver => 0,
            Stop::Now => 130,
        }
    }
}

/// The signals the process answers: SIGHUP reloads, SIGTERM drains, SIGINT stops at once.
struct Signals {
    hup: Signal,
    term: Signal,
    int: Signal,
}

impl Signals {
    /// Must run inside the control runtime.
    fn install() -> std::io::Result<Self> {
        Ok(Signals {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Asks for a reload on every SIGHUP; returns on SIGTERM or SIGINT.
    async fn until_stopped(&mut self, reload: &mpsc::Sender<()>) -> Stop {
        loop {
            tokio::select! {
                _ = self.hup.recv() => {
                    info!("SIGHUP: reloading config");
                    let _ = reload.try_send(());
                }
                _ = self.int.recv() => {
                    info!("SIGINT: exiting now");
                    return Stop::Now;
                }
                _ = self.term.recv() => return Stop::Drain,
            }
        }
    }
}

/// SIGTERM's first step: `/ready` already answers 503 (the caller set it)
/// and the listeners keep accepting for `delay`, the time a routing daemon
/// needs to see it and the router to drop the route. New flows that arrive
/// meanwhile are served as any other. SIGHUP still reloads; a second SIGTERM
/// ends the delay (then the drain runs), SIGINT ends it and exits now.
async fn withdraw(signals: &mut Signals, delay: Duration, reload: &mpsc::Sender<()>) -> Stop {
    if delay.is_zero() {
        return Stop::Drain;
    }
    info!(
        "withdrawing: /ready answers 503 for {} before draining",
        humantime::format_duration(delay)
    );
    let deadline = tokio::time::sleep(delay);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = &mut deadline => return Stop::Drain,
            _ = signals.hup.recv() => {
                info!("SIGHUP: reloading config");
                let _ = reload.try_send(());
            }
            _ = signals.term.recv() => {
                info!("SIGTERM again: ending the withdrawal early");
                return Stop::Drain;
            }
            _ = signals.int.recv() => {
                info!("SIGINT: exiting now");
                return Stop::Now;
            }
        }
    }
}

/// Stops every accept loop, then waits up to `drain_timeout` for the
/// connections in flight to finish.
async fn drain(
    frontends: &[Arc<Frontend>],
    phase: &watch::Sender<Phase>,
    drain_timeout: Duration,
    why: Stop,
) {
    let in_flight: usize = frontends.iter().map(|f| f.active()).sum();
    let why = if why == Stop::HandedOver {
        "handed over"
    } else {
        "SIGTERM"
    };
    info!(in_flight, drain_timeout = ?drain_timeout, "{why}: draining");
    let _ = phase.send(Phase::Draining);
    let deadline = tokio::time::Instant::now() + drain_timeout;
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    loop {
        let left: usize = frontends.iter().map(|f| f.active()).sum();
        if left == 0 {
            info!("drained");
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            warn!(left, "drain timeout: closing remaining connections");
            break;
        }
        poll.tick().await;
    }
}

/// Stops accepting (if the drain has not) and cuts every flow still open,
/// then waits up to [`CUT_GRACE`] for them to end and be logged.
async fn cut_open_flows(frontends: &[Arc<Frontend>], phase: &watch::Sender<Phase>) {
    let _ = phase.send(Phase::Cut);
    let deadline = tokio::time::Instant::now() + CUT_GRACE;
    let mut poll = tokio::time::interval(Duration::from_millis(5));
    loop {
        let left: usize = frontends.iter().map(|f| f.active()).sum();
        if left == 0 {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            warn!(
                left,
                "flows still connecting at exit: they get no flow log record"
            );
            break;
        }
        poll.tick().await;
    }
}

/// The control thread (admin endpoint, probes, reloads) is idle nearly all the
/// time, but when a scrape or probe comes it should not queue behind a
/// saturated data plane: at equal priority on 2 vCPUs under load, a scrape
/// waited 10-17 ms for a core, several times its own CPU cost (the README's
/// Metrics section; `cargo bench -p lb-proxy --bench scrape`), and making the
/// scrape cheaper does not shorten that wait. A higher priority (nice -5)
/// needs CAP_SYS_NICE; without it this is a no-op.
fn raise_control_thread_priority() {
    // SAFETY: gettid has no preconditions; setpriority on our own thread id
    // changes only this thread's nice value (Linux applies PRIO_PROCESS per thread).
    let result = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, -5)
    };
    if result != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "control thread keeps the default priority");
    }
}

/// Tokio's timer wheel interrupts the I/O driver (an eventfd write, then a
/// spurious epoll wakeup) whenever a new timer is due before the driver's next
/// planned wake. Without this, a connect timeout registered while no other
/// timer is near would do that for every new connection. A short heartbeat
/// keeps the next planned wake close, so connect timeouts longer than it never
/// interrupt: two syscalls fewer per connection, for four wakeups a second.
async fn keep_timer_wheel_warm() {
    let mut heartbeat = tokio::time::interval(Duration::from_millis(250));
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        heartbeat.tick().await;
    }
}

/// What a worker reports once it accepts, or why it cannot.
type WorkerReady = Result<(), String>;

fn worker_main(
    w: usize,
    sockets: WorkerSockets,
    workers: usize,
    mut phase: watch::Receiver<Phase>,
    ready: std::sync::mpsc::Sender<WorkerReady>,
    accepting: Arc<AtomicUsize>,
) {
    // A worker lives as long as the process, so the blocks it keeps are never stranded.
    crate::alloc::cache_blocks_on_this_thread();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(format!("cannot start worker runtime: {e}")));
            return;
        }
    };
    let (sockets, ring) = match start_ring((w, workers), sockets, &phase) {
        Ok(split) => split,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    rt.block_on(async move {
        tokio::spawn(keep_timer_wheel_warm());
        let mut loops = tokio::task::JoinSet::new();
        let mut udp_loops = tokio::task::JoinSet::new();
        if let Some(ring) = ring {
            // The ring's accepting is one more accept loop to wait for.
            let (wake, accept_stopped) = ring.into_parts();
            tokio::spawn(RingHandle::forward_phases(wake, phase.clone()));
            drop(loops.spawn(async move {
                let _ = accept_stopped.await;
            }));
        }
        for (socket, fe) in sockets {
            // arc-swap allocates a thread's debt slots on its first load; do it now, not per connection.
            drop(fe.routing.load());
            let registered = match socket {
                WorkerSocket::Tcp(l) => {
                    let shared = workers > 1 && fe.settings.load().accept == AcceptMode::Shared;
                    tokio::net::TcpListener::from_std(l).map(|l| {
                        let accepting = accept_loop(l, Arc::clone(&fe), phase.clone(), shared);
                        drop(loops.spawn(accepting))
                    })
                }
                WorkerSocket::Udp(s) => UdpWorker::new(s, Arc::clone(&fe), workers, phase.clone())
                    .map(|w| drop(udp_loops.spawn(w.run()))),
            };
            if let Err(e) = registered {
                // A worker that cannot serve would make the ready file a lie.
                let msg = format!("cannot register socket of frontend `{}`: {e}", fe.name);
                let _ = ready.send(Err(msg));
                return;
            }
        }
        let _ = ready.send(Ok(()));
        drop(ready);
        while loops.join_next().await.is_some() {}
        accepting.fetch_sub(1, Ordering::AcqRel);
        // Accepting has stopped; serve the flows in flight until they are cut.
        if phase.wait_for(|p| *p == Phase::Cut).await.is_ok() {
            let cut = shutdown::cut_all();
            tracing::debug!(cut, "cut the flows open on this worker");
        }
        // The UDP loops end their flows at the cut, each with its record.
        while udp_loops.join_next().await.is_some() {}
        // The cut flows end on this runtime; keep it running until the process exits.
        std::future::pending::<()>().await;
    });
}

/// One worker's sockets and their frontends.
type WorkerSockets = Vec<(WorkerSocket, Arc<Frontend>)>;

/// Starts worker `w`'s io_uring loop on the TCP listeners of frontends with
/// `engine = "io-uring"`; returns the sockets left to the worker's runtime
/// (all of them where io_uring is refused) and the running loop, if any.
fn start_ring(
    (w, workers): (usize, usize),
    sockets: WorkerSockets,
    phase: &watch::Receiver<Phase>,
) -> Result<(WorkerSockets, Option<RingHandle>), String> {
    let (on_ring, mut rest): (WorkerSockets, WorkerSockets) =
        sockets.into_iter().partition(|(socket, fe)| {
            matches!(socket, WorkerSocket::Tcp(_))
                && fe.settings.load().engine == TcpEngine::IoUring
        });
    if on_ring.is_empty() {
        return Ok((rest, None));
    }
    let wanted = on_ring.len();
    let served: Vec<ring::Served> = on_ring
        .into_iter()
        .filter_map(|(socket, fe)| match socket {
            WorkerSocket::Tcp(l) => {
                let shared = workers > 1 && fe.settings.load().accept == AcceptMode::Shared;
                Some((l, fe, shared))
            }
            WorkerSocket::Udp(_) => None,
        })
        .collect();
    match ring::start(w, served, phase.clone()) {
        Ok(handle) => Ok((rest, Some(handle))),
        Err(refused) if refused.served.len() == wanted => {
            rest.extend(
                refused
                    .served
                    .into_iter()
                    .map(|(l, fe, _)| (WorkerSocket::Tcp(l), fe)),
            );
            Ok((rest, None))
        }
        Err(refused) => Err(format!("cannot start the io_uring loop: {}", refused.why)),
    }
}

/// A ready file written beside its path, not yet renamed into place.
struct StagedReadyFile {
    tmp: PathBuf,
    path: PathBuf,
}

impl StagedReadyFile {
    fn publish(self) -> anyhow::Result<()> {
        std::fs::rename(&self.tmp, &self.path)
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

fn stage_ready_file(
    path: &Path,
    frontends: &[Arc<Frontend>],
    admin: Option<SocketAddr>,
    extra: &serde_json::Map<String, serde_json::Value>,
) -> anyhow::Result<StagedReadyFile> {
    let fes: serde_json::Map<String, serde_json::Value> = frontends
        .iter()
        .map(|f| {
            (
                f.name.to_string(),
                serde_json::Value::String(f.listen.to_string()),
            )
        })
        .collect();
    let mut body = serde_json::json!({
        "pid": std::process::id(),
        "frontends": fes,
        "admin": admin.map(|a| a.to_string()),
    });
    if let Some(obj) = body.as_object_mut() {
        obj.extend(extra.clone());
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, body.to_string())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    Ok(StagedReadyFile {
        tmp,
        path: path.to_owned(),
    })
}
