# Counter-based Gaussian noise: Philox4x32-10 + Box-Muller.
# Twin of python/emu/diffusion/philox.py, whose docstring defines emu's noise convention:
#
#     element i (0-based C flat index = Julia linear index - 1 of the reversed-dims array)
#     group g = i ÷ 4, lane = i % 4
#     counter = (g lo, g hi, offset lo, offset hi), key = (seed lo, seed hi)
#     (r0, r1, r2, r3) = philox4x32_10(counter, key), u(r) = (r + 0.5) 2^-32
#     z[4g + 0, 1] = sqrt(-2 ln u(r0)) (cos, sin)(2π u(r1)),  z[4g + 2, 3] likewise from (r2, r3)
#
# Box-Muller in Float64, then rounded once to the element type.

const PHILOX_M0 = 0xD2511F53
const PHILOX_M1 = 0xCD9E8D57
const PHILOX_W0 = 0x9E3779B9
const PHILOX_W1 = 0xBB67AE85
const PHILOX_ROUNDS = 10
const TWO_POW_MINUS_32 = 2.0^-32

"""
    philox4x32_10(counter::NTuple{4,UInt32}, key::NTuple{2,UInt32}) -> NTuple{4,UInt32}

Philox4x32-10 of one counter (Salmon et al. 2011; Random123). Known answer: counter 0, key 0 ->
`(0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)`. Twin of `emu.diffusion.philox.philox4x32_10`
(one counter instead of an array of them); runs inside GPU kernels.
"""
@inline function philox4x32_10(counter::NTuple{4, UInt32}, key::NTuple{2, UInt32})
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_index in 0:(PHILOX_ROUNDS - 1)
        if round_index > 0
            # the key schedule: bump before every round but the first
            k0 += PHILOX_W0
            k1 += PHILOX_W1
        end
        product0 = UInt64(PHILOX_M0) * UInt64(c0)
        product1 = UInt64(PHILOX_M1) * UInt64(c2)
        hi0, lo0 = (product0 >> 32) % UInt32, product0 % UInt32
        hi1, lo1 = (product1 >> 32) % UInt32, product1 % UInt32
        c0, c1, c2, c3 = (hi1 ⊻ c1 ⊻ k0, lo1, hi0 ⊻ c3 ⊻ k1, lo0)
    end
    return (c0, c1, c2, c3)
end

"""
    philox_key(seed) -> NTuple{2,UInt32}

The key of a 64-bit seed: (low word, high word). Twin of `emu.diffusion.philox.philox_key`.
"""
function philox_key(seed::Integer)
    value = check_uint64("seed", seed)
    return (value % UInt32, (value >> 32) % UInt32)
end

"""
    philox_counter(group, offset_words) -> NTuple{4,UInt32}

The counter of group `group` (0-based) at call offset `(lo, hi)`. Twin of one row of
`emu.diffusion.philox.philox_counters`.
"""
@inline function philox_counter(group::UInt64, offset_words::NTuple{2, UInt32})
    return (group % UInt32, (group >> 32) % UInt32, offset_words[1], offset_words[2])
end

"Offset as its (low, high) words, checked like `_check_uint64`."
function offset_words(offset::Integer)
    value = check_uint64("offset", offset)
    return (value % UInt32, (value >> 32) % UInt32)
end

"""
    box_muller(r_radius, r_angle) -> (Float64, Float64)

Two standard normals from two words: sqrt(-2 ln u0) (cos, sin)(2π u1), in Float64. Twin of
`emu.diffusion.philox.box_muller` (same operation order: `2.0 * π * u`).
"""
@inline function box_muller(r_radius::UInt32, r_angle::UInt32)
    u_radius = (Float64(r_radius) + 0.5) * TWO_POW_MINUS_32
    u_angle = (Float64(r_angle) + 0.5) * TWO_POW_MINUS_32
    radius = sqrt(-2.0 * log(u_radius))
    angle = 2.0 * Float64(π) * u_angle
    return radius * cos(angle), radius * sin(angle)
end

"""
    philox_group_normals(group, key, offset_words) -> NTuple{4,Float64}

The four normals of group `group` (elements 4g .. 4g + 3, 0-based).
"""
@inline function philox_group_normals(
    group::UInt64,
    key::NTuple{2, UInt32},
    offset_words::NTuple{2, UInt32},
)
    r0, r1, r2, r3 = philox4x32_10(philox_counter(group, offset_words), key)
    z0, z1 = box_muller(r0, r1)
    z2, z3 = box_muller(r2, r3)
    return (z0, z1, z2, z3)
end

function check_uint64(name::AbstractString, value::Integer)
    (value isa Bool || !(0 <= value <= typemax(UInt64))) &&
        throw(ArgumentError("$name must be an integer in [0, 2^64 - 1], got $value"))
    return UInt64(value)
end

# One work item per group of four elements: one Philox call gives all four normals.
@kernel function philox_normal_kernel!(out, n_elements, key, offsets)
    g = @index(Global, Linear)
    normals = philox_group_normals(UInt64(g - 1), key, offsets)
    T = eltype(out)
    for lane in 1:4
        i = 4 * (g - 1) + lane
        if i <= n_elements
            @inbounds out[i] = T(normals[lane])
        end
    end
end

"""
    philox_normal!(out, seed, offset=0) -> out

Fills `out` (Float32 or Float64, any shape, host or device) with standard normal noise from
(seed, offset) by emu's convention: element `i` (linear index) takes the value numpy's
`philox_normal(shape, seed, offset)` gives at C flat index `i - 1` when `out` has numpy's shape
reversed. A KernelAbstractions kernel (CPU or CUDA). Twin of `emu.diffusion.philox.philox_normal`.
"""
function philox_normal!(
    out::AbstractArray{T},
    seed::Integer,
    offset::Integer = 0,
) where {T <: Union{Float32, Float64}}
    key = philox_key(seed)
    offsets = offset_words(offset)
    n_elements = length(out)
    n_elements == 0 && return out
    backend = kernel_backend(out)
    philox_normal_kernel!(backend)(
        out,
        n_elements,
        key,
        offsets;
        ndrange = cld(n_elements, 4),
    )
    KernelAbstractions.synchronize(backend)
    return out
end

"""
    philox_normal(dims, seed, offset=0; T=Float32) -> Array{T}

A new host array of normals (see `philox_normal!`); `dims` in Julia order.
"""
function philox_normal(dims::Dims, seed::Integer, offset::Integer = 0; T::Type = Float32)
    T in (Float32, Float64) || throw(ArgumentError("T must be Float32 or Float64, got $T"))
    return philox_normal!(Array{T}(undef, dims), seed, offset)
end
