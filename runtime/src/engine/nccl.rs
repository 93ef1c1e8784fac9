//! Data parallel training on GPUs (`ddp_backend = "nccl"`): the gradients and the sharded
//! optimizer's pieces are summed and sent by the backend's device communicator (NCCL on CUDA,
//! [`Backend::group_op`]) where they live, on the device, with no copy to the host. Everything
//! else a run agrees on (the per-step numbers, the start-up checks, barriers, the pieces of a
//! checkpoint gathered on rank 0) goes through the host collective it wraps: MPI across
//! processes, or nothing in one process. Rank 0 makes the communicator's id and hands it to the
//! others over that host collective, as llm.c does.

use crate::backend::{Backend, GroupOp};
use crate::engine::Collective;
use crate::error::Result;
use crate::model::Grads;

/// The device communicator over the processes of `host` (one process: a communicator of one,
/// which is how the GPU check exercises it).
pub struct NcclCollective<B: Backend> {
    host: Box<dyn Collective<B>>,
}

/// Joins every process of `host` to one device communicator on `backend`; the collective that
/// sums gradients through it.
pub fn wrap<B: Backend + 'static>(backend: &B, mut host: Box<dyn Collective<B>>) -> Result<Box<dyn Collective<B>>> {
    let mut id = if host.rank() == 0 { backend.group_id()? } else { Vec::new() };
    host.broadcast_bytes(&mut id)?;
    backend.group_join(&id, host.rank(), host.world_size())?;
    tracing::debug!("joined the device communicator as rank {} of {}", host.rank(), host.world_size());
    Ok(Box::new(NcclCollective { host }))
}

impl<B: Backend + 'static> Collective<B> for NcclCollective<B> {
    fn rank(&self) -> usize {
        self.host.rank()
    }
    fn world_size(&self) -> usize {
        self.host.world_size()
    }
    /// Each gradient summed in place on the device. NCCL's algorithms reduce each element once
    /// and send that one result to every process, so every process holds the same bits. The
    /// host then waits for the sums under the `ddp_timeout` watchdog (the gradient norm that
    /// follows would wait for them anyway), so a peer that never joins them is named.
    fn all_reduce_grads(&mut self, backend: &B, grads: &mut Grads<B>) -> Result<()> {
        super::mpi::watched("the gradient sum (NCCL)", || {
            for t in &mut grads.tensors {
                let n = backend.len(t);
                backend.group_op(t, 0, n, GroupOp::Sum)?;
            }
            backend.synchronize()
        })
    }
    fn reduce_buf_to(&mut self, backend: &B, root: usize, buf: &mut B::Buf, start: usize, len: usize) -> Result<()> {
        backend.group_op(buf, start, len, GroupOp::SumTo(root))
    }
    fn broadcast_buf_from(&mut self, backend: &B, root: usize, buf: &mut B::Buf, start: usize, len: usize) -> Result<()> {
        backend.group_op(buf, start, len, GroupOp::From(root))
    }
    fn reduce_to(&mut self, root: usize, data: &mut [f32]) -> Result<()> {
        self.host.reduce_to(root, data)
    }
    fn broadcast_from(&mut self, root: usize, data: &mut [f32]) -> Result<()> {
        self.host.broadcast_from(root, data)
    }
    fn gather_bytes(&mut self, data: &[u8]) -> Result<Option<Vec<Vec<u8>>>> {
        self.host.gather_bytes(data)
    }
    fn broadcast_bytes(&mut self, data: &mut Vec<u8>) -> Result<()> {
        self.host.broadcast_bytes(data)
    }
    fn sum_f64(&mut self, values: &mut [f64]) -> Result<()> {
        self.host.sum_f64(values)
    }
    fn all_gather_u64(&mut self, value: u64) -> Result<Vec<u64>> {
        self.host.all_gather_u64(value)
    }
    fn barrier(&mut self) -> Result<()> {
        self.host.barrier()
    }
    /// Another handle: the host collective duplicated, the same device communicator (the
    /// backend's), whose calls every process makes in the same order.
    fn duplicate(&self) -> Result<Box<dyn Collective<B>>> {
        Ok(Box::new(NcclCollective { host: self.host.duplicate()? }))
    }
}

/// The collective of a training run on `backend`: the processes a launcher started, over MPI
/// ([`super::mpi::start`]), summing device buffers through the device communicator when
/// `ddp_backend` is `nccl`, or when it is unset and several processes train on CUDA devices (HF's
/// default). Set explicitly, `nccl` joins a communicator even in one process.
pub fn start<B: Backend + 'static>(backend: &B, ddp_backend: Option<&str>, bucket_mib: Option<usize>, timeout: Option<u64>) -> Result<Box<dyn Collective<B>>> {
    let host = super::mpi::start(bucket_mib, timeout)?;
    let device = match ddp_backend {
        Some(b) => b == "nccl",
        None => host.world_size() > 1 && backend.name() == "cuda",
    };
    if device {
        wrap(backend, host)
    } else {
        Ok(host)
    }
}
