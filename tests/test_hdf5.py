"""The emu run file: what `emu.runs.simulate` writes, read back through `emu.data`; atomic writes.

Runs are tiny (16-32 points, a dozen steps) and shared per module, so the whole file takes seconds.
"""

from __future__ import annotations

import json
import os
import stat

import h5py
import numpy as np
import pytest

import emu
from emu.backends import get_backend
from emu.data import RestartState, SnapshotWriter, load_restart, read_config, read_run
from emu.data.hdf5 import default_file_mode
from emu.runs import simulate
from emu.spectral import downsample
from emu.systems import make_config, make_equation

STEPS, SAVE_EVERY, BATCH = 12, 4, 2
# Solver grid and saved grid per system: 32 -> 16 for Kolmogorov (16 is too coarse for its solver),
# 16 -> 8 for QG (fine at 16: its default start is weak noise).
GRIDS = {"kolmogorov": (32, 16), "qg": (16, 8)}


@pytest.fixture(scope="module", params=["kolmogorov", "qg"])
def runs(request, tmp_path_factory):
    """One system run twice from the same seed: saved at solver resolution and downsampled."""
    system = request.param
    solver_size, saved_size = GRIDS[system]
    folder = tmp_path_factory.mktemp(system)
    config = make_config(system, grid_size=solver_size)
    common = dict(steps=STEPS, save_every=SAVE_EVERY, batch=BATCH, seed=3, progress=False)
    full = simulate(config, out=folder / "full.h5", **common)
    coarse = simulate(config, out=folder / "coarse.h5", downsample=saved_size, **common)
    return {"system": system, "config": config, "full": full, "coarse": coarse, "saved_size": saved_size}


def test_fields_shape_dtype_time_and_step(runs):
    config, saved_size = runs["config"], runs["saved_size"]
    layers = (2,) if runs["system"] == "qg" else ()
    snapshots = STEPS // SAVE_EVERY + 1
    for result, size in ((runs["full"], config.grid_size), (runs["coarse"], saved_size)):
        run = read_run(result.path)
        assert run["fields"].shape == (snapshots, BATCH) + layers + (size, size)
        assert run["fields"].dtype == np.float64
        assert np.isfinite(run["fields"]).all()
        np.testing.assert_array_equal(run["step"], np.arange(0, STEPS + 1, SAVE_EVERY))
        assert run["step"].dtype == np.int64 and run["time"].dtype == np.float64
        np.testing.assert_allclose(run["time"], run["step"] * config.dt, rtol=1e-14, atol=0)
        assert result.snapshots == snapshots and result.status == "complete"
        assert result.model_time == pytest.approx(STEPS * config.dt, rel=1e-14)


def test_config_and_attributes(runs):
    config = runs["config"]
    path = runs["coarse"].path
    run = read_run(path)
    assert run["config"] == config.to_dict()
    assert read_config(path) == config
    attrs = run["attrs"]
    assert attrs["format"] == "emu-run"
    assert attrs["emu_version"] == emu.__version__
    assert attrs["system"] == runs["system"]
    assert attrs["backend"] == "numpy" and attrs["device"] == "cpu" and attrs["dtype"] == "float64"
    assert attrs["status"] == "complete" and attrs["message"] == ""
    assert attrs["snapshots"] == STEPS // SAVE_EVERY + 1
    assert attrs["solver_grid_size"] == config.grid_size and attrs["grid_size"] == runs["saved_size"]
    assert attrs["save_every"] == SAVE_EVERY and attrs["seed"] == 3
    equation = make_equation(config, get_backend("numpy"))
    assert json.loads(attrs["field_names"]) == list(equation.field_names)
    assert json.loads(attrs["field_units"]) == list(equation.field_units)
    assert attrs["stepper"] == equation.default_stepper


def test_diagnostics_shapes_and_values(runs):
    for result in (runs["full"], runs["coarse"]):
        run = read_run(result.path)
        snapshots = STEPS // SAVE_EVERY + 1
        assert run["energy"].shape == (snapshots, BATCH)
        assert run["enstrophy"].shape == (snapshots, BATCH)
        assert run["cfl"].shape == (snapshots,)
        assert (run["energy"] > 0).all() and (run["enstrophy"] > 0).all() and (run["cfl"] > 0).all()
        np.testing.assert_allclose(run["energy"][-1], result.energy, rtol=1e-12)
    # The diagnostics come from the solver state, so they do not depend on the saved resolution.
    np.testing.assert_array_equal(read_run(runs["full"].path)["energy"], read_run(runs["coarse"].path)["energy"])


def test_every_dataset_has_long_name_and_units(runs):
    seen = []

    def visit(name, item):
        if isinstance(item, h5py.Dataset) and not name.startswith("restart"):
            seen.append(name)
            assert item.attrs.get("long_name"), f"{name} lacks long_name"
            assert item.attrs.get("units"), f"{name} lacks units"

    with h5py.File(runs["coarse"].path, "r") as handle:
        handle.visititems(visit)
        assert json.loads(handle["fields"].attrs["dimensions"])[-2:] == ["y", "x"]
    assert sorted(seen) == ["diagnostics/cfl", "diagnostics/energy", "diagnostics/enstrophy", "fields", "step", "time"]


def test_downsampled_fields_equal_spectral_downsample_of_full_run(runs):
    full = read_run(runs["full"].path)["fields"]
    coarse = read_run(runs["coarse"].path)["fields"]
    expected = downsample(full, runs["saved_size"])
    assert coarse.shape == expected.shape
    error = np.abs(coarse - expected).max() / np.abs(expected).max()
    assert error < 1e-12, f"downsampled snapshots differ from downsample(full) by {error:.3g} (relative)"
    # ... and the truncation really removed something (the test would notice a plain copy).
    assert np.abs(downsample(full, full.shape[-1] // 2) - full[..., ::2, ::2]).max() > 1e-6 * np.abs(full).max()


def test_restart_group_matches_last_snapshot(runs):
    config, restart = load_restart(runs["full"].path)
    assert config == runs["config"]
    assert restart.step == STEPS and restart.time == pytest.approx(STEPS * config.dt, rel=1e-14)
    assert restart.level == STEPS
    layers = (2,) if runs["system"] == "qg" else ()
    n = config.grid_size
    assert restart.state_hat.shape == (BATCH,) + layers + (n, n // 2 + 1)
    assert restart.state_hat.dtype == np.complex128
    last = read_run(runs["full"].path, snapshots=-1)["fields"]
    np.testing.assert_allclose(np.fft.irfft2(restart.state_hat, s=(n, n)), last, rtol=0, atol=1e-12 * np.abs(last).max())
    if runs["system"] == "qg":  # AB3 keeps its two previous tendencies
        assert sorted(restart.history) == ["tendency_1", "tendency_2"]
        assert all(h.shape == restart.state_hat.shape for h in restart.history.values())
    else:
        assert restart.history == {}


def test_read_run_selects_snapshots(runs):
    path = runs["coarse"].path
    whole = read_run(path)
    last = read_run(path, snapshots=-1)
    np.testing.assert_array_equal(last["fields"], whole["fields"][-1])
    assert last["step"] == whole["step"][-1]
    part = read_run(path, snapshots=slice(1, 3))
    assert part["fields"].shape[0] == 2 and list(part["step"]) == list(whole["step"][1:3])


def test_float32_output(tmp_path):
    config = make_config("kolmogorov", grid_size=32)
    result = simulate(config, out=tmp_path / "f32.h5", dtype="float32", steps=4, save_every=2, progress=False)
    run = read_run(result.path)
    assert run["fields"].dtype == np.float32 and run["attrs"]["dtype"] == "float32"
    assert np.isfinite(run["fields"]).all()
    _, restart = load_restart(result.path)
    assert restart.state_hat.dtype == np.complex128  # restart state always stored in full precision


def test_reading_a_file_that_is_not_an_emu_run(tmp_path):
    from emu.errors import UserError

    with pytest.raises(FileNotFoundError, match="no such emu run file"):
        read_run(tmp_path / "missing.h5")
    with h5py.File(tmp_path / "other.h5", "w") as handle:
        handle["x"] = np.zeros(3)
    with pytest.raises(UserError, match="not an emu run file"):
        read_run(tmp_path / "other.h5")
    (tmp_path / "notes.h5").write_text("not HDF5 at all\n")
    with pytest.raises(UserError, match="notes.h5: not a readable emu run file .no HDF5 signature"):
        load_restart(tmp_path / "notes.h5")


# -- atomic writes --------------------------------------------------------------------------------

def _writer(path, batch=1):
    config = make_config("kolmogorov", grid_size=16)
    return SnapshotWriter(path, config=config, field_names=("vorticity",), field_units=("1/time",),
                          snapshot_shape=(batch, 16, 16), dtype="float64", attrs={"backend": "numpy"})


def _append(writer, value, step):
    writer.append(np.full((1, 16, 16), value), time=0.1 * step, step=step, energy=[1.0], enstrophy=[2.0], cfl=0.5)


def test_writer_abort_leaves_no_file_and_no_temporary(tmp_path):
    writer = _writer(tmp_path / "run.h5")
    assert writer.temporary.exists() and writer.temporary.parent == tmp_path
    assert writer.temporary.name.startswith(".run.h5.") and writer.temporary.name.endswith(".tmp")
    assert not (tmp_path / "run.h5").exists()  # nothing at the final name while writing
    _append(writer, 1.0, 0)
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_writer_abort_keeps_an_existing_file_untouched(tmp_path):
    path = tmp_path / "run.h5"
    path.write_bytes(b"the previous run")
    writer = _writer(path)
    _append(writer, 1.0, 0)
    writer.abort()
    assert path.read_bytes() == b"the previous run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5"]


def test_writer_close_replaces_the_file_atomically_with_status(tmp_path):
    path = tmp_path / "run.h5"
    path.write_bytes(b"the previous run")
    writer = _writer(path)
    for step in range(3):
        _append(writer, float(step), step)
    assert path.read_bytes() == b"the previous run"  # replaced only on close
    writer.set_restart(RestartState(np.zeros((1, 16, 9), complex), {}, 0, 2, 0.2))
    writer.close("interrupted", "KeyboardInterrupt: test")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5"]
    run = read_run(path)
    assert run["attrs"]["status"] == "interrupted" and run["attrs"]["snapshots"] == 3
    assert run["attrs"]["message"] == "KeyboardInterrupt: test"
    np.testing.assert_array_equal(run["fields"][:, 0, 0, 0], [0.0, 1.0, 2.0])
    assert load_restart(path)[1].step == 2
    with pytest.raises(ValueError, match="status must be one of"):
        _writer(tmp_path / "other.h5").close("finished")


def test_close_drops_the_rows_of_an_append_cut_short(tmp_path):
    """An append interrupted after growing the datasets (a second Ctrl-C) must not leave ragged data."""
    writer = _writer(tmp_path / "run.h5")
    _append(writer, 1.0, 0)
    _append(writer, 2.0, 1)
    writer.fields.resize(3, axis=0)  # what `append` does first, before writing and counting
    writer._time.resize(3, axis=0)
    writer.close("interrupted")
    run = read_run(tmp_path / "run.h5")
    assert run["fields"].shape[0] == len(run["time"]) == len(run["step"]) == run["energy"].shape[0] == 2
    assert run["attrs"]["snapshots"] == 2


def test_writer_context_manager_marks_failures(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with _writer(tmp_path / "failed.h5") as writer:
            _append(writer, 1.0, 0)
            raise RuntimeError("boom")
    with pytest.raises(KeyboardInterrupt):
        with _writer(tmp_path / "stopped.h5") as writer:
            _append(writer, 1.0, 0)
            raise KeyboardInterrupt
    failed, stopped = read_run(tmp_path / "failed.h5"), read_run(tmp_path / "stopped.h5")
    assert failed["attrs"]["status"] == "failed" and "boom" in failed["attrs"]["message"]
    assert stopped["attrs"]["status"] == "interrupted"
    assert failed["fields"].shape == (1, 1, 16, 16)
    assert not list(tmp_path.glob(".*.tmp"))


def test_output_file_has_the_usual_permissions(tmp_path):
    """The temporary file comes from mkstemp (mode 0600); the finished file must read like any other."""
    previous = os.umask(0o022)
    try:
        assert default_file_mode() == 0o644
        result = simulate(make_config("qg", grid_size=16), out=tmp_path / "q.h5", steps=2, save_every=1, progress=False)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(result.path.stat().st_mode) == 0o644


def test_small_files_and_checkpoints_have_the_usual_permissions(tmp_path):
    """results.json/md (write_text_atomically) and checkpoints (save_atomically) also come from mkstemp."""
    from emu.data.atomic import write_text_atomically
    from emu.training.loop import save_atomically

    previous = os.umask(0o022)
    try:
        text = write_text_atomically(tmp_path / "results.md", "# results\n")
        save_atomically({"kind": "test"}, tmp_path / "last.pt")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(text.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "last.pt").stat().st_mode) == 0o644
    assert not list(tmp_path.glob(".*.tmp"))
