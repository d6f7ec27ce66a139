//! The CUDA kernels compiled as C++ for the CPU against the shim of `kernels/emu/` and run
//! under ThreadSanitizer (docs/DESIGN.md §5): a check of indexing, fragment layouts and
//! barriers that needs no GPU. It needs a C++17 compiler with `-fsanitize=thread` (`$CXX`,
//! else `g++`); without one these tests fail, they do not skip.
//!
//! The memory-bound kernels (casts, GELU, LayerNorm, the ordered reductions, AdamW and the
//! step's divergence guard, the masked MSE) run through the drivers of `kernels/emu/`, which compare them with a C++
//! reference on odd shapes. The attention kernels run forward, backward and the table gradient's finish with the
//! launches `lomar::cuda::attention::plan` picks for an H100, on small shapes covering the
//! fast and the general kernels, and are compared with the CPU op: bf16 within 2e-2, f32
//! within 1e-5 (max-abs difference over max-abs value), as tests/cuda_attention.rs does on
//! a GPU. The global attention kernels (MAE's) run forward and backward with the launches
//! `lomar::cuda::global_attention::plan` picks, for T from 1 to 197, against
//! `cpu::ops::global_attention` with the same tolerances. Mutants of the kernel sources (a
//! barrier removed, a fragment index swapped, a cp.async wait removed, a mask or the online
//! softmax's rescale dropped) must fail: the tests prove they can.

mod attention_reference;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use half::bf16;
use lomar::cpu::ops::global_attention::{global_attention_backward, global_attention_forward};
use lomar::cuda::attention::{plan, plan_finish, AttnShape, AttnTuning, DeviceLimits, Pass};
use lomar::cuda::global_attention::{plan as global_plan, GlobalAttnShape};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use attention_reference::{Errors, Inputs, Outputs};

/// The compiler, from `$CXX` or `g++`.
fn compiler() -> String {
    std::env::var("CXX").unwrap_or_else(|_| "g++".to_string())
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Compiles `kernels/emu/{name}.cpp` of the kernel tree `kernels` (the repository's or a
/// mutated copy) under ThreadSanitizer into `dir/name`; panics with the compiler's output
/// on failure.
fn compile(kernels: &Path, dir: &Path, name: &str) -> PathBuf {
    let exe = dir.join(name);
    let mut cmd = Command::new(compiler());
    cmd.args([
        "-std=c++17",
        "-O1",
        "-g",
        "-fsanitize=thread",
        "-pthread",
        "-Wall",
        // nvcc's loop pragmas mean nothing to g++.
        "-Wno-unknown-pragmas",
        // The driver finds kernels by name with dlsym.
        "-rdynamic",
    ]);
    cmd.arg("-I")
        .arg(kernels)
        .arg("-I")
        .arg(kernels.join("emu"));
    cmd.arg(kernels.join("emu").join(format!("{name}.cpp")))
        .arg("-o")
        .arg(&exe)
        .arg("-ldl");
    let out = cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot run the C++ compiler `{}` ({e}); the kernel emulation tests need g++ with \
             ThreadSanitizer (set CXX to use another)",
            compiler()
        )
    });
    assert!(
        out.status.success(),
        "compiling {name} from {} failed:\n{}",
        kernels.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// Where the test binaries and case files go (kept by cargo between runs).
fn scratch() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kernel_emulation")
}

/// Runs an emulation binary with ThreadSanitizer stopping at the first report.
fn run(exe: &Path, args: &[&Path]) -> Output {
    Command::new(exe)
        .args(args)
        .env(
            "TSAN_OPTIONS",
            "halt_on_error=1 exitcode=66 report_signal_unsafe=0",
        )
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", exe.display()))
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn shim_primitives_follow_the_ptx_isa() {
    let dir = tempfile::tempdir().unwrap();
    let exe = compile(&repo().join("kernels"), dir.path(), "shim_test");
    let out = run(&exe, &[]);
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(out.status.success(), "{}", describe(&out));
}

/// Compiles and runs one of the kernel drivers of `kernels/emu/` (which compare kernels
/// with a C++ reference and print one line per tensor), failing on any mismatch or race.
fn run_driver(name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let exe = compile(&repo().join("kernels"), dir.path(), name);
    let out = run(&exe, &[]);
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(out.status.success(), "{}", describe(&out));
}

#[test]
fn casts_match_the_reference() {
    run_driver("elementwise_driver");
}

#[test]
fn gelu_and_its_fused_bias_gradient_match_the_reference() {
    run_driver("gelu_driver");
}

#[test]
fn layernorm_and_its_fused_backward_match_the_reference() {
    run_driver("layernorm_driver");
}

#[test]
fn partials_finish_matches_the_reference() {
    run_driver("reduce_driver");
}

#[test]
fn step_finish_and_adamw_match_the_reference_and_skip_a_diverged_step() {
    run_driver("step_driver");
}

/// The divergence guard's planted bugs: a flag that a finite step lowers again, an AdamW
/// that updates under a raised flag, a norm that is never checked. Each must fail the
/// step driver.
#[test]
fn planted_bugs_in_the_divergence_guard_are_caught() {
    let mutations = [
        (
            "flag-lowered-by-a-finite-step",
            "reduce.cu",
            "state[STATE_DIVERGED] != 0.0f || !(isfinite(loss)",
            "!(isfinite(loss)",
        ),
        (
            "adamw-ignores-the-flag",
            "adamw.cu",
            "  if (state[STATE_DIVERGED] != 0.0f) return;\n",
            "",
        ),
        (
            "norm-not-checked",
            "reduce.cu",
            "isfinite(loss) && isfinite(norm)",
            "isfinite(loss)",
        ),
    ];
    for (name, file, find, replace) in mutations {
        let kernels = mutant(name, file, find, replace);
        let exe = compile(&kernels, kernels.parent().unwrap(), "step_driver");
        let out = run(&exe, &[]);
        let failed: Vec<_> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("FAIL"))
            .map(str::to_string)
            .collect();
        assert!(!out.status.success(), "{name}: the mutant passed");
        assert!(!failed.is_empty(), "{name}: {}", describe(&out));
        println!("{name}: caught: {}", failed[0]);
    }
}

#[test]
fn masked_mse_matches_the_reference() {
    run_driver("loss_driver");
}

/// An element type of the attention kernels, with its tolerance and file format.
trait Elem {
    const NAME: &'static str;
    const TOLERANCE: f64;
    fn round(v: f64) -> f64;
    /// `v` (already rounded) as the kernels' little-endian bytes.
    fn bytes(v: &[f64]) -> Vec<u8>;
    fn values(bytes: &[u8]) -> Vec<f64>;
}

struct Bf16;
struct F32;

impl Elem for Bf16 {
    const NAME: &'static str = "bf16";
    const TOLERANCE: f64 = 2e-2;
    fn round(v: f64) -> f64 {
        bf16::from_f64(v).to_f64()
    }
    fn bytes(v: &[f64]) -> Vec<u8> {
        v.iter()
            .flat_map(|&x| bf16::from_f64(x).to_bits().to_le_bytes())
            .collect()
    }
    fn values(bytes: &[u8]) -> Vec<f64> {
        bytes
            .chunks_exact(2)
            .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f64())
            .collect()
    }
}

impl Elem for F32 {
    const NAME: &'static str = "f32";
    const TOLERANCE: f64 = 1e-5;
    fn round(v: f64) -> f64 {
        v as f32 as f64
    }
    fn bytes(v: &[f64]) -> Vec<u8> {
        v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect()
    }
    fn values(bytes: &[u8]) -> Vec<f64> {
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
            .collect()
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// One attention case: shape, element type, launch choices.
struct Case {
    shape: AttnShape,
    tuning: AttnTuning,
    seed: u64,
}

impl Case {
    fn new(window: usize, head_dim: usize, heads: usize, seqs: usize, seed: u64) -> Case {
        Case {
            shape: AttnShape {
                seqs,
                window,
                heads,
                head_dim,
            },
            tuning: AttnTuning::default(),
            seed,
        }
    }

    fn items_per_cta(mut self, items: usize) -> Case {
        self.tuning.items_per_cta = Some(items);
        self
    }

    fn general(mut self) -> Case {
        self.tuning.force_general = true;
        self
    }

    /// Writes inputs and launches into `dir`; returns the reference outputs and a label
    /// naming the kernels.
    fn prepare<E: Elem>(&self, dir: &Path) -> (Outputs, Vec<f32>, String) {
        fs::create_dir_all(dir).unwrap();
        let sh = self.shape;
        let inputs = Inputs::random(sh, self.seed, E::round);
        let device = DeviceLimits::HOPPER;
        let fwd = plan(Pass::Forward, &sh, E::NAME, &device, self.tuning).unwrap();
        let bwd = plan(Pass::Backward, &sh, E::NAME, &device, self.tuning).unwrap();
        let (finish, producers) = plan_finish(&sh, &bwd);
        let launch = format!(
            "{} {} {} {} {}\nforward {} {} {} {} {}\nbackward {} {} {} {} {}\nfinish {} {} {} {}\n",
            sh.seqs,
            sh.window,
            sh.heads,
            sh.head_dim,
            E::NAME,
            fwd.kernel,
            fwd.grid.0,
            fwd.grid.1,
            fwd.block,
            fwd.smem,
            bwd.kernel,
            bwd.grid.0,
            bwd.grid.1,
            bwd.block,
            bwd.smem,
            finish.kernel,
            finish.grid.0,
            finish.block,
            producers
        );
        fs::write(dir.join("launch.txt"), launch).unwrap();
        fs::write(dir.join("qkv.bin"), E::bytes(&inputs.qkv)).unwrap();
        fs::write(dir.join("dout.bin"), E::bytes(&inputs.dout)).unwrap();
        fs::write(dir.join("table.bin"), f32_bytes(&inputs.table)).unwrap();
        fs::write(dir.join("dtable.bin"), f32_bytes(&inputs.dtable_start)).unwrap();
        let label = format!(
            "{} K={} d={} h={} S={}: {} (grid {:?}) + {} (grid {:?})",
            E::NAME,
            sh.window,
            sh.head_dim,
            sh.heads,
            sh.seqs,
            fwd.kernel,
            fwd.grid,
            bwd.kernel,
            bwd.grid
        );
        (Outputs::reference(sh, &inputs), inputs.dtable_start, label)
    }

    /// Runs the case with `driver`: Ok(errors) when the driver exited cleanly, Err(its
    /// output) when it failed (a ThreadSanitizer report, a shim error, a crash).
    fn run<E: Elem>(&self, driver: &Path, dir: &Path) -> Result<(String, Errors), String> {
        let (want, dtable_start, label) = self.prepare::<E>(dir);
        let out = run(driver, &[dir]);
        if !out.status.success() {
            return Err(format!("{label}\n{}", describe(&out)));
        }
        let read = |name: &str| fs::read(dir.join(name)).unwrap();
        let dtable: Vec<f64> = F32::values(&read("dtable_out.bin"));
        let got = Outputs {
            out: E::values(&read("out.bin")),
            lse: F32::values(&read("lse.bin")),
            dqkv: E::values(&read("dqkv.bin")),
            dtable_added: dtable
                .iter()
                .zip(&dtable_start)
                .map(|(&after, &before)| after - before as f64)
                .collect(),
        };
        let errors = got.errors(&want);
        Ok((label, errors))
    }
}

fn within<E: Elem>(errors: &Errors) -> bool {
    errors.iter().all(|&(_, e)| e <= E::TOLERANCE)
}

fn show(errors: &Errors) -> String {
    errors.map(|(name, e)| format!("{name} {e:.2e}")).join(", ")
}

/// The attention driver built from the repository's kernels, once per test binary.
fn driver() -> &'static Path {
    static DRIVER: OnceLock<PathBuf> = OnceLock::new();
    DRIVER.get_or_init(|| {
        let dir = scratch();
        fs::create_dir_all(&dir).unwrap();
        compile(&repo().join("kernels"), &dir, "attention_driver")
    })
}

/// The vit_base-like fast case: K = 7 (T = 50, 4 warps), d = 64, two items per CTA so the
/// cp.async prefetch into the second stage and the stage swap both run.
fn vit_like() -> Case {
    Case::new(7, 64, 2, 3, 1).items_per_cta(2)
}

#[test]
fn fast_attention_kernels_match_the_cpu_op() {
    let cases = [
        vit_like(),
        // One warp (T = 5), three items in one CTA.
        Case::new(2, 32, 3, 3, 2).items_per_cta(3),
        // Two warps (T = 17), d = 80.
        Case::new(4, 80, 1, 2, 3),
        // Three warps (T = 37); d = 128 runs the fast forward and the general backward.
        Case::new(6, 128, 1, 2, 4).items_per_cta(2),
    ];
    for (i, case) in cases.iter().enumerate() {
        let dir = scratch().join(format!("fast{i}"));
        let (label, errors) = case
            .run::<Bf16>(driver(), &dir)
            .unwrap_or_else(|e| panic!("{e}"));
        println!("{label}: {}", show(&errors));
        assert!(within::<Bf16>(&errors), "{label}: {}", show(&errors));
    }
}

#[test]
fn general_attention_kernels_match_the_cpu_op() {
    let cases: [(Case, bool); 3] = [
        (Case::new(3, 32, 2, 2, 5), false),
        (Case::new(7, 64, 1, 2, 6).general(), true),
        // T = 65: past the fast kernels' 64 tokens.
        (Case::new(8, 32, 1, 1, 7), true),
    ];
    for (i, (case, in_bf16)) in cases.iter().enumerate() {
        let dir = scratch().join(format!("general{i}"));
        let result = if *in_bf16 {
            case.run::<Bf16>(driver(), &dir)
                .map(|(l, e)| (l, e, within::<Bf16>(&e)))
        } else {
            case.run::<F32>(driver(), &dir)
                .map(|(l, e)| (l, e, within::<F32>(&e)))
        };
        let (label, errors, ok) = result.unwrap_or_else(|e| panic!("{e}"));
        println!("{label}: {}", show(&errors));
        assert!(ok, "{label}: {}", show(&errors));
    }
}

/// Asserts that the mutant `name` was caught, and says how: its driver failed (a race
/// ThreadSanitizer saw, or one of the shim's own checks), or `judge` (within tolerance?,
/// the errors shown) finds its outputs out of tolerance.
fn expect_caught<R>(
    name: &str,
    outcome: Result<R, String>,
    judge: impl FnOnce(&R) -> (bool, String),
) {
    match outcome {
        Err(failure) => {
            let first = failure
                .lines()
                .find(|l| l.contains("WARNING: ThreadSanitizer") || l.starts_with("emu:"))
                .unwrap_or("the driver failed");
            println!("{name}: caught: {first}");
        }
        Ok(result) => {
            let (within, shown) = judge(&result);
            assert!(!within, "{name}: the mutant passed ({shown})");
            println!("{name}: caught: {shown}");
        }
    }
}

/// A copy of `kernels/` with `find` (which must occur exactly once in `file`) replaced.
fn mutant(name: &str, file: &str, find: &str, replace: &str) -> PathBuf {
    let dir = scratch().join(format!("mutant-{name}"));
    let kernels = dir.join("kernels");
    fs::create_dir_all(kernels.join("emu")).unwrap();
    for sub in ["", "emu"] {
        for entry in fs::read_dir(repo().join("kernels").join(sub)).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                fs::copy(&path, kernels.join(sub).join(path.file_name().unwrap())).unwrap();
            }
        }
    }
    let path = kernels.join(file);
    let source = fs::read_to_string(&path).unwrap();
    assert_eq!(
        source.matches(find).count(),
        1,
        "the mutation's anchor must occur once in {file}: {find}"
    );
    fs::write(&path, source.replace(find, replace)).unwrap();
    kernels
}

#[test]
fn planted_bugs_are_caught() {
    let mutations = [
        (
            "barrier-after-p-ds-staging",
            "attention_fast.cuh",
            "stages its outputs in its own rows of them (Q and dO are still being read).\n        __syncthreads();",
            "stages its outputs in its own rows of them (Q and dO are still being read).",
        ),
        (
            "a-fragment-rows-swapped",
            "attention_mma.cuh",
            "a[1] = pack_bf16x2(acc[2 * kk][2], acc[2 * kk][3]);",
            "a[1] = pack_bf16x2(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);",
        ),
        (
            "ldmatrix-b-halves-swapped",
            "attention_mma.cuh",
            "ldmatrix(r, m + (n0 + lane % 8 + 8 * (lane / 16)) * ld + k0 + 8 * (lane / 8 % 2));",
            "ldmatrix(r, m + (n0 + lane % 8 + 8 * (lane / 8 % 2)) * ld + k0 + 8 * (lane / 16));",
        ),
        (
            "cp-async-wait-removed",
            "attention_fast.cuh",
            "        cp_async_wait<0>();\n        // Every thread's copies of this item have landed",
            "        // Every thread's copies of this item have landed",
        ),
    ];
    for (name, file, find, replace) in mutations {
        let kernels = mutant(name, file, find, replace);
        let exe = compile(&kernels, kernels.parent().unwrap(), "attention_driver");
        let dir = kernels.parent().unwrap().join("case");
        expect_caught(name, vit_like().run::<Bf16>(&exe, &dir), |(_, errors)| {
            (within::<Bf16>(errors), show(errors))
        });
    }
}

/// Each output tensor's error against the CPU op.
type GlobalErrors = Vec<(&'static str, f64)>;

/// One global attention case (kernels/global_attention.cu): shape and input seed.
struct GlobalCase {
    shape: GlobalAttnShape,
    seed: u64,
}

impl GlobalCase {
    fn new(tokens: usize, head_dim: usize, heads: usize, seqs: usize, seed: u64) -> GlobalCase {
        GlobalCase {
            shape: GlobalAttnShape {
                seqs,
                tokens,
                heads,
                head_dim,
            },
            seed,
        }
    }

    /// Runs forward and backward with `driver` in `dir` with the launches `plan` picks for
    /// an H100, and compares out, lse and dqkv with the CPU op in f64 on the same (rounded)
    /// inputs: Ok(errors) when the driver exited cleanly, Err(its output) when it failed.
    fn run<E: Elem>(&self, driver: &Path, dir: &Path) -> Result<(String, GlobalErrors), String> {
        fs::create_dir_all(dir).unwrap();
        let sh = self.shape;
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let mut draw = |n: usize, scale: f64| -> Vec<f64> {
            (0..n)
                .map(|_| E::round(rng.gen_range(-scale..scale)))
                .collect()
        };
        let rows = sh.seqs * sh.tokens;
        // Logits of a few units: the softmax is far from uniform.
        let qkv = draw(rows * 3 * sh.width(), 2.0);
        let dout = draw(rows * sh.width(), 1.0);
        let device = DeviceLimits::HOPPER;
        let mut launch = format!(
            "{} {} {} {} {}\n",
            sh.seqs,
            sh.tokens,
            sh.heads,
            sh.head_dim,
            E::NAME
        );
        let mut names = Vec::new();
        for pass in [Pass::Forward, Pass::Backward] {
            for l in global_plan(pass, &sh, E::NAME, &device).unwrap() {
                let (x, y, b, s) = (l.grid.0, l.grid.1, l.block, l.smem);
                launch += &format!("{} {x} {y} 1 {b} {s}\n", l.kernel);
                names.push(format!("{} (grid {:?})", l.kernel, l.grid));
            }
        }
        fs::write(dir.join("launch.txt"), launch).unwrap();
        fs::write(dir.join("qkv.bin"), E::bytes(&qkv)).unwrap();
        fs::write(dir.join("dout.bin"), E::bytes(&dout)).unwrap();
        let label = format!(
            "{} T={} d={} h={} S={}: {}",
            E::NAME,
            sh.tokens,
            sh.head_dim,
            sh.heads,
            sh.seqs,
            names.join(" + ")
        );

        let (mut out, mut lse) = (vec![0.0; rows * sh.width()], vec![0.0; rows * sh.heads]);
        global_attention_forward(&mut out, &mut lse, &qkv, sh.tokens, sh.heads);
        let mut dqkv = vec![0.0; qkv.len()];
        global_attention_backward(&mut dqkv, &dout, &qkv, &lse, sh.tokens, sh.heads);

        let result = run(driver, &[dir]);
        if !result.status.success() {
            return Err(format!("{label}\n{}", describe(&result)));
        }
        let read = |name: &str| fs::read(dir.join(name)).unwrap();
        let got_dqkv = E::values(&read("dqkv.bin"));
        let mut errors = vec![
            ("out", max_relative(&E::values(&read("out.bin")), &out)),
            ("lse", max_relative(&F32::values(&read("lse.bin")), &lse)),
        ];
        // dq, dk and dv apart: each third of every row.
        let width = sh.width();
        for (part, name) in ["dq", "dk", "dv"].into_iter().enumerate() {
            let third = |v: &[f64]| -> Vec<f64> {
                v.chunks(3 * width)
                    .flat_map(|row| row[part * width..][..width].to_vec())
                    .collect()
            };
            errors.push((name, max_relative(&third(&got_dqkv), &third(&dqkv))));
        }
        Ok((label, errors))
    }
}

/// max|got - want| / max|want| (the absolute error where `want` is all zero, as dq and dk
/// are for T = 1); infinite when a value is not finite.
fn max_relative(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
    let err = got.iter().zip(want).fold(0.0f64, |m, (g, w)| {
        if g.is_finite() {
            m.max((g - w).abs())
        } else {
            f64::INFINITY
        }
    });
    if scale > 0.0 {
        err / scale
    } else {
        err
    }
}

fn global_within(errors: &[(&str, f64)], tolerance: f64) -> bool {
    errors.iter().all(|&(_, e)| e <= tolerance)
}

fn show_global(errors: &[(&str, f64)]) -> String {
    errors
        .iter()
        .map(|(name, e)| format!("{name} {e:.2e}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The global attention driver built from the repository's kernels, once per test binary.
fn global_driver() -> &'static Path {
    static DRIVER: OnceLock<PathBuf> = OnceLock::new();
    DRIVER.get_or_init(|| {
        let dir = scratch();
        fs::create_dir_all(&dir).unwrap();
        compile(&repo().join("kernels"), &dir, "global_attention_driver")
    })
}

/// Every T of MAE's that the emulation runs in reasonable time (T = 785 takes minutes under
/// ThreadSanitizer): one token, ragged and whole tiles of 64, the encoder's 50 at 224 and the
/// decoder's 197; head dims 32 and 64, and 80 and 128 once.
#[test]
fn global_attention_kernels_match_the_cpu_op() {
    let bf16_cases = [
        GlobalCase::new(1, 32, 2, 2, 11),
        GlobalCase::new(17, 64, 2, 2, 12),
        GlobalCase::new(50, 64, 1, 2, 13),
        GlobalCase::new(64, 32, 2, 1, 14),
        GlobalCase::new(65, 64, 1, 1, 15),
        GlobalCase::new(65, 80, 1, 1, 16),
        GlobalCase::new(17, 128, 1, 1, 17),
        GlobalCase::new(197, 32, 1, 1, 18),
    ];
    let f32_cases = [
        GlobalCase::new(1, 64, 1, 2, 21),
        GlobalCase::new(50, 32, 2, 1, 22),
        GlobalCase::new(130, 64, 1, 1, 23),
        GlobalCase::new(197, 32, 1, 1, 24),
    ];
    let mut failures = Vec::new();
    for (i, case) in bf16_cases.iter().enumerate() {
        let dir = scratch().join(format!("global-bf16-{i}"));
        let (label, errors) = case
            .run::<Bf16>(global_driver(), &dir)
            .unwrap_or_else(|e| panic!("{e}"));
        println!("{label}: {}", show_global(&errors));
        if !global_within(&errors, Bf16::TOLERANCE) {
            failures.push(label);
        }
    }
    for (i, case) in f32_cases.iter().enumerate() {
        let dir = scratch().join(format!("global-f32-{i}"));
        let (label, errors) = case
            .run::<F32>(global_driver(), &dir)
            .unwrap_or_else(|e| panic!("{e}"));
        println!("{label}: {}", show_global(&errors));
        if !global_within(&errors, F32::TOLERANCE) {
            failures.push(label);
        }
    }
    assert!(failures.is_empty(), "off: {failures:#?}");
}

#[test]
fn planted_bugs_in_the_global_attention_are_caught() {
    let mutations = [
        (
            "stage-barrier-removed",
            "        cp_async_wait<0>();\n        // Tile t has landed for every thread, and every thread is done with tile t-1,\n        // whose stage the copies of tile t+1 now overwrite.\n        __syncthreads();",
            "        cp_async_wait<0>();",
        ),
        (
            "cp-async-wait-removed",
            "        cp_async_wait<0>();\n        // Tile t has landed",
            "        // Tile t has landed",
        ),
        (
            "ragged-keys-unmasked",
            "return key < tokens ? s * scale : -INFINITY;",
            "return s * scale;",
        ),
        (
            "online-rescale-dropped",
            "for (int i = 0; i < 4; ++i) o[nt][i] *= rescale[i / 2];",
            "for (int i = 0; i < 4; ++i) o[nt][i] *= 1.0f;",
        ),
    ];
    // Two tiles of keys, the second ragged.
    let case = GlobalCase::new(100, 32, 1, 1, 31);
    for (name, find, replace) in mutations {
        let kernels = mutant(
            &format!("global-{name}"),
            "global_attention.cu",
            find,
            replace,
        );
        let exe = compile(
            &kernels,
            kernels.parent().unwrap(),
            "global_attention_driver",
        );
        let dir = kernels.parent().unwrap().join("case");
        expect_caught(name, case.run::<Bf16>(&exe, &dir), |(_, errors)| {
            (global_within(errors, Bf16::TOLERANCE), show_global(errors))
        });
    }
}

/// Writes a batch of 8-bit images and the CPU op's gather of it into `dir`, the case of
/// kernels/emu/window_gather_driver.cpp.
fn window_gather_case(dir: &Path, m: &lomar::config::ModelConfig, seed: u64) {
    use lomar::cpu::ops::window_gather::window_gather;
    use lomar::data::batch::{Batch, Pixels};
    use lomar::data::sampler::Sampler;

    fs::create_dir_all(dir).unwrap();
    let images_len = 2;
    let windows = Sampler::new(seed).sample(m, images_len);
    // Every byte value, in a scrambled order.
    let bytes: Vec<u8> = (0..images_len * 3 * m.image * m.image)
        .map(|i| (i as u64 * 7919 + seed) as u8)
        .collect();
    let batch = Batch {
        images_len,
        images: Pixels::Bytes(bytes.clone()),
        window_origin: windows.origin,
        mask_index: windows.mask,
    };
    batch.validate(m).unwrap();
    let want = window_gather::<f32>(m, &batch);
    let seqs = batch.sequences(m);
    // 128 threads: ROW_THREADS of src/cuda/launch.rs.
    let case = format!(
        "{seqs} {} {} {} {} {} {} {} 128\n",
        m.windows_per_image,
        m.image,
        m.patch,
        m.window,
        i32::from(m.norm_pix),
        seqs * m.visible_per_window(),
        seqs * m.masked_per_window()
    );
    fs::write(dir.join("case.txt"), case).unwrap();
    fs::write(dir.join("images.bin"), &bytes).unwrap();
    let origin: Vec<u8> = batch
        .window_origin
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    fs::write(dir.join("origin.bin"), origin).unwrap();
    let slots: Vec<u8> = lomar::cuda::pos_slots(&batch, m)
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    fs::write(dir.join("slots.bin"), slots).unwrap();
    fs::write(dir.join("patches.bin"), f32_bytes(&want.visible)).unwrap();
    fs::write(dir.join("targets.bin"), f32_bytes(&want.targets)).unwrap();
}

/// The gather's cases: tiny (3p² = 48 values, under one pass of the block), p = 8 (192,
/// two passes), each with and without norm-pix.
fn window_gather_cases() -> Vec<lomar::config::ModelConfig> {
    let tiny = lomar::config::preset("tiny").unwrap();
    let p8 = lomar::config::ModelConfig {
        image: 48,
        patch: 8,
        window: 3,
        ..tiny.clone()
    };
    [tiny, p8]
        .into_iter()
        .flat_map(|m| {
            [true, false].map(|norm_pix| lomar::config::ModelConfig {
                norm_pix,
                ..m.clone()
            })
        })
        .collect()
}

/// The gather of 8-bit images normalises them on the device exactly as the CPU op does,
/// bit for bit, and a planted wrong channel mean is caught.
#[test]
fn window_gather_normalises_bytes_like_the_cpu_op() {
    let dir = tempfile::tempdir().unwrap();
    let exe = compile(&repo().join("kernels"), dir.path(), "window_gather_driver");
    for (i, m) in window_gather_cases().iter().enumerate() {
        let case = dir.path().join(format!("case{i}"));
        window_gather_case(&case, m, i as u64);
        let out = run(&exe, &[&case]);
        println!("{}", String::from_utf8_lossy(&out.stdout));
        assert!(out.status.success(), "{}", describe(&out));
    }
    let kernels = mutant(
        "channel-means-swapped",
        "window_gather.cu",
        "(c == 1 ? 0.456f : 0.406f)",
        "(c == 1 ? 0.406f : 0.456f)",
    );
    let exe = compile(&kernels, kernels.parent().unwrap(), "window_gather_driver");
    let case = kernels.parent().unwrap().join("case");
    window_gather_case(&case, &window_gather_cases()[1], 5);
    let out = run(&exe, &[&case]);
    assert!(
        !out.status.success(),
        "the mutant passed:\n{}",
        describe(&out)
    );
    println!(
        "channel-means-swapped: caught: {}",
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.starts_with("FAIL"))
            .unwrap_or("the driver failed")
    );
}

/// MAE's token placement (the encoder's and the decoder's input, kernels/tokens.cu) matches
/// its definition, and planted bugs are caught: the position row not added, the bias
/// gradient's partials written into the fill's plane, two chunks writing one source row.
#[test]
fn mae_token_placement_matches_the_reference() {
    run_driver("tokens_driver");
    let mutations = [
        (
            "position-not-added",
            "out[c] = (to_float(in[c]) + bias[c]) + p[c];",
            "out[c] = to_float(in[c]) + bias[c];",
        ),
        (
            "bias-partials-in-the-fill-plane",
            "partial[(size_t)(1 * chunks + chunk) * width + c] = d_bias;",
            "partial[(size_t)(0 * chunks + chunk) * width + c] = d_bias;",
        ),
        (
            "chunk-overruns-its-rows",
            "const int r_end = min(rows, (chunk + 1) * rows_per_chunk);",
            "const int r_end = min(rows, (chunk + 2) * rows_per_chunk);",
        ),
    ];
    for (name, find, replace) in mutations {
        let kernels = mutant(name, "tokens.cu", find, replace);
        let exe = compile(&kernels, kernels.parent().unwrap(), "tokens_driver");
        let out = run(&exe, &[]);
        assert!(
            !out.status.success(),
            "{name}: the mutant passed:\n{}",
            describe(&out)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let first = stdout
            .lines()
            .find(|l| l.starts_with("FAIL"))
            .unwrap_or("the driver failed (a race ThreadSanitizer saw)");
        println!("{name}: caught: {first}");
    }
}
