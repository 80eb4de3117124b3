"""The peers' side of `emu bench`: one persistent worker process per peer, JSON lines over stdin/stdout.

This file is run as a script by the interpreter that has the peer (`python .../bench_peers.py KIND`,
or `python -m emu.bench_peers KIND`), so that pyqg 0.7.2 can live in its own side environment (numpy
< 2) and jax-cfd in another: it imports only the standard library, numpy and the peer library, never
emu. The configuration it builds comes from emu (emu.bench), which sends it in full.

Kinds: `pyqg` (pyqg.QGModel stepped with `_step_forward`, one trajectory), `jaxcfd` (jax-cfd's
ForcedNavierStokes2D + crank_nicolson_rk4, jitted and repeated `inner` steps per compiled call: its
fastest use), `sleep` (a stand-in that "steps" by sleeping `seconds_per_step`: for tests of the
protocol and of the ratio arithmetic), and `spin` (no protocol: a pure-CPU busy loop for
`emu bench --busy-cores`, which stops and continues it with SIGSTOP/SIGCONT).

Protocol (one JSON object per line; every reply has "ok": true or "error": MESSAGE):
  worker, on start:  {"ok": true, "ready": true, "kind", "version", "python", "numpy", "pid"}, or
                     {"error": ..., "missing": MODULE} (then exits with status 3) when the peer's
                     library does not import in this interpreter
  {"op": "setup", "params": {...}} -> builds the model, takes warm-up steps ->
                     {"ok": true, "label", "granularity", "threads": {...}}
  {"op": "run", "steps": K}        -> {"ok": true, "steps": K' (>= K, a multiple of granularity),
                     "seconds": wall time of those steps, "cpu_seconds": this process's CPU time
                     over them, "finite": whether the state is still finite (checked after timing)}
  {"op": "quit"}                   -> {"ok": true}, then exit 0
Library output is sent to stderr, so stdout carries the protocol only.
"""

import json
import math
import os
import sys
import time
import traceback

import numpy as np

PEER_MODULES = {"pyqg": ("pyqg",), "jaxcfd": ("jax", "jax_cfd"), "sleep": ()}


def thread_settings(extra=None):
    """What decides this process's threads, and how many it has now."""
    settings = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset")}
    try:
        settings["os_threads"] = len(os.listdir("/proc/self/task"))
    except OSError:
        pass
    try:
        settings["cpus_allowed"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    settings.update(extra or {})
    return settings


class SleepPeer:
    """Steps by sleeping: `seconds_per_step` each (a known time for tests)."""

    def __init__(self, params):
        self.seconds_per_step = float(params.get("seconds_per_step", 0.001))
        self.granularity = int(params.get("granularity", 1))
        self.label = params.get("label", "sleep")
        self.version = "0"
        self.threads = thread_settings()

    def advance(self, steps):
        time.sleep(steps * self.seconds_per_step)

    def finite(self):
        return True


class PyqgPeer:
    """pyqg's two-layer QGModel with emu's parameters (emu's eddy preset is pyqg's defaults)."""

    def __init__(self, params):
        import pyqg

        self.version = pyqg.__version__
        self.label = f"pyqg {self.version}"
        self.granularity = 1
        threads = int(params.get("threads", 1))
        model = pyqg.QGModel(nx=int(params["grid"]), L=params["L"], rd=params["rd"], H1=params["H1"],
                             delta=params["delta"], U1=params["U1"], U2=params["U2"], beta=params["beta"],
                             rek=params["rek"], filterfac=params["filterfac"], dt=params["dt"], tmax=1e15,
                             twrite=10**9, tavestart=1e15, ntd=threads, log_level=0)
        self.model = model
        for _ in range(int(params.get("warmup", 20))):
            model._step_forward()
        try:
            import pyfftw  # noqa: F401

            fft = "pyfftw"
        except ImportError:
            fft = "numpy.fft"
        self.threads = thread_settings({"ntd": threads, "fft": fft})

    def advance(self, steps):
        step = self.model._step_forward
        for _ in range(steps):
            step()

    def finite(self):
        return bool(np.isfinite(self.model.q).all())


class JaxCfdPeer:
    """jax-cfd's Kolmogorov flow (ForcedNavierStokes2D: drag 0.1, forcing k = 4, smooth) from emu's
    initial vorticity (an .npy file, emu's (y, x) layout), `inner` steps per jitted call."""

    def __init__(self, params):
        import jax

        jax.config.update("jax_enable_x64", params["dtype"] == "float64")
        import jax_cfd
        from jax_cfd.base import funcutils, grids
        from jax_cfd.spectral import equations, time_stepping

        self.version = jax_cfd.__version__
        self.label = f"jax-cfd {self.version}"
        n = int(params["grid"])
        self.granularity = int(params.get("inner", 10))
        extent = float(params.get("domain_extent", 2 * math.pi))
        grid = grids.Grid((n, n), domain=((0, extent), (0, extent)))
        equation = equations.ForcedNavierStokes2D(float(params["viscosity"]), grid, smooth=True)
        self._step = jax.jit(funcutils.repeated(time_stepping.crank_nicolson_rk4(equation, float(params["dt"])),
                                                self.granularity))
        omega = np.load(params["initial_vorticity"]).astype(params["dtype"])
        self.state = jax.numpy.fft.rfftn(jax.numpy.asarray(omega.T))  # jax-cfd stores [x, y]
        for _ in range(int(params.get("warmup", 2))):  # the first call compiles
            self.state = self._step(self.state)
        self.state.block_until_ready()
        self.threads = thread_settings({"XLA_FLAGS": os.environ.get("XLA_FLAGS", "unset"),
                                        "jax_platform": jax.default_backend(), "jax": jax.__version__})

    def advance(self, steps):
        state = self.state
        for _ in range(steps // self.granularity):
            state = self._step(state)
        state.block_until_ready()
        self.state = state

    def finite(self):
        return bool(np.isfinite(np.asarray(self.state)).all())


PEERS = {"pyqg": PyqgPeer, "jaxcfd": JaxCfdPeer, "sleep": SleepPeer}


def _versions(kind):
    if kind == "pyqg":
        import pyqg

        return pyqg.__version__
    if kind == "jaxcfd":
        import jax_cfd

        return jax_cfd.__version__
    return "0"


def spin():
    """Pure CPU, forever (cos(sin(x)) on a cache-sized array: no denormals, no memory traffic to
    speak of), until the parent goes away. Says "ready" once numpy is loaded."""
    try:  # Linux: die with the parent even if it is killed outright
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort; the parent check below still ends the loop
        pass
    parent = os.getppid()
    a = np.random.default_rng(0).random((64, 64))
    b = np.empty_like(a)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        for _ in range(200):
            np.sin(a, out=b)
            np.cos(b, out=a)
        if os.getppid() != parent:
            return


def serve(kind, protocol_in, protocol_out):
    """Answers requests on `protocol_in` until "quit" or end of input."""

    def reply(message):
        protocol_out.write(json.dumps(message) + "\n")
        protocol_out.flush()

    for module in PEER_MODULES[kind]:
        try:
            __import__(module)
        except Exception as error:  # noqa: BLE001 - ImportError, or a library broken in this environment
            reply({"error": f"cannot import {module}: {type(error).__name__}: {error}", "missing": module})
            return 3
    reply({"ok": True, "ready": True, "kind": kind, "version": _versions(kind), "python": sys.executable,
           "numpy": np.__version__, "pid": os.getpid()})
    peer = None
    for line in protocol_in:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            op = request.get("op")
            if op == "quit":
                reply({"ok": True})
                return 0
            if op == "setup":
                peer = None
                peer = PEERS[kind](request.get("params", {}))
                reply({"ok": True, "label": peer.label, "granularity": peer.granularity, "threads": peer.threads})
            elif op == "run":
                if peer is None:
                    raise RuntimeError("run before setup")
                steps = max(1, int(request["steps"]))
                steps = -(-steps // peer.granularity) * peer.granularity
                cpu, start = time.process_time(), time.perf_counter()
                peer.advance(steps)
                seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
                reply({"ok": True, "steps": steps, "seconds": seconds, "cpu_seconds": cpu, "finite": peer.finite()})
            else:
                raise ValueError(f"unknown op {op!r}: expected setup, run or quit")
        except Exception as error:  # noqa: BLE001 - reported to emu, which raises it there
            sys.stderr.write(traceback.format_exc())
            reply({"error": f"{type(error).__name__}: {error}"})
    return 0


def main(argv):
    if len(argv) != 1 or argv[0] not in (*PEERS, "spin"):
        sys.stderr.write(f"usage: bench_peers.py {{{','.join((*PEERS, 'spin'))}}}\n")
        return 2
    if argv[0] == "spin":
        spin()
        return 0
    # The protocol keeps the real stdout; anything the libraries print goes to stderr instead.
    protocol_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return serve(argv[0], sys.stdin, protocol_out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
