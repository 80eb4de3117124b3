"""The Cohesion evidence script (scripts/cohesion_evidence.py) runs every stage end to end on its smoke
preset (16² Kolmogorov, one epoch of each model, an 8-step horizon; says nothing about physics) and
resumes: the table has every row, the goals are computed from the table's own numbers."""

from __future__ import annotations

import json

import numpy as np
from conftest import load_script



def _load_script():
    return load_script("cohesion_evidence")


def test_cohesion_evidence_smoke_run_and_resume(tmp_path, capsys):
    script = _load_script()
    out = tmp_path / "evidence"
    assert script.main(["--out", str(out), "--preset", "smoke", "--device", "cpu"]) == 0
    comparison = out / "cohesion_h8"
    for name in ("results.md", "results.json", "fields.png", "mse.png", "spectra.png"):
        assert (comparison / name).is_file(), name
    results = json.loads((comparison / "results.json").read_text())
    methods = results["methods"]
    assert {"emulator", "Koopman prior alone", "Cohesion, plan (R = T)", "Cohesion, autoregressive (R = 1)",
            "Cohesion, plan, stride-1 windows", "Cohesion, plan, fixed sigma_y",
            "Cohesion, plan, eps-prediction score"} <= set(methods)
    checks = json.loads((out / "score_check.json").read_text())
    assert set(checks) == {"score", "score_eps"} and all(c["sample_rms"] > 0 for c in checks.values())
    plan_settings = json.loads(json.dumps(methods["Cohesion, plan (R = T)"]["options"]))["forecast"]
    assert plan_settings["settings"]["window_stride"] == 2 and plan_settings["calibrate_on"].endswith("data")
    for entry in methods.values():
        assert len(entry["trajectories"]) == results["trajectories"]
        assert {"rmse_mean", "ms_ssim_mean", "spectral_divergence_last_half"} <= set(entry["summary"])
    goals = results["goals"]
    plan, autoregressive = methods["Cohesion, plan (R = T)"], methods["Cohesion, autoregressive (R = 1)"]
    assert np.isclose(goals["speedup_plan_over_autoregressive"],
                      autoregressive["seconds_per_step"] / plan["seconds_per_step"])
    assert "Forecast skill" in (comparison / "results.md").read_text()
    trained = {path: path.stat().st_mtime_ns for path in out.glob("*/last.pt")}
    capsys.readouterr()
    assert script.main(["--out", str(out), "--preset", "smoke", "--device", "cpu"]) == 0
    assert "trajectories x 8 steps ..." not in capsys.readouterr().out
    assert {path: path.stat().st_mtime_ns for path in out.glob("*/last.pt")} == trained


def test_stabilizer_cost_script_on_the_smoke_folder(tmp_path):
    """scripts/stabilizer_cost.py times every part present in an evidence folder, interleaved."""
    script = _load_script()
    out = tmp_path / "evidence"
    arguments = ["--out", str(out), "--preset", "smoke", "--device", "cpu"]
    assert script.main(arguments) == 0
    cost = load_script("stabilizer_cost")
    assert cost.main(["--folder", str(out), "--rounds", "2", "--steps", "2", "--horizon", "4", "--sampler-steps", "2"]) == 0
    report = json.loads((out / "cost.json").read_text())
    assert {"emulator", "Cohesion plan", "Cohesion autoregressive"} <= set(report["entries"])
    assert report["cohesion_speedup_plan_over_autoregressive"] > 0
    assert all(entry["median_ms_per_step"] > 0 for entry in report["entries"].values())
