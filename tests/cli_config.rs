//! Invalid configurations are refused before any work, naming the field.

mod common;

use common::lomar_err;

#[test]
fn every_invalid_field_is_named_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases: &[(&[&str], &str)] = &[
        (&["--image", "30"], "image = 30"),
        (&["--image", "12"], "image = 12"),
        (&["--patch", "0"], "patch = 0"),
        (&["--window", "1"], "window = 1"),
        (&["--windows-per-image", "0"], "windows_per_image = 0"),
        (&["--mask-ratio", "1.0"], "mask_ratio = 1"),
        (&["--mask-ratio", "0.01"], "mask_ratio = 0.01"),
        (&["--depth", "0"], "depth = 0"),
        (&["--width", "65"], "width = 65"),
        (&["--heads", "0"], "heads = 0"),
        (&["--batch", "0"], "batch = 0"),
        (&["--accum", "0"], "accum = 0"),
        (&["--steps", "0"], "steps = 0"),
        (
            &["--steps", "10", "--warmup-steps", "11"],
            "warmup_steps = 11",
        ),
        (&["--blr=-1"], "blr = -1"),
        (&["--blr", "inf"], "blr = inf"),
        (&["--min-lr", "1"], "min_lr = 1"),
        (&["--weight-decay=-0.1"], "weight_decay = -0.1"),
        (&["--beta1", "1"], "beta1 = 1"),
        (&["--beta2", "1.5"], "beta2 = 1.5"),
        (&["--eps", "0"], "eps = 0"),
        (&["--clip-grad", "0"], "clip_grad = 0"),
        (&["--preset", "vit_gigantic"], "preset = \"vit_gigantic\""),
    ];
    for (flags, field) in cases {
        let mut args = vec!["pretrain", "--out", "never"];
        args.extend_from_slice(flags);
        let stderr = lomar_err(d, &args);
        assert!(stderr.contains(field), "{flags:?}: {stderr}");
        assert!(
            !d.join("never").exists(),
            "{flags:?} created the run directory"
        );
    }
}

#[test]
fn other_commands_validate_the_same_way() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let stderr = lomar_err(d, &["init", "--out", "p.safetensors", "--heads", "3"]);
    assert!(
        stderr.contains("width = 64: must be a multiple of heads (3)"),
        "{stderr}"
    );
    let stderr = lomar_err(
        d,
        &["sample-batch", "--out", "b.safetensors", "--batch", "0"],
    );
    assert!(stderr.contains("batch = 0"), "{stderr}");
    assert!(!d.join("p.safetensors").exists() && !d.join("b.safetensors").exists());
}

#[test]
fn a_bad_config_file_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("c.json"), "{\"preset\": \"tiny\"}").unwrap();
    let stderr = lomar_err(d, &["pretrain", "--config", "c.json", "--out", "x"]);
    assert!(
        stderr.contains("c.json is not a valid lomar config"),
        "{stderr}"
    );
    assert!(stderr.contains("missing field `model`"), "{stderr}");
    let stderr = lomar_err(d, &["pretrain", "--config", "absent.json", "--out", "x"]);
    assert!(
        stderr.contains("cannot read config file absent.json"),
        "{stderr}"
    );
}

#[test]
fn cuda_is_refused_clearly_without_a_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let stderr = lomar_err(dir.path(), &["pretrain", "--device", "cuda", "--out", "x"]);
    assert!(stderr.contains("no usable GPU"), "{stderr}");
    let stderr = lomar_err(
        dir.path(),
        &[
            "pretrain",
            "--device",
            "cpu",
            "--precision",
            "bf16",
            "--out",
            "y",
        ],
    );
    assert!(stderr.contains("bf16 needs --device cuda"), "{stderr}");
}
