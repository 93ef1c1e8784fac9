//! One optimizer step and what it owns: the model, its gradients and activations, AdamW's state
//! and the collective that would sum gradients across processes (a no-op in one process). The
//! trainer, `runtime bench`, `runtime plugin bench` and `runtime cuda-check` all step through
//! [`Step`], so what a step is is written once.

pub mod collective;
pub mod full_shard;
pub mod mpi;
#[cfg(feature = "mpi")]
mod mpi_buckets;
pub mod nccl;
pub mod optimizer;
pub mod shard;
pub mod step;

pub use collective::{Collective, SingleProcess};
pub use optimizer::{AdamW, AdamWConfig};
pub use step::{MicroLoss, MicroOptions, Step, StepReport};
