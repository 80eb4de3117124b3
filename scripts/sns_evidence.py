"""SNS evidence run: does self-refinement keep the same emulator's rollouts on the attractor, and
keep their dynamics, better than the Thermalizer, with no tuned levels?

The Thermalizer's evidence script (scripts/thermalizer_evidence.py) builds the shared parts; this one
reuses its stages in the same output folder (a folder from that script is picked up as it is, so
the bare and thermalized rollouts there are not redone) and adds SNS:

  1-5. data, reference, emulator, thermalizer, check   the Thermalizer script's stages (same presets);
  6. sns        a small SNS model (`emu train sns`: the level options of the thermalizer's small preset,
                the anchor `anchor_lag` snapshots back) on the same data;
  7. sns check  the heads on clean held-out (anchor, previous, current) groups: the levels they give clean
                frames and frames noised to s = 0..100, one frame at a time (sns_calibration.png);
  8. compare    the evaluation harness: the bare emulator, the Thermalizer with its automatic levels and
                SNS (path A, no threshold, no tuned level: the paper's Kolmogorov setting), plus any
                --paths and --threshold rows, from the same initial states;
  9. cost       network evaluations and wall time per emulator step of each method, and of the paper's
                Algorithm 2 (generation from pure noise) on a few steps;
 10. report     results.md / results.json, the harness's figures (autocorrelation.png among them).

    python scripts/sns_evidence.py --out evidence/                     # kolmogorov, this CPU (~1.5 h)
    python scripts/sns_evidence.py --system qg --out evidence-qg-jet/  # QG jet, reduced scale
    python scripts/sns_evidence.py --system qg --qg-preset eddy --out evidence-qg/   # beside the Thermalizer's QG run
    python scripts/sns_evidence.py --out evidence/ --paths A,C --threshold 5

Definitions are those of `emu.evaluation` and are repeated in results.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import thermalizer_evidence as base  # noqa: E402  (the shared stages)

# SNS small: the thermalizer small preset's level options (both heads face the same low-level problem),
# the paper's head weight 0.1 and EMA 0.999, an anchor 10 snapshots back (trajectories hold 40).
SNS_SMALL = {"preset": "small", "batch_size": 16, "lr": 1e-3, "num_levels": 1000, "level_sampling": "mixture",
             "low_level_fraction": 0.5, "low_level_max": 50, "level_target": "gaussian", "level_target_width": 0.25,
             "snapshot_stride": 4, "classifier_weight": 0.1, "ema_decay": 0.999, "anchor": True, "anchor_lag": 10}

PRESETS = {
    "small": {**base.PRESETS["small"], "sns": {**SNS_SMALL, "epochs": 40}},
    # The SNS paper's QG runs use the jet configuration (its Figure 9); reduced scale as the
    # Thermalizer's QG run (64^2 solver -> 32^2, 5 solver steps per emulator step).
    "small-qg": {**base.PRESETS["small-qg"], "preset": "jet", "sns": {**SNS_SMALL, "epochs": 40}},
    "smoke": {**base.PRESETS["smoke"], "sns": {**SNS_SMALL, "epochs": 1, "batch_size": 8, "snapshot_stride": 1,
                                               "anchor_lag": 3}},
    "smoke-qg": {**base.PRESETS["smoke-qg"], "sns": {**SNS_SMALL, "epochs": 1, "batch_size": 8,
                                                     "snapshot_stride": 1, "anchor_lag": 3}},
}
log = base.log


def stage_sns(settings: dict, data: Path, out: Path, device) -> Path:
    from emu.stabilizers.sns import SNSTrainingConfig, train_sns

    # The EMA weights of the last epoch, as for the thermalizer.
    return base._train("sns", SNSTrainingConfig, train_sns, settings, data, out, device) / "last.pt"


def stage_sns_check(settings: dict, sns: Path, data: Path, device, levels=(0, 2, 5, 10, 20, 50, 100)) -> dict:
    """The heads on clean held-out groups (valid split): median and 5-95% of (s2_hat, s1_hat) when one
    frame is noised to s and the other is clean, and on clean pairs."""
    import numpy as np
    import torch

    from emu.data.atomic import write_json_atomically
    from emu.data.loaders import FrameGroups
    from emu.stabilizers.sns import load_sns
    from emu.training.loop import resolve_device

    saved = sns.with_name("sns_check.json")
    if saved.is_file():
        return json.loads(saved.read_text())
    device = resolve_device(device)
    network, scheduler, normalizer, payload = load_sns(sns)
    network.to(device)
    lag = payload.get("anchor_lag")
    groups = FrameGroups(data, "valid", offsets=(-lag, -1, 0) if lag else (-1, 0), normalizer=normalizer)
    picks = np.unique(np.linspace(0, len(groups) - 1, min(settings.get("check_states", 64), len(groups))).astype(int))
    clean = torch.stack([groups[int(i)] for i in picks]).to(device)
    anchor = clean[:, 0] if lag else None
    generator = torch.Generator(device=device).manual_seed(0)
    rows = []
    with torch.no_grad():
        for frame in ("previous", "current"):
            for level in levels:
                previous, current = clean[:, -2].clone(), clean[:, -1].clone()
                target = previous if frame == "previous" else current
                noise = torch.randn(target.shape, generator=generator, device=device)
                noised = scheduler.add_noise(target, torch.full((target.shape[0],), level, device=device), noise)
                if frame == "previous":
                    previous = noised
                else:
                    current = noised
                s2, s1 = network.predict_levels(network.stack_inputs(anchor, previous, current))
                read = (s2 if frame == "previous" else s1).float().cpu().numpy()
                other = (s1 if frame == "previous" else s2).float().cpu().numpy()
                rows.append({"noised": frame, "level": int(level), "median": float(np.median(read)),
                             "q05": float(np.quantile(read, 0.05)), "q95": float(np.quantile(read, 0.95)),
                             "other_frame_median": float(np.median(other))})
    clean_rows = {row["noised"]: row for row in rows if row["level"] == 0}
    result = {"groups": int(clean.shape[0]), "rows": rows,
              "clean_median_level_previous": clean_rows["previous"]["median"],
              "clean_median_level_current": clean_rows["current"]["median"],
              "low_level_abs_error": float(np.mean([abs(row["median"] - row["level"]) for row in rows
                                                    if row["level"] <= 20]))}
    log(f"SNS heads on {clean.shape[0]} clean valid groups: median level previous "
        f"{result['clean_median_level_previous']:.1f}, current {result['clean_median_level_current']:.1f}")
    for row in rows:
        log(f"  {row['noised']:>8} noised to {row['level']:>3}: median read {row['median']:6.1f} "
            f"(5-95%: {row['q05']:.0f}-{row['q95']:.0f}); other frame {row['other_frame_median']:.1f}")
    _plot_heads(result, sns.parent.parent / "sns_calibration.png")
    write_json_atomically(saved, result)
    return result


def _plot_heads(result: dict, path: Path) -> None:
    from emu.plotting import _pyplot, save_figure_atomically

    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 4))
    for index, frame in enumerate(("previous", "current")):
        rows = [row for row in result["rows"] if row["noised"] == frame]
        levels = [row["level"] for row in rows]
        axis.fill_between(levels, [row["q05"] for row in rows], [row["q95"] for row in rows], color=f"C{index}",
                          alpha=0.2)
        axis.plot(levels, [row["median"] for row in rows], "o-", color=f"C{index}",
                  label=f"{frame} frame noised (head {'s2' if frame == 'previous' else 's1'})")
    top = max(row["level"] for row in result["rows"])
    axis.plot([0, top], [0, top], "k--", linewidth=1, label="ideal")
    axis.set_xlabel("true level s (one frame noised, the other clean)"), axis.set_ylabel("predicted level")
    axis.set_ylim(bottom=0)
    axis.legend(fontsize=8), axis.grid(alpha=0.3)
    figure.tight_layout()
    save_figure_atomically(figure, path)
    plt.close(figure)


def methods_to_compare(thermalizer: Path, sns: Path, automatic: dict, paths: list[str],
                       threshold: int | None) -> dict:
    methods = {
        "emulator": None,
        # The Thermalizer script's name for this row: its rollout file is reused where it exists.
        f"thermalized, automatic ({automatic['s_init']}, {automatic['s_stop']})":
            {"stabilizer": f"thermalizer:{thermalizer}", "s_init": automatic["s_init"], "s_stop": automatic["s_stop"]},
    }
    for path in paths:
        methods[f"SNS, path {path}"] = {"stabilizer": f"sns:{sns}", "stabilizer_options": {"path": path}}
    if threshold is not None:
        methods[f"SNS, path {paths[0]}, threshold {threshold}"] = {
            "stabilizer": f"sns:{sns}", "stabilizer_options": {"path": paths[0], "activation_threshold": threshold}}
    return methods


def generation_cost(emulator: Path, sns: Path, reference: Path, steps: int, device) -> dict:
    """Wall time and network evaluations per emulator step of Algorithm 2 (states drawn from pure
    noise conditioned on the previous one), from the reference's first test states."""
    import torch

    from emu.data.loaders import Snapshots
    from emu.stabilizers.sns import SNSStabilizer
    from emu.training.emulator import rollout
    from emu.training.loop import resolve_device
    from emu.training.trainer import emulator_from_checkpoint, load_checkpoint

    device = resolve_device(device)
    model, normalizer = emulator_from_checkpoint(load_checkpoint(emulator))
    model.to(device).eval()
    stabilizer = SNSStabilizer.from_checkpoint(sns, normalizer, device, mode="generate")
    frames = Snapshots(reference, "test", snapshots="first", normalizer=normalizer)
    initial = torch.stack([frames[i] for i in range(min(2, len(frames)))]).to(device)
    evaluations = []
    start = time.perf_counter()
    rollout(model, initial, steps, stabilizer=stabilizer, on_step=lambda step, state: None,
            on_record=lambda record: evaluations.append(float(record["denoising_steps"].float().mean())))
    seconds = time.perf_counter() - start
    return {"steps": steps, "batch": int(initial.shape[0]), "seconds_per_step": seconds / steps,
            "network_evaluations_per_step": sum(evaluations) / len(evaluations)}


def report(results: dict, settings: dict, preset: str, check: dict, heads: dict, generation: dict, out: Path) -> None:
    from emu.evaluation import plot_results, write_results

    methods = results["methods"]
    emulator = methods["emulator"]
    thermalized = next(name for name in methods if name.startswith("thermalized"))
    sns_rows = [name for name in methods if name.startswith("SNS")]
    first = sns_rows[0]

    def number(name, key):
        return methods[name]["summary"].get(key, math.nan)

    def worst_last_half(name):
        return max(row["spectrum_factor_last_half_wsqrt2"] for row in methods[name]["trajectories"])

    goals = {
        "horizon_sns_over_thermalizer": number(first, "stable_horizon") / max(number(thermalized, "stable_horizon"), 1.0),
        "autocorrelation_error_sns": number(first, "autocorrelation_error"),
        "autocorrelation_error_thermalizer": number(thermalized, "autocorrelation_error"),
        "spectrum_last_half_sns": worst_last_half(first),
    }
    results.update({"preset": preset, "settings": settings, "thermalizer_calibration": check["summary"],
                    "automatic_levels": check["automatic"], "sns_heads": heads, "generation_cost": generation,
                    "goals": goals})
    cost = "; ".join(
        f"{name}: {methods[name]['summary'].get('denoising_steps_per_step', 0.0):.1f} network evaluations "
        f"(denoising steps) per step over the stable part, {methods[name]['seconds_per_step'] * 1e3:.0f} ms per step"
        for name in methods)
    notes = [
        f"Preset `{preset}` ({settings['system']}{', ' + settings['preset'] if settings.get('preset') else ''}); "
        f"the same emulator ({settings['emulator']['arch']} {settings['emulator']['preset']}, "
        f"{settings['emulator']['epochs']} epoch(s)), data and initial states for every row; thermalizer "
        f"{json.dumps(settings['thermalizer'])}; SNS {json.dumps(settings['sns'])}.",
        "",
        f"SNS heads on {heads['groups']} clean held-out groups: median level of a clean previous frame "
        f"{heads['clean_median_level_previous']:.1f}, of a clean current frame {heads['clean_median_level_current']:.1f}; "
        f"mean |median s_hat - s| for s <= 20 (one frame noised): {heads['low_level_abs_error']:.1f} "
        "(sns_calibration.png). Thermalizer: median clean level "
        f"{check['summary']['clean_median_level']:.1f}, automatic levels ({check['automatic']['s_init']}, "
        f"{check['automatic']['s_stop']}).",
        "",
        f"Goals: SNS horizon / Thermalizer horizon **{goals['horizon_sns_over_thermalizer']:.2f}** (goal >= 1, "
        f"no tuned levels); autocorrelation error SNS {goals['autocorrelation_error_sns']:.3g} vs Thermalizer "
        f"{goals['autocorrelation_error_thermalizer']:.3g} (goal: lower); SNS E(k) factor over the last half "
        f"{goals['spectrum_last_half_sns']:.3g} (goal <= 1.5).",
        "",
        f"Cost: {cost}; emulator alone {emulator['seconds_per_step'] * 1e3:.0f} ms per step. Algorithm 2 "
        f"(generation from pure noise): {generation['network_evaluations_per_step']:.0f} network evaluations and "
        f"{generation['seconds_per_step']:.2f} s per step (batch {generation['batch']}, {generation['steps']} steps timed).",
    ]
    write_results(results, out, title=f"SNS evidence ({settings['system']})", notes=notes)
    plot_results(results, out, system_title=settings["system"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("evidence"), help="output folder (default: evidence/)")
    parser.add_argument("--system", choices=["kolmogorov", "qg"], default="kolmogorov")
    parser.add_argument("--preset", choices=["small", "smoke"], default="small")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--steps", type=int, default=None, help="rollout length (default: the preset's)")
    parser.add_argument("--qg-preset", choices=["jet", "eddy"], default="jet",
                        help="QG configuration (default: jet, the SNS paper's; eddy is the Thermalizer run's, whose "
                             "folder from scripts/thermalizer_evidence.py --system qg this then reuses)")
    parser.add_argument("--sns-epochs", type=int, default=None)
    parser.add_argument("--paths", default="A", help="comma-separated SNS paths to roll out (default: A)")
    parser.add_argument("--threshold", type=int, default=None,
                        help="also roll out SNS with this activation threshold (first path)")
    parser.add_argument("--generation-steps", type=int, default=2,
                        help="emulator steps of Algorithm 2 timed for the cost line (default: 2)")
    args = parser.parse_args(argv)
    preset = args.preset + ("-qg" if args.system == "qg" else "")
    settings = json.loads(json.dumps(PRESETS[preset]))
    if args.system == "qg":
        settings["preset"] = args.qg_preset
    paths = [path.strip() for path in args.paths.split(",") if path.strip()]
    if not paths or any(path not in ("A", "B", "C") for path in paths):
        parser.error(f"--paths must be a comma-separated list of A, B, C; got {args.paths!r}")
    if args.steps is not None:
        if args.steps < 10:
            parser.error(f"--steps must be >= 10, got {args.steps}")
        settings["steps"] = args.steps
    if args.sns_epochs is not None:
        settings["sns"]["epochs"] = args.sns_epochs
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    clock = {}
    timed = base.stage_timer(clock)

    from emu.evaluation import compare_stabilizers

    data = timed("data", base.stage_data, settings, out)
    reference = timed("reference", base.stage_reference, settings, out)
    emulator = timed("emulator", base.stage_emulator, settings, data, out, args.device)
    thermalizer = timed("thermalizer", base.stage_thermalizer, settings, data, out, args.device)
    check = timed("check", base.stage_check, settings, thermalizer, data, args.device)
    sns = timed("sns", stage_sns, settings, data, out, args.device)
    heads = timed("sns check", stage_sns_check, settings, sns, data, args.device)
    methods = methods_to_compare(thermalizer, sns, check["automatic"], paths, args.threshold)
    results = timed("compare", compare_stabilizers, emulator, reference, out, methods,
                    trajectories=settings["reference_trajectories"], steps=settings["steps"], device=args.device,
                    progress=base.PROGRESS, echo=log)
    generation = timed("cost", generation_cost, emulator, sns, reference, args.generation_steps, args.device)
    results["stage_seconds"] = clock
    timed("report", report, results, settings, preset, check, heads, generation, out)
    print((out / "results.md").read_text())
    return 0 if all(math.isfinite(m["summary"]["stable_horizon"]) for m in results["methods"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
