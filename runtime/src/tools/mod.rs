//! The tools of the command line that look across layers: `runtime cuda-check` (the CUDA
//! backend against the CPU, op by op and step by step), `runtime plugin check` and
//! `runtime plugin bench`. Like `main.rs`, this layer may import every other.

pub mod cuda_check;
pub mod gpu;
pub mod kernel_bench;
pub mod plugin_bench;
pub mod plugin_check;
pub mod seq2seq;
