//! lomar: LoMaR self-supervised ViT pretraining with a CPU reference backend and a
//! hand-written CUDA backend. docs/DESIGN.md says what it computes. The modules follow
//! the data flow of a training step, then what is done with its result:
//!
//! - `config`, `params`: what a run trains (presets, validated settings, the parameter layout);
//! - `data`: images (embedded or a folder), the window/mask sampler, batches;
//! - `backend` with `cpu` and `cuda`: gather/embed → blocks → head → loss → backward;
//! - `train`: the loop, the optimiser's schedule, metrics; `bench`: timing it;
//! - `dist`: data parallel across processes (launchers, rendezvous, gradient averaging);
//! - `io`: the file formats (tensors, batches, checkpoints, pretrained weights);
//! - `eval`: export to timm, features, probes, figures;
//! - `cli`: the `lomar` commands.

pub mod config;
pub mod params;

pub mod data;

pub mod backend;
pub mod cpu;
pub mod cuda;
pub mod device;

pub mod bench;
pub mod dist;
pub mod train;

pub mod io;

pub mod eval;

pub mod cli;
