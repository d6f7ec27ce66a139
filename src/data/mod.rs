//! Training data: the embedded synthetic images or an image folder, normalised like the
//! reference recipe, combined with the sampler's windows and masks into the batches the
//! backends consume.

pub mod augment;
pub mod batch;
pub mod decode;
pub mod folder;
pub mod loader;
pub mod prefetch;
pub mod resize;
pub mod sampler;
pub mod synthetic;

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::data::batch::Batch;
use crate::data::sampler::{Sampler, SamplerState};
use folder::ImageFolder;
use loader::{Loader, LoaderOptions};
use synthetic::SyntheticImages;

/// ImageNet channel means and standard deviations (docs/DESIGN.md §1.4).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// A colour value in [0, 1] of channel `c`, normalised.
pub fn normalise_pixel(c: usize, value: f32) -> f32 {
    (value - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
}

/// Where the data stream stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataState {
    /// Images drawn so far. For an image folder, stream positions: epoch `next_image / N`,
    /// position `next_image mod N` in that epoch's shuffle, unusable files included.
    pub next_image: u64,
    /// Present when the run reads an image folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub folder: Option<FolderState>,
}

impl DataState {
    /// The synthetic stream at image `next_image`.
    pub fn synthetic(next_image: u64) -> Self {
        DataState {
            next_image,
            folder: None,
        }
    }

    /// Files found unusable so far; `None` for the synthetic images.
    pub fn skipped_files(&self) -> Option<u64> {
        self.folder.as_ref().map(|f| f.skipped.len() as u64)
    }
}

/// The image folder a run reads, as a checkpoint records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FolderState {
    /// The folder given to `--data`.
    pub path: String,
    /// Files it held (the shuffles depend on this count).
    pub files: u64,
    /// Files found unusable so far, relative to `path`.
    #[serde(default)]
    pub skipped: Vec<String>,
}

/// Where the images come from (`--data`), and how they are loaded.
#[derive(Args, Clone, Debug, Default)]
pub struct DataArgs {
    /// Train on the JPEG and PNG images in this folder tree (any nesting, e.g.
    /// imagenet/train) instead of the embedded synthetic images.
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,
    /// Threads decoding and augmenting images from --data [default: every core].
    #[arg(long, value_name = "N")]
    pub loader_threads: Option<usize>,
}

impl DataArgs {
    /// Decoding threads: the flag, else one per core.
    pub fn threads(&self) -> usize {
        self.loader_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

enum Images {
    Synthetic { images: SyntheticImages, next: u64 },
    Folder(Loader),
}

/// Images plus sampled windows: the whole input pipeline of a run. Its state is the
/// sampler's and the data's, both restorable exactly.
pub struct BatchSource {
    model: ModelConfig,
    images: Images,
    sampler: Sampler,
}

impl BatchSource {
    /// A fresh pipeline on the embedded synthetic images; `seed` is the run's seed.
    pub fn new(model: &ModelConfig, seed: u64) -> Self {
        BatchSource {
            model: model.clone(),
            images: Images::Synthetic {
                images: SyntheticImages::new(seed, model.image),
                next: 0,
            },
            sampler: Sampler::new(seed),
        }
    }

    /// The pipeline a run asks for: `data` chooses the images; `resumed` (a checkpoint's
    /// states) continues a run exactly, on the data it trained on. `batch` is the
    /// micro-batch, which sizes the loader's prefetch queue.
    pub fn open(
        model: &ModelConfig,
        seed: u64,
        batch: usize,
        data: &DataArgs,
        resumed: Option<(SamplerState, DataState)>,
    ) -> Result<Self> {
        let resuming = resumed.is_some();
        let (sampler, state) = match resumed {
            Some((s, d)) => (Sampler::restore(s), d),
            None => (Sampler::new(seed), DataState::synthetic(0)),
        };
        let folder_path = match (&state.folder, &data.data) {
            (None, Some(path)) if resuming => bail!(
                "--data {}: the checkpoint's run trained on the embedded synthetic images, and a resumed run keeps its data",
                path.display()
            ),
            (None, path) => path.clone(),
            (Some(f), path) => Some(path.clone().unwrap_or_else(|| PathBuf::from(&f.path))),
        };
        let images = match folder_path {
            None => Images::Synthetic {
                images: SyntheticImages::new(seed, model.image),
                next: state.next_image,
            },
            Some(path) => {
                let folder = ImageFolder::scan(&path)?;
                let mut skipped: &[String] = &[];
                if let Some(f) = &state.folder {
                    if f.files != folder.len() as u64 {
                        eprintln!(
                            "warning: {} held {} files when the checkpoint was written and holds {} now: the resumed run sees a different image order than the original would have",
                            path.display(),
                            f.files,
                            folder.len()
                        );
                    }
                    skipped = &f.skipped;
                }
                let threads = data.threads();
                let opts = LoaderOptions {
                    side: model.image,
                    seed,
                    threads,
                    prefetch: (2 * batch).max(2 * threads),
                };
                Images::Folder(Loader::open(folder, opts, state.next_image, skipped)?)
            }
        };
        Ok(BatchSource {
            model: model.clone(),
            images,
            sampler,
        })
    }

    pub fn sampler_state(&self) -> SamplerState {
        self.sampler.state()
    }

    pub fn data_state(&self) -> DataState {
        match &self.images {
            Images::Synthetic { next, .. } => DataState::synthetic(*next),
            Images::Folder(loader) => DataState {
                next_image: loader.position(),
                folder: Some(loader.state()),
            },
        }
    }

    /// One line saying where the images come from, for the run header.
    pub fn describe(&self) -> String {
        match &self.images {
            Images::Synthetic { .. } => "embedded synthetic images".to_string(),
            Images::Folder(loader) => {
                let state = loader.state();
                format!(
                    "{} ({} files, epoch {}, {} loader threads; RandomResizedCrop 0.2-1, flip, ImageNet normalisation)",
                    state.path,
                    state.files,
                    loader.position() / state.files,
                    loader.threads()
                )
            }
        }
    }

    /// The next `images` images with their windows and masks.
    pub fn next_batch(&mut self, images: usize) -> Result<Batch> {
        let side = self.model.image;
        let size = 3 * side * side;
        let mut pixels = vec![0.0f32; images * size];
        match &mut self.images {
            Images::Synthetic {
                images: synth,
                next,
            } => {
                let first = *next;
                pixels
                    .par_chunks_mut(size)
                    .enumerate()
                    .for_each(|(i, out)| synth.render(first + i as u64, out));
                *next += images as u64;
            }
            Images::Folder(loader) => {
                for out in pixels.chunks_exact_mut(size) {
                    loader.next_into(out)?;
                }
            }
        }
        let windows = self.sampler.sample(&self.model, images);
        Ok(Batch {
            images_len: images,
            images: pixels,
            window_origin: windows.origin,
            mask_index: windows.mask,
        })
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
        let first = a.next_batch(3).unwrap();
        first.validate(&m).unwrap();
        let resumed = Some((a.sampler_state(), a.data_state()));
        let mut b = BatchSource::open(&m, 5, 4, &DataArgs::default(), resumed).unwrap();
        assert_eq!(a.data_state(), DataState::synthetic(3));
        let (next_a, next_b) = (a.next_batch(2).unwrap(), b.next_batch(2).unwrap());
        assert_eq!(next_a, next_b);
        assert_ne!(next_a.images[..], first.images[..next_a.images.len()]);
        // One batch of 5 holds the same images as batches of 3 and 2.
        let whole = BatchSource::new(&m, 5).next_batch(5).unwrap();
        assert_eq!(whole.images[first.images.len()..], next_a.images[..]);
    }
}
