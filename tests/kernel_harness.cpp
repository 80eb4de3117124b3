// Host build of the fused DDPM kernels, for tests/test_kernels.py (loaded with ctypes).
//
// kernels/ddpm.cu is included as it is: its extern "C" kernels become plain functions with the very
// signatures that python/emu/diffusion/fused.py launches, built from the same __host__ __device__
// functions of kernels/philox.cuh and kernels/ddpm.cuh. Each runs as one "thread" (thread 0 of block 0
// of a 1 x 1 grid), whose grid-stride loop then visits every Philox group, exactly as the threads of a
// real launch share them out. Only the GPU's 16-byte vector loads (behind __CUDA_ARCH__) are left out.
//
// Two more entry points expose the raw Philox words for the known-answer and bit-for-bit checks.
// Build (the test does this):
//   g++ -std=c++17 -O2 -ffp-contract=off -fPIC -shared -I kernels tests/kernel_harness.cpp -o libharness.so
// -ffp-contract=off keeps every multiply and add separately rounded, as __fmul_rn etc. do on the GPU.
struct emu_host_dim3 {
    unsigned int x, y, z;
};
static const emu_host_dim3 threadIdx = {0, 0, 0};
static const emu_host_dim3 blockIdx = {0, 0, 0};
static const emu_host_dim3 blockDim = {1, 1, 1};
static const emu_host_dim3 gridDim = {1, 1, 1};
#define __global__

#include "ddpm.cu"

extern "C" {

// Philox4x32-10 of n counters (n x 4 words) under n keys (n x 2 words) into out (n x 4 words).
void emu_host_philox4x32_10(const unsigned int* counters, const unsigned int* keys, unsigned int* out,
                            unsigned long long n) {
    for (unsigned long long i = 0; i < n; ++i) {
        emu_philox_words counter = {counters[4 * i], counters[4 * i + 1], counters[4 * i + 2], counters[4 * i + 3]};
        const emu_philox_words r = emu_philox4x32_10(counter, keys[2 * i], keys[2 * i + 1]);
        out[4 * i] = r.x;
        out[4 * i + 1] = r.y;
        out[4 * i + 2] = r.z;
        out[4 * i + 3] = r.w;
    }
}

// The words of groups first .. first + n - 1 at (seed, offset), n x 4 (emu's counter layout).
void emu_host_philox_group_words(unsigned int* out, unsigned long long first, unsigned long long n,
                                 unsigned long long seed, unsigned long long offset) {
    for (unsigned long long i = 0; i < n; ++i) {
        const emu_philox_words r = emu_philox_group_words(first + i, seed, offset);
        out[4 * i] = r.x;
        out[4 * i + 1] = r.y;
        out[4 * i + 2] = r.z;
        out[4 * i + 3] = r.w;
    }
}

}  // extern "C"
