"""
    Emu

Julia side of emu: the two pseudospectral solvers (Kolmogorov flow and two-layer QG) and the fused
DDPM kernels, callable from Python through juliacall and usable from Julia directly.

Every function is a twin of a Python function of `python/emu` (named in its docstring): same
configs and presets, same equations, same time steppers and start-up steps, same filters, same
noise convention. What differs is said where it differs (random initial conditions draw other
numbers; a problem holds a fixed batch size).

Layout: a C-ordered numpy array `(batch, [layer], ny, nx)` is the same memory as the Julia array
`(nx, ny, [layer], batch)`: x fastest, batch last. `rfft` over dims `(1, 2)` halves `x`, giving
`(nx ÷ 2 + 1, ny, [layer], batch)`, which matches numpy's rfft2 over the last two axes.

Arrays: CPU `Array`s with FFTW plans, or CUDA `CuArray`s once `using CUDA` loads the extension
`EmuCUDAExt` (CUFFT plans, the same KernelAbstractions kernels). Float32 and Float64.
"""
module Emu

using FFTW: FFTW
using JSON3: JSON3
using KernelAbstractions: KernelAbstractions, @index, @kernel
using LinearAlgebra: mul!
using Random: Random

include("config.jl")
include("grid.jl")
include("devices.jl")
include("kolmogorov.jl")
include("qg.jl")
include("time_stepping.jl")
include("problem.jl")
include("philox.jl")
include("ddpm.jl")

# Configs and spectral operators.
export ConfigError,
    SystemConfig,
    KolmogorovConfig,
    QGConfig,
    make_config,
    config_from_json,
    to_dict
export angular_wavenumbers, rfft_weights, two_thirds_mask, jax_cfd_mask, exponential_filter
export isotropic_spectrum, Grid
# Devices, equations, steppers, problems.
export CPU,
    GPU,
    KolmogorovEquation,
    QGEquation,
    CrankNicolsonRK4,
    AdamsBashforth3,
    RungeKutta4
export Problem,
    KolmogorovProblem,
    QGProblem,
    BlowUpError,
    step!,
    run!,
    initial_condition,
    get_fields
export make_stepper, cosine_schedule
export energy, enstrophy, kinetic_energy_spectrum, layer_energy
# The API the Python bridge calls.
export make_problem, set_fields!, stepforward!, get_fields!, courant_number, all_finite
export ddpm_step!, add_noise!, tweedie!, philox4x32_10, philox_normal!, philox_normal

end # module
