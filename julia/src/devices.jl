# Devices: where arrays live, how FFT plans are built, which KernelAbstractions backend runs kernels.
# Plays the part of python/emu/backends.py (`get_backend`, `ArrayBackend.asarray`, `FFTWPlans`).
# The CPU methods are here; the CUDA methods are added by ext/EmuCUDAExt.jl when CUDA.jl is loaded.

"Where a problem's arrays live: `CPU()` (Julia `Array`s, FFTW) or `GPU()` (CUDA, needs `using CUDA`)."
abstract type Device end
struct CPU <: Device end
struct GPU <: Device end

"""
    cuda_loaded() -> Bool

Whether the CUDA extension `EmuCUDAExt` is active (CUDA.jl loaded in this session).
"""
cuda_loaded() = Base.get_extension(@__MODULE__, :EmuCUDAExt) !== nothing

"""
    make_device(name) -> Device

`"cpu"` or `"cuda"` (also `"cuda:0"`-style names, which select the current CUDA device). Twin of the
device check of `emu.backends.get_backend`; "cuda" fails with what to install when CUDA.jl is
not loaded.
"""
function make_device(name::AbstractString)
    name == "cpu" && return CPU()
    if name == "cuda" || startswith(name, "cuda:")
        cuda_loaded() ||
            error(
                "device \"cuda\" needs CUDA.jl: install it (`import Pkg; Pkg.add(\"CUDA\")`) and load it " *
                    "(`using CUDA`) before Emu's CUDA extension can run; CUDA.functional() must be true",
            )
        return GPU()
    end
    throw(ArgumentError("device must be \"cpu\" or \"cuda\", got $(repr(name))"))
end

"""
    float_type(dtype) -> Type

`"float32"` -> Float32, `"float64"` -> Float64 (twin of the dtype check of `get_backend`).
"""
function float_type(dtype::AbstractString)
    dtype == "float32" && return Float32
    dtype == "float64" && return Float64
    throw(ArgumentError(
        "dtype must be one of (\"float32\", \"float64\"), got $(repr(dtype))",
    ))
end

"""
    device_array(device, T, dims) -> uninitialised array

A fresh array of element type `T` on `device`. The CUDA method comes with `EmuCUDAExt`.
"""
device_array(::CPU, ::Type{T}, dims::Dims) where {T} = Array{T}(undef, dims)
function device_array(device::Device, ::Type{T}, dims::Dims) where {T}
    throw(ArgumentError(
        "no arrays for $device: load CUDA.jl (`using CUDA`) to activate Emu's CUDA extension",
    ))
end

"""
    to_device(device, host_array) -> array on device

A copy of a host array on `device` (twin of `ArrayBackend.asarray`; convert the element type first).
"""
function to_device(device::Device, host::AbstractArray)
    array = device_array(device, eltype(host), size(host))
    copyto!(array, host)
    return array
end

"""
    rfft_plan(physical, dims, flags)  /  brfft_plan(spectral, n, dims, flags)

Forward real FFT plan and unnormalised inverse (FFTW's "backward", to be scaled by 1/n²) over
`dims`, built on the very arrays they will run on. FFTW flags for CPU arrays (`FFTW.ESTIMATE` is
reproducible from process to process, `FFTW.MEASURE` faster); CUFFT plans (extension) take none.
Complex-to-real transforms destroy their input: callers hand them scratch buffers only.
"""
rfft_plan(physical::Array, dims, flags) = FFTW.plan_rfft(physical, dims; flags = flags)
brfft_plan(spectral::Array, n::Integer, dims, flags) = FFTW.plan_brfft(
    spectral,
    n,
    dims;
    flags = flags,
)

"""
    fftw_flags(planner) -> UInt32

`"FFTW_ESTIMATE"`/`"estimate"`, `"FFTW_MEASURE"`/`"measure"` or `"FFTW_PATIENT"` as FFTW flags;
twin of `FFTWPlans.planner` (Python reads `EMU_FFTW_PLANNER` the same way).
"""
function fftw_flags(planner::AbstractString)
    name = uppercase(replace(planner, "FFTW_" => "", "fftw_" => ""))
    name == "ESTIMATE" && return FFTW.ESTIMATE
    name == "MEASURE" && return FFTW.MEASURE
    name == "PATIENT" && return FFTW.PATIENT
    throw(ArgumentError(
        "planner must be one of FFTW_ESTIMATE, FFTW_MEASURE, FFTW_PATIENT, got $(repr(planner))",
    ))
end

"""
    kernel_backend(array) -> KernelAbstractions backend

The backend that runs kernels on `array`: KernelAbstractions' `CPU()` for every host array
(Julia `Array`s, juliacall's zero-copy `PyArray`s); `CUDABackend()` for `CuArray`s (extension).
"""
kernel_backend(::AbstractArray) = KernelAbstractions.CPU()

"""
    on_host(array) -> Bool

Whether `array` lives in host memory (false for `CuArray`s, extension).
"""
on_host(::AbstractArray) = true

"""
    copy_into!(destination, source) -> destination

Copies `source` (any array of the same size: a `PyArray`, another float type, host or device)
into `destination`, converting the element type; host data goes to a device through one
contiguous host copy.
"""
function copy_into!(destination::AbstractArray, source::AbstractArray)
    size(destination) == size(source) ||
        throw(DimensionMismatch(
            "expected an array of size $(size(destination)), got $(size(source))",
        ))
    if on_host(destination) == on_host(source)
        destination .= source
    else
        copyto!(destination, Array{eltype(destination)}(source))
    end
    return destination
end
