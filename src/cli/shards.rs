//! `lomar shards`: convert an image folder into tar shards for fast loading.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;

use crate::data::shards::write::parse_size;
use crate::data::shards::{convert, ConvertOptions, ImageFormat, Progress, INDEX_FILE};
use crate::train::metrics::format_duration;

#[derive(Args, Debug)]
pub struct ShardsArgs {
    /// The image folder to convert (class sub-folders, or none).
    #[arg(long, value_name = "FOLDER")]
    pub data: PathBuf,
    /// The folder to write the shards and their index into (created; a previous
    /// conversion there is replaced).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Larger images are shrunk (bicubic) so neither side exceeds this.
    #[arg(long, default_value_t = 256, value_name = "PIXELS")]
    pub max_side: u32,
    /// How images are stored: JPEG (small, decoded when read) or raw RGB (about 8 times
    /// larger, read without decoding).
    #[arg(long, value_enum, default_value_t = ImageFormat::Jpeg)]
    pub format: ImageFormat,
    /// JPEG quality.
    #[arg(long, default_value_t = 90)]
    pub quality: u8,
    /// Largest shard (e.g. 1GiB, 500MB).
    #[arg(long, default_value = "1GiB", value_parser = parse_size, value_name = "SIZE")]
    pub shard_size: u64,
    /// Decoding and encoding threads [default: every core].
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Seed of the order the images are stored in.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub(super) fn shards(a: ShardsArgs) -> Result<()> {
    let opts = ConvertOptions {
        max_side: a.max_side,
        format: a.format,
        quality: a.quality,
        shard_bytes: a.shard_size,
        threads: a
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        seed: a.seed,
    };
    let started = Instant::now();
    let mut reported = started;
    let line = |p: &Progress| {
        let elapsed = started.elapsed().as_secs_f64();
        let rate = p.done as f64 / elapsed.max(1e-9);
        let eta = (p.files - p.done) as f64 / rate.max(1e-9);
        format!(
            "shards: {}/{} files, {} samples in {} shards ({:.1} MiB), {} skipped | {:.0} files/s | elapsed {} | eta {}",
            p.done,
            p.files,
            p.samples,
            p.shards,
            p.bytes as f64 / (1u64 << 20) as f64,
            p.skipped,
            rate,
            format_duration(Duration::from_secs_f64(elapsed)),
            format_duration(Duration::from_secs_f64(eta)),
        )
    };
    let index = convert(&a.data, &a.out, &opts, |p| {
        if p.done < p.files && reported.elapsed() >= Duration::from_secs(2) {
            reported = Instant::now();
            println!("{}", line(p));
        }
    })?;
    let bytes: u64 = index.shards.iter().map(|s| s.bytes).sum();
    println!(
        "wrote {} samples of {} classes in {} shards ({:.1} MiB, {} max side {}) and {} to {} in {:.1} s; {} of {} files skipped",
        index.samples(),
        index.classes.len(),
        index.shards.len(),
        bytes as f64 / (1u64 << 20) as f64,
        match index.image_format {
            ImageFormat::Jpeg => "JPEG",
            ImageFormat::Raw => "raw RGB",
        },
        index.max_side,
        INDEX_FILE,
        a.out.display(),
        started.elapsed().as_secs_f64(),
        index.skipped.len(),
        index.source_files,
    );
    Ok(())
}
