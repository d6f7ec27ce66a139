//! How a batch's pixels reach the GPU. They travel as the data sources make them, 8-bit
//! colours (a batch file's already normalised values travel as f32), and the window gather
//! normalises them on the device. The gather reads only the K·p-pixel squares the windows
//! cover; when those hold fewer pixels than the whole images (a 448-pixel vit_base batch:
//! a quarter), the host copies just the squares, so the transfer shrinks with them and the
//! step time stops growing with the image.
//!
//! The copy runs on a stream of its own through two pinned host buffers and two device
//! buffers used in turn ([`PixelUpload`]), so one batch's copy overlaps the work still
//! queued for the one before; events order every reuse of a buffer after its last use.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use cudarc::driver::{
    CudaEvent, CudaFunction, CudaSlice, CudaStream, DeviceRepr, PinnedHostSlice, ValidAsZeroBits,
};
use rayon::prelude::*;

use super::device::Gpu;
use super::kernels::Kernels;
use crate::config::ModelConfig;
use crate::data::batch::Batch;

/// What the gather reads: `side`-pixel square images, `windows_per_image` windows each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PixelSource {
    pub side: usize,
    pub windows_per_image: usize,
    /// The images are each window's square ([`window_crops`]); every window origin is 0.
    pub crops: bool,
}

impl PixelSource {
    /// The batch's whole images, as the model sees them.
    pub fn images(m: &ModelConfig) -> PixelSource {
        PixelSource {
            side: m.image,
            windows_per_image: m.windows_per_image,
            crops: false,
        }
    }

    /// One square per window, each its own image.
    pub fn crops(m: &ModelConfig) -> PixelSource {
        PixelSource {
            side: m.window * m.patch,
            windows_per_image: 1,
            crops: true,
        }
    }

    /// Whichever of the two moves fewer pixels (whole images on a tie: no host copy).
    pub fn smaller(m: &ModelConfig) -> PixelSource {
        let span = m.window * m.patch;
        if m.windows_per_image * span * span < m.image * m.image {
            Self::crops(m)
        } else {
            Self::images(m)
        }
    }

    /// Values of `seqs` window sequences' pixels.
    pub fn len(&self, seqs: usize) -> usize {
        seqs / self.windows_per_image * 3 * self.side * self.side
    }

    /// Writes what the gather reads of `images` (the pixels of `batch`, validated against
    /// `m`) into `out` (`self.len(S)` values): each window's square, or the images copied
    /// over the cores.
    pub fn fill<P: PixelValue>(&self, images: &[P], batch: &Batch, m: &ModelConfig, out: &mut [P]) {
        if self.crops {
            window_crops(images, &batch.window_origin, m, out);
        } else {
            assert_eq!(out.len(), images.len(), "PixelSource::fill: output size");
            const CHUNK: usize = 1 << 18;
            out.par_chunks_mut(CHUNK)
                .zip(images.par_chunks(CHUNK))
                .for_each(|(to, from)| to.copy_from_slice(from));
        }
    }
}

/// images [B, 3, H, W], window_origin [S, 2] -> out [S, 3, K·p, K·p]: each window's
/// square of pixels, in the window order of the batch.
pub fn window_crops<P: Copy + Send + Sync>(
    images: &[P],
    window_origin: &[u32],
    m: &ModelConfig,
    out: &mut [P],
) {
    let span = m.window * m.patch;
    let plane = m.image * m.image;
    let seqs = window_origin.len() / 2;
    assert_eq!(
        out.len(),
        seqs * 3 * span * span,
        "window_crops: output size"
    );
    out.par_chunks_mut(3 * span * span)
        .enumerate()
        .for_each(|(s, crop)| {
            let image = &images[s / m.windows_per_image * 3 * plane..][..3 * plane];
            let top = window_origin[2 * s] as usize * m.patch;
            let left = window_origin[2 * s + 1] as usize * m.patch;
            for (c, channel) in crop.chunks_exact_mut(span * span).enumerate() {
                for (y, line) in channel.chunks_exact_mut(span).enumerate() {
                    let start = c * plane + (top + y) * m.image + left;
                    line.copy_from_slice(&image[start..start + span]);
                }
            }
        });
}

/// A type a batch's pixels travel to the GPU in: bytes, or normalised f32 values.
pub trait PixelValue: DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync {
    /// The window gather that reads this type.
    fn gather<T>(k: &Kernels<T>) -> &CudaFunction;
    /// The upload buffers of this type, if `staged` holds them.
    fn upload(staged: &mut StagedPixels) -> Option<&mut PixelUpload<Self>>;
    fn staged(upload: PixelUpload<Self>) -> StagedPixels;
}

impl PixelValue for u8 {
    fn gather<T>(k: &Kernels<T>) -> &CudaFunction {
        &k.window_gather_bytes
    }
    fn upload(staged: &mut StagedPixels) -> Option<&mut PixelUpload<u8>> {
        match staged {
            StagedPixels::Bytes(u) => Some(u),
            StagedPixels::Normalised(_) => None,
        }
    }
    fn staged(upload: PixelUpload<u8>) -> StagedPixels {
        StagedPixels::Bytes(upload)
    }
}

impl PixelValue for f32 {
    fn gather<T>(k: &Kernels<T>) -> &CudaFunction {
        &k.window_gather
    }
    fn upload(staged: &mut StagedPixels) -> Option<&mut PixelUpload<f32>> {
        match staged {
            StagedPixels::Normalised(u) => Some(u),
            StagedPixels::Bytes(_) => None,
        }
    }
    fn staged(upload: PixelUpload<f32>) -> StagedPixels {
        StagedPixels::Normalised(upload)
    }
}

/// The upload buffers of the kind of pixels the batches bring
/// ([`crate::data::batch::Pixels`]).
pub enum StagedPixels {
    Bytes(PixelUpload<u8>),
    Normalised(PixelUpload<f32>),
}

/// One pinned host buffer, its device copy, and the events that order their reuse.
struct Slot<P: DeviceRepr> {
    host: PinnedHostSlice<P>,
    device: CudaSlice<P>,
    /// Recorded on the copy stream after the copy out of `host`: the host refills `host`
    /// only once it has completed.
    copied: CudaEvent,
    /// Recorded on the GPU's stream after the last kernel that read `device`: the next
    /// copy into `device` waits for it.
    read: CudaEvent,
}

/// Two pinned host buffers of `len` values and their device copies, filled and copied in
/// turn on a copy stream of their own. The GPU's stream waits for a buffer's copy before
/// reading it; a buffer is refilled only after its previous copy, and copied into only
/// after its previous reader, so the copy of one batch can run while the kernels of the
/// previous one are still queued.
pub struct PixelUpload<P: DeviceRepr> {
    copy: Arc<CudaStream>,
    slots: [Slot<P>; 2],
    /// The slot the last [`PixelUpload::stage`] filled.
    current: usize,
}

impl<P: PixelValue> PixelUpload<P> {
    pub fn new(gpu: &Gpu, len: usize, what: &str) -> Result<Self> {
        let ctx = gpu.ctx();
        let copy = ctx
            .new_stream()
            .with_context(|| format!("creating the copy stream of {what}"))?;
        let event = |why: &str| {
            ctx.new_event(None)
                .with_context(|| format!("creating the {why} event of {what}"))
        };
        let slot = |i: usize| -> Result<Slot<P>> {
            let device = gpu.zeros::<P>(len, &format!("{what} {i}"))?;
            let read = event("read")?;
            // The first copy waits for the allocation and zero fill on the GPU's stream.
            read.record(gpu.stream())
                .with_context(|| format!("recording the read event of {what}"))?;
            Ok(Slot {
                host: pinned(gpu, len, what)?,
                device,
                copied: event("copy")?,
                read,
            })
        };
        Ok(PixelUpload {
            slots: [slot(0)?, slot(1)?],
            copy,
            current: 1,
        })
    }

    /// Values each buffer holds.
    pub fn len(&self) -> usize {
        self.slots[0].device.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills the other buffer on the host with `fill` (given `self.len()` values), queues
    /// its copy on the copy stream, and makes the GPU's stream wait for the copy. The
    /// device buffer is then [`PixelUpload::device`] until the next call.
    pub fn stage(&mut self, gpu: &Gpu, what: &str, fill: impl FnOnce(&mut [P])) -> Result<()> {
        let i = 1 - self.current;
        let slot = &mut self.slots[i];
        slot.copied
            .synchronize()
            .with_context(|| format!("waiting for the last copy of {what}"))?;
        fill(
            slot.host
                .as_mut_slice()
                .with_context(|| format!("reaching the pinned buffer of {what}"))?,
        );
        self.copy
            .wait(&slot.read)
            .with_context(|| format!("ordering the copy of {what} after its last reader"))?;
        self.copy
            .memcpy_htod(&slot.host, &mut slot.device)
            .with_context(|| format!("copying {what} to the GPU"))?;
        slot.copied
            .record(&self.copy)
            .with_context(|| format!("recording the copy of {what}"))?;
        gpu.stream()
            .wait(&slot.copied)
            .with_context(|| format!("ordering the reads of {what} after its copy"))?;
        self.current = i;
        Ok(())
    }

    /// The device buffer the last [`PixelUpload::stage`] filled.
    pub fn device(&self) -> &CudaSlice<P> {
        &self.slots[self.current].device
    }

    /// Which of the two buffers [`PixelUpload::device`] is (a captured gather reads one
    /// fixed buffer, so each has its own graph).
    pub fn slot(&self) -> usize {
        self.current
    }

    /// Records that every kernel reading [`PixelUpload::device`] is queued on the GPU's
    /// stream: the copy that next refills that buffer waits for them. Called outside any
    /// graph capture (the copy stream cannot wait for an event recorded in one).
    pub fn mark_read(&self, gpu: &Gpu) -> Result<()> {
        self.slots[self.current]
            .read
            .record(gpu.stream())
            .context("recording the read of the uploaded pixels")
    }
}

impl<P: DeviceRepr> Drop for PixelUpload<P> {
    /// The device buffers are freed on the GPU's stream, which knows nothing of the copy
    /// stream: let the copies finish first.
    fn drop(&mut self) {
        // A failure here was, or will be, reported by the GPU's stream.
        let _ = self.copy.synchronize();
    }
}

/// Page-locked host memory for `len` values, zero-filled: the copy engine reads it
/// directly, where a copy from ordinary memory goes through the driver's bounce buffer
/// (about 3 GB/s on an H200 machine, a third of the vit_base step at 224).
pub(super) fn pinned<P: DeviceRepr + ValidAsZeroBits>(
    gpu: &Gpu,
    len: usize,
    what: &str,
) -> Result<PinnedHostSlice<P>> {
    if len == 0 {
        bail!("{what}: a pinned buffer must not be empty");
    }
    // Plain page-locked memory (not write-combined): the host fills it with ordinary
    // cached stores. SAFETY: it is zero-filled below, before any slice of it is made.
    let mut host = unsafe { gpu.ctx().alloc_pinned_with_flags::<P>(len, 0) }
        .with_context(|| format!("allocating {len} pinned host values for {what}"))?;
    let ptr = host.as_mut_ptr().context("waiting for pinned memory")?;
    // SAFETY: `ptr` holds `len` values of a type for which all-zero bytes are valid, and
    // nothing else refers to them yet.
    unsafe { std::ptr::write_bytes(ptr, 0, len) };
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::preset;
    use crate::cpu::ops::window_gather;
    use crate::data::batch::Pixels;
    use crate::data::sampler::Sampler;

    #[test]
    fn crops_are_chosen_only_when_they_move_fewer_pixels() {
        let base = preset("vit_base").unwrap();
        assert!(
            !PixelSource::smaller(&base).crops,
            "224: 4 windows cover 224²"
        );
        let big = ModelConfig {
            image: 448,
            ..base.clone()
        };
        assert_eq!(PixelSource::smaller(&big), PixelSource::crops(&big));
        assert_eq!(PixelSource::crops(&big).len(8), 8 * 3 * 112 * 112);
        assert_eq!(PixelSource::images(&big).len(8), 2 * 3 * 448 * 448);
    }

    /// The whole images are copied as they are; gathering from the crops with zero origins
    /// gives the same patches and targets as gathering from the whole images, for bytes
    /// and for normalised values alike.
    #[test]
    fn crops_hold_every_pixel_the_gather_reads() {
        let m = ModelConfig {
            image: 48,
            ..preset("tiny").unwrap()
        };
        let images_len = 3;
        let windows = Sampler::new(7).sample(&m, images_len);
        let bytes: Vec<u8> = (0..images_len * 3 * m.image * m.image)
            .map(|i| (i * 37 % 251) as u8)
            .collect();
        let plane = m.image * m.image;
        let normalised = Pixels::Bytes(bytes.clone()).normalised(plane).into_owned();
        let mut gathered = Vec::new();
        for images in [Pixels::Bytes(bytes), Pixels::Normalised(normalised)] {
            let batch = Batch {
                images_len,
                images,
                window_origin: windows.origin.clone(),
                mask_index: windows.mask.clone(),
            };
            match &batch.images {
                Pixels::Bytes(v) => check_crops(&batch, v, &m),
                Pixels::Normalised(v) => check_crops(&batch, v, &m),
            }
            let got = window_gather::window_gather::<f32>(&m, &batch);
            gathered.push((got.visible, got.targets));
        }
        // The CPU normalises bytes where it reads them exactly as `Pixels::normalised` does.
        assert_eq!(gathered[0], gathered[1]);
    }

    fn check_crops<P: PixelValue + std::fmt::Debug + PartialEq>(
        batch: &Batch,
        images: &[P],
        m: &ModelConfig,
    ) where
        Pixels: From<Vec<P>>,
    {
        let want = window_gather::window_gather::<f32>(m, batch);
        let seqs = batch.sequences(m);
        let whole = PixelSource::images(m);
        let mut copied = vec![P::default(); whole.len(seqs)];
        whole.fill(images, batch, m, &mut copied);
        assert_eq!(copied, images);

        let source = PixelSource::crops(m);
        let mut crops = vec![P::default(); source.len(seqs)];
        source.fill(images, batch, m, &mut crops);
        let as_images = ModelConfig {
            image: source.side,
            windows_per_image: 1,
            ..m.clone()
        };
        let cropped = Batch {
            images: Pixels::from(crops),
            images_len: seqs,
            window_origin: vec![0; 2 * seqs],
            mask_index: batch.mask_index.clone(),
        };
        let got = window_gather::window_gather::<f32>(&as_images, &cropped);
        assert_eq!(got.visible, want.visible);
        assert_eq!(got.targets, want.targets);
    }
}
