// Philox4x32-10 counter-based generator and Box-Muller normals: emu's in-kernel noise.
//
// The CUDA C twin of python/emu/diffusion/philox.py, whose docstring defines the convention that
// every backend (numpy, CUDA C, Julia) follows bit for bit on the uint32 words:
//
//   element i of a C-ordered tensor: group g = i / 4, lane = i % 4
//   counter = (g mod 2^32, g div 2^32, offset mod 2^32, offset div 2^32)
//   key     = (seed mod 2^32, seed div 2^32)
//   (r0, r1, r2, r3) = philox4x32_10(counter, key)
//   u(r) = (r + 0.5) 2^-32 in (0, 1)
//   z[4g+0], z[4g+1] = sqrt(-2 ln u(r0)) (cos, sin)(2 pi u(r1))
//   z[4g+2], z[4g+3] = sqrt(-2 ln u(r2)) (cos, sin)(2 pi u(r3))
//
// Box-Muller is evaluated in double and rounded once to the output type, as in numpy.
//
// Philox4x32-10 (Salmon, Moraes, Dror & Shaw 2011, "Parallel random numbers: as easy as 1, 2, 3",
// SC'11; the Random123 library): ten rounds of
//   (hi0, lo0) = mulhilo(0xD2511F53, c0); (hi1, lo1) = mulhilo(0xCD9E8D57, c2)
//   c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
// with the key bumped by the Weyl constants (0x9E3779B9, 0xBB67AE85) before every round but the
// first. Known answer: counter 0, key 0 -> 6627e8d5 e169c58d bc57ac4c 9b00dbd8.
//
// Every function is __host__ __device__ under nvcc/NVRTC and a plain inline function under a host
// C/C++ compiler, so tests/kernel_harness.cpp runs this very code on the CPU against the numpy
// reference. Only builtin integer types are used (NVRTC has no <cstdint> here).
#ifndef EMU_PHILOX_CUH
#define EMU_PHILOX_CUH

#if !(defined(__CUDACC__) || defined(__CUDACC_RTC__))
#include <math.h>
#endif
#ifndef EMU_HD  // (kernels/emu_common.cuh defines the same)
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define EMU_HD __host__ __device__ __forceinline__
#else
#define EMU_HD static inline
#endif
#endif

#define EMU_PHILOX_M0 0xD2511F53u
#define EMU_PHILOX_M1 0xCD9E8D57u
#define EMU_PHILOX_W0 0x9E3779B9u
#define EMU_PHILOX_W1 0xBB67AE85u
#define EMU_TWO_PI 6.283185307179586   // the double nearest 2 pi, as numpy's 2.0 * np.pi
#define EMU_TWO_POW_MINUS_32 2.3283064365386963e-10  // 2^-32, exact

// Four 32-bit words: a Philox counter or output block.
typedef struct {
    unsigned int x, y, z, w;
} emu_philox_words;

// The high and low 32-bit halves of the 64-bit product a * b (compiles to mul.hi/mul.lo on the GPU).
EMU_HD void emu_mulhilo32(unsigned int a, unsigned int b, unsigned int* hi, unsigned int* lo) {
    const unsigned long long product = (unsigned long long)a * (unsigned long long)b;
    *hi = (unsigned int)(product >> 32);
    *lo = (unsigned int)product;
}

// Philox4x32-10 of counter (c0, c1, c2, c3) under key (k0, k1).
EMU_HD emu_philox_words emu_philox4x32_10(emu_philox_words counter, unsigned int k0, unsigned int k1) {
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {  // key schedule: bump before every round but the first
            k0 += EMU_PHILOX_W0;
            k1 += EMU_PHILOX_W1;
        }
        unsigned int hi0, lo0, hi1, lo1;
        emu_mulhilo32(EMU_PHILOX_M0, counter.x, &hi0, &lo0);
        emu_mulhilo32(EMU_PHILOX_M1, counter.z, &hi1, &lo1);
        emu_philox_words next;
        next.x = hi1 ^ counter.y ^ k0;
        next.y = lo1;
        next.z = hi0 ^ counter.w ^ k1;
        next.w = lo0;
        counter = next;
    }
    return counter;
}

// The four uint32 words of group `group` at call `offset` under `seed` (emu's convention).
EMU_HD emu_philox_words emu_philox_group_words(unsigned long long group, unsigned long long seed,
                                               unsigned long long offset) {
    emu_philox_words counter;
    counter.x = (unsigned int)group;
    counter.y = (unsigned int)(group >> 32);
    counter.z = (unsigned int)offset;
    counter.w = (unsigned int)(offset >> 32);
    return emu_philox4x32_10(counter, (unsigned int)seed, (unsigned int)(seed >> 32));
}

// u(r) = (r + 0.5) 2^-32, in the open interval (0, 1); exact in double.
EMU_HD double emu_uniform_open(unsigned int r) {
    return ((double)r + 0.5) * EMU_TWO_POW_MINUS_32;
}

// Box-Muller in double: sqrt(-2 ln u(r_radius)) (cos, sin)(2 pi u(r_angle)).
EMU_HD void emu_box_muller(unsigned int r_radius, unsigned int r_angle, double* z_cos, double* z_sin) {
    const double radius = sqrt(-2.0 * log(emu_uniform_open(r_radius)));
    const double angle = EMU_TWO_PI * emu_uniform_open(r_angle);
    *z_cos = radius * cos(angle);
    *z_sin = radius * sin(angle);
}

// The four standard normals (double) of group `group`: z[4 group + 0 .. 3].
EMU_HD void emu_philox_normal4(unsigned long long group, unsigned long long seed, unsigned long long offset,
                               double z[4]) {
    const emu_philox_words r = emu_philox_group_words(group, seed, offset);
    emu_box_muller(r.x, r.y, &z[0], &z[1]);
    emu_box_muller(r.z, r.w, &z[2], &z[3]);
}

#endif  // EMU_PHILOX_CUH
