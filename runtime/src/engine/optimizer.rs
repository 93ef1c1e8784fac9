//! AdamW over all parameter tensors, with HF's rule that biases and normalisation weights get no
//! weight decay, and global-norm gradient clipping as `torch.nn.utils.clip_grad_norm_` does it.

use crate::backend::{AdamWStep, Backend};
use crate::error::Result;
use crate::model::{Grads, ParamSet};

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

/// Optimizer state: first and second moments per trainable parameter tensor (`None` for a
/// frozen one: it has no state, as in torch, where a parameter without a gradient never gets
/// any), and the step count.
pub struct AdamW<B: Backend> {
    pub config: AdamWConfig,
    pub exp_avg: Vec<Option<B::Buf>>,
    pub exp_avg_sq: Vec<Option<B::Buf>>,
    pub step: u64,
}

impl<B: Backend> AdamW<B> {
    pub fn new(model: &dyn ParamSet<B>, config: AdamWConfig) -> Result<Self> {
        let mut opt = AdamW { config, exp_avg: Vec::new(), exp_avg_sq: Vec::new(), step: 0 };
        opt.allocate(model)?;
        Ok(opt)
    }

    /// Zeroed moments for every trainable parameter that has none (all of them at first; one
    /// made trainable later gets its state here, before its first update, as torch's lazy state).
    pub(super) fn allocate(&mut self, model: &dyn ParamSet<B>) -> Result<()> {
        let n = model.specs().len();
        self.exp_avg.resize_with(n, || None);
        self.exp_avg_sq.resize_with(n, || None);
        for (i, spec) in model.specs().iter().enumerate() {
            if model.trainable()[i] && self.exp_avg[i].is_none() {
                self.exp_avg[i] = Some(model.backend().zeros(spec.numel())?);
                self.exp_avg_sq[i] = Some(model.backend().zeros(spec.numel())?);
            }
        }
        Ok(())
    }

    /// The hyper-parameters of the step numbered `step` (1-based).
    pub(super) fn hyper(&self, step: u64, lr: f32, grad_scale: f32) -> AdamWStep {
        let c = self.config;
        AdamWStep { lr, beta1: c.beta1, beta2: c.beta2, eps: c.eps, weight_decay: c.weight_decay, step, grad_scale }
    }

    /// One step at learning rate `lr` (the scheduler's value), with the gradients multiplied by
    /// `grad_scale` on the fly (the clipping coefficient from [`clip_coefficient`]; 1.0 for none).
    pub fn step(&mut self, model: &mut dyn ParamSet<B>, grads: &Grads<B>, lr: f32, grad_scale: f32) -> Result<()> {
        self.allocate(model)?;
        self.step += 1;
        let hp = self.hyper(self.step, lr, grad_scale);
        let m = model.params_mut();
        let mut tensors: Vec<_> = m
            .params
            .iter_mut()
            .zip(&grads.tensors)
            .zip(self.exp_avg.iter_mut().zip(self.exp_avg_sq.iter_mut()))
            .zip(m.specs.iter().zip(m.trainable))
            .filter(|(_, (_, &trainable))| trainable)
            .filter_map(|(((p, g), (m, v)), (spec, _))| Some((p, g, m.as_mut()?, v.as_mut()?, spec.decay)))
            .collect();
        m.backend.adamw_multi(&mut tensors, hp);
        Ok(())
    }
}

/// Values this far below `f32::MAX` leave room for the rounding of the kernel's f32 arithmetic.
const FINITE_MARGIN: f64 = 1e36;

/// Relative slack added to every bound per step, for f32 rounding (the bounds are in f64).
const SLACK: f64 = 1.0 + 1e-5;

/// Bounds on the magnitude of every parameter, first-moment and second-moment element after one
/// AdamW step, given bounds before it (`[p, m, v]`; any norm bounds every element, the L2 norms
/// included) and on the gradients after clipping (`g`, their L2 norm), as long as they provably
/// stay finite in f32; `None` when that cannot be shown (an infinite learning rate, a zero
/// epsilon, values near the f32 range). The bound takes every element's worst case at once
/// (`|m / (sqrt(v) + eps)| <= |m| / eps`), so for any sane run it holds by a wide margin.
pub fn bounds_after_update(hp: AdamWStep, [p, m, v]: [f64; 3], g: f64) -> Option<[f64; 3]> {
    let s = hp.scalars();
    let scalars = [s.step_size, s.bc2_sqrt, s.decay_mul, s.w1, s.w2, hp.beta1, hp.beta2, hp.eps, hp.grad_scale];
    if scalars.iter().any(|x| !x.is_finite()) || hp.eps <= 0.0 || !g.is_finite() {
        return None;
    }
    let (f, g) = (|x: f32| x as f64, g * SLACK);
    let decay = f(s.decay_mul).abs().max(1.0);
    let m2 = (f(hp.beta1) * m + f(s.w1) * g) * SLACK;
    let v2 = (f(hp.beta2) * v + f(s.w2) * g * g) * SLACK;
    let ratio = m2 / f(hp.eps);
    let p2 = (decay * p + f(s.step_size) * ratio) * SLACK;
    [g * g, m2, v2, ratio, p2].iter().all(|&x| x < FINITE_MARGIN).then_some([p2, m2, v2])
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;

    fn hp(lr: f32, eps: f32) -> AdamWStep {
        AdamWStep { lr, beta1: 0.9, beta2: 0.999, eps, weight_decay: 0.01, step: 1, grad_scale: 1.0 }
    }

    #[test]
    fn the_bound_vouches_for_sane_steps_only() {
        // a large model's norms and a typical learning rate: safe by a wide margin, for a
        // million steps of the worst case
        let mut b = [2e3, 1.0, 1.0];
        for _ in 0..1_000_000 {
            b = bounds_after_update(hp(3e-4, 1e-8), b, 10.0).expect("a sane run stays provably finite");
        }
        // an infinite learning rate (1e300 in f32), a huge one, a zero epsilon, a gradient whose
        // square overflows f32, a non-finite gradient norm, a moment near the f32 range
        assert!(bounds_after_update(hp(f32::INFINITY, 1e-8), [1.0; 3], 1.0).is_none());
        assert!(bounds_after_update(hp(1e30, 1e-8), [1.0; 3], 1.0).is_none());
        assert!(bounds_after_update(hp(1e-3, 0.0), [1.0; 3], 1.0).is_none());
        assert!(bounds_after_update(hp(1e-3, 1e-8), [1.0; 3], 1e19).is_none());
        assert!(bounds_after_update(hp(1e-3, 1e-8), [1.0; 3], f64::NAN).is_none());
        assert!(bounds_after_update(hp(1e-20, 1e-8), [1.0, 1e30, 1.0], 1.0).is_none());
    }

    #[test]
    fn the_bound_holds_for_the_kernel() {
        // cases near the margin that the bound vouches for: the CPU kernel's results stay
        // finite and within the bounds
        for (lr, p, m, g) in [(1e20f32, 1.0f32, 0.0f32, 1e6f32), (1.0, 1e30, 0.0, 1e16), (1e-3, 1e35, 1.0, 1.0), (1e-14, 1.0, 1e27, 1.0)] {
            let h = hp(lr, 1e-8);
            let b = bounds_after_update(h, [p as f64, m as f64, 0.0], g as f64);
            let (mut pv, gv, mut mv, mut vv) = (vec![p, -p], vec![g, -g], vec![m, -m], vec![0.0; 2]);
            Cpu.adamw(&mut pv, &gv, &mut mv, &mut vv, h, true);
            let [bp, bm, bv] = b.unwrap_or_else(|| panic!("lr {lr}, p {p}, m {m}, g {g}: the case should be vouched for"));
            let within = |xs: &[f32], bound: f64| xs.iter().all(|x| x.is_finite() && (x.abs() as f64) <= bound);
            assert!(within(&pv, bp) && within(&mv, bm) && within(&vv, bv), "lr {lr}, p {p}, g {g}: {pv:?} {mv:?} {vv:?} vs {b:?}");
        }
    }
}
