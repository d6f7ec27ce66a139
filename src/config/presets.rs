//! The named presets: a model (docs/DESIGN.md §1.5, §7.5) and its training defaults.

use anyhow::{bail, Result};

use super::{DecoderConfig, Method, ModelConfig, TrainConfig};

/// Names accepted by [`preset`]: LoMaR's, then MAE's (`mae_X` is `vit_X`'s encoder with
/// MAE's decoder and masking).
pub const PRESETS: [&str; 10] = [
    "tiny",
    "vit_tiny",
    "vit_small",
    "vit_base",
    "vit_large",
    "vit_huge",
    "mae_small",
    "mae_base",
    "mae_large",
    "mae_huge",
];

/// MAE's mask ratio.
const MAE_MASK_RATIO: f64 = 0.75;

/// The model of a named preset at its default resolution (docs/DESIGN.md §1.5).
pub fn preset(name: &str) -> Result<ModelConfig> {
    match name.strip_prefix("mae_") {
        Some(size) if PRESETS.contains(&name) => {
            Ok(mae_recipe(lomar_preset(&format!("vit_{size}"))?))
        }
        _ => lomar_preset(name),
    }
}

/// MAE's recipe on the encoder of `m`: the whole grid is the one window, a quarter of it
/// stays visible, and the decoder is MAE's 512 wide, 8 blocks, 16 heads where the encoder
/// is at least ViT-B's width. Narrower encoders get a decoder two thirds of their width
/// (the ViT-B ratio, 512/768), still 8 blocks of 32-wide heads; the test preset `tiny`
/// gets 32 wide, 2 blocks, 1 head, to stay fast.
pub fn mae_recipe(m: ModelConfig) -> ModelConfig {
    let decoder = match m.width {
        w if w >= 768 => DecoderConfig {
            width: 512,
            depth: 8,
            heads: 16,
        },
        w if w >= 96 => {
            let width = (2 * w / 3).div_ceil(32) * 32;
            DecoderConfig {
                width,
                depth: 8,
                heads: width / 32,
            }
        }
        _ => DecoderConfig {
            width: 32,
            depth: 2,
            heads: 1,
        },
    };
    ModelConfig {
        window: m.grid(),
        windows_per_image: 1,
        mask_ratio: MAE_MASK_RATIO,
        method: Method::Mae,
        decoder: Some(decoder),
        ..m
    }
}

fn lomar_preset(name: &str) -> Result<ModelConfig> {
    let vit = |width, depth, heads, patch| ModelConfig {
        image: 224,
        patch,
        window: 7,
        windows_per_image: 4,
        mask_ratio: 0.8,
        depth,
        width,
        heads,
        norm_pix: true,
        method: Method::Lomar,
        decoder: None,
    };
    Ok(match name {
        // Small enough that a whole training step takes milliseconds on one core.
        "tiny" => ModelConfig {
            image: 32,
            patch: 4,
            window: 4,
            windows_per_image: 2,
            mask_ratio: 0.75,
            depth: 2,
            width: 64,
            // Head dim 32, the smallest the CUDA attention kernels are built for.
            heads: 2,
            norm_pix: true,
            method: Method::Lomar,
            decoder: None,
        },
        "vit_tiny" => vit(192, 12, 3, 16),
        "vit_small" => vit(384, 12, 6, 16),
        "vit_base" => vit(768, 12, 12, 16),
        "vit_large" => vit(1024, 24, 16, 16),
        "vit_huge" => vit(1280, 32, 16, 14),
        other => bail!("preset = {other:?}: must be one of {}", PRESETS.join(", ")),
    })
}

/// Training defaults of a preset. `tiny` is the embedded default job: a learning rate
/// and length that show the loss falling within minutes on a laptop CPU. The ViT presets
/// keep the reference recipe.
pub fn train_defaults(preset_name: &str) -> TrainConfig {
    match preset_name {
        "tiny" => TrainConfig {
            batch: 64,
            steps: 1000,
            warmup_steps: 50,
            blr: 1e-2,
            min_lr: 1e-5,
            ..TrainConfig::default()
        },
        _ => TrainConfig::default(),
    }
}
