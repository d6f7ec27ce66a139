//! The CPU reference's ops, each a forward and backward pair over flat row-major slices.
//!
//! Conventions: a backward *adds* into parameter gradients (they accumulate over ops,
//! micro-batches and the shared cls/mask tokens) and says for each input gradient whether
//! it overwrites or adds. Work is spread over cores in fixed-size pieces whose partial
//! sums are combined in order, so a result never depends on the thread count.

pub mod attention;
pub mod gelu;
pub mod global_attention;
mod head;
pub mod layernorm;
pub mod linear;
pub mod loss;
pub mod tokens;
pub mod window_gather;

use rayon::prelude::*;

use super::real::Real;
use super::simd::wide;

/// Rows handed to one rayon task by the row-wise ops.
const ROWS_PER_TASK: usize = 64;

/// `dst[c] += Σ_r src[r, c]` over a row-major `[rows, cols]` matrix.
fn add_column_sums<T: Real>(dst: &mut [T], src: &[T]) {
    let cols = dst.len();
    let partials: Vec<Vec<T>> = src
        .par_chunks(cols * ROWS_PER_TASK)
        .map(|rows| {
            let mut acc = vec![T::zero(); cols];
            wide(
                #[inline(always)]
                || {
                    for row in rows.chunks_exact(cols) {
                        for (a, &v) in acc.iter_mut().zip(row) {
                            *a += v;
                        }
                    }
                },
            );
            acc
        })
        .collect();
    for part in partials {
        for (d, v) in dst.iter_mut().zip(part) {
            *d += v;
        }
    }
}
