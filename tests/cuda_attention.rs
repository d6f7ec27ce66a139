//! The attention kernels against the CPU reference, computed in f64 from exactly the values
//! the GPU sees: f32 within 1e-5 and bf16 within 2e-2 (max-abs difference over max-abs
//! value, per tensor), for windows K = 2, 4, 7, 14 and head dims 32 to 128, through the
//! fast kernels (bf16, K ≤ 7) at several items per CTA and through the general ones; the
//! table gradient bit-identical across runs. Without a GPU every test prints why it
//! skipped and passes (with `LOMAR_REQUIRE_GPU=1` it fails).

mod attention_reference;
mod common;

use anyhow::{Context, Result};
use cudarc::driver::CudaSlice;
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use lomar::cuda::attention::{plan, AttnShape, AttnTuning, Pass};
use lomar::cuda::{Gpu, Kernels, Storage};

use attention_reference::{Inputs, Outputs};

/// An element type under test, with its tolerance.
trait Elem: Storage {
    const TOLERANCE: f64;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
}

impl Elem for f32 {
    const TOLERANCE: f64 = 1e-5;
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
}

impl Elem for bf16 {
    const TOLERANCE: f64 = 2e-2;
    fn from_f64(v: f64) -> Self {
        bf16::from_f64(v)
    }
    fn to_f64(self) -> f64 {
        bf16::to_f64(self)
    }
}

/// The first GPU and its `E` kernels, or `None` after printing why the test skips.
fn gpu<E: Elem>(test: &str) -> Result<Option<(Gpu, Kernels<E>)>> {
    let Some(gpu) = common::gpu_or_skip(test) else {
        return Ok(None);
    };
    let kernels = Kernels::<E>::load(&gpu)?;
    Ok(Some((gpu, kernels)))
}

fn widen<E: Elem>(v: &[E]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

fn widen_f32(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// The outputs of forward + backward on the GPU; dtable_added is what the backward added.
struct Run<E> {
    out: Vec<E>,
    lse: Vec<f32>,
    dqkv: Vec<E>,
    dtable: Vec<f32>,
}

/// The device tensors of one forward + backward.
struct Buffers<E> {
    qkv: CudaSlice<E>,
    table: CudaSlice<f32>,
    dout: CudaSlice<E>,
    out: CudaSlice<E>,
    lse: CudaSlice<f32>,
    dqkv: CudaSlice<E>,
    dtable: CudaSlice<f32>,
}

impl<E: Elem> Buffers<E> {
    /// The inputs as given; the outputs NaN, so that anything left unwritten shows.
    fn new(
        gpu: &Gpu,
        shape: AttnShape,
        qkv: &[E],
        table: &[f32],
        dout: &[E],
        dtable: &[f32],
    ) -> Result<Self> {
        let t = shape.tokens();
        let nan_e = |n: usize| vec![E::from_f64(f64::NAN); n];
        Ok(Buffers {
            qkv: gpu.upload(qkv, "qkv")?,
            table: gpu.upload(table, "table")?,
            dout: gpu.upload(dout, "dout")?,
            out: gpu.upload(&nan_e(shape.seqs * t * shape.width()), "out")?,
            lse: gpu.upload(&vec![f32::NAN; shape.seqs * shape.heads * t], "lse")?,
            dqkv: gpu.upload(&nan_e(qkv.len()), "dqkv")?,
            dtable: gpu.upload(dtable, "dtable")?,
        })
    }

    fn forward(
        &self,
        (gpu, kernels): &(Gpu, Kernels<E>),
        shape: AttnShape,
        tuning: AttnTuning,
    ) -> Result<()> {
        kernels.attention_forward(
            gpu.ptr(&self.qkv)?,
            gpu.ptr(&self.table)?,
            gpu.ptr(&self.out)?,
            gpu.ptr(&self.lse)?,
            shape,
            tuning,
        )
    }

    fn backward(
        &self,
        (gpu, kernels): &(Gpu, Kernels<E>),
        shape: AttnShape,
        tuning: AttnTuning,
    ) -> Result<()> {
        kernels.attention_backward(
            gpu.ptr(&self.qkv)?,
            gpu.ptr(&self.table)?,
            gpu.ptr(&self.out)?,
            gpu.ptr(&self.dout)?,
            gpu.ptr(&self.lse)?,
            gpu.ptr(&self.dqkv)?,
            gpu.ptr(&self.dtable)?,
            shape,
            tuning,
        )
    }
}

fn run_gpu<E: Elem>(
    gpu: &(Gpu, Kernels<E>),
    shape: AttnShape,
    inputs: &Inputs,
    tuning: AttnTuning,
) -> Result<Run<E>> {
    let to_e = |v: &[f64]| -> Vec<E> { v.iter().map(|&x| E::from_f64(x)).collect() };
    let bufs = Buffers::new(
        &gpu.0,
        shape,
        &to_e(&inputs.qkv),
        &inputs.table,
        &to_e(&inputs.dout),
        &inputs.dtable_start,
    )?;
    bufs.forward(gpu, shape, tuning)?;
    bufs.backward(gpu, shape, tuning)?;
    let all_e = |s: &CudaSlice<E>, what| gpu.0.read(s, s.len(), what);
    let all_f32 = |s: &CudaSlice<f32>, what| gpu.0.read(s, s.len(), what);
    Ok(Run {
        out: all_e(&bufs.out, "out")?,
        lse: all_f32(&bufs.lse, "lse")?,
        dqkv: all_e(&bufs.dqkv, "dqkv")?,
        dtable: all_f32(&bufs.dtable, "dtable")?,
    })
}

/// Runs forward and backward on random inputs and compares every output with the CPU op.
fn check<E: Elem>(
    gpu: &(Gpu, Kernels<E>),
    shape: AttnShape,
    seed: u64,
    tuning: AttnTuning,
) -> Result<()> {
    let inputs = Inputs::random(shape, seed, |v| E::from_f64(v).to_f64());
    let want = Outputs::reference(shape, &inputs);
    let run = run_gpu::<E>(gpu, shape, &inputs, tuning)?;
    let got = Outputs {
        out: widen(&run.out),
        lse: widen_f32(&run.lse),
        dqkv: widen(&run.dqkv),
        dtable_added: run
            .dtable
            .iter()
            .zip(&inputs.dtable_start)
            .map(|(&after, &before)| after as f64 - before as f64)
            .collect(),
    };
    let errors = got.errors(&want);
    let kernels = [Pass::Forward, Pass::Backward].map(|pass| {
        plan(pass, &shape, E::SUFFIX, &gpu.1.attention_limits(), tuning).map(|l| l.kernel)
    });
    println!(
        "{} K={} d={} h={} S={} {tuning:?} {kernels:?}: {}",
        E::SUFFIX,
        shape.window,
        shape.head_dim,
        shape.heads,
        shape.seqs,
        errors.map(|(name, e)| format!("{name} {e:.2e}")).join(", ")
    );
    for (name, e) in errors {
        assert!(
            e <= E::TOLERANCE,
            "{} {shape:?} {tuning:?}: {name} error {e:.3e} > {:.0e}",
            E::SUFFIX,
            E::TOLERANCE
        );
    }
    Ok(())
}

fn shape(window: usize, head_dim: usize, heads: usize, seqs: usize) -> AttnShape {
    AttnShape {
        seqs,
        window,
        heads,
        head_dim,
    }
}

/// Windows 2 to 14 and every head dim, vit_base's (K 7, d 64, h 12) among them; small
/// enough to run under compute-sanitizer.
fn cases() -> Vec<AttnShape> {
    vec![
        shape(2, 32, 3, 7),
        shape(4, 64, 2, 5),
        shape(4, 128, 2, 3),
        shape(7, 64, 12, 64),
        shape(7, 80, 4, 6),
        shape(14, 32, 2, 3),
        shape(14, 80, 2, 3),
        shape(14, 128, 2, 3),
    ]
}

#[test]
fn bf16_matches_the_cpu_reference() -> Result<()> {
    let Some(gpu) = gpu::<bf16>("bf16_matches_the_cpu_reference")? else {
        return Ok(());
    };
    for (i, shape) in cases().into_iter().enumerate() {
        check::<bf16>(&gpu, shape, 100 + i as u64, AttnTuning::default())?;
    }
    Ok(())
}

/// The fast kernels with 1, 3 and all items per CTA, and the general kernels forced, on
/// vit_base's shape and a one-warp one.
#[test]
fn bf16_matches_the_cpu_reference_at_every_tuning() -> Result<()> {
    let Some(gpu) = gpu::<bf16>("bf16_matches_the_cpu_reference_at_every_tuning")? else {
        return Ok(());
    };
    let tunings = [
        AttnTuning {
            items_per_cta: Some(1),
            force_general: false,
        },
        AttnTuning {
            items_per_cta: Some(3),
            force_general: false,
        },
        AttnTuning {
            items_per_cta: Some(usize::MAX),
            force_general: false,
        },
        AttnTuning {
            items_per_cta: None,
            force_general: true,
        },
    ];
    for (i, tuning) in tunings.into_iter().enumerate() {
        check::<bf16>(&gpu, shape(7, 64, 12, 40), 300 + i as u64, tuning)?;
        check::<bf16>(&gpu, shape(3, 32, 2, 9), 310 + i as u64, tuning)?;
    }
    Ok(())
}

/// Two identical backward runs give bit-identical outputs and table gradients, through
/// both implementations (no atomics, fixed-order sums).
#[test]
fn the_backward_is_bitwise_reproducible() -> Result<()> {
    let Some(gpu) = gpu::<bf16>("the_backward_is_bitwise_reproducible")? else {
        return Ok(());
    };
    let sh = shape(7, 64, 12, 256);
    let inputs = Inputs::random(sh, 400, |v| bf16::from_f64(v).to_f64());
    for force_general in [false, true] {
        let tuning = AttnTuning {
            items_per_cta: None,
            force_general,
        };
        let first = run_gpu::<bf16>(&gpu, sh, &inputs, tuning)?;
        let second = run_gpu::<bf16>(&gpu, sh, &inputs, tuning)?;
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&first.dtable),
            bits(&second.dtable),
            "{tuning:?}: dtable"
        );
        assert!(first
            .dqkv
            .iter()
            .zip(&second.dqkv)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        println!("{tuning:?}: two runs bit-identical");
    }
    Ok(())
}

#[test]
fn f32_matches_the_cpu_reference() -> Result<()> {
    let Some(gpu) = gpu::<f32>("f32_matches_the_cpu_reference")? else {
        return Ok(());
    };
    for (i, shape) in cases().into_iter().enumerate() {
        // K and V alone take 2·208·132·4 bytes of shared memory in f32: more than any GPU
        // allows a block. The launcher must say so rather than launch.
        if (shape.window, shape.head_dim) == (14, 128) {
            let err = check::<f32>(&gpu, shape, 200 + i as u64, AttnTuning::default()).unwrap_err();
            assert!(format!("{err:#}").contains("shared memory"), "{err:#}");
            println!("f32 K=14 d=128: refused as expected ({err:#})");
            continue;
        }
        check::<f32>(&gpu, shape, 200 + i as u64, AttnTuning::default())?;
    }
    Ok(())
}

#[test]
fn bad_buffers_are_errors() -> Result<()> {
    let Some((gpu, kernels)) = gpu::<bf16>("bad_buffers_are_errors")? else {
        return Ok(());
    };
    let sh = shape(2, 32, 2, 3);
    let (t, width) = (sh.tokens(), sh.width());
    let n = sh.seqs * t * 3 * width;
    let qkv = gpu.zeros::<bf16>(n + 8, "qkv")?;
    let table = gpu.zeros::<f32>(sh.table_rows() * sh.heads, "table")?;
    let out = gpu.zeros::<bf16>(sh.seqs * t * width, "out")?;
    let lse = gpu.zeros::<f32>(sh.seqs * sh.heads * t, "lse")?;
    let whole = gpu.ptr(&qkv)?;
    let run = |qkv, shape| {
        kernels.attention_forward(
            qkv,
            gpu.ptr(&table)?,
            gpu.ptr(&out)?,
            gpu.ptr(&lse)?,
            shape,
            AttnTuning::default(),
        )
    };
    let too_long = run(whole, sh).unwrap_err();
    assert!(format!("{too_long:#}").contains("qkv"), "{too_long:#}");
    let misaligned = run(whole.range(1..n + 1)?, sh).unwrap_err();
    assert!(
        format!("{misaligned:#}").contains("aligned"),
        "{misaligned:#}"
    );
    run(whole.range(8..n + 8)?, sh)?;
    let no_kernel = AttnShape { head_dim: 48, ..sh };
    assert!(run(whole.range(0..n)?, no_kernel).is_err());
    gpu.synchronize("the attention forwards")?;
    Ok(())
}

/// The attention benchmark of vit_base (S = 1024 windows of T = 50 tokens, 12 heads of 64,
/// bf16): forward, backward (with the table-gradient finish) and both, in µs per call
/// (median of 7 timings of 20 calls each) and as bandwidth of the compulsory traffic, for
/// the default launch and every candidate (items per CTA of the fast kernels, the general
/// kernels), so one GPU run compares them all. Prints a table; with
/// `LOMAR_ATTN_BENCH_JSON=PATH` (scripts/gpu-check) also writes it as JSON.
#[test]
fn vit_base_benchmark() -> Result<()> {
    let Some(gpu) = gpu::<bf16>("vit_base_benchmark")? else {
        return Ok(());
    };
    let sh = shape(7, 64, 12, 1024);
    let (t, width) = (sh.tokens(), sh.width());
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut random = |n: usize| -> Vec<bf16> {
        (0..n)
            .map(|_| bf16::from_f32(rng.gen_range(-1.0..1.0)))
            .collect()
    };
    let qkv = random(sh.seqs * t * 3 * width);
    let dout = random(sh.seqs * t * width);
    let zeros = vec![0.0f32; sh.table_rows() * sh.heads];
    let bufs = Buffers::new(&gpu.0, sh, &qkv, &zeros, &dout, &zeros)?;
    let (reps, timings) = (20, 7);
    let timed = |f: &mut dyn FnMut() -> Result<()>| common::median_us(&gpu.0, reps, timings, f);
    let e = 2.0;
    let rows = (sh.seqs * t) as f64;
    let lse_bytes = rows * sh.heads as f64 * 4.0;
    let fwd_bytes = rows * (3 + 1) as f64 * width as f64 * e + lse_bytes;
    let bwd_bytes = rows * (3 + 1 + 1 + 3) as f64 * width as f64 * e + lse_bytes;
    let mut candidates = vec![("default".to_string(), AttnTuning::default())];
    for items in [1, 2, 4, 8, 16, 32, 86] {
        let tuning = AttnTuning {
            items_per_cta: Some(items),
            force_general: false,
        };
        candidates.push((format!("fast, {items} items per CTA"), tuning));
    }
    let general = AttnTuning {
        items_per_cta: None,
        force_general: true,
    };
    candidates.push(("general (one block per item)".to_string(), general));
    let mut results = Vec::new();
    println!(
        "vit_base bf16 attention, S=1024 T=50 h=12 d=64, on {}",
        gpu.0.name()
    );
    println!(
        "{:<32} {:>24} {:>24} {:>10}",
        "candidate", "forward µs (GB/s)", "backward µs (GB/s)", "fwd+bwd µs"
    );
    for (name, tuning) in candidates {
        let [fwd_plan, bwd_plan] = [Pass::Forward, Pass::Backward]
            .map(|pass| plan(pass, &sh, "bf16", &gpu.1.attention_limits(), tuning));
        let (fwd_plan, bwd_plan) = (fwd_plan?, bwd_plan?);
        let fwd_us = timed(&mut || bufs.forward(&gpu, sh, tuning))?;
        let bwd_us = timed(&mut || bufs.backward(&gpu, sh, tuning))?;
        let dq = gpu.0.read(&bufs.dqkv, bufs.dqkv.len(), "dqkv")?;
        assert!(dq.iter().all(|v| v.is_finite()) && dq.iter().any(|v| v.to_f32() != 0.0));
        let (fwd_gbs, bwd_gbs) = (fwd_bytes / fwd_us * 1e-3, bwd_bytes / bwd_us * 1e-3);
        println!(
            "{name:<32} {:>15.1} ({fwd_gbs:>5.0}) {:>15.1} ({bwd_gbs:>5.0}) {:>10.1}",
            fwd_us,
            bwd_us,
            fwd_us + bwd_us
        );
        results.push(format!(
            "{{\"candidate\": {name:?}, \"forward_kernel\": {:?}, \"forward_grid\": [{}, {}], \
             \"backward_kernel\": {:?}, \"backward_grid\": [{}, {}], \"forward_us\": {fwd_us:.2}, \
             \"backward_us\": {bwd_us:.2}, \"forward_backward_us\": {:.2}, \
             \"forward_gb_per_s\": {fwd_gbs:.1}, \"backward_gb_per_s\": {bwd_gbs:.1}}}",
            fwd_plan.kernel,
            fwd_plan.grid.0,
            fwd_plan.grid.1,
            bwd_plan.kernel,
            bwd_plan.grid.0,
            bwd_plan.grid.1,
            fwd_us + bwd_us
        ));
    }
    if let Ok(path) = std::env::var("LOMAR_ATTN_BENCH_JSON") {
        let json = format!(
            "{{\"gpu\": {:?}, \"commit\": {:?}, \"shape\": {{\"seqs\": {}, \"tokens\": {t}, \
             \"heads\": {}, \"head_dim\": {}, \"dtype\": \"bf16\"}}, \
             \"forward_bytes\": {fwd_bytes}, \"backward_bytes\": {bwd_bytes}, \
             \"calls_per_timing\": {reps}, \"timings\": {timings}, \"results\": [\n  {}\n]}}\n",
            gpu.0.name(),
            std::env::var("LOMAR_COMMIT").unwrap_or_default(),
            sh.seqs,
            sh.heads,
            sh.head_dim,
            results.join(",\n  ")
        );
        std::fs::write(&path, json).with_context(|| format!("writing {path}"))?;
        println!("wrote {path}");
    }
    Ok(())
}
