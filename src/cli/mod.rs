//! The `lomar` command line: one file per command group, each with its argument struct
//! and its command. The config a command runs with is resolved by `config::resolve`.

mod bench;
mod dist;
mod eval;
mod files;
mod pretrain;
mod shards;

use clap::{Args, Parser, Subcommand};

use crate::backend::Precision;
use crate::config::{ModelOverrides, TrainOverrides};
use crate::data::DataArgs;
use crate::device::Device;
use anyhow::Result;

pub use bench::BenchArgs;
pub use eval::{EncodeArgs, ExportArgs, FeaturesArgs, PlotArgs, ProbeArgs, VisualizeArgs};
pub use files::{GradArgs, InitArgs, SampleBatchArgs};
pub use pretrain::PretrainArgs;
pub use shards::ShardsArgs;

#[derive(Parser, Debug)]
#[command(
    name = "lomar",
    version,
    about = "LoMaR self-supervised ViT pretraining (local masked reconstruction)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Pretrain a model; by default the tiny preset on the embedded synthetic images.
    Pretrain(Box<PretrainArgs>),
    /// One forward and backward pass on a batch file: writes the loss and every gradient.
    Grad(GradArgs),
    /// Write a batch file from the embedded synthetic images (or --data) and the sampler.
    SampleBatch(SampleBatchArgs),
    /// Write freshly initialised parameters.
    Init(InitArgs),
    /// Export the encoder as a state dict for timm's BEiT (fine-tuning in PyTorch).
    Export(ExportArgs),
    /// Run the frozen encoder over labelled images: one feature vector per image.
    Features(FeaturesArgs),
    /// Linear-probe and k-NN top-1 accuracy of frozen features.
    Probe(ProbeArgs),
    /// Time training steps: images/s, ms/step, TFLOP/s, MFU, per-phase times.
    Bench(Box<BenchArgs>),
    /// Draw what a checkpoint reconstructs: image, windows, masked input, reconstruction.
    Visualize(VisualizeArgs),
    /// Plot the loss curve of a metrics.jsonl file as a PNG.
    Plot(PlotArgs),
    /// Convert an image folder into tar shards of pre-shrunk images, for fast loading.
    Shards(ShardsArgs),
}

/// What a training run needs: the model, the training settings, where to compute, and on
/// which images (`pretrain` and `bench`).
#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelOverrides,
    #[command(flatten)]
    pub train: TrainOverrides,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub data: DataArgs,
}

/// Where to compute.
#[derive(Args, Debug)]
pub struct DeviceArgs {
    /// Where to compute.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// Compute precision on CUDA (bf16 matmuls with fp32 master weights, or fp32
    /// throughout) [default: bf16]. The CPU computes in fp32.
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Pretrain(a) => pretrain::pretrain(*a),
        Command::Grad(a) => files::grad(a),
        Command::SampleBatch(a) => files::sample_batch(a),
        Command::Init(a) => files::init(a),
        Command::Export(a) => eval::export(a),
        Command::Features(a) => eval::features(a),
        Command::Probe(a) => eval::probe(a),
        Command::Bench(a) => bench::bench(*a),
        Command::Visualize(a) => eval::visualize(a),
        Command::Plot(a) => eval::plot(a),
        Command::Shards(a) => shards::shards(a),
    }
}
