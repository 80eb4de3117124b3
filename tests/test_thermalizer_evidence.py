"""The Thermalizer evidence script (scripts/thermalizer_evidence.py) runs every stage end to end.

Its `smoke` preset (16² Kolmogorov, one epoch of each model, 12 rollout steps) says nothing about
physics; the test checks that the one command produces its figures, its table and consistent
numbers, and that a second run resumes from the saved stages instead of redoing them.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "thermalizer_evidence.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("thermalizer_evidence", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evidence_script_smoke_run_and_resume(tmp_path, capsys):
    script = _load_script()
    out = tmp_path / "evidence"
    assert script.main(["--out", str(out), "--preset", "smoke", "--device", "cpu"]) == 0
    for name in ("figure1.png", "mse.png", "results.json", "results.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    steps = results["settings"]["steps"]
    for name in ("emulator", "thermalized"):
        horizons = results["runs"][name]["stable_horizon"]
        assert len(horizons) == results["settings"]["reference_trajectories"]
        assert all(0 <= h <= steps + 1 for h in horizons)
    thermalized = results["runs"]["thermalized"]
    assert 0.0 <= thermalized["fraction_steps_thermalized"] <= 1.0
    assert np.isclose(results["horizon_ratio"], thermalized["stable_horizon_mean"]
                      / max(results["runs"]["emulator"]["stable_horizon_mean"], 1.0))
    assert results["classifier_cost"]["classifier_fraction"] > 0
    assert len(results["spectra"]["solver"]) == len(results["wavenumbers"]) == 8  # shells 1..n/2 at 16²
    assert "| thermalized |" in (out / "results.md").read_text()

    # A second run finds every stage done: no training, no rollouts, the same table.
    first = (out / "results.json").read_text()
    emulator_mtime = (out / "emulator" / "best.pt").stat().st_mtime
    assert script.main(["--out", str(out), "--preset", "smoke", "--device", "cpu"]) == 0
    assert (out / "emulator" / "best.pt").stat().st_mtime == emulator_mtime
    again = json.loads((out / "results.json").read_text())
    assert again["runs"]["emulator"]["stable_horizon"] == json.loads(first)["runs"]["emulator"]["stable_horizon"]
