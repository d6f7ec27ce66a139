//! A trained (or freshly initialised) model read back for use: the parameters of a
//! checkpoint or a parameter file together with the config recorded in it, so `export`,
//! `features` and `probe` need no model flags.

use std::path::Path;

use anyhow::{anyhow, Context, Result};

use crate::config::Config;
use crate::io::checkpoint::read_named;
use crate::io::tensor_file::TensorFile;
use crate::params::ParamLayout;

/// A model's config and its flat parameters.
#[derive(Clone, Debug)]
pub struct Pretrained {
    pub config: Config,
    pub params: Vec<f32>,
    /// Optimiser steps behind the parameters (0 for a parameter file).
    pub step: u64,
}

impl Pretrained {
    /// Reads a checkpoint (`pretrain`) or a parameter file (`init`).
    pub fn open(path: &Path) -> Result<Self> {
        let file = TensorFile::open(path, "checkpoint")?;
        let config: Config = file.metadata_json("config")?.ok_or_else(|| {
            anyhow!(
                "{} records no config in its metadata: it is not a lomar checkpoint or parameter file",
                path.display()
            )
        })?;
        config
            .model
            .validate()
            .with_context(|| format!("{}: invalid model config", path.display()))?;
        // A parameter file from `init` records no step.
        let step = file.metadata_json("step")?.unwrap_or(0);
        let params = read_named(&file, &ParamLayout::new(&config.model), "")?;
        Ok(Pretrained {
            config,
            params,
            step,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::preset;
    use crate::config::train_defaults;
    use crate::io::checkpoint::save_params;

    #[test]
    fn a_parameter_file_reads_back_with_its_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.safetensors");
        let config = Config {
            preset: "tiny".into(),
            model: preset("tiny").unwrap(),
            train: train_defaults("tiny"),
        };
        let params = ParamLayout::new(&config.model).init(7);
        save_params(&path, &config, &params).unwrap();
        let got = Pretrained::open(&path).unwrap();
        assert_eq!((got.config, got.params, got.step), (config, params, 0));
        std::fs::write(&path, b"not tensors").unwrap();
        let err = Pretrained::open(&path).unwrap_err().to_string();
        assert!(err.contains("not a valid safetensors file"), "{err}");
    }
}
