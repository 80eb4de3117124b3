"""emu's QG model against pyqg 0.7.2 on the same configuration and initial condition.

The fixtures come from `scripts/pyqg_reference.py`, run in a side environment with pyqg 0.7.2
(pyqg does not build against numpy 2). pyqg itself is not bit-reproducible run to run (FFTW's
planner): its two runs differ by ~3e-16 relative at step 1 and ~4e-15 at step 200, so emu is held
to round-off-sized tolerances, not to bit equality.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from emu.backends import get_backend
from emu.solvers import make_stepper
from emu.systems import make_config, make_equation

FIXTURES = Path(__file__).parent / "fixtures"
CASES = ["pyqg_qg_eddy_n64.npz", "pyqg_qg_jet_n64.npz", "pyqg_qg_eddy_n32.npz"]


def _relative(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def _emu_equation(reference, backend="numpy"):
    params = json.loads(str(reference["params_json"]))
    config = make_config("qg", params["case"], grid_size=int(params["nx"]), dt=float(reference["dt"]))
    # The fixture's parameters must be the preset's: this guards the presets themselves.
    assert config.beta == params["beta"] and config.bottom_drag == params["rek"]
    assert config.layer_depth_ratio == params["delta"] and config.deformation_radius == params["rd"]
    assert config.upper_layer_velocity == params["U1"] and config.filter_factor == params["filterfac"]
    return make_equation(config, get_backend(backend))


@pytest.mark.parametrize("name", CASES)
def test_inversion_filter_and_tendency_match_pyqg(name):
    reference = np.load(FIXTURES / name)
    equation = _emu_equation(reference)
    q_hat = equation.to_state(reference["q0"][np.newaxis])
    np.testing.assert_allclose(equation.backend.to_numpy(equation.step_filter), reference["filtr"], rtol=0, atol=1e-14)
    psi_hat = equation.streamfunction_hat(q_hat)[0]
    assert _relative(psi_hat, reference["ph0"]) < 1e-13
    tendency = equation.explicit_terms(q_hat)[0]
    assert _relative(tendency, reference["dqhdt0"]) < 1e-13
    assert equation.cfl(q_hat) == pytest.approx(float(reference["cfl0"]), rel=1e-12)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("name", CASES)
def test_trajectory_matches_pyqg_to_roundoff(name, backend):
    """200 steps through pyqg's forward-Euler / AB2 start-up and AB3, filter every step."""
    reference = np.load(FIXTURES / name)
    equation = _emu_equation(reference, backend)
    stepper = make_stepper(equation, equation.config.dt)
    state = stepper.init(equation.to_state(reference["q0"][np.newaxis]))
    done = 0
    for target, expected in zip(reference["steps"], reference["q"]):
        while done < target:
            state = stepper.step(state)
            done += 1
        q = equation.backend.to_numpy(equation.fields(state.state_hat))[0]
        error = _relative(q, expected)
        assert error < 1e-12, f"step {target}: relative max error {error:.2e}"
    # The trajectory moved far from its start, so agreement is not trivially the initial field.
    assert _relative(q, reference["q0"]) > 0.5
