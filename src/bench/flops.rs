//! Analytic FLOP count of one training step, for achieved TFLOP/s and MFU.
//!
//! Counts the matrix products only (2 FLOPs per multiply-add): patch embedding, qkv,
//! QKᵀ, PV, proj, fc1, fc2 and the head; for MAE also `decoder_embed`, the decoder's
//! blocks and `decoder_pred` (on every decoder token, as computed). Elementwise work (LayerNorm, GELU, softmax,
//! the loss, AdamW) is memory-bound and left out, as MFU conventions do. The backward of
//! a product costs two products of the same size (input and weight gradients), so a step
//! is three times the forward; the patch embedding needs no input gradient, so its
//! backward counts once.

use crate::config::{Method, ModelConfig, MLP_RATIO};

/// Forward FLOPs of one pre-norm block over a sequence of `t` tokens of width `d`.
fn block_forward_flops(t: f64, d: f64) -> f64 {
    let hidden = d * MLP_RATIO as f64;
    2.0 * t * d * 3.0 * d // qkv
        + 2.0 * 2.0 * t * t * d // QKᵀ and PV over all heads
        + 2.0 * t * d * d // proj
        + 2.0 * 2.0 * t * d * hidden // fc1 and fc2
}

/// Forward FLOPs of the matrix products of one sequence (a LoMaR window, an MAE image),
/// excluding the patch embedding.
fn sequence_forward_flops(m: &ModelConfig) -> f64 {
    let (d, pd) = (m.width as f64, m.patch_dim() as f64);
    match (m.method, m.decoder) {
        (Method::Mae, Some(dec)) => {
            let (encoded, tokens) = (1.0 + m.visible_per_window() as f64, m.seq_len() as f64);
            let dd = dec.width as f64;
            m.depth as f64 * block_forward_flops(encoded, d)
                + 2.0 * encoded * d * dd // decoder_embed
                + dec.depth as f64 * block_forward_flops(tokens, dd)
                + 2.0 * tokens * dd * pd // decoder_pred
        }
        _ => {
            let head = 2.0 * m.masked_per_window() as f64 * d * pd;
            m.depth as f64 * block_forward_flops(m.seq_len() as f64, d) + head
        }
    }
}

/// FLOPs of the patch embedding of one sequence's visible patches.
fn sequence_embed_flops(m: &ModelConfig) -> f64 {
    2.0 * m.visible_per_window() as f64 * m.patch_dim() as f64 * m.width as f64
}

/// FLOPs of one training step (forward and backward) over `images` images.
pub fn training_flops(m: &ModelConfig, images: usize) -> f64 {
    let sequences = (images * m.windows_per_image) as f64;
    sequences * (3.0 * sequence_forward_flops(m) + 2.0 * sequence_embed_flops(m))
}

/// Dense bf16 tensor-core peak in FLOP/s of chips we know, matched on the device name.
pub fn known_bf16_peak(device_name: &str) -> Option<f64> {
    let name = device_name.to_ascii_uppercase();
    let table: [(&str, f64); 6] = [
        ("H200", 989.4e12),
        ("H100 PCIE", 756.0e12),
        ("H100", 989.4e12),
        ("A100", 312.0e12),
        ("L40S", 362.0e12),
        ("A10G", 70.0e12),
    ];
    table
        .iter()
        .find(|(key, _)| name.contains(key))
        .map(|&(_, peak)| peak)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::preset;

    #[test]
    fn vit_base_step_flops_match_a_hand_count() {
        let m = preset("vit_base").unwrap();
        // T = 50, D = 768: per block 2*50*768*2304 + 4*50*50*768 + 2*50*768*768
        // + 4*50*768*3072 = 177.0 + 7.68 + 59.0 + 471.9 MFLOP = 715.6 MFLOP.
        let block = 2.0 * 50.0 * 768.0 * 2304.0
            + 4.0 * 2500.0 * 768.0
            + 2.0 * 50.0 * 768.0 * 768.0
            + 4.0 * 50.0 * 768.0 * 3072.0;
        let head = 2.0 * 39.0 * 768.0 * 768.0;
        let embed = 2.0 * 10.0 * 768.0 * 768.0;
        let want = 4.0 * (3.0 * (12.0 * block + head) + 2.0 * embed);
        assert_eq!(training_flops(&m, 1), want);
        // About 104 GFLOP per image: 4 windows of 50 tokens are about as many tokens as
        // one 197-token ViT-B/16 image (35 GFLOP forward), times three for the step.
        assert!((100e9..108e9).contains(&want), "{want}");
    }

    #[test]
    fn mae_base_step_flops_match_a_hand_count() {
        let m = preset("mae_base").unwrap();
        // Encoder: 50 tokens of 768, the LoMaR block's count above. Decoder: 197 tokens
        // of 512: 2*197*512*1536 + 4*197²*512 + 2*197*512² + 4*197*512*2048
        // = 309.9 + 79.5 + 103.3 + 826.3 MFLOP.
        let enc = 2.0 * 50.0 * 768.0 * 2304.0
            + 4.0 * 2500.0 * 768.0
            + 2.0 * 50.0 * 768.0 * 768.0
            + 4.0 * 50.0 * 768.0 * 3072.0;
        let dec = 2.0 * 197.0 * 512.0 * 1536.0
            + 4.0 * 197.0 * 197.0 * 512.0
            + 2.0 * 197.0 * 512.0 * 512.0
            + 4.0 * 197.0 * 512.0 * 2048.0;
        let decoder_embed = 2.0 * 50.0 * 768.0 * 512.0;
        let decoder_pred = 2.0 * 197.0 * 512.0 * 768.0;
        let embed = 2.0 * 49.0 * 768.0 * 768.0;
        let want = 3.0 * (12.0 * enc + decoder_embed + 8.0 * dec + decoder_pred) + 2.0 * embed;
        assert_eq!(training_flops(&m, 1), want);
        // About 58 GFLOP per image, little more than half LoMaR's 104 at 224.
        assert!((56e9..60e9).contains(&want), "{want}");
        // At 448 the decoder's 785 tokens cost LoMaR's four windows about 2.4 times over.
        let big = |m: ModelConfig| training_flops(&ModelConfig { image: 448, ..m }, 1);
        let mae448 = big(crate::config::mae_recipe(ModelConfig {
            image: 448,
            ..preset("vit_base").unwrap()
        }));
        let ratio = mae448 / big(preset("vit_base").unwrap());
        assert!((2.2..2.6).contains(&ratio), "{ratio}");
    }

    #[test]
    fn known_chips_are_matched_by_name() {
        assert_eq!(known_bf16_peak("NVIDIA H100 80GB HBM3"), Some(989.4e12));
        assert_eq!(known_bf16_peak("NVIDIA H100 PCIe"), Some(756.0e12));
        assert_eq!(known_bf16_peak("NVIDIA H200"), Some(989.4e12));
        assert_eq!(known_bf16_peak("cpu"), None);
    }
}
