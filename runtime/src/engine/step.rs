//! [`Step`]: one optimizer step, in the parts a trainer calls between its events. A step is:
//! zero the gradients; forward and backward each micro-batch of the accumulation window (the
//! loss divided by the window's label tokens, so the gradients add up to the window's mean);
//! combine the gradients across processes; take the global gradient norm and the clipping
//! coefficient; and, if the caller applies it, one fused AdamW update with the clipping folded in.

use super::collective::{Collective, SingleProcess};
use super::optimizer::{clip_coef, trainable_grad_norm, AdamW, AdamWConfig};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::{Activations, Grads, LossOptions, LossOutput, Model};
use crate::protocol::{label_tokens, Batch, CustomLoss};

/// How a micro-batch's loss is computed: the built-in cross-entropy (with its options), or a
/// loss from outside the engine (a plugin's) with the divisor `num_items_in_batch`.
pub enum MicroLoss<'a, 'b> {
    BuiltIn(LossOptions),
    Custom(&'a mut CustomLoss<'b>, Option<usize>),
}

/// What one whole step ([`Step::run`]) did.
#[derive(Clone, Copy, Debug)]
pub struct StepReport {
    /// The window's mean loss per label token.
    pub loss: f64,
    /// The global gradient norm before clipping, and the clipping coefficient applied.
    pub grad_norm: f32,
    pub clip_coef: f32,
    /// Whether the update was applied (not when the loss or the norm is not finite).
    pub applied: bool,
}

/// The model, its gradients and activations, the optimizer and the collective: everything one
/// optimizer step touches.
pub struct Step<B: Backend> {
    pub model: Model<B>,
    pub grads: Grads<B>,
    pub acts: Activations<B>,
    pub opt: AdamW<B>,
    pub collective: Box<dyn Collective<B>>,
}

impl<B: Backend> Step<B> {
    /// A step for `model` in one process, with zeroed gradients and AdamW moments; the
    /// activation workspace is sized by the first micro-batch.
    pub fn new(model: Model<B>, opt: AdamWConfig) -> Result<Self> {
        Self::with_workspace(model, opt, 1, 2)
    }

    /// [`Step::new`] with the activation workspace made for `batch` x `seq` up front (it is
    /// allocated first, then the gradients and the moments).
    pub fn with_workspace(model: Model<B>, opt: AdamWConfig, batch: usize, seq: usize) -> Result<Self> {
        let acts = Activations::new(&model, batch, seq)?;
        let grads = Grads::zeros(&model)?;
        let opt = AdamW::new(&model, opt)?;
        Ok(Step { model, grads, acts, opt, collective: Box::new(SingleProcess) })
    }

    /// Zeroes the gradients: the start of a step.
    pub fn zero_grad(&mut self) {
        self.grads.zero(&self.model.backend);
    }

    /// Forward and backward for one micro-batch, accumulating into the gradients.
    pub fn micro_batch(&mut self, b: &Batch, loss: MicroLoss) -> Result<LossOutput> {
        match loss {
            MicroLoss::BuiltIn(opts) => self.model.forward_backward(&mut self.acts, b, &mut self.grads, opts),
            MicroLoss::Custom(custom, items) => self.model.forward_backward_custom(&mut self.acts, b, &mut self.grads, custom, items),
        }
    }

    /// Combines the gradients across processes, then returns the global gradient norm and the
    /// clipping coefficient for `max_grad_norm` (1.0 when it is not positive: no clipping).
    pub fn grad_norm(&mut self, max_grad_norm: f32) -> Result<(f32, f32)> {
        self.collective.all_reduce_grads(&self.model.backend, &mut self.grads)?;
        let norm = trainable_grad_norm(&self.model.backend, &self.grads, &self.model.trainable)?;
        Ok((norm, if max_grad_norm > 0.0 { clip_coef(norm, max_grad_norm) } else { 1.0 }))
    }

    /// The AdamW update at learning rate `lr`, with the gradients multiplied by `clip_coef`.
    pub fn apply(&mut self, lr: f32, clip_coef: f32) -> Result<()> {
        self.opt.step(&mut self.model, &self.grads, lr, clip_coef);
        Ok(())
    }

    /// A whole step with the built-in loss over the micro-batches of one accumulation window:
    /// the loss is normalised by the window's label tokens (`num_items_in_batch`), and the update
    /// is skipped when the loss or the gradient norm is not finite.
    pub fn run(&mut self, window: &[Batch], loss: LossOptions, lr: f32, max_grad_norm: f32) -> Result<StepReport> {
        let items: usize = window.iter().map(label_tokens).sum();
        if items == 0 {
            return Err(Error::Invalid("the batches of this accumulation window have no label tokens".into()));
        }
        self.zero_grad();
        let mut sum = 0.0;
        for b in window {
            sum += self.micro_batch(b, MicroLoss::BuiltIn(LossOptions { num_items_in_batch: Some(items), ..loss }))?.sum;
        }
        let loss = sum / items as f64;
        let (grad_norm, clip_coef) = self.grad_norm(max_grad_norm)?;
        let applied = loss.is_finite() && grad_norm.is_finite();
        if applied {
            self.apply(lr, clip_coef)?;
        }
        Ok(StepReport { loss, grad_norm, clip_coef, applied })
    }
}
