//! The device communicator of a data parallel run on GPUs (`ddp_backend = "nccl"`): NCCL, loaded
//! at run time through cudarc like the rest of CUDA. Rank 0 makes the id, the host collective
//! (MPI) hands it to the others, and each process joins with its rank; the collectives then run
//! on the backend's one stream, in order with the ops around them, on the f32 buffers in place.

use cudarc::driver::CudaSlice;
use cudarc::nccl::{Comm, Id, ReduceOp};

use super::Cuda;
use crate::backend::GroupOp;
use crate::error::{Error, Result};

/// A joined communicator. NCCL allows calls on a communicator from any thread, one at a time;
/// the backend keeps it behind a mutex.
pub(super) struct Group(Comm);

// SAFETY: the communicator is a handle that NCCL lets any thread use; `Inner` keeps it in a
// `Mutex`, so no two threads call into it at once.
unsafe impl Send for Group {}

/// The error when NCCL's library does not load (cudarc would panic at the first call).
const NCCL_MISSING: &str = "the NCCL library (libnccl.so) was not found: install NCCL (the libnccl2 and libnccl-dev packages), or, with the \
                            `nvidia-nccl` wheel, which ships libnccl.so.2 only, link it as libnccl.so in a folder on LD_LIBRARY_PATH";

fn nccl_error(what: &str, e: cudarc::nccl::result::NcclError) -> Error {
    Error::Device(format!("NCCL {what} failed: {:?}", e.0))
}

fn nccl_present() -> Result<()> {
    // SAFETY: this only tries to dlopen the library under its usual names.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::Device(NCCL_MISSING.into()))
    }
}

impl Cuda {
    pub(super) fn group_id_op(&self) -> Result<Vec<u8>> {
        nccl_present()?;
        let id = Id::new().map_err(|e| nccl_error("making a communicator id", e))?;
        Ok(id.internal().iter().map(|&c| c as u8).collect())
    }

    pub(super) fn group_join_op(&self, id: &[u8], rank: usize, world: usize) -> Result<()> {
        nccl_present()?;
        let bytes: [u8; 128] = id.try_into().map_err(|_| Error::Invalid(format!("an NCCL communicator id has 128 bytes, this one {}", id.len())))?;
        let internal = bytes.map(|b| b as std::ffi::c_char);
        self.status()?;
        let comm = Comm::from_rank(self.0.stream.clone(), rank, world, Id::uninit(internal))
            .map_err(|e| nccl_error(&format!("joining as rank {rank} of {world}"), e))?;
        *self.0.group.lock().unwrap_or_else(|e| e.into_inner()) = Some(Group(comm));
        let mut code = 0;
        // SAFETY: writes one int; the library is loaded (checked above).
        let version = match unsafe { cudarc::nccl::sys::ncclGetVersion(&mut code) } {
            cudarc::nccl::sys::ncclResult_t::ncclSuccess => format!("NCCL {}.{}.{}", code / 10000, code / 100 % 100, code % 100),
            _ => "NCCL".into(),
        };
        if rank == 0 {
            tracing::info!("{version}: {world} process(es) joined the device communicator");
        }
        Ok(())
    }

    pub(super) fn group_op_op(&self, buf: &mut CudaSlice<f32>, start: usize, len: usize, op: GroupOp) -> Result<()> {
        self.status()?;
        if start + len > buf.len() {
            return Err(Error::Invalid(format!("group op on elements {start}..{} of a buffer of {}", start + len, buf.len())));
        }
        if len == 0 {
            return Ok(());
        }
        // a sum or a copy writes the buffer: its bf16 working copy is stale
        self.forget_weight(buf);
        let group = self.0.group.lock().unwrap_or_else(|e| e.into_inner());
        let comm = &group.as_ref().ok_or_else(|| Error::Invalid("no device communicator was joined (Backend::group_join)".into()))?.0;
        let mut view = buf.slice_mut(start..start + len);
        let done = match op {
            GroupOp::Sum => comm.all_reduce_in_place(&mut view, &ReduceOp::Sum),
            GroupOp::SumTo(root) => comm.reduce_in_place(&mut view, &ReduceOp::Sum, root as i32),
            GroupOp::From(root) => comm.broadcast_in_place(&mut view, root as i32),
        };
        done.map(|_| ()).map_err(|e| nccl_error(&format!("{op:?} of {len} values"), e))
    }
}
