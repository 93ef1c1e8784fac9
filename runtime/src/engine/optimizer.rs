//! AdamW over all parameter tensors, with HF's rule that biases and normalisation weights get no
//! weight decay, and global-norm gradient clipping as `torch.nn.utils.clip_grad_norm_` does it.

use crate::backend::{AdamWStep, Backend};
use crate::error::Result;
use crate::model::{Grads, Model};

/// `torch.optim.AdamW` hyper-parameters, with transformers' `TrainingArguments` defaults.
#[derive(Clone, Copy, Debug)]
pub struct AdamWConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { lr: 5e-5, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// Optimizer state: first and second moments per parameter tensor, and the step count.
pub struct AdamW<B: Backend> {
    pub config: AdamWConfig,
    pub exp_avg: Vec<B::Buf>,
    pub exp_avg_sq: Vec<B::Buf>,
    pub step: u64,
}

impl<B: Backend> AdamW<B> {
    pub fn new(model: &Model<B>, config: AdamWConfig) -> Result<Self> {
        let z = || model.layout.specs.iter().map(|s| model.backend.zeros(s.numel())).collect::<Result<Vec<_>>>();
        Ok(AdamW { config, exp_avg: z()?, exp_avg_sq: z()?, step: 0 })
    }

    /// One step at learning rate `lr` (the scheduler's value), with the gradients multiplied by
    /// `grad_scale` on the fly (the clipping coefficient from [`clip_coefficient`]; 1.0 for none).
    pub fn step(&mut self, model: &mut Model<B>, grads: &Grads<B>, lr: f32, grad_scale: f32) {
        self.step += 1;
        let c = self.config;
        let hp = AdamWStep { lr, beta1: c.beta1, beta2: c.beta2, eps: c.eps, weight_decay: c.weight_decay, step: self.step, grad_scale };
        let mut tensors: Vec<_> = model
            .params
            .iter_mut()
            .zip(&grads.tensors)
            .zip(self.exp_avg.iter_mut().zip(self.exp_avg_sq.iter_mut()))
            .zip(model.layout.specs.iter().zip(&model.trainable))
            .filter(|(_, (_, &trainable))| trainable)
            .map(|(((p, g), (m, v)), (spec, _))| (p, g, m, v, spec.decay))
            .collect();
        model.backend.adamw_multi(&mut tensors, hp);
    }
}

/// The global L2 norm of all gradients.
pub fn grad_norm<B: Backend>(be: &B, grads: &Grads<B>) -> Result<f32> {
    norm_of(be, grads.tensors.iter().collect())
}

/// The global L2 norm of the gradients of the trainable parameters (`trainable[i]` for tensor
/// `i`), as `clip_grad_norm_` over `model.parameters()` that require a gradient.
pub fn trainable_grad_norm<B: Backend>(be: &B, grads: &Grads<B>, trainable: &[bool]) -> Result<f32> {
    norm_of(be, grads.tensors.iter().zip(trainable).filter(|(_, &t)| t).map(|(g, _)| g).collect())
}

fn norm_of<B: Backend>(be: &B, tensors: Vec<&B::Buf>) -> Result<f32> {
    // as torch: the norm of the per-tensor norms
    let sum: f32 = be
        .sum_squares_multi(&tensors)?
        .into_iter()
        .map(|s| {
            let n = s.sqrt() as f32;
            n * n
        })
        .sum();
    Ok(sum.sqrt())
}

/// The global gradient norm and the clipping coefficient `min(1, max_norm / (norm + 1e-6))`
/// that `torch.nn.utils.clip_grad_norm_` would multiply the gradients by. Pass the coefficient to
/// [`AdamW::step`], which applies it in the same pass as the update.
pub fn clip_coefficient<B: Backend>(be: &B, grads: &Grads<B>, max_norm: f32) -> Result<(f32, f32)> {
    let norm = grad_norm(be, grads)?;
    Ok((norm, clip_coef(norm, max_norm)))
}

/// `clip_grad_norm_`'s coefficient for gradients of global norm `norm`:
/// `min(1, max_norm / (norm + 1e-6))`.
pub fn clip_coef(norm: f32, max_norm: f32) -> f32 {
    (max_norm / (norm + 1e-6)).min(1.0)
}

/// Scales gradients in place so their global norm is at most `max_norm` and returns the norm
/// before clipping, as `clip_grad_norm_` does (for callers that need the clipped gradients).
pub fn clip_grad_norm<B: Backend>(be: &B, grads: &mut Grads<B>, max_norm: f32) -> Result<f32> {
    let (norm, coef) = clip_coefficient(be, grads, max_norm)?;
    if coef < 1.0 {
        grads.tensors.iter_mut().for_each(|g| be.scale(g, coef));
    }
    Ok(norm)
}
