//! Plain data parallel's gradient sums over MPI, started while the backward pass still runs
//! (torch DDP's buckets). The gradients are laid out, in the order the backward pass finishes
//! them ([`crate::model::TrainModel::grad_groups`]), into buckets of `ddp_bucket_cap_mb`. As soon
//! as every gradient of the next bucket is final ([`Collective::grads_ready`]) the bucket is
//! copied out and its reduce-scatter started (`MPI_Ireduce_scatter_block`: each process sums
//! one part); each later report drives MPI's progress and starts the all-gather of the parts
//! (`MPI_Iallgather`) of every bucket whose reduce-scatter has finished. At the end of the pass
//! ([`Collective::all_reduce_grads`]) the rest is started, everything waited for, and the sums
//! copied back. Every process ends with the same bits, as with the blocking sums: each element is
//! added once, by the process that owns its part, and copied to the others.
//!
//! Collectives on one communicator must be started in the same order by every process. The
//! reduce-scatters and the all-gathers each have a communicator of their own (duplicated from
//! the world at start, when every process is there), and each is started in the buckets' order,
//! so a process that ran no backward pass this step (its share of the batch was empty, or its
//! loss plugin failed) starts the same sequence, only later. The world communicator's own calls
//! (the step's sums, barriers) go on meanwhile.
//!
//! The buckets hold a copy of the gradients (and each process's part of it) for as long as the
//! run lasts, as DDP's do: one more copy of the trainable gradients, plus 1/N.
//!
//! [`Collective::grads_ready`]: super::Collective::grads_ready
//! [`Collective::all_reduce_grads`]: super::Collective::all_reduce_grads

use mpi::collective::SystemOperation;
use mpi::ffi;
use mpi::raw::AsRaw;
use mpi::traits::Equivalence;

use crate::backend::Backend;
use crate::error::{Error, Result};

/// One bucket: the pieces of gradients laid end to end in `flat` (padded with zeros to a
/// multiple of the processes), this process's summed part, and the two requests in flight.
struct Bucket {
    /// (tensor, first element, elements), in the order they lie in `flat`.
    pieces: Vec<(usize, usize, usize)>,
    flat: Vec<f32>,
    part: Vec<f32>,
    scatter: ffi::MPI_Request,
    gather: ffi::MPI_Request,
}

/// The two communicators of the overlapped sums. Made by every process at start.
#[derive(Clone, Copy)]
pub(super) struct Comms {
    scatter: ffi::MPI_Comm,
    gather: ffi::MPI_Comm,
}

// SAFETY: MPI's handles (integers in MPICH, pointers in Open MPI) are only used by the thread
// that owns the collective, the one that initialised MPI (`MPI_THREAD_FUNNELED`).
unsafe impl Send for Comms {}
unsafe impl Send for GradBuckets {}

fn check(what: &str, code: std::os::raw::c_int) -> Result<()> {
    // MPI's default error handler ends the run before a failure code could come back; this is
    // for libraries set up otherwise
    if code == 0 {
        Ok(())
    } else {
        Err(Error::Invalid(format!("MPI's {what} failed (error code {code})")))
    }
}

impl Comms {
    /// Duplicates the world communicator twice: a collective call, made by every process at the
    /// same point (when MPI starts).
    pub(super) fn new() -> Result<Comms> {
        let world = mpi::topology::SimpleCommunicator::world().as_raw();
        let mut scatter = std::mem::MaybeUninit::uninit();
        let mut gather = std::mem::MaybeUninit::uninit();
        // SAFETY: `world` is a valid communicator once MPI is initialised; MPI writes the handles
        unsafe {
            check("MPI_Comm_dup", ffi::MPI_Comm_dup(world, scatter.as_mut_ptr()))?;
            check("MPI_Comm_dup", ffi::MPI_Comm_dup(world, gather.as_mut_ptr()))?;
            Ok(Comms { scatter: scatter.assume_init(), gather: gather.assume_init() })
        }
    }
}

/// The buckets of one run's gradients and the state of the step's sums.
pub(super) struct GradBuckets {
    comms: Comms,
    /// The gradient buffers' lengths the plan was made for.
    lens: Vec<usize>,
    buckets: Vec<Bucket>,
    /// Which gradients are final this step, by parameter.
    ready: Vec<bool>,
    /// Buckets whose reduce-scatter, and whose all-gather, has been started (a prefix each).
    scattering: usize,
    gathering: usize,
}

fn null_request() -> ffi::MPI_Request {
    // SAFETY: a constant of the MPI library
    unsafe { ffi::RSMPI_REQUEST_NULL }
}

impl GradBuckets {
    /// Buckets of at most `window` elements (a multiple of `size`) over the gradients of
    /// `lens`, in the order of `groups`, then buckets of any other gradient (never reported
    /// ready: a frozen norm's), by index; empty gradients take no place.
    pub(super) fn plan(comms: Comms, size: usize, window: usize, groups: &[Vec<usize>], lens: &[usize]) -> GradBuckets {
        // tensor indices in order, `None` where the unreported ones begin
        let mut order: Vec<Option<usize>> = Vec::with_capacity(lens.len() + 1);
        let mut seen = vec![false; lens.len()];
        let mut take = |t: usize, order: &mut Vec<Option<usize>>| {
            if t < lens.len() && !seen[t] && lens[t] > 0 {
                seen[t] = true;
                order.push(Some(t));
            }
        };
        groups.iter().flatten().for_each(|&t| take(t, &mut order));
        order.push(None);
        (0..lens.len()).for_each(|t| take(t, &mut order));
        let mut buckets = Vec::new();
        let mut pieces: Vec<(usize, usize, usize)> = Vec::new();
        let mut filled = 0;
        let mut close = |pieces: &mut Vec<(usize, usize, usize)>, filled: &mut usize| {
            if *filled > 0 {
                let n = filled.next_multiple_of(size);
                let (flat, part) = (vec![0.0; n], vec![0.0; n / size]);
                buckets.push(Bucket { pieces: std::mem::take(pieces), flat, part, scatter: null_request(), gather: null_request() });
                *filled = 0;
            }
        };
        for t in order {
            let Some(t) = t else {
                close(&mut pieces, &mut filled);
                continue;
            };
            let mut start = 0;
            while start < lens[t] {
                let n = (window - filled).min(lens[t] - start);
                pieces.push((t, start, n));
                (start, filled) = (start + n, filled + n);
                if filled == window {
                    close(&mut pieces, &mut filled);
                }
            }
        }
        close(&mut pieces, &mut filled);
        GradBuckets { comms, lens: lens.to_vec(), ready: vec![false; lens.len()], buckets, scattering: 0, gathering: 0 }
    }

    /// Whether the plan was made for gradient buffers of these lengths.
    pub(super) fn fits(&self, lens: &[usize]) -> bool {
        self.lens == lens
    }

    /// The gradients `params` are final: starts every bucket now complete, then drives the
    /// sums in flight.
    pub(super) fn ready<B: Backend>(&mut self, backend: &B, params: &[usize], grads: &mut [B::Buf]) -> Result<()> {
        for &p in params {
            if let Some(r) = self.ready.get_mut(p) {
                *r = true;
            }
        }
        self.start_scatters(backend, grads, false)?;
        self.progress(false)
    }

    /// Starts the reduce-scatter of each next bucket whose gradients are all final (every one
    /// left with `all`).
    fn start_scatters<B: Backend>(&mut self, backend: &B, grads: &mut [B::Buf], all: bool) -> Result<()> {
        while let Some(b) = self.buckets.get_mut(self.scattering) {
            if !all && !b.pieces.iter().all(|&(t, _, _)| self.ready[t]) {
                break;
            }
            let mut at = 0;
            for &(t, s, n) in &b.pieces {
                let src = backend.host_mut(&mut grads[t]).ok_or_else(|| Error::Invalid("a gradient is not in host memory".into()))?;
                b.flat[at..at + n].copy_from_slice(&src[s..s + n]);
                at += n;
            }
            // SAFETY: `flat` and `part` are neither moved, resized nor read until the request
            // completes (waited for in `finish`, or the buffers leaked in `into_comms`)
            unsafe {
                check(
                    "MPI_Ireduce_scatter_block",
                    ffi::MPI_Ireduce_scatter_block(
                        b.flat.as_ptr().cast(),
                        b.part.as_mut_ptr().cast(),
                        b.part.len() as _,
                        f32::equivalent_datatype().as_raw(),
                        SystemOperation::sum().as_raw(),
                        self.comms.scatter,
                        &mut b.scatter,
                    ),
                )?;
            }
            self.scattering += 1;
        }
        Ok(())
    }

    /// Starts the all-gather of each next bucket whose reduce-scatter has finished, waiting
    /// for them with `wait` (else only testing, which also drives MPI's progress).
    fn progress(&mut self, wait: bool) -> Result<()> {
        while self.gathering < self.scattering {
            let b = &mut self.buckets[self.gathering];
            // SAFETY: `b.scatter` is a request of this bucket's reduce-scatter (or null once done)
            unsafe {
                if wait {
                    check("MPI_Wait", ffi::MPI_Wait(&mut b.scatter, ffi::RSMPI_STATUS_IGNORE))?;
                } else {
                    let mut done = 0;
                    check("MPI_Test", ffi::MPI_Test(&mut b.scatter, &mut done, ffi::RSMPI_STATUS_IGNORE))?;
                    if done == 0 {
                        return Ok(());
                    }
                }
                let n = b.part.len();
                let datatype = f32::equivalent_datatype().as_raw();
                // SAFETY: as for the reduce-scatter; `part` is only read, `flat` written
                check(
                    "MPI_Iallgather",
                    ffi::MPI_Iallgather(
                        b.part.as_ptr().cast(),
                        n as _,
                        datatype,
                        b.flat.as_mut_ptr().cast(),
                        n as _,
                        datatype,
                        self.comms.gather,
                        &mut b.gather,
                    ),
                )?;
            }
            self.gathering += 1;
        }
        Ok(())
    }

    /// Starts what is left, waits for every sum and copies them into the gradients; then the
    /// next step starts afresh. Returns the elements summed, the buckets, and how many of them
    /// were started before the end of the backward pass.
    pub(super) fn finish<B: Backend>(&mut self, backend: &B, grads: &mut [B::Buf]) -> Result<(usize, usize, usize)> {
        let early = self.scattering;
        self.start_scatters(backend, grads, true)?;
        self.progress(true)?;
        let mut total = 0;
        for b in &mut self.buckets {
            // SAFETY: the bucket's all-gather request, started above or earlier
            unsafe { check("MPI_Wait", ffi::MPI_Wait(&mut b.gather, ffi::RSMPI_STATUS_IGNORE))? };
            let mut at = 0;
            for &(t, s, n) in &b.pieces {
                let dst = backend.host_mut(&mut grads[t]).ok_or_else(|| Error::Invalid("a gradient is not in host memory".into()))?;
                dst[s..s + n].copy_from_slice(&b.flat[at..at + n]);
                at += n;
            }
            total += at;
        }
        self.ready.iter_mut().for_each(|r| *r = false);
        (self.scattering, self.gathering) = (0, 0);
        Ok((total, self.buckets.len(), early))
    }
}

impl Drop for GradBuckets {
    fn drop(&mut self) {
        if self.scattering > 0 {
            // dropped mid-step (a failed run): MPI may still write into the buffers
            std::mem::forget(std::mem::take(&mut self.buckets));
        }
    }
}
