// LayerNorm (GPT-2) and RMSNorm (Llama), forward and backward. CPU twins: cpu/norm.rs.
//
// *_fwd, *_bwd_dx: one block of 256 threads per row, grid rows. Row sums are block reductions in a
//   fixed order; the elementwise arithmetic is in the CPU's order with explicitly rounded operations.
//   The backward kernels ACCUMULATE into dx (dx += ...), as the CPU does.
// *_bwd_params: the row-block partials of dw (and db) (common.cuh `reduce_rows_partials`, launched
//   as it says), which reduce_partials (reduce.cu) adds to dw (and db): deterministic, equal to
//   the CPU's to rounding (its row blocks differ).
// *_bwd_fused: *_bwd_dx and *_bwd_params in one pass over dout and x, for rows of at most
//   NORM_FUSED_COLS * 256 values (wider rows take the two kernels): block b takes the RR_ROWS rows
//   of row block b one after the other, each as *_bwd_dx takes its row (the same dx, bit for bit;
//   dout, x and w stay in registers between the row's two passes), and adds the row's parameter
//   terms to its columns' partials in row order from 0, as reduce_rows_partials does (the same
//   partials, bit for bit, for reduce_partials). Launch: grid ceil(rows / RR_ROWS), block 256.

#define NORM_THREADS 256

// The forward kernels also write each output rounded to bf16 into out16 (when not null): the
// operand of the products that read it (see Backend::hold_operand), without a cast pass. With
// out null they write only out16 (Backend::hold_operand_only: nothing reads the f32 values).
extern "C" __global__ void __launch_bounds__(NORM_THREADS) layernorm_fwd(float* out, bf16_t* out16, float* mean, float* rstd, const float* x, const float* w, const float* b, int rows, int c, float eps) {
    __shared__ float scratch[NORM_THREADS / 32];
    const long long r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + r * c;
    float acc = 0.0f;
    for (int i = threadIdx.x; i < c; i += NORM_THREADS) acc = __fadd_rn(acc, xr[i]);
    const float m = __fdiv_rn(block_sum<NORM_THREADS>(acc, scratch), (float)c);
    // two passes, as the definition: the variance of (x - mean)
    acc = 0.0f;
    for (int i = threadIdx.x; i < c; i += NORM_THREADS) {
        const float d = __fsub_rn(xr[i], m);
        acc = __fadd_rn(acc, __fmul_rn(d, d));
    }
    const float var = __fdiv_rn(block_sum<NORM_THREADS>(acc, scratch), (float)c);
    const float s = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(var, eps)));
    if (threadIdx.x == 0) {
        mean[r] = m;
        rstd[r] = s;
    }
    float* o = out != nullptr ? out + r * c : nullptr;
    for (int i = threadIdx.x; i < c; i += NORM_THREADS) {
        const float y = __fmul_rn(__fmul_rn(__fsub_rn(xr[i], m), s), w[i]);
        const float v = b != nullptr ? __fadd_rn(y, b[i]) : y;
        if (out != nullptr) o[i] = v;
        if (out16 != nullptr) out16[r * c + i] = f32_to_bf16(v);
    }
}

// dx += (w * dout - mean(w * dout) - n * mean(w * dout * n)) * rstd, n = (x - mean) * rstd
extern "C" __global__ void __launch_bounds__(NORM_THREADS) layernorm_bwd_dx(float* dx, const float* dout, const float* x, const float* w, const float* mean, const float* rstd, int rows, int c) {
    __shared__ float scratch[NORM_THREADS / 32];
    const long long r = blockIdx.x;
    if (r >= rows) return;
    const float m = mean[r], s = rstd[r];
    const float* xr = x + r * c;
    const float* dr = dout + r * c;
    float a0 = 0.0f, a1 = 0.0f;
    for (int i = threadIdx.x; i < c; i += NORM_THREADS) {
        const float n = __fmul_rn(__fsub_rn(xr[i], m), s);
        const float dn = __fmul_rn(w[i], dr[i]);
        a0 = __fadd_rn(a0, dn);
        a1 = __fadd_rn(a1, __fmul_rn(dn, n));
    }
    const float dnorm_mean = __fdiv_rn(block_sum<NORM_THREADS>(a0, scratch), (float)c);
    const float dnorm_norm_mean = __fdiv_rn(block_sum<NORM_THREADS>(a1, scratch), (float)c);
    float* dxr = dx + r * c;
    for (int i = threadIdx.x; i < c; i += NORM_THREADS) {
        const float n = __fmul_rn(__fsub_rn(xr[i], m), s);
        const float t = __fsub_rn(__fsub_rn(__fmul_rn(w[i], dr[i]), dnorm_mean), __fmul_rn(n, dnorm_norm_mean));
        dxr[i] = __fadd_rn(dxr[i], __fmul_rn(t, s));
    }
}

/// Row r's terms of the norm parameter gradients (`reduce_rows_partials`): dw gets dout * (x - mean) *
/// rstd (CENTER, layernorm) or dout * x * rstd (rmsnorm, `mean` unused); with N = 2, db gets dout.
template <bool CENTER, int N>
struct NormParamTerm {
    static constexpr int NOUT = N;
    const float* dout;
    const float* x;
    const float* mean;
    const float* rstd;
    int c;
    __device__ __forceinline__ void term(long long r, int j, float* t) const {
        const float d = dout[r * c + j];
        const float xc = CENTER ? __fsub_rn(x[r * c + j], mean[r]) : x[r * c + j];
        t[0] = __fmul_rn(__fmul_rn(d, xc), rstd[r]);
        if constexpr (N == 2) t[1] = d;
    }
};

// the partials of dw (nout 1) or of dw and db (nout 2): dout * (x - mean) * rstd, dout
extern "C" __global__ void __launch_bounds__(256) layernorm_bwd_params(float* part, int nout, const float* dout, const float* x, const float* mean, const float* rstd, int rows, int c) {
    if (nout == 2) {
        reduce_rows_partials(part, rows, c, NormParamTerm<true, 2>{dout, x, mean, rstd, c});
    } else {
        reduce_rows_partials(part, rows, c, NormParamTerm<true, 1>{dout, x, mean, rstd, c});
    }
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS) rmsnorm_fwd(float* out, bf16_t* out16, float* rstd, const float* x, const float* w, int rows, int c, float eps) {
    __shared__ float scratch[NORM_THREADS / 32];
    const long long r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + r * c;
    float acc = 0.0f;
    for (int i = threadIdx.x; i < c; i += NORM_THREADS) acc = __fadd_rn(acc, __fmul_rn(xr[i], xr[i]));
    const float ms = __fdiv_rn(block_sum<NORM_THREADS>(acc, scratch), (float)c);
    const float s = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(ms, eps)));
    if (threadIdx.x == 0) rstd[r] = s;
    float* o = out != nullptr ? out + r * c : nullptr;
    for (int i = threadIdx.x; i < c; i += NORM_THREADS) {
        const float v = __fmul_rn(w[i], __fmul_rn(xr[i], s));
        if (out != nullptr) o[i] = v;
        if (out16 != nullptr) out16[r * c + i] = f32_to_bf16(v);
    }
}

// dx += rstd * (w * dout - x * rstd * mean(w * dout * x * rstd))
extern "C" __global__ void __launch_bounds__(NORM_THREADS) rmsnorm_bwd_dx(float* dx, const float* dout, const float* x, const float* w, const float* rstd, int rows, int c) {
    __shared__ float scratch[NORM_THREADS / 32];
    const long long r = blockIdx.x;
    if (r >= rows) return;
    const float s = rstd[r];
    const float* xr = x + r * c;
    const float* dr = dout + r * c;
    float acc = 0.0f;
    for (int i = threadIdx.x; i < c; i += NORM_THREADS) acc = __fadd_rn(acc, __fmul_rn(__fmul_rn(__fmul_rn(w[i], dr[i]), xr[i]), s));
    const float dn_n = __fdiv_rn(block_sum<NORM_THREADS>(acc, scratch), (float)c);
    float* dxr = dx + r * c;
    for (int i = threadIdx.x; i < c; i += NORM_THREADS) {
        const float t = __fsub_rn(__fmul_rn(w[i], dr[i]), __fmul_rn(__fmul_rn(xr[i], s), dn_n));
        dxr[i] = __fadd_rn(dxr[i], __fmul_rn(s, t));
    }
}

// the partials of dw: dout * x * rstd
extern "C" __global__ void __launch_bounds__(256) rmsnorm_bwd_params(float* part, const float* dout, const float* x, const float* rstd, int rows, int c) {
    reduce_rows_partials(part, rows, c, NormParamTerm<false, 1>{dout, x, nullptr, rstd, c});
}

#define NORM_FUSED_COLS 8
#define NORM_FUSED_ROWS 4

// block_sum of each of v[0..N) at once (one pair of barriers for all N): the same tree per value,
// so each result is block_sum's bit for bit. scratch holds N * NT / 32 values.
template <int NT, int N>
__device__ __forceinline__ void block_sum_n(float* v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] = warp_sum(v[j]);
    __syncthreads();  // scratch may still be read by a previous reduction
    if (lane == 0) {
#pragma unroll
        for (int j = 0; j < N; ++j) scratch[j * (NT / 32) + warp] = v[j];
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < N; ++j) {
        float t = 0.0f;
#pragma unroll
        for (int w = 0; w < NT / 32; ++w) t = t + scratch[j * (NT / 32) + w];
        v[j] = t;
    }
}

// CENTER: LayerNorm (mean used; nout 2 also sums db), else RMSNorm (nout 1). The block takes its
// rows NORM_FUSED_ROWS at a time (their loads in flight together, their row sums in one
// reduction).
template <bool CENTER, class D>
__device__ __forceinline__ void norm_bwd_fused(float* part, float* dx, int nout, const D* dout, const float* x, const float* w, const float* mean, const float* rstd, int rows, int c) {
    constexpr int K = NORM_FUSED_COLS, G = NORM_FUSED_ROWS, NA = CENTER ? 2 : 1;
    __shared__ float scratch[G * NA * (NORM_THREADS / 32)];
    float wv[K], pw[K], pb[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
        const int i = threadIdx.x + k * NORM_THREADS;
        wv[k] = i < c ? w[i] : 0.0f;
        pw[k] = 0.0f;
        pb[k] = 0.0f;
    }
    const int blk = blockIdx.x;
    const int r1 = min((blk + 1) * RR_ROWS, rows);
    for (int r0 = blk * RR_ROWS; r0 < r1; r0 += G) {
        float xv[G][K], dv[G][K], a[G * NA], m[G], s[G];
#pragma unroll
        for (int u = 0; u < G; ++u) {
            const int r = r0 + u;
            const bool row = r < r1;
            m[u] = CENTER && row ? mean[r] : 0.0f;
            s[u] = row ? rstd[r] : 0.0f;
#pragma unroll
            for (int k = 0; k < K; ++k) {
                const int i = threadIdx.x + k * NORM_THREADS;
                xv[u][k] = row && i < c ? x[(long long)r * c + i] : 0.0f;
                dv[u][k] = row && i < c ? load_f32(dout, (long long)r * c + i) : 0.0f;
            }
        }
#pragma unroll
        for (int u = 0; u < G; ++u) {
            float a0 = 0.0f, a1 = 0.0f;
#pragma unroll
            for (int k = 0; k < K; ++k) {
                const int i = threadIdx.x + k * NORM_THREADS;
                if (r0 + u >= r1 || i >= c) continue;
                if (CENTER) {
                    const float n = __fmul_rn(__fsub_rn(xv[u][k], m[u]), s[u]);
                    const float dn = __fmul_rn(wv[k], dv[u][k]);
                    a0 = __fadd_rn(a0, dn);
                    a1 = __fadd_rn(a1, __fmul_rn(dn, n));
                } else {
                    a0 = __fadd_rn(a0, __fmul_rn(__fmul_rn(__fmul_rn(wv[k], dv[u][k]), xv[u][k]), s[u]));
                }
                // NormParamTerm's terms, added in row order
                const float xc = CENTER ? __fsub_rn(xv[u][k], m[u]) : xv[u][k];
                pw[k] = __fadd_rn(pw[k], __fmul_rn(__fmul_rn(dv[u][k], xc), s[u]));
                pb[k] = __fadd_rn(pb[k], dv[u][k]);
            }
            a[u * NA] = a0;
            if (CENTER) a[u * NA + NA - 1] = a1;
        }
        block_sum_n<NORM_THREADS, G * NA>(a, scratch);
#pragma unroll
        for (int u = 0; u < G; ++u) {
            const int r = r0 + u;
            if (r >= r1) continue;
            float* dxr = dx + (long long)r * c;
            const float a0 = __fdiv_rn(a[u * NA], (float)c), a1 = __fdiv_rn(a[u * NA + NA - 1], (float)c);
#pragma unroll
            for (int k = 0; k < K; ++k) {
                const int i = threadIdx.x + k * NORM_THREADS;
                if (i >= c) continue;
                float t;
                if (CENTER) {
                    // a0: mean(w dout), a1: mean(w dout n)
                    const float n = __fmul_rn(__fsub_rn(xv[u][k], m[u]), s[u]);
                    t = __fmul_rn(__fsub_rn(__fsub_rn(__fmul_rn(wv[k], dv[u][k]), a0), __fmul_rn(n, a1)), s[u]);
                } else {
                    // a0: mean(w dout x rstd)
                    t = __fmul_rn(s[u], __fsub_rn(__fmul_rn(wv[k], dv[u][k]), __fmul_rn(__fmul_rn(xv[u][k], s[u]), a0)));
                }
                dxr[i] = __fadd_rn(dxr[i], t);
            }
        }
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
        const int i = threadIdx.x + k * NORM_THREADS;
        if (i >= c) continue;
        part[(long long)blk * nout * c + i] = pw[k];
        if (nout == 2) part[((long long)blk * nout + 1) * c + i] = pb[k];
    }
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS) layernorm_bwd_fused(float* part, float* dx, int nout, const float* dout, const float* x, const float* w, const float* mean, const float* rstd, int rows, int c) {
    norm_bwd_fused<true>(part, dx, nout, dout, x, w, mean, rstd, rows, c);
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS) rmsnorm_bwd_fused(float* part, float* dx, const float* dout, const float* x, const float* w, const float* rstd, int rows, int c) {
    norm_bwd_fused<false>(part, dx, 1, dout, x, w, nullptr, rstd, rows, c);
}

// *_d16: the same reading dout as bf16 (an input gradient that its product wrote as a held copy
// alone, Backend::hold_operand_only), each value widened to f32 as it is loaded
extern "C" __global__ void __launch_bounds__(NORM_THREADS) layernorm_bwd_fused_d16(float* part, float* dx, int nout, const bf16_t* dout, const float* x, const float* w, const float* mean, const float* rstd, int rows, int c) {
    norm_bwd_fused<true>(part, dx, nout, dout, x, w, mean, rstd, rows, c);
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS) rmsnorm_bwd_fused_d16(float* part, float* dx, const bf16_t* dout, const float* x, const float* w, const float* rstd, int rows, int c) {
    norm_bwd_fused<false>(part, dx, 1, dout, x, w, nullptr, rstd, rows, c);
}
