//! `runtime init`: fresh weights with transformers' `_init_weights` scheme: normal with
//! `initializer_range` for linear and embedding weights (GPT-2's residual projections `c_proj` with
//! `initializer_range / sqrt(2 * n_layer)`), zero biases, unit norm weights, and the Llama
//! family's `padding_idx` embedding row set to zero.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use super::config::{Arch, ModelConfig};
use super::layout::{Init, Layout, ParamSpec};
use crate::error::Result;

/// Deterministic for a given config and seed.
pub fn init_tensors(cfg: &ModelConfig, layout: &Layout, seed: u64) -> Vec<Vec<f32>> {
    let mut out = Vec::with_capacity(layout.specs.len());
    init_each(cfg, layout, seed, &mut |_, t| {
        out.push(t);
        Ok(())
    })
    .expect("collecting cannot fail");
    out
}

/// [`init_tensors`] a tensor at a time: `put(i, values)` for each parameter in layout order (the
/// same values; at most one tensor is made at once).
pub fn init_each(cfg: &ModelConfig, layout: &Layout, seed: u64, put: &mut dyn FnMut(usize, Vec<f32>) -> Result<()>) -> Result<()> {
    init_specs(&layout.specs, seed, &mut |i, mut t| {
        if cfg.arch == Arch::Llama && i == layout.wte {
            if let Some(pad) = cfg.pad_token_id.filter(|&p| p < cfg.vocab_size) {
                let h = cfg.hidden_size;
                t[pad * h..(pad + 1) * h].fill(0.0);
            }
        }
        put(i, t)
    })
}

/// Each spec's tensor filled as its [`Init`] says, in order, from one seeded stream (what a
/// family changes afterwards, `put` does).
pub fn init_specs(specs: &[ParamSpec], seed: u64, put: &mut dyn FnMut(usize, Vec<f32>) -> Result<()>) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (i, spec) in specs.iter().enumerate() {
        let t = match spec.init {
            Init::Zeros => vec![0.0; spec.numel()],
            Init::Ones => vec![1.0; spec.numel()],
            Init::Normal(std) => {
                let dist = Normal::new(0.0f32, std.max(0.0)).unwrap_or(Normal::new(0.0, 0.0).expect("zero std is valid"));
                (0..spec.numel()).map(|_| dist.sample(&mut rng)).collect()
            }
        };
        put(i, t)?;
    }
    Ok(())
}
