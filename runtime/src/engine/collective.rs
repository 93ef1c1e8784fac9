//! How a step's gradients are combined across processes. One process needs nothing; a data
//! parallel run (MPI on CPUs, NCCL on GPUs) implements [`Collective`] and the step calls it
//! between the last backward pass and the gradient norm.

use crate::backend::Backend;
use crate::error::Result;
use crate::model::Grads;

pub trait Collective<B: Backend>: Send {
    /// This process's rank and the number of processes.
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replaces each gradient with its sum over the processes (each has already divided by the
    /// window's label tokens over all processes, so the sum is the mean gradient).
    fn all_reduce_grads(&mut self, backend: &B, grads: &mut Grads<B>) -> Result<()>;
}

/// One process: nothing to combine.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl<B: Backend> Collective<B> for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_grads(&mut self, _: &B, _: &mut Grads<B>) -> Result<()> {
        Ok(())
    }
}
