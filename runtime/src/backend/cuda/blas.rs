//! Matrix products through cuBLASLt. Row-major operands are handed to the column-major library
//! as their transposes. Inputs are f32 or bf16, the accumulation is always f32, the output f32
//! (or bf16 where the product says so: the LM head's logits in bf16 mode), and a bias can be
//! added in the epilogue.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::ffi::c_void;
use std::mem::size_of;
use std::sync::Mutex;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

/// The element type of the `a` and `b` operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ty {
    F32,
    Bf16,
}

impl Ty {
    fn cuda(self) -> sys::cudaDataType {
        match self {
            Ty::F32 => sys::cudaDataType_t::CUDA_R_32F,
            Ty::Bf16 => sys::cudaDataType_t::CUDA_R_16BF,
        }
    }
}

/// `d[m, n] (col-major, ld ldc) = alpha * op(a) @ op(b) + beta * d (+ bias[m])` with `op(a)` of
/// shape `m x k` and `op(b)` of shape `k x n`; `trans*` says whether the stored operand is
/// transposed.
pub struct Gemm {
    pub transa: bool,
    pub transb: bool,
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub a: u64,
    pub lda: i64,
    pub b: u64,
    pub ldb: i64,
    pub d: u64,
    /// The `c` of `beta * c` when it is not `d` (0: `d`), with `d`'s type and layout.
    pub c: u64,
    pub ldd: i64,
    pub ty: Ty,
    /// The element type of `d` (bf16 only with `beta` 0; a bias stays f32, added before the
    /// rounding).
    pub out: Ty,
    pub alpha: f32,
    pub beta: f32,
    pub bias: Option<u64>,
}

impl Gemm {
    /// The forward product `d[n, m] = inp[n, k] w[m, k]^T` of row-major operands (the weight
    /// transposed), in f32, no bias: the base that the forward products adjust.
    pub fn forward(w: u64, inp: u64, d: u64, (n, k, m): (usize, usize, usize), ty: Ty) -> Gemm {
        let (n, k, m) = (n as u64, k as u64, m as u64);
        Gemm {
            transa: true,
            transb: false,
            m,
            n,
            k,
            a: w,
            lda: k as i64,
            b: inp,
            ldb: k as i64,
            d,
            c: 0,
            ldd: m as i64,
            ty,
            out: Ty::F32,
            alpha: 1.0,
            beta: 0.0,
            bias: None,
        }
    }

    /// The input gradient's product `d[n, k] = dout[n, m] w[m, k]` (`dout` in rows of stride
    /// `ld`), in f32 with `d` and `beta` 0 for the caller to set.
    pub fn input_grad(w: u64, dout: u64, ld: usize, (n, k, m): (usize, usize, usize), ty: Ty) -> Gemm {
        Gemm { transa: false, lda: k as i64, ldb: ld as i64, ..Gemm::forward(w, dout, 0, (n, m, k), ty) }
    }
}

/// What a product's plan depends on: the shapes, and the alignment of the `a`, `b` and `d`
/// pointers (the scalars and the pointers' values do not change it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    transa: bool,
    transb: bool,
    m: u64,
    n: u64,
    k: u64,
    lda: i64,
    ldb: i64,
    ldd: i64,
    ty: Ty,
    out: Ty,
    bias: bool,
    align: [u32; 3],
}

/// The largest power of two up to 256 that divides the address: the alignment the algorithm
/// search is told each operand has (it assumes 256 bytes unless told, and an algorithm chosen for
/// that may fail on an operand that starts inside a row, as an adapter's column block does).
fn alignment(ptr: u64) -> u32 {
    1 << ptr.trailing_zeros().min(8)
}

/// Descriptors and the algorithm chosen for one shape, made once and reused: the heuristic
/// query costs more host time than launching the product.
struct Plan {
    a: Layout,
    b: Layout,
    d: Layout,
    desc: Desc,
    algo: sys::cublasLtMatmulAlgo_t,
}

pub struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    plans: Mutex<HashMap<Key, Plan>>,
    /// The forms [`Lt::can_plan`] found no algorithm for, not asked again.
    refused: Mutex<HashSet<Key>>,
}

// SAFETY: the handle and the plans are used from one stream; the plans sit behind a lock.
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

impl Lt {
    pub fn new(stream: &std::sync::Arc<CudaStream>, workspace_bytes: usize) -> Result<Self, String> {
        let handle = lt::create_handle().map_err(|e| format!("cublasLtCreate: {e:?}"))?;
        // SAFETY: the workspace is only ever handed to cuBLASLt, which needs no initial contents.
        let workspace = unsafe { stream.alloc::<u8>(workspace_bytes) }.map_err(|e| format!("allocating the cuBLASLt workspace: {e:?}"))?;
        Ok(Lt { handle, workspace, plans: Mutex::new(HashMap::new()), refused: Mutex::new(HashSet::new()) })
    }

    /// # Safety
    /// The handle is live.
    unsafe fn plan(&self, key: Key) -> Result<Plan, String> {
        let (m, n, k) = (key.m, key.n, key.k);
        let err = |what: &'static str| move |e: lt::CublasError| format!("cuBLASLt {what} ({m}x{n}x{k}): {e:?}");
        let (a_rows, a_cols) = if key.transa { (k, m) } else { (m, k) };
        let (b_rows, b_cols) = if key.transb { (n, k) } else { (k, n) };
        let a = Layout(lt::create_matrix_layout(key.ty.cuda(), a_rows, a_cols, key.lda).map_err(err("layout"))?);
        let b = Layout(lt::create_matrix_layout(key.ty.cuda(), b_rows, b_cols, key.ldb).map_err(err("layout"))?);
        let d = Layout(lt::create_matrix_layout(key.out.cuda(), m, n, key.ldd).map_err(err("layout"))?);
        let desc = Desc(lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType_t::CUDA_R_32F).map_err(err("descriptor"))?);
        let (ta, tb) = (key.transa as i32, key.transb as i32);
        desc.set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, &ta).map_err(err("transa"))?;
        desc.set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, &tb).map_err(err("transb"))?;
        if key.bias {
            desc.set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE, &sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS)
                .map_err(err("epilogue"))?;
            desc.set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &sys::cudaDataType_t::CUDA_R_32F).map_err(err("bias type"))?;
        }
        let pref = Pref(lt::create_matmul_pref().map_err(err("preference"))?);
        let ws_size = self.workspace.len();
        lt::set_matmul_pref_attribute(
            pref.0,
            sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            (&ws_size) as *const usize as *const c_void,
            size_of::<usize>(),
        )
        .map_err(err("workspace"))?;
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        let [a_align, b_align, d_align] = key.align;
        for (attr, bytes) in [
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, a_align),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, b_align),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, d_align),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, d_align),
        ] {
            lt::set_matmul_pref_attribute(pref.0, attr, (&bytes) as *const u32 as *const c_void, size_of::<u32>()).map_err(err("alignment"))?;
        }
        let heuristic = lt::get_matmul_algo_heuristic(self.handle, desc.0, a.0, b.0, d.0, d.0, pref.0).map_err(err("algorithm search"))?;
        Ok(Plan { a, b, d, desc, algo: heuristic.algo })
    }

    /// Runs one product on `stream`.
    ///
    /// # Safety
    /// Every pointer must be valid for its operand's shape and leading dimension.
    pub unsafe fn gemm(&self, stream: &CudaStream, g: &Gemm) -> Result<(), String> {
        let key = Self::key(g);
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        let plan = match plans.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(self.plan(key)?),
        };
        self.run(stream, g, plan)
    }

    /// Whether cuBLASLt has an algorithm for `g`'s product (its plan is made and kept when it
    /// does, and a refusal is remembered): a product form that a library version may not support
    /// is asked first, once.
    ///
    /// # Safety
    /// The handle is live.
    pub unsafe fn can_plan(&self, g: &Gemm) -> bool {
        let key = Self::key(g);
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        if refused.contains(&key) {
            return false;
        }
        if let Entry::Vacant(e) = plans.entry(key) {
            match self.plan(key) {
                Ok(p) => drop(e.insert(p)),
                Err(err) => {
                    tracing::debug!("{err}");
                    refused.insert(key);
                    return false;
                }
            }
        }
        true
    }

    fn key(g: &Gemm) -> Key {
        let c = if g.c == 0 { g.d } else { g.c };
        let align = [alignment(g.a), alignment(g.b), alignment(g.d).min(alignment(c))];
        Key {
            transa: g.transa,
            transb: g.transb,
            m: g.m,
            n: g.n,
            k: g.k,
            lda: g.lda,
            ldb: g.ldb,
            ldd: g.ldd,
            ty: g.ty,
            out: g.out,
            bias: g.bias.is_some(),
            align,
        }
    }

    /// # Safety
    /// As [`Lt::gemm`]; `plan` is `g`'s.
    unsafe fn run(&self, stream: &CudaStream, g: &Gemm, plan: &Plan) -> Result<(), String> {
        if let Some(bias) = &g.bias {
            plan.desc.set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias).map_err(|e| format!("cuBLASLt bias pointer: {e:?}"))?;
        }
        let (ws, _sync) = self.workspace.device_ptr(stream);
        lt::matmul(
            self.handle,
            plan.desc.0,
            (&g.alpha) as *const f32 as *const c_void,
            (&g.beta) as *const f32 as *const c_void,
            g.a as *const c_void,
            plan.a.0,
            g.b as *const c_void,
            plan.b.0,
            (if g.c == 0 { g.d } else { g.c }) as *const c_void,
            plan.d.0,
            g.d as *mut c_void,
            plan.d.0,
            &plan.algo,
            ws as *mut c_void,
            self.workspace.len(),
            stream.cu_stream() as sys::cudaStream_t,
        )
        .map_err(|e| format!("cuBLASLt matmul ({}x{}x{}): {e:?}", g.m, g.n, g.k))
    }
}

impl Drop for Lt {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

struct Layout(sys::cublasLtMatrixLayout_t);
impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by `create_matrix_layout`, destroyed once.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}

struct Desc(sys::cublasLtMatmulDesc_t);
impl Desc {
    /// # Safety
    /// `T` is the attribute's type.
    unsafe fn set<T>(&self, attr: sys::cublasLtMatmulDescAttributes_t, value: &T) -> Result<(), lt::CublasError> {
        lt::set_matmul_desc_attribute(self.0, attr, value as *const T as *const c_void, size_of::<T>())
    }
}
impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: as above.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}

struct Pref(sys::cublasLtMatmulPreference_t);
impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: as above.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}
