// Deterministic reductions.
//
// colsum_acc: dst[j] += sum over rows of src[r * c + j] (a linear layer's bias gradient). CPU twin:
//   the `dbias` branch of cpu/matmul.rs `matmul_bwd` (math::reduce_rows); bitwise equal to it.
//   Launch: block (32, 8), grid ceil(c / 32).
// sum_squares_partial: partial[blockIdx.x] = sum of x[i]^2 in f64 over i = blockIdx.x * 256 +
//   threadIdx.x + k * 512 * 256, combined in a fixed order. The host sums the 512 partials (in f64).
//   CPU twin: cpu/optim.rs `sum_squares` (same value up to f64 rounding). Launch: block 256, grid 512.

struct ColsumTerm {
    static constexpr int NOUT = 1;
    const float* src;
    int c;
    __device__ __forceinline__ void term(long long r, int j, float* t) const { t[0] = src[r * c + j]; }
};

extern "C" __global__ void __launch_bounds__(256) colsum_acc(float* dst, const float* src, int rows, int c) {
    float* outs[1] = {dst};
    reduce_rows_cols(outs, rows, c, ColsumTerm{src, c});
}

extern "C" __global__ void __launch_bounds__(256) sum_squares_partial(double* partial, const float* x, long long n) {
    __shared__ double scratch[8];
    double acc = 0.0;
    const long long stride = 512LL * 256LL;
    for (long long i = (long long)blockIdx.x * 256 + threadIdx.x; i < n; i += stride) {
        const double v = (double)x[i];
        acc = __dadd_rn(acc, __dmul_rn(v, v));
    }
    const double total = block_sum_d<256>(acc, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = total;
}
