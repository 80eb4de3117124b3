"""
    EmuCUDAExt

Emu on NVIDIA GPUs, loaded automatically by `using CUDA` (CUDA.jl is a weak dependency, so CPU
users never install it). Adds the `CuArray` methods of Emu's device layer: `activate!` and arrays
for `GPU(n)` (CUDA device n), CUFFT plans (which take no FFTW flags), the KernelAbstractions
backend for the DDPM kernels, and the host/device test of `copy_into!`. Everything else
(equations, steppers, kernels) is Emu's own generic code.

From Python, torch/CuPy memory reaches these methods wrapped as `CuArray`s
(`unsafe_wrap(CuArray, pointer, dims)`, after `CUDA.device!` of the tensor's device); CUDA.jl runs
on its own stream, so the caller synchronises torch before the call, and every Emu entry point
synchronises the device before returning. That makes the Julia DDPM kernels on a GPU a
correctness path, not a fast one: from Python, DDPM calls on CUDA tensors run emu's CuPy kernels
on torch's stream instead (python/emu/julia.py, `fused_ddpm_step`).
"""
module EmuCUDAExt

using CUDA: CUDA, CuArray
using Emu: Emu

"""
    Emu.activate!(device::GPU) -> device

Checks `device.index` against the GPUs CUDA.jl sees (twin of the index check of
`emu.backends.torch_device`) and makes it this task's device (`CUDA.device!`, 0-based), so the
arrays, plans and kernels that follow live on it.
"""
function Emu.activate!(device::Emu.GPU)
    count = length(CUDA.devices())
    0 <= device.index < count ||
        throw(ArgumentError(
            "device cuda:$(device.index): this machine has $count CUDA device(s), " *
                "cuda:0..cuda:$(count - 1) (CUDA_VISIBLE_DEVICES renumbers them)",
        ))
    CUDA.device!(device.index)
    return device
end

function Emu.device_array(device::Emu.GPU, ::Type{T}, dims::Dims) where {T}
    Emu.activate!(device)
    return CuArray{T}(undef, dims)
end

Emu.rfft_plan(physical::CuArray, dims, _flags) = CUDA.CUFFT.plan_rfft(physical, dims)

Emu.brfft_plan(spectral::CuArray, n::Integer, dims, _flags) = CUDA.CUFFT.plan_brfft(
    spectral,
    n,
    dims,
)

Emu.kernel_backend(::CuArray) = CUDA.CUDABackend()

Emu.on_host(::CuArray) = false

end # module
