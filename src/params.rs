//! The parameter name table: one flat buffer, named views, initialisation, decay mask.
//!
//! [`ParamLayout::new`] is the only place that lists the parameters. Offsets, shapes,
//! the initialisation, the weight-decay mask, checkpoint names and the per-block views the
//! backends compute with all derive from it. LoMaR's names follow timm's BEiT; MAE's are
//! the official MAE state-dict names, so its checkpoints map tensor for tensor (its
//! sin-cos position embeddings are fixed and computed, not parameters).

use std::collections::HashMap;
use std::ops::Range;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::{ModelConfig, MLP_RATIO};

/// How a tensor is initialised (docs/DESIGN.md §1.4).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    /// Normal(0, std).
    Normal(f64),
    /// Xavier-uniform over a weight viewed as `[fan_out, fan_in]`.
    XavierUniform {
        fan_in: usize,
        fan_out: usize,
    },
}

/// One named tensor inside the flat buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub init: Init,
    /// AdamW weight decay applies (matrix weights only).
    pub decay: bool,
}

impl ParamEntry {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// Where each parameter of one transformer block lives in the flat buffer.
#[derive(Clone, Debug)]
pub struct BlockRanges {
    pub norm1_w: Range<usize>,
    pub norm1_b: Range<usize>,
    /// `[3D, D]`, rows ordered q, k, v; head `i` owns rows `i*d..(i+1)*d` of each.
    pub qkv_w: Range<usize>,
    pub qkv_b: Range<usize>,
    /// `[(2K-1)²+3, h]`; empty in MAE's blocks, which have no relative bias.
    pub rel_bias: Range<usize>,
    pub proj_w: Range<usize>,
    pub proj_b: Range<usize>,
    pub norm2_w: Range<usize>,
    pub norm2_b: Range<usize>,
    pub fc1_w: Range<usize>,
    pub fc1_b: Range<usize>,
    pub fc2_w: Range<usize>,
    pub fc2_b: Range<usize>,
}

/// Where every parameter of the model lives in the flat buffer.
#[derive(Clone, Debug)]
pub struct ModelRanges {
    /// `[D, 3, p, p]`, Conv2d layout.
    pub patch_w: Range<usize>,
    pub patch_b: Range<usize>,
    pub cls_token: Range<usize>,
    /// `[D]` for LoMaR, where it replaces masked patches at the encoder's input; `[Dd]`
    /// for MAE, where it does so at the decoder's.
    pub mask_token: Range<usize>,
    pub blocks: Vec<BlockRanges>,
    pub norm_w: Range<usize>,
    pub norm_b: Range<usize>,
    /// MAE's decoder; `None` for LoMaR.
    pub decoder: Option<DecoderRanges>,
    /// `[3p², D]` (LoMaR's `head`) or `[3p², Dd]` (MAE's `decoder_pred`), outputs in
    /// `(y, x, c)` order.
    pub head_w: Range<usize>,
    pub head_b: Range<usize>,
}

/// Where MAE's decoder lives in the flat buffer (its mask token and `decoder_pred` are
/// [`ModelRanges::mask_token`] and [`ModelRanges::head_w`]).
#[derive(Clone, Debug)]
pub struct DecoderRanges {
    /// `[Dd, D]`.
    pub embed_w: Range<usize>,
    pub embed_b: Range<usize>,
    pub blocks: Vec<BlockRanges>,
    pub norm_w: Range<usize>,
    pub norm_b: Range<usize>,
}

/// The ordered table of every parameter, and the ranges the backends compute with.
#[derive(Clone, Debug)]
pub struct ParamLayout {
    entries: Vec<ParamEntry>,
    by_name: HashMap<String, usize>,
    total: usize,
    ranges: ModelRanges,
}

/// The table as it is being built: entries in order, each push returning its range.
#[derive(Default)]
struct Table {
    entries: Vec<ParamEntry>,
    total: usize,
}

impl Table {
    fn push(&mut self, name: &str, shape: &[usize], init: Init, decay: bool) -> Range<usize> {
        let entry = ParamEntry {
            name: name.to_string(),
            shape: shape.to_vec(),
            offset: self.total,
            init,
            decay,
        };
        self.total += entry.len();
        let range = entry.range();
        self.entries.push(entry);
        range
    }

    /// One pre-norm block of width `d` named `prefix.*`, with a relative bias table of
    /// `(rows, heads)` or none (MAE).
    fn push_block(
        &mut self,
        prefix: &str,
        d: usize,
        rel_bias: Option<(usize, usize)>,
    ) -> BlockRanges {
        let hidden = d * MLP_RATIO;
        let name = |s: &str| format!("{prefix}.{s}");
        let norm1_w = self.push(&name("norm1.weight"), &[d], Init::Ones, false);
        let norm1_b = self.push(&name("norm1.bias"), &[d], Init::Zeros, false);
        let qkv_w = self.push(
            &name("attn.qkv.weight"),
            &[3 * d, d],
            xavier(3 * d, d),
            true,
        );
        let qkv_b = self.push(&name("attn.qkv.bias"), &[3 * d], Init::Zeros, false);
        let rel_bias = match rel_bias {
            Some((rows, heads)) => self.push(
                &name("attn.relative_position_bias_table"),
                &[rows, heads],
                Init::Zeros,
                false,
            ),
            None => self.total..self.total,
        };
        BlockRanges {
            norm1_w,
            norm1_b,
            qkv_w,
            qkv_b,
            rel_bias,
            proj_w: self.push(&name("attn.proj.weight"), &[d, d], xavier(d, d), true),
            proj_b: self.push(&name("attn.proj.bias"), &[d], Init::Zeros, false),
            norm2_w: self.push(&name("norm2.weight"), &[d], Init::Ones, false),
            norm2_b: self.push(&name("norm2.bias"), &[d], Init::Zeros, false),
            fc1_w: self.push(
                &name("mlp.fc1.weight"),
                &[hidden, d],
                xavier(hidden, d),
                true,
            ),
            fc1_b: self.push(&name("mlp.fc1.bias"), &[hidden], Init::Zeros, false),
            fc2_w: self.push(
                &name("mlp.fc2.weight"),
                &[d, hidden],
                xavier(d, hidden),
                true,
            ),
            fc2_b: self.push(&name("mlp.fc2.bias"), &[d], Init::Zeros, false),
        }
    }
}

/// [`Init::XavierUniform`] over a weight viewed as `[fan_out, fan_in]`.
fn xavier(fan_out: usize, fan_in: usize) -> Init {
    Init::XavierUniform { fan_in, fan_out }
}

impl ParamLayout {
    /// The names, shapes, initialisers and decay flags, in buffer order; each name is
    /// written once, here.
    pub fn new(m: &ModelConfig) -> Self {
        let (d, p, pd) = (m.width, m.patch, m.patch_dim());
        let mut t = Table::default();
        let patch_w = t.push(
            "patch_embed.proj.weight",
            &[d, 3, p, p],
            xavier(d, pd),
            true,
        );
        let patch_b = t.push("patch_embed.proj.bias", &[d], Init::Zeros, false);
        let cls_token = t.push("cls_token", &[1, 1, d], Init::Normal(0.02), false);
        let ranges = match m.decoder {
            None => {
                let mask_token = t.push("mask_token", &[1, 1, d], Init::Normal(0.02), false);
                let rel_bias = Some((m.rel_bias_rows(), m.heads));
                let blocks = (0..m.depth)
                    .map(|i| t.push_block(&format!("blocks.{i}"), d, rel_bias))
                    .collect();
                let norm_w = t.push("norm.weight", &[d], Init::Ones, false);
                let norm_b = t.push("norm.bias", &[d], Init::Zeros, false);
                let head_w = t.push("head.weight", &[pd, d], xavier(pd, d), true);
                let head_b = t.push("head.bias", &[pd], Init::Zeros, false);
                ModelRanges {
                    patch_w,
                    patch_b,
                    cls_token,
                    mask_token,
                    blocks,
                    norm_w,
                    norm_b,
                    decoder: None,
                    head_w,
                    head_b,
                }
            }
            Some(dec) => {
                let dd = dec.width;
                let blocks = (0..m.depth)
                    .map(|i| t.push_block(&format!("blocks.{i}"), d, None))
                    .collect();
                let norm_w = t.push("norm.weight", &[d], Init::Ones, false);
                let norm_b = t.push("norm.bias", &[d], Init::Zeros, false);
                let embed_w = t.push("decoder_embed.weight", &[dd, d], xavier(dd, d), true);
                let embed_b = t.push("decoder_embed.bias", &[dd], Init::Zeros, false);
                let mask_token = t.push("mask_token", &[1, 1, dd], Init::Normal(0.02), false);
                let dec_blocks = (0..dec.depth)
                    .map(|i| t.push_block(&format!("decoder_blocks.{i}"), dd, None))
                    .collect();
                let dec_norm_w = t.push("decoder_norm.weight", &[dd], Init::Ones, false);
                let dec_norm_b = t.push("decoder_norm.bias", &[dd], Init::Zeros, false);
                let head_w = t.push("decoder_pred.weight", &[pd, dd], xavier(pd, dd), true);
                let head_b = t.push("decoder_pred.bias", &[pd], Init::Zeros, false);
                ModelRanges {
                    patch_w,
                    patch_b,
                    cls_token,
                    mask_token,
                    blocks,
                    norm_w,
                    norm_b,
                    decoder: Some(DecoderRanges {
                        embed_w,
                        embed_b,
                        blocks: dec_blocks,
                        norm_w: dec_norm_w,
                        norm_b: dec_norm_b,
                    }),
                    head_w,
                    head_b,
                }
            }
        };
        let by_name = t
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), i))
            .collect();
        ParamLayout {
            entries: t.entries,
            by_name,
            total: t.total,
            ranges,
        }
    }

    pub fn entries(&self) -> &[ParamEntry] {
        &self.entries
    }

    /// Total scalars in the flat buffer.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Fails unless `len` values (of `what`: parameters, gradients, moments) fill the
    /// flat buffer exactly.
    pub fn check_len(&self, what: &str, len: usize) -> anyhow::Result<()> {
        if len != self.total {
            anyhow::bail!(
                "{what}: {len} values, the model has {} parameters",
                self.total
            );
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&ParamEntry> {
        self.by_name.get(name).map(|&i| &self.entries[i])
    }

    /// The ranges the backends compute with.
    pub fn ranges(&self) -> &ModelRanges {
        &self.ranges
    }

    /// 1.0 where AdamW decays the weight, 0.0 elsewhere, one value per scalar.
    pub fn decay_mask(&self) -> Vec<f32> {
        let mut mask = vec![0.0; self.total];
        for e in self.entries.iter().filter(|e| e.decay) {
            mask[e.range()].fill(1.0);
        }
        mask
    }

    /// A freshly initialised flat buffer; the same seed gives the same values everywhere.
    pub fn init(&self, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
        let mut flat = vec![0.0f32; self.total];
        for e in &self.entries {
            let dst = &mut flat[e.range()];
            match e.init {
                Init::Zeros => dst.fill(0.0),
                Init::Ones => dst.fill(1.0),
                Init::Normal(std) => {
                    for v in dst {
                        *v = (standard_normal(&mut rng) * std) as f32;
                    }
                }
                Init::XavierUniform { fan_in, fan_out } => {
                    let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
                    for v in dst {
                        *v = rng.gen_range(-bound..bound) as f32;
                    }
                }
            }
        }
        flat
    }
}

/// Box–Muller, so the values depend on nothing but the portable ChaCha stream.
pub fn standard_normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = 1.0 - rng.gen::<f64>();
    let u2: f64 = rng.gen::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::preset;

    #[test]
    fn entries_tile_the_buffer_without_gaps() {
        let m = preset("vit_base").unwrap();
        let layout = ParamLayout::new(&m);
        let mut next = 0;
        for e in layout.entries() {
            assert_eq!(e.offset, next, "{}", e.name);
            next += e.len();
        }
        assert_eq!(next, layout.total());
        // 86M encoder parameters plus the 768 -> 768 head and the two tokens.
        assert!(
            (85_000_000..87_000_000).contains(&layout.total()),
            "{}",
            layout.total()
        );
    }

    #[test]
    fn mae_base_has_the_official_names_and_count() {
        let layout = ParamLayout::new(&preset("mae_base").unwrap());
        // The official mae_vit_base_patch16 holds 111,907,840 values, of which its two
        // fixed position embeddings are 197·768 + 197·512 = 252,160.
        assert_eq!(layout.total(), 111_907_840 - 252_160);
        for (name, shape) in [
            ("patch_embed.proj.weight", &[768, 3, 16, 16][..]),
            ("cls_token", &[1, 1, 768]),
            ("blocks.11.attn.qkv.weight", &[2304, 768]),
            ("norm.bias", &[768]),
            ("decoder_embed.weight", &[512, 768]),
            ("mask_token", &[1, 1, 512]),
            ("decoder_blocks.7.mlp.fc2.weight", &[512, 2048]),
            ("decoder_norm.weight", &[512]),
            ("decoder_pred.weight", &[768, 512]),
            ("decoder_pred.bias", &[768]),
        ] {
            assert_eq!(layout.get(name).unwrap().shape, shape, "{name}");
        }
        assert!(layout.entries().iter().all(|e| !e.name.contains("relative")
            && !e.name.starts_with("head")
            && !e.name.contains("pos_embed")));
        let r = layout.ranges();
        assert!(r.blocks.iter().all(|b| b.rel_bias.is_empty()));
        let dec = r.decoder.as_ref().unwrap();
        assert_eq!(dec.blocks.len(), 8);
        assert_eq!(r.head_w, layout.get("decoder_pred.weight").unwrap().range());
    }

    #[test]
    fn init_follows_the_table() {
        let m = preset("tiny").unwrap();
        let layout = ParamLayout::new(&m);
        let flat = layout.init(3);
        assert_eq!(flat, layout.init(3));
        assert_ne!(flat, layout.init(4));
        let r = layout.ranges();
        assert!(flat[r.blocks[1].norm2_w.clone()].iter().all(|&v| v == 1.0));
        assert!(flat[r.blocks[0].rel_bias.clone()].iter().all(|&v| v == 0.0));
        let bound = (6.0f32 / (64.0 + 192.0)).sqrt();
        let qkv = &flat[r.blocks[0].qkv_w.clone()];
        assert!(qkv.iter().all(|v| v.abs() <= bound));
        assert!(qkv.iter().any(|v| v.abs() > 0.9 * bound));
        let cls = &flat[r.cls_token.clone()];
        let std = (cls.iter().map(|v| v * v).sum::<f32>() / cls.len() as f32).sqrt();
        assert!((0.01..0.04).contains(&std), "{std}");
    }

    #[test]
    fn decay_mask_covers_matrix_weights_only() {
        let m = preset("tiny").unwrap();
        let layout = ParamLayout::new(&m);
        let mask = layout.decay_mask();
        for e in layout.entries() {
            let want = if e.shape.len() >= 2
                && !e.name.contains("token")
                && !e.name.contains("relative")
            {
                1.0
            } else {
                0.0
            };
            assert!(mask[e.range()].iter().all(|&v| v == want), "{}", e.name);
        }
    }
}
