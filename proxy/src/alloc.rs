//! The binary's global allocator: mimalloc, called the way `std`'s system allocator calls
//! malloc. Requests whose alignment the allocator guarantees anyway (≤ 16 bytes, and not above
//! the size) go to `mi_malloc`/`mi_realloc`/`mi_zalloc`; only larger alignments take the aligned
//! entry points. The `mimalloc` crate sends everything through `mi_malloc_aligned`, whose fast path
//! gives up whenever a page's free list needs refilling: in callgrind half of the proxy's
//! allocations then took the generic aligned path (~250 instructions each).
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys::{
    mi_free, mi_malloc, mi_malloc_aligned, mi_option_set, mi_option_t, mi_realloc,
    mi_realloc_aligned, mi_zalloc, mi_zalloc_aligned,
};

/// `mi_option_arena_eager_commit` in the bundled mimalloc v3's `mi_option_e` (after
/// `show_errors`, `show_stats`, `verbose` and `deprecated_eager_commit`); the Rust bindings do
/// not name it.
const MI_OPTION_ARENA_EAGER_COMMIT: mi_option_t = 4;

/// Runs when the binary is loaded, before `main` and so before the first allocation.
#[used]
#[unsafe(link_section = ".init_array")]
static COMMIT_ON_DEMAND: extern "C" fn() = commit_on_demand;

/// mimalloc commits each arena up front on Linux (`arena_eager_commit`). With transparent huge
/// pages set to `always` the kernel then backs the first arena with 2 MiB pages, and an idle
/// sidecar held ~16 MB instead of ~10 MB (`AnonHugePages`). Committing on demand (what mimalloc
/// does on systems without overcommit) keeps idle memory low; requests per second are unchanged.
/// An explicit `MIMALLOC_ARENA_EAGER_COMMIT` in the environment still wins.
extern "C" fn commit_on_demand() {
    // SAFETY: `getenv` reads the environment with a NUL-terminated name, before any thread
    // exists; `mi_option_set` only writes mimalloc's static option table (no allocation).
    unsafe {
        if libc::getenv(c"MIMALLOC_ARENA_EAGER_COMMIT".as_ptr()).is_null() {
            mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
        }
    }
}

/// mimalloc's guaranteed alignment on 64-bit targets (`MI_MAX_ALIGN_SIZE`).
const MIN_ALIGN: usize = 16;

pub struct MiMalloc;

fn natural(layout: Layout, size: usize) -> bool {
    layout.align() <= MIN_ALIGN && layout.align() <= size
}

// SAFETY: every method forwards to mimalloc, which returns blocks of at least the requested size
// aligned to at least the requested alignment (natural alignment covers ≤ MIN_ALIGN), or null on
// failure; `dealloc`/`realloc` receive only pointers this allocator returned, as `GlobalAlloc`'s
// contract guarantees, and mimalloc frees or resizes any of its blocks.
unsafe impl GlobalAlloc for MiMalloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl comment.
        unsafe {
            if natural(layout, layout.size()) {
                mi_malloc(layout.size()).cast()
            } else {
                mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl comment.
        unsafe {
            if natural(layout, layout.size()) {
                mi_zalloc(layout.size()).cast()
            } else {
                mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: see the impl comment.
        unsafe { mi_free(ptr.cast::<c_void>()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: see the impl comment.
        unsafe {
            if natural(layout, new_size) {
                mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn arenas_commit_on_demand_unless_the_environment_says_otherwise() {
        if std::env::var_os("MIMALLOC_ARENA_EAGER_COMMIT").is_some() {
            return;
        }
        // SAFETY: reads mimalloc's option table.
        let v = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_ARENA_EAGER_COMMIT) };
        assert_eq!(v, 0, "the load-time constructor ran");
    }

    #[test]
    fn allocations_are_aligned_and_resizable() {
        let a = MiMalloc;
        for (size, align) in [(1, 1), (24, 8), (100, 16), (64, 64), (3000, 8), (8, 4096)] {
            let layout = Layout::from_size_align(size, align).unwrap();
            // SAFETY: a non-zero-size layout; the block is written within its size, resized,
            // and freed once with the allocator that made it.
            unsafe {
                let p = a.alloc_zeroed(layout);
                assert!(!p.is_null());
                assert_eq!(p as usize % align, 0, "{size}/{align}");
                assert!((0..size).all(|i| *p.add(i) == 0));
                p.write_bytes(0xab, size);
                let q = a.realloc(p, layout, size * 3);
                assert_eq!(q as usize % align, 0, "{size}/{align} after realloc");
                assert_eq!(*q, 0xab);
                a.dealloc(q, Layout::from_size_align(size * 3, align).unwrap());
            }
        }
    }
}
