"""emu.diffusion: the cosine schedule against its closed form, DDPM against exact Gaussian answers.

For Gaussian data x_clean ~ N(mu, sigma^2), iid per pixel, everything is known in closed form: the
noisy x_t is Gaussian, the optimal noise prediction E[eps | x_t] is linear in x_t, and so are
E[x_clean | x_t] and E[x_{t-1} | x_t]. That oracle stands in for a trained network, so the tests
check the DDPM algebra itself (Tweedie, the reverse mean, the full ancestral chain) to round-off or,
for the sampled chain, to its statistical error. In float64 on the CPU (the chain in float32), about
two seconds of test bodies in total.
"""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
import torch

from emu.backends import BackendUnavailable
from emu.diffusion import (TABLES, CosineSchedule, DDPMScheduler, add_noise, ddpm_step, posterior_std,
                           sample_levels, tweedie)

T = 1000
OFFSET = 0.008
MU, SIGMA = 0.7, 1.3  # the Gaussian data of the oracle tests


@pytest.fixture(scope="module")
def schedule() -> CosineSchedule:
    return CosineSchedule(T)


def cosine_f(u: float, offset: float = OFFSET) -> float:
    """f(u) = cos^2((u + s)/(1 + s) pi/2), Nichol & Dhariwal eq. 17, written out independently."""
    return math.cos((u + offset) / (1 + offset) * math.pi / 2) ** 2


# -- the Gaussian oracle ---------------------------------------------------------------------------
def oracle_noise(x: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """E[eps | x_t] for x_clean ~ N(MU, SIGMA^2): Cov(eps, x_t)/Var(x_t) (x_t - E x_t)."""
    variance = alpha_bar * SIGMA**2 + 1 - alpha_bar
    return torch.sqrt(1 - alpha_bar) * (x - torch.sqrt(alpha_bar) * MU) / variance


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| (torch.testing.assert_close costs ~2 s of imports on its first call)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    return (actual - expected).abs().max().item()


def per_sample(values: torch.Tensor, levels: torch.Tensor, ndim: int) -> torch.Tensor:
    return values[levels].reshape(-1, *([1] * (ndim - 1)))


# -- schedule ------------------------------------------------------------------------------------------
def test_cosine_schedule_equals_its_closed_form(schedule):
    betas, alphas, alpha_bars = schedule.betas, schedule.alphas, schedule.alpha_bars
    assert betas.dtype == alphas.dtype == alpha_bars.dtype == torch.float64
    assert betas.shape == alphas.shape == alpha_bars.shape == schedule.alpha_bars_previous.shape == (T,)
    assert torch.equal(alphas, 1 - betas)
    assert torch.equal(alpha_bars, torch.cumprod(1 - betas, 0))
    assert torch.equal(schedule.alpha_bars_previous, torch.cat([torch.ones(1, dtype=torch.float64), alpha_bars[:-1]]))
    assert schedule.alpha_bars_previous[0].item() == 1.0

    # Where the clip is inactive the product telescopes: alpha_bar_i = f((i+1)/T) / f(0).
    clipped = [i for i in range(T) if 1 - cosine_f((i + 1) / T) / cosine_f(i / T) >= 0.999]
    assert clipped == [T - 1]  # for T = 1000 only the last level is clipped
    assert betas[-1].item() == 0.999
    for i in range(T - 1):
        expected = cosine_f((i + 1) / T) / cosine_f(0.0)
        assert abs(alpha_bars[i].item() - expected) <= 1e-12 * expected, i

    assert bool((betas > 0).all()) and bool((betas <= 0.999).all())
    assert bool((betas[1:] > betas[:-1]).all())  # log f is concave: the betas increase strictly
    assert bool((alpha_bars[1:] < alpha_bars[:-1]).all())
    assert 0 < alpha_bars[-1].item() < 1e-8  # the top level is pure noise for all practical purposes


def test_cosine_schedule_pinned_entries(schedule):
    # By hand from eq. 17: beta_0 = 1 - f(1/T)/f(0), beta_1 = 1 - f(2/T)/f(1/T), alpha_bar_499 = f(1/2)/f(0).
    beta_0 = 1 - cosine_f(1 / T) / cosine_f(0)
    beta_1 = 1 - cosine_f(2 / T) / cosine_f(1 / T)
    alpha_bar_mid = cosine_f(0.5) / cosine_f(0)
    assert schedule.betas[0].item() == pytest.approx(beta_0, rel=1e-12)
    assert schedule.betas[1].item() == pytest.approx(beta_1, rel=1e-12)
    assert schedule.alpha_bars[499].item() == pytest.approx(alpha_bar_mid, rel=1e-12)
    # The same numbers written down (a check on the test's formula too): f(0) = cos^2(0.00393 pi)...
    assert beta_0 == pytest.approx(4.1284224822e-05, rel=1e-9)
    assert alpha_bar_mid == pytest.approx(0.49384359044, rel=1e-9)
    assert schedule.betas[998].item() == pytest.approx(0.7499993929, rel=1e-9)  # last unclipped beta


def test_schedule_tables_and_gather(schedule):
    assert set(TABLES) == {"betas", "alphas", "alpha_bars", "alpha_bars_previous", "sqrt_alpha_bars",
                           "sqrt_one_minus_alpha_bars", "reciprocal_sqrt_alphas", "noise_coefficients",
                           "posterior_variances", "posterior_stds"}
    like = torch.zeros(3, 2, 4, 4, dtype=torch.float32)
    levels = torch.tensor([0, 17, 999])
    gathered = schedule.gather("alpha_bars", levels, like)
    assert gathered.shape == (3, 1, 1, 1) and gathered.dtype == torch.float32
    assert torch.equal(gathered.flatten(), schedule.alpha_bars[levels].float())
    assert schedule.gather("betas", 5, like).flatten().tolist() == [schedule.betas[5].float().item()] * 3
    assert max_error(schedule.table("posterior_stds") ** 2, schedule.table("posterior_variances")) < 1e-15
    with pytest.raises(ValueError, match="name must be one of"):
        schedule.gather("sigmas", levels, like)
    # Tables are handed out as copies: changing one leaves the schedule alone.
    schedule.betas[0] = 5.0
    schedule.table("betas")[0] = 5.0
    assert schedule.betas[0].item() < 1e-4


@pytest.mark.parametrize("arguments,field", [
    ({"num_levels": 1}, "num_levels"), ({"num_levels": 10.0}, "num_levels"), ({"num_levels": True}, "num_levels"),
    ({"offset": 0.0}, "offset"), ({"offset": -0.1}, "offset"), ({"offset": float("nan")}, "offset"),
    ({"max_beta": 1.0}, "max_beta"), ({"max_beta": 0.0}, "max_beta"), ({"max_beta": "0.9"}, "max_beta"),
])
def test_schedule_rejects_bad_arguments_naming_the_field(arguments, field):
    with pytest.raises(ValueError, match=field):
        CosineSchedule(**arguments)


def test_config_round_trip(schedule):
    for original in (schedule, CosineSchedule(num_levels=50, offset=0.01, max_beta=0.99)):
        config = json.loads(json.dumps(original.config))
        rebuilt = CosineSchedule.from_config(config)
        assert rebuilt == original
        assert torch.equal(rebuilt.alpha_bars, original.alpha_bars)
        scheduler = DDPMScheduler.from_config(DDPMScheduler(original).config)
        assert scheduler.schedule == original and scheduler.num_levels == original.num_levels
    with pytest.raises(ValueError, match="unknown schedule parameter"):
        CosineSchedule.from_config({**schedule.config, "beta_end": 0.02})
    with pytest.raises(ValueError, match="schedule must be 'cosine'"):
        CosineSchedule.from_config({**schedule.config, "schedule": "linear"})


# -- forward process and Tweedie -----------------------------------------------------------------------
def test_add_noise_has_the_forward_moments(schedule):
    generator = torch.Generator().manual_seed(1)
    levels = torch.tensor([0, 300, 700, 999])
    clean = torch.full((4, 1, 256, 256), MU, dtype=torch.float64)
    noisy = add_noise(schedule, clean, levels, torch.randn(clean.shape, generator=generator, dtype=torch.float64))
    count = clean[0].numel()
    for sample, level in enumerate(levels.tolist()):
        alpha_bar = schedule.alpha_bars[level].item()
        mean, std = noisy[sample].mean().item(), noisy[sample].std().item()
        assert abs(mean - math.sqrt(alpha_bar) * MU) < 4 * math.sqrt(1 - alpha_bar) / math.sqrt(count)
        assert std == pytest.approx(math.sqrt(1 - alpha_bar), rel=4 / math.sqrt(2 * count))


def test_tweedie_inverts_add_noise_given_the_true_noise(schedule):
    generator = torch.Generator().manual_seed(2)
    levels = torch.arange(T)  # every level, one sample each
    clean = torch.randn(T, 2, 8, 8, generator=generator, dtype=torch.float64)
    noise = torch.randn(T, 2, 8, 8, generator=generator, dtype=torch.float64)
    recovered = tweedie(schedule, add_noise(schedule, clean, levels, noise), levels, noise)
    assert max_error(recovered, clean) < 1e-10


def test_tweedie_with_the_oracle_is_the_exact_posterior_mean(schedule):
    levels = torch.arange(T)
    x = torch.linspace(-4, 4, 33, dtype=torch.float64).repeat(T, 1).reshape(T, 1, 33)
    alpha_bar = per_sample(schedule.alpha_bars, levels, x.ndim)
    posterior_mean = MU + torch.sqrt(alpha_bar) * SIGMA**2 * (x - torch.sqrt(alpha_bar) * MU) / (
        alpha_bar * SIGMA**2 + 1 - alpha_bar)
    estimate = tweedie(schedule, x, levels, oracle_noise(x, alpha_bar))
    # Exact up to round-off, which the division by sqrt(alpha_bar) amplifies at the top levels
    # (alpha_bar_{T-1} ~ 2e-9): 1e-12 wherever alpha_bar > 1e-3, 1e-14 / sqrt(alpha_bar) everywhere.
    error = (estimate - posterior_mean).abs()
    moderate = schedule.alpha_bars > 1e-3
    assert moderate.sum() > 900 and error[moderate].max().item() < 1e-12
    assert (error * torch.sqrt(alpha_bar)).max().item() < 1e-14


# -- the reverse step --------------------------------------------------------------------------------
def test_reverse_mean_with_the_oracle_is_the_exact_gaussian_reverse_mean(schedule):
    # x_{t-1} and x_t are jointly Gaussian: x_{t-1} = sqrt(ab_{t-1}) x_clean + sqrt(1 - ab_{t-1}) e and
    # x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) e'. So Var x_t = ab_t sigma^2 + 1 - ab_t and
    # Cov(x_{t-1}, x_t) = sqrt(alpha_t) Var x_{t-1} = sqrt(ab_{t-1} ab_t) sigma^2 + sqrt(alpha_t)(1 - ab_{t-1}),
    # E[x_{t-1} | x_t] = sqrt(ab_{t-1}) mu + Cov/Var (x_t - sqrt(ab_t) mu). At t = 0 (ab_{-1} = 1) this is
    # E[x_clean | x_0].
    levels = torch.arange(T)
    x = torch.linspace(-4, 4, 33, dtype=torch.float64).repeat(T, 1).reshape(T, 1, 33)
    ab = per_sample(schedule.alpha_bars, levels, x.ndim)
    ab_previous = per_sample(schedule.alpha_bars_previous, levels, x.ndim)
    alpha = per_sample(schedule.alphas, levels, x.ndim)
    covariance = torch.sqrt(ab_previous * ab) * SIGMA**2 + torch.sqrt(alpha) * (1 - ab_previous)
    variance = ab * SIGMA**2 + 1 - ab
    # A check on the derivation itself: Cov = sqrt(alpha_t) Var x_{t-1}, computed the other way.
    assert max_error(covariance, torch.sqrt(alpha) * (ab_previous * SIGMA**2 + 1 - ab_previous)) < 1e-14
    reverse_mean = torch.sqrt(ab_previous) * MU + covariance / variance * (x - torch.sqrt(ab) * MU)

    step_mean = ddpm_step(x, levels, oracle_noise(x, ab), schedule, noise=torch.zeros_like(x))
    assert max_error(step_mean, reverse_mean) < 1e-12


def test_ancestral_chain_with_the_oracle_samples_the_data_distribution(schedule):
    # In float32, the precision networks run in (and float32 normals are 5x quicker to draw).
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, 1, 50, 100, generator=generator)  # 20,000 pixels of pure noise at level T-1
    alpha_bars = schedule.alpha_bars.float()
    for level in range(T - 1, -1, -1):
        x = ddpm_step(x, level, oracle_noise(x, alpha_bars[level]), schedule, generator=generator)
    # Statistical error of the mean ~ sigma/sqrt(20000) = 0.009; the chain's own bias (posterior
    # variance instead of the true reverse variance) is far below that.
    assert x.mean().item() == pytest.approx(MU, abs=0.04)
    assert x.std().item() == pytest.approx(SIGMA, rel=0.02)


def test_per_sample_levels_equal_stepping_each_sample_alone(schedule):
    generator = torch.Generator().manual_seed(4)
    levels = torch.tensor([0, 5, 500, 999])
    x, predicted, noise = (torch.randn(4, 2, 8, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    together = ddpm_step(x, levels, predicted, schedule, noise=noise)
    for i, level in enumerate(levels.tolist()):
        alone = ddpm_step(x[i:i + 1], level, predicted[i:i + 1], schedule, noise=noise[i:i + 1])
        assert torch.equal(together[i:i + 1], alone)
    assert not torch.equal(ddpm_step(x, 7, predicted, schedule, noise=noise),
                           ddpm_step(x, 7, predicted, schedule, noise=torch.zeros_like(noise)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_level_zero_adds_no_noise(schedule, dtype):
    assert posterior_std(schedule, 0).tolist() == [0.0]
    assert posterior_std(schedule, torch.tensor([0, 1])).tolist()[0] == 0.0
    assert posterior_std(schedule, torch.tensor([0, 1]))[1].item() > 0
    generator = torch.Generator().manual_seed(5)
    x, predicted = (torch.randn(3, 1, 8, 8, generator=generator, dtype=dtype) for _ in range(2))
    with_random_noise = ddpm_step(x, 0, predicted, schedule, generator=generator)
    assert torch.equal(with_random_noise, ddpm_step(x, 0, predicted, schedule, noise=torch.zeros_like(x)))
    mixed = ddpm_step(x, torch.tensor([0, 3, 0]), predicted, schedule, generator=generator)
    assert torch.equal(mixed[0::2], with_random_noise[0::2])
    assert with_random_noise.dtype == dtype


def test_posterior_std_closed_form(schedule):
    levels = torch.tensor([1, 10, 998, 999])
    betas, ab = schedule.betas, schedule.alpha_bars
    expected = torch.sqrt(betas[levels] * (1 - ab[levels - 1]) / (1 - ab[levels]))
    assert max_error(posterior_std(schedule, levels) / expected, torch.ones(4, dtype=torch.float64)) < 1e-14


def test_float32_step_matches_float64(schedule):
    generator = torch.Generator().manual_seed(6)
    x, predicted, noise = (torch.randn(4, 1, 16, 16, generator=generator, dtype=torch.float64) for _ in range(3))
    levels = torch.tensor([1, 8, 100, 900])
    reference = ddpm_step(x, levels, predicted, schedule, noise=noise)
    single = ddpm_step(x.float(), levels, predicted.float(), schedule, noise=noise.float())
    assert single.dtype == torch.float32
    assert max_error(single.double(), reference) < 1e-5 * reference.abs().max().item()


@pytest.mark.parametrize("levels", [-1, T, torch.tensor([0, T]), torch.tensor([-1, 3]), torch.tensor([0.0, 1.0]),
                                    torch.tensor([1, 2, 3]), 2.0])
def test_invalid_levels_raise_naming_levels(schedule, levels):
    x = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="levels"):
        ddpm_step(x, levels, x, schedule)
    with pytest.raises(ValueError, match="levels"):
        add_noise(schedule, x, levels, x)


def test_mismatched_shapes_and_unknown_backends_raise(schedule):
    x = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="predicted_noise"):
        ddpm_step(x, 3, x[:, :, :2], schedule)
    with pytest.raises(ValueError, match="noise"):
        ddpm_step(x, 3, x, schedule, noise=x[:1])
    with pytest.raises(ValueError, match="noisy"):
        ddpm_step(x.long(), 3, x, schedule)
    with pytest.raises(ValueError, match="backend must be one of"):
        ddpm_step(x, 3, x, schedule, backend="jax")
    for backend in ("cupy", "julia"):
        # Unavailable here (BackendUnavailable), or available but given CPU tensors ("cupy": ValueError);
        # either way the message points to the torch backend.
        with pytest.raises((BackendUnavailable, ValueError), match='backend="torch"'):
            ddpm_step(x, 3, x, schedule, backend=backend)
    if not _backend_available("cupy"):
        with pytest.raises(BackendUnavailable, match='backend="torch"'):
            DDPMScheduler(schedule, backend="cupy")
    if not _backend_available("julia"):
        with pytest.raises(BackendUnavailable, match='backend="torch"'):
            DDPMScheduler(schedule, backend="julia")
    assert torch.equal(ddpm_step(x + 1, 3, x, schedule, noise=x, backend="torch"),
                       ddpm_step(x + 1, 3, x, schedule, noise=x, backend="auto"))


def _backend_available(backend: str) -> bool:
    """Whether `backend` can run here, decided without emu.diffusion (CuPy with a GPU; juliacall installed)."""
    if backend == "julia":
        import importlib.util

        return importlib.util.find_spec("juliacall") is not None
    from emu.cuda import require_cupy

    try:
        require_cupy()
    except BackendUnavailable:
        return False
    return True


def test_scheduler_step_is_ddpm_step(schedule):
    scheduler = DDPMScheduler(schedule)
    assert scheduler.num_levels == T and DDPMScheduler().schedule == schedule
    x, predicted = (torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                    for s in (7, 8))
    levels = torch.tensor([2, 0, 40])
    stepped = scheduler.step(predicted, levels, x, generator=torch.Generator().manual_seed(9))
    assert torch.equal(stepped, ddpm_step(x, levels, predicted, schedule, generator=torch.Generator().manual_seed(9)))
    assert torch.equal(scheduler.add_noise(x, levels, predicted), add_noise(schedule, x, levels, predicted))
    assert torch.equal(scheduler.tweedie(x, levels, predicted), tweedie(schedule, x, levels, predicted))


def test_sample_levels_are_uniform_over_every_level():
    levels = sample_levels(100_000, T, torch.Generator().manual_seed(10))
    assert levels.dtype == torch.int64 and levels.shape == (100_000,)
    counts = torch.bincount(levels, minlength=T)
    assert counts.shape == (T,) and int(counts.min()) > 50 and int(counts.max()) < 150  # Poisson(100)
    again = sample_levels(100_000, T, torch.Generator().manual_seed(10), device="cpu")
    assert torch.equal(levels, again)
    with pytest.raises(ValueError, match="num_levels"):
        sample_levels(4, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_step_equals_cpu_step_with_a_cpu_generator(schedule):
    x, predicted = (torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(s)) for s in (11, 12))
    levels = torch.tensor([0, 4, 900])
    cpu = ddpm_step(x, levels, predicted, schedule, generator=torch.Generator().manual_seed(13))
    # backend="torch": "auto" sends CUDA tensors to the fused kernel, whose in-kernel Philox noise differs.
    gpu = ddpm_step(x.cuda(), levels.cuda(), predicted.cuda(), schedule, generator=torch.Generator().manual_seed(13),
                    backend="torch")
    assert max_error(gpu.cpu(), cpu) < 1e-5


def test_diffusion_layer_imports_no_network_training_or_cli():
    # style.md bullet 1: schedules and samplers never import a specific network.
    package = Path(__file__).resolve().parents[1] / "python" / "emu" / "diffusion"
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] in {"torch", "numpy", "math", "operator", "dataclasses", "typing",
                                              "__future__", "emu", "functools", "hashlib",
                                              "importlib"}, f"{path.name} imports {name}"
                if name.startswith("emu"):
                    # emu.cuda and emu.julia are the doors to the fused kernels (style.md bullet 15).
                    assert name.startswith(("emu.diffusion", "emu.backends", "emu.cuda", "emu.julia",
                                            "emu.resources")), f"{path.name} imports {name}"
