//! lomar: LoMaR self-supervised ViT pretraining with a CPU reference backend and a
//! hand-written CUDA backend. DESIGN.md is the contract for what it computes; the modules
//! follow the data flow: sample → gather/embed → blocks → head → loss → backward → optimiser.

pub mod backend;
pub mod batch;
pub mod config;
pub mod cpu;
pub mod cuda;
pub mod optim;
pub mod params;
