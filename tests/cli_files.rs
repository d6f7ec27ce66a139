//! The file-driven commands: sample-batch → init → grad round trip, and every malformed
//! batch, parameter and checkpoint file refused with an error naming the problem.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{lomar_err, lomar_ok};
use lomar::backend::Backend;
use lomar::config::preset;
use lomar::cpu::CpuBackend;
use lomar::data::BatchSource;
use lomar::io::tensor_file::TensorFile;
use lomar::params::ParamLayout;
use safetensors::{Dtype, SafeTensors};

/// Changes one tensor of a file, or removes it by returning `None`.
type Edit = Box<dyn Fn(Raw) -> Option<Raw>>;

/// A tensor as raw little-endian bytes, for building malformed files.
#[derive(Clone)]
struct Raw {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn read_raw(path: &Path) -> (Vec<Raw>, HashMap<String, String>) {
    let bytes = std::fs::read(path).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(name, t)| Raw {
            name,
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
            bytes: t.data().to_vec(),
        })
        .collect();
    (tensors, header.metadata().clone().unwrap_or_default())
}

fn write_raw(path: &Path, tensors: &[Raw], meta: &HashMap<String, String>) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|t| {
            let view =
                safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap();
            (t.name.clone(), view)
        })
        .collect();
    let bytes = safetensors::serialize(views, &Some(meta.clone())).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// Copies `src` to `dst` with one tensor changed (or removed, when `edit` returns None).
fn edited(src: &Path, dst: &Path, name: &str, edit: impl FnOnce(Raw) -> Option<Raw>) {
    let (tensors, meta) = read_raw(src);
    let mut out = Vec::new();
    let mut edit = Some(edit);
    for t in tensors {
        if t.name == name {
            out.extend((edit.take().unwrap())(t));
        } else {
            out.push(t);
        }
    }
    assert!(edit.is_none(), "{src:?} has no tensor {name}");
    write_raw(dst, &out, &meta);
}

fn ints_of(t: &Raw) -> Vec<i64> {
    assert_eq!(t.dtype, Dtype::I64);
    t.bytes
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn with_ints(t: Raw, dtype: Dtype, values: &[i64]) -> Raw {
    let bytes = match dtype {
        Dtype::I64 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::I32 => values
            .iter()
            .flat_map(|&v| (v as i32).to_le_bytes())
            .collect(),
        Dtype::U32 => values
            .iter()
            .flat_map(|&v| (v as u32).to_le_bytes())
            .collect(),
        Dtype::F32 => values
            .iter()
            .flat_map(|&v| (v as f32).to_le_bytes())
            .collect(),
        other => panic!("{other:?}"),
    };
    Raw { dtype, bytes, ..t }
}

/// Every tensor of a gradient file, by name.
fn gradient_file(path: &Path) -> Vec<(String, Vec<f32>)> {
    let (tensors, _) = read_raw(path);
    let mut out: Vec<(String, Vec<f32>)> = tensors
        .into_iter()
        .map(|t| {
            let values = t
                .bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (t.name, values)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// A batch, parameters and their gradient file, made with the CLI in `d`.
fn round_trip(d: &Path) {
    lomar_ok(
        d,
        &[
            "sample-batch",
            "--out",
            "b.safetensors",
            "--batch",
            "3",
            "--seed",
            "5",
        ],
    );
    lomar_ok(d, &["init", "--out", "p.safetensors", "--seed", "2"]);
    lomar_ok(
        d,
        &[
            "grad",
            "--params",
            "p.safetensors",
            "--batch",
            "b.safetensors",
            "--out",
            "g.safetensors",
        ],
    );
}

#[test]
fn grad_writes_the_loss_and_every_gradient_the_backend_computes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    round_trip(d);

    let m = preset("tiny").unwrap();
    let layout = ParamLayout::new(&m);
    let batch = BatchSource::new(&m, 5).next_batch(3).unwrap();
    let mut backend = CpuBackend::new(&m, layout.init(2)).unwrap();
    backend.zero_grads().unwrap();
    let loss = backend.forward_backward(&batch, 1.0).unwrap();
    let grads = backend.grads().unwrap();

    let g = TensorFile::open(&d.join("g.safetensors"), "gradient file").unwrap();
    let (shape, file_loss) = g.f32("loss").unwrap();
    assert!(shape.is_empty(), "loss shape {shape:?}");
    assert!(file_loss[0].is_finite() && file_loss[0] > 0.0);
    assert_eq!(file_loss[0].to_bits(), loss.to_bits());
    for e in layout.entries() {
        let values = g.f32_exact(&e.name, &e.shape).unwrap();
        assert_eq!(values, grads[e.range()], "{}", e.name);
    }
    assert!(grads.iter().any(|&v| v != 0.0));
}

#[test]
fn integer_tensors_may_be_i32_i64_or_u32() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    round_trip(d);
    let reference = gradient_file(&d.join("g.safetensors"));
    for dtype in [Dtype::I32, Dtype::U32] {
        // Both integer tensors rewritten in `dtype`, one after the other.
        for (from, name) in [
            ("b.safetensors", "mask_index"),
            ("b2.safetensors", "window_origin"),
        ] {
            edited(&d.join(from), &d.join("b2.safetensors"), name, |t| {
                let v = ints_of(&t);
                Some(with_ints(t, dtype, &v))
            });
        }
        lomar_ok(
            d,
            &[
                "grad",
                "--params",
                "p.safetensors",
                "--batch",
                "b2.safetensors",
                "--out",
                "g2.safetensors",
            ],
        );
        assert!(
            gradient_file(&d.join("g2.safetensors")) == reference,
            "{dtype:?}"
        );
    }
}

#[test]
fn malformed_batch_files_are_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    round_trip(d);
    let src = d.join("b.safetensors");
    let bad = d.join("bad.safetensors");
    let grad = |d: &Path| {
        lomar_err(
            d,
            &[
                "grad",
                "--params",
                "p.safetensors",
                "--batch",
                "bad.safetensors",
                "--out",
                "never.safetensors",
            ],
        )
    };
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "mask_index",
            Box::new(|_| None),
            "no tensor named `mask_index`",
        ),
        (
            "images",
            Box::new(|t| {
                let half = t.bytes.len() / 2;
                Some(Raw {
                    shape: vec![3, 3, 32, 16],
                    bytes: t.bytes[..half].to_vec(),
                    ..t
                })
            }),
            "tensor `images` has shape [3, 3, 32, 16], want [B, 3, 32, 32]",
        ),
        (
            "images",
            Box::new(|t| {
                Some(Raw {
                    dtype: Dtype::I32,
                    ..t
                })
            }),
            "tensor `images` has dtype I32, want F32",
        ),
        (
            "mask_index",
            Box::new(|t| {
                let v = ints_of(&t);
                Some(with_ints(t, Dtype::F32, &v))
            }),
            "tensor `mask_index` has dtype F32, want an integer dtype",
        ),
        (
            "mask_index",
            Box::new(|t| {
                let mut v = ints_of(&t);
                v[11] = 16;
                Some(with_ints(t, Dtype::I64, &v))
            }),
            "mask_index: window 0 holds 16, outside 0..16",
        ),
        (
            "mask_index",
            Box::new(|t| {
                let mut v = ints_of(&t);
                v.swap(12, 13);
                Some(with_ints(t, Dtype::I64, &v))
            }),
            "mask_index: window 1 is not strictly ascending",
        ),
        (
            "mask_index",
            Box::new(|t| {
                let mut v = ints_of(&t);
                v[0] = -1;
                Some(with_ints(t, Dtype::I64, &v))
            }),
            "tensor `mask_index` holds -1 at flat index 0",
        ),
        (
            "mask_index",
            Box::new(|t| {
                let v = ints_of(&t);
                Some(Raw {
                    shape: vec![3, 2, 6, 2],
                    ..with_ints(t, Dtype::I64, &v)
                })
            }),
            "tensor `mask_index` has shape [3, 2, 6, 2], want [B=3, n_win=2, M=12]",
        ),
        (
            "window_origin",
            Box::new(|t| {
                let mut v = ints_of(&t);
                v[3] = 5;
                Some(with_ints(t, Dtype::I64, &v))
            }),
            "window_origin: value 5 at 3 is outside 0..=4",
        ),
        (
            "images",
            Box::new(|t| {
                // Two bad values far apart: the first is the one named.
                let mut bytes = t.bytes.clone();
                bytes[4 * 7000..4 * 7001].copy_from_slice(&f32::NAN.to_le_bytes());
                bytes[4 * 9000..4 * 9001].copy_from_slice(&f32::INFINITY.to_le_bytes());
                Some(Raw { bytes, ..t })
            }),
            "tensor `images`: value 7000 is not finite (NaN)",
        ),
    ];
    for (name, edit, want) in cases {
        edited(&src, &bad, name, edit);
        let stderr = grad(d);
        assert!(stderr.contains(want), "{name}: want {want:?} in {stderr}");
        assert!(!d.join("never.safetensors").exists());
    }
    std::fs::write(&bad, b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}").unwrap();
    let stderr = grad(d);
    assert!(
        stderr.contains("bad.safetensors is not a valid safetensors file"),
        "{stderr}"
    );
}

#[test]
fn malformed_parameter_files_are_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    round_trip(d);
    edited(
        &d.join("p.safetensors"),
        &d.join("p2.safetensors"),
        "blocks.1.mlp.fc2.bias",
        |_| None,
    );
    let stderr = lomar_err(
        d,
        &[
            "grad",
            "--params",
            "p2.safetensors",
            "--batch",
            "b.safetensors",
            "--out",
            "never.safetensors",
        ],
    );
    assert!(
        stderr.contains("no tensor named `blocks.1.mlp.fc2.bias`"),
        "{stderr}"
    );
    // Parameters made for another model.
    let stderr = lomar_err(
        d,
        &[
            "grad",
            "--params",
            "p.safetensors",
            "--batch",
            "b.safetensors",
            "--out",
            "never.safetensors",
            "--width",
            "32",
        ],
    );
    assert!(
        stderr.contains("width = 64 in the file, 32 requested"),
        "{stderr}"
    );
}

#[test]
fn unusable_checkpoints_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    lomar_ok(
        d,
        &[
            "pretrain",
            "--out",
            "r",
            "--steps",
            "2",
            "--warmup-steps",
            "1",
            "--batch",
            "2",
            "--log-every",
            "100",
        ],
    );
    let ck = d.join("r/checkpoint.safetensors");
    let resume = |d: &Path, path: &str, extra: &[&str]| {
        let mut args = vec!["pretrain", "--out", "r2", "--resume", path];
        args.extend_from_slice(extra);
        lomar_err(d, &args)
    };

    let stderr = resume(d, "absent.safetensors", &[]);
    assert!(
        stderr.contains("cannot read checkpoint absent.safetensors"),
        "{stderr}"
    );

    let bytes = std::fs::read(&ck).unwrap();
    std::fs::write(d.join("cut.safetensors"), &bytes[..bytes.len() - 100]).unwrap();
    let stderr = resume(d, "cut.safetensors", &[]);
    assert!(
        stderr.contains("cut.safetensors is not a valid safetensors file"),
        "{stderr}"
    );

    lomar_ok(d, &["init", "--out", "p.safetensors"]);
    let stderr = resume(d, "p.safetensors", &[]);
    assert!(
        stderr.contains("is a parameter file, not a checkpoint"),
        "{stderr}"
    );

    let stderr = resume(
        d,
        "r/checkpoint.safetensors",
        &["--depth", "3", "--window", "3"],
    );
    assert!(stderr.contains("made for a different model"), "{stderr}");
    assert!(
        stderr.contains("depth = 2 in the file, 3 requested"),
        "{stderr}"
    );
    assert!(
        stderr.contains("window = 4 in the file, 3 requested"),
        "{stderr}"
    );

    let stderr = resume(d, "r/checkpoint.safetensors", &["--seed", "9"]);
    assert!(stderr.contains("a resumed run keeps its seed"), "{stderr}");

    let stderr = resume(d, "r/checkpoint.safetensors", &[]);
    assert!(
        stderr.contains("nothing to train: the run is at step 2"),
        "{stderr}"
    );

    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "optimizer.v.head.bias",
            Box::new(|_| None),
            "no tensor named `optimizer.v.head.bias`",
        ),
        (
            "head.weight",
            Box::new(|t| {
                Some(Raw {
                    shape: vec![64, 48],
                    ..t
                })
            }),
            "tensor `head.weight` has shape [64, 48], want [48, 64]",
        ),
        (
            "norm.bias",
            Box::new(|t| {
                Some(Raw {
                    dtype: Dtype::I32,
                    ..t
                })
            }),
            "tensor `norm.bias` has dtype I32, want F32",
        ),
    ];
    for (name, edit, want) in cases {
        edited(&ck, &d.join("bad.safetensors"), name, edit);
        let stderr = resume(d, "bad.safetensors", &["--steps", "4"]);
        assert!(stderr.contains(want), "{name}: want {want:?} in {stderr}");
    }

    let (tensors, mut meta) = read_raw(&ck);
    meta.insert("config".into(), "{\"preset\":".into());
    write_raw(&d.join("bad.safetensors"), &tensors, &meta);
    let stderr = resume(d, "bad.safetensors", &[]);
    assert!(
        stderr.contains("metadata `config` is malformed"),
        "{stderr}"
    );
    meta.remove("format");
    write_raw(&d.join("bad.safetensors"), &tensors, &meta);
    let stderr = resume(d, "bad.safetensors", &[]);
    assert!(stderr.contains("is not a lomar checkpoint"), "{stderr}");
}
