//! A device failure that an op could not return: recorded (the first one), every later op
//! skipped, and reported by the next op that returns a result; and the recovery after running out
//! of memory (`Backend::recover_out_of_memory`).

use super::{device_error, Cuda};
use crate::error::{Error, Result};

/// A recorded device failure (the first one): see [`Cuda::fail`].
#[derive(Clone, Debug)]
pub(super) struct Failure {
    out_of_memory: bool,
    /// False for a failure in the optimizer's update, which the step would not otherwise report
    /// (`Backend::recover_out_of_memory` leaves it: the update did not happen).
    recoverable: bool,
    message: String,
}

impl Cuda {
    /// Waits for every queued op; the first failure of any of them, or of an op before.
    pub fn synchronize(&self) -> Result<()> {
        self.status()?;
        let waited = self.0.stream.synchronize().map_err(|e| ("synchronize", e));
        // failures of asynchronous frees are recorded in the context rather than returned
        if let Err((what, e)) = waited.and_then(|()| self.0.ctx.check_err().map_err(|e| ("a queued operation", e))) {
            self.fail(device_error(what, e));
        }
        self.status()
    }

    /// Records a failure of an op that cannot return it (the first one is kept: later ones are
    /// usually its consequences). Every later op does nothing until the backend is dropped, or
    /// until [`Cuda::recover_out_of_memory_op`] forgets an out-of-memory failure.
    pub(super) fn fail(&self, e: Error) {
        self.record_failure(e, true)
    }

    /// [`Cuda::fail`] for a failure `recover_out_of_memory` must not forget (in an update).
    pub(super) fn fail_for_good(&self, e: Error) {
        self.record_failure(e, false)
    }

    fn record_failure(&self, e: Error, recoverable: bool) {
        let mut f = self.0.failure.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some(Failure { out_of_memory: matches!(e, Error::OutOfMemory(_)), recoverable, message: e.to_string() });
            self.0.failed.store(true, std::sync::atomic::Ordering::Release);
        }
    }

    pub(super) fn failed(&self) -> bool {
        self.0.failed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The recorded failure, if any, as an error: [`Error::OutOfMemory`] only for one the
    /// recovery forgets (an update's is an [`Error::Device`] that says so).
    pub(super) fn status(&self) -> Result<()> {
        if !self.failed() {
            return Ok(());
        }
        match self.0.failure.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            None => Ok(()),
            Some(f) if f.out_of_memory && f.recoverable => Err(Error::OutOfMemory(f.message.clone())),
            // not an `OutOfMemory`: `auto_find_batch_size` would retry a step whose update failed
            Some(f) if f.out_of_memory => Err(Error::Device(format!(
                "{} (in the optimizer's update, which does not run again with a smaller batch: the last checkpoint is as it was)",
                f.message
            ))),
            Some(f) => Err(Error::Device(f.message.clone())),
        }
    }

    /// `Backend::recover_out_of_memory`: waits for the queued ops, forgets a recorded
    /// out-of-memory failure (another, or one in an optimizer update, stays and is returned),
    /// and frees the held and spare copies, the weights' working copies and the grow-only
    /// scratch, so the retry starts with that memory free.
    pub(super) fn recover_out_of_memory_op(&self) -> crate::error::Result<()> {
        // the ops queued before the failure ran; one of them failing is not recoverable
        if let Err(e) = self.0.stream.synchronize() {
            return Err(device_error("synchronize", e));
        }
        {
            let mut failure = self.0.failure.lock().unwrap_or_else(|e| e.into_inner());
            if failure.as_ref().is_some_and(|f| !(f.out_of_memory && f.recoverable)) {
                drop(failure);
                return self.status();
            }
            *failure = None;
            self.0.failed.store(false, std::sync::atomic::Ordering::Release);
        }
        self.free_copies();
        // the grow-only scratch, sized for the batch that failed
        let mut guard = self.0.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let scratch = &mut *guard;
        let null16 = || self.0.stream.null::<u16>().map_err(|e| device_error("scratch", e));
        scratch.bf16 = [null16()?, null16()?, null16()?];
        for s in [&mut scratch.delta, &mut scratch.padded, &mut scratch.colsum] {
            *s = self.0.stream.null::<f32>().map_err(|e| device_error("scratch", e))?;
        }
        Ok(())
    }
}
