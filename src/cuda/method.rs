//! The buffers of either method's pass (LoMaR's `model.rs`, MAE's `mae.rs`) behind one
//! call per micro-batch, so the backend's engine is written once for both.

use anyhow::Result;
use cudarc::driver::CudaSlice;

use super::activations::{Activations, Inputs};
use super::block::Net;
use super::device::{DevPtr, Gpu};
use super::mae::MaePass;
use super::mae_activations::MaeActivations;
use super::model::Pass;
use super::storage::Storage;
use crate::config::{Method, ModelConfig};
use crate::data::batch::Batch;
use crate::params::ModelRanges;

/// The backward's report that every gradient at offset `from` and above is final
/// (`dist::buckets`): a data-parallel step queues their all-reduce there.
pub(super) type Ready<'a> = dyn FnMut(usize) -> Result<()> + 'a;

pub(super) enum MethodActs<T> {
    Lomar(Box<Activations<T>>),
    Mae(Box<MaeActivations<T>>),
}

impl<T: Storage> MethodActs<T> {
    /// The buffers of `m`'s method for batch `images_len`.
    pub fn new(gpu: &Gpu, m: &ModelConfig, images_len: usize) -> Result<Self> {
        Ok(match m.method {
            Method::Lomar => MethodActs::Lomar(Box::new(Activations::new(gpu, m, images_len)?)),
            Method::Mae => MethodActs::Mae(Box::new(MaeActivations::new(gpu, m, images_len)?)),
        })
    }

    pub fn images_len(&self) -> usize {
        match self {
            MethodActs::Lomar(a) => a.images_len,
            MethodActs::Mae(a) => a.images_len,
        }
    }

    /// Copies a validated batch into the input buffers.
    pub fn upload(&mut self, gpu: &Gpu, m: &ModelConfig, batch: &Batch) -> Result<()> {
        match self {
            MethodActs::Lomar(a) => a.upload(gpu, m, batch),
            MethodActs::Mae(a) => a.upload(gpu, m, batch),
        }
    }

    /// The uploaded batch: its pixels' upload buffer, read by the pass's gather.
    pub fn input(&self) -> &Inputs<T> {
        match self {
            MethodActs::Lomar(a) => &a.input,
            MethodActs::Mae(a) => &a.input,
        }
    }

    /// `[1]` the per-call pass's mean loss (see `Activations::loss`).
    pub fn loss(&self) -> &CudaSlice<f32> {
        match self {
            MethodActs::Lomar(a) => &a.loss,
            MethodActs::Mae(a) => &a.loss,
        }
    }

    /// Queues the method's forward and backward of the uploaded batch, its mean loss added
    /// to `loss`, calling `ready` at each of `dist::buckets::ready_points` once the work
    /// that finishes those gradients is queued.
    pub fn forward_backward(
        &self,
        net: Net<'_, T>,
        model: &ModelConfig,
        ranges: &ModelRanges,
        grad_scale: f32,
        loss: DevPtr<'_, f32>,
        ready: &mut Ready<'_>,
    ) -> Result<()> {
        match self {
            MethodActs::Lomar(acts) => Pass {
                net,
                model,
                ranges,
                loss,
                acts,
            }
            .forward_backward(grad_scale, ready),
            MethodActs::Mae(acts) => MaePass {
                net,
                model,
                ranges,
                loss,
                acts,
            }
            .forward_backward(grad_scale, ready),
        }
    }
}
