//! `lomar visualize` and `lomar plot` end to end: the PNGs they write, read back.

mod common;
mod images;

use std::path::Path;

use common::{lomar_err, lomar_ok};
use image::RgbImage;
use lomar::config::preset;
use lomar::data::sampler::Sampler;
use lomar::eval::visualize::Layout;

fn read_png(path: &Path) -> RgbImage {
    image::open(path).unwrap().into_rgb8()
}

/// A short run whose checkpoint and metrics the figures use.
fn train(d: &Path) {
    lomar_ok(
        d,
        &[
            "pretrain",
            "--out",
            "run",
            "--steps",
            "3",
            "--batch",
            "4",
            "--warmup-steps",
            "1",
        ],
    );
}

#[test]
fn visualize_shows_the_masked_patches_grey_and_the_prediction_in_their_place() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    train(d);
    images::save(images::picture(90, 60, 1).into(), &d.join("a.png"));
    images::save(images::picture(48, 64, 2).into(), &d.join("b.jpg"));
    let args = [
        "visualize",
        "--checkpoint",
        "run/checkpoint.safetensors",
        "--image",
        "a.png",
        "--image",
        "b.jpg",
        "--seed",
        "3",
        "--out",
        "v.png",
    ];
    let stdout = lomar_ok(d, &args);
    assert!(stdout.contains("2 images drawn to v.png"), "{stdout}");
    let png = read_png(&d.join("v.png"));
    let m = preset("tiny").unwrap();
    let layout = Layout::new(m.image, 2);
    assert_eq!(
        (png.width() as usize, png.height() as usize),
        (layout.width(), layout.height())
    );

    // Which patches the figure must show masked: the windows drawn with the same seed,
    // later windows on top.
    let windows = Sampler::new(3).sample(&m, 2);
    let (g, k, mk, n_win) = (
        m.grid(),
        m.window,
        m.masked_per_window(),
        m.windows_per_image,
    );
    let (mut masked_seen, mut visible_seen) = (0, 0);
    for b in 0..2 {
        let mut state = vec![None; g * g];
        for w in 0..n_win {
            let s = b * n_win + w;
            let (r0, c0) = (
                windows.origin[2 * s] as usize,
                windows.origin[2 * s + 1] as usize,
            );
            for i in 0..k * k {
                let masked = windows.mask[s * mk..][..mk].contains(&(i as u32));
                state[(r0 + i / k) * g + c0 + i % k] = Some(masked);
            }
        }
        for (cell, st) in state.iter().enumerate() {
            let Some(masked) = *st else { continue };
            // The centre of the patch in each panel, clear of the window outlines.
            let at = |col: usize| {
                let (x, y) = layout.origin(b, col);
                let half = m.patch * layout.scale / 2;
                let px = x + (cell % g) * m.patch * layout.scale + half;
                let py = y + (cell / g) * m.patch * layout.scale + half;
                png.get_pixel(px as u32, py as u32).0
            };
            let [image, input, recon, pasted] = [at(0), at(1), at(2), at(3)];
            if masked {
                masked_seen += 1;
                assert_eq!(input, [128, 128, 128], "image {b} patch {cell}");
                assert_ne!(input, image, "image {b} patch {cell}");
                assert_eq!(pasted, recon, "image {b} patch {cell}");
            } else {
                visible_seen += 1;
                assert_eq!(input, image, "image {b} patch {cell}");
                assert_eq!(pasted, image, "image {b} patch {cell}");
                assert_eq!(recon, [235, 235, 235], "image {b} patch {cell}");
            }
        }
    }
    assert!(masked_seen >= 2 * mk && visible_seen > 0);

    // From a folder (broken files passed over) and from the synthetic images.
    images::mixed_folder(&d.join("imgs"));
    let args = [
        "visualize",
        "--checkpoint",
        "run/checkpoint.safetensors",
        "--data",
        "imgs",
        "--images",
        "3",
        "--out",
        "f.png",
    ];
    assert!(lomar_ok(d, &args).contains("3 images drawn"));
    assert_eq!(
        read_png(&d.join("f.png")).height() as usize,
        Layout::new(32, 3).height()
    );
    let args = [
        "visualize",
        "--checkpoint",
        "run/checkpoint.safetensors",
        "--out",
        "s.png",
    ];
    assert!(lomar_ok(d, &args).contains("4 images drawn"));
    // A parameter file (no optimiser state) shows its model as well.
    lomar_ok(d, &["init", "--out", "p.safetensors"]);
    let args = [
        "visualize",
        "--checkpoint",
        "p.safetensors",
        "--out",
        "p.png",
    ];
    assert!(lomar_ok(d, &args).contains("4 images drawn"));
    let args = [
        "visualize",
        "--checkpoint",
        "run/checkpoint.safetensors",
        "--image",
        "imgs/class_c/empty.jpg",
        "--out",
        "e.png",
    ];
    let args0 = [
        "visualize",
        "--checkpoint",
        "run/checkpoint.safetensors",
        "--images",
        "0",
        "--out",
        "z.png",
    ];
    assert!(lomar_err(d, &args0).contains("--images 0"));
    let stderr = lomar_err(d, &args);
    assert!(
        stderr.contains("imgs/class_c/empty.jpg: cannot use it: empty file"),
        "{stderr}"
    );
}

#[test]
fn plot_draws_the_loss_curve_of_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    train(d);
    let stdout = lomar_ok(d, &["plot", "run/metrics.jsonl", "--out", "loss.png"]);
    assert!(stdout.contains("3 steps plotted to loss.png"), "{stdout}");
    let png = read_png(&d.join("loss.png"));
    assert_eq!((png.width(), png.height()), (800, 480));
    // Something other than white and grid lines was drawn: the curve's colour.
    assert!(png.pixels().any(|p| p.0 == [20, 70, 160]));
    let stderr = lomar_err(d, &["plot", "run/config.json", "--out", "x.png"]);
    assert!(stderr.contains("line 1"), "{stderr}");
}
