//! The attention CPU op as the oracle of the kernel tests (tests/cuda_attention.rs on a
//! GPU, tests/kernel_emulation.rs on the CPU): random inputs, the op's outputs in f64 from
//! exactly the values the kernels see, and the comparison.

use lomar::cpu::ops::attention::{self as cpu, RelativeIndex};
use lomar::cuda::attention::AttnShape;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Inputs of one forward + backward, in f64 (the caller rounds them to its element type
/// first and passes the rounded values).
pub struct Inputs {
    pub qkv: Vec<f64>,
    pub table: Vec<f32>,
    pub dout: Vec<f64>,
    /// What dtable holds before the backward adds to it.
    pub dtable_start: Vec<f32>,
}

impl Inputs {
    /// Uniform values: qkv in ±1.5, dout ±1, table ±0.5, dtable ±0.1; `round` maps qkv and
    /// dout to the kernels' element type and back.
    pub fn random(shape: AttnShape, seed: u64, round: impl Fn(f64) -> f64) -> Inputs {
        let (s, t, width) = (shape.seqs, shape.tokens(), shape.width());
        let table_len = shape.table_rows() * shape.heads;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut uniform =
            |n: usize, r: f64| -> Vec<f64> { (0..n).map(|_| rng.gen_range(-r..r)).collect() };
        let qkv = uniform(s * t * 3 * width, 1.5)
            .into_iter()
            .map(&round)
            .collect();
        let dout = uniform(s * t * width, 1.0)
            .into_iter()
            .map(&round)
            .collect();
        let table = uniform(table_len, 0.5)
            .into_iter()
            .map(|v| v as f32)
            .collect();
        let dtable_start = uniform(table_len, 0.1)
            .into_iter()
            .map(|v| v as f32)
            .collect();
        Inputs {
            qkv,
            table,
            dout,
            dtable_start,
        }
    }
}

/// Each output's relative error, by name.
pub type Errors = [(&'static str, f64); 4];

/// The op's outputs: out, lse, dqkv, and what the backward adds to dtable.
pub struct Outputs {
    pub out: Vec<f64>,
    pub lse: Vec<f64>,
    pub dqkv: Vec<f64>,
    pub dtable_added: Vec<f64>,
}

impl Outputs {
    /// The CPU op's results for `inputs`.
    pub fn reference(shape: AttnShape, inputs: &Inputs) -> Outputs {
        let (s, t, h, width) = (shape.seqs, shape.tokens(), shape.heads, shape.width());
        let rel = RelativeIndex::new(shape.window);
        let table: Vec<f64> = inputs.table.iter().map(|&v| v as f64).collect();
        let mut out = vec![0.0; s * t * width];
        let mut probs = vec![0.0; s * h * t * t];
        cpu::attention_forward(&mut out, &mut probs, &inputs.qkv, &table, &rel, h);
        let lse = lse_from_probs(&inputs.qkv, &table, &probs, &rel, shape);
        let mut dqkv = vec![0.0; inputs.qkv.len()];
        let mut dtable_added = vec![0.0; table.len()];
        cpu::attention_backward(
            &mut dqkv,
            &mut dtable_added,
            &inputs.dout,
            &inputs.qkv,
            &probs,
            &rel,
            h,
        );
        Outputs {
            out,
            lse,
            dqkv,
            dtable_added,
        }
    }

    /// Each tensor's [`rel_error`] against `want`.
    pub fn errors(&self, want: &Outputs) -> Errors {
        [
            ("out", rel_error(&self.out, &want.out)),
            ("lse", rel_error(&self.lse, &want.lse)),
            ("dqkv", rel_error(&self.dqkv, &want.dqkv)),
            ("dtable", rel_error(&self.dtable_added, &want.dtable_added)),
        ]
    }
}

/// Max-abs difference over max-abs value; infinite when `got` has a non-finite value
/// (outputs start as NaN, so anything left unwritten fails).
pub fn rel_error(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    if got.iter().any(|g| !g.is_finite()) {
        return f64::INFINITY;
    }
    let diff = got.iter().zip(want).map(|(g, w)| (g - w).abs());
    let scale = want.iter().map(|w| w.abs()).fold(0.0, f64::max);
    diff.fold(0.0, f64::max) / scale
}

/// The row log-sum-exp the forward saves. The CPU op keeps probabilities instead; since
/// p_ij = exp(logit_ij − lse_i) for every key j, lse_i = logit_ij − ln p_ij, taken at the
/// largest p_ij of the row where the logarithm is best conditioned.
fn lse_from_probs(
    qkv: &[f64],
    table: &[f64],
    probs: &[f64],
    rel: &RelativeIndex,
    shape: AttnShape,
) -> Vec<f64> {
    let (t, h, d, width) = (shape.tokens(), shape.heads, shape.head_dim, shape.width());
    let scale = 1.0 / (d as f64).sqrt();
    let mut lse = vec![0.0; shape.seqs * h * t];
    for s in 0..shape.seqs {
        for head in 0..h {
            for i in 0..t {
                let row = &probs[((s * h + head) * t + i) * t..][..t];
                let j = (0..t)
                    .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                    .expect("T > 0");
                let q = &qkv[(s * t + i) * 3 * width + head * d..][..d];
                let k = &qkv[(s * t + j) * 3 * width + width + head * d..][..d];
                let dot: f64 = q.iter().zip(k).map(|(a, b)| a * b).sum();
                let logit = dot * scale + table[rel.index[i * t + j] as usize * h + head];
                lse[(s * h + head) * t + i] = logit - row[j].ln();
            }
        }
    }
    lse
}
