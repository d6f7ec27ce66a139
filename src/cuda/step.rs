//! The device side of a whole optimiser step (docs/DESIGN.md §4.4): the step's constants
//! and its state in two small device buffers (laid out as kernels/step_state.cuh says),
//! the report the host reads one step late, and the CUDA graphs a step replays.
//!
//! Nothing the host computes per step is a kernel argument: the AdamW constants and the
//! clip are written into `hyper` before the step, the loss sum, the gradient norm, the clip
//! scale and the divergence flag live in `loss_sum` and `state`. So the kernels of a step
//! can be captured once and replayed, and the host never waits for a value mid-step.

use std::rc::Rc;

use anyhow::{bail, Context, Result};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaEvent, CudaGraph, CudaSlice, PinnedHostSlice};

use super::device::Gpu;
use super::nccl::Communicator;
use super::pixels::pinned;
use crate::backend::{AdamWStep, StepReport, StepSettings};

/// `hyper` indices (kernels/step_state.cuh).
pub const HYPER_MICRO_BATCHES: usize = 0;
pub const HYPER_CLIP: usize = 1;
pub const HYPER_BETA1: usize = 2;
pub const HYPER_ONE_MINUS_BETA1: usize = 3;
pub const HYPER_BETA2: usize = 4;
pub const HYPER_ONE_MINUS_BETA2: usize = 5;
pub const HYPER_EPS: usize = 6;
pub const HYPER_DECAY_KEEP: usize = 7;
pub const HYPER_STEP_SIZE: usize = 8;
pub const HYPER_INV_SQRT_BC2: usize = 9;
pub const HYPER_LEN: usize = 10;

/// `state` indices (kernels/step_state.cuh).
pub const STATE_LOSS: usize = 0;
pub const STATE_NORM: usize = 1;
pub const STATE_DIVERGED: usize = 2;
pub const STATE_CLIP_SCALE: usize = 3;
pub const STATE_LEN: usize = 4;

/// The `hyper` values of a step of `micro_batches` micro-batches: AdamW's constants
/// computed as `optim::adamw_update` computes them (f64, then rounded once), so the kernel
/// reproduces the CPU's update bit for bit, and the clip (+inf for none).
pub fn hyper(settings: &StepSettings, micro_batches: usize) -> Result<[f32; HYPER_LEN]> {
    if settings.t == 0 {
        bail!("adamw: the step count starts at 1");
    }
    if micro_batches == 0 {
        bail!("a step needs at least one micro-batch");
    }
    let t = i32::try_from(settings.t).unwrap_or(i32::MAX);
    let bc1 = 1.0 - (settings.beta1 as f64).powi(t);
    let bc2 = 1.0 - (settings.beta2 as f64).powi(t);
    let mut h = [0.0f32; HYPER_LEN];
    h[HYPER_MICRO_BATCHES] = micro_batches as f32;
    h[HYPER_CLIP] = settings.clip_grad.map_or(f32::INFINITY, |c| c as f32);
    h[HYPER_BETA1] = settings.beta1;
    h[HYPER_ONE_MINUS_BETA1] = 1.0 - settings.beta1;
    h[HYPER_BETA2] = settings.beta2;
    h[HYPER_ONE_MINUS_BETA2] = 1.0 - settings.beta2;
    h[HYPER_EPS] = settings.eps;
    h[HYPER_DECAY_KEEP] = 1.0 - settings.lr * settings.weight_decay;
    h[HYPER_STEP_SIZE] = (settings.lr as f64 / bc1) as f32;
    h[HYPER_INV_SQRT_BC2] = (1.0 / bc2.sqrt()) as f32;
    Ok(h)
}

/// `hyper` and `state` for one AdamW update with a scale the host chose: the per-call
/// `Backend::adamw_step`, whose caller checked for divergence itself.
pub fn single_update(step: &AdamWStep) -> Result<([f32; HYPER_LEN], [f32; STATE_LEN])> {
    let settings = StepSettings {
        t: step.t,
        lr: step.lr,
        beta1: step.beta1,
        beta2: step.beta2,
        eps: step.eps,
        weight_decay: step.weight_decay,
        clip_grad: None,
    };
    let mut state = [0.0f32; STATE_LEN];
    state[STATE_CLIP_SCALE] = step.grad_scale;
    Ok((hyper(&settings, 1)?, state))
}

/// The report of step `step` from its `state` values.
pub fn report(step: u64, state: &[f32]) -> Result<StepReport> {
    if state.len() != STATE_LEN {
        bail!(
            "a step's state holds {STATE_LEN} values, {} were read",
            state.len()
        );
    }
    Ok(StepReport {
        step,
        loss: state[STATE_LOSS] as f64,
        grad_norm: state[STATE_NORM] as f64,
        diverged: state[STATE_DIVERGED] != 0.0,
    })
}

/// The device buffers of the step: written by the host before it (`hyper`), by the
/// micro-batches (`loss_sum`), by `step_finish` (`state`).
pub struct StepBuffers {
    /// [HYPER_LEN] the step's constants.
    pub hyper: CudaSlice<f32>,
    /// [1] the micro-batches' mean losses added up.
    pub loss_sum: CudaSlice<f32>,
    /// [STATE_LEN] loss, norm, divergence flag, clip scale.
    pub state: CudaSlice<f32>,
}

impl StepBuffers {
    pub fn new(gpu: &Gpu) -> Result<StepBuffers> {
        Ok(StepBuffers {
            hyper: gpu.zeros(HYPER_LEN, "step constants")?,
            loss_sum: gpu.zeros(1, "step loss sum")?,
            state: gpu.zeros(STATE_LEN, "step state")?,
        })
    }
}

/// Two pinned host copies of `state`, used in turn: step k's is copied right after its
/// update and read while step k + 1 runs, so the host waits only for a finished step.
pub struct Reports {
    slots: [PinnedHostSlice<f32>; 2],
    /// The step whose copy is queued and not yet read.
    pending: Option<Pending>,
}

/// A queued report copy.
struct Pending {
    step: u64,
    slot: usize,
    /// Recorded after the copy.
    copied: CudaEvent,
    /// The communicator of the step's gradient all-reduce: waiting for the copy waits for
    /// the other ranks too, so the wait watches for their failure (`nccl.rs`).
    comm: Option<Rc<Communicator>>,
}

impl Reports {
    pub fn new(gpu: &Gpu) -> Result<Reports> {
        Ok(Reports {
            slots: [
                pinned(gpu, STATE_LEN, "step report")?,
                pinned(gpu, STATE_LEN, "step report")?,
            ],
            pending: None,
        })
    }

    /// Queues the copy of `state` after step `step` (the GPU's stream is past its update),
    /// then returns the report of the step before, waiting for that step only. `comm` is
    /// the communicator the step averaged its gradients over, if any.
    pub fn queue(
        &mut self,
        gpu: &Gpu,
        state: &CudaSlice<f32>,
        step: u64,
        comm: Option<Rc<Communicator>>,
    ) -> Result<Option<StepReport>> {
        let slot = self.pending.as_ref().map_or(0, |p| 1 - p.slot);
        gpu.stream()
            .memcpy_dtoh(state, &mut self.slots[slot])
            .context("queueing the copy of the step's report")?;
        let copied = gpu
            .stream()
            .record_event(None)
            .context("recording the copy of the step's report")?;
        let previous = self.finish()?;
        self.pending = Some(Pending {
            step,
            slot,
            copied,
            comm,
        });
        Ok(previous)
    }

    /// The report not yet read, after waiting for its copy (and, through NCCL, watching
    /// the other ranks while waiting).
    pub fn finish(&mut self) -> Result<Option<StepReport>> {
        let Some(p) = self.pending.take() else {
            return Ok(None);
        };
        if let Some(comm) = &p.comm {
            comm.wait_for(&p.copied, &format!("step {}", p.step))?;
        }
        let values = self.slots[p.slot]
            .as_slice()
            .with_context(|| format!("GPU error in step {}", p.step))?;
        report(p.step, values).map(Some)
    }
}

/// What a captured forward and backward depends on besides fixed buffers: the batch size
/// (the activation buffers), the kind of pixels and which of the two upload buffers holds
/// them, and the gradient scale (a kernel argument of the loss).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassKey {
    pub images_len: usize,
    pub bytes: bool,
    pub pixel_slot: usize,
    pub grad_scale_bits: u32,
}

/// The graphs of a step: one per pass shape and upload buffer, and the update's (norm,
/// clip, flag, AdamW). Each runs as plain launches the first time, so that whatever its
/// launchers make on first use exists before a capture; it is captured the second time and
/// replayed after. Made on first use are the window attention's partial sums (reallocated
/// only when a larger batch needs more, and a batch size change drops the pass graphs) and
/// cuBLASLt's plans (`blaslt.rs`: descriptors, layouts and the heuristic's algorithm,
/// cached by product description and A, B, C, D address alignment). A pass of one
/// [`PassKey`] runs the same products on the same buffers every time (the activations,
/// weights, gradients and scratch stay where they are while the key holds; the upload
/// buffer and the loss sum are no GEMM operands), so every plan its capture looks up was
/// made by its warm-up run, and the capture only reads the cache. cuBLASLt's workspace is
/// the handle's own fixed buffer, so no GEMM allocates either. The update runs no GEMM.
#[derive(Default)]
pub struct StepGraphs {
    passes: Vec<(PassKey, Option<Stage>)>,
    update: Option<Stage>,
}

/// How far one graph has come.
enum Stage {
    /// Ran once as plain launches.
    Warmed,
    Captured(CudaGraph),
}

impl StepGraphs {
    /// Drops the pass graphs (their buffers are about to be freed).
    pub fn forget_passes(&mut self) {
        self.passes.clear();
    }

    /// Runs the pass of `key`: `enqueue`d, captured, or replayed.
    pub fn pass(
        &mut self,
        gpu: &Gpu,
        key: PassKey,
        enqueue: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let at = match self.passes.iter().position(|(k, _)| *k == key) {
            Some(at) => at,
            None => {
                self.passes.push((key, None));
                self.passes.len() - 1
            }
        };
        run(
            &mut self.passes[at].1,
            gpu,
            "the forward and backward",
            enqueue,
        )
    }

    /// Runs the update: `enqueue`d, captured, or replayed.
    pub fn update(&mut self, gpu: &Gpu, enqueue: impl FnOnce() -> Result<()>) -> Result<()> {
        run(&mut self.update, gpu, "the update", enqueue)
    }
}

/// The next stage of one graph: plain launches, then a capture (launched at once: the
/// capture itself runs nothing), then replays.
fn run(
    stage: &mut Option<Stage>,
    gpu: &Gpu,
    what: &str,
    enqueue: impl FnOnce() -> Result<()>,
) -> Result<()> {
    match stage {
        None => {
            enqueue()?;
            *stage = Some(Stage::Warmed);
        }
        Some(Stage::Warmed) => {
            let graph = capture(gpu, what, enqueue)?;
            graph
                .launch()
                .with_context(|| format!("launching the graph of {what}"))?;
            *stage = Some(Stage::Captured(graph));
        }
        Some(Stage::Captured(graph)) => graph
            .launch()
            .with_context(|| format!("replaying the graph of {what}"))?,
    }
    Ok(())
}

/// Records what `enqueue` queues on the GPU's stream into a graph, without running it.
/// The capture is ended even when `enqueue` fails, so the stream stays usable.
fn capture(gpu: &Gpu, what: &str, enqueue: impl FnOnce() -> Result<()>) -> Result<CudaGraph> {
    let stream = gpu.stream();
    // Thread-local: a call on this thread that is illegal during a capture (a
    // synchronisation, an allocation outside the stream) fails instead of being missed.
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .with_context(|| format!("starting the capture of {what}"))?;
    let queued = enqueue();
    let graph = stream.end_capture(CUgraphInstantiate_flags(0));
    queued.with_context(|| format!("capturing {what}"))?;
    graph
        .with_context(|| format!("ending the capture of {what}"))?
        .with_context(|| format!("the capture of {what} recorded nothing"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::optim::adamw_update;

    /// The constants as kernels/step_state.cuh defines them.
    fn header() -> Vec<(String, usize)> {
        let text = include_str!("../../kernels/step_state.cuh");
        text.lines()
            .filter_map(|l| {
                let mut words = l.strip_prefix("#define ")?.split_whitespace();
                Some((words.next()?.to_string(), words.next()?.parse().ok()?))
            })
            .collect()
    }

    #[test]
    fn indices_match_the_kernels_header() {
        let ours = [
            ("HYPER_MICRO_BATCHES", HYPER_MICRO_BATCHES),
            ("HYPER_CLIP", HYPER_CLIP),
            ("HYPER_BETA1", HYPER_BETA1),
            ("HYPER_ONE_MINUS_BETA1", HYPER_ONE_MINUS_BETA1),
            ("HYPER_BETA2", HYPER_BETA2),
            ("HYPER_ONE_MINUS_BETA2", HYPER_ONE_MINUS_BETA2),
            ("HYPER_EPS", HYPER_EPS),
            ("HYPER_DECAY_KEEP", HYPER_DECAY_KEEP),
            ("HYPER_STEP_SIZE", HYPER_STEP_SIZE),
            ("HYPER_INV_SQRT_BC2", HYPER_INV_SQRT_BC2),
            ("HYPER_LEN", HYPER_LEN),
            ("STATE_LOSS", STATE_LOSS),
            ("STATE_NORM", STATE_NORM),
            ("STATE_DIVERGED", STATE_DIVERGED),
            ("STATE_CLIP_SCALE", STATE_CLIP_SCALE),
            ("STATE_LEN", STATE_LEN),
        ];
        let defined = header();
        assert_eq!(defined.len(), ours.len(), "{defined:?}");
        for (name, value) in ours {
            assert!(
                defined.contains(&(name.to_string(), value)),
                "{name} = {value} is not in kernels/step_state.cuh: {defined:?}"
            );
        }
    }

    /// kernels/adamw.cu's arithmetic on `hyper` and `state`, operation by operation.
    fn kernel_update(
        p: &mut [f32],
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        decay: &[f32],
        h: &[f32],
        s: &[f32],
    ) {
        if s[STATE_DIVERGED] != 0.0 {
            return;
        }
        for i in 0..p.len() {
            let gk = g[i] * s[STATE_CLIP_SCALE];
            m[i] = h[HYPER_BETA1] * m[i] + h[HYPER_ONE_MINUS_BETA1] * gk;
            v[i] = h[HYPER_BETA2] * v[i] + (h[HYPER_ONE_MINUS_BETA2] * gk) * gk;
            let kept = if decay[i] != 0.0 {
                p[i] * h[HYPER_DECAY_KEEP]
            } else {
                p[i]
            };
            let denom = v[i].sqrt() * h[HYPER_INV_SQRT_BC2] + h[HYPER_EPS];
            p[i] = kept - (h[HYPER_STEP_SIZE] * m[i]) / denom;
        }
    }

    /// The host's constants make the kernel's arithmetic the CPU's update, bit for bit,
    /// over many steps (large bias corrections early, small late) and rates, where a
    /// constant rounded one way too many would differ in the last bit somewhere.
    #[test]
    fn hyper_constants_reproduce_the_cpu_update_exactly() {
        let n = 257;
        let wave = |k: f32, a: f32| {
            (0..n)
                .map(|i| a * ((i as f32) * k).sin())
                .collect::<Vec<f32>>()
        };
        let decay: Vec<f32> = (0..n).map(|i| (i % 3 == 0) as u8 as f32).collect();
        let rates = [1.5e-4f32, 7.3e-4, 3e-3];
        for (t, lr) in (1u64..300).step_by(7).flat_map(|t| rates.map(|lr| (t, lr))) {
            let step = AdamWStep {
                t,
                lr,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.05,
                grad_scale: 0.37,
            };
            let (mut p, g, mut m) = (wave(0.3, 1.0), wave(0.7, 0.1), wave(1.1, 0.01));
            let mut v: Vec<f32> = wave(1.3, 1e-3).iter().map(|x| x.abs()).collect();
            let (mut p2, mut m2, mut v2) = (p.clone(), m.clone(), v.clone());
            adamw_update(&mut p, &g, &mut m, &mut v, &decay, &step);
            let (h, s) = single_update(&step).unwrap();
            kernel_update(&mut p2, &g, &mut m2, &mut v2, &decay, &h, &s);
            assert!(p2 == p, "params at t = {t}, lr = {lr}");
            assert!(m2 == m && v2 == v, "moments at t = {t}, lr = {lr}");
        }
    }

    #[test]
    fn hyper_holds_the_clip_and_the_micro_batches() {
        let settings = StepSettings {
            t: 3,
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.05,
            clip_grad: Some(0.5),
        };
        let h = hyper(&settings, 4).unwrap();
        assert_eq!(h[HYPER_CLIP], 0.5);
        assert_eq!(h[HYPER_MICRO_BATCHES], 4.0);
        let none = StepSettings {
            clip_grad: None,
            ..settings
        };
        assert_eq!(hyper(&none, 1).unwrap()[HYPER_CLIP], f32::INFINITY);
        assert!(hyper(&StepSettings { t: 0, ..settings }, 1).is_err());
        assert!(hyper(&settings, 0).is_err());
    }

    #[test]
    fn reports_read_the_state() {
        let r = report(5, &[0.5, 2.0, 1.0, 0.25]).unwrap();
        assert_eq!(
            r,
            StepReport {
                step: 5,
                loss: 0.5,
                grad_norm: 2.0,
                diverged: true
            }
        );
        assert!(!report(5, &[0.5, 2.0, 0.0, 0.25]).unwrap().diverged);
        assert!(report(5, &[0.5]).is_err());
    }
}
