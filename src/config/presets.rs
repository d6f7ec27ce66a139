//! The named presets: a model (docs/DESIGN.md §1.5) and its training defaults.

use anyhow::{bail, Result};

use super::{ModelConfig, TrainConfig};

/// Names accepted by [`preset`].
pub const PRESETS: [&str; 6] = [
    "tiny",
    "vit_tiny",
    "vit_small",
    "vit_base",
    "vit_large",
    "vit_huge",
];

/// The model of a named preset at its default resolution (docs/DESIGN.md §1.5).
pub fn preset(name: &str) -> Result<ModelConfig> {
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
