#!/usr/bin/env python3
"""Tests of bench/torch_reference.py: `python3 bench/test_torch_reference.py`.

The vectorised model is checked against a second, loop-by-loop reading of docs/DESIGN.md, its
gradients against finite differences, and the file formats and the command line end to
end. The CUDA tests run where torch sees a GPU and are skipped elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import struct
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_reference as tr  # noqa: E402

# Small enough for loops and finite differences, large enough that every index matters:
# a 6x6 grid, 3x3 windows, 4 masked and 5 visible positions per window.
SMALL = tr.ModelConfig(image=12, patch=2, window=3, windows_per_image=2, mask_ratio=0.5, depth=2, width=16, heads=2)
MICRO = tr.ModelConfig(image=8, patch=2, window=2, windows_per_image=2, mask_ratio=0.5, depth=1, width=8, heads=2)


def random_model(cfg: tr.ModelConfig, seed: int) -> tr.LomarViT:
    """Every parameter random, so no zero bias or table hides an indexing mistake."""
    torch.manual_seed(seed)
    model = tr.LomarViT(cfg).double()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model


def random_batch(cfg: tr.ModelConfig, images: int, seed: int) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(seed)
    pixels, origin, mask_index, visible_index = tr.sample_batch(cfg, images, torch.device("cpu"))
    return pixels.double(), origin, mask_index, visible_index


def loop_loss(model: tr.LomarViT, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """docs/DESIGN.md §1.2-1.3 token by token, sharing nothing with the vectorised forward."""
    cfg, p, k = model.cfg, model.cfg.patch, model.cfg.window
    span = 2 * k - 1
    images, origin, mask_index, _ = batch
    per_token = []
    for b in range(images.shape[0]):
        for w in range(cfg.windows_per_image):
            row, col = origin[b, w].tolist()
            masked = set(mask_index[b, w].tolist())
            pixels = []  # [3, p, p] per window position
            tokens = [model.cls_token.view(-1)]
            for i in range(k * k):
                ky, kx = divmod(i, k)
                y0, x0 = (row + ky) * p, (col + kx) * p
                pixels.append(images[b, :, y0 : y0 + p, x0 : x0 + p])
                if i in masked:
                    tokens.append(model.mask_token.view(-1))
                else:
                    weight = model.patch_embed.proj.weight.reshape(cfg.width, -1)
                    tokens.append(weight @ pixels[i].reshape(-1) + model.patch_embed.proj.bias)
            x = torch.stack(tokens)  # [T, D]
            for block in model.blocks:
                x = x + loop_attention(block.attn, layer_norm(x, block.norm1), k, span)
                hidden = layer_norm(x, block.norm2) @ block.mlp.fc1.weight.T + block.mlp.fc1.bias
                hidden = 0.5 * hidden * (1.0 + torch.erf(hidden / math.sqrt(2.0)))
                x = x + hidden @ block.mlp.fc2.weight.T + block.mlp.fc2.bias
            for i in sorted(masked):
                pred = model.head.weight @ layer_norm(x, model.norm)[1 + i] + model.head.bias
                target = pixels[i].permute(1, 2, 0).reshape(-1)  # (y, x, c)
                n = target.numel()
                if cfg.norm_pix:
                    mean = target.sum() / n
                    var = ((target - mean) ** 2).sum() / (n - 1)
                    target = (target - mean) / torch.sqrt(var + 1e-6)
                per_token.append(((pred - target) ** 2).sum() / n)
    return torch.stack(per_token).mean()


def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6) * norm.weight + norm.bias


def loop_attention(attn: tr.Attention, x: torch.Tensor, k: int, span: int) -> torch.Tensor:
    t, d = x.shape
    dh = d // attn.heads
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias  # [T, 3D]
    table = attn.relative_position_bias_table
    heads = []
    for h in range(attn.heads):
        q = qkv[:, h * dh : (h + 1) * dh]
        key = qkv[:, d + h * dh : d + (h + 1) * dh]
        v = qkv[:, 2 * d + h * dh : 2 * d + (h + 1) * dh]
        rows = []
        for i in range(t):
            logits = []
            for j in range(t):
                if i == 0 and j == 0:
                    row = span * span + 2
                elif i == 0:
                    row = span * span
                elif j == 0:
                    row = span * span + 1
                else:
                    (yi, xi), (yj, xj) = divmod(i - 1, k), divmod(j - 1, k)
                    row = (yi - yj + k - 1) * span + (xi - xj + k - 1)
                logits.append(q[i] @ key[j] / math.sqrt(dh) + table[row, h])
            rows.append(torch.softmax(torch.stack(logits), 0) @ v)
        heads.append(torch.stack(rows))
    return torch.cat(heads, dim=1) @ attn.proj.weight.T + attn.proj.bias


class ModelTests(unittest.TestCase):
    def test_relative_position_index_by_hand(self):
        # K = 2: positions (0,0) (0,1) (1,0) (1,1); rows 0..8 patch pairs, 9 cls->patch,
        # 10 patch->cls, 11 cls->cls.
        self.assertEqual(
            tr.relative_position_index(2),
            [
                [11, 9, 9, 9, 9],
                [10, 4, 3, 1, 0],
                [10, 5, 4, 2, 1],
                [10, 7, 6, 4, 3],
                [10, 8, 7, 5, 4],
            ],
        )

    def test_parameters_have_lomars_names_and_shapes(self):
        cfg = tr.PRESETS["tiny"]
        d, h, p, rows = cfg.width, cfg.heads, cfg.patch, cfg.rel_bias_rows
        want = {
            "patch_embed.proj.weight": (d, 3, p, p),
            "patch_embed.proj.bias": (d,),
            "cls_token": (1, 1, d),
            "mask_token": (1, 1, d),
            "norm.weight": (d,),
            "norm.bias": (d,),
            "head.weight": (3 * p * p, d),
            "head.bias": (3 * p * p,),
        }
        for i in range(cfg.depth):
            for name, shape in {
                "norm1.weight": (d,),
                "norm1.bias": (d,),
                "attn.qkv.weight": (3 * d, d),
                "attn.qkv.bias": (3 * d,),
                "attn.relative_position_bias_table": (rows, h),
                "attn.proj.weight": (d, d),
                "attn.proj.bias": (d,),
                "norm2.weight": (d,),
                "norm2.bias": (d,),
                "mlp.fc1.weight": (4 * d, d),
                "mlp.fc1.bias": (4 * d,),
                "mlp.fc2.weight": (d, 4 * d),
                "mlp.fc2.bias": (d,),
            }.items():
                want[f"blocks.{i}.{name}"] = shape
        got = {name: tuple(param.shape) for name, param in tr.LomarViT(cfg).named_parameters()}
        self.assertEqual(got, want)
        decayed = {name for name, param in tr.LomarViT(cfg).named_parameters() if tr.is_decayed(name, param)}
        self.assertEqual(decayed, {n for n in want if n.endswith("weight") and len(want[n]) >= 2})

    def test_vectorised_loss_matches_the_loop_reading(self):
        for norm_pix in (True, False):
            with self.subTest(norm_pix=norm_pix):
                cfg = dataclasses.replace(SMALL, norm_pix=norm_pix)
                model = random_model(cfg, seed=1)
                batch = random_batch(cfg, images=2, seed=2)
                loss = model(*batch).item()
                self.assertGreater(loss, 0.1)
                self.assertAlmostEqual(loss, loop_loss(model, batch).item(), delta=1e-12 * loss)

    def test_gradients_match_finite_differences(self):
        model = random_model(MICRO, seed=3)
        batch = random_batch(MICRO, images=2, seed=4)
        names = [name for name, _ in model.named_parameters()]
        params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())

        def loss_of(*values):
            return torch.func.functional_call(model, dict(zip(names, values)), batch)

        # fast_mode compares, for every tensor, the derivative along a random direction.
        self.assertTrue(torch.autograd.gradcheck(loss_of, params, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True))

    def test_sampled_windows_and_masks_are_well_formed(self):
        cfg = tr.PRESETS["vit_base"]
        torch.manual_seed(5)
        _, origin, mask_index, visible_index = tr.sample_batch(cfg, 64, torch.device("cpu"))
        self.assertEqual(origin.min().item(), 0)
        self.assertEqual(origin.max().item(), cfg.grid - cfg.window)
        self.assertEqual(mask_index.shape[-1], 39)
        self.assertTrue((mask_index[..., 1:] > mask_index[..., :-1]).all())
        self.assertTrue((visible_index[..., 1:] > visible_index[..., :-1]).all())
        every = torch.cat([mask_index, visible_index], -1).sort(-1).values
        self.assertTrue((every == torch.arange(cfg.window_area)).all())
        self.assertTrue(torch.equal(tr.visible_index_from_mask(mask_index, cfg.window_area), visible_index))

    def test_training_flops_match_a_hand_count(self):
        # vit_base, T = 50, D = 768: the count of src/bench/flops.rs.
        block = 2 * 50 * 768 * 2304 + 4 * 2500 * 768 + 2 * 50 * 768 * 768 + 4 * 50 * 768 * 3072
        want = 4 * (3 * (12 * block + 2 * 39 * 768 * 768) + 2 * 2 * 10 * 768 * 768)
        self.assertEqual(tr.training_flops(tr.PRESETS["vit_base"], 1), want)
        self.assertEqual(tr.known_bf16_peak("NVIDIA H100 PCIe"), 756.0e12)
        self.assertEqual(tr.known_bf16_peak("NVIDIA H200"), 989.4e12)


# MAE on a 4x4 grid of 2-pixel patches: 4 of 16 patches kept, a 2-block decoder of 2 heads.
MAE_SMALL = tr.mae_recipe(dataclasses.replace(SMALL, image=8))
MAE_SMALL = dataclasses.replace(MAE_SMALL, decoder=tr.DecoderConfig(8, 2, 2))
# The lomar binary the cross-check runs, when it has been built (`cargo build --release`).
LOMAR = Path(__file__).resolve().parent.parent / "target" / "release" / "lomar"


def random_mae(cfg: tr.ModelConfig, seed: int) -> tr.MaeViT:
    torch.manual_seed(seed)
    model = tr.MaeViT(cfg).double()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model


class MaeTests(unittest.TestCase):
    def test_mae_base_has_the_official_names_and_count(self):
        model = tr.MaeViT(tr.PRESETS["mae_base"])
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        # The official model's 111,907,840 values less its two fixed position tables.
        self.assertEqual(sum(p.numel() for p in model.parameters()), 111_907_840 - 197 * 768 - 197 * 512)
        self.assertEqual(shapes["mask_token"], (1, 1, 512))
        self.assertEqual(shapes["decoder_pred.weight"], (768, 512))
        self.assertEqual(shapes["decoder_blocks.7.attn.qkv.weight"], (1536, 512))
        self.assertFalse(any("relative" in name for name in shapes))

    def test_sincos_rows_follow_the_column_then_row_layout(self):
        table = tr.sincos_pos_embed(8, 3)
        self.assertTrue(torch.equal(table[0], torch.zeros(8, dtype=torch.float64)))
        # Patch (row 2, column 1): omega = 1, 0.01 over the two channels of each quarter.
        want = [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]
        want += [math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)]
        self.assertTrue(torch.allclose(table[1 + 2 * 3 + 1], torch.tensor(want, dtype=torch.float64)))

    def test_mae_gradients_match_finite_differences(self):
        model = random_mae(MAE_SMALL, seed=3)
        torch.manual_seed(4)
        batch = tuple(t.double() if t.is_floating_point() else t for t in tr.sample_batch(MAE_SMALL, 2, torch.device("cpu")))
        self.assertEqual(batch[2].shape, (2, 1, 12))
        names = [name for name, _ in model.named_parameters()]
        params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())

        def loss_of(*values):
            return torch.func.functional_call(model, dict(zip(names, values)), batch)

        self.assertTrue(torch.autograd.gradcheck(loss_of, params, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True))

    def test_mae_flops_match_the_hand_count_of_src_bench_flops(self):
        enc = 2 * 50 * 768 * 2304 + 4 * 2500 * 768 + 2 * 50 * 768 * 768 + 4 * 50 * 768 * 3072
        dec = 2 * 197 * 512 * 1536 + 4 * 197 * 197 * 512 + 2 * 197 * 512 * 512 + 4 * 197 * 512 * 2048
        forward = 12 * enc + 2 * 50 * 768 * 512 + 8 * dec + 2 * 197 * 512 * 768
        self.assertEqual(tr.training_flops(tr.PRESETS["mae_base"], 1), 3 * forward + 2 * 2 * 49 * 768 * 768)

    @unittest.skipUnless(LOMAR.exists(), f"{LOMAR} is not built")
    def test_lomar_grad_agrees_in_fp64(self):
        with tempfile.TemporaryDirectory() as d:
            lomar = lambda *args: subprocess.run([str(LOMAR), *args], cwd=d, check=True, capture_output=True)
            lomar("sample-batch", "--method", "mae", "--out", "b.st", "--batch", "3", "--seed", "4")
            lomar("init", "--method", "mae", "--out", "p.st", "--seed", "5")
            lomar("grad", "--method", "mae", "--device", "cpu", "--params", "p.st", "--batch", "b.st", "--out", "g.st")
            files = ["--params", f"{d}/p.st", "--batch-file", f"{d}/b.st", "--grads", f"{d}/g.st"]
            # lomar computes in f32: agreement to f32 rounding.
            code, out = run_main(["--method", "mae", *files, "--tol", "1e-5"])
            print(out.splitlines()[-1])
            self.assertEqual(code, 0, out)
            code, out = run_main([*files])
            self.assertEqual(code, 2)
            self.assertIn("holds a --method mae model; it cannot run with --method lomar", out)


def run_main(argv: list[str]) -> tuple[int, str]:
    """The script's exit code and everything it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = tr.main(argv)
        except SystemExit as exit:  # argparse refusing the flags
            code = exit.code
    return code, out.getvalue()


class FileAndCommandLineTests(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name)

    def tearDown(self):
        self.dir.cleanup()

    def write_fixture(self, cfg: tr.ModelConfig) -> list[str]:
        """Parameter and batch files laid out as lomar writes them, and the flags to read them."""
        model = random_model(cfg, seed=6)
        params = {name: p.detach().float() for name, p in model.named_parameters()}
        params["optimizer.m.head.bias"] = torch.zeros(3)  # checkpoints carry moments
        config = json.dumps({"preset": "custom", "model": dataclasses.asdict(cfg)})
        tr.save_safetensors(self.path / "params.safetensors", params, {"format": "lomar-params", "config": config})
        images, origin, mask_index, _ = random_batch(cfg, images=3, seed=7)
        write_u32_batch(self.path / "batch.safetensors", images.float(), origin, mask_index)
        return [
            *("--image", str(cfg.image), "--patch", str(cfg.patch), "--window", str(cfg.window)),
            *("--windows-per-image", str(cfg.windows_per_image), "--mask-ratio", str(cfg.mask_ratio)),
            *("--depth", str(cfg.depth), "--width", str(cfg.width), "--heads", str(cfg.heads)),
            *("--params", str(self.path / "params.safetensors")),
            *("--batch-file", str(self.path / "batch.safetensors")),
        ]

    def test_safetensors_round_trip(self):
        tensors = {
            "a": torch.randn(2, 3),
            "b": torch.randn(4, dtype=torch.float64),
            "c": torch.arange(6).view(3, 2),
            "scalar": torch.tensor(2.5),
            "empty": torch.zeros(0, 5),
        }
        tr.save_safetensors(self.path / "t.safetensors", tensors, {"format": "test"})
        back, metadata = tr.read_safetensors(self.path / "t.safetensors")
        self.assertEqual(metadata, {"format": "test"})
        self.assertEqual(back.keys(), tensors.keys())
        for name, tensor in tensors.items():
            self.assertEqual(back[name].dtype, tensor.dtype)
            self.assertTrue(torch.equal(back[name], tensor), name)

    def test_u32_tensors_are_read_unsigned(self):
        write_u32_batch(self.path / "u.safetensors", torch.zeros(1), torch.tensor([0, 7, 2**32 - 1]), torch.zeros(0))
        self.assertEqual(tr.read_safetensors(self.path / "u.safetensors")[0]["window_origin"].tolist(), [0, 7, 2**32 - 1])

    def test_check_passes_on_its_own_gradients_and_fails_on_a_changed_one(self):
        flags = self.write_fixture(SMALL)
        grads = self.path / "grads.safetensors"
        self.assertEqual(run_main([*flags, "--save-grads", str(grads)])[0], 0)
        code, out = run_main([*flags, "--grads", str(grads), "--tol", "1e-6"])
        self.assertEqual(code, 0, out)
        self.assertIn("blocks.1.attn.relative_position_bias_table", out)
        code, out = run_main([*flags, "--grads", str(grads), "--dtype", "float32", "--tol", "1e-4"])
        self.assertEqual(code, 0, out)
        changed, metadata = tr.read_safetensors(grads)
        changed["blocks.1.attn.relative_position_bias_table"][3, 1] += 1e-3
        tr.save_safetensors(grads, changed, metadata)
        code, out = run_main([*flags, "--grads", str(grads), "--tol", "1e-6"])
        self.assertEqual(code, 1, out)
        self.assertIn("worst: blocks.1.attn.relative_position_bias_table", out)

    def test_settings_come_from_a_config_file_too(self):
        flags = self.write_fixture(SMALL)
        config = self.path / "config.json"
        config.write_text(json.dumps({"preset": "custom", "model": dataclasses.asdict(SMALL), "train": {}}))
        files = flags[flags.index("--params") :]
        code, out = run_main(["--config", str(config), *files])
        self.assertEqual(code, 0, out)
        self.assertIn("loss", out)

    def test_bad_input_gets_a_clear_error(self):
        flags = self.write_fixture(SMALL)
        code, out = run_main([*flags, "--width", "32"])
        self.assertEqual(code, 2)
        self.assertIn("width = 16 in the file, 32 requested", out)
        code, out = run_main([*flags, "--no-norm-pix"])
        self.assertEqual(code, 2)
        self.assertIn("norm_pix = True in the file, False requested", out)
        (self.path / "params.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
        code, out = run_main(flags)
        self.assertEqual(code, 2)
        self.assertIn("not a safetensors file", out)
        self.assertEqual(run_main([*flags, "--image", "13"])[0], 2)
        code, out = run_main(["--preset", "tiny"])
        self.assertEqual(code, 2)
        self.assertIn("needs --params and --batch-file", out)

    @unittest.skipUnless(torch.cuda.is_available(), "no CUDA GPU")
    def test_cuda_fp32_matches_cpu_fp64(self):
        flags = self.write_fixture(SMALL)
        grads = self.path / "grads.safetensors"
        self.assertEqual(run_main([*flags, "--save-grads", str(grads)])[0], 0)
        code, out = run_main([*flags, "--grads", str(grads), "--device", "cuda", "--dtype", "float32", "--tol", "1e-4"])
        print(out.splitlines()[-1])
        self.assertEqual(code, 0, out)

    @unittest.skipUnless(torch.cuda.is_available(), "no CUDA GPU")
    def test_bf16_autocast_loss_is_close_to_fp32(self):
        cfg = tr.PRESETS["vit_tiny"]
        torch.manual_seed(8)
        model = tr.LomarViT(cfg).cuda()
        tr.init_parameters(model)
        batch = tr.sample_batch(cfg, 8, torch.device("cuda"))
        fp32 = model(*batch).item()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(*batch).item()
        self.assertAlmostEqual(bf16, fp32, delta=2e-2 * fp32)

    def test_cpu_bench_writes_its_report(self):
        out = self.path / "bench.json"
        flags = ["--bench", "--device", "cpu", "--preset", "tiny", "--batch", "4", "--warmup", "1", "--steps", "2"]
        code, printed = run_main([*flags, "--threads", "1", "--json", str(out)])
        self.assertEqual(code, 0, printed)
        report = json.loads(out.read_text())
        self.assertEqual((report["threads"], report["precision"]), (1, "fp32, fused AdamW"))
        self.assertEqual([r["mode"] for r in report["results"]], ["eager"])
        r = report["results"][0]
        self.assertGreater(r["images_per_s"], 0)
        self.assertTrue(r["ms_min"] <= r["ms_median"] <= r["ms_max"])
        self.assertIsNone(r["mfu"])
        self.assertEqual(run_main([*flags, "--threads", "0"])[0], 2)

    @unittest.skipUnless(torch.cuda.is_available(), "no CUDA GPU")
    def test_bench_writes_its_report(self):
        out = self.path / "bench.json"
        flags = ["--bench", "--preset", "tiny", "--batch", "8", "--warmup", "3", "--steps", "5"]
        code, printed = run_main([*flags, "--json", str(out)])
        print(printed)
        self.assertEqual(code, 0, printed)
        report = json.loads(out.read_text())
        self.assertEqual([r["mode"] for r in report["results"]], ["eager", "compile"])
        for r in report["results"]:
            self.assertGreater(r["images_per_s"], 0)
            self.assertTrue(r["ms_min"] <= r["ms_median"] <= r["ms_max"])
            self.assertGreater(r["peak_memory_bytes"], 0)


def write_u32_batch(path: Path, images: torch.Tensor, origin: torch.Tensor, mask_index: torch.Tensor) -> None:
    """A batch file with u32 indices, written by hand as lomar's Rust writer lays it out."""
    parts = [
        ("images", "F32", list(images.shape), struct.pack(f"<{images.numel()}f", *images.flatten().tolist())),
        ("window_origin", "U32", list(origin.shape), struct.pack(f"<{origin.numel()}I", *origin.flatten().tolist())),
        ("mask_index", "U32", list(mask_index.shape), struct.pack(f"<{mask_index.numel()}I", *mask_index.flatten().tolist())),
    ]
    header, offset = {}, 0
    for name, kind, shape, raw in parts:
        header[name] = {"dtype": kind, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(raw for *_, raw in parts))


if __name__ == "__main__":
    unittest.main()
