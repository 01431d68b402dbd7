//! The ring engine's read buffers: one pool per worker ring, lent to the
//! kernel as a provided-buffer ring (`IORING_REGISTER_PBUF_RING`). A read
//! posted on a socket holds no buffer while it waits; the kernel takes one
//! from the pool when bytes arrive and names it in the completion. The flow
//! keeps it until its bytes are passed on, then gives it back. So memory per
//! idle flow is its sockets and its slot, as with the tokio engine's
//! per-worker scratch buffer, and the pool bounds what all flows hold at once.
//!
//! The kernel takes buffers from the head of its ring in the order they were
//! published. Publishing every free buffer as it came back made a worker
//! cycle through all of them (16 MiB), so each read landed in memory, and on
//! a page, not touched for a thousand reads (`_copy_to_iter` 3.5 times
//! nginx's: docs/research/new-connections.md). So the ring is kept shallow:
//! at most [`DEPTH`] buffers are published, topped up before each wait from
//! a last-in-first-out stack of free ones, and a read lands in a buffer
//! freed a moment ago. A burst that empties the shallow ring between two
//! waits meets `ENOBUFS`, and its reads wait for the next top-up as reads
//! that find the pool empty do.

use std::alloc::Layout;
use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::IoUring;

/// The buffer group every read of a ring selects from.
pub const GROUP: u16 = 0;
/// One buffer: the most one read takes.
pub const BUF_LEN: usize = 16 * 1024;
/// Buffers per ring (a power of two, as the kernel asks): 16 MiB per worker,
/// mapped lazily, so a worker's resident share grows only with what its
/// flows have held at once.
pub const COUNT: u16 = 1024;
/// Buffers published to the kernel at most (fewer where the pool is smaller).
pub const DEPTH: usize = 64;
/// Set to a power of two to size the pool otherwise: a test hook, so that a
/// few flows can run the pool dry.
pub const COUNT_ENV: &str = "LB_PROXY_IO_URING_BUFFERS";

/// A worker's buffers and the ring of free ones the kernel takes from.
pub struct BufferPool {
    /// `COUNT` entries, page aligned; its tail is the kernel's view of what is free.
    entries: *mut BufRingEntry,
    /// `COUNT * BUF_LEN` bytes.
    data: *mut u8,
    /// Our tail: entries published to the kernel, wrapping.
    tail: u16,
    /// Buffers in the pool (a power of two).
    count: u16,
    /// Buffers a flow holds now.
    lent: usize,
    /// Published and not yet taken by a read.
    published: usize,
    /// Free buffers not published, the last freed on top.
    spare: Vec<u16>,
}

// SAFETY: the pool's memory is owned by it alone (leaked for the process's
// life, see `new`), and only the thread running the ring touches it.
unsafe impl Send for BufferPool {}

impl BufferPool {
    /// Allocates the pool, fills its ring with every buffer and registers it
    /// with `ring` as [`GROUP`].
    pub fn new(ring: &IoUring) -> io::Result<BufferPool> {
        let count = std::env::var(COUNT_ENV)
            .ok()
            .and_then(|v| v.parse::<u16>().ok())
            .filter(|n| n.is_power_of_two())
            .unwrap_or(COUNT);
        // Leaked: the kernel may write to a buffer, and reads the entries,
        // until the ring's teardown has finished, after the ring is dropped.
        // A worker's ring lives as long as the process anyway.
        let entries = leak_zeroed(Layout::from_size_align(
            usize::from(count) * std::mem::size_of::<BufRingEntry>(),
            4096,
        ))? as *mut BufRingEntry;
        let data = leak_zeroed(Layout::from_size_align(usize::from(count) * BUF_LEN, 4096))?;
        let mut pool = BufferPool {
            entries,
            data,
            tail: 0,
            count,
            lent: usize::from(count),
            published: 0,
            spare: Vec::with_capacity(usize::from(count)),
        };
        for bid in (0..count).rev() {
            pool.give_back(bid);
        }
        pool.top_up();
        // SAFETY: `entries` is page aligned, holds `count` entries and outlives the ring.
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(entries as u64, count, GROUP, 0)?;
        }
        Ok(pool)
    }

    /// The bytes of buffer `bid`.
    pub fn addr(&self, bid: u16) -> *mut u8 {
        debug_assert!(bid < self.count);
        // SAFETY: bid < count, so the offset stays inside the data allocation.
        unsafe { self.data.add(usize::from(bid) * BUF_LEN) }
    }

    /// A completion took a buffer from the ring: a flow holds it now.
    pub fn taken(&mut self) {
        self.lent += 1;
        self.published = self.published.saturating_sub(1);
    }

    /// Buffer `bid` is free again: on top of the spare stack, for the next
    /// [`top_up`](Self::top_up).
    pub fn give_back(&mut self, bid: u16) {
        self.spare.push(bid);
        self.lent -= 1;
    }

    /// Publishes spare buffers, the last freed first, until [`DEPTH`] are
    /// in the kernel's ring (or none is spare). Before each wait.
    pub fn top_up(&mut self) {
        let depth = DEPTH.min(usize::from(self.count));
        if self.published >= depth || self.spare.is_empty() {
            return;
        }
        let mask = self.count - 1;
        while self.published < depth {
            let Some(bid) = self.spare.pop() else {
                break;
            };
            // SAFETY: the index is masked into the ring, and at most `count`
            // entries are ever published and not taken, so this entry is not
            // one the kernel may still read; it is ours to write until the
            // tail that covers it is published below.
            unsafe {
                let entry = &mut *self.entries.add(usize::from(self.tail & mask));
                entry.set_addr(self.addr(bid) as u64);
                entry.set_len(BUF_LEN as u32);
                entry.set_bid(bid);
            }
            self.tail = self.tail.wrapping_add(1);
            self.published += 1;
        }
        // SAFETY: the tail field of the first entry, a u16 the kernel reads;
        // the release store publishes the entries written above with it.
        unsafe {
            let tail = BufRingEntry::tail(self.entries) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// Few buffers left (a quarter or less): reads are moved out of the
    /// pool as they come, and sends copy what they hold out first, so that
    /// flows whose peers do not read cannot hold the pool the others need.
    pub fn under_pressure(&self) -> bool {
        self.free() * 4 <= usize::from(self.count)
    }

    /// Buffers the kernel may take now.
    pub fn free(&self) -> usize {
        usize::from(self.count) - self.lent
    }
}

/// Zeroed memory of `layout` for the rest of the process (large ones are
/// mapped lazily by the allocator, so untouched pages cost nothing).
fn leak_zeroed(layout: Result<Layout, std::alloc::LayoutError>) -> io::Result<*mut u8> {
    let layout = layout.map_err(io::Error::other)?;
    // SAFETY: the layout has a non-zero size.
    let p = unsafe { std::alloc::alloc_zeroed(layout) };
    if p.is_null() {
        return Err(io::ErrorKind::OutOfMemory.into());
    }
    Ok(p)
}

/// Where one direction of a flow holds its last read until it is passed on:
/// a pool buffer, or, under pressure, a copy of its own.
#[derive(Default)]
pub struct Held {
    bid: Option<u16>,
    /// The copy, allocated the first time this flow needed one and kept
    /// until the flow's slot is freed.
    own: Option<Box<[u8]>>,
    /// Whether the read is in `own` now.
    in_own: bool,
}

impl Held {
    /// A read landed in pool buffer `bid`.
    pub fn take(&mut self, bid: u16) {
        debug_assert!(self.bid.is_none() && !self.in_own);
        self.bid = Some(bid);
    }

    /// Where the read's bytes are.
    pub fn bytes(&self, pool: &BufferPool) -> Option<*const u8> {
        match (&self.own, self.bid) {
            (Some(own), _) if self.in_own => Some(own.as_ptr()),
            (_, Some(bid)) => Some(pool.addr(bid).cast_const()),
            _ => None,
        }
    }

    /// Copies the read's first `len` bytes out of the pool and gives its
    /// buffer back. Only with no send of them in flight.
    pub fn move_out(&mut self, pool: &mut BufferPool, len: usize) {
        let Some(bid) = self.bid.take() else {
            return;
        };
        let own = self
            .own
            .get_or_insert_with(|| vec![0u8; BUF_LEN].into_boxed_slice());
        let len = len.min(BUF_LEN);
        // SAFETY: the pool buffer holds at least `len` read bytes, and
        // nothing in flight writes to it while the flow holds it.
        let read = unsafe { std::slice::from_raw_parts(pool.addr(bid), len) };
        own[..len].copy_from_slice(read);
        self.in_own = true;
        pool.give_back(bid);
    }

    /// The read is passed on: its pool buffer goes back (the copy is kept
    /// for the flow's next need).
    pub fn release(&mut self, pool: &mut BufferPool) {
        if let Some(bid) = self.bid.take() {
            pool.give_back(bid);
        }
        self.in_own = false;
    }

    /// The flow's slot is freed: everything goes.
    pub fn clear(&mut self, pool: &mut BufferPool) {
        self.release(pool);
        self.own = None;
    }

    /// Whether the read sits in a pool buffer.
    pub fn in_pool(&self) -> bool {
        self.bid.is_some()
    }
}
