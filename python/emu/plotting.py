"""Pictures of runs: the final field(s), the kinetic-energy spectrum and the energy history."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def save_figure_atomically(figure, path) -> Path:
    """Saves a matplotlib figure to `path` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    try:
        from emu.data.atomic import default_file_mode

        os.chmod(temporary, default_file_mode())  # mkstemp makes 0600
        figure.savefig(temporary, dpi=110, bbox_inches="tight")
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return path


def plot_run(run_path, png_path, member: int = 0) -> Path:
    """Plots the last snapshot of an emu file: each field of batch member `member`, the batch-mean
    isotropic KE spectrum of that snapshot, and the energy of every member against time."""
    from emu.backends import get_backend
    from emu.data.hdf5 import read_config, read_run
    from emu.systems import make_equation

    plt = _pyplot()
    run = read_run(run_path)
    config = read_config(run_path)
    import json

    names = json.loads(run["attrs"]["field_names"])
    units = json.loads(run["attrs"]["field_units"])
    final = run["fields"][-1]
    saved_size = final.shape[-1]
    coarse = config if saved_size == config.grid_size else config.replace(grid_size=saved_size)
    equation = make_equation(coarse, get_backend("numpy"))
    k, spectrum = equation.kinetic_energy_spectrum(equation.to_state(final.astype(np.float64)))
    if config.system == "qg":
        time_axis, time_label = run["time"] / 86400.0, "time [days]"
    else:
        time_axis, time_label = run["time"], "time"

    fields = final[member] if final.ndim == 4 else final[member][np.newaxis]
    columns = len(names) + 2
    figure, axes = plt.subplots(1, columns, figsize=(4.3 * columns, 4.0))
    for axis, field, name, unit in zip(axes, fields, names, units):
        limit = float(np.abs(field).max()) or 1.0
        image = axis.imshow(field, origin="lower", cmap="RdBu_r", vmin=-limit, vmax=limit,
                            extent=(0, config.domain_extent if config.system == "kolmogorov" else config.domain_length / 1e3,) * 2)
        final_time = f"{run['time'][-1] / 86400.0:.1f} days" if config.system == "qg" else f"{run['time'][-1]:.4g}"
        axis.set_title(f"{name} [{unit}], t = {final_time}")
        axis.set_xlabel("x" if config.system == "kolmogorov" else "x [km]")
        axis.set_ylabel("y" if config.system == "kolmogorov" else "y [km]")
        figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    spectrum_axis, energy_axis = axes[-2], axes[-1]
    mean_spectrum = spectrum.mean(axis=0)
    positive = mean_spectrum > 0
    spectrum_axis.loglog(k[positive], mean_spectrum[positive], color="k")
    if positive.any():  # the filtered tail falls to round-off; keep twelve decades in view
        top = mean_spectrum[positive].max()
        spectrum_axis.set_ylim(max(mean_spectrum[positive].min(), top * 1e-12) / 2, top * 2)
    spectrum_axis.set_xlabel("wavenumber k" + (" [rad/m]" if config.system == "qg" else ""))
    spectrum_axis.set_ylabel("E(k)")
    spectrum_axis.set_title(f"KE spectrum, batch mean ({saved_size}^2)")
    spectrum_axis.grid(True, which="both", alpha=0.3)
    energy_axis.plot(time_axis, run["energy"], lw=1)
    energy_axis.set_xlabel(time_label)
    energy_axis.set_ylabel("kinetic energy")
    energy_axis.set_yscale("log" if np.all(run["energy"] > 0) else "linear")
    energy_axis.set_title(f"energy, {run['energy'].shape[1]} member(s)")
    figure.suptitle(f"{config.system} ({config.preset}), {config.grid_size}^2 solver, status: {run['attrs']['status']}")
    figure.tight_layout()
    path = save_figure_atomically(figure, png_path)
    plt.close(figure)
    return path
