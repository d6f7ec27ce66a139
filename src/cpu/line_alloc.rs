//! The `lomar` program's allocator: the system's, with every allocation of a page or more
//! starting on a cache line (64 B) instead of the system's 16 bytes.
//!
//! The CPU products store their output tile by tile in 16-float vectors. In an activation
//! that starts 16 bytes into a line, every such store straddles two lines, and a tile row
//! touches four lines where three would do (the step measured a few percent slower). Small
//! allocations keep the system's alignment; nothing's correctness depends on this, only
//! the speed of the products (tests, built without it, run the same code).

use std::alloc::{GlobalAlloc, Layout, System};

/// Bytes from which an allocation is line-aligned: a page.
const LARGE: usize = 4096;
/// A cache line.
const LINE: usize = 64;

/// The allocator (see the module); `main.rs` installs it.
pub struct LineAligned;

/// The layout the system is asked for: `layout`, line-aligned when large.
fn widened(layout: Layout) -> Layout {
    if layout.size() >= LARGE && layout.align() < LINE {
        Layout::from_size_align(layout.size(), LINE).unwrap_or(layout)
    } else {
        layout
    }
}

// SAFETY: every call passes to `System` with one layout per block, `widened` of the
// caller's, which is a valid layout of the same size; a block is freed with the layout it
// was allocated with, as `widened` is a function of the caller's layout alone.
unsafe impl GlobalAlloc for LineAligned {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        System.alloc(widened(layout))
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        System.alloc_zeroed(widened(layout))
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, widened(layout))
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let (old, new) = (
            widened(layout),
            widened(Layout::from_size_align_unchecked(new_size, layout.align())),
        );
        if old.align() == new.align() {
            return System.realloc(ptr, old, new_size);
        }
        // Crossing the size where the alignment changes: a new block, then the copy.
        let moved = System.alloc(new);
        if !moved.is_null() {
            std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
            System.dealloc(ptr, old);
        }
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_blocks_start_on_a_line_through_growth_and_shrinking() {
        let a = LineAligned;
        let small = Layout::from_size_align(100, 4).unwrap();
        // SAFETY: each block is used within its size and freed with its last layout.
        unsafe {
            let p = a.alloc(small);
            p.write_bytes(7, 100);
            let p = a.realloc(p, small, 10_000);
            assert_eq!(p as usize % LINE, 0);
            assert!(std::slice::from_raw_parts(p, 100).iter().all(|&b| b == 7));
            let grown = Layout::from_size_align(10_000, 4).unwrap();
            let p = a.realloc(p, grown, 50);
            assert_eq!(std::slice::from_raw_parts(p, 50), &[7; 50]);
            a.dealloc(p, Layout::from_size_align(50, 4).unwrap());
            let big = Layout::from_size_align(1 << 20, 4).unwrap();
            let q = a.alloc_zeroed(big);
            assert_eq!(q as usize % LINE, 0);
            a.dealloc(q, big);
        }
    }
}
