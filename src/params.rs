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

/// The ordered table of every parameter.
#[derive(Clone, Debug)]
pub struct ParamLayout {
    entries: Vec<ParamEntry>,
    by_name: HashMap<String, usize>,
    total: usize,
}

impl ParamLayout {
    pub fn new(m: &ModelConfig) -> Self {
        let (d, p, hidden, pd) = (m.width, m.patch, m.hidden(), m.patch_dim());
        let mut layout = ParamLayout {
            entries: Vec::new(),
            by_name: HashMap::new(),
            total: 0,
        };
        let xavier = |fan_out, fan_in| Init::XavierUniform { fan_in, fan_out };
        layout.push(
            "patch_embed.proj.weight",
            &[d, 3, p, p],
            xavier(d, pd),
            true,
        );
        layout.push("patch_embed.proj.bias", &[d], Init::Zeros, false);
        layout.push("cls_token", &[1, 1, d], Init::Normal(0.02), false);
        layout.push("mask_token", &[1, 1, d], Init::Normal(0.02), false);
        for i in 0..m.depth {
            let n = |s: &str| format!("blocks.{i}.{s}");
            layout.push(&n("norm1.weight"), &[d], Init::Ones, false);
            layout.push(&n("norm1.bias"), &[d], Init::Zeros, false);
            layout.push(&n("attn.qkv.weight"), &[3 * d, d], xavier(3 * d, d), true);
            layout.push(&n("attn.qkv.bias"), &[3 * d], Init::Zeros, false);
            layout.push(
                &n("attn.relative_position_bias_table"),
                &[m.rel_bias_rows(), m.heads],
                Init::Zeros,
                false,
            );
            layout.push(&n("attn.proj.weight"), &[d, d], xavier(d, d), true);
            layout.push(&n("attn.proj.bias"), &[d], Init::Zeros, false);
            layout.push(&n("norm2.weight"), &[d], Init::Ones, false);
            layout.push(&n("norm2.bias"), &[d], Init::Zeros, false);
            layout.push(&n("mlp.fc1.weight"), &[hidden, d], xavier(hidden, d), true);
            layout.push(&n("mlp.fc1.bias"), &[hidden], Init::Zeros, false);
            layout.push(&n("mlp.fc2.weight"), &[d, hidden], xavier(d, hidden), true);
            layout.push(&n("mlp.fc2.bias"), &[d], Init::Zeros, false);
        }
        layout.push("norm.weight", &[d], Init::Ones, false);
        layout.push("norm.bias", &[d], Init::Zeros, false);
        layout.push("head.weight", &[pd, d], xavier(pd, d), true);
        layout.push("head.bias", &[pd], Init::Zeros, false);
        layout
    }

    fn push(&mut self, name: &str, shape: &[usize], init: Init, decay: bool) {
        let entry = ParamEntry {
            name: name.to_string(),
            shape: shape.to_vec(),
            offset: self.total,
            init,
            decay,
        };
        self.total += entry.len();
        self.by_name.insert(entry.name.clone(), self.entries.len());
        self.entries.push(entry);
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

    /// The range of a parameter that the table is known to hold.
    fn range(&self, name: &str) -> Range<usize> {
        match self.get(name) {
            Some(e) => e.range(),
            None => unreachable!("the name table has no parameter {name}"),
        }
    }

    /// The ranges the backends compute with, looked up from the table.
    pub fn ranges(&self, m: &ModelConfig) -> ModelRanges {
        let blocks = (0..m.depth)
            .map(|i| {
                let r = |s: &str| self.range(&format!("blocks.{i}.{s}"));
                BlockRanges {
                    norm1_w: r("norm1.weight"),
                    norm1_b: r("norm1.bias"),
                    qkv_w: r("attn.qkv.weight"),
                    qkv_b: r("attn.qkv.bias"),
                    rel_bias: r("attn.relative_position_bias_table"),
                    proj_w: r("attn.proj.weight"),
                    proj_b: r("attn.proj.bias"),
                    norm2_w: r("norm2.weight"),
                    norm2_b: r("norm2.bias"),
                    fc1_w: r("mlp.fc1.weight"),
                    fc1_b: r("mlp.fc1.bias"),
                    fc2_w: r("mlp.fc2.weight"),
                    fc2_b: r("mlp.fc2.bias"),
                }
            })
            .collect();
        ModelRanges {
            patch_w: self.range("patch_embed.proj.weight"),
            patch_b: self.range("patch_embed.proj.bias"),
            cls_token: self.range("cls_token"),
            mask_token: self.range("mask_token"),
            blocks,
            norm_w: self.range("norm.weight"),
            norm_b: self.range("norm.bias"),
            head_w: self.range("head.weight"),
            head_b: self.range("head.bias"),
        }
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
        let r = layout.ranges(&m);
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
