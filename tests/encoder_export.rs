//! The frozen encoder against the training forward, the timm export against the
//! checkpoint it came from, and the key bias the export drops.

mod common;

use common::sample_batch;
use lomar::backend::Backend;
use lomar::config::{preset, ModelConfig};
use lomar::cpu::encoder::{Encoder, Pool, View};
use lomar::cpu::model;
use lomar::cpu::ops::attention::RelativeIndex;
use lomar::cpu::ops::linear;
use lomar::cpu::CpuBackend;
use lomar::data::batch::{Batch, Pixels};
use lomar::eval::export::{encoder_tensors, write_encoder, ExportOptions};
use lomar::eval::rel_bias::resize_table;
use lomar::io::tensor_file::TensorFile;
use lomar::params::{standard_normal, ParamLayout};
use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// `common::random_params` with every moved tensor at standard deviation 0.3, in f32.
fn random_params(m: &ModelConfig, seed: u64) -> Vec<f32> {
    common::random_params(m, seed, |_| 0.3)
        .iter()
        .map(|&v| v as f32)
        .collect()
}

/// The encoder's tokens must be the training forward's when nothing is hidden. Training
/// replaces masked patches by the mask token, so: give every masked position the same
/// patch P and set the mask token to P's embedding. Then each training window sequence
/// equals the encoder's sequence for that window, and the head applied to the encoder's
/// tokens must give the training forward's predictions.
fn encoder_matches_training_forward(m: &ModelConfig, view: View, seed: u64) {
    let encoder_params = random_params(m, seed);
    let layout = ParamLayout::new(m);
    let r = layout.ranges();
    let probe = Encoder::new(m, &encoder_params, m.image, view, Pool::Cls).unwrap();
    let origins = probe.origins().to_vec();
    let m = &ModelConfig {
        windows_per_image: origins.len(),
        ..m.clone()
    };
    let (p, pd, k, img, mk) = (
        m.patch,
        m.patch_dim(),
        m.window,
        m.image,
        m.masked_per_window(),
    );
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 2);
    let images_len = 2;
    let mut images: Vec<f32> = (0..images_len * 3 * img * img)
        .map(|_| standard_normal(&mut rng) as f32)
        .collect();
    // P in Conv2d (c, y, x) order.
    let patch: Vec<f32> = (0..pd).map(|_| standard_normal(&mut rng) as f32).collect();
    let mut window_origin = Vec::new();
    let mut mask_index = Vec::new();
    for b in 0..images_len {
        for &(row0, col0) in &origins {
            window_origin.extend([row0 as u32, col0 as u32]);
            let mut masked: Vec<u32> = sample(&mut rng, m.window_area(), mk)
                .into_iter()
                .map(|i| i as u32)
                .collect();
            masked.sort_unstable();
            for &i in &masked {
                let (top, left) = ((row0 + i as usize / k) * p, (col0 + i as usize % k) * p);
                for c in 0..3 {
                    for y in 0..p {
                        for x in 0..p {
                            images[((b * 3 + c) * img + top + y) * img + left + x] =
                                patch[(c * p + y) * p + x];
                        }
                    }
                }
            }
            mask_index.extend(masked);
        }
    }
    let batch = Batch {
        images_len,
        images: Pixels::Normalised(images),
        window_origin,
        mask_index,
    };
    batch.validate(m).unwrap();

    let mut params = encoder_params.clone();
    let mut embedded = vec![0.0f32; m.width];
    linear::linear_forward(
        &mut embedded,
        &patch,
        &params[r.patch_w.clone()],
        &params[r.patch_b.clone()],
    );
    params[r.mask_token.clone()].copy_from_slice(&embedded);
    let pred = model::predict(m, &params, &batch).unwrap();

    // The mask token is not part of the encoder: its original value is kept there.
    let encoder = Encoder::new(m, &encoder_params, m.image, view, Pool::Cls).unwrap();
    let tokens = encoder.tokens(&batch.images.normalised(m.image * m.image));
    let t = 1 + m.window_area();
    let d = m.width;
    assert_eq!(tokens.len(), batch.sequences(m) * t * d);
    let mut picked = Vec::new();
    for (s, masked) in batch.mask_index.chunks(mk).enumerate() {
        for &i in masked {
            picked.extend_from_slice(&tokens[(s * t + 1 + i as usize) * d..][..d]);
        }
    }
    let mut from_encoder = vec![0.0f32; pred.len()];
    linear::linear_forward(
        &mut from_encoder,
        &picked,
        &params[r.head_w.clone()],
        &params[r.head_b.clone()],
    );
    let scale = pred.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    for (i, (a, b)) in from_encoder.iter().zip(&pred).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * scale,
            "{view:?}, value {i}: encoder {a}, training forward {b}"
        );
    }
}

#[test]
fn encoder_windows_are_the_training_forward_without_masking() {
    // An 8x8 grid tiled by four 4x4 windows.
    encoder_matches_training_forward(&preset("tiny").unwrap(), View::Windows, 1);
    // A 10x10 grid: windows at 0, 4 and 6 overlap to cover every patch.
    let wide = ModelConfig {
        image: 40,
        ..preset("tiny").unwrap()
    };
    encoder_matches_training_forward(&wide, View::Windows, 2);
}

#[test]
fn encoder_images_are_the_training_forward_when_the_window_is_the_image() {
    let whole = ModelConfig {
        image: 16,
        ..preset("tiny").unwrap()
    };
    encoder_matches_training_forward(&whole, View::Image, 3);
}

/// The pools average the right tokens: cls is token 0, mean is the patch tokens' mean,
/// and windows average over views.
#[test]
fn pools_read_the_tokens_they_name() {
    let m = preset("tiny").unwrap();
    let params = random_params(&m, 4);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let images: Vec<f32> = (0..3 * 3 * 32 * 32)
        .map(|_| standard_normal(&mut rng) as f32)
        .collect();
    let d = m.width;
    for view in [View::Image, View::Windows] {
        let cls = Encoder::new(&m, &params, 32, view, Pool::Cls).unwrap();
        let mean = Encoder::new(&m, &params, 32, view, Pool::Mean).unwrap();
        let tokens = cls.tokens(&images);
        let views = cls.origins().len();
        let t = tokens.len() / (3 * views * d);
        let (fc, fm) = (cls.features(&images), mean.features(&images));
        assert_eq!((fc.len(), fm.len()), (3 * d, 3 * d));
        for b in 0..3 {
            for j in 0..d {
                let seq = |v: usize, i: usize| tokens[((b * views + v) * t + i) * d + j];
                let want_cls = (0..views).map(|v| seq(v, 0)).sum::<f32>() / views as f32;
                let want_mean = (0..views)
                    .flat_map(|v| (1..t).map(move |i| (v, i)))
                    .map(|(v, i)| seq(v, i))
                    .sum::<f32>()
                    / (views * (t - 1)) as f32;
                assert!((fc[b * d + j] - want_cls).abs() < 1e-5, "{view:?}");
                assert!((fm[b * d + j] - want_mean).abs() < 1e-5, "{view:?}");
            }
        }
    }
}

/// timm's `Beit(use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=None,
/// global_pool="token", num_classes=0)` state dict of a depth-2 model, as timm lists it.
fn timm_keys(depth: usize) -> Vec<String> {
    let mut keys: Vec<String> = [
        "cls_token",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
    ]
    .map(String::from)
    .to_vec();
    for i in 0..depth {
        for key in [
            "norm1.weight",
            "norm1.bias",
            "attn.q_bias",
            "attn.v_bias",
            "attn.relative_position_bias_table",
            "attn.qkv.weight",
            "attn.proj.weight",
            "attn.proj.bias",
            "norm2.weight",
            "norm2.bias",
            "mlp.fc1.weight",
            "mlp.fc1.bias",
            "mlp.fc2.weight",
            "mlp.fc2.bias",
        ] {
            keys.push(format!("blocks.{i}.{key}"));
        }
    }
    keys.extend(["norm.weight", "norm.bias"].map(String::from));
    keys
}

#[test]
fn the_export_has_timms_names_and_shapes_and_maps_back_to_the_checkpoint() {
    let m = preset("tiny").unwrap();
    let layout = ParamLayout::new(&m);
    let params = random_params(&m, 6);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("encoder.safetensors");
    let opts = ExportOptions {
        image: 32,
        position_index: false,
    };
    assert_eq!(write_encoder(&path, &m, &params, &opts).unwrap(), 33);
    let file = TensorFile::open(&path, "encoder").unwrap();
    let kwargs: serde_json::Value =
        serde_json::from_str(file.metadata("timm_beit_kwargs").unwrap()).unwrap();
    assert_eq!(kwargs["img_size"], 32);
    assert_eq!(kwargs["use_rel_pos_bias"], true);
    assert_eq!(kwargs["global_pool"], "token");

    let (d, g) = (m.width, 8);
    let param = |name: &str| &params[layout.get(name).unwrap().range()];
    for key in timm_keys(m.depth) {
        let (shape, values) = file.f32(&key).unwrap();
        let (want_shape, want): (Vec<usize>, Vec<f32>) = match key
            .rsplit_once('.')
            .map_or(("", key.as_str()), |(a, b)| (a, b))
        {
            (block, "q_bias") => (vec![d], param(&format!("{block}.qkv.bias"))[..d].to_vec()),
            (block, "v_bias") => (
                vec![d],
                param(&format!("{block}.qkv.bias"))[2 * d..].to_vec(),
            ),
            (_, "relative_position_bias_table") => (
                vec![(2 * g - 1) * (2 * g - 1) + 3, m.heads],
                resize_table(param(&key), m.heads, m.window, g),
            ),
            _ => (
                layout.get(&key).unwrap().shape.clone(),
                param(&key).to_vec(),
            ),
        };
        assert_eq!(shape, want_shape, "{key}");
        assert_eq!(values, want, "{key}");
    }
    // Nothing else: no mask token, head, key bias or optimiser state.
    let exported: Vec<String> = encoder_tensors(&m, &params, 32)
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(exported, timm_keys(m.depth));
}

#[test]
fn at_the_window_size_the_tables_are_exported_unchanged_and_the_index_is_beits() {
    let m = ModelConfig {
        image: 16,
        ..preset("tiny").unwrap()
    };
    let layout = ParamLayout::new(&m);
    let params = random_params(&m, 7);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("encoder.safetensors");
    let opts = ExportOptions {
        image: 16,
        position_index: true,
    };
    assert_eq!(write_encoder(&path, &m, &params, &opts).unwrap(), 35);
    let file = TensorFile::open(&path, "encoder").unwrap();
    for i in 0..m.depth {
        let table = format!("blocks.{i}.attn.relative_position_bias_table");
        let original = &params[layout.get(&table).unwrap().range()];
        assert_eq!(file.f32(&table).unwrap().1, original);
        let (shape, index) = file
            .indices(&format!("blocks.{i}.attn.relative_position_index"))
            .unwrap();
        assert_eq!(shape, [17, 17]);
        assert_eq!(index, RelativeIndex::new(4).index);
        // cls row, cls column, cls with itself, then a patch with itself: the centre.
        assert_eq!((index[1], index[17], index[0]), (49, 50, 51));
        assert_eq!(index[18], 3 * 7 + 3);
    }
    // A larger target image resizes the tables; a bad one is refused.
    let bigger = encoder_tensors(&m, &params, 48).unwrap();
    assert_eq!(bigger[7].shape, [23 * 23 + 3, m.heads]);
    let err = encoder_tensors(&m, &params, 30).unwrap_err().to_string();
    assert!(err.contains("multiple of the model's patch (4)"), "{err}");
}

/// The export drops the key bias. That is exact: `q·(k + b_k)` adds `q·b_k` to a whole
/// row of logits, which softmax cancels, so the loss does not depend on b_k and its
/// gradient is zero; the query and value biases do matter.
#[test]
fn the_key_bias_has_no_effect_and_zero_gradient() {
    let m = preset("tiny").unwrap();
    let layout = ParamLayout::new(&m);
    let r = layout.ranges();
    let d = m.width;
    let params: Vec<f64> = random_params(&m, 8).iter().map(|&v| v as f64).collect();
    let batch = sample_batch(&m, 2, 9);
    let mut grads = vec![0.0; params.len()];
    let loss = model::loss_and_grad(&m, &params, &batch, &mut grads, 1.0).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    for b in &r.blocks {
        let g = &grads[b.qkv_b.clone()];
        let largest = |s: &[f64]| s.iter().fold(0.0f64, |a, v| a.max(v.abs()));
        let (gq, gk, gv) = (
            largest(&g[..d]),
            largest(&g[d..2 * d]),
            largest(&g[2 * d..]),
        );
        assert!(gq > 1e-4 && gv > 1e-4, "{gq} {gv}");
        assert!(gk <= 1e-12 * gq, "key bias gradient {gk:e} vs query {gq:e}");

        let mut moved = params.clone();
        for v in &mut moved[b.qkv_b.start + d..b.qkv_b.start + 2 * d] {
            *v += standard_normal(&mut rng);
        }
        let after = model::loss(&m, &moved, &batch).unwrap();
        assert!((after - loss).abs() <= 1e-12 * loss, "{after} vs {loss}");
        let mut moved = params.clone();
        moved[b.qkv_b.start] += 0.5;
        assert!((model::loss(&m, &moved, &batch).unwrap() - loss).abs() > 1e-6);
    }
}

/// In f32 the key-bias gradient is rounding noise, far below the other biases'. AdamW
/// divides each gradient by its own running scale, so training still moves the key bias
/// (by up to about the learning rate per step); the move has no effect, which is what lets
/// the export drop it: the trained model's loss is the same with its key bias zeroed.
#[test]
fn training_moves_the_key_bias_without_effect() {
    let m = preset("tiny").unwrap();
    let layout = ParamLayout::new(&m);
    let r = layout.ranges();
    let d = m.width;
    let largest = |s: &[f32]| s.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let mut backend = CpuBackend::new(&m, layout.init(11)).unwrap();
    for t in 1..=20 {
        backend.zero_grads().unwrap();
        backend
            .forward_backward(&sample_batch(&m, 4, 100 + t), 1.0)
            .unwrap();
        let grads = backend.grads().unwrap();
        for b in &r.blocks {
            let g = &grads[b.qkv_b.clone()];
            let (gq, gk) = (largest(&g[..d]), largest(&g[d..2 * d]));
            assert!(
                gk <= 1e-4 * gq,
                "step {t}: key bias gradient {gk:e}, query {gq:e}"
            );
        }
        backend.adamw_step(&common::adamw(t, 1e-3)).unwrap();
    }
    let trained: Vec<f64> = backend
        .params()
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect();
    let mut dropped = trained.clone();
    for b in &r.blocks {
        dropped[b.qkv_b.start + d..b.qkv_b.start + 2 * d].fill(0.0);
    }
    let batch = sample_batch(&m, 2, 12);
    let (a, b) = (
        model::loss(&m, &trained, &batch).unwrap(),
        model::loss(&m, &dropped, &batch).unwrap(),
    );
    assert!((a - b).abs() <= 1e-12 * a, "{a} vs {b}");
}
