//! `lomar visualize`: what a checkpoint reconstructs. One row per image, four panels:
//!
//! 1. the image with its sampled windows outlined;
//! 2. the masked input: the windows' visible patches, masked patches grey (the model sees
//!    nothing outside its windows, drawn faded);
//! 3. the reconstruction: the head's output for every masked patch, in pixels;
//! 4. the reconstruction pasted into the visible patches: each window as the model
//!    completes it.
//!
//! With norm-pix targets the head predicts each patch normalised by its own mean and
//! standard deviation, so a prediction is mapped back with the target patch's statistics
//! (as MAE's visualisation does) before undoing the ImageNet normalisation. Where windows
//! overlap, the later window is drawn on top.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use crate::config::{same_method, Method, ModelConfig, NORM_PIX_EPS};
use crate::cpu::{mae, model};
use crate::data::augment::load_centred;
use crate::data::batch::{Batch, Pixels};
use crate::data::folder::ImageFolder;
use crate::data::sampler::Sampler;
use crate::data::shards::{ShardIndex, ShardSet};
use crate::data::synthetic::SyntheticImages;
use crate::data::{IMAGENET_MEAN, IMAGENET_STD};
use crate::eval::draw::font::{text_width, GLYPH_HEIGHT};
use crate::eval::draw::{Canvas, Rgb, BLACK, WHITE};
use crate::io::pretrained::Pretrained;

/// Column titles.
pub const PANELS: [&str; 4] = [
    "image + windows",
    "masked input",
    "reconstruction",
    "recon + visible",
];
/// Fill of a masked patch in the input panel.
const MASKED: Rgb = [128, 128, 128];
/// Background of the reconstruction panel where nothing is predicted.
const BLANK: Rgb = [235, 235, 235];
/// How far the area outside the windows is faded toward white.
const FADE: f32 = 0.7;
/// Window outline colours, in window order, repeating.
const WINDOW_COLOURS: [Rgb; 6] = [
    [230, 40, 40],
    [30, 120, 230],
    [40, 180, 60],
    [240, 160, 0],
    [170, 60, 200],
    [0, 190, 190],
];
/// Synthetic images shown start here: far past any image a run trains on.
const HELD_OUT: u64 = 1 << 40;

/// Where the figure's pixels go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Image side `H`.
    pub side: usize,
    /// Screen pixels per image pixel (small images are enlarged).
    pub scale: usize,
    pub margin: usize,
    /// Height of the title band above the first row.
    pub header: usize,
    pub rows: usize,
}

impl Layout {
    pub fn new(side: usize, rows: usize) -> Layout {
        Layout {
            side,
            scale: 128usize.div_ceil(side).max(1),
            margin: 8,
            header: 2 * GLYPH_HEIGHT + 4,
            rows,
        }
    }

    /// Side of one panel on screen.
    pub fn panel(&self) -> usize {
        self.side * self.scale
    }

    pub fn width(&self) -> usize {
        self.margin + PANELS.len() * (self.panel() + self.margin)
    }

    pub fn height(&self) -> usize {
        self.header + self.rows * (self.panel() + self.margin)
    }

    /// Top-left screen pixel of panel `col` of row `row`.
    pub fn origin(&self, row: usize, col: usize) -> (usize, usize) {
        (
            self.margin + col * (self.panel() + self.margin),
            self.header + row * (self.panel() + self.margin),
        )
    }
}

/// A normalised value of channel `c` back to a byte.
fn to_byte(c: usize, v: f32) -> u8 {
    ((v * IMAGENET_STD[c] + IMAGENET_MEAN[c]).clamp(0.0, 1.0) * 255.0).round() as u8
}

/// What each patch of one image shows.
#[derive(Clone, Copy, PartialEq)]
enum Patch {
    Outside,
    Visible,
    /// Masked, with the row of its prediction.
    Masked(usize),
}

/// The four panels of one image, each `[H, H, 3]` bytes.
fn panels(m: &ModelConfig, batch: &Batch, pred: &[f32], b: usize) -> [Vec<u8>; 4] {
    let (h, p, k, g) = (m.image, m.patch, m.window, m.grid());
    let (n_win, mk, pd) = (m.windows_per_image, m.masked_per_window(), m.patch_dim());
    let images = batch.images.normalised(h * h);
    let image = &images[b * 3 * h * h..][..3 * h * h];
    let mut patch = vec![Patch::Outside; g * g];
    for w in 0..n_win {
        let s = b * n_win + w;
        let (row0, col0) = (
            batch.window_origin[2 * s] as usize,
            batch.window_origin[2 * s + 1] as usize,
        );
        let masked = &batch.mask_index[s * mk..][..mk];
        for i in 0..k * k {
            let cell = (row0 + i / k) * g + col0 + i % k;
            patch[cell] = match masked.iter().position(|&j| j as usize == i) {
                Some(j) => Patch::Masked(s * mk + j),
                None => Patch::Visible,
            };
        }
    }
    // De-normalised predictions, per masked row, in (y, x, c) order.
    let shown: Vec<Vec<u8>> = (0..batch.sequences(m) * mk)
        .map(|row| {
            let s = row / mk;
            if s / n_win != b {
                return Vec::new();
            }
            let i = batch.mask_index[row] as usize;
            let (top, left) = (
                (batch.window_origin[2 * s] as usize + i / k) * p,
                (batch.window_origin[2 * s + 1] as usize + i % k) * p,
            );
            let target = |y: usize, x: usize, c: usize| image[(c * h + top + y) * h + left + x];
            let (mean, std) = if m.norm_pix {
                let values: Vec<f32> = (0..pd)
                    .map(|j| target(j / (3 * p), j / 3 % p, j % 3))
                    .collect();
                let n = pd as f32;
                let mean = values.iter().sum::<f32>() / n;
                let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / (n - 1.0);
                (mean, (var + NORM_PIX_EPS as f32).sqrt())
            } else {
                (0.0, 1.0)
            };
            pred[row * pd..][..pd]
                .iter()
                .enumerate()
                .map(|(j, v)| to_byte(j % 3, v * std + mean))
                .collect()
        })
        .collect();

    let mut out: [Vec<u8>; 4] = std::array::from_fn(|_| vec![0u8; h * h * 3]);
    for y in 0..h {
        for x in 0..h {
            let original: Rgb = std::array::from_fn(|c| to_byte(c, image[(c * h + y) * h + x]));
            let faded = original.map(|v| (v as f32 * (1.0 - FADE) + 255.0 * FADE).round() as u8);
            let (py, px) = (y % p, x % p);
            let (input, recon, pasted) = match patch[(y / p) * g + x / p] {
                Patch::Outside => (faded, BLANK, faded),
                Patch::Visible => (original, BLANK, original),
                Patch::Masked(row) => {
                    let v = &shown[row][(py * p + px) * 3..][..3];
                    let predicted = [v[0], v[1], v[2]];
                    (MASKED, predicted, predicted)
                }
            };
            for (panel, colour) in out.iter_mut().zip([original, input, recon, pasted]) {
                panel[(y * h + x) * 3..][..3].copy_from_slice(&colour);
            }
        }
    }
    out
}

/// The figure for a batch: the model's predictions for `batch` (images, windows and
/// masks), one row per image.
pub fn render(m: &ModelConfig, params: &[f32], batch: &Batch) -> Result<Canvas> {
    batch.validate(m)?;
    let pred = match m.method {
        Method::Lomar => model::predict(m, params, batch)?,
        Method::Mae => mae::predict(m, params, batch)?,
    };
    let layout = Layout::new(m.image, batch.images_len);
    let mut canvas = Canvas::new(layout.width(), layout.height(), WHITE);
    for (col, title) in PANELS.iter().enumerate() {
        let (x, _) = layout.origin(0, col);
        let centred = x + layout.panel() / 2;
        let left = centred as i64 - text_width(title) as i64 / 2;
        canvas.text(
            left,
            (layout.header - GLYPH_HEIGHT) as i64 / 2,
            title,
            1,
            BLACK,
        );
    }
    let thickness = (layout.scale / 2).clamp(1, 2);
    for b in 0..batch.images_len {
        let pictures = panels(m, batch, &pred, b);
        for (col, picture) in pictures.iter().enumerate() {
            let (x, y) = layout.origin(b, col);
            canvas.blit(x as i64, y as i64, picture, m.image, m.image, layout.scale);
            for w in 0..m.windows_per_image {
                let s = b * m.windows_per_image + w;
                let unit = m.patch * layout.scale;
                canvas.outline_rect(
                    (x + batch.window_origin[2 * s + 1] as usize * unit) as i64,
                    (y + batch.window_origin[2 * s] as usize * unit) as i64,
                    m.window * unit,
                    m.window * unit,
                    thickness,
                    WINDOW_COLOURS[w % WINDOW_COLOURS.len()],
                );
            }
        }
    }
    Ok(canvas)
}

/// The images a figure shows.
#[derive(Clone, Debug)]
pub enum Images {
    /// These files, one row each.
    Files(Vec<PathBuf>),
    /// `count` files spread evenly over a folder's sorted list (so an ImageNet tree
    /// shows different classes).
    Folder(PathBuf, usize),
    /// `count` held-out embedded synthetic images.
    Synthetic(usize),
}

/// The `[3, H, W]` images to show.
fn gather_images(images: &Images, m: &ModelConfig, seed: u64) -> Result<Vec<Vec<f32>>> {
    let side = m.image;
    Ok(match images {
        Images::Files(paths) => paths
            .iter()
            .map(|p| {
                load_centred(p, side)
                    .map_err(|why| anyhow!("--image {}: cannot use it: {why}", p.display()))
            })
            .collect::<Result<_>>()?,
        Images::Folder(root, count) => {
            let out = if ShardIndex::is_in(root) {
                let set = ShardSet::open(root)?;
                spread(set.len(), *count, |id| {
                    set.centred(id as u64, side)
                        .map_err(|why| format!("{}: {why}", set.name(id as u64)))
                })
            } else {
                let folder = ImageFolder::scan(root)?;
                spread(folder.len(), *count, |f| {
                    load_centred(&folder.path(f), side)
                        .map_err(|why| format!("{}: {why}", folder.path(f).display()))
                })
            };
            if out.is_empty() {
                bail!("--data {}: no usable image to show", root.display());
            }
            out
        }
        Images::Synthetic(count) => {
            let synth = SyntheticImages::new(seed, side);
            (0..*count as u64)
                .map(|i| {
                    let mut img = vec![0.0; 3 * side * side];
                    synth.render(HELD_OUT + i, &mut img);
                    img
                })
                .collect()
        }
    })
}

/// `count` images of the `n` that `load` reads (a folder's files, or samples), evenly
/// spaced, each the first usable one at or after its slot; unusable ones are warned about
/// (Err names the image and why).
fn spread(
    n: usize,
    count: usize,
    load: impl Fn(usize) -> Result<Vec<f32>, String>,
) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    let mut next = 0;
    for i in 0..count {
        let mut f = (i * n / count).max(next);
        while f < n && out.len() <= i {
            match load(f) {
                Ok(img) => out.push(img),
                Err(why) => eprintln!("warning: skipping {why}"),
            }
            f += 1;
        }
        next = f;
    }
    out
}

/// `lomar visualize`: the figure for `images` under the checkpoint's parameters, windows
/// and masks drawn with `seed` (MAE's one window is the whole image), written to `out` as
/// PNG; a checkpoint of another method than `method` is refused. Returns the rows drawn.
pub fn visualize(
    checkpoint: &Path,
    method: Option<Method>,
    images: &Images,
    seed: u64,
    out: &Path,
) -> Result<usize> {
    if matches!(images, Images::Folder(_, 0) | Images::Synthetic(0)) {
        bail!("--images 0: nothing to draw; give --images N with N at least 1");
    }
    let Pretrained { config, params, .. } = Pretrained::open(checkpoint)?;
    let m = &config.model;
    same_method(
        m.method,
        method,
        &format!("checkpoint {}", checkpoint.display()),
    )?;
    let pictures = gather_images(images, m, seed)?;
    let windows = Sampler::new(seed).sample(m, pictures.len());
    let batch = Batch {
        images_len: pictures.len(),
        images: Pixels::Normalised(pictures.concat()),
        window_origin: windows.origin,
        mask_index: windows.mask,
    };
    render(m, &params, &batch)?
        .save_png(out)
        .with_context(|| "cannot write the figure".to_string())?;
    Ok(batch.images_len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{mae_recipe, preset};
    use crate::cpu::ops::window_gather::window_gather;
    use crate::data::BatchSource;

    /// A perfect prediction (the loss's own targets) must reproduce the image in the
    /// reconstruction panel, with and without norm-pix: the de-normalisation inverts
    /// the target normalisation.
    #[test]
    fn a_perfect_prediction_reconstructs_the_image() {
        let methods = [preset("tiny").unwrap(), mae_recipe(preset("tiny").unwrap())];
        for (norm_pix, base) in [true, false]
            .into_iter()
            .flat_map(|n| methods.iter().map(move |m| (n, m)))
        {
            let m = ModelConfig {
                norm_pix,
                ..base.clone()
            };
            let batch = BatchSource::new(&m, 4).next_batch(2).unwrap();
            let targets = window_gather::<f32>(&m, &batch).targets;
            let (h, p, g, k) = (m.image, m.patch, m.grid(), m.window);
            let mk = m.masked_per_window();
            for b in 0..2 {
                let [original, input, recon, pasted] = panels(&m, &batch, &targets, b);
                // The last window decides each of its patches.
                let s = b * m.windows_per_image + m.windows_per_image - 1;
                let (r0, c0) = (
                    batch.window_origin[2 * s] as usize,
                    batch.window_origin[2 * s + 1] as usize,
                );
                for &i in &batch.mask_index[s * mk..][..mk] {
                    let (gy, gx) = (r0 + i as usize / k, c0 + i as usize % k);
                    assert!(gy < g && gx < g);
                    for y in gy * p..(gy + 1) * p {
                        for x in gx * p..(gx + 1) * p {
                            let at = (y * h + x) * 3;
                            for c in 0..3 {
                                let (want, got) = (original[at + c], recon[at + c]);
                                assert!(
                                    want.abs_diff(got) <= 1,
                                    "norm_pix {norm_pix}: image {b} ({y}, {x}) c{c}: {got} vs {want}"
                                );
                                assert_eq!(pasted[at + c], got);
                                assert_eq!(input[at + c], MASKED[c]);
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn small_images_are_enlarged_and_panels_do_not_overlap() {
        let l = Layout::new(32, 3);
        assert_eq!(l.scale, 4);
        assert_eq!(l.panel(), 128);
        let (x0, y0) = l.origin(0, 0);
        assert!(y0 >= l.header);
        let (x1, _) = l.origin(0, 1);
        let (_, y2) = l.origin(2, 3);
        assert!(x1 >= x0 + l.panel() && y2 + l.panel() <= l.height());
        assert_eq!(l.origin(2, 3).0 + l.panel() + l.margin, l.width());
        assert_eq!(Layout::new(224, 1).scale, 1);
    }
}
