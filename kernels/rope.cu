// Rotary position embedding, in place on the query and key heads of the fused qkv activation
// (HF's rotate_half layout: dimension i pairs with i + head_dim / 2; an odd last dimension is left
// alone). `inverse != 0` applies the transpose rotation (the backward pass, on dqkv).
// CPU twin: cpu/attention.rs `rope`. Launch: grid rows, block 128.
//
// The CPU computes, in f32: inv_freq = 1 / theta.powf((2i) as f32 / d as f32), angle = pos as f32 *
// inv_freq, then cosf / sinf of the f32 angle (glibc, correctly rounded in nearly all cases). Here
// the exponent and the product are the same f32 operations, while theta^e, cos and sin are
// evaluated in f64 and rounded to f32, which gives the correctly rounded f32 values: the same bits
// as the CPU except in rare near-halfway cases (1 ulp). The rotation itself uses explicitly rounded
// operations in the CPU's order.

#define ROPE_THREADS 128

extern "C" __global__ void __launch_bounds__(ROPE_THREADS) rope(float* qkv, const int* pos, int rows, int n_head, int n_kv_head, int head_dim, float theta, int inverse) {
    __shared__ float cs[ROPE_THREADS];
    __shared__ float sn[ROPE_THREADS];
    const long long r = blockIdx.x;
    if (r >= rows) return;
    const int half = head_dim / 2;
    const int heads = n_head + n_kv_head;  // the value heads are not rotated
    const long long width = (long long)(n_head + 2 * n_kv_head) * head_dim;
    float* row = qkv + r * width;
    const float p = (float)pos[r];
    for (int c0 = 0; c0 < half; c0 += ROPE_THREADS) {
        const int cn = min(ROPE_THREADS, half - c0);
        if ((int)threadIdx.x < cn) {
            const int i = c0 + threadIdx.x;
            const float e = __fdiv_rn((float)(2 * i), (float)head_dim);
            const float inv_freq = __fdiv_rn(1.0f, (float)pow((double)theta, (double)e));
            const float a = __fmul_rn(p, inv_freq);
            double sd, cd;
            sincos((double)a, &sd, &cd);
            const float s = (float)sd;
            cs[threadIdx.x] = (float)cd;
            sn[threadIdx.x] = inverse ? -s : s;
        }
        __syncthreads();
        for (int e = threadIdx.x; e < heads * cn; e += ROPE_THREADS) {
            const int h = e / cn;
            const int k = e - h * cn;
            float* x1 = row + (long long)h * head_dim + c0 + k;
            float* x2 = x1 + half;
            const float a = *x1, b = *x2, c = cs[k], s = sn[k];
            *x1 = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
            *x2 = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
        }
        __syncthreads();
    }
}
