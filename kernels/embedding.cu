// Token (and learned position) embeddings. CPU twins: cpu/pointwise.rs `embedding_fwd`,
// `embedding_bwd`.
//
// embedding_fwd: out[r] = wte[ids[r]] (+ wpe[pos[r]] when wpe is not null), width c.
//   Launch: grid rows, block 256.
// embedding_bwd: dw[idx[r]] += dout[r] for r in row order (a negative index adds nothing: a
//   `padding_idx` row), every element summed in the CPU's order
//   (bitwise equal). The table rows are split into gridDim.y buckets by index, so that more than
//   ceil(c / 256) blocks share the work (GPT-2's width 768 gave 3 blocks: 3.7 ms per step on an
//   H200). Each block lists the rows of its bucket, 256 rows at a time (one thread scanning each
//   row per chunk took 2.2 ms per step; one thread listing the flagged rows of the chunk 0.72 ms
//   for both tables; now a ballot per warp). Called once for the token table and once for the
//   position table.
//   Launch: block 256, grid (ceil(c / 256), EMBEDDING_BUCKETS = 128).

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

extern "C" __global__ void __launch_bounds__(256) embedding_bwd(float* dw, const int* __restrict__ idx, const float* __restrict__ dout, int rows, int c) {
    // The rows go in chunks of 256: every thread flags one row of the chunk whose index falls in
    // this block's bucket (index % gridDim.y), the flagged rows are listed in order (each warp
    // counts its flags with a ballot, and a row's place is the flags before it), then each thread
    // adds the listed rows to its column in that order. Every table row belongs to one bucket, so
    // each element receives its rows in row order, as the sequential loop adds them.
    __shared__ int list[256];
    __shared__ int warp_flags[8];
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    const int j = blockIdx.x * 256 + t;
    const int buckets = gridDim.y, bucket = blockIdx.y;
    for (int base = 0; base < rows; base += 256) {
        const int r = base + t;
        const int flag = r < rows && idx[r] >= 0 && idx[r] % buckets == bucket;
        const unsigned mask = __ballot_sync(0xffffffffu, flag);
        if (lane == 0) warp_flags[warp] = __popc(mask);
        __syncthreads();
        int before = 0, n = 0;
        for (int w = 0; w < 8; ++w) {
            before += w < warp ? warp_flags[w] : 0;
            n += warp_flags[w];
        }
        if (flag) list[before + __popc(mask & ((1u << lane) - 1u))] = r;
        __syncthreads();
        if (j < c) {
            for (int i = 0; i < n; ++i) {
                const int rr = list[i];
                float* d = dw + (long long)idx[rr] * c + j;
                *d = __fadd_rn(*d, dout[(long long)rr * c + j]);
            }
        }
        __syncthreads();
    }
}
