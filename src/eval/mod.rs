//! What is done with a pretrained encoder: export to timm, features and probes, and the
//! figures (reconstructions, loss curves).

pub mod draw;
pub mod export;
pub mod features;
pub mod plot;
pub mod probe;
pub mod rel_bias;
pub mod visualize;
