//! The frozen encoder without masking, for features: every patch is embedded and every
//! token attends to all tokens of its sequence. An MAE encoder sees the whole image, its
//! sin-cos position embedding computed for the image's grid, attention without a bias. A sequence is either a whole image
//! (`G×G` patches, each block's relative bias table resized to the image grid, the model
//! timm's BEiT builds from an export) or one of the `K×K` windows tiling the image (the
//! geometry of pretraining, tables as trained). The blocks are the training forward's.
//!
//! Shapes: images `[N, 3, H, H]` → sequences `[S, 1 + n², D]` (S = N·views, n = G or K)
//! → features `[N, D]`: the cls token or the mean patch token after the final norm,
//! averaged over an image's views.

use anyhow::{bail, Result};
use clap::ValueEnum;
use rayon::prelude::*;

use super::mae::pos_embed::sincos_pos_embed;
use super::model::{block_forward, BlockActs, Tokens};
use super::ops::attention::RelativeIndex;
use super::ops::{layernorm, linear, tokens};
use crate::config::{Method, ModelConfig};
use crate::eval::rel_bias::resize_table;
use crate::params::{ModelRanges, ParamLayout};

/// What one sequence of the encoder covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum View {
    /// The whole image, with the tables resized to its grid.
    Image,
    /// The K×K windows tiling the image, features averaged over them.
    Windows,
}

/// Which token becomes the feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Pool {
    /// The cls token after the final norm (timm's `global_pool="token"`).
    Cls,
    /// The mean of the patch tokens after the final norm.
    Mean,
}

/// Attention probabilities one chunk of images may hold at once, in values (64 MiB; the
/// other activations of a block take about as much again for a ViT-B at 224).
const PROBS_BUDGET: usize = 1 << 24;

/// A model's frozen encoder at one image size, view and pooling.
pub struct Encoder<'a> {
    m: ModelConfig,
    params: &'a [f32],
    r: ModelRanges,
    image: usize,
    /// Side of a sequence's patch grid: `G` for images, `K` for windows.
    side: usize,
    /// Top-left patch (row, col) of each sequence inside an image.
    origins: Vec<(usize, usize)>,
    /// LoMaR's relative layout; `None` for MAE, whose attention has no bias.
    rel: Option<RelativeIndex>,
    /// Per block, `[rel.table_rows, h]` (empty for MAE).
    tables: Vec<Vec<f32>>,
    /// MAE's sin-cos position embedding of the image grid, `[1 + G², D]`; empty for LoMaR.
    pos: Vec<f32>,
    pool: Pool,
}

/// Window origins along one axis: every `window` patches, plus one flush with the far
/// edge when `grid` is not a multiple of `window`, so every patch is covered.
fn tile_starts(grid: usize, window: usize) -> Vec<usize> {
    let mut starts: Vec<usize> = (0..=grid - window).step_by(window).collect();
    if starts.last() != Some(&(grid - window)) {
        starts.push(grid - window);
    }
    starts
}

impl<'a> Encoder<'a> {
    /// The encoder of `params` (a model `m`) on `image`-pixel square images.
    pub fn new(
        m: &ModelConfig,
        params: &'a [f32],
        image: usize,
        view: View,
        pool: Pool,
    ) -> Result<Self> {
        m.validate()?;
        let layout = ParamLayout::new(m);
        layout.check_len("parameters", params.len())?;
        if image == 0 || !image.is_multiple_of(m.patch) {
            bail!(
                "image = {image}: must be a positive multiple of the model's patch ({})",
                m.patch
            );
        }
        let grid = image / m.patch;
        let r = layout.ranges().clone();
        let (side, origins) = match view {
            View::Image => (grid, vec![(0, 0)]),
            View::Windows if m.method == Method::Mae => {
                bail!("--mode windows: an MAE encoder has no windows; use --mode image")
            }
            View::Windows => {
                if grid < m.window {
                    bail!(
                        "image = {image}: {grid}x{grid} patches hold no {0}x{0} window; use image >= {1}",
                        m.window,
                        m.window * m.patch
                    );
                }
                let starts = tile_starts(grid, m.window);
                let origins = starts
                    .iter()
                    .flat_map(|&y| starts.iter().map(move |&x| (y, x)))
                    .collect();
                (m.window, origins)
            }
        };
        let (rel, tables, pos) = match m.method {
            Method::Lomar => {
                let tables = r
                    .blocks
                    .iter()
                    .map(|b| resize_table(&params[b.rel_bias.clone()], m.heads, m.window, side))
                    .collect();
                (Some(RelativeIndex::new(side)), tables, Vec::new())
            }
            // The sin-cos table is defined for any grid, so any image size works.
            Method::Mae => {
                let pos = sincos_pos_embed(m.width, side);
                let tables = r.blocks.iter().map(|_| Vec::new()).collect();
                (None, tables, pos.into_iter().map(|v| v as f32).collect())
            }
        };
        Ok(Encoder {
            m: m.clone(),
            params,
            r,
            image,
            side,
            origins,
            rel,
            tables,
            pos,
            pool,
        })
    }

    /// Feature width, `D`.
    pub fn width(&self) -> usize {
        self.m.width
    }

    /// Values in one input image, `3·H·H`.
    pub fn image_len(&self) -> usize {
        3 * self.image * self.image
    }

    /// Images per call of [`Encoder::features`] that keep the attention probabilities
    /// of one block within a fixed memory budget.
    pub fn images_per_chunk(&self) -> usize {
        let t = 1 + self.side * self.side;
        (PROBS_BUDGET / (self.origins.len() * self.m.heads * t * t)).max(1)
    }

    /// Features `[N, D]` of normalised images `[N, 3, H, H]`.
    pub fn features(&self, images: &[f32]) -> Vec<f32> {
        let normed = self.tokens(images);
        let (views, area, d) = (self.origins.len(), self.side * self.side, self.m.width);
        let n = normed.len() / (views * (1 + area) * d);
        let mut out = vec![0.0f32; n * d];
        let inv_views = 1.0 / views as f32;
        out.par_chunks_mut(d)
            .zip(normed.par_chunks(views * (1 + area) * d))
            .for_each(|(feature, image_seqs)| {
                for seq in image_seqs.chunks_exact((1 + area) * d) {
                    let (cls, patches) = seq.split_at(d);
                    match self.pool {
                        Pool::Cls => feature
                            .iter_mut()
                            .zip(cls)
                            .for_each(|(f, &v)| *f += v * inv_views),
                        Pool::Mean => {
                            let scale = inv_views / area as f32;
                            for token in patches.chunks_exact(d) {
                                feature
                                    .iter_mut()
                                    .zip(token)
                                    .for_each(|(f, &v)| *f += v * scale);
                            }
                        }
                    }
                }
            });
        out
    }

    /// Every token after the final norm, `[N·views, 1 + n², D]`, of normalised images
    /// `[N, 3, H, H]`; an image's views are consecutive, in row-major order of their
    /// origins, and a sequence's patches in row-major order.
    pub fn tokens(&self, images: &[f32]) -> Vec<f32> {
        assert!(
            images.len().is_multiple_of(self.image_len()),
            "images of {} values",
            images.len()
        );
        let (m, r, p) = (&self.m, &self.r, self.params);
        let (area, d) = (self.side * self.side, m.width);
        let rows = self.patch_rows(images);
        let seqs = rows.len() / (area * m.patch_dim());
        let mut embedded = vec![0.0f32; seqs * area * d];
        linear::linear_forward(
            &mut embedded,
            &rows,
            &p[r.patch_w.clone()],
            &p[r.patch_b.clone()],
        );
        // Every position is visible: cls, then every patch in order.
        let mut x = vec![0.0f32; seqs * (1 + area) * d];
        tokens::prepend_cls_forward(&mut x, &p[r.cls_token.clone()], &embedded);
        if !self.pos.is_empty() {
            for seq in x.chunks_exact_mut((1 + area) * d) {
                seq.iter_mut().zip(&self.pos).for_each(|(v, &q)| *v += q);
            }
        }
        let layout = match &self.rel {
            Some(rel) => Tokens::Windows(rel),
            None => Tokens::Global(1 + area),
        };
        // One set of buffers serves every block: the encoder keeps nothing for a backward.
        let mut acts = BlockActs::default();
        *acts.input() = x;
        let mut x = Vec::new();
        for (b, table) in r.blocks.iter().zip(&self.tables) {
            block_forward(p, b, table, layout, m.heads, &mut acts, &mut x);
            std::mem::swap(acts.input(), &mut x);
        }
        let x = std::mem::take(acts.input());
        let mut normed = vec![0.0f32; x.len()];
        layernorm::layernorm_forward(&mut normed, &x, &p[r.norm_w.clone()], &p[r.norm_b.clone()]);
        normed
    }

    /// Top-left patch (row, col) of each view inside an image.
    pub fn origins(&self) -> &[(usize, usize)] {
        &self.origins
    }

    /// `[S·n², 3p²]`: each sequence's patches in row-major order, pixels in Conv2d
    /// `(c, y, x)` order like the training gather.
    fn patch_rows(&self, images: &[f32]) -> Vec<f32> {
        let (p, img, side) = (self.m.patch, self.image, self.side);
        let (pd, area, views) = (self.m.patch_dim(), side * side, self.origins.len());
        let seqs = images.len() / self.image_len() * views;
        let mut rows = vec![0.0f32; seqs * area * pd];
        rows.par_chunks_mut(area * pd)
            .enumerate()
            .for_each(|(s, seq_rows)| {
                let image = &images[(s / views) * self.image_len()..][..self.image_len()];
                let (row0, col0) = self.origins[s % views];
                for (i, row) in seq_rows.chunks_exact_mut(pd).enumerate() {
                    let (top, left) = ((row0 + i / side) * p, (col0 + i % side) * p);
                    for c in 0..3 {
                        for y in 0..p {
                            let src = &image[(c * img + top + y) * img + left..][..p];
                            row[(c * p + y) * p..][..p].copy_from_slice(src);
                        }
                    }
                }
            });
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_tile_the_grid_and_cover_every_patch() {
        assert_eq!(tile_starts(8, 4), vec![0, 4]);
        assert_eq!(tile_starts(14, 7), vec![0, 7]);
        assert_eq!(tile_starts(4, 4), vec![0]);
        assert_eq!(tile_starts(10, 4), vec![0, 4, 6]);
    }
}
