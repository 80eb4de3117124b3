"""
    Emu

Julia side of emu: pseudospectral solvers and fused DDPM kernels, callable from Python through
juliacall and usable from Julia directly. Arrays follow emu's convention seen from Julia: a
C-ordered numpy array `(batch, [layer], ny, nx)` arrives as `(nx, ny, [layer], batch)`, so `rfft`
over dims `(1, 2)` matches numpy's rfft over the last two axes.

This release holds the grid and spectral-operator layer, each function a line-by-line twin of
its Python reference in `python/emu/grid.py` and `python/emu/spectral.py`; the solvers follow.
"""
module Emu

export angular_wavenumbers, two_thirds_mask, exponential_filter

"""
    angular_wavenumbers(num_points, domain_extent) -> (kx, ky)

Angular wavenumbers of an rfft layout, Julia order: `kx` has length `n ÷ 2 + 1` (dimension 1,
the halved one), `ky` length `n` (dimension 2, `fftfreq` order). Twin of
`emu.grid.angular_wavenumbers` (which returns them shaped for numpy's `(ny, nx//2+1)` layout).
"""
function angular_wavenumbers(num_points::Integer, domain_extent::Real)
    fundamental = 2π / domain_extent
    kx = fundamental .* collect(0:(num_points ÷ 2))
    ky = fundamental .* [i < (num_points + 1) ÷ 2 ? i : i - num_points for i in 0:(num_points - 1)]
    return kx, ky
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
    exponential_filter(num_points; filter_factor=23.6, cutoff=0.65π) -> Matrix{Float64}

pyqg's filter `exp(-filter_factor (|k| dx - cutoff)^4)` above `cutoff`, 1 below, size
`(n ÷ 2 + 1, n)`. Twin of `emu.spectral.exponential_filter`.
"""
function exponential_filter(num_points::Integer; filter_factor::Real = 23.6, cutoff::Real = 0.65π)
    kx, ky = angular_wavenumbers(num_points, 2π)
    dx = 2π / num_points
    sigma = zeros(length(kx), length(ky))
    for (j, l) in enumerate(ky), (i, k) in enumerate(kx)
        scaled = sqrt((k * dx)^2 + (l * dx)^2)
        sigma[i, j] = scaled <= cutoff ? 1.0 : exp(-filter_factor * (scaled - cutoff)^4)
    end
    return sigma
end

end # module
