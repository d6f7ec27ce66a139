//! The whole MAE network on the CPU (docs/DESIGN.md §7): forward, loss and backward,
//! generic over the scalar like LoMaR's (`model.rs`), whose ops and blocks it reuses.
//!
//! Rows: `B` images of `N = G²` patches, `V` kept and `M` masked each. The encoder's
//! residual stream is `[B·(1+V), D]`, the decoder's `[B·(1+N), Dd]`; `decoder_pred` runs
//! on every decoder token (cls included, as the official model does before dropping it)
//! and the loss reads the `M` masked patches of each image.

pub mod pos_embed;

use std::ops::Range;

use anyhow::{bail, Result};

use super::model::{blocks_backward, blocks_forward, pair_mut, sized, BlockActs, Scratch, Tokens};
use super::ops::layernorm::{self, Stats};
use super::ops::window_gather::{self, Patches};
use super::ops::{linear, tokens};
use super::real::Real;
use super::step::{self, Ready, Step};
use crate::config::{DecoderConfig, Method, ModelConfig};
use crate::data::batch::Batch;
use crate::params::{DecoderRanges, ModelRanges, ParamLayout};
use pos_embed::sincos_pos_embed;

/// A validated MAE model, its tables (parameter ranges, position embeddings) and every
/// buffer of a pass, kept from one call to the next.
pub struct Workspace<T> {
    m: ModelConfig,
    dec: DecoderConfig,
    r: ModelRanges,
    params_len: usize,
    /// `[1+N, D]` and `[1+N, Dd]`, the encoder's and the decoder's position embeddings.
    pos: Vec<T>,
    dec_pos: Vec<T>,
    patches: Patches<T>,
    /// `[B·V, D]` embedded kept patches, their position embedding added.
    embedded: Vec<T>,
    /// `[B, N]` kept row of each patch, `None` where masked.
    slots: Vec<Option<u32>>,
    blocks: Vec<BlockActs<T>>,
    /// `[B·(1+V), D]` the encoder's last block output, and after its final norm.
    enc_last: Vec<T>,
    enc_normed: Vec<T>,
    enc_stats: Stats<T>,
    /// `[B·(1+V), Dd]` after `decoder_embed`.
    dec_embedded: Vec<T>,
    dec_blocks: Vec<BlockActs<T>>,
    /// `[B·(1+N), Dd]` the decoder's last block output, and after `decoder_norm`.
    dec_last: Vec<T>,
    dec_normed: Vec<T>,
    dec_stats: Stats<T>,
    /// `[B·(1+N), 3p²]` `decoder_pred` on every token, and its gradient.
    pred_all: Vec<T>,
    dpred_all: Vec<T>,
    /// `[B·M, 3p²]` the masked patches' predictions, in `mask_index` order, and their
    /// loss gradient.
    pred: Vec<T>,
    dpred: Vec<T>,
    /// Gradients of the decoder's stream, at `decoder_embed`'s output and input.
    ddec: Vec<T>,
    ddec_embedded: Vec<T>,
    denc_normed: Vec<T>,
    scratch: Scratch<T>,
}

/// The mean reconstruction loss of a batch.
pub fn loss<T: Real>(m: &ModelConfig, params: &[T], batch: &Batch) -> Result<T> {
    step::loss::<T, Workspace<T>>(m, params, batch)
}

/// `decoder_pred`'s output for every masked patch, `[B·M, 3p²]` in `(y, x, c)` order, in
/// `mask_index` order within each image (the layout of the targets).
pub fn predict<T: Real>(m: &ModelConfig, params: &[T], batch: &Batch) -> Result<Vec<T>> {
    step::predict::<T, Workspace<T>>(m, params, batch)
}

impl<T> Workspace<T> {
    fn decoder(&self) -> &DecoderRanges {
        self.r
            .decoder
            .as_ref()
            .expect("an MAE layout has a decoder")
    }
}

impl<T: Real> Step<T> for Workspace<T> {
    /// The workspace of MAE model `m`, which it validates; buffers grow on first use.
    fn new(m: &ModelConfig) -> Result<Self> {
        m.validate()?;
        let Some(dec) = m.decoder.filter(|_| m.method == Method::Mae) else {
            bail!("the MAE workspace needs a --method mae model");
        };
        let layout = ParamLayout::new(m);
        let table = |width| {
            sincos_pos_embed(width, m.grid())
                .into_iter()
                .map(T::of)
                .collect()
        };
        Ok(Workspace {
            m: m.clone(),
            dec,
            r: layout.ranges().clone(),
            params_len: layout.total(),
            pos: table(m.width),
            dec_pos: table(dec.width),
            patches: Patches::default(),
            embedded: Vec::new(),
            slots: Vec::new(),
            blocks: (0..m.depth).map(|_| BlockActs::default()).collect(),
            enc_last: Vec::new(),
            enc_normed: Vec::new(),
            enc_stats: Stats::default(),
            dec_embedded: Vec::new(),
            dec_blocks: (0..dec.depth).map(|_| BlockActs::default()).collect(),
            dec_last: Vec::new(),
            dec_normed: Vec::new(),
            dec_stats: Stats::default(),
            pred_all: Vec::new(),
            dpred_all: Vec::new(),
            pred: Vec::new(),
            dpred: Vec::new(),
            ddec: Vec::new(),
            ddec_embedded: Vec::new(),
            denc_normed: Vec::new(),
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
        let w = |r: &Range<usize>| &p[r.clone()];
        let dr = self.decoder().clone();
        let Workspace { m, dec, r, .. } = self;
        let (b, d, dd, n) = (batch.images_len, m.width, dec.width, m.window_area());
        let (enc_rows, dec_rows) = (b * (1 + m.visible_per_window()), b * (1 + n));
        window_gather::window_gather_into(&mut self.patches, m, batch);
        self.slots = batch.visible_slots(m);

        // Encoder input: cls, then the kept patches embedded, each plus its position.
        let embedded = sized(&mut self.embedded, b * m.visible_per_window() * d);
        linear::linear_forward(
            embedded,
            &self.patches.visible,
            w(&r.patch_w),
            w(&r.patch_b),
        );
        add_kept_positions(embedded, &self.pos, &self.slots, n);
        let x = sized(self.blocks[0].input(), enc_rows * d);
        tokens::prepend_cls_forward(x, w(&r.cls_token), embedded);
        blocks_forward(
            p,
            &r.blocks,
            Tokens::Global(1 + m.visible_per_window()),
            m.heads,
            &mut self.blocks,
            &mut self.enc_last,
        );
        let enc_normed = sized(&mut self.enc_normed, enc_rows * d);
        self.enc_stats =
            layernorm::layernorm_forward(enc_normed, &self.enc_last, w(&r.norm_w), w(&r.norm_b));

        // Decoder input: the encoded tokens back at their patches, mask tokens between.
        let dec_embedded = sized(&mut self.dec_embedded, enc_rows * dd);
        linear::linear_forward(dec_embedded, enc_normed, w(&dr.embed_w), w(&dr.embed_b));
        let x = sized(self.dec_blocks[0].input(), dec_rows * dd);
        tokens::unshuffle_tokens_forward(x, w(&r.mask_token), dec_embedded, &self.slots, n);
        for seq in x.chunks_exact_mut((1 + n) * dd) {
            seq.iter_mut()
                .zip(&self.dec_pos)
                .for_each(|(v, &q)| *v += q);
        }
        blocks_forward(
            p,
            &dr.blocks,
            Tokens::Global(1 + n),
            dec.heads,
            &mut self.dec_blocks,
            &mut self.dec_last,
        );
        let dec_normed = sized(&mut self.dec_normed, dec_rows * dd);
        self.dec_stats =
            layernorm::layernorm_forward(dec_normed, &self.dec_last, w(&dr.norm_w), w(&dr.norm_b));
        let pred_all = sized(&mut self.pred_all, dec_rows * m.patch_dim());
        linear::linear_forward(pred_all, dec_normed, w(&r.head_w), w(&r.head_b));
        let pred = sized(&mut self.pred, batch.mask_index.len() * m.patch_dim());
        tokens::gather_masked_tokens(pred, pred_all, &batch.mask_index, 1 + n);
    }

    /// The forward in reverse, from `dpred`; adds every parameter's gradient.
    fn backward(&mut self, p: &[T], batch: &Batch, g: &mut [T], ready: &mut Ready<'_, T>) {
        let w = |r: &Range<usize>| &p[r.clone()];
        let dr = self.decoder().clone();
        let Workspace {
            m,
            dec,
            r,
            scratch: s,
            ..
        } = self;
        let n = m.window_area();

        // Only the masked patches' predictions reach the loss.
        let dpred_all = sized(&mut self.dpred_all, self.pred_all.len());
        dpred_all.fill(T::zero());
        tokens::scatter_masked_tokens(dpred_all, &self.dpred, &batch.mask_index, 1 + n);
        let ddec_normed = sized(&mut s.dnormed, self.dec_normed.len());
        let (dw, db) = pair_mut(g, &r.head_w, &r.head_b);
        linear::linear_backward(
            Some(&mut *ddec_normed),
            dw,
            db,
            dpred_all,
            &self.dec_normed,
            w(&r.head_w),
        );
        let ddec = sized(&mut self.ddec, self.dec_last.len());
        ddec.fill(T::zero());
        let (dw, db) = pair_mut(g, &dr.norm_w, &dr.norm_b);
        layernorm::layernorm_backward(
            ddec,
            dw,
            db,
            ddec_normed,
            &self.dec_last,
            &self.dec_stats,
            w(&dr.norm_w),
        );
        ready(dr.norm_w.start, g);
        blocks_backward(
            p,
            &dr.blocks,
            Tokens::Global(1 + n),
            dec.heads,
            &self.dec_blocks,
            ddec,
            g,
            s,
            ready,
        );

        // The position embedding is fixed: the gradient passes it unchanged.
        let ddec_embedded = sized(&mut self.ddec_embedded, self.dec_embedded.len());
        tokens::unshuffle_tokens_backward(
            &mut g[r.mask_token.clone()],
            ddec_embedded,
            ddec,
            &self.slots,
            n,
        );
        let denc_normed = sized(&mut self.denc_normed, self.enc_normed.len());
        let (dw, db) = pair_mut(g, &dr.embed_w, &dr.embed_b);
        linear::linear_backward(
            Some(&mut *denc_normed),
            dw,
            db,
            ddec_embedded,
            &self.enc_normed,
            w(&dr.embed_w),
        );
        let mut dx = std::mem::take(&mut s.dx);
        sized(&mut dx, self.enc_last.len()).fill(T::zero());
        let (dw, db) = pair_mut(g, &r.norm_w, &r.norm_b);
        layernorm::layernorm_backward(
            &mut dx,
            dw,
            db,
            denc_normed,
            &self.enc_last,
            &self.enc_stats,
            w(&r.norm_w),
        );
        ready(r.norm_w.start, g);
        blocks_backward(
            p,
            &r.blocks,
            Tokens::Global(1 + m.visible_per_window()),
            m.heads,
            &self.blocks,
            &mut dx,
            g,
            s,
            ready,
        );

        let dembedded = sized(&mut s.dembedded, self.embedded.len());
        tokens::prepend_cls_backward(&mut g[r.cls_token.clone()], dembedded, &dx);
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

/// embedded `[B·V, D]` += the position embedding row `1 + n` of each kept patch `n`;
/// `slots` `[B, N]` says which row holds which patch.
fn add_kept_positions<T: Real>(embedded: &mut [T], pos: &[T], slots: &[Option<u32>], n: usize) {
    let d = pos.len() / (1 + n);
    let images = slots.len() / n;
    let per_image = embedded.len() / images;
    for (rows, slots) in embedded
        .chunks_exact_mut(per_image)
        .zip(slots.chunks_exact(n))
    {
        for (patch, slot) in slots.iter().enumerate() {
            if let Some(v) = slot {
                let row = &mut rows[*v as usize * d..][..d];
                let q = &pos[(1 + patch) * d..][..d];
                row.iter_mut().zip(q).for_each(|(a, &b)| *a += b);
            }
        }
    }
}
