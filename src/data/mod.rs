//! Training data: images, normalised like the reference recipe, combined with the
//! sampler's windows and masks into the batches the backends consume.

pub mod synthetic;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::batch::Batch;
use crate::config::ModelConfig;
use crate::sampler::{Sampler, SamplerState};
use synthetic::SyntheticImages;

/// ImageNet channel means and standard deviations (DESIGN.md §1.4).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// A colour value in [0, 1] of channel `c`, normalised.
pub fn normalise_pixel(c: usize, value: f32) -> f32 {
    (value - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
}

/// Where the data stream stands: the index of the next image to draw.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataState {
    pub next_image: u64,
}

/// Synthetic images plus sampled windows: the whole input pipeline of a run. Its state is
/// the sampler's and the data's, both restorable exactly.
pub struct BatchSource {
    model: ModelConfig,
    images: SyntheticImages,
    sampler: Sampler,
    data: DataState,
}

impl BatchSource {
    /// A fresh pipeline; `seed` is the run's seed.
    pub fn new(model: &ModelConfig, seed: u64) -> Self {
        Self::restore(
            model,
            seed,
            Sampler::new(seed).state(),
            DataState { next_image: 0 },
        )
    }

    /// Continues a pipeline from a checkpoint's states.
    pub fn restore(model: &ModelConfig, seed: u64, sampler: SamplerState, data: DataState) -> Self {
        BatchSource {
            model: model.clone(),
            images: SyntheticImages::new(seed, model.image),
            sampler: Sampler::restore(sampler),
            data,
        }
    }

    pub fn sampler_state(&self) -> SamplerState {
        self.sampler.state()
    }

    pub fn data_state(&self) -> DataState {
        self.data
    }

    /// The next `images` images with their windows and masks.
    pub fn next_batch(&mut self, images: usize) -> Batch {
        let side = self.model.image;
        let first = self.data.next_image;
        let mut pixels = vec![0.0f32; images * 3 * side * side];
        pixels
            .par_chunks_mut(3 * side * side)
            .enumerate()
            .for_each(|(i, out)| self.images.render(first + i as u64, out));
        self.data.next_image += images as u64;
        let windows = self.sampler.sample(&self.model, images);
        Batch {
            images_len: images,
            images: pixels,
            window_origin: windows.origin,
            mask_index: windows.mask,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::preset;

    #[test]
    fn batches_are_valid_and_resume_exactly() {
        let m = preset("tiny").unwrap();
        let mut a = BatchSource::new(&m, 5);
        let first = a.next_batch(3);
        first.validate(&m).unwrap();
        let mut b = BatchSource::restore(&m, 5, a.sampler_state(), a.data_state());
        assert_eq!(a.data_state().next_image, 3);
        let (next_a, next_b) = (a.next_batch(2), b.next_batch(2));
        assert_eq!(next_a, next_b);
        assert_ne!(next_a.images[..], first.images[..next_a.images.len()]);
        // One batch of 5 holds the same images as batches of 3 and 2.
        let whole = BatchSource::new(&m, 5).next_batch(5);
        assert_eq!(whole.images[first.images.len()..], next_a.images[..]);
    }
}
