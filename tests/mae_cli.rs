//! `--method mae` through the command line on the CPU: a batch file, parameters and their
//! gradient, a short run resumed bit-identically, and every file of one method refused by
//! the other with a message that names both methods.

mod common;

use common::{lomar, lomar_err, lomar_ok};
use lomar::config::Method;
use lomar::io::checkpoint::{Checkpoint, CheckpointFile};
use lomar::io::tensor_file::TensorFile;

const TINY: [&str; 6] = ["--batch", "4", "--device", "cpu", "--warmup-steps", "2"];

fn load(path: &std::path::Path) -> Checkpoint {
    let file = CheckpointFile::open(path).unwrap();
    let model = file.config().model.clone();
    file.load(&model).unwrap()
}

#[test]
fn sample_batch_init_and_grad_work_on_mae_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    lomar_ok(
        d,
        &[
            "sample-batch",
            "--method",
            "mae",
            "--out",
            "b.st",
            "--batch",
            "3",
        ],
    );
    let batch = TensorFile::open(&d.join("b.st"), "batch").unwrap();
    // One window per image at (0, 0) covering the 8×8 grid; 48 of 64 patches masked.
    let (shape, origin) = batch.indices("window_origin").unwrap();
    assert_eq!((shape, origin), (vec![3, 1, 2], vec![0; 6]));
    let (shape, mask) = batch.indices("mask_index").unwrap();
    assert_eq!(shape, [3, 1, 48]);
    assert!(mask.chunks(48).all(|r| r.windows(2).all(|w| w[0] < w[1])));

    lomar_ok(d, &["init", "--method", "mae", "--out", "p.st"]);
    let out = lomar_ok(
        d,
        &[
            "grad", "--method", "mae", "--params", "p.st", "--batch", "b.st", "--out", "g.st",
            "--device", "cpu",
        ],
    );
    assert!(out.contains("loss"), "{out}");
    let grads = TensorFile::open(&d.join("g.st"), "gradients").unwrap();
    let (_, g) = grads.f32("decoder_blocks.1.attn.qkv.weight").unwrap();
    assert!(g.iter().any(|&v| v != 0.0));

    // The other method's files are refused, naming both methods.
    lomar_ok(d, &["init", "--out", "lomar.st"]);
    let err = lomar_err(
        d,
        &[
            "grad", "--method", "mae", "--params", "lomar.st", "--batch", "b.st", "--out", "x.st",
        ],
    );
    assert!(
        err.contains("--method lomar model") && err.contains("--method mae"),
        "{err}"
    );
    let err = lomar_err(
        d,
        &[
            "grad", "--params", "p.st", "--batch", "b.st", "--out", "x.st",
        ],
    );
    assert!(err.contains("--method mae model"), "{err}");
    // MAE runs on CUDA too: where that fails, the reason is the machine, not the method.
    let out = lomar(
        d,
        &[
            "grad", "--method", "mae", "--device", "cuda", "--params", "p.st", "--batch", "b.st",
            "--out", "x.st",
        ],
    );
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("no usable GPU") || err.contains("no CUDA kernels"),
            "{err}"
        );
    }
}

#[test]
fn an_mae_run_resumes_bit_identically_and_refuses_lomar() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut whole = vec![
        "pretrain", "--method", "mae", "--out", "whole", "--steps", "6",
    ];
    whole.extend(TINY);
    lomar_ok(d, &whole);
    let mut first = vec![
        "pretrain",
        "--method",
        "mae",
        "--out",
        "split",
        "--steps",
        "6",
        "--stop-after",
        "3",
    ];
    first.extend(TINY);
    lomar_ok(d, &first);
    let resume = [
        "pretrain",
        "--out",
        "split",
        "--resume",
        "split/checkpoint.safetensors",
        "--device",
        "cpu",
    ];
    let mut as_lomar = resume.to_vec();
    as_lomar.extend(["--method", "lomar"]);
    let err = lomar_err(d, &as_lomar);
    assert!(
        err.contains("checkpoint being resumed holds a --method mae model")
            && err.contains("--method lomar"),
        "{err}"
    );
    lomar_ok(d, &resume);
    let (a, b) = (
        load(&d.join("whole/checkpoint.safetensors")),
        load(&d.join("split/checkpoint.safetensors")),
    );
    assert_eq!(a.config.model.method, Method::Mae);
    assert_eq!((a.step, b.step), (6, 6));
    assert_eq!(a.params, b.params);
    assert_eq!(a.moments, b.moments);
}

#[test]
fn bench_counts_mae_flops() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    lomar_ok(
        d,
        &[
            "bench",
            "--method",
            "mae",
            "--device",
            "cpu",
            "--batch",
            "2",
            "--warmup",
            "1",
            "--timed-steps",
            "1",
            "--json",
            "b.json",
        ],
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("b.json")).unwrap()).unwrap();
    let m = lomar::config::mae_recipe(lomar::config::preset("tiny").unwrap());
    let want = lomar::bench::flops::training_flops(&m, 2);
    assert_eq!(json["report"]["flops_per_step"].as_f64(), Some(want));
}

#[test]
fn an_mae_encoder_exports_for_timm_vit_and_gives_features() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    lomar_ok(
        d,
        &["init", "--method", "mae", "--out", "p.st", "--seed", "2"],
    );
    let out = lomar_ok(
        d,
        &[
            "export",
            "--checkpoint",
            "p.st",
            "--out",
            "e.st",
            "--image",
            "48",
        ],
    );
    assert!(
        out.contains("timm.models.vision_transformer.VisionTransformer"),
        "{out}"
    );
    let file = TensorFile::open(&d.join("e.st"), "encoder").unwrap();
    // A 12×12 grid at 48 pixels: the sin-cos table is computed for it.
    let (shape, pos) = file.f32("pos_embed").unwrap();
    assert_eq!(shape, [1, 145, 64]);
    assert!(pos[..64].iter().all(|&v| v == 0.0));
    assert_eq!(file.f32("blocks.1.attn.qkv.bias").unwrap().0, [192]);
    assert!(file.f32("blocks.0.attn.q_bias").is_err());
    assert!(file.f32("mask_token").is_err());
    assert!(file.f32("decoder_embed.weight").is_err());
    let kwargs: serde_json::Value = file.metadata_json("timm_vit_kwargs").unwrap().unwrap();
    assert_eq!(
        (kwargs["img_size"].as_u64(), kwargs["embed_dim"].as_u64()),
        (Some(48), Some(64))
    );

    let encode = ["--checkpoint", "p.st", "--images", "40", "--method", "mae"];
    let out = lomar_ok(
        d,
        &[&["features"][..], &encode, &["--out", "f.st"]].concat(),
    );
    assert!(out.contains("40 features with labels written"), "{out}");
    let out = lomar_ok(d, &[&["probe"][..], &encode, &["--k", "3"]].concat());
    assert!(out.contains("64-d features"), "{out}");
    // The reconstruction figure: MAE's one window is the whole image.
    let out = lomar_ok(
        d,
        &[
            "visualize",
            "--checkpoint",
            "p.st",
            "--images",
            "2",
            "--out",
            "v.png",
        ],
    );
    assert!(out.contains("2 images drawn to v.png"), "{out}");

    for (args, want) in [
        (
            &[
                "export",
                "--checkpoint",
                "p.st",
                "--out",
                "x.st",
                "--method",
                "lomar",
            ][..],
            "holds a --method mae model",
        ),
        (
            &[
                "export",
                "--checkpoint",
                "p.st",
                "--out",
                "x.st",
                "--position-index",
            ][..],
            "no relative position index",
        ),
        (
            &[
                "features",
                "--checkpoint",
                "p.st",
                "--out",
                "x.st",
                "--mode",
                "windows",
            ][..],
            "no windows",
        ),
        (
            &[
                "visualize",
                "--checkpoint",
                "p.st",
                "--out",
                "x.png",
                "--method",
                "lomar",
            ][..],
            "holds a --method mae model",
        ),
    ] {
        let err = lomar_err(d, args);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
