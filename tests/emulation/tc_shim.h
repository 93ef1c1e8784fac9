// Emulation of the warp-level tensor-core primitives of kernels/attention_tc.cu, on top of shim.h
// (one std::thread per CUDA thread, per-warp barriers). Defines ATT_TC_EMULATED so that the kernel
// file skips its inline-PTX versions and uses these, with the same signatures:
//   tc_mma     mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (PTX ISA fragment layouts)
//   tc_ldsm    ldmatrix.sync.aligned.m8n8.x4.shared.b16 (optionally .trans)
//   tc_pack    cvt.rn.bf16x2.f32 (round to nearest even)
//   tc_exp2    ex2.approx.ftz.f32 (here exact exp2, flushed below 2^-126)
//   tc_cp16 / tc_commit / tc_wait   cp.async 16 bytes, zero fill, commit_group, wait_group: the copies
//              are DEFERRED until the wait that covers their group, so reading a tile before waiting
//              for it reads stale data (and fails the test).
#pragma once
#include <atomic>
#include <cassert>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <vector>
#include "shim.h"

#define ATT_TC_EMULATED 1

struct uint4 {
    unsigned x, y, z, w;
};
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }

inline uint32_t tc_slot[1024][8];
inline const unsigned short* tc_ptrs[1024];
inline std::atomic<long long> tc_ldsm_count{0}, tc_ldsm_conflicts{0}, tc_mma_count{0};

static inline void tc_fail(const char* what) {
    fprintf(stderr, "emulator: %s\n", what);
    std::abort();
}
static inline void tc_warp_sync() { emu_blk->warps[emu_tid >> 5]->arrive_and_wait(); }
static inline float tc_bf(unsigned h) { return __uint_as_float((h & 0xffffu) << 16); }

/// D = A * B + C for the warp; every lane passes its own fragments (layouts as the PTX ISA,
/// "Matrix Fragments for mma.m16n8k16 with floating point type"):
///   A 16x16: a0,a1 = A[g][2t+{0,1}], a2,a3 = A[g+8][2t+{0,1}], a4,a5 = A[g][2t+8+{0,1}], a6,a7 = A[g+8][2t+8+{0,1}]
///   B 16x8:  b0,b1 = B[2t+{0,1}][g], b2,b3 = B[2t+8+{0,1}][g]
///   C/D 16x8 f32: c0,c1 = C[g][2t+{0,1}], c2,c3 = C[g+8][2t+{0,1}]
/// with g = lane >> 2, t = lane & 3, and element 2j of a register pair in the low 16 bits.
/// Products of bf16 are exact in double; the 16 products and C are summed in double, rounded once.
inline void tc_mma(float* d, const unsigned* a, const unsigned* b) {
    const int lane = emu_tid & 31, wb = emu_tid & ~31;
    for (int i = 0; i < 4; ++i) tc_slot[emu_tid][i] = a[i];
    tc_slot[emu_tid][4] = b[0];
    tc_slot[emu_tid][5] = b[1];
    tc_warp_sync();
    auto A = [&](int r, int k) {
        const int reg = (r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
        const unsigned w = tc_slot[wb + (r & 7) * 4 + ((k & 7) >> 1)][reg];
        return (double)tc_bf((k & 1) ? w >> 16 : w);
    };
    auto B = [&](int k, int n) {
        const unsigned w = tc_slot[wb + n * 4 + ((k & 7) >> 1)][4 + (k >= 8 ? 1 : 0)];
        return (double)tc_bf((k & 1) ? w >> 16 : w);
    };
    const int g = lane >> 2, t = lane & 3;
    float res[4];
    for (int i = 0; i < 4; ++i) {
        const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
        double acc = d[i];
        for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
        res[i] = (float)acc;
    }
    tc_warp_sync();
    for (int i = 0; i < 4; ++i) d[i] = res[i];
    if (lane == 0) tc_mma_count++;
}

/// ldmatrix .x4 (.trans): lanes 8m..8m+7 give the 8 row addresses (16-byte aligned) of matrix m.
/// Without trans r[m] = {M[lane/4][2(lane%4)], M[lane/4][2(lane%4)+1]}; with trans
/// r[m] = {M[2(lane%4)][lane/4], M[2(lane%4)+1][lane/4]} (M[row][col], row = address index).
/// Counts phases (one matrix = 8 addresses x 16 bytes) whose addresses do not cover 8 distinct
/// 16-byte bank groups (a shared-memory bank conflict).
inline void tc_ldsm_impl(unsigned* r, const unsigned short* p, bool trans) {
    const int lane = emu_tid & 31, wb = emu_tid & ~31;
    if (reinterpret_cast<uintptr_t>(p) & 15) tc_fail("ldmatrix row address not 16-byte aligned");
    tc_ptrs[emu_tid] = p;
    tc_warp_sync();
    const int g = lane >> 2, t = lane & 3;
    for (int m = 0; m < 4; ++m) {
        unsigned lo, hi;
        if (!trans) {
            const unsigned short* row = tc_ptrs[wb + 8 * m + g];
            lo = row[2 * t];
            hi = row[2 * t + 1];
        } else {
            lo = tc_ptrs[wb + 8 * m + 2 * t][g];
            hi = tc_ptrs[wb + 8 * m + 2 * t + 1][g];
        }
        r[m] = lo | (hi << 16);
    }
    if (lane == 0) {
        for (int m = 0; m < 4; ++m) {
            unsigned seen = 0;
            bool conflict = false;
            for (int i = 0; i < 8; ++i) {
                const unsigned grp = (unsigned)((reinterpret_cast<uintptr_t>(tc_ptrs[wb + 8 * m + i]) >> 4) & 7);
                if (seen & (1u << grp)) conflict = true;
                seen |= 1u << grp;
            }
            tc_ldsm_count++;
            if (conflict) tc_ldsm_conflicts++;
        }
    }
    tc_warp_sync();
}
inline void tc_ldsm(unsigned* r, const unsigned short* p) { tc_ldsm_impl(r, p, false); }
inline void tc_ldsm_t(unsigned* r, const unsigned short* p) { tc_ldsm_impl(r, p, true); }

static inline unsigned tc_rne(float f) {  // f32 -> bf16 bits, round to nearest even (NaN stays NaN)
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x0040u;
    u += 0x7fffu + ((u >> 16) & 1u);
    return u >> 16;
}
inline unsigned tc_pack(float lo, float hi) { return tc_rne(lo) | (tc_rne(hi) << 16); }

struct TcCopy {
    unsigned short* dst;
    const unsigned short* src;
    bool fill;
};
inline thread_local std::vector<TcCopy> tc_open;
inline thread_local std::deque<std::vector<TcCopy>> tc_groups;

inline void tc_cp16(unsigned short* dst, const unsigned short* src, bool fill) {
    if (reinterpret_cast<uintptr_t>(dst) & 15) tc_fail("cp.async shared address not 16-byte aligned");
    if (fill && (reinterpret_cast<uintptr_t>(src) & 15)) tc_fail("cp.async global address not 16-byte aligned");
    tc_open.push_back({dst, src, fill});
}
inline void tc_commit() {
    tc_groups.push_back(std::move(tc_open));
    tc_open.clear();
}
template <int N>
inline void tc_wait() {
    while ((int)tc_groups.size() > N) {
        for (const TcCopy& c : tc_groups.front()) {
            if (c.fill) std::memcpy(c.dst, c.src, 16);
            else std::memset(c.dst, 0, 16);
        }
        tc_groups.pop_front();
    }
}
/// Called by the harness after a kernel: no copy may be left pending or uncommitted.
inline bool tc_clean() { return tc_open.empty() && tc_groups.empty(); }

/// ex2.approx.ftz.f32: 2^x with results below 2^-126 flushed to zero.
inline float tc_exp2(float x) {
    const float y = std::exp2(x);
    return std::fabs(y) < 1.17549435e-38f ? 0.0f : y;
}

/// __all_sync over the full warp.
inline int __all_sync(unsigned, int pred) {
    const int wb = emu_tid & ~31;
    tc_slot[emu_tid][7] = pred != 0;
    tc_warp_sync();
    int all = 1;
    for (int l = 0; l < 32; ++l) all &= (int)tc_slot[wb + l][7];
    tc_warp_sync();
    return all;
}
