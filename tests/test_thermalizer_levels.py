"""Level training options, calibration and automatic levels of the Thermalizer (issue 13)."""

import math

import numpy as np
import pytest
import torch

from emu.diffusion import CosineSchedule, DDPMScheduler, gaussian_level_targets, log_snr, sample_training_levels
from emu.stabilizers import RolloutHistory, Stabilizer, StepRecords, parse_spec
from emu.stabilizers.thermalizer import (
    DiffusionLoss,
    ThermalizerStabilizer,
    ThermalizerTrainingConfig,
    automatic_levels,
    calibrate,
    denoise_from,
    thermalize,
)

SCHEDULE = CosineSchedule(1000)
SCHEDULER = DDPMScheduler(SCHEDULE)


def test_mixture_sampling_puts_the_asked_fraction_below_low_max():
    generator = torch.Generator().manual_seed(0)
    levels = sample_training_levels(200_000, 1000, low_fraction=0.5, low_max=50, generator=generator)
    below = (levels < 50).float().mean().item()
    # half the batch from [0, 50) plus 5% of the uniform half: 0.5 + 0.5 * 0.05 = 0.525
    assert abs(below - 0.525) < 0.005
    counts = torch.bincount(levels, minlength=1000).float()
    low, high = counts[:50].mean(), counts[50:].mean()
    assert abs(low / high - (0.5 / 50 + 0.5 / 1000) / (0.5 / 1000)) < 0.6  # 21x denser below 50
    assert levels.min() >= 0 and levels.max() <= 999 and (counts[950:] > 0).all()  # every level still seen
    uniform = sample_training_levels(100_000, 1000, generator=generator)
    assert abs((uniform < 50).float().mean().item() - 0.05) < 0.004
    with pytest.raises(ValueError, match="low_fraction"):
        sample_training_levels(4, 1000, low_fraction=1.5)


def test_gaussian_target_is_smoothed_in_log_snr_and_its_loss_matches_a_hand_computation():
    width = 0.25
    targets = gaussian_level_targets(SCHEDULE, width)
    lam = log_snr(SCHEDULE)
    assert torch.allclose(targets.sum(dim=1), torch.ones(1000))
    row = 7
    weights = torch.exp(-((lam - lam[row]) ** 2) / (2 * width**2))
    assert torch.allclose(targets[row], (weights / weights.sum()).float(), atol=1e-7)
    assert int(targets[row].argmax()) == row
    # a few levels wide at the bottom, much wider at the top
    assert (targets[7] > 0.01).sum() < (targets[300] > 0.01).sum()

    class Fixed(torch.nn.Module):  # predicted noise 0, fixed logits
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, x):
            return torch.zeros_like(x), self.logits[: x.shape[0]]

    logits = torch.randn(2, 1000, generator=torch.Generator().manual_seed(3))
    clean, noise = torch.zeros(2, 1, 4, 4), torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    levels = torch.tensor([7, 300])
    loss = DiffusionLoss(Fixed(logits), SCHEDULE, 0.5, target_width=width)(clean, levels, noise)
    log_probabilities = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    expected_level = -(targets[levels] * log_probabilities).sum(dim=1).mean()
    expected = (noise**2).mean() + 0.5 * expected_level
    assert torch.allclose(loss, expected, atol=1e-5)
    one_hot = DiffusionLoss(Fixed(logits), SCHEDULE, 0.5)(clean, levels, noise)
    assert torch.allclose(one_hot, (noise**2).mean() + 0.5 * -log_probabilities[[0, 1], levels].mean(), atol=1e-5)


def test_config_refuses_bad_options():
    with pytest.raises(ValueError, match="level_sampling"):
        ThermalizerTrainingConfig(data="d", level_sampling="low")
    with pytest.raises(ValueError, match="level_target_width"):
        ThermalizerTrainingConfig(data="d", level_target="gaussian", level_target_width=0)
    with pytest.raises(ValueError, match="snapshot_stride"):
        ThermalizerTrainingConfig(data="d", snapshot_stride=0)


def _synthetic_calibration(clean_levels, descent):
    sampled = {level: 0.01 for level in descent}  # posterior samples: flat, never used for s_stop
    return {"summary": {"clean_q95_level": float(np.quantile(clean_levels, 0.95))},
            "denoiser": [{"level": 30, "mse_by_level": sampled, "tweedie_mse_by_level": descent},
                         {"level": 60, "mse_by_level": {60: 1.0, 4: 0.5}, "tweedie_mse_by_level": {60: 1.0, 4: 0.5}}]}


def test_automatic_levels_rule_on_a_synthetic_calibration():
    clean = np.array([0, 0, 1, 1, 1, 2, 2, 2, 3, 3] * 10)  # q95 = 3 -> s_init = 3 + 2 = 5
    # the MSE falls as the descent goes down, then the denoiser's own error takes over below level 3
    descent = {30: 0.1, 20: 0.05, 10: 0.01, 6: 0.006, 5: 0.005, 4: 0.0040, 3: 0.0031, 2: 0.0030, 1: 0.00302, 0: 0.0035}
    levels = automatic_levels(_synthetic_calibration(clean, descent))
    assert levels["s_init"] == 5
    # below s_init the lowest MSE is 0.0030 (level 2); within 5% (<= 0.00315): levels 1, 2, 3 -> the highest
    assert levels["s_stop"] == 3
    strict = automatic_levels(_synthetic_calibration(clean, descent), tolerance=1.01)
    assert strict["s_stop"] == 2
    assert levels["s_stop_rule"] == "tweedie"
    # a head that calls clean states level ~40 gets a high s_init; s_stop stays below it
    noisy_head = automatic_levels(_synthetic_calibration(np.full(50, 40), descent))
    assert noisy_head["s_init"] == 42 and noisy_head["s_stop"] < 42
    # a descent that never improves (the MSE only grows as it goes down): s_stop = s_init // 2
    worsening = {level: 0.01 + 0.001 * (30 - level) for level in range(31)}
    fallback = automatic_levels(_synthetic_calibration(clean, worsening))
    assert (fallback["s_init"], fallback["s_stop"]) == (5, 2) and fallback["s_stop_rule"].startswith("half")


class OracleHead(torch.nn.Module):
    """For data that are constant in space: the variance within a sample is the noise's, 1 - alpha_bar_s,
    so the level is read off it exactly (up to sampling error); the noise prediction is zero."""

    def classify(self, x):
        within = x.var(dim=(1, 2, 3))
        level = torch.argmin((1 - SCHEDULE.alpha_bars[None, :] - within[:, None]).abs(), dim=1)
        return torch.nn.functional.one_hot(level, 1000).float() * 50

    def forward(self, x):
        return torch.zeros_like(x), self.classify(x)


def test_calibration_reports_levels_and_denoiser_numbers():
    clean = torch.randn(8, 1, 1, 1, generator=torch.Generator().manual_seed(0)).expand(8, 1, 16, 16).contiguous()
    result = calibrate(OracleHead(), SCHEDULER, clean, levels=(0, 5, 10, 20, 50), check_levels=(10, 30), s_stop=4)
    assert result["predicted"].shape == (5, 8)
    summary = result["summary"]
    assert summary["clean_median_level"] == 0
    assert np.abs(np.median(result["predicted"], axis=1) - np.array([0, 5, 10, 20, 50])).max() <= 0.15 * 50
    assert set(summary) >= {"clean_median_level", "clean_q95_level", "low_level_abs_error", "denoiser_mse_s10",
                            "denoiser_mse_s30"}
    for entry in result["denoiser"]:
        assert sorted(entry["mse_by_level"]) == sorted(entry["tweedie_mse_by_level"]) == list(range(0, entry["level"] + 1))
        assert entry["expected"] == pytest.approx(float(1 - SCHEDULE.alpha_bars[4]))


def test_fixed_level_and_no_fresh_noise_modes():
    state = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    calls = []

    def denoiser(x):
        calls.append(x.shape[0])
        return torch.zeros_like(x)

    fixed = thermalize(state, None, denoiser, SCHEDULER, s_init=0, s_stop=4, fixed_level=9,
                       generator=torch.Generator().manual_seed(0))
    assert fixed.steps_applied.tolist() == [5, 5, 5] and fixed.predicted_level.tolist() == [-1, -1, -1]
    assert calls == [3] * 5
    calls.clear()

    def classify(x):
        return torch.nn.functional.one_hot(torch.tensor([10, 2, 10]), 1000).float()

    as_is = thermalize(state, classify, denoiser, SCHEDULER, s_init=7, s_stop=4, fresh_noise=False,
                       generator=torch.Generator().manual_seed(0))
    # Without fresh noise the descent starts from the state itself: the same as denoise_from on it
    expected = denoise_from(state[[0, 2]], torch.tensor([10, 10]), 4, denoiser, SCHEDULER,
                            torch.Generator().manual_seed(0))
    assert torch.equal(as_is.state[[0, 2]], expected) and torch.equal(as_is.state[1], state[1])
    fresh = thermalize(state, classify, denoiser, SCHEDULER, s_init=7, s_stop=4,
                       generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(fresh.state[0], as_is.state[0])
    with pytest.raises(ValueError, match="fixed_level"):
        thermalize(state, None, denoiser, SCHEDULER, s_init=0, s_stop=4, fixed_level=3)


def test_stabilizer_protocol_and_records():
    network = OracleHead()
    stabilizer = ThermalizerStabilizer(network, SCHEDULER, s_init=7, s_stop=4, generator=torch.Generator().manual_seed(0))
    assert isinstance(stabilizer, Stabilizer)
    records = StepRecords(stabilizer.record_fields)
    state = torch.randn(2, 1, 8, 8)
    for step in (1, 2):
        state, record = stabilizer.correct(state, RolloutHistory(state, state, step))
        records.add(record)
    arrays = records.arrays(2, 3)
    assert arrays["predicted_level"].shape == (2, 4)
    assert (arrays["predicted_level"][:, 0] == -1).all() and (arrays["predicted_level"][:, 3] == -1).all()
    assert arrays["runaway"].dtype == bool
    assert parse_spec("thermalizer:th/last.pt") == ("thermalizer", "th/last.pt")
    for bad in ("th/last.pt", "sns:", "unknown:x.pt"):
        with pytest.raises(ValueError, match="METHOD:CHECKPOINT"):
            parse_spec(bad)
    assert math.isfinite(float(state.sum()))


def test_presets_fill_the_level_options_left_unset():
    small = ThermalizerTrainingConfig(data="d")
    assert (small.level_sampling, small.level_target, small.snapshot_stride) == ("mixture", "gaussian", 4)
    paper = ThermalizerTrainingConfig(data="d", preset="paper")
    assert (paper.level_sampling, paper.level_target, paper.snapshot_stride) == ("uniform", "categorical", 1)
    mixed = ThermalizerTrainingConfig(data="d", preset="paper", level_target="gaussian", snapshot_stride=2)
    assert (mixed.level_sampling, mixed.level_target, mixed.snapshot_stride) == ("uniform", "gaussian", 2)


def test_blown_up_states_are_flagged_not_called_clean():
    state = torch.randn(3, 1, 8, 8)
    state[1, 0, 2, 3] = float("nan")
    state[2] = float("inf")

    def classify(x):  # as a network does: NaN in, NaN logits out (whose argmax is 0)
        logits = torch.nn.functional.one_hot(torch.tensor([2, 0, 0]), 1000).float()
        logits[1:] = float("nan")
        return logits

    result = thermalize(state, classify, lambda x: torch.zeros_like(x), SCHEDULER, s_init=7, s_stop=4)
    assert result.predicted_level.tolist() == [2, 999, 999]
    assert result.runaway.tolist() == [False, True, True]
    assert result.steps_applied.tolist() == [0, 0, 0]  # nothing brings NaN back: no denoising spent on it
