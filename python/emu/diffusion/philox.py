"""Counter-based Gaussian noise: Philox4x32-10 + Box-Muller, the numpy reference of every backend.

The fused DDPM kernels (CUDA C in `kernels/`, Julia in `julia/`) draw their noise inside the kernel
from a counter-based generator, so a run is reproducible from (seed, offset) alone and every element
of a batch gets its own, independent stream with no generator state to carry. This module is the
reference those kernels are tested against, bit for bit on the uint32 outputs.

Philox4x32-10 (Salmon, Moraes, Dror & Shaw 2011, "Parallel random numbers: as easy as 1, 2, 3",
SC'11; Random123): a 128-bit counter and a 64-bit key give four uint32 words through ten rounds of

    (hi0, lo0) = mulhilo(0xD2511F53, c0); (hi1, lo1) = mulhilo(0xCD9E8D57, c2)
    c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0);   k += (0x9E3779B9, 0xBB67AE85) between rounds.

emu's noise convention (the same in numpy, CUDA C and Julia):

    element i of a C-ordered tensor (flat index; batch-major, so sample b owns a contiguous range)
    group g = i // 4, lane = i % 4
    counter = (g mod 2^32, g div 2^32, offset mod 2^32, offset div 2^32),  key = (seed mod 2^32, seed div 2^32)
    (r0, r1, r2, r3) = philox4x32_10(counter, key)
    u(r) = (r + 0.5) 2^-32 in (0, 1)
    z[4g + 0] = sqrt(-2 ln u(r0)) cos(2 pi u(r1)),  z[4g + 1] = sqrt(-2 ln u(r0)) sin(2 pi u(r1))
    z[4g + 2] = sqrt(-2 ln u(r2)) cos(2 pi u(r3)),  z[4g + 3] = sqrt(-2 ln u(r2)) sin(2 pi u(r3))

Box-Muller is evaluated in float64 in every backend and then rounded to the output dtype, so float32
noise agrees across backends to the last bit wherever the libraries' float64 log/sin/cos agree
(they are correctly rounded or within 1 ulp, far below float32's resolution). `offset` is the
call's position in a run (a DDPM chain uses offset = step number), so consecutive calls with one seed
never reuse a counter.
"""

from __future__ import annotations

import numpy as np

PHILOX_M0 = np.uint64(0xD2511F53)
PHILOX_M1 = np.uint64(0xCD9E8D57)
PHILOX_W0 = np.uint64(0x9E3779B9)
PHILOX_W1 = np.uint64(0xBB67AE85)
PHILOX_ROUNDS = 10
TWO_POW_MINUS_32 = 2.0**-32
_MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Philox4x32-10 of each counter: uint32 arrays counter (..., 4) and key (..., 2) -> (..., 4).

    Known answers (Random123 kat_vectors): counter 0, key 0 -> 6627e8d5 e169c58d bc57ac4c 9b00dbd8.
    """
    counter = np.asarray(counter, dtype=np.uint32)
    key = np.asarray(key, dtype=np.uint32)
    if counter.shape[-1:] != (4,) or key.shape[-1:] != (2,):
        raise ValueError(f"counter must have shape (..., 4) and key (..., 2), got {counter.shape} and {key.shape}")
    c0, c1, c2, c3 = (counter[..., j].astype(np.uint64) for j in range(4))
    k0, k1 = (key[..., j].astype(np.uint64) for j in range(2))
    for round_index in range(PHILOX_ROUNDS):
        if round_index > 0:  # the key schedule: bump before every round but the first
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        product0 = PHILOX_M0 * c0
        product1 = PHILOX_M1 * c2
        hi0, lo0 = product0 >> np.uint64(32), product0 & _MASK32
        hi1, lo1 = product1 >> np.uint64(32), product1 & _MASK32
        c0, c1, c2, c3 = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
    return np.stack([c0, c1, c2, c3], axis=-1).astype(np.uint32)


def philox_counters(num_groups: int, offset: int) -> np.ndarray:
    """The counters (num_groups, 4) of groups 0..num_groups-1 at call `offset` (see the module docstring)."""
    groups = np.arange(num_groups, dtype=np.uint64)
    offset = check_uint64("offset", offset)
    counter = np.empty((num_groups, 4), dtype=np.uint32)
    counter[:, 0] = groups & _MASK32
    counter[:, 1] = groups >> np.uint64(32)
    counter[:, 2] = offset & 0xFFFFFFFF
    counter[:, 3] = offset >> 32
    return counter


def philox_key(seed: int) -> np.ndarray:
    """The key (2,) of a 64-bit seed: (low word, high word)."""
    seed = check_uint64("seed", seed)
    return np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint32)


def box_muller(r_radius: np.ndarray, r_angle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two standard normals (float64) from two uint32 words: sqrt(-2 ln u0) (cos, sin)(2 pi u1)."""
    u_radius = (r_radius.astype(np.float64) + 0.5) * TWO_POW_MINUS_32
    u_angle = (r_angle.astype(np.float64) + 0.5) * TWO_POW_MINUS_32
    radius = np.sqrt(-2.0 * np.log(u_radius))
    angle = 2.0 * np.pi * u_angle
    return radius * np.cos(angle), radius * np.sin(angle)


def philox_normal(shape: tuple[int, ...], seed: int, offset: int = 0, dtype=np.float32) -> np.ndarray:
    """Standard normal noise of `shape` from (seed, offset) by emu's convention (module docstring).

    Args:
        shape: the C-ordered tensor shape (batch first).
        seed: 64-bit unsigned seed (the Philox key).
        offset: 64-bit unsigned call index (the counter's high half).
        dtype: float32 or float64; the values are computed in float64 and rounded once.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    size = int(np.prod(shape, dtype=np.int64))
    num_groups = -(-size // 4)
    words = philox4x32_10(philox_counters(num_groups, offset), philox_key(seed))
    z0, z1 = box_muller(words[:, 0], words[:, 1])
    z2, z3 = box_muller(words[:, 2], words[:, 3])
    normals = np.stack([z0, z1, z2, z3], axis=-1).reshape(-1)[:size]
    return normals.astype(dtype).reshape(shape)


def check_uint64(name: str, value: int) -> int:
    """`value` as an int when it is an integer in [0, 2**64 - 1] (a Philox seed or offset), else ValueError."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or not 0 <= int(value) < 2**64:
        raise ValueError(f"{name} must be an integer in [0, 2**64 - 1], got {value!r}")
    return int(value)
