//! Multi-head self-attention inside each window sequence, with BEiT's relative position
//! bias (docs/DESIGN.md §1.2).
//! Shapes: qkv `[S, T, 3D]` (q | k | v, head `i` owns columns `i*d..(i+1)*d` of each),
//! table `[(2K-1)²+3, h]` → out `[S, T, D]`, saving probs `[S, h, T, T]`.

use rayon::prelude::*;

use super::super::gemm::{Mat, Start};
use super::super::real::Real;
use super::super::simd::wide;
use super::head::{head_backward, head_probs, head_views, logit_scale, softmax_in_place};

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

/// The bias of every head and token pair, `[h, T, T]`: the table gathered through the
/// index once per call, so each sequence adds it with a vector pass instead of a gather
/// per logit.
fn expand_bias<T: Real>(table: &[T], rel: &RelativeIndex, heads: usize) -> Vec<T> {
    (0..heads)
        .flat_map(|h| {
            rel.index
                .iter()
                .map(move |&r| table[r as usize * heads + h])
        })
        .collect()
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
/// probabilities and the head's q, k, v staying in L1; the two products per head go to
/// the f32 product kernel (`Real::product`), whose register tile beats rows of
/// multiply-adds only `T` long.
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
    let bias = expand_bias(table, rel, heads);
    out.par_chunks_mut(t * width)
        .zip(probs.par_chunks_mut(heads * t * t))
        .zip(qkv.par_chunks(t * 3 * width))
        .for_each(|((out, probs), qkv)| {
            wide(
                #[inline(always)]
                || sequence_forward(out, probs, qkv, &bias, t, heads),
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
    bias: &[T],
    t: usize,
    heads: usize,
) {
    let width = out.len() / t;
    let d = width / heads;
    let scale = logit_scale::<T>(d);
    for ((h, p), bias) in probs
        .chunks_exact_mut(t * t)
        .enumerate()
        .zip(bias.chunks_exact(t * t))
    {
        let [q, k, v] = head_views(qkv, width, h * d, d);
        head_probs(p, t, q, k, |i, z| {
            for (z, &b) in z.iter_mut().zip(&bias[i * t..][..t]) {
                *z = *z * scale + b;
            }
            softmax_in_place(z);
        });
        T::product(&mut out[h * d..], width, Mat::new(p, t, t), v, Start::Zero);
    }
}

/// From dout `[S, T, D]`: dqkv `[S, T, 3D]` (overwritten) and dtable `[(2K-1)²+3, h]` +=
/// the logit gradients scattered by index. Each sequence keeps its logit gradients
/// `[h, T, T]`; they are added in sequence order, and the sum is scattered into the
/// table once, in (head, query, key) order.
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
            let mut dbias = vec![T::zero(); heads * t * t];
            wide(
                #[inline(always)]
                || sequence_backward(dqkv, &mut dbias, dout, qkv, probs, t, heads),
            );
            dbias
        })
        .collect();
    let mut dbias = vec![T::zero(); heads * t * t];
    for part in partials {
        wide(
            #[inline(always)]
            || {
                for (a, b) in dbias.iter_mut().zip(&part) {
                    *a += *b;
                }
            },
        );
    }
    for (h, dbias) in dbias.chunks_exact(t * t).enumerate() {
        for (&g, &r) in dbias.iter().zip(&rel.index) {
            dtable[r as usize * heads + h] += g;
        }
    }
}

/// One window sequence of [`attention_backward`], its logit gradients `[h, T, T]` into
/// `dbias`; inlined into its caller, so that [`wide`] compiles it.
#[inline(always)]
fn sequence_backward<T: Real>(
    dqkv: &mut [T],
    dbias: &mut [T],
    dout: &[T],
    qkv: &[T],
    probs: &[T],
    t: usize,
    heads: usize,
) {
    let width = dout.len() / t;
    let d = width / heads;
    let scale = logit_scale::<T>(d);
    let mut dz = vec![T::zero(); t * t];
    for ((h, p), dbias) in probs
        .chunks_exact(t * t)
        .enumerate()
        .zip(dbias.chunks_exact_mut(t * t))
    {
        let views = head_views(qkv, width, h * d, d);
        let dout = Mat::strided(&dout[h * d..], t, d, width);
        head_backward(dqkv, width, h * d, &mut dz, dout, views, p, scale, |dz| {
            dbias.copy_from_slice(dz)
        });
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
