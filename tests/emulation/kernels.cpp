// Emulated validation of kernels/*.cu (every file but attention_tc.cu) through the same source
// text NVRTC compiles, run on the CPU by shim.h (one std::thread per CUDA thread). Each kernel is
// compared with a C++ port of its CPU-backend twin (bitwise where the CPU result is fixed by the
// order of operations: embedding backward, AdamW, add, scale, fill, bf16 rounding; column sums and
// norm parameter gradients bitwise against a port in the GPU's own fixed order) or with an f64
// reference. Argument: one group to run (pointwise,
// reduce, embedding, norm, rope, loss, adamw, decode, attention, dora); none runs all. Exit status 1
// on any failure. Driven by tests/emulation.rs.
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <string>
#include "shim.h"
#include "reference.h"

#include "common.cuh"
#include "pointwise.cu"
#include "reduce.cu"
#include "embedding.cu"
#include "norm.cu"
#include "rope.cu"
#include "attention.cu"
#include "cross_entropy.cu"
#include "adamw.cu"
#include "dora.cu"

using std::vector;
static int failures = 0;

static void check(const char* what, bool ok) {
    if (!ok) {
        printf("FAIL: %s\n", what);
        ++failures;
    }
}
// max |a-b| / max(max|b|, floor)
static double nerr(const vector<float>& a, const vector<double>& b, double floor = 1e-30) {
    double m = floor, e = 0;
    for (size_t i = 0; i < b.size(); ++i) m = std::max(m, std::fabs(b[i]));
    for (size_t i = 0; i < b.size(); ++i) e = std::max(e, std::fabs((double)a[i] - b[i]));
    return e / m;
}
static double nerr(const vector<float>& a, const vector<float>& b) {
    vector<double> bd(b.begin(), b.end());
    return nerr(a, bd);
}
static bool bitwise(const vector<float>& a, const vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
}
static dim3 g1(long long n) { return dim3{unsigned(std::min<long long>((n + 255) / 256, 65535)), 1, 1}; }

// ---- CPU reference ports (f32, same op order, no contraction) ----
// The GPU's column-sum order: blocks of 32 rows (crate::backend::REDUCE_BLOCK_ROWS), each summed
// from 0, added in block order. (The CPU backend's reduce_rows uses 16 blocks; the two agree to
// rounding.)
static void reduce_rows_ref(int rows, int c, vector<vector<float>*> outs, std::function<void(int, int, vector<vector<float>>&)> f) {
    const int per = 32;
    int nb = (rows + per - 1) / per;
    for (int b = 0; b < nb; ++b) {
        vector<vector<float>> acc(outs.size(), vector<float>(c, 0.0f));
        f(b * per, std::min((b + 1) * per, rows), acc);
        for (size_t o = 0; o < outs.size(); ++o)
            for (int i = 0; i < c; ++i) (*outs[o])[i] += acc[o][i];
    }
}

// A column reduction as the backend runs it: the partials kernel `part_kernel` (given the partials
// buffer and `args`), then reduce_partials into out0 (and out1). `gy` caps the grid's y size, so
// that a small cap makes the kernel's loop over row blocks take more than one turn.
template <class K, class... Args>
static void reduce_cols_emu(int rows, int c, int nout, float* out0, float* out1, unsigned gy, K part_kernel, Args... args) {
    const int nb = (rows + RR_ROWS - 1) / RR_ROWS;
    if (nb == 0) return;
    vector<float> part((size_t)nb * nout * c, std::nanf(""));
    launch(dim3{unsigned((c + 31) / 32), std::min(unsigned((nb + 7) / 8), gy)}, dim3{32, 8}, part_kernel, part.data(), args...);
    launch(dim3{unsigned((c + 31) / 32)}, dim3{32, 8}, reduce_partials, out0, out1, (const float*)part.data(), nb, nout, c);
}

// whether `h` holds each value of `f` rounded to bf16 (what a forward kernel writes beside its f32
// output for a held operand, and what the cast kernel would write)
static bool rounded(const vector<float>& f, const vector<bf16_t>& h) {
    bool ok = f.size() == h.size();
    for (size_t i = 0; ok && i < f.size(); ++i) ok = h[i] == f32_to_bf16(f[i]);
    return ok;
}

static void test_pointwise() {
    // the elementwise4 kernels on one block: several turns of the loop and a partial last one
    const long long n = 3001;
    auto x = rvec(n, 4.0f), d = rvec(n);
    vector<float> out(n), dx(n);
    vector<float> out_plain(n);
    vector<bf16_t> out16(n);
    launch(dim3{1}, dim3{256}, gelu_fwd, out.data(), out16.data(), (const float*)x.data(), n);
    launch(dim3{1}, dim3{256}, gelu_fwd, out_plain.data(), (bf16_t*)nullptr, (const float*)x.data(), n);
    check("gelu fwd with its bf16 copy", rounded(out, out16) && bitwise(out, out_plain));
    {
        // held with hold_operand_only: no f32 output, the same bf16 copy
        vector<bf16_t> only16(n, 0xdead);
        launch(dim3{1}, dim3{256}, gelu_fwd, (float*)nullptr, only16.data(), (const float*)x.data(), n);
        check("gelu fwd, bf16 copy only", only16 == out16);
    }
    vector<double> ref(n), dref(n);
    for (int i = 0; i < n; ++i) {
        double v = x[i], t = std::tanh(0.7978846 * (v + 0.044715 * v * v * v));
        ref[i] = 0.5 * v * (1 + t);
        dref[i] = (0.5 * (1 + t) + 0.5 * v * (1 - t * t) * 0.7978846 * (1 + 3 * 0.044715 * v * v)) * d[i];
    }
    launch(dim3{1}, dim3{256}, gelu_bwd, dx.data(), (const float*)x.data(), (const float*)d.data(), n);
    printf("gelu fwd %.2e bwd %.2e\n", nerr(out, ref), nerr(dx, dref));
    check("gelu", nerr(out, ref) < 1e-6 && nerr(dx, dref) < 1e-6);

    const int rows = 70, I = 37;
    auto xs = rvec(rows * 2 * I, 5.0f), ds = rvec(rows * I);
    vector<float> o(rows * I), dxs(rows * 2 * I, 123.0f);
    vector<bf16_t> o16(rows * I);
    vector<float> o_plain(rows * I);
    launch(dim3{1}, dim3{256}, swiglu_fwd, o.data(), o16.data(), (const float*)xs.data(), (long long)rows, I);
    launch(dim3{1}, dim3{256}, swiglu_fwd, o_plain.data(), (bf16_t*)nullptr, (const float*)xs.data(), (long long)rows, I);
    check("swiglu fwd with its bf16 copy", rounded(o, o16) && bitwise(o, o_plain));
    {
        vector<bf16_t> only16(rows * I, 0xdead);
        launch(dim3{1}, dim3{256}, swiglu_fwd, (float*)nullptr, only16.data(), (const float*)xs.data(), (long long)rows, I);
        check("swiglu fwd, bf16 copy only", only16 == o16);
    }
    launch(dim3{1}, dim3{256}, swiglu_bwd, dxs.data(), (const float*)xs.data(), (const float*)ds.data(), (long long)rows, I);
    vector<double> oref(rows * I), dref2(rows * 2 * I);
    for (int r = 0; r < rows; ++r)
        for (int k = 0; k < I; ++k) {
            double g = xs[r * 2 * I + k], up = xs[r * 2 * I + I + k], s = 1 / (1 + std::exp(-g)), dd = ds[r * I + k];
            oref[r * I + k] = g * s * up;
            dref2[r * 2 * I + I + k] = dd * g * s;
            dref2[r * 2 * I + k] = dd * up * s * (1 + g * (1 - s));
        }
    printf("swiglu fwd %.2e bwd %.2e\n", nerr(o, oref), nerr(dxs, dref2));
    check("swiglu", nerr(o, oref) < 1e-6 && nerr(dxs, dref2) < 1e-6);
    {
        // the gradient straight into padded bf16 rows: swiglu_bwd's values rounded, pad untouched
        const long long ld = 2 * I + 6;
        vector<bf16_t> d16((size_t)rows * ld, 0xdead);
        launch(dim3{1}, dim3{256}, swiglu_bwd_bf16, d16.data(), ld, (const float*)xs.data(), (const float*)ds.data(), (long long)rows, I);
        bool same = true;
        for (int r = 0; r < rows; ++r)
            for (long long j = 0; j < ld; ++j) same &= d16[r * ld + j] == (j < 2 * I ? f32_to_bf16(dxs[r * 2 * I + j]) : (bf16_t)0xdead);
        check("swiglu bwd into bf16 rows", same);
    }
    {
        // the _x16 kernels read x as bf16: the same bits as the f32 kernels on its values widened
        vector<bf16_t> x16(n), xs16(rows * 2 * I);
        vector<float> xw(n), xsw(rows * 2 * I);
        for (long long i = 0; i < n; ++i) xw[i] = bf16_to_f32(x16[i] = f32_to_bf16(x[i]));
        for (int i = 0; i < rows * 2 * I; ++i) xsw[i] = bf16_to_f32(xs16[i] = f32_to_bf16(xs[i]));
        vector<float> f1(n), f2(n), b1(n), b2(n);
        vector<bf16_t> h1(n), h2(n);
        launch(dim3{1}, dim3{256}, gelu_fwd, f1.data(), h1.data(), (const float*)xw.data(), n);
        launch(dim3{1}, dim3{256}, gelu_fwd_x16, f2.data(), h2.data(), (const bf16_t*)x16.data(), n);
        launch(dim3{1}, dim3{256}, gelu_bwd, b1.data(), (const float*)xw.data(), (const float*)d.data(), n);
        launch(dim3{1}, dim3{256}, gelu_bwd_x16, b2.data(), (const bf16_t*)x16.data(), (const float*)d.data(), n);
        check("gelu fwd and bwd from bf16 x", bitwise(f1, f2) && h1 == h2 && bitwise(b1, b2));
        vector<float> o1(rows * I), o2(rows * I), g1v(rows * 2 * I), g2v(rows * 2 * I);
        vector<bf16_t> oh1(rows * I), oh2(rows * I);
        launch(dim3{1}, dim3{256}, swiglu_fwd, o1.data(), oh1.data(), (const float*)xsw.data(), (long long)rows, I);
        launch(dim3{1}, dim3{256}, swiglu_fwd_x16, o2.data(), oh2.data(), (const bf16_t*)xs16.data(), (long long)rows, I);
        launch(dim3{1}, dim3{256}, swiglu_bwd, g1v.data(), (const float*)xsw.data(), (const float*)ds.data(), (long long)rows, I);
        launch(dim3{1}, dim3{256}, swiglu_bwd_x16, g2v.data(), (const bf16_t*)xs16.data(), (const float*)ds.data(), (long long)rows, I);
        const long long ld = 2 * I + 6;
        vector<bf16_t> r1((size_t)rows * ld, 0xdead), r2((size_t)rows * ld, 0xdead);
        launch(dim3{1}, dim3{256}, swiglu_bwd_bf16, r1.data(), ld, (const float*)xsw.data(), (const float*)ds.data(), (long long)rows, I);
        launch(dim3{1}, dim3{256}, swiglu_bwd_bf16_x16, r2.data(), ld, (const bf16_t*)xs16.data(), (const float*)ds.data(), (long long)rows, I);
        check("swiglu fwd and bwd from bf16 x", bitwise(o1, o2) && oh1 == oh2 && bitwise(g1v, g2v) && r1 == r2);
        // _d16: dout read as bf16, with x as f32 or bf16: the same bits as the f32 kernels on the
        // widened values; and the widening kernel
        vector<bf16_t> ds16(rows * I);
        vector<float> dsw(rows * I), back(rows * I, NAN);
        for (int i = 0; i < rows * I; ++i) dsw[i] = bf16_to_f32(ds16[i] = f32_to_bf16(ds[i]));
        launch(dim3{3}, dim3{64}, cast_bf16_f32, back.data(), (const bf16_t*)ds16.data(), (long long)rows * I);
        vector<bf16_t> r3((size_t)rows * ld, 0xdead), r4((size_t)rows * ld, 0xdead), r5((size_t)rows * ld, 0xdead), r6((size_t)rows * ld, 0xdead);
        launch(dim3{1}, dim3{256}, swiglu_bwd_bf16, r3.data(), ld, (const float*)xs.data(), (const float*)dsw.data(), (long long)rows, I);
        launch(dim3{1}, dim3{256}, swiglu_bwd_bf16_d16, r4.data(), ld, (const float*)xs.data(), (const bf16_t*)ds16.data(), (long long)rows, I);
        launch(dim3{1}, dim3{256}, swiglu_bwd_bf16, r5.data(), ld, (const float*)xsw.data(), (const float*)dsw.data(), (long long)rows, I);
        launch(dim3{1}, dim3{256}, swiglu_bwd_bf16_x16_d16, r6.data(), ld, (const bf16_t*)xs16.data(), (const bf16_t*)ds16.data(), (long long)rows, I);
        check("swiglu bwd into bf16 rows from a bf16 dout", r3 == r4 && r5 == r6 && r3 != r5 && bitwise(back, dsw));
    }

    vector<float> a = rvec(n), b = rvec(n), s(n);
    launch(dim3{1}, dim3{256}, add_f32, s.data(), (const float*)a.data(), (const float*)b.data(), n);
    bool ok = true;
    for (int i = 0; i < n; ++i) ok &= s[i] == a[i] + b[i];
    launch(g1(n), dim3{256}, scale_f32, s.data(), 0.37f, n);
    for (int i = 0; i < n; ++i) ok &= s[i] == (a[i] + b[i]) * 0.37f;
    launch(g1(n), dim3{256}, fill_f32, s.data(), 2.5f, n);
    for (int i = 0; i < n; ++i) ok &= s[i] == 2.5f;
    check("add/scale/fill", ok);

    // dropout: the mask the CPU backend computes (the same SplitMix64 hash, written out here)
    {
        const long long nd = 10007, key = 0x1234567887654321ll, threshold = 1288490189ll;  // p = 0.3
        auto xd = rvec(nd), ref = xd;
        launch(g1(nd), dim3{256}, dropout_f32, xd.data(), key, threshold, 1.0f / 0.7f, nd);
        long long kept = 0;
        bool same = true;
        for (long long i = 0; i < nd; ++i) {
            unsigned long long z = (unsigned long long)key + ((unsigned long long)i + 1ull) * 0x9E3779B97F4A7C15ull;
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
            z ^= z >> 31;
            const bool keep = (z >> 32) >= (unsigned long long)threshold;
            kept += keep;
            same &= xd[i] == (keep ? ref[i] * (1.0f / 0.7f) : 0.0f);
        }
        printf("dropout kept %.4f of %lld\n", (double)kept / nd, nd);
        check("dropout", same && kept > nd * 0.68 && kept < nd * 0.72);
    }

    // column blocks: dst [rows, ld] += scale * src [rows, width] at column off, and back
    {
        const int rows = 9, ld = 37, width = 11, off = 17;
        auto dst = rvec(rows * ld), src = rvec(rows * width);
        auto ref = dst;
        launch(g1(rows * width), dim3{256}, add_cols_f32, dst.data(), (const float*)src.data(), (long long)rows, width, ld, off, 0.625f);
        for (int r = 0; r < rows; ++r)
            for (int j = 0; j < width; ++j) ref[r * ld + off + j] = ref[r * ld + off + j] + 0.625f * src[r * width + j];
        bool same = dst == ref;
        vector<float> back(rows * width, 99.0f);
        launch(g1(rows * width), dim3{256}, take_cols_f32, back.data(), (const float*)dst.data(), (long long)rows, width, ld, off, -2.0f);
        for (int r = 0; r < rows; ++r)
            for (int j = 0; j < width; ++j) same &= back[r * width + j] == -2.0f * dst[r * ld + off + j];
        check("add_cols/take_cols", same);
    }

    // bf16 rounding: ties to even, NaN, inf, overflow to inf
    vector<float> cv = {1.0f, __uint_as_float(0x3f808000u), __uint_as_float(0x3f818000u), __uint_as_float(0x3f808001u), -0.0f,
                        __int_as_float(0x7f800000), __uint_as_float(0x7f800001u), __uint_as_float(0x7f7fffffu), __uint_as_float(0xff810000u)};
    vector<unsigned short> cb(cv.size());
    launch(g1(cv.size()), dim3{256}, cast_f32_bf16, cb.data(), (const float*)cv.data(), (long long)cv.size());
    vector<unsigned short> want = {0x3f80, 0x3f80, 0x3f82, 0x3f81, 0x8000, 0x7f80, 0x7fc0, 0x7f80, 0xffc1};
    ok = cb == want;
    if (!ok)
        for (size_t i = 0; i < cb.size(); ++i) printf("  bf16 %08x -> %04x want %04x\n", __float_as_uint(cv[i]), cb[i], want[i]);
    check("cast bf16", ok);
    // the four-per-thread body and the tail, on a length that is not a multiple of 4 and with more
    // values than threads (grid-stride), against the scalar rounding
    for (long long len : {4099LL, 3LL}) {
        auto xs = rvec(len, 1e3f);
        vector<unsigned short> ys(len, 0xdead);
        launch(dim3{2}, dim3{256}, cast_f32_bf16, ys.data(), (const float*)xs.data(), len);
        bool same = true;
        for (long long i = 0; i < len; ++i) same &= ys[i] == f32_to_bf16(xs[i]);
        check(("cast bf16 vectorized n=" + std::to_string(len)).c_str(), same);
    }
    // into padded rows: the pad columns stay as they were
    {
        const int rows = 5, cols = 2501, ldy = 2504;
        auto xs = rvec(rows * cols);
        vector<unsigned short> ys(rows * ldy, 0xdead);
        launch(dim3{1, rows}, dim3{256}, cast_f32_bf16_rows, ys.data(), (const float*)xs.data(), cols, (long long)ldy);
        bool same = true;
        for (int r = 0; r < rows; ++r)
            for (int j = 0; j < ldy; ++j) same &= ys[r * ldy + j] == (j < cols ? f32_to_bf16(xs[r * cols + j]) : 0xdead);
        check("cast bf16 into padded rows", same);
    }
}

static void test_reduce() {
    for (int rows : {0, 1, 5, 17, 100, 333, 1000, 2100}) {
        const int c = 70;
        auto src = rvec((size_t)rows * c);
        auto dst = rvec(c), ref = dst;
        reduce_cols_emu(rows, c, 1, dst.data(), nullptr, rows == 1000 ? 2u : 65535u, colsum_partials, (const float*)src.data(), rows, c);
        reduce_rows_ref(rows, c, {&ref}, [&](int r0, int r1, vector<vector<float>>& acc) {
            for (int r = r0; r < r1; ++r)
                for (int j = 0; j < c; ++j) acc[0][j] += src[r * c + j];
        });
        check(("colsum bitwise rows=" + std::to_string(rows)).c_str(), bitwise(dst, ref));
        // with the bf16 cast into padded rows on the way: the same sums, every value rounded once
        const long long ld = c + 2;
        auto dst2 = rvec(c);
        vector<float> start = dst2;
        vector<bf16_t> cast((size_t)rows * ld + 1, 0xdead);
        reduce_cols_emu(rows, c, 1, dst2.data(), nullptr, rows == 1000 ? 2u : 65535u, colsum_cast_partials, (const float*)src.data(), cast.data(), rows, c, ld);
        auto ref2 = start;
        reduce_rows_ref(rows, c, {&ref2}, [&](int r0, int r1, vector<vector<float>>& acc) {
            for (int r = r0; r < r1; ++r)
                for (int j = 0; j < c; ++j) acc[0][j] += src[r * c + j];
        });
        bool same = bitwise(dst2, ref2);
        for (int r = 0; r < rows; ++r)
            for (long long j = 0; j < ld; ++j) same = same && cast[r * ld + j] == (j < c ? f32_to_bf16(src[r * c + j]) : (bf16_t)0xdead);
        check(("colsum with the bf16 cast rows=" + std::to_string(rows)).c_str(), same);
        // through a GELU on the way: the same bits as gelu_bwd's output cast and summed above
        auto pre = rvec((size_t)rows * c, 4.0f), dact = rvec((size_t)rows * c);
        vector<float> dpre((size_t)rows * c + 1);
        if (rows > 0) launch(dim3{4}, dim3{256}, gelu_bwd, dpre.data(), (const float*)pre.data(), (const float*)dact.data(), (long long)rows * c);
        auto dst3 = start, ref3 = start;
        vector<bf16_t> cast3((size_t)rows * ld + 1, 0xdead), cast_ref((size_t)rows * ld + 1, 0xdead);
        reduce_cols_emu(rows, c, 1, ref3.data(), nullptr, 65535u, colsum_cast_partials, (const float*)dpre.data(), cast_ref.data(), rows, c, ld);
        reduce_cols_emu(rows, c, 1, dst3.data(), nullptr, rows == 1000 ? 2u : 65535u, gelu_bwd_colsum_cast_partials, (const float*)pre.data(), (const float*)dact.data(), cast3.data(), rows, c, ld);
        check(("gelu backward with the bias gradient and the bf16 cast rows=" + std::to_string(rows)).c_str(), bitwise(dst3, ref3) && cast3 == cast_ref);
        {
            // the pre-activation in bf16 (_x16): the same bits as the f32 kernel on its values widened
            vector<bf16_t> pre16((size_t)rows * c + 1);
            vector<float> prew((size_t)rows * c + 1);
            for (size_t i = 0; i < (size_t)rows * c; ++i) prew[i] = bf16_to_f32(pre16[i] = f32_to_bf16(pre[i]));
            auto dst4 = start, dst5 = start;
            vector<bf16_t> cast4((size_t)rows * ld + 1, 0xdead), cast5((size_t)rows * ld + 1, 0xdead);
            reduce_cols_emu(rows, c, 1, dst4.data(), nullptr, 65535u, gelu_bwd_colsum_cast_partials, (const float*)prew.data(), (const float*)dact.data(), cast4.data(), rows, c, ld);
            reduce_cols_emu(rows, c, 1, dst5.data(), nullptr, rows == 1000 ? 2u : 65535u, gelu_bwd_colsum_cast_partials_x16, (const bf16_t*)pre16.data(), (const float*)dact.data(), cast5.data(), rows, c, ld);
            check(("gelu backward column sums from a bf16 pre-activation rows=" + std::to_string(rows)).c_str(), bitwise(dst4, dst5) && cast4 == cast5);
            // the activation's gradient in bf16 too (_d16, _x16_d16)
            vector<bf16_t> dact16((size_t)rows * c + 1);
            vector<float> dactw((size_t)rows * c + 1);
            for (size_t i = 0; i < (size_t)rows * c; ++i) dactw[i] = bf16_to_f32(dact16[i] = f32_to_bf16(dact[i]));
            auto dst6 = start, dst7 = start, dst8 = start, dst9 = start;
            vector<bf16_t> c6((size_t)rows * ld + 1, 0xdead), c7 = c6, c8 = c6, c9 = c6;
            reduce_cols_emu(rows, c, 1, dst6.data(), nullptr, 65535u, gelu_bwd_colsum_cast_partials, (const float*)pre.data(), (const float*)dactw.data(), c6.data(), rows, c, ld);
            reduce_cols_emu(rows, c, 1, dst7.data(), nullptr, rows == 1000 ? 2u : 65535u, gelu_bwd_colsum_cast_partials_d16, (const float*)pre.data(), (const bf16_t*)dact16.data(), c7.data(), rows, c, ld);
            reduce_cols_emu(rows, c, 1, dst8.data(), nullptr, 65535u, gelu_bwd_colsum_cast_partials, (const float*)prew.data(), (const float*)dactw.data(), c8.data(), rows, c, ld);
            reduce_cols_emu(rows, c, 1, dst9.data(), nullptr, rows == 1000 ? 2u : 65535u, gelu_bwd_colsum_cast_partials_x16_d16, (const bf16_t*)pre16.data(), (const bf16_t*)dact16.data(), c9.data(), rows, c, ld);
            check(("gelu backward column sums from a bf16 gradient rows=" + std::to_string(rows)).c_str(), bitwise(dst6, dst7) && c6 == c7 && bitwise(dst8, dst9) && c8 == c9);
        }
    }
    const long long n = 300001;
    auto x = rvec(n);
    vector<double> part(512, -1);
    launch(dim3{512}, dim3{256}, sum_squares_partial, part.data(), (const float*)x.data(), n);
    double s = 0, r = 0;
    for (double p : part) s += p;
    for (float v : x) r += (double)v * v;
    printf("sum_squares rel %.2e\n", std::fabs(s - r) / r);
    check("sum_squares", std::fabs(s - r) / r < 1e-11);
    // every tensor in one launch (an empty one among them): the same partials bit for bit
    auto y = rvec(1000);
    vector<unsigned long long> spans = {(unsigned long long)y.data(), 0ull, (unsigned long long)y.data(), 1000ull};
    vector<double> multi(2 * 512, -1), one(512, -1);
    launch(dim3{512, 2}, dim3{256}, sum_squares_multi_partial, multi.data(), (const unsigned long long*)spans.data());
    launch(dim3{512}, dim3{256}, sum_squares_partial, one.data(), (const float*)y.data(), 1000LL);
    bool same = true;
    for (int b = 0; b < 512; ++b) same = same && multi[b] == 0.0 && multi[512 + b] == one[b];
    check("sum_squares of several tensors in one launch", same);
    // the gradients zeroed in one launch: chunks of at most 65536 elements, nothing outside
    auto a = rvec(70001), b = rvec(6);
    vector<unsigned long long> chunks = {(unsigned long long)a.data(), 65536ull, (unsigned long long)(a.data() + 65536), 70000ull - 65536,
                                         (unsigned long long)b.data(), 5ull};
    launch(dim3{3}, dim3{256}, fill_multi_f32, (const unsigned long long*)chunks.data(), 0.0f);
    bool filled = a[70000] != 0.0f && b[5] != 0.0f;
    for (int i = 0; i < 70000; ++i) filled = filled && a[i] == 0.0f;
    for (int i = 0; i < 5; ++i) filled = filled && b[i] == 0.0f;
    check("fill of several tensors in one launch", filled);
}

static void test_embedding_rows(int rows) {
    const int c = 300, V = 5, P = 40;
    vector<int> ids(rows), pos(rows);
    for (int r = 0; r < rows; ++r) {
        ids[r] = (r * 7) % V;
        pos[r] = r % P;
    }
    ids[3] = ids[4] = ids[5] = ids[6] = ids[7] = ids[8] = ids[9] = ids[10] = 2;  // repeats inside a batch of 8
    auto wte = rvec(V * c), wpe = rvec(P * c), dout = rvec(rows * c);
    vector<float> out(rows * c), out2(rows * c);
    launch(dim3{unsigned(rows)}, dim3{256}, embedding_fwd, out.data(), (const int*)ids.data(), (const float*)wte.data(), (const float*)wpe.data(), (const int*)pos.data(), rows, c);
    launch(dim3{unsigned(rows)}, dim3{256}, embedding_fwd, out2.data(), (const int*)ids.data(), (const float*)wte.data(), (const float*)nullptr, (const int*)nullptr, rows, c);
    bool ok = true;
    for (int r = 0; r < rows; ++r)
        for (int j = 0; j < c; ++j) {
            ok &= out[r * c + j] == wte[ids[r] * c + j] + wpe[pos[r] * c + j];
            ok &= out2[r * c + j] == wte[ids[r] * c + j];
        }
    check("embedding fwd", ok);
    auto dw = rvec(V * c), ref = dw;
    // a negative id (a `padding_idx` row left out of the gradient) adds nothing
    vector<int> grad_ids = ids;
    grad_ids[1] = grad_ids[rows - 2] = -1;
    launch(dim3{unsigned((c + 255) / 256), 3}, dim3{256}, embedding_bwd, dw.data(), (const int*)grad_ids.data(), (const float*)dout.data(), rows, c);
    for (int r = 0; r < rows; ++r)
        for (int j = 0; j < c && grad_ids[r] >= 0; ++j) ref[grad_ids[r] * c + j] += dout[r * c + j];
    check("embedding bwd bitwise", bitwise(dw, ref));
}

static void test_embedding() {
    for (int rows : {29, 600}) test_embedding_rows(rows);
}

static void test_norm() {
    const int rows = 37, c = 300;
    const float eps = 1e-5f;
    auto x = rvec(rows * c, 3.0f), w = rvec(c), b = rvec(c), dout = rvec(rows * c);
    for (int i = 0; i < c; ++i) x[i] += 5.0f;
    vector<float> out(rows * c), mean(rows), rstd(rows);
    vector<bf16_t> out16(rows * c);
    launch(dim3{rows}, dim3{256}, layernorm_fwd, out.data(), out16.data(), mean.data(), rstd.data(), (const float*)x.data(), (const float*)w.data(), (const float*)b.data(), rows, c, eps);
    {
        vector<float> plain(rows * c), m2(rows), s2(rows);
        launch(dim3{rows}, dim3{256}, layernorm_fwd, plain.data(), (bf16_t*)nullptr, m2.data(), s2.data(), (const float*)x.data(), (const float*)w.data(), (const float*)b.data(), rows, c, eps);
        check("layernorm fwd with its bf16 copy", rounded(out, out16) && bitwise(out, plain));
        vector<bf16_t> only16(rows * c, 0xdead);
        launch(dim3{rows}, dim3{256}, layernorm_fwd, (float*)nullptr, only16.data(), m2.data(), s2.data(), (const float*)x.data(), (const float*)w.data(), (const float*)b.data(), rows, c, eps);
        check("layernorm fwd, bf16 copy only", only16 == out16 && bitwise(m2, mean) && bitwise(s2, rstd));
    }
    vector<double> oref(rows * c);
    for (int r = 0; r < rows; ++r) {
        double m = 0, v = 0;
        for (int i = 0; i < c; ++i) m += x[r * c + i];
        m /= c;
        for (int i = 0; i < c; ++i) v += (x[r * c + i] - m) * (x[r * c + i] - m);
        v /= c;
        double s = 1 / std::sqrt(v + eps);
        for (int i = 0; i < c; ++i) oref[r * c + i] = (x[r * c + i] - m) * s * w[i] + b[i];
    }
    printf("layernorm fwd %.2e\n", nerr(out, oref));
    check("layernorm fwd", nerr(out, oref) < 2e-6);
    // backward: dx (accumulate) vs the CPU port in f32
    auto dx = rvec(rows * c), dxr = dx;
    launch(dim3{rows}, dim3{256}, layernorm_bwd_dx, dx.data(), (const float*)dout.data(), (const float*)x.data(), (const float*)w.data(), (const float*)mean.data(), (const float*)rstd.data(), rows, c);
    for (int r = 0; r < rows; ++r) {
        double m = mean[r], s = rstd[r], a0 = 0, a1 = 0;
        for (int i = 0; i < c; ++i) {
            double n = (x[r * c + i] - m) * s, dn = (double)w[i] * dout[r * c + i];
            a0 += dn;
            a1 += dn * n;
        }
        a0 /= c;
        a1 /= c;
        for (int i = 0; i < c; ++i) {
            double n = (x[r * c + i] - m) * s;
            dxr[r * c + i] = (float)(dxr[r * c + i] + ((double)w[i] * dout[r * c + i] - a0 - n * a1) * s);
        }
    }
    printf("layernorm bwd_dx %.2e\n", nerr(dx, dxr));
    check("layernorm bwd_dx", nerr(dx, dxr) < 2e-6);
    for (int with_b = 0; with_b < 2; ++with_b) {
        auto dw = rvec(c), db = rvec(c), dwr = dw, dbr = db;
        reduce_cols_emu(rows, c, 1 + with_b, dw.data(), with_b ? db.data() : (float*)nullptr, 65535u, layernorm_bwd_params, 1 + with_b, (const float*)dout.data(), (const float*)x.data(),
                        (const float*)mean.data(), (const float*)rstd.data(), rows, c);
        vector<vector<float>*> outs = {&dwr};
        if (with_b) outs.push_back(&dbr);
        reduce_rows_ref(rows, c, outs, [&](int r0, int r1, vector<vector<float>>& acc) {
            for (int r = r0; r < r1; ++r) {
                for (int i = 0; i < c; ++i) acc[0][i] += dout[r * c + i] * (x[r * c + i] - mean[r]) * rstd[r];
                if (acc.size() > 1)
                    for (int i = 0; i < c; ++i) acc[1][i] += dout[r * c + i];
            }
        });
        check("layernorm params bitwise", bitwise(dw, dwr) && bitwise(db, dbr));
    }
    // rmsnorm
    vector<float> ro(rows * c), rr(rows);
    vector<bf16_t> ro16(rows * c);
    launch(dim3{rows}, dim3{256}, rmsnorm_fwd, ro.data(), ro16.data(), rr.data(), (const float*)x.data(), (const float*)w.data(), rows, c, eps);
    {
        vector<float> plain(rows * c), r2(rows);
        launch(dim3{rows}, dim3{256}, rmsnorm_fwd, plain.data(), (bf16_t*)nullptr, r2.data(), (const float*)x.data(), (const float*)w.data(), rows, c, eps);
        check("rmsnorm fwd with its bf16 copy", rounded(ro, ro16) && bitwise(ro, plain));
        vector<bf16_t> only16(rows * c, 0xdead);
        launch(dim3{rows}, dim3{256}, rmsnorm_fwd, (float*)nullptr, only16.data(), r2.data(), (const float*)x.data(), (const float*)w.data(), rows, c, eps);
        check("rmsnorm fwd, bf16 copy only", only16 == ro16 && bitwise(r2, rr));
    }
    for (int r = 0; r < rows; ++r) {
        double ms = 0;
        for (int i = 0; i < c; ++i) ms += (double)x[r * c + i] * x[r * c + i];
        double s = 1 / std::sqrt(ms / c + eps);
        for (int i = 0; i < c; ++i) oref[r * c + i] = w[i] * (x[r * c + i] * s);
    }
    printf("rmsnorm fwd %.2e\n", nerr(ro, oref));
    check("rmsnorm fwd", nerr(ro, oref) < 2e-6);
    dx = rvec(rows * c);
    dxr = dx;
    launch(dim3{rows}, dim3{256}, rmsnorm_bwd_dx, dx.data(), (const float*)dout.data(), (const float*)x.data(), (const float*)w.data(), (const float*)rr.data(), rows, c);
    for (int r = 0; r < rows; ++r) {
        double s = rr[r], a = 0;
        for (int i = 0; i < c; ++i) a += (double)w[i] * dout[r * c + i] * x[r * c + i] * s;
        a /= c;
        for (int i = 0; i < c; ++i) dxr[r * c + i] = (float)(dxr[r * c + i] + s * ((double)w[i] * dout[r * c + i] - x[r * c + i] * s * a));
    }
    printf("rmsnorm bwd_dx %.2e\n", nerr(dx, dxr));
    check("rmsnorm bwd_dx", nerr(dx, dxr) < 2e-6);
    auto dw = rvec(c), dwr = dw;
    reduce_cols_emu(rows, c, 1, dw.data(), nullptr, 65535u, rmsnorm_bwd_params, (const float*)dout.data(), (const float*)x.data(), (const float*)rr.data(), rows, c);
    reduce_rows_ref(rows, c, {&dwr}, [&](int r0, int r1, vector<vector<float>>& acc) {
        for (int r = r0; r < r1; ++r)
            for (int i = 0; i < c; ++i) acc[0][i] += dout[r * c + i] * x[r * c + i] * rr[r];
    });
    check("rmsnorm params bitwise", bitwise(dw, dwr));
}

// the fused norm backward kernels against *_bwd_dx then *_bwd_params + reduce_partials, bit for
// bit (dx accumulated from the same start; dw, db from the same start), on rows narrower than a
// block, wider than one, at the widest the fused kernels take, and a count not a multiple of 32
static void test_norm_fused() {
    for (auto [rows, c] : {std::pair{37, 300}, std::pair{70, 2048}, std::pair{33, 5}}) {
        auto x = rvec(rows * c, 3.0f), w = rvec(c), b = rvec(c), dout = rvec(rows * c), dx0 = rvec(rows * c);
        vector<float> out(rows * c), mean(rows), rstd(rows), rr(rows);
        launch(dim3{unsigned(rows)}, dim3{256}, layernorm_fwd, out.data(), (bf16_t*)nullptr, mean.data(), rstd.data(), (const float*)x.data(), (const float*)w.data(), (const float*)b.data(), rows, c, 1e-5f);
        launch(dim3{unsigned(rows)}, dim3{256}, rmsnorm_fwd, out.data(), (bf16_t*)nullptr, rr.data(), (const float*)x.data(), (const float*)w.data(), rows, c, 1e-5f);
        const int nb = (rows + RR_ROWS - 1) / RR_ROWS;
        const std::string shape = " rows=" + std::to_string(rows) + " c=" + std::to_string(c);
        for (int nout = 1; nout <= 3; ++nout) {
            const bool rms = nout == 3;  // 3: rmsnorm (one output)
            const int no = rms ? 1 : nout;
            auto dx = dx0, dxr = dx0, dw = rvec(c), db = rvec(c);
            auto dwr = dw, dbr = db;
            if (rms) {
                launch(dim3{unsigned(rows)}, dim3{256}, rmsnorm_bwd_dx, dxr.data(), (const float*)dout.data(), (const float*)x.data(), (const float*)w.data(), (const float*)rr.data(), rows, c);
                reduce_cols_emu(rows, c, 1, dwr.data(), nullptr, 65535u, rmsnorm_bwd_params, (const float*)dout.data(), (const float*)x.data(), (const float*)rr.data(), rows, c);
            } else {
                launch(dim3{unsigned(rows)}, dim3{256}, layernorm_bwd_dx, dxr.data(), (const float*)dout.data(), (const float*)x.data(), (const float*)w.data(), (const float*)mean.data(), (const float*)rstd.data(), rows, c);
                reduce_cols_emu(rows, c, no, dwr.data(), no == 2 ? dbr.data() : (float*)nullptr, 65535u, layernorm_bwd_params, no, (const float*)dout.data(), (const float*)x.data(),
                                (const float*)mean.data(), (const float*)rstd.data(), rows, c);
            }
            vector<float> part((size_t)nb * no * c, std::nanf(""));
            if (rms)
                launch(dim3{unsigned(nb)}, dim3{256}, rmsnorm_bwd_fused, part.data(), dx.data(), (const float*)dout.data(), (const float*)x.data(), (const float*)w.data(), (const float*)rr.data(), rows, c);
            else
                launch(dim3{unsigned(nb)}, dim3{256}, layernorm_bwd_fused, part.data(), dx.data(), no, (const float*)dout.data(), (const float*)x.data(), (const float*)w.data(), (const float*)mean.data(),
                       (const float*)rstd.data(), rows, c);
            launch(dim3{unsigned((c + 31) / 32)}, dim3{32, 8}, reduce_partials, dw.data(), no == 2 ? db.data() : (float*)nullptr, (const float*)part.data(), nb, no, c);
            const std::string what = std::string(rms ? "rmsnorm" : "layernorm") + " bwd fused, outputs " + std::to_string(no) + shape;
            check(what.c_str(), bitwise(dx, dxr) && bitwise(dw, dwr) && bitwise(db, dbr));
            // _d16: dout read as bf16, the same bits as the f32 kernel on its values widened
            vector<bf16_t> d16(rows * c);
            vector<float> dw16(rows * c);
            for (int i = 0; i < rows * c; ++i) dw16[i] = bf16_to_f32(d16[i] = f32_to_bf16(dout[i]));
            auto ex = dx0, ex16 = dx0;
            vector<float> pa((size_t)nb * no * c, std::nanf("")), pb = pa;
            if (rms) {
                launch(dim3{unsigned(nb)}, dim3{256}, rmsnorm_bwd_fused, pa.data(), ex.data(), (const float*)dw16.data(), (const float*)x.data(), (const float*)w.data(), (const float*)rr.data(), rows, c);
                launch(dim3{unsigned(nb)}, dim3{256}, rmsnorm_bwd_fused_d16, pb.data(), ex16.data(), (const bf16_t*)d16.data(), (const float*)x.data(), (const float*)w.data(), (const float*)rr.data(), rows, c);
            } else {
                launch(dim3{unsigned(nb)}, dim3{256}, layernorm_bwd_fused, pa.data(), ex.data(), no, (const float*)dw16.data(), (const float*)x.data(), (const float*)w.data(), (const float*)mean.data(),
                       (const float*)rstd.data(), rows, c);
                launch(dim3{unsigned(nb)}, dim3{256}, layernorm_bwd_fused_d16, pb.data(), ex16.data(), no, (const bf16_t*)d16.data(), (const float*)x.data(), (const float*)w.data(), (const float*)mean.data(),
                       (const float*)rstd.data(), rows, c);
            }
            check((what + " from a bf16 dout").c_str(), bitwise(ex, ex16) && bitwise(pa, pb) && !bitwise(ex, dx));
        }
    }
}

static void test_rope() {
    for (int hd : {8, 10, 64, 128, 300}) {
        const int rows = 6, nh = 3, nkv = 1;
        const int W = (nh + 2 * nkv) * hd;
        auto q = rvec(rows * W), q0 = q;
        vector<int> pos = {0, 1, 7, 100, 2047, 40000};
        const float theta = 10000.0f;
        // CPU port (f32, glibc powf / cosf / sinf)
        auto ref = q;
        int half = hd / 2;
        vector<float> inv(half);
        for (int i = 0; i < half; ++i) inv[i] = 1.0f / std::pow(theta, (float)(2 * i) / (float)hd);
        for (int r = 0; r < rows; ++r)
            for (int h = 0; h < nh + nkv; ++h)
                for (int i = 0; i < half; ++i) {
                    float a = (float)pos[r] * inv[i], cs = std::cos(a), sn = std::sin(a);
                    float& x1 = ref[r * W + h * hd + i];
                    float& x2 = ref[r * W + h * hd + half + i];
                    float u = x1, v = x2;
                    x1 = u * cs - v * sn;
                    x2 = v * cs + u * sn;
                }
        launch(dim3{rows}, dim3{128}, rope, q.data(), (const int*)pos.data(), rows, nh, nkv, hd, theta, 0);
        int diff = 0;
        for (size_t i = 0; i < q.size(); ++i) diff += q[i] != ref[i];
        printf("rope hd=%d: %d of %zu differ from the f32 port, err %.2e\n", hd, diff, q.size(), nerr(q, ref));
        check("rope fwd", nerr(q, ref) < (hd == 300 ? 1e-4 : 1e-6));
        launch(dim3{rows}, dim3{128}, rope, q.data(), (const int*)pos.data(), rows, nh, nkv, hd, theta, 1);
        check("rope inverse", nerr(q, q0) < 1e-5);
    }
}

// ---- attention ----

template <typename T>
using FwdFn = void (*)(float*, bf16_t*, float*, const T*, const int*, int, int, int, int, int);
template <typename T>
using BwdFn = void (*)(float*, const float*, const T*, const float*, const float*, const int*, int, int, int, int, int);

template <typename T>
static void run_attention(const char* tname, int D, FwdFn<T> fwd, BwdFn<T> dq, BwdFn<T> dkdv, const Shape& s) {
    const int W = (s.nh + 2 * s.nkv) * s.hd, OW = s.nh * s.hd;
    const size_t rows = (size_t)s.batch * s.seq;
    auto qkv = rvec(rows * W, 2.0f);
    // element type: the bf16 variant sees bf16-rounded inputs; the reference uses the same values
    vector<T> qkv_t(qkv.size());
    for (size_t i = 0; i < qkv.size(); ++i) {
        if constexpr (sizeof(T) == 2) {
            qkv_t[i] = f32_to_bf16(qkv[i]);
            qkv[i] = bf16_to_f32(qkv_t[i]);
        } else {
            qkv_t[i] = qkv[i];
        }
    }
    vector<int> mask(rows, 1);
    for (int t = 0; t < s.seq / 3; ++t) {
        mask[t] = 0;  // sequence 0: left padding
        if (s.batch > 1) mask[2 * s.seq - 1 - t] = 0;  // sequence 1: right padding
    }
    if (s.batch > 2) mask[2 * s.seq + s.seq / 2] = 0;  // a hole
    auto dout = rvec(rows * OW);
    vector<double> oref, lref, dref;
    attn_ref(s, qkv, mask, dout, oref, lref, dref);

    vector<float> out(rows * OW, NAN), lse(s.batch * s.nh * s.seq, NAN), delta(s.batch * s.nh * s.seq, NAN), dqkv(rows * W, NAN);
    const unsigned tiles = (s.seq + 63) / 64;
    // with the output's bf16 copy (every value written: checked against the output rounded)
    vector<bf16_t> out16(rows * OW, 0x7fc1);
    launch(dim3{tiles, (unsigned)s.nh, (unsigned)s.batch}, dim3{128}, fwd, out.data(), out16.data(), lse.data(), (const T*)qkv_t.data(), (const int*)mask.data(), s.batch, s.seq, s.nh, s.nkv, s.hd);
    check((std::string("attention fwd's bf16 copy of its output ") + tname).c_str(), rounded(out, out16));
    {
        // the copy alone (a null output: Backend::hold_operand_only): the same copy and lse
        vector<bf16_t> only16(rows * OW, 0x7fc1);
        vector<float> lse2(lse.size(), NAN);
        launch(dim3{tiles, (unsigned)s.nh, (unsigned)s.batch}, dim3{128}, fwd, (float*)nullptr, only16.data(), lse2.data(), (const T*)qkv_t.data(), (const int*)mask.data(), s.batch, s.seq, s.nh, s.nkv, s.hd);
        check((std::string("attention fwd writing its bf16 copy alone ") + tname).c_str(), only16 == out16 && bitwise(lse2, lse));
    }
    launch(dim3{(unsigned)s.seq, (unsigned)s.nh, (unsigned)s.batch}, dim3{32}, attention_bwd_delta, delta.data(), (const float*)dout.data(), (const float*)out.data(), (bf16_t*)nullptr, s.batch, s.seq, s.nh, s.hd);
    {
        // delta from the output's bf16 copy (_o16, writing dout's copy), and from dout's copy too
        // (_d16_o16): the f32 kernel's bits on the widened values
        const dim3 g{(unsigned)s.seq, (unsigned)s.nh, (unsigned)s.batch};
        vector<bf16_t> d16(rows * OW), w16(rows * OW, 0x7fc1);
        vector<float> outw(rows * OW), doutw(rows * OW), e1(delta.size(), NAN), e2(delta.size(), NAN), e3(delta.size(), NAN), e4(delta.size(), NAN);
        for (int i = 0; i < rows * OW; ++i) outw[i] = bf16_to_f32(out16[i]), doutw[i] = bf16_to_f32(d16[i] = f32_to_bf16(dout[i]));
        launch(g, dim3{32}, attention_bwd_delta, e1.data(), (const float*)dout.data(), (const float*)outw.data(), (bf16_t*)nullptr, s.batch, s.seq, s.nh, s.hd);
        launch(g, dim3{32}, attention_bwd_delta_o16, e2.data(), (const float*)dout.data(), (const bf16_t*)out16.data(), w16.data(), s.batch, s.seq, s.nh, s.hd);
        launch(g, dim3{32}, attention_bwd_delta, e3.data(), (const float*)doutw.data(), (const float*)outw.data(), (bf16_t*)nullptr, s.batch, s.seq, s.nh, s.hd);
        launch(g, dim3{32}, attention_bwd_delta_d16_o16, e4.data(), (const bf16_t*)d16.data(), (const bf16_t*)out16.data(), (bf16_t*)nullptr, s.batch, s.seq, s.nh, s.hd);
        check((std::string("attention delta from bf16 copies ") + tname).c_str(), bitwise(e1, e2) && w16 == d16 && bitwise(e3, e4) && !bitwise(e1, e3));
    }
    launch(dim3{tiles, (unsigned)s.nh, (unsigned)s.batch}, dim3{128}, dq, dqkv.data(), (const float*)dout.data(), (const T*)qkv_t.data(), (const float*)lse.data(), (const float*)delta.data(), (const int*)mask.data(), s.batch, s.seq, s.nh, s.nkv, s.hd);
    launch(dim3{tiles, (unsigned)s.nkv, (unsigned)s.batch}, dim3{128}, dkdv, dqkv.data(), (const float*)dout.data(), (const T*)qkv_t.data(), (const float*)lse.data(), (const float*)delta.data(), (const int*)mask.data(), s.batch, s.seq, s.nh, s.nkv, s.hd);

    bool lse_ok = true;
    double lerr = 0;
    for (size_t i = 0; i < lse.size(); ++i) {
        if (std::isinf(lref[i])) lse_ok &= std::isinf(lse[i]) && lse[i] > 0;
        else lerr = std::max(lerr, std::fabs(lse[i] - lref[i]) / std::max(1.0, std::fabs(lref[i])));
    }
    bool nan_free = true;
    for (float v : dqkv) nan_free &= !std::isnan(v);
    for (float v : out) nan_free &= !std::isnan(v);
    double eo = nerr(out, oref), ed = nerr(dqkv, dref);
    printf("attention %s d%d %dx%d h%d/%d hd%d: out %.2e lse %.2e dqkv %.2e\n", tname, D, s.batch, s.seq, s.nh, s.nkv, s.hd, eo, lerr, ed);
    check("attention", lse_ok && nan_free && eo < 2e-6 && lerr < 2e-6 && ed < 2e-5);
}

// The dropout kernels: the same shapes and inputs, a mask of p = 0.2 from a key, against the f64
// reference with the same mask (the hash written out here).
template <typename T>
using FwdDropFn = void (*)(float*, bf16_t*, float*, const T*, const int*, int, int, int, int, int, long long, long long, float);
template <typename T>
using BwdDropFn = void (*)(float*, const float*, const T*, const float*, const float*, const int*, int, int, int, int, int, long long, long long, float);

static unsigned long long drop_hash(unsigned long long key, long long i) {
    unsigned long long z = key + ((unsigned long long)i + 1ull) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (z ^ (z >> 31)) >> 32;
}

template <typename T>
static void run_attention_dropout(const char* tname, int D, FwdDropFn<T> fwd, BwdDropFn<T> dq, BwdDropFn<T> dkdv, const Shape& s) {
    const int W = (s.nh + 2 * s.nkv) * s.hd, OW = s.nh * s.hd;
    const size_t rows = (size_t)s.batch * s.seq;
    auto qkv = rvec(rows * W, 2.0f);
    vector<T> qkv_t(qkv.size());
    for (size_t i = 0; i < qkv.size(); ++i) {
        if constexpr (sizeof(T) == 2) {
            qkv_t[i] = f32_to_bf16(qkv[i]);
            qkv[i] = bf16_to_f32(qkv_t[i]);
        } else {
            qkv_t[i] = qkv[i];
        }
    }
    vector<int> mask(rows, 1);
    for (int t = 0; t < s.seq / 3; ++t) mask[t] = 0;
    auto dout = rvec(rows * OW);
    const long long key = 0x0123456789abcdefll, threshold = 858993459ll;  // p = 0.2
    const float scale = 1.0f / 0.8f;
    auto zf = [&](long long idx) { return drop_hash((unsigned long long)key, idx) >= (unsigned long long)threshold ? (double)scale : 0.0; };
    vector<double> oref, lref, dref;
    attn_ref(s, qkv, mask, dout, oref, lref, dref, nullptr, nullptr, zf);
    vector<float> out(rows * OW, NAN), lse(s.batch * s.nh * s.seq, NAN), delta(s.batch * s.nh * s.seq, NAN), dqkv(rows * W, NAN);
    const unsigned tiles = (s.seq + 63) / 64;
    launch(dim3{tiles, (unsigned)s.nh, (unsigned)s.batch}, dim3{128}, fwd, out.data(), (bf16_t*)nullptr, lse.data(), (const T*)qkv_t.data(), (const int*)mask.data(), s.batch, s.seq, s.nh, s.nkv, s.hd, key, threshold, scale);
    launch(dim3{(unsigned)s.seq, (unsigned)s.nh, (unsigned)s.batch}, dim3{32}, attention_bwd_delta, delta.data(), (const float*)dout.data(), (const float*)out.data(), (bf16_t*)nullptr, s.batch, s.seq, s.nh, s.hd);
    launch(dim3{tiles, (unsigned)s.nh, (unsigned)s.batch}, dim3{128}, dq, dqkv.data(), (const float*)dout.data(), (const T*)qkv_t.data(), (const float*)lse.data(), (const float*)delta.data(), (const int*)mask.data(), s.batch, s.seq, s.nh, s.nkv, s.hd, key, threshold, scale);
    launch(dim3{tiles, (unsigned)s.nkv, (unsigned)s.batch}, dim3{128}, dkdv, dqkv.data(), (const float*)dout.data(), (const T*)qkv_t.data(), (const float*)lse.data(), (const float*)delta.data(), (const int*)mask.data(), s.batch, s.seq, s.nh, s.nkv, s.hd, key, threshold, scale);
    bool nan_free = true;
    for (float v : dqkv) nan_free &= !std::isnan(v);
    for (float v : out) nan_free &= !std::isnan(v);
    double eo = nerr(out, oref), ed = nerr(dqkv, dref);
    printf("attention dropout %s d%d %dx%d h%d/%d hd%d: out %.2e dqkv %.2e\n", tname, D, s.batch, s.seq, s.nh, s.nkv, s.hd, eo, ed);
    check("attention dropout", nan_free && eo < 2e-6 && ed < 2e-5);
}

static void test_attention() {
    vector<Shape> shapes = {{2, 37, 4, 2, 10}, {1, 200, 3, 1, 16}, {3, 130, 2, 2, 8}, {2, 70, 4, 4, 32}};
    for (auto& s : shapes) {
        run_attention<float>("f32", 32, attention_fwd_f32_d32, attention_bwd_dq_f32_d32, attention_bwd_dkdv_f32_d32, s);
        run_attention<float>("f32", 64, attention_fwd_f32_d64, attention_bwd_dq_f32_d64, attention_bwd_dkdv_f32_d64, s);
        run_attention<float>("f32", 128, attention_fwd_f32_d128, attention_bwd_dq_f32_d128, attention_bwd_dkdv_f32_d128, s);
    }
    run_attention<float>("f32", 64, attention_fwd_f32_d64, attention_bwd_dq_f32_d64, attention_bwd_dkdv_f32_d64, {2, 100, 2, 1, 64});
    run_attention<float>("f32", 128, attention_fwd_f32_d128, attention_bwd_dq_f32_d128, attention_bwd_dkdv_f32_d128, {2, 100, 4, 2, 128});
    run_attention<float>("f32", 128, attention_fwd_f32_d128, attention_bwd_dq_f32_d128, attention_bwd_dkdv_f32_d128, {1, 65, 2, 1, 100});
    run_attention<unsigned short>("bf16", 32, attention_fwd_bf16_d32, attention_bwd_dq_bf16_d32, attention_bwd_dkdv_bf16_d32, {2, 37, 4, 2, 10});
    run_attention<unsigned short>("bf16", 64, attention_fwd_bf16_d64, attention_bwd_dq_bf16_d64, attention_bwd_dkdv_bf16_d64, {3, 130, 2, 1, 48});
    run_attention<unsigned short>("bf16", 128, attention_fwd_bf16_d128, attention_bwd_dq_bf16_d128, attention_bwd_dkdv_bf16_d128, {2, 90, 2, 2, 128});
    run_attention_dropout<float>("f32", 32, attention_fwd_drop_f32_d32, attention_bwd_dq_drop_f32_d32, attention_bwd_dkdv_drop_f32_d32, {2, 37, 4, 2, 10});
    run_attention_dropout<float>("f32", 64, attention_fwd_drop_f32_d64, attention_bwd_dq_drop_f32_d64, attention_bwd_dkdv_drop_f32_d64, {1, 130, 2, 1, 64});
    run_attention_dropout<float>("f32", 128, attention_fwd_drop_f32_d128, attention_bwd_dq_drop_f32_d128, attention_bwd_dkdv_drop_f32_d128, {2, 70, 2, 2, 100});
    run_attention_dropout<unsigned short>("bf16", 64, attention_fwd_drop_bf16_d64, attention_bwd_dq_drop_bf16_d64, attention_bwd_dkdv_drop_bf16_d64, {2, 90, 2, 1, 48});
}

static void test_decode() {
    const int batch = 3, nh = 4, nkv = 2, hd = 40, max_len = 300;
    const int W = (nh + 2 * nkv) * hd, kvd = nkv * hd, grp = nh / nkv;
    vector<float> kc(batch * max_len * kvd, NAN), vc(batch * max_len * kvd, NAN);
    // a prompt of 200 tokens, then one token at slot 200
    const int seq = 200;
    auto qkv = rvec(batch * seq * W, 2.0f);
    launch(dim3{batch * seq}, dim3{128}, kv_append, kc.data(), vc.data(), (const float*)qkv.data(), 0, batch, seq, nh, nkv, hd, max_len);
    auto q1 = rvec(batch * W, 2.0f);
    const int slot = 200;
    launch(dim3{batch}, dim3{128}, kv_append, kc.data(), vc.data(), (const float*)q1.data(), slot, batch, 1, nh, nkv, hd, max_len);
    bool ok = true;
    for (int b = 0; b < batch; ++b)
        for (int t = 0; t <= slot; ++t)
            for (int x = 0; x < kvd; ++x) {
                const float* row = t < seq ? &qkv[(b * seq + t) * W] : &q1[b * W];
                ok &= kc[(b * max_len + t) * kvd + x] == row[nh * hd + x];
                ok &= vc[(b * max_len + t) * kvd + x] == row[(nh + nkv) * hd + x];
            }
    check("kv_append", ok);
    vector<int> mask(batch * max_len, 1);
    for (int t = 0; t < 150; ++t) mask[t] = 0;  // sequence 0: left padding
    for (int t = 0; t <= slot; ++t) mask[2 * max_len + t] = 0;  // sequence 2: nothing allowed
    mask[max_len + 7] = 0;
    vector<float> out(batch * nh * hd, NAN);
    launch(dim3{nh, batch}, dim3{128}, attention_decode, out.data(), (const float*)q1.data(), (const float*)kc.data(), (const float*)vc.data(), (const int*)mask.data(), slot, batch, nh, nkv, hd, max_len);
    vector<double> ref(out.size(), 0);
    const double scale = 1.0f / std::sqrt((float)hd);
    for (int b = 0; b < batch; ++b)
        for (int h = 0; h < nh; ++h) {
            int g = h / grp;
            vector<double> sc;
            vector<int> keys;
            double mx = -1e300;
            for (int j = 0; j <= slot; ++j)
                if (mask[b * max_len + j]) {
                    double a = 0;
                    for (int d = 0; d < hd; ++d) a += (double)q1[b * W + h * hd + d] * kc[(b * max_len + j) * kvd + g * hd + d];
                    sc.push_back(a * scale);
                    keys.push_back(j);
                    mx = std::max(mx, a * scale);
                }
            double z = 0;
            for (double x : sc) z += std::exp(x - mx);
            for (size_t k = 0; k < keys.size(); ++k)
                for (int d = 0; d < hd; ++d) ref[(b * nh + h) * hd + d] += std::exp(sc[k] - mx) / z * vc[(b * max_len + keys[k]) * kvd + g * hd + d];
        }
    printf("decode err %.2e\n", nerr(out, ref));
    check("decode", nerr(out, ref) < 2e-6);
}

// v = 1037: one trip through each pass's loop (under CE_UNROLL * CE_THREADS = 2048 values);
// v = 50257 (GPT-2's vocabulary): 25 trips, and the staged row takes 98 KiB of shared memory.
static void test_loss(const int v) {
    const int rows = 6;
    auto z = rvec(rows * v, 6.0f);
    vector<int> t = {5, IGNORE_INDEX, 0, 1036, 77, 3};
    z[4 * v + 10] = z[4 * v + 900] = 50.0f;  // a tie for the argmax
    for (float sm : {0.0f, 0.1f}) {
        auto g = z;
        vector<float> loss(rows, NAN);
        launch(dim3{rows}, dim3{512}, cross_entropy, g.data(), (long long)v, (bf16_t*)nullptr, loss.data(), (const int*)t.data(), rows, v, sm, 0.5f, 1);
        vector<double> lref(rows, 0), gref(rows * v, 0);
        for (int r = 0; r < rows; ++r) {
            if (t[r] == IGNORE_INDEX) continue;
            double mx = -1e300, sum = 0, mean = 0;
            for (int j = 0; j < v; ++j) mx = std::max(mx, (double)z[r * v + j]), mean += z[r * v + j];
            mean /= v;
            for (int j = 0; j < v; ++j) sum += std::exp(z[r * v + j] - mx);
            double lse = mx + std::log(sum);
            lref[r] = (1 - sm) * (lse - z[r * v + t[r]]) + sm * (lse - mean);
            for (int j = 0; j < v; ++j) gref[r * v + j] = 0.5 * (std::exp(z[r * v + j] - lse) - sm / v - (j == t[r] ? 1 - sm : 0));
        }
        auto l2 = loss;
        auto g2 = z;
        launch(dim3{rows}, dim3{512}, cross_entropy, g2.data(), (long long)v, (bf16_t*)nullptr, l2.data(), (const int*)t.data(), rows, v, sm, 0.5f, 0);
        printf("cross_entropy sm=%.1f loss %.2e grad %.2e\n", sm, nerr(loss, lref), nerr(g, gref));
        check("cross_entropy", nerr(loss, lref) < 2e-6 && nerr(g, gref) < 2e-6 && bitwise(l2, loss) && bitwise(g2, z));
        // rows padded to ld = v + 3, the gradient written as bf16 beside the logits: the same
        // losses, the logits untouched, and each gradient value the bf16 rounding of the f32 one
        const int ld = v + 3;
        vector<float> zp(rows * ld, 7.0f), l3(rows, NAN);
        for (int r = 0; r < rows; ++r)
            for (int j = 0; j < v; ++j) zp[r * ld + j] = z[r * v + j];
        auto zp0 = zp;
        vector<bf16_t> g16(rows * ld, 0x1234);
        launch(dim3{rows}, dim3{512}, cross_entropy, zp.data(), (long long)ld, g16.data(), l3.data(), (const int*)t.data(), rows, v, sm, 0.5f, 1);
        bool same = bitwise(l3, loss) && bitwise(zp, zp0);
        for (int r = 0; r < rows; ++r) {
            for (int j = 0; j < v; ++j) same = same && g16[r * ld + j] == f32_to_bf16(g[r * v + j]);
            for (int j = v; j < ld; ++j) same = same && g16[r * ld + j] == 0x1234;
        }
        check("cross_entropy with padded rows and a bf16 gradient", same);
        // bf16 logits in padded rows (the LM head's product in bf16 mode), the gradient written
        // over them: bitwise the f32 kernel's losses on the same values widened, and its gradient
        // rounded to bf16; the padding untouched
        vector<bf16_t> zb(rows * ld, 0x1234);
        vector<float> zw(rows * v), l4(rows, NAN), l5(rows, NAN);
        for (int r = 0; r < rows; ++r)
            for (int j = 0; j < v; ++j) zb[r * ld + j] = f32_to_bf16(z[r * v + j]), zw[r * v + j] = bf16_to_f32(zb[r * ld + j]);
        auto zb0 = zb;
        launch(dim3{rows}, dim3{512}, cross_entropy, zw.data(), (long long)v, (bf16_t*)nullptr, l4.data(), (const int*)t.data(), rows, v, sm, 0.5f, 1);
        launch(dim3{rows}, dim3{512}, cross_entropy_bf16, zb.data(), (long long)ld, l5.data(), (const int*)t.data(), rows, v, sm, 0.5f, 1);
        bool same16 = bitwise(l4, l5) && nerr(l5, lref) < 2e-2;
        for (int r = 0; r < rows; ++r) {
            for (int j = 0; j < v; ++j) same16 = same16 && zb[r * ld + j] == f32_to_bf16(zw[r * v + j]);
            for (int j = v; j < ld; ++j) same16 = same16 && zb[r * ld + j] == 0x1234;
        }
        // without the gradient the logits stay
        auto zb2 = zb0;
        vector<float> l6(rows, NAN);
        launch(dim3{rows}, dim3{512}, cross_entropy_bf16, zb2.data(), (long long)ld, l6.data(), (const int*)t.data(), rows, v, sm, 0.5f, 0);
        same16 = same16 && bitwise(l6, l4) && zb2 == zb0;
        // the row staged in shared memory: the same losses and gradient, bit for bit (the shared
        // buffer starts as garbage, and the padding stays)
        for (int wg : {1, 0}) {
            auto zs = zb0;
            vector<float> l7(rows, NAN);
            std::memset(emu_dynamic_shared, 0xab, sizeof emu_dynamic_shared);
            launch(dim3{rows}, dim3{512}, cross_entropy_bf16_staged, zs.data(), (long long)ld, l7.data(), (const int*)t.data(), rows, v, sm, 0.5f, wg);
            same16 = same16 && bitwise(l7, wg ? l5 : l6) && zs == (wg ? zb : zb0);
        }
        printf("cross_entropy_bf16 sm=%.1f loss against f64 on the f32 logits %.2e\n", sm, nerr(l5, lref));
        check("cross_entropy over bf16 logits, the gradient over them", same16);
    }
    // token_stats, everything requested
    vector<float> lp(rows, NAN), ls(rows, NAN), mlp(rows, NAN), ent(rows, NAN), rl(rows, NAN), rz(rows, NAN);
    vector<int> am(rows, -1);
    launch(dim3{rows}, dim3{512}, token_stats, lp.data(), ls.data(), mlp.data(), ent.data(), am.data(), rl.data(), rz.data(), (const float*)z.data(), (const int*)t.data(), rows, v);
    vector<double> lpr(rows, 0), lsr(rows, 0), mlpr(rows, 0), entr(rows, 0), rzr(rows, 0);
    vector<int> amr(rows, 0);
    for (int r = 0; r < rows; ++r) {
        if (t[r] == IGNORE_INDEX) continue;
        double mx = -1e300, sum = 0, mean = 0, sx = 0;
        int k = 0;
        for (int j = 0; j < v; ++j) {
            if (z[r * v + j] > mx) mx = z[r * v + j], k = j;
            mean += z[r * v + j];
        }
        for (int j = 0; j < v; ++j) sum += std::exp(z[r * v + j] - mx), sx += std::exp(z[r * v + j] - mx) * z[r * v + j];
        double lse = mx + std::log(sum);
        lpr[r] = z[r * v + t[r]] - lse;
        lsr[r] = lse;
        mlpr[r] = mean / v - lse;
        rzr[r] = sx / sum;
        entr[r] = lse - sx / sum;
        amr[r] = k;
    }
    printf("token_stats lp %.2e lse %.2e mlp %.2e ent %.2e ez %.2e argmax %s\n", nerr(lp, lpr), nerr(ls, lsr), nerr(mlp, mlpr), nerr(ent, entr), nerr(rz, rzr), am == amr ? "ok" : "DIFF");
    check("token_stats", nerr(lp, lpr) < 2e-6 && nerr(ls, lsr) < 2e-6 && nerr(mlp, mlpr) < 2e-6 && nerr(ent, entr) < 1e-5 && nerr(rz, rzr) < 2e-6 && am == amr && bitwise(rl, ls));
    // argmax only, with every other output null
    vector<int> am2(rows, -1);
    launch(dim3{rows}, dim3{512}, token_stats, (float*)nullptr, (float*)nullptr, (float*)nullptr, (float*)nullptr, am2.data(), (float*)nullptr, (float*)nullptr, (const float*)z.data(), (const int*)t.data(), rows, v);
    check("token_stats argmax only", am2 == amr);
    // backward vs the analytic chain rule
    auto glp = rvec(rows), gls = rvec(rows), gml = rvec(rows), gh = rvec(rows);
    gls[2] = glp[2] = gml[2] = gh[2] = 0.0f;  // a row with no gradient
    gh[3] = 0.0f;  // a row on the g_h == 0 path
    auto d = z;
    launch(dim3{rows}, dim3{512}, token_stats_bwd, d.data(), (const int*)t.data(), (const float*)rl.data(), (const float*)rz.data(), (const float*)glp.data(), (const float*)gls.data(), (const float*)gml.data(), (const float*)gh.data(), rows, v);
    vector<double> dr(rows * v, 0);
    for (int r = 0; r < rows; ++r) {
        if (t[r] == IGNORE_INDEX || r == 2) continue;
        for (int j = 0; j < v; ++j) {
            double p = std::exp(z[r * v + j] - lsr[r]);
            dr[r * v + j] = glp[r] * ((j == t[r]) - p) + gls[r] * p + gml[r] * (1.0 / v - p) - gh[r] * p * (z[r * v + j] - rzr[r]);
        }
    }
    printf("token_stats_bwd %.2e\n", nerr(d, dr));
    check("token_stats_bwd", nerr(d, dr) < 2e-6);
    auto d2 = z;
    launch(dim3{rows}, dim3{512}, token_stats_bwd, d2.data(), (const int*)t.data(), (const float*)rl.data(), (const float*)nullptr, (const float*)nullptr, (const float*)gls.data(), (const float*)nullptr, (const float*)nullptr, rows, v);
    for (int r = 0; r < rows; ++r) {
        if (t[r] == IGNORE_INDEX || r == 2) continue;
        for (int j = 0; j < v; ++j) dr[r * v + j] = gls[r] * std::exp(z[r * v + j] - lsr[r]);
    }
    check("token_stats_bwd (lse only)", nerr(d2, dr) < 2e-6);
}

static void test_adamw() {
    const int NT = 3;
    // more than one chunk, a tensor shorter than a float4, and tails of 1-3 elements
    long long ns[NT] = {2 * ADAMW_CHUNK + 1003, 7, 2502};
    vector<vector<float>> p(NT), g(NT), m(NT), v(NT);
    vector<vector<unsigned short>> pb(NT);
    vector<AdamWTensor> ts(NT);
    for (int i = 0; i < NT; ++i) {
        p[i] = rvec(ns[i]);
        g[i] = rvec(ns[i], 0.1f);
        m[i] = rvec(ns[i], 0.01f);
        v[i] = rvec(ns[i], 0.001f);
        for (auto& x : v[i]) x = std::fabs(x);
        pb[i].assign(ns[i], 0);
        ts[i] = AdamWTensor{p[i].data(), g[i].data(), m[i].data(), v[i].data(), i == 1 ? nullptr : pb[i].data(), ns[i], i != 1, 0};
    }
    auto p0 = p, g0 = g, m0 = m, v0 = v;
    // the scalars as cpu/optim.rs computes them
    const float lr = 3e-4f, b1 = 0.9f, b2 = 0.999f, wd = 0.1f, eps = 1e-8f, gs = 0.7f;
    const int t = 5;
    double lrd = lr, b1d = b1, b2d = b2;
    float bc2 = (float)std::sqrt(1.0 - std::pow(b2d, t));
    float step = (float)(lrd / (1.0 - std::pow(b1d, t)));
    float dm = (float)(1.0 - lrd * (double)wd);
    float w1 = (float)(1.0 - b1d), w2 = (float)(1.0 - b2d);
    // the host's chunk table (backend/cuda/mod.rs): ADAMW_CHUNK elements per block
    vector<AdamWChunk> chunks;
    for (int i = 0; i < NT; ++i)
        for (long long a = 0; a < ns[i]; a += ADAMW_CHUNK) chunks.push_back(AdamWChunk{a, std::min(a + ADAMW_CHUNK, ns[i]), i, 0});
    launch(dim3{(unsigned)chunks.size()}, dim3{256}, adamw_multi, (const AdamWTensor*)ts.data(), (const AdamWChunk*)chunks.data(), step, bc2, dm, w1, b2, w2, eps, gs);
    bool ok = true;
    for (int i = 0; i < NT; ++i) {
        float dmi = i != 1 ? dm : 1.0f;
        for (long long k = 0; k < ns[i]; ++k) {
            float gg = g0[i][k] * gs;
            float pp = p0[i][k] * dmi;
            float mm = m0[i][k] + w1 * (gg - m0[i][k]);
            float vv = v0[i][k] * b2 + w2 * (gg * gg);
            float den = std::sqrt(vv) / bc2 + eps;
            pp -= step * (mm / den);
            ok &= pp == p[i][k] && mm == m[i][k] && vv == v[i][k];
            if (i != 1) ok &= pb[i][k] == f32_to_bf16(pp);
        }
    }
    check("adamw bitwise", ok);
}

// DoRA (cpu/dora.rs): the weight norm against the CPU's loop (f64 sums in another order, so to
// 1e-6), the rescaled output, the gradients and the magnitude's reduction bitwise.
static void test_dora() {
    const int off = 5, cols = 13, k = 37, r = 3, ld = off + cols + 4;
    const float scale = 1.75f;
    auto w = rvec((size_t)ld * k), a = rvec((size_t)r * k, 0.5f), b = rvec((size_t)cols * r, 0.5f);
    vector<float> n(cols, -1.0f), nref(cols);
    launch(dim3{unsigned(cols)}, dim3{256}, dora_norm, n.data(), (const float*)w.data(), (const float*)a.data(), (const float*)b.data(), off, k, r, scale);
    for (int j = 0; j < cols; ++j) {
        double acc = 0;
        for (int i = 0; i < k; ++i) {
            float ba = 0.0f;
            for (int q = 0; q < r; ++q) ba += b[j * r + q] * a[q * k + i];
            float v = w[(off + j) * k + i] + scale * ba;
            acc += (double)v * (double)v;
        }
        nref[j] = (float)std::sqrt(acc);
    }
    printf("dora norm %.2e\n", nerr(n, nref));
    check("dora norm", nerr(n, nref) < 1e-6);
    auto m = rvec(cols, 2.0f), bias = rvec(ld);
    for (auto& x : m) x = std::fabs(x) + 0.5f;
    for (int rows : {1, 17, 100}) {
        auto out = rvec((size_t)rows * ld), base = rvec((size_t)rows * ld), u = rvec((size_t)rows * cols), dout = rvec((size_t)rows * ld);
        // the forward pass with the base given, and taken from the output less the bias
        for (int with_base = 0; with_base < 2; ++with_base) {
            auto o = out, ref = out;
            launch(g1((long long)rows * cols), dim3{256}, dora_fwd, o.data(), (const float*)(with_base ? base.data() : nullptr), (const float*)(with_base ? nullptr : bias.data()),
                   (const float*)u.data(), (const float*)m.data(), (const float*)n.data(), (long long)rows, cols, ld, off, scale);
            for (int i = 0; i < rows; ++i)
                for (int j = 0; j < cols; ++j) {
                    float s = m[j] / n[j], y = ref[i * ld + off + j];
                    float bv = with_base ? base[i * ld + off + j] : y - bias[off + j];
                    ref[i * ld + off + j] = y + ((s - 1.0f) * bv + s * (scale * u[i * cols + j]));
                }
            check(("dora fwd bitwise rows=" + std::to_string(rows) + " base=" + std::to_string(with_base)).c_str(), bitwise(o, ref));
        }
        // the gradients into u and into the base output (shift 1 and 0), only in the block
        for (float shift : {1.0f, 0.0f}) {
            vector<float> gu((size_t)rows * cols, 9.0f), gb = dout, guref(gu.size()), gbref = dout;
            launch(g1((long long)rows * cols), dim3{256}, dora_grads, gu.data(), gb.data(), shift, (const float*)dout.data(), (const float*)m.data(), (const float*)n.data(),
                   (long long)rows, cols, ld, off, scale);
            for (int i = 0; i < rows; ++i)
                for (int j = 0; j < cols; ++j) {
                    float s = m[j] / n[j], g = dout[i * ld + off + j];
                    guref[i * cols + j] = (scale * s) * g;
                    gbref[i * ld + off + j] = (s - shift) * g;
                }
            check(("dora grads bitwise rows=" + std::to_string(rows)).c_str(), bitwise(gu, guref) && bitwise(gb, gbref));
        }
        auto dm = rvec(cols), dmref = dm;
        reduce_cols_emu(rows, cols, 1, dm.data(), nullptr, 65535u, dora_dmag, (const float*)dout.data(), (const float*)base.data(), (const float*)u.data(), (const float*)n.data(), rows,
                        cols, ld, off, scale);
        reduce_rows_ref(rows, cols, {&dmref}, [&](int r0, int r1, vector<vector<float>>& acc) {
            for (int i = r0; i < r1; ++i)
                for (int j = 0; j < cols; ++j) {
                    float g = dout[i * ld + off + j];
                    acc[0][j] += g * (base[i * ld + off + j] + scale * u[i * cols + j]) / n[j];
                }
        });
        check(("dora magnitude gradient bitwise rows=" + std::to_string(rows)).c_str(), bitwise(dm, dmref));
    }
}

int main(int argc, char** argv) {
    std::string only = argc > 1 ? argv[1] : "";
    auto want = [&](const char* n) { return only.empty() || only == n; };
    if (want("pointwise")) test_pointwise();
    if (want("reduce")) test_reduce();
    if (want("embedding")) test_embedding();
    if (want("norm")) {
        test_norm();
        test_norm_fused();
    }
    if (want("rope")) test_rope();
    if (want("loss")) test_loss(1037), test_loss(50257);
    if (want("adamw")) test_adamw();
    if (want("decode")) test_decode();
    if (want("attention")) test_attention();
    if (want("dora")) test_dora();
    printf(failures ? "%d FAILURES\n" : "all passed\n", failures);
    return failures != 0;
}
