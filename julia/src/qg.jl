# Two-layer quasi-geostrophic turbulence: the discrete model of pyqg's `QGModel` (pyqg 0.7.2).
# Twin of python/emu/systems/qg.py (`QGEquation`); read its module docstring for the equations,
# the references and good values.
#
#     q_m = ∇²ψ_m + (−1)^m F_m (ψ_1 − ψ_2),   F_1 = 1/(rd² (1 + δ)),  F_2 = δ F_1
#     ∂q_m/∂t + J(ψ_m, q_m) + U_m ∂q_m/∂x + β_m ∂ψ_m/∂x = −δ_{m,2} r_ek ∇²ψ_m + filter
#
# m = 1 (upper), 2 (lower); u_m = −∂ψ_m/∂y, v_m = ∂ψ_m/∂x; SI units. Everything is explicit
# (AB3 with pyqg's start-up, then the spectral filter after each step).

"""
    inversion_coefficients(wavenumber_squared, f1, f2) -> (upper, lower)

Inverse of the PV operator per wavenumber, ψ̂_m = upper[:, :, m] q̂_1 + lower[:, :, m] q̂_2, each of
size `(n ÷ 2 + 1, n, 2)`; the mean mode is 0. Twin of `emu.systems.qg.inversion_coefficients`
(its `A[m, 0]` is `upper[:, :, m]`, its `A[m, 1]` is `lower[:, :, m]`).
"""
function inversion_coefficients(wavenumber_squared::AbstractMatrix, f1::Real, f2::Real)
    k2 = wavenumber_squared
    determinant = k2 .* (k2 .+ f1 .+ f2)
    inverse = ifelse.(
        determinant .> 0,
        1.0 ./ ifelse.(determinant .> 0, determinant, 1.0),
        0.0,
    )
    upper = cat(-(k2 .+ f2) .* inverse, -f2 .* inverse; dims = 3)
    lower = cat(-f1 .* inverse, -(k2 .+ f1) .* inverse; dims = 3)
    return upper, lower
end

"""
    QGEquation(config, batch, T, device; flags=FFTW.MEASURE)

pyqg's two-layer tendency on a `Grid` for `batch` fields of element type `T` on `device`. State:
`q̂`, a complex array `(n ÷ 2 + 1, n, 2, batch)` (Python: `(batch, 2, n, n//2+1)`). Twin of
`emu.systems.qg.QGEquation`.
"""
struct QGEquation{R3, C2, C3, V, S, C4, C5, R5, R4, P5, PF, PW, P1}
    config::QGConfig
    grid::Grid
    batch::Int
    inversion_upper::R3    # (n ÷ 2 + 1, n, 2): weights of q̂_1 in ψ̂_1, ψ̂_2
    inversion_lower::R3    # weights of q̂_2
    background_velocity::V # (1, 1, 2): U_1, U_2
    psi_to_tendency::C3    # (n ÷ 2 + 1, n, 2): -i kx β_m, and + r_ek k² in the lower layer
    ikx::C2
    minus_ikx::C2
    minus_iky::C2
    step_filter::S # (n ÷ 2 + 1, n) real, or nothing
    psi_hat::C4    # (n ÷ 2 + 1, n, 2, batch) scratch
    spectral::C5   # (n ÷ 2 + 1, n, 2, batch, 3): q̂, -i ky ψ̂, i kx ψ̂
    physical::R5   # (n, n, 2, batch, 3): q, u, v (unnormalised)
    fluxes::R5     # (n, n, 2, batch, 2): (u + U) q, v q
    fluxes_hat::C5
    field::R4 # (n, n, 2, batch) scratch
    field_hat::C4
    inverse_stack::P5
    forward_fluxes::PF
    forward::PW
    inverse::P1
end

function QGEquation(
    config::QGConfig,
    batch::Integer,
    ::Type{T},
    device::Device = CPU();
    flags = FFTW.MEASURE,
) where {T <: AbstractFloat}
    batch >= 1 || throw(ArgumentError("batch must be an integer >= 1, got $batch"))
    batch = Int(batch)
    n = config.grid_size
    nk = n ÷ 2 + 1
    grid = Grid(n, config.domain_length)
    f1, f2 = coupling(config)
    k2 = grid.wavenumber_squared
    kx = reshape(grid.kx, :, 1)
    ky = reshape(grid.ky, 1, :)
    real_array(host) = to_device(device, T.(host))
    complex_array(host) = to_device(device, Complex{T}.(host))
    upper, lower = inversion_coefficients(k2, f1, f2)
    beta1, beta2 = mean_pv_gradients(config)
    background_velocity = real_array(reshape(
        [config.upper_layer_velocity, config.lower_layer_velocity],
        1,
        1,
        2,
    ))
    psi_to_tendency = -cat(
        beta1 .* 1im .* kx .* ones(size(k2)),
        beta2 .* 1im .* kx .- config.bottom_drag .* k2;
        dims = 3,
    )
    ikx = 1im .* kx .* ones(1, n)
    iky = 1im .* ky .* ones(nk, 1)
    step_filter = config.filter == "exponential" ?
        real_array(exponential_filter(n; filter_factor = config.filter_factor)) :
        config.filter == "sharp" ? real_array(two_thirds_mask(n)) : nothing
    psi_hat = device_array(device, Complex{T}, (nk, n, 2, batch))
    spectral = device_array(device, Complex{T}, (nk, n, 2, batch, 3))
    physical = device_array(device, T, (n, n, 2, batch, 3))
    fluxes = device_array(device, T, (n, n, 2, batch, 2))
    fluxes_hat = device_array(device, Complex{T}, (nk, n, 2, batch, 2))
    field = device_array(device, T, (n, n, 2, batch))
    field_hat = device_array(device, Complex{T}, (nk, n, 2, batch))
    fill!(spectral, zero(Complex{T}))
    fill!(fluxes, zero(T))
    fill!(field, zero(T))
    return QGEquation(
        config,
        grid,
        batch,
        real_array(upper),
        real_array(lower),
        background_velocity,
        complex_array(psi_to_tendency),
        complex_array(ikx),
        complex_array(-ikx),
        complex_array(-iky),
        step_filter,
        psi_hat,
        spectral,
        physical,
        fluxes,
        fluxes_hat,
        field,
        field_hat,
        brfft_plan(spectral, n, (1, 2), flags),
        rfft_plan(fluxes, (1, 2), flags),
        rfft_plan(field, (1, 2), flags),
        brfft_plan(field_hat, n, (1, 2), flags),
    )
end

field_names(::QGEquation) = ("pv_upper", "pv_lower")
default_stepper(::QGEquation) = "ab3"
linear_operator(::QGEquation) = nothing # everything is explicit, as in pyqg
step_filter(equation::QGEquation) = equation.step_filter
state_size(equation::QGEquation) = (
    equation.grid.num_points ÷ 2 + 1,
    equation.grid.num_points,
    2,
    equation.batch,
)
fields_size(equation::QGEquation) = (
    equation.grid.num_points,
    equation.grid.num_points,
    2,
    equation.batch,
)

"""
    streamfunction_hat!(psi_hat, equation::QGEquation, q̂) -> psi_hat

PV inversion, ψ̂_m = A_m1 q̂_1 + A_m2 q̂_2 for both layers in one broadcast. Twin of
`QGEquation.streamfunction_hat`.
"""
function streamfunction_hat!(
    psi_hat::AbstractArray,
    equation::QGEquation,
    q_hat::AbstractArray,
)
    q1 = view(q_hat, :, :, 1:1, :)
    q2 = view(q_hat, :, :, 2:2, :)
    psi_hat .= equation.inversion_upper .* q1 .+ equation.inversion_lower .* q2
    return psi_hat
end

"""
    qg_physical!(equation, q̂) -> (q, u, v) as views, each times n²

ψ̂ into `equation.psi_hat`, then the three inverse transforms (q, u = −∂ψ/∂y, v = ∂ψ/∂x) in one
batched call, unnormalised. First half of `QGEquation.explicit_terms`.
"""
function qg_physical!(equation::QGEquation, q_hat::AbstractArray)
    psi_hat = streamfunction_hat!(equation.psi_hat, equation, q_hat)
    spectral = equation.spectral
    view(spectral, :, :, :, :, 1) .= q_hat
    view(spectral, :, :, :, :, 2) .= equation.minus_iky .* psi_hat
    view(spectral, :, :, :, :, 3) .= equation.ikx .* psi_hat
    mul!(equation.physical, equation.inverse_stack, spectral) # destroys `spectral`: scratch
    physical = equation.physical
    return (
        view(physical, :, :, :, :, 1),
        view(physical, :, :, :, :, 2),
        view(physical, :, :, :, :, 3),
    )
end

"""
    explicit_terms!(tendency, equation::QGEquation, q̂) -> tendency

dq̂/dt: advection with the total zonal velocity u_m + U_m (fluxes formed in physical space, as pyqg
does), beta and bottom drag. Twin of `QGEquation.explicit_terms`; the 1/n² scalings are exact
powers of two, applied where Python's inverse transform applies them.
"""
function explicit_terms!(
    tendency::AbstractArray,
    equation::QGEquation,
    q_hat::AbstractArray,
)
    q, u, v = qg_physical!(equation, q_hat)
    scale = inverse_scale(equation)
    fluxes = equation.fluxes
    view(fluxes, :, :, :, :, 1) .= (scale .* u .+ equation.background_velocity) .*
        (scale .* q)
    view(fluxes, :, :, :, :, 2) .= (scale .* v) .* (scale .* q)
    mul!(equation.fluxes_hat, equation.forward_fluxes, fluxes)
    flux_u = view(equation.fluxes_hat, :, :, :, :, 1)
    flux_v = view(equation.fluxes_hat, :, :, :, :, 2)
    # -(i k F_u + i l F_v) - i k β_m ψ̂ + drag k² ψ̂_2, with the ψ̂ factors precomputed.
    tendency .= equation.minus_ikx .* flux_u .+
        equation.minus_iky .* flux_v .+
        equation.psi_to_tendency .* equation.psi_hat
    return tendency
end

"""
    to_state!(state_hat, equation::QGEquation, fields) -> state_hat

Physical PV, Julia layout `(n, n, 2, batch)` -> q̂. Twin of `QGEquation.to_state`.
"""
function to_state!(state_hat::AbstractArray, equation::QGEquation, fields::AbstractArray)
    expected = fields_size(equation)
    require(
        size(fields) == expected,
        "pv",
        "an array of size (nx, ny, 2, batch) = $expected (Julia order of numpy's (batch, 2, ny, nx))",
        size(fields),
    )
    copy_into!(equation.field, fields)
    mul!(equation.field_hat, equation.forward, equation.field)
    state_hat .= equation.field_hat
    return state_hat
end

"""
    fields!(out, equation::QGEquation, state_hat) -> out

Physical PV `(n, n, 2, batch)` into `out`. Twin of `QGEquation.fields`.
"""
function fields!(out::AbstractArray, equation::QGEquation, state_hat::AbstractArray)
    equation.field_hat .= state_hat # the inverse transform destroys its input
    mul!(equation.field, equation.inverse, equation.field_hat)
    equation.field .*= inverse_scale(equation)
    return copy_into!(out, equation.field)
end

"""
    cfl(equation::QGEquation, q̂) -> Float64

Courant number max(|u_m + U_m|, |v_m|) dt / dx over batch and layers (pyqg's `_calc_cfl`). Twin
of `QGEquation.cfl`.
"""
function cfl(equation::QGEquation, q_hat::AbstractArray)
    _, u, v = qg_physical!(equation, q_hat)
    scale = inverse_scale(equation)
    speed_u = maximum(abs, scale .* u .+ equation.background_velocity)
    speed_v = maximum(abs, v) * scale
    return Float64(max(speed_u, speed_v)) * equation.config.dt / equation.grid.spacing
end

"""
    initial_condition(equation::QGEquation, seed; batch=equation.batch) -> Array{Float64,4}

pyqg's default start, seeded: q_1 = 1e-7 r(x, y) + 1e-6 r(x), q_2 = 0 (r uniform in [0, 1)),
size `(n, n, 2, batch)`. Twin of `QGEquation.initial_condition`; Julia's `Xoshiro(seed)` draws
other numbers than numpy's generator.
"""
function initial_condition(
    equation::QGEquation,
    seed::Integer;
    batch::Integer = equation.batch,
)
    batch >= 1 || throw(ArgumentError("batch must be an integer >= 1, got $batch"))
    n = equation.grid.num_points
    rng = Random.Xoshiro(seed)
    pv = zeros(n, n, 2, batch)
    pv[:, :, 1, :] .= 1.0e-7 .* rand(rng, n, n, batch) .+ 1.0e-6 .* rand(rng, n, 1, batch)
    return pv
end

"""
    layer_energy(equation::QGEquation, q̂) -> Matrix{Float64}

Kinetic energy ½⟨|u_m|²⟩ per layer and sample, size `(2, batch)` [m²/s²]. Twin of
`QGEquation.layer_energy` (host, Float64).
"""
function layer_energy(equation::QGEquation, q_hat::AbstractArray)
    psi_hat = Array(streamfunction_hat!(equation.psi_hat, equation, q_hat))
    return 0.5 .*
        mean_from_spectrum(
            equation.grid,
            abs2.(psi_hat) .* equation.grid.wavenumber_squared,
        )
end

"""
    energy(equation::QGEquation, q̂) -> Vector{Float64}

Thickness-weighted kinetic energy (H_1 KE_1 + H_2 KE_2)/H per sample. Twin of `QGEquation.energy`.
"""
function energy(equation::QGEquation, q_hat::AbstractArray)
    w1, w2 = layer_weights(equation.config)
    layer = layer_energy(equation, q_hat)
    return w1 .* layer[1, :] .+ w2 .* layer[2, :]
end

"""
    enstrophy(equation::QGEquation, q̂) -> Vector{Float64}

Thickness-weighted PV enstrophy ½⟨q_m²⟩ per sample. Twin of `QGEquation.enstrophy`.
"""
function enstrophy(equation::QGEquation, q_hat::AbstractArray)
    w1, w2 = layer_weights(equation.config)
    layer = 0.5 .* mean_from_spectrum(equation.grid, abs2.(Array(q_hat)))
    return w1 .* layer[1, :] .+ w2 .* layer[2, :]
end

"""
    kinetic_energy_spectrum(equation::QGEquation, q̂) -> (k, E)

Thickness-weighted isotropic KE spectrum per sample, `E` of size `(n ÷ 2, batch)`. Twin of
`QGEquation.kinetic_energy_spectrum`.
"""
function kinetic_energy_spectrum(equation::QGEquation, q_hat::AbstractArray)
    n = equation.grid.num_points
    psi_hat = Array(streamfunction_hat!(equation.psi_hat, equation, q_hat))
    density = 0.5 .* abs2.(psi_hat) .* equation.grid.wavenumber_squared ./ n^4
    w1, w2 = layer_weights(equation.config)
    k, layer_spectra = isotropic_spectrum(density, n, equation.config.domain_length)
    return k, w1 .* layer_spectra[:, 1, :] .+ w2 .* layer_spectra[:, 2, :]
end
