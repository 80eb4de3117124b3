"""SNS (emu.stabilizers.sns): traversal paths, Theorem C.1 with an exact Gaussian oracle, the loss,
refinement, generation, training (files, resume, DDP) and rollouts through the stabiliser protocol."""

from __future__ import annotations

import json
import os
import socket

import h5py
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner
from conftest import interrupted_run

from emu.data.loaders import FrameGroups, Normalizer
from emu.diffusion import CosineSchedule, DDPMScheduler, add_noise
from emu.stabilizers.levels import LevelLoss
from emu.stabilizers.sns import (
    CLEAN,
    SNSLoss,
    SNSStabilizer,
    SNSTrainingConfig,
    expected_evaluations,
    generate_next,
    path_a,
    path_b,
    path_c,
    refine,
    train_sns,
    traverse,
)

QUIET = dict(progress=False, echo=lambda _: None)


# -- paths ---------------------------------------------------------------------------------------------

def test_paths_visit_the_expected_points_and_end_clean():
    assert path_a(2, 1) == [(2, 1), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1)]
    assert path_b(2, 1) == [(2, 1), (2, 0), (2, -1), (1, -1), (0, -1), (-1, -1)]
    assert path_c(3, 1) == [(3, 1), (2, 1), (1, 1), (0, 0), (-1, -1)]
    assert path_c(0, 2) == [(0, 2), (0, 1), (0, 0), (-1, -1)]
    for path in (path_a, path_b, path_c):
        for start in [(0, 0), (5, 0), (0, 7), (9, 4), (4, 9)]:
            points = path(*start)
            assert points[0] == start and points[-1] == (CLEAN, CLEAN)
            moves = np.diff(np.array(points), axis=0)
            assert np.all(moves <= 0) and np.all(moves >= -1) and np.all(moves.sum(axis=1) < 0)
    # Network evaluations: A and B walk both frames separately, C diagonally after equalising.
    assert expected_evaluations(9, 4, "A") == 9 + 4 + 2 == expected_evaluations(9, 4, "B")
    assert expected_evaluations(9, 4, "C") == 9 + 1
    with pytest.raises(ValueError, match="path must be one of A, B, C"):
        expected_evaluations(1, 1, "D")


def test_traverse_refuses_a_path_that_is_not_monotone():
    scheduler = DDPMScheduler(CosineSchedule(10))
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="lower s2, s1 or both by 1"):
        traverse(x, x, [[(2, 2), (0, 2)]], lambda *a: (x, x), scheduler)
    with pytest.raises(ValueError, match="lower s2, s1 or both by 1"):
        traverse(x, x, [[(1, 1), (1, 2)]], lambda *a: (x, x), scheduler)


# -- Theorem C.1 with an exact multi-noise-level oracle -----------------------------------------------------

def _linear_gaussian_pair():
    """(x_{t-1}, x_t) of x_t = A x_{t-1} + w in R^2: joint covariance Sigma (4 x 4), zero mean."""
    C = torch.tensor([[1.0, 0.3], [0.3, 1.0]], dtype=torch.float64)
    A = torch.tensor([[0.8, -0.3], [0.2, 0.7]], dtype=torch.float64)
    Q = 0.2 * torch.eye(2, dtype=torch.float64)
    return torch.cat([torch.cat([C, C @ A.T], 1), torch.cat([A @ C, A @ C @ A.T + Q], 1)], 0)


def _gaussian_oracle(sigma: torch.Tensor, schedule: CosineSchedule):
    """E[(eps_2, eps_1) | y] for y = (sqrt(ab_{s2}) x_{t-1} + sqrt(1 - ab_{s2}) eps_2, same at s1),
    x ~ N(0, sigma): D_s Cov_y^{-1} y with Cov_y = D_a sigma D_a + D_s^2 (level CLEAN: a = 1, s = 0)."""
    alpha_bars = schedule.alpha_bars.double()

    def scales(level: int):
        ab = torch.tensor(1.0, dtype=torch.float64) if level == CLEAN else alpha_bars[level]
        return ab.sqrt(), (1 - ab).sqrt()

    def predict(anchor, previous, current, s2, s1):
        assert torch.all(s2 == s2[0]) and torch.all(s1 == s1[0])  # one start point: one matrix per move
        (a2, n2), (a1, n1) = scales(int(s2[0])), scales(int(s1[0]))
        a = torch.stack([a2, a2, a1, a1])
        n = torch.stack([n2, n2, n1, n1])
        covariance = a[:, None] * sigma * a[None, :] + torch.diag(n**2)
        y = torch.cat([previous.flatten(1), current.flatten(1)], dim=1).double()
        eps = (n[:, None] * torch.linalg.solve(covariance, y.T)).T
        return eps[:, :2].reshape(previous.shape).to(previous.dtype), eps[:, 2:].reshape(current.shape).to(current.dtype)

    return predict


def _walk(path, oracle, sigma, schedule, start, samples, seed):
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randn(samples, 4, generator=generator, dtype=torch.float64) @ torch.linalg.cholesky(sigma).T
    previous, current = clean[:, :2].reshape(samples, 1, 1, 2), clean[:, 2:].reshape(samples, 1, 1, 2)
    s2, s1 = start
    noisy_previous = add_noise(schedule, previous, s2, torch.randn(previous.shape, generator=generator, dtype=torch.float64))
    noisy_current = add_noise(schedule, current, s1, torch.randn(current.shape, generator=generator, dtype=torch.float64))
    points = path(s2, s1)
    out_previous, out_current = traverse(noisy_previous, noisy_current, [points] * samples, oracle,
                                         DDPMScheduler(schedule), generator=generator)
    joint = torch.cat([out_previous.flatten(1), out_current.flatten(1)], dim=1)
    return torch.cov(joint.T)


def test_all_three_paths_give_the_joint_distribution_with_an_exact_gaussian_oracle():
    """Theorem C.1: any monotone path from (s2, s1) to clean with the exact multi-noise-level score
    returns the joint law of (x_{t-1}, x_t); sampling error of a covariance entry at 20,000 samples
    is ~0.01, the DDPM discretisation adds less. A decoupled oracle (frames treated as independent)
    loses the cross-covariance: the check can fail."""
    sigma = _linear_gaussian_pair()
    schedule = CosineSchedule(1000)
    oracle = _gaussian_oracle(sigma, schedule)
    start = (600, 450)  # ab = 0.35 and 0.58: the noised pair keeps only part of its coupling
    covariances = {name: _walk(path, oracle, sigma, schedule, start, 20000, seed)
                   for seed, (name, path) in enumerate((("A", path_a), ("B", path_b), ("C", path_c)))}
    for name, covariance in covariances.items():
        assert torch.max(torch.abs(covariance - sigma)) < 0.05, (name, covariance)
    assert torch.max(torch.abs(covariances["A"] - covariances["C"])) < 0.06
    decoupled = sigma.clone()
    decoupled[:2, 2:] = 0
    decoupled[2:, :2] = 0
    wrong = _walk(path_a, _gaussian_oracle(decoupled, schedule), sigma, schedule, start, 20000, 7)
    assert torch.max(torch.abs(wrong[:2, 2:] - sigma[:2, 2:])) > 0.15


# -- a fake network with the SNSUNet interface, for the loss and refinement ----------------------------------

class FakeSNS(torch.nn.Module):
    """Returns given noises/logits: predict_levels reads fixed levels; the noise is a fixed multiple."""

    def __init__(self, previous_levels, current_levels, anchor=True, num_levels=50, scale=0.0):
        super().__init__()
        self.config = {"anchor": anchor}
        self.levels = (torch.as_tensor(previous_levels), torch.as_tensor(current_levels))
        self.num_levels, self.scale = num_levels, scale
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.calls = 0

    def stack_inputs(self, anchor, previous, current):
        if (anchor is None) == self.config["anchor"]:
            raise ValueError("anchor mismatch")
        return torch.cat([t for t in (anchor, previous, current) if t is not None], dim=1)

    def forward(self, x):
        from emu.models.sns import SNSOutput

        self.calls += 1
        channels = x.shape[1] // (3 if self.config["anchor"] else 2)
        previous, current = x[:, -2 * channels:-channels], x[:, -channels:]
        batch = x.shape[0]
        logits = torch.linspace(-1, 1, self.num_levels).repeat(batch, 1) * self.weight
        return SNSOutput(self.scale * previous * self.weight, self.scale * current * self.weight, logits, -logits)

    def predict_levels(self, x):
        batch = x.shape[0]
        return self.levels[0][:batch].clone(), self.levels[1][:batch].clone()


def test_loss_equals_a_hand_computation():
    torch.manual_seed(0)
    schedule = CosineSchedule(50)
    network = FakeSNS([0], [0], scale=0.5)
    group = torch.randn(3, 3, 1, 4, 4)
    s2, s1 = torch.tensor([1, 10, 40]), torch.tensor([5, 0, 49])
    eps2, eps1 = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    loss = SNSLoss(network, schedule, classifier_weight=0.1)(group, s2, s1, eps2, eps1)
    ab = schedule.alpha_bars.double()
    y2 = (ab[s2].sqrt()[:, None, None, None] * group[:, 1] + (1 - ab[s2]).sqrt()[:, None, None, None] * eps2).float()
    y1 = (ab[s1].sqrt()[:, None, None, None] * group[:, 2] + (1 - ab[s1]).sqrt()[:, None, None, None] * eps1).float()
    logits = torch.linspace(-1, 1, 50).repeat(3, 1)
    log_p, log_q = torch.log_softmax(logits, -1), torch.log_softmax(-logits, -1)
    expected = (((0.5 * y2 - eps2) ** 2).mean() + ((0.5 * y1 - eps1) ** 2).mean()
                + 0.1 * (-log_p[torch.arange(3), s2].mean() - log_q[torch.arange(3), s1].mean()))
    torch.testing.assert_close(loss, expected.float(), rtol=1e-5, atol=1e-6)
    # Levels drawn by the loss come from the shared level options: the mixture puts half below 10.
    mixed = SNSLoss(network, schedule, levels=LevelLoss(schedule, low_level_fraction=0.5, low_level_max=10))
    draws = torch.cat([mixed.levels.sample(1000, "cpu") for _ in range(4)])
    assert 0.5 < float((draws < 10).float().mean()) < 0.62
    with pytest.raises(ValueError, match="group must be"):
        SNSLoss(network, schedule)(group[:, 1:])


def test_refine_walks_each_sample_from_its_levels_and_skips_below_the_threshold():
    schedule = CosineSchedule(50)
    scheduler = DDPMScheduler(schedule)
    network = FakeSNS([3, 0, 9, 1], [2, 1, 4, 0])
    current, previous, anchor = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    generator = torch.Generator().manual_seed(0)
    result = refine(network, scheduler, current, previous, anchor, activation_threshold=2, generator=generator)
    assert result.skipped.tolist() == [False, True, False, True]  # both levels < 2 only for samples 1 and 3
    assert result.evaluations.tolist() == [3 + 2 + 2, 0, 9 + 4 + 2, 0]
    assert network.calls == 9 + 4 + 2  # batched: one call per move of the longest path
    torch.testing.assert_close(result.state[[1, 3]], current[[1, 3]], rtol=0, atol=0)
    assert not torch.allclose(result.state[0], current[0])
    assert result.current_level.tolist() == [2, 1, 4, 0] and result.previous_level.tolist() == [3, 0, 9, 1]
    # Path C costs max(s2, s1) + 1; a runaway level is flagged and walked from runaway_level.
    network = FakeSNS([30, 2], [1, 2])
    result = refine(network, scheduler, current[:2], previous[:2], anchor[:2], path="C", runaway_level=20)
    assert result.evaluations.tolist() == [21, 3] and result.runaway.tolist() == [True, False]
    # A blown-up state is flagged and left alone.
    broken = current[:2].clone()
    broken[0, 0, 0, 0] = float("nan")
    result = refine(network, scheduler, broken, previous[:2], anchor[:2])
    assert result.runaway.tolist() == [True, False] and result.evaluations[0] == 0
    with pytest.raises(ValueError, match="activation_threshold"):
        refine(network, scheduler, current[:2], previous[:2], anchor[:2], activation_threshold=-1)


def test_generation_walks_the_whole_schedule_holding_the_previous_state():
    schedule = CosineSchedule(20)
    network = FakeSNS([0], [0], anchor=False, scale=0.0)
    previous = torch.randn(2, 1, 4, 4)
    result = generate_next(network, DDPMScheduler(schedule), previous, None, generator=torch.Generator().manual_seed(1))
    assert network.calls == 20 and result.evaluations.tolist() == [20, 20]
    # eps_hat = 0: the walk from pure noise is a scaled random field, finite and not the previous state.
    assert torch.isfinite(result.state).all() and not torch.allclose(result.state, previous)


# -- data, training, rollouts -------------------------------------------------------------------------

def test_frame_groups_read_the_offsets_of_each_trajectory(tiny_data):
    groups = FrameGroups(tiny_data, "train", offsets=(-3, -1, 0))
    assert len(groups) == 4 * 3  # 4 train trajectories x current frames 3, 4, 5
    with h5py.File(groups.files[0]) as handle:
        channel = json.loads(handle["emu"].attrs["channels"])[0]
        raw = handle["t0_fields"][channel][0]
    item = groups[1]  # trajectory 0, current frame 4
    np.testing.assert_array_equal(item[:, 0].numpy(), np.swapaxes(raw[[1, 3, 4]], -1, -2))
    assert len(FrameGroups(tiny_data, "train", offsets=(-1, 0), stride=2)) == 4 * 3  # currents 1, 3, 5
    with pytest.raises(ValueError, match="strictly increasing integers ending at 0"):
        FrameGroups(tiny_data, "train", offsets=(-1, -3, 0))
    with pytest.raises(ValueError, match="trajectories hold 6 snapshots"):
        FrameGroups(tiny_data, "train", offsets=(-6, -1, 0))


def _config(tiny_data, **overrides):
    return SNSTrainingConfig(**{"data": str(tiny_data), "epochs": 1, "batch_size": 4, "lr": 1e-3, "anchor_lag": 3,
                                "snapshot_stride": 1, "num_levels": 50, "seed": 2, **overrides})


def test_config_refuses_bad_anchor_settings(tiny_data):
    with pytest.raises(ValueError, match="anchor_lag must be an integer >= 2"):
        _config(tiny_data, anchor_lag=1)
    assert _config(tiny_data, anchor=False).offsets == (-1, 0)
    assert SNSTrainingConfig(data="d").classifier_weight == 0.1 and SNSTrainingConfig(data="d").ema_decay == 0.999


def test_training_writes_checkpoints_and_metrics_and_resumes_exactly(tiny_data, tmp_path):
    import emu.stabilizers.sns as sns
    from emu.training.loop import load_checkpoint

    config = _config(tiny_data, epochs=2)
    straight = tmp_path / "straight"
    train_sns(config, straight, **QUIET)
    assert {p.name for p in straight.iterdir()} >= {"last.pt", "best.pt", "metrics.jsonl", "loss.png"}
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for key in ("valid_noise_mse_current", "valid_cross_entropy_previous", "valid_clean_median_level_current",
                "valid_low_level_abs_error_previous"):
        assert np.isfinite(rows[-1][key])
    stopped = tmp_path / "stopped"
    interrupted_run(sns, lambda: train_sns(config, stopped, **QUIET))
    train_sns(config, stopped, resume=True, **QUIET)
    a, b = load_checkpoint(straight / "last.pt", "sns"), load_checkpoint(stopped / "last.pt", "sns")
    assert a["format"] == "emu-sns" and a["anchor_lag"] == 3
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=0, atol=0)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_train(rank, world, port, data, out, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train_sns(_config(data, device="cpu"), out, **QUIET)
    import torch.distributed as dist

    from emu.stabilizers.sns import load_sns

    network = load_sns(os.path.join(out, "last.pt"))[0] if rank == 0 else None
    total = float(sum(p.double().sum() for p in network.parameters())) if network is not None else None
    queue.put((rank, total))
    dist.destroy_process_group()


def test_ddp_training_with_two_gloo_processes(tiny_data, tmp_path):
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = _free_port()
    out = str(tmp_path / "ddp")
    processes = [context.Process(target=_ddp_train, args=(rank, 2, port, str(tiny_data), out, queue))
                 for rank in range(2)]
    for process in processes:
        process.start()
    results = dict(queue.get(timeout=300) for _ in processes)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert np.isfinite(results[0]) and (tmp_path / "ddp" / "last.pt").is_file()


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """An emulator, a thermalizer and an SNS model on the tiny dataset (one epoch each)."""
    from emu.stabilizers.thermalizer import ThermalizerTrainingConfig, train_thermalizer
    from emu.training.trainer import TrainingConfig, train_emulator

    root = tmp_path_factory.mktemp("sns_models")
    train_emulator(TrainingConfig(data=str(tiny_data), arch="drn", preset="small", unroll=1, epochs=1, batch_size=8),
                   root / "emulator", **QUIET)
    train_thermalizer(ThermalizerTrainingConfig(data=str(tiny_data), epochs=1, batch_size=8, num_levels=50,
                                                snapshot_stride=1), root / "thermalizer", **QUIET)
    train_sns(_config(tiny_data), root / "sns", **QUIET)
    return root


def test_the_rollout_engine_runs_the_thermalizer_and_sns_through_one_code_path(trained, tiny_data, tmp_path):
    from emu.stabilizers import load_stabilizer
    from emu.training.rollouts import rollout_to_file

    results = {}
    for spec, options in ((f"thermalizer:{trained / 'thermalizer' / 'last.pt'}", {"s_init": 5, "s_stop": 2, "runaway_level": 40}),
                          (f"sns:{trained / 'sns' / 'last.pt'}", {})):
        results[spec.split(":")[0]] = rollout_to_file(trained / "emulator" / "last.pt", tiny_data,
                                                      tmp_path / f"{spec.split(':')[0]}.h5", trajectories=1, steps=3,
                                                      progress=False, stabilizer=spec, **options)
    sns_result = results["sns"]
    assert sns_result["denoising_steps"].shape == (1, 4) and np.all(sns_result["denoising_steps"][:, 1:] >= 2)
    assert {"predicted_level", "previous_level", "skipped", "runaway"} <= set(sns_result)
    with h5py.File(tmp_path / "sns.h5") as handle:
        assert handle["emu"].attrs["stabilizer"] == "sns" and handle["emu"].attrs["path"] == "A"
        assert handle["emu"]["previous_level"].shape == (1, 4)
    normalizer = Normalizer.from_dataset(tiny_data)
    stabilizer = load_stabilizer(f"sns:{trained / 'sns' / 'last.pt'}", normalizer, "cpu", path="C", mode="generate")
    assert isinstance(stabilizer, SNSStabilizer) and stabilizer.attributes["mode"] == "generate"
    with pytest.raises(ValueError, match="options .*fixed_level.* do not apply to sns"):
        load_stabilizer(f"sns:{trained / 'sns' / 'last.pt'}", normalizer, "cpu", fixed_level=10)


def test_cli_trains_sns_and_rolls_out_with_it(trained, tiny_data, tmp_path):
    from emu.cli import main

    runner = CliRunner()
    out = tmp_path / "cli_sns"
    result = runner.invoke(main, ["train", "sns", "--data", str(tiny_data), "--epochs", "1", "--batch-size", "4",
                                  "--anchor-lag", "3", "--snapshot-stride", "1", "--levels", "50", "--out", str(out),
                                  "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (out / "last.pt").is_file()
    rollout = tmp_path / "r.h5"
    result = runner.invoke(main, ["rollout", "--emulator", str(trained / "emulator" / "last.pt"), "--init", str(tiny_data),
                                  "--trajectories", "1", "--steps", "2", "--out", str(rollout), "--no-progress",
                                  "--stabilizer", f"sns:{out / 'last.pt'}", "--sns-path", "B",
                                  "--activation-threshold", "1000"])
    assert result.exit_code == 0, result.output
    assert "skipped 2 of 2 sample-steps" in result.output
    with h5py.File(rollout) as handle:
        assert handle["emu"].attrs["path"] == "B" and handle["emu"]["skipped"][0, 1:].all()
    result = runner.invoke(main, ["rollout", "--emulator", str(trained / "emulator" / "last.pt"), "--init", str(tiny_data),
                                  "--steps", "2", "--out", str(rollout), "--no-progress",
                                  "--stabilizer", f"sns:{out / 'last.pt'}", "--fixed-level", "5"])
    assert result.exit_code != 0 and "--fixed-level" in result.output and "thermalizer" in result.output
