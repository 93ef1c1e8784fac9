// Causal grouped-query attention with a key padding mask, flash style (online softmax over key
// tiles staged in shared memory, f32 accumulation, only the log-sum-exp kept per query row).
// CPU twins: cpu/attention.rs `flash_fwd`, `flash_bwd`, `kv_append`, `attention_decode`.
//
// Layout: qkv is [batch * seq, (n_head + 2 * n_kv_head) * head_dim]: per row the query heads, then
// the key heads, then the value heads. out / dout are [batch * seq, n_head * head_dim]; lse and
// delta are [batch, n_head, seq]; key_mask is [batch * seq] (1 = attend). Query head h uses kv head
// h / (n_head / n_kv_head). Softmax scale 1 / sqrt(head_dim) (computed in f32, as the CPU).
// A query row with no allowed key (causal and padding) outputs zeros, gets lse = +inf and neither
// receives nor passes a gradient (P = 0 on its row), as the CPU.
//
// The kernels are templates on the element type T of qkv (float, or bf16 bits `unsigned short`,
// converted to f32 on load) and on D, the largest head_dim they handle (32, 64, 128): any runtime
// head_dim <= D works (the missing dimensions are zeros in registers and shared memory).
//
// Work split: a "team" of TPR adjacent threads owns one query row (or one key row in dkdv); thread
// `part` of the team owns the float4 chunks part, part + TPR, ... of the D dimensions, and dot
// products are completed with xor shuffles inside the team (every thread of a team ends up with
// bitwise the same value). The 128 threads of a block handle RSUB = 128 / TPR rows at a time: the
// block's 64 rows are done in 64 / RSUB passes (two passes for D = 128, which keeps the per-thread
// arrays at 32 floats).

#define ATT_THREADS 128
#define ATT_ROWS 64  // query rows (or keys, for dkdv) per block

template <int D>
struct Team {
    static constexpr int TPR = D >= 128 ? 4 : 2;  // threads per row
    static constexpr int RSUB = ATT_THREADS / TPR;  // rows per pass
    static constexpr int PASSES = ATT_ROWS / RSUB;
    static constexpr int DPT = D / TPR;  // dimensions per thread
    static constexpr int NCH = DPT / 4;  // float4 chunks per thread
    static constexpr int KT = D >= 128 ? 32 : 64;  // keys (dq) or queries (dkdv) per staged tile
    static constexpr int FKT = 32;  // keys per staged tile in the forward (scores kept in registers)
};

template <int TPR>
__device__ __forceinline__ float team_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    if (TPR >= 4) v += __shfl_xor_sync(0xffffffffu, v, 2);
    return v;
}

/// The thread's dimensions of one row (zeros past head_dim, or everywhere when !valid).
template <int D, typename T>
__device__ __forceinline__ void load_own(float* x, const T* row, int hd, bool valid, int part) {
    typedef Team<D> TM;
#pragma unroll
    for (int k = 0; k < TM::NCH; ++k) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int d = 4 * (TM::TPR * k + part) + e;
            x[4 * k + e] = (valid && d < hd) ? load_f32(row, d) : 0.0f;
        }
    }
}

/// Partial dot product of the thread's dimensions with a row of a shared tile.
template <int D>
__device__ __forceinline__ float dot_own(const float* x, const float* srow, int part) {
    typedef Team<D> TM;
    const float4* s4 = reinterpret_cast<const float4*>(srow);
    float acc = 0.0f;
#pragma unroll
    for (int k = 0; k < TM::NCH; ++k) {
        const float4 w = s4[TM::TPR * k + part];
        acc += x[4 * k] * w.x;
        acc += x[4 * k + 1] * w.y;
        acc += x[4 * k + 2] * w.z;
        acc += x[4 * k + 3] * w.w;
    }
    return acc;
}

/// x += a * (the thread's dimensions of a shared row).
template <int D>
__device__ __forceinline__ void axpy_own(float* x, float a, const float* srow, int part) {
    typedef Team<D> TM;
    const float4* s4 = reinterpret_cast<const float4*>(srow);
#pragma unroll
    for (int k = 0; k < TM::NCH; ++k) {
        const float4 w = s4[TM::TPR * k + part];
        x[4 * k] += a * w.x;
        x[4 * k + 1] += a * w.y;
        x[4 * k + 2] += a * w.z;
        x[4 * k + 3] += a * w.w;
    }
}

/// Writes the thread's dimensions (those < head_dim) of one f32 row (or, rounded, of a bf16 one).
template <int D, class O>
__device__ __forceinline__ void store_own(O* row, const float* x, int hd, int part) {
    typedef Team<D> TM;
#pragma unroll
    for (int k = 0; k < TM::NCH; ++k) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int d = 4 * (TM::TPR * k + part) + e;
            if (d < hd) store_f32(row, d, x[4 * k + e]);
        }
    }
}

/// Stages rows t0 .. t0 + NR of one head (column offset `col` in rows of width `width`, batch
/// row base `row0`) into a shared [NR][D] tile as f32, zero past head_dim and past seq.
template <int D, int NR, typename T>
__device__ __forceinline__ void stage_rows(float (*dst)[D], const T* src, long long row0, long long width, long long col, int t0, int seq, int hd) {
    for (int e = threadIdx.x; e < NR * D; e += ATT_THREADS) {
        const int j = e / D, d = e % D;
        const int t = t0 + j;
        float x = 0.0f;
        if (t < seq && d < hd) x = load_f32(src, (row0 + t) * width + col + d);
        dst[j][d] = x;
    }
}

/// Attention dropout (training): the mask of probability index ((b * n_head + h) * seq + i) * seq
/// + j, as backend::dropout_keep and cpu/attention.rs draw it; `factor` is 0 or scale.
struct AttnDrop {
    unsigned long long key, threshold;
    float scale;
    __device__ __forceinline__ float factor(long long idx) const {
        unsigned long long z = key + ((unsigned long long)idx + 1ull) * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        return (z >> 32) >= threshold ? scale : 0.0f;
    }
};

/// The block's view of one sequence b and kv head group g, shared by the three kernels.
template <int D>
struct AttnBlock {
    typedef Team<D> TM;
    long long width;      // qkv row width
    long long out_width;  // out / dout row width
    long long row0;       // first row of sequence b
    long long kcol, vcol; // columns of kv head g's keys and values
    float scale;          // softmax scale 1 / sqrt(head_dim)
    int lr, part;         // the thread's row in the pass and its part of the team
    __device__ __forceinline__ AttnBlock(int b, int g, int seq, int n_head, int n_kv_head, int hd)
        : width((long long)(n_head + 2 * n_kv_head) * hd),
          out_width((long long)n_head * hd),
          row0((long long)b * seq),
          kcol((long long)(n_head + g) * hd),
          vcol((long long)(n_head + n_kv_head + g) * hd),
          scale(__fdiv_rn(1.0f, __fsqrt_rn((float)hd))),
          lr(threadIdx.x / TM::TPR),
          part(threadIdx.x % TM::TPR) {}
};

/// Stages keys and values j0 .. j0 + KT of the block's kv head and their mask bits (key_ok: key
/// < seq and attended), after the previous tile is consumed; the tile is ready on return.
template <int D, int KT, typename T>
__device__ __forceinline__ void stage_kv_tile(float (*ks)[D], float (*vs)[D], int* key_ok, const T* qkv, const int* key_mask, const AttnBlock<D>& a, int j0, int seq, int hd) {
    __syncthreads();  // the previous tile is consumed
    stage_rows<D, KT>(ks, qkv, a.row0, a.width, a.kcol, j0, seq, hd);
    stage_rows<D, KT>(vs, qkv, a.row0, a.width, a.vcol, j0, seq, hd);
    if (threadIdx.x < KT) {
        const int t = j0 + threadIdx.x;
        key_ok[threadIdx.x] = t < seq && key_mask[a.row0 + t] != 0;
    }
    __syncthreads();
}

// ---- forward --------------------------------------------------------------------------------

template <typename T, int D, bool DROP = false>
__device__ __forceinline__ void attn_fwd(float* out, bf16_t* out16, float* lse, const T* qkv, const int* key_mask, int seq, int n_head, int n_kv_head, int hd, AttnDrop dr = {}) {
    typedef Team<D> TM;
    constexpr int KT = TM::FKT;
    __shared__ __align__(16) float ks[KT][D];
    __shared__ __align__(16) float vs[KT][D];
    __shared__ int key_ok[KT];
    const int b = blockIdx.z, h = blockIdx.y;
    const AttnBlock<D> a(b, h / (n_head / n_kv_head), seq, n_head, n_kv_head, hd);

    for (int pass = 0; pass < TM::PASSES; ++pass) {
        const int base = blockIdx.x * ATT_ROWS + pass * TM::RSUB;
        if (base >= seq) break;  // uniform over the block
        const int i = base + a.lr;
        const int key_end = min(base + TM::RSUB, seq);  // keys this pass's rows can see
        float q[TM::DPT], acc[TM::DPT];
        load_own<D>(q, qkv + (a.row0 + i) * a.width + (long long)h * hd, hd, i < seq, a.part);
#pragma unroll
        for (int k = 0; k < TM::DPT; ++k) acc[k] = 0.0f;
        float m = neg_inf(), l = 0.0f;

        for (int j0 = 0; j0 < key_end; j0 += KT) {
            stage_kv_tile<D, KT>(ks, vs, key_ok, qkv, key_mask, a, j0, seq, hd);

            float s[KT];
#pragma unroll
            for (int j = 0; j < KT; ++j) s[j] = dot_own<D>(q, ks[j], a.part);
            float bmax = neg_inf();
#pragma unroll
            for (int j = 0; j < KT; ++j) {
                const float x = team_sum<TM::TPR>(s[j]);
                s[j] = (key_ok[j] && j0 + j <= i) ? x * a.scale : neg_inf();
                bmax = s[j] > bmax ? s[j] : bmax;
            }
            if (bmax == neg_inf()) continue;  // nothing visible in this tile (same for the whole team)
            const float new_m = m > bmax ? m : bmax;
            const float corr = expf(m - new_m);  // 0 while m is -inf (then l and acc are 0 too)
            float tsum = 0.0f;
#pragma unroll
            for (int j = 0; j < KT; ++j) {
                s[j] = s[j] == neg_inf() ? 0.0f : expf(s[j] - new_m);
                tsum += s[j];
            }
            l = l * corr + tsum;
#pragma unroll
            for (int k = 0; k < TM::DPT; ++k) acc[k] *= corr;
            if (DROP) {
                // the sum above is of the undropped probabilities; the values take the dropped ones
                const long long zrow = (((long long)b * n_head + h) * seq + i) * seq + j0;
#pragma unroll
                for (int j = 0; j < KT; ++j) s[j] *= dr.factor(zrow + j);
            }
#pragma unroll
            for (int j = 0; j < KT; ++j) axpy_own<D>(acc, s[j], vs[j], a.part);
            m = new_m;
        }

        if (i < seq) {
            if (l == 0.0f) {
#pragma unroll
                for (int k = 0; k < TM::DPT; ++k) acc[k] = 0.0f;
                if (a.part == 0) lse[((long long)b * n_head + h) * seq + i] = pos_inf();
            } else {
                const float inv = 1.0f / l;
#pragma unroll
                for (int k = 0; k < TM::DPT; ++k) acc[k] *= inv;
                if (a.part == 0) lse[((long long)b * n_head + h) * seq + i] = m + logf(l);
            }
            // out null: only the bf16 copy (Backend::hold_operand_only)
            if (out != nullptr) store_own<D>(out + (a.row0 + i) * a.out_width + (long long)h * hd, acc, hd, a.part);
            // the output's bf16 copy for the product that reads it (Backend::hold_operand)
            if (out16 != nullptr) store_own<D>(out16 + (a.row0 + i) * a.out_width + (long long)h * hd, acc, hd, a.part);
        }
    }
}

// ---- backward: delta = rowsum(dout * out) ---------------------------------------------------

// Launch: grid (seq, n_head, batch), block 32. With dout16 non-null it also writes dout rounded
// to bf16 there (the tensor-core backward kernels read that copy). dout and out are f32 or bf16
// (held copies: the output projection's input gradient written in bf16 alone, the attention's
// output copy), widened as they are loaded; the sum is f32 in the same order either way.
template <class DO, class O>
__device__ __forceinline__ void attn_bwd_delta(float* delta, const DO* dout, const O* out, bf16_t* dout16, int batch, int seq, int n_head, int head_dim) {
    const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    if (t >= seq || b >= batch) return;
    const long long off = ((long long)b * seq + t) * ((long long)n_head * head_dim) + (long long)h * head_dim;
    float acc = 0.0f;
    for (int d = threadIdx.x; d < head_dim; d += 32) {
        const float g = load_f32(dout, off + d);
        acc += g * load_f32(out, off + d);
        if (dout16 != nullptr) dout16[off + d] = f32_to_bf16(g);
    }
    acc = warp_sum(acc);
    if (threadIdx.x == 0) delta[((long long)b * n_head + h) * seq + t] = acc;
}

extern "C" __global__ void __launch_bounds__(32) attention_bwd_delta(float* delta, const float* dout, const float* out, bf16_t* dout16, int batch, int seq, int n_head, int head_dim) {
    attn_bwd_delta(delta, dout, out, dout16, batch, seq, n_head, head_dim);
}
// out read as bf16 (its held copy)
extern "C" __global__ void __launch_bounds__(32) attention_bwd_delta_o16(float* delta, const float* dout, const bf16_t* out, bf16_t* dout16, int batch, int seq, int n_head, int head_dim) {
    attn_bwd_delta(delta, dout, out, dout16, batch, seq, n_head, head_dim);
}
// dout and out read as bf16 (dout16 unused: dout is the copy the tensor-core kernels read)
extern "C" __global__ void __launch_bounds__(32) attention_bwd_delta_d16_o16(float* delta, const bf16_t* dout, const bf16_t* out, bf16_t* dout16, int batch, int seq, int n_head, int head_dim) {
    attn_bwd_delta(delta, dout, out, (bf16_t*)nullptr, batch, seq, n_head, head_dim);
}

// ---- backward: dQ ---------------------------------------------------------------------------

// dq[i] = sum_j dS[i, j] * k[j], dS = P * (dP - delta) * scale, dP = dout . v, P = exp(s - lse).
template <typename T, int D, bool DROP = false>
__device__ __forceinline__ void attn_bwd_dq(float* dqkv, const float* dout, const T* qkv, const float* lse, const float* delta, const int* key_mask, int seq, int n_head, int n_kv_head, int hd, AttnDrop dr = {}) {
    typedef Team<D> TM;
    constexpr int KT = TM::KT;
    __shared__ __align__(16) float ks[KT][D];
    __shared__ __align__(16) float vs[KT][D];
    __shared__ int key_ok[KT];
    const int b = blockIdx.z, h = blockIdx.y;
    const AttnBlock<D> a(b, h / (n_head / n_kv_head), seq, n_head, n_kv_head, hd);

    for (int pass = 0; pass < TM::PASSES; ++pass) {
        const int base = blockIdx.x * ATT_ROWS + pass * TM::RSUB;
        if (base >= seq) break;
        const int i = base + a.lr;
        const int key_end = min(base + TM::RSUB, seq);
        const bool row_ok = i < seq;
        float q[TM::DPT], dO[TM::DPT], dq[TM::DPT];
        load_own<D>(q, qkv + (a.row0 + i) * a.width + (long long)h * hd, hd, row_ok, a.part);
        load_own<D>(dO, dout + (a.row0 + i) * a.out_width + (long long)h * hd, hd, row_ok, a.part);
#pragma unroll
        for (int k = 0; k < TM::DPT; ++k) dq[k] = 0.0f;
        const long long si = ((long long)b * n_head + h) * seq + i;
        const float li = row_ok ? lse[si] : pos_inf();
        const float di = row_ok ? delta[si] : 0.0f;
        const bool live = li != pos_inf();  // a row with no visible key passes no gradient

        for (int j0 = 0; j0 < key_end; j0 += KT) {
            stage_kv_tile<D, KT>(ks, vs, key_ok, qkv, key_mask, a, j0, seq, hd);
#pragma unroll 4
            for (int j = 0; j < KT; ++j) {
                const float s = team_sum<TM::TPR>(dot_own<D>(q, ks[j], a.part));
                float dp = team_sum<TM::TPR>(dot_own<D>(dO, vs[j], a.part));
                if (DROP) dp *= dr.factor(si * seq + j0 + j);
                const bool vis = live && key_ok[j] && j0 + j <= i;
                const float p = vis ? expf(s * a.scale - li) : 0.0f;
                const float ds = p * (dp - di) * a.scale;
                axpy_own<D>(dq, ds, ks[j], a.part);
            }
        }
        if (row_ok) store_own<D>(dqkv + (a.row0 + i) * a.width + (long long)h * hd, dq, hd, a.part);
    }
}

// ---- backward: dK, dV -----------------------------------------------------------------------

// Each block owns 64 keys of one kv head and loops over the query heads of its group and the
// queries at or after its keys: dv[j] += P[i, j] * dout[i], dk[j] += dS[i, j] * q[i]. No atomics.
template <typename T, int D, bool DROP = false>
__device__ __forceinline__ void attn_bwd_dkdv(float* dqkv, const float* dout, const T* qkv, const float* lse, const float* delta, const int* key_mask, int seq, int n_head, int n_kv_head, int hd, AttnDrop dr = {}) {
    typedef Team<D> TM;
    constexpr int QT = TM::KT;  // queries per staged tile
    __shared__ __align__(16) float qs[QT][D];
    __shared__ __align__(16) float dos[QT][D];
    __shared__ float lse_s[QT];
    __shared__ float del_s[QT];
    const int b = blockIdx.z, g = blockIdx.y;
    const int grp = n_head / n_kv_head;
    const AttnBlock<D> a(b, g, seq, n_head, n_kv_head, hd);

    for (int pass = 0; pass < TM::PASSES; ++pass) {
        const int base = blockIdx.x * ATT_ROWS + pass * TM::RSUB;
        if (base >= seq) break;
        const int jk = base + a.lr;  // this team's key
        const bool key_in = jk < seq;
        const bool key_live = key_in && key_mask[a.row0 + (key_in ? jk : 0)] != 0;
        float k[TM::DPT], v[TM::DPT], dk[TM::DPT], dv[TM::DPT];
        load_own<D>(k, qkv + (a.row0 + jk) * a.width + a.kcol, hd, key_in, a.part);
        load_own<D>(v, qkv + (a.row0 + jk) * a.width + a.vcol, hd, key_in, a.part);
#pragma unroll
        for (int x = 0; x < TM::DPT; ++x) {
            dk[x] = 0.0f;
            dv[x] = 0.0f;
        }

        for (int h = g * grp; h < (g + 1) * grp; ++h) {
            const long long qcol = (long long)h * hd, ocol = (long long)h * hd;
            const long long sbase = ((long long)b * n_head + h) * seq;
            for (int i0 = base; i0 < seq; i0 += QT) {
                __syncthreads();
                stage_rows<D, QT>(qs, qkv, a.row0, a.width, qcol, i0, seq, hd);
                stage_rows<D, QT>(dos, dout, a.row0, a.out_width, ocol, i0, seq, hd);
                if (threadIdx.x < QT) {
                    const int t = i0 + threadIdx.x;
                    lse_s[threadIdx.x] = t < seq ? lse[sbase + t] : pos_inf();
                    del_s[threadIdx.x] = t < seq ? delta[sbase + t] : 0.0f;
                }
                __syncthreads();
                const int nq = min(QT, seq - i0);
#pragma unroll 1
                for (int r = 0; r < nq; ++r) {
                    const float s = team_sum<TM::TPR>(dot_own<D>(k, qs[r], a.part));
                    float dp = team_sum<TM::TPR>(dot_own<D>(v, dos[r], a.part));
                    const float li = lse_s[r];
                    const bool vis = key_live && jk <= i0 + r && li != pos_inf();
                    const float p = vis ? expf(s * a.scale - li) : 0.0f;
                    float pv = p;  // the dropped probability, for dV
                    if (DROP) {
                        const float z = dr.factor((sbase + i0 + r) * seq + jk);
                        dp *= z;
                        pv *= z;
                    }
                    const float ds = p * (dp - del_s[r]) * a.scale;
                    axpy_own<D>(dv, pv, dos[r], a.part);
                    axpy_own<D>(dk, ds, qs[r], a.part);
                }
            }
        }
        if (key_in) {
            store_own<D>(dqkv + (a.row0 + jk) * a.width + a.kcol, dk, hd, a.part);
            store_own<D>(dqkv + (a.row0 + jk) * a.width + a.vcol, dv, hd, a.part);
        }
    }
}

// ---- exported instantiations ----------------------------------------------------------------
// fwd, dq: grid (ceil(seq / 64), n_head, batch); dkdv: grid (ceil(seq / 64), n_kv_head, batch);
// block 128 for all.

#define ATT_EXPORT(NAME, T, D)                                                                                             \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_fwd_##NAME##_d##D(                                 \
        float* out, bf16_t* out16, float* lse, const T* qkv, const int* key_mask, int batch, int seq, int n_head, int n_kv_head, \
        int head_dim) {                                                                                                    \
        if ((int)blockIdx.z >= batch) return;                                                                              \
        attn_fwd<T, D>(out, out16, lse, qkv, key_mask, seq, n_head, n_kv_head, head_dim);                                  \
    }                                                                                                                      \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_bwd_dq_##NAME##_d##D(                              \
        float* dqkv, const float* dout, const T* qkv, const float* lse, const float* delta, const int* key_mask, int batch, \
        int seq, int n_head, int n_kv_head, int head_dim) {                                                                \
        if ((int)blockIdx.z >= batch) return;                                                                              \
        attn_bwd_dq<T, D>(dqkv, dout, qkv, lse, delta, key_mask, seq, n_head, n_kv_head, head_dim);                        \
    }                                                                                                                      \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS, 1) attention_bwd_dkdv_##NAME##_d##D(                            \
        float* dqkv, const float* dout, const T* qkv, const float* lse, const float* delta, const int* key_mask, int batch, \
        int seq, int n_head, int n_kv_head, int head_dim) {                                                                \
        if ((int)blockIdx.z >= batch) return;                                                                              \
        attn_bwd_dkdv<T, D>(dqkv, dout, qkv, lse, delta, key_mask, seq, n_head, n_kv_head, head_dim);                      \
    }

ATT_EXPORT(f32, float, 32)
ATT_EXPORT(f32, float, 64)
ATT_EXPORT(f32, float, 128)
ATT_EXPORT(bf16, bf16_t, 32)
ATT_EXPORT(bf16, bf16_t, 64)
ATT_EXPORT(bf16, bf16_t, 128)

// The same three kernels with dropout on the probabilities (training), the mask given by key,
// threshold (p * 2^32) and scale (1 / (1 - p)) after the usual arguments.
#define ATT_EXPORT_DROP(NAME, T, D)                                                                                        \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_fwd_drop_##NAME##_d##D(                            \
        float* out, bf16_t* out16, float* lse, const T* qkv, const int* key_mask, int batch, int seq, int n_head, int n_kv_head, \
        int head_dim, long long key, long long threshold, float scale) {                                                   \
        if ((int)blockIdx.z >= batch) return;                                                                              \
        attn_fwd<T, D, true>(out, out16, lse, qkv, key_mask, seq, n_head, n_kv_head, head_dim,                                    \
                             AttnDrop{(unsigned long long)key, (unsigned long long)threshold, scale});                     \
    }                                                                                                                      \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_bwd_dq_drop_##NAME##_d##D(                         \
        float* dqkv, const float* dout, const T* qkv, const float* lse, const float* delta, const int* key_mask, int batch, \
        int seq, int n_head, int n_kv_head, int head_dim, long long key, long long threshold, float scale) {               \
        if ((int)blockIdx.z >= batch) return;                                                                              \
        attn_bwd_dq<T, D, true>(dqkv, dout, qkv, lse, delta, key_mask, seq, n_head, n_kv_head, head_dim,                   \
                                AttnDrop{(unsigned long long)key, (unsigned long long)threshold, scale});                  \
    }                                                                                                                      \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS, 1) attention_bwd_dkdv_drop_##NAME##_d##D(                       \
        float* dqkv, const float* dout, const T* qkv, const float* lse, const float* delta, const int* key_mask, int batch, \
        int seq, int n_head, int n_kv_head, int head_dim, long long key, long long threshold, float scale) {               \
        if ((int)blockIdx.z >= batch) return;                                                                              \
        attn_bwd_dkdv<T, D, true>(dqkv, dout, qkv, lse, delta, key_mask, seq, n_head, n_kv_head, head_dim,                 \
                                  AttnDrop{(unsigned long long)key, (unsigned long long)threshold, scale});                \
    }

ATT_EXPORT_DROP(f32, float, 32)
ATT_EXPORT_DROP(f32, float, 64)
ATT_EXPORT_DROP(f32, float, 128)
ATT_EXPORT_DROP(bf16, bf16_t, 32)
ATT_EXPORT_DROP(bf16, bf16_t, 64)
ATT_EXPORT_DROP(bf16, bf16_t, 128)

// ---- generation -----------------------------------------------------------------------------

// Copies the key and value heads of each row of qkv (batch * seq rows) into the caches
// [batch, max_len, n_kv_head * head_dim]: token t of sequence b goes to slot + t.
// Launch: grid batch * seq, block 128.
extern "C" __global__ void __launch_bounds__(128) kv_append(float* k_cache, float* v_cache, const float* qkv, int slot, int batch, int seq, int n_head, int n_kv_head, int head_dim, int max_len) {
    const long long r = blockIdx.x;
    if (r >= (long long)batch * seq) return;
    const long long b = r / seq, t = r - b * seq;
    const long long kvd = (long long)n_kv_head * head_dim;
    const long long width = (long long)(n_head + 2 * n_kv_head) * head_dim;
    const float* src = qkv + r * width + (long long)n_head * head_dim;
    const long long dst = (b * max_len + slot + t) * kvd;
    for (long long x = threadIdx.x; x < kvd; x += blockDim.x) {
        k_cache[dst + x] = src[x];
        v_cache[dst + x] = src[kvd + x];
    }
}

#define DEC_MAX_HD 256  // attention_decode handles head_dim <= 256
#define DEC_WARPS 4

// One query per sequence (row b of qkv) against its cached keys 0..=slot whose
// key_mask[b * max_len + j] is 1. Each warp takes 32 keys at a time (one per lane: the lane computes
// the score), keeps an online softmax, and accumulates the values with lanes owning dimensions
// lane + 32k; the four warps are merged at the end. A query with no allowed key outputs zeros.
// Launch: grid (n_head, batch), block 128.
extern "C" __global__ void __launch_bounds__(128) attention_decode(float* out, const float* qkv, const float* k_cache, const float* v_cache, const int* key_mask, int slot, int batch, int n_head, int n_kv_head, int head_dim, int max_len) {
    __shared__ float q_s[DEC_MAX_HD];
    __shared__ float m_s[DEC_WARPS], l_s[DEC_WARPS];
    __shared__ float acc_s[DEC_WARPS][DEC_MAX_HD];
    const int h = blockIdx.x, b = blockIdx.y;
    // head_dim > DEC_MAX_HD is not supported: the launcher must refuse it (this only keeps the
    // kernel inside its shared arrays)
    if (b >= batch || head_dim > DEC_MAX_HD) return;
    const int hd = head_dim;
    const int g = h / (n_head / n_kv_head);
    const long long width = (long long)(n_head + 2 * n_kv_head) * hd;
    const long long kvd = (long long)n_kv_head * hd;
    const float scale = __fdiv_rn(1.0f, __fsqrt_rn((float)hd));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) q_s[d] = qkv[(long long)b * width + (long long)h * hd + d];
    __syncthreads();

    constexpr int NA = DEC_MAX_HD / 32;
    float acc[NA];
#pragma unroll
    for (int k = 0; k < NA; ++k) acc[k] = 0.0f;
    float m = neg_inf(), l = 0.0f;
    const int nkeys = slot + 1;
    const long long cache0 = (long long)b * max_len;
    for (int base = warp * 32; base < nkeys; base += DEC_WARPS * 32) {
        const int j = base + lane;
        float s = neg_inf();
        if (j < nkeys && key_mask[cache0 + j] != 0) {
            const float* kr = k_cache + (cache0 + j) * kvd + (long long)g * hd;
            float dot = 0.0f;
            for (int d = 0; d < hd; ++d) dot += q_s[d] * kr[d];
            s = dot * scale;
        }
        const float bmax = warp_max(s);
        if (bmax == neg_inf()) continue;  // warp-uniform
        const float new_m = m > bmax ? m : bmax;
        const float corr = expf(m - new_m);
        const float p = s == neg_inf() ? 0.0f : expf(s - new_m);
        l = l * corr + warp_sum(p);
#pragma unroll
        for (int k = 0; k < NA; ++k) acc[k] *= corr;
        for (int kk = 0; kk < 32; ++kk) {
            const float pj = __shfl_sync(0xffffffffu, p, kk);
            if (pj == 0.0f) continue;  // warp-uniform
            const float* vr = v_cache + (cache0 + base + kk) * kvd + (long long)g * hd;
#pragma unroll
            for (int k = 0; k < NA; ++k) {
                const int d = lane + 32 * k;
                if (d < hd) acc[k] += pj * vr[d];
            }
        }
        m = new_m;
    }
    if (lane == 0) {
        m_s[warp] = m;
        l_s[warp] = l;
    }
#pragma unroll
    for (int k = 0; k < NA; ++k) {
        const int d = lane + 32 * k;
        if (d < hd) acc_s[warp][d] = acc[k];
    }
    __syncthreads();
    float mx = neg_inf();
    for (int w = 0; w < DEC_WARPS; ++w) mx = m_s[w] > mx ? m_s[w] : mx;
    float* o = out + (long long)b * n_head * hd + (long long)h * hd;
    if (mx == neg_inf()) {
        for (int d = threadIdx.x; d < hd; d += blockDim.x) o[d] = 0.0f;
        return;
    }
    float wgt[DEC_WARPS];
    float total = 0.0f;
    for (int w = 0; w < DEC_WARPS; ++w) {
        wgt[w] = m_s[w] == neg_inf() ? 0.0f : expf(m_s[w] - mx);
        total += l_s[w] * wgt[w];
    }
    const float inv = 1.0f / total;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float a = 0.0f;
        for (int w = 0; w < DEC_WARPS; ++w) a += acc_s[w][d] * wgt[w];
        o[d] = a * inv;
    }
}
