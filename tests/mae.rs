//! MAE on the CPU reference (docs/DESIGN.md §7), checked from first principles: the
//! forward against a loop-by-loop transcription of MAE's definition, every parameter's
//! gradient against central finite differences in f64, the token moves MAE adds, and the
//! f32 backend against the f64 model.

use lomar::backend::Backend;
use lomar::config::{mae_recipe, preset, DecoderConfig, ModelConfig};
use lomar::cpu::encoder::{Encoder, Pool, View};
use lomar::cpu::mae;
use lomar::cpu::ops::tokens;
use lomar::cpu::step::Step;
use lomar::cpu::CpuBackend;
use lomar::data::batch::Batch;
use lomar::params::ParamLayout;
use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

mod common;
use common::fd::{dot, randn, FdCheck};
use common::naive::{block_rest, dense, norm, patch_target, squared_error};
use common::sample_batch;

/// The tiny preset's MAE (64 patches, 16 kept), its decoder given two heads so that the
/// decoder's head split is exercised too.
fn model() -> ModelConfig {
    ModelConfig {
        decoder: Some(DecoderConfig {
            width: 32,
            depth: 2,
            heads: 2,
        }),
        ..mae_recipe(preset("tiny").unwrap())
    }
}

/// The initialisation with biases, norms and tokens moved off 0 and 1 by N(0, 0.1).
fn random_params(m: &ModelConfig, seed: u64) -> Vec<f64> {
    common::random_params(m, seed, |_| 0.1)
}

/// Channel `c` of MAE's sin-cos embedding of token `t` (0 = cls) on a `g`-wide grid:
/// the first half of the channels encodes the column, the second the row, each half
/// sines then cosines of `pos · 10000^(-k / (width/4))`.
fn sincos(width: usize, g: usize, t: usize, c: usize) -> f64 {
    if t == 0 {
        return 0.0;
    }
    let q = width / 4;
    let (row, col) = ((t - 1) / g, (t - 1) % g);
    let pos = if c < 2 * q { col } else { row } as f64;
    let k = c % q;
    let angle = pos * 10000f64.powf(-(k as f64) / q as f64);
    if c % (2 * q) < q {
        angle.sin()
    } else {
        angle.cos()
    }
}

/// One pre-norm block over every token, attention without a bias.
fn naive_block(x: &mut [Vec<f64>], w: impl Fn(&str) -> Vec<f64>, heads: usize) {
    let d = x[0].len();
    let dh = d / heads;
    let qkv: Vec<Vec<f64>> = x
        .iter()
        .map(|r| {
            dense(
                &w("attn.qkv.weight"),
                &w("attn.qkv.bias"),
                &norm(r, &w("norm1.weight"), &w("norm1.bias")),
            )
        })
        .collect();
    let mut attn = vec![vec![0.0; d]; x.len()];
    for h in 0..heads {
        let part = |r: &Vec<f64>, which: usize| r[which * d + h * dh..][..dh].to_vec();
        for (i, out) in attn.iter_mut().enumerate() {
            let q = part(&qkv[i], 0);
            let logits: Vec<f64> = qkv
                .iter()
                .map(|r| dot(&q, &part(r, 1)) / (dh as f64).sqrt())
                .collect();
            let top = logits.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = logits.iter().map(|z| (z - top).exp()).collect();
            let sum: f64 = e.iter().sum();
            for (j, r) in qkv.iter().enumerate() {
                for (o, v) in out[h * dh..][..dh].iter_mut().zip(part(r, 2)) {
                    *o += e[j] / sum * v;
                }
            }
        }
    }
    for (row, a) in x.iter_mut().zip(&attn) {
        block_rest(row, a, &w);
    }
}

/// MAE's encoder on the `kept` patches of one image `[3, H, H]`: every token after the
/// final norm, cls first.
fn naive_encoder(m: &ModelConfig, params: &[f64], image: &[f32], kept: &[usize]) -> Vec<Vec<f64>> {
    let layout = ParamLayout::new(m);
    let get = |name: &str| params[layout.get(name).unwrap().range()].to_vec();
    let (p, g, img) = (m.patch, m.grid(), m.image);
    let mut x = vec![get("cls_token")];
    for &i in kept {
        let mut v = Vec::new();
        for c in 0..3 {
            for y in 0..p {
                for xx in 0..p {
                    v.push(image[(c * img + i / g * p + y) * img + i % g * p + xx] as f64);
                }
            }
        }
        let e = dense(
            &get("patch_embed.proj.weight"),
            &get("patch_embed.proj.bias"),
            &v,
        );
        x.push(
            e.iter()
                .enumerate()
                .map(|(c, v)| v + sincos(m.width, g, 1 + i, c))
                .collect(),
        );
    }
    for blk in 0..m.depth {
        naive_block(&mut x, |s| get(&format!("blocks.{blk}.{s}")), m.heads);
    }
    x.iter()
        .map(|r| norm(r, &get("norm.weight"), &get("norm.bias")))
        .collect()
}

/// MAE's loss, image by image, token by token.
fn naive_loss(m: &ModelConfig, params: &[f64], batch: &Batch) -> f64 {
    let layout = ParamLayout::new(m);
    let get = |name: &str| params[layout.get(name).unwrap().range()].to_vec();
    let dec = m.decoder.unwrap();
    let (p, g, img) = (m.patch, m.grid(), m.image);
    let n = g * g;
    let mk = m.masked_per_window();
    let (mut total, mut count) = (0.0, 0usize);
    let pixels = batch.images.normalised(img * img);
    for b in 0..batch.images_len {
        let masked = &batch.mask_index[b * mk..][..mk];
        let pixel = |patch: usize, c: usize, y: usize, x: usize| {
            let (top, left) = (patch / g * p, patch % g * p);
            pixels[((b * 3 + c) * img + top + y) * img + left + x] as f64
        };
        let kept: Vec<usize> = (0..n).filter(|i| !masked.contains(&(*i as u32))).collect();
        let image = &pixels[b * 3 * img * img..][..3 * img * img];
        let y: Vec<Vec<f64>> = naive_encoder(m, params, image, &kept)
            .iter()
            .map(|r| dense(&get("decoder_embed.weight"), &get("decoder_embed.bias"), r))
            .collect();
        // Decoder: cls, each patch's encoded token or the mask token, plus positions.
        let mut z = vec![y[0].clone()];
        for i in 0..n {
            z.push(match kept.iter().position(|&k| k == i) {
                Some(r) => y[1 + r].clone(),
                None => get("mask_token"),
            });
        }
        for (t, row) in z.iter_mut().enumerate() {
            for (c, v) in row.iter_mut().enumerate() {
                *v += sincos(dec.width, g, t, c);
            }
        }
        for blk in 0..dec.depth {
            naive_block(
                &mut z,
                |s| get(&format!("decoder_blocks.{blk}.{s}")),
                dec.heads,
            );
        }
        for &i in masked {
            let out = norm(
                &z[1 + i as usize],
                &get("decoder_norm.weight"),
                &get("decoder_norm.bias"),
            );
            let pred = dense(&get("decoder_pred.weight"), &get("decoder_pred.bias"), &out);
            let target = patch_target(p, m.norm_pix, |c, y, x| pixel(i as usize, c, y, x));
            total += squared_error(&pred, &target);
            count += target.len();
        }
    }
    total / count as f64
}

#[test]
fn mae_forward_matches_the_loop_by_loop_definition() {
    for norm_pix in [true, false] {
        let m = ModelConfig {
            norm_pix,
            ..model()
        };
        let params = random_params(&m, 7);
        let batch = sample_batch(&m, 2, 8);
        let got = mae::loss(&m, &params, &batch).unwrap();
        let want = naive_loss(&m, &params, &batch);
        assert!((got - want).abs() <= 1e-12 * want, "{got} vs {want}");
    }
}

#[test]
fn the_frozen_mae_encoder_sees_every_patch_as_defined() {
    let m = model();
    let params = random_params(&m, 17);
    let params32: Vec<f32> = params.iter().map(|&v| v as f32).collect();
    let exact: Vec<f64> = params32.iter().map(|&v| v as f64).collect();
    let batch = sample_batch(&m, 2, 18);
    let encoder = Encoder::new(&m, &params32, m.image, View::Image, Pool::Mean).unwrap();
    let pixels = batch.images.normalised(m.image * m.image);
    let got = encoder.tokens(&pixels);
    let all: Vec<usize> = (0..m.window_area()).collect();
    let per_image = 3 * m.image * m.image;
    let want: Vec<f64> = pixels
        .chunks(per_image)
        .flat_map(|image| naive_encoder(&m, &exact, image, &all).concat())
        .collect();
    assert_eq!(got.len(), want.len());
    let worst = got
        .iter()
        .zip(&want)
        .map(|(&a, b)| (a as f64 - b).abs())
        .fold(0.0, f64::max);
    assert!(worst < 1e-4, "max |f32 - f64| = {worst:e}");
    let err = Encoder::new(&m, &params32, m.image, View::Windows, Pool::Cls)
        .err()
        .unwrap();
    assert!(err.to_string().contains("no windows"), "{err}");
}

#[test]
fn mae_gradient_matches_finite_differences_for_every_tensor() {
    let m = model();
    let layout = ParamLayout::new(&m);
    let params = random_params(&m, 11);
    let batch = sample_batch(&m, 2, 12);
    let mut grads = vec![0.0; params.len()];
    mae::Workspace::new(&m)
        .unwrap()
        .loss_and_grad(&params, &batch, &mut grads, 1.0)
        .unwrap();
    let entries = layout.entries();
    let mut inputs: Vec<Vec<f64>> = entries.iter().map(|e| params[e.range()].to_vec()).collect();
    let analytic: Vec<Vec<f64>> = entries.iter().map(|e| grads[e.range()].to_vec()).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let picks: Vec<Vec<usize>> = entries
        .iter()
        .map(|e| sample(&mut rng, e.len(), 8.min(e.len())).into_vec())
        .collect();
    let f = |inp: &[Vec<f64>]| mae::loss(&m, &inp.concat(), &batch).unwrap();
    let tol = FdCheck {
        rel: 1e-5,
        abs: 1e-9,
    };
    tol.run("mae", &mut inputs, &analytic, |t, _| picks[t].clone(), f);
}

#[test]
fn cls_prepending_and_unshuffling_backwards_match_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (seqs, area, visible, d) = (3, 4, 2, 5);
    let slots: Vec<Option<u32>> = [
        [None, Some(0), Some(1), None],
        [Some(0), None, None, Some(1)],
        [None, None, Some(0), Some(1)],
    ]
    .concat();
    let tol = FdCheck {
        rel: 1e-6,
        abs: 1e-9,
    };
    let every = |_: usize, len: usize| (0..len).collect::<Vec<_>>();

    let mut inputs = vec![
        randn(&mut rng, d, 1.0),
        randn(&mut rng, seqs * visible * d, 1.0),
    ];
    let weights = randn(&mut rng, seqs * (1 + visible) * d, 1.0);
    let run = |inp: &[Vec<f64>]| {
        let mut x = vec![0.0; seqs * (1 + visible) * d];
        tokens::prepend_cls_forward(&mut x, &inp[0], &inp[1]);
        x
    };
    let x = run(&inputs);
    assert_eq!(x[(1 + visible) * d..][..d], inputs[0][..]);
    assert_eq!(x[(1 + visible + 2) * d..][..d], inputs[1][3 * d..][..d]);
    let (mut dcls, mut drows) = (vec![0.0; d], vec![f64::NAN; seqs * visible * d]);
    tokens::prepend_cls_backward(&mut dcls, &mut drows, &weights);
    tol.run("prepend_cls", &mut inputs, &[dcls, drows], every, |inp| {
        dot(&run(inp), &weights)
    });

    let mut inputs = vec![
        randn(&mut rng, d, 1.0),
        randn(&mut rng, seqs * (1 + visible) * d, 1.0),
    ];
    let weights = randn(&mut rng, seqs * (1 + area) * d, 1.0);
    let run = |inp: &[Vec<f64>]| {
        let mut x = vec![0.0; seqs * (1 + area) * d];
        tokens::unshuffle_tokens_forward(&mut x, &inp[0], &inp[1], &slots, area);
        x
    };
    let x = run(&inputs);
    // Sequence 1: its own cls row first, position 3 its second encoded row, position 1
    // the mask token.
    let seq1 = &inputs[1][(1 + visible) * d..];
    assert_eq!(x[(1 + area) * d..][..d], seq1[..d]);
    assert_eq!(x[(1 + area + 1 + 3) * d..][..d], seq1[2 * d..][..d]);
    assert_eq!(x[(1 + area + 1 + 1) * d..][..d], inputs[0][..]);
    let mut dmask = vec![0.0; d];
    let mut denc = vec![f64::NAN; seqs * (1 + visible) * d];
    tokens::unshuffle_tokens_backward(&mut dmask, &mut denc, &weights, &slots, area);
    tol.run("unshuffle", &mut inputs, &[dmask, denc], every, |inp| {
        dot(&run(inp), &weights)
    });
}

#[test]
fn mae_f32_backend_agrees_with_the_f64_model_and_learns() {
    let m = model();
    let layout = ParamLayout::new(&m);
    let params = random_params(&m, 31);
    let params32: Vec<f32> = params.iter().map(|&v| v as f32).collect();
    let exact: Vec<f64> = params32.iter().map(|&v| v as f64).collect();
    let batch = sample_batch(&m, 2, 32);

    let mut backend = CpuBackend::new(&m, params32).unwrap();
    let loss32 = backend.forward_backward(&batch, 1.0).unwrap() as f64;
    let grads32 = backend.grads().unwrap();
    let mut grads64 = vec![0.0; exact.len()];
    let loss64 = mae::Workspace::new(&m)
        .unwrap()
        .loss_and_grad(&exact, &batch, &mut grads64, 1.0)
        .unwrap();
    common::assert_f32_matches_f64(&layout, (loss32, &grads32), (loss64, &grads64));

    let losses = common::overfit_losses(&m, layout.init(61), &sample_batch(&m, 4, 62));
    assert!(losses[29] < 0.8 * losses[0], "{losses:?}");
}

#[test]
fn a_lomar_batch_is_refused_by_an_mae_model() {
    let m = model();
    let lomar_batch = sample_batch(&preset("tiny").unwrap(), 2, 5);
    let mut backend = CpuBackend::new(&m, ParamLayout::new(&m).init(0)).unwrap();
    let err = backend.forward_backward(&lomar_batch, 1.0).unwrap_err();
    assert!(err.to_string().contains("window_origin"), "{err}");
}
