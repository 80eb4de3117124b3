# Fused DDPM kernels (epsilon-prediction) and the cosine schedule's tables.
# Twin of python/emu/diffusion/ddpm.py (`ddpm_step`, `add_noise`, `tweedie`) and
# python/emu/diffusion/schedules.py (`_cosine_tables`); read their docstrings for the notation:
#
#     q_sample:  x_t = sqrt(ᾱ_t) x_clean + sqrt(1 - ᾱ_t) ε
#     Tweedie:   x̂_clean = (x_t - sqrt(1 - ᾱ_t) ε̂) / sqrt(ᾱ_t)
#     p_sample:  x_{t-1} = (1/sqrt(α_t)) (x_t - β_t/sqrt(1 - ᾱ_t) ε̂) + σ_t z
#
# Levels are per sample: every coefficient is a vector of length batch (the last dimension), given
# in Float64 by the caller (Python gathers them from its float64 tables) and rounded to the
# element type at entry, as Python's `_gather_checked` casts to the sample's dtype. The kernels
# are KernelAbstractions kernels: the same source runs on the CPU (any Julia user can test them) and
# on CUDA arrays (extension). Sample b of element i (linear index) is (i - 1) ÷ per_sample + 1, with
# per_sample the product of all dimensions but the last.
#
# On a GPU these kernels are a correctness path, not a fast one: the coefficients arrive as host
# vectors and are copied to the device on every call, and every call synchronises (CUDA.jl's own
# stream). Python therefore runs DDPM steps on CUDA tensors with emu's CuPy kernels (same Philox
# noise, on torch's stream; python/emu/julia.py, `fused_ddpm_step`), and Julia's only on request.

"Per-sample coefficients: `values` rounded to `T` and copied next to `like` (host or device)."
function sample_coefficients(
    like::AbstractArray,
    ::Type{T},
    values::AbstractVector,
    name::AbstractString,
) where {T}
    batch = size(like, ndims(like))
    length(values) == batch ||
        throw(DimensionMismatch(
            "$name must have length batch = $batch (the last dimension), got $(length(values))",
        ))
    return similar_on(like, T.(Array(values)))
end

function check_same_size(
    name::AbstractString,
    array::AbstractArray,
    reference_name::AbstractString,
    reference::AbstractArray,
)
    size(array) == size(reference) ||
        throw(DimensionMismatch(
            "$name must have the size of $reference_name, $(size(reference)), got $(size(array))",
        ))
    return nothing
end

samples_size(array::AbstractArray) = length(array) ÷ size(array, ndims(array))

@kernel function ddpm_step_philox_kernel!(
    out,
    noisy,
    predicted_noise,
    reciprocal_sqrt_alpha,
    noise_coefficient,
    posterior_std,
    n_elements,
    per_sample,
    key,
    offsets,
)
    g = @index(Global, Linear)
    normals = philox_group_normals(UInt64(g - 1), key, offsets)
    T = eltype(out)
    for lane in 1:4
        i = 4 * (g - 1) + lane
        if i <= n_elements
            b = (i - 1) ÷ per_sample + 1
            @inbounds begin
                # (1) the mean, Ho et al. eq. 11; (2) ancestral noise with the posterior std.
                mean = reciprocal_sqrt_alpha[b] *
                    (T(noisy[i]) - noise_coefficient[b] * T(predicted_noise[i]))
                out[i] = mean + posterior_std[b] * T(normals[lane])
            end
        end
    end
end

@kernel function ddpm_step_noise_kernel!(
    out,
    noisy,
    predicted_noise,
    reciprocal_sqrt_alpha,
    noise_coefficient,
    posterior_std,
    noise,
    per_sample,
)
    i = @index(Global, Linear)
    b = (i - 1) ÷ per_sample + 1
    T = eltype(out)
    @inbounds begin
        mean = reciprocal_sqrt_alpha[b] *
            (T(noisy[i]) - noise_coefficient[b] * T(predicted_noise[i]))
        out[i] = mean + posterior_std[b] * T(noise[i])
    end
end

"""
    ddpm_step!(out, noisy, predicted_noise, reciprocal_sqrt_alpha, noise_coefficient, posterior_std,
               seed, offset) -> out

One ancestral DDPM reverse step with the noise drawn inside the kernel from Philox (seed, offset):

    out[i] = rsa[b] * (noisy[i] - c1[b] * ε̂[i]) + σ[b] * z[i],   z = philox_normal(seed, offset)

for sample b of element i. `noisy`, `predicted_noise` and `out` share one size (batch last, any
number of dimensions, Float32 or Float64, host or device); the three coefficient vectors have
length batch (Float64, rounded to the element type here). `out` may be `noisy`. Equals Python's
`ddpm_step(noisy, levels, predicted_noise, schedule, noise=philox_normal(shape, seed, offset))`.
"""
function ddpm_step!(
    out::AbstractArray{T},
    noisy::AbstractArray,
    predicted_noise::AbstractArray,
    reciprocal_sqrt_alpha::AbstractVector,
    noise_coefficient::AbstractVector,
    posterior_std::AbstractVector,
    seed::Integer,
    offset::Integer,
) where {T <: Union{Float32, Float64}}
    check_same_size("noisy", noisy, "out", out)
    check_same_size("predicted_noise", predicted_noise, "out", out)
    key = philox_key(seed)
    offsets = offset_words(offset)
    rsa = sample_coefficients(out, T, reciprocal_sqrt_alpha, "reciprocal_sqrt_alpha")
    c1 = sample_coefficients(out, T, noise_coefficient, "noise_coefficient")
    sigma = sample_coefficients(out, T, posterior_std, "posterior_std")
    n_elements = length(out)
    n_elements == 0 && return out
    backend = kernel_backend(out)
    ddpm_step_philox_kernel!(backend)(
        out,
        noisy,
        predicted_noise,
        rsa,
        c1,
        sigma,
        n_elements,
        samples_size(out),
        key,
        offsets;
        ndrange = cld(n_elements, 4),
    )
    KernelAbstractions.synchronize(backend)
    return out
end

"""
    ddpm_step!(out, noisy, predicted_noise, reciprocal_sqrt_alpha, noise_coefficient, posterior_std,
               noise::AbstractArray) -> out

The same step with the noise `z` given (cast to the element type). Twin of Python's
`ddpm_step(..., noise=noise)`.
"""
function ddpm_step!(
    out::AbstractArray{T},
    noisy::AbstractArray,
    predicted_noise::AbstractArray,
    reciprocal_sqrt_alpha::AbstractVector,
    noise_coefficient::AbstractVector,
    posterior_std::AbstractVector,
    noise::AbstractArray,
) where {T <: Union{Float32, Float64}}
    check_same_size("noisy", noisy, "out", out)
    check_same_size("predicted_noise", predicted_noise, "out", out)
    check_same_size("noise", noise, "out", out)
    rsa = sample_coefficients(out, T, reciprocal_sqrt_alpha, "reciprocal_sqrt_alpha")
    c1 = sample_coefficients(out, T, noise_coefficient, "noise_coefficient")
    sigma = sample_coefficients(out, T, posterior_std, "posterior_std")
    isempty(out) && return out
    backend = kernel_backend(out)
    ddpm_step_noise_kernel!(backend)(
        out,
        noisy,
        predicted_noise,
        rsa,
        c1,
        sigma,
        noise,
        samples_size(out);
        ndrange = length(out),
    )
    KernelAbstractions.synchronize(backend)
    return out
end

@kernel function add_noise_kernel!(
    out,
    clean,
    sqrt_alpha_bar,
    sqrt_one_minus_alpha_bar,
    n_elements,
    per_sample,
    key,
    offsets,
)
    g = @index(Global, Linear)
    normals = philox_group_normals(UInt64(g - 1), key, offsets)
    T = eltype(out)
    for lane in 1:4
        i = 4 * (g - 1) + lane
        if i <= n_elements
            b = (i - 1) ÷ per_sample + 1
            @inbounds out[i] = sqrt_alpha_bar[b] * T(clean[i]) +
                sqrt_one_minus_alpha_bar[b] * T(normals[lane])
        end
    end
end

"""
    add_noise!(out, clean, sqrt_alpha_bar, sqrt_one_minus_alpha_bar, seed, offset) -> out

Forward noising (q_sample) to each sample's level with Philox noise ε = philox_normal(seed, offset):
`out[i] = sqrt(ᾱ)[b] * clean[i] + sqrt(1 - ᾱ)[b] * ε[i]`. Twin of Python's
`add_noise(schedule, clean, levels, philox_normal(shape, seed, offset))`.
"""
function add_noise!(
    out::AbstractArray{T},
    clean::AbstractArray,
    sqrt_alpha_bar::AbstractVector,
    sqrt_one_minus_alpha_bar::AbstractVector,
    seed::Integer,
    offset::Integer,
) where {T <: Union{Float32, Float64}}
    check_same_size("clean", clean, "out", out)
    key = philox_key(seed)
    offsets = offset_words(offset)
    signal = sample_coefficients(out, T, sqrt_alpha_bar, "sqrt_alpha_bar")
    noise_scale = sample_coefficients(
        out,
        T,
        sqrt_one_minus_alpha_bar,
        "sqrt_one_minus_alpha_bar",
    )
    n_elements = length(out)
    n_elements == 0 && return out
    backend = kernel_backend(out)
    add_noise_kernel!(backend)(
        out,
        clean,
        signal,
        noise_scale,
        n_elements,
        samples_size(out),
        key,
        offsets;
        ndrange = cld(n_elements, 4),
    )
    KernelAbstractions.synchronize(backend)
    return out
end

@kernel function tweedie_kernel!(
    out,
    noisy,
    predicted_noise,
    sqrt_alpha_bar,
    sqrt_one_minus_alpha_bar,
    per_sample,
)
    i = @index(Global, Linear)
    b = (i - 1) ÷ per_sample + 1
    T = eltype(out)
    @inbounds out[i] = (T(noisy[i]) - sqrt_one_minus_alpha_bar[b] * T(predicted_noise[i])) /
        sqrt_alpha_bar[b]
end

"""
    tweedie!(out, noisy, predicted_noise, sqrt_alpha_bar, sqrt_one_minus_alpha_bar) -> out

Tweedie's estimate of the clean sample: `out[i] = (noisy[i] - sqrt(1 - ᾱ)[b] ε̂[i]) / sqrt(ᾱ)[b]`.
Twin of Python's `tweedie(schedule, noisy, levels, predicted_noise)`.
"""
function tweedie!(
    out::AbstractArray{T},
    noisy::AbstractArray,
    predicted_noise::AbstractArray,
    sqrt_alpha_bar::AbstractVector,
    sqrt_one_minus_alpha_bar::AbstractVector,
) where {T <: Union{Float32, Float64}}
    check_same_size("noisy", noisy, "out", out)
    check_same_size("predicted_noise", predicted_noise, "out", out)
    signal = sample_coefficients(out, T, sqrt_alpha_bar, "sqrt_alpha_bar")
    noise_scale = sample_coefficients(
        out,
        T,
        sqrt_one_minus_alpha_bar,
        "sqrt_one_minus_alpha_bar",
    )
    isempty(out) && return out
    backend = kernel_backend(out)
    tweedie_kernel!(backend)(
        out,
        noisy,
        predicted_noise,
        signal,
        noise_scale,
        samples_size(out);
        ndrange = length(out),
    )
    KernelAbstractions.synchronize(backend)
    return out
end

"""
    cosine_schedule(num_levels=1000; offset=0.008, max_beta=0.999) -> NamedTuple of Vector{Float64}

Every table of the cosine schedule (Nichol & Dhariwal 2021, eq. 17) in Float64: `betas`, `alphas`,
`alpha_bars`, `alpha_bars_previous`, `sqrt_alpha_bars`, `sqrt_one_minus_alpha_bars`,
`reciprocal_sqrt_alphas`, `noise_coefficients`, `posterior_variances`, `posterior_stds`; entry
t + 1 is level t. Twin of `emu.diffusion.schedules._cosine_tables`.
"""
function cosine_schedule(
    num_levels::Integer = 1000;
    offset::Real = 0.008,
    max_beta::Real = 0.999,
)
    num_levels >= 2 ||
        throw(ArgumentError("num_levels must be an integer >= 2, got $num_levels"))
    (isfinite(offset) && offset > 0) ||
        throw(ArgumentError("offset must be a finite number > 0, got $offset"))
    0 < max_beta < 1 ||
        throw(ArgumentError(
            "max_beta must be a number in the open interval (0, 1), got $max_beta",
        ))
    u = collect(0:num_levels) ./ num_levels
    f = cos.((u .+ offset) ./ (1 + offset) .* (π / 2)).^2
    betas = clamp.(1 .- f[2:end] ./ f[1:(end - 1)], 0.0, max_beta)
    alphas = 1 .- betas
    alpha_bars = cumprod(alphas)
    alpha_bars_previous = vcat(1.0, alpha_bars[1:(end - 1)])
    one_minus_alpha_bars = 1 .- alpha_bars
    posterior_variances = betas .* (1 .- alpha_bars_previous) ./ one_minus_alpha_bars
    return (
        betas = betas,
        alphas = alphas,
        alpha_bars = alpha_bars,
        alpha_bars_previous = alpha_bars_previous,
        sqrt_alpha_bars = sqrt.(alpha_bars),
        sqrt_one_minus_alpha_bars = sqrt.(one_minus_alpha_bars),
        reciprocal_sqrt_alphas = 1 ./ sqrt.(alphas),
        noise_coefficients = betas ./ sqrt.(one_minus_alpha_bars),
        posterior_variances = posterior_variances,
        posterior_stds = sqrt.(posterior_variances),
    )
end
