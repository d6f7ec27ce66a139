//! Window and mask sampling (docs/DESIGN.md §1.1, and MAE's whole-grid masking, §7.1),
//! shared by every backend.
//!
//! ChaCha8 is specified bit for bit, so a seed gives the same windows and masks on every
//! machine. The whole state is the seed plus the position in the ChaCha stream, which is
//! what a checkpoint stores to resume bit-identically.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::{Method, ModelConfig};

/// Keeps the sampler's stream apart from the parameter and data streams of the same seed.
const SAMPLER_SALT: u64 = 0x51a3_c0de_6b2f_9e41;

/// Everything needed to continue a sampler exactly where it stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    pub seed: u64,
    /// 32-bit words of the ChaCha stream consumed so far.
    pub word_pos: u128,
}

/// Window origins and masks for a number of images.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Windows {
    /// `[B, n_win, 2]`: (row, col) of each window's top-left patch.
    pub origin: Vec<u32>,
    /// `[B, n_win, M]`: masked positions `ky*K + kx`, distinct, ascending.
    pub mask: Vec<u32>,
}

pub struct Sampler {
    seed: u64,
    rng: ChaCha8Rng,
    /// Scratch for the partial shuffle, reset to the identity for every window so the
    /// draws depend on the stream position alone.
    positions: Vec<u32>,
}

impl Sampler {
    pub fn new(seed: u64) -> Self {
        Self::restore(SamplerState { seed, word_pos: 0 })
    }

    pub fn restore(state: SamplerState) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(state.seed ^ SAMPLER_SALT);
        rng.set_word_pos(state.word_pos);
        Sampler {
            seed: state.seed,
            rng,
            positions: Vec::new(),
        }
    }

    pub fn state(&self) -> SamplerState {
        SamplerState {
            seed: self.seed,
            word_pos: self.rng.get_word_pos(),
        }
    }

    /// Draws windows and masks for `images` images: for each image, for each window, the
    /// origin row, the origin column, then the masked positions. MAE's one window per
    /// image is the whole grid at (0, 0); only its kept patches are drawn.
    pub fn sample(&mut self, m: &ModelConfig, images: usize) -> Windows {
        match m.method {
            Method::Lomar => self.sample_windows(m, images),
            Method::Mae => self.sample_grids(m, images),
        }
    }

    /// The first `n` slots of a fresh partial Fisher–Yates shuffle of `0..area`: a
    /// uniform subset, in draw order.
    fn draw_subset(&mut self, area: u32, n: usize) -> &mut [u32] {
        self.positions.clear();
        self.positions.extend(0..area);
        for i in 0..n {
            let j = self.rng.gen_range(i as u32..area) as usize;
            self.positions.swap(i, j);
        }
        &mut self.positions[..n]
    }

    /// MAE: per image, `floor(N (1 - r))` of the `N` patches kept uniformly at random;
    /// the rest, ascending, are the mask (so the kept ones are ascending too).
    fn sample_grids(&mut self, m: &ModelConfig, images: usize) -> Windows {
        let (area, keep) = (m.window_area() as u32, m.visible_per_window());
        let mut out = Windows {
            origin: vec![0; images * 2],
            mask: Vec::with_capacity(images * m.masked_per_window()),
        };
        let mut kept = vec![false; area as usize];
        for _ in 0..images {
            kept.fill(false);
            for &i in self.draw_subset(area, keep).iter() {
                kept[i as usize] = true;
            }
            out.mask.extend((0..area).filter(|&i| !kept[i as usize]));
        }
        out
    }

    /// LoMaR: per window, its origin and `M` masked positions.
    fn sample_windows(&mut self, m: &ModelConfig, images: usize) -> Windows {
        let windows = images * m.windows_per_image;
        let (area, masked) = (m.window_area() as u32, m.masked_per_window());
        // Every origin in 0..=G-K; u32 ranges keep the draws identical on 32- and 64-bit.
        let origins = (m.grid() - m.window) as u32 + 1;
        let mut out = Windows {
            origin: Vec::with_capacity(windows * 2),
            mask: Vec::with_capacity(windows * masked),
        };
        for _ in 0..windows {
            out.origin.push(self.rng.gen_range(0..origins));
            out.origin.push(self.rng.gen_range(0..origins));
            let chosen = self.draw_subset(area, masked);
            chosen.sort_unstable();
            out.mask.extend_from_slice(chosen);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::preset;

    fn model() -> ModelConfig {
        ModelConfig {
            image: 80,
            patch: 8,
            window: 4,
            windows_per_image: 3,
            mask_ratio: 0.7,
            ..preset("tiny").unwrap()
        }
    }

    #[test]
    fn windows_lie_inside_the_grid_and_masks_are_distinct_and_sorted() {
        let m = model();
        let (g, k, mk) = (m.grid() as u32, m.window as u32, m.masked_per_window());
        assert_eq!(mk, 11);
        let w = Sampler::new(7).sample(&m, 50);
        assert_eq!(w.origin.len(), 50 * 3 * 2);
        assert_eq!(w.mask.len(), 50 * 3 * mk);
        assert!(w.origin.iter().all(|&o| o + k <= g));
        for row in w.mask.chunks(mk) {
            assert!(row.windows(2).all(|p| p[0] < p[1]), "{row:?}");
            assert!(row.iter().all(|&i| i < k * k));
        }
    }

    #[test]
    fn mae_keeps_a_quarter_of_the_grid_uniformly() {
        let m = crate::config::mae_recipe(preset("tiny").unwrap());
        let (n, mk) = (m.window_area(), m.masked_per_window());
        assert_eq!((n, mk), (64, 48));
        let images = 3000;
        let w = Sampler::new(3).sample(&m, images);
        assert_eq!(w.origin, vec![0; images * 2]);
        assert_eq!(w.mask.len(), images * mk);
        let mut masked = vec![0usize; n];
        for row in w.mask.chunks(mk) {
            assert!(row.windows(2).all(|p| p[0] < p[1]), "{row:?}");
            assert!(row.iter().all(|&i| (i as usize) < n));
            row.iter().for_each(|&i| masked[i as usize] += 1);
        }
        let expect = (images * mk) as f64 / n as f64;
        for (i, &c) in masked.iter().enumerate() {
            assert!(
                (c as f64 - expect).abs() < 0.03 * expect,
                "patch {i}: {c} vs {expect}"
            );
        }
        // Images differ, the seed decides, and a restored state continues the stream.
        assert_ne!(w.mask[..mk], w.mask[mk..2 * mk]);
        let mut s = Sampler::new(3);
        assert_eq!(s.sample(&m, 5).mask, w.mask[..5 * mk]);
        let saved = s.state();
        assert_eq!(
            Sampler::restore(saved).sample(&m, 2).mask,
            w.mask[5 * mk..7 * mk]
        );
    }

    #[test]
    fn lomar_draws_are_unchanged() {
        // The first image of seed 0 on the test model, as drawn before MAE existed.
        let w = Sampler::new(0).sample(&model(), 1);
        assert_eq!(w.origin, [0, 5, 1, 2, 0, 4]);
        assert_eq!(
            w.mask,
            [
                0, 2, 3, 4, 6, 7, 8, 9, 10, 13, 14, 0, 1, 2, 3, 4, 6, 7, 8, 12, 13, 14, 2, 3, 4, 5,
                6, 9, 11, 12, 13, 14, 15
            ]
        );
    }

    #[test]
    fn the_seed_alone_decides_the_draws() {
        let m = model();
        let a = Sampler::new(1).sample(&m, 8);
        assert_eq!(a, Sampler::new(1).sample(&m, 8));
        assert_ne!(a.mask, Sampler::new(2).sample(&m, 8).mask);
        assert_ne!(a.origin, Sampler::new(2).sample(&m, 8).origin);
    }

    #[test]
    fn a_restored_state_continues_the_same_stream() {
        let m = model();
        let mut s = Sampler::new(5);
        s.sample(&m, 3);
        let saved = s.state();
        let next = s.sample(&m, 4);
        assert_eq!(Sampler::restore(saved).sample(&m, 4), next);
        // Drawing one batch of 7 and two batches of 3 and 4 is the same stream.
        assert_eq!(
            Sampler::new(5).sample(&m, 7).mask[3 * 3 * 11..],
            next.mask[..]
        );
    }

    #[test]
    fn every_position_and_origin_comes_up_about_equally_often() {
        let m = model();
        let (area, mk, origins) = (m.window_area(), m.masked_per_window(), m.grid() - 3);
        let w = Sampler::new(11).sample(&m, 2000);
        let mut masked = vec![0usize; area];
        for &i in &w.mask {
            masked[i as usize] += 1;
        }
        let windows = 2000 * 3;
        let expect = (windows * mk) as f64 / area as f64;
        for (i, &c) in masked.iter().enumerate() {
            assert!(
                (c as f64 - expect).abs() < 0.05 * expect,
                "position {i}: {c} vs {expect}"
            );
        }
        let mut seen = vec![0usize; origins];
        for &o in &w.origin {
            seen[o as usize] += 1;
        }
        let expect = (windows * 2) as f64 / origins as f64;
        for (o, &c) in seen.iter().enumerate() {
            assert!(
                (c as f64 - expect).abs() < 0.1 * expect,
                "origin {o}: {c} vs {expect}"
            );
        }
    }
}
