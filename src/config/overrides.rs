//! Command-line overrides of a config, and the resolution of the config a command runs with.
//!
//! A run's config comes from `--config FILE.json` (a serialised `Config`), else from a
//! checkpoint being resumed, else from `--preset` (default `tiny`); every flag given then
//! overrides its field, and the result is validated before any work starts.

use std::fs;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::{mae_recipe, preset, train_defaults, Config, Method};

/// Which model: a preset or a config file, then per-field overrides.
#[derive(Args, Debug, Default)]
pub struct ModelOverrides {
    /// Pretraining method: LoMaR's local windows, or MAE's whole-grid masking and decoder
    /// [default: the preset's, config's or checkpoint's; lomar for a plain preset]. A file
    /// of one method is refused by the other.
    #[arg(long, value_enum)]
    pub method: Option<Method>,
    /// Model preset: tiny, vit_tiny, vit_small, vit_base, vit_large, vit_huge; mae_small,
    /// mae_base, mae_large, mae_huge (any preset with --method mae gets MAE's recipe)
    /// [default: tiny]
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
    /// MAE decoder width.
    #[arg(long)]
    pub decoder_width: Option<usize>,
    /// MAE decoder blocks.
    #[arg(long)]
    pub decoder_depth: Option<usize>,
    /// MAE decoder attention heads.
    #[arg(long)]
    pub decoder_heads: Option<usize>,
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
        let config = serde_json::from_str::<Config>(&text).with_context(|| {
            format!("config file {} is not a valid lomar config", path.display())
        })?;
        same_method(
            config.model.method,
            model.method,
            &format!("config file {}", path.display()),
        )?;
        config
    } else if let (Some(base), None) = (base, &model.preset) {
        same_method(
            base.model.method,
            model.method,
            "the checkpoint being resumed",
        )?;
        base
    } else {
        let name = model.preset.as_deref().unwrap_or("tiny");
        let mut config = Config {
            preset: name.to_string(),
            model: preset(name)?,
            train: train_defaults(name),
        };
        match model.method {
            Some(Method::Mae) if config.model.method == Method::Lomar => {
                config.model = mae_recipe(config.model);
            }
            _ => same_method(config.model.method, model.method, &format!("preset {name}"))?,
        }
        config
    };
    apply_model_overrides(&mut config, model)?;
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

/// Refuses to run `what`, a model of method `found`, as the method `wanted` (`None`: the
/// user did not say).
pub fn same_method(found: Method, wanted: Option<Method>, what: &str) -> Result<()> {
    match wanted {
        Some(w) if w != found => bail!(
            "{what} holds a --method {} model; it cannot run with --method {} (the two methods have different parameters and batches)",
            found.name(),
            w.name()
        ),
        _ => Ok(()),
    }
}

/// Sets every model field a flag names. MAE's one window follows the grid; its window
/// flags and LoMaR's decoder flags are refused rather than ignored.
fn apply_model_overrides(config: &mut Config, model: &ModelOverrides) -> Result<()> {
    let m = &mut config.model;
    let decoder_flags = [
        model.decoder_width,
        model.decoder_depth,
        model.decoder_heads,
    ];
    match m.method {
        Method::Lomar => {
            if decoder_flags.iter().any(Option::is_some) {
                bail!("--decoder-width/--decoder-depth/--decoder-heads: only --method mae has a decoder");
            }
        }
        Method::Mae => {
            if model.window.is_some() || model.windows_per_image.is_some() {
                bail!("--window/--windows-per-image: MAE masks the whole grid and has no windows");
            }
        }
    }
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
    if let Some(dec) = &mut m.decoder {
        set(&mut dec.width, model.decoder_width);
        set(&mut dec.depth, model.decoder_depth);
        set(&mut dec.heads, model.decoder_heads);
    }
    // A zero patch is left for validation to refuse by name.
    if m.method == Method::Mae && m.patch > 0 {
        m.window = m.grid();
    }
    Ok(())
}

fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *field = v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DecoderConfig;

    fn mae() -> ModelOverrides {
        ModelOverrides {
            method: Some(Method::Mae),
            ..ModelOverrides::default()
        }
    }

    fn err(model: &ModelOverrides, base: Option<Config>) -> String {
        format!(
            "{:#}",
            resolve(model, &TrainOverrides::default(), base).unwrap_err()
        )
    }

    #[test]
    fn method_mae_turns_a_preset_into_its_mae_recipe() {
        let none = TrainOverrides::default();
        let tiny = resolve(&mae(), &none, None).unwrap();
        assert_eq!(tiny.model, mae_recipe(preset("tiny").unwrap()));
        let base = ModelOverrides {
            preset: Some("vit_base".into()),
            ..mae()
        };
        assert_eq!(
            resolve(&base, &none, None).unwrap().model,
            preset("mae_base").unwrap()
        );
        // The one window follows the grid; the decoder flags set the decoder.
        let wide = ModelOverrides {
            image: Some(64),
            decoder_width: Some(64),
            decoder_heads: Some(2),
            ..mae()
        };
        let m = resolve(&wide, &none, None).unwrap().model;
        assert_eq!((m.window, m.grid()), (16, 16));
        assert_eq!(
            m.decoder,
            Some(DecoderConfig {
                width: 64,
                depth: 2,
                heads: 2
            })
        );
    }

    #[test]
    fn one_method_refuses_the_others_files_and_flags() {
        let lomar = resolve(&ModelOverrides::default(), &TrainOverrides::default(), None).unwrap();
        let e = err(&mae(), Some(lomar));
        assert!(
            e.contains("checkpoint being resumed holds a --method lomar model")
                && e.contains("--method mae"),
            "{e}"
        );
        let e = err(
            &ModelOverrides {
                preset: Some("mae_base".into()),
                method: Some(Method::Lomar),
                ..ModelOverrides::default()
            },
            None,
        );
        assert!(
            e.contains("preset mae_base holds a --method mae model"),
            "{e}"
        );
        let e = err(
            &ModelOverrides {
                window: Some(4),
                ..mae()
            },
            None,
        );
        assert!(e.starts_with("--window"), "{e}");
        let e = err(
            &ModelOverrides {
                decoder_depth: Some(4),
                ..ModelOverrides::default()
            },
            None,
        );
        assert!(e.starts_with("--decoder"), "{e}");
    }
}
