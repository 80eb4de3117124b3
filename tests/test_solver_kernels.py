"""The fused solver kernels (kernels/spectral.cu) on the host, against the Python equations.

g++ compiles kernels/spectral.cu itself (emu_common.cuh turns each kernel into a C function whose
grid-stride loop is a plain loop), so these tests run the very entry points the GPU runs. A host
runtime stands in for CuPy under emu.solvers.fused: numpy arrays and FFTs, kernels through ctypes.
It checks every launch against the C signature parsed from the source (argument count, array dtypes,
contiguity, the exact numpy scalar type of each scalar, as CuPy needs them), allocates every buffer
poisoned with NaN between guard zones that must stay untouched, and poisons the input of each inverse
FFT after use (cuFFT may destroy it). The references are the equations' own numpy-backend methods.

Measured here (relative max difference to the reference, 32^2, batch 2-3):
  single kernels        float64 <= 1.5e-16 (0 for most), float32 <= 1.3e-7 (the kernels compute
                        wavenumber factors in float32; the reference rounds float64 tables once)
  explicit terms        float64 <= 4.3e-16 (numpy's FFTs here, FFTW in the reference), float32 <= 2.6e-7
  20 fused steps        float64 7.7e-16 / 3.9e-16, float32 6.1e-7 / 1.1e-7 (Kolmogorov CN-RK4 / QG AB3)
Tolerances sit 10-30x above these (other FFT libraries, compilers).
"""

from __future__ import annotations

import dataclasses

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from emu.backends import get_backend
from emu.solvers import make_stepper
from emu.solvers.fused import FusedAdamsBashforth3, FusedCrankNicolsonRK4, KolmogorovFused, QGFused
from emu.systems import make_config, make_equation

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
SOURCE = KERNELS / "spectral.cu"
DTYPES = ["float64", "float32"]
KERNEL_TOLERANCE = {"float64": 2e-15, "float32": 2e-6}
CHAIN_TOLERANCE = {"float64": 1e-14, "float32": 5e-6}
STEPS_TOLERANCE = {"float64": 2e-14, "float32": 1e-5}


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


# -- the host build and runtime ---------------------------------------------------------------------
def kernel_signatures(source: str) -> dict[str, list[str]]:
    """{kernel name without suffix: parameter kinds}, kinds 'complex*', 'real*', 'int64', 'int32', 'real'."""
    text = re.sub(r"/\*.*?\*/", " ", source, flags=re.S).replace("\\\n", " ")
    signatures = {}
    for name, parameters in re.findall(r"EMU_KERNEL\s+(\w+)_##S\s*\((.*?)\)\s*\{", text, flags=re.S):
        kinds = []
        for parameter in parameters.split(","):
            declaration = " ".join(parameter.split()[:-1])
            if "*" in parameter:
                kinds.append("complex*" if "complex_t" in parameter else "real*")
            else:
                kinds.append({"long long": "int64", "int": "int32", "T": "real"}[declaration])
        signatures[name] = kinds
    return signatures


SIGNATURES = kernel_signatures(SOURCE.read_text())


@pytest.fixture(scope="module")
def host_library(tmp_path_factory):
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ is not installed: the host build of kernels/spectral.cu needs it")
    library = tmp_path_factory.mktemp("spectral") / "libspectral.so"
    # -ffp-contract=off: no FMA contraction, each operation rounded as numpy rounds it.
    result = subprocess.run([compiler, "-x", "c++", "-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Wextra",
                             "-Werror", "-shared", "-fPIC", f"-I{KERNELS}", str(SOURCE), "-o", str(library)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return ctypes.CDLL(str(library))


class GuardedNumpy:
    """The slice of numpy the fused operators use, allocating every new array NaN-poisoned inside a
    larger buffer whose guard zones `check` verifies (out-of-bounds writes show up there)."""

    GUARD = 64  # elements on each side
    SENTINEL = 12345.0

    def __init__(self):
        self._buffers = []

    def empty(self, shape, dtype):
        size = int(np.prod(shape))
        buffer = np.full(size + 2 * self.GUARD, self.SENTINEL, dtype=dtype)
        array = buffer[self.GUARD:self.GUARD + size].reshape(shape)
        array[...] = np.nan
        self._buffers.append(buffer)
        return array

    def empty_like(self, array):
        return self.empty(array.shape, array.dtype)

    def zeros(self, shape, dtype):
        array = self.empty(shape, dtype)
        array[...] = 0
        return array

    def ones(self, shape, dtype):
        array = self.empty(shape, dtype)
        array[...] = 1
        return array

    def ascontiguousarray(self, array):
        return np.ascontiguousarray(array)

    def check(self):
        for buffer in self._buffers:
            guards = np.concatenate([buffer[:self.GUARD], buffer[-self.GUARD:]])
            assert np.all(guards == self.SENTINEL), "a kernel wrote outside its array"


class HostRuntime:
    """`emu.solvers.fused.KernelRuntime` on the CPU: the g++ build of the kernels, numpy FFTs."""

    def __init__(self, library, dtype: str):
        self.library = library
        self.xp = GuardedNumpy()
        self.real = np.float32 if dtype == "float32" else np.float64
        self.complex = np.complex64 if dtype == "float32" else np.complex128
        self.suffix = "f32" if dtype == "float32" else "f64"
        self.launched: list[str] = []

    def launch(self, name, count, *args):
        kinds = SIGNATURES[name]
        assert len(args) == len(kinds), f"{name}: {len(args)} arguments for {len(kinds)} parameters"
        c_real = ctypes.c_float if self.real is np.float32 else ctypes.c_double
        values, argtypes = [], []
        for position, (arg, kind) in enumerate(zip(args, kinds)):
            where = f"{name} argument {position} ({kind})"
            if kind.endswith("*"):
                assert isinstance(arg, np.ndarray) and arg.flags.c_contiguous, where
                assert arg.dtype == (self.complex if kind == "complex*" else self.real), f"{where}: {arg.dtype}"
                values.append(ctypes.c_void_p(arg.ctypes.data))
                argtypes.append(ctypes.c_void_p)
            else:
                expected = {"int64": np.int64, "int32": np.int32, "real": self.real}[kind]
                assert type(arg) is expected, f"{where}: passed as {type(arg).__name__}"  # CuPy needs the exact type
                ctype = {"int64": ctypes.c_longlong, "int32": ctypes.c_int, "real": c_real}[kind]
                values.append(ctype(arg.item()))
                argtypes.append(ctype)
        # The loop count is each kernel's first 64-bit argument; the launch must be sized for it.
        assert count == args[kinds.index("int64")], f"{name}: launched for {count} items"
        function = getattr(self.library, f"{name}_{self.suffix}")
        function.argtypes, function.restype = argtypes, None
        function(*values)
        self.xp.check()
        self.launched.append(name)

    def rfft2(self, field):
        return np.fft.rfftn(field, axes=(-2, -1))

    def irfft2_unscaled(self, field_hat, shape):
        out = np.fft.irfftn(field_hat, s=shape, axes=(-2, -1), norm="forward")
        field_hat[...] = np.nan  # cuFFT may destroy its input (overwrite_x=True): nothing may read it again
        return out


def random_spectral(equation, batch, seed, amplitude=1.0):
    """rfft2 of a random real field on the equation's grid: (batch, [2,] n, n//2+1) in its precision."""
    layers = (2,) if equation.config.system == "qg" else ()
    n = equation.grid.num_points
    field = amplitude * np.random.default_rng(seed).standard_normal((batch, *layers, n, n))
    spectrum = np.fft.rfft2(field)
    if not layers:
        # No Nyquist row or column: there emu's derivative convention (the CUDA kernels') and jax-cfd's
        # (the equation's, in the jax-cfd mode these tests use for its 0.5 mask entries) differ.
        spectrum[..., n // 2, :] = 0
        spectrum[..., n // 2] = 0
    return equation.backend.asarray(spectrum, complex_valued=True)


def generic_numpy(dtype):
    """The numpy backend without its own (numba) fused kernels: the generic path these host-built CUDA
    kernels are checked against."""
    return dataclasses.replace(get_backend("numpy", dtype=dtype), fused_kernels=False)


def kolmogorov(dtype, **overrides):
    settings = dict(grid_size=16, viscosity=1e-2, dealias="jax-cfd")  # jax-cfd's mask has 0.5 entries
    settings.update(overrides)
    return make_equation(make_config("kolmogorov", **settings), generic_numpy(dtype))


def qg(dtype, **overrides):
    settings = dict(grid_size=16)
    settings.update(overrides)
    return make_equation(make_config("qg", **settings), generic_numpy(dtype))


# -- the source, the device build and the host build agree ---------------------------------------------
def test_kernel_entry_points_in_ptx_and_host_library(host_library, tmp_path):
    expected = {f"{name}_{suffix}" for name in SIGNATURES for suffix in ("f32", "f64")}
    assert len(SIGNATURES) == 8, sorted(SIGNATURES)
    for symbol in expected:
        assert hasattr(host_library, symbol), symbol
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed: the device half of this check needs it")
    ptx = tmp_path / "spectral.ptx"
    result = subprocess.run(["nvcc", "-ptx", "-arch=sm_90", f"-I{KERNELS}", str(SOURCE), "-o", str(ptx)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    entries = set(re.findall(r"\.entry\s+(\w+)\(", ptx.read_text()))
    assert entries == expected


@pytest.mark.parametrize("source, expected", [("spectral.cu", {"spectral.cuh", "emu_common.cuh"}),
                                              ("ddpm.cu", {"ddpm.cuh", "philox.cuh"})])
def test_kernel_headers_digest_covers_every_include(source, expected):
    """emu.cuda.raw_module keys CuPy's binary cache by a digest of `included_headers`; a header missing
    there would let an edit of it run a stale binary."""
    from emu.cuda import included_headers

    KERNEL_HEADERS = included_headers(source)
    included, pending = set(), [source]
    while pending:
        for header in re.findall(r'#include\s+"([^"]+)"', (KERNELS / pending.pop()).read_text()):
            if header not in included:
                included.add(header)
                pending.append(header)
    assert included == set(KERNEL_HEADERS) == expected


# -- single kernels against the equations -------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_kolmogorov_gradients_kernel(host_library, dtype):
    equation = kolmogorov(dtype, grid_size=32, domain_extent=5.0)  # L != 2 pi: the wavenumber scale matters
    runtime = HostRuntime(host_library, dtype)
    fused = KolmogorovFused(equation, runtime)
    omega_hat = random_spectral(equation, 3, seed=1)
    out = runtime.xp.empty((4,) + omega_hat.shape, omega_hat.dtype)
    runtime.launch("kolmogorov_gradients", omega_hat.size, omega_hat, out, np.int64(omega_hat.size),
                   np.int32(fused.n), np.int32(fused.m), fused.fundamental)
    u_hat, v_hat = equation.velocity_hat(omega_hat)
    expected = [u_hat, v_hat, equation.grid.ikx * omega_hat, equation.grid.iky * omega_hat]
    for index in range(4):
        assert relative_error(out[index], expected[index]) < KERNEL_TOLERANCE[dtype], index


@pytest.mark.parametrize("dtype", DTYPES)
def test_advection_product_kernel_undoes_the_unnormalised_transform(host_library, dtype):
    runtime = HostRuntime(host_library, dtype)
    n = 16
    fields = np.random.default_rng(2).standard_normal((4, 2, n, n)).astype(runtime.real)
    raw = runtime.xp.empty(fields.shape, fields.dtype)
    raw[...] = fields * n**2  # what an unnormalised inverse FFT leaves; exact (power of two)
    out = runtime.xp.empty(fields.shape[1:], fields.dtype)
    runtime.launch("advection_product", out.size, raw, out, np.int64(out.size), runtime.real(1.0 / n**2))
    u, v, omega_x, omega_y = fields
    assert np.array_equal(out, u * omega_x + v * omega_y)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kolmogorov_explicit_terms_kernel_chain(host_library, dtype):
    equation = kolmogorov(dtype, grid_size=32)
    runtime = HostRuntime(host_library, dtype)
    fused = KolmogorovFused(equation, runtime)
    omega_hat = random_spectral(equation, 2, seed=3)
    actual = fused.explicit_terms(omega_hat)
    assert runtime.launched == ["kolmogorov_gradients", "advection_product", "kolmogorov_tendency"]
    assert relative_error(actual, equation.explicit_terms(omega_hat)) < CHAIN_TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stage", [0, 3])
def test_cn_rk4_stage_kernel(host_library, dtype, stage):
    equation = kolmogorov(dtype)
    runtime = HostRuntime(host_library, dtype)
    fused = KolmogorovFused(equation, runtime)
    generic = make_stepper(equation, dt=0.01)  # equation.fused is unset: the array-expression stepper
    u_in = random_spectral(equation, 2, seed=4)
    h_before = random_spectral(equation, 2, seed=5)
    decay, gain = generic._coefficients[stage]
    tendency = equation.explicit_terms(u_in)
    h_expected = tendency if stage == 0 else tendency + generic.betas[stage] * h_before
    u_expected = decay * u_in + gain * h_expected

    h = runtime.xp.empty_like(h_before)
    if stage > 0:
        h[...] = h_before
    # stage 0 leaves h NaN: the kernel must not read it. Later stages update u in place.
    u_out = runtime.xp.empty_like(u_in) if stage == 0 else u_in.copy()
    mu = 0.5 * generic.dt * (generic.alphas[stage + 1] - generic.alphas[stage])
    fused.cn_rk4_stage(u_in if stage == 0 else u_out, u_out, h, has_history=stage > 0, beta=generic.betas[stage],
                       mu=mu, gamma_dt=generic.gammas[stage] * generic.dt)
    assert relative_error(h, h_expected) < CHAIN_TOLERANCE[dtype]
    assert relative_error(u_out, u_expected) < CHAIN_TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_qg_inversion_velocities_kernel(host_library, dtype):
    equation = qg(dtype, grid_size=32)
    runtime = HostRuntime(host_library, dtype)
    fused = QGFused(equation, runtime)
    q_hat = random_spectral(equation, 3, seed=6, amplitude=1e-5)
    pairs = q_hat.size // 2
    out = runtime.xp.empty((3,) + q_hat.shape, q_hat.dtype)
    runtime.launch("qg_inversion_velocities", pairs, q_hat, out, *fused._geometry(pairs), *fused.physics[:2])
    psi_hat = equation.streamfunction_hat(q_hat)
    assert np.array_equal(out[0], q_hat)
    assert relative_error(out[1], -equation.grid.iky * psi_hat) < KERNEL_TOLERANCE[dtype]
    assert relative_error(out[2], equation.grid.ikx * psi_hat) < KERNEL_TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_qg_fluxes_kernel(host_library, dtype):
    equation = qg(dtype, lower_layer_velocity=-0.01)  # both layers moving: the layer index matters
    runtime = HostRuntime(host_library, dtype)
    fused = QGFused(equation, runtime)
    n = equation.grid.num_points
    fields = np.random.default_rng(7).standard_normal((3, 2, 2, n, n)).astype(runtime.real)
    physical = runtime.xp.empty(fields.shape, fields.dtype)
    physical[...] = fields
    out = runtime.xp.empty((2,) + fields.shape[1:], fields.dtype)
    count = out[0].size
    runtime.launch("qg_fluxes", count, physical, out, np.int64(count), np.int64(n * n), *fused.velocities,
                   runtime.real(1.0))
    q, u, v = fields
    background = np.array([0.025, -0.01], dtype=runtime.real).reshape(1, 2, 1, 1)
    assert np.array_equal(out[0], (u + background) * q)
    assert np.array_equal(out[1], v * q)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("preset,filter_name", [("eddy", "exponential"), ("jet", "none")])
def test_qg_explicit_terms_kernel_chain(host_library, dtype, preset, filter_name):
    equation = qg(dtype, grid_size=32, preset=preset, filter=filter_name)
    runtime = HostRuntime(host_library, dtype)
    fused = QGFused(equation, runtime)
    q_hat = random_spectral(equation, 2, seed=8, amplitude=1e-5)
    actual = fused.explicit_terms(q_hat)
    assert runtime.launched == ["qg_inversion_velocities", "qg_fluxes", "qg_tendency"]
    assert relative_error(actual, equation.explicit_terms(q_hat)) < CHAIN_TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("level", [0, 1, 2])
def test_qg_ab3_step_kernel(host_library, dtype, level):
    equation = qg(dtype, grid_size=32)
    runtime = HostRuntime(host_library, dtype)
    fused = QGFused(equation, runtime)
    q_hat = random_spectral(equation, 2, seed=9, amplitude=1e-5)
    previous = [random_spectral(equation, 2, seed=10 + j, amplitude=1e-10) for j in range(level)]
    coefficients = FusedAdamsBashforth3.startup_coefficients[level]
    tendency, q_new = fused.ab3_step(q_hat, previous, coefficients, 3600.0)

    expected_tendency = equation.explicit_terms(q_hat)
    combination = sum(c * f for c, f in zip(coefficients, [expected_tendency, *previous]))
    expected = equation.step_filter * (q_hat + 3600.0 * combination)
    assert relative_error(tendency, expected_tendency) < CHAIN_TOLERANCE[dtype]
    assert relative_error(q_new, expected) < CHAIN_TOLERANCE[dtype]


# -- fused steppers against the generic ones ------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("system", ["kolmogorov", "qg"])
def test_fused_stepper_kernels_match_generic_steppers(host_library, dtype, system):
    """20 steps of the fused stepper (chosen by make_stepper through equation.fused) equal 20 generic
    steps from the same state, for Kolmogorov (CN-RK4, forcing on) and QG (AB3 start-up and steady)."""
    if system == "kolmogorov":
        equation, reference = kolmogorov(dtype, grid_size=32), kolmogorov(dtype, grid_size=32)
        start = equation.to_state(equation.initial_condition(2, seed=11))
        fused_class, operator = FusedCrankNicolsonRK4, KolmogorovFused
    else:
        equation, reference = qg(dtype, grid_size=32), qg(dtype, grid_size=32)
        start = random_spectral(equation, 2, seed=12, amplitude=1e-5)
        fused_class, operator = FusedAdamsBashforth3, QGFused
    runtime = HostRuntime(host_library, dtype)
    equation.fused = operator(equation, runtime)
    stepper = make_stepper(equation, equation.config.dt)
    generic = make_stepper(reference, reference.config.dt)
    assert type(stepper) is fused_class and type(generic) is fused_class.__mro__[1]
    untouched = start.copy()
    fused_state, generic_state = stepper.init(start), generic.init(start.copy())
    for _ in range(20):
        fused_state = stepper.step(fused_state)
        generic_state = generic.step(generic_state)
    assert fused_state.level == generic_state.level == 20
    assert set(fused_state.history) == set(generic_state.history)
    assert relative_error(fused_state.state_hat, generic_state.state_hat) < STEPS_TOLERANCE[dtype]
    for name in generic_state.history:
        assert relative_error(fused_state.history[name], generic_state.history[name]) < STEPS_TOLERANCE[dtype]
    assert np.array_equal(start, untouched), "a fused step changed the state it started from"
