//! Where a pass finds its parameters when no process holds them all (`fsdp = "full_shard"`,
//! ZeRO stage 3): a [`Residency`] makes a unit's parameters whole just before the unit runs and
//! frees them after, and in the backward pass gives the unit's gradients a buffer and takes them
//! back once they are complete. The passes call [`Model::with_params`] and
//! [`Model::with_params_grads`] around each unit (the embedding, each layer, the final norm, the
//! head); without a residency those run the unit on the model's own buffers and cost nothing.

use std::sync::{Arc, Mutex};

use super::Model;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::nn::Params;

/// The parameters of a model sharded over processes, seen from the passes. Every process makes
/// the same calls in the same order (they are collective operations).
pub trait Residency<B: Backend>: Send {
    /// The parameter buffers a pass reads: whole for the parameters fetched, empty for the rest.
    fn params(&self) -> &[B::Buf];
    /// Makes parameters `idx` whole in [`Residency::params`].
    fn fetch(&mut self, be: &B, idx: &[usize]) -> Result<()>;
    /// Frees parameters `idx` (they are not needed until the next fetch).
    fn release(&mut self, be: &B, idx: &[usize]) -> Result<()>;
    /// Gives each gradient of `idx` a zeroed buffer in `grads` when it has none.
    fn fetch_grads(&mut self, be: &B, grads: &mut [B::Buf], idx: &[usize]) -> Result<()>;
    /// The gradients of `idx` are complete for this micro-batch: they are combined into their
    /// owners' shards and their buffers in `grads` freed.
    fn grads_done(&mut self, be: &B, grads: &mut [B::Buf], idx: &[usize]) -> Result<()>;
}

/// A residency shared by the model (which fetches through it) and the engine (which updates the
/// shards it holds).
pub type SharedResidency<B> = Arc<Mutex<dyn Residency<B>>>;

fn poisoned() -> Error {
    Error::Invalid("the sharded parameters were left inconsistent by an earlier failure".into())
}

impl<B: Backend> Model<B> {
    /// Runs `f` with parameters `idx` whole (fetched and released around it under a residency;
    /// made f32 around it when held in bf16).
    pub(crate) fn with_params<T>(&self, idx: &[usize], f: impl FnOnce(&Params<B>) -> T) -> Result<T> {
        if let Some(frozen) = &self.frozen {
            return self.with_expanded(frozen, idx, f);
        }
        let Some(r) = &self.residency else { return Ok(f(&self.unit_params())) };
        let mut r = r.lock().map_err(|_| poisoned())?;
        r.fetch(&self.backend, idx)?;
        let out = f(&Params::new(r.params(), &self.trainable));
        r.release(&self.backend, idx)?;
        Ok(out)
    }

    /// The backward form of [`Model::with_params`]: the gradients of `idx` get buffers in `grads`
    /// first, and the gradients of `done` are handed over after `f` (they are complete).
    pub(crate) fn with_params_grads<T>(
        &self,
        idx: &[usize],
        done: &[usize],
        grads: &mut [B::Buf],
        f: impl FnOnce(&Params<B>, &mut [B::Buf]) -> T,
    ) -> Result<T> {
        if let Some(frozen) = &self.frozen {
            return self.with_expanded(frozen, idx, |p| f(p, grads));
        }
        let Some(r) = &self.residency else { return Ok(f(&self.unit_params(), grads)) };
        let mut r = r.lock().map_err(|_| poisoned())?;
        r.fetch(&self.backend, idx)?;
        r.fetch_grads(&self.backend, grads, idx)?;
        let out = f(&Params::new(r.params(), &self.trainable), grads);
        r.release(&self.backend, idx)?;
        r.grads_done(&self.backend, grads, done)?;
        Ok(out)
    }

    /// Whether the parameters live sharded over processes (then `params` holds empty buffers).
    pub fn is_sharded(&self) -> bool {
        self.residency.is_some()
    }
}
