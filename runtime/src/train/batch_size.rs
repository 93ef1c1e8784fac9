//! `auto_find_batch_size`: the batch that fits in memory, planned before training from the step's
//! estimated memory, and found again when a step runs out of memory anyway (the device's memory
//! turned out smaller than planned): the batch is divided and the gradient accumulation
//! multiplied by the same factor, so the examples per optimizer step do not change.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::{Activations, Model};

/// The memory `auto_find_batch_size` plans for, in bytes: `RUNTIME_MEMORY_BUDGET_MB` when set,
/// else the device's free memory (a GPU), else the system's available memory (`MemAvailable`),
/// else unlimited.
pub(super) fn memory_budget(be: &impl Backend) -> u128 {
    if std::env::var_os("RUNTIME_MEMORY_BUDGET_MB").is_none() {
        if let Some(free) = be.free_memory() {
            return free;
        }
    }
    crate::backend::device::host_memory_budget().unwrap_or(u128::MAX)
}

/// `auto_find_batch_size`: the largest divisor of the batch size whose step (weights, the
/// gradients that exist, AdamW's two moments of the trainable parameters, so a frozen base (LoRA)
/// costs its weights only, two bytes a value when held in bf16, and the activations at the
/// longest example; with `bf16` (a GPU's mixed precision) also every weight's bf16 working copy
/// and the activations' bf16 copies, [`Activations::estimate_copy_bytes`]) fits in 90% of
/// `budget`, with the accumulation raised by the same factor so the examples per step do not
/// change (transformers only halves the batch). An error when even one example does not fit.
pub(super) fn fit_batch_size<B: Backend>(model: &Model<B>, batch: usize, accum: usize, seq: usize, budget: u128, bf16: bool) -> Result<(usize, usize)> {
    let sizes = || model.layout.specs.iter().map(|s| s.numel() as u128);
    let grads: u128 = sizes().zip(model.grad_needed()).filter(|(_, n)| *n).map(|(s, _)| s).sum();
    let moments: u128 = sizes().zip(&model.trainable).filter(|(_, t)| **t).map(|(s, _)| 2 * s).sum();
    // a weight held in bf16 (`model::frozen`) costs two of the four bytes counted for it
    let held = model.frozen.as_ref().map_or(0, |f| f.bytes()) as u128;
    let copies = if bf16 { 2 * model.layout.numel() as u128 } else { 0 };
    let fixed = 4 * (model.layout.numel() as u128 + grads + moments) - held + copies;
    let acts = |b: usize| Activations::estimate_bytes(model, b, seq) + if bf16 { Activations::estimate_copy_bytes(model, b, seq) } else { 0 };
    let usable = budget / 10 * 9;
    for d in (1..=batch).filter(|&d| batch.is_multiple_of(d)) {
        let b = batch / d;
        if fixed + acts(b) <= usable {
            return Ok((b, accum * d));
        }
    }
    Err(Error::Invalid(format!(
        "auto_find_batch_size: even one example of {seq} tokens needs about {:.1} GiB, more than the {:.1} GiB available",
        (fixed + acts(1)) as f64 / (1u64 << 30) as f64,
        usable as f64 / (1u64 << 30) as f64
    )))
}

/// After an out-of-memory error at per-device batch `batch`: the next smaller batch that divides
/// it, and the accumulation that keeps the examples per step (`None` at one example).
pub(super) fn smaller_batch(batch: usize, accum: usize) -> Option<(usize, usize)> {
    let d = (2..=batch).find(|d| batch.is_multiple_of(*d))?;
    Some((batch / d, accum * d))
}

#[cfg(test)]
mod tests {
    use super::{fit_batch_size, smaller_batch};
    use crate::backend::cpu::Cpu;
    use crate::model::{Dtype, LoadOptions, Model};

    /// The smallest budget (bytes) in which one example of `seq` tokens fits.
    fn smallest_budget(m: &Model<Cpu>, seq: usize, bf16: bool) -> u128 {
        let (mut lo, mut hi) = (0u128, 1u128 << 40);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if fit_batch_size(m, 1, 1, seq, mid, bf16).is_ok() {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        lo
    }

    /// A LoRA model whose frozen base is held in bf16 is planned at two bytes per held value.
    #[test]
    fn a_bf16_held_base_is_planned_at_its_size() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama/model");
        let load = || {
            let mut m = Model::load(Cpu, &dir, LoadOptions { torch_dtype: Some(Dtype::BF16), ..LoadOptions::default() }).unwrap();
            let peft = serde_json::json!({"r": 4, "lora_alpha": 8, "target_modules": "all-linear"});
            m.add_lora(crate::model::lora::LoraConfig::from_map(peft.as_object().unwrap(), "test").unwrap(), None, 0).unwrap();
            m
        };
        let (plain, mut held) = (load(), load());
        let saved = held.hold_frozen_base().unwrap() as u128;
        assert!(saved > 0);
        let (a, b) = (smallest_budget(&plain, 16, false), smallest_budget(&held, 16, false));
        // 90% of the budget is planned for: the budgets differ by the saved bytes / 0.9
        let diff = a - b;
        assert!(diff * 9 / 10 <= saved && saved <= diff * 9 / 10 + 10, "budgets {a} and {b}, {saved} bytes saved");
    }

    /// In a GPU's bf16 mode the plan adds the weights' working copies and the activations' bf16
    /// copies, counted here by hand from the fixture's config (hidden 32, 4 heads of 8 and 2 key
    /// and value heads, MLP 48, vocabulary 96, 2 layers, 21664 parameters) at one example of 16
    /// tokens.
    #[test]
    fn bf16_copies_are_planned_for() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama/model");
        let mut m = Model::load(Cpu, &dir, LoadOptions::default()).unwrap();
        assert_eq!(m.layout.numel(), 21664);
        // as on a GPU: each layer keeps its own activations (the CPU recomputes the norms')
        m.recompute_activations = false;
        let rows = 16;
        // per layer: the two norms' outputs (32 each), qkv (64), the attention's output (32),
        // gate and up (96), the activation (48); one layer's input gradients (48 + 32 + 32); the
        // logits in bf16, in place of the f32 chunk
        let floats = 2 * rows * (32 + 32 + 64 + 32 + 96 + 48) + rows * (48 + 32 + 32) + rows * 96;
        let extra = 2 * (21664 + floats) - 4 * rows * 96;
        let (f32_budget, bf16_budget) = (smallest_budget(&m, 16, false), smallest_budget(&m, 16, true));
        // 90% of the budget is planned for
        let diff = bf16_budget - f32_budget;
        assert!((diff * 9 / 10).abs_diff(extra) <= 10, "budgets {f32_budget} and {bf16_budget}, {extra} bytes expected");
        // with the activations recomputed nothing is held in the forward pass, and the logits
        // chunk trades places with a scratch buffer (no f32 chunk to take back)
        m.recompute_activations = true;
        let diff = smallest_budget(&m, 16, true) - smallest_budget(&m, 16, false);
        let extra = 2 * (21664 + rows * (48 + 32 + 32) + rows * 96);
        assert!((diff * 9 / 10).abs_diff(extra) <= 10, "recomputed: {diff}, {extra} bytes expected");
    }

    #[test]
    fn the_batch_shrinks_by_its_smallest_divisor_and_the_accumulation_grows_by_it() {
        assert_eq!(smaller_batch(32, 1), Some((16, 2)));
        assert_eq!(smaller_batch(12, 2), Some((6, 4)));
        assert_eq!(smaller_batch(9, 1), Some((3, 3)));
        assert_eq!(smaller_batch(7, 3), Some((1, 21)));
        assert_eq!(smaller_batch(1, 4), None);
    }
}
