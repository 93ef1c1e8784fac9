// DoRA (PEFT's DoraLinearLayer) on one adapter's block of columns off..off + width of a [rows, ld]
// output. CPU twins: cpu/dora.rs, with the same per-element order of operations (explicitly
// rounded, no contraction).
//
// dora_norm: n[j] = ||w[off + j, :] + scale * (b a)[j, :]||, a [r, k], b [cols, r]; each element in
//   f32 (the rank summed in order), the squares summed in f64. Launch: block 256, grid cols.
// dora_fwd: out[r, off + j] += (s - 1) * base + s * (scale * u[r, j]), s = m[j] / n[j]; base is
//   base[r, off + j], or out - bias[off + j] when base is null. Launch: elementwise over rows * width.
// dora_grads: gu[r, j] = (scale * s) * g and gb[r, off + j] = (s - shift) * g, g = dout[r, off + j],
//   each when non-null. Launch: elementwise over rows * width.
// dora_dmag: the row-block partials (common.cuh `reduce_rows_partials`, launched as it says) of
//   dm[j] += sum over rows of g * (base[r, off + j] + scale * u[r, j]) / n[j]; reduce_partials
//   (reduce.cu) adds them to dm.

extern "C" __global__ void __launch_bounds__(256) dora_norm(float* n, const float* w, const float* a, const float* b, int off, int k, int r, float scale) {
    __shared__ double scratch[8];
    const int j = blockIdx.x;
    const float* row = w + (long long)(off + j) * k;
    const float* bj = b + (long long)j * r;
    double acc = 0.0;
    for (int i = threadIdx.x; i < k; i += 256) {
        float ba = 0.0f;
        for (int q = 0; q < r; ++q) ba = __fadd_rn(ba, __fmul_rn(bj[q], a[(long long)q * k + i]));
        const float v = __fadd_rn(row[i], __fmul_rn(scale, ba));
        acc = __dadd_rn(acc, __dmul_rn((double)v, (double)v));
    }
    const double total = block_sum_d<256>(acc, scratch);
    if (threadIdx.x == 0) n[j] = (float)__dsqrt_rn(total);
}

extern "C" __global__ void dora_fwd(float* out, const float* base, const float* bias, const float* u, const float* m, const float* n, long long rows, int width,
                                    int ld, int off, float scale) {
    const long long total = rows * (long long)width;
    for (long long e = grid_start(); e < total; e += grid_stride()) {
        const long long r = e / width;
        const int j = (int)(e - r * width);
        float* o = out + r * ld + off + j;
        const float y = *o;
        const float s = __fdiv_rn(m[j], n[j]);
        const float bv = base ? base[r * ld + off + j] : __fsub_rn(y, bias ? bias[off + j] : 0.0f);
        *o = __fadd_rn(y, __fadd_rn(__fmul_rn(__fsub_rn(s, 1.0f), bv), __fmul_rn(s, __fmul_rn(scale, u[e]))));
    }
}

extern "C" __global__ void dora_grads(float* gu, float* gb, float shift, const float* dout, const float* m, const float* n, long long rows, int width, int ld, int off,
                                      float scale) {
    const long long total = rows * (long long)width;
    for (long long e = grid_start(); e < total; e += grid_stride()) {
        const long long r = e / width;
        const int j = (int)(e - r * width);
        const float g = dout[r * ld + off + j];
        const float s = __fdiv_rn(m[j], n[j]);
        if (gu) gu[e] = __fmul_rn(__fmul_rn(scale, s), g);
        if (gb) gb[r * ld + off + j] = __fmul_rn(__fsub_rn(s, shift), g);
    }
}

struct DoraMagTerm {
    static constexpr int NOUT = 1;
    const float* dout;
    const float* base;
    const float* u;
    const float* n;
    int width, ld, off;
    float scale;
    __device__ __forceinline__ void term(long long r, int j, float* t) const {
        const float g = dout[r * ld + off + j];
        const float v = __fadd_rn(base[r * ld + off + j], __fmul_rn(scale, u[r * width + j]));
        t[0] = __fdiv_rn(__fmul_rn(g, v), n[j]);
    }
};

extern "C" __global__ void __launch_bounds__(256) dora_dmag(float* part, const float* dout, const float* base, const float* u, const float* n, int rows, int width, int ld,
                                                            int off, float scale) {
    reduce_rows_partials(part, rows, width, DoraMagTerm{dout, base, u, n, width, ld, off, scale});
}
