"""Shared test setup: offline Julia packages, fixture paths, backends and small reference fields.

Physics tests run on small grids (16-64 points) in float64 so that the whole suite stays quick on a
2-core machine; each test asserts a measured quantity against a stated tolerance.
"""

from __future__ import annotations

import os
from pathlib import Path

# Never let juliacall/juliapkg reach the network from a test run (set before anything imports it).
os.environ["PYTHON_JULIAPKG_OFFLINE"] = "yes"

import numpy as np
import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def numpy64():
    from emu.backends import get_backend

    return get_backend("numpy", dtype="float64")


def relative_max_error(actual, expected) -> float:
    """max |actual - expected| / max |expected| (numpy arrays)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def band_limited_field(shape, num_points: int, max_index: int, seed: int) -> np.ndarray:
    """A random real field (*shape, n, n) whose Fourier modes all have 0 < |index| <= max_index.

    Modes sit inside the disc |index| <= max_index, so the field is smooth and, for max_index < n/3,
    inside the 2/3-rule band. Normalised to max |field| = 1 per leading index.
    """
    n = num_points
    rng = np.random.default_rng(seed)
    index_x = np.fft.rfftfreq(n, d=1.0 / n)[np.newaxis, :]
    index_y = np.fft.fftfreq(n, d=1.0 / n)[:, np.newaxis]
    radius = np.sqrt(index_x**2 + index_y**2)
    keep = (radius > 0) & (radius <= max_index)
    spectral_shape = tuple(shape) + (n, n // 2 + 1)
    noise = rng.standard_normal(spectral_shape) + 1j * rng.standard_normal(spectral_shape)
    field = np.fft.irfft2(noise * keep, s=(n, n))
    return field / np.abs(field).max(axis=(-2, -1), keepdims=True)


@pytest.fixture(scope="session")
def helpers():
    """Small helper functions shared by the test modules (`helpers.relative_max_error`, ...)."""

    class Helpers:
        pass

    h = Helpers()
    h.relative_max_error = relative_max_error
    h.band_limited_field = band_limited_field
    return h


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A 16² Kolmogorov dataset (6 trajectories x 6 snapshots, split 4/1/1) for training and rollout tests."""
    from emu.generate import GenerationPlan, generate
    from emu.systems import make_config

    directory = tmp_path_factory.mktemp("tiny")
    plan = GenerationPlan(make_config("kolmogorov", grid_size=16, viscosity=0.02), trajectories=6, length=6,
                          interval=3, spinup_steps=30, downsample=16, batch=6, split=(4 / 6, 1 / 6, 1 / 6), seed=1)
    generate(plan, directory)
    return directory


def load_script(name: str):
    """scripts/NAME.py as a module (the scripts folder on sys.path, as when it runs, for its sibling
    imports)."""
    import importlib.util
    import sys

    folder = Path(__file__).resolve().parents[1] / "scripts"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def interrupted_run(module, train, *, on_call: int = 2, before: bool = False):
    """Runs train() with module.evaluate raising KeyboardInterrupt at its `on_call`-th call (after
    that call's work, or before it with `before`): a run killed during an epoch's validation, for the
    resume tests. Asserts that the interrupt came through; module.evaluate is restored."""
    original, calls = module.evaluate, {"n": 0}

    def evaluate(*args, **kwargs):
        calls["n"] += 1
        if before and calls["n"] == on_call:
            raise KeyboardInterrupt
        result = original(*args, **kwargs)
        if calls["n"] == on_call:
            raise KeyboardInterrupt
        return result

    module.evaluate = evaluate
    try:
        with pytest.raises(KeyboardInterrupt):
            train()
    finally:
        module.evaluate = original
