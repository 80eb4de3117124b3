"""emu: fast, stable neural emulation of spatiotemporal chaos.

Layers (imports point one way only):
  physics   - `emu.backends`, `emu.grid`, `emu.spectral`, `emu.systems`, `emu.solvers`,
              `emu.diagnostics` (numpy/torch arrays, no torch.nn)
  learning  - `emu.models` (torch.nn networks; imports nothing else from emu)
  data      - `emu.data` (HDF5 files, torch loaders)
  joining   - `emu.runs`, `emu.generate`, `emu.training` (solvers + files, models + data)
  cli       - `emu.cli` (click)

Importing emu is cheap: torch, juliacall and CuPy are imported only when a backend needs them.
"""

__version__ = "0.1.0"
