"""Cohesion's forecast (emu.stabilizers.cohesion): plan (R = T) and autoregressive (R = 1) share one
API and one guidance; the Koopman prior alone is a mode; files carry the dataset layout and timing."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from emu.diffusion import VPSchedule
from emu.stabilizers.cohesion import CohesionSettings, InitialAndPrior, forecast, parse_operator

QUIET = dict(progress=False, echo=lambda _: None)


class CountingScore(torch.nn.Module):
    """A window 'score network' eps_hat = 0.1 x that counts its calls and the windows it scores."""

    window = 3

    def __init__(self):
        super().__init__()
        self.calls, self.windows = 0, 0

    def forward(self, windows, t):
        assert windows.shape[1] == self.window and t.shape == (windows.shape[0],)
        self.calls += 1
        self.windows += windows.shape[0]
        return 0.1 * windows


class LinearPrior:
    """A 'Koopman prior' u_k = 0.9^k u_0."""

    def forecast(self, initial, horizon):
        return torch.stack([initial * 0.9**k for k in range(horizon + 1)], dim=1)


def test_plan_scores_all_windows_in_each_call_and_autoregressive_once_per_frame():
    initial = torch.randn(2, 1, 8, 8)
    settings = CohesionSettings(steps=4, corrections=1, operator="coarsen:2")
    horizon = 6
    results = {}
    for mode in ("plan", "autoregressive"):
        network = CountingScore()
        samples, timings = forecast(LinearPrior(), network, VPSchedule(), initial, horizon, mode=mode, members=3,
                                    settings=settings, generator=torch.Generator().manual_seed(0))
        assert samples.shape == (3, 2, horizon + 1, 1, 8, 8) and torch.isfinite(samples).all()
        torch.testing.assert_close(samples[:, :, 0], initial[None].expand(3, -1, -1, -1, -1))  # the known state
        assert timings["diffusion_seconds"] > 0
        results[mode] = (network.calls, network.windows)
    evaluations = settings.network_evaluations_per_window  # 4 predictor + 3 corrector steps
    # plan: one call per evaluation, each with every window of every sequence (members x batch x (T + 1 - W + 1))
    assert results["plan"] == (evaluations, evaluations * 3 * 2 * (horizon + 1 - 3 + 1))
    # autoregressive: one sampler run per frame, one window per sequence in each call
    assert results["autoregressive"] == (evaluations * horizon, evaluations * horizon * 3 * 2)
    assert evaluations == 7


@pytest.mark.parametrize("run", [2, 3])
def test_autoregressive_runs_of_several_frames_need_fewer_sampler_runs(run):
    from emu.stabilizers.cohesion import window_evaluations

    class FiveFrames(CountingScore):
        window = 5

    initial = torch.randn(2, 1, 8, 8)
    horizon = 7
    settings = CohesionSettings(steps=3, corrections=1, operator="coarsen:2", frames_per_run=run)
    network = FiveFrames()
    seen = []
    samples, _ = forecast(LinearPrior(), network, VPSchedule(), initial, horizon, mode="autoregressive",
                          settings=settings, generator=torch.Generator().manual_seed(0), on_frame=seen.append)
    assert samples.shape == (1, 2, horizon + 1, 1, 8, 8) and torch.isfinite(samples).all()
    assert seen == list(range(1, horizon + 1))  # every frame reported once, in order
    runs = -(-horizon // run)  # 7 frames: 4 runs of 2 (the last of 1), 3 runs of 3 (the last of 1)
    assert network.calls == runs * 5 and network.windows == runs * 5 * 2
    assert window_evaluations("autoregressive", horizon, 5, settings) == runs * 5
    with pytest.raises(ValueError, match=r"frames_per_run must be in \[1, 4\]"):
        forecast(LinearPrior(), FiveFrames(), VPSchedule(), initial, horizon, mode="autoregressive",
                 settings=CohesionSettings(steps=2, frames_per_run=5))
    with pytest.raises(ValueError, match="frames_per_run must be an integer >= 1"):
        CohesionSettings(frames_per_run=0)


def test_prior_mode_is_the_koopman_forecast_itself():
    initial = torch.randn(2, 1, 8, 8)
    samples, timings = forecast(LinearPrior(), None, None, initial, 4, mode="prior", members=2)
    torch.testing.assert_close(samples[1], LinearPrior().forecast(initial, 4))  # u_0 itself at frame 0, too
    assert timings["diffusion_seconds"] == 0


def test_operators_and_settings_are_checked():
    x = torch.arange(2 * 4 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 4, 1, 4, 4)
    both = InitialAndPrior(parse_operator("coarsen:2")(3))
    observed = both(x)
    assert observed.shape == (2, 16 + 3 * 4)
    torch.testing.assert_close(observed[:, :16], x[:, 0].flatten(1))
    masked = parse_operator("frames:2")(3, 1)(x[:, 1:])  # frames 1, 2, 3: only frame 2 observed
    assert masked[:, 0].abs().sum() == 0 and masked[:, 2].abs().sum() == 0 and torch.equal(masked[:, 1], x[:, 2])
    for spec in ("coarse:2", "coarsen:0", "frames:", "identity:3"):
        with pytest.raises(ValueError, match="operator must be"):
            parse_operator(spec)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        CohesionSettings(steps=0)
    with pytest.raises(ValueError, match="mode must be one of plan, autoregressive, prior"):
        forecast(LinearPrior(), None, None, torch.zeros(1, 1, 4, 4), 3, mode="sample")
    with pytest.raises(ValueError, match="at least the score network's window"):
        forecast(LinearPrior(), CountingScore(), VPSchedule(), torch.zeros(1, 1, 4, 4), 1, mode="plan")


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """`emu train koopman` and `emu train score`, one epoch each on tiny_data: the folder holding both."""
    from emu.cli import main

    folder = tmp_path_factory.mktemp("cohesion_parts")
    for command, extra in (("koopman", ["--horizon", "3"]), ("score", ["--window", "3"])):
        result = CliRunner().invoke(main, ["train", command, "--data", str(tiny_data), "--epochs", "1", "--batch-size",
                                           "4", "--out", str(folder / command), "--no-progress", *extra])
        assert result.exit_code == 0, result.output
    return folder


def test_cli_trains_both_parts_and_forecasts_in_the_dataset_layout(tiny_data, trained, tmp_path):
    from emu.cli import main

    runner = CliRunner()
    for mode in ("plan", "autoregressive", "prior"):
        out = tmp_path / f"{mode}.h5"
        arguments = ["forecast", "--koopman", str(trained / "koopman" / "last.pt"), "--init", str(tiny_data),
                     "--horizon", "4", "--mode", mode, "--members", "2", "--trajectories", "1", "--steps", "3",
                     "--out", str(out), "--no-progress"]
        if mode != "prior":
            arguments += ["--score", str(trained / "score" / "last.pt")]
        result = runner.invoke(main, arguments)
        assert result.exit_code == 0, result.output
        assert f"1 trajectories x 2 members x 4 frames ({mode})" in result.output
        with h5py.File(out) as handle:
            channel = json.loads(handle["emu"].attrs["channels"])[0]
            assert handle["t0_fields"][channel].shape == (2, 5, 16, 16)
            assert handle["emu"].attrs["mode"] == mode and handle["emu"].attrs["members"] == 2
            assert handle["emu"].attrs["prior_seconds"] > 0 and handle["emu"]["mse"].shape == (2, 5)
            assert np.allclose(handle["emu"]["mse"][:, 0], 0, atol=1e-10)  # frame 0 is the initial state
    result = runner.invoke(main, ["forecast", "--koopman", str(trained / "koopman" / "last.pt"), "--init",
                                  str(tiny_data), "--trajectories", "1", "--horizon", "4", "--out", str(tmp_path / "x.h5")])
    assert result.exit_code != 0 and "--mode plan needs --score" in result.output


def test_the_coarse_prior_operator_has_the_full_frames_scale():
    """A A^T = I for the coarsened prior as for the full initial frame, so one likelihood gamma is
    consistent for both (with plain block means, A A^T = I/F^2, a shared gamma of 1/F^2 made the full
    frames' pull overshoot and the autoregressive mode blew up within 3 frames)."""
    operator = parse_operator("coarsen:4")(1)
    y = torch.randn(2, 1, 1, 2, 2)
    x = torch.zeros(2, 1, 1, 8, 8, requires_grad=True)
    (adjoint,) = torch.autograd.grad((operator(x) * y).sum(), x)  # A^T y
    torch.testing.assert_close(operator(adjoint), y)


# -- the prior's calibrated error and strided plan windows -------------------------------------------
def test_the_prior_error_is_measured_per_lead_on_held_out_trajectories(tiny_data):
    from emu.data.loaders import Normalizer, Snapshots
    from emu.stabilizers.cohesion import calibrate_prior_error

    normalizer = Normalizer.from_dataset(tiny_data)
    errors = calibrate_prior_error(LinearPrior(), normalizer, tiny_data, "coarsen:4")
    frames = Snapshots(tiny_data, "valid", snapshots="all", normalizer=normalizer)
    count, length = frames.shapes[0][:2]
    assert len(errors) == length and count >= 1
    truth = torch.stack([frames._read(0, t, slice(0, length)) for t in range(count)]).double().numpy()
    coarse = truth.reshape(*truth.shape[:3], 4, 4, 4, 4).mean(axis=(4, 6)) * 4  # 4 x the 4 x 4 block means
    expected = [float(np.sqrt(np.mean((0.9**k * coarse[:, 0] - coarse[:, k]) ** 2))) for k in range(length)]
    np.testing.assert_allclose(errors, expected, rtol=1e-5)
    assert errors[0] < 1e-6  # the prior starts from the state itself
    identity = calibrate_prior_error(LinearPrior(), normalizer, tiny_data, "frames:2")
    expected = [float(np.sqrt(np.mean((0.9**k * truth[:, 0] - truth[:, k]) ** 2))) for k in range(length)]
    np.testing.assert_allclose(identity, expected, rtol=1e-5)


def test_frame_noise_adds_the_prior_error_in_quadrature_and_holds_its_last_value():
    settings = CohesionSettings(observation_noise=0.3, prior_error=(0.0, 0.4, 1.2))
    torch.testing.assert_close(settings.frame_noise(torch.arange(5)),
                               torch.tensor([0.3, 0.5, 1.2369, 1.2369, 1.2369], dtype=torch.float64), atol=1e-4, rtol=0)
    assert CohesionSettings().frame_noise(torch.arange(3)).tolist() == [0.1] * 3
    for bad in ((), (0.1, float("nan")), (-1.0,)):
        with pytest.raises(ValueError, match="prior_error must be"):
            CohesionSettings(prior_error=bad)
    with pytest.raises(ValueError, match="window_stride must be"):
        CohesionSettings(window_stride=0)
    with pytest.raises(ValueError, match=r"window_stride must be in \[1, 3\]"):
        forecast(LinearPrior(), CountingScore(), VPSchedule(), torch.zeros(1, 1, 4, 4), 4, mode="plan",
                 settings=CohesionSettings(steps=2, window_stride=4))


@pytest.mark.parametrize("mode", ["plan", "autoregressive"])
def test_a_prior_without_skill_leaves_only_the_initial_state_to_guide(mode):
    """e_k huge for every lead: the prior's pull vanishes, as when no prior frame is observed at all;
    e_k = 0: the calibration changes nothing."""
    initial = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def run(**changes):
        settings = CohesionSettings(**{"steps": 4, "corrections": 1, "tau": 0.1, "operator": "coarsen:2", **changes})
        samples, _ = forecast(LinearPrior(), CountingScore(), VPSchedule(), initial, 5, mode=mode, members=2,
                              settings=settings, generator=torch.Generator().manual_seed(4))
        return samples

    unobserved = run(operator="frames:100")  # no prior frame has an index that is a multiple of 100
    assert (run() - unobserved).abs().max() > 1e-3  # the prior does pull when trusted
    torch.testing.assert_close(run(prior_error=(1e8,)), unobserved, rtol=0, atol=1e-7)
    torch.testing.assert_close(run(prior_error=(0.0,)), run(), rtol=0, atol=1e-12)


def test_strided_plan_windows_cut_the_network_calls_by_the_stride():
    from emu.stabilizers.cohesion import window_evaluations

    initial = torch.randn(1, 1, 8, 8)
    horizon, counted = 12, {}
    for stride in (1, 3):
        settings = CohesionSettings(steps=3, corrections=1, operator="coarsen:2", window_stride=stride)
        network = CountingScore()
        samples, _ = forecast(LinearPrior(), network, VPSchedule(), initial, horizon, mode="plan", settings=settings,
                              generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(samples).all()
        counted[stride] = network.windows
        assert network.windows == window_evaluations("plan", horizon, 3, settings)
    # 13 frames, W = 3: 11 windows of stride 1; starts 0, 3, 6, 9 and 10 for stride 3
    assert counted == {1: 11 * 5, 3: 5 * 5}
    # the default stride is W - 2: 1 for W = 3, 3 for W = 5
    assert CohesionSettings().stride_for(3) == 1 and CohesionSettings().stride_for(5) == 3
    assert CohesionSettings().stride_for(2) == 1 and CohesionSettings(window_stride=2).stride_for(5) == 2
    assert window_evaluations("autoregressive", horizon, 3, CohesionSettings(steps=3)) == 12 * 5


def test_cli_calibrates_the_prior_error_on_the_valid_split(tiny_data, trained, tmp_path):
    import shutil

    from emu.cli import main

    runner = CliRunner()
    common = ["forecast", "--koopman", str(trained / "koopman" / "last.pt"), "--score", str(trained / "score" / "last.pt"),
              "--init", str(tiny_data), "--horizon", "4", "--trajectories", "1", "--steps", "2", "--no-progress"]
    result = runner.invoke(main, [*common, "--window-stride", "2", "--out", str(tmp_path / "c.h5")])
    assert result.exit_code == 0, result.output
    assert "prior error calibrated on" in result.output
    with h5py.File(tmp_path / "c.h5") as handle:
        settings = json.loads(handle["emu"].attrs["settings"])
        assert len(settings["prior_error"]) == 6 and settings["window_stride"] == 2  # tiny_data: 6 snapshots
        # windows at 0 and 2 (5 frames, W = 3), each scored 2 + 1 times (2 predictor steps, 1 correction)
        assert handle["emu"].attrs["window_evaluations"] == 2 * 3
    result = runner.invoke(main, [*common, "--prior-error", "none", "--out", str(tmp_path / "n.h5")])
    assert result.exit_code == 0 and "calibrated" not in result.output, result.output
    with h5py.File(tmp_path / "n.h5") as handle:
        assert json.loads(handle["emu"].attrs["settings"])["prior_error"] is None
    no_valid = tmp_path / "no_valid"
    shutil.copytree(tiny_data, no_valid)
    shutil.rmtree(no_valid / "data" / "valid")
    result = runner.invoke(main, [*common, "--calibration-data", str(no_valid), "--out", str(tmp_path / "x.h5")])
    assert result.exit_code != 0 and "--calibration-data" in result.output and "--prior-error none" in result.output
