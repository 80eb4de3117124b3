#!/usr/bin/env python3
"""Generate reference trajectories of the two-layer QG model from pyqg 0.7.2.

The ``.npz`` files this writes into ``tests/fixtures/`` let emu's own QG
solver be tested against the public pyqg model to round-off, without pyqg
being a dependency of emu. Run this script ONLY in the side virtual
environment described below. It does not import emu, and emu's tests must
not import pyqg: they only read the fixtures.

Building the side environment
-----------------------------
pyqg 0.7.2 ships only an sdist, and that sdist does not build with Cython 3 or
numpy 2. Build it against older tools in a venv kept outside the repository.
Build isolation must be off so that pyqg's ``setup.py`` finds pyfftw. When it
does, the kernel uses FFTW. Otherwise it silently falls back to numpy.fft.

    python3 -m venv /work/pyqg-venv
    /work/pyqg-venv/bin/pip install "setuptools<70" wheel "numpy<2" "cython<3" \
        "setuptools_scm[toml]>=6.2" importlib_metadata pyfftw
    /work/pyqg-venv/bin/pip install --no-build-isolation pyqg==0.7.2
    /work/pyqg-venv/bin/python -c "import pyqg; print(pyqg.__version__)"

Tested with CPython 3.11, numpy 1.26.4, Cython 0.29.37, pyFFTW 0.15.1.

Running
-------
From the repository root:

    /work/pyqg-venv/bin/python scripts/pyqg_reference.py            # all fixtures
    /work/pyqg-venv/bin/python scripts/pyqg_reference.py --bench     # + timings

Each file is written atomically: first to a temporary file in the same
folder, which is then moved into place with ``os.replace``.

What each fixture holds (``tests/fixtures/pyqg_qg_<case>_n<N>.npz``)
----------------------------------------------------------------
Layouts follow pyqg's own. Physical fields are ``(layer, y, x)`` with x the
last axis. Spectral fields are ``(layer, l, k)``, shape ``(2, N, N//2+1)``, as
given by ``numpy.fft.rfft2`` (forward transform unnormalised).

* ``q0``      (2, N, N) float64: the initial PV anomaly.
* ``steps``   int64: the step counts at which q was recorded.
* ``q``       (len(steps), 2, N, N) float64: physical PV after each of those
  steps, from a fresh model. Its first step is pyqg's forward Euler, the second
  AB2, and AB3 after that.
* ``t``       model time (s) at each recorded step.
* ``dt``      time step (s).
* ``filtr``   (N, N//2+1): pyqg's exponential spectral filter.
* ``k``, ``l`` (N, N//2+1): the wavenumber meshgrids (rad/m) that pyqg used.
* ``ph0``     (2, N, N//2+1) complex: pyqg's spectral streamfunction for q0,
  from one inversion.
* ``dqhdt0``  (2, N, N//2+1) complex: pyqg's spectral tendency for q0, i.e.
  advection (with the background flow and beta terms) plus bottom drag. This
  is the tendency the first forward-Euler step uses.
* ``cfl0``    pyqg's ``_calc_cfl()`` for q0.
* ``cfl``     pyqg's ``_calc_cfl()`` at each recorded step. pyqg evaluates it
  from the velocity of its latest inversion, so the value stored at step n is
  the CFL of the state at step n-1.
* ``params_json``  a JSON string with every model parameter (L, W, rd, H1,
  H2, delta, U1, U2, beta, rek, filterfac, dt, nx, ny), the derived
  F1/F2/Qy, the seed, the recipe for the initial condition, and the pyqg,
  numpy and pyFFTW versions.

Initial condition
-----------------
``rng = numpy.random.default_rng(seed)``. For each layer in turn (layer 0,
then layer 1), draw real and imaginary parts
``rng.standard_normal((2, N, N//2+1))`` and form ``c = re + 1j*im``. Zero
every coefficient whose integer total wavenumber index
``sqrt(i**2 + j**2)`` exceeds N/4, where i = 0..N/2 is the x index and
j = fftfreq(N)*N is the signed y index. Also zero the (0, 0) mean. Then
``q_layer = numpy.fft.irfft2(c, s=(N, N))``, minus its mean, times
``1e-5 / std(q_layer)``. Each layer therefore has zero mean and a standard
deviation of 1e-5 1/s. q0 is band-limited to |index| <= N/4, well inside
pyqg's filter plateau.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

try:
    import pyqg
except ImportError:  # pragma: no cover - side-env script
    sys.exit("pyqg is not importable: run this with /work/pyqg-venv/bin/python "
             "(see the module docstring for how to build that venv)")

PYQG_VERSION_REQUIRED = "0.7.2"

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_DIR = os.path.join(REPO_ROOT, "tests", "fixtures")

STEPS = (1, 2, 3, 5, 10, 50, 200)
Q_STD = 1e-5          # target std of each layer's q0 [1/s]

# Parameters shared by both configurations (Ross et al. 2023, run with pyqg).
COMMON = dict(
    L=1e6,            # domain length in x [m]
    W=1e6,            # domain length in y [m] (= L)
    rd=15000.0,       # first baroclinic deformation radius [m]
    H1=500.0,         # upper layer depth [m]
    U1=0.025,         # upper layer background zonal flow [m/s]
    U2=0.0,           # lower layer background zonal flow [m/s]
    filterfac=23.6,   # exponential filter amplitude
    dt=3600.0,        # time step [s]
)
CASES = {
    "eddy": dict(beta=1.5e-11, rek=5.787e-7, delta=0.25),
    "jet": dict(beta=1e-11, rek=7e-8, delta=0.1),
}
# fixture name -> (case, N, seed)
FIXTURES = {
    "pyqg_qg_eddy_n64": ("eddy", 64, 20230101),
    "pyqg_qg_jet_n64": ("jet", 64, 20230102),
    "pyqg_qg_eddy_n32": ("eddy", 32, 20230103),
}


def make_q0(n, seed, q_std=Q_STD):
    """Random band-limited PV anomaly, shape (2, n, n), (layer, y, x)."""
    rng = np.random.default_rng(seed)
    i = np.arange(n // 2 + 1)[np.newaxis, :]
    j = (np.fft.fftfreq(n) * n)[:, np.newaxis]
    keep = np.sqrt(i ** 2 + j ** 2) <= n / 4
    keep[0, 0] = False
    q0 = np.empty((2, n, n))
    for layer in range(2):
        re, im = rng.standard_normal((2, n, n // 2 + 1))
        c = np.where(keep, re + 1j * im, 0.0)
        ql = np.fft.irfft2(c, s=(n, n))
        ql -= ql.mean()
        q0[layer] = ql * (q_std / ql.std())
    return q0


def make_model(case, n):
    p = dict(COMMON, **CASES[case])
    m = pyqg.QGModel(
        nx=n, L=p["L"], W=p["W"], rd=p["rd"], delta=p["delta"], H1=p["H1"],
        U1=p["U1"], U2=p["U2"], beta=p["beta"], rek=p["rek"],
        filterfac=p["filterfac"], dt=p["dt"],
        tmax=1e12, twrite=10 ** 9, tavestart=1e12,  # never stop, log, average
        ntd=1, log_level=0,
    )
    return m, p


def set_q(m, q0):
    # Model.set_q(q) exists in 0.7.2 but is deprecated. All it does is
    # ``self.q = q``: the kernel's q setter copies q and runs rfft2 into qh.
    m.q = np.ascontiguousarray(q0, dtype=np.float64)


def build_fixture(name):
    case, n, seed = FIXTURES[name]
    q0 = make_q0(n, seed)

    # Inversion and tendency for q0. Use a separate model so that the
    # trajectory below starts from a pristine one.
    m0, p = make_model(case, n)
    set_q(m0, q0)
    m0._invert()          # ph = a @ qh, then uh, vh -> u, v
    ph0 = m0.ph.copy()
    cfl0 = float(m0._calc_cfl())
    m0._do_advection()    # dqhdt = -(ik*FFT((u+U)q) + il*FFT(vq) + ik*Qy*ph)
    m0._do_friction()     # dqhdt[-1] += rek*(k^2+l^2)*ph[-1]
    dqhdt0 = m0.dqhdt.copy()

    # The trajectory: a fresh model, stepped with pyqg's own _step_forward.
    m, _ = make_model(case, n)
    set_q(m, q0)
    assert m.tc == 0 and m.ablevel == 0
    qs, ts, cfls = [], [], []
    for s in range(1, max(STEPS) + 1):
        m._step_forward()
        if s == 1:
            # The first step must have used the tendency computed above.
            np.testing.assert_allclose(m.dqhdt_p, dqhdt0, rtol=0,
                                       atol=1e-12 * np.abs(dqhdt0).max())
        if s in STEPS:
            assert m.tc == s
            qs.append(m.q.copy())
            ts.append(float(m.t))
            cfls.append(float(m._calc_cfl()))

    import pyfftw
    params = dict(p)
    params.update(
        case=case, nx=n, ny=n, nz=2, H2=p["H1"] / p["delta"],
        F1=float(m.F1), F2=float(m.F2), Qy1=float(m.Qy1), Qy2=float(m.Qy2),
        seed=seed, steps=list(STEPS), q0_std=Q_STD,
        q0_recipe=("numpy.random.default_rng(seed); per layer: re, im = "
                   "rng.standard_normal((2, N, N//2+1)); keep rfft2 "
                   "coefficients with sqrt(i^2 + j^2) <= N/4 (i x-index "
                   "0..N/2, j = fftfreq(N)*N), (0,0) zeroed; irfft2; subtract "
                   "mean; scale to std q0_std"),
        pyqg_version=pyqg.__version__, numpy_version=np.__version__,
        pyfftw_version=pyfftw.__version__, ntd=1,
        timestepping="FE, AB2, then AB3; filter applied to the stepped qh",
    )
    data = dict(
        q0=q0, steps=np.array(STEPS, dtype=np.int64), q=np.array(qs),
        t=np.array(ts), dt=np.float64(p["dt"]),
        params_json=np.array(json.dumps(params, sort_keys=True)),
        filtr=np.asarray(m.filtr).copy(), k=np.asarray(m.k).copy(),
        l=np.asarray(m.l).copy(), ph0=ph0, dqhdt0=dqhdt0,
        cfl0=np.float64(cfl0), cfl=np.array(cfls),
    )
    for key, val in data.items():
        if np.asarray(val).dtype.kind in "fc":
            assert np.all(np.isfinite(val)), (name, key)
    return data


def write_atomic(path, data):
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-",
                               suffix=".npz.part")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates files 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def bench(n, nwarm=50, nsteps=500):
    """pyqg wall-clock steps/s for the eddy case, ntd=1."""
    m, _ = make_model("eddy", n)
    set_q(m, make_q0(n, 0))
    for _ in range(nwarm):
        m._step_forward()
    t0 = time.perf_counter()
    for _ in range(nsteps):
        m._step_forward()
    return nsteps / (time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=FIXTURE_DIR,
                    help="output folder (default: tests/fixtures)")
    ap.add_argument("--only", nargs="*", choices=sorted(FIXTURES),
                    help="write only these fixtures")
    ap.add_argument("--bench", action="store_true",
                    help="also time pyqg (eddy, ntd=1) at 64^2 and 256^2")
    args = ap.parse_args(argv)

    if pyqg.__version__ != PYQG_VERSION_REQUIRED:
        sys.exit(f"need pyqg {PYQG_VERSION_REQUIRED}, have {pyqg.__version__}")

    for name in args.only or FIXTURES:
        data = build_fixture(name)
        path = os.path.join(args.out, name + ".npz")
        write_atomic(path, data)
        q0, q = data["q0"], data["q"]
        rel = np.linalg.norm(q[-1] - q0) / np.linalg.norm(q0)
        print(f"{path}: {os.path.getsize(path)} bytes, "
              f"|q(step {data['steps'][-1]}) - q0| / |q0| = {rel:.3e}, "
              f"cfl0 = {float(data['cfl0']):.4f}")

    if args.bench:
        for n in (64, 256):
            print(f"pyqg eddy {n}x{n}, ntd=1: {bench(n):.1f} steps/s "
                  f"(500 steps after 50 warm-up)")


if __name__ == "__main__":
    main()
