//! `lomar shards`: an image folder converted into tar shards and their index
//! (docs/DESIGN.md §2.9).
//!
//! Files are taken in a seeded shuffle (so every shard mixes the classes and a small
//! shuffle buffer suffices when reading), decoded on worker threads, shrunk so neither
//! side exceeds the maximum (Pillow's bicubic, as the loader resizes), and stored as JPEG
//! or raw RGB; one writer appends them in that order. Every tar header is fixed (mode
//! 0644, owner 0:0, mtime 0) and the keys are sample numbers, so converting the same
//! folder again gives the same bytes.

use std::fs::{self, File};
use std::io::BufWriter;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;

use anyhow::{anyhow, bail, Context, Result};
use image::codecs::jpeg::JpegEncoder;
use image::ExtendedColorType;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::index::{
    ImageFormat, ShardEntry, ShardIndex, SkippedFile, INDEX_FILE, INDEX_FORMAT, INDEX_VERSION,
};
use super::read::sample_key;
use crate::data::augment::CropBox;
use crate::data::decode::Decoder;
use crate::data::folder::ImageFolder;
use crate::data::loader::shuffle;
use crate::data::resize::resize_crop;

/// Keeps the conversion's file shuffle apart from the other streams of the same seed.
const CONVERT_SALT: u64 = 0x0e94_d2b7_3c58_f16a;
/// Tar's block: headers and the padding of member data.
const BLOCK: u64 = 512;
/// The class of files lying directly in the converted folder.
pub const ROOT_CLASS: &str = ".";

/// How to convert.
#[derive(Clone, Copy, Debug)]
pub struct ConvertOptions {
    /// Larger images are shrunk to this longer side.
    pub max_side: u32,
    pub format: ImageFormat,
    /// JPEG quality, 1..=100.
    pub quality: u8,
    /// A shard is closed before it would grow past this many bytes (a single larger
    /// sample still gets a shard of its own).
    pub shard_bytes: u64,
    /// Decoding and encoding threads.
    pub threads: usize,
    /// Seeds the order in which the files are stored.
    pub seed: u64,
}

/// Where a conversion stands, for the progress line.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// Source files handled so far, of `files`.
    pub done: usize,
    pub files: usize,
    pub samples: u64,
    pub skipped: usize,
    pub shards: usize,
    pub bytes: u64,
}

/// One image ready to store.
struct Prepared {
    data: Vec<u8>,
    size: [u32; 2],
    label: u32,
}

/// The class of each file (its top-level folder) and the sorted class names.
fn classes_of(folder: &ImageFolder) -> (Vec<u32>, Vec<String>) {
    let names: Vec<String> = (0..folder.len())
        .map(|i| {
            let mut parts = folder.relative(i).components();
            match (parts.next(), parts.next()) {
                (Some(class), Some(_)) => class.as_os_str().to_string_lossy().into_owned(),
                _ => ROOT_CLASS.to_string(),
            }
        })
        .collect();
    let mut classes = names.clone();
    classes.sort_unstable();
    classes.dedup();
    let labels = names
        .iter()
        .map(|n| classes.binary_search(n).map_or(0, |i| i as u32))
        .collect();
    (labels, classes)
}

/// `(w, h)` shrunk so the longer side is at most `max_side`, keeping the aspect ratio;
/// unchanged when it already fits.
pub fn fitted_size(w: usize, h: usize, max_side: usize) -> (usize, usize) {
    let longer = w.max(h);
    if longer <= max_side {
        return (w, h);
    }
    let scale = max_side as f64 / longer as f64;
    let side = |v: usize| ((v as f64 * scale).round() as usize).clamp(1, max_side);
    (side(w), side(h))
}

fn prepare(
    decoder: &mut Decoder,
    path: &Path,
    label: u32,
    opts: &ConvertOptions,
) -> Result<Prepared, String> {
    let image = decoder.read(path)?;
    let (w, h) = fitted_size(image.width, image.height, opts.max_side as usize);
    let pixels = if (w, h) == (image.width, image.height) {
        image.pixels.to_vec()
    } else {
        let mut out = vec![0u8; w * h * 3];
        let whole = CropBox {
            top: 0,
            left: 0,
            height: image.height,
            width: image.width,
        };
        resize_crop(&image, whole, w, &mut out);
        out
    };
    let data = match opts.format {
        ImageFormat::Raw => pixels,
        ImageFormat::Jpeg => {
            let mut bytes = Vec::new();
            JpegEncoder::new_with_quality(&mut bytes, opts.quality)
                .encode(&pixels, w as u32, h as u32, ExtendedColorType::Rgb8)
                .map_err(|e| format!("cannot encode as JPEG: {e}"))?;
            bytes
        }
    };
    Ok(Prepared {
        data,
        size: [w as u32, h as u32],
        label,
    })
}

/// A tar header that depends on the name and size alone.
fn header(name: &str, size: u64) -> Result<tar::Header> {
    let mut h = tar::Header::new_ustar();
    h.set_path(name)
        .with_context(|| format!("cannot name a tar member {name}"))?;
    h.set_size(size);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    Ok(h)
}

/// Bytes a member takes in the tar: its header and its data padded to whole blocks.
fn member_bytes(len: u64) -> u64 {
    BLOCK + len.div_ceil(BLOCK) * BLOCK
}

/// The shard file names `lomar shards` writes: `shard-000000.tar`, …
pub fn shard_name(i: usize) -> String {
    format!("shard-{i:06}.tar")
}

/// Appends samples to numbered shards in `dir`, starting a new one before a shard would
/// pass the size limit. A shard is written as `<name>.tmp` and renamed when complete.
struct ShardWriter {
    dir: PathBuf,
    limit: u64,
    format: ImageFormat,
    open: Option<(tar::Builder<BufWriter<File>>, ShardEntry)>,
    done: Vec<ShardEntry>,
    samples: u64,
}

impl ShardWriter {
    fn tmp_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.tmp"))
    }

    fn append(&mut self, p: &Prepared) -> Result<()> {
        let key = sample_key(self.samples);
        let label = p.label.to_string();
        let bytes = member_bytes(p.data.len() as u64) + member_bytes(label.len() as u64);
        // The end-of-archive marker: two zero blocks.
        let end = 2 * BLOCK;
        if let Some((_, entry)) = &self.open {
            if !entry.sizes.is_empty() && entry.bytes + bytes + end > self.limit {
                self.close()?;
            }
        }
        if self.open.is_none() {
            let name = shard_name(self.done.len());
            let path = self.tmp_path(&name);
            let file =
                File::create(&path).with_context(|| format!("cannot write {}", path.display()))?;
            let builder = tar::Builder::new(BufWriter::with_capacity(1 << 20, file));
            let entry = ShardEntry {
                file: name,
                bytes: 0,
                sizes: Vec::new(),
            };
            self.open = Some((builder, entry));
        }
        let Some((builder, entry)) = self.open.as_mut() else {
            unreachable!("a shard was just opened")
        };
        let image = header(
            &format!("{key}.{}", self.format.extension()),
            p.data.len() as u64,
        )?;
        let class = header(&format!("{key}.cls"), label.len() as u64)?;
        let write = builder
            .append(&image, &p.data[..])
            .and_then(|()| builder.append(&class, label.as_bytes()));
        write.with_context(|| format!("cannot write {}", entry.file))?;
        entry.bytes += bytes;
        entry.sizes.push(p.size);
        self.samples += 1;
        Ok(())
    }

    fn close(&mut self) -> Result<()> {
        let Some((builder, mut entry)) = self.open.take() else {
            return Ok(());
        };
        let tmp = self.tmp_path(&entry.file);
        let file = builder
            .into_inner()
            .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
            .and_then(|f| f.sync_all().map(|()| f))
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        entry.bytes = file.metadata()?.len();
        let path = self.dir.join(&entry.file);
        fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
        self.done.push(entry);
        Ok(())
    }
}

/// Makes `out` ready for a conversion: created if missing; a previous conversion's
/// shards and index removed; any other content refused, so nothing is overwritten that
/// `lomar shards` did not write.
fn prepare_out(out: &Path) -> Result<()> {
    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let ours = |name: &str| {
        name == INDEX_FILE
            || name == format!("{INDEX_FILE}.tmp")
            || (name.starts_with("shard-")
                && (name.ends_with(".tar") || name.ends_with(".tar.tmp")))
    };
    let mut entries = Vec::new();
    for e in fs::read_dir(out).with_context(|| format!("cannot list {}", out.display()))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if !ours(&name) {
            bail!(
                "--out {}: holds {name}, which lomar shards did not write; give a new or empty folder",
                out.display()
            );
        }
        entries.push(name);
    }
    for name in entries {
        fs::remove_file(out.join(&name))
            .with_context(|| format!("cannot remove {}", out.join(&name).display()))?;
    }
    Ok(())
}

/// Converts the image folder `src` into shards in `out`; `progress` hears after each
/// batch of files. Returns the index written.
pub fn convert(
    src: &Path,
    out: &Path,
    opts: &ConvertOptions,
    mut progress: impl FnMut(&Progress),
) -> Result<ShardIndex> {
    if opts.max_side == 0 || !(1..=100).contains(&opts.quality) || opts.threads == 0 {
        bail!("--max-side and --threads must be at least 1 and --quality within 1..=100");
    }
    let folder = ImageFolder::scan(src)?;
    let (labels, classes) = classes_of(&folder);
    let mut order: Vec<usize> = (0..folder.len()).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed ^ CONVERT_SALT);
    shuffle(&mut rng, &mut order);
    prepare_out(out)?;

    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads)
        .build()
        .map_err(|e| anyhow!("cannot start the conversion threads: {e}"))?;
    // Decoding runs a batch ahead of the writer.
    let (to_writer, from_pool) = sync_channel::<Vec<(usize, Result<Prepared, String>)>>(1);
    let chunk = 32 * opts.threads;
    let mut writer = ShardWriter {
        dir: out.to_path_buf(),
        limit: opts.shard_bytes,
        format: opts.format,
        open: None,
        done: Vec::new(),
        samples: 0,
    };
    let mut skipped = Vec::new();
    let written = std::thread::scope(|scope| -> Result<()> {
        let folder = &folder;
        let (order, labels) = (&order, &labels);
        let decoding = scope.spawn(move || {
            for files in order.chunks(chunk) {
                let prepared = pool.install(|| {
                    files
                        .par_iter()
                        .map_init(Decoder::default, |decoder, &f| {
                            // A decoder bug on a hostile file skips that file, as in the
                            // loader, rather than ending the conversion.
                            let prepared = panic::catch_unwind(AssertUnwindSafe(|| {
                                prepare(decoder, &folder.path(f), labels[f], opts)
                            }));
                            let crashed = || Err("the decoder crashed on this file".to_string());
                            (f, prepared.unwrap_or_else(|_| crashed()))
                        })
                        .collect()
                });
                if to_writer.send(prepared).is_err() {
                    return;
                }
            }
        });
        let mut done = 0;
        for batch in from_pool {
            for (f, prepared) in batch {
                match prepared {
                    Ok(p) => writer.append(&p)?,
                    Err(why) => {
                        eprintln!("warning: skipping {}: {why}", folder.path(f).display());
                        skipped.push(SkippedFile {
                            file: folder.relative(f).to_string_lossy().into_owned(),
                            why,
                        });
                    }
                }
                done += 1;
            }
            progress(&Progress {
                done,
                files: folder.len(),
                samples: writer.samples,
                skipped: skipped.len(),
                shards: writer.done.len() + writer.open.is_some() as usize,
                bytes: writer.done.iter().map(|s| s.bytes).sum::<u64>()
                    + writer.open.as_ref().map_or(0, |(_, e)| e.bytes),
            });
        }
        decoding
            .join()
            .map_err(|_| anyhow!("a conversion thread crashed"))
    });
    written?;
    writer.close()?;
    if writer.samples == 0 {
        bail!(
            "--data {}: none of its {} files could be converted (first: {}: {})",
            src.display(),
            folder.len(),
            skipped.first().map_or("", |s| s.file.as_str()),
            skipped.first().map_or("", |s| s.why.as_str()),
        );
    }
    skipped.sort_by(|a, b| a.file.cmp(&b.file));
    let index = ShardIndex {
        format: INDEX_FORMAT.to_string(),
        version: INDEX_VERSION,
        image_format: opts.format,
        max_side: opts.max_side,
        quality: (opts.format == ImageFormat::Jpeg).then_some(opts.quality),
        classes,
        source_files: folder.len() as u64,
        skipped,
        shards: writer.done,
    };
    index.save(out)?;
    sync_dir(out);
    Ok(index)
}

/// Makes the renames durable where the platform can open a folder; best effort.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Parses a size such as `1GiB`, `500MB`, `64k` or `1048576` into bytes (K, M, G, T are
/// powers of 1000 with `B`, of 1024 with `iB` or alone).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (e.g. 1GiB, 500MB, 64MiB)"))?;
    let unit = unit.trim().to_ascii_lowercase();
    let scale = match unit.as_str() {
        "" | "b" => 1u64,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (B, KB, MB, GB, KiB, MiB, GiB)"
            ))
        }
    };
    let bytes = value * scale as f64;
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("{text:?}: a shard size must be at least one byte"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_decimal_and_binary_units() {
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1.5 MiB"), Ok(3 << 19));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("3 parsecs").is_err());
    }

    #[test]
    fn images_shrink_to_the_max_side_keeping_their_shape() {
        assert_eq!(fitted_size(500, 375, 256), (256, 192));
        assert_eq!(fitted_size(375, 500, 256), (192, 256));
        assert_eq!(fitted_size(200, 100, 256), (200, 100));
        assert_eq!(fitted_size(5000, 3, 256), (256, 1));
    }

    #[test]
    fn tar_members_take_a_header_and_whole_blocks() {
        assert_eq!(member_bytes(0), 512);
        assert_eq!(member_bytes(1), 1024);
        assert_eq!(member_bytes(512), 1024);
        assert_eq!(member_bytes(513), 1536);
    }

    #[test]
    fn headers_are_fixed_and_standard() {
        let h = header("000000001.jpg", 10).unwrap();
        assert_eq!(h.mode().unwrap(), 0o644);
        assert_eq!(
            (h.uid().unwrap(), h.gid().unwrap(), h.mtime().unwrap()),
            (0, 0, 0)
        );
        assert_eq!(h.as_ustar().map(|u| &u.magic), Some(b"ustar\0"));
    }
}
