//! Elementwise loops compiled for AVX-512 where the CPU has it. The crate is built for
//! baseline x86-64, so LLVM vectorises a plain loop with SSE2, four f32 lanes (two f64);
//! inside [`wide`] the same loop gets sixteen (eight), and the f64 erf of GELU with it.

use super::real::Real;

/// Runs `f`, compiled for AVX-512 when this CPU has it, else as built. Pass the closure
/// as `#[inline(always)] || …` (and mark what it calls the same), or LLVM may keep a large
/// body out of line, compiled without AVX-512. The bits are the
/// same either way: without fast-math LLVM vectorises only what needs no reordering of
/// float operations, and it never fuses a multiply and an add on its own.
#[inline(always)]
pub fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has the features `with_avx512` is compiled for.
        return unsafe { with_avx512(f) };
    }
    f()
}

/// `f` inlined into a function compiled with AVX-512F (and the AVX2 and FMA it implies).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn with_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Partial sums a reduction keeps: one per lane of a 512-bit f32 vector.
const LANES: usize = 16;

/// `Σ f(i)` over `0..len`, summed as `LANES` interleaved partial sums combined in order, a
/// fixed order that vectorises (a sum taken left to right cannot).
#[inline(always)]
pub fn sum<T: Real>(len: usize, f: impl Fn(usize) -> T) -> T {
    let mut lanes = [T::zero(); LANES];
    let whole = len - len % LANES;
    for base in (0..whole).step_by(LANES) {
        for (l, lane) in lanes.iter_mut().enumerate() {
            *lane += f(base + l);
        }
    }
    for (l, i) in (whole..len).enumerate() {
        lanes[l] += f(i);
    }
    lanes.into_iter().fold(T::zero(), |a, b| a + b)
}
