//! What LoMaR's step (`model.rs`) and MAE's (`mae/`) share: the checks on the caller's
//! buffers before any work, and the order forward → loss at the predictions → backward.

use anyhow::{bail, Result};

use super::model::sized;
use super::ops::loss;
use super::real::Real;
use crate::config::ModelConfig;
use crate::data::batch::Batch;

/// The backward's report that every gradient at offset `from` and above is final, with the
/// gradient buffer (`dist::buckets`: data-parallel steps average those gradients then).
pub type Ready<'a, T> = dyn FnMut(usize, &mut [T]) + 'a;

/// A network's workspace: a validated model, its tables and every buffer of a pass.
pub trait Step<T: Real>: Sized {
    /// The workspace of model `m`, which it validates; buffers grow on first use.
    fn new(m: &ModelConfig) -> Result<Self>;
    fn model(&self) -> &ModelConfig;
    /// How many parameters the model has.
    fn params_len(&self) -> usize;
    /// The forward of a checked batch and parameters, up to the predictions.
    fn forward_unchecked(&mut self, p: &[T], batch: &Batch);
    /// Adds the gradients of everything the forward kept, from the predictions'
    /// gradient on, to `g`, calling `ready` at each of `dist::buckets::ready_points`.
    fn backward(&mut self, p: &[T], batch: &Batch, g: &mut [T], ready: &mut Ready<'_, T>);
    /// The predictions, their gradient's buffer, and the targets they are scored against.
    fn predictions(&mut self) -> (&[T], &mut Vec<T>, &[T]);

    /// The forward, after refusing a batch or parameters that do not fit the model.
    fn forward(&mut self, p: &[T], batch: &Batch) -> Result<()> {
        batch.validate(self.model())?;
        if p.len() != self.params_len() {
            bail!(
                "parameter buffer holds {} values, the model needs {}",
                p.len(),
                self.params_len()
            );
        }
        self.forward_unchecked(p, batch);
        Ok(())
    }

    /// The mean reconstruction loss of a batch; adds `grad_scale · dloss/dparams` to
    /// `grads`. Refuses a batch or buffers that do not fit the model, before any work.
    fn loss_and_grad(
        &mut self,
        params: &[T],
        batch: &Batch,
        grads: &mut [T],
        grad_scale: T,
    ) -> Result<T> {
        self.loss_and_grad_reporting(params, batch, grads, grad_scale, &mut |_, _| {})
    }

    /// [`Step::loss_and_grad`], calling `ready` as the backward finishes gradients.
    fn loss_and_grad_reporting(
        &mut self,
        params: &[T],
        batch: &Batch,
        grads: &mut [T],
        grad_scale: T,
        ready: &mut Ready<'_, T>,
    ) -> Result<T> {
        if grads.len() != params.len() {
            bail!(
                "gradient buffer holds {} values, the parameters {}",
                grads.len(),
                params.len()
            );
        }
        self.forward(params, batch)?;
        let (pred, dpred, targets) = self.predictions();
        let dpred = sized(dpred, pred.len());
        let loss = loss::masked_mse(dpred, pred, targets, grad_scale);
        self.backward(params, batch, grads, ready);
        Ok(loss)
    }
}

/// The mean reconstruction loss of a batch under a fresh workspace `W`.
pub fn loss<T: Real, W: Step<T>>(m: &ModelConfig, params: &[T], batch: &Batch) -> Result<T> {
    let mut ws = W::new(m)?;
    ws.forward(params, batch)?;
    let (pred, _, targets) = ws.predictions();
    Ok(loss::masked_mse_loss(pred, targets))
}

/// The predictions for a batch under a fresh workspace `W`.
pub fn predict<T: Real, W: Step<T>>(
    m: &ModelConfig,
    params: &[T],
    batch: &Batch,
) -> Result<Vec<T>> {
    let mut ws = W::new(m)?;
    ws.forward(params, batch)?;
    Ok(ws.predictions().0.to_vec())
}

/// The mean reconstruction loss of a batch; adds `grad_scale · dloss/dparams` to `grads`.
pub fn loss_and_grad<T: Real, W: Step<T>>(
    m: &ModelConfig,
    params: &[T],
    batch: &Batch,
    grads: &mut [T],
    grad_scale: T,
) -> Result<T> {
    W::new(m)?.loss_and_grad(params, batch, grads, grad_scale)
}
