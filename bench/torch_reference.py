#!/usr/bin/env python3
"""The lomar model (docs/DESIGN.md §1) in PyTorch, written once and used for two jobs; with
`--method mae`, MAE on the same footing (docs/DESIGN.md §7), built after the structure of the
official MAE model (patchify, sin-cos position embeddings, random masking by index,
unshuffling with ids_restore, a decoder, norm-pix loss on the removed patches).

Gradient check (default): loads lomar's parameter file and a batch file, computes the loss
and every parameter's gradient in fp64 (or fp32) and compares them with the file that
`lomar grad` wrote, tensor by tensor.

    python3 bench/torch_reference.py --preset tiny --params P.safetensors \
        --batch-file B.safetensors --grads G.safetensors [--tol 1e-4]

Benchmark (`--bench`): times a whole training step (forward, backward, fused AdamW) on
batches sampled before each step: on the GPU (default) in bf16 autocast, eager and under
torch.compile; with `--device cpu` in fp32 (the precision of lomar's CPU backend), eager,
on one thread per core.

    python3 bench/torch_reference.py --bench --preset vit_base --image 384 --batch 64 \
        --json torch_vit_base_384.json
    python3 bench/torch_reference.py --bench --device cpu --preset vit_tiny --batch 32
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------
# Settings (mirror src/config/mod.rs)
# ---------------------------------------------------------------------------------------

LN_EPS = 1e-6
NORM_PIX_EPS = 1e-6
MLP_RATIO = 4


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    width: int
    depth: int
    heads: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    image: int
    patch: int
    window: int
    windows_per_image: int
    mask_ratio: float
    depth: int
    width: int
    heads: int
    norm_pix: bool = True
    method: str = "lomar"
    decoder: DecoderConfig | None = None

    @staticmethod
    def from_json(model: dict) -> "ModelConfig":
        decoder = model.get("decoder")
        return ModelConfig(**(model | {"decoder": DecoderConfig(**decoder) if decoder else None}))

    def as_json(self) -> dict:
        """As lomar serialises it: a LoMaR model has no `decoder` key."""
        out = dataclasses.asdict(self)
        if self.decoder is None:
            del out["decoder"]
        return out

    @property
    def grid(self) -> int:
        return self.image // self.patch

    @property
    def window_area(self) -> int:
        return self.window * self.window

    @property
    def seq_len(self) -> int:
        return 1 + self.window_area

    @property
    def masked_per_window(self) -> int:
        # The small epsilon keeps e.g. 0.7 * 10 from flooring to 6, as lomar does. MAE keeps
        # floor(N (1 - r)) of its N patches (its one window is the grid) and masks the rest.
        if self.method == "mae":
            return self.window_area - math.floor(self.window_area * (1.0 - self.mask_ratio) + 1e-9)
        return math.floor(self.window_area * self.mask_ratio + 1e-9)

    @property
    def visible_per_window(self) -> int:
        return self.window_area - self.masked_per_window

    @property
    def hidden(self) -> int:
        return self.width * MLP_RATIO

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch * self.patch

    @property
    def rel_bias_rows(self) -> int:
        span = 2 * self.window - 1
        return span * span + 3

    def validate(self) -> None:
        """Refuses what lomar refuses, naming the field first."""
        if not 1 <= self.patch <= 64:
            raise ValueError(f"patch = {self.patch}: must be in 1..=64")
        if self.image <= 0 or self.image % self.patch:
            raise ValueError(f"image = {self.image}: must be a positive multiple of patch ({self.patch})")
        if self.method == "mae":
            if self.window != self.grid or self.windows_per_image != 1:
                raise ValueError(
                    f"window = {self.window}, windows_per_image = {self.windows_per_image}: MAE's one window is "
                    f"the whole grid (window = {self.grid}, windows_per_image = 1)"
                )
            if self.decoder is None:
                raise ValueError("decoder: --method mae needs a decoder")
            if self.width % 4 or self.decoder.width % 4 or self.decoder.width % self.decoder.heads:
                raise ValueError(f"decoder_width = {self.decoder.width}: widths must be multiples of 4 and of heads")
        elif self.method != "lomar":
            raise ValueError(f"method = {self.method}: must be lomar or mae")
        elif not 2 <= self.window <= 32:
            raise ValueError(f"window = {self.window}: must be in 2..=32")
        if self.grid < self.window:
            raise ValueError(
                f"image = {self.image}: the patch grid ({self.grid}x{self.grid}) must be at least "
                f"window ({self.window}) patches wide; use image >= {self.window * self.patch}"
            )
        if not 1 <= self.windows_per_image <= 1024:
            raise ValueError(f"windows_per_image = {self.windows_per_image}: must be in 1..=1024")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio = {self.mask_ratio}: must be in (0, 1)")
        if not 0 < self.masked_per_window < self.window_area:
            raise ValueError(
                f"mask_ratio = {self.mask_ratio}: masks {self.masked_per_window} of the "
                f"{self.window_area} window positions; it must mask between 1 and {self.window_area - 1}"
            )
        if not 1 <= self.depth <= 256:
            raise ValueError(f"depth = {self.depth}: must be in 1..=256")
        if self.heads <= 0:
            raise ValueError(f"heads = {self.heads}: must be at least 1")
        if self.width <= 0 or self.width % self.heads:
            raise ValueError(f"width = {self.width}: must be a positive multiple of heads ({self.heads})")


def _vit(width: int, depth: int, heads: int, patch: int) -> ModelConfig:
    return ModelConfig(224, patch, 7, 4, 0.8, depth, width, heads)


def mae_recipe(cfg: ModelConfig) -> ModelConfig:
    """MAE's recipe on the encoder of `cfg`, the rule of src/config/presets.rs: decoder 512
    wide, 8 blocks, 16 heads from ViT-B's width up; two thirds of the width in 32-wide heads
    below; 32 wide, 2 blocks, 1 head for the test preset."""
    if cfg.width >= 768:
        decoder = DecoderConfig(512, 8, 16)
    elif cfg.width >= 96:
        width = -(-(2 * cfg.width // 3) // 32) * 32  # rounded up to a multiple of 32
        decoder = DecoderConfig(width, 8, width // 32)
    else:
        decoder = DecoderConfig(32, 2, 1)
    return dataclasses.replace(
        cfg, window=cfg.grid, windows_per_image=1, mask_ratio=0.75, method="mae", decoder=decoder
    )


PRESETS = {
    "tiny": ModelConfig(32, 4, 4, 2, 0.75, 2, 64, 2),
    "vit_tiny": _vit(192, 12, 3, 16),
    "vit_small": _vit(384, 12, 6, 16),
    "vit_base": _vit(768, 12, 12, 16),
    "vit_large": _vit(1024, 24, 16, 16),
    "vit_huge": _vit(1280, 32, 16, 14),
}
PRESETS |= {f"mae_{size}": mae_recipe(PRESETS[f"vit_{size}"]) for size in ("small", "base", "large", "huge")}

# ---------------------------------------------------------------------------------------
# Model (docs/DESIGN.md §1.2); parameter names and shapes are those of src/params.rs
# ---------------------------------------------------------------------------------------


def relative_position_index(k: int) -> list[list[int]]:
    """Row of the bias table for every (query, key) token pair of a window sequence.

    `[T][T]`, T = 1 + K²; token 0 is cls, token 1 + ky*K + kx the window position (ky, kx).
    """
    span = 2 * k - 1
    cls_to_patch, patch_to_cls, cls_to_cls = span * span, span * span + 1, span * span + 2
    coords = [divmod(i, k) for i in range(k * k)]
    index = [[cls_to_cls] + [cls_to_patch] * (k * k)]
    for yi, xi in coords:
        index.append([patch_to_cls] + [(yi - yj + k - 1) * span + (xi - xj + k - 1) for yj, xj in coords])
    return index


class PatchEmbed(nn.Module):
    """Conv2d layout so the weight is lomar's `[D, 3, p, p]`; applied as a linear on the
    gathered visible patches, since a masked patch is never embedded."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, cfg.patch, stride=cfg.patch)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # [N, 3, p, p] -> [N, D]; (c, y, x) flattening matches the weight's.
        return F.linear(patches.flatten(1), self.proj.weight.flatten(1), self.proj.bias)


class Attention(nn.Module):
    """Multi-head attention of width `width`; with a `window`, BEiT's relative position bias
    over that window's layout (LoMaR), without one no bias at all (MAE)."""

    def __init__(self, width: int, heads: int, window: int | None):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        if window is not None:
            span = 2 * window - 1
            self.relative_position_bias_table = nn.Parameter(torch.zeros(span * span + 3, heads))
            index = torch.tensor(relative_position_index(window))
            self.register_buffer("relative_position_index", index, persistent=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [S, T, D] -> [S, T, D]
        s, t, d = x.shape
        # qkv rows are q, k, v; head i owns rows i*d..(i+1)*d of each: 3 x [S, h, T, d/h].
        q, k, v = self.qkv(x).view(s, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if not hasattr(self, "relative_position_bias_table"):
            out = F.scaled_dot_product_attention(q, k, v)  # [S, h, T, d/h]
            return self.proj(out.transpose(1, 2).reshape(s, t, d))
        # Every window has the same layout, so one bias serves all sequences. The fused CUDA
        # kernels need the mask's last stride to be 1 (else torch falls back to the unfused
        # math path), and reduce a [1, h, T, T] mask's gradient slowly: gather per head, and
        # pass the bias expanded (stride 0) to [S, h, T, T].
        bias = self.relative_position_bias_table.t()[:, self.relative_position_index]  # [h, T, T]
        bias = bias.unsqueeze(0).to(q.dtype).expand(s, -1, -1, -1)  # [S, h, T, T]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [S, h, T, d/h]
        return self.proj(out.transpose(1, 2).reshape(s, t, d))


class Mlp(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, width * MLP_RATIO)
        self.fc2 = nn.Linear(width * MLP_RATIO, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [S, T, D] -> [S, T, 4D] -> [S, T, D]; exact erf GELU.
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, window: int | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=LN_EPS)
        self.attn = Attention(width, heads, window)
        self.norm2 = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = Mlp(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [S, T, D] -> [S, T, D], pre-norm residual.
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class LomarViT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.window) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=LN_EPS)
        self.head = nn.Linear(cfg.width, cfg.patch_dim)
        window_position = torch.arange(cfg.window_area)
        self.register_buffer("window_row", window_position // cfg.window, persistent=False)
        self.register_buffer("window_col", window_position % cfg.window, persistent=False)

    def forward(
        self,
        images: torch.Tensor,
        window_origin: torch.Tensor,
        mask_index: torch.Tensor,
        visible_index: torch.Tensor,
    ) -> torch.Tensor:
        """The batch's mean loss (docs/DESIGN.md §1.3).

        images [B, 3, H, W] normalised; window_origin [B, n, 2] (row, col) of each window's
        top-left patch; mask_index [B, n, M] and visible_index [B, n, V] the masked and
        visible window positions ky*K + kx, each ascending.
        """
        cfg = self.cfg
        b, n = window_origin.shape[:2]
        s, p, g, d = b * n, cfg.patch, cfg.grid, cfg.width
        m, v = cfg.masked_per_window, cfg.visible_per_window

        # [B, 3, H, W] -> [B, G², 3, p, p]: patch (gy, gx) at row gy*G + gx.
        patches = images.view(b, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, 3, p, p)
        row, col = window_origin.unbind(-1)  # [B, n] each
        cell = (row[..., None] + self.window_row) * g + col[..., None] + self.window_col  # [B, n, K²]
        image_of = torch.arange(b, device=images.device).view(b, 1)
        visible = patches[image_of, cell.gather(-1, visible_index).view(b, n * v)]  # [B, n*V, 3, p, p]
        masked = patches[image_of, cell.gather(-1, mask_index).view(b, n * m)]  # [B, n*M, 3, p, p]

        # Tokens: mask_token everywhere, then the embedded visible patches at their positions.
        embedded = self.patch_embed(visible.view(s * v, 3, p, p)).view(s, v, d)  # [S, V, D]
        tokens = self.mask_token.expand(s, cfg.window_area, d).scatter(
            1, visible_index.view(s, v, 1).expand(s, v, d), embedded.to(self.mask_token.dtype)
        )  # [S, K², D]
        x = torch.cat([self.cls_token.expand(s, 1, d), tokens], dim=1)  # [S, T, D]
        for block in self.blocks:
            x = block(x)

        # The final norm and the head act per token, so only the masked tokens need them.
        x_masked = x[:, 1:].gather(1, mask_index.view(s, m, 1).expand(s, m, d))  # [S, M, D]
        pred = self.head(self.norm(x_masked))  # [S, M, 3p²]

        # Targets in (y, x, c) order, channel fastest: [S, M, 3p²].
        target = masked.view(s, m, 3, p, p).permute(0, 1, 3, 4, 2).reshape(s, m, cfg.patch_dim)
        if cfg.norm_pix:
            mean = target.mean(-1, keepdim=True)
            var = target.var(-1, keepdim=True)  # unbiased
            target = (target - mean) / (var + NORM_PIX_EPS).sqrt()
        # Every masked token has 3p² values, so one mean is the mean of per-token means.
        return (pred.to(target.dtype) - target).pow(2).mean()


def sincos_pos_embed(width: int, grid: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos embedding, [1 + G², D] in float64, row 0 (cls) zeros.

    As the official get_2d_sincos_pos_embed: the grid from meshgrid(columns, rows), so the
    first half of the channels encodes the column and the second the row, each half D/4
    sines then D/4 cosines of pos * omega, omega = 1 / 10000^(k / (D/4)).
    """
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width / 4))
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega  # [G², D/4]
        return torch.cat([out.sin(), out.cos()], dim=1)

    patches = torch.cat([one_axis(cols), one_axis(rows)], dim=1)  # [G², D]
    return torch.cat([torch.zeros(1, width, dtype=torch.float64), patches])


class MaeViT(nn.Module):
    """MAE (docs/DESIGN.md §7) with the official model's parameter names and data flow."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        dec = cfg.decoder
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        # Kept in float64 (so an fp64 check sees the exact table), cast to the activations' dtype.
        self.register_buffer("pos_embed", sincos_pos_embed(cfg.width, cfg.grid)[None], persistent=False)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, None) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=LN_EPS)
        self.decoder_embed = nn.Linear(cfg.width, dec.width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec.width))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(dec.width, cfg.grid)[None], persistent=False)
        self.decoder_blocks = nn.ModuleList(Block(dec.width, dec.heads, None) for _ in range(dec.depth))
        self.decoder_norm = nn.LayerNorm(dec.width, eps=LN_EPS)
        self.decoder_pred = nn.Linear(dec.width, cfg.patch_dim)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, N, p²·3], each patch in (y, x, c) order."""
        b, p, g = images.shape[0], self.cfg.patch, self.cfg.grid
        x = images.reshape(b, 3, g, p, g, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(b, g * g, p * p * 3)

    def forward(
        self,
        images: torch.Tensor,
        window_origin: torch.Tensor,
        mask_index: torch.Tensor,
        visible_index: torch.Tensor,
    ) -> torch.Tensor:
        """The batch's mean loss. The batch is a LoMaR batch of one window per image at (0, 0)
        covering the grid (window_origin all zeros): mask_index [B, 1, M] the removed
        patches and visible_index [B, 1, V] the kept ones, each ascending, play the official
        model's ids_keep and the rest of its shuffle."""
        b, d = images.shape[0], self.cfg.width
        ids_keep, ids_removed = visible_index[:, 0], mask_index[:, 0]  # [B, V], [B, M]
        ids_restore = torch.argsort(torch.cat([ids_keep, ids_removed], dim=1), dim=1)  # [B, N]

        # Encoder: embed every patch, add positions, keep the visible ones, prepend cls.
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)  # [B, N, D]
        x = x + self.pos_embed[:, 1:].to(x.dtype)
        x = x.gather(1, ids_keep[..., None].expand(-1, -1, d))  # [B, V, D]
        cls = (self.cls_token + self.pos_embed[:, :1].to(x.dtype)).expand(b, -1, -1)
        x = torch.cat([cls, x], dim=1)  # [B, 1+V, D]
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)

        # Decoder: embed, append mask tokens, unshuffle, add positions.
        x = self.decoder_embed(x)  # [B, 1+V, Dd]
        dd = x.shape[-1]
        mask_tokens = self.mask_token.to(x.dtype).expand(b, ids_restore.shape[1] + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # [B, N, Dd] in shuffle order
        x_ = x_.gather(1, ids_restore[..., None].expand(-1, -1, dd))  # [B, N, Dd] in grid order
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed.to(x.dtype)
        for block in self.decoder_blocks:
            x = block(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]  # [B, N, p²·3]

        # Norm-pix MSE per patch, averaged over the removed patches.
        target = self.patchify(images)
        if self.cfg.norm_pix:
            mean = target.mean(-1, keepdim=True)
            var = target.var(-1, keepdim=True)  # unbiased
            target = (target - mean) / (var + NORM_PIX_EPS).sqrt()
        removed = torch.zeros_like(ids_restore, dtype=target.dtype).scatter(1, ids_removed, 1.0)  # [B, N]
        per_patch = (pred.to(target.dtype) - target).pow(2).mean(-1)
        return (per_patch * removed).sum() / removed.sum()


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model of `cfg`'s method."""
    return MaeViT(cfg) if cfg.method == "mae" else LomarViT(cfg)


def is_decayed(name: str, param: torch.Tensor) -> bool:
    """AdamW decays the matrix weights only (linear and patch-embed), as src/params.rs."""
    return name.endswith(".weight") and param.dim() >= 2


@torch.no_grad()
def init_parameters(model: nn.Module) -> None:
    """docs/DESIGN.md §1.4: xavier-uniform matrices, zero biases and tables, unit norm weights."""
    for name, param in model.named_parameters():
        if is_decayed(name, param):
            nn.init.xavier_uniform_(param.view(param.shape[0], -1))
        elif name.endswith("_token"):
            nn.init.normal_(param, std=0.02)
        elif name.endswith(".weight"):
            nn.init.ones_(param)
        else:
            nn.init.zeros_(param)


# ---------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------


def sample_batch(cfg: ModelConfig, images: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """A random batch drawn like lomar's sampler (docs/DESIGN.md §1.1), on `device`.

    Window origins uniform in [0, G-K]² per image and window; M distinct masked positions
    per window, uniform. Returns (images, window_origin, mask_index, visible_index).
    """
    n, area, m = cfg.windows_per_image, cfg.window_area, cfg.masked_per_window
    pixels = torch.randn(images, 3, cfg.image, cfg.image, device=device)
    window_origin = torch.randint(0, cfg.grid - cfg.window + 1, (images, n, 2), device=device)
    order = torch.rand(images, n, area, device=device).argsort(-1)  # a random permutation per window
    mask_index = order[..., :m].sort(-1).values
    visible_index = order[..., m:].sort(-1).values
    return pixels, window_origin, mask_index, visible_index


def visible_index_from_mask(mask_index: torch.Tensor, area: int) -> torch.Tensor:
    """[..., M] masked positions -> [..., K² - M] the other positions, ascending."""
    is_masked = torch.zeros(*mask_index.shape[:-1], area, dtype=torch.uint8, device=mask_index.device)
    is_masked.scatter_(-1, mask_index, 1)
    # A stable sort puts the unmasked positions first, in ascending order.
    order = torch.sort(is_masked, dim=-1, stable=True).indices
    return order[..., : area - mask_index.shape[-1]]


# ---------------------------------------------------------------------------------------
# safetensors files (read and written here so nothing beyond torch is needed)
# ---------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Unsigned types torch handles poorly are read through the signed type of the same width.
_UNSIGNED_AS_SIGNED = {"U16": (torch.int16, 0xFFFF), "U32": (torch.int32, 0xFFFFFFFF)}


def read_safetensors(
    path: str | Path, keep: Callable[[str], bool] = lambda name: True
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors that `keep` accepts, on the CPU (unsigned integers as int64), and the
    file's metadata."""
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: too short to be a safetensors file")
        header_len = int.from_bytes(prefix, "little")
        try:
            header = json.loads(file.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a safetensors file ({err})") from err
        metadata = header.pop("__metadata__", None) or {}
        tensors = {}
        for name, info in header.items():
            if not keep(name):
                continue
            kind, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            if kind in _SAFETENSORS_DTYPES:
                dtype, wrap = _SAFETENSORS_DTYPES[kind], None
            elif kind in _UNSIGNED_AS_SIGNED:
                dtype, wrap = _UNSIGNED_AS_SIGNED[kind]
            else:
                raise ValueError(f"{path}: tensor {name} has dtype {kind}, which this reader does not handle")
            numel = math.prod(shape)
            file.seek(8 + header_len + start)
            raw = bytearray(file.read(end - start))
            if len(raw) != end - start or end - start != numel * dtype.itemsize:
                raise ValueError(f"{path}: tensor {name} {kind}{shape} has a byte range that does not fit it")
            if numel == 0:
                tensors[name] = torch.empty(shape, dtype=dtype)
                continue
            tensor = torch.frombuffer(raw, dtype=dtype).reshape(shape)
            tensors[name] = tensor.to(torch.int64) & wrap if wrap else tensor
    return tensors, metadata


def save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    names = {dtype: kind for kind, dtype in _SAFETENSORS_DTYPES.items()}
    header, chunks, offset = {"__metadata__": metadata or {}}, [], 0
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        raw = bytearray(tensor.numel() * tensor.element_size())
        if raw:
            torch.frombuffer(raw, dtype=torch.uint8).copy_(tensor.view(-1).view(torch.uint8))
        header[name] = {"dtype": names[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # keeps the data 8-byte aligned
    Path(path).write_bytes(len(encoded).to_bytes(8, "little") + encoded + b"".join(chunks))


def check_same_model(path: str | Path, metadata: dict[str, str], cfg: ModelConfig) -> None:
    """Refuses a lomar file whose stored settings differ from ours, naming each field."""
    if "config" not in metadata:
        return
    try:
        found = json.loads(metadata["config"])["model"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: metadata `config` is malformed ({err})") from err
    if found.get("method", "lomar") != cfg.method:
        raise ValueError(
            f"{path} holds a --method {found.get('method', 'lomar')} model; it cannot run with --method {cfg.method}"
        )
    ours = cfg.as_json()
    differ = [f"{k} = {found.get(k)} in the file, {v} requested" for k, v in ours.items() if found.get(k) != v]
    if differ:
        raise ValueError(f"{path} was made for another model: {'; '.join(differ)}")


def load_parameters(model: nn.Module, path: str | Path) -> None:
    """Copies a lomar parameter or checkpoint file into the model, checking every shape."""
    tensors, metadata = read_safetensors(path, keep=lambda name: not name.startswith("optimizer."))
    check_same_model(path, metadata, model.cfg)
    own = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise ValueError(f"{path}: holds {unknown[0]} (and {len(unknown) - 1} more) that the model does not have")
    with torch.no_grad():
        for name, param in own.items():
            if name not in tensors:
                raise ValueError(f"{path}: has no tensor {name}")
            if tuple(tensors[name].shape) != tuple(param.shape):
                raise ValueError(
                    f"{path}: {name} is {list(tensors[name].shape)}, these settings make it "
                    f"{list(param.shape)}; pass the settings the file was made with"
                )
            param.copy_(tensors[name])


def load_batch(path: str | Path, cfg: ModelConfig) -> tuple[torch.Tensor, ...]:
    """(images, window_origin, mask_index, visible_index) of a batch file, checked as
    src/data/batch.rs checks a batch."""
    tensors, metadata = read_safetensors(path)
    check_same_model(path, metadata, cfg)
    for name in ("images", "window_origin", "mask_index"):
        if name not in tensors:
            raise ValueError(f"{path}: has no tensor {name}")
    images = tensors["images"].to(torch.float64)
    window_origin, mask_index = tensors["window_origin"].long(), tensors["mask_index"].long()
    b, n, m, area = images.shape[0], cfg.windows_per_image, cfg.masked_per_window, cfg.window_area
    expect = {
        "images": (images, (b, 3, cfg.image, cfg.image)),
        "window_origin": (window_origin, (b, n, 2)),
        "mask_index": (mask_index, (b, n, m)),
    }
    for name, (tensor, shape) in expect.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{path}: {name} is {list(tensor.shape)}, these settings want {list(shape)}")
    if b == 0:
        raise ValueError(f"{path}: the batch holds no images")
    if not torch.isfinite(images).all():
        raise ValueError(f"{path}: images hold a value that is not finite")
    if window_origin.min() < 0 or window_origin.max() > cfg.grid - cfg.window:
        raise ValueError(f"{path}: window_origin has a value outside 0..={cfg.grid - cfg.window}")
    if mask_index.min() < 0 or mask_index.max() >= area:
        raise ValueError(f"{path}: mask_index has a value outside 0..{area}")
    if m > 1 and not (mask_index[..., 1:] > mask_index[..., :-1]).all():
        raise ValueError(f"{path}: mask_index has a window that is not strictly ascending")
    return images, window_origin, mask_index, visible_index_from_mask(mask_index, area)


# ---------------------------------------------------------------------------------------
# Gradient check
# ---------------------------------------------------------------------------------------


def loss_and_grads(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[float, dict[str, torch.Tensor]]:
    param = next(model.parameters())
    images, *indices = batch
    model.zero_grad(set_to_none=True)
    loss = model(images.to(param.device, param.dtype), *(t.to(param.device) for t in indices))
    loss.backward()
    return loss.item(), {name: p.grad.detach().cpu() for name, p in model.named_parameters()}


def relative_errors(
    loss: float, grads: dict[str, torch.Tensor], other: dict[str, torch.Tensor]
) -> list[tuple[str, float, float]]:
    """(name, max |ours - theirs|, max |ours|) for the loss and every gradient."""
    if "loss" not in other:
        raise ValueError("the gradient file has no tensor loss")
    rows = [("loss", abs(loss - other["loss"].double().reshape(-1)[0].item()), abs(loss))]
    for name, ours in grads.items():
        if name not in other:
            raise ValueError(f"the gradient file has no tensor {name}")
        theirs = other[name].double()
        if tuple(theirs.shape) != tuple(ours.shape):
            raise ValueError(f"the gradient file's {name} is {list(theirs.shape)}, want {list(ours.shape)}")
        ours = ours.double()
        rows.append((name, (ours - theirs).abs().max().item(), ours.abs().max().item()))
    return rows


def ratio(err: float, scale: float) -> float:
    if scale > 0:
        return err / scale
    return 0.0 if err == 0 else math.inf


def run_check(args: argparse.Namespace, cfg: ModelConfig) -> int:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    model = build_model(cfg).to(device, dtype)
    load_parameters(model, args.params)
    loss, grads = loss_and_grads(model, load_batch(args.batch_file, cfg))
    print(f"loss {loss:.9g} ({args.dtype} on {device})")
    if args.save_grads:
        as_lomar = {"loss": torch.tensor(loss)} | {name: g.float() for name, g in grads.items()}
        config = {"preset": args.preset, "model": cfg.as_json()}
        save_safetensors(args.save_grads, as_lomar, {"format": "lomar-grad", "config": json.dumps(config)})
        print(f"wrote {args.save_grads}")
    if not args.grads:
        return 0
    theirs, metadata = read_safetensors(args.grads)
    check_same_model(args.grads, metadata, cfg)
    rows = relative_errors(loss, grads, theirs)
    width = max(len(name) for name, _, _ in rows)
    print(f"{'tensor':<{width}}  {'max|err|':>10}  {'max|ref|':>10}  {'err/ref':>10}")
    for name, err, scale in rows:
        print(f"{name:<{width}}  {err:10.3e}  {scale:10.3e}  {ratio(err, scale):10.3e}")
    worst_name, worst_err, worst_scale = max(rows, key=lambda r: ratio(r[1], r[2]))
    worst = ratio(worst_err, worst_scale)
    verdict = "within" if worst <= args.tol else "BEYOND"
    print(f"worst: {worst_name} {worst:.3e} ({verdict} tol {args.tol:.1e})")
    return 0 if worst <= args.tol else 1


# ---------------------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------------------


def training_flops(cfg: ModelConfig, images: int) -> float:
    """Matrix-product FLOPs of one training step, counted exactly as src/bench/flops.rs counts."""

    def block(t: int, d: int) -> int:
        return 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * d * MLP_RATIO

    d, pd = cfg.width, cfg.patch_dim
    if cfg.method == "mae":
        dec, encoded, tokens = cfg.decoder, 1 + cfg.visible_per_window, cfg.seq_len
        forward = (
            cfg.depth * block(encoded, d)
            + 2 * encoded * d * dec.width
            + dec.depth * block(tokens, dec.width)
            + 2 * tokens * dec.width * pd
        )
    else:
        forward = cfg.depth * block(cfg.seq_len, d) + 2 * cfg.masked_per_window * d * pd
    embed = 2 * cfg.visible_per_window * pd * d
    # Backward doubles every product but the embedding's, which needs no input gradient.
    return float(images * cfg.windows_per_image * (3 * forward + 2 * embed))


# Dense bf16 tensor-core peaks, matched on the device name (the table of src/bench/flops.rs).
BF16_PEAKS = [("H200", 989.4e12), ("H100 PCIE", 756.0e12), ("H100", 989.4e12), ("A100", 312.0e12), ("L40S", 362.0e12), ("A10G", 70.0e12)]


def known_bf16_peak(device_name: str) -> float | None:
    return next((peak for key, peak in BF16_PEAKS if key in device_name.upper()), None)


def make_adamw(model: nn.Module, lr: float) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if is_decayed(n, p)]
    rest = [p for n, p in model.named_parameters() if not is_decayed(n, p)]
    groups = [{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True)


def time_mode(cfg: ModelConfig, args: argparse.Namespace, mode: str, flops: float, peak: float | None) -> dict:
    """Warm-up steps, then timed steps of one execution mode ('eager' or 'compile') on
    `args.device`: bf16 autocast on a GPU, fp32 on the CPU."""
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    torch.manual_seed(args.seed)
    model = build_model(cfg).to(device)
    init_parameters(model)
    optimizer = make_adamw(model, lr=1.5e-4 * args.batch / 256)
    forward = torch.compile(model, mode=args.compile_mode) if mode == "compile" else model

    def step(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
            loss = forward(*batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def synchronize() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(args.warmup):
        step(sample_batch(cfg, args.batch, device))
    synchronize()
    warmup_s = time.perf_counter() - started

    # Each step's batch is sampled before its timing starts, so sampling is not timed. The
    # GPU runs ahead of the host, so its steps are timed with events; the CPU's are not.
    spans, losses = [], []
    started = time.perf_counter()
    for _ in range(args.steps):
        batch = sample_batch(cfg, args.batch, device)
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            losses.append(step(batch))
            end.record()
            spans.append(lambda start=start, end=end: start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            losses.append(step(batch))
            elapsed_ms = (time.perf_counter() - t0) * 1e3
            spans.append(lambda ms=elapsed_ms: ms)
    synchronize()
    wall_s = time.perf_counter() - started
    ms = sorted(span() for span in spans)
    final_loss = losses[-1].item()
    if not math.isfinite(final_loss):
        raise RuntimeError(f"{mode}: the loss is {final_loss}")
    median = statistics.median(ms)
    achieved = flops / (median / 1000.0)
    result = {
        "mode": mode,
        "ms_median": median,
        "ms_min": ms[0],
        "ms_p10": ms[len(ms) // 10],
        "ms_p90": ms[(len(ms) * 9) // 10],
        "ms_max": ms[-1],
        "images_per_s": args.batch * 1000.0 / median,
        "images_per_s_wall": args.batch * args.steps / wall_s,
        "tflops": achieved / 1e12,
        "mfu": achieved / peak if peak else None,
        # The CPU allocator keeps no statistics: the process's peak resident set instead.
        "peak_memory_bytes": (
            torch.cuda.max_memory_allocated() if on_gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        ),
        "warmup_s": warmup_s,
        "final_loss": final_loss,
    }
    del model, forward, optimizer, losses
    torch._dynamo.reset()
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return result


def cpu_threads() -> int:
    """The cores this process may run on, as lomar's thread pool counts them."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_bench(args: argparse.Namespace, cfg: ModelConfig) -> int:
    threads = torch.get_num_threads()
    try:
        return bench_on_device(args, cfg)
    finally:
        torch.set_num_threads(threads)  # as it was for the caller (the tests run in one process)


def bench_on_device(args: argparse.Namespace, cfg: ModelConfig) -> int:
    if args.device == "cpu":
        torch.set_num_threads(args.threads or cpu_threads())
        device_name = f"cpu ({torch.get_num_threads()} threads)"
        peak, peak_source = args.peak_flops, "--peak-flops" if args.peak_flops else None
        precision = "fp32, fused AdamW"
    else:
        if not torch.cuda.is_available():
            raise ValueError("--bench needs a CUDA GPU, and torch sees none (pass --device cpu to time the CPU)")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        device_name = torch.cuda.get_device_name()
        if args.peak_flops:
            peak, peak_source = args.peak_flops, "--peak-flops"
        elif known_bf16_peak(device_name):
            peak, peak_source = known_bf16_peak(device_name), "by GPU name"
        else:
            peak, peak_source = 989.4e12, "unknown GPU: H100 SXM's, pass --peak-flops"
        precision = "bf16 autocast, fp32 master weights, fused AdamW"
    flops = training_flops(cfg, args.batch)
    modes = args.modes.split(",")
    for mode in modes:
        if mode not in ("eager", "compile"):
            raise ValueError(f"--modes: {mode!r} is not one of eager, compile")
    print(f"{device_name}, torch {torch.__version__}; {args.preset} {cfg}; batch {args.batch}; {precision}")
    if peak:
        print(f"{flops / 1e9:.1f} GFLOP per step; MFU against {peak / 1e12:.1f} TFLOP/s ({peak_source})")
    else:
        print(f"{flops / 1e9:.1f} GFLOP per step; MFU n/a (no peak; pass --peak-flops)")
    results = []
    for mode in modes:
        r = time_mode(cfg, args, mode, flops, peak)
        results.append(r)
        mfu = f"MFU {100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "MFU n/a"
        memory = "peak mem" if args.device != "cpu" else "peak RSS"
        print(
            f"{mode:>8}: {r['ms_median']:8.2f} ms/step (min {r['ms_min']:.2f}, p90 {r['ms_p90']:.2f}), "
            f"{r['images_per_s']:9.1f} img/s, {1e3 * r['tflops']:8.1f} GFLOP/s, {mfu}, "
            f"{memory} {r['peak_memory_bytes'] / 2**30:6.2f} GiB, warm-up {r['warmup_s']:.1f} s"
        )
    if args.json:
        report = {
            "device": device_name,
            "gpu": device_name if args.device != "cpu" else None,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "threads": torch.get_num_threads() if args.device == "cpu" else None,
            "preset": args.preset,
            "model": cfg.as_json(),
            "batch": args.batch,
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "compile_mode": args.compile_mode,
            "precision": precision,
            "flops_per_step": flops,
            "peak_flops": peak,
            "peak_flops_source": peak_source,
            "results": results,
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def base_model(args: argparse.Namespace) -> ModelConfig:
    if not args.config:
        args.preset = args.preset or "tiny"
        return PRESETS[args.preset]
    try:
        config = json.loads(Path(args.config).read_text())
        args.preset = config.get("preset", "config")
        return ModelConfig.from_json(config["model"])
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"--config {args.config}: not a lomar config ({err})") from err


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, ModelConfig]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model settings (as lomar's flags: a preset or config, then overrides)")
    base = model.add_mutually_exclusive_group()
    base.add_argument("--preset", choices=sorted(PRESETS), help="default: tiny, as lomar")
    base.add_argument("--config", metavar="FILE.json", help="a lomar config (its `model` part is used)")
    model.add_argument("--image", type=int)
    model.add_argument("--patch", type=int)
    model.add_argument("--window", type=int)
    model.add_argument("--windows-per-image", type=int)
    model.add_argument("--mask-ratio", type=float)
    model.add_argument("--depth", type=int)
    model.add_argument("--width", type=int)
    model.add_argument("--heads", type=int)
    model.add_argument("--no-norm-pix", action="store_true")
    model.add_argument("--method", choices=["lomar", "mae"], help="default: the preset's or config's")

    check = parser.add_argument_group("gradient check (the default job)")
    check.add_argument("--params", help="lomar parameter or checkpoint file (safetensors)")
    check.add_argument("--batch-file", help="batch file: images, window_origin, mask_index")
    check.add_argument("--grads", help="what `lomar grad` wrote: loss and one gradient per parameter")
    check.add_argument("--tol", type=float, default=1e-4, help="largest accepted max|err|/max|ref| of any tensor")
    check.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    check.add_argument("--device", help="where torch computes: the check's default cpu, the benchmark's cuda")
    check.add_argument("--save-grads", help="also write our loss and gradients here, in lomar's format")

    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--bench", action="store_true", help="time training steps instead (on --device)")
    bench.add_argument("--batch", type=int, default=32, help="images per step")
    bench.add_argument("--warmup", type=int, default=10)
    bench.add_argument("--steps", type=int, default=50, help="timed steps")
    bench.add_argument("--modes", help="comma-separated: eager, compile (default: both on a GPU, eager on the CPU)")
    bench.add_argument("--threads", type=int, help="CPU threads (default: one per core this process may use)")
    bench.add_argument("--compile-mode", default="default", help="torch.compile mode")
    bench.add_argument("--peak-flops", type=float, help="peak FLOP/s for MFU (default: a GPU's dense bf16 by name)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    overrides = {
        field: getattr(args, field)
        for field in ("image", "patch", "window", "windows_per_image", "mask_ratio", "depth", "width", "heads")
        if getattr(args, field) is not None
    }
    if args.no_norm_pix:
        overrides["norm_pix"] = False
    try:
        base = base_model(args)
        if args.method == "mae" and base.method == "lomar" and not args.config:
            base = mae_recipe(base)
        elif args.method is not None and args.method != base.method:
            raise ValueError(f"{args.preset} holds a --method {base.method} model; it cannot run with --method {args.method}")
        cfg = dataclasses.replace(base, **overrides)
        if cfg.method == "mae":
            cfg = dataclasses.replace(cfg, window=cfg.grid)
        cfg.validate()
    except (OSError, ValueError) as err:
        parser.error(str(err))
    if args.device is None:
        args.device = "cuda" if args.bench else "cpu"
    if args.modes is None:
        args.modes = "eager" if args.device == "cpu" else "eager,compile"
    if args.bench:
        if args.device not in ("cpu", "cuda"):
            parser.error(f"--device {args.device}: the benchmark runs on cpu or cuda")
        if args.threads is not None and (args.threads < 1 or args.device != "cpu"):
            parser.error(f"--threads {args.threads}: needs --device cpu and at least 1")
        for name in ("batch", "warmup", "steps"):
            if getattr(args, name) < (0 if name == "warmup" else 1):
                parser.error(f"--{name} = {getattr(args, name)}: too small")
    elif not (args.params and args.batch_file):
        parser.error("the gradient check needs --params and --batch-file (or pass --bench)")
    return args, cfg


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    try:
        return run_bench(args, cfg) if args.bench else run_check(args, cfg)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
