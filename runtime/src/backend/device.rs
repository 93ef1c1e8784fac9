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
    ///
    /// A process that a launcher started among several on its node takes device `local rank
    /// modulo the node's devices` (as torch's launchers do), so N processes spread over N GPUs.
    pub fn select(self, bf16: bool) -> Result<Selected> {
        let ordinal = || device_of(launcher_local_rank(), cudarc::driver::CudaContext::device_count().unwrap_or(1).max(1) as usize);
        match self {
            Device::Cpu => Ok(Selected::Cpu),
            Device::Cuda => {
                super::cuda::probe(0)?;
                Ok(Selected::Cuda(super::cuda::Cuda::new(ordinal(), bf16)?))
            }
            Device::Auto => match super::cuda::probe(0) {
                Ok(_) => Ok(Selected::Cuda(super::cuda::Cuda::new(ordinal(), bf16)?)),
                Err(why) => {
                    tracing::debug!("device auto: using the CPU ({why})");
                    Ok(Selected::Cpu)
                }
            },
        }
    }
}

/// This process's rank among those a launcher started on its node: MPICH's Hydra
/// (`MPI_LOCALRANKID`), Open MPI (`OMPI_COMM_WORLD_LOCAL_RANK`), Slurm (`SLURM_LOCALID`).
fn launcher_local_rank() -> Option<usize> {
    ["MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"].iter().find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
}

/// The CUDA device of the process of local rank `local` on a node with `count` devices.
fn device_of(local: Option<usize>, count: usize) -> usize {
    local.unwrap_or(0) % count.max(1)
}

/// An opened backend, as [`Device::select`] chose it.
pub enum Selected {
    Cpu,
    Cuda(super::cuda::Cuda),
}

pub use crate::mem::host_memory_budget;

#[cfg(test)]
mod tests {
    #[test]
    fn each_process_on_a_node_takes_its_local_rank_modulo_the_devices() {
        assert_eq!(super::device_of(None, 8), 0);
        assert_eq!(super::device_of(Some(3), 8), 3);
        assert_eq!(super::device_of(Some(5), 4), 1);
        assert_eq!(super::device_of(Some(2), 0), 0);
    }
}
