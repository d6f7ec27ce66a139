//! Command-line overrides of a config, and the resolution of the config a command runs with.
//!
//! A run's config comes from `--config FILE.json` (a serialised `Config`), else from a
//! checkpoint being resumed, else from `--preset` (default `tiny`); every flag given then
//! overrides its field, and the result is validated before any work starts.

use std::fs;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::{preset, train_defaults, Config};

/// Which model: a preset or a config file, then per-field overrides.
#[derive(Args, Debug, Default)]
pub struct ModelOverrides {
    /// Model preset: tiny, vit_tiny, vit_small, vit_base, vit_large, vit_huge [default: tiny]
    #[arg(long, conflicts_with = "config")]
    pub preset: Option<String>,
    /// Start from this JSON config (as stored in checkpoints and written to --out).
    #[arg(long, value_name = "FILE.json")]
    pub config: Option<PathBuf>,
    /// Image side H in pixels.
    #[arg(long)]
    pub image: Option<usize>,
    /// Patch side p in pixels.
    #[arg(long)]
    pub patch: Option<usize>,
    /// Window side K in patches.
    #[arg(long)]
    pub window: Option<usize>,
    /// Windows sampled per image.
    #[arg(long)]
    pub windows_per_image: Option<usize>,
    /// Fraction of each window's patches that are masked.
    #[arg(long)]
    pub mask_ratio: Option<f64>,
    /// Transformer blocks.
    #[arg(long)]
    pub depth: Option<usize>,
    /// Token width D.
    #[arg(long)]
    pub width: Option<usize>,
    /// Attention heads.
    #[arg(long)]
    pub heads: Option<usize>,
    /// Reconstruct raw (normalised) pixels instead of per-patch normalised ones.
    #[arg(long)]
    pub no_norm_pix: bool,
}

/// Training overrides.
#[derive(Args, Debug, Default)]
pub struct TrainOverrides {
    /// Images per micro-batch.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Micro-batches accumulated per optimiser step.
    #[arg(long)]
    pub accum: Option<usize>,
    /// Optimiser steps of the whole run.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Steps of linear learning-rate warm-up.
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// Base learning rate; the peak is blr * batch * accum / 256.
    #[arg(long)]
    pub blr: Option<f64>,
    /// Learning rate at the end of the cosine decay.
    #[arg(long)]
    pub min_lr: Option<f64>,
    /// AdamW weight decay (matrix weights only).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// AdamW first-moment decay.
    #[arg(long)]
    pub beta1: Option<f64>,
    /// AdamW second-moment decay.
    #[arg(long)]
    pub beta2: Option<f64>,
    /// AdamW epsilon.
    #[arg(long)]
    pub eps: Option<f64>,
    /// Clip the global gradient norm to this value.
    #[arg(long)]
    pub clip_grad: Option<f64>,
    /// Seed of the parameters, the data and the sampler.
    #[arg(long)]
    pub seed: Option<u64>,
}

/// The config a command runs with (see the module doc for the order), validated.
pub fn resolve(
    model: &ModelOverrides,
    train: &TrainOverrides,
    base: Option<Config>,
) -> Result<Config> {
    let mut config = if let Some(path) = &model.config {
        let text = fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        serde_json::from_str::<Config>(&text).with_context(|| {
            format!("config file {} is not a valid lomar config", path.display())
        })?
    } else if let (Some(base), None) = (base, &model.preset) {
        base
    } else {
        let name = model.preset.as_deref().unwrap_or("tiny");
        Config {
            preset: name.to_string(),
            model: preset(name)?,
            train: train_defaults(name),
        }
    };
    let m = &mut config.model;
    set(&mut m.image, model.image);
    set(&mut m.patch, model.patch);
    set(&mut m.window, model.window);
    set(&mut m.windows_per_image, model.windows_per_image);
    set(&mut m.mask_ratio, model.mask_ratio);
    set(&mut m.depth, model.depth);
    set(&mut m.width, model.width);
    set(&mut m.heads, model.heads);
    if model.no_norm_pix {
        m.norm_pix = false;
    }
    let t = &mut config.train;
    set(&mut t.batch, train.batch);
    set(&mut t.accum, train.accum);
    set(&mut t.steps, train.steps);
    set(&mut t.warmup_steps, train.warmup_steps);
    set(&mut t.blr, train.blr);
    set(&mut t.min_lr, train.min_lr);
    set(&mut t.weight_decay, train.weight_decay);
    set(&mut t.beta1, train.beta1);
    set(&mut t.beta2, train.beta2);
    set(&mut t.eps, train.eps);
    if train.clip_grad.is_some() {
        t.clip_grad = train.clip_grad;
    }
    set(&mut t.seed, train.seed);
    config.validate().context("invalid configuration")?;
    Ok(config)
}

fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *field = v;
    }
}
