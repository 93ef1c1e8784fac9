// CPU emulation of the CUDA subset the kernels use: one std::thread per CUDA thread, one block at
// a time, __shared__ = function-static, barriers for __syncthreads and warp shuffles.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline thread_local int emu_tid;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// dynamic shared memory: one buffer, as blocks run one at a time (the kernels use at most 256 KiB)
alignas(16) inline unsigned char emu_dynamic_shared[256 * 1024];
#define DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(emu_dynamic_shared)

struct float4 {
    float x, y, z, w;
};
struct uint2 {
    unsigned x, y;
};
struct float2 {
    float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
inline int min(int a, int b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
// atomicAdd on f32: the emulation runs one block at a time, but the threads of a block run at once
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
#include <math.h>

struct EmuBlock {
    std::unique_ptr<std::barrier<>> block;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<uint64_t> slots;
};
inline EmuBlock* emu_blk;

inline void __syncthreads() { emu_blk->block->arrive_and_wait(); }

template <class T>
inline T emu_exchange(T v, int src_lane_fn(int, int), int arg) {
    const int lane = emu_tid & 31, w = emu_tid >> 5;
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    emu_blk->slots[w * 32 + lane] = bits;
    emu_blk->warps[w]->arrive_and_wait();
    const uint64_t got = emu_blk->slots[w * 32 + src_lane_fn(lane, arg)];
    emu_blk->warps[w]->arrive_and_wait();
    T r;
    std::memcpy(&r, &got, sizeof(T));
    return r;
}
inline int emu_xor(int lane, int o) { return lane ^ o; }
inline int emu_src(int, int s) { return s; }
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int o) { return emu_exchange(v, emu_xor, o); }
template <class T>
inline T __shfl_sync(unsigned, T v, int s) { return emu_exchange(v, emu_src, s); }

// the lanes' predicates as a mask (lanes missing from a partial warp count as false)
inline unsigned __ballot_sync(unsigned, int pred) {
    const int lane = emu_tid & 31, w = emu_tid >> 5;
    emu_blk->slots[w * 32 + lane] = pred != 0;
    emu_blk->warps[w]->arrive_and_wait();
    unsigned m = 0;
    for (int i = 0; i < 32; ++i)
        if (emu_blk->slots[w * 32 + i]) m |= 1u << i;
    emu_blk->warps[w]->arrive_and_wait();
    return m;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }

template <class F, class... A>
void launch(dim3 grid, dim3 block, F f, A... args) {
    gridDim = grid;
    blockDim = block;
    const int nt = block.x * block.y * block.z;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                EmuBlock eb;
                eb.block = std::make_unique<std::barrier<>>(nt);
                for (int w = 0; w < (nt + 31) / 32; ++w) eb.warps.push_back(std::make_unique<std::barrier<>>(std::min(32, nt - 32 * w)));
                eb.slots.assign(((nt + 31) / 32) * 32, 0);
                emu_blk = &eb;
                std::vector<std::thread> ts;
                for (int t = 0; t < nt; ++t) {
                    ts.emplace_back([&, t] {
                        emu_tid = t;
                        threadIdx = dim3{unsigned(t % block.x), unsigned((t / block.x) % block.y), unsigned(t / (block.x * block.y))};
                        blockIdx = dim3{bx, by, bz};
                        f(args...);
                        eb.block->arrive_and_drop();
                        eb.warps[t >> 5]->arrive_and_drop();
                    });
                }
                for (auto& t : ts) t.join();
            }
}
