# System configs: validated parameter sets, presets, JSON in and out.
# Twin of python/emu/systems/base.py and the config classes of systems/kolmogorov.py and qg.py.

"""
    ConfigError(message)

An invalid parameter; the message names the field and its allowed range. Twin of
`emu.systems.base.ConfigError`.
"""
struct ConfigError <: Exception
    message::String
end

Base.showerror(io::IO, error::ConfigError) = print(io, "ConfigError: ", error.message)

"Twin of `emu.systems.base.require`."
function require(condition::Bool, field::AbstractString, allowed::AbstractString, value)
    condition || throw(ConfigError("$field must be $allowed, got $(repr(value))"))
    return nothing
end

is_number(value) = value isa Real && !(value isa Bool)

"Twin of `emu.systems.base.require_finite`."
function require_finite(field, value)
    return require(is_number(value) && isfinite(value), field, "a finite number", value)
end

"Twin of `emu.systems.base.require_positive`."
function require_positive(field, value)
    require_finite(field, value)
    return require(value > 0, field, "> 0", value)
end

"Twin of `emu.systems.base.require_nonnegative`."
function require_nonnegative(field, value)
    require_finite(field, value)
    return require(value >= 0, field, ">= 0", value)
end

"Twin of `emu.systems.base.require_power_of_two`."
function require_power_of_two(field, value; minimum::Integer = 8, maximum::Integer = 8192)
    ok = value isa Integer &&
        !(value isa Bool) &&
        minimum <= value <= maximum &&
        ispow2(value)
    return require(ok, field, "a power of two between $minimum and $maximum", value)
end

"Twin of `emu.systems.base.require_choice`."
function require_choice(field, value, choices::Tuple)
    return require(value in choices, field, "one of $choices", value)
end

"Supertype of `KolmogorovConfig` and `QGConfig` (twin of `emu.systems.base.SystemConfig`)."
abstract type SystemConfig end

const KOLMOGOROV_PRESETS = Dict{String, Dict{String, Any}}(
    # Kochkov et al. (2021): Re = 1000.
    "re1000" => Dict{String, Any}("viscosity" => 1.0e-3),
    # The Thermalizer repository's data config.
    "re5000" => Dict{String, Any}("viscosity" => 2.0e-4),
    # What the Thermalizer and SNS runs read (their data folder says Re 10^4).
    "re10000" => Dict{String, Any}("viscosity" => 1.0e-4),
)

"""
    KolmogorovConfig(; grid_size=128, viscosity=1e-3, drag=0.1, forcing_wavenumber=4,
                     forcing_amplitude=1.0, domain_extent=2π, dt=nothing, max_velocity=7.0,
                     peak_wavenumber=4.0, cfl_safety=0.5, max_cfl=1.0, dealias="two_thirds",
                     preset="re1000")

Parameters of Kolmogorov flow (nondimensional), validated on construction; `dt = nothing` picks
`cfl_safety * dx / max_velocity`. Twin of `emu.systems.kolmogorov.KolmogorovConfig` (same fields,
defaults, checks and messages); see there for the meaning of each field. Presets: `"re1000"`
(ν = 1e-3), `"re5000"` (2e-4), `"re10000"` (1e-4).
"""
struct KolmogorovConfig <: SystemConfig
    grid_size::Int
    viscosity::Float64
    drag::Float64
    forcing_wavenumber::Int
    forcing_amplitude::Float64
    domain_extent::Float64
    dt::Float64
    max_velocity::Float64
    peak_wavenumber::Float64
    cfl_safety::Float64
    max_cfl::Float64
    dealias::String
    preset::String
end

function KolmogorovConfig(;
    grid_size = 128,
    viscosity = 1.0e-3,
    drag = 0.1,
    forcing_wavenumber = 4,
    forcing_amplitude = 1.0,
    domain_extent = 2π,
    dt = nothing,
    max_velocity = 7.0,
    peak_wavenumber = 4.0,
    cfl_safety = 0.5,
    max_cfl = 1.0,
    dealias = "two_thirds",
    preset = "re1000",
)
    require_power_of_two("grid_size", grid_size)
    require_nonnegative("viscosity", viscosity)
    require_nonnegative("drag", drag)
    require(
        forcing_wavenumber isa Integer &&
            !(forcing_wavenumber isa Bool) &&
            0 <= forcing_wavenumber < grid_size ÷ 3,
        "forcing_wavenumber",
        "an integer in [0, grid_size/3) = [0, $(grid_size ÷ 3))",
        forcing_wavenumber,
    )
    require_nonnegative("forcing_amplitude", forcing_amplitude)
    require_positive("domain_extent", domain_extent)
    require_positive("max_velocity", max_velocity)
    require_positive("peak_wavenumber", peak_wavenumber)
    require(
        is_number(cfl_safety) && 0 < cfl_safety <= 1,
        "cfl_safety",
        "in (0, 1]",
        cfl_safety,
    )
    require_positive("max_cfl", max_cfl)
    require_choice("dealias", dealias, ("two_thirds", "jax-cfd"))
    if dt === nothing
        spacing = domain_extent / grid_size
        dt = cfl_safety * spacing / max_velocity
    end
    require_positive("dt", dt)
    require(preset isa AbstractString, "preset", "a string", preset)
    return KolmogorovConfig(
        grid_size,
        viscosity,
        drag,
        forcing_wavenumber,
        forcing_amplitude,
        domain_extent,
        dt,
        max_velocity,
        peak_wavenumber,
        cfl_safety,
        max_cfl,
        dealias,
        preset,
    )
end

const QG_FILTERS = ("exponential", "sharp", "none")

const QG_PRESETS = Dict{String, Dict{String, Any}}(
    "eddy" => Dict{String, Any}(
        "beta" => 1.5e-11,
        "bottom_drag" => 5.787e-7,
        "layer_depth_ratio" => 0.25,
    ),
    "jet" => Dict{String, Any}(
        "beta" => 1.0e-11,
        "bottom_drag" => 7.0e-8,
        "layer_depth_ratio" => 0.1,
    ),
)

"""
    QGConfig(; grid_size=64, domain_length=1e6, deformation_radius=15_000.0,
             upper_layer_depth=500.0, layer_depth_ratio=0.25, upper_layer_velocity=0.025,
             lower_layer_velocity=0.0, beta=1.5e-11, bottom_drag=5.787e-7, filter="exponential",
             filter_factor=23.6, dt=3600.0, max_cfl=1.0, preset="eddy")

Parameters of the two-layer QG model (SI units), validated on construction. Twin of
`emu.systems.qg.QGConfig`; presets `"eddy"` and `"jet"` (Ross et al. 2023).
"""
struct QGConfig <: SystemConfig
    grid_size::Int
    domain_length::Float64
    deformation_radius::Float64
    upper_layer_depth::Float64
    layer_depth_ratio::Float64
    upper_layer_velocity::Float64
    lower_layer_velocity::Float64
    beta::Float64
    bottom_drag::Float64
    filter::String
    filter_factor::Float64
    dt::Float64
    max_cfl::Float64
    preset::String
end

function QGConfig(;
    grid_size = 64,
    domain_length = 1.0e6,
    deformation_radius = 15_000.0,
    upper_layer_depth = 500.0,
    layer_depth_ratio = 0.25,
    upper_layer_velocity = 0.025,
    lower_layer_velocity = 0.0,
    beta = 1.5e-11,
    bottom_drag = 5.787e-7,
    filter = "exponential",
    filter_factor = 23.6,
    dt = 3600.0,
    max_cfl = 1.0,
    preset = "eddy",
)
    require_power_of_two("grid_size", grid_size)
    require_positive("domain_length", domain_length)
    require_positive("deformation_radius", deformation_radius)
    require_positive("upper_layer_depth", upper_layer_depth)
    require_positive("layer_depth_ratio", layer_depth_ratio)
    require_finite("upper_layer_velocity", upper_layer_velocity)
    require_finite("lower_layer_velocity", lower_layer_velocity)
    require_finite("beta", beta)
    require_nonnegative("bottom_drag", bottom_drag)
    require_choice("filter", filter, QG_FILTERS)
    require_positive("filter_factor", filter_factor)
    require_positive("dt", dt)
    require_positive("max_cfl", max_cfl)
    require(preset isa AbstractString, "preset", "a string", preset)
    return QGConfig(
        grid_size,
        domain_length,
        deformation_radius,
        upper_layer_depth,
        layer_depth_ratio,
        upper_layer_velocity,
        lower_layer_velocity,
        beta,
        bottom_drag,
        filter,
        filter_factor,
        dt,
        max_cfl,
        preset,
    )
end

system_name(::KolmogorovConfig) = "kolmogorov"
system_name(::QGConfig) = "qg"
system_name(::Type{KolmogorovConfig}) = "kolmogorov"
system_name(::Type{QGConfig}) = "qg"
presets(::Type{KolmogorovConfig}) = KOLMOGOROV_PRESETS
presets(::Type{QGConfig}) = QG_PRESETS
default_preset(::Type{KolmogorovConfig}) = "re1000"
default_preset(::Type{QGConfig}) = "eddy"

"Spacing dx = L / n (twin of the `spacing` properties)."
spacing(config::KolmogorovConfig) = config.domain_extent / config.grid_size
spacing(config::QGConfig) = config.domain_length / config.grid_size

"Lower layer depth H_2 = H_1 / δ (twin of `QGConfig.lower_layer_depth`)."
lower_layer_depth(config::QGConfig) = config.upper_layer_depth / config.layer_depth_ratio

"(F_1, F_2) = (1/(rd² (1+δ)), δ F_1) [1/m²] (twin of `QGConfig.coupling`)."
function coupling(config::QGConfig)
    f1 = 1.0 / (config.deformation_radius^2 * (1.0 + config.layer_depth_ratio))
    return f1, config.layer_depth_ratio * f1
end

"Thickness fractions (H_1/H, H_2/H) (twin of `QGConfig.layer_weights`)."
function layer_weights(config::QGConfig)
    total = config.upper_layer_depth + lower_layer_depth(config)
    return config.upper_layer_depth / total, lower_layer_depth(config) / total
end

"(β_1, β_2): planetary plus background-shear PV gradients (twin of `QGConfig.mean_pv_gradients`)."
function mean_pv_gradients(config::QGConfig)
    f1, f2 = coupling(config)
    shear = config.upper_layer_velocity - config.lower_layer_velocity
    return config.beta + f1 * shear, config.beta - f2 * shear
end

"""
    to_dict(config) -> Dict{String,Any}

The config's fields plus `"system"` (twin of `SystemConfig.to_dict`); `JSON3.write` of it is what
Python's `to_json` holds, up to key order.
"""
function to_dict(config::SystemConfig)
    values = Dict{String, Any}("system" => system_name(config))
    for name in fieldnames(typeof(config))
        values[String(name)] = getfield(config, name)
    end
    return values
end

"The config type of a system name (twin of `emu.systems._lookup`)."
function config_type_of(system)
    system == "kolmogorov" && return KolmogorovConfig
    system == "qg" && return QGConfig
    throw(ConfigError(
        "system must be one of (\"kolmogorov\", \"qg\"), got $(repr(system))",
    ))
end

"""
    config_from_dict(values) -> SystemConfig

Rebuilds a config from `to_dict` output or Python's `config.to_dict()`: the `"system"` key picks the
type, unknown keys are an error naming the allowed ones. Twin of `emu.systems.config_from_dict`
and `SystemConfig.from_dict`.
"""
function config_from_dict(values::AbstractDict)
    values = Dict{String, Any}(String(key) => value for (key, value) in values)
    system = pop!(values, "system", nothing)
    config_type = config_type_of(system)
    known = Set(String.(fieldnames(config_type)))
    unknown = sort!(collect(setdiff(keys(values), known)))
    if !isempty(unknown)
        throw(ConfigError(
            "unknown $system parameter(s) $unknown; allowed: $(sort!(collect(known)))",
        ))
    end
    return config_type(; (Symbol(key) => value for (key, value) in values)...)
end

"""
    config_from_json(text) -> SystemConfig

Parses Python's `config.to_json()` (JSON null becomes `nothing`). Used by `make_problem`.
"""
function config_from_json(text::AbstractString)
    parsed = JSON3.read(text)
    parsed isa JSON3.Object ||
        throw(ConfigError("config_json must hold a JSON object, got $text"))
    return config_from_dict(Dict{String, Any}(
        String(key) => value
        for (key, value) in parsed
    ))
end

"""
    make_config(system; preset=nothing, overrides...) -> SystemConfig

The config of `system` ("kolmogorov" or "qg") from `preset` (its default when `nothing`) with
`overrides` applied (`nothing` values ignored). Twin of `emu.systems.make_config`.
"""
function make_config(system::AbstractString; preset = nothing, overrides...)
    config_type = config_type_of(system)
    preset = preset === nothing ? default_preset(config_type) : String(preset)
    table = presets(config_type)
    require_choice("preset", preset, Tuple(sort!(collect(keys(table)))))
    values = Dict{String, Any}(table[preset])
    values["preset"] = preset
    values["system"] = system
    for (key, value) in overrides
        value === nothing || (values[String(key)] = value)
    end
    return config_from_dict(values)
end
