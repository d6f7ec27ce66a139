//! One micro-batch's MAE forward and backward on the GPU, op by op (docs/DESIGN.md §7.2),
//! the GPU side of `cpu::mae`. The blocks and the head are `block.rs`'s, with whole-sequence
//! attention; the token placements are `mae_tokens.rs`'s.
//!
//! Shapes: B images, N = G² patches, V kept and M masked each; the encoder's rows
//! Ne = B·(1+V) of width D, the decoder's Nd = B·(1+N) of width Dd; P = 3p². The decoder
//! predicts only the masked patches' rows (the head gathers them first): the official
//! model's prediction of every token differs only in rows the loss never reads.

use anyhow::{Context, Result};
use cudarc::driver::CudaSlice;

use super::activations::BlockActivations;
use super::blaslt::Linear;
use super::block::{Block, Head, HeadRanges, Mixer, Net, Shared};
use super::device::DevPtr;
use super::global_attention::GlobalAttnShape;
use super::launch::MaskedRows;
use super::mae_activations::{decoder, MaeActivations, MaeDims};
use super::mae_tokens::Placement;
use super::method::Ready;
use super::nvtx;
use super::storage::Storage;
use crate::config::{DecoderConfig, ModelConfig};
use crate::params::{BlockRanges, DecoderRanges, ModelRanges};

/// Everything one MAE pass reads, borrowed.
pub(super) struct MaePass<'a, T: Storage> {
    pub net: Net<'a, T>,
    pub model: &'a ModelConfig,
    pub ranges: &'a ModelRanges,
    /// [1] the loss sum the micro-batch's mean loss is added to.
    pub loss: DevPtr<'a, f32>,
    pub acts: &'a MaeActivations<T>,
}

/// One stack of blocks: the encoder's or the decoder's.
struct Stack<'a, T> {
    ranges: &'a [BlockRanges],
    acts: &'a [BlockActivations<T>],
    resid: &'a [CudaSlice<f32>],
    rows: usize,
    width: usize,
    shape: GlobalAttnShape,
}

impl<'a, T: Storage> MaePass<'a, T> {
    fn dims(&self) -> MaeDims {
        MaeDims::new(self.model, self.acts.images_len)
    }

    fn decoder(&self) -> Result<(DecoderConfig, &'a DecoderRanges)> {
        let ranges = self
            .ranges
            .decoder
            .as_ref()
            .context("an MAE parameter layout has a decoder")?;
        Ok((decoder(self.model)?, ranges))
    }

    fn shared(&self) -> Result<Shared<'a, T>> {
        let (net, a) = (&self.net, self.acts);
        Ok(Shared {
            dx: net.ptr(&a.dx)?,
            dy: net.ptr(&a.dy)?,
            dsmall: net.ptr(&a.dsmall)?,
            dhidden: net.ptr(&a.dhidden)?,
            dqkv: net.ptr(&a.dqkv)?,
        })
    }

    fn encoder_stack(&self) -> Stack<'a, T> {
        let (m, a, x) = (self.model, self.acts, self.dims());
        Stack {
            ranges: &self.ranges.blocks,
            acts: &a.enc_blocks,
            resid: &a.enc_resid,
            rows: x.enc_rows,
            width: m.width,
            shape: GlobalAttnShape {
                seqs: x.images,
                tokens: 1 + m.visible_per_window(),
                heads: m.heads,
                head_dim: m.head_dim(),
            },
        }
    }

    fn decoder_stack(&self) -> Result<Stack<'a, T>> {
        let (m, a, x) = (self.model, self.acts, self.dims());
        let (dec, dr) = self.decoder()?;
        Ok(Stack {
            ranges: &dr.blocks,
            acts: &a.dec_blocks,
            resid: &a.dec_resid,
            rows: x.dec_rows,
            width: dec.width,
            shape: GlobalAttnShape {
                seqs: x.images,
                tokens: m.seq_len(),
                heads: dec.heads,
                head_dim: dec.head_dim(),
            },
        })
    }

    /// Block `l` of `stack`.
    fn block<'s>(&'s self, stack: &'s Stack<'a, T>, l: usize) -> Result<Block<'s, T>> {
        let net = &self.net;
        Ok(Block {
            net,
            r: &stack.ranges[l],
            acts: &stack.acts[l],
            shared: self.shared()?,
            mixer: Mixer::Global {
                shape: stack.shape,
                delta: net.ptr(&self.acts.delta)?,
            },
            rows: stack.rows,
            width: stack.width,
            x_in: net.ptr(&stack.resid[2 * l])?,
            x_mid: net.ptr(&stack.resid[2 * l + 1])?,
            x_out: net.ptr(&stack.resid[2 * l + 2])?,
        })
    }

    /// Queues the whole forward and backward; the mean loss is added to `loss`; `ready`
    /// after the head, each decoder block, the decoder embedding (with the encoder's
    /// final norm), each encoder block and the patch embedding
    /// (`dist::buckets::ready_points`). Each phase and block is an NVTX range, as the
    /// error context names it.
    pub fn forward_backward(&self, grad_scale: f32, ready: &mut Ready<'_>) -> Result<()> {
        let (enc, dec) = (self.encoder_stack(), self.decoder_stack()?);
        let (r, (_, dr)) = (self.ranges, self.decoder()?);
        phase("patch embedding forward", || self.embed_forward())?;
        self.stack_forward(&enc, "encoder")?;
        phase("decoder embedding forward", || self.decoder_embed_forward())?;
        self.stack_forward(&dec, "decoder")?;
        phase("head and loss", || self.head(grad_scale))?;
        ready(dr.norm_w.start)?;
        self.stack_backward(&dec, "decoder", ready)?;
        phase("decoder embedding backward", || {
            self.decoder_embed_backward()
        })?;
        ready(r.norm_w.start)?;
        self.stack_backward(&enc, "encoder", ready)?;
        phase("patch embedding backward", || self.embed_backward())?;
        ready(r.patch_w.start)
    }

    fn stack_forward(&self, stack: &Stack<'a, T>, name: &str) -> Result<()> {
        for l in 0..stack.ranges.len() {
            phase(&format!("{name} block {l} forward"), || {
                self.block(stack, l)?.forward()
            })?;
        }
        Ok(())
    }

    /// From d x_out of the stack's last block in `dx` (and `dy`, its fc2 bias gradient
    /// added) down to d x_in of its first in `dx`; `ready` after each block.
    fn stack_backward(
        &self,
        stack: &Stack<'a, T>,
        name: &str,
        ready: &mut Ready<'_>,
    ) -> Result<()> {
        for l in (0..stack.ranges.len()).rev() {
            phase(&format!("{name} block {l} backward"), || {
                let below = l.checked_sub(1).map(|b| self.net.g(&stack.ranges[b].fc2_b));
                self.block(stack, l)?.backward(below.transpose()?)
            })?;
            ready(stack.ranges[l].norm1_w.start)?;
        }
        Ok(())
    }

    /// The encoder's input `[Ne, D]`: cls, then each kept patch embedded plus its position.
    fn embed_forward(&self) -> Result<()> {
        let (net, a, m, r, x) = (&self.net, self.acts, self.model, self.ranges, self.dims());
        a.input.gather_windows(net.gpu, net.kernels, m, x.images)?;
        // The patch bias is added with the tokens, where its gradient is summed too.
        net.linear().linear_forward(
            net.ptr(&a.emb)?,
            net.ptr(&a.input.patches)?,
            net.w(&r.patch_w)?,
            None,
            self.patch_layer(),
        )?;
        net.kernels.place_tokens_forward(
            net.ptr(&a.emb)?,
            net.p(&r.patch_b)?,
            net.p(&r.cls_token)?,
            net.ptr(&a.enc_pos)?,
            net.ptr(&a.enc_slot)?,
            net.ptr(&a.enc_pos_row)?,
            net.ptr(&a.enc_resid[0])?,
            self.encoder_placement(),
        )
    }

    fn encoder_placement(&self) -> Placement {
        let (m, x) = (self.model, self.dims());
        Placement {
            rows: x.enc_rows,
            src_rows: x.kept,
            pos_rows: m.seq_len(),
            width: m.width,
        }
    }

    fn decoder_placement(&self) -> Result<Placement> {
        let (m, x) = (self.model, self.dims());
        Ok(Placement {
            rows: x.dec_rows,
            src_rows: x.enc_rows,
            pos_rows: m.seq_len(),
            width: decoder(m)?.width,
        })
    }

    /// The encoder's final norm, `decoder_embed`, and the decoder's input `[Nd, Dd]`: the
    /// encoded rows back at their patches, mask tokens between, plus positions.
    fn decoder_embed_forward(&self) -> Result<()> {
        let (net, a, m, r, x) = (&self.net, self.acts, self.model, self.ranges, self.dims());
        let (dec, dr) = self.decoder()?;
        let d = m.width;
        net.kernels.layernorm_forward(
            net.ptr(&a.enc_resid[2 * m.depth])?,
            net.p(&r.norm_w)?,
            net.p(&r.norm_b)?,
            net.ptr(&a.enc_normed)?,
            net.ptr(&a.enc_mean)?,
            net.ptr(&a.enc_rstd)?,
            x.enc_rows,
            d,
        )?;
        // decoder_embed's bias is added with the tokens, as the patch bias.
        net.linear().linear_forward(
            net.ptr(&a.dec_emb)?,
            net.ptr(&a.enc_normed)?,
            net.w(&dr.embed_w)?,
            None,
            Linear {
                rows: x.enc_rows,
                inp: d,
                out: dec.width,
            },
        )?;
        net.kernels.place_tokens_forward(
            net.ptr(&a.dec_emb)?,
            net.p(&dr.embed_b)?,
            net.p(&r.mask_token)?,
            net.ptr(&a.dec_pos)?,
            net.ptr(&a.dec_slot)?,
            net.ptr(&a.dec_pos_row)?,
            net.ptr(&a.dec_resid[0])?,
            self.decoder_placement()?,
        )
    }

    /// `decoder_norm` and `decoder_pred` on the masked patches, the loss, and the backward
    /// to the decoder's last residual snapshot.
    fn head(&self, grad_scale: f32) -> Result<()> {
        let (net, a, m, r, x) = (&self.net, self.acts, self.model, self.ranges, self.dims());
        let (dec, dr) = self.decoder()?;
        let shared = self.shared()?;
        Head {
            net,
            ranges: HeadRanges {
                norm_w: &dr.norm_w,
                norm_b: &dr.norm_b,
                head_w: &r.head_w,
                head_b: &r.head_b,
                last_fc2_b: &dr.blocks[dec.depth - 1].fc2_b,
            },
            acts: &a.head,
            rows: MaskedRows::new(m, x.images, dec.width),
            patch_dim: m.patch_dim(),
            x_last: net.ptr(&a.dec_resid[2 * dec.depth])?,
            mask_index: net.ptr(&a.input.mask_index)?,
            targets: net.ptr(&a.input.targets)?,
            loss: self.loss,
        }
        .run(grad_scale, shared.dx, shared.dy)
    }

    /// From d x_in of the decoder's first block in `dx`: d mask_token, d decoder_embed,
    /// the encoder's final norm backward, leaving d x_out of the encoder's last block in
    /// `dx` and `dy`, its fc2 bias gradient added.
    fn decoder_embed_backward(&self) -> Result<()> {
        let (net, a, m, r, x) = (&self.net, self.acts, self.model, self.ranges, self.dims());
        let (k, shared) = (net.kernels, self.shared()?);
        let (dec, dr) = self.decoder()?;
        let d = m.width;
        k.place_tokens_backward(
            shared.dx,
            net.ptr(&a.dec_slot)?,
            net.ptr(&a.ddec_emb)?,
            net.scratch,
            net.g(&r.mask_token)?,
            net.g(&dr.embed_b)?,
            self.decoder_placement()?,
        )?;
        net.linear().linear_backward(
            Some(net.ptr(&a.denc_normed)?),
            net.g(&dr.embed_w)?,
            None,
            net.ptr(&a.ddec_emb)?,
            net.ptr(&a.enc_normed)?,
            net.w(&dr.embed_w)?,
            Linear {
                rows: x.enc_rows,
                inp: d,
                out: dec.width,
            },
        )?;
        let dx = shared.dx.range(0..x.enc_rows * d)?;
        net.gpu.memset_zero(dx)?;
        k.layernorm_backward(
            net.ptr(&a.enc_resid[2 * m.depth])?,
            net.ptr(&a.denc_normed)?,
            net.p(&r.norm_w)?,
            net.ptr(&a.enc_mean)?,
            net.ptr(&a.enc_rstd)?,
            dx,
            Some(shared.dy),
            net.g(&r.norm_w)?,
            net.g(&r.norm_b)?,
            Some(net.g(&r.blocks[m.depth - 1].fc2_b)?),
            net.scratch,
            x.enc_rows,
            d,
        )
    }

    /// d cls, d patch bias and d W_pe from d x_in of the encoder's first block.
    fn embed_backward(&self) -> Result<()> {
        let (net, a, r) = (&self.net, self.acts, self.ranges);
        net.kernels.place_tokens_backward(
            net.ptr(&a.dx)?,
            net.ptr(&a.enc_slot)?,
            net.ptr(&a.demb)?,
            net.scratch,
            net.g(&r.cls_token)?,
            net.g(&r.patch_b)?,
            self.encoder_placement(),
        )?;
        net.linear().linear_backward(
            None,
            net.g(&r.patch_w)?,
            None,
            net.ptr(&a.demb)?,
            net.ptr(&a.input.patches)?,
            net.w(&r.patch_w)?,
            self.patch_layer(),
        )
    }

    /// `patch_embed` on the kept patches.
    fn patch_layer(&self) -> Linear {
        Linear {
            rows: self.dims().kept,
            inp: self.model.patch_dim(),
            out: self.model.width,
        }
    }
}

/// Runs one phase of the pass inside an NVTX range of its name, which also labels its error.
fn phase(name: &str, run: impl FnOnce() -> Result<()>) -> Result<()> {
    let _range = nvtx::range(name);
    run().context(name.to_string())
}
