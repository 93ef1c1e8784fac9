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
// Launch: grid (G, n_tensors), block 256; blockIdx.y selects the tensor, and the G blocks stride
// over its n elements (stride G * 256).

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

extern "C" __global__ void __launch_bounds__(256) adamw_multi(const AdamWTensor* tensors, float step_size, float bc2_sqrt, float decay_mul, float w1, float beta2, float w2, float eps, float grad_scale) {
    const AdamWTensor t = tensors[blockIdx.y];
    const float dm = t.decay ? decay_mul : 1.0f;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < t.n; i += stride) {
        const float g = __fmul_rn(t.g[i], grad_scale);
        float p = __fmul_rn(t.p[i], dm);
        float m = t.m[i];
        float v = t.v[i];
        m = __fadd_rn(m, __fmul_rn(w1, __fsub_rn(g, m)));
        v = __fadd_rn(__fmul_rn(v, beta2), __fmul_rn(w2, __fmul_rn(g, g)));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), bc2_sqrt), eps);
        p = __fsub_rn(p, __fmul_rn(step_size, __fdiv_rn(m, denom)));
        t.p[i] = p;
        t.m[i] = m;
        t.v[i] = v;
        if (t.p_bf16 != nullptr) t.p_bf16[i] = f32_to_bf16(p);
    }
}
