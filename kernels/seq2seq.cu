// The encoder-decoder ops (backend/seq2seq.rs `Seq2SeqOps`). CPU twins: cpu/seq2seq.rs.
//
// Attention with an additive bias between `tq` queries and `tk` keys per sequence (T5's
// self-attention with its position bias, BART's, both models' cross attention), one row of
// probabilities per (sequence, head, query) kept as [batch, n_head, tq, tk] for the backward
// pass. q is [batch * tq, q_ld], k and v [batch * tk, k_ld / v_ld]; head h of a row sits at
// columns off + h * d. out is [batch * tq, n_head * d].
//
// biased_attention_fwd: one block per (b, h, i) (grid batch * n_head * tq, block 128). The
//   scores scale * q.k_j + bias[h, i, j] of the visible keys (key_mask[b * tk + j] != 0 when a
//   mask is given, j <= i when causal) go to the row of `probs`, then their softmax (a row with
//   no visible key attends evenly to all, as transformers' additive mask makes it); out[c] =
//   sum_j p'_j v_j[c] with p' the probabilities after dropout when a dropout key is given
//   (element ((b * n_head + h) * tq + i) * tk + j of the mask's stream; the kept row is the one
//   before dropout).
// biased_attention_bwd_rows: one block per (b, h, i): dP_j = dout . v_j (masked by the same
//   dropout), ds_j = p_j (dP_j - sum_j p_j dP_j) into `ds`, dq[c] = scale sum_j ds_j k_j[c].
// biased_attention_bwd_keys: one block per (b, h, j): dk[c] = scale sum_i ds_ij q_i[c], dv[c] =
//   sum_i p'_ij dout_i[c]. Every sum runs in index order in one thread: no atomics.
// biased_attention_bias_grad: dbias[h, i, j] += ds[b, h, i, j] for b in order (the CPU's order).
// position_bias_fwd / _bwd: T5's bias gathered from its [num_buckets, n_head] table by a [tq, tk]
//   bucket map, and its gradient scattered back: one thread per (bucket, head), summing the
//   positions of its bucket in index order (the CPU's order, so bitwise equal).
// geglu / gelu_erf / relu: the feed-forward activations, forward and backward, elementwise.

__device__ __forceinline__ bool s2s_keep(unsigned long long key, unsigned long long i, unsigned long long threshold) {
    unsigned long long z = key + (i + 1ull) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (z >> 32) >= threshold;
}

// p after the dropout mask of element `e` (no dropout when `dropping` is 0).
__device__ __forceinline__ float s2s_dropped(float p, int dropping, long long key, long long threshold, float dscale, long long e) {
    if (!dropping) return p;
    return s2s_keep((unsigned long long)key, (unsigned long long)e, (unsigned long long)threshold) ? __fmul_rn(p, dscale) : 0.0f;
}

__device__ __forceinline__ bool s2s_visible(const int* key_mask, int b, int tk, int i, int j, int causal) {
    if (causal && j > i) return false;
    return key_mask == nullptr || key_mask[(long long)b * tk + j] != 0;
}

extern "C" __global__ void __launch_bounds__(128) biased_attention_fwd(
    float* out, float* probs, const float* q, int q_ld, int q_off, const float* k, int k_ld, int k_off, const float* v, int v_ld, int v_off,
    const float* bias, const int* key_mask, int tq, int tk, int n_head, int d, int causal, float scale,
    int dropping, long long key, long long threshold, float dscale) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;  // (b * n_head + h) * tq + i
    const int i = (int)(row % tq);
    const int h = (int)((row / tq) % n_head);
    const int b = (int)(row / ((long long)tq * n_head));
    const float* qi = q + ((long long)b * tq + i) * q_ld + q_off + h * d;
    float* p = probs + row * tk;
    float m = neg_inf();
    int any = 0;
    for (int j = threadIdx.x; j < tk; j += blockDim.x) {
        if (s2s_visible(key_mask, b, tk, i, j, causal)) {
            const float* kj = k + ((long long)b * tk + j) * k_ld + k_off + h * d;
            float s = 0.0f;
            for (int c = 0; c < d; ++c) s = __fadd_rn(s, __fmul_rn(qi[c], kj[c]));
            s = __fmul_rn(s, scale);
            if (bias != nullptr) s = __fadd_rn(s, bias[((long long)h * tq + i) * tk + j]);
            p[j] = s;
            m = fmaxf(m, s);
            any = 1;
        } else {
            p[j] = neg_inf();
        }
    }
    m = block_max<128>(m, scratch);
    const float anyf = block_sum<128>((float)any, scratch);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < tk; j += blockDim.x) {
        const float e = anyf > 0.0f && p[j] > neg_inf() ? expf(p[j] - m) : 0.0f;
        p[j] = e;
        sum = __fadd_rn(sum, e);
    }
    sum = block_sum<128>(sum, scratch);
    const float inv = anyf > 0.0f ? 1.0f / sum : 0.0f;
    for (int j = threadIdx.x; j < tk; j += blockDim.x) p[j] = anyf > 0.0f ? __fmul_rn(p[j], inv) : 1.0f / (float)tk;
    __syncthreads();
    const long long first = row * tk;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float o = 0.0f;
        for (int j = 0; j < tk; ++j) {
            const float pj = s2s_dropped(p[j], dropping, key, threshold, dscale, first + j);
            o = __fadd_rn(o, __fmul_rn(pj, v[((long long)b * tk + j) * v_ld + v_off + h * d + c]));
        }
        out[((long long)b * tq + i) * n_head * d + h * d + c] = o;
    }
}

extern "C" __global__ void __launch_bounds__(128) biased_attention_bwd_rows(
    float* dq, float* ds, const float* dout, const float* probs, const float* k, int k_ld, int k_off, const float* v, int v_ld, int v_off,
    int tq, int tk, int n_head, int d, float scale, int dropping, long long key, long long threshold, float dscale) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const int i = (int)(row % tq);
    const int h = (int)((row / tq) % n_head);
    const int b = (int)(row / ((long long)tq * n_head));
    const int hd = n_head * d;
    const float* doi = dout + ((long long)b * tq + i) * hd + h * d;
    const float* p = probs + row * tk;
    float* g = ds + row * tk;
    float rowsum = 0.0f;
    for (int j = threadIdx.x; j < tk; j += blockDim.x) {
        const float* vj = v + ((long long)b * tk + j) * v_ld + v_off + h * d;
        float dp = 0.0f;
        for (int c = 0; c < d; ++c) dp = __fadd_rn(dp, __fmul_rn(doi[c], vj[c]));
        dp = s2s_dropped(dp, dropping, key, threshold, dscale, row * tk + j);
        g[j] = dp;
        rowsum = __fadd_rn(rowsum, __fmul_rn(p[j], dp));
    }
    rowsum = block_sum<128>(rowsum, scratch);
    for (int j = threadIdx.x; j < tk; j += blockDim.x) g[j] = __fmul_rn(p[j], __fsub_rn(g[j], rowsum));
    __syncthreads();
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < tk; ++j) acc = __fadd_rn(acc, __fmul_rn(g[j], k[((long long)b * tk + j) * k_ld + k_off + h * d + c]));
        dq[((long long)b * tq + i) * hd + h * d + c] = __fmul_rn(acc, scale);
    }
}

extern "C" __global__ void __launch_bounds__(128) biased_attention_bwd_keys(
    float* dk, float* dv, const float* ds, const float* dout, const float* probs, const float* q, int q_ld, int q_off,
    int tq, int tk, int n_head, int d, float scale, int dropping, long long key, long long threshold, float dscale) {
    const long long krow = blockIdx.x;  // (b * n_head + h) * tk + j
    const int j = (int)(krow % tk);
    const int h = (int)((krow / tk) % n_head);
    const int b = (int)(krow / ((long long)tk * n_head));
    const int hd = n_head * d;
    const long long base = ((long long)b * n_head + h) * tq * tk;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float ak = 0.0f, av = 0.0f;
        for (int i = 0; i < tq; ++i) {
            const long long e = base + (long long)i * tk + j;
            ak = __fadd_rn(ak, __fmul_rn(ds[e], q[((long long)b * tq + i) * q_ld + q_off + h * d + c]));
            const float pd = s2s_dropped(probs[e], dropping, key, threshold, dscale, e);
            av = __fadd_rn(av, __fmul_rn(pd, dout[((long long)b * tq + i) * hd + h * d + c]));
        }
        dk[((long long)b * tk + j) * hd + h * d + c] = __fmul_rn(ak, scale);
        dv[((long long)b * tk + j) * hd + h * d + c] = av;
    }
}

// dbias is [n_head, tq, tk] (n = n_head * tq * tk elements); ds is [batch, n_head, tq, tk].
extern "C" __global__ void biased_attention_bias_grad(float* dbias, const float* ds, int batch, long long n) {
    for (long long e = grid_start(); e < n; e += grid_stride()) {
        float acc = dbias[e];
        for (int b = 0; b < batch; ++b) acc = __fadd_rn(acc, ds[(long long)b * n + e]);
        dbias[e] = acc;
    }
}

// out[h, e] = table[buckets[e] * n_head + h] for the n = tq * tk positions e.
extern "C" __global__ void position_bias_fwd(float* out, const float* table, const int* buckets, long long n, int n_head) {
    for (long long x = grid_start(); x < n * n_head; x += grid_stride()) {
        const long long h = x / n, e = x - h * n;
        out[x] = table[(long long)buckets[e] * n_head + h];
    }
}

// dtable[bk, h] += dbias[h, e] over the positions e whose bucket is bk, in order: one thread per
// (bucket, head) of the num_buckets * n_head table entries.
extern "C" __global__ void position_bias_bwd(float* dtable, const float* dbias, const int* buckets, long long n, int n_head, int num_buckets) {
    for (long long x = grid_start(); x < (long long)num_buckets * n_head; x += grid_stride()) {
        const int bk = (int)(x / n_head), h = (int)(x % n_head);
        float acc = dtable[x];
        for (long long e = 0; e < n; ++e)
            if (buckets[e] == bk) acc = __fadd_rn(acc, dbias[(long long)h * n + e]);
        dtable[x] = acc;
    }
}

__device__ __forceinline__ float s2s_gelu_tanh(float x) {
    const float k = 0.7978846f, c = 0.044715f;
    return 0.5f * x * (1.0f + tanhf(k * (x + c * x * x * x)));
}

__device__ __forceinline__ float s2s_gelu_tanh_grad(float x) {
    const float k = 0.7978846f, c = 0.044715f;
    const float t = tanhf(k * (x + c * x * x * x));
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * k * (1.0f + 3.0f * c * x * x);
}

// x is [rows, 2i] (gate, then up); out [rows, i] = gelu_tanh(gate) * up.
extern "C" __global__ void geglu_fwd(float* out, const float* x, long long rows, int i) {
    for (long long e = grid_start(); e < rows * i; e += grid_stride()) {
        const long long r = e / i, c = e - r * i;
        out[e] = s2s_gelu_tanh(x[r * 2 * i + c]) * x[r * 2 * i + i + c];
    }
}

extern "C" __global__ void geglu_bwd(float* dx, const float* x, const float* dout, long long rows, int i) {
    for (long long e = grid_start(); e < rows * i; e += grid_stride()) {
        const long long r = e / i, c = e - r * i;
        const float gate = x[r * 2 * i + c], up = x[r * 2 * i + i + c], d = dout[e];
        dx[r * 2 * i + i + c] = d * s2s_gelu_tanh(gate);
        dx[r * 2 * i + c] = d * up * s2s_gelu_tanh_grad(gate);
    }
}

// The exact GELU, x * Phi(x).
extern "C" __global__ void gelu_erf_fwd(float* out, const float* x, long long n) {
    for (long long e = grid_start(); e < n; e += grid_stride()) out[e] = 0.5f * x[e] * (1.0f + erff(x[e] * 0.70710678f));
}

extern "C" __global__ void gelu_erf_bwd(float* dx, const float* x, const float* dout, long long n) {
    for (long long e = grid_start(); e < n; e += grid_stride()) {
        const float v = x[e];
        const float cdf = 0.5f * (1.0f + erff(v * 0.70710678f));
        dx[e] = dout[e] * (cdf + v * 0.3989423f * expf(-0.5f * v * v));
    }
}

extern "C" __global__ void relu_fwd(float* out, const float* x, long long n) {
    for (long long e = grid_start(); e < n; e += grid_stride()) out[e] = fmaxf(x[e], 0.0f);
}

extern "C" __global__ void relu_bwd(float* dx, const float* x, const float* dout, long long n) {
    for (long long e = grid_start(); e < n; e += grid_stride()) dx[e] = x[e] > 0.0f ? dout[e] : 0.0f;
}
