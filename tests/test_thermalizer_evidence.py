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
    assert script.main(["--out", str(out), "--preset", "smoke", "--device", "cpu", "--diagnostics"]) == 0
    for name in ("fields.png", "mse.png", "levels.png", "spectra.png", "calibration.png", "results.json", "results.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    steps, count = results["settings"]["steps"], results["settings"]["reference_trajectories"]
    methods = results["methods"]
    assert "emulator" in methods and any(name.startswith("thermalized, automatic") for name in methods)
    assert any(name.startswith("fixed level") for name in methods) and any("as-is" in name for name in methods)
    for name, entry in methods.items():
        rows = entry["trajectories"]
        assert len(rows) == count
        assert all(0 <= row["stable_horizon"] <= steps + 1 for row in rows)
        assert np.isclose(entry["summary"]["stable_horizon"], np.mean([row["stable_horizon"] for row in rows]))
        assert entry["seconds_per_step"] > 0
        if name != "emulator":
            assert all(0 <= row["denoising_steps_per_step"] for row in rows)
    automatic = next(name for name in methods if name.startswith("thermalized, automatic"))
    assert np.isclose(results["horizon_ratios"][automatic], methods[automatic]["summary"]["stable_horizon"]
                      / max(methods["emulator"]["summary"]["stable_horizon"], 1.0))
    assert results["classifier_cost"]["classifier_fraction"] > 0
    assert set(results["calibration"]) >= {"clean_median_level", "low_level_abs_error"}
    assert results["automatic_levels"]["s_stop"] < results["automatic_levels"]["s_init"]
    table = (out / "results.md").read_text()
    assert "| emulator |" in table and "| thermalized, automatic" in table

    # A second run finds every stage done: no training, no rollouts, the same table.
    first = json.loads((out / "results.json").read_text())
    emulator_mtime = (out / "emulator" / "best.pt").stat().st_mtime
    rollout_mtime = (out / "rollout_emulator.h5").stat().st_mtime
    assert script.main(["--out", str(out), "--preset", "smoke", "--device", "cpu", "--diagnostics"]) == 0
    assert (out / "emulator" / "best.pt").stat().st_mtime == emulator_mtime
    assert (out / "rollout_emulator.h5").stat().st_mtime == rollout_mtime
    again = json.loads((out / "results.json").read_text())
    assert again["methods"]["emulator"]["trajectories"] == first["methods"]["emulator"]["trajectories"]


def test_evidence_script_runs_for_qg(tmp_path):
    script = _load_script()
    out = tmp_path / "evidence-qg"
    assert script.main(["--out", str(out), "--system", "qg", "--preset", "smoke", "--device", "cpu"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["system"] == "qg" and results["preset"] == "smoke-qg"
    assert {"emulator"} < set(results["methods"])
    for entry in results["methods"].values():
        assert len(entry["trajectories"]) == results["settings"]["reference_trajectories"]
    assert "Thermalizer evidence (qg)" in (out / "results.md").read_text()
    assert (out / "spectra.png").stat().st_size > 0
