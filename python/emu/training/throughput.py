"""Emulator throughput: samples per second for inference and for training, per architecture and preset.

    python -m emu.cli bench --emulator unet:small,drn:small,drn:paper --grid 64 --batch 8

Speed is measured here (and in scripts/), never in tests. For each network the measurement builds
the residual emulator on random weights and random normalised fields of shape (batch, C, grid, grid)
and reports:

    inference  one emulator step x -> x + Phi(x + tau n) under torch.no_grad, samples/s
               (batch * steps/s; what a batched rollout produces);
    training   one AdamW step on the unrolled loss over `unroll` steps with backprop through the
               unroll (the trainer's objective), windows/s (batch * optimizer steps/s). One window
               costs `unroll` forward and backward passes, so training windows/s is roughly
               inference samples/s / (3 * unroll).

Options mirror the trainer: `amp` runs the step under bfloat16 autocast, `compile` wraps the
network in torch.compile (compilation happens during warm-up and is not timed). On CUDA every
timed interval ends with torch.cuda.synchronize, so the numbers are wall time of finished work.
"""

from __future__ import annotations

from typing import Callable

import torch

from emu.bench import calls_per_second
from emu.models import count_parameters, make_model
from emu.training.emulator import ResidualEmulator, unrolled_loss
from emu.training.loop import resolve_device


def parse_emulator_specs(text: str) -> list[tuple[str, str]]:
    """'unet:small,drn:paper' -> [('unet', 'small'), ('drn', 'paper')]; a bare arch means preset small."""
    specs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        arch, _, preset = item.partition(":")
        specs.append((arch, preset or "small"))
    if not specs:
        raise ValueError(f"emulator must name at least one ARCH[:PRESET], e.g. 'drn:small', got {text!r}")
    return specs


def emulator_throughput(arch: str, preset: str, *, channels: int = 1, grid: int = 64, batch: int = 8, unroll: int = 4,
                        noise: float = 1e-5, seconds: float = 3.0, device: str | None = None, amp: bool = False,
                        compile: bool = False, warmup: int = 2, seed: int = 0) -> dict:
    """Inference samples/s and training windows/s of one emulator (see the module docstring).

    Returns a dict with arch, preset, parameters, grid, batch, unroll, device, inference_samples_per_second,
    training_windows_per_second and the milliseconds per sample of each.
    """
    for name, value, low in (("channels", channels, 1), ("grid", grid, 4), ("batch", batch, 1), ("unroll", unroll, 1)):
        if not (isinstance(value, int) and value >= low):
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    device = resolve_device(device)  # "cuda" without a GPU: one line, not torch's assertion
    torch.manual_seed(seed)
    network = make_model(arch, preset, channels, channels)
    emulator = ResidualEmulator(network, noise=noise).to(device)
    if compile:
        emulator.network = torch.compile(emulator.network)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
    generator = torch.Generator(device=device).manual_seed(seed)
    state = torch.randn(batch, channels, grid, grid, device=device, generator=generator)
    window = torch.randn(batch, unroll + 1, channels, grid, grid, device=device, generator=generator)

    emulator.eval()

    def infer():
        with torch.no_grad(), autocast:
            emulator(state, generator)

    inference = calls_per_second(infer, seconds, warmup, minimum=3, synchronize=synchronize)

    emulator.train()
    optimizer = torch.optim.AdamW(emulator.parameters(), lr=1e-5, weight_decay=0.05)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss, _ = unrolled_loss(emulator, window, generator)
        loss.backward()
        optimizer.step()

    training = calls_per_second(train_step, seconds, warmup, minimum=3, synchronize=synchronize)
    return {
        "arch": arch, "preset": preset, "parameters": count_parameters(network), "channels": channels, "grid": grid,
        "batch": batch, "unroll": unroll, "device": str(device), "amp": amp, "compile": compile,
        "inference_samples_per_second": batch * inference, "training_windows_per_second": batch * training,
        "inference_ms_per_sample": 1e3 / (batch * inference), "training_ms_per_window": 1e3 / (batch * training),
    }


def run_emulator_benchmarks(specs: list[tuple[str, str]], *, grids: list[int], channels: int, batch: int,
                            unroll: int, seconds: float, device: str | None, amp: bool, compile: bool,
                            echo: Callable[[str], None] = print) -> list[dict]:
    """Measures every (spec, grid) pair and prints a table; returns the rows."""
    threads = torch.get_num_threads()
    echo(f"emu bench --emulator: {channels} channel(s), batch {batch}, unroll {unroll}, ~{seconds:g} s per measurement, "
         f"{'amp bf16, ' if amp else ''}{'compiled, ' if compile else ''}torch {torch.__version__}, {threads} CPU threads")
    header = (f"{'network':<14}{'params':>12}{'grid':>6}{'device':>8}{'infer samples/s':>17}{'ms/sample':>11}"
              f"{'train windows/s':>17}{'ms/window':>11}")
    echo(header)
    echo("-" * len(header))
    rows = []
    for arch, preset in specs:
        for grid in grids:
            row = emulator_throughput(arch, preset, channels=channels, grid=grid, batch=batch, unroll=unroll,
                                      seconds=seconds, device=device, amp=amp, compile=compile)
            rows.append(row)
            echo(f"{arch + ':' + preset:<14}{row['parameters']:>12,}{grid:>6}{row['device']:>8}"
                 f"{row['inference_samples_per_second']:>17.1f}{row['inference_ms_per_sample']:>11.2f}"
                 f"{row['training_windows_per_second']:>17.2f}{row['training_ms_per_window']:>11.1f}")
    return rows
