//! Training on image folders: every image mode, broken files skipped and counted, a
//! stream that depends on the seed alone and resumes exactly.

mod common;
mod images;

use std::fs;
use std::path::Path;
use std::sync::Arc;

use common::{lomar, lomar_err, lomar_ok};
use lomar::config::preset;
use lomar::data::folder::ImageFolder;
use lomar::data::loader::{Loader, LoaderOptions};
use lomar::io::checkpoint::CheckpointFile;

fn loader(root: &Path, threads: usize, next: u64, skipped: &[String]) -> Loader {
    let opts = LoaderOptions {
        side: 16,
        seed: 9,
        threads,
        prefetch: 5,
    };
    let folder = ImageFolder::scan(root).unwrap();
    Loader::open(Arc::new(folder), opts, next, skipped).unwrap()
}

fn take(loader: &mut Loader, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|_| {
            let mut image = vec![0; 3 * 16 * 16];
            loader.next_into(&mut image).unwrap();
            image
        })
        .collect()
}

#[test]
fn the_stream_depends_on_the_seed_alone_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mixed = images::mixed_folder(dir.path());
    // 20 images: two and a half passes over the 8 usable files.
    let mut one = loader(dir.path(), 1, 0, &[]);
    let stream = take(&mut one, 20);
    assert_eq!(one.skipped(), mixed.bad.len() as u64);
    // Two whole passes (28 positions, 16 images), then 4 images and at most 6 skips.
    assert!((32..=38).contains(&one.position()), "{}", one.position());
    let mut three = loader(dir.path(), 3, 0, &[]);
    assert_eq!(
        take(&mut three, 20),
        stream,
        "the thread count changed the stream"
    );
    for (i, image) in stream.iter().enumerate() {
        // Each epoch crops and flips afresh: no image repeats.
        assert!(!stream[..i].contains(image), "image {i} repeats");
    }

    // Stop after 7 images, continue from the saved position in a new loader.
    let mut first = loader(dir.path(), 2, 0, &[]);
    take(&mut first, 7);
    let (position, skipped) = (first.position(), first.skipped_keys());
    assert_eq!(first.epoch_len(), 14);
    drop(first);
    let mut resumed = loader(dir.path(), 2, position, &skipped);
    assert_eq!(take(&mut resumed, 13), stream[7..]);
    assert_eq!(resumed.skipped(), 6);
    assert_eq!(resumed.skipped_keys().len(), 6);
}

#[test]
fn training_skips_each_broken_file_once_with_a_warning_and_counts_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mixed = images::mixed_folder(&d.join("imgs"));
    let mut args = vec!["pretrain", "--data", "imgs", "--out", "run", "--steps", "3"];
    args.extend(images::SMALL_RUN);
    let out = lomar(d, &args);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("data: imgs (14 files, epoch 0"), "{stdout}");
    // 12 images need more than one pass over the 8 usable files: every broken file is
    // met, some twice, and each is reported exactly once.
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("warning: skipping"))
        .collect();
    assert_eq!(warnings.len(), mixed.bad.len(), "{stderr}");
    for bad in &mixed.bad {
        assert_eq!(
            warnings.iter().filter(|w| w.contains(bad)).count(),
            1,
            "{bad}: {stderr}"
        );
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    let last = stdout.lines().rfind(|l| l.starts_with("step ")).unwrap();
    assert!(last.contains("| skipped 6 files |"), "{last}");
    let records = images::metrics(&d.join("run"));
    assert_eq!(records.len(), 3);
    assert_eq!(records[2]["skipped_files"], 6);
    assert!(records
        .iter()
        .all(|r| r["loss"].as_f64().unwrap().is_finite()));
    let ck = CheckpointFile::open(&d.join("run/checkpoint.safetensors"))
        .unwrap()
        .load(&preset("tiny").unwrap())
        .unwrap();
    let folder = ck.data.folder.expect("the checkpoint records the folder");
    assert_eq!((folder.files, folder.skipped.len()), (14, 6));
}

#[test]
fn a_resumed_folder_run_continues_the_same_stream() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    images::mixed_folder(&d.join("imgs"));
    let mut whole = vec![
        "pretrain", "--data", "imgs", "--out", "whole", "--steps", "4",
    ];
    whole.extend(images::SMALL_RUN);
    lomar_ok(d, &whole);
    let mut split = vec![
        "pretrain",
        "--data",
        "imgs",
        "--out",
        "split",
        "--steps",
        "4",
        "--stop-after",
        "2",
    ];
    split.extend(images::SMALL_RUN);
    lomar_ok(d, &split);
    images::resume_matches_whole(d, "3");
}

#[test]
fn a_folder_without_a_usable_image_stops_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::create_dir_all(d.join("bad/x")).unwrap();
    fs::write(d.join("bad/x/a.jpg"), b"").unwrap();
    fs::write(d.join("bad/b.png"), b"nope").unwrap();
    let args = [
        "pretrain",
        "--data",
        "bad",
        "--out",
        "run",
        "--steps",
        "2",
        "--warmup-steps",
        "1",
    ];
    let stderr = lomar_err(d, &args);
    assert!(
        stderr.contains("no usable image among its 2 files"),
        "{stderr}"
    );
    assert!(!d.join("run/metrics.jsonl").exists());
    fs::create_dir_all(d.join("none/sub")).unwrap();
    let stderr = lomar_err(d, &["pretrain", "--data", "none", "--out", "run2"]);
    assert!(stderr.contains("no files in this folder tree"), "{stderr}");
    let stderr = lomar_err(d, &["pretrain", "--data", "missing", "--out", "run3"]);
    assert!(stderr.contains("--data missing: cannot open"), "{stderr}");
}

#[test]
fn a_synthetic_run_cannot_resume_on_a_folder() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    images::mixed_folder(&d.join("imgs"));
    let mut args = vec![
        "pretrain",
        "--out",
        "run",
        "--steps",
        "2",
        "--stop-after",
        "1",
    ];
    args.extend(images::SMALL_RUN);
    lomar_ok(d, &args);
    let stderr = lomar_err(
        d,
        &[
            "pretrain",
            "--resume",
            "run/checkpoint.safetensors",
            "--out",
            "run",
            "--data",
            "imgs",
        ],
    );
    assert!(
        stderr.contains("trained on the embedded synthetic images"),
        "{stderr}"
    );
}

#[test]
fn sample_batch_and_bench_read_folders() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    images::mixed_folder(&d.join("imgs"));
    lomar_ok(
        d,
        &[
            "sample-batch",
            "--data",
            "imgs",
            "--out",
            "b.safetensors",
            "--batch",
            "3",
        ],
    );
    let m = preset("tiny").unwrap();
    let batch = lomar::io::batch_file::read(&d.join("b.safetensors"), &m).unwrap();
    assert_eq!(batch.images_len, 3);
    let stdout = lomar_ok(
        d,
        &[
            "bench",
            "--data",
            "imgs",
            "--batch",
            "4",
            "--warmup",
            "0",
            "--timed-steps",
            "1",
            "--loader-threads",
            "2",
            "--json",
            "bench.json",
        ],
    );
    assert!(
        stdout.contains("images/s alone (256 images, 2 threads"),
        "{stdout}"
    );
    assert!(stdout.contains("6 files skipped"), "{stdout}");
    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(d.join("bench.json")).unwrap()).unwrap();
    let loader = &json["report"]["loader"];
    assert_eq!(loader["images"], 256);
    let (images_per_s, seconds) = (
        loader["images_per_s"].as_f64().unwrap(),
        loader["seconds"].as_f64().unwrap(),
    );
    assert!(images_per_s > 0.0 && (images_per_s * seconds - 256.0).abs() < 1e-6);
}
