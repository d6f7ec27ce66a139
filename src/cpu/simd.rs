//! Elementwise loops compiled for AVX-512 where the CPU has it. The crate is built for
//! baseline x86-64, so LLVM vectorises a plain loop with SSE2, four f32 lanes (two f64);
//! inside [`wide`] the same loop gets sixteen (eight), and the f64 erf of GELU with it.

use rayon::prelude::*;

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

/// The largest of `values` (NaNs ignored, as `max` does), taken as `LANES` interleaved
/// maxima: a left-to-right fold over `max` does not vectorise, and the maximum is the
/// same in any order.
#[inline(always)]
pub fn max<T: Real>(values: &[T]) -> T {
    let mut lanes = [T::neg_infinity(); LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(v);
        }
    }
    for (lane, &v) in lanes.iter_mut().zip(chunks.remainder()) {
        *lane = lane.max(v);
    }
    lanes.into_iter().fold(T::neg_infinity(), T::max)
}

/// `Σ v²` in f64 over all cores: fixed chunks, each summed by [`sum`], the chunks' sums
/// added in order, so the result does not depend on the thread count.
pub fn sum_of_squares(values: &[f32]) -> f64 {
    const CHUNK: usize = 1 << 16;
    let partials: Vec<f64> = values
        .par_chunks(CHUNK)
        .map(|chunk| {
            wide(
                #[inline(always)]
                || sum(chunk.len(), |i| chunk[i] as f64 * chunk[i] as f64),
            )
        })
        .collect();
    partials.into_iter().fold(0.0, |a, b| a + b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize) -> Vec<f32> {
        (0..len).map(|i| ((i as f32) * 0.731).sin() * 3.0).collect()
    }

    #[test]
    fn max_is_the_largest_value_at_every_length() {
        for len in [1, 15, 16, 17, 50, 197] {
            let v = values(len);
            let want = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&v), want, "{len}");
            let mut with_nan = v.clone();
            with_nan[len / 2] = f32::NAN;
            let want = with_nan.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&with_nan), want, "{len} with a NaN");
        }
    }

    #[test]
    fn sum_of_squares_is_exact_enough_and_independent_of_the_threads() {
        let v = values(300_001);
        let exact: f64 = v.iter().map(|&x| x as f64 * x as f64).sum();
        let on = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| sum_of_squares(&v))
        };
        let one = on(1);
        assert_eq!(one.to_bits(), on(3).to_bits());
        assert!((one - exact).abs() <= 1e-12 * exact, "{one} vs {exact}");
    }
}
