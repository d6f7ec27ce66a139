//! Device buffers for one batch shape: the uploaded batch, everything the forward saves for
//! the backward, and the backward's scratch. Allocated once per batch size and reused.
//!
//! Shapes use S sequences (images × windows), T = 1 + K² tokens, N = S·T token rows,
//! V / M visible / masked positions per window, Nv = S·V, Nm = S·M, D width, H = 4D, P = 3p².

use anyhow::{bail, Context, Result};
use cudarc::driver::CudaSlice;

use super::device::Gpu;
use super::kernels::Kernels;
use super::pixels::{PixelSource, PixelUpload, PixelValue, StagedPixels};
use super::storage::Storage;
use crate::config::ModelConfig;
use crate::data::batch::{Batch, Pixels};

/// What one transformer block saves for its backward.
pub(super) struct BlockActivations<T> {
    /// [N, D] LN1 output, the qkv GEMM's input.
    pub ln1: CudaSlice<T>,
    pub ln1_mean: CudaSlice<f32>,
    pub ln1_rstd: CudaSlice<f32>,
    /// [N, 3D] with bias.
    pub qkv: CudaSlice<T>,
    /// [N, D] attention output, heads concatenated.
    pub attn: CudaSlice<T>,
    /// [S, h, T] log-sum-exp of each softmax row.
    pub lse: CudaSlice<f32>,
    pub ln2: CudaSlice<T>,
    pub ln2_mean: CudaSlice<f32>,
    pub ln2_rstd: CudaSlice<f32>,
    /// [N, H] fc1 output with bias, before GELU.
    pub pre: CudaSlice<T>,
    /// [N, H] GELU output, fc2's input.
    pub act: CudaSlice<T>,
}

impl<T: Storage> BlockActivations<T> {
    /// The buffers of a block over `rows` tokens of width `d`, hidden width `h` and `lse`
    /// log-sum-exp values (`S·h·T`); `name` labels them in an allocation error.
    pub fn new(gpu: &Gpu, name: &str, rows: usize, d: usize, h: usize, lse: usize) -> Result<Self> {
        let z = |len: usize, what: &str| gpu.zeros::<T>(len, &format!("{name} {what}"));
        let f = |len: usize, what: &str| gpu.zeros::<f32>(len, &format!("{name} {what}"));
        Ok(BlockActivations {
            ln1: z(rows * d, "ln1")?,
            ln1_mean: f(rows, "ln1 mean")?,
            ln1_rstd: f(rows, "ln1 rstd")?,
            qkv: z(rows * 3 * d, "qkv")?,
            attn: z(rows * d, "attention output")?,
            lse: f(lse, "attention lse")?,
            ln2: z(rows * d, "ln2")?,
            ln2_mean: f(rows, "ln2 mean")?,
            ln2_rstd: f(rows, "ln2 rstd")?,
            pre: z(rows * h, "fc1 output")?,
            act: z(rows * h, "GELU output")?,
        })
    }

    /// Values of storage type and of f32 that [`BlockActivations::new`] allocates.
    pub fn sizes(rows: usize, d: usize, h: usize, lse: usize) -> (usize, usize) {
        (rows * (6 * d + 2 * h), 4 * rows + lse)
    }
}

/// The batch as the pass reads it: the uploaded pixels and index tensors, and the patches
/// and targets the window gather makes of them.
pub(super) struct Inputs<T> {
    /// What `pixels` holds: the images or each window's square of them.
    pub source: PixelSource,
    /// [B, 3, H, W] or [S, 3, K·p, K·p], bytes or normalised values as the batches bring
    /// them; made by the first upload.
    pixels: Option<StagedPixels>,
    /// [S, 2] window origins in `pixels`: the batch's, or 0 for squares.
    pub window_origin: CudaSlice<u32>,
    /// [S, M]
    pub mask_index: CudaSlice<u32>,
    /// [S, K²], see [`pos_slots`].
    pub pos_slot: CudaSlice<i32>,
    /// [Nv, P] visible patches, (c, y, x).
    pub patches: CudaSlice<T>,
    /// [Nm, P] loss targets, (y, x, c).
    pub targets: CudaSlice<f32>,
}

/// The final LayerNorm and prediction head on the masked tokens, and their backward.
pub(super) struct HeadActivations<T> {
    /// [Nm, D] masked tokens of the last residual snapshot.
    pub xm: CudaSlice<f32>,
    /// [Nm, D] final LayerNorm of the masked tokens.
    pub lnm: CudaSlice<T>,
    pub lnm_mean: CudaSlice<f32>,
    pub lnm_rstd: CudaSlice<f32>,
    /// [Nm, P] head output without bias, and its gradient.
    pub pred: CudaSlice<T>,
    pub dpred: CudaSlice<T>,
    /// [Nm] squared error per masked token.
    pub row_loss: CudaSlice<f32>,
    /// [Nm, D] gradients of the final LayerNorm's output and input.
    pub dlnm: CudaSlice<T>,
    pub dxm: CudaSlice<f32>,
}

impl<T: Storage> HeadActivations<T> {
    /// The head's buffers for `nm` masked tokens of width `d` and patches of `p` values.
    pub fn new(gpu: &Gpu, nm: usize, d: usize, p: usize) -> Result<Self> {
        Ok(HeadActivations {
            xm: gpu.zeros(nm * d, "masked tokens")?,
            lnm: gpu.zeros(nm * d, "final norm output")?,
            lnm_mean: gpu.zeros(nm, "final norm mean")?,
            lnm_rstd: gpu.zeros(nm, "final norm rstd")?,
            pred: gpu.zeros(nm * p, "predictions")?,
            dpred: gpu.zeros(nm * p, "prediction gradient")?,
            row_loss: gpu.zeros(nm, "row losses")?,
            dlnm: gpu.zeros(nm * d, "final norm output gradient")?,
            dxm: gpu.zeros(nm * d, "masked token gradient")?,
        })
    }

    /// Values of storage type and of f32 that [`HeadActivations::new`] allocates.
    pub fn sizes(nm: usize, d: usize, p: usize) -> (usize, usize) {
        (nm * (2 * d + 2 * p), nm * (2 * d + 3))
    }
}

pub(super) struct Activations<T> {
    pub images_len: usize,
    pub input: Inputs<T>,
    /// [Nv, D] patch embeddings without bias.
    pub emb: CudaSlice<T>,
    /// 2L + 1 residual-stream snapshots [N, D]: block l reads 2l, writes 2l+1 (after
    /// attention) and 2l+2 (after the MLP).
    pub resid: Vec<CudaSlice<f32>>,
    pub blocks: Vec<BlockActivations<T>>,
    pub head: HeadActivations<T>,
    /// [1] one micro-batch's mean loss for the per-call `Backend::forward_backward`
    /// (zeroed, added to by the pass, read back); a training step sums into its own.
    pub loss: CudaSlice<f32>,
    /// [N, D] residual-stream gradient.
    pub dx: CudaSlice<f32>,
    /// [N, D] the residual gradient cast to T, a GEMM operand.
    pub dy: CudaSlice<T>,
    /// [N, D] gradient of a LayerNorm output or of the attention output.
    pub dsmall: CudaSlice<T>,
    /// [N, H] gradient of the GELU output, then of its input.
    pub dhidden: CudaSlice<T>,
    /// [N, 3D]
    pub dqkv: CudaSlice<T>,
    /// [Nv, D] gradient of the patch embeddings.
    pub demb: CudaSlice<T>,
}

impl<T: Storage> Activations<T> {
    pub fn new(gpu: &Gpu, m: &ModelConfig, images_len: usize) -> Result<Self> {
        Self::allocate(gpu, m, images_len).with_context(|| {
            format!(
                "allocating activations for batch {images_len} (about {:.2} GiB); try a smaller batch",
                Self::bytes(m, images_len) as f64 / (1u64 << 30) as f64
            )
        })
    }

    /// Device memory the buffers of batch `images_len` take, for the error message.
    pub fn bytes(m: &ModelConfig, images_len: usize) -> usize {
        let (s, n, nm, nv) = dims(m, images_len);
        let (d, h, p, l) = (m.width, m.hidden(), m.patch_dim(), m.depth);
        let block = BlockActivations::<T>::sizes(n, d, h, s * m.heads * m.seq_len());
        let head = HeadActivations::<T>::sizes(nm, d, p);
        let storage = l * block.0 + nv * 2 * d + n * (5 * d + h) + head.0;
        let fp32 = l * block.1 + (2 * l + 2) * n * d + head.1 + 1;
        storage * std::mem::size_of::<T>() + 4 * fp32 + Inputs::<T>::bytes(m, images_len)
    }

    fn allocate(gpu: &Gpu, m: &ModelConfig, images_len: usize) -> Result<Self> {
        let (s, n, nm, nv) = dims(m, images_len);
        let (d, h, p) = (m.width, m.hidden(), m.patch_dim());
        let blocks = (0..m.depth)
            .map(|l| {
                let lse = s * m.heads * m.seq_len();
                BlockActivations::new(gpu, &format!("block {l}"), n, d, h, lse)
            })
            .collect::<Result<Vec<_>>>()?;
        let resid = (0..2 * m.depth + 1)
            .map(|i| gpu.zeros::<f32>(n * d, &format!("residual stream {i}")))
            .collect::<Result<Vec<_>>>()?;
        Ok(Activations {
            images_len,
            input: Inputs::new(gpu, m, images_len)?,
            emb: gpu.zeros(nv * d, "patch embeddings")?,
            resid,
            blocks,
            head: HeadActivations::new(gpu, nm, d, p)?,
            loss: gpu.zeros(1, "loss")?,
            dx: gpu.zeros(n * d, "residual gradient")?,
            dy: gpu.zeros(n * d, "residual gradient copy")?,
            dsmall: gpu.zeros(n * d, "branch gradient")?,
            dhidden: gpu.zeros(n * h, "MLP hidden gradient")?,
            dqkv: gpu.zeros(n * 3 * d, "qkv gradient")?,
            demb: gpu.zeros(nv * d, "patch embedding gradient")?,
        })
    }

    /// Copies a validated batch into the input buffers.
    pub fn upload(&mut self, gpu: &Gpu, m: &ModelConfig, batch: &Batch) -> Result<()> {
        self.input.upload(gpu, m, batch)
    }
}

impl<T: Storage> Inputs<T> {
    pub fn new(gpu: &Gpu, m: &ModelConfig, images_len: usize) -> Result<Self> {
        let (s, _, nm, nv) = dims(m, images_len);
        let p = m.patch_dim();
        Ok(Inputs {
            source: PixelSource::smaller(m),
            pixels: None,
            window_origin: gpu.zeros(s * 2, "window origins")?,
            mask_index: gpu.zeros(nm, "mask indices")?,
            pos_slot: gpu.zeros(s * m.window_area(), "position slots")?,
            patches: gpu.zeros(nv * p, "visible patches")?,
            targets: gpu.zeros(nm * p, "targets")?,
        })
    }

    /// Device memory of the inputs of batch `images_len`: the index tensors, patches,
    /// targets and the two upload buffers of the pixels, as bytes.
    pub fn bytes(m: &ModelConfig, images_len: usize) -> usize {
        let (s, _, nm, nv) = dims(m, images_len);
        let p = m.patch_dim();
        let index = 2 * s + nm + s * m.window_area();
        nv * p * std::mem::size_of::<T>()
            + 4 * (nm * p + index)
            + 2 * PixelSource::smaller(m).len(s)
    }

    /// Copies a validated batch into the input buffers: the pixels through the pinned
    /// double buffer on its copy stream, the small index tensors directly.
    pub fn upload(&mut self, gpu: &Gpu, m: &ModelConfig, batch: &Batch) -> Result<()> {
        match &batch.images {
            Pixels::Bytes(v) => self.stage_pixels(gpu, m, batch, v)?,
            Pixels::Normalised(v) => self.stage_pixels(gpu, m, batch, v)?,
        }
        let source = self.source;
        // Squares keep the zero origins they were allocated with.
        if !source.crops {
            gpu.write(
                &batch.window_origin,
                &mut self.window_origin,
                "window origins",
            )?;
        }
        gpu.write(&batch.mask_index, &mut self.mask_index, "mask indices")?;
        gpu.write(&pos_slots(batch, m), &mut self.pos_slot, "position slots")
    }

    /// Queues the copy of `images`, the batch's pixels, into the next upload buffer (made
    /// first when the batches bring the other kind of pixels).
    fn stage_pixels<P: PixelValue>(
        &mut self,
        gpu: &Gpu,
        m: &ModelConfig,
        batch: &Batch,
        images: &[P],
    ) -> Result<()> {
        let len = self.source.len(batch.sequences(m));
        if self.pixels.as_mut().and_then(P::upload).is_none() {
            // Free the other kind's buffers before allocating these.
            self.pixels = None;
            self.pixels = Some(P::staged(PixelUpload::new(gpu, len, "images")?));
        }
        let Some(upload) = self.pixels.as_mut().and_then(P::upload) else {
            bail!("the upload buffers of the images are missing");
        };
        let source = self.source;
        upload.stage(gpu, "images", |out| source.fill(images, batch, m, out))
    }

    /// The window gather of the last uploaded batch (`seqs` sequences) into `patches` and
    /// `targets`. The caller marks the upload buffer read ([`Inputs::mark_pixels_read`])
    /// once the pass is queued, outside any graph capture.
    pub fn gather_windows(
        &self,
        gpu: &Gpu,
        kernels: &Kernels<T>,
        m: &ModelConfig,
        seqs: usize,
    ) -> Result<()> {
        match &self.pixels {
            Some(StagedPixels::Bytes(u)) => self.gather_from(u, gpu, kernels, m, seqs),
            Some(StagedPixels::Normalised(u)) => self.gather_from(u, gpu, kernels, m, seqs),
            None => bail!("window gather: no batch has been uploaded"),
        }
    }

    fn gather_from<P: PixelValue>(
        &self,
        upload: &PixelUpload<P>,
        gpu: &Gpu,
        kernels: &Kernels<T>,
        m: &ModelConfig,
        seqs: usize,
    ) -> Result<()> {
        kernels.window_gather(
            gpu.ptr(upload.device())?,
            gpu.ptr(&self.window_origin)?,
            gpu.ptr(&self.pos_slot)?,
            gpu.ptr(&self.patches)?,
            gpu.ptr(&self.targets)?,
            m,
            self.source,
            seqs,
        )
    }

    /// Which upload buffer holds the last uploaded batch: (bytes, not f32 values; buffer 0
    /// or 1). A captured gather reads that one buffer.
    pub fn pixel_slot(&self) -> Option<(bool, usize)> {
        match &self.pixels {
            Some(StagedPixels::Bytes(u)) => Some((true, u.slot())),
            Some(StagedPixels::Normalised(u)) => Some((false, u.slot())),
            None => None,
        }
    }

    /// Records that the gather of the last uploaded batch is queued: the copy after next
    /// into its buffer waits for it.
    pub fn mark_pixels_read(&self, gpu: &Gpu) -> Result<()> {
        match &self.pixels {
            Some(StagedPixels::Bytes(u)) => u.mark_read(gpu),
            Some(StagedPixels::Normalised(u)) => u.mark_read(gpu),
            None => bail!("no batch has been uploaded"),
        }
    }
}

/// (S, N, Nm, Nv) of a batch of `images_len` images.
fn dims(m: &ModelConfig, images_len: usize) -> (usize, usize, usize, usize) {
    let s = images_len * m.windows_per_image;
    (
        s,
        s * m.seq_len(),
        s * m.masked_per_window(),
        s * m.visible_per_window(),
    )
}

/// For every window position `s*K² + i`: its row among the batch's visible patches
/// (`s*V + j`, j counting visible positions in ascending order), or `-(1 + s*M + j)` for the
/// j-th masked position, the row of its loss target and of its head output.
pub fn pos_slots(batch: &Batch, m: &ModelConfig) -> Vec<i32> {
    let (area, v, mk) = (
        m.window_area(),
        m.visible_per_window(),
        m.masked_per_window(),
    );
    let mut slots = Vec::with_capacity(batch.sequences(m) * area);
    for (s, window) in batch.visible_slots(m).chunks(area).enumerate() {
        let mut masked = 0;
        for slot in window {
            slots.push(match slot {
                Some(j) => (s * v + *j as usize) as i32,
                None => {
                    masked += 1;
                    -((s * mk + masked) as i32)
                }
            });
        }
    }
    slots
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::preset;

    #[test]
    fn pos_slots_number_visible_and_masked_rows_in_window_order() {
        let mut m = preset("tiny").unwrap();
        m.window = 2;
        m.mask_ratio = 0.5;
        m.windows_per_image = 2;
        let batch = Batch {
            images_len: 1,
            images: Pixels::Bytes(vec![0; 3 * m.image * m.image]),
            window_origin: vec![0, 0, 1, 1],
            // Window 0 masks positions 1 and 2, window 1 masks 0 and 3.
            mask_index: vec![1, 2, 0, 3],
        };
        batch.validate(&m).unwrap();
        // Visible rows 0,1 | 2,3; masked rows 0,1 | 2,3 encoded as -(1 + row).
        assert_eq!(pos_slots(&batch, &m), vec![0, -1, -2, 1, -3, 2, 3, -4]);
    }
}
