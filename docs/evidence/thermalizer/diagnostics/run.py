from emu.evaluation import compare_stabilizers, write_results, plot_results
spec = "thermalizer:/work/ev/thermalizer/last.pt"
methods = {"emulator": None,
           "fixed level 42 -> 21": {"stabilizer": spec, "s_init": 42, "s_stop": 21, "stabilizer_options": {"fixed_level": 42}},
           "fixed level 100 -> 50": {"stabilizer": spec, "s_init": 100, "s_stop": 50, "stabilizer_options": {"fixed_level": 100}}}
results = compare_stabilizers("/work/ev/emulator/best.pt", "/work/ev/reference", "/work/evdiag", methods, trajectories=4, steps=600, device="cpu")
write_results(results, "/work/evdiag", title="Thermalizer diagnostics: fixed levels (no classifier)")
plot_results(results, "/work/evdiag", system_title="kolmogorov")
print(open("/work/evdiag/results.md").read())
