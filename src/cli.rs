//! The `lomar` command line: argument definitions, config resolution, and the commands.
//!
//! A run's config comes from `--config FILE.json` (a serialised `Config`), else from a
//! checkpoint being resumed, else from `--preset` (default `tiny`); every flag given then
//! overrides its field, and the result is validated before any work starts.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::backend::Backend;
use crate::backend::Precision;
use crate::batch_file;
use crate::bench;
use crate::checkpoint::{self, CheckpointFile};
use crate::config::{preset, Config, TrainConfig};
use crate::cpu::encoder::{Encoder, Pool, View};
use crate::data::{BatchSource, DataArgs};
use crate::device::{open_backend, Device};
use crate::export::{self as encoder_export, ExportOptions};
use crate::features::{open_source, Features, Provenance};
use crate::params::ParamLayout;
use crate::plot::{self, PlotOptions};
use crate::pretrained::Pretrained;
use crate::probe::{self as linear_probe, ProbeOptions, ProbeReport};
use crate::train::{self, TrainOptions};
use crate::visualize::{self, Images};

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
}

/// Which model: a preset or a config file, then per-field overrides.
#[derive(Args, Debug, Default)]
pub struct ModelArgs {
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
pub struct TrainArgs {
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

#[derive(Args, Debug)]
pub struct PretrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub train: TrainArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub data: DataArgs,
    /// Directory for checkpoint.safetensors, metrics.jsonl and config.json.
    #[arg(long, default_value = "runs/pretrain")]
    pub out: PathBuf,
    /// Write a checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 200, value_name = "N")]
    pub checkpoint_every: u64,
    /// Print progress every N steps.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub log_every: u64,
    /// Continue the run saved in this checkpoint, bit-identically.
    #[arg(long, value_name = "CKPT")]
    pub resume: Option<PathBuf>,
    /// Stop after this step with a checkpoint, keeping the schedule, to --resume later.
    #[arg(long, value_name = "STEP")]
    pub stop_after: Option<u64>,
    /// Start a new run even if --out already holds a checkpoint (it is replaced).
    #[arg(long)]
    pub force: bool,
}

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
    pub model: ModelArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Args, Debug)]
pub struct SampleBatchArgs {
    #[arg(long, value_name = "BATCH.safetensors")]
    pub out: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
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
    pub model: ModelArgs,
    /// Seed of the initialisation (the same seed as a pretrain run gives its start).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Checkpoint or parameter file to export.
    #[arg(long, value_name = "CKPT")]
    pub checkpoint: PathBuf,
    /// Output: the encoder's tensors under timm's BEiT names.
    #[arg(long, value_name = "ENCODER.safetensors")]
    pub out: PathBuf,
    /// Image side the timm model is built for; the relative bias tables are resized to
    /// its patch grid [default: the model's image]
    #[arg(long)]
    pub image: Option<usize>,
    /// Also write the relative_position_index buffers, which timm before 0.9 keeps in
    /// its state dict.
    #[arg(long)]
    pub position_index: bool,
}

/// Which images the frozen encoder runs on, and how.
#[derive(Args, Debug)]
pub struct EncodeArgs {
    /// Labelled images: `synthetic` (the embedded images, labelled by shape family), or a
    /// folder with one sub-folder of images per class (labelled by the sub-folder's name).
    #[arg(long, value_name = "synthetic|PATH", default_value = "synthetic")]
    pub data: String,
    /// Images to use: of the embedded ones [default: 2000]; of a folder, spread evenly over
    /// its sorted files [default: all].
    #[arg(long)]
    pub images: Option<usize>,
    /// Seed of the embedded images (pretraining's default seed is 0, so the default
    /// draws other images).
    #[arg(long, default_value_t = 1)]
    pub data_seed: u64,
    /// Run on whole images (bias tables resized to the image grid) or on the K×K windows
    /// tiling each image (features averaged).
    #[arg(long, value_enum, default_value_t = View::Image)]
    pub mode: View,
    /// The cls token or the mean patch token, after the final norm.
    #[arg(long, value_enum, default_value_t = Pool::Cls)]
    pub pool: Pool,
    /// Image side in pixels [default: the model's image]
    #[arg(long)]
    pub image: Option<usize>,
}

#[derive(Args, Debug)]
pub struct FeaturesArgs {
    /// Checkpoint or parameter file whose encoder to run.
    #[arg(long, value_name = "CKPT")]
    pub checkpoint: PathBuf,
    /// Output: `features` [N, D] and `labels` [N].
    #[arg(long, value_name = "FEATS.safetensors")]
    pub out: PathBuf,
    #[command(flatten)]
    pub encode: EncodeArgs,
}

#[derive(Args, Debug)]
pub struct ProbeArgs {
    /// A features file (from `lomar features`).
    #[arg(
        long,
        value_name = "FEATS.safetensors",
        required_unless_present = "checkpoint",
        conflicts_with = "checkpoint"
    )]
    pub features: Option<PathBuf>,
    /// Or a checkpoint or parameter file: its features are computed first.
    #[arg(long, value_name = "CKPT")]
    pub checkpoint: Option<PathBuf>,
    #[command(flatten)]
    pub encode: EncodeArgs,
    /// Fraction of each class held out for testing.
    #[arg(long, default_value_t = 0.2)]
    pub test_fraction: f64,
    /// Seed of the train/test split.
    #[arg(long, default_value_t = 0)]
    pub split_seed: u64,
    /// Average over this many splits (seeds split_seed, split_seed + 1, ...).
    #[arg(long, default_value_t = 1)]
    pub repeats: usize,
    /// L2 penalty on the linear probe's weights.
    #[arg(long, default_value_t = 1e-4)]
    pub weight_decay: f64,
    /// L-BFGS iterations at most.
    #[arg(long, default_value_t = 1000)]
    pub max_iter: usize,
    /// Neighbours voting in the k-NN classifier.
    #[arg(long, default_value_t = 20)]
    pub k: usize,
    /// Temperature of the k-NN vote weights exp(similarity / T).
    #[arg(long, default_value_t = 0.07)]
    pub temperature: f64,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub train: TrainArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub data: DataArgs,
    /// Untimed steps first (kernel loading, allocator and cache warm-up).
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Timed steps.
    #[arg(long = "timed-steps", default_value_t = 10)]
    pub timed_steps: usize,
    /// Dense bf16 peak of the device in TFLOP/s, for MFU [default: looked up by name].
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Also write the whole report as JSON (with the commit and the settings).
    #[arg(long, value_name = "FILE.json")]
    pub json: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct VisualizeArgs {
    /// The checkpoint (or parameter file) whose model reconstructs.
    #[arg(long, value_name = "CKPT")]
    pub checkpoint: PathBuf,
    /// An image file to show (repeat for more rows).
    #[arg(long, value_name = "FILE", conflicts_with = "data")]
    pub image: Vec<PathBuf>,
    /// Show --images files spread over this folder tree.
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,
    /// Rows to show from --data, or from the embedded synthetic images when neither
    /// --image nor --data is given.
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub images: usize,
    /// Seed of the windows and masks drawn.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The PNG to write.
    #[arg(long, value_name = "FILE.png")]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// A run's metrics.jsonl.
    #[arg(value_name = "METRICS")]
    pub metrics: PathBuf,
    /// The PNG to write.
    #[arg(long, value_name = "FILE.png")]
    pub out: PathBuf,
    /// Steps in the running mean (0: about a fiftieth of the run).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub smooth: usize,
    #[arg(long, default_value_t = 800)]
    pub width: usize,
    #[arg(long, default_value_t = 480)]
    pub height: usize,
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

/// The config a command runs with (see the module doc for the order), validated.
pub fn resolve_config(
    model: &ModelArgs,
    train: &TrainArgs,
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

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Pretrain(a) => pretrain(*a),
        Command::Grad(a) => grad(a),
        Command::SampleBatch(a) => sample_batch(a),
        Command::Init(a) => init(a),
        Command::Export(a) => export(a),
        Command::Features(a) => features(a),
        Command::Probe(a) => probe(a),
        Command::Bench(a) => bench(*a),
        Command::Visualize(a) => visualize(a),
        Command::Plot(a) => plot(a),
    }
}

fn pretrain(a: PretrainArgs) -> Result<()> {
    let resumed = match &a.resume {
        Some(path) => Some(CheckpointFile::open(path)?),
        None => None,
    };
    let config = resolve_config(
        &a.model,
        &a.train,
        resumed.as_ref().map(|c| c.config().clone()),
    )?;
    let out = &a.out;
    fs::create_dir_all(out)
        .with_context(|| format!("cannot create output directory {}", out.display()))?;
    let existing = train::checkpoint_path(out);
    if existing.exists() && !a.force && !resumes_from(a.resume.as_deref(), &existing) {
        bail!(
            "{} already holds a checkpoint; continue it with --resume {}, replace it with --force, or pick another --out",
            out.display(),
            existing.display()
        );
    }
    fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )
    .with_context(|| format!("cannot write {}", out.join("config.json").display()))?;

    let layout = ParamLayout::new(&config.model);
    let (mut backend, step, resumed_states) = match resumed {
        Some(file) => {
            if file.config().train.seed != config.train.seed {
                bail!(
                    "seed = {}: the checkpoint's run uses seed {}; a resumed run keeps its seed",
                    config.train.seed,
                    file.config().train.seed
                );
            }
            let ck = file.load(&config.model)?;
            let mut backend = open_backend(
                a.device.device,
                &config.model,
                ck.params,
                a.device.precision,
            )?;
            backend.set_moments(&ck.moments)?;
            (backend, ck.step, Some((ck.sampler, ck.data)))
        }
        None => {
            let params = layout.init(config.train.seed);
            let backend = open_backend(a.device.device, &config.model, params, a.device.precision)?;
            (backend, 0, None)
        }
    };
    let source = BatchSource::open(
        &config.model,
        config.train.seed,
        config.train.batch,
        &a.data,
        resumed_states,
    )?;
    print_run_header(&config, backend.as_ref(), layout.total(), step);
    println!("data: {}", source.describe());
    let outcome = train::train(
        backend.as_mut(),
        &config,
        step,
        source,
        &TrainOptions {
            out_dir: out.clone(),
            checkpoint_every: a.checkpoint_every,
            log_every: a.log_every,
            stop_after: a.stop_after,
        },
    )?;
    println!(
        "loss {:.4} at the first step of this run, {:.4} at step {}",
        outcome.first_loss, outcome.last_loss, outcome.step
    );
    Ok(())
}

/// Whether `resume` is the checkpoint file `existing` (which exists).
fn resumes_from(resume: Option<&Path>, existing: &Path) -> bool {
    match (resume.map(fs::canonicalize), fs::canonicalize(existing)) {
        (Some(Ok(a)), Ok(b)) => a == b,
        _ => false,
    }
}

fn print_run_header(config: &Config, backend: &dyn Backend, params: usize, step: u64) {
    let (m, t) = (&config.model, &config.train);
    println!(
        "lomar pretrain: preset {} | image {} patch {} window {}x{} x{} mask {:.2} | depth {} width {} heads {} | {:.2}M params | {}",
        config.preset,
        m.image,
        m.patch,
        m.window,
        m.window,
        m.windows_per_image,
        m.mask_ratio,
        m.depth,
        m.width,
        m.heads,
        params as f64 / 1e6,
        backend.device_name()
    );
    println!(
        "batch {} x accum {} = {} images/step | steps {} (warmup {}) | peak lr {:.3e} | seed {}{}",
        t.batch,
        t.accum,
        t.effective_batch(),
        t.steps,
        t.warmup_steps,
        t.peak_lr(),
        t.seed,
        if step > 0 {
            format!(" | resuming at step {step}")
        } else {
            String::new()
        }
    );
}

fn grad(a: GradArgs) -> Result<()> {
    let config = resolve_config(&a.model, &TrainArgs::default(), None)?;
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

fn sample_batch(a: SampleBatchArgs) -> Result<()> {
    let train = TrainArgs {
        batch: Some(a.batch),
        seed: Some(a.seed),
        ..TrainArgs::default()
    };
    let config = resolve_config(&a.model, &train, None)?;
    let batch = BatchSource::open(&config.model, a.seed, a.batch, &a.data, None)?
        .next_batch(config.train.batch)?;
    batch_file::write(&a.out, &config, &batch)?;
    println!("{} images written to {}", a.batch, a.out.display());
    Ok(())
}

fn init(a: InitArgs) -> Result<()> {
    let train = TrainArgs {
        seed: Some(a.seed),
        ..TrainArgs::default()
    };
    let config = resolve_config(&a.model, &train, None)?;
    let params = ParamLayout::new(&config.model).init(a.seed);
    checkpoint::save_params(&a.out, &config, &params)?;
    println!("{} parameters written to {}", params.len(), a.out.display());
    Ok(())
}

fn export(a: ExportArgs) -> Result<()> {
    let model = Pretrained::open(&a.checkpoint)?;
    let m = &model.config.model;
    let image = a.image.unwrap_or(m.image);
    let opts = ExportOptions {
        image,
        position_index: a.position_index,
    };
    let written = encoder_export::write_encoder(&a.out, m, &model.params, &opts)?;
    println!(
        "{written} encoder tensors (step {}) written to {} for timm.models.beit.Beit(**{})",
        model.step,
        a.out.display(),
        encoder_export::timm_kwargs(m, image)
    );
    Ok(())
}

/// How a value of an enum flag is spelled on the command line.
fn flag_value(v: impl ValueEnum) -> String {
    v.to_possible_value()
        .map_or_else(String::new, |p| p.get_name().to_string())
}

/// The features of `checkpoint`'s encoder on the images `e` names.
fn encode(checkpoint: &Path, e: &EncodeArgs) -> Result<(Features, Provenance)> {
    let model = Pretrained::open(checkpoint)?;
    let image = e.image.unwrap_or(model.config.model.image);
    let encoder = Encoder::new(&model.config.model, &model.params, image, e.mode, e.pool)?;
    let source = open_source(&e.data, image, e.images, e.data_seed)?;
    let total = source.len();
    let started = std::time::Instant::now();
    let mut reported = started;
    let features = Features::extract(&encoder, source.as_ref(), |done| {
        if done < total && reported.elapsed().as_secs() >= 10 {
            reported = std::time::Instant::now();
            println!(
                "features: {done}/{total} images ({:.0} s)",
                started.elapsed().as_secs_f64()
            );
        }
    })?;
    println!(
        "features: {total} images -> {}-d in {:.1} s (mode {}, pool {}, checkpoint step {})",
        features.dim,
        started.elapsed().as_secs_f64(),
        flag_value(e.mode),
        flag_value(e.pool),
        model.step
    );
    let provenance = Provenance {
        checkpoint: checkpoint.display().to_string(),
        step: model.step,
        data: e.data.clone(),
        view: flag_value(e.mode),
        pool: flag_value(e.pool),
        image,
    };
    Ok((features, provenance))
}

fn features(a: FeaturesArgs) -> Result<()> {
    let (features, provenance) = encode(&a.checkpoint, &a.encode)?;
    features.save(&a.out, &provenance)?;
    println!(
        "{} features with labels written to {}",
        features.len(),
        a.out.display()
    );
    Ok(())
}

fn probe(a: ProbeArgs) -> Result<()> {
    let opts = ProbeOptions {
        test_fraction: a.test_fraction,
        seed: a.split_seed,
        repeats: a.repeats,
        weight_decay: a.weight_decay,
        max_iter: a.max_iter,
        k: a.k,
        temperature: a.temperature,
    };
    opts.validate()?;
    let features = match (&a.features, &a.checkpoint) {
        (Some(path), _) => Features::load(path)?,
        (None, Some(checkpoint)) => encode(checkpoint, &a.encode)?.0,
        (None, None) => bail!("give --features FILE or --checkpoint CKPT"),
    };
    let report = linear_probe::probe(&features, &opts)?;
    print_probe_report(&report, features.dim, &opts);
    Ok(())
}

fn print_probe_report(r: &ProbeReport, dim: usize, opts: &ProbeOptions) {
    let splits = match r.repeats {
        1 => format!("split seed {}", opts.seed),
        n => format!(
            "mean ± sd over {n} splits, seeds {}..={}",
            opts.seed,
            opts.seed + n as u64 - 1
        ),
    };
    println!(
        "probe: {} train / {} test images, {} classes, {dim}-d features ({splits})",
        r.train, r.test, r.classes
    );
    let spread = |sd: Option<f64>| match (r.repeats, sd) {
        (2.., Some(sd)) => format!(" ± {:.1}", 100.0 * sd),
        _ => String::new(),
    };
    let line = |label: &str, acc: f64, sd: Option<f64>, note: String| {
        let text = format!(
            "{label:<15} top-1 {:5.1}%{}  {note}",
            100.0 * acc,
            spread(sd)
        );
        println!("{}", text.trim_end());
    };
    line("majority class", r.majority_top1, None, String::new());
    line(
        "linear probe",
        r.linear_top1,
        Some(r.linear_top1_sd),
        format!(
            "(train {:.1}%, at most {} L-BFGS iterations, weight decay {:e})",
            100.0 * r.linear_train_top1,
            r.iterations,
            opts.weight_decay
        ),
    );
    line(
        &format!("k-NN (k={})", r.k),
        r.knn_top1,
        Some(r.knn_top1_sd),
        format!("(cosine, vote weight exp(s/{}))", opts.temperature),
    );
}
fn bench(a: BenchArgs) -> Result<()> {
    let config = resolve_config(&a.model, &a.train, None)?;
    let plan = bench::BenchPlan {
        warmup_steps: a.warmup,
        timed_steps: a.timed_steps,
        peak_flops: a.peak_tflops.map(|t| t * 1e12),
    };
    plan.validate()?;
    let params = ParamLayout::new(&config.model).init(config.train.seed);
    let mut backend = open_backend(a.device.device, &config.model, params, a.device.precision)?;
    let report = bench::run(backend.as_mut(), &config, &plan, &a.data)?;
    print!("{}", bench::summary(&report));
    if let Some(path) = &a.json {
        let json = serde_json::json!({
            "lomar_version": env!("CARGO_PKG_VERSION"),
            "commit": bench::commit(),
            "report": report,
        });
        fs::write(path, serde_json::to_string_pretty(&json)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn visualize(a: VisualizeArgs) -> Result<()> {
    let images = match (&a.data, a.image.is_empty()) {
        (Some(root), _) => Images::Folder(root.clone(), a.images),
        (None, false) => Images::Files(a.image.clone()),
        (None, true) => Images::Synthetic(a.images),
    };
    let rows = visualize::visualize(&a.checkpoint, &images, a.seed, &a.out)?;
    println!("{rows} images drawn to {}", a.out.display());
    Ok(())
}

fn plot(a: PlotArgs) -> Result<()> {
    let opts = PlotOptions {
        width: a.width,
        height: a.height,
        smooth: a.smooth,
    };
    let steps = plot::plot_file(&a.metrics, &a.out, opts)?;
    println!("{steps} steps plotted to {}", a.out.display());
    Ok(())
}
