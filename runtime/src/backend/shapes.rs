//! Small types and constants the backend's ops share: collectives, the LoRA merge's parts,
//! an adapter's column block, and the sizes the device kernels are built around.

/// A collective over a device communicator ([`Backend::group_op`](crate::backend::Backend::group_op)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupOp {
    /// Every process's elements replaced by their sum over the processes (the same bits on each).
    Sum,
    /// The sum over the processes into this process's elements (the others' are left as they were).
    SumTo(usize),
    /// This process's elements copied into every process's.
    From(usize),
}

/// Logits one LM-head chunk holds on a GPU (512 MiB of f32; `Backend::logits_chunk_floats`). Each
/// chunk reads and writes the head's weight gradient once more: on an H200, GPT-2 124M at 8 x 1024
/// rows took 32.2 ms per step in 13 chunks of 640 rows, 30.9 ms in 4 of 2048 (docs/BENCHMARKS.md).
pub const DEVICE_LOGITS_CHUNK_FLOATS: usize = 1 << 27;

/// Rows per block of the GPU's deterministic column sums (bias, norm and DoRA magnitude gradients):
/// each block is summed from zero and the blocks' partials are added in order (kernels/common.cuh
/// `reduce_rows_partials`). The CPU's `cpu::math::reduce_rows` splits the rows into 16 blocks
/// instead, so the two agree to rounding, not bit for bit. (Moving the CPU to 32-row blocks as
/// well changed the addition example's training enough to spoil it: see docs/KERNELS.md.)
pub const REDUCE_BLOCK_ROWS: usize = 32;

/// The widest rows whose norm backward pass the CUDA backend makes in one kernel (dx and the
/// parameters' partials together; kernels/norm.cu `NORM_FUSED_COLS` x 256 threads).
pub const NORM_FUSED_WIDTH: usize = 2048;

/// One LoRA adapter of a merged weight ([`Backend::lora_merge`](crate::backend::Backend::lora_merge)): rows `off..off + cols` gain
/// `scale * b a`.
pub struct MergedPart<'a, T> {
    pub a: &'a T,
    pub b: &'a T,
    pub off: usize,
    pub cols: usize,
    pub r: usize,
    pub scale: f32,
}

/// Columns `off..off + width` of a `[rows, ld]` matrix: one adapter's share of a linear map's
/// output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColBlock {
    pub rows: usize,
    pub width: usize,
    pub ld: usize,
    pub off: usize,
}
