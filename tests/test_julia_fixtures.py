"""The Julia test vectors in tests/fixtures/julia cannot drift from the Python reference.

`tests/julia_fixtures.py` regenerates them here into a temporary folder; the index must be identical
byte for byte and every array identical in dtype and shape, and in value: bit for bit for integer
arrays, and for floating-point arrays bit for bit on the machine that wrote them, within round-off
elsewhere (a float64 relative 1e-12, a float32 relative 1e-6: FFTW codelets and numpy's SIMD
log/sin/cos may differ by an ulp between CPUs, which eight solver steps cannot grow past that).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

import julia_fixtures

COMMITTED = julia_fixtures.DEFAULT_DIRECTORY
MAX_FOLDER_BYTES = 2 * 1024 * 1024
TOLERANCE = {"float32": 1e-6, "float64": 1e-12}


def _load(directory: Path, index: dict, name: str) -> np.ndarray:
    entry = index["arrays"][name]
    data = (directory / entry["file"]).read_bytes()
    return np.frombuffer(data, dtype=np.dtype(entry["dtype"]).newbyteorder("<")).reshape(entry["shape"])


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("julia_fixtures")
    julia_fixtures.build_fixtures(directory)
    return directory


def test_committed_fixtures_are_small():
    files = sorted(COMMITTED.iterdir())
    assert files, f"no fixtures in {COMMITTED}; run python tests/julia_fixtures.py"
    assert sum(f.stat().st_size for f in files) < MAX_FOLDER_BYTES


def test_same_files_and_index(regenerated):
    assert sorted(p.name for p in regenerated.iterdir()) == sorted(p.name for p in COMMITTED.iterdir())
    name = julia_fixtures.INDEX_NAME
    assert (regenerated / name).read_bytes() == (COMMITTED / name).read_bytes()


def test_arrays_equal_committed(regenerated):
    index = tomllib.loads((COMMITTED / julia_fixtures.INDEX_NAME).read_text())
    assert index["format"] == 1
    for name, entry in index["arrays"].items():
        committed = _load(COMMITTED, index, name)
        fresh = _load(regenerated, index, name)
        assert (committed.dtype, committed.shape) == (fresh.dtype, fresh.shape), name
        assert committed.size * committed.dtype.itemsize == (COMMITTED / entry["file"]).stat().st_size, name
        if np.array_equal(committed, fresh):
            continue
        assert entry["dtype"] in TOLERANCE, f"{name}: integer array differs"
        scale = np.abs(committed).max()
        error = np.abs(committed.astype(np.float64) - fresh).max() / scale
        assert error < TOLERANCE[entry["dtype"]], f"{name}: relative difference {error:.3g}"


def test_fixture_contents_are_meaningful():
    """The cases test what they claim: Random123's answer, steps that change the state, sigma_0 = 0."""
    index = tomllib.loads((COMMITTED / julia_fixtures.INDEX_NAME).read_text())
    words = _load(COMMITTED, index, "philox_words")
    assert [f"{w:08x}" for w in words[0]] == ["6627e8d5", "e169c58d", "bc57ac4c", "9b00dbd8"]
    for case in index["solver"].values():
        initial, final = _load(COMMITTED, index, case["initial"]), _load(COMMITTED, index, case["final"])
        assert np.isfinite(final).all()
        change = np.abs(final - initial).max() / np.abs(initial).max()
        assert 1e-3 < change < 3.0, (case["system"], case["dtype"], change)
    for dtype in julia_fixtures.DTYPES:
        assert _load(COMMITTED, index, index["ddpm"][dtype]["posterior_std"])[0] == 0.0
