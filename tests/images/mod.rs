//! Small image folders made on the fly: valid JPEGs and PNGs of several modes and sizes,
//! and the broken files a real data set holds.
// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::fs;
use std::path::Path;

use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, LumaA, Rgb, RgbImage, Rgba};
use lomar::config::preset;
use lomar::io::checkpoint::{Checkpoint, CheckpointFile};

use crate::common::lomar_ok;

/// A colourful `w × h` picture with structure at several scales.
pub fn picture(w: u32, h: u32, seed: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let wave = |f: u32, phase: u32| {
            let t = (x * f + y * (f + seed % 5) + phase) as f32 * 0.05;
            (127.5 + 120.0 * t.sin()) as u8
        };
        Rgb([wave(3, seed), wave(5, 7 * seed), wave(2, 13 * seed)])
    })
}

pub fn save(image: DynamicImage, path: &Path) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let format = ImageFormat::from_path(path).unwrap();
    image.save_with_format(path, format).unwrap();
}

/// An 8-bit palette PNG.
pub fn save_palette_png(path: &Path, w: u32, h: u32) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let file = fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(file, w, h);
    enc.set_color(png::ColorType::Indexed);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_palette(vec![250, 10, 10, 10, 200, 30, 20, 40, 240, 240, 240, 0]);
    let data: Vec<u8> = (0..w * h).map(|i| ((i / 3 + i / w) % 4) as u8).collect();
    enc.write_header().unwrap().write_image_data(&data).unwrap();
}

/// The files of a mixed folder, relative to its root.
pub struct Mixed {
    pub good: Vec<&'static str>,
    pub bad: Vec<&'static str>,
}

/// Writes, under `root`, eight usable images (RGB, grayscale and 16-bit JPEG/PNG, RGBA,
/// gray-alpha, palette; sizes from 20 to 120 pixels; nested folders) and six unusable
/// files: a truncated JPEG, a truncated PNG, an empty file, a text file, a text file
/// named .png and a dangling link.
pub fn mixed_folder(root: &Path) -> Mixed {
    let good = vec![
        "class_a/rgb.jpg",
        "class_a/gray.jpg",
        "class_a/rgba.png",
        "class_b/gray16.png",
        "class_b/rgb16.png",
        "class_b/palette.png",
        "class_b/gray_alpha.png",
        "class_c/deep/nested/large.jpg",
    ];
    let p = |f: &str| root.join(f);
    save(picture(40, 30, 1).into(), &p(good[0]));
    save(
        DynamicImage::ImageRgb8(picture(33, 47, 2))
            .into_luma8()
            .into(),
        &p(good[1]),
    );
    let rgba = ImageBuffer::from_fn(50, 20, |x, y| {
        let c = picture(50, 20, 3).get_pixel(x, y).0;
        Rgba([c[0], c[1], c[2], (x * 5) as u8])
    });
    save(rgba.into(), &p(good[2]));
    let gray16: ImageBuffer<Luma<u16>, Vec<u16>> =
        ImageBuffer::from_fn(24, 24, |x, y| Luma([(x * 2000 + y * 700) as u16]));
    save(gray16.into(), &p(good[3]));
    save(
        DynamicImage::ImageRgb8(picture(31, 29, 4))
            .into_rgb16()
            .into(),
        &p(good[4]),
    );
    save_palette_png(&p(good[5]), 40, 40);
    let gray_alpha = ImageBuffer::from_fn(20, 30, |x, y| LumaA([(x * 9 + y) as u8, 128]));
    save(DynamicImage::ImageLumaA8(gray_alpha), &p(good[6]));
    save(picture(120, 90, 5).into(), &p(good[7]));

    let bad = vec![
        "class_a/truncated.jpg",
        "class_b/truncated.png",
        "class_c/empty.jpg",
        "class_c/notes.txt",
        "class_c/text.png",
        "class_c/gone.jpg",
    ];
    save(picture(64, 48, 6).into(), &p(bad[0]));
    save(picture(64, 48, 7).into(), &p(bad[1]));
    for f in &bad[..2] {
        let bytes = fs::read(p(f)).unwrap();
        fs::write(p(f), &bytes[..bytes.len() * 2 / 3]).unwrap();
    }
    fs::write(p(bad[2]), b"").unwrap();
    fs::write(p(bad[3]), b"labels are not needed\n").unwrap();
    fs::write(p(bad[4]), b"this is not a PNG").unwrap();
    std::os::unix::fs::symlink(root.join("nowhere.jpg"), p(bad[5])).unwrap();
    Mixed { good, bad }
}

/// Flags of a short `pretrain` run on a folder or shards: small batches, a line and a
/// metrics record every step, two loader threads, a checkpoint only at the end.
pub const SMALL_RUN: [&str; 10] = [
    "--batch",
    "4",
    "--warmup-steps",
    "1",
    "--log-every",
    "1",
    "--loader-threads",
    "2",
    "--checkpoint-every",
    "0",
];

/// The records of a run's metrics.jsonl.
pub fn metrics(run: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Resumes the run in `split` (stopped after step 2) without `--data`, since its checkpoint
/// names the data, on `loader_threads` threads, and checks that it ends where the
/// uninterrupted run in `whole` ended: the same data position and parameters, bit for bit,
/// and the same losses. Returns the two checkpoints, whole first.
pub fn resume_matches_whole(d: &Path, loader_threads: &str) -> (Checkpoint, Checkpoint) {
    let resumed = lomar_ok(
        d,
        &[
            "pretrain",
            "--resume",
            "split/checkpoint.safetensors",
            "--out",
            "split",
            "--loader-threads",
            loader_threads,
            "--log-every",
            "1",
        ],
    );
    assert!(resumed.contains("resuming at step 2"), "{resumed}");
    let load = |run: &str| {
        CheckpointFile::open(&d.join(run).join("checkpoint.safetensors"))
            .unwrap()
            .load(&preset("tiny").unwrap())
            .unwrap()
    };
    let (a, b) = (load("whole"), load("split"));
    assert_eq!(a.data, b.data);
    let differ = (0..a.params.len()).find(|&i| a.params[i].to_bits() != b.params[i].to_bits());
    assert_eq!(differ, None, "parameters differ after the resume");
    let losses = |run: &str| -> Vec<f64> {
        metrics(&d.join(run))
            .iter()
            .map(|r| r["loss"].as_f64().unwrap())
            .collect()
    };
    assert_eq!(losses("whole"), losses("split"));
    (a, b)
}
