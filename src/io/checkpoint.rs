//! Checkpoints and parameter files (safetensors).
//!
//! A checkpoint holds every parameter under its layout name with its layout shape, the
//! AdamW moments as `optimizer.m.<name>` / `optimizer.v.<name>`, and in the metadata the
//! run's `Config` (JSON), the step, the sampler and data states and the lomar version: all
//! a run needs to continue bit-identically. A parameter file (`lomar init`) holds the
//! parameters and the config only. Loading checks everything and names what is wrong.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::backend::Moments;
use crate::config::{Config, ModelConfig};
use crate::data::sampler::SamplerState;
use crate::data::DataState;
use crate::io::tensor_file::{write_atomic, OutTensor, TensorFile};
use crate::params::ParamLayout;

/// `format` metadata of a checkpoint.
pub const CHECKPOINT_FORMAT: &str = "lomar-checkpoint";
/// `format` metadata of a parameter file.
pub const PARAMS_FORMAT: &str = "lomar-params";
/// `format` metadata of a gradient file.
pub const GRAD_FORMAT: &str = "lomar-grad";
const MOMENT_M: &str = "optimizer.m.";
const MOMENT_V: &str = "optimizer.v.";

/// A whole training state.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub config: Config,
    /// Optimiser steps completed.
    pub step: u64,
    pub params: Vec<f32>,
    pub moments: Moments,
    pub sampler: SamplerState,
    pub data: DataState,
}

fn base_metadata(format: &str, config: &Config) -> Result<HashMap<String, String>> {
    Ok(HashMap::from([
        ("format".to_string(), format.to_string()),
        (
            "lomar_version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
        ("config".to_string(), serde_json::to_string(config)?),
    ]))
}

/// The layout's tensors, named `prefix + name`, viewing `flat`.
fn named_tensors<'a>(layout: &ParamLayout, prefix: &str, flat: &'a [f32]) -> Vec<OutTensor<'a>> {
    layout
        .entries()
        .iter()
        .map(|e| OutTensor::f32(format!("{prefix}{}", e.name), &e.shape, &flat[e.range()]))
        .collect()
}

impl Checkpoint {
    /// Writes the checkpoint atomically: a crash mid-write keeps the previous file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let layout = ParamLayout::new(&self.config.model);
        let mut tensors = named_tensors(&layout, "", &self.params);
        tensors.extend(named_tensors(&layout, MOMENT_M, &self.moments.m));
        tensors.extend(named_tensors(&layout, MOMENT_V, &self.moments.v));
        let mut meta = base_metadata(CHECKPOINT_FORMAT, &self.config)?;
        meta.insert("step".to_string(), self.step.to_string());
        meta.insert("sampler".to_string(), serde_json::to_string(&self.sampler)?);
        meta.insert("data".to_string(), serde_json::to_string(&self.data)?);
        write_atomic(path, &tensors, meta)
            .with_context(|| format!("cannot write checkpoint {}", path.display()))
    }
}

/// Writes freshly initialised (or any) parameters with the config that shapes them.
pub fn save_params(path: &Path, config: &Config, params: &[f32]) -> Result<()> {
    let layout = ParamLayout::new(&config.model);
    let tensors = named_tensors(&layout, "", params);
    write_atomic(path, &tensors, base_metadata(PARAMS_FORMAT, config)?)
        .with_context(|| format!("cannot write parameter file {}", path.display()))
}

/// Writes the output of `lomar grad`: `loss` (a scalar) and each parameter's gradient
/// under the parameter's name.
pub fn save_gradients(path: &Path, config: &Config, loss: f32, grads: &[f32]) -> Result<()> {
    let layout = ParamLayout::new(&config.model);
    let loss = [loss];
    let mut tensors = vec![OutTensor::f32("loss", &[], &loss)];
    tensors.extend(named_tensors(&layout, "", grads));
    write_atomic(path, &tensors, base_metadata(GRAD_FORMAT, config)?)
        .with_context(|| format!("cannot write gradient file {}", path.display()))
}

/// Refuses a file whose model differs from the requested one, naming every field that
/// differs.
pub fn check_same_model(found: &ModelConfig, requested: &ModelConfig, what: &str) -> Result<()> {
    if found == requested {
        return Ok(());
    }
    crate::config::same_method(found.method, Some(requested.method), what)?;
    let (a, b) = (
        serde_json::to_value(found)?,
        serde_json::to_value(requested)?,
    );
    let fields: Vec<String> = match (a.as_object(), b.as_object()) {
        (Some(a), Some(b)) => a
            .iter()
            .filter(|(k, v)| b.get(*k) != Some(v))
            .map(|(k, v)| {
                let want = b.get(k).map_or("nothing".to_string(), |w| w.to_string());
                format!("{k} = {v} in the file, {want} requested")
            })
            .collect(),
        _ => vec![format!("{found:?} in the file, {requested:?} requested")],
    };
    bail!(
        "{what} was made for a different model: {}",
        fields.join("; ")
    )
}

/// Reads every layout tensor named `prefix + name`, checking dtype and shape.
pub fn read_named(file: &TensorFile, layout: &ParamLayout, prefix: &str) -> Result<Vec<f32>> {
    let mut flat = vec![0.0f32; layout.total()];
    for e in layout.entries() {
        let values = file.f32_exact(&format!("{prefix}{}", e.name), &e.shape)?;
        flat[e.range()].copy_from_slice(&values);
    }
    Ok(flat)
}

/// Reads the parameters of `model` from a parameter file or a checkpoint. A file that
/// records its config must record the same model.
pub fn load_params(path: &Path, model: &ModelConfig) -> Result<Vec<f32>> {
    let file = TensorFile::open(path, "parameter file")?;
    if let Some(config) = file.metadata_json::<Config>("config")? {
        check_same_model(
            &config.model,
            model,
            &format!("parameter file {}", path.display()),
        )?;
    }
    read_named(&file, &ParamLayout::new(model), "")
}

/// A checkpoint whose metadata has been read and checked; its tensors load on demand.
pub struct CheckpointFile {
    file: TensorFile,
    config: Config,
    step: u64,
    sampler: SamplerState,
    data: DataState,
}

impl CheckpointFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = TensorFile::open(path, "checkpoint")?;
        match file.metadata("format") {
            Some(CHECKPOINT_FORMAT) => {}
            Some(PARAMS_FORMAT) => bail!(
                "{} is a parameter file, not a checkpoint: it has no optimiser state to resume from",
                path.display()
            ),
            _ => bail!(
                "{} is not a lomar checkpoint (its metadata has no `format: {CHECKPOINT_FORMAT}`)",
                path.display()
            ),
        }
        let config: Config = file.required_json("config")?;
        config
            .validate()
            .with_context(|| format!("checkpoint {}: invalid config", path.display()))?;
        let step = file.required_json("step")?;
        let sampler: SamplerState = file.required_json("sampler")?;
        let data: DataState = file.required_json("data")?;
        Ok(CheckpointFile {
            file,
            config,
            step,
            sampler,
            data,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn step(&self) -> u64 {
        self.step
    }

    /// Reads the tensors, after checking the checkpoint holds the requested model.
    pub fn load(self, model: &ModelConfig) -> Result<Checkpoint> {
        let what = format!("checkpoint {}", self.file.path().display());
        check_same_model(&self.config.model, model, &what)?;
        let layout = ParamLayout::new(model);
        Ok(Checkpoint {
            params: read_named(&self.file, &layout, "")?,
            moments: Moments {
                m: read_named(&self.file, &layout, MOMENT_M)?,
                v: read_named(&self.file, &layout, MOMENT_V)?,
            },
            config: self.config,
            step: self.step,
            sampler: self.sampler,
            data: self.data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{preset, TrainConfig};

    fn checkpoint() -> Checkpoint {
        let config = Config {
            preset: "tiny".into(),
            model: preset("tiny").unwrap(),
            train: TrainConfig {
                seed: 4,
                ..TrainConfig::default()
            },
        };
        let layout = ParamLayout::new(&config.model);
        let n = layout.total();
        Checkpoint {
            params: layout.init(4),
            moments: Moments {
                m: (0..n).map(|i| i as f32 * 1e-3).collect(),
                v: (0..n).map(|i| (i % 7) as f32).collect(),
            },
            step: 12,
            sampler: SamplerState {
                seed: 4,
                word_pos: 1 << 70,
            },
            data: DataState::synthetic(384),
            config,
        }
    }

    #[test]
    fn a_saved_checkpoint_loads_back_identically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        let ck = checkpoint();
        ck.save(&path).unwrap();
        let file = CheckpointFile::open(&path).unwrap();
        assert_eq!(file.step(), 12);
        assert_eq!(file.load(&ck.config.model).unwrap(), ck);
        // A checkpoint is also a parameter file.
        assert_eq!(load_params(&path, &ck.config.model).unwrap(), ck.params);
    }

    #[test]
    fn a_different_model_is_refused_naming_the_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        let ck = checkpoint();
        ck.save(&path).unwrap();
        let other = ModelConfig {
            depth: 3,
            mask_ratio: 0.5,
            ..ck.config.model.clone()
        };
        let err = CheckpointFile::open(&path)
            .unwrap()
            .load(&other)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mask_ratio = 0.75 in the file, 0.5 requested"),
            "{err}"
        );
        assert!(err.contains("depth = 2 in the file, 3 requested"), "{err}");
        assert!(!err.contains("width"), "{err}");
        let err = load_params(&path, &other).unwrap_err().to_string();
        assert!(err.contains("depth = 2 in the file"), "{err}");
    }

    #[test]
    fn a_parameter_file_is_not_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.safetensors");
        let ck = checkpoint();
        save_params(&path, &ck.config, &ck.params).unwrap();
        assert_eq!(load_params(&path, &ck.config.model).unwrap(), ck.params);
        let err = CheckpointFile::open(&path).err().unwrap().to_string();
        assert!(
            err.contains("is a parameter file, not a checkpoint"),
            "{err}"
        );
    }
}
