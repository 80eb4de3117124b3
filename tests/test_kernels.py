"""The fused DDPM kernels' arithmetic on the host, and every CUDA source through nvcc, with no GPU.

kernels/philox.cuh and kernels/ddpm.cuh hold all of the kernels' arithmetic as __host__ __device__
functions. tests/kernel_harness.cpp includes kernels/ddpm.cu itself and is built here with the host
C++ compiler into a shared library: the kernels become host functions with their GPU signatures, run
as one thread whose grid-stride loop visits every Philox group. Checked against:

  * the published Random123 known answers for Philox4x32-10 and emu.diffusion.philox, bit for bit
    on the uint32 words (random counters and keys, and group counters at edge seeds/offsets);
  * emu.diffusion.philox.philox_normal: float32 noise equal, float64 within 2 ulp (numpy's and the C
    library's log/cos/sin may each differ by an ulp, and z = radius * cos multiplies two of them);
  * the torch reference of emu.diffusion.ddpm (ddpm_step, add_noise, tweedie, given the kernel's own
    noise) in float32 and float64 with per-sample levels: exactly equal, since both round every
    operation separately (-ffp-contract=off here, __fmul_rn etc. in the kernels);
  * the Python launchers of emu.diffusion.fused and the "cupy" branch of ddpm_step, run on CPU
    tensors with the host build standing in for CuPy (argument order, layout, seeds from generators).

Outputs are poisoned (NaN) with sentinels past the end: every element is written, none beyond.
Without g++ or nvcc these tests skip, except in CI (CI=true), where a missing compiler fails.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from emu.diffusion import CosineSchedule, add_noise, ddpm_step, tweedie
from emu.diffusion.philox import philox4x32_10, philox_counters, philox_key, philox_normal

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
HARNESS = Path(__file__).resolve().parent / "kernel_harness.cpp"
IN_CI = os.environ.get("CI", "").lower() == "true"
SENTINEL = 8  # poisoned elements past the end of every output; they must stay untouched

# Random123 kat_vectors for philox4x32 with 10 rounds: (counter, key) -> output.
RANDOM123_KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
EDGE_WORDS_64 = [0, 1, 2**32 - 1, 2**32, 2**63, 2**64 - 1]


def _require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is required in CI (CI=true) for the kernel checks but is not on PATH")
        pytest.skip(f"{name} is not installed; the kernel checks need it")
    return path


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory) -> ctypes.CDLL:
    """kernel_harness.cpp built with the host compiler into a shared library, its signatures set."""
    compiler = _require_tool("g++")
    library = tmp_path_factory.mktemp("kernel_harness") / "libemu_kernel_harness.so"
    command = [compiler, "-std=c++17", "-O2", "-ffp-contract=off", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror",
               f"-I{KERNELS}", str(HARNESS), "-o", str(library), "-lm"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr}"
    lib = ctypes.CDLL(str(library))
    pointer, u64 = ctypes.c_void_p, ctypes.c_ulonglong
    lib.emu_host_philox4x32_10.argtypes = [pointer, pointer, pointer, u64]
    lib.emu_host_philox_group_words.argtypes = [pointer, u64, u64, u64, u64]
    for suffix in ("f32", "f64"):  # the kernels of ddpm.cu, with their GPU signatures
        getattr(lib, f"philox_normal_{suffix}").argtypes = [pointer] + [u64] * 3
        getattr(lib, f"ddpm_step_{suffix}").argtypes = [pointer] * 6 + [u64] * 4
        getattr(lib, f"ddpm_step_noise_{suffix}").argtypes = [pointer] * 7 + [u64] * 2
        getattr(lib, f"add_noise_{suffix}").argtypes = [pointer] * 5 + [u64] * 2
        getattr(lib, f"add_noise_philox_{suffix}").argtypes = [pointer] * 5 + [u64] * 4
        getattr(lib, f"tweedie_{suffix}").argtypes = [pointer] * 5 + [u64] * 2
    return lib


def _ptr(array: np.ndarray | None) -> int | None:
    return None if array is None else array.ctypes.data


def _poisoned(count: int, dtype) -> np.ndarray:
    return np.full(count + SENTINEL, np.nan, dtype=dtype)


def _written(buffer: np.ndarray, count: int) -> np.ndarray:
    """The first `count` elements, after checking all are written and the sentinels are not."""
    assert not np.isnan(buffer[:count]).any(), f"{int(np.isnan(buffer[:count]).sum())} of {count} elements unwritten"
    assert np.isnan(buffer[count:]).all(), "the kernel wrote past the end of its output"
    return buffer[:count]


def _ulps(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """|actual - expected| in units in the last place of expected (same-sign finite floats)."""
    spacing = np.spacing(np.abs(expected).astype(expected.dtype))
    return np.abs(actual.astype(np.float64) - expected.astype(np.float64)) / spacing.astype(np.float64)


# -- Philox -------------------------------------------------------------------------------------------
def test_philox_kernel_known_answers(host_kernels):
    counters = np.array([c for c, _, _ in RANDOM123_KNOWN_ANSWERS], dtype=np.uint32)
    keys = np.array([k for _, k, _ in RANDOM123_KNOWN_ANSWERS], dtype=np.uint32)
    out = np.zeros_like(counters)
    host_kernels.emu_host_philox4x32_10(_ptr(counters), _ptr(keys), _ptr(out), len(counters))
    expected = np.array([a for _, _, a in RANDOM123_KNOWN_ANSWERS], dtype=np.uint32)
    np.testing.assert_array_equal(out, expected)


def test_philox_kernel_matches_numpy_twin_on_random_counters_and_keys(host_kernels):
    rng = np.random.default_rng(2024)
    n = 20_000
    counters = rng.integers(0, 2**32, size=(n, 4), dtype=np.uint64).astype(np.uint32)
    keys = rng.integers(0, 2**32, size=(n, 2), dtype=np.uint64).astype(np.uint32)
    counters[:100] = rng.choice(np.array([0, 1, 0xFFFFFFFF, 0x80000000], dtype=np.uint32), size=(100, 4))
    keys[:100] = rng.choice(np.array([0, 1, 0xFFFFFFFF, 0x80000000], dtype=np.uint32), size=(100, 2))
    out = np.zeros_like(counters)
    host_kernels.emu_host_philox4x32_10(_ptr(counters), _ptr(keys), _ptr(out), n)
    np.testing.assert_array_equal(out, philox4x32_10(counters, keys))


@pytest.mark.parametrize("seed", EDGE_WORDS_64)
def test_philox_kernel_group_counters_follow_the_convention_at_edge_seeds_and_offsets(host_kernels, seed):
    for offset in EDGE_WORDS_64:
        n = 37
        out = np.zeros((n, 4), dtype=np.uint32)
        host_kernels.emu_host_philox_group_words(_ptr(out), 0, n, seed, offset)
        np.testing.assert_array_equal(out, philox4x32_10(philox_counters(n, offset), philox_key(seed)),
                                      err_msg=f"seed {seed}, offset {offset}")
    # Groups past 2^32 use the counter's second word.
    first, n = 2**32 - 3, 6
    groups = np.arange(first, first + n, dtype=np.uint64)
    counters = np.zeros((n, 4), dtype=np.uint32)
    counters[:, 0], counters[:, 1] = groups & 0xFFFFFFFF, groups >> np.uint64(32)
    counters[:, 2], counters[:, 3] = 5, 0
    out = np.zeros((n, 4), dtype=np.uint32)
    host_kernels.emu_host_philox_group_words(_ptr(out), first, n, seed, 5)
    np.testing.assert_array_equal(out, philox4x32_10(counters, philox_key(seed)))


@pytest.mark.parametrize("count", [1, 3, 4, 5, 1023, 200_001])
def test_philox_kernel_normals_match_philox_normal(host_kernels, count):
    for seed, offset in [(0, 0), (12345, 7), (2**64 - 1, 2**64 - 1)]:
        single = _poisoned(count, np.float32)
        host_kernels.philox_normal_f32(_ptr(single), count, seed, offset)
        np.testing.assert_array_equal(_written(single, count), philox_normal((count,), seed, offset, np.float32))
        double = _poisoned(count, np.float64)
        host_kernels.philox_normal_f64(_ptr(double), count, seed, offset)
        expected = philox_normal((count,), seed, offset, np.float64)
        ulps = _ulps(_written(double, count), expected)
        assert ulps.max() <= 2, f"float64 noise differs by {ulps.max()} ulp (seed {seed}, offset {offset})"
        assert (ulps > 0).mean() < 0.01, "float64 noise differs from numpy in more than 1% of the elements"


# -- DDPM arithmetic ----------------------------------------------------------------------------------
SHAPES = [(5, 2, 6, 7), (5, 3, 3, 3), (3, 1)]  # 84 per sample; 27 (groups straddle samples, ragged tail); 1


def _case(shape, dtype, seed):
    """Random x, eps and per-sample levels (including 0 and T-1) for `shape`."""
    schedule = CosineSchedule(1000)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=dtype)
    eps = torch.randn(shape, generator=generator, dtype=dtype)
    levels = torch.randint(0, 1000, (shape[0],), generator=generator)
    levels[0], levels[-1] = 0, 999
    return schedule, x, eps, levels


def _host_noise(host_kernels, suffix: str, count: int, seed: int, offset: int) -> np.ndarray:
    out = _poisoned(count, np.float32 if suffix == "f32" else np.float64)
    getattr(host_kernels, f"philox_normal_{suffix}")(_ptr(out), count, seed, offset)
    return _written(out, count).copy()


def _coefficients(schedule, levels, like, *names):
    return [schedule.gather(name, levels, like).reshape(-1).numpy().copy() for name in names]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ddpm_step_kernel_math_equals_torch_reference(host_kernels, shape, dtype):
    schedule, x, eps, levels = _case(shape, dtype, seed=1)
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    suffix = "f32" if dtype == torch.float32 else "f64"
    seed, offset = 987654321, 3
    count, per_sample = x.numel(), x.numel() // shape[0]
    # The kernel's own noise (equal to philox_normal in float32, within 2 ulp in float64; tested above).
    noise_np = _host_noise(host_kernels, suffix, count, seed, offset)
    noise = torch.from_numpy(noise_np).reshape(shape)
    expected = ddpm_step(x, levels, eps, schedule, noise=noise, backend="torch").numpy().reshape(-1)
    coefficients = _coefficients(schedule, levels, x, "reciprocal_sqrt_alphas", "noise_coefficients", "posterior_stds")
    x_np, eps_np = (t.numpy().reshape(-1).copy() for t in (x, eps))
    out = _poisoned(count, np_dtype)  # in-kernel Philox noise (ddpm_step_*)
    getattr(host_kernels, f"ddpm_step_{suffix}")(_ptr(x_np), _ptr(eps_np), *map(_ptr, coefficients), _ptr(out),
                                                 count, per_sample, seed, offset)
    np.testing.assert_array_equal(_written(out, count), expected)
    out = _poisoned(count, np_dtype)  # given noise (ddpm_step_noise_*)
    getattr(host_kernels, f"ddpm_step_noise_{suffix}")(_ptr(x_np), _ptr(eps_np), _ptr(noise_np),
                                                       *map(_ptr, coefficients), _ptr(out), count, per_sample)
    np.testing.assert_array_equal(_written(out, count), expected)
    # Level 0 adds no noise: the first sample is the mean whatever the seed.
    out = _poisoned(count, np_dtype)
    getattr(host_kernels, f"ddpm_step_{suffix}")(_ptr(x_np), _ptr(eps_np), *map(_ptr, coefficients), _ptr(out),
                                                 count, per_sample, 1, 0)
    np.testing.assert_array_equal(_written(out, count)[:per_sample], expected[:per_sample])
    assert not np.array_equal(out[per_sample:count], expected[per_sample:]), "other seeds must change the noise"
    if dtype == torch.float32:  # the in-kernel draw is the numpy convention itself
        np.testing.assert_array_equal(noise_np, philox_normal((count,), seed, offset, np.float32))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_add_noise_and_tweedie_kernel_math_equal_torch_reference(host_kernels, shape, dtype):
    schedule, clean, eps, levels = _case(shape, dtype, seed=2)
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    suffix = "f32" if dtype == torch.float32 else "f64"
    seed, offset = 42, 2**40
    count, per_sample = clean.numel(), clean.numel() // shape[0]
    noise_np = _host_noise(host_kernels, suffix, count, seed, offset)
    noise = torch.from_numpy(noise_np).reshape(shape)
    scales = _coefficients(schedule, levels, clean, "sqrt_alpha_bars", "sqrt_one_minus_alpha_bars")
    clean_np, eps_np = (t.numpy().reshape(-1).copy() for t in (clean, eps))

    expected = add_noise(schedule, clean, levels, noise, backend="torch").numpy().reshape(-1)
    out = _poisoned(count, np_dtype)
    getattr(host_kernels, f"add_noise_{suffix}")(_ptr(clean_np), _ptr(noise_np), *map(_ptr, scales), _ptr(out),
                                                 count, per_sample)
    np.testing.assert_array_equal(_written(out, count), expected)
    out, drawn = _poisoned(count, np_dtype), _poisoned(count, np_dtype)  # in-kernel noise, written out too
    getattr(host_kernels, f"add_noise_philox_{suffix}")(_ptr(clean_np), *map(_ptr, scales), _ptr(out), _ptr(drawn),
                                                        count, per_sample, seed, offset)
    np.testing.assert_array_equal(_written(out, count), expected)
    np.testing.assert_array_equal(_written(drawn, count), noise_np)
    out = _poisoned(count, np_dtype)  # noise_out may be null
    getattr(host_kernels, f"add_noise_philox_{suffix}")(_ptr(clean_np), *map(_ptr, scales), _ptr(out), None,
                                                        count, per_sample, seed, offset)
    np.testing.assert_array_equal(_written(out, count), expected)

    expected = tweedie(schedule, clean, levels, eps, backend="torch").numpy().reshape(-1)
    out = _poisoned(count, np_dtype)
    getattr(host_kernels, f"tweedie_{suffix}")(_ptr(clean_np), _ptr(eps_np), *map(_ptr, scales), _ptr(out),
                                               count, per_sample)
    np.testing.assert_array_equal(_written(out, count), expected)


# -- the Python launchers, on the host build ----------------------------------------------------------
@pytest.fixture
def host_launches(host_kernels, monkeypatch):
    """emu.diffusion.fused with the host build of ddpm.cu in place of CuPy, on CPU tensors; the kernel
    names launched are recorded."""
    from emu.diffusion import fused

    launched = []

    def run_on_host(name, device, blocks, params):
        function = getattr(host_kernels, name)
        assert device.type == "cpu" and blocks >= 1
        assert len(params) == len(function.argtypes), \
            f"{name}: {len(params)} arguments for {len(function.argtypes)} parameters"
        assert all(isinstance(p, np.uint64) for p in params), f"{name}: every argument must be a numpy.uint64"
        launched.append(name)
        function(*(int(p) for p in params))

    monkeypatch.setattr(fused, "_DEVICE_TYPE", "cpu")
    monkeypatch.setattr(fused, "_run_kernel", run_on_host)
    return launched


@pytest.fixture
def cupy_branch_on_host(host_launches, monkeypatch):
    """ddpm_step & co. with backend="cupy" taking their fused branch on CPU tensors (host build)."""
    from emu.diffusion import ddpm

    original = ddpm._resolve_backend
    monkeypatch.setattr(ddpm, "_resolve_backend",
                        lambda backend, like=None: "cupy" if backend == "cupy" else original(backend, like))
    return host_launches


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_kernel_launchers_equal_torch_reference_on_host_build(host_launches, dtype):
    from emu.diffusion.fused import fused_add_noise, fused_ddpm_step, fused_philox_normal, fused_tweedie

    shape = (4, 3, 5, 7)  # 105 per sample: groups straddle samples
    schedule, x, eps, levels = _case(shape, dtype, seed=3)
    rsa, nc, std = (schedule.gather(n, levels, x) for n in ("reciprocal_sqrt_alphas", "noise_coefficients",
                                                            "posterior_stds"))
    seed, offset = 2**63 + 11, 9
    noise = fused_philox_normal(shape, seed, offset, dtype=dtype, device="cpu")
    if dtype == torch.float32:
        np.testing.assert_array_equal(noise.numpy(), philox_normal(shape, seed, offset, np.float32))
    expected = ddpm_step(x, levels, eps, schedule, noise=noise, backend="torch")
    buffer = torch.full((x.numel() + SENTINEL,), float("nan"), dtype=dtype)
    out = buffer[:x.numel()].view(shape)
    result = fused_ddpm_step(x, eps, rsa, nc, std.reshape(-1), seed=seed, offset=offset, out=out)
    assert result.data_ptr() == out.data_ptr()
    np.testing.assert_array_equal(_written(buffer.numpy(), x.numel()), expected.numpy().reshape(-1))
    # Given noise, and inputs that are not contiguous (a transposed view of the same values).
    x_strided = x.transpose(1, 3).contiguous().transpose(1, 3)
    assert not x_strided.is_contiguous()
    assert torch.equal(fused_ddpm_step(x_strided, eps, rsa, nc, std, noise=noise), expected)

    noisy, drawn = fused_add_noise(x, *(schedule.gather(n, levels, x) for n in ("sqrt_alpha_bars",
                                                                                 "sqrt_one_minus_alpha_bars")),
                                   seed=seed, offset=offset)
    assert torch.equal(drawn, noise)
    assert torch.equal(noisy, add_noise(schedule, x, levels, noise, backend="torch"))
    scales = [schedule.gather(n, levels, x) for n in ("sqrt_alpha_bars", "sqrt_one_minus_alpha_bars")]
    assert torch.equal(fused_add_noise(x, *scales, noise=noise)[0], noisy)
    assert torch.equal(fused_tweedie(noisy, eps, *scales), tweedie(schedule, noisy, levels, eps, backend="torch"))
    suffix = "f32" if dtype == torch.float32 else "f64"
    assert host_launches == [f"philox_normal_{suffix}", f"ddpm_step_{suffix}", f"ddpm_step_noise_{suffix}",
                             f"add_noise_philox_{suffix}", f"add_noise_{suffix}", f"tweedie_{suffix}"]


def test_fused_kernel_launchers_reject_bad_arguments_naming_them(host_launches):
    from emu.diffusion.fused import fused_add_noise, fused_ddpm_step

    x = torch.zeros(2, 8)
    coefficient = torch.ones(2)
    with pytest.raises(ValueError, match="noisy"):
        fused_ddpm_step(x.half(), x, coefficient, coefficient, coefficient)
    with pytest.raises(ValueError, match="predicted_noise"):
        fused_ddpm_step(x, x[:, :4], coefficient, coefficient, coefficient)
    with pytest.raises(ValueError, match="posterior_std"):
        fused_ddpm_step(x, x, coefficient, coefficient, torch.ones(3))
    with pytest.raises(ValueError, match="seed"):
        fused_ddpm_step(x, x, coefficient, coefficient, coefficient, seed=-1)
    with pytest.raises(ValueError, match="out"):
        fused_ddpm_step(x, x, coefficient, coefficient, coefficient, out=torch.zeros(2, 8).t())
    with pytest.raises(ValueError, match="noise_out"):
        fused_add_noise(x, coefficient, coefficient, noise=x, noise_out=torch.zeros_like(x))
    assert host_launches == []
    empty = fused_ddpm_step(torch.zeros(0, 8), torch.zeros(0, 8), torch.ones(0), torch.ones(0), torch.ones(0))
    assert empty.shape == (0, 8) and host_launches == []  # nothing to launch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ddpm_step_cupy_branch_on_host_build(cupy_branch_on_host, dtype):
    shape = (3, 2, 9, 9)
    schedule, x, eps, levels = _case(shape, dtype, seed=4)
    # seed given: the fused kernel and the torch backend (numpy Philox) draw the same noise.
    fused = ddpm_step(x, levels, eps, schedule, backend="cupy", seed=77, offset=5)
    reference = ddpm_step(x, levels, eps, schedule, backend="torch", seed=77, offset=5)
    if dtype == torch.float32:
        assert torch.equal(fused, reference)
    else:
        torch.testing.assert_close(fused, reference, rtol=4 * torch.finfo(dtype).eps, atol=0)
    # seed=None: one int64 per call from the generator, offset 0 (the documented rule), reproducibly.
    drawn = int(torch.randint(0, 2**63 - 1, (1,), generator=torch.Generator().manual_seed(8)))
    first = ddpm_step(x, levels, eps, schedule, backend="cupy", generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, ddpm_step(x, levels, eps, schedule, backend="cupy", seed=drawn, offset=0))
    assert not torch.equal(first, ddpm_step(x, levels, eps, schedule, backend="cupy",
                                            generator=torch.Generator().manual_seed(9)))
    # Given noise: torch's result bit for bit; add_noise and tweedie too.
    noise = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(10))
    assert torch.equal(ddpm_step(x, levels, eps, schedule, noise=noise, backend="cupy"),
                       ddpm_step(x, levels, eps, schedule, noise=noise, backend="torch"))
    assert torch.equal(add_noise(schedule, x, levels, noise, backend="cupy"),
                       add_noise(schedule, x, levels, noise, backend="torch"))
    assert torch.equal(tweedie(schedule, x, levels, eps, backend="cupy"),
                       tweedie(schedule, x, levels, eps, backend="torch"))
    suffix = "f32" if dtype == torch.float32 else "f64"
    assert cupy_branch_on_host == [f"ddpm_step_{suffix}"] * 4 + [f"ddpm_step_noise_{suffix}", f"add_noise_{suffix}",
                                                                 f"tweedie_{suffix}"]
    with pytest.raises(ValueError, match="noise or seed"):
        ddpm_step(x, levels, eps, schedule, noise=noise, seed=1, backend="cupy")


def test_ddpm_step_julia_branch_calls_emu_julia_fused_ddpm_step(monkeypatch):
    """The bridge contract: emu.julia.fused_ddpm_step(noisy, predicted_noise, reciprocal_sqrt_alpha,
    noise_coefficient, posterior_std, seed, offset) and fused_ddpm_step_with_noise(..., noise), the
    coefficients per sample as (batch,) tensors (a stand-in module; the real one is tested with Julia)."""
    import sys
    import types

    import emu
    from emu.diffusion import ddpm

    calls = []

    def fake_fused_ddpm_step(noisy, predicted_noise, reciprocal_sqrt_alpha, noise_coefficient, posterior_std,
                             seed, offset):
        calls.append((seed, offset))
        batch = noisy.shape[0]
        assert all(c.shape == (batch,) and c.dtype == noisy.dtype for c in
                   (reciprocal_sqrt_alpha, noise_coefficient, posterior_std))
        assert isinstance(seed, int) and isinstance(offset, int)
        z = torch.from_numpy(philox_normal(tuple(noisy.shape), seed, offset, np.float64))
        view = (batch,) + (1,) * (noisy.ndim - 1)
        mean = reciprocal_sqrt_alpha.reshape(view) * (noisy - noise_coefficient.reshape(view) * predicted_noise)
        return (mean + posterior_std.reshape(view) * z).numpy()  # a numpy result is accepted too

    def fake_fused_ddpm_step_with_noise(noisy, predicted_noise, reciprocal_sqrt_alpha, noise_coefficient,
                                        posterior_std, noise):
        calls.append("noise")
        assert noise.shape == noisy.shape
        view = (noisy.shape[0],) + (1,) * (noisy.ndim - 1)
        mean = reciprocal_sqrt_alpha.reshape(view) * (noisy - noise_coefficient.reshape(view) * predicted_noise)
        return mean + posterior_std.reshape(view) * noise

    fake = types.ModuleType("emu.julia")
    fake.fused_ddpm_step, fake.fused_ddpm_step_with_noise = fake_fused_ddpm_step, fake_fused_ddpm_step_with_noise
    monkeypatch.setitem(sys.modules, "emu.julia", fake)
    monkeypatch.setattr(emu, "julia", fake, raising=False)
    original = ddpm._resolve_backend
    monkeypatch.setattr(ddpm, "_resolve_backend",
                        lambda backend, like=None: "julia" if backend == "julia" else original(backend, like))
    schedule, x, eps, levels = _case((2, 1, 4, 4), torch.float64, seed=5)
    result = ddpm_step(x, levels, eps, schedule, backend="julia", seed=3, offset=4)
    assert torch.equal(result, ddpm_step(x, levels, eps, schedule, backend="torch", seed=3, offset=4))
    ddpm_step(x, levels, eps, schedule, backend="julia", generator=torch.Generator().manual_seed(1))
    assert calls[0] == (3, 4) and calls[1][1] == 0 and len(calls) == 2
    noise = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(6))
    assert torch.equal(ddpm_step(x, levels, eps, schedule, backend="julia", noise=noise),
                       ddpm_step(x, levels, eps, schedule, backend="torch", noise=noise))
    assert calls[2] == "noise"


# -- compilers ----------------------------------------------------------------------------------------
def test_every_cuda_kernel_source_compiles_to_ptx(tmp_path):
    nvcc = _require_tool("nvcc")
    sources = sorted(KERNELS.glob("*.cu"))
    assert any(path.name == "ddpm.cu" for path in sources), f"kernels/ddpm.cu missing from {sources}"
    for source in sources:
        command = [nvcc, "-ptx", "-arch=sm_90", f"-I{KERNELS}", str(source), "-o", str(tmp_path / f"{source.stem}.ptx")]
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}{result.stderr}"
    ptx = (tmp_path / "ddpm.ptx").read_text()
    for kernel in ("ddpm_step", "ddpm_step_noise", "add_noise", "add_noise_philox", "tweedie", "philox_normal"):
        for suffix in ("f32", "f64"):
            assert f".entry {kernel}_{suffix}(" in ptx, f"ddpm.cu lacks the kernel {kernel}_{suffix}"


def test_philox_kernel_header_compiles_as_plain_c(tmp_path):
    gcc = _require_tool("gcc")
    program = tmp_path / "philox_c.c"
    program.write_text('#include "philox.cuh"\nint main(void) {\n    emu_philox_words zero = {0, 0, 0, 0};\n'
                       "    return emu_philox4x32_10(zero, 0, 0).x == 0x6627e8d5u ? 0 : 1;\n}\n")
    result = subprocess.run([gcc, "-std=c99", "-pedantic", "-Wall", "-Wextra", "-Werror", f"-I{KERNELS}",
                             str(program), "-o", str(tmp_path / "philox_c"), "-lm"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert subprocess.run([str(tmp_path / "philox_c")]).returncode == 0, "philox.cuh fails the known answer in C"
