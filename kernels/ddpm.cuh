// Per-element arithmetic of the fused DDPM kernels (kernels/ddpm.cu), shared with the host tests.
//
// With the tables of a noise schedule at each sample's level t (python/emu/diffusion/schedules.py;
// Ho, Jain & Abbeel 2020, eqs. 4, 11 and Alg. 2):
//
//   reverse step  x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t/sqrt(1 - alpha_bar_t) eps_hat) + sigma_t z
//   add noise     x_t     = sqrt(alpha_bar_t) x_clean + sqrt(1 - alpha_bar_t) z
//   Tweedie       x_clean ~ (x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t)
//
// Each kernel thread handles one Philox group of 4 consecutive elements through the emu_*_group
// functions below. The host tests build ddpm.cu itself with g++ (tests/kernel_harness.cpp), so the
// grouping, the tail handling and the per-sample indexing are tested on the CPU too (only the GPU's
// vector loads differ).
//
// The coefficients arrive already rounded to the element type (computed in double by the schedule,
// exactly as the torch reference gathers them). Each operation is rounded separately, in the order
// of the torch reference (emu.diffusion.ddpm), with no fused multiply-add: on the GPU through the
// explicitly rounded intrinsics (__fmul_rn, ... which nvcc never contracts), on the host with
// -ffp-contract=off. The kernels therefore reproduce torch's eager result bit for bit given the same
// coefficients and noise, and the host tests can demand exact equality.
#ifndef EMU_DDPM_CUH
#define EMU_DDPM_CUH

#include "philox.cuh"

// One correctly rounded operation, never contracted into an FMA. The body, not the declaration,
// differs between the device pass (__CUDA_ARCH__) and the host pass.
#if defined(__CUDA_ARCH__)
#define EMU_ROUNDED_OP(name, type, intrinsic, op) \
    EMU_HD type name(type a, type b) { return intrinsic(a, b); }
#else
#define EMU_ROUNDED_OP(name, type, intrinsic, op) \
    EMU_HD type name(type a, type b) { return a op b; }
#endif
EMU_ROUNDED_OP(emu_mul, float, __fmul_rn, *)
EMU_ROUNDED_OP(emu_add, float, __fadd_rn, +)
EMU_ROUNDED_OP(emu_sub, float, __fsub_rn, -)
EMU_ROUNDED_OP(emu_div, float, __fdiv_rn, /)
EMU_ROUNDED_OP(emu_mul, double, __dmul_rn, *)
EMU_ROUNDED_OP(emu_add, double, __dadd_rn, +)
EMU_ROUNDED_OP(emu_sub, double, __dsub_rn, -)
EMU_ROUNDED_OP(emu_div, double, __ddiv_rn, /)
#undef EMU_ROUNDED_OP

// x_{t-1} = rsa (x - nc eps_hat) + sigma z, where rsa = 1/sqrt(alpha_t), nc = beta_t/sqrt(1 - alpha_bar_t),
// sigma = the posterior std (0 at t = 0, so the last step returns the mean exactly).
template <typename T>
EMU_HD T emu_ddpm_step(T noisy, T predicted_noise, T noise, T reciprocal_sqrt_alpha, T noise_coefficient,
                       T posterior_std) {
    const T mean = emu_mul(reciprocal_sqrt_alpha, emu_sub(noisy, emu_mul(noise_coefficient, predicted_noise)));
    return emu_add(mean, emu_mul(posterior_std, noise));
}

// x_t = sqrt(alpha_bar_t) x_clean + sqrt(1 - alpha_bar_t) z.
template <typename T>
EMU_HD T emu_add_noise(T clean, T noise, T signal_scale, T noise_scale) {
    return emu_add(emu_mul(signal_scale, clean), emu_mul(noise_scale, noise));
}

// E[x_clean | x_t] ~ (x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t).
template <typename T>
EMU_HD T emu_tweedie(T noisy, T predicted_noise, T signal_scale, T noise_scale) {
    return emu_div(emu_sub(noisy, emu_mul(noise_scale, predicted_noise)), signal_scale);
}

// -- one group of 4 elements -------------------------------------------------------------------------
// Arrays are C-contiguous with `count` elements; sample b owns [b * per_sample, (b + 1) * per_sample),
// and its coefficients sit at index b. Group g covers elements 4g .. 4g + 3 (the last may be partial).

// Loads the group's elements: 16-byte vector loads on the GPU when the group is whole and the pointer
// aligned, element loads otherwise (tail, unaligned views, host). Lanes past `count` read 0.
EMU_HD void emu_load4(const float* data, unsigned long long base, unsigned long long count, float v[4]) {
#if defined(__CUDA_ARCH__)
    if (base + 4 <= count && (reinterpret_cast<unsigned long long>(data) & 15ull) == 0) {
        const float4 q = __ldg(reinterpret_cast<const float4*>(data + base));
        v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
        return;
    }
#endif
    for (int j = 0; j < 4; ++j) v[j] = base + j < count ? data[base + j] : 0.0f;
}

EMU_HD void emu_load4(const double* data, unsigned long long base, unsigned long long count, double v[4]) {
#if defined(__CUDA_ARCH__)
    if (base + 4 <= count && (reinterpret_cast<unsigned long long>(data) & 15ull) == 0) {
        const double2 a = __ldg(reinterpret_cast<const double2*>(data + base));
        const double2 b = __ldg(reinterpret_cast<const double2*>(data + base + 2));
        v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
        return;
    }
#endif
    for (int j = 0; j < 4; ++j) v[j] = base + j < count ? data[base + j] : 0.0;
}

// Stores the group's elements (lanes past `count` are not written).
EMU_HD void emu_store4(float* data, unsigned long long base, unsigned long long count, const float v[4]) {
#if defined(__CUDA_ARCH__)
    if (base + 4 <= count && (reinterpret_cast<unsigned long long>(data) & 15ull) == 0) {
        *reinterpret_cast<float4*>(data + base) = make_float4(v[0], v[1], v[2], v[3]);
        return;
    }
#endif
    for (int j = 0; j < 4; ++j)
        if (base + j < count) data[base + j] = v[j];
}

EMU_HD void emu_store4(double* data, unsigned long long base, unsigned long long count, const double v[4]) {
#if defined(__CUDA_ARCH__)
    if (base + 4 <= count && (reinterpret_cast<unsigned long long>(data) & 15ull) == 0) {
        *reinterpret_cast<double2*>(data + base) = make_double2(v[0], v[1]);
        *reinterpret_cast<double2*>(data + base + 2) = make_double2(v[2], v[3]);
        return;
    }
#endif
    for (int j = 0; j < 4; ++j)
        if (base + j < count) data[base + j] = v[j];
}

// The sample index of each of the group's elements: one 64-bit division per group, not per element.
// Lanes past `count` repeat the last lane's sample, so their (discarded) coefficient reads stay in
// bounds and the samples stay nondecreasing.
EMU_HD void emu_samples4(unsigned long long base, unsigned long long count, unsigned long long per_sample,
                         unsigned long long sample[4]) {
    // 32-bit division when both fit (the usual case): several times cheaper than 64-bit on the GPU.
    unsigned long long b = ((base | per_sample) >> 32) == 0
                               ? (unsigned long long)((unsigned int)base / (unsigned int)per_sample)
                               : base / per_sample;
    unsigned long long r = base - b * per_sample;
    for (int j = 0; j < 4; ++j) {
        sample[j] = base + j < count ? b : sample[j - 1];  // lane 0 is always in range
        if (++r == per_sample) {
            r = 0;
            ++b;
        }
    }
}

// Per-sample values of the group's elements: one load when all 4 lie in one sample (the samples are
// nondecreasing, so the first and last lanes decide), else one per lane.
template <typename T>
EMU_HD void emu_per_sample4(const T* values, const unsigned long long sample[4], T v[4]) {
    if (sample[0] == sample[3]) {
        v[0] = v[1] = v[2] = v[3] = values[sample[0]];
        return;
    }
    for (int j = 0; j < 4; ++j) v[j] = values[sample[j]];
}

// The group's noise z, each rounded once from double to T (emu's convention, philox.cuh).
template <typename T>
EMU_HD void emu_philox_group(unsigned long long group, unsigned long long seed, unsigned long long offset, T z[4]) {
    double normals[4];
    emu_philox_normal4(group, seed, offset, normals);
    for (int j = 0; j < 4; ++j) z[j] = (T)normals[j];
}

// Reverse step of group `group`; z is drawn in place (noise == nullptr) or read from `noise`.
template <typename T>
EMU_HD void emu_ddpm_step_group(unsigned long long group, const T* noisy, const T* predicted_noise, const T* noise,
                                const T* reciprocal_sqrt_alpha, const T* noise_coefficient, const T* posterior_std,
                                T* out, unsigned long long count, unsigned long long per_sample,
                                unsigned long long seed, unsigned long long offset) {
    const unsigned long long base = 4 * group;
    T x[4], eps[4], z[4], y[4];
    unsigned long long sample[4];
    emu_load4(noisy, base, count, x);
    emu_load4(predicted_noise, base, count, eps);
    if (noise == nullptr) {
        emu_philox_group<T>(group, seed, offset, z);
    } else {
        emu_load4(noise, base, count, z);
    }
    T c1[4], c2[4], sigma[4];
    emu_samples4(base, count, per_sample, sample);
    emu_per_sample4(reciprocal_sqrt_alpha, sample, c1);
    emu_per_sample4(noise_coefficient, sample, c2);
    emu_per_sample4(posterior_std, sample, sigma);
    for (int j = 0; j < 4; ++j) y[j] = emu_ddpm_step<T>(x[j], eps[j], z[j], c1[j], c2[j], sigma[j]);
    emu_store4(out, base, count, y);
}

// Noising of group `group` to each sample's level; z drawn in place (noise == nullptr, then also
// written to noise_out unless that is nullptr) or read from `noise`.
template <typename T>
EMU_HD void emu_add_noise_group(unsigned long long group, const T* clean, const T* noise, const T* signal_scale,
                                const T* noise_scale, T* out, T* noise_out, unsigned long long count,
                                unsigned long long per_sample, unsigned long long seed, unsigned long long offset) {
    const unsigned long long base = 4 * group;
    T x[4], z[4], y[4];
    unsigned long long sample[4];
    emu_load4(clean, base, count, x);
    if (noise == nullptr) {
        emu_philox_group<T>(group, seed, offset, z);
        if (noise_out != nullptr) emu_store4(noise_out, base, count, z);
    } else {
        emu_load4(noise, base, count, z);
    }
    T signal[4], noise_level[4];
    emu_samples4(base, count, per_sample, sample);
    emu_per_sample4(signal_scale, sample, signal);
    emu_per_sample4(noise_scale, sample, noise_level);
    for (int j = 0; j < 4; ++j) y[j] = emu_add_noise<T>(x[j], z[j], signal[j], noise_level[j]);
    emu_store4(out, base, count, y);
}

// Tweedie's estimate of group `group`.
template <typename T>
EMU_HD void emu_tweedie_group(unsigned long long group, const T* noisy, const T* predicted_noise,
                              const T* signal_scale, const T* noise_scale, T* out, unsigned long long count,
                              unsigned long long per_sample) {
    const unsigned long long base = 4 * group;
    T x[4], eps[4], y[4];
    unsigned long long sample[4];
    emu_load4(noisy, base, count, x);
    emu_load4(predicted_noise, base, count, eps);
    T signal[4], noise_level[4];
    emu_samples4(base, count, per_sample, sample);
    emu_per_sample4(signal_scale, sample, signal);
    emu_per_sample4(noise_scale, sample, noise_level);
    for (int j = 0; j < 4; ++j) y[j] = emu_tweedie<T>(x[j], eps[j], signal[j], noise_level[j]);
    emu_store4(out, base, count, y);
}

// Standard normal noise of group `group`.
template <typename T>
EMU_HD void emu_philox_normal_group(unsigned long long group, T* out, unsigned long long count,
                                    unsigned long long seed, unsigned long long offset) {
    T z[4];
    emu_philox_group<T>(group, seed, offset, z);
    emu_store4(out, 4 * group, count, z);
}

#endif  // EMU_DDPM_CUH
