// Shared helpers for every kernel file. The runtime compiles each `kernels/X.cu` with NVRTC after
// prepending this text, so nothing here (or in any kernel file) may `#include` anything: bf16 is
// carried as its raw bits (`unsigned short`) and converted by the helpers below.
//
// Conventions: every float buffer is f32; indices into large buffers are 64-bit (`long long`);
// reductions use a fixed combination order (warp shuffles in a fixed butterfly, then the warps in
// index order), so results do not depend on scheduling.

typedef unsigned short bf16_t;

// `T* name`: the block's dynamic shared memory (the launch's shared-memory bytes), 16-byte aligned.
// The emulation (tests/emulation/shim.h) defines its own before including this file.
#ifndef DYNAMIC_SHARED
#define DYNAMIC_SHARED(T, name)                                  \
    extern __shared__ __align__(16) unsigned char name##_raw[]; \
    T* name = reinterpret_cast<T*>(name##_raw)
#endif

#define IGNORE_INDEX (-100)

__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// ---- bf16 <-> f32 ---------------------------------------------------------------------------

__device__ __forceinline__ float bf16_to_f32(bf16_t h) { return __uint_as_float(((unsigned int)h) << 16); }

/// Round to nearest even; NaN stays a (quiet) NaN with its sign, infinities stay infinities.
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (bf16_t)((u >> 16) | 0x0040u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

/// Loads one element of an f32 or bf16 buffer as f32.
__device__ __forceinline__ float load_f32(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load_f32(const bf16_t* p, long long i) { return bf16_to_f32(p[i]); }
/// Stores an f32 value into an f32 buffer, or rounded into a bf16 one.
__device__ __forceinline__ void store_f32(float* p, long long i, float x) { p[i] = x; }
__device__ __forceinline__ void store_f32(bf16_t* p, long long i, float x) { p[i] = f32_to_bf16(x); }

// ---- reductions -----------------------------------------------------------------------------

/// Combining operations for the reductions below: `f(acc, x)`, in exactly the written form.
struct SumOp {
    template <class T>
    static __device__ __forceinline__ T f(T acc, T x) { return acc + x; }
};
/// max without NaN propagation (a NaN x never replaces acc), as the CPU's `math::max`.
struct MaxOp {
    template <class T>
    static __device__ __forceinline__ T f(T acc, T x) { return x > acc ? x : acc; }
};

/// Fixed xor butterfly over the warp: every lane gets bitwise the same result.
template <class Op, class T>
__device__ __forceinline__ T warp_reduce(T v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = Op::f(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) { return warp_reduce<SumOp>(v); }
__device__ __forceinline__ double warp_sum_d(double v) { return warp_reduce<SumOp>(v); }
__device__ __forceinline__ float warp_max(float v) { return warp_reduce<MaxOp>(v); }

/// Reduction over a block of `NT` threads (a multiple of 32, 1-D): the warps' results combined in
/// warp order starting from `init`. `scratch` holds at least NT / 32 values. Every thread gets the
/// same result. Contains __syncthreads (call from uniform code).
template <int NT, class Op, class T>
__device__ __forceinline__ T block_reduce(T v, T* scratch, T init) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_reduce<Op>(v);
    __syncthreads();  // scratch may still be read by a previous reduction
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    T t = init;
#pragma unroll
    for (int w = 0; w < NT / 32; ++w) t = Op::f(t, scratch[w]);
    return t;
}

/// Sum over a block of `NT` threads (see `block_reduce`).
template <int NT>
__device__ __forceinline__ float block_sum(float v, float* scratch) { return block_reduce<NT, SumOp>(v, scratch, 0.0f); }

template <int NT>
__device__ __forceinline__ double block_sum_d(double v, double* scratch) { return block_reduce<NT, SumOp>(v, scratch, 0.0); }

/// Maximum over a block (NaN is not propagated, as the CPU's `math::max`).
template <int NT>
__device__ __forceinline__ float block_max(float v, float* scratch) { return block_reduce<NT, MaxOp>(v, scratch, neg_inf()); }

// ---- grid-stride loops ----------------------------------------------------------------------

__device__ __forceinline__ long long grid_start() { return (long long)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ long long grid_stride() { return (long long)gridDim.x * blockDim.x; }

/// An elementwise loop with four independent loads in flight per thread: each thread takes
/// elements base + u * blockDim.x (u < 4, so a warp's accesses stay contiguous), loads all four
/// (`load(i)` returns a `T`), then stores them (`store(i, v)`). With one load at a time an H200
/// moved about 2.1 TB/s through GELU; HBM3e needs more bytes in flight than one float per thread.
/// Launch: block 256, grid min(ceil(n / 1024), 65535).
template <class T, class Load, class Store>
__device__ __forceinline__ void elementwise4(long long n, Load load, Store store) {
    const long long bd = blockDim.x;
    const long long step = (long long)gridDim.x * bd * 4;
    for (long long base = (long long)blockIdx.x * bd * 4 + threadIdx.x; base < n; base += step) {
        T v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const long long i = base + u * bd;
            if (i < n) v[u] = load(i);
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const long long i = base + u * bd;
            if (i < n) store(i, v[u]);
        }
    }
}

// ---- GELU (tanh approximation; cpu/pointwise.rs) ----------------------------------------------

#define GELU_K 0.7978846f  // sqrt(2 / pi), as cpu/pointwise.rs
#define GELU_C 0.044715f

__device__ __forceinline__ float gelu_tanh(float v) {
    const float cube = __fmul_rn(__fmul_rn(__fmul_rn(GELU_C, v), v), v);
    return tanhf(__fmul_rn(GELU_K, __fadd_rn(v, cube)));
}

// The gradient through GELU at x: (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * K * (1 + 3 * C * x * x))
// * dout, t = tanh(K * (x + C * x^3)). gelu_bwd and gelu_bwd_colsum_cast_partials (reduce.cu).
__device__ __forceinline__ float gelu_grad(float v, float dout) {
    const float t = gelu_tanh(v);
    const float sech2 = __fsub_rn(1.0f, __fmul_rn(t, t));
    const float inner = __fadd_rn(1.0f, __fmul_rn(__fmul_rn(__fmul_rn(3.0f, GELU_C), v), v));
    const float right = __fmul_rn(__fmul_rn(__fmul_rn(__fmul_rn(0.5f, v), sech2), GELU_K), inner);
    const float grad = __fadd_rn(__fmul_rn(0.5f, __fadd_rn(1.0f, t)), right);
    return __fmul_rn(grad, dout);
}

// ---- deterministic column reductions over rows (the CPU's `math::reduce_rows`) ----------------
//
// The rows are split into blocks of RR_ROWS rows; each block is summed sequentially from 0 (one
// partial per column), then the partials are added to the output in block order. A first
// kernel writes each block's partials, part[(blk * NOUT + o) * c + j]: thread (tx, ty) of a
// (32, 8) thread block owns column blockIdx.x * 32 + tx and the row blocks blockIdx.y * 8 + ty,
// then every gridDim.y * 8 further. `reduce_partials` (reduce.cu) then adds the partials to the
// outputs in block order. The order is fixed, so the result is deterministic. The CPU's
// `math::reduce_rows` uses 16 row blocks (the first GPU form did too, bitwise equal to it, with one
// thread block of 32 columns summing all of them: GPT-2's width 768 gave 24 thread blocks, each
// thread adding 512 rows one after the other, 9 ms per step on an H200 for the bias and norm
// gradients), so the two now agree to rounding.
//
// `Term` provides `NOUT` and `__device__ void term(long long r, int j, float* t) const`, writing
// row r's contribution to column j of each output into t[0..NOUT].
// Launch: block (32, 8), grid (ceil(c / 32), min(ceil(ceil(rows / RR_ROWS) / 8), 65535)).

#define RR_ROWS 32

template <class Term>
__device__ __forceinline__ void reduce_rows_partials(float* part, int rows, int c, const Term& f) {
    constexpr int NOUT = Term::NOUT;
    const int j = blockIdx.x * 32 + threadIdx.x;
    if (j >= c) return;
    const int nblocks = (rows + RR_ROWS - 1) / RR_ROWS;
    for (int blk = blockIdx.y * 8 + threadIdx.y; blk < nblocks; blk += gridDim.y * 8) {
        float acc[NOUT];
#pragma unroll
        for (int o = 0; o < NOUT; ++o) acc[o] = 0.0f;
        const int r0 = blk * RR_ROWS;
        const int r1 = min(r0 + RR_ROWS, rows);
        int r = r0;
        // four rows' terms are computed ahead (independent loads), then added in row order
        for (; r + 4 <= r1; r += 4) {
            float t[4][NOUT];
#pragma unroll
            for (int u = 0; u < 4; ++u) f.term((long long)(r + u), j, t[u]);
#pragma unroll
            for (int u = 0; u < 4; ++u) {
#pragma unroll
                for (int o = 0; o < NOUT; ++o) acc[o] = __fadd_rn(acc[o], t[u][o]);
            }
        }
        for (; r < r1; ++r) {
            float t[NOUT];
            f.term((long long)r, j, t);
#pragma unroll
            for (int o = 0; o < NOUT; ++o) acc[o] = __fadd_rn(acc[o], t[o]);
        }
#pragma unroll
        for (int o = 0; o < NOUT; ++o) part[((long long)blk * NOUT + o) * c + j] = acc[o];
    }
}
