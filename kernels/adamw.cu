// One fused AdamW step over many tensors. CPU twin: cpu/optim.rs `adamw` (torch.optim.AdamW,
// single-tensor path). The host computes the step's scalars exactly as the CPU does (in f64, then
// rounded to f32): step_size = lr / (1 - beta1^t), bc2_sqrt = sqrt(1 - beta2^t),
// decay_mul = 1 - lr * weight_decay, w1 = 1 - beta1, w2 = 1 - beta2.
//
// Per element, the CPU's f32 sequence with explicitly rounded operations (no FMA contraction, IEEE
// sqrt and division), so the result is bitwise the CPU's:
//   g = g * grad_scale; p *= (decay ? decay_mul : 1); m += w1 * (g - m); v = v * beta2 + w2 * (g * g);
//   denom = sqrt(v) / bc2_sqrt + eps; p -= step_size * (m / denom)
// and, when p_bf16 is set, p_bf16 = bf16(p) (round to nearest even).
//
// Launch: grid (n_chunks), block 256. The host cuts every tensor into chunks of at most
// ADAMW_CHUNK elements (multi_tensor_apply's scheme): block b updates chunk b, so there are no idle
// blocks whatever the tensor sizes, and a chunk table that does not change is uploaded once. Chunk
// starts are multiples of ADAMW_CHUNK (so of 4): whole groups of 4 go through float4 loads and
// stores, a tensor's last 1-3 elements one at a time.

#define ADAMW_CHUNK 8192

struct AdamWTensor {
    float* p;
    const float* g;
    float* m;
    float* v;
    bf16_t* p_bf16;  // nullable
    long long n;
    int decay;
    int pad;
};

struct AdamWChunk {
    long long start, end;  // elements [start, end) of tensor `tensor`
    int tensor;
    int pad;
};

struct AdamWScalars {
    float step_size, bc2_sqrt, dm, w1, beta2, w2, eps, grad_scale;
};

__device__ __forceinline__ float adamw_one(float p, float g, float& m, float& v, const AdamWScalars& k) {
    g = __fmul_rn(g, k.grad_scale);
    p = __fmul_rn(p, k.dm);
    m = __fadd_rn(m, __fmul_rn(k.w1, __fsub_rn(g, m)));
    v = __fadd_rn(__fmul_rn(v, k.beta2), __fmul_rn(k.w2, __fmul_rn(g, g)));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), k.bc2_sqrt), k.eps);
    return __fsub_rn(p, __fmul_rn(k.step_size, __fdiv_rn(m, denom)));
}

extern "C" __global__ void __launch_bounds__(256) adamw_multi(const AdamWTensor* tensors, const AdamWChunk* chunks, float step_size, float bc2_sqrt, float decay_mul, float w1, float beta2, float w2, float eps, float grad_scale) {
    const AdamWChunk c = chunks[blockIdx.x];
    const AdamWTensor t = tensors[c.tensor];
    const AdamWScalars k = {step_size, bc2_sqrt, t.decay ? decay_mul : 1.0f, w1, beta2, w2, eps, grad_scale};
    const long long end4 = c.start + ((c.end - c.start) & ~3LL);
    for (long long i = c.start + 4LL * threadIdx.x; i < end4; i += 4LL * blockDim.x) {
        float4 p = *reinterpret_cast<const float4*>(t.p + i);
        const float4 g = *reinterpret_cast<const float4*>(t.g + i);
        float4 m = *reinterpret_cast<const float4*>(t.m + i);
        float4 v = *reinterpret_cast<const float4*>(t.v + i);
        p.x = adamw_one(p.x, g.x, m.x, v.x, k);
        p.y = adamw_one(p.y, g.y, m.y, v.y, k);
        p.z = adamw_one(p.z, g.z, m.z, v.z, k);
        p.w = adamw_one(p.w, g.w, m.w, v.w, k);
        *reinterpret_cast<float4*>(t.p + i) = p;
        *reinterpret_cast<float4*>(t.m + i) = m;
        *reinterpret_cast<float4*>(t.v + i) = v;
        if (t.p_bf16 != nullptr) {
            uint2 b;
            b.x = (unsigned)f32_to_bf16(p.x) | ((unsigned)f32_to_bf16(p.y) << 16);
            b.y = (unsigned)f32_to_bf16(p.z) | ((unsigned)f32_to_bf16(p.w) << 16);
            *reinterpret_cast<uint2*>(t.p_bf16 + i) = b;
        }
    }
    for (long long i = end4 + threadIdx.x; i < c.end; i += blockDim.x) {
        float m = t.m[i], v = t.v[i];
        const float p = adamw_one(t.p[i], t.g[i], m, v, k);
        t.p[i] = p;
        t.m[i] = m;
        t.v[i] = v;
        if (t.p_bf16 != nullptr) t.p_bf16[i] = f32_to_bf16(p);
    }
}
