//! The pretrained encoder as a state dict for timm's BEiT, for fine-tuning in PyTorch.
//!
//! The target is `timm.models.beit.Beit(img_size=H, patch_size=p, embed_dim=D, depth=L,
//! num_heads=h, use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=None,
//! global_pool="token", num_classes=0)`, whose state dict this file matches key for key.
//! What differs from lomar's own layout:
//! - no `mask_token`, `head.*` or optimiser state: the encoder only;
//! - the qkv bias is split into `attn.q_bias` and `attn.v_bias`. BEiT has no key bias: a
//!   key bias `b_k` adds `q_i · b_k` to every logit of query row `i`, which softmax
//!   cancels, so dropping ours changes no output;
//! - each block's relative bias table is resized from the `(2K-1)²` window grid to the
//!   `(2G-1)²` grid of the whole image (`rel_bias::resize_table`), since BEiT attends over
//!   the whole image;
//! - optionally the `attn.relative_position_index` buffers, which timm before 0.9 keeps in
//!   the state dict (later versions rebuild them and would report them as unexpected).
//!
//! An MAE encoder goes to timm's plain `VisionTransformer(img_size=H, patch_size=p,
//! embed_dim=D, depth=L, num_heads=h, mlp_ratio=4, qkv_bias=True, global_pool="token",
//! num_classes=0)` instead, the keys of MAE's own encoder (qkv bias whole, no tables) plus
//! `pos_embed`, the fixed sin-cos table computed for the target grid.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::config::{Method, ModelConfig};
use crate::cpu::mae::pos_embed::sincos_pos_embed;
use crate::cpu::ops::attention::RelativeIndex;
use crate::eval::rel_bias::resize_table;
use crate::io::tensor_file::{write_atomic, OutTensor};
use crate::params::ParamLayout;

/// `format` metadata of an exported encoder.
pub const ENCODER_FORMAT: &str = "lomar-encoder";

/// One exported float tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Exported {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// What to export.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// Image side the timm model is built for (the tables are resized to its grid).
    pub image: usize,
    /// Also write the `relative_position_index` buffers (timm before 0.9).
    pub position_index: bool,
}

/// The timm class the export of `m` loads into, and the metadata key of its arguments.
pub fn timm_class(m: &ModelConfig) -> (&'static str, &'static str) {
    match m.method {
        Method::Lomar => ("timm.models.beit.Beit", "timm_beit_kwargs"),
        Method::Mae => (
            "timm.models.vision_transformer.VisionTransformer",
            "timm_vit_kwargs",
        ),
    }
}

/// The keyword arguments of the timm model the export loads into ([`timm_class`]).
pub fn timm_kwargs(m: &ModelConfig, image: usize) -> serde_json::Value {
    if m.method == Method::Mae {
        return json!({
            "img_size": image,
            "patch_size": m.patch,
            "embed_dim": m.width,
            "depth": m.depth,
            "num_heads": m.heads,
            "mlp_ratio": crate::config::MLP_RATIO as f64,
            "qkv_bias": true,
            "class_token": true,
            "global_pool": "token",
            "num_classes": 0,
        });
    }
    json!({
        "img_size": image,
        "patch_size": m.patch,
        "embed_dim": m.width,
        "depth": m.depth,
        "num_heads": m.heads,
        "mlp_ratio": crate::config::MLP_RATIO as f64,
        "qkv_bias": true,
        "use_abs_pos_emb": false,
        "use_rel_pos_bias": true,
        "init_values": null,
        "global_pool": "token",
        "num_classes": 0,
    })
}

/// Refuses a target image side the model cannot be built at.
pub fn check_image(m: &ModelConfig, image: usize) -> Result<()> {
    if image == 0 || !image.is_multiple_of(m.patch) {
        bail!(
            "image = {image}: must be a positive multiple of the model's patch ({})",
            m.patch
        );
    }
    Ok(())
}

/// The encoder's tensors under timm's names, in timm's order.
pub fn encoder_tensors(m: &ModelConfig, params: &[f32], image: usize) -> Result<Vec<Exported>> {
    check_image(m, image)?;
    let layout = ParamLayout::new(m);
    layout.check_len("parameters", params.len())?;
    let r = layout.ranges();
    let (d, grid) = (m.width, image / m.patch);
    let span = 2 * grid - 1;
    let copy = |name: String, shape: &[usize], range: &std::ops::Range<usize>| Exported {
        name,
        shape: shape.to_vec(),
        values: params[range.clone()].to_vec(),
    };
    let mut out = vec![copy("cls_token".into(), &[1, 1, d], &r.cls_token)];
    if m.method == Method::Mae {
        out.push(Exported {
            name: "pos_embed".into(),
            shape: vec![1, 1 + grid * grid, d],
            values: sincos_pos_embed(d, grid)
                .into_iter()
                .map(|v| v as f32)
                .collect(),
        });
    }
    out.push(copy(
        "patch_embed.proj.weight".into(),
        &[d, 3, m.patch, m.patch],
        &r.patch_w,
    ));
    out.push(copy("patch_embed.proj.bias".into(), &[d], &r.patch_b));
    for (i, b) in r.blocks.iter().enumerate() {
        let n = |s: &str| format!("blocks.{i}.{s}");
        out.push(copy(n("norm1.weight"), &[d], &b.norm1_w));
        out.push(copy(n("norm1.bias"), &[d], &b.norm1_b));
        match m.method {
            Method::Lomar => {
                let qkv_b = &params[b.qkv_b.clone()];
                out.push(Exported {
                    name: n("attn.q_bias"),
                    shape: vec![d],
                    values: qkv_b[..d].to_vec(),
                });
                out.push(Exported {
                    name: n("attn.v_bias"),
                    shape: vec![d],
                    values: qkv_b[2 * d..].to_vec(),
                });
                out.push(Exported {
                    name: n("attn.relative_position_bias_table"),
                    shape: vec![span * span + 3, m.heads],
                    values: resize_table(&params[b.rel_bias.clone()], m.heads, m.window, grid),
                });
                out.push(copy(n("attn.qkv.weight"), &[3 * d, d], &b.qkv_w));
            }
            Method::Mae => {
                out.push(copy(n("attn.qkv.weight"), &[3 * d, d], &b.qkv_w));
                out.push(copy(n("attn.qkv.bias"), &[3 * d], &b.qkv_b));
            }
        }
        out.push(copy(n("attn.proj.weight"), &[d, d], &b.proj_w));
        out.push(copy(n("attn.proj.bias"), &[d], &b.proj_b));
        out.push(copy(n("norm2.weight"), &[d], &b.norm2_w));
        out.push(copy(n("norm2.bias"), &[d], &b.norm2_b));
        out.push(copy(n("mlp.fc1.weight"), &[m.hidden(), d], &b.fc1_w));
        out.push(copy(n("mlp.fc1.bias"), &[m.hidden()], &b.fc1_b));
        out.push(copy(n("mlp.fc2.weight"), &[d, m.hidden()], &b.fc2_w));
        out.push(copy(n("mlp.fc2.bias"), &[d], &b.fc2_b));
    }
    out.push(copy("norm.weight".into(), &[d], &r.norm_w));
    out.push(copy("norm.bias".into(), &[d], &r.norm_b));
    Ok(out)
}

/// Writes the encoder of `params` (a model `m`) for timm, with the constructor's keyword
/// arguments in the metadata (`timm_beit_kwargs`, or `timm_vit_kwargs` for MAE). Returns
/// the number of tensors.
pub fn write_encoder(
    path: &Path,
    m: &ModelConfig,
    params: &[f32],
    opts: &ExportOptions,
) -> Result<usize> {
    if opts.position_index && m.method == Method::Mae {
        bail!("--position-index: an MAE encoder has no relative position index");
    }
    let tensors = encoder_tensors(m, params, opts.image)?;
    let mut out: Vec<OutTensor> = tensors
        .iter()
        .map(|t| OutTensor::f32(t.name.clone(), &t.shape, &t.values))
        .collect();
    let grid = opts.image / m.patch;
    // Built only when asked for: it has (G² + 1)² entries.
    let index: Vec<i64> = if opts.position_index {
        let rel = RelativeIndex::new(grid);
        rel.index.iter().map(|&i| i as i64).collect()
    } else {
        Vec::new()
    };
    if opts.position_index {
        let t = 1 + grid * grid;
        for i in 0..m.depth {
            out.push(OutTensor::i64(
                format!("blocks.{i}.attn.relative_position_index"),
                &[t, t],
                &index,
            ));
        }
    }
    let meta = HashMap::from([
        ("format".to_string(), ENCODER_FORMAT.to_string()),
        (
            "lomar_version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
        (
            timm_class(m).1.to_string(),
            timm_kwargs(m, opts.image).to_string(),
        ),
        ("model".to_string(), serde_json::to_string(m)?),
    ]);
    write_atomic(path, &out, meta)
        .with_context(|| format!("cannot write encoder {}", path.display()))?;
    Ok(out.len())
}
