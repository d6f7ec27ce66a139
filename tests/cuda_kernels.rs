//! Every CUDA kernel (and each cuBLASLt product) against the matching CPU reference op, in
//! both storage types. fp32 must agree to rounding; bf16 to the rounding of its stored
//! outputs (the CPU reference is fed the same bf16-rounded inputs). Skips without a GPU.

mod common;

use common::{gpu_or_skip, rng, round_to, sample_batch, uniform, Report};
use cudarc::driver::CudaSlice;
use half::bf16;
use lomar::backend::{AdamWStep, Backend, Precision};
use lomar::config::{preset, ModelConfig, PRESETS};
use lomar::cpu::ops::{gelu, layernorm, linear, loss, tokens, window_gather};
use lomar::cuda::blaslt::{Dtype, GemmDesc, Layout, Linear};
use lomar::cuda::launch::{scratch_len, MaskedRows, REDUCE_CHUNKS};
use lomar::cuda::linear::{LayerShapes, LinearLayers};
use lomar::cuda::pixels::{PixelSource, PixelUpload, PixelValue};
use lomar::cuda::{BlasLt, CudaBackend, DevPtr, Gpu, Kernels, Storage};
use lomar::data::batch::{Batch, Pixels};
use lomar::params::ParamLayout;

/// Relative tolerance of a kernel whose outputs are stored as T.
fn tol<T: Storage>() -> f64 {
    if T::SUFFIX == "f32" {
        2e-5
    } else {
        1e-2
    }
}

fn up<T: Storage>(gpu: &Gpu, v: &[f32]) -> CudaSlice<T> {
    let converted: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
    gpu.upload(&converted, "test input").expect("upload")
}

fn down<T: Storage>(gpu: &Gpu, s: &CudaSlice<T>) -> Vec<f32> {
    gpu.read(s, s.len(), "test output")
        .expect("read back")
        .into_iter()
        .map(T::to_f32)
        .collect()
}

/// A test buffer from its second element on: an address aligned to only 2 or 4 bytes.
fn off<'a, T>(gpu: &Gpu, s: &'a CudaSlice<T>) -> DevPtr<'a, T> {
    let p = dev(gpu, s);
    p.range(1..p.len()).expect("a buffer of at least one value")
}

/// The launchers' view of a test buffer.
fn dev<'a, T>(gpu: &Gpu, s: &'a CudaSlice<T>) -> DevPtr<'a, T> {
    gpu.ptr(s).expect("a buffer of the test's GPU")
}

fn scratch(gpu: &Gpu, m: &ModelConfig) -> CudaSlice<f32> {
    gpu.zeros(scratch_len(m), "scratch").expect("scratch")
}

/// Runs `check` for f32 and bf16 storage.
fn both(test: &str, check: impl Fn(&Gpu, &str, &Kernels<f32>, &Kernels<bf16>)) {
    let Some(gpu) = gpu_or_skip(test) else {
        return;
    };
    let k32 = Kernels::<f32>::load(&gpu).expect("loading the f32 kernels");
    let k16 = Kernels::<bf16>::load(&gpu).expect("loading the bf16 kernels");
    check(&gpu, test, &k32, &k16);
}

fn window_gather_case<T: Storage>(
    gpu: &Gpu,
    k: &Kernels<T>,
    m: &ModelConfig,
    source: PixelSource,
    bytes: bool,
    report: &mut Report,
) {
    let mut batch = sample_batch(m, 3, 11);
    if bytes {
        batch.images = Pixels::Bytes((0..batch.images.len()).map(|i| (i * 7919) as u8).collect());
    }
    match &batch.images {
        Pixels::Bytes(v) => gather_on_gpu(gpu, k, m, source, &batch, v, report),
        Pixels::Normalised(v) => gather_on_gpu(gpu, k, m, source, &batch, v, report),
    }
}

/// The GPU's gather of `images` (the pixels of `batch`, as they travel) against the CPU op.
fn gather_on_gpu<T: Storage, P: PixelValue>(
    gpu: &Gpu,
    k: &Kernels<T>,
    m: &ModelConfig,
    source: PixelSource,
    batch: &Batch,
    images: &[P],
    report: &mut Report,
) {
    let seqs = batch.sequences(m);
    let want = window_gather::window_gather::<f32>(m, batch);
    let mut pixels = vec![P::default(); source.len(seqs)];
    source.fill(images, batch, m, &mut pixels);
    let origins = if source.crops {
        vec![0; 2 * seqs]
    } else {
        batch.window_origin.clone()
    };
    let pixels = gpu.upload(&pixels, "pixels").unwrap();
    let origin = gpu.upload(&origins, "origins").unwrap();
    let slots = gpu
        .upload(&lomar::cuda::pos_slots(batch, m), "slots")
        .unwrap();
    let vis: CudaSlice<T> = gpu.zeros(want.visible.len(), "visible").unwrap();
    let tgt: CudaSlice<f32> = gpu.zeros(want.targets.len(), "targets").unwrap();
    k.window_gather(
        dev(gpu, &pixels),
        dev(gpu, &origin),
        dev(gpu, &slots),
        dev(gpu, &vis),
        dev(gpu, &tgt),
        m,
        source,
        seqs,
    )
    .unwrap();
    let tag = format!(
        "p{} norm_pix {}, {} of {}",
        m.patch,
        m.norm_pix,
        if source.crops {
            "window squares"
        } else {
            "images"
        },
        std::any::type_name::<P>()
    );
    report.close(
        &format!("visible patches ({tag})"),
        &down(gpu, &vis),
        &round_to::<T>(&want.visible),
        tol::<T>(),
    );
    report.close(
        &format!("targets ({tag})"),
        &down(gpu, &tgt),
        &want.targets,
        2e-5,
    );
}

#[test]
fn window_gather_matches_cpu() {
    both("window_gather", |gpu, test, k32, k16| {
        let tiny = preset("tiny").unwrap();
        let wide = ModelConfig {
            image: 64,
            patch: 16,
            window: 3,
            ..tiny.clone()
        };
        let raw = ModelConfig {
            norm_pix: false,
            ..tiny.clone()
        };
        for (name, m) in [("tiny", &tiny), ("p16", &wide), ("raw pixels", &raw)] {
            for source in [PixelSource::images(m), PixelSource::crops(m)] {
                for bytes in [true, false] {
                    let mut r = Report::new(format!("{test} f32 {name}"));
                    window_gather_case(gpu, k32, m, source, bytes, &mut r);
                    r.finish();
                    let mut r = Report::new(format!("{test} bf16 {name}"));
                    window_gather_case(gpu, k16, m, source, bytes, &mut r);
                    r.finish();
                }
            }
        }
    });
}

fn token_assembly_case<T: Storage>(gpu: &Gpu, k: &Kernels<T>, title: String) {
    let m = preset("tiny").unwrap();
    let batch = sample_batch(&m, 5, 12);
    let (seqs, d) = (batch.sequences(&m), m.width);
    let (nv, n) = (seqs * m.visible_per_window(), seqs * m.seq_len());
    let mut r = rng(13);
    let emb = round_to::<T>(&uniform(&mut r, nv * d, 1.0));
    let (bias, cls, mask) = (
        uniform(&mut r, d, 1.0),
        uniform(&mut r, d, 1.0),
        uniform(&mut r, d, 1.0),
    );
    let slots_opt = batch.visible_slots(&m);
    let slots = gpu
        .upload(&lomar::cuda::pos_slots(&batch, &m), "slots")
        .unwrap();
    let mut report = Report::new(title);

    // Forward: the CPU op takes the embedded rows with their bias.
    let with_bias: Vec<f32> = emb
        .chunks(d)
        .flat_map(|row| row.iter().zip(&bias).map(|(a, b)| a + b))
        .collect();
    let mut want_x = vec![0.0; n * d];
    tokens::assemble_tokens_forward(
        &mut want_x,
        &cls,
        &mask,
        &with_bias,
        &slots_opt,
        m.window_area(),
    );
    let (emb_d, bias_d, cls_d, mask_d) = (
        up::<T>(gpu, &emb),
        up::<f32>(gpu, &bias),
        up::<f32>(gpu, &cls),
        up::<f32>(gpu, &mask),
    );
    let x: CudaSlice<f32> = gpu.zeros(n * d, "x").unwrap();
    k.assemble_tokens_forward(
        dev(gpu, &emb_d),
        dev(gpu, &bias_d),
        dev(gpu, &cls_d),
        dev(gpu, &mask_d),
        dev(gpu, &slots),
        dev(gpu, &x),
        &m,
        seqs,
    )
    .unwrap();
    report.close("assembled tokens", &down(gpu, &x), &want_x, 1e-6);

    // Backward, onto gradients that already hold values (they must accumulate).
    let dx = uniform(&mut r, n * d, 1.0);
    let start = uniform(&mut r, 3 * d, 1.0);
    let (mut want_cls, mut want_mask) = (start[..d].to_vec(), start[d..2 * d].to_vec());
    let mut want_demb = vec![0.0; nv * d];
    tokens::assemble_tokens_backward(
        &mut want_cls,
        &mut want_mask,
        &mut want_demb,
        &dx,
        &slots_opt,
        m.window_area(),
    );
    let mut want_bias = start[2 * d..].to_vec();
    for row in want_demb.chunks(d) {
        want_bias.iter_mut().zip(row).for_each(|(a, g)| *a += g);
    }
    let dx_d = up::<f32>(gpu, &dx);
    let demb: CudaSlice<T> = gpu.zeros(nv * d, "demb").unwrap();
    let grads = up::<f32>(gpu, &start);
    let g = dev(gpu, &grads);
    let scratch = scratch(gpu, &m);
    k.assemble_tokens_backward(
        dev(gpu, &dx_d),
        dev(gpu, &slots),
        dev(gpu, &demb),
        dev(gpu, &scratch),
        g.range(0..d).unwrap(),
        g.range(d..2 * d).unwrap(),
        g.range(2 * d..3 * d).unwrap(),
        &m,
        seqs,
    )
    .unwrap();
    let got = down(gpu, &grads);
    report.close("d cls (accumulated)", &got[..d], &want_cls, 1e-5);
    report.close(
        "d mask_token (accumulated)",
        &got[d..2 * d],
        &want_mask,
        1e-5,
    );
    report.close(
        "d patch bias (accumulated)",
        &got[2 * d..],
        &want_bias,
        1e-5,
    );
    report.close(
        "d embedded rows",
        &down(gpu, &demb),
        &round_to::<T>(&want_demb),
        tol::<T>(),
    );
    report.finish();
}

#[test]
fn token_assembly_matches_cpu() {
    both("token_assembly", |gpu, test, k32, k16| {
        token_assembly_case(gpu, k32, format!("{test} f32"));
        token_assembly_case(gpu, k16, format!("{test} bf16"));
    });
}

#[test]
fn masked_token_gather_and_scatter_match_cpu() {
    both("masked_tokens", |gpu, test, k32, _| {
        let m = preset("tiny").unwrap();
        let batch = sample_batch(&m, 4, 14);
        let (seqs, d, t) = (batch.sequences(&m), m.width, m.seq_len());
        let nm = seqs * m.masked_per_window();
        let rows = MaskedRows::new(&m, seqs, d);
        let mut r = rng(15);
        let x = uniform(&mut r, seqs * t * d, 1.0);
        let mut want = vec![0.0; nm * d];
        tokens::gather_masked_tokens(&mut want, &x, &batch.mask_index, t);
        let (x_d, idx) = (
            up::<f32>(gpu, &x),
            gpu.upload(&batch.mask_index, "mask").unwrap(),
        );
        let xm: CudaSlice<f32> = gpu.zeros(nm * d, "xm").unwrap();
        k32.gather_masked_tokens(dev(gpu, &x_d), dev(gpu, &idx), dev(gpu, &xm), rows)
            .unwrap();
        let mut report = Report::new(test);
        report.close("gathered masked tokens", &down(gpu, &xm), &want, 0.0);

        let dxm = uniform(&mut r, nm * d, 1.0);
        let mut want_dx = uniform(&mut r, seqs * t * d, 1.0);
        let dx_d = up::<f32>(gpu, &want_dx);
        tokens::scatter_masked_tokens(&mut want_dx, &dxm, &batch.mask_index, t);
        let dxm_d = up::<f32>(gpu, &dxm);
        k32.scatter_masked_tokens(dev(gpu, &dxm_d), dev(gpu, &idx), dev(gpu, &dx_d), rows)
            .unwrap();
        report.close(
            "scattered gradient (accumulated)",
            &down(gpu, &dx_d),
            &want_dx,
            1e-7,
        );
        report.finish();
    });
}

fn layernorm_case<T: Storage>(gpu: &Gpu, k: &Kernels<T>, title: String) {
    let mut report = Report::new(title);
    // 72 and 100 are not multiples of 32 (100 not of the 8-value packs either); 1001 rows
    // is not a multiple of the rows per block.
    for (rows, width) in [(1001, 72), (37, 768), (203, 100)] {
        let mut r = rng(16);
        let x: Vec<f32> = uniform(&mut r, rows * width, 3.0)
            .iter()
            .map(|v| v + 1.5)
            .collect();
        let (gamma, beta) = (uniform(&mut r, width, 2.0), uniform(&mut r, width, 1.0));
        let mut want_y = vec![0.0; rows * width];
        let stats = layernorm::layernorm_forward(&mut want_y, &x, &gamma, &beta);
        let (x_d, g_d, b_d) = (
            up::<f32>(gpu, &x),
            up::<f32>(gpu, &gamma),
            up::<f32>(gpu, &beta),
        );
        let y: CudaSlice<T> = gpu.zeros(rows * width, "y").unwrap();
        let mean: CudaSlice<f32> = gpu.zeros(rows, "mean").unwrap();
        let rstd: CudaSlice<f32> = gpu.zeros(rows, "rstd").unwrap();
        k.layernorm_forward(
            dev(gpu, &x_d),
            dev(gpu, &g_d),
            dev(gpu, &b_d),
            dev(gpu, &y),
            dev(gpu, &mean),
            dev(gpu, &rstd),
            rows,
            width,
        )
        .unwrap();
        let shape = format!("[{rows}, {width}]");
        report.close(
            &format!("y {shape}"),
            &down(gpu, &y),
            &round_to::<T>(&want_y),
            tol::<T>(),
        );
        // Both sides sum up to 768 f32 values per row, in different orders.
        report.close(
            &format!("mean {shape}"),
            &down(gpu, &mean),
            &stats.mean,
            1e-5,
        );
        report.close(
            &format!("rstd {shape}"),
            &down(gpu, &rstd),
            &stats.rstd,
            1e-5,
        );

        // Backward onto non-zero dx, dgamma, dbeta and bias gradient: all accumulate.
        let dy = round_to::<T>(&uniform(&mut r, rows * width, 1.0));
        let mut want_dx = uniform(&mut r, rows * width, 1.0);
        let mut want_dg = uniform(&mut r, width, 1.0);
        let mut want_db = uniform(&mut r, width, 1.0);
        let bias_start = uniform(&mut r, width, 1.0);
        let dx_d = up::<f32>(gpu, &want_dx);
        let grads = up::<f32>(
            gpu,
            &[want_dg.clone(), want_db.clone(), bias_start.clone()].concat(),
        );
        layernorm::layernorm_backward(
            &mut want_dx,
            &mut want_dg,
            &mut want_db,
            &dy,
            &x,
            &stats,
            &gamma,
        );
        let want_bias = column_sums(&want_dx, width, &bias_start);
        let dy_d = up::<T>(gpu, &dy);
        let copy: CudaSlice<T> = gpu.zeros(rows * width, "dx copy").unwrap();
        let gp = dev(gpu, &grads);
        // dgamma, dbeta and dx column partials for up to REDUCE_CHUNKS chunks of rows.
        let s: CudaSlice<f32> = gpu.zeros(3 * REDUCE_CHUNKS * width, "scratch").unwrap();
        k.layernorm_backward(
            dev(gpu, &x_d),
            dev(gpu, &dy_d),
            dev(gpu, &g_d),
            dev(gpu, &mean),
            dev(gpu, &rstd),
            dev(gpu, &dx_d),
            Some(dev(gpu, &copy)),
            gp.range(0..width).unwrap(),
            gp.range(width..2 * width).unwrap(),
            Some(gp.range(2 * width..3 * width).unwrap()),
            dev(gpu, &s),
            rows,
            width,
        )
        .unwrap();
        let got = down(gpu, &grads);
        let got_dx = down(gpu, &dx_d);
        report.close(
            &format!("dx (accumulated) {shape}"),
            &got_dx,
            &want_dx,
            2e-5,
        );
        report.close(
            &format!("dx in storage type {shape}"),
            &down(gpu, &copy),
            &round_to::<T>(&got_dx),
            0.0,
        );
        report.close(
            &format!("column sums of dx (accumulated) {shape}"),
            &got[2 * width..],
            &want_bias,
            2e-5,
        );
        report.close(
            &format!("dgamma (accumulated) {shape}"),
            &got[..width],
            &want_dg,
            2e-5,
        );
        report.close(
            &format!("dbeta (accumulated) {shape}"),
            &got[width..2 * width],
            &want_db,
            2e-5,
        );
    }
    report.finish();
}

#[test]
fn layernorm_matches_cpu() {
    both("layernorm", |gpu, test, k32, k16| {
        layernorm_case(gpu, k32, format!("{test} f32"));
        layernorm_case(gpu, k16, format!("{test} bf16"));
    });
}

fn gelu_case<T: Storage>(gpu: &Gpu, k: &Kernels<T>, title: String) {
    // 333 rows: not a multiple of any chunk; 203 columns: not of the 8-value packs.
    for (rows, cols) in [(333, 200), (333, 203)] {
        gelu_shape(gpu, k, &title, rows, cols);
    }
}

fn gelu_shape<T: Storage>(gpu: &Gpu, k: &Kernels<T>, title: &str, rows: usize, cols: usize) {
    let mut r = rng(17);
    let x = round_to::<T>(&uniform(&mut r, rows * cols, 4.0));
    let (mut want_act, mut cdf) = (vec![0.0; x.len()], vec![0.0; x.len()]);
    gelu::gelu_forward(&mut want_act, &mut cdf, &x);
    let pre_d = up::<T>(gpu, &x);
    let act: CudaSlice<T> = gpu.zeros(x.len(), "act").unwrap();
    k.gelu_forward(dev(gpu, &pre_d), dev(gpu, &act), rows, cols)
        .unwrap();
    let mut report = Report::new(format!("{title} [{rows}, {cols}]"));
    report.close(
        "gelu(pre)",
        &down(gpu, &act),
        &round_to::<T>(&want_act),
        tol::<T>(),
    );

    let dact = round_to::<T>(&uniform(&mut r, x.len(), 1.0));
    let mut want = dact.clone();
    gelu::gelu_backward(&mut want, &x, &cdf);
    let grad = up::<T>(gpu, &dact);
    let bias_start = uniform(&mut r, cols, 1.0);
    let bias_grad = up::<f32>(gpu, &bias_start);
    let scratch: CudaSlice<f32> = gpu.zeros(REDUCE_CHUNKS * cols, "scratch").unwrap();
    k.gelu_backward(
        dev(gpu, &pre_d),
        dev(gpu, &grad),
        rows,
        cols,
        dev(gpu, &scratch),
        dev(gpu, &bias_grad),
    )
    .unwrap();
    let got = down(gpu, &grad);
    report.close("d pre", &got, &round_to::<T>(&want), tol::<T>());
    // The bias gradient sums d pre as stored, so it is checked against the GPU's own.
    report.close(
        "fc1 bias gradient (accumulated)",
        &down(gpu, &bias_grad),
        &column_sums(&got, cols, &bias_start),
        1e-5,
    );
    report.finish();
}

#[test]
fn gelu_matches_cpu() {
    both("gelu", |gpu, test, k32, k16| {
        gelu_case(gpu, k32, format!("{test} f32"));
        gelu_case(gpu, k16, format!("{test} bf16"));
    });
}

fn masked_mse_case<T: Storage>(gpu: &Gpu, k: &Kernels<T>, title: String) {
    let (rows, cols) = (250, 48);
    let mut r = rng(18);
    let pred = round_to::<T>(&uniform(&mut r, rows * cols, 2.0));
    let bias = uniform(&mut r, cols, 0.5);
    let target = uniform(&mut r, rows * cols, 2.0);
    let with_bias: Vec<f32> = pred
        .iter()
        .enumerate()
        .map(|(i, v)| v + bias[i % cols])
        .collect();
    let mut want_d = vec![0.0; pred.len()];
    let want_loss = loss::masked_mse(&mut want_d, &with_bias, &target, 0.25);
    let (pred_d, bias_d, target_d) = (
        up::<T>(gpu, &pred),
        up::<f32>(gpu, &bias),
        up::<f32>(gpu, &target),
    );
    let dpred: CudaSlice<T> = gpu.zeros(pred.len(), "dpred").unwrap();
    let row_loss: CudaSlice<f32> = gpu.zeros(rows, "row loss").unwrap();
    let loss: CudaSlice<f32> = gpu.zeros(1, "loss").unwrap();
    k.masked_mse(
        dev(gpu, &pred_d),
        dev(gpu, &bias_d),
        dev(gpu, &target_d),
        dev(gpu, &dpred),
        dev(gpu, &row_loss),
        dev(gpu, &loss),
        rows,
        cols,
        0.25,
    )
    .unwrap();
    let mut report = Report::new(title);
    report.scalar("loss", down(gpu, &loss)[0] as f64, want_loss as f64, 1e-5);
    report.close(
        "dpred (grad_scale 0.25)",
        &down(gpu, &dpred),
        &round_to::<T>(&want_d),
        tol::<T>(),
    );
    report.finish();
}

#[test]
fn masked_mse_matches_cpu() {
    both("masked_mse", |gpu, test, k32, k16| {
        masked_mse_case(gpu, k32, format!("{test} f32"));
        masked_mse_case(gpu, k16, format!("{test} bf16"));
    });
}

fn adamw_case<T: Storage>(gpu: &Gpu, k: &Kernels<T>, title: String) {
    let n = 100_003;
    let mut r = rng(19);
    let mut params = uniform(&mut r, n, 1.0);
    let grads = uniform(&mut r, n, 0.1);
    let mut m = uniform(&mut r, n, 0.01);
    let mut v: Vec<f32> = uniform(&mut r, n, 1e-3).iter().map(|x| x.abs()).collect();
    let decay: Vec<f32> = (0..n).map(|i| (i % 3 == 0) as u8 as f32).collect();
    let step = AdamWStep {
        t: 7,
        lr: 3e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.05,
        grad_scale: 0.5,
    };
    let (p_d, g_d, m_d, v_d) = (
        up::<f32>(gpu, &params),
        up::<f32>(gpu, &grads),
        up::<f32>(gpu, &m),
        up::<f32>(gpu, &v),
    );
    let mask: Vec<u8> = decay.iter().map(|&x| x as u8).collect();
    let mask_d = gpu.upload(&mask, "mask").unwrap();
    let shadow: CudaSlice<T> = gpu.zeros(n, "shadow").unwrap();
    lomar::train::optim::adamw_update(&mut params, &grads, &mut m, &mut v, &decay, &step);
    let (hyper, state) = lomar::cuda::step::single_update(&step).unwrap();
    let (hyper_d, state_d) = (up::<f32>(gpu, &hyper), up::<f32>(gpu, &state));
    k.adamw(
        dev(gpu, &p_d),
        dev(gpu, &g_d),
        dev(gpu, &m_d),
        dev(gpu, &v_d),
        dev(gpu, &mask_d),
        dev(gpu, &shadow),
        dev(gpu, &hyper_d),
        dev(gpu, &state_d),
    )
    .unwrap();
    let mut report = Report::new(title);
    // Same operations in the same order, none fused: bit-exact up to sqrt/div rounding.
    report.close("params", &down(gpu, &p_d), &params, 1e-6);
    report.close("m", &down(gpu, &m_d), &m, 1e-6);
    report.close("v", &down(gpu, &v_d), &v, 1e-6);
    report.close(
        "weights in storage type",
        &down(gpu, &shadow),
        &round_to::<T>(&params),
        1e-6,
    );
    report.finish();
}

#[test]
fn adamw_matches_cpu() {
    both("adamw", |gpu, test, k32, k16| {
        adamw_case(gpu, k32, format!("{test} f32"));
        adamw_case(gpu, k16, format!("{test} bf16"));
    });
}

fn column_sums(x: &[f32], cols: usize, start: &[f32]) -> Vec<f32> {
    let mut sums: Vec<f64> = start.iter().map(|&v| v as f64).collect();
    for row in x.chunks(cols) {
        sums.iter_mut().zip(row).for_each(|(s, &v)| *s += v as f64);
    }
    sums.into_iter().map(|v| v as f32).collect()
}

fn reductions_case<T: Storage>(gpu: &Gpu, k: &Kernels<T>, title: String) {
    let mut report = Report::new(title);
    let s: CudaSlice<f32> = gpu.zeros(REDUCE_CHUNKS * 2056, "scratch").expect("scratch");
    for n in [1, 1000, 3_000_001] {
        let mut r = rng(21);
        let x = uniform(&mut r, n, 1.0);
        let want: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
        let (x_d, out): (CudaSlice<f32>, CudaSlice<f32>) =
            (up(gpu, &x), gpu.zeros(1, "out").unwrap());
        k.sum_squares(dev(gpu, &x_d), dev(gpu, &s), dev(gpu, &out))
            .unwrap();
        report.scalar(
            &format!("sum_squares n={n}"),
            down(gpu, &out)[0] as f64,
            want,
            1e-5,
        );
    }
    report.finish();
}

#[test]
fn reductions_match_host() {
    both("reductions", |gpu, test, k32, k16| {
        reductions_case(gpu, k32, format!("{test} f32"));
        reductions_case(gpu, k16, format!("{test} bf16"));
    });
}

fn elementwise_case<T: Storage>(gpu: &Gpu, k: &Kernels<T>, title: String) {
    // 96 columns take the 16-byte path, 45 the scalar one.
    for (rows, cols) in [(777, 96), (777, 45)] {
        elementwise_shape(gpu, k, &title, rows, cols);
    }
}

fn elementwise_shape<T: Storage>(gpu: &Gpu, k: &Kernels<T>, title: &str, rows: usize, cols: usize) {
    let n = rows * cols;
    let x = uniform(&mut rng(22), n, 1.0);
    let x_d = up::<f32>(gpu, &x);
    let mut report = Report::new(format!("{title} [{rows}, {cols}]"));
    let cast: CudaSlice<T> = gpu.zeros(n, "cast").unwrap();
    k.cast_from_f32(dev(gpu, &x_d), dev(gpu, &cast), n).unwrap();
    report.close("cast_from_f32", &down(gpu, &cast), &round_to::<T>(&x), 0.0);
    report.finish();
}

#[test]
fn elementwise_matches_host() {
    both("elementwise", |gpu, test, k32, k16| {
        elementwise_case(gpu, k32, format!("{test} f32"));
        elementwise_case(gpu, k16, format!("{test} bf16"));
    });
}

/// GEMM tolerance: fp32 sums in a different order; bf16 rounds only the stored output
/// (inputs are rounded for the reference too).
fn gemm_tol<T: Storage>() -> f64 {
    if T::SUFFIX == "f32" {
        1e-5
    } else {
        1e-2
    }
}

/// A buffer of another stream has a free that is not ordered after lomar's launches, so
/// it is refused, by the launchers' address and by the copies alike.
#[test]
fn buffers_of_another_stream_are_refused() {
    let Some(gpu) = gpu_or_skip("buffers_of_another_stream_are_refused") else {
        return;
    };
    let other = gpu.ctx().new_stream().expect("a second stream");
    let mut foreign = other.alloc_zeros::<f32>(4).expect("a buffer on it");
    let err = gpu.ptr(&foreign).unwrap_err();
    assert!(err.to_string().contains("another CUDA stream"), "{err}");
    assert!(gpu.write(&[1.0; 4], &mut foreign, "foreign").is_err());
    let own = gpu.zeros::<f32>(4, "own").unwrap();
    assert!(gpu.ptr(&own).is_ok());
}

/// The linear layers' products (cuBLASLt through [`LinearLayers`]) against the CPU linear
/// op, with every operand and the bias at an odd offset inside its buffer (so the plans
/// are made for 2- or 4-byte alignment, as tensors inside the flat parameter buffer are,
/// and the bias takes the aligned copy), two micro-batches accumulating dW and db, and
/// each plan made once.
fn blaslt_case<T: Storage>(gpu: &Gpu, lt: &BlasLt, k: &Kernels<T>, title: String) {
    let mut report = Report::new(title);
    let s = Linear {
        rows: 203,
        inp: 45,
        out: 77,
    };
    let mut r = rng(29);
    let x = round_to::<T>(&uniform(&mut r, s.rows * s.inp, 1.0));
    let w = round_to::<T>(&uniform(&mut r, s.out * s.inp, 1.0));
    let dys = [0, 1].map(|_| round_to::<T>(&uniform(&mut r, s.rows * s.out, 1.0)));
    let bias = uniform(&mut r, s.out, 1.0);
    let x_in = uniform(&mut r, s.rows * s.out, 1.0);
    let dw_start = uniform(&mut r, s.out * s.inp, 1.0);
    let db_start = uniform(&mut r, s.out, 1.0);
    let mut want_y = vec![0.0; s.rows * s.out];
    linear::linear_forward(&mut want_y, &x, &w, &bias);
    let mut want_resid = vec![0.0; x_in.len()];
    linear::linear_forward_residual(&mut want_resid, &x_in, &x, &w, &bias);
    let mut want_dx = vec![0.0; s.rows * s.inp];
    let (mut want_dw, mut want_db) = (dw_start.clone(), db_start.clone());
    for dy in &dys {
        linear::linear_backward(Some(&mut want_dx), &mut want_dw, &mut want_db, dy, &x, &w);
    }

    // Each buffer holds one value before the operand, which starts at element 1.
    let pad = |v: &[f32]| [&[0.0][..], v].concat();
    let (x_d, w_d) = (up::<T>(gpu, &pad(&x)), up::<T>(gpu, &pad(&w)));
    let dys_d = dys.each_ref().map(|dy| up::<T>(gpu, &pad(dy)));
    let (bias_d, x_in_d) = (up::<f32>(gpu, &pad(&bias)), up::<f32>(gpu, &pad(&x_in)));
    let (dw, db) = (
        up::<f32>(gpu, &pad(&dw_start)),
        up::<f32>(gpu, &pad(&db_start)),
    );
    let y: CudaSlice<T> = gpu.zeros(1 + s.rows * s.out, "y").unwrap();
    let resid: CudaSlice<f32> = gpu.zeros(1 + s.rows * s.out, "x_out").unwrap();
    let dx: CudaSlice<T> = gpu.zeros(1 + s.rows * s.inp, "dx").unwrap();
    let scratch: CudaSlice<f32> = gpu.zeros(s.out, "scratch").unwrap();
    let lin = LinearLayers {
        lt,
        kernels: k,
        scratch: dev(gpu, &scratch),
    };
    let before = lt.plans();
    let forward = || {
        lin.linear_forward(
            off(gpu, &y),
            off(gpu, &x_d),
            off(gpu, &w_d),
            Some(off(gpu, &bias_d)),
            s,
        )
        .unwrap()
    };
    forward();
    lin.linear_forward_residual(
        off(gpu, &resid),
        off(gpu, &x_in_d),
        off(gpu, &x_d),
        off(gpu, &w_d),
        off(gpu, &bias_d),
        s,
    )
    .unwrap();
    for dy in &dys_d {
        lin.linear_backward(
            Some(off(gpu, &dx)),
            off(gpu, &dw),
            Some(off(gpu, &db)),
            off(gpu, dy),
            off(gpu, &x_d),
            off(gpu, &w_d),
            s,
        )
        .unwrap();
    }
    assert_eq!(lt.plans(), before + 4, "one plan per product");
    forward();
    assert_eq!(lt.plans(), before + 4, "the forward's plan was made again");
    let skip = |v: Vec<f32>| v[1..].to_vec();
    report.close(
        "y = x·Wᵀ + b (BIAS epilogue, f32 bias)",
        &skip(down(gpu, &y)),
        &round_to::<T>(&want_y),
        gemm_tol::<T>(),
    );
    report.close(
        "x_out = x_in + x·Wᵀ + b (fp32 C ≠ D)",
        &skip(down(gpu, &resid)),
        &want_resid,
        1e-5,
    );
    report.close(
        "dx = dy·W",
        &skip(down(gpu, &dx)),
        &round_to::<T>(&want_dx),
        gemm_tol::<T>(),
    );
    report.close(
        "dW += dyᵀ·x (fp32, two micro-batches)",
        &skip(down(gpu, &dw)),
        &want_dw,
        1e-5,
    );
    report.close(
        "db += Σ dy (BGRADB, then the ordered add; two micro-batches)",
        &skip(down(gpu, &db)),
        &want_db,
        1e-5,
    );
    // cuBLASLt itself is never handed a vector under 16-byte alignment.
    let err = lt
        .linear_forward(
            off(gpu, &x_d),
            off(gpu, &w_d),
            Some(off(gpu, &bias_d)),
            off(gpu, &y),
            s,
        )
        .unwrap_err();
    assert!(format!("{err:#}").contains("aligned"), "{err:#}");
    report.finish();
}

/// cuBLASLt has an algorithm (one heuristic query each) for every product of every layer
/// of every LoMaR preset at batch 256, in both storage types, with operands aligned to
/// 256 bytes and to only their element size, as tensors inside the flat buffers may be.
#[test]
fn blaslt_plans_every_preset_layer() {
    let Some(gpu) = gpu_or_skip("blaslt_plans_every_preset_layer") else {
        return;
    };
    let lt = BlasLt::new(&gpu).expect("cuBLASLt handle");
    let bytes = |l: &Layout| match l.dtype {
        Dtype::F32 => 4,
        Dtype::Bf16 => 2,
    };
    for name in PRESETS.iter().filter(|n| !n.starts_with("mae_")) {
        let m = preset(name).unwrap();
        for (layer, s) in LayerShapes::new(&m, 256 * m.windows_per_image).all() {
            for elem in [Dtype::F32, Dtype::Bf16] {
                for g in GemmDesc::every_product(s, elem) {
                    let least = [&g.a, &g.b, &g.c, &g.d].map(bytes);
                    for align in [[256; 4], least] {
                        lt.prepare(&g, align).unwrap_or_else(|e| {
                            panic!("{name} {layer} {elem:?} at alignments {align:?}: {e:#}")
                        });
                    }
                }
            }
        }
    }
}

#[test]
fn blaslt_gemms_match_cpu() {
    both("blaslt_gemms", |gpu, test, k32, k16| {
        let lt = BlasLt::new(gpu).expect("cuBLASLt handle");
        blaslt_case(gpu, &lt, k32, format!("{test} f32"));
        blaslt_case(gpu, &lt, k16, format!("{test} bf16"));
        // A shape mistake is an error naming the operand, not a fault.
        let s = Linear {
            rows: 4,
            inp: 3,
            out: 2,
        };
        let small: CudaSlice<f32> = gpu.zeros(5, "small").unwrap();
        let err = lt
            .linear_backward_input(dev(gpu, &small), dev(gpu, &small), dev(gpu, &small), s)
            .unwrap_err();
        assert!(format!("{err:#}").contains("GEMM B"), "{err:#}");
    });
}

/// Batches through the two pinned upload buffers in turn: the compute stream, made to wait
/// for each copy, reads back each round's own values, although the copies run on their own
/// stream and every refill of a buffer waits for its previous copy and reader.
#[test]
fn pixel_uploads_alternate_and_wait_for_their_copies() {
    let Some(gpu) = gpu_or_skip("pixel_uploads_alternate_and_wait_for_their_copies") else {
        return;
    };
    let n = 1 << 22;
    let mut upload = PixelUpload::<u8>::new(&gpu, n, "test pixels").unwrap();
    assert_eq!(upload.len(), n);
    for round in 0..5usize {
        upload
            .stage(&gpu, "test pixels", |out| {
                out.iter_mut()
                    .enumerate()
                    .for_each(|(i, v)| *v = (i + round) as u8)
            })
            .unwrap();
        let got = gpu.read(upload.device(), n, "test pixels").unwrap();
        assert!(
            got.iter().enumerate().all(|(i, &v)| v == (i + round) as u8),
            "round {round}: the compute stream read another round's pixels"
        );
        upload.mark_read(&gpu).unwrap();
    }
}

/// The device's time of a step is there once a step has finished, and within the host's.
#[test]
fn device_step_time_follows_a_step() {
    if gpu_or_skip("device_step_time_follows_a_step").is_none() {
        return;
    }
    let m = preset("tiny").unwrap();
    let params = ParamLayout::new(&m).init(1);
    let mut backend = CudaBackend::new(&m, params, Precision::Bf16).unwrap();
    assert!(backend.device_step_ms().unwrap().is_none());
    let batch = sample_batch(&m, 2, 3);
    let started = std::time::Instant::now();
    backend.zero_grads().unwrap();
    backend.forward_backward(&batch, 1.0).unwrap();
    backend.grad_norm().unwrap();
    backend.adamw_step(&common::adamw(1, 1e-4)).unwrap();
    backend.synchronize().unwrap();
    let host_ms = started.elapsed().as_secs_f64() * 1e3;
    let device_ms = backend.device_step_ms().unwrap().expect("a finished step");
    assert!(
        device_ms > 0.0 && device_ms <= host_ms,
        "{device_ms} vs {host_ms} ms"
    );
}
