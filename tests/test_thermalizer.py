"""The Thermalizer: Algorithm 1 with oracle networks, its training loss, and the CLI end to end."""

import json

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from emu.cli import main
from emu.diffusion import CosineSchedule, DDPMScheduler, add_noise
from emu.models import make_model
from emu.stabilizers.thermalizer import DiffusionLoss, thermalize
from emu.training.loop import load_checkpoint

SCHEDULER = DDPMScheduler(CosineSchedule(1000))


def fixed_classifier(levels):
    """A classifier that answers `levels[i]` for sample i of the batch (one-hot logits)."""
    def classify(x):
        logits = torch.full((x.shape[0], 1000), -1e9, dtype=x.dtype)
        logits[torch.arange(x.shape[0]), torch.as_tensor(levels)[: x.shape[0]]] = 0.0
        return logits
    return classify


class CountingDenoiser:
    """Predicts zero noise and records the batch size of every call (who paid for denoising)."""

    def __init__(self):
        self.batch_sizes = []

    def __call__(self, x):
        self.batch_sizes.append(x.shape[0])
        return torch.zeros_like(x)


def test_clean_states_are_not_thermalized():
    state = torch.randn(3, 1, 8, 8)
    denoiser = CountingDenoiser()
    result = thermalize(state, fixed_classifier([2, 7, 0]), denoiser, SCHEDULER, s_init=7, s_stop=4)
    assert torch.equal(result.state, state)
    assert result.steps_applied.tolist() == [0, 0, 0] and result.predicted_level.tolist() == [2, 7, 0]
    assert denoiser.batch_sizes == []  # only the classifier ran
    assert not result.runaway.any()


def test_steps_applied_equal_predicted_minus_stop_and_only_those_samples_pay():
    state = torch.randn(3, 1, 8, 8)
    denoiser = CountingDenoiser()
    result = thermalize(state, fixed_classifier([20, 3, 10]), denoiser, SCHEDULER, s_init=7, s_stop=4,
                        generator=torch.Generator().manual_seed(0))
    assert result.steps_applied.tolist() == [16, 0, 6]
    # Samples 0 and 2 each start at their own level: together for 6 steps, then sample 0 alone for 10;
    # sample 1 never reaches the network.
    assert denoiser.batch_sizes == [2] * 6 + [1] * 10
    assert torch.equal(result.state[1], state[1])
    assert not torch.equal(result.state[0], state[0]) and not torch.equal(result.state[2], state[2])


def test_a_noised_state_is_pulled_back_to_the_data_distribution():
    """Data N(0, 1) and its exact oracle: an over-energetic state (std 3) is noised to level 600 and
    denoised to 0; the result's variance must move most of the way back to 1."""
    alpha_bars = CosineSchedule(1000).alpha_bars
    state = 3.0 * torch.randn(2, 1, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    levels = {"current": None}

    def oracle(x):
        # thermalize steps both samples in lockstep from level 300; track the level ourselves
        level = levels["current"]
        levels["current"] -= 1
        return torch.sqrt(1 - alpha_bars[level]).to(x.dtype) * x

    levels["current"] = 600
    result = thermalize(state, fixed_classifier([600, 600]), oracle, SCHEDULER, s_init=7, s_stop=0,
                        runaway_level=999, generator=torch.Generator().manual_seed(2))
    assert result.steps_applied.tolist() == [600, 600]
    before, after = float(state.var()), float(result.state.var())
    assert before == pytest.approx(9, rel=0.05)
    # Noising to level s gives Var x_s = ab 9 + 1 - ab; for N(0, 1) data the exact reverse chain maps
    # x_s to x_0 with E[x_0 | x_s] = sqrt(ab) x_s and Var[x_0 | x_s] = 1 - ab, so Var x_0 = ab Var x_s + 1 - ab.
    ab = float(alpha_bars[600])
    expected = ab * (ab * 9 + 1 - ab) + 1 - ab
    assert abs(after - 1) < 0.5 * abs(before - 1)
    assert after == pytest.approx(expected, rel=0.1)


def test_runaway_levels_are_flagged_and_capped_not_aborted():
    denoiser = CountingDenoiser()
    result = thermalize(torch.randn(2, 1, 8, 8), fixed_classifier([900, 12]), denoiser, SCHEDULER, s_init=7,
                        s_stop=4, runaway_level=50)
    assert result.runaway.tolist() == [True, False]
    assert result.predicted_level.tolist() == [900, 12]
    assert result.steps_applied.tolist() == [46, 8]


def test_level_pair_is_validated():
    with pytest.raises(ValueError, match="s_init"):
        thermalize(torch.randn(1, 1, 8, 8), fixed_classifier([0]), CountingDenoiser(), SCHEDULER, s_init=4, s_stop=4)
    with pytest.raises(ValueError, match="s_stop"):
        thermalize(torch.randn(1, 1, 8, 8), fixed_classifier([0]), CountingDenoiser(), SCHEDULER, s_init=7, s_stop=-1)


def test_diffusion_loss_equals_hand_computation():
    torch.manual_seed(0)
    network = make_model("thermalizer", "small", 1, 1, grid_size=16, num_levels=50, head_hidden=8)
    schedule = CosineSchedule(50)
    clean = torch.randn(4, 1, 16, 16)
    levels = torch.tensor([0, 10, 25, 49])
    noise = torch.randn_like(clean)
    with torch.no_grad():
        loss = DiffusionLoss(network, schedule, classifier_weight=0.5)(clean, levels, noise)
    noisy = torch.sqrt(schedule.alpha_bars[levels]).float().view(-1, 1, 1, 1) * clean + \
        torch.sqrt(1 - schedule.alpha_bars[levels]).float().view(-1, 1, 1, 1) * noise
    with torch.no_grad():
        predicted, logits = network(noisy)
    expected = ((predicted - noise) ** 2).mean() + 0.5 * torch.nn.functional.cross_entropy(logits, levels)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert torch.allclose(add_noise(schedule, clean, levels, noise), noisy, atol=1e-6)


def test_cli_train_thermalizer_then_thermalized_rollout(tiny_data, tmp_path):
    runner = CliRunner()
    emulator_run, thermalizer_run = tmp_path / "run", tmp_path / "th"
    result = runner.invoke(main, ["train", "emulator", "--data", str(tiny_data), "--epochs", "1", "--unroll", "1",
                                  "--out", str(emulator_run), "--no-progress"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["train", "thermalizer", "--data", str(tiny_data), "--preset", "small", "--epochs", "1",
                                  "--batch-size", "8", "--out", str(thermalizer_run), "--no-progress"])
    assert result.exit_code == 0, (result.output, result.exception)
    payload = load_checkpoint(thermalizer_run / "last.pt", "thermalizer")
    assert payload["model_config"]["arch"] == "thermalizer" and payload["ema"] is not None
    assert "valid_level_accuracy" in payload["history"][-1]
    out = tmp_path / "rt.h5"
    result = runner.invoke(main, ["rollout", "--emulator", str(emulator_run / "last.pt"), "--thermalizer",
                                  str(thermalizer_run / "last.pt"), "--s-init", "7", "--s-stop", "4",
                                  "--runaway-level", "20", "--init", str(tiny_data), "--split", "train", "--trajectories", "2",
                                  "--steps", "5", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    with h5py.File(out, "r") as handle:
        group = handle["emu"]
        levels, steps, runaway = group["predicted_level"][()], group["denoising_steps"][()], group["runaway"][()]
        assert levels.shape == steps.shape == runaway.shape == (2, 6)
        assert (levels[:, 0] == -1).all() and (steps[:, 0] == 0).all()
        expected = np.where(levels[:, 1:] > 7, np.minimum(levels[:, 1:], 20) - 4, 0)
        assert np.array_equal(steps[:, 1:], expected)
        assert np.array_equal(runaway[:, 1:], levels[:, 1:] > 20)
        assert group.attrs["s_init"] == 7 and group.attrs["s_stop"] == 4
        assert np.isfinite(handle["t0_fields/vorticity"][()]).all()
    # tune: a 2-pair grid on short rollouts writes the best pair beside the checkpoint; rollout then uses it.
    result = runner.invoke(main, ["tune", "thermalizer", "--emulator", str(emulator_run / "last.pt"), "--thermalizer",
                                  str(thermalizer_run / "last.pt"), "--init", str(tiny_data), "--split", "train",
                                  "--s-init", "8,9", "--s-stop", "3", "--trajectories", "1", "--steps", "2",
                                  "--runaway-level", "20", "--no-progress"])
    assert result.exit_code == 0, (result.output, result.exception)
    levels = json.loads((thermalizer_run / "thermalizer_levels.json").read_text())
    tuned = levels["grid_search"]
    assert levels["source"] == "grid_search"
    assert [(row["s_init"], row["s_stop"]) for row in tuned["rows"]] == [(8, 3), (9, 3)]
    best = min(tuned["rows"], key=lambda row: row["score"])
    assert (levels["s_init"], levels["s_stop"]) == (tuned["s_init"], tuned["s_stop"]) == (best["s_init"], best["s_stop"])
    assert all(np.isfinite(row["score"]) and row["score"] >= 0 for row in tuned["rows"])
    result = runner.invoke(main, ["rollout", "--emulator", str(emulator_run / "last.pt"), "--thermalizer",
                                  str(thermalizer_run / "last.pt"), "--init", str(tiny_data), "--split", "train",
                                  "--trajectories", "1", "--steps", "1", "--runaway-level", "20",
                                  "--out", str(tmp_path / "tuned.h5"), "--no-progress"])
    assert result.exit_code == 0, result.output
    with h5py.File(tmp_path / "tuned.h5", "r") as handle:
        assert (handle["emu"].attrs["s_init"], handle["emu"].attrs["s_stop"]) == (tuned["s_init"], 3)
    bad = runner.invoke(main, ["rollout", "--emulator", str(emulator_run / "last.pt"), "--thermalizer",
                               str(thermalizer_run / "last.pt"), "--s-init", "3", "--s-stop", "4", "--init",
                               str(tiny_data), "--out", str(tmp_path / "bad.h5"), "--no-progress"])
    assert bad.exit_code != 0 and "s_init" in bad.output
    wrong_kind = runner.invoke(main, ["rollout", "--emulator", str(thermalizer_run / "last.pt"), "--init",
                                      str(tiny_data), "--out", str(tmp_path / "x.h5"), "--no-progress"])
    assert wrong_kind.exit_code != 0 and "not an emu emulator checkpoint" in wrong_kind.output
