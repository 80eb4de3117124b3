"""emu: fast, stable neural emulation of spatiotemporal chaos.

Layers (imports point one way only):
  physics   - `emu.backends`, `emu.grid`, `emu.spectral`, `emu.systems`, `emu.solvers`,
              `emu.diagnostics` (numpy/torch arrays, no torch.nn)
  data      - `emu.data` (HDF5 files)
  cli       - `emu.cli` (click), joins the layers

Importing emu is cheap: torch, juliacall and CuPy are imported only when a backend needs them.
"""

__version__ = "0.1.0"
