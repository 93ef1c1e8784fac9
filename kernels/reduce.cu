// Deterministic reductions.
//
// colsum_partials: the row-block partials (common.cuh `reduce_rows_partials`) of the column sums of
//   src [rows, c] (a linear layer's bias gradient), then added by reduce_partials. CPU twin: the
//   `dbias` branch of cpu/matmul.rs `matmul_bwd` (math::reduce_rows, 16 row blocks: equal to
//   rounding).
// colsum_cast_partials: the same, also writing src rounded to bf16 (see below).
// gelu_bwd_colsum_cast_partials: the same for the gradient through a GELU, computed on the way.
// reduce_partials: out0[j] (and out1[j] when nout is 2 and out1 is not null) += the nblocks partials
//   of part in block order. Launch: block (32, 8), grid ceil(c / 32). (The first form, one thread
//   per column reading its partials one after the other, took 2.9 ms per GPT-2 124M step on an
//   H200 for 73 launches.)
// sum_squares_partial: partial[blockIdx.x] = sum of x[i]^2 in f64 over i = blockIdx.x * 256 +
//   threadIdx.x + k * 512 * 256, combined in a fixed order. The host sums the 512 partials (in f64).
//   CPU twin: cpu/optim.rs `sum_squares` (same value up to f64 rounding). Launch: block 256, grid 512.

struct ColsumTerm {
    static constexpr int NOUT = 1;
    const float* src;
    int c;
    __device__ __forceinline__ void term(long long r, int j, float* t) const { t[0] = src[r * c + j]; }
};

extern "C" __global__ void __launch_bounds__(256) colsum_partials(float* part, const float* src, int rows, int c) {
    reduce_rows_partials(part, rows, c, ColsumTerm{src, c});
}

// colsum_cast_partials: colsum_partials (the same partials, bit for bit) that also writes each
// value of src rounded to bf16 into dst [rows, ld] (ld >= c; pad columns untouched): a product's
// output gradient read once for its bf16 operand and its bias gradient.
struct ColsumCastTerm {
    static constexpr int NOUT = 1;
    const float* src;
    bf16_t* dst;
    int c;
    long long ld;
    __device__ __forceinline__ void term(long long r, int j, float* t) const {
        const float v = src[r * c + j];
        dst[r * ld + j] = f32_to_bf16(v);
        t[0] = v;
    }
};

extern "C" __global__ void __launch_bounds__(256) colsum_cast_partials(float* part, const float* src, bf16_t* dst, int rows, int c, long long ld) {
    reduce_rows_partials(part, rows, c, ColsumCastTerm{src, dst, c, ld});
}

// gelu_bwd_colsum_cast_partials: colsum_cast_partials of dpre = gelu_grad(pre, dact) (gelu_bwd's
// values, bit for bit) without dpre in memory: the backward pass of a product followed by GELU
// (Backend::act_matmul_bwd) reads the pre-activation and the activation's gradient once and
// writes only the products' bf16 operand and the bias gradient's partials.
template <class X, class D>
struct GeluColsumCastTerm {
    static constexpr int NOUT = 1;
    const X* pre;
    const D* dact;
    bf16_t* dst;
    int c;
    long long ld;
    __device__ __forceinline__ void term(long long r, int j, float* t) const {
        const float v = gelu_grad(load_f32(pre, r * c + j), load_f32(dact, r * c + j));
        dst[r * ld + j] = f32_to_bf16(v);
        t[0] = v;
    }
};

extern "C" __global__ void __launch_bounds__(256) gelu_bwd_colsum_cast_partials(float* part, const float* pre, const float* dact, bf16_t* dst, int rows, int c, long long ld) {
    reduce_rows_partials(part, rows, c, GeluColsumCastTerm<float, float>{pre, dact, dst, c, ld});
}
// the same with the pre-activation read as bf16 (a held copy its product wrote alone)
extern "C" __global__ void __launch_bounds__(256) gelu_bwd_colsum_cast_partials_x16(float* part, const bf16_t* pre, const float* dact, bf16_t* dst, int rows, int c, long long ld) {
    reduce_rows_partials(part, rows, c, GeluColsumCastTerm<bf16_t, float>{pre, dact, dst, c, ld});
}
// *_d16: the activation's gradient read as bf16 (a held copy the down-projection's input-gradient
// product wrote alone), with the pre-activation as f32 or (_x16_d16) bf16
extern "C" __global__ void __launch_bounds__(256) gelu_bwd_colsum_cast_partials_d16(float* part, const float* pre, const bf16_t* dact, bf16_t* dst, int rows, int c, long long ld) {
    reduce_rows_partials(part, rows, c, GeluColsumCastTerm<float, bf16_t>{pre, dact, dst, c, ld});
}
extern "C" __global__ void __launch_bounds__(256) gelu_bwd_colsum_cast_partials_x16_d16(float* part, const bf16_t* pre, const bf16_t* dact, bf16_t* dst, int rows, int c, long long ld) {
    reduce_rows_partials(part, rows, c, GeluColsumCastTerm<bf16_t, bf16_t>{pre, dact, dst, c, ld});
}

extern "C" __global__ void __launch_bounds__(256) reduce_partials(float* out0, float* out1, const float* part, int nblocks, int nout, int c) {
    // 64 row blocks' partials of 32 columns at a time are loaded by all 256 threads into shared
    // memory, then the first row of threads adds them in block order
    __shared__ float sh[64][32];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int j = blockIdx.x * 32 + tx;
    for (int o = 0; o < nout; ++o) {
        float* out = o == 0 ? out0 : out1;
        if (out == nullptr) continue;
        float v = (ty == 0 && j < c) ? out[j] : 0.0f;
        for (int b0 = 0; b0 < nblocks; b0 += 64) {
            const int nb = min(64, nblocks - b0);
            for (int i = ty; i < nb; i += 8) sh[i][tx] = j < c ? part[((long long)(b0 + i) * nout + o) * c + j] : 0.0f;
            __syncthreads();
            if (ty == 0)
                for (int i = 0; i < nb; ++i) v = __fadd_rn(v, sh[i][tx]);
            __syncthreads();
        }
        if (ty == 0 && j < c) out[j] = v;
    }
}

// Block blockIdx.x's partial of sum_squares_partial over x[0..n) into *out.
__device__ __forceinline__ void sum_squares_block(double* out, const float* x, long long n) {
    __shared__ double scratch[8];
    double acc = 0.0;
    const long long stride = 512LL * 256LL;
    for (long long i = (long long)blockIdx.x * 256 + threadIdx.x; i < n; i += stride) {
        const double v = (double)x[i];
        acc = __dadd_rn(acc, __dmul_rn(v, v));
    }
    const double total = block_sum_d<256>(acc, scratch);
    if (threadIdx.x == 0) *out = total;
}

extern "C" __global__ void __launch_bounds__(256) sum_squares_partial(double* partial, const float* x, long long n) {
    sum_squares_block(partial + blockIdx.x, x, n);
}

// sum_squares_multi_partial: sum_squares_partial of tensor blockIdx.y, whose (address, length)
// are spans[2y] and spans[2y + 1], into partial[y * 512 + blockIdx.x]: one launch for every
// tensor (the gradient norm), the same partials bit for bit. Launch: block 256, grid (512, tensors).
extern "C" __global__ void __launch_bounds__(256) sum_squares_multi_partial(double* partial, const unsigned long long* spans) {
    const float* x = (const float*)spans[2 * blockIdx.y];
    const long long n = (long long)spans[2 * blockIdx.y + 1];
    sum_squares_block(partial + (long long)blockIdx.y * 512 + blockIdx.x, x, n);
}

// fill_multi_f32: every element of chunk blockIdx.x, whose (address, length) are chunks[2b] and
// chunks[2b + 1], set to v: one launch for many tensors (the gradients zeroed before a step), cut
// into chunks of at most FILL_CHUNK elements. Launch: block 256, grid chunks.
extern "C" __global__ void __launch_bounds__(256) fill_multi_f32(const unsigned long long* chunks, float v) {
    float* x = (float*)chunks[2 * blockIdx.x];
    const long long n = (long long)chunks[2 * blockIdx.x + 1];
    for (long long i = threadIdx.x; i < n; i += 256) x[i] = v;
}
