//! LayerNorm over the last dimension, eps 1e-6, biased variance (as PyTorch).
//! Shapes: x `[n, D]`, gamma `[D]`, beta `[D]` → y `[n, D]`, saving mean `[n]`, rstd `[n]`.

use rayon::prelude::*;

use super::super::real::Real;
use super::super::simd::{sum, wide};
use super::ROWS_PER_TASK;
use crate::config::LN_EPS;

/// Per-row statistics the backward needs.
#[derive(Clone, Debug, Default)]
pub struct Stats<T> {
    pub mean: Vec<T>,
    /// `1 / sqrt(var + eps)`.
    pub rstd: Vec<T>,
}

/// y `[n, D]` = (x - mean) · rstd · gamma + beta per row; overwrites y.
pub fn layernorm_forward<T: Real>(y: &mut [T], x: &[T], gamma: &[T], beta: &[T]) -> Stats<T> {
    let d = gamma.len();
    assert!(d > 0 && beta.len() == d && x.len().is_multiple_of(d) && y.len() == x.len());
    let n = x.len() / d;
    let (mut mean, mut rstd) = (vec![T::zero(); n], vec![T::zero(); n]);
    let task = d * ROWS_PER_TASK;
    y.par_chunks_mut(task)
        .zip(x.par_chunks(task))
        .zip(mean.par_chunks_mut(ROWS_PER_TASK))
        .zip(rstd.par_chunks_mut(ROWS_PER_TASK))
        .for_each(|(((y, x), mean), rstd)| {
            wide(
                #[inline(always)]
                || normalise_rows(y, x, mean, rstd, gamma, beta),
            )
        });
    Stats { mean, rstd }
}

/// One task's rows of [`layernorm_forward`]; inlined into its caller, so that [`wide`]
/// compiles it.
#[inline(always)]
fn normalise_rows<T: Real>(
    y: &mut [T],
    x: &[T],
    mean: &mut [T],
    rstd: &mut [T],
    gamma: &[T],
    beta: &[T],
) {
    let d = gamma.len();
    let (inv_d, eps) = (T::one() / T::of(d as f64), T::of(LN_EPS));
    for (((y, x), mean), rstd) in y
        .chunks_exact_mut(d)
        .zip(x.chunks_exact(d))
        .zip(mean)
        .zip(rstd)
    {
        let mu = sum(d, |j| x[j]) * inv_d;
        let var = sum(d, |j| (x[j] - mu) * (x[j] - mu)) * inv_d;
        let r = T::one() / (var + eps).sqrt();
        for (((y, &x), &g), &b) in y.iter_mut().zip(x).zip(gamma).zip(beta) {
            *y = (x - mu) * r * g + b;
        }
        (*mean, *rstd) = (mu, r);
    }
}

/// From dy `[n, D]`: dx `[n, D]` += dL/dx (added: the residual stream's gradient),
/// dgamma `[D]` += Σ dy·x̂, dbeta `[D]` += Σ dy.
pub fn layernorm_backward<T: Real>(
    dx: &mut [T],
    dgamma: &mut [T],
    dbeta: &mut [T],
    dy: &[T],
    x: &[T],
    stats: &Stats<T>,
    gamma: &[T],
) {
    let d = gamma.len();
    assert!(dgamma.len() == d && dbeta.len() == d);
    assert!(x.len() == stats.mean.len() * d && dy.len() == x.len() && dx.len() == x.len());
    let task = d * ROWS_PER_TASK;
    let partials: Vec<(Vec<T>, Vec<T>)> = dx
        .par_chunks_mut(task)
        .zip(dy.par_chunks(task))
        .zip(x.par_chunks(task))
        .zip(stats.mean.par_chunks(ROWS_PER_TASK))
        .zip(stats.rstd.par_chunks(ROWS_PER_TASK))
        .map(|((((dx, dy), x), mean), rstd)| {
            let (mut dg, mut db) = (vec![T::zero(); d], vec![T::zero(); d]);
            wide(
                #[inline(always)]
                || backward_rows(dx, &mut dg, &mut db, dy, x, mean, rstd, gamma),
            );
            (dg, db)
        })
        .collect();
    for (dg, db) in partials {
        for j in 0..d {
            dgamma[j] += dg[j];
            dbeta[j] += db[j];
        }
    }
}

/// One task's rows of [`layernorm_backward`], its parameter gradients into `dg`, `db`;
/// inlined into its caller, so that [`wide`] compiles it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_rows<T: Real>(
    dx: &mut [T],
    dg: &mut [T],
    db: &mut [T],
    dy: &[T],
    x: &[T],
    mean: &[T],
    rstd: &[T],
    gamma: &[T],
) {
    let d = gamma.len();
    let inv_d = T::one() / T::of(d as f64);
    let mut xhat = vec![T::zero(); d];
    let rows = dx
        .chunks_exact_mut(d)
        .zip(dy.chunks_exact(d))
        .zip(x.chunks_exact(d));
    for (((dx, dy), x), (&mu, &r)) in rows.zip(mean.iter().zip(rstd)) {
        // dL/dx = r (g - mean(g) - x̂ mean(g x̂)) with g = dy·gamma.
        for j in 0..d {
            xhat[j] = (x[j] - mu) * r;
            dg[j] += dy[j] * xhat[j];
            db[j] += dy[j];
        }
        let mean_g = sum(d, |j| dy[j] * gamma[j]) * inv_d;
        let mean_gx = sum(d, |j| dy[j] * gamma[j] * xhat[j]) * inv_d;
        for j in 0..d {
            dx[j] += r * (dy[j] * gamma[j] - mean_g - xhat[j] * mean_gx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_each_row_then_scales_and_shifts() {
        let x: Vec<f64> = (0..3 * 5)
            .map(|i| (i as f64 * 1.3).sin() * 4.0 + i as f64)
            .collect();
        let (gamma, beta) = ([2.0; 5], [0.5; 5]);
        let mut y = vec![0.0; x.len()];
        let stats = layernorm_forward(&mut y, &x, &gamma, &beta);
        for (row, xr) in y.chunks(5).zip(x.chunks(5)) {
            let z: Vec<f64> = row.iter().map(|v| (v - 0.5) / 2.0).collect();
            let mean = z.iter().sum::<f64>() / 5.0;
            let var = z.iter().map(|v| v * v).sum::<f64>() / 5.0;
            let xvar = {
                let m = xr.iter().sum::<f64>() / 5.0;
                xr.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / 5.0
            };
            assert!(mean.abs() < 1e-12);
            // var(x̂) = var / (var + eps), not exactly 1.
            assert!((var - xvar / (xvar + 1e-6)).abs() < 1e-12, "{var}");
        }
        assert_eq!(stats.mean.len(), 3);
    }
}
