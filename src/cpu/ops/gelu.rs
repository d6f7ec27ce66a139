//! GELU, exact erf form: `y = x Φ(x)` with Φ the standard normal CDF.
//! Shapes: x `[n]` → y `[n]`, elementwise.

use rayon::prelude::*;

use super::super::real::Real;

const CHUNK: usize = 4096;

/// y `[n]` = x Φ(x); overwrites y.
pub fn forward<T: Real>(y: &mut [T], x: &[T]) {
    assert_eq!(y.len(), x.len());
    let (half, inv_sqrt2) = (T::of(0.5), T::of(std::f64::consts::FRAC_1_SQRT_2));
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = half * x * (T::one() + (x * inv_sqrt2).erf());
            }
        });
}

/// In place: `grad` `[n]` holds dy on entry and dx = dy (Φ(x) + x φ(x)) on return.
pub fn backward<T: Real>(grad: &mut [T], x: &[T]) {
    assert_eq!(grad.len(), x.len());
    let (half, inv_sqrt2) = (T::of(0.5), T::of(std::f64::consts::FRAC_1_SQRT_2));
    let inv_sqrt_2pi = T::of(1.0 / (2.0 * std::f64::consts::PI).sqrt());
    grad.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(g, x)| {
            for (g, &x) in g.iter_mut().zip(x) {
                let cdf = half * (T::one() + (x * inv_sqrt2).erf());
                let pdf = inv_sqrt_2pi * (-half * x * x).exp();
                *g *= cdf + x * pdf;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_known_values() {
        // x Φ(x) at 1, -1 and 2, from Φ(1) = 0.841344746068543, Φ(2) = 0.977249868051821.
        let mut y = [0.0f64; 4];
        forward(&mut y, &[0.0, 1.0, -1.0, 2.0]);
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
