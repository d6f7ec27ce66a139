//! NVTX ranges, so Nsight Systems shows a step's phases and blocks on its timeline.
//!
//! cudarc loads libnvToolsExt (NVTX v2) on first use and panics when it is missing. CUDA 13
//! ships only libnvtx3interop.so.1, which exports the same symbols, so a profiling setup
//! puts a link `libnvToolsExt.so.1 -> libnvtx3interop.so.1` on LD_LIBRARY_PATH. Without
//! the library the ranges are skipped; with it and no profiler attached they cost a call.

use std::sync::OnceLock;

use cudarc::nvtx::{scoped_range, Range};

fn present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only tries to dlopen the library.
    *PRESENT.get_or_init(|| unsafe { cudarc::nvtx::sys::is_culib_present() })
}

/// A range named `name` until the guard drops; `None` without the library.
pub fn range(name: impl AsRef<str>) -> Option<Range> {
    present().then(|| scoped_range(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether or not this machine has the library, asking for a range never panics, and
    /// a range is given exactly when the library is there.
    #[test]
    fn ranges_follow_the_library() {
        let r = range("a test range");
        assert_eq!(r.is_some(), present());
    }
}
