//! GELU, exact erf form: `y = x Φ(x)` with Φ the standard normal CDF.
//! Shapes: x `[n]` → y `[n]`, elementwise, saving Φ(x) `[n]` so the backward needs no erf.

use rayon::prelude::*;

use super::super::real::Real;
use super::super::simd::wide;

const CHUNK: usize = 4096;

/// y `[n]` = x Φ(x) and cdf `[n]` = Φ(x); overwrites both.
pub fn gelu_forward<T: Real>(y: &mut [T], cdf: &mut [T], x: &[T]) {
    assert!(y.len() == x.len() && cdf.len() == x.len());
    let (half, inv_sqrt2) = (T::of(0.5), T::of(std::f64::consts::FRAC_1_SQRT_2));
    y.par_chunks_mut(CHUNK)
        .zip(cdf.par_chunks_mut(CHUNK))
        .zip(x.par_chunks(CHUNK))
        .for_each(|((y, cdf), x)| {
            wide(
                #[inline(always)]
                || {
                    for ((y, cdf), &x) in y.iter_mut().zip(cdf).zip(x) {
                        *cdf = half * (T::one() + (x * inv_sqrt2).erf());
                        *y = x * *cdf;
                    }
                },
            )
        });
}

/// In place: `grad` `[n]` holds dy on entry and dx = dy (Φ(x) + x φ(x)) on return.
pub fn gelu_backward<T: Real>(grad: &mut [T], x: &[T], cdf: &[T]) {
    assert!(grad.len() == x.len() && cdf.len() == x.len());
    let half = T::of(0.5);
    let inv_sqrt_2pi = T::of(1.0 / (2.0 * std::f64::consts::PI).sqrt());
    grad.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .zip(cdf.par_chunks(CHUNK))
        .for_each(|((g, x), cdf)| {
            wide(
                #[inline(always)]
                || {
                    for ((g, &x), &cdf) in g.iter_mut().zip(x).zip(cdf) {
                        let pdf = inv_sqrt_2pi * (-half * x * x).exp_vectorised();
                        *g *= cdf + x * pdf;
                    }
                },
            )
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_known_values() {
        // x Φ(x) at 1, -1 and 2, from Φ(1) = 0.841344746068543, Φ(2) = 0.977249868051821.
        let x = [0.0f64, 1.0, -1.0, 2.0];
        let (mut y, mut cdf) = ([0.0; 4], [0.0; 4]);
        gelu_forward(&mut y, &mut cdf, &x);
        let want = [
            0.0,
            0.841344746068543,
            -0.158655253931457,
            1.954499736103642,
        ];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-14, "{a} vs {b}");
        }
    }
}
