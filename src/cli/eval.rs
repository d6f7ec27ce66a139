//! `lomar export`, `features`, `probe`, `visualize` and `plot`: what is done with a
//! pretrained encoder.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};

use crate::config::{same_method, Method};
use crate::cpu::encoder::{Encoder, Pool, View};
use crate::eval::export::{self as encoder_export, ExportOptions};
use crate::eval::features::{open_source, Features, Provenance};
use crate::eval::plot::{self, PlotOptions};
use crate::eval::probe::{self as linear_probe, ProbeOptions, ProbeReport};
use crate::eval::visualize::{self, Images};
use crate::io::pretrained::Pretrained;

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Checkpoint or parameter file to export.
    #[arg(long, value_name = "CKPT")]
    pub checkpoint: PathBuf,
    /// Output: the encoder's tensors under timm's names (BEiT's, or VisionTransformer's for
    /// MAE).
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
    /// Refuse the checkpoint unless it holds this method's model (LoMaR exports for
    /// timm's BEiT, MAE for its VisionTransformer) [default: the checkpoint's]
    #[arg(long, value_enum)]
    pub method: Option<Method>,
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
    /// Refuse the checkpoint unless it holds this method's model [default: the
    /// checkpoint's]
    #[arg(long, value_enum)]
    pub method: Option<Method>,
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
    /// Refuse the checkpoint unless it holds this method's model [default: the
    /// checkpoint's]
    #[arg(long, value_enum)]
    pub method: Option<Method>,
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

pub(super) fn export(a: ExportArgs) -> Result<()> {
    let model = Pretrained::open(&a.checkpoint)?;
    let m = &model.config.model;
    same_method(
        m.method,
        a.method,
        &format!("checkpoint {}", a.checkpoint.display()),
    )?;
    let image = a.image.unwrap_or(m.image);
    let opts = ExportOptions {
        image,
        position_index: a.position_index,
    };
    let written = encoder_export::write_encoder(&a.out, m, &model.params, &opts)?;
    println!(
        "{written} encoder tensors (step {}) written to {} for {}(**{})",
        model.step,
        a.out.display(),
        encoder_export::timm_class(m).0,
        encoder_export::timm_kwargs(m, image)
    );
    Ok(())
}

/// How a value of an enum flag is spelled on the command line.
pub(super) fn flag_value(v: impl ValueEnum) -> String {
    v.to_possible_value()
        .map_or_else(String::new, |p| p.get_name().to_string())
}

/// The features of `checkpoint`'s encoder on the images `e` names.
pub(super) fn encode(checkpoint: &Path, e: &EncodeArgs) -> Result<(Features, Provenance)> {
    let model = Pretrained::open(checkpoint)?;
    same_method(
        model.config.model.method,
        e.method,
        &format!("checkpoint {}", checkpoint.display()),
    )?;
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

pub(super) fn features(a: FeaturesArgs) -> Result<()> {
    let (features, provenance) = encode(&a.checkpoint, &a.encode)?;
    features.save(&a.out, &provenance)?;
    println!(
        "{} features with labels written to {}",
        features.len(),
        a.out.display()
    );
    Ok(())
}

pub(super) fn probe(a: ProbeArgs) -> Result<()> {
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

pub(super) fn print_probe_report(r: &ProbeReport, dim: usize, opts: &ProbeOptions) {
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

pub(super) fn visualize(a: VisualizeArgs) -> Result<()> {
    let images = match (&a.data, a.image.is_empty()) {
        (Some(root), _) => Images::Folder(root.clone(), a.images),
        (None, false) => Images::Files(a.image.clone()),
        (None, true) => Images::Synthetic(a.images),
    };
    let rows = visualize::visualize(&a.checkpoint, a.method, &images, a.seed, &a.out)?;
    println!("{rows} images drawn to {}", a.out.display());
    Ok(())
}

pub(super) fn plot(a: PlotArgs) -> Result<()> {
    let opts = PlotOptions {
        width: a.width,
        height: a.height,
        smooth: a.smooth,
    };
    let steps = plot::plot_file(&a.metrics, &a.out, opts)?;
    println!("{steps} steps plotted to {}", a.out.display());
    Ok(())
}
