"""Thermalizer evidence run: does adaptive denoising keep an emulator's long rollouts on the attractor?

One command, in stages that each save their result and are skipped when rerun (so a stopped run
resumes where it stopped):

  1. data       small Kolmogorov dataset (train / valid / test) from the pseudospectral solver;
  2. reference  long solver trajectories from unseen initial states (the rollouts' ground truth);
  3. emulator   a small emulator (DRN, short training: an imperfect emulator is what needs help);
  4. thermalizer  a small Thermalizer (DDPM + noise-level classifier) on single snapshots;
  5. tune       (s_init, s_stop) grid search on validation trajectories (`tune thermalizer`);
  6. rollouts   emulator-only and thermalized rollouts from the same initial states;
  7. analysis   stable horizons, MSE-vs-step curves, KE spectra, classifier cost, figures.

    python scripts/thermalizer_evidence.py --out evidence/                 # small: this 2-core CPU
    python scripts/thermalizer_evidence.py --out evidence/ --preset paper  # paper-sized, for a GPU

Outputs in OUT/: figure1.png (fields over time for solver / emulator / thermalized and KE spectra,
in the style of the Thermalizer paper's Figure 1), mse.png (MSE vs step, predicted levels and
denoising steps), results.json and results.md (stable-horizon table, spectrum ratios, classifier
cost per step as a fraction of an emulator step).

Definitions (stated in results.md too):
  - MSE is in normalised units (per-channel mean/std of the training split) against the solver's
    trajectory from the same initial state; two independent states of the attractor give
    MSE ~ 2 (measured here between the reference trajectories: `decorrelated_mse`).
  - A step is unstable when MSE > 2 x decorrelated_mse or the state is non-finite; the stable
    horizon is the number of steps before the first unstable one (`emu.metrics.stable_horizon`),
    the rollout length when none is.
  - Spectra: time mean over the second half of each rollout vs the solver's mean over all
    reference states; the goal is a ratio within [1/1.5, 1.5] on every shell k = 1..n/2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

PRESETS = {
    # 2-core CPU, well under an hour in all (measured timings in the issue note).
    "small": {
        "solver_grid": 64, "grid": 32, "trajectories": 48, "length": 80, "interval": 10, "seed": 0,
        "reference_trajectories": 4, "steps": 2000,
        # One epoch of a small UNet: an imperfect emulator that leaves the attractor within a few
        # hundred steps. (A one-epoch DRN fails differently: it over-smooths and then a large-scale
        # mode grows, which the noise-level classifier does not see; recorded in the issue note.)
        "emulator": {"arch": "unet", "preset": "small", "unroll": 1, "epochs": 1, "batch_size": 16, "lr": 1e-3,
                     "noise": 1e-4},
        "thermalizer": {"preset": "small", "epochs": 40, "batch_size": 16, "lr": 1e-3, "num_levels": 1000},
        "tune": {"s_inits": [10, 30, 60], "s_stops": [4], "trajectories": 2, "steps": 300},
    },
    # A seconds-long run of every stage (tests/test_thermalizer_evidence.py); says nothing about physics.
    "smoke": {
        "solver_grid": 16, "grid": 16, "trajectories": 6, "length": 6, "interval": 3, "seed": 0,
        "config": {"viscosity": 0.02}, "split": [4 / 6, 1 / 6, 1 / 6], "spinup_time": 2.0,
        "reference_trajectories": 2, "steps": 12,
        "emulator": {"arch": "drn", "preset": "small", "unroll": 1, "epochs": 1, "batch_size": 4, "lr": 1e-3},
        "thermalizer": {"preset": "small", "epochs": 1, "batch_size": 8, "lr": 1e-3, "num_levels": 1000},
        "tune": {"s_inits": [6], "s_stops": [4], "trajectories": 1, "steps": 4},
    },
    # Paper-sized (Thermalizer paper: 64^2 states, UNet emulator, 53M-parameter thermalizer); a GPU job.
    "paper": {
        "solver_grid": 256, "grid": 64, "trajectories": 512, "length": 200, "interval": 5, "seed": 0,
        "reference_trajectories": 16, "steps": 10000,
        "emulator": {"arch": "unet", "preset": "paper", "unroll": 4, "epochs": 50, "batch_size": 64, "lr": 5e-4,
                     "noise": 1e-4},
        "thermalizer": {"preset": "paper", "epochs": 100, "batch_size": 64, "lr": 2e-4, "num_levels": 1000},
        "tune": {"s_inits": [6, 7, 8, 9, 10], "s_stops": [2, 3, 4, 5], "trajectories": 8, "steps": 2000},
    },
}


# Progress bars on a terminal; epoch lines and stage times only when the output goes to a log file.
PROGRESS = sys.stderr.isatty()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def stage_data(settings: dict, out: Path) -> Path:
    from emu.generate import GenerationPlan, generate, spinup_steps
    from emu.systems import make_config

    directory = out / "data"
    config = make_config("kolmogorov", grid_size=settings["solver_grid"], **settings.get("config", {}))
    plan = GenerationPlan(config, trajectories=settings["trajectories"], length=settings["length"],
                          interval=settings["interval"], spinup_steps=spinup_steps(config, settings.get("spinup_time", 10.0)),
                          downsample=settings["grid"], batch=16, split=tuple(settings.get("split", (5 / 6, 1 / 12, 1 / 12))),
                          seed=settings["seed"])
    generate(plan, directory)  # resumes or returns at once when complete
    return directory


def stage_reference(settings: dict, out: Path) -> Path:
    from emu.generate import GenerationPlan, generate, spinup_steps
    from emu.systems import make_config

    directory = out / "reference"
    config = make_config("kolmogorov", grid_size=settings["solver_grid"], **settings.get("config", {}))
    plan = GenerationPlan(config, trajectories=settings["reference_trajectories"], length=settings["steps"] + 1,
                          interval=settings["interval"], spinup_steps=spinup_steps(config, settings.get("spinup_time", 10.0)),
                          downsample=settings["grid"],
                          batch=settings["reference_trajectories"], split=(0.0, 0.0, 1.0), seed=settings["seed"] + 1)
    generate(plan, directory)
    return directory


def _trained(directory: Path, epochs: int) -> bool:
    metrics = directory / "metrics.jsonl"
    return metrics.is_file() and len(metrics.read_text().splitlines()) >= epochs


def _train(name: str, config_class, train_function, settings: dict, data: Path, out: Path,
           device: str | None) -> Path:
    """Trains model `name` with the preset's options into OUT/name (resuming a stopped run)."""
    directory = out / name
    options = settings[name]
    if not _trained(directory, options["epochs"]):
        config = config_class(data=str(data), device=device, **options)
        train_function(config, directory, resume=(directory / "last.pt").is_file(), progress=PROGRESS)
    return directory


def stage_emulator(settings: dict, data: Path, out: Path, device: str | None) -> Path:
    from emu.training.trainer import TrainingConfig, train_emulator

    return _train("emulator", TrainingConfig, train_emulator, settings, data, out, device) / "best.pt"


def stage_thermalizer(settings: dict, data: Path, out: Path, device: str | None) -> Path:
    from emu.stabilizers.thermalizer import ThermalizerTrainingConfig, train_thermalizer

    # The EMA weights of the last epoch (the paper's choice), not the lowest validation loss.
    return _train("thermalizer", ThermalizerTrainingConfig, train_thermalizer, settings, data, out, device) / "last.pt"


def stage_tune(settings: dict, emulator: Path, thermalizer: Path, data: Path, device: str | None) -> dict:
    from emu.stabilizers.thermalizer import read_levels, tune_thermalizer

    tuned = (read_levels(thermalizer) or {}).get("grid_search")
    if tuned is not None and tuned.get("emulator") == str(emulator):
        log(f"tuned levels found: s_init={tuned['s_init']}, s_stop={tuned['s_stop']}")
        return tuned
    options = settings["tune"]
    return tune_thermalizer(emulator, thermalizer, data, s_inits=options["s_inits"], s_stops=options["s_stops"],
                            trajectories=options["trajectories"], steps=options["steps"], split="valid",
                            device=device, echo=log, progress=PROGRESS)


def stage_rollouts(settings: dict, emulator: Path, thermalizer: Path, reference: Path, out: Path,
                   device: str | None) -> dict:
    from emu.training.rollouts import rollout_to_file

    runs = {}
    for name, extra in (("emulator", {}), ("thermalized", {"thermalizer": thermalizer})):
        path = out / f"rollout_{name}.h5"
        timing = out / f"rollout_{name}.seconds"
        if not path.is_file():
            start = time.perf_counter()
            rollout_to_file(emulator, reference, path, trajectories=settings["reference_trajectories"],
                            steps=settings["steps"], split="test", device=device, seed=0, progress=PROGRESS, **extra)
            timing.write_text(f"{time.perf_counter() - start:.3f}\n")
        runs[name] = {"path": path, "seconds": float(timing.read_text()) if timing.is_file() else math.nan}
    return runs


def read_rollout(path: Path) -> dict:
    """Fields (trajectory, time, channel, y, x) and the `emu` group's per-step records of a rollout file."""
    import h5py

    with h5py.File(path, "r") as handle:
        fields = handle["t0_fields"]
        channels = list(fields.keys())
        data = np.stack([np.swapaxes(fields[c][...], -1, -2) for c in channels], axis=2)
        record = {name: handle["emu"][name][...] for name in handle["emu"]
                  if isinstance(handle["emu"][name], h5py.Dataset)}
    return {"fields": data, **record}


def classifier_cost(emulator: Path, thermalizer: Path, batch: int, grid: int, device: str | None) -> dict:
    """Time of one classifier-only pass vs one emulator step on the same batch (no_grad, same device)."""
    import torch

    from emu.bench import calls_per_second
    from emu.stabilizers.thermalizer import load_thermalizer
    from emu.training.trainer import emulator_from_checkpoint, load_checkpoint

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, _ = emulator_from_checkpoint(load_checkpoint(emulator))
    network, _, _, _ = load_thermalizer(thermalizer)
    model.to(device).eval(), network.to(device).eval()
    state = torch.randn(batch, 1, grid, grid, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    rates = {}
    with torch.no_grad():
        for name, call in (("emulator_step", lambda: model(state)), ("classifier", lambda: network.classify(state)),
                           ("denoising_step", lambda: network(state))):
            rates[name] = calls_per_second(call, seconds=3.0, synchronize=sync)
    return {"batch": batch, "calls_per_second": rates,
            "classifier_fraction": rates["emulator_step"] / rates["classifier"],
            "denoising_step_fraction": rates["emulator_step"] / rates["denoising_step"]}


def analyse(settings: dict, reference: Path, runs: dict, tuned: dict, emulator: Path, thermalizer: Path,
            out: Path, device: str | None) -> dict:
    import h5py

    from emu.data.loaders import split_files
    from emu.metrics import kinetic_energy_spectrum, stable_horizon
    from emu.training.trainer import emulator_from_checkpoint, load_checkpoint

    _, normalizer = emulator_from_checkpoint(load_checkpoint(emulator))
    mean, std = normalizer.mean.numpy()[:, None, None], normalizer.std.numpy()[:, None, None]
    reference_file = split_files(reference, "test")[0]
    with h5py.File(reference_file, "r") as handle:
        config = json.loads(handle["emu"].attrs["config"])  # the solver's config (grid size is replaced)
    solver = read_rollout(reference_file)["fields"]  # same layout as the rollouts
    steps = settings["steps"]
    solver = solver[:, :steps + 1]
    normalised_solver = (solver - mean) / std
    # Two independent attractor states: trajectory i against trajectory i+1 at the same time.
    decorrelated = float(np.mean((normalised_solver[1:, steps // 2:] - normalised_solver[:-1, steps // 2:]) ** 2))
    threshold = 2.0 * decorrelated

    results = {"settings": settings, "tuned_levels": {"s_init": tuned["s_init"], "s_stop": tuned["s_stop"]},
               "decorrelated_mse": decorrelated, "mse_threshold": threshold, "runs": {}}
    k, solver_spectrum = kinetic_energy_spectrum(solver.reshape(-1, *solver.shape[2:]), config)
    solver_spectrum = solver_spectrum.mean(axis=0)
    spectra = {"solver": solver_spectrum}
    records = {}
    for name, run in runs.items():
        record = read_rollout(run["path"])
        fields = record["fields"]
        normalised = (fields - mean) / std
        mse = np.mean((normalised - normalised_solver) ** 2, axis=(2, 3, 4))
        horizon = stable_horizon(mse, threshold)
        late = fields[:, steps // 2:]
        with np.errstate(invalid="ignore", over="ignore"):
            _, spectrum = kinetic_energy_spectrum(late.reshape(-1, *late.shape[2:]), config)
        spectrum = spectrum.mean(axis=0)
        ratio = spectrum / solver_spectrum
        entry = {"stable_horizon": horizon.tolist(), "stable_horizon_mean": float(horizon.mean()),
                 "lower_bound": bool((horizon == steps + 1).any()),
                 "final_mse": mse[:, -1].tolist(), "seconds": run["seconds"],
                 "spectrum_ratio_min": float(np.nanmin(ratio)) if np.isfinite(ratio).any() else math.nan,
                 "spectrum_ratio_max": float(np.nanmax(ratio)) if np.isfinite(ratio).any() else math.nan,
                 "spectrum_within_1.5": bool(np.all(np.isfinite(ratio)) and np.all((ratio <= 1.5) & (ratio >= 1 / 1.5)))}
        if "denoising_steps" in record:
            denoise = record["denoising_steps"][:, 1:]
            entry.update({"fraction_steps_thermalized": float((denoise > 0).mean()),
                          "denoising_steps_per_step": float(denoise.mean()),
                          "runaway_steps": int(record["runaway"].sum()),
                          "predicted_level_median": float(np.median(record["predicted_level"][:, 1:]))})
        results["runs"][name] = entry
        spectra[name] = spectrum
        records[name] = {"mse": mse, "fields": fields, **record}
    emulator_horizon = results["runs"]["emulator"]["stable_horizon_mean"]
    results["horizon_ratio"] = results["runs"]["thermalized"]["stable_horizon_mean"] / max(emulator_horizon, 1.0)
    results["classifier_cost"] = classifier_cost(emulator, thermalizer, settings["reference_trajectories"],
                                                 settings["grid"], device)
    results["wavenumbers"] = k.tolist()
    results["spectra"] = {name: values.tolist() for name, values in spectra.items()}
    plot_figure1(solver, records, spectra, k, settings, out / "figure1.png")
    plot_mse(records, threshold, decorrelated, tuned["s_init"], out / "mse.png")
    return results


def _snapshot_steps(steps: int) -> list[int]:
    picks = sorted({0, *np.unique(np.geomspace(10, steps, 4).astype(int)).tolist()})
    return picks[-5:] if len(picks) > 5 else picks


def plot_figure1(solver, records, spectra, k, settings, path: Path) -> None:
    from emu.plotting import _pyplot, save_figure_atomically

    plt = _pyplot()
    picks = _snapshot_steps(settings["steps"])
    rows = [("solver", solver), ("emulator", records["emulator"]["fields"]),
            ("thermalized", records["thermalized"]["fields"])]
    limit = float(np.abs(solver[0, :, 0]).max())
    figure = plt.figure(figsize=(2.3 * len(picks) + 4.5, 7.2))
    grid = figure.add_gridspec(3, len(picks) + 1, width_ratios=[1] * len(picks) + [1.8])
    for row, (name, fields) in enumerate(rows):
        for column, step in enumerate(picks):
            axis = figure.add_subplot(grid[row, column])
            image = fields[0, step, 0]
            axis.imshow(np.where(np.isfinite(image), image, np.nan), cmap="RdBu_r", vmin=-limit, vmax=limit,
                        origin="lower")
            axis.set_xticks([]), axis.set_yticks([])
            if row == 0:
                axis.set_title(f"step {step}")
            if column == 0:
                axis.set_ylabel(name)
    axis = figure.add_subplot(grid[:, -1])
    styles = {"solver": ("k", "-"), "emulator": ("tab:red", "--"), "thermalized": ("tab:blue", "-")}
    for name, spectrum in spectra.items():
        color, line = styles[name]
        axis.loglog(k, np.where(spectrum > 0, spectrum, np.nan), color=color, linestyle=line, label=name)
    axis.fill_between(k, spectra["solver"] / 1.5, spectra["solver"] * 1.5, color="0.85", label="solver x/÷ 1.5")
    axis.set_xlabel("wavenumber k"), axis.set_ylabel("E(k), second half of the rollouts")
    axis.legend(fontsize=8)
    figure.suptitle("Kolmogorov flow: vorticity of trajectory 0 and kinetic-energy spectra")
    save_figure_atomically(figure, path)
    plt.close(figure)


def plot_mse(records, threshold: float, decorrelated: float, s_init: int, path: Path) -> None:
    from emu.plotting import _pyplot, save_figure_atomically

    plt = _pyplot()
    thermalized = records["thermalized"]
    figure, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    for name, color in (("emulator", "tab:red"), ("thermalized", "tab:blue")):
        mse = records[name]["mse"]
        steps = np.arange(mse.shape[1])
        for trajectory in mse:
            axes[0].semilogy(steps, trajectory, color=color, alpha=0.3, linewidth=0.8)
        axes[0].semilogy(steps, np.nanmean(mse, axis=0), color=color, label=f"{name} (mean)")
    axes[0].axhline(threshold, color="k", linestyle=":", label=f"unstable above {threshold:.2f}")
    axes[0].axhline(decorrelated, color="0.5", linestyle="--", label=f"decorrelated {decorrelated:.2f}")
    axes[0].set_ylabel("MSE vs solver (normalised)"), axes[0].legend(fontsize=8)
    levels = thermalized["predicted_level"][:, 1:]
    steps = np.arange(1, levels.shape[1] + 1)
    for trajectory in levels:
        axes[1].plot(steps, trajectory, linewidth=0.6)
    axes[1].axhline(s_init, color="k", linestyle=":", label=f"s_init = {s_init}")
    axes[1].set_yscale("symlog", linthresh=10)
    axes[1].set_ylabel("predicted noise level"), axes[1].legend(fontsize=8)
    denoise = thermalized["denoising_steps"][:, 1:]
    axes[2].plot(steps, np.cumsum(denoise, axis=1).T, linewidth=0.8)
    axes[2].set_ylabel("cumulative denoising steps"), axes[2].set_xlabel("emulator step")
    save_figure_atomically(figure, path)
    plt.close(figure)


def write_report(results: dict, out: Path) -> None:
    from emu.data.atomic import write_json_atomically

    write_json_atomically(out / "results.json", results)
    runs = results["runs"]
    cost = results["classifier_cost"]
    lines = [
        "# Thermalizer evidence run", "",
        f"Preset `{results['preset']}`; tuned levels s_init = {results['tuned_levels']['s_init']}, "
        f"s_stop = {results['tuned_levels']['s_stop']}; {results['settings']['steps']} steps from "
        f"{results['settings']['reference_trajectories']} unseen initial states.", "",
        f"Unstable: MSE > {results['mse_threshold']:.3f} (2 x the decorrelated MSE {results['decorrelated_mse']:.3f}) "
        "or non-finite.", "",
        "| rollout | stable horizon per trajectory | mean | E(k) ratio min..max | within x1.5 | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in runs.items():
        bound = " (>= : never failed)" if entry["lower_bound"] else ""
        lines.append(f"| {name} | {entry['stable_horizon']}{bound} | {entry['stable_horizon_mean']:.1f} | "
                     f"{entry['spectrum_ratio_min']:.3g}..{entry['spectrum_ratio_max']:.3g} | "
                     f"{entry['spectrum_within_1.5']} | {entry['seconds']:.1f} |")
    thermalized = runs["thermalized"]
    lines += ["", f"Horizon ratio (thermalized / emulator, means): **{results['horizon_ratio']:.2f}**", "",
              f"Thermalized steps: {thermalized['fraction_steps_thermalized']:.3f} of steps denoised, "
              f"{thermalized['denoising_steps_per_step']:.2f} denoising steps per step, "
              f"{thermalized['runaway_steps']} runaway steps, median predicted level "
              f"{thermalized['predicted_level_median']:.0f}.", "",
              f"Classifier cost: {cost['classifier_fraction']:.2f} of an emulator step; one denoising step "
              f"costs {cost['denoising_step_fraction']:.2f} emulator steps (batch {cost['batch']}, "
              f"calls/s {json.dumps({k: round(v, 1) for k, v in cost['calls_per_second'].items()})}).", "",
              "Figures: figure1.png (fields and spectra), mse.png (MSE, predicted levels, denoising steps)."]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("evidence"), help="output folder (default: evidence/)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--steps", type=int, default=None, help="rollout length (default: the preset's)")
    parser.add_argument("--thermalizer-epochs", type=int, default=None)
    parser.add_argument("--emulator-epochs", type=int, default=None)
    args = parser.parse_args(argv)
    settings = json.loads(json.dumps(PRESETS[args.preset]))
    if args.steps is not None:
        if args.steps < 10:
            parser.error(f"--steps must be >= 10, got {args.steps}")
        settings["steps"] = args.steps
    if args.thermalizer_epochs is not None:
        settings["thermalizer"]["epochs"] = args.thermalizer_epochs
    if args.emulator_epochs is not None:
        settings["emulator"]["epochs"] = args.emulator_epochs
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    clock = {}

    def timed(name, function, *arguments):
        log(f"stage {name} ...")
        start = time.perf_counter()
        value = function(*arguments)
        clock[name] = round(time.perf_counter() - start, 1)
        log(f"stage {name} done in {clock[name]:.0f} s")
        return value

    data = timed("data", stage_data, settings, out)
    reference = timed("reference", stage_reference, settings, out)
    emulator = timed("emulator", stage_emulator, settings, data, out, args.device)
    thermalizer = timed("thermalizer", stage_thermalizer, settings, data, out, args.device)
    tuned = timed("tune", stage_tune, settings, emulator, thermalizer, data, args.device)
    runs = timed("rollouts", stage_rollouts, settings, emulator, thermalizer, reference, out, args.device)
    results = timed("analysis", analyse, settings, reference, runs, tuned, emulator, thermalizer, out, args.device)
    results["preset"] = args.preset
    results["stage_seconds"] = clock
    write_report(results, out)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
