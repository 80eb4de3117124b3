# Tests of Emu: the shared fixtures written by the Python reference (tests/julia_fixtures.py),
# physics checks of both systems, the DDPM kernels on KernelAbstractions' CPU backend, and the same
# on CUDA when CUDA.jl is installed and a GPU works.
#
#     julia --project=julia -e 'using Pkg; Pkg.test()'
#
# CUDA is in julia/Project.toml's test target, so Pkg.test() installs it into the test environment
# (only there: for Emu itself it stays a weak dependency) and the CUDA testset runs wherever
# CUDA.functional() is true; elsewhere it is skipped with the reason.

using Emu
using Test
using TOML

# Loaded at top level (so its extension's methods are visible to the tests) where it is installed:
# always under Pkg.test(); maybe not when this file is run directly in another environment.
const CUDA_INSTALLED = Base.find_package("CUDA") !== nothing
if CUDA_INSTALLED
    using CUDA
end
const CUDA_WORKS = CUDA_INSTALLED && CUDA.functional()
const CUDA_SKIP_REASON = !CUDA_INSTALLED ?
    "CUDA.jl is not installed in this environment (Pkg.test() installs it: it is in the test target)" :
    "CUDA.jl is installed but CUDA.functional() is false (no GPU or driver; CUDA.versioninfo() says why)"

const FIXTURES = joinpath(@__DIR__, "..", "..", "tests", "fixtures", "julia")
const INDEX_FILE = joinpath(FIXTURES, "index.toml")
const FIXTURE_TYPES = Dict(
    "float32" => Float32,
    "float64" => Float64,
    "uint32" => UInt32,
    "int64" => Int64,
)
const STATE_RTOL = Dict(Float32 => 1.0e-4, Float64 => 1.0e-10)

"""
    load_array(index, name) -> Array

A fixture array: raw little-endian C-order bytes, shape given in numpy order, read reversed.
"""
function load_array(index::AbstractDict, name::AbstractString)
    entry = index["arrays"][name]
    T = FIXTURE_TYPES[entry["dtype"]]
    dims = Tuple(reverse(Int.(entry["shape"])))
    bytes = read(joinpath(FIXTURES, entry["file"]))
    length(bytes) == sizeof(T) * prod(dims) ||
        error("fixture $name: $(length(bytes)) bytes for $T$dims")
    return ltoh.(reshape(copy(reinterpret(T, bytes)), dims))
end

relative_error(actual, expected) = maximum(abs, Float64.(actual) .- Float64.(expected)) /
    maximum(abs, expected)

"Within `ulps` units in the last place of max(|expected|, 1), element by element."
function within_ulps(actual, expected, ulps)
    return all(
        abs.(actual .- expected) .<=
            ulps .* eps.(max.(abs.(expected), one(eltype(expected)))),
    )
end

const HAVE_FIXTURES = isfile(INDEX_FILE)
HAVE_FIXTURES ||
    @info "Skipping the fixture tests: $INDEX_FILE not found (run `python tests/julia_fixtures.py`)"
const INDEX = HAVE_FIXTURES ? TOML.parsefile(INDEX_FILE) : Dict{String, Any}()

"Runs one solver fixture case on `device` and returns the relative error of the final fields."
function solver_case_error(case::AbstractDict, device::AbstractString)
    problem = make_problem(
        case["config_json"],
        case["batch"],
        case["dtype"],
        device;
        planner = "FFTW_ESTIMATE",
    )
    @test Emu.default_stepper(problem.equation) == case["stepper"]
    initial = load_array(INDEX, case["initial"])
    expected = load_array(INDEX, case["final"])
    set_fields!(problem, initial)
    roundtrip = get_fields!(similar(initial), problem)
    @test relative_error(roundtrip, initial) < 100 * eps(eltype(initial))
    stepforward!(problem, case["num_steps"])
    @test all_finite(problem)
    @test 0 < courant_number(problem) < 1
    out = get_fields!(similar(expected), problem)
    return relative_error(out, expected)
end

@testset "Emu" begin
    @testset "configs" begin
        config = make_config("kolmogorov"; grid_size = 64)
        @test config.viscosity == 1.0e-3
        @test config.dt ≈ 0.5 * (2π / 64) / 7.0
        @test make_config("kolmogorov"; preset = "re10000").viscosity == 1.0e-4
        @test make_config("qg"; preset = "jet").beta == 1.0e-11
        @test_throws ConfigError KolmogorovConfig(grid_size = 100)
        @test_throws ConfigError KolmogorovConfig(grid_size = 32, forcing_wavenumber = 11)
        @test_throws ConfigError QGConfig(filter = "gaussian")
        @test_throws ConfigError make_config("kolmogorov"; preset = "re42")
        failure = try
            KolmogorovConfig(viscosity = -1.0)
        catch caught
            caught
        end
        @test failure isa ConfigError &&
            occursin("viscosity", failure.message) &&
            occursin(">= 0", failure.message)
        json = """{"system": "qg", "grid_size": 32, "dt": 1800.0, "filter": "sharp", "preset": "eddy"}"""
        @test config_from_json(json) isa QGConfig
        @test config_from_json(json).filter == "sharp"
        @test_throws ConfigError config_from_json("""{"system": "qg", "grid_sise": 32}""")
        @test Emu.config_from_dict(to_dict(config)) == config
        @test_throws ArgumentError make_problem(json, 1, "float16", "cpu")
        if !Emu.cuda_loaded()
            @test_throws ErrorException make_problem(json, 1, "float32", "cuda")
        end
    end

    @testset "devices and FFTW threads" begin
        # Twin of emu.backends.torch_device's name check.
        @test Emu.make_device("cpu") === CPU()
        @test Emu.make_device(" cpu ") === CPU()
        for name in ("gpu", "cuda:", "cuda:-1", "cuda:x", "CPU", "cuda:0:1")
            @test_throws ArgumentError Emu.make_device(name)
        end
        @test GPU() == GPU(0)
        if !Emu.cuda_loaded()
            @test_throws ErrorException Emu.make_device("cuda:1")
        end
        # Python's FFTWPlans: Julia's threads (or EMU_FFTW_THREADS) above the threshold, else one.
        withenv("EMU_FFTW_THREADS" => nothing) do
            @test Emu.fftw_threads(Emu.FFTW_THREADING_THRESHOLD) == Threads.nthreads()
            @test Emu.fftw_threads(Emu.FFTW_THREADING_THRESHOLD - 1) == 1
        end
        withenv("EMU_FFTW_THREADS" => "3") do
            @test Emu.fftw_threads(2^20) == 3
            @test Emu.fftw_threads(64) == 1
        end
        withenv("EMU_FFTW_THREADS" => "many") do
            @test_throws ArgumentError Emu.fftw_threads(2^20)
        end
        # A threaded plan (when Julia has threads) transforms as the single-threaded one does.
        x = reshape(collect(range(0.0, 1.0; length = 256 * 256 * 2)), 256, 256, 2)
        plan = Emu.rfft_plan(copy(x), (1, 2), Emu.fftw_flags("FFTW_ESTIMATE"))
        @test plan * x ≈ Emu.FFTW.rfft(x, (1, 2))
    end

    @testset "spectral operators" begin
        kx, ky = angular_wavenumbers(8, 2π)
        @test kx == [0.0, 1.0, 2.0, 3.0, 4.0]
        @test ky == [0.0, 1.0, 2.0, 3.0, -4.0, -3.0, -2.0, -1.0]
        mask = two_thirds_mask(64)
        @test size(mask) == (33, 64)
        @test sum(mask[:, 1]) == 22 # kx = 0..21 kept
        @test mask[23, 1] == 0.0    # kx = 22 removed
        sigma = exponential_filter(64)
        @test sigma[1, 1] == 1.0
        @test all(0 .<= sigma .<= 1)
        @test rfft_weights(8) == [1.0, 2.0, 2.0, 2.0, 1.0]
        jax = jax_cfd_mask(64)
        @test size(jax) == (33, 64)
        @test jax[1:21, 1:21] == mask[1:21, 1:21] # they differ only at index n/3
    end

    @testset "fixtures: solver state after N steps ($name)" for name in sort(collect(keys(
            get(INDEX, "solver", Dict()),
        )))
        case = INDEX["solver"][name]
        @test solver_case_error(case, "cpu") < STATE_RTOL[FIXTURE_TYPES[case["dtype"]]]
    end

    @testset "fixtures: Philox4x32-10 words" begin
        @test philox4x32_10(
            (0x00000000, 0x00000000, 0x00000000, 0x00000000),
            (0x00000000, 0x00000000),
        ) ==
            (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)
        if HAVE_FIXTURES
            counters = load_array(INDEX, INDEX["philox"]["counters"]) # (4, K)
            keys_ = load_array(INDEX, INDEX["philox"]["keys"])        # (2, K)
            words = load_array(INDEX, INDEX["philox"]["words"])       # (4, K)
            for k in axes(counters, 2)
                @test philox4x32_10(
                    NTuple{4, UInt32}(counters[:, k]),
                    NTuple{2, UInt32}(keys_[:, k]),
                ) ==
                    NTuple{4, UInt32}(words[:, k])
            end
        end
    end

    @testset "fixtures: philox_normal ($T)" for T in (
            HAVE_FIXTURES ? (Float32, Float64) : ()
        )
        philox = INDEX["philox"]
        expected = load_array(
            INDEX,
            philox[T == Float32 ? "normal_float32" : "normal_float64"],
        )
        got = philox_normal!(similar(expected), philox["seed"], philox["offset"])
        # Box-Muller runs in Float64 in both; libm's log/sin/cos may differ from numpy's by an ulp.
        @test within_ulps(got, expected, T == Float32 ? 1 : 4)
        @test philox_normal(size(expected), philox["seed"], philox["offset"]; T = T) == got
    end

    @testset "fixtures: DDPM kernels ($dtype)" for dtype in (
            HAVE_FIXTURES ? ("float32", "float64") : ()
        )
        case = INDEX["ddpm"][dtype]
        T = FIXTURE_TYPES[dtype]
        load(name) = load_array(INDEX, case[name])
        rsa, c1, sigma = load("reciprocal_sqrt_alpha"),
            load("noise_coefficient"),
            load("posterior_std")
        sqrt_alpha_bar, sqrt_one_minus = load("sqrt_alpha_bar"),
            load("sqrt_one_minus_alpha_bar")
        noisy, predicted, noise, clean = load("noisy"),
            load("predicted_noise"),
            load("noise"),
            load("clean")
        seed, offset = case["seed"], case["offset"]
        out = similar(noisy)
        # Philox noise: Float64 Box-Muller through Julia's libm against numpy's may differ by an ulp.
        noise_ulps = T == Float64 ? 8 : 2
        @test within_ulps(
            ddpm_step!(out, noisy, predicted, rsa, c1, sigma, noise),
            load("step_given_noise"),
            2,
        )
        @test within_ulps(
            ddpm_step!(out, noisy, predicted, rsa, c1, sigma, seed, offset),
            load("step_philox"),
            noise_ulps,
        )
        @test within_ulps(
            add_noise!(out, clean, sqrt_alpha_bar, sqrt_one_minus, seed, offset),
            load("add_noise"),
            noise_ulps,
        )
        @test within_ulps(
            tweedie!(out, noisy, predicted, sqrt_alpha_bar, sqrt_one_minus),
            load("tweedie"),
            2,
        )
        # Sample 1 sits at level 0: sigma is exactly 0, so the Philox step equals the given-noise step there.
        @test sigma[1] == 0
        @test out isa Array{T}
        # The schedule's tables, Julia twin against Python's.
        levels = load("levels") .+ 1
        tables = cosine_schedule(case["num_levels"])
        @test tables.reciprocal_sqrt_alphas[levels] ≈ rsa rtol = 1.0e-9
        @test tables.noise_coefficients[levels] ≈ c1 rtol = 1.0e-9
        @test tables.posterior_stds[levels] ≈ sigma rtol = 1.0e-9
        @test tables.sqrt_alpha_bars[levels] ≈ sqrt_alpha_bar rtol = 1.0e-9
        @test tables.sqrt_one_minus_alpha_bars[levels] ≈ sqrt_one_minus rtol = 1.0e-9
    end

    @testset "DDPM kernels: shapes and errors" begin
        x = randn(Float32, 5, 4, 3)
        @test_throws DimensionMismatch ddpm_step!(
            similar(x),
            x,
            x,
            ones(2),
            ones(2),
            ones(2),
            1,
            0,
        )
        @test_throws ArgumentError ddpm_step!(
            similar(x),
            x,
            x,
            ones(3),
            ones(3),
            ones(3),
            -1,
            0,
        )
        # In place (out === noisy) with sigma = 0 and c1 = 0: the identity times rsa.
        y = copy(x)
        ddpm_step!(y, y, x, fill(2.0, 3), zeros(3), zeros(3), 7, 0)
        @test y == 2 .* x
        # Per-sample coefficients: sample b uses entry b.
        z = ddpm_step!(
            similar(x),
            x,
            x,
            [1.0, 2.0, 3.0],
            zeros(3),
            zeros(3),
            zeros(Float32, size(x)),
        )
        @test z[:, :, 2] == 2 .* x[:, :, 2]
        # Different offsets give different noise; the same (seed, offset) the same noise.
        a = philox_normal((16, 3), 1, 0)
        @test philox_normal((16, 3), 1, 0) == a
        @test philox_normal((16, 3), 1, 1) != a
        @test abs(sum(philox_normal((4096,), 3, 0; T = Float64))) / 4096 < 0.1
    end

    @testset "Kolmogorov: single mode decays at the viscous + drag rate ($T)" for T in (
            Float64,
            Float32,
        )
        problem = KolmogorovProblem(;
            grid_size = 16,
            viscosity = 0.01,
            drag = 0.1,
            forcing_wavenumber = 0,
            dt = 0.01,
            T = T,
            planner = "FFTW_ESTIMATE",
        )
        grid = problem.equation.grid
        omega0 = [cos(2x + y) for x in grid.x, y in grid.y, _ in 1:1]
        set_fields!(problem, omega0)
        stepforward!(problem, 100)
        exact = omega0 .* exp(-(0.01 * 5 + 0.1) * 1.0)
        @test relative_error(get_fields(problem), exact) < (T == Float64 ? 1.0e-7 : 1.0e-5)
    end

    @testset "Kolmogorov: inviscid, unforced run conserves energy and enstrophy" begin
        problem = KolmogorovProblem(;
            grid_size = 32,
            viscosity = 0.0,
            drag = 0.0,
            forcing_wavenumber = 0,
            dt = 1.0e-3,
            batch = 2,
            seed = 3,
            planner = "FFTW_ESTIMATE",
        )
        energy0, enstrophy0 = energy(problem), enstrophy(problem)
        @test all(energy0 .> 0)
        run!(problem, 50; check_every = 10)
        @test maximum(abs, energy(problem) ./ energy0 .- 1) < 1.0e-8
        @test maximum(abs, enstrophy(problem) ./ enstrophy0 .- 1) < 1.0e-8
        k, spectrum = kinetic_energy_spectrum(problem)
        @test size(spectrum) == (16, 2) && length(k) == 16
        @test all(sum(spectrum; dims = 1)[:] .<= energy(problem) .* (1 + 1.0e-12))
    end

    @testset "Kolmogorov: initial condition has the configured max speed" begin
        problem = KolmogorovProblem(;
            grid_size = 32,
            batch = 2,
            seed = 1,
            planner = "FFTW_ESTIMATE",
        )
        config = problem.equation.config
        # max |u| = max_velocity, so max(|u|, |v|) lies in [max_velocity / sqrt(2), max_velocity].
        largest = config.max_velocity *
            config.dt /
            (config.domain_extent / config.grid_size)
        @test largest / sqrt(2) * (1 - 1.0e-9) <=
            courant_number(problem) <=
            largest * (1 + 1.0e-9)
    end

    @testset "QG: barotropic Rossby wave moves at the dispersion-relation speed" begin
        problem = QGProblem(;
            grid_size = 16,
            upper_layer_velocity = 0.01,
            lower_layer_velocity = 0.01,
            bottom_drag = 0.0,
            planner = "FFTW_ESTIMATE",
        )
        config = problem.equation.config
        grid = problem.equation.grid
        k = 2π / config.domain_length
        amplitude = 1.0e-6
        q0 = [
            amplitude * cos(k * x + k * y)
            for x in grid.x, y in grid.y, _ in 1:2, _ in 1:1
        ]
        set_fields!(problem, q0)
        num_steps = 100
        stepforward!(problem, num_steps)
        # ψ_1 = ψ_2 makes the coupling vanish: q = -K² ψ and ω = k U - β k / K².
        frequency = k * 0.01 - config.beta * k / (2k^2)
        t = num_steps * config.dt
        exact = [
            amplitude * cos(k * x + k * y - frequency * t)
            for x in grid.x, y in grid.y, _ in 1:2, _ in 1:1
        ]
        @test maximum(abs, get_fields(problem) .- exact) / amplitude < 1.0e-4
        @test abs(frequency * t) > 0.3 # the wave has moved
        @test problem.stepper.level == num_steps
    end

    @testset "QG: run from pyqg's initial condition stays finite" begin
        problem = QGProblem(;
            grid_size = 32,
            batch = 2,
            seed = 5,
            T = Float32,
            planner = "FFTW_ESTIMATE",
        )
        run!(problem, 20; check_every = 5)
        @test all_finite(problem)
        @test all(energy(problem) .> 0)
        @test size(layer_energy(problem)) == (2, 2)
    end

    if CUDA_WORKS
        @testset "CUDA" begin
            # cuda:N selects device N (0-based, as torch); an index past the last GPU names them.
            gpus = length(CUDA.devices())
            @test Emu.make_device("cuda") == GPU(0)
            @test Emu.make_device("cuda:$(gpus - 1)") == GPU(gpus - 1)
            @test CUDA.deviceid(CUDA.device()) == gpus - 1
            @test_throws ArgumentError Emu.make_device("cuda:$gpus")
            Emu.make_device("cuda:0")
            for name in sort(collect(keys(get(INDEX, "solver", Dict()))))
                case = INDEX["solver"][name]
                @test solver_case_error(case, "cuda") <
                    STATE_RTOL[FIXTURE_TYPES[case["dtype"]]]
            end
            if HAVE_FIXTURES
                philox = INDEX["philox"]
                expected = load_array(INDEX, philox["normal_float32"])
                got = Array(philox_normal!(
                    CUDA.zeros(Float32, size(expected)...),
                    philox["seed"],
                    philox["offset"],
                ))
                @test within_ulps(got, expected, 1)
                case = INDEX["ddpm"]["float32"]
                load(name) = load_array(INDEX, case[name])
                noisy = CUDA.CuArray(load("noisy"))
                predicted = CUDA.CuArray(load("predicted_noise"))
                out = similar(noisy)
                ddpm_step!(
                    out,
                    noisy,
                    predicted,
                    load("reciprocal_sqrt_alpha"),
                    load("noise_coefficient"),
                    load("posterior_std"),
                    case["seed"],
                    case["offset"],
                )
                # GPU code may fuse multiply-adds: a few ulps.
                @test within_ulps(Array(out), load("step_philox"), 4)
            end
        end
    else
        @info "Skipping the CUDA tests: $CUDA_SKIP_REASON"
    end
end
