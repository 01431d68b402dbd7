//! The data plane: SO_REUSEPORT listeners, accept loops, backend connects with
//! fallbacks, and the per-connection copy.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use lb_core::FlowKey;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tracing::{debug, warn, Instrument};

use crate::copy::{self, CopyOutcome};
use crate::metrics::ConnectErrorReason;
use crate::state::{BackendLease, BackendRuntime, Frontend, PassiveFailure};

/// Binds one listening socket; every worker binds its own on the same address.
pub fn bind_listener(addr: SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket.into())
}

/// Binds `count` SO_REUSEPORT listeners on `addr`. Port 0 is resolved by the
/// first bind so all of them share one real port.
pub fn bind_listeners(
    addr: SocketAddr,
    backlog: u32,
    count: usize,
) -> io::Result<(SocketAddr, Vec<std::net::TcpListener>)> {
    let first = bind_listener(addr, backlog)?;
    let actual = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..count {
        all.push(bind_listener(actual, backlog)?);
    }
    Ok((actual, all))
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}

/// Accepts until `shutdown` turns true, then drops the listener so the kernel
/// stops queueing new connections for this worker.
pub async fn accept_loop(
    listener: TcpListener,
    frontend: Arc<Frontend>,
    mut shutdown: watch::Receiver<bool>,
) {
    const MAX_BACKOFF: Duration = Duration::from_secs(1);
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                let fe = Arc::clone(&frontend);
                tokio::spawn(handle_connection(stream, peer, fe));
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
    async move {
        let _ = client.set_nodelay(true);
        let key = FlowKey::tcp(peer, local);
        let routing = frontend.routing.load_full();
        let mut connected: Option<(TcpStream, Arc<BackendRuntime>)> = None;
        for id in routing.snapshot.candidates(&key).take(1 + settings.connect_retries) {
            let Some(backend) = routing.backend(id) else { continue };
            match connect(backend, settings.connect_timeout).await {
                Ok(stream) => {
                    connected = Some((stream, Arc::clone(backend)));
                    break;
                }
                Err(reason) => {
                    backend.metrics.connect_error(reason).inc();
                    debug!(backend = %backend.name, reason = reason.as_str(), "connect failed, trying next");
                    let _ = frontend.passive_failures.try_send(PassiveFailure {
                        frontend: frontend.index,
                        backend: Arc::clone(&backend.name),
                    });
                }
            }
        }
        drop(routing);
        let Some((upstream, backend)) = connected else {
            frontend.metrics.no_backend.inc();
            debug!("no backend reachable, resetting client");
            copy::reset(client);
            return;
        };
        tracing::Span::current().record("backend", &*backend.name);
        let lease = BackendLease::new(backend);
        let m = &lease.backend.metrics;
        let (outcome, moved) = copy::proxy(settings.copy, &client, &upstream, settings.idle_timeout, &m.sent_bytes, &m.received_bytes).await;
        match outcome {
            CopyOutcome::Completed => {}
            CopyOutcome::IdleTimeout => {
                m.idle_timeouts.inc();
                if settings.tcp_reset_on_idle {
                    copy::reset(client);
                    copy::reset(upstream);
                } else {
                    copy::close_gracefully(client);
                    copy::close_gracefully(upstream);
                }
                debug!(up = moved.client_to_backend, down = moved.backend_to_client, "idle timeout");
                drop(admission);
                return;
            }
            CopyOutcome::Failed(e) => {
                debug!(error = %e, "connection failed");
                // Pass the failure on as a reset rather than a clean end of stream.
                copy::reset(client);
                copy::reset(upstream);
                drop(admission);
                return;
            }
        }
        debug!(up = moved.client_to_backend, down = moved.backend_to_client, "closed");
        drop(admission);
    }
    .instrument(span)
    .await
}

async fn connect(
    backend: &BackendRuntime,
    timeout: Duration,
) -> Result<TcpStream, ConnectErrorReason> {
    let started = std::time::Instant::now();
    let socket = match backend.addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|_| ConnectErrorReason::Other)?;
    let _ = socket.set_nodelay(true);
    match tokio::time::timeout(timeout, socket.connect(backend.addr)).await {
        Ok(Ok(stream)) => {
            backend
                .metrics
                .connect_duration
                .observe(started.elapsed().as_secs_f64());
            Ok(stream)
        }
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            Err(ConnectErrorReason::Refused)
        }
        Ok(Err(_)) => Err(ConnectErrorReason::Other),
        Err(_) => Err(ConnectErrorReason::Timeout),
    }
}
