//! The global attention kernels (kernels/global_attention.cu, MAE's) against the CPU op
//! `cpu::ops::global_attention`, computed in f64 from exactly the values the GPU sees: f32
//! within 1e-5 and bf16 within 2e-2 (max-abs difference over max-abs value, per tensor),
//! for T from 1 to 785 (MAE's encoder and decoder at 224 and 448) and head dims 32 to 128;
//! the backward bit-identical across runs; `mae_shapes_benchmark` times MAE's shapes.
//! Without a GPU every test prints why it skipped and passes (with `LOMAR_REQUIRE_GPU=1`
//! it fails).

mod common;

use anyhow::Result;
use half::bf16;

use lomar::cpu::ops::global_attention::{global_attention_backward, global_attention_forward};
use lomar::cuda::global_attention::GlobalAttnShape;
use lomar::cuda::{Gpu, Kernels, Storage};

use common::Report;

/// The first GPU and its `T` kernels, or `None` after printing why the test skips.
fn gpu<T: Storage>(test: &str) -> Result<Option<(Gpu, Kernels<T>)>> {
    let Some(gpu) = common::gpu_or_skip(test) else {
        return Ok(None);
    };
    let kernels = Kernels::<T>::load(&gpu)?;
    Ok(Some((gpu, kernels)))
}

fn shape(tokens: usize, head_dim: usize, heads: usize, seqs: usize) -> GlobalAttnShape {
    GlobalAttnShape {
        seqs,
        tokens,
        heads,
        head_dim,
    }
}

/// out, lse and dqkv of forward + backward on the GPU, as f32.
struct Run {
    out: Vec<f32>,
    lse: Vec<f32>,
    dqkv: Vec<f32>,
}

fn run_gpu<T: Storage>(
    (gpu, kernels): &(Gpu, Kernels<T>),
    sh: GlobalAttnShape,
    qkv: &[f32],
    dout: &[f32],
) -> Result<Run> {
    let to_t = |v: &[f32]| -> Vec<T> { v.iter().map(|&x| T::from_f32(x)).collect() };
    let rows = sh.seqs * sh.tokens;
    let nan = |n: usize| vec![f32::NAN; n];
    let qkv_d = gpu.upload(&to_t(qkv), "qkv")?;
    let dout_d = gpu.upload(&to_t(dout), "dout")?;
    let out = gpu.upload(&to_t(&nan(rows * sh.width())), "out")?;
    let lse = gpu.upload(&nan(rows * sh.heads), "lse")?;
    let delta = gpu.upload(&nan(rows * sh.heads), "delta")?;
    let dqkv = gpu.upload(&to_t(&nan(qkv.len())), "dqkv")?;
    kernels.global_attention_forward(gpu.ptr(&qkv_d)?, gpu.ptr(&out)?, gpu.ptr(&lse)?, sh)?;
    kernels.global_attention_backward(
        gpu.ptr(&qkv_d)?,
        gpu.ptr(&out)?,
        gpu.ptr(&dout_d)?,
        gpu.ptr(&lse)?,
        gpu.ptr(&delta)?,
        gpu.ptr(&dqkv)?,
        sh,
    )?;
    let widen = |v: Vec<T>| -> Vec<f32> { v.into_iter().map(T::to_f32).collect() };
    Ok(Run {
        out: widen(gpu.read(&out, out.len(), "out")?),
        lse: gpu.read(&lse, lse.len(), "lse")?,
        dqkv: widen(gpu.read(&dqkv, dqkv.len(), "dqkv")?),
    })
}

/// Random inputs rounded to `T`: qkv of a few units (a peaked softmax) and dout.
fn inputs<T: Storage>(sh: GlobalAttnShape, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = common::rng(seed);
    let rows = sh.seqs * sh.tokens;
    let qkv = common::round_to::<T>(&common::uniform(&mut rng, rows * 3 * sh.width(), 2.0));
    let dout = common::round_to::<T>(&common::uniform(&mut rng, rows * sh.width(), 1.0));
    (qkv, dout)
}

/// Compares forward and backward on each shape with the CPU op in f64.
fn check<T: Storage>(test: &str, shapes: &[GlobalAttnShape], tol: f64) -> Result<()> {
    let Some(gpu) = gpu::<T>(test)? else {
        return Ok(());
    };
    let mut report = Report::new(format!("{test} ({})", T::SUFFIX));
    for (i, &sh) in shapes.iter().enumerate() {
        let (qkv, dout) = inputs::<T>(sh, 100 + i as u64);
        let run = run_gpu(&gpu, sh, &qkv, &dout)?;
        let wide = |v: &[f32]| -> Vec<f64> { v.iter().map(|&x| x as f64).collect() };
        let (qkv64, dout64) = (wide(&qkv), wide(&dout));
        let rows = sh.seqs * sh.tokens;
        let (mut out, mut lse) = (vec![0.0; rows * sh.width()], vec![0.0; rows * sh.heads]);
        global_attention_forward(&mut out, &mut lse, &qkv64, sh.tokens, sh.heads);
        let mut dqkv = vec![0.0; qkv.len()];
        global_attention_backward(&mut dqkv, &dout64, &qkv64, &lse, sh.tokens, sh.heads);
        let narrow = |v: &[f64]| -> Vec<f32> { v.iter().map(|&x| x as f32).collect() };
        let label = format!(
            "T={} d={} h={} S={}",
            sh.tokens, sh.head_dim, sh.heads, sh.seqs
        );
        report.close(&format!("{label} out"), &run.out, &narrow(&out), tol);
        report.close(&format!("{label} lse"), &run.lse, &narrow(&lse), tol);
        report.close(&format!("{label} dqkv"), &run.dqkv, &narrow(&dqkv), tol);
    }
    report.finish();
    Ok(())
}

/// MAE's sequences (encoder 50 and 197, decoder 197 and 785) and ragged ones, every head
/// dim.
fn cases() -> Vec<GlobalAttnShape> {
    vec![
        shape(1, 32, 2, 3),
        shape(17, 64, 3, 2),
        shape(50, 64, 12, 8),
        shape(64, 128, 2, 2),
        shape(65, 80, 2, 2),
        shape(197, 64, 12, 2),
        shape(197, 32, 16, 2),
        shape(785, 32, 16, 1),
        shape(785, 128, 2, 1),
    ]
}

#[test]
fn bf16_matches_the_cpu_op() -> Result<()> {
    check::<bf16>("bf16_matches_the_cpu_op", &cases(), 2e-2)
}

#[test]
fn f32_matches_the_cpu_op() -> Result<()> {
    check::<f32>("f32_matches_the_cpu_op", &cases(), 1e-5)
}

#[test]
fn the_backward_is_bitwise_reproducible() -> Result<()> {
    let Some(gpu) = gpu::<bf16>("the_backward_is_bitwise_reproducible")? else {
        return Ok(());
    };
    let sh = shape(197, 64, 4, 3);
    let (qkv, dout) = inputs::<bf16>(sh, 7);
    let first = run_gpu(&gpu, sh, &qkv, &dout)?;
    let second = run_gpu(&gpu, sh, &qkv, &dout)?;
    let bits = |v: &[f32]| -> Vec<u32> { v.iter().map(|x| x.to_bits()).collect() };
    assert_eq!(bits(&first.dqkv), bits(&second.dqkv));
    assert_eq!(bits(&first.lse), bits(&second.lse));
    Ok(())
}

#[test]
fn bad_buffers_are_errors() -> Result<()> {
    let Some((gpu, kernels)) = gpu::<f32>("bad_buffers_are_errors")? else {
        return Ok(());
    };
    let sh = shape(17, 32, 2, 2);
    let qkv = gpu.upload(&vec![0.0f32; 2 * 17 * 3 * 64], "qkv")?;
    let short = gpu.upload(&vec![0.0f32; 2 * 17 * 64 - 1], "out")?;
    let lse = gpu.upload(&vec![0.0f32; 2 * 17 * 2], "lse")?;
    let err = kernels
        .global_attention_forward(gpu.ptr(&qkv)?, gpu.ptr(&short)?, gpu.ptr(&lse)?, sh)
        .unwrap_err();
    assert!(err.to_string().contains("out has"), "{err}");
    let odd = shape(17, 48, 2, 2);
    let err = kernels
        .global_attention_forward(gpu.ptr(&qkv)?, gpu.ptr(&short)?, gpu.ptr(&lse)?, odd)
        .unwrap_err();
    assert!(err.to_string().contains("head_dim 48"), "{err}");
    Ok(())
}

/// Times forward and backward (median of 7 timings of 10 calls each) on MAE's attention
/// shapes at batch 256 (mae_base: encoder 12 heads of 64 on the visible quarter, decoder 16
/// heads of 32 on every patch) in bf16, and prints µs and TFLOP/s counting the products a
/// pass needs (forward Q·Kᵀ and P·V; backward dV, dP, dQ, dK: twice the forward), not the
/// recomputed ones.
#[test]
fn mae_shapes_benchmark() -> Result<()> {
    let Some(gpu) = gpu::<bf16>("mae_shapes_benchmark")? else {
        return Ok(());
    };
    let (gpu, kernels) = &gpu;
    println!("MAE global attention, bf16, batch 256, on {}", gpu.name());
    println!(
        "{:<22} {:>22} {:>22}",
        "shape", "forward µs (TFLOP/s)", "backward µs (TFLOP/s)"
    );
    for (name, sh) in [
        ("encoder 224", shape(50, 64, 12, 256)),
        ("decoder 224", shape(197, 32, 16, 256)),
        ("encoder 448", shape(197, 64, 12, 256)),
        ("decoder 448", shape(785, 32, 16, 256)),
    ] {
        let (qkv, dout) = inputs::<bf16>(sh, 5);
        let to_bf16 = |v: &[f32]| -> Vec<bf16> { v.iter().map(|&x| bf16::from_f32(x)).collect() };
        let rows = sh.seqs * sh.tokens;
        let qkv = gpu.upload(&to_bf16(&qkv), "qkv")?;
        let dout = gpu.upload(&to_bf16(&dout), "dout")?;
        let out = gpu.zeros::<bf16>(rows * sh.width(), "out")?;
        let lse = gpu.zeros::<f32>(rows * sh.heads, "lse")?;
        let delta = gpu.zeros::<f32>(rows * sh.heads, "delta")?;
        let dqkv = gpu.zeros::<bf16>(rows * 3 * sh.width(), "dqkv")?;
        let forward =
            || kernels.global_attention_forward(gpu.ptr(&qkv)?, gpu.ptr(&out)?, gpu.ptr(&lse)?, sh);
        let fwd_us = common::median_us(gpu, 10, 7, &mut || forward())?;
        let bwd_us = common::median_us(gpu, 10, 7, &mut || {
            kernels.global_attention_backward(
                gpu.ptr(&qkv)?,
                gpu.ptr(&out)?,
                gpu.ptr(&dout)?,
                gpu.ptr(&lse)?,
                gpu.ptr(&delta)?,
                gpu.ptr(&dqkv)?,
                sh,
            )
        })?;
        let fwd_flops = 4.0 * (sh.seqs * sh.heads * sh.tokens * sh.tokens * sh.head_dim) as f64;
        let tflops = |flops: f64, us: f64| flops / us * 1e-6;
        println!(
            "{name:<22} {:>12.1} ({:>6.1}) {:>13.1} ({:>6.1})",
            fwd_us,
            tflops(fwd_flops, fwd_us),
            bwd_us,
            tflops(2.0 * fwd_flops, bwd_us)
        );
    }
    Ok(())
}
