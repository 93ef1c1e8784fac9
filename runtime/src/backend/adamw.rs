//! The AdamW step's hyper-parameters and the per-step scalars every backend applies.

use super::Backend;

/// AdamW hyper-parameters for one step (PyTorch's `torch.optim.AdamW` semantics).
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step number, for bias correction.
    pub step: u64,
    /// Multiplies every gradient before use: the clipping coefficient, fused into the step
    /// (1.0 when no clipping applies).
    pub grad_scale: f32,
}

/// One tensor of a multi-tensor AdamW step: parameter, gradient, first and second moments, and
/// whether weight decay applies.
pub type AdamWArgs<'a, B> = (&'a mut <B as Backend>::Buf, &'a <B as Backend>::Buf, &'a mut <B as Backend>::Buf, &'a mut <B as Backend>::Buf, bool);

/// The per-step scalars of [`AdamWStep`], computed in double precision as PyTorch does in Python
/// and rounded once, so every backend applies the same f32 values.
#[derive(Clone, Copy, Debug)]
pub struct AdamWScalars {
    /// `lr / (1 - beta1^t)`
    pub step_size: f32,
    /// `sqrt(1 - beta2^t)`
    pub bc2_sqrt: f32,
    /// `1 - lr * weight_decay`, for tensors that decay
    pub decay_mul: f32,
    /// `1 - beta1`
    pub w1: f32,
    /// `1 - beta2`
    pub w2: f32,
}

impl AdamWStep {
    pub fn scalars(&self) -> AdamWScalars {
        let t = self.step as i32;
        let (lr, b1, b2) = (self.lr as f64, self.beta1 as f64, self.beta2 as f64);
        AdamWScalars {
            step_size: (lr / (1.0 - b1.powi(t))) as f32,
            bc2_sqrt: (1.0 - b2.powi(t)).sqrt() as f32,
            decay_mul: (1.0 - lr * self.weight_decay as f64) as f32,
            w1: (1.0 - b1) as f32,
            w2: (1.0 - b2) as f32,
        }
    }
}
