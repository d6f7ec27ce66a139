#!/usr/bin/env python3
"""PyTorch's side of the attention benchmark: vit_base's window attention with
the relative position bias (docs/DESIGN.md §1.2), S = 1024 windows × 12 heads × 50 tokens
× 64, bf16, timed the way tests/cuda_attention.rs `vit_base_benchmark` times lomar's.

Two implementations, both with gradients to q, k, v and to the bias table:
- sdpa: `scaled_dot_product_attention` with the bias gathered from the table into a float
  mask (h, T, T), as bench/torch_reference.py does;
- flex: `flex_attention` under `torch.compile`, with a `score_mod` that reads the table
  through the (T, T) index.

Per implementation: forward and forward+backward in µs per call (median of 7 timings of 20
calls each, CUDA events, after a warm-up that includes compilation), and the bandwidth of
the same compulsory traffic lomar's benchmark counts. A failing implementation is
recorded with its error instead of stopping the others.

    python3 bench/attention_torch.py --json attention_torch.json
"""

import argparse
import json
import statistics
import sys


def relative_index(window):
    """(T, T) table row per (query, key) token pair, token 0 the cls token."""
    import torch

    span = 2 * window - 1
    patch_rows = span * span
    tokens = window * window + 1
    index = torch.empty(tokens, tokens, dtype=torch.long)
    for i in range(tokens):
        for j in range(tokens):
            if i == 0:
                index[i, j] = patch_rows + 2 if j == 0 else patch_rows
            elif j == 0:
                index[i, j] = patch_rows + 1
            else:
                yi, xi = divmod(i - 1, window)
                yj, xj = divmod(j - 1, window)
                index[i, j] = (yi - yj + window - 1) * span + (xi - xj + window - 1)
    return index


def median_us(torch, fn, warmup, calls, timings):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(timings):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(samples)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqs", type=int, default=1024)
    parser.add_argument("--window", type=int, default=7)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--timings", type=int, default=7)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        print("attention_torch: no CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    s, h, d = args.seqs, args.heads, args.head_dim
    t = args.window * args.window + 1
    rows = (2 * args.window - 1) ** 2 + 3
    gen = torch.Generator(device=device).manual_seed(7)

    def rand(*shape, dtype=torch.bfloat16):
        x = torch.rand(*shape, generator=gen, device=device, dtype=torch.float32) * 2 - 1
        return x.to(dtype).requires_grad_()

    q, k, v = (rand(s, h, t, d) for _ in range(3))
    table = rand(rows, h, dtype=torch.float32)
    grad_out = rand(s, h, t, d).detach()
    index = relative_index(args.window).to(device)

    def sdpa():
        mask = table[index].permute(2, 0, 1).to(q.dtype)  # (h, T, T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def flex_impl():
        from torch.nn.attention.flex_attention import flex_attention

        compiled = torch.compile(flex_attention)

        def score_mod(score, b, head, q_idx, kv_idx):
            return score + table[index[q_idx, kv_idx], head]

        return lambda: compiled(q, k, v, score_mod=score_mod)

    implementations = {"sdpa": lambda: sdpa, "flex": flex_impl}
    rows_total = s * t
    lse_bytes = rows_total * h * 4
    width = h * d
    forward_bytes = rows_total * 4 * width * 2 + lse_bytes
    backward_bytes = rows_total * 8 * width * 2 + lse_bytes

    results = []
    for name, make in implementations.items():
        entry = {"implementation": name}
        try:
            forward = make()

            def forward_backward():
                for x in (q, k, v, table):
                    x.grad = None
                forward().backward(grad_out)

            with torch.no_grad():
                entry["forward_us"] = median_us(torch, forward, args.warmup, args.calls, args.timings)
            entry["forward_backward_us"] = median_us(
                torch, forward_backward, args.warmup, args.calls, args.timings
            )
            assert table.grad is not None and torch.isfinite(table.grad).all(), "no table gradient"
            entry["backward_us"] = entry["forward_backward_us"] - entry["forward_us"]
            entry["forward_gb_per_s"] = forward_bytes / entry["forward_us"] * 1e-3
            entry["backward_gb_per_s"] = backward_bytes / entry["backward_us"] * 1e-3
            print(
                f"{name:<6} forward {entry['forward_us']:8.1f} µs ({entry['forward_gb_per_s']:5.0f} GB/s)"
                f"  forward+backward {entry['forward_backward_us']:8.1f} µs"
            )
        except Exception as e:  # one implementation failing must not hide the other's numbers
            entry["error"] = f"{type(e).__name__}: {e}"
            print(f"{name:<6} failed: {entry['error']}", file=sys.stderr)
        results.append(entry)

    report = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "shape": {"seqs": s, "tokens": t, "heads": h, "head_dim": d, "dtype": "bf16"},
        "layout": "q, k, v contiguous (S, h, T, d); table (rows, h) f32",
        "forward_bytes": forward_bytes,
        "backward_bytes": backward_bytes,
        "calls_per_timing": args.calls,
        "timings": args.timings,
        "results": results,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
