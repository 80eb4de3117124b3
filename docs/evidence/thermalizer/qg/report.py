"""QG evidence table from the rollouts the evidence script finished (emulator, automatic levels):
the same harness on the same files; the grid-search and diagnostic rollouts were not run (time)."""
import json
from emu.evaluation import compare_stabilizers, write_results, plot_results
check = json.load(open("/work/evqg/thermalizer/check.json"))
auto = check["automatic"]
spec = "thermalizer:/work/evqg/thermalizer/last.pt"
methods = {"emulator": None,
           f"thermalized, automatic ({auto['s_init']}, {auto['s_stop']})": {"stabilizer": spec, "s_init": auto["s_init"], "s_stop": auto["s_stop"]}}
results = compare_stabilizers("/work/evqg/emulator/best.pt", "/work/evqg/reference", "/work/evqg", methods, trajectories=8, steps=3000, device="cpu")
summary = check["summary"]
base = results["methods"]["emulator"]["summary"]["stable_horizon"]
name = list(methods)[1]
ratio = results["methods"][name]["summary"]["stable_horizon"] / base
notes = [f"Preset `small-qg` (two-layer QG, eddy, 64² solver -> 32², 5 solver steps per emulator step); same stages as the Kolmogorov run. "
         f"Calibration on {check['states']} clean held-out states: median predicted level {summary['clean_median_level']:.1f}, "
         f"q95 {summary['clean_q95_level']:.1f}, mean |s_hat - s| for s <= 20: {summary['low_level_abs_error']:.2f}. "
         f"Automatic levels ({auto['s_init']}, {auto['s_stop']}); horizon ratio {ratio:.2f}x (goal >= 10x). "
         "The grid-search and diagnostic rollouts of `--diagnostics` were not run in this session (time); "
         "rerun `python scripts/thermalizer_evidence.py --system qg --out evidence-qg/ --diagnostics` to add them (finished rollouts are reused)."]
write_results(results, "/work/evqg", title="Thermalizer evidence (qg)", notes=notes)
plot_results(results, "/work/evqg", system_title="qg")
print(open("/work/evqg/results.md").read())
