"""emu: fast, stable neural emulation of spatiotemporal chaos.

Layers (imports point one way only):
  physics   - `emu.backends`, `emu.grid`, `emu.spectral`, `emu.systems`, `emu.solvers`,
              `emu.diagnostics` (numpy/torch arrays, no torch.nn)
  learning  - `emu.models` (torch.nn networks; imports nothing else from emu)
  data      - `emu.data` (HDF5 files, torch loaders)
  sampling  - `emu.diffusion` (schedules, DDPM step, level sampling and targets; no networks)
  joining   - `emu.runs`, `emu.generate`, `emu.training` (solvers + files, models + data),
              `emu.stabilizers` (one module per method: objective, inference, calibration),
              `emu.evaluation` (the harness that judges stabilisers side by side)
  cli       - `emu.cli` (click)

Importing emu is cheap: torch, juliacall and CuPy are imported only when a backend needs them.
"""

__version__ = "0.1.0"
