//! The CUDA backend: the op set on an NVIDIA GPU through cudarc, with the kernels of `kernels/`
//! (compiled by NVRTC for the device at start) and cuBLASLt for matrix products.
//!
//! Buffers are f32 on the device, so the model code, the checkpoints and the CPU backend see the
//! same numbers. With `bf16` (HF's `bf16 = true`, mixed precision) the matrix products and the
//! attention read bf16 copies of their operands (rounded to nearest even) and accumulate in f32;
//! the weights the optimizer updates stay f32 (the master copy), as do the AdamW moments.
//!
//! cudarc loads the driver, NVRTC and cuBLASLt at run time, so this module builds and links on
//! machines with no GPU and no CUDA toolkit; [`probe`] checks the libraries and the device before
//! the first CUDA call (cudarc panics when a library is missing).
//!
//! Every op is queued on one stream; only `download` and the ops that return host values
//! (`cross_entropy`, `token_stats`, `sum_squares`) wait for it. A CUDA failure inside an op (a
//! kernel fault, the device running out of memory) ends the process with a message naming the
//! op: the trait's ops have no error path, and nothing downstream could use a half-done step.

pub mod blas;
pub mod kernels;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};

use super::{AdamWStep, AttnImpl, AttnShape, Backend, LossRows, StatGrads, StatsWanted, TokenStats};
use crate::error::{Error, Result};
use blas::{Gemm, Lt, Ty};

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
    if !kernels::nvrtc_present() {
        return Err(Error::Device(kernels::NVRTC_MISSING.into()));
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

/// A kernel argument.
#[derive(Clone, Copy)]
enum A {
    /// A device pointer (0 for "none").
    P(u64),
    I(i32),
    L(i64),
    F(f32),
}

/// Scratch buffers reused across ops (grow-only): bf16 copies of matrix-product and attention
/// operands, the attention backward's row sums, the squared-norm partials.
struct Scratch {
    bf16: [CudaSlice<u16>; 3],
    delta: CudaSlice<f32>,
    partial: CudaSlice<f64>,
    adamw: Option<AdamWTables>,
}

struct Inner {
    info: DeviceInfo,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    funcs: HashMap<String, CudaFunction>,
    lt: Lt,
    bf16: bool,
    /// `full_determinism`: the attention backward in bf16 mode uses the two-kernel form (dq and
    /// dk/dv apart, no atomics) instead of FlashAttention-2's single kernel with atomic dq.
    deterministic: std::sync::atomic::AtomicBool,
    scratch: Mutex<Scratch>,
    /// bf16 mode: the bf16 working copy of each parameter that the fused AdamW step writes, by
    /// the parameter's device address. See [`Cuda::weight_copy`] for when an entry is trusted.
    weights16: Mutex<HashMap<u64, CudaSlice<u16>>>,
    /// The first device failure of an op that cannot return it; sticky: every later op does
    /// nothing, and every op that returns a `Result` returns it.
    failure: Mutex<Option<Failure>>,
}

/// The CUDA backend; cloning it shares the device, the stream and the compiled kernels.
#[derive(Clone)]
pub struct Cuda(Arc<Inner>);

/// `sum_squares_partial`'s grid (fixed, so the sum's order is too).
const SUMSQ_BLOCKS: usize = 512;
/// Query and key rows per attention tile.
const ATTN_TILE: usize = 64;

/// The error of a failed device operation: out of memory (with advice on what to lower) or any
/// other CUDA failure, naming the operation.
fn device_error(what: &str, e: impl std::fmt::Debug) -> Error {
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

/// A recorded device failure (the first one): see [`Cuda::fail`].
#[derive(Clone, Debug)]
struct Failure {
    out_of_memory: bool,
    message: String,
}

impl Cuda {
    /// Opens device `ordinal`, compiles (or loads from the cache) every kernel for its
    /// architecture and creates the cuBLASLt handle.
    pub fn new(ordinal: usize, bf16: bool) -> Result<Self> {
        let info = probe(ordinal)?;
        let dev_err = |e| Error::Device(format!("CUDA device {ordinal}: {e:?}"));
        let ctx = CudaContext::new(ordinal).map_err(dev_err)?;
        // one stream: stream order is the only synchronisation the ops need
        // SAFETY: called before any buffer exists.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let arch = kernels::arch_name(info.compute_capability);
        let mut funcs = HashMap::new();
        for (stem, src) in kernels::SOURCES {
            let mut m = kernels::compile_cached(stem, src, &arch, false)?;
            let load = |m: &kernels::CachedModule| ctx.load_module(cudarc::nvrtc::Ptx::from_binary(m.cubin.clone()));
            let module = match load(&m) {
                // an entry the driver refuses is compiled afresh (and the cache entry replaced)
                Err(e) if m.from_cache => {
                    tracing::warn!("the cached device code of kernels/{stem}.cu does not load ({e:?}); compiling it again");
                    m = kernels::compile_cached(stem, src, &arch, true)?;
                    load(&m)
                }
                other => other,
            }
            .map_err(|e| Error::Device(format!("loading kernels/{stem}.cu on {}: {e:?}", info.name)))?;
            let names = m.names;
            for name in names {
                let f = module.load_function(&name).map_err(|e| Error::Device(format!("kernel `{name}`: {e:?}")))?;
                funcs.insert(name, f);
            }
        }
        let lt = Lt::new(&stream, 32 << 20).map_err(Error::Device)?;
        let null = || stream.null::<u16>().map_err(dev_err);
        let scratch = Scratch {
            bf16: [null()?, null()?, null()?],
            delta: stream.null::<f32>().map_err(dev_err)?,
            partial: stream.alloc_zeros::<f64>(SUMSQ_BLOCKS).map_err(dev_err)?,
            adamw: None,
        };
        Ok(Cuda(Arc::new(Inner {
            info,
            ctx,
            stream,
            funcs,
            lt,
            bf16,
            deterministic: std::sync::atomic::AtomicBool::new(false),
            scratch: Mutex::new(scratch),
            weights16: Mutex::new(HashMap::new()),
            failure: Mutex::new(None),
        })))
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.0.info
    }

    pub fn bf16(&self) -> bool {
        self.0.bf16
    }

    /// `full_determinism` (HF's name; off by default, as in transformers): with it, every op gives
    /// the same bits run after run. Without it, the tensor-core attention backward (bf16 mode,
    /// head dims 64 and 128) adds dq with atomics in FlashAttention-2's single backward kernel,
    /// which does 5 matrix products per tile instead of 7, and the order of the additions varies.
    /// Every other op is deterministic either way.
    pub fn set_deterministic(&self, on: bool) {
        self.0.deterministic.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn deterministic(&self) -> bool {
        self.0.deterministic.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes of device memory in use and in total.
    pub fn memory_used(&self) -> (usize, usize) {
        let (free, total) = self.0.ctx.mem_get_info().unwrap_or((0, 0));
        (total - free, total)
    }

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
    /// usually its consequences). Every later op does nothing until the backend is dropped.
    fn fail(&self, e: Error) {
        let mut f = self.0.failure.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some(Failure { out_of_memory: matches!(e, Error::OutOfMemory(_)), message: e.to_string() });
        }
    }

    fn failed(&self) -> bool {
        self.0.failure.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// The recorded failure, if any, as an error.
    fn status(&self) -> Result<()> {
        match self.0.failure.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            None => Ok(()),
            Some(f) if f.out_of_memory => Err(Error::OutOfMemory(f.message.clone())),
            Some(f) => Err(Error::Device(f.message.clone())),
        }
    }

    /// The device address of a buffer.
    fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        s.device_ptr(&self.0.stream).0
    }

    /// A buffer as a kernel argument.
    fn p<T>(&self, s: &CudaSlice<T>) -> A {
        A::P(self.ptr(s))
    }

    fn opt<T>(&self, s: Option<&CudaSlice<T>>) -> A {
        s.map_or(A::P(0), |s| self.p(s))
    }

    fn launch(&self, name: &str, grid: (u32, u32, u32), block: (u32, u32, u32), args: &[A]) {
        if self.failed() {
            return;
        }
        let Some(f) = self.0.funcs.get(name) else {
            return self.fail(device_error(name, "the kernel is missing from the compiled modules"));
        };
        let mut b = self.0.stream.launch_builder(f);
        for a in args {
            match a {
                A::P(p) => b.arg(p),
                A::I(v) => b.arg(v),
                A::L(v) => b.arg(v),
                A::F(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig { grid_dim: grid, block_dim: block, shared_mem_bytes: 0 };
        // SAFETY: each call site passes the arguments of the kernel's signature in kernels/*.cu,
        // with buffers of the sizes the op's contract gives.
        if let Err(e) = unsafe { b.launch(cfg) } {
            self.fail(device_error(name, e));
        }
    }

    /// An elementwise kernel over `n` items: block 256, grid-stride.
    fn launch_n(&self, name: &str, n: usize, args: &[A]) {
        let blocks = n.div_ceil(256).clamp(1, 65535) as u32;
        self.launch(name, (blocks, 1, 1), (256, 1, 1), args)
    }

    /// Rounds `src` to bf16 into scratch slot `slot` (grown as needed); returns its pointer.
    fn bf16_copy(&self, scratch: &mut Scratch, slot: usize, src: &CudaSlice<f32>) -> u64 {
        let n = src.len();
        if scratch.bf16[slot].len() < n {
            match self.alloc::<u16>(n) {
                Ok(b) => scratch.bf16[slot] = b,
                // nothing runs after a failure, so the pointer is never used
                Err(e) => {
                    self.fail(e);
                    return 0;
                }
            }
        }
        let dst = self.ptr(&scratch.bf16[slot]);
        self.launch_n("cast_f32_bf16", n, &[A::P(dst), self.p(src), A::L(n as i64)]);
        dst
    }

    /// The bf16 working copy of a parameter, when the last write to it was the fused AdamW step.
    ///
    /// An entry is written by `adamw_multi` together with its parameter. Any other write drops it:
    /// `copy`, `fill` and `scale` drop their destination's entry, and `zeros` and `upload` drop
    /// every entry, because they are how a parameter buffer comes to exist and a new buffer may
    /// reuse a freed parameter's address. The copy equals what the cast kernel would produce
    /// (both round to nearest even), so a hit changes the speed, never the numbers.
    fn weight_copy(&self, w: &CudaSlice<f32>) -> Option<u64> {
        let map = self.0.weights16.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&self.ptr(w)).filter(|c| c.len() == w.len()).map(|c| self.ptr(c))
    }

    fn forget_weight(&self, buf: &CudaSlice<f32>) {
        if self.0.bf16 {
            self.0.weights16.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.ptr(buf));
        }
    }

    fn forget_all_weights(&self) {
        if self.0.bf16 {
            self.0.weights16.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }

    /// The operand pointers for a product: the f32 buffers, or bf16 copies in bf16 mode (the
    /// weight's working copy when there is one: `weight` is the index of the weight operand).
    fn operands<const N: usize>(&self, scratch: &mut Scratch, bufs: [&CudaSlice<f32>; N], weight: usize) -> ([u64; N], Ty) {
        let mut out = [0u64; N];
        for (i, b) in bufs.iter().enumerate() {
            out[i] = if self.0.bf16 {
                match (i == weight).then(|| self.weight_copy(b)).flatten() {
                    Some(p) => p,
                    None => self.bf16_copy(scratch, i, b),
                }
            } else {
                self.ptr(b)
            };
        }
        (out, if self.0.bf16 { Ty::Bf16 } else { Ty::F32 })
    }

    fn gemm(&self, g: Gemm) {
        if self.failed() {
            return;
        }
        // SAFETY: the callers derive every pointer and leading dimension from buffers whose sizes
        // the op's contract fixes.
        if let Err(e) = unsafe { self.0.lt.gemm(&self.0.stream, &g) } {
            self.fail(device_error("matmul", e));
        }
    }

    /// The attention kernels' instantiation for a head dim: `_d32`, `_d64` or `_d128`.
    /// Above 128 is a failure (`check_head_dim` refuses such a model before any op runs).
    fn head_dim_suffix(&self, d: usize) -> &'static str {
        match d {
            0..=32 => "d32",
            33..=64 => "d64",
            65..=128 => "d128",
            _ => {
                self.fail(device_error("attention", format!("head dim {d} is above 128, the largest the kernels support")));
                "d128"
            }
        }
    }

    /// The qkv operand of the attention kernels (f32, or a bf16 copy) and the kernels' type name.
    fn attn_qkv(&self, scratch: &mut Scratch, qkv: &CudaSlice<f32>) -> (u64, &'static str) {
        if self.0.bf16 {
            (self.bf16_copy(scratch, 0, qkv), "bf16")
        } else {
            (self.ptr(qkv), "f32")
        }
    }

    /// The attention kernels for a shape: name suffix, and per kernel (forward, dq, dk/dv) the
    /// rows per block and the threads per block. In bf16 mode, head dims 64 and 128 take the
    /// tensor-core kernels of `kernels/attention_tc.cu`; everything else the tiled FMA kernels of
    /// `kernels/attention.cu` (64 rows, 128 threads).
    fn attn_kernels(&self, ty: &str, head_dim: usize) -> (String, [(usize, u32); 3]) {
        match (self.0.bf16, head_dim) {
            (true, 64) => ("tc_d64".into(), [(128, 128), (128, 256), (64, 128)]),
            (true, 128) => ("tc_d128".into(), [(128, 256), (128, 256), (64, 128)]),
            _ => (format!("{ty}_{}", self.head_dim_suffix(head_dim)), [(ATTN_TILE, 128); 3]),
        }
    }

    fn shape_args(s: AttnShape) -> [A; 5] {
        [A::I(s.batch as i32), A::I(s.seq as i32), A::I(s.n_head as i32), A::I(s.n_kv_head as i32), A::I(s.head_dim as i32)]
    }

    fn host<T: cudarc::driver::DeviceRepr + Default + Clone>(&self, buf: &CudaSlice<T>) -> Result<Vec<T>> {
        self.status()?;
        if buf.is_empty() {
            return Ok(Vec::new());
        }
        self.0.stream.clone_dtoh(buf).map_err(|e| device_error("download", e))
    }

    fn dev<T: cudarc::driver::DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        self.status()?;
        if data.is_empty() {
            return self.0.stream.null::<T>().map_err(|e| device_error("upload", e));
        }
        self.0.stream.clone_htod(data).map_err(|e| device_error("upload", e))
    }

    fn alloc<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
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

/// Elements per block of the fused AdamW step (`ADAMW_CHUNK` in `kernels/adamw.cu`).
const ADAMW_CHUNK: usize = 8192;

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
struct AdamWTables {
    tensors: Vec<AdamWTensor>,
    dev_tensors: CudaSlice<AdamWTensor>,
    dev_chunks: CudaSlice<AdamWChunk>,
    n_chunks: usize,
}

impl Backend for Cuda {
    type Buf = CudaSlice<f32>;
    type Ids = CudaSlice<i32>;

    fn name(&self) -> &'static str {
        "cuda"
    }
    fn zeros(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.forget_all_weights();
        self.alloc(n)
    }
    fn upload(&self, data: &[f32]) -> Result<CudaSlice<f32>> {
        self.forget_all_weights();
        self.dev(data)
    }
    fn upload_ids(&self, data: &[i32]) -> Result<CudaSlice<i32>> {
        self.dev(data)
    }
    fn download(&self, buf: &CudaSlice<f32>) -> Result<Vec<f32>> {
        self.host(buf)
    }
    fn len(&self, buf: &CudaSlice<f32>) -> usize {
        buf.len()
    }
    fn fill(&self, buf: &mut CudaSlice<f32>, value: f32) {
        self.forget_weight(buf);
        self.launch_n("fill_f32", buf.len(), &[self.p(buf), A::F(value), A::L(buf.len() as i64)]);
    }
    fn copy(&self, dst: &mut CudaSlice<f32>, src: &CudaSlice<f32>) {
        self.forget_weight(dst);
        if !src.is_empty() && !self.failed() {
            if let Err(e) = self.0.stream.memcpy_dtod(src, dst) {
                self.fail(device_error("copy", e));
            }
        }
    }
    fn copy_range(&self, dst: &mut CudaSlice<f32>, dst_off: usize, src: &CudaSlice<f32>, src_off: usize, n: usize) {
        self.forget_weight(dst);
        if n > 0 && !self.failed() {
            let (from, mut to) = (src.slice(src_off..src_off + n), dst.slice_mut(dst_off..dst_off + n));
            if let Err(e) = self.0.stream.memcpy_dtod(&from, &mut to) {
                self.fail(device_error("copy_range", e));
            }
        }
    }

    fn embedding_fwd(&self, out: &mut CudaSlice<f32>, ids: &CudaSlice<i32>, wte: &CudaSlice<f32>, wpe: Option<(&CudaSlice<f32>, &CudaSlice<i32>)>, c: usize) {
        let rows = ids.len();
        let args = [self.p(out), self.p(ids), self.p(wte), self.opt(wpe.map(|w| w.0)), self.opt(wpe.map(|w| w.1)), A::I(rows as i32), A::I(c as i32)];
        self.launch("embedding_fwd", (rows as u32, 1, 1), (256, 1, 1), &args);
    }
    fn embedding_bwd(
        &self,
        dwte: &mut CudaSlice<f32>,
        dwpe: Option<(&mut CudaSlice<f32>, &CudaSlice<i32>)>,
        ids: &CudaSlice<i32>,
        dout: &CudaSlice<f32>,
        c: usize,
    ) {
        let rows = ids.len();
        let grid = (c.div_ceil(256) as u32, 1, 1);
        self.launch("embedding_bwd", grid, (256, 1, 1), &[self.p(dwte), self.p(ids), self.p(dout), A::I(rows as i32), A::I(c as i32)]);
        if let Some((dwpe, pos)) = dwpe {
            self.launch("embedding_bwd", grid, (256, 1, 1), &[self.p(dwpe), self.p(pos), self.p(dout), A::I(rows as i32), A::I(c as i32)]);
        }
    }

    fn layernorm_fwd(
        &self,
        out: &mut CudaSlice<f32>,
        mean: &mut CudaSlice<f32>,
        rstd: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        b: Option<&CudaSlice<f32>>,
        c: usize,
        eps: f32,
    ) {
        let rows = x.len() / c;
        let args = [self.p(out), self.p(mean), self.p(rstd), self.p(x), self.p(w), self.opt(b), A::I(rows as i32), A::I(c as i32), A::F(eps)];
        self.launch("layernorm_fwd", (rows as u32, 1, 1), (256, 1, 1), &args);
    }
    fn layernorm_bwd(
        &self,
        dx: &mut CudaSlice<f32>,
        dw: &mut CudaSlice<f32>,
        db: Option<&mut CudaSlice<f32>>,
        dout: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        mean: &CudaSlice<f32>,
        rstd: &CudaSlice<f32>,
        c: usize,
    ) {
        let rows = x.len() / c;
        let (r, ci) = (A::I(rows as i32), A::I(c as i32));
        self.launch("layernorm_bwd_dx", (rows as u32, 1, 1), (256, 1, 1), &[self.p(dx), self.p(dout), self.p(x), self.p(w), self.p(mean), self.p(rstd), r, ci]);
        let args = [self.p(dw), self.opt(db.map(|d| &*d)), self.p(dout), self.p(x), self.p(mean), self.p(rstd), r, ci];
        self.launch("layernorm_bwd_params", (c.div_ceil(32) as u32, 1, 1), (32, 8, 1), &args);
    }
    fn rmsnorm_fwd(&self, out: &mut CudaSlice<f32>, rstd: &mut CudaSlice<f32>, x: &CudaSlice<f32>, w: &CudaSlice<f32>, c: usize, eps: f32) {
        let rows = x.len() / c;
        let args = [self.p(out), self.p(rstd), self.p(x), self.p(w), A::I(rows as i32), A::I(c as i32), A::F(eps)];
        self.launch("rmsnorm_fwd", (rows as u32, 1, 1), (256, 1, 1), &args);
    }
    fn rmsnorm_bwd(
        &self,
        dx: &mut CudaSlice<f32>,
        dw: &mut CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        rstd: &CudaSlice<f32>,
        c: usize,
    ) {
        let rows = x.len() / c;
        let (r, ci) = (A::I(rows as i32), A::I(c as i32));
        self.launch("rmsnorm_bwd_dx", (rows as u32, 1, 1), (256, 1, 1), &[self.p(dx), self.p(dout), self.p(x), self.p(w), self.p(rstd), r, ci]);
        self.launch("rmsnorm_bwd_params", (c.div_ceil(32) as u32, 1, 1), (32, 8, 1), &[self.p(dw), self.p(dout), self.p(x), self.p(rstd), r, ci]);
    }

    fn matmul_fwd(&self, out: &mut CudaSlice<f32>, inp: &CudaSlice<f32>, w: &CudaSlice<f32>, bias: Option<&CudaSlice<f32>>, n: usize, k: usize, m: usize) {
        let mut scratch = self.0.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let ([w_p, inp_p], ty) = self.operands(&mut scratch, [w, inp], 0);
        let (m64, n64, k64) = (m as u64, n as u64, k as u64);
        let bias = bias.map(|b| self.ptr(b));
        let d = self.ptr(out);
        self.gemm(Gemm {
            transa: true,
            transb: false,
            m: m64,
            n: n64,
            k: k64,
            a: w_p,
            lda: k as i64,
            b: inp_p,
            ldb: k as i64,
            d,
            ldd: m as i64,
            ty,
            beta: 0.0,
            bias,
        });
    }
    fn matmul_bwd(
        &self,
        dinp: Option<&mut CudaSlice<f32>>,
        dw: Option<&mut CudaSlice<f32>>,
        dbias: Option<&mut CudaSlice<f32>>,
        dout: &CudaSlice<f32>,
        inp: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        n: usize,
        k: usize,
        m: usize,
    ) {
        let mut scratch = self.0.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let ([dout_p, w_p, inp_p], ty) = self.operands(&mut scratch, [dout, w, inp], 1);
        let (m64, n64, k64) = (m as u64, n as u64, k as u64);
        if let Some(dinp) = dinp {
            let d = self.ptr(dinp);
            self.gemm(Gemm {
                transa: false,
                transb: false,
                m: k64,
                n: n64,
                k: m64,
                a: w_p,
                lda: k as i64,
                b: dout_p,
                ldb: m as i64,
                d,
                ldd: k as i64,
                ty,
                beta: 0.0,
                bias: None,
            });
        }
        if let Some(dw) = dw {
            let d = self.ptr(dw);
            self.gemm(Gemm {
                transa: false,
                transb: true,
                m: k64,
                n: m64,
                k: n64,
                a: inp_p,
                lda: k as i64,
                b: dout_p,
                ldb: m as i64,
                d,
                ldd: k as i64,
                ty,
                beta: 1.0,
                bias: None,
            });
        }
        if let Some(db) = dbias {
            self.launch("colsum_acc", (m.div_ceil(32) as u32, 1, 1), (32, 8, 1), &[self.p(db), self.p(dout), A::I(n as i32), A::I(m as i32)]);
        }
    }

    fn attention_fwd(
        &self,
        out: &mut CudaSlice<f32>,
        stats: &mut CudaSlice<f32>,
        qkv: &CudaSlice<f32>,
        key_mask: &CudaSlice<i32>,
        shape: AttnShape,
        _imp: AttnImpl,
    ) {
        // both implementations run the tiled kernel on the GPU; with `eager` the statistics
        // buffer is larger than needed and only its first `batch * n_head * seq` values are used
        let mut scratch = self.0.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let (q, ty) = self.attn_qkv(&mut scratch, qkv);
        let (suffix, [(rows, threads), _, _]) = self.attn_kernels(ty, shape.head_dim);
        let mut args = vec![self.p(out), self.p(stats), A::P(q), self.p(key_mask)];
        args.extend(Self::shape_args(shape));
        let grid = (shape.seq.div_ceil(rows) as u32, shape.n_head as u32, shape.batch as u32);
        self.launch(&format!("attention_fwd_{suffix}"), grid, (threads, 1, 1), &args);
    }
    fn attention_bwd(
        &self,
        dqkv: &mut CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        qkv: &CudaSlice<f32>,
        out: &CudaSlice<f32>,
        stats: &CudaSlice<f32>,
        key_mask: &CudaSlice<i32>,
        shape: AttnShape,
        _imp: AttnImpl,
    ) {
        let mut scratch = self.0.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let n_delta = shape.batch * shape.n_head * shape.seq;
        if scratch.delta.len() < n_delta {
            match self.alloc(n_delta) {
                Ok(b) => scratch.delta = b,
                Err(e) => return self.fail(e),
            }
        }
        let delta = self.ptr(&scratch.delta);
        let (b, t, h, d) = (shape.batch as i32, shape.seq as i32, shape.n_head as i32, shape.head_dim as i32);
        self.launch(
            "attention_bwd_delta",
            (shape.seq as u32, shape.n_head as u32, shape.batch as u32),
            (32, 1, 1),
            &[A::P(delta), self.p(dout), self.p(out), A::I(b), A::I(t), A::I(h), A::I(d)],
        );
        let (q, ty) = self.attn_qkv(&mut scratch, qkv);
        let (suffix, [_, (dq_rows, dq_threads), (kv_rows, kv_threads)]) = self.attn_kernels(ty, shape.head_dim);
        let mut args = vec![self.p(dqkv), self.p(dout), A::P(q), self.p(stats), A::P(delta), self.p(key_mask)];
        args.extend(Self::shape_args(shape));
        let (h, kv, b) = (shape.n_head as u32, shape.n_kv_head as u32, shape.batch as u32);
        if suffix.starts_with("tc_") && !self.deterministic() {
            // one kernel: dk, dv written, dq added atomically into zeroed query columns
            self.fill(dqkv, 0.0);
            self.launch(&format!("attention_bwd_dkdvq_{suffix}"), (shape.seq.div_ceil(kv_rows) as u32, kv, b), (kv_threads, 1, 1), &args);
            return;
        }
        self.launch(&format!("attention_bwd_dq_{suffix}"), (shape.seq.div_ceil(dq_rows) as u32, h, b), (dq_threads, 1, 1), &args);
        self.launch(&format!("attention_bwd_dkdv_{suffix}"), (shape.seq.div_ceil(kv_rows) as u32, kv, b), (kv_threads, 1, 1), &args);
    }
    fn kv_append(&self, k_cache: &mut CudaSlice<f32>, v_cache: &mut CudaSlice<f32>, qkv: &CudaSlice<f32>, slot: usize, shape: AttnShape, max_len: usize) {
        let mut args = vec![self.p(k_cache), self.p(v_cache), self.p(qkv), A::I(slot as i32)];
        args.extend(Self::shape_args(shape));
        args.push(A::I(max_len as i32));
        self.launch("kv_append", (shape.rows() as u32, 1, 1), (128, 1, 1), &args);
    }
    fn attention_decode(
        &self,
        out: &mut CudaSlice<f32>,
        qkv: &CudaSlice<f32>,
        k_cache: &CudaSlice<f32>,
        v_cache: &CudaSlice<f32>,
        key_mask: &CudaSlice<i32>,
        slot: usize,
        shape: AttnShape,
        max_len: usize,
    ) {
        let args = [
            self.p(out),
            self.p(qkv),
            self.p(k_cache),
            self.p(v_cache),
            self.p(key_mask),
            A::I(slot as i32),
            A::I(shape.batch as i32),
            A::I(shape.n_head as i32),
            A::I(shape.n_kv_head as i32),
            A::I(shape.head_dim as i32),
            A::I(max_len as i32),
        ];
        self.launch("attention_decode", (shape.n_head as u32, shape.batch as u32, 1), (128, 1, 1), &args);
    }
    fn rope(&self, qkv: &mut CudaSlice<f32>, positions: &CudaSlice<i32>, shape: AttnShape, theta: f32, inverse: bool) {
        let args = [
            self.p(qkv),
            self.p(positions),
            A::I(shape.rows() as i32),
            A::I(shape.n_head as i32),
            A::I(shape.n_kv_head as i32),
            A::I(shape.head_dim as i32),
            A::F(theta),
            A::I(inverse as i32),
        ];
        self.launch("rope", (shape.rows() as u32, 1, 1), (128, 1, 1), &args);
    }

    fn gelu_fwd(&self, out: &mut CudaSlice<f32>, x: &CudaSlice<f32>) {
        self.launch_n("gelu_fwd", x.len(), &[self.p(out), self.p(x), A::L(x.len() as i64)]);
    }
    fn gelu_bwd(&self, dx: &mut CudaSlice<f32>, x: &CudaSlice<f32>, dout: &CudaSlice<f32>) {
        self.launch_n("gelu_bwd", x.len(), &[self.p(dx), self.p(x), self.p(dout), A::L(x.len() as i64)]);
    }
    fn swiglu_fwd(&self, out: &mut CudaSlice<f32>, x: &CudaSlice<f32>, i: usize) {
        let rows = x.len() / (2 * i);
        self.launch_n("swiglu_fwd", rows * i, &[self.p(out), self.p(x), A::L(rows as i64), A::I(i as i32)]);
    }
    fn swiglu_bwd(&self, dx: &mut CudaSlice<f32>, x: &CudaSlice<f32>, dout: &CudaSlice<f32>, i: usize) {
        let rows = x.len() / (2 * i);
        self.launch_n("swiglu_bwd", rows * i, &[self.p(dx), self.p(x), self.p(dout), A::L(rows as i64), A::I(i as i32)]);
    }
    fn add(&self, out: &mut CudaSlice<f32>, a: &CudaSlice<f32>, b: &CudaSlice<f32>) {
        self.launch_n("add_f32", a.len(), &[self.p(out), self.p(a), self.p(b), A::L(a.len() as i64)]);
    }

    fn cross_entropy(&self, logits: &mut CudaSlice<f32>, targets: &CudaSlice<i32>, v: usize, smoothing: f32, grad_scale: Option<f32>) -> Result<LossRows> {
        let mut loss: CudaSlice<f32> = self.alloc(targets.len())?;
        self.cross_entropy_into(logits, targets, v, smoothing, grad_scale, &mut loss, 0);
        let n_targets = self.host(targets)?.iter().filter(|&&t| t != super::IGNORE_INDEX).count();
        Ok(LossRows { loss: self.host(&loss)?, n_targets })
    }
    fn cross_entropy_into(
        &self,
        logits: &mut CudaSlice<f32>,
        targets: &CudaSlice<i32>,
        v: usize,
        smoothing: f32,
        grad_scale: Option<f32>,
        loss: &mut CudaSlice<f32>,
        row0: usize,
    ) {
        let rows = targets.len();
        if rows == 0 {
            return;
        }
        assert!(row0 + rows <= loss.len(), "cross_entropy_into: {rows} losses from row {row0} do not fit in {}", loss.len());
        let args = [
            self.p(logits),
            A::P(self.ptr(loss) + (row0 * std::mem::size_of::<f32>()) as u64),
            self.p(targets),
            A::I(rows as i32),
            A::I(v as i32),
            A::F(smoothing),
            A::F(grad_scale.unwrap_or(0.0)),
            A::I(grad_scale.is_some() as i32),
        ];
        self.launch("cross_entropy", (rows as u32, 1, 1), (512, 1, 1), &args);
    }

    fn token_stats(&self, logits: &CudaSlice<f32>, targets: &CudaSlice<i32>, v: usize, want: StatsWanted) -> Result<TokenStats> {
        let rows = targets.len();
        let needs_lse = want.label_logprob || want.logsumexp || want.mean_logprob || want.entropy;
        let buf = |on: bool| on.then(|| self.alloc::<f32>(rows)).transpose();
        let (lp, lse, mlp, ent, rlse, rmz) =
            (buf(want.label_logprob)?, buf(want.logsumexp)?, buf(want.mean_logprob)?, buf(want.entropy)?, buf(needs_lse)?, buf(want.entropy)?);
        let am = want.argmax.then(|| self.alloc::<i32>(rows)).transpose()?;
        let args = [
            self.opt(lp.as_ref()),
            self.opt(lse.as_ref()),
            self.opt(mlp.as_ref()),
            self.opt(ent.as_ref()),
            self.opt(am.as_ref()),
            self.opt(rlse.as_ref()),
            self.opt(rmz.as_ref()),
            self.p(logits),
            self.p(targets),
            A::I(rows as i32),
            A::I(v as i32),
        ];
        self.launch("token_stats", (rows as u32, 1, 1), (512, 1, 1), &args);
        let get = |b: Option<CudaSlice<f32>>| b.map(|b| self.host(&b)).transpose().map(Option::unwrap_or_default);
        Ok(TokenStats {
            label_logprob: get(lp)?,
            logsumexp: get(lse)?,
            mean_logprob: get(mlp)?,
            entropy: get(ent)?,
            argmax: am.map(|b| self.host(&b)).transpose()?.map(|a| a.into_iter().map(|x| x as u32).collect()).unwrap_or_default(),
            row_lse: get(rlse)?,
            row_mean_z: get(rmz)?,
        })
    }
    fn token_stats_bwd(&self, logits: &mut CudaSlice<f32>, targets: &CudaSlice<i32>, v: usize, stats: &TokenStats, grads: &StatGrads) {
        let rows = targets.len();
        let up = |x: &Vec<f32>| (!x.is_empty()).then(|| self.dev(x)).transpose();
        let uploaded = (|| {
            Ok::<_, Error>((
                (up(&stats.row_lse)?, up(&stats.row_mean_z)?),
                (up(&grads.label_logprob)?, up(&grads.logsumexp)?, up(&grads.mean_logprob)?, up(&grads.entropy)?),
            ))
        })();
        let ((rlse, rmz), (g_lp, g_lse, g_mlp, g_h)) = match uploaded {
            Ok(u) => u,
            Err(e) => return self.fail(e),
        };
        let args = [
            self.p(logits),
            self.p(targets),
            self.opt(rlse.as_ref()),
            self.opt(rmz.as_ref()),
            self.opt(g_lp.as_ref()),
            self.opt(g_lse.as_ref()),
            self.opt(g_mlp.as_ref()),
            self.opt(g_h.as_ref()),
            A::I(rows as i32),
            A::I(v as i32),
        ];
        self.launch("token_stats_bwd", (rows as u32, 1, 1), (512, 1, 1), &args);
    }

    fn sum_squares(&self, buf: &CudaSlice<f32>) -> Result<f64> {
        let scratch = self.0.scratch.lock().unwrap_or_else(|e| e.into_inner());
        self.launch("sum_squares_partial", (SUMSQ_BLOCKS as u32, 1, 1), (256, 1, 1), &[self.p(&scratch.partial), self.p(buf), A::L(buf.len() as i64)]);
        Ok(self.host(&scratch.partial)?[..SUMSQ_BLOCKS].iter().sum())
    }
    fn sum_squares_multi(&self, bufs: &[&CudaSlice<f32>]) -> Result<Vec<f64>> {
        let mut scratch = self.0.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let n = bufs.len() * SUMSQ_BLOCKS;
        if scratch.partial.len() < n {
            scratch.partial = self.alloc(n)?;
        }
        let base = self.ptr(&scratch.partial);
        for (i, b) in bufs.iter().enumerate() {
            let at = base + (i * SUMSQ_BLOCKS * std::mem::size_of::<f64>()) as u64;
            self.launch("sum_squares_partial", (SUMSQ_BLOCKS as u32, 1, 1), (256, 1, 1), &[A::P(at), self.p(b), A::L(b.len() as i64)]);
        }
        let host = self.host(&scratch.partial)?;
        Ok(host[..n].chunks(SUMSQ_BLOCKS).map(|c| c.iter().sum()).collect())
    }
    fn scale(&self, buf: &mut CudaSlice<f32>, s: f32) {
        self.forget_weight(buf);
        self.launch_n("scale_f32", buf.len(), &[self.p(buf), A::F(s), A::L(buf.len() as i64)]);
    }
    fn adamw(&self, p: &mut CudaSlice<f32>, g: &CudaSlice<f32>, m: &mut CudaSlice<f32>, v: &mut CudaSlice<f32>, hp: AdamWStep, decay: bool) {
        self.adamw_multi(&mut [(p, g, m, v, decay)], hp);
    }
    fn adamw_multi(&self, tensors: &mut [super::AdamWArgs<'_, Self>], hp: AdamWStep) {
        // bf16 mode: the step also writes each parameter's bf16 working copy
        let mut copies = self.0.weights16.lock().unwrap_or_else(|e| e.into_inner());
        let mut copy_of = |p: &CudaSlice<f32>| -> u64 {
            if !self.0.bf16 {
                return 0;
            }
            let key = self.ptr(p);
            if copies.get(&key).is_none_or(|c| c.len() != p.len()) {
                match self.alloc::<u16>(p.len()) {
                    Ok(c) => copies.insert(key, c),
                    // nothing runs after a failure, so the pointer is never used
                    Err(e) => {
                        self.fail(e);
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
                (Err(e), _) | (_, Err(e)) => return self.fail(e),
            }
        }
        let Some(tables) = scratch.adamw.as_ref() else {
            return self.fail(device_error("adamw_multi", "the descriptor tables are missing"));
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

    fn check_head_dim(&self, head_dim: usize) -> std::result::Result<(), String> {
        if head_dim > 128 {
            return Err(format!("head dim {head_dim}: the CUDA attention kernels support head dims up to 128"));
        }
        Ok(())
    }
    fn synchronize(&self) -> Result<()> {
        Cuda::synchronize(self)
    }
    fn free_memory(&self) -> Option<u128> {
        self.0.ctx.mem_get_info().ok().map(|(free, _)| free as u128)
    }
}

/// Every kernel name this backend launches (the test suite checks that the compiled modules
/// export each of them, so a renamed kernel fails on machines without a GPU too).
pub fn required_kernels() -> Vec<String> {
    let mut names: Vec<String> = [
        "fill_f32",
        "scale_f32",
        "add_f32",
        "cast_f32_bf16",
        "gelu_fwd",
        "gelu_bwd",
        "swiglu_fwd",
        "swiglu_bwd",
        "colsum_acc",
        "sum_squares_partial",
        "embedding_fwd",
        "embedding_bwd",
        "layernorm_fwd",
        "layernorm_bwd_dx",
        "layernorm_bwd_params",
        "rmsnorm_fwd",
        "rmsnorm_bwd_dx",
        "rmsnorm_bwd_params",
        "rope",
        "attention_bwd_delta",
        "kv_append",
        "attention_decode",
        "cross_entropy",
        "token_stats",
        "token_stats_bwd",
        "adamw_multi",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    names.extend(["attention_bwd_dkdvq_tc_d64".to_string(), "attention_bwd_dkdvq_tc_d128".to_string()]);
    for k in ["attention_fwd", "attention_bwd_dq", "attention_bwd_dkdv"] {
        for ty in ["f32", "bf16", "tc"] {
            for d in ["d32", "d64", "d128"] {
                if ty != "tc" || d != "d32" {
                    names.push(format!("{k}_{ty}_{d}"));
                }
            }
        }
    }
    names
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
