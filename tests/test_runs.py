"""`emu.runs.simulate`: exact restarts, ensembles from one file, blow-up detection."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from emu.backends import get_backend
from emu.data import RestartState, load_restart, read_run
from emu.runs import initial_state, simulate
from emu.solvers import BlowUpError, integrate, make_stepper
from emu.systems import ConfigError, KolmogorovEquation, make_config, make_equation

HALF, SAVE_EVERY = 6, 3
GRIDS = {"kolmogorov": 32, "qg": 16}


def _relative(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module", params=["kolmogorov", "qg"])
def restarted(request, tmp_path_factory):
    """A 2N-step run, and the same run as N steps plus N steps continued from the first file."""
    system = request.param
    folder = tmp_path_factory.mktemp(f"restart_{system}")
    config = make_config(system, grid_size=GRIDS[system])
    common = dict(save_every=SAVE_EVERY, batch=2, seed=1, progress=False)
    whole = simulate(config, out=folder / "whole.h5", steps=2 * HALF, **common)
    first = simulate(config, out=folder / "first.h5", steps=HALF, **common)
    second = simulate(None, out=folder / "second.h5", init=first.path, steps=HALF, **common)
    return {"system": system, "config": config, "whole": whole.path, "first": first.path, "second": second.path}


def test_restart_continues_exactly(restarted):
    whole, second = read_run(restarted["whole"]), read_run(restarted["second"])
    overlap = slice(HALF // SAVE_EVERY, None)  # snapshots of steps N .. 2N
    np.testing.assert_array_equal(second["step"], whole["step"][overlap])
    np.testing.assert_allclose(second["time"], whole["time"][overlap], rtol=1e-14)
    error = _relative(second["fields"], whole["fields"][overlap])
    assert error <= 1e-14, f"{restarted['system']}: restarted run differs from the uninterrupted one by {error:.3g}"
    np.testing.assert_allclose(second["energy"], whole["energy"][overlap], rtol=1e-13)
    assert second["attrs"]["init"] == str(restarted["first"])
    assert second["config"] == whole["config"]
    # The final restart states agree too (so chains of restarts stay exact).
    _, end_whole = load_restart(restarted["whole"])
    _, end_second = load_restart(restarted["second"])
    assert end_second.step == end_whole.step == 2 * HALF and end_second.level == end_whole.level
    assert _relative(end_second.state_hat, end_whole.state_hat) <= 1e-14


def test_restart_without_stepper_memory_would_differ(restarted):
    """Shows the exactness test can fail: AB3 restarted without its history (Euler start-up again)
    leaves the uninterrupted trajectory; the same manual restart with the history stays on it."""
    config, restart = load_restart(restarted["first"])
    equation = make_equation(config, get_backend("numpy"))
    stepper = make_stepper(equation, config.dt)
    target = read_run(restarted["whole"], snapshots=-1)["fields"]

    def continue_from(state_restart):
        state = initial_state(equation, batch=2, seed=1, restart=state_restart)
        state = integrate(stepper, state, HALF, SAVE_EVERY)
        return equation.backend.to_numpy(equation.fields(state.state_hat))

    assert _relative(continue_from(restart), target) <= 1e-14
    forgetful = RestartState(restart.state_hat, {}, 0, restart.step, restart.time)
    error = _relative(continue_from(forgetful), target)
    if restarted["system"] == "qg":
        assert restart.level == HALF and sorted(restart.history) == ["tendency_1", "tendency_2"]
        assert error > 1e-8, f"dropping AB3's history changed the result by only {error:.3g}"
    else:  # CN-RK4 is a one-step method: it has no memory to lose
        assert restart.history == {} and error <= 1e-14


def test_init_replicates_one_member_to_a_batch(tmp_path):
    config = make_config("kolmogorov", grid_size=32)
    single = simulate(config, out=tmp_path / "single.h5", steps=4, save_every=2, batch=1, progress=False)
    alone = read_run(simulate(None, out=tmp_path / "alone.h5", init=single.path, steps=4, save_every=2,
                              progress=False).path)["fields"]
    ensemble = read_run(simulate(None, out=tmp_path / "ensemble.h5", init=single.path, steps=4, save_every=2,
                                 batch=3, progress=False).path)["fields"]
    assert ensemble.shape == (3, 3, 32, 32)
    for member in range(3):
        np.testing.assert_array_equal(ensemble[:, member], alone[:, 0])
    np.testing.assert_array_equal(ensemble[0, 0], read_run(single.path, snapshots=-1)["fields"][0])


def test_perturb_makes_members_differ(tmp_path):
    config = make_config("kolmogorov", grid_size=32)
    single = simulate(config, out=tmp_path / "single.h5", steps=2, save_every=2, progress=False)
    start = read_run(single.path, snapshots=-1)["fields"][0]
    run = read_run(simulate(None, out=tmp_path / "perturbed.h5", init=single.path, steps=4, save_every=2, batch=3,
                            perturb=1e-3, seed=5, progress=False).path)
    fields = run["fields"]
    assert fields.shape == (3, 3, 32, 32) and np.isfinite(fields).all()
    assert run["attrs"]["perturb"] == pytest.approx(1e-3)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert _relative(fields[0, a], fields[0, b]) > 1e-5, f"members {a} and {b} start identical"
    for member in range(3):  # small noise: each member stays near the file's state
        error = _relative(fields[0, member], start)
        assert 1e-5 < error < 1e-2


def test_init_batch_mismatch_and_other_system_are_rejected(tmp_path):
    config = make_config("kolmogorov", grid_size=32)
    pair = simulate(config, out=tmp_path / "pair.h5", steps=2, save_every=2, batch=2, progress=False)
    with pytest.raises(ConfigError, match="batch must be 2"):
        simulate(None, out=tmp_path / "three.h5", init=pair.path, steps=2, batch=3, progress=False)
    with pytest.raises(ConfigError, match="init: .* kolmogorov run on a 32\\^2 grid"):
        simulate(make_config("qg", grid_size=32), out=tmp_path / "qg.h5", init=pair.path, steps=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pair.h5"]


def test_saving_does_not_change_the_trajectory(tmp_path):
    """Snapshots are read from the live solver state; reading must not alter it (e.g. an in-place
    inverse FFT): saving every step or only at the end gives the same final state."""
    config = make_config("kolmogorov", grid_size=32)
    often = simulate(config, out=tmp_path / "often.h5", steps=8, save_every=1, batch=2, progress=False)
    rarely = simulate(config, out=tmp_path / "rarely.h5", steps=8, save_every=8, batch=2, progress=False)
    assert _relative(read_run(often.path, snapshots=-1)["fields"], read_run(rarely.path, snapshots=-1)["fields"]) <= 1e-14


# -- blow-up --------------------------------------------------------------------------------------

def test_cfl_blow_up_at_the_start_keeps_the_initial_snapshot(tmp_path):
    config = make_config("kolmogorov", grid_size=32, dt=0.5)
    out = tmp_path / "blown.h5"
    with pytest.raises(BlowUpError, match="CFL") as caught:
        simulate(config, out=out, steps=20, save_every=5, progress=False)
    assert caught.value.reason == "cfl" and caught.value.step == 0 and caught.value.cfl > config.max_cfl
    run = read_run(out)
    assert run["attrs"]["status"] == "blew_up" and "CFL" in run["attrs"]["message"]
    assert run["fields"].shape[0] >= 1 and list(run["step"]) == [0]
    assert np.isfinite(run["fields"]).all()
    assert load_restart(out)[1].step == 0  # usable by --init with a smaller dt
    assert not list(tmp_path.glob(".*.tmp"))


def test_cfl_blow_up_mid_run_keeps_the_snapshots_before_it(tmp_path):
    # dt 0.03 on 32^2 starts at CFL ~1.02, and the flow speeds up over the next steps.
    config = make_config("kolmogorov", grid_size=32, dt=0.03, max_cfl=1.1)
    out = tmp_path / "blown.h5"
    with pytest.raises(BlowUpError) as caught:
        simulate(config, out=out, steps=60, save_every=1, progress=False)
    error = caught.value
    assert error.reason == "cfl" and error.step > 0
    run = read_run(out)
    assert run["attrs"]["status"] == "blew_up"
    np.testing.assert_array_equal(run["step"], np.arange(error.step))  # every step before the bad one
    assert np.isfinite(run["fields"]).all() and (run["cfl"] <= config.max_cfl).all()
    _, restart = load_restart(out)
    assert restart.step == error.step - 1


def _poison_after(monkeypatch, good_steps: int):
    """Makes Kolmogorov's explicit terms NaN once `good_steps` CN-RK4 steps (5 stages each) are done."""
    original = KolmogorovEquation.explicit_terms
    calls = {"n": 0}

    def explicit_terms(self, omega_hat):
        calls["n"] += 1
        terms = original(self, omega_hat)
        return terms * np.nan if calls["n"] > 5 * good_steps else terms

    monkeypatch.setattr(KolmogorovEquation, "explicit_terms", explicit_terms)
    # The generic stepper calls explicit_terms; the fused CPU one runs its kernels instead. Blow-up
    # detection (emu.solvers.integrate) looks only at the state, whichever stepper made it.
    monkeypatch.setenv("EMU_CPU_FUSED", "0")


def test_non_finite_state_mid_run(tmp_path, monkeypatch):
    _poison_after(monkeypatch, good_steps=7)
    out = tmp_path / "nan.h5"
    with pytest.raises(BlowUpError, match="NaN") as caught:
        simulate(make_config("kolmogorov", grid_size=32), out=out, steps=20, save_every=5, progress=False)
    assert caught.value.reason == "non-finite" and caught.value.step == 10
    run = read_run(out)
    assert run["attrs"]["status"] == "blew_up" and list(run["step"]) == [0, 5]
    assert np.isfinite(run["fields"]).all()


def test_non_finite_state_in_the_last_unsaved_steps_is_caught(tmp_path, monkeypatch):
    """The final snapshot (steps not a multiple of save_every) must be checked before it is saved."""
    _poison_after(monkeypatch, good_steps=6)
    out = tmp_path / "nan.h5"
    with pytest.raises(BlowUpError) as caught:
        simulate(make_config("kolmogorov", grid_size=32), out=out, steps=8, save_every=5, progress=False)
    assert caught.value.reason == "non-finite" and caught.value.step == 8
    run = read_run(out)
    assert run["attrs"]["status"] == "blew_up" and list(run["step"]) == [0, 5]
    assert np.isfinite(run["fields"]).all()


def test_non_finite_init_file(tmp_path):
    good = simulate(make_config("kolmogorov", grid_size=32), out=tmp_path / "good.h5", steps=2, save_every=1,
                    progress=False)
    with h5py.File(good.path, "r+") as handle:
        handle["restart/state_hat"][0, 3, 2] = np.nan
    out = tmp_path / "continued.h5"
    with pytest.raises(BlowUpError) as caught:
        simulate(None, out=out, init=good.path, steps=4, save_every=1, progress=False)
    assert caught.value.reason == "non-finite" and caught.value.step == 0
    run = read_run(out)
    assert run["attrs"]["status"] == "blew_up" and "NaN" in run["attrs"]["message"]
    assert run["fields"].shape[0] == 0  # nothing good to keep


# -- stopping on request (the CLI's SIGTERM/SIGINT) -----------------------------------------------

def test_stop_request_ends_the_run_as_interrupted_with_a_matching_restart(tmp_path):
    polls = []

    def stop():
        polls.append(1)
        return "SIGTERM" if len(polls) >= 3 else None

    out = tmp_path / "stopped.h5"
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        simulate(make_config("qg", grid_size=16), out=out, steps=1000, save_every=2, stop=stop, progress=False)
    run = read_run(out)
    assert run["attrs"]["status"] == "interrupted" and run["attrs"]["message"] == "KeyboardInterrupt: SIGTERM"
    # Polled at every check (every 2 steps here); it stopped at the third, before saving that step.
    assert run["step"].tolist() == [0, 2, 4]
    config, restart = load_restart(out)
    assert restart.step == 4 and restart.level == 4 and sorted(restart.history) == ["tendency_1", "tendency_2"]
    # The restart continues the interrupted run exactly.
    whole = simulate(config, out=tmp_path / "whole.h5", steps=8, save_every=2, progress=False)
    continued = simulate(None, out=tmp_path / "continued.h5", init=out, steps=4, save_every=2, progress=False)
    assert _relative(read_run(continued.path)["fields"], read_run(whole.path)["fields"][2:]) <= 1e-14
