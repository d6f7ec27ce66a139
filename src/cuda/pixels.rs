//! How a batch's pixels reach the GPU. The window gather reads only the K·p-pixel squares
//! the windows cover; when those hold fewer pixels than the whole images (a 448-pixel
//! vit_base batch: a quarter), the host copies just the squares, so the transfer shrinks
//! with them and the step time stops growing with the image.

use rayon::prelude::*;

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

    /// Writes what the gather reads of `batch` into `out` (`self.len(S)` values): each
    /// window's square, or the images copied over the cores.
    pub fn fill(&self, batch: &Batch, m: &ModelConfig, out: &mut [f32]) {
        if self.crops {
            window_crops(batch, m, out);
        } else {
            assert_eq!(
                out.len(),
                batch.images.len(),
                "PixelSource::fill: output size"
            );
            const CHUNK: usize = 1 << 18;
            out.par_chunks_mut(CHUNK)
                .zip(batch.images.par_chunks(CHUNK))
                .for_each(|(to, from)| to.copy_from_slice(from));
        }
    }
}

/// images [B, 3, H, W], window_origin [B, n_win, 2] -> out [S, 3, K·p, K·p]: each window's
/// square of pixels, in the window order of the batch.
pub fn window_crops(batch: &Batch, m: &ModelConfig, out: &mut [f32]) {
    let span = m.window * m.patch;
    let plane = m.image * m.image;
    assert_eq!(
        out.len(),
        batch.sequences(m) * 3 * span * span,
        "window_crops: output size"
    );
    out.par_chunks_mut(3 * span * span)
        .enumerate()
        .for_each(|(s, crop)| {
            let image = &batch.images[s / m.windows_per_image * 3 * plane..][..3 * plane];
            let top = batch.window_origin[2 * s] as usize * m.patch;
            let left = batch.window_origin[2 * s + 1] as usize * m.patch;
            for (c, channel) in crop.chunks_exact_mut(span * span).enumerate() {
                for (y, line) in channel.chunks_exact_mut(span).enumerate() {
                    let start = c * plane + (top + y) * m.image + left;
                    line.copy_from_slice(&image[start..start + span]);
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::preset;
    use crate::cpu::ops::window_gather;
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
    /// gives the same patches and targets as gathering from the whole images.
    #[test]
    fn crops_hold_every_pixel_the_gather_reads() {
        let m = ModelConfig {
            image: 48,
            ..preset("tiny").unwrap()
        };
        let images_len = 3;
        let windows = Sampler::new(7).sample(&m, images_len);
        let batch = Batch {
            images_len,
            images: (0..images_len * 3 * m.image * m.image)
                .map(|i| (i as f32 * 0.37).sin())
                .collect(),
            window_origin: windows.origin,
            mask_index: windows.mask,
        };
        let want = window_gather::window_gather::<f32>(&m, &batch);

        let seqs = batch.sequences(&m);
        let whole = PixelSource::images(&m);
        let mut copied = vec![0.0; whole.len(seqs)];
        whole.fill(&batch, &m, &mut copied);
        assert_eq!(copied, batch.images);

        let source = PixelSource::crops(&m);
        let mut crops = vec![0.0; source.len(seqs)];
        source.fill(&batch, &m, &mut crops);
        let as_images = ModelConfig {
            image: source.side,
            windows_per_image: 1,
            ..m.clone()
        };
        let cropped = Batch {
            images: crops,
            images_len: seqs,
            window_origin: vec![0; 2 * seqs],
            ..batch
        };
        let got = window_gather::window_gather::<f32>(&as_images, &cropped);
        assert_eq!(got.visible, want.visible);
        assert_eq!(got.targets, want.targets);
    }
}
