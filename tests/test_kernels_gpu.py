"""The fused DDPM kernels on a GPU (kernels/ddpm.cu through emu.diffusion.fused and CuPy).

Skipped, with the reason, where torch sees no CUDA GPU or CuPy cannot run. On a GPU:

  * kernels vs the torch reference on fresh random inputs (a new seed every run, printed on failure),
    float32 and float64, per-sample levels, shapes whose Philox groups straddle samples and end in a
    partial group: with given noise bit for bit (every operation rounded as torch's eager code does);
  * every output element written and none past the end (NaN poison with sentinels);
  * in-kernel noise equal to the numpy convention (float32 equal, or 1 ulp in a rare case where
    CUDA's float64 log/sin/cos round to the other side; float64 within 4 ulp: CUDA's float64 sin/cos
    are within 2 ulp and log within 1, so radius * cos can differ from numpy's by up to 4);
  * statistics of in-kernel noise (mean, variance, lag and batch correlations) within bounds from
    the sample size; reproducibility from (seed, offset) and from a generator; the torch stream.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from emu.backends import BackendUnavailable
from emu.diffusion import CosineSchedule, add_noise, ddpm_step, tweedie
from emu.diffusion.philox import philox_normal


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    from emu.cuda import require_cupy

    try:
        require_cupy()
    except BackendUnavailable as error:
        return f"needs CuPy on the GPU: {error}"
    return None


SKIP_REASON = _skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")]

SENTINEL = 8
Z_BOUND = 5.0  # standard errors allowed in the statistical checks
SHAPES = [(5, 3, 3, 3), (7, 1, 64, 64), (2, 1)]  # straddling groups + ragged tail; aligned; tiny
DTYPES = [torch.float32, torch.float64]


@pytest.fixture
def fresh_seed() -> int:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"fresh input seed: {seed}")  # shown by pytest on failure
    return seed


def _case(shape, dtype, seed):
    schedule = CosineSchedule(1000)
    generator = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=dtype, device="cuda")
    eps = torch.randn(shape, generator=generator, dtype=dtype, device="cuda")
    levels = torch.randint(0, 1000, (shape[0],), generator=generator, device="cuda")
    levels[0] = 0
    return schedule, x, eps, levels


def _poisoned_like(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer with SENTINEL extra elements, all NaN; the view of x's shape at its start)."""
    buffer = torch.full((x.numel() + SENTINEL,), float("nan"), dtype=x.dtype, device=x.device)
    return buffer, buffer[:x.numel()].view(x.shape)


def _check_written(buffer: torch.Tensor, count: int) -> None:
    assert not torch.isnan(buffer[:count]).any(), f"{int(torch.isnan(buffer[:count]).sum())} of {count} unwritten"
    assert torch.isnan(buffer[count:]).all(), "the kernel wrote past the end of its output"


def _ulps(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    spacing = np.spacing(np.abs(expected)).astype(np.float64)
    return np.abs(actual.astype(np.float64) - expected.astype(np.float64)) / spacing


def _coefficients(schedule, levels, x, *names):
    return [schedule.gather(name, levels, x) for name in names]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_ddpm_step_kernel_equals_torch_reference(shape, dtype, fresh_seed):
    from emu.diffusion.fused import fused_ddpm_step, fused_philox_normal

    schedule, x, eps, levels = _case(shape, dtype, fresh_seed)
    coefficients = _coefficients(schedule, levels, x, "reciprocal_sqrt_alphas", "noise_coefficients",
                                 "posterior_stds")
    seed, offset = fresh_seed * 7919 + 1, fresh_seed % 1000
    noise = fused_philox_normal(shape, seed, offset, dtype=dtype)
    expected = ddpm_step(x, levels, eps, schedule, noise=noise, backend="torch")
    for given in (None, noise):  # in-kernel noise, then the given-noise kernel
        buffer, out = _poisoned_like(x)
        fused_ddpm_step(x, eps, *coefficients, noise=given, seed=seed, offset=offset, out=out)
        torch.cuda.synchronize()
        _check_written(buffer, x.numel())
        assert torch.equal(out, expected), f"max |difference| {(out - expected).abs().max().item():.3g}"
    # Through the public API ("auto" picks the kernel for CUDA tensors).
    assert torch.equal(ddpm_step(x, levels, eps, schedule, seed=seed, offset=offset), expected)
    assert torch.equal(ddpm_step(x, levels, eps, schedule, noise=noise, backend="cupy"), expected)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_add_noise_and_tweedie_kernels_equal_torch_reference(shape, dtype, fresh_seed):
    from emu.diffusion.fused import fused_add_noise, fused_tweedie

    schedule, clean, eps, levels = _case(shape, dtype, fresh_seed)
    scales = _coefficients(schedule, levels, clean, "sqrt_alpha_bars", "sqrt_one_minus_alpha_bars")
    buffer, out = _poisoned_like(clean)
    noise_buffer, noise_out = _poisoned_like(clean)
    noisy, drawn = fused_add_noise(clean, *scales, seed=fresh_seed, offset=3, out=out, noise_out=noise_out)
    torch.cuda.synchronize()
    _check_written(buffer, clean.numel())
    _check_written(noise_buffer, clean.numel())
    expected = add_noise(schedule, clean, levels, drawn, backend="torch")
    assert torch.equal(noisy, expected)
    assert torch.equal(add_noise(schedule, clean, levels, drawn, backend="cupy"), expected)
    buffer, out = _poisoned_like(clean)
    fused_tweedie(noisy, eps, *scales, out=out)
    torch.cuda.synchronize()
    _check_written(buffer, clean.numel())
    assert torch.equal(out, tweedie(schedule, noisy, levels, eps, backend="torch"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_philox_kernel_noise_matches_numpy_convention(dtype):
    from emu.diffusion.fused import fused_philox_normal

    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    for count, seed, offset in [(1, 0, 0), (5, 1, 2), (1_000_003, 12345, 7), (4099, 2**64 - 1, 2**64 - 1)]:
        buffer = torch.full((count + SENTINEL,), float("nan"), dtype=dtype, device="cuda")
        fused_philox_normal((count,), seed, offset, out=buffer[:count])
        torch.cuda.synchronize()
        _check_written(buffer, count)
        actual = buffer[:count].cpu().numpy()
        expected = philox_normal((count,), seed, offset, np_dtype)
        ulps = _ulps(actual, expected)
        limit = 1 if dtype == torch.float32 else 4
        assert ulps.max() <= limit, f"count {count}: {ulps.max()} ulp from numpy"
        assert (ulps > 0).mean() < (1e-4 if dtype == torch.float32 else 0.05)


def test_gpu_in_kernel_noise_statistics():
    from emu.diffusion.fused import fused_philox_normal

    batch, per_sample = 256, 64 * 64
    z = fused_philox_normal((batch, per_sample), seed=2025, offset=0, dtype=torch.float64)
    n = z.numel()
    flat = z.reshape(-1)
    assert abs(flat.mean().item()) < Z_BOUND / n**0.5
    assert abs(flat.var().item() - 1) < Z_BOUND * (2 / n) ** 0.5
    for lag in (1, 2, 3, 4, 5, 8):
        correlation = torch.corrcoef(torch.stack([flat[:-lag], flat[lag:]]))[0, 1].item()
        assert abs(correlation) < Z_BOUND / (n - lag) ** 0.5, f"lag {lag}: {correlation:.2e}"
    correlations = torch.corrcoef(z)[tuple(torch.triu_indices(batch, batch, 1))]
    mean_square, expected = (correlations**2).mean().item(), 1 / (per_sample - 1)
    assert abs(mean_square / expected - 1) < Z_BOUND * (2 / correlations.numel()) ** 0.5
    # Offsets (consecutive calls of a chain) and neighbouring seeds give uncorrelated streams.
    for seed, offset in [(2025, 1), (2026, 0)]:
        other = fused_philox_normal((batch, per_sample), seed, offset, dtype=torch.float64).reshape(-1)
        correlation = torch.corrcoef(torch.stack([flat, other]))[0, 1].item()
        assert abs(correlation) < Z_BOUND / n**0.5
    # The noise inside a step: x = eps = 0 leaves sigma_t z, so z = out / sigma_t per sample.
    schedule = CosineSchedule(1000)
    zeros = torch.zeros(batch, 1, 64, 64, device="cuda")
    levels = torch.full((batch,), 500, device="cuda")
    stepped = ddpm_step(zeros, levels, zeros, schedule, backend="cupy", seed=9, offset=1)
    sigma = schedule.gather("posterior_stds", levels, zeros)
    recovered = (stepped / sigma).double().reshape(-1)
    assert abs(recovered.mean().item()) < Z_BOUND / n**0.5
    assert abs(recovered.var().item() - 1) < Z_BOUND * (2 / n) ** 0.5 + 1e-6


def test_gpu_ddpm_step_is_reproducible_from_seed_offset_and_generator(fresh_seed):
    schedule, x, eps, levels = _case((8, 1, 32, 32), torch.float32, fresh_seed)
    levels[:] = 300
    first = ddpm_step(x, levels, eps, schedule, backend="cupy", seed=5, offset=1)
    assert torch.equal(first, ddpm_step(x, levels, eps, schedule, backend="cupy", seed=5, offset=1))
    assert not torch.equal(first, ddpm_step(x, levels, eps, schedule, backend="cupy", seed=5, offset=2))
    by_generator = ddpm_step(x, levels, eps, schedule, backend="cupy", generator=torch.Generator().manual_seed(4))
    assert torch.equal(by_generator, ddpm_step(x, levels, eps, schedule, generator=torch.Generator().manual_seed(4)))
    drawn = int(torch.randint(0, 2**63 - 1, (1,), generator=torch.Generator().manual_seed(4)))
    assert torch.equal(by_generator, ddpm_step(x, levels, eps, schedule, backend="cupy", seed=drawn))
    # The torch backend with the same seed draws the same noise through numpy (float32: equal, or
    # an ulp where CUDA's float64 transcendentals round differently).
    reference = ddpm_step(x, levels, eps, schedule, backend="torch", seed=5, offset=1)
    torch.testing.assert_close(first, reference, rtol=2e-7, atol=1e-7)


def test_gpu_kernels_run_on_torchs_current_stream_and_accept_strided_inputs(fresh_seed):
    schedule, x, eps, levels = _case((16, 2, 64, 64), torch.float32, fresh_seed)
    noise = torch.randn_like(x)
    expected = ddpm_step(x, levels, eps, schedule, noise=noise, backend="torch")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # Work queued on the side stream just before the kernel: the kernel must run after it.
        scaled = x * 1.0
        result = ddpm_step(scaled, levels, eps, schedule, noise=noise, backend="cupy")
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(result, expected)
    strided = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, not contiguous
    assert torch.equal(ddpm_step(strided, levels, eps, schedule, noise=noise, backend="cupy"), expected)


def test_gpu_cupy_backend_rejects_cpu_tensors_and_auto_keeps_torch_for_half():
    schedule = CosineSchedule(1000)
    x = torch.zeros(2, 4)
    with pytest.raises(ValueError, match='backend="torch"'):
        ddpm_step(x, 3, x, schedule, backend="cupy")
    half = torch.zeros(2, 4, device="cuda", dtype=torch.float16)  # no kernel for float16: "auto" uses torch
    assert ddpm_step(half, 3, half, schedule, noise=half).dtype == torch.float16
