//! The sockmap copy engine (`copy = "sockmap"`): once a flow's backend is
//! connected (and its PROXY header written), both sockets go into a BPF
//! SOCKHASH whose stream-verdict program (`bpf/sockmap.bpf.c`, built by
//! `build.rs`) redirects every byte either side receives to the other side's
//! egress, inside the kernel. The payload never reaches userspace; this
//! module only watches the flow's edges:
//!
//! - **Bytes queued before the insert** (a client's first request usually
//!   is): the verdict runs on the next `data_ready`, which may never come. A
//!   `recv(MSG_PEEK)` on a member socket runs it over what is queued (the
//!   kernel's tcp_bpf recvmsg does that for data that arrived before the
//!   socket joined), so both sockets are kicked right after the insert.
//!   Userspace writes nothing after the insert, so order is kept.
//! - **Bytes that find no peer** (the backend joins first; a server that
//!   speaks first may send before the client joins): the program leaves
//!   them on the socket and marks that side stranded, and from then on
//!   leaves every byte of it there, in order. Userspace copies that one
//!   direction itself (the sockmap recvmsg reads what was left; nothing of
//!   it was redirected before), FIN included; the other stays in the
//!   kernel. Bytes are the program's count plus userspace's. If the client
//!   cannot join after such bytes, they went with the backend's removal,
//!   and the flow fails rather than fall back without them.
//! - **Half-close**: a redirect is sent asynchronously (the psock backlog),
//!   so at EOF from one side the other side's write half is shut only once
//!   every byte the program counted has entered that socket's stream
//!   (`tcpi_bytes_acked + SIOCOUTQ`, measured from the insert).
//! - **Idle timeout**: the program stamps each side's last redirect
//!   (CLOCK_MONOTONIC, as [`Instant`]); the deadline is computed from it.
//! - **Counts**: bytes per side come from the program's map at the end
//!   (byte metrics and the flow log), and both sockets and both map entries
//!   are removed before the flow is closed ([`flows_gauge`] counts the flows
//!   in the maps).
//!
//! Where the engine cannot run (not root, the kernel refuses, a build
//! without clang, or the test hook [`DISABLE_ENV`]), [`engine`] says so once,
//! with a warning naming the reason, and those frontends copy with `auto`; a
//! flow whose sockets cannot be inserted (maps full, the client already
//! half-closed) does the same, silently.

use std::future::Future;
use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use prometheus::{IntCounter, IntGauge};
use tokio::io::{Interest, Ready};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::warn;

use super::copy::{shutdown_write, CopyMode, CopyOutcome, Transferred};
use crate::config::FrontendConfig;

/// The BPF object `build.rs` compiled (empty when it could not).
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/sockmap.bpf.o"));

/// Test hook: when set (to anything) at startup, the engine reports itself
/// unavailable, as it would without root, so the fallback can be tested.
pub const DISABLE_ENV: &str = "LB_PROXY_SOCKMAP_DISABLE";

/// How soon a half-close first checks again whether the kernel has sent on
/// every byte it counted (only while one is waiting: a redirect is usually
/// sent in microseconds, but the peer's send buffer may be full); each
/// check that finds it still waiting doubles the wait, up to [`DRAIN_POLL_MAX`].
const DRAIN_POLL: Duration = Duration::from_millis(1);

/// The longest wait between two such checks.
const DRAIN_POLL_MAX: Duration = Duration::from_millis(50);

/// The buffer a stranded direction is copied through (only the rare flow
/// whose server spoke before both sockets joined has one).
const STRANDED_BUF: usize = 16 * 1024;

/// One side of a flow in the `flows` map; `struct flow_side` in the C source.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct FlowSide {
    peer: u64,
    bytes: u64,
    last_seen_ns: u64,
    /// Bytes the program left on this socket (its peer was not in the
    /// map); non-zero from then on, and userspace copies this direction.
    stranded: u64,
}

/// 1 when the engine loaded and attached, else 0 (registered by [`crate::metrics`]).
pub fn available_gauge() -> &'static IntGauge {
    static G: LazyLock<IntGauge> = LazyLock::new(|| {
        IntGauge::new(
            "lb_sockmap_available",
            "1 when the sockmap copy engine is loaded (copy = \"sockmap\" forwards in the kernel), 0 when those frontends copy with auto.",
        )
        .expect("valid metric")
    });
    &G
}

/// Flows whose sockets are in the engine's maps right now.
pub fn flows_gauge() -> &'static IntGauge {
    static G: LazyLock<IntGauge> = LazyLock::new(|| {
        IntGauge::new(
            "lb_sockmap_flows",
            "Flows forwarded by the sockmap engine right now (their two sockets and map entries).",
        )
        .expect("valid metric")
    });
    &G
}

/// Flows the engine has taken (each counted when it joined the maps).
pub fn forwarded_counter() -> &'static IntCounter {
    static C: LazyLock<IntCounter> = LazyLock::new(|| {
        IntCounter::new(
            "lb_sockmap_forwarded_flows_total",
            "Flows forwarded by the sockmap engine; the others of a copy = \"sockmap\" frontend (engine unavailable, maps full, client already gone) copied with auto.",
        )
        .expect("valid metric")
    });
    &C
}

/// The loaded program and its two maps, for the life of the process.
pub struct Engine {
    /// Socket cookie → socket.
    socks: OwnedFd,
    /// Socket cookie → [`FlowSide`].
    flows: OwnedFd,
}

static ENGINE: OnceLock<Option<Engine>> = OnceLock::new();

/// At startup, and on a reload before it publishes: loads the engine when a
/// frontend asks for it, so its warning (if it cannot run) comes before
/// the first flow, off the workers.
pub fn load_if_wanted(frontends: &[FrontendConfig]) {
    if frontends.iter().any(|f| f.copy == CopyMode::Sockmap) {
        engine();
    }
}

/// The engine, loaded on first use (startup, when a frontend asks for it);
/// `None`, after one warning, where it cannot run.
pub fn engine() -> Option<&'static Engine> {
    ENGINE
        .get_or_init(|| match load_unwound() {
            Ok(engine) => {
                available_gauge().set(1);
                Some(engine)
            }
            Err(why) => {
                available_gauge().set(0);
                warn!(reason = %why, "sockmap copy engine unavailable: frontends with copy = \"sockmap\" copy with auto");
                None
            }
        })
        .as_ref()
}

/// Why the engine cannot run.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("built without clang: no BPF program")]
    NotBuilt,
    #[error("disabled by {DISABLE_ENV}")]
    Disabled,
    #[error("{0}")]
    Load(String),
}

/// [`load`], where a panic (in the loader library, on a kernel it does not
/// expect) is one more reason the engine is unavailable: startup never fails for it.
fn load_unwound() -> Result<Engine, Unavailable> {
    std::panic::catch_unwind(load)
        .unwrap_or_else(|_| Err(Unavailable::Load("the BPF loader panicked".into())))
}

fn load() -> Result<Engine, Unavailable> {
    if std::env::var_os(DISABLE_ENV).is_some() {
        return Err(Unavailable::Disabled);
    }
    if OBJECT.is_empty() {
        return Err(Unavailable::NotBuilt);
    }
    let mut ebpf = aya::Ebpf::load(OBJECT).map_err(|e| failed("loading the BPF object", e))?;
    let socks = map_fd(&ebpf, "socks")?;
    let flows = map_fd(&ebpf, "flows")?;
    verdict(&mut ebpf)?
        .load()
        .map_err(|e| failed("loading the verdict program", e))?;
    let sockhash =
        aya::maps::SockHash::<_, u64>::try_from(ebpf.map("socks").expect("found by map_fd"))
            .map_err(|e| failed("map socks", e))?
            .fd()
            .try_clone()
            .map_err(|e| failed("dup of the sockhash fd", e))?;
    verdict(&mut ebpf)?
        .attach(&sockhash)
        .map_err(|e| failed("attaching the verdict to the sockhash", e))?;
    // The program stays attached while `ebpf` (its link) is alive: for the
    // life of the process, which is the engine's.
    Box::leak(Box::new(ebpf));
    Ok(Engine { socks, flows })
}

fn failed(what: &str, e: impl std::fmt::Display) -> Unavailable {
    Unavailable::Load(format!("{what}: {e}"))
}

fn verdict(ebpf: &mut aya::Ebpf) -> Result<&mut aya::programs::SkSkb, Unavailable> {
    ebpf.program_mut("redirect")
        .ok_or_else(|| Unavailable::Load("program redirect missing".into()))?
        .try_into()
        .map_err(|e| failed("program redirect", e))
}

/// A map's fd of our own, for the bpf(2) element commands.
fn map_fd(ebpf: &aya::Ebpf, name: &str) -> Result<OwnedFd, Unavailable> {
    let map = match ebpf.map(name) {
        Some(aya::maps::Map::SockHash(m)) | Some(aya::maps::Map::HashMap(m)) => m,
        _ => return Err(Unavailable::Load(format!("map {name} missing"))),
    };
    map.fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| failed("dup of a map fd", e))
}

/// Why a flow could not be handed to the kernel (it is copied by `auto` instead).
#[derive(Debug)]
pub struct NotInserted(pub io::Error);

/// Forwards the flow inside the kernel until both sides have finished, one
/// fails, or nothing moves for `idle`; then takes it out of the maps and
/// counts its bytes. `Err` when it could not be inserted (nothing moved yet).
pub async fn bidirectional(
    engine: &Engine,
    client: &TcpStream,
    backend: &TcpStream,
    idle: Duration,
    sent_to_backend: Option<&IntCounter>,
    received_from_backend: Option<&IntCounter>,
) -> Result<(CopyOutcome, Transferred), NotInserted> {
    let flow = match engine.insert(client, backend) {
        Ok(flow) => flow,
        Err(Refused::Fallback(e)) => return Err(NotInserted(e)),
        Err(Refused::Lost(e)) => return Ok((CopyOutcome::Failed(e), Transferred::default())),
    };
    let copied = Copied::default();
    let outcome = watch(engine, &flow, client, backend, idle, &copied).await;
    let (up, down) = engine.remove(&flow);
    let moved = Transferred {
        client_to_backend: up.bytes + copied.up.load(Relaxed),
        backend_to_client: down.bytes + copied.down.load(Relaxed),
        spliced: 0,
    };
    if let Some(c) = sent_to_backend {
        c.inc_by(moved.client_to_backend);
    }
    if let Some(c) = received_from_backend {
        c.inc_by(moved.backend_to_client);
    }
    Ok((outcome, moved))
}

/// Why [`Engine::insert`] did not take a flow.
enum Refused {
    /// Nothing moved: the flow can be copied by `auto`.
    Fallback(io::Error),
    /// The client could not join after the backend had, and bytes the
    /// backend sent meanwhile were left on it and went with its removal:
    /// the flow can only fail (never lose bytes silently).
    Lost(io::Error),
}

/// Why [`Engine::insert_sockets`] failed.
enum Insert {
    /// Before any socket joined.
    Before(io::Error),
    /// The client's insert, after the backend (cookie `backend`) had joined;
    /// the backend is out of the map again, its `flows` entry is not.
    Client { error: io::Error, backend: u64 },
}

impl From<io::Error> for Insert {
    fn from(e: io::Error) -> Self {
        Insert::Before(e)
    }
}

/// Bytes userspace copied itself, each direction: those of a stranded side.
#[derive(Default)]
struct Copied {
    up: AtomicU64,
    down: AtomicU64,
    /// CLOCK_MONOTONIC ns of the last byte userspace moved (as the program's `last_seen_ns`).
    last_ns: AtomicU64,
}

/// A flow in the maps: each socket's cookie, and how many bytes each stream
/// had been given when it joined (what the kernel's redirects add is counted from there).
struct Inserted {
    client: u64,
    backend: u64,
    client_written: u64,
    backend_written: u64,
    joined: Instant,
}

impl Engine {
    /// Writes both map entries, then inserts both sockets, then kicks both
    /// so bytes queued before the insert are forwarded.
    fn insert(&self, client: &TcpStream, backend: &TcpStream) -> Result<Inserted, Refused> {
        self.insert_sockets(client, backend).map_err(|e| match e {
            Insert::Before(e) => Refused::Fallback(e),
            Insert::Client { error, backend: b } => {
                // The backend was in the map: every byte it received since
                // was redirected nowhere and left on it (counted as
                // stranded), and its removal just purged them.
                if self.side(b).stranded == 0 {
                    let _ = delete(&self.flows, &b);
                    Refused::Fallback(error)
                } else {
                    let _ = delete(&self.flows, &b);
                    Refused::Lost(io::Error::other(format!(
                        "sockmap: the client could not join ({error}) after the backend had sent bytes"
                    )))
                }
            }
        })
    }

    fn insert_sockets(&self, client: &TcpStream, backend: &TcpStream) -> Result<Inserted, Insert> {
        let (c, b) = (cookie(client)?, cookie(backend)?);
        let flow = Inserted {
            client: c,
            backend: b,
            client_written: written(client)?,
            backend_written: written(backend)?,
            joined: Instant::now(),
        };
        let side = |peer| FlowSide {
            peer,
            ..FlowSide::default()
        };
        update(&self.flows, &c, &side(b), BPF_NOEXIST)?;
        if let Err(e) = update(&self.flows, &b, &side(c), BPF_NOEXIST) {
            let _ = delete(&self.flows, &c);
            return Err(Insert::Before(e));
        }
        // The backend joins first: from the moment the client joins, its
        // bytes are redirected, so its peer must be there already. (Bytes the
        // backend sends in the instant between the two inserts find no peer;
        // the verdict leaves them, and every later byte of that side, on the
        // socket, and `watch` copies that direction itself.)
        let socket = |s: &TcpStream| s.as_raw_fd() as u32;
        if let Err(e) = update(&self.socks, &b, &socket(backend), BPF_NOEXIST) {
            let _ = delete(&self.flows, &c);
            let _ = delete(&self.flows, &b);
            return Err(Insert::Before(e));
        }
        if let Err(error) = update(&self.socks, &c, &socket(client), BPF_NOEXIST) {
            let _ = delete(&self.socks, &b);
            let _ = delete(&self.flows, &c);
            // The backend's entry stays until `insert` has read its count.
            return Err(Insert::Client { error, backend: b });
        }
        flows_gauge().inc();
        forwarded_counter().inc();
        kick(backend);
        kick(client);
        Ok(flow)
    }

    /// Takes both sockets out (no verdict runs for them after this), then
    /// reads and deletes both entries: (client's side, backend's side).
    fn remove(&self, flow: &Inserted) -> (FlowSide, FlowSide) {
        let _ = delete(&self.socks, &flow.client);
        let _ = delete(&self.socks, &flow.backend);
        let up = self.side(flow.client);
        let down = self.side(flow.backend);
        let _ = delete(&self.flows, &flow.client);
        let _ = delete(&self.flows, &flow.backend);
        flows_gauge().dec();
        (up, down)
    }

    /// Whether the program has left bytes of this side on its socket.
    fn stranded(&self, cookie: u64) -> bool {
        self.side(cookie).stranded != 0
    }

    fn side(&self, cookie: u64) -> FlowSide {
        lookup(&self.flows, &cookie).unwrap_or_default()
    }
}

/// What wakes the watch: end of stream, and errors, which the kernel
/// reports alone (EPOLLERR without EPOLLIN) when a redirect to the socket fails.
const WATCHED: Interest = Interest::READABLE.add(Interest::ERROR);

/// One direction's end of stream as the engine sees it.
#[derive(Default)]
struct Half {
    /// The source sent FIN (or was shut down).
    eof: bool,
    /// The FIN was passed on: the destination's write half is shut.
    passed: bool,
}

/// A direction userspace copies (its source is stranded); done at its EOF.
type UserCopy<'a> = Pin<Box<dyn Future<Output = io::Result<()>> + Send + 'a>>;

/// Waits on the flow's edges: EOF or error on either socket, the idle
/// deadline, and, after an EOF, the moment its half-close may be passed on.
/// A side the program stranded (see `insert_sockets`) is copied here.
async fn watch(
    engine: &Engine,
    flow: &Inserted,
    client: &TcpStream,
    backend: &TcpStream,
    idle: Duration,
    copied: &Copied,
) -> CopyOutcome {
    let (mut up, mut down) = (Half::default(), Half::default());
    let mut up_copy: Option<UserCopy<'_>> = None;
    let mut down_copy: Option<UserCopy<'_>> = None;
    let start_up = || copy_stranded(client, backend, &copied.up, &copied.last_ns);
    let start_down = || copy_stranded(backend, client, &copied.down, &copied.last_ns);
    // Bytes that arrived between the two inserts were stranded already.
    if engine.stranded(flow.backend) {
        down_copy = Some(start_down());
    }
    if engine.stranded(flow.client) {
        up_copy = Some(start_up());
    }
    let idle_timer = tokio::time::sleep(idle);
    tokio::pin!(idle_timer);
    let mut drain_poll = DRAIN_POLL;
    loop {
        if up.passed && down.passed {
            return CopyOutcome::Completed;
        }
        let draining = (up.eof && !up.passed) || (down.eof && !down.passed);
        tokio::select! {
            ready = client.ready(WATCHED), if !up.eof && up_copy.is_none() => {
                match edge(engine, flow.client, client, ready) {
                    Ok(Edge::Quiet) => {}
                    Ok(Edge::Eof) => up.eof = true,
                    Ok(Edge::Stranded) => up_copy = Some(start_up()),
                    Err(e) => return CopyOutcome::Failed(e),
                }
            }
            ready = backend.ready(WATCHED), if !down.eof && down_copy.is_none() => {
                match edge(engine, flow.backend, backend, ready) {
                    Ok(Edge::Quiet) => {}
                    Ok(Edge::Eof) => down.eof = true,
                    Ok(Edge::Stranded) => down_copy = Some(start_down()),
                    Err(e) => return CopyOutcome::Failed(e),
                }
            }
            copied = run(&mut up_copy), if !up.passed => match copied {
                Ok(()) => up = Half { eof: true, passed: true },
                Err(e) => return CopyOutcome::Failed(e),
            },
            copied = run(&mut down_copy), if !down.passed => match copied {
                Ok(()) => down = Half { eof: true, passed: true },
                Err(e) => return CopyOutcome::Failed(e),
            },
            _ = tokio::time::sleep(drain_poll), if draining => {
                drain_poll = (drain_poll * 2).min(DRAIN_POLL_MAX);
            }
            _ = &mut idle_timer => {
                let deadline = last_activity(engine, flow, copied) + idle;
                if deadline <= Instant::now() {
                    return CopyOutcome::IdleTimeout;
                }
                idle_timer.as_mut().reset(deadline);
            }
        }
        let before = (up.passed, down.passed);
        let passed = pass_fin(engine, &mut up, flow.client, backend, flow.backend_written)
            .and_then(|()| pass_fin(engine, &mut down, flow.backend, client, flow.client_written));
        if let Err(e) = passed {
            return CopyOutcome::Failed(e);
        }
        if (up.passed, down.passed) != before {
            // A FIN went on: the other half, if it waits, starts quick again.
            drain_poll = DRAIN_POLL;
        }
    }
}

/// The direction's userspace copy, or never (none started).
async fn run(copy: &mut Option<UserCopy<'_>>) -> io::Result<()> {
    match copy {
        Some(copy) => copy.await,
        None => std::future::pending().await,
    }
}

/// Copies a stranded side's bytes to its peer: every byte of that direction
/// is in the source's ingress queue, in order (the program redirected none
/// of them: a side is stranded from its first skb that found no peer, and
/// it has a peer from the second insert on), and the sockmap recvmsg reads
/// that queue. At EOF, passes the FIN on after the bytes.
fn copy_stranded<'a>(
    from: &'a TcpStream,
    to: &'a TcpStream,
    moved: &'a AtomicU64,
    last_ns: &'a AtomicU64,
) -> UserCopy<'a> {
    Box::pin(async move {
        let mut buf = vec![0u8; STRANDED_BUF];
        loop {
            from.readable().await?;
            let n = match from.try_read(&mut buf) {
                Ok(0) => return shutdown_write(to),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            let mut at = 0;
            while at < n {
                to.writable().await?;
                match to.try_write(&buf[at..n]) {
                    Ok(k) => at += k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            moved.fetch_add(n as u64, Relaxed);
            last_ns.store(monotonic_ns(), Relaxed);
        }
    })
}

/// What a readiness event on a member socket says.
enum Edge {
    /// A wakeup with nothing to read (the verdict took the data).
    Quiet,
    /// End of stream, every byte before it forwarded by the program.
    Eof,
    /// The program left this side's bytes on the socket: userspace copies them.
    Stranded,
}

/// Reads a readiness event on the member socket `me`: `Err` when it failed.
fn edge(
    engine: &Engine,
    me: u64,
    stream: &TcpStream,
    ready: io::Result<Ready>,
) -> io::Result<Edge> {
    let something = end_of_stream(stream, ready)?;
    // Checked after the kick in `end_of_stream`: the verdict has run over
    // everything queued, so a FIN right behind stranded bytes is seen here.
    if engine.stranded(me) {
        return Ok(Edge::Stranded);
    }
    match something {
        None => Ok(Edge::Quiet),
        Some(true) => Ok(Edge::Eof),
        Some(false) => Err(io::Error::other(
            "sockmap: bytes left for userspace on a forwarded socket",
        )),
    }
}

/// What a readiness event on a member socket shows: `Some(true)` at end of
/// stream, `Some(false)` when bytes wait on the socket, `None` for a wakeup
/// with nothing to read (the verdict took the data); `Err` when it failed.
fn end_of_stream(stream: &TcpStream, ready: io::Result<Ready>) -> io::Result<Option<bool>> {
    let ready = ready?;
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    if ready.is_error() {
        // Nothing pending after all: clear the readiness so the next wait waits.
        let _ = stream.try_io(Interest::ERROR, || {
            Err::<(), _>(io::ErrorKind::WouldBlock.into())
        });
    }
    if ready.is_read_closed() {
        // Make sure every skb before the FIN went through the verdict (and
        // was counted) before the half-close compares counts.
        kick(stream);
        return Ok(Some(true));
    }
    match stream.try_io(Interest::READABLE, || peek(stream.as_raw_fd())) {
        Ok(0) => Ok(Some(true)),
        Ok(_) => Ok(Some(false)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// Passes `half`'s FIN on to `to` once every byte the program redirected
/// from `from` has entered `to`'s stream (`to_written` was its count at the insert).
fn pass_fin(
    engine: &Engine,
    half: &mut Half,
    from: u64,
    to: &TcpStream,
    to_written: u64,
) -> io::Result<()> {
    if !half.eof || half.passed {
        return Ok(());
    }
    let redirected = engine.side(from).bytes;
    let sent_on = written(to)?.wrapping_sub(to_written);
    // A destination that can no longer send (shut down by a cut, or closed)
    // will take no more: waiting would only wait for the idle timeout.
    if sent_on >= redirected || !can_send(to) {
        shutdown_write(to)?;
        half.passed = true;
    }
    Ok(())
}

/// The flow's last byte moved in either direction (by the program or by
/// userspace), or when it joined.
fn last_activity(engine: &Engine, flow: &Inserted, copied: &Copied) -> Instant {
    let seen = engine
        .side(flow.client)
        .last_seen_ns
        .max(engine.side(flow.backend).last_seen_ns)
        .max(copied.last_ns.load(Relaxed));
    let (now, now_ns) = (Instant::now(), monotonic_ns());
    let ago = Duration::from_nanos(now_ns.saturating_sub(seen));
    now.checked_sub(ago)
        .map_or(flow.joined, |at| at.max(flow.joined))
}

fn monotonic_ns() -> u64 {
    let mut ts = MaybeUninit::<libc::timespec>::zeroed();
    // SAFETY: clock_gettime writes a timespec into valid memory; CLOCK_MONOTONIC always exists.
    let ts = unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, ts.as_mut_ptr());
        ts.assume_init()
    };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

// ---- sockets -------------------------------------------------------------

/// `getsockopt(SO_COOKIE)`: the key both maps use.
fn cookie(stream: &TcpStream) -> io::Result<u64> {
    getsockopt(stream.as_raw_fd(), libc::SOL_SOCKET, libc::SO_COOKIE)
}

fn tcp_info(fd: RawFd) -> io::Result<libc::tcp_info> {
    getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO)
}

fn getsockopt<T: Copy>(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<T> {
    let mut value = MaybeUninit::<T>::zeroed();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` has room for `len` bytes; the kernel writes at most that many.
    let rc = unsafe { libc::getsockopt(fd, level, name, value.as_mut_ptr().cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised plain data, partly or wholly overwritten by the kernel.
    Ok(unsafe { value.assume_init() })
}

/// Bytes given to the socket's stream so far, up to a constant: `write_seq`,
/// as bytes acked (`tcpi_bytes_acked`) plus bytes not yet acked
/// (`SIOCOUTQ`). An ACK landing between the reads changes the first, so it
/// is read again until it held still.
fn written(stream: &TcpStream) -> io::Result<u64> {
    let fd = stream.as_raw_fd();
    let mut acked = tcp_info(fd)?.tcpi_bytes_acked;
    loop {
        let mut queued: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int.
        if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let again = tcp_info(fd)?.tcpi_bytes_acked;
        if again == acked {
            return Ok(acked + queued.max(0) as u64);
        }
        acked = again;
    }
}

/// Whether the socket can still send: it has not sent its FIN, nor closed.
fn can_send(stream: &TcpStream) -> bool {
    const TCP_ESTABLISHED: u8 = 1;
    const TCP_CLOSE_WAIT: u8 = 8;
    tcp_info(stream.as_raw_fd())
        .is_ok_and(|i| matches!(i.tcpi_state, TCP_ESTABLISHED | TCP_CLOSE_WAIT))
}

fn peek(fd: RawFd) -> io::Result<usize> {
    let mut byte = 0u8;
    // SAFETY: a one-byte buffer we own.
    let n = unsafe {
        libc::recv(
            fd,
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Runs the verdict over whatever the socket has queued: the kernel's
/// sockmap recvmsg does that first (for bytes that arrived before the
/// socket joined the map). What it returns does not matter.
fn kick(stream: &TcpStream) {
    let _ = peek(stream.as_raw_fd());
}

// ---- bpf(2) map operations ------------------------------------------------

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
/// Update flag: create only.
const BPF_NOEXIST: u64 = 1;

/// The `bpf_attr` layout of the map element commands.
#[repr(C)]
struct MapElem {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn map_command(
    cmd: libc::c_long,
    map: &OwnedFd,
    key: *const u64,
    value: u64,
    flags: u64,
) -> io::Result<()> {
    let attr = MapElem {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key as u64,
        value,
        flags,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix for the command; key and
    // value point to memory of the map's key and value sizes, alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &attr as *const MapElem,
            size_of::<MapElem>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn update<V>(map: &OwnedFd, key: &u64, value: &V, flags: u64) -> io::Result<()> {
    map_command(
        BPF_MAP_UPDATE_ELEM,
        map,
        key,
        value as *const V as u64,
        flags,
    )
}

fn lookup(map: &OwnedFd, key: &u64) -> io::Result<FlowSide> {
    let mut value = FlowSide::default();
    map_command(
        BPF_MAP_LOOKUP_ELEM,
        map,
        key,
        &mut value as *mut FlowSide as u64,
        0,
    )?;
    Ok(value)
}

fn delete(map: &OwnedFd, key: &u64) -> io::Result<()> {
    map_command(BPF_MAP_DELETE_ELEM, map, key, 0, 0)
}
