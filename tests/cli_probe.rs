//! `lomar export`, `lomar features` and `lomar probe` from the command line.

mod common;
mod images;

use common::{lomar, lomar_err, lomar_ok};
use lomar::cpu::encoder::{Encoder, Pool, View};
use lomar::data::augment::load_centred;
use lomar::eval::features::{Features, LabelledImages, Provenance, SyntheticSource};
use lomar::io::checkpoint::save_params;
use lomar::io::pretrained::Pretrained;
use lomar::io::tensor_file::TensorFile;
use lomar::params::ParamLayout;

/// The percentage printed after `top-1` on the line starting with `label`.
fn top1(stdout: &str, label: &str) -> f64 {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no `{label}` line in:\n{stdout}"));
    let after = line.split("top-1").nth(1).unwrap().trim_start();
    after.split('%').next().unwrap().trim().parse().unwrap()
}

#[test]
fn features_and_probe_run_on_a_parameter_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    lomar_ok(d, &["init", "--out", "p.safetensors", "--seed", "3"]);

    // The same images and encoder flags for `features` and `probe --checkpoint`.
    let encode = [
        "--checkpoint",
        "p.safetensors",
        "--images",
        "60",
        "--data-seed",
        "5",
        "--mode",
        "windows",
        "--pool",
        "mean",
    ];
    let features = [&["features"][..], &encode, &["--out", "f.safetensors"]].concat();
    let stdout = lomar_ok(d, &features);
    assert!(
        stdout.contains("60 features with labels written"),
        "{stdout}"
    );
    let written = Features::load(&d.join("f.safetensors")).unwrap();
    // The same encoder on the same images, through the library.
    let model = Pretrained::open(&d.join("p.safetensors")).unwrap();
    let encoder = Encoder::new(
        &model.config.model,
        &model.params,
        32,
        View::Windows,
        Pool::Mean,
    )
    .unwrap();
    let source = SyntheticSource::new(5, 32, 60);
    assert_eq!(
        written,
        Features::extract(&encoder, &source, |_| {}).unwrap()
    );
    assert_eq!(written.classes, source.classes());

    let from_file = lomar_ok(d, &["probe", "--features", "f.safetensors", "--k", "5"]);
    assert!(
        from_file.contains("probe: 48 train / 12 test images, 6 classes, 64-d features"),
        "{from_file}"
    );
    let direct = lomar_ok(d, &[&["probe"][..], &encode, &["--k", "5"]].concat());
    for label in ["majority class", "linear probe", "k-NN (k=5"] {
        let acc = top1(&from_file, label);
        assert!((0.0..=100.0).contains(&acc), "{label}: {acc}");
        assert_eq!(acc, top1(&direct, label), "{label}");
    }
}

#[test]
fn export_writes_the_encoder_with_timms_constructor() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    lomar_ok(d, &["init", "--out", "p.safetensors"]);
    let stdout = lomar_ok(
        d,
        &[
            "export",
            "--checkpoint",
            "p.safetensors",
            "--out",
            "e.safetensors",
            "--image",
            "48",
        ],
    );
    assert!(stdout.contains("33 encoder tensors"), "{stdout}");
    let file = TensorFile::open(&d.join("e.safetensors"), "encoder").unwrap();
    let kwargs: serde_json::Value =
        serde_json::from_str(file.metadata("timm_beit_kwargs").unwrap()).unwrap();
    assert_eq!(kwargs["img_size"], 48);
    assert_eq!(kwargs["embed_dim"], 64);
    let (shape, _) = file
        .f32("blocks.1.attn.relative_position_bias_table")
        .unwrap();
    assert_eq!(shape, [23 * 23 + 3, 2]);
    assert!(!file.contains("mask_token") && !file.contains("head.weight"));
    assert!(!file.contains("blocks.0.attn.relative_position_index"));
}

#[test]
fn bad_input_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    lomar_ok(d, &["init", "--out", "p.safetensors"]);
    images::save(images::picture(8, 8, 1).into(), &d.join("flat/a.png"));
    for name in ["a", "b", "c", "d", "e"] {
        let path = d.join(format!("one/only/{name}.png"));
        images::save(images::picture(8, 8, 1).into(), &path);
    }
    let p = "p.safetensors";
    let cases: &[(&[&str], &str)] = &[
        (
            &["export", "--checkpoint", "absent", "--out", "e"],
            "cannot read checkpoint absent",
        ),
        (
            &["export", "--checkpoint", p, "--out", "e", "--image", "30"],
            "image = 30: must be a positive multiple of the model's patch (4)",
        ),
        (
            &[
                "features",
                "--checkpoint",
                p,
                "--out",
                "f",
                "--data",
                "imgs/",
            ],
            "--data imgs/: cannot open",
        ),
        (
            &[
                "features",
                "--checkpoint",
                p,
                "--out",
                "f",
                "--data",
                "flat",
            ],
            "--data flat: a.png lies directly in the folder",
        ),
        (
            &["features", "--checkpoint", p, "--out", "f", "--images", "0"],
            "images = 0",
        ),
        (
            &[
                "features",
                "--checkpoint",
                p,
                "--out",
                "f",
                "--mode",
                "windows",
                "--image",
                "8",
            ],
            "image = 8: 2x2 patches hold no 4x4 window",
        ),
        (
            &["probe", "--checkpoint", p, "--images", "2"],
            "2 images are too few",
        ),
        (
            &["probe", "--checkpoint", p, "--test-fraction", "1"],
            "test_fraction = 1",
        ),
        (&["probe", "--checkpoint", p, "--k", "0"], "k = 0"),
        (
            &["probe", "--checkpoint", p, "--repeats", "0"],
            "repeats = 0",
        ),
        (&["probe", "--features", p], "is not a lomar features file"),
        (
            &["probe", "--checkpoint", p, "--data", "one"],
            "the images hold 1 class; a probe needs at least 2",
        ),
    ];
    for (args, want) in cases {
        let stderr = lomar_err(d, args);
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
    // Neither a features file nor a checkpoint: a usage error.
    let out = lomar(d, &["probe"]);
    assert_eq!(out.status.code(), Some(2));
}

/// A NaN or infinity in a file is refused naming the tensor and the index, and an encoder
/// whose features overflow names the image: nothing is written either way.
#[test]
fn non_finite_values_are_refused_naming_where() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    lomar_ok(d, &["init", "--out", "p.safetensors"]);
    let model = Pretrained::open(&d.join("p.safetensors")).unwrap();
    let layout = ParamLayout::new(&model.config.model);
    let start = |name: &str| {
        let entry = layout.entries().iter().find(|e| e.name == name).unwrap();
        entry.range().start
    };
    let mut params = model.params.clone();
    params[start("blocks.1.mlp.fc1.weight") + 5] = f32::NAN;
    save_params(&d.join("nan.safetensors"), &model.config, &params).unwrap();
    let mut params = model.params.clone();
    let embed = start("patch_embed.proj.weight");
    params[embed..embed + 64].fill(3e38);
    save_params(&d.join("huge.safetensors"), &model.config, &params).unwrap();
    let mut features = Features {
        dim: 2,
        values: vec![0.5; 8],
        labels: vec![0, 1, 0, 1],
        classes: vec!["a".into(), "b".into()],
    };
    features.values[7] = f32::INFINITY;
    let provenance = Provenance {
        checkpoint: "p.safetensors".into(),
        step: 0,
        data: "synthetic".into(),
        view: "image".into(),
        pool: "cls".into(),
        image: 32,
    };
    features
        .save(&d.join("f.safetensors"), &provenance)
        .unwrap();

    let nan_param =
        "nan.safetensors: tensor `blocks.1.mlp.fc1.weight`: value 5 is not finite (NaN)";
    let cases: &[(&[&str], &str)] = &[
        (
            &["export", "--checkpoint", "nan.safetensors", "--out", "out"],
            nan_param,
        ),
        (
            &[
                "features",
                "--checkpoint",
                "nan.safetensors",
                "--out",
                "out",
            ],
            nan_param,
        ),
        (&["probe", "--checkpoint", "nan.safetensors"], nan_param),
        (
            &[
                "features",
                "--checkpoint",
                "huge.safetensors",
                "--out",
                "out",
            ],
            "the feature of embedded image 0 is not finite (NaN)",
        ),
        (
            &["probe", "--features", "f.safetensors"],
            "f.safetensors: tensor `features`: value 7 is not finite (inf)",
        ),
    ];
    for (args, want) in cases {
        let stderr = lomar_err(d, args);
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(!d.join("out").exists(), "{args:?} wrote a file");
    }
}

#[test]
fn folder_features_are_labelled_by_sub_folder_and_skip_broken_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mixed = images::mixed_folder(&d.join("imgs"));
    lomar_ok(d, &["init", "--out", "p.safetensors", "--seed", "2"]);
    let args = [
        "features",
        "--checkpoint",
        "p.safetensors",
        "--data",
        "imgs",
        "--out",
        "f.safetensors",
    ];
    let out = lomar(d, &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let warnings = stderr
        .lines()
        .filter(|l| l.starts_with("warning: skipping"));
    assert_eq!(warnings.count(), mixed.bad.len(), "{stderr}");

    let f = Features::load(&d.join("f.safetensors")).unwrap();
    assert_eq!(f.classes, ["class_a", "class_b", "class_c"]);
    // Sorted files: class_a's three usable images, class_b's four, class_c's one.
    assert_eq!(f.labels, [0, 0, 0, 1, 1, 1, 1, 2]);
    // The last row is the encoder on the nested image alone, centre-cropped.
    let model = Pretrained::open(&d.join("p.safetensors")).unwrap();
    let side = model.config.model.image;
    let encoder = Encoder::new(
        &model.config.model,
        &model.params,
        side,
        View::Image,
        Pool::Cls,
    )
    .unwrap();
    let pixels = load_centred(&d.join("imgs").join(mixed.good[7]), side).unwrap();
    let want = encoder.features(&pixels);
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for (got, want) in f.values[7 * f.dim..].iter().zip(&want) {
        assert!((got - want).abs() <= 1e-5 * scale, "{got} vs {want}");
    }
}
