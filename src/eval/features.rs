//! Frozen-encoder features of a labelled image collection, and the features file.
//!
//! A collection is anything that implements [`LabelledImages`]: the embedded synthetic
//! images (labelled by the family of their foreground element) or an image folder
//! (labelled by the top-level sub-folder each file lies in). The features file is safetensors: `features`
//! `[N, D]` F32 and `labels` `[N]` I64, with the class names and how the features were made
//! in the metadata.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::cpu::encoder::Encoder;
use crate::data::augment::load_centred;
use crate::data::folder::ImageFolder;
use crate::data::shards::{ShardIndex, ShardSet};
use crate::data::synthetic::{Family, SyntheticImages};
use crate::io::finite::first_non_finite;
use crate::io::tensor_file::{write_atomic, OutTensor, TensorFile};

/// `format` metadata of a features file.
pub const FEATURES_FORMAT: &str = "lomar-features";

/// Square images with class labels, addressed by index.
pub trait LabelledImages: Sync {
    /// Images in the collection.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Image side in pixels.
    fn side(&self) -> usize;
    /// Class names; a label indexes into them.
    fn classes(&self) -> Vec<String>;
    fn label(&self, index: usize) -> Result<u32>;
    /// Writes image `index`, normalised like the training data, into `out`
    /// (`[3, side, side]`); Err says why the image is unusable (it is then skipped).
    fn load(&self, index: usize, out: &mut [f32]) -> Result<(), String>;
    /// Image `index` named for a warning.
    fn name(&self, index: usize) -> String;
}

/// The first `len` embedded synthetic images of a seed, labelled by family.
pub struct SyntheticSource {
    images: SyntheticImages,
    side: usize,
    len: usize,
}

impl SyntheticSource {
    pub fn new(seed: u64, side: usize, len: usize) -> Self {
        SyntheticSource {
            images: SyntheticImages::new(seed, side),
            side,
            len,
        }
    }
}

impl LabelledImages for SyntheticSource {
    fn len(&self) -> usize {
        self.len
    }
    fn side(&self) -> usize {
        self.side
    }
    fn classes(&self) -> Vec<String> {
        Family::ALL
            .iter()
            .map(|f| format!("{f:?}").to_lowercase())
            .collect()
    }
    fn label(&self, index: usize) -> Result<u32> {
        let family = self.images.label(index as u64);
        let label = Family::ALL.iter().position(|&f| f == family);
        label
            .map(|l| l as u32)
            .ok_or_else(|| anyhow!("internal: family {family:?} is missing from Family::ALL"))
    }
    fn load(&self, index: usize, out: &mut [f32]) -> Result<(), String> {
        self.images.render(index as u64, out);
        Ok(())
    }
    fn name(&self, index: usize) -> String {
        format!("embedded image {index}")
    }
}

/// An image folder with one sub-folder per class (ImageNet's `val/<class>/<file>`
/// layout), every image centre-cropped to a square and resized as at evaluation.
pub struct FolderSource {
    folder: ImageFolder,
    /// The files used, indices into `folder`: all, or `max_images` spread evenly.
    files: Vec<usize>,
    labels: Vec<u32>,
    classes: Vec<String>,
    side: usize,
}

impl FolderSource {
    /// Scans `root`; `max_images` keeps that many files spread evenly over the sorted
    /// list, so every class keeps its share.
    pub fn open(root: &Path, side: usize, max_images: Option<usize>) -> Result<Self> {
        let folder = ImageFolder::scan(root)?;
        let n = folder.len();
        let files: Vec<usize> = match max_images {
            Some(count) if count < n => (0..count).map(|i| i * n / count).collect(),
            _ => (0..n).collect(),
        };
        let class_of = |f: usize| -> Result<String> {
            let relative = folder.relative(f);
            let mut parts = relative.components();
            match (parts.next(), parts.next()) {
                (Some(class), Some(_)) => Ok(class.as_os_str().to_string_lossy().into_owned()),
                _ => bail!(
                    "--data {}: {} lies directly in the folder; labelled images go in one sub-folder per class",
                    root.display(),
                    relative.display()
                ),
            }
        };
        let names = files
            .iter()
            .map(|&f| class_of(f))
            .collect::<Result<Vec<_>>>()?;
        let mut classes = names.clone();
        classes.sort_unstable();
        classes.dedup();
        let labels = names
            .iter()
            .map(|c| classes.binary_search(c).map_or(0, |i| i as u32))
            .collect();
        Ok(FolderSource {
            folder,
            files,
            labels,
            classes,
            side,
        })
    }

    fn path(&self, index: usize) -> PathBuf {
        self.folder.path(self.files[index])
    }
}

impl LabelledImages for FolderSource {
    fn len(&self) -> usize {
        self.files.len()
    }
    fn side(&self) -> usize {
        self.side
    }
    fn classes(&self) -> Vec<String> {
        self.classes.clone()
    }
    fn label(&self, index: usize) -> Result<u32> {
        Ok(self.labels[index])
    }
    fn load(&self, index: usize, out: &mut [f32]) -> Result<(), String> {
        out.copy_from_slice(&load_centred(&self.path(index), self.side)?);
        Ok(())
    }
    fn name(&self, index: usize) -> String {
        self.path(index).display().to_string()
    }
}

/// A folder of shards (from `lomar shards`), labelled by each sample's class, every
/// image centre-cropped to a square and resized as at evaluation.
pub struct ShardSource {
    set: ShardSet,
    /// The samples used: all, or `max_images` spread evenly.
    ids: Vec<u64>,
    side: usize,
}

impl ShardSource {
    pub fn open(dir: &Path, side: usize, max_images: Option<usize>) -> Result<Self> {
        let set = ShardSet::open(dir)?;
        let n = set.len() as u64;
        let ids = match max_images {
            Some(count) if (count as u64) < n => {
                (0..count as u64).map(|i| i * n / count as u64).collect()
            }
            _ => (0..n).collect(),
        };
        Ok(ShardSource { set, ids, side })
    }
}

impl LabelledImages for ShardSource {
    fn len(&self) -> usize {
        self.ids.len()
    }
    fn side(&self) -> usize {
        self.side
    }
    fn classes(&self) -> Vec<String> {
        self.set.index().classes.clone()
    }
    fn label(&self, index: usize) -> Result<u32> {
        self.set
            .label(self.ids[index])
            .map_err(|why| anyhow!("{}: {why}", self.name(index)))
    }
    fn load(&self, index: usize, out: &mut [f32]) -> Result<(), String> {
        let id = self.ids[index];
        // A sample without a usable class is as unusable as one without an image.
        self.set.label(id)?;
        out.copy_from_slice(&self.set.centred(id, self.side)?);
        Ok(())
    }
    fn name(&self, index: usize) -> String {
        self.set.name(self.ids[index])
    }
}

/// One feature vector per image, with its label.
#[derive(Clone, Debug, PartialEq)]
pub struct Features {
    /// Feature width `D`.
    pub dim: usize,
    /// `[N, D]`.
    pub values: Vec<f32>,
    /// `[N]`, indices into `classes`.
    pub labels: Vec<u32>,
    pub classes: Vec<String>,
}

/// How a features file was made, kept in its metadata.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub checkpoint: String,
    pub step: u64,
    pub data: String,
    pub view: String,
    pub pool: String,
    pub image: usize,
}

impl Features {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Runs `encoder` over every image of `source`, a chunk at a time; `progress` hears
    /// the images done so far after each chunk.
    pub fn extract(
        encoder: &Encoder,
        source: &dyn LabelledImages,
        mut progress: impl FnMut(usize),
    ) -> Result<Features> {
        if source.is_empty() {
            bail!("the image collection is empty");
        }
        if 3 * source.side() * source.side() != encoder.image_len() {
            bail!(
                "images are {0}x{0} pixels, the encoder was built for another size",
                source.side()
            );
        }
        let (n, len) = (source.len(), encoder.image_len());
        let chunk = encoder.images_per_chunk().clamp(1, 256);
        let mut values = Vec::with_capacity(n * encoder.width());
        let mut labels = Vec::with_capacity(n);
        let mut pixels = vec![0.0f32; chunk * len];
        for first in (0..n).step_by(chunk) {
            let count = chunk.min(n - first);
            let loaded: Vec<Result<(), String>> = pixels[..count * len]
                .par_chunks_mut(len)
                .enumerate()
                .map(|(i, out)| source.load(first + i, out))
                .collect();
            // Unusable images are dropped and the usable ones packed to the front.
            let mut kept = Vec::with_capacity(count);
            for (i, result) in loaded.into_iter().enumerate() {
                match result {
                    Ok(()) => {
                        pixels.copy_within(i * len..(i + 1) * len, kept.len() * len);
                        labels.push(source.label(first + i)?);
                        kept.push(first + i);
                    }
                    Err(why) => eprintln!("warning: skipping {}: {why}", source.name(first + i)),
                }
            }
            if !kept.is_empty() {
                let chunk_values = encoder.features(&pixels[..kept.len() * len]);
                if let Some(bad) = first_non_finite(&chunk_values) {
                    bail!(
                        "the feature of {} is not finite ({}): the encoder's weights overflow",
                        source.name(kept[bad / encoder.width()]),
                        chunk_values[bad]
                    );
                }
                values.extend(chunk_values);
            }
            progress(first + count);
        }
        if labels.is_empty() {
            bail!("none of the {n} images could be read");
        }
        Ok(Features {
            dim: encoder.width(),
            values,
            labels,
            classes: source.classes(),
        })
    }

    /// Writes the features atomically with their provenance.
    pub fn save(&self, path: &Path, provenance: &Provenance) -> Result<()> {
        let labels: Vec<i64> = self.labels.iter().map(|&l| l as i64).collect();
        let tensors = [
            OutTensor::f32("features", &[self.len(), self.dim], &self.values),
            OutTensor::i64("labels", &[self.len()], &labels),
        ];
        let meta = HashMap::from([
            ("format".to_string(), FEATURES_FORMAT.to_string()),
            (
                "lomar_version".to_string(),
                env!("CARGO_PKG_VERSION").to_string(),
            ),
            ("classes".to_string(), serde_json::to_string(&self.classes)?),
            ("provenance".to_string(), serde_json::to_string(provenance)?),
        ]);
        write_atomic(path, &tensors, meta)
            .with_context(|| format!("cannot write features file {}", path.display()))
    }

    /// Reads a features file, checking shapes and labels.
    pub fn load(path: &Path) -> Result<Features> {
        let file = TensorFile::open(path, "features file")?;
        if file.metadata("format") != Some(FEATURES_FORMAT) {
            bail!(
                "{} is not a lomar features file (its metadata has no `format: {FEATURES_FORMAT}`)",
                path.display()
            );
        }
        let classes: Vec<String> = file.required_json("classes")?;
        let (shape, values) = file.f32("features")?;
        let [n, dim] = shape[..] else {
            bail!(
                "{}: tensor `features` has shape {shape:?}, want [N, D]",
                path.display()
            );
        };
        let (label_shape, labels) = file.indices("labels")?;
        if label_shape != [n] {
            bail!(
                "{}: tensor `labels` has shape {label_shape:?}, want [{n}] (one per feature row)",
                path.display()
            );
        }
        if let Some(bad) = labels.iter().find(|&&l| l as usize >= classes.len()) {
            bail!(
                "{}: label {bad} is outside the {} classes of the metadata",
                path.display(),
                classes.len()
            );
        }
        if n == 0 || dim == 0 {
            bail!("{}: holds no features", path.display());
        }
        Ok(Features {
            dim,
            values,
            labels,
            classes,
        })
    }
}

/// The labelled collection `--data` names: `synthetic` for the embedded images
/// (`images` of them, default 2000, drawn from `seed`), a folder of shards (labelled by
/// their `.cls`), else an image folder with one sub-folder per class (every file, or
/// `images` spread evenly over them); `side` pixels wide.
pub fn open_source(
    data: &str,
    side: usize,
    images: Option<usize>,
    seed: u64,
) -> Result<Box<dyn LabelledImages>> {
    if images == Some(0) {
        bail!("images = 0: must be at least 1");
    }
    match data {
        "synthetic" => Ok(Box::new(SyntheticSource::new(
            seed,
            side,
            images.unwrap_or(2000),
        ))),
        path if ShardIndex::is_in(Path::new(path)) => {
            Ok(Box::new(ShardSource::open(Path::new(path), side, images)?))
        }
        path => Ok(Box::new(FolderSource::open(Path::new(path), side, images)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_files_round_trip_and_bad_labels_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.safetensors");
        let feats = Features {
            dim: 3,
            values: (0..12).map(|i| i as f32 * 0.5 - 2.0).collect(),
            labels: vec![0, 2, 1, 2],
            classes: vec!["a".into(), "b".into(), "c".into()],
        };
        let prov = Provenance {
            checkpoint: "c".into(),
            step: 3,
            data: "synthetic".into(),
            view: "image".into(),
            pool: "cls".into(),
            image: 32,
        };
        feats.save(&path, &prov).unwrap();
        assert_eq!(Features::load(&path).unwrap(), feats);
        let fewer = Features {
            classes: vec!["a".into(), "b".into()],
            ..feats
        };
        fewer.save(&path, &prov).unwrap();
        let err = Features::load(&path).unwrap_err().to_string();
        assert!(err.contains("label 2 is outside the 2 classes"), "{err}");
    }

    #[test]
    fn synthetic_labels_are_the_families() {
        let source = SyntheticSource::new(3, 32, 50);
        let images = SyntheticImages::new(3, 32);
        let classes = source.classes();
        assert_eq!(classes.len(), 6);
        for i in 0..50 {
            let label = source.label(i).unwrap() as usize;
            assert_eq!(
                classes[label],
                format!("{:?}", images.label(i as u64)).to_lowercase()
            );
        }
    }
}
