//! Writes a folder of photo-like JPEGs for measuring the image loader without a real data
//! set: `cargo run --release --example photo_folder -- DIR [COUNT] [WIDTH HEIGHT]`
//! (default 1000 images of 500 × 375, ImageNet's most common size, in 10 class folders).
//!
//! Decoding cost grows with a JPEG's entropy, so smooth synthetic pictures would flatter
//! the loader: these add shapes, texture and sensor-like noise until a file takes about
//! as many bytes as an ImageNet photo of its size (≈ 110–150 KB at quality 90).

use std::fs;
use std::io::BufWriter;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use image::codecs::jpeg::JpegEncoder;
use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn photo(w: u32, h: u32, seed: u64) -> RgbImage {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let colour = |rng: &mut ChaCha8Rng| [0; 3].map(|_| rng.gen_range(0.0..255.0f32));
    let (top, bottom) = (colour(&mut rng), colour(&mut rng));
    let shapes: Vec<([f32; 3], f32, f32, f32)> = (0..12)
        .map(|_| {
            let c = colour(&mut rng);
            (
                c,
                rng.gen_range(0.0..w as f32),
                rng.gen_range(0.0..h as f32),
                rng.gen_range(10.0..120.0),
            )
        })
        .collect();
    let freq = rng.gen_range(0.05..0.3f32);
    let mut img = RgbImage::new(w, h);
    for (x, y, p) in img.enumerate_pixels_mut() {
        let t = y as f32 / h as f32;
        let mut v: [f32; 3] = std::array::from_fn(|c| top[c] * (1.0 - t) + bottom[c] * t);
        for (c, cx, cy, r) in &shapes {
            if (x as f32 - cx).hypot(y as f32 - cy) < *r {
                v = *c;
            }
        }
        let texture = 18.0 * ((x as f32 * freq).sin() * (y as f32 * freq * 1.3).cos());
        *p = Rgb(v.map(|c| (c + texture + rng.gen_range(-14.0..14.0)).clamp(0.0, 255.0) as u8));
    }
    img
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.first().map(PathBuf::from) else {
        bail!("usage: photo_folder DIR [COUNT] [WIDTH HEIGHT]");
    };
    let number = |i: usize, default: u32| -> Result<u32> {
        args.get(i).map_or(Ok(default), |s| {
            s.parse().with_context(|| format!("not a number: {s}"))
        })
    };
    let (count, w, h) = (number(1, 1000)?, number(2, 500)?, number(3, 375)?);
    let mut bytes = 0u64;
    for i in 0..count {
        let class = dir.join(format!("class_{:02}", i % 10));
        fs::create_dir_all(&class)?;
        let path = class.join(format!("img_{i:05}.jpg"));
        let file =
            fs::File::create(&path).with_context(|| format!("cannot write {}", path.display()))?;
        JpegEncoder::new_with_quality(BufWriter::new(file), 90)
            .encode_image(&photo(w, h, i as u64))?;
        bytes += fs::metadata(&path)?.len();
    }
    println!(
        "{count} JPEGs of {w}x{h} in {} ({:.0} KB each on average)",
        dir.display(),
        bytes as f64 / count.max(1) as f64 / 1024.0
    );
    Ok(())
}
