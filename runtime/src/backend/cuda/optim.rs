//! The optimizer's ops on the device: sums of squares for the gradient norm (a fixed grid, so
//! the order of the sum is too), the gradients zeroed in one launch, and the fused multi-tensor
//! AdamW step with its descriptor tables (uploaded once while the buffers keep their addresses).

use cudarc::driver::CudaSlice;

use super::{device_error, Cuda, Scratch, A, SUMSQ_BLOCKS};
use crate::backend::{AdamWArgs, AdamWStep, Backend};
use crate::error::Result;

/// Elements per block of the fused AdamW step (`ADAMW_CHUNK` in `kernels/adamw.cu`).
const ADAMW_CHUNK: usize = 8192;
/// Elements per block of `fill_multi_f32`.
const FILL_CHUNK: usize = 1 << 16;
/// The slots of [`Scratch::tables`].
const FILL_TABLE: usize = 0;
const SUMSQ_TABLE: usize = 1;

/// One tensor of the fused AdamW step, as `kernels/adamw.cu`'s `AdamWTensor`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct AdamWTensor {
    p: u64,
    g: u64,
    m: u64,
    v: u64,
    p_bf16: u64,
    n: i64,
    decay: i32,
    pad: i32,
}

// SAFETY: plain old data with the kernel's layout.
unsafe impl cudarc::driver::DeviceRepr for AdamWTensor {}

/// One block's share of the fused AdamW step, as `kernels/adamw.cu`'s `AdamWChunk`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct AdamWChunk {
    start: i64,
    end: i64,
    tensor: i32,
    pad: i32,
}

// SAFETY: plain old data with the kernel's layout.
unsafe impl cudarc::driver::DeviceRepr for AdamWChunk {}

/// The chunk table of the fused AdamW step: every tensor cut into `ADAMW_CHUNK`-element pieces.
fn adamw_chunks(tensors: &[AdamWTensor]) -> Vec<AdamWChunk> {
    let mut chunks = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        for start in (0..t.n).step_by(ADAMW_CHUNK) {
            chunks.push(AdamWChunk { start, end: (start + ADAMW_CHUNK as i64).min(t.n), tensor: i as i32, pad: 0 });
        }
    }
    chunks
}

/// The fused AdamW step's descriptor tables as last uploaded: the parameters, gradients and
/// moments keep their addresses from step to step, so the tables are uploaded once.
pub(super) struct AdamWTables {
    tensors: Vec<AdamWTensor>,
    dev_tensors: CudaSlice<AdamWTensor>,
    dev_chunks: CudaSlice<AdamWChunk>,
    n_chunks: usize,
}

impl Cuda {
    pub(super) fn sum_squares_op(&self, buf: &CudaSlice<f32>) -> Result<f64> {
        let scratch = self.0.scratch.lock().unwrap_or_else(|e| e.into_inner());
        self.launch("sum_squares_partial", (SUMSQ_BLOCKS as u32, 1, 1), (256, 1, 1), &[self.p(&scratch.partial), self.p(buf), A::L(buf.len() as i64)]);
        Ok(self.host(&scratch.partial)?[..SUMSQ_BLOCKS].iter().sum())
    }

    /// Every tensor's sum of squares: one launch (`sum_squares_multi_partial`, the partials of
    /// `sum_squares_partial` bit for bit) over a table of the tensors, kept while they stay the
    /// same (the gradients keep their addresses from step to step).
    pub(super) fn sum_squares_multi_op(&self, bufs: &[&CudaSlice<f32>]) -> Result<Vec<f64>> {
        let mut scratch = self.0.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let n = bufs.len() * SUMSQ_BLOCKS;
        if scratch.partial.len() < n {
            scratch.partial = self.alloc(n)?;
        }
        let base = self.ptr(&scratch.partial);
        if bufs.len() <= 65535 {
            let words = bufs.iter().flat_map(|b| [self.ptr(b), b.len() as u64]).collect();
            if let Some(table) = self.table(&mut scratch, SUMSQ_TABLE, words) {
                self.launch("sum_squares_multi_partial", (SUMSQ_BLOCKS as u32, bufs.len() as u32, 1), (256, 1, 1), &[A::P(base), A::P(table)]);
            }
        } else {
            for (i, b) in bufs.iter().enumerate() {
                let at = base + (i * SUMSQ_BLOCKS * std::mem::size_of::<f64>()) as u64;
                self.launch("sum_squares_partial", (SUMSQ_BLOCKS as u32, 1, 1), (256, 1, 1), &[A::P(at), self.p(b), A::L(b.len() as i64)]);
            }
        }
        let host = self.host(&scratch.partial)?;
        Ok(host[..n].chunks(SUMSQ_BLOCKS).map(|c| c.iter().sum()).collect())
    }

    /// Every buffer of `bufs` set to `value` in one launch (`fill_multi_f32`), over a table of
    /// chunks of at most [`FILL_CHUNK`] elements kept while the buffers stay the same.
    pub(super) fn fill_multi_op(&self, bufs: &mut [&mut CudaSlice<f32>], value: f32) {
        let mut words = Vec::new();
        for b in bufs.iter() {
            self.forget_weight(b);
            let p = self.ptr(b);
            for start in (0..b.len()).step_by(FILL_CHUNK) {
                words.extend([p + (start * std::mem::size_of::<f32>()) as u64, (b.len() - start).min(FILL_CHUNK) as u64]);
            }
        }
        let chunks = words.len() / 2;
        if chunks == 0 {
            return;
        }
        let mut scratch = self.0.scratch.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(table) = self.table(&mut scratch, FILL_TABLE, words) {
            self.launch("fill_multi_f32", (chunks as u32, 1, 1), (256, 1, 1), &[A::P(table), A::F(value)]);
        }
    }

    /// `Backend::adamw_range`: as the default (the range copied out, stepped and copied back: the
    /// kernel's 16-byte loads need aligned starts), with no working copy for the temporary, and
    /// the parameter's copy dropped (`copy_range` writes it).
    #[allow(clippy::too_many_arguments)] // adamw's operands and the range
    pub(super) fn adamw_range_op(
        &self,
        p: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        at: usize,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        hp: AdamWStep,
        decay: bool,
    ) -> Result<()> {
        let n = m.len();
        let (mut ps, mut gs) = (self.zeros(n)?, self.zeros(n)?);
        self.copy_range(&mut ps, 0, p, at, n);
        self.copy_range(&mut gs, 0, g, at, n);
        self.adamw_multi_op(&mut [(&mut ps, &gs, m, v, decay)], hp, false);
        self.copy_range(p, at, &ps, 0, n);
        self.status()
    }

    /// The device copy of `words` in table slot `slot` (uploaded unless it holds them already);
    /// `None` after a failure.
    fn table(&self, scratch: &mut Scratch, slot: usize, words: Vec<u64>) -> Option<u64> {
        let cached = &mut scratch.tables[slot];
        if cached.as_ref().is_none_or(|(w, _)| *w != words) {
            // the table this replaces may still be read by a queued launch
            self.synchronize().ok()?;
            match self.dev(&words) {
                Ok(d) => *cached = Some((words, d)),
                Err(e) => {
                    self.fail(e);
                    return None;
                }
            }
        }
        cached.as_ref().map(|(_, d)| self.ptr(d))
    }

    /// The fused AdamW step over `tensors`; `working_copies` (bf16 mode): it also writes each
    /// parameter's bf16 working copy (not for the temporary copy of a range, `adamw_range_op`,
    /// whose copy would outlive it).
    pub(super) fn adamw_multi_op(&self, tensors: &mut [AdamWArgs<'_, Self>], hp: AdamWStep, working_copies: bool) {
        let mut copies = self.0.weights16.lock().unwrap_or_else(|e| e.into_inner());
        let mut copy_of = |p: &CudaSlice<f32>| -> u64 {
            if !self.0.bf16 || !working_copies {
                return 0;
            }
            let key = self.ptr(p);
            if copies.get(&key).is_none_or(|c| c.len() != p.len()) {
                match self.alloc::<u16>(p.len()) {
                    Ok(c) => copies.insert(key, c),
                    // nothing runs after a failure, so the pointer is never used
                    Err(e) => {
                        self.fail_for_good(e);
                        return 0;
                    }
                };
            }
            copies.get(&key).map_or(0, |c| self.ptr(c))
        };
        let descs: Vec<AdamWTensor> = tensors
            .iter()
            .filter(|t| !t.0.is_empty())
            .map(|(p, g, m, v, decay)| AdamWTensor {
                p: self.ptr(p),
                g: self.ptr(g),
                m: self.ptr(m),
                v: self.ptr(v),
                p_bf16: copy_of(p),
                n: p.len() as i64,
                decay: *decay as i32,
                pad: 0,
            })
            .collect();
        if descs.is_empty() {
            return;
        }
        drop(copies);
        let mut scratch = self.0.scratch.lock().unwrap_or_else(|e| e.into_inner());
        if scratch.adamw.as_ref().is_none_or(|t| t.tensors != descs) {
            let chunks = adamw_chunks(&descs);
            // the tables these replace may still be read by a queued step
            if self.synchronize().is_err() {
                return;
            }
            match (self.dev(&descs), self.dev(&chunks)) {
                (Ok(dev_tensors), Ok(dev_chunks)) => scratch.adamw = Some(AdamWTables { dev_tensors, dev_chunks, n_chunks: chunks.len(), tensors: descs }),
                (Err(e), _) | (_, Err(e)) => return self.fail_for_good(e),
            }
        }
        let Some(tables) = scratch.adamw.as_ref() else {
            return self.fail_for_good(device_error("adamw_multi", "the descriptor tables are missing"));
        };
        let sc = hp.scalars();
        let args = [
            self.p(&tables.dev_tensors),
            self.p(&tables.dev_chunks),
            A::F(sc.step_size),
            A::F(sc.bc2_sqrt),
            A::F(sc.decay_mul),
            A::F(sc.w1),
            A::F(hp.beta2),
            A::F(sc.w2),
            A::F(hp.eps),
            A::F(hp.grad_scale),
        ];
        self.launch("adamw_multi", (tables.n_chunks as u32, 1, 1), (256, 1, 1), &args);
    }
}
