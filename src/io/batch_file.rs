//! Batch files: one sampled micro-batch in safetensors, the input of `lomar grad`.
//!
//! Tensors: `images` `[B, 3, H, W]` F32 (normalised), `window_origin` `[B, n_win, 2]`
//! (row, col of each window's top-left patch) and `mask_index` `[B, n_win, M]` (masked
//! window positions `ky*K + kx`, strictly ascending), integers as I32, I64 or U32.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::config::{Config, ModelConfig};
use crate::data::batch::{Batch, Pixels};
use crate::io::tensor_file::{write_atomic, OutTensor, TensorFile};

/// Writes a batch, integers as I64 (what PyTorch indexes with).
pub fn write(path: &Path, config: &Config, batch: &Batch) -> Result<()> {
    let m = &config.model;
    let (b, n_win) = (batch.images_len, m.windows_per_image);
    let origin: Vec<i64> = batch.window_origin.iter().map(|&v| v as i64).collect();
    let mask: Vec<i64> = batch.mask_index.iter().map(|&v| v as i64).collect();
    let images = batch.images.normalised(m.image * m.image);
    let tensors = [
        OutTensor::f32("images", &[b, 3, m.image, m.image], &images),
        OutTensor::i64("window_origin", &[b, n_win, 2], &origin),
        OutTensor::i64("mask_index", &[b, n_win, m.masked_per_window()], &mask),
    ];
    let meta = HashMap::from([
        ("format".to_string(), "lomar-batch".to_string()),
        ("config".to_string(), serde_json::to_string(config)?),
    ]);
    write_atomic(path, &tensors, meta)
        .with_context(|| format!("cannot write batch file {}", path.display()))
}

/// Reads and checks a batch for `model`: shapes, dtypes, index ranges, mask order.
pub fn read(path: &Path, model: &ModelConfig) -> Result<Batch> {
    let file = TensorFile::open(path, "batch file")?;
    let (shape, images) = file.f32("images")?;
    let (h, w) = (model.image, model.image);
    if shape.len() != 4 || shape[0] == 0 || shape[1..] != [3, h, w] {
        bail!(
            "{}: tensor `images` has shape {shape:?}, want [B, 3, {h}, {w}] with B >= 1",
            path.display()
        );
    }
    let b = shape[0];
    let n_win = model.windows_per_image;
    let (shape, window_origin) = file.indices("window_origin")?;
    if shape != [b, n_win, 2] {
        bail!(
            "{}: tensor `window_origin` has shape {shape:?}, want [B={b}, n_win={n_win}, 2]",
            path.display()
        );
    }
    let mk = model.masked_per_window();
    let (shape, mask_index) = file.indices("mask_index")?;
    if shape != [b, n_win, mk] {
        bail!(
            "{}: tensor `mask_index` has shape {shape:?}, want [B={b}, n_win={n_win}, M={mk}]",
            path.display()
        );
    }
    let batch = Batch {
        images_len: b,
        images: Pixels::Normalised(images),
        window_origin,
        mask_index,
    };
    batch
        .validate(model)
        .with_context(|| format!("batch file {}", path.display()))?;
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{preset, TrainConfig};
    use crate::data::BatchSource;

    #[test]
    fn a_written_batch_reads_back_identically() {
        let config = Config {
            preset: "tiny".into(),
            model: preset("tiny").unwrap(),
            train: TrainConfig::default(),
        };
        let batch = BatchSource::new(&config.model, 2).next_batch(3).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.safetensors");
        write(&path, &config, &batch).unwrap();
        // The file holds the values the model sees: the bytes, normalised.
        let plane = config.model.image * config.model.image;
        let seen = Batch {
            images: Pixels::Normalised(batch.images.normalised(plane).into_owned()),
            ..batch.clone()
        };
        assert_eq!(read(&path, &config.model).unwrap(), seen);
        let other = ModelConfig {
            windows_per_image: 3,
            ..config.model
        };
        let err = read(&path, &other).unwrap_err().to_string();
        assert!(err.contains("`window_origin` has shape [3, 2, 2]"), "{err}");
    }
}
