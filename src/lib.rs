//! lomar: LoMaR self-supervised ViT pretraining with a CPU reference backend and a
//! hand-written CUDA backend. DESIGN.md is the contract for what it computes; the modules
//! follow the data flow: sample → gather/embed → blocks → head → loss → backward → optimiser.

pub mod backend;
pub mod batch;
pub mod batch_file;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod cpu;
pub mod cuda;
pub mod data;
pub mod device;
pub mod draw;
pub mod export;
pub mod features;
pub mod finite;
pub mod flops;
pub mod metrics;
pub mod optim;
pub mod params;
pub mod plot;
pub mod pretrained;
pub mod probe;
pub mod rel_bias;
pub mod sampler;
pub mod tensor_file;
pub mod train;
pub mod visualize;
