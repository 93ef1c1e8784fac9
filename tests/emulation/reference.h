// What both emulation programs share: the random numbers (xorshift, so every run sees the same
// inputs) and the f64 attention reference.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

static uint64_t rs = 88172645463325252ull;
static float frand() {  // [-1, 1)
    rs ^= rs << 13;
    rs ^= rs >> 7;
    rs ^= rs << 17;
    return ((rs >> 40) / float(1 << 24)) * 2.0f - 1.0f;
}

// n values in [-s, s)
static std::vector<float> rvec(size_t n, float s = 1.0f) {
    std::vector<float> v(n);
    for (auto& x : v) x = frand() * s;
    return v;
}

struct Shape {
    int batch, seq, nh, nkv, hd;
};

// Causal grouped-query attention with a key mask, forward and backward in f64 (qkv layout as the
// kernels'); rows with no visible key get lse = +inf and no gradient. With out_abs / dqkv_abs, also
// the sums of the absolute values of each output's terms (the scale its rounding error has).
// With `zf`, dropout on the probabilities: zf(index) is the kept factor (0 or 1 / (1 - p)) of
// probability index ((b * nh + h) * seq + i) * seq + j.
static void attn_ref(const Shape& s, const std::vector<float>& qkv, const std::vector<int>& mask, const std::vector<float>& dout, std::vector<double>& out, std::vector<double>& lse, std::vector<double>& dqkv,
                     std::vector<double>* out_abs = nullptr, std::vector<double>* dqkv_abs = nullptr, const std::function<double(long long)>& zf = nullptr) {
    const int W = (s.nh + 2 * s.nkv) * s.hd, OW = s.nh * s.hd, grp = s.nh / s.nkv, hd = s.hd;
    const double scale = 1.0f / std::sqrt((float)hd);
    out.assign((size_t)s.batch * s.seq * OW, 0);
    lse.assign((size_t)s.batch * s.nh * s.seq, 0);
    dqkv.assign(qkv.size(), 0);
    if (out_abs) out_abs->assign(out.size(), 0);
    if (dqkv_abs) dqkv_abs->assign(qkv.size(), 0);
    auto Q = [&](int b, int t, int h, int d) { return (double)qkv[(size_t)(b * s.seq + t) * W + h * hd + d]; };
    auto K = [&](int b, int t, int g, int d) { return (double)qkv[(size_t)(b * s.seq + t) * W + (s.nh + g) * hd + d]; };
    auto V = [&](int b, int t, int g, int d) { return (double)qkv[(size_t)(b * s.seq + t) * W + (s.nh + s.nkv + g) * hd + d]; };
    for (int b = 0; b < s.batch; ++b)
        for (int h = 0; h < s.nh; ++h) {
            int g = h / grp;
            for (int i = 0; i < s.seq; ++i) {
                std::vector<int> keys;
                for (int j = 0; j <= i; ++j)
                    if (mask[b * s.seq + j]) keys.push_back(j);
                size_t li = ((size_t)b * s.nh + h) * s.seq + i;
                if (keys.empty()) {
                    lse[li] = INFINITY;
                    continue;
                }
                std::vector<double> sc(keys.size()), p(keys.size());
                double mx = -1e300;
                for (size_t k = 0; k < keys.size(); ++k) {
                    double a = 0;
                    for (int d = 0; d < hd; ++d) a += Q(b, i, h, d) * K(b, keys[k], g, d);
                    sc[k] = a * scale;
                    mx = std::max(mx, sc[k]);
                }
                double z = 0;
                for (size_t k = 0; k < keys.size(); ++k) z += std::exp(sc[k] - mx);
                lse[li] = mx + std::log(z);
                for (size_t k = 0; k < keys.size(); ++k) p[k] = std::exp(sc[k] - mx) / z;
                std::vector<double> pz(p);  // the dropped probabilities
                const long long zrow = (((long long)b * s.nh + h) * s.seq + i) * s.seq;
                if (zf)
                    for (size_t k = 0; k < keys.size(); ++k) pz[k] = p[k] * zf(zrow + keys[k]);
                double* o = &out[(size_t)(b * s.seq + i) * OW + h * hd];
                for (size_t k = 0; k < keys.size(); ++k)
                    for (int d = 0; d < hd; ++d) o[d] += pz[k] * V(b, keys[k], g, d);
                if (out_abs)
                    for (size_t k = 0; k < keys.size(); ++k)
                        for (int d = 0; d < hd; ++d) (*out_abs)[(size_t)(b * s.seq + i) * OW + h * hd + d] += p[k] * std::fabs(V(b, keys[k], g, d));
                const float* dO = &dout[(size_t)(b * s.seq + i) * OW + h * hd];
                double Di = 0;
                for (int d = 0; d < hd; ++d) Di += dO[d] * o[d];
                for (size_t k = 0; k < keys.size(); ++k) {
                    int j = keys[k];
                    double dp = 0;
                    for (int d = 0; d < hd; ++d) dp += dO[d] * V(b, j, g, d);
                    if (zf) dp *= zf(zrow + j);
                    double ds = p[k] * (dp - Di) * scale;
                    if (dqkv_abs) {
                        // |terms| of dS: dP and delta are themselves dot products over d
                        double dpa = 0, dia = 0;
                        for (int d = 0; d < hd; ++d) {
                            dpa += std::fabs(dO[d] * V(b, j, g, d));
                            dia += std::fabs(dO[d] * o[d]);
                        }
                        const double dsa = p[k] * (dpa + dia) * scale;
                        for (int d = 0; d < hd; ++d) {
                            (*dqkv_abs)[(size_t)(b * s.seq + i) * W + h * hd + d] += dsa * std::fabs(K(b, j, g, d));
                            (*dqkv_abs)[(size_t)(b * s.seq + j) * W + (s.nh + g) * hd + d] += dsa * std::fabs(Q(b, i, h, d));
                            (*dqkv_abs)[(size_t)(b * s.seq + j) * W + (s.nh + s.nkv + g) * hd + d] += p[k] * std::fabs(dO[d]);
                        }
                    }
                    for (int d = 0; d < hd; ++d) {
                        dqkv[(size_t)(b * s.seq + i) * W + h * hd + d] += ds * K(b, j, g, d);
                        dqkv[(size_t)(b * s.seq + j) * W + (s.nh + g) * hd + d] += ds * Q(b, i, h, d);
                        dqkv[(size_t)(b * s.seq + j) * W + (s.nh + s.nkv + g) * hd + d] += pz[k] * dO[d];
                    }
                }
            }
        }
}
