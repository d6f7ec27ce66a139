//! Training data: the embedded synthetic images, an image folder or a folder of shards,
//! normalised like the reference recipe, combined with the sampler's windows and masks
//! into the batches the backends consume.

pub mod augment;
pub mod batch;
pub mod decode;
pub mod folder;
pub mod loader;
pub mod prefetch;
pub mod resize;
pub mod sampler;
pub mod shards;
pub mod synthetic;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Result};
use clap::Args;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::data::batch::{Batch, Pixels};
use crate::data::sampler::{Sampler, SamplerState};
use folder::ImageFolder;
use loader::{Blocks, Loader, LoaderOptions, Source};
use shards::{Part, ShardIndex, ShardSet, ShardStream};
use synthetic::SyntheticImages;

/// ImageNet channel means and standard deviations (docs/DESIGN.md §1.4).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Samples in a shard stream's shuffle buffer unless `--shuffle-buffer` says otherwise.
pub const DEFAULT_SHUFFLE_BUFFER: usize = 4096;

/// An 8-bit colour value of channel `c` as the model sees it: torchvision's `ToTensor`
/// then `Normalize`, in the same f32 operations (divide by 255, subtract the mean, divide
/// by the std). The GPU's window gather computes the same function of the same name.
#[inline]
pub fn normalise_pixel(c: usize, byte: u8) -> f32 {
    (byte as f32 / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
}

/// Where the data stream stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataState {
    /// Images drawn so far. For an image folder or shards, stream positions: epoch
    /// `next_image / N`, position `next_image mod N` in that epoch's order, unusable items
    /// included.
    pub next_image: u64,
    /// Present when the run reads an image folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub folder: Option<FolderState>,
    /// Present when the run reads a folder of shards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards: Option<ShardState>,
}

impl DataState {
    /// The synthetic stream at image `next_image`.
    pub fn synthetic(next_image: u64) -> Self {
        DataState {
            next_image,
            folder: None,
            shards: None,
        }
    }

    /// Files or samples found unusable so far; `None` for the synthetic images.
    pub fn skipped_files(&self) -> Option<u64> {
        match (&self.folder, &self.shards) {
            (Some(f), _) => Some(f.skipped.len() as u64),
            (_, Some(s)) => Some(s.skipped.len() as u64),
            _ => None,
        }
    }

    /// The folder the data came from, when not synthetic.
    fn path(&self) -> Option<&str> {
        match (&self.folder, &self.shards) {
            (Some(f), _) => Some(&f.path),
            (_, Some(s)) => Some(&s.path),
            _ => None,
        }
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

/// The folder of shards a run reads, as a checkpoint records it: with the position, all
/// that fixes the stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardState {
    /// The folder given to `--data`.
    pub path: String,
    /// Shards and samples in it (the stream depends on both).
    pub shards: u64,
    pub samples: u64,
    /// This reader's share: shards `rank, rank + world, …`.
    pub rank: u64,
    pub world: u64,
    pub shuffle_buffer: u64,
    /// Samples found unusable so far, by key.
    #[serde(default)]
    pub skipped: Vec<String>,
}

/// Where the images come from (`--data`), and how they are loaded.
#[derive(Args, Clone, Debug, Default)]
pub struct DataArgs {
    /// Train on the JPEG and PNG images in this folder tree (any nesting, e.g.
    /// imagenet/train), or on a folder of shards written by `lomar shards`, instead of the
    /// embedded synthetic images.
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,
    /// Threads decoding and augmenting images from --data [default: every core].
    #[arg(long, value_name = "N")]
    pub loader_threads: Option<usize>,
    /// Samples mixed in the shuffle buffer when --data is a folder of shards [default:
    /// 4096]. A resumed run keeps its checkpoint's.
    #[arg(long, value_name = "N")]
    pub shuffle_buffer: Option<usize>,
}

impl DataArgs {
    /// Decoding threads: the flag, else one per core.
    pub fn threads(&self) -> usize {
        self.loader_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

/// The images at `path` as a loader streams them: a folder of shards when it holds a shard
/// index (read as `part` with a `buffer`-sample shuffle buffer), else an image folder.
pub fn open_dataset(path: &Path, part: Part, buffer: usize) -> Result<Arc<dyn Source>> {
    Ok(if ShardIndex::is_in(path) {
        Arc::new(ShardStream::new(ShardSet::open(path)?, part, buffer)?)
    } else {
        Arc::new(ImageFolder::scan(path)?)
    })
}

/// What a shard stream's checkpoint entry records besides the skipped samples.
#[derive(Clone, Debug)]
struct ShardInfo {
    path: String,
    shards: u64,
    samples: u64,
    part: Part,
    buffer: usize,
}

enum Images {
    Synthetic { images: SyntheticImages, next: u64 },
    Folder { loader: Loader, path: String },
    Shards { loader: Loader, info: ShardInfo },
}

/// Images plus sampled windows: the whole input pipeline of a run. Its state is the
/// sampler's and the data's, both restorable exactly.
///
/// In a data-parallel run (`share.world > 1`) the windows, the synthetic images and an
/// image folder's order are the global ones: a micro-batch of `B` on rank `r` is images
/// `r·B .. (r+1)·B` of the `world·B` that one process would draw, and the state after it
/// is the global state, the same on every rank. A folder of shards is read as `share`'s
/// shards instead (each rank its own stream).
pub struct BatchSource {
    model: ModelConfig,
    images: Images,
    sampler: Sampler,
    share: Part,
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
            share: Part::default(),
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
        Self::open_share(model, seed, batch, data, resumed, Part::default())
    }

    /// [`BatchSource::open`] for rank `share.rank` of a data-parallel run of `share.world`
    /// ranks, each drawing micro-batches of `batch`.
    pub fn open_share(
        model: &ModelConfig,
        seed: u64,
        batch: usize,
        data: &DataArgs,
        resumed: Option<(SamplerState, DataState)>,
        share: Part,
    ) -> Result<Self> {
        let resuming = resumed.is_some();
        let (sampler, state) = match resumed {
            Some((s, d)) => (Sampler::restore(s), d),
            None => (Sampler::new(seed), DataState::synthetic(0)),
        };
        let path = match (state.path(), &data.data) {
            (None, Some(path)) if resuming => bail!(
                "--data {}: the checkpoint's run trained on the embedded synthetic images, and a resumed run keeps its data",
                path.display()
            ),
            (None, path) => path.clone(),
            (Some(recorded), path) => Some(path.clone().unwrap_or_else(|| PathBuf::from(recorded))),
        };
        let images = match path {
            None => Images::Synthetic {
                images: SyntheticImages::new(seed, model.image),
                next: state.next_image,
            },
            Some(path) => {
                let threads = data.threads();
                let opts = LoaderOptions {
                    side: model.image,
                    seed,
                    threads,
                    prefetch: (2 * batch).max(2 * threads),
                };
                if ShardIndex::is_in(&path) {
                    open_shards(&path, opts, data, &state, share)?
                } else {
                    let blocks = Blocks {
                        rank: share.rank,
                        world: share.world,
                        block: batch,
                    };
                    open_folder(&path, opts, &state, blocks)?
                }
            }
        };
        Ok(BatchSource {
            model: model.clone(),
            images,
            sampler,
            share,
        })
    }

    pub fn sampler_state(&self) -> SamplerState {
        self.sampler.state()
    }

    pub fn data_state(&self) -> DataState {
        match &self.images {
            Images::Synthetic { next, .. } => DataState::synthetic(*next),
            Images::Folder { loader, path } => DataState {
                next_image: loader.position(),
                folder: Some(FolderState {
                    path: path.clone(),
                    files: loader.epoch_len() as u64,
                    skipped: loader.skipped_keys(),
                }),
                shards: None,
            },
            Images::Shards { loader, info } => DataState {
                next_image: loader.position(),
                folder: None,
                shards: Some(ShardState {
                    path: info.path.clone(),
                    shards: info.shards,
                    samples: info.samples,
                    rank: info.part.rank as u64,
                    world: info.part.world as u64,
                    shuffle_buffer: info.buffer as u64,
                    skipped: loader.skipped_keys(),
                }),
            },
        }
    }

    /// One line saying where the images come from, for the run header.
    pub fn describe(&self) -> String {
        const AUGMENT: &str = "RandomResizedCrop 0.2-1, flip, ImageNet normalisation";
        match &self.images {
            Images::Synthetic { .. } => "embedded synthetic images".to_string(),
            Images::Folder { loader, path } => format!(
                "{path} ({} files, epoch {}, {} loader threads; {AUGMENT})",
                loader.epoch_len(),
                loader.position() / loader.epoch_len() as u64,
                loader.threads()
            ),
            Images::Shards { loader, info } => format!(
                "{} ({} shards, {} samples; rank {} of {} reads {} per epoch, epoch {}, shuffle buffer {}, {} loader threads; {AUGMENT})",
                info.path,
                info.shards,
                info.samples,
                info.part.rank,
                info.part.world,
                loader.epoch_len(),
                loader.position() / loader.epoch_len() as u64,
                info.buffer,
                loader.threads()
            ),
        }
    }

    /// The next `images` images with their windows and masks: this rank's share of the
    /// next `world · images`.
    pub fn next_batch(&mut self, images: usize) -> Result<Batch> {
        let side = self.model.image;
        let size = 3 * side * side;
        let mut pixels = vec![0u8; images * size];
        let mine = self.share.rank * images;
        let global = self.share.world * images;
        match &mut self.images {
            Images::Synthetic {
                images: synth,
                next,
            } => {
                let first = *next + mine as u64;
                pixels
                    .par_chunks_mut(size)
                    .enumerate()
                    .for_each(|(i, out)| synth.render_bytes(first + i as u64, out));
                *next += global as u64;
            }
            Images::Folder { loader, .. } | Images::Shards { loader, .. } => {
                for out in pixels.chunks_exact_mut(size) {
                    loader.next_into(out)?;
                }
            }
        }
        let windows = self.sampler.sample(&self.model, global);
        let per_image = |len: usize| len / global;
        let (o, m) = (
            per_image(windows.origin.len()),
            per_image(windows.mask.len()),
        );
        Ok(Batch {
            images_len: images,
            images: Pixels::Bytes(pixels),
            window_origin: windows.origin[mine * o..(mine + images) * o].to_vec(),
            mask_index: windows.mask[mine * m..(mine + images) * m].to_vec(),
        })
    }
}

/// The image folder at `path`, at the position `state` records.
fn open_folder(
    path: &Path,
    opts: LoaderOptions,
    state: &DataState,
    blocks: Blocks,
) -> Result<Images> {
    if let Some(s) = &state.shards {
        bail!(
            "--data {}: the checkpoint's run read the shards in {}; a resumed run keeps its data (give that folder of shards)",
            path.display(),
            s.path
        );
    }
    let folder = ImageFolder::scan(path)?;
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
    let loader = Loader::open_blocks(Arc::new(folder), opts, state.next_image, skipped, blocks)?;
    Ok(Images::Folder {
        loader,
        path: path.to_string_lossy().into_owned(),
    })
}

/// The folder of shards at `path`, at the position `state` records, read as `share`: a
/// resumed run keeps the recorded world size and shuffle buffer.
fn open_shards(
    path: &Path,
    opts: LoaderOptions,
    data: &DataArgs,
    state: &DataState,
    share: Part,
) -> Result<Images> {
    if let Some(f) = &state.folder {
        bail!(
            "--data {}: the checkpoint's run read the image folder {}; a resumed run keeps its data (give that folder)",
            path.display(),
            f.path
        );
    }
    let set = ShardSet::open(path)?;
    let (shards, samples) = (set.index().shards.len() as u64, set.len() as u64);
    let (part, buffer, skipped) = match &state.shards {
        Some(s) => {
            if let Some(b) = data
                .shuffle_buffer
                .filter(|&b| b as u64 != s.shuffle_buffer)
            {
                bail!(
                    "--shuffle-buffer {b}: the checkpoint's run used {}; a resumed run keeps its stream",
                    s.shuffle_buffer
                );
            }
            if (s.shards, s.samples) != (shards, samples) {
                eprintln!(
                    "warning: {} held {} shards of {} samples when the checkpoint was written and holds {shards} of {samples} now: the resumed run sees a different order than the original would have",
                    path.display(),
                    s.shards,
                    s.samples
                );
            }
            if s.world != share.world as u64 {
                bail!(
                    "the checkpoint's run read its shards as {} ranks, this run has {}: a run on shards resumes on the same number of ranks (each rank's stream is its own shards)",
                    s.world,
                    share.world
                );
            }
            (share, s.shuffle_buffer as usize, s.skipped.as_slice())
        }
        None => (
            share,
            data.shuffle_buffer.unwrap_or(DEFAULT_SHUFFLE_BUFFER),
            &[][..],
        ),
    };
    let stream = ShardStream::new(set, part, buffer)?;
    let loader = Loader::open(Arc::new(stream), opts, state.next_image, skipped)?;
    Ok(Images::Shards {
        loader,
        info: ShardInfo {
            path: path.to_string_lossy().into_owned(),
            shards,
            samples,
            part,
            buffer,
        },
    })
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
        let bytes = |b: &Batch| match &b.images {
            Pixels::Bytes(v) => v.clone(),
            Pixels::Normalised(_) => panic!("the data sources make bytes"),
        };
        let (first, next_a) = (bytes(&first), bytes(&next_a));
        assert_ne!(next_a[..], first[..next_a.len()]);
        // One batch of 5 holds the same images as batches of 3 and 2.
        let whole = bytes(&BatchSource::new(&m, 5).next_batch(5).unwrap());
        assert_eq!(whole[first.len()..], next_a[..]);
    }
}
