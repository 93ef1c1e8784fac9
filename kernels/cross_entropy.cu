// Softmax cross-entropy and per-token statistics of rows of logits [rows, v], ignore index -100.
// CPU twins: cpu/loss.rs `cross_entropy`, `token_stats`, `token_stats_bwd`.
// Launch (all): one block of 512 threads per row, grid rows. Each row is read at most twice (once
// by cross_entropy_bf16_staged, with v * 2 bytes of dynamic shared memory).
// Block reductions combine the threads' partial results in a fixed order (deterministic).

#define CE_THREADS 512
#define CE_WARPS (CE_THREADS / 32)
// The loss passes load four of a thread's elements at once (HBM3e needs the bytes in flight: one
// load at a time ran the GPT-2 loss at 1.8 TB/s on an H200); each thread still takes its elements
// in the same order, so the results do not change.
#define CE_UNROLL 4

/// A thread's next CE_UNROLL elements of a row, z[j0 + u * CE_THREADS] (0 past the end), loaded
/// together (as f32: the logits are f32 or bf16).
template <class T>
__device__ __forceinline__ void load_ahead(float* xs, const T* z, int j0, int v) {
#pragma unroll
    for (int u = 0; u < CE_UNROLL; ++u) {
        const int j = j0 + u * CE_THREADS;
        xs[u] = j < v ? load_f32(z, j) : 0.0f;
    }
}

/// Merges two (max, sum of exp(x - max)) pairs; symmetric in its arguments (bitwise), so an xor
/// butterfly leaves the same value in every lane. An empty side has max = -inf and sum 0.
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
    const float mx = m > m2 ? m : m2;
    const float a = m == neg_inf() ? 0.0f : s * expf(m - mx);
    const float b = m2 == neg_inf() ? 0.0f : s2 * expf(m2 - mx);
    m = mx;
    s = a + b;
}

/// Online max / sum-exp / sum over a row, reduced over the block: every thread gets the row's
/// max, sum of exp(z - max) and sum of z. With `stage` non-null (bf16 logits) each element read
/// is also stored there, at its index, by the thread that reads it. Contains __syncthreads.
template <class T>
__device__ __forceinline__ void row_online_stats(const T* z, int v, float& out_m, float& out_s, float& out_sum, bf16_t* stage) {
    __shared__ float sm_m[CE_WARPS], sm_s[CE_WARPS], sm_z[CE_WARPS];
    float m = neg_inf(), s = 0.0f, sz = 0.0f;
    // four elements' loads issued together, then taken in the thread's order j, j + 512, ...
    for (int j0 = threadIdx.x; j0 < v; j0 += CE_UNROLL * CE_THREADS) {
        float xs[CE_UNROLL];
        load_ahead(xs, z, j0, v);
#pragma unroll
        for (int u = 0; u < CE_UNROLL; ++u) {
            if (j0 + u * CE_THREADS >= v) break;
            const float x = xs[u];
            // a widened bf16 value rounds back to itself (a NaN stays a NaN)
            if (stage != nullptr) stage[j0 + u * CE_THREADS] = f32_to_bf16(x);
            sz += x;
            if (x > m) {
                s = s * expf(m - x) + 1.0f;  // expf(-inf) = 0 for the first element
                m = x;
            } else if (m != neg_inf()) {
                s += expf(x - m);
            }
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
        const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
        lse_merge(m, s, m2, s2);
        sz += __shfl_xor_sync(0xffffffffu, sz, o);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        sm_m[warp] = m;
        sm_s[warp] = s;
        sm_z[warp] = sz;
    }
    __syncthreads();
    m = sm_m[0];
    s = sm_s[0];
    sz = sm_z[0];
    for (int w = 1; w < CE_WARPS; ++w) {
        lse_merge(m, s, sm_m[w], sm_s[w]);
        sz += sm_z[w];
    }
    out_m = m;
    out_s = s;
    out_sum = sz;
}

// Row r of the logits is z = logits + r * ld (ld >= v: rows may be padded, see backend::aligned_ld).
// loss_rows[r] = (1 - smoothing) * (lse - z[y]) + smoothing * (lse - mean(z)), 0 for y = -100.
// With write_grad != 0 the row's gradient grad_scale * dloss/dz:
//   grad_scale * softmax(z) - grad_scale * smoothing / v, minus grad_scale * (1 - smoothing) at y;
// ignored rows get 0. It overwrites the row (rounded to bf16 when the logits are bf16), or, with
// z16 non-null, goes to z16 rounded to bf16 (the operand of the head's backward products; the
// logits are left as they are). The logits are f32 or bf16; the math is f32 either way. With
// `stage` non-null (bf16 logits, shared memory of v values) the gradient pass reads the row from
// there, where the first pass put it: the row is read from device memory once.
template <class T>
__device__ __forceinline__ void ce_row(T* z, bf16_t* z16, float* loss_rows, long long r, int y, int v, float smoothing, float grad_scale, int write_grad, bf16_t* stage) {
    if (y == IGNORE_INDEX) {
        if (threadIdx.x == 0) loss_rows[r] = 0.0f;
        if (write_grad) {
            for (int j = threadIdx.x; j < v; j += CE_THREADS) {
                if (z16 != nullptr) {
                    z16[j] = 0;
                } else {
                    store_f32(z, j, 0.0f);
                }
            }
        }
        return;
    }
    float mx, sum, zsum;
    row_online_stats(z, v, mx, sum, zsum, stage);
    const bool y_ok = y >= 0 && y < v;  // the CPU would panic on a target out of range: NaN here
    if (threadIdx.x == 0) {
        const float zy = y_ok ? load_f32(z, y) : __int_as_float(0x7fc00000);
        const float lse = __fadd_rn(mx, logf(sum));
        const float mean = __fdiv_rn(zsum, (float)v);
        loss_rows[r] = __fadd_rn(__fmul_rn(__fsub_rn(1.0f, smoothing), __fsub_rn(lse, zy)), __fmul_rn(smoothing, __fsub_rn(lse, mean)));
    }
    if (!write_grad) return;
    __syncthreads();  // z[y] is read above before being overwritten below
    const float inv = __fdiv_rn(grad_scale, sum);
    const float off = __fdiv_rn(__fmul_rn(grad_scale, smoothing), (float)v);
    const float hit = __fmul_rn(grad_scale, __fsub_rn(1.0f, smoothing));
    for (int j0 = threadIdx.x; j0 < v; j0 += CE_UNROLL * CE_THREADS) {
        float xs[CE_UNROLL];
        // each thread reads back the elements it staged (the same indices as the first pass)
        if (stage != nullptr) {
            load_ahead(xs, stage, j0, v);
        } else {
            load_ahead(xs, z, j0, v);
        }
#pragma unroll
        for (int u = 0; u < CE_UNROLL; ++u) {
            const int j = j0 + u * CE_THREADS;
            if (j >= v) break;
            const float e = expf(__fsub_rn(xs[u], mx));
            float gj = __fsub_rn(__fmul_rn(e, inv), off);
            if (j == y) gj = __fsub_rn(gj, hit);
            if (z16 != nullptr) {
                z16[j] = f32_to_bf16(gj);
            } else {
                store_f32(z, j, gj);
            }
        }
    }
}

// f32 logits; the gradient over them, or with grad16 non-null into grad16 + r * ld in bf16.
extern "C" __global__ void __launch_bounds__(CE_THREADS) cross_entropy(float* logits, long long ld, bf16_t* grad16, float* loss_rows, const int* targets, int rows, int v, float smoothing, float grad_scale, int write_grad) {
    const long long r = blockIdx.x;
    if (r >= rows) return;
    ce_row(logits + r * ld, grad16 == nullptr ? nullptr : grad16 + r * ld, loss_rows, r, targets[r], v, smoothing, grad_scale, write_grad, (bf16_t*)nullptr);
}

// bf16 logits (the LM head's product writes them in bf16 mode: half the bytes written and read
// twice); the gradient over them, in bf16, the operand of the head's backward products.
extern "C" __global__ void __launch_bounds__(CE_THREADS) cross_entropy_bf16(bf16_t* logits, long long ld, float* loss_rows, const int* targets, int rows, int v, float smoothing, float grad_scale, int write_grad) {
    const long long r = blockIdx.x;
    if (r >= rows) return;
    ce_row(logits + r * ld, (bf16_t*)nullptr, loss_rows, r, targets[r], v, smoothing, grad_scale, write_grad, (bf16_t*)nullptr);
}

// cross_entropy_bf16 with the row staged in dynamic shared memory (v bf16 values, launched with
// v * 2 bytes): the gradient pass reads it there instead of from device memory. The same losses
// and gradient, bit for bit (the same values in the same order).
extern "C" __global__ void __launch_bounds__(CE_THREADS) cross_entropy_bf16_staged(bf16_t* logits, long long ld, float* loss_rows, const int* targets, int rows, int v, float smoothing, float grad_scale, int write_grad) {
    DYNAMIC_SHARED(bf16_t, stage);
    const long long r = blockIdx.x;
    if (r >= rows) return;
    ce_row(logits + r * ld, (bf16_t*)nullptr, loss_rows, r, targets[r], v, smoothing, grad_scale, write_grad, stage);
}

// Per row (target y != -100), for p = softmax(z): label_lp = z[y] - lse, lse, mean_lp = mean(z) - lse,
// entropy = lse - E_p[z], argmax = the lowest index of the maximum; row_lse = lse and row_mean_z =
// E_p[z] for the backward pass. Null outputs are not computed. Rows whose target is -100 get 0 in
// every requested output (argmax 0), as the CPU's zero-initialised vectors.
// Two passes over the row, as the CPU: the maximum (and argmax, sum of z), then the sums of
// exp(z - max) (and of exp(z - max) * z) relative to the exact maximum.
extern "C" __global__ void __launch_bounds__(CE_THREADS) token_stats(float* label_lp, float* lse, float* mean_lp, float* entropy, int* argmax, float* row_lse, float* row_mean_z, const float* logits, const int* targets, int rows, int v) {
    __shared__ float sm_a[CE_WARPS], sm_b[CE_WARPS];
    __shared__ int sm_i[CE_WARPS];
    const long long r = blockIdx.x;
    if (r >= rows) return;
    const int y = targets[r];
    if (y == IGNORE_INDEX) {
        if (threadIdx.x == 0) {
            if (label_lp) label_lp[r] = 0.0f;
            if (lse) lse[r] = 0.0f;
            if (mean_lp) mean_lp[r] = 0.0f;
            if (entropy) entropy[r] = 0.0f;
            if (argmax) argmax[r] = 0;
            if (row_lse) row_lse[r] = 0.0f;
            if (row_mean_z) row_mean_z[r] = 0.0f;
        }
        return;
    }
    const float* z = logits + r * v;
    const bool need_lse = label_lp || lse || mean_lp || entropy || row_lse || row_mean_z;
    const bool want_ez = entropy || row_mean_z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    // pass 1: maximum with its lowest index, and the sum of z
    float best = neg_inf(), zs = 0.0f;
    int at = 0;  // stays 0 when every value is -inf (or NaN), as the CPU's argmax
    for (int j = threadIdx.x; j < v; j += CE_THREADS) {
        const float x = z[j];
        zs += x;
        if (x > best) {
            best = x;
            at = j;
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float b2 = __shfl_xor_sync(0xffffffffu, best, o);
        const int a2 = __shfl_xor_sync(0xffffffffu, at, o);
        if (b2 > best || (b2 == best && a2 < at)) {
            best = b2;
            at = a2;
        }
        zs += __shfl_xor_sync(0xffffffffu, zs, o);
    }
    if (lane == 0) {
        sm_a[warp] = best;
        sm_b[warp] = zs;
        sm_i[warp] = at;
    }
    __syncthreads();
    best = sm_a[0];
    zs = sm_b[0];
    at = sm_i[0];
    for (int w = 1; w < CE_WARPS; ++w) {
        if (sm_a[w] > best || (sm_a[w] == best && sm_i[w] < at)) {
            best = sm_a[w];
            at = sm_i[w];
        }
        zs += sm_b[w];
    }
    if (argmax && threadIdx.x == 0) argmax[r] = at;
    if (!need_lse) return;
    __syncthreads();  // sm_a / sm_b are reused

    // pass 2: sum of exp(z - max) (and of exp(z - max) * z)
    float s = 0.0f, t = 0.0f;
    for (int j = threadIdx.x; j < v; j += CE_THREADS) {
        const float x = z[j];
        const float e = expf(x - best);
        s += e;
        if (want_ez) t += e * x;
    }
    s = warp_sum(s);
    t = warp_sum(t);
    if (lane == 0) {
        sm_a[warp] = s;
        sm_b[warp] = t;
    }
    __syncthreads();
    if (threadIdx.x != 0) return;
    s = 0.0f;
    t = 0.0f;
    for (int w = 0; w < CE_WARPS; ++w) {
        s += sm_a[w];
        t += sm_b[w];
    }
    const float l = __fadd_rn(best, logf(s));
    const float ez = want_ez ? __fdiv_rn(t, s) : 0.0f;
    if (label_lp) label_lp[r] = (y >= 0 && y < v) ? __fsub_rn(z[y], l) : __int_as_float(0x7fc00000);
    if (lse) lse[r] = l;
    if (row_lse) row_lse[r] = l;
    if (mean_lp) mean_lp[r] = __fsub_rn(__fdiv_rn(zs, (float)v), l);
    if (entropy) entropy[r] = __fsub_rn(l, ez);
    if (row_mean_z) row_mean_z[r] = ez;
}

// Overwrites each row with dloss/dz given dloss/dstatistic per row (a null pointer = zero), with
// p = exp(z - row_lse):  p * (a - g_entropy * (z - row_mean_z)) + g_mean_lp / v, plus g_label_lp at y,
// where a = g_lse - g_label_lp - g_mean_lp. Rows whose target is -100, or whose four gradients are
// all 0, get 0. One pass over the row.
extern "C" __global__ void __launch_bounds__(CE_THREADS) token_stats_bwd(float* logits, const int* targets, const float* row_lse, const float* row_mean_z, const float* d_label_lp, const float* d_lse, const float* d_mean_lp, const float* d_entropy, int rows, int v) {
    const long long r = blockIdx.x;
    if (r >= rows) return;
    float* z = logits + r * v;
    const int y = targets[r];
    const float g_lp = d_label_lp ? d_label_lp[r] : 0.0f;
    const float g_lse = d_lse ? d_lse[r] : 0.0f;
    const float g_mlp = d_mean_lp ? d_mean_lp[r] : 0.0f;
    const float g_h = d_entropy ? d_entropy[r] : 0.0f;
    if (y == IGNORE_INDEX || (g_lp == 0.0f && g_lse == 0.0f && g_mlp == 0.0f && g_h == 0.0f)) {
        for (int j = threadIdx.x; j < v; j += CE_THREADS) z[j] = 0.0f;
        return;
    }
    const float l = row_lse[r];
    const float ez = row_mean_z ? row_mean_z[r] : 0.0f;
    const float a = __fsub_rn(__fsub_rn(g_lse, g_lp), g_mlp);
    const float c = __fdiv_rn(g_mlp, (float)v);
    if (g_h == 0.0f) {
        for (int j = threadIdx.x; j < v; j += CE_THREADS) {
            float gj = __fadd_rn(__fmul_rn(expf(__fsub_rn(z[j], l)), a), c);
            if (j == y) gj = __fadd_rn(gj, g_lp);
            z[j] = gj;
        }
    } else {
        for (int j = threadIdx.x; j < v; j += CE_THREADS) {
            const float x = z[j];
            const float w = __fsub_rn(a, __fmul_rn(g_h, __fsub_rn(x, ez)));
            float gj = __fadd_rn(__fmul_rn(expf(__fsub_rn(x, l)), w), c);
            if (j == y) gj = __fadd_rn(gj, g_lp);
            z[j] = gj;
        }
    }
}
