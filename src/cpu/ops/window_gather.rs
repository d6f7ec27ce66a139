//! Window gather: the model's only contact with pixels (docs/DESIGN.md §1.1, §1.3).
//! Shapes: images `[B, 3, H, W]`, window_origin `[S, 2]`, mask_index `[S, M]` →
//! visible `[S*V, 3p²]` in Conv2d `(c, y, x)` order, targets `[S*M, 3p²]` in `(y, x, c)`
//! order, norm-pix applied when enabled. Inputs only: there is no backward.

use rayon::prelude::*;

use super::super::real::Real;
use crate::config::{ModelConfig, NORM_PIX_EPS};
use crate::data::batch::Batch;

/// What the network sees and what it must reconstruct.
#[derive(Clone, Debug, Default)]
pub struct Patches<T> {
    /// `[S*V, 3p²]`, visible positions of each window in ascending order.
    pub visible: Vec<T>,
    /// `[S*M, 3p²]`, masked positions in `mask_index` order.
    pub targets: Vec<T>,
}

/// Cuts every window of a batch (validated against `m`) into visible rows and targets.
pub fn window_gather<T: Real>(m: &ModelConfig, batch: &Batch) -> Patches<T> {
    let mut patches = Patches::default();
    window_gather_into(&mut patches, m, batch);
    patches
}

/// [`window_gather`] into `patches`, reusing its memory (every value is overwritten).
pub fn window_gather_into<T: Real>(patches: &mut Patches<T>, m: &ModelConfig, batch: &Batch) {
    let (p, k, img) = (m.patch, m.window, m.image);
    let (pd, v, mk, area) = (
        m.patch_dim(),
        m.visible_per_window(),
        m.masked_per_window(),
        m.window_area(),
    );
    let seqs = batch.sequences(m);
    let Patches { visible, targets } = patches;
    visible.resize(seqs * v * pd, T::zero());
    targets.resize(seqs * mk * pd, T::zero());
    visible
        .par_chunks_mut(v * pd)
        .zip(targets.par_chunks_mut(mk * pd))
        .enumerate()
        .for_each(|(s, (vis, tgt))| {
            let image = (s / m.windows_per_image) * 3 * img * img;
            let (row0, col0) = (
                batch.window_origin[2 * s] as usize,
                batch.window_origin[2 * s + 1] as usize,
            );
            let masked = &batch.mask_index[s * mk..][..mk];
            let (mut next_vis, mut next_mask) = (0, 0);
            for i in 0..area {
                // Top-left pixel of window position i.
                let top = (row0 + i / k) * p;
                let left = (col0 + i % k) * p;
                let pixel = |c: usize, y: usize, x: usize| {
                    T::of_f32(
                        batch
                            .images
                            .value(c, image + (c * img + top + y) * img + left + x),
                    )
                };
                if next_mask < mk && masked[next_mask] as usize == i {
                    let row = &mut tgt[next_mask * pd..][..pd];
                    for y in 0..p {
                        for x in 0..p {
                            for c in 0..3 {
                                row[(y * p + x) * 3 + c] = pixel(c, y, x);
                            }
                        }
                    }
                    if m.norm_pix {
                        normalise(row);
                    }
                    next_mask += 1;
                } else {
                    let row = &mut vis[next_vis * pd..][..pd];
                    for c in 0..3 {
                        for y in 0..p {
                            for x in 0..p {
                                row[(c * p + y) * p + x] = pixel(c, y, x);
                            }
                        }
                    }
                    next_vis += 1;
                }
            }
        });
}

/// norm-pix: `(t - mean) / sqrt(var + 1e-6)` with the unbiased variance of the row.
fn normalise<T: Real>(row: &mut [T]) {
    let n = T::of(row.len() as f64);
    let mean = row.iter().copied().sum::<T>() / n;
    let var = row.iter().map(|&v| (v - mean) * (v - mean)).sum::<T>() / (n - T::one());
    let inv = T::one() / (var + T::of(NORM_PIX_EPS)).sqrt();
    for v in row {
        *v = (*v - mean) * inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::preset;
    use crate::data::batch::Pixels;

    /// Every pixel holds a code of its (image, channel, row, column).
    fn coded_batch(m: &ModelConfig) -> Batch {
        let h = m.image;
        let images = (0..2 * 3 * h * h)
            .map(|i| {
                let (b, c, y, x) = (i / (3 * h * h), i / (h * h) % 3, i / h % h, i % h);
                (b * 1_000_000 + c * 100_000 + y * 100 + x) as f32
            })
            .collect();
        let mk = m.masked_per_window();
        let mut mask_index = Vec::new();
        for s in 0..2 * m.windows_per_image {
            mask_index.extend(
                (0..mk as u32)
                    .map(|j| (j + s as u32) % m.window_area() as u32)
                    .collect::<std::collections::BTreeSet<_>>(),
            );
        }
        let batch = Batch {
            images_len: 2,
            images: Pixels::Normalised(images),
            window_origin: vec![0, 0, 1, 3, 4, 2, 3, 4],
            mask_index,
        };
        batch.validate(m).unwrap();
        batch
    }

    #[test]
    fn rows_hold_the_right_pixels_in_the_right_order() {
        let m = ModelConfig {
            norm_pix: false,
            ..preset("tiny").unwrap()
        };
        let batch = coded_batch(&m);
        let got = window_gather::<f64>(&m, &batch);
        let (p, pd, k, mk) = (m.patch, m.patch_dim(), m.window, m.masked_per_window());
        let code = |b: usize, c: usize, y: usize, x: usize| {
            (b * 1_000_000 + c * 100_000 + y * 100 + x) as f64
        };
        let slots = batch.visible_slots(&m);
        for s in 0..batch.sequences(&m) {
            let b = s / m.windows_per_image;
            let (r0, c0) = (
                batch.window_origin[2 * s] as usize,
                batch.window_origin[2 * s + 1] as usize,
            );
            for i in 0..m.window_area() {
                let (top, left) = ((r0 + i / k) * p, (c0 + i % k) * p);
                match slots[s * m.window_area() + i] {
                    Some(v) => {
                        let row =
                            &got.visible[(s * m.visible_per_window() + v as usize) * pd..][..pd];
                        for (c, y, x) in [(0, 0, 0), (2, 1, 3), (1, 3, 2)] {
                            assert_eq!(row[(c * p + y) * p + x], code(b, c, top + y, left + x));
                        }
                    }
                    None => {
                        let j = batch.mask_index[s * mk..][..mk]
                            .iter()
                            .position(|&q| q as usize == i)
                            .unwrap();
                        let row = &got.targets[(s * mk + j) * pd..][..pd];
                        for (c, y, x) in [(0, 0, 0), (2, 1, 3), (1, 3, 2)] {
                            assert_eq!(row[(y * p + x) * 3 + c], code(b, c, top + y, left + x));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn norm_pix_gives_zero_mean_and_unit_unbiased_variance() {
        let m = preset("tiny").unwrap();
        let batch = coded_batch(&m);
        let raw = window_gather::<f64>(
            &ModelConfig {
                norm_pix: false,
                ..m.clone()
            },
            &batch,
        );
        let normed = window_gather::<f64>(&m, &batch);
        assert_eq!(raw.visible, normed.visible);
        for (r, t) in raw.targets.chunks(48).zip(normed.targets.chunks(48)) {
            let mean = t.iter().sum::<f64>() / 48.0;
            let var = t.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 47.0;
            let rmean = r.iter().sum::<f64>() / 48.0;
            let rvar = r.iter().map(|v| (v - rmean).powi(2)).sum::<f64>() / 47.0;
            assert!(mean.abs() < 1e-9);
            assert!((var - rvar / (rvar + 1e-6)).abs() < 1e-9, "{var}");
        }
    }
}
