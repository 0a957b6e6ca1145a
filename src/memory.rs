//! How cacher asks the C allocator to give memory back where it would not by itself.

/// Pins glibc's mmap threshold at its default, 128 KiB. Left to itself, glibc raises
/// the threshold (up to 32 MiB) each time a large buffer is freed; from then on the
/// scan's growing tables come from the heap, and the holes their growth leaves stay
/// resident: a 10^6-file upload peaked at 337 MiB of RSS with 220 MiB live. Mapped on
/// its own, a buffer grows with `mremap` and goes back to the system when freed.
/// musl's allocator already works so; elsewhere this does nothing.
pub fn keep_large_buffers_mapped() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a tunable of the allocator; nothing else runs yet.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}
