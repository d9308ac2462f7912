//! Keeping the daemon's resident memory small: glibc's allocator is told to
//! serve large buffers (layer and transfer chunks) from their own mappings,
//! which go back to the kernel when freed, to keep few arenas, and the heap's
//! free pages are handed back every few seconds.

/// How often free heap pages are returned to the kernel.
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Allocations at least this big get their own mapping.
const MMAP_THRESHOLD: i32 = 128 * 1024;

/// Tunes the allocator (before the runtime starts threads) and starts the
/// trimming thread.
#[cfg(target_env = "gnu")]
pub fn keep_small() {
    #[allow(
        unsafe_code,
        reason = "glibc's mallopt has no safe wrapper (not in nix)"
    )]
    // SAFETY: mallopt only changes allocator parameters; called before other
    // threads allocate.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
    let spawned = std::thread::Builder::new()
        .name("malloc-trim".into())
        .spawn(|| {
            loop {
                std::thread::sleep(TRIM_EVERY);
                #[allow(
                    unsafe_code,
                    reason = "glibc's malloc_trim has no safe wrapper (not in nix)"
                )]
                // SAFETY: malloc_trim is thread-safe and has no preconditions.
                unsafe {
                    libc::malloc_trim(0);
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %kiln_proto::status::Chain(&e), "start the malloc-trim thread");
    }
}

#[cfg(not(target_env = "gnu"))]
pub fn keep_small() {}
