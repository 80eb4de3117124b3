# Kolmogorov flow: 2D forced incompressible Navier-Stokes in vorticity form.
# Twin of python/emu/systems/kolmogorov.py (`KolmogorovEquation`); read its module docstring for
# the equations, the references and good values.
#
#     ∂ω/∂t + u·∇ω = ν ∇²ω − α ω + F(y),   ∇²ψ = −ω,  u = ∂ψ/∂y,  v = −∂ψ/∂x,
#     F(y) = −k_f A cos(k_f y),
#
# split as ∂ω̂/∂t = L ω̂ + N(ω̂) with L = −ν|k|² − α (implicit) and N = −(u·∇ω)^ (2/3-filtered) + F̂.

"""
    KolmogorovEquation(config, batch, T, device; flags=FFTW.MEASURE)

The vorticity equation on a `Grid` for a batch of `batch` fields of element type `T` on `device`.
State: `ω̂`, a complex array `(n ÷ 2 + 1, n, batch)` (Python: `(batch, n, n//2+1)`). Holds the
device copies of the constant factors, the scratch buffers and the FFT plans (built once, on those
buffers). Twin of `emu.systems.kolmogorov.KolmogorovEquation`.
"""
struct KolmogorovEquation{R2, C2, F, C4, R4, C3, R3, P4, PF, P1}
    config::KolmogorovConfig
    grid::Grid
    batch::Int
    linear_operator::R2 # L = -ν |k|² - α, real (n ÷ 2 + 1, n)
    forcing_hat::F      # F̂ = -i ky f̂x, or nothing without forcing
    to_u::C2            # i ky / |k|²: ω̂ -> û
    to_v::C2            # -i kx / |k|²: ω̂ -> v̂
    derivative_x::C2    # i kx: ω̂ -> (∂ω/∂x)^
    derivative_y::C2    # i ky: ω̂ -> (∂ω/∂y)^
    dealias::R2
    negative_dealias::R2 # the mask with the advection's minus sign
    spectral::C4         # (n ÷ 2 + 1, n, batch, 4): û, v̂, i kx ω̂, i ky ω̂
    physical::R4         # (n, n, batch, 4): their unnormalised inverse transforms
    field_hat::C3        # (n ÷ 2 + 1, n, batch) scratch
    field::R3            # (n, n, batch) scratch
    inverse_stack::P4    # spectral -> physical, four fields in one call
    forward::PF          # field -> field_hat
    inverse::P1          # field_hat -> field
end

function KolmogorovEquation(
    config::KolmogorovConfig,
    batch::Integer,
    ::Type{T},
    device::Device = CPU();
    flags = FFTW.MEASURE,
) where {T <: AbstractFloat}
    batch >= 1 || throw(ArgumentError("batch must be an integer >= 1, got $batch"))
    batch = Int(batch)
    n = config.grid_size
    grid = Grid(n, config.domain_extent)
    k2 = grid.wavenumber_squared
    real_array(host) = to_device(device, T.(host))
    complex_array(host) = to_device(device, Complex{T}.(host))
    linear_operator = real_array(-config.viscosity .* k2 .- config.drag)
    # Products of constant factors, precomputed so each stage multiplies once per field. Every
    # spectral derivative goes through them, so they carry the Nyquist convention (Python's
    # `KolmogorovConfig.dealias`): derivative_x = i kx, derivative_y = i ky, to_u = i ky / |k|²,
    # to_v = -i kx / |k|². emu's convention: the grid's wavenumbers; jax-cfd's: the same except at
    # the Nyquist index (`jax_cfd_wavenumbers`), kx a full (n ÷ 2 + 1, n) matrix.
    if config.dealias == "jax-cfd"
        kx, ky = jax_cfd_wavenumbers(n, config.domain_extent)
    else
        kx = reshape(grid.kx, :, 1)
        ky = reshape(grid.ky, 1, :)
    end
    derivative_x = complex_array(1im .* kx .* ones(1, n))
    derivative_y = complex_array(1im .* ky .* ones(n ÷ 2 + 1, 1))
    inverse_k2 = grid.inverse_wavenumber_squared
    to_u = complex_array(1im .* ky .* inverse_k2)
    to_v = complex_array(-1im .* kx .* inverse_k2)
    # Forcing: the velocity forcing (A sin(k_f y), 0) on the grid points, curled spectrally:
    # F̂ = i kx f̂y - i ky f̂x = -i ky f̂x.
    y = reshape(grid.y, 1, :) .* ones(n, 1)
    fx_hat = FFTW.rfft(
        config.forcing_amplitude .* sin.(config.forcing_wavenumber .* y),
        (1, 2),
    )
    forcing_hat = config.forcing_wavenumber == 0 ?
        nothing :
        complex_array(-1im .* ky .* fx_hat)
    # The advection's mask, and the mask with the advection's minus sign.
    mask = config.dealias == "two_thirds" ? two_thirds_mask(n) : jax_cfd_mask(n)
    dealias = real_array(mask)
    negative_dealias = real_array(-mask)
    nk = n ÷ 2 + 1
    spectral = device_array(device, Complex{T}, (nk, n, batch, 4))
    physical = device_array(device, T, (n, n, batch, 4))
    field_hat = device_array(device, Complex{T}, (nk, n, batch))
    field = device_array(device, T, (n, n, batch))
    fill!(spectral, zero(Complex{T}))
    fill!(field, zero(T))
    inverse_stack = brfft_plan(spectral, n, (1, 2), flags)
    forward = rfft_plan(field, (1, 2), flags)
    inverse = brfft_plan(field_hat, n, (1, 2), flags)
    return KolmogorovEquation(
        config,
        grid,
        batch,
        linear_operator,
        forcing_hat,
        to_u,
        to_v,
        derivative_x,
        derivative_y,
        dealias,
        negative_dealias,
        spectral,
        physical,
        field_hat,
        field,
        inverse_stack,
        forward,
        inverse,
    )
end

field_names(::KolmogorovEquation) = ("vorticity",)
default_stepper(::KolmogorovEquation) = "cn_rk4"
linear_operator(equation::KolmogorovEquation) = equation.linear_operator
step_filter(::KolmogorovEquation) = nothing
state_size(equation::KolmogorovEquation) = (
    equation.grid.num_points ÷ 2 + 1,
    equation.grid.num_points,
    equation.batch,
)
fields_size(equation::KolmogorovEquation) = (
    equation.grid.num_points,
    equation.grid.num_points,
    equation.batch,
)
real_type(equation) = eltype(equation.field)

# 1/n² of the unnormalised inverse transform; an exact power of two, since n is one.
inverse_scale(equation) = inv(real_type(equation)(equation.grid.num_points)^2)

"""
    velocity_physical!(equation, ω̂) -> (u, v, ∂ω/∂x, ∂ω/∂y) as views, each times n²

The four inverse transforms of the advection term in one batched call, their inputs written
straight into one buffer. The results are unnormalised (FFTW's backward transform): multiply by
`inverse_scale(equation)` for physical values. First half of `KolmogorovEquation.advection_hat`.
"""
function velocity_physical!(equation::KolmogorovEquation, omega_hat::AbstractArray)
    spectral = equation.spectral
    view(spectral, :, :, :, 1) .= equation.to_u .* omega_hat
    view(spectral, :, :, :, 2) .= equation.to_v .* omega_hat
    view(spectral, :, :, :, 3) .= equation.derivative_x .* omega_hat
    view(spectral, :, :, :, 4) .= equation.derivative_y .* omega_hat
    mul!(equation.physical, equation.inverse_stack, spectral) # destroys `spectral`: scratch
    physical = equation.physical
    return (
        view(physical, :, :, :, 1),
        view(physical, :, :, :, 2),
        view(physical, :, :, :, 3),
        view(physical, :, :, :, 4),
    )
end

"""
    explicit_terms!(tendency, equation::KolmogorovEquation, ω̂) -> tendency

N(ω̂) = −(u·∇ω)^ · (2/3 mask) + F̂ into `tendency`. Twin of `KolmogorovEquation.explicit_terms` and
`advection_hat`: u ω_x + v ω_y in physical space (the 1/n² scalings of both factors, exact powers of
two, applied together), forward transform, the signed mask, the forcing.
"""
function explicit_terms!(
    tendency::AbstractArray,
    equation::KolmogorovEquation,
    omega_hat::AbstractArray,
)
    u, v, omega_x, omega_y = velocity_physical!(equation, omega_hat)
    scale = inverse_scale(equation)
    scale2 = scale * scale
    equation.field .= scale2 .* (u .* omega_x .+ v .* omega_y)
    mul!(equation.field_hat, equation.forward, equation.field)
    if equation.forcing_hat === nothing
        tendency .= equation.field_hat .* equation.negative_dealias
    else
        tendency .= equation.field_hat .* equation.negative_dealias .+ equation.forcing_hat
    end
    return tendency
end

"""
    to_state!(state_hat, equation, fields) -> state_hat

Physical fields, Julia layout `(n, n, batch)` (any array type or float type) -> ω̂ (rfft over
dims 1, 2). Twin of `KolmogorovEquation.to_state` (which checks the shape the same way).
"""
function to_state!(
    state_hat::AbstractArray,
    equation::KolmogorovEquation,
    fields::AbstractArray,
)
    expected = fields_size(equation)
    require(
        size(fields) == expected,
        "vorticity",
        "an array of size (nx, ny, batch) = $expected (Julia order of numpy's (batch, ny, nx))",
        size(fields),
    )
    copy_into!(equation.field, fields)
    mul!(equation.field_hat, equation.forward, equation.field)
    state_hat .= equation.field_hat
    return state_hat
end

"""
    fields!(out, equation, state_hat) -> out

Physical fields `(n, n, batch)` of ω̂ into `out` (host or device, any float type). Twin of
`KolmogorovEquation.fields`.
"""
function fields!(out::AbstractArray, equation::KolmogorovEquation, state_hat::AbstractArray)
    equation.field_hat .= state_hat # the inverse transform destroys its input
    mul!(equation.field, equation.inverse, equation.field_hat)
    equation.field .*= inverse_scale(equation)
    return copy_into!(out, equation.field)
end

"""
    cfl(equation::KolmogorovEquation, ω̂) -> Float64

Courant number max(|u|, |v|) dt / dx over the batch. Twin of `KolmogorovEquation.cfl`.
"""
function cfl(equation::KolmogorovEquation, omega_hat::AbstractArray)
    u, v, _, _ = velocity_physical!(equation, omega_hat)
    speed = Float64(max(maximum(abs, u), maximum(abs, v)) * inverse_scale(equation))
    return speed * equation.config.dt / equation.grid.spacing
end

"""
    initial_condition(equation::KolmogorovEquation, seed; batch=equation.batch) -> Array{Float64,3}

Random band-limited vorticity `(n, n, batch)`, the same construction as
`KolmogorovEquation.initial_condition` (log-normal spectrum peaked near `peak_wavenumber`, applied to
the streamfunction, 2/3-rule modes only, each sample scaled to max |u| = max_velocity). The random
numbers come from Julia's `Xoshiro(seed)`, not numpy's generator: same distribution, other fields.
"""
function initial_condition(
    equation::KolmogorovEquation,
    seed::Integer;
    batch::Integer = equation.batch,
)
    batch >= 1 || throw(ArgumentError("batch must be an integer >= 1, got $batch"))
    grid = equation.grid
    n = grid.num_points
    rng = Random.Xoshiro(seed)
    k2 = grid.wavenumber_squared
    k = sqrt.(k2)
    safe_k = ifelse.(k .> 0, k, 1.0)
    variance = 0.25
    log_normal = exp.(
        -((log.(safe_k) .- log(equation.config.peak_wavenumber) .- variance).^2) ./
            (2 * variance),
    ) ./
        safe_k
    amplitude = ifelse.(k .> 0, log_normal ./ safe_k, 0.0)
    amplitude .*= two_thirds_mask(n)
    shape = (n ÷ 2 + 1, n, batch)
    noise = randn(rng, shape) .+ 1im .* randn(rng, shape)
    psi = FFTW.irfft(
        noise .* amplitude,
        n,
        (1, 2),
    ) # a real field: Hermitian symmetry by construction
    psi_hat = FFTW.rfft(psi, (1, 2))
    kx = reshape(grid.kx, :, 1)
    ky = reshape(grid.ky, 1, :)
    u = FFTW.irfft(1im .* ky .* psi_hat, n, (1, 2))
    v = FFTW.irfft(-1im .* kx .* psi_hat, n, (1, 2))
    speed = maximum(sqrt.(u.^2 .+ v.^2); dims = (1, 2))
    vorticity = FFTW.irfft(k2 .* psi_hat, n, (1, 2))
    return vorticity .* (equation.config.max_velocity ./ speed)
end

"""
    energy(equation::KolmogorovEquation, ω̂) -> Vector{Float64}

E = ½⟨|u|²⟩ per sample (twin of `KolmogorovEquation.energy`; computed on the host in Float64).
"""
function energy(equation::KolmogorovEquation, omega_hat::AbstractArray)
    host = Array(omega_hat)
    return 0.5 .*
        mean_from_spectrum(
            equation.grid,
            abs2.(host) .* equation.grid.inverse_wavenumber_squared,
        )
end

"""
    enstrophy(equation::KolmogorovEquation, ω̂) -> Vector{Float64}

Z = ½⟨ω²⟩ per sample (twin of `KolmogorovEquation.enstrophy`).
"""
function enstrophy(equation::KolmogorovEquation, omega_hat::AbstractArray)
    return 0.5 .* mean_from_spectrum(equation.grid, abs2.(Array(omega_hat)))
end

"""
    kinetic_energy_spectrum(equation::KolmogorovEquation, ω̂) -> (k, E)

Isotropic KE spectrum per sample, `E` of size `(n ÷ 2, batch)`. Twin of
`KolmogorovEquation.kinetic_energy_spectrum`.
"""
function kinetic_energy_spectrum(equation::KolmogorovEquation, omega_hat::AbstractArray)
    n = equation.grid.num_points
    density = 0.5 .*
        abs2.(Array(omega_hat)) .*
        equation.grid.inverse_wavenumber_squared ./
        n^4
    return isotropic_spectrum(density, n, equation.config.domain_extent)
end
