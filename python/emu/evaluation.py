"""The evaluation harness: every stabiliser judged the same way, on the same emulator, data and states.

    from emu.evaluation import compare_stabilizers
    results = compare_stabilizers("run/best.pt", "reference/", "evidence/", {
        "emulator": None,                                                    # bare emulator
        "thermalized": {"stabilizer": "thermalizer:th/last.pt"},            # levels from its file
        "thermalized (7, 4)": {"stabilizer": "thermalizer:th/last.pt", "s_init": 7, "s_stop": 4},
    }, trajectories=8, steps=3000)

Each method is rolled out from the first snapshot of the same `trajectories` test trajectories of a
reference dataset (long solver trajectories from unseen initial states, `emu generate` with
length >= steps + 1), with the same seeds, into OUT/rollout_<slug>.h5 (skipped when present, so a
stopped comparison resumes). Then, per trajectory (`trajectory_metrics`):

- stable horizon: steps before the MSE to the solver (normalised units) first exceeds 2 x the
  decorrelated MSE (that of two independent attractor states, measured between the reference
  trajectories) or the state is non-finite (`emu.metrics.stable_horizon`);
- KE-spectrum ratio to the solver's mean spectrum over the stable part and over the last half of
  the rollout: the worst factor max(r, 1/r) over shells up to 2/3 of the cutoff, in shells of width
  sqrt(2) as the reference code bins them (and width 1, both reported);
- autocorrelation error: mean over lags 1..L of |r_method(lag) - r_solver(lag)|, lag-averaged
  Pearson autocorrelation over the stable part (`emu.metrics.lagged_autocorrelation`);
- denoising steps per emulator step over the stable part (stabilisers that record them);
- wall time per emulator step (all trajectories together, the method's whole rollout);
- forecast skill (Cohesion's scores, `forecast_skill`): mean RMSE, mean MS-SSIM and the spectral
  divergence of the last half against the solver, in a second table.

`write_results` writes results.json and results.md (one table); `plot_*` the figures a scientist
reads at a glance: fields over time (`fields.png`), MSE vs step on a log axis that stays readable
after a blow-up (non-finite and huge values drawn at a ceiling and marked, `mse.png`), predicted
levels and denoising steps on nonnegative axes (`levels.png`), spectra with the solver's x/÷1.5 band
(`spectra.png`), the lag-averaged autocorrelation of each method's stable part against the solver's
(`autocorrelation.png`).

Layer: joins emu.training (rollouts), emu.stabilizers and emu.metrics; nothing imports it but the
CLI and the evidence scripts.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Callable

import numpy as np

from emu.data.atomic import write_json_atomically, write_text_atomically
from emu.metrics import (kinetic_energy_spectrum, lagged_autocorrelation, ms_ssim, rmse, spectral_divergence,
                         stable_horizon)

SPECTRUM_GOAL = 1.5
MSE_CEILING = 1e6  # plotted in place of larger and non-finite MSEs (and marked)
SHELL_WIDTHS = {"sqrt2": math.sqrt(2.0), "1": 1.0}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def read_rollout(path) -> dict:
    """Fields (trajectory, time, channel, y, x) and the `emu` group's per-step records of a rollout or
    dataset file (The Well layout)."""
    import h5py

    with h5py.File(path, "r") as handle:
        channels = json.loads(handle["emu"].attrs["channels"])
        data = np.stack([np.swapaxes(handle["t0_fields"][c][...], -1, -2) for c in channels], axis=2)
        record = {name: handle["emu"][name][...] for name in handle["emu"]
                  if isinstance(handle["emu"][name], h5py.Dataset)}
        config = json.loads(handle["emu"].attrs["config"])
    return {"fields": data, "config": config, **record}


def decorrelated_mse(normalised_reference: np.ndarray) -> float:
    """MSE between independent attractor states: trajectory i against i + 1 at the same times, over
    the second half (normalised units; ~2 for standardised fields)."""
    if normalised_reference.shape[0] < 2:
        raise ValueError("the decorrelated MSE needs at least 2 reference trajectories")
    half = normalised_reference.shape[1] // 2
    return float(np.mean((normalised_reference[1:, half:] - normalised_reference[:-1, half:]) ** 2))


def spectrum_factor(spectrum: np.ndarray, reference: np.ndarray, k_index: np.ndarray) -> float:
    """Worst factor max(r, 1/r), r = spectrum / reference, over the shells `k_index`; inf when not finite."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = spectrum[k_index] / reference[k_index]
        worst = np.maximum(ratio, 1.0 / ratio)
    return float(np.max(worst)) if np.all(np.isfinite(worst)) and worst.size else math.inf


def trajectory_metrics(fields: np.ndarray, normalised: np.ndarray, normalised_reference: np.ndarray, config: dict,
                       solver_spectra: dict, solver_autocorrelation: np.ndarray, threshold: float,
                       denoising_steps: np.ndarray | None = None, max_lag: int = 50,
                       curves: list | None = None, solver_fields: np.ndarray | None = None) -> list[dict]:
    """Per-trajectory numbers of one method (module docstring).

    fields: physical rollout (trajectory, time, C, y, x); normalised: the same in normalised units;
    normalised_reference: the solver's (trajectory, time, C, y, x), normalised; solver_spectra: shell
    width name -> (k, mean spectrum); solver_autocorrelation: (max_lag + 1,) lag-averaged, solver's.
    """
    with np.errstate(invalid="ignore", over="ignore"):
        mse = np.mean((normalised - normalised_reference[:, :normalised.shape[1]]) ** 2, axis=(2, 3, 4))
    horizons = stable_horizon(mse, threshold)
    steps = fields.shape[1] - 1
    rows = []
    for index in range(fields.shape[0]):
        horizon = int(horizons[index])
        stable = slice(1, max(horizon, 2))
        last_half = slice(steps // 2 + 1, steps + 1)
        row = {"stable_horizon": horizon, "never_failed": horizon == steps + 1,
               "final_mse": float(mse[index, -1]) if np.isfinite(mse[index, -1]) else math.inf}
        for width_name, (k, reference) in solver_spectra.items():
            cutoff = np.nonzero(np.arange(1, len(k) + 1) * SHELL_WIDTHS[width_name] <= (2 / 3) * (fields.shape[-1] // 2))[0]
            for part, window in (("stable", stable), ("last_half", last_half)):
                chunk = fields[index, window]
                with np.errstate(invalid="ignore", over="ignore"):
                    finite = chunk[np.all(np.isfinite(chunk), axis=(1, 2, 3))]
                    if len(finite) < len(chunk) or not len(finite):
                        factor = math.inf
                    else:
                        spectrum = kinetic_energy_spectrum(finite, config, shell_width=SHELL_WIDTHS[width_name])[1]
                        factor = spectrum_factor(spectrum.mean(axis=0), reference, cutoff)
                row[f"spectrum_factor_{part}_w{width_name}"] = factor
        usable = normalised[index, stable]
        if usable.shape[0] > max_lag + 1 and np.all(np.isfinite(usable)):
            lagged = lagged_autocorrelation(usable[None], max_lag=max_lag)[0]
            row["autocorrelation_error"] = float(np.mean(np.abs(lagged[1:] - solver_autocorrelation[1:])))
        else:
            lagged = None
            row["autocorrelation_error"] = math.nan
        if curves is not None:
            curves.append(lagged)
        if denoising_steps is not None:
            row["denoising_steps_per_step"] = float(denoising_steps[index, stable].mean())
        row.update(forecast_skill(fields[index], normalised[index], normalised_reference[index, :fields.shape[1]],
                                  solver_fields[index] if solver_fields is not None else None, config))
        rows.append(row)
    return rows


def forecast_skill(fields: np.ndarray, normalised: np.ndarray, normalised_reference: np.ndarray,
                   solver_fields: np.ndarray | None, config: dict, frames: int = 60) -> dict:
    """Cohesion's skill scores of one trajectory (time, C, y, x) against the solver over the whole
    horizon (steps 1..T, at most `frames` evenly spaced frames for MS-SSIM and SpecDiv): mean RMSE
    (normalised units), mean MS-SSIM (normalised fields), mean SpecDiv over the last half (the KE
    spectra's top 10% of shells; `emu.metrics.spectral_divergence`). A non-finite frame makes the
    RMSE and SpecDiv inf and the MS-SSIM 0 (a blown-up state has no skill)."""
    steps = fields.shape[0] - 1
    if steps < 1:
        return {"rmse_mean": math.nan, "ms_ssim_mean": math.nan, "spectral_divergence_last_half": math.nan}
    finite = bool(np.all(np.isfinite(normalised[1:])))
    with np.errstate(invalid="ignore", over="ignore"):
        error = float(np.mean(rmse(normalised[1:], normalised_reference[1:]))) if finite else math.inf
    picks = np.unique(np.linspace(1, steps, min(frames, steps)).astype(int))
    late = picks[picks > steps // 2] if np.any(picks > steps // 2) else picks[-1:]
    if not finite:
        return {"rmse_mean": error, "ms_ssim_mean": 0.0, "spectral_divergence_last_half": math.inf}
    similarity = float(np.mean(ms_ssim(normalised[picks], normalised_reference[picks])))
    divergence = math.nan
    if solver_fields is not None:
        # The top 10% of the shells, but at least 2 (a coarse grid has few shells).
        fraction = max(0.1, 2.0 / (fields.shape[-1] // 2))
        divergence = float(np.mean(spectral_divergence(fields[late], solver_fields[late], config, fraction=fraction)))
    return {"rmse_mean": error, "ms_ssim_mean": similarity, "spectral_divergence_last_half": divergence}


def summarise(rows: list[dict]) -> dict:
    """Means over trajectories of the numbers in `rows` (inf stays inf)."""
    summary = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        if all(isinstance(v, bool) for v in values):
            summary[key] = sum(values)
        else:
            array = np.asarray(values, dtype=float)
            summary[key] = float(np.mean(array)) if not np.all(np.isnan(array)) else math.nan
    return summary


def compare_stabilizers(emulator, reference, out, methods: dict, *, trajectories: int = 8, steps: int = 3000,
                        device=None, seed: int = 0, max_lag: int = 50, progress: bool = False,
                        echo: Callable[[str], None] = print) -> dict:
    """Rolls out every method from the same initial states and scores them (module docstring).

    methods: name -> None (the bare emulator), rollout options ({"stabilizer": "METHOD:CKPT",
    "s_init", "s_stop", "runaway_level", "stabilizer_options"}, as `rollout_to_file` takes them), or
    {"forecast": {"koopman": CKPT, "score": CKPT, "mode": "plan" | "autoregressive" | "prior",
    "settings": {...CohesionSettings}}} for a Cohesion forecast of the same horizon (one member).
    Returns {"methods": {name: {"trajectories": [...], "summary": {...}, "seconds_per_step", ...}},
    "decorrelated_mse", "mse_threshold", ...}; the arrays the figures need are in results["_arrays"].
    """
    from emu.training.rollouts import rollout_to_file
    from emu.training.trainer import emulator_from_checkpoint, load_checkpoint

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    max_lag = min(max_lag, steps // 4) if steps >= 4 else 0  # a lag needs many pairs to be estimated
    _, normalizer = emulator_from_checkpoint(load_checkpoint(emulator))
    mean, std = normalizer.mean.numpy()[:, None, None], normalizer.std.numpy()[:, None, None]
    from emu.data.well import split_files

    solver_file = split_files(reference, "test")[0]
    solver = read_rollout(solver_file)
    config = solver["config"]
    if solver["fields"].shape[1] < steps + 1 or solver["fields"].shape[0] < trajectories:
        raise ValueError(f"reference {reference} holds {solver['fields'].shape[0]} trajectories x "
                         f"{solver['fields'].shape[1]} snapshots; {trajectories} x {steps + 1} are needed")
    solver_fields = solver["fields"][:trajectories, :steps + 1]
    normalised_solver = (solver_fields - mean) / std
    decorrelated = decorrelated_mse(normalised_solver)
    threshold = 2.0 * decorrelated
    flat = solver_fields[:, ::max(1, steps // 200)].reshape(-1, *solver_fields.shape[2:])
    solver_spectra, solver_band = {}, {}
    for width_name, width in SHELL_WIDTHS.items():
        k, spectra = kinetic_energy_spectrum(flat, config, shell_width=width)
        solver_spectra[width_name] = (k, spectra.mean(axis=0))
        solver_band[width_name] = (np.quantile(spectra, 0.05, axis=0), np.quantile(spectra, 0.95, axis=0))
    solver_autocorrelation = lagged_autocorrelation(normalised_solver, max_lag=max_lag).mean(axis=0)
    results = {"emulator": str(emulator), "reference": str(reference), "trajectories": trajectories, "steps": steps,
               "decorrelated_mse": decorrelated, "mse_threshold": threshold, "max_lag": max_lag,
               "spectrum_goal": SPECTRUM_GOAL, "methods": {}}
    arrays = {"solver": {"fields": solver_fields}, "solver_spectra": solver_spectra, "solver_band": solver_band,
              "solver_autocorrelation": solver_autocorrelation, "config": config}
    for name, options in methods.items():
        path = out / f"rollout_{slug(name)}.h5"
        timing = path.with_suffix(".seconds")
        if not (path.is_file() and timing.is_file()):
            echo(f"rollout {name}: {trajectories} trajectories x {steps} steps ...")
            start = time.perf_counter()
            if options and "forecast" in options:
                from emu.stabilizers.cohesion import CohesionSettings, forecast_to_file

                spec = dict(options["forecast"])
                forecast_to_file(spec.pop("koopman"), spec.pop("score", None), reference, path, horizon=steps,
                                 trajectories=trajectories, split="test", device=device, seed=seed,
                                 progress=progress, settings=CohesionSettings(**spec.pop("settings", {})), **spec)
            else:
                rollout_to_file(emulator, reference, path, trajectories=trajectories, steps=steps, split="test",
                                device=device, seed=seed, progress=progress, **(options or {}))
            write_text_atomically(timing, f"{time.perf_counter() - start:.3f}\n")
        seconds = float(timing.read_text())
        record = read_rollout(path)
        fields = record["fields"]
        with np.errstate(invalid="ignore", over="ignore"):
            normalised = (fields - mean) / std
            mse = np.mean((normalised - normalised_solver) ** 2, axis=(2, 3, 4))
        curves: list = []
        if fields.shape[1] != steps + 1:
            raise ValueError(f"{path} holds {fields.shape[1] - 1} steps, {steps} asked: it belongs to another "
                             "comparison; use another output folder or delete it")
        if fields.shape[0] != trajectories:
            raise ValueError(f"{path} holds {fields.shape[0]} trajectories, {trajectories} expected (one member each)")
        rows = trajectory_metrics(fields, normalised, normalised_solver, config, solver_spectra, solver_autocorrelation,
                                  threshold, record.get("denoising_steps"), max_lag=max_lag, curves=curves,
                                  solver_fields=solver_fields)
        entry = {"options": options or {}, "trajectories": rows, "summary": summarise(rows),
                 "seconds": seconds, "seconds_per_step": seconds / steps}
        if "predicted_level" in record:
            levels = record["predicted_level"][:, 1:]
            entry["predicted_level_median"] = float(np.median(levels[levels >= 0])) if (levels >= 0).any() else math.nan
            entry["runaway_sample_steps"] = int(record["runaway"].sum())
        results["methods"][name] = entry
        usable = [curve for curve in curves if curve is not None]
        arrays[name] = {"fields": fields, "mse": mse,
                        "autocorrelation": np.mean(usable, axis=0) if usable else None,
                        **{key: record[key] for key in ("predicted_level", "denoising_steps") if key in record}}
        summary = entry["summary"]
        echo(f"{name}: mean stable horizon {summary['stable_horizon']:.1f}, "
             f"{entry['seconds_per_step'] * 1e3:.1f} ms per step")
    results["_arrays"] = arrays
    return results


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _jsonable(value):
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items() if key != "_arrays"}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    return _finite_or_none(value)


def results_table(results: dict, baseline: str = "emulator") -> str:
    """The markdown table of `results` (one row per method; horizon ratios against `baseline`)."""
    base = results["methods"].get(baseline, {}).get("summary", {}).get("stable_horizon")
    lines = ["| method | stable horizon per trajectory | mean | x " + baseline + " | E(k) factor, stable part "
             "(√2 / 1 shells) | E(k) factor, last half (√2 / 1) | autocorr. error | denoising steps / step "
             "| ms / step |", "|---|---|---|---|---|---|---|---|---|"]

    def shown(value, digits=3):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "–"
        return "inf" if value == math.inf else f"{value:.{digits}g}"

    for name, entry in results["methods"].items():
        summary = entry["summary"]
        horizons = [row["stable_horizon"] for row in entry["trajectories"]]
        never = sum(row["never_failed"] for row in entry["trajectories"])
        ratio = summary["stable_horizon"] / base if base else math.nan
        worst = {part: [max(row[f"spectrum_factor_{part}_w{w}"] for row in entry["trajectories"]) for w in SHELL_WIDTHS]
                 for part in ("stable", "last_half")}
        lines.append(
            f"| {name} | {horizons}" + (f" ({never} never failed: lower bounds)" if never else "") +
            f" | {summary['stable_horizon']:.1f} | {shown(ratio)} | {shown(worst['stable'][0])} / {shown(worst['stable'][1])}"
            f" | {shown(worst['last_half'][0])} / {shown(worst['last_half'][1])} | {shown(summary['autocorrelation_error'])}"
            f" | {shown(summary.get('denoising_steps_per_step'))} | {entry['seconds_per_step'] * 1e3:.1f} |")
    return "\n".join(lines)


def skill_table(results: dict) -> str:
    """Forecast skill per method (means over trajectories; `forecast_skill`)."""
    lines = ["| method | RMSE (normalised, mean over steps) | MS-SSIM (mean) | SpecDiv, last half (mean) | ms / step |",
             "|---|---|---|---|---|"]
    for name, entry in results["methods"].items():
        summary = entry["summary"]
        cells = [summary.get(key, math.nan) for key in ("rmse_mean", "ms_ssim_mean", "spectral_divergence_last_half")]
        lines.append(f"| {name} | " + " | ".join("inf" if v == math.inf else "–" if v != v else f"{v:.3g}" for v in cells)
                     + f" | {entry['seconds_per_step'] * 1e3:.1f} |")
    return "\n".join(lines)


def write_results(results: dict, out, *, title: str, notes: list[str] = ()) -> None:
    """results.json (all numbers, per trajectory) and results.md (the table plus `notes`)."""
    out = Path(out)
    write_json_atomically(out / "results.json", _jsonable(results))
    lines = [f"# {title}", "", *notes, "",
             f"{results['trajectories']} test trajectories from unseen initial states, {results['steps']} emulator "
             f"steps each. Unstable: MSE to the solver > {results['mse_threshold']:.3f} (2 x the decorrelated MSE "
             f"{results['decorrelated_mse']:.3f}, normalised units) or non-finite; the horizon counts the steps "
             "before the first unstable one. E(k) factor: the worst max(r, 1/r) of the time-mean KE spectrum over the "
             f"solver's, over shells up to 2/3 of the cutoff, worst trajectory (goal: <= {SPECTRUM_GOAL}). "
             f"Autocorrelation error: mean |r - r_solver| over lags 1..{results['max_lag']} on the stable part.", "",
             results_table(results), "",
             "Forecast skill against the solver (RMSE over steps 1..T; MS-SSIM on normalised fields; SpecDiv: "
             "KL divergence of the normalised KE spectra over the top 10% of shells, last half):", "",
             skill_table(results), "",
             "Figures: fields.png, mse.png, levels.png, spectra.png, autocorrelation.png."]
    write_text_atomically(out / "results.md", "\n".join(lines) + "\n")


def _snapshot_steps(steps: int) -> list[int]:
    picks = sorted({0, *np.unique(np.geomspace(min(10, steps), steps, 4).astype(int)).tolist()})
    return picks[-5:] if len(picks) > 5 else picks


def _save(plt, figure, path: Path, paths: list[Path]) -> None:
    from emu.plotting import save_figure_atomically

    figure.tight_layout()
    save_figure_atomically(figure, path)
    paths.append(path)
    plt.close(figure)


def plot_results(results: dict, out, *, system_title: str = "") -> list[Path]:
    """fields.png, mse.png, levels.png, spectra.png, autocorrelation.png (module docstring); returns their paths."""
    from emu.plotting import _pyplot

    plt = _pyplot()
    out = Path(out)
    arrays = results["_arrays"]
    names = list(results["methods"])
    colors = {name: f"C{index}" for index, name in enumerate(names)}
    steps = results["steps"]
    paths = []

    # fields over time: trajectory 0, first channel
    picks = _snapshot_steps(steps)
    rows = [("solver", arrays["solver"]["fields"])] + [(name, arrays[name]["fields"]) for name in names]
    limit = float(np.abs(arrays["solver"]["fields"][0, :, 0]).max())
    figure, axes = plt.subplots(len(rows), len(picks), figsize=(2.1 * len(picks), 2.1 * len(rows)), squeeze=False)
    for row, (name, fields) in enumerate(rows):
        for column, step in enumerate(picks):
            axis = axes[row, column]
            image = fields[0, step, 0]
            axis.imshow(np.where(np.isfinite(image), image, np.nan), cmap="RdBu_r", vmin=-limit, vmax=limit,
                        origin="lower")
            axis.set_xticks([]), axis.set_yticks([])
            if row == 0:
                axis.set_title(f"step {step}", fontsize=9)
            if column == 0:
                axis.set_ylabel(name, fontsize=8)
    figure.suptitle(f"{system_title} trajectory 0 over time (colour range of the solver)", fontsize=10)
    _save(plt, figure, out / "fields.png", paths)

    # MSE vs step, robust to blow-up
    figure, axis = plt.subplots(figsize=(8, 4.5))
    step_axis = np.arange(steps + 1)
    for name in names:
        mse = arrays[name]["mse"]
        clipped = np.where(np.isfinite(mse), np.minimum(mse, MSE_CEILING), MSE_CEILING)
        for trajectory in clipped:
            axis.plot(step_axis[1:], trajectory[1:], color=colors[name], alpha=0.25, linewidth=0.7)
        median = np.median(clipped, axis=0)
        axis.plot(step_axis[1:], median[1:], color=colors[name], linewidth=1.8, label=f"{name} (median)")
    axis.axhline(results["mse_threshold"], color="k", linestyle=":", label=f"unstable above {results['mse_threshold']:.2f}")
    axis.axhline(MSE_CEILING, color="0.6", linestyle="-", linewidth=0.8)
    axis.text(1.1, MSE_CEILING * 1.5, "blown up (>= 1e6 or non-finite)", fontsize=7, color="0.4")
    axis.set_xscale("log"), axis.set_yscale("log")
    axis.set_ylim(1e-3, MSE_CEILING * 10)
    axis.set_xlabel("emulator step"), axis.set_ylabel("MSE vs solver (normalised)")
    axis.legend(fontsize=7, loc="lower right")
    axis.grid(alpha=0.3)
    _save(plt, figure, out / "mse.png", paths)

    # predicted levels and denoising steps
    with_levels = [name for name in names if "predicted_level" in arrays[name]]
    if with_levels:
        figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
        for name in with_levels:
            levels = arrays[name]["predicted_level"][:, 1:].astype(float)
            levels[levels < 0] = np.nan
            top.plot(step_axis[1:], np.nanmedian(levels, axis=0) if np.isfinite(levels).any() else levels[0],
                     color=colors[name], linewidth=1, label=f"{name} (median over trajectories)")
            denoise = arrays[name]["denoising_steps"][:, 1:]
            bottom.plot(step_axis[1:], np.cumsum(denoise.mean(axis=0)), color=colors[name], label=name)
        top.set_yscale("symlog", linthresh=10)
        top.set_ylim(bottom=0)
        top.set_ylabel("predicted noise level"), top.legend(fontsize=7), top.grid(alpha=0.3)
        bottom.set_ylim(bottom=0)
        bottom.set_ylabel("cumulative denoising steps\n(mean per trajectory)"), bottom.set_xlabel("emulator step")
        bottom.legend(fontsize=7), bottom.grid(alpha=0.3)
        _save(plt, figure, out / "levels.png", paths)

    # spectra over the last half, with the solver's x/÷1.5 band (√2 shells)
    k, reference = arrays["solver_spectra"]["sqrt2"]
    figure, axis = plt.subplots(figsize=(6, 4.5))
    axis.fill_between(k, reference / SPECTRUM_GOAL, reference * SPECTRUM_GOAL, color="0.85", label="solver x/÷ 1.5")
    axis.loglog(k, reference, color="k", label="solver")
    config = arrays["config"]
    for name in names:
        fields = arrays[name]["fields"][:, steps // 2 + 1:]
        finite = fields.reshape(-1, *fields.shape[2:])
        finite = finite[np.all(np.isfinite(finite), axis=(1, 2, 3))]
        if len(finite):
            spectrum = kinetic_energy_spectrum(finite[::max(1, len(finite) // 400)], config,
                                               shell_width=SHELL_WIDTHS["sqrt2"])[1].mean(axis=0)
            axis.loglog(k, np.where(spectrum > 0, spectrum, np.nan), color=colors[name], label=name)
    axis.axvline(k[0] / SHELL_WIDTHS["sqrt2"] * (2 / 3) * (arrays["solver"]["fields"].shape[-1] // 2), color="0.5",
                 linestyle=":", linewidth=0.8, label="2/3 of the cutoff")
    bottom = float(np.min(reference[reference > 0])) / 100
    axis.set_ylim(bottom=bottom, top=float(reference.max()) * 100)
    axis.set_xlabel("wavenumber k"), axis.set_ylabel("E(k), last half of the rollouts (finite states)")
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    _save(plt, figure, out / "spectra.png", paths)

    # lag-averaged autocorrelation over each method's stable part against the solver's: a method that
    # keeps the dynamics (not only the invariant measure) follows the black curve
    solver_curve = arrays.get("solver_autocorrelation")
    if solver_curve is not None and len(solver_curve) > 1:
        figure, axis = plt.subplots(figsize=(6, 4.5))
        lags = np.arange(len(solver_curve))
        axis.plot(lags, solver_curve, color="k", linewidth=2, label="solver")
        for name in names:
            curve = arrays[name].get("autocorrelation")
            if curve is not None:
                axis.plot(lags, curve, color=colors[name], label=name)
            else:
                axis.plot([], [], color=colors[name], label=f"{name} (stable part too short)")
        axis.set_xlabel("lag (emulator steps)"), axis.set_ylabel("lag-averaged autocorrelation, stable part")
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
        _save(plt, figure, out / "autocorrelation.png", paths)
    return paths
