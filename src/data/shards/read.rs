//! Reading a shard folder: every tar is checked against the index when the folder is
//! opened (so a truncated or foreign shard is refused before training, naming it), each
//! sample's image member located by its byte offset, and an image read with one positioned
//! read of just the bytes it needs. Workers read concurrently through shared file handles;
//! nothing is copied into memory ahead of use.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::index::{ImageFormat, ShardEntry, ShardIndex};
use crate::data::augment::{crop_resize_flip, to_tensor, Augment, CropBox};
use crate::data::decode::Decoder;
use crate::data::loader::{shuffle, Source};
use crate::data::resize::RgbView;

/// Keeps the shard-order and shuffle-buffer streams apart from the other streams of the
/// same seed.
const SHARD_SALT: u64 = 0x63f1_0b9d_84e2_a5c7;

/// The key of global sample `id` (its member names are `<key>.jpg` or `.rgb`, `<key>.cls`).
pub fn sample_key(id: u64) -> String {
    format!("{id:09}")
}

/// Where a sample's image lies in its shard.
#[derive(Clone, Copy, Debug)]
struct Sample {
    offset: u64,
    len: u64,
    label: u32,
}

/// One shard's samples as its tar holds them.
struct Scanned {
    file: File,
    samples: Vec<Sample>,
    /// Samples that cannot be used (index in the shard, why).
    bad: Vec<(usize, String)>,
}

/// A member's key and extension, split as webdataset splits them: at the first dot of
/// the file name.
fn split_member(path: &str) -> (&str, &str) {
    let base = path.rfind('/').map_or(0, |i| i + 1);
    match path[base..].find('.') {
        Some(dot) => (&path[..base + dot], &path[base + dot + 1..]),
        None => (path, ""),
    }
}

/// A sample being gathered from consecutive members of one key.
#[derive(Default)]
struct Pending {
    key: String,
    image: Option<(u64, u64)>,
    label: Option<Result<u32, String>>,
}

/// Reads one shard's tar headers (and its `.cls` members), checking it against its
/// index entry. Errors are the reasons to refuse the whole folder.
fn scan_shard(
    dir: &Path,
    entry: &ShardEntry,
    first: u64,
    format: ImageFormat,
    classes: usize,
) -> Result<Scanned> {
    let name = &entry.file;
    let path = dir.join(name);
    let file = File::open(&path).with_context(|| format!("cannot open shard {name}"))?;
    let bytes = file
        .metadata()
        .with_context(|| format!("cannot read shard {name}"))?
        .len();
    if bytes != entry.bytes {
        bail!(
            "shard {name} is {bytes} bytes, the index says {}: it was cut short or replaced after conversion (convert the images again)",
            entry.bytes
        );
    }
    let mut archive = tar::Archive::new(&file);
    let entries = archive
        .entries_with_seek()
        .with_context(|| format!("cannot read shard {name}"))?;
    // Consecutive members of one key form a sample, as webdataset groups them.
    let mut gathered: Vec<Pending> = Vec::with_capacity(entry.sizes.len());
    let image_ext = format.extension();
    for member in entries {
        let mut member = member.with_context(|| {
            format!(
                "shard {name}: unreadable tar after {} samples (truncated or corrupt)",
                gathered.len()
            )
        })?;
        if !member.header().entry_type().is_file() {
            continue;
        }
        let member_path = member
            .path()
            .with_context(|| format!("shard {name}: a member name is unreadable"))?
            .to_string_lossy()
            .into_owned();
        let (offset, size) = (member.raw_file_position(), member.size());
        if offset.saturating_add(size) > bytes {
            bail!("shard {name}: member {member_path} runs past the end of the file (truncated)");
        }
        let (key, ext) = split_member(&member_path);
        if gathered.last().is_none_or(|p| p.key != key) {
            let expected = sample_key(first + gathered.len() as u64);
            // Keys are global sample numbers, so a shard from another conversion, or
            // shards renamed into another order, cannot pass for the indexed one.
            if key != expected {
                bail!(
                    "shard {name}: member {member_path} where the index expects sample {expected}: the index does not describe these shards (convert the images again)"
                );
            }
            gathered.push(Pending {
                key: key.to_string(),
                ..Pending::default()
            });
        }
        let Some(p) = gathered.last_mut() else {
            unreachable!("a sample was just gathered")
        };
        if ext == image_ext {
            p.image = Some((offset, size));
        } else if ext == "cls" {
            let mut text = String::new();
            let read = if size > 32 {
                Err(format!("{member_path} is {size} bytes, not a class number"))
            } else {
                member
                    .read_to_string(&mut text)
                    .map_err(|e| format!("{member_path}: cannot read: {e}"))
            };
            p.label = Some(read.and_then(|_| match text.trim().parse::<u32>() {
                Ok(l) if (l as usize) < classes => Ok(l),
                Ok(l) => Err(format!(
                    "{member_path}: class {l} is outside the index's {classes} classes"
                )),
                Err(_) => Err(format!("{member_path}: {text:?} is not a class number")),
            }));
        }
    }
    if gathered.len() != entry.sizes.len() {
        bail!(
            "shard {name} holds {} samples, the index says {}: the index does not describe these shards (convert the images again)",
            gathered.len(),
            entry.sizes.len()
        );
    }
    let mut samples = Vec::with_capacity(gathered.len());
    let mut bad = Vec::new();
    for (j, (p, &[w, h])) in gathered.into_iter().zip(&entry.sizes).enumerate() {
        let (offset, len) = p.image.unwrap_or((0, 0));
        let want = w as u64 * h as u64 * 3;
        let label = match (p.image, p.label) {
            (None, _) => Err(format!("no {}.{image_ext} member", p.key)),
            (_, None) => Err(format!("{}.{image_ext} has no {}.cls member", p.key, p.key)),
            _ if format == ImageFormat::Raw && len != want => Err(format!(
                "{}.rgb holds {len} bytes, the index gives {w}x{h} ({want} bytes)",
                p.key
            )),
            (_, Some(label)) => label,
        };
        let label = label.unwrap_or_else(|why| {
            bad.push((j, why));
            0
        });
        samples.push(Sample { offset, len, label });
    }
    Ok(Scanned { file, samples, bad })
}

/// `buf.len()` bytes of `file` from `offset` on.
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        let (mut done, mut buf) = (0u64, buf);
        while !buf.is_empty() {
            match std::os::windows::fs::FileExt::seek_read(file, buf, offset + done)? {
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                n => {
                    buf = &mut buf[n..];
                    done += n as u64;
                }
            }
        }
        Ok(())
    }
}

/// An opened shard folder: the index and where every sample lies.
pub struct ShardSet {
    dir: PathBuf,
    index: ShardIndex,
    files: Vec<File>,
    /// First global sample of each shard, and the total at the end.
    first: Vec<u64>,
    samples: Vec<Sample>,
    /// Samples found unusable when the shards were opened, by global id.
    bad: HashMap<u64, String>,
}

impl ShardSet {
    /// Opens the shard folder `dir`: reads the index and checks every shard against it
    /// (in parallel), refusing the folder with the reason when one disagrees.
    pub fn open(dir: &Path) -> Result<ShardSet> {
        let index = ShardIndex::load(dir)?;
        let mut first = vec![0u64];
        for s in &index.shards {
            first.push(first.last().copied().unwrap_or(0) + s.sizes.len() as u64);
        }
        let scanned = index
            .shards
            .par_iter()
            .zip(&first)
            .map(|(entry, &f)| scan_shard(dir, entry, f, index.image_format, index.classes.len()))
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("--data {}", dir.display()))?;
        let mut files = Vec::with_capacity(scanned.len());
        let mut samples = Vec::with_capacity(first.last().copied().unwrap_or(0) as usize);
        let mut bad = HashMap::new();
        for (s, f) in scanned.into_iter().zip(&first) {
            bad.extend(s.bad.into_iter().map(|(j, why)| (f + j as u64, why)));
            samples.extend(s.samples);
            files.push(s.file);
        }
        Ok(ShardSet {
            dir: dir.to_path_buf(),
            index,
            files,
            first,
            samples,
            bad,
        })
    }

    pub fn index(&self) -> &ShardIndex {
        &self.index
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Samples in all shards.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The shard holding sample `id`.
    fn shard_of(&self, id: u64) -> usize {
        self.first.partition_point(|&f| f <= id) - 1
    }

    /// The global ids of shard `s`'s samples.
    fn shard_samples(&self, s: usize) -> std::ops::Range<u64> {
        self.first[s]..self.first[s + 1]
    }

    /// `[width, height]` of sample `id`'s image, as the index gives it.
    fn size(&self, id: u64) -> (usize, usize) {
        let s = self.shard_of(id);
        let [w, h] = self.index.shards[s].sizes[(id - self.first[s]) as usize];
        (w as usize, h as usize)
    }

    /// Sample `id` named for a message: its member and shard.
    pub fn name(&self, id: u64) -> String {
        let shard = &self.index.shards[self.shard_of(id)].file;
        format!(
            "{}.{} in {}",
            sample_key(id),
            self.index.image_format.extension(),
            self.dir.join(shard).display()
        )
    }

    /// Sample `id`'s class, an index into the index's classes.
    pub fn label(&self, id: u64) -> Result<u32, String> {
        match self.bad.get(&id) {
            Some(why) => Err(why.clone()),
            None => Ok(self.samples[id as usize].label),
        }
    }

    fn usable(&self, id: u64) -> Result<(usize, Sample), String> {
        if let Some(why) = self.bad.get(&id) {
            return Err(why.clone());
        }
        let sample = self
            .samples
            .get(id as usize)
            .ok_or_else(|| format!("no sample {id} in the shards"))?;
        Ok((self.shard_of(id), *sample))
    }

    /// Bytes `offset..offset + buf.len()` of shard `s`.
    fn read(&self, s: usize, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        read_exact_at(&self.files[s], buf, offset).map_err(|e| format!("cannot read: {e}"))
    }

    /// Sample `id`'s whole image.
    pub fn image<'d>(&self, id: u64, decoder: &'d mut Decoder) -> Result<RgbView<'d>, String> {
        let (s, sample) = self.usable(id)?;
        let (w, h) = self.size(id);
        match self.index.image_format {
            ImageFormat::Raw => decoder.raw(w, h, |pixels| self.read(s, sample.offset, pixels)),
            ImageFormat::Jpeg => {
                let image = decoder.decode_from(|bytes| {
                    bytes.resize(sample.len as usize, 0);
                    self.read(s, sample.offset, bytes)
                })?;
                if (image.width, image.height) != (w, h) {
                    return Err(format!(
                        "the image is {}x{}, the index says {w}x{h}",
                        image.width, image.height
                    ));
                }
                Ok(image)
            }
        }
    }

    /// Sample `id` as the model sees it at evaluation: the centred square, resized to
    /// `side`, normalised, `[3, side, side]`.
    pub fn centred(&self, id: u64, side: usize) -> Result<Vec<f32>, String> {
        let mut decoder = Decoder::default();
        let image = self.image(id, &mut decoder)?;
        let crop = CropBox::centre_square(image.width, image.height);
        Ok(to_tensor(&image, crop, false, side))
    }

    /// Sample `id` augmented as `augment` draws for `epoch`, into `out`. A raw sample is
    /// read only from the crop's first row to its last (one read, no decoding); the
    /// result equals cropping the whole image.
    pub fn augmented(
        &self,
        id: u64,
        epoch: u64,
        augment: &Augment,
        decoder: &mut Decoder,
        out: &mut [u8],
    ) -> Result<(), String> {
        if self.index.image_format == ImageFormat::Jpeg {
            let image = self.image(id, decoder)?;
            augment.apply(&image, epoch, id, out);
            return Ok(());
        }
        let (s, sample) = self.usable(id)?;
        let (w, h) = self.size(id);
        let draw = augment.draw(epoch, id, w, h);
        let rows = draw.crop.height;
        let offset = sample.offset + (draw.crop.top * w * 3) as u64;
        let band = decoder.raw(w, rows, |pixels| self.read(s, offset, pixels))?;
        let crop = CropBox {
            top: 0,
            ..draw.crop
        };
        crop_resize_flip(&band, crop, draw.flip, augment.side, out);
        Ok(())
    }
}

/// Which share of the shards one reader takes: shards `rank, rank + world, …` in index
/// order, so the `world` ranks of a data-parallel run read disjoint shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    pub rank: usize,
    pub world: usize,
}

impl Default for Part {
    fn default() -> Self {
        Part { rank: 0, world: 1 }
    }
}

/// One rank's stream over a shard folder: every epoch its shards in a seeded order, their
/// samples in member order through a bounded shuffle buffer (docs/DESIGN.md §1.1).
pub struct ShardStream {
    set: ShardSet,
    part: Part,
    buffer: usize,
    /// This rank's shards, in index order.
    own: Vec<usize>,
    epoch_len: usize,
}

impl ShardStream {
    /// Rank `part.rank`'s stream; `buffer` samples in the shuffle buffer (at least 1).
    pub fn new(set: ShardSet, part: Part, buffer: usize) -> Result<ShardStream> {
        let shards = set.index.shards.len();
        if part.world == 0 || part.rank >= part.world {
            bail!(
                "rank {} of {}: the rank must be below the world size",
                part.rank,
                part.world
            );
        }
        if part.world > shards {
            bail!(
                "--data {}: {shards} shards cannot give each of {} ranks a share of its own (convert with a smaller --shard-size)",
                set.dir.display(),
                part.world
            );
        }
        if buffer == 0 {
            bail!("--shuffle-buffer must be at least 1");
        }
        let own: Vec<usize> = (part.rank..shards).step_by(part.world).collect();
        let epoch_len = own.iter().map(|&s| set.shard_samples(s).count()).sum();
        Ok(ShardStream {
            set,
            part,
            buffer,
            own,
            epoch_len,
        })
    }

    pub fn set(&self) -> &ShardSet {
        &self.set
    }

    pub fn part(&self) -> Part {
        self.part
    }

    pub fn buffer(&self) -> usize {
        self.buffer
    }
}

impl Source for ShardStream {
    fn epoch_len(&self) -> usize {
        self.epoch_len
    }

    fn epoch_order(&self, seed: u64, epoch: u64) -> Vec<u64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ SHARD_SALT);
        rng.set_stream(epoch);
        let mut shards = self.own.clone();
        shuffle(&mut rng, &mut shards);
        let mut order = Vec::with_capacity(self.epoch_len);
        let mut held: Vec<u64> = Vec::with_capacity(self.buffer);
        for id in shards.into_iter().flat_map(|s| self.set.shard_samples(s)) {
            held.push(id);
            if held.len() == self.buffer {
                let j = rng.gen_range(0..held.len() as u32) as usize;
                order.push(held.swap_remove(j));
            }
        }
        while !held.is_empty() {
            let j = rng.gen_range(0..held.len() as u32) as usize;
            order.push(held.swap_remove(j));
        }
        order
    }

    fn item(&self, k: usize) -> u64 {
        let mut k = k as u64;
        for &s in &self.own {
            let range = self.set.shard_samples(s);
            let n = range.end - range.start;
            if k < n {
                return range.start + k;
            }
            k -= n;
        }
        unreachable!("item {k} past the rank's {} samples", self.epoch_len)
    }

    fn load(
        &self,
        item: u64,
        epoch: u64,
        augment: &Augment,
        decoder: &mut Decoder,
        out: &mut [u8],
    ) -> Result<(), String> {
        self.set.augmented(item, epoch, augment, decoder, out)
    }

    fn name(&self, item: u64) -> String {
        self.set.name(item)
    }

    fn key(&self, item: u64) -> String {
        sample_key(item)
    }

    fn item_of(&self, key: &str) -> Option<u64> {
        key.parse()
            .ok()
            .filter(|&id: &u64| (id as usize) < self.set.len())
    }

    fn root(&self) -> &Path {
        &self.set.dir
    }

    fn unit(&self) -> &'static str {
        "samples"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_split_at_the_first_dot_of_the_file_name() {
        assert_eq!(split_member("000000012.jpg"), ("000000012", "jpg"));
        assert_eq!(split_member("a.b/c.seg.png"), ("a.b/c", "seg.png"));
        assert_eq!(split_member("noext"), ("noext", ""));
    }
}
