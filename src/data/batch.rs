//! One sampled micro-batch, as every backend receives it (backends never sample).

use anyhow::{bail, Result};

use crate::config::ModelConfig;

/// Images plus the windows and masks the sampler drew for them.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Images in the batch, `B`.
    pub images_len: usize,
    /// `[B, 3, H, W]`, already normalised.
    pub images: Vec<f32>,
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
