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
//! cycle through all of them (16 MiB when they were 16 KiB), so each read
//! landed in memory, and on a page, not touched for a thousand reads
//! (`_copy_to_iter` 3.5 times nginx's: docs/research/new-connections.md).
//! So the ring is kept shallow:
//! at most [`DEPTH`] buffers are published, topped up before each wait from
//! a last-in-first-out stack of free ones, and a read lands in a buffer
//! freed a moment ago. A burst that empties the shallow ring between two
//! waits meets `ENOBUFS`, and its reads wait for the next top-up as reads
//! that find the pool empty do.

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::IoUring;

/// The buffer group every read of a ring selects from.
pub const GROUP: u16 = 0;
/// One buffer: the most one read takes, as the tokio engine's userspace
/// copy reads. 16 KiB made a bulk flow pay a read and a write completion per
/// 16 KiB, and one stream moved markedly less (docs/research/new-connections.md,
/// "Change K"); a short read touches only its first bytes, so new
/// connections measured the same.
pub const BUF_LEN: usize = crate::tcp::copy::SCRATCH_LEN;
/// From one buffer's start to the next: a cache line more than a buffer, so
/// the first lines of the buffers in use (all a short read touches) fall in
/// different cache sets rather than all in the few a 64 KiB stride maps to.
const STRIDE: usize = BUF_LEN + 64;
/// Buffers per ring (a power of two, as the kernel asks): 64 MiB per worker,
/// mapped lazily, so a worker's resident share grows only with what its
/// flows have held at once (and a flow whose peer stops reading copies its
/// bytes out once the pool runs low: [`Held::move_out`]).
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
    /// `count` buffers, [`STRIDE`] bytes apart.
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
        let entries = leak_mapped(usize::from(count) * std::mem::size_of::<BufRingEntry>())?
            as *mut BufRingEntry;
        let data = leak_mapped(usize::from(count) * STRIDE)?;
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
        unsafe { self.data.add(usize::from(bid) * STRIDE) }
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

/// `len` bytes of zeroed, page-aligned anonymous memory, never unmapped. The
/// kernel maps a page when it is first touched, so only buffers reads have
/// landed in are resident. (The pool was an aligned `alloc_zeroed`, which
/// writes every byte: all of it was resident from the start.)
fn leak_mapped(len: usize) -> io::Result<*mut u8> {
    // SAFETY: a new private anonymous mapping, no address asked for; the
    // result is checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p.cast())
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
        let len = len.min(BUF_LEN);
        // Sized to what is held, not to a buffer: a stalled flow's heap
        // share is its bytes.
        let own = match self.own.take() {
            Some(own) if own.len() >= len => self.own.insert(own),
            _ => self.own.insert(vec![0u8; len].into_boxed_slice()),
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool on a ring of its own, or `None` where this kernel refuses
    /// io_uring or its buffer rings (the engine falls back to tokio there).
    fn pool() -> Option<(IoUring, BufferPool)> {
        let built = IoUring::new(8).and_then(|ring| Ok((BufferPool::new(&ring)?, ring)));
        match built {
            Ok((pool, ring)) => Some((ring, pool)),
            Err(e) => {
                eprintln!("io_uring refused here ({e}): nothing to test");
                None
            }
        }
    }

    /// Pages of `len` bytes at `p` that are resident now (mincore(2)).
    fn resident_pages(p: *mut u8, len: usize) -> usize {
        let pages = len.div_ceil(4096);
        let mut v = vec![0u8; pages];
        // SAFETY: `p` is page aligned and `len` bytes are mapped; `v` has a
        // byte per page.
        let rc = unsafe { libc::mincore(p.cast(), len, v.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore: {}", io::Error::last_os_error());
        v.iter().filter(|&&b| b & 1 == 1).count()
    }

    #[test]
    fn a_new_pool_holds_no_resident_buffer_memory_until_reads_land() {
        let Some((_ring, pool)) = pool() else { return };
        let len = usize::from(pool.count) * STRIDE;
        assert_eq!(
            resident_pages(pool.data, len),
            0,
            "untouched buffers are not resident"
        );
        // A short read's landing, as the kernel would write it.
        // SAFETY: buffer 0 is BUF_LEN bytes of the pool's mapping.
        unsafe { pool.addr(0).write_bytes(1, 100) };
        // One page, or one huge page where transparent huge pages are always on.
        let touched = resident_pages(pool.data, len);
        assert!(
            (1..=512).contains(&touched),
            "{touched} pages for one short read"
        );
    }

    #[test]
    fn a_read_moved_out_of_the_pool_takes_its_length_not_a_buffer() {
        let Some((_ring, mut pool)) = pool() else {
            return;
        };
        pool.taken();
        let mut held = Held::default();
        held.take(0);
        // SAFETY: buffer 0 is BUF_LEN bytes of the pool's mapping.
        unsafe { pool.addr(0).copy_from_nonoverlapping(b"hello".as_ptr(), 5) };
        held.move_out(&mut pool, 5);
        assert!(!held.in_pool(), "the pool buffer went back");
        assert_eq!(held.own.as_deref(), Some(&b"hello"[..]));
        // A longer read later grows the copy to fit it.
        pool.taken();
        held.release(&mut pool);
        held.take(1);
        // SAFETY: as above, buffer 1.
        unsafe { pool.addr(1).write_bytes(7, 9) };
        held.move_out(&mut pool, 9);
        assert_eq!(held.own.as_deref(), Some(&[7u8; 9][..]));
        assert_eq!(pool.free(), usize::from(pool.count));
    }
}
