// Elementwise kernels: fill, scale, add, column-block add/take, f32 -> bf16, GELU (tanh) and SwiGLU.
// CPU twins: cpu/pointwise.rs (gelu_*, swiglu_*, add, add_cols, take_cols), cpu/optim.rs (scale), Backend::fill.
// Launch: block 256, grid min(ceil(n / 256), 65535), grid-stride loops; the kernels written with
// `elementwise4` (add, take_cols, GELU, SwiGLU) take four elements per thread: grid
// min(ceil(n / 1024), 65535).
//
// The arithmetic is written in the CPU's order with explicitly rounded operations (__fmul_rn,
// __fadd_rn, ...) so that no FMA contraction changes the result; the only differences from the CPU
// come from expf/tanhf (CUDA's, about 1-2 ulp) against the CPU's polynomial exp.

extern "C" __global__ void fill_f32(float* x, float v, long long n) {
    for (long long i = grid_start(); i < n; i += grid_stride()) x[i] = v;
}

extern "C" __global__ void scale_f32(float* x, float s, long long n) {
    for (long long i = grid_start(); i < n; i += grid_stride()) x[i] = __fmul_rn(x[i], s);
}

// Launch (as the other `elementwise4` kernels below): block 256, grid min(ceil(n / 1024), 65535).
extern "C" __global__ void add_f32(float* out, const float* a, const float* b, long long n) {
    elementwise4<float2>(n, [&](long long i) { return make_float2(a[i], b[i]); }, [&](long long i, float2 v) { out[i] = __fadd_rn(v.x, v.y); });
}

// Dropout in place, counter-based (cpu/pointwise.rs `dropout`, backend::dropout_keep): element i
// is kept when the upper 32 bits of SplitMix64's finalizer of key + (i + 1) * golden are at least
// the threshold (p * 2^32), and then multiplied by scale = 1 / (1 - p).
extern "C" __global__ void dropout_f32(float* x, long long key, long long threshold, float scale, long long n) {
    for (long long i = grid_start(); i < n; i += grid_stride()) {
        unsigned long long z = (unsigned long long)key + ((unsigned long long)i + 1ull) * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        x[i] = (z >> 32) >= (unsigned long long)threshold ? __fmul_rn(x[i], scale) : 0.0f;
    }
}

// dst is [rows, ld], src [rows, width]: dst[r, off + j] += scale * src[r, j] (a LoRA branch into
// its part of a fused output; an axpy when width == ld).
extern "C" __global__ void add_cols_f32(float* dst, const float* src, long long rows, int width, int ld, int off, float scale) {
    const long long n = rows * (long long)width;
    for (long long e = grid_start(); e < n; e += grid_stride()) {
        const long long r = e / width;
        const long long j = e - r * width;
        float* d = dst + r * ld + off + j;
        *d = __fadd_rn(*d, __fmul_rn(scale, src[e]));
    }
}

// dst is [rows, width], src [rows, ld]: dst[r, j] = scale * src[r, off + j].
// (elementwise4: four loads in flight per thread)
extern "C" __global__ void take_cols_f32(float* dst, const float* src, long long rows, int width, int ld, int off, float scale) {
    const long long n = rows * (long long)width;
    elementwise4<float>(
        n,
        [&](long long e) {
            const long long r = e / width;
            return src[r * ld + off + (e - r * width)];
        },
        [&](long long e, float x) { dst[e] = __fmul_rn(scale, x); });
}

// y = bf16(x), four values per thread (one 16-byte load, one 8-byte store; x and y start at
// allocations, so they are aligned) and the n % 4 tail one by one.
// Launch: block 256, grid min(ceil(n / 4 / 256), 65535).
extern "C" __global__ void cast_f32_bf16(bf16_t* y, const float* x, long long n) {
    const long long n4 = n / 4;
    const float4* x4 = (const float4*)x;
    uint2* y4 = (uint2*)y;
    for (long long i = grid_start(); i < n4; i += grid_stride()) {
        const float4 v = x4[i];
        uint2 o;
        o.x = (unsigned)f32_to_bf16(v.x) | ((unsigned)f32_to_bf16(v.y) << 16);
        o.y = (unsigned)f32_to_bf16(v.z) | ((unsigned)f32_to_bf16(v.w) << 16);
        y4[i] = o;
    }
    for (long long i = n4 * 4 + grid_start(); i < n; i += grid_stride()) y[i] = f32_to_bf16(x[i]);
}

// y[r * ldy + j] = bf16(x[r * cols + j]) for j < cols: a [rows, cols] matrix cast into rows of
// stride ldy (a multiple of 8 for the tensor-core products; the pad columns are not written).
// Launch: block 256, grid (min(ceil(cols / 1024), 65535), rows) with rows <= 65535 (elementwise4
// along the row).
// y = x widened to f32 (an input gradient whose product wrote only its bf16 copy, made f32 for an
// op that reads f32: see Cuda::widen_held). Grid-stride, one value per thread.
extern "C" __global__ void cast_bf16_f32(float* y, const bf16_t* x, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) y[i] = bf16_to_f32(x[i]);
}

extern "C" __global__ void cast_f32_bf16_rows(bf16_t* y, const float* x, int cols, long long ldy) {
    const long long r = blockIdx.y;
    const float* xr = x + r * cols;
    bf16_t* yr = y + r * ldy;
    elementwise4<float>(cols, [&](long long j) { return xr[j]; }, [&](long long j, float v) { yr[j] = f32_to_bf16(v); });
}

// out = 0.5 * x * (1 + tanh(K * (x + C * x * x * x))); also rounded to bf16 into out16 when not
// null (the operand of the product that reads it, see Backend::hold_operand); out may be null
// (Backend::hold_operand_only: only the bf16 copy is read)
template <class X>
__device__ __forceinline__ void gelu_fwd_body(float* out, bf16_t* out16, const X* x, long long n) {
    elementwise4<float>(n, [&](long long i) { return load_f32(x, i); }, [&](long long i, float v) {
        const float y = __fmul_rn(__fmul_rn(0.5f, v), __fadd_rn(1.0f, gelu_tanh(v)));
        if (out != nullptr) out[i] = y;
        if (out16 != nullptr) out16[i] = f32_to_bf16(y);
    });
}

extern "C" __global__ void gelu_fwd(float* out, bf16_t* out16, const float* x, long long n) { gelu_fwd_body(out, out16, x, n); }
// *_x16: the same kernel reading x as bf16 (a pre-activation that its product wrote as a held
// copy alone, Backend::hold_operand_only), each value widened to f32 as it is loaded
extern "C" __global__ void gelu_fwd_x16(float* out, bf16_t* out16, const bf16_t* x, long long n) { gelu_fwd_body(out, out16, x, n); }

// dx = gelu_grad(x, dout) (common.cuh; overwritten)
template <class X>
__device__ __forceinline__ void gelu_bwd_body(float* dx, const X* x, const float* dout, long long n) {
    elementwise4<float2>(n, [&](long long i) { return make_float2(load_f32(x, i), dout[i]); }, [&](long long i, float2 xd) { dx[i] = gelu_grad(xd.x, xd.y); });
}

extern "C" __global__ void gelu_bwd(float* dx, const float* x, const float* dout, long long n) { gelu_bwd_body(dx, x, dout, n); }
extern "C" __global__ void gelu_bwd_x16(float* dx, const bf16_t* x, const float* dout, long long n) { gelu_bwd_body(dx, x, dout, n); }

// x is [rows, 2 * i] (gate, then up); out is [rows, i]: out = gate * sigmoid(gate) * up (and in
// bf16 into out16 when not null, as gelu_fwd).
template <class X>
__device__ __forceinline__ void swiglu_fwd_body(float* out, bf16_t* out16, const X* x, long long rows, int i) {
    const long long n = rows * (long long)i;
    elementwise4<float2>(
        n,
        [&](long long e) {
            const long long r = e / i;
            const long long at = r * 2 * i + (e - r * i);
            return make_float2(load_f32(x, at), load_f32(x, at + i));
        },
        [&](long long e, float2 gu) {
            const float sig = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-gu.x)));
            const float y = __fmul_rn(__fmul_rn(gu.x, sig), gu.y);
            if (out != nullptr) out[e] = y;
            if (out16 != nullptr) out16[e] = f32_to_bf16(y);
        });
}

extern "C" __global__ void swiglu_fwd(float* out, bf16_t* out16, const float* x, long long rows, int i) { swiglu_fwd_body(out, out16, x, rows, i); }
extern "C" __global__ void swiglu_fwd_x16(float* out, bf16_t* out16, const bf16_t* x, long long rows, int i) { swiglu_fwd_body(out, out16, x, rows, i); }

// dx is [rows, 2 * i] (overwritten): d gate = dout * up * s * (1 + g * (1 - s)), d up = dout * silu(g).
// The gradients of swiglu at each element (r, j) of [rows, i], handed to store(r, j, dgate, dup).
template <class X, class D, class Store>
__device__ __forceinline__ void swiglu_bwd_body(const X* x, const D* dout, long long rows, int i, Store store) {
    const long long n = rows * (long long)i;
    elementwise4<float4>(
        n,
        [&](long long e) {
            const long long r = e / i;
            const long long gi = r * 2 * i + (e - r * i);
            return make_float4(load_f32(x, gi), load_f32(x, gi + i), load_f32(dout, e), (float)0);
        },
        [&](long long e, float4 v) {
            const long long r = e / i;
            const float g = v.x, up = v.y, d = v.z;
            const float s = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-g)));
            const float silu = __fmul_rn(g, s);
            const float tail = __fadd_rn(1.0f, __fmul_rn(g, __fsub_rn(1.0f, s)));
            store(r, e - r * i, __fmul_rn(__fmul_rn(__fmul_rn(d, up), s), tail), __fmul_rn(d, silu));
        });
}

template <class X>
__device__ __forceinline__ void swiglu_bwd_f32(float* dx, const X* x, const float* dout, long long rows, int i) {
    swiglu_bwd_body(x, dout, rows, i, [&](long long r, long long j, float dgate, float dup) {
        dx[r * 2 * i + j] = dgate;
        dx[r * 2 * i + i + j] = dup;
    });
}

extern "C" __global__ void swiglu_bwd(float* dx, const float* x, const float* dout, long long rows, int i) { swiglu_bwd_f32(dx, x, dout, rows, i); }
extern "C" __global__ void swiglu_bwd_x16(float* dx, const bf16_t* x, const float* dout, long long rows, int i) { swiglu_bwd_f32(dx, x, dout, rows, i); }

// swiglu_bwd's gradients rounded to bf16 into rows of stride ld (>= 2i; pad columns untouched),
// without the f32 gradient: the backward products' operand (Backend::act_matmul_bwd).
template <class X, class D>
__device__ __forceinline__ void swiglu_bwd_to_bf16(bf16_t* dx16, long long ld, const X* x, const D* dout, long long rows, int i) {
    swiglu_bwd_body(x, dout, rows, i, [&](long long r, long long j, float dgate, float dup) {
        dx16[r * ld + j] = f32_to_bf16(dgate);
        dx16[r * ld + i + j] = f32_to_bf16(dup);
    });
}

extern "C" __global__ void swiglu_bwd_bf16(bf16_t* dx16, long long ld, const float* x, const float* dout, long long rows, int i) {
    swiglu_bwd_to_bf16(dx16, ld, x, dout, rows, i);
}
extern "C" __global__ void swiglu_bwd_bf16_x16(bf16_t* dx16, long long ld, const bf16_t* x, const float* dout, long long rows, int i) {
    swiglu_bwd_to_bf16(dx16, ld, x, dout, rows, i);
}
// *_d16: dout read as bf16 (a held copy the down-projection's input-gradient product wrote alone)
extern "C" __global__ void swiglu_bwd_bf16_d16(bf16_t* dx16, long long ld, const float* x, const bf16_t* dout, long long rows, int i) {
    swiglu_bwd_to_bf16(dx16, ld, x, dout, rows, i);
}
extern "C" __global__ void swiglu_bwd_bf16_x16_d16(bf16_t* dx16, long long ld, const bf16_t* x, const bf16_t* dout, long long rows, int i) {
    swiglu_bwd_to_bf16(dx16, ld, x, dout, rows, i);
}
