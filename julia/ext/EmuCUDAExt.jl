"""
    EmuCUDAExt

Emu on NVIDIA GPUs, loaded automatically by `using CUDA` (CUDA.jl is a weak dependency, so CPU
users never install it). Adds the `CuArray` methods of Emu's device layer: arrays for `GPU()`,
CUFFT plans (which take no FFTW flags), the KernelAbstractions backend for the DDPM kernels, and
the host/device test of `copy_into!`. Everything else (equations, steppers, kernels) is Emu's own
generic code.

From Python, torch/CuPy memory reaches these methods wrapped as `CuArray`s
(`unsafe_wrap(CuArray, pointer, dims)`); CUDA.jl runs on its own stream, so the caller synchronises
torch before the call, and every Emu entry point synchronises the device before returning.
"""
module EmuCUDAExt

using CUDA: CUDA, CuArray
using Emu: Emu

Emu.device_array(::Emu.GPU, ::Type{T}, dims::Dims) where {T} = CuArray{T}(undef, dims)

Emu.rfft_plan(physical::CuArray, dims, _flags) = CUDA.CUFFT.plan_rfft(physical, dims)

Emu.brfft_plan(spectral::CuArray, n::Integer, dims, _flags) = CUDA.CUFFT.plan_brfft(
    spectral,
    n,
    dims,
)

Emu.kernel_backend(::CuArray) = CUDA.CUDABackend()

Emu.on_host(::CuArray) = false

end # module
