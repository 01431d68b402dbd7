//! Zero-downtime binary upgrade: a running process hands its listening
//! sockets to its successor over a Unix socket (`--upgrade-socket PATH`),
//! as HAProxy's `-x` does, and then drains like on SIGTERM.
//!
//! Why hand sockets over at all: closing an SO_REUSEPORT listener drops the
//! connections waiting in its accept queue, so "start the new binary on the
//! same port, then stop the old one" loses some. A listener handed over is
//! the same kernel socket in both processes: its queue survives the old
//! process closing its copy, and each queued connection is accepted by
//! exactly one of them.
//!
//! The story of an upgrade (`wire` frames every message; the descriptors
//! ride with `SCM_RIGHTS`):
//! 1. the new process connects to PATH and sends `Take` (protocol version,
//!    its pid). ENOENT or a refused connect (a stale file) means no process
//!    runs there: it starts fresh, binding as always.
//! 2. The old process (one hand-over at a time; a second is `Refused`, and
//!    only its own user may connect: mode 0600 and a peer-credential check)
//!    answers `Listeners`: a [`SocketInfo`] per socket (every frontend's
//!    per-worker sockets, then the admin listener) and the descriptors.
//! 3. The new process checks them against its config ([`plan`]); on any
//!    difference it sends `Abort` and exits non-zero, and the old process,
//!    untouched, keeps serving. Otherwise it starts its workers on them and
//!    sends `Done`.
//! 4. The old process stops accepting (its UDP workers stop reading the
//!    frontend sockets: [`listeners_handed_over`]), drops its copies, answers
//!    `Draining`, and drains exactly as on SIGTERM, then exits 0.
//! 5. The new process renames its own socket over PATH (bound beside it
//!    beforehand, so PATH always names a socket) and writes its ready file.
//!
//! A new process that dies or times out before `Done` leaves the old one
//! serving: its session sees the connection end and takes hand-over requests
//! again.

mod plan;
mod wire;

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use socket2::{SockRef, Type};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::config::Config;
pub use plan::{plan, Plan, SocketInfo};
use wire::Channel;

/// The hand-over protocol's version; both sides must speak the same one.
pub const PROTOCOL_VERSION: u32 = 1;
/// How long either side waits for one message of the other.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the old process waits for `Done` or `Abort` after handing the
/// sockets over: the new process builds its tables and starts its workers
/// meanwhile.
const TAKE_OVER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the upgrade socket's accept loop pauses after an error (out of
/// fds), so it cannot spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// The socket file's mode: only this user may take the listeners.
const SOCKET_MODE: u32 = 0o600;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "message", rename_all = "snake_case")]
enum Message {
    /// New → old: hand me your listeners.
    Take { version: u32, pid: u32 },
    /// Old → new: one descriptor per entry follows, in this order.
    Listeners {
        version: u32,
        pid: u32,
        sockets: Vec<SocketInfo>,
    },
    /// Old → new: no hand-over, and why.
    Refused { reason: String },
    /// New → old: serving on the sockets; stop accepting and drain.
    Done,
    /// New → old: not taking them; keep serving.
    Abort { reason: String },
    /// Old → new: accepting has stopped; draining.
    Draining,
}

/// Set once this process has handed its listeners over: process-wide by
/// nature, since a process hands all of them over at once, and only once.
static HANDED_OVER: AtomicBool = AtomicBool::new(false);

/// Whether another process serves this one's frontend sockets now (its UDP
/// workers must stop reading them).
pub fn listeners_handed_over() -> bool {
    HANDED_OVER.load(Ordering::Acquire)
}

/// Duplicates of every listening socket of this process, described: what a
/// successor is handed. Dropped when the process stops serving, so a plain
/// drain closes its listeners as it always did.
#[derive(Default)]
pub struct Inventory {
    sockets: Vec<(SocketInfo, OwnedFd)>,
}

impl Inventory {
    /// Adds a duplicate of `socket`.
    pub fn push(&mut self, info: SocketInfo, socket: BorrowedFd<'_>) -> io::Result<()> {
        self.sockets.push((info, socket.try_clone_to_owned()?));
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }
}

// ---------------------------------------------------------------------------
// The new process: taking the listeners.

/// Listeners offered by a running process, held until this process serves
/// on them ([`TakeOver::finish`]) or refuses them ([`TakeOver::abort`]).
pub struct TakeOver {
    channel: Channel,
    pub old_pid: u32,
    offered: Vec<SocketInfo>,
    fds: Vec<Option<OwnedFd>>,
}

/// The sockets of one frontend, by worker, and the address they are bound to.
pub struct ClaimedFrontend {
    pub bound: std::net::SocketAddr,
    /// The running process's workers shared one TCP listener.
    pub shared_accept: bool,
    pub sockets: Vec<OwnedFd>,
}

/// Every offered socket, placed: per frontend of the config, and the admin listener.
pub struct Claimed {
    pub frontends: Vec<ClaimedFrontend>,
    pub admin: Option<OwnedFd>,
}

impl TakeOver {
    /// Asks the process listening on `path` for its listeners. `None` when
    /// none runs there (no file, or a stale one, which is removed): start fresh.
    pub fn connect(path: &Path) -> anyhow::Result<Option<TakeOver>> {
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", path.display())),
            Ok(m) if !m.file_type().is_socket() => bail!(
                "upgrade socket {} exists and is not a socket; not replacing it",
                path.display()
            ),
            Ok(_) => {}
        }
        let stream = match UnixStream::connect(path) {
            Ok(s) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
                ) =>
            {
                info!(path = %path.display(), "no process answers on the upgrade socket: starting fresh");
                let _ = std::fs::remove_file(path);
                return Ok(None);
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot connect to {}", path.display()))
            }
        };
        let mut channel = Channel::new(stream)?;
        let take = Message::Take {
            version: PROTOCOL_VERSION,
            pid: std::process::id(),
        };
        channel
            .send(&take, MESSAGE_TIMEOUT)
            .context("cannot ask for the listeners")?;
        let reply = channel
            .recv(MESSAGE_TIMEOUT)
            .with_context(|| format!("no answer on {}", path.display()))?;
        let (old_pid, offered) = match reply {
            Message::Listeners { version, pid, sockets } if version == PROTOCOL_VERSION => (pid, sockets),
            Message::Listeners { version, .. } => bail!(
                "the running process speaks hand-over protocol {version}, this one {PROTOCOL_VERSION}"
            ),
            Message::Refused { reason } => {
                bail!("the process on {} will not hand its listeners over: {reason}", path.display())
            }
            other => bail!("unexpected answer on {}: {other:?}", path.display()),
        };
        let fds = channel
            .recv_fds(offered.len(), MESSAGE_TIMEOUT)
            .context("cannot receive the listeners")?;
        let take = TakeOver {
            channel,
            old_pid,
            offered,
            fds: fds.into_iter().map(Some).collect(),
        };
        if let Err(why) = take.verify() {
            take.abort(&why);
            bail!("the listeners of pid {old_pid} are not what it says: {why}");
        }
        Ok(Some(take))
    }

    /// The description is the old process's word; checks it against the kernel's.
    fn verify(&self) -> Result<(), String> {
        for (info, fd) in self.offered.iter().zip(&self.fds) {
            let Some(fd) = fd else { continue };
            let s = SockRef::from(fd);
            let (want, listener) = if info.is_tcp() {
                (Type::STREAM, true)
            } else {
                (Type::DGRAM, false)
            };
            let ty = s.r#type().map_err(|e| e.to_string())?;
            let listening = s.is_listener().map_err(|e| e.to_string())?;
            let bound = s.local_addr().ok().and_then(|a| a.as_socket());
            if ty != want || listening != listener || bound != Some(info.bound) {
                return Err(format!(
                    "a socket described as {} {} is {ty:?} bound to {bound:?}",
                    info.protocol, info.bound
                ));
            }
        }
        Ok(())
    }

    /// Places every offered socket for `config`, or says every difference.
    pub fn claim(&mut self, config: &Config) -> Result<Claimed, String> {
        let plan = plan(config, &self.offered)?;
        let mut take = |i: usize| self.fds[i].take().ok_or("a socket was offered twice");
        let mut frontends = Vec::with_capacity(plan.frontends.len());
        for indices in &plan.frontends {
            frontends.push(ClaimedFrontend {
                bound: self.offered[indices[0]].bound,
                shared_accept: self.offered[indices[0]].shared_accept,
                sockets: indices.iter().map(|&i| take(i)).collect::<Result<_, _>>()?,
            });
        }
        let admin = plan.admin.map(&mut take).transpose()?;
        Ok(Claimed { frontends, admin })
    }

    /// Tells the old process the listeners are not taken, so it keeps serving.
    pub fn abort(mut self, reason: &str) {
        let abort = Message::Abort {
            reason: reason.to_owned(),
        };
        if let Err(e) = self.channel.send(&abort, MESSAGE_TIMEOUT) {
            debug!(error = %e, "could not tell the running process the take-over is off");
        }
    }

    /// Tells the old process this one serves now, and waits for it to stop accepting.
    pub fn finish(mut self) {
        let count = self.offered.len();
        let old_pid = self.old_pid;
        let answer = self
            .channel
            .send(&Message::Done, MESSAGE_TIMEOUT)
            .and_then(|()| self.channel.recv::<Message>(MESSAGE_TIMEOUT));
        match answer {
            Ok(Message::Draining) => info!(
                listeners = count,
                old_pid, "took over {count} listeners from pid {old_pid}"
            ),
            // This process serves either way; the old one is on its way out.
            Ok(other) => {
                warn!(old_pid, answer = ?other, "took over {count} listeners; the old process did not confirm its drain")
            }
            Err(e) => {
                warn!(old_pid, error = %e, "took over {count} listeners; the old process did not confirm its drain")
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The running process: handing the listeners over.

/// Where the hand-over service stands.
enum State {
    /// Takes a hand-over request.
    Open(Arc<Inventory>),
    /// Pid `pid` is taking the listeners; others are refused.
    Busy { pid: u32, inventory: Arc<Inventory> },
    /// No more hand-overs, and why (said to whoever asks).
    Closed(String),
}

/// A completed hand-over, as the control thread sees it: it stops the data
/// plane accepting, then [`HandOver::acknowledge`]s.
pub struct HandOver {
    pub pid: u32,
    channel: Channel,
}

impl HandOver {
    /// Tells the new process that accepting has stopped. Sent by the control
    /// thread itself, before its drain: a process with nothing to drain
    /// exits at once, and must not leave the new one without an answer.
    pub fn acknowledge(mut self) {
        if let Err(e) = self.channel.send(&Message::Draining, MESSAGE_TIMEOUT) {
            debug!(error = %e, "could not confirm the drain to pid {}", self.pid);
        }
    }
}

/// The hand-over service: PATH's socket and the listeners to give.
pub struct Upgrader {
    listener: UnixListener,
    tmp: TmpSocketFile,
    handle: UpgradeHandle,
}

/// The socket's file beside PATH until [`Upgrader::publish`] renames it;
/// removed if the process stops before that.
struct TmpSocketFile(PathBuf);

impl Drop for TmpSocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The control thread's side of the service: closing it, and removing PATH at exit.
#[derive(Clone)]
pub struct UpgradeHandle {
    path: PathBuf,
    state: Arc<Mutex<State>>,
    /// (device, inode) of the socket file this process put at PATH.
    identity: Arc<Mutex<Option<(u64, u64)>>>,
}

impl Upgrader {
    /// Binds the service's socket beside `path` (mode 0600), not yet at it:
    /// [`Upgrader::publish`] moves it there once this process serves.
    pub fn bind(path: &Path, inventory: Inventory) -> anyhow::Result<Upgrader> {
        let name = path
            .file_name()
            .with_context(|| format!("upgrade socket {} has no file name", path.display()))?;
        let tmp = path.with_file_name(format!(
            ".{}.{}.tmp",
            name.to_string_lossy(),
            std::process::id()
        ));
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp)
            .with_context(|| format!("cannot bind upgrade socket {}", tmp.display()))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(SOCKET_MODE))
            .with_context(|| format!("cannot restrict {}", tmp.display()))?;
        listener.set_nonblocking(true)?;
        let handle = UpgradeHandle {
            path: path.to_owned(),
            state: Arc::new(Mutex::new(State::Open(Arc::new(inventory)))),
            identity: Arc::new(Mutex::new(None)),
        };
        Ok(Upgrader {
            listener,
            tmp: TmpSocketFile(tmp),
            handle,
        })
    }

    pub fn handle(&self) -> UpgradeHandle {
        self.handle.clone()
    }

    /// Renames the socket over PATH: atomically, so PATH never names no socket.
    pub fn publish(&self) -> anyhow::Result<()> {
        let path = &self.handle.path;
        std::fs::rename(&self.tmp.0, path)
            .with_context(|| format!("cannot move the upgrade socket to {}", path.display()))?;
        let meta = std::fs::symlink_metadata(path)?;
        *self.handle.identity.lock() = Some((meta.dev(), meta.ino()));
        info!(path = %path.display(), "upgrade socket ready");
        Ok(())
    }

    /// Serves hand-over requests, one session at a time, until the process
    /// exits; a completed hand-over goes to `hand_overs`. Runs on a runtime.
    pub async fn serve(self, hand_overs: mpsc::Sender<HandOver>) {
        let Upgrader {
            listener, handle, ..
        } = self;
        let listener = match tokio::net::UnixListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "cannot serve the upgrade socket");
                return;
            }
        };
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    debug!(error = %e, "upgrade socket accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            };
            if let Err(e) = handle.start_session(stream, hand_overs.clone()) {
                warn!(error = %e, "cannot serve a hand-over request");
            }
        }
    }
}

impl UpgradeHandle {
    /// No more hand-overs (the process is stopping, or has handed over):
    /// drops the listeners' copies, so they close with the workers' own.
    pub fn close(&self, reason: String) {
        *self.state.lock() = State::Closed(reason);
    }

    /// Removes PATH if it is still this process's socket (a successor's
    /// rename has replaced it otherwise). Never after a hand-over: PATH is
    /// the successor's then, and its rename may land between the check and
    /// the removal below, which would take its socket away (the next
    /// upgrade would find no one and start fresh beside it).
    pub fn remove_if_ours(&self) {
        if listeners_handed_over() {
            return;
        }
        let Some(ours) = *self.identity.lock() else {
            return;
        };
        let current = std::fs::symlink_metadata(&self.path).map(|m| (m.dev(), m.ino()));
        if current.is_ok_and(|c| c == ours) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Checks who connected, then runs the session on a thread of its own:
    /// its steps block, and the control thread must not.
    fn start_session(
        &self,
        stream: tokio::net::UnixStream,
        hand_overs: mpsc::Sender<HandOver>,
    ) -> io::Result<()> {
        let cred = stream.peer_cred()?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if cred.uid() != me {
            warn!(uid = cred.uid(), pid = ?cred.pid(), "refused a hand-over request from another user");
            return Ok(());
        }
        let channel = Channel::new(stream.into_std()?)?;
        let handle = self.clone();
        std::thread::Builder::new()
            .name("lb-upgrade".into())
            .spawn(move || handle.session(channel, &hand_overs))?;
        Ok(())
    }

    /// One hand-over request, from `Take` to `Draining` or a refusal.
    fn session(&self, mut channel: Channel, hand_overs: &mpsc::Sender<HandOver>) {
        let pid = match channel.recv(MESSAGE_TIMEOUT) {
            Ok(Message::Take { version, pid }) if version == PROTOCOL_VERSION => pid,
            Ok(Message::Take { version, .. }) => {
                refuse(
                    &mut channel,
                    format!(
                        "this process speaks hand-over protocol {PROTOCOL_VERSION}, not {version}"
                    ),
                );
                return;
            }
            Ok(other) => {
                debug!(message = ?other, "unexpected hand-over request");
                return;
            }
            Err(e) => {
                debug!(error = %e, "unreadable hand-over request");
                return;
            }
        };
        let inventory = match self.begin(pid) {
            Ok(inventory) => inventory,
            Err(reason) => return refuse(&mut channel, reason),
        };
        info!(
            pid,
            listeners = inventory.len(),
            "handing listeners over to pid {pid}"
        );
        if let Err(why) = hand_over(channel, pid, inventory, hand_overs) {
            warn!(
                pid,
                "the take-over by pid {pid} failed ({why}); still serving"
            );
            self.reopen(pid);
        }
    }

    /// Marks the service busy with `pid`, or says why it takes no request.
    fn begin(&self, pid: u32) -> Result<Arc<Inventory>, String> {
        let mut state = self.state.lock();
        match &*state {
            State::Open(inventory) => {
                let inventory = Arc::clone(inventory);
                *state = State::Busy {
                    pid,
                    inventory: Arc::clone(&inventory),
                };
                Ok(inventory)
            }
            State::Busy { pid: taker, .. } => Err(format!(
                "an upgrade is already in progress: pid {taker} is taking the listeners over"
            )),
            State::Closed(reason) => Err(reason.clone()),
        }
    }

    /// After a failed take-over by `pid`, takes requests again (unless the
    /// process has stopped serving meanwhile).
    fn reopen(&self, pid: u32) {
        let mut state = self.state.lock();
        if let State::Busy {
            pid: taker,
            inventory,
        } = &*state
        {
            if *taker == pid {
                *state = State::Open(Arc::clone(inventory));
            }
        }
    }
}

fn refuse(channel: &mut Channel, reason: String) {
    info!(reason = %reason, "refused a hand-over request");
    let _ = channel.send(&Message::Refused { reason }, MESSAGE_TIMEOUT);
}

/// Sends the listeners, waits for the verdict, and on `Done` hands the
/// process's stop to the control thread before confirming the drain.
fn hand_over(
    mut channel: Channel,
    pid: u32,
    inventory: Arc<Inventory>,
    hand_overs: &mpsc::Sender<HandOver>,
) -> Result<(), String> {
    let offer = Message::Listeners {
        version: PROTOCOL_VERSION,
        pid: std::process::id(),
        sockets: inventory
            .sockets
            .iter()
            .map(|(info, _)| info.clone())
            .collect(),
    };
    let fds: Vec<BorrowedFd<'_>> = inventory.sockets.iter().map(|(_, fd)| fd.as_fd()).collect();
    channel
        .send(&offer, MESSAGE_TIMEOUT)
        .and_then(|()| channel.send_fds(&fds, MESSAGE_TIMEOUT))
        .map_err(|e| format!("cannot send the listeners: {e}"))?;
    drop(fds);
    // The copies stay with the service only: a stop meanwhile must close them.
    drop(inventory);
    match channel.recv(TAKE_OVER_TIMEOUT) {
        Ok(Message::Done) => {}
        Ok(Message::Abort { reason }) => return Err(format!("it refused them: {reason}")),
        Ok(other) => return Err(format!("unexpected answer {other:?}")),
        Err(e) => return Err(format!("no verdict: {e}")),
    }
    // Mark it before anything else: a signal may be stopping this process
    // already, and its UDP workers must stop reading sockets the new process
    // now reads, whichever branch of the control thread runs.
    mark_handed_over();
    // The control thread stops the accept loops, then confirms the drain;
    // if it is stopping already (a signal came first), confirm it here.
    if let Err(refused) = hand_overs.blocking_send(HandOver { pid, channel }) {
        refused.0.acknowledge();
    }
    Ok(())
}

/// Marks this process as having handed its listeners over (before its
/// workers learn that they drain).
pub fn mark_handed_over() {
    HANDED_OVER.store(true, Ordering::Release);
}
