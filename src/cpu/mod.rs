//! The CPU reference backend: every op's forward and backward in plain Rust, generic over
//! f32 and f64, matrix products on the `gemm` crate, the rest spread over cores by rayon.
//! It trains on any machine and is the oracle the CUDA kernels are tested against.

pub mod encoder;
mod erf;
mod exp;
pub mod gemm;
pub mod line_alloc;
pub mod mae;
pub mod model;
pub mod ops;
pub mod real;
pub(crate) mod simd;
pub mod step;

use anyhow::Result;

use crate::backend::{AdamWStep, Backend, Moments};
use crate::config::{Method, ModelConfig};
use crate::data::batch::Batch;
use crate::dist::buckets::HOST_BUCKET;
use crate::dist::{BucketPlan, Collective, HostBuckets};
use crate::params::ParamLayout;
use crate::train::optim::adamw_update;
use step::Step;

/// Trains in f32 on the CPU, with fp32 parameters, gradients and AdamW moments.
pub struct CpuBackend {
    layout: ParamLayout,
    decay_mask: Vec<f32>,
    params: Vec<f32>,
    grads: Vec<f32>,
    moments: Moments,
    /// The gradient buckets a data-parallel step averages as the backward finishes them.
    buckets: BucketPlan,
    /// Tables and activation buffers, kept across micro-batches.
    network: Network,
}

/// The network a backend trains, with its workspace (boxed: one is made per backend).
enum Network {
    Lomar(Box<model::Workspace<f32>>),
    Mae(Box<mae::Workspace<f32>>),
}

impl CpuBackend {
    /// A backend holding `params`, which must match the model's parameter layout.
    pub fn new(model: &ModelConfig, params: Vec<f32>) -> Result<CpuBackend> {
        model.validate()?;
        let layout = ParamLayout::new(model);
        let n = layout.total();
        layout.check_len("parameters", params.len())?;
        Ok(CpuBackend {
            decay_mask: layout.decay_mask(),
            buckets: BucketPlan::new(&layout, HOST_BUCKET),
            layout,
            params,
            grads: vec![0.0; n],
            moments: Moments {
                m: vec![0.0; n],
                v: vec![0.0; n],
            },
            network: match model.method {
                Method::Lomar => Network::Lomar(Box::new(model::Workspace::new(model)?)),
                Method::Mae => Network::Mae(Box::new(mae::Workspace::new(model)?)),
            },
        })
    }
}

impl Backend for CpuBackend {
    fn device_name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn computes_on_host(&self) -> bool {
        true
    }

    fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    /// The model validates the batch before any work, so a bad batch is an error.
    fn forward_backward(&mut self, batch: &Batch, grad_scale: f32) -> Result<f32> {
        let (p, g) = (&self.params, &mut self.grads);
        match &mut self.network {
            Network::Lomar(ws) => ws.loss_and_grad(p, batch, g, grad_scale),
            Network::Mae(ws) => ws.loss_and_grad(p, batch, g, grad_scale),
        }
    }

    /// Each bucket is averaged from inside the backward, as soon as it is final.
    fn forward_backward_averaged(
        &mut self,
        batch: &Batch,
        grad_scale: f32,
        comm: &mut dyn Collective,
    ) -> Result<f32> {
        let (p, g) = (&self.params, &mut self.grads);
        let mut buckets = HostBuckets::new(&self.buckets, comm);
        let mut ready = |from: usize, g: &mut [f32]| buckets.ready(from, g);
        let loss = match &mut self.network {
            Network::Lomar(ws) => ws.loss_and_grad_reporting(p, batch, g, grad_scale, &mut ready),
            Network::Mae(ws) => ws.loss_and_grad_reporting(p, batch, g, grad_scale, &mut ready),
        }?;
        buckets.finish()?;
        Ok(loss)
    }

    fn zero_grads(&mut self) -> Result<()> {
        self.grads.fill(0.0);
        Ok(())
    }

    fn average_grads(&mut self, comm: &mut dyn Collective) -> Result<()> {
        comm.all_reduce_mean(&mut self.grads)
    }

    fn grad_norm(&mut self) -> Result<f32> {
        Ok(simd::sum_of_squares(&self.grads).sqrt() as f32)
    }

    fn adamw_step(&mut self, step: &AdamWStep) -> Result<()> {
        let Moments { m, v } = &mut self.moments;
        adamw_update(&mut self.params, &self.grads, m, v, &self.decay_mask, step);
        Ok(())
    }

    fn params(&mut self) -> Result<Vec<f32>> {
        Ok(self.params.clone())
    }

    fn set_params(&mut self, flat: &[f32]) -> Result<()> {
        self.layout.check_len("parameters", flat.len())?;
        self.params.copy_from_slice(flat);
        Ok(())
    }

    fn grads(&mut self) -> Result<Vec<f32>> {
        Ok(self.grads.clone())
    }

    fn moments(&mut self) -> Result<Moments> {
        Ok(self.moments.clone())
    }

    fn set_moments(&mut self, moments: &Moments) -> Result<()> {
        self.layout.check_len("first moments", moments.m.len())?;
        self.layout.check_len("second moments", moments.v.len())?;
        self.moments = moments.clone();
        Ok(())
    }
}
