//! Deterministic column sums over rows (bias, norm and DoRA magnitude gradients): a kernel writes
//! each block of [`REDUCE_BLOCK_ROWS`] rows' partial sums (kernels/common.cuh
//! `reduce_rows_partials`), then `reduce_partials` adds them to the outputs in block order, as the
//! CPU's `math::reduce_rows` does.

use super::{Cuda, Scratch, A};
use crate::backend::REDUCE_BLOCK_ROWS;

impl Cuda {
    /// Runs the partials kernel `kernel` (its arguments: the partials buffer, then `args`) over
    /// `rows` rows of `c` columns, then adds the partials to `outs`: one output, or two when the
    /// second pointer is not 0 (the kernel is told the same count through `args`).
    pub(super) fn reduce_cols(&self, scratch: &mut Scratch, kernel: &str, outs: [u64; 2], (rows, c): (usize, usize), args: &[A]) {
        let nblocks = rows.div_ceil(REDUCE_BLOCK_ROWS);
        let grid = (c.div_ceil(32) as u32, nblocks.div_ceil(8).min(65535) as u32, 1);
        self.reduce_cols_launched(scratch, kernel, (grid, (32, 8, 1)), outs, (rows, c), args)
    }

    /// [`Cuda::reduce_cols`] with a partials kernel that takes one block of 256 threads per row
    /// block (the fused norm backward kernels, which also write each row's input gradient).
    pub(super) fn reduce_cols_per_row_block(&self, scratch: &mut Scratch, kernel: &str, outs: [u64; 2], (rows, c): (usize, usize), args: &[A]) {
        let grid = (rows.div_ceil(REDUCE_BLOCK_ROWS) as u32, 1, 1);
        self.reduce_cols_launched(scratch, kernel, (grid, (256, 1, 1)), outs, (rows, c), args)
    }

    #[allow(clippy::type_complexity)] // a launch's grid and block
    fn reduce_cols_launched(
        &self,
        scratch: &mut Scratch,
        kernel: &str,
        (grid, block): ((u32, u32, u32), (u32, u32, u32)),
        outs: [u64; 2],
        (rows, c): (usize, usize),
        args: &[A],
    ) {
        let nout = 1 + usize::from(outs[1] != 0);
        let nblocks = rows.div_ceil(REDUCE_BLOCK_ROWS);
        if nblocks == 0 || c == 0 {
            return;
        }
        let part = self.grown(&mut scratch.colsum, nblocks * nout * c);
        let mut a = vec![A::P(part)];
        a.extend_from_slice(args);
        self.launch(kernel, grid, block, &a);
        let sum = [A::P(outs[0]), A::P(outs[1]), A::P(part), A::I(nblocks as i32), A::I(nout as i32), A::I(c as i32)];
        self.launch("reduce_partials", (c.div_ceil(32) as u32, 1, 1), (32, 8, 1), &sum);
    }
}
