//! How the data plane stops: the phases of a shutdown, and each worker's
//! registry of the flows it has open, so the ones still open when the drain
//! ends (or at SIGINT) can be cut.
//!
//! A cut flow is not dropped with the process: both of its sockets are shut
//! down (`shutdown(2)`, both ways), which ends its copy loop like any other
//! end of stream, so the flow is closed, counted and logged by the same code
//! as every other flow, with the bytes it carried and the outcome `shutdown`.
//!
//! UDP flows are not in this registry: each worker's UDP loop
//! ([`crate::udp::worker`]) owns its flows and, at [`Phase::Cut`], ends them
//! itself (counted `closed`, logged with the outcome [`CUT_OUTCOME`]); at
//! [`Phase::Draining`] it forwards existing flows and takes no new one. Its
//! socket stays open and receiving while draining, on purpose (the contract
//! said to stop receiving): UDP has no accept queue to close, and closing
//! the socket would black-hole the existing flows the drain is for.
//!
//! The registry is per worker thread (the workers' runtimes are single
//! threaded, so a flow's task never leaves its thread): registering a flow
//! takes no lock, and a slot is reused once its flow ends.

use std::cell::RefCell;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, RawFd};

use tokio::net::TcpStream;

/// Where the process is in its life, as the workers see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Accepting and serving.
    Running,
    /// SIGTERM: accepting has stopped; flows in flight may finish.
    Draining,
    /// Every flow still open is cut, then the process exits.
    Cut,
}

/// The outcome a cut flow is logged with.
pub const CUT_OUTCOME: &str = "shutdown";

#[derive(Default)]
struct Registry {
    /// By slot: a flow's two sockets, and whether it was cut. `None` is free.
    slots: Vec<Option<OpenSlot>>,
    free: Vec<usize>,
    /// Set by [`cut_all`]: flows registered from now on are cut at once.
    cutting: bool,
}

#[derive(Clone, Copy)]
struct OpenSlot {
    fds: [RawFd; 2],
    cut: bool,
}

thread_local! {
    static OPEN: RefCell<Registry> = RefCell::new(Registry::default());
}

/// Shuts both sockets down both ways: each peer gets a FIN, and the copy loop
/// reads end of stream from both.
fn cut(fds: [RawFd; 2]) {
    for fd in fds {
        // SAFETY: shutdown(2) on a descriptor that is open: a slot exists only
        // while the `OpenFlow` borrowing both streams is alive (see `register`).
        unsafe {
            libc::shutdown(fd, libc::SHUT_RDWR);
        }
    }
}

/// A flow in this worker's registry; it leaves the registry when dropped. It
/// borrows both streams, so they cannot be closed (and their descriptors
/// reused) while the registry holds them.
pub struct OpenFlow<'a> {
    slot: usize,
    _streams: PhantomData<&'a TcpStream>,
}

/// Registers a flow that has reached its backend. If this worker is already
/// cutting, the flow is cut at once.
pub fn register<'a>(client: &'a TcpStream, upstream: &'a TcpStream) -> OpenFlow<'a> {
    let fds = [client.as_raw_fd(), upstream.as_raw_fd()];
    let slot = OPEN.with(|r| {
        let mut r = r.borrow_mut();
        let cutting = r.cutting;
        if cutting {
            cut(fds);
        }
        let entry = Some(OpenSlot { fds, cut: cutting });
        match r.free.pop() {
            Some(i) => {
                r.slots[i] = entry;
                i
            }
            None => {
                r.slots.push(entry);
                r.slots.len() - 1
            }
        }
    });
    OpenFlow {
        slot,
        _streams: PhantomData,
    }
}

impl OpenFlow<'_> {
    /// Leaves the registry; true when the flow was cut by shutdown.
    pub fn finish(self) -> bool {
        OPEN.with(|r| r.borrow().slots.get(self.slot).copied().flatten())
            .is_some_and(|s| s.cut)
    }
}

impl Drop for OpenFlow<'_> {
    fn drop(&mut self) {
        OPEN.with(|r| {
            let mut r = r.borrow_mut();
            if let Some(s) = r.slots.get_mut(self.slot) {
                *s = None;
                r.free.push(self.slot);
            }
        });
    }
}

/// Cuts every flow open on this worker thread, and every flow it registers
/// from now on. Returns how many were open.
pub fn cut_all() -> usize {
    OPEN.with(|r| {
        let mut r = r.borrow_mut();
        r.cutting = true;
        let mut n = 0;
        for s in r.slots.iter_mut().flatten() {
            cut(s.fds);
            s.cut = true;
            n += 1;
        }
        n
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    use crate::test_util::loopback_pair as pair;

    /// A cut flow's peers read end of stream, the flow knows it was cut, a
    /// flow that ends on its own does not, and flows registered after the cut
    /// are cut at once.
    #[tokio::test(flavor = "current_thread")]
    async fn cut_ends_open_flows_and_marks_them() {
        let (mut client, client_side) = pair().await;
        let (backend_side, mut backend) = pair().await;
        let (_c2, c2_side) = pair().await;
        let (b2_side, _b2) = pair().await;
        let done = register(&c2_side, &b2_side);
        assert!(!done.finish(), "a flow that ended on its own is not cut");

        let open = register(&client_side, &backend_side);
        assert_eq!(cut_all(), 1);
        let mut buf = [0u8; 8];
        assert_eq!(client.read(&mut buf).await.unwrap(), 0, "client gets EOF");
        assert_eq!(backend.read(&mut buf).await.unwrap(), 0, "backend gets EOF");
        assert!(open.finish(), "the open flow was cut");

        let (mut late_client, late_side) = pair().await;
        let (late_backend_side, _late_backend) = pair().await;
        let late = register(&late_side, &late_backend_side);
        assert_eq!(late_client.read(&mut buf).await.unwrap(), 0);
        assert!(late.finish(), "registered while cutting: cut at once");
        OPEN.with(|r| assert!(r.borrow().slots.iter().all(Option::is_none)));
    }
}
