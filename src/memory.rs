//! How cacher works with the C allocator: asking glibc's to give memory back where it
//! would not by itself, and keeping the static releases' from mapping every large
//! buffer afresh ([`LargeBlocks`]).
//!
//! glibc raises its mmap threshold (up to 32 MiB) each time a large buffer is freed;
//! from then on buffers of up to that size come from the heap. That suits the content
//! stream, whose pack and chunk buffers are then reused without new page faults, but
//! not the scan and the decoded tables before it: their growing lists leave holes in
//! the heap that stay resident (a 10^6-file upload peaked at 337 MiB of RSS with 220
//! MiB live). So a tree's tables are mapped on their own until its stream starts. musl's
//! allocator gives memory back by itself; elsewhere these do nothing, and so they do
//! when the user tuned glibc's allocator (`MALLOC_*_THRESHOLD_`, `GLIBC_TUNABLES`).

/// Maps every buffer over 128 KiB on its own (glibc's default threshold, pinned), so
/// it grows with `mremap` and goes back to the system when freed. Called when a `dir`
/// command starts, whose scan and tree tables are what fill the heap; plain files and
/// docker images keep glibc's own choice.
pub fn map_large_tables() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if !user_tuned() {
        // SAFETY: mallopt only sets a tunable of the allocator.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        }
        PINNED.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Whether [`map_large_tables`] pinned the threshold, which the stream then undoes.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
static PINNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Lets buffers of up to 16 MiB come from the heap again, where freed ones are reused,
/// and keeps up to 32 MiB free at its top (what glibc would choose itself once an 8 MiB
/// pack is freed): called when a content stream starts, whose packs would otherwise
/// each be mapped and faulted in afresh. Measured on a cold 1 GiB upload to a
/// `file://` store: 1.3 s, against 2.2 to 2.7 s with the threshold left at 128 KiB.
/// Does nothing unless the threshold was pinned (docker images keep glibc's choice).
/// Under [`LargeBlocks`], freed blocks are kept while the returned guard lives.
pub fn reuse_stream_buffers() -> StreamBuffers {
    STREAMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if PINNED.swap(false, std::sync::atomic::Ordering::Relaxed) {
        // SAFETY: mallopt sets its fields under the main arena's lock; other threads
        // read the thresholds only to choose where their next allocation comes from,
        // and every chunk records how it was allocated, so a stale read costs nothing.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 16 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
        }
    }
    StreamBuffers(())
}

/// A content stream running, from [`reuse_stream_buffers`]: once the last one ends,
/// the blocks [`LargeBlocks`] kept go back to the system. What follows a stream (a
/// tree state of 10^6 stamps, the manifest) asks for other sizes, and idle kept
/// blocks beside it raised a 10^6-file restore's peak RSS by 50 MiB.
#[must_use = "freed blocks are kept only while the stream runs"]
pub struct StreamBuffers(());

impl Drop for StreamBuffers {
    fn drop(&mut self) {
        if STREAMS.fetch_sub(1, std::sync::atomic::Ordering::Relaxed) == 1 {
            LargeBlocks::release_kept();
        }
    }
}

/// Whether the user tuned glibc's allocator themselves.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn user_tuned() -> bool {
    ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
        || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc."))
}

/// The global allocator of the static (musl) releases: the C allocator, but once a
/// content stream started ([`reuse_stream_buffers`]), large buffers that are freed are
/// kept for reuse, up to [`LargeBlocks::KEPT_BYTES`].
///
/// The static releases link zig's libc, whose `malloc` maps every block over 32 KiB on
/// its own and unmaps it when freed (musl's own does the same from about 128 KiB).
/// A restore decompresses each chunk (16 to 256 KiB) into a fresh buffer, so it made
/// over 6,000 `mmap`/`munmap` pairs, each page faulted in anew and each unmap flushing
/// the other cores' TLBs: 1.5x the time of the glibc build, which reuses its heap.
/// Blocks of 32 KiB to 1 MiB are rounded up to one of four sizes per power of two (at
/// most a quarter more), so a freed block fits the next request of about its size.
/// Before the stream, a tree's tables grow through every size and would fill the kept
/// blocks with sizes never asked for again: 60 MiB more peak RSS on a 10^6-file tree.
pub struct LargeBlocks;

/// Freed blocks kept for reuse: the addresses in each size class (exposed, so that
/// the static array needs no `Send` pointer type), and their bytes.
struct Kept {
    blocks: [[usize; KEPT_PER_CLASS]; CLASSES],
    counts: [usize; CLASSES],
    bytes: usize,
}

/// Content streams running: freed blocks are kept while there is one.
static STREAMS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// The blocks kept, shared by every [`LargeBlocks`] (there is one, the global allocator,
/// but for tests).
static KEPT: std::sync::Mutex<Kept> = std::sync::Mutex::new(Kept {
    blocks: [[0; KEPT_PER_CLASS]; CLASSES],
    counts: [0; CLASSES],
    bytes: 0,
});

/// Blocks at most this aligned come from `malloc` itself (its guarantee on the 64-bit
/// targets cacher ships); others are passed through.
const MALLOC_ALIGN: usize = 16;
/// Blocks kept per size class.
const KEPT_PER_CLASS: usize = 1024;
/// Size classes: four per power of two, from 2^14 (unused below 2^15) to 2^20.
const CLASSES: usize = 28;

impl LargeBlocks {
    /// The smallest block kept: zig's `malloc` maps blocks from here on (its header of
    /// 16 bytes makes this one 16 bytes over its largest slab slot).
    pub const MIN_BLOCK: usize = 32 * 1024;
    /// The largest block kept. Larger ones (packs, fetched ranges) are few per second,
    /// and keeping them would cost the most memory.
    pub const MAX_BLOCK: usize = 1 << 20;
    /// Most bytes kept at once, over all classes: a bound on what this adds to RSS
    /// (a restore holds more than this in chunk buffers at its peak).
    pub const KEPT_BYTES: usize = 64 << 20;

    /// The allocator (its kept blocks are shared).
    pub const fn new() -> LargeBlocks {
        LargeBlocks
    }

    /// The size of the blocks of class `class`: the inverse of [`LargeBlocks::class`].
    fn class_size(class: usize) -> usize {
        (class % 4 + 5) << (class / 4 + 12)
    }

    /// Gives every kept block back to the system, one at a time: each unmap may flush
    /// the other cores' TLBs, and a thread allocating meanwhile should not wait for
    /// all of them. Stops if a stream starts again, whose blocks these then are.
    fn release_kept() {
        loop {
            let next = {
                let mut kept = Self::lock();
                if STREAMS.load(std::sync::atomic::Ordering::Relaxed) > 0 {
                    return;
                }
                let Some(class) = kept.counts.iter().position(|&count| count > 0) else {
                    return;
                };
                let size = Self::class_size(class);
                kept.counts[class] -= 1;
                kept.bytes -= size;
                (kept.blocks[class][kept.counts[class]], size)
            };
            let (address, size) = next;
            // SAFETY: a kept block was allocated by `System` with its class's layout,
            // and its address was exposed when it was kept.
            unsafe {
                std::alloc::GlobalAlloc::dealloc(
                    &std::alloc::System,
                    std::ptr::with_exposed_provenance_mut(address),
                    Self::class_layout(size),
                )
            }
        }
    }

    /// The size class of a block of `size` bytes and the size it is allocated with;
    /// `None` for a block passed through to the C allocator as it is.
    fn class(size: usize, align: usize) -> Option<(usize, usize)> {
        if !(Self::MIN_BLOCK..=Self::MAX_BLOCK).contains(&size) || align > MALLOC_ALIGN {
            return None;
        }
        // size - 1 is in [2^top, 2^(top+1)): a quarter of that power is the step.
        let top = (usize::BITS - 1 - (size - 1).leading_zeros()) as usize;
        let step = 1usize << (top - 2);
        let rounded = size.div_ceil(step) * step;
        Some(((top - 14) * 4 + rounded / step - 5, rounded))
    }

    /// The layout every block of a class of `size` bytes is allocated and freed with.
    fn class_layout(size: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(size, MALLOC_ALIGN).expect("a class's size fits")
    }

    fn lock() -> std::sync::MutexGuard<'static, Kept> {
        // Nothing panics while holding the lock; a poisoned one is as good.
        KEPT.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A kept block of class `class`, if any.
    fn take(&self, class: usize, size: usize) -> Option<*mut u8> {
        let mut kept = Self::lock();
        let count = kept.counts[class];
        (count > 0).then(|| {
            kept.counts[class] = count - 1;
            kept.bytes -= size;
            std::ptr::with_exposed_provenance_mut(kept.blocks[class][count - 1])
        })
    }

    /// Keeps a freed block of class `class`; false when there is no room for it, or
    /// no stream started yet.
    fn keep(&self, ptr: *mut u8, class: usize, size: usize) -> bool {
        // Under the lock, which orders it against `release_kept` at a stream's end: a
        // block freed meanwhile is either released with the others or not kept.
        let mut kept = Self::lock();
        if STREAMS.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            return false;
        }
        let count = kept.counts[class];
        if count == KEPT_PER_CLASS || kept.bytes + size > Self::KEPT_BYTES {
            return false;
        }
        kept.blocks[class][count] = ptr.expose_provenance();
        kept.counts[class] = count + 1;
        kept.bytes += size;
        true
    }

    /// Bytes kept now.
    #[cfg(test)]
    fn kept_bytes(&self) -> usize {
        Self::lock().bytes
    }
}

impl Default for LargeBlocks {
    fn default() -> LargeBlocks {
        LargeBlocks::new()
    }
}

// SAFETY: a block of a size class is always allocated with its class's size and
// `MALLOC_ALIGN`, whether it comes from the C allocator or from the kept ones, and
// freed with them; which blocks have a class depends only on the layout, which Rust
// passes to `dealloc` and `realloc` as it was allocated (or last reallocated).
// Blocks without a class go to `System` as they are.
unsafe impl std::alloc::GlobalAlloc for LargeBlocks {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        use std::alloc::System;
        let Some((class, size)) = Self::class(layout.size(), layout.align()) else {
            // SAFETY: the caller's layout, as given.
            return unsafe { System.alloc(layout) };
        };
        match self.take(class, size) {
            Some(ptr) => ptr,
            // SAFETY: a class's layout has a non-zero size.
            None => unsafe { System.alloc(Self::class_layout(size)) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        use std::alloc::System;
        let Some((class, size)) = Self::class(layout.size(), layout.align()) else {
            // SAFETY: the caller's layout, as given.
            return unsafe { System.alloc_zeroed(layout) };
        };
        match self.take(class, size) {
            Some(ptr) => {
                // SAFETY: the block holds `size` >= layout.size() bytes.
                unsafe { std::ptr::write_bytes(ptr, 0, layout.size()) };
                ptr
            }
            // SAFETY: as in `alloc`.
            None => unsafe { System.alloc_zeroed(Self::class_layout(size)) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        use std::alloc::System;
        let Some((class, size)) = Self::class(layout.size(), layout.align()) else {
            // SAFETY: allocated by `System` with this layout.
            return unsafe { System.dealloc(ptr, layout) };
        };
        if !self.keep(ptr, class, size) {
            // SAFETY: allocated by `System` with its class's layout.
            unsafe { System.dealloc(ptr, Self::class_layout(size)) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        use std::alloc::{Layout, System};
        let old = Self::class(layout.size(), layout.align());
        let new = Self::class(new_size, layout.align());
        match (old, new) {
            // SAFETY: allocated by `System` with this layout.
            (None, None) => return unsafe { System.realloc(ptr, layout, new_size) },
            // The block already has the room.
            (Some((a, _)), Some((b, _))) if a == b => return ptr,
            _ => {}
        }
        // SAFETY: the caller guarantees a non-zero `new_size` that fits the alignment.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: as `alloc`, then both blocks hold at least the bytes copied, and the
        // old one is freed with the layout it was allocated with (its class's, when it
        // has one). A buffer that grew (a list, a table) does not come back to the size
        // it left, so its old block goes back at once rather than fill the kept ones.
        unsafe {
            let moved = self.alloc(new_layout);
            if !moved.is_null() {
                std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                let freed = old.map_or(layout, |(_, size)| Self::class_layout(size));
                System.dealloc(ptr, freed);
            }
            moved
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::{GlobalAlloc, Layout};

    #[test]
    fn size_classes_round_up_by_at_most_a_quarter_and_name_one_size_each() {
        let mut sizes = std::collections::HashMap::new();
        let step = 997; // odd, so sizes land everywhere between class edges
        let edges = (15..=24).flat_map(|p| [(1usize << p) - 1, 1 << p, (1 << p) + 1]);
        for size in (LargeBlocks::MIN_BLOCK..=LargeBlocks::MAX_BLOCK)
            .step_by(step)
            .chain(edges)
        {
            let Some((class, rounded)) = LargeBlocks::class(size, 8) else {
                assert!(!(LargeBlocks::MIN_BLOCK..=LargeBlocks::MAX_BLOCK).contains(&size));
                continue;
            };
            assert!(class < CLASSES, "{size}");
            assert!(
                rounded >= size && rounded - size <= size / 4,
                "{size} -> {rounded}"
            );
            assert_eq!(*sizes.entry(class).or_insert(rounded), rounded, "{size}");
            assert_eq!(LargeBlocks::class_size(class), rounded, "{size}");
        }
        assert_eq!(LargeBlocks::class(LargeBlocks::MIN_BLOCK - 1, 8), None);
        assert_eq!(LargeBlocks::class(LargeBlocks::MAX_BLOCK + 1, 8), None);
        assert_eq!(LargeBlocks::class(1 << 20, 64), None, "over-aligned");
    }

    /// Fills `len` bytes at `ptr` with a pattern of `seed`; checks it with `check`.
    unsafe fn pattern(ptr: *mut u8, len: usize, seed: u8, check: bool) {
        for i in 0..len {
            let want = (i as u8).wrapping_mul(31).wrapping_add(seed);
            // SAFETY: i < len, within the block.
            unsafe {
                if check {
                    assert_eq!(*ptr.add(i), want, "byte {i} of {len}");
                } else {
                    *ptr.add(i) = want;
                }
            }
        }
    }

    #[test]
    fn freed_blocks_are_reused_and_keep_contents_through_reallocs() {
        let blocks = LargeBlocks::new();
        let layout = |size| Layout::from_size_align(size, 8).unwrap();
        // SAFETY: every block is used within its layout and freed once, with it.
        unsafe {
            // Nothing is kept before a stream starts (no other unit test starts one).
            let early = blocks.alloc(layout(100_000));
            blocks.dealloc(early, layout(100_000));
            assert_eq!(blocks.kept_bytes(), 0);
            let stream = reuse_stream_buffers();

            let a = blocks.alloc(layout(100_000));
            pattern(a, 100_000, 1, false);
            blocks.dealloc(a, layout(100_000));
            assert!(blocks.kept_bytes() >= 100_000);
            // The same class (100,000 and 110,000 both round to 112 KiB): the same block.
            let b = blocks.alloc(layout(110_000));
            assert_eq!(a, b);
            assert_eq!(blocks.kept_bytes(), 0);
            // Zeroed, though the block was written before.
            blocks.dealloc(b, layout(110_000));
            let z = blocks.alloc_zeroed(layout(100_000));
            assert_eq!(z, a);
            assert!((0..100_000).all(|i| *z.add(i) == 0));

            // Growing from a small block through classes and past the largest, and back
            // down: the contents come along every time.
            let mut size = 1000;
            let mut ptr = blocks.alloc(layout(size));
            pattern(ptr, size, 7, false);
            for next in [70_000, 70_001, 200_000, 3 << 20, 20 << 20, 150_000, 500] {
                ptr = blocks.realloc(ptr, layout(size), next);
                assert!(!ptr.is_null());
                pattern(ptr, size.min(next), 7, true);
                pattern(ptr, next, 7, false);
                size = next;
            }
            blocks.dealloc(ptr, layout(size));
            blocks.dealloc(z, layout(100_000));

            // A block of a smaller class, so the release below goes through two.
            let small = blocks.alloc(layout(40_000));
            blocks.dealloc(small, layout(40_000));
            assert!(blocks.kept_bytes() >= 40_000);

            // No more than the bound is kept, however much is freed.
            let size = LargeBlocks::MAX_BLOCK;
            let count = 2 * LargeBlocks::KEPT_BYTES / size;
            let many: Vec<_> = (0..count).map(|_| blocks.alloc(layout(size))).collect();
            for &p in &many {
                pattern(p, size, 3, false);
            }
            for p in many {
                blocks.dealloc(p, layout(size));
            }
            let kept = blocks.kept_bytes();
            assert!(kept <= LargeBlocks::KEPT_BYTES, "{kept}");
            assert!(kept > LargeBlocks::KEPT_BYTES - size, "{kept}");
            // The stream over, they go back.
            drop(stream);
            assert_eq!(blocks.kept_bytes(), 0);
            let after = blocks.alloc(layout(size));
            blocks.dealloc(after, layout(size));
            assert_eq!(blocks.kept_bytes(), 0);
        }
    }
}
