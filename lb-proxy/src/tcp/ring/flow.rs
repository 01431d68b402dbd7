//! One flow of the ring engine, outside its I/O: what it was admitted with,
//! where its connects go (the same choices, targets, source binding and
//! failure accounting as the tokio engine's `connect_with_fallbacks`), the
//! PROXY header it sends first, its byte counters, and how it is counted and
//! logged when it ends. Its decisions are `lb_core::tcp_flow`'s; the loop in
//! [`super::worker`] carries out its operations.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_core::tcp_flow::{ConnectResult, Ended, Outcome, TcpFlow, TcpFlowConfig};
use lb_core::{FlowKey, Protocol as FlowProtocol, ProxyHeader};
use tracing::debug;

use super::ops::local_of;
use crate::config::{ClientAddress, FrontendConfig};
use crate::fds;
use crate::flowlog::FlowRecord;
use crate::metrics::ConnectErrorReason;
use crate::shutdown::CUT_OUTCOME;
use crate::state::{
    ActiveConnection, BackendLease, BackendRuntime, Frontend, HealthKey, PassiveFailure, Routing,
};
use crate::target::{is_local_exhaustion, resolve_target, warn_local_exhaustion};

/// Room for either PROXY header version.
const HEADER_MAX: usize = lb_core::proxy_protocol::V1_MAX_LEN;

/// The memory a flow's operations point into while in flight: kept in the
/// flow's slot, which outlives every operation it posted (a connect's
/// address is read when the ring takes it; a send reads its bytes as it
/// runs), not in [`Live`], which goes when the flow ends.
pub(super) struct OpMemory {
    header: [u8; HEADER_MAX],
    header_len: usize,
    /// The address of the connect in flight.
    pub addr: Option<socket2::SockAddr>,
}

impl OpMemory {
    pub fn new() -> Self {
        OpMemory {
            header: [0; HEADER_MAX],
            header_len: 0,
            addr: None,
        }
    }

    /// The PROXY header's bytes from `from` on.
    pub fn header_from(&self, from: usize) -> &[u8] {
        &self.header[from.min(self.header_len)..self.header_len]
    }
}

/// A flow admitted on a ring worker, from its accept to its close.
pub(super) struct Live {
    pub flow: TcpFlow,
    /// Client, backend (-1 while there is none).
    pub fds: [RawFd; 2],
    pub frontend: Arc<Frontend>,
    pub settings: Arc<FrontendConfig>,
    _admission: ActiveConnection,
    peer: SocketAddr,
    local: SocketAddr,
    /// When it was accepted, where a flow log wants its duration.
    started: Option<Instant>,
    key: FlowKey,
    /// The routing it chooses from, held only while connecting (so a flow
    /// does not pin an old snapshot).
    routing: Option<Arc<Routing>>,
    /// The connect in flight.
    pub attempt: Option<Attempt>,
    /// The backend, once connected.
    upstream: Option<Upstream>,
    /// Client bytes read before the backend was known (counted once it is).
    uncounted: u64,
    pub span: tracing::Span,
}

/// A connect in flight: which choice, to what, since when.
pub(super) struct Attempt {
    pub index: usize,
    pub fd: RawFd,
    backend: Arc<BackendRuntime>,
    target: SocketAddr,
    seen: Option<IpAddr>,
    health_key: HealthKey,
    started: Instant,
}

/// The connected backend.
struct Upstream {
    lease: BackendLease,
    target: SocketAddr,
    /// The source the target sees (only where a flow log wants it).
    seen_source: Option<IpAddr>,
}

/// Why a client is refused at accept.
pub(super) enum Refused {
    SourceRange,
    LocalResources,
    MaxConnections,
}

impl Live {
    /// Admits the client accepted on `frontend`, or says why not (each refusal
    /// counted as the tokio engine counts it; the caller resets the client).
    /// Its PROXY header, if any, is written into `mem`.
    pub fn admit(
        frontend: &Arc<Frontend>,
        client: RawFd,
        (peer, local): (SocketAddr, SocketAddr),
        now: Duration,
        mem: &mut OpMemory,
    ) -> Result<Live, Refused> {
        let settings = frontend.settings.load_full();
        let allowed = settings
            .source_ranges
            .as_ref()
            .is_none_or(|ranges| ranges.contains(peer.ip()));
        if !allowed {
            frontend.metrics.rejected_source_range.inc();
            return Err(Refused::SourceRange);
        }
        if !fds::data_plane_may_hold(client) {
            frontend.metrics.rejected_local_resources.inc();
            warn_local_exhaustion(&fds::reserve_reached());
            return Err(Refused::LocalResources);
        }
        frontend.metrics.connections.inc();
        let Some(admission) = frontend.try_admit(settings.max_connections) else {
            frontend.metrics.rejected_max_connections.inc();
            return Err(Refused::MaxConnections);
        };
        let header_len = encode_header(&mut mem.header, settings.client_address, peer, local);
        mem.header_len = header_len;
        let config = TcpFlowConfig {
            half_close: settings.half_close,
            idle_timeout: settings.idle_timeout,
            clock_tick: crate::clock::resolution(),
            reset_on_idle: settings.tcp_reset_on_idle,
            connect_timeout: settings.connect_timeout,
            connect_attempts: 1 + settings.connect_retries,
            header_len,
        };
        let span = tracing::debug_span!("conn", client = %peer, frontend = %frontend.name, backend = tracing::field::Empty);
        Ok(Live {
            flow: TcpFlow::new(config, now),
            fds: [client, -1],
            frontend: Arc::clone(frontend),
            started: frontend.flow_log.is_some().then(Instant::now),
            routing: Some(frontend.routing.load_full()),
            settings,
            _admission: admission,
            peer,
            local,
            key: FlowKey::tcp(peer, local),
            attempt: None,
            upstream: None,
            uncounted: 0,
            span,
        })
    }

    /// Opens the socket for connect attempt `index` (its target resolved,
    /// bound to its source) and records it, its address in `mem`; the
    /// caller posts the connect.
    /// A choice with no target, and a socket this machine cannot open, are
    /// the answers the flow takes instead.
    pub fn open_attempt(&mut self, index: usize, mem: &mut OpMemory) -> Result<(), ConnectResult> {
        let routing = self.routing.as_ref().ok_or(ConnectResult::BackendFailed)?;
        let id = routing
            .snapshot
            .choices(&self.key)
            .nth(index)
            .ok_or(ConnectResult::BackendFailed)?;
        let backend = routing.backend(id).ok_or(ConnectResult::BackendFailed)?;
        let target = resolve_target(
            routing,
            id,
            backend,
            self.peer,
            self.settings.client_address,
        )
        .ok_or(ConnectResult::BackendFailed)?;
        let fd = outgoing_socket(target.addr, target.bind).map_err(|e| {
            self.frontend.metrics.rejected_local_resources.inc();
            warn_local_exhaustion(&e);
            ConnectResult::LocalFailed
        })?;
        self.fds[1] = fd;
        mem.addr = Some(target.addr.into());
        self.attempt = Some(Attempt {
            index,
            fd,
            backend: Arc::clone(backend),
            target: target.addr,
            seen: target.seen,
            health_key: target.health_key,
            started: Instant::now(),
        });
        Ok(())
    }

    /// The connect of attempt `index` completed with `res`: the answer the
    /// flow takes, with the metrics and health reports of the tokio engine.
    /// A completion for another attempt (abandoned) changes nothing.
    pub fn connect_completed(&mut self, index: usize, res: i32) -> Option<ConnectResult> {
        if self.attempt.as_ref().map(|a| a.index) != Some(index) {
            return None;
        }
        let attempt = self.attempt.take()?;
        if res == 0 {
            self.connected(attempt);
            return Some(ConnectResult::Connected);
        }
        let e = io::Error::from_raw_os_error(-res);
        self.fds[1] = -1;
        super::ops::close_now(attempt.fd);
        if is_local_exhaustion(&e) {
            self.frontend.metrics.rejected_local_resources.inc();
            warn_local_exhaustion(&e);
            return Some(ConnectResult::LocalFailed);
        }
        let reason = if e.kind() == io::ErrorKind::ConnectionRefused {
            ConnectErrorReason::Refused
        } else {
            ConnectErrorReason::Other
        };
        self.backend_failed(&attempt, reason);
        Some(ConnectResult::BackendFailed)
    }

    /// Attempt `index` timed out: counted and reported as the tokio engine
    /// does; returns its socket for the caller to cancel and close.
    pub fn abandon(&mut self, index: usize) -> Option<RawFd> {
        if self.attempt.as_ref().map(|a| a.index) != Some(index) {
            return None;
        }
        let attempt = self.attempt.take()?;
        self.fds[1] = -1;
        self.backend_failed(&attempt, ConnectErrorReason::Timeout);
        Some(attempt.fd)
    }

    fn backend_failed(&self, attempt: &Attempt, reason: ConnectErrorReason) {
        attempt.backend.metrics.connect_error(reason).inc();
        let _span = self.span.enter();
        debug!(backend = %attempt.backend.name, target = %attempt.target, reason = reason.as_str(), "connect failed, trying next");
        let _ = self.frontend.passive_failures.try_send(PassiveFailure {
            frontend: self.frontend.index,
            target: attempt.health_key.clone(),
        });
    }

    fn connected(&mut self, attempt: Attempt) {
        let backend = &attempt.backend;
        backend
            .metrics
            .connect_duration
            .observe(attempt.started.elapsed().as_secs_f64());
        self.span.record("backend", &*backend.name);
        if self.settings.byte_metrics && self.uncounted > 0 {
            backend.metrics.sent_bytes.inc_by(self.uncounted);
        }
        self.uncounted = 0;
        let seen_source = self.frontend.flow_log.as_ref().map(|_| {
            attempt
                .seen
                .unwrap_or_else(|| local_of(attempt.fd).map_or(self.peer.ip(), |a| a.ip()))
        });
        self.routing = None;
        self.upstream = Some(Upstream {
            lease: BackendLease::new(Arc::clone(backend)),
            target: attempt.target,
            seen_source,
        });
    }

    /// `n` bytes were read from the client (`to_backend`) or the backend:
    /// counted as the tokio engine counts them, as they are read.
    pub fn count_read(&mut self, to_backend: bool, n: usize) {
        if !self.settings.byte_metrics {
            return;
        }
        match (&self.upstream, to_backend) {
            (Some(up), true) => up.lease.backend.metrics.sent_bytes.inc_by(n as u64),
            (Some(up), false) => up.lease.backend.metrics.received_bytes.inc_by(n as u64),
            (None, true) => self.uncounted += n as u64,
            (None, false) => {}
        }
    }

    /// Counts how the flow ended and writes its flow log record (a flow that
    /// reached a backend has one, as with the tokio engine).
    pub fn finish(self, ended: Ended, cut: bool) {
        let _span = self.span.enter();
        let Some(upstream) = &self.upstream else {
            if ended.outcome == Outcome::Unreachable {
                self.frontend.metrics.no_backend.inc();
            }
            debug!(outcome = ?ended.outcome, "no backend reachable, resetting client");
            return;
        };
        let backend = &upstream.lease.backend;
        let outcome = match ended.outcome {
            _ if cut => CUT_OUTCOME,
            Outcome::Completed => "closed",
            Outcome::IdleTimeout => {
                backend.metrics.idle_timeouts.inc();
                "idle-timeout"
            }
            Outcome::Cut => CUT_OUTCOME,
            Outcome::Failed(_) | Outcome::Unreachable | Outcome::Shed => "reset",
        };
        debug!(
            up = ended.to_backend,
            down = ended.from_backend,
            outcome,
            "closed"
        );
        if let Some(log) = &self.frontend.flow_log {
            log.log(FlowRecord {
                closed_at: std::time::SystemTime::now(),
                frontend: Arc::clone(&self.frontend.name),
                client: self.peer,
                frontend_addr: self.local,
                proto: FlowProtocol::Tcp,
                via: Arc::clone(&backend.name),
                seen_source: upstream.seen_source.unwrap_or(self.peer.ip()),
                endpoint: upstream.target,
                bytes_to_backend: ended.to_backend,
                bytes_from_backend: ended.from_backend,
                duration: self.started.map_or(Duration::ZERO, |at| at.elapsed()),
                outcome,
                zones: None,
            });
        }
    }
}

/// Writes the PROXY header `mode` asks for into `out`; its length (0: none).
fn encode_header(
    out: &mut [u8; HEADER_MAX],
    mode: ClientAddress,
    client: SocketAddr,
    frontend: SocketAddr,
) -> usize {
    let header = ProxyHeader::new(FlowProtocol::Tcp, client, frontend);
    match mode {
        ClientAddress::ProxyProtocolV1 => header.encode_v1(out).unwrap_or(0),
        ClientAddress::ProxyProtocolV2 => {
            let mut v2 = [0u8; lb_core::proxy_protocol::V2_MAX_LEN];
            let n = header.encode_v2(&mut v2);
            out[..n].copy_from_slice(&v2[..n]);
            n
        }
        ClientAddress::Snat | ClientAddress::Preserve => 0,
    }
}

/// A blocking socket for a connect through the ring (a non-blocking one
/// would make the ring answer EINPROGRESS instead of waiting), with
/// TCP_NODELAY, bound to `bind` when the target says so.
fn outgoing_socket(to: SocketAddr, bind: Option<IpAddr>) -> io::Result<RawFd> {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::os::fd::IntoRawFd;
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))?;
    if !fds::data_plane_may_hold(std::os::fd::AsRawFd::as_raw_fd(&socket)) {
        return Err(fds::reserve_reached());
    }
    let _ = socket.set_tcp_nodelay(true);
    if let Some(ip) = bind {
        // As the tokio engine binds: the port left to connect(), so many
        // sources on one IP use the whole 4-tuple space.
        bind_address_no_port(&socket);
        socket
            .bind(&SocketAddr::new(ip, 0).into())
            .inspect_err(|e| {
                debug!(source = %ip, error = %e, "cannot bind the outgoing source address");
            })?;
    }
    Ok(socket.into_raw_fd())
}

/// IP_BIND_ADDRESS_NO_PORT: bind(2) leaves the port to connect(2).
fn bind_address_no_port(socket: &socket2::Socket) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on a socket we own, with a valid int option value.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}
