//! One sampled micro-batch, as every backend receives it (backends never sample).

use std::borrow::Cow;

use anyhow::{bail, Result};

use crate::config::ModelConfig;
use crate::data::normalise_pixel;

/// A batch's pixels, `[B, 3, H, W]`.
#[derive(Clone, Debug, PartialEq)]
pub enum Pixels {
    /// 8-bit colours, as the data sources make them. The model sees [`normalise_pixel`] of
    /// each, which the backend computes where it reads them (the GPU inside its window
    /// gather), so a quarter of the bytes cross to the device.
    Bytes(Vec<u8>),
    /// Values already normalised: a batch file's, or a figure's.
    Normalised(Vec<f32>),
}

impl From<Vec<u8>> for Pixels {
    fn from(v: Vec<u8>) -> Pixels {
        Pixels::Bytes(v)
    }
}

impl From<Vec<f32>> for Pixels {
    fn from(v: Vec<f32>) -> Pixels {
        Pixels::Normalised(v)
    }
}

impl Pixels {
    /// Values, `B * 3 * H * W`.
    pub fn len(&self) -> usize {
        match self {
            Pixels::Bytes(v) => v.len(),
            Pixels::Normalised(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Value `i`, which lies in channel `c`, as the model sees it.
    #[inline]
    pub fn value(&self, c: usize, i: usize) -> f32 {
        match self {
            Pixels::Bytes(v) => normalise_pixel(c, v[i]),
            Pixels::Normalised(v) => v[i],
        }
    }

    /// Every value as the model sees it, `[B, 3, H, W]` with `plane = H * W`: a copy of
    /// the bytes normalised, or the values themselves.
    pub fn normalised(&self, plane: usize) -> Cow<'_, [f32]> {
        match self {
            Pixels::Bytes(v) => Cow::Owned(
                v.iter()
                    .enumerate()
                    .map(|(i, &b)| normalise_pixel(i / plane % 3, b))
                    .collect(),
            ),
            Pixels::Normalised(v) => Cow::Borrowed(v),
        }
    }
}

/// Images plus the windows and masks the sampler drew for them.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Images in the batch, `B`.
    pub images_len: usize,
    /// `[B, 3, H, W]`.
    pub images: Pixels,
    /// `[B, n_win, 2]`: (row, col) of each window's top-left patch.
    pub window_origin: Vec<u32>,
    /// `[B, n_win, M]`: masked window positions `ky*K + kx`, distinct, ascending.
    pub mask_index: Vec<u32>,
}

impl Batch {
    /// Window sequences in the batch, `B * n_win`.
    pub fn sequences(&self, m: &ModelConfig) -> usize {
        self.images_len * m.windows_per_image
    }

    /// Checks every shape and index against the model, so a backend can trust the batch.
    /// Pixel values are not scanned on every step: a batch file's are checked on reading,
    /// the data sources produce finite ones, and a non-finite loss stops training.
    pub fn validate(&self, m: &ModelConfig) -> Result<()> {
        let b = self.images_len;
        if b == 0 {
            bail!("batch holds no images");
        }
        let want = b * 3 * m.image * m.image;
        if self.images.len() != want {
            bail!(
                "images: {} values, want [B={b}, 3, {}, {}] = {want}",
                self.images.len(),
                m.image,
                m.image
            );
        }
        let seqs = b * m.windows_per_image;
        if self.window_origin.len() != seqs * 2 {
            bail!(
                "window_origin: {} values, want [B={b}, n_win={}, 2] = {}",
                self.window_origin.len(),
                m.windows_per_image,
                seqs * 2
            );
        }
        let max_origin = (m.grid() - m.window) as u32;
        if let Some(i) = self.window_origin.iter().position(|&v| v > max_origin) {
            bail!(
                "window_origin: value {} at {i} is outside 0..={max_origin} (grid {} - window {})",
                self.window_origin[i],
                m.grid(),
                m.window
            );
        }
        let mk = m.masked_per_window();
        if self.mask_index.len() != seqs * mk {
            bail!(
                "mask_index: {} values, want [B={b}, n_win={}, M={mk}] = {}",
                self.mask_index.len(),
                m.windows_per_image,
                seqs * mk
            );
        }
        let area = m.window_area() as u32;
        for (s, row) in self.mask_index.chunks(mk).enumerate() {
            if let Some(&v) = row.iter().find(|&&v| v >= area) {
                bail!("mask_index: window {s} holds {v}, outside 0..{area}");
            }
            if row.windows(2).any(|w| w[0] >= w[1]) {
                bail!("mask_index: window {s} is not strictly ascending (indices must be distinct and sorted)");
            }
        }
        Ok(())
    }

    /// For each sequence, `K²` entries: the visible-row index of a visible position
    /// (counting visible positions in ascending order), or `None` where it is masked.
    pub fn visible_slots(&self, m: &ModelConfig) -> Vec<Option<u32>> {
        let (area, mk) = (m.window_area(), m.masked_per_window());
        let mut slots = Vec::with_capacity(self.sequences(m) * area);
        for row in self.mask_index.chunks(mk) {
            let mut masked = vec![false; area];
            for &i in row {
                masked[i as usize] = true;
            }
            let mut next = 0;
            for is_masked in masked {
                slots.push(if is_masked {
                    None
                } else {
                    next += 1;
                    Some(next - 1)
                });
            }
        }
        slots
    }
}
