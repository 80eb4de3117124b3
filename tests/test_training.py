"""Emulator training: the unrolled loss, overfitting, checkpoints and resume, DDP, rollouts."""

import json
import os
import socket

import h5py
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner

from emu.cli import main
from emu.errors import UserError
from emu.training.emulator import ResidualEmulator, rollout, unrolled_loss
from emu.training.trainer import TrainingConfig, UnrolledLoss, load_checkpoint, train_emulator


class Linear(torch.nn.Module):
    """A 1x1 convolution: small enough to check gradients by hand."""

    def __init__(self, channels=1):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return self.conv(x)


def test_unrolled_loss_equals_a_hand_written_two_step_computation():
    torch.manual_seed(0)
    network = Linear()
    emulator = ResidualEmulator(network, noise=0.0)
    window = torch.randn(3, 3, 1, 8, 8)
    loss, per_step = unrolled_loss(emulator, window)
    x0, x1, x2 = window[:, 0], window[:, 1], window[:, 2]
    d0 = network(x0)
    d1 = network(x0 + d0)  # the second input is the model's own state, not x1
    expected = torch.mean((d0 - (x1 - x0)) ** 2) + torch.mean((d1 - (x2 - x1)) ** 2)
    torch.testing.assert_close(loss, expected)
    expected_steps = [float(torch.mean((d0 - (x1 - x0)) ** 2).detach()), float(torch.mean((d1 - (x2 - x1)) ** 2).detach())]
    assert per_step == pytest.approx(expected_steps)
    # gradients flow through the unroll: the second step's loss depends on the weights twice
    grad = torch.autograd.grad(loss, network.conv.weight)[0]
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_noise_is_added_to_inputs_only():
    emulator = ResidualEmulator(Linear(), noise=0.5)
    x = torch.zeros(2, 1, 4, 4)
    a = emulator(x, torch.Generator().manual_seed(1))
    b = emulator(x, torch.Generator().manual_seed(1))
    c = emulator(x, torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    with pytest.raises(ValueError, match="noise"):
        ResidualEmulator(Linear(), noise=-1)


def test_small_drn_overfits_a_tiny_dataset(tiny_data):
    from emu.data.loaders import Normalizer, TrajectoryWindows
    from emu.models import make_model

    torch.manual_seed(0)
    windows = TrajectoryWindows(tiny_data, unroll=1, normalizer=Normalizer.from_dataset(tiny_data))
    batch = torch.stack([windows[i] for i in range(4)])
    emulator = ResidualEmulator(make_model("drn", "small", 1, 1), 0.0)
    optimizer = torch.optim.AdamW(emulator.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for _ in range(150):
        loss, _ = unrolled_loss(emulator, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])  # measured 0.063 -> 0.0007


def test_training_writes_checkpoints_metrics_and_plot(tiny_data, tmp_path):
    config = TrainingConfig(data=str(tiny_data), arch="drn", preset="small", unroll=2, noise=1e-5, epochs=2,
                            batch_size=8, seed=0)
    train_emulator(config, tmp_path, progress=False, echo=lambda _: None)
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [1, 2]
    assert all(np.isfinite(row[key]) for row in history for key in ("train_loss", "valid_loss", "valid_rollout_mse"))
    assert (tmp_path / "loss.png").stat().st_size > 1000
    payload = load_checkpoint(tmp_path / "last.pt")
    assert payload["epoch"] == 2 and payload["model_config"]["arch"] == "drn"
    assert set(payload["normalizer"]) == {"mean", "std", "channels"}


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_data, tmp_path):
    base = dict(data=str(tiny_data), arch="drn", preset="small", unroll=2, noise=1e-3, batch_size=4, lr=1e-3, seed=3)
    straight = tmp_path / "straight"
    train_emulator(TrainingConfig(epochs=2, **base), straight, progress=False, echo=lambda _: None)
    stopped = tmp_path / "stopped"
    # An interrupted run: same config (epochs=2), killed after epoch 1 -> emulate by training 1 epoch
    # with epochs=2 (same schedule) and stopping there.
    config = TrainingConfig(epochs=2, **base)
    import emu.training.trainer as trainer

    original = trainer.evaluate
    calls = {"n": 0}

    def stop_after_first_epoch(*args, **kwargs):
        calls["n"] += 1
        result = original(*args, **kwargs)
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return result

    trainer.evaluate = stop_after_first_epoch
    try:
        with pytest.raises(KeyboardInterrupt):
            train_emulator(config, stopped, progress=False, echo=lambda _: None)
    finally:
        trainer.evaluate = original
    assert load_checkpoint(stopped / "last.pt")["epoch"] == 1
    train_emulator(config, stopped, resume=True, progress=False, echo=lambda _: None)
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(stopped / "last.pt")
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=0, atol=0)
    # Another setting is refused, naming it with both values; a larger --epochs is an extension (tested elsewhere).
    with pytest.raises(UserError, match=r"other settings: lr \(--lr\): 0.001 in the checkpoint, 0.002 now"):
        train_emulator(TrainingConfig(epochs=2, **{**base, "lr": 2e-3}), stopped, resume=True, progress=False,
                       echo=lambda _: None)


def test_a_setting_newer_than_the_checkpoint_counts_as_its_default():
    """A checkpoint written before a setting existed resumes when the setting is left at its default
    (the behaviour of the code that wrote it) and is refused, naming it, when it is not."""
    from emu.training.loop import settings_differences

    stored = {"lr": 1e-3, "data": "data/"}
    assert settings_differences(stored, {"lr": 1e-3, "data": "data", "prediction": "eps"}, {"prediction": "eps"}) == []
    assert settings_differences(stored, {"lr": 1e-3, "data": "data", "prediction": "v"}, {"prediction": "eps"}) == [
        'prediction (--prediction): "eps" in the checkpoint, "v" now']
    assert settings_differences(stored, {"lr": 1e-3, "data": "data", "prediction": "eps"}) == [
        'prediction (--prediction): (not set) in the checkpoint, "eps" now']


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank, world, port, window, state, queue):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    network = Linear()
    network.load_state_dict(state)
    model = DistributedDataParallel(UnrolledLoss(ResidualEmulator(network, 0.0)))
    half = window.shape[0] // world
    model(window[rank * half:(rank + 1) * half]).backward()
    # numpy copies travel by value (torch tensors would be shared memory that dies with this process)
    queue.put((rank, network.conv.weight.grad.numpy().copy(), network.conv.bias.grad.numpy().copy()))
    dist.destroy_process_group()


def test_ddp_with_two_gloo_processes_matches_single_process_gradients():
    torch.manual_seed(0)
    window = torch.randn(4, 3, 1, 8, 8)
    network = Linear()
    state = {k: v.clone() for k, v in network.state_dict().items()}
    UnrolledLoss(ResidualEmulator(network, 0.0))(window).backward()
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_ddp_worker, args=(rank, 2, port, window, state, queue)) for rank in range(2)]
    for process in processes:
        process.start()
    results = [queue.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    for _, weight_grad, bias_grad in results:
        # DDP averages the two half-batch gradients: equal to the full-batch gradient of a mean loss
        torch.testing.assert_close(torch.from_numpy(weight_grad), network.conv.weight.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(torch.from_numpy(bias_grad), network.conv.bias.grad, rtol=1e-5, atol=1e-7)


def test_cli_train_then_rollout_writes_valid_hdf5(tiny_data, tmp_path):
    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(main, ["train", "emulator", "--data", str(tiny_data), "--arch", "drn", "--epochs", "1",
                                  "--unroll", "2", "--out", str(run), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (run / "last.pt").exists() and (run / "best.pt").exists()
    out = tmp_path / "r.h5"
    result = runner.invoke(main, ["rollout", "--emulator", str(run / "last.pt"), "--init", str(tiny_data),
                                  "--trajectories", "1", "--steps", "8", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    with h5py.File(out, "r") as handle:
        fields = handle["t0_fields/vorticity"]
        assert fields.shape == (1, 9, 16, 16)
        assert np.isfinite(fields[()]).all()
        mse = handle["emu/mse"][()]
        assert mse.shape == (1, 9) and mse[0, 0] == pytest.approx(0, abs=1e-10)  # starts on the truth
        assert np.isfinite(mse[0, :6]).all() and np.isnan(mse[0, 6:]).all()  # reference holds 6 snapshots
        assert handle["emu/diverged_at"][0] == -1


def test_rollout_flags_a_blown_up_state_without_crashing(tiny_data, tmp_path):
    from emu.training.rollouts import rollout_to_file

    run = tmp_path / "run"
    train_emulator(TrainingConfig(data=str(tiny_data), epochs=1, unroll=1), run, progress=False, echo=lambda _: None)
    payload = load_checkpoint(run / "last.pt")
    # Make the network explode: scale the decoder's last weights so each step multiplies the state.
    for name, value in payload["model"].items():
        if value.is_floating_point():
            payload["model"][name] = value * 50
    torch.save(payload, run / "exploding.pt")
    result = rollout_to_file(run / "exploding.pt", tiny_data, tmp_path / "boom.h5", trajectories=1, steps=30,
                             divergence_threshold=1e3, progress=False)
    assert 0 < result["diverged_at"][0] <= 30
    with h5py.File(tmp_path / "boom.h5", "r") as handle:
        assert handle["emu/diverged_at"][0] == result["diverged_at"][0]
        assert handle["t0_fields/vorticity"].shape == (1, 31, 16, 16)
