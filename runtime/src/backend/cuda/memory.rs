//! Copies between the host and the device, allocation (with the free memory in the error), and
//! the error of a failed device operation.

use cudarc::driver::CudaSlice;

use super::Cuda;
use crate::error::{Error, Result};

/// The error of a failed device operation: out of memory (with advice on what to lower) or any
/// other CUDA failure, naming the operation.
pub(super) fn device_error(what: &str, e: impl std::fmt::Debug) -> Error {
    let detail = format!("{e:?}");
    if detail.contains("OUT_OF_MEMORY") {
        Error::OutOfMemory(format!(
            "CUDA out of memory in {what} ({detail}): lower per_device_train_batch_size or per_device_eval_batch_size, \
             turn on gradient_checkpointing, or set auto_find_batch_size"
        ))
    } else {
        Error::Device(format!("CUDA failure in {what}: {detail}"))
    }
}

impl Cuda {
    pub(super) fn host<T: cudarc::driver::DeviceRepr + Default + Clone>(&self, buf: &CudaSlice<T>) -> Result<Vec<T>> {
        self.status()?;
        if buf.is_empty() {
            return Ok(Vec::new());
        }
        self.0.stream.clone_dtoh(buf).map_err(|e| device_error("download", e))
    }

    pub(super) fn dev<T: cudarc::driver::DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        self.status()?;
        if data.is_empty() {
            return self.0.stream.null::<T>().map_err(|e| device_error("upload", e));
        }
        self.0.stream.clone_htod(data).map_err(|e| device_error("upload", e))
    }

    pub(super) fn alloc<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.status()?;
        if n == 0 {
            return self.0.stream.null::<T>().map_err(|e| device_error("alloc", e));
        }
        self.0.stream.alloc_zeros::<T>(n).map_err(|e| {
            let (free, total) = self.0.ctx.mem_get_info().unwrap_or((0, 0));
            let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
            let bytes = n * std::mem::size_of::<T>();
            device_error(&format!("allocating {:.2} GiB ({:.2} GiB free of {:.2} GiB)", gib(bytes), gib(free), gib(total)), e)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::device_error;
    use crate::error::Error;

    #[test]
    fn a_device_failure_is_one_message_with_advice_when_out_of_memory() {
        let oom = device_error("allocating 3.00 GiB (0.50 GiB free of 80.00 GiB)", "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")");
        assert!(matches!(oom, Error::OutOfMemory(_)), "{oom:?}");
        let oom = oom.to_string();
        assert!(oom.starts_with("CUDA out of memory in allocating 3.00 GiB"), "{oom}");
        assert!(oom.contains("per_device_train_batch_size") && oom.contains("gradient_checkpointing"), "{oom}");
        let other = device_error("matmul", "CUBLAS_STATUS_EXECUTION_FAILED");
        assert!(matches!(other, Error::Device(_)), "{other:?}");
        assert_eq!(other.to_string(), "CUDA failure in matmul: \"CUBLAS_STATUS_EXECUTION_FAILED\"");
    }
}
