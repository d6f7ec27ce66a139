//! Multi-head self-attention inside each window sequence, with BEiT's relative position
//! bias (docs/DESIGN.md §1.2).
//! Shapes: qkv `[S, T, 3D]` (q | k | v, head `i` owns columns `i*d..(i+1)*d` of each),
//! table `[(2K-1)²+3, h]` → out `[S, T, D]`, saving probs `[S, h, T, T]`.

use rayon::prelude::*;

use super::super::real::Real;
use super::super::simd::{sum, wide};

/// For every (query, key) token pair of a window sequence, its row of the bias table.
#[derive(Clone, Debug)]
pub struct RelativeIndex {
    /// Tokens per sequence, `T = 1 + K²`.
    pub tokens: usize,
    /// Rows of the table, `(2K-1)² + 3`.
    pub table_rows: usize,
    /// `[T, T]`, row = query token, column = key token; token 0 is cls.
    pub index: Vec<u32>,
}

impl RelativeIndex {
    pub fn new(window: usize) -> Self {
        let (k, span) = (window, 2 * window - 1);
        let tokens = 1 + k * k;
        let patch_rows = span * span;
        let mut index = vec![0u32; tokens * tokens];
        for i in 0..tokens {
            for j in 0..tokens {
                index[i * tokens + j] = match (i, j) {
                    (0, 0) => patch_rows + 2,
                    (0, _) => patch_rows,
                    (_, 0) => patch_rows + 1,
                    _ => {
                        let (yi, xi) = ((i - 1) / k, (i - 1) % k);
                        let (yj, xj) = ((j - 1) / k, (j - 1) % k);
                        (yi + k - 1 - yj) * span + (xi + k - 1 - xj)
                    }
                } as u32;
            }
        }
        RelativeIndex {
            tokens,
            table_rows: patch_rows + 3,
            index,
        }
    }
}

/// Sequences and width from the slices, checking they agree.
fn dims(qkv_len: usize, probs_len: usize, rel: &RelativeIndex, heads: usize) -> (usize, usize) {
    let t = rel.tokens;
    assert!(heads > 0 && probs_len.is_multiple_of(heads * t * t));
    let seqs = probs_len / (heads * t * t);
    assert!(
        seqs > 0 && qkv_len.is_multiple_of(seqs * t * 3 * heads),
        "qkv of {qkv_len} values"
    );
    (seqs, qkv_len / (seqs * t * 3))
}

/// out `[S, T, D]` = per head softmax(q·kᵀ/√d + bias)·v; probs `[S, h, T, T]` keeps the
/// softmax for the backward. Overwrites both.
///
/// One task per window sequence does every head start to finish, its `[T, T]`
/// probabilities and the head's k, v (`T·d` values each) staying in L1: the products are
/// hand-written as rows of multiply-adds, which vectorise along a row without reordering
/// any sum.
pub fn attention_forward<T: Real>(
    out: &mut [T],
    probs: &mut [T],
    qkv: &[T],
    table: &[T],
    rel: &RelativeIndex,
    heads: usize,
) {
    let (seqs, width) = dims(qkv.len(), probs.len(), rel, heads);
    assert!(out.len() == seqs * rel.tokens * width && table.len() == rel.table_rows * heads);
    let t = rel.tokens;
    out.par_chunks_mut(t * width)
        .zip(probs.par_chunks_mut(heads * t * t))
        .zip(qkv.par_chunks(t * 3 * width))
        .for_each(|((out, probs), qkv)| {
            wide(
                #[inline(always)]
                || sequence_forward(out, probs, qkv, table, rel, heads),
            )
        });
}

/// One window sequence of [`attention_forward`]; inlined into its caller, so that
/// [`wide`] compiles it.
#[inline(always)]
fn sequence_forward<T: Real>(
    out: &mut [T],
    probs: &mut [T],
    qkv: &[T],
    table: &[T],
    rel: &RelativeIndex,
    heads: usize,
) {
    let (t, width) = (rel.tokens, out.len() / rel.tokens);
    let d = width / heads;
    let scale = T::one() / T::of(d as f64).sqrt();
    let row = |i: usize| &qkv[i * 3 * width..][..3 * width];
    let mut kt = vec![T::zero(); d * t];
    for (h, p) in probs.chunks_exact_mut(t * t).enumerate() {
        transpose_head(&mut kt, qkv, width, width + h * d);
        for (i, (z, idx)) in p
            .chunks_exact_mut(t)
            .zip(rel.index.chunks_exact(t))
            .enumerate()
        {
            // z = q_i·kᵀ, as d rows of kᵀ scaled by q_i's values.
            z.fill(T::zero());
            for (&q, k) in row(i)[h * d..][..d].iter().zip(kt.chunks_exact(t)) {
                z.iter_mut().zip(k).for_each(|(z, &k)| *z += q * k);
            }
            for (z, &i) in z.iter_mut().zip(idx) {
                *z = *z * scale + table[i as usize * heads + h];
            }
            softmax_in_place(z);
            // out_i = Σ_j p_ij v_j.
            let o = &mut out[i * width + h * d..][..d];
            o.fill(T::zero());
            for (j, &p) in z.iter().enumerate() {
                let v = &row(j)[2 * width + h * d..][..d];
                o.iter_mut().zip(v).for_each(|(o, &v)| *o += p * v);
            }
        }
    }
}

/// `dst` `[d, T]` = the `d` columns of `qkv` `[T, 3·width]` from `col`, transposed.
#[inline(always)]
fn transpose_head<T: Real>(dst: &mut [T], qkv: &[T], width: usize, col: usize) {
    let t = qkv.len() / (3 * width);
    for (j, row) in qkv.chunks_exact(3 * width).enumerate() {
        for (c, &v) in row[col..][..dst.len() / t].iter().enumerate() {
            dst[c * t + j] = v;
        }
    }
}

fn softmax_in_place<T: Real>(row: &mut [T]) {
    let max = row.iter().copied().fold(T::neg_infinity(), T::max);
    let mut sum = T::zero();
    for v in row.iter_mut() {
        *v = (*v - max).exp_vectorised();
        sum += *v;
    }
    let inv = T::one() / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// From dout `[S, T, D]`: dqkv `[S, T, 3D]` (overwritten) and dtable `[(2K-1)²+3, h]` +=
/// the logit gradients scattered by index. Each sequence's table gradient is a partial
/// sum of its own; the partials are added in sequence order.
pub fn attention_backward<T: Real>(
    dqkv: &mut [T],
    dtable: &mut [T],
    dout: &[T],
    qkv: &[T],
    probs: &[T],
    rel: &RelativeIndex,
    heads: usize,
) {
    let (seqs, width) = dims(qkv.len(), probs.len(), rel, heads);
    let t = rel.tokens;
    assert!(dout.len() == seqs * t * width && dqkv.len() == qkv.len());
    assert_eq!(dtable.len(), rel.table_rows * heads);
    let partials: Vec<Vec<T>> = dqkv
        .par_chunks_mut(t * 3 * width)
        .zip(dout.par_chunks(t * width))
        .zip(qkv.par_chunks(t * 3 * width))
        .zip(probs.par_chunks(heads * t * t))
        .map(|(((dqkv, dout), qkv), probs)| {
            let mut dtable = vec![T::zero(); rel.table_rows * heads];
            wide(
                #[inline(always)]
                || sequence_backward(dqkv, &mut dtable, dout, qkv, probs, rel, heads),
            );
            dtable
        })
        .collect();
    for part in partials {
        for (a, b) in dtable.iter_mut().zip(part) {
            *a += b;
        }
    }
}

/// One window sequence of [`attention_backward`], its table gradient into `dtable`;
/// inlined into its caller, so that [`wide`] compiles it. One pass over the query rows
/// per head: row `i` gives dz_i, hence dq_i, and adds its terms to every dk_j and dv_j.
#[inline(always)]
fn sequence_backward<T: Real>(
    dqkv: &mut [T],
    dtable: &mut [T],
    dout: &[T],
    qkv: &[T],
    probs: &[T],
    rel: &RelativeIndex,
    heads: usize,
) {
    let (t, width) = (rel.tokens, dout.len() / rel.tokens);
    let d = width / heads;
    let scale = T::one() / T::of(d as f64).sqrt();
    let row = |i: usize| &qkv[i * 3 * width..][..3 * width];
    let (mut vt, mut dz, mut dq) = (
        vec![T::zero(); d * t],
        vec![T::zero(); t],
        vec![T::zero(); d],
    );
    for (h, p) in probs.chunks_exact(t * t).enumerate() {
        transpose_head(&mut vt, qkv, width, 2 * width + h * d);
        for j in 0..t {
            let drow = &mut dqkv[j * 3 * width..][..3 * width];
            drow[width + h * d..][..d].fill(T::zero());
            drow[2 * width + h * d..][..d].fill(T::zero());
        }
        for (i, (p, idx)) in p.chunks_exact(t).zip(rel.index.chunks_exact(t)).enumerate() {
            let dout = &dout[i * width + h * d..][..d];
            // dp_i = dout_i·vᵀ; dv_j += p_ij dout_i.
            dz.fill(T::zero());
            for (&g, v) in dout.iter().zip(vt.chunks_exact(t)) {
                dz.iter_mut().zip(v).for_each(|(dz, &v)| *dz += g * v);
            }
            for (j, &p) in p.iter().enumerate() {
                let dv = &mut dqkv[j * 3 * width + 2 * width + h * d..][..d];
                dv.iter_mut().zip(dout).for_each(|(dv, &g)| *dv += p * g);
            }
            // Softmax backward: dz = p ⊙ (dp - Σ_j p dp).
            let dot = sum(t, |j| p[j] * dz[j]);
            for ((dz, &p), &i) in dz.iter_mut().zip(p).zip(idx) {
                *dz = p * (*dz - dot);
                dtable[i as usize * heads + h] += *dz;
            }
            // dq_i = scale Σ_j dz_ij k_j; dk_j += scale dz_ij q_i.
            let q = &row(i)[h * d..][..d];
            dq.fill(T::zero());
            for (j, &g) in dz.iter().enumerate() {
                let g = g * scale;
                let k = &row(j)[width + h * d..][..d];
                dq.iter_mut().zip(k).for_each(|(dq, &k)| *dq += g * k);
                let dk = &mut dqkv[j * 3 * width + width + h * d..][..d];
                dk.iter_mut().zip(q).for_each(|(dk, &q)| *dk += g * q);
            }
            dqkv[i * 3 * width + h * d..][..d].copy_from_slice(&dq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_index_follows_the_beit_layout() {
        let k = 3;
        let rel = RelativeIndex::new(k);
        let t = rel.tokens;
        let span = 2 * k - 1;
        let at = |i: usize, j: usize| rel.index[i * t + j] as usize;
        assert_eq!((t, rel.table_rows), (10, 28));
        assert_eq!(at(0, 0), span * span + 2);
        assert_eq!(at(0, 4), span * span);
        assert_eq!(at(4, 0), span * span + 1);
        // A patch with itself is offset (0, 0): the table's centre.
        assert_eq!(at(5, 5), (k - 1) * span + (k - 1));
        // Query at window (0, 0), key at (2, 2): offset (-2, -2), the first row.
        assert_eq!(at(1, 9), 0);
        // Query (2, 2), key (0, 0): offset (+2, +2), the last patch row.
        assert_eq!(at(9, 1), span * span - 1);
        // Query (0, 1), key (1, 0): offset (-1, +1).
        assert_eq!(at(2, 4), (k - 2) * span + k);
        // Every offset occurs, so every table row receives gradient.
        let mut seen = vec![false; rel.table_rows];
        rel.index.iter().for_each(|&i| seen[i as usize] = true);
        assert!(seen.iter().all(|&s| s));
    }
}
