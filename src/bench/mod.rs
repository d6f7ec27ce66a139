//! `lomar bench`: warm-up, then timed training steps, reported as images/s, ms/step,
//! achieved TFLOP/s and MFU (bench/README.md has the measurements).
//!
//! Three times per step: the step with its batch already in memory (host clock); the
//! end-to-end step, which adds waiting for the batch from the same input pipeline
//! `pretrain` uses (prepared one ahead on a GPU, in line on the CPU); and, on a GPU, the
//! device's own time for the step from events, which leaves out the host's work before the
//! upload. The gap between the last two is the device waiting for the host. Each step is
//! forward+backward, the global gradient norm and one AdamW update — exactly what
//! `pretrain` runs. Those three time steps one at a time, with the host waiting after each
//! phase. A fourth runs the steps as `pretrain` does (`Backend::train_step`, back to back,
//! a GPU a step ahead of the host and replaying its CUDA graphs) and divides the wall time
//! by the step count: the pipelined step. PyTorch's side-by-side
//! (bench/torch_reference.py) times its back-to-back steps with device events, so it
//! compares to the pipelined step; the device time above is the same work with nothing
//! queued ahead.

pub mod flops;

use std::time::Instant;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::backend::{AdamWStep, Backend, MicroBatches, StepSettings};
use crate::bench::flops::{known_bf16_peak, training_flops};
use crate::config::Config;
use crate::data::batch::Batch;
use crate::data::loader::{self, LoaderSpeed};
use crate::data::prefetch::Batches;
use crate::data::shards::Part;
use crate::data::{open_dataset, BatchSource, DataArgs, DEFAULT_SHUFFLE_BUFFER};
use crate::dist::{Collective, Solo};

/// What to time.
#[derive(Clone, Debug)]
pub struct BenchPlan {
    pub warmup_steps: usize,
    pub timed_steps: usize,
    /// Dense bf16 peak for MFU, FLOP/s; `None` looks the device up in the known chips.
    pub peak_flops: Option<f64>,
}

impl BenchPlan {
    pub fn validate(&self) -> Result<()> {
        if self.timed_steps == 0 {
            bail!("--timed-steps 0: bench needs at least one timed step");
        }
        if let Some(p) = self.peak_flops {
            if !(p.is_finite() && p > 0.0) {
                bail!("--peak-tflops {}: must be a finite number > 0", p / 1e12);
            }
        }
        Ok(())
    }
}

/// Spread of a set of timings, milliseconds.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub p10: f64,
    pub p90: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(samples: &[f64]) -> Result<Spread> {
        if samples.is_empty() || samples.iter().any(|v| !v.is_finite()) {
            bail!("no finite timings to summarise");
        }
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        // Nearest-rank quantile: a value that was actually measured.
        let q = |f: f64| s[((s.len() - 1) as f64 * f).round() as usize];
        Ok(Spread {
            median: q(0.5),
            min: s[0],
            p10: q(0.1),
            p90: q(0.9),
            max: s[s.len() - 1],
        })
    }
}

/// Time spent in each part of a step, median milliseconds.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseMedians {
    pub forward_backward_ms: f64,
    pub grad_norm_ms: f64,
    pub optimizer_ms: f64,
    /// The gradient average over the ranks, when the step had one (data parallel, or
    /// `--nccl` on one GPU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub all_reduce_ms: Option<f64>,
}

/// Everything `lomar bench` reports; `--json` writes it as is.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub device: String,
    pub config: Config,
    pub warmup_steps: usize,
    pub timed_steps: usize,
    /// The step with its batch in memory; images/s, TFLOP/s and MFU are of this time.
    pub step_ms: Spread,
    /// The step plus the wait for its batch from the input pipeline.
    pub end_to_end_ms: Spread,
    /// The device's time for the step (see `Backend::device_step_ms`); absent on the CPU.
    pub device_step_ms: Option<Spread>,
    /// Wall time per step of `timed_steps` steps run back to back through
    /// `Backend::train_step` (after as many warm-up steps), input pipeline included: what
    /// PyTorch's side-by-side compares to.
    pub pipelined_step_ms: f64,
    /// With NCCL: the last pipelined step's gradient all-reduce on the device, which ran
    /// beside its backward, from its first bucket's start to its end, and the part of it
    /// after the backward ended (what the overlap did not hide).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overlapped_all_reduce_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exposed_all_reduce_ms: Option<f64>,
    pub images_per_s: f64,
    /// Matrix-product FLOPs of one step (see `flops.rs`).
    pub flops_per_step: f64,
    pub achieved_tflops: f64,
    /// Peak used for MFU, FLOP/s, and the resulting fraction; absent when unknown.
    pub peak_flops: Option<f64>,
    pub mfu: Option<f64>,
    pub phases: PhaseMedians,
    /// Images/s of the input pipeline alone (images plus sampling), over the first
    /// batches.
    pub input_images_per_s: f64,
    /// With `--data`: the image loader on its own, over enough images to reach its
    /// steady state.
    pub loader: Option<LoaderSpeed>,
    pub peak_memory_bytes: Option<u64>,
    /// Trainable scalars, each with an fp32 gradient.
    pub gradients: usize,
}

/// Runs the plan on `backend` with the settings of `config`, on the images `data` names.
/// With `comm`, every step averages its gradients over `comm`'s ranks after the backward,
/// as a data-parallel step does, and that average is timed on its own.
pub fn run(
    backend: &mut dyn Backend,
    config: &Config,
    plan: &BenchPlan,
    data: &DataArgs,
    mut comm: Option<&mut dyn Collective>,
) -> Result<BenchReport> {
    plan.validate()?;
    let (m, t) = (&config.model, &config.train);
    let mut source = BatchSource::open(m, t.seed, t.batch, data, None)?;
    // A few distinct batches, cycled, keep the step's inputs realistic without timing
    // their generation inside the step.
    let steps = plan.warmup_steps + plan.timed_steps;
    let distinct = steps.clamp(1, 4);
    let input_started = Instant::now();
    for _ in 0..distinct {
        source.next_batch(t.batch)?;
    }
    let input_images_per_s = (distinct * t.batch) as f64 / input_started.elapsed().as_secs_f64();
    // The phased steps, then the pipelined ones.
    let pipelined_steps = plan.warmup_steps.max(GRAPH_WARMUP_STEPS) + plan.timed_steps;
    let mut batches = Batches::new(
        source,
        t.batch,
        (steps + pipelined_steps) as u64,
        !backend.computes_on_host(),
    )?;

    let mut fb_ms = Vec::new();
    let mut norm_ms = Vec::new();
    let mut opt_ms = Vec::new();
    let mut reduce_ms = Vec::new();
    let mut step_ms = Vec::new();
    let mut end_to_end_ms = Vec::new();
    let mut device_ms = Vec::new();
    for i in 0..steps {
        backend.synchronize()?;
        let asked = Instant::now();
        let batch = batches.draw()?.batch;
        let t0 = Instant::now();
        backend.zero_grads()?;
        let loss = backend.forward_backward(&batch, 1.0)?;
        backend.synchronize()?;
        let t1 = Instant::now();
        if let Some(c) = comm.as_deref_mut() {
            backend.average_grads(c)?;
            backend.synchronize()?;
        }
        let reduced = Instant::now();
        let norm = backend.grad_norm()?;
        let t2 = Instant::now();
        backend.adamw_step(&AdamWStep {
            t: i as u64 + 1,
            lr: t.peak_lr() as f32,
            beta1: t.beta1 as f32,
            beta2: t.beta2 as f32,
            eps: t.eps as f32,
            weight_decay: t.weight_decay as f32,
            grad_scale: 1.0,
        })?;
        backend.synchronize()?;
        let t3 = Instant::now();
        if !loss.is_finite() || !norm.is_finite() {
            bail!("bench step {i}: loss {loss}, gradient norm {norm}: not finite");
        }
        if i >= plan.warmup_steps {
            let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
            fb_ms.push(ms(t0, t1));
            reduce_ms.push(ms(t1, reduced));
            norm_ms.push(ms(reduced, t2));
            opt_ms.push(ms(t2, t3));
            step_ms.push(ms(t0, t3));
            end_to_end_ms.push(ms(asked, t3));
            device_ms.extend(backend.device_step_ms()?);
        }
    }

    let pipelined_step_ms = pipelined(backend, config, plan, &mut batches, comm.as_deref_mut())?;
    let overlapped = match comm.as_deref_mut() {
        Some(c) => c.last_all_reduce()?,
        None => None,
    };

    let loader = match &data.data {
        Some(root) => {
            let images = (4 * t.batch).max(256);
            let buffer = data.shuffle_buffer.unwrap_or(DEFAULT_SHUFFLE_BUFFER);
            Some(loader::measure(
                open_dataset(root, Part::default(), buffer)?,
                m.image,
                data.threads(),
                images,
                t.seed,
            )?)
        }
        None => None,
    };
    let step = Spread::of(&step_ms)?;
    let flops_per_step = training_flops(m, t.batch);
    let achieved = flops_per_step / (step.median * 1e-3);
    let device = backend.device_name();
    let peak_flops = plan.peak_flops.or_else(|| known_bf16_peak(&device));
    Ok(BenchReport {
        device,
        config: config.clone(),
        warmup_steps: plan.warmup_steps,
        timed_steps: plan.timed_steps,
        images_per_s: t.batch as f64 / (step.median * 1e-3),
        flops_per_step,
        achieved_tflops: achieved / 1e12,
        peak_flops,
        mfu: peak_flops.map(|p| achieved / p),
        phases: PhaseMedians {
            forward_backward_ms: Spread::of(&fb_ms)?.median,
            grad_norm_ms: Spread::of(&norm_ms)?.median,
            optimizer_ms: Spread::of(&opt_ms)?.median,
            all_reduce_ms: match comm {
                Some(_) => Some(Spread::of(&reduce_ms)?.median),
                None => None,
            },
        },
        step_ms: step,
        end_to_end_ms: Spread::of(&end_to_end_ms)?,
        device_step_ms: match device_ms.is_empty() {
            true => None,
            false => Some(Spread::of(&device_ms)?),
        },
        pipelined_step_ms,
        overlapped_all_reduce_ms: overlapped.map(|o| o.span_ms),
        exposed_all_reduce_ms: overlapped.map(|o| o.exposed_ms),
        input_images_per_s,
        loader,
        peak_memory_bytes: backend.peak_memory_bytes(),
        gradients: backend.layout().total(),
    })
}

/// One drawn batch per step (bench steps have one micro-batch).
struct OneBatch<'a> {
    batches: &'a mut Batches,
    current: Option<Batch>,
}

impl MicroBatches for OneBatch<'_> {
    fn count(&self) -> usize {
        1
    }
    fn next(&mut self) -> Result<&Batch> {
        let batch = self.batches.draw()?.batch;
        Ok(self.current.insert(batch))
    }
}

/// Steps before a GPU replays every graph of a one-micro-batch step: each of the two
/// upload buffers' pass runs once plain, then is captured (src/cuda/step.rs).
const GRAPH_WARMUP_STEPS: usize = 4;

/// Runs warm-up steps (the plan's, at least [`GRAPH_WARMUP_STEPS`]) and the timed steps
/// through `train_step`, back to back, continuing the optimiser's step count after the
/// phased steps; returns the timed steps' wall time per step, every step finished.
fn pipelined<'c>(
    backend: &mut dyn Backend,
    config: &Config,
    plan: &BenchPlan,
    batches: &mut Batches,
    comm: Option<&mut (dyn Collective + 'c)>,
) -> Result<f64> {
    let t = &config.train;
    let mut solo = Solo;
    let comm = comm.unwrap_or(&mut solo);
    let warmup = plan.warmup_steps.max(GRAPH_WARMUP_STEPS) as u64;
    let first = (plan.warmup_steps + plan.timed_steps) as u64;
    let mut started = Instant::now();
    let mut reports = Vec::new();
    for i in 0..warmup + plan.timed_steps as u64 {
        if i == warmup {
            reports.extend(backend.finish_steps()?);
            started = Instant::now();
        }
        let settings = StepSettings {
            t: first + i + 1,
            lr: t.peak_lr() as f32,
            beta1: t.beta1 as f32,
            beta2: t.beta2 as f32,
            eps: t.eps as f32,
            weight_decay: t.weight_decay as f32,
            clip_grad: None,
        };
        let mut one = OneBatch {
            batches: &mut *batches,
            current: None,
        };
        reports.extend(backend.train_step(&mut one, &settings, comm)?);
    }
    reports.extend(backend.finish_steps()?);
    let ms = started.elapsed().as_secs_f64() * 1e3 / plan.timed_steps as f64;
    if let Some(r) = reports.iter().find(|r| r.diverged) {
        bail!(
            "bench step {}: loss {}, gradient norm {}: not finite",
            r.step,
            r.loss,
            r.grad_norm
        );
    }
    Ok(ms)
}

/// The commit the binary was built from: `LOMAR_COMMIT` where the binary runs outside its
/// checkout (scripts/gpu-check sets it from the bundle), else the checkout's HEAD.
pub fn commit() -> Option<String> {
    if let Ok(commit) = std::env::var("LOMAR_COMMIT") {
        return Some(commit);
    }
    let out = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The report as the terminal shows it.
pub fn summary(r: &BenchReport) -> String {
    let m = &r.config.model;
    let s = &r.step_ms;
    let mut out = format!(
        "{} | {} {}px batch {} | {} timed steps after {} warm-up\n\
         step      {:.2} ms median (min {:.2}, p10 {:.2}, p90 {:.2}, max {:.2})\n\
         speed     {:.1} images/s, {:.2} TFLOP/s ({:.1} GFLOP/step)\n",
        r.device,
        r.config.preset,
        m.image,
        r.config.train.batch,
        r.timed_steps,
        r.warmup_steps,
        s.median,
        s.min,
        s.p10,
        s.p90,
        s.max,
        r.images_per_s,
        r.achieved_tflops,
        r.flops_per_step / 1e9,
    );
    match (r.mfu, r.peak_flops) {
        (Some(mfu), Some(peak)) => {
            out += &format!(
                "MFU       {:.1}% of {:.0} TFLOP/s dense bf16\n",
                mfu * 100.0,
                peak / 1e12
            )
        }
        _ => out += "MFU       n/a (unknown peak; pass --peak-tflops)\n",
    }
    out += &format!(
        "end2end   {:.2} ms median, waiting for the batch included\n",
        r.end_to_end_ms.median
    );
    if let Some(d) = &r.device_step_ms {
        out += &format!(
            "device    {:.2} ms median from events ({:.2} ms of the step outside it: host work before the upload, and the copy)\n",
            d.median,
            s.median - d.median
        );
    }
    out += &format!(
        "pipelined {:.2} ms per step, steps back to back as pretrain runs them ({:.1} images/s); PyTorch's side-by-side compares to this\n",
        r.pipelined_step_ms,
        r.config.train.batch as f64 / (r.pipelined_step_ms * 1e-3)
    );
    out += &format!(
        "phases    forward+backward {:.2} ms, grad norm {:.2} ms, AdamW {:.2} ms\n\
         input     {:.1} images/s (images + sampling, first batches)\n",
        r.phases.forward_backward_ms,
        r.phases.grad_norm_ms,
        r.phases.optimizer_ms,
        r.input_images_per_s,
    );
    if let Some(ms) = r.phases.all_reduce_ms {
        let bytes = 4.0 * r.gradients as f64;
        out += &format!(
            "all-reduce {ms:.2} ms per step: {:.1} MB of fp32 gradients averaged over {} rank(s), {:.1} GB/s of gradient\n",
            bytes / 1e6,
            r.config.train.world,
            bytes / (ms * 1e-3) / 1e9
        );
    }
    if let (Some(span), Some(exposed)) = (r.overlapped_all_reduce_ms, r.exposed_all_reduce_ms) {
        out += &format!(
            "overlap   {span:.2} ms of all-reduce on the device beside the backward (last pipelined step), {exposed:.2} ms of it after the backward\n"
        );
    }
    if let Some(l) = &r.loader {
        out += &format!(
            "loader    {:.1} images/s alone ({} images, {} threads decoding and augmenting, {} files skipped)\n",
            l.images_per_s, l.images, l.threads, l.skipped
        );
        if let Some(cpu) = l.cpu_seconds {
            out += &format!(
                "          {:.1} images per CPU-second ({:.2} ms of CPU per image)\n",
                l.images as f64 / cpu,
                cpu * 1e3 / l.images as f64
            );
        }
    }
    if let Some(bytes) = r.peak_memory_bytes {
        out += &format!(
            "memory    {:.2} GiB peak\n",
            bytes as f64 / (1u64 << 30) as f64
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_uses_measured_values() {
        let s = Spread::of(&[5.0, 1.0, 3.0, 2.0, 4.0]).unwrap();
        assert_eq!(
            s,
            Spread {
                median: 3.0,
                min: 1.0,
                p10: 1.0,
                p90: 5.0,
                max: 5.0
            }
        );
        assert!(Spread::of(&[]).is_err());
        assert!(Spread::of(&[1.0, f64::NAN]).is_err());
    }
}
