//! Sharded data sets end to end: `lomar shards` converts generated folders, the shards are
//! standard tar files written the same way every time, `--data` reads them for training
//! (resuming bit for bit), evaluation and benchmarks, and broken shards are refused or
//! skipped with messages that name the shard and member.

mod common;
mod images;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::{lomar, lomar_err, lomar_ok};
use lomar::config::preset;
use lomar::data::augment::{load_centred, Augment};
use lomar::data::decode::Decoder;
use lomar::data::loader::{Loader, LoaderOptions, Source};
use lomar::data::shards::{Part, ShardIndex, ShardSet, ShardStream, INDEX_FILE};
use lomar::io::checkpoint::CheckpointFile;

/// `lomar shards --data src --out out` with `extra` flags; returns stdout.
fn convert(d: &Path, src: &str, out: &str, extra: &[&str]) -> String {
    lomar_ok(
        d,
        &[&["shards", "--data", src, "--out", out][..], extra].concat(),
    )
}

fn files_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

fn index(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(dir.join(INDEX_FILE)).unwrap()).unwrap()
}

fn write_index(dir: &Path, index: &serde_json::Value) {
    fs::write(dir.join(INDEX_FILE), serde_json::to_string(index).unwrap()).unwrap();
}

/// Ten photo-like images of 120 × 90 and 90 × 120, two per class folder, and one file
/// at the root.
fn photo_folder(root: &Path) {
    for i in 0..10u32 {
        let (w, h) = if i % 2 == 0 { (120, 90) } else { (90, 120) };
        let path = root.join(format!("class_{}/img_{i}.jpg", i / 2));
        images::save(images::picture(w, h, i + 1).into(), &path);
    }
    images::save(images::picture(64, 64, 99).into(), &root.join("loose.png"));
}

#[test]
fn shards_are_standard_tars_written_identically_every_time() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mixed = images::mixed_folder(&d.join("imgs"));
    let first = convert(
        d,
        "imgs",
        "a",
        &["--max-side", "64", "--shard-size", "8KiB"],
    );
    assert!(first.contains("wrote 8 samples of 3 classes in"), "{first}");
    assert!(first.contains("6 of 14 files skipped"), "{first}");
    // Another thread count, and converting over a previous conversion: the same bytes.
    convert(
        d,
        "imgs",
        "b",
        &["--max-side", "64", "--shard-size", "8KiB", "--threads", "1"],
    );
    convert(
        d,
        "imgs",
        "b",
        &["--max-side", "64", "--shard-size", "8KiB", "--threads", "3"],
    );
    let (a, b) = (files_of(&d.join("a")), files_of(&d.join("b")));
    assert!(a.len() > 2, "8 KiB shards: several of them ({})", a.len());
    assert_eq!(a, b, "a second conversion wrote other bytes");

    let idx = index(&d.join("a"));
    assert_eq!(
        idx["classes"],
        serde_json::json!(["class_a", "class_b", "class_c"])
    );
    let skipped: Vec<&str> = idx["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["file"].as_str().unwrap())
        .collect();
    let mut bad = mixed.bad.clone();
    bad.sort();
    assert_eq!(skipped, bad);

    // The system's tar lists every member: fixed owner, mode and time, keys in order,
    // an image and a class per sample.
    let mut members = Vec::new();
    let mut total = 0;
    for (name, bytes) in &a {
        if !name.ends_with(".tar") {
            continue;
        }
        let out = Command::new("tar")
            .args(["-tvf", name])
            .current_dir(d.join("a"))
            .output()
            .expect("a tar program");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            assert!(line.starts_with("-rw-r--r-- 0/0"), "{line}");
            assert!(line.contains("1970-01-01"), "{line}");
            members.push(line.rsplit(' ').next().unwrap().to_string());
        }
        // And the tar crate reads the same members with the sizes the index gives.
        let mut archive = tar::Archive::new(&bytes[..]);
        total += archive.entries().unwrap().count();
    }
    assert_eq!(total, members.len());
    let want: Vec<String> = (0..8)
        .flat_map(|i| [format!("{i:09}.jpg"), format!("{i:09}.cls")])
        .collect();
    assert_eq!(members, want);
    let set = ShardSet::open(&d.join("a")).unwrap();
    let mut decoder = Decoder::default();
    for id in 0..8 {
        let image = set.image(id, &mut decoder).unwrap();
        assert!(image.width.max(image.height) <= 64);
        assert!(set.label(id).unwrap() < 3);
    }
}

#[test]
fn shard_images_stay_within_the_stated_tolerance_of_the_folder_pipeline() {
    // Each class holds one image, so a sample's class names its source file.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for i in 0..4u32 {
        let (w, h) = [(400, 300), (300, 400), (256, 256), (500, 200)][i as usize];
        images::save(
            images::picture(w, h, i + 3).into(),
            &d.join(format!("imgs/c{i}/x.png")),
        );
    }
    convert(d, "imgs", "jpeg", &["--max-side", "160"]);
    convert(d, "imgs", "raw", &["--max-side", "160", "--format", "raw"]);
    // At evaluation (the centred square at 64 pixels, every square at least 64 wide in
    // the shards) a sample differs from the same image read from the folder only by the
    // pre-shrinking (and JPEG's loss): the mean
    // absolute difference in normalised units (ImageNet std ≈ 0.225, so 0.03 is about 2
    // levels of 255 and 0.1 about 6). Measured on these high-contrast stripes: raw up to
    // 0.03, JPEG at quality 90 0.016-0.074.
    for (format, tolerance) in [("raw", 0.03), ("jpeg", 0.1)] {
        let set = ShardSet::open(&d.join(format)).unwrap();
        let means: Vec<f32> = (0..4)
            .map(|id| {
                let class = set.label(id).unwrap();
                let want = load_centred(&d.join(format!("imgs/c{class}/x.png")), 64).unwrap();
                let got = set.centred(id, 64).unwrap();
                let diff: f32 = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).sum();
                diff / got.len() as f32
            })
            .collect();
        assert!(
            means.iter().all(|&m| m < tolerance),
            "{format}: mean |diff| per sample {means:?}"
        );
    }
    // A raw sample read from the crop's rows alone equals the crop of the whole image.
    let set = ShardSet::open(&d.join("raw")).unwrap();
    let augment = Augment { seed: 4, side: 48 };
    for id in 0..4 {
        for epoch in 0..5 {
            let mut banded = vec![0u8; 48 * 48 * 3];
            set.augmented(id, epoch, &augment, &mut Decoder::default(), &mut banded)
                .unwrap();
            let mut decoder = Decoder::default();
            let whole = set.image(id, &mut decoder).unwrap();
            let mut want = vec![0u8; 48 * 48 * 3];
            augment.apply(&whole, epoch, id, &mut want);
            assert_eq!(banded, want, "sample {id} epoch {epoch}");
        }
    }
}

#[test]
fn the_stream_is_seeded_split_by_rank_and_independent_of_the_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    photo_folder(&d.join("imgs"));
    convert(
        d,
        "imgs",
        "s",
        &["--max-side", "48", "--shard-size", "12KiB"],
    );
    let shards = index(&d.join("s"))["shards"].as_array().unwrap().len();
    assert!(shards >= 3, "{shards} shards");
    let stream = |part, buffer| {
        ShardStream::new(ShardSet::open(&d.join("s")).unwrap(), part, buffer).unwrap()
    };
    let whole = stream(Part::default(), 4);
    assert_eq!(whole.epoch_len(), 11);
    let e0 = whole.epoch_order(5, 0);
    let mut sorted = e0.clone();
    sorted.sort();
    assert_eq!(sorted, (0..11).collect::<Vec<u64>>());
    assert_eq!(e0, stream(Part::default(), 4).epoch_order(5, 0));
    assert_ne!(
        e0,
        whole.epoch_order(5, 1),
        "every epoch is shuffled afresh"
    );
    assert_ne!(e0, whole.epoch_order(6, 0), "the seed decides the order");
    // A buffer of one keeps each shard's samples together, in member order.
    let runs = stream(Part::default(), 1).epoch_order(5, 0);
    let breaks = runs.windows(2).filter(|w| w[1] != w[0] + 1).count();
    assert!(breaks < shards, "{runs:?}");
    // Two ranks read disjoint shards that together are the whole set, every epoch.
    let (r0, r1) = (
        stream(Part { rank: 0, world: 2 }, 4),
        stream(Part { rank: 1, world: 2 }, 4),
    );
    for epoch in 0..3 {
        let mut both = [r0.epoch_order(5, epoch), r1.epoch_order(5, epoch)].concat();
        both.sort();
        assert_eq!(both, (0..11).collect::<Vec<u64>>());
    }
    assert!(ShardStream::new(
        ShardSet::open(&d.join("s")).unwrap(),
        Part {
            rank: 0,
            world: shards + 1
        },
        4
    )
    .is_err());

    // The loader's output does not depend on its threads, and resumes mid-stream.
    let opts = |threads| LoaderOptions {
        side: 16,
        seed: 5,
        threads,
        prefetch: 3,
    };
    let take = |threads, next, n| {
        let mut loader = Loader::open(
            Arc::new(stream(Part::default(), 4)),
            opts(threads),
            next,
            &[],
        )
        .unwrap();
        (0..n)
            .map(|_| {
                let mut image = vec![0u8; 3 * 16 * 16];
                loader.next_into(&mut image).unwrap();
                image
            })
            .collect::<Vec<_>>()
    };
    let one = take(1, 0, 25);
    assert_eq!(take(3, 0, 25), one);
    assert_eq!(take(2, 9, 16), one[9..]);
}

#[test]
fn training_on_shards_resumes_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    photo_folder(&d.join("imgs"));
    convert(
        d,
        "imgs",
        "s",
        &["--format", "raw", "--shard-size", "140KiB"],
    );
    let run = |out: &str, extra: &[&str]| {
        let args = [
            &["pretrain", "--data", "s", "--out", out, "--steps", "5"][..],
            &images::SMALL_RUN,
            extra,
        ]
        .concat();
        lomar_ok(d, &args)
    };
    let whole = run("whole", &["--shuffle-buffer", "3"]);
    assert!(
        whole.contains("data: s (3 shards, 11 samples; rank 0 of 1"),
        "{whole}"
    );
    run("split", &["--shuffle-buffer", "3", "--stop-after", "2"]);
    // Without --data: the checkpoint names the shards, the buffer and the position.
    let err = lomar_err(
        d,
        &[
            "pretrain",
            "--resume",
            "split/checkpoint.safetensors",
            "--out",
            "split",
            "--shuffle-buffer",
            "7",
        ],
    );
    assert!(err.contains("the checkpoint's run used 3"), "{err}");
    let (a, _) = images::resume_matches_whole(d, "1");
    let shards = a.data.shards.expect("the checkpoint records the shards");
    assert_eq!(
        (shards.shards, shards.samples, shards.shuffle_buffer),
        (3, 11, 3)
    );
    assert_eq!(a.data.next_image, 20);
    // A run on shards does not resume on an image folder, nor the other way round.
    let err = lomar_err(
        d,
        &[
            "pretrain",
            "--resume",
            "split/checkpoint.safetensors",
            "--out",
            "split",
            "--data",
            "imgs",
        ],
    );
    assert!(err.contains("read the shards in s"), "{err}");
}

#[test]
fn evaluation_sample_batch_and_bench_read_shards() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    photo_folder(&d.join("imgs"));
    convert(d, "imgs", "s", &[]);
    lomar_ok(d, &["init", "--out", "p.safetensors"]);
    let stdout = lomar_ok(
        d,
        &[
            "features",
            "--checkpoint",
            "p.safetensors",
            "--data",
            "s",
            "--out",
            "f.safetensors",
        ],
    );
    assert!(
        stdout.contains("11 features with labels written"),
        "{stdout}"
    );
    let feats = lomar::eval::features::Features::load(&d.join("f.safetensors")).unwrap();
    // The loose file at the root is a class of its own, named ".".
    let want = [".", "class_0", "class_1", "class_2", "class_3", "class_4"];
    assert_eq!(feats.classes, want);
    let probe = lomar_ok(
        d,
        &[
            "probe",
            "--checkpoint",
            "p.safetensors",
            "--data",
            "s",
            "--k",
            "3",
            "--test-fraction",
            "0.5",
        ],
    );
    assert!(probe.contains("probe:"), "{probe}");
    lomar_ok(
        d,
        &[
            "visualize",
            "--checkpoint",
            "p.safetensors",
            "--data",
            "s",
            "--images",
            "2",
            "--out",
            "v.png",
        ],
    );
    assert!(d.join("v.png").is_file());
    lomar_ok(
        d,
        &[
            "sample-batch",
            "--data",
            "s",
            "--out",
            "b.safetensors",
            "--batch",
            "3",
        ],
    );
    let bench = lomar_ok(
        d,
        &[
            "bench",
            "--data",
            "s",
            "--batch",
            "4",
            "--warmup",
            "0",
            "--timed-steps",
            "1",
            "--loader-threads",
            "2",
        ],
    );
    assert!(
        bench.contains("images/s alone (256 images, 2 threads"),
        "{bench}"
    );
}

/// A converted folder of 11 samples in several JPEG shards, under `d/s`.
fn jpeg_shards(d: &Path) {
    photo_folder(&d.join("imgs"));
    convert(
        d,
        "imgs",
        "s",
        &["--max-side", "48", "--shard-size", "12KiB"],
    );
}

/// Where member `name` of `shard` starts and how long it is.
fn member(shard: &Path, name: &str) -> (u64, u64) {
    let file = fs::File::open(shard).unwrap();
    let mut archive = tar::Archive::new(file);
    let found = archive
        .entries()
        .unwrap()
        .map(|e| e.unwrap())
        .find(|e| e.path().unwrap().to_string_lossy() == name)
        .map(|e| (e.raw_file_position(), e.size()));
    found.unwrap_or_else(|| panic!("{name} not in {}", shard.display()))
}

/// Trains 3 steps on `d/s`; returns (stdout, stderr) of a run that must succeed.
fn train(d: &Path) -> (String, String) {
    let args = [
        &[
            "pretrain", "--data", "s", "--out", "run", "--steps", "3", "--force",
        ][..],
        &images::SMALL_RUN,
    ]
    .concat();
    let out = lomar(d, &args);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    (stdout, stderr)
}

#[test]
fn a_corrupt_image_a_missing_class_or_a_wrong_size_is_skipped_naming_shard_and_member() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    jpeg_shards(d);
    let idx = index(&d.join("s"));
    let first_shard = d.join("s").join(idx["shards"][0]["file"].as_str().unwrap());
    // Sample 1's JPEG overwritten in place with zeros: not an image any more.
    let (offset, len) = member(&first_shard, "000000001.jpg");
    let mut bytes = fs::read(&first_shard).unwrap();
    bytes[offset as usize..(offset + len) as usize].fill(0);
    // Sample 0 loses its .cls: the tar is rewritten without it, the index's size updated.
    let mut rebuilt = tar::Builder::new(Vec::new());
    let mut archive = tar::Archive::new(&bytes[..]);
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path().unwrap().to_string_lossy() != "000000000.cls" {
            let header = e.header().clone();
            rebuilt.append(&header, &mut e).unwrap();
        }
    }
    let rebuilt = rebuilt.into_inner().unwrap();
    fs::write(&first_shard, &rebuilt).unwrap();
    let mut idx = idx;
    idx["shards"][0]["bytes"] = serde_json::json!(rebuilt.len());
    // The index gives the first sample of the second shard another size than its JPEG's.
    let resized = idx["shards"][0]["sizes"].as_array().unwrap().len();
    idx["shards"][1]["sizes"][0] = serde_json::json!([1, 1]);
    write_index(&d.join("s"), &idx);

    let (stdout, stderr) = train(d);
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("warning: skipping"))
        .collect();
    assert_eq!(warnings.len(), 3, "{stderr}");
    let shard_name = idx["shards"][0]["file"].as_str().unwrap();
    assert!(
        warnings.iter().any(|w| w.contains("000000000.jpg in")
            && w.contains(shard_name)
            && w.contains("has no 000000000.cls member")),
        "{stderr}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("000000001.jpg in") && w.contains("not a JPEG or PNG")),
        "{stderr}"
    );
    let resized = format!("{resized:09}");
    assert!(
        warnings
            .iter()
            .any(|w| w.contains(&format!("{resized}.jpg in")) && w.contains("the index says 1x1")),
        "{stderr}"
    );
    let last = stdout.lines().rfind(|l| l.starts_with("step ")).unwrap();
    assert!(last.contains("| skipped 3 files |"), "{last}");
    assert_eq!(images::metrics(&d.join("run"))[2]["skipped_files"], 3);
    let ck = CheckpointFile::open(&d.join("run/checkpoint.safetensors"))
        .unwrap()
        .load(&preset("tiny").unwrap())
        .unwrap();
    assert_eq!(
        ck.data.shards.unwrap().skipped,
        ["000000000", "000000001", resized.as_str()]
    );
}

#[test]
fn truncated_missing_or_misindexed_shards_are_refused_naming_the_shard() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    jpeg_shards(d);
    let s = d.join("s");
    let good_index = index(&s);
    let name = |i: usize| {
        good_index["shards"][i]["file"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let pretrain = [
        "pretrain",
        "--data",
        "s",
        "--out",
        "run",
        "--steps",
        "1",
        "--warmup-steps",
        "0",
        "--force",
    ];
    let restore = || {
        convert(
            d,
            "imgs",
            "s",
            &["--max-side", "48", "--shard-size", "12KiB"],
        );
    };

    // Cut short: the size disagrees with the index.
    let second = s.join(name(1));
    let bytes = fs::read(&second).unwrap();
    fs::write(&second, &bytes[..bytes.len() / 2]).unwrap();
    let err = lomar_err(d, &pretrain);
    assert!(
        err.contains(&format!(
            "shard {} is {} bytes, the index says {}",
            name(1),
            bytes.len() / 2,
            bytes.len()
        )),
        "{err}"
    );
    // Cut short inside a member, with the index edited to agree on the size.
    let mut idx = good_index.clone();
    idx["shards"][1]["bytes"] = serde_json::json!(bytes.len() / 2);
    write_index(&s, &idx);
    let err = lomar_err(d, &pretrain);
    assert!(err.contains(&format!("shard {}", name(1))), "{err}");
    assert!(err.contains("truncated"), "{err}");
    restore();

    // The index lists a sample the shard does not hold.
    let mut idx = good_index.clone();
    idx["shards"][0]["sizes"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!([48, 36]));
    write_index(&s, &idx);
    let err = lomar_err(d, &pretrain);
    let held = good_index["shards"][0]["sizes"].as_array().unwrap().len();
    assert!(
        err.contains(&format!(
            "shard {} holds {held} samples, the index says {}",
            name(0),
            held + 1
        )),
        "{err}"
    );
    // Shards swapped: the keys give them away.
    write_index(&s, &good_index);
    let (a, b) = (
        fs::read(s.join(name(0))).unwrap(),
        fs::read(s.join(name(2))).unwrap(),
    );
    if a.len() == b.len() {
        fs::write(s.join(name(0)), &b).unwrap();
        let err = lomar_err(d, &pretrain);
        assert!(
            err.contains("where the index expects sample 000000000"),
            "{err}"
        );
    }
    restore();

    // A shard missing, a malformed index, an index of another version.
    fs::remove_file(s.join(name(2))).unwrap();
    let err = lomar_err(d, &pretrain);
    assert!(
        err.contains(&format!("cannot open shard {}", name(2))),
        "{err}"
    );
    fs::write(s.join(INDEX_FILE), b"{\"format\": 3}").unwrap();
    let err = lomar_err(d, &pretrain);
    assert!(err.contains("is not a lomar shard index"), "{err}");
    let mut idx = good_index.clone();
    idx["version"] = serde_json::json!(99);
    write_index(&s, &idx);
    let err = lomar_err(d, &pretrain);
    assert!(err.contains("version 99"), "{err}");
    let mut idx = good_index.clone();
    idx["shards"][0]["file"] = serde_json::json!("../imgs/loose.png");
    write_index(&s, &idx);
    let err = lomar_err(d, &pretrain);
    assert!(err.contains("is not a file in the folder"), "{err}");
}

#[test]
fn shards_of_nothing_usable_stop_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    jpeg_shards(d);
    let s = d.join("s");
    // Every image member zeroed.
    let idx: ShardIndex = serde_json::from_value(index(&s)).unwrap();
    for shard in &idx.shards {
        let path = s.join(&shard.file);
        let mut bytes = fs::read(&path).unwrap();
        let file = fs::File::open(&path).unwrap();
        let mut archive = tar::Archive::new(file);
        for e in archive.entries().unwrap() {
            let e = e.unwrap();
            if e.path().unwrap().to_string_lossy().ends_with(".jpg") {
                let (o, n) = (e.raw_file_position() as usize, e.size() as usize);
                bytes[o..o + n].fill(0);
            }
        }
        fs::write(&path, bytes).unwrap();
    }
    let err = lomar_err(
        d,
        &[
            "pretrain",
            "--data",
            "s",
            "--out",
            "run",
            "--steps",
            "1",
            "--warmup-steps",
            "0",
        ],
    );
    assert!(
        err.contains("no usable image among its 11 samples"),
        "{err}"
    );
    // A folder with nothing convertible is refused too, and writes no index.
    fs::create_dir_all(d.join("bad")).unwrap();
    fs::write(d.join("bad/a.jpg"), b"").unwrap();
    let out = lomar(d, &["shards", "--data", "bad", "--out", "none"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("warning: skipping bad/a.jpg: empty file"),
        "{err}"
    );
    assert!(
        err.contains("error: --data bad: none of its 1 files could be converted"),
        "{err}"
    );
    assert!(!d.join("none").join(INDEX_FILE).exists());
    // --out holding other files is refused.
    let err = lomar_err(d, &["shards", "--data", "imgs", "--out", "imgs"]);
    assert!(err.contains("which lomar shards did not write"), "{err}");
}
