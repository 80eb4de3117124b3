# Throughput of emu's Julia solvers and DDPM kernels, from Julia with the Emu package alone.
#
#     julia --project=. scripts/benchmark.jl                       # both systems, 64..256, float32/64
#     julia --project=. -t 2 scripts/benchmark.jl grids=64,128 dtypes=float64 batch=4 seconds=3
#     julia --project=. scripts/benchmark.jl device=cuda grids=256,512   # needs `] add CUDA`
#
# Measured as emu's Python `bench` measures (python/emu/bench.py): build the problem (FFTW_MEASURE
# plans on the CPU), take warm-up steps, then step for about `seconds` of wall time; report steps/s
# (one step of the whole batch), trajectory-steps/s (batch * steps/s) and million grid-point updates
# per second. The DDPM line times the fused Philox step on a (64, 64, 2, 32) Float32 batch.
# Start Julia with threads (`-t N`) to let FFTW and the KernelAbstractions CPU kernels use N cores.

using Emu

function parse_arguments(arguments)
    settings = Dict{String, String}()
    for argument in arguments
        occursin("=", argument) ||
            error("arguments are key=value pairs, got $(repr(argument))")
        key, value = split(argument, "="; limit = 2)
        settings[String(key)] = String(value)
    end
    return settings
end

"Calls of `f` per second over about `seconds` (at least `minimum` calls) after `warmup` calls."
function calls_per_second(f, seconds::Real; warmup::Integer = 5, minimum::Integer = 10)
    for _ in 1:warmup
        f()
    end
    count = 0
    started = time_ns()
    while (time_ns() - started) / 1.0e9 < seconds || count < minimum
        f()
        count += 1
    end
    return count / ((time_ns() - started) / 1.0e9)
end

function benchmark(settings::Dict{String, String})
    systems = split(get(settings, "systems", "kolmogorov,qg"), ",")
    grids = parse.(Int, split(get(settings, "grids", "64,128,256"), ","))
    dtypes = split(get(settings, "dtypes", "float32,float64"), ",")
    batch = parse(Int, get(settings, "batch", "1"))
    seconds = parse(Float64, get(settings, "seconds", "2"))
    device_name = get(settings, "device", "cpu")
    device = Emu.make_device(device_name)
    println(
        "emu Julia benchmark: device $device_name, $(Threads.nthreads()) Julia thread(s), batch $batch",
    )
    println(
        rpad("system", 12),
        rpad("grid", 6),
        rpad("dtype", 9),
        lpad("steps/s", 10),
        lpad("traj-steps/s", 14),
        lpad("Mpts/s", 10),
    )
    for system in systems, grid in grids, dtype in dtypes
        config = make_config(String(system); grid_size = grid)
        T = dtype == "float32" ? Float32 : Float64
        problem = Problem(config; batch = batch, T = T, device = device, seed = 0)
        # stepforward! returns after the device has finished, so every call is timed to completion.
        rate = calls_per_second(() -> stepforward!(problem, 1), seconds)
        all_finite(problem) || error("$system $grid $dtype: the state became non-finite")
        println(
            rpad(system, 12),
            rpad(grid, 6),
            rpad(dtype, 9),
            lpad(round(rate; sigdigits = 4), 10),
            lpad(round(rate * batch; sigdigits = 4), 14),
            lpad(round(rate * batch * grid^2 / 1.0e6; sigdigits = 4), 10),
        )
    end
    # The fused DDPM step: one kernel reads x_t and eps_hat, draws Philox noise and writes x_{t-1}.
    host = randn(Float32, 64, 64, 2, 32)
    noisy = device_name == "cpu" ? host : Emu.to_device(device, host)
    predicted = copy(noisy)
    out = similar(noisy)
    tables = cosine_schedule(1000)
    levels = collect(1:32) .* 30
    offset = Ref(0)
    rate = calls_per_second(seconds) do
        offset[] += 1
        ddpm_step!(
            out,
            noisy,
            predicted,
            tables.reciprocal_sqrt_alphas[levels],
            tables.noise_coefficients[levels],
            tables.posterior_stds[levels],
            1234,
            offset[],
        )
    end
    println(
        "fused DDPM step, (64, 64, 2, 32) Float32: $(round(rate; sigdigits = 4)) calls/s, ",
        "$(round(rate * length(out) / 1.0e9; sigdigits = 4)) G elements/s",
    )
    return nothing
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
    return Base.invokelatest(benchmark, settings)
end

main(ARGS)
