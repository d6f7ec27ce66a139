//! One micro-batch's forward and backward on the GPU, op by op (docs/DESIGN.md §1.2–1.3).
//!
//! Shapes: S sequences, T = 1 + K² tokens, N = S·T rows, Nv / Nm visible / masked patches,
//! D width, H = 4D hidden, P = 3p². The residual stream and its gradient are fp32; GEMM
//! operands are the storage type. Every gradient is added (never written) into the fp32
//! gradient buffer, already multiplied by the caller's grad_scale, which enters once, at
//! the loss gradient.

use anyhow::{Context, Result};
use cudarc::driver::CudaSlice;

use super::activations::Activations;
use super::attention::{AttnShape, AttnTuning};
use super::device::{DevPtr, Gpu};
use super::gemm::Blas;
use super::kernels::Kernels;
use super::nvtx;
use super::storage::Storage;
use crate::config::ModelConfig;
use crate::params::ModelRanges;

/// Everything one pass reads, borrowed; kernels write through device addresses, so the
/// pass needs no mutable borrows.
pub(super) struct Pass<'a, T: Storage> {
    pub gpu: &'a Gpu,
    pub kernels: &'a Kernels<T>,
    pub blas: &'a Blas,
    pub model: &'a ModelConfig,
    pub ranges: &'a ModelRanges,
    /// fp32 master weights: LayerNorm, biases, tokens, bias tables.
    pub master: DevPtr<'a, f32>,
    /// The storage copy of the weights: GEMM operands.
    pub shadow: DevPtr<'a, T>,
    pub grads: DevPtr<'a, f32>,
    pub scratch: DevPtr<'a, f32>,
    /// [1] the loss sum the micro-batch's mean loss is added to.
    pub loss: DevPtr<'a, f32>,
    pub acts: &'a Activations<T>,
}

impl<'a, T: Storage> Pass<'a, T> {
    fn seqs(&self) -> usize {
        self.acts.images_len * self.model.windows_per_image
    }

    fn ptr<'b, U>(&self, s: &'b CudaSlice<U>) -> Result<DevPtr<'b, U>> {
        self.gpu.ptr(s)
    }

    fn p(&self, r: &std::ops::Range<usize>) -> Result<DevPtr<'a, f32>> {
        self.master.range(r.clone())
    }

    fn w(&self, r: &std::ops::Range<usize>) -> Result<DevPtr<'a, T>> {
        self.shadow.range(r.clone())
    }

    fn g(&self, r: &std::ops::Range<usize>) -> Result<DevPtr<'a, f32>> {
        self.grads.range(r.clone())
    }

    fn attention_shape(&self) -> AttnShape {
        AttnShape {
            seqs: self.seqs(),
            window: self.model.window,
            heads: self.model.heads,
            head_dim: self.model.head_dim(),
        }
    }

    /// Queues the whole forward and backward; the mean loss is added to `loss`.
    /// Each phase and block is an NVTX range, as the error context names it.
    pub fn forward_backward(&self, grad_scale: f32) -> Result<()> {
        let phase = |name: &str, run: &dyn Fn() -> Result<()>| {
            let _range = nvtx::range(name);
            run().context(name.to_string())
        };
        phase("patch embedding forward", &|| self.embed_forward())?;
        for l in 0..self.model.depth {
            phase(&format!("block {l} forward"), &|| self.block_forward(l))?;
        }
        phase("head and loss", &|| self.head(grad_scale))?;
        for l in (0..self.model.depth).rev() {
            phase(&format!("block {l} backward"), &|| self.block_backward(l))?;
        }
        phase("patch embedding backward", &|| self.embed_backward())
    }

    fn embed_forward(&self) -> Result<()> {
        let (a, m, r) = (self.acts, self.model, self.ranges);
        let nv = self.seqs() * m.visible_per_window();
        a.gather_windows(self.gpu, self.kernels, m, self.seqs())?;
        self.blas.linear_forward(
            self.ptr(&a.patches)?,
            self.w(&r.patch_w)?,
            self.ptr(&a.emb)?,
            nv,
            m.patch_dim(),
            m.width,
        )?;
        self.kernels.assemble_tokens_forward(
            self.ptr(&a.emb)?,
            self.p(&r.patch_b)?,
            self.p(&r.cls_token)?,
            self.p(&r.mask_token)?,
            self.ptr(&a.pos_slot)?,
            self.ptr(&a.resid[0])?,
            m,
            self.seqs(),
        )
    }

    /// x_mid = x_in + proj(attn(LN1(x_in))); x_out = x_mid + fc2(gelu(fc1(LN2(x_mid)))).
    fn block_forward(&self, l: usize) -> Result<()> {
        let (a, m, k) = (self.acts, self.model, self.kernels);
        let (r, ba) = (&self.ranges.blocks[l], &a.blocks[l]);
        let (n, d, h) = (self.seqs() * m.seq_len(), m.width, m.hidden());
        let (x_in, x_mid, x_out) = (
            self.ptr(&a.resid[2 * l])?,
            self.ptr(&a.resid[2 * l + 1])?,
            self.ptr(&a.resid[2 * l + 2])?,
        );
        let branch = self.ptr(&a.branch)?;

        k.layernorm_forward(
            x_in,
            self.p(&r.norm1_w)?,
            self.p(&r.norm1_b)?,
            self.ptr(&ba.ln1)?,
            self.ptr(&ba.ln1_mean)?,
            self.ptr(&ba.ln1_rstd)?,
            n,
            d,
        )?;
        self.blas.linear_forward(
            self.ptr(&ba.ln1)?,
            self.w(&r.qkv_w)?,
            self.ptr(&ba.qkv)?,
            n,
            d,
            3 * d,
        )?;
        k.add_bias(self.ptr(&ba.qkv)?, self.p(&r.qkv_b)?, n, 3 * d)?;
        k.attention_forward(
            self.ptr(&ba.qkv)?,
            self.p(&r.rel_bias)?,
            self.ptr(&ba.attn)?,
            self.ptr(&ba.lse)?,
            self.attention_shape(),
            AttnTuning::default(),
        )?;
        self.blas
            .linear_forward(self.ptr(&ba.attn)?, self.w(&r.proj_w)?, branch, n, d, d)?;
        k.residual_add_bias(x_in, branch, self.p(&r.proj_b)?, x_mid, n, d)?;

        k.layernorm_forward(
            x_mid,
            self.p(&r.norm2_w)?,
            self.p(&r.norm2_b)?,
            self.ptr(&ba.ln2)?,
            self.ptr(&ba.ln2_mean)?,
            self.ptr(&ba.ln2_rstd)?,
            n,
            d,
        )?;
        self.blas.linear_forward(
            self.ptr(&ba.ln2)?,
            self.w(&r.fc1_w)?,
            self.ptr(&ba.pre)?,
            n,
            d,
            h,
        )?;
        k.bias_gelu_forward(
            self.ptr(&ba.pre)?,
            self.p(&r.fc1_b)?,
            self.ptr(&ba.act)?,
            n,
            h,
        )?;
        self.blas
            .linear_forward(self.ptr(&ba.act)?, self.w(&r.fc2_w)?, branch, n, h, d)?;
        k.residual_add_bias(x_mid, branch, self.p(&r.fc2_b)?, x_out, n, d)
    }

    /// Final norm and head on the masked tokens, the loss with its gradient, and the
    /// backward down to the residual gradient `dx` (zero except at masked tokens).
    fn head(&self, grad_scale: f32) -> Result<()> {
        let (a, m, k, r) = (self.acts, self.model, self.kernels, self.ranges);
        let (nm, d, p) = (self.seqs() * m.masked_per_window(), m.width, m.patch_dim());
        let x_last = self.ptr(&a.resid[2 * m.depth])?;
        k.gather_masked_tokens(
            x_last,
            self.ptr(&a.mask_index)?,
            self.ptr(&a.xm)?,
            m,
            self.seqs(),
        )?;
        k.layernorm_forward(
            self.ptr(&a.xm)?,
            self.p(&r.norm_w)?,
            self.p(&r.norm_b)?,
            self.ptr(&a.lnm)?,
            self.ptr(&a.lnm_mean)?,
            self.ptr(&a.lnm_rstd)?,
            nm,
            d,
        )?;
        self.blas.linear_forward(
            self.ptr(&a.lnm)?,
            self.w(&r.head_w)?,
            self.ptr(&a.pred)?,
            nm,
            d,
            p,
        )?;
        k.masked_mse(
            self.ptr(&a.pred)?,
            self.p(&r.head_b)?,
            self.ptr(&a.targets)?,
            self.ptr(&a.dpred)?,
            self.ptr(&a.row_loss)?,
            self.loss,
            nm,
            p,
            grad_scale,
        )?;

        k.column_sum(self.ptr(&a.dpred)?, nm, p, self.scratch, self.g(&r.head_b)?)?;
        self.blas.linear_backward_weight(
            self.ptr(&a.dpred)?,
            self.ptr(&a.lnm)?,
            self.g(&r.head_w)?,
            nm,
            d,
            p,
        )?;
        self.blas.linear_backward_input(
            self.ptr(&a.dpred)?,
            self.w(&r.head_w)?,
            self.ptr(&a.dlnm)?,
            nm,
            d,
            p,
        )?;
        // The last block's fc2 bias gradient is the column sum of d x_out, which is zero
        // outside the masked rows: the column sum of dxm, from the LayerNorm backward.
        self.gpu.memset_zero(self.ptr(&a.dxm)?)?;
        k.layernorm_backward(
            self.ptr(&a.xm)?,
            self.ptr(&a.dlnm)?,
            self.p(&r.norm_w)?,
            self.ptr(&a.lnm_mean)?,
            self.ptr(&a.lnm_rstd)?,
            self.ptr(&a.dxm)?,
            None,
            self.g(&r.norm_w)?,
            self.g(&r.norm_b)?,
            Some(self.g(&r.blocks[m.depth - 1].fc2_b)?),
            self.scratch,
            nm,
            d,
        )?;
        self.gpu.memset_zero(self.ptr(&a.dx)?)?;
        k.scatter_masked_tokens(
            self.ptr(&a.dxm)?,
            self.ptr(&a.mask_index)?,
            self.ptr(&a.dx)?,
            m,
            self.seqs(),
        )?;
        // The last block's fc2 operand; every later one comes from a LayerNorm backward.
        let n = self.seqs() * m.seq_len();
        k.cast_from_f32(self.ptr(&a.dx)?, self.ptr(&a.dy)?, n * d)
    }

    /// Takes `dx` = d x_out to d x_in, adding every parameter gradient of block `l`.
    /// On entry `dy` holds d x_out in storage type and the fc2 bias gradient is already
    /// added; on leaving, the same holds for block `l - 1`.
    fn block_backward(&self, l: usize) -> Result<()> {
        let (a, m, k) = (self.acts, self.model, self.kernels);
        let (r, ba) = (&self.ranges.blocks[l], &a.blocks[l]);
        let (n, d, h) = (self.seqs() * m.seq_len(), m.width, m.hidden());
        let (dx, dy, dsmall) = (self.ptr(&a.dx)?, self.ptr(&a.dy)?, self.ptr(&a.dsmall)?);
        let (dhidden, dqkv) = (self.ptr(&a.dhidden)?, self.ptr(&a.dqkv)?);
        // The block below, whose fc2 bias and operand the last LayerNorm backward feeds.
        let below = l.checked_sub(1).map(|b| &self.ranges.blocks[b]);

        // MLP branch: dx holds d x_out, which is also the gradient of fc2's output.
        self.blas
            .linear_backward_weight(dy, self.ptr(&ba.act)?, self.g(&r.fc2_w)?, n, h, d)?;
        self.blas
            .linear_backward_input(dy, self.w(&r.fc2_w)?, dhidden, n, h, d)?;
        k.gelu_backward(
            self.ptr(&ba.pre)?,
            dhidden,
            n,
            h,
            self.scratch,
            self.g(&r.fc1_b)?,
        )?;
        self.blas.linear_backward_weight(
            dhidden,
            self.ptr(&ba.ln2)?,
            self.g(&r.fc1_w)?,
            n,
            d,
            h,
        )?;
        self.blas
            .linear_backward_input(dhidden, self.w(&r.fc1_w)?, dsmall, n, d, h)?;
        k.layernorm_backward(
            self.ptr(&a.resid[2 * l + 1])?,
            dsmall,
            self.p(&r.norm2_w)?,
            self.ptr(&ba.ln2_mean)?,
            self.ptr(&ba.ln2_rstd)?,
            dx,
            Some(dy),
            self.g(&r.norm2_w)?,
            self.g(&r.norm2_b)?,
            Some(self.g(&r.proj_b)?),
            self.scratch,
            n,
            d,
        )?;

        // Attention branch: dx now holds d x_mid, dy its storage copy.
        self.blas
            .linear_backward_weight(dy, self.ptr(&ba.attn)?, self.g(&r.proj_w)?, n, d, d)?;
        self.blas
            .linear_backward_input(dy, self.w(&r.proj_w)?, dsmall, n, d, d)?;
        k.attention_backward(
            self.ptr(&ba.qkv)?,
            self.p(&r.rel_bias)?,
            self.ptr(&ba.attn)?,
            dsmall,
            self.ptr(&ba.lse)?,
            dqkv,
            self.g(&r.rel_bias)?,
            self.attention_shape(),
            AttnTuning::default(),
        )?;
        k.column_sum(dqkv, n, 3 * d, self.scratch, self.g(&r.qkv_b)?)?;
        self.blas.linear_backward_weight(
            dqkv,
            self.ptr(&ba.ln1)?,
            self.g(&r.qkv_w)?,
            n,
            d,
            3 * d,
        )?;
        self.blas
            .linear_backward_input(dqkv, self.w(&r.qkv_w)?, dsmall, n, d, 3 * d)?;
        k.layernorm_backward(
            self.ptr(&a.resid[2 * l])?,
            dsmall,
            self.p(&r.norm1_w)?,
            self.ptr(&ba.ln1_mean)?,
            self.ptr(&ba.ln1_rstd)?,
            dx,
            below.map(|_| dy),
            self.g(&r.norm1_w)?,
            self.g(&r.norm1_b)?,
            below.map(|b| self.g(&b.fc2_b)).transpose()?,
            self.scratch,
            n,
            d,
        )
    }

    /// d cls, d mask_token, d patch bias and d W_pe from the residual gradient at the input.
    fn embed_backward(&self) -> Result<()> {
        let (a, m, r) = (self.acts, self.model, self.ranges);
        let nv = self.seqs() * m.visible_per_window();
        self.kernels.assemble_tokens_backward(
            self.ptr(&a.dx)?,
            self.ptr(&a.pos_slot)?,
            self.ptr(&a.demb)?,
            self.scratch,
            self.g(&r.cls_token)?,
            self.g(&r.mask_token)?,
            self.g(&r.patch_b)?,
            m,
            self.seqs(),
        )?;
        self.blas.linear_backward_weight(
            self.ptr(&a.demb)?,
            self.ptr(&a.patches)?,
            self.g(&r.patch_w)?,
            nv,
            m.patch_dim(),
            m.width,
        )
    }
}
