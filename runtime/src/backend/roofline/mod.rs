//! A roofline account of the CUDA backend's training step, on any machine. [`Roofline`] is a
//! backend with no memory and no arithmetic: its buffers are sizes, and each op records the
//! launches the CUDA backend makes for it (`backend/cuda/*.rs`), with the bytes each one moves
//! through device memory and its FLOPs (tensor-core and CUDA-core apart), taken from the kernel's
//! access pattern (`docs/KERNELS.md`): the bf16 casts of product operands, the key and value tiles
//! each query tile of attention re-reads, the two passes of the fused loss, AdamW's streams. Driving
//! a model's step through it gives the step's op sequence exactly as the CUDA backend runs it, so
//! the account needs no GPU; `runtime bench --device cuda --roofline CHIP` prints it.
//!
//! The model of one launch: it moves its bytes once through device memory (a tile re-read by
//! another block is counted again; what one block reads twice is not: rows and tiles fit its
//! cache), and takes `max(bytes / bandwidth, tensor FLOPs / tensor rate, other FLOPs / FP32
//! rate) + overhead` seconds. A cuBLASLt product reads each operand once and writes its output
//! once. Peak rates are the data-sheet ones, so the modeled time is a lower bound that the GPU
//! check's measured times calibrate.

mod costs;
mod ops;

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use serde::Serialize;

use crate::backend::{SharedMemory, NORM_FUSED_WIDTH};

/// A GPU's peak rates.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Chip {
    pub name: &'static str,
    /// Device-memory bandwidth, bytes/s.
    pub bandwidth: f64,
    /// Dense bf16 tensor-core rate, FLOP/s.
    pub tensor: f64,
    /// FP32 rate without tensor cores, FLOP/s.
    pub fp32: f64,
    /// Seconds each launch costs besides its work (launch and tail), a modeling assumption.
    pub launch: f64,
    /// Shared memory per block (the opt-in, less the 1 KiB the CUDA backend leaves for static
    /// arrays) and per multiprocessor, as the CUDA backend reads them from the device.
    pub smem: SharedMemory,
}

/// The chips `--roofline` knows: H100 SXM and H200 (989 TFLOP/s dense bf16, 67 TFLOP/s FP32;
/// 3.35 and 4.8 TB/s; 227 KiB of shared memory per block and 228 per multiprocessor) and A100 SXM
/// 80 GB (312 and 19.5 TFLOP/s, 2.0 TB/s; 163 and 164 KiB).
pub const CHIPS: [Chip; 3] = [
    Chip { name: "h100", bandwidth: 3.35e12, tensor: 989e12, fp32: 67e12, launch: 2e-6, smem: HOPPER_SMEM },
    Chip { name: "h200", bandwidth: 4.8e12, tensor: 989e12, fp32: 67e12, launch: 2e-6, smem: HOPPER_SMEM },
    Chip {
        name: "a100",
        bandwidth: 2.0e12,
        tensor: 312e12,
        fp32: 19.5e12,
        launch: 2e-6,
        smem: SharedMemory { per_block: 163 * 1024 - 1024, per_sm: 164 * 1024 },
    },
];
const HOPPER_SMEM: SharedMemory = SharedMemory { per_block: 227 * 1024 - 1024, per_sm: 228 * 1024 };

/// The chip named `name` (case-insensitive).
pub fn chip(name: &str) -> Option<Chip> {
    CHIPS.iter().copied().find(|c| c.name.eq_ignore_ascii_case(name))
}

/// What one launch moves and computes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cost {
    pub read: f64,
    pub written: f64,
    pub tensor_flops: f64,
    pub fp32_flops: f64,
}

impl Cost {
    pub fn bytes(&self) -> f64 {
        self.read + self.written
    }

    /// Modeled seconds on `chip`, the launch overhead included.
    pub fn seconds(&self, chip: &Chip) -> f64 {
        (self.bytes() / chip.bandwidth).max(self.tensor_flops / chip.tensor).max(self.fp32_flops / chip.fp32) + chip.launch
    }
}

/// The launches of one op family, summed.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Family {
    pub launches: u64,
    pub read: f64,
    pub written: f64,
    pub tensor_flops: f64,
    pub fp32_flops: f64,
    /// Modeled seconds (each launch's, summed).
    pub seconds: f64,
}

/// The account of the ops recorded so far, by family, and the modeled seconds by op kind as the
/// profiled backend names them (`matmul`, `attention`, ...: what `runtime bench --profile`
/// measures on a device).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Account {
    pub families: BTreeMap<String, Family>,
    pub kinds: BTreeMap<String, f64>,
    /// Ops that read the f32 values of a buffer held with `Backend::hold_operand_only` after the
    /// op computing it wrote only its bf16 copy (on the CUDA backend they would read stale
    /// values): a wrong hint from the model, by op kind.
    pub stale_reads: Vec<String>,
}

impl Account {
    pub fn launches(&self) -> u64 {
        self.families.values().map(|f| f.launches).sum()
    }
    pub fn bytes(&self) -> f64 {
        self.families.values().map(|f| f.read + f.written).sum()
    }
    pub fn seconds(&self) -> f64 {
        self.families.values().map(|f| f.seconds).sum()
    }
    pub fn tensor_flops(&self) -> f64 {
        self.families.values().map(|f| f.tensor_flops).sum()
    }
    pub fn fp32_flops(&self) -> f64 {
        self.families.values().map(|f| f.fp32_flops).sum()
    }

    /// The account, or an error when an op read the f32 values of a buffer held with `hold_operand_only` after
    /// its kernel wrote only the bf16 copy ([`Account::stale_reads`]: the model's hint was wrong,
    /// and the CUDA backend would have read stale values).
    pub fn checked(self) -> crate::error::Result<Self> {
        match self.stale_reads.first() {
            None => Ok(self),
            Some(kind) => Err(crate::error::Error::Invalid(format!(
                "{} op(s) read the f32 values of an activation held with hold_operand_only, the first in `{kind}`",
                self.stale_reads.len()
            ))),
        }
    }

    /// The per-family table (markdown), with shares of the modeled time.
    pub fn table(&self) -> String {
        let total = self.seconds().max(f64::MIN_POSITIVE);
        let mut rows: Vec<(&String, &Family)> = self.families.iter().collect();
        rows.sort_by(|a, b| b.1.seconds.total_cmp(&a.1.seconds));
        let mut s = String::from(
            "| op | launches | MB read | MB written | tensor GFLOP | other GFLOP | modeled ms | share |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for (name, f) in rows {
            s += &format!(
                "| {name} | {} | {:.1} | {:.1} | {:.1} | {:.2} | {:.3} | {:.1}% |\n",
                f.launches,
                f.read / 1e6,
                f.written / 1e6,
                f.tensor_flops / 1e9,
                f.fp32_flops / 1e9,
                f.seconds * 1e3,
                100.0 * f.seconds / total
            );
        }
        s
    }
}

/// Buffer ids, the bf16 working copies the CUDA backend would hold, and the account.
struct State {
    next: u64,
    /// The op kind being recorded, and how deep in nested ops (a nested op keeps its caller's).
    kind: &'static str,
    depth: usize,
    /// Buffers whose bf16 copy the last fused AdamW step wrote (the CUDA backend's `weights16`).
    copies: HashSet<u64>,
    /// The operands named by `begin_operand_reuse`, and whether their copy was made.
    reuse: Vec<(u64, bool)>,
    /// The held operands (`hold_operand`): whether their copy is made, and whether they are held
    /// `only` (`hold_operand_only`).
    held: std::collections::HashMap<u64, (bool, bool)>,
    /// Buffers held `only` whose f32 values the op that computed them did not write: an op that
    /// reads them is recorded in `stale_reads`.
    stale: HashSet<u64>,
    account: Account,
}

/// The accounting backend (see the module's documentation). `bf16` is the CUDA backend's bf16
/// mode.
pub struct Roofline {
    chip: Chip,
    bf16: bool,
    state: Mutex<State>,
}

/// Ends an op's attribution (see [`Roofline::op_kind`]).
struct KindGuard<'a>(&'a Roofline);

impl Drop for KindGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.depth -= 1;
    }
}

/// A buffer: its id and length, no data.
#[derive(Debug)]
pub struct VBuf {
    id: u64,
    len: usize,
}

/// An id buffer keeps its values (the loss counts its targets on the host, as the CUDA backend
/// does).
#[derive(Debug)]
pub struct VIds {
    data: Vec<i32>,
}

impl Roofline {
    pub fn new(chip: Chip, bf16: bool) -> Self {
        Roofline {
            chip,
            bf16,
            state: Mutex::new(State {
                next: 0,
                kind: "untimed",
                depth: 0,
                copies: HashSet::new(),
                reuse: Vec::new(),
                held: Default::default(),
                stale: HashSet::new(),
                account: Account::default(),
            }),
        }
    }

    pub fn chip(&self) -> Chip {
        self.chip
    }

    /// The account since the last [`Roofline::reset`].
    pub fn account(&self) -> Account {
        self.lock().account.clone()
    }

    /// Clears the account (the buffers and the bf16 copies stay).
    pub fn reset(&self) {
        self.lock().account = Account::default();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Attributes what the op records to `kind` until the guard drops (a nested op keeps its
    /// caller's kind, as the profiled backend times the outer op whole).
    fn op_kind(&self, kind: &'static str) -> KindGuard<'_> {
        let mut st = self.lock();
        st.depth += 1;
        if st.depth == 1 {
            st.kind = kind;
        }
        KindGuard(self)
    }

    /// Records one launch of `family`.
    fn rec(&self, family: &str, c: Cost) {
        let s = c.seconds(&self.chip);
        let mut st = self.lock();
        let kind = st.kind;
        *st.account.kinds.entry(kind.to_string()).or_default() += s;
        let f = st.account.families.entry(family.to_string()).or_default();
        f.launches += 1;
        f.read += c.read;
        f.written += c.written;
        f.tensor_flops += c.tensor_flops;
        f.fp32_flops += c.fp32_flops;
        f.seconds += s;
    }

    fn new_buf(&self, len: usize) -> VBuf {
        let mut st = self.lock();
        st.next += 1;
        // (the CUDA backend drops the copies of freed buffers whose memory a new one takes; an id
        // is never taken again, so no copy here goes stale that way)
        VBuf { id: st.next, len }
    }

    /// A write other than the fused AdamW step drops the buffer's bf16 copy (and its shared one).
    fn forget(&self, b: &VBuf) {
        let mut st = self.lock();
        st.copies.remove(&b.id);
        st.reuse.retain(|r| r.0 != b.id);
        st.held.remove(&b.id);
        st.stale.remove(&b.id);
    }

    /// As the CUDA backend's `held_outputs`: the values (counted as f32) an op that computes `out`
    /// writes: `out`, and its bf16 copy when it is held (half of `out` more; the copy then counts
    /// as made), or the copy alone when it is held `only`.
    fn produced(&self, out: &VBuf) -> usize {
        let mut st = self.lock();
        match st.held.get_mut(&out.id) {
            Some((made, only)) if self.bf16 => {
                *made = true;
                if *only {
                    st.stale.insert(out.id);
                    return out.len.div_ceil(2);
                }
                out.len + out.len.div_ceil(2)
            }
            _ => out.len,
        }
    }

    /// As the CUDA backend's `held_input`: the values (counted as f32) an activation kernel reads
    /// of its input `x`: half of `x` when its f32 values are stale (the kernel reads the bf16
    /// copy), all of `x` otherwise.
    fn act_input(&self, x: &VBuf) -> usize {
        if self.lock().stale.contains(&x.id) {
            x.len.div_ceil(2)
        } else {
            x.len
        }
    }

    /// Whether `x` (a pre-activation or an input gradient whose f32 values are stale) is read as bf16 ([`Roofline::act_input`]).
    fn read_as_bf16(&self, x: &VBuf) -> bool {
        self.lock().stale.contains(&x.id)
    }

    /// As the CUDA backend's `held_made`: whether `b`'s held copy is made.
    fn held_made(&self, b: &VBuf) -> bool {
        self.bf16 && self.lock().held.get(&b.id).is_some_and(|h| h.0)
    }

    /// As the CUDA backend's `held_only_product`: whether a product of width `m` into `out`
    /// writes only `out`'s bf16 copy (`out` held `only`, `m` aligned; the copy then counts as
    /// made and the f32 values as stale).
    fn held_only_product(&self, out: &VBuf, m: usize) -> bool {
        let mut st = self.lock();
        match st.held.get_mut(&out.id) {
            Some((made, true)) if self.bf16 && crate::backend::aligned_ld(m) == m => {
                *made = true;
                st.stale.insert(out.id);
                true
            }
            _ => false,
        }
    }

    /// As the CUDA backend's `held_outputs` for an op that writes a held output's copy beside it
    /// ([`Roofline::copy_beside`]): whether `out` is held `only`, so that its f32 values are not
    /// written (they count as stale from here on).
    fn copy_alone(&self, out: &VBuf) -> bool {
        let mut st = self.lock();
        let only = self.bf16 && st.held.get(&out.id).is_some_and(|h| h.1);
        if only {
            st.stale.insert(out.id);
        }
        only
    }

    /// The bf16 copy an op that writes `out` (the attention's forward pass; in f32 too unless
    /// [`Roofline::copy_alone`]) writes beside it when `out` is held: its values, counted as f32 (half of `out`); the copy
    /// then counts as made.
    fn copy_beside(&self, out: &VBuf) -> usize {
        match self.lock().held.get_mut(&out.id) {
            Some((made, _)) if self.bf16 => {
                *made = true;
                out.len.div_ceil(2)
            }
            _ => 0,
        }
    }

    /// As the CUDA backend's `hold_operand` (`only`: `hold_operand_only`) and `release_operands`
    /// (`None`).
    fn hold(&self, b: Option<&VBuf>, only: bool) {
        if self.bf16 {
            let mut st = self.lock();
            match b {
                Some(b) => {
                    st.stale.remove(&b.id);
                    st.held.insert(b.id, (false, only));
                }
                None => {
                    st.held.clear();
                    st.stale.clear();
                }
            }
        }
    }

    /// Records the op reading the f32 values of any of `bufs` that are stale (see
    /// [`Account::stale_reads`]).
    fn reads(&self, bufs: &[&VBuf]) {
        let mut st = self.lock();
        if bufs.iter().any(|b| st.stale.contains(&b.id)) {
            let what = st.kind.to_string();
            st.account.stale_reads.push(what);
        }
    }

    /// As the CUDA backend's `held_copy`: whether `b` is held, its copy made now (with its
    /// cast) if no read made it yet.
    fn held_read(&self, b: &VBuf) -> bool {
        let mut st = self.lock();
        let Some((made, _)) = st.held.get_mut(&b.id) else { return false };
        let first = !*made;
        *made = true;
        drop(st);
        if first {
            self.cast(b.len);
        }
        true
    }

    /// As the CUDA backend's `keep_working_copy`: a cast unless the weight has its copy.
    fn keep_copy(&self, w: &VBuf) {
        if self.bf16 && w.len > 0 && self.lock().copies.insert(w.id) {
            self.cast(w.len);
        }
    }

    fn name_reused(&self, bufs: &[&VBuf]) {
        if self.bf16 {
            self.lock().reuse = bufs.iter().map(|b| (b.id, false)).collect();
        }
    }

    /// Whether `b` is named for reuse (its shared copy made or not).
    fn named_reused(&self, b: &VBuf) -> bool {
        self.lock().reuse.iter().any(|r| r.0 == b.id)
    }

    /// Whether `b`'s held or shared copy serves this product (made now, with its cast, at the
    /// first).
    fn reused(&self, b: &VBuf) -> bool {
        let mut st = self.lock();
        let State { held, reuse, .. } = &mut *st;
        let Some(made) = held.get_mut(&b.id).map(|h| &mut h.0).or_else(|| reuse.iter_mut().find(|r| r.0 == b.id).map(|r| &mut r.1)) else { return false };
        let first = !*made;
        *made = true;
        drop(st);
        if first {
            self.cast(b.len);
        }
        true
    }

    fn has_copy(&self, b: &VBuf) -> bool {
        self.lock().copies.contains(&b.id)
    }

    /// Bytes per element of a product's or attention's operands: bf16 copies in bf16 mode.
    fn operand_bytes(&self) -> f64 {
        if self.bf16 {
            2.0
        } else {
            4.0
        }
    }

    /// The bf16 casts of a product's operands that `need` marks (none in f32 mode; the weight's
    /// own copy when the fused AdamW step or `keep_working_copy` left one; the shared copy of an
    /// operand named for reuse, cast at its first product).
    fn cast_operands(&self, bufs: &[&VBuf], weight: Option<usize>, need: &[bool]) {
        if !self.bf16 {
            return self.reads(bufs);
        }
        for (i, b) in bufs.iter().enumerate() {
            if !need[i] || (weight == Some(i) && self.has_copy(b)) || self.reused(b) {
                continue;
            }
            self.reads(&[b]);
            self.cast(b.len);
        }
    }

    fn cast(&self, n: usize) {
        self.rec("cast to bf16", Cost { read: 4.0 * n as f64, written: 2.0 * n as f64, ..Cost::default() });
    }

    /// One cuBLASLt product `d[m, n] (+)= a[m, k] b[k, n]`: each operand read once, the output
    /// written (and read when accumulated).
    fn gemm(&self, dims: (usize, usize, usize), accumulate: bool, bias: bool) {
        self.gemm_out(dims, accumulate, bias, 4.0);
    }

    /// [`Roofline::gemm`] writing `out_bytes` per output element (2: the bf16 logits).
    fn gemm_out(&self, (m, n, k): (usize, usize, usize), accumulate: bool, bias: bool, out_bytes: f64) {
        let (m, n, k) = (m as f64, n as f64, k as f64);
        let e = self.operand_bytes();
        let flops = 2.0 * m * n * k;
        let (tensor_flops, fp32_flops) = if self.bf16 { (flops, 0.0) } else { (0.0, flops) };
        let read = e * (m * k + k * n) + if accumulate { 4.0 * m * n } else { 0.0 } + if bias { 4.0 * m } else { 0.0 };
        self.rec("matmul (cuBLASLt)", Cost { read, written: out_bytes * m * n, tensor_flops, fp32_flops });
    }

    /// A deterministic column sum of `nout` outputs of `width` over `rows` rows, as the CUDA
    /// backend runs it: the partials kernel reads `read` values and writes one partial per block of
    /// rows, then `reduce_partials` reads them and the outputs and writes the outputs.
    fn column_sums(&self, family: &str, read: usize, rows: usize, width: usize, nout: usize) {
        let partials = rows.div_ceil(crate::backend::REDUCE_BLOCK_ROWS) * nout * width;
        self.elementwise(family, read, partials);
        self.elementwise(family, partials + nout * width, nout * width);
    }

    /// An elementwise launch of `family` reading `read` and writing `written` f32 values.
    fn elementwise(&self, family: &str, read: usize, written: usize) {
        self.rec(family, Cost { read: 4.0 * read as f64, written: 4.0 * written as f64, ..Cost::default() });
    }
}

/// llm.c's FLOPs per token of a training step: `6 N + 12 L C T` (N parameters, L layers, C the
/// width, T the sequence length).
pub fn flops_per_token(params: usize, layers: usize, width: usize, seq: usize) -> f64 {
    6.0 * params as f64 + 12.0 * (layers * width * seq) as f64
}
