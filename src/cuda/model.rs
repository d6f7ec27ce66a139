//! One micro-batch's LoMaR forward and backward on the GPU, op by op (docs/DESIGN.md
//! §1.2–1.3); the blocks and the head are `block.rs`'s, shared with MAE's pass.
//!
//! Shapes: S sequences, T = 1 + K² tokens, N = S·T rows, Nv / Nm visible / masked patches,
//! D width, P = 3p². The residual stream and its gradient are fp32; GEMM operands are the
//! storage type. Every gradient is added (never written) into the fp32 gradient buffer,
//! already multiplied by the caller's grad_scale, which enters once, at the loss gradient.
//! The linear layers run on cuBLASLt ([`super::linear::LinearLayers`], see `block.rs`).

use anyhow::{Context, Result};

use super::activations::Activations;
use super::attention::AttnShape;
use super::block::{Block, Head, HeadRanges, Mixer, Net, Shared};
use super::device::DevPtr;
use super::launch::MaskedRows;
use super::linear::LayerShapes;
use super::method::Ready;
use super::nvtx;
use super::storage::Storage;
use crate::config::ModelConfig;
use crate::params::ModelRanges;

/// Everything one LoMaR pass reads, borrowed.
pub(super) struct Pass<'a, T: Storage> {
    pub net: Net<'a, T>,
    pub model: &'a ModelConfig,
    pub ranges: &'a ModelRanges,
    /// [1] the loss sum the micro-batch's mean loss is added to.
    pub loss: DevPtr<'a, f32>,
    pub acts: &'a Activations<T>,
}

impl<'a, T: Storage> Pass<'a, T> {
    fn seqs(&self) -> usize {
        self.acts.images_len * self.model.windows_per_image
    }

    /// Queues the whole forward and backward; the mean loss is added to `loss`; `ready`
    /// after the head, each block and the embedding (`dist::buckets::ready_points`).
    /// Each phase and block is an NVTX range, as the error context names it.
    pub fn forward_backward(&self, grad_scale: f32, ready: &mut Ready<'_>) -> Result<()> {
        let phase = |name: &str, run: &dyn Fn() -> Result<()>| {
            let _range = nvtx::range(name);
            run().context(name.to_string())
        };
        let net = &self.net;
        let (a, m, r) = (self.acts, self.model, self.ranges);
        let shared = Shared {
            dx: net.ptr(&a.dx)?,
            dy: net.ptr(&a.dy)?,
            dsmall: net.ptr(&a.dsmall)?,
            dhidden: net.ptr(&a.dhidden)?,
            dqkv: net.ptr(&a.dqkv)?,
        };
        let mixer = Mixer::Window(AttnShape {
            seqs: self.seqs(),
            window: m.window,
            heads: m.heads,
            head_dim: m.head_dim(),
        });
        let block = |l: usize| -> Result<Block<'_, T>> {
            Ok(Block {
                net,
                r: &r.blocks[l],
                acts: &a.blocks[l],
                shared,
                mixer,
                rows: self.seqs() * m.seq_len(),
                width: m.width,
                x_in: net.ptr(&a.resid[2 * l])?,
                x_mid: net.ptr(&a.resid[2 * l + 1])?,
                x_out: net.ptr(&a.resid[2 * l + 2])?,
            })
        };
        let head = Head {
            net,
            ranges: HeadRanges {
                norm_w: &r.norm_w,
                norm_b: &r.norm_b,
                head_w: &r.head_w,
                head_b: &r.head_b,
                last_fc2_b: &r.blocks[m.depth - 1].fc2_b,
            },
            acts: &a.head,
            rows: MaskedRows::new(m, self.seqs(), m.width),
            patch_dim: m.patch_dim(),
            x_last: net.ptr(&a.resid[2 * m.depth])?,
            mask_index: net.ptr(&a.input.mask_index)?,
            targets: net.ptr(&a.input.targets)?,
            loss: self.loss,
        };

        phase("patch embedding forward", &|| self.embed_forward())?;
        for l in 0..m.depth {
            phase(&format!("block {l} forward"), &|| block(l)?.forward())?;
        }
        phase("head and loss", &|| {
            head.run(grad_scale, shared.dx, shared.dy)
        })?;
        ready(r.norm_w.start)?;
        for l in (0..m.depth).rev() {
            phase(&format!("block {l} backward"), &|| {
                let below = l.checked_sub(1).map(|b| net.g(&r.blocks[b].fc2_b));
                block(l)?.backward(below.transpose()?)
            })?;
            // Also final before this block's start: the fc2 bias of the block below,
            // which this block's backward added.
            ready(r.blocks[l].norm1_w.start)?;
        }
        phase("patch embedding backward", &|| self.embed_backward())?;
        ready(r.patch_w.start)
    }

    fn embed_forward(&self) -> Result<()> {
        let (net, a, m, r) = (&self.net, self.acts, self.model, self.ranges);
        a.input
            .gather_windows(net.gpu, net.kernels, m, self.seqs())?;
        // The patch bias is added with the tokens, where its gradient is summed too.
        net.linear().linear_forward(
            net.ptr(&a.emb)?,
            net.ptr(&a.input.patches)?,
            net.w(&r.patch_w)?,
            None,
            LayerShapes::new(m, self.seqs()).patch,
        )?;
        net.kernels.assemble_tokens_forward(
            net.ptr(&a.emb)?,
            net.p(&r.patch_b)?,
            net.p(&r.cls_token)?,
            net.p(&r.mask_token)?,
            net.ptr(&a.input.pos_slot)?,
            net.ptr(&a.resid[0])?,
            m,
            self.seqs(),
        )
    }

    /// d cls, d mask_token, d patch bias and d W_pe from the residual gradient at the input.
    fn embed_backward(&self) -> Result<()> {
        let (net, a, m, r) = (&self.net, self.acts, self.model, self.ranges);
        net.kernels.assemble_tokens_backward(
            net.ptr(&a.dx)?,
            net.ptr(&a.input.pos_slot)?,
            net.ptr(&a.demb)?,
            net.scratch,
            net.g(&r.cls_token)?,
            net.g(&r.mask_token)?,
            net.g(&r.patch_b)?,
            m,
            self.seqs(),
        )?;
        net.linear().linear_backward(
            None,
            net.g(&r.patch_w)?,
            None,
            net.ptr(&a.demb)?,
            net.ptr(&a.input.patches)?,
            net.w(&r.patch_w)?,
            LayerShapes::new(m, self.seqs()).patch,
        )
    }
}
