//! The whole LoMaR network on the CPU (docs/DESIGN.md §1.2–1.3): forward, loss and backward,
//! generic over the scalar so the same code trains in f32 and is checked in f64.
//!
//! Rows: `S = B·n_win` window sequences of `T = 1 + K²` tokens of width `D`; the residual
//! stream is `[S·T, D]`. Only the `V` visible patches per window are embedded and only
//! the `M` masked tokens per window reach the head.

use std::ops::Range;

use anyhow::{bail, Result};

use super::ops::attention::{self, RelativeIndex};
use super::ops::layernorm::{self, Stats};
use super::ops::window_gather::{self, Patches};
use super::ops::{gelu, linear, loss, tokens};
use super::real::Real;
use crate::config::ModelConfig;
use crate::data::batch::Batch;
use crate::params::{BlockRanges, ModelRanges, ParamLayout};

/// The mean reconstruction loss of a batch.
pub fn loss<T: Real>(m: &ModelConfig, params: &[T], batch: &Batch) -> Result<T> {
    let net = Net::new(m, params, batch)?;
    let fwd = net.forward(batch);
    Ok(loss::masked_mse_loss(&fwd.pred, &fwd.patches.targets))
}

/// The head's output for every masked patch, `[S·M, 3p²]` in `(y, x, c)` order, in
/// `mask_index` order within each window (the layout of the targets).
pub fn predict<T: Real>(m: &ModelConfig, params: &[T], batch: &Batch) -> Result<Vec<T>> {
    let net = Net::new(m, params, batch)?;
    Ok(net.forward(batch).pred)
}

/// The mean reconstruction loss of a batch; adds `grad_scale · dloss/dparams` to `grads`.
pub fn loss_and_grad<T: Real>(
    m: &ModelConfig,
    params: &[T],
    batch: &Batch,
    grads: &mut [T],
    grad_scale: T,
) -> Result<T> {
    let net = Net::new(m, params, batch)?;
    if grads.len() != params.len() {
        bail!(
            "gradient buffer holds {} values, the parameters {}",
            grads.len(),
            params.len()
        );
    }
    let fwd = net.forward(batch);
    let mut dpred = vec![T::zero(); fwd.pred.len()];
    let loss = loss::masked_mse(&mut dpred, &fwd.pred, &fwd.patches.targets, grad_scale);
    net.backward(batch, &fwd, &dpred, grads);
    Ok(loss)
}

/// A validated model, its parameters and the tables derived from them.
struct Net<'a, T> {
    m: &'a ModelConfig,
    r: ModelRanges,
    p: &'a [T],
    rel: RelativeIndex,
}

/// What one block keeps for its backward.
pub(crate) struct BlockActs<T> {
    /// `[S·T, D]` residual stream entering the block.
    x_in: Vec<T>,
    ln1: Vec<T>,
    ln1_stats: Stats<T>,
    /// `[S·T, 3D]`.
    qkv: Vec<T>,
    /// `[S, h, T, T]` softmax probabilities.
    probs: Vec<T>,
    /// `[S·T, D]` heads concatenated, before proj.
    attn: Vec<T>,
    /// `[S·T, D]` residual stream after the attention branch.
    x_mid: Vec<T>,
    ln2: Vec<T>,
    ln2_stats: Stats<T>,
    /// `[S·T, 4D]` before GELU, and Φ of it (GELU's output is recomputed from the two).
    fc1: Vec<T>,
    cdf: Vec<T>,
}

/// What the whole forward keeps for the backward.
struct Forward<T> {
    patches: Patches<T>,
    /// `[S, K²]` visible row of each window position, `None` where masked.
    slots: Vec<Option<u32>>,
    blocks: Vec<BlockActs<T>>,
    /// `[S·M, D]` masked tokens of the final residual stream, before and after the norm.
    picked: Vec<T>,
    normed: Vec<T>,
    norm_stats: Stats<T>,
    /// `[S·M, 3p²]`.
    pred: Vec<T>,
}

/// Input-gradient buffers the blocks' backward reuses.
struct Scratch<T> {
    /// `[S·T, 4D]`, GELU's output.
    act: Vec<T>,
    /// `[S·T, 4D]`, gradient at fc2's input, then at fc1's output.
    hidden: Vec<T>,
    /// `[S·T, D]`, gradient at a LayerNorm output.
    normed: Vec<T>,
    /// `[S·T, D]`, gradient at the attention output.
    attn: Vec<T>,
    /// `[S·T, 3D]`.
    qkv: Vec<T>,
}

fn zeros<T: Real>(len: usize) -> Vec<T> {
    vec![T::zero(); len]
}

/// Two disjoint tensors of the gradient buffer at once, e.g. a weight and its bias.
fn pair_mut<'g, T>(
    g: &'g mut [T],
    a: &Range<usize>,
    b: &Range<usize>,
) -> (&'g mut [T], &'g mut [T]) {
    assert!(a.end <= b.start, "{a:?} must lie before {b:?}");
    let (lo, hi) = g.split_at_mut(b.start);
    (&mut lo[a.clone()], &mut hi[..b.len()])
}

/// One pre-norm block on the residual stream `x_in` `[S·T, D]` of sequences laid out as
/// `rel` says, with `table` `[rel.table_rows, h]` as its relative bias: the block's own
/// table for window sequences, a resized one for a larger grid. Returns what the backward
/// needs and the block's output.
pub(crate) fn block_forward<T: Real>(
    p: &[T],
    br: &BlockRanges,
    table: &[T],
    rel: &RelativeIndex,
    heads: usize,
    x_in: Vec<T>,
) -> (BlockActs<T>, Vec<T>) {
    let w = |r: &Range<usize>| &p[r.clone()];
    let (d, hidden) = (br.norm1_w.len(), br.fc1_b.len());
    let rows = x_in.len() / d;
    let seqs = rows / rel.tokens;

    // x_mid = x_in + proj(attn(LN1(x_in)))
    let mut ln1 = zeros(rows * d);
    let ln1_stats = layernorm::layernorm_forward(&mut ln1, &x_in, w(&br.norm1_w), w(&br.norm1_b));
    let mut qkv = zeros(rows * 3 * d);
    linear::linear_forward(&mut qkv, &ln1, w(&br.qkv_w), w(&br.qkv_b));
    let mut attn = zeros(rows * d);
    let mut probs = zeros(seqs * heads * rel.tokens * rel.tokens);
    attention::attention_forward(&mut attn, &mut probs, &qkv, table, rel, heads);
    let mut x_mid = x_in.clone();
    linear::linear_forward_add(&mut x_mid, &attn, w(&br.proj_w), w(&br.proj_b));

    // x_out = x_mid + fc2(gelu(fc1(LN2(x_mid))))
    let mut ln2 = zeros(rows * d);
    let ln2_stats = layernorm::layernorm_forward(&mut ln2, &x_mid, w(&br.norm2_w), w(&br.norm2_b));
    let mut fc1 = zeros(rows * hidden);
    linear::linear_forward(&mut fc1, &ln2, w(&br.fc1_w), w(&br.fc1_b));
    let (mut act, mut cdf) = (zeros(rows * hidden), zeros(rows * hidden));
    gelu::gelu_forward(&mut act, &mut cdf, &fc1);
    let mut x_out = x_mid.clone();
    linear::linear_forward_add(&mut x_out, &act, w(&br.fc2_w), w(&br.fc2_b));

    let acts = BlockActs {
        x_in,
        ln1,
        ln1_stats,
        qkv,
        probs,
        attn,
        x_mid,
        ln2,
        ln2_stats,
        fc1,
        cdf,
    };
    (acts, x_out)
}

impl<'a, T: Real> Net<'a, T> {
    fn new(m: &'a ModelConfig, p: &'a [T], batch: &Batch) -> Result<Self> {
        m.validate()?;
        batch.validate(m)?;
        let layout = ParamLayout::new(m);
        if p.len() != layout.total() {
            bail!(
                "parameter buffer holds {} values, the model needs {}",
                p.len(),
                layout.total()
            );
        }
        Ok(Net {
            m,
            r: layout.ranges().clone(),
            p,
            rel: RelativeIndex::new(m.window),
        })
    }

    fn w(&self, r: &Range<usize>) -> &'a [T] {
        &self.p[r.clone()]
    }

    fn forward(&self, batch: &Batch) -> Forward<T> {
        let (m, r) = (self.m, &self.r);
        let (seqs, d) = (batch.sequences(m), m.width);
        let patches = window_gather::window_gather::<T>(m, batch);

        // Only visible patches are embedded; masked positions get the mask token.
        let mut embedded = zeros(seqs * m.visible_per_window() * d);
        linear::linear_forward(
            &mut embedded,
            &patches.visible,
            self.w(&r.patch_w),
            self.w(&r.patch_b),
        );
        let slots = batch.visible_slots(m);
        let mut x = zeros(seqs * m.seq_len() * d);
        tokens::assemble_tokens_forward(
            &mut x,
            self.w(&r.cls_token),
            self.w(&r.mask_token),
            &embedded,
            &slots,
            m.window_area(),
        );

        let mut blocks = Vec::with_capacity(m.depth);
        for br in &r.blocks {
            let table = self.w(&br.rel_bias);
            let (acts, x_out) = block_forward(self.p, br, table, &self.rel, m.heads, x);
            blocks.push(acts);
            x = x_out;
        }

        // LayerNorm works per token, so norming only the masked tokens the head reads
        // equals picking them from the normed sequence.
        let masked_rows = batch.mask_index.len();
        let mut picked = zeros(masked_rows * d);
        tokens::gather_masked_tokens(&mut picked, &x, &batch.mask_index, m.seq_len());
        let mut normed = zeros(masked_rows * d);
        let norm_stats = layernorm::layernorm_forward(
            &mut normed,
            &picked,
            self.w(&r.norm_w),
            self.w(&r.norm_b),
        );
        let mut pred = zeros(masked_rows * m.patch_dim());
        linear::linear_forward(&mut pred, &normed, self.w(&r.head_w), self.w(&r.head_b));
        Forward {
            patches,
            slots,
            blocks,
            picked,
            normed,
            norm_stats,
            pred,
        }
    }

    /// The forward in reverse, from dpred `[S·M, 3p²]`; adds every parameter's gradient.
    fn backward(&self, batch: &Batch, f: &Forward<T>, dpred: &[T], g: &mut [T]) {
        let (m, r) = (self.m, &self.r);
        let d = m.width;
        let rows = batch.sequences(m) * m.seq_len();

        let mut dnormed = zeros(f.normed.len());
        let (dw, db) = pair_mut(g, &r.head_w, &r.head_b);
        linear::linear_backward(
            Some(&mut dnormed),
            dw,
            db,
            dpred,
            &f.normed,
            self.w(&r.head_w),
        );
        let mut dpicked = zeros(f.picked.len());
        let (dw, db) = pair_mut(g, &r.norm_w, &r.norm_b);
        layernorm::layernorm_backward(
            &mut dpicked,
            dw,
            db,
            &dnormed,
            &f.picked,
            &f.norm_stats,
            self.w(&r.norm_w),
        );
        let mut dx = zeros(rows * d);
        tokens::scatter_masked_tokens(&mut dx, &dpicked, &batch.mask_index, m.seq_len());

        let mut scratch = Scratch {
            act: zeros(rows * m.hidden()),
            hidden: zeros(rows * m.hidden()),
            normed: zeros(rows * d),
            attn: zeros(rows * d),
            qkv: zeros(rows * 3 * d),
        };
        for (br, acts) in r.blocks.iter().zip(&f.blocks).rev() {
            self.block_backward(br, acts, &mut dx, g, &mut scratch);
        }

        let mut dembedded = zeros(f.patches.visible.len() / m.patch_dim() * d);
        let (dcls, dmask) = pair_mut(g, &r.cls_token, &r.mask_token);
        tokens::assemble_tokens_backward(
            dcls,
            dmask,
            &mut dembedded,
            &dx,
            &f.slots,
            m.window_area(),
        );
        let (dw, db) = pair_mut(g, &r.patch_w, &r.patch_b);
        linear::linear_backward(
            None,
            dw,
            db,
            &dembedded,
            &f.patches.visible,
            self.w(&r.patch_w),
        );
    }

    /// One block in reverse: `dx` holds dL/dx_out on entry and dL/dx_in on return.
    fn block_backward(
        &self,
        br: &BlockRanges,
        a: &BlockActs<T>,
        dx: &mut [T],
        g: &mut [T],
        s: &mut Scratch<T>,
    ) {
        // x_out = x_mid + fc2(gelu(fc1(LN2(x_mid)))): dx becomes dL/dx_mid.
        gelu::gelu_recompute(&mut s.act, &a.fc1, &a.cdf);
        let (dw, db) = pair_mut(g, &br.fc2_w, &br.fc2_b);
        linear::linear_backward(Some(&mut s.hidden), dw, db, dx, &s.act, self.w(&br.fc2_w));
        gelu::gelu_backward(&mut s.hidden, &a.fc1, &a.cdf);
        let (dw, db) = pair_mut(g, &br.fc1_w, &br.fc1_b);
        linear::linear_backward(
            Some(&mut s.normed),
            dw,
            db,
            &s.hidden,
            &a.ln2,
            self.w(&br.fc1_w),
        );
        let (dw, db) = pair_mut(g, &br.norm2_w, &br.norm2_b);
        layernorm::layernorm_backward(
            dx,
            dw,
            db,
            &s.normed,
            &a.x_mid,
            &a.ln2_stats,
            self.w(&br.norm2_w),
        );

        // x_mid = x_in + proj(attn(LN1(x_in))): dx becomes dL/dx_in.
        let (dw, db) = pair_mut(g, &br.proj_w, &br.proj_b);
        linear::linear_backward(Some(&mut s.attn), dw, db, dx, &a.attn, self.w(&br.proj_w));
        attention::attention_backward(
            &mut s.qkv,
            &mut g[br.rel_bias.clone()],
            &s.attn,
            &a.qkv,
            &a.probs,
            &self.rel,
            self.m.heads,
        );
        let (dw, db) = pair_mut(g, &br.qkv_w, &br.qkv_b);
        linear::linear_backward(
            Some(&mut s.normed),
            dw,
            db,
            &s.qkv,
            &a.ln1,
            self.w(&br.qkv_w),
        );
        let (dw, db) = pair_mut(g, &br.norm1_w, &br.norm1_b);
        layernorm::layernorm_backward(
            dx,
            dw,
            db,
            &s.normed,
            &a.x_in,
            &a.ln1_stats,
            self.w(&br.norm1_w),
        );
    }
}
