//! CPU reference ops at the shapes of one vit_tiny block at batch 32 (S = 128 windows of
//! T = 50 tokens), MAE's decoder attention at 224 and batch 8 (T = 197, 16 heads of 32),
//! and a whole training step of the `tiny` preset. Criterion's "elem/s"
//! is FLOP/s for the products and attention, values per second for GELU and LayerNorm.
//! Run: `cargo bench --bench cpu_ops`

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use lomar::backend::{AdamWStep, Backend};
use lomar::config::preset;
use lomar::cpu::ops::attention::{self, RelativeIndex};
use lomar::cpu::ops::global_attention;
use lomar::cpu::ops::{gelu, layernorm, linear};
use lomar::cpu::CpuBackend;
use lomar::data::batch::{Batch, Pixels};
use lomar::params::ParamLayout;

const SEQS: usize = 128;
const TOKENS: usize = 50;
const WIDTH: usize = 192;
const HEADS: usize = 3;
const ROWS: usize = SEQS * TOKENS;

/// Deterministic values in `[-0.5, 0.5]`, without a random generator.
fn filled(len: usize) -> Vec<f32> {
    spread(len, 0.5)
}

fn spread(len: usize, scale: f32) -> Vec<f32> {
    (0..len).map(|i| (i as f32 * 0.37).sin() * scale).collect()
}

fn block_ops(c: &mut Criterion) {
    let mut g = c.benchmark_group("vit_tiny_block_b32");
    g.sample_size(10).measurement_time(Duration::from_secs(3));

    let (x, w, b) = (
        filled(ROWS * WIDTH),
        filled(4 * WIDTH * WIDTH),
        filled(4 * WIDTH),
    );
    let mut y = filled(ROWS * 4 * WIDTH);
    // [6400, 192] · [192, 768]: 2 FLOPs per multiply-add; the backward does two products.
    let fc1_flops = 2 * ROWS * WIDTH * 4 * WIDTH;
    g.throughput(Throughput::Elements(fc1_flops as u64));
    g.bench_function("fc1_forward", |bench| {
        bench.iter(|| linear::linear_forward(&mut y, &x, &w, &b))
    });
    let (mut dx, mut dw, mut db) = (filled(ROWS * WIDTH), filled(w.len()), filled(b.len()));
    g.throughput(Throughput::Elements(2 * fc1_flops as u64));
    g.bench_function("fc1_backward", |bench| {
        bench.iter(|| linear::linear_backward(Some(&mut dx), &mut dw, &mut db, &y, &x, &w))
    });

    // Pre-activations of the size GELU sees in a trained network.
    let pre = spread(y.len(), 3.0);
    g.throughput(Throughput::Elements(pre.len() as u64));
    let (mut act, mut cdf) = (filled(y.len()), filled(y.len()));
    g.bench_function("gelu_forward", |bench| {
        bench.iter(|| gelu::gelu_forward(&mut act, &mut cdf, &pre))
    });
    let dy = filled(y.len());
    g.bench_function("gelu_backward_with_copy_of_dy", |bench| {
        bench.iter(|| {
            act.copy_from_slice(&dy);
            gelu::gelu_backward(&mut act, &pre, &cdf)
        })
    });

    let (gamma, beta) = (filled(WIDTH), filled(WIDTH));
    let mut normed = filled(x.len());
    g.throughput(Throughput::Elements(x.len() as u64));
    let stats = layernorm::layernorm_forward(&mut normed, &x, &gamma, &beta);
    g.bench_function("layer_norm_forward", |bench| {
        bench.iter(|| layernorm::layernorm_forward(&mut normed, &x, &gamma, &beta))
    });
    let (mut dgamma, mut dbeta) = (filled(WIDTH), filled(WIDTH));
    g.bench_function("layer_norm_backward", |bench| {
        bench.iter(|| {
            layernorm::layernorm_backward(
                &mut dx,
                &mut dgamma,
                &mut dbeta,
                &normed,
                &x,
                &stats,
                &gamma,
            )
        })
    });

    let rel = RelativeIndex::new(7);
    let (qkv, table) = (filled(ROWS * 3 * WIDTH), filled(rel.table_rows * HEADS));
    let (mut out, mut probs) = (filled(ROWS * WIDTH), filled(SEQS * HEADS * TOKENS * TOKENS));
    // q·kᵀ and p·v per sequence: 2 · 2·T²·D; the backward does four products.
    let attention_flops = 4 * SEQS * TOKENS * TOKENS * WIDTH;
    g.throughput(Throughput::Elements(attention_flops as u64));
    g.bench_function("attention_forward", |bench| {
        bench.iter(|| attention::attention_forward(&mut out, &mut probs, &qkv, &table, &rel, HEADS))
    });
    let (mut dqkv, mut dtable) = (filled(qkv.len()), filled(table.len()));
    g.throughput(Throughput::Elements(2 * attention_flops as u64));
    g.bench_function("attention_backward", |bench| {
        bench.iter(|| {
            attention::attention_backward(&mut dqkv, &mut dtable, &out, &qkv, &probs, &rel, HEADS)
        })
    });
    g.finish();
}

fn mae_decoder_attention(c: &mut Criterion) {
    let (seqs, tokens, width, heads) = (8, 197, 512, 16);
    let mut g = c.benchmark_group("mae_decoder_attention_224_b8");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    let qkv = filled(seqs * tokens * 3 * width);
    let (mut out, mut lse) = (filled(seqs * tokens * width), filled(seqs * heads * tokens));
    // As for the windowed attention: 4·T²·D per sequence forward, twice that backward
    // (the backward's recomputation of q·kᵀ not counted).
    let flops = 4 * seqs * tokens * tokens * width;
    g.throughput(Throughput::Elements(flops as u64));
    g.bench_function("global_attention_forward", |bench| {
        bench.iter(|| {
            global_attention::global_attention_forward(&mut out, &mut lse, &qkv, tokens, heads)
        })
    });
    let mut dqkv = filled(qkv.len());
    g.throughput(Throughput::Elements(2 * flops as u64));
    g.bench_function("global_attention_backward", |bench| {
        bench.iter(|| {
            global_attention::global_attention_backward(&mut dqkv, &out, &qkv, &lse, tokens, heads)
        })
    });
    g.finish();
}

fn tiny_step(c: &mut Criterion) {
    let m = preset("tiny").unwrap();
    let mut backend = CpuBackend::new(&m, ParamLayout::new(&m).init(0)).unwrap();
    let seqs = 32 * m.windows_per_image;
    // Windows along the diagonal, the first M positions of each masked.
    let batch = Batch {
        images_len: 32,
        images: Pixels::Normalised(filled(32 * 3 * m.image * m.image)),
        window_origin: (0..2 * seqs)
            .map(|i| (i / 2 % (m.grid() - m.window + 1)) as u32)
            .collect(),
        mask_index: (0..seqs)
            .flat_map(|_| 0..m.masked_per_window() as u32)
            .collect(),
    };
    let step = AdamWStep {
        t: 1,
        lr: 1e-4,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.05,
        grad_scale: 1.0,
    };
    let mut g = c.benchmark_group("step");
    g.sample_size(10);
    g.bench_function("tiny_b32", |bench| {
        bench.iter(|| {
            backend.zero_grads().unwrap();
            backend.forward_backward(&batch, 1.0).unwrap();
            backend.adamw_step(&step).unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, block_ops, mae_decoder_attention, tiny_step);
criterion_main!(benches);
