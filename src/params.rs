//! The parameter name table: one flat buffer, named views, initialisation, decay mask.
//!
//! [`ParamLayout::new`] is the only place that lists the parameters. Offsets, shapes,
//! the initialisation, the weight-decay mask, checkpoint names and the per-block views the
//! backends compute with all derive from it. Names follow timm's BEiT.

use std::collections::HashMap;
use std::ops::Range;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::ModelConfig;

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
    /// `[(2K-1)²+3, h]`.
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
    pub mask_token: Range<usize>,
    pub blocks: Vec<BlockRanges>,
    pub norm_w: Range<usize>,
    pub norm_b: Range<usize>,
    /// `[3p², D]`, outputs in `(y, x, c)` order.
    pub head_w: Range<usize>,
    pub head_b: Range<usize>,
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
}

impl ParamLayout {
    /// The timm/BEiT names, shapes, initialisers and decay flags, in buffer order; each
    /// name is written once, here.
    pub fn new(m: &ModelConfig) -> Self {
        let (d, p, hidden, pd) = (m.width, m.patch, m.hidden(), m.patch_dim());
        let mut t = Table::default();
        let xavier = |fan_out, fan_in| Init::XavierUniform { fan_in, fan_out };
        let patch_w = t.push(
            "patch_embed.proj.weight",
            &[d, 3, p, p],
            xavier(d, pd),
            true,
        );
        let patch_b = t.push("patch_embed.proj.bias", &[d], Init::Zeros, false);
        let cls_token = t.push("cls_token", &[1, 1, d], Init::Normal(0.02), false);
        let mask_token = t.push("mask_token", &[1, 1, d], Init::Normal(0.02), false);
        let blocks = (0..m.depth)
            .map(|i| {
                let mut push = |s: &str, shape: &[usize], init, decay| {
                    t.push(&format!("blocks.{i}.{s}"), shape, init, decay)
                };
                BlockRanges {
                    norm1_w: push("norm1.weight", &[d], Init::Ones, false),
                    norm1_b: push("norm1.bias", &[d], Init::Zeros, false),
                    qkv_w: push("attn.qkv.weight", &[3 * d, d], xavier(3 * d, d), true),
                    qkv_b: push("attn.qkv.bias", &[3 * d], Init::Zeros, false),
                    rel_bias: push(
                        "attn.relative_position_bias_table",
                        &[m.rel_bias_rows(), m.heads],
                        Init::Zeros,
                        false,
                    ),
                    proj_w: push("attn.proj.weight", &[d, d], xavier(d, d), true),
                    proj_b: push("attn.proj.bias", &[d], Init::Zeros, false),
                    norm2_w: push("norm2.weight", &[d], Init::Ones, false),
                    norm2_b: push("norm2.bias", &[d], Init::Zeros, false),
                    fc1_w: push("mlp.fc1.weight", &[hidden, d], xavier(hidden, d), true),
                    fc1_b: push("mlp.fc1.bias", &[hidden], Init::Zeros, false),
                    fc2_w: push("mlp.fc2.weight", &[d, hidden], xavier(d, hidden), true),
                    fc2_b: push("mlp.fc2.bias", &[d], Init::Zeros, false),
                }
            })
            .collect();
        let norm_w = t.push("norm.weight", &[d], Init::Ones, false);
        let norm_b = t.push("norm.bias", &[d], Init::Zeros, false);
        let head_w = t.push("head.weight", &[pd, d], xavier(pd, d), true);
        let head_b = t.push("head.bias", &[pd], Init::Zeros, false);
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
            ranges: ModelRanges {
                patch_w,
                patch_b,
                cls_token,
                mask_token,
                blocks,
                norm_w,
                norm_b,
                head_w,
                head_b,
            },
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
