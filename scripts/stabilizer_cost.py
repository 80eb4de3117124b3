"""Cost per emulator step of every stabiliser, and Cohesion's plan / autoregressive speed-up, measured
side by side in interleaved rounds in one process (the evidence runs' wall times are taken one
method after another, on a shared machine; this is the comparison to quote).

From an evidence folder holding emulator/, thermalizer/, sns/, koopman/ and score/ (any missing part
is left out), on the first test states of its reference:

  - emulator step; Thermalizer correction (automatic levels) after it; SNS refinement (path A, path
    C, path A with an activation threshold) after it: one emulator step each, the corrected state
    carried on, so the stabilisers see states from their own rollouts;
  - Cohesion over a short horizon: plan (R = T) and autoregressive (R = 1) forecasts, same settings.

Each round times every entry once, in a rotating order; the report gives the median over rounds of
each entry's time and of its ratio to the emulator step (or to plan mode) within the round.

    python scripts/stabilizer_cost.py --folder evidence/ --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, required=True, help="an evidence folder (thermalizer/sns/cohesion)")
    parser.add_argument("--reference", type=Path, default=None, help="reference dataset (default: FOLDER/reference)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="emulator steps per stabiliser entry and round")
    parser.add_argument("--horizon", type=int, default=20, help="Cohesion forecast frames per round")
    parser.add_argument("--sampler-steps", type=int, default=16)
    parser.add_argument("--window-stride", type=int, default=3, help="the strided plan row's window stride")
    parser.add_argument("--threshold", type=int, default=5, help="SNS activation threshold of the thresholded entry")
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default: FOLDER/cost.json)")
    args = parser.parse_args(argv)

    import torch

    from emu.backends import set_cpu_threads
    from emu.data.atomic import write_json_atomically
    from emu.data.loaders import Snapshots
    from emu.stabilizers import load_stabilizer
    from emu.stabilizers.base import RolloutHistory
    from emu.training.trainer import emulator_from_checkpoint, load_checkpoint

    set_cpu_threads(1)
    folder = args.folder
    reference = args.reference or folder / "reference"
    emulator, normalizer = emulator_from_checkpoint(load_checkpoint(folder / "emulator" / "best.pt"))
    emulator.eval()
    frames = Snapshots(reference, "test", snapshots="first", normalizer=normalizer)
    initial = torch.stack([frames[i] for i in range(len(frames))])
    entries = {}

    def stepping(stabilizer):
        state = {"x": initial.clone(), "previous": initial.clone(), "step": 0}

        def run():
            with torch.no_grad():
                for _ in range(args.steps):
                    previous = state["x"]
                    x = emulator(previous)
                    state["step"] += 1
                    if stabilizer is not None:
                        x, _ = stabilizer.correct(x, RolloutHistory(initial, previous, state["step"]))
                    state["x"] = x
            return args.steps
        return run

    entries["emulator"] = stepping(None)
    thermalizer = folder / "thermalizer" / "last.pt"
    if thermalizer.is_file():
        entries["thermalizer (automatic levels)"] = stepping(load_stabilizer(f"thermalizer:{thermalizer}", normalizer, "cpu"))
    sns = folder / "sns" / "last.pt"
    if sns.is_file():
        for name, options in (("SNS path A", {"path": "A"}), ("SNS path C", {"path": "C"}),
                              (f"SNS path A, threshold {args.threshold}", {"path": "A",
                                                                         "activation_threshold": args.threshold})):
            entries[name] = stepping(load_stabilizer(f"sns:{sns}", normalizer, "cpu", **options))
    koopman, score = folder / "koopman" / "last.pt", folder / "score" / "last.pt"
    if koopman.is_file() and score.is_file():
        from emu.stabilizers.cohesion import CohesionSettings, forecast
        from emu.training.koopman import load_koopman
        from emu.training.score import load_score

        prior_model, _, _ = load_koopman(koopman)
        network, schedule, _, _ = load_score(score)
        settings = CohesionSettings(steps=args.sampler_steps, corrections=1, tau=0.1, window_stride=1)
        strided = CohesionSettings(steps=args.sampler_steps, corrections=1, tau=0.1, window_stride=args.window_stride)
        for name, mode, chosen in (("Cohesion plan", "plan", settings), ("Cohesion autoregressive", "autoregressive", settings),
                                   (f"Cohesion plan, window stride {args.window_stride}", "plan", strided)):
            def run(mode=mode, chosen=chosen):
                forecast(prior_model, network, schedule, initial, args.horizon, mode=mode, settings=chosen,
                         generator=torch.Generator().manual_seed(0))
                return args.horizon
            entries[name] = run
    names = list(entries)
    seconds = {name: [] for name in names}
    for round_index in range(args.rounds):
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        for name in order:
            start = time.perf_counter()
            count = entries[name]()
            seconds[name].append((time.perf_counter() - start) / count)
        print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(f"{n} {seconds[n][-1] * 1e3:.1f} ms" for n in names),
              flush=True)
    report = {"batch": int(initial.shape[0]), "rounds": args.rounds, "steps": args.steps, "horizon": args.horizon,
              "sampler_steps": args.sampler_steps, "entries": {}}
    for name in names:
        entry = {"median_ms_per_step": statistics.median(seconds[name]) * 1e3}
        if not name.startswith("Cohesion"):
            entry["ratio_to_emulator"] = statistics.median(
                s / e for s, e in zip(seconds[name], seconds["emulator"]))
        report["entries"][name] = entry
    if "Cohesion plan" in seconds:
        for key, plan_name in (("cohesion_speedup_plan_over_autoregressive", "Cohesion plan"),
                               ("cohesion_speedup_strided_plan_over_autoregressive",
                                f"Cohesion plan, window stride {args.window_stride}")):
            report[key] = statistics.median(a / p for a, p in zip(seconds["Cohesion autoregressive"], seconds[plan_name]))
        report["window_stride"] = args.window_stride
    out = args.out or folder / "cost.json"
    write_json_atomically(out, report)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
