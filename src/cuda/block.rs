//! What LoMaR's pass (`model.rs`) and MAE's (`mae.rs`) share: a transformer block's
//! forward and backward, generic over its attention, and the final norm, prediction head
//! and masked MSE on the masked tokens (docs/DESIGN.md §1.2–1.3, §7.2).
//!
//! Shapes: N token rows, D width, H = 4D hidden, Nm masked rows, P = 3p². The residual
//! stream and its gradient are fp32; GEMM operands are the storage type. Every gradient is
//! added (never written) into the fp32 gradient buffer.

use std::ops::Range;

use anyhow::Result;
use cudarc::driver::CudaSlice;

use super::activations::{BlockActivations, HeadActivations};
use super::attention::{AttnShape, AttnTuning};
use super::device::{DevPtr, Gpu};
use super::gemm::Blas;
use super::global_attention::GlobalAttnShape;
use super::kernels::Kernels;
use super::launch::MaskedRows;
use super::storage::Storage;
use crate::config::MLP_RATIO;
use crate::params::BlockRanges;

/// What every op of a pass computes with: the kernels, and the flat parameter buffers
/// addressed by [`crate::params::ParamLayout`] ranges. Kernels write through device
/// addresses, so a pass needs no mutable borrows.
pub(super) struct Net<'a, T: Storage> {
    pub gpu: &'a Gpu,
    pub kernels: &'a Kernels<T>,
    pub blas: &'a Blas,
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
    /// [N, D] a branch's output projection before the residual add.
    pub branch: DevPtr<'a, T>,
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
        let (k, blas) = (net.kernels, net.blas);
        let (n, d, h) = (self.rows, self.width, MLP_RATIO * self.width);
        let (x_in, x_mid, x_out, branch) = (self.x_in, self.x_mid, self.x_out, self.shared.branch);

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
        blas.linear_forward(
            net.ptr(&ba.ln1)?,
            net.w(&r.qkv_w)?,
            net.ptr(&ba.qkv)?,
            n,
            d,
            3 * d,
        )?;
        k.add_bias(net.ptr(&ba.qkv)?, net.p(&r.qkv_b)?, n, 3 * d)?;
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
        blas.linear_forward(net.ptr(&ba.attn)?, net.w(&r.proj_w)?, branch, n, d, d)?;
        k.residual_add_bias(x_in, branch, net.p(&r.proj_b)?, x_mid, n, d)?;

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
        blas.linear_forward(
            net.ptr(&ba.ln2)?,
            net.w(&r.fc1_w)?,
            net.ptr(&ba.pre)?,
            n,
            d,
            h,
        )?;
        k.bias_gelu_forward(net.ptr(&ba.pre)?, net.p(&r.fc1_b)?, net.ptr(&ba.act)?, n, h)?;
        blas.linear_forward(net.ptr(&ba.act)?, net.w(&r.fc2_w)?, branch, n, h, d)?;
        k.residual_add_bias(x_mid, branch, net.p(&r.fc2_b)?, x_out, n, d)
    }

    /// Takes `dx` = d x_out to d x_in, adding every parameter gradient of the block.
    /// On entry `dy` holds d x_out in storage type and the fc2 bias gradient is already
    /// added. `below_fc2_b` is the fc2 bias of the block below, if one feeds x_in: then
    /// `dy` and that gradient are made for it the same way; else `dy` is left stale.
    pub fn backward(&self, below_fc2_b: Option<DevPtr<f32>>) -> Result<()> {
        let (net, r, ba) = (self.net, self.r, self.acts);
        let (k, blas) = (net.kernels, net.blas);
        let (n, d, h) = (self.rows, self.width, MLP_RATIO * self.width);
        let Shared {
            dx,
            dy,
            dsmall,
            dhidden,
            dqkv,
            ..
        } = self.shared;

        // MLP branch: dx holds d x_out, which is also the gradient of fc2's output.
        blas.linear_backward_weight(dy, net.ptr(&ba.act)?, net.g(&r.fc2_w)?, n, h, d)?;
        blas.linear_backward_input(dy, net.w(&r.fc2_w)?, dhidden, n, h, d)?;
        k.gelu_backward(
            net.ptr(&ba.pre)?,
            dhidden,
            n,
            h,
            net.scratch,
            net.g(&r.fc1_b)?,
        )?;
        blas.linear_backward_weight(dhidden, net.ptr(&ba.ln2)?, net.g(&r.fc1_w)?, n, d, h)?;
        blas.linear_backward_input(dhidden, net.w(&r.fc1_w)?, dsmall, n, d, h)?;
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
        blas.linear_backward_weight(dy, net.ptr(&ba.attn)?, net.g(&r.proj_w)?, n, d, d)?;
        blas.linear_backward_input(dy, net.w(&r.proj_w)?, dsmall, n, d, d)?;
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
        k.column_sum(dqkv, n, 3 * d, net.scratch, net.g(&r.qkv_b)?)?;
        blas.linear_backward_weight(dqkv, net.ptr(&ba.ln1)?, net.g(&r.qkv_w)?, n, d, 3 * d)?;
        blas.linear_backward_input(dqkv, net.w(&r.qkv_w)?, dsmall, n, d, 3 * d)?;
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
    /// [1] the mean loss.
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
        net.blas.linear_forward(
            net.ptr(&a.lnm)?,
            net.w(r.head_w)?,
            net.ptr(&a.pred)?,
            nm,
            d,
            p,
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

        k.column_sum(net.ptr(&a.dpred)?, nm, p, net.scratch, net.g(r.head_b)?)?;
        net.blas.linear_backward_weight(
            net.ptr(&a.dpred)?,
            net.ptr(&a.lnm)?,
            net.g(r.head_w)?,
            nm,
            d,
            p,
        )?;
        net.blas.linear_backward_input(
            net.ptr(&a.dpred)?,
            net.w(r.head_w)?,
            net.ptr(&a.dlnm)?,
            nm,
            d,
            p,
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
