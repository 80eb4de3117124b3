// Fused DDPM kernels: the reverse step, noising to a level, Tweedie's estimate and Philox noise,
// each one pass over memory (every input read once, every output written once).
//
// Launch contract (the launcher is python/emu/diffusion/fused.py):
//   * all arrays C-contiguous, `count` elements; sample b owns elements [b * per_sample, (b+1) * per_sample)
//   * per-sample coefficients are arrays of length count / per_sample, in the element type
//   * one thread per Philox group of 4 consecutive elements (grid-stride loop; the last group may be
//     partial), so in-kernel noise follows emu's convention (kernels/philox.cuh) for any launch shape
//   * seed and offset are unsigned 64-bit; offset is the call's position in a run
//
// Kernels (suffix _f32 for float, _f64 for double):
//   ddpm_step        out = emu_ddpm_step(noisy, predicted_noise, z(seed, offset), coefficients...)
//   ddpm_step_noise  the same with z read from `noise`
//   add_noise        out = emu_add_noise(clean, noise, ...)             (z read from `noise`)
//   add_noise_philox the same with z(seed, offset); writes z to `noise_out` unless it is null
//   tweedie          out = emu_tweedie(noisy, predicted_noise, ...)
//   philox_normal    out = z(seed, offset)
// Everything but the launch loop lives in kernels/ddpm.cuh (host-tested against the torch reference).
#include "ddpm.cuh"

// Threads take groups g = global id, + stride, ... (a grid-stride loop: any grid covers any count).
#define EMU_FOR_EACH_GROUP(group, count)                                                          \
    for (unsigned long long group = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;     \
         group < ((count) + 3) / 4; group += (unsigned long long)gridDim.x * blockDim.x)

// The extern "C" entry points (unmangled names for cupy.RawModule.get_function).
#define EMU_DDPM_KERNELS(suffix, T)                                                                            \
    extern "C" __global__ void ddpm_step_##suffix(                                                             \
        const T* __restrict__ noisy, const T* __restrict__ predicted_noise,                                    \
        const T* __restrict__ reciprocal_sqrt_alpha, const T* __restrict__ noise_coefficient,                  \
        const T* __restrict__ posterior_std, T* __restrict__ out, unsigned long long count,                    \
        unsigned long long per_sample, unsigned long long seed, unsigned long long offset) {                   \
        EMU_FOR_EACH_GROUP(group, count)                                                                       \
        emu_ddpm_step_group<T>(group, noisy, predicted_noise, (const T*)nullptr, reciprocal_sqrt_alpha,        \
                               noise_coefficient, posterior_std, out, count, per_sample, seed, offset);        \
    }                                                                                                          \
    extern "C" __global__ void ddpm_step_noise_##suffix(                                                       \
        const T* __restrict__ noisy, const T* __restrict__ predicted_noise, const T* __restrict__ noise,       \
        const T* __restrict__ reciprocal_sqrt_alpha, const T* __restrict__ noise_coefficient,                  \
        const T* __restrict__ posterior_std, T* __restrict__ out, unsigned long long count,                    \
        unsigned long long per_sample) {                                                                       \
        EMU_FOR_EACH_GROUP(group, count)                                                                       \
        emu_ddpm_step_group<T>(group, noisy, predicted_noise, noise, reciprocal_sqrt_alpha, noise_coefficient, \
                               posterior_std, out, count, per_sample, 0ull, 0ull);                             \
    }                                                                                                          \
    extern "C" __global__ void add_noise_##suffix(                                                             \
        const T* __restrict__ clean, const T* __restrict__ noise, const T* __restrict__ signal_scale,          \
        const T* __restrict__ noise_scale, T* __restrict__ out, unsigned long long count,                      \
        unsigned long long per_sample) {                                                                       \
        EMU_FOR_EACH_GROUP(group, count)                                                                       \
        emu_add_noise_group<T>(group, clean, noise, signal_scale, noise_scale, out, (T*)nullptr, count,        \
                               per_sample, 0ull, 0ull);                                                        \
    }                                                                                                          \
    extern "C" __global__ void add_noise_philox_##suffix(                                                      \
        const T* __restrict__ clean, const T* __restrict__ signal_scale, const T* __restrict__ noise_scale,    \
        T* __restrict__ out, T* __restrict__ noise_out, unsigned long long count, unsigned long long per_sample, \
        unsigned long long seed, unsigned long long offset) {                                                  \
        EMU_FOR_EACH_GROUP(group, count)                                                                       \
        emu_add_noise_group<T>(group, clean, (const T*)nullptr, signal_scale, noise_scale, out, noise_out,     \
                               count, per_sample, seed, offset);                                               \
    }                                                                                                          \
    extern "C" __global__ void tweedie_##suffix(                                                               \
        const T* __restrict__ noisy, const T* __restrict__ predicted_noise, const T* __restrict__ signal_scale, \
        const T* __restrict__ noise_scale, T* __restrict__ out, unsigned long long count,                      \
        unsigned long long per_sample) {                                                                       \
        EMU_FOR_EACH_GROUP(group, count)                                                                       \
        emu_tweedie_group<T>(group, noisy, predicted_noise, signal_scale, noise_scale, out, count, per_sample); \
    }                                                                                                          \
    extern "C" __global__ void philox_normal_##suffix(T* __restrict__ out, unsigned long long count,           \
                                                      unsigned long long seed, unsigned long long offset) {    \
        EMU_FOR_EACH_GROUP(group, count)                                                                       \
        emu_philox_normal_group<T>(group, out, count, seed, offset);                                           \
    }

EMU_DDPM_KERNELS(f32, float)
EMU_DDPM_KERNELS(f64, double)
