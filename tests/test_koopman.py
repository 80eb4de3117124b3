"""Deep Koopman autoencoder (Cohesion's coherent prior): stability by construction, forecasts, the
three-term loss by hand, config round trip, and training with checkpoints and exact resume."""

import copy
import json

import pytest
import torch
from conftest import interrupted_run

from emu.errors import UserError
from emu.models.koopman import PRESETS, KoopmanAutoencoder, make_koopman
from emu.training import koopman as koopman_training
from emu.training.koopman import KoopmanLoss, KoopmanTrainingConfig, load_checkpoint, load_koopman, train_koopman


def spectral_radius(matrix: torch.Tensor) -> float:
    return float(torch.linalg.eigvals(matrix.detach().double()).abs().max())


def push_operator_towards(model: KoopmanAutoencoder, target: torch.Tensor, steps: int = 300) -> None:
    """Optimises the operator's parameters alone to make K match `target` (Frobenius distance)."""
    parameters = [p for name, p in model.named_parameters()
                  if name in ("left_generator", "right_generator", "raw_singular_values", "matrix")]
    optimizer = torch.optim.Adam(parameters, lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = ((model.operator() - target) ** 2).sum()
        loss.backward()
        optimizer.step()


def test_stable_operator_keeps_its_spectral_radius_below_one_even_when_pushed_past_it():
    torch.manual_seed(0)
    d = 16
    stable = KoopmanAutoencoder(1, grid_size=8, latent_dim=d, hidden_channels=2, levels=1, stable=True)
    free = KoopmanAutoencoder(1, grid_size=8, latent_dim=d, hidden_channels=2, levels=1, stable=False)
    assert spectral_radius(stable.operator()) == pytest.approx(0.95, abs=1e-6)
    assert spectral_radius(free.operator()) == pytest.approx(0.95, abs=1e-6)
    # A random rotation-ish target of norm 1.5, then 1.5 I: both pull every eigenvalue outside the disc.
    rotation = torch.linalg.qr(torch.randn(d, d))[0]
    for target in (1.5 * rotation, 1.5 * torch.eye(d)):
        push_operator_towards(stable, target)
        push_operator_towards(free, target)
        K = stable.operator()
        assert spectral_radius(K) <= 1 + 1e-6
        assert float(torch.linalg.matrix_norm(K.detach().double(), 2)) <= 1 + 1e-6
        # The check can fail: the free operator follows the target past the unit circle.
        assert spectral_radius(free.operator()) > 1.4
    # The optimiser did push: the singular values went close to their bound 1.
    singular = stable.singular_values().detach()
    assert float(singular.min()) > 0.96 and float(singular.max()) > 0.999
    # Bounded latent trajectories over a long horizon: ||K^k z|| <= ||z||.
    z = torch.randn(3, d)
    with torch.no_grad():
        norms = stable.advance(z, 500).norm(dim=-1)
        assert torch.all(norms <= norms[:, :1] * (1 + 1e-5))
        assert torch.isfinite(norms).all()
        # ... while the free one's explode: 1.5^100 ~ 4e17, and 1.5^500 overflows float32 (inf/NaN).
        assert float(free.advance(z, 100).norm(dim=-1)[:, -1].min()) > 1e15
        assert not torch.isfinite(free.advance(z, 500)).all()


def test_forecast_is_the_decoded_powers_of_the_operator():
    torch.manual_seed(1)
    model = make_koopman("small", 2, 16, latent_dim=8).eval()
    initial = torch.randn(3, 2, 16, 16)
    horizon = 5
    with torch.no_grad():
        forecast = model.forecast(initial, horizon)
        assert forecast.shape == (3, horizon + 1, 2, 16, 16)
        z0, K = model.encode(initial), model.operator()
        latents = model.advance(z0, horizon)
        assert latents.shape == (3, horizon + 1, 8)
        for k in range(horizon + 1):
            expected = model.decode(z0 @ torch.linalg.matrix_power(K, k).T)
            torch.testing.assert_close(forecast[:, k], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(forecast[:, 0], model(initial))
    with pytest.raises(ValueError, match="steps must be an integer >= 0"):
        model.advance(z0, -1)


@pytest.mark.parametrize("grid", [16, 32])
def test_encode_decode_shapes(grid):
    model = make_koopman("small", 1, grid)
    x = torch.randn(2, 4, 1, grid, grid)  # leading (batch, time) dimensions are kept
    z = model.encode(x)
    assert z.shape == (2, 4, PRESETS["small"]["latent_dim"])
    assert model.decode(z).shape == x.shape
    with pytest.raises(ValueError, match=f"grid_size={grid}"):
        model.encode(torch.randn(2, 1, 2 * grid, 2 * grid))


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="multiple of 2\\^levels = 8"):
        KoopmanAutoencoder(1, grid_size=20, levels=3)
    with pytest.raises(ValueError, match="latent_dim must be an integer >= 1"):
        KoopmanAutoencoder(1, grid_size=16, latent_dim=0)
    with pytest.raises(ValueError, match="activation must be one of"):
        KoopmanAutoencoder(1, grid_size=16, activation="tanh")
    with pytest.raises(ValueError, match="preset must be one of"):
        make_koopman("huge", 1, 16)
    with pytest.raises(ValueError, match="unknown koopman arguments \\['width'\\]"):
        make_koopman("small", 1, 16, width=3)
    with pytest.raises(ValueError, match="horizon must be an integer >= 1"):
        KoopmanTrainingConfig(data="d", horizon=0)
    with pytest.raises(ValueError, match="preset must be 'paper' or 'small'"):
        KoopmanTrainingConfig(data="d", preset="big")
    with pytest.raises(ValueError, match="prediction_weight must be >= 0"):
        KoopmanTrainingConfig(data="d", prediction_weight=-1)
    with pytest.raises(ValueError, match="the loss weights must be not all 0"):
        KoopmanTrainingConfig(data="d", reconstruction_weight=0, prediction_weight=0, linearity_weight=0)
    with pytest.raises(ValueError, match="stable must be True or False"):
        KoopmanTrainingConfig(data="d", stable="yes")


@pytest.mark.parametrize("stable", [True, False])
def test_config_round_trip_rebuilds_the_same_network(stable):
    torch.manual_seed(2)
    model = make_koopman("small", 2, 16, latent_dim=12, hidden_channels=4, stable=stable)
    config = json.loads(json.dumps(model.config))
    assert config["arch"] == "koopman" and config["preset"] == "small" and config["channels"] == 2
    rebuilt = KoopmanAutoencoder(**{k: v for k, v in config.items() if k not in ("arch", "preset")})
    assert rebuilt.config == {**model.config, "preset": None}
    again = KoopmanAutoencoder.from_config(config)
    assert again.config == model.config
    again.load_state_dict(model.state_dict())  # strict: same keys and shapes
    x = torch.randn(2, 2, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(again.forecast(x, 3), model.forecast(x, 3), rtol=0, atol=0)
    copy.deepcopy(model)  # the training loop's EMA (AveragedModel) deep-copies the module


def test_parameter_counts_of_the_presets_at_32_one_channel():
    counts = {preset: sum(p.numel() for p in make_koopman(preset, 1, 32).parameters()) for preset in PRESETS}
    assert counts == {"small": 389_697, "paper": 6_209_793}


@pytest.mark.parametrize("stable", [True, False])
def test_loss_equals_a_hand_computation(stable):
    torch.manual_seed(3)
    model = KoopmanAutoencoder(1, grid_size=8, latent_dim=4, hidden_channels=2, levels=1, stable=stable)
    with torch.no_grad():  # a non-trivial operator
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    window = torch.randn(2, 4, 1, 8, 8)
    weights = {"reconstruction_weight": 0.5, "prediction_weight": 2.0, "linearity_weight": 3.0}
    objective = KoopmanLoss(model, **weights)
    loss = objective(window)
    K = model.operator()
    frames = [window[:, t] for t in range(4)]
    latents = [model.encode(frame) for frame in frames]
    reconstruction = sum(torch.mean((model.decode(z) - x) ** 2) for z, x in zip(latents, frames)) / 4
    predicted = [latents[0] @ torch.linalg.matrix_power(K, k).T for k in (1, 2, 3)]
    prediction = sum(torch.mean((model.decode(p) - frames[k]) ** 2) for k, p in zip((1, 2, 3), predicted)) / 3
    linearity = sum(torch.mean((p - latents[k]) ** 2) for k, p in zip((1, 2, 3), predicted)) / 3
    expected = 0.5 * reconstruction + 2.0 * prediction + 3.0 * linearity
    reconstruction, prediction, linearity = (t.detach() for t in (reconstruction, prediction, linearity))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert objective.terms["reconstruction"] == pytest.approx(float(reconstruction), rel=1e-5)
    assert objective.terms["prediction"] == pytest.approx(float(prediction), rel=1e-5)
    assert objective.terms["linearity"] == pytest.approx(float(linearity), rel=1e-5)
    final = torch.mean((model.decode(predicted[-1]) - frames[3]) ** 2).detach()
    assert objective.terms["prediction_final"] == pytest.approx(float(final), rel=1e-5)
    loss.backward()  # every parameter gets a gradient
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def _quiet(_):
    pass


def test_training_writes_checkpoints_and_resumes_exactly(tiny_data, tmp_path):
    base = {"data": str(tiny_data), "preset": "small", "latent_dim": 16, "horizon": 3, "batch_size": 4, "lr": 1e-3,
            "seed": 5}
    straight = tmp_path / "straight"
    metrics = train_koopman(KoopmanTrainingConfig(epochs=2, **base), straight, progress=False, echo=_quiet)
    for name in ("last.pt", "best.pt", "metrics.jsonl", "loss.png"):
        assert (straight / name).is_file(), name
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    for key in ("train_loss", "train_reconstruction", "train_prediction", "train_linearity", "valid_loss",
                "valid_reconstruction", "valid_prediction", "valid_linearity", "valid_prediction_final_mse"):
        assert key in metrics and metrics[key] == metrics[key], key  # present and not NaN
    payload = load_checkpoint(straight / "last.pt")
    assert payload["format"] == "emu-koopman" and payload["model_config"]["arch"] == "koopman"
    assert payload["model_config"]["latent_dim"] == 16 and payload["model_config"]["grid_size"] == 16
    assert payload["dataset"]["channels"] and payload["normalizer"]["channels"] == payload["dataset"]["channels"]
    model, _, _ = load_koopman(straight / "best.pt")
    assert not model.training and model.stable
    assert spectral_radius(model.operator()) < 1
    with torch.no_grad():
        assert model.forecast(torch.zeros(1, 1, 16, 16), 50).shape == (1, 51, 1, 16, 16)

    # An interrupted run (killed during epoch 2's validation) resumed gives the same weights.
    stopped = tmp_path / "stopped"
    config = KoopmanTrainingConfig(epochs=2, **base)
    interrupted_run(koopman_training, lambda: train_koopman(config, stopped, progress=False, echo=_quiet), before=True)
    assert load_checkpoint(stopped / "last.pt")["epoch"] == 1
    train_koopman(config, stopped, resume=True, progress=False, echo=_quiet)
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(stopped / "last.pt")
    assert b["epoch"] == 2
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=0, atol=0)
    with pytest.raises(UserError, match=r"horizon \(--horizon\): 3 in the checkpoint, 2 now"):
        train_koopman(KoopmanTrainingConfig(epochs=2, **{**base, "horizon": 2}), stopped, resume=True,
                      progress=False, echo=_quiet)


def test_ema_weights_are_what_load_koopman_returns(tiny_data, tmp_path):
    config = KoopmanTrainingConfig(data=str(tiny_data), preset="small", latent_dim=8, horizon=2, batch_size=8,
                                   epochs=1, ema_decay=0.9, stable=False)
    train_koopman(config, tmp_path, progress=False, echo=_quiet)
    model, _, payload = load_koopman(tmp_path / "last.pt")
    assert payload["ema"] is not None and not model.stable
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, payload["ema"][name], rtol=0, atol=0)
