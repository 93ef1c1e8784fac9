// Token (and learned position) embeddings. CPU twins: cpu/pointwise.rs `embedding_fwd`,
// `embedding_bwd`.
//
// embedding_fwd: out[r] = wte[ids[r]] (+ wpe[pos[r]] when wpe is not null), width c.
//   Launch: grid rows, block 256.
// embedding_bwd: dw[idx[r]] += dout[r] for r in row order. One thread per column walks the rows in
//   order, so every element is summed in the CPU's order (bitwise equal). Called once for the token
//   table and once for the position table. Launch: block 256, grid ceil(c / 256).

extern "C" __global__ void __launch_bounds__(256) embedding_fwd(float* out, const int* ids, const float* wte, const float* wpe, const int* pos, int rows, int c) {
    const long long r = blockIdx.x;
    if (r >= rows) return;
    const float* w = wte + (long long)ids[r] * c;
    float* o = out + r * c;
    if (wpe != nullptr && pos != nullptr) {
        const float* p = wpe + (long long)pos[r] * c;
        for (int j = threadIdx.x; j < c; j += blockDim.x) o[j] = __fadd_rn(w[j], p[j]);
    } else {
        for (int j = threadIdx.x; j < c; j += blockDim.x) o[j] = w[j];
    }
}

extern "C" __global__ void __launch_bounds__(256) embedding_bwd(float* dw, const int* idx, const float* dout, int rows, int c) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c) return;
    // Rows go in batches of 8 so that the loads are issued together; within a batch a repeated
    // index takes the value the earlier row left (in registers), and the stores go in row order
    // (the last one to an address wins), so the result is the sequential loop's, bit for bit.
    constexpr int B = 8;
    int r = 0;
    for (; r + B <= rows; r += B) {
        long long at[B];
        float g[B], cur[B];
#pragma unroll
        for (int u = 0; u < B; ++u) {
            at[u] = (long long)idx[r + u] * c + j;
            g[u] = dout[(long long)(r + u) * c + j];
        }
#pragma unroll
        for (int u = 0; u < B; ++u) cur[u] = dw[at[u]];
#pragma unroll
        for (int u = 0; u < B; ++u) {
            float v = cur[u];
#pragma unroll
            for (int w = 0; w < u; ++w) v = at[w] == at[u] ? cur[w] : v;
            cur[u] = __fadd_rn(v, g[u]);
        }
#pragma unroll
        for (int u = 0; u < B; ++u) dw[at[u]] = cur[u];
    }
    for (; r < rows; ++r) {
        float* d = dw + (long long)idx[r] * c + j;
        *d = __fadd_rn(*d, dout[(long long)r * c + j]);
    }
}
