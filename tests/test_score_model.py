"""emu.models.score (Cohesion's window score network), the UNet's encoder biases and emu.training.score.

All on CPU with small networks at 16² or 32²; the paper preset is built on the meta device (shapes
only) for its parameter count. The training tests use the `tiny_data` fixture (16² Kolmogorov,
6 trajectories x 6 snapshots, split 4/1/1) with window 3.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import interrupted_run
from emu.diffusion.vp import VPSchedule
from emu.errors import UserError
from emu.models import UNet, count_parameters, make_model
from emu.models.score import (
    PRESETS,
    WindowScoreUNet,
    make_score_network,
    score_from_noise,
    score_network_from_config,
)
from emu.training import loop
from emu.training.score import (
    ScoreLoss,
    ScoreTrainingConfig,
    load_score,
    sample_times,
    train_score,
)

# Measured counts, (preset, channels, window) -> parameters; grid-independent. A change here is a
# change of architecture: update the table in emu/models/score.py's docstring with it.
PARAMETER_COUNTS = {
    ("small", 1, 5): 832_981,
    ("paper", 1, 5): 46_507_589,
}


def _window(batch=2, window=3, channels=1, size=16, seed=0):
    return torch.randn(batch, window, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _tiny(seed=0, **kwargs) -> WindowScoreUNet:
    """Two levels of width 8 and 16, one block each: quick on CPU at 16²."""
    torch.manual_seed(seed)
    arguments = dict(window=3, hidden_channels=8, channel_multipliers=(1, 2), blocks_per_level=1,
                     middle_blocks=1, embedding_dim=16) | kwargs
    return WindowScoreUNet(arguments.pop("channels", 1), **arguments).eval()


# -- the network -----------------------------------------------------------------------------------

@pytest.mark.parametrize("key", sorted(PARAMETER_COUNTS))
def test_parameter_counts_are_pinned(key):
    preset, channels, window = key
    with torch.device("meta"):
        network = make_score_network(preset, channels, window=window)
    assert count_parameters(network) == PARAMETER_COUNTS[key]
    # The UNet inside is the registry's, with W*C channels in and out; the rest is the time conditioning.
    with torch.device("meta"):
        unet = make_model("unet", preset, window * channels, window * channels)
    assert count_parameters(network.unet) == count_parameters(unet)
    conditioning = count_parameters(network.time_embedding) + sum(count_parameters(l) for l in network.bias_layers())
    assert count_parameters(network) == count_parameters(unet) + conditioning


@pytest.mark.parametrize("size", [16, 24, 32])
@pytest.mark.parametrize("channels,window", [(1, 3), (2, 5)])
def test_output_has_the_input_shape_on_any_grid_divisible_by_the_factor(size, channels, window):
    network = _tiny(channels=channels, window=window, channel_multipliers=(1, 2, 2))
    assert network.downsampling_factor == 4
    x = _window(batch=3, window=window, channels=channels, size=size)
    with torch.no_grad():
        out = network(x, torch.rand(3))
        scalar = network(x, 0.3)
        per_sample = network(x, torch.full((3,), 0.3))
    assert out.shape == x.shape and torch.isfinite(out).all()
    torch.testing.assert_close(scalar, per_sample)


def test_small_preset_runs_at_32():
    torch.manual_seed(0)
    network = make_score_network("small", 1, window=5).eval()
    x = _window(batch=2, window=5, size=32)
    with torch.no_grad():
        assert network(x, torch.tensor([0.1, 0.9])).shape == (2, 5, 1, 32, 32)


def test_time_embedding_changes_the_output_and_only_through_the_bias_layers():
    network = _tiny()
    x = _window()
    with torch.no_grad():
        early, late = network(x, torch.full((2,), 0.05)), network(x, torch.full((2,), 0.95))
        assert (early - late).abs().max() > 1e-3
        # Each sample reads its own time: swapping the times of a batch swaps nothing else.
        mixed = network(x, torch.tensor([0.05, 0.95]))
        torch.testing.assert_close(mixed[0], early[0])
        torch.testing.assert_close(mixed[1], late[1])
        for linear in network.bias_layers():
            linear.weight.zero_()
            linear.bias.zero_()
        early, late = network(x, torch.full((2,), 0.05)), network(x, torch.full((2,), 0.95))
        torch.testing.assert_close(early, late, rtol=0, atol=0)
        # With zero biases the network is its UNet on the frames stacked along channels.
        torch.testing.assert_close(early, network.unet(x.reshape(2, 3, 16, 16)).reshape(x.shape))


def test_every_block_is_conditioned():
    network = _tiny()
    expected = len(network.unet.encoder_block_widths()) + len(network.unet.decoder_block_widths())
    assert len(network.bias_layers()) == expected == 2 + 1 + 4  # encoder 2, middle 1, decoder 2 levels x 2
    t = torch.tensor([0.2, 0.7])
    encoder, decoder = network.time_biases(t)
    assert [b1.shape[-1] for b1, _ in encoder] == network.unet.encoder_block_widths()
    assert [b2.shape[-1] for _, b2 in decoder] == network.unet.decoder_block_widths()
    # Gradients reach every bias Linear.
    network.train()
    network(_window(), t).square().mean().backward()
    assert all(linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0
               for linear in network.bias_layers())


def test_translation_equivariance_under_shifts_by_the_downsampling_factor():
    network = _tiny(channel_multipliers=(1, 2, 2))
    factor = network.downsampling_factor
    x = _window(size=16)
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        for shift in [(factor, 0), (0, 2 * factor), (factor, -factor)]:
            rolled_in = network(torch.roll(x, shift, dims=(-2, -1)), t)
            rolled_out = torch.roll(network(x, t), shift, dims=(-2, -1))
            assert rolled_out.abs().max() > 1e-2
            torch.testing.assert_close(rolled_in, rolled_out, rtol=0, atol=1e-5)


def test_config_round_trip_rebuilds_the_same_network():
    torch.manual_seed(1)
    network = make_score_network("small", 2, window=3, embedding_dim=32, attention=True)
    config = json.loads(json.dumps(network.config))  # JSON-able, as stored in a checkpoint
    assert config["arch"] == "score" and config["preset"] == "small" and config["window"] == 3
    assert config["in_channels"] == config["out_channels"] == 2 and config["embedding_dim"] == 32
    rebuilt = score_network_from_config(config)
    assert rebuilt.config == network.config
    rebuilt.load_state_dict(network.state_dict())
    x = _window(window=3, channels=2)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x, 0.4), network.eval()(x, 0.4), rtol=0, atol=0)
    # Every constructor argument is in the config.
    import inspect

    arguments = set(inspect.signature(WindowScoreUNet).parameters) - {"channels"}
    assert arguments <= set(config)
    assert set(PRESETS["small"]) == set(PRESETS["paper"]) == arguments - {"window"}


def test_network_errors_are_clear():
    network = _tiny()
    with pytest.raises(ValueError, match=r"one diffusion time per sample, shape \(2,\)"):
        network(_window(), torch.rand(3))
    with pytest.raises(ValueError, match=r"one diffusion time per sample"):
        network(_window(), torch.rand(2, 1))
    with pytest.raises(ValueError, match=r"floating-point"):
        network(_window(), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"expected a window \(batch, 3, 1, N, N\)"):
        network(_window(window=5), torch.rand(2))
    with pytest.raises(ValueError, match=r"expected a window"):
        network(torch.randn(2, 3, 16, 16), torch.rand(2))
    with pytest.raises(ValueError, match=r"multiples of 2"):
        network(_window(size=15), torch.rand(2))
    with pytest.raises(ValueError, match=r"preset must be one of"):
        make_score_network("huge", 1)
    with pytest.raises(ValueError, match=r"unknown score network arguments \['grid_size'\]"):
        make_score_network("small", 1, grid_size=32)
    with pytest.raises(ValueError, match=r"window must be an integer >= 1"):
        WindowScoreUNet(1, window=0)


def test_score_from_noise_is_minus_noise_over_sigma():
    noise = torch.randn(2, 3, 1, 4, 4)
    sigma = torch.tensor([0.5, 2.0])
    score = score_from_noise(noise, sigma)
    torch.testing.assert_close(score[0], -noise[0] / 0.5)
    torch.testing.assert_close(score[1], -noise[1] / 2.0)
    schedule = VPSchedule()
    t = torch.tensor([0.3, 0.6])
    torch.testing.assert_close(score_from_noise(noise, schedule.sigma(t)), schedule.score(noise, t, noise))


# -- the UNet's encoder biases (backwards compatible) ----------------------------------------------

def test_unet_encode_takes_biases_for_encoder_and_middle_blocks():
    torch.manual_seed(0)
    unet = UNet(1, 1, hidden_channels=8, channel_multipliers=(1, 2), blocks_per_level=2, middle_blocks=1).eval()
    assert unet.encoder_block_widths() == [8, 8, 16, 16, 16]
    x = torch.randn(2, 1, 8, 8)
    zeros = [(torch.zeros(2, w), torch.zeros(2, w)) for w in unet.encoder_block_widths()]
    with torch.no_grad():
        plain, plain_skips = unet.encode(x)
        zeroed, zeroed_skips = unet.encode(x, biases=zeros)
        torch.testing.assert_close(zeroed, plain, rtol=0, atol=0)
        for a, b in zip(zeroed_skips, plain_skips):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        # A bias on the last (middle) block only moves the bottleneck, not the skips.
        last = list(zeros)
        last[-1] = (torch.ones(2, 16), torch.zeros(2, 16))
        moved, moved_skips = unet.encode(x, biases=last)
        assert (moved - plain).abs().max() > 1e-4
        for a, b in zip(moved_skips, plain_skips):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        # A bias on the first block moves everything after it.
        first = list(zeros)
        first[0] = (torch.zeros(2, 8), torch.ones(2, 8))
        _, shifted_skips = unet.encode(x, biases=first)
        torch.testing.assert_close(shifted_skips[0], plain_skips[0], rtol=0, atol=0)  # the projection
        assert (shifted_skips[1] - plain_skips[1]).abs().max() > 0.5
    with pytest.raises(ValueError, match=r"one \(b1, b2\) pair per encoder and middle block \(5\), got 4"):
        unet.encode(x, biases=zeros[:4])
    with torch.device("meta"):
        paper = make_model("unet", "paper", 1, 1)
    assert paper.encoder_block_widths() == [128, 128, 256, 256, 512, 512, 512, 512]


# -- the loss --------------------------------------------------------------------------------------

def test_loss_equals_the_hand_computation():
    network = _tiny()
    schedule = VPSchedule(eta=1e-3)
    objective = ScoreLoss(network, schedule)
    window = _window(batch=3)
    t = torch.tensor([0.0, 0.4, 1.0])
    noise = torch.randn(window.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        loss = objective(window, t, noise)
        a = torch.acos(torch.tensor(1e-3).sqrt())
        mu, sigma = torch.cos(a * t), torch.sin(a * t)
        noised = mu[:, None, None, None, None] * window + sigma[:, None, None, None, None] * noise
        expected = ((network(noised, t) - noise) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    assert objective.terms == {"noise_mse": pytest.approx(float(expected), rel=1e-6)}
    # At t = 0 the input is the clean window.
    with torch.no_grad():
        torch.testing.assert_close(schedule.add_noise(window, t, noise)[0], window[0])
    with pytest.raises(ValueError, match=r"one diffusion time per window, shape \(3,\)"):
        objective(window, torch.rand(2))
    with pytest.raises(ValueError, match=r"windows must be \(batch, 3, 1, y, x\)"):
        objective(_window(window=4), None)


def test_v_prediction_reads_as_noise_and_its_loss_is_the_v_error():
    """eps_hat = sigma x_t + mu v_hat exactly, and the training loss ||eps_hat - eps||² / mu² is ||v_hat - v||²
    with v = mu eps - sigma x_0 (Salimans & Ho 2022), whatever the network."""
    from emu.training.score import VPredictionScore, noise_predictor

    network = _tiny()
    schedule = VPSchedule(eta=1e-3)
    window = _window(batch=3)
    t = torch.tensor([0.05, 0.5, 1.0])
    noise = torch.randn(window.shape, generator=torch.Generator().manual_seed(5))
    predictor = noise_predictor(network, schedule, "v")
    assert isinstance(predictor, VPredictionScore) and predictor.window == network.window
    assert noise_predictor(network, schedule, "eps") is network
    objective = ScoreLoss(network, schedule, prediction="v")
    with torch.no_grad():
        loss = objective(window, t, noise)
        mu, sigma = schedule.coefficients(t, window)
        noised = mu * window + sigma * noise
        v_hat = network(noised, t)
        torch.testing.assert_close(predictor(noised, t), sigma * noised + mu * v_hat)
        torch.testing.assert_close(loss, ((v_hat - (mu * noise - sigma * window)) ** 2).mean(), rtol=1e-5, atol=0)
        eps_mse = ((sigma * noised + mu * v_hat - noise) ** 2).mean()
    assert objective.terms == {"noise_mse": pytest.approx(float(eps_mse), rel=1e-5)}
    # at t = 1 a v network of all zeros predicts eps_hat = sigma x_t: the noise to within mu (sigma x_0 - mu eps),
    # mu = sqrt(eta) = 0.032 (an eps network must learn this identity itself)
    zeroed = _tiny()
    with torch.no_grad():
        for parameter in zeroed.parameters():
            parameter.zero_()
    zero = VPredictionScore(zeroed, schedule)
    one = torch.ones(3)
    x1 = schedule.add_noise(window, one, noise)
    mu1, sigma1 = schedule.coefficients(one, window)
    with torch.no_grad():
        torch.testing.assert_close(zero(x1, one) - noise, mu1 * (sigma1 * window - mu1 * noise), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="prediction must be one of eps, v"):
        noise_predictor(network, schedule, "x0")


def test_stratified_times_cover_each_stratum_once():
    torch.manual_seed(0)
    t = sample_times(8)
    assert t.shape == (8,)
    assert torch.equal(torch.floor(t * 8).long(), torch.arange(8))
    plain = sample_times(1000, stratified=False)
    assert 0 <= float(plain.min()) and float(plain.max()) < 1 and abs(float(plain.mean()) - 0.5) < 0.05


def test_loss_draws_fresh_times_and_noise_and_trains():
    network = _tiny()
    objective = ScoreLoss(network, VPSchedule())
    window = _window(batch=4)
    torch.manual_seed(0)
    first = objective(window)
    second = objective(window)
    assert float(first.detach()) != float(second.detach())
    first.backward()
    assert all(p.grad is not None for p in network.parameters())


# -- training --------------------------------------------------------------------------------------

def _quiet(_):
    pass


def test_config_defaults_and_validation():
    config = ScoreTrainingConfig(data="data")
    assert (config.batch_size, config.lr, config.max_grad_norm, config.window, config.eta, config.ema_decay,
            config.window_stride, config.preset) == (32, 2e-4, 1.0, 5, 1e-3, 0.999, 1, "small")
    for field, value, message in [("window", 1, "window must be an integer >= 2"), ("eta", 0.0, "eta must be"),
                                  ("ema_decay", 1.0, "ema_decay must be"), ("window_stride", 0, "window_stride"),
                                  ("preset", "huge", "preset must be"), ("window", 2.5, "window must be"),
                                  ("prediction", "x0", "prediction must be 'eps' or 'v'")]:
        with pytest.raises(ValueError, match=message):
            ScoreTrainingConfig(data="data", **{field: value})


def test_a_v_network_trains_from_the_cli_and_loads_as_a_noise_prediction(tiny_data, tmp_path):
    from click.testing import CliRunner

    from emu.cli import main
    from emu.training.score import VPredictionScore

    result = CliRunner().invoke(main, ["train", "score", "--data", str(tiny_data), "--epochs", "1", "--batch-size", "4",
                                       "--window", "3", "--prediction", "v", "--out", str(tmp_path / "v"), "--no-progress"])
    assert result.exit_code == 0, result.output
    predictor, schedule, _, payload = load_score(tmp_path / "v" / "last.pt")
    assert isinstance(predictor, VPredictionScore) and payload["prediction"] == "v" and not predictor.training
    x = torch.randn(2, 3, 1, 16, 16)
    with torch.no_grad():
        mu, sigma = schedule.coefficients(0.3, x)
        torch.testing.assert_close(predictor(x, 0.3), sigma * x + mu * predictor.network(x, 0.3))


def test_window_longer_than_the_trajectories_is_refused(tiny_data, tmp_path):
    with pytest.raises(UserError, match=r"--window 7: the train trajectories of .* hold 6 snapshots each"):
        train_score(ScoreTrainingConfig(data=str(tiny_data), window=7, epochs=1), tmp_path / "run",
                    progress=False, echo=_quiet)
    assert not (tmp_path / "run").exists()


def test_training_writes_its_files_loads_and_resumes_exactly(tiny_data, tmp_path):
    base = dict(data=str(tiny_data), preset="small", window=3, batch_size=4, lr=1e-3, seed=3, ema_decay=0.9)
    straight = tmp_path / "straight"
    metrics = train_score(ScoreTrainingConfig(epochs=2, **base), straight, progress=False, echo=_quiet)
    for name in ("last.pt", "best.pt", "metrics.jsonl", "loss.png"):
        assert (straight / name).is_file(), name
    lines = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert metrics["epoch"] == 2 and "valid_loss" in metrics and "train_noise_mse" in metrics
    assert all(key in metrics for key in ("valid_noise_mse_low_t", "valid_noise_mse_high_t"))

    network, schedule, normalizer, payload = load_score(straight / "last.pt")
    assert not network.training and isinstance(schedule, VPSchedule) and schedule.eta == 1e-3
    assert payload["format"] == "emu-score" and payload["window"] == 3
    assert payload["model_config"]["arch"] == "score" and payload["model_config"]["window"] == 3
    assert payload["schedule"] == {"schedule": "vp_cosine", "eta": 1e-3}
    assert payload["dataset"]["channels"] == normalizer.channels
    for name, value in network.state_dict().items():  # the EMA weights
        torch.testing.assert_close(value, payload["ema"][name], rtol=0, atol=0)

    # An interrupted run (stopped after epoch 1 of 2) resumed gives the uninterrupted run's weights.
    import emu.training.score as score_training

    stopped = tmp_path / "stopped"
    interrupted_run(score_training, lambda: train_score(ScoreTrainingConfig(epochs=2, **base), stopped, progress=False,
                                                        echo=_quiet))
    assert loop.load_checkpoint(stopped / "last.pt", "score")["epoch"] == 1
    train_score(ScoreTrainingConfig(epochs=2, **base), stopped, resume=True, progress=False, echo=_quiet)
    a, b = loop.load_checkpoint(straight / "last.pt", "score"), loop.load_checkpoint(stopped / "last.pt", "score")
    for entry in ("model", "ema"):
        for name in a[entry]:
            torch.testing.assert_close(a[entry][name], b[entry][name], rtol=0, atol=0)
    assert [row["valid_loss"] for row in a["history"]] == [row["valid_loss"] for row in b["history"]]
    with pytest.raises(UserError, match=r"other settings: window \(--window\): 3 in the checkpoint, 4 now"):
        train_score(ScoreTrainingConfig(epochs=2, **{**base, "window": 4}), stopped, resume=True, progress=False,
                    echo=_quiet)
