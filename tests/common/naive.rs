//! The pieces of the loop-by-loop model definitions (tests/gradcheck.rs for LoMaR,
//! tests/mae.rs for MAE): one token at a time in f64, sharing no code with the backends.

use super::fd::dot;

/// `w·x + b` for a row-major `[out, in]` weight.
pub fn dense(w: &[f64], b: &[f64], x: &[f64]) -> Vec<f64> {
    b.iter()
        .enumerate()
        .map(|(o, bias)| bias + dot(&w[o * x.len()..][..x.len()], x))
        .collect()
}

/// LayerNorm of one token (biased variance, ε = 1e-6).
pub fn norm(x: &[f64], g: &[f64], b: &[f64]) -> Vec<f64> {
    let mean = x.iter().sum::<f64>() / x.len() as f64;
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / x.len() as f64;
    x.iter()
        .zip(g.iter().zip(b))
        .map(|(v, (g, b))| (v - mean) / (var + 1e-6).sqrt() * g + b)
        .collect()
}

/// A pre-norm block after its attention, for one token: `row += proj(attn)`, then
/// `row += fc2(gelu(fc1(norm2(row))))`; `w` gives the block's tensors by name.
pub fn block_rest<W: AsRef<[f64]>>(row: &mut [f64], attn: &[f64], w: impl Fn(&str) -> W) {
    let proj = dense(
        w("attn.proj.weight").as_ref(),
        w("attn.proj.bias").as_ref(),
        attn,
    );
    row.iter_mut().zip(proj).for_each(|(r, p)| *r += p);
    let normed = norm(row, w("norm2.weight").as_ref(), w("norm2.bias").as_ref());
    let hidden: Vec<f64> = dense(
        w("mlp.fc1.weight").as_ref(),
        w("mlp.fc1.bias").as_ref(),
        &normed,
    )
    .iter()
    .map(|v| 0.5 * v * (1.0 + libm::erf(v / 2f64.sqrt())))
    .collect();
    let out = dense(
        w("mlp.fc2.weight").as_ref(),
        w("mlp.fc2.bias").as_ref(),
        &hidden,
    );
    row.iter_mut().zip(out).for_each(|(r, o)| *r += o);
}

/// The target of a `p×p` patch whose pixels are `pixel(c, y, x)`: `(y, x, c)` order,
/// normalised per patch (unbiased variance + 1e-6) when `norm_pix`.
pub fn patch_target(
    p: usize,
    norm_pix: bool,
    pixel: impl Fn(usize, usize, usize) -> f64,
) -> Vec<f64> {
    let mut target = Vec::new();
    for y in 0..p {
        for x in 0..p {
            for c in 0..3 {
                target.push(pixel(c, y, x));
            }
        }
    }
    if norm_pix {
        let len = target.len() as f64;
        let mean = target.iter().sum::<f64>() / len;
        let var = target.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (len - 1.0);
        target
            .iter_mut()
            .for_each(|v| *v = (*v - mean) / (var + 1e-6).sqrt());
    }
    target
}

/// `Σ (a - b)²`.
pub fn squared_error(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(a, b)| (a - b).powi(2)).sum()
}
