//! MAE's device buffers for one batch size (docs/DESIGN.md §7.2): the batch inputs (the
//! window gather with the whole grid as the window), the slot maps and position tables of
//! the token placements, what the encoder's and the decoder's blocks save, the head's
//! buffers, and the backward's scratch, shared by both stacks at the larger one's size.
//!
//! Shapes: B images, N = G² patches, V kept and M masked each; the encoder's rows
//! Ne = B·(1+V) of width D, the decoder's Nd = B·(1+N) of width Dd; P = 3p².

use anyhow::{Context, Result};
use cudarc::driver::CudaSlice;

use super::activations::{BlockActivations, HeadActivations, Inputs};
use super::device::Gpu;
use super::mae_tokens::{decoder_pos_rows, MaeSlots};
use super::storage::Storage;
use crate::config::{DecoderConfig, ModelConfig, MLP_RATIO};
use crate::cpu::mae::pos_embed::sincos_pos_embed;
use crate::data::batch::Batch;

/// The sizes of an MAE pass over `images` images.
#[derive(Clone, Copy, Debug)]
pub(super) struct MaeDims {
    pub images: usize,
    /// Encoder rows `B·(1+V)`, decoder rows `B·(1+N)`, masked rows `B·M`, kept `B·V`.
    pub enc_rows: usize,
    pub dec_rows: usize,
    pub masked: usize,
    pub kept: usize,
}

impl MaeDims {
    pub fn new(m: &ModelConfig, images: usize) -> MaeDims {
        MaeDims {
            images,
            enc_rows: images * (1 + m.visible_per_window()),
            dec_rows: images * m.seq_len(),
            masked: images * m.masked_per_window(),
            kept: images * m.visible_per_window(),
        }
    }
}

/// The decoder of an MAE model; `ModelConfig::validate` guarantees one.
pub(super) fn decoder(m: &ModelConfig) -> Result<DecoderConfig> {
    m.decoder
        .context("an MAE model needs a decoder (its config has none)")
}

pub(super) struct MaeActivations<T> {
    pub images_len: usize,
    pub input: Inputs<T>,
    /// `[1+N, D]` and `[1+N, Dd]` the fixed sin-cos position tables.
    pub enc_pos: CudaSlice<f32>,
    pub dec_pos: CudaSlice<f32>,
    /// The batch's [`MaeSlots`], and `[Nd]` the decoder's position rows.
    pub enc_slot: CudaSlice<i32>,
    pub enc_pos_row: CudaSlice<i32>,
    pub dec_slot: CudaSlice<i32>,
    pub dec_pos_row: CudaSlice<i32>,
    /// `[B·V, D]` patch embeddings without bias.
    pub emb: CudaSlice<T>,
    /// `2L + 1` encoder residual snapshots `[Ne, D]` (as LoMaR's), and `2Ld + 1` decoder
    /// ones `[Nd, Dd]`.
    pub enc_resid: Vec<CudaSlice<f32>>,
    pub enc_blocks: Vec<BlockActivations<T>>,
    /// `[Ne, D]` the encoder's final norm, its statistics.
    pub enc_normed: CudaSlice<T>,
    pub enc_mean: CudaSlice<f32>,
    pub enc_rstd: CudaSlice<f32>,
    /// `[Ne, Dd]` `decoder_embed`'s output without bias, and its gradient.
    pub dec_emb: CudaSlice<T>,
    pub ddec_emb: CudaSlice<T>,
    pub dec_resid: Vec<CudaSlice<f32>>,
    pub dec_blocks: Vec<BlockActivations<T>>,
    pub head: HeadActivations<T>,
    /// `[1]` one micro-batch's mean loss for the per-call `Backend::forward_backward`
    /// (zeroed, added to by the pass, read back); a training step sums into its own.
    pub loss: CudaSlice<f32>,
    /// The blocks' shared buffers (`block::Shared`), each the larger stack's size.
    pub dx: CudaSlice<f32>,
    pub dy: CudaSlice<T>,
    pub dsmall: CudaSlice<T>,
    pub dhidden: CudaSlice<T>,
    pub dqkv: CudaSlice<T>,
    /// `[B, h, T]` the global attention backward's scratch, the larger stack's size.
    pub delta: CudaSlice<f32>,
    /// `[Ne, D]` gradient of the encoder's final norm output.
    pub denc_normed: CudaSlice<T>,
    /// `[B·V, D]` gradient of the patch embeddings.
    pub demb: CudaSlice<T>,
}

impl<T: Storage> MaeActivations<T> {
    pub fn new(gpu: &Gpu, m: &ModelConfig, images_len: usize) -> Result<Self> {
        Self::allocate(gpu, m, images_len).with_context(|| {
            format!(
                "allocating MAE activations for batch {images_len} (about {:.2} GiB); try a smaller batch",
                Self::bytes(m, images_len).unwrap_or(0) as f64 / (1u64 << 30) as f64
            )
        })
    }

    /// Device memory the buffers of batch `images_len` take, for the error message.
    pub fn bytes(m: &ModelConfig, images_len: usize) -> Result<usize> {
        let (dec, x) = (decoder(m)?, MaeDims::new(m, images_len));
        let (d, dd, p, t) = (m.width, dec.width, m.patch_dim(), m.seq_len());
        let enc_lse = images_len * m.heads * (1 + m.visible_per_window());
        let dec_lse = images_len * dec.heads * t;
        let enc = BlockActivations::<T>::sizes(x.enc_rows, d, m.hidden(), enc_lse);
        let dcb = BlockActivations::<T>::sizes(x.dec_rows, dd, dec.hidden(), dec_lse);
        let head = HeadActivations::<T>::sizes(x.masked, dd, p);
        let wide = (x.enc_rows * d).max(x.dec_rows * dd);
        let storage = m.depth * enc.0
            + dec.depth * dcb.0
            + head.0
            + 2 * x.kept * d
            + x.enc_rows * (2 * d + 2 * dd)
            + (5 + MLP_RATIO) * wide;
        let fp32 = m.depth * enc.1
            + dec.depth * dcb.1
            + head.1
            + t * (d + dd)
            + (2 * m.depth + 1) * x.enc_rows * d
            + (2 * dec.depth + 1) * x.dec_rows * dd
            + 2 * x.enc_rows
            + wide
            + enc_lse.max(dec_lse)
            + 1;
        let index = 2 * x.enc_rows + 2 * x.dec_rows;
        Ok(storage * std::mem::size_of::<T>()
            + 4 * (fp32 + index)
            + Inputs::<T>::bytes(m, images_len))
    }

    fn allocate(gpu: &Gpu, m: &ModelConfig, images_len: usize) -> Result<Self> {
        let (dec, x) = (decoder(m)?, MaeDims::new(m, images_len));
        let (d, dd, t) = (m.width, dec.width, m.seq_len());
        let enc_lse = images_len * m.heads * (1 + m.visible_per_window());
        let dec_lse = images_len * dec.heads * t;
        let stack = |name: &str, depth: usize, rows: usize, width: usize, lse: usize| {
            (0..depth)
                .map(|l| {
                    let label = format!("{name} block {l}");
                    BlockActivations::new(gpu, &label, rows, width, MLP_RATIO * width, lse)
                })
                .collect::<Result<Vec<_>>>()
        };
        let resid = |name: &str, depth: usize, len: usize| {
            (0..2 * depth + 1)
                .map(|i| gpu.zeros::<f32>(len, &format!("{name} residual stream {i}")))
                .collect::<Result<Vec<_>>>()
        };
        let table = |width: usize| -> Vec<f32> {
            sincos_pos_embed(width, m.grid())
                .into_iter()
                .map(|v| v as f32)
                .collect()
        };
        let wide = (x.enc_rows * d).max(x.dec_rows * dd);
        Ok(MaeActivations {
            images_len,
            input: Inputs::new(gpu, m, images_len)?,
            enc_pos: gpu.upload(&table(d), "encoder position embedding")?,
            dec_pos: gpu.upload(&table(dd), "decoder position embedding")?,
            enc_slot: gpu.zeros(x.enc_rows, "encoder slots")?,
            enc_pos_row: gpu.zeros(x.enc_rows, "encoder position rows")?,
            dec_slot: gpu.zeros(x.dec_rows, "decoder slots")?,
            dec_pos_row: gpu.upload(&decoder_pos_rows(m, images_len), "decoder position rows")?,
            emb: gpu.zeros(x.kept * d, "patch embeddings")?,
            enc_resid: resid("encoder", m.depth, x.enc_rows * d)?,
            enc_blocks: stack("encoder", m.depth, x.enc_rows, d, enc_lse)?,
            enc_normed: gpu.zeros(x.enc_rows * d, "encoder norm output")?,
            enc_mean: gpu.zeros(x.enc_rows, "encoder norm mean")?,
            enc_rstd: gpu.zeros(x.enc_rows, "encoder norm rstd")?,
            dec_emb: gpu.zeros(x.enc_rows * dd, "decoder embedding")?,
            ddec_emb: gpu.zeros(x.enc_rows * dd, "decoder embedding gradient")?,
            dec_resid: resid("decoder", dec.depth, x.dec_rows * dd)?,
            dec_blocks: stack("decoder", dec.depth, x.dec_rows, dd, dec_lse)?,
            head: HeadActivations::new(gpu, x.masked, dd, m.patch_dim())?,
            loss: gpu.zeros(1, "loss")?,
            dx: gpu.zeros(wide, "residual gradient")?,
            dy: gpu.zeros(wide, "residual gradient copy")?,
            dsmall: gpu.zeros(wide, "branch gradient")?,
            dhidden: gpu.zeros(MLP_RATIO * wide, "MLP hidden gradient")?,
            dqkv: gpu.zeros(3 * wide, "qkv gradient")?,
            delta: gpu.zeros(enc_lse.max(dec_lse), "attention delta")?,
            denc_normed: gpu.zeros(x.enc_rows * d, "encoder norm output gradient")?,
            demb: gpu.zeros(x.kept * d, "patch embedding gradient")?,
        })
    }

    /// Copies a validated batch into the input buffers and its slot maps.
    pub fn upload(&mut self, gpu: &Gpu, m: &ModelConfig, batch: &Batch) -> Result<()> {
        self.input.upload(gpu, m, batch)?;
        let slots = MaeSlots::new(batch, m);
        gpu.write(&slots.enc_slot, &mut self.enc_slot, "encoder slots")?;
        gpu.write(
            &slots.enc_pos_row,
            &mut self.enc_pos_row,
            "encoder position rows",
        )?;
        gpu.write(&slots.dec_slot, &mut self.dec_slot, "decoder slots")
    }
}
