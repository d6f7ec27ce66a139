//! MAE on the GPU against the CPU reference (docs/DESIGN.md §7): the loss and every
//! parameter gradient within 1e-4 in fp32 mode and 3e-2 in bf16 mode (relative error =
//! max-abs error / max-abs value per tensor), and a few AdamW steps ending close. The GPU
//! tests skip without a GPU; the slot maps of the token placements and the constructor's
//! refusals are checked everywhere.

mod common;

use common::{compare_tensors, gpu_or_skip, rng, sample_batch, test_params, Report};
use lomar::backend::{Backend, Precision};
use lomar::config::{mae_recipe, preset, DecoderConfig, Method, ModelConfig};
use lomar::cpu::mae::pos_embed::sincos_pos_embed;
use lomar::cpu::ops::tokens;
use lomar::cpu::CpuBackend;
use lomar::cuda::{decoder_pos_rows, CudaBackend, MaeSlots};
use lomar::params::{standard_normal, ParamLayout};

fn grad_tol(p: Precision) -> f64 {
    match p {
        Precision::Fp32 => 1e-4,
        Precision::Bf16 => 3e-2,
    }
}

/// The tiny MAE (D 64, 2 heads of 32; decoder 32 wide, 2 blocks, 1 head), and a 16-pixel
/// one with heads of 64 in the encoder, 3 decoder blocks of two 32-wide heads, 75% of 36
/// patches masked (V = 9, decoder T = 37).
fn models() -> Vec<(&'static str, ModelConfig)> {
    let p16 = mae_recipe(ModelConfig {
        image: 96,
        patch: 16,
        window: 6,
        windows_per_image: 1,
        mask_ratio: 0.75,
        depth: 2,
        width: 128,
        heads: 2,
        norm_pix: true,
        method: Method::Lomar,
        decoder: None,
    });
    let p16 = ModelConfig {
        decoder: Some(DecoderConfig {
            width: 64,
            depth: 3,
            heads: 2,
        }),
        ..p16
    };
    vec![("tiny mae", mae_recipe(tiny())), ("p16 mae", p16)]
}

fn tiny() -> ModelConfig {
    preset("tiny").expect("the tiny preset")
}

/// Initialised parameters plus noise, so that biases, tokens and LayerNorm shifts are not
/// zero and every term of the forward matters.
fn gradient_parity(precision: Precision) {
    let test = format!("mae gradient_parity {precision}");
    if gpu_or_skip(&test).is_none() {
        return;
    }
    for (name, m) in models() {
        let params = test_params(&m, 5);
        let batch = sample_batch(&m, 3, 6);
        let grad_scale = 0.5;
        let mut cpu = CpuBackend::new(&m, params.clone()).unwrap();
        let mut gpu = CudaBackend::new(&m, params, precision).expect("opening the CUDA backend");
        let mut report = Report::new(format!("{test} {name} on {}", gpu.device_name()));
        let tol = grad_tol(precision);
        // Twice, so the second pass runs on reused buffers and accumulates.
        for pass in 1..=2 {
            let want_loss = cpu.forward_backward(&batch, grad_scale).unwrap();
            let got_loss = gpu.forward_backward(&batch, grad_scale).unwrap();
            report.scalar(
                &format!("pass {pass} loss"),
                got_loss as f64,
                want_loss as f64,
                tol,
            );
        }
        let (want, got) = (cpu.grads().unwrap(), gpu.grads().unwrap());
        compare_tensors(&mut report, cpu.layout(), "grad", &got, &want, |_| tol);
        report.finish();
    }
}

#[test]
fn mae_gradients_match_cpu_fp32() {
    gradient_parity(Precision::Fp32);
}

#[test]
fn mae_gradients_match_cpu_bf16() {
    gradient_parity(Precision::Bf16);
}

/// Five AdamW steps of two micro-batches on both backends from the same start.
#[test]
fn mae_training_matches_cpu_fp32() {
    let test = "mae training_parity fp32";
    if gpu_or_skip(test).is_none() {
        return;
    }
    let m = mae_recipe(tiny());
    let params = test_params(&m, 7);
    let mut cpu = CpuBackend::new(&m, params.clone()).unwrap();
    let mut gpu = CudaBackend::new(&m, params, Precision::Fp32).unwrap();
    for step in 1..=5u64 {
        for backend in [&mut cpu as &mut dyn Backend, &mut gpu] {
            backend.zero_grads().unwrap();
            for micro in 0..2 {
                let batch = sample_batch(&m, 2, 100 * step + micro);
                backend.forward_backward(&batch, 0.5).unwrap();
            }
            backend.adamw_step(&common::adamw(step, 1e-4)).unwrap();
        }
    }
    let mut report = Report::new(format!("{test} on {}", gpu.device_name()));
    let (want, got) = (cpu.params().unwrap(), gpu.params().unwrap());
    compare_tensors(&mut report, cpu.layout(), "param", &got, &want, |_| 1e-3);
    report.finish();
}

/// Runs everywhere: a decoder whose head dim has no attention kernel is refused before the
/// GPU is opened, naming the decoder.
#[test]
fn constructor_refuses_decoder_head_dims_without_a_kernel() {
    let mut m = mae_recipe(tiny());
    m.decoder = Some(DecoderConfig {
        width: 32,
        depth: 2,
        heads: 2,
    });
    let params = ParamLayout::new(&m).init(0);
    let err = CudaBackend::new(&m, params, Precision::Fp32)
        .err()
        .expect("decoder head dim 16 has no kernel");
    assert!(err.to_string().contains("decoder head dim 16"), "{err}");
}

/// What `place_tokens_forward` computes (kernels/tokens.cu), on the host: row `r` is
/// source row `slot[r]` plus `bias`, or `fill`, plus position row `pos_row[r]`.
fn place(
    src: &[f64],
    bias: &[f64],
    fill: &[f64],
    pos: &[f64],
    slot: &[i32],
    pos_row: &[i32],
) -> Vec<f64> {
    let d = bias.len();
    let mut x = Vec::with_capacity(slot.len() * d);
    for (&s, &p) in slot.iter().zip(pos_row) {
        let q = &pos[p as usize * d..][..d];
        for c in 0..d {
            let v = match usize::try_from(s) {
                Ok(row) => src[row * d + c] + bias[c],
                Err(_) => fill[c],
            };
            x.push(v + q[c]);
        }
    }
    x
}

/// Runs everywhere: the slot maps of a sampled batch make the placements compute what the
/// CPU's token moves compute (cls prepended to the kept patches plus their positions; the
/// encoded rows put back among mask tokens plus the decoder's positions), and every source
/// row is read exactly once, as the backward's unsynchronised writes need.
#[test]
fn slot_maps_reproduce_the_cpu_token_moves() {
    for (_, m) in models() {
        let images = 3;
        let batch = sample_batch(&m, images, 11);
        let (n, v, d) = (m.window_area(), m.visible_per_window(), m.width);
        let dd = m.decoder.unwrap().width;
        let slots = MaeSlots::new(&batch, &m);
        let mut r = rng(12);
        let mut noise = |len: usize| {
            (0..len)
                .map(|_| standard_normal(&mut r))
                .collect::<Vec<f64>>()
        };
        let (emb, bias, cls) = (noise(images * v * d), noise(d), noise(d));
        let (enc, dbias, mask) = (noise(images * (1 + v) * dd), noise(dd), noise(dd));
        let (pos, dec_pos) = (
            sincos_pos_embed(d, m.grid()),
            sincos_pos_embed(dd, m.grid()),
        );
        let visible = batch.visible_slots(&m);

        // Encoder: embedded patches plus bias plus their grid cell's position, cls first.
        let mut rows: Vec<f64> = emb
            .chunks(d)
            .map(|row| {
                row.iter()
                    .zip(&bias)
                    .map(|(a, b)| a + b)
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
            .concat();
        for (b, image) in visible.chunks(n).enumerate() {
            for (patch, kept) in image.iter().enumerate() {
                if let Some(j) = kept {
                    let row = &mut rows[(b * v + *j as usize) * d..][..d];
                    row.iter_mut()
                        .zip(&pos[(1 + patch) * d..])
                        .for_each(|(a, q)| *a += q);
                }
            }
        }
        let mut want = vec![0.0; images * (1 + v) * d];
        tokens::prepend_cls_forward(&mut want, &cls, &rows);
        let got = place(&emb, &bias, &cls, &pos, &slots.enc_slot, &slots.enc_pos_row);
        assert_eq!(got, want, "encoder input");

        // Decoder: the encoded rows (plus decoder_embed's bias) back at their patches.
        let biased: Vec<f64> = enc
            .chunks(dd)
            .flat_map(|row| {
                row.iter()
                    .zip(&dbias)
                    .map(|(a, b)| a + b)
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut want = vec![0.0; images * (1 + n) * dd];
        tokens::unshuffle_tokens_forward(&mut want, &mask, &biased, &visible, n);
        for seq in want.chunks_mut((1 + n) * dd) {
            seq.iter_mut().zip(&dec_pos).for_each(|(a, q)| *a += q);
        }
        let pos_rows = decoder_pos_rows(&m, images);
        let got = place(&enc, &dbias, &mask, &dec_pos, &slots.dec_slot, &pos_rows);
        assert_eq!(got, want, "decoder input");

        for (map, sources) in [
            (&slots.enc_slot, images * v),
            (&slots.dec_slot, images * (1 + v)),
        ] {
            let mut used: Vec<i32> = map.iter().copied().filter(|&s| s >= 0).collect();
            used.sort_unstable();
            assert_eq!(used, (0..sources as i32).collect::<Vec<_>>());
        }
    }
}
