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
//! - **Counts**: bytes per side come from the program's map: added to the
//!   byte metrics while the flow runs (every [`BYTE_TICK`] while bytes move)
//!   and at its end, and given whole to the flow log at the end. Both
//!   sockets and both map entries are removed before the flow is closed
//!   ([`flows_gauge`] counts the flows in the maps).
//! - **Wakeups**: while the kernel forwards a flow its sockets are out of
//!   tokio's reactor; the worker's edge set (`edges.rs`) wakes it for end
//!   of stream and errors only, never for a packet.
//!
//! Where the engine cannot run (not root, the kernel refuses, a build
//! without clang, or the test hook [`DISABLE_ENV`]), [`engine`] says so once,
//! with a warning naming the reason, and those frontends copy with `auto`; a
//! flow whose sockets cannot be inserted (maps full, the client already
//! half-closed) does the same, silently.

mod edges;
pub(crate) mod sys;
mod watch;

use std::io;
use std::net::TcpStream as StdTcpStream;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use prometheus::{IntCounter, IntGauge};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::warn;

use super::copy::{self, CopyMode, CopyOutcome, Transferred};
use crate::config::FrontendConfig;
use edges::Watched;
use sys::{cookie, delete, kick, lookup, update, written, BPF_NOEXIST};

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

/// How soon a running flow's byte counts (kept by the program) are first
/// read and added to the byte metrics (and checked for a stranded side),
/// and again after a tick that found bytes: a
/// scrape sees a long flow's bytes as they move, as with `auto`, not all at
/// its end. A tick that finds none doubles the wait, up to [`BYTE_TICK_MAX`],
/// so an idle flow costs a wakeup and two map lookups a minute at most.
const BYTE_TICK: Duration = Duration::from_secs(1);

/// The longest wait between two byte-metric ticks of a flow.
const BYTE_TICK_MAX: Duration = Duration::from_secs(60);

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

/// A flow the kernel forwards: both sockets in the maps and out of tokio's
/// reactor (a packet wakes nothing in userspace), until [`Forward::run`] ends.
pub struct Forward {
    // Dropped in this order: out of the maps, out of the edge set, closed.
    joined: Joined,
    watched: Watched,
    client: StdTcpStream,
    backend: StdTcpStream,
}

/// A flow's entries in the maps. They are taken out by [`Forward::run`], or
/// on drop if the flow's task went away first: none is left behind.
struct Joined {
    engine: &'static Engine,
    flow: Inserted,
    removed: AtomicBool,
}

impl Joined {
    /// Takes the flow out of the maps, once: its sides' final counts.
    fn remove(&self) -> Option<(FlowSide, FlowSide)> {
        let first = !self.removed.swap(true, Relaxed);
        first.then(|| self.engine.remove(&self.flow))
    }
}

impl Drop for Joined {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Why a flow was not handed to the kernel.
pub enum NotForwarded {
    /// Nothing moved: the flow is copied with `auto`, on these streams.
    Fallback {
        why: io::Error,
        client: TcpStream,
        backend: TcpStream,
    },
    /// The flow cannot go on (bytes the kernel took could not reach their
    /// peer, or a socket could not leave the reactor): it failed, and its
    /// sockets were reset.
    Failed(io::Error),
}

impl Forward {
    /// Takes both sockets out of tokio's reactor, then inserts them (see
    /// [`Engine::insert`]).
    pub fn start(
        engine: &'static Engine,
        client: TcpStream,
        backend: TcpStream,
    ) -> Result<Forward, NotForwarded> {
        let (client, backend) = leave_reactor(client, backend)?;
        // In the edge set before the maps: a flow the set cannot take has
        // moved nothing yet and can still be copied by userspace.
        let watched = match Watched::register(client.as_raw_fd(), backend.as_raw_fd()) {
            Ok(watched) => watched,
            Err(why) => return Err(back_to_the_reactor(why, client, backend)),
        };
        match engine.insert(&client, &backend) {
            Ok(flow) => Ok(Forward {
                joined: Joined {
                    engine,
                    flow,
                    removed: AtomicBool::new(false),
                },
                watched,
                client,
                backend,
            }),
            Err(Refused::Lost(e)) => {
                drop(watched);
                copy::reset(client);
                copy::reset(backend);
                Err(NotForwarded::Failed(e))
            }
            Err(Refused::Fallback(why)) => {
                drop(watched);
                Err(back_to_the_reactor(why, client, backend))
            }
        }
    }

    /// The client's socket (the flow registry cuts it at shutdown).
    pub fn client(&self) -> &StdTcpStream {
        &self.client
    }

    /// The backend's socket.
    pub fn backend(&self) -> &StdTcpStream {
        &self.backend
    }

    /// Forwards until both sides have finished, one fails, or nothing moves
    /// for `idle`; then takes the flow out of the maps and counts its bytes.
    pub async fn run(
        &self,
        idle: Duration,
        sent_to_backend: Option<&IntCounter>,
        received_from_backend: Option<&IntCounter>,
    ) -> (CopyOutcome, Transferred) {
        let copied = Copied::default();
        let metrics = ByteMetrics::new(sent_to_backend, received_from_backend);
        let sockets = watch::Sockets {
            client: &self.client,
            backend: &self.backend,
            edges: &self.watched,
        };
        let Joined { engine, flow, .. } = &self.joined;
        let outcome = watch::watch(engine, flow, &sockets, idle, &copied, &metrics).await;
        let (up, down) = self.joined.remove().unwrap_or_default();
        let moved = Transferred {
            client_to_backend: up.bytes + copied.up.load(Relaxed),
            backend_to_client: down.bytes + copied.down.load(Relaxed),
            spliced: 0,
        };
        metrics.publish(moved.client_to_backend, moved.backend_to_client);
        (outcome, moved)
    }

    /// The two sockets, (client, backend), to be closed (out of the maps).
    pub fn into_streams(self) -> (StdTcpStream, StdTcpStream) {
        let Forward {
            joined,
            watched,
            client,
            backend,
        } = self;
        drop((joined, watched));
        (client, backend)
    }
}

/// A flow the engine did not take after all, back in tokio's reactor to be
/// copied by `auto`; failed (and reset) if a stream cannot go back.
fn back_to_the_reactor(
    why: io::Error,
    client: StdTcpStream,
    backend: StdTcpStream,
) -> NotForwarded {
    let client = match TcpStream::from_std(client) {
        Ok(client) => client,
        Err(e) => {
            copy::reset(backend);
            return NotForwarded::Failed(e);
        }
    };
    match TcpStream::from_std(backend) {
        Ok(backend) => NotForwarded::Fallback {
            why,
            client,
            backend,
        },
        Err(e) => {
            copy::reset(client);
            NotForwarded::Failed(e)
        }
    }
}

/// Both streams as plain sockets, out of tokio's reactor: its registration
/// would wake the worker for every packet the verdict forwards. (A stream
/// that fails to leave is closed by tokio; the other is reset.)
fn leave_reactor(
    client: TcpStream,
    backend: TcpStream,
) -> Result<(StdTcpStream, StdTcpStream), NotForwarded> {
    let client = match client.into_std() {
        Ok(client) => client,
        Err(e) => {
            copy::reset(backend);
            return Err(NotForwarded::Failed(e));
        }
    };
    match backend.into_std() {
        Ok(backend) => Ok((client, backend)),
        Err(e) => {
            copy::reset(client);
            Err(NotForwarded::Failed(e))
        }
    }
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

/// A forwarded flow's byte metrics (when `byte_metrics` is on), and how much
/// of each direction's total has been added to them so far.
struct ByteMetrics<'a> {
    up: Option<&'a IntCounter>,
    down: Option<&'a IntCounter>,
    added_up: AtomicU64,
    added_down: AtomicU64,
}

impl<'a> ByteMetrics<'a> {
    fn new(up: Option<&'a IntCounter>, down: Option<&'a IntCounter>) -> Self {
        ByteMetrics {
            up,
            down,
            added_up: AtomicU64::new(0),
            added_down: AtomicU64::new(0),
        }
    }

    /// Adds what each direction's total has grown by since the last call;
    /// whether either grew.
    fn publish(&self, up: u64, down: u64) -> bool {
        let up_grew = add_growth(self.up, &self.added_up, up);
        let down_grew = add_growth(self.down, &self.added_down, down);
        up_grew || down_grew
    }
}

/// Adds `total`'s growth past `added` to `counter`; whether it grew.
fn add_growth(counter: Option<&IntCounter>, added: &AtomicU64, total: u64) -> bool {
    let before = added.fetch_max(total, Relaxed);
    let grew = total > before;
    if let (Some(c), true) = (counter, grew) {
        c.inc_by(total - before);
    }
    grew
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
    fn insert(&self, client: &StdTcpStream, backend: &StdTcpStream) -> Result<Inserted, Refused> {
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

    fn insert_sockets(
        &self,
        client: &StdTcpStream,
        backend: &StdTcpStream,
    ) -> Result<Inserted, Insert> {
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
        let socket = |s: &StdTcpStream| s.as_raw_fd() as u32;
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
