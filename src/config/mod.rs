//! Model and training configuration: presets, command-line overrides, validation.
//!
//! Every invalid combination is refused here, before any work, with a message that names
//! the field and the range it accepts.

mod overrides;
mod presets;

pub use overrides::{resolve, same_method, ModelOverrides, TrainOverrides};
pub use presets::{mae_recipe, preset, train_defaults, PRESETS};

use anyhow::{bail, Result};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

/// Which pretraining method the network implements (`--method`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Local masked reconstruction: small windows of the grid (docs/DESIGN.md §1).
    #[default]
    Lomar,
    /// Masked autoencoder: masking over the whole grid and a decoder (docs/DESIGN.md §7).
    Mae,
}

impl Method {
    /// The name `--method` takes.
    pub fn name(self) -> &'static str {
        match self {
            Method::Lomar => "lomar",
            Method::Mae => "mae",
        }
    }
}

/// MAE's decoder: its own width, depth and heads; the MLP ratio is the encoder's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecoderConfig {
    pub width: usize,
    pub depth: usize,
    pub heads: usize,
}

impl DecoderConfig {
    pub fn head_dim(&self) -> usize {
        self.width / self.heads
    }
    pub fn hidden(&self) -> usize {
        self.width * MLP_RATIO
    }
}

/// What the network computes (docs/DESIGN.md §1). Everything the kernels and the sampler need
/// derives from these fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Image side `H` (images are square).
    pub image: usize,
    /// Patch side `p`.
    pub patch: usize,
    /// Window side `K`, in patches.
    pub window: usize,
    /// Windows per image.
    pub windows_per_image: usize,
    /// Fraction of each window's patches that are masked.
    pub mask_ratio: f64,
    /// Transformer blocks `L`.
    pub depth: usize,
    /// Token width `D`.
    pub width: usize,
    /// Attention heads `h`.
    pub heads: usize,
    /// Normalise each target patch by its own mean and unbiased variance.
    pub norm_pix: bool,
    /// LoMaR or MAE; a file written before the field existed is LoMaR.
    #[serde(default)]
    pub method: Method,
    /// MAE's decoder; `None` for LoMaR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder: Option<DecoderConfig>,
}

/// The MLP hidden width is always four times the token width.
pub const MLP_RATIO: usize = 4;
/// LayerNorm epsilon of every norm in the network.
pub const LN_EPS: f64 = 1e-6;
/// Epsilon inside the norm-pix target normalisation.
pub const NORM_PIX_EPS: f64 = 1e-6;

impl ModelConfig {
    /// Patch grid side `G = H / p`.
    pub fn grid(&self) -> usize {
        self.image / self.patch
    }
    /// Positions in one window, `K²`.
    pub fn window_area(&self) -> usize {
        self.window * self.window
    }
    /// Tokens per window sequence: cls plus `K²`.
    pub fn seq_len(&self) -> usize {
        1 + self.window_area()
    }
    /// Masked positions per window: LoMaR's `M = floor(K² r)`; MAE keeps
    /// `floor(N (1 - r))` of the `N = G²` patches (its one window is the whole grid) and
    /// masks the rest.
    pub fn masked_per_window(&self) -> usize {
        // The small epsilon keeps e.g. 0.7 * 10 from flooring to 6.
        let floor = |v: f64| (v + 1e-9).floor() as usize;
        let area = self.window_area();
        match self.method {
            Method::Lomar => floor(area as f64 * self.mask_ratio),
            Method::Mae => area - floor(area as f64 * (1.0 - self.mask_ratio)),
        }
    }
    /// Visible positions per window, `V = K² - M`.
    pub fn visible_per_window(&self) -> usize {
        self.window_area() - self.masked_per_window()
    }
    /// Head dimension `d = D / h`.
    pub fn head_dim(&self) -> usize {
        self.width / self.heads
    }
    /// MLP hidden width.
    pub fn hidden(&self) -> usize {
        self.width * MLP_RATIO
    }
    /// Values in one patch, `3 p²`.
    pub fn patch_dim(&self) -> usize {
        3 * self.patch * self.patch
    }
    /// Rows of the relative position bias table, `(2K-1)² + 3`.
    pub fn rel_bias_rows(&self) -> usize {
        let span = 2 * self.window - 1;
        span * span + 3
    }

    /// Refuses every combination the model cannot run, naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.patch == 0 || self.patch > 64 {
            bail!("patch = {}: must be in 1..=64", self.patch);
        }
        if self.image == 0 || self.image > 4096 || !self.image.is_multiple_of(self.patch) {
            bail!(
                "image = {}: must be a multiple of patch ({}) in 1..=4096",
                self.image,
                self.patch
            );
        }
        match self.method {
            Method::Lomar => self.validate_windows()?,
            Method::Mae => self.validate_mae()?,
        }
        if !(self.mask_ratio > 0.0 && self.mask_ratio < 1.0) {
            bail!("mask_ratio = {}: must be in (0, 1)", self.mask_ratio);
        }
        let area = self.window_area();
        if self.masked_per_window() == 0 || self.masked_per_window() == area {
            bail!(
                "mask_ratio = {}: masks {} of the {} window positions; it must mask between 1 and {}",
                self.mask_ratio,
                self.masked_per_window(),
                area,
                area - 1
            );
        }
        if self.depth == 0 || self.depth > 256 {
            bail!("depth = {}: must be in 1..=256", self.depth);
        }
        if self.heads == 0 {
            bail!("heads = {}: must be at least 1", self.heads);
        }
        if self.width == 0 || self.width > 8192 || !self.width.is_multiple_of(self.heads) {
            bail!(
                "width = {}: must be a multiple of heads ({}) in 1..=8192",
                self.width,
                self.heads
            );
        }
        Ok(())
    }

    /// LoMaR's windows must fit the grid; it has no decoder.
    fn validate_windows(&self) -> Result<()> {
        if self.window < 2 || self.window > 32 {
            bail!("window = {}: must be in 2..=32", self.window);
        }
        if self.grid() < self.window {
            bail!(
                "image = {}: the patch grid ({}x{}) must be at least window ({}) patches wide; use image >= {}",
                self.image,
                self.grid(),
                self.grid(),
                self.window,
                self.window * self.patch
            );
        }
        if self.windows_per_image == 0 || self.windows_per_image > 1024 {
            bail!(
                "windows_per_image = {}: must be in 1..=1024",
                self.windows_per_image
            );
        }
        if self.decoder.is_some() {
            bail!("decoder: LoMaR has no decoder (only --method mae has one)");
        }
        Ok(())
    }

    /// MAE's one window is the whole grid, and it needs a decoder.
    fn validate_mae(&self) -> Result<()> {
        if self.window != self.grid() || self.windows_per_image != 1 {
            bail!(
                "window = {}, windows_per_image = {}: MAE masks the whole {}x{} grid, so its one window is the grid (window = {}, windows_per_image = 1)",
                self.window,
                self.windows_per_image,
                self.grid(),
                self.grid(),
                self.grid()
            );
        }
        if self.grid() > 64 {
            bail!(
                "image = {}: MAE's decoder attends over all {} patches of the grid; the grid may be at most 64 patches wide (image <= {})",
                self.image,
                self.grid() * self.grid(),
                64 * self.patch
            );
        }
        let Some(dec) = self.decoder else {
            bail!("decoder: --method mae needs a decoder (width, depth, heads)");
        };
        // The sin-cos position embedding splits the width into four equal parts.
        if !self.width.is_multiple_of(4) {
            bail!("width = {}: MAE needs a multiple of 4", self.width);
        }
        if dec.depth == 0 || dec.depth > 256 {
            bail!("decoder_depth = {}: must be in 1..=256", dec.depth);
        }
        if dec.heads == 0 {
            bail!("decoder_heads = {}: must be at least 1", dec.heads);
        }
        if dec.width == 0
            || dec.width > 8192
            || !dec.width.is_multiple_of(dec.heads)
            || !dec.width.is_multiple_of(4)
        {
            bail!(
                "decoder_width = {}: must be a multiple of 4 and of decoder_heads ({}) in 1..=8192",
                dec.width,
                dec.heads
            );
        }
        Ok(())
    }

    /// Number of trainable scalars.
    pub fn param_count(&self) -> usize {
        crate::params::ParamLayout::new(self).total()
    }
}

/// How the model is trained: batch, schedule, optimiser, checkpoints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Images per micro-batch.
    pub batch: usize,
    /// Micro-batches accumulated per optimiser step.
    pub accum: usize,
    /// Optimiser steps.
    pub steps: u64,
    /// Linear warm-up steps.
    pub warmup_steps: u64,
    /// Base learning rate; the peak is `blr * batch * accum * world / 256`.
    pub blr: f64,
    /// Learning rate at the end of the cosine.
    pub min_lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clip; `None` disables clipping.
    pub clip_grad: Option<f64>,
    /// Seed of the parameters, the sampler and the synthetic data.
    pub seed: u64,
    /// Data-parallel ranks, each training `batch` images per micro-batch. Set from the
    /// launcher, not a flag; absent from single-process configs.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub world: usize,
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

impl TrainConfig {
    /// Images per optimiser step, over all ranks.
    pub fn effective_batch(&self) -> usize {
        self.batch * self.accum * self.world
    }
    /// Peak learning rate, scaled linearly with the effective batch.
    pub fn peak_lr(&self) -> f64 {
        self.blr * self.effective_batch() as f64 / 256.0
    }

    pub fn validate(&self) -> Result<()> {
        if self.batch == 0 || self.batch > 65536 {
            bail!("batch = {}: must be in 1..=65536", self.batch);
        }
        if self.accum == 0 {
            bail!("accum = 0: must be at least 1");
        }
        if self.world == 0 || self.world > 65536 {
            bail!("world = {}: must be in 1..=65536", self.world);
        }
        if self.steps == 0 {
            bail!("steps = 0: must be at least 1");
        }
        if self.warmup_steps > self.steps {
            bail!(
                "warmup_steps = {}: must be at most steps ({})",
                self.warmup_steps,
                self.steps
            );
        }
        let finite_nonneg = |name: &str, v: f64| -> Result<()> {
            if !(v.is_finite() && v >= 0.0) {
                bail!("{name} = {v}: must be a finite number >= 0");
            }
            Ok(())
        };
        finite_nonneg("blr", self.blr)?;
        finite_nonneg("min_lr", self.min_lr)?;
        finite_nonneg("weight_decay", self.weight_decay)?;
        if self.min_lr > self.peak_lr() {
            bail!(
                "min_lr = {}: must not exceed the peak learning rate blr*batch*accum*world/256 = {}",
                self.min_lr,
                self.peak_lr()
            );
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                bail!("{name} = {b}: must be in [0, 1)");
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            bail!("eps = {}: must be a finite number > 0", self.eps);
        }
        if let Some(c) = self.clip_grad {
            if !(c.is_finite() && c > 0.0) {
                bail!("clip_grad = {c}: must be a finite number > 0");
            }
        }
        Ok(())
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            batch: 32,
            accum: 1,
            steps: 200,
            warmup_steps: 20,
            blr: 1.5e-4,
            min_lr: 0.0,
            weight_decay: 0.05,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            clip_grad: None,
            seed: 0,
            world: 1,
        }
    }
}

/// A whole run's settings, stored in every checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub preset: String,
    pub model: ModelConfig,
    pub train: TrainConfig,
}

impl Config {
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        self.train.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid() {
        for name in PRESETS {
            preset(name).unwrap().validate().unwrap();
        }
    }

    #[test]
    fn vit_base_window_counts() {
        let m = preset("vit_base").unwrap();
        assert_eq!(m.grid(), 14);
        assert_eq!(m.masked_per_window(), 39);
        assert_eq!(m.visible_per_window(), 10);
        assert_eq!(m.rel_bias_rows(), 172);
        assert_eq!(m.head_dim(), 64);
    }

    #[test]
    fn mae_base_is_the_official_recipe() {
        let m = preset("mae_base").unwrap();
        assert_eq!(m.method, Method::Mae);
        assert_eq!((m.width, m.depth, m.heads), (768, 12, 12));
        assert_eq!(
            m.decoder,
            Some(DecoderConfig {
                width: 512,
                depth: 8,
                heads: 16
            })
        );
        // 196 patches, floor(196 * 0.25) = 49 kept, 147 masked, one window at the grid.
        assert_eq!(
            (m.window, m.windows_per_image, m.window_area()),
            (14, 1, 196)
        );
        assert_eq!(m.visible_per_window(), 49);
        assert_eq!(m.masked_per_window(), 147);
        // floor(N (1 - r)) kept: 64 patches at r = 0.7 keep floor(19.2) = 19, mask 45,
        // where LoMaR's rule would mask floor(44.8) = 44.
        let odd = ModelConfig {
            image: 32,
            patch: 4,
            window: 8,
            mask_ratio: 0.7,
            ..m.clone()
        };
        assert_eq!(odd.masked_per_window(), 45);
        let narrow = |name: &str| mae_recipe(preset(name).unwrap()).decoder.unwrap();
        assert_eq!(
            narrow("vit_small"),
            DecoderConfig {
                width: 256,
                depth: 8,
                heads: 8
            }
        );
        assert_eq!(narrow("vit_tiny").width, 128);
        assert_eq!(preset("mae_huge").unwrap().decoder, m.decoder);
    }

    #[test]
    fn method_is_recorded_and_old_configs_read_as_lomar() {
        let m = preset("mae_base").unwrap();
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["method"], "mae");
        assert_eq!(json["decoder"]["width"], 512);
        let mut old = serde_json::to_value(preset("vit_base").unwrap()).unwrap();
        assert_eq!(old["method"], "lomar");
        assert!(old.get("decoder").is_none());
        old.as_object_mut().unwrap().remove("method");
        let read: ModelConfig = serde_json::from_value(old).unwrap();
        assert_eq!(read, preset("vit_base").unwrap());
    }

    #[test]
    fn mae_models_refuse_windows_and_a_missing_decoder() {
        let m = mae_recipe(preset("tiny").unwrap());
        m.validate().unwrap();
        refused(
            ModelConfig {
                window: 4,
                ..m.clone()
            },
            "window",
        );
        refused(
            ModelConfig {
                decoder: None,
                ..m.clone()
            },
            "decoder",
        );
        refused(
            ModelConfig {
                decoder: Some(DecoderConfig {
                    width: 30,
                    depth: 1,
                    heads: 4,
                }),
                ..m.clone()
            },
            "decoder_width",
        );
        refused(
            ModelConfig {
                mask_ratio: 0.99,
                ..m.clone()
            },
            "mask_ratio",
        );
        refused(
            ModelConfig {
                image: 2048,
                window: 512,
                ..m.clone()
            },
            "image",
        );
        refused(
            ModelConfig {
                decoder: m.decoder,
                ..preset("tiny").unwrap()
            },
            "decoder",
        );
    }

    fn refused(m: ModelConfig, field: &str) {
        let err = m.validate().unwrap_err().to_string();
        assert!(err.starts_with(field), "{err:?} should name {field}");
    }

    #[test]
    fn invalid_models_are_refused_naming_the_field() {
        let base = preset("tiny").unwrap();
        // Sizes that would exhaust memory before any error could be reported.
        refused(
            ModelConfig {
                image: 100_000,
                ..base.clone()
            },
            "image",
        );
        refused(
            ModelConfig {
                width: 1 << 20,
                heads: 1,
                ..base.clone()
            },
            "width",
        );
        refused(
            ModelConfig {
                image: 30,
                ..base.clone()
            },
            "image",
        );
        refused(
            ModelConfig {
                image: 12,
                ..base.clone()
            },
            "image",
        );
        refused(
            ModelConfig {
                width: 65,
                ..base.clone()
            },
            "width",
        );
        refused(
            ModelConfig {
                heads: 0,
                ..base.clone()
            },
            "heads",
        );
        refused(
            ModelConfig {
                mask_ratio: 0.05,
                ..base.clone()
            },
            "mask_ratio",
        );
        refused(
            ModelConfig {
                mask_ratio: 1.0,
                ..base.clone()
            },
            "mask_ratio",
        );
        refused(
            ModelConfig {
                window: 1,
                ..base.clone()
            },
            "window",
        );
        refused(
            ModelConfig {
                depth: 0,
                ..base.clone()
            },
            "depth",
        );
        refused(
            ModelConfig {
                windows_per_image: 0,
                ..base
            },
            "windows_per_image",
        );
    }

    #[test]
    fn invalid_training_settings_are_refused_naming_the_field() {
        let ok = TrainConfig::default();
        for (bad, field) in [
            (
                TrainConfig {
                    batch: 0,
                    ..ok.clone()
                },
                "batch",
            ),
            (
                TrainConfig {
                    batch: 1 << 30,
                    ..ok.clone()
                },
                "batch",
            ),
            (
                TrainConfig {
                    accum: 0,
                    ..ok.clone()
                },
                "accum",
            ),
            (
                TrainConfig {
                    steps: 0,
                    ..ok.clone()
                },
                "steps",
            ),
            (
                TrainConfig {
                    warmup_steps: 500,
                    ..ok.clone()
                },
                "warmup_steps",
            ),
            (
                TrainConfig {
                    blr: f64::NAN,
                    ..ok.clone()
                },
                "blr",
            ),
            (
                TrainConfig {
                    beta2: 1.0,
                    ..ok.clone()
                },
                "beta2",
            ),
            (
                TrainConfig {
                    eps: 0.0,
                    ..ok.clone()
                },
                "eps",
            ),
            (
                TrainConfig {
                    clip_grad: Some(-1.0),
                    ..ok.clone()
                },
                "clip_grad",
            ),
            (TrainConfig { min_lr: 1.0, ..ok }, "min_lr"),
        ] {
            let err = bad.validate().unwrap_err().to_string();
            assert!(err.starts_with(field), "{err:?} should name {field}");
        }
    }
}
