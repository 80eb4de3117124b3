"""Shared test vectors for the Julia package (`julia/test/runtests.jl`), made by the Python reference.

    python tests/julia_fixtures.py            # rewrites tests/fixtures/julia/

Format, readable by Julia's standard library alone: each array is a raw little-endian binary file
(`<name>.bin`, C order) and `index.toml` lists, under `[arrays.<name>]`, its `file`, `dtype`
("float32", "float64", "uint32", "int64") and `shape` in numpy (C) order. Julia reads the bytes into
an array of the reversed shape: numpy `(batch, [layer], ny, nx)` is Julia `(nx, ny, [layer], batch)`,
the same memory. Scalars (config JSON, step counts, seeds, offsets) sit in the other tables:

  [solver.<system>_<dtype>]  system, dtype, config_json (`config.to_json()`), batch, num_steps,
                             initial / final (array names): physical fields before and after
                             `num_steps` steps of the system's default stepper (numpy backend,
                             FFTW_ESTIMATE plans: `get_backend(..., reproducible=True)`).
  [philox]                   seed, offset, counters / keys / words (philox4x32_10 of each row),
                             normal_float32 / normal_float64 (`philox_normal(shape, seed, offset)`).
  [ddpm.<dtype>]             levels and the per-sample coefficient vectors (float64, from the cosine
                             schedule with 1000 levels), inputs noisy / predicted_noise / noise /
                             clean, and outputs step_given_noise (`ddpm_step(..., noise=noise)`),
                             step_philox (noise = philox_normal(shape, seed, offset)), add_noise
                             (same Philox noise) and tweedie.

Everything is small (32^2 grids, batch 2): the folder stays well under 1 MB and builds in seconds.
`tests/test_julia_fixtures.py` regenerates the folder and compares it with the committed one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DEFAULT_DIRECTORY = Path(__file__).resolve().parent / "fixtures" / "julia"
INDEX_NAME = "index.toml"

GRID_SIZE = 32
BATCH = 2
NUM_STEPS = 8  # covers AB3's forward-Euler and AB2 start-up steps and five full AB3 steps
DTYPES = ("float32", "float64")
SYSTEMS = ("kolmogorov", "qg")

PHILOX_SEED = 2**33 + 20251123  # high key word non-zero
PHILOX_OFFSET = 2**32 + 7  # high counter word non-zero
DDPM_SHAPE = (2, 3, 5, 7)  # numpy order; 105 elements per sample, so Philox groups straddle samples
DDPM_LEVELS = (0, 517)  # sample 0 at t = 0 (sigma exactly 0), sample 1 mid-chain
NUM_LEVELS = 1000


def _qg_initial_fields(num_points: int, batch: int, seed: int) -> np.ndarray:
    """Smooth random PV (batch, 2, n, n) with |q| <= 2e-5 1/s, modes 0 < |index| <= 6.

    Large enough that the Jacobian matters over a few steps (pyqg's default start, 1e-7 noise, would
    leave the test nearly linear), small enough for a Courant number ~0.01.
    """
    n = num_points
    rng = np.random.default_rng(seed)
    index_x = np.fft.rfftfreq(n, d=1.0 / n)[np.newaxis, :]
    index_y = np.fft.fftfreq(n, d=1.0 / n)[:, np.newaxis]
    radius = np.sqrt(index_x**2 + index_y**2)
    keep = (radius > 0) & (radius <= 6)
    shape = (batch, 2, n, n // 2 + 1)
    noise = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    field = np.fft.irfft2(noise * keep, s=(n, n))
    return 2e-5 * field / np.abs(field).max()


def _solver_case(system: str, dtype: str) -> tuple[dict, dict[str, np.ndarray]]:
    from emu.backends import get_backend
    from emu.solvers import make_stepper
    from emu.systems import make_config, make_equation

    config = make_config(system, grid_size=GRID_SIZE)
    backend = get_backend("numpy", dtype=dtype, reproducible=True)
    equation = make_equation(config, backend)
    if system == "kolmogorov":
        initial = equation.initial_condition(BATCH, seed=1)
    else:
        initial = _qg_initial_fields(GRID_SIZE, BATCH, seed=2)
    initial = initial.astype(dtype)
    stepper = make_stepper(equation, config.dt)
    state = stepper.init(equation.to_state(initial))
    for _ in range(NUM_STEPS):
        state = stepper.step(state)
    final = backend.to_numpy(equation.fields(state.state_hat)).astype(dtype)
    name = f"{system}_{dtype}"
    scalars = {"system": system, "dtype": dtype, "config_json": config.to_json(), "batch": BATCH,
               "num_steps": NUM_STEPS, "stepper": stepper.name, "initial": f"{name}_initial",
               "final": f"{name}_final"}
    return scalars, {f"{name}_initial": initial, f"{name}_final": final}


def _philox_case() -> tuple[dict, dict[str, np.ndarray]]:
    from emu.diffusion.philox import philox4x32_10, philox_normal

    rng = np.random.default_rng(3)
    known = [  # Random123 kat_vectors: zeros, all ones, digits of pi
        ([0, 0, 0, 0], [0, 0]),
        ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2),
        ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]),
    ]
    counters = np.array([c for c, _ in known] + rng.integers(0, 2**32, (13, 4)).tolist(), dtype=np.uint32)
    keys = np.array([k for _, k in known] + rng.integers(0, 2**32, (13, 2)).tolist(), dtype=np.uint32)
    arrays = {
        "philox_counters": counters,
        "philox_keys": keys,
        "philox_words": philox4x32_10(counters, keys),
        "philox_normal_float32": philox_normal(DDPM_SHAPE, PHILOX_SEED, PHILOX_OFFSET, np.float32),
        "philox_normal_float64": philox_normal(DDPM_SHAPE, PHILOX_SEED, PHILOX_OFFSET, np.float64),
    }
    scalars = {"seed": PHILOX_SEED, "offset": PHILOX_OFFSET, "counters": "philox_counters", "keys": "philox_keys",
               "words": "philox_words", "normal_float32": "philox_normal_float32",
               "normal_float64": "philox_normal_float64"}
    return scalars, arrays


def _ddpm_case(dtype: str) -> tuple[dict, dict[str, np.ndarray]]:
    import torch

    from emu.diffusion.ddpm import add_noise, ddpm_step, tweedie
    from emu.diffusion.philox import philox_normal
    from emu.diffusion.schedules import CosineSchedule

    schedule = CosineSchedule(NUM_LEVELS)
    levels = torch.tensor(DDPM_LEVELS, dtype=torch.int64)
    rng = np.random.default_rng(4 if dtype == "float32" else 5)
    noisy, predicted_noise, noise, clean = (rng.standard_normal(DDPM_SHAPE).astype(dtype) for _ in range(4))
    philox = philox_normal(DDPM_SHAPE, PHILOX_SEED, PHILOX_OFFSET, np.dtype(dtype))

    def tensor(array):
        return torch.from_numpy(np.ascontiguousarray(array))

    def table(name):
        return schedule.table(name)[levels].numpy()

    prefix = f"ddpm_{dtype}"
    arrays = {
        f"{prefix}_levels": np.array(DDPM_LEVELS, dtype=np.int64),
        f"{prefix}_reciprocal_sqrt_alpha": table("reciprocal_sqrt_alphas"),
        f"{prefix}_noise_coefficient": table("noise_coefficients"),
        f"{prefix}_posterior_std": table("posterior_stds"),
        f"{prefix}_sqrt_alpha_bar": table("sqrt_alpha_bars"),
        f"{prefix}_sqrt_one_minus_alpha_bar": table("sqrt_one_minus_alpha_bars"),
        f"{prefix}_noisy": noisy,
        f"{prefix}_predicted_noise": predicted_noise,
        f"{prefix}_noise": noise,
        f"{prefix}_clean": clean,
        f"{prefix}_step_given_noise": ddpm_step(tensor(noisy), levels, tensor(predicted_noise), schedule,
                                                noise=tensor(noise)).numpy(),
        f"{prefix}_step_philox": ddpm_step(tensor(noisy), levels, tensor(predicted_noise), schedule,
                                           noise=tensor(philox)).numpy(),
        f"{prefix}_add_noise": add_noise(schedule, tensor(clean), levels, tensor(philox)).numpy(),
        f"{prefix}_tweedie": tweedie(schedule, tensor(noisy), levels, tensor(predicted_noise)).numpy(),
    }
    names = ("levels", "reciprocal_sqrt_alpha", "noise_coefficient", "posterior_std", "sqrt_alpha_bar",
             "sqrt_one_minus_alpha_bar", "noisy", "predicted_noise", "noise", "clean", "step_given_noise",
             "step_philox", "add_noise", "tweedie")
    scalars = {"dtype": dtype, "seed": PHILOX_SEED, "offset": PHILOX_OFFSET, "num_levels": NUM_LEVELS}
    scalars.update({name: f"{prefix}_{name}" for name in names})
    return scalars, arrays


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise ValueError(f"TOML integers are 64-bit signed, got {value}")
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_table(name: str, values: dict) -> list[str]:
    return [f"[{name}]"] + [f"{key} = {_toml_value(value)}" for key, value in values.items()] + [""]


def build_fixtures(directory) -> dict[str, Path]:
    """Writes every fixture array and `index.toml` into `directory`; returns {file name: path}."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["# Test vectors for julia/test/runtests.jl, written by tests/julia_fixtures.py: do not edit.",
             "# Arrays: raw little-endian C-order binaries; shape in numpy order (Julia reads it reversed).",
             "format = 1", ""]
    arrays: dict[str, np.ndarray] = {}
    for system in SYSTEMS:
        for dtype in DTYPES:
            scalars, case_arrays = _solver_case(system, dtype)
            lines += _toml_table(f"solver.{system}_{dtype}", scalars)
            arrays.update(case_arrays)
    scalars, case_arrays = _philox_case()
    lines += _toml_table("philox", scalars)
    arrays.update(case_arrays)
    for dtype in DTYPES:
        scalars, case_arrays = _ddpm_case(dtype)
        lines += _toml_table(f"ddpm.{dtype}", scalars)
        arrays.update(case_arrays)
    written = {}
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        little = array.astype(array.dtype.newbyteorder("<"), copy=False)
        path = directory / f"{name}.bin"
        path.write_bytes(little.tobytes(order="C"))
        written[path.name] = path
        lines += _toml_table(f"arrays.{name}", {"file": path.name, "dtype": str(array.dtype),
                                                "shape": list(array.shape)})
    index = directory / INDEX_NAME
    index.write_text("\n".join(lines))
    written[INDEX_NAME] = index
    return written


if __name__ == "__main__":
    for file_name, file_path in sorted(build_fixtures(DEFAULT_DIRECTORY).items()):
        print(f"{file_path.stat().st_size:8d}  {file_name}")
