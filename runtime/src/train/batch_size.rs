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
/// costs its weights only, and the activations at the longest example) fits in 90% of
/// `budget`, with the accumulation raised by the same factor so the examples per step do not
/// change (transformers only halves the batch). An error when even one example does not fit.
pub(super) fn fit_batch_size<B: Backend>(model: &Model<B>, batch: usize, accum: usize, seq: usize, budget: u128) -> Result<(usize, usize)> {
    let sizes = || model.layout.specs.iter().map(|s| s.numel() as u128);
    let grads: u128 = sizes().zip(model.grad_needed()).filter(|(_, n)| *n).map(|(s, _)| s).sum();
    let moments: u128 = sizes().zip(&model.trainable).filter(|(_, t)| **t).map(|(s, _)| 2 * s).sum();
    let fixed = 4 * (model.layout.numel() as u128 + grads + moments);
    let usable = budget / 10 * 9;
    for d in (1..=batch).filter(|&d| batch.is_multiple_of(d)) {
        let b = batch / d;
        if fixed + Activations::estimate_bytes(model, b, seq) <= usable {
            return Ok((b, accum * d));
        }
    }
    Err(Error::Invalid(format!(
        "auto_find_batch_size: even one example of {seq} tokens needs about {:.1} GiB, more than the {:.1} GiB available",
        (fixed + Activations::estimate_bytes(model, 1, seq)) as f64 / (1u64 << 30) as f64,
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
    use super::smaller_batch;

    #[test]
    fn the_batch_shrinks_by_its_smallest_divisor_and_the_accumulation_grows_by_it() {
        assert_eq!(smaller_batch(32, 1), Some((16, 2)));
        assert_eq!(smaller_batch(12, 2), Some((6, 4)));
        assert_eq!(smaller_batch(9, 1), Some((3, 3)));
        assert_eq!(smaller_batch(7, 3), Some((1, 21)));
        assert_eq!(smaller_batch(1, 4), None);
    }
}
