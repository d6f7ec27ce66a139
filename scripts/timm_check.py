"""Check a `lomar export` file against timm's BEiT, or for an MAE export (`timm_vit_kwargs`
in its metadata) against timm's VisionTransformer (needs torch and timm; CI does not run it).

    python scripts/timm_check.py ENCODER.safetensors \
        [--checkpoint CKPT.safetensors] [--batch BATCH.safetensors --features FEATS.safetensors]

1. Builds `timm.models.beit.Beit(**kwargs)` (or `VisionTransformer(**kwargs)`) from the
   kwargs stored in the export and loads the state dict strictly: prints the missing and
   unexpected keys (both must be empty).
2. With --checkpoint: every exported relative bias table must equal timm's own
   `resize_rel_pos_bias_table_simple` applied to the checkpoint's window table.
3. With --batch and --features: timm's pooled features of the batch images must equal
   lomar's (`lomar features --mode image --pool cls` on the same images: `lomar
   sample-batch --seed S` draws the images `lomar features --data-seed S` starts with).
"""

import argparse
import json
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from timm.layers.pos_embed_rel import resize_rel_pos_bias_table_simple
from timm.models.beit import Beit
from timm.models.vision_transformer import VisionTransformer


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("encoder")
    ap.add_argument("--checkpoint")
    ap.add_argument("--batch")
    ap.add_argument("--features")
    args = ap.parse_args()

    with safe_open(args.encoder, "pt") as f:
        metadata = f.metadata()
    if "timm_vit_kwargs" in metadata:
        kwargs, build = json.loads(metadata["timm_vit_kwargs"]), VisionTransformer
    else:
        kwargs, build = json.loads(metadata["timm_beit_kwargs"]), Beit
    print(f"{build.__name__}(**{kwargs})")
    model = build(**kwargs).eval()
    state = load_file(args.encoder)
    result = model.load_state_dict(state, strict=False)
    print(f"missing keys: {result.missing_keys}")
    print(f"unexpected keys: {result.unexpected_keys}")
    ok = not result.missing_keys and not result.unexpected_keys

    if args.checkpoint:
        ckpt = load_file(args.checkpoint)
        worst = 0.0
        for name, table in state.items():
            if not name.endswith("relative_position_bias_table"):
                continue
            grid = model.patch_embed.grid_size
            want = resize_rel_pos_bias_table_simple(ckpt[name], grid, table.shape)
            worst = max(worst, (want - table).abs().max().item())
        print(f"bias tables vs timm's resize_rel_pos_bias_table_simple: max |diff| {worst:.3e}")
        ok &= worst < 1e-5

    if args.batch and args.features:
        images = load_file(args.batch)["images"]
        ours = load_file(args.features)["features"][: images.shape[0]]
        with torch.no_grad():
            theirs = model.forward_head(model.forward_features(images), pre_logits=True)
        diff = (theirs - ours).abs().max().item()
        scale = theirs.abs().max().item()
        print(
            f"features of {images.shape[0]} images, timm vs lomar: max |diff| {diff:.3e} "
            f"(largest value {scale:.3e})"
        )
        ok &= diff <= 1e-4 * scale

    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
