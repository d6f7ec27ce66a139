//! The CPU reference checked against itself from first principles: every op's backward and
//! the whole model's gradient against central finite differences in f64, the forward
//! against a loop-by-loop transcription of docs/DESIGN.md, and the f32 backend against f64.

use lomar::backend::Backend;
use lomar::config::{preset, ModelConfig};
use lomar::cpu::model;
use lomar::cpu::ops::attention::{self, RelativeIndex};
use lomar::cpu::ops::{gelu, layernorm, linear, loss, tokens, window_gather};
use lomar::cpu::CpuBackend;
use lomar::data::batch::{Batch, Pixels};
use lomar::params::{standard_normal, ParamLayout};
use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

mod common;
use common::fd::{dot, randn, FdCheck};
use common::naive::{block_rest, dense, norm, patch_target, squared_error};
use common::sample_batch;

/// `common::random_params` with the relative-bias tables at standard deviation 0.5 and the
/// other moved tensors at 0.1.
fn random_params(m: &ModelConfig, seed: u64) -> Vec<f64> {
    common::random_params(
        m,
        seed,
        |name| {
            if name.contains("relative") {
                0.5
            } else {
                0.1
            }
        },
    )
}

/// Ops: relative 1e-6 plus absolute 1e-9.
const OP_TOL: FdCheck = FdCheck {
    rel: 1e-6,
    abs: 1e-9,
};

fn every(_: usize, len: usize) -> Vec<usize> {
    (0..len).collect()
}

#[test]
fn linear_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (n, d_in, d_out) = (5, 4, 3);
    let mut inputs = vec![
        randn(&mut rng, n * d_in, 1.0),
        randn(&mut rng, d_out * d_in, 1.0),
        randn(&mut rng, d_out, 1.0),
    ];
    let weights = randn(&mut rng, n * d_out, 1.0);
    let f = |inp: &[Vec<f64>]| {
        let mut y = vec![0.0; n * d_out];
        linear::linear_forward(&mut y, &inp[0], &inp[1], &inp[2]);
        dot(&y, &weights)
    };
    let mut dx = vec![f64::NAN; n * d_in];
    // Parameter gradients accumulate: start from non-zero values and subtract them.
    let (mut dw, mut db) = (vec![1.0; d_out * d_in], vec![2.0; d_out]);
    linear::linear_backward(
        Some(&mut dx),
        &mut dw,
        &mut db,
        &weights,
        &inputs[0],
        &inputs[1],
    );
    dw.iter_mut().for_each(|v| *v -= 1.0);
    db.iter_mut().for_each(|v| *v -= 2.0);
    OP_TOL.run("linear", &mut inputs, &[dx, dw, db], every, f);

    // forward_residual adds exactly what forward writes to the residual.
    let mut y = vec![0.0; n * d_out];
    linear::linear_forward(&mut y, &inputs[0], &inputs[1], &inputs[2]);
    let residual: Vec<f64> = (0..n * d_out).map(|i| 0.5 + i as f64).collect();
    let mut sum = vec![f64::NAN; n * d_out];
    linear::linear_forward_residual(&mut sum, &residual, &inputs[0], &inputs[1], &inputs[2]);
    for ((s, r), y) in sum.iter().zip(&residual).zip(&y) {
        assert!((s - r - y).abs() < 1e-12, "{s} vs {r} + {y}");
    }
}

#[test]
fn layer_norm_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (n, d) = (4, 6);
    let mut inputs = vec![
        randn(&mut rng, n * d, 2.0),
        randn(&mut rng, d, 0.3).iter().map(|v| 1.0 + v).collect(),
        randn(&mut rng, d, 0.3),
    ];
    let weights = randn(&mut rng, n * d, 1.0);
    let f = |inp: &[Vec<f64>]| {
        let mut y = vec![0.0; n * d];
        layernorm::layernorm_forward(&mut y, &inp[0], &inp[1], &inp[2]);
        dot(&y, &weights)
    };
    let mut y = vec![0.0; n * d];
    let stats = layernorm::layernorm_forward(&mut y, &inputs[0], &inputs[1], &inputs[2]);
    // dx accumulates (the residual stream): start it at 3 and subtract.
    let (mut dx, mut dg, mut db) = (vec![3.0; n * d], vec![0.0; d], vec![0.0; d]);
    layernorm::layernorm_backward(
        &mut dx, &mut dg, &mut db, &weights, &inputs[0], &stats, &inputs[1],
    );
    dx.iter_mut().for_each(|v| *v -= 3.0);
    OP_TOL.run("layer_norm", &mut inputs, &[dx, dg, db], every, f);
}

/// softmax(q·kᵀ/√d + bias)·v for one sequence, loop by loop.
fn naive_attention(qkv: &[f64], table: &[f64], k: usize, width: usize, heads: usize) -> Vec<f64> {
    let t = 1 + k * k;
    let d = width / heads;
    let span = 2 * k - 1;
    let idx = |i: usize, j: usize| match (i, j) {
        (0, 0) => span * span + 2,
        (0, _) => span * span,
        (_, 0) => span * span + 1,
        _ => {
            let (yi, xi) = (((i - 1) / k) as i64, ((i - 1) % k) as i64);
            let (yj, xj) = (((j - 1) / k) as i64, ((j - 1) % k) as i64);
            ((yi - yj + k as i64 - 1) * span as i64 + (xi - xj + k as i64 - 1)) as usize
        }
    };
    let mut out = vec![0.0; t * width];
    for h in 0..heads {
        for i in 0..t {
            let logits: Vec<f64> = (0..t)
                .map(|j| {
                    let qk: f64 = (0..d)
                        .map(|c| {
                            qkv[i * 3 * width + h * d + c] * qkv[j * 3 * width + width + h * d + c]
                        })
                        .sum();
                    qk / (d as f64).sqrt() + table[idx(i, j) * heads + h]
                })
                .collect();
            let max = logits.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for c in 0..d {
                out[i * width + h * d + c] = (0..t)
                    .map(|j| e[j] / sum * qkv[j * 3 * width + 2 * width + h * d + c])
                    .sum();
            }
        }
    }
    out
}

#[test]
fn attention_forward_matches_the_definition_and_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (k, seqs, width, heads) = (3, 2, 8, 2);
    let rel = RelativeIndex::new(k);
    let t = rel.tokens;
    let mut inputs = vec![
        randn(&mut rng, seqs * t * 3 * width, 1.0),
        randn(&mut rng, rel.table_rows * heads, 0.5),
    ];
    let run = |inp: &[Vec<f64>]| {
        let mut out = vec![0.0; seqs * t * width];
        let mut probs = vec![0.0; seqs * heads * t * t];
        attention::attention_forward(&mut out, &mut probs, &inp[0], &inp[1], &rel, heads);
        (out, probs)
    };
    let (out, probs) = run(&inputs);
    for s in 0..seqs {
        let want = naive_attention(
            &inputs[0][s * t * 3 * width..][..t * 3 * width],
            &inputs[1],
            k,
            width,
            heads,
        );
        let got = &out[s * t * width..][..t * width];
        assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-12));
    }

    let weights = randn(&mut rng, seqs * t * width, 1.0);
    let f = |inp: &[Vec<f64>]| dot(&run(inp).0, &weights);
    let mut dqkv = vec![f64::NAN; inputs[0].len()];
    let mut dtable = vec![0.0; inputs[1].len()];
    attention::attention_backward(
        &mut dqkv,
        &mut dtable,
        &weights,
        &inputs[0],
        &probs,
        &rel,
        heads,
    );
    OP_TOL.run("attention", &mut inputs, &[dqkv, dtable], every, f);
}

#[test]
fn gelu_backward_matches_finite_differences() {
    let mut inputs = vec![(0..40)
        .map(|i| -4.0 + 0.2 * i as f64 + 0.013)
        .collect::<Vec<_>>()];
    let weights: Vec<f64> = (0..40).map(|i| 1.0 + (i as f64 * 0.37).sin()).collect();
    let run = |inp: &[Vec<f64>]| {
        let (mut y, mut cdf) = (vec![0.0; 40], vec![0.0; 40]);
        gelu::gelu_forward(&mut y, &mut cdf, &inp[0]);
        (y, cdf)
    };
    let f = |inp: &[Vec<f64>]| dot(&run(inp).0, &weights);
    let mut grad = weights.clone();
    gelu::gelu_backward(&mut grad, &inputs[0], &run(&inputs).1);
    OP_TOL.run("gelu", &mut inputs, &[grad], every, f);
}

#[test]
fn token_assembly_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (seqs, area, visible, d) = (3, 4, 2, 5);
    // Visible positions {1, 2}, {0, 3}, {2, 3}.
    let slots: Vec<Option<u32>> = [
        [None, Some(0), Some(1), None],
        [Some(0), None, None, Some(1)],
        [None, None, Some(0), Some(1)],
    ]
    .concat();
    let mut inputs = vec![
        randn(&mut rng, d, 1.0),
        randn(&mut rng, d, 1.0),
        randn(&mut rng, seqs * visible * d, 1.0),
    ];
    let weights = randn(&mut rng, seqs * (1 + area) * d, 1.0);
    let run = |inp: &[Vec<f64>]| {
        let mut x = vec![0.0; seqs * (1 + area) * d];
        tokens::assemble_tokens_forward(&mut x, &inp[0], &inp[1], &inp[2], &slots, area);
        x
    };
    let x = run(&inputs);
    // Sequence 1, position 3 is its second visible row; position 1 is masked.
    assert_eq!(
        x[(1 + area + 1 + 3) * d..][..d],
        inputs[2][(visible + 1) * d..][..d]
    );
    assert_eq!(x[(1 + area + 1 + 1) * d..][..d], inputs[1][..]);
    assert_eq!(x[(1 + area) * d..][..d], inputs[0][..]);

    let f = |inp: &[Vec<f64>]| dot(&run(inp), &weights);
    let (mut dcls, mut dmask) = (vec![0.0; d], vec![0.0; d]);
    let mut demb = vec![f64::NAN; seqs * visible * d];
    tokens::assemble_tokens_backward(&mut dcls, &mut dmask, &mut demb, &weights, &slots, area);
    OP_TOL.run("assemble", &mut inputs, &[dcls, dmask, demb], every, f);
}

#[test]
fn masked_selection_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (seqs, t, d) = (2, 5, 3);
    let mask_index = [0u32, 2, 1, 3];
    let mut inputs = vec![randn(&mut rng, seqs * t * d, 1.0)];
    let weights = randn(&mut rng, mask_index.len() * d, 1.0);
    let run = |inp: &[Vec<f64>]| {
        let mut picked = vec![0.0; mask_index.len() * d];
        tokens::gather_masked_tokens(&mut picked, &inp[0], &mask_index, t);
        picked
    };
    // Second sequence, mask index 3 → token 4.
    assert_eq!(run(&inputs)[3 * d..], inputs[0][(t + 4) * d..][..d]);
    let f = |inp: &[Vec<f64>]| dot(&run(inp), &weights);
    let mut dx = vec![0.0; seqs * t * d];
    tokens::scatter_masked_tokens(&mut dx, &weights, &mask_index, t);
    // cls and unmasked tokens get no gradient: check them all, not just the non-zero ones.
    OP_TOL.run("select_masked", &mut inputs, &[dx], every, f);
}

#[test]
fn masked_mse_gradient_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let target = randn(&mut rng, 3 * 12, 1.0);
    let mut inputs = vec![randn(&mut rng, 3 * 12, 1.0)];
    let mut dpred = vec![0.0; 36];
    let l = loss::masked_mse(&mut dpred, &inputs[0], &target, 1.0);
    assert_eq!(l, loss::masked_mse_loss(&inputs[0], &target));
    OP_TOL.run("mse", &mut inputs, &[dpred.clone()], every, |inp| {
        loss::masked_mse_loss(&inp[0], &target)
    });
    let mut scaled = vec![0.0; 36];
    loss::masked_mse(&mut scaled, &inputs[0], &target, 0.25);
    assert!(scaled
        .iter()
        .zip(&dpred)
        .all(|(s, d)| (s - 0.25 * d).abs() < 1e-15));
}

/// The forward written loop by loop from docs/DESIGN.md §1.2–1.3, one sequence and one token
/// at a time, sharing no code with the backend.
fn naive_loss(m: &ModelConfig, params: &[f64], batch: &Batch) -> f64 {
    let layout = ParamLayout::new(m);
    let get = |name: &str| &params[layout.get(name).unwrap().range()];
    let (p, k, d, img) = (m.patch, m.window, m.width, m.image);
    let mk = m.masked_per_window();
    let (mut total, mut count) = (0.0, 0usize);
    for s in 0..batch.sequences(m) {
        let image = s / m.windows_per_image;
        let (row0, col0) = (
            batch.window_origin[2 * s] as usize,
            batch.window_origin[2 * s + 1] as usize,
        );
        let masked = &batch.mask_index[s * mk..][..mk];
        let pixel = |i: usize, c: usize, y: usize, x: usize| {
            let (top, left) = ((row0 + i / k) * p, (col0 + i % k) * p);
            batch
                .images
                .value(c, ((image * 3 + c) * img + top + y) * img + left + x) as f64
        };
        let mut x: Vec<Vec<f64>> = vec![get("cls_token").to_vec()];
        for i in 0..k * k {
            if masked.contains(&(i as u32)) {
                x.push(get("mask_token").to_vec());
            } else {
                let mut v = Vec::new();
                for c in 0..3 {
                    for y in 0..p {
                        for xx in 0..p {
                            v.push(pixel(i, c, y, xx));
                        }
                    }
                }
                x.push(dense(
                    get("patch_embed.proj.weight"),
                    get("patch_embed.proj.bias"),
                    &v,
                ));
            }
        }
        for blk in 0..m.depth {
            let w = |n: &str| get(&format!("blocks.{blk}.{n}"));
            let ln1: Vec<Vec<f64>> = x
                .iter()
                .map(|r| norm(r, w("norm1.weight"), w("norm1.bias")))
                .collect();
            let qkv: Vec<Vec<f64>> = ln1
                .iter()
                .map(|r| dense(w("attn.qkv.weight"), w("attn.qkv.bias"), r))
                .collect();
            let mut table = vec![0.0; m.rel_bias_rows() * m.heads];
            table.copy_from_slice(w("attn.relative_position_bias_table"));
            let flat: Vec<f64> = qkv.concat();
            let attn = naive_attention(&flat, &table, k, d, m.heads);
            for (t, row) in x.iter_mut().enumerate() {
                block_rest(row, &attn[t * d..][..d], w);
            }
        }
        for &i in masked {
            let z = norm(&x[1 + i as usize], get("norm.weight"), get("norm.bias"));
            let pred = dense(get("head.weight"), get("head.bias"), &z);
            let target = patch_target(p, m.norm_pix, |c, y, x| pixel(i as usize, c, y, x));
            total += squared_error(&pred, &target);
            count += target.len();
        }
    }
    total / count as f64
}

#[test]
fn model_forward_matches_the_loop_by_loop_definition() {
    for norm_pix in [true, false] {
        let m = ModelConfig {
            norm_pix,
            ..preset("tiny").unwrap()
        };
        let params = random_params(&m, 7);
        let batch = sample_batch(&m, 2, 8);
        let got = model::loss(&m, &params, &batch).unwrap();
        let want = naive_loss(&m, &params, &batch);
        assert!((got - want).abs() <= 1e-12 * want, "{got} vs {want}");
    }
}

/// The whole model, relative 1e-5 plus absolute 1e-9: the loss passes through two blocks,
/// so the finite differences carry more rounding than a single op's.
const MODEL_TOL: FdCheck = FdCheck {
    rel: 1e-5,
    abs: 1e-9,
};

#[test]
fn model_gradient_matches_finite_differences_for_every_tensor() {
    let m = preset("tiny").unwrap();
    let layout = ParamLayout::new(&m);
    let params = random_params(&m, 11);
    let batch = sample_batch(&m, 2, 12);
    let mut grads = vec![0.0; params.len()];
    model::loss_and_grad(&m, &params, &batch, &mut grads, 1.0).unwrap();

    // One input per parameter tensor; the loss reassembles the flat buffer.
    let entries = layout.entries();
    let mut inputs: Vec<Vec<f64>> = entries.iter().map(|e| params[e.range()].to_vec()).collect();
    let analytic: Vec<Vec<f64>> = entries.iter().map(|e| grads[e.range()].to_vec()).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let picks: Vec<Vec<usize>> = entries
        .iter()
        .map(|e| sample(&mut rng, e.len(), 8.min(e.len())).into_vec())
        .collect();
    let f = |inp: &[Vec<f64>]| model::loss(&m, &inp.concat(), &batch).unwrap();
    MODEL_TOL.run("model", &mut inputs, &analytic, |t, _| picks[t].clone(), f);
}

#[test]
fn gradients_accumulate_scaled() {
    let m = preset("tiny").unwrap();
    let params = random_params(&m, 21);
    let batch = sample_batch(&m, 2, 22);
    let mut once = vec![0.0; params.len()];
    model::loss_and_grad(&m, &params, &batch, &mut once, 1.0).unwrap();
    let mut twice = vec![0.0; params.len()];
    model::loss_and_grad(&m, &params, &batch, &mut twice, 0.25).unwrap();
    model::loss_and_grad(&m, &params, &batch, &mut twice, 0.75).unwrap();
    let scale = once.iter().fold(0.0f64, |a, v| a.max(v.abs()));
    assert!(once
        .iter()
        .zip(&twice)
        .all(|(a, b)| (a - b).abs() <= 1e-12 * scale));
}

#[test]
fn f32_backend_agrees_with_the_f64_model() {
    let m = preset("tiny").unwrap();
    let layout = ParamLayout::new(&m);
    let params = random_params(&m, 31);
    let params32: Vec<f32> = params.iter().map(|&v| v as f32).collect();
    let exact: Vec<f64> = params32.iter().map(|&v| v as f64).collect();
    let batch = sample_batch(&m, 2, 32);

    let mut backend = CpuBackend::new(&m, params32).unwrap();
    let loss32 = backend.forward_backward(&batch, 1.0).unwrap() as f64;
    let grads32 = backend.grads().unwrap();
    let mut grads64 = vec![0.0; exact.len()];
    let loss64 = model::loss_and_grad(&m, &exact, &batch, &mut grads64, 1.0).unwrap();

    common::assert_f32_matches_f64(&layout, (loss32, &grads32), (loss64, &grads64));
}

#[test]
fn masked_pixels_reach_only_the_targets() {
    let m = preset("tiny").unwrap();
    let params = random_params(&m, 41);
    let batch = sample_batch(&m, 2, 42);

    // Every grid patch that some window shows to the network.
    let (g, k, p) = (m.grid(), m.window, m.patch);
    let mut shown = vec![false; batch.images_len * g * g];
    let slots = batch.visible_slots(&m);
    for s in 0..batch.sequences(&m) {
        let (r0, c0) = (
            batch.window_origin[2 * s] as usize,
            batch.window_origin[2 * s + 1] as usize,
        );
        for i in 0..m.window_area() {
            if slots[s * m.window_area() + i].is_some() {
                shown[(s / m.windows_per_image * g + r0 + i / k) * g + c0 + i % k] = true;
            }
        }
    }
    let mut changed = batch.clone();
    let mut rng = ChaCha8Rng::seed_from_u64(43);
    let Pixels::Normalised(images) = &mut changed.images else {
        panic!("sample_batch makes normalised pixels");
    };
    for (i, v) in images.iter_mut().enumerate() {
        let (b, y, x) = (
            i / (3 * m.image * m.image),
            i / m.image % m.image,
            i % m.image,
        );
        if !shown[(b * g + y / p) * g + x / p] {
            *v = standard_normal(&mut rng) as f32 * 3.0;
        }
    }

    let before = window_gather::window_gather::<f64>(&m, &batch);
    let after = window_gather::window_gather::<f64>(&m, &changed);
    assert_eq!(before.visible, after.visible);
    assert_ne!(before.targets, after.targets);
    assert_eq!(
        model::predict(&m, &params, &batch).unwrap(),
        model::predict(&m, &params, &changed).unwrap()
    );
    assert_ne!(
        model::loss(&m, &params, &batch).unwrap(),
        model::loss(&m, &params, &changed).unwrap()
    );
}

#[test]
fn backend_refuses_bad_input_with_errors() {
    let m = preset("tiny").unwrap();
    let n = ParamLayout::new(&m).total();
    assert!(CpuBackend::new(&m, vec![0.0; n - 1]).is_err());
    let mut backend = CpuBackend::new(&m, ParamLayout::new(&m).init(0)).unwrap();
    assert!(backend.set_params(&[0.0; 3]).is_err());

    let good = sample_batch(&m, 2, 51);
    let mut bad = good.clone();
    bad.mask_index[0] = 99;
    let err = backend.forward_backward(&bad, 1.0).unwrap_err().to_string();
    assert!(err.contains("mask_index"), "{err}");
    let mut bad = good.clone();
    bad.images = Pixels::Bytes(vec![0; good.images.len() - 1]);
    assert!(backend.forward_backward(&bad, 1.0).is_err());
    assert!(backend.grads().unwrap().iter().all(|&g| g == 0.0));
}

#[test]
fn backend_training_steps_lower_the_loss() {
    let m = preset("tiny").unwrap();
    let layout = ParamLayout::new(&m);
    let losses = common::overfit_losses(&m, layout.init(61), &sample_batch(&m, 4, 62));
    assert!(losses[29] < 0.8 * losses[0], "{losses:?}");
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    // Wide enough that the matrix products split over threads too.
    let m = ModelConfig {
        width: 192,
        heads: 3,
        depth: 1,
        ..preset("tiny").unwrap()
    };
    let params: Vec<f32> = random_params(&m, 71).iter().map(|&v| v as f32).collect();
    let batch = sample_batch(&m, 8, 72);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut grads = vec![0.0f32; params.len()];
            let loss = model::loss_and_grad(&m, &params, &batch, &mut grads, 1.0).unwrap();
            (loss, grads)
        })
    };
    let one = run(1);
    assert_eq!(one, run(3));
    assert_eq!(one, run(8));
}
