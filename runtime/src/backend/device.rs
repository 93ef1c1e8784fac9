//! Which backend a command runs on: `device` as transformers and accelerate spell it, and the
//! opened backend it selects.

use crate::error::Result;

/// Where a model runs: `device` as transformers and accelerate spell it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
    Auto,
}

impl Device {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cpu" => Some(Device::Cpu),
            "cuda" => Some(Device::Cuda),
            "auto" => Some(Device::Auto),
            _ => None,
        }
    }

    /// A short description of the device this choice gives here (for `inspect`): `cpu`, or the
    /// CUDA device's name; an error when `cuda` was asked for and none is usable.
    pub fn resolve(self) -> Result<String> {
        let cuda = |info: super::cuda::DeviceInfo| {
            format!("cuda:{} ({}, compute capability {}.{})", info.ordinal, info.name, info.compute_capability.0, info.compute_capability.1)
        };
        match self {
            Device::Cpu => Ok("cpu".into()),
            Device::Cuda => super::cuda::probe(0).map(cuda),
            Device::Auto => Ok(super::cuda::probe(0).map_or_else(|_| "cpu".into(), cuda)),
        }
    }

    /// Opens the backend: the CPU, or CUDA device 0 with its kernels compiled (`bf16`: mixed
    /// precision). `auto` takes CUDA when a device and its libraries are present and says why
    /// not otherwise; `cuda` with no usable device is an error that says what is missing.
    pub fn select(self, bf16: bool) -> Result<Selected> {
        match self {
            Device::Cpu => Ok(Selected::Cpu),
            Device::Cuda => Ok(Selected::Cuda(super::cuda::Cuda::new(0, bf16)?)),
            Device::Auto => match super::cuda::probe(0) {
                Ok(_) => Ok(Selected::Cuda(super::cuda::Cuda::new(0, bf16)?)),
                Err(why) => {
                    tracing::debug!("device auto: using the CPU ({why})");
                    Ok(Selected::Cpu)
                }
            },
        }
    }
}

/// An opened backend, as [`Device::select`] chose it.
pub enum Selected {
    Cpu,
    Cuda(super::cuda::Cuda),
}
