# Time steppers, apart from the equations they step.
# Twin of python/emu/solvers/time_stepping.py. An equation offers `explicit_terms!(out, equation,
# state)`, `linear_operator(equation)` (a real array broadcastable against the state, or nothing)
# and `step_filter(equation)`. A stepper owns its scratch and history buffers and advances a state
# in place with `step!(stepper, equation, state)`; its `level` (steps since `init!`) plays the part
# of Python's `StepperState.level` and, with the buffers, of `StepperState.history`.
#
# Scalars enter the broadcasts in the state's precision, as numpy's weak Python scalars do
# (`T(beta) .* h` is Python's `beta * h` on a complex64 array).

abstract type Stepper end

"""
    CrankNicolsonRK4(equation, dt, state)

jax-cfd's `crank_nicolson_rk4`: low-storage IMEX Runge-Kutta with Carpenter-Kennedy coefficients,
five stages, each

    h  <- N(u) + β_k h
    u  <- a_k u + b_k h,   a_k = (1 + μ_k L)/(1 - μ_k L),  b_k = γ_k dt/(1 - μ_k L),
    μ_k = dt (α_{k+1} - α_k)/2.

Twin of `emu.solvers.time_stepping.CrankNicolsonRK4`; the per-stage factors are computed once, in
the state's precision as Python does, then moved to the device.
"""
mutable struct CrankNicolsonRK4{T, D, G, A} <: Stepper
    dt::Float64
    betas::NTuple{5, T}
    decays::Vector{D} # a_k, or nothing without a linear operator
    gains::Vector{G}  # b_k: arrays, or scalars without a linear operator
    h::A
    tendency::A
    level::Int
end

const CN_RK4_ALPHAS = (
    0.0,
    0.1496590219993,
    0.3704009573644,
    0.6222557631345,
    0.9582821306748,
    1.0,
)
const CN_RK4_BETAS = (0.0, -0.4178904745, -1.192151694643, -1.697784692471, -1.514183444257)
const CN_RK4_GAMMAS = (
    0.1496590219993,
    0.3792103129999,
    0.8229550293869,
    0.6994504559488,
    0.1530572479681,
)

function CrankNicolsonRK4(equation, dt::Real, state::AbstractArray{Complex{T}}) where {T}
    dt = Float64(dt)
    linear = linear_operator(equation)
    host_linear = linear === nothing ? nothing : Array(linear)
    decays = []
    gains = []
    for k in 1:5
        mu = 0.5 * dt * (CN_RK4_ALPHAS[k + 1] - CN_RK4_ALPHAS[k])
        gamma_dt = CN_RK4_GAMMAS[k] * dt
        if host_linear === nothing
            push!(decays, nothing)
            push!(gains, T(gamma_dt))
        else
            mu_linear = T(mu) .* host_linear
            push!(decays, similar_on(state, (one(T) .+ mu_linear) ./ (one(T) .- mu_linear)))
            push!(gains, similar_on(state, T(gamma_dt) ./ (one(T) .- mu_linear)))
        end
    end
    decays = [decay for decay in decays] # concrete element types
    gains = [gain for gain in gains]
    return CrankNicolsonRK4(
        dt,
        T.(CN_RK4_BETAS),
        decays,
        gains,
        similar(state),
        similar(state),
        0,
    )
end

"""
    similar_on(like, host) -> array

`host` copied to the array type of `like` (a device array for device states).
"""
function similar_on(like::AbstractArray, host::AbstractArray)
    array = similar(like, eltype(host), size(host))
    copyto!(array, host)
    return array
end

"Twin of `init`: a fresh start (level 0, no history)."
function init!(stepper::Stepper)
    stepper.level = 0
    return stepper
end

"""
    step!(stepper::CrankNicolsonRK4, equation, u) -> u

One step in place (twin of `CrankNicolsonRK4.step`).
"""
function step!(stepper::CrankNicolsonRK4, equation, u::AbstractArray)
    h = stepper.h
    tendency = stepper.tendency
    for k in 1:5
        decay = stepper.decays[k]
        gain = stepper.gains[k]
        if k == 1
            explicit_terms!(h, equation, u)
        else
            explicit_terms!(tendency, equation, u)
            h .= tendency .+ stepper.betas[k] .* h
        end
        if decay === nothing
            u .= u .+ gain .* h
        else
            u .= decay .* u .+ gain .* h
        end
    end
    stepper.level += 1
    return u
end

"""
    AdamsBashforth3(equation, dt, state)

pyqg's third-order Adams-Bashforth with forward-Euler and AB2 start-up, then the equation's
spectral filter:

    q <- filter * (q + dt (23/12 f_n - 16/12 f_{n-1} + 5/12 f_{n-2}))

the first step forward Euler, the second AB2 (3/2, -1/2). Twin of
`emu.solvers.time_stepping.AdamsBashforth3`; the three tendency buffers rotate instead of being
reallocated (`tendency_1`, `tendency_2` are Python's history entries).
"""
mutable struct AdamsBashforth3{T, A} <: Stepper
    dt::T
    tendency_0::A
    tendency_1::A
    tendency_2::A
    level::Int
end

function AdamsBashforth3(equation, dt::Real, state::AbstractArray{Complex{T}}) where {T}
    linear_operator(equation) === nothing ||
        throw(ArgumentError(
            "AdamsBashforth3 is explicit: the equation must have linear_operator = nothing",
        ))
    return AdamsBashforth3(T(dt), similar(state), similar(state), similar(state), 0)
end

"""
    step!(stepper::AdamsBashforth3, equation, q) -> q

One step in place (twin of `AdamsBashforth3.step`).
"""
function step!(stepper::AdamsBashforth3{T}, equation, q::AbstractArray) where {T}
    dt = stepper.dt
    f0 = explicit_terms!(stepper.tendency_0, equation, q)
    f1 = stepper.tendency_1
    f2 = stepper.tendency_2
    if stepper.level == 0
        q .= q .+ dt .* f0
    elseif stepper.level == 1
        q .= q .+ dt .* (T(1.5) .* f0 .- T(0.5) .* f1)
    else
        q .= q .+
            dt .* (T(23.0 / 12.0) .* f0 .- T(16.0 / 12.0) .* f1 .+ T(5.0 / 12.0) .* f2)
    end
    spectral_filter = step_filter(equation)
    if spectral_filter !== nothing
        q .= spectral_filter .* q
    end
    # history: tendency_1 <- f0, tendency_2 <- the old tendency_1; the old tendency_2 is scratch.
    stepper.tendency_0, stepper.tendency_1, stepper.tendency_2 = f2, f0, f1
    stepper.level += 1
    return q
end

"""
    RungeKutta4(equation, dt, state)

The classical explicit RK4 on N(u) + L u; a reference integrator for tests and checks. Twin of
`emu.solvers.time_stepping.RungeKutta4`.
"""
mutable struct RungeKutta4{A} <: Stepper
    dt::Float64
    k1::A
    k2::A
    k3::A
    k4::A
    trial::A
    level::Int
end

function RungeKutta4(::Any, dt::Real, state::AbstractArray{<:Complex})
    return RungeKutta4(Float64(dt), (similar(state) for _ in 1:5)..., 0)
end

"Twin of `RungeKutta4._rate`: N(u) + L u into `rate`."
function rate!(rate::AbstractArray, equation, u::AbstractArray)
    explicit_terms!(rate, equation, u)
    linear = linear_operator(equation)
    if linear !== nothing
        rate .= rate .+ linear .* u
    end
    return rate
end

"""
    step!(stepper::RungeKutta4, equation, u) -> u

One step in place (twin of `RungeKutta4.step`).
"""
function step!(stepper::RungeKutta4, equation, u::AbstractArray{Complex{T}}) where {T}
    dt = T(stepper.dt)
    half_dt = T(0.5 * stepper.dt)
    k1, k2, k3, k4, trial = stepper.k1, stepper.k2, stepper.k3, stepper.k4, stepper.trial
    rate!(k1, equation, u)
    trial .= u .+ half_dt .* k1
    rate!(k2, equation, trial)
    trial .= u .+ half_dt .* k2
    rate!(k3, equation, trial)
    trial .= u .+ dt .* k3
    rate!(k4, equation, trial)
    u .= u .+ T(stepper.dt / 6.0) .* (k1 .+ T(2) .* k2 .+ T(2) .* k3 .+ k4)
    stepper.level += 1
    return u
end

const STEPPERS = ("cn_rk4", "ab3", "rk4")

"""
    make_stepper(equation, dt, state; name=default_stepper(equation)) -> Stepper

The equation's default stepper (or `name`: "cn_rk4", "ab3", "rk4") with step size `dt`, its
buffers shaped like `state`. Twin of `emu.solvers.time_stepping.make_stepper`.
"""
function make_stepper(equation, dt::Real, state::AbstractArray; name = nothing)
    name = name === nothing ? default_stepper(equation) : String(name)
    name == "cn_rk4" && return CrankNicolsonRK4(equation, dt, state)
    name == "ab3" && return AdamsBashforth3(equation, dt, state)
    name == "rk4" && return RungeKutta4(equation, dt, state)
    throw(ArgumentError("stepper must be one of $STEPPERS, got $(repr(name))"))
end
