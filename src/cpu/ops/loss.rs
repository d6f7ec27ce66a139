//! Reconstruction loss over the masked patches, gradient fused (docs/DESIGN.md §1.3).
//! Shapes: pred `[N, 3p²]`, target `[N, 3p²]` → loss = mean over N of mean over 3p² of
//! (pred - target)², i.e. the mean over all N·3p² values; dpred `[N, 3p²]`.

use rayon::prelude::*;

use super::super::real::Real;
use super::super::simd::{sum, wide};

const CHUNK: usize = 4096;

/// The loss alone.
pub fn masked_mse_loss<T: Real>(pred: &[T], target: &[T]) -> T {
    assert!(!pred.is_empty() && pred.len() == target.len());
    let partials: Vec<T> = pred
        .par_chunks(CHUNK)
        .zip(target.par_chunks(CHUNK))
        .map(|(p, t)| {
            wide(
                #[inline(always)]
                || sum(p.len(), |i| (p[i] - t[i]) * (p[i] - t[i])),
            )
        })
        .collect();
    partials.into_iter().sum::<T>() / T::of(pred.len() as f64)
}

/// The loss, and dpred `[N, 3p²]` = `scale` · dloss/dpred (overwritten).
pub fn masked_mse<T: Real>(dpred: &mut [T], pred: &[T], target: &[T], scale: T) -> T {
    assert_eq!(dpred.len(), pred.len());
    let g = scale * T::of(2.0) / T::of(pred.len() as f64);
    dpred
        .par_chunks_mut(CHUNK)
        .zip(pred.par_chunks(CHUNK))
        .zip(target.par_chunks(CHUNK))
        .for_each(|((d, p), t)| {
            for ((d, &p), &t) in d.iter_mut().zip(p).zip(t) {
                *d = g * (p - t);
            }
        });
    masked_mse_loss(pred, target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_of_squared_errors_and_its_gradient() {
        let (pred, target) = ([1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 5.0, 3.0]);
        let mut d = [0.0; 4];
        let l = masked_mse(&mut d, &pred, &target, 0.5);
        assert_eq!(l, (1.0 + 0.0 + 4.0 + 1.0) / 4.0);
        assert_eq!(d, [0.25, 0.0, -0.5, 0.25]);
    }
}
