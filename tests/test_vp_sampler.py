"""emu.diffusion's continuous-time side (Cohesion/SDA): the VP schedule, the predictor-corrector
sampler, window-score composition and Tweedie likelihood guidance, against exact Gaussian answers.

For Gaussian data x_0 ~ N(m, C) the noisy x_t ~ N(mu m, mu^2 C + sigma^2 I) and the optimal noise
prediction is eps_hat(x, t) = -sigma score = sigma (mu^2 C + sigma^2 I)^{-1} (x - mu m): that
oracle stands in for a trained network, so the tests check the algebra of the sampler, of the
composition and of the guidance, to round-off or to their statistical error. Gaussian Markov chains
(AR(1), AR(2)) have banded precision matrices, which makes the window composition exact at t = 0.

Measured (float64, CPU, the seeds below) and asserted with margin:
  - predictor only (corrections 0), 256 steps, 20,000 samples of a 4-d Gaussian (covariance
    eigenvalues 0.32 .. 3.57) started from the exact p_1: max |z| of the mean 0.48, of the
    covariance entries 1.82 (asserted < 4); a score with a 10% larger covariance and a mean shifted
    by 0.1 gives |z| 14.2 and 10.2 (asserted > 8).
  - from x_1 ~ N(0, I) instead (mu(1) = sqrt(eta) = 0.032, so p_1 is not N(0, I)) the mean is off
    by mu(1) C^{1/2} (mu(1)^2 C + sigma(1)^2 I)^{-1/2} m, 3.2% of |m| (|z| 3.9 against m); the
    samples match that exact push-forward of N(0, I) (|z| 1.7 and 2.6).
  - one Langevin correction per step, SDA's delta = tau / mean(s^2): unbiased only for small tau and
    many dimensions (the normalisation is per sample). With 64 iid copies of the 4-d Gaussian per
    sample (256 dims): tau = 0.02: |z| 1.7, 2.0, whitened covariance eigenvalues 0.997 .. 1.027;
    tau = 0.1: 1.006 .. 1.128; tau = 0.5 (Cohesion's value): 1.05 .. 1.71, the unadjusted Langevin
    bias (stationary variance lambda / (1 - h / (2 lambda)) at step h). In 4 dims alone (one copy)
    the per-sample mean(s^2) is often ~0 and the step huge: eigenvalues up to 2.4 at tau = 0.02 and
    17 at tau = 0.5 (not asserted).
  - windows (AR chains of 9 two-dimensional frames): exact at t = 0 to 1e-15 (relative); at
    t = 0.01 / 0.1 / 0.3 relative errors 1.9e-4 / 1.7e-2 / 8.8e-2 (AR(1), W = 3), 5.2e-8 / 4.4e-4 /
    1.4e-2 (AR(1), W = 5), 1.0e-4 / 9.4e-3 / 5.0e-2 (AR(2), W = 5); W = 1 for the AR(1) chain is off
    by 73%, W = 3 for the AR(2) chain by 39%. Sampling whole AR(1) sequences (8 frames, 10,000
    samples, 64 predictor steps) with the composed score: whitened covariance eigenvalues
    0.89 .. 1.02 for W = T (one window, exact), 0.79 .. 1.20 for W = 5, 0.59 .. 1.76 for W = 3: the
    composition's error at intermediate t (4% for W = 5, 12% for W = 3 at t = 0.5, in the
    covariance's metric) accumulates along the flow.
  - guidance, 4x4 periodic Gaussian field, 2x2 coarsening, sigma_y = 0.05, gamma = 1, 256 steps:
    coarse RMS of A(x) - y 0.00096 (through the network) / 0.0015 (Jacobian-free) at strength 10,
    0.41 / 0.35 at strength 1, against 0.85 for unconditional samples (the exact posterior's is
    0.050; with gamma = 1/4, the scale of A A^T, strength 1 gives 0.094 / 0.048).
About 10 s in all on one thread.
"""

from __future__ import annotations

import math

import pytest
import torch

from emu.diffusion import (
    CoarsenOperator,
    IdentityOperator,
    MaskOperator,
    PredictorCorrectorSampler,
    VPSchedule,
    compose_window_scores,
    guided_eps_fn,
    guided_noise,
    observation_variance,
    strided_starts,
    window_starts,
)

SCHEDULE = VPSchedule()
F64 = torch.float64


# -- the Gaussian oracle ---------------------------------------------------------------------------
def gaussian_eps(mean: torch.Tensor, cov: torch.Tensor, schedule: VPSchedule = SCHEDULE):
    """eps_hat(x, t) = sigma (mu^2 C + sigma^2 I)^{-1} (x - mu m) for x_0 ~ N(mean, cov), exactly.

    x has shape (batch, ...) with a multiple of d = len(mean) entries per sample: each consecutive
    group of d entries is one independent copy of the Gaussian (so (N, d), (N, P, d) and fields
    (N, 1, n, n) with d = n^2 all work). Differentiable in x; t of shape (batch,).
    """
    d = mean.shape[0]
    identity = torch.eye(d, dtype=F64)

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        times = t.reshape(-1).to(F64).expand(x.shape[0]) if t.ndim else t.to(F64).expand(x.shape[0])
        copies = x[0].numel() // d
        rows = x.reshape(x.shape[0] * copies, d)
        row_times = times.repeat_interleave(copies)
        out = torch.empty_like(rows)
        for value in torch.unique(row_times):  # one matrix per distinct time (the sampler uses one)
            pick = row_times == value
            mu, sigma = float(schedule.mu(float(value))), float(schedule.sigma(float(value)))
            gain = sigma * torch.linalg.inv(mu**2 * cov + sigma**2 * identity)
            out = out.index_put((pick.nonzero()[:, 0],), (rows[pick] - mu * mean) @ gain.T)
        return out.reshape(x.shape)

    return eps


def random_gaussian(d: int, seed: int, floor: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    factor = torch.randn(d, d, generator=generator, dtype=F64)
    return torch.randn(d, generator=generator, dtype=F64) * 0.7, factor @ factor.T / d + floor * torch.eye(d, dtype=F64)


def z_scores(samples: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> tuple[float, float]:
    """max |z| of the sample mean and of the sample covariance entries against (mean, cov)."""
    n = samples.shape[0]
    variances = torch.diag(cov)
    mean_z = (samples.mean(0) - mean) / (variances / n).sqrt()
    cov_se = ((variances[:, None] * variances[None, :] + cov**2) / n).sqrt()
    cov_z = (torch.cov(samples.T) - cov) / cov_se
    return mean_z.abs().max().item(), cov_z.abs().max().item()


def whitened_eigenvalues(samples: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of L^{-1} Cov(samples) L^{-T}, C = L L^T: all 1 for the right covariance."""
    chol = torch.linalg.cholesky(cov)
    inner = torch.linalg.solve_triangular(chol, torch.cov(samples.T), upper=False)
    return torch.linalg.eigvalsh(torch.linalg.solve_triangular(chol, inner.T, upper=False))


def exact_initial(mean: torch.Tensor, cov: torch.Tensor, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Samples of the exact p_1 = N(mu(1) m, mu(1)^2 C + sigma(1)^2 I), with shape (..., d)."""
    mu, sigma = float(SCHEDULE.mu(1.0)), float(SCHEDULE.sigma(1.0))
    chol = torch.linalg.cholesky(mu**2 * cov + sigma**2 * torch.eye(cov.shape[0], dtype=F64))
    noise = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return mu * mean + noise @ chol.T


# -- VPSchedule ----------------------------------------------------------------------------------------
def test_vp_schedule_equals_its_closed_form():
    eta = 1e-3
    times = torch.linspace(0, 1, 101, dtype=F64)
    closed = torch.tensor([math.cos(math.acos(math.sqrt(eta)) * float(t)) ** 2 for t in times], dtype=F64)
    assert (SCHEDULE.alpha(times) - closed).abs().max() < 1e-15
    assert (SCHEDULE.mu(times) ** 2 - closed).abs().max() < 1e-15
    assert (SCHEDULE.sigma(times) ** 2 - (1 - closed)).abs().max() < 1e-15
    assert float(SCHEDULE.mu(0.0)) == 1.0 and float(SCHEDULE.sigma(0.0)) == 0.0
    assert abs(float(SCHEDULE.mu(1.0)) ** 2 - eta) < 1e-15
    assert SCHEDULE.mu(torch.tensor([0.5], dtype=torch.float32)).dtype == torch.float32
    assert SCHEDULE.sigma(0.25).dtype == F64 and SCHEDULE.sigma(0.25).ndim == 0
    # sigma keeps its relative precision near t = 0 (sin, not sqrt(1 - cos^2)).
    assert abs(float(SCHEDULE.sigma(1e-9)) / (SCHEDULE.rate * 1e-9) - 1) < 1e-12


def test_vp_add_noise_is_per_sample_and_config_round_trips():
    x = torch.randn(3, 2, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(3, 2, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    noisy = SCHEDULE.add_noise(x, t, noise)
    for i in range(3):
        expected = SCHEDULE.mu(t[i]) * x[i] + SCHEDULE.sigma(t[i]) * noise[i]
        assert (noisy[i] - expected).abs().max() < 1e-15
    assert torch.equal(noisy[0], x[0])
    assert torch.equal(SCHEDULE.add_noise(x, 0.5, noise)[1], noisy[1])
    assert (SCHEDULE.tweedie(noisy[1:], t[1:], noise[1:]) - x[1:]).abs().max() < 1e-12
    assert (SCHEDULE.score(noisy[1:2], 0.5, noise[1:2]) + noise[1:2] / SCHEDULE.sigma(0.5)).abs().max() < 1e-15
    half = SCHEDULE.add_noise(x.float(), t.float(), noise.float())
    assert half.dtype == torch.float32
    assert VPSchedule.from_config(VPSchedule(eta=2e-3).config) == VPSchedule(eta=2e-3)
    assert VPSchedule(eta=2e-3).config == {"schedule": "vp_cosine", "eta": 2e-3}
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        SCHEDULE.add_noise(x, torch.tensor([0.0, 0.5, 1.5], dtype=F64), noise)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        SCHEDULE.add_noise(x, torch.tensor([0.1, 0.2], dtype=F64), noise)
    with pytest.raises(ValueError, match="eta"):
        VPSchedule(eta=1.0)
    with pytest.raises(ValueError, match="unknown"):
        VPSchedule.from_config({"schedule": "vp_cosine", "eta": 1e-3, "beta": 1})


# -- PredictorCorrectorSampler: the step contract ----------------------------------------------------
def test_timesteps_and_the_predictor_is_ddim():
    sampler = PredictorCorrectorSampler(SCHEDULE, steps=8, corrections=0)
    times = sampler.timesteps()
    assert times.shape == (9,) and times[0] == 1.0 and times[-1] == 0.0 and bool((times.diff() < 0).all())
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 5, dtype=F64, generator=generator)
    eps = torch.randn(4, 3, 5, dtype=F64, generator=generator)
    t = torch.tensor([0.9, 0.5, 0.3, 0.125], dtype=F64)
    t_next = t - 0.1
    clean = SCHEDULE.tweedie(x, t, eps)
    mu_next, sigma_next = SCHEDULE.coefficients(t_next, x)
    assert (sampler.step(eps, t, t_next, x) - (mu_next * clean + sigma_next * eps)).abs().max() < 1e-13
    assert (sampler.step(eps, t, 0.0, x) - clean).abs().max() < 1e-13  # the last step returns Tweedie's x0_hat
    with pytest.raises(ValueError, match="shape of x"):
        sampler.step(eps[:2], t, t_next, x)


def test_the_corrector_is_a_langevin_step_with_the_sda_step_size():
    sampler = PredictorCorrectorSampler(SCHEDULE, steps=8, corrections=1, tau=0.3)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2, 6, dtype=F64, generator=generator)
    eps = torch.randn(3, 2, 6, dtype=F64, generator=generator)
    z = torch.randn(3, 2, 6, dtype=F64, generator=generator)
    t = torch.tensor([0.7, 0.4, 0.05], dtype=F64)
    score = SCHEDULE.score(x, t, eps)
    delta = 0.3 / score.square().mean(dim=(1, 2), keepdim=True)
    expected = x + delta * score + torch.sqrt(2 * delta) * z
    assert (sampler.correct(eps, t, x, noise=z) - expected).abs().max() < 1e-12
    assert torch.equal(sampler.correct(eps, 0.0, x, noise=z), x)  # sigma = 0: the identity


def test_sample_counts_evaluations_and_runs_ensemble_members_member_major():
    mean, cov = random_gaussian(3, seed=5)
    oracle = gaussian_eps(mean, cov)
    calls = []

    def eps_fn(x, t):
        calls.append((x.shape[0], t.shape, t.dtype))
        return oracle(x, t)

    sampler = PredictorCorrectorSampler(SCHEDULE, steps=6, corrections=2, tau=0.1)
    ensemble = sampler.sample(eps_fn, (4, 3), torch.Generator().manual_seed(6), members=5, dtype=F64)
    assert ensemble.shape == (5, 4, 3) and ensemble.dtype == F64
    assert len(calls) == sampler.num_evaluations == 6 + 5 * 2
    assert all(call == (20, (20,), F64) for call in calls)
    flat = sampler.sample(oracle, (20, 3), torch.Generator().manual_seed(6), dtype=F64)
    assert torch.equal(ensemble.reshape(20, 3), flat)  # row m * 4 + b is member m of sample b
    assert torch.equal(sampler.sample(oracle, (20, 3), torch.Generator().manual_seed(6), dtype=F64), flat)
    assert PredictorCorrectorSampler.from_config(sampler.config).config == sampler.config
    with pytest.raises(ValueError, match="initial"):
        sampler.sample(oracle, (4, 3), members=2, initial=torch.zeros(4, 3, dtype=F64))


# -- PredictorCorrectorSampler against an exact Gaussian --------------------------------------------
def test_the_predictor_reproduces_a_gaussian_and_a_wrong_score_fails():
    mean, cov = random_gaussian(4, seed=0)
    sampler = PredictorCorrectorSampler(SCHEDULE, steps=256, corrections=0)
    initial = exact_initial(mean, cov, (20_000, 4), seed=1)
    samples = sampler.sample(gaussian_eps(mean, cov), (20_000, 4), initial=initial)
    mean_z, cov_z = z_scores(samples, mean, cov)
    assert mean_z < 4 and cov_z < 4, (mean_z, cov_z)  # measured 0.48, 1.82
    wrong = sampler.sample(gaussian_eps(mean + 0.1, 1.1 * cov), (20_000, 4), initial=initial)
    wrong_mean_z, wrong_cov_z = z_scores(wrong, mean, cov)
    assert wrong_mean_z > 8 and wrong_cov_z > 8, (wrong_mean_z, wrong_cov_z)

    # From N(0, I) (the default start) the probability-flow map gives the push-forward of N(0, I),
    # x_0 = m + C^{1/2} V_1^{-1/2} (x_1 - mu_1 m), V_1 = mu_1^2 C + sigma_1^2 I: mean m - mu_1 C^{1/2}
    # V_1^{-1/2} m (3% of m here), covariance C V_1^{-1} (0.1% from C).
    mu1, sigma1 = float(SCHEDULE.mu(1.0)), float(SCHEDULE.sigma(1.0))
    lam, vectors = torch.linalg.eigh(cov)
    gain = vectors @ torch.diag((lam / (mu1**2 * lam + sigma1**2)).sqrt()) @ vectors.T
    pushed_mean, pushed_cov = mean - mu1 * gain @ mean, gain @ gain.T
    default = sampler.sample(gaussian_eps(mean, cov), (20_000, 4), torch.Generator().manual_seed(2), dtype=F64)
    mean_z, cov_z = z_scores(default, pushed_mean, pushed_cov)
    assert mean_z < 4 and cov_z < 4, (mean_z, cov_z)
    assert z_scores(default, mean, cov)[0] > 2.5  # the offset is resolved by 20,000 samples (measured 3.9)


def test_one_correction_per_step_reproduces_a_gaussian_at_small_tau():
    # SDA's step normalises by the per-sample mean square of the score, a rule made for many
    # dimensions: each sample holds 64 independent copies of the 4-d Gaussian (256 dimensions).
    mean, cov = random_gaussian(4, seed=0)
    shape = (313, 64, 4)
    initial = exact_initial(mean, cov, shape, seed=1)
    sampler = PredictorCorrectorSampler(SCHEDULE, steps=256, corrections=1, tau=0.02)
    samples = sampler.sample(gaussian_eps(mean, cov), shape, torch.Generator().manual_seed(2), initial=initial)
    mean_z, cov_z = z_scores(samples.reshape(-1, 4), mean, cov)
    assert mean_z < 4 and cov_z < 4, (mean_z, cov_z)  # measured 1.7, 2.0
    wrong = sampler.sample(gaussian_eps(mean + 0.1, 1.1 * cov), shape, torch.Generator().manual_seed(2),
                           initial=initial)
    wrong_mean_z, wrong_cov_z = z_scores(wrong.reshape(-1, 4), mean, cov)
    assert wrong_mean_z > 8 and wrong_cov_z > 8, (wrong_mean_z, wrong_cov_z)


def test_the_corrector_at_tau_one_half_inflates_the_stiff_directions():
    # The unadjusted Langevin step is biased: at a fixed step h its stationary variance along an
    # eigendirection of variance lambda is lambda / (1 - h / (2 lambda)). SDA's h = tau / mean(s^2) is
    # about tau times the harmonic mean of the variances (0.77 here), so tau = 0.5 inflates the
    # smallest-variance direction (0.32) the most. Measured whitened eigenvalues 1.05 .. 1.71.
    mean, cov = random_gaussian(4, seed=0)
    shape = (313, 64, 4)
    sampler = PredictorCorrectorSampler(SCHEDULE, steps=64, corrections=1, tau=0.5)
    samples = sampler.sample(gaussian_eps(mean, cov), shape, torch.Generator().manual_seed(2),
                             initial=exact_initial(mean, cov, shape, seed=1))
    eigenvalues = whitened_eigenvalues(samples.reshape(-1, 4), cov)
    assert 1.4 < float(eigenvalues.max()) < 2.2 and float(eigenvalues.min()) > 0.97, eigenvalues
    assert z_scores(samples.reshape(-1, 4), mean, cov)[0] < 4  # the mean stays right


# -- windows -------------------------------------------------------------------------------------------
def ar_chain(order: int, frames: int, burn: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, covariance) of `frames` consecutive 2-d frames of a stationary Gaussian AR(order) chain.

    x_i = sum_k A_k x_{i-k} + b + w_i, w_i ~ N(0, Q); the joint covariance of a chain of length
    frames + burn is (I - B)^{-1} blockdiag(Q) (I - B)^{-T}, and its last `frames` frames are
    stationary to round-off (spectral radius < 0.8, 0.8^300 ~ 1e-29). Its precision is block-banded
    with bandwidth `order`.
    """
    d = 2
    coefficients = {1: [[[0.7, 0.2], [-0.1, 0.5]]],
                    2: [[[0.5, 0.1], [0.0, 0.3]], [[-0.3, 0.0], [0.1, 0.2]]]}[order]
    blocks = [torch.tensor(a, dtype=F64) for a in coefficients]
    noise = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=F64)
    length = frames + burn
    shift = torch.zeros(length * d, length * d, dtype=F64)
    for i in range(length):
        for k, block in enumerate(blocks, start=1):
            if i >= k:
                shift[i * d:(i + 1) * d, (i - k) * d:(i - k + 1) * d] = block
    inverse = torch.linalg.inv(torch.eye(length * d, dtype=F64) - shift)
    cov = inverse @ torch.block_diag(*[noise] * length) @ inverse.T
    frame_mean = torch.linalg.solve(torch.eye(d, dtype=F64) - sum(blocks), torch.tensor([0.5, -0.2], dtype=F64))
    return frame_mean.repeat(frames), cov[burn * d:, burn * d:]


def noisy_score(mean: torch.Tensor, cov: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """grad log p_t(x) = -(mu^2 C + sigma^2 I)^{-1} (x - mu m), per sample (flattened x: (B, D))."""
    mu, sigma = SCHEDULE.coefficients(t, x)
    identity = torch.eye(cov.shape[0], dtype=F64)
    matrices = mu[:, :, None] ** 2 * cov + sigma[:, :, None] ** 2 * identity
    return -torch.linalg.solve(matrices, (x - mu * mean).unsqueeze(-1)).squeeze(-1)


def window_marginal_score(mean: torch.Tensor, cov: torch.Tensor, window: int, d: int = 2):
    """The exact score of W consecutive frames of the stationary chain (their marginal), as a window network."""
    window_mean, window_cov = mean[:window * d], cov[:window * d, :window * d]

    def score(windows: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        flat = windows.reshape(windows.shape[0], -1)
        return noisy_score(window_mean, window_cov, flat, t).reshape(windows.shape)

    return score


def relative_composition_error(order: int, window: int, t: float, frames: int = 9, batch: int = 64,
                               stride: int = 1) -> float:
    """||composed - full|| / ||full|| over sequences x ~ p_t, frames of shape (C, y, x) = (2, 1, 1)."""
    mean, cov = ar_chain(order, frames)
    mu, sigma = float(SCHEDULE.mu(t)), float(SCHEDULE.sigma(t))
    chol = torch.linalg.cholesky(mu**2 * cov + sigma**2 * torch.eye(cov.shape[0], dtype=F64))
    noise = torch.randn(batch, cov.shape[0], generator=torch.Generator().manual_seed(3), dtype=F64)
    x = mu * mean + noise @ chol.T
    times = torch.full((batch,), t, dtype=F64)
    full = noisy_score(mean, cov, x, times)
    composed = compose_window_scores(window_marginal_score(mean, cov, window), x.reshape(batch, frames, 2, 1, 1),
                                     times, window=window, stride=stride).reshape(batch, -1)
    return float((composed - full).norm() / full.norm())


def test_window_starts_and_the_composition_contract():
    assert window_starts(7, 5).tolist() == [0, 0, 0, 1, 2, 2, 2]
    assert window_starts(5, 5).tolist() == [0] * 5
    assert window_starts(4, 1).tolist() == [0, 1, 2, 3]
    calls = []

    def marked(windows, t):
        # Each window's entries are (its sequence's time) * 1000 + (first frame index) * 10 + position.
        calls.append(windows.shape)
        return windows * 0 + t.reshape(-1, 1, 1) * 1000 + windows[:, :1, :1] * 10 + torch.arange(5.0).reshape(1, 5, 1)

    x = torch.arange(7.0).reshape(1, 7, 1).repeat(2, 1, 1)  # frame i holds the value i
    t = torch.tensor([0.25, 0.5])
    out = compose_window_scores(marked, x, t, window=5)
    assert calls == [torch.Size([6, 5, 1])]  # one call, B (T - W + 1) = 2 x 3 windows
    starts = window_starts(7, 5)
    expected = t.reshape(2, 1) * 1000 + starts.reshape(1, 7) * 10 + (torch.arange(7) - starts).reshape(1, 7)
    assert torch.equal(out[..., 0], expected)
    chunked = compose_window_scores(marked, x, t, window=5, max_windows=4)
    assert torch.equal(chunked, out) and [s[0] for s in calls[1:]] == [4, 2]
    with pytest.raises(ValueError, match="T >= W"):
        compose_window_scores(marked, x[:, :4], t, window=5)
    with pytest.raises(ValueError, match="shape of its windows"):
        compose_window_scores(lambda w, s: w[:, :2], x, t, window=5)


@pytest.mark.parametrize("order, window, at_small_t, at_t_one_tenth",
                         [(1, 3, 5e-4, 4e-2), (1, 5, 1e-6, 2e-3), (2, 5, 3e-4, 3e-2)])
def test_composed_window_scores_equal_the_full_score_of_a_markov_chain(order, window, at_small_t, at_t_one_tenth):
    # Exact at t = 0 (each frame's conditional depends on its Markov blanket only, inside its
    # window); an approximation at t > 0 (the noisy chain is not Markov). Measured at t = 0.01, 0.1:
    # AR(1) W=3: 1.9e-4, 1.7e-2; AR(1) W=5: 5.2e-8, 4.4e-4; AR(2) W=5: 1.0e-4, 9.4e-3.
    assert relative_composition_error(order, window, 0.0) < 1e-13
    assert relative_composition_error(order, window, 0.01) < at_small_t
    assert relative_composition_error(order, window, 0.1) < at_t_one_tenth


def test_strided_windows_cover_every_frame_from_its_most_central_window():
    assert strided_starts(11, 5, 3).tolist() == [0, 3, 6]
    assert strided_starts(12, 5, 3).tolist() == [0, 3, 6, 7]  # the last window always ends the sequence
    assert strided_starts(7, 5, 1).tolist() == list(range(3))
    assert window_starts(12, 5, 3).tolist() == [0, 0, 0, 0, 3, 3, 3, 6, 6, 7, 7, 7]
    for length in range(5, 15):
        for window in (3, 4, 5):
            for stride in range(1, window + 1):
                starts, evaluated = window_starts(length, window, stride), strided_starts(length, window, stride)
                assert set(starts.tolist()) <= set(evaluated.tolist())
                position = torch.arange(length) - starts
                assert ((position >= 0) & (position < window)).all()
                # no evaluated window holds the frame deeper inside it (farther from both its ends)
                offset = torch.arange(length)[:, None] - evaluated[None, :]
                best = torch.minimum(offset, window - 1 - offset).max(dim=1).values
                assert torch.equal(torch.minimum(position, window - 1 - position), best)
    calls = []
    x = torch.arange(12.0).reshape(1, 12, 1)
    out = compose_window_scores(lambda w, s: calls.append(w.shape[0]) or w * 2, x, 0.5, window=5, stride=3)
    assert calls == [4] and torch.equal(out, 2 * x)  # 4 windows instead of 8, every frame's own value
    for stride in (0, 6, 1.5):
        with pytest.raises(ValueError, match=r"stride must be an integer in \[1, 5\]"):
            compose_window_scores(lambda w, s: w, x, 0.5, window=5, stride=stride)


@pytest.mark.parametrize("order, stride, exact", [(1, 3, True), (1, 2, True), (2, 1, True), (2, 2, False),
                                                  (1, 4, False)])
def test_strided_composition_is_exact_for_chains_of_order_up_to_half_the_window_minus_the_stride(order, stride, exact):
    # W = 5: every frame lies >= (W - s) / 2 frames inside its window, so order k <= (W - s) / 2 is exact at t = 0.
    # Measured (13 frames): exact cases 8e-16 at t = 0 and 9.2e-3 / 7.3e-3 / 1.0e-2 at t = 0.1 (AR(1) s = 3, 2;
    # AR(2) s = 1; stride 1 gives AR(1) 4.4e-4 there: off-centre frames cost accuracy at t > 0); the
    # others 0.14 (AR(2), s = 2) and 0.20 (AR(1), s = 4) at t = 0.
    error = relative_composition_error(order, 5, 0.0, frames=13, stride=stride)
    if exact:
        assert error < 1e-13
        assert relative_composition_error(order, 5, 0.1, frames=13, stride=stride) < 2e-2
    else:
        assert error > 0.1, error


@pytest.mark.parametrize("order, window", [(1, 1), (2, 3)])
def test_a_window_smaller_than_the_markov_blanket_does_not_compose(order, window):
    assert relative_composition_error(order, window, 0.0) > 0.2  # measured 0.73 (AR(1), W=1), 0.39 (AR(2), W=3)


def test_composition_composes_noise_predictions_too():
    mean, cov = ar_chain(1, 6)
    x = torch.randn(3, 6, 2, 1, 1, generator=torch.Generator().manual_seed(8), dtype=F64)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=F64)
    score = window_marginal_score(mean, cov, 3)
    sigma = SCHEDULE.sigma(t).reshape(3, 1, 1, 1, 1)
    eps = compose_window_scores(lambda w, s: -SCHEDULE.sigma(s).reshape(-1, 1, 1, 1, 1) * score(w, s), x, t, window=3)
    assert (eps + sigma * compose_window_scores(score, x, t, window=3)).abs().max() < 1e-14


def test_sampling_sequences_with_composed_window_scores():
    # 4,000 AR(1) sequences of 8 frames, 64 predictor steps from the exact p_1. One window of all T
    # frames is the exact score (measured whitened eigenvalues 0.86 .. 1.06, sampling error ~ +-0.13
    # for 16 dimensions); W = 3 composes an exact score at t = 0 but a 5-12% wrong one at
    # intermediate t, which biases the sequences' covariance (measured 0.58 .. 1.76).
    frames, batch = 8, 4000
    mean, cov = ar_chain(1, frames)
    initial = exact_initial(mean, cov, (batch, frames * 2), seed=1).reshape(batch, frames, 2, 1, 1)
    sampler = PredictorCorrectorSampler(SCHEDULE, steps=64, corrections=0)
    ranges = {}
    for window in (frames, 3):
        score = window_marginal_score(mean, cov, window)

        def eps(x, t, score=score, window=window):
            return -SCHEDULE.sigma(t).reshape(-1, 1, 1, 1, 1) * compose_window_scores(score, x, t, window=window)

        samples = sampler.sample(eps, initial.shape, initial=initial).reshape(batch, -1)
        eigenvalues = whitened_eigenvalues(samples, cov)
        ranges[window] = (float(eigenvalues.min()), float(eigenvalues.max()))
    assert 0.8 < ranges[frames][0] and ranges[frames][1] < 1.2, ranges
    assert ranges[3][0] < 0.7 and ranges[3][1] > 1.5, ranges


def test_composed_scores_lose_variance_on_strongly_correlated_chains():
    """The known limit behind Cohesion's energy loss on long plans: for a scalar AR(1) chain with
    correlation rho between frames, sequences sampled with composed W = 5 window scores (exact window
    marginals) keep their variance at rho = 0.7 however long they are, but at rho = 0.97 (the small
    Kolmogorov set's frames are as correlated) lose more of it the longer the sequence: measured
    variance over the true one, 64 predictor steps, 4,000 sequences: rho 0.7: 0.95 / 0.95 / 0.94 for
    5 / 9 / 17 frames; rho 0.97: 0.94 / 0.79 / 0.73 (33 frames 0.71; W = 9: 0.77, W = 17: 0.84). One
    window (5 frames) is the exact score; the loss comes from the composition at t > 0."""
    def variance_ratio(rho: float, frames: int) -> float:
        index = torch.arange(frames, dtype=F64)
        window_cov = (rho ** (index[:5, None] - index[None, :5]).abs())  # unit-variance stationary chain

        def score(windows, t):
            return noisy_score(torch.zeros(5, dtype=F64), window_cov, windows.reshape(windows.shape[0], -1),
                               t).reshape(windows.shape)

        def eps(x, t):
            return -SCHEDULE.sigma(t).reshape(-1, 1, 1, 1, 1) * compose_window_scores(score, x, t, window=5)

        sampler = PredictorCorrectorSampler(SCHEDULE, steps=64, corrections=0)
        samples = sampler.sample(eps, (4000, frames, 1, 1, 1), torch.Generator().manual_seed(1), dtype=F64)
        return float(samples.reshape(4000, frames).var(dim=0).mean())

    weak = [variance_ratio(0.7, frames) for frames in (5, 17)]
    strong = [variance_ratio(0.97, frames) for frames in (5, 17)]
    assert all(0.9 < value < 1.0 for value in weak + strong[:1]), (weak, strong)
    assert strong[1] < 0.8 and strong[1] / strong[0] < 0.85, strong


# -- guidance ------------------------------------------------------------------------------------------
def periodic_field_gaussian(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A stationary Gaussian on the periodic n x n grid, spectrum (1 + |k|^2)^(-3/2), as (mean, cov)."""
    k = torch.fft.fftfreq(n, 1.0 / n).to(F64)
    spectrum = 1.0 / (1 + k[:, None] ** 2 + k[None, :] ** 2) ** 1.5
    kernel = torch.fft.ifft2(spectrum).real / spectrum.mean()
    index = torch.stack(torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij"), -1).reshape(-1, 2)
    lag = (index[:, None, :] - index[None, :, :]) % n
    mean = 0.3 * torch.cos(2 * math.pi * index[:, 0].to(F64) / n)
    return mean, kernel[lag[..., 0], lag[..., 1]]


def test_operators():
    x = torch.arange(32.0).reshape(2, 1, 4, 4)
    coarse = CoarsenOperator(2)(x)
    assert coarse.shape == (2, 1, 2, 2)
    assert coarse[0, 0].tolist() == [[2.5, 4.5], [10.5, 12.5]]
    assert torch.equal(CoarsenOperator(1)(x), x) and torch.equal(IdentityOperator()(x), x)
    with pytest.raises(ValueError, match="multiples"):
        CoarsenOperator(3)(x)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0]).reshape(1, 1, 1, 4)
    assert torch.equal(MaskOperator(mask)(x), x * mask)


def test_the_guidance_gradient_is_the_likelihood_gradient():
    mean, cov = random_gaussian(6, seed=9)
    oracle = gaussian_eps(mean, cov)
    operator = CoarsenOperator(1)
    x = torch.randn(2, 1, 2, 3, generator=torch.Generator().manual_seed(10), dtype=F64)
    y = torch.randn(2, 1, 2, 3, generator=torch.Generator().manual_seed(11), dtype=F64)
    t = torch.tensor([0.3, 0.6], dtype=F64)
    variance = observation_variance(SCHEDULE, t, x, observation_noise=0.2, gamma=0.5)

    def log_likelihood(z: torch.Tensor, frozen_eps: torch.Tensor | None = None) -> torch.Tensor:
        eps = oracle(z, t) if frozen_eps is None else frozen_eps
        return -0.5 * ((y - SCHEDULE.tweedie(z, t, eps)).square() / variance).sum()

    base = oracle(x, t)
    for through_network, frozen in ((True, None), (False, base)):
        guided = guided_noise(oracle, x, t, SCHEDULE, y, operator, strength=2.0, observation_noise=0.2, gamma=0.5,
                              through_network=through_network)
        # central differences of log p(y | x) in every coordinate (exact for this quadratic)
        step = 1e-4
        gradient = torch.zeros_like(x)
        for index in range(x.numel()):
            offset = torch.zeros(x.numel(), dtype=F64)
            offset[index] = step
            offset = offset.reshape(x.shape)
            gradient.view(-1)[index] = (log_likelihood(x + offset, frozen) - log_likelihood(x - offset, frozen)) / (2 * step)
        expected = base - 2.0 * SCHEDULE.sigma(t).reshape(2, 1, 1, 1) * gradient
        assert (guided - expected).abs().max() < 1e-7, through_network
    # for a noise prediction that does not depend on x the two gradients are the same
    def constant(z, s):
        return torch.ones_like(z)

    assert torch.equal(guided_noise(constant, x, t, SCHEDULE, y, through_network=True),
                       guided_noise(constant, x, t, SCHEDULE, y, through_network=False))


def test_observation_noise_per_entry_weights_each_residual_by_its_own_variance():
    mean, cov = random_gaussian(6, seed=9)
    oracle = gaussian_eps(mean, cov)
    x = torch.randn(2, 1, 2, 3, generator=torch.Generator().manual_seed(10), dtype=F64)
    y = torch.randn(2, 1, 2, 3, generator=torch.Generator().manual_seed(11), dtype=F64)
    t = torch.tensor([0.3, 0.6], dtype=F64)
    noise = torch.tensor([[[0.05, 0.2, 1.0], [3.0, 0.1, 0.5]]], dtype=F64)  # one sigma_y per entry of A(x)
    ratio = (SCHEDULE.sigma(t) / SCHEDULE.mu(t)).reshape(2, 1, 1, 1) ** 2

    def log_likelihood(z):
        return -0.5 * ((y - SCHEDULE.tweedie(z, t, oracle(z, t))).square() / (noise**2 + 0.5 * ratio)).sum()

    z = x.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(log_likelihood(z), z)
    guided = guided_noise(oracle, x, t, SCHEDULE, y, strength=2.0, observation_noise=noise, gamma=0.5)
    torch.testing.assert_close(guided, oracle(x, t) - 2.0 * SCHEDULE.sigma(t).reshape(2, 1, 1, 1) * gradient,
                               rtol=1e-12, atol=1e-12)
    # a constant tensor is the scalar; observation_variance broadcasts the same way
    torch.testing.assert_close(guided_noise(oracle, x, t, SCHEDULE, y, observation_noise=torch.full((1, 2, 3), 0.2,
                                                                                                   dtype=F64)),
                               guided_noise(oracle, x, t, SCHEDULE, y, observation_noise=0.2), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(observation_variance(SCHEDULE, t, x, noise, gamma=0.5), noise**2 + 0.5 * ratio)
    with pytest.raises(ValueError, match="does not broadcast"):
        guided_noise(oracle, x, t, SCHEDULE, y, observation_noise=torch.ones(4, dtype=F64))
    with pytest.raises(ValueError, match=">= 0 everywhere"):
        guided_eps_fn(oracle, SCHEDULE, y, observation_noise=-noise)
    with pytest.raises(ValueError, match="both be 0"):
        guided_eps_fn(oracle, SCHEDULE, y, observation_noise=torch.zeros(3, dtype=F64), gamma=0.0)


def test_strength_zero_is_unconditional_sampling_exactly():
    mean, cov = periodic_field_gaussian()
    oracle = gaussian_eps(mean, cov)
    sampler = PredictorCorrectorSampler(SCHEDULE, steps=32, corrections=1, tau=0.1)
    prior = torch.zeros(1, 1, 2, 2, dtype=F64)
    guided = guided_eps_fn(oracle, SCHEDULE, prior, CoarsenOperator(2), strength=0.0)
    unconditional = sampler.sample(oracle, (64, 1, 4, 4), torch.Generator().manual_seed(12), dtype=F64)
    assert torch.equal(sampler.sample(guided, (64, 1, 4, 4), torch.Generator().manual_seed(12), dtype=F64),
                       unconditional)


def test_coarse_guidance_pulls_the_samples_onto_the_prior():
    mean, cov = periodic_field_gaussian()
    oracle = gaussian_eps(mean, cov)
    truth = (mean + torch.linalg.cholesky(cov) @ torch.randn(16, generator=torch.Generator().manual_seed(5),
                                                              dtype=F64)).reshape(1, 1, 4, 4)
    operator = CoarsenOperator(2)
    prior = operator(truth)  # a perfect coarse prior, batch 1 (repeated over the 2,000 samples)
    sampler = PredictorCorrectorSampler(SCHEDULE, steps=256, corrections=0)
    shape = (2000, 1, 4, 4)

    def coarse_rms(samples):
        return float((operator(samples) - prior).square().mean().sqrt())

    unconditional = coarse_rms(sampler.sample(oracle, shape, torch.Generator().manual_seed(1), dtype=F64))
    assert unconditional > 0.5  # measured 0.85
    for through_network, bound in ((True, 0.01), (False, 0.01)):  # measured 0.0010, 0.0015
        guided = guided_eps_fn(oracle, SCHEDULE, prior, operator, strength=10.0, observation_noise=0.05,
                               gamma=1.0, through_network=through_network)
        samples = sampler.sample(guided, shape, torch.Generator().manual_seed(1), dtype=F64)
        assert bool(torch.isfinite(samples).all()) and coarse_rms(samples) < bound, coarse_rms(samples)


def test_mask_guidance_leaves_unobserved_components_unconditional():
    # Observed (rows 0-1 of a 4 x 4 field) and unobserved components independent (block-diagonal C):
    # the guided noise of the unobserved components is then exactly the unconditional one, and the
    # deterministic predictor keeps them exactly the unconditional samples (same seed).
    generator = torch.Generator().manual_seed(2)
    blocks = [torch.randn(8, 8, generator=generator, dtype=F64) for _ in range(2)]
    cov = torch.block_diag(*[b @ b.T / 8 + 0.2 * torch.eye(8, dtype=F64) for b in blocks])
    mean = torch.randn(16, generator=generator, dtype=F64) * 0.5
    oracle = gaussian_eps(mean, cov)
    truth = (mean + torch.linalg.cholesky(cov) @ torch.randn(16, generator=generator, dtype=F64)).reshape(1, 1, 4, 4)
    mask = torch.zeros(1, 1, 4, 4, dtype=F64)
    mask[..., :2, :] = 1
    operator = MaskOperator(mask)
    sampler = PredictorCorrectorSampler(SCHEDULE, steps=128, corrections=0)
    shape = (2000, 1, 4, 4)
    unconditional = sampler.sample(oracle, shape, torch.Generator().manual_seed(1), dtype=F64)
    guided = sampler.sample(guided_eps_fn(oracle, SCHEDULE, operator(truth), operator, strength=10.0,
                                          observation_noise=0.05), shape, torch.Generator().manual_seed(1), dtype=F64)
    assert torch.equal(guided[..., 2:, :], unconditional[..., 2:, :])
    observed_rms = float((guided - truth)[..., :2, :].square().mean().sqrt())
    unconditional_rms = float((unconditional - truth)[..., :2, :].square().mean().sqrt())
    assert observed_rms < 0.01 and unconditional_rms > 0.5, (observed_rms, unconditional_rms)


def test_guidance_arguments_and_ensemble_priors():
    mean, cov = random_gaussian(4, seed=3)
    oracle = gaussian_eps(mean, cov)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(4), dtype=F64)
    t = torch.full((6,), 0.4, dtype=F64)
    prior = torch.randn(2, 4, generator=torch.Generator().manual_seed(5), dtype=F64)
    # a prior of batch 2 lines up with 3 member-major members (rows m * 2 + b)
    assert torch.equal(guided_noise(oracle, x, t, SCHEDULE, prior), guided_noise(oracle, x, t, SCHEDULE, prior.repeat(3, 1)))
    with pytest.raises(ValueError, match="prior must have the shape"):
        guided_noise(oracle, x, t, SCHEDULE, prior[:, :3])
    with pytest.raises(ValueError, match="strength"):
        guided_eps_fn(oracle, SCHEDULE, prior, strength=-1.0)
    with pytest.raises(ValueError, match="both be 0"):
        guided_eps_fn(oracle, SCHEDULE, prior, observation_noise=0.0, gamma=0.0)
