// Emulated validation of kernels/seq2seq.cu (the encoder-decoder ops) through the same source
// text NVRTC compiles, run on the CPU by shim.h. The biased attention (forward and backward, with
// a bias, a key mask, causal or not, queries and keys of different lengths, head columns inside a
// fused buffer, dropout on the probabilities, a sequence with no visible key) and the activations
// are compared with f64 references; T5's position bias with a port of the CPU backend's loops
// (bitwise: the same order). Exit status 1 on any failure. Driven by tests/emulation.rs.
#include <cstdio>
#include <cstdlib>
#include <string>
#include "shim.h"
#include "reference.h"

#include "common.cuh"
#include "seq2seq.cu"

using std::vector;
static int failures = 0;

static void check(const char* what, double err, double tol) {
    printf("%-52s err %.2e\n", what, err);
    if (!(err <= tol)) {
        printf("FAIL: %s (above %.0e)\n", what, tol);
        ++failures;
    }
}
// max |a - b| / max |b|
static double nerr(const vector<float>& a, const vector<double>& b) {
    double m = 1e-30, e = 0;
    for (size_t i = 0; i < b.size(); ++i) m = std::max(m, std::fabs(b[i]));
    for (size_t i = 0; i < b.size(); ++i) e = std::max(e, std::fabs((double)a[i] - b[i]));
    return e / m;
}

// backend::dropout_keep
static bool keep_ref(uint64_t key, uint64_t i, uint64_t threshold) {
    uint64_t z = key + (i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (z >> 32) >= threshold;
}

struct Case {
    const char* name;
    int batch, tq, tk, nh, d;
    bool causal, bias, mask, drop, dead;  // dead: the last sequence has no visible key
    float scale;
};

static void test_attention(const Case& c) {
    const int hd = c.nh * c.d;
    // q sits in a fused [rows, 3 hd] buffer at column hd (as a fused projection's output); k and
    // v in a [rows, 2 hd] buffer at columns 0 and hd
    const int q_ld = 3 * hd, q_off = hd, kv_ld = 2 * hd, k_off = 0, v_off = hd;
    auto q = rvec((size_t)c.batch * c.tq * q_ld), kv = rvec((size_t)c.batch * c.tk * kv_ld);
    auto bias = c.bias ? rvec((size_t)c.nh * c.tq * c.tk, 2.0f) : vector<float>();
    vector<int> mask;
    if (c.mask)
        for (int b = 0; b < c.batch; ++b)
            for (int j = 0; j < c.tk; ++j) mask.push_back(c.dead && b == c.batch - 1 ? 0 : (j < c.tk - b * 2 ? 1 : 0));
    auto dout = rvec((size_t)c.batch * c.tq * hd);
    const double p_drop = 0.25;
    const long long key = 0x1234567, threshold = c.drop ? (long long)std::llround(p_drop * 4294967296.0) : 0;
    const float dscale = (float)(1.0 / (1.0 - p_drop));
    auto zf = [&](long long e) -> double { return !c.drop ? 1.0 : keep_ref(key, e, threshold) ? (double)dscale : 0.0; };

    // f64 reference
    const size_t np = (size_t)c.batch * c.nh * c.tq * c.tk;
    vector<double> probs(np), out((size_t)c.batch * c.tq * hd), ds(np), dq(out.size()), dk((size_t)c.batch * c.tk * hd), dv(dk.size()), dbias(bias.size());
    auto Q = [&](int b, int i, int h, int x) { return (double)q[((size_t)b * c.tq + i) * q_ld + q_off + h * c.d + x]; };
    auto K = [&](int b, int j, int h, int x) { return (double)kv[((size_t)b * c.tk + j) * kv_ld + k_off + h * c.d + x]; };
    auto V = [&](int b, int j, int h, int x) { return (double)kv[((size_t)b * c.tk + j) * kv_ld + v_off + h * c.d + x]; };
    for (int b = 0; b < c.batch; ++b)
        for (int h = 0; h < c.nh; ++h)
            for (int i = 0; i < c.tq; ++i) {
                const size_t row = (((size_t)b * c.nh + h) * c.tq + i) * c.tk;
                vector<double> s(c.tk);
                vector<bool> vis(c.tk);
                double m = -1e300;
                bool any = false;
                for (int j = 0; j < c.tk; ++j) {
                    vis[j] = !(c.causal && j > i) && (!c.mask || mask[b * c.tk + j]);
                    double x = 0;
                    for (int y = 0; y < c.d; ++y) x += Q(b, i, h, y) * K(b, j, h, y);
                    s[j] = c.scale * x + (c.bias ? bias[((size_t)h * c.tq + i) * c.tk + j] : 0.0);
                    if (vis[j]) m = std::max(m, s[j]), any = true;
                }
                double sum = 0;
                for (int j = 0; j < c.tk; ++j) sum += vis[j] ? std::exp(s[j] - m) : 0.0;
                for (int j = 0; j < c.tk; ++j) probs[row + j] = any ? (vis[j] ? std::exp(s[j] - m) / sum : 0.0) : 1.0 / c.tk;
                for (int x = 0; x < c.d; ++x) {
                    double o = 0;
                    for (int j = 0; j < c.tk; ++j) o += probs[row + j] * zf(row + j) * V(b, j, h, x);
                    out[((size_t)b * c.tq + i) * hd + h * c.d + x] = o;
                }
                // backward
                vector<double> dp(c.tk);
                double rowsum = 0;
                for (int j = 0; j < c.tk; ++j) {
                    double x = 0;
                    for (int y = 0; y < c.d; ++y) x += dout[((size_t)b * c.tq + i) * hd + h * c.d + y] * V(b, j, h, y);
                    dp[j] = x * zf(row + j);
                    rowsum += probs[row + j] * dp[j];
                }
                for (int j = 0; j < c.tk; ++j) ds[row + j] = probs[row + j] * (dp[j] - rowsum);
                for (int x = 0; x < c.d; ++x) {
                    double a = 0;
                    for (int j = 0; j < c.tk; ++j) a += ds[row + j] * K(b, j, h, x);
                    dq[((size_t)b * c.tq + i) * hd + h * c.d + x] = c.scale * a;
                }
                for (int j = 0; j < c.tk; ++j)
                    for (int x = 0; x < c.d; ++x) {
                        dk[((size_t)b * c.tk + j) * hd + h * c.d + x] += c.scale * ds[row + j] * Q(b, i, h, x);
                        dv[((size_t)b * c.tk + j) * hd + h * c.d + x] += probs[row + j] * zf(row + j) * dout[((size_t)b * c.tq + i) * hd + h * c.d + x];
                    }
                if (c.bias)
                    for (int j = 0; j < c.tk; ++j) dbias[((size_t)h * c.tq + i) * c.tk + j] += ds[row + j];
            }

    // the kernels
    vector<float> o(out.size()), pr(np), g(np), gq(dq.size()), gk(dk.size()), gv(dv.size()), gb(bias.size(), 0.0f);
    const int rows = c.batch * c.nh * c.tq, krows = c.batch * c.nh * c.tk;
    const float* bp = c.bias ? bias.data() : nullptr;
    const int* mp = c.mask ? mask.data() : nullptr;
    launch(dim3{(unsigned)rows}, dim3{128}, biased_attention_fwd, o.data(), pr.data(), (const float*)q.data(), q_ld, q_off, (const float*)kv.data(), kv_ld, k_off,
           (const float*)kv.data(), kv_ld, v_off, bp, mp, c.tq, c.tk, c.nh, c.d, (int)c.causal, c.scale, (int)c.drop, key, threshold, dscale);
    launch(dim3{(unsigned)rows}, dim3{128}, biased_attention_bwd_rows, gq.data(), g.data(), (const float*)dout.data(), (const float*)pr.data(), (const float*)kv.data(),
           kv_ld, k_off, (const float*)kv.data(), kv_ld, v_off, c.tq, c.tk, c.nh, c.d, c.scale, (int)c.drop, key, threshold, dscale);
    launch(dim3{(unsigned)krows}, dim3{128}, biased_attention_bwd_keys, gk.data(), gv.data(), (const float*)g.data(), (const float*)dout.data(), (const float*)pr.data(),
           (const float*)q.data(), q_ld, q_off, c.tq, c.tk, c.nh, c.d, c.scale, (int)c.drop, key, threshold, dscale);
    if (c.bias) launch(dim3{4}, dim3{256}, biased_attention_bias_grad, gb.data(), (const float*)g.data(), c.batch, (long long)bias.size());
    char what[160];
    const std::pair<const char*, std::pair<const vector<float>*, const vector<double>*>> outs[] = {
        {"out", {&o, &out}}, {"probs", {&pr, &probs}}, {"ds", {&g, &ds}}, {"dq", {&gq, &dq}}, {"dk", {&gk, &dk}}, {"dv", {&gv, &dv}}, {"dbias", {&gb, &dbias}}};
    for (auto& [n, p] : outs) {
        if (p.second->empty()) continue;
        snprintf(what, sizeof what, "biased attention %s: %s", c.name, n);
        check(what, nerr(*p.first, *p.second), 2e-5);
    }
}

static void test_position_bias() {
    const int nb = 8, nh = 3, tq = 9, tk = 11, n = tq * tk;
    auto table = rvec(nb * nh);
    vector<int> buckets(n);
    for (auto& b : buckets) b = (int)((frand() + 1.0f) * 0.5f * nb) % nb;
    vector<float> out((size_t)nh * n);
    launch(dim3{2}, dim3{256}, position_bias_fwd, out.data(), (const float*)table.data(), (const int*)buckets.data(), (long long)n, nh);
    double e = 0;
    for (int h = 0; h < nh; ++h)
        for (int x = 0; x < n; ++x) e = std::max(e, (double)std::fabs(out[h * n + x] - table[buckets[x] * nh + h]));
    check("position bias forward (exact)", e, 0.0);
    auto dbias = rvec((size_t)nh * n);
    auto start = rvec(nb * nh);
    vector<float> ours = start, cpu = start;
    launch(dim3{1}, dim3{256}, position_bias_bwd, ours.data(), (const float*)dbias.data(), (const int*)buckets.data(), (long long)n, nh, nb);
    // cpu/seq2seq.rs position_bias_bwd: per head, positions in order
    for (int h = 0; h < nh; ++h)
        for (int x = 0; x < n; ++x) cpu[buckets[x] * nh + h] += dbias[h * n + x];
    check("position bias backward (bitwise with the CPU)", std::memcmp(ours.data(), cpu.data(), cpu.size() * 4) == 0 ? 0.0 : 1.0, 0.0);
}

static void test_activations() {
    const long long rows = 13, I = 37, n = rows * I;
    auto x2 = rvec(rows * 2 * I, 4.0f), x = rvec(n, 4.0f), d = rvec(n);
    auto gelu_t = [](double v) { return 0.5 * v * (1 + std::tanh(0.7978846 * (v + 0.044715 * v * v * v))); };
    auto gelu_t_grad = [](double v) {
        double t = std::tanh(0.7978846 * (v + 0.044715 * v * v * v));
        return 0.5 * (1 + t) + 0.5 * v * (1 - t * t) * 0.7978846 * (1 + 3 * 0.044715 * v * v);
    };
    vector<float> o(n), dx(rows * 2 * I);
    vector<double> ro(n), rdx(rows * 2 * I);
    for (long long r = 0; r < rows; ++r)
        for (long long c = 0; c < I; ++c) {
            double g = x2[r * 2 * I + c], u = x2[r * 2 * I + I + c];
            ro[r * I + c] = gelu_t(g) * u;
            rdx[r * 2 * I + I + c] = d[r * I + c] * gelu_t(g);
            rdx[r * 2 * I + c] = d[r * I + c] * u * gelu_t_grad(g);
        }
    launch(dim3{2}, dim3{256}, geglu_fwd, o.data(), (const float*)x2.data(), rows, (int)I);
    launch(dim3{2}, dim3{256}, geglu_bwd, dx.data(), (const float*)x2.data(), (const float*)d.data(), rows, (int)I);
    check("geglu forward", nerr(o, ro), 1e-6);
    check("geglu backward", nerr(dx, rdx), 1e-6);
    vector<float> eo(n), ed(n), ro2(n), rd2(n);
    vector<double> ero(n), erd(n), rro(n), rrd(n);
    for (long long e = 0; e < n; ++e) {
        double v = x[e], cdf = 0.5 * (1 + std::erf(v / std::sqrt(2.0)));
        ero[e] = v * cdf;
        erd[e] = d[e] * (cdf + v * std::exp(-0.5 * v * v) / std::sqrt(2 * M_PI));
        rro[e] = v > 0 ? v : 0;
        rrd[e] = v > 0 ? d[e] : 0;
    }
    launch(dim3{2}, dim3{256}, gelu_erf_fwd, eo.data(), (const float*)x.data(), n);
    launch(dim3{2}, dim3{256}, gelu_erf_bwd, ed.data(), (const float*)x.data(), (const float*)d.data(), n);
    launch(dim3{2}, dim3{256}, relu_fwd, ro2.data(), (const float*)x.data(), n);
    launch(dim3{2}, dim3{256}, relu_bwd, rd2.data(), (const float*)x.data(), (const float*)d.data(), n);
    check("exact gelu forward", nerr(eo, ero), 1e-6);
    check("exact gelu backward", nerr(ed, erd), 1e-6);
    check("relu forward", nerr(ro2, rro), 0.0);
    check("relu backward", nerr(rd2, rrd), 0.0);
}

int main(int argc, char** argv) {
    std::string only = argc > 1 ? argv[1] : "";
    auto want = [&](const char* n) { return only.empty() || only == n; };
    if (want("attention")) {
        const Case cases[] = {
            // T5's encoder: bias, padding, no scaling
            {"encoder self (bias, padding)", 2, 7, 7, 2, 8, false, true, true, false, false, 1.0f},
            // T5's decoder with dropout on the probabilities
            {"decoder self (bias, causal, dropout)", 2, 6, 6, 2, 8, true, true, false, true, false, 1.0f},
            // cross attention: more keys than queries, BART's scaling, a sequence with no key
            {"cross (mask, scale, a dead row)", 3, 5, 9, 2, 40, false, false, true, false, true, 0.158f},
            // more keys and head columns than a block has threads
            {"long (tk 150, head dim 130)", 1, 3, 150, 1, 130, false, true, true, true, false, 0.088f},
        };
        for (const auto& c : cases) test_attention(c);
    }
    if (want("position")) test_position_bias();
    if (want("activations")) test_activations();
    printf(failures ? "%d FAILURES\n" : "all passed\n", failures);
    return failures != 0;
}
