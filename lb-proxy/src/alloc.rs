//! lb-proxy's global allocator: the system allocator, with a per-worker cache
//! of the few blocks glibc serves slowly.
//!
//! Every new connection allocates four blocks and frees them when it closes:
//! tokio's task cell and the two sockets' I/O registrations (128-byte aligned,
//! so glibc 2.36, Debian 12's, takes its `posix_memalign` path, which bypasses
//! its per-thread cache and splits and coalesces chunks every time; later
//! versions serve some aligned requests from that cache), and the flow's boxed
//! state (`tcp::proxy`, past the largest size glibc's per-thread cache holds). In a
//! profile of new connections that was most of the user-space time spent in
//! glibc (docs/research/new-connections.md). Everything else glibc already
//! serves from its per-thread cache, so it goes straight through.
//!
//! A worker thread (`cache_blocks_on_this_thread`) keeps the blocks of those
//! shapes that its flows free, a bounded stack per layout, and hands them out
//! again; so the blocks of a closed connection become the next one's without
//! reaching glibc. Only workers cache: they live as long as the process, so
//! nothing a cache holds is stranded by a thread that ends. A worker's cache
//! never holds more than [`CLASSES`] × [`DEPTH`] blocks of at most
//! [`CACHED_MAX`] bytes (2 MiB; after a burst of new connections, about 64
//! connections' worth of blocks, ~200 KiB), and a layout no flow uses any more
//! gives its class (and its blocks, back to glibc) to the next one that does.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::ptr;

/// The alignment glibc's `malloc` gives on 64-bit Linux; above it, `posix_memalign`.
const MALLOC_ALIGN: usize = 16;
/// Blocks up to this size at `malloc`'s alignment come from glibc's per-thread
/// cache already (its largest bin holds 1,032-byte requests).
const TCACHE_MAX: usize = 1024;
/// The largest block kept: a flow's state and tokio's cells are under it.
const CACHED_MAX: usize = 4096;
/// Layouts one worker keeps blocks of (a connection's four blocks have three;
/// the rest is room for what else the worker frees, evicted when unused).
const CLASSES: usize = 8;
/// Blocks kept per layout: enough for the connections that close between two
/// accept batches, bounded so an idle worker holds little (≤ 2 MiB per worker).
const DEPTH: usize = 64;

/// The process's allocator (`#[global_allocator]` in the binary).
pub struct Allocator;

/// Whether glibc serves `layout` slowly enough for a worker to keep its blocks.
pub(crate) fn cacheable(layout: Layout) -> bool {
    (layout.align() > MALLOC_ALIGN || layout.size() > TCACHE_MAX)
        && layout.size() <= CACHED_MAX
        && layout.align() <= CACHED_MAX
}

/// Freed blocks of one layout, ready to be handed out again.
struct Class {
    /// `None` until a layout claims it.
    layout: Option<Layout>,
    /// The cache's [`BlockCache::tick`] when a block last went in or out: the
    /// class used least recently is the one a new layout takes over.
    used: u64,
    len: usize,
    blocks: [*mut u8; DEPTH],
}

/// One thread's kept blocks; off (keeping nothing) unless the thread is a worker.
pub(crate) struct BlockCache {
    on: bool,
    /// Counts takes and keeps, for [`Class::used`].
    tick: u64,
    classes: [Class; CLASSES],
}

impl BlockCache {
    const fn new() -> Self {
        const EMPTY: Class = Class {
            layout: None,
            used: 0,
            len: 0,
            blocks: [ptr::null_mut(); DEPTH],
        };
        Self {
            on: false,
            tick: 0,
            classes: [EMPTY; CLASSES],
        }
    }

    /// A kept block of exactly `layout`, if there is one. Asking counts as a
    /// use even when the class is empty: a layout whose blocks are all out is
    /// busy, not the one to evict.
    fn take(&mut self, layout: Layout) -> Option<*mut u8> {
        if !self.on {
            return None;
        }
        self.tick += 1;
        let class = self.classes.iter_mut().find(|c| c.layout == Some(layout))?;
        class.used = self.tick;
        if class.len == 0 {
            return None;
        }
        class.len -= 1;
        Some(class.blocks[class.len])
    }

    /// Keeps `block` (of `layout`) for the next `take`; false when there is no
    /// room, and the caller frees it. A layout without a class takes over an
    /// unclaimed one, else the one used least recently, whose blocks go to
    /// `free`: a layout seen once (a vector grown past 1 KiB) cannot hold a
    /// class that the connections' layouts need.
    fn keep(&mut self, block: *mut u8, layout: Layout, free: impl FnMut(*mut u8, Layout)) -> bool {
        if !self.on {
            return false;
        }
        self.tick += 1;
        let i = match self.classes.iter().position(|c| c.layout == Some(layout)) {
            Some(i) => i,
            None => self.claim(layout, free),
        };
        let class = &mut self.classes[i];
        class.used = self.tick;
        if class.len == DEPTH {
            return false;
        }
        class.blocks[class.len] = block;
        class.len += 1;
        true
    }

    /// Gives `layout` a class: an unclaimed one, else the least recently used,
    /// emptied into `free` first.
    fn claim(&mut self, layout: Layout, mut free: impl FnMut(*mut u8, Layout)) -> usize {
        let i = match self.classes.iter().position(|c| c.layout.is_none()) {
            Some(i) => i,
            None => (0..CLASSES)
                .min_by_key(|&i| self.classes[i].used)
                .unwrap_or(0),
        };
        let class = &mut self.classes[i];
        if let Some(old) = class.layout {
            for &block in &class.blocks[..class.len] {
                free(block, old);
            }
        }
        class.layout = Some(layout);
        class.len = 0;
        i
    }
}

thread_local! {
    // Const-initialised and without a destructor: reading it never allocates
    // and never fails, which an allocator needs.
    static CACHE: UnsafeCell<BlockCache> = const { UnsafeCell::new(BlockCache::new()) };
}

/// Runs `f` on this thread's cache (`None` only if the thread-local were gone,
/// which a const one without a destructor never is).
fn with_cache<R>(f: impl FnOnce(&mut BlockCache) -> R) -> Option<R> {
    // SAFETY: the cache is this thread's alone, and `f` (take/keep/claim)
    // neither allocates nor re-enters the allocator (an evicted block goes to
    // `System` directly), so no second borrow can exist.
    CACHE.try_with(|cache| f(unsafe { &mut *cache.get() })).ok()
}

/// Makes this thread keep the blocks its flows free (a worker, at its start).
pub fn cache_blocks_on_this_thread() {
    with_cache(|cache| cache.on = true);
}

// SAFETY: every block handed out comes from `System` with the layout asked for
// (a kept block is reused only for exactly the layout it was allocated with),
// and every block given back goes to `System` or to a cache that will hand it
// out again under that same layout.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if cacheable(layout) {
            if let Some(Some(block)) = with_cache(|cache| cache.take(layout)) {
                return block;
            }
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        // SAFETY (of the eviction): each evicted block came from `System` with its class's layout.
        let to_system =
            |old: *mut u8, old_layout: Layout| unsafe { System.dealloc(old, old_layout) };
        if cacheable(layout)
            && with_cache(|cache| cache.keep(block, layout, to_system)) == Some(true)
        {
            return;
        }
        // SAFETY: `block` came from `System` with `layout` (see the impl's comment).
        unsafe { System.dealloc(block, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !cacheable(layout) {
            // SAFETY: forwarded with the caller's layout.
            return unsafe { System.alloc_zeroed(layout) };
        }
        // SAFETY: forwarded; a non-null block has `layout.size()` writable bytes.
        unsafe {
            let block = self.alloc(layout);
            if !block.is_null() {
                ptr::write_bytes(block, 0, layout.size());
            }
            block
        }
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size`, rounded up to `layout.align()`, fits an isize.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        if new_size == layout.size() {
            return block;
        }
        if !cacheable(layout) && !cacheable(new_layout) {
            // SAFETY: forwarded; glibc's realloc may grow in place.
            return unsafe { System.realloc(block, layout, new_size) };
        }
        // SAFETY: a fresh block of the new layout, the smaller of the two sizes
        // copied, then the old block given back under its own layout.
        unsafe {
            let new = self.alloc(new_layout);
            if !new.is_null() {
                ptr::copy_nonoverlapping(block, new, layout.size().min(new_size));
                self.dealloc(block, layout);
            }
            new
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    /// A worker's cache whose evictions are recorded, not freed (the blocks are fake).
    fn worker_cache() -> BlockCache {
        let mut cache = BlockCache::new();
        cache.on = true;
        cache
    }

    fn fake(n: usize) -> *mut u8 {
        ptr::null_mut::<u8>().wrapping_add(4096 * (n + 1))
    }

    #[test]
    fn only_what_glibc_serves_slowly_is_kept() {
        assert!(cacheable(layout(256, 128)), "tokio's aligned cells");
        assert!(cacheable(layout(2200, 8)), "a flow's boxed state");
        assert!(!cacheable(layout(64, 8)), "glibc's tcache serves it");
        assert!(!cacheable(layout(1024, 16)), "so it does up to 1,032 bytes");
        assert!(
            !cacheable(layout(16 * 1024, 8)),
            "buffers are too large to keep"
        );
        assert!(!cacheable(layout(64, 8192)), "page-aligned and larger");
    }

    #[test]
    fn a_worker_hands_a_freed_block_out_again_for_the_same_layout_only() {
        let handed = std::thread::spawn(|| {
            cache_blocks_on_this_thread();
            let flow = layout(2200, 8);
            // SAFETY: every block is allocated and freed with one layout.
            unsafe {
                let first = Allocator.alloc(flow);
                Allocator.dealloc(first, flow);
                let other = Allocator.alloc(layout(1800, 8));
                let again = Allocator.alloc(flow);
                Allocator.dealloc(other, layout(1800, 8));
                Allocator.dealloc(again, flow);
                (first as usize, other as usize, again as usize)
            }
        })
        .join()
        .unwrap();
        let (first, other, again) = handed;
        assert_eq!(again, first, "the kept block comes back for its layout");
        assert_ne!(other, first, "not for another layout");
    }

    #[test]
    fn a_thread_that_is_not_a_worker_keeps_nothing() {
        let mut cache = BlockCache::new();
        assert!(!cache.keep(fake(0), layout(2048, 8), |_, _| unreachable!()));
        assert_eq!(cache.take(layout(2048, 8)), None);
    }

    #[test]
    fn a_layout_keeps_at_most_depth_blocks_and_hands_back_the_warmest_first() {
        let mut cache = worker_cache();
        let flow = layout(2048, 8);
        for i in 0..DEPTH {
            assert!(cache.keep(fake(i), flow, |_, _| unreachable!()));
        }
        assert!(
            !cache.keep(fake(DEPTH), flow, |_, _| unreachable!()),
            "full: the caller frees it"
        );
        assert_eq!(
            cache.take(flow),
            Some(fake(DEPTH - 1)),
            "last in, first out"
        );
        assert_eq!(
            cache.take(layout(2048, 16)),
            None,
            "only for the exact layout"
        );
    }

    #[test]
    fn a_new_layout_takes_over_the_class_used_least_recently_and_frees_its_blocks() {
        let mut cache = worker_cache();
        for size in 0..CLASSES {
            assert!(cache.keep(
                fake(size),
                layout(2048 + size * 8, 8),
                |_, _| unreachable!()
            ));
        }
        // Every class is claimed; the first has been used since, so the second is the oldest.
        assert_eq!(cache.take(layout(2048, 8)), Some(fake(0)));
        let mut freed = Vec::new();
        assert!(cache.keep(fake(99), layout(4000, 8), |b, l| freed.push((b, l))));
        assert_eq!(freed, vec![(fake(1), layout(2056, 8))]);
        assert_eq!(cache.take(layout(2056, 8)), None);
        assert_eq!(cache.take(layout(4000, 8)), Some(fake(99)));
    }

    #[test]
    fn a_busy_layout_keeps_its_class_while_all_its_blocks_are_in_use() {
        let mut cache = worker_cache();
        let flow = layout(2048, 8);
        assert!(cache.keep(fake(0), flow, |_, _| unreachable!()));
        for size in 1..CLASSES {
            assert!(cache.keep(
                fake(size),
                layout(2048 + size * 8, 8),
                |_, _| unreachable!()
            ));
        }
        // Every block of the flows' layout goes out to new connections, and the
        // next one still asks for one: an empty class that is asked for is busy.
        assert_eq!(cache.take(flow), Some(fake(0)));
        for size in 1..CLASSES {
            assert!(cache.keep(
                fake(100 + size),
                layout(2048 + size * 8, 8),
                |_, _| unreachable!()
            ));
        }
        assert_eq!(cache.take(flow), None);
        // A one-off layout freed now takes the oldest other class, not the flows'.
        let mut freed = Vec::new();
        assert!(cache.keep(fake(99), layout(3000, 8), |b, l| freed.push((b, l))));
        assert_eq!(
            freed,
            vec![(fake(1), layout(2056, 8)), (fake(101), layout(2056, 8))]
        );
        assert!(cache.keep(fake(0), flow, |_, _| unreachable!()));
        assert_eq!(cache.take(flow), Some(fake(0)));
    }
}
