//! Multi-head self-attention over a whole sequence without a bias, MAE's encoder and
//! decoder attention (docs/DESIGN.md §6, op 14).
//! Shapes: qkv `[S, T, 3D]` (q | k | v, head `i` owns columns `i*d..(i+1)*d` of each)
//! → out `[S, T, D]`, saving the log-sum-exp of each logit row `[S, h, T]`.
//!
//! Only `O(S·h·T)` is kept between the passes, as on the GPU: the backward recomputes a
//! head's probabilities `exp(z - lse)` from q, k and the saved log-sum-exp. One task per
//! sequence does every head, its `[T, T]` scratch reused from head to head.

use rayon::prelude::*;

use super::super::gemm::{Mat, Start};
use super::super::real::Real;
use super::super::simd::wide;
use super::head::{head_backward, head_probs, head_views, logit_scale, softmax_in_place};

/// `(sequences, width)` from the slices, checking that they agree with `tokens` and
/// `heads`.
fn dims(qkv_len: usize, lse_len: usize, tokens: usize, heads: usize) -> (usize, usize) {
    assert!(tokens > 0 && heads > 0, "{tokens} tokens, {heads} heads");
    let seqs = lse_len / (heads * tokens);
    assert!(
        seqs > 0
            && lse_len == seqs * heads * tokens
            && qkv_len > 0
            && qkv_len.is_multiple_of(seqs * tokens * 3 * heads),
        "qkv of {qkv_len} and lse of {lse_len} values are not [S, {tokens}, 3·{heads}·d] \
         and [S, {heads}, {tokens}]"
    );
    (seqs, qkv_len / (seqs * tokens * 3))
}

/// out `[S, T, D]` = per head softmax(q·kᵀ/√d)·v; lse `[S, h, T]` keeps each logit row's
/// log-sum-exp for the backward. Overwrites both.
pub fn global_attention_forward<T: Real>(
    out: &mut [T],
    lse: &mut [T],
    qkv: &[T],
    tokens: usize,
    heads: usize,
) {
    let (seqs, width) = dims(qkv.len(), lse.len(), tokens, heads);
    assert_eq!(out.len(), seqs * tokens * width, "out is not [S, T, D]");
    out.par_chunks_mut(tokens * width)
        .zip(lse.par_chunks_mut(heads * tokens))
        .zip(qkv.par_chunks(tokens * 3 * width))
        .for_each(|((out, lse), qkv)| {
            wide(
                #[inline(always)]
                || sequence_forward(out, lse, qkv, heads),
            )
        });
}

/// One sequence of [`global_attention_forward`]; inlined into its caller, so that
/// [`wide`] compiles it.
#[inline(always)]
fn sequence_forward<T: Real>(out: &mut [T], lse: &mut [T], qkv: &[T], heads: usize) {
    let (t, width) = (lse.len() / heads, out.len() * heads / lse.len());
    let d = width / heads;
    let scale = logit_scale::<T>(d);
    let mut p = vec![T::zero(); t * t];
    for (h, lse) in lse.chunks_exact_mut(t).enumerate() {
        let [q, k, v] = head_views(qkv, width, h * d, d);
        head_probs(&mut p, t, q, k, |i, z| {
            z.iter_mut().for_each(|z| *z *= scale);
            lse[i] = softmax_in_place(z);
        });
        T::product(&mut out[h * d..], width, Mat::new(&p, t, t), v, Start::Zero);
    }
}

/// From dout `[S, T, D]`, the forward's qkv and lse: dqkv `[S, T, 3D]` (overwritten).
pub fn global_attention_backward<T: Real>(
    dqkv: &mut [T],
    dout: &[T],
    qkv: &[T],
    lse: &[T],
    tokens: usize,
    heads: usize,
) {
    let (seqs, width) = dims(qkv.len(), lse.len(), tokens, heads);
    assert_eq!(dout.len(), seqs * tokens * width, "dout is not [S, T, D]");
    assert_eq!(dqkv.len(), qkv.len(), "dqkv is not the shape of qkv");
    dqkv.par_chunks_mut(tokens * 3 * width)
        .zip(dout.par_chunks(tokens * width))
        .zip(qkv.par_chunks(tokens * 3 * width))
        .zip(lse.par_chunks(heads * tokens))
        .for_each(|(((dqkv, dout), qkv), lse)| {
            wide(
                #[inline(always)]
                || sequence_backward(dqkv, dout, qkv, lse, heads),
            )
        });
}

/// One sequence of [`global_attention_backward`]; inlined into its caller, so that
/// [`wide`] compiles it.
#[inline(always)]
fn sequence_backward<T: Real>(dqkv: &mut [T], dout: &[T], qkv: &[T], lse: &[T], heads: usize) {
    let (t, width) = (lse.len() / heads, dout.len() * heads / lse.len());
    let d = width / heads;
    let scale = logit_scale::<T>(d);
    let (mut p, mut dz) = (vec![T::zero(); t * t], vec![T::zero(); t * t]);
    for (h, lse) in lse.chunks_exact(t).enumerate() {
        let views @ [q, k, _] = head_views(qkv, width, h * d, d);
        head_probs(&mut p, t, q, k, |i, z| {
            z.iter_mut()
                .for_each(|z| *z = (*z * scale - lse[i]).exp_vectorised());
        });
        let dout = Mat::strided(&dout[h * d..], t, d, width);
        head_backward(dqkv, width, h * d, &mut dz, dout, views, &p, scale, |_| {});
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::standard_normal;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// Tokens per sequence covered: one token, ragged and whole tiles of 16 and 64, MAE's
    /// encoder at 224.
    const TOKENS: [usize; 5] = [1, 17, 50, 64, 65];

    fn randn(seed: u64, len: usize) -> Vec<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..len).map(|_| standard_normal(&mut rng)).collect()
    }

    /// out and lse by the definition, one (sequence, head, query) at a time.
    fn naive_forward(qkv: &[f64], t: usize, heads: usize, d: usize) -> (Vec<f64>, Vec<f64>) {
        let width = heads * d;
        let seqs = qkv.len() / (t * 3 * width);
        let at = |s: usize, j: usize, part: usize, h: usize, c: usize| {
            qkv[(s * t + j) * 3 * width + part * width + h * d + c]
        };
        let (mut out, mut lse) = (vec![0.0; seqs * t * width], vec![0.0; seqs * heads * t]);
        for s in 0..seqs {
            for h in 0..heads {
                for i in 0..t {
                    let e: Vec<f64> = (0..t)
                        .map(|j| {
                            let qk: f64 =
                                (0..d).map(|c| at(s, i, 0, h, c) * at(s, j, 1, h, c)).sum();
                            (qk / (d as f64).sqrt()).exp()
                        })
                        .collect();
                    let norm: f64 = e.iter().sum();
                    lse[(s * heads + h) * t + i] = norm.ln();
                    for c in 0..d {
                        out[(s * t + i) * width + h * d + c] =
                            (0..t).map(|j| e[j] / norm * at(s, j, 2, h, c)).sum();
                    }
                }
            }
        }
        (out, lse)
    }

    /// A case: `seqs` sequences of `t` tokens, `heads` heads of `d` columns.
    #[derive(Clone, Copy)]
    struct Case {
        seqs: usize,
        t: usize,
        heads: usize,
        d: usize,
    }

    impl Case {
        fn qkv_len(self) -> usize {
            self.seqs * self.t * 3 * self.heads * self.d
        }

        fn forward<T: Real>(self, qkv: &[T]) -> (Vec<T>, Vec<T>) {
            let mut out = vec![T::nan(); self.qkv_len() / 3];
            let mut lse = vec![T::nan(); self.seqs * self.heads * self.t];
            global_attention_forward(&mut out, &mut lse, qkv, self.t, self.heads);
            (out, lse)
        }

        fn backward<T: Real>(self, dout: &[T], qkv: &[T], lse: &[T]) -> Vec<T> {
            let mut dqkv = vec![T::nan(); qkv.len()];
            global_attention_backward(&mut dqkv, dout, qkv, lse, self.t, self.heads);
            dqkv
        }
    }

    fn to_f32(v: &[f64]) -> Vec<f32> {
        v.iter().map(|&x| x as f32).collect()
    }

    /// Largest `|a - b|` over the largest `|b|`.
    fn relative_error<T: Real>(a: &[T], b: &[f64]) -> f64 {
        let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let err = a
            .iter()
            .zip(b)
            .fold(0.0f64, |m, (a, b)| m.max((a.to_f64().unwrap() - b).abs()));
        err / scale
    }

    #[test]
    fn forward_matches_the_definition() {
        for (n, &t) in TOKENS.iter().enumerate() {
            let case = Case {
                seqs: 2,
                t,
                heads: 2,
                d: 8,
            };
            // Logits of a few units, so that the softmax is far from uniform.
            let qkv: Vec<f64> = randn(n as u64, case.qkv_len())
                .iter()
                .map(|x| 1.5 * x)
                .collect();
            let (want_out, want_lse) = naive_forward(&qkv, t, case.heads, case.d);
            let (out, lse) = case.forward(&qkv);
            assert!(relative_error(&out, &want_out) < 1e-13, "T = {t}");
            assert!(relative_error(&lse, &want_lse) < 1e-13, "T = {t}");
            let (out, lse) = case.forward(&to_f32(&qkv));
            assert!(relative_error(&out, &want_out) < 1e-5, "T = {t} in f32");
            assert!(relative_error(&lse, &want_lse) < 1e-5, "T = {t} in f32");
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        const H: f64 = 1e-5;
        for (n, &t) in [1, 5, 17].iter().enumerate() {
            let case = Case {
                seqs: 2,
                t,
                heads: 2,
                d: 4,
            };
            let mut qkv = randn(10 + n as u64, case.qkv_len());
            let weights = randn(20 + n as u64, case.qkv_len() / 3);
            let loss = |qkv: &[f64]| -> f64 {
                let out = case.forward(qkv).0;
                out.iter().zip(&weights).map(|(o, w)| o * w).sum()
            };
            let lse = case.forward(&qkv).1;
            let dqkv = case.backward(&weights, &qkv, &lse);
            for (i, &analytic) in dqkv.iter().enumerate() {
                let x = qkv[i];
                qkv[i] = x + H;
                let up = loss(&qkv);
                qkv[i] = x - H;
                let down = loss(&qkv);
                qkv[i] = x;
                let numeric = (up - down) / (2.0 * H);
                assert!(
                    (analytic - numeric).abs() <= 1e-6 * analytic.abs().max(numeric.abs()) + 1e-8,
                    "T = {t}, dqkv[{i}] = {analytic} against {numeric}"
                );
            }
            // q and k receive gradient only when a row has more than one key.
            let width = case.heads * case.d;
            let dq_norm: f64 = dqkv.chunks(3 * width).map(|r| r[0].abs()).sum();
            assert_eq!(dq_norm > 1e-3, t > 1, "T = {t}: |dq| = {dq_norm}");
        }
    }

    #[test]
    fn f32_backward_matches_f64() {
        for (n, &t) in TOKENS.iter().enumerate() {
            let case = Case {
                seqs: 3,
                t,
                heads: 4,
                d: 8,
            };
            let qkv = randn(30 + n as u64, case.qkv_len());
            let dout = randn(40 + n as u64, case.qkv_len() / 3);
            let want = case.backward(&dout, &qkv, &case.forward(&qkv).1);
            let qkv = to_f32(&qkv);
            let got = case.backward(&to_f32(&dout), &qkv, &case.forward(&qkv).1);
            assert!(relative_error(&got, &want) < 1e-5, "T = {t}");
        }
    }

    #[test]
    #[should_panic(expected = "are not [S, 5, 3·2·d]")]
    fn mismatched_lengths_are_refused() {
        let (mut out, mut lse) = (vec![0.0f32; 2 * 5 * 8], vec![0.0f32; 2 * 2 * 5]);
        global_attention_forward(&mut out, &mut lse, &[0.0; 2 * 5 * 3 * 8 + 1], 5, 2);
    }
}
