//! The linear layers of a pass (LoMaR's and MAE's), named as the CPU ops in
//! `cpu::ops::linear`: each product runs on cuBLASLt ([`BlasLt`]) with the bias, the
//! residual add and the bias gradient fused into its epilogue, plus the two small steps
//! those epilogues need around them:
//!
//! - cuBLASLt's BIAS epilogue may read the bias with 16-byte loads, and its alignment
//!   preference covers A, B, C, D but not the bias. A bias inside the flat parameter buffer
//!   is only 4-byte aligned in general, so one under 16 bytes is first copied to the start
//!   of the (256-byte aligned) scratch buffer.
//! - BGRADB writes the bias gradient, while gradients accumulate across micro-batches. So
//!   BGRADB writes into the scratch buffer and `partials_finish` (one chunk) adds it into
//!   the gradient: one fixed-order add, so the result is deterministic.
//!
//! Everything is queued on the one stream, so the scratch is free again as soon as the
//! launch that reads it is queued.

use anyhow::{Context, Result};

use super::blaslt::{alignment, BlasLt, Linear, VECTOR_ALIGN};
use super::device::DevPtr;
use super::kernels::Kernels;
use super::storage::Storage;
use crate::config::{ModelConfig, MLP_RATIO};

/// The linear-layer products of one pass, borrowed from the engine that owns the handle,
/// the kernels and the scratch.
pub struct LinearLayers<'a, T: Storage> {
    pub lt: &'a BlasLt,
    pub kernels: &'a Kernels<T>,
    /// f32 scratch of at least the widest layer's outputs, from the start of a device
    /// allocation (so 256-byte aligned).
    pub scratch: DevPtr<'a, f32>,
}

impl<'a, T: Storage> LinearLayers<'a, T> {
    /// x [rows, in] T, w [out, in] T, b [out] f32 -> y [rows, out] T = x·wᵀ (+ b), the
    /// bias added in fp32 before y is rounded.
    pub fn linear_forward(
        &self,
        y: DevPtr<'_, T>,
        x: DevPtr<'_, T>,
        w: DevPtr<'_, T>,
        b: Option<DevPtr<'_, f32>>,
        s: Linear,
    ) -> Result<()> {
        let b = b.map(|b| self.aligned(b)).transpose()?;
        self.lt.linear_forward(x, w, b, y, s)
    }

    /// x_in [rows, out] f32, x [rows, in] T, w [out, in] T, b [out] f32
    ///   -> x_out [rows, out] f32 = x_in + x·wᵀ + b: a residual branch's last layer, the
    /// branch never rounded to T.
    pub fn linear_forward_add(
        &self,
        x_out: DevPtr<'_, f32>,
        x_in: DevPtr<'_, f32>,
        x: DevPtr<'_, T>,
        w: DevPtr<'_, T>,
        b: DevPtr<'_, f32>,
        s: Linear,
    ) -> Result<()> {
        let b = self.aligned(b)?;
        self.lt.linear_forward_residual(x, w, b, x_in, x_out, s)
    }

    /// From dy [rows, out] T: dw [out, in] f32 += dyᵀ·x; with `db`, db [out] f32 += Σ_rows
    /// dy (BGRADB, then the ordered add); with `dx`, dx [rows, in] T = dy·w (written).
    #[allow(clippy::too_many_arguments)]
    pub fn linear_backward(
        &self,
        dx: Option<DevPtr<'_, T>>,
        dw: DevPtr<'_, f32>,
        db: Option<DevPtr<'_, f32>>,
        dy: DevPtr<'_, T>,
        x: DevPtr<'_, T>,
        w: DevPtr<'_, T>,
        s: Linear,
    ) -> Result<()> {
        let written = db
            .map(|_| self.scratch.range(0..s.out))
            .transpose()
            .context("the scratch is shorter than the bias gradient")?;
        self.lt.linear_backward_weight(dy, x, dw, written, s)?;
        if let (Some(db), Some(written)) = (db, written) {
            self.kernels.partials_finish(written, &[db], 1, s.out)?;
        }
        match dx {
            Some(dx) => self.lt.linear_backward_input(dy, w, dx, s),
            None => Ok(()),
        }
    }

    /// `b`, or its copy at the start of the scratch when it is under [`VECTOR_ALIGN`] bytes
    /// aligned.
    fn aligned<'b>(&'b self, b: DevPtr<'b, f32>) -> Result<DevPtr<'b, f32>> {
        if alignment(*b.addr()) >= VECTOR_ALIGN {
            return Ok(b);
        }
        let stage = self
            .scratch
            .range(0..b.len())
            .context("the scratch is shorter than a bias")?;
        copy(self.kernels, b, stage)?;
        Ok(stage)
    }
}

/// Queues the copy of `src` into `dst` (as long) on the kernels' stream.
fn copy<T: Storage>(
    kernels: &Kernels<T>,
    src: DevPtr<'_, f32>,
    dst: DevPtr<'_, f32>,
) -> Result<()> {
    dst.check(src.len(), "copy destination")?;
    let stream = &kernels.stream;
    stream
        .context()
        .bind_to_thread()
        .context("binding the CUDA context")?;
    // SAFETY: both addresses borrow live buffers of this stream holding `src.len()` values
    // (checked above), whose frees are queued on the stream after this copy.
    unsafe {
        cudarc::driver::result::memcpy_dtod_async(
            *dst.addr(),
            *src.addr(),
            src.len() * std::mem::size_of::<f32>(),
            stream.cu_stream(),
        )
    }
    .context("copying a bias to an aligned buffer")
}

/// The row-major shapes of a transformer block's linear layers over `rows` token rows of
/// `width` values (hidden width `MLP_RATIO · width`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockShapes {
    pub qkv: Linear,
    pub proj: Linear,
    pub fc1: Linear,
    pub fc2: Linear,
}

impl BlockShapes {
    pub fn new(rows: usize, width: usize) -> BlockShapes {
        let (d, h) = (width, MLP_RATIO * width);
        let layer = |inp, out| Linear { rows, inp, out };
        BlockShapes {
            qkv: layer(d, 3 * d),
            proj: layer(d, d),
            fc1: layer(d, h),
            fc2: layer(h, d),
        }
    }
}

/// The row-major shapes of LoMaR's linear layers for `seqs` sequences: what its pass hands
/// to [`LinearLayers`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerShapes {
    /// Visible patches -> embeddings.
    pub patch: Linear,
    pub block: BlockShapes,
    /// Masked tokens -> predicted pixels.
    pub head: Linear,
}

impl LayerShapes {
    pub fn new(m: &ModelConfig, seqs: usize) -> LayerShapes {
        let layer = |rows, inp, out| Linear { rows, inp, out };
        LayerShapes {
            patch: layer(seqs * m.visible_per_window(), m.patch_dim(), m.width),
            block: BlockShapes::new(seqs * m.seq_len(), m.width),
            head: layer(seqs * m.masked_per_window(), m.width, m.patch_dim()),
        }
    }

    /// Each layer with its name.
    pub fn all(&self) -> [(&'static str, Linear); 6] {
        [
            ("patch", self.patch),
            ("qkv", self.block.qkv),
            ("proj", self.block.proj),
            ("fc1", self.block.fc1),
            ("fc2", self.block.fc2),
            ("head", self.head),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{preset, PRESETS};
    use crate::cpu::ops::linear;
    use crate::cuda::blaslt::tests::interpret;
    use crate::cuda::blaslt::{Dtype, GemmDesc};

    #[test]
    fn every_preset_layer_has_valid_descriptors() {
        for name in PRESETS.iter().filter(|n| !n.starts_with("mae_")) {
            let m = preset(name).unwrap();
            // One image, and a batch of 256.
            for seqs in [m.windows_per_image, 256 * m.windows_per_image] {
                for (layer, s) in LayerShapes::new(&m, seqs).all() {
                    for elem in [Dtype::F32, Dtype::Bf16] {
                        for g in GemmDesc::every_product(s, elem) {
                            g.validate()
                                .unwrap_or_else(|e| panic!("{name} {layer} {s:?}: {e:#}"));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn layer_shapes_follow_the_model() {
        let m = preset("vit_base").unwrap();
        let seqs = 2 * m.windows_per_image;
        let sh = LayerShapes::new(&m, seqs);
        let (n, b) = (seqs * m.seq_len(), sh.block);
        assert_eq!((b.qkv.rows, b.qkv.inp, b.qkv.out), (n, 768, 3 * 768));
        assert_eq!(
            (b.fc1.inp, b.fc1.out, b.fc2.inp, b.fc2.out),
            (768, 3072, 3072, 768)
        );
        assert_eq!((b.proj.rows, b.proj.inp, b.proj.out), (n, 768, 768));
        assert_eq!(
            (sh.patch.rows, sh.patch.inp),
            (seqs * m.visible_per_window(), 768)
        );
        assert_eq!(
            (sh.head.rows, sh.head.out),
            (seqs * m.masked_per_window(), m.patch_dim())
        );
    }

    fn values(n: usize, seed: f64) -> Vec<f64> {
        (0..n).map(|i| ((i as f64 + 1.0) * seed).sin()).collect()
    }

    fn close(what: &str, got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() < 1e-10, "{what} [{i}]: {g} vs {w}");
        }
    }

    /// Each layer of the `tiny` preset, run through the descriptors the layer API issues
    /// and in its order, equals the row-major CPU op over two micro-batches: the bias in
    /// the epilogue, the residual into a separate output, dW accumulated by β = 1, and the
    /// bias gradient written by BGRADB then added, so it accumulates too.
    #[test]
    fn layers_through_the_descriptors_equal_the_cpu_op_over_micro_batches() {
        let m = preset("tiny").unwrap();
        for (layer, s) in LayerShapes::new(&m, 2).all() {
            let w = values(s.out * s.inp, 1.3);
            let b = values(s.out, 2.1);
            let nan = |n: usize| vec![f64::NAN; n];
            let mut want_dw = values(s.out * s.inp, 5.1);
            let mut want_db = values(s.out, 0.9);
            let (mut dw, mut db) = (want_dw.clone(), want_db.clone());
            for micro in 0..2 {
                let seed = 0.1 + micro as f64;
                let x = values(s.rows * s.inp, 0.7 * seed);
                let dy = values(s.rows * s.out, 0.4 * seed);
                let x_in = values(s.rows * s.out, 3.3 * seed);
                let what = |op: &str| format!("{layer} micro-batch {micro}: {op}");

                let mut want = nan(s.rows * s.out);
                linear::linear_forward(&mut want, &x, &w, &b);
                let g = GemmDesc::forward(s, Dtype::F32, true);
                let unset = nan(s.rows * s.out);
                let (y, _) = interpret(&g, &w, &x, &unset, &b, &unset);
                close(&what("y = x·wᵀ + b"), &y, &want);

                let mut want = nan(s.rows * s.out);
                linear::linear_forward_residual(&mut want, &x_in, &x, &w, &b);
                let g = GemmDesc::forward_residual(s, Dtype::F32);
                let (x_out, _) = interpret(&g, &w, &x, &x_in, &b, &nan(s.rows * s.out));
                close(&what("x_out = x_in + x·wᵀ + b"), &x_out, &want);

                let mut want_dx = nan(s.rows * s.inp);
                linear::linear_backward(
                    Some(&mut want_dx),
                    &mut want_dw,
                    &mut want_db,
                    &dy,
                    &x,
                    &w,
                );
                let g = GemmDesc::backward_weight(s, Dtype::F32, true);
                let (next_dw, written) = interpret(&g, &x, &dy, &dw, &[], &dw);
                dw = next_dw;
                // partials_finish with one chunk: db += the written vector.
                db.iter_mut().zip(&written).for_each(|(d, v)| *d += v);
                let g = GemmDesc::backward_input(s, Dtype::F32);
                let unset = nan(s.rows * s.inp);
                let (dx, _) = interpret(&g, &w, &dy, &unset, &[], &unset);
                close(&what("dx = dy·w"), &dx, &want_dx);
                close(&what("dw += dyᵀ·x"), &dw, &want_dw);
                close(&what("db += Σ dy"), &db, &want_db);
            }
        }
    }
}
