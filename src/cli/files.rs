//! `lomar grad`, `sample-batch` and `init`: the files the parity tests and the PyTorch
//! reference exchange with lomar (gradients, batches, parameters).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::DeviceArgs;
use crate::config::{self, ModelOverrides, TrainOverrides};
use crate::data::{BatchSource, DataArgs};
use crate::device::open_backend;
use crate::io::{batch_file, checkpoint};
use crate::params::ParamLayout;

#[derive(Args, Debug)]
pub struct GradArgs {
    /// Parameters: tensors under their layout names (a checkpoint works too).
    #[arg(long, value_name = "P.safetensors")]
    pub params: PathBuf,
    /// Batch file: images, window_origin, mask_index.
    #[arg(long, value_name = "BATCH.safetensors")]
    pub batch: PathBuf,
    /// Output: `loss` and the gradient of every parameter under its name.
    #[arg(long, value_name = "G.safetensors")]
    pub out: PathBuf,
    #[command(flatten)]
    pub model: ModelOverrides,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Args, Debug)]
pub struct SampleBatchArgs {
    #[arg(long, value_name = "BATCH.safetensors")]
    pub out: PathBuf,
    #[command(flatten)]
    pub model: ModelOverrides,
    #[command(flatten)]
    pub data: DataArgs,
    /// Images in the batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Seed of the data and the sampler (the same seed as a pretrain run gives its first
    /// micro-batch).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args, Debug)]
pub struct InitArgs {
    #[arg(long, value_name = "P.safetensors")]
    pub out: PathBuf,
    #[command(flatten)]
    pub model: ModelOverrides,
    /// Seed of the initialisation (the same seed as a pretrain run gives its start).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub(super) fn grad(a: GradArgs) -> Result<()> {
    let config = config::resolve(&a.model, &TrainOverrides::default(), None)?;
    let params = checkpoint::load_params(&a.params, &config.model)?;
    let batch = batch_file::read(&a.batch, &config.model)?;
    let mut backend = open_backend(a.device.device, &config.model, params, a.device.precision)?;
    backend.zero_grads()?;
    let loss = backend.forward_backward(&batch, 1.0)?;
    let grads = backend.grads()?;
    checkpoint::save_gradients(&a.out, &config, loss, &grads)?;
    println!(
        "loss {loss} over {} images; gradients written to {}",
        batch.images_len,
        a.out.display()
    );
    Ok(())
}

pub(super) fn sample_batch(a: SampleBatchArgs) -> Result<()> {
    let train = TrainOverrides {
        batch: Some(a.batch),
        seed: Some(a.seed),
        ..TrainOverrides::default()
    };
    let config = config::resolve(&a.model, &train, None)?;
    let batch = BatchSource::open(&config.model, a.seed, a.batch, &a.data, None)?
        .next_batch(config.train.batch)?;
    batch_file::write(&a.out, &config, &batch)?;
    println!("{} images written to {}", a.batch, a.out.display());
    Ok(())
}

pub(super) fn init(a: InitArgs) -> Result<()> {
    let train = TrainOverrides {
        seed: Some(a.seed),
        ..TrainOverrides::default()
    };
    let config = config::resolve(&a.model, &train, None)?;
    let params = ParamLayout::new(&config.model).init(a.seed);
    checkpoint::save_params(&a.out, &config, &params)?;
    println!("{} parameters written to {}", params.len(), a.out.display());
    Ok(())
}
