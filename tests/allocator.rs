//! The static releases' allocator (`cacher::memory::LargeBlocks`), used directly: here
//! no other test starts a content stream in this process, which would make it keep
//! blocks before the test's own stream.

use std::alloc::{GlobalAlloc, Layout};

use cacher::memory::{LargeBlocks, reuse_stream_buffers};

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
        // Nothing is kept before a stream starts (the only test that starts one).
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
