//! How cacher asks the C allocator to give memory back where it would not by itself.
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
pub fn reuse_stream_buffers() {
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
}

/// Whether the user tuned glibc's allocator themselves.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn user_tuned() -> bool {
    ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
        || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc."))
}
