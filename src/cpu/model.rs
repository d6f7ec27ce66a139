//! The whole LoMaR network on the CPU (docs/DESIGN.md §1.2–1.3): forward, loss and backward,
//! generic over the scalar so the same code trains in f32 and is checked in f64.
//!
//! Rows: `S = B·n_win` window sequences of `T = 1 + K²` tokens of width `D`; the residual
//! stream is `[S·T, D]`. Only the `V` visible patches per window are embedded and only
//! the `M` masked tokens per window reach the head.

use std::ops::Range;

use anyhow::Result;

use super::ops::attention::{self, RelativeIndex};
use super::ops::global_attention;
use super::ops::layernorm::{self, Stats};
use super::ops::window_gather::{self, Patches};
use super::ops::{gelu, linear, tokens};
use super::real::Real;
use super::step::{self, Ready, Step};
use crate::config::ModelConfig;
use crate::data::batch::Batch;
use crate::params::{BlockRanges, ModelRanges, ParamLayout};

/// The mean reconstruction loss of a batch.
pub fn loss<T: Real>(m: &ModelConfig, params: &[T], batch: &Batch) -> Result<T> {
    step::loss::<T, Workspace<T>>(m, params, batch)
}

/// The head's output for every masked patch, `[S·M, 3p²]` in `(y, x, c)` order, in
/// `mask_index` order within each window (the layout of the targets).
pub fn predict<T: Real>(m: &ModelConfig, params: &[T], batch: &Batch) -> Result<Vec<T>> {
    step::predict::<T, Workspace<T>>(m, params, batch)
}

/// The mean reconstruction loss of a batch; adds `grad_scale · dloss/dparams` to `grads`.
pub fn loss_and_grad<T: Real>(
    m: &ModelConfig,
    params: &[T],
    batch: &Batch,
    grads: &mut [T],
    grad_scale: T,
) -> Result<T> {
    step::loss_and_grad::<T, Workspace<T>>(m, params, batch, grads, grad_scale)
}

/// A validated model, the tables derived from it (parameter ranges, relative index), and
/// every buffer of a pass, kept from one call to the next: a backend that holds one
/// builds the tables once and, from its second micro-batch of a size on, allocates
/// nothing that scales with the batch, so no pass pays for fresh pages.
pub struct Workspace<T> {
    m: ModelConfig,
    r: ModelRanges,
    params_len: usize,
    rel: RelativeIndex,
    patches: Patches<T>,
    /// `[S·V, D]` embedded visible patches.
    embedded: Vec<T>,
    /// `[S, K²]` visible row of each window position, `None` where masked.
    slots: Vec<Option<u32>>,
    /// Block `i` keeps its input, so block `i + 1`'s input is block `i`'s output.
    blocks: Vec<BlockActs<T>>,
    /// `[S·T, D]` the last block's output.
    x_last: Vec<T>,
    /// `[S·M, D]` masked tokens of the final residual stream, before and after the norm.
    picked: Vec<T>,
    normed: Vec<T>,
    norm_stats: Stats<T>,
    /// `[S·M, 3p²]` the head's output and the loss gradient at it.
    pred: Vec<T>,
    dpred: Vec<T>,
    scratch: Scratch<T>,
}

/// What one block keeps for its backward.
#[derive(Default)]
pub(crate) struct BlockActs<T> {
    /// `[S·T, D]` residual stream entering the block.
    x_in: Vec<T>,
    ln1: Vec<T>,
    ln1_stats: Stats<T>,
    /// `[S·T, 3D]`.
    qkv: Vec<T>,
    /// What the attention keeps of its softmax: the windowed op's probabilities
    /// `[S, h, T, T]`, or the global op's row log-sum-exps `[S, h, T]`.
    softmax: Vec<T>,
    /// `[S·T, D]` heads concatenated, before proj.
    attn: Vec<T>,
    /// `[S·T, D]` residual stream after the attention branch.
    x_mid: Vec<T>,
    ln2: Vec<T>,
    ln2_stats: Stats<T>,
    /// `[S·T, 4D]` before GELU, Φ of it, and GELU's output. Keeping the output (20 MB a
    /// block at vit_tiny batch 32) saves the backward a pass that rebuilt it from the
    /// other two (about 4% of the CPU step).
    fc1: Vec<T>,
    cdf: Vec<T>,
    act: Vec<T>,
}

impl<T> BlockActs<T> {
    /// `[S·T, D]` the block's input, to be filled before [`block_forward`].
    pub(crate) fn input(&mut self) -> &mut Vec<T> {
        &mut self.x_in
    }
}

/// How a block's sequences are laid out, which decides its attention.
#[derive(Clone, Copy)]
pub(crate) enum Tokens<'a> {
    /// Window sequences as `rel` says; attention adds a relative bias table.
    Windows(&'a RelativeIndex),
    /// Whole sequences of this many tokens; attention has no bias (MAE).
    Global(usize),
}

impl Tokens<'_> {
    /// Tokens per sequence.
    fn len(self) -> usize {
        match self {
            Tokens::Windows(rel) => rel.tokens,
            Tokens::Global(t) => t,
        }
    }

    /// Values the attention keeps of its softmax for `seqs` sequences.
    fn softmax_len(self, seqs: usize, heads: usize) -> usize {
        match self {
            Tokens::Windows(rel) => seqs * heads * rel.tokens * rel.tokens,
            Tokens::Global(t) => seqs * heads * t,
        }
    }
}

/// Buffers a pass uses and drops: the input gradients.
#[derive(Default)]
pub(crate) struct Scratch<T> {
    /// `[S·T, 4D]`, gradient at fc2's input, then at fc1's output.
    pub(crate) hidden: Vec<T>,
    /// `[S·T, D]`, gradient at a LayerNorm output.
    pub(crate) normed: Vec<T>,
    /// `[S·T, D]`, gradient at the attention output.
    pub(crate) attn: Vec<T>,
    /// `[S·T, 3D]`.
    pub(crate) qkv: Vec<T>,
    /// `[S·T, D]`, gradient of the residual stream.
    pub(crate) dx: Vec<T>,
    /// `[S·M, D]`, gradients at the head's input and at the final norm's input.
    pub(crate) dnormed: Vec<T>,
    pub(crate) dpicked: Vec<T>,
    /// `[S·V, D]`, gradient at the embedded patches.
    pub(crate) dembedded: Vec<T>,
}

/// `v` resized to `len` values, keeping its memory. Values already there stay, so only a
/// buffer that the next op overwrites may be taken this way.
pub(crate) fn sized<T: Real>(v: &mut Vec<T>, len: usize) -> &mut [T] {
    v.resize(len, T::zero());
    v
}

/// Two disjoint tensors of the gradient buffer at once, e.g. a weight and its bias.
pub(crate) fn pair_mut<'g, T>(
    g: &'g mut [T],
    a: &Range<usize>,
    b: &Range<usize>,
) -> (&'g mut [T], &'g mut [T]) {
    assert!(a.end <= b.start, "{a:?} must lie before {b:?}");
    let (lo, hi) = g.split_at_mut(b.start);
    (&mut lo[a.clone()], &mut hi[..b.len()])
}

/// One pre-norm block on the residual stream `a.x_in` `[S·T, D]` of sequences laid out as
/// `tokens` says; window sequences take `table` `[rel.table_rows, h]` as their relative
/// bias (the block's own table, or one resized to a larger grid), global ones an empty
/// table. Fills the rest of `a` for the backward, and `x_out` with the block's output;
/// `act` is scratch.
#[allow(clippy::too_many_arguments)]
pub(crate) fn block_forward<T: Real>(
    p: &[T],
    br: &BlockRanges,
    table: &[T],
    tokens: Tokens,
    heads: usize,
    a: &mut BlockActs<T>,
    x_out: &mut Vec<T>,
) {
    let w = |r: &Range<usize>| &p[r.clone()];
    let (d, hidden) = (br.norm1_w.len(), br.fc1_b.len());
    let rows = a.x_in.len() / d;
    let seqs = rows / tokens.len();

    // x_mid = x_in + proj(attn(LN1(x_in)))
    let ln1 = sized(&mut a.ln1, rows * d);
    a.ln1_stats = layernorm::layernorm_forward(ln1, &a.x_in, w(&br.norm1_w), w(&br.norm1_b));
    let qkv = sized(&mut a.qkv, rows * 3 * d);
    linear::linear_forward(qkv, ln1, w(&br.qkv_w), w(&br.qkv_b));
    let attn = sized(&mut a.attn, rows * d);
    let softmax = sized(&mut a.softmax, tokens.softmax_len(seqs, heads));
    match tokens {
        Tokens::Windows(rel) => attention::attention_forward(attn, softmax, qkv, table, rel, heads),
        Tokens::Global(t) => {
            global_attention::global_attention_forward(attn, softmax, qkv, t, heads)
        }
    }
    let x_mid = sized(&mut a.x_mid, rows * d);
    linear::linear_forward_residual(x_mid, &a.x_in, attn, w(&br.proj_w), w(&br.proj_b));

    // x_out = x_mid + fc2(gelu(fc1(LN2(x_mid))))
    let ln2 = sized(&mut a.ln2, rows * d);
    a.ln2_stats = layernorm::layernorm_forward(ln2, x_mid, w(&br.norm2_w), w(&br.norm2_b));
    let fc1 = sized(&mut a.fc1, rows * hidden);
    linear::linear_forward(fc1, ln2, w(&br.fc1_w), w(&br.fc1_b));
    let (act, cdf) = (
        sized(&mut a.act, rows * hidden),
        sized(&mut a.cdf, rows * hidden),
    );
    gelu::gelu_forward(act, cdf, fc1);
    let x_out = sized(x_out, rows * d);
    linear::linear_forward_residual(x_out, x_mid, act, w(&br.fc2_w), w(&br.fc2_b));
}

impl<T: Real> Step<T> for Workspace<T> {
    fn new(m: &ModelConfig) -> Result<Self> {
        m.validate()?;
        let layout = ParamLayout::new(m);
        Ok(Workspace {
            m: m.clone(),
            r: layout.ranges().clone(),
            params_len: layout.total(),
            rel: RelativeIndex::new(m.window),
            patches: Patches::default(),
            embedded: Vec::new(),
            slots: Vec::new(),
            blocks: (0..m.depth).map(|_| BlockActs::default()).collect(),
            x_last: Vec::new(),
            picked: Vec::new(),
            normed: Vec::new(),
            norm_stats: Stats::default(),
            pred: Vec::new(),
            dpred: Vec::new(),
            scratch: Scratch::default(),
        })
    }

    fn model(&self) -> &ModelConfig {
        &self.m
    }

    fn params_len(&self) -> usize {
        self.params_len
    }

    fn predictions(&mut self) -> (&[T], &mut Vec<T>, &[T]) {
        (&self.pred, &mut self.dpred, &self.patches.targets)
    }

    fn forward_unchecked(&mut self, p: &[T], batch: &Batch) {
        let Workspace { m, r, rel, .. } = self;
        let w = |r: &Range<usize>| &p[r.clone()];
        let (seqs, d) = (batch.sequences(m), m.width);
        window_gather::window_gather_into(&mut self.patches, m, batch);

        // Only visible patches are embedded; masked positions get the mask token.
        let embedded = sized(&mut self.embedded, seqs * m.visible_per_window() * d);
        linear::linear_forward(
            embedded,
            &self.patches.visible,
            w(&r.patch_w),
            w(&r.patch_b),
        );
        self.slots = batch.visible_slots(m);
        let x = sized(self.blocks[0].input(), seqs * m.seq_len() * d);
        tokens::assemble_tokens_forward(
            x,
            w(&r.cls_token),
            w(&r.mask_token),
            embedded,
            &self.slots,
            m.window_area(),
        );

        blocks_forward(
            p,
            &r.blocks,
            Tokens::Windows(rel),
            m.heads,
            &mut self.blocks,
            &mut self.x_last,
        );

        // LayerNorm works per token, so norming only the masked tokens the head reads
        // equals picking them from the normed sequence.
        let masked_rows = batch.mask_index.len();
        let picked = sized(&mut self.picked, masked_rows * d);
        tokens::gather_masked_tokens(picked, &self.x_last, &batch.mask_index, m.seq_len());
        let normed = sized(&mut self.normed, masked_rows * d);
        self.norm_stats = layernorm::layernorm_forward(normed, picked, w(&r.norm_w), w(&r.norm_b));
        let pred = sized(&mut self.pred, masked_rows * m.patch_dim());
        linear::linear_forward(pred, normed, w(&r.head_w), w(&r.head_b));
    }

    /// The forward in reverse, from `dpred`; adds every parameter's gradient.
    fn backward(&mut self, p: &[T], batch: &Batch, g: &mut [T], ready: &mut Ready<'_, T>) {
        let Workspace {
            m,
            r,
            rel,
            scratch: s,
            ..
        } = self;
        let w = |r: &Range<usize>| &p[r.clone()];
        let d = m.width;
        let rows = batch.sequences(m) * m.seq_len();

        let dnormed = sized(&mut s.dnormed, self.normed.len());
        let (dw, db) = pair_mut(g, &r.head_w, &r.head_b);
        linear::linear_backward(
            Some(dnormed),
            dw,
            db,
            &self.dpred,
            &self.normed,
            w(&r.head_w),
        );
        let dpicked = sized(&mut s.dpicked, self.picked.len());
        let (dw, db) = pair_mut(g, &r.norm_w, &r.norm_b);
        dpicked.fill(T::zero());
        layernorm::layernorm_backward(
            dpicked,
            dw,
            db,
            dnormed,
            &self.picked,
            &self.norm_stats,
            w(&r.norm_w),
        );
        ready(r.norm_w.start, g);
        let mut dx = std::mem::take(&mut s.dx);
        sized(&mut dx, rows * d).fill(T::zero());
        tokens::scatter_masked_tokens(&mut dx, dpicked, &batch.mask_index, m.seq_len());

        blocks_backward(
            p,
            &r.blocks,
            Tokens::Windows(rel),
            m.heads,
            &self.blocks,
            &mut dx,
            g,
            s,
            ready,
        );

        let dembedded = sized(&mut s.dembedded, self.embedded.len());
        let (dcls, dmask) = pair_mut(g, &r.cls_token, &r.mask_token);
        tokens::assemble_tokens_backward(dcls, dmask, dembedded, &dx, &self.slots, m.window_area());
        let (dw, db) = pair_mut(g, &r.patch_w, &r.patch_b);
        linear::linear_backward(
            None,
            dw,
            db,
            dembedded,
            &self.patches.visible,
            w(&r.patch_w),
        );
        ready(r.patch_w.start, g);
        s.dx = dx;
    }
}

/// The blocks `ranges` in order, from `acts[0]`'s input (filled by the caller) to
/// `x_last`; each block's table is its own `rel_bias` range (empty for global attention).
#[allow(clippy::too_many_arguments)]
pub(crate) fn blocks_forward<T: Real>(
    p: &[T],
    ranges: &[BlockRanges],
    tokens: Tokens,
    heads: usize,
    acts: &mut [BlockActs<T>],
    x_last: &mut Vec<T>,
) {
    for (i, br) in ranges.iter().enumerate() {
        let (done, rest) = acts.split_at_mut(i + 1);
        let x_out = match rest.first_mut() {
            Some(next) => next.input(),
            None => &mut *x_last,
        };
        let table = &p[br.rel_bias.clone()];
        block_forward(p, br, table, tokens, heads, &mut done[i], x_out);
    }
}

/// [`blocks_forward`] in reverse: `dx` holds dL/dx_last on entry and dL/d(first input)
/// on return. After each block, its gradients and everything above are final: `ready`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn blocks_backward<T: Real>(
    p: &[T],
    ranges: &[BlockRanges],
    tokens: Tokens,
    heads: usize,
    acts: &[BlockActs<T>],
    dx: &mut [T],
    g: &mut [T],
    s: &mut Scratch<T>,
    ready: &mut Ready<'_, T>,
) {
    for (br, a) in ranges.iter().zip(acts).rev() {
        block_backward(p, br, tokens, heads, a, dx, g, s);
        ready(br.norm1_w.start, g);
    }
}

/// One block in reverse: `dx` holds dL/dx_out on entry and dL/dx_in on return.
#[allow(clippy::too_many_arguments)]
fn block_backward<T: Real>(
    p: &[T],
    br: &BlockRanges,
    tokens: Tokens,
    heads: usize,
    a: &BlockActs<T>,
    dx: &mut [T],
    g: &mut [T],
    s: &mut Scratch<T>,
) {
    let w = |r: &Range<usize>| &p[r.clone()];
    let (rows, hidden) = (a.fc1.len() / br.fc1_b.len(), br.fc1_b.len());
    let d = br.norm1_w.len();
    let dhidden = sized(&mut s.hidden, rows * hidden);
    let dnormed = sized(&mut s.normed, rows * d);
    let dattn = sized(&mut s.attn, rows * d);
    let dqkv = sized(&mut s.qkv, rows * 3 * d);

    // x_out = x_mid + fc2(gelu(fc1(LN2(x_mid)))): dx becomes dL/dx_mid.
    let (dw, db) = pair_mut(g, &br.fc2_w, &br.fc2_b);
    linear::linear_backward(Some(&mut *dhidden), dw, db, dx, &a.act, w(&br.fc2_w));
    gelu::gelu_backward(dhidden, &a.fc1, &a.cdf);
    let (dw, db) = pair_mut(g, &br.fc1_w, &br.fc1_b);
    linear::linear_backward(Some(&mut *dnormed), dw, db, dhidden, &a.ln2, w(&br.fc1_w));
    let (dw, db) = pair_mut(g, &br.norm2_w, &br.norm2_b);
    layernorm::layernorm_backward(dx, dw, db, dnormed, &a.x_mid, &a.ln2_stats, w(&br.norm2_w));

    // x_mid = x_in + proj(attn(LN1(x_in))): dx becomes dL/dx_in.
    let (dw, db) = pair_mut(g, &br.proj_w, &br.proj_b);
    linear::linear_backward(Some(&mut *dattn), dw, db, dx, &a.attn, w(&br.proj_w));
    match tokens {
        Tokens::Windows(rel) => attention::attention_backward(
            dqkv,
            &mut g[br.rel_bias.clone()],
            dattn,
            &a.qkv,
            &a.softmax,
            rel,
            heads,
        ),
        Tokens::Global(t) => {
            global_attention::global_attention_backward(dqkv, dattn, &a.qkv, &a.softmax, t, heads)
        }
    }
    let (dw, db) = pair_mut(g, &br.qkv_w, &br.qkv_b);
    linear::linear_backward(Some(&mut *dnormed), dw, db, dqkv, &a.ln1, w(&br.qkv_w));
    let (dw, db) = pair_mut(g, &br.norm1_w, &br.norm1_b);
    layernorm::layernorm_backward(dx, dw, db, dnormed, &a.x_in, &a.ln1_stats, w(&br.norm1_w));
}
