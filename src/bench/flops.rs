//! Analytic FLOP count of one training step, for achieved TFLOP/s and MFU.
//!
//! Counts the matrix products only (2 FLOPs per multiply-add): patch embedding, qkv,
//! QKᵀ, PV, proj, fc1, fc2 and the head. Elementwise work (LayerNorm, GELU, softmax,
//! the loss, AdamW) is memory-bound and left out, as MFU conventions do. The backward of
//! a product costs two products of the same size (input and weight gradients), so a step
//! is three times the forward; the patch embedding needs no input gradient, so its
//! backward counts once.

use crate::config::ModelConfig;

/// Forward FLOPs of the matrix products of one window sequence, excluding the patch embedding.
fn sequence_forward_flops(m: &ModelConfig) -> f64 {
    let (t, d, hidden) = (m.seq_len() as f64, m.width as f64, m.hidden() as f64);
    let per_block = 2.0 * t * d * 3.0 * d // qkv
        + 2.0 * 2.0 * t * t * d // QKᵀ and PV over all heads
        + 2.0 * t * d * d // proj
        + 2.0 * 2.0 * t * d * hidden; // fc1 and fc2
    let head = 2.0 * m.masked_per_window() as f64 * d * m.patch_dim() as f64;
    m.depth as f64 * per_block + head
}

/// FLOPs of the patch embedding of one window sequence's visible patches.
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
    fn known_chips_are_matched_by_name() {
        assert_eq!(known_bf16_peak("NVIDIA H100 80GB HBM3"), Some(989.4e12));
        assert_eq!(known_bf16_peak("NVIDIA H100 PCIe"), Some(756.0e12));
        assert_eq!(known_bf16_peak("NVIDIA H200"), Some(989.4e12));
        assert_eq!(known_bf16_peak("cpu"), None);
    }
}
