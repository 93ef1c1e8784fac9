// Emulated validation of kernels/attention_tc.cu (tensor-core bf16 attention) against an f64
// reference and against the FMA bf16 kernels of kernels/attention.cu, through the same source text
// NVRTC compiles (only the inline-PTX primitives are swapped for tc_shim.h's emulation). Exit
// status 1 when a case fails. Driven by tests/emulation.rs.
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <string>
#include <chrono>
#include <cstring>
#include <type_traits>
#include "tc_shim.h"
#include "reference.h"

#include "common.cuh"
#include "attention.cu"
#include "attention_tc.cu"

using std::vector;
static int failures = 0;

template <class K, class... A>
static void launch_checked(dim3 grid, dim3 block, K k, A... args) {
    launch(grid, block, [k](A... a) {
        k(a...);
        if (!tc_clean()) tc_fail("cp.async copies left pending at kernel exit");
    }, args...);
}

// max |a - ref| / max |ref| over the columns [c0, c1) of rows of width W (all of a when W == 0)
template <class R>
static double relerr(const vector<float>& a, const vector<R>& ref, int W = 0, int c0 = 0, int c1 = 0) {
    double m = 1e-30, e = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        if (W) {
            int c = (int)(i % W);
            if (c < c0 || c >= c1) continue;
        }
        m = std::max(m, std::fabs((double)ref[i]));
        e = std::max(e, std::fabs((double)a[i] - (double)ref[i]));
    }
    return e / m;
}

// max over rows of max|a - ref| / max(max|ref| in the row, 1e-2 max|ref| overall), rows of `len`
// elements starting every `stride` at offset `off` (count rows)
template <class R>
static double rowerr(const vector<float>& a, const vector<R>& ref, size_t count, size_t stride, size_t len, size_t off = 0) {
    double gm = 0;
    for (size_t r = 0; r < count; ++r)
        for (size_t k = 0; k < len; ++k) gm = std::max(gm, std::fabs((double)ref[r * stride + off + k]));
    double worst = 0;
    for (size_t r = 0; r < count; ++r) {
        double m = 1e-2 * gm + 1e-30, e = 0;
        for (size_t k = 0; k < len; ++k) {
            m = std::max(m, std::fabs((double)ref[r * stride + off + k]));
            e = std::max(e, std::fabs((double)a[r * stride + off + k] - (double)ref[r * stride + off + k]));
        }
        worst = std::max(worst, e / m);
    }
    return worst;
}

// max over rows of max|a - ref| / max(sum of |terms| in the row): the error relative to the
// rounding-error scale of each row (small even when the row's value nearly cancels)
template <class R>
static double conderr(const vector<float>& a, const vector<R>& ref, const vector<double>& mag, size_t count, size_t stride, size_t len, size_t off = 0) {
    double worst = 0;
    for (size_t r = 0; r < count; ++r) {
        double m = 1e-30, e = 0;
        for (size_t k = 0; k < len; ++k) {
            m = std::max(m, mag[r * stride + off + k]);
            e = std::max(e, std::fabs((double)a[r * stride + off + k] - (double)ref[r * stride + off + k]));
        }
        if (m > 1e-30) worst = std::max(worst, e / m);
    }
    return worst;
}

struct Res {
    vector<float> out, lse, dqkv;
};

using Fwd = void (*)(float*, unsigned short*, float*, const unsigned short*, const int*, int, int, int, int, int);
// backward kernels reading dout in f32 (the FMA kernels) or as the bf16 copy the delta kernel
// writes (the tensor-core kernels)
using Bwd = void (*)(float*, const float*, const unsigned short*, const float*, const float*, const int*, int, int, int, int, int);
using BwdH = void (*)(float*, const unsigned short*, const unsigned short*, const float*, const float*, const int*, int, int, int, int, int);

// The tensor-core backward templates instantiated with an f32 dout (rounded as it is staged): the
// bf16 copy must give the same bits.
#define TC_F32_DOUT(D, DQ_BN, DKDV_BQ, DKDV_SQ)                                                                                                  \
    static void dq_tc_f32dout_d##D(float* dqkv, const float* dout, const bf16_t* qkv, const float* lse, const float* delta, const int* key_mask, int batch, \
                                   int seq, int n_head, int n_kv_head, int head_dim) {                                                        \
        if ((int)blockIdx.z >= batch || head_dim != D) return;                                                                               \
        attn_bwd_dq_tc<D, 8, DQ_BN>(dqkv, dout, qkv, lse, delta, key_mask, seq, n_head, n_kv_head);                                           \
    }                                                                                                                                        \
    static void dkdv_tc_f32dout_d##D(float* dqkv, const float* dout, const bf16_t* qkv, const float* lse, const float* delta, const int* key_mask, int batch, \
                                     int seq, int n_head, int n_kv_head, int head_dim) {                                                      \
        if ((int)blockIdx.z >= batch || head_dim != D) return;                                                                               \
        attn_bwd_dkdv_tc<D, DKDV_BQ, DKDV_SQ, false>(dqkv, dout, qkv, lse, delta, key_mask, seq, n_head, n_kv_head);                          \
    }
TC_F32_DOUT(64, 64, 64, 64)
TC_F32_DOUT(128, 32, 32, 32)

template <class B>
static Res run(const Shape& s, Fwd fwd, B dq, B dkdv, unsigned fwd_rows, unsigned fwd_threads, unsigned dq_rows, unsigned dq_threads, unsigned dkdv_keys,
               unsigned dkdv_threads, const vector<unsigned short>& qkv, const vector<int>& mask, const vector<float>& dout) {
    constexpr bool half = std::is_same<B, BwdH>::value;
    const size_t rows = (size_t)s.batch * s.seq;
    const int W = (s.nh + 2 * s.nkv) * s.hd, OW = s.nh * s.hd;
    Res r;
    r.out.assign(rows * OW, NAN);
    r.lse.assign((size_t)s.batch * s.nh * s.seq, NAN);
    r.dqkv.assign(rows * W, NAN);
    if (!dq)  // the single-kernel backward adds dq atomically: its query columns start at 0
        for (size_t t = 0; t < rows; ++t) std::fill(&r.dqkv[t * W], &r.dqkv[t * W + s.nh * s.hd], 0.0f);
    vector<float> delta((size_t)s.batch * s.nh * s.seq, NAN);
    auto cdiv = [](int a, unsigned b) { return (unsigned)((a + b - 1) / b); };
    // with the output's bf16 copy: every value the output rounded
    vector<unsigned short> out16(rows * OW, 0x7fc1);
    launch_checked(dim3{cdiv(s.seq, fwd_rows), (unsigned)s.nh, (unsigned)s.batch}, dim3{fwd_threads}, fwd, r.out.data(), out16.data(), r.lse.data(), qkv.data(), mask.data(), s.batch, s.seq, s.nh, s.nkv, s.hd);
    for (size_t i = 0; i < out16.size(); ++i)
        if (out16[i] != f32_to_bf16(r.out[i])) {
            printf("  the forward's bf16 copy of its output differs at %zu\n", i);
            ++failures;
            break;
        }
    {
        // the copy alone (a null output: Backend::hold_operand_only): the same copy, and the lse
        vector<unsigned short> only16(rows * OW, 0x7fc1);
        vector<float> lse2(r.lse.size(), NAN);
        launch_checked(dim3{cdiv(s.seq, fwd_rows), (unsigned)s.nh, (unsigned)s.batch}, dim3{fwd_threads}, fwd, (float*)nullptr, only16.data(), lse2.data(), qkv.data(), mask.data(), s.batch, s.seq, s.nh, s.nkv, s.hd);
        if (only16 != out16 || std::memcmp(lse2.data(), r.lse.data(), lse2.size() * sizeof(float)) != 0) {
            printf("  the forward with a null output wrote another copy or lse\n");
            ++failures;
        }
    }
    // the bf16 copy of dout, written by the delta kernel (every value: checked below)
    vector<unsigned short> d16(half ? dout.size() : 0, 0x7fc1);
    launch(dim3{(unsigned)s.seq, (unsigned)s.nh, (unsigned)s.batch}, dim3{32}, attention_bwd_delta, delta.data(), (const float*)dout.data(), (const float*)r.out.data(),
           half ? d16.data() : (unsigned short*)nullptr, s.batch, s.seq, s.nh, s.hd);
    for (size_t i = 0; i < d16.size(); ++i)
        if (d16[i] != f32_to_bf16(dout[i])) {
            printf("  the delta kernel's bf16 dout differs at %zu\n", i);
            ++failures;
            break;
        }
    const auto* dp = [&] {
        if constexpr (half) {
            return (const unsigned short*)d16.data();
        } else {
            return (const float*)dout.data();
        }
    }();
    if (dq) launch_checked(dim3{cdiv(s.seq, dq_rows), (unsigned)s.nh, (unsigned)s.batch}, dim3{dq_threads}, dq, r.dqkv.data(), dp, qkv.data(), (const float*)r.lse.data(), (const float*)delta.data(), mask.data(), s.batch, s.seq, s.nh, s.nkv, s.hd);
    launch_checked(dim3{cdiv(s.seq, dkdv_keys), (unsigned)s.nkv, (unsigned)s.batch}, dim3{dkdv_threads}, dkdv, r.dqkv.data(), dp, qkv.data(), (const float*)r.lse.data(), (const float*)delta.data(), mask.data(), s.batch, s.seq, s.nh, s.nkv, s.hd);
    return r;
}

static bool g_bf16_dout = false;
static void test(const Shape& s, int pad_mode) {
    const int W = (s.nh + 2 * s.nkv) * s.hd, OW = s.nh * s.hd, hd = s.hd;
    const size_t rows = (size_t)s.batch * s.seq;
    vector<float> qkv(rows * W);
    for (auto& x : qkv) x = frand() * 2.0f;
    const vector<float> qkv_f32 = qkv;
    vector<unsigned short> qkv_b(qkv.size());
    for (size_t i = 0; i < qkv.size(); ++i) {
        qkv_b[i] = f32_to_bf16(qkv[i]);
        qkv[i] = bf16_to_f32(qkv_b[i]);  // the reference sees the bf16 values
    }
    vector<float> dout(rows * OW);
    for (auto& x : dout) x = frand();
    if (g_bf16_dout)
        for (auto& x : dout) x = bf16_to_f32(f32_to_bf16(x));  // exactly what the kernels stage
    vector<int> mask(rows, 1);
    if (pad_mode == 2) {
        for (auto& m : mask) m = frand() < -0.4f ? 0 : 1;  // about 30% masked
    } else if (pad_mode == 3) {
        for (int t = 0; t < s.seq / 5; ++t) mask[t] = 0;
        for (int t = 0; t < s.seq; ++t) mask[s.seq + t] = 0;
    } else if (pad_mode) {
        for (int t = 0; t < s.seq / 3; ++t) mask[t] = 0;  // sequence 0: left padding (fully masked rows)
        if (s.batch > 1) {
            for (int t = 0; t < s.seq / 4; ++t) mask[2 * s.seq - 1 - t] = 0;  // sequence 1: right padding
            mask[s.seq + s.seq / 2] = 0;  // and a hole
        }
    }
    static const char* modes[] = {"unpadded", "left/right padding + hole", "random key mask (30%)", "sequence 1 fully masked"};
    printf("hd %d batch %d seq %d heads %d/%d, %s, dout %s\n", hd, s.batch, s.seq, s.nh, s.nkv, modes[pad_mode], g_bf16_dout ? "bf16-exact" : "f32");
    vector<double> oref, lref, dref, oabs, dabs;
    attn_ref(s, qkv, mask, dout, oref, lref, dref, &oabs, &dabs);
    // yardstick: how far the exact result moves when qkv (f32) is stored as bf16
    vector<double> o32, l32, d32;
    attn_ref(s, qkv_f32, mask, dout, o32, l32, d32);
    {
        vector<float> of(oref.begin(), oref.end()), df(dref.begin(), dref.end());
        printf("  bf16-storage yardstick (exact on f32 qkv vs exact on bf16 qkv): out %.2e  dq %.2e  dk %.2e  dv %.2e\n", relerr(of, o32),
               relerr(df, d32, W, 0, s.nh * hd), relerr(df, d32, W, s.nh * hd, (s.nh + s.nkv) * hd), relerr(df, d32, W, (s.nh + s.nkv) * hd, W));
    }

    auto t0 = std::chrono::steady_clock::now();
    Res tc = hd == 64 ? run(s, attention_fwd_tc_d64, attention_bwd_dq_tc_d64, attention_bwd_dkdv_tc_d64, 128, 128, 128, 256, 64, 128, qkv_b, mask, dout)
                      : run(s, attention_fwd_tc_d128, attention_bwd_dq_tc_d128, attention_bwd_dkdv_tc_d128, 128, 256, 128, 256, 64, 128, qkv_b, mask, dout);
    auto t1 = std::chrono::steady_clock::now();
    // FlashAttention-2's single backward kernel: dq added atomically by the dk/dv kernel
    Res tq = hd == 64 ? run(s, attention_fwd_tc_d64, (BwdH) nullptr, attention_bwd_dkdvq_tc_d64, 128, 128, 0, 0, 64, 128, qkv_b, mask, dout)
                      : run(s, attention_fwd_tc_d128, (BwdH) nullptr, attention_bwd_dkdvq_tc_d128, 128, 256, 0, 0, 64, 128, qkv_b, mask, dout);
    // the same tensor-core kernels staging the f32 dout themselves
    Res t32 = hd == 64 ? run(s, attention_fwd_tc_d64, (Bwd)dq_tc_f32dout_d64, (Bwd)dkdv_tc_f32dout_d64, 128, 128, 128, 256, 64, 128, qkv_b, mask, dout)
                       : run(s, attention_fwd_tc_d128, (Bwd)dq_tc_f32dout_d128, (Bwd)dkdv_tc_f32dout_d128, 128, 256, 128, 256, 64, 128, qkv_b, mask, dout);
    Res fm = hd == 64 ? run(s, attention_fwd_bf16_d64, attention_bwd_dq_bf16_d64, attention_bwd_dkdv_bf16_d64, 64, 128, 64, 128, 64, 128, qkv_b, mask, dout)
                      : run(s, attention_fwd_bf16_d128, attention_bwd_dq_bf16_d128, attention_bwd_dkdv_bf16_d128, 64, 128, 64, 128, 64, 128, qkv_b, mask, dout);

    auto report = [&](const char* name, const Res& r) {
        bool ok = true;
        double lerr = 0;
        int inf_rows = 0;
        for (size_t i = 0; i < r.lse.size(); ++i) {
            if (std::isinf(lref[i])) {
                ok &= std::isinf(r.lse[i]) && r.lse[i] > 0;
                ++inf_rows;
            } else {
                lerr = std::max(lerr, std::fabs(r.lse[i] - lref[i]));
            }
        }
        for (float v : r.out) ok &= !std::isnan(v);
        for (float v : r.dqkv) ok &= !std::isnan(v);  // every element written
        // fully masked rows: out exactly 0; their query gradient exactly 0
        for (int b = 0; b < s.batch; ++b)
            for (int h = 0; h < s.nh; ++h)
                for (int i = 0; i < s.seq; ++i)
                    if (std::isinf(lref[((size_t)b * s.nh + h) * s.seq + i]))
                        for (int d = 0; d < hd; ++d) {
                            ok &= r.out[(size_t)(b * s.seq + i) * OW + h * hd + d] == 0.0f;
                            ok &= r.dqkv[(size_t)(b * s.seq + i) * W + h * hd + d] == 0.0f;
                        }
        // masked keys get exactly zero dk, dv
        for (size_t t = 0; t < rows; ++t)
            if (!mask[t])
                for (int c = s.nh * hd; c < W; ++c) ok &= r.dqkv[t * W + c] == 0.0f;
        const double eo = relerr(r.out, oref), eq = relerr(r.dqkv, dref, W, 0, s.nh * hd), ek = relerr(r.dqkv, dref, W, s.nh * hd, (s.nh + s.nkv) * hd),
                     ev = relerr(r.dqkv, dref, W, (s.nh + s.nkv) * hd, W);
        // per row: (token, head) rows of out and dq, (token, kv head) rows of dk and dv
        double ro = 0, rq = 0, rk = 0, rv = 0;
        for (int h = 0; h < s.nh; ++h) {
            ro = std::max(ro, rowerr(r.out, oref, rows, OW, hd, (size_t)h * hd));
            rq = std::max(rq, rowerr(r.dqkv, dref, rows, W, hd, (size_t)h * hd));
        }
        for (int g = 0; g < s.nkv; ++g) {
            rk = std::max(rk, rowerr(r.dqkv, dref, rows, W, hd, (size_t)(s.nh + g) * hd));
            rv = std::max(rv, rowerr(r.dqkv, dref, rows, W, hd, (size_t)(s.nh + s.nkv + g) * hd));
        }
        double co = 0, cq = 0, ck = 0, cv = 0;
        for (int h = 0; h < s.nh; ++h) {
            co = std::max(co, conderr(r.out, oref, oabs, rows, OW, hd, (size_t)h * hd));
            cq = std::max(cq, conderr(r.dqkv, dref, dabs, rows, W, hd, (size_t)h * hd));
        }
        for (int g = 0; g < s.nkv; ++g) {
            ck = std::max(ck, conderr(r.dqkv, dref, dabs, rows, W, hd, (size_t)(s.nh + g) * hd));
            cv = std::max(cv, conderr(r.dqkv, dref, dabs, rows, W, hd, (size_t)(s.nh + s.nkv + g) * hd));
        }
        printf("  %-4s out %.2e  lse(abs) %.2e  dq %.2e  dk %.2e  dv %.2e | worst row: out %.2e dq %.2e dk %.2e dv %.2e | worst row / its |terms|: out %.2e dq %.2e dk %.2e dv %.2e (inf rows %d)%s\n",
               name, eo, lerr, eq, ek, ev, ro, rq, rk, rv, co, cq, ck, cv, inf_rows, ok ? "" : "  STRUCTURE FAIL");
        return std::vector<double>{ok ? 0.0 : 1.0, eo, lerr, eq, ek, ev, ro, rq, rk, rv, co, cq, ck, cv};
    };
    printf("  (tc emulated in %.1f s)\n", std::chrono::duration<double>(t1 - t0).count());
    auto et = report("tc", tc);
    auto eq = report("tcq", tq);
    auto ef = report("fma", fm);
    printf("  tc vs fma: out %.2e  dqkv %.2e; tcq vs tc: dqkv %.2e\n", relerr(tc.out, fm.out), relerr(tc.dqkv, fm.dqkv), relerr(tq.dqkv, tc.dqkv));
    // pass: structure ok, and tc error within 1e-2 and not far beyond the FMA kernel's own
    bool pass = et[0] == 0.0 && ef[0] == 0.0 && eq[0] == 0.0;
    for (auto* e : {&et, &eq}) {
        pass &= (*e)[2] < 1e-2;
        for (int k : {1, 3, 4, 5}) pass &= (*e)[k] < 1e-2;
        for (int k : {10, 11, 12, 13}) pass &= (*e)[k] < 1e-2;  // any row, relative to the size of its terms
    }
    // dk and dv do not depend on how dq is accumulated
    for (size_t t = 0; t < rows; ++t)
        for (int c = s.nh * hd; c < W; ++c) pass &= tq.dqkv[t * W + c] == tc.dqkv[t * W + c];
    // dout read from its bf16 copy or staged from f32: the same bits
    bool same = true;
    for (size_t i = 0; i < tc.dqkv.size(); ++i) same &= std::memcmp(&tc.dqkv[i], &t32.dqkv[i], 4) == 0;
    printf("  tc with dout in bf16 vs staged from f32: %s\n", same ? "bitwise equal" : "DIFFER");
    pass &= same;
    if (!pass) {
        printf("  FAIL\n");
        ++failures;
    }
}

int main(int argc, char** argv) {
    vector<std::pair<Shape, int>> cases = {
        {{2, 70, 4, 2, 64}, 1},  {{2, 130, 4, 1, 64}, 1},  {{2, 200, 4, 2, 64}, 1},  {{1, 64, 2, 2, 64}, 0},   {{2, 150, 4, 2, 64}, 2},
        {{2, 90, 2, 1, 64}, 3},  {{1, 5, 2, 1, 64}, 0},
        {{2, 70, 4, 2, 128}, 1}, {{2, 130, 4, 1, 128}, 1}, {{2, 200, 4, 2, 128}, 1}, {{1, 129, 2, 1, 128}, 0}, {{2, 100, 4, 1, 128}, 2},
        {{2, 90, 2, 2, 128}, 3}, {{2, 17, 4, 2, 128}, 1},
    };
    // argument 1: the cases to run, as comma-separated indices (none or "": all); argument 2: "bf16"
    // rounds dout to bf16 as the bf16 backend does
    vector<bool> run(cases.size(), argc <= 1 || argv[1][0] == 0);
    if (argc > 1 && argv[1][0] != 0) {
        std::string list = argv[1];
        for (size_t at = 0; at <= list.size();) {
            size_t end = list.find(',', at);
            if (end == std::string::npos) end = list.size();
            int i = atoi(list.substr(at, end - at).c_str());
            if (i < 0 || i >= (int)cases.size()) {
                printf("no case %d (there are %zu)\n", i, cases.size());
                return 2;
            }
            run[i] = true;
            at = end + 1;
        }
    }
    g_bf16_dout = argc > 2 && std::string(argv[2]) == "bf16";
    for (size_t i = 0; i < cases.size(); ++i)
        if (run[i]) test(cases[i].first, cases[i].second);
    printf("ldmatrix phases %lld, bank-conflicted %lld; mma %lld\n", tc_ldsm_count.load(), tc_ldsm_conflicts.load(), tc_mma_count.load());
    printf(failures ? "%d FAILURES\n" : "all passed\n", failures);
    return failures != 0;
}
