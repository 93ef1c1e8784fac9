//! Matrix products through cuBLASLt. Row-major operands are handed to the column-major library
//! as their transposes. Inputs are f32 or bf16, the output and the accumulation are always f32,
//! and a bias can be added in the epilogue.

use std::ffi::c_void;
use std::mem::size_of;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

/// The element type of the `a` and `b` operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// `d[m, n] (col-major, ld ldc) = op(a) @ op(b) + beta * d (+ bias[m])` with `op(a)` of shape
/// `m x k` and `op(b)` of shape `k x n`; `trans*` says whether the stored operand is transposed.
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
    pub ldd: i64,
    pub ty: Ty,
    pub beta: f32,
    pub bias: Option<u64>,
}

pub struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
}

// SAFETY: the handle is used from one stream at a time, behind the backend's lock.
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

impl Lt {
    pub fn new(stream: &std::sync::Arc<CudaStream>, workspace_bytes: usize) -> Result<Self, String> {
        let handle = lt::create_handle().map_err(|e| format!("cublasLtCreate: {e:?}"))?;
        // SAFETY: the workspace is only ever handed to cuBLASLt, which needs no initial contents.
        let workspace = unsafe { stream.alloc::<u8>(workspace_bytes) }.map_err(|e| format!("allocating the cuBLASLt workspace: {e:?}"))?;
        Ok(Lt { handle, workspace })
    }

    /// Runs one product on `stream`.
    ///
    /// # Safety
    /// Every pointer must be valid for its operand's shape and leading dimension.
    pub unsafe fn gemm(&self, stream: &CudaStream, g: &Gemm) -> Result<(), String> {
        let (m, n, k) = (g.m, g.n, g.k);
        let err = |what: &'static str| move |e: lt::CublasError| format!("cuBLASLt {what} ({m}x{n}x{k}): {e:?}");
        let (a_rows, a_cols) = if g.transa { (g.k, g.m) } else { (g.m, g.k) };
        let (b_rows, b_cols) = if g.transb { (g.n, g.k) } else { (g.k, g.n) };
        let a_l = Layout(lt::create_matrix_layout(g.ty.cuda(), a_rows, a_cols, g.lda).map_err(err("layout"))?);
        let b_l = Layout(lt::create_matrix_layout(g.ty.cuda(), b_rows, b_cols, g.ldb).map_err(err("layout"))?);
        let d_l = Layout(lt::create_matrix_layout(sys::cudaDataType_t::CUDA_R_32F, g.m, g.n, g.ldd).map_err(err("layout"))?);
        let desc = Desc(lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType_t::CUDA_R_32F).map_err(err("descriptor"))?);
        let set = |attr: sys::cublasLtMatmulDescAttributes_t, ptr: *const c_void, size: usize| lt::set_matmul_desc_attribute(desc.0, attr, ptr, size);
        let (ta, tb) = (g.transa as i32, g.transb as i32);
        set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, (&ta) as *const i32 as *const c_void, size_of::<i32>()).map_err(err("transa"))?;
        set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, (&tb) as *const i32 as *const c_void, size_of::<i32>()).map_err(err("transb"))?;
        if let Some(bias) = &g.bias {
            let epi = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
            let bias_ty = sys::cudaDataType_t::CUDA_R_32F;
            set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE, (&epi) as *const _ as *const c_void, size_of::<sys::cublasLtEpilogue_t>())
                .map_err(err("epilogue"))?;
            set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias as *const u64 as *const c_void, size_of::<u64>())
                .map_err(err("bias"))?;
            set(
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                (&bias_ty) as *const _ as *const c_void,
                size_of::<sys::cudaDataType>(),
            )
            .map_err(err("bias type"))?;
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
        let heuristic = lt::get_matmul_algo_heuristic(self.handle, desc.0, a_l.0, b_l.0, d_l.0, d_l.0, pref.0).map_err(err("algorithm search"))?;
        let (ws, _sync) = self.workspace.device_ptr(stream);
        let alpha = 1.0f32;
        lt::matmul(
            self.handle,
            desc.0,
            (&alpha) as *const f32 as *const c_void,
            (&g.beta) as *const f32 as *const c_void,
            g.a as *const c_void,
            a_l.0,
            g.b as *const c_void,
            b_l.0,
            g.d as *const c_void,
            d_l.0,
            g.d as *mut c_void,
            d_l.0,
            &heuristic.algo,
            ws as *mut c_void,
            ws_size,
            stream.cu_stream() as sys::cudaStream_t,
        )
        .map_err(err("matmul"))
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
