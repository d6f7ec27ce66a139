//! The index file of a shard folder (docs/DESIGN.md §2.9): what `lomar shards` wrote, so a
//! reader knows every shard's sample count and byte size, the class names and each image's
//! size before opening a tar, and can tell a folder of shards from an image folder.

use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The index's file name inside a shard folder; its presence makes `--data` read shards.
pub const INDEX_FILE: &str = "lomar-shards.json";
/// `format` of the index.
pub const INDEX_FORMAT: &str = "lomar-shards";
/// The index layout this build reads and writes.
pub const INDEX_VERSION: u32 = 1;

/// How the images are stored in the shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// `<key>.jpg`: a baseline JPEG.
    Jpeg,
    /// `<key>.rgb`: the 8-bit RGB pixels, row-major, channels interleaved, no header (the
    /// size is in the index).
    Raw,
}

impl ImageFormat {
    /// The member extension of a sample's image.
    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::Jpeg => "jpg",
            ImageFormat::Raw => "rgb",
        }
    }
}

/// One tar file of the set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// File name, relative to the shard folder.
    pub file: String,
    /// The file's size in bytes.
    pub bytes: u64,
    /// `[width, height]` of each sample's image, in member order; its length is the
    /// shard's sample count.
    pub sizes: Vec<[u32; 2]>,
}

/// A source file that could not be converted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedFile {
    /// Relative to the converted folder.
    pub file: String,
    pub why: String,
}

/// The whole index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardIndex {
    pub format: String,
    pub version: u32,
    pub image_format: ImageFormat,
    /// No image side exceeds this.
    pub max_side: u32,
    /// JPEG quality (JPEG shards only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<u8>,
    /// Class names; a sample's `.cls` indexes into them.
    pub classes: Vec<String>,
    /// Files found in the source folder.
    pub source_files: u64,
    pub skipped: Vec<SkippedFile>,
    pub shards: Vec<ShardEntry>,
}

impl ShardIndex {
    /// Samples in all shards.
    pub fn samples(&self) -> u64 {
        self.shards.iter().map(|s| s.sizes.len() as u64).sum()
    }

    /// Whether `dir` holds a shard index (and so is read as shards).
    pub fn is_in(dir: &Path) -> bool {
        dir.join(INDEX_FILE).is_file()
    }

    /// Reads and checks the index of the shard folder `dir`.
    pub fn load(dir: &Path) -> Result<ShardIndex> {
        let path = dir.join(INDEX_FILE);
        let text =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let index: ShardIndex = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a lomar shard index", path.display()))?;
        index
            .check()
            .with_context(|| format!("{}: a malformed shard index", path.display()))?;
        Ok(index)
    }

    fn check(&self) -> Result<()> {
        if self.format != INDEX_FORMAT {
            bail!("format is {:?}, want {INDEX_FORMAT:?}", self.format);
        }
        if self.version != INDEX_VERSION {
            bail!(
                "version {} (this lomar reads version {INDEX_VERSION}; convert the images again)",
                self.version
            );
        }
        if self.samples() == 0 {
            bail!("it lists no samples");
        }
        if self.classes.is_empty() {
            bail!("it lists no classes (every sample has one)");
        }
        for s in &self.shards {
            // A shard is a plain file name inside the folder, never a path out of it.
            if s.file.is_empty() || s.file.contains(['/', '\\']) || s.file.starts_with('.') {
                bail!("shard file name {:?} is not a file in the folder", s.file);
            }
            if let Some(bad) = s.sizes.iter().find(|&&[w, h]| {
                w == 0 || h == 0 || w.max(h) > self.max_side.max(1) || {
                    (w as u64) * (h as u64) * 3 > super::MAX_IMAGE_BYTES
                }
            }) {
                bail!(
                    "{}: image size {}x{} is empty or above the max side {}",
                    s.file,
                    bad[0],
                    bad[1],
                    self.max_side
                );
            }
        }
        Ok(())
    }

    /// Writes the index into `dir` atomically (a temporary file renamed over it), so a
    /// folder never holds half an index.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(INDEX_FILE);
        let tmp = dir.join(format!("{INDEX_FILE}.tmp"));
        let text = serde_json::to_string(self)? + "\n";
        fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
        fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))
    }
}
