"""The SNS evidence script (scripts/sns_evidence.py) runs every stage end to end on its smoke preset.

The smoke preset (16² Kolmogorov, one epoch of each model, 12 rollout steps) says nothing about
physics; the test checks that the one command produces its table and figures with consistent
numbers (the same initial states and emulator for every row), and that a rerun resumes.
"""

from __future__ import annotations

import json

import numpy as np
from conftest import load_script



def _load_script():
    return load_script("sns_evidence")


def test_sns_evidence_smoke_run_and_resume(tmp_path, capsys):
    script = _load_script()
    out = tmp_path / "evidence"
    argv = ["--out", str(out), "--preset", "smoke", "--device", "cpu", "--paths", "A,C", "--threshold", "3"]
    assert script.main(argv) == 0
    for name in ("fields.png", "mse.png", "levels.png", "spectra.png", "autocorrelation.png", "sns_calibration.png",
                 "results.json", "results.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    methods = results["methods"]
    thermalized = next(name for name in methods if name.startswith("thermalized, automatic"))
    assert "emulator" in methods
    assert {"SNS, path A", "SNS, path C", "SNS, path A, threshold 3"} <= set(methods)
    steps = results["settings"]["steps"]
    for name, entry in methods.items():
        assert all(0 <= row["stable_horizon"] <= steps + 1 for row in entry["trajectories"])
        if name.startswith("SNS"):
            # network evaluations per step: at least 2 per refined step on path A (s2 + s1 + 2)
            assert all(row["denoising_steps_per_step"] >= 0 for row in entry["trajectories"])
    a, c = methods["SNS, path A"]["summary"], methods["SNS, path C"]["summary"]
    assert a["denoising_steps_per_step"] >= c["denoising_steps_per_step"]  # C walks both frames at once
    goals = results["goals"]
    assert np.isclose(goals["horizon_sns_over_thermalizer"], methods["SNS, path A"]["summary"]["stable_horizon"]
                      / max(methods[thermalized]["summary"]["stable_horizon"], 1.0))
    assert results["generation_cost"]["network_evaluations_per_step"] == 1000
    assert set(results["sns_heads"]) >= {"clean_median_level_previous", "clean_median_level_current"}
    capsys.readouterr()
    trained = {path: path.stat().st_mtime_ns for path in out.glob("*/last.pt")}
    # A rerun resumes: every stage is read back, nothing is trained or rolled out again.
    assert script.main(argv) == 0
    log = capsys.readouterr().out
    assert "trajectories x 12 steps ..." not in log
    assert {path: path.stat().st_mtime_ns for path in out.glob("*/last.pt")} == trained and len(trained) == 3


def test_stabilizer_cost_script_on_the_smoke_folder(tmp_path):
    """scripts/stabilizer_cost.py times every part present in an evidence folder, interleaved."""
    script = _load_script()
    out = tmp_path / "evidence"
    arguments = ["--out", str(out), "--preset", "smoke", "--device", "cpu"]
    assert script.main(arguments) == 0
    cost = load_script("stabilizer_cost")
    assert cost.main(["--folder", str(out), "--rounds", "2", "--steps", "2", "--horizon", "4", "--sampler-steps", "2"]) == 0
    report = json.loads((out / "cost.json").read_text())
    assert {"emulator", "thermalizer (automatic levels)", "SNS path A", "SNS path C"} <= set(report["entries"])
    assert all(entry["median_ms_per_step"] > 0 for entry in report["entries"].values())
