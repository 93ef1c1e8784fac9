//! How a step's gradients are combined across processes. One process needs nothing; a data
//! parallel run (MPI on CPUs, NCCL on GPUs) implements [`Collective`]. During the backward pass
//! of a window's last micro-batch the step tells it each group of gradients as soon as it is
//! final ([`Collective::grads_ready`], where a reduction can start while the rest of the backward
//! pass runs), and between that pass and the gradient norm it calls
//! [`Collective::all_reduce_grads`] (where the reductions are finished).
//!
//! The trainer also agrees with the other processes through it on a few numbers per step (the
//! window's label tokens, the summed loss, whether to stop: [`Collective::sum_f64`]), checks at
//! start that every process was given the same run ([`Collective::all_gather_u64`]), and waits
//! for rank 0's writes ([`Collective::barrier`]).

use crate::backend::Backend;
use crate::error::Result;
use crate::model::Grads;

pub trait Collective<B: Backend>: Send {
    /// This process's rank and the number of processes.
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Told, in the backward pass of the window's last micro-batch, that the gradients of the
    /// parameters `params` are final for this step (`grads` holds every gradient buffer; a
    /// frozen parameter is never told). The default does nothing.
    fn grads_ready(&mut self, _backend: &B, _params: &[usize], _grads: &mut [B::Buf]) -> Result<()> {
        Ok(())
    }
    /// Told, before the first group of a step is ready and before the sum, the groups of
    /// parameters the backward pass reports to [`Collective::grads_ready`], in its order, and the
    /// gradient buffers (their sizes and where they live). Every process is told the same groups,
    /// whether or not it ran a backward pass this step. The default does nothing.
    fn plan_grads(&mut self, _backend: &B, _groups: &[Vec<usize>], _grads: &mut [B::Buf]) -> Result<()> {
        Ok(())
    }
    /// Replaces each trainable parameter's gradient with its sum over the processes (each has
    /// already divided by the window's label tokens over all processes, so the sum is the mean
    /// gradient). Every process ends with the same bits.
    fn all_reduce_grads(&mut self, backend: &B, grads: &mut Grads<B>) -> Result<()>;
    /// The sum over the processes of `data`, into process `root`'s `data` (the others' is left
    /// as it was).
    fn reduce_to(&mut self, _root: usize, _data: &mut [f32]) -> Result<()> {
        Ok(())
    }
    /// Process `root`'s `data`, copied into every process's `data`.
    fn broadcast_from(&mut self, _root: usize, _data: &mut [f32]) -> Result<()> {
        Ok(())
    }
    /// [`Collective::reduce_to`] of elements `start..start + len` of a backend buffer. The
    /// default goes through the host; a device collective (NCCL) sums on the device.
    fn reduce_buf_to(&mut self, backend: &B, root: usize, buf: &mut B::Buf, start: usize, len: usize) -> Result<()> {
        let own = self.rank() == root;
        super::shard::on_host(backend, buf, start, len, own, |g| self.reduce_to(root, g))
    }
    /// [`Collective::broadcast_from`] of elements `start..start + len` of a backend buffer.
    fn broadcast_buf_from(&mut self, backend: &B, root: usize, buf: &mut B::Buf, start: usize, len: usize) -> Result<()> {
        super::shard::on_host(backend, buf, start, len, true, |w| self.broadcast_from(root, w))
    }
    /// Every process's `data`, by rank, on rank 0 (`None` on the others).
    fn gather_bytes(&mut self, data: &[u8]) -> Result<Option<Vec<Vec<u8>>>> {
        Ok(Some(vec![data.to_vec()]))
    }
    /// Rank 0's `data`, copied into every process's.
    fn broadcast_bytes(&mut self, _data: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
    /// Replaces each value with its sum over the processes (the same on every process).
    fn sum_f64(&mut self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }
    /// Every process's `value`, by rank.
    fn all_gather_u64(&mut self, value: u64) -> Result<Vec<u64>> {
        Ok(vec![value])
    }
    /// Waits until every process has reached this point.
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
    /// Another handle on the same processes (its calls interleave with this one's in the same
    /// order on every process), for a part of the engine that communicates on its own. The
    /// default serves one process only.
    fn duplicate(&self) -> Result<Box<dyn Collective<B>>> {
        if self.world_size() == 1 {
            return Ok(Box::new(SingleProcess));
        }
        Err(crate::error::Error::Unsupported("this collective cannot be duplicated".into()))
    }
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
