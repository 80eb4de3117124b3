# The doubly periodic grid and the pure spectral operators.
# Twin of python/emu/grid.py and python/emu/spectral.py, in Julia's (x-half, y) spectral layout:
# every (n ÷ 2 + 1, n) matrix here is the transpose of the Python function's (n, n // 2 + 1) array.

"""
    angular_wavenumbers(num_points, domain_extent) -> (kx, ky)

Angular wavenumbers of an rfft layout, Julia order: `kx` has length `n ÷ 2 + 1` (dimension 1,
the halved one), `ky` length `n` (dimension 2, `fftfreq` order). Twin of
`emu.grid.angular_wavenumbers` (which returns them shaped for numpy's `(ny, nx//2+1)` layout).
"""
function angular_wavenumbers(num_points::Integer, domain_extent::Real)
    fundamental = 2π / domain_extent
    kx = fundamental .* collect(0:(num_points ÷ 2))
    ky = fundamental .*
        [i < (num_points + 1) ÷ 2 ? i : i - num_points for i in 0:(num_points - 1)]
    return kx, ky
end

"""
    rfft_weights(num_points) -> Vector{Float64}

Multiplicity of each rfft column (dimension 1) in the full spectrum: 1 for kx = 0 and Nyquist,
else 2. Twin of `emu.grid.rfft_weights`.
"""
function rfft_weights(num_points::Integer)
    weights = fill(2.0, num_points ÷ 2 + 1)
    weights[1] = 1.0
    if iseven(num_points)
        weights[end] = 1.0
    end
    return weights
end

"""
    two_thirds_mask(num_points) -> Matrix{Float64}

Orszag's 2/3 rule as a 0/1 mask of size `(n ÷ 2 + 1, n)`: keeps modes with index `< n/3` on both
axes. Twin of `emu.grid.two_thirds_mask`.
"""
function two_thirds_mask(num_points::Integer)
    keep = ceil(Int, num_points / 3) - 1
    index_x, index_y = angular_wavenumbers(num_points, 2π)
    return [abs(i) <= keep && abs(j) <= keep ? 1.0 : 0.0 for i in index_x, j in index_y]
end

"""
    jax_cfd_mask(num_points) -> Matrix{Float64}

jax-cfd's `brick_wall_filter_2d` as it acts on a real field, size `(n ÷ 2 + 1, n)`. Twin of
`emu.grid.jax_cfd_mask` (read its docstring); indices below are Python's 0-based ones plus 1.
"""
function jax_cfd_mask(num_points::Integer)
    n = num_points
    half = n ÷ 2 + 1
    stored = zeros(n, half) # [x, y-half], as jax-cfd builds it
    full_keep = trunc(Int, 2 / 3 * n)
    half_keep = trunc(Int, 2 / 3 * half)
    stored[1:(full_keep ÷ 2), 1:half_keep] .= 1 # stored[: int(2/3 n)//2, : int(2/3 half)]
    stored[(n + fld(-full_keep, 2) + 1):n, 1:half_keep] .= 1 # stored[-int(2/3 n)//2 :, ...]
    full = zeros(n, n) # [x, y] over the whole plane
    full[:, 1:half] .= stored
    conjugate = [mod(-index, n) + 1 for index in 0:(n - 1)] # (-index) % n, 1-based
    for y in 1:(n ÷ 2 - 1)
        # y < 0 is stored as the conjugate (-x, -y)
        for index in 0:(n - 1)
            full[conjugate[index + 1], n - y + 1] = stored[index + 1, y + 1]
        end
    end
    for y in (0, n ÷ 2)
        # self-conjugate columns: the inverse keeps the Hermitian part
        full[:, y + 1] .= 0.5 .* (stored[:, y + 1] .+ stored[conjugate, y + 1])
    end
    # Python returns full.T[:, : n//2 + 1], i.e. [y, x < n/2 + 1]; Julia's layout is [x-half, y].
    return full[1:half, :]
end

"""
    jax_cfd_wavenumbers(num_points, domain_extent) -> (kx, ky)

jax-cfd's derivative wavenumbers as they act on a real field, Julia layout: `kx` a
`(n ÷ 2 + 1, n)` matrix, `ky` a `(1, n)` row; `im .* kx .* f̂` is ∂f/∂x and `im .* ky .* f̂` is
∂f/∂y as jax-cfd computes them. Twin of `emu.grid.jax_cfd_wavenumbers` (read its docstring): the
grid's wavenumbers except at the Nyquist index n/2, where
`kx[n ÷ 2 + 1, j] = -(n/2) sign(ky[j]) (2π / L)`, 0 at the y indices 0 and n/2, and
`ky[n ÷ 2 + 1] = 0` (emu's own convention, `angular_wavenumbers`, is the opposite: the x
derivative has no Nyquist part and the y one keeps ky = -n/2).
"""
function jax_cfd_wavenumbers(num_points::Integer, domain_extent::Real)
    n = num_points
    nyquist = n ÷ 2
    fundamental = 2π / domain_extent
    kx, ky = angular_wavenumbers(n, domain_extent)
    # (n ÷ 2 + 1, n): the Nyquist row depends on the column
    kx = repeat(reshape(kx, :, 1), 1, n)
    ky = copy(reshape(ky, 1, :))
    _, index_y = angular_wavenumbers(n, 2π) # fftfreq(n, 1/n)
    kx[nyquist + 1, :] .= -nyquist .* fundamental .* sign.(index_y)
    kx[nyquist + 1, [1, nyquist + 1]] .= 0.0 # the self-conjugate points (dropped anyway)
    ky[1, nyquist + 1] = 0.0
    return kx, ky
end

"""
    exponential_filter(num_points; filter_factor=23.6, cutoff=0.65π) -> Matrix{Float64}

pyqg's filter `exp(-filter_factor (|k| dx - cutoff)^4)` above `cutoff`, 1 below, size
`(n ÷ 2 + 1, n)`. Twin of `emu.spectral.exponential_filter`.
"""
function exponential_filter(
    num_points::Integer;
    filter_factor::Real = 23.6,
    cutoff::Real = 0.65π,
)
    kx, ky = angular_wavenumbers(num_points, 2π)
    dx = 2π / num_points
    sigma = zeros(length(kx), length(ky))
    for (j, l) in enumerate(ky), (i, k) in enumerate(kx)
        scaled = sqrt((k * dx)^2 + (l * dx)^2)
        sigma[i, j] = scaled <= cutoff ? 1.0 : exp(-filter_factor * (scaled - cutoff)^4)
    end
    return sigma
end

"""
    isotropic_spectrum(energy_density_hat, num_points, domain_extent) -> (k, spectrum)

Sums a half-spectrum energy density `(n ÷ 2 + 1, n, rest...)` over shells of integer wavenumber
index; `spectrum` has size `(n ÷ 2, rest...)` (shells 1..n/2; the mean and the corners beyond n/2
are dropped). Twin of `emu.spectral.isotropic_spectrum`.
"""
function isotropic_spectrum(
    energy_density_hat::AbstractArray,
    num_points::Integer,
    domain_extent::Real,
)
    index_x, index_y = angular_wavenumbers(num_points, 2π)
    weights = rfft_weights(num_points)
    n_shells = num_points ÷ 2
    rest = size(energy_density_hat)[3:end]
    density = reshape(
        energy_density_hat,
        size(energy_density_hat, 1),
        size(energy_density_hat, 2),
        :,
    )
    spectrum = zeros(n_shells, size(density, 3))
    for b in axes(density, 3), j in eachindex(index_y), i in eachindex(index_x)
        shell = round(Int, sqrt(index_x[i]^2 + index_y[j]^2))
        if 1 <= shell <= n_shells
            spectrum[shell, b] += density[i, j, b] * weights[i]
        end
    end
    k = collect(1:n_shells) .* (2π / domain_extent)
    return k, reshape(spectrum, n_shells, rest...)
end

"""
    Grid(num_points, domain_extent)

A square doubly periodic grid: spacing, angular wavenumbers `kx` (length n ÷ 2 + 1) and `ky`
(length n), `wavenumber_squared` and its inverse (0 for the mean mode) as `(n ÷ 2 + 1, n)`
Float64 matrices on the host, rfft weights and coordinates `x`, `y` (points at j dx, j = 0..n-1).
Twin of `emu.grid.Grid`; the device copies of these arrays live in the equations, which own the
FFT plans (a plan belongs to an array's shape, batch included).
"""
struct Grid
    num_points::Int
    domain_extent::Float64
    spacing::Float64
    kx::Vector{Float64}
    ky::Vector{Float64}
    wavenumber_squared::Matrix{Float64}
    inverse_wavenumber_squared::Matrix{Float64}
    rfft_weights::Vector{Float64}
    x::Vector{Float64}
    y::Vector{Float64}
end

function Grid(num_points::Integer, domain_extent::Real)
    spacing = domain_extent / num_points
    kx, ky = angular_wavenumbers(num_points, domain_extent)
    k2 = [k^2 + l^2 for k in kx, l in ky]
    inverse_k2 = [value > 0 ? 1.0 / value : 0.0 for value in k2]
    coordinates = collect(0:(num_points - 1)) .* spacing
    return Grid(
        num_points,
        domain_extent,
        spacing,
        kx,
        ky,
        k2,
        inverse_k2,
        rfft_weights(num_points),
        coordinates,
        copy(coordinates),
    )
end

"""
    mean_from_spectrum(grid, density_hat) -> Array{Float64}

Domain mean of a quadratic quantity from its half-spectrum density (Parseval): sums dims 1 and 2
with the rfft weights, divides by n⁴. Twin of `Grid.mean_from_spectrum`; host arrays.
"""
function mean_from_spectrum(grid::Grid, density_hat::AbstractArray)
    total = sum(density_hat .* grid.rfft_weights; dims = (1, 2))
    return dropdims(total; dims = (1, 2)) ./ grid.num_points^4
end
