//! Finding a usable device before the first CUDA call: the driver, NVRTC and cuBLASLt libraries
//! load, and device `ordinal` exists (cudarc panics when a library is missing, so this checks
//! without calling into it first).

use cudarc::driver::CudaContext;

use crate::error::{Error, Result};

/// What [`probe`] found.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub memory_bytes: usize,
}

/// Checks, without panicking, that the CUDA driver, NVRTC and cuBLASLt libraries load and that
/// device `ordinal` exists. The error says what is missing.
pub fn probe(ordinal: usize) -> Result<DeviceInfo> {
    // SAFETY: these only try to dlopen the libraries under their usual names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::Device("no CUDA device/driver found: the CUDA driver library (libcuda.so) could not be loaded".into()));
    }
    let count = CudaContext::device_count().map_err(|e| Error::Device(format!("no CUDA device/driver found: the driver failed to start ({e:?})")))?;
    if count <= 0 {
        return Err(Error::Device("no CUDA device/driver found: the driver reports no device".into()));
    }
    if ordinal >= count as usize {
        return Err(Error::Device(format!("CUDA device {ordinal} does not exist (this machine has {count})")));
    }
    if !super::kernels::nvrtc_present() {
        return Err(Error::Device(super::kernels::NVRTC_MISSING.into()));
    }
    // SAFETY: as above.
    if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
        return Err(Error::Device(
            "the cuBLASLt library (libcublasLt.so.13) was not found: install the CUDA 13 toolkit or the `nvidia-cublas` wheel and put its lib \
             folder on LD_LIBRARY_PATH"
                .into(),
        ));
    }
    let ctx = CudaContext::new(ordinal).map_err(|e| Error::Device(format!("CUDA device {ordinal}: {e:?}")))?;
    let dev_err = |e| Error::Device(format!("CUDA device {ordinal}: {e:?}"));
    Ok(DeviceInfo {
        ordinal,
        name: ctx.name().map_err(dev_err)?,
        compute_capability: ctx.compute_capability().map_err(dev_err)?,
        memory_bytes: ctx.total_mem().map_err(dev_err)?,
    })
}
