# Devices: where arrays live, how FFT plans are built, which KernelAbstractions backend runs kernels.
# Plays the part of python/emu/backends.py (`get_backend`, `ArrayBackend.asarray`, `FFTWPlans`).
# The CPU methods are here; the CUDA methods are added by ext/EmuCUDAExt.jl when CUDA.jl is loaded.

"Where a problem's arrays live: `CPU()` (Julia `Array`s, FFTW) or `GPU(n)` (CUDA, needs `using CUDA`)."
abstract type Device end
struct CPU <: Device end

"""
    GPU(index=0)

CUDA device `index`, 0-based as torch's `cuda:N` and `CUDA.device!(N)` (CUDA_VISIBLE_DEVICES
renumbers them). Every entry point that makes arrays or runs kernels on it first `activate!`s it,
so problems on different GPUs can live in one session.
"""
struct GPU <: Device
    index::Int
end
GPU() = GPU(0)

"""
    cuda_loaded() -> Bool

Whether the CUDA extension `EmuCUDAExt` is active (CUDA.jl loaded in this session).
"""
cuda_loaded() = Base.get_extension(@__MODULE__, :EmuCUDAExt) !== nothing

"""
    make_device(name) -> Device

`"cpu"`, `"cuda"` (device 0) or `"cuda:N"` (device N). Twin of `emu.backends.torch_device`, the
device check of `emu.backends.get_backend`: a malformed name or an index past the last GPU is an
`ArgumentError` naming the devices there are; "cuda" fails with what to install when CUDA.jl is
not loaded. The device is made current (`activate!`).
"""
function make_device(name::AbstractString)
    text = strip(name)
    occursin(r"^(cpu|cuda(:[0-9]+)?)$", text) ||
        throw(ArgumentError(
            "device must be \"cpu\", \"cuda\" or \"cuda:N\", got $(repr(name))",
        ))
    text == "cpu" && return CPU()
    cuda_loaded() ||
        error(
            "device \"$text\" needs CUDA.jl: install it (`import Pkg; Pkg.add(\"CUDA\")`) and load it " *
                "(`using CUDA`) before Emu's CUDA extension can run; CUDA.functional() must be true",
        )
    index = occursin(":", text) ? parse(Int, split(text, ":")[2]) : 0
    return activate!(GPU(index))
end

"""
    activate!(device) -> device

Makes `device` the current one of this task before arrays are made or kernels run on it: nothing
to do on the CPU; on a GPU (extension) checks the index against the GPUs CUDA.jl sees, then
`CUDA.device!(index)`. Without CUDA.jl, an error naming what to load.
"""
activate!(device::CPU) = device
function activate!(device::Device)
    throw(ArgumentError(
        "no arrays for $device: load CUDA.jl (`using CUDA`) to activate Emu's CUDA extension",
    ))
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

# Transforms smaller than this many complex outputs run on one thread: below it, waking threads
# costs more than it saves (64^2 grids). The value of Python's `FFTWPlans.threading_threshold`.
const FFTW_THREADING_THRESHOLD = 2^15

"""
    fftw_threads(spectral_length) -> Int

Threads of one CPU FFT plan whose complex side has `spectral_length` elements:
`EMU_FFTW_THREADS` when set (> 0), else `Threads.nthreads()` (`julia -t N`; from Python, emu's
`--threads`, 1 by default), and 1 below `FFTW_THREADING_THRESHOLD`. Twin of the thread count of
`FFTWPlans` (python/emu/backends.py: `__init__` and `_build`). FFTW.jl plans on one thread unless
told otherwise, hence the explicit `num_threads` of `rfft_plan`/`brfft_plan`.
"""
function fftw_threads(spectral_length::Integer)
    text = get(ENV, "EMU_FFTW_THREADS", "0")
    requested = tryparse(Int, text)
    (requested === nothing || requested < 0) &&
        throw(ArgumentError(
            "EMU_FFTW_THREADS must be an integer >= 0 (0: Julia's threads), got $(repr(text))",
        ))
    threads = requested > 0 ? requested : Threads.nthreads()
    return spectral_length >= FFTW_THREADING_THRESHOLD ? threads : 1
end

"""
    rfft_plan(physical, dims, flags)  /  brfft_plan(spectral, n, dims, flags)

Forward real FFT plan and unnormalised inverse (FFTW's "backward", to be scaled by 1/n²) over
`dims` (which start at 1), built on the very arrays they will run on. FFTW flags for CPU arrays
(`FFTW.ESTIMATE` is reproducible from process to process for one thread count, `FFTW.MEASURE`
faster), on `fftw_threads` threads; CUFFT plans (extension) take neither.
Complex-to-real transforms destroy their input: callers hand them scratch buffers only.
"""
rfft_plan(physical::Array, dims, flags) = FFTW.plan_rfft(
    physical,
    dims;
    flags = flags,
    num_threads = fftw_threads(
        length(physical) ÷ size(physical, 1) * (size(physical, 1) ÷ 2 + 1),
    ),
)
brfft_plan(spectral::Array, n::Integer, dims, flags) = FFTW.plan_brfft(
    spectral,
    n,
    dims;
    flags = flags,
    num_threads = fftw_threads(length(spectral)),
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
