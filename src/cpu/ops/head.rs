//! One attention head of one sequence, the steps the windowed attention (attention.rs)
//! and the global attention (global_attention.rs) share: the views of a head inside the
//! qkv rows, its logits product, the softmax, and the backward from its probabilities.
//! Shapes: a sequence's qkv `[T, 3D]`, a head's q, k, v `[T, d]`, probabilities `[T, T]`.
//!
//! Everything is `#[inline(always)]`: the callers run it inside [`super::super::simd::wide`].

use super::super::gemm::{Mat, Start};
use super::super::real::Real;
use super::super::simd::{self, sum};

/// Head `h`'s q, k and v `[T, d]` (columns `col..col + d` of each third) inside a
/// sequence's qkv rows `[T, 3·width]`.
pub(super) fn head_views<T>(qkv: &[T], width: usize, col: usize, d: usize) -> [Mat<'_, T>; 3] {
    let t = qkv.len() / (3 * width);
    std::array::from_fn(|part| Mat::strided(&qkv[part * width + col..], t, d, 3 * width))
}

/// `1/√d`, the logits' scale.
pub(super) fn logit_scale<T: Real>(d: usize) -> T {
    T::one() / T::of(d as f64).sqrt()
}

/// p `[t, t]` = q·kᵀ, then `row(i, p_i)` turns query row `i` of raw products into
/// probabilities. The product goes to the f32 product kernel (`Real::product`), whose
/// register tile beats rows of multiply-adds only `T` long.
#[inline(always)]
pub(super) fn head_probs<T: Real>(
    p: &mut [T],
    t: usize,
    q: Mat<T>,
    k: Mat<T>,
    mut row: impl FnMut(usize, &mut [T]),
) {
    T::product(p, t, q, k.t(), Start::Zero);
    for (i, z) in p.chunks_exact_mut(t).enumerate() {
        row(i, z);
    }
}

/// Softmax of one row in place; returns its log-sum-exp, `max + ln Σ e^(z - max)`.
/// The exponentials are one pass and their sum another: summed inside the same loop, the
/// running sum's order keeps the whole loop, the exponentials included, scalar.
#[inline(always)]
pub(super) fn softmax_in_place<T: Real>(row: &mut [T]) -> T {
    let max = simd::max(row);
    for v in row.iter_mut() {
        *v = (*v - max).exp_vectorised();
    }
    let total = simd::sum(row.len(), |j| row[j]);
    let inv = T::one() / total;
    for v in row.iter_mut() {
        *v *= inv;
    }
    max + total.ln()
}

/// From the head's probabilities p `[T, T]` and its output gradient dout `[T, d]`: its
/// dq, dk, dv into columns `col..col + d` of each third of dqkv `[T, 3·width]`
/// (overwritten). `dz` `[T, T]` is scratch. `logit_grad(dz)` sees the gradient of the
/// logits (after scale and bias, before the softmax), for a bias gradient; q and k then
/// take it times `scale`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) fn head_backward<T: Real>(
    dqkv: &mut [T],
    width: usize,
    col: usize,
    dz: &mut [T],
    dout: Mat<T>,
    [q, k, v]: [Mat<T>; 3],
    p: &[T],
    scale: T,
    logit_grad: impl FnOnce(&[T]),
) {
    let t = dqkv.len() / (3 * width);
    let p_mat = Mat::new(p, t, t);
    // dv = pᵀ·dout, dp = dout·vᵀ.
    T::product(
        &mut dqkv[2 * width + col..],
        3 * width,
        p_mat.t(),
        dout,
        Start::Zero,
    );
    T::product(dz, t, dout, v.t(), Start::Zero);
    // Softmax backward per query row: dz = p ⊙ (dp - Σ_j p dp).
    for (dz, p) in dz.chunks_exact_mut(t).zip(p.chunks_exact(t)) {
        let dot = sum(t, |j| p[j] * dz[j]);
        for (dz, &p) in dz.iter_mut().zip(p) {
            *dz = p * (*dz - dot);
        }
    }
    logit_grad(dz);
    for dz in dz.iter_mut() {
        *dz *= scale;
    }
    let dz = Mat::new(dz, t, t);
    T::product(&mut dqkv[col..], 3 * width, dz, k, Start::Zero);
    T::product(&mut dqkv[width + col..], 3 * width, dz.t(), q, Start::Zero);
}
