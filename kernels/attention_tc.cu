// Tensor-core flash attention for bf16 qkv and head_dim exactly 64 or 128 (sm_80+): the same
// function as the FMA kernels of attention.cu (causal, key padding mask, grouped-query heads, rows
// with no visible key output 0 with lse = +inf and pass no gradient), with the matrix products on
// `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32` (bf16 operands, f32 accumulation).
// CPU twins: cpu/attention.rs `flash_fwd`, `flash_bwd`.
//
// Layout as attention.cu: qkv [batch * seq, (n_head + 2 n_kv_head) * D] (query heads, key heads,
// value heads; raw bf16 bits), out [batch * seq, n_head * D] f32, dout the same in bf16 (the copy
// `attention_bwd_delta` writes as it reads the f32 dout: the backward kernels read 2 bytes a value
// instead of 4, and round nothing), lse / delta [batch, n_head, seq] f32, key_mask [batch * seq]
// (1 = attend). qkv and dout must be 16-byte aligned (rows are copied to shared memory with
// 16-byte cp.async). The backward templates also take an f32 dout (rounded as it is staged, the
// same bf16 values): the emulation checks both give the same bits.
//
// Structure (FlashAttention-2): every warp owns 16 rows (query rows in the forward and dq, key rows
// in dk/dv) and keeps its accumulators in the mma C fragments; tiles of the other operand are
// staged in shared memory as bf16 with a 16-byte-chunk XOR swizzle (conflict-free ldmatrix) and read
// with ldmatrix. Probabilities never leave registers: the C fragment of S = Q K^T is, after rounding
// to bf16, directly the A fragment of the next product. Online softmax in base 2
// (exp2(s * scale * log2 e - m)). Key tiles above the diagonal are skipped, per block and per warp.
//
// - forward: Q fragments in registers for the whole loop; K and V tiles in separate buffers, the
//   load of V_j overlapping S_j = Q K_j^T and the load of K_{j+1} overlapping P_j V_j.
// - dq: Q and dout (rounded to bf16) fragments in registers; (K, V) tiles double-buffered; per key
//   tile S = Q K^T, P = exp(S - lse), dP = dout V^T, dS = P (dP - delta), dq += dS K.
// - dk/dv: a block owns 64 keys of one kv head (K, V tiles resident in shared memory) and loops over
//   the query heads of its group and the query tiles at or after its keys; each warp computes the
//   transposed products for its 16 keys: S^T = K Q^T, dP^T = V dout^T, dv += P^T dout,
//   dk += dS^T Q. Without atomics every element of dqkv is written once, deterministically (the
//   dq and dkdv kernels, what training runs); the dkdvq kernel instead adds dq += dS K atomically
//   from the same pass (FlashAttention-2's single backward kernel; `cuda-check` times it).

#define TC_LOG2E 1.4426950408889634f
#define TC_LN2 0.6931471805599453f

/// Softmax scale 1 / sqrt(D) as the CPU computes it in f32 (1 / sqrt(128) rounds to 0x3db504f3).
template <int D>
struct TcScale;
template <>
struct TcScale<64> {
    static constexpr float v = 0.125f;
};
template <>
struct TcScale<128> {
    static constexpr float v = 0.0883883461356163025f;
};

// ---- warp-level primitives (inline PTX) -----------------------------------------------------
// The CPU emulation harness defines ATT_TC_EMULATED and supplies functions with the same
// signatures and semantics (mma fragment layouts, ldmatrix, deferred cp.async groups).
#ifndef ATT_TC_EMULATED

/// d += A * B for one m16n8k16 tile. a: A (16 x 16, row major) as 4 registers of bf16 pairs
/// (a0a1 = A[g][2t..], a2a3 = A[g + 8][2t..], a4a5 = A[g][2t + 8..], a6a7 = A[g + 8][2t + 8..]);
/// b: B (16 x 8) as 2 registers (b0b1 = B[2t..][g], b2b3 = B[2t + 8..][g]); d: C/D (16 x 8) f32
/// (d0d1 = D[g][2t..], d2d3 = D[g + 8][2t..]); g = lane / 4, t = lane % 4, low half = lower index.
__device__ __forceinline__ void tc_mma(float* d, const unsigned* a, const unsigned* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

/// ldmatrix .x4: lanes 8i..8i+7 give the row addresses of 8x8 matrix i (16 bytes each); r[i] gets
/// row lane / 4, columns 2 (lane % 4) + {0, 1} of matrix i.
__device__ __forceinline__ void tc_ldsm(unsigned* r, const bf16_t* p) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

/// ldmatrix .x4.trans: as tc_ldsm, but r[i] gets rows 2 (lane % 4) + {0, 1}, column lane / 4.
__device__ __forceinline__ void tc_ldsm_t(unsigned* r, const bf16_t* p) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

/// 2^x (MUFU.EX2, about 2 ulp; results below 2^-126 flush to 0, which no probability here needs).
/// exp2(-inf) = 0.
__device__ __forceinline__ float tc_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

/// Two f32 rounded to bf16 (nearest even), `lo` in the low half.
__device__ __forceinline__ unsigned tc_pack(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

/// Asynchronous 16-byte copy global -> shared; with !fill the destination is zero-filled (nothing
/// is read).
__device__ __forceinline__ void tc_cp16(bf16_t* dst, const bf16_t* src, bool fill) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(a), "l"(src), "r"(fill ? 16 : 0) : "memory");
}

__device__ __forceinline__ void tc_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

/// Waits until at most N committed groups of this thread's copies are pending.
template <int N>
__device__ __forceinline__ void tc_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

#endif  // ATT_TC_EMULATED

/// The B fragments of a 16 x 16 tile (two n8 halves) from shared memory at p (TRANS: ldmatrix .trans).
template <bool TRANS>
__device__ __forceinline__ void tc_ldsm_b(unsigned* bf, const bf16_t* p) {
    if (TRANS) {
        tc_ldsm_t(bf, p);
    } else {
        tc_ldsm(bf, p);
    }
}

/// Two m16n8k16 tiles with the same A: c0 += A * B[:, 0..8), c1 += A * B[:, 8..16), B loaded from p
/// (tc_ldsm_b).
template <bool TRANS>
__device__ __forceinline__ void tc_mma_pair(float* c0, float* c1, const unsigned* a, const bf16_t* p) {
    unsigned bf[4];
    tc_ldsm_b<TRANS>(bf, p);
    tc_mma(c0, a, bf);
    tc_mma(c1, a, bf + 2);
}

/// tc_mma_pair for MT m-tiles sharing one B (loaded once): c[mt][n], c[mt][n + 1] += a[mt][k] * B.
template <bool TRANS, int MT, int N, int K>
__device__ __forceinline__ void tc_mma_pairs(float (&c)[MT][N][4], int n, const unsigned (&a)[MT][K][4], int k, const bf16_t* p) {
    unsigned bf[4];
    tc_ldsm_b<TRANS>(bf, p);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        tc_mma(c[mt][n], a[mt][k], bf);
        tc_mma(c[mt][n + 1], a[mt][k], bf + 2);
    }
}

// ---- shared tiles ---------------------------------------------------------------------------
// A tile is [rows][D] bf16; the 16-byte chunk c of row r is stored at chunk c ^ (r & 7), so the 8
// row addresses of an ldmatrix matrix (8 consecutive rows, same chunk) hit 8 different bank groups.

template <int D>
__device__ __forceinline__ int tc_swz(int r, int c) { return r * D + ((c ^ (r & 7)) << 3); }

/// Per-lane part of the ldmatrix row addresses in a swizzled [rows][D] tile. A lane addresses row
/// r0 + ro, chunk c0 + co of the tile (r0 a multiple of 8, c0 even); since (r0 + ro) & 7 = ro & 7 and
/// c0 + co = c0 ^ co, the swizzled chunk is c0 ^ xo with xo = co ^ (ro & 7).
///
/// `x` pattern (ro = lane % 16, co = lane / 16): matrices (r0-7, c0), (r8-15, c0), (r0-7, c0+1),
///   (r8-15, c0+1); with tc_ldsm the A fragment of rows r0..r0+15, columns 8 c0..8 c0 + 15; with
///   tc_ldsm_t on a [k][n] tile the B fragments of k = r0..r0+15 for n-tiles 8 c0 and 8 c0 + 8.
/// `y` pattern (ro = lane % 8 + 8 (lane / 16), co = (lane / 8) % 2): matrices (r0-7, c0),
///   (r0-7, c0+1), (r8-15, c0), (r8-15, c0+1); with tc_ldsm on an [n][k] tile the B fragments of
///   n-tiles r0 and r0 + 8 for k = 8 c0..8 c0 + 15.
/// In both cases r[0..1] and r[2..3] are the two fragments.
template <int D>
struct TcLane {
    int row, xo;
    __device__ __forceinline__ TcLane(int ro, int co) : row(ro * D), xo(co ^ (ro & 7)) {}
    /// Element offset of this lane's row address for the matrices at (r0, c0).
    __device__ __forceinline__ int at(int r0, int c0) const { return r0 * D + row + ((c0 ^ xo) << 3); }
};
template <int D>
__device__ __forceinline__ TcLane<D> tc_lane_x(int lane) { return TcLane<D>(lane & 15, lane >> 4); }
template <int D>
__device__ __forceinline__ TcLane<D> tc_lane_y(int lane) { return TcLane<D>((lane & 7) + ((lane >> 4) << 3), (lane >> 3) & 1); }

/// Rows t0 .. t0 + NR of one head (`src`: the head's first column in row 0 of the sequence; rows
/// `width` elements apart) into a swizzled [NR][D] tile with cp.async (rows past seq zero-filled).
/// Not committed.
template <int D, int NR, int NT>
__device__ __forceinline__ void tc_load_rows(bf16_t* dst, const bf16_t* src, int width, int t0, int seq) {
    constexpr int CH = D / 8;
    static_assert((NR * CH) % NT == 0, "whole chunks per thread");
#pragma unroll 1
    for (int k = 0; k < NR * CH / NT; ++k) {  // rolled: keeps no per-chunk addresses live
        const int e = k * NT + threadIdx.x;
        const int r = e / CH, c = e % CH;
        const int t = t0 + r;
        const bool ok = t < seq;
        tc_cp16(dst + tc_swz<D>(r, c), ok ? src + (long long)t * width + c * 8 : src, ok);
    }
}

/// As tc_load_rows for an f32 matrix (dout), rounded to bf16, with ordinary loads and stores.
template <int D, int NR, int NT>
__device__ __forceinline__ void tc_stage_f32(bf16_t* dst, const float* src, int width, int t0, int seq) {
    constexpr int CH = D / 8;
    static_assert((NR * CH) % NT == 0, "whole chunks per thread");
#pragma unroll
    for (int k = 0; k < NR * CH / NT; ++k) {
        const int e = k * NT + threadIdx.x;
        const int r = e / CH, c = e % CH;
        const int t = t0 + r;
        float4 x0 = {0.0f, 0.0f, 0.0f, 0.0f}, x1 = {0.0f, 0.0f, 0.0f, 0.0f};
        if (t < seq) {
            const float4* p = reinterpret_cast<const float4*>(src + (long long)t * width + c * 8);
            x0 = p[0];
            x1 = p[1];
        }
        uint4 u;
        u.x = tc_pack(x0.x, x0.y);
        u.y = tc_pack(x0.z, x0.w);
        u.z = tc_pack(x1.x, x1.y);
        u.w = tc_pack(x1.z, x1.w);
        *reinterpret_cast<uint4*>(dst + tc_swz<D>(r, c)) = u;
    }
}

/// dout's rows into a tile as tc_load_rows lays them out: from its bf16 copy (cp.async, not
/// committed; the copy is what tc_stage_f32 rounds to) or from the f32 values (rounded here).
template <int D, int NR, int NT>
__device__ __forceinline__ void tc_stage_dout(bf16_t* dst, const bf16_t* src, int width, int t0, int seq) {
    tc_load_rows<D, NR, NT>(dst, src, width, t0, seq);
}
template <int D, int NR, int NT>
__device__ __forceinline__ void tc_stage_dout(bf16_t* dst, const float* src, int width, int t0, int seq) {
    tc_stage_f32<D, NR, NT>(dst, src, width, t0, seq);
}

/// A fragment (k = 16 kk .. 16 kk + 15) from the C fragments of n-tiles 2 kk and 2 kk + 1.
__device__ __forceinline__ void tc_c_to_a(unsigned* a, const float* c0, const float* c1) {
    a[0] = tc_pack(c0[0], c0[1]);
    a[1] = tc_pack(c0[2], c0[3]);
    a[2] = tc_pack(c1[0], c1[1]);
    a[3] = tc_pack(c1[2], c1[3]);
}

/// Bit 2n + e: key column 8 n + 2 tq + e of the tile (the columns of this lane's C fragments) is
/// allowed by the key mask (and inside the sequence).
template <int BN>
__device__ __forceinline__ unsigned tc_key_bits(const int* kok, int tq) {
    unsigned bits = 0;
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) bits |= (kok[8 * n + 2 * tq + e] != 0 ? 1u : 0u) << (2 * n + e);
    }
    return bits;
}

__device__ __forceinline__ float tc_quad_max(float v) {
    float w = __shfl_xor_sync(0xffffffffu, v, 1);
    v = w > v ? w : v;
    w = __shfl_xor_sync(0xffffffffu, v, 2);
    return w > v ? w : v;
}

__device__ __forceinline__ float tc_quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

/// A block's view of qkv for sequence b and kv head kvh, shared by the three kernels.
template <int D>
struct TcBlock {
    int width, out_width;  // row widths of qkv and of out / dout (products taken in 64 bits)
    long long row0;        // first row of sequence b
    const bf16_t* qkv_s;   // the rows of sequence b
    int kcol, vcol;        // columns of kv head kvh's keys and values
    __device__ __forceinline__ TcBlock(const bf16_t* qkv, int b, int kvh, int seq, int n_head, int n_kv_head)
        : width((n_head + 2 * n_kv_head) * D),
          out_width(n_head * D),
          row0((long long)b * seq),
          qkv_s(qkv + row0 * width),
          kcol((n_head + kvh) * D),
          vcol((n_head + n_kv_head + kvh) * D) {}
};

// ---- forward --------------------------------------------------------------------------------
// NW warps, each owning MT m-tiles of 16 consecutive query rows (BM = 16 NW MT rows per block);
// key tiles of BN = 64. The K fragments read by ldmatrix serve the MT m-tiles of a warp.

// F32: the output is written in f32 (else only its bf16 copy; the kernel picks the form once, so
// that neither carries the other's stores: with a per-store test the d64 form spilled).
// The kernel passes its shared memory, `sm` (2 * 64 * D values, 128-byte aligned) and `kok` (64),
// so that both forms use the same arrays.
template <int D, int NW, int MT, bool F32>
__device__ __forceinline__ void attn_fwd_tc(bf16_t* sm, int* kok, float* out, bf16_t* out16, float* lse, const bf16_t* qkv, const int* key_mask, int seq, int n_head, int n_kv_head) {
    constexpr int BN = 64, NT = 32 * NW, WR = 16 * MT, BM = WR * NW;
    static_assert(BM <= 2 * BN, "the Q tile is staged in the K/V buffers");
    bf16_t* ks = sm;
    bf16_t* vs = sm + BN * D;

    const int q0 = (gridDim.x - 1 - blockIdx.x) * BM;  // the longest rows first
    if (q0 >= seq) return;
    const int b = blockIdx.z, h = blockIdx.y;
    const TcBlock<D> blk(qkv, b, h / (n_head / n_kv_head), seq, n_head, n_kv_head);
    const int qcol = h * D;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const TcLane<D> lx = tc_lane_x<D>(lane), ly = tc_lane_y<D>(lane);
    const float sl2 = __fmul_rn(TcScale<D>::v, TC_LOG2E);

    // Q fragments (staged through the K/V buffers)
    tc_load_rows<D, BM, NT>(sm, blk.qkv_s + qcol, blk.width, q0, seq);
    tc_commit();
    tc_wait<0>();
    __syncthreads();
    unsigned qf[MT][D / 16][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) tc_ldsm(qf[mt][kk], sm + lx.at(warp * WR + mt * 16, 2 * kk));
    }
    __syncthreads();

    const int wr0 = q0 + warp * WR;  // first row of the warp
    const bool warp_live = wr0 < seq;
    const int key_end = min(q0 + BM, seq);  // keys any row of the block can see
    float o[MT][D / 8][4];
    float m[MT][2], l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int n = 0; n < D / 8; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.0f;
        m[mt][0] = m[mt][1] = neg_inf();
        l[mt][0] = l[mt][1] = 0.0f;
    }

    tc_load_rows<D, BN, NT>(ks, blk.qkv_s + blk.kcol, blk.width, 0, seq);
    tc_commit();
    for (int j0 = 0; j0 < key_end; j0 += BN) {
        // vs and kok are free (barrier at the end of the previous tile)
        tc_load_rows<D, BN, NT>(vs, blk.qkv_s + blk.vcol, blk.width, j0, seq);
        tc_commit();
        for (int j = threadIdx.x; j < BN; j += NT) kok[j] = j0 + j < seq && key_mask[blk.row0 + j0 + j] != 0;
        tc_wait<1>();  // K_j
        __syncthreads();

        const bool active = warp_live && j0 <= wr0 + WR - 1;  // warp-uniform
        unsigned pf[MT][BN / 16][4];
        if (active) {
            float s[MT][BN / 8][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                for (int n = 0; n < BN / 8; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.0f;
            }
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
                for (int np = 0; np < BN / 16; ++np) {
                    tc_mma_pairs<false>(s, 2 * np, qf, kk, ks + ly.at(16 * np, 2 * kk));
                }
            }
            const bool diag = j0 + BN - 1 > wr0;  // some key of the tile is after some row of the warp
            const unsigned kbits = tc_key_bits<BN>(kok, tq);
            // warp-uniform: no masked key and no causal cut in this tile for this warp
            const bool clean = __all_sync(0xffffffffu, kbits == (1u << (BN / 4)) - 1u) && !diag;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const int r_lo = wr0 + mt * 16 + g, r_hi = r_lo + 8;
                float mx_lo = neg_inf(), mx_hi = neg_inf();
#pragma unroll
                for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        if (!clean) {
                            const int c = 8 * n + 2 * tq + e;
                            const bool ok = (kbits >> (2 * n + e)) & 1u;
                            if (!(ok && j0 + c <= r_lo)) s[mt][n][e] = neg_inf();
                            if (!(ok && j0 + c <= r_hi)) s[mt][n][2 + e] = neg_inf();
                        }
                        mx_lo = fmaxf(mx_lo, s[mt][n][e]);
                        mx_hi = fmaxf(mx_hi, s[mt][n][2 + e]);
                    }
                }
                mx_lo = tc_quad_max(mx_lo);
                mx_hi = tc_quad_max(mx_hi);
                // running maximum in units of s * scale * log2 e; `base` keeps exp2 away from
                // inf - inf while a row has seen no visible key (then l and o are 0 anyway)
                const float mn_lo = fmaxf(m[mt][0], __fmul_rn(mx_lo, sl2)), mn_hi = fmaxf(m[mt][1], __fmul_rn(mx_hi, sl2));
                const float base_lo = mn_lo == neg_inf() ? 0.0f : mn_lo, base_hi = mn_hi == neg_inf() ? 0.0f : mn_hi;
                const float corr_lo = tc_exp2(__fsub_rn(m[mt][0], base_lo)), corr_hi = tc_exp2(__fsub_rn(m[mt][1], base_hi));
                m[mt][0] = mn_lo;
                m[mt][1] = mn_hi;
                float sum_lo = 0.0f, sum_hi = 0.0f;
#pragma unroll
                for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        s[mt][n][e] = tc_exp2(__fmaf_rn(s[mt][n][e], sl2, -base_lo));
                        s[mt][n][2 + e] = tc_exp2(__fmaf_rn(s[mt][n][2 + e], sl2, -base_hi));
                        sum_lo = __fadd_rn(sum_lo, s[mt][n][e]);
                        sum_hi = __fadd_rn(sum_hi, s[mt][n][2 + e]);
                    }
                }
                l[mt][0] = __fmaf_rn(l[mt][0], corr_lo, sum_lo);  // per-thread partial row sums
                l[mt][1] = __fmaf_rn(l[mt][1], corr_hi, sum_hi);
#pragma unroll
                for (int n = 0; n < D / 8; ++n) {
                    o[mt][n][0] = __fmul_rn(o[mt][n][0], corr_lo);
                    o[mt][n][1] = __fmul_rn(o[mt][n][1], corr_lo);
                    o[mt][n][2] = __fmul_rn(o[mt][n][2], corr_hi);
                    o[mt][n][3] = __fmul_rn(o[mt][n][3], corr_hi);
                }
#pragma unroll
                for (int kk = 0; kk < BN / 16; ++kk) tc_c_to_a(pf[mt][kk], s[mt][2 * kk], s[mt][2 * kk + 1]);
            }
        }
        tc_wait<0>();  // V_j
        __syncthreads();  // every warp is done with ks; V_j visible
        if (j0 + BN < key_end) {
            tc_load_rows<D, BN, NT>(ks, blk.qkv_s + blk.kcol, blk.width, j0 + BN, seq);
            tc_commit();
        }
        if (active) {
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
#pragma unroll
                for (int np = 0; np < D / 16; ++np) {
                    tc_mma_pairs<true>(o, 2 * np, pf, kk, vs + lx.at(16 * kk, 2 * np));
                }
            }
        }
        __syncthreads();  // every warp is done with vs and kok
    }

    if (!warp_live) return;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int r = wr0 + mt * 16 + g + 8 * half;
            const float lt = tc_quad_sum(l[mt][half]);
            if (r >= seq) continue;
            const bool none = lt == 0.0f;  // no visible key: zeros, lse = +inf
            const float inv = none ? 0.0f : __fdiv_rn(1.0f, lt);
            const long long at = (blk.row0 + r) * blk.out_width + qcol;
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                float2 v;
                v.x = __fmul_rn(o[mt][n][2 * half], inv);
                v.y = __fmul_rn(o[mt][n][2 * half + 1], inv);
                // without F32 only the bf16 copy (Backend::hold_operand_only)
                if (F32) *reinterpret_cast<float2*>(out + at + 8 * n + 2 * tq) = v;
                // the output's bf16 copy for the product that reads it (Backend::hold_operand):
                // the pair as one 4-byte store
                if (out16 != nullptr)
                    *reinterpret_cast<unsigned int*>(out16 + at + 8 * n + 2 * tq) = (unsigned int)f32_to_bf16(v.x) | ((unsigned int)f32_to_bf16(v.y) << 16);
            }
            if (tq == 0) lse[((long long)b * n_head + h) * seq + r] = none ? pos_inf() : __fadd_rn(__fmul_rn(m[mt][half], TC_LN2), logf(lt));
        }
    }
}

// ---- backward: dQ ---------------------------------------------------------------------------
// NW warps of 16 query rows (BM = 16 NW); key tiles of BN, (K, V) double-buffered.

template <int D, int NW, int BN, class TD>
__device__ __forceinline__ void attn_bwd_dq_tc(float* dqkv, const TD* dout, const bf16_t* qkv, const float* lse, const float* delta, const int* key_mask, int seq, int n_head, int n_kv_head) {
    constexpr int NT = 32 * NW, BM = 16 * NW, STAGE = 2 * BN * D;
    static_assert(BM * D <= 2 * STAGE, "the Q and dout tiles are staged in the K/V buffers");
    __shared__ __align__(128) bf16_t sm[2 * STAGE];
    __shared__ int kok[2][BN];

    const int q0 = (gridDim.x - 1 - blockIdx.x) * BM;
    if (q0 >= seq) return;
    const int b = blockIdx.z, h = blockIdx.y;
    const TcBlock<D> blk(qkv, b, h / (n_head / n_kv_head), seq, n_head, n_kv_head);
    const int qcol = h * D;
    const TD* dout_s = dout + blk.row0 * blk.out_width;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const TcLane<D> lx = tc_lane_x<D>(lane), ly = tc_lane_y<D>(lane);
    const float scale = TcScale<D>::v;
    const float sl2 = __fmul_rn(scale, TC_LOG2E);

    unsigned qf[D / 16][4], df[D / 16][4];
    tc_load_rows<D, BM, NT>(sm, blk.qkv_s + qcol, blk.width, q0, seq);
    tc_commit();
    tc_wait<0>();
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) tc_ldsm(qf[kk], sm + lx.at(warp * 16, 2 * kk));
    __syncthreads();
    tc_stage_dout<D, BM, NT>(sm, dout_s + qcol, blk.out_width, q0, seq);
    tc_commit();
    tc_wait<0>();
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) tc_ldsm(df[kk], sm + lx.at(warp * 16, 2 * kk));
    __syncthreads();

    const int wr0 = q0 + warp * 16;
    const int r_lo = wr0 + g, r_hi = r_lo + 8;
    const bool warp_live = wr0 < seq;
    const long long sbase = ((long long)b * n_head + h) * seq;
    // lse in base-2 units (+inf stays +inf: such a row gets P = 0)
    const float l2_lo = r_lo < seq ? __fmul_rn(lse[sbase + r_lo], TC_LOG2E) : pos_inf();
    const float l2_hi = r_hi < seq ? __fmul_rn(lse[sbase + r_hi], TC_LOG2E) : pos_inf();
    const float d_lo = r_lo < seq ? delta[sbase + r_lo] : 0.0f;
    const float d_hi = r_hi < seq ? delta[sbase + r_hi] : 0.0f;
    const int key_end = min(q0 + BM, seq);
    float dq[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.0f;

    tc_load_rows<D, BN, NT>(sm, blk.qkv_s + blk.kcol, blk.width, 0, seq);
    tc_load_rows<D, BN, NT>(sm + BN * D, blk.qkv_s + blk.vcol, blk.width, 0, seq);
    tc_commit();
    for (int j = threadIdx.x; j < BN; j += NT) kok[0][j] = j < seq && key_mask[blk.row0 + j] != 0;
    int st = 0;
    for (int j0 = 0; j0 < key_end; j0 += BN, st ^= 1) {
        if (j0 + BN < key_end) {  // prefetch the next tile into the other stage (free since the last barrier)
            bf16_t* nx = sm + (st ^ 1) * STAGE;
            tc_load_rows<D, BN, NT>(nx, blk.qkv_s + blk.kcol, blk.width, j0 + BN, seq);
            tc_load_rows<D, BN, NT>(nx + BN * D, blk.qkv_s + blk.vcol, blk.width, j0 + BN, seq);
            tc_commit();
            for (int j = threadIdx.x; j < BN; j += NT) {
                const int t = j0 + BN + j;
                kok[st ^ 1][j] = t < seq && key_mask[blk.row0 + t] != 0;
            }
            tc_wait<1>();
        } else {
            tc_wait<0>();
        }
        __syncthreads();
        const bf16_t* ks = sm + st * STAGE;
        const bf16_t* vs = ks + BN * D;
        if (warp_live && j0 <= wr0 + 15) {
            float s[BN / 8][4], dp[BN / 8][4];
#pragma unroll
            for (int n = 0; n < BN / 8; ++n) {
                s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
                dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.0f;
            }
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
                for (int np = 0; np < BN / 16; ++np) {
                    tc_mma_pair<false>(s[2 * np], s[2 * np + 1], qf[kk], ks + ly.at(16 * np, 2 * kk));
                    tc_mma_pair<false>(dp[2 * np], dp[2 * np + 1], df[kk], vs + ly.at(16 * np, 2 * kk));
                }
            }
            const bool diag = j0 + BN - 1 > wr0;
            const unsigned kbits = tc_key_bits<BN>(kok[st], tq);
            const bool clean = __all_sync(0xffffffffu, kbits == (1u << (BN / 4)) - 1u) && !diag;  // warp-uniform
#pragma unroll
            for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int c = 8 * n + 2 * tq + e;
                    const bool ok = (kbits >> (2 * n + e)) & 1u;
                    const bool ok_lo = clean || (ok && j0 + c <= r_lo);
                    const bool ok_hi = clean || (ok && j0 + c <= r_hi);
                    const float p_lo = ok_lo ? tc_exp2(__fmaf_rn(s[n][e], sl2, -l2_lo)) : 0.0f;
                    const float p_hi = ok_hi ? tc_exp2(__fmaf_rn(s[n][2 + e], sl2, -l2_hi)) : 0.0f;
                    s[n][e] = __fmul_rn(p_lo, __fsub_rn(dp[n][e], d_lo));  // dS (without the scale)
                    s[n][2 + e] = __fmul_rn(p_hi, __fsub_rn(dp[n][2 + e], d_hi));
                }
            }
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                unsigned af[4];
                tc_c_to_a(af, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
                for (int np = 0; np < D / 16; ++np) {
                    tc_mma_pair<true>(dq[2 * np], dq[2 * np + 1], af, ks + lx.at(16 * kk, 2 * np));
                }
            }
        }
        __syncthreads();  // this stage is free for the prefetch of the next iteration
    }

    if (!warp_live) return;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int r = r_lo + 8 * half;
        if (r >= seq) continue;
        float* row = dqkv + (blk.row0 + r) * blk.width + qcol;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            float2 v;
            v.x = __fmul_rn(dq[n][2 * half], scale);
            v.y = __fmul_rn(dq[n][2 * half + 1], scale);
            *reinterpret_cast<float2*>(row + 8 * n + 2 * tq) = v;
        }
    }
}

// ---- backward: dK, dV (and dQ) -----------------------------------------------------------------
// 4 warps of 16 keys (64 keys per block, resident); query tiles of BQ, in sub-blocks of SQ.
//
// With DQ (FlashAttention-2's single backward kernel) the block also adds its keys' part of dQ,
// dq += scale * dS K, to dqkv's query columns with atomicAdd, so no separate dq kernel recomputes
// S and dP: 5 products per tile instead of 7. dqkv's query columns must hold 0 before the launch,
// and the order of the additions varies between runs (not deterministic). Per sub-block, every
// warp writes its dS^T (rounded to bf16, as the dk product uses it) transposed into shared memory;
// then the 4 warps compute dS K for SQ / 16 m-tiles of 16 queries, splitting D between them.

template <int D, int BQ, int SQ, bool DQ, class TD>
__device__ __forceinline__ void attn_bwd_dkdv_tc(float* dqkv, const TD* dout, const bf16_t* qkv, const float* lse, const float* delta, const int* key_mask, int seq, int n_head, int n_kv_head) {
    constexpr int NW = 4, NT = 32 * NW, BN = 16 * NW, NQR = BQ >= 32 ? BQ / 32 : 1;
    static_assert((BQ % 32 == 0 || BQ == 16) && BN % BQ == 0 && BQ % SQ == 0 && SQ % 16 == 0, "query tiles align with the key tile");
    // DQ: m-tiles of queries per sub-block, the warps per m-tile, and the columns of D each takes
    constexpr int MTQ = SQ / 16, CS = NW / MTQ, DC = D / CS;
    static_assert(!DQ || (NW % MTQ == 0 && DC % 16 == 0), "the dq product splits evenly over the warps");
    __shared__ __align__(128) bf16_t ks[BN * D];
    __shared__ __align__(128) bf16_t vs[BN * D];
    __shared__ __align__(128) bf16_t qs[BQ * D];
    __shared__ __align__(128) bf16_t dos[BQ * D];
    __shared__ __align__(128) bf16_t dss[DQ ? SQ * BN : 8];  // dS of a sub-block, [SQ][BN] swizzled

    const int k0 = blockIdx.x * BN;  // block 0 has the most queries to visit: scheduled first
    if (k0 >= seq) return;
    const int b = blockIdx.z, kvh = blockIdx.y;
    const int grp = n_head / n_kv_head;
    const TcBlock<D> blk(qkv, b, kvh, seq, n_head, n_kv_head);
    const TD* dout_s = dout + blk.row0 * blk.out_width;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const TcLane<D> lx = tc_lane_x<D>(lane), ly = tc_lane_y<D>(lane);
    const float scale = TcScale<D>::v;
    const float sl2 = __fmul_rn(scale, TC_LOG2E);

    tc_load_rows<D, BN, NT>(ks, blk.qkv_s + blk.kcol, blk.width, k0, seq);
    tc_load_rows<D, BN, NT>(vs, blk.qkv_s + blk.vcol, blk.width, k0, seq);
    tc_commit();

    const int wk0 = k0 + warp * 16;  // first key of the warp
    const int key_lo = wk0 + g, key_hi = key_lo + 8;
    const bool live_lo = key_lo < seq && key_mask[blk.row0 + (key_lo < seq ? key_lo : 0)] != 0;
    const bool live_hi = key_hi < seq && key_mask[blk.row0 + (key_hi < seq ? key_hi : 0)] != 0;
    float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        dk[n][0] = dk[n][1] = dk[n][2] = dk[n][3] = 0.0f;
        dv[n][0] = dv[n][1] = dv[n][2] = dv[n][3] = 0.0f;
    }

    for (int h = kvh * grp; h < (kvh + 1) * grp; ++h) {
        const int qcol = h * D;
        const float* lse_h = lse + ((long long)b * n_head + h) * seq;
        const float* delta_h = delta + ((long long)b * n_head + h) * seq;
        for (int i0 = k0; i0 < seq; i0 += BQ) {
            __syncthreads();  // the previous query tile is consumed
            tc_load_rows<D, BQ, NT>(qs, blk.qkv_s + qcol, blk.width, i0, seq);
            tc_stage_dout<D, BQ, NT>(dos, dout_s + qcol, blk.out_width, i0, seq);
            tc_commit();
            // lane holds lse (base 2) and delta of queries i0 + 32 r + lane; shuffled out below
            float lr[NQR], dr[NQR];
#pragma unroll
            for (int r = 0; r < NQR; ++r) {
                const int q = i0 + 32 * r + lane;
                lr[r] = q < seq ? __fmul_rn(lse_h[q], TC_LOG2E) : pos_inf();
                dr[r] = q < seq ? delta_h[q] : 0.0f;
            }
            tc_wait<0>();
            __syncthreads();
            // warp-uniform: no key of the warp is visible to the tile. With DQ the warp still takes
            // part in the barriers below, with dS = 0.
            const bool active = wk0 < seq && i0 + BQ - 1 >= wk0;
            if (!DQ && !active) continue;

            const bool diag = i0 < wk0 + 15;  // some query of the tile is before some key of the warp
            // SQ queries at a time (fewer live registers; the K, V fragments are re-read per block)
#pragma unroll
            for (int q16 = 0; q16 < BQ; q16 += SQ) {
                float s[SQ / 8][4], dp[SQ / 8][4];
#pragma unroll
                for (int n = 0; n < SQ / 8; ++n) {
                    s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
                    dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.0f;
                }
#pragma unroll 2
                for (int kk = 0; kk < (active ? D / 16 : 0); ++kk) {  // partly rolled: few fragments in flight
                    unsigned ka[4], va[4];
                    tc_ldsm(ka, ks + lx.at(warp * 16, 2 * kk));
                    tc_ldsm(va, vs + lx.at(warp * 16, 2 * kk));
#pragma unroll
                    for (int np = 0; np < SQ / 16; ++np) {
                        tc_mma_pair<false>(s[2 * np], s[2 * np + 1], ka, qs + ly.at(q16 + 16 * np, 2 * kk));
                        tc_mma_pair<false>(dp[2 * np], dp[2 * np + 1], va, dos + ly.at(q16 + 16 * np, 2 * kk));
                    }
                }
#pragma unroll
                for (int n = 0; n < SQ / 8; ++n) {
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int c = q16 + 8 * n + 2 * tq + e;  // query i0 + c
                        const float l2 = __shfl_sync(0xffffffffu, lr[(q16 + 8 * n) / 32], c & 31);
                        const float dl = __shfl_sync(0xffffffffu, dr[(q16 + 8 * n) / 32], c & 31);
                        const bool ok_lo = live_lo && (!diag || key_lo <= i0 + c);
                        const bool ok_hi = live_hi && (!diag || key_hi <= i0 + c);
                        const float p_lo = ok_lo ? tc_exp2(__fmaf_rn(s[n][e], sl2, -l2)) : 0.0f;
                        const float p_hi = ok_hi ? tc_exp2(__fmaf_rn(s[n][2 + e], sl2, -l2)) : 0.0f;
                        s[n][e] = p_lo;
                        s[n][2 + e] = p_hi;
                        dp[n][e] = __fmul_rn(p_lo, __fsub_rn(dp[n][e], dl));  // dS (without the scale)
                        dp[n][2 + e] = __fmul_rn(p_hi, __fsub_rn(dp[n][2 + e], dl));
                    }
                }
                if (DQ) {
                    // dS^T of the warp's keys, transposed into dss[query][key]
#pragma unroll
                    for (int n = 0; n < SQ / 8; ++n) {
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const int qr = 8 * n + 2 * tq + e, kc = warp * 16 + g;
                            const unsigned pair = tc_pack(dp[n][e], dp[n][2 + e]);  // keys kc, kc + 8
                            dss[tc_swz<BN>(qr, kc >> 3) + (kc & 7)] = (bf16_t)(pair & 0xffffu);
                            dss[tc_swz<BN>(qr, (kc + 8) >> 3) + (kc & 7)] = (bf16_t)(pair >> 16);
                        }
                    }
                }
                if (active) {
#pragma unroll
                    for (int kq = 0; kq < SQ / 16; ++kq) {
                        unsigned pa[4], da[4];
                        tc_c_to_a(pa, s[2 * kq], s[2 * kq + 1]);
                        tc_c_to_a(da, dp[2 * kq], dp[2 * kq + 1]);
#pragma unroll
                        for (int np = 0; np < D / 16; ++np) {
                            tc_mma_pair<true>(dv[2 * np], dv[2 * np + 1], pa, dos + lx.at(q16 + 16 * kq, 2 * np));
                            tc_mma_pair<true>(dk[2 * np], dk[2 * np + 1], da, qs + lx.at(q16 + 16 * kq, 2 * np));
                        }
                    }
                }
                if (DQ) {
                    __syncthreads();  // every warp's dS is in dss
                    const int mt = warp % MTQ, c0 = (warp / MTQ) * DC;
                    const TcLane<BN> lq = tc_lane_x<BN>(lane);
                    float acc[DC / 8][4];
#pragma unroll
                    for (int n = 0; n < DC / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
#pragma unroll
                    for (int kk = 0; kk < BN / 16; ++kk) {
                        unsigned af[4];
                        tc_ldsm(af, dss + lq.at(16 * mt, 2 * kk));
#pragma unroll
                        for (int np = 0; np < DC / 16; ++np) tc_mma_pair<true>(acc[2 * np], acc[2 * np + 1], af, ks + lx.at(16 * kk, c0 / 8 + 2 * np));
                    }
#pragma unroll
                    for (int half = 0; half < 2; ++half) {
                        const int q = i0 + q16 + 16 * mt + g + 8 * half;
                        if (q >= seq) continue;
                        float* row = dqkv + (blk.row0 + q) * blk.width + qcol + c0;
#pragma unroll
                        for (int n = 0; n < DC / 8; ++n) {
                            atomicAdd(row + 8 * n + 2 * tq, __fmul_rn(acc[n][2 * half], scale));
                            atomicAdd(row + 8 * n + 2 * tq + 1, __fmul_rn(acc[n][2 * half + 1], scale));
                        }
                    }
                    __syncthreads();  // dss is free for the next sub-block
                }
            }
        }
    }

#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int key = key_lo + 8 * half;
        if (key >= seq) continue;
        float* krow = dqkv + (blk.row0 + key) * blk.width + blk.kcol;
        float* vrow = dqkv + (blk.row0 + key) * blk.width + blk.vcol;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            float2 a, c;
            a.x = __fmul_rn(dk[n][2 * half], scale);
            a.y = __fmul_rn(dk[n][2 * half + 1], scale);
            c.x = dv[n][2 * half];
            c.y = dv[n][2 * half + 1];
            *reinterpret_cast<float2*>(krow + 8 * n + 2 * tq) = a;
            *reinterpret_cast<float2*>(vrow + 8 * n + 2 * tq) = c;
        }
    }
}

// ---- exported kernels -----------------------------------------------------------------------
// head_dim must equal the D of the name (anything else returns without writing). Grids: fwd and dq
// (ceil(seq / 128), n_head, batch); dkdv (ceil(seq / 64), n_kv_head, batch).
// ATT_TC_EXPORT(D, forward warps, forward m-tiles per warp, dq key tile, dkdv query tile, dkdv
// query sub-block): the forward handles FWD_NW * FWD_MT * 16 = 128 rows per block in both cases.

#define ATT_TC_EXPORT(D, FWD_NW, FWD_MT, DQ_BN, DKDV_BQ, DKDV_SQ, DKDVQ_BQ)                                                                  \
    extern "C" __global__ void __launch_bounds__(32 * FWD_NW) attention_fwd_tc_d##D(                                      \
        float* out, bf16_t* out16, float* lse, const bf16_t* qkv, const int* key_mask, int batch, int seq, int n_head, int n_kv_head, \
        int head_dim) {                                                                                                \
        if ((int)blockIdx.z >= batch || head_dim != D) return;                                                         \
        __shared__ __align__(128) bf16_t sm[2 * 64 * D];                                                               \
        __shared__ int kok[64];                                                                                        \
        if (out != nullptr)                                                                                            \
            attn_fwd_tc<D, FWD_NW, FWD_MT, true>(sm, kok, out, out16, lse, qkv, key_mask, seq, n_head, n_kv_head);     \
        else                                                                                                           \
            attn_fwd_tc<D, FWD_NW, FWD_MT, false>(sm, kok, out, out16, lse, qkv, key_mask, seq, n_head, n_kv_head);    \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) attention_bwd_dq_tc_d##D(                                         \
        float* dqkv, const bf16_t* dout, const bf16_t* qkv, const float* lse, const float* delta, const int* key_mask, int batch, \
        int seq, int n_head, int n_kv_head, int head_dim) {                                                            \
        if ((int)blockIdx.z >= batch || head_dim != D) return;                                                         \
        attn_bwd_dq_tc<D, 8, DQ_BN>(dqkv, dout, qkv, lse, delta, key_mask, seq, n_head, n_kv_head);                     \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(128) attention_bwd_dkdv_tc_d##D(                                       \
        float* dqkv, const bf16_t* dout, const bf16_t* qkv, const float* lse, const float* delta, const int* key_mask, int batch, \
        int seq, int n_head, int n_kv_head, int head_dim) {                                                            \
        if ((int)blockIdx.z >= batch || head_dim != D) return;                                                         \
        attn_bwd_dkdv_tc<D, DKDV_BQ, DKDV_SQ, false>(dqkv, dout, qkv, lse, delta, key_mask, seq, n_head, n_kv_head);             \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(128) attention_bwd_dkdvq_tc_d##D(                                      \
        float* dqkv, const bf16_t* dout, const bf16_t* qkv, const float* lse, const float* delta, const int* key_mask, int batch, \
        int seq, int n_head, int n_kv_head, int head_dim) {                                                            \
        if ((int)blockIdx.z >= batch || head_dim != D) return;                                                         \
        attn_bwd_dkdv_tc<D, DKDVQ_BQ, DKDVQ_BQ, true>(dqkv, dout, qkv, lse, delta, key_mask, seq, n_head, n_kv_head);          \
    }

// Launch: attention_fwd_tc_d64: grid (ceil(seq / 128), n_head, batch), block 128 (4 warps x 32 query
//   rows = 128 rows per block; key tiles of 64); static shared memory 16640 bytes.
// Launch: attention_bwd_dq_tc_d64: grid (ceil(seq / 128), n_head, batch), block 256 (8 warps x 16 query
//   rows = 128 rows per block; key tiles of 64, double-buffered); static shared memory 33280 bytes.
// Launch: attention_bwd_dkdv_tc_d64: grid (ceil(seq / 64), n_kv_head, batch), block 128 (4 warps x 16
//   keys = 64 keys per block; query tiles of 64); static shared memory 32768 bytes.
// Launch: attention_bwd_dkdvq_tc_d64: as dkdv, with dq added atomically (query tiles of 64);
//   static shared memory 40960 bytes.
ATT_TC_EXPORT(64, 4, 2, 64, 64, 64, 64)
// Launch: attention_fwd_tc_d128: grid (ceil(seq / 128), n_head, batch), block 256 (8 warps x 16 query
//   rows = 128 rows per block; key tiles of 64); static shared memory 33024 bytes.
// Launch: attention_bwd_dq_tc_d128: grid (ceil(seq / 128), n_head, batch), block 256 (8 warps x 16
//   query rows = 128 rows per block; key tiles of 32, double-buffered); static shared memory 33024 bytes.
// Launch: attention_bwd_dkdv_tc_d128: grid (ceil(seq / 64), n_kv_head, batch), block 128 (4 warps x 16
//   keys = 64 keys per block; query tiles of 32); static shared memory 49152 bytes (the 48 KB limit).
// Launch: attention_bwd_dkdvq_tc_d128: as dkdv, with dq added atomically (query tiles of 16, so
//   that the dS tile fits beside K, V, Q and dout); static shared memory 43008 bytes.
ATT_TC_EXPORT(128, 8, 1, 32, 32, 32, 16)
