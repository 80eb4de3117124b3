// Macros shared by emu's CUDA sources, so that one source compiles three ways:
//   NVRTC (cupy.RawModule, at run time)      __CUDACC_RTC__ defined
//   nvcc -ptx (CI, no GPU needed)             __CUDACC__ defined
//   g++ -x c++ (host tests through ctypes)    neither: kernels become plain C functions and the
//                                             grid-stride loop a serial loop over the same indices
// so the CPU tests call the very kernel entry points the GPU runs, index arithmetic included.
#ifndef EMU_COMMON_CUH
#define EMU_COMMON_CUH

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define EMU_DEVICE_COMPILE 1
#endif

// Per-element functions: inlined on both sides. Same definition as kernels/philox.cuh (an identical
// redefinition is legal, so either header may come first).
#ifndef EMU_HD
#if defined(EMU_DEVICE_COMPILE)
#define EMU_HD __host__ __device__ __forceinline__
#else
#define EMU_HD static inline
#endif
#endif

// A kernel entry point with C linkage (unmangled, so CuPy's get_function and ctypes find it by name).
#if defined(EMU_DEVICE_COMPILE)
#define EMU_KERNEL extern "C" __global__ void
#else
#define EMU_KERNEL extern "C" void
#endif

// `for (i ...)` over [0, count): a grid-stride loop on the GPU (any launch size covers every element
// exactly once), a plain loop on the host. 64-bit indices: batch * layers * n^2 passes 2^31 at 512^2.
#if defined(EMU_DEVICE_COMPILE)
#define EMU_FOR_EACH(i, count)                                                              \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)(count); \
         i += (long long)blockDim.x * gridDim.x)
#else
#define EMU_FOR_EACH(i, count) for (long long i = 0; i < (long long)(count); ++i)
#endif

#endif  // EMU_COMMON_CUH
