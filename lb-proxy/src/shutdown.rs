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
//! A zone going down cuts flows the same way: a flow registered with its
//! hop's zones ([`FlowZones`]) is cut, with the outcome [`ZONE_DOWN_OUTCOME`],
//! by its worker's zone watcher when either zone goes down (or at once when
//! one is down already). The watcher is a task on the worker's own runtime,
//! started by the worker's first flow with zones, so the cut takes no lock
//! either. UDP flows are not in the registry here either: each worker's UDP
//! loop ends its own flows through a down zone when it sees the zone signal
//! (or the snapshot that took the zone out) change, with the same outcome
//! ([`crate::udp::worker`]).
//!
//! The registry is per worker thread (the workers' runtimes are single
//! threaded, so a flow's task never leaves its thread): registering a flow
//! takes no lock, and a slot is reused once its flow ends.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use crate::state::ZoneSignal;
use crate::target::ZoneHop;

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

/// The outcome a flow cut because its node's or pod's zone went down is logged with.
pub const ZONE_DOWN_OUTCOME: &str = "zone_down";

/// A flow's hop zones, and the signal that says when a zone goes down.
pub struct FlowZones<'a> {
    pub signal: &'a Arc<ZoneSignal>,
    pub hop: &'a ZoneHop,
}

#[derive(Default)]
struct Registry {
    /// By slot: a flow's two sockets, and whether it was cut. `None` is free.
    slots: Vec<Option<OpenSlot>>,
    free: Vec<usize>,
    /// Set by [`cut_all`]: flows registered from now on are cut at once.
    cutting: bool,
    /// The zone signals this worker runs a watcher for (by address; each
    /// watcher holds its signal, so an address is never reused).
    watching: Vec<*const ZoneSignal>,
}

#[derive(Clone)]
struct OpenSlot {
    fds: [RawFd; 2],
    /// Why the flow was cut, once it was.
    cut: Option<&'static str>,
    /// The node's and the pod's zones, for a flow with a zone hop.
    zones: Option<[Arc<str>; 2]>,
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
    _streams: PhantomData<&'a ()>,
}

/// Registers a flow that has reached its backend. If this worker is already
/// cutting, or one of the flow's `zones` is down, the flow is cut at once.
pub fn register<'a, S: AsRawFd>(
    client: &'a S,
    upstream: &'a S,
    zones: Option<FlowZones<'_>>,
) -> OpenFlow<'a> {
    let fds = [client.as_raw_fd(), upstream.as_raw_fd()];
    let slot = OPEN.with(|r| {
        let mut r = r.borrow_mut();
        if let Some(z) = &zones {
            watch_zones(&mut r, z.signal);
        }
        let cut_now = if r.cutting {
            Some(CUT_OUTCOME)
        } else if zones.as_ref().is_some_and(|z| z.signal.cuts(z.hop)) {
            Some(ZONE_DOWN_OUTCOME)
        } else {
            None
        };
        if cut_now.is_some() {
            cut(fds);
        }
        let zones = zones.map(|z| {
            [
                Arc::clone(&z.hop.node_zone),
                Arc::clone(&z.hop.endpoint_zone),
            ]
        });
        let entry = Some(OpenSlot {
            fds,
            cut: cut_now,
            zones,
        });
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
    /// Leaves the registry; the outcome of the cut when the flow was cut
    /// ([`CUT_OUTCOME`] or [`ZONE_DOWN_OUTCOME`]).
    pub fn finish(self) -> Option<&'static str> {
        OPEN.with(|r| {
            r.borrow()
                .slots
                .get(self.slot)
                .and_then(|s| s.as_ref()?.cut)
        })
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
            s.cut.get_or_insert(CUT_OUTCOME);
            n += 1;
        }
        n
    })
}

/// Starts this worker's watcher of `signal` unless it runs already. Called
/// from a flow's task, so on the worker's runtime.
fn watch_zones(r: &mut Registry, signal: &Arc<ZoneSignal>) {
    if r.watching.contains(&Arc::as_ptr(signal)) {
        return;
    }
    r.watching.push(Arc::as_ptr(signal));
    // Read before the flow's own check, so a change between the two is seen.
    let seen = signal.generation();
    tokio::spawn(cut_on_zone_changes(Arc::clone(signal), seen));
}

/// The worker's zone watcher: after every change to the down zones, cuts
/// this worker's flows through one of them.
async fn cut_on_zone_changes(signal: Arc<ZoneSignal>, mut seen: u64) {
    loop {
        signal.changed_since(seen).await;
        seen = signal.generation();
        let down = signal.down();
        let cut = cut_zones(&down);
        if cut > 0 {
            tracing::debug!(cut, "cut the flows through a zone that went down");
        }
    }
}

/// Cuts every flow on this worker whose node or pod is in a zone in `down`
/// and was not cut yet. Returns how many.
fn cut_zones(down: &BTreeSet<Arc<str>>) -> usize {
    OPEN.with(|r| {
        let mut r = r.borrow_mut();
        let mut n = 0;
        for s in r.slots.iter_mut().flatten() {
            let in_down_zone = s
                .zones
                .as_ref()
                .is_some_and(|zones| zones.iter().any(|z| down.contains(z)));
            if in_down_zone && s.cut.is_none() {
                cut(s.fds);
                s.cut = Some(ZONE_DOWN_OUTCOME);
                n += 1;
            }
        }
        n
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
        let done = register(&c2_side, &b2_side, None);
        assert_eq!(
            done.finish(),
            None,
            "a flow that ended on its own is not cut"
        );

        let open = register(&client_side, &backend_side, None);
        assert_eq!(cut_all(), 1);
        let mut buf = [0u8; 8];
        assert_eq!(client.read(&mut buf).await.unwrap(), 0, "client gets EOF");
        assert_eq!(backend.read(&mut buf).await.unwrap(), 0, "backend gets EOF");
        assert_eq!(open.finish(), Some(CUT_OUTCOME), "the open flow was cut");

        let (mut late_client, late_side) = pair().await;
        let (late_backend_side, _late_backend) = pair().await;
        let late = register(&late_side, &late_backend_side, None);
        assert_eq!(late_client.read(&mut buf).await.unwrap(), 0);
        assert_eq!(
            late.finish(),
            Some(CUT_OUTCOME),
            "registered while cutting: cut at once"
        );
        OPEN.with(|r| assert!(r.borrow().slots.iter().all(Option::is_none)));
    }

    /// A zone going down cuts the flows through it (node or pod side) and
    /// leaves the others open; a flow registered while its zone is down is
    /// cut at once.
    #[tokio::test(flavor = "current_thread")]
    async fn a_zone_going_down_cuts_only_the_flows_through_it() {
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let signal = Arc::new(ZoneSignal::new(tx));
        let hop = |from: &str, to: &str| ZoneHop::new(from.into(), to.into(), Default::default());
        let (hop_12, hop_31, hop_33) = (hop("1", "2"), hop("3", "1"), hop("3", "3"));
        let zoned = |hop| {
            Some(FlowZones {
                signal: &signal,
                hop,
            })
        };
        let (mut c1, c1_side) = pair().await;
        let (b1_side, mut b1) = pair().await;
        let (mut c2, c2_side) = pair().await;
        let (b2_side, _b2) = pair().await;
        let (mut c3, c3_side) = pair().await;
        let (b3_side, _b3) = pair().await;
        let to_2 = register(&c1_side, &b1_side, zoned(&hop_12));
        let from_1 = register(&c2_side, &b2_side, zoned(&hop_31));
        let same_3 = register(&c3_side, &b3_side, zoned(&hop_33));

        signal.publish(&BTreeSet::from(["2".to_owned()]));
        let mut buf = [0u8; 8];
        assert_eq!(
            c1.read(&mut buf).await.unwrap(),
            0,
            "client of the zone-2 flow gets EOF"
        );
        assert_eq!(b1.read(&mut buf).await.unwrap(), 0, "its pod too");
        assert_eq!(to_2.finish(), Some(ZONE_DOWN_OUTCOME));

        signal.publish(&BTreeSet::from(["1".to_owned()]));
        assert_eq!(c2.read(&mut buf).await.unwrap(), 0, "pod in zone 1: cut");
        assert_eq!(from_1.finish(), Some(ZONE_DOWN_OUTCOME));

        c3.write_all(b"x").await.unwrap();
        let still_open =
            tokio::time::timeout(std::time::Duration::from_millis(50), c3.read(&mut buf)).await;
        assert!(still_open.is_err(), "zone 3's own flow stays open");
        assert_eq!(same_3.finish(), None);

        let (mut late, late_side) = pair().await;
        let (late_b, _lb) = pair().await;
        let hop_11 = hop("1", "1");
        let flow = register(&late_side, &late_b, zoned(&hop_11));
        assert_eq!(
            late.read(&mut buf).await.unwrap(),
            0,
            "registered while down: cut at once"
        );
        assert_eq!(flow.finish(), Some(ZONE_DOWN_OUTCOME));
    }
}
