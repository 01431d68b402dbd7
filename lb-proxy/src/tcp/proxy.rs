//! The TCP data plane: listeners (per worker or shared), accept loops, backend connects
//! with fallbacks, and the per-connection copy. Where a connect goes (and the
//! source it is bound to) is [`crate::target`]'s, shared with the UDP plane.
//! A flow whose node → pod hop crosses zones pays the hop's round trip on its
//! connect and goes through [`crate::tcp::delay`] instead of the normal copy.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::time::Duration;

use lb_core::{FlowKey, Protocol as FlowProtocol, ProxyHeader};
use prometheus::{Histogram, IntCounter};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tracing::{debug, warn, Instrument};

use crate::config::{AcceptMode, ClientAddress, FrontendConfig};
use crate::fds;
use crate::flowlog::FlowRecord;
use crate::metrics::ConnectErrorReason;
use crate::shutdown::{self, Phase};
use crate::state::{BackendLease, BackendRuntime, Frontend, PassiveFailure};
use crate::target::{
    is_local_exhaustion, is_resource_exhaustion, resolve_target, warn_local_exhaustion, Target,
    ZoneHop,
};
use crate::tcp::copy::{self, CopyMode, CopyOutcome, Ending, Transferred};
use crate::tcp::delay::{self, HoldTimer};
use crate::tcp::sockmap::{self, NotForwarded};
use crate::tcp::syscall::{self, Closable};

/// Binds one listening socket; every worker binds its own on the same address.
pub fn bind_listener(addr: SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // Accepted sockets inherit TCP_NODELAY from the listener, which saves a
    // setsockopt per client connection.
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket.into())
}

/// Binds one listener per worker on `addr`: `count` SO_REUSEPORT sockets, or
/// one socket shared (duplicated) by all. Port 0 is resolved by the first
/// bind so all of them share one real port.
pub fn bind_listeners(
    addr: SocketAddr,
    backlog: u32,
    count: usize,
    mode: AcceptMode,
) -> io::Result<(SocketAddr, Vec<std::net::TcpListener>)> {
    let first = bind_listener(addr, backlog)?;
    let actual = first.local_addr()?;
    let mut all = Vec::with_capacity(count);
    for _ in 1..count {
        all.push(match mode {
            AcceptMode::Reuseport => bind_listener(actual, backlog)?,
            AcceptMode::Shared => first.try_clone()?,
        });
    }
    all.push(first);
    Ok((actual, all))
}

/// Accepts until the process stops running, then drops the listener so the
/// kernel stops queueing new connections for this worker.
///
/// With `one_per_turn` (a listener other workers share), the worker takes one
/// connection and lets its runtime turn (the new flow connects, the flows
/// whose events came in are served) before it takes another, as nginx takes
/// one per event: the rest of the queue goes to whichever worker is free
/// first. Draining the shared queue in one go instead hands a burst to the
/// worker that woke first while the other idles (docs/research/new-connections.md,
/// "Change G").
pub async fn accept_loop(
    listener: TcpListener,
    frontend: Arc<Frontend>,
    mut phase: watch::Receiver<Phase>,
    one_per_turn: bool,
) {
    const MAX_BACKOFF: Duration = Duration::from_secs(1);
    let mut backoff = Duration::from_millis(5);
    // One stop future for the whole loop: building a fresh `wait_for` per
    // accept cost a watch borrow and a waiter registration every connection.
    let stopping = phase.wait_for(|p| *p != Phase::Running);
    tokio::pin!(stopping);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut stopping => break,
            accepted = accept_client(&listener) => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                if !source_allowed(&frontend, peer.ip()) {
                    // An NSG would have dropped the SYN; having accepted, the
                    // closest refusal is a reset before any byte or connect.
                    frontend.metrics.rejected_source_range.inc();
                    debug!(frontend = %frontend.name, client = %peer, "client outside source_ranges, reset");
                    copy::reset(stream);
                    continue;
                }
                if !fds::data_plane_may_hold(stream.as_raw_fd()) {
                    // Keeping it would eat the descriptors the admin endpoint and the
                    // probes need to report this very shortage. Refuse it now, with
                    // a reset, rather than let it wait in the backlog.
                    frontend.metrics.rejected_local_resources.inc();
                    warn_local_exhaustion(&fds::reserve_reached());
                    copy::reset(stream);
                    continue;
                }
                let fe = Arc::clone(&frontend);
                tokio::spawn(handle_connection(stream, peer, fe));
                if one_per_turn {
                    // Back after the runtime's next poll of the driver.
                    tokio::task::yield_now().await;
                }
            }
            Err(e) if is_resource_exhaustion(&e) => {
                // Out of fds or buffers: spinning would burn the CPU the existing
                // connections need to finish and free them. Back off instead.
                warn!(frontend = %frontend.name, error = %e, backoff = ?backoff, "accept failed, backing off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(e) => debug!(frontend = %frontend.name, error = %e, "accept error"),
        }
    }
}

/// Accepts one client whose first read waits for the reactor to report its
/// bytes ([`copy::forget_assumed_readable`]: no `recv` that can only return
/// EAGAIN). The accept and the clear stay together, with no await between
/// them: that is what keeps the clear from taking a reported event's
/// readiness with it.
pub(super) async fn accept_client(listener: &TcpListener) -> io::Result<(TcpStream, SocketAddr)> {
    let (client, peer) = listener.accept().await?;
    copy::forget_assumed_readable(&client);
    Ok((client, peer))
}

/// Whether the frontend's `source_ranges`, as the last reload left them, let
/// `client` in (no list: everyone). One lock-free load and one binary search,
/// so every accept may ask; connections already open are not asked again, as
/// a stateful NSG keeps the flows it allowed when its rules change.
fn source_allowed(frontend: &Frontend, client: IpAddr) -> bool {
    frontend
        .settings
        .load()
        .source_ranges
        .as_ref()
        .is_none_or(|ranges| ranges.contains(client))
}

/// One accepted client, the story of a flow: admit it, connect to its backend
/// (or a fallback), announce the client if asked, copy both ways, close the way
/// the copy ended, and log it.
async fn handle_connection(client: TcpStream, peer: SocketAddr, frontend: Arc<Frontend>) {
    let settings = frontend.settings.load_full();
    frontend.metrics.connections.inc();
    let Some(admission) = frontend.try_admit(settings.max_connections) else {
        frontend.metrics.rejected_max_connections.inc();
        copy::reset(client);
        return;
    };
    let local = if frontend.listen.ip().is_unspecified() {
        client.local_addr().unwrap_or(frontend.listen)
    } else {
        frontend.listen
    };
    let span = tracing::debug_span!("conn", client = %peer, frontend = %frontend.name, backend = tracing::field::Empty);
    let flow = Flow {
        peer,
        local,
        started: frontend.flow_log.is_some().then(std::time::Instant::now),
    };
    // Boxed, so the spawned task stays small: tokio moves a task's future
    // several times while spawning and finishing it, and the flow's whole
    // state is about 2.2 KiB in a release build (docs/research/new-connections.md:
    // one malloc costs less than those copies; crate::alloc keeps the block
    // for the worker's next flow).
    Box::pin(serve(client, flow, &frontend, &settings))
        .instrument(span)
        .await;
    drop(admission);
}

/// Who a flow is between, and when it began.
#[derive(Clone, Copy)]
struct Flow {
    peer: SocketAddr,
    /// The frontend address the client connected to.
    local: SocketAddr,
    /// When it was accepted, for the flow log's duration: read only where
    /// the frontend keeps a flow log (a clock read per connection otherwise
    /// spent on nothing).
    started: Option<std::time::Instant>,
}

/// The connected side of a flow: the stream, its backend, and the target address.
struct Upstream {
    stream: TcpStream,
    backend: Arc<BackendRuntime>,
    target: SocketAddr,
    /// [`Target::seen`].
    seen: Option<IpAddr>,
    /// [`Target::zones`].
    zones: Option<ZoneHop>,
    /// The timer a cross-zone connect paused on, for the copy's holds.
    hold: Option<HoldTimer>,
}

/// Why a flow got no upstream.
#[derive(PartialEq, Eq)]
enum NoUpstream {
    /// This machine ran out of fds, memory or ports: the client was shed (and counted).
    Shed,
    /// No backend was eligible, or every choice tried failed.
    Unreachable,
}

/// Everything after admission, inside the connection's span.
async fn serve(client: TcpStream, flow: Flow, frontend: &Frontend, settings: &FrontendConfig) {
    let key = FlowKey::tcp(flow.peer, flow.local);
    let upstream = match connect_with_fallbacks(frontend, settings, &key, flow.peer).await {
        Ok(upstream) => upstream,
        Err(why) => {
            if why == NoUpstream::Unreachable {
                frontend.metrics.no_backend.inc();
            }
            debug!("no backend reachable, resetting client");
            copy::reset(client);
            return;
        }
    };
    let Upstream {
        stream: upstream,
        backend,
        target,
        seen,
        zones,
        hold,
    } = upstream;
    tracing::Span::current().record("backend", &*backend.name);
    let lease = BackendLease::new(backend);
    if let Err(e) = announce_client(&upstream, settings.client_address, flow).await {
        debug!(error = %e, "could not send PROXY header");
        copy::reset(client);
        copy::reset(upstream);
        return;
    }
    // Only the flow log wants it, and it may cost a getsockname per connection.
    let seen_source = frontend
        .flow_log
        .as_ref()
        .map(|_| source_seen_by_target(&upstream, seen, flow.peer));
    let flow_zones = zones.as_ref().map(|hop| shutdown::FlowZones {
        signal: &frontend.zones,
        hop,
    });
    let delay = Delay {
        one_way: one_way_delay(zones.as_ref()),
        hold,
        held: &frontend.metrics.cross_zone_delay,
    };
    let backend = &lease.backend;
    let spliced = &frontend.metrics.spliced_bytes;
    let (outcome_name, moved) = match sockmap_engine(settings, &delay) {
        Some(engine) => match sockmap::Forward::start(engine, client, upstream) {
            Ok(forward) => forward_in_kernel(forward, flow_zones, settings, backend).await,
            Err(NotForwarded::Fallback {
                why,
                client,
                backend: upstream,
            }) => {
                debug!(error = %why, "not forwarded by sockmap, copying with auto");
                copy_in_userspace(
                    client, upstream, flow_zones, delay, settings, backend, spliced,
                )
                .await
            }
            Err(NotForwarded::Failed(e)) => {
                debug!(error = %e, "connection failed");
                (CopyOutcome::Failed(e).as_str(), Transferred::default())
            }
        },
        None => {
            copy_in_userspace(
                client, upstream, flow_zones, delay, settings, backend, spliced,
            )
            .await
        }
    };
    debug!(
        up = moved.client_to_backend,
        down = moved.backend_to_client,
        spliced = moved.spliced,
        outcome = outcome_name,
        "closed"
    );
    if let Some(log) = &frontend.flow_log {
        let ended = Ended {
            via: &lease.backend.name,
            seen_source: seen_source.unwrap_or(flow.peer.ip()),
            endpoint: target,
            moved,
            outcome: outcome_name,
            zones,
        };
        log.log(flow_record(frontend, flow, ended));
    }
}

/// How a flow ended, for its flow log record.
struct Ended<'a> {
    via: &'a Arc<str>,
    seen_source: IpAddr,
    endpoint: SocketAddr,
    moved: Transferred,
    outcome: &'static str,
    zones: Option<ZoneHop>,
}

/// The flow log's record of a flow that has just closed.
fn flow_record(frontend: &Frontend, flow: Flow, ended: Ended<'_>) -> FlowRecord {
    FlowRecord {
        closed_at: std::time::SystemTime::now(),
        frontend: Arc::clone(&frontend.name),
        client: flow.peer,
        frontend_addr: flow.local,
        proto: FlowProtocol::Tcp,
        via: Arc::clone(ended.via),
        seen_source: ended.seen_source,
        endpoint: ended.endpoint,
        bytes_to_backend: ended.moved.client_to_backend,
        bytes_from_backend: ended.moved.backend_to_client,
        duration: flow.started.map_or(Duration::ZERO, |at| at.elapsed()),
        outcome: ended.outcome,
        zones: ended.zones,
    }
}

/// What a flow's hop holds each direction for (zero: same zone, not held),
/// the flow's timer for it, and where each hold is observed.
struct Delay<'a> {
    one_way: Duration,
    hold: Option<HoldTimer>,
    held: &'a Histogram,
}

/// The sockmap engine, where the frontend asks for it, it runs, and the hop
/// holds nothing (a cross-zone hop's delay line needs the bytes in userspace).
fn sockmap_engine(
    settings: &FrontendConfig,
    delay: &Delay<'_>,
) -> Option<&'static sockmap::Engine> {
    let wanted = settings.copy == CopyMode::Sockmap && delay.one_way.is_zero();
    wanted.then(sockmap::engine).flatten()
}

/// The flow forwarded by the kernel, registered for cuts, then closed.
async fn forward_in_kernel(
    forward: sockmap::Forward,
    zones: Option<shutdown::FlowZones<'_>>,
    settings: &FrontendConfig,
    backend: &BackendRuntime,
) -> (&'static str, Transferred) {
    let (sent, received) = byte_counters(settings, backend);
    let open = shutdown::register(forward.client(), forward.backend(), zones);
    let (outcome, moved) = forward.run(settings.idle_timeout, sent, received).await;
    let cut = open.finish();
    let (client, upstream) = forward.into_streams();
    (
        closed(cut, outcome, client, upstream, settings, backend),
        moved,
    )
}

/// The flow copied by userspace, registered for cuts, then closed.
async fn copy_in_userspace(
    client: TcpStream,
    upstream: TcpStream,
    zones: Option<shutdown::FlowZones<'_>>,
    delay: Delay<'_>,
    settings: &FrontendConfig,
    backend: &BackendRuntime,
    spliced: &IntCounter,
) -> (&'static str, Transferred) {
    let open = shutdown::register(&client, &upstream, zones);
    let (outcome, moved) = copy_flow(&client, &upstream, delay, settings, backend, spliced).await;
    let cut = open.finish();
    (
        closed(cut, outcome, client, upstream, settings, backend),
        moved,
    )
}

/// The backend's byte counters (sent to it, received from it), when the
/// frontend counts bytes.
fn byte_counters<'a>(
    settings: &FrontendConfig,
    backend: &'a BackendRuntime,
) -> (Option<&'a IntCounter>, Option<&'a IntCounter>) {
    let m = &backend.metrics;
    let on = settings.byte_metrics;
    (on.then_some(&m.sent_bytes), on.then_some(&m.received_bytes))
}

/// Closes the flow's sockets as it ended, and names the ending: a cut (at
/// shutdown, or a zone going down: both sockets are shut down already, so
/// closing is all that is left), else the copy's outcome.
fn closed<S: AsFd + Closable>(
    cut: Option<&'static str>,
    outcome: CopyOutcome,
    client: S,
    upstream: S,
    settings: &FrontendConfig,
    backend: &BackendRuntime,
) -> &'static str {
    if let Some(cut) = cut {
        syscall::close(client);
        syscall::close(upstream);
        return cut;
    }
    let name = outcome.as_str();
    close_as_the_copy_ended(outcome, client, upstream, settings, backend);
    name
}

/// Copies both ways: through the delay line when the hop crosses zones
/// (on the flow's timer, observing each hold), else with the frontend's copy
/// engine (`sockmap` flows the kernel did not take are copied with `auto`).
async fn copy_flow(
    client: &TcpStream,
    upstream: &TcpStream,
    delay: Delay<'_>,
    settings: &FrontendConfig,
    backend: &BackendRuntime,
    spliced: &IntCounter,
) -> (CopyOutcome, Transferred) {
    let (sent, received) = byte_counters(settings, backend);
    let ending = Ending {
        idle: settings.idle_timeout,
        half_close: settings.half_close,
    };
    if delay.one_way.is_zero() {
        let counters = copy::Counters {
            sent,
            received,
            spliced: Some(spliced),
        };
        copy::bidirectional(settings.copy, client, upstream, ending, counters).await
    } else {
        delay::bidirectional(
            client,
            upstream,
            delay.one_way,
            ending,
            sent,
            received,
            Some(delay.held),
            delay.hold.unwrap_or_else(HoldTimer::new),
        )
        .await
    }
}

/// What each direction of a flow is held for: zero unless its hop crosses zones.
fn one_way_delay(zones: Option<&ZoneHop>) -> Duration {
    zones.map_or(Duration::ZERO, |z| z.one_way_delay)
}

/// Tries the flow's primary backend, then up to `connect_retries` fallbacks,
/// reporting each backend that fails as a passive health failure. Stops at the
/// first local resource failure: every other backend would fail the same way.
async fn connect_with_fallbacks(
    frontend: &Frontend,
    settings: &FrontendConfig,
    key: &FlowKey,
    peer: SocketAddr,
) -> Result<Upstream, NoUpstream> {
    // Held only while connecting, so a connection does not pin an old snapshot.
    let routing = frontend.routing.load_full();
    // One timer per flow, taken by the first cross-zone connect and kept for the copy.
    let mut hold = None;
    for id in routing
        .snapshot
        .choices(key)
        .take(1 + settings.connect_retries)
    {
        let Some(backend) = routing.backend(id) else {
            continue;
        };
        let Some(target) = resolve_target(&routing, id, backend, peer, settings.client_address)
        else {
            continue;
        };
        match connect(&target, backend, settings.connect_timeout, &mut hold).await {
            Ok(stream) => {
                if let (Some(hop), Some(zones)) = (&routing.hop, &target.zones) {
                    hop.count_cross_zone(zones);
                }
                return Ok(Upstream {
                    stream,
                    backend: Arc::clone(backend),
                    target: target.addr,
                    seen: target.seen,
                    zones: target.zones,
                    hold,
                });
            }
            Err(ConnectError::Local(e)) => {
                // Out of fds, memory or local ports: not the backend's fault. Shed this client.
                frontend.metrics.rejected_local_resources.inc();
                warn_local_exhaustion(&e);
                return Err(NoUpstream::Shed);
            }
            Err(ConnectError::Backend(reason)) => {
                backend.metrics.connect_error(reason).inc();
                debug!(backend = %backend.name, target = %target.addr, reason = reason.as_str(), "connect failed, trying next");
                let _ = frontend.passive_failures.try_send(PassiveFailure {
                    frontend: frontend.index,
                    target: target.health_key,
                });
            }
        }
    }
    Err(NoUpstream::Unreachable)
}

/// Sends the PROXY header when the frontend announces clients that way.
async fn announce_client(upstream: &TcpStream, mode: ClientAddress, flow: Flow) -> io::Result<()> {
    match mode {
        ClientAddress::ProxyProtocolV1 | ClientAddress::ProxyProtocolV2 => {
            send_proxy_header(upstream, mode, flow.peer, flow.local).await
        }
        ClientAddress::Snat | ClientAddress::Preserve => Ok(()),
    }
}

/// The source address the target sees: what [`lb_core::target_source`] said
/// (the one rule `/explain` reports too), or, where it left the choice to the
/// kernel, the address the outgoing socket got.
fn source_seen_by_target(upstream: &TcpStream, seen: Option<IpAddr>, peer: SocketAddr) -> IpAddr {
    seen.unwrap_or_else(|| upstream.local_addr().map_or(peer.ip(), |a| a.ip()))
}

/// Closes both sides the way the copy ended: FIN after a clean end (without
/// half-close, the kernel's RST where input the other way is still unread),
/// RST or FIN after an idle timeout (as `tcp_reset_on_idle` says), RST after a
/// failure.
fn close_as_the_copy_ended<S: AsFd + Closable>(
    outcome: CopyOutcome,
    client: S,
    upstream: S,
    settings: &FrontendConfig,
    backend: &BackendRuntime,
) {
    match outcome {
        CopyOutcome::Completed => {
            syscall::close(client);
            syscall::close(upstream);
        }
        CopyOutcome::IdleTimeout => {
            backend.metrics.idle_timeouts.inc();
            if settings.tcp_reset_on_idle {
                copy::reset(client);
                copy::reset(upstream);
            } else {
                copy::close_gracefully(client);
                copy::close_gracefully(upstream);
            }
        }
        CopyOutcome::Failed(e) => {
            debug!(error = %e, "connection failed");
            // Pass the failure on as a reset rather than a clean end of stream.
            copy::reset(client);
            copy::reset(upstream);
        }
    }
}

async fn send_proxy_header(
    upstream: &TcpStream,
    mode: ClientAddress,
    client: SocketAddr,
    frontend: SocketAddr,
) -> io::Result<()> {
    let header = ProxyHeader::new(FlowProtocol::Tcp, client, frontend);
    let mut v1 = [0u8; lb_core::proxy_protocol::V1_MAX_LEN];
    let mut v2 = [0u8; lb_core::proxy_protocol::V2_MAX_LEN];
    let bytes: &[u8] = if mode == ClientAddress::ProxyProtocolV1 {
        let n = header.encode_v1(&mut v1).map_err(io::Error::other)?;
        &v1[..n]
    } else {
        let n = header.encode_v2(&mut v2);
        &v2[..n]
    };
    let mut written = 0;
    while written < bytes.len() {
        upstream.writable().await?;
        match upstream.try_write(&bytes[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Why a connect failed: the backend's doing, or this machine's.
enum ConnectError {
    Backend(ConnectErrorReason),
    Local(io::Error),
}

/// Connects to `target`, first pausing for the handshake's round trip on
/// `hold` (created here if need be) when the hop crosses zones.
async fn connect(
    target: &Target,
    backend: &BackendRuntime,
    timeout: Duration,
    hold: &mut Option<HoldTimer>,
) -> Result<TcpStream, ConnectError> {
    let started = std::time::Instant::now();
    let one_way = one_way_delay(target.zones.as_ref());
    if !one_way.is_zero() {
        // The handshake's round trip across zones, paid before the connect
        // (see delay::handshake_delay for why before); the connect metric includes it.
        let timer = hold.get_or_insert_with(HoldTimer::new);
        delay::pause(timer, delay::handshake_delay(one_way)).await;
    }
    let socket = match target.addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(ConnectError::Local)?;
    if !fds::data_plane_may_hold(socket.as_raw_fd()) {
        return Err(ConnectError::Local(fds::reserve_reached()));
    }
    let _ = socket.set_nodelay(true);
    if let Some(ip) = target.bind {
        // Defer the port choice to connect(), so binding many sources to one IP
        // can use the whole 4-tuple space instead of exhausting bind()'s ports.
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on a descriptor we own, with a valid int option value.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &one as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        if let Err(e) = socket.bind(SocketAddr::new(ip, 0)) {
            debug!(source = %ip, error = %e, "cannot bind the outgoing source address");
            return Err(ConnectError::Local(e));
        }
    }
    match tokio::time::timeout(timeout, socket.connect(target.addr)).await {
        Ok(Ok(stream)) => {
            backend
                .metrics
                .connect_duration
                .observe(started.elapsed().as_secs_f64());
            Ok(stream)
        }
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            Err(ConnectError::Backend(ConnectErrorReason::Refused))
        }
        Ok(Err(e)) if is_local_exhaustion(&e) => Err(ConnectError::Local(e)),
        Ok(Err(_)) => Err(ConnectError::Backend(ConnectErrorReason::Other)),
        Err(_) => Err(ConnectError::Backend(ConnectErrorReason::Timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether a read through tokio's readiness would make the syscall now
    /// (the closure stands in for `recv`; its WouldBlock clears readiness).
    fn would_recv_now(stream: &TcpStream) -> bool {
        let mut tried = false;
        let _ = stream.try_io(tokio::io::Interest::READABLE, || {
            tried = true;
            Err::<(), _>(io::ErrorKind::WouldBlock.into())
        });
        tried
    }

    /// A listener and a client connected to it, not accepted yet.
    async fn listener_and_client() -> (TcpListener, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        (listener, client)
    }

    /// The first bytes read from `stream` once the reactor says it is readable.
    async fn first_bytes(stream: &TcpStream) -> Vec<u8> {
        let mut buf = [0u8; 64];
        loop {
            stream.readable().await.unwrap();
            match stream.try_read(&mut buf) {
                Ok(n) => return buf[..n].to_vec(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }

    /// Bytes `stream` has sent that its peer has not acknowledged (TIOCOUTQ):
    /// 0 once they are in the other end's receive queue.
    fn unacknowledged(stream: &TcpStream) -> libc::c_int {
        let mut queued: libc::c_int = 0;
        // SAFETY: TIOCOUTQ writes one int to the pointer, on an open socket.
        let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
        assert_eq!(rc, 0, "TIOCOUTQ: {}", io::Error::last_os_error());
        queued
    }

    /// An accepted client that has sent nothing yet is not read (no `recv`
    /// that can only return EAGAIN) until the reactor reports its bytes; then
    /// they are read.
    #[tokio::test(flavor = "current_thread")]
    async fn a_client_that_has_sent_nothing_is_read_once_its_bytes_are_in() {
        use tokio::io::AsyncWriteExt;
        let (listener, mut client) = listener_and_client().await;
        let (accepted, _) = accept_client(&listener).await.unwrap();
        assert!(
            !would_recv_now(&accepted),
            "read before any bytes were reported"
        );

        client.write_all(b"hello").await.unwrap();
        let read = tokio::time::timeout(Duration::from_secs(5), first_bytes(&accepted)).await;
        assert_eq!(read.expect("the bytes were never reported"), b"hello");
    }

    /// Bytes in the socket's queue before the accept (and so before its
    /// registration) are reported all the same: waiting for the reactor loses
    /// nothing.
    #[tokio::test(flavor = "current_thread")]
    async fn bytes_in_before_the_accept_are_read_after_it() {
        use tokio::io::AsyncWriteExt;
        let (listener, mut client) = listener_and_client().await;
        client.write_all(b"early").await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while unacknowledged(&client) > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "loopback never acknowledged 5 bytes"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let (accepted, _) = accept_client(&listener).await.unwrap();
        let read = tokio::time::timeout(Duration::from_secs(5), first_bytes(&accepted)).await;
        assert_eq!(read.expect("the early bytes were never reported"), b"early");
    }

    /// The data plane skips setting TCP_NODELAY on accepted clients because
    /// they inherit it from the listener; pin that assumption.
    #[test]
    fn accepted_clients_inherit_nodelay_from_the_listener() {
        let listener = bind_listener("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        listener.set_nonblocking(false).unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.nodelay().unwrap());
    }

    /// The flow's state is boxed inside the task spawned per connection, so
    /// the task tokio moves while spawning and finishing it stays small (the
    /// flow's state, its size in `handle_connection`, was copied several
    /// times per connection).
    #[test]
    fn the_task_spawned_per_connection_is_small() {
        fn future_size<A, B, C, F>(_: fn(A, B, C) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let size = future_size(handle_connection);
        assert!(size <= 512, "handle_connection's future is {size} bytes");
    }

    #[test]
    fn the_boxed_flow_state_is_a_block_the_worker_keeps_for_the_next_flow() {
        fn layout_of<A, B, C, D, F>(_: fn(A, B, C, D) -> F) -> std::alloc::Layout {
            std::alloc::Layout::new::<F>()
        }
        // Checked in the test profile, where the state is larger (2,272 B against
        // a release build's 2,200 B on 2026-12-03), so a pass here covers release.
        let flow = layout_of(serve);
        assert!(
            crate::alloc::cacheable(flow),
            "{flow:?} would go to glibc every connection"
        );
    }

    /// Two workers' accept loops on one shared listener, here two tasks of one
    /// runtime: `(a, b)` connections each took of a burst already queued.
    fn split_of_a_queued_burst(burst: usize, one_per_turn: bool) -> (u64, u64) {
        const TWO: &str = "[[frontends]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\n\
            [frontends.health]\nkind = \"none\"\n\
            [[frontends.backends]]\nname = \"x\"\naddress = \"127.0.0.1:9\"\n\
            [[frontends]]\nname = \"b\"\nlisten = \"127.0.0.1:0\"\n\
            [frontends.health]\nkind = \"none\"\n\
            [[frontends.backends]]\nname = \"x\"\naddress = \"127.0.0.1:9\"\n";
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let config = crate::config::parse("two.toml", TWO).unwrap();
            let listener = bind_listener("127.0.0.1:0".parse().unwrap(), 64).unwrap();
            let addr = listener.local_addr().unwrap();
            let metrics = Arc::new(crate::metrics::Metrics::new());
            let ctl = crate::control::Controller::new(config, None, &[addr, addr], metrics, None)
                .unwrap();
            let (a, b) = (&ctl.frontends()[0], &ctl.frontends()[1]);
            // Queued in the listener's backlog before either loop runs.
            let _clients: Vec<std::net::TcpStream> = (0..burst)
                .map(|_| std::net::TcpStream::connect(addr).unwrap())
                .collect();
            let (stop, phase) = watch::channel(Phase::Running);
            let shared = TcpListener::from_std(listener.try_clone().unwrap()).unwrap();
            let own = TcpListener::from_std(listener).unwrap();
            let loops = [
                tokio::spawn(accept_loop(own, Arc::clone(a), phase.clone(), one_per_turn)),
                tokio::spawn(accept_loop(shared, Arc::clone(b), phase, one_per_turn)),
            ];
            let taken = || a.metrics.connections.get() + b.metrics.connections.get();
            let all_taken = async {
                while taken() < burst as u64 {
                    tokio::task::yield_now().await;
                }
            };
            tokio::time::timeout(Duration::from_secs(10), all_taken)
                .await
                .expect("every queued connection accepted");
            stop.send(Phase::Draining).unwrap();
            for l in loops {
                l.await.unwrap();
            }
            (a.metrics.connections.get(), b.metrics.connections.get())
        })
    }

    /// A shared listener's queue goes to whichever worker comes for it, one
    /// connection per turn; draining it in one go hands the first worker
    /// the whole burst while the other finds nothing.
    #[test]
    fn on_a_shared_listener_each_worker_takes_one_connection_per_turn() {
        assert_eq!(split_of_a_queued_burst(6, true), (3, 3));
        let (a, b) = split_of_a_queued_burst(6, false);
        assert_eq!((a.max(b), a.min(b)), (6, 0), "one loop took the burst");
    }
}
