"""What `train`, `tune` and `rollout` do with inputs a user can get wrong: NaN data, damaged or
malicious checkpoints, a missing GPU, an empty split, a used output folder, resumes that change
settings or extend a run. Each failure must be one `Error:` line naming the file or option (exit 1,
no traceback) and must leave earlier results as they were."""

import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from emu.cli import main
from emu.errors import UserError
from emu.training import loop
from emu.training.trainer import TrainingConfig, load_checkpoint, train_emulator
from emu.stabilizers.thermalizer import ThermalizerTrainingConfig, train_thermalizer

QUIET = {"progress": False, "echo": lambda _: None}


def invoke(*arguments):
    return CliRunner().invoke(main, [str(a) for a in arguments])


def assert_one_error_line(result, *fragments):
    """Exit 1 through the CLI's error path: exactly one `Error:` line holding every fragment, no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # not an uncaught exception
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def finite_weights(path: Path) -> bool:
    return all(torch.isfinite(value).all() for value in load_checkpoint(path)["model"].values()
               if value.is_floating_point())


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A one-epoch emulator and a one-epoch thermalizer on the tiny dataset."""
    root = tmp_path_factory.mktemp("trained")
    train_emulator(TrainingConfig(data=str(tiny_data), epochs=1, unroll=1, batch_size=8), root / "run", **QUIET)
    train_thermalizer(ThermalizerTrainingConfig(data=str(tiny_data), epochs=1, batch_size=8), root / "th", **QUIET)
    return root / "run" / "last.pt", root / "th" / "last.pt"


@pytest.fixture
def data_copy(tiny_data, tmp_path):
    return Path(shutil.copytree(tiny_data, tmp_path / "data"))


def write_nan(dataset: Path) -> None:
    """One NaN in the first training file's fields (the stored statistics stay finite)."""
    gc.collect()  # the loaders of an earlier in-process run keep their files open until collected
    train_file = sorted((dataset / "data" / "train").glob("*.hdf5"))[0]
    with h5py.File(train_file, "r+") as handle:
        fields = handle["t0_fields/vorticity"]
        fields[0, 2, 3, 4] = np.nan


# 1. non-finite data, loss or gradients -------------------------------------------------------------

def test_nan_in_the_data_stops_training_with_no_checkpoint_written(data_copy, tmp_path):
    write_nan(data_copy)
    out = tmp_path / "run"
    result = invoke("train", "emulator", "--data", data_copy, "--epochs", "1", "--unroll", "1", "--out", out,
                    "--no-progress")
    assert_one_error_line(result, "epoch 1, batch", "NaN or inf", "no checkpoint was written",
                          f"emu data validate {data_copy}")
    assert "wrote" not in result.output
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists()


def test_nan_in_a_later_epoch_keeps_the_previous_epochs_checkpoints_intact(data_copy, tmp_path):
    out = tmp_path / "run"
    common = ("--data", data_copy, "--unroll", "1", "--batch-size", "4", "--out", out, "--no-progress")
    assert invoke("train", "emulator", "--epochs", "1", *common).exit_code == 0
    before = {name: digest(out / name) for name in ("last.pt", "best.pt", "metrics.jsonl")}
    write_nan(data_copy)
    result = invoke("train", "emulator", "--epochs", "2", "--resume", *common)
    assert_one_error_line(result, "epoch 2, batch", f"{out / 'last.pt'} still holds epoch 1", "emu data validate")
    assert {name: digest(out / name) for name in before} == before
    assert load_checkpoint(out / "last.pt")["epoch"] == 1 and finite_weights(out / "last.pt")


class Scale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))


class Objective(torch.nn.Module):
    """Mean square of weight * batch; call `bad_call` returns NaN (`kind="loss"`) or a finite loss
    whose gradient is NaN (`kind="gradient"`: d sqrt(0 w)/dw = 0 / 0)."""

    def __init__(self, module, bad_call, kind):
        super().__init__()
        self.module, self.bad_call, self.kind, self.calls = module, bad_call, kind, 0

    def forward(self, batch):
        self.calls += 1
        loss = (self.module.weight * batch).pow(2).mean()
        if self.calls == self.bad_call:
            return loss * float("nan") if self.kind == "loss" else loss + (0 * self.module.weight).sqrt()
        return loss


@pytest.mark.parametrize("kind, problem", [("loss", "the loss is nan"), ("gradient", "the gradients are not finite")])
def test_diverging_optimisation_on_finite_data_stops_before_the_step(tmp_path, kind, problem):
    module = Scale()
    job = loop.Job(module=module, objective=Objective(module, bad_call=5, kind=kind),
                   train_set=[torch.full((3,), float(i)) for i in range(6)], evaluate=lambda _: {})
    config = loop.OptimisationSettings(data="somewhere", epochs=2, batch_size=2, lr=1e-2)
    with pytest.raises(loop.NonFiniteTraining) as caught:
        loop.fit(job, config, loop.Context(torch.device("cpu")), tmp_path / "out", kind="emulator", **QUIET)
    message = str(caught.value)
    assert "epoch 2, batch 2 of 3" in message and problem in message and "diverged" in message
    assert "--lr (now 0.01)" in message and "still holds epoch 1" in message
    assert torch.isfinite(module.weight).all()  # the bad step never reached the optimizer
    assert load_checkpoint(tmp_path / "out" / "last.pt")["epoch"] == 1


# 2. truncated and malicious checkpoints -----------------------------------------------------------

def truncated_copy(path: Path, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / path.name
    data = path.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


def test_truncated_checkpoints_are_one_line_naming_the_file(trained, tiny_data, tmp_path):
    emulator, thermalizer = trained
    bad_emulator = truncated_copy(emulator, tmp_path / "bad_run")
    bad_thermalizer = truncated_copy(thermalizer, tmp_path / "bad_th")
    expected = "truncated or not a torch checkpoint"
    out = tmp_path / "r.h5"
    result = invoke("rollout", "--emulator", bad_emulator, "--init", tiny_data, "--trajectories", "1", "--steps", "1",
                    "--out", out, "--no-progress")
    assert_one_error_line(result, str(bad_emulator), expected)
    result = invoke("rollout", "--emulator", emulator, "--thermalizer", bad_thermalizer, "--init", tiny_data,
                    "--trajectories", "1", "--steps", "1", "--out", out, "--no-progress")
    assert_one_error_line(result, str(bad_thermalizer), expected)
    assert not out.exists()
    for pair in ((bad_emulator, thermalizer), (emulator, bad_thermalizer)):
        result = invoke("tune", "thermalizer", "--emulator", pair[0], "--thermalizer", pair[1], "--init", tiny_data,
                        "--s-init", "8", "--s-stop", "3", "--trajectories", "1", "--steps", "2", "--no-progress")
        assert_one_error_line(result, str(next(p for p in pair if "bad" in str(p))), expected)
    result = invoke("train", "emulator", "--data", tiny_data, "--epochs", "2", "--unroll", "1", "--batch-size", "8",
                    "--out", bad_emulator.parent, "--resume", "--no-progress")
    assert_one_error_line(result, str(bad_emulator), expected)
    # A text file is no checkpoint either (torch.load raises KeyError on it).
    text = tmp_path / "notes.pt"
    text.write_text("hello\n")
    with pytest.raises(UserError, match="notes.pt: truncated or not a torch checkpoint"):
        load_checkpoint(text)


class Payload:
    """A pickled object that would run a command when unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_with_pickled_objects_is_refused_without_torchs_advice(tiny_data, tmp_path):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "emu-emulator", "model": {}, "hook": Payload(marker)}, evil)
    for debug in ([], ["--debug"]):
        completed = subprocess.run(
            [sys.executable, "-m", "emu.cli", *debug, "rollout", "--emulator", str(evil), "--init", str(tiny_data),
             "--out", str(tmp_path / "r.h5"), "--no-progress"],
            capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        output = completed.stdout + completed.stderr
        assert completed.returncode == 1, output
        assert (f"refused: {evil} is not a plain checkpoint (it holds pickled Python objects, which emu never loads)"
                in output)
        assert "weights_only" not in output and "Re-running" not in output and "Warning" not in output, output
        if not debug:
            assert "Traceback" not in output and len([l for l in output.splitlines() if l.startswith("Error:")]) == 1
    assert not marker.exists()


# 3. devices -------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_cuda_without_a_gpu_is_one_line_before_any_work(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = invoke("train", "emulator", "--data", tiny_data, "--epochs", "1", "--device", "cuda", "--out", out,
                    "--no-progress")
    assert_one_error_line(result, "--device cuda", "no CUDA device", "use --device cpu")
    assert not out.exists()


def test_a_malformed_device_is_one_line_naming_the_allowed_values(trained, tiny_data, tmp_path):
    expected = "--device must be 'cpu', 'cuda' or 'cuda:N', got 'gpu'"
    result = invoke("train", "thermalizer", "--data", tiny_data, "--epochs", "1", "--device", "gpu",
                    "--out", tmp_path / "th", "--no-progress")
    assert_one_error_line(result, expected)
    result = invoke("rollout", "--emulator", trained[0], "--init", tiny_data, "--device", "gpu",
                    "--out", tmp_path / "r.h5", "--no-progress")
    assert_one_error_line(result, expected)
    with pytest.raises(ValueError, match="cuda:N"):
        loop.resolve_device("cuda:x")


# 4. no silent fallback to another split ---------------------------------------------------------

def test_an_empty_split_is_an_error_naming_the_splits_with_data(trained, data_copy, tmp_path):
    shutil.rmtree(data_copy / "data" / "valid")
    emulator, thermalizer = trained
    result = invoke("rollout", "--emulator", emulator, "--init", data_copy, "--split", "valid", "--trajectories", "1",
                    "--steps", "1", "--out", tmp_path / "r.h5", "--no-progress")
    assert_one_error_line(result, "--split valid", "no valid trajectories", "splits with data: train, test")
    assert not (tmp_path / "r.h5").exists()
    result = invoke("tune", "thermalizer", "--emulator", emulator, "--thermalizer", thermalizer, "--init", data_copy,
                    "--split", "valid", "--s-init", "8", "--s-stop", "3", "--steps", "2", "--no-progress")
    assert_one_error_line(result, "--split valid", "splits with data: train, test")


# 5. a used output folder ------------------------------------------------------------------------

def test_training_into_a_used_folder_needs_resume_or_overwrite(tiny_data, tmp_path):
    out = tmp_path / "run"
    common = ("train", "emulator", "--data", tiny_data, "--epochs", "1", "--unroll", "1", "--batch-size", "8",
              "--out", out, "--no-progress")
    assert invoke(*common).exit_code == 0
    (out / "notes.txt").write_text("mine\n")
    before = digest(out / "last.pt")
    result = invoke(*common)
    assert_one_error_line(result, f"--out {out} already holds", "last.pt", "--resume", "--overwrite")
    assert digest(out / "last.pt") == before and len((out / "metrics.jsonl").read_text().splitlines()) == 1
    result = invoke(*common, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (f"--overwrite: deleted last.pt, best.pt, metrics.jsonl, loss.png in {out} (other files kept: notes.txt)"
            in result.output)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # a new run, not appended to the old one
    assert (out / "notes.txt").read_text() == "mine\n"
    assert_one_error_line(invoke(*common, "--overwrite", "--resume"), "--resume", "--overwrite")
    # A folder holding only someone else's file is not emu's to fill either.
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="already holds keep.txt"):
        train_emulator(TrainingConfig(data=str(tiny_data), epochs=1, unroll=1), other, **QUIET)


# 6. resume: named differences, extending a run, nothing to resume --------------------------------

def test_resume_names_every_differing_setting(tiny_data, tmp_path):
    out = tmp_path / "run"
    common = ("train", "emulator", "--data", tiny_data, "--epochs", "1", "--batch-size", "8", "--out", out,
              "--no-progress")
    assert invoke(*common, "--unroll", "1").exit_code == 0
    result = invoke(*common, "--unroll", "2", "--lr", "1e-3", "--resume")
    line = assert_one_error_line(result, f"--resume: {out / 'last.pt'} was trained with other settings")
    assert "lr (--lr): 0.0005 in the checkpoint, 0.001 now" in line
    assert "unroll (--unroll): 1 in the checkpoint, 2 now" in line
    assert "batch_size" not in line and "device" not in line


def test_resume_with_more_epochs_extends_a_finished_run(tiny_data, tmp_path):
    out = tmp_path / "run"
    common = ("train", "emulator", "--data", tiny_data, "--unroll", "1", "--batch-size", "8", "--out", out,
              "--no-progress")
    assert invoke(*common, "--epochs", "1").exit_code == 0
    assert load_checkpoint(out / "last.pt")["history"][-1]["lr"] == 0  # cosine: a finished run ends at lr 0
    # --device may differ on resume: it says where the run executes, not what it computes.
    result = invoke(*common, "--epochs", "2", "--resume", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "extending" in result.output and "from 0 to 0.00025 now and decays to 0 at epoch 2" in result.output
    payload = load_checkpoint(out / "last.pt")
    assert payload["epoch"] == 2 and payload["training"]["epochs"] == 2
    assert [row["epoch"] for row in payload["history"]] == [1, 2] and finite_weights(out / "last.pt")
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    before = digest(out / "last.pt")
    result = invoke(*common, "--epochs", "2", "--resume")
    assert result.exit_code == 0 and "nothing to do" in result.output and digest(out / "last.pt") == before
    result = invoke(*common, "--epochs", "1", "--resume")
    assert_one_error_line(result, "--epochs 1", "has already trained 2 epochs", "--epochs 2 or more")
    assert digest(out / "last.pt") == before


def test_resume_without_a_checkpoint_is_an_error(tiny_data, tmp_path):
    out = tmp_path / "never"
    result = invoke("train", "emulator", "--data", tiny_data, "--epochs", "1", "--out", out, "--resume", "--no-progress")
    assert_one_error_line(result, f"--resume: {out / 'last.pt'} does not exist", "leave out --resume")
