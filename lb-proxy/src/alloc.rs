//! lb-proxy's global allocator: the system allocator, with a per-worker cache
//! of the few blocks glibc serves slowly.
//!
//! Every new connection allocates four blocks and frees them when it closes:
//! tokio's task cell and the two sockets' I/O registrations (128-byte aligned,
//! so glibc takes its `posix_memalign` path, which bypasses its per-thread
//! cache and splits and coalesces chunks every time), and the flow's boxed
//! state (`tcp::proxy`, past the largest size glibc's per-thread cache holds). In a
//! profile of new connections that was most of the user-space time spent in
//! glibc (docs/research/new-connections.md). Everything else glibc already
//! serves from its per-thread cache, so it goes straight through.
//!
//! A worker thread (`cache_blocks_on_this_thread`) keeps the blocks of those
//! shapes that its flows free, a bounded stack per layout, and hands them out
//! again; so the blocks of a closed connection become the next one's without
//! reaching glibc. Only workers cache: they live as long as the process, so
//! nothing a cache holds is stranded by a thread that ends. A cache never holds
//! more than [`CLASSES`] × [`DEPTH`] blocks of at most [`CACHED_MAX`] bytes.

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
/// Layouts one worker keeps blocks of (a connection's four blocks have three).
const CLASSES: usize = 8;
/// Blocks kept per layout: enough for the connections that close between two
/// accept batches, bounded so an idle worker holds little (≤ 2 MiB in all).
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
    /// `None` while unclaimed; a class that empties may be claimed by another layout.
    layout: Option<Layout>,
    len: usize,
    blocks: [*mut u8; DEPTH],
}

/// One thread's kept blocks; off (keeping nothing) unless the thread is a worker.
pub(crate) struct BlockCache {
    on: bool,
    classes: [Class; CLASSES],
}

impl BlockCache {
    const fn new() -> Self {
        const EMPTY: Class = Class {
            layout: None,
            len: 0,
            blocks: [ptr::null_mut(); DEPTH],
        };
        Self {
            on: false,
            classes: [EMPTY; CLASSES],
        }
    }

    /// A kept block of exactly `layout`, if there is one.
    fn take(&mut self, layout: Layout) -> Option<*mut u8> {
        if !self.on {
            return None;
        }
        let class = self
            .classes
            .iter_mut()
            .find(|c| c.layout == Some(layout) && c.len > 0)?;
        class.len -= 1;
        Some(class.blocks[class.len])
    }

    /// Keeps `block` (of `layout`) for the next `take`; false when there is no
    /// room, and the caller frees it.
    fn keep(&mut self, block: *mut u8, layout: Layout) -> bool {
        if !self.on {
            return false;
        }
        let class = match self.classes.iter().position(|c| c.layout == Some(layout)) {
            Some(i) => &mut self.classes[i],
            None => match self.classes.iter_mut().find(|c| c.len == 0) {
                Some(free) => {
                    free.layout = Some(layout);
                    free
                }
                None => return false,
            },
        };
        if class.len == DEPTH {
            return false;
        }
        class.blocks[class.len] = block;
        class.len += 1;
        true
    }
}

thread_local! {
    // Const-initialised and without a destructor: reading it never allocates
    // and never fails, which an allocator needs.
    static CACHE: UnsafeCell<BlockCache> = const { UnsafeCell::new(BlockCache::new()) };
}

/// Runs `f` on this thread's cache; `None` if the thread has none (torn down).
fn with_cache<R>(f: impl FnOnce(&mut BlockCache) -> R) -> Option<R> {
    // SAFETY: the cache is this thread's alone, and `f` (take/keep) neither
    // allocates nor re-enters the allocator, so no second borrow can exist.
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
        if cacheable(layout) && with_cache(|cache| cache.keep(block, layout)) == Some(true) {
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

    #[test]
    fn only_what_glibc_serves_slowly_is_kept() {
        assert!(cacheable(layout(256, 128)), "tokio's aligned cells");
        assert!(
            cacheable(layout(1744, 8)),
            "a flow's state, past the tcache"
        );
        assert!(!cacheable(layout(64, 8)), "glibc's tcache serves it");
        assert!(!cacheable(layout(1024, 16)), "the tcache's largest bin");
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
            let flow = layout(1744, 8);
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
        let mut block = [0u8; 8];
        assert!(!cache.keep(block.as_mut_ptr(), layout(2048, 8)));
        assert_eq!(cache.take(layout(2048, 8)), None);
    }

    #[test]
    fn a_cache_is_bounded_per_layout_and_in_layouts() {
        let mut cache = BlockCache::new();
        cache.on = true;
        let mut blocks = vec![0u8; DEPTH + 1];
        let base = blocks.as_mut_ptr();
        let flow = layout(2048, 8);
        for i in 0..DEPTH {
            assert!(cache.keep(base.wrapping_add(i), flow));
        }
        assert!(
            !cache.keep(base.wrapping_add(DEPTH), flow),
            "a full class gives the block back"
        );
        for size in 1..CLASSES {
            assert!(cache.keep(base, layout(2048 + size * 8, 8)));
        }
        assert!(!cache.keep(base, layout(4000, 8)), "every class is claimed");
        // Last in, first out: the most recently freed (warmest) block first.
        assert_eq!(cache.take(flow), Some(base.wrapping_add(DEPTH - 1)));
        // A class that empties can be claimed by another layout.
        assert_eq!(cache.take(layout(2056, 8)), Some(base));
        assert!(cache.keep(base, layout(4000, 8)));
        assert_eq!(cache.take(layout(4000, 8)), Some(base));
    }
}
