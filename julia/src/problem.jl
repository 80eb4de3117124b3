# Problems: an equation, a stepper and the spectral state, with the API the Python bridge calls
# (`make_problem`, `set_fields!`, `stepforward!`, `get_fields!`, `courant_number`, `all_finite`)
# and a Julia-native one in the FourierFlows style (`Problem`, `KolmogorovProblem`, `QGProblem`,
# `step!`, `run!`, diagnostics). Plays the part of python/emu/runs.py's solver set-up and of
# python/emu/solvers/integrate.py.

"""
    Problem

A batch of `batch` solutions of one system: `equation` (constants, buffers, FFT plans), `stepper`
(scheme, history), `state` (the spectral state ŝ, complex, batch last), `steps` and `time` since
the fields were last set. Build one with `Problem(config; ...)`, `KolmogorovProblem(...)`,
`QGProblem(...)` or, from Python, `make_problem`.
"""
mutable struct Problem{E, S, A}
    equation::E
    stepper::S
    state::A
    device::Device
    steps::Int
    time::Float64
end

"""
    Problem(config; batch=1, T=Float64, device=CPU(), stepper=nothing, planner="FFTW_MEASURE",
            seed=nothing)

A problem for `config` (`KolmogorovConfig` or `QGConfig`) holding `batch` solutions in precision
`T` on `device`, stepped by the system's default stepper (or `stepper`: "cn_rk4", "ab3", "rk4")
with `config.dt`. `planner` picks FFTW's planning effort on the CPU ("FFTW_ESTIMATE" gives the
same plans, hence bit-identical results, in every process). With `seed`, the state starts from
`initial_condition(equation, seed)`; without, it is zero until `set_fields!`.
"""
function Problem(
    config::SystemConfig;
    batch::Integer = 1,
    T::Type{<:AbstractFloat} = Float64,
    device::Device = CPU(),
    stepper = nothing,
    planner::AbstractString = "FFTW_MEASURE",
    seed = nothing,
)
    T in (Float32, Float64) || throw(ArgumentError("T must be Float32 or Float64, got $T"))
    flags = fftw_flags(planner)
    # Buffers and CUFFT plans are made on the task's current GPU: make it the problem's.
    activate!(device)
    equation = config isa KolmogorovConfig ?
        KolmogorovEquation(config, batch, T, device; flags = flags) :
        QGEquation(config, batch, T, device; flags = flags)
    state = device_array(device, Complex{T}, state_size(equation))
    fill!(state, zero(Complex{T}))
    problem = Problem(
        equation,
        make_stepper(equation, config.dt, state; name = stepper),
        state,
        device,
        0,
        0.0,
    )
    seed === nothing || set_fields!(problem, initial_condition(equation, seed))
    return problem
end

"""
    KolmogorovProblem(device=CPU(); batch=1, T=Float64, preset="re1000", stepper=nothing,
                      planner="FFTW_MEASURE", seed=nothing, parameters...)

A Kolmogorov-flow problem; `parameters` are `KolmogorovConfig` fields (`grid_size`, `viscosity`,
`dt`, ...) overriding the preset.
"""
function KolmogorovProblem(
    device::Device = CPU();
    batch::Integer = 1,
    T::Type{<:AbstractFloat} = Float64,
    preset = nothing,
    stepper = nothing,
    planner::AbstractString = "FFTW_MEASURE",
    seed = nothing,
    parameters...,
)
    config = make_config("kolmogorov"; preset = preset, parameters...)
    return Problem(config; batch, T, device, stepper, planner, seed)
end

"""
    QGProblem(device=CPU(); batch=1, T=Float64, preset="eddy", stepper=nothing,
              planner="FFTW_MEASURE", seed=nothing, parameters...)

A two-layer QG problem; `parameters` are `QGConfig` fields overriding the preset.
"""
function QGProblem(
    device::Device = CPU();
    batch::Integer = 1,
    T::Type{<:AbstractFloat} = Float64,
    preset = nothing,
    stepper = nothing,
    planner::AbstractString = "FFTW_MEASURE",
    seed = nothing,
    parameters...,
)
    config = make_config("qg"; preset = preset, parameters...)
    return Problem(config; batch, T, device, stepper, planner, seed)
end

# -- the API the Python bridge calls -------------------------------------------------------------

"""
    make_problem(config_json, batch, dtype, device; planner=ENV["EMU_FFTW_PLANNER"] or "FFTW_MEASURE")

A `Problem` from Python's `config.to_json()`, `batch`, `dtype` ("float32"/"float64") and `device`
("cpu", or "cuda"/"cuda:N" when CUDA.jl is loaded: see `make_device`), with the system's default
stepper. The planner follows Python's `FFTWPlans`: `EMU_FFTW_PLANNER` when set, else FFTW_MEASURE;
pass `planner="FFTW_ESTIMATE"` where Python uses `reproducible=True`.
"""
function make_problem(
    config_json::AbstractString,
    batch::Integer,
    dtype::AbstractString,
    device::AbstractString;
    planner::AbstractString = get(ENV, "EMU_FFTW_PLANNER", "FFTW_MEASURE"),
)
    config = config_from_json(config_json)
    batch >= 1 || throw(ArgumentError("batch must be an integer >= 1, got $batch"))
    return Problem(
        config;
        batch = batch,
        T = float_type(dtype),
        device = make_device(device),
        planner = planner,
    )
end

"""
    set_fields!(problem, fields) -> problem

Sets the state from physical fields, Julia layout `(nx, ny, batch)` (Kolmogorov) or
`(nx, ny, 2, batch)` (QG), any float type, host (e.g. a zero-copy `PyArray`) or device. The data are
copied into Julia-owned buffers; the stepper restarts (level 0, no history), as Python's
`stepper.init(equation.to_state(fields))`.
"""
function set_fields!(problem::Problem, fields::AbstractArray)
    activate!(problem.device)
    to_state!(problem.state, problem.equation, fields)
    init!(problem.stepper)
    problem.steps = 0
    problem.time = 0.0
    synchronize_arrays(problem.state)
    return problem
end

"""
    stepforward!(problem, num_steps=1) -> problem

Advances the state by `num_steps` steps (no blow-up checks: see `run!`, `courant_number`,
`all_finite`). Returns after the device has finished.
"""
function stepforward!(problem::Problem, num_steps::Integer = 1)
    num_steps >= 0 || throw(ArgumentError("num_steps must be >= 0, got $num_steps"))
    activate!(problem.device)
    for _ in 1:num_steps
        step!(problem.stepper, problem.equation, problem.state)
    end
    problem.steps += num_steps
    problem.time += num_steps * problem.equation.config.dt
    synchronize_arrays(problem.state)
    return problem
end

"""
    get_fields!(out, problem) -> out

Writes the physical fields (Julia layout, see `set_fields!`) into `out`, an array allocated by the
caller (a `PyArray` from Python, any float type, host or device), and returns it. Twin of
`equation.fields(state)`.
"""
function get_fields!(out::AbstractArray, problem::Problem)
    expected = fields_size(problem.equation)
    size(out) == expected ||
        throw(DimensionMismatch("out must have size $expected, got $(size(out))"))
    activate!(problem.device)
    fields!(out, problem.equation, problem.state)
    synchronize_arrays(out)
    return out
end

"""
    get_fields(problem) -> Array

The physical fields as a new host array in the problem's precision.
"""
function get_fields(problem::Problem)
    return get_fields!(
        Array{real_type(problem.equation)}(undef, fields_size(problem.equation)),
        problem,
    )
end

"""
    courant_number(problem) -> Float64

max |u| dt / dx over the batch (and layers), Python's `equation.cfl(state)`.
"""
function courant_number(problem::Problem)
    activate!(problem.device)
    return cfl(problem.equation, problem.state)
end

"""
    all_finite(problem) -> Bool

Whether the spectral state holds no NaN or Inf (Python's `backend.all_finite(state_hat)`).
"""
function all_finite(problem::Problem)
    activate!(problem.device)
    return all(isfinite, problem.state)
end

"Waits for the device that holds `array` (a no-op on the CPU)."
synchronize_arrays(array::AbstractArray) = KernelAbstractions.synchronize(kernel_backend(
    array,
))

# -- Julia-native stepping and diagnostics -------------------------------------------------------

"""
    step!(problem) -> problem

One time step (`stepforward!(problem, 1)`).
"""
step!(problem::Problem) = stepforward!(problem, 1)

"""
    BlowUpError(message, step, reason, cfl)

The solution became non-finite (`reason = "non-finite"`) or the Courant number passed the config's
`max_cfl` (`"cfl"`). Twin of `emu.solvers.integrate.BlowUpError`.
"""
struct BlowUpError <: Exception
    message::String
    step::Int
    reason::String
    cfl::Float64
end

Base.showerror(io::IO, error::BlowUpError) = print(io, "BlowUpError: ", error.message)

"""
    check_state(problem, step) -> Float64

The Courant number, or throws `BlowUpError` for NaN/Inf or CFL > max_cfl. Twin of
`emu.solvers.integrate.check_state`.
"""
function check_state(problem::Problem, step::Integer)
    config = problem.equation.config
    if !all_finite(problem)
        throw(BlowUpError(
            "blow-up at step $step: the state holds NaN or inf",
            step,
            "non-finite",
            NaN,
        ))
    end
    number = courant_number(problem)
    if !isfinite(number) || number > config.max_cfl
        throw(BlowUpError(
            "blow-up at step $step: CFL number $(round(number; sigdigits = 3)) exceeds max_cfl = " *
                "$(config.max_cfl) (dt = $(config.dt)); lower dt or raise max_cfl",
            step,
            "cfl",
            number,
        ))
    end
    return number
end

"""
    run!(problem, num_steps; save_every=num_steps, on_save=nothing, check_every=nothing) -> problem

Advances `num_steps` steps, checking for blow-up (`check_state`) every `check_every` steps
(default min(save_every, 100)) and calling `on_save(problem, steps_done)` every `save_every` steps.
Twin of `emu.solvers.integrate.integrate`.
"""
function run!(
    problem::Problem,
    num_steps::Integer;
    save_every::Integer = max(num_steps, 1),
    on_save = nothing,
    check_every = nothing,
)
    (num_steps >= 0 && save_every >= 1) ||
        throw(ArgumentError(
            "num_steps must be >= 0 and save_every >= 1, got $num_steps, $save_every",
        ))
    check_every = check_every === nothing ? min(save_every, 100) : check_every
    done = 0
    while done < num_steps
        stepforward!(problem, 1)
        done += 1
        if done % save_every == 0 || done % check_every == 0
            check_state(problem, done)
            if done % save_every == 0 && on_save !== nothing
                on_save(problem, done)
            end
        end
    end
    return problem
end

"""
    initial_condition(problem, seed) -> Array{Float64}

The system's random initial fields for the problem's batch (see the equation methods).
"""
initial_condition(problem::Problem, seed::Integer) = initial_condition(
    problem.equation,
    seed,
)

"Domain-mean energy per sample (Kolmogorov: ½⟨|u|²⟩; QG: thickness-weighted KE)."
energy(problem::Problem) = energy(problem.equation, problem.state)

"Domain-mean enstrophy per sample (Kolmogorov: ½⟨ω²⟩; QG: thickness-weighted ½⟨q²⟩)."
enstrophy(problem::Problem) = enstrophy(problem.equation, problem.state)

"Isotropic kinetic-energy spectrum per sample: (k, E) with E of size (n ÷ 2, batch)."
kinetic_energy_spectrum(problem::Problem) = kinetic_energy_spectrum(
    problem.equation,
    problem.state,
)

"QG layer kinetic energies, size (2, batch)."
layer_energy(problem::Problem) = layer_energy(problem.equation, problem.state)
