# Run one of emu's systems from Julia with the Emu package alone (no Python).
#
#     julia --project=. -e 'using Pkg; Pkg.instantiate()'          # once (Julia 1.11+; on 1.10 also
#                                                                   #   Pkg.develop(path="julia"))
#     julia --project=. scripts/simulate.jl system=kolmogorov grid_size=128 steps=2000 batch=2
#     julia --project=. scripts/simulate.jl system=qg preset=jet grid_size=64 steps=5000 dtype=float32
#     julia --project=. scripts/simulate.jl system=kolmogorov device=cuda    # needs `] add CUDA`
#
# Arguments are key=value pairs: system (kolmogorov | qg), preset, steps, report_every, batch,
# dtype (float32 | float64), device (cpu | cuda), seed, out (a file for the final fields: raw
# little-endian bytes, read in numpy as `np.fromfile(out, dtype).reshape(shape)` with the numpy
# shape printed at the end), and any config field (grid_size, viscosity, dt, beta, ...; numbers are
# parsed as Int when they look like one, else Float64).

using Emu

const RUN_KEYS = (
    "system",
    "preset",
    "steps",
    "report_every",
    "batch",
    "dtype",
    "device",
    "seed",
    "out",
)

function parse_arguments(arguments)
    settings = Dict{String, String}()
    for argument in arguments
        key, value = occursin("=", argument) ?
            split(argument, "="; limit = 2) :
            error("arguments are key=value pairs, got $(repr(argument))")
        settings[String(key)] = String(value)
    end
    return settings
end

function parse_value(text::AbstractString)
    integer = tryparse(Int, text)
    integer === nothing || return integer
    number = tryparse(Float64, text)
    return number === nothing ? String(text) : number
end

function simulate(settings::Dict{String, String})
    system = get(settings, "system", "kolmogorov")
    steps = parse(Int, get(settings, "steps", "1000"))
    report_every = parse(Int, get(settings, "report_every", string(max(steps ÷ 10, 1))))
    batch = parse(Int, get(settings, "batch", "1"))
    dtype = get(settings, "dtype", "float64")
    device_name = get(settings, "device", "cpu")
    seed = parse(Int, get(settings, "seed", "0"))
    overrides = Dict(
        Symbol(key) => parse_value(value)
        for (key, value) in settings
        if !(key in RUN_KEYS)
    )
    config = make_config(system; preset = get(settings, "preset", nothing), overrides...)
    T = dtype == "float32" ? Float32 : Float64
    device = Emu.make_device(device_name)
    problem = Problem(config; batch = batch, T = T, device = device, seed = seed)
    println(
        "emu (Julia): $system, preset $(config.preset), $(config.grid_size)^2, batch $batch, $dtype on $device_name",
    )
    println("dt = $(config.dt); default stepper $(Emu.default_stepper(problem.equation))")
    report(p) = println(
        "step $(lpad(p.steps, 7))  t = $(round(p.time; sigdigits = 6))  ",
        "energy = $(round.(energy(p); sigdigits = 6))  ",
        "CFL = $(round(courant_number(p); sigdigits = 3))",
    )
    report(problem)
    started = time_ns()
    run!(problem, steps; save_every = report_every, on_save = (p, _) -> report(p))
    seconds = (time_ns() - started) / 1.0e9
    println(
        "$steps steps in $(round(seconds; digits = 2)) s (with reports): $(round(steps / seconds; sigdigits = 4)) steps/s",
    )
    if haskey(settings, "out")
        fields = get_fields(problem)
        write(settings["out"], htol.(fields))
        println("wrote $(settings["out"]): $dtype, numpy shape $(reverse(size(fields)))")
    end
    return problem
end

function main(arguments)
    settings = parse_arguments(arguments)
    if get(settings, "device", "cpu") != "cpu"
        Base.find_package("CUDA") === nothing &&
            error(
                "device=$(settings["device"]) needs CUDA.jl in this environment: `] add CUDA`",
            )
        @eval Main using CUDA
    end
    # The latest world sees the methods the CUDA extension has just added.
    return Base.invokelatest(simulate, settings)
end

main(ARGS)
