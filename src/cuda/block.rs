//! What LoMaR's pass (`model.rs`) and MAE's (`mae.rs`) share: a transformer block's
//! forward and backward, generic over its attention, and the final norm, prediction head
//! and masked MSE on the masked tokens (docs/DESIGN.md §1.2–1.3, §7.2).
//!
//! Shapes: N token rows, D width, H = 4D hidden, Nm masked rows, P = 3p². The residual
//! stream and its gradient are fp32; GEMM operands are the storage type. Every gradient is
//! added (never written) into the fp32 gradient buffer. The linear layers run on cuBLASLt
//! ([`LinearLayers`]): the qkv and fc1 biases in the GEMM's epilogue, proj and fc2 adding
//! their branch and bias straight into the fp32 residual stream, the qkv and head bias
//! gradients from BGRADB.

use std::ops::Range;

use anyhow::Result;
use cudarc::driver::CudaSlice;

use super::activations::{BlockActivations, HeadActivations};
use super::attention::{AttnShape, AttnTuning};
use super::blaslt::{BlasLt, Linear};
use super::device::{DevPtr, Gpu};
use super::global_attention::GlobalAttnShape;
use super::kernels::Kernels;
use super::launch::MaskedRows;
use super::linear::{BlockShapes, LinearLayers};
use super::storage::Storage;
use crate::params::BlockRanges;

/// What every op of a pass computes with: the kernels, and the flat parameter buffers
/// addressed by [`crate::params::ParamLayout`] ranges. Kernels write through device
/// addresses, so a pass needs no mutable borrows.
pub(super) struct Net<'a, T: Storage> {
    pub gpu: &'a Gpu,
    pub kernels: &'a Kernels<T>,
    pub blas: &'a BlasLt,
    /// fp32 master weights: LayerNorm, biases, tokens, bias tables.
    pub master: DevPtr<'a, f32>,
    /// The storage copy of the weights: GEMM operands.
    pub shadow: DevPtr<'a, T>,
    pub grads: DevPtr<'a, f32>,
    pub scratch: DevPtr<'a, f32>,
}

impl<'a, T: Storage> Net<'a, T> {
    pub fn ptr<'b, U>(&self, s: &'b CudaSlice<U>) -> Result<DevPtr<'b, U>> {
        self.gpu.ptr(s)
    }

    /// A parameter in fp32.
    pub fn p(&self, r: &Range<usize>) -> Result<DevPtr<'a, f32>> {
        self.master.range(r.clone())
    }

    /// A weight in storage type.
    pub fn w(&self, r: &Range<usize>) -> Result<DevPtr<'a, T>> {
        self.shadow.range(r.clone())
    }

    /// A parameter's gradient.
    pub fn g(&self, r: &Range<usize>) -> Result<DevPtr<'a, f32>> {
        self.grads.range(r.clone())
    }

    /// The linear layers' products, with the scratch their epilogues need.
    pub fn linear(&self) -> LinearLayers<'a, T> {
        LinearLayers {
            lt: self.blas,
            kernels: self.kernels,
            scratch: self.scratch,
        }
    }
}

/// The attention of a block.
#[derive(Clone, Copy)]
pub(super) enum Mixer<'a> {
    /// LoMaR's windows, with the block's relative position bias table.
    Window(AttnShape),
    /// MAE's whole sequences without a bias; `delta` `[S, h, T]` is its backward's scratch.
    Global {
        shape: GlobalAttnShape,
        delta: DevPtr<'a, f32>,
    },
}

/// The buffers the blocks of a stack share, each holding at least N rows.
#[derive(Clone, Copy)]
pub(super) struct Shared<'a, T> {
    /// [N, D] the residual-stream gradient, and its storage copy (a GEMM operand).
    pub dx: DevPtr<'a, f32>,
    pub dy: DevPtr<'a, T>,
    /// [N, D] gradient of a LayerNorm output or of the attention output.
    pub dsmall: DevPtr<'a, T>,
    /// [N, H] gradient of the GELU output, then of its input.
    pub dhidden: DevPtr<'a, T>,
    /// [N, 3D]
    pub dqkv: DevPtr<'a, T>,
}

/// One block of a stack over N token rows of width D.
pub(super) struct Block<'a, T: Storage> {
    pub net: &'a Net<'a, T>,
    pub r: &'a BlockRanges,
    pub acts: &'a BlockActivations<T>,
    pub shared: Shared<'a, T>,
    pub mixer: Mixer<'a>,
    pub rows: usize,
    pub width: usize,
    /// [N, D] the residual stream at the block's input, after attention, at its output.
    pub x_in: DevPtr<'a, f32>,
    pub x_mid: DevPtr<'a, f32>,
    pub x_out: DevPtr<'a, f32>,
}

impl<T: Storage> Block<'_, T> {
    /// x_mid = x_in + proj(attn(LN1(x_in))); x_out = x_mid + fc2(gelu(fc1(LN2(x_mid)))).
    pub fn forward(&self) -> Result<()> {
        let (net, r, ba) = (self.net, self.r, self.acts);
        let (k, lin) = (net.kernels, net.linear());
        let sh = BlockShapes::new(self.rows, self.width);
        let (n, d) = (self.rows, self.width);
        let (x_in, x_mid, x_out) = (self.x_in, self.x_mid, self.x_out);

        k.layernorm_forward(
            x_in,
            net.p(&r.norm1_w)?,
            net.p(&r.norm1_b)?,
            net.ptr(&ba.ln1)?,
            net.ptr(&ba.ln1_mean)?,
            net.ptr(&ba.ln1_rstd)?,
            n,
            d,
        )?;
        lin.linear_forward(
            net.ptr(&ba.qkv)?,
            net.ptr(&ba.ln1)?,
            net.w(&r.qkv_w)?,
            Some(net.p(&r.qkv_b)?),
            sh.qkv,
        )?;
        match self.mixer {
            Mixer::Window(shape) => k.attention_forward(
                net.ptr(&ba.qkv)?,
                net.p(&r.rel_bias)?,
                net.ptr(&ba.attn)?,
                net.ptr(&ba.lse)?,
                shape,
                AttnTuning::default(),
            )?,
            Mixer::Global { shape, .. } => k.global_attention_forward(
                net.ptr(&ba.qkv)?,
                net.ptr(&ba.attn)?,
                net.ptr(&ba.lse)?,
                shape,
            )?,
        }
        lin.linear_forward_residual(
            x_mid,
            x_in,
            net.ptr(&ba.attn)?,
            net.w(&r.proj_w)?,
            net.p(&r.proj_b)?,
            sh.proj,
        )?;

        k.layernorm_forward(
            x_mid,
            net.p(&r.norm2_w)?,
            net.p(&r.norm2_b)?,
            net.ptr(&ba.ln2)?,
            net.ptr(&ba.ln2_mean)?,
            net.ptr(&ba.ln2_rstd)?,
            n,
            d,
        )?;
        // fc1's bias in the epilogue rather than in the GELU kernel: the kernel then reads
        // `pre` and writes `act` (2 N·H values) instead of also writing `pre` back with the
        // bias (3), and `pre` is rounded to storage once instead of twice.
        lin.linear_forward(
            net.ptr(&ba.pre)?,
            net.ptr(&ba.ln2)?,
            net.w(&r.fc1_w)?,
            Some(net.p(&r.fc1_b)?),
            sh.fc1,
        )?;
        k.gelu_forward(net.ptr(&ba.pre)?, net.ptr(&ba.act)?, n, sh.fc1.out)?;
        lin.linear_forward_residual(
            x_out,
            x_mid,
            net.ptr(&ba.act)?,
            net.w(&r.fc2_w)?,
            net.p(&r.fc2_b)?,
            sh.fc2,
        )
    }

    /// Takes `dx` = d x_out to d x_in, adding every parameter gradient of the block.
    /// On entry `dy` holds d x_out in storage type and the fc2 bias gradient is already
    /// added. `below_fc2_b` is the fc2 bias of the block below, if one feeds x_in: then
    /// `dy` and that gradient are made for it the same way; else `dy` is left stale.
    pub fn backward(&self, below_fc2_b: Option<DevPtr<f32>>) -> Result<()> {
        let (net, r, ba) = (self.net, self.r, self.acts);
        let (k, lin) = (net.kernels, net.linear());
        let sh = BlockShapes::new(self.rows, self.width);
        let (n, d, h) = (self.rows, self.width, sh.fc1.out);
        let Shared {
            dx,
            dy,
            dsmall,
            dhidden,
            dqkv,
        } = self.shared;

        // MLP branch: dx holds d x_out, which is also the gradient of fc2's output. The
        // proj and fc2 bias gradients are not BGRADB's: that would sum dy, rounded to
        // storage, while the LayerNorm backward that makes dx sums it in fp32 on its way.
        lin.linear_backward(
            Some(dhidden),
            net.g(&r.fc2_w)?,
            None,
            dy,
            net.ptr(&ba.act)?,
            net.w(&r.fc2_w)?,
            sh.fc2,
        )?;
        // fc1's bias gradient stays in the GELU backward, which reads d pre anyway.
        k.gelu_backward(
            net.ptr(&ba.pre)?,
            dhidden,
            n,
            h,
            net.scratch,
            net.g(&r.fc1_b)?,
        )?;
        lin.linear_backward(
            Some(dsmall),
            net.g(&r.fc1_w)?,
            None,
            dhidden,
            net.ptr(&ba.ln2)?,
            net.w(&r.fc1_w)?,
            sh.fc1,
        )?;
        k.layernorm_backward(
            self.x_mid,
            dsmall,
            net.p(&r.norm2_w)?,
            net.ptr(&ba.ln2_mean)?,
            net.ptr(&ba.ln2_rstd)?,
            dx,
            Some(dy),
            net.g(&r.norm2_w)?,
            net.g(&r.norm2_b)?,
            Some(net.g(&r.proj_b)?),
            net.scratch,
            n,
            d,
        )?;

        // Attention branch: dx now holds d x_mid, dy its storage copy.
        lin.linear_backward(
            Some(dsmall),
            net.g(&r.proj_w)?,
            None,
            dy,
            net.ptr(&ba.attn)?,
            net.w(&r.proj_w)?,
            sh.proj,
        )?;
        match self.mixer {
            Mixer::Window(shape) => k.attention_backward(
                net.ptr(&ba.qkv)?,
                net.p(&r.rel_bias)?,
                net.ptr(&ba.attn)?,
                dsmall,
                net.ptr(&ba.lse)?,
                dqkv,
                net.g(&r.rel_bias)?,
                shape,
                AttnTuning::default(),
            )?,
            Mixer::Global { shape, delta } => k.global_attention_backward(
                net.ptr(&ba.qkv)?,
                net.ptr(&ba.attn)?,
                dsmall,
                net.ptr(&ba.lse)?,
                delta,
                dqkv,
                shape,
            )?,
        }
        lin.linear_backward(
            Some(dsmall),
            net.g(&r.qkv_w)?,
            Some(net.g(&r.qkv_b)?),
            dqkv,
            net.ptr(&ba.ln1)?,
            net.w(&r.qkv_w)?,
            sh.qkv,
        )?;
        k.layernorm_backward(
            self.x_in,
            dsmall,
            net.p(&r.norm1_w)?,
            net.ptr(&ba.ln1_mean)?,
            net.ptr(&ba.ln1_rstd)?,
            dx,
            below_fc2_b.map(|_| dy),
            net.g(&r.norm1_w)?,
            net.g(&r.norm1_b)?,
            below_fc2_b,
            net.scratch,
            n,
            d,
        )
    }
}

/// The parameters of the final norm and the prediction head.
pub(super) struct HeadRanges<'a> {
    pub norm_w: &'a Range<usize>,
    pub norm_b: &'a Range<usize>,
    /// `[P, D]` and `[P]`.
    pub head_w: &'a Range<usize>,
    pub head_b: &'a Range<usize>,
    /// The fc2 bias of the stack's last block, whose output the head reads.
    pub last_fc2_b: &'a Range<usize>,
}

/// The final LayerNorm and the prediction head on the masked tokens of the last residual
/// snapshot `x_last` `[S, T, D]`, the masked MSE against `targets` `[Nm, P]`, and the
/// backward down to the residual gradient.
pub(super) struct Head<'a, T: Storage> {
    pub net: &'a Net<'a, T>,
    pub ranges: HeadRanges<'a>,
    pub acts: &'a HeadActivations<T>,
    pub rows: MaskedRows,
    pub patch_dim: usize,
    pub x_last: DevPtr<'a, f32>,
    pub mask_index: DevPtr<'a, u32>,
    pub targets: DevPtr<'a, f32>,
    /// [1] the loss sum the micro-batch's mean loss is added to.
    pub loss: DevPtr<'a, f32>,
}

impl<T: Storage> Head<'_, T> {
    /// The forward, the loss (times `grad_scale` in its gradient) and the backward: `dx`
    /// `[S, T, D]` becomes d x_last (zero except at masked tokens), `dy` its storage copy,
    /// and the last block's fc2 bias gradient is added.
    pub fn run(&self, grad_scale: f32, dx: DevPtr<f32>, dy: DevPtr<T>) -> Result<()> {
        let (net, r, a) = (self.net, &self.ranges, self.acts);
        let k = net.kernels;
        let (nm, d, p) = (
            self.rows.seqs * self.rows.masked,
            self.rows.width,
            self.patch_dim,
        );
        k.gather_masked_tokens(self.x_last, self.mask_index, net.ptr(&a.xm)?, self.rows)?;
        k.layernorm_forward(
            net.ptr(&a.xm)?,
            net.p(r.norm_w)?,
            net.p(r.norm_b)?,
            net.ptr(&a.lnm)?,
            net.ptr(&a.lnm_mean)?,
            net.ptr(&a.lnm_rstd)?,
            nm,
            d,
        )?;
        let layer = Linear {
            rows: nm,
            inp: d,
            out: p,
        };
        // The head bias is added in the loss kernel, which reads pred anyway.
        net.linear().linear_forward(
            net.ptr(&a.pred)?,
            net.ptr(&a.lnm)?,
            net.w(r.head_w)?,
            None,
            layer,
        )?;
        k.masked_mse(
            net.ptr(&a.pred)?,
            net.p(r.head_b)?,
            self.targets,
            net.ptr(&a.dpred)?,
            net.ptr(&a.row_loss)?,
            self.loss,
            nm,
            p,
            grad_scale,
        )?;

        net.linear().linear_backward(
            Some(net.ptr(&a.dlnm)?),
            net.g(r.head_w)?,
            Some(net.g(r.head_b)?),
            net.ptr(&a.dpred)?,
            net.ptr(&a.lnm)?,
            net.w(r.head_w)?,
            layer,
        )?;
        // The last block's fc2 bias gradient is the column sum of d x_out, which is zero
        // outside the masked rows: the column sum of dxm, from the LayerNorm backward.
        net.gpu.memset_zero(net.ptr(&a.dxm)?)?;
        k.layernorm_backward(
            net.ptr(&a.xm)?,
            net.ptr(&a.dlnm)?,
            net.p(r.norm_w)?,
            net.ptr(&a.lnm_mean)?,
            net.ptr(&a.lnm_rstd)?,
            net.ptr(&a.dxm)?,
            None,
            net.g(r.norm_w)?,
            net.g(r.norm_b)?,
            Some(net.g(r.last_fc2_b)?),
            net.scratch,
            nm,
            d,
        )?;
        let n = self.rows.seqs * self.rows.tokens;
        let dx = dx.range(0..n * d)?;
        net.gpu.memset_zero(dx)?;
        k.scatter_masked_tokens(net.ptr(&a.dxm)?, self.mask_index, dx, self.rows)?;
        // The last block's fc2 operand; every later one comes from a LayerNorm backward.
        k.cast_from_f32(dx, dy, n * d)
    }
}
